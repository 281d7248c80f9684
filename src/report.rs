//! The cost report: what was launched, what it cost, how full it was, how long pods
//! waited, and what each workload cost. One model for simulations (and live clusters),
//! rendered as a terminal table, JSON (stable), CSV and a self-contained HTML page.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use crate::sim::Simulation;
use crate::table::Table;

/// Facts the simulator records as it runs.
#[derive(Debug, Clone, Default)]
pub struct SimLog {
    pub seed: u64,
    pub waits: Vec<Duration>,
    pub samples: Vec<Sample>,
    pub workload_cost: BTreeMap<String, f64>,
    /// Cost of capacity no pod requested (empty, launching, or part-used nodes).
    pub idle_cost: f64,
    /// Node-hours of capacity no pod requested (by the same dominant-share measure).
    pub idle_node_hours: f64,
    /// Pods deleted (scaled down) before they ever ran, with the planner's last reason.
    pub deleted_before_running: Vec<(String, String)>,
    pub empty_node_hours: f64,
    pub interruptions: u64,
    pub pods_evicted: u64,
    pub pods_created: u64,
    pub jobs_completed: u64,
    pub launches: u64,
    pub launch_failures: u64,
    /// Expired or drifted nodes kept for now because their pods could not all be placed
    /// elsewhere (pool limits).
    pub replacements_deferred: u64,
    /// Consolidation moves made, by kind (delete, replace, split, merge).
    pub consolidations: BTreeMap<String, u64>,
    /// What they were expected to save, summed (USD per hour).
    pub consolidation_savings_per_hour: f64,
    pub plans: u64,
    pub plan_ms: Vec<f64>,
}

/// Consolidation over a run.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct ConsolidationSummary {
    /// Moves by kind: `delete`, `replace`, `split`, `merge`.
    pub moves: BTreeMap<String, u64>,
    /// The savings the moves expected when they were made, summed (USD per hour).
    pub expected_savings_per_hour: f64,
}

/// Each consolidation move as an event on the time axis.
fn consolidation_events(sim: &Simulation) -> Vec<ScenarioEvent> {
    sim.history
        .iter()
        .filter_map(|r| match r {
            crate::sim::Record::Consolidate {
                at,
                kind,
                savings_per_hour,
            } => {
                let h = round(at.as_secs_f64() / 3600.0, 4);
                Some(ScenarioEvent {
                    start_hours: h,
                    end_hours: h,
                    label: format!("consolidation: {kind} (saves ${savings_per_hour:.2}/h)"),
                })
            }
            _ => None,
        })
        .collect()
}

/// Nodes that ended for one reason, what it moved and what the overlap cost.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DisruptionSummary {
    /// `empty`, `expired`, `drifted`, `interrupted`.
    pub reason: String,
    pub nodes: u64,
    /// Pods that had to move off those nodes.
    pub pods_moved: u64,
    /// Node-hours of replacements running before the node they replaced was drained
    /// (what replacing before draining cost).
    pub replacement_overlap_node_hours: f64,
}

/// The cluster at one moment.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Sample {
    pub hours: f64,
    pub nodes: usize,
    pub cost_per_hour: f64,
    pub pending: usize,
    pub running: usize,
    /// Requested / allocatable over ready nodes; None when no node has the resource.
    pub cpu: Option<f64>,
    pub memory: Option<f64>,
    pub gpu: Option<f64>,
    pub neuron: Option<f64>,
    pub nodes_by_type: BTreeMap<String, usize>,
}

/// One node's life.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct NodeInterval {
    pub node: String,
    pub nodepool: String,
    pub instance_type: String,
    pub zone: String,
    pub capacity_type: String,
    /// The instance's price.
    pub price_per_hour: f64,
    /// Its volumes, public address and the user's per-node cost.
    pub node_cost_per_hour: f64,
    pub start_hours: f64,
    pub end_hours: f64,
    pub hours: f64,
    pub cost: f64,
    pub end_reason: String,
}

/// Node-hours and cost by some key.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Breakdown {
    pub key: String,
    pub nodes: usize,
    pub node_hours: f64,
    pub cost: f64,
}

/// Cost attributed to a workload.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct WorkloadCost {
    pub workload: String,
    pub cost: f64,
}

/// A pod that was not running when it should have been: pending at the end of the run
/// (never placed, or evicted and not yet re-placed), or deleted before it ever ran.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Unplaced {
    pub pod: String,
    /// `pending at end`, `evicted, pending at end` or `deleted while pending`.
    pub state: String,
    /// The planner's last reason, or what the pod was waiting for.
    pub reason: String,
}

/// Averages over the run.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Utilisation {
    pub cpu: Option<f64>,
    pub memory: Option<f64>,
    pub gpu: Option<f64>,
    pub neuron: Option<f64>,
}

/// The report.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Report {
    pub scenario: String,
    pub description: String,
    pub strategy: String,
    pub seed: u64,
    pub hours: f64,
    /// The cooper build that ran it (version and commit).
    pub cooper_version: String,
    /// The catalog it priced against (source and price dates).
    pub catalog: String,
    /// Instances plus per-node costs.
    pub total_cost: f64,
    /// The per-node part of it: volumes, public addresses, the user's per-node cost.
    pub node_costs: f64,
    pub node_hours: f64,
    /// Spot's share of the node-hours (0–1).
    pub spot_share: f64,
    /// Spot's share of the cost (0–1): spot nodes are cheap, so this is far below the
    /// share of node-hours.
    pub spot_cost_share: f64,
    /// Node-hours of nodes with no pod but DaemonSets (part of `idle_node_hours`).
    pub empty_node_hours: f64,
    pub launches: u64,
    pub launch_failures: u64,
    pub interruptions: u64,
    pub pods_evicted: u64,
    pub pods_created: u64,
    pub plans: u64,
    /// Wall-clock planning times: not part of the JSON, which must be the same byte for
    /// byte for the same scenario and seed.
    #[serde(skip)]
    pub plan_ms_p50: f64,
    #[serde(skip)]
    pub plan_ms_max: f64,
    pub wait_seconds_p50: f64,
    pub wait_seconds_p95: f64,
    pub wait_seconds_max: f64,
    pub utilisation: Utilisation,
    pub by_instance_type: Vec<Breakdown>,
    pub by_capacity_type: Vec<Breakdown>,
    pub by_nodepool: Vec<Breakdown>,
    /// Cost per workload (`Kind namespace/name`), by dominant share of each node.
    pub workloads: Vec<WorkloadCost>,
    /// The same, summed per namespace.
    pub namespaces: Vec<WorkloadCost>,
    /// Cost of capacity no pod requested; workloads plus idle equal the total.
    pub idle_cost: f64,
    /// The same as node-hours: waste, including empty and launching nodes.
    pub idle_node_hours: f64,
    /// Pods not running at the end, and pods deleted before they ever ran.
    pub unplaced: Vec<Unplaced>,
    pub nodes: Vec<NodeInterval>,
    pub timeline: Vec<Sample>,
    /// What the scenario did to the cloud (spot interruption waves, capacity
    /// shortages), for the time axis.
    pub events: Vec<ScenarioEvent>,
    /// Nodes that ended before the scenario did, by why (voluntary disruptions and
    /// interruptions).
    pub disruptions: Vec<DisruptionSummary>,
    /// Consolidation moves made, by kind, and what each was expected to save.
    pub consolidation: ConsolidationSummary,
    /// Filled by `--compare`: the same scenario and seed under other settings.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub comparison: Vec<Comparison>,
}

/// A scenario event on the time axis.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ScenarioEvent {
    pub start_hours: f64,
    /// For windows (a capacity shortage); equal to the start for instants.
    pub end_hours: f64,
    pub label: String,
}

/// One line of a comparison.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Comparison {
    pub label: String,
    pub total_cost: f64,
    pub node_hours: f64,
    pub spot_share: f64,
    pub spot_cost_share: f64,
    pub wait_seconds_p95: f64,
    pub unplaced: usize,
    /// How much cheaper the main run is, in percent of this one.
    pub saving_percent: f64,
}

/// The scenario's spot interruption waves and capacity shortages, in time order.
fn scenario_events(scenario: &crate::sim::scenario::Scenario) -> Vec<ScenarioEvent> {
    let scope = |families: &[String], zones: &[String], types: &[String]| {
        let mut parts = Vec::new();
        if !types.is_empty() {
            parts.push(types.join(", "));
        }
        if !families.is_empty() {
            parts.push(format!("families {}", families.join(", ")));
        }
        if !zones.is_empty() {
            parts.push(zones.join(", "));
        }
        if parts.is_empty() {
            String::new()
        } else {
            format!(" ({})", parts.join("; "))
        }
    };
    let mut events: Vec<ScenarioEvent> = scenario
        .waves
        .iter()
        .map(|(at, fraction, families, zones)| {
            let h = round(at.as_secs_f64() / 3600.0, 4);
            ScenarioEvent {
                start_hours: h,
                end_hours: h,
                label: format!(
                    "spot interruption wave: {:.0}% of spot nodes{}",
                    fraction * 100.0,
                    scope(families, zones, &[])
                ),
            }
        })
        .chain(
            scenario
                .capacity_windows
                .iter()
                .map(|(from, to, w)| ScenarioEvent {
                    start_hours: round(from.as_secs_f64() / 3600.0, 4),
                    end_hours: round(to.as_secs_f64() / 3600.0, 4),
                    label: format!(
                        "capacity shortage{}{}",
                        w.capacity_type
                            .map(|c| format!(" ({c})"))
                            .unwrap_or_default(),
                        scope(&w.families, &w.zones, &w.instance_types)
                    ),
                }),
        )
        .chain(scenario.drift.iter().map(|(at, event)| {
            let h = round(at.as_secs_f64() / 3600.0, 4);
            ScenarioEvent {
                start_hours: h,
                end_hours: h,
                label: match event {
                    crate::sim::scenario::DriftEvent::AmiRelease => {
                        "AMI release: running nodes drift".to_string()
                    }
                    crate::sim::scenario::DriftEvent::NodePoolChange(pool) => {
                        format!("NodePool {pool} changed: its nodes drift")
                    }
                },
            }
        }))
        .collect();
    events.sort_by(|a, b| a.start_hours.total_cmp(&b.start_hours));
    events
}

/// Nodes ended by each reason, the pods that moved, and the overlap of replacements.
fn disruption_summary(sim: &Simulation) -> Vec<DisruptionSummary> {
    use crate::sim::Record;
    let mut by: BTreeMap<&str, DisruptionSummary> = BTreeMap::new();
    let entry = |by: &mut BTreeMap<&str, DisruptionSummary>, why: &'static str| {
        by.entry(why).or_insert_with(|| DisruptionSummary {
            reason: why.to_string(),
            nodes: 0,
            pods_moved: 0,
            replacement_overlap_node_hours: 0.0,
        });
    };
    for record in &sim.history {
        match record {
            Record::Terminate { why, .. } => {
                entry(&mut by, why);
                if let Some(s) = by.get_mut(why) {
                    s.nodes += 1;
                }
            }
            Record::Unbind { why, .. } => {
                // Pods deleted or finished are not moved by a disruption.
                if !matches!(
                    *why,
                    "interrupted" | "expired" | "drifted" | "underutilized"
                ) {
                    continue;
                }
                entry(&mut by, why);
                if let Some(s) = by.get_mut(why) {
                    s.pods_moved += 1;
                }
            }
            _ => {}
        }
    }
    for node in &sim.nodes {
        let Some(old) = node.replaces else { continue };
        let old = &sim.nodes[old];
        let Some(end) = old.terminated_at else {
            continue;
        };
        if let Some(s) = by.get_mut(old.end_reason) {
            s.replacement_overlap_node_hours +=
                end.saturating_sub(node.launched_at).as_secs_f64() / 3600.0;
        }
    }
    by.into_values()
        .map(|mut s| {
            s.replacement_overlap_node_hours = round(s.replacement_overlap_node_hours, 4);
            s
        })
        .collect()
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// `x` rounded to `digits` decimal places (stable figures in JSON).
pub(crate) fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

/// Build the report of a finished simulation.
pub fn build(sim: &Simulation<'_>) -> Report {
    let end = sim.scenario.duration;
    let mut nodes = Vec::new();
    for n in &sim.nodes {
        let stop = n.terminated_at.unwrap_or(end);
        let hours = stop.saturating_sub(n.launched_at).as_secs_f64() / 3600.0;
        nodes.push(NodeInterval {
            node: n.name.clone(),
            nodepool: sim.pools[n.pool].name.clone(),
            instance_type: n.instance_type.clone(),
            zone: n.zone.clone(),
            capacity_type: n.capacity_type.to_string(),
            price_per_hour: n.price,
            node_cost_per_hour: round(n.node_cost, 6),
            start_hours: round(n.launched_at.as_secs_f64() / 3600.0, 6),
            end_hours: round(stop.as_secs_f64() / 3600.0, 6),
            hours: round(hours, 6),
            cost: round(hours * n.cost_per_hour(), 6),
            end_reason: n.end_reason.to_string(),
        });
    }
    let total_cost: f64 = nodes.iter().map(|n| n.cost).sum();
    let node_hours: f64 = nodes.iter().map(|n| n.hours).sum();
    let spot_hours: f64 = nodes
        .iter()
        .filter(|n| n.capacity_type == "spot")
        .map(|n| n.hours)
        .sum();
    let spot_cost: f64 = nodes
        .iter()
        .filter(|n| n.capacity_type == "spot")
        .map(|n| n.cost)
        .sum();
    let breakdown = |key: &dyn Fn(&NodeInterval) -> String| {
        let mut m: BTreeMap<String, Breakdown> = BTreeMap::new();
        for n in &nodes {
            let k = key(n);
            let e = m.entry(k.clone()).or_insert(Breakdown {
                key: k,
                nodes: 0,
                node_hours: 0.0,
                cost: 0.0,
            });
            e.nodes += 1;
            e.node_hours += n.hours;
            e.cost += n.cost;
        }
        let mut v: Vec<Breakdown> = m
            .into_values()
            .map(|b| Breakdown {
                node_hours: round(b.node_hours, 4),
                cost: round(b.cost, 4),
                ..b
            })
            .collect();
        v.sort_by(|a, b| b.cost.total_cmp(&a.cost).then(a.key.cmp(&b.key)));
        v
    };
    let mut waits: Vec<f64> = sim.log.waits.iter().map(|d| d.as_secs_f64()).collect();
    waits.sort_by(f64::total_cmp);
    let mut plan_ms = sim.log.plan_ms.clone();
    plan_ms.sort_by(f64::total_cmp);
    let avg = |f: fn(&Sample) -> Option<f64>| {
        let v: Vec<f64> = sim.log.samples.iter().filter_map(f).collect();
        (!v.is_empty()).then(|| round(v.iter().sum::<f64>() / v.len() as f64, 4))
    };
    let mut workloads: Vec<WorkloadCost> = sim
        .log
        .workload_cost
        .iter()
        .map(|(w, c)| WorkloadCost {
            workload: w.clone(),
            cost: round(*c, 4),
        })
        .collect();
    workloads.sort_by(|a, b| b.cost.total_cmp(&a.cost).then(a.workload.cmp(&b.workload)));
    let mut by_namespace: BTreeMap<String, f64> = BTreeMap::new();
    for (w, c) in &sim.log.workload_cost {
        let namespace = w
            .split_once(' ')
            .map_or(w.as_str(), |(_, rest)| rest)
            .split('/')
            .next()
            .unwrap_or("");
        *by_namespace.entry(namespace.to_string()).or_default() += c;
    }
    let mut namespaces: Vec<WorkloadCost> = by_namespace
        .into_iter()
        .map(|(w, c)| WorkloadCost {
            workload: w,
            cost: round(c, 4),
        })
        .collect();
    namespaces.sort_by(|a, b| b.cost.total_cmp(&a.cost).then(a.workload.cmp(&b.workload)));
    let mut unplaced: Vec<Unplaced> = sim
        .pods
        .iter()
        .filter(|p| p.alive && p.node.is_none())
        .map(|p| Unplaced {
            pod: p.pod.key(),
            state: if p.ran {
                "evicted, pending at end"
            } else {
                "pending at end"
            }
            .into(),
            reason: p
                .reason
                .clone()
                .unwrap_or_else(|| "waiting for a launching node".into()),
        })
        .chain(
            sim.log
                .deleted_before_running
                .iter()
                .map(|(pod, reason)| Unplaced {
                    pod: pod.clone(),
                    state: "deleted while pending".into(),
                    reason: reason.clone(),
                }),
        )
        .collect();
    unplaced.sort_by(|a, b| a.pod.cmp(&b.pod).then(a.state.cmp(&b.state)));
    Report {
        scenario: sim.scenario.name.clone(),
        description: sim.scenario.description.clone(),
        strategy: format!("{:?}", sim.strategy).to_lowercase(),
        seed: sim.log.seed,
        hours: round(end.as_secs_f64() / 3600.0, 4),
        total_cost: round(total_cost, 4),
        node_costs: round(
            nodes
                .iter()
                .map(|n| n.hours * n.node_cost_per_hour)
                .sum::<f64>(),
            4,
        ),
        node_hours: round(node_hours, 4),
        spot_share: if node_hours > 0.0 {
            round(spot_hours / node_hours, 4)
        } else {
            0.0
        },
        spot_cost_share: if total_cost > 0.0 {
            round(spot_cost / total_cost, 4)
        } else {
            0.0
        },
        cooper_version: format!("{} ({})", env!("CARGO_PKG_VERSION"), env!("COOPER_COMMIT")),
        catalog: sim.scenario.catalog.source.clone(),
        events: {
            let mut events = scenario_events(sim.scenario);
            events.extend(consolidation_events(sim));
            events.sort_by(|a, b| a.start_hours.total_cmp(&b.start_hours));
            events
        },
        disruptions: disruption_summary(sim),
        consolidation: ConsolidationSummary {
            moves: sim.log.consolidations.clone(),
            expected_savings_per_hour: round(sim.log.consolidation_savings_per_hour, 4),
        },
        empty_node_hours: round(sim.log.empty_node_hours, 4),
        launches: sim.log.launches,
        launch_failures: sim.log.launch_failures,
        interruptions: sim.log.interruptions,
        pods_evicted: sim.log.pods_evicted,
        pods_created: sim.log.pods_created,
        plans: sim.log.plans,
        plan_ms_p50: round(percentile(&plan_ms, 0.5), 1),
        plan_ms_max: round(plan_ms.last().copied().unwrap_or(0.0), 1),
        wait_seconds_p50: round(percentile(&waits, 0.5), 1),
        wait_seconds_p95: round(percentile(&waits, 0.95), 1),
        wait_seconds_max: round(waits.last().copied().unwrap_or(0.0), 1),
        utilisation: Utilisation {
            cpu: avg(|s| s.cpu),
            memory: avg(|s| s.memory),
            gpu: avg(|s| s.gpu),
            neuron: avg(|s| s.neuron),
        },
        by_instance_type: breakdown(&|n| n.instance_type.clone()),
        by_capacity_type: breakdown(&|n| n.capacity_type.clone()),
        by_nodepool: breakdown(&|n| n.nodepool.clone()),
        workloads,
        namespaces,
        idle_cost: round(sim.log.idle_cost, 4),
        idle_node_hours: round(sim.log.idle_node_hours, 4),
        unplaced,
        nodes,
        timeline: sim.log.samples.clone(),
        comparison: Vec::new(),
    }
}

impl Report {
    /// A comparison row for this report against `main`'s cost.
    pub fn as_comparison(&self, label: &str, main_cost: f64) -> Comparison {
        Comparison {
            label: label.into(),
            total_cost: self.total_cost,
            node_hours: self.node_hours,
            spot_share: self.spot_share,
            spot_cost_share: self.spot_cost_share,
            wait_seconds_p95: self.wait_seconds_p95,
            unplaced: self.unplaced.len(),
            saving_percent: if self.total_cost > 0.0 {
                round(100.0 * (self.total_cost - main_cost) / self.total_cost, 2)
            } else {
                0.0
            },
        }
    }

    /// The terminal table.
    pub fn to_table(&self) -> String {
        let pct = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{:.0}%", v * 100.0));
        let mut out = String::new();
        let _ = writeln!(
            out,
            "scenario {} ({} strategy, seed {}, {:.1} h simulated)",
            self.scenario, self.strategy, self.seed, self.hours
        );
        if !self.description.is_empty() {
            let _ = writeln!(out, "  {}", self.description.trim());
        }
        let _ = writeln!(
            out,
            "\ncost ${:.2} (instances ${:.2}, per-node volumes/addresses ${:.2}) over {:.1} node-hours; spot {:.0}% of node-hours, {:.0}% of cost; idle {:.1} node-hours (${:.2}), of which empty nodes {:.1} node-hours",
            self.total_cost,
            self.total_cost - self.node_costs,
            self.node_costs,
            self.node_hours,
            // `+ 0.0` turns a negative zero into "0".
            self.spot_share * 100.0 + 0.0,
            self.spot_cost_share * 100.0 + 0.0,
            self.idle_node_hours,
            self.idle_cost,
            self.empty_node_hours
        );
        let _ = writeln!(
            out,
            "{} launches ({} failed for capacity), {} spot interruptions, {} pods evicted, {} plans (p50 {:.0} ms, max {:.0} ms)",
            self.launches,
            self.launch_failures,
            self.interruptions,
            self.pods_evicted,
            self.plans,
            self.plan_ms_p50,
            self.plan_ms_max
        );
        if !self.disruptions.is_empty() {
            let parts: Vec<String> = self
                .disruptions
                .iter()
                .map(|d| {
                    let mut part = format!(
                        "{} {} node{} ({} pods moved",
                        d.reason,
                        d.nodes,
                        if d.nodes == 1 { "" } else { "s" },
                        d.pods_moved
                    );
                    if d.replacement_overlap_node_hours > 0.0 {
                        let _ = write!(
                            part,
                            ", {:.2} node-hours of replacements running before the drain",
                            d.replacement_overlap_node_hours
                        );
                    }
                    part.push(')');
                    part
                })
                .collect();
            let _ = writeln!(out, "nodes ended: {}", parts.join("; "));
        }
        if !self.consolidation.moves.is_empty() {
            let moves: Vec<String> = self
                .consolidation
                .moves
                .iter()
                .map(|(kind, n)| format!("{n} {kind}"))
                .collect();
            let _ = writeln!(
                out,
                "consolidation: {} (expected to save ${:.2}/h when made)",
                moves.join(", "),
                self.consolidation.expected_savings_per_hour
            );
        }
        let _ = writeln!(
            out,
            "utilisation (requested/allocatable, average): cpu {}, memory {}, gpu {}, neuron {}",
            pct(self.utilisation.cpu),
            pct(self.utilisation.memory),
            pct(self.utilisation.gpu),
            pct(self.utilisation.neuron)
        );
        let _ = writeln!(
            out,
            "pods: {} created; pending → running p50 {:.0} s, p95 {:.0} s, max {:.0} s; {} not running at the end or deleted before running",
            self.pods_created,
            self.wait_seconds_p50,
            self.wait_seconds_p95,
            self.wait_seconds_max,
            self.unplaced.len()
        );
        let section = |title: &str, rows: &[Breakdown]| {
            let mut t = Table::new(&[title, ">NODES", ">NODE-HOURS", ">COST $"]);
            for r in rows {
                t.row(vec![
                    r.key.clone(),
                    r.nodes.to_string(),
                    format!("{:.2}", r.node_hours),
                    format!("{:.2}", r.cost),
                ]);
            }
            t.render()
        };
        out.push('\n');
        out.push_str(&section("INSTANCE TYPE", &self.by_instance_type));
        out.push('\n');
        out.push_str(&section("CAPACITY", &self.by_capacity_type));
        out.push('\n');
        out.push_str(&section("NODEPOOL", &self.by_nodepool));
        out.push('\n');
        let mut t = Table::new(&["WORKLOAD", ">COST $"]);
        for w in &self.workloads {
            t.row(vec![w.workload.clone(), format!("{:.2}", w.cost)]);
        }
        t.row(vec![
            "(idle capacity: requested by no pod)".into(),
            format!("{:.2}", self.idle_cost),
        ]);
        out.push_str(&t.render());
        if self.namespaces.len() > 1 {
            out.push('\n');
            let mut t = Table::new(&["NAMESPACE", ">COST $"]);
            for w in &self.namespaces {
                t.row(vec![w.workload.clone(), format!("{:.2}", w.cost)]);
            }
            out.push_str(&t.render());
        }
        if !self.unplaced.is_empty() {
            out.push_str("\nnot running:\n");
            for p in self.unplaced.iter().take(20) {
                let _ = writeln!(out, "  {} ({}): {}", p.pod, p.state, p.reason);
            }
            if self.unplaced.len() > 20 {
                let _ = writeln!(out, "  ... and {} more", self.unplaced.len() - 20);
            }
        }
        if !self.comparison.is_empty() {
            out.push('\n');
            let mut t = Table::new(&[
                "COMPARED WITH",
                ">COST $",
                ">NODE-HOURS",
                ">SPOT NODE-H",
                ">SPOT COST",
                ">WAIT P95 S",
                ">NOT RUN",
                ">SAVING",
            ]);
            for c in &self.comparison {
                t.row(vec![
                    c.label.clone(),
                    format!("{:.2}", c.total_cost),
                    format!("{:.1}", c.node_hours),
                    format!("{:.0}%", (c.spot_share * 100.0).abs()),
                    format!("{:.0}%", (c.spot_cost_share * 100.0).abs()),
                    format!("{:.0}", c.wait_seconds_p95),
                    c.unplaced.to_string(),
                    format!("{:.1}%", c.saving_percent),
                ]);
            }
            out.push_str(&t.render());
        }
        out
    }

    /// CSV: one row per node interval, then one per workload.
    pub fn to_csv(&self) -> String {
        let mut out = String::from(
            "row,node,nodepool,instance_type,zone,capacity_type,price_per_hour,node_cost_per_hour,start_hours,end_hours,hours,cost,end_reason\n",
        );
        for n in &self.nodes {
            let _ = writeln!(
                out,
                "node,{},{},{},{},{},{},{},{},{},{},{},{}",
                csv(&n.node),
                csv(&n.nodepool),
                csv(&n.instance_type),
                csv(&n.zone),
                n.capacity_type,
                n.price_per_hour,
                n.node_cost_per_hour,
                n.start_hours,
                n.end_hours,
                n.hours,
                n.cost,
                csv(&n.end_reason)
            );
        }
        out.push_str("\nrow,workload,cost\n");
        for w in &self.workloads {
            let _ = writeln!(out, "workload,{},{}", csv(&w.workload), w.cost);
        }
        let _ = writeln!(out, "idle,(idle capacity),{}", self.idle_cost);
        out
    }

    /// A self-contained HTML page with inline SVG charts; opens without a network.
    pub fn to_html(&self) -> String {
        let mut out = String::new();
        let _ = write!(
            out,
            "<!doctype html><html><head><meta charset=\"utf-8\"><title>cooper report: {}</title><style>\
             body{{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}}\
             h1{{font-size:1.4em}} h2{{font-size:1.1em;margin-top:1.6em}} table{{border-collapse:collapse}}\
             td,th{{padding:2px 10px;border-bottom:1px solid #ddd;text-align:right}} td:first-child,th:first-child{{text-align:left}}\
             .kpi{{display:inline-block;margin-right:2em}} .meta{{color:#666;font-size:.9em}} .kpi b{{display:block;font-size:1.4em}} svg{{background:#fafafa;border:1px solid #eee}}\
             </style></head><body>",
            esc(&self.scenario)
        );
        let _ = write!(
            out,
            "<h1>cooper simulation report: {}</h1><p>{}</p>\
             <p class=meta>{} strategy, seed {}, {:.1} h simulated; cooper {}; catalog: {}</p>",
            esc(&self.scenario),
            esc(&self.description),
            esc(&self.strategy),
            self.seed,
            self.hours,
            esc(&self.cooper_version),
            esc(&self.catalog)
        );
        let _ = write!(
            out,
            "<div><span class=kpi>cost<b>${:.2}</b></span><span class=kpi>of it per-node (volumes, addresses)<b>${:.2}</b></span><span class=kpi>node-hours<b>{:.1}</b></span>\
             <span class=kpi>spot, of node-hours / of cost<b>{:.0}% / {:.0}%</b></span><span class=kpi>wait p95<b>{:.0} s</b></span>\
             <span class=kpi>interruptions<b>{}</b></span><span class=kpi>pods not run<b>{}</b></span></div>",
            self.total_cost,
            self.node_costs,
            self.node_hours,
            // `+ 0.0` turns a negative zero into "0".
            self.spot_share * 100.0 + 0.0,
            self.spot_cost_share * 100.0 + 0.0,
            self.wait_seconds_p95,
            self.interruptions,
            self.unplaced.len()
        );
        if !self.comparison.is_empty() {
            out.push_str(
                "<h2>Compared with</h2><table><tr><th>run</th><th>cost $</th><th>node-hours</th>\
                 <th>spot, node-hours</th><th>spot, cost</th><th>saving</th></tr>",
            );
            for c in &self.comparison {
                let _ = write!(
                    out,
                    "<tr><td>{}</td><td>{:.2}</td><td>{:.1}</td><td>{:.0}%</td><td>{:.0}%</td><td>{:.1}%</td></tr>",
                    esc(&c.label),
                    c.total_cost,
                    c.node_hours,
                    c.spot_share * 100.0,
                    c.spot_cost_share * 100.0,
                    c.saving_percent
                );
            }
            out.push_str("</table>");
        }
        if !self.events.is_empty() {
            out.push_str(
                "<h2>Scenario events</h2><table><tr><th>event</th><th>from h</th><th>to h</th></tr>",
            );
            for e in &self.events {
                let _ = write!(
                    out,
                    "<tr><td>{}</td><td>{:.2}</td><td>{:.2}</td></tr>",
                    esc(&e.label),
                    e.start_hours,
                    e.end_hours
                );
            }
            out.push_str(
                "</table><p class=meta>On the charts: dashed lines for interruption waves, shaded bands for capacity shortages.</p>",
            );
        }
        let t: Vec<f64> = self.timeline.iter().map(|s| s.hours).collect();
        let mut types: Vec<String> = self
            .timeline
            .iter()
            .flat_map(|s| s.nodes_by_type.keys().cloned())
            .collect();
        types.sort();
        types.dedup();
        let series: Vec<(String, Vec<f64>)> = types
            .iter()
            .map(|ty| {
                (
                    ty.clone(),
                    self.timeline
                        .iter()
                        .map(|s| *s.nodes_by_type.get(ty).unwrap_or(&0) as f64)
                        .collect(),
                )
            })
            .collect();
        out.push_str("<h2>Nodes by instance type</h2>");
        out.push_str(&svg_chart(
            &t,
            &series,
            "nodes",
            None,
            ChartStyle::Stacked,
            &self.events,
        ));
        out.push_str("<h2>Cost rate ($/hour)</h2>");
        out.push_str(&svg_chart(
            &t,
            &[(
                "$/hour".into(),
                self.timeline.iter().map(|s| s.cost_per_hour).collect(),
            )],
            "$/h",
            None,
            ChartStyle::Lines,
            &self.events,
        ));
        out.push_str("<h2>Pending and running pods</h2>");
        out.push_str(&svg_chart(
            &t,
            &[
                (
                    "pending".into(),
                    self.timeline.iter().map(|s| s.pending as f64).collect(),
                ),
                (
                    "running".into(),
                    self.timeline.iter().map(|s| s.running as f64).collect(),
                ),
            ],
            "pods",
            None,
            ChartStyle::Lines,
            &self.events,
        ));
        out.push_str("<h2>Utilisation (requested / allocatable)</h2>");
        // Only the resources some node had; a missing value (no such node) plots as 0.
        let util_series: Vec<(String, Vec<f64>)> = [
            ("cpu %", (|s: &Sample| s.cpu) as fn(&Sample) -> Option<f64>),
            ("memory %", |s: &Sample| s.memory),
            ("gpu %", |s: &Sample| s.gpu),
            ("neuron %", |s: &Sample| s.neuron),
        ]
        .into_iter()
        .filter(|(_, f)| self.timeline.iter().any(|s| f(s).is_some()))
        .map(|(name, f)| {
            (
                name.to_string(),
                self.timeline
                    .iter()
                    .map(|s| f(s).unwrap_or(0.0) * 100.0)
                    .collect(),
            )
        })
        .collect();
        out.push_str(&svg_chart(
            &t,
            &util_series,
            "%",
            Some(100.0),
            ChartStyle::Lines,
            &self.events,
        ));
        let table = |title: &str, rows: &[Breakdown]| {
            let mut s = format!(
                "<h2>{title}</h2><table><tr><th></th><th>nodes</th><th>node-hours</th><th>cost $</th></tr>"
            );
            for r in rows {
                let _ = write!(
                    s,
                    "<tr><td>{}</td><td>{}</td><td>{:.2}</td><td>{:.2}</td></tr>",
                    esc(&r.key),
                    r.nodes,
                    r.node_hours,
                    r.cost
                );
            }
            s.push_str("</table>");
            s
        };
        out.push_str(&table("By instance type", &self.by_instance_type));
        out.push_str(&table("By capacity type", &self.by_capacity_type));
        out.push_str(&table("By NodePool", &self.by_nodepool));
        out.push_str("<h2>Cost by workload</h2><table><tr><th>workload</th><th>cost $</th></tr>");
        for w in &self.workloads {
            let _ = write!(
                out,
                "<tr><td>{}</td><td>{:.2}</td></tr>",
                esc(&w.workload),
                w.cost
            );
        }
        let _ = write!(
            out,
            "<tr><td>(idle capacity)</td><td>{:.2}</td></tr></table>",
            self.idle_cost
        );
        if !self.unplaced.is_empty() {
            out.push_str("<h2>Pods not running</h2><table><tr><th>pod</th><th>state</th><th>reason</th></tr>");
            for p in &self.unplaced {
                let _ = write!(
                    out,
                    "<tr><td>{}</td><td>{}</td><td style=\"text-align:left\">{}</td></tr>",
                    esc(&p.pod),
                    esc(&p.state),
                    esc(&p.reason)
                );
            }
            out.push_str("</table>");
        }
        out.push_str("</body></html>\n");
        out
    }
}

fn tick(v: f64) -> String {
    if (v - v.round()).abs() < 1e-9 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}").trim_end_matches('0').to_string()
    }
}

/// A CSV field, quoted when it must be (RFC 4180).
pub fn csv(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

const COLOURS: [&str; 10] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf",
];

/// The smallest 1, 2, 2.5 or 5 times a power of ten at or above `x` (axis maxima that
/// divide into four readable ticks).
fn nice_ceiling(x: f64) -> f64 {
    if x <= 0.0 {
        return 1.0;
    }
    let magnitude = 10f64.powf(x.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|v| *v >= x)
        .unwrap_or(10.0 * magnitude)
}

/// A line chart as inline SVG, with axes and a legend.
/// How [`svg_chart`] draws its series.
#[derive(Clone, Copy, PartialEq)]
enum ChartStyle {
    Lines,
    /// Stacked areas: each series on top of the ones before it (nodes by type).
    Stacked,
}

fn svg_chart(
    x: &[f64],
    series: &[(String, Vec<f64>)],
    unit: &str,
    fixed_max: Option<f64>,
    style: ChartStyle,
    events: &[ScenarioEvent],
) -> String {
    let (w, h, left, bottom) = (900.0, 260.0, 60.0, 30.0);
    let x_max = x.iter().copied().fold(0.0, f64::max).max(1e-9);
    // Stacked: the series become cumulative sums, drawn as bands between neighbours.
    let cumulative: Vec<(String, Vec<f64>)> = if style == ChartStyle::Stacked {
        let mut below = vec![0.0; x.len()];
        series
            .iter()
            .map(|(name, values)| {
                for (b, v) in below.iter_mut().zip(values) {
                    *b += v;
                }
                (name.clone(), below.clone())
            })
            .collect()
    } else {
        series.to_vec()
    };
    let series = cumulative.as_slice();
    let y_max = fixed_max.unwrap_or_else(|| {
        nice_ceiling(
            series
                .iter()
                .flat_map(|(_, v)| v.iter().copied())
                .fold(0.0, f64::max),
        )
    });
    let px = |v: f64| left + (w - left - 10.0) * v / x_max;
    let py = |v: f64| (h - bottom) - (h - bottom - 10.0) * v / y_max;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{}\" role=\"img\">",
        h + 20.0 * series.len().div_ceil(4) as f64
    );
    let _ = write!(
        s,
        "<line x1=\"{left}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#999\"/>",
        h - bottom,
        w - 10.0,
        h - bottom
    );
    let _ = write!(
        s,
        "<line x1=\"{left}\" y1=\"10\" x2=\"{left}\" y2=\"{}\" stroke=\"#999\"/>",
        h - bottom
    );
    for i in 0..=4 {
        let v = y_max * i as f64 / 4.0;
        let _ = write!(
            s,
            "<text x=\"{}\" y=\"{}\" font-size=\"11\" text-anchor=\"end\">{}</text>",
            left - 4.0,
            py(v) + 4.0,
            tick(v)
        );
        let t = x_max * i as f64 / 4.0;
        let _ = write!(
            s,
            "<text x=\"{}\" y=\"{}\" font-size=\"11\" text-anchor=\"middle\">{:.1} h</text>",
            px(t),
            h - bottom + 16.0,
            t
        );
    }
    let _ = write!(
        s,
        "<text x=\"12\" y=\"{}\" font-size=\"11\" transform=\"rotate(-90 12 {})\">{}</text>",
        h / 2.0,
        h / 2.0,
        esc(unit)
    );
    // Scenario events behind the data: a shaded band for a window, a dashed line for an
    // instant, each with its label as a tooltip.
    for e in events {
        let (x0, x1) = (px(e.start_hours.min(x_max)), px(e.end_hours.min(x_max)));
        if x1 - x0 > 0.5 {
            let _ = write!(
                s,
                "<rect class=\"event\" x=\"{x0:.1}\" y=\"10\" width=\"{:.1}\" height=\"{}\" fill=\"#f5d9a8\" opacity=\"0.5\"><title>{}</title></rect>",
                x1 - x0,
                h - bottom - 10.0,
                esc(&e.label)
            );
        } else {
            let _ = write!(
                s,
                "<line class=\"event\" x1=\"{x0:.1}\" y1=\"10\" x2=\"{x0:.1}\" y2=\"{}\" stroke=\"#c0392b\" stroke-dasharray=\"4 3\"><title>{}</title></line>",
                h - bottom,
                esc(&e.label)
            );
        }
    }
    for (i, (name, values)) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let points: Vec<String> = x
            .iter()
            .zip(values)
            .map(|(a, b)| format!("{:.1},{:.1}", px(*a), py(*b)))
            .collect();
        if style == ChartStyle::Stacked {
            // The band between this series' top and the previous one's (or the axis).
            let lower: Vec<String> = match i {
                0 => vec![
                    format!("{:.1},{:.1}", px(x.last().copied().unwrap_or(0.0)), py(0.0)),
                    format!(
                        "{:.1},{:.1}",
                        px(x.first().copied().unwrap_or(0.0)),
                        py(0.0)
                    ),
                ],
                _ => x
                    .iter()
                    .zip(&series[i - 1].1)
                    .rev()
                    .map(|(a, b)| format!("{:.1},{:.1}", px(*a), py(*b)))
                    .collect(),
            };
            let _ = write!(
                s,
                "<polygon class=\"series\" fill=\"{colour}\" fill-opacity=\"0.75\" stroke=\"none\" points=\"{} {}\"><title>{}</title></polygon>",
                points.join(" "),
                lower.join(" "),
                esc(name)
            );
        } else {
            let _ = write!(
                s,
                "<polyline class=\"series\" fill=\"none\" stroke=\"{colour}\" stroke-width=\"1.6\" points=\"{}\"/>",
                points.join(" ")
            );
        }
        let (lx, ly) = (
            left + (i % 4) as f64 * 210.0,
            h + 8.0 + (i / 4) as f64 * 20.0,
        );
        let _ = write!(
            s,
            "<rect x=\"{lx}\" y=\"{}\" width=\"12\" height=\"4\" fill=\"{colour}\"/><text x=\"{}\" y=\"{}\" font-size=\"12\">{}</text>",
            ly - 4.0,
            lx + 16.0,
            ly,
            esc(name)
        );
    }
    s.push_str("</svg>");
    s
}
