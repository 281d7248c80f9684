#!/usr/bin/env python3
"""Solve the planner's packing problems exactly with HiGHS and compare cooper's plans.

An independent check of `--strategy optimal`: it shares no code with cooper's solver.
Input is what `COOPER_BENCH_DUMP=file cargo bench --bench planner` writes: one JSON
line per random queue, with every packing problem the plan solved (classes, node
options, pool limits) and the cost cooper's solver found for it.

Per problem, every *maximal* node pattern (per option, a count of pods of each class
that fits its allocatable and the class's per-node cap, and to which no further pod of
any class with demand left fits) is listed, and the set-covering MIP

    min  sum_p price_p x_p + sum_i penalty_i s_i
    s.t. sum_p a_ip x_p + s_i >= demand_i         (every pod placed or paid for)
         sum_p capacity_p,r x_p <= limit_pool,r   (NodePool limits)
         x, s integer >= 0

is solved by HiGHS to optimality. Any plan's nodes can be filled up to maximal
patterns at the same price, so its optimum is the problem's optimum.

Problems whose plan cooper's own lower bound already proves within 1 % are not solved
again unless --all is given (HiGHS then checks that bound instead).

Usage: scripts/exact_reference.py DUMP [--time-limit SECONDS] [--max-patterns N] [--all]
Creates target/exact-venv with highspy on first use. What HiGHS proved per problem is
kept in target/exact-reference-cache.json (keyed by the problem), so a later run
compares a changed planner without solving again.
"""

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time

TARGET = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "target")
VENV = os.path.join(TARGET, "exact-venv")
CACHE = os.path.join(TARGET, "exact-reference-cache.json")


def ensure_highspy():
    try:
        import highspy  # noqa: F401

        return
    except ImportError:
        pass
    python = os.path.join(VENV, "bin", "python")
    if os.path.abspath(sys.executable) == os.path.abspath(python):
        sys.exit("highspy is missing from " + VENV)
    if not os.path.exists(python):
        subprocess.check_call([sys.executable, "-m", "venv", VENV])
    subprocess.check_call([python, "-m", "pip", "install", "-q", "highspy>=1.7"])
    os.execv(python, [python] + sys.argv)


class TooMany(Exception):
    pass


def fit(req, room):
    """How many pods with requests `req` fit into `room`."""
    best = None
    for r, a in zip(req, room):
        if r > 0:
            if a < r:
                return 0
            k = a // r
            best = k if best is None else min(best, k)
    return best if best is not None else 10**9


def maximal_patterns(option, classes, demand, limit):
    """Every maximal pattern of one option, as tuples of (class, count)."""
    hosts = [c for c in option["classes"] if demand[c] > 0]
    caps = {}
    for c in hosts:
        cap = demand[c]
        if classes[c]["per_node"] is not None:
            cap = min(cap, classes[c]["per_node"])
        cap = min(cap, fit(classes[c]["req"], option["alloc"]))
        if cap > 0:
            caps[c] = cap
    hosts = [c for c in hosts if c in caps]
    out = []
    counts = {}

    def rec(k, room):
        # A class already decided below its cap that fits even if the classes still to
        # come take all they could leaves nothing below here maximal.
        if 0 < k < len(hosts):
            most = [min(a, sum(caps[j] * classes[j]["req"][d] for j in hosts[k:]))
                    for d, a in enumerate(room)]
            for c in hosts[:k]:
                if counts[c] < caps[c] and all(
                    r == 0 or a - m >= r for r, a, m in zip(classes[c]["req"], room, most)
                ):
                    return
        if k == len(hosts):
            # Maximal: no class below its cap still fits.
            for c in hosts:
                if counts.get(c, 0) < caps[c] and fit(classes[c]["req"], room) > 0:
                    return
            pat = tuple((c, n) for c, n in counts.items() if n > 0)
            if pat:
                out.append(pat)
                if len(out) > limit:
                    raise TooMany()
            return
        c = hosts[k]
        req = classes[c]["req"]
        most = min(caps[c], fit(req, room))
        for n in range(most, -1, -1):
            counts[c] = n
            rec(k + 1, [a - n * r for a, r in zip(room, req)])
        counts[c] = 0

    rec(0, list(option["alloc"]))
    return out


def solve(problem, time_limit, max_patterns):
    import highspy

    classes = problem["classes"]
    demand = [c["demand"] for c in classes]
    # The cheapest option per (pool, allocatable, capacity, classes): the rest cannot
    # be in an optimal plan.
    best = {}
    for o in problem["options"]:
        key = (o["pool"], tuple(o["alloc"]), tuple(o["capacity"]), tuple(o["classes"]))
        if key not in best or o["price"] < best[key]["price"]:
            best[key] = o
    options = list(best.values())
    limited = [
        (pool, d, lim)
        for pool, lims in enumerate(problem["limits"])
        for d, lim in enumerate(lims)
        if lim is not None
    ]
    # Without limits a pattern (its counts) needs only its cheapest option.
    columns = {}
    for oi, o in enumerate(options):
        for pat in maximal_patterns(o, classes, demand, max_patterns):
            key = (oi, pat) if limited else pat
            if key not in columns or o["price"] < columns[key][0]:
                columns[key] = (o["price"], oi, pat)
            if len(columns) > max_patterns:
                raise TooMany()
    cols = list(columns.values())
    rows = [i for i, d in enumerate(demand) if d > 0]
    row_of = {c: r for r, c in enumerate(rows)}
    limit_rows = [
        (pool, d, lim)
        for (pool, d, lim) in limited
        if any(options[oi]["pool"] == pool and options[oi]["capacity"][d] > 0 for _, oi, _ in cols)
    ]
    lp = highspy.HighsLp()
    n_cols = len(cols) + len(rows)
    lp.num_col_ = n_cols
    lp.num_row_ = len(rows) + len(limit_rows)
    lp.col_cost_ = [price for price, _, _ in cols] + [classes[c]["penalty"] for c in rows]
    lp.col_lower_ = [0.0] * n_cols
    lp.col_upper_ = [highspy.kHighsInf] * n_cols
    lp.row_lower_ = [float(demand[c]) for c in rows] + [-highspy.kHighsInf] * len(limit_rows)
    lp.row_upper_ = [highspy.kHighsInf] * len(rows) + [float(lim) for _, _, lim in limit_rows]
    start, index, value = [0], [], []
    for price, oi, pat in cols:
        for c, n in pat:
            index.append(row_of[c])
            value.append(float(n))
        for k, (pool, d, _) in enumerate(limit_rows):
            cap = options[oi]["capacity"][d]
            if options[oi]["pool"] == pool and cap > 0:
                index.append(len(rows) + k)
                value.append(float(cap))
        start.append(len(index))
    for r in range(len(rows)):
        index.append(r)
        value.append(1.0)
        start.append(len(index))
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_ = start
    lp.a_matrix_.index_ = index
    lp.a_matrix_.value_ = value
    lp.a_matrix_.num_col_ = n_cols
    lp.a_matrix_.num_row_ = lp.num_row_
    lp.integrality_ = [highspy.HighsVarType.kInteger] * n_cols
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("time_limit", float(time_limit))
    h.setOptionValue("mip_rel_gap", 1e-5)
    h.setOptionValue("threads", 1)
    h.passModel(lp)
    h.run()
    info = h.getInfo()
    optimal = h.getModelStatus() == highspy.HighsModelStatus.kOptimal
    if info.primal_solution_status != 2:  # no feasible solution found
        return None
    return Outcome(optimal, info.objective_function_value, info.mip_dual_bound, len(cols))


class Outcome:
    """What HiGHS proved about one problem."""

    def __init__(self, optimal, value, bound, columns):
        self.optimal = optimal
        self.value = value  # its best plan (cost + penalties)
        self.bound = value if optimal else bound  # a proven lower bound on any plan
        self.columns = columns


def hostable(problem):
    """The problem without the pods no option can host (unplaced in every plan)."""
    hosted = set(c for o in problem["options"] for c in o["classes"])
    classes = [dict(c, demand=c["demand"] if i in hosted else 0)
               for i, c in enumerate(problem["classes"])]
    return dict(problem, classes=classes)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dump")
    ap.add_argument("--time-limit", type=float, default=60.0)
    ap.add_argument("--max-patterns", type=int, default=2_000_000)
    ap.add_argument("--verbose", action="store_true", help="print every queue")
    ap.add_argument("--all", action="store_true",
                    help="solve every problem, also those cooper's own bound proves within 1 %%")
    args = ap.parse_args()
    ensure_highspy()
    started = time.time()
    with open(args.dump) as f:
        queues = [json.loads(line) for line in f if line.strip()]
    rows, dishonest = [], []
    ran = solved = 0  # problems given to HiGHS, and those it solved to optimality
    cache = {}
    if os.path.exists(CACHE):
        with open(CACHE) as f:
            cache = json.load(f)
    for q in queues:
        # Per queue: cooper's cost (+ penalties), the best plan known (cooper's or
        # HiGHS's), and the best proven bound (HiGHS's or cooper's own).
        ours = best = bound = 0.0
        proven = True
        for p in q["problems"]:
            if p["strategy"] != "optimal":
                continue
            p = hostable(p)
            if not any(c["demand"] for c in p["classes"]):
                continue
            cost = p["cost"] + sum(
                c["penalty"] * u for c, u in zip(p["classes"], p["unplaced"]) if c["demand"]
            )
            lb = p["lower_bound"] if not any(
                u for c, u in zip(p["classes"], p["unplaced"]) if c["demand"]) else None
            if not args.all and lb and cost <= lb * 1.01:
                # Within 1 % of cooper's own bound: proven without HiGHS.
                ours += cost
                best += cost
                bound += lb
                proven = False
                continue
            key = hashlib.sha256(json.dumps(
                [p["classes"], p["options"], p["limits"], args.time_limit],
                sort_keys=True).encode()).hexdigest()
            if key in cache:
                out = Outcome(*cache[key]) if cache[key] else None
            else:
                try:
                    out = solve(p, args.time_limit, args.max_patterns)
                except TooMany:
                    out = None
                cache[key] = [out.optimal, out.value, out.bound, out.columns] if out else None
                with open(CACHE, "w") as f:
                    json.dump(cache, f)
            if out is not None and lb is not None and lb > out.value * (1 + 1e-6) + 1e-9:
                dishonest.append((q["seed"], lb, out.value))
            ours += cost
            best += min(cost, out.value) if out else cost
            b = max(out.bound if out else 0.0, lb or 0.0)
            bound += b
            ran += 1
            solved += bool(out and out.optimal)
            proven = proven and out is not None and out.optimal
        at_most = ours / bound if bound > 0 else (1.0 if ours == 0 else float("inf"))
        at_least = ours / best if best > 0 else 1.0
        rows.append((at_most, at_least, proven, q["seed"], q["pods"], ours, best, bound))
        if args.verbose:
            print(f"seed {q['seed']} ({q['pods']} pods): cooper {ours:.4f}, best known {best:.4f}, "
                  f"bound {bound:.4f}{' (optimum proven by HiGHS)' if proven else ''}",
                  flush=True)
    n = len(rows)
    proven_1 = sum(1 for r in rows if r[0] <= 1.01 + 1e-9)
    over_1 = sum(1 for r in rows if r[1] > 1.01 + 1e-9)
    proven_3 = sum(1 for r in rows if r[0] <= 1.03 + 1e-9)
    over_3 = sum(1 for r in rows if r[1] > 1.03 + 1e-9)
    print(f"{n} queues, {time.time() - started:.0f} s; {ran} packing problems not proven within "
          f"1 % by cooper's own bound went to HiGHS, which proved the optimum of {solved} "
          f"within {args.time_limit:.0f} s each")
    print(f"cooper within 1 % of the optimum, proven: {proven_1} of {n} "
          f"({100.0 * proven_1 / max(n, 1):.1f} %); more than 1 % over, proven: {over_1}; "
          f"undecided: {n - proven_1 - over_1}")
    print(f"cooper within 3 %, proven: {proven_3}; more than 3 % over, proven: {over_3}")
    known = sorted(r[1] for r in rows)
    print(f"cooper / best known plan: median {known[n // 2]:.4f}, "
          f"p99 {known[round((n - 1) * 0.99)]:.4f}, max {known[-1]:.4f}")
    for r in sorted(rows, reverse=True)[:15]:
        if r[0] > 1.01 + 1e-9:
            print(f"  seed {r[3]} ({r[4]} pods): cooper {r[5]:.4f}, best known {r[6]:.4f}, "
                  f"bound {r[7]:.4f}: over by {100 * (r[1] - 1):.2f}–{100 * (r[0] - 1):.2f} %")
    for seed, lb, value in dishonest:
        print(f"  DISHONEST BOUND seed {seed}: cooper's bound {lb:.6f} above a plan of {value:.6f}")
    sys.exit(1 if dishonest else 0)


if __name__ == "__main__":
    main()
