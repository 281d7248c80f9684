//! Helpers shared by the integration tests: the real servers they talk to (the
//! Kubernetes API emulator, a moto EC2 server) and a network for NodeClasses to select.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kube::Client;

/// The identity the controller runs as (deploy/base/rbac.yaml binds its rules).
pub const CONTROLLER_USER: &str = "system:serviceaccount:cooper:cooper";

/// The API server emulator, enforcing `deploy/base/rbac.yaml` on requests made as the
/// controller's ServiceAccount; killed on drop, which fails the test if any of the
/// controller's requests was forbidden.
pub struct Emulator {
    child: Child,
    pub port: u16,
}

impl Emulator {
    pub fn start() -> Emulator {
        let python = std::env::var("COOPER_TEST_PYTHON").unwrap_or_else(|_| {
            concat!(env!("CARGO_MANIFEST_DIR"), "/target/test-venv/bin/python").to_string()
        });
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port");
        let mut child = Command::new(&python)
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/apiserver/emulator.py"
            ))
            .arg(port.to_string())
            .env(
                "COOPER_EMULATOR_RBAC",
                concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/base/rbac.yaml"),
            )
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {python} (run scripts/test.sh, which creates the test venv): {e}"
                )
            });
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("emulator output");
        assert_eq!(line.trim(), "ready", "emulator did not start");
        Emulator { child, port }
    }

    /// An unrestricted client: the tests' own, playing the kubelet, the scheduler and
    /// the user.
    pub fn client(&self) -> Client {
        Client::try_from(self.config()).expect("client")
    }

    /// A client for the controller: as its ServiceAccount, so only the RBAC rules in
    /// `deploy/base/rbac.yaml` allow its requests (and kube's 429 retry layer off, as
    /// `cooper::controller::client` builds it).
    pub fn controller_client(&self) -> Client {
        let mut config = self.config();
        config.auth_info.impersonate = Some(CONTROLLER_USER.to_string());
        Client::try_from(config).expect("client")
    }

    fn config(&self) -> kube::Config {
        let mut config = kube::Config::new(
            format!("http://127.0.0.1:{}", self.port)
                .parse()
                .expect("uri"),
        );
        config.default_retry = false;
        config
    }

    /// The controller's requests the RBAC rules refused.
    pub fn denied(&self) -> Vec<String> {
        use std::io::{Read, Write};
        let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else {
            return Vec::new();
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = stream.write_all(b"GET /emulator/stats HTTP/1.0\r\nHost: localhost\r\n\r\n");
        let mut response = String::new();
        let _ = stream.read_to_string(&mut response);
        let body = response.split("\r\n\r\n").nth(1).unwrap_or_default();
        serde_json::from_str::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v["denied"].as_array().cloned())
            .unwrap_or_default()
            .into_iter()
            .filter_map(|d| d.as_str().map(str::to_string))
            .collect()
    }
}

impl Emulator {
    /// A kubeconfig file pointing at the emulator, for the `cooper` binary (as the
    /// controller's ServiceAccount).
    pub fn kubeconfig(&self) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!("cooper-kubeconfig-{}", self.port));
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: e\n  cluster: {{server: 'http://127.0.0.1:{}'}}\nusers:\n- name: u\n  user: {{as: '{CONTROLLER_USER}'}}\ncontexts:\n- name: c\n  context: {{cluster: e, user: u}}\ncurrent-context: c\n",
                self.port
            ),
        )
        .expect("kubeconfig");
        path
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let denied = if std::thread::panicking() {
            Vec::new()
        } else {
            self.denied()
        };
        let _ = self.child.kill();
        let _ = self.child.wait();
        assert!(
            denied.is_empty(),
            "deploy/base/rbac.yaml does not allow what the controller did:\n{}",
            denied.join("\n")
        );
    }
}

/// A moto server, killed on drop.
pub struct Moto {
    child: Child,
    pub port: u16,
}

impl Moto {
    pub fn start() -> Moto {
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

pub const DISCOVERY: &str = "cooper.dev/discovery";

/// A VPC with tagged subnets in two zones (and an untagged one in a third), a tagged
/// security group and a tagged AMI: what a NodeClass selects.
pub async fn network(ec2: &aws_sdk_ec2::Client) {
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
    for (i, zone) in ["us-east-1a", "us-east-1b", "us-east-1c"]
        .iter()
        .enumerate()
    {
        let subnet = ec2
            .create_subnet()
            .vpc_id(&vpc_id)
            .cidr_block(format!("10.0.{i}.0/24"))
            .availability_zone(*zone)
            .send()
            .await
            .expect("subnet");
        let id = subnet
            .subnet()
            .and_then(|s| s.subnet_id())
            .expect("subnet id")
            .to_string();
        if *zone != "us-east-1c" {
            tag(ec2, &id, DISCOVERY, "test-cluster").await;
        }
    }
    let sg = ec2
        .create_security_group()
        .group_name("nodes")
        .description("nodes")
        .vpc_id(&vpc_id)
        .send()
        .await
        .expect("sg");
    tag(
        ec2,
        sg.group_id().expect("sg id"),
        DISCOVERY,
        "test-cluster",
    )
    .await;
    let ami = amazon_ami(ec2).await;
    tag(ec2, &ami, "cooper.dev/ami", "gpu-nodes").await;
}

/// An x86_64 image owned by Amazon (moto ships a list of them).
pub async fn amazon_ami(ec2: &aws_sdk_ec2::Client) -> String {
    let images = ec2
        .describe_images()
        .owners("amazon")
        .filters(
            aws_sdk_ec2::types::Filter::builder()
                .name("architecture")
                .values("x86_64")
                .build(),
        )
        .send()
        .await
        .expect("images");
    images
        .images()
        .first()
        .and_then(|i| i.image_id())
        .expect("an AMI")
        .to_string()
}

/// The EC2 cloud on a moto server, with the embedded catalog, [`network`] created and
/// the NodeClass `default` ([`node_class_spec`]) resolved.
pub async fn ready_cloud(moto: &Moto) -> cooper::aws::Ec2Cloud {
    let cloud = cooper::aws::Ec2Cloud::connect(moto_settings(moto))
        .await
        .with_catalog(&cooper::catalog::Catalog::embedded().expect("catalog"));
    network(cloud.client()).await;
    use cooper::cloud::CloudProvider;
    cloud
        .prepare_node_class("default", &node_class_spec())
        .await
        .expect("NodeClass resolves");
    cloud
}

pub async fn tag(ec2: &aws_sdk_ec2::Client, id: &str, key: &str, value: &str) {
    ec2.create_tags()
        .resources(id)
        .tags(
            aws_sdk_ec2::types::Tag::builder()
                .key(key)
                .value(value)
                .build(),
        )
        .send()
        .await
        .expect("tag");
}

/// Wait until `check` returns something, polling every 100 ms; fail the test after
/// `timeout`, saying what was awaited.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// EC2 settings for a moto server: its endpoint, dummy credentials, the test cluster.
pub fn moto_settings(moto: &Moto) -> cooper::aws::Ec2Settings {
    cooper::aws::Ec2Settings {
        cluster: cooper::aws::ClusterInfo {
            name: "test-cluster".into(),
            endpoint: "https://test-cluster.example".into(),
            certificate_authority: "Q0E=".into(),
            cidr: "10.100.0.0/16".into(),
            kubernetes_version: "1.33".into(),
        },
        region: Some("us-east-1".into()),
        endpoint: Some(format!("http://127.0.0.1:{}", moto.port)),
        static_credentials: Some(("testing".into(), "testing".into())),
        max_attempts: 2,
    }
}

/// A NodeClass selecting what [`network`] creates: the tagged subnets, security group
/// and AMI, with an instance profile and a tag.
pub fn node_class_spec() -> cooper::crd::NodeClassSpec {
    let selector = |k: &str, v: &str| cooper::crd::SelectorTerm {
        tags: std::collections::BTreeMap::from([(k.to_string(), v.to_string())]),
        id: None,
    };
    cooper::crd::NodeClassSpec {
        ami_family: cooper::crd::AmiFamily::Custom,
        ami_selector_terms: vec![selector("cooper.dev/ami", "gpu-nodes")],
        subnet_selector_terms: vec![selector(DISCOVERY, "test-cluster")],
        security_group_selector_terms: vec![selector(DISCOVERY, "*")],
        instance_profile: Some("cooper-node".into()),
        role: None,
        user_data: None,
        block_device_mappings: Vec::new(),
        tags: std::collections::BTreeMap::from([("team".to_string(), "ml".to_string())]),
        metadata_options: None,
    }
}
