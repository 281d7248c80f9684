//! Generated careless input (issue 14): every shipped manifest, NodePool file and
//! scenario, mutated the way people and tools break YAML (numbers out of range,
//! negative, fractional or not numbers at all, quantities and durations with absurd or
//! unknown units, lines dropped or doubled, values emptied, files cut short), goes
//! through the same loaders, planner and simulator the CLI uses. Each case must finish
//! without a panic, within [`BOUND`], and either work or fail with an error that names
//! the file it read. The corpus is deterministic (a fixed seed per file), so a failure
//! names a case that can be replayed.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cooper::catalog::Catalog;
use cooper::mix::SplitMix64;
use cooper::planner::{self, Budget, PlanInput, PlanOptions, Strategy};
use cooper::sim::{self, SimOptions, scenario};
use cooper::{manifest, nodepool, workload};

/// Mutated cases per input file.
const CASES_PER_FILE: usize = 100;
/// No case may take longer (debug build, on a loaded 2-core machine).
const BOUND: Duration = Duration::from_secs(20);

const NUMBERS: &[&str] = &[
    "-1",
    "0",
    "0.5",
    "1e309",
    "-0",
    "NaN",
    ".inf",
    "4294967296",
    "18446744073709551616",
    "99999999999999999999",
    "1000000000",
    "\"\"",
    "true",
];
const QUANTITIES: &[&str] = &[
    "-100m",
    "1Ei",
    "0.0001m",
    "1e3",
    "abc",
    "100M",
    "9223372036854775807",
    "0.5",
    "1Ki",
    "",
];
const DURATIONS: &[&str] = &[
    "99999999999999999999h",
    "3000000000000000h",
    "-1s",
    "0s",
    "1y",
    "1ms",
    "NaNs",
    "8760h",
];
const VALUES: &[&str] = &["{}", "[]", "null", "~", "\"x\"", "[1, 2]", "{a: b}"];

/// A token of a line that looks like a number, a quantity or a duration.
#[derive(Clone, Copy, PartialEq)]
enum Token {
    Number,
    Quantity,
    Duration,
}

fn classify(token: &str) -> Option<Token> {
    let t = token.trim_matches(|c| c == '"' || c == '\'' || c == ',' || c == '}' || c == ']');
    if t.is_empty() {
        return None;
    }
    if t.parse::<f64>().is_ok() {
        return Some(Token::Number);
    }
    let digits = t.trim_start_matches(|c: char| c.is_ascii_digit() || c == '.');
    if digits.len() == t.len() {
        return None;
    }
    match digits {
        "s" | "m" | "h" | "ms" | "h30m" => Some(Token::Duration),
        "Mi" | "Gi" | "Ki" | "Ti" | "M" | "G" | "k" => Some(Token::Quantity),
        _ if digits.starts_with('h') || digits.ends_with('s') => Some(Token::Duration),
        _ => None,
    }
}

fn pick<'a>(rng: &mut SplitMix64, from: &[&'a str]) -> &'a str {
    from[rng.below(from.len() as u64) as usize]
}

/// One mutation of `text`, and what it did (for the failure message).
fn mutate(text: &str, rng: &mut SplitMix64) -> (String, String) {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    if lines.is_empty() {
        return (text.to_string(), "unchanged".into());
    }
    let i = rng.below(lines.len() as u64) as usize;
    match rng.below(6) {
        0..=2 => {
            // Replace a number, quantity or duration somewhere from line i on.
            for k in 0..lines.len() {
                let l = (i + k) % lines.len();
                let line = lines[l].clone();
                let tokens: Vec<(usize, &str)> = line
                    .match_indices(|c: char| !c.is_whitespace())
                    .map(|(p, _)| p)
                    .filter(|&p| p == 0 || line.as_bytes()[p - 1].is_ascii_whitespace())
                    .map(|p| {
                        let end = line[p..]
                            .find(char::is_whitespace)
                            .map_or(line.len(), |e| p + e);
                        (p, &line[p..end])
                    })
                    .filter(|(_, t)| classify(t).is_some())
                    .collect();
                if tokens.is_empty() {
                    continue;
                }
                let (p, token) = tokens[rng.below(tokens.len() as u64) as usize];
                let kind = classify(token).expect("classified");
                let bare = token.trim_end_matches([',', '}', ']']);
                let tail = &token[bare.len()..];
                let replacement = match kind {
                    Token::Number => pick(rng, NUMBERS),
                    Token::Quantity => pick(rng, QUANTITIES),
                    Token::Duration => pick(rng, DURATIONS),
                };
                let new_line = format!(
                    "{}{replacement}{tail}{}",
                    &line[..p],
                    &line[p + token.len()..]
                );
                let what = format!("line {}: {bare:?} -> {replacement:?}", l + 1);
                lines[l] = new_line;
                return (lines.join("\n"), what);
            }
            (text.to_string(), "no token".into())
        }
        3 => {
            let what = format!("line {} dropped: {:?}", i + 1, lines[i]);
            lines.remove(i);
            (lines.join("\n"), what)
        }
        4 => {
            let what = format!("line {} doubled: {:?}", i + 1, lines[i]);
            let l = lines[i].clone();
            lines.insert(i, l);
            (lines.join("\n"), what)
        }
        _ => {
            // Empty a value, or cut the file short.
            if let Some(colon) = lines[i].find(": ") {
                let value = pick(rng, VALUES);
                let what = format!("line {}: value -> {value}", i + 1);
                lines[i] = format!("{}: {value}", &lines[i][..colon]);
                (lines.join("\n"), what)
            } else {
                let cut = rng.below(text.len() as u64) as usize;
                let cut = (0..=cut)
                    .rev()
                    .find(|&c| text.is_char_boundary(c))
                    .unwrap_or(0);
                (text[..cut].to_string(), format!("cut at byte {cut}"))
            }
        }
    }
}

/// What a file is, and so which loader reads it.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Manifests,
    NodePools,
    Scenario,
}

fn inputs() -> Vec<(PathBuf, Kind)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut out = vec![
        (
            root.join("simulations/workloads/ml-training.yaml"),
            Kind::Manifests,
        ),
        (
            root.join("simulations/workloads/sentiment-analysis.yaml"),
            Kind::Manifests,
        ),
        (root.join("config/nodepools.yaml"), Kind::NodePools),
        (
            root.join("tests/data/karpenter-v1-nodepool.yaml"),
            Kind::NodePools,
        ),
    ];
    for s in [
        "sentiment-inf1",
        "gpu-training",
        "mixed-spot",
        "zone-resilient",
    ] {
        out.push((root.join(format!("simulations/{s}.yaml")), Kind::Scenario));
    }
    out
}

/// Run one mutated file through its loader and, where it loads, the planner or the
/// simulator. `Err` is the user-facing error text.
fn exercise(path: &Path, kind: Kind, catalog: &Catalog) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    match kind {
        Kind::Manifests => {
            let docs = manifest::read_documents(path).map_err(|e| err(&e))?;
            let w = workload::from_documents(&docs).map_err(|e| err(&e))?;
            let pools = nodepool::defaults().map_err(|e| err(&e))?;
            let unavailable = Default::default();
            let input = PlanInput {
                pods: &w.pods,
                pools: &pools,
                catalog,
                daemonsets: &w.daemonsets,
                gangs: &w.gangs,
                nodes: &[],
                unavailable: &unavailable,
                running: &[],
            };
            let plan = planner::plan(
                input,
                &PlanOptions {
                    strategy: Strategy::Optimal,
                    time_limit: Duration::from_millis(200),
                    relative_gap: 0.01,
                    budget: Budget::WallClock,
                    exact_search: true,
                },
            );
            let problems = planner::verify::verify(&input, &plan);
            assert!(problems.is_empty(), "plan check failed: {problems:?}");
            Ok(())
        }
        Kind::NodePools => {
            let docs = manifest::read_documents(path).map_err(|e| err(&e))?;
            nodepool::from_documents_with_warnings(&docs)
                .map(|_| ())
                .map_err(|e| err(&e))
        }
        Kind::Scenario => {
            let s = scenario::load(path).map_err(|e| err(&e))?;
            // The small scenarios are simulated too (a mutated duration or arrival
            // rate must not hang or exhaust memory).
            if path.ends_with("sentiment-inf1.yaml") || path.ends_with("zone-resilient.yaml") {
                sim::run(&s, &SimOptions::default()).map_err(|e| err(&e))?;
            }
            Ok(())
        }
    }
}

#[test]
fn mutated_inputs_never_panic_hang_or_fail_without_naming_the_file() {
    let catalog = Catalog::embedded().expect("catalog");
    let dir = std::env::temp_dir().join(format!("cooper-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (mut accepted, mut refused) = (0usize, 0usize);
    let mut slowest = (Duration::ZERO, String::new());
    for (file, kind) in inputs() {
        let text = std::fs::read_to_string(&file).expect("read input");
        let name = file
            .file_name()
            .expect("file name")
            .to_string_lossy()
            .to_string();
        let mut rng = SplitMix64::new(
            name.bytes()
                .fold(7u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b))),
        );
        // Into a directory of its own: the fuzzed scenarios refer to no file beside them,
        // and writing next to the originals raced with the test that validates every
        // YAML file under simulations/.
        let target = dir.join(&name);
        for case in 0..CASES_PER_FILE {
            let (mutated, what) = mutate(&text, &mut rng);
            std::fs::write(&target, &mutated).expect("write case");
            let started = Instant::now();
            let outcome = catch_unwind(AssertUnwindSafe(|| exercise(&target, kind, &catalog)));
            let took = started.elapsed();
            let label = format!("{name} case {case} ({what})");
            if took > slowest.0 {
                slowest = (took, label.clone());
            }
            assert!(took < BOUND, "{label} took {took:?}");
            match outcome {
                Err(_) => panic!("{label} panicked"),
                Ok(Ok(())) => accepted += 1,
                Ok(Err(message)) => {
                    refused += 1;
                    assert!(
                        message
                            .contains(target.file_name().expect("name").to_str().expect("utf-8")),
                        "{label}: the error does not name the file: {message}"
                    );
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!(
        "{} cases: {accepted} accepted, {refused} refused with the file named; slowest {:?} ({})",
        accepted + refused,
        slowest.0,
        slowest.1
    );
    assert!(
        refused > 0 && accepted > 0,
        "the corpus exercises both paths"
    );
}
