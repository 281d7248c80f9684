//! The kubelets of the instances cooper launches, played by the test harness: there is no
//! container runtime here, so for every launched NodeClaim this registers the Node an
//! EKS node would register (provider ID, the instance type's labels, capacity and
//! allocatable from the catalog, the pool's labels and taints as nodeadm passes them, a
//! `Ready` condition), keeps its Lease in `kube-node-lease` fresh (or the real node
//! lifecycle controller marks it NotReady after 40 s), marks the pods the real scheduler
//! binds to it Running, and deletes (grace 0) pods that get a deletionTimestamp, since
//! nothing else will.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cooper::catalog::Catalog;
use cooper::crd::NodeClaim;
use cooper::nodepool::{NodePool, NodePoolResource};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use serde_json::json;

/// How the simulated nodes behave.
#[derive(Debug, Clone)]
pub struct KubeletOptions {
    /// Time from the instance's launch (the claim's provider ID) to the Node registering.
    pub boot: Duration,
    /// Advertise GPUs and Neuron devices in allocatable (a device plugin is running).
    pub devices: bool,
}

impl Default for KubeletOptions {
    fn default() -> Self {
        KubeletOptions {
            boot: Duration::from_millis(200),
            devices: true,
        }
    }
}

#[derive(Debug, Default)]
struct State {
    /// Instance ID → Node name, for every Node registered (never registered twice).
    registered: BTreeMap<String, String>,
    /// Instances whose kubelet has stopped (the instance died): no Lease renewals.
    dead: BTreeSet<String>,
    /// When each claim's provider ID was first seen.
    seen: BTreeMap<String, Instant>,
}

/// The harness's kubelets; stopped on drop.
pub struct Kubelet {
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn store<K>(api: Api<K>) -> Store<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store::<K>();
    let stream = reflector::reflector(writer, watcher(api, watcher::Config::default()))
        .default_backoff()
        .touched_objects();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while stream.next().await.is_some() {}
    });
    reader
}

/// The Node name the kubelet of this instance registers.
pub fn node_name(instance_id: &str) -> String {
    format!("node-{}", instance_id.to_ascii_lowercase())
}

impl Kubelet {
    /// Start playing the kubelet of every instance cooper launches.
    pub fn start(client: Client, catalog: Arc<Catalog>, options: KubeletOptions) -> Kubelet {
        let state = Arc::new(Mutex::new(State::default()));
        let task = tokio::spawn(run(client, catalog, options, state.clone()));
        Kubelet { state, task }
    }

    /// The instance died: its kubelet stops renewing the Lease and stops running pods.
    pub fn kill(&self, instance_id: &str) {
        self.state
            .lock()
            .expect("state")
            .dead
            .insert(instance_id.to_string());
    }

    /// Nodes registered so far (instance ID → Node name).
    pub fn registered(&self) -> BTreeMap<String, String> {
        self.state.lock().expect("state").registered.clone()
    }
}

async fn run(
    client: Client,
    catalog: Arc<Catalog>,
    options: KubeletOptions,
    state: Arc<Mutex<State>>,
) {
    let claims = store(Api::<NodeClaim>::all(client.clone()));
    let pools = store(Api::<NodePoolResource>::all(client.clone()));
    let pods = store(Api::<Pod>::all(client.clone()));
    let _ = claims.wait_until_ready().await;
    let _ = pools.wait_until_ready().await;
    let _ = pods.wait_until_ready().await;
    let nodes: Api<Node> = Api::all(client.clone());
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let mut last_renewal = Instant::now() - Duration::from_secs(60);
    let mut running: BTreeSet<String> = BTreeSet::new();
    loop {
        // Register the Nodes of launched instances.
        for claim in claims.state() {
            let Some(status) = &claim.status else {
                continue;
            };
            let (Some(provider_id), Some(instance_id), Some(instance_type)) = (
                status.provider_id.clone(),
                status.instance_id.clone(),
                status.instance_type.clone(),
            ) else {
                continue;
            };
            let due = {
                let mut s = state.lock().expect("state");
                if s.registered.contains_key(&instance_id) || s.dead.contains(&instance_id) {
                    continue;
                }
                let seen = *s
                    .seen
                    .entry(instance_id.clone())
                    .or_insert_with(Instant::now);
                seen.elapsed() >= options.boot
            };
            if !due {
                continue;
            }
            let Some(t) = catalog.instance_type(&instance_type) else {
                continue;
            };
            let name = node_name(&instance_id);
            let mut labels: BTreeMap<String, String> = t.labels.clone();
            labels.insert("kubernetes.io/hostname".into(), name.clone());
            labels.insert("kubernetes.io/os".into(), "linux".into());
            labels.insert(
                "node.kubernetes.io/instance-type".into(),
                instance_type.clone(),
            );
            if let Some(zone) = &status.zone {
                labels.insert("topology.kubernetes.io/zone".into(), zone.clone());
                // What the kubelet adds once the EBS CSI node plugin (an EKS add-on)
                // registers: the zone its volumes' node affinity names.
                labels.insert("topology.ebs.csi.aws.com/zone".into(), zone.clone());
                labels.insert(
                    "topology.kubernetes.io/region".into(),
                    zone.trim_end_matches(char::is_alphabetic).to_string(),
                );
            }
            // What nodeadm's user data passes to the kubelet: the pool's labels and
            // taints (startup taints included), so nothing schedules before cooper sees it.
            let pool = pools
                .state()
                .into_iter()
                .find(|p| p.name_any() == claim.spec.node_pool)
                .and_then(|p| NodePool::from_spec(&p.name_any(), &p.spec).ok());
            // cooper's registration taint, which its launch request adds to the pool's.
            let mut taints =
                vec![json!({"key": cooper::controller::REGISTRATION_TAINT, "effect": "NoExecute"})];
            if let Some(pool) = &pool {
                labels.extend(pool.labels.clone());
                for taint in pool.taints.iter().chain(&pool.startup_taints) {
                    let mut v = json!({"key": taint.key, "effect": format!("{:?}", taint.effect)});
                    if let Some(value) = &taint.value {
                        v["value"] = json!(value);
                    }
                    taints.push(v);
                }
            }
            labels.insert("karpenter.sh/nodepool".into(), claim.spec.node_pool.clone());
            let quantities = |r: &cooper::resources::Resources| -> BTreeMap<String, String> {
                r.to_quantities()
                    .into_iter()
                    .filter(|(k, _)| {
                        options.devices
                            || !(k == cooper::resources::NVIDIA_GPU
                                || k == cooper::resources::NEURON)
                    })
                    .collect()
            };
            let status = json!({
                "capacity": quantities(&t.capacity),
                "allocatable": quantities(&t.allocatable),
                "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                                "message": "kubelet is posting ready status",
                                "lastHeartbeatTime": cooper::crd::now_rfc3339(),
                                "lastTransitionTime": cooper::crd::now_rfc3339()}],
            });
            let node: Node = serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name, "labels": labels},
                "spec": {"providerID": provider_id, "taints": taints},
                "status": status,
            }))
            .expect("node");
            match nodes.create(&PostParams::default(), &node).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 409 => {}
                Err(e) => {
                    eprintln!("kubelet: cannot register {name}: {e}");
                    continue;
                }
            }
            let _ = nodes
                .patch_status(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(&json!({ "status": status })),
                )
                .await;
            renew(&leases, &name).await;
            state
                .lock()
                .expect("state")
                .registered
                .insert(instance_id, name);
        }
        let (live, dead): (BTreeSet<String>, BTreeSet<String>) = {
            let s = state.lock().expect("state");
            let mut live = BTreeSet::new();
            let mut dead = BTreeSet::new();
            for (id, node) in &s.registered {
                if s.dead.contains(id) {
                    dead.insert(node.clone());
                } else {
                    live.insert(node.clone());
                }
            }
            (live, dead)
        };
        if last_renewal.elapsed() >= Duration::from_secs(10) {
            last_renewal = Instant::now();
            for node in &live {
                renew(&leases, node).await;
            }
        }
        // Run the pods bound to live nodes; finish deleting the ones being deleted.
        for pod in pods.state() {
            let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) else {
                continue;
            };
            // Every live node runs its pods (also Nodes a test created itself); a dead
            // instance's do not change any more.
            if dead.contains(&node) {
                continue;
            }
            let ns = pod.namespace().unwrap_or_default();
            let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
            let key = format!("{ns}/{}/{}", pod.name_any(), pod.uid().unwrap_or_default());
            if pod.metadata.deletion_timestamp.is_some() {
                let _ = api
                    .delete(&pod.name_any(), &DeleteParams::default().grace_period(0))
                    .await;
                continue;
            }
            let phase = pod.status.as_ref().and_then(|s| s.phase.clone());
            if phase.as_deref() == Some("Running") || running.contains(&key) {
                continue;
            }
            if matches!(phase.as_deref(), Some("Succeeded" | "Failed")) {
                continue;
            }
            let now = cooper::crd::now_rfc3339();
            let conditions: Vec<serde_json::Value> =
                ["PodScheduled", "Initialized", "ContainersReady", "Ready"]
                    .iter()
                    .map(|t| json!({"type": t, "status": "True", "lastTransitionTime": now}))
                    .collect();
            let patch =
                json!({"status": {"phase": "Running", "startTime": now, "conditions": conditions}});
            if api
                .patch_status(
                    &pod.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await
                .is_ok()
            {
                running.insert(key);
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn renew(leases: &Api<Lease>, node: &str) {
    // A MicroTime: RFC 3339 with exactly six fractional digits.
    let now = k8s_openapi::jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%S%.6fZ");
    let lease = json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": node, "namespace": "kube-node-lease"},
        "spec": {"holderIdentity": node, "leaseDurationSeconds": 40,
                 "renewTime": now.to_string()},
    });
    let patch = PatchParams::apply("test-kubelet").force();
    if let Err(e) = leases.patch(node, &patch, &Patch::Apply(&lease)).await {
        eprintln!("kubelet: cannot renew the lease of {node}: {e}");
    }
}
