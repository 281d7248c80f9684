//! `cooper report --live`: the cost report for the running cluster, read-only. What
//! cooper launched (from the NodeClaims: type, zone, capacity type, the price recorded at
//! launch), how full each node is (requests of the pods bound to it against its
//! allocatable), what sits empty, and what the same pods would cost if planned again now
//! by the optimal planner, by Karpenter-style first-fit, and on on-demand only.
//!
//! Prices are the catalog's (the embedded table, or the live EC2 catalog's spot prices),
//! not billing data.

use std::collections::BTreeMap;

use kube::ResourceExt;
use serde::Serialize;

use super::{Context, Controller, holding_node, is_node_agent, pod_demand, quantities};
use crate::cloud::CloudProvider;
use crate::nodepool::NodePool;
use crate::planner::{self, PlanInput, PlanOptions, Strategy};
use crate::resources::{self, Resources};
use crate::workload::{self, Gang, PendingPod};

/// One node cooper launched.
#[derive(Debug, Clone, Serialize)]
pub struct LiveNode {
    pub nodeclaim: String,
    pub node: Option<String>,
    pub nodepool: String,
    pub instance_type: String,
    pub zone: String,
    pub capacity_type: String,
    /// The instance's price.
    pub price_per_hour: f64,
    /// Its volumes, public address and per-node cost, from its pool's NodeClass.
    pub node_cost_per_hour: f64,
    /// Pods other than DaemonSet and mirror pods.
    pub pods: usize,
    /// Requested / allocatable, percent, for the resources the node has.
    pub utilisation: BTreeMap<String, f64>,
}

/// Nodes and price for one instance type, capacity type or pool.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Group {
    pub nodes: usize,
    pub price_per_hour: f64,
}

/// What the pods on cooper's nodes would cost if planned again from scratch.
#[derive(Debug, Clone, Serialize)]
pub struct Replan {
    pub pods: usize,
    pub optimal_per_hour: f64,
    pub greedy_per_hour: f64,
    pub on_demand_only_per_hour: f64,
    /// Pods no plan could place (e.g. their pool's limit is lowered now).
    pub unschedulable: usize,
}

/// The live cost report.
#[derive(Debug, Clone, Serialize)]
pub struct LiveReport {
    pub region: String,
    pub nodes: Vec<LiveNode>,
    /// Instances plus per-node costs (what the re-plans below are priced as).
    pub total_price_per_hour: f64,
    /// The per-node part of it.
    pub node_costs_per_hour: f64,
    /// Fraction of the hourly price on spot.
    pub spot_share: f64,
    /// Nodes running no pods but DaemonSet and mirror pods, and what they cost.
    pub empty_nodes: usize,
    pub empty_price_per_hour: f64,
    /// Requested / allocatable over all registered nodes, percent.
    pub utilisation: BTreeMap<String, f64>,
    pub by_instance_type: BTreeMap<String, Group>,
    pub by_capacity_type: BTreeMap<String, Group>,
    pub by_nodepool: BTreeMap<String, Group>,
    pub replan: Replan,
}

/// The resources utilisation is reported for.
const REPORTED: [&str; 4] = [
    resources::CPU,
    resources::MEMORY,
    resources::NVIDIA_GPU,
    resources::NEURON,
];

fn percent(requested: &Resources, allocatable: &Resources) -> BTreeMap<String, f64> {
    REPORTED
        .iter()
        .filter(|r| allocatable.get(r) > 0)
        .map(|r| {
            let p = 100.0 * requested.get(r) as f64 / allocatable.get(r) as f64;
            (r.to_string(), (p * 10.0).round() / 10.0)
        })
        .collect()
}

fn round(x: f64) -> f64 {
    crate::report::round(x, 6)
}

impl<C: CloudProvider + Send + Sync + 'static> Controller<C> {
    /// The cost report for the cluster as the caches see it now (no writes).
    pub fn live_report(&self) -> LiveReport {
        self.context().live_report()
    }
}

impl<C: CloudProvider + Send + Sync + 'static> Context<C> {
    /// The cost report for the cluster as the caches see it now (no writes).
    pub fn live_report(&self) -> LiveReport {
        let volumes = self.volumes();
        let node_objects = self.stores.nodes_by_name();
        // Requests of the pods bound to each node, and the pods to re-plan.
        let mut requested: BTreeMap<String, Resources> = BTreeMap::new();
        let mut workload_pods: BTreeMap<String, usize> = BTreeMap::new();
        let mut on_cooper_nodes: Vec<PendingPod> = Vec::new();
        let cooper_nodes: std::collections::BTreeSet<String> = self
            .stores
            .nodeclaims
            .state()
            .iter()
            .filter_map(|c| c.status.as_ref()?.node_name.clone())
            .collect();
        for pod in self.stores.pods.state() {
            let Some(node) = holding_node(&pod) else {
                continue;
            };
            if let Some(spec) = &pod.spec
                && let Ok(r) = workload::effective_requests(spec)
            {
                let e = requested.entry(node.clone()).or_default();
                *e = e.plus(&r);
            }
            if is_node_agent(&pod) {
                continue;
            }
            *workload_pods.entry(node.clone()).or_default() += 1;
            if !cooper_nodes.contains(&node) {
                continue;
            }
            if let Ok(Some(p)) = pod_demand(&pod, &volumes) {
                on_cooper_nodes.push(p);
            }
        }

        let charges: BTreeMap<String, f64> = self
            .readable_pools()
            .iter()
            .map(|p| {
                (
                    p.name.clone(),
                    self.catalog().node_charges(&p.billing).total(),
                )
            })
            .collect();
        let mut nodes = Vec::new();
        let (mut total_requested, mut total_allocatable) = (Resources::new(), Resources::new());
        for claim in self.stores.nodeclaims.state() {
            let Some(status) = claim.status.clone() else {
                continue;
            };
            let (Some(instance_type), Some(price)) =
                (status.instance_type.clone(), status.price_per_hour)
            else {
                continue; // not launched yet
            };
            let node = status.node_name.clone();
            let allocatable = node
                .as_ref()
                .and_then(|n| node_objects.get(n))
                .map(|n| quantities(n.status.as_ref().and_then(|s| s.allocatable.as_ref())))
                .unwrap_or_default();
            let used = node
                .as_ref()
                .and_then(|n| requested.get(n))
                .cloned()
                .unwrap_or_default();
            total_requested = total_requested.plus(&used);
            total_allocatable = total_allocatable.plus(&allocatable);
            nodes.push(LiveNode {
                nodeclaim: claim.name_any(),
                pods: node
                    .as_ref()
                    .and_then(|n| workload_pods.get(n))
                    .copied()
                    .unwrap_or(0),
                node,
                nodepool: claim.spec.node_pool.clone(),
                instance_type,
                zone: status.zone.clone().unwrap_or_default(),
                capacity_type: status.capacity_type.clone().unwrap_or_default(),
                price_per_hour: price,
                node_cost_per_hour: round(
                    charges
                        .get(&claim.spec.node_pool)
                        .copied()
                        .unwrap_or_else(|| {
                            self.catalog().node_charges(&Default::default()).total()
                        }),
                ),
                utilisation: percent(&used, &allocatable),
            });
        }
        nodes.sort_by(|a, b| a.nodeclaim.cmp(&b.nodeclaim));

        let cost = |n: &LiveNode| n.price_per_hour + n.node_cost_per_hour;
        let total: f64 = nodes.iter().map(cost).sum();
        let spot: f64 = nodes
            .iter()
            .filter(|n| n.capacity_type == "spot")
            .map(cost)
            .sum();
        let empty: Vec<&LiveNode> = nodes
            .iter()
            .filter(|n| n.node.is_some() && n.pods == 0)
            .collect();
        let group = |key: fn(&LiveNode) -> &str| {
            let mut out: BTreeMap<String, Group> = BTreeMap::new();
            for n in &nodes {
                let g = out.entry(key(n).to_string()).or_default();
                g.nodes += 1;
                g.price_per_hour = round(g.price_per_hour + cost(n));
            }
            out
        };

        LiveReport {
            region: self.catalog().region.clone(),
            by_instance_type: group(|n| &n.instance_type),
            by_capacity_type: group(|n| &n.capacity_type),
            by_nodepool: group(|n| &n.nodepool),
            total_price_per_hour: round(total),
            node_costs_per_hour: round(nodes.iter().map(|n| n.node_cost_per_hour).sum()),
            spot_share: if total > 0.0 {
                round(spot / total)
            } else {
                0.0
            },
            empty_nodes: empty.len(),
            empty_price_per_hour: round(empty.iter().map(|n| cost(n)).sum()),
            utilisation: percent(&total_requested, &total_allocatable),
            replan: self.replan(on_cooper_nodes),
            nodes,
        }
    }

    /// Plan these pods from scratch three ways: optimal, greedy, on-demand only.
    fn replan(&self, pods: Vec<PendingPod>) -> Replan {
        let pools = self.readable_pools();
        let catalog = self.catalog();
        let daemonsets = self.daemonsets();
        let unavailable = Default::default();
        let run = |pods: &[PendingPod], pools: &[NodePool], strategy| {
            let gangs = Gang::of_pending(pods);
            let input = PlanInput {
                pods,
                pools,
                catalog: &catalog,
                daemonsets: &daemonsets,
                gangs: &gangs,
                nodes: &[],
                unavailable: &unavailable,
                running: &[],
            };
            planner::plan(
                input,
                &PlanOptions {
                    strategy,
                    time_limit: self.settings.time_limit,
                    relative_gap: 0.01,
                    budget: crate::planner::Budget::WallClock,
                    exact_search: true,
                },
            )
        };
        let optimal = run(&pods, &pools, Strategy::Optimal);
        let greedy = run(&pods, &pools, Strategy::Greedy);
        let mut on_demand_pools = pools.clone();
        crate::nodepool::restrict_to_on_demand(&mut on_demand_pools);
        let mut on_demand_pods = pods.clone();
        for p in &mut on_demand_pods {
            p.selector.drop_capacity_type();
        }
        let on_demand = run(&on_demand_pods, &on_demand_pools, Strategy::Optimal);
        Replan {
            pods: pods.len(),
            optimal_per_hour: optimal.total_price_per_hour,
            greedy_per_hour: greedy.total_price_per_hour,
            on_demand_only_per_hour: on_demand.total_price_per_hour,
            unschedulable: optimal.unschedulable.len(),
        }
    }
}
