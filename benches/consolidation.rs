//! How long one consolidation decision takes on a large cluster (the target:
//! 1,000 nodes and 10,000 pods in under 2 s). The cluster: 1,000 on-demand m6i.4xlarge
//! nodes of a `WhenEmptyOrUnderutilized` pool after a scale-down, each running 4–16 pods
//! of 1 CPU / 2 GiB (about 10,000 in all), budget 10 % of the pool. A plain bench binary:
//! each configuration runs three times and the median is reported. Run with
//! `cargo bench --bench consolidation`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use cooper::catalog::{CapacityType, Catalog};
use cooper::consolidation::{self, Candidate, Input, Style};
use cooper::mix::{SplitMix64, small_pod_mix};
use cooper::planner::{Budget, ExistingNode, PlanOptions, Strategy};
use cooper::resources::Resources;

fn main() {
    // `cargo test --benches` runs bench binaries in test mode: only check they start.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let catalog = Catalog::embedded().expect("catalog");
    let mut pools = cooper::nodepool::defaults().expect("pools");
    pools.retain(|p| p.name == "default");
    pools[0].consolidation_policy = cooper::nodepool::ConsolidationPolicy::WhenEmptyOrUnderutilized;
    let t = catalog.instance_type("m6i.4xlarge").expect("type");
    let offering = catalog
        .offerings_of("m6i.4xlarge")
        .iter()
        .find(|o| o.capacity_type == CapacityType::OnDemand)
        .expect("offering");
    let mut rng = SplitMix64::new(7);
    let mix = small_pod_mix(16_000, 1000, 2048);
    let mut pods = mix.pods.into_iter();
    let mut nodes = Vec::new();
    let mut candidates = Vec::new();
    let mut total_pods = 0;
    for i in 0..1000 {
        let n = 4 + (rng.next_u64() % 13) as usize;
        let on: Vec<_> = pods.by_ref().take(n).collect();
        total_pods += on.len();
        let mut used = Resources::new();
        for p in &on {
            used = used.plus(&p.requests);
        }
        let mut labels = offering.labels.clone();
        labels.extend(pools[0].labels.clone());
        let name = format!("node-{i}");
        nodes.push(ExistingNode {
            name: name.clone(),
            nodepool: Some("default".into()),
            labels,
            taints: Vec::new(),
            allocatable: t.allocatable.clone(),
            capacity: t.capacity.clone(),
            requested: used,
            in_flight: false,
        });
        candidates.push(Candidate {
            name,
            nodepool: "default".into(),
            capacity_type: CapacityType::OnDemand,
            cost_per_hour: offering.price,
            pods: on,
        });
    }
    let max_remove: BTreeMap<String, usize> = [("default".to_string(), 100)].into();
    let unavailable = BTreeSet::new();
    let input = Input {
        pools: &pools,
        catalog: &catalog,
        daemonsets: &[],
        unavailable: &unavailable,
        nodes: &nodes,
        candidates: &candidates,
        running: &[],
        max_remove: &max_remove,
    };
    println!("{} nodes, {} pods", nodes.len(), total_pods);
    println!(
        "{:<26} {:>9} {:>8} {:>8} {:>12}",
        "strategy / style", "median s", "kind", "removes", "saves $/h"
    );
    for (label, strategy, style) in [
        ("optimal / cooper", Strategy::Optimal, Style::COOPER),
        ("greedy / karpenter", Strategy::Greedy, Style::KARPENTER),
    ] {
        let options = PlanOptions {
            strategy,
            time_limit: Duration::from_secs(2),
            relative_gap: 0.01,
            budget: Budget::WallClock,
            exact_search: true,
        };
        let mut times = Vec::new();
        let mut decision = None;
        for _ in 0..3 {
            let start = Instant::now();
            decision = consolidation::best_move(&input, &options, style);
            times.push(start.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        let (kind, removes, saves) = decision
            .map(|m| {
                (
                    m.kind.as_str().to_string(),
                    m.remove.len(),
                    m.savings_per_hour(),
                )
            })
            .unwrap_or_else(|| ("none".into(), 0, 0.0));
        println!(
            "{:<26} {:>9.3} {:>8} {:>8} {:>12.3}",
            label, times[1], kind, removes, saves
        );
    }
}
