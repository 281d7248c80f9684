//! Wall time and peak heap of simulating every shipped scenario (the targets:
//! `large.yaml` in ≤ 10 s, all four in ≤ 20 s). A plain bench binary rather than
//! criterion: one run of `large.yaml` takes seconds, so each scenario is run three
//! times and the median reported. Run with `cargo bench --bench simulate`.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Instant;

use cooper::sim::{self, SimOptions, scenario};

#[path = "common/peak_alloc.rs"]
mod peak_alloc;
use peak_alloc::{LIVE, PEAK, PeakAlloc};

#[global_allocator]
static GLOBAL: PeakAlloc = PeakAlloc;

fn main() {
    // `cargo test --benches` runs bench binaries in test mode: only check they start.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut total = 0.0;
    println!(
        "{:<22} {:>9} {:>9} {:>10} {:>10} {:>10}",
        "scenario", "median s", "pods", "nodes", "cost $", "peak MiB"
    );
    for file in [
        "sentiment-inf1.yaml",
        "gpu-training.yaml",
        "mixed-spot.yaml",
        "large.yaml",
    ] {
        let scenario = scenario::load(&root.join("simulations").join(file)).expect("scenario");
        let mut times = Vec::new();
        let mut report = None;
        let base = LIVE.load(Ordering::Relaxed);
        PEAK.store(base, Ordering::Relaxed);
        for _ in 0..3 {
            let start = Instant::now();
            report = Some(sim::run(&scenario, &SimOptions::default()).expect("simulate"));
            times.push(start.elapsed().as_secs_f64());
        }
        let peak = (PEAK.load(Ordering::Relaxed) - base) as f64 / (1024.0 * 1024.0);
        times.sort_by(f64::total_cmp);
        let report = report.expect("ran");
        total += times[1];
        println!(
            "{:<22} {:>9.2} {:>9} {:>10} {:>10.2} {:>10.1}",
            file,
            times[1],
            report.pods_created,
            report.nodes.len(),
            report.total_cost,
            peak
        );
    }
    println!("{:<22} {:>9.2}", "all four", total);
    long_runs(root);
}

/// The careless-input targets (issue 14): a year of HPA scaling and a million job
/// arrivals, one run each (they take seconds), written next to the build as scenario
/// files so they go through the same loader as a user's.
fn long_runs(root: &Path) {
    let dir = root.join("target").join("bench-scenarios");
    std::fs::create_dir_all(&dir).expect("scenario dir");
    let year = |file: &str| {
        let text = std::fs::read_to_string(root.join("simulations").join(file)).expect("read");
        text.lines()
            .map(|l| {
                if l.starts_with("duration:") {
                    "duration: 8760h"
                } else {
                    l
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    let million = "name: million-jobs\nduration: 24h\nworkloads:\n- manifest:\n    apiVersion: v1\n    kind: Pod\n    metadata: {name: job}\n    spec:\n      containers:\n      - name: c\n        image: x\n        resources: {requests: {cpu: 100m, memory: 128Mi}}\n  arrivals: {every: 86ms}\n  runFor: 30s\n";
    let runs = [
        ("sentiment-inf1 1 year", year("sentiment-inf1.yaml")),
        ("mixed-spot 1 year", year("mixed-spot.yaml")),
        ("1,000,000 job arrivals", million.to_string()),
    ];
    println!();
    println!(
        "{:<24} {:>9} {:>9} {:>10} {:>10} {:>10}",
        "long run", "s", "pods", "nodes", "plans", "peak MiB"
    );
    for (name, text) in runs {
        let path = dir.join(format!("{}.yaml", name.replace([' ', ','], "-")));
        std::fs::write(&path, text).expect("write scenario");
        let scenario = scenario::load(&path).expect("scenario");
        let base = LIVE.load(Ordering::Relaxed);
        PEAK.store(base, Ordering::Relaxed);
        let start = Instant::now();
        let report = sim::run(&scenario, &SimOptions::default()).expect("simulate");
        let secs = start.elapsed().as_secs_f64();
        let peak = (PEAK.load(Ordering::Relaxed) - base) as f64 / (1024.0 * 1024.0);
        println!(
            "{:<24} {:>9.2} {:>9} {:>10} {:>10} {:>10.1}",
            name,
            secs,
            report.pods_created,
            report.nodes.len(),
            report.plans,
            peak
        );
    }
}
