//! What a NodeClass means on EC2: its subnets, security groups and AMIs resolved from
//! tag selectors, and the user data that joins a node to the cluster (an AL2023
//! `nodeadm` NodeConfig). Pure helpers here; the EC2 calls are in [`super::Ec2Cloud`].

use std::collections::BTreeMap;

use crate::catalog::InstanceType;
use crate::crd::{NodeClassSpec, ResolvedAmi, ResolvedSubnet};
use crate::labels::Taint;

/// The cluster a node joins: what `nodeadm` needs to bootstrap it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterInfo {
    /// The EKS cluster name (also the value of cooper's cluster ownership tag).
    pub name: String,
    /// The API server endpoint (`https://...`).
    pub endpoint: String,
    /// The cluster CA bundle, base64 as EKS reports it.
    pub certificate_authority: String,
    /// The service CIDR (nodeadm derives the cluster DNS address from it).
    pub cidr: String,
    /// `major.minor`, for picking the EKS-optimised AMIs.
    pub kubernetes_version: String,
}

/// A NodeClass resolved against EC2: everything a launch needs.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedNodeClass {
    pub name: String,
    pub spec: NodeClassSpec,
    /// One subnet per zone (the one with the most free addresses).
    pub subnets: Vec<ResolvedSubnet>,
    pub security_groups: Vec<String>,
    /// AMIs by variant (`standard`, `nvidia`, `neuron`, or `any` for explicit selectors)
    /// and architecture.
    pub amis: Vec<ResolvedAmi>,
}

impl ResolvedNodeClass {
    /// The subnet to launch in for a zone.
    pub fn subnet(&self, zone: &str) -> Option<&str> {
        self.subnets
            .iter()
            .find(|s| s.zone == zone)
            .map(|s| s.id.as_str())
    }

    /// The AMI for an instance type: the variant its accelerator needs, for its
    /// architecture; an explicitly selected AMI of that architecture otherwise.
    pub fn ami_for(&self, instance_type: &InstanceType) -> Option<&str> {
        ami_for(&self.amis, instance_type)
    }
}

/// The image among these that boots an instance type: its variant (by accelerator) for
/// its architecture, or an explicitly selected image (`any`) for the architecture.
pub fn ami_for<'a>(amis: &'a [ResolvedAmi], instance_type: &InstanceType) -> Option<&'a str> {
    let variant = ami_variant(instance_type);
    let arch = ec2_architecture(&instance_type.spec.architecture);
    amis.iter()
        .find(|a| a.variant == variant && a.architecture == arch)
        .or_else(|| {
            amis.iter()
                .find(|a| a.variant == "any" && a.architecture == arch)
        })
        .map(|a| a.id.as_str())
}

/// Which EKS-optimised AL2023 image an instance type boots: NVIDIA GPUs need the
/// `nvidia` variant (driver + container toolkit), Neuron devices the `neuron` variant.
pub fn ami_variant(instance_type: &InstanceType) -> &'static str {
    if instance_type
        .spec
        .gpu
        .as_ref()
        .is_some_and(|g| g.manufacturer.eq_ignore_ascii_case("nvidia"))
    {
        "nvidia"
    } else if instance_type.spec.neuron.is_some() {
        "neuron"
    } else {
        "standard"
    }
}

/// EC2's architecture name for a Kubernetes one.
pub fn ec2_architecture(kubernetes_arch: &str) -> &'static str {
    match kubernetes_arch {
        "arm64" => "arm64",
        _ => "x86_64",
    }
}

/// The DescribeImages name pattern of the EKS-optimised AL2023 AMI for a variant,
/// architecture and Kubernetes version (owner `amazon`).
pub fn al2023_name_pattern(variant: &str, arch: &str, kubernetes_version: &str) -> String {
    format!("amazon-eks-node-al2023-{arch}-{variant}-{kubernetes_version}-v*")
}

/// The (variant, architecture) pairs AL2023 is published in.
pub const AL2023_VARIANTS: [(&str, &str); 5] = [
    ("standard", "x86_64"),
    ("standard", "arm64"),
    ("nvidia", "x86_64"),
    ("nvidia", "arm64"),
    ("neuron", "x86_64"),
];

const BOUNDARY: &str = "//cooper//";

/// The user data that joins a node to the cluster: a MIME multi-part document whose
/// last part is cooper's `nodeadm` NodeConfig (cluster name, endpoint, CA, CIDR, the
/// pool's labels as `--node-labels` and its taints and startup taints as
/// `registerWithTaints`, so no pod lands before the node is initialised). The
/// NodeClass's own user data, if any, goes first; nodeadm merges the parts in order, so
/// the cluster fields cooper writes win.
pub fn user_data(
    cluster: &ClusterInfo,
    labels: &BTreeMap<String, String>,
    taints: &[Taint],
    extra: Option<&str>,
) -> String {
    let labels = labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let mut config = format!(
        "apiVersion: node.eks.aws/v1alpha1\nkind: NodeConfig\nspec:\n  cluster:\n    name: {}\n    apiServerEndpoint: {}\n    certificateAuthority: {}\n    cidr: {}\n",
        yaml_string(&cluster.name),
        yaml_string(&cluster.endpoint),
        yaml_string(&cluster.certificate_authority),
        yaml_string(&cluster.cidr),
    );
    if !taints.is_empty() || !labels.is_empty() {
        config.push_str("  kubelet:\n");
    }
    if !taints.is_empty() {
        config.push_str("    config:\n      registerWithTaints:\n");
        for t in taints {
            config.push_str(&format!("      - key: {}\n", yaml_string(&t.key)));
            if let Some(v) = &t.value {
                config.push_str(&format!("        value: {}\n", yaml_string(v)));
            }
            config.push_str(&format!("        effect: {:?}\n", t.effect));
        }
    }
    if !labels.is_empty() {
        config.push_str(&format!(
            "    flags:\n    - {}\n",
            yaml_string(&format!("--node-labels={labels}"))
        ));
    }
    let mut out =
        format!("MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=\"{BOUNDARY}\"\n\n");
    if let Some(extra) = extra.filter(|e| !e.trim().is_empty()) {
        let content_type = if extra.trim_start().starts_with("#!") {
            "text/x-shellscript; charset=\"us-ascii\""
        } else {
            "application/node.eks.aws"
        };
        out.push_str(&format!(
            "--{BOUNDARY}\nContent-Type: {content_type}\n\n{}\n\n",
            extra.trim_end()
        ));
    }
    out.push_str(&format!(
        "--{BOUNDARY}\nContent-Type: application/node.eks.aws\n\n{config}\n--{BOUNDARY}--\n"
    ));
    out
}

/// A YAML double-quoted scalar (JSON strings are valid YAML).
fn yaml_string(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

/// A stable 64-bit FNV-1a hash: launch template names must not change between
/// controller versions or restarts, or templates would leak.
pub fn stable_hash(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in part.bytes().chain(std::iter::once(0)) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::labels::TaintEffect;

    fn cluster() -> ClusterInfo {
        ClusterInfo {
            name: "ml".into(),
            endpoint: "https://ABC.gr7.us-east-1.eks.amazonaws.com".into(),
            certificate_authority: "Q0E=".into(),
            cidr: "10.100.0.0/16".into(),
            kubernetes_version: "1.33".into(),
        }
    }

    #[test]
    fn user_data_is_a_nodeadm_config_with_labels_and_taints() {
        let labels = BTreeMap::from([
            ("cooper.dev/nodepool".to_string(), "inf1".to_string()),
            ("team".to_string(), "ml".to_string()),
        ]);
        let taints = vec![Taint {
            key: "aiml".into(),
            value: Some("true".into()),
            effect: TaintEffect::NoSchedule,
        }];
        let ud = user_data(&cluster(), &labels, &taints, None);
        assert!(ud.starts_with("MIME-Version: 1.0\n"));
        assert!(ud.contains("Content-Type: application/node.eks.aws"));
        assert!(ud.contains("kind: NodeConfig"));
        assert!(ud.contains("name: \"ml\""));
        assert!(ud.contains("apiServerEndpoint: \"https://ABC.gr7.us-east-1.eks.amazonaws.com\""));
        assert!(ud.contains("certificateAuthority: \"Q0E=\""));
        assert!(ud.contains("cidr: \"10.100.0.0/16\""));
        assert!(ud.contains("--node-labels=cooper.dev/nodepool=inf1,team=ml"));
        assert!(ud.contains("registerWithTaints:\n      - key: \"aiml\"\n        value: \"true\"\n        effect: NoSchedule"));
        assert!(ud.trim_end().ends_with("--//cooper//--"));
        // The NodeConfig part parses as YAML.
        let part = ud
            .split("Content-Type: application/node.eks.aws\n\n")
            .nth(1)
            .and_then(|p| p.split("\n--//cooper//").next())
            .expect("nodeconfig part");
        let v: serde_json::Value = serde_saphyr::from_str(part).expect("yaml");
        assert_eq!(v["spec"]["cluster"]["name"], "ml");
        assert_eq!(
            v["spec"]["kubelet"]["config"]["registerWithTaints"][0]["effect"],
            "NoSchedule"
        );
    }

    #[test]
    fn users_part_goes_first_and_scripts_are_typed() {
        let ud = user_data(
            &cluster(),
            &BTreeMap::new(),
            &[],
            Some("#!/bin/bash\necho hi"),
        );
        let script = ud.find("text/x-shellscript").expect("script part");
        let ours = ud.find("kind: NodeConfig").expect("our part");
        assert!(script < ours);
        assert!(!ud.contains("kubelet:"));
    }

    #[test]
    fn amis_follow_the_accelerator() {
        let catalog = crate::catalog::Catalog::embedded().expect("catalog");
        let t = |n: &str| catalog.instance_type(n).expect(n);
        assert_eq!(ami_variant(t("g5.xlarge")), "nvidia");
        assert_eq!(ami_variant(t("inf1.xlarge")), "neuron");
        assert_eq!(ami_variant(t("inf2.xlarge")), "neuron");
        assert_eq!(ami_variant(t("m5.large")), "standard");
        assert_eq!(
            al2023_name_pattern("nvidia", "x86_64", "1.33"),
            "amazon-eks-node-al2023-x86_64-nvidia-1.33-v*"
        );
    }

    #[test]
    fn stable_hash_is_stable_and_separates_parts() {
        assert_eq!(stable_hash(&["a", "b"]), stable_hash(&["a", "b"]));
        assert_ne!(stable_hash(&["ab", ""]), stable_hash(&["a", "b"]));
        assert_eq!(stable_hash(&[]), 0xcbf2_9ce4_8422_2325);
    }
}
