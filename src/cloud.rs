//! The one small trait between cooper and a cloud: launch an instance for a planned
//! node, terminate one, list what exists. The simulator's cloud and the EC2 cloud both
//! implement it, so everything above (provisioning, disruption) is shared.

use std::future::Future;

use thiserror::Error;

use crate::catalog::CapacityType;

/// What to launch: the planned offering first, then acceptable fallbacks.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LaunchRequest {
    /// The NodeClaim's name; launches are idempotent on it (the instance carries it as a
    /// tag and is looked up by it before launching).
    pub claim: String,
    /// Idempotency token for the launch call (EC2's `ClientToken`, at most 64 ASCII
    /// characters): the same token returns the first call's instance, so repeating a
    /// launch whose answer was lost never launches twice. cooper derives it from the
    /// claim's uid and launch attempt.
    pub client_token: String,
    pub nodepool: String,
    /// Offerings in order of preference: (instance type, zone, capacity type).
    pub offerings: Vec<(String, String, CapacityType)>,
    /// The pool's NodeClass (how to launch: network, image, identity).
    pub node_class: Option<String>,
    /// Labels the node registers with (the pool's).
    pub labels: std::collections::BTreeMap<String, String>,
    /// Taints the node registers with (the pool's taints and startup taints).
    pub taints: Vec<crate::labels::Taint>,
}

/// An instance the cloud runs for cooper.
#[derive(Debug, Clone, PartialEq)]
pub struct Instance {
    pub id: String,
    pub claim: String,
    pub nodepool: String,
    pub instance_type: String,
    pub zone: String,
    pub capacity_type: CapacityType,
    pub price_per_hour: f64,
}

/// What the cloud says about one instance looked up by id (not from a listing).
#[derive(Debug, Clone, PartialEq)]
pub enum InstanceStatus {
    /// It exists and is not going away (pending, running, stopping or stopped).
    Exists(Instance),
    /// It is shutting down or terminated.
    Terminated,
    /// The cloud does not know it (never existed, or terminated long ago).
    NotFound,
}

/// A notice from the cloud that an instance is going away (or may soon).
#[derive(Debug, Clone, PartialEq)]
pub struct Interruption {
    pub instance_id: String,
    pub kind: InterruptionKind,
}

/// What the cloud said about the instance.
#[derive(Debug, Clone, PartialEq)]
pub enum InterruptionKind {
    /// Spot capacity is being reclaimed: the instance stops in about two minutes.
    SpotInterruption,
    /// The instance is at elevated risk of a spot interruption. Informational: cooper
    /// records it (as Karpenter does by default) and does not act.
    Rebalance,
    /// The instance is stopping, stopped, shutting down or terminated.
    StateChange(String),
    /// Scheduled maintenance will retire or reboot the instance.
    ScheduledChange,
}

impl InterruptionKind {
    /// Whether the node should be drained and replaced now.
    pub fn acts(&self) -> bool {
        !matches!(self, InterruptionKind::Rebalance)
    }

    /// The reason recorded on conditions, Events and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            InterruptionKind::SpotInterruption => "SpotInterrupted",
            InterruptionKind::Rebalance => "RebalanceRecommended",
            InterruptionKind::StateChange(_) => "InstanceStopping",
            InterruptionKind::ScheduledChange => "ScheduledMaintenance",
        }
    }
}

/// Why a cloud call failed.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum CloudError {
    /// No capacity for any offering asked for; they should be avoided for a while.
    #[error("insufficient capacity for {offerings:?}")]
    InsufficientCapacity {
        offerings: Vec<(String, String, CapacityType)>,
    },
    /// The instance does not exist (already gone).
    #[error("instance {0} not found")]
    NotFound(String),
    /// A failure that will not heal by retrying (bad AMI, unauthorised, ...).
    #[error("{0}")]
    Permanent(String),
    /// The launch call itself was answered with a definite refusal: nothing was
    /// launched, and repeating the call with the same idempotency token would repeat the
    /// refusal, so the next attempt takes a new token. (A [`CloudError::Permanent`] from
    /// a launch says nothing about an earlier call with the token, which may have
    /// launched: the token is kept.)
    #[error("{0}")]
    Refused(String),
    /// Throttling or a server error: retry with backoff.
    #[error("{0}")]
    Transient(String),
}

/// A cloud cooper can launch nodes in.
pub trait CloudProvider {
    /// Launch one instance for the request, trying its offerings in order.
    fn create(
        &self,
        request: &LaunchRequest,
    ) -> impl Future<Output = Result<Instance, CloudError>> + Send;
    /// Terminate an instance cooper launched.
    fn terminate(&self, instance_id: &str) -> impl Future<Output = Result<(), CloudError>> + Send;
    /// Every instance cooper launched that still exists: complete (every page) or an
    /// error, never a partial list.
    fn list(&self) -> impl Future<Output = Result<Vec<Instance>, CloudError>> + Send;
    /// One instance, looked up directly by id.
    fn describe_instance(
        &self,
        instance_id: &str,
    ) -> impl Future<Output = Result<InstanceStatus, CloudError>> + Send;
    /// The live instances launched for a claim (found by its tag).
    fn instances_for_claim(
        &self,
        claim: &str,
    ) -> impl Future<Output = Result<Vec<Instance>, CloudError>> + Send;
    /// Take note of instances the cluster records (in its NodeClaims) that this cloud may
    /// not know: a cloud that keeps no state of its own (the in-process one) rebuilds it
    /// from them after a restart or failover. Clouds that can look instances up ignore it.
    fn adopt(&self, _recorded: &[Instance]) -> impl Future<Output = ()> + Send {
        std::future::ready(())
    }
    /// Resolve a NodeClass against the cloud (subnets, security groups, images) and keep
    /// it for launches; the result is written to the NodeClass's status. Clouds with
    /// nothing to resolve accept every NodeClass as it is.
    fn prepare_node_class(
        &self,
        _name: &str,
        _spec: &crate::crd::NodeClassSpec,
    ) -> impl Future<Output = Result<crate::crd::NodeClassStatus, CloudError>> + Send {
        std::future::ready(Ok(crate::crd::NodeClassStatus::default()))
    }
    /// Wait for the next interruption notices (spot reclaim, instance stopping,
    /// scheduled maintenance). Clouds without a notice source never return.
    fn interruptions(&self) -> impl Future<Output = Result<Vec<Interruption>, CloudError>> + Send {
        std::future::pending()
    }
}

/// An EC2-shaped instance id (`i-` and 17 hex digits) derived from a launch's client
/// token: the same launch always gets the same id, different processes never collide.
fn instance_id(client_token: &str, claim: &str, salt: u64) -> String {
    // FNV-1a, 64 bits, over the token (or the claim when there is none) and the salt.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let key = if client_token.is_empty() {
        claim
    } else {
        client_token
    };
    for b in key.bytes().chain(salt.to_le_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("i-{h:017x}")
}

/// Run a future that never waits (an in-process cloud's) to completion on the current
/// thread. Used by the simulator, which drives the async trait from simulated time.
pub fn complete_now<F: Future>(future: F) -> F::Output {
    use std::task::{Context, Poll, Waker};
    let mut future = std::pin::pin!(future);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(v) = future.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::yield_now();
    }
}

/// An in-process cloud priced from a catalog: the local implementation of
/// [`CloudProvider`] the controller's tests and `--cloud local` run against (the
/// simulator has its own, driven by simulated time). Launches are idempotent on the claim
/// name and the client token, as EC2 launches are; instance ids derive from the client
/// token (the claim's uid), so they are unique across processes; a new leader rebuilds
/// the instances from the NodeClaims ([`CloudProvider::adopt`]). Offerings can be marked
/// out of capacity.
#[derive(Debug, Default)]
pub struct InMemoryCloud {
    state: std::sync::Mutex<InMemoryState>,
    prices: std::collections::BTreeMap<(String, String, CapacityType), f64>,
    /// Wakes [`CloudProvider::interruptions`] when a notice is queued.
    notices: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct InMemoryState {
    instances: std::collections::BTreeMap<String, Instance>,
    /// Client token → the instance it launched.
    tokens: std::collections::BTreeMap<String, String>,
    terminated: std::collections::BTreeSet<String>,
    launches: u64,
    terminations: u64,
    no_capacity: std::collections::BTreeSet<(String, String, CapacityType)>,
    interruptions: Vec<Interruption>,
    /// The images every NodeClass resolves to (an image release replaces them).
    images: Vec<crate::crd::ResolvedAmi>,
}

impl InMemoryCloud {
    /// A cloud offering everything in the catalog at its prices.
    pub fn new(catalog: &crate::catalog::Catalog) -> Self {
        InMemoryCloud {
            state: Default::default(),
            prices: catalog.prices(),
            notices: tokio::sync::Notify::new(),
        }
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, InMemoryState>, CloudError> {
        self.state
            .lock()
            .map_err(|_| CloudError::Permanent("cloud state poisoned".into()))
    }

    /// How many instances were launched (not counting idempotent repeats).
    pub fn launches(&self) -> u64 {
        self.lock().map(|s| s.launches).unwrap_or(0)
    }

    /// How many instances were terminated.
    pub fn terminations(&self) -> u64 {
        self.lock().map(|s| s.terminations).unwrap_or(0)
    }

    /// Running instances.
    pub fn instances(&self) -> Vec<Instance> {
        self.lock()
            .map(|s| s.instances.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Announce an interruption, as a spot reclaim or a stopping instance would.
    pub fn interrupt(&self, interruption: Interruption) {
        if let Ok(mut s) = self.lock() {
            s.interruptions.push(interruption);
        }
        self.notices.notify_one();
    }

    /// Fault injection: record an instance as launched for another claim (as a duplicate
    /// launch for that claim would be).
    pub fn relabel(&self, instance_id: &str, claim: &str) {
        if let Ok(mut s) = self.lock()
            && let Some(i) = s.instances.get_mut(instance_id)
        {
            i.claim = claim.to_string();
        }
    }

    /// Fault injection: lose track of an instance (listings and lookups no longer show
    /// it, as if the cloud answered wrongly), without terminating it.
    pub fn forget(&self, instance_id: &str) {
        if let Ok(mut s) = self.lock() {
            s.instances.remove(instance_id);
        }
    }

    /// Publish the images NodeClasses resolve to, as an AMI release does: nodes launched
    /// from the previous ones drift once their NodeClass is resolved again.
    pub fn set_images(&self, images: Vec<crate::crd::ResolvedAmi>) {
        if let Ok(mut s) = self.lock() {
            s.images = images;
        }
    }

    /// Make an offering fail with insufficient capacity (or succeed again).
    pub fn set_capacity(&self, offering: (String, String, CapacityType), available: bool) {
        if let Ok(mut s) = self.lock() {
            if available {
                s.no_capacity.remove(&offering);
            } else {
                s.no_capacity.insert(offering);
            }
        }
    }
}

impl CloudProvider for InMemoryCloud {
    async fn prepare_node_class(
        &self,
        _name: &str,
        _spec: &crate::crd::NodeClassSpec,
    ) -> Result<crate::crd::NodeClassStatus, CloudError> {
        Ok(crate::crd::NodeClassStatus {
            amis: self.lock()?.images.clone(),
            ..Default::default()
        })
    }

    async fn create(&self, request: &LaunchRequest) -> Result<Instance, CloudError> {
        let mut state = self.lock()?;
        if let Some(existing) = state
            .tokens
            .get(&request.client_token)
            .and_then(|id| state.instances.get(id))
        {
            return Ok(existing.clone());
        }
        if let Some(existing) = state.instances.values().find(|i| i.claim == request.claim) {
            return Ok(existing.clone());
        }
        for offering in &request.offerings {
            if state.no_capacity.contains(offering) {
                continue;
            }
            let Some(price) = self.prices.get(offering) else {
                continue;
            };
            state.launches += 1;
            let mut id = instance_id(&request.client_token, &request.claim, 0);
            let mut salt = 0;
            while state.instances.contains_key(&id) || state.terminated.contains(&id) {
                salt += 1;
                id = instance_id(&request.client_token, &request.claim, salt);
            }
            state
                .tokens
                .insert(request.client_token.clone(), id.clone());
            let instance = Instance {
                id,
                claim: request.claim.clone(),
                nodepool: request.nodepool.clone(),
                instance_type: offering.0.clone(),
                zone: offering.1.clone(),
                capacity_type: offering.2,
                price_per_hour: *price,
            };
            state
                .instances
                .insert(instance.id.clone(), instance.clone());
            return Ok(instance);
        }
        Err(CloudError::InsufficientCapacity {
            offerings: request.offerings.clone(),
        })
    }

    async fn terminate(&self, instance_id: &str) -> Result<(), CloudError> {
        let mut state = self.lock()?;
        match state.instances.remove(instance_id) {
            Some(_) => {
                state.terminations += 1;
                state.terminated.insert(instance_id.to_string());
                Ok(())
            }
            None => Err(CloudError::NotFound(instance_id.to_string())),
        }
    }

    async fn list(&self) -> Result<Vec<Instance>, CloudError> {
        Ok(self.lock()?.instances.values().cloned().collect())
    }

    async fn describe_instance(&self, instance_id: &str) -> Result<InstanceStatus, CloudError> {
        let state = self.lock()?;
        Ok(match state.instances.get(instance_id) {
            Some(i) => InstanceStatus::Exists(i.clone()),
            None if state.terminated.contains(instance_id) => InstanceStatus::Terminated,
            None => InstanceStatus::NotFound,
        })
    }

    async fn instances_for_claim(&self, claim: &str) -> Result<Vec<Instance>, CloudError> {
        Ok(self
            .lock()?
            .instances
            .values()
            .filter(|i| i.claim == claim)
            .cloned()
            .collect())
    }

    async fn adopt(&self, recorded: &[Instance]) {
        if let Ok(mut state) = self.lock() {
            for i in recorded {
                if !state.terminated.contains(&i.id) {
                    state
                        .instances
                        .entry(i.id.clone())
                        .or_insert_with(|| i.clone());
                }
            }
        }
    }

    async fn interruptions(&self) -> Result<Vec<Interruption>, CloudError> {
        loop {
            let queued = std::mem::take(&mut self.lock()?.interruptions);
            if !queued.is_empty() {
                return Ok(queued);
            }
            self.notices.notified().await;
        }
    }
}
