//! The EC2 implementation of [`CloudProvider`]: launches a claim's instance with
//! `CreateFleet` (type `instant`, one override per allowed offering of the preferred
//! capacity type, `price-capacity-optimized` for spot and `lowest-price` for on-demand),
//! tags everything it launches as the cluster's and cooper's, and terminates only
//! instances carrying those tags.
//!
//! Credentials and region come from aws-config's default chain (environment, profile,
//! web identity / IRSA, instance metadata); the endpoint is overridable so tests reach a
//! local moto server. TLS uses rustls with ring (no C toolchain needed to build).

use std::collections::BTreeMap;

use aws_sdk_ec2::Client;
use aws_sdk_ec2::types::{
    DefaultTargetCapacityType, Filter, FleetLaunchTemplateConfigRequest,
    FleetLaunchTemplateOverridesRequest, FleetLaunchTemplateSpecificationRequest, FleetType,
    InstanceType, OnDemandOptionsRequest, RequestLaunchTemplateData, ResourceType,
    SpotAllocationStrategy, SpotOptionsRequest, Tag, TagSpecification,
    TargetCapacitySpecificationRequest,
};
use tracing::{Instrument, info, info_span, warn};

use crate::catalog::CapacityType;
use crate::cloud::{CloudError, CloudProvider, Instance, LaunchRequest};

/// Tag: the cluster an instance belongs to.
pub const CLUSTER_TAG: &str = "cooper.dev/cluster";
/// Tag: who manages it (`cooper`).
pub const MANAGED_BY_TAG: &str = "cooper.dev/managed-by";
/// Tag: the NodeClaim it was launched for.
pub const NODECLAIM_TAG: &str = "cooper.dev/nodeclaim";
/// Tag: the NodePool.
pub const NODEPOOL_TAG: &str = "cooper.dev/nodepool";
/// Most overrides sent in one fleet request.
pub const MAX_OVERRIDES: usize = 20;

/// Where and how to launch.
#[derive(Debug, Clone)]
pub struct Ec2Settings {
    pub cluster: String,
    /// Region (default: from the environment / profile).
    pub region: Option<String>,
    /// Endpoint override, e.g. a local moto server (default: `AWS_ENDPOINT_URL` or AWS).
    pub endpoint: Option<String>,
    /// Subnet per zone (from the NodeClass's resolved subnets).
    pub subnets: BTreeMap<String, String>,
    /// The AMI to boot (from the NodeClass's resolved AMIs).
    pub image_id: String,
    pub security_groups: Vec<String>,
    /// Extra tags on instances (the NodeClass's).
    pub tags: BTreeMap<String, String>,
    /// Fixed credentials instead of the default chain (for a local endpoint in tests).
    pub static_credentials: Option<(String, String)>,
}

/// EC2 through aws-sdk-ec2.
pub struct Ec2Cloud {
    client: Client,
    settings: Ec2Settings,
    /// Catalog prices, to record what a launched instance costs.
    prices: BTreeMap<(String, String, CapacityType), f64>,
}

fn transient_or_permanent(
    e: impl std::fmt::Display + std::fmt::Debug,
    code: Option<&str>,
) -> CloudError {
    let text = format!("{e}: {e:?}");
    match code {
        Some(c)
            if c.contains("Throttl")
                || c.contains("RequestLimitExceeded")
                || c.contains("ServiceUnavailable")
                || c.contains("InternalError") =>
        {
            CloudError::Transient(format!("{c}: {text}"))
        }
        Some(c) => CloudError::Permanent(format!("{c}: {text}")),
        None => CloudError::Transient(text),
    }
}

/// Fleet error codes that mean "no capacity for this offering right now".
pub fn is_capacity_error(code: &str) -> bool {
    matches!(
        code,
        "InsufficientInstanceCapacity"
            | "InsufficientCapacity"
            | "UnfulfillableCapacity"
            | "MaxSpotInstanceCountExceeded"
            | "SpotMaxPriceTooLow"
            | "InsufficientHostCapacity"
    )
}

impl Ec2Cloud {
    /// Connect with the default credential chain.
    pub async fn connect(settings: Ec2Settings) -> Ec2Cloud {
        use aws_smithy_http_client::tls;
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(
                tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let mut loader =
            aws_config::defaults(aws_config::BehaviorVersion::latest()).http_client(http);
        if let Some(region) = &settings.region {
            loader = loader.region(aws_config::Region::new(region.clone()));
        }
        if let Some(endpoint) = &settings.endpoint {
            loader = loader.endpoint_url(endpoint.clone());
        }
        if let Some((key, secret)) = &settings.static_credentials {
            loader = loader.credentials_provider(aws_sdk_ec2::config::Credentials::new(
                key, secret, None, None, "static",
            ));
        }
        let config = loader.load().await;
        Ec2Cloud {
            client: Client::new(&config),
            settings,
            prices: BTreeMap::new(),
        }
    }

    /// Price launched instances from this catalog.
    pub fn with_prices(mut self, catalog: &crate::catalog::Catalog) -> Self {
        self.prices = catalog
            .offerings
            .iter()
            .map(|o| {
                (
                    (
                        catalog.types[o.type_index].name().to_string(),
                        o.zone.clone(),
                        o.capacity_type,
                    ),
                    o.price,
                )
            })
            .collect();
        self
    }

    /// The underlying client (tests use it to inspect what was launched).
    pub fn client(&self) -> &Client {
        &self.client
    }

    fn ownership_tags(&self, request: &LaunchRequest) -> Vec<Tag> {
        let mut tags: BTreeMap<String, String> = self.settings.tags.clone();
        tags.insert(CLUSTER_TAG.into(), self.settings.cluster.clone());
        tags.insert(MANAGED_BY_TAG.into(), "cooper".into());
        tags.insert(NODECLAIM_TAG.into(), request.claim.clone());
        tags.insert(NODEPOOL_TAG.into(), request.nodepool.clone());
        tags.insert(
            "Name".into(),
            format!("{}/{}", self.settings.cluster, request.claim),
        );
        tags.into_iter()
            .map(|(k, v)| Tag::builder().key(k).value(v).build())
            .collect()
    }

    /// The launch template for this cluster's settings, created on first use.
    async fn launch_template(&self) -> Result<String, CloudError> {
        let name = format!(
            "cooper-{}-{}",
            self.settings.cluster, &self.settings.image_id
        );
        let found = self
            .client
            .describe_launch_templates()
            .filters(
                Filter::builder()
                    .name("launch-template-name")
                    .values(&name)
                    .build(),
            )
            .send()
            .await;
        if let Ok(out) = &found
            && let Some(id) = out
                .launch_templates()
                .first()
                .and_then(|t| t.launch_template_id())
        {
            return Ok(id.to_string());
        }
        let mut data = RequestLaunchTemplateData::builder().image_id(&self.settings.image_id);
        for sg in &self.settings.security_groups {
            data = data.security_group_ids(sg);
        }
        let out = self
            .client
            .create_launch_template()
            .launch_template_name(&name)
            .launch_template_data(data.build())
            .send()
            .await
            .map_err(|e| {
                let code = e
                    .as_service_error()
                    .and_then(|s| aws_sdk_ec2::error::ProvideErrorMetadata::code(s))
                    .map(str::to_string);
                transient_or_permanent(e, code.as_deref())
            })?;
        out.launch_template()
            .and_then(|t| t.launch_template_id())
            .map(str::to_string)
            .ok_or_else(|| CloudError::Permanent("CreateLaunchTemplate returned no ID".into()))
    }

    /// Instances of this cluster (optionally only one claim's), pending or running.
    async fn describe(
        &self,
        claim: Option<&str>,
        ids: &[String],
    ) -> Result<Vec<aws_sdk_ec2::types::Instance>, CloudError> {
        let mut req = self.client.describe_instances();
        if ids.is_empty() {
            req = req
                .filters(
                    Filter::builder()
                        .name(format!("tag:{CLUSTER_TAG}"))
                        .values(&self.settings.cluster)
                        .build(),
                )
                .filters(
                    Filter::builder()
                        .name("instance-state-name")
                        .values("pending")
                        .values("running")
                        .build(),
                );
            if let Some(c) = claim {
                req = req.filters(
                    Filter::builder()
                        .name(format!("tag:{NODECLAIM_TAG}"))
                        .values(c)
                        .build(),
                );
            }
        } else {
            for id in ids {
                req = req.instance_ids(id);
            }
        }
        let out = req.send().await.map_err(|e| {
            let code = e
                .as_service_error()
                .and_then(|s| aws_sdk_ec2::error::ProvideErrorMetadata::code(s))
                .map(str::to_string);
            if code.as_deref() == Some("InvalidInstanceID.NotFound") {
                return CloudError::NotFound(ids.join(","));
            }
            transient_or_permanent(e, code.as_deref())
        })?;
        Ok(out
            .reservations()
            .iter()
            .flat_map(|r| r.instances().iter().cloned())
            .collect())
    }

    fn to_instance(&self, i: &aws_sdk_ec2::types::Instance) -> Instance {
        let tag = |k: &str| {
            i.tags()
                .iter()
                .find(|t| t.key() == Some(k))
                .and_then(|t| t.value())
                .unwrap_or_default()
                .to_string()
        };
        let instance_type = i
            .instance_type()
            .map(|t| t.as_str().to_string())
            .unwrap_or_default();
        let zone = i
            .placement()
            .and_then(|p| p.availability_zone())
            .unwrap_or_default()
            .to_string();
        let capacity_type =
            if i.instance_lifecycle() == Some(&aws_sdk_ec2::types::InstanceLifecycleType::Spot) {
                CapacityType::Spot
            } else {
                CapacityType::OnDemand
            };
        let price = self
            .prices
            .get(&(instance_type.clone(), zone.clone(), capacity_type))
            .copied()
            .unwrap_or(0.0);
        Instance {
            id: i.instance_id().unwrap_or_default().to_string(),
            claim: tag(NODECLAIM_TAG),
            nodepool: tag(NODEPOOL_TAG),
            instance_type,
            zone,
            capacity_type,
            price_per_hour: price,
        }
    }

    async fn create_inner(&self, request: &LaunchRequest) -> Result<Instance, CloudError> {
        // Idempotent on the claim: a restart between launch and recording finds it here.
        if let Some(existing) = self.describe(Some(&request.claim), &[]).await?.first() {
            return Ok(self.to_instance(existing));
        }
        let Some(first) = request.offerings.first() else {
            return Err(CloudError::Permanent("no offerings to launch".into()));
        };
        let capacity_type = first.2;
        let template = self.launch_template().await?;
        let mut overrides = Vec::new();
        for (t, zone, _) in request
            .offerings
            .iter()
            .filter(|o| o.2 == capacity_type)
            .take(MAX_OVERRIDES)
        {
            let Some(subnet) = self.settings.subnets.get(zone) else {
                continue;
            };
            overrides.push(
                FleetLaunchTemplateOverridesRequest::builder()
                    .instance_type(InstanceType::from(t.as_str()))
                    .subnet_id(subnet)
                    .availability_zone(zone)
                    .build(),
            );
        }
        if overrides.is_empty() {
            return Err(CloudError::Permanent(format!(
                "no subnet for any zone of {:?}",
                request.offerings
            )));
        }
        let (default_type, spot, on_demand) = match capacity_type {
            CapacityType::Spot => (
                DefaultTargetCapacityType::Spot,
                Some(
                    SpotOptionsRequest::builder()
                        .allocation_strategy(SpotAllocationStrategy::PriceCapacityOptimized)
                        .build(),
                ),
                None,
            ),
            CapacityType::OnDemand => (
                DefaultTargetCapacityType::OnDemand,
                None,
                Some(
                    OnDemandOptionsRequest::builder()
                        .allocation_strategy(
                            aws_sdk_ec2::types::FleetOnDemandAllocationStrategy::LowestPrice,
                        )
                        .build(),
                ),
            ),
        };
        let tags = self.ownership_tags(request);
        let out = self
            .client
            .create_fleet()
            .r#type(FleetType::Instant)
            .launch_template_configs(
                FleetLaunchTemplateConfigRequest::builder()
                    .launch_template_specification(
                        FleetLaunchTemplateSpecificationRequest::builder()
                            .launch_template_id(template)
                            .version("$Latest")
                            .build(),
                    )
                    .set_overrides(Some(overrides))
                    .build(),
            )
            .target_capacity_specification(
                TargetCapacitySpecificationRequest::builder()
                    .total_target_capacity(1)
                    .default_target_capacity_type(default_type)
                    .build(),
            )
            .set_spot_options(spot)
            .set_on_demand_options(on_demand)
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::Instance)
                    .set_tags(Some(tags.clone()))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| {
                let code = e
                    .as_service_error()
                    .and_then(|s| aws_sdk_ec2::error::ProvideErrorMetadata::code(s))
                    .map(str::to_string);
                transient_or_permanent(e, code.as_deref())
            })?;
        let Some(id) = out
            .instances()
            .iter()
            .flat_map(|i| i.instance_ids())
            .next()
            .cloned()
        else {
            let codes: Vec<&str> = out.errors().iter().filter_map(|e| e.error_code()).collect();
            if codes.iter().any(|c| is_capacity_error(c)) || codes.is_empty() {
                return Err(CloudError::InsufficientCapacity {
                    offerings: request
                        .offerings
                        .iter()
                        .filter(|o| o.2 == capacity_type)
                        .cloned()
                        .collect(),
                });
            }
            let messages: Vec<String> = out
                .errors()
                .iter()
                .map(|e| {
                    format!(
                        "{}: {}",
                        e.error_code().unwrap_or("?"),
                        e.error_message().unwrap_or("")
                    )
                })
                .collect();
            return Err(CloudError::Permanent(messages.join("; ")));
        };
        // Tag explicitly too (CreateFleet's instance tag specification is not honoured by
        // every implementation), so ownership checks never miss an instance.
        self.client
            .create_tags()
            .resources(&id)
            .set_tags(Some(tags))
            .send()
            .await
            .map_err(|e| transient_or_permanent(e, None))?;
        let described = self.describe(None, std::slice::from_ref(&id)).await?;
        let Some(i) = described.first() else {
            return Err(CloudError::Transient(format!(
                "launched {id} but cannot describe it yet"
            )));
        };
        let mut instance = self.to_instance(i);
        // The fleet's capacity type is what was asked for (moto does not report spot
        // lifecycle on instant fleets).
        instance.capacity_type = capacity_type;
        instance.price_per_hour = self
            .prices
            .get(&(
                instance.instance_type.clone(),
                instance.zone.clone(),
                capacity_type,
            ))
            .copied()
            .unwrap_or(0.0);
        info!(instance = %instance.id, instance_type = %instance.instance_type, zone = %instance.zone, "ec2 instance launched");
        Ok(instance)
    }

    async fn terminate_inner(&self, instance_id: &str) -> Result<(), CloudError> {
        let found = self.describe(None, &[instance_id.to_string()]).await?;
        let Some(i) = found.first() else {
            return Err(CloudError::NotFound(instance_id.to_string()));
        };
        let tag = |k: &str| {
            i.tags()
                .iter()
                .find(|t| t.key() == Some(k))
                .and_then(|t| t.value())
                .map(str::to_string)
        };
        if tag(CLUSTER_TAG).as_deref() != Some(self.settings.cluster.as_str())
            || tag(MANAGED_BY_TAG).as_deref() != Some("cooper")
        {
            warn!(
                instance = instance_id,
                "refusing to terminate an instance cooper did not launch for this cluster"
            );
            return Err(CloudError::Permanent(format!(
                "refusing to terminate {instance_id}: not tagged {CLUSTER_TAG}={} and {MANAGED_BY_TAG}=cooper",
                self.settings.cluster
            )));
        }
        self.client
            .terminate_instances()
            .instance_ids(instance_id)
            .send()
            .await
            .map_err(|e| {
                let code = e
                    .as_service_error()
                    .and_then(|s| aws_sdk_ec2::error::ProvideErrorMetadata::code(s))
                    .map(str::to_string);
                transient_or_permanent(e, code.as_deref())
            })?;
        info!(instance = instance_id, "ec2 instance terminated");
        Ok(())
    }
}

impl CloudProvider for Ec2Cloud {
    async fn create(&self, request: &LaunchRequest) -> Result<Instance, CloudError> {
        self.create_inner(request)
            .instrument(info_span!("ec2.create", claim = %request.claim))
            .await
    }

    async fn terminate(&self, instance_id: &str) -> Result<(), CloudError> {
        self.terminate_inner(instance_id)
            .instrument(info_span!("ec2.terminate", instance = instance_id))
            .await
    }

    async fn list(&self) -> Result<Vec<Instance>, CloudError> {
        let found = self
            .describe(None, &[])
            .instrument(info_span!("ec2.list"))
            .await?;
        Ok(found
            .iter()
            .filter(|i| {
                i.tags()
                    .iter()
                    .any(|t| t.key() == Some(MANAGED_BY_TAG) && t.value() == Some("cooper"))
            })
            .map(|i| self.to_instance(i))
            .collect())
    }
}
