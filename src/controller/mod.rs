//! The in-cluster controller. Like Karpenter's, it is a set of small reconcilers over one
//! cluster-state model (the reflector caches plus [`context::Context`]), each in its own
//! task, so a slow cloud call delays only its own object:
//!
//! - **configuration** ([`config`]): creates the install's default objects, resolves
//!   NodeClasses against the cloud, validates NodePools (an invalid one gets
//!   `Ready=False` naming the field; the others keep serving), applies device plugins;
//! - **provisioning** ([`provisioner`]): batches the pods the scheduler cannot place, asks
//!   [`planner::plan`] for the cheapest nodes (existing nodes' free room, in-flight claims
//!   and the pods already nominated to them counted) and creates one NodeClaim per node;
//! - **NodeClaim lifecycle** ([`lifecycle`]): one worker per claim, many in flight —
//!   launch (idempotent: a ClientToken per claim and attempt, then a tag lookup),
//!   registration, initialisation, registration timeout, interruption drains, and
//!   termination behind the claim's finalizer;
//! - **disruption** ([`disruption`]): removes nodes empty past their pool's TTL within the
//!   budgets, with a settle period between cordoning and deleting;
//! - **garbage collection** ([`gc`]): orphaned and duplicate instances, claims whose
//!   instance is definitely gone (looked up one by one before acting; never a busy node);
//! - **interruption** ([`interruption`]): the cloud's notices become drains.
//!
//! Errors are logged and retried on the reconciler's next iteration; a bad object is
//! reported on its status or with an Event and skipped, never fatal.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

mod config;
mod consolidation;
pub mod context;
pub mod device_plugins;
mod disruption;
mod gc;
mod interruption;
pub mod leader;
mod lifecycle;
pub mod live_report;
pub mod metrics;
mod provisioner;
mod termination;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use serde_json::json;
use tracing::{Instrument, info, info_span, warn};

use crate::catalog::Catalog;
use crate::cloud::{CloudError, CloudProvider};
use crate::crd::{Condition, NodeClaim, NodeClaimStatus, NodeClass, set_condition};
use crate::labels::Taint;
use crate::manifest::Document;
use crate::nodepool::{NodePool, NodePoolResource};
use crate::planner::{self, Strategy};
use crate::provisioning::BatchSettings;
use crate::resources::{self, Resources};
use crate::workload::{self, PendingPod};

pub use consolidation::Preview as ConsolidationPreview;
pub use context::Context;

/// The finalizer that keeps a NodeClaim until its instance is gone.
pub const TERMINATION_FINALIZER: &str = "cooper.dev/termination";
/// Label on Nodes and NodeClaims: the claim that launched the node.
pub const NODECLAIM_LABEL: &str = "cooper.dev/nodeclaim";
/// Annotation on a NodeClaim launched to take the pods of an expired or drifted one: the
/// claim it replaces (the new node is not "empty" while that one drains).
pub const REPLACES_ANNOTATION: &str = "cooper.dev/replaces";
/// Annotation on an expired or drifted NodeClaim: the claims launched to replace it
/// (comma-separated); it is drained once they are all initialised.
pub const REPLACEMENTS_ANNOTATION: &str = "cooper.dev/replacements";
/// cooper's field manager for server-side apply and patches.
pub const FIELD_MANAGER: &str = "cooper";
/// The taint every node cooper launches registers with (`NoExecute`, passed to the
/// kubelet by the user data, as Karpenter's `karpenter.sh/unregistered`): nothing runs on
/// the node until cooper has labelled it and nominated the pods it was launched for, then
/// cooper removes it. The scheduler tries a pod's nominated node first, so the pods land
/// where the plan put them instead of wherever the default scoring spreads them.
pub const REGISTRATION_TAINT: &str = "cooper.dev/unregistered";

/// Does the Node still carry [`REGISTRATION_TAINT`] (cooper has not registered it)?
pub(crate) fn awaiting_registration(node: &k8s_openapi::api::core::v1::Node) -> bool {
    node.spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.key == REGISTRATION_TAINT))
}

/// [`REGISTRATION_TAINT`] as a taint.
pub fn registration_taint() -> Taint {
    Taint {
        key: REGISTRATION_TAINT.into(),
        value: None,
        effect: crate::labels::TaintEffect::NoExecute,
    }
}

/// Controller settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub batch: BatchSettings,
    /// How often each reconciler looks at the caches.
    pub tick: Duration,
    /// A claim whose node has not registered by then is terminated and its pods re-planned.
    pub registration_timeout: Duration,
    /// Pods of these schedulers are provisioned.
    pub scheduler_names: Vec<String>,
    /// How long a new pod may wait for kube-scheduler's verdict before cooper plans for
    /// it anyway. The scheduler writes its verdicts through a client limited to 50
    /// requests a second, so in a burst of 1,000 pods the last verdict comes 20 s after
    /// the last pod; cooper's planner already places pods that fit existing room there,
    /// so planning early launches nothing the scheduler would not have needed.
    /// `None`: wait for the verdict (as Karpenter does).
    pub verdict_wait: Option<Duration>,
    pub strategy: Strategy,
    pub time_limit: Duration,
    /// How long an offering that failed for capacity is avoided.
    pub unavailable_for: Duration,
    pub device_plugins: device_plugins::DevicePluginSettings,
    /// Fallback offerings per NodeClaim besides the chosen one (EC2 takes 20 overrides).
    pub max_fallbacks: usize,
    /// How often NodeClasses are resolved against the cloud again.
    pub resolve_node_classes_every: Duration,
    /// How often the garbage collector compares instances with NodeClaims.
    pub gc_interval: Duration,
    /// How long an instance must be without a claim (or a launched claim without an
    /// instance) before the garbage collector acts; covers watch and API lag.
    pub gc_grace: Duration,
    /// After an interruption notice, how long to wait for evicted pods to leave before
    /// terminating anyway (a spot instance gets two minutes).
    pub interruption_drain: Duration,
    /// How long a pod nominated to a node (planned onto it) is left to the scheduler once
    /// the node is ready, before it is planned again: kube-scheduler retries
    /// unschedulable pods with a back-off of up to 10 s, and moves them on node events.
    pub nomination_grace: Duration,
    /// Between cordoning an empty node and deleting it, the pods are listed again after
    /// this long: a pod the scheduler was binding at the first look shows up by then.
    pub empty_settle: Duration,
    /// The longest one cloud call may take (a backstop above the SDK's own timeouts); a
    /// launch that timed out is resolved by its ClientToken and the claim's tag, never by
    /// a blind second launch.
    pub cloud_timeout: Duration,
    /// Claims worked on at once (launch, registration, drain, termination).
    pub max_claim_workers: usize,
    /// A reconciler that has not finished an iteration for this long fails `/healthz`.
    pub stall_after: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            batch: BatchSettings::default(),
            tick: Duration::from_millis(500),
            registration_timeout: Duration::from_secs(15 * 60),
            scheduler_names: vec!["default-scheduler".into()],
            verdict_wait: Some(Duration::from_secs(3)),
            strategy: Strategy::Optimal,
            time_limit: Duration::from_secs(2),
            unavailable_for: Duration::from_secs(180),
            device_plugins: device_plugins::DevicePluginSettings::default(),
            max_fallbacks: 9,
            resolve_node_classes_every: Duration::from_secs(300),
            gc_interval: Duration::from_secs(60),
            gc_grace: Duration::from_secs(300),
            interruption_drain: Duration::from_secs(110),
            nomination_grace: Duration::from_secs(30),
            empty_settle: Duration::from_secs(5),
            cloud_timeout: Duration::from_secs(120),
            max_claim_workers: 64,
            stall_after: Duration::from_secs(300),
        }
    }
}

/// Why an iteration failed (it is retried on the next one).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("cloud: {0}")]
    Cloud(#[from] CloudError),
    #[error("serialising: {0}")]
    Json(#[from] serde_json::Error),
}

/// Timeouts on the controller's API requests: connecting, and each read or write of a
/// request that is not a watch (watches use [`watch_client`], whose reads wait for
/// events).
pub const API_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// See [`API_CONNECT_TIMEOUT`].
pub const API_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The client the controller makes requests with, from the kubeconfig or the in-cluster
/// environment: connect and read timeouts ([`API_CONNECT_TIMEOUT`],
/// [`API_READ_TIMEOUT`]) so a stuck API server delays one request, not the loop; kube's
/// own retry layer off: it retries 429 up to 15 times with backoff growing to minutes,
/// and a 429 is also how the Eviction API says a PodDisruptionBudget blocks.
pub async fn client(target: &ApiTarget) -> Result<Client, kube::Error> {
    let mut config = target.config().await?;
    config.default_retry = false;
    config.connect_timeout = Some(API_CONNECT_TIMEOUT);
    config.read_timeout = Some(API_READ_TIMEOUT);
    config.write_timeout = Some(API_READ_TIMEOUT);
    Client::try_from(config)
}

/// The client the reflectors watch with: kube's default timeouts (a watch read waits up to
/// 295 s for the next event or bookmark), connecting within [`API_CONNECT_TIMEOUT`].
pub async fn watch_client(target: &ApiTarget) -> Result<Client, kube::Error> {
    let mut config = target.config().await?;
    config.connect_timeout = Some(API_CONNECT_TIMEOUT);
    Client::try_from(config)
}

/// Which API server to talk to, as kubectl's `--kubeconfig` and `--context` say it;
/// neither means kube's own inference (`KUBECONFIG`, `~/.kube/config`, then the
/// in-cluster service account).
#[derive(Debug, Clone, Default)]
pub struct ApiTarget {
    pub kubeconfig: Option<std::path::PathBuf>,
    pub context: Option<String>,
}

impl ApiTarget {
    async fn config(&self) -> Result<kube::Config, kube::Error> {
        if self.kubeconfig.is_none() && self.context.is_none() {
            return kube::Config::infer()
                .await
                .map_err(kube::Error::InferConfig);
        }
        let options = kube::config::KubeConfigOptions {
            context: self.context.clone(),
            ..Default::default()
        };
        let config = match &self.kubeconfig {
            Some(path) => {
                let file = kube::config::Kubeconfig::read_from(path)?;
                kube::Config::from_custom_kubeconfig(file, &options).await?
            }
            None => kube::Config::from_kubeconfig(&options).await?,
        };
        Ok(config)
    }
}

/// The stores the controller reads.
#[derive(Clone)]
pub struct Stores {
    pub pods: Store<Pod>,
    pub nodes: Store<Node>,
    pub nodepools: Store<NodePoolResource>,
    pub nodeclaims: Store<NodeClaim>,
    pub nodeclasses: Store<NodeClass>,
    pub daemonsets: Store<DaemonSet>,
    /// Where pods' volumes let them run.
    pub volumes: Store<PersistentVolume>,
    pub volume_claims: Store<PersistentVolumeClaim>,
    pub storage_classes: Store<StorageClass>,
}

impl Stores {
    /// The cached Nodes by name.
    pub fn nodes_by_name(&self) -> BTreeMap<String, Arc<Node>> {
        self.nodes
            .state()
            .into_iter()
            .map(|n| (n.name_any(), n))
            .collect()
    }
}

/// Start reflectors for everything the controller reads and wait until each has listed.
pub async fn start_reflectors(client: &Client) -> Stores {
    fn spawn<K>(api: Api<K>) -> Store<K>
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
        let stream = reflector::reflector(
            writer,
            watcher(api, watcher::Config::default().any_semantic()),
        )
        .default_backoff()
        .touched_objects();
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(item) = stream.next().await {
                if let Err(e) = item {
                    warn!(error = %e, kind = %K::kind(&()), "watch error; retrying");
                }
            }
        });
        reader
    }
    let stores = Stores {
        pods: spawn(Api::<Pod>::all(client.clone())),
        nodes: spawn(Api::<Node>::all(client.clone())),
        nodepools: spawn(Api::<NodePoolResource>::all(client.clone())),
        nodeclaims: spawn(Api::<NodeClaim>::all(client.clone())),
        nodeclasses: spawn(Api::<NodeClass>::all(client.clone())),
        daemonsets: spawn(Api::<DaemonSet>::all(client.clone())),
        volumes: spawn(Api::<PersistentVolume>::all(client.clone())),
        volume_claims: spawn(Api::<PersistentVolumeClaim>::all(client.clone())),
        storage_classes: spawn(Api::<StorageClass>::all(client.clone())),
    };
    for ready in [
        stores.pods.wait_until_ready().await,
        stores.nodes.wait_until_ready().await,
        stores.nodepools.wait_until_ready().await,
        stores.nodeclaims.wait_until_ready().await,
        stores.nodeclasses.wait_until_ready().await,
        stores.daemonsets.wait_until_ready().await,
        stores.volumes.wait_until_ready().await,
        stores.volume_claims.wait_until_ready().await,
        stores.storage_classes.wait_until_ready().await,
    ] {
        if let Err(e) = ready {
            warn!(error = %e, "a reflector stopped before it was ready");
        }
    }
    stores
}

/// Wall-clock time as a duration since the epoch (the time base of the shared core).
pub(crate) fn now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

pub(crate) fn parse_time(s: &str) -> Option<Duration> {
    let t: k8s_openapi::jiff::Timestamp = s.parse().ok()?;
    Duration::try_from(t.duration_since(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)).ok()
}

/// A NodePool or NodeClass from the defaults file, checked when the file was read.
#[derive(Debug, Clone)]
pub enum DefaultObject {
    NodePool(Box<NodePoolResource>),
    NodeClass(Box<NodeClass>),
}

/// Why the defaults file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DefaultsError {
    #[error(transparent)]
    Manifest(#[from] crate::manifest::ManifestError),
    #[error("{file}:{line}: {object}: {reason}")]
    Invalid {
        file: String,
        line: u64,
        object: String,
        reason: String,
    },
}

/// Read the defaults file: NodePools and NodeClasses (cooper.dev/v1alpha1), each checked
/// against its schema and, for NodePools, cooper's own validation, so a bad default is a
/// startup error naming the file, line, object and field rather than a surprise later.
pub fn read_defaults(path: &std::path::Path) -> Result<Vec<DefaultObject>, DefaultsError> {
    let mut out = Vec::new();
    for doc in crate::manifest::read_documents(path)? {
        let invalid = |reason: String| DefaultsError::Invalid {
            file: doc.file.display().to_string(),
            line: doc.line,
            object: doc.describe(),
            reason,
        };
        let kind = doc.value.get("kind").and_then(|k| k.as_str()).unwrap_or("");
        match kind {
            "NodePool" => {
                let pool: NodePoolResource = serde_json::from_value(doc.value.clone())
                    .map_err(|e| invalid(e.to_string()))?;
                NodePool::from_spec(&pool.name_any(), &pool.spec)
                    .map_err(|(field, reason)| invalid(format!("{field}: {reason}")))?;
                out.push(DefaultObject::NodePool(Box::new(pool)));
            }
            "NodeClass" => {
                let class: NodeClass = serde_json::from_value(doc.value.clone())
                    .map_err(|e| invalid(e.to_string()))?;
                out.push(DefaultObject::NodeClass(Box::new(class)));
            }
            other => {
                return Err(invalid(format!(
                    "kind {other:?}: only NodePool and NodeClass can be defaults"
                )));
            }
        }
    }
    Ok(out)
}

/// Fallback offerings cost at most this many times the chosen one.
pub const FALLBACK_PRICE_RATIO: f64 = 1.5;

/// How often an unchanged cluster with pending pods is re-planned anyway.
pub const REPLAN_UNCHANGED: Duration = Duration::from_secs(30);

/// The node a pod waiting for one is nominated to (by cooper at registration, or by the
/// scheduler when it preempts there): the pod is on its way to that node, so it is no
/// pod to provision for, and the node is not as empty as its bound pods say.
pub fn nominated_node(pod: &Pod) -> Option<&str> {
    pod.status
        .as_ref()
        .and_then(|s| s.nominated_node_name.as_deref())
        .filter(|n| waiting_for_node(pod) && !n.is_empty())
}

/// Is the pod still to be bound (not bound, not being deleted)?
pub(crate) fn waiting_for_node(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod.spec.as_ref().is_some_and(|s| s.node_name.is_none())
}

/// Is the claim going away: being deleted, or being drained (interrupted, disrupted)?
pub(crate) fn being_removed(claim: &NodeClaim) -> bool {
    claim.metadata.deletion_timestamp.is_some()
        || claim_condition(claim, "Terminating").is_some_and(|c| c.status == "True")
}

/// Is this pod one cooper should provision for, nominations aside? A pod of these
/// schedulers, waiting for a node, that kube-scheduler has found no room for
/// (`PodScheduled=False`, `Unschedulable`), or, with `verdict_wait`, one it has given no
/// verdict on for that long since its creation (`now` is the time since the Unix epoch).
/// A nominated pod is left to the scheduler (Karpenter's IsProvisionable leaves these
/// alone too) unless cooper itself nominated it or its node takes no pods: the
/// provisioner decides that, with its own nominations at hand.
pub(crate) fn unplaced(
    pod: &Pod,
    scheduler_names: &[String],
    verdict_wait: Option<Duration>,
    now: Duration,
) -> bool {
    let Some(spec) = &pod.spec else { return false };
    if !waiting_for_node(pod) {
        return false;
    }
    // Held back from scheduling on purpose until its gates are removed.
    if spec
        .scheduling_gates
        .as_ref()
        .is_some_and(|g| !g.is_empty())
    {
        return false;
    }
    if pod.owner_references().iter().any(|o| o.kind == "DaemonSet") {
        return false;
    }
    let scheduler = spec
        .scheduler_name
        .as_deref()
        .unwrap_or("default-scheduler");
    if !scheduler_names.iter().any(|s| s == scheduler) {
        return false;
    }
    let scheduled = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .find(|c| c.type_ == "PodScheduled");
    match scheduled {
        Some(c) => c.status == "False" && c.reason.as_deref() == Some("Unschedulable"),
        None => verdict_wait.is_some_and(|wait| {
            pod.metadata.creation_timestamp.as_ref().is_some_and(|t| {
                let created = Duration::from_secs(t.0.as_second().max(0) as u64);
                now.saturating_sub(created) >= wait
            })
        }),
    }
}

fn as_document<K: serde::Serialize>(obj: &K) -> Result<Document, serde_json::Error> {
    Ok(Document {
        file: "(cluster)".into(),
        line: 0,
        value: serde_json::to_value(obj)?,
    })
}

/// The planner's view of a pod, as if it were pending (any binding dropped): the same
/// parsing `cooper plan -f` applies to a Pod manifest, with the cluster's volumes.
fn pod_demand(
    pod: &Pod,
    volumes: &crate::scheduling::Volumes,
) -> Result<Option<PendingPod>, String> {
    let mut doc = as_document(pod).map_err(|e| e.to_string())?;
    if let Some(o) = doc.value.as_object_mut() {
        o.insert("kind".into(), "Pod".into());
        o.insert("apiVersion".into(), "v1".into());
        if let Some(spec) = o.get_mut("spec").and_then(|s| s.as_object_mut()) {
            spec.remove("nodeName");
        }
    }
    let parsed = workload::from_documents_with(std::slice::from_ref(&doc), volumes)
        .map_err(|e| e.to_string())?;
    Ok(parsed.pods.into_iter().next())
}

/// A bound pod as the scheduling constraints see it (its anti-affinity and host ports
/// bind the pods planned beside it).
pub(crate) fn placed_pod(pod: &Pod) -> Option<crate::scheduling::PlacedPod> {
    let node = holding_node(pod)?;
    let spec = pod.spec.as_ref()?;
    let namespace = pod.namespace().unwrap_or_default();
    let labels = pod.labels().clone();
    let c = crate::scheduling::parse(spec, &namespace, &labels).unwrap_or_default();
    Some(crate::scheduling::PlacedPod::new(
        namespace, labels, node, &c,
    ))
}

/// `namespace/name` of a pod, as plans and claims name pods.
pub(crate) fn pod_key(pod: &Pod) -> String {
    format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any())
}

/// A Node's allocatable or capacity map in integer units (unparseable entries skipped).
pub(crate) fn quantities(
    map: Option<&BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>>,
) -> Resources {
    let mut r = Resources::new();
    for (k, q) in map.into_iter().flatten() {
        if let Ok(v) = crate::quantity::parse_quantity(&q.0, resources::unit_of(k)) {
            r.set(k.clone(), v);
        }
    }
    r
}

/// The Node a claim launched: the one recorded at registration, or (before that is
/// recorded) the one whose provider ID is the claim's.
pub(crate) fn claim_node_name(claim: &NodeClaim, nodes: &Store<Node>) -> Option<String> {
    let status = claim.status.as_ref()?;
    if let Some(name) = &status.node_name {
        return Some(name.clone());
    }
    let provider_id = status.provider_id.as_deref()?;
    nodes
        .state()
        .iter()
        .find(|n| n.spec.as_ref().and_then(|s| s.provider_id.as_deref()) == Some(provider_id))
        .map(|n| n.name_any())
}

/// A condition of the claim that is `True`.
pub(crate) fn claim_condition(claim: &NodeClaim, type_: &str) -> Option<Condition> {
    claim
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_ && c.status == "True")
        .cloned()
}

/// Is the Node's `Ready` condition `True`?
pub(crate) fn node_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True")
}

/// A DaemonSet or mirror (static) pod: it belongs to the node, not to the workloads on
/// it, so a node running only these is empty.
pub(crate) fn is_node_agent(pod: &Pod) -> bool {
    pod.owner_references().iter().any(|o| o.kind == "DaemonSet")
        || pod
            .annotations()
            .contains_key("kubernetes.io/config.mirror")
}

/// The node a pod is bound to while it still holds resources there (not finished).
pub(crate) fn holding_node(pod: &Pod) -> Option<String> {
    let node = pod.spec.as_ref()?.node_name.clone()?;
    let finished = matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    );
    (!finished).then_some(node)
}

/// Set one condition on a claim's status (as it is in `claim`) and write it.
pub(crate) async fn set_claim_condition(
    claims: &Api<NodeClaim>,
    claim: &NodeClaim,
    condition: Condition,
) -> Result<(), kube::Error> {
    let mut status = claim.status.clone().unwrap_or_default();
    set_condition(&mut status.conditions, condition);
    patch_claim_status(claims, &claim.name_any(), &status).await
}

/// Delete a claim (its finalizer then terminates the instance); already gone is fine.
pub(crate) async fn delete_claim(claims: &Api<NodeClaim>, name: &str) -> Result<(), kube::Error> {
    match claims.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

/// Write a NodeClaim's status (merge patch on the status subresource).
pub(crate) async fn patch_claim_status(
    claims: &Api<NodeClaim>,
    name: &str,
    status: &NodeClaimStatus,
) -> Result<(), kube::Error> {
    claims
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(&json!({ "status": status })),
        )
        .await
        .map(|_| ())
}

/// Cordon a node (already gone is fine).
pub(crate) async fn cordon(nodes: &Api<Node>, node: &str, on: bool) -> Result<(), kube::Error> {
    match nodes
        .patch(
            node,
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"unschedulable": on}})),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

pub(crate) fn taint_json(t: &Taint) -> serde_json::Value {
    let mut v = json!({"key": t.key, "effect": format!("{:?}", t.effect)});
    if let Some(value) = &t.value {
        v["value"] = json!(value);
    }
    v
}

/// Aborts a task when dropped: a reconciler or worker lives exactly as long as the
/// controller (or dispatcher) that started it.
pub(crate) struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The controller: the reconcilers over one [`Context`].
pub struct Controller<C> {
    ctx: Arc<Context<C>>,
    defaults: Vec<DefaultObject>,
    catalog_updates: Option<tokio::sync::watch::Receiver<Arc<Catalog>>>,
}

impl<C: CloudProvider + Send + Sync + 'static> Controller<C> {
    /// A controller over started reflectors. `client` makes the requests (see [`client`]);
    /// the stores were started with a watch client.
    pub fn new(
        client: Client,
        cloud: Arc<C>,
        catalog: Arc<Catalog>,
        settings: Settings,
        stores: Stores,
    ) -> Self {
        Controller {
            ctx: Arc::new(Context::new(
                client,
                cloud,
                catalog,
                settings,
                stores,
                Arc::new(metrics::Metrics::default()),
            )),
            defaults: Vec::new(),
            catalog_updates: None,
        }
    }

    fn ctx_mut(&mut self) -> &mut Context<C> {
        Arc::get_mut(&mut self.ctx).expect("the context is shared only once the controller runs")
    }

    /// Plan with each catalog published here from now on (the live EC2 catalog).
    pub fn with_catalog_updates(
        mut self,
        updates: tokio::sync::watch::Receiver<Arc<Catalog>>,
    ) -> Self {
        self.catalog_updates = Some(updates);
        self
    }

    /// Create these NodePools and NodeClasses when missing (never overwriting them).
    pub fn with_defaults(mut self, defaults: Vec<DefaultObject>) -> Self {
        self.defaults = defaults;
        self
    }

    /// Export to these metrics (by default the controller keeps its own).
    pub fn with_metrics(mut self, metrics: Arc<metrics::Metrics>) -> Self {
        self.ctx_mut().metrics = metrics;
        self
    }

    /// The shared context (for read-only views).
    pub fn context(&self) -> &Arc<Context<C>> {
        &self.ctx
    }

    /// Run every reconciler until `stop` resolves (e.g. the leader lease is lost or a
    /// signal arrives). Every step is idempotent and resumes from the objects' state
    /// (claims are created before launches, finalizers guard terminations), so stopping
    /// mid-step loses nothing.
    pub async fn run(self, stop: impl std::future::Future<Output = ()>) {
        let Controller {
            ctx,
            defaults,
            catalog_updates,
        } = self;
        ctx.metrics.forget_reconcilers();
        ctx.adopt_recorded_instances().await;
        let tasks = [
            spawn_loop(
                "config",
                ctx.clone(),
                config::Config::new(defaults, catalog_updates),
            ),
            spawn_loop(
                "provisioner",
                ctx.clone(),
                provisioner::Provisioner::new(&ctx.settings),
            ),
            spawn_loop("lifecycle", ctx.clone(), lifecycle::Dispatcher::default()),
            spawn_loop("disruption", ctx.clone(), disruption::Disruption),
            spawn_loop("gc", ctx.clone(), gc::Collector::default()),
            spawn_loop(
                "interruption",
                ctx.clone(),
                interruption::Interruptions::start(ctx.cloud.clone()),
            ),
        ];
        stop.await;
        drop(tasks);
        ctx.metrics.forget_reconcilers();
    }

    /// What the controller would launch right now, without writing anything
    /// (`cooper plan --live`).
    pub async fn plan_now(&self, namespace: Option<&str>) -> planner::Plan {
        self.ctx.plan_now(namespace).await
    }

    /// The consolidation move the controller would make now, without writing anything
    /// (`cooper plan --live --consolidation`).
    pub async fn consolidation_now(&self) -> Option<ConsolidationPreview> {
        self.ctx.consolidation_now().await
    }
}

/// One reconciler: an iteration over the caches, run every `tick`.
pub(crate) trait Reconciler<C>: Send + 'static {
    /// One pass; errors are logged and the pass is retried on the next tick.
    fn reconcile(
        &mut self,
        ctx: &Arc<Context<C>>,
    ) -> impl std::future::Future<Output = Result<(), Error>> + Send;

    /// How long to wait between passes.
    fn interval(&self, ctx: &Context<C>) -> Duration {
        ctx.settings.tick
    }
}

fn spawn_loop<C, R>(name: &'static str, ctx: Arc<Context<C>>, mut reconciler: R) -> AbortOnDrop
where
    C: CloudProvider + Send + Sync + 'static,
    R: Reconciler<C>,
{
    AbortOnDrop(tokio::spawn(async move {
        loop {
            let started = std::time::Instant::now();
            let result = reconciler
                .reconcile(&ctx)
                .instrument(info_span!("reconcile", reconciler = name))
                .await;
            match result {
                Ok(()) => ctx.metrics.reconciled(name, started.elapsed()),
                Err(e) => {
                    ctx.metrics.reconcile_failed(name);
                    warn!(reconciler = name, error = %e, "iteration failed; retrying");
                }
            }
            tokio::time::sleep(reconciler.interval(&ctx)).await;
        }
    }))
}

/// Clients for [`run_elected`]: `watch` feeds the caches, `request` makes the calls.
#[derive(Clone)]
pub struct Clients {
    pub watch: Client,
    pub request: Client,
}

impl From<Client> for Clients {
    fn from(client: Client) -> Self {
        Clients {
            watch: client.clone(),
            request: client,
        }
    }
}

/// Run as one of several replicas: keep the caches warm, act only while holding the
/// lease, stop acting the moment it is lost, campaign again; give the lease up on
/// `shutdown` so another replica takes over at once. `controller` builds a fresh
/// controller over the shared caches each time the lease is won, so nothing from a
/// previous term (batches, backoffs) carries over.
pub async fn run_elected<C: CloudProvider + Send + Sync + 'static>(
    clients: impl Into<Clients>,
    lease: leader::LeaseSettings,
    metrics: Arc<metrics::Metrics>,
    controller: impl Fn(Stores) -> Controller<C>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let clients = clients.into();
    let stores = start_reflectors(&clients.watch).await;
    metrics.set_role(metrics::Role::Standby);
    let elector =
        leader::LeaderElector::new(clients.request.clone(), lease).with_metrics(metrics.clone());
    let (mut leading, release) = elector.spawn();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = leader::elected(&mut leading) => {}
        }
        info!("leading: acting");
        metrics.set_role(metrics::Role::Leader);
        let acting = controller(stores.clone()).with_metrics(metrics.clone());
        let stopped = tokio::select! {
            _ = &mut shutdown => true,
            _ = acting.run(leader::lost(leading.clone())) => false,
        };
        metrics.set_role(metrics::Role::Standby);
        if stopped {
            break;
        }
        info!("not leading: stopped acting");
    }
    release.release().await;
}

/// Run alone (no leader election) until `stop`.
pub async fn run_alone<C: CloudProvider + Send + Sync + 'static>(
    controller: Controller<C>,
    stop: impl std::future::Future<Output = ()>,
) {
    controller.ctx.metrics.set_role(metrics::Role::Leader);
    controller.run(stop).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(conditions: serde_json::Value, created: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "ns", "creationTimestamp": created},
            "spec": {"containers": [{"name": "c", "image": "i"}]},
            "status": {"conditions": conditions},
        }))
        .expect("pod")
    }

    fn at(s: &str) -> Duration {
        parse_time(s).expect("time")
    }

    #[test]
    fn a_pod_is_provisioned_for_on_the_schedulers_verdict_or_after_waiting_for_it() {
        let names = ["default-scheduler".to_string()];
        let wait = Some(Duration::from_secs(3));
        let created = "2026-12-01T10:00:00Z";
        let unschedulable = pod(
            json!([{"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}]),
            created,
        );
        assert!(unplaced(&unschedulable, &names, None, at(created)));
        // No verdict yet: not before the wait is over, then yes; never without a wait.
        let fresh = pod(json!([]), created);
        assert!(!unplaced(&fresh, &names, wait, at("2026-12-01T10:00:02Z")));
        assert!(unplaced(&fresh, &names, wait, at("2026-12-01T10:00:03Z")));
        assert!(!unplaced(&fresh, &names, None, at("2026-12-01T11:00:00Z")));
        // Any other verdict is the scheduler's business: gated, being bound, an error.
        for reason in ["SchedulingGated", "SchedulerError"] {
            let p = pod(
                json!([{"type": "PodScheduled", "status": "False", "reason": reason}]),
                created,
            );
            assert!(
                !unplaced(&p, &names, wait, at("2026-12-01T11:00:00Z")),
                "{reason}"
            );
        }
        // Scheduling gates hold a pod back whatever its conditions say.
        let mut gated = fresh.clone();
        gated.spec.as_mut().expect("spec").scheduling_gates =
            Some(vec![k8s_openapi::api::core::v1::PodSchedulingGate {
                name: "example.com/quota".into(),
            }]);
        assert!(!unplaced(&gated, &names, wait, at("2026-12-01T11:00:00Z")));
        // Another scheduler's pod is left alone; a nominated one is the provisioner's to
        // judge (`controller::a_pod_nominated_to_a_cordoned_node_…` against the API server).
        let mut other = unschedulable.clone();
        other.spec.as_mut().expect("spec").scheduler_name = Some("volcano".into());
        assert!(!unplaced(&other, &names, wait, at(created)));
        let mut nominated = unschedulable.clone();
        nominated
            .status
            .as_mut()
            .expect("status")
            .nominated_node_name = Some("n1".into());
        assert_eq!(nominated_node(&nominated), Some("n1"));
    }
}
