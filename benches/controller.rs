//! The controller scaling out for 1,000 pending pods (600 web, 300 CPU batch, 80 1-GPU,
//! 20 Neuron) on a real Kubernetes 1.26 control plane: the real scheduler marks them
//! Unschedulable and binds them, the harness's kubelets register the launched nodes (2 s
//! boot) and run the pods. Four runs:
//!
//! - `local`: the in-memory cloud (no latency): the controller's own cost;
//! - `ec2`: aws-sdk-ec2 → the fault proxy → moto, with EC2-like latency (CreateFleet
//!   1.5 ± 0.5 s, every other call 0.1–0.3 s), and a spot interruption notice through SQS
//!   for a launched spot instance once 40 claims have launched;
//! - `ec2-faults`: the same latency, 10 % of every call throttled, and the offering of
//!   the first GPU claim exhausted (InsufficientInstanceCapacity) from the moment it is seen;
//! - `ec2-chaos`: the same latency, 10 % of CreateFleet connections reset *after* EC2
//!   launched, 5 % of calls throttled, and one CreateFleet held for ten minutes.
//!
//! Reported: time to every pod covered by a NodeClaim, every claim launched, every pod
//! Running (from the first pod's creation, and from the last's); instances per claim;
//! instances launched against planned nodes; what the garbage collector deleted; peak
//! cloud calls in flight; how soon the interrupted node's drain began; peak heap and RSS.
//!
//! `cargo bench --bench controller` (all; `COOPER_BENCH_CLOUD=local|ec2|ec2-faults|ec2-chaos`
//! for one; `COOPER_BENCH_TRACE=1` prints to stderr, every 3 s after the interruption,
//! where the interrupted node's pods stand: bound, nominated where, the scheduler's
//! last message). Needs the test venv (`scripts/test.sh` creates it) and the Kubernetes
//! binaries (see `tests/common/k8s.rs`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use cooper::catalog::Catalog;
use cooper::cloud::{CloudProvider, InMemoryCloud};
use cooper::controller::{Controller, Settings, start_reflectors};
use cooper::crd::{NodeClaim, NodeClass};
use cooper::nodepool::NodePoolResource;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ListParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;
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

/// The shipped NodePools, and NodeClasses of those names (resolved against moto for EC2).
async fn objects(client: &Client) {
    let root = env!("CARGO_MANIFEST_DIR");
    let classes: Api<NodeClass> = Api::all(client.clone());
    for name in ["default", "gpu", "neuron"] {
        classes
            .create(
                &PostParams::default(),
                &NodeClass::new(name, common::node_class_spec()),
            )
            .await
            .expect("create NodeClass");
    }
    let pools: Api<NodePoolResource> = Api::all(client.clone());
    for doc in cooper::manifest::read_documents(std::path::Path::new(&format!(
        "{root}/config/nodepools.yaml"
    )))
    .expect("pools")
    {
        let np: NodePoolResource = serde_json::from_value(doc.value).expect("pool");
        pools
            .create(&PostParams::default(), &np)
            .await
            .expect("create pool");
    }
}

async fn create_pods(client: &Client) -> BTreeMap<String, Pod> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let mix: [(usize, &str, serde_json::Value, serde_json::Value); 4] = [
        (
            600,
            "web",
            json!({"cpu": "500m", "memory": "1Gi"}),
            json!([]),
        ),
        (
            300,
            "batch",
            json!({"cpu": "2", "memory": "4Gi"}),
            json!([]),
        ),
        (
            80,
            "gpu",
            json!({"cpu": "3", "memory": "12Gi", "nvidia.com/gpu": "1"}),
            json!([{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]),
        ),
        (
            20,
            "neuron",
            json!({"cpu": "1", "memory": "2Gi", "aws.amazon.com/neuron": "1"}),
            json!([{"key": "aws.amazon.com/neuron", "operator": "Exists", "effect": "NoSchedule"}]),
        ),
    ];
    let mut keys = BTreeMap::new();
    for (count, name, requests, tolerations) in mix {
        let limits = common::cluster::extended_limits(&requests);
        for i in 0..count {
            let pod_name = format!("{name}-{i}");
            let pod: Pod = serde_json::from_value(json!({
                "metadata": {"name": pod_name, "namespace": "default"},
                "spec": {"containers": [{"name": "c", "image": "x", "resources": {"requests": requests, "limits": limits}}],
                         "tolerations": tolerations}
            }))
            .expect("pod");
            pods.create(&PostParams::default(), &pod)
                .await
                .expect("create");
            keys.insert(pod_name, pod);
        }
    }
    keys
}

/// What one run measured.
struct Outcome {
    /// When the last pod was created (from the first's creation).
    created: Duration,
    covered: Duration,
    launched: Duration,
    running: Duration,
    claims: usize,
    planned_nodes: usize,
    deleted_claims: usize,
    instances_per_claim: BTreeMap<usize, usize>,
    orphan_instances: usize,
    /// From a spot interruption notice sent mid-burst to its node's drain starting.
    drain_started: Option<Duration>,
}

/// What the driver does to the cloud while the burst runs.
#[derive(Default)]
struct Disturbances<'a> {
    /// Send a spot interruption notice for a launched spot instance once this many
    /// claims have launched (through SQS: the queue URL and a client for it).
    interrupt_after: Option<(usize, &'a aws_sdk_sqs::Client, String)>,
    /// Answer InsufficientInstanceCapacity for the offering of the first GPU claim, from
    /// the moment it is seen (the fault proxy and the rules to add the capacity error to).
    exhaust_first_gpu_offering: Option<(&'a common::FaultProxy, serde_json::Value)>,
}

async fn run<C: CloudProvider + Send + Sync + 'static>(
    label: &str,
    plane: &common::k8s::ControlPlane,
    cloud: Arc<C>,
    catalog: Arc<Catalog>,
    instances: impl AsyncFn() -> Vec<(String, String)>,
    disturb: Disturbances<'_>,
) -> Outcome {
    let client = plane.admin().await;
    objects(&client).await;
    let _kubelet = common::kubelet::Kubelet::start(
        client.clone(),
        catalog.clone(),
        common::kubelet::KubeletOptions {
            boot: Duration::from_secs(2),
            devices: true,
        },
    );
    let controller_client = plane.controller_client().await;
    let stores = start_reflectors(&controller_client).await;
    let metrics = Arc::new(cooper::controller::metrics::Metrics::default());
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let controller = Controller::new(
        controller_client,
        cloud,
        catalog.clone(),
        Settings {
            gc_interval: Duration::from_secs(5),
            gc_grace: Duration::from_secs(30),
            ..Settings::default()
        },
        stores,
    )
    .with_metrics(metrics.clone());
    tokio::spawn(cooper::controller::run_alone(
        controller,
        std::future::pending::<()>(),
    ));

    let start = Instant::now();
    eprintln!("{label}: t=0 at {}", cooper::crd::now_rfc3339());
    let keys = create_pods(&client).await;
    let initial = start.elapsed();
    let mut created = initial;
    let claims_api: Api<NodeClaim> = Api::all(client.clone());
    let pods_api: Api<Pod> = Api::namespaced(client.clone(), "default");
    let mut seen_claims: BTreeMap<String, usize> = BTreeMap::new();
    // When the last NodeClaim appeared, and when the last one got its instance.
    let (mut covered, mut launched) = (Duration::ZERO, Duration::ZERO);
    let mut launched_seen: BTreeSet<String> = BTreeSet::new();
    let mut last_report = Duration::ZERO;
    let mut last_trace = Duration::ZERO;
    let mut notice: Option<(Instant, String)> = None;
    // The interrupted claim's pods, for COOPER_BENCH_TRACE's lines.
    let mut victim_pods: BTreeSet<String> = BTreeSet::new();
    let trace = std::env::var_os("COOPER_BENCH_TRACE").is_some();
    let mut verdicts: Option<Duration> = None;
    let mut drain_started = None;
    let mut exhausted = false;
    let running = loop {
        let all = claims_api
            .list(&ListParams::default())
            .await
            .expect("claims")
            .items;
        if let Some((proxy, rules)) = &disturb.exhaust_first_gpu_offering
            && !exhausted
            && let Some(o) = all
                .iter()
                .filter_map(|c| c.spec.offerings.first())
                .find(|o| {
                    catalog
                        .instance_type(&o.instance_type)
                        .is_some_and(|t| t.allocatable.get(cooper::resources::NVIDIA_GPU) > 0)
                })
        {
            exhausted = true;
            let mut rules = rules.clone();
            for rule in rules["rules"].as_array_mut().into_iter().flatten() {
                if rule["action"] == "CreateFleet" {
                    rule["capacity"] = json!([{"instance_type": o.instance_type, "zone": o.zone}]);
                }
            }
            proxy.configure(rules);
            println!(
                "  t={:>5.1} s: {} {} {} exhausted (the first GPU claim's offering)",
                start.elapsed().as_secs_f64(),
                o.instance_type,
                o.zone,
                o.capacity_type
            );
        }
        let launched_now: Vec<&NodeClaim> = all
            .iter()
            .filter(|c| c.status.as_ref().is_some_and(|s| s.instance_id.is_some()))
            .collect();
        if let Some((after, sqs, url)) = &disturb.interrupt_after
            && notice.is_none()
            && launched_now.len() >= *after
            && let Some(victim) = launched_now.iter().find(|c| {
                c.status.as_ref().and_then(|s| s.capacity_type.as_deref()) == Some("spot")
            })
        {
            let id = victim
                .status
                .as_ref()
                .and_then(|s| s.instance_id.clone())
                .unwrap_or_default();
            sqs.send_message()
                .queue_url(url)
                .message_body(
                    json!({"version": "0", "detail-type": "EC2 Spot Instance Interruption Warning",
                           "source": "aws.ec2",
                           "detail": {"instance-id": id, "instance-action": "terminate"}})
                    .to_string(),
                )
                .send()
                .await
                .expect("send the interruption notice");
            println!(
                "  t={:>5.1} s: spot interruption notice for {} ({id})",
                start.elapsed().as_secs_f64(),
                victim.name_any()
            );
            notice = Some((Instant::now(), victim.name_any()));
            victim_pods = victim
                .spec
                .pods
                .iter()
                .filter_map(|k| k.split_once('/').map(|(_, n)| n.to_string()))
                .collect();
        }
        // The drain has started once the claim is being deleted or carries the
        // Terminating condition (its node is cordoned at that moment).
        if let Some((sent, name)) = &notice
            && drain_started.is_none()
        {
            let started = all.iter().find(|c| &c.name_any() == name).is_none_or(|c| {
                c.metadata.deletion_timestamp.is_some()
                    || c.status
                        .as_ref()
                        .is_some_and(|s| s.conditions.iter().any(|k| k.type_ == "Terminating"))
            });
            if started {
                drain_started = Some(sent.elapsed());
            }
        }
        for c in &all {
            if seen_claims
                .insert(c.name_any(), c.spec.pods.len())
                .is_none()
            {
                covered = start.elapsed();
            }
        }
        let with_instance = all
            .iter()
            .filter(|c| c.status.as_ref().is_some_and(|s| s.instance_id.is_some()))
            .count();
        // Any claim seen with an instance for the first time (a count would miss a
        // replacement launched after the claim it replaces went).
        for c in &all {
            if c.status.as_ref().is_some_and(|s| s.instance_id.is_some())
                && launched_seen.insert(c.name_any())
            {
                launched = start.elapsed();
            }
        }
        let pods = pods_api.list(&ListParams::default()).await.expect("pods");
        let up = pods
            .items
            .iter()
            .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
            .count();
        // The scheduler's first verdict on every pod: bound, or marked Unschedulable
        // (the signal cooper provisions on, as Karpenter does).
        if verdicts.is_none() {
            let decided = pods
                .items
                .iter()
                .filter(|p| {
                    p.spec.as_ref().is_some_and(|s| s.node_name.is_some())
                        || p.status
                            .as_ref()
                            .and_then(|s| s.conditions.as_ref())
                            .is_some_and(|c| {
                                c.iter()
                                    .any(|c| c.type_ == "PodScheduled" && c.status == "False")
                            })
                })
                .count();
            if decided >= keys.len() {
                verdicts = Some(start.elapsed());
            }
        }
        // What their ReplicaSets would do: pods evicted by an interruption come back.
        let present: BTreeSet<String> = pods.items.iter().map(|p| p.name_any()).collect();
        for (name, pod) in &keys {
            if !present.contains(name) && pods_api.create(&PostParams::default(), pod).await.is_ok()
            {
                created = start.elapsed();
            }
        }
        if up == keys.len() && (notice.is_none() || drain_started.is_some()) {
            break start.elapsed();
        }
        if trace
            && !victim_pods.is_empty()
            && start.elapsed() >= last_trace + Duration::from_secs(3)
        {
            last_trace = start.elapsed();
            // Where the interrupted node's pods stand: bound, nominated (to what), and
            // the scheduler's last word on the rest.
            let (mut bound, mut nominated) = (0, BTreeMap::<String, usize>::new());
            let mut messages = BTreeMap::<String, usize>::new();
            for p in pods
                .items
                .iter()
                .filter(|p| victim_pods.contains(&p.name_any()))
            {
                if p.spec.as_ref().is_some_and(|s| s.node_name.is_some()) {
                    bound += 1;
                    continue;
                }
                let status = p.status.as_ref();
                if let Some(n) = status.and_then(|s| s.nominated_node_name.clone()) {
                    *nominated.entry(n).or_default() += 1;
                }
                let m = status
                    .and_then(|s| s.conditions.as_ref())
                    .and_then(|c| c.iter().find(|c| c.type_ == "PodScheduled"))
                    .and_then(|c| c.message.clone())
                    .unwrap_or_else(|| "(no verdict)".into());
                *messages.entry(m.chars().take(160).collect()).or_default() += 1;
            }
            eprintln!(
                "TRACE t={:.1} victim pods bound {bound}, nominated {nominated:?}",
                start.elapsed().as_secs_f64()
            );
            for (m, n) in messages {
                eprintln!("TRACE   {n} x {m}");
            }
        }
        if start.elapsed() >= last_report + Duration::from_secs(10) {
            last_report = start.elapsed();
            println!(
                "  t={:>5.1} s: claims {} ({} launched), pods running {up}",
                last_report.as_secs_f64(),
                all.len(),
                with_instance
            );
        }
        assert!(
            start.elapsed() < Duration::from_secs(600),
            "{label}: {up} of {} pods running after 600 s",
            keys.len()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    // Let the collector look at the settled cluster a few times.
    tokio::time::sleep(Duration::from_secs(40)).await;
    let all = claims_api
        .list(&ListParams::default())
        .await
        .expect("claims")
        .items;
    let names: BTreeSet<String> = all.iter().map(|c| c.name_any()).collect();
    let mut per_claim: BTreeMap<String, usize> = BTreeMap::new();
    let mut orphans = 0;
    for (_, claim) in instances().await {
        if names.contains(&claim) {
            *per_claim.entry(claim).or_default() += 1;
        } else {
            orphans += 1;
        }
    }
    let mut instances_per_claim = BTreeMap::new();
    for c in &names {
        *instances_per_claim
            .entry(per_claim.get(c).copied().unwrap_or(0))
            .or_default() += 1;
    }
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await
        .expect("nodes")
        .items
        .len();
    let outcome = Outcome {
        created,
        covered,
        launched,
        running,
        claims: names.len(),
        planned_nodes: seen_claims.len(),
        deleted_claims: seen_claims.len() - names.len(),
        instances_per_claim,
        orphan_instances: orphans,
        drain_started,
    };
    let text = metrics.encode();
    let gc: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.starts_with("cooper_gc_refused_total")
                || (l.starts_with("cooper_nodes_terminated_total")
                    && (l.contains("Orphaned")
                        || l.contains("Duplicate")
                        || l.contains("InstanceGone")))
        })
        .collect();
    println!(
        "== {label}: 1,000 pods (created in {:.1} s)",
        initial.as_secs_f64()
    );
    println!(
        "  last NodeClaim created {:.1} s, last claim launched {:.1} s, every pod Running {:.1} s (from the first pod's creation)",
        outcome.covered.as_secs_f64(),
        outcome.launched.as_secs_f64(),
        outcome.running.as_secs_f64()
    );
    println!(
        "  the scheduler's verdict on every pod {:.1} s after the last of the 1,000 was created; from the last pod's creation (evicted pods re-created included): last claim created {:.1} s, last claim launched {:.1} s",
        verdicts
            .unwrap_or_default()
            .saturating_sub(initial)
            .as_secs_f64(),
        outcome
            .covered
            .saturating_sub(outcome.created)
            .as_secs_f64(),
        outcome
            .launched
            .saturating_sub(outcome.created)
            .as_secs_f64()
    );
    if let Some(v) = verdicts {
        println!(
            "  from the scheduler's last verdict: last claim launched {:.1} s",
            outcome.launched.saturating_sub(v).as_secs_f64()
        );
    }
    if let Some(d) = outcome.drain_started {
        println!(
            "  spot interruption mid-burst: drain started {:.2} s after the notice",
            d.as_secs_f64()
        );
    }
    println!(
        "  claims {} (planned {}, deleted {}), Nodes {nodes}, instances per claim {:?}, instances without a claim {}",
        outcome.claims,
        outcome.planned_nodes,
        outcome.deleted_claims,
        outcome.instances_per_claim,
        outcome.orphan_instances
    );
    println!(
        "  collector: {}",
        if gc.is_empty() {
            "nothing deleted or refused".to_string()
        } else {
            gc.join("; ")
        }
    );
    println!(
        "  controller peak heap {:.1} MiB above the idle baseline; process max RSS {:.1} MiB",
        (PEAK.load(Ordering::Relaxed) - base) as f64 / (1024.0 * 1024.0),
        max_rss_mib()
    );
    outcome
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    // The controller's own log, when asked for (`RUST_LOG=cooper=info`), to stderr.
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .try_init();
    }
    let which = std::env::var("COOPER_BENCH_CLOUD").unwrap_or_default();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let catalog = Arc::new(Catalog::embedded().expect("catalog"));
        if which.is_empty() || which == "local" {
            let plane = common::k8s::ControlPlane::start().await;
            let cloud = Arc::new(InMemoryCloud::new(&catalog));
            let listed = cloud.clone();
            let outcome = run(
                "local cloud",
                &plane,
                cloud,
                catalog.clone(),
                async move || {
                    listed
                        .instances()
                        .into_iter()
                        .map(|i| (i.id, i.claim))
                        .collect()
                },
                Disturbances::default(),
            )
            .await;
            assert!(outcome.instances_per_claim.keys().all(|&n| n == 1));
        }
        for (scenario, label) in [
            ("ec2", "EC2 latency, a spot interruption mid-burst"),
            (
                "ec2-faults",
                "EC2 latency, 10 % throttled, the first GPU offering exhausted",
            ),
            (
                "ec2-chaos",
                "EC2 latency, resets after launching, throttles, one call held",
            ),
        ] {
            if !(which.is_empty() || which == scenario) {
                continue;
            }
            ec2_run(scenario, label, &catalog).await;
        }
    });
}

/// One run through aws-sdk-ec2 → the fault proxy → moto, with EC2-like latency
/// (CreateFleet 1.5 ± 0.5 s, everything else 0.1–0.3 s) and the scenario's faults.
async fn ec2_run(scenario: &str, label: &str, catalog: &Arc<Catalog>) {
    let plane = common::k8s::ControlPlane::start().await;
    let moto = common::Moto::start();
    let proxy = common::FaultProxy::start(moto.port);
    let direct = cooper::aws::Ec2Cloud::connect(common::moto_settings(&moto)).await;
    common::network(direct.client()).await;
    let latency = |extra: serde_json::Value, rest: serde_json::Value| {
        let mut fleet = json!({"action": "CreateFleet", "latency_ms": [1000, 2000]});
        let mut other = json!({"action": "*", "latency_ms": [100, 300]});
        for (k, v) in extra.as_object().into_iter().flatten() {
            fleet[k] = v.clone();
        }
        for (k, v) in rest.as_object().into_iter().flatten() {
            other[k] = v.clone();
        }
        json!({"seed": 11, "rules": [fleet, other]})
    };
    let rules = match scenario {
        "ec2" => latency(json!({}), json!({})),
        "ec2-faults" => latency(json!({"throttle": 0.10}), json!({"throttle": 0.10})),
        _ => latency(
            json!({"reset_after": 0.10, "throttle": 0.05, "hang": {"count": 1, "seconds": 600}}),
            json!({"throttle": 0.05}),
        ),
    };
    proxy.configure(rules.clone());
    let (probe, url, queue) = common::interruption_queue(&moto, Duration::from_secs(20)).await;
    let mut settings = common::moto_settings(&moto);
    settings.endpoint = Some(format!("http://127.0.0.1:{}", proxy.port));
    settings.max_attempts = 5;
    let cloud = Arc::new(
        cooper::aws::Ec2Cloud::connect(settings)
            .await
            .with_catalog(catalog)
            .with_interruption_queue(queue),
    );
    let listed = direct.client().clone();
    let disturb = Disturbances {
        interrupt_after: (scenario == "ec2").then(|| (40, probe.client(), url.clone())),
        exhaust_first_gpu_offering: (scenario == "ec2-faults").then(|| (&proxy, rules.clone())),
    };
    let outcome = run(
        label,
        &plane,
        cloud,
        catalog.clone(),
        async move || {
            common::instances_by_claim(&listed)
                .await
                .into_iter()
                .flat_map(|(claim, ids)| ids.into_iter().map(move |id| (id, claim.clone())))
                .collect()
        },
        disturb,
    )
    .await;
    let stats = proxy.stats();
    println!(
        "  proxy: CreateFleet {}, peak calls in flight {}",
        stats["actions"]["CreateFleet"], stats["peak_in_flight"]
    );
    assert!(outcome.instances_per_claim.keys().all(|&n| n == 1));
}
