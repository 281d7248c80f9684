//! Prometheus metrics and the HTTP endpoints a Deployment probes: `/metrics` (text
//! format), `/healthz` (the process serves), `/readyz` (the caches have synced).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Labels of a launched or terminated node.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeLabels {
    pub nodepool: String,
    pub instance_type: String,
    pub capacity_type: String,
}

/// Labels of a termination.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TerminationLabels {
    pub nodepool: String,
    pub instance_type: String,
    pub capacity_type: String,
    pub reason: String,
}

/// Labels of a cloud error.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CloudErrorLabels {
    pub operation: String,
    pub kind: String,
}

/// Labels of an interruption notice.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InterruptionLabels {
    pub kind: String,
}

/// Labels of claims by phase.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub phase: String,
}

/// Everything cooper exports.
pub struct Metrics {
    registry: Registry,
    pub pending_pods: Gauge,
    pub plan_duration: Histogram,
    pub launched: Family<NodeLabels, Counter>,
    pub terminated: Family<TerminationLabels, Counter>,
    pub cost_per_hour: Gauge<f64, AtomicU64>,
    pub claims: Family<PhaseLabels, Gauge>,
    pub cloud_errors: Family<CloudErrorLabels, Counter>,
    /// Interruption notices received, by kind.
    pub interruptions: Family<InterruptionLabels, Counter>,
    /// Offerings in the catalog the controller plans with.
    pub catalog_offerings: Gauge,
    /// Live catalog refreshes that failed (the last good catalog stayed in use).
    pub catalog_refresh_failures: Counter,
    pub ready: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("cooper");
        let pending_pods = Gauge::default();
        registry.register(
            "pending_pods",
            "Pods waiting for a node that cooper provisions for",
            pending_pods.clone(),
        );
        let plan_duration =
            Histogram::new([0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]);
        registry.register(
            "plan_duration_seconds",
            "Time to plan one batch",
            plan_duration.clone(),
        );
        let launched = Family::<NodeLabels, Counter>::default();
        registry.register("nodes_launched", "Nodes launched", launched.clone());
        let terminated = Family::<TerminationLabels, Counter>::default();
        registry.register("nodes_terminated", "Nodes terminated", terminated.clone());
        let cost_per_hour = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "cluster_cost_per_hour_dollars",
            "Hourly price of the nodes cooper launched (catalog prices)",
            cost_per_hour.clone(),
        );
        let claims = Family::<PhaseLabels, Gauge>::default();
        registry.register("nodeclaims", "NodeClaims by phase", claims.clone());
        let cloud_errors = Family::<CloudErrorLabels, Counter>::default();
        registry.register("cloud_errors", "Failed cloud calls", cloud_errors.clone());
        let interruptions = Family::<InterruptionLabels, Counter>::default();
        registry.register(
            "interruptions",
            "Interruption notices received (spot reclaim, rebalance, stopping, maintenance)",
            interruptions.clone(),
        );
        let catalog_offerings = Gauge::default();
        registry.register(
            "catalog_offerings",
            "Offerings (type x zone x capacity type) in the catalog cooper plans with",
            catalog_offerings.clone(),
        );
        let catalog_refresh_failures = Counter::default();
        registry.register(
            "catalog_refresh_failures",
            "Live catalog refreshes that failed; the last good catalog stayed in use",
            catalog_refresh_failures.clone(),
        );
        Metrics {
            registry,
            pending_pods,
            plan_duration,
            launched,
            terminated,
            cost_per_hour,
            claims,
            cloud_errors,
            interruptions,
            catalog_offerings,
            catalog_refresh_failures,
            ready: AtomicBool::new(false),
        }
    }
}

impl Metrics {
    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// The router serving `/metrics`, `/healthz` and `/readyz`.
pub fn router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|State(m): State<Arc<Metrics>>| async move {
                (
                    [(
                        "content-type",
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    m.encode(),
                )
            }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State(m): State<Arc<Metrics>>| async move {
                if m.ready.load(Ordering::Relaxed) {
                    (StatusCode::OK, "ok")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "caches not synced")
                }
            }),
        )
        .with_state(metrics)
}

/// Serve the router on `addr` until the process ends.
pub async fn serve(addr: std::net::SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, router(metrics)).await
}
