//! The planner's side of [`crate::scheduling`]: before packing, each pod's scheduling
//! constraints are turned into things the packing already handles exactly, so greedy and
//! optimal honour them alike and every plan stays checkable:
//!
//! - **offering-level topology** (zone, capacity type, instance type, pool, ...):
//!   topology spread, pod affinity and anti-affinity on such a key pin each pod to one
//!   domain (a `key In [value]` requirement), chosen in order as kube-scheduler would
//!   accept them: the least-populated domain for spreading (counting matching pods that
//!   run already and the ones pinned before it), a domain with no matching pod for
//!   anti-affinity, one with a matching pod for affinity;
//! - **per-node rules** (hostname spread and anti-affinity, host ports) become synthetic
//!   resources (`cooper.dev/x-...`): every pod a rule concerns requests one unit, every
//!   node offers as many as the rule allows (1 for anti-affinity and a port, `maxSkew`
//!   for hostname spread), existing nodes less what their running pods already take;
//! - **hostname affinity** to running pods pins the pod to their nodes; a group of
//!   pending pods that must share a node is planned as one bundle;
//! - **preferences** (preferred node affinity, preferred pod (anti-)affinity,
//!   `ScheduleAnyway`) are honoured like requirements when some offering can satisfy
//!   them, and otherwise relaxed, as Karpenter does; each relaxation is reported.
//!
//! What cannot be planned is reported with its reason before packing.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::{ExistingNode, PlanInput};
use crate::labels::{Labels, Layered, NodeSelector, Operator, Requirement, keys, untolerated};
use crate::resources;
use crate::scheduling::{AffinityTerm, PodConstraints, SpreadConstraint};
use crate::workload::PendingPod;

/// Prefix of the synthetic resources per-node rules become.
pub const SYNTHETIC_PREFIX: &str = "cooper.dev/x-";

/// A preference the plan could not honour.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Relaxed {
    pub pod: String,
    pub preference: String,
}

/// The input transformed for packing.
pub(super) struct Prepared {
    pub pods: Vec<PendingPod>,
    pub nodes: Vec<ExistingNode>,
    /// Synthetic resource → units every new node offers.
    pub synthetic: BTreeMap<String, i64>,
    /// Pods refused before packing (key, reason).
    pub refused: Vec<(String, String)>,
    pub relaxed: Vec<Relaxed>,
    /// Bundle key → the pods it stands for.
    pub bundles: BTreeMap<String, Vec<String>>,
}

/// A pod pinned to a domain of an offering-level key during preparation, as later pods'
/// constraints see it.
struct Virtual {
    namespace: String,
    labels: Labels,
    key: String,
    domain: String,
    anti_affinity: Vec<AffinityTerm>,
}

fn stable_hash(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Is this pod's input untouched by constraints (the fast path)?
fn plain(pod: &PendingPod) -> bool {
    pod.constraints.is_none()
}

struct Preparer<'i, 'a> {
    input: &'i PlanInput<'a>,
    /// Cache: (selector, tolerations, key) → the key's values some offering or node
    /// admitting the pod has.
    domains: HashMap<(String, String), BTreeSet<String>>,
    virtuals: Vec<Virtual>,
    /// Indices of the virtuals with anti-affinity terms (the only ones the symmetric
    /// rule looks at).
    anti_virtuals: Vec<usize>,
    /// Matching pods per domain, by (selection, key), kept up to date as pods are
    /// pinned: counting from scratch for every pod made preparation quadratic.
    counted: HashMap<(Selection, String), BTreeMap<String, i64>>,
    /// The pinned pods by label set (one Deployment's replicas share one): a new pin
    /// updates only the counts whose selection takes its label set, found once per
    /// label set rather than matched against every count for every pin.
    label_sets: HashMap<(String, Labels), usize>,
    /// Per label set: pins per (key, domain), and the counts (`counted` keys) that
    /// select it.
    pinned: Vec<LabelSet>,
}

/// Pins of one (namespace, labels), for [`Preparer::counts`].
struct LabelSet {
    namespace: String,
    labels: Labels,
    per_domain: BTreeMap<(String, String), i64>,
    selected_by: Vec<(Selection, String)>,
}

/// Which pods a count looks at: an affinity term's, or a spread constraint's (its
/// selector in the pod's namespace).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Selection {
    Term(AffinityTerm),
    Spread(String, crate::scheduling::LabelSelector),
}

impl Selection {
    fn selects(&self, namespace: &str, labels: &Labels) -> bool {
        match self {
            Selection::Term(t) => t.selects(namespace, labels),
            Selection::Spread(ns, selector) => ns == namespace && selector.matches(labels),
        }
    }
}

impl Preparer<'_, '_> {
    /// The values of an offering-level key on the offerings (with their pools' labels)
    /// and existing nodes this pod could use.
    fn domains(
        &mut self,
        pod: &PendingPod,
        selector: &NodeSelector,
        key: &str,
    ) -> BTreeSet<String> {
        self.domains_where(pod, selector, key, true)
    }

    /// The domains kube-scheduler counts when spreading: those of the nodes that will
    /// exist and match the selector — existing nodes (tainted ones too unless the
    /// constraint honours taints) and the new nodes this pod could use. A zone only
    /// another pool's tainted nodes could reach is not counted up front (counting every
    /// zone any pool offers held spread groups to one pod per usable zone); if the plan
    /// does launch such a node there, the checker sees the skew and the repair step
    /// takes pods back (`repair_spreading`).
    fn eligible_domains(
        &mut self,
        pod: &PendingPod,
        selector: &NodeSelector,
        key: &str,
        honor_taints: bool,
    ) -> BTreeSet<String> {
        let mut out = self.domains(pod, selector, key);
        if !honor_taints {
            for n in self.input.nodes {
                if selector.matches(&n.labels)
                    && let Some(v) = n.labels.get(key)
                {
                    out.insert(v.clone());
                }
            }
        }
        out
    }

    fn domains_where(
        &mut self,
        pod: &PendingPod,
        selector: &NodeSelector,
        key: &str,
        usable: bool,
    ) -> BTreeSet<String> {
        let cache_key = (
            format!(
                "{selector:?}{:?}{usable}{:?}",
                pod.tolerations,
                usable.then_some(&pod.requests)
            ),
            key.to_string(),
        );
        if let Some(d) = self.domains.get(&cache_key) {
            return d.clone();
        }
        let catalog = self.input.catalog;
        let mut out = BTreeSet::new();
        for pool in self.input.pools {
            if usable && untolerated(&pod.tolerations, &pool.taints).is_some() {
                continue;
            }
            for o in &catalog.offerings {
                let t = &catalog.types[o.type_index];
                if pool.unlaunchable.contains(t.name()) {
                    continue;
                }
                let labels = Layered {
                    top: &pool.labels,
                    base: &o.labels,
                };
                if !pool.requirements.iter().all(|r| r.matches(&labels))
                    || !selector.matches(&labels)
                {
                    continue;
                }
                if usable && !pod.requests.fits_in(&t.allocatable) {
                    continue;
                }
                // An offering that just had no capacity is no domain to pin a pod to
                // (the pod would be pinned where nothing can be launched for it).
                if usable
                    && !self.input.unavailable.is_empty()
                    && self.input.unavailable.contains(&super::OfferingKey {
                        instance_type: t.name().to_string(),
                        zone: o.zone.clone(),
                        capacity_type: o.capacity_type,
                    })
                {
                    continue;
                }
                if let Some(v) = crate::labels::LabelLookup::label(&labels, key) {
                    out.insert(v.to_string());
                }
            }
        }
        for n in self.input.nodes {
            // A node is a usable domain only if the pod could run there at all (an
            // in-flight CPU node in us-east-1a is no domain for a Neuron pod).
            if selector.matches(&n.labels)
                && untolerated(&pod.tolerations, &n.taints).is_none()
                && (!usable || pod.requests.fits_in(&n.allocatable))
                && let Some(v) = n.labels.get(key)
            {
                out.insert(v.clone());
            }
        }
        self.domains.insert(cache_key, out.clone());
        out
    }

    /// Pin a pod to a domain: remembered for the constraints of the pods after it.
    fn add_virtual(&mut self, v: Virtual) {
        let set = match self
            .label_sets
            .get(&(v.namespace.clone(), v.labels.clone()))
        {
            Some(&i) => i,
            None => {
                let selected_by = self
                    .counted
                    .keys()
                    .filter(|(selection, _)| selection.selects(&v.namespace, &v.labels))
                    .cloned()
                    .collect();
                self.pinned.push(LabelSet {
                    namespace: v.namespace.clone(),
                    labels: v.labels.clone(),
                    per_domain: BTreeMap::new(),
                    selected_by,
                });
                self.label_sets.insert(
                    (v.namespace.clone(), v.labels.clone()),
                    self.pinned.len() - 1,
                );
                self.pinned.len() - 1
            }
        };
        let entry = &mut self.pinned[set];
        *entry
            .per_domain
            .entry((v.key.clone(), v.domain.clone()))
            .or_default() += 1;
        for count in &entry.selected_by {
            if count.1 == v.key
                && let Some(counts) = self.counted.get_mut(count)
            {
                *counts.entry(v.domain.clone()).or_default() += 1;
            }
        }
        if !v.anti_affinity.is_empty() {
            self.anti_virtuals.push(self.virtuals.len());
        }
        self.virtuals.push(v);
    }

    /// Matching pods per domain of `key`: running pods on existing nodes, and pods
    /// pinned earlier in this preparation.
    fn counts(&mut self, selection: Selection, key: &str) -> BTreeMap<String, i64> {
        let cache_key = (selection, key.to_string());
        if let Some(c) = self.counted.get(&cache_key) {
            return c.clone();
        }
        let selects = |ns: &str, l: &Labels| cache_key.0.selects(ns, l);
        let mut out: BTreeMap<String, i64> = BTreeMap::new();
        let node_labels: HashMap<&str, &Labels> = self
            .input
            .nodes
            .iter()
            .map(|n| (n.name.as_str(), &n.labels))
            .collect();
        for p in self.input.running {
            if !selects(&p.namespace, &p.labels) {
                continue;
            }
            if let Some(d) = node_labels.get(p.node.as_str()).and_then(|l| l.get(key)) {
                *out.entry(d.clone()).or_default() += 1;
            }
        }
        for set in &mut self.pinned {
            if selects(&set.namespace, &set.labels) {
                set.selected_by.push(cache_key.clone());
                for ((k, domain), n) in &set.per_domain {
                    if k == key {
                        *out.entry(domain.clone()).or_default() += n;
                    }
                }
            }
        }
        self.counted.insert(cache_key, out.clone());
        out
    }

    /// Domains where a running or pinned pod's anti-affinity (on `key`) keeps this pod
    /// out.
    fn forbidden_by_others(&self, pod: &PendingPod, key: &str) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        let node_labels: HashMap<&str, &Labels> = self
            .input
            .nodes
            .iter()
            .map(|n| (n.name.as_str(), &n.labels))
            .collect();
        for p in self.input.running {
            for t in &p.anti_affinity {
                if t.topology_key == key
                    && t.selects(&pod.namespace, &pod.labels)
                    && let Some(d) = node_labels.get(p.node.as_str()).and_then(|l| l.get(key))
                {
                    out.insert(d.clone());
                }
            }
        }
        for v in self.anti_virtuals.iter().map(|&i| &self.virtuals[i]) {
            for t in &v.anti_affinity {
                if t.topology_key == key && v.key == key && t.selects(&pod.namespace, &pod.labels) {
                    out.insert(v.domain.clone());
                }
            }
        }
        out
    }

    /// `key NotIn [domains]` for every domain where a running pod's (or a pod pinned
    /// earlier's) required anti-affinity selects this pod: the scheduler's symmetric rule.
    fn kept_out_by_others(&self, pod: &PendingPod) -> Vec<Requirement> {
        let mut by_key: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let node_labels: HashMap<&str, &ExistingNode> = self
            .input
            .nodes
            .iter()
            .map(|n| (n.name.as_str(), n))
            .collect();
        for p in self.input.running {
            for t in &p.anti_affinity {
                if !t.selects(&pod.namespace, &pod.labels) {
                    continue;
                }
                let Some(node) = node_labels.get(p.node.as_str()) else {
                    continue;
                };
                let domain = if t.topology_key == keys::HOSTNAME {
                    node.labels
                        .get(keys::HOSTNAME)
                        .cloned()
                        .unwrap_or_else(|| node.name.clone())
                } else {
                    match node.labels.get(&t.topology_key) {
                        Some(d) => d.clone(),
                        None => continue,
                    }
                };
                by_key
                    .entry(t.topology_key.clone())
                    .or_default()
                    .insert(domain);
            }
        }
        for v in self.anti_virtuals.iter().map(|&i| &self.virtuals[i]) {
            for t in &v.anti_affinity {
                if t.topology_key == v.key && t.selects(&pod.namespace, &pod.labels) {
                    by_key
                        .entry(v.key.clone())
                        .or_default()
                        .insert(v.domain.clone());
                }
            }
        }
        by_key
            .into_iter()
            .filter_map(|(k, d)| {
                Requirement::new(&k, Operator::NotIn, d.into_iter().collect()).ok()
            })
            .collect()
    }

    /// Pin the pod to one domain of `key` satisfying its offering-level constraints on
    /// that key (spread, affinity, anti-affinity; preferences only if `strict` allows),
    /// or say why none does.
    fn pin<'c>(
        &mut self,
        pod: &PendingPod,
        selector: &NodeSelector,
        c: &'c PodConstraints,
        key: &str,
        with_preferences: bool,
    ) -> Result<Option<String>, String> {
        let mut allowed = self.domains(pod, selector, key);
        if allowed.is_empty() {
            let without_others = self.domains(pod, &pod.selector, key);
            if !without_others.is_empty() {
                return Err(format!(
                    "pod anti-affinity on {key}: every {key} it may use already holds a matching pod"
                ));
            }
            return Ok(None); // no offering at all: the packing will say why
        }
        for d in self.forbidden_by_others(pod, key) {
            allowed.remove(&d);
        }
        // Required terms, and the preferred ones too while preferences are honoured.
        let on_key = |required: &'c [AffinityTerm], preferred: &'c [AffinityTerm]| {
            required
                .iter()
                .chain(with_preferences.then_some(preferred).into_iter().flatten())
                .filter(|t| t.topology_key == key)
                .collect::<Vec<&AffinityTerm>>()
        };
        let anti = on_key(&c.anti_affinity, &c.preferred_anti_affinity);
        for t in &anti {
            let counts = self.counts(Selection::Term((*t).clone()), key);
            allowed.retain(|d| counts.get(d).copied().unwrap_or(0) == 0);
        }
        let affinity = on_key(&c.affinity, &c.preferred_affinity);
        for t in &affinity {
            let counts = self.counts(Selection::Term((*t).clone()), key);
            let with: BTreeSet<String> = counts
                .into_iter()
                .filter(|(_, n)| *n > 0)
                .map(|(d, _)| d)
                .collect();
            if with.is_empty() {
                if !t.selects(&pod.namespace, &pod.labels) {
                    return Err(format!(
                        "pod affinity on {key}: no pod it must run beside is placed yet"
                    ));
                }
                // The first of its kind may go anywhere; the rest follow it.
            } else {
                allowed.retain(|d| with.contains(d));
            }
        }
        if allowed.is_empty() {
            return Err(format!(
                "no {key} satisfies its pod affinity and anti-affinity"
            ));
        }
        // Spreading: the least-populated allowed domain (the eligible domains for the
        // skew are all those the pod could use).
        let spread: Vec<&SpreadConstraint> = c
            .spread
            .iter()
            .filter(|s| s.topology_key == key && (s.hard || with_preferences))
            .collect();
        let mut best: Option<(i64, String)> = None;
        for d in &allowed {
            let mut score = 0i64;
            for s in &spread {
                let anywhere = NodeSelector::default();
                let eligible_on = if s.honor_node_affinity {
                    selector
                } else {
                    &anywhere
                };
                let eligible = self.eligible_domains(pod, eligible_on, key, s.honor_taints);
                let counts = self.counts(
                    Selection::Spread(pod.namespace.clone(), s.selector.clone()),
                    key,
                );
                let here = counts.get(d).copied().unwrap_or(0);
                let mut min = eligible
                    .iter()
                    .map(|e| counts.get(e).copied().unwrap_or(0))
                    .min()
                    .unwrap_or(0);
                if s.min_domains.is_some_and(|m| (eligible.len() as i32) < m) {
                    min = 0;
                }
                if here + 1 - min > i64::from(s.max_skew) {
                    score = i64::MAX;
                    break;
                }
                score = score.max(here);
            }
            if score == i64::MAX {
                continue;
            }
            if best.as_ref().is_none_or(|(b, _)| score < *b) {
                best = Some((score, d.clone()));
            }
        }
        match best {
            Some((_, d)) => Ok(Some(d)),
            None => Err(format!(
                "topology spread on {key}: every domain it may use is at its maxSkew"
            )),
        }
    }
}

/// Turn the input's constraints into pins, synthetic resources and bundles.
pub(super) fn prepare(input: &PlanInput<'_>) -> Prepared {
    let mut out = Prepared {
        pods: Vec::with_capacity(input.pods.len()),
        nodes: input
            .nodes
            .iter()
            .map(|n| {
                // Every node is its own hostname domain, labelled or not.
                let mut n = n.clone();
                n.labels
                    .entry(keys::HOSTNAME.to_string())
                    .or_insert_with(|| n.name.clone());
                n
            })
            .collect(),
        synthetic: BTreeMap::new(),
        refused: Vec::new(),
        relaxed: Vec::new(),
        bundles: BTreeMap::new(),
    };
    if input.pods.iter().all(plain) && input.running.iter().all(|p| p.anti_affinity.is_empty()) {
        out.pods = input.pods.to_vec();
        return out;
    }
    let mut prep = Preparer {
        input,
        domains: HashMap::new(),
        virtuals: Vec::new(),
        anti_virtuals: Vec::new(),
        counted: HashMap::new(),
        label_sets: HashMap::new(),
        pinned: Vec::new(),
    };
    // Per-node rules, by synthetic resource: who requests it and what it allows.
    struct Rule {
        cap: i64,
        /// Units running pods already take, by node.
        taken: BTreeMap<String, i64>,
    }
    let mut rules: BTreeMap<String, Rule> = BTreeMap::new();
    // Rules whose selected pods have been given their units already.
    let mut marked: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut requests: Vec<BTreeSet<String>> = vec![BTreeSet::new(); input.pods.len()];
    let node_of = |name: &str| input.nodes.iter().find(|n| n.name == name);
    let mut pods: Vec<Option<PendingPod>> = vec![None; input.pods.len()];
    // Pending pods by (namespace, labels): a rule's selector is matched once per label
    // set, not once per pod (375 rules × 50,000 pods in the constrained benchmark).
    let label_sets: Vec<((&str, &Labels), Vec<usize>)> = {
        let mut index: HashMap<(&str, &Labels), usize> = HashMap::new();
        let mut sets: Vec<((&str, &Labels), Vec<usize>)> = Vec::new();
        for (j, other) in input.pods.iter().enumerate() {
            let key = (other.namespace.as_str(), &other.labels);
            let k = *index.entry(key).or_insert_with(|| {
                sets.push((key, Vec::new()));
                sets.len() - 1
            });
            sets[k].1.push(j);
        }
        sets
    };
    let selected = |matches: &dyn Fn(&str, &Labels) -> bool| -> Vec<usize> {
        label_sets
            .iter()
            .filter(|((ns, labels), _)| matches(ns, labels))
            .flat_map(|(_, members)| members.iter().copied())
            .collect()
    };
    // Hostname affinity groups of pending pods (bundles): term → member indices.
    let mut bundle_groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    // Constrained pods first, so the pods they keep away are known when the others come.
    let order: Vec<usize> = (0..input.pods.len())
        .filter(|&i| !plain(&input.pods[i]))
        .chain((0..input.pods.len()).filter(|&i| plain(&input.pods[i])))
        .collect();
    for i in order {
        let pod = &input.pods[i];
        let Some(c) = pod.constraints.as_deref() else {
            let mut p = pod.clone();
            for r in prep.kept_out_by_others(pod) {
                p.selector.require(r);
            }
            pods[i] = Some(p);
            continue;
        };
        if let Some(reason) = &c.unsupported {
            out.refused
                .push((pod.key(), format!("cannot be planned: {reason}")));
            continue;
        }
        // Preferences cooper cannot model: planned without them, and said so.
        out.relaxed.extend(c.ignored.iter().map(|why| Relaxed {
            pod: pod.key(),
            preference: format!("not modelled: {why}"),
        }));
        let mut selector = pod.selector.clone();
        // Preferred node affinity: the heaviest term some offering satisfies (lighter
        // terms would only break ties among what it allows).
        for term in &c.preferred_node {
            let mut with = selector.clone();
            with.and(&NodeSelector {
                match_labels: Labels::new(),
                terms: vec![term.clone()],
            });
            // Some offering or node satisfies it (every offering has a zone).
            if !prep.domains(pod, &with, keys::ZONE).is_empty() {
                selector = with;
                break;
            }
            out.relaxed.push(Relaxed {
                pod: pod.key(),
                preference: format!(
                    "preferred node affinity {}",
                    term.iter()
                        .map(|r| r.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
        }
        // Running (and already pinned) pods whose anti-affinity selects this one: before
        // its own pins, which its own anti-affinity must not count against it.
        for r in prep.kept_out_by_others(pod) {
            selector.require(r);
        }
        // Offering-level keys: pin a domain per key the constraints name.
        let mut level_keys: BTreeSet<String> = BTreeSet::new();
        for s in &c.spread {
            level_keys.insert(s.topology_key.clone());
        }
        for t in c
            .affinity
            .iter()
            .chain(&c.anti_affinity)
            .chain(&c.preferred_affinity)
            .chain(&c.preferred_anti_affinity)
        {
            level_keys.insert(t.topology_key.clone());
        }
        level_keys.remove(keys::HOSTNAME);
        let mut refused = None;
        for key in &level_keys {
            let pinned = match prep.pin(pod, &selector, c, key, true) {
                Ok(p) => Ok(p),
                Err(soft_reason) => {
                    // Without the preferences, if any were in play.
                    let had_preferences =
                        c.spread.iter().any(|s| !s.hard && &s.topology_key == key)
                            || c.preferred_affinity
                                .iter()
                                .chain(&c.preferred_anti_affinity)
                                .any(|t| &t.topology_key == key);
                    if had_preferences {
                        let r = prep.pin(pod, &selector, c, key, false);
                        if r.is_ok() {
                            out.relaxed.push(Relaxed {
                                pod: pod.key(),
                                preference: format!("preferred spreading or pod (anti-)affinity on {key} ({soft_reason})"),
                            });
                        }
                        r
                    } else {
                        Err(soft_reason)
                    }
                }
            };
            match pinned {
                Ok(Some(domain)) => {
                    if let Ok(r) = Requirement::new(key, Operator::In, vec![domain.clone()]) {
                        selector.require(r);
                    }
                    prep.add_virtual(Virtual {
                        namespace: pod.namespace.clone(),
                        labels: pod.labels.clone(),
                        key: key.clone(),
                        domain,
                        anti_affinity: c.anti_affinity.clone(),
                    });
                }
                Ok(None) => {
                    // Nothing the pod could use has the key: nodes without it are out
                    // (the scheduler's filter needs the label), so the packing reports it.
                    if let Ok(r) = Requirement::new(key, Operator::Exists, Vec::new()) {
                        selector.require(r);
                    }
                }
                Err(reason) => {
                    refused = Some(reason);
                    break;
                }
            }
        }
        if let Some(reason) = refused {
            out.refused.push((pod.key(), reason));
            continue;
        }
        // Per-node rules.
        for hp in &c.host_ports {
            let name = format!(
                "{SYNTHETIC_PREFIX}port-{}-{}",
                hp.protocol.to_ascii_lowercase(),
                hp.port
            );
            rules.entry(name.clone()).or_insert_with(|| Rule {
                cap: 1,
                taken: input
                    .running
                    .iter()
                    .filter(|p| p.host_ports.contains(hp))
                    .map(|p| (p.node.clone(), 1))
                    .collect(),
            });
            requests[i].insert(name);
        }
        let hostname_terms = c
            .anti_affinity
            .iter()
            .chain(&c.preferred_anti_affinity)
            .filter(|t| t.topology_key == keys::HOSTNAME);
        for t in hostname_terms {
            let name = format!(
                "{SYNTHETIC_PREFIX}anti-{:016x}",
                stable_hash(&format!("{t:?}"))
            );
            rules.entry(name.clone()).or_insert_with(|| {
                let mut taken = BTreeMap::new();
                for p in input.running {
                    if t.selects(&p.namespace, &p.labels) {
                        *taken.entry(p.node.clone()).or_default() += 1;
                    }
                }
                Rule { cap: 1, taken }
            });
            requests[i].insert(name.clone());
            // Every pod the term selects takes a unit too (once per rule: the name is
            // the term's, so the same pods).
            if marked.insert(name.clone()) {
                for j in selected(&|ns, labels| t.selects(ns, labels)) {
                    if j != i {
                        requests[j].insert(name.clone());
                    }
                }
            }
        }
        for s in c.spread.iter().filter(|s| s.topology_key == keys::HOSTNAME) {
            let name = format!(
                "{SYNTHETIC_PREFIX}spread-{:016x}",
                stable_hash(&format!("{}{s:?}", pod.namespace))
            );
            rules.entry(name.clone()).or_insert_with(|| {
                let mut taken = BTreeMap::new();
                for p in input.running {
                    if p.namespace == pod.namespace && s.selector.matches(&p.labels) {
                        *taken.entry(p.node.clone()).or_default() += 1;
                    }
                }
                Rule {
                    cap: i64::from(s.max_skew),
                    taken,
                }
            });
            if marked.insert(name.clone()) {
                for j in selected(&|ns, labels| ns == pod.namespace && s.selector.matches(labels)) {
                    requests[j].insert(name.clone());
                }
            }
            requests[i].insert(name);
        }
        // Hostname affinity: beside running pods (their nodes), or as a bundle.
        for t in c
            .affinity
            .iter()
            .filter(|t| t.topology_key == keys::HOSTNAME)
        {
            let hosts: BTreeSet<String> = input
                .running
                .iter()
                .filter(|p| t.selects(&p.namespace, &p.labels))
                .filter(|p| node_of(&p.node).is_some())
                .map(|p| p.node.clone())
                .collect();
            if !hosts.is_empty() {
                let hostnames: Vec<String> = hosts
                    .iter()
                    .filter_map(|h| node_of(h))
                    .map(|n| {
                        n.labels
                            .get(keys::HOSTNAME)
                            .cloned()
                            .unwrap_or_else(|| n.name.clone())
                    })
                    .collect();
                if let Ok(r) = Requirement::new(keys::HOSTNAME, Operator::In, hostnames) {
                    selector.require(r);
                }
            } else if t.selects(&pod.namespace, &pod.labels) {
                bundle_groups
                    .entry(format!("{}{t:?}", pod.namespace))
                    .or_default()
                    .push(i);
            } else {
                refused = Some(format!(
                    "pod affinity on {}: no pod it must run beside is placed yet",
                    keys::HOSTNAME
                ));
            }
        }
        if let Some(reason) = refused {
            out.refused.push((pod.key(), reason));
            continue;
        }
        let mut p = pod.clone();
        p.selector = selector;
        pods[i] = Some(p);
    }
    // Synthetic requests on the pods, capacity on the nodes.
    for (i, names) in requests.iter().enumerate() {
        if let Some(Some(p)) = pods.get_mut(i) {
            for n in names {
                p.requests.set(n.clone(), 1);
            }
        }
    }
    for (name, rule) in &rules {
        out.synthetic.insert(name.clone(), rule.cap);
        for n in &mut out.nodes {
            let taken = rule.taken.get(&n.name).copied().unwrap_or(0);
            n.allocatable.set(name.clone(), (rule.cap - taken).max(0));
        }
    }
    // Bundles: a group that must share a node is one pod to the packing.
    let mut bundled: BTreeSet<usize> = BTreeSet::new();
    for members in bundle_groups.values() {
        let live: Vec<usize> = members
            .iter()
            .copied()
            .filter(|&m| pods[m].is_some() && !bundled.contains(&m))
            .collect();
        if live.len() < 2 {
            continue;
        }
        let Some(first) = pods[live[0]].clone() else {
            continue;
        };
        let mut bundle = first.clone();
        bundle.name = format!("{}+{}", first.name, live.len() - 1);
        bundle.requests = resources::Resources::new();
        for &m in &live {
            if let Some(p) = &pods[m] {
                bundle.requests.add_all(&p.requests);
                bundle.priority = bundle.priority.max(p.priority);
            }
        }
        let keys: Vec<String> = live
            .iter()
            .filter_map(|&m| pods[m].as_ref().map(|p| p.key()))
            .collect();
        out.bundles.insert(bundle.key(), keys);
        for &m in &live {
            bundled.insert(m);
            pods[m] = None;
        }
        out.pods.push(bundle);
    }
    out.pods.extend(pods.into_iter().flatten());
    out
}

/// Synthetic resources are the planner's bookkeeping, not what a node runs.
pub(super) fn strip_synthetic(r: &resources::Resources) -> resources::Resources {
    let mut out = resources::Resources::new();
    for (k, v) in r.iter() {
        if !k.starts_with(SYNTHETIC_PREFIX) {
            out.set(k.to_string(), v);
        }
    }
    out
}
