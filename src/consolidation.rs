//! Consolidation by re-planning: the pods on nodes of `WhenEmptyOrUnderutilized` pools
//! are planned again with the same planner and constraints, and where that is cheaper the
//! cluster moves toward the plan. One move per decision, the one that saves the most per
//! hour once the disruption is weighed:
//!
//! - **delete** a node whose pods fit in the free room of the others;
//! - **replace** a node with one cheaper node;
//! - **split** a node into several cheaper ones (two 1-GPU pods left on an 8-GPU node go
//!   to two 1-GPU nodes) — what Karpenter will not do;
//! - **merge** several nodes of a pool into fewer: its least-used candidates, in growing
//!   prefixes (2, 4, 8, … as many as its budget allows: the whole pool re-planned).
//!
//! A move must save at least [`MIN_SAVINGS_PER_HOUR`] and [`MIN_SAVINGS_SHARE`] of what the
//! nodes it removes cost, after charging [`POD_MOVE_COST_PER_HOUR`] for each pod it moves
//! (more for higher-priority pods): small savings are not worth restarting work for, and
//! the margin keeps the next decision from undoing this one. Spot nodes are replaced by
//! spot only when at least [`SPOT_FLEXIBILITY`] cheaper spot offerings could hold the pods
//! (Karpenter's floor: a replacement with fewer choices is likelier to be interrupted
//! again); on-demand nodes go to spot only where their pool allows spot (the planner's
//! pools say so). Pure: the controller and the simulator feed it and act on the move.

use std::collections::BTreeSet;

use crate::catalog::{CapacityType, Catalog};
use crate::nodepool::NodePool;
use crate::planner::{self, ExistingNode, OfferingKey, Plan, PlanInput, PlanOptions};
use crate::resources::Resources;
use crate::scheduling::PlacedPod;
use crate::workload::{DaemonSetOverhead, Gang, PendingPod};

/// The least a move must save, USD per hour.
pub const MIN_SAVINGS_PER_HOUR: f64 = 0.005;
/// The least share of the removed nodes' cost a move must save.
pub const MIN_SAVINGS_SHARE: f64 = 0.10;
/// What moving one pod is charged, USD per hour of savings (a priority-1000 pod counts
/// double, a negative-priority one half).
pub const POD_MOVE_COST_PER_HOUR: f64 = 0.0005;
/// Cheaper spot offerings a spot-to-spot replacement needs to choose from.
pub const SPOT_FLEXIBILITY: usize = 15;
/// How many single-node candidates are tried per decision (the least used first): each
/// is a plan, and a decision must stay fast on a thousand nodes.
pub const SINGLE_NODE_CANDIDATES: usize = 40;

/// What kind of move.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MoveKind {
    Delete,
    Replace,
    Split,
    Merge,
}

impl MoveKind {
    /// As reports and Events spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            MoveKind::Delete => "delete",
            MoveKind::Replace => "replace",
            MoveKind::Split => "split",
            MoveKind::Merge => "merge",
        }
    }
}

/// A node consolidation may take away.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub name: String,
    pub nodepool: String,
    pub capacity_type: CapacityType,
    /// What it costs per hour (instance and per-node costs).
    pub cost_per_hour: f64,
    /// The pods that would move (not DaemonSet or mirror pods).
    pub pods: Vec<PendingPod>,
}

/// How the decision is made: cooper's, or the Karpenter baseline's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Style {
    /// Allow splitting one node into several (Karpenter never does).
    pub split: bool,
    /// Try several nodes at once.
    pub multi_node: bool,
}

impl Style {
    /// cooper: every move.
    pub const COOPER: Style = Style {
        split: true,
        multi_node: true,
    };
    /// Karpenter v1: delete, replace with one node, merge; never split.
    pub const KARPENTER: Style = Style {
        split: false,
        multi_node: true,
    };
}

/// Everything a decision looks at.
pub struct Input<'a> {
    pub pools: &'a [NodePool],
    pub catalog: &'a Catalog,
    pub daemonsets: &'a [DaemonSetOverhead],
    pub unavailable: &'a BTreeSet<OfferingKey>,
    /// Every node there is (candidates included), with what its pods request.
    pub nodes: &'a [ExistingNode],
    /// The nodes consolidation may take away, with their pods.
    pub candidates: &'a [Candidate],
    /// Pods running anywhere (spreading, anti-affinity, host ports).
    pub running: &'a [PlacedPod],
    /// How many nodes of each pool one move may take away (its `Underutilized` budget
    /// less the nodes already in disruption); pools not listed: none.
    pub max_remove: &'a std::collections::BTreeMap<String, usize>,
}

/// One move and what it saves.
#[derive(Debug, Clone)]
pub struct Move {
    pub kind: MoveKind,
    /// The candidates it removes.
    pub remove: Vec<String>,
    /// The plan for their pods: new nodes to launch (none for a delete) and pods placed
    /// in the room of nodes there are.
    pub plan: Plan,
    /// What the removed nodes cost, and what the new ones will.
    pub removed_cost_per_hour: f64,
    pub added_cost_per_hour: f64,
    pub pods_moved: usize,
}

impl Move {
    /// USD per hour the move saves (before the disruption charge).
    pub fn savings_per_hour(&self) -> f64 {
        self.removed_cost_per_hour - self.added_cost_per_hour
    }

    /// Savings less the charge for the pods it moves.
    fn value(&self, moved: &[&PendingPod]) -> f64 {
        let charge: f64 = moved
            .iter()
            .map(|p| POD_MOVE_COST_PER_HOUR * (1.0 + (p.priority as f64 / 1000.0)).clamp(0.5, 2.0))
            .sum();
        self.savings_per_hour() - charge
    }

    /// A sentence for Events and logs.
    pub fn describe(&self) -> String {
        let new: Vec<String> = self
            .plan
            .nodes
            .iter()
            .map(|n| format!("{} {} {}", n.instance_type, n.zone, n.capacity_type))
            .collect();
        format!(
            "{} {} → {}: ${:.4}/h → ${:.4}/h (saves ${:.4}/h), {} pods move",
            self.kind.as_str(),
            self.remove.join(", "),
            if new.is_empty() {
                "room on other nodes".to_string()
            } else {
                new.join(", ")
            },
            self.removed_cost_per_hour,
            self.added_cost_per_hour,
            self.savings_per_hour(),
            self.pods_moved
        )
    }
}

/// Plan the pods of `remove` on everything else.
fn replan(input: &Input<'_>, remove: &[&Candidate], options: &PlanOptions) -> Option<Move> {
    // A what-if plan: no exact step (see `PlanOptions::exact_search`).
    let options = &PlanOptions {
        exact_search: false,
        ..options.clone()
    };
    let gone: BTreeSet<&str> = remove.iter().map(|c| c.name.as_str()).collect();
    let pods: Vec<PendingPod> = remove.iter().flat_map(|c| c.pods.clone()).collect();
    let nodes: Vec<ExistingNode> = input
        .nodes
        .iter()
        .filter(|n| !gone.contains(n.name.as_str()))
        .cloned()
        .collect();
    let running: Vec<PlacedPod> = input
        .running
        .iter()
        .filter(|p| !gone.contains(p.node.as_str()))
        .cloned()
        .collect();
    let gangs = Gang::of_pending(&pods);
    let plan = planner::plan(
        PlanInput {
            pods: &pods,
            pools: input.pools,
            catalog: input.catalog,
            daemonsets: input.daemonsets,
            gangs: &gangs,
            nodes: &nodes,
            unavailable: input.unavailable,
            running: &running,
        },
        options,
    );
    if !plan.unschedulable.is_empty() {
        return None;
    }
    let added: f64 = plan.nodes.iter().map(|n| n.cost_per_hour()).sum();
    let removed: f64 = remove.iter().map(|c| c.cost_per_hour).sum();
    let kind = match (remove.len(), plan.nodes.len()) {
        (_, 0) => MoveKind::Delete,
        (1, 1) => MoveKind::Replace,
        (1, _) => MoveKind::Split,
        _ => MoveKind::Merge,
    };
    Some(Move {
        kind,
        remove: remove.iter().map(|c| c.name.clone()).collect(),
        pods_moved: pods.len(),
        plan,
        removed_cost_per_hour: removed,
        added_cost_per_hour: added,
    })
}

/// The cheapest single new node that holds all of `remove`'s pods (what Karpenter's
/// replace considers: one node, never several): the offering of a pool the pods all
/// tolerate and select, with room for their requests and the DaemonSets it would run.
fn single_node(input: &Input<'_>, remove: &[&Candidate], template: &Move) -> Option<Move> {
    let pods: Vec<&PendingPod> = remove.iter().flat_map(|c| c.pods.iter()).collect();
    let mut need = Resources::new();
    for p in &pods {
        need.add_all(&p.requests);
    }
    let mut best: Option<(f64, planner::PlannedNode)> = None;
    for pool in input.pools {
        let charge = input.catalog.node_charges(&pool.billing).total();
        for o in &input.catalog.offerings {
            let t = &input.catalog.types[o.type_index];
            if pool.unlaunchable.contains(t.name()) {
                continue;
            }
            let key = OfferingKey {
                instance_type: t.name().to_string(),
                zone: o.zone.clone(),
                capacity_type: o.capacity_type,
            };
            if input.unavailable.contains(&key) {
                continue;
            }
            let cost = o.price + charge;
            if best.as_ref().is_some_and(|(c, _)| *c <= cost) {
                continue;
            }
            let mut labels = o.labels.clone();
            labels.extend(pool.labels.clone());
            if pool.first_rejection(&labels).is_some()
                || !pods.iter().all(|p| p.fits_node(&labels, &pool.taints))
            {
                continue;
            }
            let overhead = planner::daemonset_overhead(input.daemonsets, &labels, &pool.taints);
            let requested = need.plus(&overhead);
            if !requested.fits_in(&t.allocatable) {
                continue;
            }
            best = Some((
                cost,
                planner::PlannedNode {
                    name: format!("{}-1", pool.name),
                    nodepool: pool.name.clone(),
                    instance_type: t.name().to_string(),
                    zone: o.zone.clone(),
                    capacity_type: o.capacity_type,
                    price_per_hour: o.price,
                    node_cost_per_hour: charge,
                    allocatable: t.allocatable.clone(),
                    requested,
                    pods: pods.iter().map(|p| p.key()).collect(),
                },
            ));
        }
    }
    let (cost, node) = best?;
    let mut plan = template.plan.clone();
    plan.nodes = vec![node];
    plan.existing_nodes.clear();
    Some(Move {
        kind: if remove.len() == 1 {
            MoveKind::Replace
        } else {
            MoveKind::Merge
        },
        remove: template.remove.clone(),
        plan,
        removed_cost_per_hour: template.removed_cost_per_hour,
        added_cost_per_hour: cost,
        pods_moved: template.pods_moved,
    })
}

/// Are there enough cheaper spot offerings for these pods that a spot node may be
/// replaced by spot?
fn spot_flexible(catalog: &Catalog, pods: &[PendingPod], below: f64) -> bool {
    let mut need = Resources::new();
    for p in pods {
        need.add_all(&p.requests);
    }
    catalog
        .offerings
        .iter()
        .filter(|o| o.capacity_type == CapacityType::Spot && o.price < below)
        .filter(|o| need.fits_in(&catalog.types[o.type_index].allocatable))
        .take(SPOT_FLEXIBILITY)
        .count()
        >= SPOT_FLEXIBILITY
}

/// Does taking these candidates away stay within every pool's budget?
fn within_budget(input: &Input<'_>, removed: &[&Candidate]) -> bool {
    let mut per_pool: std::collections::BTreeMap<&str, usize> = Default::default();
    for c in removed {
        *per_pool.entry(c.nodepool.as_str()).or_default() += 1;
    }
    per_pool
        .iter()
        .all(|(pool, n)| input.max_remove.get(*pool).is_some_and(|max| n <= max))
}

/// Is this move allowed and worth making?
fn acceptable(input: &Input<'_>, m: &Move, removed: &[&Candidate], style: Style) -> bool {
    if m.kind == MoveKind::Split && !style.split {
        return false;
    }
    if removed.len() > 1 && m.plan.nodes.len() >= removed.len() {
        return false; // not a merge
    }
    let spot_out = removed
        .iter()
        .any(|c| c.capacity_type == CapacityType::Spot);
    let spot_in = m
        .plan
        .nodes
        .iter()
        .any(|n| n.capacity_type == CapacityType::Spot);
    if spot_out && spot_in {
        let pods: Vec<PendingPod> = removed.iter().flat_map(|c| c.pods.clone()).collect();
        if !spot_flexible(input.catalog, &pods, m.removed_cost_per_hour) {
            return false;
        }
    }
    let moved: Vec<&PendingPod> = removed.iter().flat_map(|c| c.pods.iter()).collect();
    let value = m.value(&moved);
    value >= MIN_SAVINGS_PER_HOUR && value >= MIN_SAVINGS_SHARE * m.removed_cost_per_hour
}

/// The best move now, if any is worth making.
pub fn best_move(input: &Input<'_>, options: &PlanOptions, style: Style) -> Option<Move> {
    // Least used first: pods per dollar, then name.
    let mut order: Vec<&Candidate> = input.candidates.iter().collect();
    order.sort_by(|a, b| {
        let density = |c: &Candidate| c.pods.len() as f64 / c.cost_per_hour.max(1e-9);
        density(a)
            .total_cmp(&density(b))
            .then_with(|| a.name.cmp(&b.name))
    });
    let mut best: Option<(f64, Move)> = None;
    let mut consider = |m: Move, removed: &[&Candidate]| {
        if !acceptable(input, &m, removed, style) {
            return;
        }
        let moved: Vec<&PendingPod> = removed.iter().flat_map(|c| c.pods.iter()).collect();
        let value = m.value(&moved);
        if best.as_ref().is_none_or(|(v, _)| value > *v + 1e-9) {
            best = Some((value, m));
        }
    };
    order.retain(|c| within_budget(input, std::slice::from_ref(c)));
    for c in order.iter().take(SINGLE_NODE_CANDIDATES) {
        if let Some(m) = replan(input, std::slice::from_ref(c), options) {
            // Without splits, a plan of several nodes becomes one node for them all.
            if m.kind == MoveKind::Split && !style.split {
                if let Some(one) = single_node(input, std::slice::from_ref(c), &m) {
                    consider(one, std::slice::from_ref(c));
                }
            } else {
                consider(m, std::slice::from_ref(c));
            }
        }
    }
    if style.multi_node {
        // Growing prefixes of each pool's least-used candidates, as large as its budget
        // allows. (Across pools a merge would also move nodes whose own replacement is
        // identical, for the others' savings: not worth their pods' restarts.)
        let pools: BTreeSet<&str> = order.iter().map(|c| c.nodepool.as_str()).collect();
        for pool in pools {
            let mine: Vec<&Candidate> = order
                .iter()
                .copied()
                .filter(|c| c.nodepool == pool)
                .collect();
            let max = input.max_remove.get(pool).copied().unwrap_or(0);
            let mut k = 2;
            while k <= max.max(2) && mine.len() >= 2 {
                let prefix = &mine[..k.min(mine.len()).min(max)];
                if prefix.len() < 2 {
                    break;
                }
                if let Some(m) = replan(input, prefix, options) {
                    consider(m, prefix);
                }
                if prefix.len() < k {
                    break; // the budget (or the candidates) allow no larger set
                }
                k *= 2;
            }
        }
    }
    best.map(|(_, m)| m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, cpu_millis: i64, gpus: i64) -> PendingPod {
        let limits = if gpus > 0 {
            serde_json::json!({"nvidia.com/gpu": gpus})
        } else {
            serde_json::json!({})
        };
        let doc = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                     "containers": [{"name": "c", "resources": {
                        "requests": {"cpu": format!("{cpu_millis}m"), "memory": "2Gi"},
                        "limits": limits}}]}
        });
        let docs = [crate::manifest::Document {
            file: "t".into(),
            line: 1,
            value: doc,
        }];
        crate::workload::from_documents(&docs)
            .unwrap()
            .pods
            .remove(0)
    }

    /// A node of this type, as the cluster sees it, running `pods`.
    fn node(
        catalog: &Catalog,
        pools: &[NodePool],
        name: &str,
        pool: &str,
        t: &str,
        pods: &[PendingPod],
    ) -> (ExistingNode, Candidate) {
        let it = catalog.instance_type(t).unwrap();
        let offering = catalog
            .offerings_of(t)
            .iter()
            .find(|o| o.capacity_type == CapacityType::OnDemand)
            .unwrap();
        let p = pools.iter().find(|p| p.name == pool).unwrap();
        let mut labels = offering.labels.clone();
        labels.extend(p.labels.clone());
        let mut used = Resources::new();
        for q in pods {
            used.add_all(&q.requests);
        }
        (
            ExistingNode {
                name: name.into(),
                nodepool: Some(pool.into()),
                labels,
                taints: p.taints.clone(),
                allocatable: it.allocatable.clone(),
                capacity: it.capacity.clone(),
                requested: used,
                in_flight: false,
            },
            Candidate {
                name: name.into(),
                nodepool: pool.into(),
                capacity_type: CapacityType::OnDemand,
                cost_per_hour: offering.price,
                pods: pods.to_vec(),
            },
        )
    }

    fn on_demand_pools() -> Vec<NodePool> {
        let mut pools = crate::nodepool::defaults().unwrap();
        for p in &mut pools {
            p.requirements.push(
                crate::labels::Requirement::new(
                    crate::labels::keys::CAPACITY_TYPE,
                    crate::labels::Operator::In,
                    vec!["on-demand".into()],
                )
                .unwrap(),
            );
        }
        pools
    }

    fn budget() -> std::collections::BTreeMap<String, usize> {
        [("default".to_string(), 10), ("gpu".to_string(), 10)].into()
    }

    fn options() -> PlanOptions {
        PlanOptions {
            strategy: planner::Strategy::Optimal,
            time_limit: std::time::Duration::from_secs(2),
            relative_gap: 0.01,
            budget: planner::Budget::Work,
            exact_search: true,
        }
    }

    #[test]
    fn an_eight_gpu_node_with_two_one_gpu_pods_is_split_and_karpenter_would_not() {
        let catalog = Catalog::embedded().unwrap();
        let pools = on_demand_pools();
        let pods = [pod("a", 2000, 1), pod("b", 2000, 1)];
        let (n, c) = node(&catalog, &pools, "big", "gpu", "g5.48xlarge", &pods);
        let input = Input {
            pools: &pools,
            catalog: &catalog,
            daemonsets: &[],
            unavailable: &BTreeSet::new(),
            nodes: std::slice::from_ref(&n),
            candidates: std::slice::from_ref(&c),
            running: &[],
            max_remove: &budget(),
        };
        let m = best_move(&input, &options(), Style::COOPER).expect("a move");
        assert_eq!(m.kind, MoveKind::Split, "{}", m.describe());
        assert_eq!(m.plan.nodes.len(), 2);
        assert!(m.savings_per_hour() > 10.0, "{}", m.describe());
        // Karpenter replaces with one node at best (a 2-GPU one), never two.
        let k = best_move(&input, &options(), Style::KARPENTER).expect("a move");
        assert_eq!(k.kind, MoveKind::Replace, "{}", k.describe());
        assert!(k.savings_per_hour() < m.savings_per_hour());
    }

    #[test]
    fn delete_when_the_others_have_room_merge_two_half_empty_nodes_and_leave_a_full_one() {
        let catalog = Catalog::embedded().unwrap();
        let pools = on_demand_pools();
        // Two m6i.2xlarge (8 vCPU) each with one 3-CPU pod: merge into one.
        let (n1, c1) = node(
            &catalog,
            &pools,
            "half-1",
            "default",
            "m6i.2xlarge",
            &[pod("a", 3000, 0)],
        );
        let (n2, c2) = node(
            &catalog,
            &pools,
            "half-2",
            "default",
            "m6i.2xlarge",
            &[pod("b", 3000, 0)],
        );
        let input = Input {
            pools: &pools,
            catalog: &catalog,
            daemonsets: &[],
            unavailable: &BTreeSet::new(),
            nodes: &[n1.clone(), n2.clone()],
            candidates: &[c1.clone(), c2.clone()],
            running: &[],
            max_remove: &budget(),
        };
        let m = best_move(&input, &options(), Style::COOPER).expect("a move");
        // One node is left: one of the two (the other deleted), or a cheaper one for both.
        assert_eq!(
            2 - m.remove.len() + m.plan.nodes.len(),
            1,
            "{}",
            m.describe()
        );
        assert!(matches!(m.kind, MoveKind::Delete | MoveKind::Merge));
        assert!(
            m.savings_per_hour() >= c1.cost_per_hour * 0.99,
            "{}",
            m.describe()
        );
        // A node that is already the cheapest for its pod is left alone: plan the pod
        // from scratch and run it on what the plan chose.
        let lone = pod("f", 1500, 0);
        let fresh = planner::plan(
            PlanInput {
                pods: std::slice::from_ref(&lone),
                pools: &pools,
                catalog: &catalog,
                daemonsets: &[],
                gangs: &[],
                nodes: &[],
                unavailable: &BTreeSet::new(),
                running: &[],
            },
            &options(),
        );
        let chosen = &fresh.nodes[0].instance_type;
        let (full, cf) = node(&catalog, &pools, "full", "default", chosen, &[lone]);
        let input = Input {
            nodes: std::slice::from_ref(&full),
            candidates: std::slice::from_ref(&cf),
            ..input
        };
        let none = best_move(&input, &options(), Style::COOPER);
        assert!(
            none.is_none(),
            "{}",
            none.map(|m| m.describe()).unwrap_or_default()
        );
    }
}
