//! NodePools: which nodes cooper may launch for which pods, with Karpenter v1
//! semantics where they exist (requirements, template labels and taints, startup
//! taints, limits, weight, disruption).
//!
//! The file format is the `cooper.dev/v1alpha1` `NodePool` object; the same spec is
//! served as a CRD by the controller. Unknown fields and operators are errors.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::labels::{Labels, Operator, Requirement, Taint, is_well_known, keys};
use crate::manifest::{self, Document, ManifestError};
use crate::resources::{self, Resources};

/// The shipped default pools (`config/nodepools.yaml`).
pub const DEFAULT_NODEPOOLS_YAML: &str = include_str!("../config/nodepools.yaml");

/// API group/version of cooper's objects.
pub const API_VERSION: &str = "cooper.dev/v1alpha1";

/// A requirement as written (`key`, `operator`, `values`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequirementSpec {
    pub key: String,
    pub operator: Operator,
    #[serde(default)]
    pub values: Vec<String>,
    /// Accepted for Karpenter compatibility: the least number of distinct values a
    /// launch must be able to choose from (used for instance-type flexibility).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_values: Option<u32>,
}

/// Labels and annotations for launched nodes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TemplateMetadata {
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// Reference to the NodeClass that says how to launch on AWS.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeClassRef {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
}

/// The node part of the template.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeTemplateSpec {
    #[serde(default)]
    pub requirements: Vec<RequirementSpec>,
    #[serde(default)]
    pub taints: Vec<Taint>,
    /// Taints present at boot that a daemon removes once the node is ready; pods need
    /// not tolerate them.
    #[serde(default)]
    pub startup_taints: Vec<Taint>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_class_ref: Option<NodeClassRef>,
    /// How long a node lives before it is replaced (the replacement launched first when
    /// its pods need somewhere to go, then the old node drained): a duration ("720h",
    /// Karpenter's default) or "Never". Budgeted under the `Expired` reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expire_after: Option<String>,
    /// The longest a node's drain may take once its deletion has begun: pods a
    /// PodDisruptionBudget or `do-not-disrupt` holds are deleted (with their own grace
    /// period) so that they are gone when it ends, then the instance is terminated.
    /// Unset, a drain waits for them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub termination_grace_period: Option<String>,
}

/// The template for launched nodes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeTemplate {
    #[serde(default)]
    pub metadata: TemplateMetadata,
    #[serde(default)]
    pub spec: NodeTemplateSpec,
}

/// When a node may be removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ConsolidationPolicy {
    WhenEmpty,
    WhenEmptyOrUnderutilized,
}

/// Why a node is disrupted voluntarily (what a budget's `reasons` name).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
pub enum DisruptionReason {
    /// Running nothing but DaemonSet and mirror pods past `consolidateAfter`.
    Empty,
    /// Its pods fit elsewhere or on cheaper nodes (consolidation).
    Underutilized,
    /// Launched from a template or NodeClass that has changed since.
    Drifted,
    /// Older than the pool's `expireAfter`.
    Expired,
}

impl DisruptionReason {
    /// The reason as Karpenter and cooper's conditions spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            DisruptionReason::Empty => "Empty",
            DisruptionReason::Underutilized => "Underutilized",
            DisruptionReason::Drifted => "Drifted",
            DisruptionReason::Expired => "Expired",
        }
    }
}

/// A disruption budget: at most this many (or this percentage of) the pool's nodes
/// may be disrupted at once — for the `reasons` listed (all when none are), and, with a
/// `schedule`, only during the `duration` after each time it fires.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BudgetSpec {
    /// A count ("3") or a percentage of the pool's nodes ("10%"); "0" stops disruption.
    pub nodes: String,
    /// The reasons the budget limits; empty, every reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<DisruptionReason>,
    /// A cron schedule (UTC) at which the budget's window opens, e.g. "0 9 * * mon-fri".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// How long the window stays open after each firing, e.g. "8h" (with `schedule`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<String>,
}

/// A validated budget.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolBudget {
    pub nodes: Budget,
    /// Reasons it limits; empty, every reason.
    pub reasons: Vec<DisruptionReason>,
    /// When it is in force; None, always.
    pub window: Option<(crate::cron::Schedule, Duration)>,
}

impl PoolBudget {
    /// Does this budget limit `reason` at `wall` (time since the Unix epoch)?
    pub fn applies(&self, reason: DisruptionReason, wall: Duration) -> bool {
        (self.reasons.is_empty() || self.reasons.contains(&reason))
            && self
                .window
                .as_ref()
                .is_none_or(|(schedule, duration)| schedule.active(*duration, wall))
    }
}

/// Disruption settings (Karpenter v1 `spec.disruption`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DisruptionSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consolidation_policy: Option<ConsolidationPolicy>,
    /// How long a node must stay empty before it is removed: a duration ("30s") or "Never".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consolidate_after: Option<String>,
    #[serde(default)]
    pub budgets: Vec<BudgetSpec>,
}

/// The NodePool spec: the file format and the `NodePool` custom resource
/// (`cooper.dev/v1alpha1`, cluster-scoped) share it, so a pool validated by `cooper plan`
/// is the one the controller serves.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema, CustomResource)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[kube(
    group = "cooper.dev",
    version = "v1alpha1",
    kind = "NodePool",
    root = "NodePoolResource",
    status = "crate::crd::NodePoolStatus",
    shortname = "cnp",
    printcolumn = r#"{"name":"Weight","type":"integer","jsonPath":".spec.weight"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
pub struct NodePoolSpec {
    /// Higher weight pools are tried first (0-100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub weight: Option<i32>,
    #[serde(default)]
    pub template: NodeTemplate,
    /// Caps on the total capacity of the pool's nodes, e.g. `cpu: "16"`.
    #[serde(default)]
    pub limits: BTreeMap<String, String>,
    #[serde(default)]
    pub disruption: DisruptionSpec,
    /// Karpenter v1alpha5's spelling of "remove a node this long after it became empty".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds_after_empty: Option<u64>,
}

impl NodePoolSpec {
    /// Fields that are accepted (for Karpenter compatibility) but not acted on yet, as
    /// (field path, what happens instead): the controller puts them on the NodePool's
    /// `SpecHonoured` condition and the file loader warns, so nothing is ignored silently.
    pub fn not_honoured(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (i, r) in self.template.spec.requirements.iter().enumerate() {
            if r.min_values.is_some() {
                out.push((
                    format!("spec.template.spec.requirements[{i}].minValues"),
                    "accepted, not enforced: plans may use fewer distinct values".to_string(),
                ));
            }
        }
        out
    }
}

/// Object metadata (the part cooper reads).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    pub name: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// A NodePool object as written in a file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodePoolObject {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: NodePoolSpec,
}

/// A validated NodePool, ready for the planner.
#[derive(Debug, Clone, PartialEq)]
pub struct NodePool {
    pub name: String,
    pub weight: i32,
    pub requirements: Vec<Requirement>,
    /// Labels every node of the pool carries (template labels, single-valued `In`
    /// requirements on custom keys, and `cooper.dev/nodepool`).
    pub labels: Labels,
    pub taints: Vec<Taint>,
    pub startup_taints: Vec<Taint>,
    /// Caps on total node capacity; absent resources are unlimited.
    pub limits: Resources,
    /// Resources limited to zero (`limits: {cpu: "0"}`): the pool launches no node that
    /// has any, which is how Karpenter users freeze a pool. (`limits` cannot hold a zero.)
    pub zero_limits: std::collections::BTreeSet<String>,
    /// Remove a node this long after it became empty; None means never.
    pub empty_ttl: Option<Duration>,
    pub consolidation_policy: ConsolidationPolicy,
    /// The pool's budgets (Karpenter's default, `nodes: 10%`, when none are written).
    pub budgets: Vec<PoolBudget>,
    /// Replace nodes older than this; None means never.
    pub expire_after: Option<Duration>,
    /// The longest a drain may take; None, it waits for every pod.
    pub termination_grace_period: Option<Duration>,
    pub node_class: Option<String>,
    /// Instance types the pool's NodeClass cannot launch (no image for their
    /// architecture and accelerator), filled in by the controller from the NodeClass's
    /// resolved AMIs; the planner never picks them.
    pub unlaunchable: std::collections::BTreeSet<String>,
    /// What each node is billed besides its instance (volumes, public address, the
    /// user's per-node cost), from the pool's NodeClass when it is known (the
    /// controller, or NodeClass documents beside the pools), else the AL2023 default.
    pub billing: crate::catalog::NodeBilling,
}

impl NodePool {
    /// Validate a spec. Errors are (field path, message).
    pub fn from_spec(name: &str, spec: &NodePoolSpec) -> Result<NodePool, (String, String)> {
        if name.is_empty() {
            return Err(("metadata.name".into(), "must not be empty".into()));
        }
        let weight = spec.weight.unwrap_or(0);
        if !(0..=100).contains(&weight) {
            return Err(("spec.weight".into(), format!("{weight} is outside 0..=100")));
        }
        let mut requirements = Vec::new();
        let mut labels: Labels = spec.template.metadata.labels.clone();
        for (i, r) in spec.template.spec.requirements.iter().enumerate() {
            let req = Requirement::new(&r.key, r.operator, r.values.clone()).map_err(|m| {
                (
                    format!("spec.template.spec.requirements[{i}]"),
                    format!("{}: {m}", r.key),
                )
            })?;
            if req.operator == Operator::In && req.values.len() == 1 && !is_well_known(&req.key) {
                labels.insert(req.key.clone(), req.values[0].clone());
            }
            requirements.push(req);
        }
        labels.insert(keys::NODEPOOL.into(), name.to_string());
        let mut limits = Resources::new();
        let mut zero_limits = std::collections::BTreeSet::new();
        for (k, v) in &spec.limits {
            let amount = resources::parse_resource(k, v)
                .map_err(|e| (format!("spec.limits.{k}"), e.to_string()))?;
            if amount == 0 {
                zero_limits.insert(k.clone());
            }
            limits.set(k.clone(), amount);
        }
        let ttl_from_v1 = match spec.disruption.consolidate_after.as_deref() {
            None => None,
            Some("Never") => Some(None),
            Some(s) => {
                Some(Some(parse_duration(s).map_err(|m| {
                    ("spec.disruption.consolidateAfter".to_string(), m)
                })?))
            }
        };
        let ttl_from_v1alpha5 = spec.ttl_seconds_after_empty.map(Duration::from_secs);
        if ttl_from_v1alpha5.is_some_and(|t| t > MAX_DURATION) {
            return Err((
                "spec.ttlSecondsAfterEmpty".into(),
                format!(
                    "{} seconds is longer than 100 years, the most cooper accepts",
                    spec.ttl_seconds_after_empty.unwrap_or_default()
                ),
            ));
        }
        let empty_ttl = match (ttl_from_v1, ttl_from_v1alpha5) {
            (Some(a), Some(b)) if a != Some(b) => {
                return Err((
                    "spec.ttlSecondsAfterEmpty".into(),
                    "conflicts with spec.disruption.consolidateAfter; set one".into(),
                ));
            }
            (Some(a), _) => a,
            (None, Some(b)) => Some(b),
            // Karpenter v1's default consolidateAfter is 0s.
            (None, None) => Some(Duration::ZERO),
        };
        let mut budgets = Vec::new();
        for (i, b) in spec.disruption.budgets.iter().enumerate() {
            let at = |field: &str| format!("spec.disruption.budgets[{i}].{field}");
            let nodes = parse_budget(&b.nodes).map_err(|m| (at("nodes"), m))?;
            let window = match (&b.schedule, &b.duration) {
                (None, None) => None,
                (Some(schedule), Some(duration)) => {
                    let schedule =
                        crate::cron::Schedule::parse(schedule).map_err(|m| (at("schedule"), m))?;
                    let duration = parse_duration(duration).map_err(|m| (at("duration"), m))?;
                    if duration.is_zero() {
                        return Err((at("duration"), "a window of 0s is never open".into()));
                    }
                    Some((schedule, duration))
                }
                (Some(_), None) => {
                    return Err((at("duration"), "required with a schedule".into()));
                }
                (None, Some(_)) => {
                    return Err((at("schedule"), "required with a duration".into()));
                }
            };
            budgets.push(PoolBudget {
                nodes,
                reasons: b.reasons.clone(),
                window,
            });
        }
        if budgets.is_empty() {
            budgets.push(PoolBudget {
                nodes: crate::disruption::DEFAULT_BUDGET,
                reasons: Vec::new(),
                window: None,
            });
        }
        let expire_after = match spec.template.spec.expire_after.as_deref() {
            Some("Never") => None,
            Some(s) => Some(
                parse_duration(s).map_err(|m| ("spec.template.spec.expireAfter".to_string(), m))?,
            ),
            None => Some(DEFAULT_EXPIRE_AFTER),
        };
        let termination_grace_period = spec
            .template
            .spec
            .termination_grace_period
            .as_deref()
            .map(parse_duration)
            .transpose()
            .map_err(|m| ("spec.template.spec.terminationGracePeriod".to_string(), m))?;
        Ok(NodePool {
            name: name.to_string(),
            weight,
            requirements,
            labels,
            taints: spec.template.spec.taints.clone(),
            startup_taints: spec.template.spec.startup_taints.clone(),
            limits,
            zero_limits,
            empty_ttl,
            consolidation_policy: spec
                .disruption
                .consolidation_policy
                .unwrap_or(ConsolidationPolicy::WhenEmpty),
            budgets,
            expire_after,
            termination_grace_period,
            node_class: spec
                .template
                .spec
                .node_class_ref
                .as_ref()
                .map(|r| r.name.clone()),
            unlaunchable: Default::default(),
            billing: Default::default(),
        })
    }

    /// The first requirement a node with these labels breaks, if any.
    pub fn first_rejection<L: crate::labels::LabelLookup + ?Sized>(
        &self,
        labels: &L,
    ) -> Option<&Requirement> {
        self.requirements.iter().find(|r| !r.matches(labels))
    }
}

/// How long a node lives when the pool does not say (Karpenter v1's default, 30 days).
pub const DEFAULT_EXPIRE_AFTER: Duration = Duration::from_secs(720 * 3600);

/// A disruption budget: a count or a percentage of the pool's nodes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Budget {
    Count(u32),
    Percent(f64),
}

impl Budget {
    /// How many of `total` nodes may be disrupted at once (a percentage rounds up, so a
    /// non-zero budget always allows at least one).
    pub fn allowed(self, total: usize) -> usize {
        match self {
            Budget::Count(n) => n as usize,
            Budget::Percent(p) => ((total as f64) * p / 100.0).ceil() as usize,
        }
    }
}

/// Parse "10%" or "3".
pub fn parse_budget(s: &str) -> Result<Budget, String> {
    if let Some(p) = s.strip_suffix('%') {
        let v: f64 = p.parse().map_err(|_| format!("invalid percentage {s:?}"))?;
        if !(0.0..=100.0).contains(&v) {
            return Err(format!("percentage {s:?} is outside 0..100"));
        }
        Ok(Budget::Percent(v))
    } else {
        s.parse()
            .map(Budget::Count)
            .map_err(|_| format!("invalid node count {s:?}"))
    }
}

/// Parse a Go-style duration: "30s", "5m", "1h30m", "500ms".
/// The longest duration cooper accepts anywhere (TTLs, time limits, scenario lengths):
/// longer ones are typos, and would overflow the clock arithmetic they feed.
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 86_400);

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let err = || format!("invalid duration {s:?}: expected e.g. 30s, 5m, 1h30m");
    if s.is_empty() {
        return Err(err());
    }
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(err)?;
        let value: f64 = rest[..num_end].parse().map_err(|_| err())?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let factor = match &rest[..unit_end] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            _ => return Err(err()),
        };
        total += value * factor;
        rest = &rest[unit_end..];
    }
    match Duration::try_from_secs_f64(total) {
        Ok(d) if d <= MAX_DURATION => Ok(d),
        _ => Err(format!(
            "duration {s:?} is longer than 100 years (876000h), the most cooper accepts"
        )),
    }
}

/// Karpenter's NodePool API versions, read as cooper's own (with a warning for every
/// field cooper does not honour yet).
pub const KARPENTER_API_VERSIONS: [&str; 2] = ["karpenter.sh/v1", "karpenter.sh/v1beta1"];

/// The volume types EC2 launches with.
const EBS_VOLUME_TYPES: [&str; 7] = ["gp3", "gp2", "io1", "io2", "st1", "sc1", "standard"];

/// Decode NodePool documents; any other kind is an error, except Karpenter's
/// EC2NodeClass, which is skipped with a warning. Warnings (fields accepted but not
/// honoured yet) are logged; [`from_documents_with_warnings`] returns them.
pub fn from_documents(docs: &[Document]) -> Result<Vec<NodePool>, ManifestError> {
    let (pools, warnings) = from_documents_with_warnings(docs)?;
    for w in warnings {
        tracing::warn!("{w}");
    }
    Ok(pools)
}

/// Bring a NodePool written for Karpenter's API to cooper's: numbers as quantities in
/// `limits`, cooper's apiVersion. (Every field of Karpenter v1's NodePool that cooper's
/// schema lacks is refused by it, by name, rather than dropped.)
fn karpenter_compatible(value: &mut serde_json::Value) {
    let karpenter = value
        .get("apiVersion")
        .and_then(|v| v.as_str())
        .is_some_and(|v| KARPENTER_API_VERSIONS.contains(&v));
    // `limits: {cpu: 1000}` (Karpenter's docs write numbers): a quantity either way.
    if let Some(limits) = value
        .pointer_mut("/spec/limits")
        .and_then(|l| l.as_object_mut())
    {
        for v in limits.values_mut() {
            if let serde_json::Value::Number(n) = v {
                *v = serde_json::Value::String(n.to_string());
            }
        }
    }
    if karpenter && let Some(v) = value.get_mut("apiVersion") {
        *v = serde_json::Value::String(API_VERSION.to_string());
    }
}

/// [`from_documents`], returning the warnings instead of logging them.
pub fn from_documents_with_warnings(
    docs: &[Document],
) -> Result<(Vec<NodePool>, Vec<String>), ManifestError> {
    let mut pools = Vec::new();
    let mut warnings = Vec::new();
    let mut classes: Vec<crate::crd::NodeClass> = Vec::new();
    for doc in docs {
        if doc.kind() == "EC2NodeClass" {
            warnings.push(format!(
                "{}:{}: {}: skipped: cooper launches with its own NodeClass (cooper.dev/v1alpha1; same subnet and security-group selectors, see the README's \"Migrating a Karpenter NodePool\")",
                doc.file.display(),
                doc.line,
                doc.describe()
            ));
            continue;
        }
        if doc.kind() == "NodeClass" {
            let class: crate::crd::NodeClass = doc.decode()?;
            if let Some(cost) = class.spec.per_node_cost_per_hour
                && !(cost.is_finite() && cost >= 0.0)
            {
                return Err(doc.field_error(
                    "spec.perNodeCostPerHour",
                    format!("{cost} is not a cost (a non-negative USD per node-hour)"),
                ));
            }
            for (i, device) in class.spec.block_device_mappings.iter().enumerate() {
                if !EBS_VOLUME_TYPES.contains(&device.volume_type.as_str()) {
                    return Err(doc.field_error(
                        format!("spec.blockDeviceMappings[{i}].volumeType"),
                        format!(
                            "{:?} is not an EBS volume type (one of {})",
                            device.volume_type,
                            EBS_VOLUME_TYPES.join(", ")
                        ),
                    ));
                }
            }
            classes.push(class);
            continue;
        }
        if doc.kind() != "NodePool" {
            return Err(doc.error(format!(
                "expected kind NodePool (or NodeClass), found {:?}",
                doc.kind()
            )));
        }
        let mut value = doc.value.clone();
        karpenter_compatible(&mut value);
        let doc = &Document {
            value,
            ..doc.clone()
        };
        let obj: NodePoolObject = doc.decode()?;
        if obj.api_version != API_VERSION {
            return Err(doc.field_error(
                "apiVersion",
                format!("expected {API_VERSION}, found {:?}", obj.api_version),
            ));
        }
        let pool = NodePool::from_spec(&obj.metadata.name, &obj.spec)
            .map_err(|(path, message)| doc.field_error(path, message))?;
        // Accepted but not acted on yet: the same list the controller puts on the
        // NodePool's SpecHonoured condition.
        warnings.extend(obj.spec.not_honoured().into_iter().map(|(field, what)| {
            format!(
                "{}:{}: {}: {field}: {what}",
                doc.file.display(),
                doc.line,
                doc.describe()
            )
        }));
        if pools.iter().any(|p: &NodePool| p.name == pool.name) {
            return Err(
                doc.field_error("metadata.name", format!("duplicate NodePool {}", pool.name))
            );
        }
        pools.push(pool);
    }
    // NodeClasses beside the pools say what their nodes are billed besides the
    // instance; offline, only an explicit `associatePublicIPAddress` gives an address.
    for pool in &mut pools {
        if let Some(class) = classes.iter().find(|c| {
            Some(c.metadata.name.as_deref().unwrap_or_default()) == pool.node_class.as_deref()
        }) {
            pool.billing = class.spec.billing(false);
        }
    }
    Ok((pools, warnings))
}

/// Load NodePools from a file.
pub fn load(path: &Path) -> Result<Vec<NodePool>, ManifestError> {
    from_documents(&manifest::read_documents(path)?)
}

/// The shipped default pools.
pub fn defaults() -> Result<Vec<NodePool>, ManifestError> {
    from_documents(&manifest::parse_documents(
        Path::new("config/nodepools.yaml (embedded)"),
        DEFAULT_NODEPOOLS_YAML,
    )?)
}

/// Restrict every pool to on-demand capacity: the "what we would pay without spot"
/// baseline of the cost reports.
pub fn restrict_to_on_demand(pools: &mut [NodePool]) {
    for p in pools {
        p.requirements.retain(|r| r.key != keys::CAPACITY_TYPE);
        p.requirements.push(crate::labels::Requirement {
            key: keys::CAPACITY_TYPE.to_string(),
            operator: crate::labels::Operator::In,
            values: vec!["on-demand".into()],
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_too_long_for_the_clock_are_errors_not_panics() {
        for s in ["99999999999999999999h", "3000000000000000h", "876001h"] {
            let e = parse_duration(s).expect_err(s);
            assert!(e.contains("100 years"), "{e}");
        }
        assert_eq!(parse_duration("876000h"), Ok(MAX_DURATION));
    }

    #[test]
    fn default_pools_include_the_seed_inf1_pool() {
        let pools = defaults().unwrap();
        let inf1 = pools.iter().find(|p| p.name == "inf1").expect("inf1 pool");
        assert_eq!(inf1.limits.get(resources::CPU), 16_000);
        assert_eq!(inf1.empty_ttl, Some(Duration::from_secs(30)));
        let mut labels = Labels::new();
        labels.insert(keys::INSTANCE_TYPE.into(), "inf1.xlarge".into());
        labels.insert(keys::CAPACITY_TYPE.into(), "spot".into());
        labels.insert(keys::OS.into(), "linux".into());
        labels.insert(keys::ARCH.into(), "amd64".into());
        assert_eq!(inf1.first_rejection(&labels), None);
        labels.insert(keys::CAPACITY_TYPE.into(), "on-demand".into());
        assert!(inf1.first_rejection(&labels).is_some());
    }

    #[test]
    fn durations_and_budgets() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert!(parse_duration("30").is_err());
        assert!(parse_duration("5x").is_err());
        assert_eq!(parse_budget("10%").unwrap().allowed(25), 3);
        assert_eq!(parse_budget("2").unwrap().allowed(25), 2);
        assert!(parse_budget("abc").is_err());
    }

    fn parse(text: &str) -> Result<Vec<NodePool>, ManifestError> {
        from_documents(&manifest::parse_documents(Path::new("pools.yaml"), text)?)
    }

    #[test]
    fn unknown_fields_and_operators_are_errors() {
        let base = "apiVersion: cooper.dev/v1alpha1\nkind: NodePool\nmetadata: {name: p}\nspec:\n  template:\n    spec:\n      requirements:\n      - {key: kubernetes.io/arch, operator: In, values: [amd64]}\n";
        assert!(parse(base).is_ok());
        let err = parse(&base.replace("operator: In", "operator: Inn"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("pools.yaml") && err.contains("requirements[0]") && err.contains("Inn"),
            "{err}"
        );
        let err = parse(&format!("{base}  colour: blue\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("colour"), "{err}");
        let err = parse(&format!("{base}  limits: {{cpu: lots}}\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("spec.limits.cpu") && err.contains("lots"),
            "{err}"
        );
        let err = parse(&base.replace("values: [amd64]", "values: []"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs at least one value"), "{err}");
    }
}
