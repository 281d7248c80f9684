//! Pod demand from real Kubernetes objects: Pods, and the pod templates of
//! Deployments, StatefulSets, ReplicaSets and Jobs, expanded to one pending pod per
//! replica. DaemonSets become per-node overhead, PodGroups define gangs, and
//! PriorityClasses resolve `priorityClassName`.
//!
//! A pod's effective request is computed as kube-scheduler does: the larger of the
//! biggest init container (plus the sidecars started before it) and the sum of the
//! containers and sidecars, plus the pod overhead; a container's limit stands in for a
//! missing request.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Container, Pod, PodSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use serde::Serialize;

use crate::labels::{
    Labels, NodeSelector, Operator, Requirement, Taint, TaintEffect, Toleration, canonical_key,
    untolerated,
};
use crate::manifest::{Document, ManifestError};
use crate::resources::{self, Resources};
use crate::scheduling::{PodConstraints, Volumes};

/// Volcano's gang annotation (the PodGroup's name).
pub const VOLCANO_GROUP_ANNOTATION: &str = "scheduling.k8s.io/group-name";
/// The coscheduling plugin's gang label (the PodGroup's name).
pub const COSCHEDULING_GROUP_LABEL: &str = "scheduling.x-k8s.io/pod-group";

/// A pod that needs a node.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PendingPod {
    pub namespace: String,
    pub name: String,
    /// Effective requests, including `pods: 1`.
    pub requests: Resources,
    pub selector: NodeSelector,
    pub tolerations: Vec<Toleration>,
    pub priority: i32,
    /// `namespace/podgroup` when the pod belongs to a gang.
    pub gang: Option<String>,
    /// `Kind namespace/name` of the object it came from, for cost attribution.
    pub workload: String,
    /// The pod's labels (what other pods' affinity and spread selectors match).
    pub labels: Labels,
    /// Spread, pod (anti-)affinity, host ports, preferences; None when there are none.
    pub constraints: Option<std::sync::Arc<PodConstraints>>,
}

impl PendingPod {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The pod's scheduling constraints (empty when it has none).
    pub fn constraints(&self) -> &PodConstraints {
        static NONE: std::sync::OnceLock<PodConstraints> = std::sync::OnceLock::new();
        self.constraints
            .as_deref()
            .unwrap_or_else(|| NONE.get_or_init(PodConstraints::default))
    }

    /// The pod as bound to `node`, for the constraints of the pods placed after it.
    pub fn placed_on(&self, node: &str) -> crate::scheduling::PlacedPod {
        crate::scheduling::PlacedPod::new(
            self.namespace.clone(),
            self.labels.clone(),
            node.to_string(),
            self.constraints(),
        )
    }

    /// Can this pod run on a node with these labels and taints (ignoring room)?
    pub fn fits_node<L: crate::labels::LabelLookup + ?Sized>(
        &self,
        labels: &L,
        taints: &[Taint],
    ) -> bool {
        self.selector.matches(labels) && untolerated(&self.tolerations, taints).is_none()
    }
}

/// A gang: pods that must all be placed, in one zone, or none of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Gang {
    /// `namespace/podgroup`.
    pub name: String,
    /// How many pods must be placed together (the PodGroup's `minMember`, or all).
    pub min_member: u32,
}

impl Gang {
    /// The gangs among these pending pods, each needing all of its pending members
    /// (the simulator and the controller see whole gangs arrive).
    pub fn of_pending(pods: &[PendingPod]) -> Vec<Gang> {
        let mut sizes: BTreeMap<String, u32> = BTreeMap::new();
        for g in pods.iter().filter_map(|p| p.gang.as_ref()) {
            *sizes.entry(g.clone()).or_default() += 1;
        }
        sizes
            .into_iter()
            .map(|(name, min_member)| Gang { name, min_member })
            .collect()
    }
}

/// What every node that runs a DaemonSet's pod loses to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonSetOverhead {
    /// `namespace/name`.
    pub name: String,
    pub requests: Resources,
    pub selector: NodeSelector,
    pub tolerations: Vec<Toleration>,
}

impl DaemonSetOverhead {
    /// Would the DaemonSet run a pod on a node with these labels and taints?
    pub fn runs_on<L: crate::labels::LabelLookup + ?Sized>(
        &self,
        labels: &L,
        taints: &[Taint],
    ) -> bool {
        self.selector.matches(labels) && untolerated(&self.tolerations, taints).is_none()
    }
}

/// Everything read from workload manifests.
#[derive(Debug, Clone, Default)]
pub struct Workloads {
    pub pods: Vec<PendingPod>,
    pub daemonsets: Vec<DaemonSetOverhead>,
    pub gangs: Vec<Gang>,
    /// Objects read but not planned, each with why (an unknown kind, with the kind it
    /// was probably meant to be): a typo in `kind` must not pass as "nothing to plan".
    pub skipped: Vec<String>,
}

/// Kinds that create pods and are planned.
const PLANNED_KINDS: [&str; 6] = [
    "Pod",
    "Deployment",
    "StatefulSet",
    "ReplicaSet",
    "Job",
    "DaemonSet",
];

/// Kinds read for what they say about pods (priorities, gangs, volumes), or that create
/// no pods: skipped without a word.
const QUIET_KINDS: [&str; 30] = [
    "PriorityClass",
    "PodGroup",
    "PersistentVolume",
    "PersistentVolumeClaim",
    "StorageClass",
    "Service",
    "ConfigMap",
    "Secret",
    "Namespace",
    "ServiceAccount",
    "Role",
    "RoleBinding",
    "ClusterRole",
    "ClusterRoleBinding",
    "Ingress",
    "IngressClass",
    "NetworkPolicy",
    "PodDisruptionBudget",
    "HorizontalPodAutoscaler",
    "CustomResourceDefinition",
    "LimitRange",
    "ResourceQuota",
    "Endpoints",
    "EndpointSlice",
    "NodePool",
    "NodeClass",
    "EC2NodeClass",
    "NodeClaim",
    "VerticalPodAutoscaler",
    "Event",
];

/// Why an object of `kind` is not planned, or None when nothing needs saying.
/// Kinds whose objects own pods (directly or through a ReplicaSet).
const OWNER_KINDS: &[&str] = &[
    "Deployment",
    "ReplicaSet",
    "StatefulSet",
    "Job",
    "DaemonSet",
];

fn skip_reason(kind: &str) -> Option<String> {
    if QUIET_KINDS.contains(&kind) || PLANNED_KINDS.contains(&kind) {
        return None;
    }
    if kind == "CronJob" {
        return Some("kind CronJob (its Jobs start on a schedule; plan the Job instead)".into());
    }
    if kind.is_empty() {
        return Some("no kind".into());
    }
    let near = PLANNED_KINDS
        .iter()
        .chain(QUIET_KINDS.iter())
        .chain(std::iter::once(&"CronJob"))
        .map(|k| {
            (
                edit_distance(&kind.to_ascii_lowercase(), &k.to_ascii_lowercase()),
                *k,
            )
        })
        .filter(|(d, _)| *d <= 2)
        .min();
    Some(match near {
        Some((_, k)) => format!("kind {kind} (did you mean {k}?)"),
        None => format!("kind {kind} (not a kind cooper plans)"),
    })
}

/// Levenshtein distance, for "did you mean".
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Built-in priority classes.
fn builtin_priority(name: &str) -> Option<i32> {
    match name {
        "system-cluster-critical" => Some(2_000_000_000),
        "system-node-critical" => Some(2_000_001_000),
        _ => None,
    }
}

/// Read pods, DaemonSets, PodGroups and PriorityClasses from parsed documents, with the
/// The most pods one workload may ask for: more is a typo (and would exhaust memory
/// before anything could be planned).
pub const MAX_REPLICAS: i64 = 1_000_000;
/// The most pods one input may expand to in all (a plan of 50,000 takes about a second
/// and 100 MiB; a million pods some minutes and several GiB).
pub const MAX_PODS: i64 = 1_000_000;

/// PersistentVolumes, PersistentVolumeClaims and StorageClasses among them deciding where
/// the pods' volumes let them run. Kinds that create no pods (Services, ConfigMaps, ...)
/// are skipped.
pub fn from_documents(docs: &[Document]) -> Result<Workloads, ManifestError> {
    let mut volumes = Volumes::default();
    for doc in docs {
        volumes
            .add(doc.kind(), &doc.value)
            .map_err(|(field, message)| doc.field_error(field, message))?;
    }
    from_documents_with(docs, &volumes)
}

/// [`from_documents`] with the volumes known from elsewhere (the live cluster's).
pub fn from_documents_with(
    docs: &[Document],
    volumes: &Volumes,
) -> Result<Workloads, ManifestError> {
    let mut priority_classes: BTreeMap<String, i32> = BTreeMap::new();
    let mut declared_gangs: BTreeMap<String, u32> = BTreeMap::new();
    for doc in docs {
        match doc.kind() {
            "PriorityClass" => {
                let name = doc.value.pointer("/metadata/name").and_then(|v| v.as_str());
                let value = doc.value.get("value").and_then(|v| v.as_i64());
                match (name, value) {
                    (Some(n), Some(v)) => {
                        let v = i32::try_from(v)
                            .map_err(|_| doc.field_error("value", "out of range for int32"))?;
                        priority_classes.insert(n.to_string(), v);
                    }
                    (None, _) => return Err(doc.field_error("metadata.name", "missing")),
                    (_, None) => return Err(doc.field_error("value", "missing or not an integer")),
                }
            }
            "PodGroup" => {
                let name = doc
                    .value
                    .pointer("/metadata/name")
                    .and_then(|v| v.as_str())
                    .ok_or_else(|| doc.field_error("metadata.name", "missing"))?;
                let ns = doc
                    .value
                    .pointer("/metadata/namespace")
                    .and_then(|v| v.as_str())
                    .unwrap_or("default");
                let min = match doc.value.pointer("/spec/minMember") {
                    None => 1,
                    Some(v) => v
                        .as_u64()
                        .and_then(|m| u32::try_from(m).ok())
                        .filter(|m| *m >= 1)
                        .ok_or_else(|| {
                            doc.field_error("spec.minMember", "must be a positive integer")
                        })?,
                };
                declared_gangs.insert(format!("{ns}/{name}"), min);
            }
            _ => {}
        }
    }

    // Controllers in the input: a Pod or ReplicaSet they own is counted through them
    // (`kubectl get all -o yaml` lists a Deployment, its ReplicaSet and their pods).
    let owners: std::collections::HashSet<(String, String, String)> = docs
        .iter()
        .filter(|d| OWNER_KINDS.contains(&d.kind()))
        .filter_map(|d| {
            let name = d.value.pointer("/metadata/name")?.as_str()?;
            let ns = d
                .value
                .pointer("/metadata/namespace")
                .and_then(|v| v.as_str())
                .unwrap_or("default");
            Some((ns.to_string(), d.kind().to_string(), name.to_string()))
        })
        .collect();
    let owned_by_input = |doc: &Document| -> bool {
        let ns = doc
            .value
            .pointer("/metadata/namespace")
            .and_then(|v| v.as_str())
            .unwrap_or("default");
        doc.value
            .pointer("/metadata/ownerReferences")
            .and_then(|v| v.as_array())
            .into_iter()
            .flatten()
            .any(|o| {
                let kind = o.get("kind").and_then(|v| v.as_str()).unwrap_or("");
                let name = o.get("name").and_then(|v| v.as_str()).unwrap_or("");
                owners.contains(&(ns.to_string(), kind.to_string(), name.to_string()))
            })
    };

    let mut out = Workloads::default();
    // Pod key → the object that defined it, to name both when two objects define one pod.
    let mut defined_by: std::collections::HashMap<String, String> =
        std::collections::HashMap::new();
    for doc in docs {
        let kind = doc.kind().to_string();
        if let Some(reason) = skip_reason(&kind) {
            out.skipped.push(format!(
                "{}:{}: {}: {reason}",
                doc.file.display(),
                doc.line,
                doc.describe()
            ));
            continue;
        }
        if matches!(kind.as_str(), "Pod" | "ReplicaSet") && owned_by_input(doc) {
            tracing::debug!(object = %doc.describe(), "counted through its owner in the input");
            continue;
        }
        let mut claim_templates: Vec<(String, Option<String>)> = Vec::new();
        let (meta, spec, replicas, prefix): (_, PodSpec, i64, &str) = match kind.as_str() {
            "Pod" => {
                let pod: Pod = doc.decode()?;
                let Some(spec) = pod.spec else {
                    return Err(doc.field_error("spec", "missing"));
                };
                if spec.node_name.is_some() {
                    continue; // already bound: not pending
                }
                let owned_by_ds = pod
                    .metadata
                    .owner_references
                    .iter()
                    .flatten()
                    .any(|o| o.kind == "DaemonSet");
                if owned_by_ds {
                    continue;
                }
                (pod.metadata, spec, -1, "spec")
            }
            "Deployment" => {
                let d: Deployment = doc.decode()?;
                let spec = d.spec.ok_or_else(|| doc.field_error("spec", "missing"))?;
                let t = spec.template;
                let meta = merge_meta(d.metadata, t.metadata);
                (
                    meta,
                    t.spec
                        .ok_or_else(|| doc.field_error("spec.template.spec", "missing"))?,
                    spec.replicas.unwrap_or(1) as i64,
                    "spec.template.spec",
                )
            }
            "StatefulSet" => {
                let s: StatefulSet = doc.decode()?;
                let spec = s.spec.ok_or_else(|| doc.field_error("spec", "missing"))?;
                for t in spec.volume_claim_templates.iter().flatten() {
                    claim_templates.push((
                        t.metadata.name.clone().unwrap_or_default(),
                        t.spec.as_ref().and_then(|s| s.storage_class_name.clone()),
                    ));
                }
                let t = spec.template;
                let meta = merge_meta(s.metadata, t.metadata);
                (
                    meta,
                    t.spec
                        .ok_or_else(|| doc.field_error("spec.template.spec", "missing"))?,
                    spec.replicas.unwrap_or(1) as i64,
                    "spec.template.spec",
                )
            }
            "ReplicaSet" => {
                let r: ReplicaSet = doc.decode()?;
                let spec = r.spec.ok_or_else(|| doc.field_error("spec", "missing"))?;
                let t = spec
                    .template
                    .ok_or_else(|| doc.field_error("spec.template", "missing"))?;
                let meta = merge_meta(r.metadata, t.metadata);
                (
                    meta,
                    t.spec
                        .ok_or_else(|| doc.field_error("spec.template.spec", "missing"))?,
                    spec.replicas.unwrap_or(1) as i64,
                    "spec.template.spec",
                )
            }
            "Job" => {
                let j: Job = doc.decode()?;
                let spec = j.spec.ok_or_else(|| doc.field_error("spec", "missing"))?;
                let t = spec.template;
                let meta = merge_meta(j.metadata, t.metadata);
                let parallelism = spec.parallelism.unwrap_or(1) as i64;
                let completions = spec.completions.map(|c| c as i64).unwrap_or(parallelism);
                (
                    meta,
                    t.spec
                        .ok_or_else(|| doc.field_error("spec.template.spec", "missing"))?,
                    parallelism.min(completions),
                    "spec.template.spec",
                )
            }
            "DaemonSet" => {
                let d: DaemonSet = doc.decode()?;
                let spec = d.spec.ok_or_else(|| doc.field_error("spec", "missing"))?;
                let pod_spec = spec
                    .template
                    .spec
                    .ok_or_else(|| doc.field_error("spec.template.spec", "missing"))?;
                let ns = d
                    .metadata
                    .namespace
                    .clone()
                    .unwrap_or_else(|| "default".into());
                let name = d.metadata.name.clone().unwrap_or_default();
                let requests = effective_requests(&pod_spec)
                    .map_err(|(p, m)| doc.field_error(format!("spec.template.spec.{p}"), m))?;
                let selector = node_selector(&pod_spec)
                    .map_err(|(p, m)| doc.field_error(format!("spec.template.spec.{p}"), m))?;
                let tolerations = tolerations(&pod_spec)
                    .map_err(|(p, m)| doc.field_error(format!("spec.template.spec.{p}"), m))?;
                out.daemonsets.push(DaemonSetOverhead {
                    name: format!("{ns}/{name}"),
                    requests,
                    selector,
                    tolerations,
                });
                continue;
            }
            _ => continue,
        };
        // A Pod is -1 (one pod, not numbered); a replicated workload's count is its own.
        let count_field = if kind == "Job" {
            "spec.parallelism"
        } else {
            "spec.replicas"
        };
        if kind != "Pod" && replicas < 0 {
            return Err(doc.field_error(count_field, format!("{replicas} must not be negative")));
        }
        if replicas > MAX_REPLICAS {
            return Err(doc.field_error(
                count_field,
                format!("{replicas} pods: cooper plans at most {MAX_REPLICAS} pods per workload"),
            ));
        }
        let total = out.pods.len() as i64 + replicas.max(1);
        if total > MAX_PODS {
            return Err(doc.field_error(
                count_field,
                format!(
                    "{} pods with the objects before it: cooper plans at most {MAX_PODS} pods at once (workload::MAX_PODS)",
                    total
                ),
            ));
        }
        let at = |(p, m): (String, String)| doc.field_error(format!("{prefix}.{p}"), m);
        let requests = effective_requests(&spec).map_err(at)?;
        let selector = node_selector(&spec).map_err(at)?;
        let tolerations = tolerations(&spec).map_err(at)?;
        let priority = match (&spec.priority, &spec.priority_class_name) {
            (Some(p), _) => *p,
            (None, Some(class)) => priority_classes
                .get(class)
                .copied()
                .or_else(|| builtin_priority(class))
                .ok_or_else(|| {
                    doc.field_error(
                        format!("{prefix}.priorityClassName"),
                        format!("PriorityClass {class:?} is not defined in the input"),
                    )
                })?,
            (None, None) => 0,
        };
        let namespace = meta.namespace.clone().unwrap_or_else(|| "default".into());
        let base = meta
            .name
            .clone()
            .ok_or_else(|| doc.field_error("metadata.name", "missing"))?;
        let gang_name = meta
            .annotations
            .as_ref()
            .and_then(|a| a.get(VOLCANO_GROUP_ANNOTATION))
            .or_else(|| {
                meta.labels
                    .as_ref()
                    .and_then(|l| l.get(COSCHEDULING_GROUP_LABEL))
            })
            .map(|g| format!("{namespace}/{g}"));
        let workload = format!("{kind} {namespace}/{base}");
        let labels: Labels = meta.labels.clone().unwrap_or_default();
        let constraints = crate::scheduling::parse(&spec, &namespace, &labels).map_err(at)?;
        let names: Vec<String> = if replicas == -1 {
            vec![base.clone()]
        } else {
            (0..replicas).map(|i| format!("{base}-{i}")).collect()
        };
        for (i, name) in names.into_iter().enumerate() {
            let mut selector = selector.clone();
            let mut constraints = constraints.clone();
            let mut problems: Vec<String> = constraints.unsupported.take().into_iter().collect();
            match volumes.topology(&namespace, &constraints.claims) {
                Ok(sel) => selector.and(&sel),
                Err(reason) => problems.push(reason),
            }
            for (template, class) in &claim_templates {
                let claim = format!("{template}-{base}-{i}");
                let known = volumes.claims.contains_key(&format!("{namespace}/{claim}"));
                let topology = if known {
                    volumes.topology(&namespace, std::slice::from_ref(&claim))
                } else {
                    volumes.template_topology(
                        class.as_deref(),
                        &format!("volume claim template {template} (claim {claim})"),
                    )
                };
                match topology {
                    Ok(sel) => selector.and(&sel),
                    Err(reason) => problems.push(reason),
                }
            }
            if !problems.is_empty() {
                constraints.unsupported = Some(problems.join("; "));
            }
            let key = format!("{namespace}/{name}");
            let here = format!("{} ({}:{})", doc.describe(), doc.file.display(), doc.line);
            if let Some(first) = defined_by.insert(key.clone(), here) {
                return Err(doc.error(format!(
                    "defines pod {key}, which {first} already defines: the input holds the same object twice (or two objects with one name)"
                )));
            }
            out.pods.push(PendingPod {
                namespace: namespace.clone(),
                name,
                requests: requests.clone(),
                selector,
                tolerations: tolerations.clone(),
                priority,
                gang: gang_name.clone(),
                workload: workload.clone(),
                labels: labels.clone(),
                constraints: (!constraints.is_empty()).then(|| std::sync::Arc::new(constraints)),
            });
        }
    }

    let mut gang_sizes: BTreeMap<String, u32> = BTreeMap::new();
    for p in &out.pods {
        if let Some(g) = &p.gang {
            *gang_sizes.entry(g.clone()).or_default() += 1;
        }
    }
    out.gangs = gang_sizes
        .into_iter()
        .map(|(name, size)| Gang {
            min_member: declared_gangs.get(&name).copied().unwrap_or(size),
            name,
        })
        .collect();
    Ok(out)
}

/// Pod-level metadata wins over the owner's for labels/annotations; name and namespace
/// come from the owner.
fn merge_meta(
    owner: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    template: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>,
) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
    let t = template.unwrap_or_default();
    k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        name: owner.name,
        namespace: owner.namespace,
        labels: t.labels.or(owner.labels),
        annotations: match (owner.annotations, t.annotations) {
            (Some(mut a), Some(b)) => {
                a.extend(b);
                Some(a)
            }
            (a, b) => b.or(a),
        },
        ..Default::default()
    }
}

type FieldError = (String, String);

fn parse_list(map: &BTreeMap<String, Quantity>, path: &str) -> Result<Resources, FieldError> {
    let mut r = Resources::new();
    for (k, q) in map {
        let v = resources::parse_resource(k, &q.0)
            .map_err(|e| (format!("{path}.{k}"), e.to_string()))?;
        r.set(k.clone(), v);
    }
    Ok(r)
}

fn container_requests(c: &Container, path: &str) -> Result<Resources, FieldError> {
    let Some(res) = &c.resources else {
        return Ok(Resources::new());
    };
    let requests = match &res.requests {
        Some(m) => parse_list(m, &format!("{path}.resources.requests"))?,
        None => Resources::new(),
    };
    let limits = match &res.limits {
        Some(m) => parse_list(m, &format!("{path}.resources.limits"))?,
        None => Resources::new(),
    };
    let mut out = requests.clone();
    for (k, v) in limits.iter() {
        if requests.get(k) == 0 && res.requests.as_ref().is_none_or(|r| !r.contains_key(k)) {
            out.set(k.to_string(), v);
        }
    }
    Ok(out)
}

/// The pod's effective requests (see the module docs), including `pods: 1`.
pub fn effective_requests(spec: &PodSpec) -> Result<Resources, FieldError> {
    let mut sum = Resources::new();
    for (i, c) in spec.containers.iter().enumerate() {
        sum = sum.plus(&container_requests(c, &format!("containers[{i}]"))?);
    }
    let mut sidecars = Resources::new();
    let mut init_peak = Resources::new();
    for (i, c) in spec.init_containers.iter().flatten().enumerate() {
        let r = container_requests(c, &format!("initContainers[{i}]"))?;
        if c.restart_policy.as_deref() == Some("Always") {
            sidecars = sidecars.plus(&r);
            init_peak = init_peak.elementwise_max(&sidecars);
        } else {
            init_peak = init_peak.elementwise_max(&r.plus(&sidecars));
        }
    }
    let mut total = sum.plus(&sidecars).elementwise_max(&init_peak);
    if let Some(o) = &spec.overhead {
        total = total.plus(&parse_list(o, "overhead")?);
    }
    total.set(resources::PODS, 1);
    Ok(total)
}

/// nodeSelector plus required node affinity.
pub fn node_selector(spec: &PodSpec) -> Result<NodeSelector, FieldError> {
    let match_labels = spec
        .node_selector
        .iter()
        .flatten()
        .map(|(k, v)| (canonical_key(k).into_owned(), v.clone()))
        .collect();
    let mut terms = Vec::new();
    let required = spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|n| {
            n.required_during_scheduling_ignored_during_execution
                .as_ref()
        });
    if let Some(req) = required {
        for (i, term) in req.node_selector_terms.iter().enumerate() {
            let path = format!(
                "affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[{i}]"
            );
            if term.match_fields.as_ref().is_some_and(|f| !f.is_empty()) {
                // Node names: the pod is reported unschedulable (see scheduling::parse).
                continue;
            }
            let mut reqs = Vec::new();
            for (j, e) in term.match_expressions.iter().flatten().enumerate() {
                let op = Operator::parse(&e.operator).ok_or_else(|| {
                    (
                        format!("{path}.matchExpressions[{j}].operator"),
                        format!("unknown operator {:?}", e.operator),
                    )
                })?;
                let r = Requirement::new(&e.key, op, e.values.clone().unwrap_or_default())
                    .map_err(|m| (format!("{path}.matchExpressions[{j}]"), m))?;
                reqs.push(r);
            }
            // An empty term matches no node (kube-scheduler); with other terms beside it
            // it adds nothing to their OR, alone it makes the pod unplaceable, which
            // scheduling::parse reports.
            if !reqs.is_empty() {
                terms.push(reqs);
            }
        }
    }
    Ok(NodeSelector {
        match_labels,
        terms,
    })
}

/// The pod's tolerations.
pub fn tolerations(spec: &PodSpec) -> Result<Vec<Toleration>, FieldError> {
    let mut out = Vec::new();
    for (i, t) in spec.tolerations.iter().flatten().enumerate() {
        let path = format!("tolerations[{i}]");
        let exists = match t.operator.as_deref() {
            None | Some("Equal") => false,
            Some("Exists") => true,
            Some(other) => {
                return Err((
                    format!("{path}.operator"),
                    format!("unknown operator {other:?}: use Equal or Exists"),
                ));
            }
        };
        let effect = match t.effect.as_deref() {
            None | Some("") => None,
            Some("NoSchedule") => Some(TaintEffect::NoSchedule),
            Some("PreferNoSchedule") => Some(TaintEffect::PreferNoSchedule),
            Some("NoExecute") => Some(TaintEffect::NoExecute),
            Some(other) => {
                return Err((
                    format!("{path}.effect"),
                    format!("unknown effect {other:?}"),
                ));
            }
        };
        let key = t.key.clone().filter(|k| !k.is_empty());
        if key.is_none() && !exists {
            return Err((
                format!("{path}.key"),
                "an empty key needs operator Exists".into(),
            ));
        }
        out.push(Toleration {
            key,
            exists,
            value: t.value.clone(),
            effect,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::parse_documents;
    use std::path::Path;

    fn load(text: &str) -> Result<Workloads, ManifestError> {
        from_documents(&parse_documents(Path::new("w.yaml"), text)?)
    }

    #[test]
    fn kubectl_get_all_counts_each_pod_once() {
        // A Deployment, its ReplicaSet and a pending pod of it, as `kubectl get all -o
        // yaml` lists them; plus a ReplicaSet and a Pod whose owners are not in the input.
        let text = r#"
apiVersion: v1
kind: List
items:
- apiVersion: apps/v1
  kind: Deployment
  metadata: {name: web, namespace: shop}
  spec:
    replicas: 2
    selector: {matchLabels: {app: web}}
    template:
      metadata: {labels: {app: web}}
      spec: {containers: [{name: c, image: x, resources: {requests: {cpu: 100m}}}]}
- apiVersion: apps/v1
  kind: ReplicaSet
  metadata:
    name: web-5d4f
    namespace: shop
    ownerReferences: [{apiVersion: apps/v1, kind: Deployment, name: web, uid: u1}]
  spec:
    replicas: 2
    selector: {matchLabels: {app: web}}
    template:
      metadata: {labels: {app: web}}
      spec: {containers: [{name: c, image: x, resources: {requests: {cpu: 100m}}}]}
- apiVersion: v1
  kind: Pod
  metadata:
    name: web-5d4f-abcde
    namespace: shop
    ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: web-5d4f, uid: u2}]
  spec: {containers: [{name: c, image: x, resources: {requests: {cpu: 100m}}}]}
- apiVersion: v1
  kind: Pod
  metadata:
    name: orphan-xyz
    namespace: shop
    ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: gone, uid: u3}]
  spec: {containers: [{name: c, image: x, resources: {requests: {cpu: 100m}}}]}
"#;
        let w = load(text).expect("loads");
        let mut names: Vec<String> = w.pods.iter().map(|p| p.key()).collect();
        names.sort();
        assert_eq!(
            names,
            ["shop/orphan-xyz", "shop/web-0", "shop/web-1"],
            "the Deployment's two replicas once, and the pod whose owner is absent"
        );
    }

    #[test]
    fn deployment_expands_to_named_replicas() {
        let w = load(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  replicas: 3\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec:\n      containers:\n      - name: c\n        resources: {requests: {cpu: 500m, memory: 1Gi}}\n",
        )
        .unwrap();
        let names: Vec<String> = w.pods.iter().map(|p| p.key()).collect();
        assert_eq!(names, ["default/web-0", "default/web-1", "default/web-2"]);
        assert_eq!(w.pods[0].requests.get(resources::CPU), 500);
        assert_eq!(w.pods[0].requests.get(resources::PODS), 1);
    }

    #[test]
    fn negative_or_absurd_counts_are_errors_naming_the_field() {
        let deployment = |n: &str| {
            format!(
                "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web}}\nspec:\n  replicas: {n}\n  selector: {{matchLabels: {{app: web}}}}\n  template:\n    metadata: {{labels: {{app: web}}}}\n    spec:\n      containers:\n      - name: c\n        resources: {{requests: {{cpu: 500m}}}}\n"
            )
        };
        let e = load(&deployment("-1")).unwrap_err().to_string();
        assert!(e.contains("spec.replicas") && e.contains("negative"), "{e}");
        let e = load(&deployment("1000000000")).unwrap_err().to_string();
        assert!(e.contains("spec.replicas") && e.contains("at most"), "{e}");
        assert!(load(&deployment("0")).unwrap().pods.is_empty());
        let job = "apiVersion: batch/v1\nkind: Job\nmetadata: {name: j}\nspec:\n  parallelism: -1\n  template:\n    spec:\n      containers:\n      - name: c\n        resources: {requests: {cpu: 500m}}\n";
        let e = load(job).unwrap_err().to_string();
        assert!(
            e.contains("spec.parallelism") && e.contains("negative"),
            "{e}"
        );
    }

    #[test]
    fn init_containers_sidecars_overhead_and_limits() {
        let w = load(
            r#"apiVersion: v1
kind: Pod
metadata: {name: p, namespace: ml}
spec:
  overhead: {cpu: 100m}
  initContainers:
  - name: big-init
    resources: {requests: {cpu: "3", memory: 1Gi}}
  - name: sidecar
    restartPolicy: Always
    resources: {requests: {cpu: 200m}}
  - name: late-init
    resources: {requests: {cpu: "1"}}
  containers:
  - name: a
    resources: {requests: {cpu: "1"}, limits: {nvidia.com/gpu: 2}}
  - name: b
    resources: {requests: {cpu: 500m, memory: 2Gi}}
"#,
        )
        .unwrap();
        let r = &w.pods[0].requests;
        // containers 1.5 + sidecar 0.2 = 1.7 < big-init 3 → 3, plus 100m overhead.
        assert_eq!(r.get(resources::CPU), 3100);
        assert_eq!(r.get(resources::MEMORY), 2 << 30);
        assert_eq!(
            r.get(resources::NVIDIA_GPU),
            2,
            "limit stands in for the missing request"
        );
    }

    #[test]
    fn bad_quantity_names_object_and_field() {
        let err = load("kind: Pod\napiVersion: v1\nmetadata: {name: p}\nspec:\n  containers:\n  - name: c\n    resources: {requests: {cpu: 1.5.3}}\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("w.yaml:1")
                && err.contains("Pod p")
                && err.contains("spec.containers[0].resources.requests.cpu"),
            "{err}"
        );
    }

    #[test]
    fn gangs_and_priorities() {
        let w = load(
            r#"apiVersion: scheduling.volcano.sh/v1beta1
kind: PodGroup
metadata: {name: train, namespace: ml}
spec: {minMember: 2}
---
apiVersion: scheduling.k8s.io/v1
kind: PriorityClass
metadata: {name: high}
value: 1000
---
apiVersion: batch/v1
kind: Job
metadata: {name: train, namespace: ml}
spec:
  parallelism: 2
  template:
    metadata:
      annotations: {scheduling.k8s.io/group-name: train}
    spec:
      priorityClassName: high
      restartPolicy: Never
      containers: [{name: t, resources: {limits: {nvidia.com/gpu: 8}}}]
"#,
        )
        .unwrap();
        assert_eq!(w.pods.len(), 2);
        assert_eq!(w.pods[0].gang.as_deref(), Some("ml/train"));
        assert_eq!(w.pods[0].priority, 1000);
        assert_eq!(
            w.gangs,
            [Gang {
                name: "ml/train".into(),
                min_member: 2
            }]
        );
    }
}
