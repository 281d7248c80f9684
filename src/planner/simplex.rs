//! A small dense revised simplex for column generation's restricted master, kept warm
//! across iterations.
//!
//! Column generation adds a few dozen columns per iteration to an LP whose rows are
//! the pod classes (hundreds) and whose columns are node patterns (thousands). Solving
//! it from scratch each time, through its dual because good_lp's pure-Rust backend
//! exposes no dual values, puts one row per *pattern* in the solver's basis; with
//! per-node rules (one replica per node) that was seconds per plan. Here the basis is
//! one column per *row* of the master, new columns enter from the last optimal basis,
//! and the dual values come with every pivot.
//!
//! The problem is `min cᵀx  s.t.  A x = b, x ≥ 0` with `b ≥ 0` and an identity
//! starting basis (the caller's slack columns), so it is feasible from the start and
//! needs no phase one. The basis inverse is dense and updated in product form, and
//! recomputed from the basis columns every [`REFACTOR_EVERY`] pivots (for masters of up
//! to [`REFACTOR_MAX_ROWS`] rows).

/// A sparse column: (row, coefficient) pairs and its cost.
#[derive(Debug, Clone)]
pub struct Column {
    pub entries: Vec<(usize, f64)>,
    pub cost: f64,
}

/// How an optimisation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Optimal,
    /// The pivot budget ran out; the basis is feasible but maybe not optimal.
    PivotLimit,
    /// The deadline passed; the basis is feasible but maybe not optimal.
    Deadline,
    /// A column can grow without bound (cannot happen with non-negative costs).
    Unbounded,
}

/// The LP and its current basis.
pub struct Simplex {
    m: usize,
    b: Vec<f64>,
    /// Columns in one flat layout (pricing reads them all, often): column `j`'s
    /// entries are `entries[start[j]..start[j + 1]]`.
    entries: Vec<(u32, f64)>,
    start: Vec<usize>,
    cost: Vec<f64>,
    /// Column basic in each row.
    basis: Vec<usize>,
    /// Row of each basic column, `usize::MAX` for non-basic ones.
    row_of: Vec<usize>,
    /// Dense basis inverse, row-major.
    binv: Vec<f64>,
    /// Values of the basic columns.
    xb: Vec<f64>,
    pivots_since_refactor: usize,
    /// Pivots made so far, for tracing.
    pivots: usize,
}

/// Reduced costs below `-COST_TOLERANCE` (relative to the column's cost) improve.
const COST_TOLERANCE: f64 = 1e-9;
/// Pivot elements smaller than this are not used.
const PIVOT_TOLERANCE: f64 = 1e-9;
/// Recompute the inverse from scratch after this many product-form updates.
const REFACTOR_EVERY: usize = 200;
/// Scale of the right-hand side perturbation against degeneracy.
const PERTURBATION: f64 = 1e-6;
/// Columns priced per pivot at least (partial pricing).
const PRICING_WINDOW: usize = 256;
/// Only masters up to this many rows are refactored.
const REFACTOR_MAX_ROWS: usize = 500;

impl Simplex {
    /// A problem with right-hand side `b` (each ≥ 0) and one starting column per row,
    /// which must be that row's unit column.
    pub fn new(b: Vec<f64>, unit_costs: Vec<f64>) -> Simplex {
        let m = b.len();
        let entries: Vec<(u32, f64)> = (0..m).map(|r| (r as u32, 1.0)).collect();
        let start: Vec<usize> = (0..=m).collect();
        let mut binv = vec![0.0; m * m];
        for r in 0..m {
            binv[r * m + r] = 1.0;
        }
        // Covering masters are highly degenerate (many basic columns at zero): a
        // Dantzig pivot then gains nothing and runs of them stall the method for
        // thousands of pivots. Distinct tiny shifts of the right-hand side break the
        // ties (the classic perturbation); values move by at most PERTURBATION.
        let b: Vec<f64> = b
            .iter()
            .enumerate()
            .map(|(r, v)| {
                let spread = ((r * 7919) % m.max(1)) as f64 / m.max(1) as f64;
                v.max(0.0) + PERTURBATION * (1.0 + spread)
            })
            .collect();
        Simplex {
            m,
            xb: b.clone(),
            b,
            row_of: (0..m).collect(),
            basis: (0..m).collect(),
            entries,
            start,
            cost: unit_costs,
            binv,
            pivots_since_refactor: 0,
            pivots: 0,
        }
    }

    /// Add a column (non-basic, at zero); returns its index.
    pub fn add_column(&mut self, column: Column) -> usize {
        self.entries
            .extend(column.entries.iter().map(|(r, v)| (*r as u32, *v)));
        self.start.push(self.entries.len());
        self.cost.push(column.cost);
        self.row_of.push(usize::MAX);
        self.cost.len() - 1
    }

    /// The dual values `y = c_B B⁻¹`, one per row.
    pub fn duals(&self) -> Vec<f64> {
        let m = self.m;
        let mut y = vec![0.0; m];
        for (r, &j) in self.basis.iter().enumerate() {
            let c = self.cost[j];
            if c != 0.0 {
                let row = &self.binv[r * m..(r + 1) * m];
                for (yi, v) in y.iter_mut().zip(row) {
                    *yi += c * v;
                }
            }
        }
        y
    }

    /// The value of column `j` in the current basic solution.
    pub fn value(&self, j: usize) -> f64 {
        match self.row_of[j] {
            usize::MAX => 0.0,
            r => self.xb[r].max(0.0),
        }
    }

    /// The objective at the current basic solution.
    pub fn objective(&self) -> f64 {
        self.basis
            .iter()
            .zip(&self.xb)
            .map(|(&j, x)| self.cost[j] * x.max(0.0))
            .sum()
    }

    /// Pivot until no column improves, or `max_pivots` pivots were made.
    pub fn optimize(&mut self, max_pivots: usize, deadline: std::time::Instant) -> Status {
        let m = self.m;
        let mut alpha = vec![0.0; m];
        let mut degenerate_run = 0usize;
        let mut y = self.duals();
        let n = self.cost.len();
        // Partial pricing: scan a window of columns, take the best improving one in it,
        // and start the next scan where this one stopped; only a full scan that finds
        // nothing proves optimality.
        let window = PRICING_WINDOW.max(n / 8);
        let mut cursor = 0usize;
        let mut total_scanned = 0usize;
        let first_pivot = self.pivots;
        for pivot in 0..max_pivots {
            if pivot % 32 == 31 && std::time::Instant::now() >= deadline {
                return Status::Deadline;
            }
            // Entering column: most negative reduced cost in the window (Dantzig);
            // after a long run of degenerate pivots, the first improving one in a full
            // scan from column 0 (Bland), which cannot cycle.
            let bland = degenerate_run > 50;
            let mut entering: Option<(usize, f64)> = None;
            let mut scanned = 0usize;
            let mut j = if bland { 0 } else { cursor };
            while scanned < n {
                if self.row_of[j] == usize::MAX {
                    let cost = self.cost[j];
                    let d = cost
                        - self.entries[self.start[j]..self.start[j + 1]]
                            .iter()
                            .map(|(r, a)| y[*r as usize] * a)
                            .sum::<f64>();
                    if d < -COST_TOLERANCE * cost.abs().max(1.0)
                        && entering.is_none_or(|(_, best)| d < best)
                    {
                        entering = Some((j, d));
                        if bland {
                            break;
                        }
                    }
                }
                scanned += 1;
                total_scanned += 1;
                j = if j + 1 == n { 0 } else { j + 1 };
                if entering.is_some() && scanned >= window {
                    break;
                }
            }
            cursor = j;
            let Some((q, d_q)) = entering else {
                tracing::trace!(
                    rows = m,
                    columns = n,
                    pivots = self.pivots - first_pivot,
                    scanned = total_scanned,
                    "master optimal"
                );
                return Status::Optimal;
            };
            self.pivots += 1;
            // alpha = B⁻¹ a_q.
            alpha.iter_mut().for_each(|a| *a = 0.0);
            for (i, v) in &self.entries[self.start[q]..self.start[q + 1]] {
                let i = *i as usize;
                for (r, a) in alpha.iter_mut().enumerate() {
                    *a += self.binv[r * m + i] * v;
                }
            }
            // Ratio test; among ties the largest pivot element, for stability.
            let mut leave: Option<(usize, f64, f64)> = None;
            for (r, (&a, &x)) in alpha.iter().zip(&self.xb).enumerate() {
                if a > PIVOT_TOLERANCE {
                    let ratio = x.max(0.0) / a;
                    let better = match leave {
                        None => true,
                        Some((_, best, piv)) => {
                            ratio < best - 1e-12 || (ratio <= best + 1e-12 && a > piv)
                        }
                    };
                    if better {
                        leave = Some((r, ratio, a));
                    }
                }
            }
            let Some((r, theta, _)) = leave else {
                return Status::Unbounded;
            };
            degenerate_run = if theta <= 1e-12 {
                degenerate_run + 1
            } else {
                0
            };
            // Update values, inverse and basis.
            for (i, x) in self.xb.iter_mut().enumerate() {
                *x -= theta * alpha[i];
            }
            self.xb[r] = theta;
            let pivot = alpha[r];
            let (before, rest) = self.binv.split_at_mut(r * m);
            let (row_r, after) = rest.split_at_mut(m);
            row_r.iter_mut().for_each(|v| *v /= pivot);
            for (i, chunk) in before.chunks_mut(m).enumerate() {
                let f = alpha[i];
                if f != 0.0 {
                    for (v, w) in chunk.iter_mut().zip(row_r.iter()) {
                        *v -= f * w;
                    }
                }
            }
            for (k, chunk) in after.chunks_mut(m).enumerate() {
                let f = alpha[r + 1 + k];
                if f != 0.0 {
                    for (v, w) in chunk.iter_mut().zip(row_r.iter()) {
                        *v -= f * w;
                    }
                }
            }
            let out = self.basis[r];
            self.row_of[out] = usize::MAX;
            self.basis[r] = q;
            self.row_of[q] = r;
            // The entering column's reduced cost goes to zero: y += d_q · (row r of B⁻¹).
            let row_r = &self.binv[r * m..(r + 1) * m];
            for (yi, v) in y.iter_mut().zip(row_r) {
                *yi += d_q * v;
            }
            self.pivots_since_refactor += 1;
            // Gauss-Jordan is cubic: for large masters the updates carry on alone.
            if self.pivots_since_refactor >= REFACTOR_EVERY && m <= REFACTOR_MAX_ROWS {
                self.refactor();
                y = self.duals();
            }
        }
        Status::PivotLimit
    }

    /// Recompute the inverse (Gauss-Jordan with partial pivoting) and the basic
    /// values from the basis columns, dropping the product-form updates' drift. A
    /// numerically singular basis keeps the updated inverse.
    fn refactor(&mut self) {
        self.pivots_since_refactor = 0;
        let m = self.m;
        let mut a = vec![0.0; m * m];
        for (c, &j) in self.basis.iter().enumerate() {
            for (r, v) in &self.entries[self.start[j]..self.start[j + 1]] {
                a[*r as usize * m + c] = *v;
            }
        }
        let mut inv = vec![0.0; m * m];
        for r in 0..m {
            inv[r * m + r] = 1.0;
        }
        for col in 0..m {
            let Some(p) =
                (col..m).max_by(|x, y| a[x * m + col].abs().total_cmp(&a[y * m + col].abs()))
            else {
                return;
            };
            if a[p * m + col].abs() < 1e-12 {
                return;
            }
            if p != col {
                for k in 0..m {
                    a.swap(p * m + k, col * m + k);
                    inv.swap(p * m + k, col * m + k);
                }
            }
            let pivot = a[col * m + col];
            for k in 0..m {
                a[col * m + k] /= pivot;
                inv[col * m + k] /= pivot;
            }
            for r in 0..m {
                if r == col {
                    continue;
                }
                let f = a[r * m + col];
                if f == 0.0 {
                    continue;
                }
                for k in 0..m {
                    a[r * m + k] -= f * a[col * m + k];
                    inv[r * m + k] -= f * inv[col * m + k];
                }
            }
        }
        // inv is B⁻¹ with B's columns in basis order: row r of inv belongs to basis[r].
        self.binv = inv;
        for r in 0..m {
            self.xb[r] = (0..m).map(|i| self.binv[r * m + i] * self.b[i]).sum();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// min x0 + x1 s.t. x0 + 2 x1 ≥ 4 (row 0), 3 x0 + x1 ≥ 6 (row 1), as equalities
    /// with penalty slacks (cost 100) and surplus columns.
    fn far() -> std::time::Instant {
        std::time::Instant::now() + std::time::Duration::from_secs(3600)
    }

    #[test]
    fn solves_a_small_covering_lp_and_its_duals() {
        let mut s = Simplex::new(vec![4.0, 6.0], vec![100.0, 100.0]);
        s.add_column(Column {
            entries: vec![(0, -1.0)],
            cost: 0.0,
        });
        s.add_column(Column {
            entries: vec![(1, -1.0)],
            cost: 0.0,
        });
        let x0 = s.add_column(Column {
            entries: vec![(0, 1.0), (1, 3.0)],
            cost: 1.0,
        });
        let x1 = s.add_column(Column {
            entries: vec![(0, 2.0), (1, 1.0)],
            cost: 1.0,
        });
        assert_eq!(s.optimize(100, far()), Status::Optimal);
        // Optimum at x0 = 1.6, x1 = 1.2, value 2.8; duals 0.4, 0.2.
        assert!((s.value(x0) - 1.6).abs() < 1e-5);
        assert!((s.value(x1) - 1.2).abs() < 1e-5);
        assert!((s.objective() - 2.8).abs() < 1e-5);
        let y = s.duals();
        assert!((y[0] - 0.4).abs() < 1e-5 && (y[1] - 0.2).abs() < 1e-5);
        // A better column joins warm: x2 = 2 covers both rows for 2.0.
        let x2 = s.add_column(Column {
            entries: vec![(0, 2.0), (1, 3.0)],
            cost: 1.0,
        });
        assert_eq!(s.optimize(100, far()), Status::Optimal);
        assert!((s.value(x2) - 2.0).abs() < 1e-5);
        assert!((s.objective() - 2.0).abs() < 1e-5);
        // Recomputing the inverse from the basis changes nothing.
        s.refactor();
        assert!((s.objective() - 2.0).abs() < 1e-5);
        assert_eq!(s.optimize(100, far()), Status::Optimal);
    }
}
