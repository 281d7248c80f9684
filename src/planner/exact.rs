//! The exact solve for small queues: the cheapest set of nodes that covers a demand
//! vector, as a shortest path over residual demands.
//!
//! A plan is a sequence of nodes; each node takes some pods off the residual demand,
//! at its price, until nothing is left (or a pod is left out, at its penalty). Nodes
//! can be taken in any order, so the search always covers the first class still
//! pending next, and states are residual vectors — different orders of the same nodes
//! meet in one state instead of being searched again, which is what makes this
//! faster than branch and bound over pattern counts when a queue has few pod shapes.
//!
//! The search is A*: with prices `π` that price no pattern above its node
//! (`π·a_p ≤ price_p`, dual feasible), `π·r` is a consistent lower bound on covering
//! any residual `r`, so the first time the empty residual is reached its cost is the
//! optimum, and the least open `g + π·r` is a lower bound on the optimum whenever
//! the search stops early.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

/// A node the search may open: its price and the pods of each class it holds at most
/// (trimmed to what is left when it is opened).
pub struct CoverColumn<'a> {
    pub price: f64,
    pub counts: &'a [(usize, u32)],
}

/// What [`shortest_cover`] found.
#[derive(Debug, Clone)]
pub struct Cover {
    /// The columns opened (by index, with repeats) and the pods left out per class,
    /// when a cover cheaper than the cutoff was found.
    pub plan: Option<(Vec<usize>, Vec<u32>)>,
    /// Its cost with penalties.
    pub cost: Option<f64>,
    /// A lower bound on every cover made of these columns: the optimum's cost when the
    /// search finished, else the least cost it had not ruled out (capped at the
    /// cutoff).
    pub bound: f64,
    /// The search finished (not stopped by its state or time limit).
    pub finished: bool,
    /// Residual states reached.
    pub states: usize,
    /// When the search stopped early: the columns opened by the deepest partial
    /// covers it had open (least `π·r` left), for the caller to finish another way —
    /// an anytime answer.
    pub partial: Vec<Vec<usize>>,
}

/// Partial covers handed back by a stopped search.
const PARTIALS: usize = 16;

/// Heap entry: `f = g + π·r`, least first.
struct Open {
    f: f64,
    state: usize,
}

impl PartialEq for Open {
    fn eq(&self, other: &Self) -> bool {
        self.f.total_cmp(&other.f) == Ordering::Equal && self.state == other.state
    }
}
impl Eq for Open {}
impl PartialOrd for Open {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Open {
    fn cmp(&self, other: &Self) -> Ordering {
        // Least f first; among equals, the later state (deeper) first.
        other
            .f
            .total_cmp(&self.f)
            .then(self.state.cmp(&other.state))
    }
}

/// How a state was reached: from which state, by which column (or by leaving a pod of
/// a class out).
#[derive(Clone, Copy)]
enum Step {
    Start,
    Column { from: usize, column: usize },
    LeaveOut { from: usize, class: usize },
}

/// A residual demand as one number in mixed radix (class `c` has weight
/// `Π_{k<c} (demand_k + 1)`), so states hash and step as integers.
type Key = u128;

/// Multiplicative hashing for [`Key`]s: the default SipHash costs more than the rest of
/// a step.
#[derive(Default)]
struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 =
                (self.0.rotate_left(5) ^ u64::from(*b)).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
        }
    }
    fn write_u128(&mut self, v: u128) {
        let folded = (v as u64) ^ ((v >> 64) as u64).rotate_left(29);
        self.0 = (folded ^ (folded >> 31)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

type KeyMap = HashMap<Key, usize, std::hash::BuildHasherDefault<KeyHasher>>;

/// The cheapest cover of `demand` by `columns` (each any number of times) and
/// left-out pods at `penalty`, strictly cheaper than `cutoff`, by A* with the
/// heuristic `π·r` (`prices` must be dual feasible for every column: see the module
/// doc). Stops after `max_states` states or at `deadline`, with the bound it proved.
pub fn shortest_cover(
    demand: &[u32],
    prices: &[f64],
    penalty: &[f64],
    columns: &[CoverColumn<'_>],
    cutoff: f64,
    max_states: usize,
    deadline: Option<std::time::Instant>,
) -> Cover {
    let n = demand.len();
    let tolerance = 1e-9 * cutoff.abs().max(1.0);
    let h0: f64 = demand
        .iter()
        .zip(prices)
        .map(|(v, p)| f64::from(*v) * p)
        .sum();
    // Mixed-radix weights; a demand too large to number gives no search at all.
    let mut weight: Vec<Key> = Vec::with_capacity(n);
    let mut w: Key = 1;
    for d in demand {
        weight.push(w);
        let Some(next) = w.checked_mul(Key::from(*d) + 1) else {
            return Cover {
                plan: None,
                cost: None,
                bound: h0.min(cutoff),
                finished: false,
                states: 0,
                partial: Vec::new(),
            };
        };
        w = next;
    }
    let start: Key = demand
        .iter()
        .zip(&weight)
        .map(|(d, w)| Key::from(*d) * w)
        .sum();
    // Columns by the classes they hold.
    let mut holding: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (j, col) in columns.iter().enumerate() {
        for (c, k) in col.counts {
            if *k > 0 && *c < n {
                holding[*c].push(j);
            }
        }
    }
    let mut index = KeyMap::default();
    let mut keys: Vec<Key> = vec![start];
    let mut g: Vec<f64> = vec![0.0];
    let mut hs: Vec<f64> = vec![h0];
    let mut step: Vec<Step> = vec![Step::Start];
    let mut closed: Vec<bool> = vec![false];
    index.insert(start, 0);
    let mut heap = BinaryHeap::new();
    heap.push(Open { f: h0, state: 0 });
    let mut popped = 0usize;
    let mut r = vec![0u32; n];
    let mut bound = cutoff;
    let mut finished = true;
    while let Some(Open { f, state }) = heap.pop() {
        if closed[state] || f > g[state] + hs[state] + tolerance {
            continue;
        }
        if f >= cutoff - tolerance {
            // Everything still open costs at least the cutoff.
            break;
        }
        let key = keys[state];
        if key == 0 {
            // The empty residual: the optimum.
            return Cover {
                plan: Some(unwind(&step, state, n)),
                cost: Some(g[state]),
                bound: g[state],
                finished: true,
                states: keys.len(),
                partial: Vec::new(),
            };
        }
        closed[state] = true;
        popped += 1;
        if keys.len() >= max_states
            || (popped.is_multiple_of(16)
                && deadline.is_some_and(|d| std::time::Instant::now() >= d))
        {
            finished = false;
            bound = f;
            closed[state] = false;
            heap.push(Open { f, state });
            break;
        }
        let mut rest = key;
        for c in (0..n).rev() {
            r[c] = (rest / weight[c]) as u32;
            rest %= weight[c];
        }
        let Some(first) = r.iter().position(|v| *v > 0) else {
            continue;
        };
        let (g_here, h_here) = (g[state], hs[state]);
        let mut relax = |next: Key, h_next: f64, cost: f64, how: Step| {
            let g_next = g_here + cost;
            let f_next = g_next + h_next;
            if f_next >= cutoff - tolerance {
                return;
            }
            let id = match index.get(&next) {
                Some(&id) => {
                    if g_next >= g[id] - 1e-12 {
                        return;
                    }
                    id
                }
                None => {
                    let id = keys.len();
                    index.insert(next, id);
                    keys.push(next);
                    g.push(f64::INFINITY);
                    hs.push(h_next);
                    step.push(Step::Start);
                    closed.push(false);
                    id
                }
            };
            g[id] = g_next;
            step[id] = how;
            closed[id] = false;
            heap.push(Open {
                f: f_next,
                state: id,
            });
        };
        // Leave one pod of the first pending class out.
        relax(
            key - weight[first],
            h_here - prices[first],
            penalty[first],
            Step::LeaveOut {
                from: state,
                class: first,
            },
        );
        // Or open a node holding some of it.
        for &j in &holding[first] {
            let col = &columns[j];
            let (mut next, mut h_next) = (key, h_here);
            for (c, k) in col.counts {
                let take = (*k).min(r[*c]);
                next -= Key::from(take) * weight[*c];
                h_next -= f64::from(take) * prices[*c];
            }
            relax(
                next,
                h_next.max(0.0),
                col.price,
                Step::Column {
                    from: state,
                    column: j,
                },
            );
        }
    }
    let mut partial = Vec::new();
    if !finished {
        // The open states with the least left to cover.
        let mut open: Vec<(f64, usize)> = heap
            .iter()
            .filter(|o| !closed[o.state] && o.f <= g[o.state] + hs[o.state] + tolerance)
            .map(|o| (hs[o.state], o.state))
            .collect();
        open.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        open.dedup_by_key(|(_, s)| *s);
        for (_, state) in open.into_iter().take(PARTIALS) {
            partial.push(unwind(&step, state, n).0);
        }
    }
    Cover {
        plan: None,
        cost: None,
        bound: if finished { cutoff } else { bound.min(cutoff) },
        finished,
        states: keys.len(),
        partial,
    }
}

/// The columns and left-out pods on the path to `state`.
fn unwind(step: &[Step], mut state: usize, n: usize) -> (Vec<usize>, Vec<u32>) {
    let mut opened = Vec::new();
    let mut left_out = vec![0u32; n];
    loop {
        match step[state] {
            Step::Start => break,
            Step::Column { from, column } => {
                opened.push(column);
                state = from;
            }
            Step::LeaveOut { from, class } => {
                left_out[class] += 1;
                state = from;
            }
        }
    }
    opened.reverse();
    (opened, left_out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cheapest_cover_and_proves_it() {
        // Demand: 3 of class 0, 2 of class 1. Columns: A holds 2×0 for 1.0, B holds
        // 1×0 + 2×1 for 1.5, C holds 3×0 + 2×1 for 3.0.
        let (a, b, c) = ([(0, 2)], [(0, 1), (1, 2)], [(0, 3), (1, 2)]);
        let columns = [
            CoverColumn {
                price: 1.0,
                counts: &a,
            },
            CoverColumn {
                price: 1.5,
                counts: &b,
            },
            CoverColumn {
                price: 3.0,
                counts: &c,
            },
        ];
        // Dual feasible prices: 0.5 per pod of class 0, 0.5 per pod of class 1.
        let cover = shortest_cover(
            &[3, 2],
            &[0.5, 0.5],
            &[10.0, 10.0],
            &columns,
            100.0,
            1000,
            None,
        );
        assert!(cover.finished);
        assert_eq!(cover.cost, Some(2.5));
        let (mut opened, left_out) = cover.plan.unwrap();
        opened.sort();
        assert_eq!((opened, left_out), (vec![0, 1], vec![0, 0]));
        assert_eq!(cover.bound, 2.5);
        // Nothing below a cutoff of 2.5: no plan, and the cutoff is proven.
        let none = shortest_cover(
            &[3, 2],
            &[0.5, 0.5],
            &[10.0, 10.0],
            &columns,
            2.5,
            1000,
            None,
        );
        assert!(none.plan.is_none() && none.finished && none.bound == 2.5);
        // Stopped after one state, with weaker prices: a bound between π·d and the
        // optimum.
        let cut = shortest_cover(
            &[3, 2],
            &[0.4, 0.4],
            &[10.0, 10.0],
            &columns,
            100.0,
            1,
            None,
        );
        assert!(!cut.finished && cut.plan.is_none() && !cut.partial.is_empty());
        assert!(
            cut.bound >= 2.0 - 1e-9 && cut.bound <= 2.5 + 1e-9,
            "{}",
            cut.bound
        );
        let full = shortest_cover(
            &[3, 2],
            &[0.4, 0.4],
            &[10.0, 10.0],
            &columns,
            100.0,
            1000,
            None,
        );
        assert_eq!(full.cost, Some(2.5));
    }

    #[test]
    fn leaves_a_pod_out_when_that_is_cheaper() {
        let a = [(0, 1)];
        let columns = [CoverColumn {
            price: 5.0,
            counts: &a,
        }];
        let cover = shortest_cover(&[2], &[3.0], &[3.0], &columns, 100.0, 1000, None);
        assert_eq!(cover.cost, Some(6.0));
        assert_eq!(cover.plan.unwrap().1, vec![2]);
    }
}
