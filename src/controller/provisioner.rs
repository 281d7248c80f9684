//! The provisioning reconciler: the pods the scheduler cannot place are batched, planned
//! with [`planner::plan`] against the cluster as it is (existing nodes' free room,
//! in-flight claims, the pods already nominated to either), and one NodeClaim is created
//! per planned node. Launching is the lifecycle reconciler's job, so a slow launch never
//! holds up the next plan.
//!
//! A pod the plan places is *nominated* to that node: it is left to kube-scheduler (and
//! its room reserved) until the node is ready plus [`Settings::nomination_grace`]
//! (the scheduler retries unschedulable pods with a back-off of up to 10 s). Only a pod
//! still pending after that is planned again, with an Event saying so.
//!
//! [`Settings::nomination_grace`]: super::Settings::nomination_grace

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, PostParams};
use serde_json::json;
use tracing::{debug, info, info_span, warn};

use super::context::Nomination;
use super::{
    Context, Error, FALLBACK_PRICE_RATIO, REPLAN_UNCHANGED, Reconciler, Settings,
    TERMINATION_FINALIZER, as_document, claim_condition, holding_node, node_ready, now, parse_time,
    pod_demand, pod_key, quantities, unplaced,
};
use crate::catalog::Catalog;
use crate::cloud::CloudProvider;
use crate::crd::{ClaimOffering, NodeClaim, NodeClaimSpec, NodeClaimStatus};
use crate::labels::{Taint, keys};
use crate::nodepool::NodePool;
use crate::planner::{self, ExistingNode, OfferingKey, PlanInput, PlanOptions};
use crate::provisioning::Batcher;
use crate::resources::Resources;
use crate::workload::{self, DaemonSetOverhead, Gang, PendingPod};

/// How long a claim this controller created may take to show up in the cache before the
/// pods nominated to it are planned again.
const CREATED_VISIBLE_WITHIN: Duration = Duration::from_secs(60);

pub(super) struct Provisioner {
    batcher: Batcher,
    /// What the last plan saw, and when: an unchanged cluster is not re-planned more
    /// often than [`REPLAN_UNCHANGED`].
    last_plan: Option<(u64, Duration)>,
    next_id: u64,
    started: bool,
}

impl Provisioner {
    pub(super) fn new(settings: &Settings) -> Self {
        Provisioner {
            batcher: Batcher::new(settings.batch),
            last_plan: None,
            next_id: now().as_nanos() as u64,
            started: false,
        }
    }
}

/// Where a nomination stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Waiting {
    /// The target is not ready yet: leave the pod to the scheduler (its room reserved).
    Yes,
    /// The target is ready and the grace is not over: leave the pod to the scheduler,
    /// unless it has already tried again and refused.
    Ready,
    /// The target is ready and the grace is over: plan the pod again.
    Expired,
    /// The target is gone (a claim that failed, a node removed).
    TargetGone,
}

impl<C: CloudProvider + Send + Sync + 'static> Reconciler<C> for Provisioner {
    async fn reconcile(&mut self, ctx: &Arc<Context<C>>) -> Result<(), Error> {
        let Some(pools) = ctx.pools() else {
            return Ok(()); // the configuration reconciler has not validated pools yet
        };
        if !self.started {
            ctx.nominations_from_claims();
            self.started = true;
        }
        let pending = ctx.pending_pods(true).await;
        {
            let at = now();
            let claims = &ctx.stores.nodeclaims;
            ctx.state().created.retain(|name, created| {
                claims
                    .get(&kube::runtime::reflector::ObjectRef::new(name))
                    .is_none()
                    && at.saturating_sub(*created) < CREATED_VISIBLE_WITHIN
            });
        }
        let (to_plan, expired) = ctx.sort_nominated(&pending);
        for (pod, message) in expired {
            ctx.event(&*pod, "Normal", "NominationExpired", &message)
                .await;
        }
        ctx.metrics.pending_pods.set(to_plan.len() as i64);
        if !self.batcher.observe(now(), to_plan.len()) {
            return Ok(());
        }
        let at = now();
        ctx.state().unavailable.retain(|_, until| *until > at);
        let fingerprint = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            for (pod, _) in &to_plan {
                pod.metadata.uid.hash(&mut h);
            }
            for c in ctx.stores.nodeclaims.state() {
                (c.name_any(), c.resource_version()).hash(&mut h);
            }
            for n in ctx.stores.nodes.state() {
                (n.name_any(), n.resource_version()).hash(&mut h);
            }
            {
                let state = ctx.state();
                state.unavailable.len().hash(&mut h);
                state.nominations_dropped.hash(&mut h);
            }
            h.finish()
        };
        if self
            .last_plan
            .is_some_and(|(f, t)| f == fingerprint && at.saturating_sub(t) < REPLAN_UNCHANGED)
        {
            return Ok(());
        }
        self.last_plan = Some((fingerprint, at));
        let (plan, claim_offerings) = ctx.plan_for(&pools, &to_plan, &BTreeSet::new());
        ctx.metrics.plan_duration.observe(plan.solve_ms / 1000.0);
        let by_key: HashMap<String, &Arc<Pod>> =
            to_plan.iter().map(|(k8s, p)| (p.key(), k8s)).collect();
        // Pods placed in room that exists or is on its way: nominated there. On a Node
        // that is up (registered, untainted by cooper) the nomination is also written to
        // the pod, as at registration, or the scheduler's own scoring (which spreads)
        // puts other pods in the room planned for them; a claim's pods are written when
        // its node registers.
        let mut to_write: Vec<(String, Vec<Arc<Pod>>)> = Vec::new();
        if !plan.existing_nodes.is_empty() && tracing::enabled!(tracing::Level::DEBUG) {
            let targets: Vec<String> = plan
                .existing_nodes
                .iter()
                .map(|p| format!("{}={}", p.node, p.pods.len()))
                .collect();
            debug!(targets = %targets.join(","), "pods planned into existing room");
        }
        {
            let mut state = ctx.state();
            for placement in &plan.existing_nodes {
                for pod in &placement.pods {
                    state
                        .nominations
                        .insert(pod.clone(), Nomination::new(&placement.node, at));
                }
                let up = ctx
                    .stores
                    .nodes
                    .get(&kube::runtime::reflector::ObjectRef::new(&placement.node))
                    .is_some_and(|n| !super::awaiting_registration(&n));
                if up {
                    let pods = placement
                        .pods
                        .iter()
                        .filter_map(|k| by_key.get(k).map(|p| (*p).clone()))
                        .collect();
                    to_write.push((placement.node.clone(), pods));
                }
            }
        }
        if !to_write.is_empty() {
            let ctx = ctx.clone();
            tokio::spawn(async move {
                for (node, pods) in to_write {
                    ctx.write_nominations(pods, &node).await;
                }
            });
        }
        let mut events: Vec<(Arc<Pod>, &str, &str, String)> = Vec::new();
        for (index, planned) in plan.nodes.iter().enumerate() {
            self.next_id = self
                .next_id
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let name = format!("{}-{:08x}", planned.nodepool, self.next_id >> 32);
            let offerings = claim_offerings.get(index).cloned().unwrap_or_default();
            ctx.create_claim(&name, planned, offerings, None).await?;
            {
                let mut state = ctx.state();
                for pod in &planned.pods {
                    state
                        .nominations
                        .insert(pod.clone(), Nomination::new(&name, at));
                }
            }
            info!(nodeclaim = %name, instance_type = %planned.instance_type, zone = %planned.zone, capacity = %planned.capacity_type, pods = planned.pods.len(), "nodeclaim created");
            for key in &planned.pods {
                if let Some(pod) = by_key.get(key) {
                    events.push((
                        (*pod).clone(),
                        "Normal",
                        "Nominated",
                        format!(
                            "pod will be placed on NodeClaim {name} ({} {} {})",
                            planned.instance_type, planned.zone, planned.capacity_type
                        ),
                    ));
                }
            }
        }
        for u in &plan.unschedulable {
            tracing::debug!(pod = %u.pod, reason = %u.reason, "unschedulable");
            if let Some(pod) = by_key.get(&u.pod) {
                events.push((
                    (*pod).clone(),
                    "Warning",
                    "FailedProvisioning",
                    u.reason.clone(),
                ));
            }
        }
        // One Event per pod is an API call each: written after every claim exists, in
        // their own task, so a burst's hundreds of Events delay neither the claims nor
        // the next plan.
        if !events.is_empty() {
            let ctx = ctx.clone();
            tokio::spawn(async move {
                for (pod, type_, reason, message) in events {
                    ctx.event(&*pod, type_, reason, &message).await;
                }
            });
        }
        Ok(())
    }
}

/// The scheduler's message on a pod it could not place (`PodScheduled=False`).
fn unschedulable_message(pod: &Pod) -> String {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .find(|c| c.type_ == "PodScheduled" && c.status == "False")
        .and_then(|c| c.message.clone())
        .unwrap_or_default()
}

/// A Node's taints in cooper's terms (ones it cannot read skipped).
pub(crate) fn node_taints(node: &k8s_openapi::api::core::v1::Node) -> Vec<Taint> {
    node.spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default()
        .into_iter()
        .filter_map(|t| {
            serde_json::from_value(json!({"key": t.key, "value": t.value, "effect": t.effect})).ok()
        })
        .collect()
}

impl<C: CloudProvider + Send + Sync + 'static> Context<C> {
    /// The pods cooper should provision for, parsed (bad ones reported and skipped).
    pub(crate) async fn pending_pods(&self, report: bool) -> Vec<(Arc<Pod>, PendingPod)> {
        let mut out = Vec::new();
        let volumes = self.volumes();
        let at = now();
        let nominations = self.state().nominations.clone();
        let closed = self.closed_nodes();
        for pod in self.stores.pods.state() {
            // A pod nominated to a node by cooper itself (at registration) is still one
            // of cooper's: should the room be gone, its nomination ends as any other
            // does and it is planned again, rather than waiting for the scheduler to
            // try it once more and clear the nomination (minutes, with no node event).
            // So is a pod nominated to a node that takes no pods any more (being
            // deleted, cordoned, being drained): the scheduler clears such a nomination
            // only on its next attempt at the pod, which in a burst comes tens of
            // seconds later. Any other nomination leaves the pod to the scheduler.
            let left_to_scheduler = super::nominated_node(&pod).is_some_and(|node| {
                let ours = nominations
                    .get(&pod_key(&pod))
                    .is_some_and(|n| self.target_node(&n.target).as_deref() == Some(node));
                !ours && !closed.contains(node)
            });
            if left_to_scheduler
                || !unplaced(
                    &pod,
                    &self.settings.scheduler_names,
                    self.settings.verdict_wait,
                    at,
                )
            {
                continue;
            }
            match pod_demand(&pod, &volumes) {
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

    /// Names of Nodes a nomination to which is void: being deleted, cordoned, or the
    /// node of a claim being removed. (A node absent from the cache is left out: it may
    /// be one the watch has not delivered yet.)
    fn closed_nodes(&self) -> BTreeSet<String> {
        let mut out: BTreeSet<String> = self
            .stores
            .nodes
            .state()
            .iter()
            .filter(|n| {
                n.metadata.deletion_timestamp.is_some()
                    || n.spec.as_ref().and_then(|s| s.unschedulable) == Some(true)
            })
            .map(|n| n.name_any())
            .collect();
        out.extend(
            self.stores
                .nodeclaims
                .state()
                .iter()
                .filter(|c| super::being_removed(c))
                .filter_map(|c| c.status.as_ref()?.node_name.clone()),
        );
        out
    }

    /// The Node a nomination's target (a NodeClaim or a Node) stands for, once there is
    /// one.
    fn target_node(&self, target: &str) -> Option<String> {
        match self
            .stores
            .nodeclaims
            .get(&kube::runtime::reflector::ObjectRef::new(target))
        {
            Some(claim) => claim.status.as_ref()?.node_name.clone(),
            None => Some(target.to_string()),
        }
    }

    /// Is a pod with this nomination still left to the scheduler?
    pub(crate) fn nomination_waiting(&self, nomination: &Nomination) -> bool {
        matches!(self.waiting(nomination), Waiting::Yes | Waiting::Ready)
    }

    /// Where a pod's nomination stands now.
    fn waiting(&self, nomination: &Nomination) -> Waiting {
        let grace = self.settings.nomination_grace;
        let at = now();
        if let Some(claim) = self
            .stores
            .nodeclaims
            .get(&kube::runtime::reflector::ObjectRef::new(
                &nomination.target,
            ))
        {
            // Its node is going away: the pods waiting for it are planned elsewhere now,
            // not after the drain.
            if super::being_removed(&claim) {
                return Waiting::TargetGone;
            }
            // A claim that has not launched and whose pool is no longer usable (invalid,
            // its NodeClass not ready, deleted) will not launch: plan its pods elsewhere.
            let launched = claim
                .status
                .as_ref()
                .is_some_and(|s| s.instance_id.is_some());
            if !launched
                && self
                    .pools()
                    .is_some_and(|pools| !pools.iter().any(|p| p.name == claim.spec.node_pool))
            {
                return Waiting::TargetGone;
            }
            return match claim_condition(&claim, "Initialized")
                .and_then(|c| c.last_transition_time)
                .and_then(|t| parse_time(&t))
            {
                None => Waiting::Yes,
                Some(ready) if at < ready.max(nomination.at) + grace => Waiting::Ready,
                Some(_) => Waiting::Expired,
            };
        }
        match self
            .stores
            .nodes
            .get(&kube::runtime::reflector::ObjectRef::new(
                &nomination.target,
            )) {
            Some(node) if node_ready(&node) => {
                if at < nomination.at + grace {
                    Waiting::Ready
                } else {
                    Waiting::Expired
                }
            }
            Some(_) => Waiting::Yes,
            // A claim created a moment ago that the watch has not delivered yet.
            None if self.state().created.contains_key(&nomination.target) => Waiting::Yes,
            None => Waiting::TargetGone,
        }
    }

    /// Split pending pods into those to plan now and those nominated and still within
    /// their grace (left out); forget nominations of pods no longer pending, and return
    /// the pods whose nomination has just ended unfulfilled, with why. A nomination ends
    /// when the grace runs out, or sooner when every claim's node is up, the scheduler has
    /// tried the pod again since its target was ready and refused it (its "0/N nodes are
    /// available" message changed), and the room planned for it there is gone.
    #[allow(clippy::type_complexity)]
    pub(crate) fn sort_nominated(
        &self,
        pending: &[(Arc<Pod>, PendingPod)],
    ) -> (Vec<(Arc<Pod>, PendingPod)>, Vec<(Arc<Pod>, String)>) {
        let keys: BTreeSet<String> = pending.iter().map(|(_, p)| p.key()).collect();
        // A nomination lasts while its pod waits for a node, provisionable or not: a pod
        // cooper nominated to its registered node is not provisionable, and if the
        // scheduler clears that nomination it is again, with its room still planned.
        let waiting = |key: &str| {
            keys.contains(key)
                || key.split_once('/').is_some_and(|(namespace, name)| {
                    self.stores
                        .pods
                        .get(&kube::runtime::reflector::ObjectRef::new(name).within(namespace))
                        .is_some_and(|p| super::waiting_for_node(&p))
                })
        };
        let nominations: HashMap<String, Nomination> = {
            let mut state = self.state();
            let before = state.nominations.len();
            state.nominations.retain(|pod, _| waiting(pod));
            if state.nominations.len() != before {
                debug!(
                    dropped = before - state.nominations.len(),
                    "nominations of pods no longer waiting"
                );
            }
            state.refused.retain(|pod, _| keys.contains(pod));
            state.nominations.clone()
        };
        let mut to_plan = Vec::new();
        let mut expired = Vec::new();
        // Requests bound to each node, computed when first needed.
        let mut used: Option<HashMap<String, Resources>> = None;
        // While nodes are still coming up the scheduler's placements are in flux (it
        // spreads pods over whatever is ready): a refusal is acted on only once every
        // claim's node is up, so a burst is not re-planned against half a cluster.
        let settled = self.stores.nodeclaims.state().iter().all(|c| {
            c.metadata.deletion_timestamp.is_some() || claim_condition(c, "Initialized").is_some()
        });
        for (pod, demand) in pending {
            let key = demand.key();
            let Some(n) = nominations.get(&key) else {
                to_plan.push((pod.clone(), demand.clone()));
                continue;
            };
            let why = match self.waiting(n) {
                Waiting::Yes => continue,
                Waiting::Ready => {
                    let message = unschedulable_message(pod);
                    match &n.ready_message {
                        None => {
                            if let Some(m) = self.state().nominations.get_mut(&key) {
                                m.ready_message = Some(message);
                            }
                            continue;
                        }
                        Some(before)
                            if settled
                                && *before != message
                                && message.starts_with("0/")
                                && !self.room_left(&n.target, demand, &mut used) =>
                        {
                            format!(
                                "kube-scheduler placed other pods in the room planned for this one on {} and refused it ({message}); planning it again",
                                n.target
                            )
                        }
                        Some(_) => continue,
                    }
                }
                Waiting::Expired => format!(
                    "the scheduler has not placed the pod on {} within {} s of it being ready; planning it again",
                    n.target,
                    self.settings.nomination_grace.as_secs()
                ),
                Waiting::TargetGone => {
                    let mut state = self.state();
                    state.nominations.remove(&key);
                    state.nominations_dropped += 1;
                    drop(state);
                    to_plan.push((pod.clone(), demand.clone()));
                    continue;
                }
            };
            let mut state = self.state();
            state.nominations.remove(&key);
            state
                .refused
                .entry(key)
                .or_default()
                .insert(n.target.clone());
            state.nominations_dropped += 1;
            drop(state);
            expired.push((pod.clone(), why));
            to_plan.push((pod.clone(), demand.clone()));
        }
        (to_plan, expired)
    }

    /// Does the target (a claim's node, or a node) still have room for this pod, given the
    /// pods bound to it now?
    fn room_left(
        &self,
        target: &str,
        demand: &PendingPod,
        used: &mut Option<HashMap<String, Resources>>,
    ) -> bool {
        let Some(node_name) = self.target_node(target) else {
            return false;
        };
        let Some(node) = self
            .stores
            .nodes
            .get(&kube::runtime::reflector::ObjectRef::new(&node_name))
        else {
            return false;
        };
        let used = used.get_or_insert_with(|| {
            let mut out: HashMap<String, Resources> = HashMap::new();
            for pod in self.stores.pods.state() {
                let Some(node) = holding_node(&pod) else {
                    continue;
                };
                if let Some(spec) = &pod.spec
                    && let Ok(r) = workload::effective_requests(spec)
                {
                    let e = out.entry(node).or_default();
                    *e = e.plus(&r);
                }
            }
            out
        });
        let allocatable = quantities(node.status.as_ref().and_then(|s| s.allocatable.as_ref()));
        let in_use = used.get(&node_name).cloned().unwrap_or_default();
        demand.fits_node(node.labels(), &node_taints(&node))
            && demand.requests.fits_beside(&in_use, &allocatable)
    }

    /// Requests of pending pods nominated to each target (claim or node name), whose
    /// room is reserved for them.
    fn reserved(&self) -> HashMap<String, Resources> {
        let pods = self.stores.pods.state();
        let nominations = self.state().nominations.clone();
        let mut out: HashMap<String, Resources> = HashMap::new();
        for pod in pods {
            if pod.spec.as_ref().is_none_or(|s| s.node_name.is_some()) {
                continue;
            }
            let Some(n) = nominations.get(&pod_key(&pod)) else {
                continue;
            };
            if !self.nomination_waiting(n) {
                continue;
            }
            if let Some(spec) = &pod.spec
                && let Ok(r) = workload::effective_requests(spec)
            {
                let e = out.entry(n.target.clone()).or_default();
                *e = e.plus(&r);
            }
        }
        out
    }

    pub(crate) fn daemonsets(&self) -> Vec<DaemonSetOverhead> {
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

    /// Existing nodes' free room and in-flight claims, for the planner; room reserved
    /// for nominated pods counts as used.
    pub(crate) fn existing_nodes(
        &self,
        catalog: &Catalog,
        daemonsets: &[DaemonSetOverhead],
        exclude: &BTreeSet<String>,
    ) -> Vec<ExistingNode> {
        let mut reserved = self.reserved();
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
        let claims = self.stores.nodeclaims.state();
        // A claim's nominations reach its Node once it has registered (and stay the
        // claim's until then: its room below is what they leave).
        for claim in &claims {
            if let Some(node) = claim.status.as_ref().and_then(|s| s.node_name.clone())
                && let Some(r) = reserved.remove(&claim.name_any())
            {
                let e = reserved.entry(node).or_default();
                *e = e.plus(&r);
            }
        }
        let mut out = Vec::new();
        let mut registered = BTreeSet::new();
        // Nodes whose claim is not initialised yet are counted like in-flight launches
        // (their devices may not be advertised yet), below.
        let uninitialised: BTreeSet<String> = claims
            .iter()
            .filter(|c| claim_condition(c, "Initialized").is_none())
            .filter_map(|c| c.status.as_ref()?.node_name.clone())
            .collect();
        for node in self.stores.nodes.state() {
            let name = node.name_any();
            // A node cooper has not registered yet takes no pods (its registration
            // taint); its claim below stands for it.
            if uninitialised.contains(&name)
                || exclude.contains(&name)
                || super::awaiting_registration(&node)
            {
                continue;
            }
            registered.insert(name.clone());
            let labels: BTreeMap<String, String> = node.labels().clone();
            let taints = node_taints(&node);
            let allocatable = quantities(node.status.as_ref().and_then(|s| s.allocatable.as_ref()));
            let capacity = quantities(node.status.as_ref().and_then(|s| s.capacity.as_ref()));
            let unschedulable = node
                .spec
                .as_ref()
                .and_then(|s| s.unschedulable)
                .unwrap_or(false);
            let used = requested
                .remove(&name)
                .unwrap_or_default()
                .plus(&reserved.remove(&name).unwrap_or_default());
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
                requested: used,
                in_flight: false,
            });
        }
        // Claims whose node has not registered: their offering's allocatable, DaemonSets
        // and nominated pods.
        let pools: Vec<NodePool> = self.readable_pools();
        for claim in claims {
            if super::being_removed(&claim) {
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
            let Some(t) =
                catalog.instance_type(status.instance_type.as_deref().unwrap_or(&o.instance_type))
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
            labels.insert(super::NODECLAIM_LABEL.into(), claim.name_any());
            let pool = pools.iter().find(|p| p.name == claim.spec.node_pool);
            let taints = pool.map(|p| p.taints.clone()).unwrap_or_default();
            if let Some(p) = pool {
                labels.extend(p.labels.clone());
            }
            let mut used = planner::daemonset_overhead(daemonsets, &labels, &taints);
            used = used.plus(&reserved.remove(&claim.name_any()).unwrap_or_default());
            // A replacement's room belongs to the pods of the node it replaces (running
            // there, so not nominated): count what it was planned for.
            if claim.annotations().contains_key(super::REPLACES_ANNOTATION) {
                let mut planned = Resources::new();
                for (k, v) in &claim.spec.resources {
                    if let Ok(amount) = crate::resources::parse_resource(k, v) {
                        planned.set(k.clone(), amount);
                    }
                }
                used = used.elementwise_max(&planned);
            }
            if let Some(node) = &status.node_name {
                // Registered but not initialised: pods may already be bound to it.
                used = used.plus(&requested.remove(node).unwrap_or_default());
                used = used.plus(&reserved.remove(node).unwrap_or_default());
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
    pub(crate) fn plan_for(
        &self,
        pools: &[NodePool],
        pending: &[(Arc<Pod>, PendingPod)],
        exclude: &BTreeSet<String>,
    ) -> (planner::Plan, Vec<Vec<ClaimOffering>>) {
        let catalog = self.catalog();
        let unavailable: BTreeSet<OfferingKey> = self.state().unavailable.keys().cloned().collect();
        let daemonsets = self.daemonsets();
        let existing = self.existing_nodes(&catalog, &daemonsets, exclude);
        if tracing::enabled!(tracing::Level::DEBUG) {
            let rooms: Vec<String> = existing
                .iter()
                .filter(|n| n.in_flight)
                .map(|n| {
                    format!(
                        "{}:{}/{}",
                        n.name,
                        n.requested.get(crate::resources::CPU),
                        n.allocatable.get(crate::resources::CPU)
                    )
                })
                .collect();
            debug!(rooms = %rooms.join(","), "in-flight claims' CPU used / allocatable");
        }
        // A pod the scheduler refused on a node it was planned onto is not planned into
        // that room again.
        let refused = self.state().refused.clone();
        let pods: Vec<PendingPod> = pending
            .iter()
            .map(|(_, p)| {
                let mut p = p.clone();
                for target in refused.get(&p.key()).into_iter().flatten() {
                    let (key, value) = match self
                        .stores
                        .nodes
                        .get(&kube::runtime::reflector::ObjectRef::new(target))
                    {
                        Some(node) => (
                            keys::HOSTNAME,
                            node.labels()
                                .get(keys::HOSTNAME)
                                .cloned()
                                .unwrap_or_else(|| target.clone()),
                        ),
                        None => (super::NODECLAIM_LABEL, target.clone()),
                    };
                    if let Ok(r) = crate::labels::Requirement::new(
                        key,
                        crate::labels::Operator::NotIn,
                        vec![value],
                    ) {
                        p.selector.require(r);
                    }
                }
                p
            })
            .collect();
        let gangs = Gang::of_pending(&pods);
        let running = self.running_pods();
        let input = PlanInput {
            pods: &pods,
            pools,
            catalog: &catalog,
            daemonsets: &daemonsets,
            gangs: &gangs,
            nodes: &existing,
            unavailable: &unavailable,
            running: &running,
        };
        let options = PlanOptions {
            strategy: self.settings.strategy,
            time_limit: self.settings.time_limit,
            relative_gap: 0.01,
            budget: crate::planner::Budget::WallClock,
            exact_search: true,
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
        let fallbacks = planner::fallbacks_per_node(
            &input,
            &plan,
            self.settings.max_fallbacks,
            FALLBACK_PRICE_RATIO,
        );
        let offerings = plan
            .nodes
            .iter()
            .zip(fallbacks)
            .map(|(node, fallbacks)| {
                let chosen = ClaimOffering {
                    instance_type: node.instance_type.clone(),
                    zone: node.zone.clone(),
                    capacity_type: node.capacity_type.as_str().to_string(),
                    price_per_hour: node.price_per_hour,
                };
                std::iter::once(chosen)
                    .chain(fallbacks.into_iter().map(|(key, price)| ClaimOffering {
                        instance_type: key.instance_type,
                        zone: key.zone,
                        capacity_type: key.capacity_type.as_str().to_string(),
                        price_per_hour: price,
                    }))
                    .collect()
            })
            .collect();
        (plan, offerings)
    }

    /// Create the NodeClaim for a planned node: owned by its NodePool (deleting the pool
    /// removes its nodes through the termination flow), the pool template's hash recorded
    /// for drift, and, for a replacement, the claim it replaces.
    pub(crate) async fn create_claim(
        &self,
        name: &str,
        planned: &planner::PlannedNode,
        offerings: Vec<ClaimOffering>,
        replaces: Option<&str>,
    ) -> Result<(), Error> {
        let claims: Api<NodeClaim> = Api::all(self.client.clone());
        let spec = NodeClaimSpec {
            node_pool: planned.nodepool.clone(),
            requirements: Vec::new(),
            offerings,
            resources: planned.requested.to_quantities(),
            pods: planned.pods.clone(),
        };
        let mut claim = NodeClaim::new(name, spec);
        claim.metadata.finalizers = Some(vec![TERMINATION_FINALIZER.into()]);
        claim.metadata.labels = Some(BTreeMap::from([(
            keys::NODEPOOL.to_string(),
            planned.nodepool.clone(),
        )]));
        let mut annotations = BTreeMap::new();
        let pool = self
            .stores
            .nodepools
            .get(&kube::runtime::reflector::ObjectRef::new(&planned.nodepool));
        if let Some(pool) = &pool {
            annotations.insert(
                crate::drift::NODEPOOL_HASH.to_string(),
                crate::drift::pool_hash(&pool.spec),
            );
            if let Some(uid) = pool.uid() {
                claim.metadata.owner_references = Some(vec![
                    k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                        api_version: "cooper.dev/v1alpha1".into(),
                        kind: "NodePool".into(),
                        name: planned.nodepool.clone(),
                        uid,
                        controller: Some(true),
                        block_owner_deletion: None,
                    },
                ]);
            }
        }
        if let Some(old) = replaces {
            annotations.insert(super::REPLACES_ANNOTATION.to_string(), old.to_string());
        }
        claim.metadata.annotations = Some(annotations);
        claim.status = Some(NodeClaimStatus::default());
        claims.create(&PostParams::default(), &claim).await?;
        self.state().created.insert(name.to_string(), now());
        Ok(())
    }

    /// What the controller would launch right now, without writing anything
    /// (`cooper plan --live`): the same nominations, the same room.
    pub async fn plan_now(&self, namespace: Option<&str>) -> planner::Plan {
        self.nominations_from_claims();
        let mut pending = self.pending_pods(false).await;
        if let Some(ns) = namespace {
            pending.retain(|(_, p)| p.namespace == ns);
        }
        let (to_plan, _) = self.sort_nominated(&pending);
        self.plan_for(&self.readable_pools(), &to_plan, &BTreeSet::new())
            .0
    }
}
