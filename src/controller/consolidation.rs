//! Consolidation in the controller: for pools with `WhenEmptyOrUnderutilized`, once
//! nothing is pending, nothing is launching or being replaced, and the pool has been
//! stable for its `consolidateAfter` (since its newest claim and cooper's last move
//! there), the pods of its nodes are planned again ([`crate::consolidation::best_move`],
//! the same planner and constraints as provisioning) and the best move is made, within
//! the pool's `Underutilized` budget and never on a node `do-not-disrupt` protects:
//!
//! - a **delete** deletes the claims (their pods fit in the room of the nodes there
//!   are; the termination flow evicts them, PDBs holding);
//! - a **replace**, **split** or **merge** creates the new claims (annotated
//!   `cooper.dev/replaces`) and marks the old ones `Disrupting` (reason `Underutilized`)
//!   with their replacements: the disruption reconciler drains them once every
//!   replacement is initialised, as it does for drift and expiry.
//!
//! Each move is an Event on every claim it removes (what, why, the savings expected)
//! and counts in `cooper_consolidation_moves_total{reason=<kind>}` and
//! `cooper_consolidation_expected_savings_dollars_per_hour_total`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use kube::ResourceExt;
use kube::api::Api;
use tracing::info;

use super::{
    Context, Error, REPLACES_ANNOTATION, claim_condition, delete_claim, holding_node,
    is_node_agent, metrics, now, pod_demand, set_claim_condition, termination,
};
use crate::cloud::CloudProvider;
use crate::consolidation::{self, Candidate, MoveKind, Style};
use crate::crd::{Condition, NodeClaim};
use crate::disruption::{self as pure, node_protected};
use crate::nodepool::{ConsolidationPolicy, DisruptionReason, NodePool};
use crate::planner::{OfferingKey, PlanOptions};

/// How often an unchanged cluster is looked at again for a consolidation move (each look
/// is a few dozen plans).
pub(crate) const RECHECK_UNCHANGED: Duration = Duration::from_secs(60);

/// What `cooper plan --live --consolidation` prints: the move the controller would make
/// now, read-only.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Preview {
    /// `delete`, `replace`, `split` or `merge`.
    pub kind: MoveKind,
    /// The nodes it would take away.
    pub remove: Vec<String>,
    /// The nodes it would launch for their pods.
    pub launch: Vec<crate::planner::PlannedNode>,
    pub removed_cost_per_hour: f64,
    pub added_cost_per_hour: f64,
    pub savings_per_hour: f64,
    pub pods_moved: usize,
    /// One line saying all of it.
    pub description: String,
}

impl<C: CloudProvider + Send + Sync + 'static> Context<C> {
    /// The consolidation move the controller would make now (read-only), whether or not
    /// the pools have been stable for their `consolidateAfter` yet.
    pub async fn consolidation_now(&self) -> Option<Preview> {
        let pools = self.readable_pools();
        let (m, _) = decide(self, &pools, false).await?;
        Some(Preview {
            kind: m.kind,
            remove: m.remove.clone(),
            launch: m.plan.nodes.clone(),
            removed_cost_per_hour: m.removed_cost_per_hour,
            added_cost_per_hour: m.added_cost_per_hour,
            savings_per_hour: m.savings_per_hour(),
            pods_moved: m.pods_moved,
            description: m.describe(),
        })
    }
}

/// Look for a consolidation move and make it (one per pass).
pub(super) async fn consolidate<C: CloudProvider + Send + Sync + 'static>(
    ctx: &Arc<Context<C>>,
    pools: &[NodePool],
) -> Result<(), Error> {
    let at = now();
    if !pools
        .iter()
        .any(|p| p.consolidation_policy == ConsolidationPolicy::WhenEmptyOrUnderutilized)
    {
        return Ok(());
    }
    let fingerprint = {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for c in ctx.stores.nodeclaims.state() {
            (c.name_any(), c.resource_version()).hash(&mut h);
        }
        for n in ctx.stores.nodes.state() {
            (n.name_any(), n.resource_version()).hash(&mut h);
        }
        for p in ctx.stores.pods.state() {
            (p.uid(), holding_node(&p)).hash(&mut h);
        }
        h.finish()
    };
    if ctx
        .state()
        .consolidation_checked
        .is_some_and(|(f, t)| f == fingerprint && at.saturating_sub(t) < RECHECK_UNCHANGED)
    {
        return Ok(());
    }
    let decided = decide(ctx, pools, true).await;
    let Some((decision, removed)) = decided else {
        // Not stable yet, or nothing worth doing: look again when something changes
        // (a pool becoming stable changes nothing in the caches, so at the latest after
        // the recheck period, or its consolidateAfter when shorter).
        let soonest = pools
            .iter()
            .filter_map(|p| p.empty_ttl)
            .min()
            .unwrap_or(RECHECK_UNCHANGED)
            .min(RECHECK_UNCHANGED);
        ctx.state().consolidation_checked =
            Some((fingerprint, at.saturating_sub(RECHECK_UNCHANGED - soonest)));
        return Ok(());
    };
    ctx.state().consolidation_checked = None;
    act(ctx, decision, removed, at).await
}

/// The best move now and the claims it removes. With `settled`, only pools that are
/// stable (nothing pending, launching or being replaced; `consolidateAfter` since their
/// newest claim and cooper's last move there) are considered.
async fn decide<C: CloudProvider + Send + Sync + 'static>(
    ctx: &Context<C>,
    pools: &[NodePool],
    settled: bool,
) -> Option<(consolidation::Move, Vec<Arc<NodeClaim>>)> {
    let at = now();
    let consolidating: Vec<&NodePool> = pools
        .iter()
        .filter(|p| p.consolidation_policy == ConsolidationPolicy::WhenEmptyOrUnderutilized)
        .filter(|p| p.empty_ttl.is_some())
        .collect();
    if consolidating.is_empty() {
        return None;
    }
    // Nothing pending: pending pods may need the room a move would take away. A pod
    // nominated to a node (by cooper at registration, or by the scheduler preempting) is
    // still on its way there: its node is not as empty as it looks.
    if settled {
        let landing = ctx
            .stores
            .pods
            .state()
            .iter()
            .any(|p| super::nominated_node(p).is_some());
        if landing || !ctx.pending_pods(false).await.is_empty() {
            return None;
        }
    }
    let claims = ctx.stores.nodeclaims.state();
    let claim_names: BTreeSet<String> = claims.iter().map(|c| c.name_any()).collect();
    // Stable pools: nothing launching, deleting or being replaced there, and no claim
    // newer than consolidateAfter, nor a move of cooper's.
    let mut stable: Vec<&NodePool> = Vec::new();
    for pool in consolidating {
        let mine: Vec<&Arc<NodeClaim>> = claims
            .iter()
            .filter(|c| c.spec.node_pool == pool.name)
            .collect();
        let after = pool.empty_ttl.unwrap_or_default();
        let unsettled = mine.iter().any(|c| {
            c.metadata.deletion_timestamp.is_some()
                || claim_condition(c, "Initialized").is_none()
                || claim_condition(c, super::disruption::DISRUPTING).is_some()
                || claim_condition(c, "Terminating").is_some()
                || c.annotations()
                    .get(REPLACES_ANNOTATION)
                    .is_some_and(|old| claim_names.contains(old))
                || c.metadata
                    .creation_timestamp
                    .as_ref()
                    .and_then(|t| u64::try_from(t.0.as_second()).ok())
                    .is_some_and(|t| at.saturating_sub(Duration::from_secs(t)) < after)
        });
        let moved_recently = ctx
            .state()
            .consolidated_at
            .get(&pool.name)
            .is_some_and(|t| at.saturating_sub(*t) < after);
        if !settled || (!unsettled && !moved_recently) {
            stable.push(pool);
        }
    }
    if stable.is_empty() {
        return None;
    }
    // Pods by node, and the nodes a pod protects.
    let volumes = ctx.volumes();
    let mut on_node: BTreeMap<String, Vec<crate::workload::PendingPod>> = BTreeMap::new();
    let mut protected: BTreeSet<String> = BTreeSet::new();
    let mut unreadable: BTreeSet<String> = BTreeSet::new();
    for pod in ctx.stores.pods.state() {
        let Some(node) = holding_node(&pod) else {
            continue;
        };
        if is_node_agent(&pod) {
            continue;
        }
        if termination::protects_node(&pod, at) {
            protected.insert(node.clone());
        }
        match pod_demand(&pod, &volumes) {
            Ok(Some(demand)) => on_node.entry(node).or_default().push(demand),
            Ok(None) => {}
            Err(_) => {
                unreadable.insert(node);
            }
        }
    }
    let nodes_by_name = ctx.stores.nodes_by_name();
    let mut max_remove: BTreeMap<String, usize> = BTreeMap::new();
    let mut candidates = Vec::new();
    let mut claim_of: BTreeMap<String, Arc<NodeClaim>> = BTreeMap::new();
    for pool in &stable {
        let mine: Vec<&Arc<NodeClaim>> = claims
            .iter()
            .filter(|c| c.spec.node_pool == pool.name)
            .collect();
        let allowed = pure::allowed(pool, DisruptionReason::Underutilized, mine.len(), at);
        if allowed == 0 {
            continue;
        }
        max_remove.insert(pool.name.clone(), allowed);
        let charges = ctx
            .catalog()
            .node_charges(&ctx.billing(pool.node_class.as_deref()))
            .total();
        for claim in mine {
            let Some(status) = &claim.status else {
                continue;
            };
            let Some(node_name) = &status.node_name else {
                continue;
            };
            let Some(node) = nodes_by_name.get(node_name) else {
                continue;
            };
            if protected.contains(node_name)
                || unreadable.contains(node_name)
                || node_protected(node.annotations())
                || node_protected(claim.annotations())
            {
                continue;
            }
            let capacity_type = if status.capacity_type.as_deref() == Some("spot") {
                crate::catalog::CapacityType::Spot
            } else {
                crate::catalog::CapacityType::OnDemand
            };
            candidates.push(Candidate {
                name: node_name.clone(),
                nodepool: pool.name.clone(),
                capacity_type,
                cost_per_hour: status.price_per_hour.unwrap_or(0.0) + charges,
                pods: on_node.get(node_name).cloned().unwrap_or_default(),
            });
            claim_of.insert(node_name.clone(), claim.clone());
        }
    }
    if candidates.is_empty() {
        return None;
    }
    let catalog = ctx.catalog();
    let daemonsets = ctx.daemonsets();
    let nodes = ctx.existing_nodes(&catalog, &daemonsets, &BTreeSet::new());
    let running = ctx.running_pods();
    let unavailable: BTreeSet<OfferingKey> = ctx.state().unavailable.keys().cloned().collect();
    let input = consolidation::Input {
        pools,
        catalog: &catalog,
        daemonsets: &daemonsets,
        unavailable: &unavailable,
        nodes: &nodes,
        candidates: &candidates,
        running: &running,
        max_remove: &max_remove,
    };
    let options = PlanOptions {
        strategy: ctx.settings.strategy,
        time_limit: ctx.settings.time_limit,
        relative_gap: 0.01,
        budget: crate::planner::Budget::WallClock,
        exact_search: true,
    };
    let decision = consolidation::best_move(&input, &options, Style::COOPER)?;
    let removed: Vec<Arc<NodeClaim>> = decision
        .remove
        .iter()
        .filter_map(|n| claim_of.get(n).cloned())
        .collect();
    Some((decision, removed))
}

/// Make a move: delete its claims, or launch its nodes and mark its claims for
/// replacement.
async fn act<C: CloudProvider + Send + Sync + 'static>(
    ctx: &Arc<Context<C>>,
    decision: consolidation::Move,
    removed: Vec<Arc<NodeClaim>>,
    at: Duration,
) -> Result<(), Error> {
    let what = decision.describe();
    info!(move = %what, "consolidating");
    ctx.metrics
        .consolidation_moves
        .get_or_create(&metrics::ReasonLabels {
            reason: decision.kind.as_str().into(),
        })
        .inc();
    ctx.metrics
        .consolidation_savings
        .inc_by(decision.savings_per_hour());
    {
        let mut state = ctx.state();
        for c in &removed {
            state.consolidated_at.insert(c.spec.node_pool.clone(), at);
        }
    }
    let claims_api: Api<NodeClaim> = Api::all(ctx.client.clone());
    for c in &removed {
        ctx.metrics
            .nodes_disrupted
            .get_or_create(&metrics::ReasonLabels {
                reason: DisruptionReason::Underutilized.as_str().into(),
            })
            .inc();
        ctx.event(
            &**c,
            "Normal",
            "Underutilized",
            &format!("consolidation: {what}"),
        )
        .await;
    }
    if decision.kind == MoveKind::Delete {
        for c in &removed {
            set_claim_condition(
                &claims_api,
                c,
                Condition::new(
                    "Terminating",
                    true,
                    DisruptionReason::Underutilized.as_str(),
                    format!("consolidation: {what}"),
                ),
            )
            .await?;
            delete_claim(&claims_api, &c.name_any()).await?;
        }
        return Ok(());
    }
    // Launch first: new claims for the plan's nodes, replacing the first removed claim.
    let first = removed.first().map(|c| c.name_any()).unwrap_or_default();
    let mut replacements = Vec::new();
    for (index, planned) in decision.plan.nodes.iter().enumerate() {
        let name = termination::replacement_name(&planned.nodepool, at, index);
        let offering = crate::crd::ClaimOffering {
            instance_type: planned.instance_type.clone(),
            zone: planned.zone.clone(),
            capacity_type: planned.capacity_type.as_str().to_string(),
            price_per_hour: planned.price_per_hour,
        };
        ctx.create_claim(&name, planned, vec![offering], Some(&first))
            .await?;
        replacements.push(name);
    }
    for c in &removed {
        super::disruption::mark_replacing(
            ctx,
            c,
            DisruptionReason::Underutilized,
            &replacements,
            format!("consolidation: {what}"),
        )
        .await?;
    }
    Ok(())
}
