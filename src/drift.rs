//! Drift: a node launched from a NodePool template or a NodeClass that has changed since
//! no longer is what its pool would launch now. Each NodeClaim records, at launch, a
//! hash of the pool's template (labels, annotations, taints, startup taints, NodeClass
//! reference) and of its NodeClass as resolved for its instance type (the AMI it boots,
//! subnets, security groups, user data, block devices, metadata options, tags, role);
//! a different hash now, or a pool requirement the node's labels no longer satisfy,
//! makes it `Drifted`. Like Karpenter, `expireAfter`, `terminationGracePeriod`, the
//! disruption settings, limits and weight are behaviour, not what a node is: changing
//! them drifts nothing, and requirements are checked against the node's labels rather
//! than hashed (widening a requirement drifts nothing).
//!
//! The hash is FNV-1a over the canonical JSON, stable across builds and Rust versions
//! (the hashes live on claims across controller upgrades).

use serde_json::json;

use crate::catalog::InstanceType;
use crate::crd::{NodeClassSpec, NodeClassStatus};
use crate::nodepool::{NodePool, NodePoolSpec};

/// Annotation on a NodeClaim: its pool template's hash at creation.
pub const NODEPOOL_HASH: &str = "cooper.dev/nodepool-hash";
/// Annotation on a NodeClaim: its NodeClass's hash (as resolved for the instance type)
/// at launch.
pub const NODECLASS_HASH: &str = "cooper.dev/nodeclass-hash";

/// 64-bit FNV-1a, as 16 hex digits.
fn fnv(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// The hash of what a pool's template makes a node: labels, annotations, taints,
/// startup taints and the NodeClass it launches with.
pub fn pool_hash(spec: &NodePoolSpec) -> String {
    let t = &spec.template;
    let value = json!({
        "labels": t.metadata.labels,
        "annotations": t.metadata.annotations,
        "taints": t.spec.taints,
        "startupTaints": t.spec.startup_taints,
        "nodeClass": t.spec.node_class_ref.as_ref().map(|r| &r.name),
    });
    fnv(value.to_string().as_bytes())
}

/// The hash of a NodeClass as it launches this instance type: its spec (but the
/// per-node cost, which prices a node and changes nothing on it), the subnets and
/// security groups it resolved to, and the image the type boots.
pub fn class_hash(
    spec: &NodeClassSpec,
    status: Option<&NodeClassStatus>,
    instance_type: Option<&InstanceType>,
) -> String {
    let mut spec = spec.clone();
    spec.per_node_cost_per_hour = None;
    let subnets: Vec<&str> = status
        .map(|s| s.subnets.iter().map(|s| s.id.as_str()).collect())
        .unwrap_or_default();
    let groups: Vec<&String> = status
        .map(|s| s.security_groups.iter().collect())
        .unwrap_or_default();
    let ami = status
        .zip(instance_type)
        .and_then(|(s, t)| crate::aws::nodeclass::ami_for(&s.amis, t));
    let value = json!({
        "spec": spec,
        "subnets": subnets,
        "securityGroups": groups,
        "ami": ami,
    });
    fnv(value.to_string().as_bytes())
}

/// Why a node drifted, if it did: a different template or NodeClass hash than it was
/// launched with, or a requirement of its pool that a label it carries breaks. `launched_*` are
/// the hashes recorded on its claim (None for claims from before cooper recorded them:
/// those are compared on requirements only).
pub fn drifted<L: crate::labels::LabelLookup + ?Sized>(
    pool: &NodePool,
    node_labels: &L,
    launched_pool_hash: Option<&str>,
    current_pool_hash: Option<&str>,
    launched_class_hash: Option<&str>,
    current_class_hash: Option<&str>,
) -> Option<String> {
    if let (Some(a), Some(b)) = (launched_pool_hash, current_pool_hash)
        && a != b
    {
        return Some(format!(
            "NodePool {}'s template changed since the node launched",
            pool.name
        ));
    }
    if let (Some(a), Some(b)) = (launched_class_hash, current_class_hash)
        && a != b
    {
        return Some(format!(
            "NodeClass {} changed since the node launched (image, subnets, security groups or launch settings)",
            pool.node_class.as_deref().unwrap_or("?")
        ));
    }
    // Only labels the node carries are judged: a requirement on a label cooper does not
    // put on nodes cannot tell, and must not drift every node.
    pool.requirements
        .iter()
        .find(|r| node_labels.label(&r.key).is_some() && !r.matches(node_labels))
        .map(|r| {
            format!(
                "the node no longer satisfies NodePool {}'s requirement on {}",
                pool.name, r.key
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(v: serde_json::Value) -> NodePoolSpec {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn template_changes_drift_behaviour_changes_do_not() {
        let base = spec(json!({"template": {"metadata": {"labels": {"team": "ml"}}}}));
        let h = pool_hash(&base);
        assert_eq!(h.len(), 16);
        assert_eq!(h, pool_hash(&base.clone()), "stable");
        let relabelled = spec(json!({"template": {"metadata": {"labels": {"team": "ai"}}}}));
        assert_ne!(h, pool_hash(&relabelled));
        let tainted = spec(json!({"template": {"metadata": {"labels": {"team": "ml"}},
            "spec": {"taints": [{"key": "gpu", "effect": "NoSchedule"}]}}}));
        assert_ne!(h, pool_hash(&tainted));
        let behaviour = spec(json!({"template": {"metadata": {"labels": {"team": "ml"}},
            "spec": {"expireAfter": "24h", "terminationGracePeriod": "1h"}},
            "limits": {"cpu": "10"}, "weight": 5,
            "disruption": {"consolidateAfter": "5m"}}));
        assert_eq!(h, pool_hash(&behaviour));
    }

    #[test]
    fn requirements_are_checked_against_the_node() {
        let pool = NodePool::from_spec(
            "p",
            &spec(json!({"template": {"spec": {"requirements": [
                {"key": "karpenter.sh/capacity-type", "operator": "In", "values": ["spot"]}]}}})),
        )
        .unwrap();
        // Karpenter's key is read as cooper's own.
        let key = crate::labels::keys::CAPACITY_TYPE.to_string();
        let spot: crate::labels::Labels = [(key.clone(), "spot".to_string())].into();
        let od: crate::labels::Labels = [(key, "on-demand".to_string())].into();
        assert_eq!(drifted(&pool, &spot, None, None, None, None), None);
        let why = drifted(&pool, &od, None, None, None, None).unwrap();
        assert!(why.contains("capacity-type"), "{why}");
        let why = drifted(&pool, &spot, Some("a"), Some("b"), None, None).unwrap();
        assert!(why.contains("template"), "{why}");
        let why = drifted(&pool, &spot, Some("a"), Some("a"), Some("x"), Some("y")).unwrap();
        assert!(why.contains("NodeClass"), "{why}");
    }
}
