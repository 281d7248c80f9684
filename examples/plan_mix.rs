//! Plan the benchmark mix once per size and strategy and print the figures:
//! `cargo run --release --example plan_mix -- 1000 10000 50000` (`--constrained` for the
//! mix with 30 % of the pods carrying spread or anti-affinity).
use std::collections::BTreeSet;
use std::time::Duration;

use cooper::catalog::Catalog;
use cooper::planner::{self, PlanOptions, Strategy};

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
    let small = std::env::args().any(|a| a == "--small");
    let catalog = Catalog::embedded().expect("catalog");
    let pools = cooper::mix::benchmark_pools();
    if small {
        // Per-node costs priced (the default: a 20 GiB gp3 root volume per node) against
        // instance prices only (as before they were priced), both totalled the same way.
        let n = sizes.first().copied().unwrap_or(50_000);
        let cpu = std::env::var("SMALL_CPU_MILLIS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(250);
        let mem = std::env::var("SMALL_MEMORY_MIB")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(512);
        let mix = if std::env::args().any(|a| a == "--benchmark-mix") {
            cooper::mix::benchmark_mix(n, 42)
        } else {
            cooper::mix::small_pod_mix(n, cpu, mem)
        };
        let mut instance_only = pools.clone();
        for p in &mut instance_only {
            p.billing.volumes.clear();
        }
        // A per-node cost to add (`PER_NODE_COST`, USD/h: a monitoring agent billed
        // per host, ~$15/host-month, is 0.02) and a public address (`PUBLIC_IPV4=1`).
        let mut pools = pools.clone();
        for p in &mut pools {
            p.billing.extra_per_hour = std::env::var("PER_NODE_COST")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0);
            p.billing.public_ipv4 = std::env::var("PUBLIC_IPV4").is_ok_and(|v| v == "1");
        }
        let per_node = catalog.node_charges(&pools[0].billing).total();
        let unavailable = BTreeSet::new();
        for (label, pools) in [
            ("instance prices only", &instance_only),
            ("whole node", &pools),
        ] {
            let input = mix.plan_input(pools, &catalog, &unavailable);
            for strategy in [Strategy::Greedy, Strategy::Optimal] {
                let plan = planner::plan(input, &options(strategy));
                let whole = plan.instance_price_per_hour + per_node * plan.nodes.len() as f64;
                println!(
                    "{n} small pods, {label}, {strategy:?}: {} nodes, instances ${:.2}/h, with per-node costs ${whole:.2}/h, {:.0} ms, problems {}",
                    plan.nodes.len(),
                    plan.instance_price_per_hour,
                    plan.solve_ms,
                    planner::verify::verify(&input, &plan).len()
                );
            }
        }
        return;
    }
    for n in if sizes.is_empty() { vec![1000] } else { sizes } {
        let mix = if constrained {
            cooper::mix::constrained_mix(n, 42, 0.3)
        } else {
            cooper::mix::benchmark_mix(n, 42)
        };
        let unavailable = BTreeSet::new();
        let input = mix.plan_input(&pools, &catalog, &unavailable);
        let only_greedy = std::env::args().any(|a| a == "--greedy");
        for strategy in [Strategy::Greedy, Strategy::Optimal]
            .into_iter()
            .filter(|s| !only_greedy || *s == Strategy::Greedy)
        {
            let plan = planner::plan(input, &options(strategy));
            let problems = planner::verify::verify(&input, &plan);
            if let Some(note) = &plan.bound_note {
                println!("   bound: {note}");
            }
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

/// The benchmark's options: a 10 s limit and a 1 % gap.
fn options(strategy: Strategy) -> PlanOptions {
    PlanOptions {
        strategy,
        time_limit: Duration::from_secs(10),
        relative_gap: 0.01,
        budget: planner::Budget::WallClock,
        exact_search: true,
    }
}
