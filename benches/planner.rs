//! Planner benchmarks: 1,000, 10,000 and 50,000 pending pods of the realistic mix
//! (web, CPU batch, 1/4/8-GPU training with gangs, Neuron inference, some zone / arch /
//! capacity-type selectors and tolerations) over the full embedded catalog.
//!
//! `cargo bench --bench planner` first prints one run per size and strategy — time,
//! price, nodes, price against greedy and against the LP lower bound, and the peak heap
//! the plan allocated — then lets criterion time each case.

use std::collections::BTreeSet;
use std::hint::black_box;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use cooper::catalog::Catalog;
use cooper::mix::{Mix, benchmark_mix, benchmark_pools, constrained_mix};
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

fn bench(c: &mut Criterion) {
    let catalog = Catalog::embedded().expect("embedded catalog");
    let pools = benchmark_pools();
    // Under `cargo test` / nextest the bench runs once as a smoke test; the summary is
    // for `cargo bench`, which passes --bench.
    if std::env::args().any(|a| a == "--bench") {
        summary(&catalog, &pools);
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
