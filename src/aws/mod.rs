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
use std::sync::{Mutex, RwLock};

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
use crate::crd::{AmiFamily, NodeClassSpec, NodeClassStatus, ResolvedAmi};

/// Tag: the cluster an instance belongs to.
pub const CLUSTER_TAG: &str = "cooper.dev/cluster";
/// Tag: who manages it (`cooper`).
pub const MANAGED_BY_TAG: &str = "cooper.dev/managed-by";
/// Tag: the NodeClaim it was launched for.
pub const NODECLAIM_TAG: &str = "cooper.dev/nodeclaim";
/// Tag: the NodePool.
pub const NODEPOOL_TAG: &str = "cooper.dev/nodepool";
/// Tag: the NodeClass.
pub const NODECLASS_TAG: &str = "cooper.dev/nodeclass";
/// Most overrides sent in one fleet request.
pub const MAX_OVERRIDES: usize = 20;

pub mod catalog;
pub mod interruption;
pub mod nodeclass;
pub mod throttle;

pub use nodeclass::{ClusterInfo, ResolvedNodeClass};

/// Where and how to reach EC2, and the cluster launched nodes join.
#[derive(Debug, Clone, Default)]
pub struct Ec2Settings {
    pub cluster: ClusterInfo,
    /// Region (default: from the environment / profile).
    pub region: Option<String>,
    /// Endpoint override, e.g. a local moto server (default: `AWS_ENDPOINT_URL` or AWS).
    pub endpoint: Option<String>,
    /// Fixed credentials instead of the default chain (for a local endpoint in tests).
    pub static_credentials: Option<(String, String)>,
    /// Attempts per call for throttling and 5xx errors (the SDK's standard retry mode:
    /// exponential backoff with full jitter).
    pub max_attempts: u32,
    /// The longest one attempt of a call may take (default [`DEFAULT_ATTEMPT_TIMEOUT`]).
    pub attempt_timeout: Option<std::time::Duration>,
    /// The longest a call may take, retries included (default
    /// [`DEFAULT_OPERATION_TIMEOUT`]).
    pub operation_timeout: Option<std::time::Duration>,
}

/// Default deadline of one attempt of an EC2 call.
pub const DEFAULT_ATTEMPT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// Default deadline of an EC2 call, its retries included.
pub const DEFAULT_OPERATION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(90);
/// Deadline for connecting to the EC2 endpoint.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// EC2 through aws-sdk-ec2.
pub struct Ec2Cloud {
    client: Client,
    settings: Ec2Settings,
    /// Prices and instance types from the current catalog.
    facts: RwLock<CatalogFacts>,
    /// NodeClasses resolved by [`CloudProvider::prepare_node_class`].
    node_classes: RwLock<BTreeMap<String, ResolvedNodeClass>>,
    /// Launch template IDs by name (names are hashes of what they contain).
    templates: Mutex<BTreeMap<String, String>>,
    /// Held while a launch template is looked up or created, so concurrent launches
    /// create each template once.
    template_creation: tokio::sync::Mutex<()>,
    /// Where spot interruption and instance state notices arrive (optional).
    interruption_queue: Option<interruption::InterruptionQueue>,
    /// Paces calls within EC2's request-rate buckets.
    buckets: throttle::Ec2Buckets,
}

/// What launches need from the catalog, replaced on each live refresh.
#[derive(Debug, Default)]
struct CatalogFacts {
    /// Prices, to record what a launched instance costs.
    prices: BTreeMap<(String, String, CapacityType), f64>,
    /// Instance type facts, to pick each override's AMI.
    types: BTreeMap<String, crate::catalog::InstanceType>,
}

impl CatalogFacts {
    fn price(&self, instance_type: &str, zone: &str, capacity_type: CapacityType) -> f64 {
        self.prices
            .get(&(instance_type.to_string(), zone.to_string(), capacity_type))
            .copied()
            .unwrap_or(0.0)
    }
}

/// An SDK error as a [`CloudError`]: throttling and server errors are transient, other
/// service errors permanent (with AWS's code and message), transport errors transient.
pub(crate) fn sdk_error<E, R>(e: aws_sdk_ec2::error::SdkError<E, R>) -> CloudError
where
    E: aws_sdk_ec2::error::ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    let code = e
        .as_service_error()
        .and_then(|s| s.code())
        .map(str::to_string);
    let message = e
        .as_service_error()
        .and_then(|s| s.message())
        .map(str::to_string)
        .unwrap_or_else(|| aws_sdk_ec2::error::DisplayErrorContext(&e).to_string());
    match code.as_deref() {
        Some(c) if c.ends_with(".NotFound") => CloudError::NotFound(format!("{c}: {message}")),
        Some(c)
            if c.contains("Throttl")
                || c.contains("RequestLimitExceeded")
                || c.contains("ServiceUnavailable")
                || c.contains("Unavailable")
                || c.contains("InternalError") =>
        {
            CloudError::Transient(format!("{c}: {message}"))
        }
        Some(c) => CloudError::Permanent(format!("{c}: {message}")),
        None => CloudError::Transient(message),
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
            | "Unsupported"
    )
}

/// The shared AWS SDK configuration: the default credential chain (environment,
/// profile, web identity / IRSA, instance metadata) unless fixed credentials are given,
/// rustls, the SDK's standard retry mode, deadlines on connecting, on each attempt and on
/// each call (a hung response delays one claim's launch, never the controller), and the
/// settings' region and endpoint.
pub async fn sdk_config(settings: &Ec2Settings) -> aws_config::SdkConfig {
    use aws_smithy_http_client::tls;
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(
            tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https();
    let attempts = settings.max_attempts.max(1);
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .http_client(http)
        .retry_config(aws_config::retry::RetryConfig::standard().with_max_attempts(attempts))
        .timeout_config(
            aws_config::timeout::TimeoutConfig::builder()
                .connect_timeout(CONNECT_TIMEOUT)
                .operation_attempt_timeout(
                    settings.attempt_timeout.unwrap_or(DEFAULT_ATTEMPT_TIMEOUT),
                )
                .operation_timeout(
                    settings
                        .operation_timeout
                        .unwrap_or(DEFAULT_OPERATION_TIMEOUT),
                )
                .build(),
        );
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
    loader.load().await
}

impl Ec2Cloud {
    /// Calls paced so far through the (Describe, mutating) request-rate buckets: every
    /// EC2 call cooper makes, the catalog refresh's pages included, takes a token.
    pub fn paced_calls(&self) -> (u64, u64) {
        (self.buckets.describe.taken(), self.buckets.mutating_taken())
    }

    /// Connect with the default credential chain.
    pub async fn connect(settings: Ec2Settings) -> Ec2Cloud {
        let config = sdk_config(&settings).await;
        Ec2Cloud {
            client: Client::new(&config),
            settings,
            facts: RwLock::new(CatalogFacts::default()),
            node_classes: RwLock::new(BTreeMap::new()),
            templates: Mutex::new(BTreeMap::new()),
            template_creation: tokio::sync::Mutex::new(()),
            interruption_queue: None,
            buckets: Default::default(),
        }
    }

    /// Price launched instances from this catalog and pick AMIs by its types'
    /// accelerators.
    pub fn with_catalog(self, catalog: &crate::catalog::Catalog) -> Self {
        self.update_catalog(catalog);
        self
    }

    /// Take prices and instance types from a refreshed catalog.
    pub fn update_catalog(&self, catalog: &crate::catalog::Catalog) {
        let prices = catalog.prices();
        let types = catalog
            .types
            .iter()
            .map(|t| (t.name().to_string(), t.clone()))
            .collect();
        if let Ok(mut facts) = self.facts.write() {
            *facts = CatalogFacts { prices, types };
        }
    }

    /// The catalog's price for an offering (0 when unknown).
    fn price(&self, instance_type: &str, zone: &str, capacity_type: CapacityType) -> f64 {
        self.facts
            .read()
            .map(|f| f.price(instance_type, zone, capacity_type))
            .unwrap_or(0.0)
    }

    /// Read interruption notices from this queue.
    pub fn with_interruption_queue(mut self, queue: interruption::InterruptionQueue) -> Self {
        self.interruption_queue = Some(queue);
        self
    }

    /// Use an already resolved NodeClass (what `prepare_node_class` stores).
    pub fn set_node_class(&self, resolved: ResolvedNodeClass) {
        if let Ok(mut classes) = self.node_classes.write() {
            classes.insert(resolved.name.clone(), resolved);
        }
    }

    /// The region the client talks to (from settings, the environment or the profile).
    pub fn region(&self) -> Option<String> {
        self.client.config().region().map(|r| r.to_string())
    }

    /// The underlying client (tests use it to inspect what was launched).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Instances by id, or (with no ids) the cluster's live instances, optionally only the
    /// claim's: every page (a listing is complete or an error).
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
                        .values(&self.settings.cluster.name)
                        .build(),
                )
                .filters(
                    Filter::builder()
                        .name("instance-state-name")
                        .values("pending")
                        .values("running")
                        .values("stopping")
                        .values("stopped")
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
        let mut pages = req.into_paginator().send();
        let mut out = Vec::new();
        while let Some(page) = {
            self.buckets.describe.acquire().await;
            pages.next().await
        } {
            let page = page.map_err(|e| match sdk_error(e) {
                CloudError::NotFound(_) => CloudError::NotFound(ids.join(",")),
                other => other,
            })?;
            out.extend(
                page.reservations()
                    .iter()
                    .flat_map(|r| r.instances().iter().cloned()),
            );
        }
        Ok(out)
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
        let price = self.price(&instance_type, &zone, capacity_type);
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

    fn ownership_tags(&self, node_class: &ResolvedNodeClass, request: &LaunchRequest) -> Vec<Tag> {
        let mut tags: BTreeMap<String, String> = node_class.spec.tags.clone();
        tags.insert(CLUSTER_TAG.into(), self.settings.cluster.name.clone());
        tags.insert(MANAGED_BY_TAG.into(), "cooper".into());
        tags.insert(NODECLAIM_TAG.into(), request.claim.clone());
        tags.insert(NODEPOOL_TAG.into(), request.nodepool.clone());
        tags.insert(NODECLASS_TAG.into(), node_class.name.clone());
        tags.insert(
            "Name".into(),
            format!("{}/{}", self.settings.cluster.name, request.claim),
        );
        to_tags(tags)
    }

    /// The launch template for a NodeClass, AMI and user data: named by a stable hash
    /// of all three, created on first use and reused after (also across restarts).
    async fn launch_template(
        &self,
        node_class: &ResolvedNodeClass,
        image_id: &str,
        user_data: &str,
    ) -> Result<String, CloudError> {
        let spec = serde_json::to_string(&node_class.spec)
            .map_err(|e| CloudError::Permanent(format!("NodeClass {}: {e}", node_class.name)))?;
        let groups = node_class.security_groups.join(",");
        let hash = nodeclass::stable_hash(&[&node_class.name, &spec, &groups, image_id, user_data]);
        let name = format!("cooper-{}-{hash:016x}", self.settings.cluster.name);
        let cached = || {
            self.templates
                .lock()
                .ok()
                .and_then(|t| t.get(&name).cloned())
        };
        if let Some(id) = cached() {
            return Ok(id);
        }
        let _creating = self.template_creation.lock().await;
        if let Some(id) = cached() {
            return Ok(id);
        }
        let id = match self
            .find_or_create_template(node_class, &name, image_id, user_data)
            .await
        {
            // Another replica (or a predecessor) created it between our look and our
            // create: use theirs.
            Err(CloudError::Permanent(m)) if m.contains("AlreadyExists") => {
                self.find_or_create_template(node_class, &name, image_id, user_data)
                    .await?
            }
            other => other?,
        };
        if let Ok(mut t) = self.templates.lock() {
            t.insert(name, id.clone());
        }
        Ok(id)
    }

    async fn find_or_create_template(
        &self,
        node_class: &ResolvedNodeClass,
        name: &str,
        image_id: &str,
        user_data: &str,
    ) -> Result<String, CloudError> {
        self.buckets.describe.acquire().await;
        let found = self
            .client
            .describe_launch_templates()
            .filters(
                Filter::builder()
                    .name("launch-template-name")
                    .values(name)
                    .build(),
            )
            .send()
            .instrument(info_span!("ec2.describe_launch_templates"))
            .await
            .map_err(sdk_error)?;
        let id = match found
            .launch_templates()
            .first()
            .and_then(|t| t.launch_template_id())
        {
            Some(id) => id.to_string(),
            None => {
                let data = self.template_data(node_class, image_id, user_data);
                self.buckets.create_launch_template.acquire().await;
                let out = self
                    .client
                    .create_launch_template()
                    .launch_template_name(name)
                    .launch_template_data(data)
                    .tag_specifications(
                        TagSpecification::builder()
                            .resource_type(ResourceType::LaunchTemplate)
                            .set_tags(Some(self.cluster_tags()))
                            .build(),
                    )
                    .send()
                    .instrument(info_span!("ec2.create_launch_template"))
                    .await
                    .map_err(sdk_error)?;
                out.launch_template()
                    .and_then(|t| t.launch_template_id())
                    .map(str::to_string)
                    .ok_or_else(|| {
                        CloudError::Permanent("CreateLaunchTemplate returned no ID".into())
                    })?
            }
        };
        Ok(id)
    }

    fn cluster_tags(&self) -> Vec<Tag> {
        to_tags(BTreeMap::from([
            (CLUSTER_TAG.to_string(), self.settings.cluster.name.clone()),
            (MANAGED_BY_TAG.to_string(), "cooper".to_string()),
        ]))
    }

    fn template_data(
        &self,
        node_class: &ResolvedNodeClass,
        image_id: &str,
        user_data: &str,
    ) -> RequestLaunchTemplateData {
        use aws_sdk_ec2::types::{
            LaunchTemplateBlockDeviceMappingRequest, LaunchTemplateEbsBlockDeviceRequest,
            LaunchTemplateHttpTokensState, LaunchTemplateIamInstanceProfileSpecificationRequest,
            LaunchTemplateInstanceMetadataOptionsRequest, LaunchTemplateTagSpecificationRequest,
            VolumeType,
        };
        let spec = &node_class.spec;
        let mut data = RequestLaunchTemplateData::builder()
            .image_id(image_id)
            .user_data(base64::Engine::encode(
                &base64::engine::general_purpose::STANDARD,
                user_data,
            ));
        // Asked for explicitly, the address comes with the primary network interface,
        // which then carries the security groups too (EC2 refuses both places); the
        // fleet's per-zone subnet override applies to that interface.
        data = match spec.associate_public_ip_address {
            Some(public) => data.network_interfaces(
                aws_sdk_ec2::types::LaunchTemplateInstanceNetworkInterfaceSpecificationRequest::builder()
                    .device_index(0)
                    .associate_public_ip_address(public)
                    .delete_on_termination(true)
                    .set_groups(Some(node_class.security_groups.clone()))
                    .build(),
            ),
            None => data.set_security_group_ids(Some(node_class.security_groups.clone())),
        };
        if let Some(profile) = spec.instance_profile.as_ref().or(spec.role.as_ref()) {
            data = data.iam_instance_profile(
                LaunchTemplateIamInstanceProfileSpecificationRequest::builder()
                    .name(profile)
                    .build(),
            );
        }
        for device in &spec.block_device_mappings {
            data = data.block_device_mappings(
                LaunchTemplateBlockDeviceMappingRequest::builder()
                    .device_name(&device.device_name)
                    .ebs(
                        LaunchTemplateEbsBlockDeviceRequest::builder()
                            .volume_size(device.volume_size_gib as i32)
                            .volume_type(VolumeType::from(device.volume_type.as_str()))
                            .encrypted(device.encrypted)
                            .delete_on_termination(true)
                            .build(),
                    )
                    .build(),
            );
        }
        let metadata = spec
            .metadata_options
            .clone()
            .unwrap_or(crate::crd::MetadataOptions {
                http_tokens: "required".into(),
                http_put_response_hop_limit: 1,
            });
        data = data.metadata_options(
            LaunchTemplateInstanceMetadataOptionsRequest::builder()
                .http_tokens(LaunchTemplateHttpTokensState::from(
                    metadata.http_tokens.as_str(),
                ))
                .http_put_response_hop_limit(metadata.http_put_response_hop_limit as i32)
                .build(),
        );
        // Volumes, network interfaces and spot requests carry the cluster's ownership
        // tags and the NodeClass's, so the IAM policy can require them on everything a
        // launch creates (the instance's own tags come with the fleet request).
        let mut tags = node_class.spec.tags.clone();
        tags.insert(CLUSTER_TAG.into(), self.settings.cluster.name.clone());
        tags.insert(MANAGED_BY_TAG.into(), "cooper".into());
        tags.insert(NODECLASS_TAG.into(), node_class.name.clone());
        for resource_type in [
            ResourceType::Volume,
            ResourceType::NetworkInterface,
            ResourceType::SpotInstancesRequest,
        ] {
            data = data.tag_specifications(
                LaunchTemplateTagSpecificationRequest::builder()
                    .resource_type(resource_type)
                    .set_tags(Some(to_tags(tags.clone())))
                    .build(),
            );
        }
        data.build()
    }

    /// Resolve a NodeClass's selectors: subnets (one per zone, the most free addresses
    /// first), security groups, and AMIs (the newest EKS-optimised AL2023 image per
    /// variant and architecture, or the explicitly selected ones).
    pub async fn resolve_node_class(
        &self,
        name: &str,
        spec: &NodeClassSpec,
    ) -> Result<ResolvedNodeClass, CloudError> {
        let mut subnets: BTreeMap<String, (i32, String, bool)> = BTreeMap::new();
        for term in &spec.subnet_selector_terms {
            let mut req = self.client.describe_subnets();
            if let Some(id) = &term.id {
                req = req.subnet_ids(id);
            }
            for f in tag_filters(&term.tags) {
                req = req.filters(f);
            }
            let mut pages = req.into_paginator().send();
            while let Some(page) = {
                self.buckets.describe.acquire().await;
                pages.next().await
            } {
                let out = page.map_err(sdk_error)?;
                for s in out.subnets() {
                    let (Some(id), Some(zone)) = (s.subnet_id(), s.availability_zone()) else {
                        continue;
                    };
                    let free = s.available_ip_address_count().unwrap_or(0);
                    let better = subnets.get(zone).is_none_or(|(f, _, _)| free > *f);
                    if better {
                        let public = s.map_public_ip_on_launch().unwrap_or(false);
                        subnets.insert(zone.to_string(), (free, id.to_string(), public));
                    }
                }
            }
        }
        if subnets.is_empty() {
            return Err(CloudError::Permanent(format!(
                "NodeClass {name}: spec.subnetSelectorTerms match no subnet"
            )));
        }
        let mut groups = std::collections::BTreeSet::new();
        for term in &spec.security_group_selector_terms {
            let mut req = self.client.describe_security_groups();
            if let Some(id) = &term.id {
                req = req.group_ids(id);
            }
            for f in tag_filters(&term.tags) {
                req = req.filters(f);
            }
            let mut pages = req.into_paginator().send();
            while let Some(page) = {
                self.buckets.describe.acquire().await;
                pages.next().await
            } {
                let out = page.map_err(sdk_error)?;
                groups.extend(
                    out.security_groups()
                        .iter()
                        .filter_map(|g| g.group_id())
                        .map(str::to_string),
                );
            }
        }
        if groups.is_empty() {
            return Err(CloudError::Permanent(format!(
                "NodeClass {name}: spec.securityGroupSelectorTerms match no security group"
            )));
        }
        let amis = self.resolve_amis(name, spec).await?;
        Ok(ResolvedNodeClass {
            name: name.to_string(),
            spec: spec.clone(),
            subnets: subnets
                .into_iter()
                .map(|(zone, (_, id, public_ipv4))| crate::crd::ResolvedSubnet {
                    id,
                    zone,
                    public_ipv4,
                })
                .collect(),
            security_groups: groups.into_iter().collect(),
            amis,
        })
    }

    async fn resolve_amis(
        &self,
        name: &str,
        spec: &NodeClassSpec,
    ) -> Result<Vec<ResolvedAmi>, CloudError> {
        let newest = |images: &[aws_sdk_ec2::types::Image]| {
            images
                .iter()
                .filter(|i| i.image_id().is_some())
                .max_by(|a, b| a.creation_date().cmp(&b.creation_date()))
                .cloned()
        };
        let mut amis = Vec::new();
        if !spec.ami_selector_terms.is_empty() {
            // Explicit images: the newest per architecture, for any accelerator.
            let mut by_arch: BTreeMap<String, aws_sdk_ec2::types::Image> = BTreeMap::new();
            for term in &spec.ami_selector_terms {
                let mut req = self.client.describe_images();
                if let Some(id) = &term.id {
                    req = req.image_ids(id);
                }
                for f in tag_filters(&term.tags) {
                    req = req.filters(f);
                }
                let mut pages = req.into_paginator().send();
                while let Some(page) = {
                    self.buckets.describe.acquire().await;
                    pages.next().await
                } {
                    let out = page.map_err(sdk_error)?;
                    for image in out.images() {
                        let arch = image
                            .architecture()
                            .map(|a| a.as_str().to_string())
                            .unwrap_or_else(|| "x86_64".into());
                        let keep = image.image_id().is_some()
                            && by_arch
                                .get(&arch)
                                .is_none_or(|seen| image.creation_date() >= seen.creation_date());
                        if keep {
                            by_arch.insert(arch, image.clone());
                        }
                    }
                }
            }
            for (arch, image) in by_arch {
                amis.push(ResolvedAmi {
                    id: image.image_id().unwrap_or_default().to_string(),
                    variant: "any".into(),
                    architecture: arch,
                });
            }
        } else if spec.ami_family == AmiFamily::AL2023 {
            for (variant, arch) in nodeclass::AL2023_VARIANTS {
                let mut pages = self
                    .client
                    .describe_images()
                    .owners("amazon")
                    .filters(
                        Filter::builder()
                            .name("name")
                            .values(nodeclass::al2023_name_pattern(
                                variant,
                                arch,
                                &self.settings.cluster.kubernetes_version,
                            ))
                            .build(),
                    )
                    .into_paginator()
                    .send();
                let mut images = Vec::new();
                while let Some(page) = {
                    self.buckets.describe.acquire().await;
                    pages.next().await
                } {
                    images.extend(page.map_err(sdk_error)?.images().iter().cloned());
                }
                if let Some(image) = newest(&images) {
                    amis.push(ResolvedAmi {
                        id: image.image_id().unwrap_or_default().to_string(),
                        variant: variant.into(),
                        architecture: arch.into(),
                    });
                }
            }
        }
        if amis.is_empty() {
            return Err(CloudError::Permanent(format!(
                "NodeClass {name}: no AMI found ({})",
                if spec.ami_selector_terms.is_empty() {
                    format!(
                        "no EKS-optimised AL2023 image for Kubernetes {}",
                        self.settings.cluster.kubernetes_version
                    )
                } else {
                    "spec.amiSelectorTerms match no image".to_string()
                }
            )));
        }
        Ok(amis)
    }

    async fn create_inner(&self, request: &LaunchRequest) -> Result<Instance, CloudError> {
        // Idempotent on the claim: a restart between launch and recording finds it here.
        if let Some(existing) = self.describe(Some(&request.claim), &[]).await?.first() {
            return Ok(self.to_instance(existing));
        }
        let Some(first) = request.offerings.first() else {
            return Err(CloudError::Permanent("no offerings to launch".into()));
        };
        let Some(class_name) = &request.node_class else {
            return Err(CloudError::Permanent(format!(
                "NodePool {} has no nodeClassRef: EC2 needs a NodeClass to launch",
                request.nodepool
            )));
        };
        let node_class = self
            .node_classes
            .read()
            .ok()
            .and_then(|c| c.get(class_name).cloned())
            .ok_or_else(|| {
                CloudError::Transient(format!("NodeClass {class_name} is not resolved yet"))
            })?;
        let capacity_type = first.2;
        // The requested types' facts, copied out of the lock (it is not held across awaits).
        let types: BTreeMap<String, crate::catalog::InstanceType> = match self.facts.read() {
            Ok(facts) => request
                .offerings
                .iter()
                .filter_map(|o| Some((o.0.clone(), facts.types.get(&o.0)?.clone())))
                .collect(),
            Err(_) => BTreeMap::new(),
        };
        let first_type = types.get(&first.0).ok_or_else(|| {
            CloudError::Permanent(format!("instance type {} is not in the catalog", first.0))
        })?;
        let image_id = node_class.ami_for(first_type).ok_or_else(|| {
            CloudError::Permanent(format!(
                "NodeClass {class_name} has no {} {} AMI for {}",
                nodeclass::ami_variant(first_type),
                nodeclass::ec2_architecture(&first_type.spec.architecture),
                first.0
            ))
        })?;
        // One fleet, one launch template: overrides are the offerings of the first one's
        // capacity type that boot the same AMI and have a subnet in their zone.
        let mut overrides = Vec::new();
        let mut offered = Vec::new();
        for (t, zone, c) in request.offerings.iter().filter(|o| o.2 == capacity_type) {
            if overrides.len() == MAX_OVERRIDES {
                break;
            }
            let same_image = types
                .get(t)
                .and_then(|ty| node_class.ami_for(ty))
                .is_some_and(|i| i == image_id);
            let Some(subnet) = node_class.subnet(zone).filter(|_| same_image) else {
                continue;
            };
            overrides.push(
                FleetLaunchTemplateOverridesRequest::builder()
                    .instance_type(InstanceType::from(t.as_str()))
                    .subnet_id(subnet)
                    .availability_zone(zone)
                    .build(),
            );
            offered.push((t.clone(), zone.clone(), *c));
        }
        if overrides.is_empty() {
            return Err(CloudError::Permanent(format!(
                "NodeClass {class_name} has no subnet in the zones of {:?}",
                request.offerings
            )));
        }
        let user_data = nodeclass::user_data(
            &self.settings.cluster,
            &request.labels,
            &request.taints,
            node_class.spec.user_data.as_deref(),
        );
        let template = self
            .launch_template(&node_class, image_id, &user_data)
            .await?;
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
        let tags = self.ownership_tags(&node_class, request);
        // EC2 deduplicates on the ClientToken: a repeat of this launch (after a timeout, a
        // reset connection, a restart) returns this launch's instance. At most 64 ASCII
        // characters.
        let token: String = request
            .client_token
            .chars()
            .filter(char::is_ascii)
            .take(64)
            .collect();
        self.buckets.create_fleet.acquire().await;
        let out = self
            .client
            .create_fleet()
            .set_client_token((!token.is_empty()).then_some(token))
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
            // The fleet carries the ownership tags too, so the IAM policy can require
            // them on every resource CreateFleet creates (deploy/iam-policy.json).
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::Fleet)
                    .set_tags(Some(self.cluster_tags()))
                    .build(),
            )
            .send()
            .instrument(info_span!("ec2.create_fleet", overrides = offered.len()))
            .await
            // EC2 answered this launch with an error: nothing was launched, and the same
            // token would get the same answer. Except a token reused with other
            // parameters: an earlier call with it may have launched.
            .map_err(|e| match sdk_error(e) {
                CloudError::Permanent(m) if !m.contains("IdempotentParameterMismatch") => {
                    CloudError::Refused(m)
                }
                CloudError::Permanent(m) => CloudError::Transient(m),
                other => other,
            })?;
        let Some((id, answered)) = out.instances().iter().find_map(|i| {
            let id = i.instance_ids().first()?.clone();
            Some((id, i))
        }) else {
            let codes: Vec<&str> = out.errors().iter().filter_map(|e| e.error_code()).collect();
            if codes.iter().any(|c| is_capacity_error(c)) || codes.is_empty() {
                return Err(CloudError::InsufficientCapacity { offerings: offered });
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
            return Err(CloudError::Refused(messages.join("; ")));
        };
        // CreateFleet's answer names the type and the zone (the override it used): no
        // DescribeInstances in the launch path, whose bucket a burst would drain. An
        // instant fleet's instance carries its tag specification from launch (EC2 refuses
        // the launch otherwise). Only an answer without them is described — and tagged
        // explicitly if the described instance lacks any of cooper's tags: ownership
        // checks (termination, the collector) must never miss an instance.
        let answered_type = answered.instance_type().map(|t| t.as_str().to_string());
        let answered_zone = answered
            .launch_template_and_overrides()
            .and_then(|l| l.overrides())
            .and_then(|o| o.availability_zone())
            .map(str::to_string);
        let mut instance = match (answered_type, answered_zone) {
            (Some(instance_type), Some(zone)) => Instance {
                id: id.clone(),
                claim: request.claim.clone(),
                nodepool: request.nodepool.clone(),
                instance_type,
                zone,
                capacity_type,
                price_per_hour: 0.0,
            },
            _ => {
                let described = self.describe(None, std::slice::from_ref(&id)).await?;
                let Some(i) = described.first() else {
                    return Err(CloudError::Transient(format!(
                        "launched {id} but cannot describe it yet"
                    )));
                };
                let tagged = tags.iter().all(|want| {
                    i.tags()
                        .iter()
                        .any(|t| t.key() == want.key() && t.value() == want.value())
                });
                if !tagged {
                    self.buckets.create_tags.acquire().await;
                    self.client
                        .create_tags()
                        .resources(&id)
                        .set_tags(Some(tags))
                        .send()
                        .instrument(info_span!("ec2.create_tags"))
                        .await
                        .map_err(sdk_error)?;
                }
                self.to_instance(i)
            }
        };
        // The fleet's capacity type is what was asked for (moto does not report spot
        // lifecycle on instant fleets).
        instance.capacity_type = capacity_type;
        instance.price_per_hour =
            self.price(&instance.instance_type, &instance.zone, capacity_type);
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
        if tag(CLUSTER_TAG).as_deref() != Some(self.settings.cluster.name.as_str())
            || tag(MANAGED_BY_TAG).as_deref() != Some("cooper")
        {
            warn!(
                instance = instance_id,
                "refusing to terminate an instance cooper did not launch for this cluster"
            );
            return Err(CloudError::Permanent(format!(
                "refusing to terminate {instance_id}: not tagged {CLUSTER_TAG}={} and {MANAGED_BY_TAG}=cooper",
                self.settings.cluster.name
            )));
        }
        self.buckets.terminate.acquire().await;
        self.client
            .terminate_instances()
            .instance_ids(instance_id)
            .send()
            .await
            .map_err(sdk_error)?;
        info!(instance = instance_id, "ec2 instance terminated");
        Ok(())
    }
}

fn to_tags(tags: BTreeMap<String, String>) -> Vec<Tag> {
    tags.into_iter()
        .map(|(k, v)| Tag::builder().key(k).value(v).build())
        .collect()
}

/// EC2 filters for a tag selector: `tag:K=V`, or `tag-key=K` for a value of `*`.
fn tag_filters(tags: &BTreeMap<String, String>) -> Vec<Filter> {
    tags.iter()
        .map(|(k, v)| {
            if v == "*" {
                Filter::builder().name("tag-key").values(k).build()
            } else {
                Filter::builder().name(format!("tag:{k}")).values(v).build()
            }
        })
        .collect()
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

    async fn describe_instance(
        &self,
        instance_id: &str,
    ) -> Result<crate::cloud::InstanceStatus, CloudError> {
        use crate::cloud::InstanceStatus;
        let found = match self
            .describe(None, &[instance_id.to_string()])
            .instrument(info_span!("ec2.describe_instance", instance = instance_id))
            .await
        {
            Ok(found) => found,
            Err(CloudError::NotFound(_)) => return Ok(InstanceStatus::NotFound),
            Err(e) => return Err(e),
        };
        let Some(i) = found.first() else {
            return Ok(InstanceStatus::NotFound);
        };
        use aws_sdk_ec2::types::InstanceStateName;
        Ok(match i.state().and_then(|s| s.name()) {
            Some(InstanceStateName::ShuttingDown | InstanceStateName::Terminated) => {
                InstanceStatus::Terminated
            }
            _ => InstanceStatus::Exists(self.to_instance(i)),
        })
    }

    async fn instances_for_claim(&self, claim: &str) -> Result<Vec<Instance>, CloudError> {
        let found = self
            .describe(Some(claim), &[])
            .instrument(info_span!("ec2.instances_for_claim", claim))
            .await?;
        Ok(found.iter().map(|i| self.to_instance(i)).collect())
    }

    async fn prepare_node_class(
        &self,
        name: &str,
        spec: &NodeClassSpec,
    ) -> Result<NodeClassStatus, CloudError> {
        let resolved = self
            .resolve_node_class(name, spec)
            .instrument(info_span!("ec2.resolve_node_class", nodeclass = name))
            .await?;
        let status = NodeClassStatus {
            subnets: resolved.subnets.clone(),
            security_groups: resolved.security_groups.clone(),
            amis: resolved.amis.clone(),
            conditions: Vec::new(),
        };
        self.set_node_class(resolved);
        Ok(status)
    }

    async fn interruptions(&self) -> Result<Vec<crate::cloud::Interruption>, CloudError> {
        match &self.interruption_queue {
            Some(queue) => queue.receive().await,
            None => std::future::pending().await,
        }
    }
}
