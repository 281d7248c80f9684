//! A Karpenter-style first-fit-decreasing packer: the comparison baseline and the
//! fallback of the optimal strategy.
//!
//! Pods are taken by CPU, then memory, descending. Each pod goes to the first open
//! node that can still take it; an open node keeps the set of options that could host
//! every pod given to it so far, and is launched as the cheapest of them. A new node
//! starts with every option of the first pool (by weight, then name) that can host the
//! pod. This reproduces Karpenter's habit of filling towards the largest candidate.

use super::problem::{PackProblem, PackSolution, PackedNode};

struct OpenNode {
    pool: usize,
    candidates: Vec<usize>,
    used: Vec<i64>,
    counts: Vec<(usize, u32)>,
    /// Capacity reserved against the pool's limits: the largest candidate's.
    reserved: Vec<i64>,
}

impl OpenNode {
    /// Pods of class `c` on the node.
    fn count_of(&self, c: usize) -> u32 {
        self.counts
            .iter()
            .find(|(cc, _)| *cc == c)
            .map_or(0, |(_, n)| *n)
    }
}

/// Pack with first-fit-decreasing. `pool_order` lists pools in the order a new node
/// tries them.
/// Why a first-fit packing has no bound.
pub const NO_BOUND_GREEDY: &str = "first-fit proves no lower bound";

pub fn solve(p: &PackProblem, pool_order: &[usize]) -> PackSolution {
    let mut limits = p.limits.clone();
    let mut order: Vec<usize> = (0..p.classes.len()).collect();
    order.sort_by(|a, b| {
        p.classes[*b]
            .ffd_key
            .cmp(&p.classes[*a].ffd_key)
            .then(a.cmp(b))
    });
    let mut compat = vec![Vec::new(); p.classes.len()];
    for (o, opt) in p.options.iter().enumerate() {
        for c in &opt.classes {
            compat[*c].push(o);
        }
    }
    let mut nodes: Vec<OpenNode> = Vec::new();
    let mut unplaced = vec![0u32; p.classes.len()];
    let mut room = vec![0i64; p.dims];

    for &c in &order {
        let class = &p.classes[c];
        let mut left = class.demand;
        // First fit over open nodes.
        for node in nodes.iter_mut() {
            if left == 0 {
                break;
            }
            loop {
                let already = node.count_of(c);
                if already >= class.per_node {
                    break;
                }
                let mut best = 0u32;
                for &o in &node.candidates {
                    if p.options[o].classes.binary_search(&c).is_err() {
                        continue;
                    }
                    for (d, r) in room.iter_mut().enumerate() {
                        *r = p.options[o].alloc[d] - node.used[d];
                    }
                    best = best.max(p.fit_class(c, &room, already));
                }
                let k = best.min(left);
                if k == 0 {
                    break;
                }
                add(p, node, c, k, &mut room);
                left -= k;
                if left == 0 {
                    break;
                }
            }
        }
        // Open new nodes.
        while left > 0 {
            let open = |limits: &[Vec<Option<i64>>]| {
                pool_order.iter().find_map(|&pool| {
                    let cands: Vec<usize> = compat[c]
                        .iter()
                        .copied()
                        .filter(|&o| p.options[o].pool == pool)
                        .filter(|&o| PackProblem::fit_count(&class.req, &p.options[o].alloc) > 0)
                        .filter(|&o| p.within_limits(limits, o))
                        .collect();
                    (!cands.is_empty()).then_some((pool, cands))
                })
            };
            let mut opened = open(&limits);
            if opened.is_none() && settle(p, &mut nodes, &mut limits) {
                opened = open(&limits);
            }
            let Some((pool, candidates)) = opened else {
                break;
            };
            let mut reserved = vec![0i64; p.dims];
            for &o in &candidates {
                for (r, c) in reserved.iter_mut().zip(&p.options[o].capacity) {
                    *r = (*r).max(*c);
                }
            }
            // Keep only candidates whose worst case fits the limits alongside the others.
            for (d, l) in limits[pool].iter_mut().enumerate() {
                if let Some(l) = l {
                    *l -= reserved[d];
                }
            }
            let mut node = OpenNode {
                pool,
                candidates,
                used: vec![0; p.dims],
                counts: Vec::new(),
                reserved,
            };
            let best = node
                .candidates
                .iter()
                .map(|&o| p.fit_class(c, &p.options[o].alloc, 0))
                .max()
                .unwrap_or(0);
            let k = best.min(left);
            add(p, &mut node, c, k, &mut room);
            left -= k;
            nodes.push(node);
        }
        unplaced[c] = left;
    }

    let mut out = Vec::with_capacity(nodes.len());
    for node in nodes {
        let cheapest = node.candidates.iter().copied().min_by(|a, b| {
            p.options[*a]
                .price
                .total_cmp(&p.options[*b].price)
                .then(a.cmp(b))
        });
        if let Some(o) = cheapest {
            for (d, l) in limits[node.pool].iter_mut().enumerate() {
                if let Some(l) = l {
                    *l += node.reserved[d] - p.options[o].capacity[d];
                }
            }
            out.push(PackedNode {
                option: o,
                counts: node.counts,
            });
        }
    }
    PackSolution {
        nodes: out,
        unplaced,
        lower_bound: None,
        bound_missing: Some(NO_BOUND_GREEDY),
    }
}

/// Pool limits are reserved at each open node's largest candidate (as Karpenter
/// reserves a NodeClaim's largest instance type), which runs a pool's limits out long
/// before its nodes use them when many small nodes are needed (one pod per node under
/// anti-affinity, say). When that stops a new node from opening, settle the open nodes
/// on their cheapest candidate and give back the rest of their reservations. True if
/// anything was given back.
fn settle(p: &PackProblem, nodes: &mut [OpenNode], limits: &mut [Vec<Option<i64>>]) -> bool {
    let mut released = false;
    for node in nodes.iter_mut() {
        let Some(cheapest) = node.candidates.iter().copied().min_by(|a, b| {
            p.options[*a]
                .price
                .total_cmp(&p.options[*b].price)
                .then(a.cmp(b))
        }) else {
            continue;
        };
        if node.candidates.len() == 1 {
            continue;
        }
        let capacity = &p.options[cheapest].capacity;
        for (d, l) in limits[node.pool].iter_mut().enumerate() {
            if let Some(l) = l {
                *l += node.reserved[d] - capacity[d];
            }
        }
        if node.reserved != *capacity {
            released = true;
        }
        node.reserved = capacity.clone();
        node.candidates = vec![cheapest];
    }
    released
}

fn add(p: &PackProblem, node: &mut OpenNode, c: usize, k: u32, room: &mut [i64]) {
    for (u, r) in node.used.iter_mut().zip(p.classes[c].req.iter()) {
        *u += r * k as i64;
    }
    match node.counts.iter_mut().find(|(cc, _)| *cc == c) {
        Some((_, n)) => *n += k,
        None => node.counts.push((c, k)),
    }
    node.candidates.retain(|&o| {
        let opt = &p.options[o];
        if opt.classes.binary_search(&c).is_err() {
            return false;
        }
        for (d, r) in room.iter_mut().enumerate() {
            *r = opt.alloc[d] - node.used[d];
        }
        room.iter().all(|r| *r >= 0)
    });
}
