//! The optimal strategy: a set-covering model over node patterns, solved by column
//! generation with good_lp, then made integral.
//!
//! A *pattern* is one node option with a count of pods of each class that fits it in
//! every resource, so every column is a feasible node by construction (per-node
//! feasibility, not an aggregate-capacity relaxation). The master problem
//!
//! ```text
//! min Σ_p price_p·x_p + Σ_i penalty_i·s_i
//!     Σ_p a_ip·x_p + s_i ≥ demand_i           (every pod placed, or paid for as unplaced)
//!     Σ_p capacity_p,r·x_p ≤ limit_pool,r       (NodePool limits)
//! ```
//!
//! is solved by a warm revised simplex ([`super::simplex`]) that keeps its basis while
//! patterns are added and gives the dual prices, and new patterns come from an exact
//! multi-dimensional knapsack per option ([`super::knapsack`]). Per-node rules reach it
//! as per-class caps ([`PackProblem::with_caps`]), which the knapsack and the greedy
//! packer honour; classes that differ only in their caps share one row
//! ([`PackProblem::aggregated`]) and get their pods back node by node. Its LP value
//! is a lower bound on any plan. The integer plan takes the floor of the LP solution,
//! then solves the residual as a MIP over the generated patterns, then right-sizes
//! every node to the cheapest option that holds its pods. Queues of up to
//! [`DIVE_MAX_PODS`] pods still above the accepted gap dive ([`ColumnGeneration::dive`]:
//! the LP re-solved for what is left after each node taken), and those of up to
//! [`EXACT_MAX_PODS`] pods still above it then get the exact step
//! ([`ColumnGeneration::exact`]): the patterns that could be in a cheaper plan, listed
//! from the LP's dual prices, searched exhaustively ([`super::exact`]). The result is
//! compared with first-fit-decreasing and the better one is returned, so `optimal` is
//! never dearer than `greedy`.

use std::time::Instant;

use tracing::debug;

use super::exact;
use super::greedy;
use super::knapsack::{self, Item};
use super::lp::LinearProgram;
use super::node_counts;
use super::problem::{PackProblem, PackSolution, PackedNode};
use super::simplex::{Column, Simplex, Status};

/// One column: a node option and the pods of each class it holds.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Pattern {
    option: usize,
    counts: Vec<(usize, u32)>,
}

/// What one column-generation run found.
struct LpOutcome {
    /// Primal value per pattern.
    x: Vec<f64>,
    /// Lagrangian lower bound on cost + penalties, when an exact pricing pass proved
    /// one.
    bound: Option<f64>,
    /// The LP's optimal value (cost + penalties).
    value: f64,
    /// Dual feasible prices per class (no pattern of any option priced above its node:
    /// Farley's π/θ) and the bound `π·demand` they prove; none where a pool limit was
    /// priced, which the exact step does not model.
    bound_prices: Option<(Vec<f64>, f64)>,
}

/// Prices from the dual of the restricted master: per class (π) and per limit row (μ),
/// with the two parts of the dual objective `Σ demand·π − Σ rhs·μ`.
struct DualPrices {
    pi: Vec<f64>,
    mu: Vec<f64>,
    pi_part: f64,
    mu_part: f64,
}

struct ColumnGeneration<'a> {
    p: &'a PackProblem,
    /// Iterations allowed over all runs (fewer under a work budget).
    max_iterations: usize,
    patterns: Vec<Pattern>,
    /// The patterns generated so far and their index, for de-duplication.
    known: std::collections::HashMap<Pattern, usize>,
    /// The restricted master of the current run, kept warm between iterations.
    master: Option<Master>,
    deadline: Instant,
    /// The gap the caller accepts: heuristic pricing that improves the LP by much less
    /// than this over [`TAIL_WINDOW`] iterations has tailed off (see [`tailed_off`]), and
    /// an LP proven within half of it is good enough.
    rel_gap: f64,
    /// Until then, stalled exact passes go on (the bound often climbs after a plateau);
    /// after it, a stall ends generation. A quarter of the time limit (or of the
    /// iterations under a work budget).
    patience: Patience,
    /// Statistics for tracing.
    iterations: usize,
}

/// Pricing stops after this many branch-and-bound nodes per option and returns a bound.
const KNAPSACK_NODE_LIMIT: usize = 3_000;
/// At most this many new patterns per iteration.
const COLUMNS_PER_ITERATION: usize = 40;
/// ... and per exact pass, which prices every option exactly and costs as much as many
/// heuristic passes: on the constrained benchmark mix (10k pods, its largest tier)
/// adding the best 150 of its improving patterns instead of 40 left the master 1 % lower
/// when generation stopped (820.0 → 812.2, the rounded plan 821.9 → 814.2) in the same
/// time (2.9 s → 2.7 s).
const EXACT_COLUMNS_PER_ITERATION: usize = 150;
const MAX_ITERATIONS: usize = 300;
/// Tail-off: heuristic pricing gives way to exact pricing (which also proves a bound)
/// once the restricted master improved by less than [`TAIL_SHARE`] of the accepted gap
/// over the last this many iterations ...
const TAIL_WINDOW: usize = 10;
/// ... (but never before this many iterations) ...
const TAIL_MIN_ITERATIONS: usize = 20;
/// ... instead of adding heuristic columns that move the LP by hundredths of a percent
/// (seen on the constrained benchmark mix: 820.9 → 811.5 over 280 iterations and 9 s,
/// while the plan rounded from it is 5 % above either).
const TAIL_SHARE: f64 = 0.1;
/// Column generation also stops once its proven bound is within this share of the
/// accepted gap of the restricted master's value.
const LP_GAP_SHARE: f64 = 0.5;
/// Exact passes over which a stall is judged (see [`stalled`]).
const STALL_PASSES: usize = 3;
/// The share of the budget column generation may spend on stalled exact passes.
const PATIENCE_SHARE: f64 = 0.25;

/// When a stall may end column generation.
enum Patience {
    At(Instant),
    AfterIterations(usize),
}
/// The most classes (distinct pod shapes with demand) column generation takes on.
const MAX_MASTER_ROWS: usize = 1_500;

/// Why a packing has no bound.
const NO_BOUND_SHAPES: &str =
    "more distinct pod shapes than column generation takes (1,500): first-fit plan";
const NO_BOUND_LP: &str = "the LP relaxation failed: first-fit plan";
const NO_BOUND_UNPLACED: &str = "pool limits leave pods unplaced, more than the LP relaxation leaves out: its bound is for placing more pods than this plan does";
const NO_BOUND_DEADLINE: &str = "the time limit came before column generation proved a bound";

/// How a dive takes nodes from each LP ([`ColumnGeneration::dive`]).
struct Dive {
    /// Every whole node the LP wants at once (else one node per step).
    whole: bool,
    /// Per step, which of the LP's patterns (by value, largest first) to take.
    choices: Vec<usize>,
}

/// What the residual MIP may spend.
enum MipBudget {
    Time(std::time::Duration),
    /// Branch-and-bound nodes (deterministic).
    Nodes(u64),
}

/// The residual MIP's share of the whole time limit, at most.
const MIP_SHARE: f64 = 0.1;
/// The MIP over every generated pattern runs for queues of at most this many pods ...
const POLISH_MAX_PODS: u32 = 500;
/// ... and at most this many patterns ...
const POLISH_MAX_COLUMNS: usize = 3_000;
/// ... for at most this share of the time limit (and half of what is left).
const POLISH_SHARE: f64 = 0.25;
/// The residual MIP may always take this long (within [`MIP_SHARE`]), however quick
/// the LP was.
const MIN_MIP: std::time::Duration = std::time::Duration::from_millis(50);
/// The residual MIP's relative gap never exceeds this, however small the residual.
const MAX_RESIDUAL_GAP: f64 = 0.2;
/// The exact step runs for queues of at most this many pods ...
const EXACT_MAX_PODS: u32 = 500;
/// ... when the patterns that could beat the incumbent number at most this many ...
const EXACT_MAX_COLUMNS: usize = 20_000;
/// ... and listing them takes at most this many search nodes per option ...
const EXACT_SEARCH_NODES: usize = 200_000;
/// ... and its search reaches at most this many residual states (each a key, two
/// costs, a step, a flag and a hash entry: on the order of 100 bytes, estimated, not
/// measured) ...
const EXACT_MAX_STATES: usize = 300_000;
/// ... (under a work budget, this many per millisecond of the limit) ...
const EXACT_STATES_PER_WORK_MS: usize = 20;
/// ... within this share of the time limit, counted from the plan's start.
const EXACT_SHARE: f64 = 0.75;
/// Queues of up to this many pods still above the gap after rounding get a dive
/// ([`ColumnGeneration::dive`]): one LP re-solve per node taken.
const DIVE_MAX_PODS: u32 = 500;
/// The dives may take this share of the time limit (one takes milliseconds on queues
/// of up to 100 pods) ...
const DIVE_SHARE: f64 = 0.1;
/// ... and make at most this many dives (the bound under a work budget).
const MAX_DIVES: usize = 64;
/// Queues of up to this many pods still above the gap get the node-count relaxation
/// ([`node_counts`]) ...
const NODE_COUNT_MAX_PODS: u32 = 500;
/// ... for at most this many branch-and-bound nodes per MIP ...
const NODE_COUNT_NODES: u64 = 2_000;
/// ... and this many rounds of cuts (this many under a work budget, where no clock
/// bounds them) ...
const NODE_COUNT_ROUNDS: usize = 20;
const NODE_COUNT_WORK_ROUNDS: usize = 4;
/// ... and this share of the time limit.
const NODE_COUNT_SHARE: f64 = 0.25;
/// Pivots allowed per re-optimisation of the restricted master.
const MAX_PIVOTS: usize = 100_000;

/// The demand and limits a restricted master was built for.
type MasterKey = (Vec<u32>, Vec<(usize, usize, i64)>);

/// The restricted master LP of one column-generation run as a warm simplex:
///
/// ```text
/// class rows  Σ_p a_ip·x_p + s_i − t_i = demand_i   (s_i: unplaced, at its penalty)
/// limit rows  Σ_p K_kp·x_p + u_k = rhs_k
/// ```
///
/// with `s` and `u` the starting basis.
struct Master {
    key: MasterKey,
    lp: Simplex,
    /// Simplex column of each pattern added so far, in pattern order (none for a
    /// pattern that holds no class with demand).
    columns: Vec<Option<usize>>,
    /// Row of each class with demand.
    class_row: Vec<Option<usize>>,
    /// Row of the first limit row; limit `k` is row `limit_row0 + k`.
    limit_row0: usize,
}

impl Master {
    fn new(p: &PackProblem, key: MasterKey) -> Master {
        let (demand, limited) = &key;
        let mut class_row = vec![None; p.classes.len()];
        let mut b = Vec::new();
        let mut unit_costs = Vec::new();
        for (c, d) in demand.iter().enumerate() {
            if *d > 0 {
                class_row[c] = Some(b.len());
                b.push(f64::from(*d));
                unit_costs.push(p.classes[c].penalty);
            }
        }
        let limit_row0 = b.len();
        for (_, _, l) in limited {
            b.push(limit_rhs(*l));
            unit_costs.push(0.0);
        }
        let mut lp = Simplex::new(b, unit_costs);
        for r in 0..limit_row0 {
            lp.add_column(Column {
                entries: vec![(r, -1.0)],
                cost: 0.0,
            });
        }
        Master {
            key,
            lp,
            columns: Vec::new(),
            class_row,
            limit_row0,
        }
    }

    fn column(&self, p: &PackProblem, pat: &Pattern) -> Column {
        let (demand, limited) = &self.key;
        let opt = &p.options[pat.option];
        let mut entries: Vec<(usize, f64)> = pat
            .counts
            .iter()
            .filter_map(|(c, n)| self.class_row[*c].map(|r| (r, f64::from((*n).min(demand[*c])))))
            .collect();
        for (k, (pool, d, l)) in limited.iter().enumerate() {
            if *pool == opt.pool && opt.capacity[*d] != 0 {
                entries.push((self.limit_row0 + k, limit_coef(opt.capacity[*d], *l)));
            }
        }
        Column {
            entries,
            cost: opt.price,
        }
    }
}
/// Re-pricing the residual after rounding only polishes; keep it short.
const RESIDUAL_ITERATIONS: usize = 15;

/// When the optimal strategy stops.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Wall-clock deadline (far away under a work budget).
    pub deadline: Instant,
    /// The plan's whole time limit.
    pub time_limit: std::time::Duration,
    /// A work budget in "milliseconds" instead of the clock: column-generation
    /// iterations and branch-and-bound nodes are counted (see
    /// [`super::Budget::Work`]).
    pub work: Option<u64>,
    /// Whether the exact step may run.
    pub exact: bool,
}

/// Solve `p` to (near) optimality within `limits`, to the relative gap `rel_gap`:
/// interchangeable classes merged first (see [`PackProblem::aggregated`]).
///
/// Small queues that may take the exact step are not merged: merging exists to keep
/// the master small at scale, and with caps it is a relaxation whose bound the exact
/// step could not close (three one-per-node pods and one more of the same shape:
/// merged bound $5, optimum $7.5).
pub fn solve(p: &PackProblem, pool_order: &[usize], stop: Limits, rel_gap: f64) -> PackSolution {
    let pods: u32 = p.classes.iter().map(|c| c.demand).sum();
    let merged = if stop.exact && pods <= EXACT_MAX_PODS {
        None
    } else {
        p.aggregated()
    };
    let Some((q, groups)) = merged else {
        return solve_classes(p, pool_order, stop, rel_gap);
    };
    // One row per group of interchangeable classes; the merged plan's nodes are handed
    // back to the classes, and what the caps did not let them take back is packed
    // first-fit on top.
    debug!(
        classes = p.classes.len(),
        merged = q.classes.len(),
        with_demand = q.classes.iter().filter(|c| c.demand > 0).count(),
        capped = q
            .classes
            .iter()
            .filter(|c| c.demand > 0 && c.per_node < u32::MAX)
            .count(),
        dims = q.dims,
        "interchangeable classes merged"
    );
    let merged = solve_classes(&q, pool_order, stop, rel_gap);
    let (mut nodes, residual) = p.disaggregate(&groups, &merged.nodes);
    let mut limits = p.limits.clone();
    for n in &nodes {
        p.charge_limits(&mut limits, n.option);
    }
    let left = residual.iter().sum::<u32>();
    let unplaced = first_fit_rest(p, pool_order, &residual, &mut limits, &mut nodes);
    if left > 0 {
        debug!(
            pods = left,
            "pods the caps did not let the merged plan's nodes take back"
        );
    }
    right_size(p, &mut nodes, &mut limits);
    // The merged problem is a relaxation: its bound for placing what its plan placed
    // holds here for placing as much, and shifts by the penalty of any difference.
    let left_out = p.penalty(&unplaced);
    let merged_left_out = q.penalty(&merged.unplaced);
    let (lower_bound, bound_missing) = match merged.lower_bound {
        Some(_) if left_out > merged_left_out + 1e-9 => (None, Some(NO_BOUND_UNPLACED)),
        Some(b) => (Some((b + merged_left_out - left_out).max(0.0)), None),
        None => (None, merged.bound_missing),
    };
    PackSolution {
        nodes,
        unplaced,
        lower_bound,
        bound_missing,
    }
}

/// [`solve`] for a problem whose classes are all distinct.
fn solve_classes(
    p: &PackProblem,
    pool_order: &[usize],
    limits: Limits,
    rel_gap: f64,
) -> PackSolution {
    let Limits {
        deadline,
        time_limit,
        work,
        exact: exact_allowed,
    } = limits;
    let greedy = greedy::solve(p, pool_order);
    if p.classes.iter().all(|c| c.demand == 0) || p.options.is_empty() {
        // Nothing to place, or nothing to place it on: no node is bought.
        return PackSolution {
            lower_bound: Some(0.0),
            bound_missing: None,
            ..greedy
        };
    }
    let mut cg = ColumnGeneration {
        max_iterations: work.map_or(MAX_ITERATIONS, |w| {
            ((w / super::WORK_MS_PER_ITERATION) as usize).clamp(3, MAX_ITERATIONS)
        }),
        p,
        patterns: Vec::new(),
        known: std::collections::HashMap::new(),
        master: None,
        deadline,
        rel_gap,
        patience: match work {
            Some(_) => Patience::AfterIterations(0),
            None => Patience::At(Instant::now() + time_limit.mul_f64(PATIENCE_SHARE)),
        },
        iterations: 0,
    };
    if let Patience::AfterIterations(n) = &mut cg.patience {
        *n = (cg.max_iterations as f64 * PATIENCE_SHARE) as usize;
    }
    let demand: Vec<u32> = p.classes.iter().map(|c| c.demand).collect();
    // The restricted master's basis inverse is dense (rows²): beyond this many pod
    // shapes at once it would cost more time and memory than the plan has, so the
    // first-fit packing stands, without a bound.
    let rows = demand.iter().filter(|d| **d > 0).count();
    if rows > MAX_MASTER_ROWS {
        debug!(rows, "too many distinct pod shapes for column generation");
        return PackSolution {
            lower_bound: None,
            bound_missing: Some(NO_BOUND_SHAPES),
            ..greedy
        };
    }
    cg.seed(&greedy.nodes);
    let t0 = Instant::now();
    let Some(root) = cg.run(&demand, &p.limits, true) else {
        return PackSolution {
            bound_missing: Some(NO_BOUND_LP),
            ..greedy
        };
    };
    debug!(
        iterations = cg.iterations,
        patterns = cg.patterns.len(),
        lp = root.value,
        bound = ?root.bound,
        ms = t0.elapsed().as_millis() as u64,
        "column generation converged"
    );

    let mut residual = demand.clone();
    let mut limits = p.limits.clone();
    let mut nodes: Vec<PackedNode> = Vec::new();
    let mut x = root.x.clone();
    // Take the whole nodes the LP wants, re-price the rest, repeat while that helps.
    for _ in 0..2 {
        let before = nodes.len();
        commit_floors(p, &cg.patterns, &x, &mut residual, &mut limits, &mut nodes);
        if residual.iter().all(|r| *r == 0) || nodes.len() == before || Instant::now() >= deadline {
            break;
        }
        match cg.run(&residual, &limits, false) {
            Some(lp) => x = lp.x,
            None => break,
        }
    }
    // The fractional rest: a MIP over the patterns the last LP used, bounded in time.
    if residual.iter().any(|r| *r > 0) && Instant::now() < deadline {
        let support: Vec<usize> = (0..cg.patterns.len())
            .filter(|&j| x.get(j).is_some_and(|v| *v > 1e-7))
            .collect();
        let t1 = Instant::now();
        // Half of what is left, but no more than a tenth of the whole time limit, nor
        // more than the LP took (at least MIN_MIP): microlp's branch and bound rarely
        // closes the last percent on these, and a plan that spends its budget here is
        // no better than one that stops (constrained 1k mix: 1 s of MIP bought $0.13/h
        // of $130.8/h over 100 ms).
        let budget = deadline
            .saturating_duration_since(t1)
            .mul_f64(0.5)
            .min(time_limit.mul_f64(MIP_SHARE))
            .min(t1.duration_since(t0).max(MIN_MIP));
        let budget = match work {
            Some(w) => MipBudget::Nodes(w.max(10)),
            None => MipBudget::Time(budget),
        };
        // The accepted gap is the whole plan's: the whole nodes committed above are
        // fixed, so the residual needs closing only to half of that gap in dollars
        // (on the constrained 1k mix the residual is a sixth of the plan, and the
        // MIP used its whole second to close the residual's own 1 %).
        let residual_lp: f64 = support
            .iter()
            .map(|&j| p.options[cg.patterns[j].option].price * x[j])
            .sum();
        let whole = p.cost(&nodes) + residual_lp;
        let mip_gap = if residual_lp > 1e-9 {
            (LP_GAP_SHARE * rel_gap * whole / residual_lp).clamp(rel_gap, MAX_RESIDUAL_GAP)
        } else {
            rel_gap
        };
        let mip = cg.mip(&residual, &limits, mip_gap, &support, budget);
        debug!(
            ms = t1.elapsed().as_millis() as u64,
            residual = residual.iter().sum::<u32>(),
            columns = support.len(),
            ok = mip.is_some(),
            "residual MIP"
        );
        if let Some(mip) = mip {
            for (j, k) in mip {
                for _ in 0..k {
                    commit(p, &cg.patterns[j], &mut residual, &mut limits, &mut nodes);
                }
            }
        }
    }
    // Whatever is left (time ran out or the MIP failed): first-fit-decreasing.
    let mut unplaced = first_fit_rest(p, pool_order, &residual, &mut limits, &mut nodes);
    right_size(p, &mut nodes, &mut limits);

    let pods: u32 = demand.iter().sum();
    // Small queues, still above the gap: dive. Rounding once leaves a residual that the
    // LP's patterns (made for the whole demand) fit badly; re-solving the LP for what
    // is left after each node taken fits it again. A dive takes milliseconds at these
    // sizes, so several are made: whole nodes first, one node at a time, then one node
    // at a time with one step taking the LP's second choice (limited discrepancy).
    if let Some(b) = root.bound
        && pods <= DIVE_MAX_PODS
        && Instant::now() < deadline
    {
        let t2 = Instant::now();
        // Under a work budget only MAX_DIVES bounds them (no clock: plans stay
        // deterministic).
        let until = match work {
            Some(_) => deadline,
            None => deadline.min(t2 + time_limit.mul_f64(DIVE_SHARE)),
        };
        let mut best = p.cost(&nodes) + p.penalty(&unplaced);
        let before = best;
        let mut dives: std::collections::VecDeque<Dive> = [
            Dive {
                whole: true,
                choices: Vec::new(),
            },
            Dive {
                whole: false,
                choices: Vec::new(),
            },
        ]
        .into();
        let mut made = 0;
        while let Some(how) = dives.pop_front()
            && made < MAX_DIVES
            && best > b * (1.0 + rel_gap)
            && Instant::now() < until
        {
            made += 1;
            let Some((dived, left, depth)) = cg.dive(pool_order, &demand, &p.limits, &how, until)
            else {
                break;
            };
            if !how.whole && how.choices.is_empty() {
                // Its discrepancies: the second choice at each step.
                dives.extend((0..depth).map(|d| {
                    let mut choices = vec![0; d + 1];
                    choices[d] = 1;
                    Dive {
                        whole: false,
                        choices,
                    }
                }));
            }
            let cost = p.cost(&dived) + p.penalty(&left);
            if cost < best - 1e-9 {
                best = cost;
                nodes = dived;
                unplaced = left;
            }
        }
        debug!(
            before,
            after = best,
            bound = b,
            dives = made,
            ms = t2.elapsed().as_millis() as u64,
            "dives"
        );
    }

    // Small queues: the rounded plan often sits several percent above the bound after a
    // few milliseconds of a two-second budget (random queues of 2–100 pods: median 1.6 %
    // over the bound). A MIP over every pattern generated, not only the LP's support,
    // may find a cheaper combination; it is kept only when it is cheaper.
    if let Some(b) = root.bound
        && pods <= POLISH_MAX_PODS
        && cg.patterns.len() <= POLISH_MAX_COLUMNS
        && p.cost(&nodes) + p.penalty(&unplaced) > b * (1.0 + rel_gap)
        && Instant::now() < deadline
    {
        let t2 = Instant::now();
        let budget = match work {
            Some(w) => MipBudget::Nodes(w.max(10)),
            None => MipBudget::Time(
                deadline
                    .saturating_duration_since(t2)
                    .mul_f64(0.5)
                    .min(time_limit.mul_f64(POLISH_SHARE)),
            ),
        };
        let all: Vec<usize> = (0..cg.patterns.len()).collect();
        if let Some(mip) = cg.mip(&demand, &p.limits, rel_gap, &all, budget) {
            let mut residual = demand.clone();
            let mut polished_limits = p.limits.clone();
            let mut polished = Vec::new();
            for (j, k) in mip {
                for _ in 0..k {
                    commit(
                        p,
                        &cg.patterns[j],
                        &mut residual,
                        &mut polished_limits,
                        &mut polished,
                    );
                }
            }
            let left = first_fit_rest(
                p,
                pool_order,
                &residual,
                &mut polished_limits,
                &mut polished,
            );
            right_size(p, &mut polished, &mut polished_limits);
            let before = p.cost(&nodes) + p.penalty(&unplaced);
            let after = p.cost(&polished) + p.penalty(&left);
            debug!(
                before,
                after,
                bound = b,
                ms = t2.elapsed().as_millis() as u64,
                "MIP over every generated pattern"
            );
            if after < before - 1e-9 {
                nodes = polished;
                unplaced = left;
            }
        }
    }

    // Small queues, still above the gap: the node-count relaxation (whole nodes, pods
    // packed in aggregate; see `node_counts`) bounds what the pattern LP's fractional
    // nodes leave open, and its node counts, packed, are another plan to try.
    let mut bound = root.bound;
    if let Some(b) = root.bound
        && pods <= NODE_COUNT_MAX_PODS
        && Instant::now() < deadline
    {
        let ours = p.cost(&nodes) + p.penalty(&unplaced);
        if ours > b * (1.0 + rel_gap) + 1e-9 {
            let t = Instant::now();
            // Under a work budget only node and round limits bound it (deterministic).
            let budget = node_counts::Budget {
                nodes_per_mip: NODE_COUNT_NODES,
                rounds: match work {
                    Some(_) => NODE_COUNT_WORK_ROUNDS,
                    None => NODE_COUNT_ROUNDS,
                },
                until: match work {
                    Some(_) => None,
                    None => Some(deadline.min(t + time_limit.mul_f64(NODE_COUNT_SHARE))),
                },
            };
            if let Some(counted) = node_counts::solve(
                p,
                &demand,
                (&nodes, &unplaced),
                root.bound_prices.as_ref().map(|(pi, _)| pi.as_slice()),
                rel_gap,
                budget,
            ) {
                if let Some(cb) = counted.bound {
                    bound = Some(b.max(cb));
                }
                let after = match counted.plan {
                    Some((mut packed, left)) => {
                        let mut counted_limits = p.limits.clone();
                        for n in &packed {
                            p.charge_limits(&mut counted_limits, n.option);
                        }
                        right_size(p, &mut packed, &mut counted_limits);
                        let cost = p.cost(&packed) + p.penalty(&left);
                        if cost < ours - 1e-9 {
                            nodes = packed;
                            unplaced = left;
                        }
                        cost
                    }
                    None => ours,
                };
                debug!(
                    ms = t.elapsed().as_millis() as u64,
                    before = ours,
                    after,
                    lp_bound = b,
                    bound = ?counted.bound,
                    rounds = counted.rounds,
                    searched = counted.searched,
                    stopped = ?counted.stopped,
                    "node-count relaxation"
                );
            }
        }
    }

    // Small queues, still above the gap: the exact step lists the patterns that can be
    // in a cheaper plan and searches them exhaustively (see `ColumnGeneration::exact`).
    if let (Some(b), Some((prices, farley))) = (bound, root.bound_prices.as_ref())
        && exact_allowed
        && pods <= EXACT_MAX_PODS
        && Instant::now() < deadline
    {
        let ours = p.cost(&nodes) + p.penalty(&unplaced);
        let theirs = p.cost(&greedy.nodes) + p.penalty(&greedy.unplaced);
        let ub = ours.min(theirs);
        if ub > b * (1.0 + rel_gap) + 1e-9 {
            let t3 = Instant::now();
            // The step may take the time left up to three quarters of the limit: a
            // search that cannot finish in that is rarely finished by the rest.
            let started = deadline.checked_sub(time_limit).unwrap_or(t3);
            let until = deadline.min(started + time_limit.mul_f64(EXACT_SHARE));
            let exact = cg.exact(
                pool_order, &demand, prices, *farley, ub, rel_gap, until, work,
            );
            debug!(
                ms = t3.elapsed().as_millis() as u64,
                before = ub,
                after = ?exact.objective,
                bound = exact.bound,
                columns = exact.columns,
                rounds = exact.rounds,
                states = exact.states,
                "exact step"
            );
            bound = Some(exact.bound.max(b));
            // Only a plan cheaper than both ours and greedy's comes back.
            if let Some((exact_nodes, left)) = exact.plan {
                nodes = exact_nodes;
                unplaced = left;
            }
        }
    }

    // The LP bounds cost plus the penalties of unplaced pods: with pods left out,
    // subtracting their penalty leaves a valid but meaningless number ($0.26 under a
    // $114.96 plan), so the plan goes without one and says why.
    // Pods no option can host are left out by every solution: their penalty is the
    // same constant in the LP and in any plan, so it comes off the bound exactly.
    let mut hostable = vec![false; p.classes.len()];
    for o in &p.options {
        for &c in &o.classes {
            hostable[c] = true;
        }
    }
    // The LP leaves pods out too when limits bind: its value is its nodes' cost plus
    // the penalties of what it leaves out.
    let lp_cost: f64 = root
        .x
        .iter()
        .zip(&cg.patterns)
        .map(|(v, pat)| v * p.options[pat.option].price)
        .sum();
    let lp_penalty = (root.value - lp_cost).max(0.0);
    let honest = |unplaced: &[u32]| -> (Option<f64>, Option<&'static str>) {
        let Some(b) = bound else {
            return (None, Some(NO_BOUND_DEADLINE));
        };
        // Every plan that leaves out no more (by penalty) than this one costs at least
        // `b − penalty(unplaced)`: a bound for placing what this plan places. It is
        // worth reporting only when the plan leaves out about what the LP does (within
        // the accepted gap of the LP's cost); leaving out more, it bounds nothing
        // useful ($0.26 under a $114.96 plan).
        let left_out = p.penalty(unplaced);
        let hostable_left = unplaced.iter().zip(&hostable).any(|(u, h)| *u > 0 && *h);
        if hostable_left && left_out - lp_penalty > rel_gap * lp_cost {
            return (None, Some(NO_BOUND_UNPLACED));
        }
        (Some((b - left_out).max(0.0)), None)
    };
    let placed_penalty = p.penalty(&unplaced);
    let ours = p.cost(&nodes) + placed_penalty;
    let theirs = p.cost(&greedy.nodes) + p.penalty(&greedy.unplaced);
    debug!(
        optimal = ours,
        greedy = theirs,
        bound = ?root.bound,
        "optimal vs greedy"
    );
    if ours <= theirs + 1e-9 {
        let (lower_bound, bound_missing) = honest(&unplaced);
        PackSolution {
            nodes,
            unplaced,
            lower_bound,
            bound_missing,
        }
    } else {
        let (lower_bound, bound_missing) = honest(&greedy.unplaced);
        PackSolution {
            lower_bound,
            bound_missing,
            ..greedy
        }
    }
}

/// Pack what is left of `residual` first-fit-decreasing onto new nodes (appended to
/// `nodes`, charged to `limits`); returns the pods still unplaced.
fn first_fit_rest(
    p: &PackProblem,
    pool_order: &[usize],
    residual: &[u32],
    limits: &mut [Vec<Option<i64>>],
    nodes: &mut Vec<PackedNode>,
) -> Vec<u32> {
    if residual.iter().all(|r| *r == 0) {
        return residual.to_vec();
    }
    let mut rest = p.clone();
    for (c, r) in rest.classes.iter_mut().zip(residual) {
        c.demand = *r;
    }
    rest.limits = limits.to_vec();
    let tail = greedy::solve(&rest, pool_order);
    for n in &tail.nodes {
        p.charge_limits(limits, n.option);
    }
    nodes.extend(tail.nodes);
    tail.unplaced
}

/// Commit floor(x) copies of every pattern.
fn commit_floors(
    p: &PackProblem,
    patterns: &[Pattern],
    x: &[f64],
    residual: &mut [u32],
    limits: &mut [Vec<Option<i64>>],
    nodes: &mut Vec<PackedNode>,
) {
    for (pat, v) in patterns.iter().zip(x) {
        let k = (v + 1e-7).floor() as u64;
        for _ in 0..k {
            if !commit(p, pat, residual, limits, nodes) {
                break;
            }
        }
    }
}

/// Launch one node of `pat`, trimmed to the residual demand. False when it would hold
/// nothing or break a limit.
fn commit(
    p: &PackProblem,
    pat: &Pattern,
    residual: &mut [u32],
    limits: &mut [Vec<Option<i64>>],
    nodes: &mut Vec<PackedNode>,
) -> bool {
    let counts: Vec<(usize, u32)> = pat
        .counts
        .iter()
        .map(|(c, n)| (*c, (*n).min(residual[*c])))
        .filter(|(_, n)| *n > 0)
        .collect();
    if counts.is_empty() || !p.within_limits(limits, pat.option) {
        return false;
    }
    p.charge_limits(limits, pat.option);
    for (c, n) in &counts {
        residual[*c] -= n;
    }
    nodes.push(PackedNode {
        option: pat.option,
        counts,
    });
    true
}

/// Move each node to the cheapest option that still holds its pods.
fn right_size(p: &PackProblem, nodes: &mut [PackedNode], limits: &mut [Vec<Option<i64>>]) {
    for node in nodes.iter_mut() {
        if let Some(better) = p.cheapest_host(&node.counts, limits, Some(node.option))
            && p.options[better].price < p.options[node.option].price - 1e-12
        {
            // Release the old capacity, charge the new.
            let old = node.option;
            for (l, c) in limits[p.options[old].pool]
                .iter_mut()
                .zip(&p.options[old].capacity)
            {
                if let Some(l) = l {
                    *l += c;
                }
            }
            p.charge_limits(limits, better);
            node.option = better;
        }
    }
}

impl ColumnGeneration<'_> {
    /// Start with the greedy solution's nodes (so the LP is never worse than greedy)
    /// and, per class, single-class patterns on its cheapest-per-pod options.
    fn seed(&mut self, greedy_nodes: &[PackedNode]) {
        for n in greedy_nodes {
            self.add(Pattern {
                option: n.option,
                counts: n.counts.clone(),
            });
        }
        let p = self.p;
        for (c, class) in p.classes.iter().enumerate() {
            if class.demand == 0 {
                continue;
            }
            let mut best: Vec<(f64, usize, u32)> = p
                .options
                .iter()
                .enumerate()
                .filter(|(_, o)| o.classes.binary_search(&c).is_ok())
                .map(|(i, o)| (i, p.fit_class(c, &o.alloc, 0).min(class.demand)))
                .filter(|(_, k)| *k > 0)
                .map(|(i, k)| (p.options[i].price / k as f64, i, k))
                .collect();
            best.sort_by(|a, b| a.0.total_cmp(&b.0));
            for (_, o, k) in best.into_iter().take(3) {
                self.add(Pattern {
                    option: o,
                    counts: vec![(c, k)],
                });
            }
        }
    }

    /// The index of `pat`, added if new.
    fn index_of(&mut self, mut pat: Pattern) -> usize {
        pat.counts.sort();
        if let Some(&j) = self.known.get(&pat) {
            return j;
        }
        self.known.insert(pat.clone(), self.patterns.len());
        self.patterns.push(pat);
        self.patterns.len() - 1
    }

    /// Add `pat`; false when it was known.
    fn add(&mut self, pat: Pattern) -> bool {
        let before = self.patterns.len();
        self.index_of(pat) == before
    }

    /// A plan by diving: solve the LP for what is left, take nodes from its solution,
    /// repeat until every pod is placed (the rest first-fit when `until` comes first).
    /// Each re-solve generates patterns for the residual, which rounding the root LP
    /// cannot. `how` says which nodes each step takes; returns the plan, the pods it
    /// leaves out, and how many steps it took.
    fn dive(
        &mut self,
        pool_order: &[usize],
        demand: &[u32],
        limits: &[Vec<Option<i64>>],
        how: &Dive,
        until: Instant,
    ) -> Option<(Vec<PackedNode>, Vec<u32>, usize)> {
        let p = self.p;
        let mut residual = demand.to_vec();
        let mut limits = limits.to_vec();
        let mut nodes: Vec<PackedNode> = Vec::new();
        let mut depth = 0;
        while residual.iter().any(|r| *r > 0) && Instant::now() < until {
            let lp = self.run(&residual, &limits, false)?;
            let before = nodes.len();
            if how.whole {
                commit_floors(
                    p,
                    &self.patterns,
                    &lp.x,
                    &mut residual,
                    &mut limits,
                    &mut nodes,
                );
                if nodes.len() > before {
                    continue;
                }
            }
            // One node of a pattern the LP uses, the largest value first, or the
            // `choices[depth]`-th.
            let mut used: Vec<usize> = (0..lp.x.len()).filter(|&j| lp.x[j] > 1e-7).collect();
            used.sort_by(|&a, &b| lp.x[b].total_cmp(&lp.x[a]).then(a.cmp(&b)));
            let skip = how
                .choices
                .get(depth)
                .copied()
                .unwrap_or(0)
                .min(used.len().saturating_sub(1));
            depth += 1;
            if !used
                .into_iter()
                .skip(skip)
                .any(|j| commit(p, &self.patterns[j], &mut residual, &mut limits, &mut nodes))
            {
                break;
            }
        }
        let unplaced = first_fit_rest(p, pool_order, &residual, &mut limits, &mut nodes);
        right_size(p, &mut nodes, &mut limits);
        Some((nodes, unplaced, depth))
    }

    /// Has generation used up its patience with stalls?
    fn impatient(&self) -> bool {
        match self.patience {
            Patience::At(t) => Instant::now() >= t,
            Patience::AfterIterations(n) => self.iterations >= n,
        }
    }

    /// Column generation for `demand` under `limits`. Returns the primal solution over
    /// the final patterns and a lower bound.
    /// With `exact`, pricing ends with an exact search, which proves the bound; without,
    /// generation stops when the heuristic finds nothing.
    fn run(
        &mut self,
        demand: &[u32],
        limits: &[Vec<Option<i64>>],
        exact: bool,
    ) -> Option<LpOutcome> {
        let p = self.p;
        let limited = limited_dims(limits);
        let mut bound = f64::NEG_INFINITY;
        let mut bound_prices: Option<(Vec<f64>, f64)> = None;
        let mut proven = false;
        let (mut t_lp, mut t_price) = (std::time::Duration::ZERO, std::time::Duration::ZERO);
        let mut run_iterations = 0;
        // The master's value each iteration, and (value, bound) after each exact pass.
        let mut history: Vec<f64> = Vec::new();
        let mut exact_history: Vec<(f64, f64)> = Vec::new();
        let mut exact_pricing = false;
        loop {
            self.iterations += 1;
            run_iterations += 1;
            let t = Instant::now();
            let DualPrices {
                pi,
                mu,
                pi_part,
                mu_part,
            } = self.solve_dual(demand, &limited)?;
            let dual_value = pi_part - mu_part;
            history.push(dual_value);
            if exact && !exact_pricing && tailed_off(&history, self.rel_gap) {
                debug!(
                    iterations = run_iterations,
                    lp = dual_value,
                    "heuristic pricing tailed off"
                );
                exact_pricing = true;
            }
            t_lp += t.elapsed();
            let t = Instant::now();
            // Price every option: heuristically first; exactly (which also yields the
            // bound) when the heuristic finds no improving pattern or has tailed off.
            let adjusted: Vec<f64> = p
                .options
                .iter()
                .map(|opt| {
                    opt.price
                        + limited
                            .iter()
                            .zip(&mu)
                            .filter(|((pool, _, _), _)| *pool == opt.pool)
                            .map(|((_, d, l), m)| m * limit_coef(opt.capacity[*d], *l))
                            .sum::<f64>()
                })
                .collect();
            let items_of = |o: usize| -> Vec<Item> {
                p.options[o]
                    .classes
                    .iter()
                    .filter(|&&c| demand[c] > 0 && pi[c] > 1e-9)
                    .map(|&c| Item {
                        class: c,
                        value: pi[c],
                        req: &p.classes[c].req,
                        max: demand[c].min(p.classes[c].per_node),
                    })
                    .collect()
            };
            let usable: Vec<usize> = (0..p.options.len())
                .filter(|&o| p.within_limits(limits, o))
                .collect();
            let improving = |value: f64, o: usize| value > adjusted[o] * (1.0 + 1e-7) + 1e-9;
            let mut new_cols: Vec<(f64, Pattern)> = Vec::new();
            for &o in &usable {
                let items = items_of(o);
                let packing = knapsack::greedy_packing(&p.options[o].alloc, &items);
                if improving(packing.value, o) {
                    new_cols.push((
                        (packing.value - adjusted[o]) / adjusted[o].max(1e-9),
                        Pattern {
                            option: o,
                            counts: packing.counts,
                        },
                    ));
                }
            }
            let mut lagrangian_gap = f64::INFINITY;
            let mut per_iteration = COLUMNS_PER_ITERATION;
            // Farley: θ = max(1, max_o UB_o / reduced price_o).
            let mut theta = f64::INFINITY;
            let duplicates_only = !new_cols.is_empty()
                && new_cols.iter().all(|(_, pat)| self.known.contains_key(pat));
            // The exact pass proves the bound but costs a knapsack search per option:
            // only within the time limit (past it the plan goes without a bound rather
            // than late).
            if exact
                && (new_cols.is_empty() || duplicates_only || exact_pricing)
                && Instant::now() < self.deadline
            {
                proven = true;
                per_iteration = EXACT_COLUMNS_PER_ITERATION;
                lagrangian_gap = 0.0;
                theta = 1.0;
                let packings = parallel_map(&usable, |o| {
                    let items = items_of(o);
                    (!items.is_empty()).then(|| {
                        knapsack::best_packing(
                            &p.options[o].alloc,
                            items,
                            KNAPSACK_NODE_LIMIT,
                            adjusted[o],
                        )
                    })
                });
                for (&o, packing) in usable.iter().zip(packings) {
                    let Some(packing) = packing else {
                        continue;
                    };
                    if packing.upper_bound > adjusted[o] {
                        theta = theta.max(packing.upper_bound / adjusted[o].max(1e-12));
                        // At most one node per pod of the classes it can hold is ever useful.
                        let max_nodes: u32 = p.options[o].classes.iter().map(|&c| demand[c]).sum();
                        lagrangian_gap += (packing.upper_bound - adjusted[o]) * max_nodes as f64;
                    }
                    if improving(packing.value, o) {
                        new_cols.push((
                            (packing.value - adjusted[o]) / adjusted[o].max(1e-9),
                            Pattern {
                                option: o,
                                counts: packing.counts,
                            },
                        ));
                    }
                }
            }
            t_price += t.elapsed();
            // The Lagrangian bound holds for any multipliers, so it stays valid even when
            // the LP solver hands back a slightly infeasible dual; at convergence the gap
            // is zero and it equals the LP value.
            // Farley's bound: π/θ is feasible for every pattern of every option.
            // Prices the exact step can use: no limit row priced (limits that do not
            // bind), so the bound is the covering problem's alone.
            let free_limits = mu.iter().all(|m| *m <= 0.0);
            let farley = pi_part / theta - mu_part;
            bound = bound.max(dual_value - lagrangian_gap).max(farley);
            if free_limits
                && theta.is_finite()
                && bound_prices.as_ref().is_none_or(|(_, b)| farley > *b)
            {
                bound_prices = Some((pi.iter().map(|v| v / theta).collect(), farley));
            }
            if theta.is_finite() {
                debug!(
                    theta,
                    lagrangian_gap, dual_value, bound, "exact pricing pass"
                );
                exact_history.push((dual_value, bound));
            }
            new_cols.sort_by(|a, b| b.0.total_cmp(&a.0));
            let mut added = 0;
            for (_, pat) in new_cols {
                if added >= per_iteration {
                    break;
                }
                if self.add(pat) {
                    added += 1;
                }
            }
            let converged = added == 0;
            tracing::trace!(
                iteration = run_iterations,
                dual_value,
                added,
                "cg iteration"
            );
            let cap = if exact {
                self.max_iterations
            } else {
                RESIDUAL_ITERATIONS
            };
            // Proven close enough: the LP is within a small share of the accepted gap
            // of its own optimum, so more columns cannot change the plan by much.
            let lp_proven =
                proven && dual_value - bound <= LP_GAP_SHARE * self.rel_gap * dual_value.abs();
            if converged
                || lp_proven
                || (self.impatient() && stalled(&exact_history, self.rel_gap))
                || run_iterations >= cap
                || self.iterations >= self.max_iterations
                || Instant::now() >= self.deadline
            {
                let t = Instant::now();
                let (x, value) = self.solve_primal(demand, &limited)?;
                debug!(
                    lp_ms = t_lp.as_millis() as u64,
                    price_ms = t_price.as_millis() as u64,
                    primal_ms = t.elapsed().as_millis() as u64,
                    "column generation timing"
                );
                return Some(LpOutcome {
                    x,
                    bound: proven.then_some(bound),
                    value,
                    bound_prices: if proven { bound_prices } else { None },
                });
            }
        }
    }

    /// Bring the warm restricted master up to date for `demand` and `limited` (built
    /// anew for a new run, else extended by the patterns generated since) and
    /// re-optimise it.
    fn sync_master(&mut self, demand: &[u32], limited: &[(usize, usize, i64)]) -> &Master {
        let p = self.p;
        let key = (demand.to_vec(), limited.to_vec());
        let mut master = match self.master.take() {
            Some(m) if m.key == key => m,
            _ => Master::new(p, key),
        };
        for pat in &self.patterns[master.columns.len()..] {
            let column = master.column(p, pat);
            // A pattern that holds none of this demand's classes only costs: the
            // residual masters after rounding leave it out (thousands of columns the
            // simplex would price on every pivot).
            let covers = column.entries.iter().any(|(r, _)| *r < master.limit_row0);
            master
                .columns
                .push(covers.then(|| master.lp.add_column(column)));
        }
        let status = master.lp.optimize(MAX_PIVOTS, self.deadline);
        if status != Status::Optimal {
            debug!(?status, "restricted master not solved to optimality");
        }
        self.master.insert(master)
    }

    /// Dual prices of the restricted master: π per class, μ per limit row, scaled
    /// down where needed so that no generated pattern prices below its cost (every
    /// bound built on them stays valid even if the simplex is slightly off).
    fn solve_dual(
        &mut self,
        demand: &[u32],
        limited: &[(usize, usize, i64)],
    ) -> Option<DualPrices> {
        let p = self.p;
        let master = self.sync_master(demand, limited);
        let y = master.lp.duals();
        let pi: Vec<f64> = (0..p.classes.len())
            .map(|c| match master.class_row[c] {
                Some(r) => y[r].clamp(0.0, p.classes[c].penalty),
                None => 0.0,
            })
            .collect();
        let mu: Vec<f64> = (0..limited.len())
            .map(|k| (-y[master.limit_row0 + k]).max(0.0))
            .collect();
        let mut scale = 1.0f64;
        for pat in &self.patterns {
            let opt = &p.options[pat.option];
            let gain: f64 = pat
                .counts
                .iter()
                .map(|(c, n)| pi[*c] * f64::from((*n).min(demand[*c])))
                .sum();
            let cost = opt.price
                + limited
                    .iter()
                    .zip(&mu)
                    .filter(|((pool, d, _), _)| *pool == opt.pool && opt.capacity[*d] != 0)
                    .map(|((_, d, l), m)| m * limit_coef(opt.capacity[*d], *l))
                    .sum::<f64>();
            if cost > 0.0 {
                scale = scale.max(gain / cost);
            }
        }
        if scale > 1.0 + 1e-12 {
            debug!(scale, "dual prices repaired");
        }
        let pi_part: f64 = pi
            .iter()
            .zip(demand)
            .map(|(v, d)| v * f64::from(*d))
            .sum::<f64>()
            / scale;
        let mu_part: f64 = limited
            .iter()
            .zip(&mu)
            .map(|((_, _, l), m)| m * limit_rhs(*l))
            .sum();
        Some(DualPrices {
            pi: pi.iter().map(|v| v / scale).collect(),
            mu,
            pi_part,
            mu_part,
        })
    }

    /// The master LP itself: values per pattern, and its value.
    fn solve_primal(
        &mut self,
        demand: &[u32],
        limited: &[(usize, usize, i64)],
    ) -> Option<(Vec<f64>, f64)> {
        let master = self.sync_master(demand, limited);
        let x = master
            .columns
            .iter()
            .map(|j| j.map_or(0.0, |j| master.lp.value(j)))
            .collect();
        Some((x, master.lp.objective()))
    }

    /// The master problem over `columns`, as an LP or a MIP. Returns the program and
    /// the variable of each pattern used, in order.
    fn master(
        &self,
        demand: &[u32],
        limited: &[(usize, usize, i64)],
        columns: &[usize],
        integer: bool,
    ) -> (LinearProgram, Vec<usize>) {
        let p = self.p;
        let mut lp = LinearProgram::default();
        let x: Vec<usize> = columns
            .iter()
            .map(|&j| {
                lp.var(
                    0.0,
                    f64::INFINITY,
                    integer,
                    p.options[self.patterns[j].option].price,
                )
            })
            .collect();
        let mut cover: Vec<Vec<(usize, f64)>> = vec![Vec::new(); p.classes.len()];
        for (k, &j) in columns.iter().enumerate() {
            for (c, n) in &self.patterns[j].counts {
                if demand[*c] > 0 {
                    cover[*c].push((x[k], (*n).min(demand[*c]) as f64));
                }
            }
        }
        for (c, mut row) in cover.into_iter().enumerate() {
            if demand[c] == 0 {
                continue;
            }
            let s = lp.var(0.0, f64::INFINITY, integer, p.classes[c].penalty);
            row.push((s, 1.0));
            lp.rows_ge.push((row, demand[c] as f64));
        }
        for (pool, d, l) in limited {
            let row: Vec<(usize, f64)> = columns
                .iter()
                .enumerate()
                .map(|(k, &j)| (x[k], &p.options[self.patterns[j].option]))
                .filter(|(_, opt)| opt.pool == *pool && opt.capacity[*d] != 0)
                .map(|(v, opt)| (v, limit_coef(opt.capacity[*d], *l)))
                .collect();
            if !row.is_empty() {
                lp.rows_le.push((row, limit_rhs(*l)));
            }
        }
        (lp, x)
    }

    /// Integer master over `columns`: how many nodes of each, within `budget`.
    fn mip(
        &self,
        demand: &[u32],
        limits: &[Vec<Option<i64>>],
        rel_gap: f64,
        columns: &[usize],
        budget: MipBudget,
    ) -> Option<Vec<(usize, u64)>> {
        let limited = limited_dims(limits);
        let (lp, x) = self.master(demand, &limited, columns, true);
        let values = match budget {
            MipBudget::Time(t) => {
                let left = t.as_secs_f64();
                if left <= 0.01 {
                    return None;
                }
                lp.solve(Some(left), Some(rel_gap as f32))
            }
            MipBudget::Nodes(n) => lp.solve_nodes(n, rel_gap),
        }
        .map_err(|e| debug!(error = %e, "MIP failed"))
        .ok()?;
        Some(
            x.iter()
                .zip(columns)
                .map(|(&v, &j)| (j, values[v].round().max(0.0) as u64))
                .filter(|(_, k)| *k > 0)
                .collect(),
        )
    }
}

/// What the exact step found.
struct ExactOutcome {
    /// A plan cheaper than the incumbent, when one was found: nodes and pods left out.
    plan: Option<(Vec<PackedNode>, Vec<u32>)>,
    /// Its cost with penalties.
    objective: Option<f64>,
    /// A proven lower bound on every plan.
    bound: f64,
    /// Columns listed in the last round.
    columns: usize,
    /// Rounds run.
    rounds: usize,
    /// Residual states the last search reached.
    states: usize,
}

impl ColumnGeneration<'_> {
    /// The exact step for small queues. With dual feasible prices `π` (every pattern's
    /// reduced price `rc_p = price_p − π·a_p ≥ 0`) any plan costs `π·d` plus the reduced
    /// prices of its nodes plus what its left-out pods cost above `π`, all
    /// non-negative; so a plan cheaper than `π·d + δ` uses only patterns with
    /// `rc_p < δ`, and may as well use maximal ones, whose reduced price is no higher.
    /// Those are listed per option and searched exhaustively for the cheapest cover
    /// ([`exact::shortest_cover`]): below `π·d + δ` that is the optimum; if there is
    /// none, the optimum is at least `π·d + δ`. δ starts at the accepted gap and grows
    /// fourfold per round, until it reaches the incumbent's cost (`ub`; then the plan
    /// is optimal), the list outgrows [`EXACT_MAX_COLUMNS`] or a search its states
    /// or the time: the bound climbs even where the optimum stays out of reach.
    #[allow(clippy::too_many_arguments)]
    fn exact(
        &mut self,
        pool_order: &[usize],
        demand: &[u32],
        prices: &[f64],
        lp_bound: f64,
        ub: f64,
        rel_gap: f64,
        deadline: Instant,
        work: Option<u64>,
    ) -> ExactOutcome {
        let p = self.p;
        let mut outcome = ExactOutcome {
            plan: None,
            objective: None,
            bound: lp_bound,
            columns: 0,
            rounds: 0,
            states: 0,
        };
        let penalty: Vec<f64> = p.classes.iter().map(|c| c.penalty).collect();
        let mut delta = rel_gap.max(0.005) * lp_bound.abs().max(1e-6);
        loop {
            let cutoff = (lp_bound + delta).min(ub);
            let Some(listed) = self.list_columns(demand, prices, cutoff - lp_bound) else {
                break;
            };
            outcome.columns = listed.len();
            outcome.rounds += 1;
            let columns: Vec<exact::CoverColumn> = listed
                .iter()
                .map(|&j| exact::CoverColumn {
                    price: p.options[self.patterns[j].option].price,
                    counts: &self.patterns[j].counts,
                })
                .collect();
            let cover = exact::shortest_cover(
                demand,
                prices,
                &penalty,
                &columns,
                cutoff,
                // Under a work budget, states stand for the time (deterministic).
                work.map_or(EXACT_MAX_STATES, |w| {
                    (w as usize)
                        .saturating_mul(EXACT_STATES_PER_WORK_MS)
                        .min(EXACT_MAX_STATES)
                }),
                work.is_none().then_some(deadline),
            );
            debug!(
                round = outcome.rounds,
                cutoff,
                columns = listed.len(),
                states = cover.states,
                finished = cover.finished,
                found = ?cover.cost,
                bound = cover.bound,
                "exact search"
            );
            outcome.states = cover.states;
            outcome.bound = outcome.bound.max(cover.bound.min(ub));
            // The cover found, else (stopped early) the deepest partial covers, finished
            // first-fit: whichever is cheapest, if cheaper than the incumbent.
            let found = cover.plan.is_some();
            let candidates: Vec<Vec<usize>> = match cover.plan {
                Some((opened, _)) => vec![opened],
                None => cover.partial,
            };
            for opened in candidates {
                let mut residual = demand.to_vec();
                let mut limits = p.limits.clone();
                let mut nodes = Vec::new();
                for k in opened {
                    commit(
                        p,
                        &self.patterns[listed[k]],
                        &mut residual,
                        &mut limits,
                        &mut nodes,
                    );
                }
                let left = first_fit_rest(p, pool_order, &residual, &mut limits, &mut nodes);
                right_size(p, &mut nodes, &mut limits);
                let cost = p.cost(&nodes) + p.penalty(&left);
                if cost < outcome.objective.unwrap_or(ub) - 1e-9 {
                    outcome.objective = Some(cost);
                    outcome.plan = Some((nodes, left));
                }
            }
            if found {
                break;
            }
            if !cover.finished || cutoff >= ub || outcome.bound * (1.0 + rel_gap) >= ub {
                break;
            }
            delta *= 4.0;
        }
        outcome
    }

    /// Every maximal pattern with reduced price below `delta` at `prices`, over every
    /// option; `None` when there are more than [`EXACT_MAX_COLUMNS`].
    fn list_columns(&mut self, demand: &[u32], prices: &[f64], delta: f64) -> Option<Vec<usize>> {
        let p = self.p;
        let mut columns: Vec<usize> = Vec::new();
        let unlimited = p.limits.iter().flatten().all(Option::is_none);
        let mut mixes: std::collections::HashSet<Vec<(usize, u32)>> = Default::default();
        let mut by_price: Vec<usize> = (0..p.options.len()).collect();
        by_price.sort_by(|&a, &b| {
            p.options[a]
                .price
                .total_cmp(&p.options[b].price)
                .then(a.cmp(&b))
        });
        for o in by_price {
            let opt = &p.options[o];
            let items: Vec<Item> = opt
                .classes
                .iter()
                .filter(|&&c| demand[c] > 0)
                .map(|&c| Item {
                    class: c,
                    value: prices[c],
                    req: &p.classes[c].req,
                    max: demand[c].min(p.classes[c].per_node),
                })
                .collect();
            if items.is_empty() {
                continue;
            }
            let room = EXACT_MAX_COLUMNS.checked_sub(columns.len())?;
            let Some(packings) = knapsack::maximal_packings(
                &opt.alloc,
                items,
                opt.price - delta,
                room,
                EXACT_SEARCH_NODES,
            ) else {
                debug!(
                    option = o,
                    listed = columns.len(),
                    "too many columns or too large a search to list them all"
                );
                return None;
            };
            for mut counts in packings {
                counts.sort_unstable();
                // Without limits, a pod mix needs only its cheapest node: options are
                // taken cheapest first, so a mix seen before had a cheaper one.
                if unlimited && !mixes.insert(counts.clone()) {
                    continue;
                }
                columns.push(self.index_of(Pattern { option: o, counts }));
            }
        }
        Some(columns)
    }
}

/// `f` over `items` on up to two threads (pricing is independent per option), results
/// in input order so that plans stay deterministic.
fn parallel_map<T: Send>(items: &[usize], f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(2);
    if threads < 2 || items.len() < 8 {
        return items.iter().map(|&o| f(o)).collect();
    }
    let (left, right) = items.split_at(items.len() / 2);
    std::thread::scope(|scope| {
        let other = scope.spawn(|| right.iter().map(|&o| f(o)).collect::<Vec<T>>());
        let mut out: Vec<T> = left.iter().map(|&o| f(o)).collect();
        // A panic in the other half is a bug in the planner; surface it as one.
        out.extend(
            other
                .join()
                .unwrap_or_else(|e| std::panic::resume_unwind(e)),
        );
        out
    })
}

/// A limit row scaled by its limit (coefficient capacity/limit, right-hand side 1), so
/// that byte-sized memory limits sit next to prices of a few dollars without upsetting
/// the simplex. A zero limit keeps the raw capacity with right-hand side 0.
/// Has heuristic pricing tailed off: over the last [`TAIL_WINDOW`] iterations (and
/// after [`TAIL_MIN_ITERATIONS`]), did the restricted master improve by less than
/// [`TAIL_SHARE`] of the accepted relative gap?
fn tailed_off(history: &[f64], rel_gap: f64) -> bool {
    let n = history.len();
    if n < TAIL_MIN_ITERATIONS.max(TAIL_WINDOW + 1) {
        return false;
    }
    let (then, now) = (history[n - 1 - TAIL_WINDOW], history[n - 1]);
    then - now < TAIL_SHARE * rel_gap * now.abs()
}

/// Have the exact passes stalled: over the last [`STALL_PASSES`] of them, neither the
/// master's value nor the proven bound moved by [`TAIL_SHARE`] of the accepted gap?
/// (Where the bound still climbs, as it does once the duals settle, generation goes on.)
fn stalled(exact: &[(f64, f64)], rel_gap: f64) -> bool {
    let n = exact.len();
    if n <= STALL_PASSES {
        return false;
    }
    let ((lp0, lb0), (lp1, lb1)) = (exact[n - 1 - STALL_PASSES], exact[n - 1]);
    let step = TAIL_SHARE * rel_gap * lp1.abs();
    lp0 - lp1 < step && lb1 - lb0 < step
}

fn limit_coef(capacity: i64, limit: i64) -> f64 {
    if limit > 0 {
        capacity as f64 / limit as f64
    } else {
        capacity as f64
    }
}

fn limit_rhs(limit: i64) -> f64 {
    if limit > 0 { 1.0 } else { 0.0 }
}

/// (pool, dim, remaining limit) for every limited dimension.
fn limited_dims(limits: &[Vec<Option<i64>>]) -> Vec<(usize, usize, i64)> {
    limits
        .iter()
        .enumerate()
        .flat_map(|(pool, dims)| {
            dims.iter()
                .enumerate()
                .filter_map(move |(d, l)| l.map(|l| (pool, d, l)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    use proptest::prelude::*;

    use crate::planner::problem::{ClassDemand, NodeChoice};

    /// The cheapest way to place (or leave out, at its penalty) every pod of `p`, by
    /// dynamic programming over the residual demand: the reference for tiny problems.
    fn brute_force_optimum(p: &PackProblem) -> f64 {
        let demand: Vec<u32> = p.classes.iter().map(|c| c.demand).collect();
        let mut memo = std::collections::HashMap::new();
        fn best(
            p: &PackProblem,
            r: Vec<u32>,
            memo: &mut std::collections::HashMap<Vec<u32>, f64>,
        ) -> f64 {
            if r.iter().all(|v| *v == 0) {
                return 0.0;
            }
            if let Some(v) = memo.get(&r) {
                return *v;
            }
            let mut value = f64::INFINITY;
            // Leave one pod of the first class with demand out.
            let first = r.iter().position(|v| *v > 0).unwrap_or(0);
            let mut fewer = r.clone();
            fewer[first] -= 1;
            value = value.min(p.classes[first].penalty + best(p, fewer, memo));
            // Or open a node holding at least one pod of that class.
            for o in &p.options {
                if o.classes.binary_search(&first).is_err() {
                    continue;
                }
                let mut counts = vec![0u32; r.len()];
                let mut room = o.alloc.clone();
                fn each(
                    p: &PackProblem,
                    o: &NodeChoice,
                    k: usize,
                    r: &[u32],
                    counts: &mut Vec<u32>,
                    room: &mut Vec<i64>,
                    out: &mut Vec<Vec<u32>>,
                ) {
                    if k == r.len() {
                        out.push(counts.clone());
                        return;
                    }
                    let hosts = o.classes.binary_search(&k).is_ok();
                    let most = if hosts {
                        p.fit_class(k, room, 0).min(r[k]).min(p.classes[k].per_node)
                    } else {
                        0
                    };
                    for c in 0..=most {
                        for (x, q) in room.iter_mut().zip(p.classes[k].req.iter()) {
                            *x -= q * i64::from(c);
                        }
                        counts[k] = c;
                        each(p, o, k + 1, r, counts, room, out);
                        for (x, q) in room.iter_mut().zip(p.classes[k].req.iter()) {
                            *x += q * i64::from(c);
                        }
                    }
                    counts[k] = 0;
                }
                let mut patterns = Vec::new();
                each(p, o, 0, &r, &mut counts, &mut room, &mut patterns);
                for a in patterns.into_iter().filter(|a| a[first] > 0) {
                    let rest: Vec<u32> = r.iter().zip(&a).map(|(x, y)| x - y).collect();
                    value = value.min(o.price + best(p, rest, memo));
                }
            }
            memo.insert(r, value);
            value
        }
        best(p, demand, &mut memo)
    }

    fn tiny_problem() -> impl Strategy<Value = PackProblem> {
        let class = (1i64..=4, 1i64..=4, 1u32..=5, prop::option::of(1u32..=3));
        let option = (
            3i64..=9,
            3i64..=9,
            5u32..=200,
            prop::collection::vec(any::<bool>(), 3),
        );
        (
            prop::collection::vec(class, 1..=3),
            prop::collection::vec(option, 1..=4),
        )
            .prop_map(|(classes, options)| {
                let n = classes.len();
                let classes: Vec<ClassDemand> = classes
                    .into_iter()
                    .map(|(cpu, mem, demand, cap)| ClassDemand {
                        req: vec![cpu, mem].into(),
                        demand,
                        penalty: 10.0,
                        ffd_key: (cpu, mem),
                        per_node: cap.unwrap_or(u32::MAX),
                    })
                    .collect();
                // A roomy option that hosts everything, then the random ones.
                let mut choices = vec![NodeChoice {
                    pool: 0,
                    price: 2.5,
                    alloc: vec![10, 10],
                    capacity: vec![10, 10],
                    classes: (0..n).collect(),
                    handle: 0,
                }];
                for (i, (cpu, mem, cents, hosts)) in options.into_iter().enumerate() {
                    let classes: Vec<usize> = (0..n).filter(|&c| hosts[c]).collect();
                    if classes.is_empty() {
                        continue;
                    }
                    choices.push(NodeChoice {
                        pool: 0,
                        price: f64::from(cents) / 100.0,
                        alloc: vec![cpu, mem],
                        capacity: vec![cpu, mem],
                        classes,
                        handle: i + 1,
                    });
                }
                PackProblem {
                    dims: 2,
                    classes,
                    options: choices,
                    limits: vec![vec![None, None]],
                }
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// With gap 0 the optimal strategy finds the optimum of tiny problems and proves
        /// it: its lower bound is never above the optimum (an honest bound) and equals
        /// the plan's cost (the exact step finished).
        #[test]
        fn gap_zero_plans_are_optimal_and_their_bound_is_honest(p in tiny_problem()) {
            let optimum = brute_force_optimum(&p);
            let pools: Vec<usize> = vec![0];
            let sol = solve(
                &p,
                &pools,
                Limits {
                    deadline: Instant::now() + std::time::Duration::from_secs(20),
                    time_limit: std::time::Duration::from_secs(20),
                    work: None,
                    exact: true,
                },
                0.0,
            );
            let cost = p.cost(&sol.nodes) + p.penalty(&sol.unplaced);
            prop_assert!((cost - optimum).abs() < 1e-6, "plan {cost} optimum {optimum}");
            let bound = sol.lower_bound.expect("a bound") + p.penalty(&sol.unplaced);
            prop_assert!(bound <= optimum + 1e-6, "bound {bound} above the optimum {optimum}");
            prop_assert!(bound >= optimum - 1e-6, "bound {bound} not proven at {optimum}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        /// Every dive, whichever of the LP's patterns it takes at each step, returns a
        /// plan: each pod placed once or left out, every node within its option's
        /// allocatable and the classes' caps, and never below the optimum.
        #[test]
        fn dives_return_feasible_plans(p in tiny_problem(), choices in proptest::collection::vec(0usize..3, 0..6), whole: bool) {
            let optimum = brute_force_optimum(&p);
            let mut cg = ColumnGeneration {
                max_iterations: MAX_ITERATIONS,
                p: &p,
                patterns: Vec::new(),
                known: std::collections::HashMap::new(),
                master: None,
                deadline: Instant::now() + std::time::Duration::from_secs(20),
                rel_gap: 0.0,
                patience: Patience::AfterIterations(MAX_ITERATIONS),
                iterations: 0,
            };
            let demand: Vec<u32> = p.classes.iter().map(|c| c.demand).collect();
            cg.seed(&greedy::solve(&p, &[0]).nodes);
            let until = Instant::now() + std::time::Duration::from_secs(20);
            let (nodes, unplaced, _) = cg
                .dive(&[0], &demand, &p.limits, &Dive { whole, choices }, until)
                .expect("the LP solves");
            valid_plan(&p, &nodes, &unplaced)?;
            let cost = p.cost(&nodes) + p.penalty(&unplaced);
            prop_assert!(cost >= optimum - 1e-6, "dive {cost} below the optimum {optimum}");
        }
    }

    /// Each pod placed once or left out, every node within its option's allocatable
    /// and the classes' caps, only classes the option hosts.
    fn valid_plan(
        p: &PackProblem,
        nodes: &[PackedNode],
        unplaced: &[u32],
    ) -> Result<(), TestCaseError> {
        let mut placed = vec![0u32; p.classes.len()];
        for n in nodes {
            let opt = &p.options[n.option];
            let mut room = opt.alloc.clone();
            for &(c, k) in &n.counts {
                prop_assert!(opt.classes.contains(&c), "class {c} on option {}", n.option);
                prop_assert!(k <= p.classes[c].per_node, "cap of class {c}");
                for (r, q) in room.iter_mut().zip(p.classes[c].req.iter()) {
                    *r -= q * i64::from(k);
                }
                placed[c] += k;
            }
            prop_assert!(room.iter().all(|r| *r >= 0), "node over its allocatable");
        }
        for (c, class) in p.classes.iter().enumerate() {
            prop_assert_eq!(placed[c] + unplaced[c], class.demand, "class {}", c);
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        /// The node-count rounds never bound above the optimum, return only feasible
        /// plans, and, when they stop because a relaxed optimum packs or the plan is
        /// within the gap (0 here), have proven that plan optimal.
        #[test]
        fn node_count_rounds_bound_honestly_and_plan_feasibly(p in tiny_problem()) {
            let optimum = brute_force_optimum(&p);
            let demand: Vec<u32> = p.classes.iter().map(|c| c.demand).collect();
            let greedy = greedy::solve(&p, &[0]);
            let budget = node_counts::Budget { nodes_per_mip: 20_000, rounds: 50, until: None };
            let counted = node_counts::solve(&p, &demand, (&greedy.nodes, &greedy.unplaced), None, 0.0, budget)
                .expect("a tiny relaxation");
            let bound = counted.bound.expect("a bound");
            prop_assert!(bound <= optimum + 1e-6, "bound {bound} above the optimum {optimum}");
            let best = match &counted.plan {
                Some((nodes, left)) => {
                    valid_plan(&p, nodes, left)?;
                    p.cost(nodes) + p.penalty(left)
                }
                None => p.cost(&greedy.nodes) + p.penalty(&greedy.unplaced),
            };
            prop_assert!(best >= optimum - 1e-6, "plan {best} below the optimum {optimum}");
            if matches!(counted.stopped, node_counts::Stop::RelaxedOptimumPacks | node_counts::Stop::WithinGap) {
                prop_assert!(bound >= optimum - 1e-6 && best <= optimum + 1e-6,
                    "stopped ({:?}) at plan {best}, bound {bound}, optimum {optimum}", counted.stopped);
            }
        }
    }

    /// A one-resource problem: classes as (CPU, pods), options as (CPU, price), every
    /// option hosting every class, no caps or limits.
    fn cpu_only(classes: &[(i64, u32)], options: &[(i64, f64)]) -> PackProblem {
        PackProblem {
            dims: 1,
            classes: classes
                .iter()
                .map(|&(cpu, demand)| ClassDemand {
                    req: vec![cpu].into(),
                    demand,
                    penalty: 100.0,
                    ffd_key: (cpu, 0),
                    per_node: u32::MAX,
                })
                .collect(),
            options: options
                .iter()
                .enumerate()
                .map(|(handle, &(cpu, price))| NodeChoice {
                    pool: 0,
                    price,
                    alloc: vec![cpu],
                    capacity: vec![cpu],
                    classes: (0..classes.len()).collect(),
                    handle,
                })
                .collect(),
            limits: vec![vec![None]],
        }
    }

    /// Two 3-CPU pods and a 2-CPU pod: two 4-CPU nodes hold 8 CPUs in aggregate, but
    /// no node holds a 3-CPU pod and the 2-CPU one, so the relaxation's first answer
    /// ($2) does not pack; the cut sends it to the 8-CPU node ($2.5), which does, and
    /// proves it optimal. The pattern LP's bound stays lower than either.
    #[test]
    fn a_cut_removes_node_counts_the_pods_do_not_pack_onto() {
        let p = cpu_only(&[(3, 2), (2, 1)], &[(4, 1.0), (8, 2.5)]);
        let three_small: Vec<PackedNode> = [(0, 1), (0, 1), (1, 1)]
            .into_iter()
            .map(|(c, k)| PackedNode {
                option: 0,
                counts: vec![(c, k)],
            })
            .collect();
        let budget = node_counts::Budget {
            nodes_per_mip: 10_000,
            rounds: 10,
            until: None,
        };
        let counted = node_counts::solve(&p, &[2, 1], (&three_small, &[0, 0]), None, 0.0, budget)
            .expect("a relaxation");
        let (nodes, left) = counted.plan.expect("a cheaper plan");
        assert_eq!(left, vec![0, 0]);
        assert!((p.cost(&nodes) - 2.5).abs() < 1e-9, "{nodes:?}");
        assert!(counted.rounds >= 2, "one cut at least: {}", counted.rounds);
        let bound = counted.bound.expect("a bound");
        assert!((bound - 2.5).abs() < 1e-6, "bound {bound}");
    }

    /// Two 4-CPU pods and four 3-CPU pods fill two 10-CPU nodes exactly (4+3+3 each),
    /// which first-fit-decreasing misses (4+4, then 3+3+3, one 3 left): the
    /// assignment check finds the packing, so the two-node plan replaces three nodes
    /// and is proven optimal.
    #[test]
    fn node_counts_that_first_fit_cannot_pack_are_packed_by_the_assignment_check() {
        let p = cpu_only(&[(4, 2), (3, 4)], &[(10, 1.0)]);
        let greedy = greedy::solve(&p, &[0]);
        assert_eq!(
            greedy.nodes.len(),
            3,
            "first-fit needs a third node: {greedy:?}"
        );
        let budget = node_counts::Budget {
            nodes_per_mip: 10_000,
            rounds: 10,
            until: None,
        };
        let counted = node_counts::solve(
            &p,
            &[2, 4],
            (&greedy.nodes, &greedy.unplaced),
            None,
            0.0,
            budget,
        )
        .expect("a relaxation");
        let (nodes, left) = counted.plan.expect("the two-node plan");
        assert_eq!(left, vec![0, 0]);
        assert_eq!(nodes.len(), 2, "{nodes:?}");
        for n in &nodes {
            let used: i64 = n
                .counts
                .iter()
                .map(|&(c, k)| p.classes[c].req[0] * i64::from(k))
                .sum();
            assert!(used <= 10, "{n:?}");
        }
        let bound = counted.bound.expect("a bound");
        assert!((bound - 2.0).abs() < 1e-6, "bound {bound}");
    }

    #[test]
    fn heuristic_pricing_tails_off_only_after_a_flat_window() {
        // Falling by 1 % per iteration: never tailed off.
        let falling: Vec<f64> = (0..40).map(|i| 1000.0 * 0.99f64.powi(i)).collect();
        assert!(!tailed_off(&falling, 0.01));
        // Flat, but too early to judge.
        assert!(!tailed_off(&[800.0; 15], 0.01));
        // Flat for the window after the minimum: tailed off.
        let mut flat = falling.clone();
        flat.extend([flat[39] - 0.001; TAIL_WINDOW + 1]);
        assert!(tailed_off(&flat, 0.01));
    }

    #[test]
    fn exact_passes_stall_only_when_neither_value_nor_bound_moves() {
        // The LP is flat but the bound climbs (as after a plateau of θ): not stalled.
        let climbing: Vec<(f64, f64)> = (0..6).map(|i| (800.0, 600.0 + 20.0 * i as f64)).collect();
        assert!(!stalled(&climbing, 0.01));
        // Both flat: stalled.
        assert!(stalled(&[(800.0, 600.0); 5], 0.01));
        // Too few passes to tell.
        assert!(!stalled(&[(800.0, 600.0); STALL_PASSES], 0.01));
    }
}
