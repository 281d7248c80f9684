//! The pricing problem of column generation: the most valuable set of pods one node
//! can hold, a bounded integer knapsack in several dimensions (cpu, memory, pods,
//! GPUs, ...). Solved exactly by depth-first branch and bound, with the minimum over
//! dimensions of the one-dimension fractional bounds as the upper bound. When the node
//! budget runs out the answer is the best found plus a valid upper bound.

/// One kind of pod that may go into the node.
#[derive(Debug, Clone)]
pub struct Item<'a> {
    pub class: usize,
    pub value: f64,
    pub req: &'a [i64],
    /// At most this many (the remaining demand).
    pub max: u32,
}

/// The best packing found and a proven upper bound on the best possible value.
#[derive(Debug, Clone)]
pub struct Packing {
    pub value: f64,
    pub counts: Vec<(usize, u32)>,
    pub upper_bound: f64,
}

struct Search<'a> {
    items: Vec<Item<'a>>,
    /// Surrogate constraint: per-dimension weights, item sizes, and items by value per
    /// unit of surrogate size.
    surrogate: Option<(Vec<f64>, Vec<f64>, Vec<usize>)>,
    /// Per dimension, item indices by value per unit of that dimension, best first.
    order: Vec<Vec<usize>>,
    counts: Vec<u32>,
    best_value: f64,
    best_counts: Vec<u32>,
    /// Scratch: per item, how many still fit.
    most: Vec<f64>,
    nodes: usize,
    node_limit: usize,
    truncated: bool,
    /// Packings worth no more than this are not sought (the caller's threshold): a
    /// branch whose bound cannot beat it is pruned, which at column generation's end,
    /// when most options have no improving pattern, proves so in a few nodes instead
    /// of searching for the best of the useless ones up to the node limit.
    floor: f64,
}

/// Maximise the total value of items within `cap`. `threshold` is the value that
/// matters to the caller (a node option's reduced price): only packings worth more are
/// sought (`value` 0 and `upper_bound` the threshold when none exists), and the search
/// stops proving optimality once it has one, or a bound at or below it. An infinite
/// threshold asks for the best packing.
pub fn best_packing(
    cap: &[i64],
    items: Vec<Item<'_>>,
    node_limit: usize,
    threshold: f64,
) -> Packing {
    let mut items: Vec<Item> = items
        .into_iter()
        .filter(|it| it.value > 0.0 && it.max > 0)
        .map(|mut it| {
            it.max = it.max.min(fit(it.req, cap));
            it
        })
        .filter(|it| it.max > 0)
        .collect();
    let share = |it: &Item| -> f64 {
        it.req
            .iter()
            .zip(cap)
            .filter(|(_, c)| **c > 0)
            .map(|(r, c)| *r as f64 / *c as f64)
            .fold(0.0, f64::max)
            .max(1e-12)
    };
    items.sort_by(|a, b| {
        (b.value / share(b))
            .total_cmp(&(a.value / share(a)))
            .then(a.class.cmp(&b.class))
    });
    let floor = if threshold.is_finite() {
        threshold.max(0.0)
    } else {
        0.0
    };
    // A quick search with the per-dimension bound; most pricing problems end here.
    let mut s = Search::new(items, cap, None, node_limit.min(1_000), floor);
    let root_bound = s.bound(0, cap);
    s.dfs(0, &mut cap.to_vec(), 0.0);
    let mut upper_bound = s.best_value.max(floor);
    if s.truncated && s.best_value > threshold {
        upper_bound = root_bound.max(s.best_value);
    } else if s.truncated {
        // Several resources bind together: bound with the surrogate constraint built
        // from the knapsack LP's dual, which is as strong as the LP at the root.
        upper_bound = root_bound.max(s.best_value);
        match surrogate(cap, &s.items) {
            // Proven: nothing beats the threshold.
            Some((_, lp_bound)) if lp_bound <= threshold => {
                upper_bound = lp_bound.max(s.best_value)
            }
            Some((weights, lp_bound)) => {
                let mut deep = Search::new(s.items.clone(), cap, Some(&weights), node_limit, floor);
                deep.best_value = s.best_value;
                deep.best_counts.clone_from(&s.best_counts);
                if let Some((value, counts)) = rounded_lp(cap, &deep.items)
                    && value > deep.best_value
                {
                    deep.best_value = value;
                    deep.best_counts = counts;
                }
                deep.dfs(0, &mut cap.to_vec(), 0.0);
                upper_bound = if deep.truncated {
                    root_bound.min(lp_bound).max(deep.best_value)
                } else {
                    deep.best_value.max(floor)
                };
                s = deep;
            }
            None => {}
        }
    }
    let counts = s
        .best_counts
        .iter()
        .enumerate()
        .filter(|(_, c)| **c > 0)
        .map(|(j, c)| (s.items[j].class, *c))
        .collect();
    Packing {
        value: s.best_value,
        counts,
        upper_bound,
    }
}

impl<'a> Search<'a> {
    fn new(
        items: Vec<Item<'a>>,
        cap: &[i64],
        weights: Option<&[f64]>,
        node_limit: usize,
        floor: f64,
    ) -> Self {
        let order = (0..cap.len())
            .map(|d| {
                let mut idx: Vec<usize> =
                    (0..items.len()).filter(|&j| items[j].req[d] > 0).collect();
                idx.sort_by(|&a, &b| {
                    (items[b].value / items[b].req[d] as f64)
                        .total_cmp(&(items[a].value / items[a].req[d] as f64))
                });
                idx
            })
            .collect();
        let surrogate = weights.map(|w| {
            let size: Vec<f64> = items
                .iter()
                .map(|it| it.req.iter().zip(w).map(|(r, w)| *r as f64 * w).sum())
                .collect();
            let mut idx: Vec<usize> = (0..items.len()).filter(|&j| size[j] > 0.0).collect();
            idx.sort_by(|&a, &b| (items[b].value / size[b]).total_cmp(&(items[a].value / size[a])));
            (w.to_vec(), size, idx)
        });
        let n = items.len();
        Search {
            items,
            surrogate,
            order,
            counts: vec![0; n],
            best_value: 0.0,
            best_counts: vec![0; n],
            most: vec![0.0; n],
            nodes: 0,
            node_limit,
            truncated: false,
            floor,
        }
    }
}

/// The dual of the knapsack's LP relaxation,
/// `min Σ_d w_d + Σ_j max_j·u_j  s.t.  Σ_d (req_jd / cap_d)·w_d + u_j ≥ value_j`,
/// made feasible by construction (u_j raised to cover any slack the solver left), so
/// its objective is a valid upper bound whatever the solver's accuracy. Returns the
/// weights per unit of each dimension and that bound.
fn surrogate(cap: &[i64], items: &[Item<'_>]) -> Option<(Vec<f64>, f64)> {
    let mut lp = super::lp::LinearProgram::default();
    let dims: Vec<usize> = (0..cap.len())
        .filter(|&d| cap[d] > 0 && items.iter().any(|it| it.req[d] > 0))
        .collect();
    let w: Vec<usize> = dims
        .iter()
        .map(|_| lp.var(0.0, f64::INFINITY, false, 1.0))
        .collect();
    let u: Vec<usize> = items
        .iter()
        .map(|it| lp.var(0.0, f64::INFINITY, false, it.max as f64))
        .collect();
    for (j, it) in items.iter().enumerate() {
        let mut row: Vec<(usize, f64)> = dims
            .iter()
            .zip(&w)
            .map(|(&d, &v)| (v, it.req[d] as f64 / cap[d] as f64))
            .collect();
        row.push((u[j], 1.0));
        lp.rows_ge.push((row, it.value));
    }
    let x = lp.solve(None, None).ok()?;
    let weights_scaled: Vec<f64> = w.iter().map(|&v| x[v].max(0.0)).collect();
    let mut bound: f64 = weights_scaled.iter().sum();
    for (j, it) in items.iter().enumerate() {
        let covered: f64 = dims
            .iter()
            .zip(&weights_scaled)
            .map(|(&d, wd)| wd * it.req[d] as f64 / cap[d] as f64)
            .sum();
        bound += it.max as f64 * x[u[j]].max(it.value - covered).max(0.0);
    }
    let mut weights = vec![0.0; cap.len()];
    for (&d, wd) in dims.iter().zip(&weights_scaled) {
        weights[d] = wd / cap[d] as f64;
    }
    Some((weights, bound * (1.0 + 1e-9)))
}

/// The LP relaxation's solution rounded down, then filled greedily by value density:
/// with many small pods per node this lands within a pod or two of the LP value.
fn rounded_lp(cap: &[i64], items: &[Item<'_>]) -> Option<(f64, Vec<u32>)> {
    let mut lp = super::lp::LinearProgram {
        maximize: true,
        ..Default::default()
    };
    let vars: Vec<usize> = items
        .iter()
        .map(|it| lp.var(0.0, it.max as f64, false, it.value))
        .collect();
    for (d, c) in cap.iter().enumerate() {
        let row: Vec<(usize, f64)> = items
            .iter()
            .zip(&vars)
            .filter(|(it, _)| it.req[d] > 0)
            .map(|(it, v)| (*v, it.req[d] as f64 / (*c).max(1) as f64))
            .collect();
        if !row.is_empty() {
            lp.rows_le.push((row, if *c > 0 { 1.0 } else { 0.0 }));
        }
    }
    let x = lp.solve(None, None).ok()?;
    let mut room = cap.to_vec();
    let mut counts = vec![0u32; items.len()];
    for (j, it) in items.iter().enumerate() {
        let k = ((x[vars[j]] + 1e-9).floor().max(0.0) as u32)
            .min(fit(it.req, &room))
            .min(it.max);
        counts[j] = k;
        for (r, q) in room.iter_mut().zip(it.req) {
            *r -= q * k as i64;
        }
    }
    // Items are sorted best density first.
    for (j, it) in items.iter().enumerate() {
        let k = fit(it.req, &room).min(it.max - counts[j]);
        counts[j] += k;
        for (r, q) in room.iter_mut().zip(it.req) {
            *r -= q * k as i64;
        }
    }
    let value = items
        .iter()
        .zip(&counts)
        .map(|(it, k)| it.value * *k as f64)
        .sum();
    Some((value, counts))
}

/// A fast heuristic: fill by value density, largest count first, and also try each
/// item alone. Used before the exact search, which only runs when this finds nothing.
pub fn greedy_packing(cap: &[i64], items: &[Item<'_>]) -> Packing {
    let share = |it: &Item| -> f64 {
        it.req
            .iter()
            .zip(cap)
            .filter(|(_, c)| **c > 0)
            .map(|(r, c)| *r as f64 / *c as f64)
            .fold(0.0, f64::max)
            .max(1e-12)
    };
    let mut order: Vec<usize> = (0..items.len())
        .filter(|&j| items[j].value > 0.0 && items[j].max > 0)
        .collect();
    order.sort_by(|&a, &b| {
        (items[b].value / share(&items[b])).total_cmp(&(items[a].value / share(&items[a])))
    });
    let mut room = cap.to_vec();
    let mut value = 0.0;
    let mut counts = Vec::new();
    for &j in &order {
        let k = fit(items[j].req, &room).min(items[j].max);
        if k > 0 {
            for (r, q) in room.iter_mut().zip(items[j].req) {
                *r -= q * k as i64;
            }
            value += items[j].value * k as f64;
            counts.push((items[j].class, k));
        }
    }
    let mut best = Packing {
        value,
        counts,
        upper_bound: f64::INFINITY,
    };
    for &j in &order {
        let k = fit(items[j].req, cap).min(items[j].max);
        let v = items[j].value * k as f64;
        if v > best.value {
            best = Packing {
                value: v,
                counts: vec![(items[j].class, k)],
                upper_bound: f64::INFINITY,
            };
        }
    }
    best
}

/// Every maximal packing worth at least `min_value`: the columns an exact solve needs
/// (a plan can always use a maximal packing in place of a smaller one of the same node,
/// and a packing worth less than `min_value` is proven useless by the caller's bound).
/// Items of value 0 take part (they fill nodes for free). Maximal means no item below
/// its `max` still fits in the room left. `None` when there are more than
/// `max_packings` or the search visits more than `node_limit` nodes: the caller then
/// cannot claim it saw every column.
pub fn maximal_packings(
    cap: &[i64],
    items: Vec<Item<'_>>,
    min_value: f64,
    max_packings: usize,
    node_limit: usize,
) -> Option<Vec<Vec<(usize, u32)>>> {
    let mut items: Vec<Item> = items
        .into_iter()
        .filter(|it| it.value >= 0.0)
        .map(|mut it| {
            it.max = it.max.min(fit(it.req, cap));
            it
        })
        .filter(|it| it.max > 0)
        .collect();
    items.sort_by(|a, b| b.value.total_cmp(&a.value).then(a.class.cmp(&b.class)));
    let mut s = Search::new(items, cap, None, node_limit, min_value);
    let mut out = Vec::new();
    s.enumerate(0, &mut cap.to_vec(), 0.0, min_value, max_packings, &mut out);
    (!s.truncated).then_some(out)
}

/// Take `count` pods of `req` out of `room` (a negative count puts them back).
fn take(room: &mut [i64], req: &[i64], count: i64) {
    for (r, q) in room.iter_mut().zip(req) {
        *r -= q * count;
    }
}

fn fit(req: &[i64], room: &[i64]) -> u32 {
    super::problem::PackProblem::fit_count(req, room)
}

impl Search<'_> {
    /// Upper bound on the value items `k..` can add within `room`: the minimum over
    /// dimensions of the fractional knapsack in that dimension alone.
    fn bound(&mut self, k: usize, room: &[i64]) -> f64 {
        for j in k..self.items.len() {
            self.most[j] = fit(self.items[j].req, room).min(self.items[j].max) as f64;
        }
        let free: f64 = (k..self.items.len())
            .map(|j| self.items[j].value * self.most[j])
            .sum();
        let mut best = free;
        for (d, order) in self.order.iter().enumerate() {
            if order.is_empty() {
                continue;
            }
            let mut left = room[d] as f64;
            // Items that use none of this dimension are bounded by their max alone.
            let mut total = free;
            for &j in order {
                if j >= k {
                    total -= self.items[j].value * self.most[j];
                }
            }
            for &j in order {
                if j < k || left <= 0.0 {
                    continue;
                }
                let it = &self.items[j];
                let take = self.most[j].min(left / it.req[d] as f64);
                total += take * it.value;
                left -= take * it.req[d] as f64;
            }
            best = best.min(total);
        }
        if let Some((weights, size, order)) = &self.surrogate {
            let mut left: f64 = room.iter().zip(weights).map(|(r, w)| *r as f64 * w).sum();
            let mut total: f64 = (k..self.items.len())
                .filter(|&j| size[j] <= 0.0)
                .map(|j| self.items[j].value * self.most[j])
                .sum();
            for &j in order {
                if j < k || left <= 0.0 {
                    continue;
                }
                let take = self.most[j].min(left / size[j]);
                total += take * self.items[j].value;
                left -= take * size[j];
            }
            best = best.min(total);
        }
        best
    }

    /// Depth-first over every count of every item from `k` on, collecting the maximal
    /// packings worth at least `min_value` (see [`maximal_packings`]).
    fn enumerate(
        &mut self,
        k: usize,
        room: &mut [i64],
        value: f64,
        min_value: f64,
        max_packings: usize,
        out: &mut Vec<Vec<(usize, u32)>>,
    ) {
        let tolerance = 1e-9 * min_value.abs().max(1.0);
        if k == self.items.len() {
            let maximal = self
                .items
                .iter()
                .zip(&self.counts)
                .all(|(it, c)| *c >= it.max || fit(it.req, room) == 0);
            if maximal && value + tolerance >= min_value && self.counts.iter().any(|c| *c > 0) {
                if out.len() >= max_packings {
                    self.truncated = true;
                    return;
                }
                out.push(
                    self.counts
                        .iter()
                        .enumerate()
                        .filter(|(_, c)| **c > 0)
                        .map(|(j, c)| (self.items[j].class, *c))
                        .collect(),
                );
            }
            return;
        }
        self.nodes += 1;
        if self.nodes > self.node_limit {
            self.truncated = true;
            return;
        }
        if value + self.bound(k, room) + tolerance < min_value {
            return;
        }
        let (req, item_value, most) = {
            let it = &self.items[k];
            (it.req, it.value, fit(it.req, room).min(it.max))
        };
        for c in (0..=most).rev() {
            take(room, req, i64::from(c));
            self.counts[k] = c;
            self.enumerate(
                k + 1,
                room,
                value + item_value * c as f64,
                min_value,
                max_packings,
                out,
            );
            take(room, req, -i64::from(c));
            if self.truncated {
                break;
            }
        }
        self.counts[k] = 0;
    }

    fn dfs(&mut self, k: usize, room: &mut [i64], value: f64) {
        if value > self.best_value + 1e-12 {
            self.best_value = value;
            self.best_counts.copy_from_slice(&self.counts);
        }
        if k == self.items.len() {
            return;
        }
        self.nodes += 1;
        if self.nodes > self.node_limit {
            self.truncated = true;
            return;
        }
        let target = self.best_value.max(self.floor);
        if value + self.bound(k, room) <= target * (1.0 + 1e-9) + 1e-12 {
            return;
        }
        let (req, item_value, most) = {
            let it = &self.items[k];
            (it.req, it.value, fit(it.req, room).min(it.max))
        };
        for c in (0..=most).rev() {
            take(room, req, i64::from(c));
            self.counts[k] = c;
            self.dfs(k + 1, room, value + item_value * c as f64);
            take(room, req, -i64::from(c));
            if self.truncated {
                break;
            }
        }
        self.counts[k] = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_finite_threshold_prunes_what_cannot_beat_it() {
        let req = [3i64, 1];
        let items = || {
            vec![Item {
                class: 0,
                value: 1.0,
                req: &req,
                max: 10,
            }]
        };
        // Three fit (by the first dimension), worth 3.0.
        let best = best_packing(&[10, 10], items(), 10_000, f64::INFINITY);
        assert_eq!((best.value, best.counts.clone()), (3.0, vec![(0, 3)]));
        let below = best_packing(&[10, 10], items(), 10_000, 2.5);
        assert_eq!((below.value, below.counts), (3.0, vec![(0, 3)]));
        // Nothing beats 3.5: no packing, and the threshold is the proven bound.
        let above = best_packing(&[10, 10], items(), 10_000, 3.5);
        assert!(above.counts.is_empty() && above.value == 0.0);
        assert!(above.upper_bound >= 3.0 && above.upper_bound <= 3.5 + 1e-9);
    }

    #[test]
    fn maximal_packings_are_every_maximal_packing_above_the_floor() {
        // cap 10: A (size 4, worth 4, up to 2), B (size 3, worth 2, up to 3).
        let (a, b) = ([4i64], [3i64]);
        let items = || {
            vec![
                Item {
                    class: 0,
                    value: 4.0,
                    req: &a,
                    max: 2,
                },
                Item {
                    class: 1,
                    value: 2.0,
                    req: &b,
                    max: 3,
                },
            ]
        };
        let sorted = |mut v: Vec<Vec<(usize, u32)>>| {
            v.sort();
            v
        };
        // Maximal packings: 2A+0B (room 2: no B fits) worth 8, 1A+2B worth 8, 0A+3B
        // worth 6. 1A+1B (room 3) is not maximal; neither is 2A... it is (room 2).
        let all = maximal_packings(&[10], items(), 0.0, 100, 10_000).unwrap();
        assert_eq!(
            sorted(all),
            vec![vec![(0, 1), (1, 2)], vec![(0, 2)], vec![(1, 3)]]
        );
        let rich = maximal_packings(&[10], items(), 7.0, 100, 10_000).unwrap();
        assert_eq!(sorted(rich), vec![vec![(0, 1), (1, 2)], vec![(0, 2)]]);
        // Too many to list: no answer rather than a partial one.
        assert!(maximal_packings(&[10], items(), 0.0, 2, 10_000).is_none());
    }

    #[test]
    fn finds_the_two_dimensional_optimum() {
        // cap: 10 cpu, 10 mem. A: (6,1) worth 6; B: (1,6) worth 6; C: (5,5) worth 5.5.
        let (a, b, c) = ([6, 1], [1, 6], [5, 5]);
        let items = vec![
            Item {
                class: 0,
                value: 6.0,
                req: &a,
                max: 5,
            },
            Item {
                class: 1,
                value: 6.0,
                req: &b,
                max: 5,
            },
            Item {
                class: 2,
                value: 5.5,
                req: &c,
                max: 5,
            },
        ];
        let p = best_packing(&[10, 10], items, 10_000, f64::INFINITY);
        assert_eq!(p.value, 12.0);
        assert_eq!(p.upper_bound, 12.0);
        let mut counts = p.counts.clone();
        counts.sort();
        assert_eq!(counts, [(0, 1), (1, 1)]);
    }

    #[test]
    fn respects_max_and_truncation_keeps_a_valid_bound() {
        let r = [1, 1];
        let items = vec![Item {
            class: 0,
            value: 1.0,
            req: &r,
            max: 3,
        }];
        let p = best_packing(&[10, 10], items, 10_000, f64::INFINITY);
        assert_eq!(p.value, 3.0);
        let reqs: Vec<[i64; 2]> = (1..=12).map(|i| [i, 13 - i]).collect();
        let items: Vec<Item> = reqs
            .iter()
            .enumerate()
            .map(|(i, r)| Item {
                class: i,
                value: 1.0 + i as f64 * 0.1,
                req: r,
                max: 9,
            })
            .collect();
        let exact = best_packing(&[50, 50], items.clone(), 10_000_000, f64::INFINITY);
        let cut = best_packing(&[50, 50], items, 5, f64::INFINITY);
        assert!(cut.upper_bound >= exact.value - 1e-9);
        assert!(cut.value <= exact.value + 1e-9);
    }
}
