//! The instance catalog: what EC2 sells (instance type × zone × capacity type), what
//! it costs, and what a node of each type can actually hold once the kubelet and the
//! OS have taken their share.
//!
//! The default catalog is `config/catalog.yaml`, compiled into the binary. Users can
//! point at their own file of the same format.
//!
//! # Allocatable
//!
//! cooper computes a node's allocatable the way the EKS-optimised AMIs configure the
//! kubelet, so that a plan never counts on room the node will not have:
//!
//! * **max pods** = `interfaces × (IPv4 addresses per interface − 1) + 2` (VPC CNI
//!   without prefix delegation); e.g. inf1.xlarge `4 × 9 + 2 = 38`.
//! * **capacity memory** = reported memory × (1 − `vmMemoryOverheadPercent` / 100),
//!   rounded down to a MiB (the hypervisor's share; 7.5 % by default, as Karpenter).
//! * **kube-reserved CPU** = 6 % of the first core + 1 % of the second + 0.5 % of the
//!   third and fourth + 0.25 % of every further core (the EKS formula).
//! * **kube-reserved memory** = `11 MiB × max pods + 255 MiB`.
//! * **eviction threshold** = 100 MiB of memory, 10 % of ephemeral storage.
//! * **ephemeral storage** = the root volume (20 GiB by default) less 1 GiB kube-reserved.
//! * **allocatable** = capacity − kube-reserved − eviction threshold, per resource;
//!   GPUs (`nvidia.com/gpu`), Neuron devices (`aws.amazon.com/neuron`) and NeuronCores
//!   (`aws.amazon.com/neuroncore`) are allocatable in full.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::labels::{Labels, keys};
use crate::manifest::{self, ManifestError};
use crate::resources::{self, Resources};

const MIB: i64 = 1 << 20;
const GIB: i64 = 1 << 30;

/// The embedded default catalog (`config/catalog.yaml`).
pub const DEFAULT_CATALOG_YAML: &str = include_str!("../config/catalog.yaml");

/// Spot or on-demand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CapacityType {
    Spot,
    OnDemand,
}

impl CapacityType {
    /// The label value (`spot`, `on-demand`).
    pub fn as_str(self) -> &'static str {
        match self {
            CapacityType::Spot => "spot",
            CapacityType::OnDemand => "on-demand",
        }
    }
}

impl fmt::Display for CapacityType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// NVIDIA GPUs on an instance type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GpuSpec {
    pub count: u32,
    pub manufacturer: String,
    pub name: String,
    #[serde(rename = "memoryMiB")]
    pub memory_mib: u64,
}

/// AWS Neuron devices (Inferentia, Trainium) on an instance type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NeuronSpec {
    pub count: u32,
    pub name: String,
    pub cores: u32,
}

/// Spot market facts for a type (Spot Instance Advisor).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SpotSpec {
    /// Typical saving against on-demand, percent.
    pub savings_percent: f64,
    /// Interruption-frequency bucket, e.g. "<5%".
    pub interruption: String,
    /// Live spot prices by zone, when known (they override the saving).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub prices: BTreeMap<String, f64>,
}

/// One instance type as written in a catalog file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InstanceTypeSpec {
    pub name: String,
    pub vcpu: u32,
    #[serde(rename = "memoryMiB")]
    pub memory_mib: u64,
    pub architecture: String,
    pub max_network_interfaces: u32,
    pub ipv4_per_interface: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<GpuSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub neuron: Option<NeuronSpec>,
    pub on_demand_price: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spot: Option<SpotSpec>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub zones_assumed: bool,
    pub zones: Vec<String>,
}

/// Settings of the allocatable formula (see the module docs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AllocatableSettings {
    #[serde(default = "default_vm_overhead")]
    pub vm_memory_overhead_percent: f64,
    #[serde(default = "default_root_volume", rename = "rootVolumeGiB")]
    pub root_volume_gib: u32,
}

fn default_vm_overhead() -> f64 {
    7.5
}
fn default_root_volume() -> u32 {
    20
}

impl Default for AllocatableSettings {
    fn default() -> Self {
        Self {
            vm_memory_overhead_percent: default_vm_overhead(),
            root_volume_gib: default_root_volume(),
        }
    }
}

/// What a node costs beyond its instance, per unit, in the catalog's region: its EBS
/// volumes and a public IPv4 address. A 20 GiB gp3 root volume costs about $0.0022/h and
/// an address $0.005/h, the order of a small spot instance, so the planner prices them
/// with the node (see [`Catalog::node_charges`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeCostPrices {
    /// Where the prices come from and their date.
    pub source: String,
    /// USD per GiB-month, by EBS volume type (AWS bills 730 hours a month).
    #[serde(rename = "ebsPerGiBMonth")]
    pub ebs_per_gib_month: BTreeMap<String, f64>,
    /// USD per hour for a public IPv4 address.
    #[serde(rename = "publicIPv4PerHour")]
    pub public_ipv4_per_hour: f64,
}

/// Hours per month in AWS's per-GB-month prices.
pub const HOURS_PER_MONTH: f64 = 730.0;

impl Default for NodeCostPrices {
    /// us-east-1 list prices: EBS storage per GiB-month (unchanged since gp3's launch
    /// in December 2020; io1/io2 IOPS and gp3 throughput above the free baseline are
    /// not priced) and public IPv4 (charged since 2024-02-01).
    fn default() -> Self {
        NodeCostPrices {
            source: "AWS list prices, us-east-1: EBS storage per GiB-month (since 2020-12), public IPv4 per hour (since 2024-02-01)".into(),
            ebs_per_gib_month: [
                ("gp3", 0.08),
                ("gp2", 0.10),
                ("io1", 0.125),
                ("io2", 0.125),
                ("st1", 0.045),
                ("sc1", 0.015),
                ("standard", 0.05),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
            public_ipv4_per_hour: 0.005,
        }
    }
}

/// What each node of a NodePool carries that is billed per node besides the instance:
/// from its NodeClass (block devices, whether it gets a public address, a cost the user
/// adds), or the EKS AL2023 default (one 20 GiB gp3 root volume, no public address).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeBilling {
    /// EBS volumes: (type, GiB).
    pub volumes: Vec<(String, u32)>,
    pub public_ipv4: bool,
    /// USD per node-hour the user adds (licences, agents billed per node).
    pub extra_per_hour: f64,
}

impl Default for NodeBilling {
    fn default() -> Self {
        NodeBilling {
            volumes: vec![("gp3".into(), default_root_volume())],
            public_ipv4: false,
            extra_per_hour: 0.0,
        }
    }
}

/// A node's per-node charges in USD per hour, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct NodeCharges {
    pub volumes: f64,
    pub public_ipv4: f64,
    pub extra: f64,
}

impl NodeCharges {
    /// All of them.
    pub fn total(&self) -> f64 {
        self.volumes + self.public_ipv4 + self.extra
    }
}

/// A catalog file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CatalogFile {
    pub api_version: String,
    pub kind: String,
    pub region: String,
    #[serde(default)]
    pub allocatable: AllocatableSettings,
    /// Per-node prices (volumes, public IPv4); the us-east-1 list prices when absent.
    #[serde(default)]
    pub node_costs: NodeCostPrices,
    pub instance_types: Vec<InstanceTypeSpec>,
}

/// An instance type with everything the planner needs precomputed.
#[derive(Debug, Clone)]
pub struct InstanceType {
    pub spec: InstanceTypeSpec,
    pub family: String,
    pub size: String,
    pub category: String,
    pub generation: u32,
    pub max_pods: u32,
    /// What the node reports as capacity (NodePool limits count this).
    pub capacity: Resources,
    /// What pods can use: capacity less kube-reserved and eviction thresholds.
    pub allocatable: Resources,
    /// Labels derived from the type (not zone or capacity type).
    pub labels: Labels,
}

impl InstanceType {
    /// The type's name, e.g. `g5.xlarge`.
    pub fn name(&self) -> &str {
        &self.spec.name
    }
}

/// One thing that can be bought: a type in a zone with a capacity type, at a price.
#[derive(Debug, Clone, PartialEq)]
pub struct Offering {
    /// Index into [`Catalog::types`].
    pub type_index: usize,
    pub zone: String,
    pub capacity_type: CapacityType,
    /// USD per hour.
    pub price: f64,
    /// The labels a node launched from it carries (before NodePool labels); computed
    /// once here because the planner matches them for every offering on every plan.
    pub labels: Labels,
}

/// Where the embedded catalog's prices come from and when (its header says so too; a
/// test keeps the two in step).
pub const EMBEDDED_PRICES: &str = "embedded us-east-1; on-demand prices 2026-07-20 (AWS Pricing API), spot savings 2025-06-28 (Spot Instance Advisor)";

/// The catalog the planner prices against.
#[derive(Debug, Clone)]
pub struct Catalog {
    pub region: String,
    pub types: Vec<InstanceType>,
    pub offerings: Vec<Offering>,
    /// The allocatable formula's settings the types were built with (a live refresh
    /// rebuilds the catalog with the same ones).
    pub allocatable: AllocatableSettings,
    /// Where it came from, for reports: [`EMBEDDED_PRICES`] or a path.
    pub source: String,
    /// Per-node prices beyond the instance.
    pub node_costs: NodeCostPrices,
    /// Type name → (index in `types`, its offerings' range in `offerings`), built with
    /// the catalog: plans name nodes by type, zone and capacity type, and looking each
    /// up by scanning every offering made checking 8,000 nodes take seconds.
    by_name: std::collections::HashMap<String, (usize, std::ops::Range<usize>)>,
}

impl Catalog {
    /// The embedded default catalog.
    pub fn embedded() -> Result<Catalog, ManifestError> {
        let mut catalog = Self::from_yaml(
            Path::new("config/catalog.yaml (embedded)"),
            DEFAULT_CATALOG_YAML,
        )?;
        catalog.source = EMBEDDED_PRICES.to_string();
        Ok(catalog)
    }

    /// Load a user's catalog file.
    pub fn load(path: &Path) -> Result<Catalog, ManifestError> {
        let text = std::fs::read_to_string(path).map_err(|error| ManifestError::Read {
            file: path.to_path_buf(),
            error,
        })?;
        Self::from_yaml(path, &text)
    }

    /// Parse and validate a catalog file's text.
    pub fn from_yaml(path: &Path, text: &str) -> Result<Catalog, ManifestError> {
        let docs = manifest::parse_documents(path, text)?;
        let [doc] = docs.as_slice() else {
            return Err(ManifestError::Object {
                file: path.to_path_buf(),
                line: 1,
                object: "Catalog".into(),
                message: format!("expected exactly one document, found {}", docs.len()),
            });
        };
        let file: CatalogFile = doc.decode()?;
        if file.kind != "Catalog" {
            return Err(doc.field_error("kind", format!("expected Catalog, found {:?}", file.kind)));
        }
        let mut catalog =
            Self::from_file(file).map_err(|(path, message)| doc.field_error(path, message))?;
        catalog.source = path.display().to_string();
        Ok(catalog)
    }

    /// Build from a decoded file; errors are (field path, message).
    pub fn from_file(file: CatalogFile) -> Result<Catalog, (String, String)> {
        let mut types = Vec::new();
        let mut offerings = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        let allocatable = file.allocatable;
        let node_costs = file.node_costs;
        for (kind, price) in &node_costs.ebs_per_gib_month {
            if !(price.is_finite() && *price >= 0.0) {
                return Err((
                    format!("nodeCosts.ebsPerGiBMonth.{kind}"),
                    format!("{price} is not a price (a non-negative number)"),
                ));
            }
        }
        if !(node_costs.public_ipv4_per_hour.is_finite() && node_costs.public_ipv4_per_hour >= 0.0)
        {
            return Err((
                "nodeCosts.publicIPv4PerHour".into(),
                format!(
                    "{} is not a price (a non-negative number)",
                    node_costs.public_ipv4_per_hour
                ),
            ));
        }
        if !(0.0..100.0).contains(&allocatable.vm_memory_overhead_percent) {
            return Err((
                "allocatable.vmMemoryOverheadPercent".into(),
                format!(
                    "{} must be in [0, 100)",
                    allocatable.vm_memory_overhead_percent
                ),
            ));
        }
        for (i, spec) in file.instance_types.into_iter().enumerate() {
            let at = |field: &str| format!("instanceTypes[{i}].{field}");
            if !seen.insert(spec.name.clone()) {
                return Err((at("name"), format!("duplicate instance type {}", spec.name)));
            }
            if spec.vcpu == 0 || spec.memory_mib == 0 {
                return Err((
                    at("vcpu"),
                    format!("{}: vcpu and memoryMiB must be positive", spec.name),
                ));
            }
            if !(spec.on_demand_price.is_finite() && spec.on_demand_price > 0.0) {
                return Err((
                    at("onDemandPrice"),
                    format!("{}: must be a positive price", spec.name),
                ));
            }
            if spec.zones.is_empty() {
                return Err((at("zones"), format!("{}: no zones", spec.name)));
            }
            if let Some(spot) = &spec.spot
                && !(0.0..100.0).contains(&spot.savings_percent)
            {
                return Err((
                    at("spot.savingsPercent"),
                    format!("{}: must be in [0, 100)", spec.name),
                ));
            }
            if let Some(spot) = &spec.spot
                && let Some((zone, price)) = spot
                    .prices
                    .iter()
                    .find(|(_, p)| !(p.is_finite() && **p > 0.0))
            {
                return Err((
                    at(&format!("spot.prices.{zone}")),
                    format!("{}: {price} is not a positive price", spec.name),
                ));
            }
            let t = build_type(spec, &file.region, &allocatable).map_err(|m| (at("name"), m))?;
            let index = types.len();
            for zone in &t.spec.zones {
                offerings.push(Offering {
                    type_index: index,
                    zone: zone.clone(),
                    capacity_type: CapacityType::OnDemand,
                    price: t.spec.on_demand_price,
                    labels: offering_labels(&t, &file.region, zone, CapacityType::OnDemand),
                });
                if let Some(spot) = &t.spec.spot {
                    let price =
                        spot.prices.get(zone).copied().unwrap_or(
                            t.spec.on_demand_price * (1.0 - spot.savings_percent / 100.0),
                        );
                    offerings.push(Offering {
                        type_index: index,
                        zone: zone.clone(),
                        capacity_type: CapacityType::Spot,
                        price: (price * 1e6).round() / 1e6,
                        labels: offering_labels(&t, &file.region, zone, CapacityType::Spot),
                    });
                }
            }
            types.push(t);
        }
        let mut by_name = std::collections::HashMap::new();
        let mut start = 0;
        for (i, t) in types.iter().enumerate() {
            let end = start
                + offerings[start..]
                    .iter()
                    .take_while(|o| o.type_index == i)
                    .count();
            by_name.insert(t.name().to_string(), (i, start..end));
            start = end;
        }
        Ok(Catalog {
            region: file.region,
            types,
            offerings,
            allocatable,
            source: String::new(),
            node_costs,
            by_name,
        })
    }

    /// What a node billed like this costs per hour beyond its instance. A volume type
    /// the catalog has no price for is priced as its dearest type (never cheaper than it
    /// may be; NodeClass documents beside the pools are refused for one, and EC2 refuses
    /// a launch with a type it does not know).
    pub fn node_charges(&self, billing: &NodeBilling) -> NodeCharges {
        let prices = &self.node_costs.ebs_per_gib_month;
        let dearest = prices.values().copied().fold(0.0, f64::max);
        NodeCharges {
            volumes: billing
                .volumes
                .iter()
                .map(|(kind, gib)| {
                    prices.get(kind).copied().unwrap_or(dearest) * f64::from(*gib) / HOURS_PER_MONTH
                })
                .sum(),
            public_ipv4: if billing.public_ipv4 {
                self.node_costs.public_ipv4_per_hour
            } else {
                0.0
            },
            extra: billing.extra_per_hour,
        }
    }
    /// Every offering's price by (instance type, zone, capacity type): what a cloud
    /// records for an instance it launched.
    pub fn prices(&self) -> std::collections::BTreeMap<(String, String, CapacityType), f64> {
        self.offerings
            .iter()
            .map(|o| {
                (
                    (
                        self.types[o.type_index].name().to_string(),
                        o.zone.clone(),
                        o.capacity_type,
                    ),
                    o.price,
                )
            })
            .collect()
    }

    /// Look up a type by name.
    pub fn instance_type(&self, name: &str) -> Option<&InstanceType> {
        self.by_name.get(name).map(|(i, _)| &self.types[*i])
    }

    /// Every offering of `instance_type` (zones × capacity types).
    pub fn offerings_of(&self, instance_type: &str) -> &[Offering] {
        self.by_name
            .get(instance_type)
            .map_or(&[], |(_, range)| &self.offerings[range.clone()])
    }

    /// The offering of `instance_type` in `zone` with `capacity_type`, if the catalog
    /// has it.
    pub fn offering(
        &self,
        instance_type: &str,
        zone: &str,
        capacity_type: CapacityType,
    ) -> Option<&Offering> {
        let (_, range) = self.by_name.get(instance_type)?;
        self.offerings[range.clone()]
            .iter()
            .find(|o| o.zone == zone && o.capacity_type == capacity_type)
    }

    /// The distinct zones offered, sorted.
    pub fn zones(&self) -> Vec<String> {
        let mut z: Vec<String> = self.offerings.iter().map(|o| o.zone.clone()).collect();
        z.sort();
        z.dedup();
        z
    }

    /// The labels a node launched from `offering` carries (before NodePool labels).
    pub fn offering_labels<'c>(&self, offering: &'c Offering) -> &'c Labels {
        &offering.labels
    }

    /// The on-demand price of the offering's type, for "on-demand only" comparisons.
    pub fn on_demand_price(&self, offering: &Offering) -> f64 {
        self.types[offering.type_index].spec.on_demand_price
    }
}

fn offering_labels(
    t: &InstanceType,
    region: &str,
    zone: &str,
    capacity_type: CapacityType,
) -> Labels {
    let mut labels = t.labels.clone();
    labels.insert(keys::ZONE.into(), zone.to_string());
    labels.insert(keys::REGION.into(), region.to_string());
    labels.insert(keys::CAPACITY_TYPE.into(), capacity_type.as_str().into());
    labels
}

/// Max pods with the VPC CNI and no prefix delegation.
pub fn eni_max_pods(interfaces: u32, ipv4_per_interface: u32) -> u32 {
    interfaces * ipv4_per_interface.saturating_sub(1) + 2
}

/// kube-reserved CPU in millicores for `vcpu` cores, by the EKS formula.
pub fn kube_reserved_cpu_millis(vcpu: u32) -> i64 {
    // In tenths of a millicore: 600 for core 1, 100 for core 2, 50 each for cores 3-4,
    // 25 for each further core.
    let v = vcpu as i64;
    let tenths = 600 * v.min(1)
        + 100 * (v.min(2) - 1).max(0)
        + 50 * (v.min(4) - 2).max(0)
        + 25 * (v - 4).max(0);
    tenths / 10
}

/// kube-reserved memory in bytes: 11 MiB per pod plus 255 MiB.
pub fn kube_reserved_memory(max_pods: u32) -> i64 {
    (11 * max_pods as i64 + 255) * MIB
}

fn build_type(
    spec: InstanceTypeSpec,
    region: &str,
    settings: &AllocatableSettings,
) -> Result<InstanceType, String> {
    let (family, size) = spec
        .name
        .split_once('.')
        .map(|(f, s)| (f.to_string(), s.to_string()))
        .ok_or_else(|| format!("{}: expected FAMILY.SIZE", spec.name))?;
    let category: String = family
        .chars()
        .take_while(|c| c.is_ascii_alphabetic())
        .collect();
    let generation: u32 = family[category.len()..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect::<String>()
        .parse()
        .unwrap_or(0);
    let max_pods = eni_max_pods(spec.max_network_interfaces, spec.ipv4_per_interface);

    let memory = (spec.memory_mib as f64 * (1.0 - settings.vm_memory_overhead_percent / 100.0))
        .floor() as i64
        * MIB;
    let ephemeral = settings.root_volume_gib as i64 * GIB;
    let mut capacity = Resources::from_pairs([
        (resources::CPU, spec.vcpu as i64 * 1000),
        (resources::MEMORY, memory),
        (resources::EPHEMERAL_STORAGE, ephemeral),
        (resources::PODS, max_pods as i64),
    ]);
    if let Some(gpu) = &spec.gpu {
        capacity.set(resources::NVIDIA_GPU, gpu.count as i64);
    }
    if let Some(n) = &spec.neuron {
        capacity.set(resources::NEURON, n.count as i64);
        capacity.set(resources::NEURON_CORE, n.cores as i64);
    }
    let reserved = Resources::from_pairs([
        (resources::CPU, kube_reserved_cpu_millis(spec.vcpu)),
        (
            resources::MEMORY,
            kube_reserved_memory(max_pods) + 100 * MIB,
        ),
        (resources::EPHEMERAL_STORAGE, GIB + ephemeral / 10),
    ]);
    let allocatable = capacity.minus(&reserved);
    if let Some((name, _)) = allocatable.iter().find(|(_, v)| *v <= 0) {
        return Err(format!(
            "{}: no allocatable {name} left after kube-reserved",
            spec.name
        ));
    }

    let mut labels = Labels::new();
    let mut put = |k: &str, v: String| {
        labels.insert(k.to_string(), v);
    };
    put(keys::INSTANCE_TYPE, spec.name.clone());
    put(keys::ARCH, spec.architecture.clone());
    put(keys::OS, "linux".into());
    put(keys::REGION, region.to_string());
    put(keys::INSTANCE_FAMILY, family.clone());
    put(keys::INSTANCE_SIZE, size.clone());
    put(keys::INSTANCE_CATEGORY, category.clone());
    put(keys::INSTANCE_GENERATION, generation.to_string());
    put(keys::INSTANCE_CPU, spec.vcpu.to_string());
    put(keys::INSTANCE_MEMORY, spec.memory_mib.to_string());
    if let Some(gpu) = &spec.gpu {
        put(keys::GPU_NAME, gpu.name.clone());
        put(keys::GPU_COUNT, gpu.count.to_string());
        put(keys::GPU_MANUFACTURER, gpu.manufacturer.clone());
        put(keys::GPU_MEMORY, gpu.memory_mib.to_string());
        put(
            keys::GPU_MEMORY_TOTAL,
            (gpu.memory_mib * gpu.count as u64).to_string(),
        );
    }
    if let Some(n) = &spec.neuron {
        put(keys::ACCELERATOR_NAME, n.name.clone());
        put(keys::ACCELERATOR_COUNT, n.count.to_string());
        put(keys::ACCELERATOR_MANUFACTURER, "aws".into());
    }
    Ok(InstanceType {
        spec,
        family,
        size,
        category,
        generation,
        max_pods,
        capacity,
        allocatable,
        labels,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_catalog_loads_with_all_families() {
        let c = Catalog::embedded().unwrap();
        assert_eq!(c.region, "us-east-1");
        for fam in [
            "m5", "m6i", "m7i", "c5", "c6i", "c7i", "r5", "r6i", "t3", "g4dn", "g5", "g6", "p3",
            "p4d", "p5", "inf1", "inf2", "trn1",
        ] {
            assert!(
                c.types.iter().any(|t| t.family == fam),
                "family {fam} missing"
            );
        }
        assert!(
            c.offerings
                .iter()
                .any(|o| o.capacity_type == CapacityType::Spot)
        );
    }

    #[test]
    fn allocatable_follows_the_eks_formula() {
        let c = Catalog::embedded().unwrap();
        let inf1 = c.instance_type("inf1.xlarge").unwrap();
        assert_eq!(inf1.max_pods, 38);
        // 4 vCPU: 60 + 10 + 5 + 5 = 80m reserved.
        assert_eq!(inf1.allocatable.get(resources::CPU), 3920);
        // 8192 MiB * 0.925 = 7577 MiB; less 11*38+255 = 673 MiB and 100 MiB eviction.
        assert_eq!(
            inf1.allocatable.get(resources::MEMORY),
            (7577 - 673 - 100) * MIB
        );
        assert_eq!(inf1.allocatable.get(resources::NEURON), 1);
        assert_eq!(inf1.allocatable.get(resources::NEURON_CORE), 4);
        assert_eq!(inf1.allocatable.get(resources::PODS), 38);
        let g5 = c.instance_type("g5.xlarge").unwrap();
        assert_eq!(g5.max_pods, 58);
        assert_eq!(g5.allocatable.get(resources::NVIDIA_GPU), 1);
        assert_eq!(g5.labels[keys::GPU_NAME], "a10g");
        assert_eq!(kube_reserved_cpu_millis(1), 60);
        assert_eq!(kube_reserved_cpu_millis(2), 70);
        assert_eq!(kube_reserved_cpu_millis(8), 90);
        assert_eq!(kube_reserved_cpu_millis(96), 310);
    }

    #[test]
    fn spot_price_comes_from_the_saving() {
        let c = Catalog::embedded().unwrap();
        let t = c
            .types
            .iter()
            .position(|t| t.name() == "inf1.xlarge")
            .unwrap();
        let spot = c
            .offerings
            .iter()
            .find(|o| o.type_index == t && o.capacity_type == CapacityType::Spot)
            .unwrap();
        assert!((spot.price - 0.228 * 0.28).abs() < 1e-6, "{}", spot.price);
    }

    #[test]
    fn bad_catalog_names_the_field() {
        let text = "apiVersion: cooper.dev/v1alpha1\nkind: Catalog\nregion: r\ninstanceTypes:\n- name: x.large\n  vcpu: 2\n  memoryMiB: 4096\n  architecture: amd64\n  maxNetworkInterfaces: 2\n  ipv4PerInterface: 4\n  onDemandPrice: -1\n  zones: [a]\n";
        let err = Catalog::from_yaml(Path::new("c.yaml"), text)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("c.yaml") && err.contains("instanceTypes[0].onDemandPrice"),
            "{err}"
        );
        let unknown = text.replace("zones: [a]", "zones: [a]\n  colour: red");
        let err = Catalog::from_yaml(Path::new("c.yaml"), &unknown)
            .unwrap_err()
            .to_string();
        assert!(err.contains("colour"), "{err}");
    }
}
