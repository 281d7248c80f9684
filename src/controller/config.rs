//! The configuration reconciler: the catalog in use (a live refresh replaces it), the
//! install's default NodePools and NodeClasses (created when missing, never changed),
//! NodeClasses resolved against the cloud (status and an Event when that fails),
//! NodePools validated (`Ready=False` naming the field, or the NodeClass problem), and the
//! device plugins the valid pools need.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::reflector;
use serde_json::json;
use tracing::{info, warn};

use super::{Context, DefaultObject, Error, Reconciler, device_plugins, now};
use crate::catalog::Catalog;
use crate::cloud::CloudProvider;
use crate::crd::{Condition, NodeClass, set_condition};
use crate::nodepool::{NodePool, NodePoolResource};

/// What the controller knows of a NodeClass between passes.
#[derive(Debug, Clone)]
struct NodeClassState {
    generation: Option<i64>,
    resolved_at: Duration,
    error: Option<String>,
}

pub(super) struct Config {
    defaults: Vec<DefaultObject>,
    catalog_updates: Option<tokio::sync::watch::Receiver<Arc<Catalog>>>,
    node_classes: HashMap<String, NodeClassState>,
    /// Pool specs already reported (by resourceVersion and NodeClass problem).
    reported: HashMap<String, String>,
}

impl Config {
    pub(super) fn new(
        defaults: Vec<DefaultObject>,
        catalog_updates: Option<tokio::sync::watch::Receiver<Arc<Catalog>>>,
    ) -> Self {
        Config {
            defaults,
            catalog_updates,
            node_classes: HashMap::new(),
            reported: HashMap::new(),
        }
    }
}

impl<C: CloudProvider + Send + Sync + 'static> Reconciler<C> for Config {
    async fn reconcile(&mut self, ctx: &Arc<Context<C>>) -> Result<(), Error> {
        if let Some(updates) = &mut self.catalog_updates
            && updates.has_changed().unwrap_or(false)
        {
            let catalog = updates.borrow_and_update().clone();
            info!(types = catalog.types.len(), source = %catalog.source, "planning with a new catalog");
            ctx.set_catalog(catalog);
        }
        let catalog = ctx.catalog();
        ctx.metrics
            .catalog_offerings
            .set(catalog.offerings.len() as i64);
        if !self.defaults.is_empty() {
            self.create_defaults(ctx).await?;
        }
        self.prepare_node_classes(ctx).await;
        let pools = self.valid_pools(ctx).await;
        ctx.set_pools(pools.clone());
        device_plugins::ensure(
            &ctx.client,
            &ctx.settings.device_plugins,
            &pools,
            &catalog,
            &ctx.stores.daemonsets.state(),
            &ctx.stores.nodes.state(),
        )
        .await?;
        Ok(())
    }
}

impl Config {
    /// Create the missing defaults; an object that exists is left as the user has it.
    async fn create_defaults<C>(&mut self, ctx: &Context<C>) -> Result<(), Error> {
        for object in &self.defaults {
            let created = match object {
                DefaultObject::NodePool(pool) => {
                    let api: Api<NodePoolResource> = Api::all(ctx.client.clone());
                    let mut pool = (**pool).clone();
                    pool.metadata.resource_version = None;
                    api.create(&PostParams::default(), &pool).await.map(|_| ())
                }
                DefaultObject::NodeClass(class) => {
                    let api: Api<NodeClass> = Api::all(ctx.client.clone());
                    let mut class = (**class).clone();
                    class.metadata.resource_version = None;
                    api.create(&PostParams::default(), &class).await.map(|_| ())
                }
            };
            match created {
                Ok(()) => {
                    let (kind, name) = match object {
                        DefaultObject::NodePool(p) => ("NodePool", p.name_any()),
                        DefaultObject::NodeClass(c) => ("NodeClass", c.name_any()),
                    };
                    info!(kind, name = %name, "created a default");
                }
                Err(kube::Error::Api(s)) if s.code == 409 => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.defaults.clear();
        Ok(())
    }

    /// Validate every NodePool; report invalid ones on their status and skip them.
    async fn valid_pools<C: CloudProvider + Send + Sync + 'static>(
        &mut self,
        ctx: &Context<C>,
    ) -> Vec<NodePool> {
        let api: Api<NodePoolResource> = Api::all(ctx.client.clone());
        let mut pools = Vec::new();
        for np in ctx.stores.nodepools.state() {
            let name = np.name_any();
            let result = NodePool::from_spec(&name, &np.spec);
            let class_problem = result
                .as_ref()
                .ok()
                .and_then(|p| self.node_class_problem(ctx, p.node_class.as_deref()?));
            let rv = format!(
                "{}/{}",
                np.resource_version().unwrap_or_default(),
                class_problem.as_deref().unwrap_or("")
            );
            let condition = match (&result, &class_problem) {
                (Err((field, message)), _) => {
                    Condition::new("Ready", false, "InvalidSpec", format!("{field}: {message}"))
                }
                (Ok(_), Some(problem)) => {
                    Condition::new("Ready", false, "NodeClassNotReady", problem.clone())
                }
                (Ok(_), None) => Condition::new("Ready", true, "Valid", ""),
            };
            // Karpenter fields accepted but not acted on yet: said on the object, not
            // ignored silently (the pool still serves).
            let not_honoured: Vec<String> = np
                .spec
                .not_honoured()
                .into_iter()
                .map(|(field, what)| format!("{field}: {what}"))
                .collect();
            let honoured = if not_honoured.is_empty() {
                Condition::new("SpecHonoured", true, "AllFieldsHonoured", "")
            } else {
                Condition::new(
                    "SpecHonoured",
                    false,
                    "FieldsNotHonoured",
                    not_honoured.join("; "),
                )
            };
            if self.reported.get(&name) != Some(&rv) {
                let mut status = np.status.clone().unwrap_or_default();
                let honoured_changed = set_condition(&mut status.conditions, honoured.clone());
                let ready_changed = set_condition(&mut status.conditions, condition.clone());
                if honoured_changed && honoured.status == "False" {
                    warn!(nodepool = %name, message = %honoured.message, "NodePool fields not honoured");
                    ctx.event(&*np, "Warning", &honoured.reason, &honoured.message)
                        .await;
                }
                if ready_changed || honoured_changed {
                    let patch = json!({"status": status});
                    if let Err(e) = api
                        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                        .await
                    {
                        warn!(nodepool = %name, error = %e, "could not write NodePool status");
                    }
                    if ready_changed && condition.status == "False" {
                        warn!(nodepool = %name, message = %condition.message, "invalid NodePool");
                        ctx.event(&*np, "Warning", &condition.reason, &condition.message)
                            .await;
                    }
                }
                self.reported.insert(name.clone(), rv);
            }
            self.write_usage(ctx, &api, &np).await;
            if let (Ok(pool), None) = (result, class_problem) {
                pools.push(ctx.as_launched(pool));
            }
        }
        pools
    }

    /// Write the pool's `status.resources` (capacity of its launched nodes) and
    /// `status.nodes` when they changed.
    async fn write_usage<C: CloudProvider + Send + Sync + 'static>(
        &self,
        ctx: &Context<C>,
        api: &Api<NodePoolResource>,
        np: &NodePoolResource,
    ) {
        let name = np.name_any();
        let catalog = ctx.catalog();
        let mut total = crate::resources::Resources::new();
        let mut nodes = 0u32;
        for claim in ctx.stores.nodeclaims.state() {
            if claim.spec.node_pool != name {
                continue;
            }
            let Some(t) = claim
                .status
                .as_ref()
                .and_then(|s| s.instance_type.as_deref())
                .and_then(|t| catalog.instance_type(t))
            else {
                continue;
            };
            nodes += 1;
            total = total.plus(&t.capacity);
        }
        let resources = total.to_quantities();
        let current = np.status.clone().unwrap_or_default();
        if current.resources == resources && current.nodes == nodes {
            return;
        }
        let patch = json!({"status": {"resources": resources, "nodes": nodes}});
        if let Err(e) = api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            warn!(nodepool = %name, error = %e, "could not write NodePool usage");
        }
    }

    /// Why a pool's NodeClass cannot be launched with, if it cannot.
    fn node_class_problem<C>(&self, ctx: &Context<C>, class: &str) -> Option<String> {
        let exists = ctx
            .stores
            .nodeclasses
            .get(&reflector::ObjectRef::new(class))
            .is_some();
        if !exists {
            return Some(format!("NodeClass {class} not found"));
        }
        match self.node_classes.get(class) {
            None => Some(format!("NodeClass {class} not resolved yet")),
            Some(NodeClassState { error: Some(e), .. })
                if e.starts_with(&format!("NodeClass {class}")) =>
            {
                Some(e.clone())
            }
            Some(NodeClassState { error: Some(e), .. }) => Some(format!("NodeClass {class}: {e}")),
            Some(_) => None,
        }
    }

    /// Resolve NodeClasses against the cloud when they change and every
    /// `resolve_node_classes_every`, writing what they resolved to (or the cloud's
    /// error) to their status, with an Event when resolution fails.
    async fn prepare_node_classes<C: CloudProvider + Send + Sync + 'static>(
        &mut self,
        ctx: &Context<C>,
    ) {
        let api: Api<NodeClass> = Api::all(ctx.client.clone());
        let at = now();
        let classes = ctx.stores.nodeclasses.state();
        self.node_classes
            .retain(|name, _| classes.iter().any(|c| &c.name_any() == name));
        ctx.state()
            .resolved_classes
            .retain(|name, _| classes.iter().any(|c| &c.name_any() == name));
        for class in classes {
            let name = class.name_any();
            let generation = class.metadata.generation;
            let due = self.node_classes.get(&name).is_none_or(|s| {
                s.generation != generation
                    || at.saturating_sub(s.resolved_at) >= ctx.settings.resolve_node_classes_every
                    || (s.error.is_some()
                        && at.saturating_sub(s.resolved_at) >= Duration::from_secs(30))
            });
            if !due {
                continue;
            }
            let result = ctx
                .cloud_call(
                    "prepare_node_class",
                    ctx.cloud.prepare_node_class(&name, &class.spec),
                )
                .await;
            let previous_error = self.node_classes.get(&name).and_then(|s| s.error.clone());
            let (mut status, error) = match result {
                Ok(status) => {
                    ctx.state()
                        .resolved_classes
                        .insert(name.clone(), (class.spec.clone(), status.clone()));
                    (status, None)
                }
                Err(e) => (
                    class.status.clone().unwrap_or_default(),
                    Some(e.to_string()),
                ),
            };
            status.conditions = class
                .status
                .as_ref()
                .map(|s| s.conditions.clone())
                .unwrap_or_default();
            let condition = match &error {
                None => Condition::new("Ready", true, "Resolved", ""),
                Some(e) => Condition::new("Ready", false, "ResolutionFailed", e.clone()),
            };
            set_condition(&mut status.conditions, condition);
            if class.status.as_ref() != Some(&status) {
                let patch = json!({"status": status});
                if let Err(e) = api
                    .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                {
                    warn!(nodeclass = %name, error = %e, "could not write NodeClass status");
                }
            }
            if let Some(e) = &error
                && previous_error.as_ref() != Some(e)
            {
                warn!(nodeclass = %name, error = %e, "NodeClass cannot be resolved");
                ctx.event(&*class, "Warning", "ResolutionFailed", e).await;
            }
            self.node_classes.insert(
                name,
                NodeClassState {
                    generation,
                    resolved_at: at,
                    error,
                },
            );
        }
    }
}
