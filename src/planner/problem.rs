//! The packing problem both strategies solve: classes of identical pods with a demand,
//! node options (NodePool × offering) with a price and dense allocatable, which
//! classes each option can host, and what remains of each pool's limits.

/// Pods with identical requests and constraints, counted.
#[derive(Debug, Clone)]
pub struct ClassDemand {
    /// Dense requests.
    pub req: std::sync::Arc<[i64]>,
    /// Pods of this class still to place.
    pub demand: u32,
    /// Objective weight of leaving one pod unplaced (higher priority, higher penalty).
    pub penalty: f64,
    /// Sort key for first-fit-decreasing: (cpu, memory) as Karpenter orders pods.
    pub ffd_key: (i64, i64),
    /// At most this many pods of the class on one node (`u32::MAX`: no cap). A per-node
    /// rule that only this class can meet on any node (one replica per node, a host
    /// port, hostname spread) is a cap here rather than one more resource dimension:
    /// see [`PackProblem::with_caps`].
    pub per_node: u32,
}

/// A node that could be launched.
#[derive(Debug, Clone)]
pub struct NodeChoice {
    /// Index of the pool (its limits) in [`PackProblem::limits`].
    pub pool: usize,
    pub price: f64,
    /// Allocatable less DaemonSet overhead, dense.
    pub alloc: Vec<i64>,
    /// Capacity counted against the pool's limits, dense.
    pub capacity: Vec<i64>,
    /// Classes this option can host, ascending.
    pub classes: Vec<usize>,
    /// Caller's handle for the option.
    pub handle: usize,
}

/// A problem over classes and options.
#[derive(Debug, Clone)]
pub struct PackProblem {
    pub dims: usize,
    pub classes: Vec<ClassDemand>,
    pub options: Vec<NodeChoice>,
    /// Per pool, per dim: remaining limit (None = unlimited).
    pub limits: Vec<Vec<Option<i64>>>,
}

/// One node of a solution: an option and how many pods of each class it hosts.
#[derive(Debug, Clone, PartialEq)]
pub struct PackedNode {
    pub option: usize,
    pub counts: Vec<(usize, u32)>,
}

/// A solution: nodes, pods left unplaced per class, and what is known of the optimum.
#[derive(Debug, Clone, Default)]
pub struct PackSolution {
    pub nodes: Vec<PackedNode>,
    pub unplaced: Vec<u32>,
    /// A proven lower bound on the cost of placing the pods this solution places.
    pub lower_bound: Option<f64>,
    /// Why there is no bound, when there is none and the solver knows why.
    pub bound_missing: Option<&'static str>,
}

impl PackProblem {
    /// How many pods of class `c` fit into `room` (0 when incompatible dims overflow).
    pub fn fit_count(req: &[i64], room: &[i64]) -> u32 {
        let mut best = u32::MAX;
        for (r, a) in req.iter().zip(room) {
            if *r > 0 {
                if *a < *r {
                    return 0;
                }
                best = best.min((*a / *r).min(u32::MAX as i64) as u32);
            }
        }
        best
    }

    /// How many more pods of class `c` fit into `room` on a node that holds `already`
    /// of them: the resources' answer, capped by the class's per-node cap.
    pub fn fit_class(&self, c: usize, room: &[i64], already: u32) -> u32 {
        let class = &self.classes[c];
        Self::fit_count(&class.req, room).min(class.per_node.saturating_sub(already))
    }

    /// The same problem with the per-node rules (`rules[d]`: dimension `d` is a
    /// synthetic resource every option offers equally) turned into per-class caps where
    /// that is exact: when no option can host two classes that take units of the rule
    /// (one Deployment's replicas, or its zone-pinned parts, which never share a node),
    /// "each pod takes one of the node's `u` units" is "at most `u` of the class per
    /// node". Dimensions no class takes are dropped. Classes and options keep their
    /// indices, so a solution of the result is a solution of `self`.
    ///
    /// Each rule kept as a dimension slows every fit test, the pricing knapsacks and
    /// the dominance checks; with one rule per Deployment a mix of 50,000 pods had 375.
    pub fn with_caps(&self, rules: &[bool]) -> PackProblem {
        let mut convertible: Vec<bool> = rules.to_vec();
        let mut units: Vec<Option<i64>> = vec![None; self.dims];
        // Every option must offer the same units of a rule.
        for opt in &self.options {
            for d in 0..self.dims {
                if !convertible[d] {
                    continue;
                }
                match units[d] {
                    None => units[d] = Some(opt.alloc[d]),
                    Some(u) if u != opt.alloc[d] => convertible[d] = false,
                    Some(_) => {}
                }
            }
        }
        // No option may host two classes taking units of the same rule.
        let takers: Vec<Vec<usize>> = self
            .classes
            .iter()
            .map(|c| {
                (0..self.dims)
                    .filter(|&d| convertible[d] && c.req[d] > 0)
                    .collect()
            })
            .collect();
        let mut seen_in: Vec<usize> = vec![usize::MAX; self.dims];
        for (o, opt) in self.options.iter().enumerate() {
            for &c in &opt.classes {
                for &d in &takers[c] {
                    if seen_in[d] == o {
                        convertible[d] = false;
                    }
                    seen_in[d] = o;
                }
            }
        }
        let kept: Vec<usize> = (0..self.dims).filter(|&d| !convertible[d]).collect();
        if kept.len() == self.dims {
            return self.clone();
        }
        let project = |v: &[i64]| -> Vec<i64> { kept.iter().map(|&d| v[d]).collect() };
        let classes = self
            .classes
            .iter()
            .zip(&takers)
            .map(|(c, dims)| {
                let cap = dims
                    .iter()
                    .filter(|&&d| convertible[d])
                    .map(|&d| {
                        let u = units[d].unwrap_or(0).max(0);
                        (u / c.req[d]).min(i64::from(u32::MAX)) as u32
                    })
                    .fold(c.per_node, u32::min);
                ClassDemand {
                    req: project(&c.req).into(),
                    per_node: cap,
                    ..c.clone()
                }
            })
            .collect();
        let options = self
            .options
            .iter()
            .map(|o| NodeChoice {
                alloc: project(&o.alloc),
                capacity: project(&o.capacity),
                ..o.clone()
            })
            .collect();
        let limits = self
            .limits
            .iter()
            .map(|l| kept.iter().map(|&d| l[d]).collect())
            .collect();
        PackProblem {
            dims: kept.len(),
            classes,
            options,
            limits,
        }
    }

    /// The same problem with classes that differ only in their per-node caps (one
    /// Deployment's replicas and another's of the same shape, placeable on the same
    /// options) merged, the cap of a merged class being the sum of its members' caps;
    /// with each class its merged class's index. `None` when no two classes merge.
    ///
    /// Classes without caps merge exactly (their pods are interchangeable). With caps
    /// it is a relaxation: `k` one-per-node Deployments may put `k` pods on a node, but
    /// not two of one Deployment; [`PackProblem::disaggregate`] hands each node's pods
    /// back to the members, the largest remaining demand first, which meets the caps
    /// whenever the merged counts allow. Why: a master row per Deployment (1,334 at
    /// 50,000 constrained pods) made the restricted master's dense basis the whole
    /// planning time.
    pub fn aggregated(&self) -> Option<(PackProblem, Vec<usize>)> {
        // Gang sub-problems (one class with demand among thousands) have nothing to merge.
        if self.classes.iter().filter(|c| c.demand > 0).count() < 2 {
            return None;
        }
        let mut hosts: Vec<Vec<usize>> = vec![Vec::new(); self.classes.len()];
        for (o, opt) in self.options.iter().enumerate() {
            for &c in &opt.classes {
                hosts[c].push(o);
            }
        }
        let mut index: std::collections::HashMap<(&[i64], u64, &[usize]), usize> =
            std::collections::HashMap::new();
        let mut classes: Vec<ClassDemand> = Vec::new();
        let mut groups = vec![0usize; self.classes.len()];
        for (c, class) in self.classes.iter().enumerate() {
            let key = (&*class.req, class.penalty.to_bits(), hosts[c].as_slice());
            let g = *index.entry(key).or_insert_with(|| {
                classes.push(ClassDemand {
                    demand: 0,
                    per_node: 0,
                    ..class.clone()
                });
                classes.len() - 1
            });
            classes[g].demand += class.demand;
            classes[g].per_node = classes[g].per_node.saturating_add(class.per_node);
            groups[c] = g;
        }
        if classes.len() == self.classes.len() {
            return None;
        }
        let options = self
            .options
            .iter()
            .map(|o| {
                let mut hosted: Vec<usize> = o.classes.iter().map(|&c| groups[c]).collect();
                hosted.sort_unstable();
                hosted.dedup();
                NodeChoice {
                    classes: hosted,
                    ..o.clone()
                }
            })
            .collect();
        let q = PackProblem {
            dims: self.dims,
            classes,
            options,
            limits: self.limits.clone(),
        };
        Some((q, groups))
    }

    /// Nodes of the [`PackProblem::aggregated`] problem as nodes of this one: each
    /// merged class's pods go back to its members node by node, the nodes holding
    /// most of them first and the member with the most pods still to place first,
    /// within each member's cap (for one-per-node members this greedy meets every
    /// demand whenever any assignment does); pods still without a node then go into
    /// the nodes' spare room, first fit. Returns the nodes and the pods of each class
    /// left to place (those the merged plan left out, and any that found no room).
    pub fn disaggregate(
        &self,
        groups: &[usize],
        nodes: &[PackedNode],
    ) -> (Vec<PackedNode>, Vec<u32>) {
        let mut remaining: Vec<u32> = self.classes.iter().map(|c| c.demand).collect();
        let mut members: Vec<Vec<usize>> = Vec::new();
        for (c, &g) in groups.iter().enumerate() {
            if members.len() <= g {
                members.resize(g + 1, Vec::new());
            }
            members[g].push(c);
        }
        let mut on_node: Vec<Vec<(usize, u32)>> = vec![Vec::new(); nodes.len()];
        let mut by_group: Vec<Vec<(usize, u32)>> = vec![Vec::new(); members.len()];
        for (j, node) in nodes.iter().enumerate() {
            for &(g, n) in &node.counts {
                by_group[g].push((j, n));
            }
        }
        for (g, mut holders) in by_group.into_iter().enumerate() {
            holders.sort_by_key(|&(j, n)| (std::cmp::Reverse(n), j));
            for (j, n) in holders {
                let mut left = n;
                while left > 0 {
                    let pick = members[g]
                        .iter()
                        .filter(|&&c| remaining[c] > 0)
                        .map(|&c| {
                            let already = on_node[j].iter().find(|t| t.0 == c).map_or(0, |t| t.1);
                            (c, self.classes[c].per_node.saturating_sub(already))
                        })
                        .filter(|(_, room)| *room > 0)
                        .max_by_key(|&(c, _)| (remaining[c], std::cmp::Reverse(c)));
                    let Some((c, room)) = pick else {
                        break;
                    };
                    let k = left.min(room).min(remaining[c]);
                    remaining[c] -= k;
                    left -= k;
                    match on_node[j].iter_mut().find(|t| t.0 == c) {
                        Some(t) => t.1 += k,
                        None => on_node[j].push((c, k)),
                    }
                }
            }
        }
        // What is left, into spare room.
        if remaining.iter().any(|r| *r > 0) {
            let mut room: Vec<Vec<i64>> = nodes
                .iter()
                .zip(&on_node)
                .map(|(node, counts)| {
                    let mut room = self.options[node.option].alloc.clone();
                    for &(c, n) in counts {
                        for (r, q) in room.iter_mut().zip(self.classes[c].req.iter()) {
                            *r -= q * i64::from(n);
                        }
                    }
                    room
                })
                .collect();
            for (c, left) in remaining.iter_mut().enumerate() {
                for (j, node) in nodes.iter().enumerate() {
                    if *left == 0 {
                        break;
                    }
                    if self.options[node.option].classes.binary_search(&c).is_err() {
                        continue;
                    }
                    let already = on_node[j].iter().find(|t| t.0 == c).map_or(0, |t| t.1);
                    let k = self.fit_class(c, &room[j], already).min(*left);
                    if k == 0 {
                        continue;
                    }
                    for (r, q) in room[j].iter_mut().zip(self.classes[c].req.iter()) {
                        *r -= q * i64::from(k);
                    }
                    *left -= k;
                    match on_node[j].iter_mut().find(|t| t.0 == c) {
                        Some(t) => t.1 += k,
                        None => on_node[j].push((c, k)),
                    }
                }
            }
        }
        let out = nodes
            .iter()
            .zip(on_node)
            .filter(|(_, counts)| !counts.is_empty())
            .map(|(node, mut counts)| {
                counts.sort_unstable();
                PackedNode {
                    option: node.option,
                    counts,
                }
            })
            .collect();
        (out, remaining)
    }

    /// Does option `o` fit within the pool's remaining limits?
    pub fn within_limits(&self, limits: &[Vec<Option<i64>>], o: usize) -> bool {
        let opt = &self.options[o];
        limits[opt.pool]
            .iter()
            .zip(&opt.capacity)
            .all(|(l, c)| l.is_none_or(|l| *c <= l))
    }

    /// Take option `o`'s capacity off its pool's limits.
    pub fn charge_limits(&self, limits: &mut [Vec<Option<i64>>], o: usize) {
        let opt = &self.options[o];
        for (l, c) in limits[opt.pool].iter_mut().zip(&opt.capacity) {
            if let Some(l) = l {
                *l -= c;
            }
        }
    }

    /// Total price of a solution's nodes.
    pub fn cost(&self, nodes: &[PackedNode]) -> f64 {
        nodes.iter().map(|n| self.options[n.option].price).sum()
    }

    /// Sum of penalties of the unplaced pods.
    pub fn penalty(&self, unplaced: &[u32]) -> f64 {
        unplaced
            .iter()
            .zip(&self.classes)
            .map(|(u, c)| *u as f64 * c.penalty)
            .sum()
    }

    /// The cheapest option that hosts exactly these pods, within limits given that
    /// `current` (if any) is released. Used to right-size a node after packing.
    pub fn cheapest_host(
        &self,
        counts: &[(usize, u32)],
        limits: &[Vec<Option<i64>>],
        current: Option<usize>,
    ) -> Option<usize> {
        let mut used = vec![0i64; self.dims];
        for (c, n) in counts {
            for (u, r) in used.iter_mut().zip(self.classes[*c].req.iter()) {
                *u += r * *n as i64;
            }
        }
        let mut best: Option<usize> = None;
        for (o, opt) in self.options.iter().enumerate() {
            if best.is_some_and(|b| self.options[b].price <= opt.price) {
                continue;
            }
            if !counts
                .iter()
                .all(|(c, _)| opt.classes.binary_search(c).is_ok())
            {
                continue;
            }
            if !used.iter().zip(&opt.alloc).all(|(u, a)| u <= a) {
                continue;
            }
            let fits_limit = limits[opt.pool].iter().enumerate().all(|(d, l)| {
                l.is_none_or(|l| {
                    let released = match current {
                        Some(cur) if self.options[cur].pool == opt.pool => {
                            self.options[cur].capacity[d]
                        }
                        _ => 0,
                    };
                    opt.capacity[d] <= l + released
                })
            });
            if fits_limit {
                best = Some(o);
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(req: Vec<i64>, demand: u32) -> ClassDemand {
        ClassDemand {
            ffd_key: (req[0], 0),
            req: req.into(),
            demand,
            penalty: 1000.0,
            per_node: u32::MAX,
        }
    }

    fn option(alloc: Vec<i64>, classes: Vec<usize>) -> NodeChoice {
        NodeChoice {
            pool: 0,
            price: 1.0,
            capacity: vec![0; alloc.len()],
            alloc,
            classes,
            handle: 0,
        }
    }

    /// dims: cpu, rule A (1 unit per node), rule B (2 units per node).
    fn problem(options: Vec<NodeChoice>) -> PackProblem {
        PackProblem {
            dims: 3,
            classes: vec![
                class(vec![100, 1, 0], 5), // one per node under rule A
                class(vec![100, 0, 1], 5), // two per node under rule B
                class(vec![100, 0, 1], 5), // also rule B, another class
            ],
            options,
            limits: vec![vec![None, None, None]],
        }
    }

    #[test]
    fn a_rule_only_one_class_per_node_can_meet_becomes_that_class_cap() {
        // Classes 1 and 2 (rule B) never share an option: both rules become caps.
        let p = problem(vec![
            option(vec![1000, 1, 2], vec![0, 1]),
            option(vec![1000, 1, 2], vec![0, 2]),
        ]);
        let q = p.with_caps(&[false, true, true]);
        assert_eq!(q.dims, 1);
        assert_eq!(
            q.classes.iter().map(|c| c.per_node).collect::<Vec<_>>(),
            vec![1, 2, 2]
        );
        assert_eq!(q.options[0].alloc, vec![1000]);
        assert_eq!(q.fit_class(0, &[1000], 0), 1);
        assert_eq!(q.fit_class(1, &[1000], 1), 1);
        assert_eq!(q.fit_class(1, &[1000], 2), 0);
    }

    #[test]
    fn a_rule_two_classes_can_meet_on_one_node_stays_a_dimension() {
        // Classes 1 and 2 may share the first option: rule B must stay a resource
        // (together they may take only 2 units), rule A still becomes a cap.
        let p = problem(vec![option(vec![1000, 1, 2], vec![0, 1, 2])]);
        let q = p.with_caps(&[false, true, true]);
        assert_eq!(q.dims, 2);
        assert_eq!(q.classes[0].per_node, 1);
        assert_eq!(q.classes[1].per_node, u32::MAX);
        assert_eq!(*q.classes[1].req, [100, 1]);
        assert_eq!(q.options[0].alloc, vec![1000, 2]);
    }

    #[test]
    fn one_per_node_deployments_of_one_shape_merge_and_are_handed_back_within_their_caps() {
        let mut a = class(vec![100], 3);
        a.per_node = 1;
        let mut b = class(vec![100], 2);
        b.per_node = 1;
        // Same shape, no cap, but another priority: not interchangeable with a or b.
        let c = ClassDemand {
            penalty: 2000.0,
            ..class(vec![100], 4)
        };
        let p = PackProblem {
            dims: 1,
            classes: vec![a, b, c],
            options: vec![option(vec![1000], vec![0, 1, 2])],
            limits: vec![vec![None]],
        };
        let (q, groups) = p.aggregated().expect("a and b merge");
        assert_eq!(groups, vec![0, 0, 1]);
        assert_eq!(q.classes.len(), 2);
        assert_eq!((q.classes[0].demand, q.classes[0].per_node), (5, 2));
        assert_eq!(q.options[0].classes, vec![0, 1]);
        // Three nodes with two merged pods each (one more than there are), and the
        // uncapped class: a gets one per node, b one on two of them, the sixth slot
        // stays empty; c's four pods go back whole.
        let merged = vec![
            PackedNode {
                option: 0,
                counts: vec![(0, 2), (1, 4)],
            },
            PackedNode {
                option: 0,
                counts: vec![(0, 2)],
            },
            PackedNode {
                option: 0,
                counts: vec![(0, 2)],
            },
        ];
        let (nodes, left) = p.disaggregate(&groups, &merged);
        assert_eq!(left, vec![0, 0, 0]);
        for n in &nodes {
            assert!(n.counts.iter().all(|(c, k)| *c == 2 || *k == 1), "{n:?}");
        }
        let total = |c: usize| -> u32 {
            nodes
                .iter()
                .flat_map(|n| &n.counts)
                .filter(|(k, _)| *k == c)
                .map(|(_, n)| n)
                .sum()
        };
        assert_eq!((total(0), total(1), total(2)), (3, 2, 4));
        // Fewer merged pods than demand: the rest is reported, or goes into spare room.
        let (nodes, left) = p.disaggregate(
            &groups,
            &[PackedNode {
                option: 0,
                counts: vec![(0, 1)],
            }],
        );
        assert_eq!(nodes.len(), 1);
        // Spare room on the one node takes one more of b (cap 1 each), not more of a.
        assert_eq!(nodes[0].counts, vec![(0, 1), (1, 1), (2, 4)]);
        assert_eq!(left, vec![2, 1, 0]);
    }

    #[test]
    fn options_offering_different_units_keep_the_rule_a_dimension() {
        let p = problem(vec![
            option(vec![1000, 1, 2], vec![0]),
            option(vec![1000, 0, 2], vec![0]),
        ]);
        let q = p.with_caps(&[false, true, true]);
        assert_eq!(q.classes[0].per_node, u32::MAX);
        assert_eq!(*q.classes[0].req, [100, 1]);
    }
}
