//! A real Kubernetes control plane for the integration tests: etcd, kube-apiserver,
//! kube-scheduler and kube-controller-manager (v1.26), started per test by
//! `tests/k8s/up` (cooper's copy of `../shared/k8s/up`) and stopped on drop.
//!
//! The binaries are found as envtest finds them: `KUBEBUILDER_ASSETS` first (a folder
//! with `etcd`, `kube-apiserver`, `kube-scheduler`, `kube-controller-manager`), then
//! `../shared/k8s/bin/*.xz` next to this repository, unpacked once into `target/k8s-bin`.
//!
//! Every control plane gets cooper's CRDs (from the Rust types), the `cooper` namespace
//! and ServiceAccount, and `deploy/base/rbac.yaml`; [`ControlPlane::controller_client`]
//! acts as that ServiceAccount with a real token, so the RBAC rules are enforced by the
//! real authorizer and a missing rule fails the test with a 403.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

const MANIFEST_DIR: &str = env!("CARGO_MANIFEST_DIR");
const BINARIES: [&str; 4] = [
    "etcd",
    "kube-apiserver",
    "kube-scheduler",
    "kube-controller-manager",
];

/// The folder holding the control plane's binaries (see the module documentation).
pub fn binaries() -> PathBuf {
    if let Ok(dir) = std::env::var("KUBEBUILDER_ASSETS") {
        let dir = PathBuf::from(dir);
        if dir.join("kube-apiserver").is_file() {
            return dir;
        }
    }
    let packed = Path::new(MANIFEST_DIR).join("../shared/k8s/bin");
    let out = Path::new(MANIFEST_DIR).join("target/k8s-bin");
    if BINARIES.iter().all(|b| out.join(b).is_file()) {
        return out;
    }
    assert!(
        packed.join("kube-apiserver.xz").is_file(),
        "no Kubernetes binaries: set KUBEBUILDER_ASSETS to a folder with etcd, kube-apiserver, \
         kube-scheduler and kube-controller-manager (v1.26), or provide {}",
        packed.display()
    );
    std::fs::create_dir_all(&out).expect("target/k8s-bin");
    for b in BINARIES {
        let target = out.join(b);
        if target.is_file() {
            continue;
        }
        // Unpack beside the target and rename: several test processes may race here.
        let tmp = out.join(format!("{b}.{}.tmp", std::process::id()));
        let file = std::fs::File::create(&tmp).expect("unpack target");
        let status = Command::new("xz")
            .arg("-dc")
            .arg(packed.join(format!("{b}.xz")))
            .stdout(file)
            .status()
            .expect("xz (Debian's xz-utils) unpacks the Kubernetes binaries");
        assert!(status.success(), "xz -dc {b}.xz failed");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        std::fs::rename(&tmp, &target).expect("rename");
    }
    out
}

/// Which parts of the control plane to start besides etcd and the API server.
#[derive(Debug, Clone, Copy)]
pub struct Parts {
    pub scheduler: bool,
    pub controller_manager: bool,
}

impl Default for Parts {
    fn default() -> Self {
        Parts {
            scheduler: true,
            controller_manager: true,
        }
    }
}

/// A running control plane; stopped and its folder removed on drop.
pub struct ControlPlane {
    work: PathBuf,
    pub api: String,
    admin_kubeconfig: PathBuf,
    controller_kubeconfig: PathBuf,
    /// A kube-scheduler this test started and stops itself ([`Self::start_scheduler`]).
    scheduler: std::sync::Mutex<Option<std::process::Child>>,
}

impl ControlPlane {
    /// Start everything (scheduler and controller-manager included) and install cooper's
    /// CRDs, namespace, ServiceAccount and RBAC.
    pub async fn start() -> ControlPlane {
        Self::start_with(Parts::default()).await
    }

    pub async fn start_with(parts: Parts) -> ControlPlane {
        let bin = binaries();
        let work = Path::new(MANIFEST_DIR).join(format!(
            "target/k8s-work/{}-{:x}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default()
        ));
        std::fs::create_dir_all(&work).expect("work dir");
        let mut cmd = Command::new(Path::new(MANIFEST_DIR).join("tests/k8s/up"));
        cmd.arg(&work).env("KUBEBUILDER_ASSETS", &bin);
        if !parts.scheduler {
            cmd.arg("--no-scheduler");
        }
        if !parts.controller_manager {
            cmd.arg("--no-controller-manager");
        }
        let started = Instant::now();
        let out = tokio::task::spawn_blocking(move || cmd.output())
            .await
            .expect("join")
            .expect("tests/k8s/up runs");
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "tests/k8s/up failed: {}\n{}",
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
        let var = |name: &str| {
            stdout
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{name}=")))
                .unwrap_or_else(|| panic!("tests/k8s/up printed no {name}"))
                .to_string()
        };
        let api = var("K8S_API");
        let ca = var("K8S_CA");
        let plane = ControlPlane {
            admin_kubeconfig: PathBuf::from(var("KUBECONFIG")),
            controller_kubeconfig: work.join("controller.kubeconfig"),
            work,
            api,
            scheduler: std::sync::Mutex::new(None),
        };
        let admin = plane.admin().await;
        install(&admin).await;
        let token = service_account_token(&admin).await;
        std::fs::write(
            &plane.controller_kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: local\n  cluster: {{server: \"{}\", certificate-authority: \"{ca}\"}}\nusers:\n- name: cooper\n  user: {{token: \"{token}\"}}\ncontexts:\n- name: cooper\n  context: {{cluster: local, user: cooper, namespace: cooper}}\ncurrent-context: cooper\n",
                plane.api
            ),
        )
        .expect("controller kubeconfig");
        eprintln!(
            "control plane at {} ready in {:.1} s",
            plane.api,
            started.elapsed().as_secs_f64()
        );
        plane
    }

    /// The test's own client (system:masters): it plays the user and the kubelet.
    pub async fn admin(&self) -> Client {
        client_from(&self.admin_kubeconfig, true).await
    }

    /// A client acting as cooper's ServiceAccount (`cooper/cooper`, real token), with
    /// kube's 429 retry layer off as `cooper::controller::client` builds it.
    pub async fn controller_client(&self) -> Client {
        client_from(&self.controller_kubeconfig, false).await
    }

    /// A kubeconfig acting as cooper's ServiceAccount, for the `cooper` binary.
    pub fn controller_kubeconfig(&self) -> &Path {
        &self.controller_kubeconfig
    }

    /// Start a kube-scheduler (for a plane started without one) with the flags
    /// `tests/k8s/up` gives it; a test that wants the scheduler to see a whole scene at
    /// once (nodes, pods, nominations) builds the scene first and then starts it.
    pub fn start_scheduler(&self) {
        let mut slot = self.scheduler.lock().expect("scheduler slot");
        assert!(slot.is_none(), "a scheduler is already running");
        let n = std::fs::read_dir(self.work.join("logs"))
            .map(|d| d.count())
            .unwrap_or(0);
        let log = std::fs::File::create(self.work.join(format!("logs/kube-scheduler-{n}.log")))
            .expect("scheduler log");
        let kubeconfig = format!("--kubeconfig={}", self.admin_kubeconfig.display());
        let child = Command::new(binaries().join("kube-scheduler"))
            .args([
                kubeconfig.clone(),
                kubeconfig.replace("--kubeconfig", "--authentication-kubeconfig"),
                kubeconfig.replace("--kubeconfig", "--authorization-kubeconfig"),
                "--bind-address=127.0.0.1".into(),
                "--secure-port=0".into(),
                "--leader-elect=false".into(),
                "--v=3".into(),
                format!(
                    "--feature-gates={}",
                    std::env::var("K8S_FEATURE_GATES")
                        .unwrap_or_else(|_| "MinDomainsInPodTopologySpread=true".into())
                ),
            ])
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("kube-scheduler starts");
        *slot = Some(child);
    }

    /// Stop the scheduler [`Self::start_scheduler`] started.
    pub fn stop_scheduler(&self) {
        if let Some(mut child) = self.scheduler.lock().expect("scheduler slot").take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The log of the scheduler [`Self::start_scheduler`] started last.
    pub fn scheduler_log(&self) -> String {
        let mut logs: Vec<PathBuf> = std::fs::read_dir(self.work.join("logs"))
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        logs.retain(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("kube-scheduler-"))
        });
        logs.sort_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
        logs.last()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    /// A component's log (`kube-apiserver`, `kube-scheduler`, ...), for diagnostics.
    pub fn log(&self, component: &str) -> String {
        std::fs::read_to_string(self.work.join(format!("logs/{component}.log"))).unwrap_or_default()
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop_scheduler();
        let _ = Command::new(Path::new(MANIFEST_DIR).join("tests/k8s/down"))
            .arg(&self.work)
            .output();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.work);
        }
    }
}

async fn client_from(path: &Path, retry: bool) -> Client {
    let kubeconfig = Kubeconfig::read_from(path).expect("kubeconfig");
    let mut config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("config");
    config.default_retry = retry;
    Client::try_from(config).expect("client")
}

/// CRDs (established), the `cooper` namespace and ServiceAccount, deploy/base/rbac.yaml.
async fn install(admin: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(admin.clone());
    for crd in cooper::crd::all() {
        crds.create(&PostParams::default(), &crd)
            .await
            .expect("create CRD");
    }
    let namespace: Namespace =
        serde_json::from_value(serde_json::json!({"metadata": {"name": "cooper"}}))
            .expect("namespace");
    Api::<Namespace>::all(admin.clone())
        .create(&PostParams::default(), &namespace)
        .await
        .expect("namespace cooper");
    let sa: ServiceAccount = serde_json::from_value(
        serde_json::json!({"metadata": {"name": "cooper", "namespace": "cooper"}}),
    )
    .expect("sa");
    Api::<ServiceAccount>::namespaced(admin.clone(), "cooper")
        .create(&PostParams::default(), &sa)
        .await
        .expect("service account");
    // Pods need their namespace's `default` ServiceAccount; the controller-manager
    // creates it a moment after start (or never, when it is not running).
    let default_sa: ServiceAccount = serde_json::from_value(
        serde_json::json!({"metadata": {"name": "default", "namespace": "default"}}),
    )
    .expect("sa");
    match Api::<ServiceAccount>::namespaced(admin.clone(), "default")
        .create(&PostParams::default(), &default_sa)
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => panic!("default service account: {e}"),
    }
    let rbac = Path::new(MANIFEST_DIR).join("deploy/base/rbac.yaml");
    for doc in cooper::manifest::read_documents(&rbac).expect("rbac.yaml") {
        let v = doc.value;
        let ns = v["metadata"]["namespace"].as_str().map(str::to_string);
        let pp = PostParams::default();
        match v["kind"].as_str() {
            Some("ClusterRole") => {
                let o: ClusterRole = serde_json::from_value(v).expect("ClusterRole");
                Api::<ClusterRole>::all(admin.clone())
                    .create(&pp, &o)
                    .await
                    .map(|_| ())
            }
            Some("ClusterRoleBinding") => {
                let o: ClusterRoleBinding = serde_json::from_value(v).expect("binding");
                Api::<ClusterRoleBinding>::all(admin.clone())
                    .create(&pp, &o)
                    .await
                    .map(|_| ())
            }
            Some("Role") => {
                let o: Role = serde_json::from_value(v).expect("Role");
                Api::<Role>::namespaced(admin.clone(), ns.as_deref().expect("ns"))
                    .create(&pp, &o)
                    .await
                    .map(|_| ())
            }
            Some("RoleBinding") => {
                let o: RoleBinding = serde_json::from_value(v).expect("RoleBinding");
                Api::<RoleBinding>::namespaced(admin.clone(), ns.as_deref().expect("ns"))
                    .create(&pp, &o)
                    .await
                    .map(|_| ())
            }
            other => panic!("deploy/base/rbac.yaml: unexpected kind {other:?}"),
        }
        .expect("apply rbac.yaml");
    }
    let start = Instant::now();
    for crd in cooper::crd::all() {
        let name = crd.metadata.name.clone().expect("crd name");
        loop {
            let established = crds
                .get(&name)
                .await
                .ok()
                .and_then(|c| c.status)
                .and_then(|s| s.conditions)
                .is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c.type_ == "Established" && c.status == "True")
                });
            if established {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "CRD {name} not established"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A token for `cooper/cooper` from the TokenRequest API (a day long).
async fn service_account_token(admin: &Client) -> String {
    let sas: Api<ServiceAccount> = Api::namespaced(admin.clone(), "cooper");
    let request = serde_json::json!({
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
        "spec": {"expirationSeconds": 86400}
    });
    let response: serde_json::Value = sas
        .create_subresource("token", "cooper", &PostParams::default(), &request)
        .await
        .expect("token request");
    response["status"]["token"]
        .as_str()
        .expect("token")
        .to_string()
}
