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
