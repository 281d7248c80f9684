//! The EC2 cloud provider against a real EC2 API: aws-sdk-ec2 over HTTP to a moto server
//! on 127.0.0.1 (started per test from the venv `scripts/test.sh` prepares).

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cooper::aws::{CLUSTER_TAG, Ec2Cloud, Ec2Settings, MANAGED_BY_TAG, NODECLAIM_TAG};
use cooper::catalog::{CapacityType, Catalog};
use cooper::cloud::{CloudError, CloudProvider, LaunchRequest};

/// A moto server, killed on drop.
struct Moto {
    child: Child,
    port: u16,
}

impl Moto {
    fn start() -> Moto {
        let bin = std::env::var("COOPER_TEST_PYTHON")
            .map(|p| p.replace("/bin/python", "/bin/moto_server"))
            .unwrap_or_else(|_| {
                concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/target/test-venv/bin/moto_server"
                )
                .to_string()
            });
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("port");
        let child = Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {bin} (run scripts/test.sh, which prepares the test venv): {e}"
                )
            });
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "moto did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Moto { child, port }
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A VPC with a subnet in two zones and an AMI, as a NodeClass would resolve them.
async fn cloud(moto: &Moto) -> Ec2Cloud {
    let mut settings = Ec2Settings {
        cluster: "test-cluster".into(),
        region: Some("us-east-1".into()),
        endpoint: Some(format!("http://127.0.0.1:{}", moto.port)),
        subnets: BTreeMap::new(),
        image_id: String::new(),
        security_groups: Vec::new(),
        tags: BTreeMap::from([("team".to_string(), "ml".to_string())]),
        static_credentials: Some(("testing".into(), "testing".into())),
    };
    let bootstrap = Ec2Cloud::connect(settings.clone()).await;
    let ec2 = bootstrap.client();
    let vpc = ec2
        .create_vpc()
        .cidr_block("10.0.0.0/16")
        .send()
        .await
        .expect("vpc");
    let vpc_id = vpc
        .vpc()
        .and_then(|v| v.vpc_id())
        .expect("vpc id")
        .to_string();
    for (i, zone) in ["us-east-1a", "us-east-1b"].iter().enumerate() {
        let subnet = ec2
            .create_subnet()
            .vpc_id(&vpc_id)
            .cidr_block(format!("10.0.{i}.0/24"))
            .availability_zone(*zone)
            .send()
            .await
            .expect("subnet");
        settings.subnets.insert(
            zone.to_string(),
            subnet
                .subnet()
                .and_then(|s| s.subnet_id())
                .expect("subnet id")
                .to_string(),
        );
    }
    let images = ec2
        .describe_images()
        .owners("amazon")
        .send()
        .await
        .expect("images");
    settings.image_id = images
        .images()
        .first()
        .and_then(|i| i.image_id())
        .expect("an AMI")
        .to_string();
    Ec2Cloud::connect(settings)
        .await
        .with_prices(&Catalog::embedded().expect("catalog"))
}

fn request(claim: &str) -> LaunchRequest {
    LaunchRequest {
        claim: claim.into(),
        nodepool: "gpu".into(),
        offerings: vec![
            ("g5.xlarge".into(), "us-east-1a".into(), CapacityType::Spot),
            ("g5.2xlarge".into(), "us-east-1b".into(), CapacityType::Spot),
        ],
    }
}

async fn tags_of(cloud: &Ec2Cloud, id: &str) -> BTreeMap<String, String> {
    let out = cloud
        .client()
        .describe_instances()
        .instance_ids(id)
        .send()
        .await
        .expect("describe");
    out.reservations()
        .iter()
        .flat_map(|r| r.instances())
        .flat_map(|i| i.tags())
        .map(|t| {
            (
                t.key().unwrap_or_default().to_string(),
                t.value().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn launch_is_tagged_idempotent_listed_and_terminated() {
    let moto = Moto::start();
    let cloud = cloud(&moto).await;
    let instance = cloud.create(&request("gpu-abc")).await.expect("launch");
    assert!(instance.id.starts_with("i-"), "{instance:?}");
    assert!(
        ["g5.xlarge", "g5.2xlarge"].contains(&instance.instance_type.as_str()),
        "{instance:?}"
    );
    assert_eq!(instance.capacity_type, CapacityType::Spot);
    assert!(instance.price_per_hour > 0.0, "priced from the catalog");
    let tags = tags_of(&cloud, &instance.id).await;
    assert_eq!(
        tags.get(CLUSTER_TAG).map(String::as_str),
        Some("test-cluster")
    );
    assert_eq!(tags.get(MANAGED_BY_TAG).map(String::as_str), Some("cooper"));
    assert_eq!(tags.get(NODECLAIM_TAG).map(String::as_str), Some("gpu-abc"));
    assert_eq!(
        tags.get("team").map(String::as_str),
        Some("ml"),
        "the NodeClass's tags"
    );

    // A second launch for the same claim (a restart mid-launch) returns the same instance.
    let again = cloud
        .create(&request("gpu-abc"))
        .await
        .expect("launch again");
    assert_eq!(again.id, instance.id);
    let listed = cloud.list().await.expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].claim, "gpu-abc");

    // The launch template is created once and reused.
    let other = cloud
        .create(&request("gpu-def"))
        .await
        .expect("second claim");
    assert_ne!(other.id, instance.id);
    let templates = cloud
        .client()
        .describe_launch_templates()
        .send()
        .await
        .expect("templates");
    assert_eq!(templates.launch_templates().len(), 1);

    cloud.terminate(&instance.id).await.expect("terminate");
    let listed: Vec<String> = cloud
        .list()
        .await
        .expect("list")
        .into_iter()
        .map(|i| i.id)
        .collect();
    assert_eq!(listed, vec![other.id.clone()]);
    assert!(matches!(
        cloud.terminate("i-00000000000000000").await,
        Err(CloudError::NotFound(_)) | Err(CloudError::Permanent(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_terminates_an_instance_it_did_not_launch() {
    let moto = Moto::start();
    let cloud = cloud(&moto).await;
    let images = cloud
        .client()
        .describe_images()
        .owners("amazon")
        .send()
        .await
        .expect("images");
    let ami = images
        .images()
        .first()
        .and_then(|i| i.image_id())
        .expect("ami")
        .to_string();
    let foreign = cloud
        .client()
        .run_instances()
        .image_id(ami)
        .instance_type("m5.large".into())
        .min_count(1)
        .max_count(1)
        .send()
        .await
        .expect("run");
    let id = foreign
        .instances()
        .first()
        .and_then(|i| i.instance_id())
        .expect("id")
        .to_string();
    let err = cloud.terminate(&id).await.expect_err("must refuse");
    assert!(
        matches!(&err, CloudError::Permanent(m) if m.contains("refusing")),
        "{err:?}"
    );
    let state = cloud
        .client()
        .describe_instances()
        .instance_ids(&id)
        .send()
        .await
        .expect("describe");
    let name = state.reservations()[0].instances()[0]
        .state()
        .and_then(|s| s.name())
        .map(|n| n.as_str().to_string());
    assert_eq!(name.as_deref(), Some("running"));
    assert!(
        cloud.list().await.expect("list").is_empty(),
        "foreign instances are not cooper's"
    );
}
