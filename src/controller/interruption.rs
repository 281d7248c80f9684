//! Interruptions: the cloud says an instance is going away (a spot reclaim, the
//! instance stopping, scheduled maintenance). The notice is recorded on the claim as a
//! `Terminating` condition and the claim is deleted: the termination flow
//! ([`super::termination`]) then taints the node and evicts its pods through the
//! Eviction API (PodDisruptionBudgets apply), so their controllers recreate them and the
//! provisioning loop plans new capacity at once, and terminates the instance once the
//! node is drained or the notice's time is nearly up. A reclaimed spot offering is
//! avoided for a while, as after a capacity error. Interruptions are not voluntary and
//! no disruption budget holds them.

use std::sync::Arc;

use kube::ResourceExt;
use kube::api::Api;
use tracing::{debug, info, warn};

use super::{
    Context, Error, Reconciler, claim_condition, delete_claim, metrics, set_claim_condition,
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
            // Already draining for an interruption; a claim being removed for another
            // reason gets the notice's (shorter) deadline.
            if claim_condition(claim, "Terminating")
                .is_some_and(|c| INTERRUPTION_REASONS.contains(&c.reason.as_str()))
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
            delete_claim(&claims_api, &name).await?;
        }
        Ok(())
    }

    fn interval(&self, _ctx: &Context<C>) -> std::time::Duration {
        std::time::Duration::from_millis(100)
    }
}
