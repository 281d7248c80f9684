//! The dry-run simulator: replays a scenario against a simulated cluster and cloud in
//! simulated time. It drives the same provisioning and disruption code the controller
//! runs — [`Batcher`], [`planner::plan`] with in-flight launches, the unavailable-offering
//! cache, [`disruption::expired_empty_nodes`] — through the [`CloudProvider`] trait. What
//! is simulated: the cloud (latency, capacity, spot interruptions), the kube-scheduler
//! (binding pending pods to ready nodes with the planner's constraint rules), workloads'
//! replica counts (steps, HPA) and Job arrivals.

pub mod scenario;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use crate::catalog::{CapacityType, Catalog};
use crate::cloud::{CloudError, CloudProvider, Instance, LaunchRequest, complete_now};
use crate::disruption::{self, NodeState, disruption_taint};
use crate::labels::{Labels, keys};
use crate::manifest::ManifestError;
use crate::mix::SplitMix64;
use crate::nodepool::{DisruptionReason, NodePool};
use crate::planner::{self, ExistingNode, OfferingKey, PlanInput, PlanOptions, Strategy};
use crate::provisioning::Batcher;
use crate::report::{self, Report};
use crate::resources::{self, Resources};
use crate::workload::{self, DaemonSetOverhead, Gang, PendingPod};
use scenario::{DriftEvent, Scenario, Timeline};

/// How long an offering that failed for lack of capacity is avoided (Karpenter: 3 min).
pub const UNAVAILABLE_FOR: Duration = Duration::from_secs(180);
/// How often the HPA model re-evaluates.
const HPA_PERIOD: Duration = Duration::from_secs(60);
/// HPA scale-down stabilisation window.
const HPA_STABILISATION: Duration = Duration::from_secs(300);
/// How often a disruption blocked by a budget is re-checked (Karpenter polls every 10 s).
const DISRUPTION_POLL: Duration = Duration::from_secs(10);
/// How often utilisation and cost are sampled for the report's timelines.
const SAMPLE_PERIOD: Duration = Duration::from_secs(300);

/// Run-time choices that override the scenario.
#[derive(Debug, Clone, Default)]
pub struct SimOptions {
    pub strategy: Option<Strategy>,
    pub seed: Option<u64>,
    /// Restrict every pool to on-demand capacity (the "what we run today" baseline).
    pub on_demand_only: bool,
    /// How pools with `WhenEmptyOrUnderutilized` consolidate: cooper's moves (default),
    /// Karpenter's (no split), or not at all.
    pub consolidation: ConsolidationMode,
    /// Called with the fraction of simulated time done.
    pub progress: Option<fn(f64)>,
}

/// Which consolidation the simulated controller runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ConsolidationMode {
    /// cooper's: delete, replace, split, merge.
    #[default]
    Cooper,
    /// Karpenter v1's: delete, replace with one node, merge; never split.
    Karpenter,
    /// None (empty nodes are still removed).
    Off,
}

/// A scenario that cannot be simulated.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    Scale { workload: usize, replicas: u32 },
    HpaTick { workload: usize },
    Arrival { workload: usize, index: usize },
    PodFinish { pod: usize, generation: u32 },
    NodeReady { node: usize },
    Interrupt { node: usize },
    Wave { wave: usize },
    Drift { index: usize },
    Sample,
    Tick,
}

/// One thing that happened, in order: the simulation's audit trail. Tests replay it to
/// check the invariants (capacity, constraints, TTL, re-placement) independently of the
/// code that produced it.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    /// A node was launched (not yet ready).
    Launch {
        at: Duration,
        node: usize,
    },
    Ready {
        at: Duration,
        node: usize,
    },
    Bind {
        at: Duration,
        pod: usize,
        node: usize,
    },
    /// The pod left the node: it finished, was scaled down, or its node went away.
    Unbind {
        at: Duration,
        pod: usize,
        node: usize,
        why: &'static str,
    },
    /// Replacing the node began (`why`: `expired` or `drifted`): it is tainted, nothing
    /// new binds there, and it is drained once its replacements are ready.
    Disrupt {
        at: Duration,
        node: usize,
        why: &'static str,
    },
    /// The replacement was abandoned (a replacement failed, or its pods could not all be
    /// placed elsewhere): the taint comes off.
    Undisrupt {
        at: Duration,
        node: usize,
    },
    /// A consolidation move was decided (`kind`: delete, replace, split, merge).
    Consolidate {
        at: Duration,
        kind: &'static str,
        savings_per_hour: f64,
    },
    /// The node was removed; `why` is `empty`, `interrupted`, `expired`, `drifted` or
    /// `underutilized`.
    Terminate {
        at: Duration,
        node: usize,
        why: &'static str,
    },
    /// The pod was deleted (scaled down or finished).
    Delete {
        at: Duration,
        pod: usize,
    },
}

/// What one provisioning pass did.
struct Provisioned {
    /// Pods the plan could not place.
    unplaced: usize,
    /// Nodes launched, with what each was planned to hold.
    launched: Vec<(usize, Resources)>,
    /// Nodes there were (ready or launching) the plan put pods on.
    into_existing: Vec<String>,
}

/// A pod in the simulated cluster.
#[derive(Debug, Clone)]
pub struct SimPod {
    pub pod: PendingPod,
    pub workload: usize,
    pub node: Option<usize>,
    pub pending_since: Option<Duration>,
    pub alive: bool,
    /// Bound to a node at least once.
    pub ran: bool,
    generation: u32,
    run_for: Option<Duration>,
    /// The planner's latest reason, while it cannot be placed.
    pub reason: Option<String>,
}

/// A node in the simulated cluster.
#[derive(Debug, Clone)]
pub struct SimNode {
    pub name: String,
    pub instance_id: String,
    pub pool: usize,
    pub instance_type: String,
    pub zone: String,
    pub capacity_type: CapacityType,
    /// The instance's price (USD/h).
    pub price: f64,
    /// What the node costs besides the instance (its pool's [`NodeBilling`](crate::catalog::NodeBilling)).
    pub node_cost: f64,
    pub labels: Labels,
    pub taints: Vec<crate::labels::Taint>,
    pub allocatable: Resources,
    pub capacity: Resources,
    /// DaemonSet pods' requests.
    pub overhead: Resources,
    /// Overhead plus bound pods.
    pub used: Resources,
    pub pods: BTreeSet<usize>,
    pub launched_at: Duration,
    pub ready_at: Option<Duration>,
    pub terminated_at: Option<Duration>,
    pub end_reason: &'static str,
    pub empty_since: Option<Duration>,
    /// Why the node no longer matches what its pool would launch (an AMI release, a
    /// changed NodePool).
    pub drifted: Option<String>,
    /// Being replaced (expired or drifted): why, and the nodes launched to take its pods;
    /// it is drained once they are all ready.
    pub replacing: Option<(&'static str, Vec<usize>)>,
    /// Launched to take the pods of this node (kept while that node lives, though empty).
    pub replaces: Option<usize>,
    /// What a replacement was planned to hold (the pods it is for are still on the node
    /// it replaces): planning counts it as used until that node is gone.
    pub reserved: Resources,
    attributed_until: Duration,
}

impl SimNode {
    /// Instance plus per-node costs: what the node is billed per hour.
    pub fn cost_per_hour(&self) -> f64 {
        self.price + self.node_cost
    }

    fn alive(&self) -> bool {
        self.terminated_at.is_none()
    }
    fn ready(&self) -> bool {
        self.alive() && self.ready_at.is_some()
    }
}

/// The simulated cloud: instances with prices from the catalog, capacity windows.
struct SimCloud<'a> {
    catalog: &'a Catalog,
    windows: &'a [(Duration, Duration, scenario::CapacityWindowSpec)],
    state: Mutex<CloudState>,
}

#[derive(Default)]
struct CloudState {
    now: Duration,
    next_id: u64,
    instances: BTreeMap<String, Instance>,
}

impl SimCloud<'_> {
    fn no_capacity(&self, now: Duration, t: &str, zone: &str, ct: CapacityType) -> bool {
        let family = t.split('.').next().unwrap_or("");
        self.windows.iter().any(|(from, to, w)| {
            now >= *from
                && now < *to
                && (w.instance_types.is_empty() || w.instance_types.iter().any(|x| x == t))
                && (w.families.is_empty() || w.families.iter().any(|f| f == family))
                && (w.zones.is_empty() || w.zones.iter().any(|z| z == zone))
                && w.capacity_type.is_none_or(|c| c == ct)
        })
    }
}

impl CloudProvider for SimCloud<'_> {
    async fn create(&self, request: &LaunchRequest) -> Result<Instance, CloudError> {
        let mut state = self
            .state
            .lock()
            .map_err(|_| CloudError::Permanent("cloud state poisoned".into()))?;
        let now = state.now;
        for (t, zone, ct) in &request.offerings {
            if self.no_capacity(now, t, zone, *ct) {
                continue;
            }
            let Some(offering) = self.catalog.offering(t, zone, *ct) else {
                continue;
            };
            state.next_id += 1;
            let instance = Instance {
                id: format!("i-sim{:012x}", state.next_id),
                claim: request.claim.clone(),
                nodepool: request.nodepool.clone(),
                instance_type: t.clone(),
                zone: zone.clone(),
                capacity_type: *ct,
                price_per_hour: offering.price,
            };
            state
                .instances
                .insert(instance.id.clone(), instance.clone());
            return Ok(instance);
        }
        Err(CloudError::InsufficientCapacity {
            offerings: request.offerings.clone(),
        })
    }

    async fn terminate(&self, instance_id: &str) -> Result<(), CloudError> {
        let mut state = self
            .state
            .lock()
            .map_err(|_| CloudError::Permanent("cloud state poisoned".into()))?;
        state
            .instances
            .remove(instance_id)
            .map(|_| ())
            .ok_or_else(|| CloudError::NotFound(instance_id.to_string()))
    }

    async fn list(&self) -> Result<Vec<Instance>, CloudError> {
        let state = self
            .state
            .lock()
            .map_err(|_| CloudError::Permanent("cloud state poisoned".into()))?;
        Ok(state.instances.values().cloned().collect())
    }

    async fn describe_instance(
        &self,
        instance_id: &str,
    ) -> Result<crate::cloud::InstanceStatus, CloudError> {
        let state = self
            .state
            .lock()
            .map_err(|_| CloudError::Permanent("cloud state poisoned".into()))?;
        Ok(match state.instances.get(instance_id) {
            Some(i) => crate::cloud::InstanceStatus::Exists(i.clone()),
            None => crate::cloud::InstanceStatus::NotFound,
        })
    }

    async fn instances_for_claim(&self, claim: &str) -> Result<Vec<Instance>, CloudError> {
        let state = self
            .state
            .lock()
            .map_err(|_| CloudError::Permanent("cloud state poisoned".into()))?;
        Ok(state
            .instances
            .values()
            .filter(|i| i.claim == claim)
            .cloned()
            .collect())
    }
}

/// A workload's pod template and bookkeeping.
struct WorkloadState {
    /// Index into the scenario's workloads (DaemonSets have no state).
    spec: usize,
    template: PendingPod,
    base: String,
    /// Raw gang name (PodGroup) of the template, if any.
    gang: Option<String>,
    /// Pods created per Job arrival (parallelism) or initial replicas.
    replicas: u32,
    next_index: usize,
    pods: Vec<usize>,
    /// HPA recommendation history for scale-down stabilisation.
    history: VecDeque<(Duration, u32)>,
}

/// Everything the simulation knows; also what the report and tests read.
pub struct Simulation<'a> {
    pub scenario: &'a Scenario,
    pub pools: Vec<NodePool>,
    pub strategy: Strategy,
    pub pods: Vec<SimPod>,
    /// The pods alive and not bound (pending), by index: the scheduler and the
    /// controller look at these, and scanning every pod ever created after each event
    /// made long scenarios quadratic.
    unbound: BTreeSet<usize>,
    pub nodes: Vec<SimNode>,
    /// The nodes not terminated, by index (in launch order, as scanning them all did):
    /// a year of scale-ups and scale-downs creates thousands of nodes, and each pass
    /// over every node ever launched made long scenarios quadratic.
    live_nodes: BTreeSet<usize>,
    /// Alive pods that carry scheduling constraints: when none does, the scheduler
    /// model and the planner skip the constraint view without looking at every pod.
    constrained_alive: usize,
    pub daemonsets: Vec<DaemonSetOverhead>,
    workloads: Vec<WorkloadState>,
    cloud: SimCloud<'a>,
    batcher: Batcher,
    unavailable: BTreeMap<OfferingKey, Duration>,
    events: BinaryHeap<Reverse<(Duration, u64, Event)>>,
    seq: u64,
    tick_at: Option<Duration>,
    /// Something the planner reads changed since the last plan (pods, nodes, capacity).
    changed: bool,
    rng: SplitMix64,
    now: Duration,
    /// Facts the report needs.
    pub log: report::SimLog,
    /// Everything that happened, in order.
    pub history: Vec<Record>,
    consolidation: ConsolidationMode,
    /// Each pool's last launch or removal: consolidation waits for a pool to be stable.
    last_node_change: BTreeMap<usize, Duration>,
    /// Pods have moved since the last consolidation decision (else nothing changed).
    consolidation_dirty: bool,
}

/// Simulate a scenario and build its report.
pub fn run(scenario: &Scenario, options: &SimOptions) -> Result<Report, SimError> {
    let mut sim = Simulation::new(scenario, options)?;
    sim.run(options.progress);
    Ok(report::build(&sim))
}

/// Simulate a scenario and return the finished simulation (for tests and tools that
/// inspect its history) together with its report.
pub fn run_full<'a>(
    scenario: &'a Scenario,
    options: &SimOptions,
) -> Result<(Simulation<'a>, Report), SimError> {
    let mut sim = Simulation::new(scenario, options)?;
    sim.run(options.progress);
    let report = report::build(&sim);
    Ok((sim, report))
}

impl<'a> Simulation<'a> {
    /// Set up the cluster, workloads and event queue.
    pub fn new(scenario: &'a Scenario, options: &SimOptions) -> Result<Self, SimError> {
        let mut pools = scenario.pools.clone();
        if options.on_demand_only {
            crate::nodepool::restrict_to_on_demand(&mut pools);
        }
        let mut daemonsets = Vec::new();
        let mut workloads = Vec::new();
        for (spec_index, w) in scenario.workloads.iter().enumerate() {
            let mut value = w.document.value.clone();
            let kind = w.document.kind().to_string();
            let replicas = match kind.as_str() {
                "Job" => value
                    .pointer("/spec/parallelism")
                    .and_then(|v| v.as_u64())
                    .unwrap_or(1) as u32,
                "Pod" => 1,
                _ => value
                    .pointer("/spec/replicas")
                    .and_then(|v| v.as_u64())
                    .unwrap_or(1) as u32,
            };
            // Parse one pod of the template with the shared workload code.
            if let Some(spec) = value.get_mut("spec").and_then(|s| s.as_object_mut()) {
                if spec.contains_key("replicas") {
                    spec.insert("replicas".into(), 1.into());
                }
                if kind == "Job" {
                    spec.insert("parallelism".into(), 1.into());
                    spec.insert("completions".into(), 1.into());
                }
            }
            let doc = crate::manifest::Document {
                value,
                ..w.document.clone()
            };
            let parsed =
                workload::from_documents_with(std::slice::from_ref(&doc), &scenario.volumes)?;
            if kind == "DaemonSet" {
                daemonsets.extend(parsed.daemonsets);
                continue;
            }
            let Some(mut template) = parsed.pods.into_iter().next() else {
                return Err(doc.error("describes no pod").into());
            };
            if options.on_demand_only {
                // The baseline is "the same workloads, all on on-demand": a pod pinned to
                // spot would otherwise never run and make the baseline look cheap.
                template.selector.drop_capacity_type();
            }
            let base = doc
                .value
                .pointer("/metadata/name")
                .and_then(|v| v.as_str())
                .unwrap_or("pod")
                .to_string();
            let gang = template.gang.clone();
            workloads.push(WorkloadState {
                spec: spec_index,
                template,
                base,
                gang,
                replicas,
                next_index: 0,
                pods: Vec::new(),
                history: VecDeque::new(),
            });
        }
        let seed = options.seed.unwrap_or(scenario.seed);
        let mut sim = Simulation {
            scenario,
            pools,
            strategy: options.strategy.unwrap_or(scenario.strategy),
            consolidation: options.consolidation,
            last_node_change: BTreeMap::new(),
            consolidation_dirty: false,
            pods: Vec::new(),
            nodes: Vec::new(),
            daemonsets,
            workloads: Vec::new(),
            cloud: SimCloud {
                catalog: &scenario.catalog,
                windows: &scenario.capacity_windows,
                state: Mutex::new(CloudState::default()),
            },
            batcher: Batcher::new(scenario.batch),
            unavailable: BTreeMap::new(),
            events: BinaryHeap::new(),
            seq: 0,
            unbound: BTreeSet::new(),
            live_nodes: BTreeSet::new(),
            constrained_alive: 0,
            tick_at: None,
            changed: false,
            rng: SplitMix64::new(seed),
            now: Duration::ZERO,
            log: report::SimLog {
                seed,
                ..Default::default()
            },
            history: Vec::new(),
        };
        for (index, state) in workloads.into_iter().enumerate() {
            let replicas = state.replicas;
            let timeline = &scenario.workloads[state.spec].timeline;
            sim.workloads.push(state);
            match timeline {
                Timeline::Fixed => sim.push(
                    Duration::ZERO,
                    Event::Scale {
                        workload: index,
                        replicas,
                    },
                ),
                Timeline::Steps(steps) => {
                    for (t, r) in steps {
                        sim.push(
                            *t,
                            Event::Scale {
                                workload: index,
                                replicas: *r,
                            },
                        );
                    }
                }
                Timeline::Hpa { .. } => {
                    sim.push(Duration::ZERO, Event::HpaTick { workload: index })
                }
                Timeline::Arrivals { times, .. } => {
                    for (i, t) in times.iter().enumerate() {
                        sim.push(
                            *t,
                            Event::Arrival {
                                workload: index,
                                index: i,
                            },
                        );
                    }
                }
            }
        }
        for (i, (t, ..)) in scenario.waves.iter().enumerate() {
            sim.push(*t, Event::Wave { wave: i });
        }
        for (i, (t, _)) in scenario.drift.iter().enumerate() {
            sim.push(*t, Event::Drift { index: i });
        }
        sim.push(Duration::ZERO, Event::Sample);
        Ok(sim)
    }

    fn push(&mut self, at: Duration, event: Event) {
        self.seq += 1;
        self.events.push(Reverse((at, self.seq, event)));
    }

    fn wake(&mut self, at: Duration) {
        if self.tick_at.is_none_or(|t| at < t) {
            self.tick_at = Some(at);
            self.push(at, Event::Tick);
        }
    }

    /// Run to the scenario's end.
    pub fn run(&mut self, progress: Option<fn(f64)>) {
        let end = self.scenario.duration;
        let mut last_progress = 0.0;
        while let Some(Reverse((at, _, event))) = self.events.pop() {
            if at > end {
                break;
            }
            self.now = at;
            if let Ok(mut s) = self.cloud.state.lock() {
                s.now = at;
            }
            self.handle(event);
            if let Some(f) = progress {
                let done = at.as_secs_f64() / end.as_secs_f64();
                if done - last_progress >= 0.01 {
                    f(done);
                    last_progress = done;
                }
            }
        }
        self.now = end;
        self.sample();
        for n in 0..self.nodes.len() {
            if self.nodes[n].alive() {
                self.attribute(n);
                self.close_empty(n);
            }
        }
        if let Some(f) = progress {
            f(1.0);
        }
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Scale { workload, replicas } => self.scale(workload, replicas),
            Event::HpaTick { workload } => self.hpa(workload),
            Event::Arrival { workload, index } => self.arrive(workload, index),
            Event::PodFinish { pod, generation } => {
                if self.pods[pod].alive
                    && self.pods[pod].generation == generation
                    && self.pods[pod].node.is_some()
                {
                    self.log.jobs_completed += 1;
                    self.delete_pod(pod);
                }
            }
            Event::NodeReady { node } => {
                if self.nodes[node].alive() {
                    self.history.push(Record::Ready { at: self.now, node });
                    self.nodes[node].ready_at = Some(self.now);
                    self.nodes[node].empty_since = Some(self.now);
                    self.changed = true;
                    self.schedule();
                    for old in self.replaced_by(node) {
                        self.finish_replacement(old);
                    }
                }
            }
            Event::Drift { index } => {
                let (_, event) = self.scenario.drift[index].clone();
                let live: Vec<usize> = self.live_nodes.iter().copied().collect();
                for n in live {
                    let why = match &event {
                        DriftEvent::AmiRelease => "a new AMI was released".to_string(),
                        DriftEvent::NodePoolChange(pool)
                            if self.pools[self.nodes[n].pool].name == *pool =>
                        {
                            format!("NodePool {pool} changed")
                        }
                        DriftEvent::NodePoolChange(_) => continue,
                    };
                    self.nodes[n].drifted.get_or_insert(why);
                }
                self.wake(self.now);
            }
            Event::Interrupt { node } => {
                if self.nodes[node].alive() {
                    self.log.interruptions += 1;
                    self.terminate(node, "interrupted");
                }
            }
            Event::Wave { wave } => {
                let (_, fraction, families, zones) = self.scenario.waves[wave].clone();
                let matching: Vec<usize> = self
                    .live_nodes
                    .iter()
                    .copied()
                    .filter(|&n| {
                        let node = &self.nodes[n];
                        node.alive()
                            && node.capacity_type == CapacityType::Spot
                            && (families.is_empty()
                                || families
                                    .iter()
                                    .any(|f| node.instance_type.starts_with(&format!("{f}."))))
                            && (zones.is_empty() || zones.contains(&node.zone))
                    })
                    .collect();
                let count = (matching.len() as f64 * fraction).round() as usize;
                let mut chosen = matching;
                for i in (1..chosen.len()).rev() {
                    let j = self.rng.below(i as u64 + 1) as usize;
                    chosen.swap(i, j);
                }
                for n in chosen.into_iter().take(count) {
                    self.log.interruptions += 1;
                    self.terminate(n, "interrupted");
                }
            }
            Event::Sample => {
                self.sample();
                self.push(self.now + SAMPLE_PERIOD, Event::Sample);
            }
            Event::Tick => {
                if self.tick_at == Some(self.now) {
                    self.tick_at = None;
                }
                self.controller();
            }
        }
        self.wake_if_needed();
    }

    /// Schedule the next controller tick: at the batching window's deadline when
    /// something changed and pods are pending, when an unavailable offering becomes
    /// usable again, and when the next empty node reaches its TTL. Like Karpenter, an
    /// unchanged cluster is not re-planned (a pod that could not be placed stays
    /// pending with its reason until something changes).
    fn wake_if_needed(&mut self) {
        let pending = !self.unbound.is_empty();
        if pending && self.changed {
            let next = self.batcher.deadline().unwrap_or(self.now);
            self.wake(next.max(self.now + Duration::from_millis(1)));
        }
        if pending && let Some(t) = self.unavailable.values().min() {
            self.wake((*t).max(self.now + Duration::from_millis(1)));
        }
        if self.consolidation_dirty && self.unbound.is_empty() {
            let at = self
                .consolidating_pools()
                .iter()
                .map(|(i, after)| {
                    self.last_node_change.get(i).copied().unwrap_or_default() + *after
                })
                .min();
            if let Some(at) = at {
                self.wake(at.max(self.now + Duration::from_millis(1)));
            }
        }
        let states = self.node_states();
        if let Some(t) = disruption::next_due(&states, &self.pools) {
            // A node past its TTL that the budget holds back is re-checked every 10 s.
            let t = if t <= self.now {
                self.now + DISRUPTION_POLL
            } else {
                t
            };
            self.wake(t);
        }
    }

    // ---- workloads -------------------------------------------------------------

    fn new_pod(
        &mut self,
        workload: usize,
        name: String,
        gang: Option<String>,
        run_for: Option<Duration>,
    ) {
        let mut pod = self.workloads[workload].template.clone();
        pod.name = name;
        pod.gang = gang;
        let id = self.pods.len();
        self.unbound.insert(id);
        if pod.constraints.is_some() {
            self.constrained_alive += 1;
        }
        self.pods.push(SimPod {
            pod,
            workload,
            node: None,
            pending_since: Some(self.now),
            alive: true,
            ran: false,
            generation: 0,
            run_for,
            reason: None,
        });
        self.workloads[workload].pods.push(id);
        self.log.pods_created += 1;
        self.changed = true;
    }

    fn scale(&mut self, workload: usize, replicas: u32) {
        // The workload's list keeps its alive pods only (it is scanned on every scale).
        let pods = &self.pods;
        self.workloads[workload].pods.retain(|&p| pods[p].alive);
        let alive: Vec<usize> = self.workloads[workload].pods.clone();
        let current = alive.len() as u32;
        if replicas > current {
            for _ in current..replicas {
                let w = &mut self.workloads[workload];
                let name = format!("{}-{}", w.base, w.next_index);
                w.next_index += 1;
                let gang = w.gang.clone();
                self.new_pod(workload, name, gang, None);
            }
        } else if replicas < current {
            // Like a ReplicaSet: pending pods go first, then the newest.
            let mut victims = alive;
            victims.sort_by_key(|&p| (self.pods[p].node.is_some(), Reverse(p)));
            for p in victims.into_iter().take((current - replicas) as usize) {
                self.delete_pod(p);
            }
        }
        self.schedule();
    }

    fn hpa(&mut self, workload: usize) {
        let Timeline::Hpa {
            min,
            max,
            target,
            load,
        } = &self.scenario.workloads[self.workloads[workload].spec].timeline
        else {
            return;
        };
        let per_pod = self.workloads[workload]
            .template
            .requests
            .get(resources::CPU) as f64
            / 1000.0;
        let demand = load.at(self.now);
        let wanted = if per_pod > 0.0 {
            (demand / (per_pod * target)).ceil() as u32
        } else {
            *min
        };
        let wanted = wanted.clamp(*min, *max);
        let now = self.now;
        let history = &mut self.workloads[workload].history;
        history.push_back((now, wanted));
        while history
            .front()
            .is_some_and(|(t, _)| now.saturating_sub(*t) > HPA_STABILISATION)
        {
            history.pop_front();
        }
        // Scale up at once; scale down only to the highest recommendation in the window.
        let stabilised = history.iter().map(|(_, r)| *r).max().unwrap_or(wanted);
        self.scale(workload, stabilised);
        self.push(self.now + HPA_PERIOD, Event::HpaTick { workload });
    }

    fn arrive(&mut self, workload: usize, index: usize) {
        let Timeline::Arrivals { run_for, .. } =
            &self.scenario.workloads[self.workloads[workload].spec].timeline
        else {
            return;
        };
        let run_for = *run_for;
        let (base, count, gang) = {
            let w = &self.workloads[workload];
            (w.base.clone(), w.replicas, w.gang.clone())
        };
        let gang = gang.map(|g| format!("{g}-{index}"));
        for k in 0..count {
            self.new_pod(
                workload,
                format!("{base}-{index}-{k}"),
                gang.clone(),
                run_for,
            );
        }
        self.schedule();
    }

    fn delete_pod(&mut self, pod: usize) {
        self.changed = true;
        self.consolidation_dirty = true;
        if !self.pods[pod].ran {
            let reason = self.pods[pod]
                .reason
                .clone()
                .unwrap_or_else(|| "waiting for a launching node".into());
            self.log
                .deleted_before_running
                .push((self.pods[pod].pod.key(), reason));
        }
        if self.pods[pod].alive && self.pods[pod].pod.constraints.is_some() {
            self.constrained_alive -= 1;
        }
        self.pods[pod].alive = false;
        self.unbound.remove(&pod);
        self.pods[pod].pending_since = None;
        if let Some(n) = self.pods[pod].node.take() {
            self.unbind(n, pod);
        }
        self.history.push(Record::Delete { at: self.now, pod });
    }

    // ---- the kube-scheduler model ---------------------------------------------

    fn bind(&mut self, n: usize, pod: usize) {
        self.history.push(Record::Bind {
            at: self.now,
            pod,
            node: n,
        });
        self.attribute(n);
        self.close_empty(n);
        let requests = self.pods[pod].pod.requests.clone();
        let node = &mut self.nodes[n];
        node.used.add_all(&requests);
        node.pods.insert(pod);
        node.empty_since = None;
        let p = &mut self.pods[pod];
        if let Some(since) = p.pending_since.take() {
            self.log.waits.push(self.now.saturating_sub(since));
        }
        p.node = Some(n);
        self.unbound.remove(&pod);
        p.ran = true;
        p.reason = None;
        p.generation += 1;
        if let Some(d) = p.run_for {
            let generation = p.generation;
            self.push(self.now + d, Event::PodFinish { pod, generation });
        }
    }

    fn unbind(&mut self, n: usize, pod: usize) {
        self.history.push(Record::Unbind {
            at: self.now,
            pod,
            node: n,
            why: "deleted",
        });
        self.attribute(n);
        let requests = self.pods[pod].pod.requests.clone();
        let now = self.now;
        let node = &mut self.nodes[n];
        node.used = node.used.minus(&requests);
        node.pods.remove(&pod);
        if node.pods.is_empty() && node.ready() {
            node.empty_since = Some(now);
        }
    }

    fn fits(&self, n: usize, pod: &PendingPod) -> bool {
        let node = &self.nodes[n];
        pod.requests.fits_beside(&node.used, &node.allocatable)
            && pod.fits_node(&node.labels, &node.taints)
    }

    /// The ready nodes and the pods bound to them as kube-scheduler's constraint filters
    /// see them; `None` when no pod in the cluster has a constraint that could matter
    /// (no spread, affinity, anti-affinity or host port anywhere), which is most
    /// scenarios and keeps the model cheap for them.
    fn constraint_view(&self) -> Option<crate::scheduling::Cluster> {
        // No workload with constraints: nothing to check (asking every pod ever created
        // made each scheduling pass scan them all).
        if !self
            .workloads
            .iter()
            .any(|w| w.template.constraints.is_some())
            || self.constrained_alive == 0
        {
            return None;
        }
        let nodes = self
            .live_nodes
            .iter()
            .map(|&n| &self.nodes[n])
            .filter(|n| n.ready())
            .map(|n| crate::scheduling::NodeView {
                name: n.name.clone(),
                labels: n.labels.clone(),
                taints: n.taints.clone(),
            })
            .collect();
        Some(crate::scheduling::Cluster {
            nodes,
            pods: self.placed_pods(),
        })
    }

    /// The pods bound to nodes, as the constraints see them.
    fn placed_pods(&self) -> Vec<crate::scheduling::PlacedPod> {
        // Bound pods are on their live node's list; in pod order, as before.
        let mut bound: Vec<usize> = self
            .live_nodes
            .iter()
            .flat_map(|&n| self.nodes[n].pods.iter().copied())
            .collect();
        bound.sort_unstable();
        bound
            .into_iter()
            .filter(|&p| self.pods[p].alive)
            .filter_map(|p| {
                Some(
                    self.pods[p]
                        .pod
                        .placed_on(&self.nodes[self.pods[p].node?].name),
                )
            })
            .collect()
    }

    /// Would the scheduler's constraint filters admit the pod onto node `n`?
    fn admitted(
        cluster: Option<&crate::scheduling::Cluster>,
        node: &SimNode,
        pod: &PendingPod,
    ) -> bool {
        let Some(cluster) = cluster else { return true };
        cluster
            .admits(
                &pod.namespace,
                &pod.labels,
                pod.constraints(),
                &pod.selector,
                &pod.tolerations,
                &node.name,
            )
            .is_ok()
    }

    /// Bind pending pods to ready nodes: higher priority first, then oldest; gangs whole
    /// or not at all; first node in launch order that fits the pod and that the
    /// scheduler's constraint filters (spread, pod affinity and anti-affinity, host
    /// ports; `scheduling::Cluster::admits`, the planner's own model) admit.
    fn schedule(&mut self) {
        let ready: Vec<usize> = self
            .live_nodes
            .iter()
            .copied()
            .filter(|&n| self.nodes[n].ready())
            .collect();
        if ready.is_empty() {
            return;
        }
        let mut pending: Vec<usize> = self.unbound.iter().copied().collect();
        pending.sort_by_key(|&p| {
            (
                Reverse(self.pods[p].pod.priority),
                self.pods[p].pending_since,
                p,
            )
        });
        let mut cluster = self.constraint_view();
        // Whether a bound pod's anti-affinity or host ports could keep others out.
        let symmetric = cluster.as_ref().is_some_and(|c| {
            c.pods
                .iter()
                .any(|p| !p.anti_affinity.is_empty() || !p.host_ports.is_empty())
        });
        let mut gangs: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        // Per workload, the first node that may still fit its (identical) pods; pods
        // with constraints look at every node (a spread constraint can admit a pod on a
        // node it refused a moment ago, once other domains have filled).
        let mut first_fit: HashMap<usize, usize> = HashMap::new();
        for p in pending {
            if let Some(g) = self.pods[p].pod.gang.clone() {
                gangs.entry(g).or_default().push(p);
                continue;
            }
            let w = self.pods[p].workload;
            let pod = self.pods[p].pod.clone();
            let constrained = pod.constraints.is_some() || symmetric;
            let start = if constrained {
                0
            } else {
                first_fit.get(&w).copied().unwrap_or(0)
            };
            let found = (start..ready.len()).find(|&i| {
                self.fits(ready[i], &pod)
                    && (!constrained
                        || Self::admitted(cluster.as_ref(), &self.nodes[ready[i]], &pod))
            });
            match found {
                Some(i) => {
                    if !constrained {
                        first_fit.insert(w, i);
                    }
                    self.bind(ready[i], p);
                    if let Some(c) = cluster.as_mut() {
                        c.pods.push(pod.placed_on(&self.nodes[ready[i]].name));
                    }
                }
                None => {
                    if !constrained {
                        first_fit.insert(w, ready.len());
                    }
                }
            }
        }
        for members in gangs.into_values() {
            // Trial placement in one zone at a time on a copy of the room; commit only
            // if every member fits (all-or-nothing, one zone).
            let zones: BTreeSet<&str> =
                ready.iter().map(|&n| self.nodes[n].zone.as_str()).collect();
            let mut chosen = None;
            for zone in zones {
                let mut used: HashMap<usize, Resources> = HashMap::new();
                let mut trial = cluster.clone();
                let mut placement = Vec::new();
                for &p in &members {
                    let pod = &self.pods[p].pod;
                    let found = ready.iter().copied().find(|&n| {
                        let node = &self.nodes[n];
                        let u = used.get(&n).unwrap_or(&node.used);
                        node.zone == zone
                            && pod.requests.fits_beside(u, &node.allocatable)
                            && pod.fits_node(&node.labels, &node.taints)
                            && Self::admitted(trial.as_ref(), node, pod)
                    });
                    let Some(n) = found else { break };
                    let u = used.entry(n).or_insert_with(|| self.nodes[n].used.clone());
                    u.add_all(&pod.requests);
                    if let Some(c) = trial.as_mut() {
                        c.pods.push(pod.placed_on(&self.nodes[n].name));
                    }
                    placement.push((n, p));
                }
                if placement.len() == members.len() {
                    chosen = Some((placement, trial));
                    break;
                }
            }
            if let Some((placement, trial)) = chosen {
                for (n, p) in placement {
                    self.bind(n, p);
                }
                cluster = trial;
            }
        }
    }

    // ---- the controller ----------------------------------------------------------

    fn node_states(&self) -> Vec<NodeState> {
        self.live_nodes
            .iter()
            .map(|&n| &self.nodes[n])
            .map(|n| NodeState {
                name: n.name.clone(),
                nodepool: self.pools[n.pool].name.clone(),
                empty_since: n.empty_since,
                launched_at: n.launched_at,
                drifted: n.drifted.clone(),
                // A replacement stays while the node it replaces is being drained.
                do_not_disrupt: n.replaces.is_some_and(|old| self.nodes[old].alive()),
                disrupting: n.replacing.is_some(),
            })
            .collect()
    }

    /// Replace a node that expired or drifted: taint it so nothing new lands there, plan
    /// its pods elsewhere as the controller would (existing room first, else new nodes),
    /// and drain it once the new nodes are ready — at once when none are needed. When the
    /// plan cannot place all of them (pool limits), the node is kept for now.
    fn replace(&mut self, n: usize, reason: &'static str) {
        let pods: Vec<usize> = self.nodes[n].pods.iter().copied().collect();
        if pods.is_empty() {
            self.terminate(n, reason);
            return;
        }
        self.nodes[n].taints.push(disruption_taint());
        self.history.push(Record::Disrupt {
            at: self.now,
            node: n,
            why: reason,
        });
        let provisioned = self.provision(&pods);
        // New nodes, and nodes still launching that the plan put some of the pods on:
        // the node drains once all of them are up.
        let mut new: Vec<usize> = Vec::new();
        for (r, requested) in &provisioned.launched {
            self.nodes[*r].replaces = Some(n);
            self.nodes[*r].reserved = requested.clone();
            new.push(*r);
        }
        for name in &provisioned.into_existing {
            if let Some(&r) = self
                .live_nodes
                .iter()
                .find(|&&r| self.nodes[r].name == *name && !self.nodes[r].ready())
            {
                new.push(r);
            }
        }
        if provisioned.unplaced > 0 {
            self.nodes[n].taints.retain(|t| *t != disruption_taint());
            self.history.push(Record::Undisrupt {
                at: self.now,
                node: n,
            });
            self.log.replacements_deferred += 1;
            return;
        }
        self.nodes[n].replacing = Some((reason, new));
        self.finish_replacement(n);
    }

    /// The live nodes waiting for `node` among their replacements.
    fn replaced_by(&self, node: usize) -> Vec<usize> {
        self.live_nodes
            .iter()
            .copied()
            .filter(|&o| {
                self.nodes[o]
                    .replacing
                    .as_ref()
                    .is_some_and(|(_, new)| new.contains(&node))
            })
            .collect()
    }

    /// Drain a node being replaced once every replacement is ready; start over when one
    /// of them failed.
    fn finish_replacement(&mut self, old: usize) {
        let Some((reason, new)) = self.nodes[old].replacing.clone() else {
            return;
        };
        if !self.nodes[old].alive() {
            return;
        }
        if new.iter().any(|&r| !self.nodes[r].alive()) {
            self.nodes[old].replacing = None;
            self.nodes[old].taints.retain(|t| *t != disruption_taint());
            self.history.push(Record::Undisrupt {
                at: self.now,
                node: old,
            });
            self.wake(self.now);
            return;
        }
        if new.iter().all(|&r| self.nodes[r].ready()) {
            self.terminate(old, reason);
        }
    }

    fn controller(&mut self) {
        self.schedule();
        let now = self.now;
        let before = self.unavailable.len();
        self.unavailable.retain(|_, until| *until > now);
        if self.unavailable.len() != before {
            self.changed = true;
        }
        let pending: Vec<usize> = self.unbound.iter().copied().collect();
        if pending.is_empty() {
            self.batcher.observe(now, 0);
            self.changed = false;
        } else if self.changed && self.batcher.observe(now, pending.len()) {
            self.changed = false;
            self.provision(&pending);
        }
        // Disruption: empty nodes past their TTL, drifted and expired nodes replaced.
        let states = self.node_states();
        for decision in disruption::disruptions(&states, &self.pools, now, now) {
            let Some(n) = self
                .live_nodes
                .iter()
                .copied()
                .find(|&n| self.nodes[n].name == decision.name)
            else {
                continue;
            };
            match decision.reason {
                DisruptionReason::Empty => self.terminate(n, "empty"),
                DisruptionReason::Drifted => self.replace(n, "drifted"),
                DisruptionReason::Expired => self.replace(n, "expired"),
                DisruptionReason::Underutilized => {}
            }
        }
        self.consolidate();
    }

    /// The pools that consolidate underused nodes, with how long the cluster must be
    /// stable first (their `consolidateAfter`).
    fn consolidating_pools(&self) -> Vec<(usize, Duration)> {
        if self.consolidation == ConsolidationMode::Off {
            return Vec::new();
        }
        self.pools
            .iter()
            .enumerate()
            .filter(|(_, p)| {
                p.consolidation_policy
                    == crate::nodepool::ConsolidationPolicy::WhenEmptyOrUnderutilized
            })
            .filter_map(|(i, p)| Some((i, p.empty_ttl?)))
            .collect()
    }

    /// Consolidation: when nothing is pending, launching or being replaced, and the
    /// cluster has been stable for the pool's `consolidateAfter`, ask
    /// [`crate::consolidation::best_move`] for the best move over the consolidating pools'
    /// nodes and make it: a delete drains at once; other moves launch first and drain the
    /// nodes they replace once the new ones are ready (as drift and expiry do).
    fn consolidate(&mut self) {
        let pools = self.consolidating_pools();
        if pools.is_empty() || !self.consolidation_dirty || !self.unbound.is_empty() {
            return;
        }
        // A pool with a node launching or being replaced is not stable; nor one whose
        // last launch or removal is more recent than its consolidateAfter.
        let busy: BTreeSet<usize> = self
            .live_nodes
            .iter()
            .map(|&n| &self.nodes[n])
            .filter(|n| {
                !n.ready()
                    || n.replacing.is_some()
                    || n.replaces.is_some_and(|old| self.nodes[old].alive())
            })
            .map(|n| n.pool)
            .collect();
        let now = self.now;
        let since = |i: usize| self.last_node_change.get(&i).copied().unwrap_or_default();
        let stable: Vec<usize> = pools
            .iter()
            .filter(|(i, after)| !busy.contains(i) && now.saturating_sub(since(*i)) >= *after)
            .map(|(i, _)| *i)
            .collect();
        // Come back when a quiet pool that is not stable yet will be.
        if let Some(at) = pools
            .iter()
            .filter(|(i, _)| !busy.contains(i))
            .map(|(i, after)| since(*i) + *after)
            .filter(|t| *t > now)
            .min()
        {
            self.wake(at);
        }
        if stable.is_empty() {
            return;
        }
        self.consolidation_dirty = false;
        // Room in each pool's Underutilized budget.
        let mut room: BTreeMap<usize, usize> = BTreeMap::new();
        for &i in &stable {
            let total = self
                .live_nodes
                .iter()
                .filter(|&&n| self.nodes[n].pool == i)
                .count();
            room.insert(
                i,
                disruption::allowed(&self.pools[i], DisruptionReason::Underutilized, total, now),
            );
        }
        let max_remove: BTreeMap<String, usize> = room
            .iter()
            .map(|(&i, &r)| (self.pools[i].name.clone(), r))
            .collect();
        let candidates: Vec<crate::consolidation::Candidate> = self
            .live_nodes
            .iter()
            .map(|&n| &self.nodes[n])
            .filter(|n| room.get(&n.pool).is_some_and(|r| *r > 0))
            .map(|n| crate::consolidation::Candidate {
                name: n.name.clone(),
                nodepool: self.pools[n.pool].name.clone(),
                capacity_type: n.capacity_type,
                cost_per_hour: n.cost_per_hour(),
                pods: n.pods.iter().map(|&p| self.pods[p].pod.clone()).collect(),
            })
            .collect();
        if candidates.is_empty() {
            return;
        }
        let unavailable: BTreeSet<OfferingKey> = self.unavailable.keys().cloned().collect();
        let nodes = self.existing_nodes();
        let running = self.placed_pods();
        let input = crate::consolidation::Input {
            pools: &self.pools,
            catalog: &self.scenario.catalog,
            daemonsets: &self.daemonsets,
            unavailable: &unavailable,
            nodes: &nodes,
            candidates: &candidates,
            running: &running,
            max_remove: &max_remove,
        };
        let options = PlanOptions {
            strategy: self.strategy,
            time_limit: self.scenario.time_limit,
            relative_gap: 0.01,
            budget: crate::planner::Budget::Work,
            exact_search: true,
        };
        let style = match self.consolidation {
            ConsolidationMode::Karpenter => crate::consolidation::Style::KARPENTER,
            _ => crate::consolidation::Style::COOPER,
        };
        let decision = crate::consolidation::best_move(&input, &options, style);
        tracing::debug!(
            at_h = now.as_secs_f64() / 3600.0,
            candidates = candidates.len(),
            decision = %decision.as_ref().map(|m| m.describe()).unwrap_or_default(),
            "consolidation"
        );
        let Some(decision) = decision else {
            return;
        };
        let removed: Vec<usize> = decision
            .remove
            .iter()
            .filter_map(|name| {
                self.live_nodes
                    .iter()
                    .copied()
                    .find(|&n| self.nodes[n].name == *name)
            })
            .collect();
        // The budget holds per pool.
        for (&pool, &allowed) in &room {
            if removed
                .iter()
                .filter(|&&n| self.nodes[n].pool == pool)
                .count()
                > allowed
            {
                return;
            }
        }
        self.log.plans += 1;
        *self
            .log
            .consolidations
            .entry(decision.kind.as_str().to_string())
            .or_default() += 1;
        self.log.consolidation_savings_per_hour += decision.savings_per_hour();
        self.history.push(Record::Consolidate {
            at: now,
            kind: decision.kind.as_str(),
            savings_per_hour: decision.savings_per_hour(),
        });
        if decision.plan.nodes.is_empty() {
            for n in removed {
                self.terminate(n, "underutilized");
            }
            return;
        }
        for &n in &removed {
            self.nodes[n].taints.push(disruption_taint());
            self.history.push(Record::Disrupt {
                at: now,
                node: n,
                why: "underutilized",
            });
        }
        let by_key: HashMap<String, usize> = removed
            .iter()
            .flat_map(|&n| self.nodes[n].pods.iter().copied())
            .map(|p| (self.pods[p].pod.key(), p))
            .collect();
        let launched = self.launch_planned(&decision.plan, &by_key);
        if launched.len() < decision.plan.nodes.len() {
            // A launch failed: abandon the move (what did launch is removed when empty).
            for &n in &removed {
                self.nodes[n].taints.retain(|t| *t != disruption_taint());
                self.history.push(Record::Undisrupt { at: now, node: n });
            }
            return;
        }
        let new: Vec<usize> = launched.iter().map(|(r, _)| *r).collect();
        for (r, requested) in launched {
            self.nodes[r].replaces = removed.first().copied();
            self.nodes[r].reserved = requested;
        }
        for &n in &removed {
            self.nodes[n].replacing = Some(("underutilized", new.clone()));
        }
    }

    /// Every live node as the planner sees it: a replacement's room counts as used by
    /// the pods it is for while the node it replaces lives.
    fn existing_nodes(&self) -> Vec<ExistingNode> {
        self.live_nodes
            .iter()
            .map(|&n| &self.nodes[n])
            .map(|n| ExistingNode {
                name: n.name.clone(),
                nodepool: Some(self.pools[n.pool].name.clone()),
                labels: n.labels.clone(),
                taints: n.taints.clone(),
                allocatable: n.allocatable.clone(),
                capacity: n.capacity.clone(),
                requested: if n.replaces.is_some_and(|old| self.nodes[old].alive()) {
                    n.used.elementwise_max(&n.reserved)
                } else {
                    n.used.clone()
                },
                in_flight: n.ready_at.is_none(),
            })
            .collect()
    }

    /// Launch a plan's new nodes; returns each launched node with what it was planned to
    /// hold. A capacity error marks the offering unavailable and asks for a re-plan.
    fn launch_planned(
        &mut self,
        plan: &planner::Plan,
        by_key: &HashMap<String, usize>,
    ) -> Vec<(usize, Resources)> {
        let now = self.now;
        let mut launched = Vec::new();
        for planned in &plan.nodes {
            let request = LaunchRequest {
                claim: format!("{}-{}", planned.nodepool, self.nodes.len() + 1),
                nodepool: planned.nodepool.clone(),
                offerings: vec![(
                    planned.instance_type.clone(),
                    planned.zone.clone(),
                    planned.capacity_type,
                )],
                ..Default::default()
            };
            match complete_now(self.cloud.create(&request)) {
                Ok(instance) => {
                    let before = self.nodes.len();
                    self.add_node(request.claim, instance);
                    if self.nodes.len() > before {
                        launched.push((before, planned.requested.clone()));
                    }
                }
                Err(CloudError::InsufficientCapacity { offerings }) => {
                    self.log.launch_failures += 1;
                    // Re-plan at once without the failed offerings.
                    self.changed = true;
                    for (t, z, c) in offerings {
                        self.unavailable.insert(
                            OfferingKey {
                                instance_type: t,
                                zone: z,
                                capacity_type: c,
                            },
                            now + UNAVAILABLE_FOR,
                        );
                    }
                    for key in &planned.pods {
                        if let Some(&p) = by_key.get(key) {
                            self.pods[p].reason = Some(format!(
                                "launch of {} {} {} failed: insufficient capacity; re-planning",
                                planned.instance_type, planned.zone, planned.capacity_type
                            ));
                        }
                    }
                }
                Err(e) => {
                    self.log.launch_failures += 1;
                    tracing::warn!(error = %e, "simulated launch failed");
                }
            }
        }
        launched
    }

    /// Plan and launch for these pods; says what came of it.
    fn provision(&mut self, pending: &[usize]) -> Provisioned {
        let now = self.now;
        self.unavailable.retain(|_, until| *until > now);
        let unavailable: BTreeSet<OfferingKey> = self.unavailable.keys().cloned().collect();
        let pods: Vec<PendingPod> = pending.iter().map(|&p| self.pods[p].pod.clone()).collect();
        let existing = self.existing_nodes();
        let gangs = Gang::of_pending(&pods);
        // The pods already bound: their anti-affinity, host ports and labels bind the
        // plan as they bind the scheduler.
        let running: Vec<crate::scheduling::PlacedPod> =
            if pods.iter().any(|p| p.constraints.is_some()) || self.constrained_alive > 0 {
                self.placed_pods()
            } else {
                Vec::new()
            };
        let input = PlanInput {
            pods: &pods,
            pools: &self.pools,
            catalog: &self.scenario.catalog,
            daemonsets: &self.daemonsets,
            gangs: &gangs,
            nodes: &existing,
            unavailable: &unavailable,
            running: &running,
        };
        let options = PlanOptions {
            strategy: self.strategy,
            time_limit: self.scenario.time_limit,
            relative_gap: 0.01,
            budget: crate::planner::Budget::Work,
            exact_search: true,
        };
        let plan = planner::plan(input, &options);
        self.log.plans += 1;
        self.log.plan_ms.push(plan.solve_ms);
        let by_key: HashMap<String, usize> = pending
            .iter()
            .map(|&p| (self.pods[p].pod.key(), p))
            .collect();
        for u in &plan.unschedulable {
            if let Some(&p) = by_key.get(&u.pod) {
                self.pods[p].reason = Some(u.reason.clone());
            }
        }
        let launched = self.launch_planned(&plan, &by_key);
        Provisioned {
            unplaced: plan.unschedulable.len(),
            launched,
            into_existing: plan
                .existing_nodes
                .iter()
                .filter(|p| !p.pods.is_empty())
                .map(|p| p.node.clone())
                .collect(),
        }
    }

    fn add_node(&mut self, name: String, instance: Instance) {
        let catalog = &self.scenario.catalog;
        let Some(pool) = self.pools.iter().position(|p| p.name == instance.nodepool) else {
            return;
        };
        let Some(t) = catalog.instance_type(&instance.instance_type) else {
            return;
        };
        let mut labels = t.labels.clone();
        labels.insert(keys::ZONE.into(), instance.zone.clone());
        labels.insert(keys::REGION.into(), catalog.region.clone());
        labels.insert(
            keys::CAPACITY_TYPE.into(),
            instance.capacity_type.as_str().into(),
        );
        labels.extend(self.pools[pool].labels.clone());
        labels.insert(keys::HOSTNAME.into(), name.clone());
        let taints = self.pools[pool].taints.clone();
        let overhead = planner::daemonset_overhead(&self.daemonsets, &labels, &taints);
        let kind = if t.allocatable.get(resources::NVIDIA_GPU) > 0 {
            "gpu"
        } else if t.allocatable.get(resources::NEURON) > 0 {
            "neuron"
        } else {
            "default"
        };
        let (lo, hi) = self.scenario.latency[kind];
        let latency = lo + (hi - lo).mul_f64(self.rng.unit());
        let n = self.nodes.len();
        self.nodes.push(SimNode {
            name,
            instance_id: instance.id,
            pool,
            instance_type: instance.instance_type.clone(),
            zone: instance.zone.clone(),
            capacity_type: instance.capacity_type,
            price: instance.price_per_hour,
            node_cost: self
                .scenario
                .catalog
                .node_charges(&self.pools[pool].billing)
                .total(),
            labels,
            taints,
            allocatable: t.allocatable.clone(),
            capacity: t.capacity.clone(),
            used: overhead.clone(),
            overhead,
            pods: BTreeSet::new(),
            launched_at: self.now,
            ready_at: None,
            terminated_at: None,
            end_reason: "end of simulation",
            empty_since: None,
            drifted: None,
            replacing: None,
            replaces: None,
            reserved: Resources::new(),
            attributed_until: self.now,
        });
        self.live_nodes.insert(self.nodes.len() - 1);
        self.last_node_change.insert(pool, self.now);
        self.log.launches += 1;
        self.history.push(Record::Launch {
            at: self.now,
            node: n,
        });
        self.push(self.now + latency, Event::NodeReady { node: n });
        if instance.capacity_type == CapacityType::Spot
            && self.scenario.cloud.spot_interruptions.advisor_rates
        {
            let monthly = match t.spec.spot.as_ref().map(|s| s.interruption.as_str()) {
                Some("<5%") => 0.025,
                Some("5-10%") => 0.075,
                Some("10-15%") => 0.125,
                Some("15-20%") => 0.175,
                Some(">20%") => 0.25,
                _ => 0.0,
            };
            let per_second =
                monthly * self.scenario.cloud.spot_interruptions.scale / (30.0 * 86_400.0);
            if per_second > 0.0 {
                let wait = -(1.0 - self.rng.unit()).ln() / per_second;
                if wait < self.scenario.duration.as_secs_f64() {
                    self.push(
                        self.now + Duration::from_secs_f64(wait),
                        Event::Interrupt { node: n },
                    );
                }
            }
        }
    }

    fn terminate(&mut self, n: usize, reason: &'static str) {
        self.attribute(n);
        self.close_empty(n);
        let id = self.nodes[n].instance_id.clone();
        if let Err(e) = complete_now(self.cloud.terminate(&id)) {
            tracing::warn!(error = %e, "simulated terminate failed");
        }
        let now = self.now;
        let pods: Vec<usize> = self.nodes[n].pods.iter().copied().collect();
        for p in pods {
            self.history.push(Record::Unbind {
                at: now,
                pod: p,
                node: n,
                why: reason,
            });
            self.nodes[n].pods.remove(&p);
            let pod = &mut self.pods[p];
            pod.node = None;
            if pod.alive {
                self.unbound.insert(p);
            }
            pod.pending_since = Some(now);
            self.log.pods_evicted += 1;
        }
        let node = &mut self.nodes[n];
        node.used = node.overhead.clone();
        node.terminated_at = Some(now);
        self.live_nodes.remove(&n);
        node.end_reason = reason;
        node.empty_since = None;
        self.history.push(Record::Terminate {
            at: now,
            node: n,
            why: reason,
        });
        self.last_node_change.insert(self.nodes[n].pool, now);
        self.consolidation_dirty = true;
        self.changed = true;
        self.schedule();
        // A replacement that went away abandons the replacement of its node.
        for old in self.replaced_by(n) {
            self.finish_replacement(old);
        }
    }

    // ---- accounting --------------------------------------------------------------

    /// Split the node's cost since the last change among its pods: each pod pays for its
    /// dominant share of the node (the largest of its CPU, memory, GPU and Neuron
    /// requests over the node's allocatable, scaled down if the shares add up to more
    /// than the whole node); what no pod requested is idle capacity, and a node with no
    /// pods (launching or empty) is all idle. Workload costs plus idle add up to the total.
    fn attribute(&mut self, n: usize) {
        let node = &self.nodes[n];
        let hours = self.now.saturating_sub(node.attributed_until).as_secs_f64() / 3600.0;
        if hours <= 0.0 {
            return;
        }
        let cost = hours * node.cost_per_hour();
        let share = |r: &Resources| {
            [
                resources::CPU,
                resources::MEMORY,
                resources::NVIDIA_GPU,
                resources::NEURON,
            ]
            .iter()
            .filter(|k| node.allocatable.get(k) > 0)
            .map(|k| r.get(k) as f64 / node.allocatable.get(k) as f64)
            .fold(0.0, f64::max)
        };
        let shares: Vec<(String, f64)> = node
            .pods
            .iter()
            .map(|&p| {
                (
                    self.pods[p].pod.workload.clone(),
                    share(&self.pods[p].pod.requests),
                )
            })
            .collect();
        let total: f64 = shares.iter().map(|(_, w)| w).sum();
        let scale = if total > 1.0 { 1.0 / total } else { 1.0 };
        let mut idle = cost;
        for (w, x) in shares {
            let c = cost * x * scale;
            idle -= c;
            *self.log.workload_cost.entry(w).or_default() += c;
        }
        self.log.idle_cost += idle.max(0.0);
        self.log.idle_node_hours += hours * (idle.max(0.0) / cost);
        self.nodes[n].attributed_until = self.now;
    }

    fn close_empty(&mut self, n: usize) {
        if let Some(since) = self.nodes[n].empty_since {
            self.log.empty_node_hours += self.now.saturating_sub(since).as_secs_f64() / 3600.0;
            self.nodes[n].empty_since = if self.nodes[n].pods.is_empty() {
                Some(self.now)
            } else {
                None
            };
        }
    }

    fn sample(&mut self) {
        let mut s = report::Sample {
            hours: self.now.as_secs_f64() / 3600.0,
            ..Default::default()
        };
        let (mut req, mut alloc) = (Resources::new(), Resources::new());
        for node in self.live_nodes.iter().map(|&n| &self.nodes[n]) {
            s.nodes += 1;
            s.cost_per_hour += node.cost_per_hour();
            *s.nodes_by_type
                .entry(node.instance_type.clone())
                .or_default() += 1;
            if node.ready() {
                req = req.plus(&node.used);
                alloc = alloc.plus(&node.allocatable);
            }
        }
        s.pending = self.unbound.len();
        // Bound pods are on their node's list (and leave it when deleted or evicted).
        s.running = self
            .live_nodes
            .iter()
            .map(|&n| self.nodes[n].pods.len())
            .sum();
        let ratio = |r: &str| (alloc.get(r) > 0).then(|| req.get(r) as f64 / alloc.get(r) as f64);
        s.cpu = ratio(resources::CPU);
        s.memory = ratio(resources::MEMORY);
        s.gpu = ratio(resources::NVIDIA_GPU);
        s.neuron = ratio(resources::NEURON);
        self.log.samples.push(s);
    }
}
