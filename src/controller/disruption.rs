//! The disruption reconciler: nodes empty past their pool's TTL are removed, drifted and
//! expired nodes replaced, within the pool's budgets for each reason, never a node that
//! `do-not-disrupt` protects (on the node, its claim, or a pod running there)
//! ([`crate::disruption::disruptions`] decides which).
//!
//! **Replacement** (drift, expiry) launches first and drains after: the node is tainted
//! so nothing new lands there, its pods are planned elsewhere with the provisioner's own
//! planner (existing room first, else new NodeClaims annotated `cooper.dev/replaces`);
//! once every replacement is initialised the old claim is deleted and the termination
//! flow evicts its pods onto them. A replacement that fails (capacity, registration)
//! abandons the attempt: the taint comes off and the node is decided on again. When the
//! plan cannot place every pod (pool limits), the node is kept, with an Event.
//!
//! A node is empty when it runs nothing but DaemonSet and mirror pods *and* no pending pod
//! is on its way to it: nominated to it by a plan, listed in its claim, or nominated by the
//! scheduler (`status.nominatedNodeName`) — nor could take a pod still waiting for the node
//! it was planned onto: the scheduler does not follow cooper's plan, and when it binds a
//! pod to a sibling's node, the sibling's pod lands here instead. The Empty clock restarts
//! when one arrives.
//! Removal takes two looks: the node is cordoned and marked `Terminating` (reason
//! `Empty`), and only after [`Settings::empty_settle`] are its pods listed again from the
//! API server; a pod the scheduler was binding at the first look shows up by then, and
//! the node is uncordoned and kept.
//!
//! [`Settings::empty_settle`]: super::Settings::empty_settle

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::json;
use tracing::{info, warn};

use super::provisioner::node_taints;
use super::{
    Context, Error, REPLACEMENTS_ANNOTATION, REPLACES_ANNOTATION, Reconciler, claim_condition,
    cordon, delete_claim, holding_node, is_node_agent, metrics, now, parse_time,
    patch_claim_status, pod_demand, pod_key, quantities, set_claim_condition, termination,
};
use crate::cloud::CloudProvider;
use crate::crd::{Condition, NodeClaim, set_condition};
use crate::disruption::{self, NodeState, node_protected};
use crate::nodepool::{DisruptionReason, NodePool};
use crate::resources::Resources;
use crate::workload::{self, PendingPod};

/// The condition on a claim being replaced (reason `Drifted`, `Expired` or
/// `Underutilized`).
pub(super) const DISRUPTING: &str = "Disrupting";

/// Mark a claim as being replaced by `replacements`: its node tainted (nothing new lands
/// there), the replacements recorded, `Disrupting` set. [`continue_replacement`] drains
/// it once they are all initialised.
pub(super) async fn mark_replacing<C: CloudProvider + Send + Sync + 'static>(
    ctx: &Context<C>,
    claim: &NodeClaim,
    reason: DisruptionReason,
    replacements: &[String],
    message: String,
) -> Result<(), Error> {
    let claims_api: Api<NodeClaim> = Api::all(ctx.client.clone());
    if let Some(node) = claim.status.as_ref().and_then(|s| s.node_name.clone()) {
        let nodes_api: Api<Node> = Api::all(ctx.client.clone());
        termination::taint_for_disruption(ctx, &nodes_api, &node).await?;
    }
    let patch =
        json!({"metadata": {"annotations": {REPLACEMENTS_ANNOTATION: replacements.join(",")}}});
    claims_api
        .patch(
            &claim.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
    set_claim_condition(
        &claims_api,
        claim,
        Condition::new(DISRUPTING, true, reason.as_str(), message),
    )
    .await?;
    Ok(())
}

/// The `Terminating` reason of an empty node between cordoning and deleting.
const EMPTY: &str = "Empty";

pub(super) struct Disruption;

impl<C: CloudProvider + Send + Sync + 'static> Reconciler<C> for Disruption {
    async fn reconcile(&mut self, ctx: &Arc<Context<C>>) -> Result<(), Error> {
        let Some(pools) = ctx.pools() else {
            return Ok(());
        };
        let claims_api: Api<NodeClaim> = Api::all(ctx.client.clone());
        let nodes_api: Api<Node> = Api::all(ctx.client.clone());
        let pods = ctx.stores.pods.state();
        let mut busy: HashMap<String, usize> = HashMap::new();
        // Names (claims and nodes) that a pending pod is on its way to.
        let mut arriving: BTreeSet<String> = BTreeSet::new();
        let mut waiting: BTreeSet<String> = BTreeSet::new();
        let nominations = ctx.state().nominations.clone();
        let volumes = ctx.volumes();
        let mut used: HashMap<String, Resources> = HashMap::new();
        let mut waiting_pods: Vec<PendingPod> = Vec::new();
        let mut protected: BTreeSet<String> = BTreeSet::new();
        for pod in &pods {
            if let Some(node) = holding_node(pod) {
                if !is_node_agent(pod) && termination::protects_node(pod, now()) {
                    protected.insert(node.clone());
                }
                if let Some(spec) = &pod.spec
                    && let Ok(r) = workload::effective_requests(spec)
                {
                    let e = used.entry(node.clone()).or_default();
                    *e = e.plus(&r);
                }
                if !is_node_agent(pod) {
                    *busy.entry(node).or_default() += 1;
                }
                continue;
            }
            if pod.metadata.deletion_timestamp.is_some()
                || pod.spec.as_ref().is_none_or(|s| s.node_name.is_some())
            {
                continue; // finished, or being deleted
            }
            let key = pod_key(pod);
            if let Some(n) = nominations.get(&key) {
                arriving.insert(n.target.clone());
                if ctx.nomination_waiting(n)
                    && let Ok(Some(demand)) = pod_demand(pod, &volumes)
                {
                    waiting_pods.push(demand);
                }
            }
            if let Some(node) = super::nominated_node(pod) {
                arriving.insert(node.to_string());
            }
            waiting.insert(key);
        }
        let nodes = ctx.stores.nodes_by_name();
        let mut states = Vec::new();
        let all_claims = ctx.stores.nodeclaims.state();
        let claim_names: BTreeSet<String> = all_claims.iter().map(|c| c.name_any()).collect();
        for claim in all_claims.iter().cloned() {
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
            let pool = pools.iter().find(|p| p.name == claim.spec.node_pool);
            let launched_at = claim
                .metadata
                .creation_timestamp
                .as_ref()
                .and_then(|t| u64::try_from(t.0.as_second()).ok())
                .map(Duration::from_secs)
                .unwrap_or_else(now);
            if let Some(replacing) = claim_condition(&claim, DISRUPTING)
                && claim.metadata.deletion_timestamp.is_none()
            {
                continue_replacement(ctx, &claim, &node_name, &replacing.reason, &claim_names)
                    .await?;
                states.push(NodeState {
                    name: name.clone(),
                    nodepool: claim.spec.node_pool.clone(),
                    empty_since: None,
                    launched_at,
                    drifted: None,
                    do_not_disrupt: false,
                    disrupting: true,
                });
                continue;
            }
            // A replacement stays while the node it replaces drains.
            let replacing_alive = claim
                .annotations()
                .get(REPLACES_ANNOTATION)
                .is_some_and(|old| claim_names.contains(old));
            let could_take_a_waiting_pod = || {
                let labels = node.labels();
                let taints = node_taints(node);
                let allocatable =
                    quantities(node.status.as_ref().and_then(|s| s.allocatable.as_ref()));
                let in_use = used.get(&node_name).cloned().unwrap_or_default();
                waiting_pods.iter().any(|p| {
                    p.fits_node(labels, &taints) && p.requests.fits_beside(&in_use, &allocatable)
                })
            };
            let empty = busy.get(&node_name).copied().unwrap_or(0) == 0
                && !replacing_alive
                && !arriving.contains(&name)
                && !arriving.contains(&node_name)
                && !claim.spec.pods.iter().any(|p| waiting.contains(p))
                && !could_take_a_waiting_pod();
            let removing = claim_condition(&claim, "Terminating").filter(|c| c.reason == EMPTY);
            if let Some(removing) = &removing
                && claim.metadata.deletion_timestamp.is_none()
            {
                let since = removing
                    .last_transition_time
                    .as_deref()
                    .and_then(parse_time)
                    .unwrap_or_else(now);
                let settled = now().saturating_sub(since) >= ctx.settings.empty_settle;
                if empty && !settled {
                    continue;
                }
                if empty && still_empty(ctx, &node_name).await? {
                    delete_claim(&claims_api, &name).await?;
                    ctx.metrics
                        .nodes_disrupted
                        .get_or_create(&metrics::ReasonLabels {
                            reason: DisruptionReason::Empty.as_str().into(),
                        })
                        .inc();
                    ctx.event(
                        &*claim,
                        "Normal",
                        EMPTY,
                        "empty past the NodePool's consolidateAfter; removing the node",
                    )
                    .await;
                    info!(nodeclaim = %name, node = %node_name, "removing empty node");
                } else {
                    // A pod arrived between the two looks: keep the node.
                    cordon(&nodes_api, &node_name, false).await?;
                    let mut status = status.clone();
                    set_condition(
                        &mut status.conditions,
                        Condition::new("Terminating", false, "NoLongerEmpty", "a pod arrived"),
                    );
                    set_condition(
                        &mut status.conditions,
                        Condition::new("Empty", false, "NotEmpty", ""),
                    );
                    patch_claim_status(&claims_api, &name, &status).await?;
                    info!(nodeclaim = %name, node = %node_name, "a pod arrived on an empty node; keeping it");
                }
                continue;
            }
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
                            "no pods other than DaemonSet and mirror pods, none on their way",
                        ),
                    );
                    patch_claim_status(&claims_api, &name, &status).await?;
                    Some(now())
                }
                (false, Some(_)) => {
                    set_condition(
                        &mut status.conditions,
                        Condition::new("Empty", false, "NotEmpty", ""),
                    );
                    patch_claim_status(&claims_api, &name, &status).await?;
                    None
                }
                (false, None) => None,
            };
            let drifted = pool.and_then(|pool| {
                let annotations = claim.annotations();
                let current_pool = ctx
                    .stores
                    .nodepools
                    .get(&kube::runtime::reflector::ObjectRef::new(&pool.name))
                    .map(|p| crate::drift::pool_hash(&p.spec));
                let current_class = claim
                    .status
                    .as_ref()
                    .and_then(|s| s.instance_type.as_deref())
                    .and_then(|t| ctx.class_hash(Some(pool), t));
                crate::drift::drifted(
                    pool,
                    node.labels(),
                    annotations
                        .get(crate::drift::NODEPOOL_HASH)
                        .map(String::as_str),
                    current_pool.as_deref(),
                    annotations
                        .get(crate::drift::NODECLASS_HASH)
                        .map(String::as_str),
                    current_class.as_deref(),
                )
            });
            states.push(NodeState {
                name: name.clone(),
                nodepool: claim.spec.node_pool.clone(),
                empty_since: since,
                launched_at,
                drifted,
                do_not_disrupt: node_protected(node.annotations())
                    || node_protected(claim.annotations())
                    || protected.contains(&node_name)
                    || replacing_alive,
                disrupting: claim.metadata.deletion_timestamp.is_some()
                    || claim_condition(&claim, "Terminating").is_some(),
            });
        }
        let decisions = disruption::disruptions(&states, &pools, now(), now());
        for decision in decisions {
            let name = decision.name;
            if decision.reason != DisruptionReason::Empty {
                let Some(claim) = all_claims.iter().find(|c| c.name_any() == name) else {
                    continue;
                };
                let why = states
                    .iter()
                    .find(|s| s.name == name)
                    .and_then(|s| s.drifted.clone())
                    .filter(|_| decision.reason == DisruptionReason::Drifted)
                    .unwrap_or_else(|| "older than the NodePool's expireAfter".into());
                start_replacement(ctx, &pools, claim, decision.reason, &why).await?;
                continue;
            }
            let Some(claim) = ctx
                .stores
                .nodeclaims
                .get(&kube::runtime::reflector::ObjectRef::new(&name))
            else {
                continue;
            };
            let Some(node_name) = claim.status.as_ref().and_then(|s| s.node_name.clone()) else {
                continue;
            };
            // Look at the API server's pods, not the cache, before acting.
            if !still_empty(ctx, &node_name).await? {
                continue;
            }
            cordon(&nodes_api, &node_name, true).await?;
            set_claim_condition(
                &claims_api,
                &claim,
                Condition::new(
                    "Terminating",
                    true,
                    EMPTY,
                    "empty past the NodePool's TTL; cordoned, removing once it is still empty",
                ),
            )
            .await?;
            info!(nodeclaim = %name, node = %node_name, "empty past its TTL: cordoned");
        }
        super::consolidation::consolidate(ctx, &pools).await?;
        Ok(())
    }
}

/// Begin replacing a drifted or expired node: taint it, plan its pods elsewhere, create
/// the replacement claims and record them; with nothing to move or room enough on the
/// nodes there are, delete it at once.
async fn start_replacement<C: CloudProvider + Send + Sync + 'static>(
    ctx: &Arc<Context<C>>,
    pools: &[NodePool],
    claim: &NodeClaim,
    reason: DisruptionReason,
    why: &str,
) -> Result<(), Error> {
    let claims_api: Api<NodeClaim> = Api::all(ctx.client.clone());
    let nodes_api: Api<Node> = Api::all(ctx.client.clone());
    let name = claim.name_any();
    let Some(node_name) = claim.status.as_ref().and_then(|s| s.node_name.clone()) else {
        return Ok(());
    };
    termination::taint_for_disruption(ctx, &nodes_api, &node_name).await?;
    let volumes = ctx.volumes();
    let mut moving = Vec::new();
    for pod in ctx.stores.pods.state() {
        if holding_node(&pod).as_deref() != Some(node_name.as_str())
            || !termination::must_leave(&pod)
        {
            continue;
        }
        match pod_demand(&pod, &volumes) {
            Ok(Some(demand)) => moving.push((pod, demand)),
            Ok(None) => {}
            Err(message) => {
                warn!(pod = %pod.name_any(), %message, "cannot read pod; it will move when the node drains");
            }
        }
    }
    let mut replacements: Vec<String> = Vec::new();
    if !moving.is_empty() {
        let exclude = BTreeSet::from([node_name.clone()]);
        let (plan, offerings) = ctx.plan_for(pools, &moving, &exclude);
        if !plan.unschedulable.is_empty() {
            termination::untaint(ctx, &nodes_api, &node_name).await?;
            let reasons: Vec<String> = plan
                .unschedulable
                .iter()
                .take(3)
                .map(|u| format!("{}: {}", u.pod, u.reason))
                .collect();
            ctx.event(
                claim,
                "Warning",
                "ReplacementDeferred",
                &format!(
                    "{why}, but {} of its pods cannot be placed elsewhere now ({}); keeping the node",
                    plan.unschedulable.len(),
                    reasons.join("; ")
                ),
            )
            .await;
            return Ok(());
        }
        // Room planned on claims still coming up counts only once they are up: wait
        // for them as for new replacements.
        for placement in &plan.existing_nodes {
            let launching = ctx
                .stores
                .nodeclaims
                .get(&kube::runtime::reflector::ObjectRef::new(&placement.node))
                .is_some_and(|c| claim_condition(&c, "Initialized").is_none());
            if launching && !placement.pods.is_empty() {
                replacements.push(placement.node.clone());
            }
        }
        let at = now();
        for (index, planned) in plan.nodes.iter().enumerate() {
            let replacement = termination::replacement_name(&planned.nodepool, at, index);
            ctx.create_claim(
                &replacement,
                planned,
                offerings.get(index).cloned().unwrap_or_default(),
                Some(&name),
            )
            .await?;
            replacements.push(replacement);
        }
    }
    ctx.metrics
        .nodes_disrupted
        .get_or_create(&metrics::ReasonLabels {
            reason: reason.as_str().into(),
        })
        .inc();
    if replacements.is_empty() {
        info!(nodeclaim = %name, reason = reason.as_str(), %why, "disrupting: its pods fit on the nodes there are");
        ctx.event(
            claim,
            "Normal",
            reason.as_str(),
            &format!("{why}; its pods fit on the nodes there are: draining it"),
        )
        .await;
        set_claim_condition(
            &claims_api,
            claim,
            Condition::new("Terminating", true, reason.as_str(), why),
        )
        .await?;
        delete_claim(&claims_api, &name).await?;
        return Ok(());
    }
    mark_replacing(
        ctx,
        claim,
        reason,
        &replacements,
        format!("{why}; replacing it with {}", replacements.join(", ")),
    )
    .await?;
    info!(nodeclaim = %name, reason = reason.as_str(), replacements = %replacements.join(","), "replacing");
    ctx.event(
        claim,
        "Normal",
        reason.as_str(),
        &format!(
            "{why}; launching {} to take its pods, then draining it",
            replacements.join(", ")
        ),
    )
    .await;
    Ok(())
}

/// A node being replaced: drain it (delete its claim) once every replacement is
/// initialised; abandon the attempt when one of them is gone.
async fn continue_replacement<C: CloudProvider + Send + Sync + 'static>(
    ctx: &Arc<Context<C>>,
    claim: &NodeClaim,
    node_name: &str,
    reason: &str,
    claim_names: &BTreeSet<String>,
) -> Result<(), Error> {
    let claims_api: Api<NodeClaim> = Api::all(ctx.client.clone());
    let name = claim.name_any();
    let replacements: Vec<String> = claim
        .annotations()
        .get(REPLACEMENTS_ANNOTATION)
        .map(|v| {
            v.split(',')
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default();
    let created = ctx.state().created.clone();
    let mut ready = true;
    let mut failed = None;
    for r in &replacements {
        let found = ctx
            .stores
            .nodeclaims
            .get(&kube::runtime::reflector::ObjectRef::new(r));
        match found {
            Some(c) if c.metadata.deletion_timestamp.is_some() => failed = Some(r.clone()),
            Some(c) => ready &= claim_condition(&c, "Initialized").is_some(),
            None if created.contains_key(r) || claim_names.contains(r) => ready = false,
            None => failed = Some(r.clone()),
        }
    }
    if let Some(gone) = failed {
        let nodes_api: Api<Node> = Api::all(ctx.client.clone());
        termination::untaint(ctx, &nodes_api, node_name).await?;
        let patch = json!({"metadata": {"annotations": {REPLACEMENTS_ANNOTATION: null}}});
        claims_api
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        set_claim_condition(
            &claims_api,
            claim,
            Condition::new(
                DISRUPTING,
                false,
                "ReplacementFailed",
                format!("replacement {gone} did not come up; trying again"),
            ),
        )
        .await?;
        warn!(nodeclaim = %name, replacement = %gone, "replacement failed; the node is decided on again");
        return Ok(());
    }
    if !ready {
        return Ok(());
    }
    info!(nodeclaim = %name, reason, "replacements initialised: draining");
    set_claim_condition(
        &claims_api,
        claim,
        Condition::new(
            "Terminating",
            true,
            reason,
            format!("replaced by {}; draining", replacements.join(", ")),
        ),
    )
    .await?;
    delete_claim(&claims_api, &name).await?;
    Ok(())
}

/// The node's pods from the API server: only DaemonSet, mirror and finished pods?
async fn still_empty<C>(ctx: &Context<C>, node: &str) -> Result<bool, Error> {
    let pods: Api<Pod> = Api::all(ctx.client.clone());
    let on_node = pods
        .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
        .await?;
    Ok(on_node.items.iter().all(|p| {
        is_node_agent(p)
            || matches!(
                p.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            )
    }))
}
