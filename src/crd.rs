//! cooper's custom resources (`cooper.dev/v1alpha1`, all cluster-scoped), generated from
//! these Rust types and printed by `cooper crd`:
//! - `NodePool` — the planner's pool (spec shared with the file format, see
//!   [`crate::nodepool::NodePoolSpec`]); status: resources in use, conditions;
//! - `NodeClass` — how to launch on AWS; status: what its selectors resolved to;
//! - `NodeClaim` — one node being launched, from the plan to a registered node.

use std::collections::BTreeMap;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::nodepool::{NodePoolResource, RequirementSpec};

/// A status condition, as Kubernetes and Karpenter write them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// e.g. `Ready`, `Launched`, `Registered`, `Initialized`, `Empty`, `Terminating`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// CamelCase reason.
    #[serde(default)]
    pub reason: String,
    /// Human-readable detail, e.g. which field of the spec is invalid and why.
    #[serde(default)]
    pub message: String,
    /// RFC 3339 time of the last status change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

impl Condition {
    /// A condition with the given type, status, reason and message, stamped now.
    pub fn new(type_: &str, status: bool, reason: &str, message: impl Into<String>) -> Self {
        Condition {
            type_: type_.into(),
            status: if status { "True" } else { "False" }.into(),
            reason: reason.into(),
            message: message.into(),
            last_transition_time: Some(now_rfc3339()),
            observed_generation: None,
        }
    }
}

/// Set `condition` in `conditions`, keeping the old transition time when the status
/// did not change. Returns true when anything changed.
pub fn set_condition(conditions: &mut Vec<Condition>, condition: Condition) -> bool {
    match conditions.iter_mut().find(|c| c.type_ == condition.type_) {
        Some(existing) => {
            let changed = existing.status != condition.status
                || existing.reason != condition.reason
                || existing.message != condition.message;
            if existing.status != condition.status {
                *existing = condition;
            } else if changed {
                existing.reason = condition.reason;
                existing.message = condition.message;
            }
            changed
        }
        None => {
            conditions.push(condition);
            true
        }
    }
}

/// The current time in RFC 3339 (UTC), rounded *up* to the second as Kubernetes
/// condition times are: a TTL measured from it never ends early.
pub fn now_rfc3339() -> String {
    use k8s_openapi::jiff::{RoundMode, Timestamp, TimestampRound, Unit};
    Timestamp::now()
        .round(
            TimestampRound::new()
                .smallest(Unit::Second)
                .mode(RoundMode::Ceil),
        )
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// NodePool status: what its nodes use and whether the spec is valid.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodePoolStatus {
    /// Sum of the capacity of the pool's launched nodes, e.g. `cpu: "12"` (what its
    /// `limits` are held against).
    #[serde(default)]
    pub resources: BTreeMap<String, String>,
    /// How many nodes the pool has launched and not yet removed.
    #[serde(default)]
    pub nodes: u32,
    /// `Ready` (False with the invalid field when the spec cannot be used).
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// A tag selector: resources carrying all these tags (a value of `*` matches any value).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SelectorTerm {
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// Or an explicit ID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// Which AMIs to boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum AmiFamily {
    /// EKS-optimised Amazon Linux 2023; the NVIDIA or Neuron variant is picked by the
    /// instance's accelerator.
    AL2023,
    /// Use `amiSelectorTerms` only.
    Custom,
}

/// A block device mapping for launched instances.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BlockDevice {
    pub device_name: String,
    #[schemars(range(min = 1, max = 65536))]
    pub volume_size_gib: u32,
    #[serde(default = "gp3")]
    pub volume_type: String,
    #[serde(default = "yes")]
    pub encrypted: bool,
}

fn gp3() -> String {
    "gp3".into()
}
fn yes() -> bool {
    true
}

/// Instance metadata service options.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MetadataOptions {
    /// `required` (IMDSv2 only, the default) or `optional`.
    #[serde(default = "required")]
    pub http_tokens: String,
    #[serde(default = "hop_limit")]
    #[schemars(range(min = 1, max = 64))]
    pub http_put_response_hop_limit: u32,
}

fn required() -> String {
    "required".into()
}
fn hop_limit() -> u32 {
    1
}

/// How to launch nodes on AWS: AMIs, network, identity, disks, tags.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, CustomResource)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[kube(
    group = "cooper.dev",
    version = "v1alpha1",
    kind = "NodeClass",
    status = "NodeClassStatus",
    shortname = "cnc",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#
)]
pub struct NodeClassSpec {
    pub ami_family: AmiFamily,
    /// Explicit AMIs (by ID or tags); required for `Custom`.
    #[serde(default)]
    pub ami_selector_terms: Vec<SelectorTerm>,
    #[schemars(length(min = 1))]
    pub subnet_selector_terms: Vec<SelectorTerm>,
    #[schemars(length(min = 1))]
    pub security_group_selector_terms: Vec<SelectorTerm>,
    /// The IAM instance profile nodes run with (or give `role`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_profile: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// Extra user data merged into the generated nodeadm NodeConfig.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data: Option<String>,
    #[serde(default)]
    pub block_device_mappings: Vec<BlockDevice>,
    /// Tags on instances and volumes (cooper adds its ownership tags).
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata_options: Option<MetadataOptions>,
    /// Give each node a public IPv4 address (billed per hour), or not; unset, the
    /// subnet's own setting (`MapPublicIpOnLaunch`) decides, as with Karpenter.
    #[serde(
        default,
        rename = "associatePublicIPAddress",
        skip_serializing_if = "Option::is_none"
    )]
    pub associate_public_ip_address: Option<bool>,
    /// USD per node-hour that this class's nodes cost beyond the instance, its volumes
    /// and its address (licences, agents billed per node): the planner adds it to
    /// every node it prices, so that fewer, larger nodes win where they should.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub per_node_cost_per_hour: Option<f64>,
}

impl NodeClassSpec {
    /// What each node of this class is billed besides its instance: its block devices
    /// (the AMI's 20 GiB gp3 root volume when none are given), a public address when
    /// it gets one (`subnets_public`: a resolved subnet assigns one by default), and
    /// the user's per-node cost.
    pub fn billing(&self, subnets_public: bool) -> crate::catalog::NodeBilling {
        let mut billing = crate::catalog::NodeBilling::default();
        if !self.block_device_mappings.is_empty() {
            billing.volumes = self
                .block_device_mappings
                .iter()
                .map(|d| (d.volume_type.clone(), d.volume_size_gib))
                .collect();
        }
        billing.public_ipv4 = self.associate_public_ip_address.unwrap_or(subnets_public);
        billing.extra_per_hour = self
            .per_node_cost_per_hour
            .filter(|c| c.is_finite() && *c > 0.0)
            .unwrap_or(0.0);
        billing
    }
}

/// What a NodeClass's selectors resolved to.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeClassStatus {
    #[serde(default)]
    pub subnets: Vec<ResolvedSubnet>,
    #[serde(default)]
    pub security_groups: Vec<String>,
    #[serde(default)]
    pub amis: Vec<ResolvedAmi>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// A subnet and its zone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResolvedSubnet {
    pub id: String,
    pub zone: String,
    /// Does the subnet give instances a public IPv4 address by default
    /// (`MapPublicIpOnLaunch`)? Each one is billed per hour.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub public_ipv4: bool,
}

/// An AMI and what it is for (`standard`, `nvidia`, `neuron`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResolvedAmi {
    pub id: String,
    pub variant: String,
    #[serde(default)]
    pub architecture: String,
}

/// One offering a claim may be launched as, in order of preference.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClaimOffering {
    pub instance_type: String,
    pub zone: String,
    /// `spot` or `on-demand`.
    pub capacity_type: String,
    pub price_per_hour: f64,
}

/// One node being launched: what the plan chose and for which pods.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, CustomResource)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[kube(
    group = "cooper.dev",
    version = "v1alpha1",
    kind = "NodeClaim",
    status = "NodeClaimStatus",
    shortname = "cncl",
    printcolumn = r#"{"name":"Type","type":"string","jsonPath":".status.instanceType"}"#,
    printcolumn = r#"{"name":"Capacity","type":"string","jsonPath":".status.capacityType"}"#,
    printcolumn = r#"{"name":"Zone","type":"string","jsonPath":".status.zone"}"#,
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".status.nodeName"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
pub struct NodeClaimSpec {
    /// The NodePool the claim belongs to.
    #[schemars(length(min = 1))]
    pub node_pool: String,
    /// The pool's requirements, narrowed to the chosen offerings.
    #[serde(default)]
    pub requirements: Vec<RequirementSpec>,
    /// The chosen offering first, then acceptable fallbacks.
    #[schemars(length(min = 1))]
    pub offerings: Vec<ClaimOffering>,
    /// Resources the planned pods request (plus DaemonSet overhead).
    #[serde(default)]
    pub resources: BTreeMap<String, String>,
    /// The pods the plan put here (`namespace/name`), for Events and debugging.
    #[serde(default)]
    pub pods: Vec<String>,
}

/// What happened to a claim.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeClaimStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price_per_hour: Option<f64>,
    /// Launch attempts that failed definitely so far: the launch's idempotency token is
    /// the claim's uid and this number, so a launch repeated after a timeout or a lost
    /// answer returns the instance it launched, and only a failed one is tried anew.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub launch_attempt: u32,
    /// Launched, Registered, Initialized, Empty, Terminating.
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Every CRD cooper serves.
pub fn all() -> Vec<CustomResourceDefinition> {
    vec![NodePoolResource::crd(), NodeClass::crd(), NodeClaim::crd()]
}

/// The CRDs as one multi-document YAML stream (what `cooper crd` prints and
/// `deploy/base/crds.yaml` holds).
pub fn to_yaml() -> Result<String, serde_saphyr::ser::Error> {
    let mut out =
        String::from("# Generated by `cooper crd`; do not edit (a test keeps this in sync).\n");
    for crd in all() {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(&crd)?);
    }
    Ok(out)
}
