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
}
