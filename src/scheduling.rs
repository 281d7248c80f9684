//! kube-scheduler's constraints between pods and on topology, as one model the planner,
//! the simulator's scheduler and the controller share: topology spread
//! (`podtopologyspread`), inter-pod affinity and anti-affinity (`interpodaffinity`),
//! host ports (`nodeports`), volume topology (`volumebinding`, `volumezone`) and
//! preferred node affinity (`nodeaffinity`).
//!
//! Parsed once from a pod spec into [`PodConstraints`]; [`Cluster`] answers the
//! scheduler's question for one pod and one node ([`Cluster::admits`]); the planner turns
//! the constraints into what it can optimise over (`planner::constraints`).
//!
//! What cooper cannot model makes the pod unschedulable with a reason
//! ([`PodConstraints::unsupported`]) rather than a plan the scheduler will refuse: DRA
//! `resourceClaims`, node affinity `matchFields`, a topology key whose values cooper
//! does not set on the nodes it launches, a non-empty `namespaceSelector`.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::PodSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector as K8sSelector;

use crate::labels::{Labels, NodeSelector, Operator, Requirement, canonical_key, keys};

/// The topology keys whose values cooper knows for a node it has not launched yet: the
/// offering's (zone, region, instance type, capacity type, pool, architecture and the
/// instance facts) and the node's own name.
pub fn plannable_topology_key(key: &str) -> bool {
    key == keys::HOSTNAME || crate::labels::is_well_known(&canonical_key(key))
}

/// A label selector (`matchLabels` and `matchExpressions`) on pod labels.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LabelSelector {
    pub match_labels: BTreeMap<String, String>,
    pub expressions: Vec<(String, Operator, Vec<String>)>,
}

impl LabelSelector {
    /// From the API's selector; `None` (an unset selector) selects nothing, as the
    /// scheduler reads affinity terms and spread constraints.
    fn parse(selector: Option<&K8sSelector>, path: &str) -> Result<Option<Self>, String> {
        let Some(s) = selector else {
            return Ok(None);
        };
        let mut out = LabelSelector {
            match_labels: s.match_labels.clone().unwrap_or_default(),
            expressions: Vec::new(),
        };
        for (i, e) in s.match_expressions.iter().flatten().enumerate() {
            let op = match e.operator.as_str() {
                "In" => Operator::In,
                "NotIn" => Operator::NotIn,
                "Exists" => Operator::Exists,
                "DoesNotExist" => Operator::DoesNotExist,
                other => {
                    return Err(format!(
                        "{path}.matchExpressions[{i}].operator: unknown operator {other:?}"
                    ));
                }
            };
            out.expressions
                .push((e.key.clone(), op, e.values.clone().unwrap_or_default()));
        }
        Ok(Some(out))
    }

    /// Does a pod with these labels match?
    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.expressions.iter().all(|(k, op, values)| {
                let v = labels.get(k);
                match op {
                    Operator::In => v.is_some_and(|v| values.contains(v)),
                    Operator::NotIn => v.is_none_or(|v| !values.contains(v)),
                    Operator::Exists => v.is_some(),
                    Operator::DoesNotExist => v.is_none(),
                    _ => false,
                }
            })
    }
}

/// Which namespaces an affinity term looks at.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Namespaces {
    /// These (the pod's own when the term names none).
    List(BTreeSet<String>),
    /// Every namespace (`namespaceSelector: {}`).
    All,
}

/// One pod (anti-)affinity term: pods matching `selector` in `namespaces`, within the
/// same value of `topology_key`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AffinityTerm {
    pub selector: LabelSelector,
    pub namespaces: Namespaces,
    /// Canonical key (see [`canonical_key`]).
    pub topology_key: String,
}

impl AffinityTerm {
    /// Does the term select a pod in `namespace` with these labels?
    pub fn selects(&self, namespace: &str, labels: &Labels) -> bool {
        let in_scope = match &self.namespaces {
            Namespaces::All => true,
            Namespaces::List(list) => list.contains(namespace),
        };
        in_scope && self.selector.matches(labels)
    }
}

/// A topology spread constraint.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpreadConstraint {
    pub max_skew: i32,
    /// Canonical key.
    pub topology_key: String,
    /// `DoNotSchedule` (true) or `ScheduleAnyway`.
    pub hard: bool,
    pub min_domains: Option<i32>,
    /// `labelSelector` with `matchLabelKeys` folded in (the pod's own values).
    pub selector: LabelSelector,
    /// `nodeAffinityPolicy: Honor` (the default): only nodes the pod may use count.
    pub honor_node_affinity: bool,
    /// `nodeTaintsPolicy: Honor`: nodes whose taints the pod does not tolerate do not
    /// count (the default, `Ignore`, counts them).
    pub honor_taints: bool,
}

/// A host port a container binds (hostIP is treated as any address: conservative).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HostPort {
    pub protocol: String,
    pub port: i32,
}

/// Everything about a pod the scheduler checks beyond requests, selectors and taints.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodConstraints {
    pub spread: Vec<SpreadConstraint>,
    /// Required pod affinity.
    pub affinity: Vec<AffinityTerm>,
    /// Required pod anti-affinity.
    pub anti_affinity: Vec<AffinityTerm>,
    /// Preferred pod affinity, heaviest first.
    pub preferred_affinity: Vec<AffinityTerm>,
    /// Preferred pod anti-affinity, heaviest first.
    pub preferred_anti_affinity: Vec<AffinityTerm>,
    /// Preferred node affinity terms, heaviest first.
    pub preferred_node: Vec<Vec<Requirement>>,
    pub host_ports: Vec<HostPort>,
    /// PersistentVolumeClaims the pod mounts (in its namespace).
    pub claims: Vec<String>,
    /// Why cooper cannot plan this pod (it is reported, never planned).
    pub unsupported: Option<String>,
    /// Preferences cooper cannot model (a preferred term on a topology key no pool sets,
    /// on namespaces by label, on node names): the pod is planned without them and the
    /// plan lists them as relaxed.
    pub ignored: Vec<String>,
}

impl PodConstraints {
    /// Nothing beyond requests, selectors and taints.
    pub fn is_empty(&self) -> bool {
        *self == PodConstraints::default()
    }
}

/// Read a pod's constraints. `labels` are the pod's (for `matchLabelKeys`); errors are
/// (field path, message) for malformed input; what is well-formed but not modelled goes
/// to [`PodConstraints::unsupported`].
pub fn parse(
    spec: &PodSpec,
    namespace: &str,
    labels: &Labels,
) -> Result<PodConstraints, (String, String)> {
    let mut out = PodConstraints::default();
    let mut unsupported: Vec<String> = Vec::new();
    if spec.resource_claims.as_ref().is_some_and(|c| !c.is_empty()) {
        unsupported.push(
            "it requests devices through DRA resourceClaims, which cooper does not model".into(),
        );
    }
    for (i, c) in spec
        .topology_spread_constraints
        .iter()
        .flatten()
        .enumerate()
    {
        let path = format!("topologySpreadConstraints[{i}]");
        if c.max_skew < 1 {
            return Err((format!("{path}.maxSkew"), "must be at least 1".into()));
        }
        let hard = match c.when_unsatisfiable.as_str() {
            "DoNotSchedule" => true,
            "ScheduleAnyway" => false,
            other => {
                return Err((
                    format!("{path}.whenUnsatisfiable"),
                    format!("{other:?}: use DoNotSchedule or ScheduleAnyway"),
                ));
            }
        };
        let key = canonical_key(&c.topology_key).into_owned();
        if !plannable_topology_key(&key) {
            let why = format!(
                "{path}.topologyKey {:?} is not a label cooper sets on the nodes it launches",
                c.topology_key
            );
            // A ScheduleAnyway constraint only scores nodes: the pod runs without it.
            if hard {
                unsupported.push(why);
            } else {
                out.ignored.push(why);
            }
            continue;
        }
        let mut selector =
            LabelSelector::parse(c.label_selector.as_ref(), &format!("{path}.labelSelector"))
                .map_err(|m| (path.clone(), m))?
                .unwrap_or_default();
        let selects_nothing = c.label_selector.is_none();
        for k in c.match_label_keys.iter().flatten() {
            if let Some(v) = labels.get(k) {
                selector.match_labels.insert(k.clone(), v.clone());
            }
        }
        if selects_nothing {
            // No selector: no pod counts, so the constraint cannot be violated.
            continue;
        }
        let policy = |p: Option<&String>, default: bool, field: &str| match p.map(String::as_str) {
            None => Ok(default),
            Some("Honor") => Ok(true),
            Some("Ignore") => Ok(false),
            Some(other) => Err((
                format!("{path}.{field}"),
                format!("{other:?}: use Honor or Ignore"),
            )),
        };
        out.spread.push(SpreadConstraint {
            max_skew: c.max_skew,
            topology_key: key,
            hard,
            min_domains: c.min_domains,
            selector,
            honor_node_affinity: policy(
                c.node_affinity_policy.as_ref(),
                true,
                "nodeAffinityPolicy",
            )?,
            honor_taints: policy(c.node_taints_policy.as_ref(), false, "nodeTaintsPolicy")?,
        });
    }
    let affinity = spec.affinity.as_ref();
    let term = |t: &k8s_openapi::api::core::v1::PodAffinityTerm,
                path: String,
                unsupported: &mut Vec<String>|
     -> Result<Option<AffinityTerm>, (String, String)> {
        let key = canonical_key(&t.topology_key).into_owned();
        if !plannable_topology_key(&key) {
            unsupported.push(format!(
                "{path}.topologyKey {:?} is not a label cooper sets on the nodes it launches",
                t.topology_key
            ));
            return Ok(None);
        }
        let namespaces = match (&t.namespaces, &t.namespace_selector) {
            (_, Some(sel))
                if sel.match_labels.as_ref().is_none_or(|m| m.is_empty())
                    && sel.match_expressions.as_ref().is_none_or(|m| m.is_empty()) =>
            {
                Namespaces::All
            }
            (_, Some(_)) => {
                unsupported.push(format!(
                    "{path}.namespaceSelector selects namespaces by label, which cooper does not model"
                ));
                return Ok(None);
            }
            (Some(list), None) if !list.is_empty() => {
                Namespaces::List(list.iter().cloned().collect())
            }
            _ => Namespaces::List(BTreeSet::from([namespace.to_string()])),
        };
        let Some(mut selector) =
            LabelSelector::parse(t.label_selector.as_ref(), &format!("{path}.labelSelector"))
                .map_err(|m| (path.clone(), m))?
        else {
            return Ok(None); // selects no pod: no effect
        };
        for k in t.match_label_keys.iter().flatten() {
            if let Some(v) = labels.get(k) {
                selector.match_labels.insert(k.clone(), v.clone());
            }
        }
        Ok(Some(AffinityTerm {
            selector,
            namespaces,
            topology_key: key,
        }))
    };
    // Pod affinity and anti-affinity have the same shape: required terms (a pod that
    // cannot honour one is not planned) and weighted preferred ones (heaviest first; one
    // cooper cannot model is left out and reported).
    type Terms<'t> = (
        Option<&'t Vec<k8s_openapi::api::core::v1::PodAffinityTerm>>,
        Option<&'t Vec<k8s_openapi::api::core::v1::WeightedPodAffinityTerm>>,
    );
    let both = |(required, preferred): Terms<'_>,
                field: &str,
                unsupported: &mut Vec<String>,
                ignored: &mut Vec<String>|
     -> Result<(Vec<AffinityTerm>, Vec<AffinityTerm>), (String, String)> {
        let mut hard = Vec::new();
        for (i, t) in required.into_iter().flatten().enumerate() {
            let path =
                format!("affinity.{field}.requiredDuringSchedulingIgnoredDuringExecution[{i}]");
            hard.extend(term(t, path, unsupported)?);
        }
        let mut weighted: Vec<_> = preferred.into_iter().flatten().enumerate().collect();
        weighted.sort_by_key(|(i, w)| (-w.weight, *i));
        let mut soft = Vec::new();
        for (i, w) in weighted {
            let path = format!(
                "affinity.{field}.preferredDuringSchedulingIgnoredDuringExecution[{i}].podAffinityTerm"
            );
            soft.extend(term(&w.pod_affinity_term, path, ignored)?);
        }
        Ok((hard, soft))
    };
    if let Some(pa) = affinity.and_then(|a| a.pod_affinity.as_ref()) {
        let terms = (
            pa.required_during_scheduling_ignored_during_execution
                .as_ref(),
            pa.preferred_during_scheduling_ignored_during_execution
                .as_ref(),
        );
        (out.affinity, out.preferred_affinity) =
            both(terms, "podAffinity", &mut unsupported, &mut out.ignored)?;
    }
    if let Some(pa) = affinity.and_then(|a| a.pod_anti_affinity.as_ref()) {
        let terms = (
            pa.required_during_scheduling_ignored_during_execution
                .as_ref(),
            pa.preferred_during_scheduling_ignored_during_execution
                .as_ref(),
        );
        (out.anti_affinity, out.preferred_anti_affinity) =
            both(terms, "podAntiAffinity", &mut unsupported, &mut out.ignored)?;
    }
    if let Some(na) = affinity.and_then(|a| a.node_affinity.as_ref()) {
        let mut preferred: Vec<_> = na
            .preferred_during_scheduling_ignored_during_execution
            .iter()
            .flatten()
            .enumerate()
            .collect();
        preferred.sort_by_key(|(i, w)| (-w.weight, *i));
        for (i, w) in preferred {
            let path = format!(
                "affinity.nodeAffinity.preferredDuringSchedulingIgnoredDuringExecution[{i}].preference"
            );
            if w.preference
                .match_fields
                .as_ref()
                .is_some_and(|f| !f.is_empty())
            {
                // A preference on node names: nothing to honour on new nodes.
                out.ignored.push(format!(
                    "{path}.matchFields prefers nodes by name, which new nodes cannot match"
                ));
                continue;
            }
            let mut reqs = Vec::new();
            for (j, e) in w.preference.match_expressions.iter().flatten().enumerate() {
                let op = Operator::parse(&e.operator).ok_or_else(|| {
                    (
                        format!("{path}.matchExpressions[{j}].operator"),
                        format!("unknown operator {:?}", e.operator),
                    )
                })?;
                reqs.push(
                    Requirement::new(&e.key, op, e.values.clone().unwrap_or_default())
                        .map_err(|m| (format!("{path}.matchExpressions[{j}]"), m))?,
                );
            }
            if !reqs.is_empty() {
                out.preferred_node.push(reqs);
            }
        }
        if let Some(req) = &na.required_during_scheduling_ignored_during_execution
            && req
                .node_selector_terms
                .iter()
                .any(|t| t.match_fields.as_ref().is_some_and(|f| !f.is_empty()))
        {
            unsupported.push(
                "its node affinity uses matchFields (node names), which new nodes cannot satisfy"
                    .into(),
            );
        }
        // kube-scheduler: a term with neither matchExpressions nor matchFields matches
        // no node, so a required affinity made only of such terms can never be met.
        if let Some(req) = &na.required_during_scheduling_ignored_during_execution
            && !req.node_selector_terms.is_empty()
            && req.node_selector_terms.iter().all(|t| {
                t.match_expressions.as_ref().is_none_or(|e| e.is_empty())
                    && t.match_fields.as_ref().is_none_or(|f| f.is_empty())
            })
        {
            unsupported.push(
                "its required node affinity has only empty nodeSelectorTerms, which match no node"
                    .into(),
            );
        }
    }
    for c in spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
    {
        for p in c.ports.iter().flatten() {
            if let Some(port) = p.host_port.filter(|p| *p > 0) {
                let hp = HostPort {
                    protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                    port,
                };
                if !out.host_ports.contains(&hp) {
                    out.host_ports.push(hp);
                }
            }
        }
    }
    if spec.host_network == Some(true) {
        // With host networking every container port is a host port.
        for c in &spec.containers {
            for p in c.ports.iter().flatten() {
                let hp = HostPort {
                    protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                    port: p.container_port,
                };
                if !out.host_ports.contains(&hp) {
                    out.host_ports.push(hp);
                }
            }
        }
    }
    for v in spec.volumes.iter().flatten() {
        if let Some(pvc) = &v.persistent_volume_claim {
            out.claims.push(pvc.claim_name.clone());
        }
        if v.ephemeral.is_some() {
            // A generic ephemeral volume: a PVC named <pod>-<volume>, provisioned for the
            // node the pod lands on; its class's allowed topologies are not known here.
        }
    }
    if !unsupported.is_empty() {
        out.unsupported = Some(unsupported.join("; "));
    }
    Ok(out)
}

/// A PersistentVolumeClaim as volume topology needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct ClaimInfo {
    /// The PV it is bound to.
    pub volume: Option<String>,
    pub storage_class: Option<String>,
}

/// A StorageClass as volume topology needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassInfo {
    pub wait_for_first_consumer: bool,
    /// `allowedTopologies`, as a node selector (empty: anywhere).
    pub allowed: NodeSelector,
    pub default: bool,
}

/// PersistentVolumes, PersistentVolumeClaims and StorageClasses: where a pod's volumes
/// let it run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Volumes {
    /// `namespace/name` → claim.
    pub claims: BTreeMap<String, ClaimInfo>,
    /// PV name → its node affinity (keys canonicalised).
    pub volumes: BTreeMap<String, NodeSelector>,
    pub classes: BTreeMap<String, ClassInfo>,
    /// Whether the input holds PVCs at all: without any (`cooper plan -f` on workloads
    /// alone) a missing claim is assumed to be provisioned where the pod lands.
    pub complete: bool,
}

fn selector_terms(
    terms: &[k8s_openapi::api::core::v1::NodeSelectorTerm],
) -> Result<NodeSelector, String> {
    let mut out = NodeSelector::default();
    for t in terms {
        let mut reqs = Vec::new();
        for e in t.match_expressions.iter().flatten() {
            let op = Operator::parse(&e.operator)
                .ok_or_else(|| format!("unknown operator {:?}", e.operator))?;
            reqs.push(Requirement::new(
                &e.key,
                op,
                e.values.clone().unwrap_or_default(),
            )?);
        }
        out.terms.push(reqs);
    }
    Ok(out)
}

impl Volumes {
    /// Read a PersistentVolume, PersistentVolumeClaim or StorageClass (other kinds are
    /// ignored). Errors are (field path, message).
    pub fn add(&mut self, kind: &str, value: &serde_json::Value) -> Result<(), (String, String)> {
        use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
        use k8s_openapi::api::storage::v1::StorageClass;
        let bad = |e: serde_json::Error| (String::new(), e.to_string());
        match kind {
            "PersistentVolumeClaim" => {
                let pvc: PersistentVolumeClaim =
                    serde_json::from_value(value.clone()).map_err(bad)?;
                let ns = pvc
                    .metadata
                    .namespace
                    .clone()
                    .unwrap_or_else(|| "default".into());
                let name = pvc.metadata.name.clone().unwrap_or_default();
                let spec = pvc.spec.unwrap_or_default();
                self.claims.insert(
                    format!("{ns}/{name}"),
                    ClaimInfo {
                        volume: spec.volume_name.filter(|v| !v.is_empty()),
                        storage_class: spec.storage_class_name,
                    },
                );
                self.complete = true;
            }
            "PersistentVolume" => {
                let pv: PersistentVolume = serde_json::from_value(value.clone()).map_err(bad)?;
                let name = pv.metadata.name.clone().unwrap_or_default();
                let mut selector = match pv
                    .spec
                    .as_ref()
                    .and_then(|s| s.node_affinity.as_ref())
                    .and_then(|a| a.required.as_ref())
                {
                    Some(r) => selector_terms(&r.node_selector_terms)
                        .map_err(|m| ("spec.nodeAffinity.required".to_string(), m))?,
                    None => NodeSelector::default(),
                };
                // The legacy zone label on the volume pins it too.
                for key in [
                    "topology.kubernetes.io/zone",
                    "failure-domain.beta.kubernetes.io/zone",
                ] {
                    if let Some(zone) = pv.metadata.labels.as_ref().and_then(|l| l.get(key)) {
                        selector
                            .match_labels
                            .insert(keys::ZONE.into(), zone.clone());
                    }
                }
                self.volumes.insert(name, selector);
            }
            "StorageClass" => {
                let sc: StorageClass = serde_json::from_value(value.clone()).map_err(bad)?;
                let name = sc.metadata.name.clone().unwrap_or_default();
                let mut allowed = NodeSelector::default();
                for (i, t) in sc.allowed_topologies.iter().flatten().enumerate() {
                    let mut reqs = Vec::new();
                    for e in t.match_label_expressions.iter().flatten() {
                        reqs.push(
                            Requirement::new(&e.key, Operator::In, e.values.clone())
                                .map_err(|m| (format!("allowedTopologies[{i}]"), m))?,
                        );
                    }
                    allowed.terms.push(reqs);
                }
                let default = sc
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get("storageclass.kubernetes.io/is-default-class"))
                    .is_some_and(|v| v == "true");
                self.classes.insert(
                    name,
                    ClassInfo {
                        wait_for_first_consumer: sc.volume_binding_mode.as_deref()
                            == Some("WaitForFirstConsumer"),
                        allowed,
                        default,
                    },
                );
            }
            _ => {}
        }
        Ok(())
    }

    /// Where a volume of this class (not provisioned yet) lets the pod run.
    fn for_class(&self, class: Option<&str>, what: &str) -> Result<NodeSelector, String> {
        let class = match class {
            Some(c) => self.classes.get(c),
            None => self.classes.values().find(|c| c.default),
        };
        match class {
            // Unknown class: provisioned where the pod lands, as far as cooper knows.
            None => Ok(NodeSelector::default()),
            Some(c) if c.wait_for_first_consumer => Ok(c.allowed.clone()),
            Some(_) => Err(format!(
                "{what} is not bound yet and its StorageClass binds immediately: the volume's zone is not known until it is provisioned"
            )),
        }
    }

    /// Where the pod's claims let it run: a node selector to AND with the pod's, or why
    /// it cannot be planned.
    pub fn topology(&self, namespace: &str, claims: &[String]) -> Result<NodeSelector, String> {
        let mut out = NodeSelector::default();
        for claim in claims {
            let key = format!("{namespace}/{claim}");
            let Some(info) = self.claims.get(&key) else {
                if self.complete {
                    return Err(format!("PersistentVolumeClaim {key} does not exist"));
                }
                continue;
            };
            match &info.volume {
                Some(pv) => match self.volumes.get(pv) {
                    Some(sel) => out.and(sel),
                    None if self.complete => {
                        return Err(format!(
                            "PersistentVolume {pv} of claim {key} does not exist"
                        ));
                    }
                    None => {}
                },
                None => {
                    let sel = self.for_class(
                        info.storage_class.as_deref(),
                        &format!("PersistentVolumeClaim {key}"),
                    )?;
                    out.and(&sel);
                }
            }
        }
        Ok(out)
    }

    /// Where a StatefulSet's volume claim template (a claim provisioned for each
    /// replica) lets the pods run.
    pub fn template_topology(
        &self,
        class: Option<&str>,
        what: &str,
    ) -> Result<NodeSelector, String> {
        self.for_class(class, what)
    }
}

/// A pod already bound to a node, as the constraints see it.
#[derive(Debug, Clone, PartialEq)]
pub struct PlacedPod {
    pub namespace: String,
    pub labels: Labels,
    pub node: String,
    /// Its required anti-affinity terms (they keep matching pods away, symmetrically).
    pub anti_affinity: Vec<AffinityTerm>,
    pub host_ports: Vec<HostPort>,
}

impl PlacedPod {
    /// A pod bound to `node`: what of its constraints binds the pods placed after it.
    pub fn new(namespace: String, labels: Labels, node: String, c: &PodConstraints) -> Self {
        PlacedPod {
            namespace,
            labels,
            node,
            anti_affinity: c.anti_affinity.clone(),
            host_ports: c.host_ports.clone(),
        }
    }
}

/// A node as the constraints see it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeView {
    pub name: String,
    pub labels: Labels,
    pub taints: Vec<crate::labels::Taint>,
}

/// The cluster as kube-scheduler's filters see it: nodes and the pods bound to them.
#[derive(Debug, Clone, Default)]
pub struct Cluster {
    pub nodes: Vec<NodeView>,
    pub pods: Vec<PlacedPod>,
}

impl Cluster {
    fn node(&self, name: &str) -> Option<&NodeView> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// The value of a topology key on a node (the hostname is the node's name when not
    /// labelled).
    fn domain<'a>(node: &'a NodeView, key: &str) -> Option<&'a str> {
        if key == keys::HOSTNAME {
            return Some(
                node.labels
                    .get(keys::HOSTNAME)
                    .map(String::as_str)
                    .unwrap_or(node.name.as_str()),
            );
        }
        node.labels.get(key).map(String::as_str)
    }

    /// Would kube-scheduler's filters let this pod (namespace, labels, constraints, and
    /// the selector and tolerations that decide which nodes count for spreading) onto
    /// `node`? The reason when not.
    pub fn admits(
        &self,
        namespace: &str,
        labels: &Labels,
        constraints: &PodConstraints,
        selector: &NodeSelector,
        tolerations: &[crate::labels::Toleration],
        node: &str,
    ) -> Result<(), String> {
        let Some(target) = self.node(node) else {
            return Err(format!("unknown node {node}"));
        };
        // Host ports.
        for hp in &constraints.host_ports {
            if self
                .pods
                .iter()
                .any(|p| p.node == node && p.host_ports.contains(hp))
            {
                return Err(format!("host port {}/{} is taken", hp.port, hp.protocol));
            }
        }
        // Required anti-affinity, both ways.
        for term in &constraints.anti_affinity {
            let Some(d) = Self::domain(target, &term.topology_key) else {
                continue;
            };
            if self.pods.iter().any(|p| {
                term.selects(&p.namespace, &p.labels)
                    && self
                        .node(&p.node)
                        .and_then(|n| Self::domain(n, &term.topology_key))
                        == Some(d)
            }) {
                return Err(format!(
                    "pod anti-affinity on {}: a matching pod runs in {d}",
                    term.topology_key
                ));
            }
        }
        for p in &self.pods {
            for term in &p.anti_affinity {
                if !term.selects(namespace, labels) {
                    continue;
                }
                let (Some(theirs), Some(mine)) = (
                    self.node(&p.node)
                        .and_then(|n| Self::domain(n, &term.topology_key)),
                    Self::domain(target, &term.topology_key),
                ) else {
                    continue;
                };
                if theirs == mine {
                    return Err(format!(
                        "an existing pod's anti-affinity on {} keeps it out of {mine}",
                        term.topology_key
                    ));
                }
            }
        }
        // Required affinity: a matching pod in the same domain (or, as the scheduler
        // allows, none anywhere and the pod matches its own term).
        for term in &constraints.affinity {
            let Some(d) = Self::domain(target, &term.topology_key) else {
                return Err(format!("node has no {} label", term.topology_key));
            };
            let matching: Vec<&PlacedPod> = self
                .pods
                .iter()
                .filter(|p| term.selects(&p.namespace, &p.labels))
                .collect();
            let here = matching.iter().any(|p| {
                self.node(&p.node)
                    .and_then(|n| Self::domain(n, &term.topology_key))
                    == Some(d)
            });
            let first_of_its_kind = matching.is_empty() && term.selects(namespace, labels);
            if !here && !first_of_its_kind {
                return Err(format!(
                    "pod affinity on {}: no matching pod in {d}",
                    term.topology_key
                ));
            }
        }
        // Hard topology spread.
        for c in constraints.spread.iter().filter(|c| c.hard) {
            let Some(d) = Self::domain(target, &c.topology_key) else {
                return Err(format!("node has no {} label", c.topology_key));
            };
            let (counts, eligible) = self.spread_counts(namespace, c, selector, tolerations);
            let mut min = counts.values().copied().min().unwrap_or(0);
            if c.min_domains.is_some_and(|m| (eligible as i32) < m) {
                min = 0;
            }
            let here = counts.get(d).copied().unwrap_or(0);
            if here + 1 - min > c.max_skew as i64 {
                return Err(format!(
                    "topology spread on {}: {d} would have {} matching pods, the least-used domain {min} (maxSkew {})",
                    c.topology_key,
                    here + 1,
                    c.max_skew
                ));
            }
        }
        Ok(())
    }

    /// Matching pods per domain over the nodes that count for a spread constraint, and
    /// how many domains there are.
    pub fn spread_counts(
        &self,
        namespace: &str,
        c: &SpreadConstraint,
        selector: &NodeSelector,
        tolerations: &[crate::labels::Toleration],
    ) -> (BTreeMap<String, i64>, usize) {
        let mut counts: BTreeMap<String, i64> = BTreeMap::new();
        for n in &self.nodes {
            if c.honor_node_affinity && !selector.matches(&n.labels) {
                continue;
            }
            if c.honor_taints && crate::labels::untolerated(tolerations, &n.taints).is_some() {
                continue;
            }
            if let Some(d) = Self::domain(n, &c.topology_key) {
                counts.entry(d.to_string()).or_insert(0);
            }
        }
        for p in &self.pods {
            if p.namespace != namespace || !c.selector.matches(&p.labels) {
                continue;
            }
            let Some(d) = self
                .node(&p.node)
                .and_then(|n| Self::domain(n, &c.topology_key))
            else {
                continue;
            };
            if let Some(count) = counts.get_mut(d) {
                *count += 1;
            }
        }
        let eligible = counts.len();
        (counts, eligible)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn spec(yaml: &str) -> PodSpec {
        serde_saphyr::from_str(yaml).expect("spec")
    }

    #[test]
    fn parses_spread_affinity_ports_and_refuses_what_it_cannot_model() {
        let s = spec(
            r#"
containers:
- name: c
  ports: [{containerPort: 80, hostPort: 80}]
topologySpreadConstraints:
- {maxSkew: 1, topologyKey: topology.kubernetes.io/zone, whenUnsatisfiable: DoNotSchedule,
   labelSelector: {matchLabels: {app: web}}, matchLabelKeys: [pod-template-hash]}
affinity:
  podAntiAffinity:
    requiredDuringSchedulingIgnoredDuringExecution:
    - {topologyKey: kubernetes.io/hostname, labelSelector: {matchLabels: {app: web}}}
"#,
        );
        let c = parse(
            &s,
            "default",
            &labels(&[("app", "web"), ("pod-template-hash", "abc")]),
        )
        .expect("parse");
        assert_eq!(
            c.host_ports,
            [HostPort {
                protocol: "TCP".into(),
                port: 80
            }]
        );
        assert_eq!(c.spread.len(), 1);
        assert_eq!(
            c.spread[0]
                .selector
                .match_labels
                .get("pod-template-hash")
                .map(String::as_str),
            Some("abc")
        );
        assert_eq!(c.anti_affinity[0].topology_key, keys::HOSTNAME);
        assert!(c.unsupported.is_none());

        let dra = spec(
            "containers: [{name: c}]\nresourceClaims: [{name: gpu, resourceClaimName: a100}]\n",
        );
        assert!(
            parse(&dra, "default", &Labels::new())
                .unwrap()
                .unsupported
                .unwrap()
                .contains("DRA")
        );
        let custom = spec(
            "containers: [{name: c}]\ntopologySpreadConstraints: [{maxSkew: 1, topologyKey: rack, whenUnsatisfiable: DoNotSchedule, labelSelector: {}}]\n",
        );
        assert!(
            parse(&custom, "default", &Labels::new())
                .unwrap()
                .unsupported
                .unwrap()
                .contains("rack")
        );
    }

    fn node(name: &str, zone: &str) -> NodeView {
        NodeView {
            name: name.into(),
            labels: labels(&[(keys::ZONE, zone), (keys::HOSTNAME, name)]),
            taints: Vec::new(),
        }
    }

    fn placed(node: &str, app: &str) -> PlacedPod {
        PlacedPod {
            namespace: "default".into(),
            labels: labels(&[("app", app)]),
            node: node.into(),
            anti_affinity: Vec::new(),
            host_ports: Vec::new(),
        }
    }

    #[test]
    fn admits_applies_the_schedulers_filters() {
        let cluster = Cluster {
            nodes: vec![node("a1", "a"), node("a2", "a"), node("b1", "b")],
            pods: vec![placed("a1", "web"), placed("a2", "web")],
        };
        let web = labels(&[("app", "web")]);
        let spread = PodConstraints {
            spread: vec![SpreadConstraint {
                max_skew: 1,
                topology_key: keys::ZONE.into(),
                hard: true,
                min_domains: None,
                selector: LabelSelector {
                    match_labels: web.clone(),
                    expressions: Vec::new(),
                },
                honor_node_affinity: true,
                honor_taints: false,
            }],
            ..Default::default()
        };
        let any = NodeSelector::default();
        assert!(
            cluster
                .admits("default", &web, &spread, &any, &[], "a1")
                .is_err()
        );
        assert!(
            cluster
                .admits("default", &web, &spread, &any, &[], "b1")
                .is_ok()
        );
        let anti = PodConstraints {
            anti_affinity: vec![AffinityTerm {
                selector: LabelSelector {
                    match_labels: web.clone(),
                    expressions: Vec::new(),
                },
                namespaces: Namespaces::List(BTreeSet::from(["default".to_string()])),
                topology_key: keys::HOSTNAME.into(),
            }],
            ..Default::default()
        };
        assert!(
            cluster
                .admits("default", &web, &anti, &any, &[], "a2")
                .is_err()
        );
        assert!(
            cluster
                .admits("default", &web, &anti, &any, &[], "b1")
                .is_ok()
        );
        let mut ports = cluster.clone();
        ports.pods[0].host_ports.push(HostPort {
            protocol: "TCP".into(),
            port: 80,
        });
        let wants = PodConstraints {
            host_ports: vec![HostPort {
                protocol: "TCP".into(),
                port: 80,
            }],
            ..Default::default()
        };
        assert!(
            ports
                .admits("default", &web, &wants, &any, &[], "a1")
                .is_err()
        );
        assert!(
            ports
                .admits("default", &web, &wants, &any, &[], "a2")
                .is_ok()
        );
    }
}
