//! The disruption reconciler: nodes empty past their pool's TTL are removed, within the
//! pool's budgets, never one annotated `cooper.dev/do-not-disrupt: "true"`
//! ([`crate::disruption::expired_empty_nodes`] decides which).
//!
//! A node is empty when it runs nothing but DaemonSet and mirror pods *and* no pending pod
//! is on its way to it: nominated to it by a plan, listed in its claim, or nominated by the
//! scheduler (`status.nominatedNodeName`) — nor could take a pod still waiting for the node
//! it was planned onto: the scheduler does not follow cooper's plan, and when it binds a
//! pod to a sibling's node, the sibling's pod lands here instead. The Empty clock restarts
//! when one arrives.
//! Removal takes two looks: the node is cordoned and marked `Terminating` (reason
//! `Empty`), and only after [`Settings::empty_settle`] are its pods listed again from the
//! API server; a pod the scheduler was binding at the first look shows up by then, and
//! the node is uncordoned and kept.
//!
//! [`Settings::empty_settle`]: super::Settings::empty_settle

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use tracing::info;

use super::provisioner::node_taints;
use super::{
    Context, Error, Reconciler, claim_condition, cordon, delete_claim, holding_node, is_node_agent,
    now, parse_time, patch_claim_status, pod_demand, pod_key, quantities, set_claim_condition,
};
use crate::cloud::CloudProvider;
use crate::crd::{Condition, NodeClaim, set_condition};
use crate::disruption::{self, DO_NOT_DISRUPT, NodeState};
use crate::resources::Resources;
use crate::workload::{self, PendingPod};

/// The `Terminating` reason of an empty node between cordoning and deleting.
const EMPTY: &str = "Empty";

pub(super) struct Disruption;

impl<C: CloudProvider + Send + Sync + 'static> Reconciler<C> for Disruption {
    async fn reconcile(&mut self, ctx: &Arc<Context<C>>) -> Result<(), Error> {
        let Some(pools) = ctx.pools() else {
            return Ok(());
        };
        let claims_api: Api<NodeClaim> = Api::all(ctx.client.clone());
        let nodes_api: Api<Node> = Api::all(ctx.client.clone());
        let pods = ctx.stores.pods.state();
        let mut busy: HashMap<String, usize> = HashMap::new();
        // Names (claims and nodes) that a pending pod is on its way to.
        let mut arriving: BTreeSet<String> = BTreeSet::new();
        let mut waiting: BTreeSet<String> = BTreeSet::new();
        let nominations = ctx.state().nominations.clone();
        let volumes = ctx.volumes();
        let mut used: HashMap<String, Resources> = HashMap::new();
        let mut waiting_pods: Vec<PendingPod> = Vec::new();
        for pod in &pods {
            if let Some(node) = holding_node(pod) {
                if let Some(spec) = &pod.spec
                    && let Ok(r) = workload::effective_requests(spec)
                {
                    let e = used.entry(node.clone()).or_default();
                    *e = e.plus(&r);
                }
                if !is_node_agent(pod) {
                    *busy.entry(node).or_default() += 1;
                }
                continue;
            }
            if pod.metadata.deletion_timestamp.is_some()
                || pod.spec.as_ref().is_none_or(|s| s.node_name.is_some())
            {
                continue; // finished, or being deleted
            }
            let key = pod_key(pod);
            if let Some(n) = nominations.get(&key) {
                arriving.insert(n.target.clone());
                if ctx.nomination_waiting(n)
                    && let Ok(Some(demand)) = pod_demand(pod, &volumes)
                {
                    waiting_pods.push(demand);
                }
            }
            if let Some(node) = pod
                .status
                .as_ref()
                .and_then(|s| s.nominated_node_name.clone())
            {
                arriving.insert(node);
            }
            waiting.insert(key);
        }
        let nodes: HashMap<String, Arc<Node>> = ctx
            .stores
            .nodes
            .state()
            .into_iter()
            .map(|n| (n.name_any(), n))
            .collect();
        let mut states = Vec::new();
        for claim in ctx.stores.nodeclaims.state() {
            let name = claim.name_any();
            let Some(status) = claim.status.clone() else {
                continue;
            };
            let Some(node_name) = status.node_name.clone() else {
                continue;
            };
            let Some(node) = nodes.get(&node_name) else {
                continue;
            };
            if claim_condition(&claim, "Initialized").is_none() {
                continue;
            }
            let could_take_a_waiting_pod = || {
                let labels = node.labels();
                let taints = node_taints(node);
                let allocatable =
                    quantities(node.status.as_ref().and_then(|s| s.allocatable.as_ref()));
                let in_use = used.get(&node_name).cloned().unwrap_or_default();
                waiting_pods.iter().any(|p| {
                    p.fits_node(labels, &taints) && p.requests.fits_beside(&in_use, &allocatable)
                })
            };
            let empty = busy.get(&node_name).copied().unwrap_or(0) == 0
                && !arriving.contains(&name)
                && !arriving.contains(&node_name)
                && !claim.spec.pods.iter().any(|p| waiting.contains(p))
                && !could_take_a_waiting_pod();
            let removing = claim_condition(&claim, "Terminating").filter(|c| c.reason == EMPTY);
            if let Some(removing) = &removing
                && claim.metadata.deletion_timestamp.is_none()
            {
                let since = removing
                    .last_transition_time
                    .as_deref()
                    .and_then(parse_time)
                    .unwrap_or_else(now);
                let settled = now().saturating_sub(since) >= ctx.settings.empty_settle;
                if empty && !settled {
                    continue;
                }
                if empty && still_empty(ctx, &node_name).await? {
                    delete_claim(&claims_api, &name).await?;
                    info!(nodeclaim = %name, node = %node_name, "removing empty node");
                } else {
                    // A pod arrived between the two looks: keep the node.
                    cordon(&nodes_api, &node_name, false).await?;
                    let mut status = status.clone();
                    set_condition(
                        &mut status.conditions,
                        Condition::new("Terminating", false, "NoLongerEmpty", "a pod arrived"),
                    );
                    set_condition(
                        &mut status.conditions,
                        Condition::new("Empty", false, "NotEmpty", ""),
                    );
                    patch_claim_status(&claims_api, &name, &status).await?;
                    info!(nodeclaim = %name, node = %node_name, "a pod arrived on an empty node; keeping it");
                }
                continue;
            }
            let mut status = status;
            let since = match (empty, claim_condition(&claim, "Empty")) {
                (true, Some(c)) => c.last_transition_time.and_then(|t| parse_time(&t)),
                (true, None) => {
                    set_condition(
                        &mut status.conditions,
                        Condition::new(
                            "Empty",
                            true,
                            "Empty",
                            "no pods other than DaemonSet and mirror pods, none on their way",
                        ),
                    );
                    patch_claim_status(&claims_api, &name, &status).await?;
                    Some(now())
                }
                (false, Some(_)) => {
                    set_condition(
                        &mut status.conditions,
                        Condition::new("Empty", false, "NotEmpty", ""),
                    );
                    patch_claim_status(&claims_api, &name, &status).await?;
                    None
                }
                (false, None) => None,
            };
            states.push(NodeState {
                name: name.clone(),
                nodepool: claim.spec.node_pool.clone(),
                empty_since: since,
                do_not_disrupt: node
                    .annotations()
                    .get(DO_NOT_DISRUPT)
                    .is_some_and(|v| v == "true")
                    || claim
                        .annotations()
                        .get(DO_NOT_DISRUPT)
                        .is_some_and(|v| v == "true"),
                disrupting: claim.metadata.deletion_timestamp.is_some()
                    || claim_condition(&claim, "Terminating").is_some(),
            });
        }
        for name in disruption::expired_empty_nodes(&states, &pools, now()) {
            let Some(claim) = ctx
                .stores
                .nodeclaims
                .get(&kube::runtime::reflector::ObjectRef::new(&name))
            else {
                continue;
            };
            let Some(node_name) = claim.status.as_ref().and_then(|s| s.node_name.clone()) else {
                continue;
            };
            // Look at the API server's pods, not the cache, before acting.
            if !still_empty(ctx, &node_name).await? {
                continue;
            }
            cordon(&nodes_api, &node_name, true).await?;
            set_claim_condition(
                &claims_api,
                &claim,
                Condition::new(
                    "Terminating",
                    true,
                    EMPTY,
                    "empty past the NodePool's TTL; cordoned, removing once it is still empty",
                ),
            )
            .await?;
            info!(nodeclaim = %name, node = %node_name, "empty past its TTL: cordoned");
        }
        Ok(())
    }
}

/// The node's pods from the API server: only DaemonSet, mirror and finished pods?
async fn still_empty<C>(ctx: &Context<C>, node: &str) -> Result<bool, Error> {
    let pods: Api<Pod> = Api::all(ctx.client.clone());
    let on_node = pods
        .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
        .await?;
    Ok(on_node.items.iter().all(|p| {
        is_node_agent(p)
            || matches!(
                p.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            )
    }))
}
