//! Device plugins: a GPU or Neuron node never initialises without one, and Karpenter
//! leaves installing them to the user. When a NodePool can launch NVIDIA GPU (or Neuron)
//! nodes, cooper makes sure the matching device plugin DaemonSet exists in
//! `kube-system` — applied once with server-side apply under cooper's field manager,
//! scheduled only onto the nodes cooper labels for that accelerator, tolerating the
//! pools' taints — unless the user already runs their own plugin (a DaemonSet with the
//! plugin's name, or nodes already advertising the resource) or turned this off.

use std::collections::BTreeSet;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;

use crate::catalog::Catalog;
use crate::labels::Layered;
use crate::nodepool::NodePool;
use crate::resources;

/// Which plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Plugin {
    Nvidia,
    Neuron,
}

impl Plugin {
    /// The DaemonSet cooper applies.
    pub fn name(self) -> &'static str {
        match self {
            Plugin::Nvidia => "cooper-nvidia-device-plugin",
            Plugin::Neuron => "cooper-neuron-device-plugin",
        }
    }

    /// The extended resource the plugin advertises.
    pub fn resource(self) -> &'static str {
        match self {
            Plugin::Nvidia => resources::NVIDIA_GPU,
            Plugin::Neuron => resources::NEURON,
        }
    }

    /// The shipped manifest (`deploy/examples/device-plugins/`).
    pub fn manifest(self) -> &'static str {
        match self {
            Plugin::Nvidia => {
                include_str!("../../deploy/examples/device-plugins/nvidia-device-plugin.yaml")
            }
            Plugin::Neuron => {
                include_str!("../../deploy/examples/device-plugins/neuron-device-plugin.yaml")
            }
        }
    }

    /// A substring that identifies someone else's installation of this plugin.
    fn foreign_marker(self) -> &'static str {
        match self {
            Plugin::Nvidia => "nvidia-device-plugin",
            Plugin::Neuron => "neuron-device-plugin",
        }
    }
}

/// Device-plugin settings.
#[derive(Debug, Clone)]
pub struct DevicePluginSettings {
    /// Off: never apply a plugin.
    pub enabled: bool,
    pub nvidia_image: Option<String>,
    pub neuron_image: Option<String>,
}

impl Default for DevicePluginSettings {
    fn default() -> Self {
        DevicePluginSettings {
            enabled: true,
            nvidia_image: None,
            neuron_image: None,
        }
    }
}

/// The plugins some pool needs: a pool that admits any offering with the resource.
pub fn needed(pools: &[NodePool], catalog: &Catalog) -> BTreeSet<Plugin> {
    let mut out = BTreeSet::new();
    for pool in pools {
        for off in &catalog.offerings {
            let t = &catalog.types[off.type_index];
            let labels = Layered {
                top: &pool.labels,
                base: &off.labels,
            };
            if pool.first_rejection(&labels).is_some() {
                continue;
            }
            if t.allocatable.get(resources::NVIDIA_GPU) > 0 {
                out.insert(Plugin::Nvidia);
            }
            if t.allocatable.get(resources::NEURON) > 0 {
                out.insert(Plugin::Neuron);
            }
        }
    }
    out
}

/// The DaemonSet to apply: the shipped manifest with the image overridden and
/// tolerations for every taint (and startup taint) of the pools that need it.
pub fn desired(
    plugin: Plugin,
    pools: &[NodePool],
    catalog: &Catalog,
    image: Option<&str>,
) -> Result<serde_json::Value, String> {
    let mut ds: serde_json::Value =
        serde_saphyr::from_str(plugin.manifest()).map_err(|e| e.to_string())?;
    let spec = ds
        .pointer_mut("/spec/template/spec")
        .ok_or("manifest has no pod spec")?;
    if let Some(image) = image
        && let Some(c) = spec.pointer_mut("/containers/0/image")
    {
        *c = json!(image);
    }
    let mut tolerations: Vec<serde_json::Value> = spec
        .get("tolerations")
        .and_then(|t| t.as_array())
        .cloned()
        .unwrap_or_default();
    for pool in pools {
        if !needed(std::slice::from_ref(pool), catalog).contains(&plugin) {
            continue;
        }
        for t in pool.taints.iter().chain(&pool.startup_taints) {
            let mut tol =
                json!({"key": t.key, "operator": "Exists", "effect": format!("{:?}", t.effect)});
            if let Some(v) = &t.value {
                tol = json!({"key": t.key, "operator": "Equal", "value": v, "effect": format!("{:?}", t.effect)});
            }
            if !tolerations.contains(&tol) {
                tolerations.push(tol);
            }
        }
    }
    spec["tolerations"] = json!(tolerations);
    Ok(ds)
}

/// Ensure the plugins the pools need exist; returns the ones applied now.
pub async fn ensure(
    client: &Client,
    settings: &DevicePluginSettings,
    pools: &[NodePool],
    catalog: &Catalog,
    daemonsets: &[std::sync::Arc<DaemonSet>],
    nodes: &[std::sync::Arc<Node>],
) -> Result<Vec<Plugin>, kube::Error> {
    if !settings.enabled {
        return Ok(Vec::new());
    }
    let api: Api<DaemonSet> = Api::namespaced(client.clone(), "kube-system");
    let mut applied = Vec::new();
    for plugin in needed(pools, catalog) {
        if daemonsets.iter().any(|d| {
            d.name_any() == plugin.name() && d.namespace().as_deref() == Some("kube-system")
        }) {
            continue; // ours, already there: applied once, left alone
        }
        let foreign = daemonsets.iter().any(|d| {
            d.name_any() != plugin.name() && d.name_any().contains(plugin.foreign_marker())
        });
        let advertised = nodes.iter().any(|n| {
            n.status
                .as_ref()
                .and_then(|s| s.allocatable.as_ref())
                .is_some_and(|a| a.contains_key(plugin.resource()))
                && !n.labels().contains_key(crate::labels::keys::NODEPOOL)
        });
        if foreign || advertised {
            continue; // the user runs their own
        }
        let image = match plugin {
            Plugin::Nvidia => settings.nvidia_image.as_deref(),
            Plugin::Neuron => settings.neuron_image.as_deref(),
        };
        let ds = match desired(plugin, pools, catalog, image) {
            Ok(ds) => ds,
            Err(message) => {
                tracing::warn!(plugin = plugin.name(), %message, "cannot build device plugin manifest");
                continue;
            }
        };
        api.patch(
            plugin.name(),
            &PatchParams::apply(super::FIELD_MANAGER).force(),
            &Patch::Apply(&ds),
        )
        .await?;
        tracing::info!(plugin = plugin.name(), "device plugin applied");
        applied.push(plugin);
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_pools_need_both_plugins_and_tolerate_their_taints() {
        let catalog = Catalog::embedded().unwrap();
        let pools = crate::nodepool::defaults().unwrap();
        let need = needed(&pools, &catalog);
        assert_eq!(need, BTreeSet::from([Plugin::Nvidia, Plugin::Neuron]));
        let default_only: Vec<NodePool> = pools
            .iter()
            .filter(|p| p.name == "default")
            .cloned()
            .collect();
        assert!(
            needed(&default_only, &catalog).is_empty(),
            "CPU pools need no plugin"
        );
        let neuron = desired(
            Plugin::Neuron,
            &pools,
            &catalog,
            Some("example.com/neuron:1"),
        )
        .unwrap();
        assert_eq!(
            neuron
                .pointer("/spec/template/spec/containers/0/image")
                .unwrap(),
            "example.com/neuron:1"
        );
        let tolerations = neuron
            .pointer("/spec/template/spec/tolerations")
            .unwrap()
            .as_array()
            .unwrap();
        assert!(
            tolerations
                .iter()
                .any(|t| t["key"] == "aiml" && t["value"] == "true"),
            "the seeds' inf1 pool taint"
        );
        assert!(
            tolerations
                .iter()
                .any(|t| t["key"] == "aws.amazon.com/neuron")
        );
        let terms = neuron.pointer("/spec/template/spec/affinity/nodeAffinity/requiredDuringSchedulingIgnoredDuringExecution/nodeSelectorTerms/0/matchExpressions/0/key").unwrap();
        assert_eq!(terms, "cooper.dev/instance-accelerator-manufacturer");
    }
}
