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
again unless --all is given (HiGHS then checks that bound instead). The others first
get the node-count relaxation (whole nodes per option, pods packed only in aggregate),
made exact by cuts (see node_count_exact), solved by HiGHS: its bound is tight where
the pattern LP's fractional nodes are not, and it often proves the optimum; the MIP
above runs only where it neither proves the optimum nor the plan within 1 %.

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
    options = distinct_options(problem)
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
    h = new_highs(time_limit, rel_gap=1e-5)
    h.passModel(lp)
    h.run()
    info = h.getInfo()
    optimal = h.getModelStatus() == highspy.HighsModelStatus.kOptimal
    if info.primal_solution_status != 2:  # no feasible solution found
        return None
    return Outcome(optimal, info.objective_function_value, info.mip_dual_bound, len(cols))


def distinct_options(problem):
    """The cheapest option per (pool, allocatable, capacity, classes): the rest cannot
    be in an optimal plan."""
    best = {}
    for o in problem["options"]:
        key = (o["pool"], tuple(o["alloc"]), tuple(o["capacity"]), tuple(o["classes"]))
        if key not in best or o["price"] < best[key]["price"]:
            best[key] = o
    return list(best.values())


def new_highs(time_limit, rel_gap=1e-6):
    """A quiet, single-threaded HiGHS with a time limit and a relative MIP gap."""
    import highspy

    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("time_limit", float(max(time_limit, 0.01)))
    h.setOptionValue("mip_rel_gap", rel_gap)
    h.setOptionValue("threads", 1)
    return h


def add_var(h, cost, upper, is_int):
    import highspy

    h.addVar(0.0, upper)
    j = h.getNumCol() - 1
    h.changeColCost(j, cost)
    if is_int:
        h.changeColIntegrality(j, highspy.HighsVarType.kInteger)
    return j


def node_count_model(problem, options, time_limit):
    """The node-count relaxation: whole nodes per option, pods assigned to options in
    whole numbers but packed only in aggregate (per option, the pods' requests within
    the allocatable of its nodes, per-node caps times its nodes). Every plan is a
    solution of it, so its optimum bounds every plan; it is tight where the pattern LP
    is weakest (few nodes, each a large share of the cost)."""
    import highspy

    classes = problem["classes"]
    inf = highspy.kHighsInf
    h = new_highs(time_limit)
    pods = sum(c["demand"] for c in classes)
    y, z, s = [], {}, {}
    for oi, o in enumerate(options):
        y.append(add_var(h, o["price"], float(pods), True))
        for c in o["classes"]:
            if classes[c]["demand"] > 0 and fit(classes[c]["req"], o["alloc"]) > 0:
                z[(c, oi)] = add_var(h, 0.0, float(classes[c]["demand"]), True)
    for c, cl in enumerate(classes):
        if cl["demand"] == 0:
            continue
        s[c] = add_var(h, cl["penalty"], float(cl["demand"]), True)
        idx = [z[(c, oi)] for oi in range(len(options)) if (c, oi) in z] + [s[c]]
        h.addRow(float(cl["demand"]), inf, len(idx), idx, [1.0] * len(idx))
    for oi, o in enumerate(options):
        hosted = [c for c in o["classes"] if (c, oi) in z]
        for d, a in enumerate(o["alloc"]):
            terms = [(z[(c, oi)], classes[c]["req"][d] / max(a, 1)) for c in hosted
                     if classes[c]["req"][d] > 0]
            if terms:
                terms.append((y[oi], -1.0))
                h.addRow(-inf, 0.0, len(terms), [j for j, _ in terms], [v for _, v in terms])
        for c in hosted:
            cap = fit(classes[c]["req"], o["alloc"])
            if classes[c]["per_node"] is not None:
                cap = min(cap, classes[c]["per_node"])
            if cap < classes[c]["demand"]:
                h.addRow(-inf, 0.0, 2, [z[(c, oi)], y[oi]], [1.0, -float(cap)])
    for pool, lims in enumerate(problem["limits"]):
        for d, lim in enumerate(lims):
            if lim is None:
                continue
            terms = [(y[oi], float(o["capacity"][d])) for oi, o in enumerate(options)
                     if o["pool"] == pool and o["capacity"][d] > 0]
            if terms:
                h.addRow(-inf, float(lim), len(terms), [j for j, _ in terms],
                         [v for _, v in terms])
    return h, y, s


def packs(problem, options, counts, left_out, time_limit):
    """Do the pods (less `left_out` per class) fit onto `counts[oi]` nodes of each
    option? True, False, or None when HiGHS could not tell in time."""
    import highspy

    classes = problem["classes"]
    inf = highspy.kHighsInf
    h = new_highs(time_limit)
    slots = [oi for oi, k in enumerate(counts) for _ in range(k)]
    n = {}
    for j, oi in enumerate(slots):
        for c in options[oi]["classes"]:
            if classes[c]["demand"] > 0:
                cap = fit(classes[c]["req"], options[oi]["alloc"])
                if classes[c]["per_node"] is not None:
                    cap = min(cap, classes[c]["per_node"])
                if cap > 0:
                    n[(c, j)] = add_var(h, 0.0, float(min(cap, classes[c]["demand"])), True)
    for c, cl in enumerate(classes):
        need = cl["demand"] - left_out.get(c, 0)
        if need <= 0:
            continue
        idx = [n[(c, j)] for j in range(len(slots)) if (c, j) in n]
        if not idx:
            return False
        h.addRow(float(need), inf, len(idx), idx, [1.0] * len(idx))
    for j, oi in enumerate(slots):
        hosted = [c for c in options[oi]["classes"] if (c, j) in n]
        for d, a in enumerate(options[oi]["alloc"]):
            terms = [(n[(c, j)], float(classes[c]["req"][d])) for c in hosted
                     if classes[c]["req"][d] > 0]
            if terms:
                h.addRow(-inf, float(a), len(terms), [v for v, _ in terms],
                         [w for _, w in terms])
    h.run()
    status = h.getModelStatus()
    if status == highspy.HighsModelStatus.kOptimal:
        return True
    if status == highspy.HighsModelStatus.kInfeasible:
        return False
    return None


def node_count_exact(problem, time_limit):
    """The node-count relaxation, made exact by cuts (logic-based Benders): solve it,
    check whether its pods really pack onto its nodes (a small assignment MIP); if not,
    no plan with at most those nodes of every option (and at most those pods left out)
    exists either, so cut them all off and solve again. Each relaxed optimum is a lower
    bound; the first whose nodes pack is the optimum. Returns (bound, optimum or None)."""
    import highspy

    options = distinct_options(problem)
    classes = problem["classes"]
    started = time.time()
    h, y, s = node_count_model(problem, options, time_limit)
    bound = None
    while True:
        left = time_limit - (time.time() - started)
        if left <= 0:
            return bound, None
        h.setOptionValue("time_limit", float(left))
        h.run()
        info = h.getInfo()
        if h.getModelStatus() != highspy.HighsModelStatus.kOptimal:
            b = info.mip_dual_bound if info.mip_dual_bound > -highspy.kHighsInf else None
            return (max(bound, b) if bound is not None and b is not None else bound or b), None
        value = info.objective_function_value
        bound = value if bound is None else max(bound, value)
        x = h.getSolution().col_value
        counts = [int(round(x[j])) for j in y]
        left_out = {c: int(round(x[j])) for c, j in s.items()}
        fits = packs(problem, options, counts, left_out,
                     time_limit - (time.time() - started))
        if fits:
            return bound, value
        if fits is None:
            return bound, None
        # Cut: some option gets more nodes, or some class more pods left out.
        flags = []
        for oi, j in enumerate(y):
            b = add_var(h, 0.0, 1.0, True)
            h.addRow(0.0, highspy.kHighsInf, 2, [j, b], [1.0, -float(counts[oi] + 1)])
            flags.append(b)
        for c, j in s.items():
            if left_out[c] < classes[c]["demand"]:
                b = add_var(h, 0.0, 1.0, True)
                h.addRow(0.0, highspy.kHighsInf, 2, [j, b], [1.0, -float(left_out[c] + 1)])
                flags.append(b)
        h.addRow(1.0, highspy.kHighsInf, len(flags), flags, [1.0] * len(flags))


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
    by_node_count = 0  # problems the node-count relaxation alone proved within 1 %
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
            # The node-count relaxation first: a bound, and often the proof alone.
            counted_key = "node-count " + key
            if counted_key not in cache:
                cache[counted_key] = node_count_exact(p, args.time_limit)
                with open(CACHE, "w") as f:
                    json.dump(cache, f)
            counted, optimum = cache[counted_key]
            if optimum is not None:
                # The node-count relaxation with its cuts proved the optimum.
                if lb is not None and lb > optimum * (1 + 1e-6) + 1e-9:
                    dishonest.append((q["seed"], lb, optimum))
                ours += cost
                best += min(cost, optimum)
                bound += optimum
                ran += 1
                solved += 1
                continue
            if not args.all and counted and cost <= max(counted, lb or 0.0) * 1.01:
                ours += cost
                best += cost
                bound += max(counted, lb or 0.0)
                proven = False
                by_node_count += 1
                continue
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
            b = max(out.bound if out else 0.0, lb or 0.0, counted or 0.0)
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
    print(f"{by_node_count} packing problems proven within 1 % by the node-count "
          "relaxation's bound alone (HiGHS)")
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
