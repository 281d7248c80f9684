//! The live catalog: instance type facts from DescribeInstanceTypes (cached; they change
//! rarely), which zones offer each type from DescribeInstanceTypeOfferings, and the
//! latest spot price per type and zone from DescribeSpotPriceHistory. On-demand prices,
//! spot savings and interruption buckets come from the embedded catalog (the Pricing API
//! is not needed), so only types the embedded table prices are planned.
//!
//! A refresh that fails, or that would produce an empty catalog, changes nothing: the
//! last good catalog stays in use and the failure is counted and logged.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_ec2::types::LocationType;
use tracing::{Instrument, info, info_span, warn};

use super::{Ec2Cloud, sdk_error};
use crate::catalog::{Catalog, CatalogFile, InstanceTypeSpec};
use crate::cloud::CloudError;

/// How often each part is refreshed.
#[derive(Debug, Clone, Copy)]
pub struct RefreshSettings {
    /// Instance types and zone offerings (default 6 h).
    pub types_every: Duration,
    /// Spot prices (default 10 min).
    pub prices_every: Duration,
}

impl Default for RefreshSettings {
    fn default() -> Self {
        RefreshSettings {
            types_every: Duration::from_secs(6 * 3600),
            prices_every: Duration::from_secs(600),
        }
    }
}

/// Instance type facts as EC2 describes them, merged into the embedded specs.
#[derive(Debug, Clone)]
struct DescribedTypes {
    at: Instant,
    specs: Vec<InstanceTypeSpec>,
}

/// The live catalog's state between refreshes.
pub struct LiveCatalog {
    base: Arc<Catalog>,
    described: Option<DescribedTypes>,
    last_good: Arc<Catalog>,
}

impl LiveCatalog {
    /// Start from the embedded (or given) catalog, which stays in use until the first
    /// refresh succeeds.
    pub fn new(base: Arc<Catalog>) -> Self {
        LiveCatalog {
            last_good: base.clone(),
            base,
            described: None,
        }
    }

    /// The catalog to plan with now.
    pub fn current(&self) -> Arc<Catalog> {
        self.last_good.clone()
    }

    /// Refresh spot prices, and instance types when older than `types_every`. On
    /// success the new catalog becomes current; on failure the last good one stays.
    pub async fn refresh(
        &mut self,
        cloud: &Ec2Cloud,
        settings: &RefreshSettings,
    ) -> Result<Arc<Catalog>, CloudError> {
        let stale = self
            .described
            .as_ref()
            .is_none_or(|d| d.at.elapsed() >= settings.types_every);
        if stale {
            let specs = describe_types(cloud, &self.base)
                .instrument(info_span!("ec2.describe_instance_types"))
                .await?;
            self.described = Some(DescribedTypes {
                at: Instant::now(),
                specs,
            });
        }
        let Some(described) = &self.described else {
            return Err(CloudError::Transient("no instance types described".into()));
        };
        let prices = spot_prices(cloud)
            .instrument(info_span!("ec2.describe_spot_price_history"))
            .await?;
        let mut specs = described.specs.clone();
        let mut implausible = 0usize;
        for spec in &mut specs {
            let on_demand = spec.on_demand_price;
            if let Some(spot) = &mut spec.spot {
                spot.prices = spec
                    .zones
                    .iter()
                    .filter_map(|z| {
                        let price = *prices.get(&(spec.name.clone(), z.clone()))?;
                        let ok = plausible_spot_price(price, on_demand);
                        implausible += usize::from(!ok);
                        ok.then(|| (z.clone(), price))
                    })
                    .collect();
            }
        }
        if implausible > 0 {
            warn!(
                count = implausible,
                "spot prices outside 5-100% of on-demand ignored; those offerings use the typical saving"
            );
        }
        let catalog = build(&self.base, specs)?;
        info!(
            types = catalog.types.len(),
            offerings = catalog.offerings.len(),
            "catalog refreshed from EC2"
        );
        let catalog = Arc::new(catalog);
        self.last_good = catalog.clone();
        Ok(catalog)
    }
}

/// Is a reported spot price believable? Spot is never above on-demand, and a price
/// under 5% of it (a 95% saving) is a placeholder or a unit error, not a market price.
pub fn plausible_spot_price(price: f64, on_demand: f64) -> bool {
    price.is_finite() && price >= on_demand * 0.05 && price <= on_demand
}

/// Build a catalog from refreshed specs, refusing an empty one.
fn build(base: &Catalog, specs: Vec<InstanceTypeSpec>) -> Result<Catalog, CloudError> {
    if specs.is_empty() {
        return Err(CloudError::Transient(
            "EC2 described none of the catalog's instance types; keeping the last good catalog"
                .into(),
        ));
    }
    let mut catalog = Catalog::from_file(CatalogFile {
        api_version: "cooper.dev/v1alpha1".into(),
        kind: "Catalog".into(),
        region: base.region.clone(),
        allocatable: base.allocatable.clone(),
        node_costs: base.node_costs.clone(),
        instance_types: specs,
    })
    .map_err(|(field, message)| {
        CloudError::Transient(format!("refreshed catalog invalid at {field}: {message}"))
    })?;
    catalog.source = format!("EC2 {} (live)", base.region);
    Ok(catalog)
}

/// DescribeInstanceTypes (every page) and DescribeInstanceTypeOfferings by zone, merged
/// into the embedded specs: EC2's vCPU, memory, architecture, ENI limits, GPU and Neuron
/// counts win; prices and spot facts stay the embedded table's. Types EC2 does not offer
/// in any zone are dropped.
async fn describe_types(
    cloud: &Ec2Cloud,
    base: &Catalog,
) -> Result<Vec<InstanceTypeSpec>, CloudError> {
    let wanted: BTreeMap<&str, &InstanceTypeSpec> =
        base.types.iter().map(|t| (t.name(), &t.spec)).collect();
    let mut described: BTreeMap<String, InstanceTypeSpec> = BTreeMap::new();
    let mut token: Option<String> = None;
    loop {
        cloud.buckets.describe.acquire().await;
        let out = cloud
            .client
            .describe_instance_types()
            .set_next_token(token.clone())
            .send()
            .await
            .map_err(sdk_error)?;
        for info in out.instance_types() {
            let Some(name) = info.instance_type().map(|t| t.as_str()) else {
                continue;
            };
            let Some(base_spec) = wanted.get(name) else {
                continue;
            };
            described.insert(name.to_string(), merge(base_spec, info));
        }
        token = out.next_token().map(str::to_string);
        if token.is_none() {
            break;
        }
    }

    let mut zones: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut token: Option<String> = None;
    loop {
        cloud.buckets.describe.acquire().await;
        let out = cloud
            .client
            .describe_instance_type_offerings()
            .location_type(LocationType::AvailabilityZone)
            .set_next_token(token.clone())
            .send()
            .await
            .map_err(sdk_error)?;
        for o in out.instance_type_offerings() {
            if let (Some(t), Some(z)) = (o.instance_type(), o.location()) {
                zones
                    .entry(t.as_str().to_string())
                    .or_default()
                    .insert(z.to_string());
            }
        }
        token = out.next_token().map(str::to_string);
        if token.is_none() {
            break;
        }
    }

    let mut specs = Vec::new();
    let mut unoffered = Vec::new();
    for (name, mut spec) in described {
        match zones.get(&name) {
            Some(z) if !z.is_empty() => {
                spec.zones = z.iter().cloned().collect();
                spec.zones_assumed = false;
                specs.push(spec);
            }
            _ => unoffered.push(name),
        }
    }
    if !unoffered.is_empty() {
        warn!(
            count = unoffered.len(),
            types = %unoffered.join(","),
            "instance types described but offered in no zone; not planned"
        );
    }
    Ok(specs)
}

/// The embedded spec with EC2's facts over it.
fn merge(base: &InstanceTypeSpec, info: &aws_sdk_ec2::types::InstanceTypeInfo) -> InstanceTypeSpec {
    let mut spec = base.clone();
    if let Some(v) = info.v_cpu_info().and_then(|v| v.default_v_cpus()) {
        spec.vcpu = v.max(0) as u32;
    }
    if let Some(m) = info.memory_info().and_then(|m| m.size_in_mib()) {
        spec.memory_mib = m.max(0) as u64;
    }
    if let Some(arch) = info
        .processor_info()
        .and_then(|p| p.supported_architectures().first())
    {
        spec.architecture = match arch.as_str() {
            "arm64" => "arm64".into(),
            _ => "amd64".into(),
        };
    }
    if let Some(n) = info.network_info() {
        if let Some(m) = n.maximum_network_interfaces() {
            spec.max_network_interfaces = m.max(0) as u32;
        }
        if let Some(i) = n.ipv4_addresses_per_interface() {
            spec.ipv4_per_interface = i.max(0) as u32;
        }
    }
    if let (Some(gpu), Some(g)) = (&mut spec.gpu, info.gpu_info()) {
        let count: i32 = g.gpus().iter().filter_map(|d| d.count()).sum();
        if count > 0 {
            gpu.count = count as u32;
        }
    }
    if let (Some(neuron), Some(n)) = (&mut spec.neuron, info.neuron_info()) {
        let count: i32 = n.neuron_devices().iter().filter_map(|d| d.count()).sum();
        if count > 0 {
            neuron.count = count as u32;
        }
    }
    spec
}

/// The latest Linux spot price per (type, zone).
async fn spot_prices(cloud: &Ec2Cloud) -> Result<BTreeMap<(String, String), f64>, CloudError> {
    let mut latest: BTreeMap<(String, String), (i64, f64)> = BTreeMap::new();
    let mut token: Option<String> = None;
    let now = aws_sdk_ec2::primitives::DateTime::from(std::time::SystemTime::now());
    loop {
        cloud.buckets.describe.acquire().await;
        let out = cloud
            .client
            .describe_spot_price_history()
            .start_time(now)
            .product_descriptions("Linux/UNIX")
            .product_descriptions("Linux/UNIX (Amazon VPC)")
            .set_next_token(token.clone())
            .send()
            .await
            .map_err(sdk_error)?;
        for p in out.spot_price_history() {
            let (Some(t), Some(z), Some(price)) = (
                p.instance_type(),
                p.availability_zone(),
                p.spot_price().and_then(|s| s.parse::<f64>().ok()),
            ) else {
                continue;
            };
            if !(price.is_finite() && price > 0.0) {
                continue;
            }
            let at = p.timestamp().map(|t| t.secs()).unwrap_or(0);
            let key = (t.as_str().to_string(), z.to_string());
            if latest.get(&key).is_none_or(|(seen, _)| at >= *seen) {
                latest.insert(key, (at, price));
            }
        }
        token = out
            .next_token()
            .map(str::to_string)
            .filter(|t| !t.is_empty());
        if token.is_none() {
            break;
        }
    }
    Ok(latest.into_iter().map(|(k, (_, p))| (k, p)).collect())
}

/// Refresh on the settings' schedule until the process stops, publishing each good
/// catalog; failures keep the last good one and are reported through `on_failure`.
pub async fn refresh_loop(
    cloud: Arc<Ec2Cloud>,
    mut live: LiveCatalog,
    settings: RefreshSettings,
    publish: tokio::sync::watch::Sender<Arc<Catalog>>,
    on_failure: impl Fn(&CloudError) + Send,
) {
    loop {
        match live.refresh(&cloud, &settings).await {
            Ok(catalog) => {
                let _ = publish.send(catalog);
            }
            Err(e) => {
                warn!(error = %e, "catalog refresh failed; planning with the last good catalog");
                on_failure(&e);
            }
        }
        tokio::time::sleep(settings.prices_every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spot_prices_outside_the_market_range_are_not_believed() {
        assert!(plausible_spot_price(0.40, 1.006));
        assert!(plausible_spot_price(1.006, 1.006));
        assert!(!plausible_spot_price(1.2, 1.006), "above on-demand");
        assert!(!plausible_spot_price(0.00001, 1.006), "placeholder");
        assert!(!plausible_spot_price(f64::NAN, 1.0));
    }
}
