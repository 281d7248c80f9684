//! The planner: a pure function from (pending pods, NodePools, catalog, DaemonSets,
//! gangs, existing and in-flight nodes) to a [`Plan`] — which nodes to launch and
//! which pod goes where, or why a pod cannot be placed.
//!
//! Steps:
//! 1. Identical pods are grouped into classes (same requests, selector, tolerations,
//!    priority and gang).
//! 2. Free room on existing and in-flight nodes is used first (first-fit, largest
//!    pods first): it costs nothing.
//! 3. NodePools are taken in tiers of equal weight, highest first (Karpenter's
//!    semantics: a pod goes to the heaviest pool that can host it). Within a tier:
//!    - each gang is planned alone in every zone and committed in the cheapest zone
//!      that holds all of it within limits, or not at all;
//!    - the other pods fill the gangs' spare room, then the packing problem over
//!      every (pool × offering) node option is solved by the chosen strategy.
//! 4. Pods still unplaced get a precise reason.
//!
//! Every plan can be checked with [`verify::verify`].

pub mod capture;
mod constraints;
mod exact;
mod greedy;
mod knapsack;
pub mod lp;
mod node_counts;
mod optimal;
mod problem;
mod simplex;
pub mod verify;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use serde::Serialize;
use tracing::{debug, info_span};

use crate::catalog::{CapacityType, Catalog};
use crate::labels::{Labels, Layered, NodeSelector, Taint, Toleration, keys, untolerated};
use crate::nodepool::NodePool;
use crate::resources::{self, Resources, format_resource};
use crate::workload::{DaemonSetOverhead, Gang, PendingPod};
use problem::{ClassDemand, NodeChoice, PackProblem, PackSolution};

pub use constraints::{Relaxed, SYNTHETIC_PREFIX};

/// How the packing problem is solved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// Column generation over node patterns with good_lp; never dearer than greedy.
    Optimal,
    /// Karpenter-style first-fit-decreasing.
    Greedy,
}

/// Solve settings.
#[derive(Debug, Clone)]
pub struct PlanOptions {
    pub strategy: Strategy,
    /// The budget for the whole plan: wall-clock time, or (with [`Budget::Work`]) the
    /// amount of work it stands for.
    pub time_limit: Duration,
    /// Relative MIP gap at which the solver may stop.
    pub relative_gap: f64,
    /// How `time_limit` is spent.
    pub budget: Budget,
    /// Let small queues still above the gap take the exact step (up to three quarters
    /// of the time limit; see `optimal`). Consolidation's what-if plans turn it off:
    /// dozens of them per look are comparisons, not launches, and each would otherwise
    /// spend up to 1.5 s on a percent.
    pub exact_search: bool,
}

/// How a plan's time limit is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Budget {
    /// Stop at the wall-clock deadline (the controller and the CLI: a plan must come
    /// back in time, whatever the machine).
    #[default]
    WallClock,
    /// Never look at the clock: the limit becomes counts of work — column-generation
    /// iterations (one per [`WORK_MS_PER_ITERATION`] ms) and branch-and-bound nodes
    /// (one per ms) — so the same input gives the same plan on any machine, under any
    /// load (the simulator: a replay must be reproducible).
    Work,
}

/// Under [`Budget::Work`], one column-generation iteration per this many milliseconds
/// of the time limit.
pub const WORK_MS_PER_ITERATION: u64 = 10;

impl Default for PlanOptions {
    fn default() -> Self {
        Self {
            strategy: Strategy::Optimal,
            time_limit: Duration::from_secs(2),
            relative_gap: 0.01,
            budget: Budget::WallClock,
            exact_search: true,
        }
    }
}

/// A node that exists (or is being launched) and may have room.
#[derive(Debug, Clone, PartialEq)]
pub struct ExistingNode {
    pub name: String,
    /// The pool it belongs to, if cooper launched it (its capacity counts against the
    /// pool's limits).
    pub nodepool: Option<String>,
    pub labels: Labels,
    pub taints: Vec<Taint>,
    pub allocatable: Resources,
    /// Capacity, counted against the pool's limits.
    pub capacity: Resources,
    /// Requests of the pods already on it (or on their way), DaemonSets included.
    pub requested: Resources,
    /// True for a launch that has not registered yet.
    pub in_flight: bool,
}

/// An offering that recently failed to launch (insufficient capacity).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OfferingKey {
    pub instance_type: String,
    pub zone: String,
    pub capacity_type: CapacityType,
}

/// Everything the planner looks at.
#[derive(Debug, Clone, Copy)]
pub struct PlanInput<'a> {
    pub pods: &'a [PendingPod],
    pub pools: &'a [NodePool],
    pub catalog: &'a Catalog,
    pub daemonsets: &'a [DaemonSetOverhead],
    pub gangs: &'a [Gang],
    pub nodes: &'a [ExistingNode],
    pub unavailable: &'a BTreeSet<OfferingKey>,
    /// Pods running on the existing nodes, for spreading, pod (anti-)affinity and host
    /// ports (their `node` is an existing node's name).
    pub running: &'a [crate::scheduling::PlacedPod],
}

/// A node to launch.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlannedNode {
    pub name: String,
    pub nodepool: String,
    pub instance_type: String,
    pub zone: String,
    pub capacity_type: CapacityType,
    /// The instance's price.
    pub price_per_hour: f64,
    /// What the node costs besides the instance (its volumes, a public address, the
    /// user's per-node cost; see [`crate::catalog::NodeBilling`]).
    pub node_cost_per_hour: f64,
    /// The kubelet's allocatable.
    pub allocatable: Resources,
    /// Requests of the planned pods plus DaemonSet overhead.
    pub requested: Resources,
    pub pods: Vec<String>,
}

/// Pods placed on a node that already exists or is already being launched.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExistingPlacement {
    pub node: String,
    pub pods: Vec<String>,
}

/// A pod that cannot be placed, and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Unschedulable {
    pub pod: String,
    pub reason: String,
}

impl PlannedNode {
    /// Instance and per-node costs together: what the planner minimises.
    pub fn cost_per_hour(&self) -> f64 {
        self.price_per_hour + self.node_cost_per_hour
    }
}

/// The planner's answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Plan {
    pub strategy: Strategy,
    pub region: String,
    /// Instances plus per-node costs of the new nodes.
    pub total_price_per_hour: f64,
    /// The instances' part of it.
    pub instance_price_per_hour: f64,
    /// The per-node part (volumes, public addresses, the user's per-node cost).
    pub node_costs_per_hour: f64,
    /// A proven lower bound on the price of the new nodes (optimal strategy only).
    pub lower_bound_per_hour: Option<f64>,
    /// Why there is no lower bound, when there is none (greedy proves none; pods left
    /// unplaced make the LP bound one on cost plus penalties, not on these nodes' price;
    /// the time limit came first; too many distinct pod shapes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bound_note: Option<String>,
    /// Did the time limit stop the search (the plan is the best found by then)?
    #[serde(default)]
    pub deadline_reached: bool,
    pub solve_ms: f64,
    pub nodes: Vec<PlannedNode>,
    pub existing_nodes: Vec<ExistingPlacement>,
    pub unschedulable: Vec<Unschedulable>,
    /// Preferences (preferred node or pod affinity, `ScheduleAnyway` spreading) the plan
    /// could not honour.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub relaxed: Vec<Relaxed>,
}

impl Plan {
    /// Set the totals from the nodes.
    pub fn total_up(&mut self) {
        self.instance_price_per_hour = round6(self.nodes.iter().map(|n| n.price_per_hour).sum());
        self.node_costs_per_hour = round6(self.nodes.iter().map(|n| n.node_cost_per_hour).sum());
        self.total_price_per_hour = round6(self.nodes.iter().map(PlannedNode::cost_per_hour).sum());
    }

    /// Relative gap between the plan's price and the lower bound.
    pub fn gap(&self) -> Option<f64> {
        self.lower_bound_per_hour.map(|lb| {
            if self.total_price_per_hour <= 1e-12 {
                0.0
            } else {
                (self.total_price_per_hour - lb).max(0.0) / self.total_price_per_hour
            }
        })
    }

    /// What the same nodes would cost on-demand.
    pub fn on_demand_price(&self, catalog: &Catalog) -> f64 {
        self.nodes
            .iter()
            .map(|n| {
                catalog
                    .instance_type(&n.instance_type)
                    .map(|t| t.spec.on_demand_price)
                    .unwrap_or(n.price_per_hour)
                    + n.node_cost_per_hour
            })
            .sum::<f64>()
            + 0.0 // an empty float sum is -0.0
    }
}

/// Dense resource dimensions in play.
struct Dims {
    names: Vec<String>,
    index: HashMap<String, usize>,
    /// Per dimension: is it a synthetic per-node rule (`cooper.dev/x-...`)?
    synthetic: Vec<bool>,
}

impl Dims {
    /// The resource dimensions a plan tracks: cpu, memory, pods, and whatever the
    /// pods request or the pools limit.
    fn for_input(input: &PlanInput<'_>) -> Dims {
        let mut names: BTreeSet<String> = [resources::CPU, resources::MEMORY, resources::PODS]
            .iter()
            .map(|s| s.to_string())
            .collect();
        for p in input.pods {
            names.extend(p.requests.names().map(str::to_string));
        }
        for pool in input.pools {
            names.extend(pool.limits.names().map(str::to_string));
            names.extend(pool.zero_limits.iter().cloned());
        }
        let names: Vec<String> = names.into_iter().collect();
        let index = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), i))
            .collect();
        let synthetic = names
            .iter()
            .map(|n| n.starts_with(SYNTHETIC_PREFIX))
            .collect();
        Dims {
            names,
            index,
            synthetic,
        }
    }

    fn dense(&self, r: &Resources) -> Vec<i64> {
        let mut v = vec![0; self.names.len()];
        for (k, amount) in r.iter() {
            if let Some(&i) = self.index.get(k) {
                v[i] = amount;
            }
        }
        v
    }
}

/// An offering a pool may launch, with its allocatable less DaemonSet overhead (dense).
/// Computed once per plan and shared by the optimal and greedy paths.
struct Admitted {
    offering: usize,
    alloc: Vec<i64>,
}

/// Per pool, the offerings it admits: available, matching its requirements, with room
/// left after DaemonSets.
fn admitted_offerings(
    input: &PlanInput<'_>,
    dims: &Dims,
    synthetic: &BTreeMap<String, i64>,
) -> Vec<Vec<Admitted>> {
    let catalog = input.catalog;
    let unavailable: Vec<bool> = catalog
        .offerings
        .iter()
        .map(|o| {
            !input.unavailable.is_empty()
                && input.unavailable.contains(&OfferingKey {
                    instance_type: catalog.types[o.type_index].name().to_string(),
                    zone: o.zone.clone(),
                    capacity_type: o.capacity_type,
                })
        })
        .collect();
    // Only zone, region and capacity type differ between a type's offerings: decide the
    // pool's other requirements once per type.
    let per_offering = |key: &str| matches!(key, keys::ZONE | keys::REGION | keys::CAPACITY_TYPE);
    input
        .pools
        .iter()
        .map(|pool| {
            let type_ok: Vec<bool> = catalog
                .types
                .iter()
                .map(|t| {
                    let labels = Layered {
                        top: &pool.labels,
                        base: &t.labels,
                    };
                    !pool.unlaunchable.contains(t.name())
                        && pool
                            .requirements
                            .iter()
                            .filter(|r| !per_offering(&r.key))
                            .all(|r| r.matches(&labels))
                })
                .collect();
            catalog
                .offerings
                .iter()
                .enumerate()
                .filter(|(oi, off)| !unavailable[*oi] && type_ok[off.type_index])
                .filter_map(|(oi, off)| {
                    let t = &catalog.types[off.type_index];
                    let labels = Layered {
                        top: &pool.labels,
                        base: &off.labels,
                    };
                    if !pool
                        .requirements
                        .iter()
                        .filter(|r| per_offering(&r.key))
                        .all(|r| r.matches(&labels))
                    {
                        return None;
                    }
                    let overhead = daemonset_overhead(input.daemonsets, &labels, &pool.taints);
                    let alloc_sparse = t.allocatable.minus(&overhead);
                    let alloc: Vec<i64> = dims
                        .names
                        .iter()
                        .map(|d| {
                            if let Some(units) = synthetic.get(d) {
                                *units
                            } else if t.allocatable.get(d) == 0 {
                                0
                            } else {
                                alloc_sparse.get(d)
                            }
                        })
                        .collect();
                    (!alloc.iter().any(|a| *a < 0)).then_some(Admitted {
                        offering: oi,
                        alloc,
                    })
                })
                .collect()
        })
        .collect()
}

/// What makes two pods interchangeable for planning.
type ClassKey<'p> = (
    &'p Resources,
    &'p NodeSelector,
    &'p [Toleration],
    i32,
    Option<&'p str>,
);

/// A group of identical pods.
struct PodClass {
    /// Pod indices not yet placed (taken from the front).
    pods: Vec<usize>,
    rep: usize,
    req: Vec<i64>,
    gang: Option<String>,
}

/// A node chosen in this plan so far.
struct NewNode {
    pool: usize,
    offering: usize,
    alloc: Vec<i64>,
    used: Vec<i64>,
    labels: Labels,
    pods: Vec<usize>,
}

struct Planner<'a> {
    input: PlanInput<'a>,
    options: PlanOptions,
    deadline: Instant,
    dims: Dims,
    classes: Vec<PodClass>,
    offering_labels: Vec<&'a Labels>,
    /// Per pool: what each of its nodes costs besides the instance (USD/h).
    node_charges: Vec<f64>,
    admitted: &'a [Vec<Admitted>],
    /// Remaining limit per pool per dim.
    limits: Vec<Vec<Option<i64>>>,
    new_nodes: Vec<NewNode>,
    existing: BTreeMap<usize, Vec<usize>>,
    /// Free room per existing/in-flight node (dense), after what this plan put there.
    free: Vec<Vec<i64>>,
    /// Existing/in-flight nodes in placement order (ready first, then by name).
    node_order: Vec<usize>,
    unschedulable: Vec<(usize, String)>,
    lower_bound: Option<f64>,
    /// Why `lower_bound` went away (the first packing that had none says).
    bound_note: Option<String>,
    /// Diagnosis cache: per (pool, node selector), what the pool offers such a pod.
    pool_views: std::cell::RefCell<HashMap<(usize, NodeSelector), PoolView>>,
}

/// The offerings a pool has for pods with one node selector: how many the pool admits,
/// the first selector mismatch, and the matching ones with their allocatable less
/// DaemonSets.
#[derive(Default)]
struct PoolView {
    admitted: usize,
    mismatch: Option<String>,
    offers: Vec<(usize, Resources)>,
}

/// The reason given for an unplaced pod when the plan's time limit ran out before its
/// diagnosis.
pub const DIAGNOSIS_SKIPPED: &str = "not placed (no room in the NodePools' offerings or limits; the detail was skipped: the plan's time limit was reached first)";

/// Plan nodes for the pending pods. Pure: the same input gives the same plan (up to
/// the time limit). Scheduling constraints are prepared first (see [`constraints`]).
pub fn plan(input: PlanInput<'_>, options: &PlanOptions) -> Plan {
    let span = info_span!("plan", pods = input.pods.len(), strategy = ?options.strategy);
    let _guard = span.enter();
    let start = Instant::now();
    let prepared = constraints::prepare(&input);
    let prepared_ms = start.elapsed().as_secs_f64() * 1000.0;
    let packing = PlanInput {
        pods: &prepared.pods,
        nodes: &prepared.nodes,
        ..input
    };
    let priority: HashMap<String, i32> = input.pods.iter().map(|p| (p.key(), p.priority)).collect();
    let mut best: Option<(f64, Plan)> = None;
    let plans = plan_packed(packing, &prepared.synthetic, options, start);
    let packed_ms = start.elapsed().as_secs_f64() * 1000.0;
    for (packed_score, mut plan) in plans {
        // The repairs only take pods out (each at a penalty above any node's price) and
        // move nodes between zones within ZONE_BALANCE_TOLERANCE of their price: a
        // packing already dearer than the best finished plan by more than that cannot
        // win, and its repairs (a scheduling check of the whole plan) are skipped.
        if best
            .as_ref()
            .is_some_and(|(b, _)| packed_score * (1.0 - ZONE_BALANCE_TOLERANCE) > *b)
        {
            debug!(packed_score, "dearer packing not finished");
            continue;
        }
        finish_constrained(&input, &packing, &prepared, &mut plan);
        let score = plan.total_price_per_hour
            + plan
                .unschedulable
                .iter()
                .map(|u| unplaced_penalty(priority.get(&u.pod).copied().unwrap_or(0)))
                .sum::<f64>();
        if best.as_ref().is_none_or(|(b, _)| score < *b - 1e-9) {
            best = Some((score, plan));
        }
    }
    let (_, mut plan) = best.expect("the packing returns a plan");
    plan.solve_ms = start.elapsed().as_secs_f64() * 1000.0;
    debug!(
        prepared_ms,
        packed_ms,
        total_ms = plan.solve_ms,
        "planning phases"
    );
    plan
}

/// A packed plan back in the input's terms: bundles expanded, synthetic resources
/// dropped, refused pods and relaxed preferences reported, equal-price zones balanced,
/// spreading repaired where part of a group could not be placed.
fn finish_constrained(
    input: &PlanInput<'_>,
    packing: &PlanInput<'_>,
    prepared: &constraints::Prepared,
    plan: &mut Plan,
) {
    let expand = |pods: &mut Vec<String>| {
        let mut out = Vec::with_capacity(pods.len());
        for p in pods.drain(..) {
            match prepared.bundles.get(&p) {
                Some(members) => out.extend(members.iter().cloned()),
                None => out.push(p),
            }
        }
        *pods = out;
    };
    for n in &mut plan.nodes {
        expand(&mut n.pods);
        n.requested = constraints::strip_synthetic(&n.requested);
    }
    for e in &mut plan.existing_nodes {
        expand(&mut e.pods);
    }
    let mut unschedulable = Vec::new();
    for u in plan.unschedulable.drain(..) {
        match prepared.bundles.get(&u.pod) {
            Some(members) => unschedulable.extend(members.iter().map(|m| Unschedulable {
                pod: m.clone(),
                reason: format!("{} (with the pods it must share a node with)", u.reason),
            })),
            None => unschedulable.push(u),
        }
    }
    unschedulable.extend(prepared.refused.iter().map(|(pod, reason)| Unschedulable {
        pod: pod.clone(),
        reason: reason.clone(),
    }));
    unschedulable.sort_by(|a, b| a.pod.cmp(&b.pod));
    plan.unschedulable = unschedulable;
    plan.relaxed = prepared.relaxed.clone();
    balance_zones(packing, plan);
    repair_spreading(input, plan);
}

/// Pods are pinned to spreading domains as if all of their group got placed; when some
/// could not be (a pool's limit, no room), or the plan puts a node in a domain the pinning
/// did not count, the ones placed may leave a domain over its skew, which kube-scheduler
/// would refuse. Such pods are taken out of the plan (and the
/// new nodes left empty dropped), fullest domain first, until the rule holds.
fn repair_spreading(input: &PlanInput<'_>, plan: &mut Plan) {
    // Even with every pod placed the plan is checked: the pinning counted only the
    // domains a spreading pod could use, and kube-scheduler counts every domain with a
    // node that matches its node affinity (and, under `nodeTaintsPolicy: Ignore`, one
    // it does not tolerate) — a node the plan launches for other pods in a zone where
    // this pod's offerings do not fit is such a domain, and may be the emptiest.
    // (Costs a whole-plan scheduling check per repair: in the planner bench's
    // constrained mix, 1–2 ms at 1,000 pods, ~20 ms at 10,000, 150–210 ms at 50,000.)
    if !input.pods.iter().any(|p| {
        p.constraints
            .as_ref()
            .is_some_and(|c| c.spread.iter().any(|s| s.hard))
    }) {
        return;
    }
    let t0 = Instant::now();
    let mut iterations = 0;
    for _ in 0..input.pods.len() {
        iterations += 1;
        let violation = verify::scheduling_errors(input, plan)
            .into_iter()
            .find(|(pod, e)| pod.is_some() && e.contains("topology spread"));
        let Some((Some(pod), reason)) = violation else {
            break;
        };
        let mut removed = false;
        for n in plan.nodes.iter_mut() {
            if let Some(i) = n.pods.iter().position(|p| *p == pod) {
                n.pods.remove(i);
                removed = true;
            }
        }
        for e in plan.existing_nodes.iter_mut() {
            if let Some(i) = e.pods.iter().position(|p| *p == pod) {
                e.pods.remove(i);
                removed = true;
            }
        }
        if !removed {
            break;
        }
        let detail = reason.split_once(": ").map(|(_, r)| r).unwrap_or(&reason);
        plan.unschedulable.push(Unschedulable {
            pod,
            reason: format!("{detail}: the rest of its group could not all be placed"),
        });
    }
    debug!(
        checks = iterations,
        ms = t0.elapsed().as_secs_f64() * 1000.0,
        "spreading checked"
    );
    plan.existing_nodes.retain(|e| !e.pods.is_empty());
    plan.nodes.retain(|n| !n.pods.is_empty());
    let pods: HashMap<String, &PendingPod> = input.pods.iter().map(|p| (p.key(), p)).collect();
    for n in plan.nodes.iter_mut() {
        let pool = input.pools.iter().find(|p| p.name == n.nodepool);
        let labels = input
            .catalog
            .offering(&n.instance_type, &n.zone, n.capacity_type)
            .map(|o| {
                let mut l = input.catalog.offering_labels(o).clone();
                if let Some(p) = pool {
                    l.extend(p.labels.clone());
                }
                l
            })
            .unwrap_or_default();
        let taints = pool.map(|p| p.taints.clone()).unwrap_or_default();
        n.requested = n.pods.iter().filter_map(|k| pods.get(k)).fold(
            daemonset_overhead(input.daemonsets, &labels, &taints),
            |r, p| r.plus(&p.requests),
        );
    }
    plan.unschedulable.sort_by(|a, b| a.pod.cmp(&b.pod));
    plan.total_up();
    if let Some(lb) = &mut plan.lower_bound_per_hour {
        *lb = lb.min(plan.total_price_per_hour);
    }
}

/// Offerings whose price is within this fraction of a node's are as good as its own: new
/// nodes are spread over such zones rather than all landing in the first.
pub const ZONE_BALANCE_TOLERANCE: f64 = 0.005;

/// Spread new nodes over zones where the same instance type and capacity type cost the
/// same (within [`ZONE_BALANCE_TOLERANCE`]): each movable node goes to the allowed zone
/// with the fewest new nodes so far. A node stays put when a pod on it is pinned to its
/// zone, belongs to a gang, or the pool or the offering's availability says no.
fn balance_zones(input: &PlanInput<'_>, plan: &mut Plan) {
    if plan.nodes.len() < 2 {
        return;
    }
    let catalog = input.catalog;
    let pods: HashMap<String, &PendingPod> = input.pods.iter().map(|p| (p.key(), p)).collect();
    let mut per_zone: BTreeMap<String, usize> = BTreeMap::new();
    for n in &plan.nodes {
        *per_zone.entry(n.zone.clone()).or_default() += 1;
    }
    for i in 0..plan.nodes.len() {
        let node = plan.nodes[i].clone();
        let Some(pool) = input.pools.iter().find(|p| p.name == node.nodepool) else {
            continue;
        };
        let members: Vec<&PendingPod> = node
            .pods
            .iter()
            .filter_map(|k| pods.get(k).copied())
            .collect();
        if members.len() != node.pods.len() || members.iter().any(|p| p.gang.is_some()) {
            continue;
        }
        let here = per_zone.get(&node.zone).copied().unwrap_or(0);
        let mut best: Option<(usize, String, f64)> = None;
        for o in catalog.offerings_of(&node.instance_type) {
            let t = &catalog.types[o.type_index];
            if o.capacity_type != node.capacity_type
                || o.zone == node.zone
                || o.price > node.price_per_hour * (1.0 + ZONE_BALANCE_TOLERANCE)
            {
                continue;
            }
            if input.unavailable.contains(&OfferingKey {
                instance_type: node.instance_type.clone(),
                zone: o.zone.clone(),
                capacity_type: o.capacity_type,
            }) {
                continue;
            }
            let labels = Layered {
                top: &pool.labels,
                base: &o.labels,
            };
            if !pool.requirements.iter().all(|r| r.matches(&labels))
                || !members.iter().all(|p| p.fits_node(&labels, &pool.taints))
            {
                continue;
            }
            let overhead = daemonset_overhead(input.daemonsets, &labels, &pool.taints);
            let requested = members.iter().fold(overhead, |r, p| {
                r.plus(&constraints::strip_synthetic(&p.requests))
            });
            if !requested.fits_in(&t.allocatable) {
                continue;
            }
            let count = per_zone.get(&o.zone).copied().unwrap_or(0);
            if count + 1 < here
                && best
                    .as_ref()
                    .is_none_or(|(c, z, _)| count < *c || (count == *c && o.zone < *z))
            {
                best = Some((count, o.zone.clone(), o.price));
            }
        }
        if let Some((_, zone, price)) = best {
            *per_zone.entry(node.zone.clone()).or_default() -= 1;
            *per_zone.entry(zone.clone()).or_default() += 1;
            let n = &mut plan.nodes[i];
            n.zone = zone;
            n.price_per_hour = price;
            plan.total_up();
        }
    }
}

/// The packing with prepared constraints (`synthetic`: units of each synthetic resource
/// every new node offers): the plans to choose from, best-first as far as known, each
/// with its packing's score (price plus unplaced pods' penalties).
fn plan_packed(
    input: PlanInput<'_>,
    synthetic: &BTreeMap<String, i64>,
    options: &PlanOptions,
    start: Instant,
) -> Vec<(f64, Plan)> {
    let admitted = admitted_offerings(&input, &Dims::for_input(&input), synthetic);
    let run = |strategy: Strategy| {
        let mut planner = Planner::new(
            input,
            PlanOptions {
                strategy,
                ..options.clone()
            },
            start,
            &admitted,
        );
        planner.place_on_existing();
        planner.plan_tiers();
        planner
    };
    match options.strategy {
        Strategy::Greedy => {
            let greedy = run(Strategy::Greedy);
            vec![(greedy.score(), greedy.finish(start))]
        }
        Strategy::Optimal => {
            // The optimal path decides gangs and tiers with its own packings; the greedy
            // path is cheap, so run it too: the caller keeps the better plan (after the
            // constraints' repairs). This makes "never dearer than greedy" hold for the
            // whole plan, not just each packing.
            let optimal = run(Strategy::Optimal);
            let mut greedy = run(Strategy::Greedy);
            debug!(
                optimal = optimal.score(),
                greedy = greedy.score(),
                "optimal and greedy packings"
            );
            greedy.options.strategy = Strategy::Optimal;
            greedy.lower_bound = optimal.lower_bound;
            greedy.bound_note = optimal.bound_note.clone();
            vec![
                (optimal.score(), optimal.finish(start)),
                (greedy.score(), greedy.finish(start)),
            ]
        }
    }
}

/// The objective weight of leaving one pod of this priority unplaced: more than any
/// node costs, and more again for higher priorities.
pub fn unplaced_penalty(priority: i32) -> f64 {
    1000.0 * (1.0 + (priority.max(0) as f64 + 1.0).log10())
}

impl<'a> Planner<'a> {
    fn new(
        input: PlanInput<'a>,
        options: PlanOptions,
        start: Instant,
        admitted: &'a [Vec<Admitted>],
    ) -> Self {
        let dims = Dims::for_input(&input);

        // Group identical pods.
        let mut by_key: HashMap<ClassKey<'_>, usize> = HashMap::new();
        let mut classes: Vec<PodClass> = Vec::new();
        for (i, p) in input.pods.iter().enumerate() {
            let key = (
                &p.requests,
                &p.selector,
                p.tolerations.as_slice(),
                p.priority,
                p.gang.as_deref(),
            );
            let c = *by_key.entry(key).or_insert_with(|| {
                classes.push(PodClass {
                    pods: Vec::new(),
                    rep: i,
                    req: dims.dense(&p.requests),
                    gang: p.gang.clone(),
                });
                classes.len() - 1
            });
            classes[c].pods.push(i);
        }

        let offering_labels = input.catalog.offerings.iter().map(|o| &o.labels).collect();

        // Limits less what the pool's existing nodes already use.
        let limits = input
            .pools
            .iter()
            .map(|pool| {
                let used = existing_pool_usage(&input, &pool.name);
                dims.names
                    .iter()
                    .map(|d| {
                        if pool.zero_limits.contains(d) {
                            return Some(0);
                        }
                        pool.limits
                            .names()
                            .any(|l| l == d)
                            .then(|| (pool.limits.get(d) - used.get(d)).max(0))
                    })
                    .collect()
            })
            .collect();

        // Under a work budget the clock never stops anything (a day is "never" for one
        // plan); the work counts do.
        let deadline = match options.budget {
            Budget::WallClock => start + options.time_limit,
            Budget::Work => start + Duration::from_secs(86_400),
        };
        Planner {
            input,
            options,
            deadline,
            dims,
            classes,
            offering_labels,
            node_charges: input
                .pools
                .iter()
                .map(|p| input.catalog.node_charges(&p.billing).total())
                .collect(),
            admitted,
            limits,
            new_nodes: Vec::new(),
            existing: BTreeMap::new(),
            free: Vec::new(),
            node_order: Vec::new(),
            unschedulable: Vec::new(),
            lower_bound: Some(0.0),
            bound_note: None,
            pool_views: std::cell::RefCell::new(HashMap::new()),
        }
    }

    fn pod(&self, i: usize) -> &PendingPod {
        &self.input.pods[i]
    }

    /// Classes by (cpu, memory) descending — the order pods are offered free room.
    fn ffd_order(&self) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.classes.len()).collect();
        order.sort_by(|a, b| {
            let ka = (self.classes[*a].req[0], self.classes[*a].req[1]);
            let kb = (self.classes[*b].req[0], self.classes[*b].req[1]);
            kb.cmp(&ka).then(a.cmp(b))
        });
        order
    }

    /// Step 2: existing and in-flight nodes' free room (existing first).
    fn place_on_existing(&mut self) {
        let mut nodes: Vec<usize> = (0..self.input.nodes.len()).collect();
        nodes.sort_by_key(|&i| {
            (
                self.input.nodes[i].in_flight,
                self.input.nodes[i].name.clone(),
            )
        });
        let mut free: Vec<Vec<i64>> = self
            .input
            .nodes
            .iter()
            .map(|n| {
                let alloc = self.dims.dense(&n.allocatable);
                let used = self.dims.dense(&n.requested);
                let mut f: Vec<i64> = alloc.iter().zip(&used).map(|(a, u)| a - u).collect();
                // A resource the node does not list is not available on it.
                for (d, name) in self.dims.names.iter().enumerate() {
                    if n.allocatable.get(name) == 0 {
                        f[d] = 0;
                    }
                }
                f
            })
            .collect();
        for c in self.ffd_order() {
            if self.classes[c].gang.is_some() {
                continue;
            }
            for &n in &nodes {
                if self.classes[c].pods.is_empty() {
                    break;
                }
                let node = &self.input.nodes[n];
                let rep = self.pod(self.classes[c].rep);
                if !rep.fits_node(&node.labels, &node.taints) {
                    continue;
                }
                let k = (PackProblem::fit_count(&self.classes[c].req, &free[n]) as usize)
                    .min(self.classes[c].pods.len());
                if k == 0 {
                    continue;
                }
                for (f, r) in free[n].iter_mut().zip(&self.classes[c].req) {
                    *f -= r * k as i64;
                }
                let taken: Vec<usize> = self.classes[c].pods.drain(..k).collect();
                self.existing.entry(n).or_default().extend(taken);
            }
        }
        self.free = free;
        self.node_order = nodes;
    }

    /// Place as many of a gang's pods as fit on existing and in-flight nodes in `zone`
    /// (trial only): the placements (node, class, count) and how many per class.
    fn gang_on_existing(&self, gang: &str, zone: &str) -> (Vec<(usize, usize, usize)>, Vec<u32>) {
        if self.node_order.is_empty() {
            return (Vec::new(), vec![0; self.classes.len()]);
        }
        let mut free = self.free.clone();
        let mut placed = Vec::new();
        let mut taken = vec![0u32; self.classes.len()];
        for c in self.ffd_order() {
            if self.classes[c].gang.as_deref() != Some(gang) {
                continue;
            }
            for &n in &self.node_order {
                let left = self.classes[c].pods.len() as u32 - taken[c];
                if left == 0 {
                    break;
                }
                let node = &self.input.nodes[n];
                if node.labels.get(keys::ZONE).map(String::as_str) != Some(zone) {
                    continue;
                }
                if !self
                    .pod(self.classes[c].rep)
                    .fits_node(&node.labels, &node.taints)
                {
                    continue;
                }
                let k = PackProblem::fit_count(&self.classes[c].req, &free[n]).min(left);
                if k == 0 {
                    continue;
                }
                for (f, r) in free[n].iter_mut().zip(&self.classes[c].req) {
                    *f -= r * k as i64;
                }
                placed.push((n, c, k as usize));
                taken[c] += k;
            }
        }
        (placed, taken)
    }

    /// Step 3.
    fn plan_tiers(&mut self) {
        let mut weights: Vec<i32> = self.input.pools.iter().map(|p| p.weight).collect();
        weights.sort_unstable_by(|a, b| b.cmp(a));
        weights.dedup();
        let mut gangs: Vec<&Gang> = self.input.gangs.iter().collect();
        gangs.sort_by_key(|g| {
            let size = self
                .classes
                .iter()
                .filter(|c| c.gang.as_deref() == Some(&g.name))
                .map(|c| c.pods.len())
                .sum::<usize>();
            let priority = self
                .classes
                .iter()
                .find(|c| c.gang.as_deref() == Some(&g.name))
                .map(|c| self.pod(c.rep).priority)
                .unwrap_or(0);
            (
                std::cmp::Reverse(priority),
                std::cmp::Reverse(size),
                g.name.clone(),
            )
        });
        // Gangs whose pods are not all here cannot start.
        let mut open_gangs: Vec<String> = Vec::new();
        for g in gangs {
            let pending: usize = self
                .classes
                .iter()
                .filter(|c| c.gang.as_deref() == Some(&g.name))
                .map(|c| c.pods.len())
                .sum();
            if pending == 0 {
                continue;
            }
            if (pending as u32) < g.min_member {
                self.reject_gang(
                    &g.name,
                    &format!(
                        "gang {} has {pending} of its minMember {} pods pending",
                        g.name, g.min_member
                    ),
                );
            } else {
                open_gangs.push(g.name.clone());
            }
        }
        for weight in weights {
            let pools: Vec<usize> = (0..self.input.pools.len())
                .filter(|&i| self.input.pools[i].weight == weight)
                .collect();
            let (problem, meta) = self.build_problem(&pools);
            let _tier = info_span!(
                "tier",
                weight,
                options = problem.options.len(),
                classes = problem.classes.len()
            )
            .entered();
            let mut placed_gangs = Vec::new();
            for g in &open_gangs {
                if self.plan_gang(g, &problem, &meta, &pools) {
                    placed_gangs.push(g.clone());
                }
            }
            open_gangs.retain(|g| !placed_gangs.contains(g));

            self.fill_new_nodes();
            let demand: Vec<u32> = self
                .classes
                .iter()
                .map(|c| {
                    if c.gang.is_none() {
                        c.pods.len() as u32
                    } else {
                        0
                    }
                })
                .collect();
            if demand.iter().all(|d| *d == 0) {
                continue;
            }
            let mut sub = problem.clone();
            for (c, d) in sub.classes.iter_mut().zip(&demand) {
                c.demand = *d;
            }
            sub.limits = self.limits.clone();
            let sol = self.solve(&sub, &pools);
            self.commit(&sub, &meta, &sol);
        }
        for g in open_gangs {
            let reason = self.gang_reason(&g);
            self.reject_gang(&g, &reason);
        }
        for c in 0..self.classes.len() {
            let pods = std::mem::take(&mut self.classes[c].pods);
            if pods.is_empty() {
                continue;
            }
            // The time limit holds for the diagnosis too: past it, the reason's detail
            // goes, the deadline does not (thousands of distinct unplaceable shapes
            // took seconds to explain one by one).
            let reason = if Instant::now() < self.deadline {
                self.diagnose(c)
            } else {
                DIAGNOSIS_SKIPPED.to_string()
            };
            self.unschedulable
                .extend(pods.into_iter().map(|p| (p, reason.clone())));
        }
    }

    fn solve(&mut self, p: &PackProblem, pools: &[usize]) -> PackSolution {
        let mut order = pools.to_vec();
        order.sort_by(|a, b| self.input.pools[*a].name.cmp(&self.input.pools[*b].name));
        // Per-node rules as caps where exact (the solution keeps `p`'s indices).
        let rules = &self.dims.synthetic;
        // Gang and tier sub-problems whose pods take no rule are solved as they are.
        let takes_rule = p
            .classes
            .iter()
            .any(|c| c.demand > 0 && c.req.iter().zip(rules).any(|(r, rule)| *rule && *r > 0));
        let capped = if takes_rule {
            std::borrow::Cow::Owned(p.with_caps(rules))
        } else {
            std::borrow::Cow::Borrowed(p)
        };
        let sol = match self.options.strategy {
            Strategy::Greedy => greedy::solve(&capped, &order),
            Strategy::Optimal => optimal::solve(
                &capped,
                &order,
                optimal::Limits {
                    deadline: self.deadline,
                    time_limit: self.options.time_limit,
                    work: (self.options.budget == Budget::Work).then(|| {
                        u64::try_from(self.options.time_limit.as_millis()).unwrap_or(u64::MAX)
                    }),
                    exact: self.options.exact_search,
                },
                self.options.relative_gap,
            ),
        };
        capture::record(self.options.strategy, &capped, &sol);
        match (sol.lower_bound, self.lower_bound) {
            (Some(lb), Some(total)) => self.lower_bound = Some(total + lb),
            _ => {
                self.lower_bound = None;
                if let (None, Some(why)) = (&self.bound_note, sol.bound_missing) {
                    self.bound_note = Some(why.to_string());
                }
            }
        }
        sol
    }

    /// Node options for a tier: every admitted (pool × offering), DaemonSet overhead
    /// subtracted, deduplicated and with dominated options removed.
    fn build_problem(&self, pools: &[usize]) -> (PackProblem, Vec<(usize, usize)>) {
        let catalog = self.input.catalog;
        let classes: Vec<ClassDemand> = self
            .classes
            .iter()
            .map(|c| ClassDemand {
                req: c.req.clone().into(),
                demand: 0,
                penalty: unplaced_penalty(self.pod(c.rep).priority),
                ffd_key: (c.req[0], c.req[1]),
                per_node: u32::MAX,
            })
            .collect();
        let mut options: Vec<NodeChoice> = Vec::new();
        let mut meta: Vec<(usize, usize)> = Vec::new();
        let mut seen: HashMap<(usize, usize, Vec<usize>), usize> = HashMap::new();
        // Classes share few (selector, tolerations) pairs: match each pair once per
        // offering, not each class (1,334 classes × 949 offerings at 50,000 pods).
        let mut selector_groups: HashMap<(&NodeSelector, &[Toleration]), usize> = HashMap::new();
        let group_of: Vec<usize> = self
            .classes
            .iter()
            .map(|c| {
                let pod = self.pod(c.rep);
                let n = selector_groups.len();
                *selector_groups
                    .entry((&pod.selector, pod.tolerations.as_slice()))
                    .or_insert(n)
            })
            .collect();
        let mut group_fits: Vec<Option<bool>> = vec![None; selector_groups.len()];
        // Each class's non-zero requests: the dense vectors carry one dimension per
        // per-node rule (hundreds), of which a class takes one or two.
        let sparse_req: Vec<Vec<(usize, i64)>> = self
            .classes
            .iter()
            .map(|c| {
                c.req
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| **r > 0)
                    .map(|(d, r)| (d, *r))
                    .collect()
            })
            .collect();
        for &pool_index in pools {
            let pool = &self.input.pools[pool_index];
            for adm in &self.admitted[pool_index] {
                let oi = adm.offering;
                let off = &catalog.offerings[oi];
                let t = &catalog.types[off.type_index];
                let labels = Layered {
                    top: &pool.labels,
                    base: self.offering_labels[oi],
                };
                let alloc = adm.alloc.clone();
                group_fits.fill(None);
                let compat: Vec<usize> = (0..self.classes.len())
                    .filter(|&c| {
                        sparse_req[c].iter().all(|(d, r)| alloc[*d] >= *r)
                            && *group_fits[group_of[c]].get_or_insert_with(|| {
                                self.pod(self.classes[c].rep)
                                    .fits_node(&labels, &pool.taints)
                            })
                    })
                    .collect();
                if compat.is_empty() {
                    continue;
                }
                let key = (pool_index, off.type_index, compat.clone());
                // The whole node: instance plus what the pool's nodes cost per node.
                let price = off.price + self.node_charges[pool_index];
                if let Some(&existing) = seen.get(&key) {
                    if price < options[existing].price {
                        options[existing].price = price;
                        meta[existing] = (pool_index, oi);
                    }
                    continue;
                }
                seen.insert(key, options.len());
                options.push(NodeChoice {
                    pool: pool_index,
                    price,
                    alloc,
                    capacity: self.dims.dense(&t.capacity),
                    classes: compat,
                    handle: options.len(),
                });
                meta.push((pool_index, oi));
            }
        }
        // Remove dominated options.
        let limited: Vec<Vec<bool>> = self
            .limits
            .iter()
            .map(|l| l.iter().map(Option::is_some).collect())
            .collect();
        // Every new node offers the same units of the synthetic per-node rules: only the
        // real resources decide dominance.
        let real: Vec<usize> = (0..self.dims.names.len())
            .filter(|&d| !self.dims.synthetic[d])
            .collect();
        let n = options.len();
        let mut keep = vec![true; n];
        for b in 0..n {
            for a in 0..n {
                if a == b || !keep[a] {
                    continue;
                }
                let (oa, ob) = (&options[a], &options[b]);
                if oa.pool != ob.pool || oa.price > ob.price {
                    continue;
                }
                let tie = oa.price == ob.price && oa.alloc == ob.alloc && oa.classes == ob.classes;
                if tie && a > b {
                    continue;
                }
                if real.iter().all(|&d| oa.alloc[d] >= ob.alloc[d])
                    && oa
                        .capacity
                        .iter()
                        .zip(&ob.capacity)
                        .enumerate()
                        .all(|(d, (x, y))| !limited[oa.pool][d] || x <= y)
                    && ob
                        .classes
                        .iter()
                        .all(|c| oa.classes.binary_search(c).is_ok())
                {
                    keep[b] = false;
                    break;
                }
            }
        }
        let mut pruned = Vec::new();
        let mut pruned_meta = Vec::new();
        for (i, (o, m)) in options.into_iter().zip(meta).enumerate() {
            if keep[i] {
                pruned.push(NodeChoice {
                    handle: pruned.len(),
                    ..o
                });
                pruned_meta.push(m);
            }
        }
        debug!(options = n, kept = pruned.len(), "node options");
        (
            PackProblem {
                dims: self.dims.names.len(),
                classes,
                options: pruned,
                limits: self.limits.clone(),
            },
            pruned_meta,
        )
    }

    /// Requests of the DaemonSet pods that would run on such a node (each counts one pod).
    fn daemonset_overhead<L: crate::labels::LabelLookup + ?Sized>(
        &self,
        labels: &L,
        taints: &[Taint],
    ) -> Resources {
        daemonset_overhead(self.input.daemonsets, labels, taints)
    }

    /// Plan one gang alone in each zone; commit the cheapest complete one.
    fn plan_gang(
        &mut self,
        gang: &str,
        problem: &PackProblem,
        meta: &[(usize, usize)],
        pools: &[usize],
    ) -> bool {
        let catalog = self.input.catalog;
        let demand: Vec<u32> = self
            .classes
            .iter()
            .map(|c| {
                if c.gang.as_deref() == Some(gang) {
                    c.pods.len() as u32
                } else {
                    0
                }
            })
            .collect();
        let saved_bound = self.lower_bound;
        type Choice = (
            f64,
            usize,
            Vec<(usize, usize, usize)>,
            PackProblem,
            PackSolution,
            Option<f64>,
        );
        let mut best: Option<Choice> = None;
        for zone in catalog.zones() {
            // Room on existing and in-flight nodes in this zone comes first (it is paid for).
            let (on_existing, taken) = self.gang_on_existing(gang, &zone);
            let rest: Vec<u32> = demand.iter().zip(&taken).map(|(d, t)| d - t).collect();
            // Only this zone's options that can host one of the gang's pods (cloning
            // every option per gang and zone was most of a 50,000-pod greedy plan).
            let options: Vec<_> = problem
                .options
                .iter()
                .filter(|o| {
                    catalog.offerings[meta[o.handle].1].zone == zone
                        && o.classes.iter().any(|&c| rest[c] > 0)
                })
                .cloned()
                .collect();
            let all_on_existing = rest.iter().all(|d| *d == 0);
            if options.is_empty() && !all_on_existing {
                continue;
            }
            let mut sub = PackProblem {
                dims: problem.dims,
                classes: problem.classes.clone(),
                options,
                limits: self.limits.clone(),
            };
            for (c, d) in sub.classes.iter_mut().zip(&rest) {
                c.demand = *d;
            }
            let (cost, sol, lb) = if all_on_existing {
                let sol = PackSolution {
                    nodes: Vec::new(),
                    unplaced: vec![0; rest.len()],
                    lower_bound: Some(0.0),
                    bound_missing: None,
                };
                (0.0, sol, Some(0.0))
            } else {
                if sub.options.is_empty() {
                    continue;
                }
                self.lower_bound = Some(0.0);
                let sol = self.solve(&sub, pools);
                if sol.unplaced.iter().any(|u| *u > 0) {
                    continue;
                }
                (sub.cost(&sol.nodes), sol, self.lower_bound)
            };
            // Cheapest zone; on a tie, the one that uses more existing room.
            let reuse = on_existing.iter().map(|(.., k)| k).sum::<usize>();
            if best
                .as_ref()
                .is_none_or(|(c, r, ..)| cost < *c - 1e-9 || (cost <= *c + 1e-9 && reuse > *r))
            {
                best = Some((cost, reuse, on_existing, sub, sol, lb));
            }
        }
        self.lower_bound = saved_bound;
        match best {
            Some((_, _, on_existing, sub, sol, lb)) => {
                self.lower_bound = match (self.lower_bound, lb) {
                    (Some(a), Some(b)) => Some(a + b),
                    _ => None,
                };
                for (n, c, k) in on_existing {
                    for (f, r) in self.free[n].iter_mut().zip(&self.classes[c].req) {
                        *f -= r * k as i64;
                    }
                    let taken: Vec<usize> = self.classes[c].pods.drain(..k).collect();
                    self.existing.entry(n).or_default().extend(taken);
                }
                self.commit(&sub, meta, &sol);
                true
            }
            None => false,
        }
    }

    /// Record a solution's nodes and take their pods off the classes.
    fn commit(&mut self, p: &PackProblem, meta: &[(usize, usize)], sol: &PackSolution) {
        for node in &sol.nodes {
            let opt = &p.options[node.option];
            let (pool, offering) = meta[opt.handle];
            p.charge_limits(&mut self.limits, node.option);
            let mut used = vec![0i64; self.dims.names.len()];
            let mut pods = Vec::new();
            for (c, k) in &node.counts {
                for (u, r) in used.iter_mut().zip(&self.classes[*c].req) {
                    *u += r * *k as i64;
                }
                pods.extend(self.classes[*c].pods.drain(..*k as usize));
            }
            let mut labels = self.offering_labels[offering].clone();
            labels.extend(
                self.input.pools[pool]
                    .labels
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone())),
            );
            self.new_nodes.push(NewNode {
                pool,
                offering,
                alloc: opt.alloc.clone(),
                used,
                labels,
                pods,
            });
        }
    }

    /// Offer the spare room of nodes planned so far to the remaining (non-gang) pods.
    fn fill_new_nodes(&mut self) {
        for c in self.ffd_order() {
            if self.classes[c].gang.is_some() || self.classes[c].pods.is_empty() {
                continue;
            }
            for n in 0..self.new_nodes.len() {
                if self.classes[c].pods.is_empty() {
                    break;
                }
                let node = &self.new_nodes[n];
                let taints = &self.input.pools[node.pool].taints;
                if !self
                    .pod(self.classes[c].rep)
                    .fits_node(&node.labels, taints)
                {
                    continue;
                }
                let room: Vec<i64> = node
                    .alloc
                    .iter()
                    .zip(&node.used)
                    .map(|(a, u)| a - u)
                    .collect();
                let k = (PackProblem::fit_count(&self.classes[c].req, &room) as usize)
                    .min(self.classes[c].pods.len());
                if k == 0 {
                    continue;
                }
                let req = self.classes[c].req.clone();
                let taken: Vec<usize> = self.classes[c].pods.drain(..k).collect();
                let node = &mut self.new_nodes[n];
                for (u, r) in node.used.iter_mut().zip(&req) {
                    *u += r * k as i64;
                }
                node.pods.extend(taken);
            }
        }
    }

    fn reject_gang(&mut self, gang: &str, reason: &str) {
        for c in 0..self.classes.len() {
            if self.classes[c].gang.as_deref() == Some(gang) {
                let pods = std::mem::take(&mut self.classes[c].pods);
                self.unschedulable
                    .extend(pods.into_iter().map(|p| (p, reason.to_string())));
            }
        }
    }

    fn gang_reason(&self, gang: &str) -> String {
        let pods: usize = self
            .classes
            .iter()
            .filter(|c| c.gang.as_deref() == Some(gang))
            .map(|c| c.pods.len())
            .sum();
        for (c, class) in self.classes.iter().enumerate() {
            if class.gang.as_deref() == Some(gang) && !class.pods.is_empty() {
                let specific = self.diagnose(c);
                if !specific.starts_with("not placed") {
                    return format!("gang {gang} ({pods} pods) cannot be placed: {specific}");
                }
            }
        }
        format!(
            "gang {gang}: its {pods} pods cannot all be placed in one zone within the NodePools' limits"
        )
    }

    /// Why no pool can host a pod of class `c`.
    fn diagnose(&self, c: usize) -> String {
        let pod = self.pod(self.classes[c].rep);
        // The synthetic resources of per-node rules are on every new node (one pod's
        // worth at least): they are never why a pod finds no offering.
        let requests = constraints::strip_synthetic(&pod.requests);
        let catalog = self.input.catalog;
        if self.input.pools.is_empty() {
            return "no NodePools are defined".into();
        }
        let mut reasons = Vec::new();
        for (pi, pool) in self.input.pools.iter().enumerate() {
            let reason = (|| {
                if let Some(t) = untolerated(&pod.tolerations, &pool.taints) {
                    return format!("taint {t} not tolerated");
                }
                // What the pool offers a pod with this selector does not depend on its
                // requests: worked out once per (pool, selector) for all classes, which
                // with thousands of distinct pod shapes was most of the plan's time.
                let key = (pi, pod.selector.clone());
                let mut views = self.pool_views.borrow_mut();
                let view = views.entry(key).or_insert_with(|| {
                    let mut view = PoolView::default();
                    for (oi, off) in catalog.offerings.iter().enumerate() {
                        let labels = Layered {
                            top: &pool.labels,
                            base: self.offering_labels[oi],
                        };
                        if pool.first_rejection(&labels).is_some() {
                            continue;
                        }
                        view.admitted += 1;
                        if let Some(m) = pod.selector.first_mismatch(&labels) {
                            view.mismatch.get_or_insert(m);
                            continue;
                        }
                        let t = &catalog.types[off.type_index];
                        let alloc = t
                            .allocatable
                            .minus(&self.daemonset_overhead(&labels, &pool.taints));
                        view.offers.push((oi, alloc));
                    }
                    view
                });
                let admitted = view.admitted;
                let mismatch = view.mismatch.clone();
                let mut best_alloc = Resources::new();
                let mut fitting = Vec::new();
                for (oi, alloc) in &view.offers {
                    best_alloc = best_alloc.elementwise_max(alloc);
                    if requests.fits_in(alloc) {
                        fitting.push(*oi);
                    }
                }
                drop(views);
                if admitted == 0 {
                    return "no offering in the catalog meets its requirements".to_string();
                }
                if best_alloc.is_empty() {
                    return format!(
                        "no offering matches the pod's {}",
                        mismatch.unwrap_or_default()
                    );
                }
                if fitting.is_empty() {
                    let (name, want, have) = requests
                        .first_excess(&best_alloc)
                        .map(|(n, w, h)| (n.to_string(), w, h))
                        .unwrap_or_default();
                    return if have == 0 {
                        format!(
                            "no offering has {name} (the pod requests {})",
                            format_resource(&name, want)
                        )
                    } else {
                        format!(
                            "no offering has {} {name} allocatable (largest: {})",
                            format_resource(&name, want),
                            format_resource(&name, have)
                        )
                    };
                }
                let all_unavailable = fitting.iter().all(|&oi| {
                    let off = &catalog.offerings[oi];
                    self.input.unavailable.contains(&OfferingKey {
                        instance_type: catalog.types[off.type_index].name().to_string(),
                        zone: off.zone.clone(),
                        capacity_type: off.capacity_type,
                    })
                });
                if all_unavailable {
                    return "every fitting offering is marked unavailable (insufficient capacity)"
                        .to_string();
                }
                let limit_hit = self.limits[pi].iter().enumerate().find_map(|(d, l)| {
                    let l = (*l)?;
                    let name = &self.dims.names[d];
                    let smallest = fitting
                        .iter()
                        .map(|&oi| {
                            catalog.types[catalog.offerings[oi].type_index]
                                .capacity
                                .get(name)
                        })
                        .min()?;
                    (smallest > l).then(|| {
                        format!(
                            "limit {name}={} reached",
                            format_resource(name, pool.limits.get(name))
                        )
                    })
                });
                if let Some(l) = limit_hit {
                    return l;
                }
                if requests != pod.requests {
                    return "not placed: the pods its anti-affinity, topology spread or host ports keep apart need more nodes than the plan could add".to_string();
                }
                format!("not placed (pool weight {} tier exhausted)", pool.weight)
            })();
            reasons.push(format!("nodepool {}: {reason}", pool.name));
        }
        if reasons.len() == 1 {
            reasons.remove(0)
        } else {
            reasons.join("; ")
        }
    }

    /// Price of the new nodes plus the penalty of every unplaced pod.
    fn score(&self) -> f64 {
        let catalog = self.input.catalog;
        let price: f64 = self
            .new_nodes
            .iter()
            .map(|n| catalog.offerings[n.offering].price + self.node_charges[n.pool])
            .sum();
        let penalty: f64 = self
            .unschedulable
            .iter()
            .map(|(p, _)| unplaced_penalty(self.pod(*p).priority))
            .sum();
        price + penalty
    }

    fn finish(self, start: Instant) -> Plan {
        let catalog = self.input.catalog;
        let mut counters: BTreeMap<String, usize> = BTreeMap::new();
        let mut nodes: Vec<PlannedNode> = Vec::new();
        // A new node's name never repeats an existing node's (the checker and the
        // hostname rules tell nodes apart by name).
        let taken: HashSet<&str> = self.input.nodes.iter().map(|n| n.name.as_str()).collect();
        for n in &self.new_nodes {
            let pool = &self.input.pools[n.pool];
            let off = &catalog.offerings[n.offering];
            let t = &catalog.types[off.type_index];
            let counter = counters.entry(pool.name.clone()).or_default();
            *counter += 1;
            while taken.contains(format!("{}-{}", pool.name, counter).as_str()) {
                *counter += 1;
            }
            let mut requested = self.daemonset_overhead(&n.labels, &pool.taints);
            let mut pods: Vec<String> = Vec::with_capacity(n.pods.len());
            for &p in &n.pods {
                requested.add_all(&self.pod(p).requests);
                pods.push(self.pod(p).key());
            }
            nodes.push(PlannedNode {
                name: format!("{}-{}", pool.name, counter),
                nodepool: pool.name.clone(),
                instance_type: t.name().to_string(),
                zone: off.zone.clone(),
                capacity_type: off.capacity_type,
                price_per_hour: off.price,
                node_cost_per_hour: round6(self.node_charges[n.pool]),
                allocatable: t.allocatable.clone(),
                requested,
                pods,
            });
        }
        let existing_nodes = self
            .existing
            .iter()
            .map(|(n, pods)| ExistingPlacement {
                node: self.input.nodes[*n].name.clone(),
                pods: pods.iter().map(|&p| self.pod(p).key()).collect(),
            })
            .collect();
        let mut unschedulable: Vec<Unschedulable> = self
            .unschedulable
            .iter()
            .map(|(p, r)| Unschedulable {
                pod: self.pod(*p).key(),
                reason: r.clone(),
            })
            .collect();
        unschedulable.sort_by(|a, b| a.pod.cmp(&b.pod));
        let total: f64 = nodes.iter().map(PlannedNode::cost_per_hour).sum();
        Plan {
            strategy: self.options.strategy,
            region: catalog.region.clone(),
            total_price_per_hour: round6(total),
            instance_price_per_hour: round6(nodes.iter().map(|n| n.price_per_hour).sum()),
            node_costs_per_hour: round6(nodes.iter().map(|n| n.node_cost_per_hour).sum()),
            lower_bound_per_hour: match self.options.strategy {
                Strategy::Optimal => self.lower_bound.map(|lb| round6(lb.min(total))),
                Strategy::Greedy => None,
            },
            bound_note: match (self.options.strategy, self.lower_bound) {
                (Strategy::Greedy, _) => Some(greedy::NO_BOUND_GREEDY.to_string()),
                (Strategy::Optimal, Some(_)) => None,
                (Strategy::Optimal, None) => Some(
                    self.bound_note
                        .clone()
                        .unwrap_or_else(|| "no bound was proven".to_string()),
                ),
            },
            deadline_reached: self.options.budget == Budget::WallClock
                && Instant::now() >= self.deadline,
            solve_ms: start.elapsed().as_secs_f64() * 1000.0,
            nodes,
            existing_nodes,
            unschedulable,
            relaxed: Vec::new(),
        }
    }
}

/// The capacity a pool's existing and in-flight nodes already take from its limits.
fn existing_pool_usage(input: &PlanInput<'_>, pool: &str) -> Resources {
    input
        .nodes
        .iter()
        .filter(|n| n.nodepool.as_deref() == Some(pool))
        .fold(Resources::new(), |used, n| used.plus(&n.capacity))
}

/// Offerings a planned node may be launched as instead when its own has no capacity:
/// the same capacity type, in the same zone unless no zone rule ties the node's pods
/// (see [`free_to_change_zone`]: an exhausted `g4dn.xlarge` in us-east-1a may then come
/// up in us-east-1b rather than fail), admitted by the
/// node's pool, accepted by every pod planned for it, holding all of them with the
/// DaemonSets that would run there, within the pool's limits given the rest of the
/// plan, at most `max_price_ratio` times the planned price. Cheapest first, at most
/// `max` of them. EC2 then picks among the chosen offering and these in one fleet
/// request, so one exhausted pool does not fail the launch.
pub fn fallback_offerings(
    input: &PlanInput<'_>,
    plan: &Plan,
    node: &PlannedNode,
    max: usize,
    max_price_ratio: f64,
) -> Vec<(OfferingKey, f64)> {
    FallbackContext::new(input, plan).offerings(input, node, max, max_price_ratio)
}

/// [`fallback_offerings`] for every node of the plan, in its order: the pods and the
/// pools' usage are indexed once, not once per node (a 10,000-node plan would otherwise
/// scan every pod and node for each node).
pub fn fallbacks_per_node(
    input: &PlanInput<'_>,
    plan: &Plan,
    max: usize,
    max_price_ratio: f64,
) -> Vec<Vec<(OfferingKey, f64)>> {
    let context = FallbackContext::new(input, plan);
    plan.nodes
        .iter()
        .map(|node| context.offerings(input, node, max, max_price_ratio))
        .collect()
}

/// What every node's fallbacks are worked out against: the pending pods by key, and the
/// capacity each pool's existing, in-flight and planned nodes take from its limits.
struct FallbackContext<'i> {
    pods: HashMap<String, &'i PendingPod>,
    pool_usage: HashMap<&'i str, Resources>,
    /// Pending pods with rules of their own, and running pods with anti-affinity: the
    /// only ones whose rules can tie a node's pods to its zone.
    constrained: Vec<&'i PendingPod>,
    anti_affine_running: Vec<&'i crate::scheduling::PlacedPod>,
    spread_pods: SpreadPods<'i>,
}

/// Per hard zonal spread (namespace, selector) of a pending pod: how many pending and
/// running pods it selects.
type SpreadPods<'i> = HashMap<(&'i str, &'i crate::scheduling::LabelSelector), usize>;

impl<'i> FallbackContext<'i> {
    fn new(input: &PlanInput<'i>, plan: &Plan) -> Self {
        let capacity_of = |name: &str| {
            input
                .catalog
                .instance_type(name)
                .map(|t| t.capacity.clone())
                .unwrap_or_default()
        };
        let mut pool_usage: HashMap<&'i str, Resources> = HashMap::new();
        for pool in input.pools {
            let mut used = existing_pool_usage(input, &pool.name);
            for n in plan.nodes.iter().filter(|n| n.nodepool == pool.name) {
                used = used.plus(&capacity_of(&n.instance_type));
            }
            pool_usage.insert(pool.name.as_str(), used);
        }
        let mut spread_pods: SpreadPods<'i> = HashMap::new();
        for q in input.pods {
            for s in q.constraints.iter().flat_map(|c| &c.spread) {
                if !s.hard || s.topology_key == keys::HOSTNAME {
                    continue;
                }
                spread_pods
                    .entry((q.namespace.as_str(), &s.selector))
                    .or_insert_with(|| {
                        let selects = |namespace: &str, labels: &Labels| {
                            namespace == q.namespace && s.selector.matches(labels)
                        };
                        input
                            .pods
                            .iter()
                            .filter(|p| selects(&p.namespace, &p.labels))
                            .count()
                            + input
                                .running
                                .iter()
                                .filter(|p| selects(&p.namespace, &p.labels))
                                .count()
                    });
            }
        }
        FallbackContext {
            spread_pods,
            pods: input.pods.iter().map(|p| (p.key(), p)).collect(),
            pool_usage,
            constrained: input
                .pods
                .iter()
                .filter(|p| p.constraints.is_some())
                .collect(),
            anti_affine_running: input
                .running
                .iter()
                .filter(|r| !r.anti_affinity.is_empty())
                .collect(),
        }
    }

    fn offerings(
        &self,
        input: &PlanInput<'_>,
        node: &PlannedNode,
        max: usize,
        max_price_ratio: f64,
    ) -> Vec<(OfferingKey, f64)> {
        let Some(pool) = input.pools.iter().find(|p| p.name == node.nodepool) else {
            return Vec::new();
        };
        let catalog = input.catalog;
        // What the pool may still grow by if this node is swapped: its limits less the
        // capacity of its existing nodes and of the plan's other nodes.
        let own = catalog
            .instance_type(&node.instance_type)
            .map(|t| t.capacity.clone())
            .unwrap_or_default();
        let used = self
            .pool_usage
            .get(pool.name.as_str())
            .cloned()
            .unwrap_or_default()
            .minus(&own);
        let pods: Vec<&PendingPod> = node
            .pods
            .iter()
            .filter_map(|k| self.pods.get(k).copied())
            .collect();
        let mut labels = catalog
            .offering(&node.instance_type, &node.zone, node.capacity_type)
            .map(|o| catalog.offering_labels(o).clone())
            .unwrap_or_default();
        labels.extend(pool.labels.clone());
        let any_zone = free_to_change_zone(
            &self.spread_pods,
            &self.constrained,
            &self.anti_affine_running,
            &pods,
            &labels,
            &pool.taints,
        );
        fallbacks_for(
            input,
            pool,
            node,
            &pods,
            any_zone,
            &used,
            max,
            max_price_ratio,
        )
    }
}

#[allow(clippy::too_many_arguments)]
fn fallbacks_for(
    input: &PlanInput<'_>,
    pool: &NodePool,
    node: &PlannedNode,
    pods: &[&PendingPod],
    any_zone: bool,
    used: &Resources,
    max: usize,
    max_price_ratio: f64,
) -> Vec<(OfferingKey, f64)> {
    let catalog = input.catalog;
    let within_limits = |capacity: &Resources| {
        pool.limits
            .names()
            .all(|d| used.get(d) + capacity.get(d) <= pool.limits.get(d))
            && pool.zero_limits.iter().all(|d| capacity.get(d) == 0)
    };
    let requests = pods
        .iter()
        .fold(Resources::new(), |acc, p| acc.plus(&p.requests));
    let mut out: Vec<(OfferingKey, f64)> = catalog
        .offerings
        .iter()
        .filter(|o| (o.zone == node.zone || any_zone) && o.capacity_type == node.capacity_type)
        .filter(|o| o.price <= node.price_per_hour * max_price_ratio)
        .filter_map(|o| {
            let t = &catalog.types[o.type_index];
            if (t.name() == node.instance_type && o.zone == node.zone)
                || !within_limits(&t.capacity)
            {
                return None;
            }
            let key = OfferingKey {
                instance_type: t.name().to_string(),
                zone: o.zone.clone(),
                capacity_type: o.capacity_type,
            };
            if input.unavailable.contains(&key) {
                return None;
            }
            let labels = Layered {
                top: &pool.labels,
                base: catalog.offering_labels(o),
            };
            if pool.unlaunchable.contains(t.name())
                || !pool.requirements.iter().all(|r| r.matches(&labels))
                || !pods.iter().all(|p| p.fits_node(&labels, &pool.taints))
            {
                return None;
            }
            let overhead = daemonset_overhead(input.daemonsets, &labels, &pool.taints);
            requests
                .plus(&overhead)
                .fits_in(&t.allocatable)
                .then_some((key, o.price))
        })
        .collect();
    // Cheapest first; at one price, the planned zone first.
    out.sort_by(|a, b| {
        a.1.total_cmp(&b.1)
            .then_with(|| (a.0.zone != node.zone).cmp(&(b.0.zone != node.zone)))
            .then_with(|| a.0.cmp(&b.0))
    });
    out.truncate(max);
    out
}

/// May a node holding `pods` come up in another zone? Only when nothing ties them to
/// the zone the plan chose: no gang (its members share a zone), no constraints of their
/// own (spread, pod (anti-)affinity, volumes, which the plan pinned to a zone), and no
/// zone-level rule of another pod — pending or running — that selects them (its
/// affinity, anti-affinity or spread counts them where they are), and no pending pod's
/// hard zonal spread that counts this node (its node affinity and, if honoured, its
/// taints): in another zone the node may be a new, empty domain for it. Node selectors and
/// pool requirements on the zone are checked per offering by the caller.
fn free_to_change_zone(
    spread_pods: &SpreadPods<'_>,
    constrained: &[&PendingPod],
    running: &[&crate::scheduling::PlacedPod],
    pods: &[&PendingPod],
    node_labels: &Labels,
    node_taints: &[Taint],
) -> bool {
    if pods
        .iter()
        .any(|p| p.gang.is_some() || p.constraints.is_some())
    {
        return false;
    }
    let zonal = |key: &str| key != keys::HOSTNAME;
    let term_selects = |t: &crate::scheduling::AffinityTerm| {
        zonal(&t.topology_key) && pods.iter().any(|p| t.selects(&p.namespace, &p.labels))
    };
    // A hard zonal spread ties every node, not only those holding its pods: a node
    // that comes up in a zone none of the plan's nodes were in is a new domain for it
    // (kube-scheduler counts every zone with a node matching the pod's node affinity),
    // holding none of its pods.
    let pending_tie = constrained.iter().any(|q| {
        q.constraints.as_ref().is_some_and(|c| {
            c.affinity.iter().any(term_selects)
                || c.anti_affinity.iter().any(term_selects)
                || c.spread.iter().any(|s| {
                    // Whether kube-scheduler counts this node as a domain of q's.
                    let counted = (!s.honor_node_affinity || q.selector.matches(node_labels))
                        && (!s.honor_taints || untolerated(&q.tolerations, node_taints).is_none());
                    // A new empty domain breaks the rule only where a domain holds more
                    // than maxSkew of its pods: not if all of them, pending and
                    // running, are no more than that.
                    let crowded = || {
                        spread_pods
                            .get(&(q.namespace.as_str(), &s.selector))
                            .is_some_and(|n| *n > s.max_skew.max(0) as usize)
                    };
                    zonal(&s.topology_key)
                        && ((s.hard && counted && crowded())
                            || pods.iter().any(|p| {
                                p.namespace == q.namespace && s.selector.matches(&p.labels)
                            }))
                })
        })
    });
    let running_tie = running
        .iter()
        .any(|r| r.anti_affinity.iter().any(term_selects));
    !pending_tie && !running_tie
}

/// Requests of the DaemonSet pods that would run on a node with these labels and taints.
pub fn daemonset_overhead<L: crate::labels::LabelLookup + ?Sized>(
    daemonsets: &[DaemonSetOverhead],
    labels: &L,
    taints: &[Taint],
) -> Resources {
    daemonsets
        .iter()
        .filter(|ds| ds.runs_on(labels, taints))
        .fold(Resources::new(), |acc, ds| acc.plus(&ds.requests))
}

fn round6(x: f64) -> f64 {
    // `+ 0.0` turns a negative zero (an empty sum rounded) into zero: no "$-0.0000".
    (x * 1e6).round() / 1e6 + 0.0
}
