//! A controller test's world: a real control plane, the admin client, the embedded
//! catalog and an in-memory cloud; cooper's controller started as its ServiceAccount.

use std::sync::Arc;
use std::time::Duration;

use cooper::catalog::Catalog;
use cooper::cloud::InMemoryCloud;
use cooper::controller::{Controller, Settings, start_reflectors};
use cooper::nodepool::NodePoolResource;
use cooper::provisioning::BatchSettings;
use kube::Client;
use kube::api::{Api, PostParams};
use serde_json::json;

use super::k8s::ControlPlane;
use super::kubelet::{Kubelet, KubeletOptions};

/// A control plane, the test's admin client, the embedded catalog and an in-memory cloud.
pub struct Harness {
    pub plane: ControlPlane,
    pub client: Client,
    pub catalog: Arc<Catalog>,
    pub cloud: Arc<InMemoryCloud>,
}

pub async fn setup() -> Harness {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("cooper=info")
        .try_init();
    let plane = ControlPlane::start().await;
    let client = plane.admin().await;
    let catalog = Arc::new(Catalog::embedded().expect("catalog"));
    let cloud = Arc::new(InMemoryCloud::new(&catalog));
    Harness {
        plane,
        client,
        catalog,
        cloud,
    }
}

impl Harness {
    pub fn kubelet(&self, options: KubeletOptions) -> Kubelet {
        Kubelet::start(self.client.clone(), self.catalog.clone(), options)
    }

    /// Start a controller with these settings, as cooper's ServiceAccount; it stops when
    /// the returned sender is dropped.
    pub async fn controller(&self, settings: Settings) -> tokio::sync::oneshot::Sender<()> {
        let client = self.plane.controller_client().await;
        let stores = start_reflectors(&client).await;
        let controller = Controller::new(
            client,
            self.cloud.clone(),
            self.catalog.clone(),
            settings,
            stores,
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(controller.run(async {
            let _ = stopped.await;
        }));
        stop
    }
}

pub fn settings() -> Settings {
    Settings {
        batch: BatchSettings {
            idle: Duration::from_millis(300),
            max: Duration::from_secs(2),
        },
        tick: Duration::from_millis(100),
        registration_timeout: Duration::from_secs(60),
        empty_settle: Duration::from_millis(500),
        ..Settings::default()
    }
}

/// The seeds' inf1 pool with a short empty TTL, and a general-purpose pool.
pub async fn create_pools(client: &Client, ttl_seconds: u64) {
    let api: Api<NodePoolResource> = Api::all(client.clone());
    for pool in [
        json!({"apiVersion": "cooper.dev/v1alpha1", "kind": "NodePool", "metadata": {"name": "inf1"},
               "spec": {"weight": 20,
                        "template": {"metadata": {"labels": {"cooper.dev/accelerator": "neuron"}},
                                     "spec": {"requirements": [
                                                {"key": "karpenter.sh/capacity-type", "operator": "In", "values": ["spot"]},
                                                {"key": "node.kubernetes.io/instance-type", "operator": "In", "values": ["inf1.xlarge"]}],
                                              "taints": [{"key": "aiml", "value": "true", "effect": "NoSchedule"}]}},
                        "limits": {"cpu": "16"},
                        "ttlSecondsAfterEmpty": ttl_seconds}}),
        json!({"apiVersion": "cooper.dev/v1alpha1", "kind": "NodePool", "metadata": {"name": "default"},
               "spec": {"template": {"spec": {"requirements": [
                            {"key": "cooper.dev/instance-category", "operator": "In", "values": ["c", "m"]}]}},
                        "disruption": {"consolidateAfter": format!("{ttl_seconds}s")}}}),
    ] {
        let np: NodePoolResource = serde_json::from_value(pool).expect("pool");
        api.create(&PostParams::default(), &np)
            .await
            .expect("create pool");
    }
}
