//! Plan the benchmark mix once per size and strategy and print the figures:
//! `cargo run --release --example plan_mix -- 1000 10000 50000` (`--constrained` for the
//! mix with 30 % of the pods carrying spread or anti-affinity).
use std::collections::BTreeSet;
use std::time::Duration;

use cooper::catalog::Catalog;
use cooper::planner::{self, PlanInput, PlanOptions, Strategy};

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let constrained = std::env::args().any(|a| a == "--constrained");
    let catalog = Catalog::embedded().expect("catalog");
    let pools = cooper::mix::benchmark_pools();
    for n in if sizes.is_empty() { vec![1000] } else { sizes } {
        let mix = if constrained {
            cooper::mix::constrained_mix(n, 42, 0.3)
        } else {
            cooper::mix::benchmark_mix(n, 42)
        };
        let unavailable = BTreeSet::new();
        let input = PlanInput {
            pods: &mix.pods,
            pools: &pools,
            catalog: &catalog,
            daemonsets: &mix.daemonsets,
            gangs: &mix.gangs,
            nodes: &[],
            unavailable: &unavailable,
            running: &[],
        };
        let only_greedy = std::env::args().any(|a| a == "--greedy");
        for strategy in [Strategy::Greedy, Strategy::Optimal]
            .into_iter()
            .filter(|s| !only_greedy || *s == Strategy::Greedy)
        {
            let plan = planner::plan(
                input,
                &PlanOptions {
                    strategy,
                    time_limit: Duration::from_secs(10),
                    relative_gap: 0.01,
                    budget: planner::Budget::WallClock,
                },
            );
            let problems = planner::verify::verify(&input, &plan);
            println!(
                "{n:>6} pods {strategy:?}: {:.1} ms, ${:.2}/h, {} nodes, {} unschedulable, lb {:?}, problems {}",
                plan.solve_ms,
                plan.total_price_per_hour,
                plan.nodes.len(),
                plan.unschedulable.len(),
                plan.lower_bound_per_hour,
                problems.len()
            );
            for p in problems.iter().take(5) {
                println!("   {p}");
            }
        }
    }
}
