//! Termination: the one flow every NodeClaim deletion goes through — an empty node's
//! removal, an interruption, expiration, drift, a claim deleted by hand, its NodePool
//! deleted, a Node deleted by hand (its finalizer turns that into the claim's deletion).
//! Karpenter's termination controller is the model. Behind the claim's finalizer, on
//! each pass of the claim's lifecycle worker:
//!
//! 1. the node is tainted `cooper.dev/disrupted:NoSchedule` and cordoned;
//! 2. its pods (not DaemonSet or mirror pods, not finished) are evicted through the
//!    Eviction API, so PodDisruptionBudgets hold them (a refused eviction is retried
//!    next pass); pods that say `do-not-disrupt` are not evicted — the drain waits for
//!    them to finish;
//! 3. with the NodePool's `terminationGracePeriod`, every pod still there is *deleted*
//!    (PDB or `do-not-disrupt` notwithstanding) once its own grace period would
//!    otherwise outlast the node's, so that it is gone when the period ends, which
//!    bounds the whole drain; an interruption bounds it by the notice instead;
//! 4. then the instance is terminated, the Node deleted and the finalizers released
//!    (the lifecycle reconciler's `terminate`).
//!
//! Nothing here keeps state in memory: the deadline comes from the claim's deletion
//! time and conditions, so a new leader carries on a drain its predecessor began.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, EvictParams, ListParams, Patch, PatchParams};
use serde_json::json;
use tracing::{debug, info};

use super::interruption::INTERRUPTION_REASONS;
use super::{
    Context, Error, claim_condition, claim_node_name, is_node_agent, now, parse_time, taint_json,
};
use crate::crd::NodeClaim;
use crate::disruption::{DISRUPTED_TAINT_KEY, disruption_taint, pod_protects_node};
use crate::nodepool::NodePool;

/// How long a drain waits for a claim's Node to show up in the cache before deciding the
/// instance never registered one.
const NODE_SETTLE: Duration = Duration::from_secs(10);

/// The longest one eviction call may take before it counts as blocked.
const EVICTION_TIMEOUT: Duration = Duration::from_secs(5);

/// `Terminating` reasons whose node has nothing left to drain.
const NOTHING_TO_DRAIN: [&str; 1] = ["InstanceGone"];

/// Kubernetes' default `terminationGracePeriodSeconds`.
const DEFAULT_POD_GRACE: Duration = Duration::from_secs(30);

/// Pods that must leave a node before it goes: not DaemonSet or mirror pods, not
/// finished.
pub(super) fn must_leave(pod: &Pod) -> bool {
    let finished = matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    );
    !is_node_agent(pod) && !finished
}

/// Does this pod's `do-not-disrupt` keep its node from voluntary disruption at `at`
/// (a duration counts from the pod's start)?
pub(super) fn protects_node(pod: &Pod, at: Duration) -> bool {
    let started = pod
        .status
        .as_ref()
        .and_then(|s| s.start_time.as_ref())
        .and_then(|t| u64::try_from(t.0.as_second()).ok())
        .map(Duration::from_secs);
    pod_protects_node(pod.annotations(), started, at)
}

/// A name for a claim launched to replace others: the pool's name and a hash of the
/// moment and its index in the plan.
pub(super) fn replacement_name(nodepool: &str, at: Duration, index: usize) -> String {
    let id = (at.as_nanos() as u64)
        .wrapping_add(index as u64)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15);
    format!("{nodepool}-{:08x}", id >> 32)
}

/// When the claim's deletion began (now, if the cache does not say).
fn deleted_at(claim: &NodeClaim) -> Duration {
    claim
        .metadata
        .deletion_timestamp
        .as_ref()
        .and_then(|t| u64::try_from(t.0.as_second()).ok())
        .map(Duration::from_secs)
        .unwrap_or_else(now)
}

/// When the drain must end: the pool's `terminationGracePeriod` after the deletion
/// (pods are deleted ahead of it so they are gone by then), and for an interrupted
/// node the notice's end (the instance goes regardless; pods are left to it).
struct Deadlines {
    grace: Option<Duration>,
    interruption: Option<Duration>,
}

impl Deadlines {
    fn of<C>(ctx: &Context<C>, claim: &NodeClaim, pool: Option<&NodePool>) -> Self {
        let grace = pool
            .and_then(|p| p.termination_grace_period)
            .map(|g| deleted_at(claim).saturating_add(g));
        let interruption = claim_condition(claim, "Terminating")
            .filter(|c| INTERRUPTION_REASONS.contains(&c.reason.as_str()))
            .map(|c| {
                c.last_transition_time
                    .as_deref()
                    .and_then(parse_time)
                    .unwrap_or_else(now)
                    .saturating_add(ctx.settings.interruption_drain)
            });
        Deadlines {
            grace,
            interruption,
        }
    }

    fn end(&self) -> Option<Duration> {
        [self.grace, self.interruption].into_iter().flatten().min()
    }
}

/// One pass of a deleted claim's drain. True when the node is drained (or has nothing
/// to drain, or its time is up) and the instance may be terminated.
pub(super) async fn drain<C: crate::cloud::CloudProvider + Send + Sync + 'static>(
    ctx: &Context<C>,
    claim: &NodeClaim,
    pool: Option<&NodePool>,
) -> Result<bool, Error> {
    if claim_condition(claim, "Terminating")
        .is_some_and(|c| NOTHING_TO_DRAIN.contains(&c.reason.as_str()))
    {
        return Ok(true);
    }
    let at = now();
    let since = deleted_at(claim);
    let deadlines = Deadlines::of(ctx, claim, pool);
    if deadlines.end().is_some_and(|end| at >= end) {
        info!(
            waited_s = at.saturating_sub(since).as_secs(),
            "drain time is up; terminating"
        );
        return Ok(true);
    }
    let Some(node_name) = claim_node_name(claim, &ctx.stores.nodes) else {
        // No Node known: it may have registered a moment ago and not reached the cache
        // yet; wait a little before concluding there is nothing to drain.
        let launched = claim
            .status
            .as_ref()
            .is_some_and(|s| s.instance_id.is_some());
        return Ok(!launched || at.saturating_sub(since) >= NODE_SETTLE);
    };
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    taint_for_disruption(ctx, &nodes, &node_name).await?;
    let pods: Api<Pod> = Api::all(ctx.client.clone());
    let on_node = pods
        .list(&ListParams::default().fields(&format!("spec.nodeName={node_name}")))
        .await?;
    let mut remaining = 0usize;
    for pod in on_node.items.iter().filter(|p| must_leave(p)) {
        remaining += 1;
        if pod.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let grace = pod
            .spec
            .as_ref()
            .and_then(|s| s.termination_grace_period_seconds)
            .and_then(|s| u64::try_from(s).ok())
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_POD_GRACE);
        let ns = pod.namespace().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
        // The node's grace period is ending: delete the pod so its own grace ends with it.
        if let Some(end) = deadlines.grace
            && at.saturating_add(grace) >= end
        {
            let left = end.saturating_sub(at).as_secs().min(grace.as_secs());
            let params = DeleteParams {
                grace_period_seconds: Some(left as u32),
                ..DeleteParams::default()
            };
            match api.delete(&pod.name_any(), &params).await {
                Ok(_) => {
                    ctx.metrics.pods_evicted.inc();
                    ctx.event(
                        pod,
                        "Warning",
                        "Deleted",
                        &format!(
                            "deleted: node {node_name}'s terminationGracePeriod ends in {left} s"
                        ),
                    )
                    .await;
                }
                Err(kube::Error::Api(s)) if s.code == 404 => remaining -= 1,
                Err(e) => return Err(e.into()),
            }
            continue;
        }
        if protects_node(pod, at) {
            debug!(pod = %pod.name_any(), "do-not-disrupt: waiting for the pod to finish");
            continue;
        }
        // Bounded, so a client that retries 429 itself cannot stall the drain.
        let eviction = tokio::time::timeout(
            EVICTION_TIMEOUT,
            api.evict(&pod.name_any(), &EvictParams::default()),
        )
        .await;
        let Ok(eviction) = eviction else {
            debug!(pod = %pod.name_any(), "eviction still pending; retrying");
            continue;
        };
        match eviction {
            Ok(_) => {
                ctx.metrics.pods_evicted.inc();
                let why = claim_condition(claim, "Terminating")
                    .map(|c| c.reason)
                    .unwrap_or_else(|| "Deleted".into());
                ctx.event(
                    pod,
                    "Normal",
                    "Evicted",
                    &format!("evicted: node {node_name} is being terminated ({why})"),
                )
                .await;
            }
            Err(kube::Error::Api(s)) if s.code == 404 => remaining -= 1,
            Err(kube::Error::Api(s)) if s.code == 429 => {
                debug!(pod = %pod.name_any(), "eviction refused by a PodDisruptionBudget; retrying");
            }
            Err(e) => return Err(e.into()),
        }
    }
    if remaining > 0 {
        return Ok(false);
    }
    ctx.metrics
        .drain_duration
        .observe(at.saturating_sub(since).as_secs_f64());
    info!(node = %node_name, "drained; terminating");
    Ok(true)
}

/// Taint the node `cooper.dev/disrupted:NoSchedule` and cordon it (already so, or gone,
/// is fine): nothing new lands on it while its pods leave.
pub(super) async fn taint_for_disruption<C>(
    ctx: &Context<C>,
    nodes: &Api<Node>,
    node_name: &str,
) -> Result<(), Error> {
    let cached = ctx
        .stores
        .nodes
        .get(&kube::runtime::reflector::ObjectRef::new(node_name));
    let Some(node) = cached else {
        return Ok(());
    };
    let spec = node.spec.clone().unwrap_or_default();
    let mut taints: Vec<serde_json::Value> = spec
        .taints
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|t| serde_json::to_value(t).unwrap_or_default())
        .collect();
    let tainted = taints
        .iter()
        .any(|t| t.get("key").and_then(|k| k.as_str()) == Some(DISRUPTED_TAINT_KEY));
    if tainted && spec.unschedulable == Some(true) {
        return Ok(());
    }
    if !tainted {
        taints.push(taint_json(&disruption_taint()));
    }
    let patch = json!({
        "metadata": {"resourceVersion": node.resource_version()},
        "spec": {"taints": taints, "unschedulable": true},
    });
    match nodes
        .patch(node_name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Remove the disruption taint and uncordon (a replacement that was abandoned).
pub(super) async fn untaint<C>(
    ctx: &Context<C>,
    nodes: &Api<Node>,
    node_name: &str,
) -> Result<(), Error> {
    let Some(node) = ctx
        .stores
        .nodes
        .get(&kube::runtime::reflector::ObjectRef::new(node_name))
    else {
        return Ok(());
    };
    let taints: Vec<serde_json::Value> = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default()
        .into_iter()
        .filter(|t| t.key != DISRUPTED_TAINT_KEY)
        .map(|t| serde_json::to_value(t).unwrap_or_default())
        .collect();
    let patch = json!({"spec": {"taints": taints, "unschedulable": false}});
    match nodes
        .patch(node_name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}
