//! Leader election through a `coordination.k8s.io/v1` Lease, so several replicas run
//! and only one acts. The leader renews the lease every `renew_every`; a replica takes
//! the lease over only when its holder has not renewed it for `lease_duration`. Every
//! write carries the lease's resourceVersion, so two candidates cannot both win. A
//! leader that fails to renew stops acting at once (before another can take over), and a
//! replica shutting down gives the lease up (as client-go's `ReleaseOnCancel` does) so
//! another takes over at once instead of after `lease_duration`.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::{Client, ResourceExt};
use tokio::sync::watch;
use tracing::{info, warn};

/// Lease settings.
#[derive(Debug, Clone)]
pub struct LeaseSettings {
    pub namespace: String,
    pub name: String,
    /// This replica's identity (the pod name in a cluster).
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_every: Duration,
}

/// Campaigns for and holds a Lease.
pub struct LeaderElector {
    api: Api<Lease>,
    settings: LeaseSettings,
    /// Where a campaign that the API refuses is reported (`/readyz`).
    metrics: Option<std::sync::Arc<super::metrics::Metrics>>,
}

impl LeaderElector {
    pub fn new(client: Client, settings: LeaseSettings) -> Self {
        LeaderElector {
            api: Api::namespaced(client, &settings.namespace),
            settings,
            metrics: None,
        }
    }

    /// Report whether campaigning works on `metrics` (a replica whose Lease requests
    /// fail, e.g. for a namespace its Role does not cover, is not ready).
    pub fn with_metrics(mut self, metrics: std::sync::Arc<super::metrics::Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    fn report(&self, problem: Option<String>) {
        if let Some(m) = &self.metrics {
            let mut slot = match m.lease_problem.lock() {
                Ok(s) => s,
                Err(poisoned) => poisoned.into_inner(),
            };
            *slot = problem;
        }
    }

    fn spec(&self, acquire: Option<MicroTime>, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.settings.identity.clone()),
            lease_duration_seconds: Some(self.settings.lease_duration.as_secs().max(1) as i32),
            acquire_time: acquire.or_else(|| Some(MicroTime(Timestamp::now()))),
            renew_time: Some(MicroTime(Timestamp::now())),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    /// Try once to become or stay the leader. Ok(true) when this replica holds the lease.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        let name = &self.settings.name;
        let Some(lease) = self.api.get_opt(name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    namespace: Some(self.settings.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.spec(None, 0)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let mine = holder == self.settings.identity;
        if !mine {
            let duration =
                Duration::from_secs(spec.lease_duration_seconds.unwrap_or(15).max(1) as u64);
            let renewed = spec
                .renew_time
                .as_ref()
                .map(|t| t.0)
                .unwrap_or(Timestamp::UNIX_EPOCH);
            let age = Timestamp::now().duration_since(renewed);
            let expired = Duration::try_from(age)
                .map(|a| a > duration)
                .unwrap_or(false);
            if !holder.is_empty() && !expired {
                return Ok(false);
            }
        }
        let transitions = spec.lease_transitions.unwrap_or(0) + if mine { 0 } else { 1 };
        let acquire = if mine {
            spec.acquire_time.clone()
        } else {
            None
        };
        let mut updated = lease.clone();
        updated.spec = Some(self.spec(acquire, transitions));
        match self
            .api
            .replace(name, &PostParams::default(), &updated)
            .await
        {
            Ok(l) => {
                if !mine {
                    info!(identity = %self.settings.identity, lease = %l.name_any(), "became leader");
                }
                Ok(true)
            }
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Give the lease up if this replica holds it: no holder, expiring at once.
    pub async fn release(&self) -> Result<(), kube::Error> {
        let Some(lease) = self.api.get_opt(&self.settings.name).await? else {
            return Ok(());
        };
        let spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.settings.identity.as_str()) {
            return Ok(());
        }
        let mut updated = lease.clone();
        updated.spec = Some(LeaseSpec {
            holder_identity: None,
            lease_duration_seconds: Some(1),
            renew_time: Some(MicroTime(Timestamp::now())),
            ..spec
        });
        self.api
            .replace(&self.settings.name, &PostParams::default(), &updated)
            .await?;
        info!(identity = %self.settings.identity, "released the lease");
        Ok(())
    }

    /// Campaign until elected, then keep renewing; the returned channel is true while this
    /// replica leads and turns false the moment a renewal fails. [`Release::release`]
    /// stops campaigning and gives the lease up.
    pub fn spawn(self) -> (watch::Receiver<bool>, Release) {
        let (tx, rx) = watch::channel(false);
        let elector = std::sync::Arc::new(self);
        let this = elector.clone();
        let task = tokio::spawn(async move {
            let this = this;
            let mut last_renewal: Option<tokio::time::Instant> = None;
            loop {
                let leading = match this.try_acquire_or_renew().await {
                    Ok(l) => {
                        this.report(None);
                        l
                    }
                    Err(e) => {
                        warn!(error = %e, namespace = %this.settings.namespace, "lease update failed");
                        this.report(Some(format!(
                            "Lease {}/{}: {e}",
                            this.settings.namespace, this.settings.name
                        )));
                        false
                    }
                };
                if leading {
                    last_renewal = Some(tokio::time::Instant::now());
                } else if *tx.borrow() {
                    warn!(identity = %this.settings.identity, "lost the lease; stopping");
                    last_renewal = None;
                }
                // Stop acting before the lease could expire for others.
                let valid =
                    last_renewal.is_some_and(|t| t.elapsed() < this.settings.lease_duration);
                if tx.send(leading && valid).is_err() {
                    return;
                }
                tokio::time::sleep(this.settings.renew_every).await;
            }
        });
        (rx, Release { elector, task })
    }
}

/// Stops a replica's campaign and gives its lease up (on shutdown).
pub struct Release {
    elector: std::sync::Arc<LeaderElector>,
    task: tokio::task::JoinHandle<()>,
}

impl Release {
    /// Stop renewing and release the lease if held (best effort, bounded to 5 s).
    pub async fn release(self) {
        self.task.abort();
        match tokio::time::timeout(Duration::from_secs(5), self.elector.release()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %e, "could not release the lease"),
            Err(_) => warn!("releasing the lease timed out"),
        }
    }
}

/// Resolves when `leading` turns false.
pub async fn lost(mut leading: watch::Receiver<bool>) {
    loop {
        if !*leading.borrow_and_update() {
            return;
        }
        if leading.changed().await.is_err() {
            return;
        }
    }
}

/// Resolves when `leading` turns true.
pub async fn elected(leading: &mut watch::Receiver<bool>) {
    loop {
        if *leading.borrow_and_update() {
            return;
        }
        if leading.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}
