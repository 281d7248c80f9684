//! Disruption: which empty nodes to remove now. A node is empty when it runs nothing
//! but DaemonSet and mirror pods; once it has been empty for its pool's TTL it may be
//! removed — never one annotated `cooper.dev/do-not-disrupt: "true"`, and never more
//! at once than the pool's disruption budgets allow. Pure logic in explicit time, shared
//! by the controller and the simulator.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::nodepool::{Budget, NodePool, parse_budget};

/// The annotation that protects a node from voluntary disruption.
pub const DO_NOT_DISRUPT: &str = "cooper.dev/do-not-disrupt";

/// Budget applied when a pool defines none (Karpenter's default).
pub const DEFAULT_BUDGET: Budget = Budget::Percent(10.0);

/// What disruption needs to know about a node cooper launched.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeState {
    pub name: String,
    pub nodepool: String,
    /// Since when the node has run only DaemonSet/mirror pods; None when it runs others.
    pub empty_since: Option<Duration>,
    pub do_not_disrupt: bool,
    /// Already being removed (counts against the budget).
    pub disrupting: bool,
}

/// The nodes to remove at `now`, oldest-empty first.
pub fn expired_empty_nodes(nodes: &[NodeState], pools: &[NodePool], now: Duration) -> Vec<String> {
    let mut by_pool: BTreeMap<&str, Vec<&NodeState>> = BTreeMap::new();
    for n in nodes {
        by_pool.entry(n.nodepool.as_str()).or_default().push(n);
    }
    let mut out = Vec::new();
    for (pool_name, members) in by_pool {
        let Some(pool) = pools.iter().find(|p| p.name == pool_name) else {
            continue; // unknown pool: leave its nodes alone
        };
        let Some(ttl) = pool.empty_ttl else {
            continue;
        };
        let total = members.len();
        let allowed = pool
            .budgets
            .iter()
            .filter_map(|b| parse_budget(b).ok())
            .map(|b| b.allowed(total))
            .min()
            .unwrap_or_else(|| DEFAULT_BUDGET.allowed(total));
        let busy = members.iter().filter(|n| n.disrupting).count();
        let mut candidates: Vec<&&NodeState> = members
            .iter()
            .filter(|n| !n.disrupting && !n.do_not_disrupt)
            .filter(|n| {
                n.empty_since
                    .is_some_and(|since| now.saturating_sub(since) >= ttl)
            })
            .collect();
        candidates.sort_by(|a, b| a.empty_since.cmp(&b.empty_since).then(a.name.cmp(&b.name)));
        out.extend(
            candidates
                .into_iter()
                .take(allowed.saturating_sub(busy))
                .map(|n| n.name.clone()),
        );
    }
    out
}

/// When the next empty node will reach its TTL (for a controller's or simulator's wake-up).
pub fn next_expiry(nodes: &[NodeState], pools: &[NodePool]) -> Option<Duration> {
    nodes
        .iter()
        .filter(|n| !n.do_not_disrupt && !n.disrupting)
        .filter_map(|n| {
            let ttl = pools.iter().find(|p| p.name == n.nodepool)?.empty_ttl?;
            Some(n.empty_since?.saturating_add(ttl))
        })
        .min()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, pool: &str, empty_since: Option<u64>) -> NodeState {
        NodeState {
            name: name.into(),
            nodepool: pool.into(),
            empty_since: empty_since.map(Duration::from_secs),
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
        assert_eq!(next_expiry(&nodes, &pools), Some(Duration::from_secs(40)));
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
}
