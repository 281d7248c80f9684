//! Interruptions: the cloud says an instance is going away (a spot reclaim, the
//! instance stopping, scheduled maintenance). The node is cordoned, its pods are evicted
//! through the Eviction API (PodDisruptionBudgets apply) so their controllers recreate
//! them and the provisioning loop plans new capacity at once, and the claim is deleted
//! once the node is drained, or when the notice's time is nearly up. A reclaimed spot
//! offering is avoided for a while, as after a capacity error.
//!
//! The drain is driven by the claim's `Terminating` condition, not by memory, so a new
//! leader picks up a drain its predecessor started; each drain is one claim's step in the
//! lifecycle reconciler, so a slow eviction holds up no other claim.

use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::ResourceExt;
use kube::api::{Api, EvictParams, ListParams};
use tracing::{debug, info, warn};

use super::{
    Context, Error, Reconciler, claim_condition, claim_node_name, cordon, delete_claim,
    is_node_agent, metrics, now, parse_time, set_claim_condition,
};
use crate::catalog::CapacityType;
use crate::cloud::{CloudProvider, Interruption, InterruptionKind};
use crate::crd::{Condition, NodeClaim};

/// The `Terminating` reasons that mean "drain for an interruption".
pub(super) const INTERRUPTION_REASONS: [&str; 3] = [
    "SpotInterrupted",
    "InstanceStopping",
    "ScheduledMaintenance",
];

/// How long a drain waits for a claim's Node to show up in the cache before deciding the
/// instance never registered one.
const NODE_SETTLE: std::time::Duration = std::time::Duration::from_secs(10);

/// The longest one eviction call may take before it counts as blocked.
const EVICTION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The interruption reconciler: reads the notices a poller task receives from the cloud
/// and records each on its claim.
pub(super) struct Interruptions {
    notices: tokio::sync::mpsc::UnboundedReceiver<Interruption>,
    _poller: super::AbortOnDrop,
}

impl Interruptions {
    /// Start polling the cloud for notices (only while this controller acts).
    pub(super) fn start<C: CloudProvider + Send + Sync + 'static>(cloud: Arc<C>) -> Self {
        let (send, notices) = tokio::sync::mpsc::unbounded_channel();
        let poller = tokio::spawn(async move {
            loop {
                match cloud.interruptions().await {
                    Ok(batch) => {
                        for notice in batch {
                            if send.send(notice).is_err() {
                                return;
                            }
                        }
                    }
                    Err(e) => {
                        warn!(error = %e, "cannot read interruption notices; retrying");
                        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                    }
                }
            }
        });
        Interruptions {
            notices,
            _poller: super::AbortOnDrop(poller),
        }
    }
}

/// Pods that must leave a node before it goes: not DaemonSet or mirror pods, not
/// finished.
pub(super) fn must_leave(pod: &Pod) -> bool {
    let finished = matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    );
    !is_node_agent(pod) && !finished
}

impl<C: CloudProvider + Send + Sync + 'static> Reconciler<C> for Interruptions {
    /// Record each notice received since the last pass on its claim: an Event, and for
    /// notices that act a `Terminating` condition that starts the drain.
    async fn reconcile(&mut self, ctx: &Arc<Context<C>>) -> Result<(), Error> {
        let mut notices = Vec::new();
        while let Ok(notice) = self.notices.try_recv() {
            notices.push(notice);
        }
        if notices.is_empty() {
            return Ok(());
        }
        let claims_api: Api<NodeClaim> = Api::all(ctx.client.clone());
        let claims = ctx.stores.nodeclaims.state();
        for notice in notices {
            let reason = notice.kind.reason();
            ctx.metrics
                .interruptions
                .get_or_create(&metrics::InterruptionLabels {
                    kind: reason.into(),
                })
                .inc();
            let Some(claim) = claims.iter().find(|c| {
                c.status.as_ref().and_then(|s| s.instance_id.as_deref())
                    == Some(notice.instance_id.as_str())
            }) else {
                debug!(instance = %notice.instance_id, reason, "notice for an instance cooper does not manage");
                continue;
            };
            let name = claim.name_any();
            let what = match &notice.kind {
                InterruptionKind::SpotInterruption => {
                    "spot capacity is being reclaimed (two minutes' notice)".to_string()
                }
                InterruptionKind::Rebalance => "elevated risk of a spot interruption".to_string(),
                InterruptionKind::StateChange(state) => format!("the instance is {state}"),
                InterruptionKind::ScheduledChange => {
                    "scheduled maintenance will retire the instance".to_string()
                }
            };
            if !notice.kind.acts() {
                info!(nodeclaim = %name, instance = %notice.instance_id, reason, "interruption notice (no action)");
                ctx.event(&**claim, "Normal", reason, &what).await;
                continue;
            }
            if claim.metadata.deletion_timestamp.is_some()
                || claim_condition(claim, "Terminating").is_some()
            {
                continue;
            }
            let status = claim.status.clone().unwrap_or_default();
            if notice.kind == InterruptionKind::SpotInterruption
                && let (Some(instance_type), Some(zone)) = (&status.instance_type, &status.zone)
            {
                ctx.mark_unavailable(instance_type, zone, CapacityType::Spot);
            }
            warn!(nodeclaim = %name, instance = %notice.instance_id, reason, "interrupted: draining");
            set_claim_condition(
                &claims_api,
                claim,
                Condition::new(
                    "Terminating",
                    true,
                    reason,
                    format!("{what}; draining the node"),
                ),
            )
            .await?;
            ctx.event(
                &**claim,
                "Warning",
                reason,
                &format!("{what}; cordoning and draining the node"),
            )
            .await;
        }
        Ok(())
    }

    fn interval(&self, _ctx: &Context<C>) -> std::time::Duration {
        std::time::Duration::from_millis(100)
    }
}

/// One pass of an interrupted claim's drain: cordon, evict, and delete the claim once the
/// node is empty or the notice's time is up (its finalizer then terminates the instance
/// and deletes the Node).
pub(super) async fn drain<C: CloudProvider + Send + Sync + 'static>(
    ctx: &Context<C>,
    claim: &NodeClaim,
) -> Result<(), Error> {
    let claims_api: Api<NodeClaim> = Api::all(ctx.client.clone());
    let nodes_api: Api<Node> = Api::all(ctx.client.clone());
    let all_pods: Api<Pod> = Api::all(ctx.client.clone());
    let Some(terminating) = claim_condition(claim, "Terminating") else {
        return Ok(());
    };
    let name = claim.name_any();
    let since = terminating
        .last_transition_time
        .as_deref()
        .and_then(parse_time)
        .unwrap_or_else(now);
    let out_of_time = now().saturating_sub(since) >= ctx.settings.interruption_drain;
    let node_name = claim_node_name(claim, &ctx.stores.nodes);
    // No Node known: it may have registered a moment ago and not reached the cache yet;
    // wait a little before concluding there is nothing to drain.
    if node_name.is_none() && !out_of_time && now().saturating_sub(since) < NODE_SETTLE {
        return Ok(());
    }
    let mut remaining = 0usize;
    if let Some(node_name) = &node_name
        && !out_of_time
    {
        let cordoned = ctx
            .stores
            .nodes
            .get(&kube::runtime::reflector::ObjectRef::new(node_name))
            .and_then(|n| n.spec.as_ref()?.unschedulable)
            .unwrap_or(false);
        if !cordoned {
            cordon(&nodes_api, node_name, true).await?;
        }
        let on_node = all_pods
            .list(&ListParams::default().fields(&format!("spec.nodeName={node_name}")))
            .await?;
        for pod in on_node.items.iter().filter(|p| must_leave(p)) {
            remaining += 1;
            if pod.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let ns = pod.namespace().unwrap_or_default();
            let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
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
                    ctx.event(
                        pod,
                        "Normal",
                        "Evicted",
                        &format!(
                            "evicted: node {node_name} is being interrupted ({})",
                            terminating.reason
                        ),
                    )
                    .await;
                }
                Err(kube::Error::Api(s)) if s.code == 404 => remaining -= 1,
                Err(kube::Error::Api(s)) if s.code == 429 => {
                    debug!(pod = %pod.name_any(), "eviction blocked by a PodDisruptionBudget; retrying");
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    if remaining > 0 {
        return Ok(());
    }
    info!(node = ?node_name, out_of_time, "interrupted node drained; terminating");
    delete_claim(&claims_api, &name).await?;
    Ok(())
}
