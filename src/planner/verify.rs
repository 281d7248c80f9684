//! An independent check of a plan against its input, written without the planner's
//! data structures: every pod placed exactly once or reported, no node over its
//! allocatable in any resource, selectors / affinity / tolerations / pool
//! requirements honoured, NodePool limits respected, gangs whole and in one zone.

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
        total += node.price_per_hour;
        let Some(pool) = input.pools.iter().find(|p| p.name == node.nodepool) else {
            errors.push(format!("{}: unknown nodepool {}", node.name, node.nodepool));
            continue;
        };
        let catalog = input.catalog;
        let Some(t) = catalog.instance_type(&node.instance_type) else {
            errors.push(format!(
                "{}: unknown instance type {}",
                node.name, node.instance_type
            ));
            continue;
        };
        let Some(off) = catalog.offerings.iter().find(|o| {
            catalog.types[o.type_index].name() == node.instance_type
                && o.zone == node.zone
                && o.capacity_type == node.capacity_type
        }) else {
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
            used = used.plus(&pod.requests);
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
            used = used.plus(&pod.requests);
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
        for (name, limit) in pool.limits.iter() {
            // Existing nodes may already be over a lowered limit; only new nodes count.
            let existing: i64 = input
                .nodes
                .iter()
                .filter(|n| n.nodepool.as_deref() == Some(&pool.name))
                .map(|n| n.capacity.get(name))
                .sum();
            if used.get(name) > limit.max(existing) {
                errors.push(format!(
                    "nodepool {}: {name} {} exceeds limit {limit}",
                    pool.name,
                    used.get(name)
                ));
            }
        }
    }

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
