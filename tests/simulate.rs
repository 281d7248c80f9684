//! Every shipped scenario, simulated and then checked by replaying its history
//! independently of the code that produced it:
//! - every bind lands on a ready, live node whose room (allocatable less DaemonSet
//!   overhead and the pods already there) holds the pod, whose labels satisfy the pod's
//!   selector and affinity and its NodePool's requirements, and whose taints it tolerates;
//! - a gang's members are bound at the same moment, all in one zone;
//! - the empty-node TTL removes only nodes with no pods, and never before the TTL;
//! - every pod evicted by an interruption is re-placed, deleted, or listed in the report;
//! - the report's totals equal the sum of its node rows (JSON and CSV), and workload
//!   costs plus idle capacity add up to the total;
//! - the same seed gives byte-identical JSON.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use cooper::planner::daemonset_overhead;
use cooper::report::Report;
use cooper::resources::Resources;
use cooper::sim::{self, Record, SimOptions, Simulation, scenario};

const SCENARIOS: [&str; 7] = [
    "simulations/sentiment-inf1.yaml",
    "simulations/consolidation.yaml",
    "simulations/node-lifecycle.yaml",
    "simulations/zone-resilient.yaml",
    "simulations/gpu-training.yaml",
    "simulations/mixed-spot.yaml",
    "simulations/large.yaml",
];

fn load(path: &str) -> scenario::Scenario {
    scenario::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Replay the history and check every invariant; returns how many binds and
/// interruption evictions were checked, so a test can insist the paths were exercised.
fn check_history(sim: &Simulation<'_>, report: &Report) -> (usize, usize) {
    let name = &sim.scenario.name;
    let mut used: Vec<Resources> = sim
        .nodes
        .iter()
        .map(|n| daemonset_overhead(&sim.daemonsets, &n.labels, &n.taints))
        .collect();
    let mut on_node: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); sim.nodes.len()];
    let mut ready = vec![false; sim.nodes.len()];
    let mut dead = vec![false; sim.nodes.len()];
    let mut empty_since: Vec<Option<Duration>> = vec![None; sim.nodes.len()];
    let mut bound_to: Vec<Option<usize>> = vec![None; sim.pods.len()];
    // Since when each node has been replaced (expired or drifted).
    let mut disrupting: Vec<Option<Duration>> = vec![None; sim.nodes.len()];
    let mut evicted: BTreeMap<usize, Duration> = BTreeMap::new();
    // gang -> (time, zones) of its binds
    let mut gang_binds: BTreeMap<String, Vec<(Duration, String)>> = BTreeMap::new();
    let mut binds = 0;
    let mut evictions = 0;
    let mut last = Duration::ZERO;
    for record in &sim.history {
        let at = match record {
            Record::Launch { at, .. }
            | Record::Ready { at, .. }
            | Record::Bind { at, .. }
            | Record::Unbind { at, .. }
            | Record::Terminate { at, .. }
            | Record::Disrupt { at, .. }
            | Record::Undisrupt { at, .. }
            | Record::Consolidate { at, .. }
            | Record::Delete { at, .. } => *at,
        };
        assert!(
            at >= last,
            "{name}: history goes back in time at {record:?}"
        );
        last = at;
        match *record {
            Record::Launch { node, .. } => {
                let n = &sim.nodes[node];
                let pool = &sim.pools[n.pool];
                assert!(
                    pool.first_rejection(&n.labels).is_none(),
                    "{name}: node {} ({}) violates NodePool {}'s requirements",
                    n.name,
                    n.instance_type,
                    pool.name
                );
            }
            Record::Ready { node, .. } => {
                assert!(!dead[node], "{name}: a terminated node became ready");
                ready[node] = true;
                empty_since[node] = Some(at);
            }
            Record::Bind { pod, node, .. } => {
                binds += 1;
                let n = &sim.nodes[node];
                let p = &sim.pods[pod].pod;
                assert!(
                    ready[node] && !dead[node],
                    "{name}: {} bound to {} which is not ready and alive",
                    p.key(),
                    n.name
                );
                assert!(bound_to[pod].is_none(), "{name}: {} bound twice", p.key());
                assert!(
                    disrupting[node].is_none(),
                    "{name}: {} bound to {}, which is being replaced",
                    p.key(),
                    n.name
                );
                // The disruption taint came later (checked just above): judge the pod
                // against the taints the node had.
                let taints: Vec<_> = n
                    .taints
                    .iter()
                    .filter(|t| t.key != cooper::disruption::DISRUPTED_TAINT_KEY)
                    .cloned()
                    .collect();
                assert!(
                    p.fits_node(&n.labels, &taints),
                    "{name}: {} on {} violates its selector, affinity or tolerations",
                    p.key(),
                    n.name
                );
                let after = used[node].plus(&p.requests);
                if let Some((resource, want, have)) = after.first_excess(&n.allocatable) {
                    panic!(
                        "{name}: {} overfills {} ({}): {resource} {want} > {have}",
                        p.key(),
                        n.name,
                        n.instance_type
                    );
                }
                used[node] = after;
                on_node[node].insert(pod);
                bound_to[pod] = Some(node);
                empty_since[node] = None;
                evicted.remove(&pod);
                if let Some(g) = &p.gang {
                    gang_binds
                        .entry(g.clone())
                        .or_default()
                        .push((at, n.zone.clone()));
                }
            }
            Record::Unbind { pod, node, why, .. } => {
                assert_eq!(
                    bound_to[pod],
                    Some(node),
                    "{name}: unbind of a pod not on that node"
                );
                used[node] = used[node].minus(&sim.pods[pod].pod.requests);
                on_node[node].remove(&pod);
                bound_to[pod] = None;
                if on_node[node].is_empty() && ready[node] {
                    empty_since[node] = Some(at);
                }
                if matches!(why, "interrupted" | "expired" | "drifted" | "underutilized") {
                    evictions += 1;
                    evicted.insert(pod, at);
                }
            }
            Record::Terminate { node, why, .. } => {
                let n = &sim.nodes[node];
                assert!(!dead[node], "{name}: {} terminated twice", n.name);
                if why == "empty" {
                    assert!(
                        on_node[node].is_empty(),
                        "{name}: TTL removed {} while it ran pods",
                        n.name
                    );
                    let ttl = sim.pools[n.pool]
                        .empty_ttl
                        .expect("TTL removal needs a TTL");
                    let since = empty_since[node].expect("an empty node has an empty-since time");
                    assert!(
                        at.saturating_sub(since) >= ttl,
                        "{name}: {} removed {:?} after emptying, before its TTL {ttl:?}",
                        n.name,
                        at - since
                    );
                } else if why == "underutilized" && disrupting[node].is_none() {
                    // Consolidation deleted it: its pods fit on the nodes there were.
                } else if matches!(why, "expired" | "drifted" | "underutilized") {
                    assert!(
                        disrupting[node].is_some(),
                        "{name}: {} {why} without being replaced first",
                        n.name
                    );
                    // Replaced first: every node launched (this attempt) to take its pods
                    // is up.
                    let since = disrupting[node].unwrap_or_default();
                    for (r, replacement) in sim.nodes.iter().enumerate() {
                        if replacement.replaces == Some(node) && replacement.launched_at >= since {
                            assert!(
                                ready[r] && !dead[r],
                                "{name}: {} drained before its replacement {} was ready",
                                n.name,
                                replacement.name
                            );
                        }
                    }
                } else {
                    assert_eq!(why, "interrupted", "{name}: unexpected termination reason");
                }
                assert!(
                    on_node[node].is_empty(),
                    "{name}: pods left on terminated node {}",
                    n.name
                );
                dead[node] = true;
            }
            Record::Delete { pod, .. } => {
                evicted.remove(&pod);
            }
            Record::Disrupt { node, .. } => {
                assert!(
                    ready[node] && !dead[node],
                    "{name}: replacing a node that is not up"
                );
                disrupting[node] = Some(at);
            }
            Record::Undisrupt { node, .. } => {
                disrupting[node] = None;
            }
            Record::Consolidate { .. } => {}
        }
    }
    // Interrupted pods that were neither re-placed nor deleted are reported.
    for pod in evicted.keys() {
        let key = sim.pods[*pod].pod.key();
        assert!(
            report.unplaced.iter().any(|u| u.pod == key),
            "{name}: evicted pod {key} was neither re-placed nor reported"
        );
    }
    // Gangs: one instant, one zone per start.
    for (gang, binds) in gang_binds {
        let mut by_time: BTreeMap<Duration, BTreeSet<String>> = BTreeMap::new();
        for (t, zone) in binds {
            by_time.entry(t).or_default().insert(zone);
        }
        for (t, zones) in by_time {
            assert_eq!(
                zones.len(),
                1,
                "{name}: gang {gang} started across zones {zones:?} at {t:?}"
            );
        }
    }
    (binds, evictions)
}

fn check_totals(report: &Report) {
    let name = &report.scenario;
    let close = |a: f64, b: f64, what: &str| {
        assert!(
            (a - b).abs() <= 1e-3 * (1.0 + a.abs()),
            "{name}: {what}: {a} != {b}"
        );
    };
    close(
        report.total_cost,
        report.nodes.iter().map(|n| n.cost).sum(),
        "total cost vs node rows",
    );
    close(
        report.node_hours,
        report.nodes.iter().map(|n| n.hours).sum(),
        "node-hours vs node rows",
    );
    close(
        report.node_costs,
        report
            .nodes
            .iter()
            .map(|n| n.hours * n.node_cost_per_hour)
            .sum(),
        "per-node costs vs node rows",
    );
    assert!(report.node_costs < report.total_cost || report.nodes.is_empty());
    for (what, rows) in [
        ("instance types", &report.by_instance_type),
        ("capacity types", &report.by_capacity_type),
        ("nodepools", &report.by_nodepool),
    ] {
        close(report.total_cost, rows.iter().map(|r| r.cost).sum(), what);
        assert_eq!(
            rows.iter().map(|r| r.nodes).sum::<usize>(),
            report.nodes.len(),
            "{name}: {what} node count"
        );
    }
    let attributed: f64 = report.workloads.iter().map(|w| w.cost).sum::<f64>() + report.idle_cost;
    assert!(
        (attributed - report.total_cost).abs() <= 0.01 * report.total_cost.max(1.0),
        "{name}: workloads {attributed} + idle do not add up to total {}",
        report.total_cost
    );
    for n in &report.nodes {
        close(
            n.cost,
            n.hours * (n.price_per_hour + n.node_cost_per_hour),
            "node cost = hours x (instance price + per-node cost)",
        );
    }
    // CSV node rows sum to the same total.
    let csv = report.to_csv();
    let csv_total: f64 = csv
        .lines()
        .filter(|l| l.starts_with("node,"))
        .map(|l| {
            l.split(',')
                .nth(11)
                .and_then(|c| c.parse::<f64>().ok())
                .expect("cost column")
        })
        .sum();
    close(report.total_cost, csv_total, "CSV node rows");
    assert_eq!(
        csv.lines().filter(|l| l.starts_with("node,")).count(),
        report.nodes.len()
    );
}

#[test]
fn shipped_scenarios_keep_every_invariant() {
    let mut interruption_evictions = 0;
    for path in SCENARIOS {
        let scenario = load(path);
        let (sim, report) = sim::run_full(&scenario, &SimOptions::default()).expect("simulate");
        let (binds, evictions) = check_history(&sim, &report);
        assert!(binds > 0, "{path}: nothing ran");
        interruption_evictions += evictions;
        check_totals(&report);
        assert!(report.total_cost > 0.0);
    }
    assert!(
        interruption_evictions > 0,
        "no scenario exercised spot interruptions"
    );
}

#[test]
fn greedy_and_on_demand_runs_keep_the_invariants_too() {
    for path in [
        "simulations/gpu-training.yaml",
        "simulations/mixed-spot.yaml",
    ] {
        let scenario = load(path);
        for options in [
            SimOptions {
                strategy: Some(cooper::planner::Strategy::Greedy),
                ..Default::default()
            },
            SimOptions {
                on_demand_only: true,
                ..Default::default()
            },
        ] {
            let (sim, report) = sim::run_full(&scenario, &options).expect("simulate");
            check_history(&sim, &report);
            check_totals(&report);
            if options.on_demand_only {
                assert!(
                    sim.nodes
                        .iter()
                        .all(|n| n.capacity_type == cooper::catalog::CapacityType::OnDemand)
                );
            }
        }
    }
}

#[test]
fn optimal_costs_less_than_greedy_on_gpu_training_and_mixed_spot() {
    for path in [
        "simulations/gpu-training.yaml",
        "simulations/mixed-spot.yaml",
    ] {
        let scenario = load(path);
        let optimal = sim::run(&scenario, &SimOptions::default()).expect("simulate");
        let greedy = sim::run(
            &scenario,
            &SimOptions {
                strategy: Some(cooper::planner::Strategy::Greedy),
                ..Default::default()
            },
        )
        .expect("simulate");
        assert!(
            optimal.total_cost < greedy.total_cost,
            "{path}: optimal ${} is not cheaper than greedy ${}",
            optimal.total_cost,
            greedy.total_cost
        );
    }
}

#[test]
fn same_seed_same_json_and_the_seed_matters() {
    let scenario = load("simulations/mixed-spot.yaml");
    let json = |seed| {
        let report = sim::run(
            &scenario,
            &SimOptions {
                seed: Some(seed),
                ..Default::default()
            },
        )
        .expect("simulate");
        serde_json::to_string(&report).expect("json")
    };
    let (a, b, c) = (json(5), json(5), json(6));
    assert!(a == b, "two runs with seed 5 differ");
    assert!(
        a != c,
        "launch latencies and interruptions depend on the seed"
    );
}

#[test]
fn the_seeds_inf1_pool_limit_holds_back_the_fifth_replica_and_says_why() {
    let scenario = load("simulations/sentiment-inf1.yaml");
    let (sim, report) = sim::run_full(&scenario, &SimOptions::default()).expect("simulate");
    // Never more than four inf1.xlarge (16 CPU) at once.
    let mut alive = 0i32;
    let mut peak = 0;
    for r in &sim.history {
        match r {
            Record::Launch { .. } => alive += 1,
            Record::Terminate { .. } => alive -= 1,
            _ => {}
        }
        peak = peak.max(alive);
    }
    assert!(peak <= 4, "peak {peak} inf1 nodes breaks the 16-CPU limit");
    assert!(sim.nodes.iter().all(|n| n.instance_type == "inf1.xlarge"
        && n.capacity_type == cooper::catalog::CapacityType::Spot));
    let held = report
        .unplaced
        .iter()
        .find(|u| u.reason.contains("limit cpu=16 reached"));
    assert!(
        held.is_some(),
        "the fifth replica's reason should name the pool limit: {:?}",
        report.unplaced
    );
}

#[test]
fn html_report_is_self_contained_with_four_charts() {
    let scenario = load("simulations/gpu-training.yaml");
    let report = sim::run(&scenario, &SimOptions::default()).expect("simulate");
    let html = report.to_html();
    assert_eq!(
        html.matches("<svg").count(),
        4,
        "nodes, cost, pending, utilisation"
    );
    // Nodes stacked by type (one band each), lines for the rest.
    assert_eq!(
        html.matches("<polygon").count(),
        report.by_instance_type.len()
    );
    assert!(html.matches("<polyline").count() >= 4);
    // Provenance: strategy, seed, version and the catalog's price dates.
    assert!(html.contains(&format!("seed {}", report.seed)));
    assert!(html.contains(&report.cooper_version));
    assert!(html.contains("on-demand prices"), "catalog date");
    for external in ["<script src", "<link", "http://", "https://"] {
        let hits: Vec<_> = html
            .match_indices(external)
            .filter(|(i, _)| !html[*i..].starts_with("http://www.w3.org/2000/svg"))
            .collect();
        assert!(hits.is_empty(), "the HTML report references {external}");
    }
}

#[test]
fn reports_say_what_each_share_is_and_mark_scenario_events() {
    let scenario = load("simulations/mixed-spot.yaml");
    let report = sim::run(&scenario, &SimOptions::default()).expect("simulate");
    // Spot is a third of the node-hours but less of the cost: both are reported.
    assert!(report.spot_share > 0.0 && report.spot_cost_share > 0.0);
    assert!(report.spot_cost_share < report.spot_share);
    let table = report.to_table();
    assert!(table.contains(&format!(
        "spot {:.0}% of node-hours, {:.0}% of cost",
        report.spot_share * 100.0,
        report.spot_cost_share * 100.0
    )));
    assert!(table.contains("empty nodes") && table.contains("node-hours"));
    // The wave at 10 h and the shortage 14–17 h, on every chart's time axis.
    assert_eq!(report.events.len(), 2, "{:?}", report.events);
    assert_eq!(report.events[0].start_hours, 10.0);
    assert_eq!(
        (report.events[1].start_hours, report.events[1].end_hours),
        (14.0, 17.0)
    );
    let html = report.to_html();
    assert_eq!(html.matches("class=\"event\"").count(), 2 * 4);
}

#[test]
fn the_checker_catches_broken_histories() {
    let scenario = load("simulations/gpu-training.yaml");
    let (sim, report) = sim::run_full(&scenario, &SimOptions::default()).expect("simulate");
    let fails = |history: Vec<Record>| {
        let mut broken = sim::run_full(&scenario, &SimOptions::default())
            .expect("simulate")
            .0;
        broken.history = history;
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            check_history(&broken, &report)
        }))
        .is_err()
    };
    assert!(!fails(sim.history.clone()), "the real history passes");
    // A GPU pod bound to a general-purpose node.
    let cpu_node = sim
        .nodes
        .iter()
        .position(|n| sim.pools[n.pool].name == "default")
        .expect("a default-pool node");
    let mut h = sim.history.clone();
    let gpu_bind = h
        .iter()
        .position(|r| matches!(r, Record::Bind { pod, .. } if sim.pods[*pod].pod.requests.get("nvidia.com/gpu") > 0))
        .expect("a GPU bind");
    if let Record::Bind { node, .. } = &mut h[gpu_bind] {
        *node = cpu_node;
    }
    assert!(fails(h), "a GPU pod on a CPU node must be caught");
    // A node removed as empty right after it became ready (before its TTL).
    let mut h = sim.history.clone();
    let ready = h
        .iter()
        .position(|r| matches!(r, Record::Ready { .. }))
        .expect("a ready node");
    let Record::Ready { at, node } = h[ready].clone() else {
        unreachable!()
    };
    h.insert(
        ready + 1,
        Record::Terminate {
            at,
            node,
            why: "empty",
        },
    );
    assert!(fails(h), "removal before the TTL must be caught");
    // A pod bound twice.
    let mut h = sim.history.clone();
    let bind = h
        .iter()
        .position(|r| matches!(r, Record::Bind { .. }))
        .expect("a bind");
    h.insert(bind + 1, h[bind].clone());
    assert!(fails(h), "a double bind must be caught");
}

/// Replay the zone-resilient scenario's history and check its constraints with rules
/// written out here (not the simulator's model): at every moment at most one `api` pod
/// and one host-port-443 pod per node, `api` zone counts within maxSkew 1 over the zones
/// with ready nodes as each `api` pod binds, Postgres in its volume's zone, and the cache
/// in the zones its StorageClass allows. Returns how many binds were checked.
fn check_zone_resilient(sim: &Simulation<'_>) -> usize {
    let app = |pod: usize| {
        sim.pods[pod]
            .pod
            .labels
            .get("app")
            .cloned()
            .unwrap_or_default()
    };
    let mut on_node: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); sim.nodes.len()];
    let mut ready = vec![false; sim.nodes.len()];
    let mut checked = 0;
    for record in &sim.history {
        match record {
            Record::Ready { node, .. } => ready[*node] = true,
            Record::Terminate { node, .. } => ready[*node] = false,
            Record::Unbind { pod, node, .. } => {
                on_node[*node].remove(pod);
            }
            Record::Bind { at, pod, node } => {
                let a = app(*pod);
                let zone = &sim.nodes[*node].zone;
                for other in &on_node[*node] {
                    let b = app(*other);
                    assert!(
                        !(a == "api" && b == "api"),
                        "{at:?}: two api pods on {}",
                        sim.nodes[*node].name
                    );
                    assert!(
                        !(a == "ingress" && b == "ingress"),
                        "{at:?}: host port 443 taken twice on {}",
                        sim.nodes[*node].name
                    );
                }
                match a.as_str() {
                    "postgres" => assert_eq!(zone, "us-east-1b", "postgres left its volume"),
                    "cache" => assert!(
                        zone == "us-east-1a" || zone == "us-east-1c",
                        "cache in {zone}"
                    ),
                    "api" => {
                        let mut counts: BTreeMap<&str, i64> = BTreeMap::new();
                        for (n, r) in ready.iter().enumerate() {
                            if *r
                                && ["us-east-1a", "us-east-1b", "us-east-1c"]
                                    .contains(&sim.nodes[n].zone.as_str())
                            {
                                counts.entry(&sim.nodes[n].zone).or_default();
                            }
                        }
                        for (n, pods) in on_node.iter().enumerate() {
                            for p in pods {
                                if app(*p) == "api" {
                                    *counts.entry(&sim.nodes[n].zone).or_default() += 1;
                                }
                            }
                        }
                        let min = counts.values().copied().min().unwrap_or(0);
                        let here = counts.get(zone.as_str()).copied().unwrap_or(0);
                        assert!(
                            here + 1 - min <= 1,
                            "{at:?}: api pod bound in {zone} against {counts:?}"
                        );
                    }
                    _ => {}
                }
                on_node[*node].insert(*pod);
                checked += 1;
            }
            _ => {}
        }
    }
    checked
}

#[test]
fn the_simulated_scheduler_keeps_spread_anti_affinity_ports_and_volume_zones() {
    let scenario = load("simulations/zone-resilient.yaml");
    for strategy in [
        cooper::planner::Strategy::Optimal,
        cooper::planner::Strategy::Greedy,
    ] {
        let (sim, report) = sim::run_full(
            &scenario,
            &SimOptions {
                strategy: Some(strategy),
                ..Default::default()
            },
        )
        .expect("simulate");
        let binds = check_zone_resilient(&sim);
        assert!(binds > 30, "{binds} binds");
        // Every pod ran: the plans honoured what the scheduler model enforces.
        assert!(report.unplaced.is_empty(), "{:?}", report.unplaced);
        // And the nodes are not launched over and over (a plan the scheduler refuses
        // leaves its node empty and the pod pending, planned again).
        assert!(sim.nodes.len() < 60, "{} launches", sim.nodes.len());
    }
    // The replay is not a formality: an api pod moved onto a node that already holds
    // one, or Postgres moved out of its volume's zone, is caught.
    let (sim, _) = sim::run_full(&scenario, &SimOptions::default()).expect("simulate");
    let fails = |history: Vec<Record>| {
        let mut broken = sim::run_full(&scenario, &SimOptions::default())
            .expect("simulate")
            .0;
        broken.history = history;
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            check_zone_resilient(&broken)
        }))
        .is_err()
    };
    assert!(!fails(sim.history.clone()));
    let app_of = |pod: usize| sim.pods[pod].pod.labels.get("app").cloned();
    let binds: Vec<(usize, usize, usize)> = sim
        .history
        .iter()
        .enumerate()
        .filter_map(|(i, r)| match r {
            Record::Bind { pod, node, .. } => Some((i, *pod, *node)),
            _ => None,
        })
        .collect();
    let api: Vec<&(usize, usize, usize)> = binds
        .iter()
        .filter(|(_, p, _)| app_of(*p).as_deref() == Some("api"))
        .collect();
    let mut h = sim.history.clone();
    if let Record::Bind { node, .. } = &mut h[api[1].0] {
        *node = api[0].2;
    }
    assert!(fails(h), "two api pods on one node must be caught");
    let pg = binds
        .iter()
        .find(|(_, p, _)| app_of(*p).as_deref() == Some("postgres"))
        .expect("postgres ran");
    let elsewhere = (0..sim.nodes.len())
        .find(|&n| sim.nodes[n].zone != "us-east-1b")
        .expect("a node outside us-east-1b");
    let mut h = sim.history.clone();
    if let Record::Bind { node, .. } = &mut h[pg.0] {
        *node = elsewhere;
    }
    assert!(
        fails(h),
        "postgres outside its volume's zone must be caught"
    );
}

/// Expiry and an AMI release: nodes are replaced (the replacement ready before the
/// drain, which `check_history` verifies), one at a time where the budget says so,
/// not inside a budget's closed window, and the report counts them by reason.
#[test]
fn expired_and_drifted_nodes_are_replaced_within_budgets_and_reported_by_reason() {
    let scenario = load("simulations/node-lifecycle.yaml");
    let (sim, report) = sim::run_full(&scenario, &SimOptions::default()).expect("simulate");
    let (_, moved) = check_history(&sim, &report);
    assert!(moved > 0, "no pod moved off an expired or drifted node");
    let by_reason: BTreeMap<&str, &cooper::report::DisruptionSummary> = report
        .disruptions
        .iter()
        .map(|d| (d.reason.as_str(), d))
        .collect();
    assert!(by_reason["drifted"].nodes >= 3, "{:?}", report.disruptions);
    assert!(by_reason["expired"].nodes >= 1, "{:?}", report.disruptions);
    assert!(by_reason["drifted"].pods_moved > 0);
    assert!(by_reason["drifted"].replacement_overlap_node_hours > 0.0);
    assert!(report.unplaced.is_empty(), "{:?}", report.unplaced);
    // When replacing began and ended, per node.
    let mut spans: BTreeMap<usize, (Duration, Duration)> = BTreeMap::new();
    for record in &sim.history {
        match *record {
            Record::Disrupt { at, node, .. } => {
                spans.insert(node, (at, Duration::MAX));
            }
            Record::Terminate { at, node, .. } => {
                if let Some(span) = spans.get_mut(&node) {
                    span.1 = at;
                }
            }
            _ => {}
        }
    }
    let release = Duration::from_secs(3 * 3600);
    for (pool, window_end) in [
        ("default", None),
        ("gpu", Some(Duration::from_secs(10 * 3600))),
    ] {
        let mine: Vec<(Duration, Duration)> = spans
            .iter()
            .filter(|(n, _)| sim.pools[sim.nodes[**n].pool].name == pool)
            .map(|(_, s)| *s)
            .collect();
        assert!(!mine.is_empty(), "{pool}: nothing replaced");
        for (start, _) in &mine {
            assert!(*start >= release, "{pool}: replaced before the release");
            if let Some(end) = window_end {
                assert!(
                    *start >= end,
                    "{pool}: drifted at {start:?}, inside the nodes: 0 window"
                );
            }
        }
        if pool == "default" {
            // `nodes: "1"` for Drifted and Expired: replacements never overlap.
            for (i, a) in mine.iter().enumerate() {
                for b in &mine[i + 1..] {
                    assert!(
                        a.1 <= b.0 || b.1 <= a.0,
                        "{pool}: two nodes replaced at once: {a:?} and {b:?}"
                    );
                }
            }
        }
    }
}

/// Consolidation by re-planning: the day's underused nodes are re-packed, the 8-GPU node
/// left with two 1-GPU pods is split into two 1-GPU nodes (replacements up before the
/// drain, which `check_history` verifies), and the day costs less than without
/// consolidation and than the Karpenter baseline, which never splits.
#[test]
fn consolidation_repacks_the_evening_and_splits_the_gpu_node_karpenter_would_not() {
    let scenario = load("simulations/consolidation.yaml");
    let (sim, report) = sim::run_full(&scenario, &SimOptions::default()).expect("simulate");
    check_history(&sim, &report);
    let moves = &report.consolidation.moves;
    assert!(moves.get("split").copied().unwrap_or(0) >= 1, "{moves:?}");
    assert!(
        moves.get("merge").copied().unwrap_or(0) + moves.get("delete").copied().unwrap_or(0) >= 3,
        "{moves:?}"
    );
    // The 8-GPU node went, for two 1-GPU nodes.
    let gpus = |n: &cooper::sim::SimNode| n.allocatable.get(cooper::resources::NVIDIA_GPU);
    let big = sim
        .nodes
        .iter()
        .position(|n| gpus(n) == 8)
        .expect("the fine-tuning job's 8-GPU node");
    assert_eq!(sim.nodes[big].end_reason, "underutilized");
    let split_into: Vec<&cooper::sim::SimNode> = sim
        .nodes
        .iter()
        .filter(|n| n.replaces == Some(big))
        .collect();
    assert_eq!(split_into.len(), 2, "split into two nodes");
    assert!(split_into.iter().all(|n| gpus(n) == 1));
    assert!(report.unplaced.is_empty(), "{:?}", report.unplaced);
    // Cheaper than standing still and than Karpenter's consolidation.
    let run = |mode, strategy| {
        sim::run(
            &scenario,
            &SimOptions {
                consolidation: mode,
                strategy,
                ..Default::default()
            },
        )
        .expect("simulate")
    };
    let still = run(sim::ConsolidationMode::Off, None);
    let karpenter = run(
        sim::ConsolidationMode::Karpenter,
        Some(cooper::planner::Strategy::Greedy),
    );
    assert!(
        report.total_cost < 0.8 * still.total_cost,
        "{} vs {} without consolidation",
        report.total_cost,
        still.total_cost
    );
    assert!(
        report.total_cost < karpenter.total_cost,
        "{} vs Karpenter's {}",
        report.total_cost,
        karpenter.total_cost
    );
    assert!(still.consolidation.moves.is_empty());
    assert!(
        !karpenter.consolidation.moves.contains_key("split"),
        "Karpenter never splits: {:?}",
        karpenter.consolidation.moves
    );
    assert!(!karpenter.consolidation.moves.is_empty());
}
