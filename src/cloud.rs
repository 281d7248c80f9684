//! The one small trait between cooper and a cloud: launch an instance for a planned
//! node, terminate one, list what exists. The simulator's cloud and the EC2 cloud both
//! implement it, so everything above (provisioning, disruption) is shared.

use std::future::Future;

use thiserror::Error;

use crate::catalog::CapacityType;

/// What to launch: the planned offering first, then acceptable fallbacks.
#[derive(Debug, Clone, PartialEq)]
pub struct LaunchRequest {
    /// The NodeClaim's name; launches are idempotent on it.
    pub claim: String,
    pub nodepool: String,
    /// Offerings in order of preference: (instance type, zone, capacity type).
    pub offerings: Vec<(String, String, CapacityType)>,
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
    /// Every instance cooper launched that still exists.
    fn list(&self) -> impl Future<Output = Result<Vec<Instance>, CloudError>> + Send;
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
