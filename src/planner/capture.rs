//! The packing problems a plan solved, for checking the solver against an independent
//! exact one (the planner bench writes them out for `scripts/exact_reference.py`).
//!
//! A thread-local sink rather than a field of [`super::Plan`]: plans stay small, and
//! nothing is recorded unless a caller asks, around one call, on its own thread.

use std::cell::RefCell;

use serde::Serialize;

use super::problem::{PackProblem, PackSolution};

/// One packing problem as the strategy saw it (per-node rules already turned into
/// per-class caps) and the cost of the solution it returned.
#[derive(Debug, Clone, Serialize)]
pub struct SolvedProblem {
    /// The strategy that solved it (`optimal` plans run the greedy path too and keep
    /// the better plan).
    pub strategy: super::Strategy,
    /// Per class: dense requests, pods to place, the objective weight of leaving one
    /// unplaced, and the most pods of the class one node may hold.
    pub classes: Vec<CapturedClass>,
    /// Per node option: its price, allocatable (less DaemonSet overhead), what it counts
    /// against its pool's limits, the pool, and the classes it may host.
    pub options: Vec<CapturedOption>,
    /// Per pool, per dimension: what remains of its limits (`None`: unlimited).
    pub limits: Vec<Vec<Option<i64>>>,
    /// Price per hour of the nodes the strategy chose.
    pub cost: f64,
    /// Pods left unplaced, per class.
    pub unplaced: Vec<u32>,
    /// The lower bound the strategy proved, if any.
    pub lower_bound: Option<f64>,
}

/// A class of a [`SolvedProblem`].
#[derive(Debug, Clone, Serialize)]
pub struct CapturedClass {
    pub req: Vec<i64>,
    pub demand: u32,
    pub penalty: f64,
    /// `None`: no cap.
    pub per_node: Option<u32>,
}

/// A node option of a [`SolvedProblem`].
#[derive(Debug, Clone, Serialize)]
pub struct CapturedOption {
    pub price: f64,
    pub pool: usize,
    pub alloc: Vec<i64>,
    pub capacity: Vec<i64>,
    pub classes: Vec<usize>,
}

thread_local! {
    static SINK: RefCell<Option<Vec<SolvedProblem>>> = const { RefCell::new(None) };
}

/// Runs `f` (a [`super::plan`] call) and returns what it returned with every packing
/// problem solved on this thread meanwhile.
pub fn capture<R>(f: impl FnOnce() -> R) -> (R, Vec<SolvedProblem>) {
    let outer = SINK.with(|s| s.borrow_mut().replace(Vec::new()));
    let result = f();
    let captured = SINK.with(|s| std::mem::replace(&mut *s.borrow_mut(), outer));
    (result, captured.unwrap_or_default())
}

/// Records one solved problem when a [`capture`] is running on this thread.
pub(super) fn record(strategy: super::Strategy, p: &PackProblem, sol: &PackSolution) {
    SINK.with(|s| {
        if let Some(sink) = s.borrow_mut().as_mut() {
            sink.push(SolvedProblem {
                strategy,
                classes: p
                    .classes
                    .iter()
                    .map(|c| CapturedClass {
                        req: c.req.to_vec(),
                        demand: c.demand,
                        penalty: c.penalty,
                        per_node: (c.per_node != u32::MAX).then_some(c.per_node),
                    })
                    .collect(),
                options: p
                    .options
                    .iter()
                    .map(|o| CapturedOption {
                        price: o.price,
                        pool: o.pool,
                        alloc: o.alloc.clone(),
                        capacity: o.capacity.clone(),
                        classes: o.classes.clone(),
                    })
                    .collect(),
                limits: p.limits.clone(),
                cost: sol.nodes.iter().map(|n| p.options[n.option].price).sum(),
                unplaced: sol.unplaced.clone(),
                lower_bound: sol.lower_bound,
            });
        }
    });
}
