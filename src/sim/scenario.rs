//! The scenario file: what runs, when, and how the simulated cloud behaves.
//!
//! ```yaml
//! name: sentiment-inf1
//! duration: 24h
//! seed: 1
//! nodePoolsFile: ../config/nodepools.yaml   # or nodePools: [NodePool objects]; default: shipped pools
//! catalog: path/to/catalog.yaml              # default: embedded catalog
//! controller: {batchIdle: 1s, batchMax: 10s, strategy: optimal, timeLimit: 2s}
//! cloud:
//!   launchLatency: {default: {min: 45s, max: 90s}, gpu: {min: 150s, max: 300s}, neuron: {min: 120s, max: 240s}}
//!   spotInterruptions: {advisorRates: true, scale: 1.0, waves: [{at: 6h, fraction: 0.5, families: [g5]}]}
//!   insufficientCapacity: [{from: 2h, to: 4h, instanceTypes: [g5.xlarge], zones: [us-east-1a], capacityType: spot}]
//! drift:                            # changes that drift running nodes (replaced launch-first)
//! - {at: 3h, amiRelease: true}      # every node launched before drifts
//! - {at: 5h, nodePoolChange: gpu}   # that pool's nodes launched before drift
//! volumes:                          # PVs, PVCs, StorageClasses the pods' volumes use
//! - {apiVersion: v1, kind: PersistentVolumeClaim, metadata: {name: data}, spec: {volumeName: pv-1}}
//! workloads:
//! - manifest: {apiVersion: apps/v1, kind: Deployment, ...}   # or file: path (one object)
//!   replicas: [{at: 0s, replicas: 2}, {at: 6h, replicas: 5}]  # step schedule
//!   hpa: {minReplicas: 2, maxReplicas: 5, targetCPUUtilizationPercentage: 50,
//!         load: {shape: diurnal, minCores: 0.5, maxCores: 2.5, peakAt: 14h}}
//! - manifest: {apiVersion: batch/v1, kind: Job, ...}
//!   arrivals: {at: [0s, 2h]}        # or {every: 30m, count: 10, start: 1h}
//!   runFor: 45m                     # how long each pod runs once started
//! ```
//!
//! Durations are Go-style ("90s", "1h30m"). Paths are relative to the scenario file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::manifest::{self, Document, ManifestError};
use crate::nodepool::parse_duration;
use crate::planner::Strategy;

/// A scenario as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ScenarioSpec {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub region: Option<String>,
    pub duration: String,
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub node_pools_file: Option<String>,
    #[serde(default)]
    pub node_pools: Vec<serde_json::Value>,
    #[serde(default)]
    pub catalog: Option<String>,
    #[serde(default)]
    pub controller: ControllerSpec,
    #[serde(default)]
    pub cloud: CloudSpec,
    pub workloads: Vec<WorkloadSpec>,
    /// PersistentVolumes, PersistentVolumeClaims and StorageClasses the workloads'
    /// volumes refer to (where they let pods run).
    #[serde(default)]
    pub volumes: Vec<serde_json::Value>,
    /// Changes that drift running nodes: a new AMI release, a changed NodePool.
    #[serde(default)]
    pub drift: Vec<DriftSpec>,
}

/// One drift event in the timeline: exactly one of `amiRelease` and `nodePoolChange`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DriftSpec {
    pub at: String,
    /// A new AMI is released: every node launched before drifts.
    #[serde(default)]
    pub ami_release: bool,
    /// This NodePool's template changes: its nodes launched before drift.
    #[serde(default)]
    pub node_pool_change: Option<String>,
}

/// What drifts, validated.
#[derive(Debug, Clone, PartialEq)]
pub enum DriftEvent {
    AmiRelease,
    NodePoolChange(String),
}

/// Controller settings the simulation runs with.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ControllerSpec {
    #[serde(default)]
    pub batch_idle: Option<String>,
    #[serde(default)]
    pub batch_max: Option<String>,
    #[serde(default)]
    pub strategy: Option<Strategy>,
    #[serde(default)]
    pub time_limit: Option<String>,
}

/// A uniform range of durations.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RangeSpec {
    pub min: String,
    pub max: String,
}

/// Launch-to-ready latency by node kind (device-plugin readiness included).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LatencySpec {
    #[serde(default)]
    pub default: Option<RangeSpec>,
    #[serde(default)]
    pub gpu: Option<RangeSpec>,
    #[serde(default)]
    pub neuron: Option<RangeSpec>,
}

/// A scripted wave of spot interruptions.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WaveSpec {
    pub at: String,
    /// Share of the matching spot nodes interrupted, 0..=1.
    pub fraction: f64,
    #[serde(default)]
    pub families: Vec<String>,
    #[serde(default)]
    pub zones: Vec<String>,
}

/// Spot interruption behaviour.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SpotSpec {
    /// Interrupt spot nodes at random at the rate of their Spot Advisor bucket.
    #[serde(default = "yes")]
    pub advisor_rates: bool,
    /// Multiply those rates (e.g. 10 to stress-test).
    #[serde(default = "one")]
    pub scale: f64,
    #[serde(default)]
    pub waves: Vec<WaveSpec>,
}

fn yes() -> bool {
    true
}
fn one() -> f64 {
    1.0
}

impl Default for SpotSpec {
    fn default() -> Self {
        SpotSpec {
            advisor_rates: true,
            scale: 1.0,
            waves: Vec::new(),
        }
    }
}

/// A window in which some offerings have no capacity.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CapacityWindowSpec {
    pub from: String,
    pub to: String,
    #[serde(default)]
    pub instance_types: Vec<String>,
    #[serde(default)]
    pub families: Vec<String>,
    #[serde(default)]
    pub zones: Vec<String>,
    #[serde(default)]
    pub capacity_type: Option<crate::catalog::CapacityType>,
}

/// The simulated cloud.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CloudSpec {
    #[serde(default)]
    pub launch_latency: LatencySpec,
    #[serde(default)]
    pub spot_interruptions: SpotSpec,
    #[serde(default)]
    pub insufficient_capacity: Vec<CapacityWindowSpec>,
}

/// One step of a replica schedule.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StepSpec {
    pub at: String,
    pub replicas: u32,
}

/// A load curve in CPU cores of demand.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadSpec {
    pub shape: LoadShape,
    #[serde(default)]
    pub cores: Option<f64>,
    #[serde(default)]
    pub min_cores: Option<f64>,
    #[serde(default)]
    pub max_cores: Option<f64>,
    #[serde(default)]
    pub peak_at: Option<String>,
    #[serde(default)]
    pub spikes: Vec<SpikeSpec>,
}

/// The form of a load curve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LoadShape {
    Constant,
    Diurnal,
    Spikes,
}

/// A burst of extra load.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SpikeSpec {
    pub at: String,
    pub duration: String,
    pub cores: f64,
}

/// HPA-style scaling on CPU utilisation.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HpaSpec {
    pub min_replicas: u32,
    pub max_replicas: u32,
    #[serde(rename = "targetCPUUtilizationPercentage")]
    pub target_cpu_utilization_percentage: u32,
    pub load: LoadSpec,
}

/// When Jobs arrive.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ArrivalSpec {
    #[serde(default)]
    pub at: Vec<String>,
    #[serde(default)]
    pub every: Option<String>,
    #[serde(default)]
    pub count: Option<u32>,
    #[serde(default)]
    pub start: Option<String>,
}

/// A workload: a manifest and its timeline.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSpec {
    #[serde(default)]
    pub manifest: Option<serde_json::Value>,
    #[serde(default)]
    pub file: Option<String>,
    #[serde(default)]
    pub replicas: Vec<StepSpec>,
    #[serde(default)]
    pub hpa: Option<HpaSpec>,
    #[serde(default)]
    pub arrivals: Option<ArrivalSpec>,
    #[serde(default)]
    pub run_for: Option<String>,
}

/// A load curve, validated.
#[derive(Debug, Clone, PartialEq)]
pub enum Load {
    Constant(f64),
    /// Sinusoid between min and max cores, peaking at `peak` each day.
    Diurnal {
        min: f64,
        max: f64,
        peak: Duration,
    },
    /// A base plus bursts.
    Spikes {
        base: f64,
        spikes: Vec<(Duration, Duration, f64)>,
    },
}

impl Load {
    /// Demand in cores at `t`.
    pub fn at(&self, t: Duration) -> f64 {
        match self {
            Load::Constant(c) => *c,
            Load::Diurnal { min, max, peak } => {
                let day = 86_400.0;
                let phase = (t.as_secs_f64() - peak.as_secs_f64()) / day * std::f64::consts::TAU;
                min + (max - min) * (1.0 + phase.cos()) / 2.0
            }
            Load::Spikes { base, spikes } => {
                base + spikes
                    .iter()
                    .filter(|(at, d, _)| t >= *at && t < *at + *d)
                    .map(|(_, _, c)| c)
                    .sum::<f64>()
            }
        }
    }
}

/// How a workload's pod count evolves.
#[derive(Debug, Clone, PartialEq)]
pub enum Timeline {
    /// The manifest's replicas, constant.
    Fixed,
    /// Replica steps (time, replicas), sorted.
    Steps(Vec<(Duration, u32)>),
    Hpa {
        min: u32,
        max: u32,
        target: f64,
        load: Load,
    },
    /// Job arrivals and how long each pod runs.
    Arrivals {
        times: Vec<Duration>,
        run_for: Option<Duration>,
    },
}

/// A workload, validated: its manifest document and timeline.
#[derive(Debug, Clone)]
pub struct Workload {
    pub document: Document,
    pub timeline: Timeline,
}

/// The most the Spot Advisor interruption rates may be multiplied by: at this scale the
/// worst bucket (>20 % a month) interrupts a node every few hours; beyond it every spot
/// node would be interrupted within seconds of booting, forever (1e9 ran for minutes).
pub const MAX_INTERRUPTION_SCALE: f64 = 1_000.0;

/// The longest scenario cooper simulates (a year and a day).
pub const MAX_DURATION: Duration = Duration::from_secs(366 * 86_400);
/// The most job arrivals a scenario may have, all workloads together (`arrivals:
/// {every: 1ms}` over a day would be 86 million, each a pod to simulate; a million take
/// about 13 s and 1 GiB).
pub const MAX_ARRIVALS: usize = 2_000_000;

/// A scenario, validated.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub name: String,
    pub description: String,
    pub file: PathBuf,
    pub duration: Duration,
    pub seed: u64,
    pub pools: Vec<crate::nodepool::NodePool>,
    pub catalog: crate::catalog::Catalog,
    pub batch: crate::provisioning::BatchSettings,
    pub strategy: Strategy,
    pub time_limit: Duration,
    pub cloud: CloudSpec,
    /// Parsed cloud timings.
    pub latency: BTreeMap<&'static str, (Duration, Duration)>,
    pub waves: Vec<(Duration, f64, Vec<String>, Vec<String>)>,
    pub capacity_windows: Vec<(Duration, Duration, CapacityWindowSpec)>,
    /// Drift events in time order of the file.
    pub drift: Vec<(Duration, DriftEvent)>,
    pub workloads: Vec<Workload>,
    /// Where the workloads' volumes let their pods run.
    pub volumes: crate::scheduling::Volumes,
}

/// Load and validate a scenario file.
pub fn load(path: &Path) -> Result<Scenario, ManifestError> {
    let docs = manifest::read_documents(path)?;
    let [doc] = docs.as_slice() else {
        return Err(ManifestError::Object {
            file: path.to_path_buf(),
            line: 1,
            object: "scenario".into(),
            message: format!("expected one YAML document, found {}", docs.len()),
        });
    };
    let spec: ScenarioSpec = doc.decode()?;
    let base = path.parent().unwrap_or(Path::new("."));
    let err = |field: &str, message: String| doc.field_error(field, message);
    let dur = |field: &str, s: &str| parse_duration(s).map_err(|m| err(field, m));

    let duration = dur("duration", &spec.duration)?;
    if duration.is_zero() {
        return Err(err("duration", "must be positive".into()));
    }
    if duration > MAX_DURATION {
        return Err(err(
            "duration",
            format!(
                "{} is longer than cooper simulates ({} days)",
                spec.duration,
                MAX_DURATION.as_secs() / 86_400
            ),
        ));
    }
    // An event time within the scenario; one after its end would silently never happen.
    let at = |field: &str, s: &str| -> Result<Duration, ManifestError> {
        let t = dur(field, s)?;
        if t > duration {
            return Err(err(
                field,
                format!(
                    "{s} is after the scenario's end ({}): the event would never happen",
                    spec.duration
                ),
            ));
        }
        Ok(t)
    };
    let catalog = match &spec.catalog {
        Some(p) => crate::catalog::Catalog::load(&base.join(p))?,
        None => crate::catalog::Catalog::embedded()?,
    };
    if let Some(r) = &spec.region
        && *r != catalog.region
    {
        return Err(err(
            "region",
            format!("the catalog covers {}, not {r}", catalog.region),
        ));
    }
    let pools = if !spec.node_pools.is_empty() {
        if spec.node_pools_file.is_some() {
            return Err(err(
                "nodePools",
                "give nodePools or nodePoolsFile, not both".into(),
            ));
        }
        let pool_docs: Vec<Document> = spec
            .node_pools
            .iter()
            .map(|v| Document {
                file: doc.file.clone(),
                line: doc.line,
                value: v.clone(),
            })
            .collect();
        crate::nodepool::from_documents(&pool_docs)?
    } else if let Some(p) = &spec.node_pools_file {
        crate::nodepool::load(&base.join(p))?
    } else {
        crate::nodepool::defaults()?
    };

    let mut batch = crate::provisioning::BatchSettings::default();
    if let Some(s) = &spec.controller.batch_idle {
        batch.idle = dur("controller.batchIdle", s)?;
    }
    if let Some(s) = &spec.controller.batch_max {
        batch.max = dur("controller.batchMax", s)?;
    }
    let time_limit = match &spec.controller.time_limit {
        Some(s) => dur("controller.timeLimit", s)?,
        None => Duration::from_secs(2),
    };

    let mut latency = BTreeMap::new();
    let defaults = [("default", 45, 90), ("gpu", 150, 300), ("neuron", 120, 240)];
    let given = [
        ("default", &spec.cloud.launch_latency.default),
        ("gpu", &spec.cloud.launch_latency.gpu),
        ("neuron", &spec.cloud.launch_latency.neuron),
    ];
    for ((kind, lo, hi), (_, g)) in defaults.iter().zip(given.iter()) {
        let range = match g {
            Some(r) => {
                let field = format!("cloud.launchLatency.{kind}");
                let (a, b) = (
                    dur(&format!("{field}.min"), &r.min)?,
                    dur(&format!("{field}.max"), &r.max)?,
                );
                if a > b {
                    return Err(err(&field, "min is greater than max".into()));
                }
                (a, b)
            }
            None => (Duration::from_secs(*lo), Duration::from_secs(*hi)),
        };
        latency.insert(*kind, range);
    }
    let scale = spec.cloud.spot_interruptions.scale;
    if !(scale.is_finite() && (0.0..=MAX_INTERRUPTION_SCALE).contains(&scale)) {
        return Err(err(
            "cloud.spotInterruptions.scale",
            format!("{scale} is outside 0..{MAX_INTERRUPTION_SCALE}"),
        ));
    }
    let mut waves = Vec::new();
    for (i, w) in spec.cloud.spot_interruptions.waves.iter().enumerate() {
        let field = format!("cloud.spotInterruptions.waves[{i}]");
        if !(0.0..=1.0).contains(&w.fraction) {
            return Err(err(
                &format!("{field}.fraction"),
                format!("{} is outside 0..1", w.fraction),
            ));
        }
        check_families(&catalog, &w.families).map_err(|m| err(&format!("{field}.families"), m))?;
        waves.push((
            at(&format!("{field}.at"), &w.at)?,
            w.fraction,
            w.families.clone(),
            w.zones.clone(),
        ));
    }
    let mut drift = Vec::new();
    for (i, d) in spec.drift.iter().enumerate() {
        let field = format!("drift[{i}]");
        let when = at(&format!("{field}.at"), &d.at)?;
        let event = match (d.ami_release, &d.node_pool_change) {
            (true, None) => DriftEvent::AmiRelease,
            (false, Some(pool)) => {
                if !pools.iter().any(|p| &p.name == pool) {
                    return Err(err(
                        &format!("{field}.nodePoolChange"),
                        format!("no NodePool named {pool:?} in the scenario"),
                    ));
                }
                DriftEvent::NodePoolChange(pool.clone())
            }
            _ => {
                return Err(err(
                    &field,
                    "give exactly one of amiRelease: true and nodePoolChange: <pool>".into(),
                ));
            }
        };
        drift.push((when, event));
    }
    let mut capacity_windows = Vec::new();
    for (i, w) in spec.cloud.insufficient_capacity.iter().enumerate() {
        let field = format!("cloud.insufficientCapacity[{i}]");
        let (from, to) = (
            at(&format!("{field}.from"), &w.from)?,
            dur(&format!("{field}.to"), &w.to)?,
        );
        if from > to {
            return Err(err(&field, "from is after to".into()));
        }
        for t in &w.instance_types {
            if catalog.instance_type(t).is_none() {
                return Err(err(
                    &format!("{field}.instanceTypes"),
                    format!("unknown instance type {t:?}"),
                ));
            }
        }
        check_families(&catalog, &w.families).map_err(|m| err(&format!("{field}.families"), m))?;
        capacity_windows.push((from, to, w.clone()));
    }

    let mut workloads = Vec::new();
    // Job arrivals over every workload so far (bounded by MAX_ARRIVALS together).
    let mut total_arrivals = 0usize;
    for (i, w) in spec.workloads.iter().enumerate() {
        let field = |f: &str| format!("workloads[{i}].{f}");
        let document = match (&w.manifest, &w.file) {
            (Some(m), None) => Document {
                file: doc.file.clone(),
                line: doc.line,
                value: m.clone(),
            },
            (None, Some(f)) => {
                let mut docs = manifest::read_documents(&base.join(f))?;
                if docs.len() != 1 {
                    return Err(err(
                        &field("file"),
                        format!("{f} holds {} objects; a workload is one object", docs.len()),
                    ));
                }
                docs.remove(0)
            }
            _ => {
                return Err(err(
                    &format!("workloads[{i}]"),
                    "give exactly one of manifest or file".into(),
                ));
            }
        };
        let kind = document.kind().to_string();
        if !matches!(
            kind.as_str(),
            "Deployment" | "StatefulSet" | "ReplicaSet" | "Job" | "Pod" | "DaemonSet"
        ) {
            return Err(err(
                &field("manifest.kind"),
                format!("unsupported kind {kind:?}"),
            ));
        }
        let timelines = [
            !w.replicas.is_empty(),
            w.hpa.is_some(),
            w.arrivals.is_some(),
        ];
        if timelines.iter().filter(|t| **t).count() > 1 {
            return Err(err(
                &format!("workloads[{i}]"),
                "give at most one of replicas, hpa, arrivals".into(),
            ));
        }
        let timeline = if !w.replicas.is_empty() {
            let mut steps = Vec::new();
            for (j, s) in w.replicas.iter().enumerate() {
                if i64::from(s.replicas) > crate::workload::MAX_REPLICAS {
                    return Err(err(
                        &field(&format!("replicas[{j}].replicas")),
                        format!(
                            "{} pods: cooper plans at most {} pods per workload",
                            s.replicas,
                            crate::workload::MAX_REPLICAS
                        ),
                    ));
                }
                steps.push((at(&field(&format!("replicas[{j}].at")), &s.at)?, s.replicas));
            }
            steps.sort_by_key(|s| s.0);
            Timeline::Steps(steps)
        } else if let Some(h) = &w.hpa {
            if i64::from(h.max_replicas) > crate::workload::MAX_REPLICAS {
                return Err(err(
                    &field("hpa.maxReplicas"),
                    format!(
                        "{} pods: cooper plans at most {} pods per workload",
                        h.max_replicas,
                        crate::workload::MAX_REPLICAS
                    ),
                ));
            }
            if h.min_replicas > h.max_replicas || h.max_replicas == 0 {
                return Err(err(
                    &field("hpa"),
                    "need 0 < maxReplicas and minReplicas <= maxReplicas".into(),
                ));
            }
            if h.target_cpu_utilization_percentage == 0 {
                return Err(err(
                    &field("hpa.targetCPUUtilizationPercentage"),
                    "must be positive".into(),
                ));
            }
            let l = &h.load;
            let need = |v: Option<f64>, f: &str| -> Result<f64, ManifestError> {
                match v {
                    Some(x) if x >= 0.0 => Ok(x),
                    Some(x) => Err(err(
                        &field(&format!("hpa.load.{f}")),
                        format!("{x} is negative"),
                    )),
                    None => Err(err(
                        &field(&format!("hpa.load.{f}")),
                        format!("required for shape {:?}", l.shape),
                    )),
                }
            };
            let load = match l.shape {
                LoadShape::Constant => Load::Constant(need(l.cores, "cores")?),
                LoadShape::Diurnal => Load::Diurnal {
                    min: need(l.min_cores, "minCores")?,
                    max: need(l.max_cores, "maxCores")?,
                    peak: dur(
                        &field("hpa.load.peakAt"),
                        l.peak_at.as_deref().unwrap_or("14h"),
                    )?,
                },
                LoadShape::Spikes => {
                    let mut spikes = Vec::new();
                    for (j, s) in l.spikes.iter().enumerate() {
                        spikes.push((
                            at(&field(&format!("hpa.load.spikes[{j}].at")), &s.at)?,
                            dur(
                                &field(&format!("hpa.load.spikes[{j}].duration")),
                                &s.duration,
                            )?,
                            s.cores,
                        ));
                    }
                    Load::Spikes {
                        base: l.cores.unwrap_or(0.0),
                        spikes,
                    }
                }
            };
            Timeline::Hpa {
                min: h.min_replicas,
                max: h.max_replicas,
                target: h.target_cpu_utilization_percentage as f64 / 100.0,
                load,
            }
        } else if let Some(a) = &w.arrivals {
            let mut times = Vec::new();
            for (j, t) in a.at.iter().enumerate() {
                times.push(at(&field(&format!("arrivals.at[{j}]")), t)?);
            }
            if let Some(every) = &a.every {
                let every = dur(&field("arrivals.every"), every)?;
                if every.is_zero() {
                    return Err(err(&field("arrivals.every"), "must be positive".into()));
                }
                let start = match &a.start {
                    Some(s) => at(&field("arrivals.start"), s)?,
                    None => Duration::ZERO,
                };
                let count = a.count.unwrap_or(u32::MAX);
                // How many arrivals that makes, before any is built.
                let span = duration.saturating_sub(start).as_secs_f64();
                let would = ((span / every.as_secs_f64()).ceil() as u64).min(u64::from(count));
                if would as usize + times.len() + total_arrivals > MAX_ARRIVALS {
                    return Err(err(
                        &field("arrivals"),
                        format!(
                            "{would} arrivals (every {every:?} for {}): cooper simulates at most {MAX_ARRIVALS} per scenario, all workloads together",
                            spec.duration
                        ),
                    ));
                }
                let mut t = start;
                let mut n = 0;
                while t < duration && n < count {
                    times.push(t);
                    t += every;
                    n += 1;
                }
            }
            times.sort();
            total_arrivals += times.len();
            let run_for = match &w.run_for {
                Some(s) => Some(dur(&field("runFor"), s)?),
                None => None,
            };
            Timeline::Arrivals { times, run_for }
        } else {
            Timeline::Fixed
        };
        if kind == "Job" && !matches!(timeline, Timeline::Arrivals { .. }) {
            // A Job without arrivals arrives once at the start.
            let run_for = match &w.run_for {
                Some(s) => Some(dur(&field("runFor"), s)?),
                None => None,
            };
            workloads.push(Workload {
                document,
                timeline: Timeline::Arrivals {
                    times: vec![Duration::ZERO],
                    run_for,
                },
            });
            continue;
        }
        workloads.push(Workload { document, timeline });
    }

    let mut volumes = crate::scheduling::Volumes::default();
    for (i, v) in spec.volumes.iter().enumerate() {
        let kind = v.get("kind").and_then(|k| k.as_str()).unwrap_or("");
        if !matches!(
            kind,
            "PersistentVolume" | "PersistentVolumeClaim" | "StorageClass"
        ) {
            return Err(err(
                &format!("volumes[{i}].kind"),
                format!(
                    "{kind:?}: expected PersistentVolume, PersistentVolumeClaim or StorageClass"
                ),
            ));
        }
        volumes.add(kind, v).map_err(|(field, message)| {
            let field = if field.is_empty() {
                format!("volumes[{i}]")
            } else {
                format!("volumes[{i}].{field}")
            };
            err(&field, message)
        })?;
    }

    Ok(Scenario {
        name: spec.name.clone().unwrap_or_else(|| {
            path.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default()
        }),
        description: spec.description.clone().unwrap_or_default(),
        file: path.to_path_buf(),
        duration,
        seed: spec.seed,
        pools,
        catalog,
        batch,
        strategy: spec.controller.strategy.unwrap_or(Strategy::Optimal),
        time_limit,
        cloud: spec.cloud.clone(),
        latency,
        waves,
        capacity_windows,
        drift,
        workloads,
        volumes,
    })
}

fn check_families(catalog: &crate::catalog::Catalog, families: &[String]) -> Result<(), String> {
    for f in families {
        if !catalog.types.iter().any(|t| &t.family == f) {
            return Err(format!("unknown instance family {f:?}"));
        }
    }
    Ok(())
}
