//! The `cooper` binary end to end: `plan` on the seeds' workload, precise reasons for
//! unschedulable pods, and clear errors (file, line, object, field) on bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn cooper(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cooper"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cooper")
}

fn write(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cooper-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON output")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[test]
fn sentiment_analysis_gets_inf1_xlarge_spot_nodes() {
    let plan = json(&cooper(&[
        "plan",
        "-f",
        "simulations/workloads/sentiment-analysis.yaml",
        "-o",
        "json",
    ]));
    let nodes = plan["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3);
    for n in nodes {
        assert_eq!(n["instance_type"], "inf1.xlarge");
        assert_eq!(n["capacity_type"], "spot");
        assert_eq!(n["nodepool"], "inf1");
        assert_eq!(n["pods"].as_array().unwrap().len(), 1);
        assert_eq!(n["allocatable"]["aws.amazon.com/neuron"], "1");
    }
    assert_eq!(plan["unschedulable"].as_array().unwrap().len(), 0);
    assert_eq!(plan["strategy"], "optimal");
    assert_eq!(plan["region"], "us-east-1");
    let total = plan["total_price_per_hour"].as_f64().unwrap();
    let sum: f64 = nodes
        .iter()
        .map(|n| n["price_per_hour"].as_f64().unwrap() + n["node_cost_per_hour"].as_f64().unwrap())
        .sum();
    assert!((total - sum).abs() < 1e-6);
    // Each inf1 node's 20 GiB gp3 root volume at $0.08/GiB-month, reported apart.
    let node_costs = plan["node_costs_per_hour"].as_f64().unwrap();
    assert!(
        (node_costs - nodes.len() as f64 * 20.0 * 0.08 / 730.0).abs() < 1e-5,
        "{node_costs}"
    );
    assert!((plan["instance_price_per_hour"].as_f64().unwrap() + node_costs - total).abs() < 1e-6);
    assert!(plan["lower_bound_per_hour"].as_f64().unwrap() <= total + 1e-9);
    assert!(plan["solve_ms"].as_f64().is_some());
}

#[test]
fn table_and_yaml_outputs() {
    let out = cooper(&[
        "plan",
        "-f",
        "simulations/workloads/sentiment-analysis.yaml",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        text.contains("inf1.xlarge") && text.contains("greedy") && text.contains("on-demand"),
        "{text}"
    );
    let out = cooper(&[
        "plan",
        "-f",
        "simulations/workloads/sentiment-analysis.yaml",
        "-o",
        "yaml",
    ]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("instance_type: inf1.xlarge"));
}

#[test]
fn unschedulable_pods_get_precise_reasons() {
    let pods = write(
        "reasons.yaml",
        r#"apiVersion: v1
kind: Pod
metadata: {name: huge-gpu, namespace: ml}
spec:
  tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]
  containers: [{name: c, resources: {limits: {nvidia.com/gpu: 16}}}]
---
apiVersion: v1
kind: Pod
metadata: {name: no-toleration, namespace: ml}
spec:
  containers: [{name: c, resources: {limits: {nvidia.com/gpu: 1}}}]
"#,
    );
    let five = write(
        "sentiment5.yaml",
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("simulations/workloads/sentiment-analysis.yaml"),
        )
        .unwrap()
        .replace("replicas: 3", "replicas: 5"),
    );
    let plan = json(&cooper(&[
        "plan",
        "-f",
        pods.to_str().unwrap(),
        five.to_str().unwrap(),
        "-o",
        "json",
    ]));
    let reason = |pod: &str| -> String {
        plan["unschedulable"]
            .as_array()
            .unwrap()
            .iter()
            .find(|u| u["pod"] == pod)
            .map(|u| u["reason"].as_str().unwrap().to_string())
            .unwrap_or_else(|| panic!("{pod} not unschedulable: {plan}"))
    };
    assert!(
        reason("ml/huge-gpu").contains("nodepool gpu: no offering has 16 nvidia.com/gpu"),
        "{}",
        reason("ml/huge-gpu")
    );
    assert!(
        reason("ml/no-toleration")
            .contains("nodepool gpu: taint nvidia.com/gpu:NoSchedule not tolerated")
    );
    // The inf1 pool's 16-CPU limit holds four inf1.xlarge; the fifth replica waits.
    assert!(reason("default/sentiment-analysis-4").contains("nodepool inf1: limit cpu=16 reached"));
    assert_eq!(plan["nodes"].as_array().unwrap().len(), 4);
}

#[test]
fn malformed_yaml_names_file_and_line() {
    let f = write(
        "broken.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: [unclosed\nspec: {}\n",
    );
    let out = cooper(&["plan", "-f", f.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("broken.yaml:") && err.contains("malformed YAML"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    let line: u32 = err
        .split("broken.yaml:")
        .nth(1)
        .unwrap()
        .split(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!((4..=6).contains(&line), "{err}");
}

#[test]
fn bad_quantity_names_object_and_field() {
    let f = write(
        "quantity.yaml",
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web, namespace: shop}\nspec:\n  selector: {matchLabels: {a: b}}\n  template:\n    spec:\n      containers:\n      - name: c\n        resources: {requests: {memory: 12 gigs}}\n",
    );
    let out = cooper(&["plan", "-f", f.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("quantity.yaml:1")
            && err.contains("Deployment shop/web")
            && err.contains("spec.template.spec.containers[0].resources.requests.memory"),
        "{err}"
    );
}

#[test]
fn unknown_nodepool_field_or_operator_is_an_error() {
    let pool = |extra: &str, op: &str| {
        format!(
            "apiVersion: cooper.dev/v1alpha1\nkind: NodePool\nmetadata: {{name: p}}\nspec:\n  template:\n    spec:\n      requirements:\n      - {{key: kubernetes.io/arch, operator: {op}, values: [amd64]}}\n{extra}"
        )
    };
    let bad_field = write(
        "pool-field.yaml",
        &pool("  ttlSecondsAfterEmtpy: 30\n", "In"),
    );
    let out = cooper(&[
        "plan",
        "-f",
        "simulations/workloads/sentiment-analysis.yaml",
        "--nodepools",
        bad_field.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("pool-field.yaml") && stderr(&out).contains("ttlSecondsAfterEmtpy"),
        "{}",
        stderr(&out)
    );
    let bad_op = write("pool-op.yaml", &pool("", "Within"));
    let out = cooper(&[
        "plan",
        "-f",
        "simulations/workloads/sentiment-analysis.yaml",
        "--nodepools",
        bad_op.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("pool-op.yaml") && err.contains("requirements[0]") && err.contains("Within"),
        "{err}"
    );
    let missing = cooper(&["plan", "-f", "does-not-exist.yaml"]);
    assert!(!missing.status.success() && stderr(&missing).contains("does-not-exist.yaml"));
}

#[test]
fn greedy_strategy_and_region_check() {
    let plan = json(&cooper(&[
        "plan",
        "-f",
        "simulations/workloads/sentiment-analysis.yaml",
        "--strategy",
        "greedy",
        "-o",
        "json",
    ]));
    assert_eq!(plan["strategy"], "greedy");
    assert!(plan["lower_bound_per_hour"].is_null());
    let out = cooper(&[
        "plan",
        "-f",
        "simulations/workloads/sentiment-analysis.yaml",
        "--region",
        "eu-west-1",
    ]);
    assert!(
        !out.status.success() && stderr(&out).contains("covers region us-east-1"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn catalog_lists_offerings_with_allocatable() {
    let rows = json(&cooper(&["catalog", "--family", "inf1", "-o", "json"]));
    let rows = rows.as_array().unwrap();
    assert!(
        rows.iter()
            .all(|r| r["instance_type"].as_str().unwrap().starts_with("inf1."))
    );
    let spot = rows
        .iter()
        .find(|r| r["instance_type"] == "inf1.xlarge" && r["capacity_type"] == "spot")
        .unwrap();
    assert_eq!(spot["allocatable"]["cpu"], "3920m");
    assert_eq!(spot["max_pods"], 38);
    let upper = json(&cooper(&["catalog", "--family", "G5", "-o", "json"]));
    assert!(
        !upper.as_array().unwrap().is_empty(),
        "families ignore case"
    );
    let table = cooper(&["catalog", "--family", "g5"]);
    assert!(String::from_utf8_lossy(&table.stdout).contains("g5.48xlarge"));
    let none = cooper(&["catalog", "--family", "zz9"]);
    assert!(!none.status.success());
}

#[test]
fn a_tiny_time_limit_still_gives_a_checked_plan_no_dearer_than_greedy() {
    let optimal = json(&cooper(&[
        "plan",
        "-f",
        "simulations/workloads/ml-training.yaml",
        "--time-limit",
        "1ms",
        "-o",
        "json",
    ]));
    let greedy = json(&cooper(&[
        "plan",
        "-f",
        "simulations/workloads/ml-training.yaml",
        "--strategy",
        "greedy",
        "-o",
        "json",
    ]));
    let price = |p: &serde_json::Value| p["total_price_per_hour"].as_f64().unwrap();
    assert_eq!(optimal["unschedulable"].as_array().unwrap().len(), 0);
    assert!(
        price(&optimal) <= price(&greedy) + 1e-9,
        "{} > {}",
        price(&optimal),
        price(&greedy)
    );
}

#[test]
fn simulate_reports_in_every_format_without_progress_when_not_a_terminal() {
    let out = cooper(&["simulate", "simulations/sentiment-inf1.yaml"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("inf1.xlarge") && table.contains("cost $"),
        "{table}"
    );
    assert!(
        stderr(&out).is_empty(),
        "no progress bar when stderr is not a terminal: {}",
        stderr(&out)
    );
    let report = json(&cooper(&[
        "simulate",
        "simulations/sentiment-inf1.yaml",
        "-o",
        "json",
    ]));
    assert_eq!(report["scenario"], "sentiment-inf1");
    assert!(report["total_cost"].as_f64().unwrap() > 0.0);
    let csv = cooper(&["simulate", "simulations/sentiment-inf1.yaml", "-o", "csv"]);
    assert!(String::from_utf8_lossy(&csv.stdout).starts_with("row,node,nodepool,"));
    let html = std::env::temp_dir().join(format!("cooper-report-{}.html", std::process::id()));
    let out = cooper(&[
        "simulate",
        "simulations/sentiment-inf1.yaml",
        "-o",
        "html",
        "--out",
        html.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(std::fs::read_to_string(&html).unwrap().contains("<svg"));
}

#[test]
fn simulate_compare_runs_greedy_and_on_demand() {
    let report = json(&cooper(&[
        "simulate",
        "simulations/gpu-training.yaml",
        "--compare",
        "-o",
        "json",
    ]));
    let rows = report["comparison"].as_array().expect("comparison rows");
    let labels: Vec<&str> = rows.iter().map(|r| r["label"].as_str().unwrap()).collect();
    // gpu-training's pools do not consolidate underused nodes: no "without consolidation"
    // row; Karpenter's baseline then differs from greedy only where empty nodes go.
    assert_eq!(
        labels,
        [
            "greedy (first-fit-decreasing, no consolidation)",
            "karpenter (first-fit-decreasing, its consolidation)",
            "on-demand only"
        ]
    );
    for r in rows {
        assert!(
            r["saving_percent"].as_f64().unwrap() > 0.0,
            "optimal saves against {}",
            r["label"]
        );
    }
}

#[test]
fn bad_scenarios_name_the_file_and_field() {
    let cases = [
        (
            "unknown-field.yaml",
            "name: x\nduration: 1h\nworkloadz: []\nworkloads: []\n",
            "workloadz: unknown field",
        ),
        (
            "negative.yaml",
            "name: x\nduration: -5m\nworkloads: []\n",
            "scenario x: duration: invalid duration \"-5m\"",
        ),
        (
            "unknown-type.yaml",
            "name: x\nduration: 1h\ncloud:\n  insufficientCapacity:\n  - {from: 0s, to: 1h, instanceTypes: [g9.huge]}\nworkloads: []\n",
            "cloud.insufficientCapacity[0].instanceTypes: unknown instance type \"g9.huge\"",
        ),
        (
            "bad-quantity.yaml",
            "name: x\nduration: 1h\nworkloads:\n- manifest: {apiVersion: v1, kind: Pod, metadata: {name: p}, spec: {containers: [{name: c, resources: {requests: {cpu: lots}}}]}}\n",
            "Pod p: spec.containers[0].resources.requests.cpu: invalid quantity \"lots\"",
        ),
        (
            "bad-kind.yaml",
            "name: x\nduration: 1h\nworkloads:\n- manifest: {apiVersion: v1, kind: Service, metadata: {name: s}}\n",
            "workloads[0].manifest.kind: unsupported kind \"Service\"",
        ),
        (
            "zero.yaml",
            "name: x\nduration: 0s\nworkloads: []\n",
            "duration: must be positive",
        ),
    ];
    for (file, text, expected) in cases {
        let path = write(file, text);
        let out = cooper(&["simulate", path.to_str().unwrap()]);
        assert!(!out.status.success(), "{file} should fail");
        let err = stderr(&out);
        assert!(
            err.contains(file) && err.contains(expected),
            "{file}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn a_workload_no_pool_can_host_is_reported_with_its_reason() {
    let path = write(
        "unhostable.yaml",
        "name: x\nduration: 1h\nworkloads:\n- manifest:\n    apiVersion: apps/v1\n    kind: Deployment\n    metadata: {name: huge}\n    spec:\n      replicas: 2\n      template:\n        spec:\n          containers:\n          - name: c\n            resources:\n              requests: {cpu: \"900\", memory: 1Gi}\n",
    );
    let report = json(&cooper(&["simulate", path.to_str().unwrap(), "-o", "json"]));
    let unplaced = report["unplaced"].as_array().expect("unplaced");
    assert_eq!(unplaced.len(), 2);
    for u in unplaced {
        assert_eq!(u["state"], "pending at end");
        assert!(
            u["reason"]
                .as_str()
                .unwrap()
                .contains("no offering has 900 cpu allocatable"),
            "{u}"
        );
    }
}

#[test]
fn a_bad_defaults_file_stops_the_controller_at_start_naming_file_line_and_field() {
    let defaults = write(
        "defaults-bad.yaml",
        "apiVersion: cooper.dev/v1alpha1\nkind: NodePool\nmetadata: {name: ok}\nspec: {}\n---\napiVersion: cooper.dev/v1alpha1\nkind: NodePool\nmetadata: {name: gpu}\nspec:\n  template:\n    spec:\n      requirements:\n      - {key: nvidia.com/gpu.count, operator: Gt, values: [many]}\n",
    );
    let out = cooper(&[
        "controller",
        "--default-objects",
        defaults.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("defaults-bad.yaml:6") && err.contains("NodePool gpu") && err.contains("Gt"),
        "{err}"
    );
}

/// Durations too long for the clock and gaps that mean nothing are usage errors (exit 2
/// with the reason), never a panic (exit 101).
#[test]
fn absurd_durations_and_gaps_are_refused_with_a_reason() {
    let file = "simulations/workloads/sentiment-analysis.yaml";
    for args in [
        vec!["plan", "-f", file, "--time-limit", "99999999999999999999h"],
        vec!["plan", "-f", file, "--time-limit", "3000000000000000h"],
        vec!["plan", "-f", file, "--gap", "nan"],
        vec!["plan", "-f", file, "--gap=-1"],
        vec!["plan", "-f", file, "--gap", "5"],
    ] {
        let out = cooper(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(
            err.contains("100 years")
                || err.contains("outside 0..1")
                || err.contains("not a number"),
            "{args:?}: {err}"
        );
    }
    // A NodePool TTL of u64::MAX seconds: the file, the field, the reason.
    let pools = write(
        "ttl-pools.yaml",
        "apiVersion: cooper.dev/v1alpha1\nkind: NodePool\nmetadata: {name: p}\nspec:\n  ttlSecondsAfterEmpty: 18446744073709551615\n  template: {spec: {requirements: []}}\n",
    );
    let out = cooper(&["plan", "-f", file, "--nodepools", pools.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        err.contains("ttl-pools.yaml")
            && err.contains("ttlSecondsAfterEmpty")
            && err.contains("100 years"),
        "{err}"
    );
}

/// A plan that launches nothing costs $0, not "$-0".
#[test]
fn an_empty_plan_costs_zero_not_negative_zero() {
    let pod = write(
        "nowhere.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  nodeSelector: {topology.kubernetes.io/zone: mars-1a}\n  containers: [{name: c, resources: {requests: {cpu: 100m}}}]\n",
    );
    for output in ["table", "json"] {
        let out = cooper(&["plan", "-f", pod.to_str().unwrap(), "-o", output]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(!text.contains("-0.0"), "{text}");
    }
}

/// The table says which preferences a plan relaxed, as the JSON does.
#[test]
fn the_table_lists_relaxed_preferences() {
    let pod = write(
        "soft.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: soft, labels: {app: s}}\nspec:\n  containers: [{name: c, resources: {requests: {cpu: 100m}}}]\n  topologySpreadConstraints:\n  - {maxSkew: 1, topologyKey: example.com/rack, whenUnsatisfiable: ScheduleAnyway, labelSelector: {matchLabels: {app: s}}}\n",
    );
    let out = cooper(&["plan", "-f", pod.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        text.contains("preferences relaxed") && text.contains("example.com/rack"),
        "{text}"
    );
}
