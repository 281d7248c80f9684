//! Helpers shared by the integration tests: the real servers they talk to (a real
//! Kubernetes control plane in [`k8s`] with the harness's kubelets in [`kubelet`], a moto
//! EC2 server, the fault proxy in front of it) and a network for NodeClasses to select.
#![allow(dead_code)]

pub mod harness;
pub mod k8s;
pub mod kubelet;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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

fn test_python() -> String {
    std::env::var("COOPER_TEST_PYTHON").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/target/test-venv/bin/python").to_string()
    })
}

/// `tests/faultproxy/proxy.py` in front of an EC2 endpoint: latency, throttling, errors,
/// resets before and after EC2 acted, hung responses, capacity errors, and EC2's
/// ClientToken idempotency (which moto lacks). Killed on drop.
pub struct FaultProxy {
    child: Child,
    pub port: u16,
}

impl FaultProxy {
    pub fn start(upstream_port: u16) -> FaultProxy {
        let python = test_python();
        let mut child = Command::new(&python)
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/faultproxy/proxy.py"
            ))
            .args(["--upstream", &format!("127.0.0.1:{upstream_port}")])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {python} (run scripts/test.sh): {e}"));
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("proxy output");
        let port = line
            .trim()
            .strip_prefix("ready ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("fault proxy did not start: {line:?}"));
        FaultProxy { child, port }
    }

    /// Replace the proxy's rules (see tests/faultproxy/proxy.py).
    pub fn configure(&self, config: serde_json::Value) {
        let body = config.to_string();
        let response = self.control("POST", "/__proxy/config", &body);
        assert!(
            response.starts_with("HTTP/1.1 200"),
            "proxy config: {response}"
        );
    }

    /// Counts per action and outcome, and calls in flight (`in_flight`, `peak_in_flight`).
    pub fn stats(&self) -> serde_json::Value {
        let response = self.control("GET", "/__proxy/stats", "");
        let body = response.split("\r\n\r\n").nth(1).unwrap_or_default();
        serde_json::from_str(body).unwrap_or_default()
    }

    fn control(&self, method: &str, path: &str, body: &str) -> String {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", self.port)).expect("proxy");
        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).expect("write");
        let mut response = String::new();
        let _ = stream.read_to_string(&mut response);
        response
    }
}

impl Drop for FaultProxy {
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

/// Live instances tagged for each claim, as EC2 (moto) reports them.
pub async fn instances_by_claim(
    ec2: &aws_sdk_ec2::Client,
) -> std::collections::BTreeMap<String, Vec<String>> {
    let mut out: std::collections::BTreeMap<String, Vec<String>> =
        std::collections::BTreeMap::new();
    let mut pages = ec2
        .describe_instances()
        .filters(
            aws_sdk_ec2::types::Filter::builder()
                .name("instance-state-name")
                .values("pending")
                .values("running")
                .build(),
        )
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        for i in page
            .expect("describe")
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
        {
            let claim = i
                .tags()
                .iter()
                .find(|t| t.key() == Some(cooper::aws::NODECLAIM_TAG))
                .and_then(|t| t.value())
                .unwrap_or_default()
                .to_string();
            out.entry(claim)
                .or_default()
                .push(i.instance_id().unwrap_or_default().to_string());
        }
    }
    out
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
        attempt_timeout: None,
        operation_timeout: None,
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
        associate_public_ip_address: None,
        per_node_cost_per_hour: None,
    }
}

/// Helpers for tests against the real control plane.
pub mod cluster {
    use std::time::Duration;

    use cooper::crd::NodeClaim;
    use k8s_openapi::api::core::v1::{Event, Pod};
    use kube::Client;
    use kube::api::{Api, ListParams, PostParams};
    use serde_json::json;

    /// Create a plain pod (the real scheduler marks it Unschedulable while nothing fits).
    pub async fn create_pod(
        client: &Client,
        name: &str,
        requests: serde_json::Value,
        tolerate_aiml: bool,
    ) -> Pod {
        let api: Api<Pod> = Api::namespaced(client.clone(), "default");
        let tolerations = if tolerate_aiml {
            json!([{"key": "aiml", "operator": "Equal", "value": "true", "effect": "NoSchedule"}])
        } else {
            json!([])
        };
        let limits = extended_limits(&requests);
        let pod: Pod = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default", "labels": {"app": "sentiment"}},
            "spec": {"containers": [{"name": "c", "image": "x", "resources": {"requests": requests, "limits": limits}}],
                     "tolerations": tolerations, "terminationGracePeriodSeconds": 5}
        }))
        .expect("pod");
        api.create(&PostParams::default(), &pod)
            .await
            .expect("create pod")
    }

    /// Limits for a pod's extended resources (GPUs, Neuron devices), equal to their
    /// requests: the API server refuses extended resources without them.
    pub fn extended_limits(requests: &serde_json::Value) -> serde_json::Value {
        requests
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(k, _)| k.contains('/'))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<serde_json::Map<_, _>>()
            .into()
    }

    /// One replica of the seeds' sentiment service: a Neuron device, tolerating aiml=true.
    pub async fn create_sentiment_pod(client: &Client, name: &str) -> Pod {
        create_pod(
            client,
            name,
            json!({"cpu": "500m", "memory": "1Gi", "aws.amazon.com/neuron": "1"}),
            true,
        )
        .await
    }

    /// A PodDisruptionBudget keeping one pod labelled `app: <app>` available in `default`,
    /// once the real disruption controller has counted the healthy pod (from then on no
    /// eviction of it is allowed).
    pub async fn guard_with_pdb(client: &Client, name: &str, app: &str) {
        let pdbs: Api<k8s_openapi::api::policy::v1::PodDisruptionBudget> =
            Api::namespaced(client.clone(), "default");
        pdbs.create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
                "metadata": {"name": name, "namespace": "default"},
                "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": app}}}
            }))
            .expect("pdb"),
        )
        .await
        .expect("create pdb");
        super::wait_for("the PDB's status", Duration::from_secs(20), || async {
            (pdbs.get(name).await.ok()?.status?.current_healthy == 1).then_some(())
        })
        .await;
    }

    /// Wait until kube-scheduler has marked the pod Unschedulable.
    pub async fn unschedulable(client: &Client, name: &str) {
        let api: Api<Pod> = Api::namespaced(client.clone(), "default");
        super::wait_for(
            &format!("{name} marked Unschedulable"),
            Duration::from_secs(30),
            || async {
                let pod = api.get(name).await.ok()?;
                pod.status?
                    .conditions?
                    .iter()
                    .any(|c| {
                        c.type_ == "PodScheduled" && c.reason.as_deref() == Some("Unschedulable")
                    })
                    .then_some(())
            },
        )
        .await;
    }

    /// Wait until the pod runs (bound by the scheduler, started by the harness's kubelet);
    /// returns its node.
    pub async fn running(client: &Client, name: &str, timeout: Duration) -> String {
        let api: Api<Pod> = Api::namespaced(client.clone(), "default");
        super::wait_for(&format!("{name} running"), timeout, || async {
            let pod = api.get(name).await.ok()?;
            let node = pod.spec?.node_name?;
            (pod.status?.phase.as_deref() == Some("Running")).then_some(node)
        })
        .await
    }

    pub async fn claims(client: &Client) -> Vec<NodeClaim> {
        Api::<NodeClaim>::all(client.clone())
            .list(&ListParams::default())
            .await
            .expect("list claims")
            .items
    }

    /// Wait for a NodeClaim whose instance is recorded.
    pub async fn launched_claim(client: &Client) -> NodeClaim {
        super::wait_for("a launched NodeClaim", Duration::from_secs(30), || async {
            claims(client)
                .await
                .into_iter()
                .find(|c| c.status.as_ref().is_some_and(|s| s.instance_id.is_some()))
        })
        .await
    }

    /// The status (`True`/`False`) of a claim's condition.
    pub fn condition(claim: &NodeClaim, type_: &str) -> Option<String> {
        claim
            .status
            .as_ref()?
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .map(|c| c.status.clone())
    }

    /// (reason, involved object name) of every Event in `default`.
    pub async fn events(client: &Client) -> Vec<(String, String, String)> {
        Api::<Event>::namespaced(client.clone(), "default")
            .list(&ListParams::default())
            .await
            .expect("events")
            .items
            .into_iter()
            .filter_map(|e| {
                Some((
                    e.reason?,
                    e.involved_object.name?,
                    e.message.unwrap_or_default(),
                ))
            })
            .collect()
    }
}

/// An SQS queue on moto for interruption notices: a client to send them with (and look at
/// the queue), the queue's URL, and cooper's reader of it (long polls of `wait`).
pub async fn interruption_queue(
    moto: &Moto,
    wait: Duration,
) -> (
    cooper::aws::interruption::InterruptionQueue,
    String,
    cooper::aws::interruption::InterruptionQueue,
) {
    use cooper::aws::interruption::InterruptionQueue;
    let probe =
        InterruptionQueue::connect(&moto_settings(moto), String::new(), Duration::ZERO).await;
    let url = probe
        .client()
        .create_queue()
        .queue_name("cooper-interruptions")
        .send()
        .await
        .expect("create queue")
        .queue_url()
        .expect("queue url")
        .to_string();
    let queue = InterruptionQueue::connect(&moto_settings(moto), url.clone(), wait).await;
    (probe, url, queue)
}
