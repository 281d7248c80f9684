//! Disruption: which nodes to take away now, and why. A node is removed when it has been
//! empty (nothing but DaemonSet and mirror pods) for its pool's `consolidateAfter`, when
//! it has drifted from its pool's template or NodeClass, or when it is older than the
//! pool's `expireAfter` — never one that `do-not-disrupt` protects (the node, its claim
//! or one of its pods), and never more at once than the pool's budgets allow for that
//! reason at that time. Pure logic in explicit time, shared by the controller and the
//! simulator; interruptions are not voluntary and are never budgeted.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::nodepool::{Budget, DisruptionReason, NodePool, parse_duration};

/// The annotation that protects a node, its claim or a pod from voluntary disruption:
/// `"true"`, or a duration counted from the pod's start.
pub const DO_NOT_DISRUPT: &str = "cooper.dev/do-not-disrupt";
/// Karpenter's spelling, honoured the same way (users put it on long training jobs).
pub const KARPENTER_DO_NOT_DISRUPT: &str = "karpenter.sh/do-not-disrupt";

/// The taint on a node being disrupted (Karpenter's `karpenter.sh/disrupted`): nothing
/// new is scheduled or planned there while its pods move.
pub const DISRUPTED_TAINT_KEY: &str = "cooper.dev/disrupted";

/// [`DISRUPTED_TAINT_KEY`] as a `NoSchedule` taint.
pub fn disruption_taint() -> crate::labels::Taint {
    crate::labels::Taint {
        key: DISRUPTED_TAINT_KEY.into(),
        value: None,
        effect: crate::labels::TaintEffect::NoSchedule,
    }
}

/// Budget applied when a pool defines none (Karpenter's default).
pub const DEFAULT_BUDGET: Budget = Budget::Percent(10.0);

/// The order voluntary disruption looks at its reasons: the cheapest to act on first
/// (an empty node moves no pod).
pub const REASONS: [DisruptionReason; 3] = [
    DisruptionReason::Empty,
    DisruptionReason::Drifted,
    DisruptionReason::Expired,
];

/// What disruption needs to know about a node cooper launched.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeState {
    pub name: String,
    pub nodepool: String,
    /// Since when the node has run only DaemonSet/mirror pods; None when it runs others.
    pub empty_since: Option<Duration>,
    /// When it was launched (for `expireAfter`), on the same clock as `empty_since`.
    pub launched_at: Duration,
    /// Why it no longer matches what its pool would launch now; None when it does.
    pub drifted: Option<String>,
    /// The node, its claim or one of its pods says `do-not-disrupt`.
    pub do_not_disrupt: bool,
    /// Already being removed or replaced (counts against the budget).
    pub disrupting: bool,
}

/// One node to disrupt, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub name: String,
    pub reason: DisruptionReason,
}

/// How many of a pool's `total` nodes may be in disruption for `reason` at `wall` (time
/// since the Unix epoch): the most restrictive budget that applies; with none applying
/// (a scheduled budget outside its window, a budget for other reasons) every node.
pub fn allowed(pool: &NodePool, reason: DisruptionReason, total: usize, wall: Duration) -> usize {
    pool.budgets
        .iter()
        .filter(|b| b.applies(reason, wall))
        .map(|b| b.nodes.allowed(total))
        .min()
        .unwrap_or(total)
}

/// Is the node due for `reason` at `now`?
fn due(node: &NodeState, pool: &NodePool, reason: DisruptionReason, now: Duration) -> bool {
    match reason {
        DisruptionReason::Empty => pool
            .empty_ttl
            .zip(node.empty_since)
            .is_some_and(|(ttl, since)| now.saturating_sub(since) >= ttl),
        DisruptionReason::Drifted => node.drifted.is_some(),
        DisruptionReason::Expired => pool
            .expire_after
            .is_some_and(|e| now.saturating_sub(node.launched_at) >= e),
        DisruptionReason::Underutilized => false,
    }
}

/// The nodes to disrupt at `now` (`wall` for budget schedules), by reason in
/// [`REASONS`] order; within a reason the longest-due first.
pub fn disruptions(
    nodes: &[NodeState],
    pools: &[NodePool],
    now: Duration,
    wall: Duration,
) -> Vec<Decision> {
    let mut by_pool: BTreeMap<&str, Vec<&NodeState>> = BTreeMap::new();
    for n in nodes {
        by_pool.entry(n.nodepool.as_str()).or_default().push(n);
    }
    let mut out = Vec::new();
    for (pool_name, members) in by_pool {
        let Some(pool) = pools.iter().find(|p| p.name == pool_name) else {
            continue; // unknown pool: leave its nodes alone
        };
        let total = members.len();
        let mut in_disruption = members.iter().filter(|n| n.disrupting).count();
        let mut chosen: Vec<&str> = Vec::new();
        for reason in REASONS {
            let room = allowed(pool, reason, total, wall).saturating_sub(in_disruption);
            let mut candidates: Vec<&&NodeState> = members
                .iter()
                .filter(|n| !n.disrupting && !n.do_not_disrupt)
                .filter(|n| !chosen.contains(&n.name.as_str()))
                .filter(|n| due(n, pool, reason, now))
                .collect();
            candidates.sort_by(|a, b| {
                let key = |n: &NodeState| match reason {
                    DisruptionReason::Empty => n.empty_since.unwrap_or_default(),
                    _ => n.launched_at,
                };
                key(a).cmp(&key(b)).then(a.name.cmp(&b.name))
            });
            for n in candidates.into_iter().take(room) {
                chosen.push(&n.name);
                in_disruption += 1;
                out.push(Decision {
                    name: n.name.clone(),
                    reason,
                });
            }
        }
    }
    out
}

/// The nodes to remove at `now` because they have been empty past their pool's TTL
/// (the empty part of [`disruptions`]).
pub fn expired_empty_nodes(nodes: &[NodeState], pools: &[NodePool], now: Duration) -> Vec<String> {
    disruptions(nodes, pools, now, now)
        .into_iter()
        .filter(|d| d.reason == DisruptionReason::Empty)
        .map(|d| d.name)
        .collect()
}

/// When the next node becomes due for disruption (for a controller's or simulator's
/// wake-up): an empty node reaching its TTL, a node reaching its `expireAfter`, a
/// drifted node (now).
pub fn next_due(nodes: &[NodeState], pools: &[NodePool]) -> Option<Duration> {
    nodes
        .iter()
        .filter(|n| !n.do_not_disrupt && !n.disrupting)
        .filter_map(|n| {
            let pool = pools.iter().find(|p| p.name == n.nodepool)?;
            let empty = pool
                .empty_ttl
                .zip(n.empty_since)
                .map(|(ttl, since)| since.saturating_add(ttl));
            let expiry = pool.expire_after.map(|e| n.launched_at.saturating_add(e));
            // A drifted node is due now (a budget may hold it back for a while).
            let drift = n.drifted.as_ref().map(|_| Duration::ZERO);
            [empty, expiry, drift].into_iter().flatten().min()
        })
        .min()
}

/// Does a pod with these annotations, started at `started` (None: not yet), keep its
/// node from voluntary disruption at `now`? `"true"` protects for as long as the pod
/// runs, a duration ("4h") for that long after it started; any other value protects
/// too, since guessing wrong would move a job its owner meant to keep.
pub fn pod_protects_node(
    annotations: &BTreeMap<String, String>,
    started: Option<Duration>,
    now: Duration,
) -> bool {
    [DO_NOT_DISRUPT, KARPENTER_DO_NOT_DISRUPT]
        .iter()
        .filter_map(|k| annotations.get(*k))
        .any(|v| match v.as_str() {
            "true" => true,
            "false" => false,
            other => match parse_duration(other) {
                Ok(d) => started.is_none_or(|s| now < s.saturating_add(d)),
                Err(_) => true,
            },
        })
}

/// Does a node or claim annotation say `do-not-disrupt: "true"`?
pub fn node_protected(annotations: &BTreeMap<String, String>) -> bool {
    [DO_NOT_DISRUPT, KARPENTER_DO_NOT_DISRUPT]
        .iter()
        .any(|k| annotations.get(*k).is_some_and(|v| v == "true"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, pool: &str, empty_since: Option<u64>) -> NodeState {
        NodeState {
            name: name.into(),
            nodepool: pool.into(),
            empty_since: empty_since.map(Duration::from_secs),
            launched_at: Duration::ZERO,
            drifted: None,
            do_not_disrupt: false,
            disrupting: false,
        }
    }

    #[test]
    fn ttl_protection_and_budget() {
        let pools = crate::nodepool::defaults().unwrap();
        // inf1: 30 s TTL, default budget 10 % (at least one).
        let mut nodes = vec![
            node("a", "inf1", Some(0)),
            node("b", "inf1", Some(10)),
            node("c", "inf1", None),
        ];
        assert!(
            expired_empty_nodes(&nodes, &pools, Duration::from_secs(29)).is_empty(),
            "not before the TTL"
        );
        assert_eq!(
            expired_empty_nodes(&nodes, &pools, Duration::from_secs(30)),
            ["a"]
        );
        // Budget: 10 % of 3 nodes rounds up to one at a time.
        assert_eq!(
            expired_empty_nodes(&nodes, &pools, Duration::from_secs(60)),
            ["a"]
        );
        nodes[0].disrupting = true;
        assert!(expired_empty_nodes(&nodes, &pools, Duration::from_secs(60)).is_empty());
        nodes[0].disrupting = false;
        nodes[0].do_not_disrupt = true;
        assert_eq!(
            expired_empty_nodes(&nodes, &pools, Duration::from_secs(60)),
            ["b"]
        );
        assert_eq!(next_due(&nodes, &pools), Some(Duration::from_secs(40)));
        // Unknown pools are left alone.
        assert!(
            expired_empty_nodes(
                &[node("x", "gone", Some(0))],
                &pools,
                Duration::from_secs(999)
            )
            .is_empty()
        );
    }

    fn pool(yaml_disruption: serde_json::Value, expire: &str) -> NodePool {
        let spec: crate::nodepool::NodePoolSpec = serde_json::from_value(serde_json::json!({
            "template": {"spec": {"expireAfter": expire}},
            "disruption": yaml_disruption,
        }))
        .unwrap();
        NodePool::from_spec("p", &spec).unwrap()
    }

    fn aged(name: &str, launched: u64, drifted: bool) -> NodeState {
        NodeState {
            name: name.into(),
            nodepool: "p".into(),
            empty_since: None,
            launched_at: Duration::from_secs(launched),
            drifted: drifted.then(|| "AMI changed".into()),
            do_not_disrupt: false,
            disrupting: false,
        }
    }

    #[test]
    fn budgets_by_reason_and_schedule() {
        // One node at a time for drift; none during business hours (weekdays 09-17 UTC).
        let p = pool(
            serde_json::json!({"consolidateAfter": "30s", "budgets": [
                {"nodes": "1", "reasons": ["Drifted"]},
                {"nodes": "0", "schedule": "0 9 * * mon-fri", "duration": "8h"},
            ]}),
            "1h",
        );
        let nodes = vec![
            aged("old-a", 0, true),
            aged("old-b", 10, true),
            aged("young", 7_000, false),
        ];
        // 2026-12-01 (a Tuesday) 08:00 and 10:00 UTC.
        let tuesday = Duration::from_secs(20_788 * 86_400);
        let before_work = tuesday + Duration::from_secs(8 * 3600);
        let at_work = tuesday + Duration::from_secs(10 * 3600);
        let now = Duration::from_secs(3_700);
        let decided = disruptions(&nodes, std::slice::from_ref(&p), now, before_work);
        // Drift takes one (the budget for drift); expiry takes the other old node (no
        // budget limits expiry outside the window); the young one is neither.
        assert_eq!(
            decided,
            vec![
                Decision {
                    name: "old-a".into(),
                    reason: DisruptionReason::Drifted
                },
                Decision {
                    name: "old-b".into(),
                    reason: DisruptionReason::Expired
                },
            ]
        );
        assert!(disruptions(&nodes, std::slice::from_ref(&p), now, at_work).is_empty());
        // A node already being replaced uses the drift budget up.
        let mut busy = nodes.clone();
        busy[0].disrupting = true;
        let decided = disruptions(&busy, std::slice::from_ref(&p), now, before_work);
        assert!(
            decided
                .iter()
                .all(|d| d.reason != DisruptionReason::Drifted),
            "{decided:?}"
        );
        assert_eq!(
            next_due(&nodes[2..], &[p]),
            Some(Duration::from_secs(10_600))
        );
        // expireAfter: Never, and the 720h default.
        let never = pool(serde_json::json!({}), "Never");
        assert_eq!(never.expire_after, None);
        let spec: crate::nodepool::NodePoolSpec =
            serde_json::from_value(serde_json::json!({})).unwrap();
        assert_eq!(
            NodePool::from_spec("d", &spec).unwrap().expire_after,
            Some(Duration::from_secs(720 * 3600))
        );
    }

    #[test]
    fn invalid_budgets_name_the_field() {
        for (budget, field) in [
            (
                serde_json::json!({"nodes": "1", "schedule": "0 9 * * *"}),
                "budgets[0].duration",
            ),
            (
                serde_json::json!({"nodes": "1", "duration": "1h"}),
                "budgets[0].schedule",
            ),
            (
                serde_json::json!({"nodes": "1", "schedule": "0 25 * * *", "duration": "1h"}),
                "budgets[0].schedule",
            ),
            (serde_json::json!({"nodes": "x"}), "budgets[0].nodes"),
        ] {
            let spec: crate::nodepool::NodePoolSpec =
                serde_json::from_value(serde_json::json!({"disruption": {"budgets": [budget]}}))
                    .unwrap();
            let (path, message) = NodePool::from_spec("p", &spec).unwrap_err();
            assert!(path.ends_with(field), "{path}: {message}");
        }
        let bad_reason = serde_json::from_value::<crate::nodepool::NodePoolSpec>(
            serde_json::json!({"disruption": {"budgets": [{"nodes": "1", "reasons": ["Bored"]}]}}),
        );
        assert!(bad_reason.is_err());
    }

    #[test]
    fn pods_protect_their_node_while_they_ask_to() {
        let ann = |k: &str, v: &str| BTreeMap::from([(k.to_string(), v.to_string())]);
        let t = Duration::from_secs;
        assert!(pod_protects_node(
            &ann(KARPENTER_DO_NOT_DISRUPT, "true"),
            Some(t(0)),
            t(1_000_000)
        ));
        assert!(pod_protects_node(&ann(DO_NOT_DISRUPT, "true"), None, t(5)));
        assert!(!pod_protects_node(
            &ann(DO_NOT_DISRUPT, "false"),
            None,
            t(5)
        ));
        // A duration counts from the pod's start.
        assert!(pod_protects_node(
            &ann(DO_NOT_DISRUPT, "1h"),
            Some(t(100)),
            t(3_699)
        ));
        assert!(!pod_protects_node(
            &ann(DO_NOT_DISRUPT, "1h"),
            Some(t(100)),
            t(3_700)
        ));
        // A value cooper cannot read protects.
        assert!(pod_protects_node(
            &ann(DO_NOT_DISRUPT, "yes"),
            Some(t(0)),
            t(9)
        ));
        assert!(!pod_protects_node(&BTreeMap::new(), Some(t(0)), t(9)));
        assert!(node_protected(&ann(KARPENTER_DO_NOT_DISRUPT, "true")));
    }
}
