//! The controller with 1,000 pending pods: time from the pods' creation to every pod
//! covered by a NodeClaim, and peak memory. Runs against the Kubernetes API emulator
//! (`tests/apiserver/emulator.py`, needs the test venv that `scripts/test.sh` creates)
//! with the in-memory cloud. Run with `cargo bench --bench controller`.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use cooper::catalog::Catalog;
use cooper::cloud::InMemoryCloud;
use cooper::controller::{Controller, Settings, start_reflectors};
use cooper::crd::NodeClaim;
use cooper::nodepool::NodePoolResource;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

#[path = "common/peak_alloc.rs"]
mod peak_alloc;
use peak_alloc::{LIVE, PEAK, PeakAlloc};

#[global_allocator]
static GLOBAL: PeakAlloc = PeakAlloc;

fn max_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let root = env!("CARGO_MANIFEST_DIR");
    let python = std::env::var("COOPER_TEST_PYTHON")
        .unwrap_or_else(|_| format!("{root}/target/test-venv/bin/python"));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port");
    let mut emulator = Command::new(&python)
        .arg(format!("{root}/tests/apiserver/emulator.py"))
        .arg(port.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the emulator (run scripts/test.sh once to create the venv)");
    let mut line = String::new();
    BufReader::new(emulator.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("ready");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let client = kube::Client::try_from(kube::Config::new(format!("http://127.0.0.1:{port}").parse().expect("uri"))).expect("client");
        // The NodeClasses the shipped pools refer to (the in-memory cloud accepts any).
        let classes: Api<cooper::crd::NodeClass> = Api::all(client.clone());
        for name in ["default", "gpu", "neuron"] {
            let class: cooper::crd::NodeClass = serde_json::from_value(json!({
                "apiVersion": "cooper.dev/v1alpha1", "kind": "NodeClass", "metadata": {"name": name},
                "spec": {"amiFamily": "AL2023", "subnetSelectorTerms": [{"tags": {"k": "v"}}],
                         "securityGroupSelectorTerms": [{"tags": {"k": "v"}}]}
            }))
            .expect("NodeClass");
            classes.create(&PostParams::default(), &class).await.expect("create NodeClass");
        }
        let pools: Api<NodePoolResource> = Api::all(client.clone());
        for doc in cooper::manifest::read_documents(std::path::Path::new(&format!("{root}/config/nodepools.yaml"))).expect("pools") {
            let np: NodePoolResource = serde_json::from_value(doc.value).expect("pool");
            pools.create(&PostParams::default(), &np).await.expect("create pool");
        }
        let catalog = Arc::new(Catalog::embedded().expect("catalog"));
        let cloud = Arc::new(InMemoryCloud::new(&catalog));
        let stores = start_reflectors(&client).await;
        let base = LIVE.load(Ordering::Relaxed);
        PEAK.store(base, Ordering::Relaxed);
        let controller = Controller::new(client.clone(), cloud.clone(), catalog.clone(), Settings::default(), stores);
        tokio::spawn(controller.run(std::future::pending::<()>()));

        // 1,000 pods: web, CPU batch, 1-GPU inference, Neuron inference.
        let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
        let mix: [(usize, &str, serde_json::Value, serde_json::Value); 4] = [
            (600, "web", json!({"cpu": "500m", "memory": "1Gi"}), json!([])),
            (300, "batch", json!({"cpu": "2", "memory": "4Gi"}), json!([])),
            (80, "gpu", json!({"cpu": "3", "memory": "12Gi", "nvidia.com/gpu": "1"}), json!([{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}])),
            (20, "neuron", json!({"cpu": "1", "memory": "2Gi", "aws.amazon.com/neuron": "1"}), json!([{"key": "aws.amazon.com/neuron", "operator": "Exists", "effect": "NoSchedule"}])),
        ];
        let start = Instant::now();
        let mut keys = BTreeSet::new();
        for (count, name, requests, tolerations) in mix {
            for i in 0..count {
                let pod_name = format!("{name}-{i}");
                let pod: Pod = serde_json::from_value(json!({
                    "metadata": {"name": pod_name, "namespace": "default"},
                    "spec": {"containers": [{"name": "c", "image": "x", "resources": {"requests": requests}}], "tolerations": tolerations}
                }))
                .expect("pod");
                pods.create(&PostParams::default(), &pod).await.expect("create");
                let status = json!({"status": {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}]}});
                pods.patch_status(&pod_name, &PatchParams::default(), &Patch::Merge(&status)).await.expect("status");
                keys.insert(format!("default/{pod_name}"));
            }
        }
        let created = start.elapsed();
        let claims: Api<NodeClaim> = Api::all(client.clone());
        let (covered_at, n_claims) = loop {
            let all = claims.list(&ListParams::default()).await.expect("claims").items;
            let covered: BTreeSet<&String> = all.iter().flat_map(|c| c.spec.pods.iter()).collect();
            if keys.iter().all(|k| covered.contains(k)) {
                break (start.elapsed(), all.len());
            }
            assert!(start.elapsed() < Duration::from_secs(120), "not all pods covered after 120 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        println!("pods created (API calls done) after {:.2} s", created.as_secs_f64());
        println!("all 1000 pods covered by {n_claims} NodeClaims {:.2} s after the first pod was created ({} launches)", covered_at.as_secs_f64(), cloud.launches());
        println!(
            "controller peak heap {:.1} MiB above the idle baseline; process max RSS {:.1} MiB (controller + this driver)",
            (PEAK.load(Ordering::Relaxed) - base) as f64 / (1024.0 * 1024.0),
            max_rss_mib()
        );
    });
    let _ = emulator.kill();
    let _ = emulator.wait();
}
