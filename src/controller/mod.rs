//! The in-cluster controller: watches what the scheduler cannot place and acts through
//! the [`CloudProvider`] trait. It only feeds the shared core and acts on its answers:
//! [`Batcher`] decides when to plan, [`planner::plan`] what to launch (existing nodes'
//! free room and in-flight NodeClaims counted, so a pod already covered by a launching
//! node never triggers a second launch), [`disruption::expired_empty_nodes`] which empty
//! nodes to remove.
//!
//! One loop iteration ([`Controller::reconcile`]) reads the reflector stores and:
//! 1. validates NodePools (an invalid one gets `Ready=False` naming the field, the others
//!    keep serving);
//! 2. finishes NodeClaims being deleted (terminate the instance, delete the Node, drop the
//!    finalizer) and launches claims that have none yet (a restart mid-launch resumes
//!    here; launches are idempotent on the claim name);
//! 3. registers Nodes to their claims by provider ID (labels, taints), initialises them
//!    (GPU/Neuron allocatable present, startup taints removed), and gives up on claims
//!    not registered within the timeout;
//! 4. plans for provisionable pods when the batching window closes: NodeClaim first, then
//!    the launch, then the instance recorded in the claim's status;
//! 5. removes nodes empty past their pool's TTL, within the disruption budget, never one
//!    annotated `cooper.dev/do-not-disrupt: "true"`.
//!
//! Errors from the API are logged and retried on the next iteration; a bad object is
//! reported on its status and skipped, never fatal.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub mod device_plugins;
mod interruption;
pub mod leader;
pub mod live_report;
pub mod metrics;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use serde_json::json;
use tracing::{Instrument, info, info_span, warn};

use crate::catalog::{CapacityType, Catalog};
use crate::cloud::{CloudError, CloudProvider, LaunchRequest};
use crate::crd::{
    ClaimOffering, Condition, NodeClaim, NodeClaimSpec, NodeClaimStatus, NodeClass, set_condition,
};
use crate::disruption::{self, DO_NOT_DISRUPT, NodeState};
use crate::labels::{Taint, keys};
use crate::manifest::Document;
use crate::nodepool::{NodePool, NodePoolResource};
use crate::planner::{self, ExistingNode, OfferingKey, PlanInput, PlanOptions, Strategy};
use crate::provisioning::{BatchSettings, Batcher};
use crate::resources::{self, Resources};
use crate::workload::{self, DaemonSetOverhead, Gang, PendingPod};

/// The finalizer that keeps a NodeClaim until its instance is gone.
pub const TERMINATION_FINALIZER: &str = "cooper.dev/termination";
/// Label on Nodes and NodeClaims: the claim that launched the node.
pub const NODECLAIM_LABEL: &str = "cooper.dev/nodeclaim";
/// cooper's field manager for server-side apply and patches.
pub const FIELD_MANAGER: &str = "cooper";

/// Controller settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub batch: BatchSettings,
    /// How often the loop runs.
    pub tick: Duration,
    /// A claim whose node has not registered by then is terminated and its pods re-planned.
    pub registration_timeout: Duration,
    /// Pods of these schedulers are provisioned.
    pub scheduler_names: Vec<String>,
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
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            batch: BatchSettings::default(),
            tick: Duration::from_millis(500),
            registration_timeout: Duration::from_secs(15 * 60),
            scheduler_names: vec!["default-scheduler".into()],
            strategy: Strategy::Optimal,
            time_limit: Duration::from_secs(2),
            unavailable_for: Duration::from_secs(180),
            device_plugins: device_plugins::DevicePluginSettings::default(),
            max_fallbacks: 9,
            resolve_node_classes_every: Duration::from_secs(300),
            gc_interval: Duration::from_secs(60),
            gc_grace: Duration::from_secs(300),
            interruption_drain: Duration::from_secs(110),
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

/// A client for the controller, from the kubeconfig or the in-cluster environment.
/// kube's own retry layer is off: it retries 429 up to 15 times with backoff growing to
/// minutes, and a 429 is also how the Eviction API says a PodDisruptionBudget blocks,
/// so one protected pod would stall the whole loop. The loop retries every failed
/// step on its next iteration instead.
pub async fn client() -> Result<Client, kube::Error> {
    let mut config = kube::Config::infer()
        .await
        .map_err(kube::Error::InferConfig)?;
    config.default_retry = false;
    Client::try_from(config)
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
    };
    for ready in [
        stores.pods.wait_until_ready().await,
        stores.nodes.wait_until_ready().await,
        stores.nodepools.wait_until_ready().await,
        stores.nodeclaims.wait_until_ready().await,
        stores.nodeclasses.wait_until_ready().await,
        stores.daemonsets.wait_until_ready().await,
    ] {
        if let Err(e) = ready {
            warn!(error = %e, "a reflector stopped before it was ready");
        }
    }
    stores
}

/// Wall-clock time as a duration since the epoch (the time base of the shared core).
fn now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

fn parse_time(s: &str) -> Option<Duration> {
    let t: k8s_openapi::jiff::Timestamp = s.parse().ok()?;
    Duration::try_from(t.duration_since(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)).ok()
}

/// The controller's state between iterations.
pub struct Controller<C> {
    client: Client,
    cloud: Arc<C>,
    catalog: Arc<Catalog>,
    settings: Settings,
    stores: Stores,
    batcher: Batcher,
    unavailable: BTreeMap<OfferingKey, Duration>,
    next_id: u64,
    /// Pool specs already reported invalid (by resourceVersion), to write status once.
    reported: HashMap<String, String>,
    /// What the last plan saw, and when: an unchanged cluster is not re-planned more
    /// often than [`REPLAN_UNCHANGED`].
    last_plan: Option<(u64, Duration)>,
    metrics: Arc<metrics::Metrics>,
    /// Newer catalogs (a live refresh) replace `catalog` at the start of an iteration.
    catalog_updates: Option<tokio::sync::watch::Receiver<Arc<Catalog>>>,
    /// NodeClasses: the generation last resolved, when, and the error if it failed.
    node_classes: HashMap<String, NodeClassState>,
    /// Claims whose launch failed with an error that retrying soon will not heal:
    /// attempts so far and when to try again.
    launch_backoff: HashMap<String, (u32, Duration)>,
    /// Instances seen without a claim, and since when.
    orphans_seen: HashMap<String, Duration>,
    last_gc: Option<Duration>,
    /// Interruption notices from the cloud, polled while this controller runs.
    interruptions: Option<tokio::sync::mpsc::UnboundedReceiver<crate::cloud::Interruption>>,
    /// NodePools and NodeClasses to create when missing (the install's defaults), until
    /// that has succeeded once.
    defaults: Vec<DefaultObject>,
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

/// What the controller knows of a NodeClass between iterations.
#[derive(Debug, Clone)]
struct NodeClassState {
    generation: Option<i64>,
    resolved_at: Duration,
    error: Option<String>,
}

/// Fallback offerings cost at most this many times the chosen one.
pub const FALLBACK_PRICE_RATIO: f64 = 1.5;

/// How often an unchanged cluster with pending pods is re-planned anyway.
pub const REPLAN_UNCHANGED: Duration = Duration::from_secs(30);

/// Is this pod one cooper should provision for?
pub fn provisionable(pod: &Pod, scheduler_names: &[String]) -> bool {
    let Some(spec) = &pod.spec else { return false };
    if spec.node_name.is_some() || pod.metadata.deletion_timestamp.is_some() {
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
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .any(|c| {
            c.type_ == "PodScheduled"
                && c.status == "False"
                && c.reason.as_deref() == Some("Unschedulable")
        })
}

fn as_document<K: serde::Serialize>(obj: &K) -> Result<Document, serde_json::Error> {
    Ok(Document {
        file: "(cluster)".into(),
        line: 0,
        value: serde_json::to_value(obj)?,
    })
}

/// The planner's view of a pod, as if it were pending (any binding dropped): the same
/// parsing `cooper plan -f` applies to a Pod manifest.
fn pod_demand(pod: &Pod) -> Result<Option<PendingPod>, String> {
    let mut doc = as_document(pod).map_err(|e| e.to_string())?;
    if let Some(o) = doc.value.as_object_mut() {
        o.insert("kind".into(), "Pod".into());
        o.insert("apiVersion".into(), "v1".into());
        if let Some(spec) = o.get_mut("spec").and_then(|s| s.as_object_mut()) {
            spec.remove("nodeName");
        }
    }
    let parsed = workload::from_documents(std::slice::from_ref(&doc)).map_err(|e| e.to_string())?;
    Ok(parsed.pods.into_iter().next())
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
fn claim_node_name(claim: &NodeClaim, nodes: &Store<Node>) -> Option<String> {
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

fn claim_condition(claim: &NodeClaim, type_: &str) -> Option<Condition> {
    claim
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_ && c.status == "True")
        .cloned()
}

impl<C: CloudProvider + Send + Sync + 'static> Controller<C> {
    /// A controller over started reflectors.
    pub fn new(
        client: Client,
        cloud: Arc<C>,
        catalog: Arc<Catalog>,
        settings: Settings,
        stores: Stores,
    ) -> Self {
        let batcher = Batcher::new(settings.batch);
        let seed = now().as_nanos() as u64;
        Controller {
            client,
            cloud,
            catalog,
            settings,
            stores,
            batcher,
            unavailable: BTreeMap::new(),
            next_id: seed,
            reported: HashMap::new(),
            last_plan: None,
            metrics: Arc::new(metrics::Metrics::default()),
            catalog_updates: None,
            node_classes: HashMap::new(),
            launch_backoff: HashMap::new(),
            orphans_seen: HashMap::new(),
            last_gc: None,
            interruptions: None,
            defaults: Vec::new(),
        }
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

    /// Create the missing defaults; an object that exists is left as the user has it.
    async fn create_defaults(&mut self) -> Result<(), Error> {
        for object in &self.defaults {
            let created = match object {
                DefaultObject::NodePool(pool) => {
                    let api: Api<NodePoolResource> = Api::all(self.client.clone());
                    let mut pool = (**pool).clone();
                    pool.metadata.resource_version = None;
                    api.create(&PostParams::default(), &pool).await.map(|_| ())
                }
                DefaultObject::NodeClass(class) => {
                    let api: Api<NodeClass> = Api::all(self.client.clone());
                    let mut class = (**class).clone();
                    class.metadata.resource_version = None;
                    api.create(&PostParams::default(), &class).await.map(|_| ())
                }
            };
            match created {
                Ok(()) => {
                    let (kind, name) = match object {
                        DefaultObject::NodePool(p) => ("NodePool", p.name_any()),
                        DefaultObject::NodeClass(c) => ("NodeClass", c.name_any()),
                    };
                    info!(kind, name = %name, "created a default");
                }
                Err(kube::Error::Api(s)) if s.code == 409 => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.defaults.clear();
        Ok(())
    }

    /// Export to these metrics (by default the controller keeps its own).
    pub fn with_metrics(mut self, metrics: Arc<metrics::Metrics>) -> Self {
        metrics
            .ready
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.metrics = metrics;
        self
    }

    /// Run until `stop` resolves (e.g. the leader lease is lost or a signal arrives).
    pub async fn run(mut self, stop: impl std::future::Future<Output = ()>) {
        let mut stop = std::pin::pin!(stop);
        // Interruption notices are read only while this controller acts (the leader).
        let _poller = interruption::AbortOnDrop(interruption::poll(
            self.cloud.clone(),
            &mut self.interruptions,
        ));
        loop {
            // Stop at once, even mid-iteration: every step is idempotent and resumes from
            // the objects' state (claims are created before launches, finalizers guard
            // terminations).
            let result = tokio::select! {
                _ = &mut stop => return,
                r = self.reconcile().instrument(info_span!("reconcile")) => r,
            };
            if let Err(e) = result {
                warn!(error = %e, "iteration failed; retrying");
            }
            tokio::select! {
                _ = &mut stop => return,
                _ = tokio::time::sleep(self.settings.tick) => {}
            }
        }
    }

    /// One iteration over the current state.
    pub async fn reconcile(&mut self) -> Result<(), Error> {
        if let Some(updates) = &mut self.catalog_updates
            && updates.has_changed().unwrap_or(false)
        {
            self.catalog = updates.borrow_and_update().clone();
            info!(types = self.catalog.types.len(), source = %self.catalog.source, "planning with a new catalog");
        }
        self.metrics
            .catalog_offerings
            .set(self.catalog.offerings.len() as i64);
        if !self.defaults.is_empty() {
            self.create_defaults().await?;
        }
        self.prepare_node_classes().await;
        let pools = self.valid_pools().await;
        device_plugins::ensure(
            &self.client,
            &self.settings.device_plugins,
            &pools,
            &self.catalog,
            &self.stores.daemonsets.state(),
            &self.stores.nodes.state(),
        )
        .await?;
        self.handle_interruptions().await?;
        self.drain_interrupted().await?;
        self.finish_deletions().await?;
        self.launch_pending_claims(&pools).await?;
        self.register_and_initialise(&pools).await?;
        self.provision(&pools).await?;
        self.remove_empty_nodes(&pools).await?;
        self.collect_garbage().await?;
        self.export_state();
        Ok(())
    }

    /// Gauges that describe the current state: cost per hour and claims by phase.
    fn export_state(&self) {
        let claims = self.stores.nodeclaims.state();
        let cost: f64 = claims
            .iter()
            .filter_map(|c| c.status.as_ref()?.price_per_hour)
            .sum();
        self.metrics.cost_per_hour.set(cost);
        let mut phases: BTreeMap<&str, i64> = [
            "Launching",
            "Launched",
            "Registered",
            "Initialized",
            "Terminating",
        ]
        .into_iter()
        .map(|p| (p, 0))
        .collect();
        for c in &claims {
            let phase = if c.metadata.deletion_timestamp.is_some() {
                "Terminating"
            } else if claim_condition(c, "Initialized").is_some() {
                "Initialized"
            } else if claim_condition(c, "Registered").is_some() {
                "Registered"
            } else if claim_condition(c, "Launched").is_some() {
                "Launched"
            } else {
                "Launching"
            };
            *phases.entry(phase).or_default() += 1;
        }
        for (phase, n) in phases {
            self.metrics
                .claims
                .get_or_create(&metrics::PhaseLabels {
                    phase: phase.into(),
                })
                .set(n);
        }
    }

    fn cloud_error(&self, operation: &str, e: &CloudError) {
        let kind = match e {
            CloudError::InsufficientCapacity { .. } => "insufficient_capacity",
            CloudError::NotFound(_) => "not_found",
            CloudError::Permanent(_) => "permanent",
            CloudError::Transient(_) => "transient",
        };
        self.metrics
            .cloud_errors
            .get_or_create(&metrics::CloudErrorLabels {
                operation: operation.into(),
                kind: kind.into(),
            })
            .inc();
    }

    /// Validate every NodePool; report invalid ones on their status and skip them.
    async fn valid_pools(&mut self) -> Vec<NodePool> {
        let api: Api<NodePoolResource> = Api::all(self.client.clone());
        let mut pools = Vec::new();
        for np in self.stores.nodepools.state() {
            let name = np.name_any();
            let result = NodePool::from_spec(&name, &np.spec);
            let class_problem = result
                .as_ref()
                .ok()
                .and_then(|p| self.node_class_problem(p.node_class.as_deref()?));
            let rv = format!(
                "{}/{}",
                np.resource_version().unwrap_or_default(),
                class_problem.as_deref().unwrap_or("")
            );
            let condition = match (&result, &class_problem) {
                (Err((field, message)), _) => Condition::new(
                    "Ready",
                    false,
                    "InvalidSpec",
                    format!("spec.{field}: {message}"),
                ),
                (Ok(_), Some(problem)) => {
                    Condition::new("Ready", false, "NodeClassNotReady", problem.clone())
                }
                (Ok(_), None) => Condition::new("Ready", true, "Valid", ""),
            };
            if self.reported.get(&name) != Some(&rv) {
                let mut status = np.status.clone().unwrap_or_default();
                if set_condition(&mut status.conditions, condition.clone()) {
                    let patch = json!({"status": status});
                    if let Err(e) = api
                        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                        .await
                    {
                        warn!(nodepool = %name, error = %e, "could not write NodePool status");
                    }
                    if condition.status == "False" {
                        warn!(nodepool = %name, message = %condition.message, "invalid NodePool");
                        self.event(&*np, "Warning", &condition.reason, &condition.message)
                            .await;
                    }
                }
                self.reported.insert(name.clone(), rv);
            }
            if let (Ok(pool), None) = (result, class_problem) {
                pools.push(pool);
            }
        }
        pools
    }

    /// Why a pool's NodeClass cannot be launched with, if it cannot.
    fn node_class_problem(&self, class: &str) -> Option<String> {
        let exists = self
            .stores
            .nodeclasses
            .get(&reflector::ObjectRef::new(class))
            .is_some();
        if !exists {
            return Some(format!("NodeClass {class} not found"));
        }
        match self.node_classes.get(class) {
            None => Some(format!("NodeClass {class} not resolved yet")),
            Some(NodeClassState { error: Some(e), .. }) => Some(format!("NodeClass {class}: {e}")),
            Some(_) => None,
        }
    }

    /// Resolve NodeClasses against the cloud when they change and every
    /// `resolve_node_classes_every`, writing what they resolved to (or the cloud's
    /// error) to their status, with an Event when resolution fails.
    async fn prepare_node_classes(&mut self) {
        let api: Api<NodeClass> = Api::all(self.client.clone());
        let at = now();
        let classes = self.stores.nodeclasses.state();
        self.node_classes
            .retain(|name, _| classes.iter().any(|c| &c.name_any() == name));
        for class in classes {
            let name = class.name_any();
            let generation = class.metadata.generation;
            let due = self.node_classes.get(&name).is_none_or(|s| {
                s.generation != generation
                    || at.saturating_sub(s.resolved_at) >= self.settings.resolve_node_classes_every
                    || (s.error.is_some()
                        && at.saturating_sub(s.resolved_at) >= Duration::from_secs(30))
            });
            if !due {
                continue;
            }
            let result = self
                .cloud
                .prepare_node_class(&name, &class.spec)
                .instrument(info_span!("cloud.prepare_node_class", nodeclass = %name))
                .await;
            let previous_error = self.node_classes.get(&name).and_then(|s| s.error.clone());
            let (mut status, error) = match result {
                Ok(status) => (status, None),
                Err(e) => {
                    self.cloud_error("prepare_node_class", &e);
                    (
                        class.status.clone().unwrap_or_default(),
                        Some(e.to_string()),
                    )
                }
            };
            status.conditions = class
                .status
                .as_ref()
                .map(|s| s.conditions.clone())
                .unwrap_or_default();
            let condition = match &error {
                None => Condition::new("Ready", true, "Resolved", ""),
                Some(e) => Condition::new("Ready", false, "ResolutionFailed", e.clone()),
            };
            set_condition(&mut status.conditions, condition);
            if class.status.as_ref() != Some(&status) {
                let patch = json!({"status": status});
                if let Err(e) = api
                    .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                {
                    warn!(nodeclass = %name, error = %e, "could not write NodeClass status");
                }
            }
            if let Some(e) = &error
                && previous_error.as_ref() != Some(e)
            {
                warn!(nodeclass = %name, error = %e, "NodeClass cannot be resolved");
                self.event(&*class, "Warning", "ResolutionFailed", e).await;
            }
            self.node_classes.insert(
                name,
                NodeClassState {
                    generation,
                    resolved_at: at,
                    error,
                },
            );
        }
    }

    /// Record a Kubernetes Event about an object (best effort).
    async fn event<K: kube::Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        type_: &str,
        reason: &str,
        message: &str,
    ) {
        let ns = obj
            .meta()
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let api: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(self.client.clone(), &ns);
        let name = format!(
            "{}.{:x}",
            obj.meta().name.clone().unwrap_or_default(),
            now().as_nanos()
        );
        let event = json!({
            "metadata": {"name": name, "namespace": ns},
            "involvedObject": {
                "apiVersion": K::api_version(&()), "kind": K::kind(&()),
                "name": obj.meta().name, "namespace": obj.meta().namespace, "uid": obj.meta().uid,
            },
            "type": type_, "reason": reason, "message": message,
            "source": {"component": "cooper"},
            "firstTimestamp": crate::crd::now_rfc3339(), "lastTimestamp": crate::crd::now_rfc3339(), "count": 1,
        });
        match serde_json::from_value(event) {
            Ok(e) => {
                if let Err(err) = api.create(&PostParams::default(), &e).await {
                    warn!(error = %err, "could not record event");
                }
            }
            Err(err) => warn!(error = %err, "could not build event"),
        }
    }

    /// Claims being deleted: terminate the instance, delete the Node, release the claim.
    async fn finish_deletions(&mut self) -> Result<(), Error> {
        let claims: Api<NodeClaim> = Api::all(self.client.clone());
        let nodes: Api<Node> = Api::all(self.client.clone());
        for claim in self.stores.nodeclaims.state() {
            if claim.metadata.deletion_timestamp.is_none()
                || !claim
                    .finalizers()
                    .iter()
                    .any(|f| f == TERMINATION_FINALIZER)
            {
                continue;
            }
            let name = claim.name_any();
            let status = claim.status.clone().unwrap_or_default();
            if let Some(id) = &status.instance_id {
                match self.cloud.terminate(id).await {
                    Ok(()) => {
                        let reason = status
                            .conditions
                            .iter()
                            .find(|c| c.type_ == "Terminating")
                            .map(|c| c.reason.clone())
                            .unwrap_or_else(|| "Deleted".into());
                        self.metrics
                            .terminated
                            .get_or_create(&metrics::TerminationLabels {
                                nodepool: claim.spec.node_pool.clone(),
                                instance_type: status.instance_type.clone().unwrap_or_default(),
                                capacity_type: status.capacity_type.clone().unwrap_or_default(),
                                reason,
                            })
                            .inc();
                    }
                    Err(CloudError::NotFound(_)) => {}
                    Err(e) => {
                        self.cloud_error("terminate", &e);
                        warn!(nodeclaim = %name, error = %e, "terminate failed; retrying");
                        continue;
                    }
                }
            } else if let Ok(instances) = self.cloud.list().await {
                // A restart between launch and recording the instance: find it by claim.
                for i in instances.iter().filter(|i| i.claim == name) {
                    self.cloud.terminate(&i.id).await.or_else(|e| {
                        if matches!(e, CloudError::NotFound(_)) {
                            Ok(())
                        } else {
                            Err(e)
                        }
                    })?;
                }
            }
            if let Some(node) = &claim_node_name(&claim, &self.stores.nodes) {
                match nodes.delete(node, &DeleteParams::default()).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(s)) if s.code == 404 => {}
                    Err(e) => return Err(e.into()),
                }
            }
            let finalizers: Vec<String> = claim
                .finalizers()
                .iter()
                .filter(|f| *f != TERMINATION_FINALIZER)
                .cloned()
                .collect();
            let patch = json!({"metadata": {"finalizers": finalizers, "resourceVersion": claim.resource_version()}});
            claims
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
            info!(nodeclaim = %name, "nodeclaim terminated");
        }
        Ok(())
    }

    /// Claims without an instance: launch (idempotent on the claim name).
    async fn launch_pending_claims(&mut self, pools: &[NodePool]) -> Result<(), Error> {
        for claim in self.stores.nodeclaims.state() {
            if claim.metadata.deletion_timestamp.is_some() {
                continue;
            }
            if claim
                .status
                .as_ref()
                .and_then(|s| s.instance_id.as_ref())
                .is_some()
            {
                continue;
            }
            if claim_condition(&claim, "Launched").is_none()
                && claim.status.as_ref().is_some_and(|s| {
                    s.conditions
                        .iter()
                        .any(|c| c.type_ == "Launched" && c.reason == "InsufficientCapacity")
                })
            {
                // Already given up on: it is being deleted and its pods re-planned.
                continue;
            }
            let name = claim.name_any();
            if self
                .launch_backoff
                .get(&name)
                .is_some_and(|(_, next)| now() < *next)
            {
                continue;
            }
            let pool = pools.iter().find(|p| p.name == claim.spec.node_pool);
            self.launch(&claim, pool).await?;
        }
        Ok(())
    }

    async fn launch(&mut self, claim: &NodeClaim, pool: Option<&NodePool>) -> Result<(), Error> {
        let name = claim.name_any();
        let claims: Api<NodeClaim> = Api::all(self.client.clone());
        let mut labels = pool.map(|p| p.labels.clone()).unwrap_or_default();
        labels.insert(keys::NODEPOOL.to_string(), claim.spec.node_pool.clone());
        let request = LaunchRequest {
            node_class: pool.and_then(|p| p.node_class.clone()),
            labels,
            taints: pool
                .map(|p| p.taints.iter().chain(&p.startup_taints).cloned().collect())
                .unwrap_or_default(),
            claim: name.clone(),
            nodepool: claim.spec.node_pool.clone(),
            offerings: claim
                .spec
                .offerings
                .iter()
                .map(|o| {
                    (
                        o.instance_type.clone(),
                        o.zone.clone(),
                        if o.capacity_type == "spot" {
                            CapacityType::Spot
                        } else {
                            CapacityType::OnDemand
                        },
                    )
                })
                .collect(),
        };
        let result = self
            .cloud
            .create(&request)
            .instrument(info_span!("cloud.create", nodeclaim = %name))
            .await;
        match result {
            Ok(instance) => {
                self.launch_backoff.remove(&name);
                let mut status = claim.status.clone().unwrap_or_default();
                status.instance_id = Some(instance.id.clone());
                status.provider_id = Some(format!("aws:///{}/{}", instance.zone, instance.id));
                status.instance_type = Some(instance.instance_type.clone());
                status.zone = Some(instance.zone.clone());
                status.capacity_type = Some(instance.capacity_type.as_str().to_string());
                status.price_per_hour = Some(instance.price_per_hour);
                set_condition(
                    &mut status.conditions,
                    Condition::new(
                        "Launched",
                        true,
                        "Launched",
                        format!(
                            "{} {} {}",
                            instance.instance_type, instance.zone, instance.capacity_type
                        ),
                    ),
                );
                patch_claim_status(&claims, &name, &status).await?;
                self.metrics
                    .launched
                    .get_or_create(&metrics::NodeLabels {
                        nodepool: claim.spec.node_pool.clone(),
                        instance_type: instance.instance_type.clone(),
                        capacity_type: instance.capacity_type.as_str().into(),
                    })
                    .inc();
                info!(nodeclaim = %name, instance = %instance.id, instance_type = %instance.instance_type, "launched");
            }
            Err(CloudError::InsufficientCapacity { offerings }) => {
                self.cloud_error(
                    "create",
                    &CloudError::InsufficientCapacity {
                        offerings: offerings.clone(),
                    },
                );
                for (t, z, c) in offerings {
                    self.unavailable.insert(
                        OfferingKey {
                            instance_type: t,
                            zone: z,
                            capacity_type: c,
                        },
                        now() + self.settings.unavailable_for,
                    );
                }
                let mut status = claim.status.clone().unwrap_or_default();
                set_condition(
                    &mut status.conditions,
                    Condition::new(
                        "Launched",
                        false,
                        "InsufficientCapacity",
                        "no capacity for any of the claim's offerings; re-planning",
                    ),
                );
                patch_claim_status(&claims, &name, &status).await?;
                claims.delete(&name, &DeleteParams::default()).await?;
                warn!(nodeclaim = %name, "insufficient capacity; the claim's pods will be re-planned");
            }
            Err(e) => {
                // Not a retry storm: back off per claim (30 s doubling to 10 min); the
                // SDK already retried throttling and 5xx within the call.
                self.cloud_error("create", &e);
                let attempts = self.launch_backoff.get(&name).map_or(0, |(a, _)| *a) + 1;
                let wait = Duration::from_secs(30)
                    .saturating_mul(1 << (attempts - 1).min(5))
                    .min(Duration::from_secs(600));
                self.launch_backoff
                    .insert(name.clone(), (attempts, now() + wait));
                let mut status = claim.status.clone().unwrap_or_default();
                let changed = set_condition(
                    &mut status.conditions,
                    Condition::new("Launched", false, "LaunchFailed", e.to_string()),
                );
                if changed {
                    patch_claim_status(&claims, &name, &status).await?;
                    self.event(claim, "Warning", "LaunchFailed", &e.to_string())
                        .await;
                }
                warn!(nodeclaim = %name, error = %e, retry_in_s = wait.as_secs(), "launch failed");
            }
        }
        Ok(())
    }

    /// Compare the cloud's instances with the NodeClaims every `gc_interval`:
    /// an instance tagged as this cluster's with no claim for longer than `gc_grace`
    /// (its claim was deleted without terminating it) is terminated; a launched claim
    /// whose instance is gone (terminated outside cooper, or a spot interruption) is
    /// deleted, which deletes its Node and lets its pods be re-planned.
    async fn collect_garbage(&mut self) -> Result<(), Error> {
        let at = now();
        if self
            .last_gc
            .is_some_and(|t| at.saturating_sub(t) < self.settings.gc_interval)
        {
            return Ok(());
        }
        self.last_gc = Some(at);
        let instances = match self.cloud.list().instrument(info_span!("cloud.list")).await {
            Ok(i) => i,
            Err(e) => {
                self.cloud_error("list", &e);
                warn!(error = %e, "garbage collection skipped: cannot list instances");
                return Ok(());
            }
        };
        let claims_api: Api<NodeClaim> = Api::all(self.client.clone());
        let claims = self.stores.nodeclaims.state();
        let claim_names: HashSet<String> = claims.iter().map(|c| c.name_any()).collect();

        let mut still_orphaned = HashMap::new();
        for instance in &instances {
            if claim_names.contains(&instance.claim) {
                continue;
            }
            let since = *self.orphans_seen.get(&instance.id).unwrap_or(&at);
            still_orphaned.insert(instance.id.clone(), since);
            if at.saturating_sub(since) < self.settings.gc_grace {
                continue;
            }
            // The store may lag: ask the API server before terminating.
            if !instance.claim.is_empty() && claims_api.get_opt(&instance.claim).await?.is_some() {
                continue;
            }
            match self.cloud.terminate(&instance.id).await {
                Ok(()) | Err(CloudError::NotFound(_)) => {
                    warn!(instance = %instance.id, nodeclaim = %instance.claim, "terminated an instance with no NodeClaim");
                    self.metrics
                        .terminated
                        .get_or_create(&metrics::TerminationLabels {
                            nodepool: instance.nodepool.clone(),
                            instance_type: instance.instance_type.clone(),
                            capacity_type: instance.capacity_type.as_str().into(),
                            reason: "Orphaned".into(),
                        })
                        .inc();
                    still_orphaned.remove(&instance.id);
                }
                Err(e) => {
                    self.cloud_error("terminate", &e);
                    warn!(instance = %instance.id, error = %e, "could not terminate an orphaned instance");
                }
            }
        }
        self.orphans_seen = still_orphaned;

        let running: HashSet<&str> = instances.iter().map(|i| i.id.as_str()).collect();
        for claim in claims {
            if claim.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let Some(id) = claim.status.as_ref().and_then(|s| s.instance_id.as_deref()) else {
                continue;
            };
            if running.contains(id) {
                continue;
            }
            let launched = claim_condition(&claim, "Launched")
                .and_then(|c| c.last_transition_time)
                .and_then(|t| parse_time(&t));
            if launched.is_none_or(|t| at.saturating_sub(t) < self.settings.gc_grace) {
                continue;
            }
            let name = claim.name_any();
            warn!(nodeclaim = %name, instance = %id, "instance is gone; deleting its NodeClaim");
            self.event(
                &*claim,
                "Warning",
                "InstanceGone",
                &format!("instance {id} no longer exists; the NodeClaim and its Node are deleted and their pods re-planned"),
            )
            .await;
            set_claim_condition(
                &claims_api,
                &claim,
                Condition::new(
                    "Terminating",
                    true,
                    "InstanceGone",
                    format!("instance {id} no longer exists"),
                ),
            )
            .await?;
            delete_claim(&claims_api, &name).await?;
        }
        Ok(())
    }

    /// Match Nodes to claims by provider ID; label, taint and initialise them.
    async fn register_and_initialise(&mut self, pools: &[NodePool]) -> Result<(), Error> {
        let claims: Api<NodeClaim> = Api::all(self.client.clone());
        let nodes_api: Api<Node> = Api::all(self.client.clone());
        let nodes: HashMap<String, Arc<Node>> = self
            .stores
            .nodes
            .state()
            .into_iter()
            .filter_map(|n| Some((n.spec.as_ref()?.provider_id.clone()?, n)))
            .collect();
        for claim in self.stores.nodeclaims.state() {
            if claim.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let name = claim.name_any();
            let Some(status) = claim.status.clone() else {
                continue;
            };
            let Some(provider_id) = status.provider_id.clone() else {
                continue;
            };
            let pool = pools.iter().find(|p| p.name == claim.spec.node_pool);
            let Some(node) = nodes.get(&provider_id) else {
                let launched = claim_condition(&claim, "Launched")
                    .and_then(|c| c.last_transition_time)
                    .and_then(|t| parse_time(&t));
                if launched
                    .is_some_and(|t| now().saturating_sub(t) > self.settings.registration_timeout)
                {
                    warn!(nodeclaim = %name, "node did not register in time; terminating");
                    self.event(
                        &*claim,
                        "Warning",
                        "RegistrationTimeout",
                        "the node did not register in time; terminating and re-planning its pods",
                    )
                    .await;
                    claims.delete(&name, &DeleteParams::default()).await?;
                }
                continue;
            };
            let node_name = node.name_any();
            let mut status = status;
            let mut changed = false;
            if status.node_name.as_deref() != Some(&node_name) {
                // Registration: the pool's labels and taints, cooper's labels.
                let mut labels: BTreeMap<String, String> =
                    pool.map(|p| p.labels.clone()).unwrap_or_default();
                labels.insert(keys::NODEPOOL.into(), claim.spec.node_pool.clone());
                labels.insert(NODECLAIM_LABEL.into(), name.clone());
                if let Some(t) = &status.instance_type {
                    labels.insert(keys::INSTANCE_TYPE.into(), t.clone());
                    if let Some(it) = self.catalog.instance_type(t) {
                        labels.extend(it.labels.clone());
                    }
                }
                if let Some(z) = &status.zone {
                    labels.insert(keys::ZONE.into(), z.clone());
                }
                if let Some(c) = &status.capacity_type {
                    labels.insert(keys::CAPACITY_TYPE.into(), c.clone());
                }
                let mut taints: Vec<serde_json::Value> = node
                    .spec
                    .as_ref()
                    .and_then(|s| s.taints.clone())
                    .unwrap_or_default()
                    .into_iter()
                    .map(|t| serde_json::to_value(t).unwrap_or_default())
                    .collect();
                if let Some(p) = pool {
                    for t in p.taints.iter().chain(&p.startup_taints) {
                        let v = taint_json(t);
                        if !taints.iter().any(|x| {
                            x.get("key") == v.get("key") && x.get("effect") == v.get("effect")
                        }) {
                            taints.push(v);
                        }
                    }
                }
                let patch = json!({"metadata": {"labels": labels}, "spec": {"taints": taints}});
                nodes_api
                    .patch(&node_name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await?;
                status.node_name = Some(node_name.clone());
                set_condition(
                    &mut status.conditions,
                    Condition::new(
                        "Registered",
                        true,
                        "Registered",
                        format!("node {node_name}"),
                    ),
                );
                changed = true;
                info!(nodeclaim = %name, node = %node_name, "registered");
            }
            if claim_condition(&claim, "Initialized").is_none() {
                let ready = node
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .into_iter()
                    .flatten()
                    .any(|c| c.type_ == "Ready" && c.status == "True");
                let expected = status
                    .instance_type
                    .as_deref()
                    .and_then(|t| self.catalog.instance_type(t));
                let allocatable = node.status.as_ref().and_then(|s| s.allocatable.as_ref());
                let advertised = |r: &str| -> i64 {
                    allocatable
                        .and_then(|a| a.get(r))
                        .and_then(|q| {
                            crate::quantity::parse_quantity(&q.0, resources::unit_of(r)).ok()
                        })
                        .unwrap_or(0)
                };
                let devices_ok = expected.is_none_or(|t| {
                    [resources::NVIDIA_GPU, resources::NEURON]
                        .iter()
                        .all(|r| t.allocatable.get(r) == 0 || advertised(r) >= t.allocatable.get(r))
                });
                if ready && devices_ok {
                    if let Some(p) = pool
                        && !p.startup_taints.is_empty()
                    {
                        let taints: Vec<serde_json::Value> = node
                            .spec
                            .as_ref()
                            .and_then(|s| s.taints.clone())
                            .unwrap_or_default()
                            .into_iter()
                            .filter(|t| {
                                !p.startup_taints.iter().any(|s| {
                                    s.key == t.key && format!("{:?}", s.effect) == t.effect
                                })
                            })
                            .map(|t| serde_json::to_value(t).unwrap_or_default())
                            .collect();
                        nodes_api
                            .patch(
                                &node_name,
                                &PatchParams::default(),
                                &Patch::Merge(&json!({"spec": {"taints": taints}})),
                            )
                            .await?;
                    }
                    set_condition(
                        &mut status.conditions,
                        Condition::new(
                            "Initialized",
                            true,
                            "Initialized",
                            "node ready with its devices advertised",
                        ),
                    );
                    changed = true;
                    info!(nodeclaim = %name, node = %node_name, "initialised");
                }
            }
            if changed {
                patch_claim_status(&claims, &name, &status).await?;
            }
        }
        Ok(())
    }

    /// The pods cooper should provision for, parsed (bad ones reported and skipped).
    async fn pending_pods(&self, report: bool) -> Vec<(Arc<Pod>, PendingPod)> {
        let mut out = Vec::new();
        for pod in self.stores.pods.state() {
            if !provisionable(&pod, &self.settings.scheduler_names) {
                continue;
            }
            match pod_demand(&pod) {
                Ok(Some(p)) => out.push((pod, p)),
                Ok(None) => {}
                Err(message) => {
                    warn!(pod = %pod.name_any(), %message, "cannot read pod");
                    if report {
                        self.event(&*pod, "Warning", "InvalidPod", &message).await;
                    }
                }
            }
        }
        out
    }

    fn daemonsets(&self) -> Vec<DaemonSetOverhead> {
        let mut out = Vec::new();
        for ds in self.stores.daemonsets.state() {
            let Ok(mut doc) = as_document(&*ds) else {
                continue;
            };
            if let Some(o) = doc.value.as_object_mut() {
                o.insert("kind".into(), "DaemonSet".into());
                o.insert("apiVersion".into(), "apps/v1".into());
            }
            match workload::from_documents(std::slice::from_ref(&doc)) {
                Ok(w) => out.extend(w.daemonsets),
                Err(e) => warn!(daemonset = %ds.name_any(), error = %e, "cannot read DaemonSet"),
            }
        }
        out
    }

    /// Existing nodes' free room and in-flight claims, for the planner.
    fn existing_nodes(&self, daemonsets: &[DaemonSetOverhead]) -> Vec<ExistingNode> {
        let mut requested: HashMap<String, Resources> = HashMap::new();
        for pod in self.stores.pods.state() {
            let Some(node) = holding_node(&pod) else {
                continue;
            };
            if let Some(spec) = &pod.spec
                && let Ok(r) = workload::effective_requests(spec)
            {
                let e = requested.entry(node).or_default();
                *e = e.plus(&r);
            }
        }
        let mut out = Vec::new();
        let mut registered = BTreeSet::new();
        // Nodes whose claim is not initialised yet are counted like in-flight launches
        // (their devices may not be advertised yet), below.
        let uninitialised: BTreeSet<String> = self
            .stores
            .nodeclaims
            .state()
            .iter()
            .filter(|c| claim_condition(c, "Initialized").is_none())
            .filter_map(|c| c.status.as_ref()?.node_name.clone())
            .collect();
        for node in self.stores.nodes.state() {
            let name = node.name_any();
            if uninitialised.contains(&name) {
                continue;
            }
            registered.insert(name.clone());
            let labels: BTreeMap<String, String> = node.labels().clone();
            let taints: Vec<Taint> = node
                .spec
                .as_ref()
                .and_then(|s| s.taints.clone())
                .unwrap_or_default()
                .into_iter()
                .filter_map(|t| {
                    serde_json::from_value(
                        json!({"key": t.key, "value": t.value, "effect": t.effect}),
                    )
                    .ok()
                })
                .collect();
            let allocatable = quantities(node.status.as_ref().and_then(|s| s.allocatable.as_ref()));
            let capacity = quantities(node.status.as_ref().and_then(|s| s.capacity.as_ref()));
            let unschedulable = node
                .spec
                .as_ref()
                .and_then(|s| s.unschedulable)
                .unwrap_or(false);
            out.push(ExistingNode {
                name: name.clone(),
                nodepool: labels.get(keys::NODEPOOL).cloned(),
                labels,
                taints,
                allocatable: if unschedulable {
                    Resources::new()
                } else {
                    allocatable
                },
                capacity,
                requested: requested.remove(&name).unwrap_or_default(),
                in_flight: false,
            });
        }
        // Claims whose node has not registered: their offering's allocatable, DaemonSets only.
        for claim in self.stores.nodeclaims.state() {
            if claim.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let status = claim.status.clone().unwrap_or_default();
            if status
                .node_name
                .as_ref()
                .is_some_and(|n| registered.contains(n))
            {
                continue;
            }
            let Some(o) = claim.spec.offerings.first() else {
                continue;
            };
            let Some(t) = self
                .catalog
                .instance_type(status.instance_type.as_deref().unwrap_or(&o.instance_type))
            else {
                continue;
            };
            let mut labels = t.labels.clone();
            labels.insert(
                keys::ZONE.into(),
                status.zone.clone().unwrap_or_else(|| o.zone.clone()),
            );
            labels.insert(
                keys::CAPACITY_TYPE.into(),
                status
                    .capacity_type
                    .clone()
                    .unwrap_or_else(|| o.capacity_type.clone()),
            );
            labels.insert(keys::NODEPOOL.into(), claim.spec.node_pool.clone());
            let pool = self
                .stores
                .nodepools
                .state()
                .into_iter()
                .find(|p| p.name_any() == claim.spec.node_pool);
            let pool = pool.and_then(|p| NodePool::from_spec(&p.name_any(), &p.spec).ok());
            let taints = pool.as_ref().map(|p| p.taints.clone()).unwrap_or_default();
            if let Some(p) = &pool {
                labels.extend(p.labels.clone());
            }
            let mut used = planner::daemonset_overhead(daemonsets, &labels, &taints);
            if let Some(node) = &status.node_name {
                // Registered but not initialised: pods may already be bound to it.
                used = used.plus(&requested.remove(node).unwrap_or_default());
            }
            out.push(ExistingNode {
                name: claim.name_any(),
                nodepool: Some(claim.spec.node_pool.clone()),
                labels,
                taints,
                allocatable: t.allocatable.clone(),
                capacity: t.capacity.clone(),
                requested: used,
                in_flight: true,
            });
        }
        out
    }

    /// The plan for these pending pods given the current cluster (pure: no writes).
    /// The plan, and for each planned node its offerings: the chosen one first, then
    /// the fallbacks the cloud may launch instead (see [`planner::fallback_offerings`]).
    fn plan_for(
        &self,
        pools: &[NodePool],
        pending: &[(Arc<Pod>, PendingPod)],
    ) -> (planner::Plan, Vec<Vec<ClaimOffering>>) {
        let unavailable: BTreeSet<OfferingKey> = self.unavailable.keys().cloned().collect();
        let daemonsets = self.daemonsets();
        let existing = self.existing_nodes(&daemonsets);
        let pods: Vec<PendingPod> = pending.iter().map(|(_, p)| p.clone()).collect();
        let gangs = Gang::of_pending(&pods);
        let input = PlanInput {
            pods: &pods,
            pools,
            catalog: &self.catalog,
            daemonsets: &daemonsets,
            gangs: &gangs,
            nodes: &existing,
            unavailable: &unavailable,
        };
        let options = PlanOptions {
            strategy: self.settings.strategy,
            time_limit: self.settings.time_limit,
            relative_gap: 0.01,
        };
        let plan = {
            let _span = info_span!("plan", pods = pods.len()).entered();
            planner::plan(input, &options)
        };
        info!(
            pods = pods.len(),
            nodes = plan.nodes.len(),
            unschedulable = plan.unschedulable.len(),
            price = plan.total_price_per_hour,
            ms = plan.solve_ms,
            "planned"
        );
        let offerings = plan
            .nodes
            .iter()
            .map(|node| {
                let chosen = ClaimOffering {
                    instance_type: node.instance_type.clone(),
                    zone: node.zone.clone(),
                    capacity_type: node.capacity_type.as_str().to_string(),
                    price_per_hour: node.price_per_hour,
                };
                std::iter::once(chosen)
                    .chain(
                        planner::fallback_offerings(
                            &input,
                            &plan,
                            node,
                            self.settings.max_fallbacks,
                            FALLBACK_PRICE_RATIO,
                        )
                        .into_iter()
                        .map(|(key, price)| ClaimOffering {
                            instance_type: key.instance_type,
                            zone: key.zone,
                            capacity_type: key.capacity_type.as_str().to_string(),
                            price_per_hour: price,
                        }),
                    )
                    .collect()
            })
            .collect();
        (plan, offerings)
    }

    /// What the controller would launch right now, without writing anything
    /// (`cooper plan --live`).
    pub async fn plan_now(&self) -> planner::Plan {
        let pending = self.pending_pods(false).await;
        self.plan_for(&self.readable_pools(), &pending).0
    }

    /// The NodePools whose specs read (without reporting the others: for read-only views).
    fn readable_pools(&self) -> Vec<NodePool> {
        self.stores
            .nodepools
            .state()
            .iter()
            .filter_map(|np| NodePool::from_spec(&np.name_any(), &np.spec).ok())
            .collect()
    }

    /// Plan for provisionable pods when the batching window closes, and create claims.
    async fn provision(&mut self, pools: &[NodePool]) -> Result<(), Error> {
        let pending = self.pending_pods(true).await;
        self.metrics.pending_pods.set(pending.len() as i64);
        if !self.batcher.observe(now(), pending.len()) {
            return Ok(());
        }
        let at = now();
        self.unavailable.retain(|_, until| *until > at);
        let fingerprint = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            for (pod, _) in &pending {
                pod.metadata.uid.hash(&mut h);
            }
            for c in self.stores.nodeclaims.state() {
                (c.name_any(), c.resource_version()).hash(&mut h);
            }
            for n in self.stores.nodes.state() {
                (n.name_any(), n.resource_version()).hash(&mut h);
            }
            self.unavailable.len().hash(&mut h);
            h.finish()
        };
        if self
            .last_plan
            .is_some_and(|(f, t)| f == fingerprint && at.saturating_sub(t) < REPLAN_UNCHANGED)
        {
            return Ok(());
        }
        self.last_plan = Some((fingerprint, at));
        let (plan, claim_offerings) = self.plan_for(pools, &pending);
        self.metrics.plan_duration.observe(plan.solve_ms / 1000.0);
        let claims: Api<NodeClaim> = Api::all(self.client.clone());
        let by_key: HashMap<String, &Arc<Pod>> =
            pending.iter().map(|(k8s, p)| (p.key(), k8s)).collect();
        for (index, planned) in plan.nodes.iter().enumerate() {
            self.next_id = self
                .next_id
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let name = format!("{}-{:08x}", planned.nodepool, self.next_id >> 32);
            let spec = NodeClaimSpec {
                node_pool: planned.nodepool.clone(),
                requirements: Vec::new(),
                offerings: claim_offerings.get(index).cloned().unwrap_or_default(),
                resources: planned.requested.to_quantities(),
                pods: planned.pods.clone(),
            };
            let mut claim = NodeClaim::new(&name, spec);
            claim.metadata.finalizers = Some(vec![TERMINATION_FINALIZER.into()]);
            claim.metadata.labels = Some(BTreeMap::from([(
                keys::NODEPOOL.to_string(),
                planned.nodepool.clone(),
            )]));
            claim.status = Some(NodeClaimStatus::default());
            let created = claims.create(&PostParams::default(), &claim).await?;
            info!(nodeclaim = %name, instance_type = %planned.instance_type, zone = %planned.zone, capacity = %planned.capacity_type, pods = planned.pods.len(), "nodeclaim created");
            for key in &planned.pods {
                if let Some(pod) = by_key.get(key) {
                    self.event(
                        &***pod,
                        "Normal",
                        "Nominated",
                        &format!(
                            "pod will be placed on NodeClaim {name} ({} {} {})",
                            planned.instance_type, planned.zone, planned.capacity_type
                        ),
                    )
                    .await;
                }
            }
            let pool = pools.iter().find(|p| p.name == planned.nodepool);
            self.launch(&created, pool).await?;
        }
        for u in &plan.unschedulable {
            if let Some(pod) = by_key.get(&u.pod) {
                self.event(&***pod, "Warning", "FailedProvisioning", &u.reason)
                    .await;
            }
        }
        Ok(())
    }

    /// Empty nodes past their pool's TTL: cordon, mark the claim Terminating, delete it
    /// (its finalizer terminates the instance and deletes the Node).
    async fn remove_empty_nodes(&mut self, pools: &[NodePool]) -> Result<(), Error> {
        let claims: Api<NodeClaim> = Api::all(self.client.clone());
        let nodes_api: Api<Node> = Api::all(self.client.clone());
        let mut busy: HashMap<String, usize> = HashMap::new();
        for pod in self.stores.pods.state() {
            let Some(node) = holding_node(&pod) else {
                continue;
            };
            if !is_node_agent(&pod) {
                *busy.entry(node).or_default() += 1;
            }
        }
        let nodes: HashMap<String, Arc<Node>> = self
            .stores
            .nodes
            .state()
            .into_iter()
            .map(|n| (n.name_any(), n))
            .collect();
        // Pods still waiting for the node they were planned onto keep it from being empty.
        let waiting: BTreeSet<String> = self
            .stores
            .pods
            .state()
            .iter()
            .filter(|p| {
                p.spec.as_ref().is_some_and(|s| s.node_name.is_none())
                    && p.metadata.deletion_timestamp.is_none()
            })
            .map(|p| format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any()))
            .collect();
        let mut states = Vec::new();
        for claim in self.stores.nodeclaims.state() {
            let name = claim.name_any();
            let Some(status) = claim.status.clone() else {
                continue;
            };
            let Some(node_name) = status.node_name.clone() else {
                continue;
            };
            let Some(node) = nodes.get(&node_name) else {
                continue;
            };
            if claim_condition(&claim, "Initialized").is_none() {
                continue;
            }
            let nominated = claim.spec.pods.iter().any(|p| waiting.contains(p));
            let empty = busy.get(&node_name).copied().unwrap_or(0) == 0 && !nominated;
            let mut status = status;
            let since = match (empty, claim_condition(&claim, "Empty")) {
                (true, Some(c)) => c.last_transition_time.and_then(|t| parse_time(&t)),
                (true, None) => {
                    set_condition(
                        &mut status.conditions,
                        Condition::new(
                            "Empty",
                            true,
                            "Empty",
                            "no pods other than DaemonSet and mirror pods",
                        ),
                    );
                    patch_claim_status(&claims, &name, &status).await?;
                    Some(now())
                }
                (false, Some(_)) => {
                    set_condition(
                        &mut status.conditions,
                        Condition::new("Empty", false, "NotEmpty", ""),
                    );
                    patch_claim_status(&claims, &name, &status).await?;
                    None
                }
                (false, None) => None,
            };
            states.push(NodeState {
                name: name.clone(),
                nodepool: claim.spec.node_pool.clone(),
                empty_since: since,
                do_not_disrupt: node
                    .annotations()
                    .get(DO_NOT_DISRUPT)
                    .is_some_and(|v| v == "true")
                    || claim
                        .annotations()
                        .get(DO_NOT_DISRUPT)
                        .is_some_and(|v| v == "true"),
                disrupting: claim.metadata.deletion_timestamp.is_some(),
            });
        }
        for name in disruption::expired_empty_nodes(&states, pools, now()) {
            let Some(claim) = self
                .stores
                .nodeclaims
                .state()
                .into_iter()
                .find(|c| c.name_any() == name)
            else {
                continue;
            };
            let Some(node_name) = claim.status.as_ref().and_then(|s| s.node_name.clone()) else {
                continue;
            };
            // Re-check against the latest pods right before acting: never under a running pod.
            let pods: Api<Pod> = Api::all(self.client.clone());
            let on_node = pods
                .list(&ListParams::default().fields(&format!("spec.nodeName={node_name}")))
                .await?;
            let still_empty = on_node.items.iter().all(|p| {
                is_node_agent(p)
                    || matches!(
                        p.status.as_ref().and_then(|s| s.phase.as_deref()),
                        Some("Succeeded" | "Failed")
                    )
            });
            if !still_empty {
                continue;
            }
            nodes_api
                .patch(
                    &node_name,
                    &PatchParams::default(),
                    &Patch::Merge(&json!({"spec": {"unschedulable": true}})),
                )
                .await?;
            set_claim_condition(
                &claims,
                &claim,
                Condition::new(
                    "Terminating",
                    true,
                    "Empty",
                    "empty past the NodePool's TTL",
                ),
            )
            .await?;
            delete_claim(&claims, &name).await?;
            info!(nodeclaim = %name, node = %node_name, "removing empty node");
        }
        Ok(())
    }
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
fn holding_node(pod: &Pod) -> Option<String> {
    let node = pod.spec.as_ref()?.node_name.clone()?;
    let finished = matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    );
    (!finished).then_some(node)
}

/// Write a NodeClaim's status (merge patch on the status subresource).
/// Set one condition on a claim's status (as it is in `claim`) and write it.
async fn set_claim_condition(
    claims: &Api<NodeClaim>,
    claim: &NodeClaim,
    condition: Condition,
) -> Result<(), kube::Error> {
    let mut status = claim.status.clone().unwrap_or_default();
    set_condition(&mut status.conditions, condition);
    patch_claim_status(claims, &claim.name_any(), &status).await
}

/// Delete a claim (its finalizer then terminates the instance); already gone is fine.
async fn delete_claim(claims: &Api<NodeClaim>, name: &str) -> Result<(), kube::Error> {
    match claims.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

async fn patch_claim_status(
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

fn taint_json(t: &Taint) -> serde_json::Value {
    let mut v = json!({"key": t.key, "effect": format!("{:?}", t.effect)});
    if let Some(value) = &t.value {
        v["value"] = json!(value);
    }
    v
}

/// Run as one of several replicas: keep the caches warm, act only while holding the
/// lease, stop acting the moment it is lost, campaign again. Returns on `shutdown`.
/// `controller` builds a fresh controller over the shared caches each time the
/// lease is won, so nothing from a previous term (batches, backoffs) carries over.
pub async fn run_elected<C: CloudProvider + Send + Sync + 'static>(
    client: Client,
    lease: leader::LeaseSettings,
    metrics: Arc<metrics::Metrics>,
    controller: impl Fn(Stores) -> Controller<C>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let stores = start_reflectors(&client).await;
    metrics
        .ready
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let mut leading = leader::LeaderElector::new(client.clone(), lease).spawn();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            _ = leader::elected(&mut leading) => {}
        }
        info!("leading: acting");
        let acting = controller(stores.clone()).with_metrics(metrics.clone());
        tokio::select! {
            _ = &mut shutdown => return,
            _ = acting.run(leader::lost(leading.clone())) => {}
        }
        info!("not leading: stopped acting");
    }
}
