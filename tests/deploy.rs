//! What ships in `deploy/` stays in sync with the code.

#[test]
fn crds_in_deploy_match_cooper_crd() {
    let generated = cooper::crd::to_yaml().expect("CRDs serialise");
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/base/crds.yaml");
    let shipped = std::fs::read_to_string(path).expect("deploy/base/crds.yaml");
    assert!(
        shipped == generated,
        "deploy/base/crds.yaml is stale: run `cargo run -- crd > deploy/base/crds.yaml`"
    );
}

#[test]
fn crds_carry_schema_validation() {
    let crds = cooper::crd::all();
    let names: Vec<String> = crds.iter().map(|c| c.spec.names.kind.clone()).collect();
    assert_eq!(names, ["NodePool", "NodeClass", "NodeClaim"]);
    for crd in &crds {
        assert_eq!(crd.spec.scope, "Cluster");
        let version = &crd.spec.versions[0];
        assert!(
            version
                .subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some(),
            "{} has a status subresource",
            crd.spec.names.kind
        );
        let schema = serde_json::to_value(&version.schema).expect("schema");
        let text = schema.to_string();
        match crd.spec.names.kind.as_str() {
            // Operators and taint effects are enums; weight is bounded.
            "NodePool" => {
                assert!(
                    text.contains(r#""enum":["In","NotIn","Exists","DoesNotExist","Gt","Lt"]"#),
                    "{text}"
                );
                assert!(text.contains(r#""maximum":100"#));
            }
            "NodeClass" => {
                assert!(text.contains(r#""required":["amiFamily","securityGroupSelectorTerms","subnetSelectorTerms"]"#), "{text}");
            }
            _ => assert!(text.contains(r#""minItems":1"#)),
        }
    }
}

/// The AWS API actions cooper's code calls: every `.snake_case_operation()` on an AWS
/// SDK client in `src/aws/` (SQS in `interruption.rs`, EC2 elsewhere), as IAM actions.
fn aws_actions_in_code() -> std::collections::BTreeSet<String> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/aws");
    let operations = [
        "describe_",
        "create_",
        "terminate_",
        "run_",
        "delete_",
        "modify_",
        "get_",
        "receive_",
        "send_",
    ];
    let mut actions = std::collections::BTreeSet::new();
    for entry in std::fs::read_dir(dir).expect("src/aws") {
        let path = entry.expect("entry").path();
        let service = if path.ends_with("interruption.rs") {
            "sqs"
        } else {
            "ec2"
        };
        let text = std::fs::read_to_string(&path).expect("source");
        // Only the library code: tests build requests of their own.
        let text = text.split("#[cfg(test)]").next().unwrap_or_default();
        for (i, _) in text.match_indices('.') {
            let rest = &text[i + 1..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            if !rest[name.len()..].starts_with("()")
                || !operations.iter().any(|p| name.starts_with(p))
            {
                continue;
            }
            let pascal: String = name
                .split('_')
                .map(|w| {
                    let mut c = w.chars();
                    c.next()
                        .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                        .unwrap_or_default()
                })
                .collect();
            actions.insert(format!("{service}:{pascal}"));
        }
    }
    actions
}

fn iam_policy() -> serde_json::Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/iam/controller-policy.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).expect("policy")).expect("policy JSON")
}

fn statement_actions(statement: &serde_json::Value) -> Vec<String> {
    match &statement["Action"] {
        serde_json::Value::String(a) => vec![a.clone()],
        serde_json::Value::Array(a) => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect(),
        _ => Vec::new(),
    }
}

#[test]
fn iam_policy_allows_every_aws_call_the_code_makes_and_nothing_broader() {
    let needed = aws_actions_in_code();
    for expected in [
        "ec2:CreateFleet",
        "ec2:TerminateInstances",
        "ec2:DescribeSpotPriceHistory",
        "sqs:ReceiveMessage",
        "sqs:DeleteMessage",
    ] {
        assert!(
            needed.contains(expected),
            "the scan missed {expected}: {needed:?}"
        );
    }
    let policy = iam_policy();
    let statements = policy["Statement"].as_array().expect("statements");
    let allowed: std::collections::BTreeSet<String> =
        statements.iter().flat_map(statement_actions).collect();
    let missing: Vec<&String> = needed.iter().filter(|a| !allowed.contains(*a)).collect();
    assert!(
        missing.is_empty(),
        "deploy/iam/controller-policy.json lacks {missing:?}"
    );
    // CreateFleet launches through RunInstances; PassRole hands the node role to EC2.
    let used_indirectly = ["ec2:RunInstances", "iam:PassRole"];
    let unused: Vec<&String> = allowed
        .iter()
        .filter(|a| !needed.contains(*a) && !used_indirectly.contains(&a.as_str()))
        .collect();
    assert!(
        unused.is_empty(),
        "the policy grants actions cooper never calls: {unused:?}"
    );
    assert!(
        allowed.iter().all(|a| !a.ends_with('*')),
        "no wildcard actions"
    );
}

#[test]
fn iam_policy_scopes_termination_and_tagging_to_cooper_owned_resources() {
    let policy = iam_policy();
    for statement in policy["Statement"].as_array().expect("statements") {
        let actions = statement_actions(statement);
        let scoped = [
            "ec2:TerminateInstances",
            "ec2:CreateTags",
            "ec2:CreateLaunchTemplate",
        ];
        if !actions.iter().any(|a| scoped.contains(&a.as_str())) {
            continue;
        }
        let conditions = statement["Condition"]["StringEquals"].to_string();
        for tag in ["cooper.dev/cluster", "cooper.dev/managed-by"] {
            assert!(
                conditions.contains(&format!("aws:ResourceTag/{tag}"))
                    || conditions.contains(&format!("aws:RequestTag/{tag}")),
                "statement {} allows {actions:?} without a {tag} tag condition",
                statement["Sid"]
            );
        }
        assert_ne!(
            statement["Resource"], "*",
            "{} on every resource",
            statement["Sid"]
        );
    }
    // The tags the policy names are the ones the code writes.
    assert_eq!(cooper::aws::CLUSTER_TAG, "cooper.dev/cluster");
    assert_eq!(cooper::aws::MANAGED_BY_TAG, "cooper.dev/managed-by");
}
