//! A thin, backend-neutral layer over good_lp: the planner states linear programs as
//! plain vectors and gets values back. The backend is microlp (pure Rust) by default
//! and HiGHS with the `highs` cargo feature.

use good_lp::{
    Expression, ProblemVariables, ResolutionError, Solution, SolverModel, WithMipGap,
    WithTimeLimit, variable,
};

/// A linear (or mixed-integer) program in row form.
#[derive(Debug, Clone, Default)]
pub struct LinearProgram {
    /// Per variable: (lower, upper, integer).
    pub vars: Vec<(f64, f64, bool)>,
    /// Objective coefficients, one per variable.
    pub objective: Vec<f64>,
    pub maximize: bool,
    /// Rows `Σ coef·x ≤ rhs`.
    pub rows_le: Vec<(Vec<(usize, f64)>, f64)>,
    /// Rows `Σ coef·x ≥ rhs`.
    pub rows_ge: Vec<(Vec<(usize, f64)>, f64)>,
}

/// The solver backend compiled in.
pub fn backend_name() -> &'static str {
    if cfg!(feature = "highs") {
        "highs"
    } else {
        "microlp"
    }
}

impl LinearProgram {
    /// Add a variable and return its index.
    pub fn var(&mut self, lower: f64, upper: f64, integer: bool, cost: f64) -> usize {
        self.vars.push((lower, upper, integer));
        self.objective.push(cost);
        self.vars.len() - 1
    }

    /// Solve; `time_limit` in seconds, `mip_gap` relative.
    pub fn solve(&self, time_limit: Option<f64>, mip_gap: Option<f32>) -> Result<Vec<f64>, String> {
        let mut pv = ProblemVariables::new();
        let vars: Vec<_> = self
            .vars
            .iter()
            .map(|(lo, hi, int)| {
                let mut d = variable().min(*lo);
                if hi.is_finite() {
                    d = d.max(*hi);
                }
                if *int {
                    d = d.integer();
                }
                pv.add(d)
            })
            .collect();
        let mut obj = Expression::with_capacity(vars.len());
        for (v, c) in vars.iter().zip(&self.objective) {
            if *c != 0.0 {
                obj.add_mul(*c, *v);
            }
        }
        let unsolved = if self.maximize {
            pv.maximise(obj)
        } else {
            pv.minimise(obj)
        };
        let row = |terms: &Vec<(usize, f64)>| {
            let mut e = Expression::with_capacity(terms.len());
            for (i, c) in terms {
                e.add_mul(*c, vars[*i]);
            }
            e
        };
        macro_rules! run {
            ($solver:expr) => {{
                let mut model = unsolved.using($solver);
                for (terms, rhs) in &self.rows_le {
                    model = model.with(row(terms).leq(*rhs));
                }
                for (terms, rhs) in &self.rows_ge {
                    model = model.with(row(terms).geq(*rhs));
                }
                if let Some(t) = time_limit {
                    model = model.with_time_limit(t.max(0.001));
                }
                if let Some(g) = mip_gap {
                    model = model.with_mip_gap(g).map_err(|e| e.to_string())?;
                }
                let sol = model.solve().map_err(|e: ResolutionError| e.to_string())?;
                Ok(vars.iter().map(|v| sol.value(*v)).collect())
            }};
        }
        #[cfg(feature = "highs")]
        {
            run!(good_lp::highs)
        }
        #[cfg(not(feature = "highs"))]
        {
            run!(good_lp::microlp)
        }
    }
}

impl LinearProgram {
    /// The program as a microlp problem, and its variables in order.
    fn microlp_problem(&self) -> (microlp::Problem, Vec<microlp::Variable>) {
        let direction = if self.maximize {
            microlp::OptimizationDirection::Maximize
        } else {
            microlp::OptimizationDirection::Minimize
        };
        let mut problem = microlp::Problem::new(direction);
        let vars: Vec<microlp::Variable> = self
            .vars
            .iter()
            .zip(&self.objective)
            .map(|((lo, hi, int), c)| {
                if *int {
                    let lo = lo.max(f64::from(i32::MIN)).ceil() as i32;
                    let hi = hi.min(f64::from(i32::MAX)).floor() as i32;
                    problem.add_integer_var(*c, (lo, hi))
                } else {
                    problem.add_var(*c, (*lo, *hi))
                }
            })
            .collect();
        let expr = |terms: &[(usize, f64)]| -> microlp::LinearExpr {
            terms.iter().map(|(i, c)| (vars[*i], *c)).collect()
        };
        for (terms, rhs) in &self.rows_le {
            problem.add_constraint(expr(terms), microlp::ComparisonOp::Le, *rhs);
        }
        for (terms, rhs) in &self.rows_ge {
            problem.add_constraint(expr(terms), microlp::ComparisonOp::Ge, *rhs);
        }
        (problem, vars)
    }

    /// Solve with microlp, the branch and bound stopping after `node_limit` nodes (or at
    /// `mip_gap`) rather than at a wall-clock time, so that the same program gives the
    /// same answer on any machine and under any load: the simulator's plans must be
    /// reproducible. Always microlp, whatever backend [`LinearProgram::solve`] uses.
    pub fn solve_nodes(&self, node_limit: u64, mip_gap: f64) -> Result<Vec<f64>, String> {
        let (problem, vars) = self.microlp_problem();
        let mut options = microlp::SolveOptions::default();
        options.node_limit = Some(node_limit);
        options.mip_gap = mip_gap.max(0.0);
        let solution = problem
            .solve_with(options)
            .map_err(|e| e.to_string())?
            .into_solution()
            .map_err(|_| format!("no solution within {node_limit} branch-and-bound nodes"))?;
        Ok(vars.iter().map(|v| solution.var_value(*v)).collect())
    }
}

/// What a bounded branch and bound found ([`LinearProgram::solve_bounded`]).
#[derive(Debug, Clone)]
pub struct MipResult {
    /// The best integer solution found, if any.
    pub values: Option<Vec<f64>>,
    /// Its objective.
    pub objective: Option<f64>,
    /// The best proven bound on the optimum (a lower bound when minimising), whether or
    /// not the search finished.
    pub bound: Option<f64>,
    /// The search proved `values` optimal.
    pub optimal: bool,
    /// The search proved that there is no solution.
    pub infeasible: bool,
    /// Branch-and-bound nodes solved.
    pub nodes: u64,
}

impl LinearProgram {
    /// Solve with microlp's branch and bound within `node_limit` nodes (and
    /// `time_limit`, when given), starting from `warm_start` (a value per variable) if
    /// it is feasible, and report the proven bound along with the best solution: a
    /// search stopped early still bounds the optimum. Always microlp.
    pub fn solve_bounded(
        &self,
        node_limit: u64,
        time_limit: Option<std::time::Duration>,
        mip_gap: f64,
        warm_start: Option<&[f64]>,
    ) -> Result<MipResult, String> {
        let (problem, vars) = self.microlp_problem();
        let mut options = microlp::SolveOptions::default();
        options.node_limit = Some(node_limit);
        options.time_limit = time_limit;
        options.mip_gap = mip_gap.max(0.0);
        options.warm_start =
            warm_start.map(|w| vars.iter().copied().zip(w.iter().copied()).collect());
        let outcome = match problem.solve_with(options) {
            Ok(outcome) => outcome,
            Err(microlp::Error::Infeasible) => {
                return Ok(MipResult {
                    values: None,
                    objective: None,
                    bound: None,
                    optimal: false,
                    infeasible: true,
                    nodes: 0,
                });
            }
            Err(e) => return Err(e.to_string()),
        };
        match outcome {
            microlp::SolveOutcome::Solution(solution) => {
                let stats = solution.stats();
                Ok(MipResult {
                    objective: Some(solution.objective()),
                    values: Some(vars.iter().map(|v| solution.var_value(*v)).collect()),
                    bound: stats.best_bound,
                    optimal: solution.status() == microlp::SolutionStatus::Optimal,
                    infeasible: false,
                    nodes: stats.nodes_solved,
                })
            }
            microlp::SolveOutcome::Interrupted(stopped) => {
                let stats = stopped.stats();
                Ok(MipResult {
                    values: None,
                    objective: None,
                    bound: stats.best_bound,
                    optimal: false,
                    infeasible: false,
                    nodes: stats.nodes_solved,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn solves_a_small_lp_and_mip() {
        // max x + y st x + 2y <= 4, 3x + y <= 6 → x=1.6, y=1.2
        let mut lp = LinearProgram {
            maximize: true,
            ..Default::default()
        };
        let x = lp.var(0.0, f64::INFINITY, false, 1.0);
        let y = lp.var(0.0, f64::INFINITY, false, 1.0);
        lp.rows_le.push((vec![(x, 1.0), (y, 2.0)], 4.0));
        lp.rows_le.push((vec![(x, 3.0), (y, 1.0)], 6.0));
        let v = lp.solve(None, None).unwrap();
        assert!(
            (v[x] - 1.6).abs() < 1e-6 && (v[y] - 1.2).abs() < 1e-6,
            "{v:?}"
        );
        lp.vars.iter_mut().for_each(|v| v.2 = true);
        let v = lp.solve(Some(5.0), None).unwrap();
        assert!((v[x] + v[y] - 2.0).abs() < 1e-6, "{v:?}");
    }
}
