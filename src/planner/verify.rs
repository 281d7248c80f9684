//! An independent check of a plan against its input, written without the planner's
//! data structures: every pod placed exactly once or reported, no node over its
//! allocatable in any resource, selectors / affinity / tolerations / pool
//! requirements honoured, NodePool limits respected, gangs whole and in one zone, and
//! kube-scheduler's inter-pod rules (required pod affinity and anti-affinity both ways,
//! hard topology spread, host ports) hold for every placed pod in the resulting cluster.

use std::collections::{BTreeMap, BTreeSet};

use super::{OfferingKey, Plan, PlanInput};
use crate::labels::{Labels, keys};
use crate::resources::Resources;

/// Everything wrong with `plan`; empty when it is sound.
pub fn verify(input: &PlanInput<'_>, plan: &Plan) -> Vec<String> {
    let mut errors = Vec::new();
    let pods: BTreeMap<String, &crate::workload::PendingPod> =
        input.pods.iter().map(|p| (p.key(), p)).collect();
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    let mut pod_zone: BTreeMap<&str, String> = BTreeMap::new();

    let mut pool_usage: BTreeMap<&str, Resources> = BTreeMap::new();
    for n in input.nodes {
        if let Some(pool) = &n.nodepool {
            let e = pool_usage.entry(pool.as_str()).or_default();
            *e = e.plus(&n.capacity);
        }
    }

    let mut total = 0.0;
    for node in &plan.nodes {
        total += node.cost_per_hour();
        let Some(pool) = input.pools.iter().find(|p| p.name == node.nodepool) else {
            errors.push(format!("{}: unknown nodepool {}", node.name, node.nodepool));
            continue;
        };
        let charges = input.catalog.node_charges(&pool.billing).total();
        if (charges - node.node_cost_per_hour).abs() > 1e-6 {
            errors.push(format!(
                "{}: per-node cost {} differs from its pool's {charges}",
                node.name, node.node_cost_per_hour
            ));
        }
        let catalog = input.catalog;
        let Some(t) = catalog.instance_type(&node.instance_type) else {
            errors.push(format!(
                "{}: unknown instance type {}",
                node.name, node.instance_type
            ));
            continue;
        };
        let Some(off) = catalog.offering(&node.instance_type, &node.zone, node.capacity_type)
        else {
            errors.push(format!(
                "{}: no offering {} {} {}",
                node.name, node.instance_type, node.zone, node.capacity_type
            ));
            continue;
        };
        if (off.price - node.price_per_hour).abs() > 1e-9 {
            errors.push(format!(
                "{}: price {} differs from the catalog's {}",
                node.name, node.price_per_hour, off.price
            ));
        }
        if input.unavailable.contains(&OfferingKey {
            instance_type: node.instance_type.clone(),
            zone: node.zone.clone(),
            capacity_type: node.capacity_type,
        }) {
            errors.push(format!("{}: offering is marked unavailable", node.name));
        }
        let mut labels: Labels = catalog.offering_labels(off).clone();
        labels.extend(pool.labels.clone());
        if pool.unlaunchable.contains(&node.instance_type) {
            errors.push(format!(
                "{}: nodepool {}'s NodeClass cannot launch {}",
                node.name, pool.name, node.instance_type
            ));
        }
        if let Some(r) = pool.first_rejection(&labels) {
            errors.push(format!(
                "{}: nodepool {} requirement {r} not met by {}",
                node.name, pool.name, node.instance_type
            ));
        }
        let e = pool_usage.entry(pool.name.as_str()).or_default();
        *e = e.plus(&t.capacity);

        let mut used = super::daemonset_overhead(input.daemonsets, &labels, &pool.taints);
        for key in &node.pods {
            *seen.entry(key.as_str()).or_default() += 1;
            pod_zone.insert(key.as_str(), node.zone.clone());
            let Some(pod) = pods.get(key) else {
                errors.push(format!("{}: unknown pod {key}", node.name));
                continue;
            };
            if let Some(m) = pod.selector.first_mismatch(&labels) {
                errors.push(format!("{key} on {}: {m} not satisfied", node.name));
            }
            if let Some(t) = crate::labels::untolerated(&pod.tolerations, &pool.taints) {
                errors.push(format!("{key} on {}: taint {t} not tolerated", node.name));
            }
            used.add_all(&pod.requests);
        }
        if let Some((name, want, have)) = used.first_excess(&t.allocatable) {
            errors.push(format!(
                "{}: {name} requested {want} exceeds allocatable {have}",
                node.name
            ));
        }
    }
    if (total - plan.total_price_per_hour).abs() > 1e-4 {
        errors.push(format!(
            "total price {} is not the sum of node prices {total}",
            plan.total_price_per_hour
        ));
    }

    for placement in &plan.existing_nodes {
        let Some(node) = input.nodes.iter().find(|n| n.name == placement.node) else {
            errors.push(format!("unknown existing node {}", placement.node));
            continue;
        };
        let mut used = node.requested.clone();
        for key in &placement.pods {
            *seen.entry(key.as_str()).or_default() += 1;
            if let Some(z) = node.labels.get(keys::ZONE) {
                pod_zone.insert(key.as_str(), z.clone());
            }
            let Some(pod) = pods.get(key) else {
                errors.push(format!("{}: unknown pod {key}", node.name));
                continue;
            };
            if !pod.fits_node(&node.labels, &node.taints) {
                errors.push(format!(
                    "{key} on existing {}: selector or taints not satisfied",
                    node.name
                ));
            }
            used.add_all(&pod.requests);
        }
        if let Some((name, want, have)) = used.first_excess(&node.allocatable) {
            errors.push(format!(
                "existing {}: {name} requested {want} exceeds allocatable {have}",
                node.name
            ));
        }
    }

    for u in &plan.unschedulable {
        *seen.entry(u.pod.as_str()).or_default() += 1;
        if u.reason.trim().is_empty() {
            errors.push(format!("{}: unschedulable without a reason", u.pod));
        }
    }
    for key in pods.keys() {
        match seen.get(key.as_str()) {
            None => errors.push(format!("{key}: neither placed nor reported")),
            Some(1) => {}
            Some(n) => errors.push(format!("{key}: appears {n} times")),
        }
    }

    for pool in input.pools {
        let used = pool_usage
            .get(pool.name.as_str())
            .cloned()
            .unwrap_or_default();
        // Existing nodes may already be over a lowered limit; only new nodes count.
        let existing = |name: &str| -> i64 {
            input
                .nodes
                .iter()
                .filter(|n| n.nodepool.as_deref() == Some(&pool.name))
                .map(|n| n.capacity.get(name))
                .sum()
        };
        for name in &pool.zero_limits {
            if used.get(name) > existing(name) {
                errors.push(format!(
                    "nodepool {}: {name} {} exceeds limit 0",
                    pool.name,
                    used.get(name)
                ));
            }
        }
        for (name, limit) in pool.limits.iter() {
            if used.get(name) > limit.max(existing(name)) {
                errors.push(format!(
                    "nodepool {}: {name} {} exceeds limit {limit}",
                    pool.name,
                    used.get(name)
                ));
            }
        }
    }

    errors.extend(scheduling_errors(input, plan).into_iter().map(|(_, e)| e));

    let unschedulable: BTreeSet<&str> = plan.unschedulable.iter().map(|u| u.pod.as_str()).collect();
    for gang in input.gangs {
        let members: Vec<&str> = input
            .pods
            .iter()
            .filter(|p| p.gang.as_deref() == Some(&gang.name))
            .map(|p| {
                pods.get_key_value(&p.key())
                    .map(|(k, _)| k.as_str())
                    .unwrap_or("")
            })
            .collect();
        let placed = members
            .iter()
            .filter(|m| !unschedulable.contains(*m))
            .count();
        if placed != 0 && placed != members.len() {
            errors.push(format!(
                "gang {}: {placed} of {} pods placed",
                gang.name,
                members.len()
            ));
        }
        if placed != 0 && (placed as u32) < gang.min_member {
            errors.push(format!(
                "gang {}: {placed} placed, below minMember {}",
                gang.name, gang.min_member
            ));
        }
        let zones: BTreeSet<&String> = members.iter().filter_map(|m| pod_zone.get(m)).collect();
        if zones.len() > 1 {
            errors.push(format!("gang {} spans zones {zones:?}", gang.name));
        }
    }
    errors
}

/// The cluster the plan makes (existing nodes with their running pods, plus the new nodes
/// with their planned pods), checked with kube-scheduler's rules as if each pod were the
/// last one bound: required anti-affinity (from every owner's side, running pods
/// included, so both directions), required affinity, hard spreading (a balanced end state
/// passes; an unbalanced one fails on the pods of its fullest domain), host ports.
/// Counts are taken once per rule, so this stays linear in the pods.
pub(super) fn scheduling_errors(
    input: &PlanInput<'_>,
    plan: &Plan,
) -> Vec<(Option<String>, String)> {
    use crate::scheduling::{AffinityTerm, HostPort};
    use std::collections::HashMap;
    if !input.pods.iter().any(|p| p.constraints.is_some()) {
        return Vec::new();
    }
    let catalog = input.catalog;
    // Node labels (hostname = the node's name for new nodes) and taints.
    let mut nodes: HashMap<&str, (Labels, Vec<crate::labels::Taint>)> = input
        .nodes
        .iter()
        .map(|n| (n.name.as_str(), (n.labels.clone(), n.taints.clone())))
        .collect();
    for node in &plan.nodes {
        let Some(off) = catalog.offering(&node.instance_type, &node.zone, node.capacity_type)
        else {
            continue;
        };
        let pool = input.pools.iter().find(|p| p.name == node.nodepool);
        let mut labels: Labels = catalog.offering_labels(off).clone();
        if let Some(p) = pool {
            labels.extend(p.labels.clone());
        }
        labels.insert(keys::HOSTNAME.into(), node.name.clone());
        nodes.insert(
            node.name.as_str(),
            (labels, pool.map(|p| p.taints.clone()).unwrap_or_default()),
        );
    }
    let domain = |node: &str, key: &str| -> Option<String> {
        let (labels, _) = nodes.get(node)?;
        if key == keys::HOSTNAME {
            return Some(labels.get(key).cloned().unwrap_or_else(|| node.to_string()));
        }
        labels.get(key).cloned()
    };
    // Every placed pod: (namespace, labels, node, anti-affinity, ports, the pending pod).
    struct Placed<'p> {
        namespace: &'p str,
        labels: &'p Labels,
        node: &'p str,
        anti: &'p [AffinityTerm],
        ports: &'p [HostPort],
        pending: Option<&'p crate::workload::PendingPod>,
    }
    let pods: BTreeMap<String, &crate::workload::PendingPod> =
        input.pods.iter().map(|p| (p.key(), p)).collect();
    let mut placed: Vec<Placed<'_>> = input
        .running
        .iter()
        .map(|p| Placed {
            namespace: &p.namespace,
            labels: &p.labels,
            node: &p.node,
            anti: &p.anti_affinity,
            ports: &p.host_ports,
            pending: None,
        })
        .collect();
    let placements = plan.nodes.iter().map(|n| (n.name.as_str(), &n.pods)).chain(
        plan.existing_nodes
            .iter()
            .map(|e| (e.node.as_str(), &e.pods)),
    );
    for (node, keys) in placements {
        for key in keys {
            let Some(pod) = pods.get(key) else { continue };
            let c = pod.constraints();
            placed.push(Placed {
                namespace: &pod.namespace,
                labels: &pod.labels,
                node,
                anti: &c.anti_affinity,
                ports: &c.host_ports,
                pending: Some(pod),
            });
        }
    }
    // Placed pods with the same namespace and labels (a Deployment's replicas) are
    // matched once: (all per node, the plan's per node).
    type PerNode<'p> = HashMap<&'p str, usize>;
    let mut groups: HashMap<(&str, &Labels), (PerNode<'_>, PerNode<'_>)> = HashMap::new();
    for q in &placed {
        let (all, pending) = groups.entry((q.namespace, q.labels)).or_default();
        *all.entry(q.node).or_default() += 1;
        if q.pending.is_some() {
            *pending.entry(q.node).or_default() += 1;
        }
    }
    let mut errors = Vec::new();
    let name = |p: &Placed<'_>| {
        p.pending
            .map(|x| x.key())
            .unwrap_or_else(|| format!("{} pod on {}", p.namespace, p.node))
    };
    // Host ports.
    let mut ports: HashMap<(&str, &HostPort), usize> = HashMap::new();
    for p in &placed {
        for hp in p.ports {
            *ports.entry((p.node, hp)).or_default() += 1;
        }
    }
    for ((node, hp), n) in &ports {
        if *n > 1 {
            errors.push((
                None,
                format!(
                    "{node}: {n} pods bind host port {}/{}",
                    hp.port, hp.protocol
                ),
            ));
        }
    }
    // Matching pods per domain of a term (only the plan's pods, for a running owner:
    // what running pods do to each other is the cluster's doing, not the plan's).
    let term_counts = |t: &AffinityTerm, pending_only: bool| -> HashMap<String, usize> {
        let mut out: HashMap<String, usize> = HashMap::new();
        for ((namespace, labels), (all, pending)) in &groups {
            if !t.selects(namespace, labels) {
                continue;
            }
            for (node, n) in if pending_only { pending } else { all } {
                if let Some(d) = domain(node, &t.topology_key) {
                    *out.entry(d).or_default() += n;
                }
            }
        }
        out
    };
    let mut anti_cache: HashMap<(&AffinityTerm, bool), HashMap<String, usize>> = HashMap::new();
    for p in &placed {
        let running = p.pending.is_none();
        for t in p.anti {
            let counts = anti_cache
                .entry((t, running))
                .or_insert_with(|| term_counts(t, running));
            let Some(d) = domain(p.node, &t.topology_key) else {
                continue;
            };
            let me = usize::from(!running && t.selects(p.namespace, p.labels));
            if counts.get(&d).copied().unwrap_or(0) > me {
                errors.push((
                    p.pending.map(|x| x.key()),
                    format!(
                        "{} on {}: pod anti-affinity on {}: a matching pod runs in {d}",
                        name(p),
                        p.node,
                        t.topology_key
                    ),
                ));
            }
        }
    }
    // Matching pods per domain, by (namespace, selector, key); the domains a pod's
    // spread counts, by (its node selector and tolerations, the policies, key); and
    // the two together with their minimum.
    type Counts = HashMap<String, i64>;
    let mut matching: HashMap<(&str, &crate::scheduling::LabelSelector, &str), Counts> =
        HashMap::new();
    type EligibleKey<'k> = (
        &'k crate::labels::NodeSelector,
        &'k [crate::labels::Toleration],
        bool,
        bool,
        &'k str,
    );
    let mut eligible_cache: HashMap<EligibleKey<'_>, BTreeSet<String>> = HashMap::new();
    let mut spread_cache: HashMap<
        (EligibleKey<'_>, &str, &crate::scheduling::LabelSelector),
        (Counts, i64, usize),
    > = HashMap::new();
    for p in &placed {
        let Some(pod) = p.pending else { continue };
        let c = pod.constraints();
        for t in &c.affinity {
            let counts = term_counts(t, false);
            let me = usize::from(t.selects(p.namespace, p.labels));
            let total: usize = counts.values().sum();
            let here = domain(p.node, &t.topology_key)
                .and_then(|d| counts.get(&d).copied())
                .unwrap_or(0);
            if here <= me && !(total == me && me == 1) {
                errors.push((
                    Some(pod.key()),
                    format!(
                        "{} on {}: pod affinity on {}: no matching pod beside it",
                        name(p),
                        p.node,
                        t.topology_key
                    ),
                ));
            }
        }
        for s in c.spread.iter().filter(|s| s.hard) {
            let eligible_key: EligibleKey<'_> = (
                &pod.selector,
                pod.tolerations.as_slice(),
                s.honor_node_affinity,
                s.honor_taints,
                s.topology_key.as_str(),
            );
            let (counts, min_all, domains) = spread_cache
                .entry((eligible_key, pod.namespace.as_str(), &s.selector))
                .or_insert_with(|| {
                    let eligible = eligible_cache.entry(eligible_key).or_insert_with(|| {
                        let mut out = BTreeSet::new();
                        for (node, (labels, taints)) in &nodes {
                            if s.honor_node_affinity && !pod.selector.matches(labels) {
                                continue;
                            }
                            if s.honor_taints
                                && crate::labels::untolerated(&pod.tolerations, taints).is_some()
                            {
                                continue;
                            }
                            if let Some(d) = domain(node, &s.topology_key) {
                                out.insert(d);
                            }
                        }
                        out
                    });
                    let all = matching
                        .entry((pod.namespace.as_str(), &s.selector, s.topology_key.as_str()))
                        .or_insert_with(|| {
                            let mut out: Counts = HashMap::new();
                            for ((namespace, labels), (per_node, _)) in &groups {
                                if *namespace != pod.namespace || !s.selector.matches(labels) {
                                    continue;
                                }
                                for (node, n) in per_node {
                                    if let Some(d) = domain(node, &s.topology_key) {
                                        *out.entry(d).or_default() += *n as i64;
                                    }
                                }
                            }
                            out
                        });
                    let counts: Counts = eligible
                        .iter()
                        .map(|d| (d.clone(), all.get(d).copied().unwrap_or(0)))
                        .collect();
                    let min_all = counts.values().copied().min().unwrap_or(0);
                    (counts, min_all, eligible.len())
                });
            let Some(d) = domain(p.node, &s.topology_key) else {
                errors.push((
                    Some(pod.key()),
                    format!("{} on {}: no {} label", name(p), p.node, s.topology_key),
                ));
                continue;
            };
            let me = i64::from(s.selector.matches(p.labels));
            let here = counts.get(&d).copied().unwrap_or(0) - me;
            // The emptiest eligible domain, not counting this pod: only its own domain
            // changes, so the minimum is the cached one or its domain's count less it.
            let mut min = match counts.get(&d) {
                Some(n) => (*min_all).min(n - me),
                None => *min_all,
            };
            if s.min_domains.is_some_and(|m| (*domains as i32) < m) {
                min = 0;
            }
            if here + 1 - min > i64::from(s.max_skew) {
                errors.push((
                    Some(pod.key()),
                    format!(
                        "{} on {}: topology spread on {}: {d} holds {} matching pods against {min} in the emptiest domain (maxSkew {})",
                        name(p),
                        p.node,
                        s.topology_key,
                        here + 1,
                        s.max_skew
                    ),
                ));
            }
        }
    }
    errors
}
