//! The EC2 cloud provider against a real EC2 API: aws-sdk-ec2 over HTTP to a moto server
//! on 127.0.0.1 (started per test from the venv `scripts/test.sh` prepares).

use std::collections::BTreeMap;

use cooper::aws::{
    CLUSTER_TAG, Ec2Cloud, Ec2Settings, MANAGED_BY_TAG, NODECLAIM_TAG, NODECLASS_TAG,
};
use cooper::catalog::{CapacityType, Catalog};
use cooper::cloud::{CloudError, CloudProvider, LaunchRequest};
use cooper::crd::AmiFamily;
use cooper::labels::{Taint, TaintEffect};
use std::time::Duration;

mod common;
use common::{DISCOVERY, Moto, network, node_class_spec};

fn settings(moto: &Moto) -> Ec2Settings {
    common::moto_settings(moto)
}

/// The EC2 cloud with the network above and the NodeClass `default` resolved.
async fn cloud(moto: &Moto) -> Ec2Cloud {
    common::ready_cloud(moto).await
}

fn request(claim: &str) -> LaunchRequest {
    LaunchRequest {
        claim: claim.into(),
        client_token: format!("{claim}-uid-0"),
        nodepool: "gpu".into(),
        offerings: vec![
            ("g5.xlarge".into(), "us-east-1a".into(), CapacityType::Spot),
            ("g5.2xlarge".into(), "us-east-1b".into(), CapacityType::Spot),
        ],
        node_class: Some("default".into()),
        labels: BTreeMap::from([("cooper.dev/nodepool".to_string(), "gpu".to_string())]),
        taints: vec![Taint {
            key: "nvidia.com/gpu".into(),
            value: None,
            effect: TaintEffect::NoSchedule,
        }],
    }
}

/// The data of a launch template's first version.
async fn template_data(
    cloud: &Ec2Cloud,
    template: &aws_sdk_ec2::types::LaunchTemplate,
) -> aws_sdk_ec2::types::ResponseLaunchTemplateData {
    let versions = cloud
        .client()
        .describe_launch_template_versions()
        .launch_template_id(template.launch_template_id().expect("id"))
        .send()
        .await
        .expect("versions");
    versions.launch_template_versions()[0]
        .launch_template_data()
        .expect("data")
        .clone()
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
    let ami = common::amazon_ami(cloud.client()).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_class_resolves_subnets_groups_and_images_by_tag() {
    let moto = Moto::start();
    let cloud = Ec2Cloud::connect(settings(&moto))
        .await
        .with_catalog(&Catalog::embedded().expect("catalog"));
    network(cloud.client()).await;
    let status = cloud
        .prepare_node_class("default", &node_class_spec())
        .await
        .expect("resolves");
    let zones: Vec<&str> = status.subnets.iter().map(|s| s.zone.as_str()).collect();
    assert_eq!(
        zones,
        ["us-east-1a", "us-east-1b"],
        "only the tagged subnets"
    );
    assert_eq!(status.security_groups.len(), 1, "{status:?}");
    assert_eq!(status.amis.len(), 1, "{status:?}");
    assert_eq!(status.amis[0].architecture, "x86_64");

    // A selector that matches nothing is a clear, permanent error naming the field.
    let mut bad = node_class_spec();
    bad.subnet_selector_terms[0]
        .tags
        .insert(DISCOVERY.into(), "other-cluster".into());
    let err = cloud
        .prepare_node_class("bad", &bad)
        .await
        .expect_err("no subnet");
    assert!(
        matches!(&err, CloudError::Permanent(m) if m.contains("NodeClass bad") && m.contains("subnetSelectorTerms")),
        "{err:?}"
    );
    // AL2023 looks for the EKS-optimised images by owner and name; moto has none.
    let mut al2023 = node_class_spec();
    al2023.ami_family = AmiFamily::AL2023;
    al2023.ami_selector_terms.clear();
    let err = cloud
        .prepare_node_class("al2023", &al2023)
        .await
        .expect_err("no EKS AMI in moto");
    assert!(
        matches!(&err, CloudError::Permanent(m) if m.contains("AL2023") && m.contains("1.33")),
        "{err:?}"
    );
    // A pool without a NodeClass cannot launch on EC2.
    let mut no_class = request("no-class");
    no_class.node_class = None;
    let err = cloud
        .create(&no_class)
        .await
        .expect_err("needs a NodeClass");
    assert!(
        matches!(&err, CloudError::Permanent(m) if m.contains("nodeClassRef")),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn launch_template_carries_nodeadm_user_data_and_node_class_settings() {
    let moto = Moto::start();
    let cloud = cloud(&moto).await;
    let instance = cloud.create(&request("gpu-1")).await.expect("launch");
    let tags = tags_of(&cloud, &instance.id).await;
    assert_eq!(tags.get(NODECLASS_TAG).map(String::as_str), Some("default"));
    let templates = cloud
        .client()
        .describe_launch_templates()
        .send()
        .await
        .expect("templates");
    assert_eq!(templates.launch_templates().len(), 1);
    let template = &templates.launch_templates()[0];
    assert!(
        template
            .launch_template_name()
            .is_some_and(|n| n.starts_with("cooper-test-cluster-")),
        "{template:?}"
    );
    let data = template_data(&cloud, template).await;
    let user_data = base64::Engine::decode(
        &base64::engine::general_purpose::STANDARD,
        data.user_data().expect("user data"),
    )
    .expect("base64");
    let user_data = String::from_utf8(user_data).expect("utf-8");
    assert!(user_data.contains("kind: NodeConfig"), "{user_data}");
    assert!(user_data.contains("name: \"test-cluster\""), "{user_data}");
    assert!(
        user_data.contains("apiServerEndpoint: \"https://test-cluster.example\""),
        "{user_data}"
    );
    assert!(
        user_data.contains("--node-labels=cooper.dev/nodepool=gpu"),
        "{user_data}"
    );
    assert!(
        user_data.contains("key: \"nvidia.com/gpu\""),
        "the pool's taints are registered with: {user_data}"
    );
    assert_eq!(
        data.iam_instance_profile().and_then(|p| p.name()),
        Some("cooper-node")
    );
    assert_eq!(
        data.metadata_options()
            .and_then(|m| m.http_tokens())
            .map(|t| t.as_str()),
        Some("required"),
        "IMDSv2 by default"
    );

    // Another pool's labels make another template; the same ones reuse it.
    let mut other_pool = request("gpu-2");
    other_pool
        .labels
        .insert("team".to_string(), "research".to_string());
    cloud.create(&other_pool).await.expect("launch");
    cloud.create(&request("gpu-3")).await.expect("launch");
    let templates = cloud
        .client()
        .describe_launch_templates()
        .send()
        .await
        .expect("templates");
    assert_eq!(templates.launch_templates().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_catalog_refreshes_from_ec2_and_keeps_the_last_good_one() {
    use cooper::aws::catalog::{LiveCatalog, RefreshSettings};
    let moto = Moto::start();
    let cloud = Ec2Cloud::connect(settings(&moto)).await;
    let base = std::sync::Arc::new(Catalog::embedded().expect("catalog"));
    let mut live = LiveCatalog::new(base.clone());
    let (describes, _) = cloud.paced_calls();
    let refreshed = live
        .refresh(&cloud, &RefreshSettings::default())
        .await
        .expect("refresh");
    // Each page of DescribeInstanceTypes, DescribeInstanceTypeOfferings and
    // DescribeSpotPriceHistory took a token from the Describe bucket: the refresh is
    // paced with the launches' calls.
    assert!(
        cloud.paced_calls().0 >= describes + 3,
        "refresh paced {} describe calls",
        cloud.paced_calls().0 - describes
    );
    assert!(refreshed.source.contains("live"), "{}", refreshed.source);
    assert!(
        refreshed.types.len() >= 50,
        "most embedded types are offered in moto: {}",
        refreshed.types.len()
    );
    assert!(refreshed.types.len() <= base.types.len());
    let g5 = refreshed.instance_type("g5.xlarge").expect("g5.xlarge");
    assert_eq!(g5.spec.vcpu, 4);
    assert_eq!(g5.spec.gpu.as_ref().map(|g| g.count), Some(1));
    assert!(!g5.spec.zones.is_empty());
    // moto's spot prices are placeholders ($0.00001): not believed, so spot offerings
    // keep the typical saving from the embedded table.
    assert!(
        refreshed
            .types
            .iter()
            .all(|t| t.spec.spot.as_ref().is_none_or(|s| s.prices.is_empty())),
        "placeholder spot prices are ignored"
    );
    let spot = |c: &Catalog| {
        c.offerings
            .iter()
            .find(|o| {
                c.types[o.type_index].name() == "g5.xlarge"
                    && o.zone == "us-east-1a"
                    && o.capacity_type == CapacityType::Spot
            })
            .map(|o| o.price)
    };
    assert_eq!(spot(&refreshed), spot(&base));
    assert!(
        refreshed.offerings.iter().all(|o| o.price > 0.0),
        "every offering priced"
    );

    // EC2 gone: the refresh fails and the last good catalog stays current.
    drop(moto);
    let err = live
        .refresh(&cloud, &RefreshSettings::default())
        .await
        .expect_err("no server");
    assert!(matches!(err, CloudError::Transient(_)), "{err:?}");
    let current = live.current();
    assert!(std::sync::Arc::ptr_eq(&current, &refreshed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interruption_notices_arrive_through_sqs_and_are_consumed() {
    use cooper::cloud::{Interruption, InterruptionKind};
    let moto = Moto::start();
    let (probe, url, queue) = common::interruption_queue(&moto, Duration::from_secs(1)).await;
    let cloud = Ec2Cloud::connect(settings(&moto))
        .await
        .with_interruption_queue(queue);
    for body in [
        r#"{"version":"0","detail-type":"EC2 Spot Instance Interruption Warning","source":"aws.ec2",
            "detail":{"instance-id":"i-0b662ef9931388ba0","instance-action":"terminate"}}"#,
        "this is not an event",
        r#"{"detail-type":"EC2 Instance State-change Notification","source":"aws.ec2",
            "detail":{"instance-id":"i-2","state":"running"}}"#,
    ] {
        probe
            .client()
            .send_message()
            .queue_url(&url)
            .message_body(body)
            .send()
            .await
            .expect("send");
    }
    let mut received = Vec::new();
    let start = std::time::Instant::now();
    while received.is_empty() && start.elapsed() < Duration::from_secs(10) {
        received.extend(cloud.interruptions().await.expect("receive"));
    }
    assert_eq!(
        received,
        [Interruption {
            instance_id: "i-0b662ef9931388ba0".into(),
            kind: InterruptionKind::SpotInterruption
        }]
    );
    // Every message was consumed, the unreadable one too: nothing comes back.
    let attributes = probe
        .client()
        .get_queue_attributes()
        .queue_url(&url)
        .attribute_names(aws_sdk_sqs::types::QueueAttributeName::All)
        .send()
        .await
        .expect("attributes");
    let count = |name: aws_sdk_sqs::types::QueueAttributeName| {
        attributes
            .attributes()
            .and_then(|a| a.get(&name))
            .cloned()
            .unwrap_or_default()
    };
    assert_eq!(
        count(aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessages),
        "0"
    );
    assert_eq!(
        count(aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
        "0"
    );
}

/// A public address is billed per hour (issue 15): the NodeClass status records which
/// subnets assign one by default, and `associatePublicIPAddress` reaches EC2 on the
/// launch template's primary interface (with the security groups, which EC2 refuses in
/// both places), and the fleet still launches into the zone's subnet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_addresses_are_recorded_and_requested() {
    let moto = Moto::start();
    let cloud = cloud(&moto).await;
    let subnets = cloud
        .client()
        .describe_subnets()
        .filters(
            aws_sdk_ec2::types::Filter::builder()
                .name(format!("tag:{DISCOVERY}"))
                .values("test-cluster")
                .build(),
        )
        .send()
        .await
        .expect("subnets");
    let public = subnets
        .subnets()
        .iter()
        .find(|s| s.availability_zone() == Some("us-east-1a"))
        .and_then(|s| s.subnet_id())
        .expect("subnet in us-east-1a")
        .to_string();
    cloud
        .client()
        .modify_subnet_attribute()
        .subnet_id(&public)
        .map_public_ip_on_launch(
            aws_sdk_ec2::types::AttributeBooleanValue::builder()
                .value(true)
                .build(),
        )
        .send()
        .await
        .expect("map public IPs");
    let mut spec = node_class_spec();
    spec.associate_public_ip_address = Some(true);
    let status = cloud
        .prepare_node_class("public", &spec)
        .await
        .expect("resolves");
    let flags: Vec<(&str, bool)> = status
        .subnets
        .iter()
        .map(|s| (s.zone.as_str(), s.public_ipv4))
        .collect();
    assert_eq!(flags, [("us-east-1a", true), ("us-east-1b", false)]);
    assert!(spec.billing(false).public_ipv4);

    let mut launch = request("public-1");
    launch.node_class = Some("public".into());
    let instance = cloud.create(&launch).await.expect("launch");
    assert_eq!(instance.zone, "us-east-1a");
    let templates = cloud
        .client()
        .describe_launch_templates()
        .send()
        .await
        .expect("templates");
    let [template] = templates.launch_templates() else {
        panic!("one launch template: {templates:?}");
    };
    let data = template_data(&cloud, template).await;
    let nic = data
        .network_interfaces()
        .first()
        .expect("the primary interface is specified");
    assert_eq!(nic.associate_public_ip_address(), Some(true));
    assert_eq!(nic.device_index(), Some(0));
    assert_eq!(nic.groups(), status.security_groups.as_slice());
    assert!(data.security_group_ids().is_empty(), "{data:?}");
}
