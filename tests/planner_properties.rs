//! Property test: random catalogs, NodePools, pods (with selectors, affinity,
//! tolerations, priorities, gangs), DaemonSets and existing nodes. Every plan of both
//! strategies must pass the independent checker, and `optimal` must never be worse
//! than `greedy` (fewer pods placed, or dearer for the same pods).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use cooper::catalog::{Catalog, CatalogFile, GpuSpec, InstanceTypeSpec, NeuronSpec, SpotSpec};
use cooper::labels::{
    Labels, NodeSelector, Operator, Requirement, Taint, TaintEffect, Toleration, keys,
};
use cooper::mix::SplitMix64;
use cooper::nodepool::{NodePool, NodePoolSpec, NodeTemplate, NodeTemplateSpec, RequirementSpec};
use cooper::planner::{
    self, ExistingNode, Plan, PlanInput, PlanOptions, Strategy, unplaced_penalty,
};
use cooper::resources::{self, Resources};
use cooper::workload::{DaemonSetOverhead, Gang, PendingPod};
use proptest::prelude::*;

const ZONES: [&str; 3] = ["z-a", "z-b", "z-c"];
const GIB: i64 = 1 << 30;

struct Instance {
    catalog: Catalog,
    pools: Vec<NodePool>,
    pods: Vec<PendingPod>,
    daemonsets: Vec<DaemonSetOverhead>,
    gangs: Vec<Gang>,
    nodes: Vec<ExistingNode>,
    running: Vec<cooper::scheduling::PlacedPod>,
}

/// A scheduling constraint for about a third of the classes: zone or capacity-type
/// spreading, hostname or zone anti-affinity, hostname spreading, a host port, hostname
/// affinity (a group on one node), or preferences.
fn random_constraints(
    rng: &mut SplitMix64,
    c: usize,
) -> Option<std::sync::Arc<cooper::scheduling::PodConstraints>> {
    use cooper::scheduling::*;
    let app = LabelSelector {
        match_labels: [("app".to_string(), format!("c{c}"))].into(),
        expressions: Vec::new(),
    };
    let term = |key: &str| AffinityTerm {
        selector: app.clone(),
        namespaces: Namespaces::List(["ns".to_string()].into()),
        topology_key: key.into(),
    };
    let spread = |key: &str, skew: i32, hard: bool| SpreadConstraint {
        max_skew: skew,
        topology_key: key.into(),
        hard,
        min_domains: None,
        selector: app.clone(),
        honor_node_affinity: true,
        honor_taints: false,
    };
    let mut out = PodConstraints::default();
    match rng.below(24) {
        0 => out.spread.push(spread(keys::ZONE, 1, true)),
        1 => out.spread.push(spread(keys::CAPACITY_TYPE, 1, true)),
        2 => out.spread.push(spread(keys::HOSTNAME, 2, true)),
        3 => out.anti_affinity.push(term(keys::HOSTNAME)),
        4 => out.anti_affinity.push(term(keys::ZONE)),
        5 => out.host_ports.push(HostPort {
            protocol: "TCP".into(),
            port: 8000 + c as i32,
        }),
        6 => out.affinity.push(term(keys::HOSTNAME)),
        7 => {
            out.spread.push(spread(keys::ZONE, 1, false));
            out.preferred_anti_affinity.push(term(keys::HOSTNAME));
        }
        _ => return None,
    }
    Some(std::sync::Arc::new(out))
}

fn pick<'a, T>(rng: &mut SplitMix64, items: &'a [T]) -> &'a T {
    &items[rng.below(items.len() as u64) as usize]
}

fn random_catalog(rng: &mut SplitMix64, n_types: usize) -> Catalog {
    let mut types = Vec::new();
    for i in 0..n_types {
        let vcpu = *pick(rng, &[2u32, 4, 8, 16, 32]);
        let memory_mib = vcpu as u64 * *pick(rng, &[2u64, 4, 8]) * 1024;
        let kind = rng.below(4);
        let family = match kind {
            0 => "gpu",
            1 => "nrn",
            _ => pick(rng, &["cpu", "mem"]),
        };
        let gpu = (kind == 0).then(|| GpuSpec {
            count: *pick(rng, &[1u32, 4, 8]),
            manufacturer: "nvidia".into(),
            name: "t4".into(),
            memory_mib: 16384,
        });
        let neuron = (kind == 1).then(|| NeuronSpec {
            count: *pick(rng, &[1u32, 4]),
            name: "inferentia".into(),
            cores: 4,
        });
        let mut zones: Vec<String> = ZONES
            .iter()
            .filter(|_| rng.below(3) > 0)
            .map(|z| z.to_string())
            .collect();
        if zones.is_empty() {
            zones.push(ZONES[0].into());
        }
        types.push(InstanceTypeSpec {
            name: format!("{family}{}.{}x", i, vcpu),
            vcpu,
            memory_mib,
            architecture: pick(rng, &["amd64", "amd64", "arm64"]).to_string(),
            max_network_interfaces: 3,
            ipv4_per_interface: *pick(rng, &[4u32, 10, 15]),
            gpu,
            neuron,
            on_demand_price: (vcpu as f64 * 0.05 + if kind == 0 { 1.0 } else { 0.0 })
                * (0.8 + rng.unit() * 0.4),
            spot: (rng.below(3) > 0).then(|| SpotSpec {
                savings_percent: 30.0 + rng.unit() * 50.0,
                interruption: "<5%".into(),
                prices: BTreeMap::new(),
            }),
            zones_assumed: false,
            zones,
        });
    }
    Catalog::from_file(CatalogFile {
        api_version: "cooper.dev/v1alpha1".into(),
        kind: "Catalog".into(),
        region: "test-1".into(),
        allocatable: Default::default(),
        node_costs: Default::default(),
        instance_types: types,
    })
    .expect("random catalog is valid")
}

fn random_pools(rng: &mut SplitMix64, n: usize) -> Vec<NodePool> {
    (0..n)
        .map(|i| {
            let mut requirements = Vec::new();
            if rng.below(2) == 0 {
                let v = pick(
                    rng,
                    &[vec!["spot"], vec!["on-demand"], vec!["spot", "on-demand"]],
                )
                .clone();
                requirements.push(RequirementSpec {
                    key: "karpenter.sh/capacity-type".into(),
                    operator: Operator::In,
                    values: v.iter().map(|s| s.to_string()).collect(),
                    min_values: None,
                });
            }
            if rng.below(3) == 0 {
                requirements.push(RequirementSpec {
                    key: keys::ARCH.into(),
                    operator: Operator::In,
                    values: vec!["amd64".into()],
                    min_values: None,
                });
            }
            if rng.below(4) == 0 {
                requirements.push(RequirementSpec {
                    key: keys::INSTANCE_CPU.into(),
                    operator: Operator::Lt,
                    values: vec!["17".into()],
                    min_values: None,
                });
            }
            let taints = if rng.below(3) == 0 {
                vec![Taint {
                    key: "dedicated".into(),
                    value: Some(format!("p{i}")),
                    effect: TaintEffect::NoSchedule,
                }]
            } else {
                Vec::new()
            };
            let mut limits = BTreeMap::new();
            if rng.below(3) == 0 {
                limits.insert("cpu".to_string(), (16 + 16 * rng.below(4)).to_string());
            }
            if rng.below(4) == 0 {
                limits.insert(
                    resources::NVIDIA_GPU.to_string(),
                    (4 + 4 * rng.below(3)).to_string(),
                );
            }
            let spec = NodePoolSpec {
                weight: Some(*pick(rng, &[0, 10, 10])),
                template: NodeTemplate {
                    metadata: Default::default(),
                    spec: NodeTemplateSpec {
                        requirements,
                        taints,
                        ..Default::default()
                    },
                },
                limits,
                ..Default::default()
            };
            NodePool::from_spec(&format!("pool{i}"), &spec).expect("random pool is valid")
        })
        .collect()
}

fn random_pods(
    rng: &mut SplitMix64,
    n_classes: usize,
    pools: &[NodePool],
) -> (Vec<PendingPod>, Vec<Gang>) {
    let mut pods = Vec::new();
    let mut gangs = Vec::new();
    for c in 0..n_classes {
        let mut requests = Resources::from_pairs([
            (resources::CPU, 100 * (1 + rng.below(40)) as i64),
            (resources::MEMORY, (1 + rng.below(24)) as i64 * GIB / 2),
            (resources::PODS, 1),
        ]);
        match rng.below(6) {
            0 => requests.set(resources::NVIDIA_GPU, *pick(rng, &[1i64, 1, 2, 4, 8])),
            1 => requests.set(resources::NEURON, *pick(rng, &[1i64, 2])),
            2 if rng.below(4) == 0 => requests.set("example.com/fpga", 1),
            _ => {}
        }
        let mut selector = NodeSelector::default();
        match rng.below(6) {
            0 => {
                selector
                    .match_labels
                    .insert(keys::ZONE.into(), pick(rng, &ZONES).to_string());
            }
            1 => {
                selector.match_labels.insert(
                    keys::CAPACITY_TYPE.into(),
                    pick(rng, &["spot", "on-demand"]).to_string(),
                );
            }
            2 => {
                selector.terms = vec![
                    vec![Requirement::new(keys::ARCH, Operator::In, vec!["arm64".into()]).unwrap()],
                    vec![
                        Requirement::new(keys::INSTANCE_CPU, Operator::Gt, vec!["4".into()])
                            .unwrap(),
                    ],
                ];
            }
            3 => {
                selector.terms = vec![vec![
                    Requirement::new(keys::ZONE, Operator::NotIn, vec![ZONES[0].into()]).unwrap(),
                ]];
            }
            _ => {}
        }
        let mut tolerations = Vec::new();
        if rng.below(2) == 0 && !pools.is_empty() {
            let pool = pick(rng, pools);
            for t in &pool.taints {
                tolerations.push(Toleration {
                    key: Some(t.key.clone()),
                    exists: false,
                    value: t.value.clone(),
                    effect: Some(t.effect),
                });
            }
        }
        let priority = *pick(rng, &[0, 0, 100]);
        let count = 1 + rng.below(8) as usize;
        let constraints = random_constraints(rng, c);
        let gang = (constraints.is_none() && rng.below(6) == 0).then(|| format!("ns/gang{c}"));
        if let Some(g) = &gang {
            gangs.push(Gang {
                name: g.clone(),
                min_member: count as u32,
            });
        }
        for k in 0..count {
            pods.push(PendingPod {
                namespace: "ns".into(),
                name: format!("c{c}-{k}"),
                requests: requests.clone(),
                selector: selector.clone(),
                tolerations: tolerations.clone(),
                priority,
                gang: gang.clone(),
                workload: format!("Deployment ns/c{c}"),
                labels: [("app".to_string(), format!("c{c}"))].into(),
                constraints: constraints.clone(),
            });
        }
    }
    (pods, gangs)
}

fn random_instance(
    seed: u64,
    n_types: usize,
    n_pools: usize,
    n_classes: usize,
    n_nodes: usize,
) -> Instance {
    let mut rng = SplitMix64::new(seed);
    let catalog = random_catalog(&mut rng, n_types);
    let pools = random_pools(&mut rng, n_pools);
    let (pods, gangs) = random_pods(&mut rng, n_classes, &pools);
    let daemonsets = if rng.below(2) == 0 {
        vec![DaemonSetOverhead {
            name: "kube-system/agent".into(),
            requests: Resources::from_pairs([
                (resources::CPU, 100),
                (resources::MEMORY, GIB / 4),
                (resources::PODS, 1),
            ]),
            selector: NodeSelector::default(),
            tolerations: vec![Toleration {
                key: None,
                exists: true,
                value: None,
                effect: None,
            }],
        }]
    } else {
        Vec::new()
    };
    let nodes: Vec<ExistingNode> = (0..n_nodes)
        .map(|i| {
            let t = &catalog.types[rng.below(catalog.types.len() as u64) as usize];
            let mut labels: Labels = t.labels.clone();
            labels.insert(keys::ZONE.into(), pick(&mut rng, &ZONES).to_string());
            let pool = (!pools.is_empty() && rng.below(2) == 0)
                .then(|| pick(&mut rng, &pools).name.clone());
            let used = t
                .allocatable
                .iter()
                .map(|(k, v)| (k.to_string(), v * rng.below(100) as i64 / 100))
                .collect::<Vec<_>>();
            ExistingNode {
                name: format!("node-{i}"),
                nodepool: pool,
                labels,
                taints: Vec::new(),
                allocatable: t.allocatable.clone(),
                capacity: t.capacity.clone(),
                requested: Resources::from_pairs(used),
                in_flight: rng.below(2) == 0,
            }
        })
        .collect();
    // Pods running on the existing nodes: some of the same apps (they count for spreading
    // and anti-affinity), some holding the host ports or keeping others away.
    let running = nodes
        .iter()
        .filter_map(|n: &ExistingNode| {
            if rng.below(2) == 0 {
                return None;
            }
            let c = rng.below(n_classes.max(1) as u64) as usize;
            let mut p = cooper::scheduling::PlacedPod {
                namespace: "ns".into(),
                labels: [("app".to_string(), format!("c{c}"))].into(),
                node: n.name.clone(),
                anti_affinity: Vec::new(),
                host_ports: Vec::new(),
            };
            if rng.below(3) == 0 {
                p.host_ports.push(cooper::scheduling::HostPort {
                    protocol: "TCP".into(),
                    port: 8000 + c as i32,
                });
            }
            if rng.below(4) == 0 {
                p.anti_affinity.push(cooper::scheduling::AffinityTerm {
                    selector: cooper::scheduling::LabelSelector {
                        match_labels: [(
                            "app".to_string(),
                            format!("c{}", rng.below(n_classes.max(1) as u64)),
                        )]
                        .into(),
                        expressions: Vec::new(),
                    },
                    namespaces: cooper::scheduling::Namespaces::List(["ns".to_string()].into()),
                    topology_key: keys::HOSTNAME.into(),
                });
            }
            Some(p)
        })
        .collect();
    Instance {
        catalog,
        pools,
        pods,
        daemonsets,
        gangs,
        nodes,
        running,
    }
}

fn score(plan: &Plan, pods: &[PendingPod]) -> f64 {
    let priority: BTreeMap<String, i32> = pods.iter().map(|p| (p.key(), p.priority)).collect();
    plan.total_price_per_hour
        + plan
            .unschedulable
            .iter()
            .map(|u| unplaced_penalty(priority[&u.pod]))
            .sum::<f64>()
}

fn check(inst: &Instance) -> Result<(), TestCaseError> {
    let unavailable = BTreeSet::new();
    let input = PlanInput {
        pods: &inst.pods,
        pools: &inst.pools,
        catalog: &inst.catalog,
        daemonsets: &inst.daemonsets,
        gangs: &inst.gangs,
        nodes: &inst.nodes,
        unavailable: &unavailable,
        running: &inst.running,
    };
    let mut plans = Vec::new();
    for strategy in [Strategy::Greedy, Strategy::Optimal] {
        let plan = planner::plan(
            input,
            &PlanOptions {
                strategy,
                time_limit: Duration::from_secs(5),
                relative_gap: 0.01,
                budget: planner::Budget::WallClock,
                exact_search: true,
            },
        );
        let problems = planner::verify::verify(&input, &plan);
        prop_assert!(
            problems.is_empty(),
            "{strategy:?} plan fails its check: {problems:#?}"
        );
        check_fallbacks(&input, &plan)?;
        plans.push(plan);
    }
    let (greedy, optimal) = (&plans[0], &plans[1]);
    prop_assert!(
        score(optimal, &inst.pods) <= score(greedy, &inst.pods) + 1e-6,
        "optimal ({} unschedulable, ${}) worse than greedy ({} unschedulable, ${})",
        optimal.unschedulable.len(),
        optimal.total_price_per_hour,
        greedy.unschedulable.len(),
        greedy.total_price_per_hour
    );
    if let Some(lb) = optimal.lower_bound_per_hour {
        prop_assert!(
            lb <= optimal.total_price_per_hour + 1e-6,
            "bound {lb} above the plan's price"
        );
    }
    Ok(())
}

/// Any planned node swapped for any of its fallback offerings (what EC2 may launch
/// instead when the chosen offering has no capacity) still gives a sound plan: the same
/// pods fit, the pool's requirements and limits hold, and every scheduling rule still
/// holds where the fallback is in another zone (the checker applies them all); a node
/// with a gang member or a constrained pod keeps its zone.
fn check_fallbacks(input: &PlanInput<'_>, plan: &planner::Plan) -> Result<(), TestCaseError> {
    for (i, node) in plan.nodes.iter().enumerate() {
        let fallbacks = planner::fallback_offerings(input, plan, node, 20, 1.5);
        let prices: Vec<f64> = fallbacks.iter().map(|(_, p)| *p).collect();
        prop_assert!(
            prices.windows(2).all(|w| w[0] <= w[1]),
            "fallbacks not cheapest first: {prices:?}"
        );
        for (key, price) in fallbacks {
            prop_assert!(key.instance_type != node.instance_type || key.zone != node.zone);
            prop_assert!(key.capacity_type == node.capacity_type);
            let pinned = node.pods.iter().any(|k| {
                input
                    .pods
                    .iter()
                    .any(|p| p.key() == *k && (p.gang.is_some() || p.constraints.is_some()))
            });
            prop_assert!(
                !pinned || key.zone == node.zone,
                "{} with gang or constrained pods offered another zone",
                node.name
            );
            prop_assert!(price <= node.price_per_hour * 1.5 + 1e-9);
            let t = input.catalog.instance_type(&key.instance_type).unwrap();
            let mut swapped = plan.clone();
            swapped.total_price_per_hour += price - node.price_per_hour;
            let n = &mut swapped.nodes[i];
            n.instance_type = key.instance_type.clone();
            n.zone = key.zone.clone();
            n.price_per_hour = price;
            n.allocatable = t.allocatable.clone();
            let problems = planner::verify::verify(input, &swapped);
            prop_assert!(
                problems.is_empty(),
                "{} as fallback for {} ({}) breaks the plan: {problems:#?}",
                key.instance_type,
                node.name,
                node.instance_type
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn every_plan_is_sound_and_optimal_never_loses(
        seed in any::<u64>(),
        n_types in 1usize..8,
        n_pools in 0usize..4,
        n_classes in 1usize..7,
        n_nodes in 0usize..4,
    ) {
        check(&random_instance(seed, n_types, n_pools, n_classes, n_nodes))?;
    }
}

/// The checker itself must catch broken plans, or the property above proves nothing.
#[test]
fn the_checker_catches_broken_plans() {
    let inst = (0..200u64)
        .map(|seed| random_instance(seed, 5, 2, 4, 0))
        .find(|i| !i.pools.is_empty() && i.pods.len() > 2)
        .expect("an instance with pods and pools");
    let unavailable = BTreeSet::new();
    let input = PlanInput {
        pods: &inst.pods,
        pools: &inst.pools,
        catalog: &inst.catalog,
        daemonsets: &inst.daemonsets,
        gangs: &inst.gangs,
        nodes: &inst.nodes,
        unavailable: &unavailable,
        running: &[],
    };
    let plan = planner::plan(input, &PlanOptions::default());
    assert!(planner::verify::verify(&input, &plan).is_empty());
    if let Some(node) = plan.nodes.first() {
        // A pod placed twice.
        let mut twice = plan.clone();
        let pod = node.pods[0].clone();
        twice.nodes[0].pods.push(pod);
        assert!(!planner::verify::verify(&input, &twice).is_empty());
        // A node over capacity: pile every pod on the first node.
        let mut piled = plan.clone();
        let all: Vec<String> = piled.nodes.iter().flat_map(|n| n.pods.clone()).collect();
        for n in piled.nodes.iter_mut() {
            n.pods.clear();
        }
        piled.nodes[0].pods = all.iter().cycle().take(all.len() * 50).cloned().collect();
        assert!(!planner::verify::verify(&input, &piled).is_empty());
    }
    // A pod dropped.
    let mut dropped = plan.clone();
    if let Some(n) = dropped.nodes.iter_mut().find(|n| !n.pods.is_empty()) {
        n.pods.pop();
    } else {
        dropped.unschedulable.pop();
    }
    assert!(!planner::verify::verify(&input, &dropped).is_empty());
}

/// The generator must produce instances that exercise the planner: new nodes, pods on
/// existing nodes, unschedulable pods, gangs placed and rejected.
#[test]
fn generated_instances_cover_the_interesting_cases() {
    let (mut nodes, mut existing, mut unsched, mut gangs_placed, mut optimal_cheaper) =
        (0, 0, 0, 0, 0);
    let mut with_fallbacks = 0;
    for seed in 0..60u64 {
        let inst = random_instance(seed, 6, 3, 6, 3);
        let unavailable = BTreeSet::new();
        let input = PlanInput {
            pods: &inst.pods,
            pools: &inst.pools,
            catalog: &inst.catalog,
            daemonsets: &inst.daemonsets,
            gangs: &inst.gangs,
            nodes: &inst.nodes,
            unavailable: &unavailable,
            running: &[],
        };
        let opt = planner::plan(input, &PlanOptions::default());
        let gr = planner::plan(
            input,
            &PlanOptions {
                strategy: Strategy::Greedy,
                ..PlanOptions::default()
            },
        );
        nodes += opt.nodes.len();
        with_fallbacks += opt
            .nodes
            .iter()
            .filter(|n| !planner::fallback_offerings(&input, &opt, n, 20, 1.5).is_empty())
            .count();
        existing += opt
            .existing_nodes
            .iter()
            .map(|e| e.pods.len())
            .sum::<usize>();
        unsched += opt.unschedulable.len();
        let unscheduled: BTreeSet<&str> =
            opt.unschedulable.iter().map(|u| u.pod.as_str()).collect();
        gangs_placed += inst
            .gangs
            .iter()
            .filter(|g| {
                inst.pods.iter().any(|p| {
                    p.gang.as_deref() == Some(&g.name) && !unscheduled.contains(p.key().as_str())
                })
            })
            .count();
        if opt.total_price_per_hour < gr.total_price_per_hour - 1e-6
            && opt.unschedulable.len() == gr.unschedulable.len()
        {
            optimal_cheaper += 1;
        }
    }
    eprintln!(
        "nodes {nodes} ({with_fallbacks} with fallbacks), on existing {existing}, unschedulable {unsched}, gangs placed {gangs_placed}, optimal cheaper {optimal_cheaper}/60"
    );
    assert!(nodes > 60 && existing > 0 && unsched > 0 && gangs_placed > 0 && optimal_cheaper > 5);
    assert!(
        with_fallbacks > 10,
        "too few nodes with fallbacks to test them"
    );
}
