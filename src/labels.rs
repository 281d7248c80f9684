//! Node labels, label requirements (node selector / affinity operators), taints and
//! tolerations, with the semantics of kube-scheduler. NodePools, pods, DaemonSets and
//! the simulated scheduler all use these, so a pod that the planner places on a node
//! is a pod the scheduler would bind there.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// A node's labels.
pub type Labels = BTreeMap<String, String>;

/// Read access to a node's labels. Lets the planner match a NodePool's labels layered
/// over an offering's without building (and freeing) a merged map per offering.
pub trait LabelLookup {
    /// The value of `key`, if the node has it.
    fn label(&self, key: &str) -> Option<&str>;
}

impl LabelLookup for Labels {
    fn label(&self, key: &str) -> Option<&str> {
        self.get(key).map(String::as_str)
    }
}

/// `top` (e.g. a NodePool's labels) over `base` (e.g. an offering's labels).
#[derive(Debug, Clone, Copy)]
pub struct Layered<'a> {
    pub top: &'a Labels,
    pub base: &'a Labels,
}

impl LabelLookup for Layered<'_> {
    fn label(&self, key: &str) -> Option<&str> {
        self.top.label(key).or_else(|| self.base.label(key))
    }
}

/// Well-known label keys cooper sets on the nodes it launches.
pub mod keys {
    pub const INSTANCE_TYPE: &str = "node.kubernetes.io/instance-type";
    pub const ZONE: &str = "topology.kubernetes.io/zone";
    pub const REGION: &str = "topology.kubernetes.io/region";
    pub const ARCH: &str = "kubernetes.io/arch";
    pub const OS: &str = "kubernetes.io/os";
    pub const HOSTNAME: &str = "kubernetes.io/hostname";
    pub const CAPACITY_TYPE: &str = "cooper.dev/capacity-type";
    pub const NODEPOOL: &str = "cooper.dev/nodepool";
    pub const INSTANCE_FAMILY: &str = "cooper.dev/instance-family";
    pub const INSTANCE_SIZE: &str = "cooper.dev/instance-size";
    pub const INSTANCE_CATEGORY: &str = "cooper.dev/instance-category";
    pub const INSTANCE_GENERATION: &str = "cooper.dev/instance-generation";
    pub const INSTANCE_CPU: &str = "cooper.dev/instance-cpu";
    pub const INSTANCE_MEMORY: &str = "cooper.dev/instance-memory";
    pub const GPU_NAME: &str = "cooper.dev/instance-gpu-name";
    pub const GPU_COUNT: &str = "cooper.dev/instance-gpu-count";
    pub const GPU_MANUFACTURER: &str = "cooper.dev/instance-gpu-manufacturer";
    /// Memory of one GPU in MiB, as Karpenter's `karpenter.k8s.aws/instance-gpu-memory`.
    pub const GPU_MEMORY: &str = "cooper.dev/instance-gpu-memory";
    /// Memory of all the node's GPUs together, in MiB (cooper's own; no Karpenter alias).
    pub const GPU_MEMORY_TOTAL: &str = "cooper.dev/instance-gpu-memory-total";
    pub const ACCELERATOR_NAME: &str = "cooper.dev/instance-accelerator-name";
    pub const ACCELERATOR_COUNT: &str = "cooper.dev/instance-accelerator-count";
    pub const ACCELERATOR_MANUFACTURER: &str = "cooper.dev/instance-accelerator-manufacturer";
}

/// Map label keys with the same meaning onto cooper's canonical key, so that pods and
/// pools written for Karpenter (or with the deprecated beta labels) work unchanged:
/// `karpenter.sh/capacity-type` → `cooper.dev/capacity-type`,
/// `karpenter.k8s.aws/instance-gpu-name` → `cooper.dev/instance-gpu-name`, and so on.
pub fn canonical_key(key: &str) -> Cow<'_, str> {
    match key {
        "karpenter.sh/capacity-type" => Cow::Borrowed(keys::CAPACITY_TYPE),
        "karpenter.sh/nodepool" => Cow::Borrowed(keys::NODEPOOL),
        "beta.kubernetes.io/instance-type" => Cow::Borrowed(keys::INSTANCE_TYPE),
        "failure-domain.beta.kubernetes.io/zone" => Cow::Borrowed(keys::ZONE),
        "failure-domain.beta.kubernetes.io/region" => Cow::Borrowed(keys::REGION),
        "beta.kubernetes.io/arch" => Cow::Borrowed(keys::ARCH),
        "beta.kubernetes.io/os" => Cow::Borrowed(keys::OS),
        // The EBS CSI driver's zone label: the node's zone.
        "topology.ebs.csi.aws.com/zone" => Cow::Borrowed(keys::ZONE),
        _ => match key.strip_prefix("karpenter.k8s.aws/") {
            Some(rest) if rest.starts_with("instance-") => Cow::Owned(format!("cooper.dev/{rest}")),
            _ => Cow::Borrowed(key),
        },
    }
}

/// The Karpenter names of the labels cooper puts on its nodes (`karpenter.sh/capacity-type`,
/// `karpenter.sh/nodepool`, `karpenter.k8s.aws/instance-*`): cooper's planner reads
/// those names as its own, and kube-scheduler matches a pod's selector against the Node's
/// labels literally, so a node that lacked them would refuse the pods planned onto it.
/// `instance-gpu-memory-total` is cooper's own and has no Karpenter name.
pub fn karpenter_aliases(labels: &Labels) -> Labels {
    let mut out = Labels::new();
    for (k, v) in labels {
        let alias = match k.as_str() {
            keys::CAPACITY_TYPE => Some("karpenter.sh/capacity-type".to_string()),
            keys::NODEPOOL => Some("karpenter.sh/nodepool".to_string()),
            keys::GPU_MEMORY_TOTAL => None,
            _ => k
                .strip_prefix("cooper.dev/instance-")
                .map(|rest| format!("karpenter.k8s.aws/instance-{rest}")),
        };
        if let Some(a) = alias {
            out.insert(a, v.clone());
        }
    }
    out
}

/// True for the keys whose values cooper derives from the offering itself.
pub fn is_well_known(key: &str) -> bool {
    key.starts_with("cooper.dev/instance-")
        || matches!(
            key,
            keys::INSTANCE_TYPE
                | keys::ZONE
                | keys::REGION
                | keys::ARCH
                | keys::OS
                | keys::CAPACITY_TYPE
                | keys::NODEPOOL
        )
}

/// A label-selector operator, as in `nodeAffinity` and Karpenter requirements.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
)]
pub enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
    Gt,
    Lt,
}

impl Operator {
    /// Parse the operator names Kubernetes uses; anything else is an error.
    pub fn parse(s: &str) -> Option<Operator> {
        Some(match s {
            "In" => Operator::In,
            "NotIn" => Operator::NotIn,
            "Exists" => Operator::Exists,
            "DoesNotExist" => Operator::DoesNotExist,
            "Gt" => Operator::Gt,
            "Lt" => Operator::Lt,
            _ => return None,
        })
    }
}

/// One `key operator values` requirement on a node's labels.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Requirement {
    pub key: String,
    pub operator: Operator,
    pub values: Vec<String>,
}

impl Requirement {
    /// A validated requirement; the key is canonicalised (see [`canonical_key`]).
    pub fn new(key: &str, operator: Operator, values: Vec<String>) -> Result<Self, String> {
        match operator {
            Operator::In | Operator::NotIn if values.is_empty() => {
                return Err(format!("operator {operator:?} needs at least one value"));
            }
            Operator::Exists | Operator::DoesNotExist if !values.is_empty() => {
                return Err(format!("operator {operator:?} takes no values"));
            }
            Operator::Gt | Operator::Lt
                if values.len() != 1 || values[0].parse::<i64>().is_err() =>
            {
                return Err(format!(
                    "operator {operator:?} needs exactly one integer value, got {values:?}"
                ));
            }
            _ => {}
        }
        if key.is_empty() {
            return Err("empty key".to_string());
        }
        Ok(Requirement {
            key: canonical_key(key).into_owned(),
            operator,
            values,
        })
    }

    /// Does a node with these labels satisfy the requirement?
    pub fn matches<L: LabelLookup + ?Sized>(&self, labels: &L) -> bool {
        let value = labels.label(&self.key);
        match self.operator {
            Operator::In => value.is_some_and(|v| self.values.iter().any(|x| x == v)),
            Operator::NotIn => value.is_none_or(|v| !self.values.iter().any(|x| x == v)),
            Operator::Exists => value.is_some(),
            Operator::DoesNotExist => value.is_none(),
            Operator::Gt | Operator::Lt => {
                let (Some(v), Some(bound)) = (
                    value.and_then(|v| v.parse::<i64>().ok()),
                    self.values.first().and_then(|b| b.parse::<i64>().ok()),
                ) else {
                    return false;
                };
                if self.operator == Operator::Gt {
                    v > bound
                } else {
                    v < bound
                }
            }
        }
    }
}

impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.operator {
            Operator::Exists | Operator::DoesNotExist => {
                write!(f, "{} {:?}", self.key, self.operator)
            }
            _ => write!(
                f,
                "{} {:?} [{}]",
                self.key,
                self.operator,
                self.values.join(",")
            ),
        }
    }
}

/// A node selector in the general form: any one term (OR) whose requirements all hold (AND).
/// An empty list of terms places no constraint.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeSelector {
    /// `spec.nodeSelector`, keys canonicalised.
    pub match_labels: Labels,
    /// `requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms`.
    pub terms: Vec<Vec<Requirement>>,
}

impl NodeSelector {
    /// Forget any pin to spot or on-demand (for "what if everything ran on-demand").
    pub fn drop_capacity_type(&mut self) {
        self.match_labels.remove(keys::CAPACITY_TYPE);
        for term in &mut self.terms {
            term.retain(|r| r.key != keys::CAPACITY_TYPE);
        }
    }

    /// Does a node with these labels satisfy the selector?
    pub fn matches<L: LabelLookup + ?Sized>(&self, labels: &L) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.label(k) == Some(v.as_str()))
            && (self.terms.is_empty()
                || self
                    .terms
                    .iter()
                    .any(|t| t.iter().all(|r| r.matches(labels))))
    }

    /// Why a node with these labels does not satisfy the selector, if it does not.
    pub fn first_mismatch<L: LabelLookup + ?Sized>(&self, labels: &L) -> Option<String> {
        for (k, v) in &self.match_labels {
            if labels.label(k) != Some(v.as_str()) {
                return Some(match labels.label(k) {
                    Some(actual) => format!("nodeSelector {k}={v} (node has {actual})"),
                    None => format!("nodeSelector {k}={v}"),
                });
            }
        }
        if self.terms.is_empty()
            || self
                .terms
                .iter()
                .any(|t| t.iter().all(|r| r.matches(labels)))
        {
            return None;
        }
        let failing: Vec<String> = self
            .terms
            .iter()
            .filter_map(|t| t.iter().find(|r| !r.matches(labels)).map(|r| r.to_string()))
            .collect();
        Some(format!("node affinity {}", failing.join(" or ")))
    }

    /// True when nothing is required.
    pub fn is_empty(&self) -> bool {
        self.match_labels.is_empty() && self.terms.is_empty()
    }

    /// Require `other` as well (terms are ORed, so AND is their cross product).
    pub fn and(&mut self, other: &NodeSelector) {
        self.match_labels.extend(other.match_labels.clone());
        if other.terms.is_empty() {
            return;
        }
        if self.terms.is_empty() {
            self.terms = other.terms.clone();
            return;
        }
        let mut terms = Vec::new();
        for a in &self.terms {
            for b in &other.terms {
                let mut t = a.clone();
                t.extend(b.iter().cloned());
                terms.push(t);
            }
        }
        self.terms = terms;
    }

    /// Require one more label requirement.
    pub fn require(&mut self, requirement: Requirement) {
        self.and(&NodeSelector {
            match_labels: Labels::new(),
            terms: vec![vec![requirement]],
        });
    }
}

/// What a taint does to pods that do not tolerate it.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
)]
pub enum TaintEffect {
    NoSchedule,
    PreferNoSchedule,
    NoExecute,
}

/// A node taint.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(deny_unknown_fields)]
pub struct Taint {
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    pub effect: TaintEffect,
}

impl fmt::Display for Taint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.value {
            Some(v) => write!(f, "{}={}:{:?}", self.key, v, self.effect),
            None => write!(f, "{}:{:?}", self.key, self.effect),
        }
    }
}

/// A pod's toleration of taints.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Toleration {
    /// Empty with `Exists` tolerates every taint.
    pub key: Option<String>,
    /// `Exists` when true, `Equal` otherwise.
    pub exists: bool,
    pub value: Option<String>,
    /// None tolerates every effect.
    pub effect: Option<TaintEffect>,
}

impl Toleration {
    /// kube-scheduler's `ToleratesTaint`.
    pub fn tolerates(&self, taint: &Taint) -> bool {
        if self.effect.is_some_and(|e| e != taint.effect) {
            return false;
        }
        match &self.key {
            None => self.exists,
            Some(k) if k != &taint.key => false,
            Some(_) if self.exists => true,
            Some(_) => self.value.as_deref().unwrap_or("") == taint.value.as_deref().unwrap_or(""),
        }
    }
}

/// The first NoSchedule/NoExecute taint that none of `tolerations` tolerates.
pub fn untolerated<'a>(tolerations: &[Toleration], taints: &'a [Taint]) -> Option<&'a Taint> {
    taints.iter().find(|t| {
        t.effect != TaintEffect::PreferNoSchedule && !tolerations.iter().any(|tol| tol.tolerates(t))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn operators_follow_kubernetes() {
        let l = labels(&[("zone", "a"), ("gpus", "4")]);
        let req = |k: &str, op, v: &[&str]| {
            Requirement::new(k, op, v.iter().map(|s| s.to_string()).collect()).unwrap()
        };
        assert!(req("zone", Operator::In, &["a", "b"]).matches(&l));
        assert!(!req("zone", Operator::NotIn, &["a"]).matches(&l));
        assert!(req("missing", Operator::NotIn, &["a"]).matches(&l));
        assert!(req("zone", Operator::Exists, &[]).matches(&l));
        assert!(req("missing", Operator::DoesNotExist, &[]).matches(&l));
        assert!(req("gpus", Operator::Gt, &["3"]).matches(&l));
        assert!(!req("gpus", Operator::Lt, &["4"]).matches(&l));
        assert!(
            !req("zone", Operator::Gt, &["1"]).matches(&l),
            "non-integer label"
        );
        assert!(Requirement::new("k", Operator::Gt, vec!["x".into()]).is_err());
        assert!(Requirement::new("k", Operator::In, vec![]).is_err());
        assert!(Requirement::new("k", Operator::Exists, vec!["a".into()]).is_err());
    }

    #[test]
    fn karpenter_keys_are_aliases() {
        assert_eq!(
            canonical_key("karpenter.sh/capacity-type"),
            keys::CAPACITY_TYPE
        );
        assert_eq!(
            canonical_key("karpenter.k8s.aws/instance-gpu-count"),
            keys::GPU_COUNT
        );
        assert_eq!(canonical_key("example.com/team"), "example.com/team");
    }

    #[test]
    fn tolerations_follow_kubernetes() {
        let taint = Taint {
            key: "aiml".into(),
            value: Some("true".into()),
            effect: TaintEffect::NoSchedule,
        };
        let equal = Toleration {
            key: Some("aiml".into()),
            exists: false,
            value: Some("true".into()),
            effect: Some(TaintEffect::NoSchedule),
        };
        assert!(equal.tolerates(&taint));
        let wrong_value = Toleration {
            value: Some("false".into()),
            ..equal.clone()
        };
        assert!(!wrong_value.tolerates(&taint));
        let wrong_effect = Toleration {
            effect: Some(TaintEffect::NoExecute),
            ..equal.clone()
        };
        assert!(!wrong_effect.tolerates(&taint));
        let everything = Toleration {
            key: None,
            exists: true,
            value: None,
            effect: None,
        };
        assert!(everything.tolerates(&taint));
        let soft = Taint {
            effect: TaintEffect::PreferNoSchedule,
            ..taint.clone()
        };
        assert_eq!(untolerated(&[], std::slice::from_ref(&soft)), None);
        assert_eq!(untolerated(&[], std::slice::from_ref(&taint)), Some(&taint));
    }

    #[test]
    fn selector_terms_are_ored() {
        let l = labels(&[("zone", "b")]);
        let sel = NodeSelector {
            match_labels: Labels::new(),
            terms: vec![
                vec![Requirement::new("zone", Operator::In, vec!["a".into()]).unwrap()],
                vec![Requirement::new("zone", Operator::In, vec!["b".into()]).unwrap()],
            ],
        };
        assert!(sel.matches(&l));
        let sel2 = NodeSelector {
            terms: vec![sel.terms[0].clone()],
            ..sel
        };
        assert_eq!(
            sel2.first_mismatch(&l).unwrap(),
            "node affinity zone In [a]"
        );
    }
}
