//! The NodeClaim lifecycle reconciler: one worker per claim, many claims at once (bounded
//! by [`Settings::max_claim_workers`]), so a slow or failing cloud call holds up only its
//! own claim. The dispatcher looks at every claim each tick and starts the step that is
//! due, unless a worker is already on that claim:
//!
//! - **launch** a claim without an instance: idempotent twice over — the cloud is asked
//!   with a ClientToken derived from the claim's uid and launch attempt (a repeated call
//!   returns the first call's instance), and looks the claim's instance up by tag first;
//!   the attempt number moves on only after a definite failure;
//! - **register** the Node whose provider ID is the claim's (labels, taints);
//! - **initialise** it once it is Ready with its GPUs / Neuron devices advertised
//!   (startup taints removed);
//! - give up on a claim whose node has not **registered** in time;
//! - **delete** a claim the cloud has interrupted ([`super::interruption`]) whose
//!   deletion a predecessor recorded but did not make;
//! - **terminate** a claim being deleted: its node drained ([`super::termination`]),
//!   every instance it launched terminated, its Node deleted, then the finalizers
//!   released.
//!
//! [`Settings::max_claim_workers`]: super::Settings::max_claim_workers

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use serde_json::json;
use tracing::{Instrument, info, info_span, warn};

use super::context::Backoff;
use super::{
    AbortOnDrop, Context, Error, NODECLAIM_LABEL, Reconciler, TERMINATION_FINALIZER,
    claim_condition, claim_node_name, delete_claim, interruption, metrics, node_ready, now,
    parse_time, patch_claim_status, taint_json, termination,
};
use crate::catalog::CapacityType;
use crate::cloud::{CloudError, CloudProvider, LaunchRequest};
use crate::crd::{Condition, NodeClaim, set_condition};
use crate::labels::keys;
use crate::nodepool::NodePool;
use crate::resources;

/// What a claim needs next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Step {
    Launch,
    Register,
    Initialise,
    /// Planned pods nominated to the registered node again (see `nomination_lost`).
    Nominate,
    RegistrationTimeout,
    Drain,
    Terminate,
}

/// A step a worker finished, on the claim as it was then: the same step on the same
/// version of the claim is not started again until the cache shows the worker's writes
/// (or [`REVISIT`] has passed).
type Worked = Arc<Mutex<HashMap<String, (Step, String, Instant)>>>;

/// Nomination patches in flight at once for one node.
const NOMINATIONS_AT_ONCE: usize = 16;

/// How soon a step that wrote nothing may run again on an unchanged claim.
const REVISIT: Duration = Duration::from_secs(2);

#[derive(Default)]
pub(super) struct Dispatcher {
    workers: HashMap<String, AbortOnDrop>,
    worked: Worked,
    permits: Option<Arc<tokio::sync::Semaphore>>,
}

impl<C: CloudProvider + Send + Sync + 'static> Reconciler<C> for Dispatcher {
    async fn reconcile(&mut self, ctx: &Arc<Context<C>>) -> Result<(), Error> {
        let permits = self
            .permits
            .get_or_insert_with(|| {
                Arc::new(tokio::sync::Semaphore::new(
                    ctx.settings.max_claim_workers.max(1),
                ))
            })
            .clone();
        self.workers.retain(|_, w| !w.0.is_finished());
        let nodes: HashMap<String, Arc<Node>> = ctx
            .stores
            .nodes
            .state()
            .into_iter()
            .filter_map(|n| Some((n.spec.as_ref()?.provider_id.clone()?, n)))
            .collect();
        let known_pools = ctx.pools();
        let pools = known_pools.clone().unwrap_or_default();
        let claims = ctx.stores.nodeclaims.state();
        release_deleted_nodes(ctx, &claims).await?;
        {
            let mut worked = self.worked.lock().unwrap_or_else(|p| p.into_inner());
            worked.retain(|name, _| claims.iter().any(|c| &c.name_any() == name));
        }
        for claim in claims {
            let name = claim.name_any();
            if self.workers.contains_key(&name) {
                continue;
            }
            let Some(step) = ctx.next_step(&claim, &nodes) else {
                continue;
            };
            // Launch only with the claim's pool validated (and its NodeClass resolved): a
            // replica that has just started leading waits for its first configuration
            // pass instead of failing the launch.
            if step == Step::Launch
                && !known_pools
                    .as_ref()
                    .is_some_and(|p| p.iter().any(|p| p.name == claim.spec.node_pool))
            {
                continue;
            }
            let rv = claim.resource_version().unwrap_or_default();
            let recent = self
                .worked
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&name)
                .is_some_and(|(s, v, at)| *s == step && *v == rv && at.elapsed() < REVISIT);
            if recent {
                continue;
            }
            let node = claim
                .status
                .as_ref()
                .and_then(|s| s.provider_id.as_ref())
                .and_then(|p| nodes.get(p))
                .cloned();
            let pool = pools
                .iter()
                .find(|p| p.name == claim.spec.node_pool)
                .cloned();
            let (ctx, worked, permits) = (ctx.clone(), self.worked.clone(), permits.clone());
            let key = name.clone();
            let span = info_span!("nodeclaim", nodeclaim = %name, step = ?step);
            let task = tokio::spawn(
                async move {
                    let Ok(_permit) = permits.acquire_owned().await else {
                        return;
                    };
                    let result = match step {
                        Step::Launch => ctx.launch(&claim, pool.as_ref()).await,
                        Step::Register => match &node {
                            Some(n) => ctx.register(&claim, n, pool.as_ref()).await,
                            None => Ok(()),
                        },
                        Step::Initialise => match &node {
                            Some(n) => ctx.initialise(&claim, n, pool.as_ref()).await,
                            None => Ok(()),
                        },
                        Step::Nominate => {
                            if let Some(n) = &node {
                                ctx.nominate(&claim, n).await;
                            }
                            Ok(())
                        }
                        Step::RegistrationTimeout => ctx.registration_timeout(&claim).await,
                        Step::Drain => {
                            let claims: Api<NodeClaim> = Api::all(ctx.client.clone());
                            delete_claim(&claims, &claim.name_any())
                                .await
                                .map_err(Error::from)
                        }
                        Step::Terminate => {
                            match termination::drain(&ctx, &claim, pool.as_ref()).await {
                                Ok(true) => ctx.terminate(&claim).await,
                                Ok(false) => Ok(()),
                                Err(e) => Err(e),
                            }
                        }
                    };
                    if let Err(e) = result {
                        warn!(error = %e, "step failed; retrying");
                    }
                    worked
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(key, (step, rv, Instant::now()));
                }
                .instrument(span),
            );
            self.workers.insert(name, AbortOnDrop(task));
        }
        ctx.metrics.claim_workers.set(self.workers.len() as i64);
        export_state(ctx);
        Ok(())
    }

    fn interval(&self, ctx: &Context<C>) -> Duration {
        ctx.settings.tick.min(Duration::from_millis(200))
    }
}

/// Gauges that describe the current state: cost per hour and claims by phase.
fn export_state<C>(ctx: &Context<C>) {
    let claims = ctx.stores.nodeclaims.state();
    let cost: f64 = claims
        .iter()
        .filter_map(|c| c.status.as_ref()?.price_per_hour)
        .sum();
    ctx.metrics.cost_per_hour.set(cost);
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
        ctx.metrics
            .claims
            .get_or_create(&metrics::PhaseLabels {
                phase: phase.into(),
            })
            .set(n);
    }
}

/// A claim's offerings in the cloud's terms.
fn offerings(claim: &NodeClaim) -> Vec<(String, String, CapacityType)> {
    claim
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
        .collect()
}

impl<C: CloudProvider + Send + Sync + 'static> Context<C> {
    /// The step due for this claim now, if any.
    fn next_step(&self, claim: &NodeClaim, nodes: &HashMap<String, Arc<Node>>) -> Option<Step> {
        if claim.metadata.deletion_timestamp.is_some() {
            return claim
                .finalizers()
                .iter()
                .any(|f| f == TERMINATION_FINALIZER)
                .then_some(Step::Terminate);
        }
        if claim_condition(claim, "Terminating")
            .is_some_and(|c| interruption::INTERRUPTION_REASONS.contains(&c.reason.as_str()))
        {
            return Some(Step::Drain);
        }
        let status = claim.status.clone().unwrap_or_default();
        let Some(provider_id) = &status.provider_id else {
            let given_up = status
                .conditions
                .iter()
                .any(|c| c.type_ == "Launched" && c.reason == "InsufficientCapacity");
            let backing_off = self
                .state()
                .launch_backoff
                .get(&claim.name_any())
                .is_some_and(|b| now() < b.next);
            return (!given_up && !backing_off).then_some(Step::Launch);
        };
        let Some(node) = nodes.get(provider_id) else {
            let launched = claim_condition(claim, "Launched")
                .and_then(|c| c.last_transition_time)
                .and_then(|t| parse_time(&t));
            return launched
                .is_some_and(|t| now().saturating_sub(t) > self.settings.registration_timeout)
                .then_some(Step::RegistrationTimeout);
        };
        // Not registered yet, or its Node was registered anew by the kubelet (it carries
        // the registration taint again).
        if status.node_name.as_deref() != Some(&node.name_any())
            || super::awaiting_registration(node)
        {
            return Some(Step::Register);
        }
        if claim_condition(claim, "Initialized").is_none() && self.devices_ready(claim, node) {
            return Some(Step::Initialise);
        }
        self.nomination_lost(claim, node).then_some(Step::Nominate)
    }

    /// Is the node Ready with the GPUs / Neuron devices its type has advertised?
    fn devices_ready(&self, claim: &NodeClaim, node: &Node) -> bool {
        if !node_ready(node) {
            return false;
        }
        let catalog = self.catalog();
        let expected = claim
            .status
            .as_ref()
            .and_then(|s| s.instance_type.as_deref())
            .and_then(|t| catalog.instance_type(t));
        let allocatable = node.status.as_ref().and_then(|s| s.allocatable.as_ref());
        let advertised = |r: &str| -> i64 {
            allocatable
                .and_then(|a| a.get(r))
                .and_then(|q| crate::quantity::parse_quantity(&q.0, resources::unit_of(r)).ok())
                .unwrap_or(0)
        };
        expected.is_none_or(|t| {
            [resources::NVIDIA_GPU, resources::NEURON]
                .iter()
                .all(|r| t.allocatable.get(r) == 0 || advertised(r) >= t.allocatable.get(r))
        })
    }

    /// Launch the claim's instance (see the module documentation for idempotency).
    async fn launch(&self, claim: &NodeClaim, pool: Option<&NodePool>) -> Result<(), Error> {
        let name = claim.name_any();
        let claims: Api<NodeClaim> = Api::all(self.client.clone());
        let mut labels = pool.map(|p| p.labels.clone()).unwrap_or_default();
        labels.insert(keys::NODEPOOL.to_string(), claim.spec.node_pool.clone());
        let attempt = claim.status.as_ref().map(|s| s.launch_attempt).unwrap_or(0);
        let uid = claim.uid().unwrap_or_else(|| name.clone());
        let request = LaunchRequest {
            node_class: pool.and_then(|p| p.node_class.clone()),
            labels,
            taints: pool
                .into_iter()
                .flat_map(|p| p.taints.iter().chain(&p.startup_taints))
                .cloned()
                .chain([super::registration_taint()])
                .collect(),
            claim: name.clone(),
            client_token: format!("{uid}-{attempt}"),
            nodepool: claim.spec.node_pool.clone(),
            offerings: offerings(claim),
        };
        let result = self.cloud_call("create", self.cloud.create(&request)).await;
        match result {
            Ok(instance) => {
                self.state().launch_backoff.remove(&name);
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
                if let Some(hash) = self.class_hash(pool, &instance.instance_type) {
                    let patch =
                        json!({"metadata": {"annotations": {crate::drift::NODECLASS_HASH: hash}}});
                    claims
                        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                        .await?;
                }
                self.metrics
                    .launched
                    .get_or_create(&metrics::NodeLabels {
                        nodepool: claim.spec.node_pool.clone(),
                        instance_type: instance.instance_type.clone(),
                        capacity_type: instance.capacity_type.as_str().into(),
                    })
                    .inc();
                info!(instance = %instance.id, instance_type = %instance.instance_type, zone = %instance.zone, "launched");
            }
            Err(CloudError::InsufficientCapacity { offerings }) => {
                for (t, z, c) in &offerings {
                    self.mark_unavailable(t, z, *c);
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
                delete_claim(&claims, &name).await?;
                warn!("insufficient capacity; the claim's pods will be re-planned");
            }
            Err(e) => {
                // Only a definite refusal of this launch moves the attempt on (a new
                // ClientToken: EC2 would answer the old one with the same refusal). Any
                // other failure keeps the token — an earlier call with it, by this replica
                // or a predecessor, may have launched, and repeating it returns that
                // instance. Either way the claim backs off on its own.
                let refused = matches!(e, CloudError::Refused(_));
                let permanent = refused || matches!(e, CloudError::Permanent(_));
                let attempts = self
                    .state()
                    .launch_backoff
                    .get(&name)
                    .map_or(0, |b| b.attempts)
                    + 1;
                let (base, cap) = if permanent {
                    (Duration::from_secs(30), Duration::from_secs(600))
                } else {
                    (Duration::from_secs(1), Duration::from_secs(60))
                };
                let wait = base.saturating_mul(1 << (attempts - 1).min(10)).min(cap);
                self.state().launch_backoff.insert(
                    name.clone(),
                    Backoff {
                        attempts,
                        next: now() + wait,
                    },
                );
                let mut status = claim.status.clone().unwrap_or_default();
                let mut changed = set_condition(
                    &mut status.conditions,
                    Condition::new("Launched", false, "LaunchFailed", e.to_string()),
                );
                if refused {
                    status.launch_attempt = attempt + 1;
                    changed = true;
                }
                if changed {
                    patch_claim_status(&claims, &name, &status).await?;
                }
                if permanent && attempts == 1 {
                    self.event(claim, "Warning", "LaunchFailed", &e.to_string())
                        .await;
                }
                warn!(error = %e, retry_in_s = wait.as_secs_f64(), permanent, "launch failed");
            }
        }
        Ok(())
    }

    /// The hash of the pool's NodeClass as it launches this instance type now (for
    /// drift), from the resolution launches use; None without a NodeClass or before
    /// it has been resolved.
    pub(super) fn class_hash(
        &self,
        pool: Option<&NodePool>,
        instance_type: &str,
    ) -> Option<String> {
        let (spec, status) = self
            .state()
            .resolved_classes
            .get(pool?.node_class.as_ref()?)
            .cloned()?;
        let catalog = self.catalog();
        Some(crate::drift::class_hash(
            &spec,
            Some(&status),
            catalog.instance_type(instance_type),
        ))
    }

    /// Registration: the pool's labels and taints and cooper's labels on the Node.
    async fn register(
        &self,
        claim: &NodeClaim,
        node: &Node,
        pool: Option<&NodePool>,
    ) -> Result<(), Error> {
        let name = claim.name_any();
        let claims: Api<NodeClaim> = Api::all(self.client.clone());
        let nodes_api: Api<Node> = Api::all(self.client.clone());
        let node_name = node.name_any();
        let mut status = claim.status.clone().unwrap_or_default();
        let catalog = self.catalog();
        let mut labels: BTreeMap<String, String> =
            pool.map(|p| p.labels.clone()).unwrap_or_default();
        labels.insert(keys::NODEPOOL.into(), claim.spec.node_pool.clone());
        labels.insert(NODECLAIM_LABEL.into(), name.clone());
        if let Some(t) = &status.instance_type {
            labels.insert(keys::INSTANCE_TYPE.into(), t.clone());
            if let Some(it) = catalog.instance_type(t) {
                labels.extend(it.labels.clone());
            }
        }
        if let Some(z) = &status.zone {
            labels.insert(keys::ZONE.into(), z.clone());
        }
        if let Some(c) = &status.capacity_type {
            labels.insert(keys::CAPACITY_TYPE.into(), c.clone());
        }
        let aliases = crate::labels::karpenter_aliases(&labels);
        labels.extend(aliases);
        // The registration taint goes (below); the pool's taints stay or are added.
        let mut taints: Vec<serde_json::Value> = node
            .spec
            .as_ref()
            .and_then(|s| s.taints.clone())
            .unwrap_or_default()
            .into_iter()
            .filter(|t| t.key != super::REGISTRATION_TAINT)
            .map(|t| serde_json::to_value(t).unwrap_or_default())
            .collect();
        if let Some(p) = pool {
            for t in p.taints.iter().chain(&p.startup_taints) {
                let v = taint_json(t);
                if !taints
                    .iter()
                    .any(|x| x.get("key") == v.get("key") && x.get("effect") == v.get("effect"))
                {
                    taints.push(v);
                }
            }
        }
        // The Node carries the termination finalizer too: deleting it by hand starts the
        // claim's termination flow instead of orphaning the instance.
        let mut finalizers: Vec<String> = node.finalizers().to_vec();
        if !finalizers.iter().any(|f| f == TERMINATION_FINALIZER) {
            finalizers.push(TERMINATION_FINALIZER.into());
        }
        // Before the node takes pods: its planned pods nominated to it, so kube-scheduler
        // tries this node first for each of them (and holds their room against other
        // pods of no higher priority) rather than spreading them over every new node.
        self.nominate(claim, node).await;
        let patch = json!({"metadata": {"labels": labels, "finalizers": finalizers}, "spec": {"taints": taints}});
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
        patch_claim_status(&claims, &name, &status).await?;
        info!(node = %node_name, "registered");
        Ok(())
    }

    /// Set `status.nominatedNodeName` of the claim's planned pods (and of pods planned
    /// into its spare room since) that are still waiting for a node. A hint only:
    /// kube-scheduler checks the nominated node first and binds there if the pod fits,
    /// otherwise schedules as usual (and clears the nomination when nothing fits). What
    /// cannot be nominated is logged and left to the scheduler.
    async fn nominate(&self, claim: &NodeClaim, node: &Node) {
        let node_name = node.name_any();
        let node_name = node_name.as_str();
        let nominated = self
            .write_nominations(self.unnominated(claim, node), node_name)
            .await;
        if nominated > 0 {
            info!(node = %node_name, pods = nominated, "planned pods nominated to the node");
        }
    }

    /// Set `status.nominatedNodeName` = the node on these pods, a few at once (until the
    /// last is written and the registration taint removed, a scheduling attempt on a
    /// nominated pod fails on the taint and clears the nomination, and one by one a big
    /// node's pods keep that window open for as many API round trips). Returns how many
    /// were written.
    pub(super) async fn write_nominations(
        &self,
        pods: Vec<Arc<k8s_openapi::api::core::v1::Pod>>,
        node_name: &str,
    ) -> usize {
        use futures::StreamExt;
        let patch = json!({"status": {"nominatedNodeName": node_name}});
        futures::stream::iter(pods)
            .map(|pod| {
                let patch = &patch;
                async move {
                    let (namespace, name) = (pod.namespace().unwrap_or_default(), pod.name_any());
                    let pods: Api<k8s_openapi::api::core::v1::Pod> =
                        Api::namespaced(self.client.clone(), &namespace);
                    match pods
                        .patch_status(&name, &PatchParams::default(), &Patch::Merge(patch))
                        .await
                    {
                        Ok(_) => true,
                        Err(kube::Error::Api(s)) if s.code == 404 => false,
                        Err(e) => {
                            warn!(pod = %name, %namespace, error = %e, "cannot nominate the pod to its node");
                            false
                        }
                    }
                }
            })
            .buffer_unordered(NOMINATIONS_AT_ONCE)
            .filter(|ok| std::future::ready(*ok))
            .count()
            .await
    }

    /// The pods planned onto this claim — those it was launched for, and those planned
    /// into its spare room since — still waiting for a node, not nominated to its node,
    /// and fitting beside the pods bound or nominated to it (a nomination to a node
    /// the pod no longer fits would only stand in its way until the scheduler's next
    /// attempt clears it).
    fn unnominated(
        &self,
        claim: &NodeClaim,
        node: &Node,
    ) -> Vec<Arc<k8s_openapi::api::core::v1::Pod>> {
        let node_name = node.name_any();
        let node_name = node_name.as_str();
        let claim_name = claim.name_any();
        let keys: Vec<String> = {
            let state = self.state();
            // A pod planned elsewhere since (its claim's nomination ended) is not this
            // node's any more.
            let mut keys: Vec<String> = claim
                .spec
                .pods
                .iter()
                .filter(|k| {
                    state
                        .nominations
                        .get(*k)
                        .is_none_or(|n| n.target == claim_name || n.target == node_name)
                })
                .cloned()
                .collect();
            keys.extend(
                state
                    .nominations
                    .iter()
                    .filter(|(k, n)| n.target == claim_name && !claim.spec.pods.contains(k))
                    .map(|(k, _)| k.clone()),
            );
            keys
        };
        let candidates: Vec<Arc<k8s_openapi::api::core::v1::Pod>> = keys
            .iter()
            .filter_map(|key| {
                let (namespace, name) = key.split_once('/')?;
                self.stores
                    .pods
                    .get(&kube::runtime::reflector::ObjectRef::new(name).within(namespace))
            })
            .filter(|pod| {
                super::waiting_for_node(pod) && super::nominated_node(pod) != Some(node_name)
            })
            .collect();
        let allocatable =
            super::quantities(node.status.as_ref().and_then(|s| s.allocatable.as_ref()));
        // A Node without its allocatable yet: the plan's word that they fit stands.
        if candidates.is_empty() || allocatable.get(resources::CPU) == 0 {
            return candidates;
        }
        let requests = |pod: &k8s_openapi::api::core::v1::Pod| {
            pod.spec
                .as_ref()
                .and_then(|s| crate::workload::effective_requests(s).ok())
                .unwrap_or_default()
        };
        let mut used = resources::Resources::new();
        for pod in self.stores.pods.state() {
            let here = super::holding_node(&pod).as_deref() == Some(node_name)
                || super::nominated_node(&pod) == Some(node_name);
            if here {
                used = used.plus(&requests(&pod));
            }
        }
        let waiting = candidates.len();
        let out: Vec<_> = candidates
            .into_iter()
            .filter(|pod| {
                let r = requests(pod);
                let fits = r.fits_beside(&used, &allocatable);
                if fits {
                    used = used.plus(&r);
                }
                fits
            })
            .collect();
        tracing::debug!(
            waiting,
            fitting = out.len(),
            "planned pods waiting for the node, and those that fit beside its pods"
        );
        out
    }

    /// Has a planned pod lost its nomination to this claim's node soon after
    /// registration? kube-scheduler clears a nomination when the pod fails a scheduling
    /// attempt, and one may run between the nomination and the registration taint's
    /// removal (any node event in a burst moves every unschedulable pod back to its
    /// queue). Within the nomination grace after registration such a pod is nominated
    /// again, or the scheduler would put it on whichever new node is emptiest and the
    /// pods planned there would not fit.
    fn nomination_lost(&self, claim: &NodeClaim, node: &Node) -> bool {
        let recently_registered = claim_condition(claim, "Registered")
            .and_then(|c| c.last_transition_time)
            .and_then(|t| parse_time(&t))
            .is_some_and(|t| now().saturating_sub(t) < self.settings.nomination_grace);
        recently_registered && !self.unnominated(claim, node).is_empty()
    }

    /// Initialisation: startup taints removed, `Initialized` set.
    async fn initialise(
        &self,
        claim: &NodeClaim,
        node: &Node,
        pool: Option<&NodePool>,
    ) -> Result<(), Error> {
        let name = claim.name_any();
        let claims: Api<NodeClaim> = Api::all(self.client.clone());
        let nodes_api: Api<Node> = Api::all(self.client.clone());
        let node_name = node.name_any();
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
                    !p.startup_taints
                        .iter()
                        .any(|s| s.key == t.key && format!("{:?}", s.effect) == t.effect)
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
        let mut status = claim.status.clone().unwrap_or_default();
        set_condition(
            &mut status.conditions,
            Condition::new(
                "Initialized",
                true,
                "Initialized",
                "node ready with its devices advertised",
            ),
        );
        patch_claim_status(&claims, &name, &status).await?;
        info!(node = %node_name, "initialised");
        Ok(())
    }

    /// The node never registered: give up on the claim (its pods are re-planned).
    async fn registration_timeout(&self, claim: &NodeClaim) -> Result<(), Error> {
        let claims: Api<NodeClaim> = Api::all(self.client.clone());
        warn!("node did not register in time; terminating");
        self.event(
            claim,
            "Warning",
            "RegistrationTimeout",
            "the node did not register in time; terminating and re-planning its pods",
        )
        .await;
        delete_claim(&claims, &claim.name_any()).await?;
        Ok(())
    }

    /// A claim being deleted: terminate every instance launched for it (the recorded one,
    /// and any found by the claim's tag, e.g. after a crash between launch and
    /// recording), delete its Node, release the finalizer.
    async fn terminate(&self, claim: &NodeClaim) -> Result<(), Error> {
        let name = claim.name_any();
        let claims: Api<NodeClaim> = Api::all(self.client.clone());
        let nodes: Api<Node> = Api::all(self.client.clone());
        let status = claim.status.clone().unwrap_or_default();
        let mut ids: Vec<String> = status.instance_id.iter().cloned().collect();
        let tagged = self
            .cloud_call("instances_for_claim", self.cloud.instances_for_claim(&name))
            .await?;
        for i in tagged {
            if !ids.contains(&i.id) {
                ids.push(i.id);
            }
        }
        for id in &ids {
            match self.cloud_call("terminate", self.cloud.terminate(id)).await {
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
                    warn!(instance = %id, error = %e, "terminate failed; retrying");
                    return Err(e.into());
                }
            }
        }
        if let Some(node) = &claim_node_name(claim, &self.stores.nodes) {
            release_node(&nodes, node).await?;
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
        match claims
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
        self.state().launch_backoff.remove(&name);
        info!("nodeclaim terminated");
        Ok(())
    }
}

/// Nodes deleted by hand (`kubectl delete node`) keep cooper's finalizer until their
/// claim has gone through the termination flow: the claim is deleted here, and a Node
/// whose claim is gone is released.
async fn release_deleted_nodes<C: CloudProvider + Send + Sync + 'static>(
    ctx: &Context<C>,
    claims: &[Arc<NodeClaim>],
) -> Result<(), Error> {
    let claims_api: Api<NodeClaim> = Api::all(ctx.client.clone());
    let nodes_api: Api<Node> = Api::all(ctx.client.clone());
    for node in ctx.stores.nodes.state() {
        if node.metadata.deletion_timestamp.is_none()
            || !node.finalizers().iter().any(|f| f == TERMINATION_FINALIZER)
        {
            continue;
        }
        let name = node.name_any();
        let provider_id = node.spec.as_ref().and_then(|s| s.provider_id.clone());
        let claim = claims.iter().find(|c| {
            let status = c.status.as_ref();
            status.and_then(|s| s.node_name.as_deref()) == Some(name.as_str())
                || (provider_id.is_some()
                    && status.and_then(|s| s.provider_id.clone()) == provider_id)
        });
        match claim {
            Some(c) if c.metadata.deletion_timestamp.is_none() => {
                info!(node = %name, nodeclaim = %c.name_any(), "node deleted; terminating its claim");
                ctx.event(
                    &**c,
                    "Normal",
                    "NodeDeleted",
                    &format!("node {name} was deleted; draining it and terminating the instance"),
                )
                .await;
                delete_claim(&claims_api, &c.name_any()).await?;
            }
            Some(_) => {}
            None => release_node(&nodes_api, &name).await?,
        }
    }
    Ok(())
}

/// Take the termination finalizer off a Node (gone already is fine).
pub(super) async fn release_node(nodes: &Api<Node>, node: &str) -> Result<(), Error> {
    let current = match nodes.get(node).await {
        Ok(n) => n,
        Err(kube::Error::Api(s)) if s.code == 404 => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    if !current
        .finalizers()
        .iter()
        .any(|f| f == TERMINATION_FINALIZER)
    {
        return Ok(());
    }
    let finalizers: Vec<&String> = current
        .finalizers()
        .iter()
        .filter(|f| *f != TERMINATION_FINALIZER)
        .collect();
    let patch = json!({"metadata": {"finalizers": finalizers, "resourceVersion": current.resource_version()}});
    match nodes
        .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}
