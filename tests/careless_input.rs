//! Careless and hostile input to `cooper plan` (issue 14): every case must end without a
//! panic or abort, within a bound, and either plan or say what is wrong naming the file,
//! the object and the field. Plus reading manifests the way kubectl does (`-f -`,
//! directories, `-R`, large `kind: List` output) and the CLI's small conveniences.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// No case may take longer than this (debug build, loaded machine).
const BOUND: Duration = Duration::from_secs(60);

fn cooper_with_stdin(args: &[&str], stdin: Option<&str>) -> Output {
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_cooper"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run cooper");
    if let Some(text) = stdin {
        let mut pipe = child.stdin.take().expect("stdin");
        pipe.write_all(text.as_bytes()).expect("write stdin");
    }
    let out = child.wait_with_output().expect("cooper output");
    assert!(
        started.elapsed() < BOUND,
        "{args:?} took {:?}",
        started.elapsed()
    );
    // 101 is a Rust panic; signals (abort, OOM kill) leave no code.
    assert!(
        matches!(out.status.code(), Some(0..=3)),
        "{args:?} ended with {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn cooper(args: &[&str]) -> Output {
    cooper_with_stdin(args, None)
}

fn dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("cooper-careless-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write(name: &str, text: &str) -> PathBuf {
    let path = dir().join(name);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::write(&path, text).unwrap();
    path
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

fn plan_json(out: &Output) -> serde_json::Value {
    assert!(out.status.success(), "failed: {}", stderr(out));
    serde_json::from_slice(&out.stdout).expect("JSON plan")
}

/// Pods the plan puts on new nodes.
fn placed(plan: &serde_json::Value) -> usize {
    plan["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["pods"].as_array().unwrap().len())
        .sum()
}

fn deployment(name: &str, replicas: i64, requests: &str) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: {name}}}\nspec:\n  replicas: {replicas}\n  template:\n    spec:\n      tolerations: [{{key: nvidia.com/gpu, operator: Exists}}]\n      containers: [{{name: c, resources: {{requests: {requests}}}}}]\n"
    )
}

/// Every error case: (file name, contents, extra args, what stderr must name).
#[test]
fn bad_input_is_refused_naming_file_object_and_field() {
    let cases: Vec<(&str, String, Vec<&str>, Vec<&str>)> = vec![
        (
            "half-gpu.yaml",
            deployment("half", 1, "{cpu: '1', nvidia.com/gpu: '0.5'}"),
            vec![],
            vec![
                "half-gpu.yaml:1",
                "Deployment half",
                "resources.requests.nvidia.com/gpu",
                "fractional",
            ],
        ),
        (
            "dup.yaml",
            format!(
                "{}---\n{}",
                deployment("web", 2, "{cpu: '1'}"),
                deployment("web", 2, "{cpu: '1'}")
            ),
            vec![],
            vec![
                "dup.yaml:",
                "Deployment web",
                "defines pod default/web-0",
                "dup.yaml:1",
            ],
        ),
        (
            "negative.yaml",
            deployment("neg", -1, "{cpu: '1'}"),
            vec![],
            vec![
                "negative.yaml:1",
                "Deployment neg",
                "spec.replicas",
                "negative",
            ],
        ),
        (
            "huge.yaml",
            deployment("huge", 4_000_000_000, "{cpu: '1'}"),
            vec![],
            vec!["huge.yaml:1", "Deployment huge", "spec.replicas"],
        ),
        (
            // Each under the per-workload bound, together over the per-plan one.
            "many.yaml",
            format!(
                "{}---\n{}",
                deployment("a", 600_000, "{cpu: '1'}"),
                deployment("b", 600_000, "{cpu: '1'}")
            ),
            vec![],
            vec![
                "many.yaml:",
                "Deployment b",
                "spec.replicas",
                "1200000 pods",
                "MAX_PODS",
            ],
        ),
        (
            "bad-cpu.yaml",
            deployment("cpu", 1, "{cpu: 'lots'}"),
            vec![],
            vec!["bad-cpu.yaml:1", "Deployment cpu", "resources.requests.cpu"],
        ),
    ];
    for (name, text, extra, wanted) in cases {
        let path = write(name, &text);
        let mut args = vec!["plan", "-f", path.to_str().unwrap(), "-o", "json"];
        args.extend(extra);
        let out = cooper(&args);
        assert_eq!(out.status.code(), Some(2), "{name}: {}", stderr(&out));
        let err = stderr(&out);
        for w in wanted {
            assert!(err.contains(w), "{name}: {w:?} missing from: {err}");
        }
        assert!(!err.contains("bug in cooper"), "{name}: {err}");
    }
}

#[test]
fn catalog_files_with_negative_prices_or_overheads_are_refused() {
    let base =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("config/catalog.yaml"))
            .unwrap();
    // A negative spot price on the first type, and the VM overhead out of range.
    let overhead = base.replacen(
        "kind: Catalog\n",
        "kind: Catalog\nallocatable: {vmMemoryOverheadPercent: -100}\n",
        1,
    );
    let path = write("catalog-overhead.yaml", &overhead);
    let out = cooper(&["catalog", "--catalog", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("catalog-overhead.yaml")
            && err.contains("allocatable.vmMemoryOverheadPercent"),
        "{err}"
    );
    let negative = base.replacen("\n  spot: {", "\n  spot: {prices: {us-east-1a: -0.5}, ", 1);
    assert_ne!(negative, base, "the catalog's first spot entry");
    let path = write("catalog-negative.yaml", &negative);
    let out = cooper(&["catalog", "--catalog", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("catalog-negative.yaml") && err.contains("spot.prices.us-east-1a"),
        "{err}"
    );
}

#[test]
fn an_unknown_kind_is_a_warning_with_a_suggestion_and_strict_makes_it_an_error() {
    let text = deployment("web", 2, "{cpu: '1'}").replace("kind: Deployment", "kind: Deploymnet");
    let path = write("typo.yaml", &text);
    let p = path.to_str().unwrap();
    let out = cooper(&["plan", "-f", p, "-o", "json"]);
    let plan = plan_json(&out);
    assert!(plan["nodes"].as_array().unwrap().is_empty());
    let err = stderr(&out);
    assert!(
        err.contains("skipped 1 object")
            && err.contains("typo.yaml:1")
            && err.contains("kind Deploymnet (did you mean Deployment?)"),
        "{err}"
    );
    let out = cooper(&["plan", "-f", p, "-o", "json", "--strict"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

#[test]
fn fail_on_unschedulable_exits_3_and_an_empty_affinity_term_matches_nothing() {
    let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: nowhere}\nspec:\n  affinity:\n    nodeAffinity:\n      requiredDuringSchedulingIgnoredDuringExecution:\n        nodeSelectorTerms: [{}]\n  containers: [{name: c, resources: {requests: {cpu: '1'}}}]\n";
    let path = write("empty-term.yaml", text);
    let p = path.to_str().unwrap();
    let plan = plan_json(&cooper(&["plan", "-f", p, "-o", "json"]));
    let unschedulable = plan["unschedulable"].as_array().unwrap();
    assert_eq!(unschedulable.len(), 1, "{plan}");
    assert!(
        unschedulable[0]["reason"]
            .as_str()
            .unwrap()
            .contains("empty nodeSelectorTerms"),
        "{plan}"
    );
    let out = cooper(&["plan", "-f", p, "-o", "json", "--fail-on-unschedulable"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
}

#[test]
fn manifests_are_read_as_kubectl_reads_them() {
    // Standard input.
    let web = deployment("web", 3, "{cpu: '1'}");
    let out = cooper_with_stdin(&["plan", "-f", "-", "-o", "json"], Some(&web));
    assert_eq!(placed(&plan_json(&out)), 3);
    // A directory, and its subdirectories with -R; other files are ignored.
    let root = dir().join("tree");
    write("tree/a.yaml", &deployment("a", 1, "{cpu: '1'}"));
    write("tree/notes.txt", "not yaml at all: [");
    write("tree/sub/b.yml", &deployment("b", 1, "{cpu: '1'}"));
    let count = |args: &[&str]| placed(&plan_json(&cooper(args)));
    let r = root.to_str().unwrap();
    assert_eq!(count(&["plan", "-f", r, "-o", "json"]), 1);
    assert_eq!(count(&["plan", "-f", r, "-R", "-o", "json"]), 2);
    // `kubectl get -o yaml` output of a large cluster: one List of 3,000 items, and the
    // same as 3,000 documents (more than the YAML library's default budget of 1,024).
    let mut items = String::from("apiVersion: v1\nkind: List\nitems:\n");
    let mut docs = String::new();
    for i in 0..3000 {
        items.push_str(&format!(
            "- apiVersion: v1\n  kind: Pod\n  metadata: {{name: p{i}, namespace: ns}}\n  spec: {{containers: [{{name: c, resources: {{requests: {{cpu: 10m}}}}}}]}}\n"
        ));
        docs.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: p{i}, namespace: ns}}\nspec: {{containers: [{{name: c, resources: {{requests: {{cpu: 10m}}}}}}]}}\n"
        ));
    }
    let list = write("list.yaml", &items);
    let many = write("many.yaml", &docs);
    for path in [list, many] {
        let placed = count(&[
            "plan",
            "-f",
            path.to_str().unwrap(),
            "-o",
            "json",
            "--strategy",
            "greedy",
        ]);
        assert_eq!(placed, 3000, "{}", path.display());
    }
}

#[test]
fn a_model_needing_20_gb_on_its_gpu_gets_a_gpu_with_20_gb() {
    // Karpenter's label is the memory of one GPU: g4dn's T4 has 16 GiB, so no g4dn, even
    // the 4-GPU g4dn.12xlarge whose GPUs hold 64 GiB together.
    let text = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: vllm}\nspec:\n  replicas: 2\n  template:\n    spec:\n      tolerations: [{key: nvidia.com/gpu, operator: Exists}]\n      affinity:\n        nodeAffinity:\n          requiredDuringSchedulingIgnoredDuringExecution:\n            nodeSelectorTerms:\n            - matchExpressions:\n              - {key: karpenter.k8s.aws/instance-gpu-memory, operator: Gt, values: ['20000']}\n      containers:\n      - name: vllm\n        resources: {requests: {cpu: '2', memory: 8Gi, nvidia.com/gpu: '1'}, limits: {nvidia.com/gpu: '1'}}\n";
    let path = write("vllm.yaml", text);
    let plan = plan_json(&cooper(&[
        "plan",
        "-f",
        path.to_str().unwrap(),
        "-o",
        "json",
    ]));
    let catalog = cooper(&["catalog", "-o", "json"]);
    let offerings: serde_json::Value = serde_json::from_slice(&catalog.stdout).unwrap();
    let nodes = plan["nodes"].as_array().unwrap();
    assert!(!nodes.is_empty());
    for n in nodes {
        let t = n["instance_type"].as_str().unwrap();
        assert!(!t.starts_with("g4dn"), "{t}: a T4 has 16 GiB");
        let memory = offerings
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["instance_type"] == t)
            .and_then(|o| o["gpu_memory_mib"].as_u64())
            .expect("a GPU type lists its GPU memory");
        assert!(memory > 20000, "{t}: {memory} MiB per GPU");
    }
}

#[test]
fn version_and_completion() {
    let out = cooper(&["version"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for w in ["cooper ", "commit: ", "catalog: ", "solver: "] {
        assert!(text.contains(w), "{w:?} missing: {text}");
    }
    // The catalog header and the version's dates agree.
    let header =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("config/catalog.yaml"))
            .unwrap();
    for date in ["2026-07-20", "2025-06-28"] {
        assert!(header.contains(date) && text.contains(date), "{date}");
    }
    for shell in ["bash", "zsh", "fish"] {
        let out = cooper(&["completion", shell]);
        assert!(out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("simulate"),
            "{shell}"
        );
    }
}

/// The simulator's planner spends a work budget, not wall time: the same scenario and
/// seed give byte-identical reports, even when every plan is cut short by a 20 ms limit
/// (with wall time, how far a cut-short plan got depended on the machine's load).
#[test]
fn a_simulation_is_reproducible_even_with_a_tiny_planner_budget() {
    for scenario in [
        "simulations/mixed-spot.yaml",
        "simulations/zone-resilient.yaml",
    ] {
        let text =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(scenario)).unwrap();
        let tiny = text.replacen("\nseed: ", "\ncontroller: {timeLimit: 20ms}\nseed: ", 1);
        assert_ne!(tiny, text, "{scenario} has a top-level seed");
        let name = Path::new(scenario).file_name().unwrap().to_str().unwrap();
        let path = write(&format!("tiny-{name}"), &tiny);
        let mut reports = Vec::new();
        for run in 0..3 {
            let out_path = dir().join(format!("tiny-{name}-{run}.json"));
            let out = cooper(&[
                "simulate",
                path.to_str().unwrap(),
                "-o",
                "json",
                "--out",
                out_path.to_str().unwrap(),
            ]);
            assert!(out.status.success(), "{}", stderr(&out));
            reports.push(std::fs::read(&out_path).unwrap());
        }
        assert!(!reports[0].is_empty());
        assert!(
            reports.iter().all(|r| *r == reports[0]),
            "{scenario}: reports differ between runs"
        );
    }
}

/// Scenarios that would run out of memory or time, or whose events could never happen,
/// are refused up front naming the field and the bound.
#[test]
fn scenario_events_after_the_end_and_absurd_sizes_are_refused() {
    let pod = "{apiVersion: batch/v1, kind: Job, metadata: {name: j}, spec: {template: {spec: {containers: [{name: c, resources: {requests: {cpu: 100m}}}]}}}}";
    let web = "{apiVersion: apps/v1, kind: Deployment, metadata: {name: w}, spec: {template: {spec: {containers: [{name: c, resources: {requests: {cpu: 100m}}}]}}}}";
    let cases = [
        (
            "late-wave.yaml",
            "name: x\nduration: 24h\ncloud:\n  spotInterruptions:\n    waves: [{at: 30h, fraction: 0.5}]\nworkloads: []\n".to_string(),
            "cloud.spotInterruptions.waves[0].at: 30h is after the scenario's end (24h)",
        ),
        (
            "late-step.yaml",
            format!("name: x\nduration: 1h\nworkloads:\n- manifest: {web}\n  replicas: [{{at: 0s, replicas: 1}}, {{at: 2h, replicas: 3}}]\n"),
            "workloads[0].replicas[1].at: 2h is after the scenario's end",
        ),
        (
            "storm.yaml",
            format!("name: x\nduration: 24h\nworkloads:\n- manifest: {pod}\n  arrivals: {{every: 1ms}}\n"),
            "workloads[0].arrivals: 86400000 arrivals",
        ),
        (
            // 1.2 million arrivals each: under the bound alone, over it together.
            "two-storms.yaml",
            format!("name: x\nduration: 24h\nworkloads:\n- manifest: {pod}\n  arrivals: {{every: 72ms}}\n- manifest: {pod}\n  arrivals: {{every: 72ms}}\n"),
            "workloads[1].arrivals: 1200000 arrivals",
        ),
        (
            "huge-hpa.yaml",
            format!("name: x\nduration: 1h\nworkloads:\n- manifest: {web}\n  hpa: {{minReplicas: 1, maxReplicas: 4000000000, targetCPUUtilizationPercentage: 50, load: {{shape: constant, cores: 1}}}}\n"),
            "workloads[0].hpa.maxReplicas: 4000000000 pods",
        ),
        (
            "huge-steps.yaml",
            format!("name: x\nduration: 1h\nworkloads:\n- manifest: {web}\n  replicas: [{{at: 0s, replicas: 4294967295}}]\n"),
            "workloads[0].replicas[0].replicas: 4294967295 pods",
        ),
        (
            "storm-of-interruptions.yaml",
            "name: x\nduration: 1h\ncloud:\n  spotInterruptions: {advisorRates: true, scale: 1e9}\nworkloads: []\n".to_string(),
            "cloud.spotInterruptions.scale: 1000000000 is outside 0..1000",
        ),
        (
            "decade.yaml",
            "name: x\nduration: 87600h\nworkloads: []\n".to_string(),
            "duration: 87600h is longer than cooper simulates (366 days)",
        ),
    ];
    for (file, text, expected) in cases {
        let path = write(file, &text);
        let out = cooper(&["simulate", path.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2), "{file}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(
            err.contains(file) && err.contains(expected),
            "{file}: {err}"
        );
    }
}

/// Karpenter's own v1 NodePool and EC2NodeClass load where cooper reads pools: the
/// pool is planned with, and every field cooper does not honour yet is named in a
/// warning (never dropped silently); integer limits are quantities.
#[test]
fn karpenter_v1_nodepools_load_with_a_warning_for_each_field_not_honoured() {
    let web = write("web.yaml", &deployment("web", 4, "{cpu: '1', memory: 1Gi}"));
    let out = cooper(&[
        "plan",
        "-f",
        web.to_str().unwrap(),
        "--nodepools",
        "tests/data/karpenter-v1-nodepool.yaml",
        "-o",
        "json",
    ]);
    let plan = plan_json(&out);
    let nodes = plan["nodes"].as_array().unwrap();
    assert!(!nodes.is_empty(), "{plan}");
    for n in nodes {
        assert_eq!(n["nodepool"], "default");
        assert_eq!(n["capacity_type"], "on-demand");
        let family = n["instance_type"].as_str().unwrap();
        assert!(
            ["c", "m", "r"].iter().any(|c| family.starts_with(c)),
            "{family}"
        );
    }
    let err = stderr(&out);
    for field in ["requirements[3].minValues", "EC2NodeClass default: skipped"] {
        assert!(err.contains(field), "{field} missing from: {err}");
    }
    // Honoured now (expiry, drain bounds, scheduled budgets by reason, consolidation of
    // underused nodes): no warning.
    for field in [
        "consolidationPolicy",
        "expireAfter",
        "terminationGracePeriod",
        "budgets[0].reasons",
        "budgets[0].schedule",
        "budgets[0].duration",
    ] {
        assert!(
            !err.contains(field),
            "{field} is honoured, yet warned about: {err}"
        );
    }
}

/// kubectl's cluster flags only mean something with `--live`: with `-f` they are
/// refused, not ignored.
#[test]
fn cluster_flags_without_live_are_refused() {
    let out = cooper(&[
        "plan",
        "-f",
        "simulations/workloads/sentiment-analysis.yaml",
        "-n",
        "ml",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("plan --live"), "{}", stderr(&out));
}
