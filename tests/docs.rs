//! The docs stay true to the code: the CLI reference (`docs/cli.md`) is the clap help of
//! every command, the README's configuration reference names every NodePool and NodeClass
//! field, and its migrated Karpenter NodePool loads.

use std::path::Path;
use std::process::Command;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn readme() -> String {
    std::fs::read_to_string(Path::new(ROOT).join("README.md")).expect("README.md")
}

/// `cooper [SUBCOMMAND] --help`, with no COOPER_* variables set (clap shows their values).
fn help(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_cooper"))
        .args(args)
        .arg("--help")
        .env_clear()
        .output()
        .expect("cooper --help");
    assert!(out.status.success());
    String::from_utf8(out.stdout).expect("utf-8")
}

fn cli_reference() -> String {
    let mut out = String::new();
    for (title, args) in [
        ("cooper", vec![]),
        ("cooper simulate", vec!["simulate"]),
        ("cooper plan", vec!["plan"]),
        ("cooper report", vec!["report"]),
        ("cooper catalog", vec!["catalog"]),
        ("cooper controller", vec!["controller"]),
        ("cooper crd", vec!["crd"]),
    ] {
        out.push_str(&format!("\n### `{title}`\n\n```text\n{}```\n", help(&args)));
    }
    out
}

#[test]
fn the_cli_reference_is_the_clap_help() {
    let path = Path::new(ROOT).join("docs/cli.md");
    let text = std::fs::read_to_string(&path).expect("docs/cli.md");
    let (start, end) = ("<!-- cli:start -->", "<!-- cli:end -->");
    let a = text.find(start).expect("cli:start marker") + start.len();
    let b = text.find(end).expect("cli:end marker");
    let generated = cli_reference();
    if std::env::var_os("COOPER_UPDATE_DOCS").is_some() {
        let updated = format!("{}{generated}{}", &text[..a], &text[b..]);
        std::fs::write(&path, updated).expect("write docs/cli.md");
        return;
    }
    assert!(
        text[a..b] == generated,
        "docs/cli.md is stale: run `COOPER_UPDATE_DOCS=1 cargo test --test docs`"
    );
}

/// Every property path under a CRD's `spec` (`a.b.c`, array items and maps folded in).
fn spec_fields(kind: &str) -> Vec<String> {
    fn walk(schema: &serde_json::Value, prefix: &str, out: &mut Vec<String>) {
        for (name, sub) in schema["properties"].as_object().into_iter().flatten() {
            let path = format!("{prefix}{name}");
            out.push(path.clone());
            walk(sub, &format!("{path}."), out);
            walk(&sub["items"], &format!("{path}."), out);
        }
    }
    let crd = cooper::crd::all()
        .into_iter()
        .find(|c| c.spec.names.kind == kind)
        .expect("crd");
    let schema = serde_json::to_value(&crd.spec.versions[0].schema).expect("schema");
    let mut out = Vec::new();
    walk(
        &schema["openAPIV3Schema"]["properties"]["spec"],
        "",
        &mut out,
    );
    out
}

#[test]
fn the_configuration_reference_names_every_field() {
    let text = readme();
    let a = text.find("## Configuration reference").expect("section");
    let b = text[a + 1..]
        .find("\n## ")
        .map_or(text.len(), |i| a + 1 + i);
    let section = &text[a..b];
    for kind in ["NodePool", "NodeClass"] {
        let fields = spec_fields(kind);
        assert!(fields.len() > 8, "{kind}: {fields:?}");
        for field in fields {
            // Documented by its full path, as the parent of a documented path, or (for a
            // field inside a list or object) by its own name.
            let leaf = field.rsplit('.').next().unwrap_or(&field);
            assert!(
                section.contains(&format!("`{field}`"))
                    || section.contains(&format!("`{field}."))
                    || section.contains(&format!("`{leaf}`")),
                "README's configuration reference does not mention {kind} spec.{field}"
            );
        }
    }
}

#[test]
fn the_migrated_karpenter_nodepool_loads() {
    let text = readme();
    let marker = "<!-- migrated-nodepool -->\n```yaml\n";
    let a = text.find(marker).expect("marker") + marker.len();
    let b = a + text[a..].find("```").expect("end of block");
    let path = std::env::temp_dir().join(format!("cooper-migrated-{}.yaml", std::process::id()));
    std::fs::write(&path, &text[a..b]).expect("write");
    let pools = cooper::nodepool::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(pools.len(), 1);
    let pool = &pools[0];
    assert_eq!(pool.name, "gpu");
    assert_eq!(pool.limits.get("nvidia.com/gpu"), 32);
    assert_eq!(pool.node_class.as_deref(), Some("default"));
}

#[test]
fn the_architecture_document_exists_and_names_the_modules_it_describes() {
    let text = std::fs::read_to_string(Path::new(ROOT).join("docs/architecture.md"))
        .expect("docs/architecture.md");
    for module in [
        "src/planner",
        "src/provisioning.rs",
        "src/disruption.rs",
        "src/cloud.rs",
        "src/aws",
        "src/controller",
        "src/sim",
        "src/report.rs",
    ] {
        assert!(
            text.contains(module),
            "docs/architecture.md does not mention {module}"
        );
        let path = Path::new(ROOT).join(module);
        assert!(path.exists(), "{module} is mentioned but does not exist");
    }
}

/// Every key `cooper plan -o json` prints, at any depth (resource names in `allocatable`
/// and `requested` are data, not keys of the format).
fn json_keys(value: &serde_json::Value, out: &mut std::collections::BTreeSet<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                out.insert(k.clone());
                if k != "allocatable" && k != "requested" {
                    json_keys(v, out);
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| json_keys(v, out)),
        _ => {}
    }
}

#[test]
fn the_plan_json_format_is_documented_field_by_field() {
    // The shipped workloads and one pod nothing can host (so `unschedulable` has entries).
    let dir = std::env::temp_dir().join(format!("cooper-docs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let huge = dir.join("huge.yaml");
    std::fs::write(
        &huge,
        "apiVersion: v1\nkind: Pod\nmetadata: {name: huge, namespace: default}\n\
         spec: {containers: [{name: c, image: x, resources: {requests: {cpu: '5000'}}}]}\n",
    )
    .expect("write pod");
    let out = Command::new(env!("CARGO_BIN_EXE_cooper"))
        .args(["plan", "-R", "-o", "json", "-f"])
        .arg(Path::new(ROOT).join("simulations/workloads"))
        .arg("-f")
        .arg(&huge)
        .output()
        .expect("cooper plan");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let mut keys = std::collections::BTreeSet::new();
    json_keys(&plan, &mut keys);
    for expected in [
        "nodes",
        "unschedulable",
        "compared_with",
        "solve_ms",
        "reason",
    ] {
        assert!(keys.contains(expected), "{expected} missing from {keys:?}");
    }
    let readme = readme();
    let start = readme
        .find("JSON output (stable")
        .expect("the README's JSON section");
    let end = start + readme[start..].find("`cooper catalog").expect("its end");
    let section = &readme[start..end];
    let undocumented: Vec<&String> = keys
        .iter()
        .filter(|k| !section.contains(&format!("\"{k}\"")) && !section.contains(&format!("`{k}`")))
        .collect();
    assert!(
        undocumented.is_empty(),
        "fields of `cooper plan -o json` the README's JSON section does not show: {undocumented:?}"
    );
}
