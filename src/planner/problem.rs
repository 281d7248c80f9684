//! The packing problem both strategies solve: classes of identical pods with a demand,
//! node options (NodePool × offering) with a price and dense allocatable, which
//! classes each option can host, and what remains of each pool's limits.

/// Pods with identical requests and constraints, counted.
#[derive(Debug, Clone)]
pub struct ClassDemand {
    /// Dense requests.
    pub req: Vec<i64>,
    /// Pods of this class still to place.
    pub demand: u32,
    /// Objective weight of leaving one pod unplaced (higher priority, higher penalty).
    pub penalty: f64,
    /// Sort key for first-fit-decreasing: (cpu, memory) as Karpenter orders pods.
    pub ffd_key: (i64, i64),
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
            for (u, r) in used.iter_mut().zip(&self.classes[*c].req) {
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
