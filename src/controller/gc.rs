//! The garbage collector: compares the cloud's instances with the NodeClaims every
//! `gc_interval`, and acts only on what it can prove.
//!
//! - An instance tagged as this cluster's with no claim for longer than `gc_grace` (its
//!   claim was deleted without terminating it) is terminated, after asking the API server
//!   (not the cache) that the claim is really gone.
//! - An instance tagged for a claim that records a *different* instance (a duplicate
//!   launch) is terminated after the same grace.
//! - A launched claim whose instance is missing from the listing is *not* deleted on the
//!   listing's word: the instance is looked up by id and by the claim's tag, and only a
//!   definite "terminated" or "does not exist" counts. Even then a Node that is Ready and
//!   runs pods other than DaemonSet pods is never deleted: an Event and the
//!   `cooper_gc_refused` metric say so instead, and the claim goes once the node stops
//!   (a dead instance's node turns NotReady within a minute).
//!
//! Listings page through every result (`NextToken`); a listing that failed is never acted
//! on.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use kube::ResourceExt;
use kube::api::Api;
use tracing::warn;

use super::{
    Context, Error, Reconciler, claim_condition, claim_node_name, delete_claim, holding_node,
    is_node_agent, metrics, node_ready, now, parse_time, set_claim_condition,
};
use crate::cloud::{CloudError, CloudProvider, InstanceStatus};
use crate::crd::{Condition, NodeClaim};

#[derive(Default)]
pub(super) struct Collector {
    last: Option<Duration>,
    /// Instances seen without a claim, and since when.
    orphans_seen: HashMap<String, Duration>,
    /// Instances seen tagged for a claim that records another instance, and since when.
    extras_seen: HashMap<String, Duration>,
}

impl<C: CloudProvider + Send + Sync + 'static> Reconciler<C> for Collector {
    async fn reconcile(&mut self, ctx: &Arc<Context<C>>) -> Result<(), Error> {
        let at = now();
        if self
            .last
            .is_some_and(|t| at.saturating_sub(t) < ctx.settings.gc_interval)
        {
            return Ok(());
        }
        self.last = Some(at);
        let instances = match ctx.cloud_call("list", ctx.cloud.list()).await {
            Ok(i) => i,
            Err(e) => {
                warn!(error = %e, "garbage collection skipped: cannot list instances");
                return Ok(());
            }
        };
        let claims_api: Api<NodeClaim> = Api::all(ctx.client.clone());
        let claims: HashMap<String, Arc<NodeClaim>> = ctx
            .stores
            .nodeclaims
            .state()
            .into_iter()
            .map(|c| (c.name_any(), c))
            .collect();
        let grace = ctx.settings.gc_grace;

        let mut orphans = HashMap::new();
        let mut extras = HashMap::new();
        for instance in &instances {
            let recorded = claims
                .get(&instance.claim)
                .map(|c| c.status.as_ref().and_then(|s| s.instance_id.clone()));
            let (seen, reason) = match recorded {
                None => (&mut orphans, "Orphaned"),
                Some(Some(id)) if id != instance.id => (&mut extras, "Duplicate"),
                Some(_) => continue,
            };
            let previous = if reason == "Orphaned" {
                &self.orphans_seen
            } else {
                &self.extras_seen
            };
            let since = *previous.get(&instance.id).unwrap_or(&at);
            seen.insert(instance.id.clone(), since);
            if at.saturating_sub(since) < grace {
                continue;
            }
            // The store may lag: ask the API server before terminating.
            let claim = if instance.claim.is_empty() {
                None
            } else {
                claims_api.get_opt(&instance.claim).await?
            };
            let still = match (&claim, reason) {
                (None, "Orphaned") => true,
                (Some(c), "Duplicate") => c
                    .status
                    .as_ref()
                    .and_then(|s| s.instance_id.as_ref())
                    .is_some_and(|id| *id != instance.id),
                _ => false,
            };
            if !still {
                continue;
            }
            match ctx
                .cloud_call("terminate", ctx.cloud.terminate(&instance.id))
                .await
            {
                Ok(()) | Err(CloudError::NotFound(_)) => {
                    warn!(instance = %instance.id, nodeclaim = %instance.claim, reason, "terminated an instance no NodeClaim owns");
                    ctx.metrics
                        .terminated
                        .get_or_create(&metrics::TerminationLabels {
                            nodepool: instance.nodepool.clone(),
                            instance_type: instance.instance_type.clone(),
                            capacity_type: instance.capacity_type.as_str().into(),
                            reason: reason.into(),
                        })
                        .inc();
                    orphans.remove(&instance.id);
                    extras.remove(&instance.id);
                }
                Err(e) => {
                    warn!(instance = %instance.id, error = %e, "could not terminate an instance no NodeClaim owns");
                }
            }
        }
        self.orphans_seen = orphans;
        self.extras_seen = extras;

        let listed: std::collections::HashSet<&str> =
            instances.iter().map(|i| i.id.as_str()).collect();
        for claim in claims.values() {
            if claim.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let Some(id) = claim.status.as_ref().and_then(|s| s.instance_id.as_deref()) else {
                continue;
            };
            if listed.contains(id) {
                continue;
            }
            let launched = claim_condition(claim, "Launched")
                .and_then(|c| c.last_transition_time)
                .and_then(|t| parse_time(&t));
            if launched.is_none_or(|t| at.saturating_sub(t) < grace) {
                continue;
            }
            let name = claim.name_any();
            // Not on the listing's word: look the instance up by id, and by the claim's tag.
            match ctx
                .cloud_call("describe_instance", ctx.cloud.describe_instance(id))
                .await
            {
                Ok(InstanceStatus::Terminated | InstanceStatus::NotFound) => {}
                Ok(InstanceStatus::Exists(_)) => {
                    warn!(nodeclaim = %name, instance = %id, "the instance listing missed a live instance; keeping its claim");
                    refused(ctx, "listed_incompletely");
                    continue;
                }
                Err(e) => {
                    warn!(nodeclaim = %name, instance = %id, error = %e, "cannot look the instance up; keeping its claim");
                    continue;
                }
            }
            match ctx
                .cloud_call("instances_for_claim", ctx.cloud.instances_for_claim(&name))
                .await
            {
                Ok(live) if live.is_empty() => {}
                Ok(_) => continue, // another instance runs for it (a duplicate, see above)
                Err(_) => continue,
            }
            if let Some(node) = claim_node_name(claim, &ctx.stores.nodes)
                && node_busy(ctx, &node)
            {
                warn!(nodeclaim = %name, instance = %id, node = %node, "the cloud says the instance is gone but its node is Ready and running pods; not deleting it");
                refused(ctx, "node_busy");
                ctx.event(
                    &**claim,
                    "Warning",
                    "InstanceGoneNodeBusy",
                    &format!("the cloud reports instance {id} gone, but node {node} is Ready and running pods; it is kept until the node stops"),
                )
                .await;
                continue;
            }
            warn!(nodeclaim = %name, instance = %id, "instance is gone; deleting its NodeClaim");
            ctx.event(
                &**claim,
                "Warning",
                "InstanceGone",
                &format!("instance {id} no longer exists; the NodeClaim and its Node are deleted and their pods re-planned"),
            )
            .await;
            set_claim_condition(
                &claims_api,
                claim,
                Condition::new(
                    "Terminating",
                    true,
                    "InstanceGone",
                    format!("instance {id} no longer exists"),
                ),
            )
            .await?;
            delete_claim(&claims_api, &name).await?;
        }
        Ok(())
    }

    fn interval(&self, ctx: &Context<C>) -> Duration {
        ctx.settings.tick.max(Duration::from_secs(1))
    }
}

fn refused<C>(ctx: &Context<C>, reason: &str) {
    ctx.metrics
        .gc_refused
        .get_or_create(&metrics::ReasonLabels {
            reason: reason.into(),
        })
        .inc();
}

/// Is the node Ready and running pods other than DaemonSet and mirror pods?
fn node_busy<C>(ctx: &Context<C>, node: &str) -> bool {
    let ready = ctx
        .stores
        .nodes
        .get(&kube::runtime::reflector::ObjectRef::new(node))
        .is_some_and(|n| node_ready(&n));
    ready
        && ctx
            .stores
            .pods
            .state()
            .iter()
            .any(|p| holding_node(p).as_deref() == Some(node) && !is_node_agent(p))
}
