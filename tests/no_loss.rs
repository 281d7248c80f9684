//! Never destroy or duplicate what is running, with real parts: a real Kubernetes 1.26
//! control plane, moto for EC2 (which pages DescribeInstances at 100 reservations), the
//! fault proxy in front of it (resets after EC2 acted, responses held for minutes, EC2's
//! ClientToken idempotency), and the `cooper` binary killed with SIGKILL mid-flight.

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_ec2::types::{InstanceType, Placement, ResourceType, Tag, TagSpecification};
use cooper::aws::{CLUSTER_TAG, Ec2Cloud, MANAGED_BY_TAG, NODECLAIM_TAG, NODEPOOL_TAG};
use cooper::catalog::Catalog;
use cooper::controller::{Controller, Settings, TERMINATION_FINALIZER, start_reflectors};
use cooper::crd::{NodeClaim, NodeClass};
use cooper::nodepool::NodePoolResource;
use cooper::provisioning::BatchSettings;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;

mod common;
use common::cluster::{claims, create_pod, running};
use common::k8s::ControlPlane;
use common::kubelet::{Kubelet, KubeletOptions};
use common::{
    FaultProxy, Moto, amazon_ami, instances_by_claim, moto_settings, network, node_class_spec,
    wait_for,
};

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("cooper=info")
        .try_init();
}

/// EC2 instances (one reservation each) tagged as cooper's for `claim`.
async fn run_instance(ec2: &aws_sdk_ec2::Client, ami: &str, claim: &str) -> String {
    let tags = [
        (CLUSTER_TAG, "test-cluster"),
        (MANAGED_BY_TAG, "cooper"),
        (NODECLAIM_TAG, claim),
        (NODEPOOL_TAG, "general"),
    ];
    let out = ec2
        .run_instances()
        .image_id(ami)
        .instance_type(InstanceType::M5Large)
        .placement(Placement::builder().availability_zone("us-east-1a").build())
        .min_count(1)
        .max_count(1)
        .tag_specifications(
            TagSpecification::builder()
                .resource_type(ResourceType::Instance)
                .set_tags(Some(
                    tags.iter()
                        .map(|(k, v)| Tag::builder().key(*k).value(*v).build())
                        .collect(),
                ))
                .build(),
        )
        .send()
        .await
        .expect("run instance");
    out.instances()[0]
        .instance_id()
        .expect("instance id")
        .to_string()
}

/// State of an instance in EC2 (moto), by id.
async fn state(ec2: &aws_sdk_ec2::Client, id: &str) -> String {
    let out = ec2
        .describe_instances()
        .instance_ids(id)
        .send()
        .await
        .expect("describe");
    out.reservations()
        .iter()
        .flat_map(|r| r.instances())
        .filter_map(|i| i.state()?.name().map(|n| n.as_str().to_string()))
        .next()
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_page_through_300_instances_and_the_collector_deletes_nothing_it_cannot_prove() {
    init_tracing();
    let plane = ControlPlane::start().await;
    let client = plane.admin().await;
    let moto = Moto::start();
    let ec2 = Ec2Cloud::connect(moto_settings(&moto)).await;
    let direct = ec2.client().clone();
    let ami = amazon_ami(&direct).await;

    // 300 instances, each with its NodeClaim and Node, launched long ago; then 5
    // orphans (tagged for claims that no longer exist), launched last: on the last page.
    const CLAIMED: usize = 300;
    let names: Vec<String> = (0..CLAIMED).map(|i| format!("general-{i:04}")).collect();
    let ids: Vec<String> = futures::stream::iter(names.iter())
        .map(|n| run_instance(&direct, &ami, n))
        .buffered(8)
        .collect()
        .await;
    let mut orphans = Vec::new();
    for i in 0..5 {
        orphans.push(run_instance(&direct, &ami, &format!("general-gone-{i}")).await);
    }
    // moto pages DescribeInstances at 100 reservations: a single call cannot see them all.
    let first_page = direct.describe_instances().send().await.expect("describe");
    assert!(
        first_page.next_token().is_some() && first_page.reservations().len() <= 100,
        "moto no longer pages DescribeInstances; this test would prove nothing"
    );

    let claims_api: Api<NodeClaim> = Api::all(client.clone());
    let nodes_api: Api<Node> = Api::all(client.clone());
    let long_ago = (k8s_openapi::jiff::Timestamp::now()
        - k8s_openapi::jiff::SignedDuration::from_secs(3600))
    .to_string();
    futures::stream::iter(names.iter().zip(&ids))
        .map(|(name, id)| {
            let (claims_api, nodes_api, long_ago) =
                (claims_api.clone(), nodes_api.clone(), long_ago.clone());
            async move {
                let provider_id = format!("aws:///us-east-1a/{id}");
                let claim: NodeClaim = serde_json::from_value(json!({
                    "apiVersion": "cooper.dev/v1alpha1", "kind": "NodeClaim",
                    "metadata": {"name": name, "finalizers": [TERMINATION_FINALIZER]},
                    "spec": {"nodePool": "general", "offerings": [{"instanceType": "m5.large", "zone": "us-east-1a", "capacityType": "on-demand", "pricePerHour": 0.096}]}
                }))
                .expect("claim");
                claims_api
                    .create(&PostParams::default(), &claim)
                    .await
                    .expect("claim");
                let status = json!({"status": {"instanceId": id, "providerId": provider_id,
                    "instanceType": "m5.large", "zone": "us-east-1a", "capacityType": "on-demand",
                    "conditions": [{"type": "Launched", "status": "True", "reason": "Launched", "message": "", "lastTransitionTime": long_ago}]}});
                claims_api
                    .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
                    .await
                    .expect("claim status");
                let node: Node = serde_json::from_value(json!({
                    "metadata": {"name": format!("node-{id}")},
                    "spec": {"providerID": provider_id},
                }))
                .expect("node");
                nodes_api
                    .create(&PostParams::default(), &node)
                    .await
                    .expect("node");
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<()>>()
        .await;

    let catalog = Arc::new(Catalog::embedded().expect("catalog"));
    let cloud = Arc::new(ec2.with_catalog(&catalog));
    let controller_client = plane.controller_client().await;
    let stores = start_reflectors(&controller_client).await;
    let metrics = Arc::new(cooper::controller::metrics::Metrics::default());
    let controller = Controller::new(
        controller_client,
        cloud,
        catalog,
        Settings {
            tick: Duration::from_millis(200),
            gc_interval: Duration::from_millis(500),
            gc_grace: Duration::from_secs(2),
            ..Settings::default()
        },
        stores,
    )
    .with_metrics(metrics.clone());
    tokio::spawn(cooper::controller::run_alone(
        controller,
        std::future::pending::<()>(),
    ));

    // The orphans on the last page are found and terminated...
    wait_for(
        "the orphans terminated",
        Duration::from_secs(60),
        || async {
            for id in &orphans {
                let s = state(&direct, id).await;
                if s != "terminated" && s != "shutting-down" {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
    // ... and after several more passes nothing claimed was touched.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let left = claims(&client).await;
    assert_eq!(left.len(), CLAIMED, "the collector deleted claims");
    assert!(left.iter().all(|c| c.metadata.deletion_timestamp.is_none()));
    let nodes = nodes_api.list(&ListParams::default()).await.expect("nodes");
    assert_eq!(nodes.items.len(), CLAIMED, "the collector deleted Nodes");
    for id in ids.iter().step_by(37) {
        assert_eq!(state(&direct, id).await, "running");
    }
    let text = metrics.encode();
    assert!(
        !text.contains("cooper_gc_refused_total{reason=\"listed_incompletely\"}"),
        "a listing missed live instances:\n{text}"
    );
}

/// A control plane, moto with [`network`] in it, the fault proxy in front of moto, and
/// an EC2 client straight to moto (for the test's own looks).
struct Ec2World {
    plane: ControlPlane,
    client: Client,
    moto: Moto,
    proxy: FaultProxy,
    direct: Ec2Cloud,
}

impl Ec2World {
    async fn start() -> Ec2World {
        init_tracing();
        let plane = ControlPlane::start().await;
        let client = plane.admin().await;
        let moto = Moto::start();
        let proxy = FaultProxy::start(moto.port);
        let direct = Ec2Cloud::connect(moto_settings(&moto)).await;
        network(direct.client()).await;
        Ec2World {
            plane,
            client,
            moto,
            proxy,
            direct,
        }
    }
}

/// A NodeClass in the cluster selecting what [`network`] creates, and a pool of
/// m5.xlarge on-demand using it (one 3-CPU pod per node).
async fn ec2_objects(client: &Client) {
    ec2_objects_with(client, serde_json::Value::Null).await;
}

/// [`ec2_objects`] with this `spec.disruption` on the pool.
async fn ec2_objects_with(client: &Client, disruption: serde_json::Value) {
    let class = NodeClass::new("default", node_class_spec());
    Api::<NodeClass>::all(client.clone())
        .create(&PostParams::default(), &class)
        .await
        .expect("nodeclass");
    let mut pool = json!({
        "apiVersion": "cooper.dev/v1alpha1", "kind": "NodePool", "metadata": {"name": "general"},
        "spec": {"template": {"spec": {
            "nodeClassRef": {"name": "default"},
            "requirements": [
                {"key": "node.kubernetes.io/instance-type", "operator": "In", "values": ["m5.xlarge"]},
                {"key": "karpenter.sh/capacity-type", "operator": "In", "values": ["on-demand"]},
                {"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["us-east-1a", "us-east-1b"]}]}}}
    });
    if !disruption.is_null() {
        pool["spec"]["disruption"] = disruption;
    }
    let pool: NodePoolResource = serde_json::from_value(pool).expect("pool");
    Api::<NodePoolResource>::all(client.clone())
        .create(&PostParams::default(), &pool)
        .await
        .expect("pool");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_launch_whose_answer_is_lost_or_held_for_minutes_yields_one_instance_per_claim() {
    let Ec2World {
        plane,
        client,
        moto,
        proxy,
        direct,
    } = Ec2World::start().await;
    // The first launch is carried out by EC2 twice over, but both times the connection
    // resets before the answer arrives (the SDK's own retry included), so cooper tries
    // again itself; EC2's tags lag, so the tag lookup before that retry finds nothing.
    // Another CreateFleet is held for ten minutes after EC2 acted.
    proxy.configure(json!({"seed": 7, "rules": [
        {"action": "CreateFleet", "reset_after_token": {"tokens": 1, "times": 2},
         "hang": {"count": 1, "seconds": 600}},
        {"action": "DescribeInstances", "tag_lag_s": 120}
    ]}));
    let mut settings = moto_settings(&moto);
    settings.endpoint = Some(format!("http://127.0.0.1:{}", proxy.port));
    settings.attempt_timeout = Some(Duration::from_secs(15));
    settings.operation_timeout = Some(Duration::from_secs(40));
    let catalog = Arc::new(Catalog::embedded().expect("catalog"));
    let cloud = Arc::new(Ec2Cloud::connect(settings).await.with_catalog(&catalog));
    ec2_objects(&client).await;
    const PODS: usize = 5;
    for i in 0..PODS {
        create_pod(
            &client,
            &format!("web-{i}"),
            json!({"cpu": "3", "memory": "2Gi"}),
            false,
        )
        .await;
    }
    let _kubelet = Kubelet::start(client.clone(), catalog.clone(), KubeletOptions::default());
    start_controller(&plane, cloud, catalog, Settings::default()).await;

    // While one launch is held, the others launch, register and run their pods.
    let start = Instant::now();
    let mut running_nodes = BTreeSet::new();
    let first_four = wait_for("four pods running", Duration::from_secs(60), || async {
        let mut n = 0;
        for i in 0..PODS {
            let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
            let pod = pods.get(&format!("web-{i}")).await.ok()?;
            if pod.status.and_then(|s| s.phase).as_deref() == Some("Running") {
                n += 1;
            }
        }
        (n >= PODS - 1).then_some(start.elapsed())
    })
    .await;
    let stats = proxy.stats();
    assert_eq!(stats["actions"]["CreateFleet"]["hung"], 1, "{stats}");
    // The held call hangs for 600 s; the others are up in ~10 s on an idle machine
    // (17 s seen with the whole suite running beside it).
    assert!(
        first_four < Duration::from_secs(45),
        "the other claims waited for the held call ({first_four:?})"
    );
    for i in 0..PODS {
        running_nodes.insert(running(&client, &format!("web-{i}"), Duration::from_secs(60)).await);
    }
    assert_eq!(running_nodes.len(), PODS, "one 3-CPU pod per m5.xlarge");

    // Exactly one instance per claim, none without a claim.
    let by_claim = instances_by_claim(direct.client()).await;
    let names: BTreeSet<String> = claims(&client).await.iter().map(|c| c.name_any()).collect();
    assert_eq!(names.len(), PODS, "one claim per pod");
    for (claim, ids) in &by_claim {
        assert!(
            names.contains(claim),
            "an instance for no claim: {claim} {ids:?}"
        );
        assert_eq!(ids.len(), 1, "claim {claim} has instances {ids:?}");
    }
    assert_eq!(by_claim.len(), PODS, "{by_claim:?}");
    let stats = proxy.stats();
    let fleet = &stats["actions"]["CreateFleet"];
    assert_eq!(fleet["reset_after"], 2, "{stats}");
    assert!(
        fleet["deduplicated"].as_u64().unwrap_or(0) >= 2,
        "the repeated launches were answered from their ClientToken: {stats}"
    );
    assert!(
        stats["actions"]["DescribeInstances"]["hidden_by_tag_lag"]
            .as_u64()
            .unwrap_or(0)
            >= 1,
        "the tag lookup before a retry found nothing (so only the token saved it): {stats}"
    );
}

/// The controller in this process as the install's ServiceAccount, with `settings` but
/// a short batching window and tick (a handful of pods, not a burst).
async fn start_controller(
    plane: &ControlPlane,
    cloud: Arc<Ec2Cloud>,
    catalog: Arc<Catalog>,
    settings: Settings,
) {
    let controller_client = plane.controller_client().await;
    let stores = start_reflectors(&controller_client).await;
    let settings = Settings {
        batch: BatchSettings {
            idle: Duration::from_millis(500),
            max: Duration::from_secs(3),
        },
        tick: Duration::from_millis(200),
        ..settings
    };
    let controller = Controller::new(controller_client, cloud, catalog, settings, stores);
    tokio::spawn(cooper::controller::run_alone(
        controller,
        std::future::pending::<()>(),
    ));
}

/// A 3-CPU pod (one per m5.xlarge) pinned to a zone.
async fn zonal_pod(client: &Client, name: &str, zone: &str) {
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"containers": [{"name": "c", "image": "x",
                                 "resources": {"requests": {"cpu": "3", "memory": "2Gi"}}}],
                 "nodeSelector": {"topology.kubernetes.io/zone": zone},
                 "terminationGracePeriodSeconds": 1}
    }))
    .expect("pod");
    Api::<Pod>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &pod)
        .await
        .expect("create pod");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_launch_holds_up_only_its_claim_while_others_launch_empty_nodes_go_and_interruptions_drain()
 {
    let Ec2World {
        plane,
        client,
        moto,
        proxy,
        direct,
    } = Ec2World::start().await;
    // The first CreateFleet is held for ten minutes (after EC2 acted).
    proxy.configure(json!({"seed": 5, "rules": [
        {"action": "CreateFleet", "hang": {"count": 1, "seconds": 600}}
    ]}));
    let (probe, url, queue) = common::interruption_queue(&moto, Duration::from_secs(1)).await;
    let mut settings = moto_settings(&moto);
    settings.endpoint = Some(format!("http://127.0.0.1:{}", proxy.port));
    // Deadlines longer than the test: the held call stays held.
    settings.attempt_timeout = Some(Duration::from_secs(300));
    settings.operation_timeout = Some(Duration::from_secs(300));
    let catalog = Arc::new(Catalog::embedded().expect("catalog"));
    let cloud = Arc::new(
        Ec2Cloud::connect(settings)
            .await
            .with_catalog(&catalog)
            .with_interruption_queue(queue),
    );
    ec2_objects_with(
        &client,
        json!({"consolidationPolicy": "WhenEmpty", "consolidateAfter": "2s"}),
    )
    .await;
    let _kubelet = Kubelet::start(client.clone(), catalog.clone(), KubeletOptions::default());
    let settings = Settings {
        empty_settle: Duration::from_secs(1),
        ..Settings::default()
    };
    start_controller(&plane, cloud, catalog, settings).await;

    // The held launch: a pod only a us-east-1a node can take.
    zonal_pod(&client, "held", "us-east-1a").await;
    wait_for("the launch held", Duration::from_secs(60), || async {
        (proxy.stats()["actions"]["CreateFleet"]["hung"] == 1).then_some(())
    })
    .await;
    let held_claim = claims(&client).await.remove(0).name_any();

    // Meanwhile other claims launch and their pods run (us-east-1b: the held pod cannot
    // use their nodes, so emptying one leaves it empty).
    zonal_pod(&client, "web-1", "us-east-1b").await;
    zonal_pod(&client, "web-2", "us-east-1b").await;
    let node_1 = running(&client, "web-1", Duration::from_secs(60)).await;
    let node_2 = running(&client, "web-2", Duration::from_secs(60)).await;
    assert_ne!(node_1, node_2, "one 3-CPU pod per m5.xlarge");

    // An emptied node is removed.
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    pods.delete("web-1", &Default::default())
        .await
        .expect("delete web-1");
    let nodes: Api<Node> = Api::all(client.clone());
    wait_for(
        "the emptied node removed",
        Duration::from_secs(60),
        || async { nodes.get_opt(&node_1).await.ok()?.is_none().then_some(()) },
    )
    .await;

    // A spot interruption notice for the other node: its drain starts at once.
    let instance_2 = claims(&client)
        .await
        .into_iter()
        .find(|c| c.status.as_ref().and_then(|s| s.node_name.as_deref()) == Some(&node_2))
        .and_then(|c| c.status?.instance_id)
        .expect("web-2's instance");
    let notice = Instant::now();
    probe
        .client()
        .send_message()
        .queue_url(&url)
        .message_body(
            json!({"version": "0", "detail-type": "EC2 Spot Instance Interruption Warning",
                   "source": "aws.ec2",
                   "detail": {"instance-id": instance_2, "instance-action": "terminate"}})
            .to_string(),
        )
        .send()
        .await
        .expect("send notice");
    let cordoned = wait_for(
        "the interrupted node cordoned",
        Duration::from_secs(30),
        || async {
            let node = nodes.get_opt(&node_2).await.ok()?;
            node.is_none_or(|n| n.spec.and_then(|s| s.unschedulable) == Some(true))
                .then(|| notice.elapsed())
        },
    )
    .await;
    // The long poll is answered as soon as the message arrives, then one tick.
    eprintln!("the interrupted node was cordoned {cordoned:?} after the notice");
    assert!(
        cordoned < Duration::from_secs(5),
        "the drain began {cordoned:?} after the notice"
    );
    wait_for(
        "the interrupted pod evicted",
        Duration::from_secs(60),
        || async { pods.get_opt("web-2").await.ok()?.is_none().then_some(()) },
    )
    .await;

    // All the while the held claim waited for its own call, and only it.
    let stats = proxy.stats();
    assert_eq!(stats["actions"]["CreateFleet"]["hung"], 1, "{stats}");
    let held = Api::<NodeClaim>::all(client.clone())
        .get(&held_claim)
        .await
        .expect("held claim");
    assert!(
        held.status
            .as_ref()
            .and_then(|s| s.instance_id.as_ref())
            .is_none(),
        "the held launch has not answered"
    );
    let pod = pods.get("held").await.expect("held pod");
    assert!(pod.spec.and_then(|s| s.node_name).is_none());
    // Nothing leaked: every instance but the held one's belongs to a live claim or was
    // terminated with its claim.
    let by_claim = instances_by_claim(direct.client()).await;
    let live: BTreeSet<String> = claims(&client).await.iter().map(|c| c.name_any()).collect();
    for claim in by_claim.keys() {
        assert!(
            live.contains(claim),
            "instance of deleted claim {claim} still runs: {by_claim:?}"
        );
    }
}

/// A `cooper controller --cloud local` process, killed (SIGKILL) on drop.
struct Replica(Child);

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `cooper controller` as a replica of the install (its ServiceAccount's kubeconfig,
/// leader election in `cooper`), with these extra arguments.
fn controller_process(plane: &ControlPlane, identity: &str, extra: &[&str]) -> Replica {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port");
    Replica(
        Command::new(env!("CARGO_BIN_EXE_cooper"))
            .args(["controller", "--identity", identity, "--no-device-plugins"])
            .args(["--batch-idle", "300ms", "--batch-max", "2s"])
            .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
            .args(extra)
            .env("KUBECONFIG", plane.controller_kubeconfig())
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("RUST_LOG", "cooper=info")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start cooper controller"),
    )
}

fn replica(plane: &ControlPlane, identity: &str) -> Replica {
    controller_process(
        plane,
        identity,
        &[
            "--cloud",
            "local",
            "--gc-interval",
            "1s",
            "--gc-grace",
            "5s",
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_with_the_local_cloud_loses_no_node_claim_or_pod() {
    init_tracing();
    let plane = ControlPlane::start().await;
    let client = plane.admin().await;
    let catalog = Arc::new(Catalog::embedded().expect("catalog"));
    let pool: NodePoolResource = serde_json::from_value(json!({
        "apiVersion": "cooper.dev/v1alpha1", "kind": "NodePool", "metadata": {"name": "default"},
        "spec": {"template": {"spec": {"requirements": [
            {"key": "cooper.dev/instance-category", "operator": "In", "values": ["c", "m"]}]}}}
    }))
    .expect("pool");
    Api::<NodePoolResource>::all(client.clone())
        .create(&PostParams::default(), &pool)
        .await
        .expect("pool");
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"replicas": 4, "selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}},
                              "spec": {"terminationGracePeriodSeconds": 5,
                                       "containers": [{"name": "c", "image": "x", "resources": {"requests": {"cpu": "1500m", "memory": "1Gi"}}}]}}}
    }))
    .expect("deployment");
    deployments
        .create(&PostParams::default(), &deployment)
        .await
        .expect("deployment");
    let _kubelet = Kubelet::start(client.clone(), catalog.clone(), KubeletOptions::default());

    // Replica a leads (it starts first); b stands by.
    let mut a = replica(&plane, "replica-a");
    let leases: Api<Lease> = Api::namespaced(client.clone(), "cooper");
    let holder = || async {
        leases
            .get_opt("cooper-controller")
            .await
            .ok()
            .flatten()
            .and_then(|l| l.spec?.holder_identity)
            .unwrap_or_default()
    };
    wait_for("replica-a to lead", Duration::from_secs(30), || async {
        (holder().await == "replica-a").then_some(())
    })
    .await;
    let _b = replica(&plane, "replica-b");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let running_pods = || async {
        let list = pods
            .list(&ListParams::default().labels("app=web"))
            .await
            .ok()?;
        let running: BTreeMap<String, String> = list
            .items
            .iter()
            .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
            .filter_map(|p| Some((p.uid()?, p.spec.as_ref()?.node_name.clone()?)))
            .collect();
        Some(running)
    };
    let before = wait_for("four web pods running", Duration::from_secs(60), || async {
        let running = running_pods().await?;
        (running.len() == 4).then_some(running)
    })
    .await;
    let claims_before: BTreeMap<String, String> = claims(&client)
        .await
        .iter()
        .filter_map(|c| Some((c.name_any(), c.status.as_ref()?.instance_id.clone()?)))
        .collect();
    let nodes_api: Api<Node> = Api::all(client.clone());
    let node_names =
        |list: Vec<Node>| -> BTreeSet<String> { list.iter().map(|n| n.name_any()).collect() };
    let nodes_before = node_names(
        nodes_api
            .list(&ListParams::default())
            .await
            .expect("nodes")
            .items,
    );

    // The leader dies without a word (SIGKILL): b takes over when the lease expires.
    a.0.kill().expect("kill -9");
    let _ = a.0.wait();
    wait_for("replica-b to lead", Duration::from_secs(40), || async {
        (holder().await == "replica-b").then_some(())
    })
    .await;
    // Well past the collector's grace (5 s) and interval (1 s): nothing may go.
    tokio::time::sleep(Duration::from_secs(15)).await;
    let claims_after: BTreeMap<String, String> = claims(&client)
        .await
        .iter()
        .filter(|c| c.metadata.deletion_timestamp.is_none())
        .filter_map(|c| Some((c.name_any(), c.status.as_ref()?.instance_id.clone()?)))
        .collect();
    assert_eq!(
        claims_after, claims_before,
        "claims lost after the failover"
    );
    let nodes_after = node_names(
        nodes_api
            .list(&ListParams::default())
            .await
            .expect("nodes")
            .items,
    );
    assert_eq!(nodes_after, nodes_before, "Nodes lost after the failover");
    assert_eq!(
        running_pods().await.expect("pods"),
        before,
        "pods lost or moved after the failover"
    );

    // The new leader launches for new pods, with instance ids never used before.
    deployments
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"replicas": 8}})),
        )
        .await
        .expect("scale");
    wait_for(
        "eight web pods running",
        Duration::from_secs(60),
        || async { (running_pods().await?.len() == 8).then_some(()) },
    )
    .await;
    let old: BTreeSet<&String> = claims_before.values().collect();
    let all = claims(&client).await;
    let new_ids: Vec<String> = all
        .iter()
        .filter(|c| !claims_before.contains_key(&c.name_any()))
        .filter_map(|c| c.status.as_ref()?.instance_id.clone())
        .collect();
    assert!(!new_ids.is_empty(), "the new leader launched nothing");
    assert!(
        new_ids.iter().all(|id| !old.contains(id)),
        "an instance id was reused: {new_ids:?} vs {old:?}"
    );
}

fn aws_replica(plane: &ControlPlane, identity: &str, endpoint: &str) -> Replica {
    controller_process(
        plane,
        identity,
        &[
            "--cloud",
            "aws",
            "--no-live-catalog",
            "--cluster-name",
            "test-cluster",
            "--cluster-endpoint",
            "https://test-cluster.example",
            "--cluster-ca-bundle",
            "Q0E=",
            "--aws-region",
            "us-east-1",
            "--aws-endpoint",
            endpoint,
            "--aws-max-attempts",
            "2",
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_killed_mid_launch_is_resumed_by_the_next_one_with_the_same_instance() {
    let Ec2World {
        plane,
        client,
        moto: _moto,
        proxy,
        direct,
    } = Ec2World::start().await;
    // EC2 carries out the first launch but its answer is held; tags lag, so the next
    // leader's lookup by tag finds nothing and only the ClientToken can tell.
    proxy.configure(json!({"seed": 3, "rules": [
        {"action": "CreateFleet", "hang": {"count": 1, "seconds": 600}},
        {"action": "DescribeInstances", "tag_lag_s": 600}
    ]}));
    ec2_objects(&client).await;
    create_pod(
        &client,
        "web-0",
        json!({"cpu": "3", "memory": "2Gi"}),
        false,
    )
    .await;
    let endpoint = format!("http://127.0.0.1:{}", proxy.port);
    let mut a = aws_replica(&plane, "replica-a", &endpoint);
    wait_for("the launch held", Duration::from_secs(60), || async {
        (proxy.stats()["actions"]["CreateFleet"]["hung"] == 1).then_some(())
    })
    .await;
    // The leader dies mid-launch (SIGKILL): the claim exists, its instance runs in EC2,
    // nothing records it.
    a.0.kill().expect("kill -9");
    let _ = a.0.wait();
    let claim = claims(&client).await.remove(0);
    assert!(
        claim
            .status
            .as_ref()
            .and_then(|s| s.instance_id.as_ref())
            .is_none(),
        "the launch was still in flight"
    );
    let _b = aws_replica(&plane, "replica-b", &endpoint);
    let launched = wait_for(
        "the claim launched by the next leader",
        Duration::from_secs(60),
        || async {
            claims(&client)
                .await
                .into_iter()
                .find(|c| c.status.as_ref().is_some_and(|s| s.instance_id.is_some()))
        },
    )
    .await;
    assert_eq!(launched.name_any(), claim.name_any());
    let by_claim = instances_by_claim(direct.client()).await;
    assert_eq!(
        by_claim.get(&claim.name_any()).map(Vec::len),
        Some(1),
        "one instance for the claim: {by_claim:?}"
    );
    assert_eq!(by_claim.len(), 1, "{by_claim:?}");
    assert_eq!(
        by_claim[&claim.name_any()][0],
        launched.status.and_then(|s| s.instance_id).expect("id"),
        "the next leader recorded the instance the first one launched"
    );
    let stats = proxy.stats();
    assert!(
        stats["actions"]["CreateFleet"]["deduplicated"]
            .as_u64()
            .unwrap_or(0)
            >= 1,
        "{stats}"
    );
}
