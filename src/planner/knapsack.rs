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
}

/// Maximise the total value of items within `cap`.
pub fn best_packing(cap: &[i64], items: Vec<Item<'_>>, node_limit: usize) -> Packing {
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
    let dims = cap.len();
    let order = (0..dims)
        .map(|d| {
            let mut idx: Vec<usize> = (0..items.len()).filter(|&j| items[j].req[d] > 0).collect();
            idx.sort_by(|&a, &b| {
                (items[b].value / items[b].req[d] as f64)
                    .total_cmp(&(items[a].value / items[a].req[d] as f64))
            });
            idx
        })
        .collect();
    let n = items.len();
    let mut s = Search {
        items,
        order,
        counts: vec![0; n],
        best_value: 0.0,
        best_counts: vec![0; n],
        most: vec![0.0; n],
        nodes: 0,
        node_limit,
        truncated: false,
    };
    let root_bound = s.bound(0, cap);
    let mut residual = cap.to_vec();
    s.dfs(0, &mut residual, 0.0);
    let counts = s
        .best_counts
        .iter()
        .enumerate()
        .filter(|(_, c)| **c > 0)
        .map(|(j, c)| (s.items[j].class, *c))
        .collect();
    let upper_bound = if s.truncated {
        root_bound.max(s.best_value)
    } else {
        s.best_value
    };
    Packing {
        value: s.best_value,
        counts,
        upper_bound,
    }
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
        best
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
        if value + self.bound(k, room) <= self.best_value * (1.0 + 1e-9) + 1e-12 {
            return;
        }
        let (req, item_value, most) = {
            let it = &self.items[k];
            (it.req, it.value, fit(it.req, room).min(it.max))
        };
        for c in (0..=most).rev() {
            for (r, q) in room.iter_mut().zip(req) {
                *r -= q * c as i64;
            }
            self.counts[k] = c;
            self.dfs(k + 1, room, value + item_value * c as f64);
            for (r, q) in room.iter_mut().zip(req) {
                *r += q * c as i64;
            }
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
        let p = best_packing(&[10, 10], items, 10_000);
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
        let p = best_packing(&[10, 10], items, 10_000);
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
        let exact = best_packing(&[50, 50], items.clone(), 10_000_000);
        let cut = best_packing(&[50, 50], items, 5);
        assert!(cut.upper_bound >= exact.value - 1e-9);
        assert!(cut.value <= exact.value + 1e-9);
    }
}
