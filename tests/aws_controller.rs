//! The whole production path with no fakes in between: the `cooper controller --cloud
//! aws` binary, talking to a real Kubernetes 1.26 API server through kube-rs (as its
//! ServiceAccount with a real token, under deploy/base/rbac.yaml) and to a moto EC2 server through
//! aws-sdk-ec2. The install's default NodeClass and NodePool are created from the defaults
//! file, the NodeClass resolves against EC2, a pending pod gets a NodeClaim, the claim's instance runs in EC2 with cooper's tags, and deleting the
//! claim terminates the instance.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cooper::aws::{CLUSTER_TAG, Ec2Cloud, NODECLAIM_TAG};
use cooper::crd::{NodeClaim, NodeClass};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams};
use serde_json::json;

mod common;
use common::k8s::ControlPlane;
use common::{DISCOVERY, Moto, moto_settings, network, wait_for};

/// The controller process, killed on drop.
struct ControllerProcess(Child);

impl Drop for ControllerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The install's defaults, as the ConfigMap in deploy/ provides them: a NodeClass and a
/// NodePool using it, which the controller creates at start.
fn defaults_file() -> std::path::PathBuf {
    let defaults = json!([
        {"apiVersion": "cooper.dev/v1alpha1", "kind": "NodeClass", "metadata": {"name": "default"},
         "spec": {"amiFamily": "Custom",
                  "amiSelectorTerms": [{"tags": {"cooper.dev/ami": "gpu-nodes"}}],
                  "subnetSelectorTerms": [{"tags": {DISCOVERY: "test-cluster"}}],
                  "securityGroupSelectorTerms": [{"tags": {DISCOVERY: "*"}}],
                  "instanceProfile": "cooper-node"}},
        {"apiVersion": "cooper.dev/v1alpha1", "kind": "NodePool", "metadata": {"name": "general"},
         "spec": {"template": {"spec": {
                    "nodeClassRef": {"name": "default"},
                    "requirements": [
                        {"key": "node.kubernetes.io/instance-type", "operator": "In", "values": ["m5.large", "m5.xlarge", "c5.large"]},
                        {"key": "karpenter.sh/capacity-type", "operator": "In", "values": ["on-demand"]}]}}}}
    ]);
    let text: String = defaults
        .as_array()
        .expect("list")
        .iter()
        .map(|d| format!("---\n{d}\n"))
        .collect();
    let path = std::env::temp_dir().join(format!("cooper-defaults-{}.yaml", std::process::id()));
    std::fs::write(&path, text).expect("defaults file");
    path
}

/// The instance's state name and tags, as EC2 reports them.
async fn describe(ec2: &aws_sdk_ec2::Client, id: &str) -> (String, Vec<(String, String)>) {
    let out = ec2
        .describe_instances()
        .instance_ids(id)
        .send()
        .await
        .expect("describe instances");
    let instance = out
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .next()
        .expect("the instance");
    let state = instance
        .state()
        .and_then(|s| s.name())
        .map(|n| n.as_str().to_string())
        .unwrap_or_default();
    let tags = instance
        .tags()
        .iter()
        .map(|t| {
            (
                t.key().unwrap_or_default().to_string(),
                t.value().unwrap_or_default().to_string(),
            )
        })
        .collect();
    (state, tags)
}

/// The decoded user data of the (only) launch template cooper created.
async fn launch_template_user_data(ec2: &aws_sdk_ec2::Client) -> String {
    let templates = ec2
        .describe_launch_templates()
        .send()
        .await
        .expect("describe launch templates");
    let ids: Vec<&str> = templates
        .launch_templates()
        .iter()
        .filter_map(|t| t.launch_template_id())
        .collect();
    assert_eq!(ids.len(), 1, "one launch template: {ids:?}");
    let versions = ec2
        .describe_launch_template_versions()
        .launch_template_id(ids[0])
        .send()
        .await
        .expect("describe launch template versions");
    let encoded = versions
        .launch_template_versions()
        .iter()
        .filter_map(|v| v.launch_template_data()?.user_data())
        .next()
        .expect("user data in the launch template");
    let bytes = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, encoded)
        .expect("base64 user data");
    String::from_utf8(bytes).expect("UTF-8 user data")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_binary_launches_and_terminates_through_ec2() {
    let plane = ControlPlane::start().await;
    let moto = Moto::start();
    let client = plane.admin().await;
    let endpoint = format!("http://127.0.0.1:{}", moto.port);
    let ec2 = Ec2Cloud::connect(moto_settings(&moto)).await;
    network(ec2.client()).await;
    common::cluster::create_pod(
        &client,
        "web-0",
        json!({"cpu": "1", "memory": "2Gi"}),
        false,
    )
    .await;
    let defaults = defaults_file();

    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port");
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let _controller = ControllerProcess(
        Command::new(env!("CARGO_BIN_EXE_cooper"))
            .args([
                "controller",
                "--cloud",
                "aws",
                "--no-leader-election",
                "--no-device-plugins",
                "--cluster-name",
                "test-cluster",
                "--cluster-endpoint",
                "https://test-cluster.example",
                "--cluster-ca-bundle",
                "Q0E=",
                "--aws-region",
                "us-east-1",
                "--aws-endpoint",
                &endpoint,
                "--metrics-addr",
                &metrics_addr,
                "--batch-idle",
                "300ms",
                "--batch-max",
                "2s",
                "--default-objects",
            ])
            .arg(&defaults)
            .env("KUBECONFIG", plane.controller_kubeconfig())
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("RUST_LOG", "cooper=info")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start cooper controller"),
    );

    // The NodeClass resolves against EC2: two tagged subnets (not the untagged one).
    let classes: Api<NodeClass> = Api::all(client.clone());
    let status = wait_for(
        "the NodeClass resolved",
        Duration::from_secs(60),
        || async {
            let class = classes.get("default").await.ok()?;
            let status = class.status?;
            status
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
                .then_some(status)
        },
    )
    .await;
    let mut zones: Vec<&str> = status.subnets.iter().map(|s| s.zone.as_str()).collect();
    zones.sort();
    assert_eq!(zones, ["us-east-1a", "us-east-1b"]);
    assert_eq!(status.security_groups.len(), 1);

    // The pending pod gets one NodeClaim whose instance runs in EC2 with cooper's tags.
    let claims: Api<NodeClaim> = Api::all(client.clone());
    let claim = wait_for("a launched NodeClaim", Duration::from_secs(60), || async {
        claims
            .list(&ListParams::default())
            .await
            .ok()?
            .items
            .into_iter()
            .find(|c| c.status.as_ref().is_some_and(|s| s.instance_id.is_some()))
    })
    .await;
    // The pool allows every zone, the NodeClass's subnets are in two: the planned
    // offering and every fallback are in those two (a zone without a subnet cannot be
    // launched into).
    let zones: Vec<&str> = claim
        .spec
        .offerings
        .iter()
        .map(|o| o.zone.as_str())
        .collect();
    assert!(
        zones
            .iter()
            .all(|z| ["us-east-1a", "us-east-1b"].contains(z)),
        "offerings outside the subnets' zones: {zones:?}"
    );
    let status = claim.status.clone().expect("claim status");
    let id = status.instance_id.clone().expect("instance id");
    assert!(
        status
            .provider_id
            .as_deref()
            .is_some_and(|p| p.starts_with("aws:///us-east-1") && p.ends_with(&id)),
        "provider ID {:?}",
        status.provider_id
    );
    let (state, tags) = describe(ec2.client(), &id).await;
    assert!(state == "running" || state == "pending", "state {state}");
    assert!(tags.contains(&(CLUSTER_TAG.to_string(), "test-cluster".to_string())));
    assert!(tags.contains(&(NODECLAIM_TAG.to_string(), claim.name_any())));
    // The node boots with cooper's registration taint (nodeadm's registerWithTaints in
    // the launch template's user data): no pod lands on it before cooper has nominated
    // the claim's pods there (the test kubelet does not add it by itself).
    let user_data = launch_template_user_data(ec2.client()).await;
    assert!(
        user_data.contains(&format!(
            "- key: \"{}\"\n        effect: NoExecute",
            cooper::controller::REGISTRATION_TAINT
        )),
        "the registration taint is not in the user data:\n{user_data}"
    );
    assert_eq!(
        claims
            .list(&ListParams::default())
            .await
            .expect("list")
            .items
            .len(),
        1,
        "one pod, one claim"
    );

    // Deleting the claim terminates its instance (the finalizer), then the claim goes.
    claims
        .delete(&claim.name_any(), &DeleteParams::default())
        .await
        .expect("delete claim");
    wait_for("the claim removed", Duration::from_secs(60), || async {
        claims
            .get_opt(&claim.name_any())
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    let (state, _) = describe(ec2.client(), &id).await;
    assert!(
        state == "shutting-down" || state == "terminated",
        "instance left {state}"
    );

    // The live catalog (DescribeInstanceTypes, offerings, spot prices from moto)
    // replaces the embedded one, and no refresh failed.
    let embedded = cooper::catalog::Catalog::embedded()
        .expect("catalog")
        .offerings
        .len();
    let metrics = wait_for("the live catalog", Duration::from_secs(60), || async {
        let text = http_get(metrics_port, "/metrics").await?;
        let offerings: usize = metric(&text, "cooper_catalog_offerings")?.parse().ok()?;
        (offerings != embedded).then_some(text)
    })
    .await;
    assert_eq!(
        metric(&metrics, "cooper_catalog_refresh_failures_total"),
        Some("0")
    );
}

fn metric<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
}

async fn http_get(port: u16, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut out = String::new();
    stream.read_to_string(&mut out).await.ok()?;
    Some(out)
}
