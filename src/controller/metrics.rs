//! Prometheus metrics and the HTTP endpoints a Deployment probes: `/metrics` (text
//! format), `/healthz` (fails when a reconciler has not finished an iteration for
//! `stall_after`, so a liveness probe restarts a stuck replica), `/readyz` (the caches
//! have synced and the replica either leads or stands by; the body says which).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

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

/// Labels of a reconciler.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReconcilerLabels {
    pub reconciler: String,
}

/// A reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

/// What a replica is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Caches not synced yet.
    Starting,
    /// Caches synced; another replica leads.
    Standby,
    /// Acting.
    Leader,
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
    /// Claims with a lifecycle worker running (launch, registration, drain, termination).
    pub claim_workers: Gauge,
    /// Deletions the garbage collector refused, by reason (`node_busy`,
    /// `listed_incompletely`).
    pub gc_refused: Family<ReasonLabels, Counter>,
    /// Nodes taken away voluntarily, by reason (`Empty`, `Drifted`, `Expired`).
    pub nodes_disrupted: Family<ReasonLabels, Counter>,
    /// Consolidation moves made, by kind (`delete`, `replace`, `split`, `merge`).
    pub consolidation_moves: Family<ReasonLabels, Counter>,
    /// What the moves were expected to save when made, summed (USD per hour).
    pub consolidation_savings: Counter<f64, AtomicU64>,
    /// Pods evicted (or, when a grace period forced it, deleted) by drains.
    pub pods_evicted: Counter,
    /// How long drains took, from the claim's deletion to its node being empty.
    pub drain_duration: Histogram,
    /// When each reconciler last finished an iteration (Unix seconds).
    pub reconciler_last_success: Family<ReconcilerLabels, Gauge<f64, AtomicU64>>,
    /// Iterations that failed, by reconciler.
    pub reconciler_errors: Family<ReconcilerLabels, Counter>,
    /// How long iterations take, by reconciler.
    pub reconciler_duration: Family<ReconcilerLabels, Histogram>,
    role: AtomicU8,
    /// Last finished iteration per running reconciler (only the leader's).
    heartbeats: Mutex<HashMap<&'static str, Instant>>,
    /// A reconciler silent for this long fails `/healthz`.
    pub stall_after: Mutex<Duration>,
    /// Why this replica cannot campaign for the lease (the API refused the Lease: wrong
    /// namespace, missing RBAC): a standby that can never lead is not ready.
    pub lease_problem: Mutex<Option<String>>,
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
        let claim_workers = Gauge::default();
        registry.register(
            "nodeclaim_workers",
            "NodeClaims with a lifecycle step in progress",
            claim_workers.clone(),
        );
        let gc_refused = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "gc_refused",
            "Deletions the garbage collector refused (the node was busy, or a listing missed a live instance)",
            gc_refused.clone(),
        );
        let nodes_disrupted = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "nodes_disrupted",
            "Nodes taken away voluntarily, by reason (Empty, Drifted, Expired)",
            nodes_disrupted.clone(),
        );
        let consolidation_moves = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "consolidation_moves",
            "Consolidation moves made, by kind (delete, replace, split, merge)",
            consolidation_moves.clone(),
        );
        let consolidation_savings = Counter::<f64, AtomicU64>::default();
        registry.register(
            "consolidation_expected_savings_dollars_per_hour",
            "What consolidation moves were expected to save when made, summed",
            consolidation_savings.clone(),
        );
        let pods_evicted = Counter::default();
        registry.register(
            "pods_evicted",
            "Pods evicted, or deleted when a termination grace period forced it, by drains",
            pods_evicted.clone(),
        );
        let drain_duration =
            Histogram::new([1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0]);
        registry.register(
            "drain_duration_seconds",
            "From a NodeClaim's deletion to its node being drained",
            drain_duration.clone(),
        );
        let reconciler_last_success = Family::<ReconcilerLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "reconciler_last_success_timestamp_seconds",
            "When each reconciler last finished an iteration (lag = time() - this)",
            reconciler_last_success.clone(),
        );
        let reconciler_errors = Family::<ReconcilerLabels, Counter>::default();
        registry.register(
            "reconciler_errors",
            "Reconciler iterations that failed (retried on the next one)",
            reconciler_errors.clone(),
        );
        let reconciler_duration =
            Family::<ReconcilerLabels, Histogram>::new_with_constructor(|| {
                Histogram::new([0.001, 0.01, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0])
            });
        registry.register(
            "reconciler_iteration_duration_seconds",
            "Time per reconciler iteration",
            reconciler_duration.clone(),
        );
        Metrics {
            registry,
            claim_workers,
            gc_refused,
            nodes_disrupted,
            consolidation_moves,
            consolidation_savings,
            pods_evicted,
            drain_duration,
            reconciler_last_success,
            reconciler_errors,
            reconciler_duration,
            role: AtomicU8::new(0),
            heartbeats: Mutex::new(HashMap::new()),
            stall_after: Mutex::new(Duration::from_secs(300)),
            lease_problem: Mutex::new(None),
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
        }
    }
}

impl Metrics {
    /// This replica's role (readiness).
    pub fn set_role(&self, role: Role) {
        let v = match role {
            Role::Starting => 0,
            Role::Standby => 1,
            Role::Leader => 2,
        };
        self.role.store(v, Ordering::Relaxed);
    }

    pub fn role(&self) -> Role {
        match self.role.load(Ordering::Relaxed) {
            1 => Role::Standby,
            2 => Role::Leader,
            _ => Role::Starting,
        }
    }

    /// A reconciler finished an iteration.
    pub fn reconciled(&self, reconciler: &'static str, took: Duration) {
        let labels = ReconcilerLabels {
            reconciler: reconciler.into(),
        };
        let unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or_default();
        self.reconciler_last_success
            .get_or_create(&labels)
            .set(unix);
        self.reconciler_duration
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
        if let Ok(mut h) = self.heartbeats.lock() {
            h.insert(reconciler, Instant::now());
        }
    }

    /// A reconciler's iteration failed (it counts as alive: it is running).
    pub fn reconcile_failed(&self, reconciler: &'static str) {
        self.reconciler_errors
            .get_or_create(&ReconcilerLabels {
                reconciler: reconciler.into(),
            })
            .inc();
        if let Ok(mut h) = self.heartbeats.lock() {
            h.insert(reconciler, Instant::now());
        }
    }

    /// The reconcilers stopped (leadership lost): nothing to watch for stalls, and the
    /// leader-only gauges are cleared so a standby exports none.
    pub fn forget_reconcilers(&self) {
        if let Ok(mut h) = self.heartbeats.lock() {
            h.clear();
        }
        self.reconciler_last_success.clear();
        self.claims.clear();
        self.cost_per_hour.set(0.0);
        self.pending_pods.set(0);
        self.claim_workers.set(0);
    }

    /// Reconcilers that have not finished an iteration within `stall_after`.
    pub fn stalled(&self) -> Vec<String> {
        let limit = self
            .stall_after
            .lock()
            .map(|d| *d)
            .unwrap_or(Duration::from_secs(300));
        self.heartbeats
            .lock()
            .map(|h| {
                let mut out: Vec<String> = h
                    .iter()
                    .filter(|(_, t)| t.elapsed() > limit)
                    .map(|(n, t)| format!("{n} ({} s)", t.elapsed().as_secs()))
                    .collect();
                out.sort();
                out
            })
            .unwrap_or_default()
    }

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
        .route(
            "/healthz",
            get(|State(m): State<Arc<Metrics>>| async move {
                let stalled = m.stalled();
                if stalled.is_empty() {
                    (StatusCode::OK, "ok".to_string())
                } else {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("stalled: {}", stalled.join(", ")),
                    )
                }
            }),
        )
        .route(
            "/readyz",
            get(|State(m): State<Arc<Metrics>>| async move {
                let problem = match m.lease_problem.lock() {
                    Ok(p) => p.clone(),
                    Err(poisoned) => poisoned.into_inner().clone(),
                };
                match (m.role(), problem) {
                    (Role::Leader, _) => (StatusCode::OK, "ok: leading".to_string()),
                    (Role::Standby, Some(why)) => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("cannot campaign for the leader lease: {why}"),
                    ),
                    (Role::Standby, None) => (StatusCode::OK, "ok: standing by".to_string()),
                    (Role::Starting, _) => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "caches not synced".to_string(),
                    ),
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
