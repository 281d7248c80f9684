//! Resource lists in integer units, keyed by Kubernetes resource name.
//!
//! `Resources` is the sparse form used at the edges (pods, nodes, limits). The
//! planner turns it into dense vectors over the resources actually in play.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Serialize, Serializer};

use crate::quantity::{QuantityError, Unit, format_quantity, parse_quantity};

/// CPU, held in millicores.
pub const CPU: &str = "cpu";
/// Memory, in bytes.
pub const MEMORY: &str = "memory";
/// Local ephemeral storage, in bytes.
pub const EPHEMERAL_STORAGE: &str = "ephemeral-storage";
/// The pod-count resource every node advertises (its max pods).
pub const PODS: &str = "pods";
/// NVIDIA GPUs, advertised by the NVIDIA device plugin.
pub const NVIDIA_GPU: &str = "nvidia.com/gpu";
/// AWS Inferentia/Trainium devices, advertised by the Neuron device plugin.
pub const NEURON: &str = "aws.amazon.com/neuron";
/// NeuronCores, also advertised by the Neuron device plugin.
pub const NEURON_CORE: &str = "aws.amazon.com/neuroncore";

/// The unit a resource's integer amount is held in.
pub fn unit_of(name: &str) -> Unit {
    if name == CPU { Unit::Milli } else { Unit::Base }
}

/// Parse one quantity for the named resource.
pub fn parse_resource(name: &str, quantity: &str) -> Result<i64, QuantityError> {
    if is_extended(name) {
        // The API server refuses fractional extended resources (half a GPU is a
        // time-slicing or MIG setting, not a request); so does cooper, rather than
        // rounding up.
        let milli = parse_quantity(quantity, Unit::Milli)?;
        if milli % 1000 != 0 {
            return Err(QuantityError::Fractional(quantity.to_string()));
        }
        return Ok(milli / 1000);
    }
    parse_quantity(quantity, unit_of(name))
}

/// An extended resource (a device plugin's, like `nvidia.com/gpu`): a domain-prefixed
/// name outside `kubernetes.io`. Their quantities must be whole.
pub fn is_extended(name: &str) -> bool {
    match name.split_once('/') {
        Some((domain, _)) => domain != "kubernetes.io" && !domain.ends_with(".kubernetes.io"),
        None => false,
    }
}

/// A set of resource amounts (e.g. a pod's requests or a node's allocatable).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Resources(BTreeMap<String, i64>);

impl Resources {
    /// An empty list.
    pub fn new() -> Self {
        Self::default()
    }

    /// Build from (name, amount) pairs; zero amounts are dropped.
    pub fn from_pairs<I, S>(pairs: I) -> Self
    where
        I: IntoIterator<Item = (S, i64)>,
        S: Into<String>,
    {
        let mut r = Self::new();
        for (k, v) in pairs {
            r.set(k, v);
        }
        r
    }

    /// The amount of `name`, zero when absent.
    pub fn get(&self, name: &str) -> i64 {
        self.0.get(name).copied().unwrap_or(0)
    }

    /// Set `name` to `value`; zero removes it.
    pub fn set(&mut self, name: impl Into<String>, value: i64) {
        let name = name.into();
        if value == 0 {
            self.0.remove(&name);
        } else {
            self.0.insert(name, value);
        }
    }

    /// Add `value` to `name` (in place: sums over thousands of pods stay cheap).
    pub fn add(&mut self, name: &str, value: i64) {
        match self.0.get_mut(name) {
            Some(v) => {
                *v = v.saturating_add(value);
                if *v == 0 {
                    self.0.remove(name);
                }
            }
            None if value != 0 => {
                self.0.insert(name.to_string(), value);
            }
            None => {}
        }
    }

    /// Element-wise sum in place.
    pub fn add_all(&mut self, other: &Resources) {
        for (k, v) in &other.0 {
            self.add(k, *v);
        }
    }

    /// Element-wise sum.
    pub fn plus(&self, other: &Resources) -> Resources {
        let mut out = self.clone();
        for (k, v) in &other.0 {
            out.add(k, *v);
        }
        out
    }

    /// Element-wise difference (may go negative).
    pub fn minus(&self, other: &Resources) -> Resources {
        let mut out = self.clone();
        for (k, v) in &other.0 {
            out.add(k, -*v);
        }
        out
    }

    /// Element-wise maximum.
    pub fn elementwise_max(&self, other: &Resources) -> Resources {
        let mut out = self.clone();
        for (k, v) in &other.0 {
            if *v > out.get(k) {
                out.set(k.clone(), *v);
            }
        }
        out
    }

    /// Multiply every amount by `n`.
    pub fn times(&self, n: i64) -> Resources {
        Resources(
            self.0
                .iter()
                .map(|(k, v)| (k.clone(), v.saturating_mul(n)))
                .collect(),
        )
    }

    /// True when every amount in `self` is at most the same amount in `capacity`.
    pub fn fits_in(&self, capacity: &Resources) -> bool {
        self.0.iter().all(|(k, v)| *v <= capacity.get(k))
    }

    /// True when these requests fit in what `capacity` has left after `used`, without
    /// building the sum (the kube-scheduler model checks this for every pod and node).
    pub fn fits_beside(&self, used: &Resources, capacity: &Resources) -> bool {
        self.0
            .iter()
            .all(|(k, v)| used.get(k).saturating_add(*v) <= capacity.get(k))
    }

    /// The first resource (by name) where `self` exceeds `capacity`.
    pub fn first_excess(&self, capacity: &Resources) -> Option<(&str, i64, i64)> {
        self.0
            .iter()
            .find(|(k, v)| **v > capacity.get(k))
            .map(|(k, v)| (k.as_str(), *v, capacity.get(k)))
    }

    /// Resource names present.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }

    /// (name, amount) pairs, sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, i64)> {
        self.0.iter().map(|(k, v)| (k.as_str(), *v))
    }

    /// True when nothing is requested.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Human-readable quantities, e.g. `{"cpu": "3920m", "memory": "14Gi"}`.
    pub fn to_quantities(&self) -> BTreeMap<String, String> {
        self.0
            .iter()
            .map(|(k, v)| (k.clone(), format_quantity(*v, unit_of(k))))
            .collect()
    }
}

impl Serialize for Resources {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.to_quantities().serialize(serializer)
    }
}

impl fmt::Display for Resources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .to_quantities()
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        write!(f, "{}", parts.join(","))
    }
}

/// Format an amount for people: CPU in cores with up to two decimals, bytes in the
/// largest binary unit with one decimal ("702.1Gi"), counts as they are.
pub fn format_human(name: &str, value: i64) -> String {
    match name {
        CPU => {
            let cores = value as f64 / 1000.0;
            let s = format!("{cores:.2}");
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        }
        MEMORY | EPHEMERAL_STORAGE => {
            for (suffix, shift) in [("Ti", 40), ("Gi", 30), ("Mi", 20), ("Ki", 10)] {
                let unit = (1i64 << shift) as f64;
                if value.abs() as f64 >= unit {
                    let s = format!("{:.1}", value as f64 / unit);
                    return format!("{}{suffix}", s.trim_end_matches('0').trim_end_matches('.'));
                }
            }
            value.to_string()
        }
        _ => value.to_string(),
    }
}

/// Format one amount of the named resource as a quantity.
pub fn format_resource(name: &str, value: i64) -> String {
    format_quantity(value, unit_of(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_and_fit() {
        let a = Resources::from_pairs([(CPU, 1500), (MEMORY, 1 << 30)]);
        let b = Resources::from_pairs([(CPU, 500), (NVIDIA_GPU, 1)]);
        let sum = a.plus(&b);
        assert_eq!(sum.get(CPU), 2000);
        assert_eq!(sum.get(NVIDIA_GPU), 1);
        assert!(a.fits_in(&sum));
        assert!(!sum.fits_in(&a));
        assert_eq!(sum.first_excess(&a), Some((CPU, 2000, 1500)));
        assert_eq!(b.first_excess(&a), Some((NVIDIA_GPU, 1, 0)));
        assert_eq!(sum.minus(&b), a);
        assert_eq!(a.to_string(), "cpu=1500m,memory=1Gi");
        assert_eq!(format_human(CPU, 191_450), "191.45");
        assert_eq!(format_human(CPU, 4000), "4");
        assert_eq!(format_human(MEMORY, 718_987 << 20), "702.1Gi");
        assert_eq!(format_human(MEMORY, 300 << 30), "300Gi");
    }
}
