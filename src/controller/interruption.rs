//! Interruptions: the cloud says an instance is going away (a spot reclaim, the
//! instance stopping, scheduled maintenance). The node is cordoned, its pods are evicted
//! through the Eviction API (PodDisruptionBudgets apply) so their controllers recreate
//! them and the provisioning loop plans new capacity at once, and the claim is deleted
//! once the node is drained, or when the notice's time is nearly up. A reclaimed spot
//! offering is avoided for a while, as after a capacity error.
//!
//! The drain is driven by the claim's `Terminating` condition, not by memory, so a new
//! leader picks up a drain its predecessor started.

use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::ResourceExt;
use kube::api::{Api, EvictParams, ListParams, Patch, PatchParams};
use serde_json::json;
use tracing::{debug, info, warn};

use super::{
    Controller, Error, claim_condition, claim_node_name, delete_claim, is_node_agent, metrics, now,
    parse_time, set_claim_condition,
};
use crate::catalog::CapacityType;
use crate::cloud::{CloudProvider, Interruption, InterruptionKind};
use crate::crd::{Condition, NodeClaim};
use crate::planner::OfferingKey;

/// The `Terminating` reasons that mean "drain for an interruption".
const INTERRUPTION_REASONS: [&str; 3] = [
    "SpotInterrupted",
    "InstanceStopping",
    "ScheduledMaintenance",
];

/// How long a drain waits for a claim's Node to show up in the cache before deciding the
/// instance never registered one.
const NODE_SETTLE: std::time::Duration = std::time::Duration::from_secs(10);

/// The longest one eviction call may take before it counts as blocked.
const EVICTION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Aborts a task when dropped: the interruption poller lives exactly as long as the
/// controller that reads its notices.
pub(super) struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Start polling the cloud for interruption notices into a channel the controller
/// drains on each iteration.
pub(super) fn poll<C: CloudProvider + Send + Sync + 'static>(
    cloud: Arc<C>,
    receiver: &mut Option<tokio::sync::mpsc::UnboundedReceiver<Interruption>>,
) -> tokio::task::JoinHandle<()> {
    let (send, receive) = tokio::sync::mpsc::unbounded_channel();
    *receiver = Some(receive);
    tokio::spawn(async move {
        loop {
            match cloud.interruptions().await {
                Ok(notices) => {
                    for notice in notices {
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
    })
}

/// Pods that must leave a node before it goes: not DaemonSet or mirror pods, not
/// finished.
fn must_leave(pod: &Pod) -> bool {
    let finished = matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    );
    !is_node_agent(pod) && !finished
}

impl<C: CloudProvider + Send + Sync + 'static> Controller<C> {
    /// Record each notice received since the last iteration on its claim: an Event, and
    /// for notices that act a `Terminating` condition that starts the drain.
    pub(super) async fn handle_interruptions(&mut self) -> Result<(), Error> {
        let mut notices = Vec::new();
        if let Some(receiver) = &mut self.interruptions {
            while let Ok(notice) = receiver.try_recv() {
                notices.push(notice);
            }
        }
        if notices.is_empty() {
            return Ok(());
        }
        let claims_api: Api<NodeClaim> = Api::all(self.client.clone());
        let claims = self.stores.nodeclaims.state();
        for notice in notices {
            let reason = notice.kind.reason();
            self.metrics
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
                self.event(&**claim, "Normal", reason, &what).await;
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
                self.unavailable.insert(
                    OfferingKey {
                        instance_type: instance_type.clone(),
                        zone: zone.clone(),
                        capacity_type: CapacityType::Spot,
                    },
                    now() + self.settings.unavailable_for,
                );
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
            self.event(
                &**claim,
                "Warning",
                reason,
                &format!("{what}; cordoning and draining the node"),
            )
            .await;
        }
        Ok(())
    }

    /// Claims draining for an interruption: cordon, evict, and delete the claim once
    /// the node is empty or the notice's time is up (its finalizer then terminates the
    /// instance and deletes the Node).
    pub(super) async fn drain_interrupted(&mut self) -> Result<(), Error> {
        let claims_api: Api<NodeClaim> = Api::all(self.client.clone());
        let nodes_api: Api<Node> = Api::all(self.client.clone());
        let all_pods: Api<Pod> = Api::all(self.client.clone());
        for claim in self.stores.nodeclaims.state() {
            if claim.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let Some(terminating) = claim_condition(&claim, "Terminating") else {
                continue;
            };
            if !INTERRUPTION_REASONS.contains(&terminating.reason.as_str()) {
                continue;
            }
            let name = claim.name_any();
            let since = terminating
                .last_transition_time
                .as_deref()
                .and_then(parse_time)
                .unwrap_or_else(now);
            let out_of_time = now().saturating_sub(since) >= self.settings.interruption_drain;
            let node_name = claim_node_name(&claim, &self.stores.nodes);
            // No Node known: it may have registered a moment ago and not reached the
            // cache yet; wait a little before concluding there is nothing to drain.
            if node_name.is_none() && !out_of_time && now().saturating_sub(since) < NODE_SETTLE {
                continue;
            }
            let mut remaining = 0usize;
            if let Some(node_name) = &node_name
                && !out_of_time
            {
                let cordoned = self
                    .stores
                    .nodes
                    .get(&kube::runtime::reflector::ObjectRef::new(node_name))
                    .and_then(|n| n.spec.as_ref()?.unschedulable)
                    .unwrap_or(false);
                if !cordoned {
                    match nodes_api
                        .patch(
                            node_name,
                            &PatchParams::default(),
                            &Patch::Merge(&json!({"spec": {"unschedulable": true}})),
                        )
                        .await
                    {
                        Ok(_) => {}
                        Err(kube::Error::Api(s)) if s.code == 404 => {}
                        Err(e) => return Err(e.into()),
                    }
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
                    let api: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
                    // Bounded, so a client that retries 429 itself cannot stall the loop.
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
                            self.event(
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
                continue;
            }
            info!(nodeclaim = %name, node = ?node_name, out_of_time, "interrupted node drained; terminating");
            delete_claim(&claims_api, &name).await?;
        }
        Ok(())
    }
}
