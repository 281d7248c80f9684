//! Launch latency against a real EC2 API (a moto server on 127.0.0.1): from
//! `CloudProvider::create` — CreateFleet instant (tagged in the request), DescribeInstances
//! (CreateTags only if the tags are missing) — to the instance cooper records on its
//! NodeClaim, and TerminateInstances (with its ownership check). Needs the test venv `scripts/test.sh` creates. `cargo bench --bench ec2_launch`.

use std::time::{Duration, Instant};

use cooper::catalog::CapacityType;
use cooper::cloud::{CloudProvider, LaunchRequest};

#[path = "../tests/common/mod.rs"]
mod common;
use common::{Moto, ready_cloud};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let moto = Moto::start();
        let cloud = ready_cloud(&moto).await;
        let request = |i: usize| LaunchRequest {
            claim: format!("bench-{i}"),
            client_token: format!("bench-{i}-0"),
            nodepool: "general".into(),
            offerings: vec![
                ("m5.large".into(), "us-east-1a".into(), CapacityType::OnDemand),
                ("m5.xlarge".into(), "us-east-1a".into(), CapacityType::OnDemand),
                ("c5.xlarge".into(), "us-east-1a".into(), CapacityType::OnDemand),
            ],
            node_class: Some("default".into()),
            ..LaunchRequest::default()
        };
        // The first launch also creates the launch template.
        let start = Instant::now();
        let first = cloud.create(&request(0)).await.expect("launch");
        let cold = start.elapsed();
        let mut launches = Vec::new();
        let mut ids = vec![first.id];
        for i in 1..=50 {
            let start = Instant::now();
            let instance = cloud.create(&request(i)).await.expect("launch");
            launches.push(start.elapsed());
            ids.push(instance.id);
        }
        let mut terminations = Vec::new();
        for id in &ids {
            let start = Instant::now();
            cloud.terminate(id).await.expect("terminate");
            terminations.push(start.elapsed());
        }
        launches.sort();
        terminations.sort();
        println!(
            "ec2 launch (CreateFleet instant -> DescribeInstances -> recorded), {} launches against moto:",
            launches.len()
        );
        println!(
            "  first launch (creates the launch template): {:.1} ms",
            ms(cold)
        );
        println!(
            "  p50 {:.1} ms  p95 {:.1} ms  max {:.1} ms",
            ms(percentile(&launches, 0.5)),
            ms(percentile(&launches, 0.95)),
            ms(*launches.last().expect("some"))
        );
        println!(
            "terminate (DescribeInstances ownership check -> TerminateInstances), {}: p50 {:.1} ms  p95 {:.1} ms",
            terminations.len(),
            ms(percentile(&terminations, 0.5)),
            ms(percentile(&terminations, 0.95))
        );
    });
}
