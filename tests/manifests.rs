//! Everything in `deploy/` and `simulations/` is a valid manifest: every YAML parses, every
//! Kubernetes object validates offline against the Kubernetes 1.33 schemas (strict) and
//! cooper's objects against its CRDs (`tests/validate_manifests.py`, kubernetes-validate
//! and jsonschema from the test venv); `kubectl kustomize` renders every overlay (with the
//! optional components too) and the output validates the same way; the example and
//! default NodePools and NodeClasses pass cooper's own checks; the Grafana dashboard only
//! queries metrics cooper exports.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn python() -> String {
    std::env::var("COOPER_TEST_PYTHON")
        .unwrap_or_else(|_| format!("{ROOT}/target/test-venv/bin/python"))
}

/// Run the validator on files (or `-` with `stdin`).
fn validate(files: &[PathBuf], stdin: Option<&[u8]>) -> Output {
    use std::io::Write;
    let mut child = Command::new(python())
        .arg(format!("{ROOT}/tests/validate_manifests.py"))
        .arg(format!("{ROOT}/deploy/base/crds.yaml"))
        .args(files)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the validator (scripts/test.sh prepares the venv)");
    let mut input = child.stdin.take().expect("stdin");
    input.write_all(stdin.unwrap_or_default()).expect("write");
    drop(input);
    child.wait_with_output().expect("validator")
}

fn assert_valid(what: &str, out: &Output) {
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{what}:\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{what}: {}", text.trim());
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(path);
        }
    }
}

fn kustomize(dir: &Path) -> Vec<u8> {
    let out = Command::new("kubectl")
        .args(["kustomize"])
        .arg(dir)
        .output()
        .expect("kubectl (with kustomize built in) is needed to render deploy/");
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[test]
fn every_yaml_in_deploy_and_simulations_is_a_valid_manifest() {
    let mut files = Vec::new();
    for dir in ["deploy", "simulations", "config"] {
        yaml_files(&Path::new(ROOT).join(dir), &mut files);
    }
    files.sort();
    assert!(files.len() > 20, "{files:?}");
    assert_valid("deploy/, simulations/ and config/", &validate(&files, None));
}

#[test]
fn every_overlay_renders_and_the_output_validates() {
    let deploy = Path::new(ROOT).join("deploy");
    let mut rendered = Vec::new();
    for dir in [deploy.join("base"), deploy.join("overlays/eks")] {
        let out = kustomize(&dir);
        assert_valid(
            &format!("kubectl kustomize {}", dir.display()),
            &validate(&["-".into()], Some(&out)),
        );
        rendered.push(String::from_utf8(out).expect("utf-8"));
    }
    // The optional components on top of the EKS overlay (kustomize wants relative paths,
    // so the overlay lives inside the repository, under target/).
    let with_components = Path::new(ROOT).join(format!(
        "target/kustomize-test-{}/overlay",
        std::process::id()
    ));
    std::fs::create_dir_all(&with_components).expect("temp overlay");
    std::fs::write(
        with_components.join("kustomization.yaml"),
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n- ../../../deploy/overlays/eks\ncomponents:\n- ../../../deploy/components/servicemonitor\n- ../../../deploy/components/networkpolicy\n",
    )
    .expect("write overlay");
    let out = kustomize(&with_components);
    let text = String::from_utf8_lossy(&out).to_string();
    assert!(text.contains("kind: ServiceMonitor") && text.contains("kind: NetworkPolicy"));
    assert_valid(
        "the EKS overlay with its components",
        &validate(&["-".into()], Some(&out)),
    );

    // What the EKS overlay changes: IRSA, the image, the AWS settings.
    let eks = &rendered[1];
    assert!(eks.contains("eks.amazonaws.com/role-arn"));
    assert!(eks.contains("COOPER_CLOUD: aws"));
    assert!(
        !eks.contains("image: cooper:latest"),
        "image set by the overlay"
    );
    // The hardening the base promises, in the rendered Deployment.
    for needle in [
        "replicas: 2",
        "runAsNonRoot: true",
        "readOnlyRootFilesystem: true",
        "allowPrivilegeEscalation: false",
        "- ALL",
        "type: RuntimeDefault",
        "podAntiAffinity",
        "path: /healthz",
        "path: /readyz",
        "kind: PodDisruptionBudget",
    ] {
        assert!(eks.contains(needle), "rendered EKS overlay lacks {needle}");
    }
}

#[test]
fn the_validator_rejects_bad_manifests() {
    let dir = std::env::temp_dir().join(format!("cooper-invalid-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let cases = [
        (
            "deployment-typo.yaml",
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\nspec:\n  replicass: 2\n  selector: {matchLabels: {a: b}}\n  template: {metadata: {labels: {a: b}}, spec: {containers: [{name: c, image: i}]}}\n",
            "replicass",
        ),
        (
            "nodepool-operator.yaml",
            "apiVersion: cooper.dev/v1alpha1\nkind: NodePool\nmetadata: {name: x}\nspec:\n  template:\n    spec:\n      requirements: [{key: kubernetes.io/arch, operator: Within, values: [amd64]}]\n",
            "Within",
        ),
        (
            "nodeclass-in-configmap.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: d}\ndata:\n  defaults.yaml: |\n    apiVersion: cooper.dev/v1alpha1\n    kind: NodeClass\n    metadata: {name: x}\n    spec: {amiFamily: Ubuntu, subnetSelectorTerms: [{tags: {a: b}}], securityGroupSelectorTerms: [{tags: {a: b}}]}\n",
            "Ubuntu",
        ),
        ("broken.yaml", "a: [b\n", "does not parse"),
    ];
    for (name, text, expected) in cases {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write");
        let out = validate(&[path], None);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(!out.status.success(), "{name} passed:\n{stdout}");
        assert!(
            stdout.contains(name) && stdout.contains(expected),
            "{name}:\n{stdout}"
        );
    }
}

#[test]
fn example_and_default_pools_and_classes_pass_coopers_own_checks() {
    for file in [
        "deploy/examples/nodepools.yaml",
        "deploy/examples/nodeclasses.yaml",
    ] {
        let objects = cooper::controller::read_defaults(&Path::new(ROOT).join(file))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(!objects.is_empty(), "{file}");
    }
    // The defaults the ConfigMaps carry, base and EKS overlay.
    for file in [
        "deploy/base/configmap.yaml",
        "deploy/overlays/eks/defaults.yaml",
    ] {
        let docs = cooper::manifest::read_documents(&Path::new(ROOT).join(file)).expect(file);
        let config_map = docs
            .iter()
            .find(|d| d.value["metadata"]["name"] == "cooper-defaults")
            .unwrap_or_else(|| panic!("{file} has the cooper-defaults ConfigMap"));
        let text = config_map.value["data"]["defaults.yaml"]
            .as_str()
            .expect("defaults.yaml");
        let path = std::env::temp_dir().join(format!(
            "cooper-defaults-{}-{}.yaml",
            std::process::id(),
            file.replace('/', "-")
        ));
        std::fs::write(&path, text).expect("write");
        let objects =
            cooper::controller::read_defaults(&path).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert!(!objects.is_empty(), "{file}");
    }
    // The seeds' inf1 pool is among the examples, as Karpenter's example has it.
    let pools = cooper::nodepool::load(&Path::new(ROOT).join("deploy/examples/nodepools.yaml"))
        .expect("pools");
    let inf1 = pools.iter().find(|p| p.name == "inf1").expect("inf1 pool");
    assert_eq!(inf1.limits.get("cpu"), 16_000);
}

#[test]
fn the_dashboard_queries_only_metrics_cooper_exports() {
    let text = std::fs::read_to_string(Path::new(ROOT).join("deploy/dashboards/cooper.json"))
        .expect("dashboard");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("dashboard JSON");
    // Families are exported once they have a sample: give each labelled one a sample.
    use cooper::controller::metrics::*;
    let metrics = Metrics::default();
    let node = NodeLabels {
        nodepool: "p".into(),
        instance_type: "t".into(),
        capacity_type: "spot".into(),
    };
    metrics.launched.get_or_create(&node).inc();
    metrics
        .terminated
        .get_or_create(&TerminationLabels {
            nodepool: "p".into(),
            instance_type: "t".into(),
            capacity_type: "spot".into(),
            reason: "Empty".into(),
        })
        .inc();
    metrics
        .claims
        .get_or_create(&PhaseLabels {
            phase: "Launched".into(),
        })
        .set(1);
    metrics
        .cloud_errors
        .get_or_create(&CloudErrorLabels {
            operation: "create".into(),
            kind: "transient".into(),
        })
        .inc();
    metrics
        .interruptions
        .get_or_create(&InterruptionLabels {
            kind: "SpotInterrupted".into(),
        })
        .inc();
    let exported = metrics.encode();
    let families: Vec<&str> = exported
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let mut queried = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("expr");
            for (i, _) in expr.match_indices("cooper_") {
                let name: String = expr[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                queried.push(name);
            }
        }
    }
    assert!(queried.len() >= 10, "{queried:?}");
    for name in &queried {
        let family = ["_total", "_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        assert!(
            families.contains(&family),
            "the dashboard queries {name}, which cooper does not export ({families:?})"
        );
    }
    // What the dashboard must show.
    for needed in [
        "cooper_pending_pods",
        "cooper_nodes_launched_total",
        "cooper_nodes_terminated_total",
        "cooper_cluster_cost_per_hour_dollars",
        "cooper_plan_duration_seconds_bucket",
        "cooper_cloud_errors_total",
    ] {
        assert!(queried.iter().any(|q| q == needed), "no panel for {needed}");
    }
}
