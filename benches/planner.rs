//! Planner benchmarks: 1,000, 10,000 and 50,000 pending pods of the realistic mix
//! (web, CPU batch, 1/4/8-GPU training with gangs, Neuron inference, some zone / arch /
//! capacity-type selectors and tolerations) over the full embedded catalog.
//!
//! `cargo bench --bench planner` first prints one run per size and strategy — time,
//! price, nodes, price against greedy and against the LP lower bound, and the peak heap
//! the plan allocated — then the small-queue suite (hundreds of seeded random queues of
//! 2–100 pods planned with the default options: how far each plan is proven from the
//! optimum, how far from the exact optimum where a gap-0 solve proves one within
//! `COOPER_BENCH_EXACT_SECS`, and how long it took), then lets criterion time each case.
//! `COOPER_BENCH_ONLY=small` runs the small-queue suite alone; `COOPER_BENCH_SEED=n`
//! plans one queue of it, printing its pods and the planner's debug log;
//! `COOPER_BENCH_DUMP=file` writes each queue's packing problems and the cost cooper
//! found for them as JSON lines, for `scripts/exact_reference.py` to solve exactly
//! with HiGHS.

use std::collections::BTreeSet;
use std::hint::black_box;
use std::io::Write;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use cooper::catalog::Catalog;
use cooper::mix::{Mix, benchmark_mix, benchmark_pools, constrained_mix, random_queue};
use cooper::nodepool::NodePool;
use cooper::planner::{self, Plan, PlanOptions, Strategy};
use criterion::{Criterion, criterion_group, criterion_main};

#[path = "common/peak_alloc.rs"]
mod peak_alloc;
use peak_alloc::{LIVE, PEAK, PeakAlloc};

#[global_allocator]
static GLOBAL: PeakAlloc = PeakAlloc;

const SIZES: [usize; 3] = [1_000, 10_000, 50_000];
/// Share of pods carrying spread or anti-affinity in the constrained rows.
const CONSTRAINED_SHARE: f64 = 0.3;

/// The mixes measured: the plain mix and the one with 30 % constrained pods, per size.
fn mixes() -> Vec<(String, Mix)> {
    let mut out = Vec::new();
    for n in SIZES {
        out.push((format!("{n}"), benchmark_mix(n, 42)));
    }
    for n in SIZES {
        out.push((
            format!("{n}+constraints"),
            constrained_mix(n, 42, CONSTRAINED_SHARE),
        ));
    }
    out
}

fn run(mix: &Mix, pools: &[NodePool], catalog: &Catalog, strategy: Strategy) -> Plan {
    let unavailable = BTreeSet::new();
    let input = mix.plan_input(pools, catalog, &unavailable);
    planner::plan(
        input,
        &PlanOptions {
            strategy,
            time_limit: Duration::from_secs(10),
            relative_gap: 0.01,
            budget: planner::Budget::WallClock,
            exact_search: true,
        },
    )
}

fn summary(catalog: &Catalog, pools: &[NodePool]) {
    println!(
        "\nbackend {}; {:>6} {:>8} {:>9} {:>11} {:>6} {:>8} {:>9} {:>10}",
        planner::lp::backend_name(),
        "pods",
        "strategy",
        "time ms",
        "$/hour",
        "nodes",
        "vs greedy",
        "vs bound",
        "peak MiB"
    );
    for (label, mix) in mixes() {
        let mut greedy_price = 0.0;
        for strategy in [Strategy::Greedy, Strategy::Optimal] {
            let base = LIVE.load(Ordering::Relaxed);
            PEAK.store(base, Ordering::Relaxed);
            let t = Instant::now();
            let plan = run(&mix, pools, catalog, strategy);
            let ms = t.elapsed().as_secs_f64() * 1000.0;
            let peak = (PEAK.load(Ordering::Relaxed) - base) as f64 / (1 << 20) as f64;
            if strategy == Strategy::Greedy {
                greedy_price = plan.total_price_per_hour;
            }
            let vs_bound = plan
                .lower_bound_per_hour
                .map(|lb| format!("{:.4}", plan.total_price_per_hour / lb))
                .unwrap_or_else(|| "-".into());
            println!(
                "{:>6} {:>8} {:>9.1} {:>11.2} {:>6} {:>8.3} {:>9} {:>10.1}   ({} unschedulable, {label})",
                mix.pods.len(),
                format!("{strategy:?}").to_lowercase(),
                ms,
                plan.total_price_per_hour,
                plan.nodes.len(),
                plan.total_price_per_hour / greedy_price,
                vs_bound,
                peak,
                plan.unschedulable.len()
            );
        }
    }
    println!();
}

/// Random queues in the small-queue suite.
const SMALL_QUEUES: u64 = 300;

/// The small-queue suite: per queue, the optimal plan (default options: 2 s, 1 % gap)
/// against its own proven lower bound — cost / bound bounds cost / optimum from above,
/// so a ratio within 1 % proves the plan within 1 % of the optimum — and against greedy.
fn small_queues(catalog: &Catalog, pools: &[NodePool]) {
    let mut ratios: Vec<f64> = Vec::new();
    let mut vs_greedy: Vec<f64> = Vec::new();
    let mut times: Vec<f64> = Vec::new();
    let mut unbounded = 0usize;
    let mut unbounded_seeds: Vec<(u64, String)> = Vec::new();
    let mut worst: Option<(f64, usize, u64)> = None;
    let mut vs_exact: Vec<f64> = Vec::new();
    let mut worst_exact: Option<(f64, usize, u64)> = None;
    let mut not_exact = 0usize;
    // COOPER_BENCH_EXACT_SECS: the time the exact solve (gap 0) may take per queue.
    let exact_limit = std::time::Duration::from_secs_f64(
        std::env::var("COOPER_BENCH_EXACT_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(10.0),
    );
    // COOPER_BENCH_SEED=n plans that one queue (with RUST_LOG=cooper=debug to follow it).
    let seeds = match std::env::var("COOPER_BENCH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        Some(seed) => {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .with_writer(std::io::stderr)
                .try_init();
            seed..seed + 1
        }
        // COOPER_BENCH_QUEUES=n: the first n queues only.
        None => {
            0..std::env::var("COOPER_BENCH_QUEUES")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(SMALL_QUEUES)
        }
    };
    let mut dump = std::env::var("COOPER_BENCH_DUMP").ok().map(|path| {
        std::io::BufWriter::new(
            std::fs::File::create(&path)
                .unwrap_or_else(|e| panic!("COOPER_BENCH_DUMP {path}: {e}")),
        )
    });
    for seed in seeds.clone() {
        let n = 2 + (seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 33) as usize % 99;
        let mix = random_queue(n, seed);
        if seeds.end - seeds.start == 1 {
            let mut shapes: std::collections::BTreeMap<String, usize> = Default::default();
            for pod in &mix.pods {
                *shapes
                    .entry(format!("{} {:?}", pod.workload, pod.requests))
                    .or_default() += 1;
            }
            for (shape, count) in shapes {
                eprintln!("{count:>4} × {shape}");
            }
        }
        let unavailable = BTreeSet::new();
        let input = mix.plan_input(pools, catalog, &unavailable);
        let t = Instant::now();
        let (plan, problems) =
            planner::capture::capture(|| planner::plan(input, &PlanOptions::default()));
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        if let Some(out) = dump.as_mut() {
            let line = serde_json::json!({
                "seed": seed,
                "pods": n,
                "plan_cost": plan.total_price_per_hour,
                "problems": problems,
            });
            writeln!(out, "{line}").expect("writing COOPER_BENCH_DUMP");
        }
        let greedy = planner::plan(
            input,
            &PlanOptions {
                strategy: Strategy::Greedy,
                ..PlanOptions::default()
            },
        );
        // The exact optimum, where a solve to gap 0 proves one within its time.
        let exact = planner::plan(
            input,
            &PlanOptions {
                time_limit: exact_limit,
                relative_gap: 0.0,
                ..PlanOptions::default()
            },
        );
        match exact.lower_bound_per_hour {
            Some(lb) if lb >= exact.total_price_per_hour * (1.0 - 1e-6) => {
                let optimum = exact.total_price_per_hour.min(plan.total_price_per_hour);
                let r = if optimum > 0.0 {
                    plan.total_price_per_hour / optimum
                } else {
                    1.0
                };
                if worst_exact.is_none_or(|(w, ..)| r > w) {
                    worst_exact = Some((r, n, seed));
                }
                vs_exact.push(r);
            }
            _ => not_exact += 1,
        }
        if greedy.total_price_per_hour > 0.0 {
            vs_greedy.push(plan.total_price_per_hour / greedy.total_price_per_hour);
        }
        match plan.lower_bound_per_hour {
            Some(lb) if lb > 0.0 => {
                let r = plan.total_price_per_hour / lb;
                if worst.is_none_or(|(w, ..)| r > w) {
                    worst = Some((r, n, seed));
                }
                ratios.push(r);
            }
            Some(_) => ratios.push(1.0),
            None => {
                unbounded += 1;
                if unbounded_seeds.len() < 8 {
                    unbounded_seeds.push((seed, plan.bound_note.clone().unwrap_or_default()));
                }
            }
        }
    }
    let pct = |v: &mut Vec<f64>, q: f64| -> f64 {
        v.sort_by(f64::total_cmp);
        v.get(((v.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    println!(
        "small queues: {} random queues of 2–100 pods (seeds {seeds:?}), optimal with default options",
        seeds.end - seeds.start
    );
    println!(
        "  cost / proven bound: {}; no bound {}",
        distribution(&mut ratios, "bounded", worst),
        unbounded
    );
    for (seed, why) in &unbounded_seeds {
        println!("  no bound, seed {seed}: {why}");
    }
    println!(
        "  cost / exact optimum: {}; optimum not proven in {:.0} s: {}",
        distribution(&mut vs_exact, "proven", worst_exact),
        exact_limit.as_secs_f64(),
        not_exact
    );
    println!(
        "  cost / greedy: median {:.3}, max {:.3}; time ms: median {:.1}, p99 {:.1}, max {:.1}",
        pct(&mut vs_greedy, 0.5),
        pct(&mut vs_greedy, 1.0),
        pct(&mut times, 0.5),
        pct(&mut times, 0.99),
        pct(&mut times, 1.0)
    );
    println!();
}

/// "within 1 % k of n <what> (…%), within 3 % …, median, p99, max (worst queue)".
fn distribution(ratios: &mut [f64], what: &str, worst: Option<(f64, usize, u64)>) -> String {
    ratios.sort_by(f64::total_cmp);
    let within = |limit: f64| ratios.iter().filter(|r| **r <= limit + 1e-9).count();
    let pct = |q: f64| -> f64 {
        ratios
            .get(((ratios.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    format!(
        "within 1 % {} of {} {what} ({:.1} %), within 3 % {}, median {:.4}, p99 {:.4}, max {:.4}{}",
        within(1.01),
        ratios.len(),
        100.0 * within(1.01) as f64 / ratios.len().max(1) as f64,
        within(1.03),
        pct(0.5),
        pct(0.99),
        pct(1.0),
        worst.map_or(String::new(), |(_, n, seed)| format!(
            " ({n} pods, seed {seed})"
        ))
    )
}

fn bench(c: &mut Criterion) {
    let catalog = Catalog::embedded().expect("embedded catalog");
    let pools = benchmark_pools();
    // Under `cargo test` / nextest the bench runs once as a smoke test; the summary is
    // for `cargo bench`, which passes --bench.
    if std::env::args().any(|a| a == "--bench") {
        // COOPER_BENCH_ONLY (any value) runs the small-queue suite alone.
        let only = std::env::var("COOPER_BENCH_ONLY").ok();
        if only.is_none() {
            summary(&catalog, &pools);
        }
        // The small-queue suite is the issue's "random queues, shipped catalog, no
        // limits": the Neuron pool's limit left pods of 8 of 300 queues unplaced.
        let unlimited: Vec<NodePool> = pools
            .iter()
            .cloned()
            .map(|mut p| {
                p.limits = Default::default();
                p
            })
            .collect();
        small_queues(&catalog, &unlimited);
        if only.is_some() {
            return;
        }
    }
    let mut group = c.benchmark_group("plan");
    group.sample_size(10);
    let timing = std::env::args().any(|a| a == "--bench");
    for (label, mix) in mixes() {
        // As a smoke test (the test suite runs each case once, unoptimised), the
        // constrained mix runs at its smallest size only.
        if !timing && label.ends_with("+constraints") && mix.pods.len() > 1_100 {
            continue;
        }
        for strategy in [Strategy::Greedy, Strategy::Optimal] {
            group.bench_function(
                format!("{}/{label}", format!("{strategy:?}").to_lowercase()),
                |b| b.iter(|| black_box(run(&mix, &pools, &catalog, strategy))),
            );
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
