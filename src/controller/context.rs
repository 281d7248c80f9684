//! The cluster-state model the reconcilers share: the reflector caches, the catalog and
//! valid NodePools of the moment, and what the controller itself remembers between
//! passes (offerings that failed for capacity, per-claim launch backoff, pods nominated to
//! nodes). Locks are never held across an await.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use tracing::{Instrument, info, info_span, warn};

use super::{Settings, Stores, claim_condition, metrics, now, parse_time};
use crate::catalog::{CapacityType, Catalog};
use crate::cloud::{CloudError, CloudProvider, Instance};
use crate::nodepool::NodePool;
use crate::planner::OfferingKey;

/// A pod planned onto a node (a new claim, an in-flight claim or an existing Node): the
/// scheduler is left to bind it there for a while before it is planned again.
#[derive(Debug, Clone, PartialEq)]
pub struct Nomination {
    /// The NodeClaim or Node name the plan placed the pod on.
    pub target: String,
    /// When the plan was made.
    pub at: Duration,
    /// The scheduler's message on the pod when the target was first seen ready: a
    /// different "0/N nodes are available" message later means the scheduler tried again
    /// with the target ready and refused.
    pub ready_message: Option<String>,
}

impl Nomination {
    pub fn new(target: impl Into<String>, at: Duration) -> Self {
        Nomination {
            target: target.into(),
            at,
            ready_message: None,
        }
    }
}

/// Per-claim launch retry state.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    pub attempts: u32,
    pub next: Duration,
}

/// What the controller remembers between passes (lost on restart or failover, and
/// rebuilt from the objects where it matters).
#[derive(Debug, Default)]
pub struct State {
    /// Offerings that failed for capacity (or were reclaimed), avoided until then.
    pub unavailable: BTreeMap<OfferingKey, Duration>,
    /// Claims whose launch failed: when to try again.
    pub launch_backoff: HashMap<String, Backoff>,
    /// Pods (`namespace/name`) planned onto a node.
    pub nominations: HashMap<String, Nomination>,
    /// Nominations that ran out while the pod was still pending (pod → targets), so the
    /// next plan does not count on that room again.
    pub refused: HashMap<String, BTreeSet<String>>,
    /// Bumped whenever a nomination ends without its pod bound (the target failed, or
    /// the grace ran out): the cluster may look as it did at the last plan, but the pods
    /// need planning again.
    pub nominations_dropped: u64,
    /// Claims this controller created, and when: a claim the watch has not delivered yet
    /// still counts as a target (or the pods nominated to it would be planned twice).
    pub created: HashMap<String, Duration>,
    /// Each NodeClass as the cloud last resolved it (spec, resolution): what launches use,
    /// so the drift hash a launch records and the one compared later come from the same
    /// source, never from a cache that has not caught up.
    pub resolved_classes: HashMap<String, (crate::crd::NodeClassSpec, crate::crd::NodeClassStatus)>,
    /// When consolidation last acted on each pool: the pool must be stable for its
    /// `consolidateAfter` again before the next move (no flapping).
    pub consolidated_at: HashMap<String, Duration>,
    /// The cluster as consolidation last looked at it (a fingerprint of claims, nodes and
    /// bound pods) and when: an unchanged cluster is not re-planned more often than
    /// [`super::consolidation::RECHECK_UNCHANGED`].
    pub consolidation_checked: Option<(u64, Duration)>,
}

/// Everything the reconcilers share.
pub struct Context<C> {
    pub client: Client,
    pub cloud: Arc<C>,
    pub settings: Settings,
    pub stores: Stores,
    pub metrics: Arc<metrics::Metrics>,
    catalog: RwLock<Arc<Catalog>>,
    /// The NodePools that validated on the last configuration pass (None before it).
    pools: RwLock<Option<Vec<NodePool>>>,
    state: Mutex<State>,
    /// Events recorded recently, by what they say about which object: a repeat within
    /// [`EVENT_SERIES_WINDOW`] bumps the existing Event's count instead of creating
    /// another (one re-planned pod wrote six `FailedProvisioning` Events in 30 s).
    recorded_events: Mutex<HashMap<EventKey, RecordedEvent>>,
}

/// (namespace, kind, name, uid, type, reason, message) of an Event.
type EventKey = (String, String, String, String, String, String, String);

struct RecordedEvent {
    /// The Event object's name.
    name: String,
    count: u32,
    last: Duration,
}

/// How long an Event stays one series (client-go's correlator uses 10 minutes).
pub const EVENT_SERIES_WINDOW: Duration = Duration::from_secs(600);

impl<C: CloudProvider + Send + Sync + 'static> Context<C> {
    pub fn new(
        client: Client,
        cloud: Arc<C>,
        catalog: Arc<Catalog>,
        settings: Settings,
        stores: Stores,
        metrics: Arc<metrics::Metrics>,
    ) -> Self {
        Context {
            client,
            cloud,
            settings,
            stores,
            metrics,
            catalog: RwLock::new(catalog),
            pools: RwLock::new(None),
            state: Mutex::new(State::default()),
            recorded_events: Mutex::new(HashMap::new()),
        }
    }

    /// The catalog the controller plans with now.
    pub fn catalog(&self) -> Arc<Catalog> {
        match self.catalog.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub(crate) fn set_catalog(&self, catalog: Arc<Catalog>) {
        match self.catalog.write() {
            Ok(mut c) => *c = catalog,
            Err(poisoned) => *poisoned.into_inner() = catalog,
        }
    }

    /// The valid NodePools (None until the configuration reconciler has run once).
    pub fn pools(&self) -> Option<Vec<NodePool>> {
        match self.pools.read() {
            Ok(p) => p.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub(crate) fn set_pools(&self, pools: Vec<NodePool>) {
        match self.pools.write() {
            Ok(mut p) => *p = Some(pools),
            Err(poisoned) => *poisoned.into_inner() = Some(pools),
        }
    }

    /// The NodePools whose specs read (without reporting the others: for read-only views),
    /// as the controller plans with them.
    pub fn readable_pools(&self) -> Vec<NodePool> {
        self.stores
            .nodepools
            .state()
            .iter()
            .filter_map(|np| NodePool::from_spec(&np.name_any(), &np.spec).ok())
            .map(|pool| self.as_launched(pool))
            .collect()
    }

    /// A pool as its NodeClass lets it launch: the instance types it has images for,
    /// the zones its subnets are in (a zone without a subnet is never planned: the launch
    /// could not go there), and what its nodes are billed besides the instance.
    pub(crate) fn as_launched(&self, mut pool: NodePool) -> NodePool {
        pool.unlaunchable = self.unlaunchable(pool.node_class.as_deref());
        pool.billing = self.billing(pool.node_class.as_deref());
        if let Some(zones) = self.subnet_zones(pool.node_class.as_deref())
            && let Ok(r) = crate::labels::Requirement::new(
                crate::labels::keys::ZONE,
                crate::labels::Operator::In,
                zones,
            )
        {
            pool.requirements.push(r);
        }
        pool
    }

    /// The zones of a NodeClass's resolved subnets; `None` when it resolved none (the
    /// in-process cloud's): no restriction.
    pub(crate) fn subnet_zones(&self, class: Option<&str>) -> Option<Vec<String>> {
        let class = self
            .stores
            .nodeclasses
            .get(&kube::runtime::reflector::ObjectRef::new(class?))?;
        let zones: std::collections::BTreeSet<String> = class
            .status
            .as_ref()?
            .subnets
            .iter()
            .map(|s| s.zone.clone())
            .collect();
        (!zones.is_empty()).then(|| zones.into_iter().collect())
    }

    /// The catalog's instance types a NodeClass has no image for (by architecture and
    /// accelerator: standard, NVIDIA, Neuron, or an explicit image for any). A NodeClass
    /// that resolved no images (the in-process cloud's) restricts nothing.
    pub(crate) fn unlaunchable(&self, class: Option<&str>) -> std::collections::BTreeSet<String> {
        let Some(class) = class else {
            return Default::default();
        };
        let Some(status) = self
            .stores
            .nodeclasses
            .get(&kube::runtime::reflector::ObjectRef::new(class))
            .and_then(|c| c.status.clone())
        else {
            return Default::default();
        };
        if status.amis.is_empty() {
            return Default::default();
        }
        self.catalog()
            .types
            .iter()
            .filter(|t| crate::aws::nodeclass::ami_for(&status.amis, t).is_none())
            .map(|t| t.name().to_string())
            .collect()
    }

    /// What a NodeClass's nodes are billed besides the instance: its block devices,
    /// a public address when it asks for one or its subnets assign one, its per-node
    /// cost. A class not (yet) in the cache bills like the AL2023 default.
    pub(crate) fn billing(&self, class: Option<&str>) -> crate::catalog::NodeBilling {
        let Some(class) = class.and_then(|c| {
            self.stores
                .nodeclasses
                .get(&kube::runtime::reflector::ObjectRef::new(c))
        }) else {
            return Default::default();
        };
        let public = class
            .status
            .as_ref()
            .is_some_and(|s| s.subnets.iter().any(|s| s.public_ipv4));
        class.spec.billing(public)
    }

    /// The cluster's PersistentVolumes, claims and StorageClasses, for volume topology.
    pub fn volumes(&self) -> crate::scheduling::Volumes {
        let mut out = crate::scheduling::Volumes {
            complete: true,
            ..Default::default()
        };
        let add = |out: &mut crate::scheduling::Volumes,
                   kind: &str,
                   v: serde_json::Result<serde_json::Value>| {
            if let Ok(v) = v {
                let _ = out.add(kind, &v);
            }
        };
        for o in self.stores.volumes.state() {
            add(&mut out, "PersistentVolume", serde_json::to_value(&*o));
        }
        for o in self.stores.volume_claims.state() {
            add(&mut out, "PersistentVolumeClaim", serde_json::to_value(&*o));
        }
        for o in self.stores.storage_classes.state() {
            add(&mut out, "StorageClass", serde_json::to_value(&*o));
        }
        out
    }

    /// Pods bound to nodes, as the scheduling constraints see them.
    pub fn running_pods(&self) -> Vec<crate::scheduling::PlacedPod> {
        self.stores
            .pods
            .state()
            .iter()
            .filter_map(|p| super::placed_pod(p))
            .collect()
    }

    /// The shared state (never hold the guard across an await).
    pub(crate) fn state(&self) -> MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Avoid an offering for `unavailable_for`.
    pub(crate) fn mark_unavailable(&self, instance_type: &str, zone: &str, capacity: CapacityType) {
        let until = now() + self.settings.unavailable_for;
        self.state().unavailable.insert(
            OfferingKey {
                instance_type: instance_type.to_string(),
                zone: zone.to_string(),
                capacity_type: capacity,
            },
            until,
        );
    }

    /// Count a failed cloud call by operation and kind.
    pub(crate) fn cloud_error(&self, operation: &str, e: &CloudError) {
        let kind = match e {
            CloudError::InsufficientCapacity { .. } => "insufficient_capacity",
            CloudError::NotFound(_) => "not_found",
            CloudError::Permanent(_) => "permanent",
            CloudError::Refused(_) => "refused",
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

    /// Run a cloud call with the controller's deadline ([`Settings::cloud_timeout`]); a
    /// call that runs out is a transient error (its outcome unknown).
    pub(crate) async fn cloud_call<T>(
        &self,
        operation: &'static str,
        call: impl std::future::Future<Output = Result<T, CloudError>>,
    ) -> Result<T, CloudError> {
        let result = match tokio::time::timeout(
            self.settings.cloud_timeout,
            call.instrument(info_span!("cloud", operation)),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(CloudError::Transient(format!(
                "{operation} did not answer within {} s",
                self.settings.cloud_timeout.as_secs()
            ))),
        };
        if let Err(e) = &result {
            self.cloud_error(operation, e);
        }
        result
    }

    /// Record a Kubernetes Event about an object (best effort).
    pub(crate) async fn event<K: kube::Resource<DynamicType = ()>>(
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
        let key: EventKey = (
            ns.clone(),
            K::kind(&()).to_string(),
            obj.meta().name.clone().unwrap_or_default(),
            obj.meta().uid.clone().unwrap_or_default(),
            type_.to_string(),
            reason.to_string(),
            message.to_string(),
        );
        let at = now();
        // A repeat within the window: one Event, its count and last time bumped.
        let repeat = {
            let mut recorded = match self.recorded_events.lock() {
                Ok(r) => r,
                Err(poisoned) => poisoned.into_inner(),
            };
            recorded.retain(|_, e| at.saturating_sub(e.last) < EVENT_SERIES_WINDOW);
            recorded.get_mut(&key).map(|e| {
                e.count += 1;
                e.last = at;
                (e.name.clone(), e.count)
            })
        };
        if let Some((name, count)) = repeat {
            let patch = json!({"count": count, "lastTimestamp": crate::crd::now_rfc3339()});
            match api
                .patch(
                    &name,
                    &kube::api::PatchParams::default(),
                    &kube::api::Patch::Merge(&patch),
                )
                .await
            {
                Ok(_) => return,
                // Gone (expired, deleted): record it afresh below.
                Err(err) => {
                    tracing::debug!(error = %err, event = %name, "could not update event; recording a new one");
                }
            }
        }
        let name = format!(
            "{}.{:x}",
            obj.meta().name.clone().unwrap_or_default(),
            at.as_nanos()
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
            Ok(e) => match api.create(&PostParams::default(), &e).await {
                Ok(_) => {
                    let mut recorded = match self.recorded_events.lock() {
                        Ok(r) => r,
                        Err(poisoned) => poisoned.into_inner(),
                    };
                    recorded.insert(
                        key,
                        RecordedEvent {
                            name,
                            count: 1,
                            last: at,
                        },
                    );
                }
                Err(err) => warn!(error = %err, "could not record event"),
            },
            Err(err) => warn!(error = %err, "could not build event"),
        }
    }

    /// Tell the cloud about the instances the cluster's NodeClaims record, so a cloud
    /// that keeps no state of its own (the in-process one, after a failover or restart)
    /// knows them and its listings show them.
    pub(crate) async fn adopt_recorded_instances(&self) {
        let recorded: Vec<Instance> = self
            .stores
            .nodeclaims
            .state()
            .iter()
            .filter_map(|c| {
                let s = c.status.as_ref()?;
                Some(Instance {
                    id: s.instance_id.clone()?,
                    claim: c.name_any(),
                    nodepool: c.spec.node_pool.clone(),
                    instance_type: s.instance_type.clone().unwrap_or_default(),
                    zone: s.zone.clone().unwrap_or_default(),
                    capacity_type: if s.capacity_type.as_deref() == Some("spot") {
                        CapacityType::Spot
                    } else {
                        CapacityType::OnDemand
                    },
                    price_per_hour: s.price_per_hour.unwrap_or(0.0),
                })
            })
            .collect();
        if !recorded.is_empty() {
            info!(
                instances = recorded.len(),
                "adopting the instances the NodeClaims record"
            );
        }
        self.cloud.adopt(&recorded).await;
    }

    /// Nominations the claims imply (the pods each was planned for), for a controller
    /// that has just started: a pod waits for the claim it was planned onto, not for a
    /// second launch. The nomination time is when the claim became initialised (or was
    /// created).
    pub(crate) fn nominations_from_claims(&self) {
        let claims = self.stores.nodeclaims.state();
        let mut state = self.state();
        for claim in claims {
            if claim.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let at = claim_condition(&claim, "Initialized")
                .and_then(|c| c.last_transition_time)
                .and_then(|t| parse_time(&t))
                .or_else(|| {
                    claim.metadata.creation_timestamp.as_ref().and_then(|t| {
                        Duration::try_from(
                            t.0.duration_since(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
                        )
                        .ok()
                    })
                })
                .unwrap_or_else(now);
            for pod in &claim.spec.pods {
                state
                    .nominations
                    .entry(pod.clone())
                    .or_insert_with(|| Nomination::new(claim.name_any(), at));
            }
        }
    }
}
