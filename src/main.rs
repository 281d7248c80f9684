//! The `cooper` command: plan, catalog (and, as they land, simulate, controller, report).

use std::collections::BTreeSet;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};

use cooper::catalog::{CapacityType, Catalog};
use cooper::nodepool::{self, NodePool};
use cooper::planner::{self, Plan, PlanInput, PlanOptions, Strategy};
use cooper::report::csv;
use cooper::resources::{self, format_human};
use cooper::table::Table;
use cooper::{manifest, workload};

#[derive(Parser)]
#[command(
    name = "cooper",
    version,
    about = "A cost-optimal node provisioner for Kubernetes AI/ML clusters"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "COOPER_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// How the commands that read the cluster find it, with kubectl's flags.
#[derive(clap::Args, Clone, Default)]
struct KubeArgs {
    /// The kubeconfig file (default: KUBECONFIG, ~/.kube/config, then in-cluster).
    #[arg(long, value_name = "FILE")]
    kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use (default: its current context).
    #[arg(long)]
    context: Option<String>,
    /// Namespace: `plan --live` plans only this namespace's pending pods; the
    /// controller's Lease namespace when `--lease-namespace` is not given.
    #[arg(short = 'n', long)]
    namespace: Option<String>,
}

impl KubeArgs {
    fn target(&self) -> cooper::controller::ApiTarget {
        cooper::controller::ApiTarget {
            kubeconfig: self.kubeconfig.clone(),
            context: self.context.clone(),
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// `-o` of `plan`, `report --live` and `catalog`.
#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum Output {
    /// Aligned columns for a terminal.
    Table,
    Json,
    Yaml,
    /// One row per node (plan, report) or offering (catalog), with a header.
    Csv,
}

/// `-o` of `simulate`: the outputs above, and a self-contained HTML page with charts.
#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum ReportFormat {
    /// Aligned columns for a terminal.
    Table,
    Json,
    Yaml,
    /// Node rows, then workload cost rows.
    Csv,
    /// One file, inline SVG charts, no scripts or network.
    Html,
}

/// Which cloud the controller launches in.
#[derive(Clone, Copy, ValueEnum, PartialEq, Debug)]
enum CloudKind {
    /// An in-process cloud priced from the catalog (no instances; for trying the
    /// controller against a test cluster).
    Local,
    /// EC2 through aws-sdk-ec2 (credentials from the default chain: environment,
    /// profile, IRSA / web identity, instance metadata).
    Aws,
}

/// What `--cloud aws` needs: the cluster nodes join, and how to reach EC2.
#[derive(clap::Args)]
struct AwsArgs {
    /// EKS cluster name: nodes join it, and cooper's instances are tagged with it.
    #[arg(long, env = "COOPER_CLUSTER_NAME")]
    cluster_name: Option<String>,
    /// The cluster's API server endpoint (`https://...`), written into node user data.
    #[arg(long, env = "COOPER_CLUSTER_ENDPOINT")]
    cluster_endpoint: Option<String>,
    /// The cluster's CA bundle, base64 as `aws eks describe-cluster` prints it.
    #[arg(long, env = "COOPER_CLUSTER_CA_BUNDLE")]
    cluster_ca_bundle: Option<String>,
    /// The cluster's service CIDR (nodeadm derives the DNS address from it).
    #[arg(long, default_value = "10.100.0.0/16", env = "COOPER_CLUSTER_CIDR")]
    cluster_cidr: String,
    /// Kubernetes `major.minor` for the EKS AMIs (default: the API server's version).
    #[arg(long, env = "COOPER_KUBERNETES_VERSION")]
    kubernetes_version: Option<String>,
    /// AWS region (default: from the environment or profile).
    #[arg(long, env = "COOPER_AWS_REGION")]
    aws_region: Option<String>,
    /// EC2 endpoint override (default: `AWS_ENDPOINT_URL`, or AWS itself).
    #[arg(long)]
    aws_endpoint: Option<String>,
    /// Attempts per EC2 call on throttling and 5xx (jittered exponential backoff).
    #[arg(long, default_value_t = 5)]
    aws_max_attempts: u32,
    /// Deadline of one attempt of an EC2 call.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    aws_attempt_timeout: Duration,
    /// Deadline of an EC2 call, its retries included.
    #[arg(long, default_value = "90s", value_parser = parse_duration)]
    aws_operation_timeout: Duration,
    /// Re-describe instance types and zone offerings this often.
    #[arg(long, default_value = "6h", value_parser = parse_duration)]
    catalog_types_every: Duration,
    /// Refresh spot prices this often.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    catalog_prices_every: Duration,
    /// Plan with the catalog file only; do not refresh it from EC2.
    #[arg(long)]
    no_live_catalog: bool,
    /// SQS queue URL that EventBridge feeds with spot interruption, rebalance, instance
    /// state-change and AWS Health events (off when not given).
    #[arg(long, env = "COOPER_INTERRUPTION_QUEUE")]
    interruption_queue: Option<String>,
}

#[derive(clap::Args)]
struct ControllerArgs {
    /// Where nodes are launched.
    #[arg(long, value_enum, default_value_t = CloudKind::Local, env = "COOPER_CLOUD")]
    cloud: CloudKind,
    /// Instance catalog (default: the embedded one).
    #[arg(long, env = "COOPER_CATALOG")]
    catalog: Option<PathBuf>,
    /// Batching window: plan once no new pod has appeared for this long...
    #[arg(long, default_value = "1s", value_parser = parse_duration, env = "COOPER_BATCH_IDLE")]
    batch_idle: Duration,
    /// ... or this long after the first one, whichever comes first.
    #[arg(long, default_value = "10s", value_parser = parse_duration, env = "COOPER_BATCH_MAX")]
    batch_max: Duration,
    /// Planning strategy.
    #[arg(long, value_enum, default_value_t = Strategy::Optimal, env = "COOPER_STRATEGY")]
    strategy: Strategy,
    /// Terminate a claim whose node has not registered after this long.
    #[arg(long, default_value = "15m", value_parser = parse_duration)]
    registration_timeout: Duration,
    /// Provision pods of these schedulers (repeatable).
    #[arg(long = "scheduler-name", default_values_t = vec!["default-scheduler".to_string()])]
    scheduler_names: Vec<String>,
    /// Plan for a new pod kube-scheduler has not given a verdict on after this long
    /// (its verdicts are rate-limited: a burst of 1,000 pods waits ~20 s for the last);
    /// `never` waits for the verdict, as Karpenter does.
    #[arg(long, default_value = "3s", value_parser = parse_optional_duration)]
    verdict_wait: ::std::option::Option<Duration>,
    /// Serve /metrics, /healthz and /readyz here.
    #[arg(long, default_value = "0.0.0.0:8080", env = "COOPER_METRICS_ADDR")]
    metrics_addr: std::net::SocketAddr,
    /// Leader election Lease namespace (default: the pod's namespace, from the downward
    /// API's POD_NAMESPACE, else the ServiceAccount's or the kubeconfig context's).
    #[arg(long, env = "POD_NAMESPACE")]
    lease_namespace: Option<String>,
    /// This replica's identity in the Lease.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Run without leader election (a single replica).
    #[arg(long)]
    no_leader_election: bool,
    /// Do not install NVIDIA / Neuron device plugins.
    #[arg(long)]
    no_device_plugins: bool,
    #[arg(long, env = "COOPER_NVIDIA_DEVICE_PLUGIN_IMAGE")]
    nvidia_device_plugin_image: Option<String>,
    #[arg(long, env = "COOPER_NEURON_DEVICE_PLUGIN_IMAGE")]
    neuron_device_plugin_image: Option<String>,
    /// NodePools and NodeClasses to create when missing, e.g. from a ConfigMap (existing
    /// objects are never changed).
    #[arg(long, env = "COOPER_DEFAULT_OBJECTS")]
    default_objects: Option<PathBuf>,
    /// How long a pod planned onto a node is left to the scheduler once the node is
    /// ready, before it is planned again (kube-scheduler's back-off reaches 10 s).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    nomination_grace: Duration,
    /// Between cordoning an empty node and deleting it, look at its pods again after
    /// this long.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    empty_settle: Duration,
    /// The longest any cloud call may take (above the EC2 SDK's own deadlines).
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    cloud_timeout: Duration,
    /// NodeClaims worked on at once (launch, registration, drain, termination).
    #[arg(long, default_value_t = 64)]
    max_claim_workers: usize,
    /// How often the garbage collector compares the cloud's instances with the NodeClaims.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    gc_interval: Duration,
    #[command(flatten)]
    kube: KubeArgs,
    /// How long an instance without a claim, or a claim whose instance is missing, is
    /// left alone before the garbage collector looks it up and acts.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    gc_grace: Duration,
    #[command(flatten)]
    aws: AwsArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Print cooper's CustomResourceDefinitions (NodePool, NodeClass, NodeClaim) as YAML.
    Crd,
    /// Print the version, the commit it was built from, the embedded catalog's price
    /// dates and the LP/MIP solver backend.
    Version,
    /// Print a shell completion script: `cooper completion bash > /etc/bash_completion.d/cooper`.
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Run the in-cluster controller (or anywhere with a kubeconfig).
    Controller(Box<ControllerArgs>),
    /// Decide which nodes to launch for the pods in the given manifests.
    Plan {
        /// Manifests (Pod, Deployment, StatefulSet, ReplicaSet, Job, DaemonSet, PodGroup,
        /// PriorityClass, PV/PVC/StorageClass; multi-document YAML and `kind: List`), as
        /// kubectl takes them: files, directories (their .yaml/.yml/.json files), or `-`
        /// for standard input (`kubectl get deploy -A -o yaml | cooper plan -f -`).
        #[arg(short = 'f', long = "filename", required_unless_present = "live", num_args = 1..)]
        files: Vec<PathBuf>,
        /// Read directories given with -f recursively.
        #[arg(short = 'R', long)]
        recursive: bool,
        /// Treat warnings (objects skipped, e.g. an unknown kind) as errors: exit 1.
        #[arg(long)]
        strict: bool,
        /// Exit 3 when some pod cannot be placed (for CI checks of manifests; errors
        /// exit 2).
        #[arg(long)]
        fail_on_unschedulable: bool,
        /// Read-only: plan for the live cluster's pending pods with its NodePools, nodes and
        /// in-flight NodeClaims (kubeconfig or in-cluster), exactly as the controller would.
        #[arg(long, conflicts_with_all = ["files", "nodepools"])]
        live: bool,
        /// With --live: the consolidation move the controller would make now (delete,
        /// replace, split or merge) and what it saves, instead of a plan for pending pods.
        #[arg(long, requires = "live")]
        consolidation: bool,
        #[command(flatten)]
        kube: KubeArgs,
        /// NodePools file (default: the shipped config/nodepools.yaml).
        #[arg(long)]
        nodepools: Option<PathBuf>,
        /// Catalog file (default: the embedded config/catalog.yaml).
        #[arg(long)]
        catalog: Option<PathBuf>,
        /// Region the catalog must cover.
        #[arg(long)]
        region: Option<String>,
        /// Planning strategy.
        #[arg(long, value_enum, default_value_t = Strategy::Optimal)]
        strategy: Strategy,
        /// Solve time limit, e.g. 2s or 500ms.
        #[arg(long, default_value = "2s", value_parser = parse_duration)]
        time_limit: Duration,
        /// Relative optimality gap at which the solver may stop (0 to 1, e.g. 0.01).
        #[arg(long, default_value_t = 0.01, value_parser = parse_gap)]
        gap: f64,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Replay a scenario against a simulated cluster and cloud, and report the cost.
    Simulate {
        /// The scenario file (see simulations/).
        scenario: PathBuf,
        /// Planning strategy (default: the scenario's, else optimal).
        #[arg(long, value_enum)]
        strategy: Option<Strategy>,
        /// Random seed for arrivals, interruptions and load noise (default: the
        /// scenario's); the same seed gives the same report, byte for byte.
        #[arg(long)]
        seed: Option<u64>,
        /// Report format (`--report` is the old name).
        #[arg(short = 'o', long = "output", alias = "report", value_enum, default_value_t = ReportFormat::Table)]
        report: ReportFormat,
        /// Write the report here instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Also run greedy and on-demand-only with the same seed, and compare.
        #[arg(long)]
        compare: bool,
    },
    /// The cost report for the live cluster (kubeconfig or in-cluster), read-only: what
    /// cooper launched, what it costs, how full it is, and what the same pods would cost
    /// planned again now: optimal, Karpenter-style first-fit, on-demand only.
    Report {
        /// Report on the live cluster (simulation reports come from `cooper simulate`).
        #[arg(long, required = true)]
        live: bool,
        #[command(flatten)]
        kube: KubeArgs,
        /// Catalog file (default: the embedded config/catalog.yaml).
        #[arg(long)]
        catalog: Option<PathBuf>,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// List the catalog's offerings with price and allocatable.
    Catalog {
        /// Catalog file (default: the embedded config/catalog.yaml).
        #[arg(long)]
        catalog: Option<PathBuf>,
        /// Region the catalog must cover (an error names the one it covers).
        #[arg(long)]
        region: Option<String>,
        /// Only this instance family (e.g. g5); may be repeated.
        #[arg(long)]
        family: Vec<String>,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    nodepool::parse_duration(s)
}

/// A duration, or `never`.
fn parse_optional_duration(s: &str) -> Result<Option<Duration>, String> {
    match s {
        "never" => Ok(None),
        _ => parse_duration(s).map(Some),
    }
}

/// `cooper plan --fail-on-unschedulable`'s exit code when a pod cannot be placed
/// (errors exit 2).
const UNSCHEDULABLE_EXIT: u8 = 3;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// A controller over the live cluster's caches (kubeconfig or in-cluster) with an
/// in-process cloud, for the read-only `plan --live` and `report --live`: it is only
/// asked, never run.
fn live_controller(
    runtime: &tokio::runtime::Runtime,
    target: &cooper::controller::ApiTarget,
    catalog: Catalog,
    settings: cooper::controller::Settings,
) -> anyhow::Result<cooper::controller::Controller<cooper::cloud::InMemoryCloud>> {
    use cooper::controller;
    runtime.block_on(async move {
        let client = controller::client(target)
            .await
            .context("connecting to the Kubernetes API")?;
        let watch = controller::watch_client(target)
            .await
            .context("connecting to the Kubernetes API")?;
        let stores = controller::start_reflectors(&watch).await;
        let catalog = std::sync::Arc::new(catalog);
        let cloud = std::sync::Arc::new(cooper::cloud::InMemoryCloud::new(&catalog));
        anyhow::Ok(controller::Controller::new(
            client, cloud, catalog, settings, stores,
        ))
    })
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// `cooper report --live`: the cluster's cost report, read-only.
fn report_live(
    target: &cooper::controller::ApiTarget,
    catalog: Catalog,
) -> anyhow::Result<cooper::controller::live_report::LiveReport> {
    let runtime = runtime()?;
    let controller = live_controller(&runtime, target, catalog, Default::default())?;
    Ok(controller.live_report())
}

fn print_live_report(report: &cooper::controller::live_report::LiveReport) {
    println!(
        "cooper nodes: {}  cost ${:.4}/h (of it per-node volumes/addresses ${:.4}/h)  spot share {:.0}%  empty {} (${:.4}/h)  region {}",
        report.nodes.len(),
        report.total_price_per_hour,
        report.node_costs_per_hour,
        report.spot_share * 100.0,
        report.empty_nodes,
        report.empty_price_per_hour,
        report.region
    );
    let utilisation: Vec<String> = report
        .utilisation
        .iter()
        .map(|(r, p)| format!("{r} {p:.1}%"))
        .collect();
    println!(
        "utilisation (requested / allocatable): {}",
        utilisation.join(", ")
    );
    let mut table = Table::new(&[
        "nodeclaim",
        "node",
        "pool",
        "type",
        "zone",
        "capacity",
        "$/h",
        "pods",
        "cpu %",
        "mem %",
    ]);
    for n in &report.nodes {
        let pct = |r: &str| {
            n.utilisation
                .get(r)
                .map_or("-".to_string(), |p| format!("{p:.0}"))
        };
        table.row(vec![
            n.nodeclaim.clone(),
            n.node.clone().unwrap_or_else(|| "(launching)".into()),
            n.nodepool.clone(),
            n.instance_type.clone(),
            n.zone.clone(),
            n.capacity_type.clone(),
            format!("{:.4}", n.price_per_hour),
            n.pods.to_string(),
            pct(resources::CPU),
            pct(resources::MEMORY),
        ]);
    }
    print!("{}", table.render());
    let r = &report.replan;
    println!(
        "the same {} pods planned again now: optimal ${:.4}/h, first-fit (Karpenter-style) ${:.4}/h, on-demand only ${:.4}/h{}",
        r.pods,
        r.optimal_per_hour,
        r.greedy_per_hour,
        r.on_demand_only_per_hour,
        if r.unschedulable > 0 {
            format!(" ({} pods unplaceable now)", r.unschedulable)
        } else {
            String::new()
        }
    );
    println!("prices are the catalog's, not billing data");
}

/// `cooper plan --live`: what the controller would launch now, read-only.
fn plan_live(
    target: &cooper::controller::ApiTarget,
    namespace: Option<&str>,
    catalog: Catalog,
    strategy: Strategy,
    time_limit: Duration,
) -> anyhow::Result<Plan> {
    let runtime = runtime()?;
    let settings = cooper::controller::Settings {
        strategy,
        time_limit,
        ..Default::default()
    };
    let controller = live_controller(&runtime, target, catalog, settings)?;
    Ok(runtime.block_on(controller.plan_now(namespace)))
}

fn run_controller(mut args: ControllerArgs) -> anyhow::Result<ExitCode> {
    // `-n` as kubectl users write it: the namespace cooper runs in, for its Lease.
    if args.lease_namespace.as_deref().is_none_or(str::is_empty) {
        args.lease_namespace = args.kube.namespace.clone();
    }
    let target = args.kube.target();
    use cooper::controller::{
        self, Settings, device_plugins::DevicePluginSettings, metrics::Metrics,
    };
    let catalog = std::sync::Arc::new(match &args.catalog {
        Some(p) => Catalog::load(p)?,
        None => Catalog::embedded()?,
    });
    let defaults = match &args.default_objects {
        Some(path) => controller::read_defaults(path)?,
        None => Vec::new(),
    };
    let settings = Settings {
        batch: cooper::provisioning::BatchSettings {
            idle: args.batch_idle,
            max: args.batch_max,
        },
        registration_timeout: args.registration_timeout,
        scheduler_names: args.scheduler_names.clone(),
        verdict_wait: args.verdict_wait,
        strategy: args.strategy,
        device_plugins: DevicePluginSettings {
            enabled: !args.no_device_plugins,
            nvidia_image: args.nvidia_device_plugin_image.clone(),
            neuron_image: args.neuron_device_plugin_image.clone(),
        },
        nomination_grace: args.nomination_grace,
        empty_settle: args.empty_settle,
        cloud_timeout: args.cloud_timeout,
        max_claim_workers: args.max_claim_workers,
        gc_interval: args.gc_interval,
        gc_grace: args.gc_grace,
        ..Settings::default()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let client = controller::client(&target)
            .await
            .context("connecting to the Kubernetes API")?;
        let watch = controller::watch_client(&target)
            .await
            .context("connecting to the Kubernetes API")?;
        let clients = controller::Clients {
            watch,
            request: client.clone(),
        };
        let metrics = std::sync::Arc::new(Metrics::default());
        let server = controller::metrics::serve(args.metrics_addr, metrics.clone());
        tokio::spawn(async move {
            if let Err(e) = server.await {
                tracing::error!(error = %e, "metrics server stopped");
            }
        });
        let shutdown = async {
            // SIGTERM from the kubelet, or Ctrl-C.
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            let sigterm = async {
                match term.as_mut() {
                    Some(t) => {
                        t.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = sigterm => {}
            }
            tracing::info!("shutting down");
        };
        metrics
            .catalog_offerings
            .set(catalog.offerings.len() as i64);
        let mut setup = Setup {
            settings,
            metrics,
            catalog_updates: None,
            defaults,
        };
        match args.cloud {
            CloudKind::Local => {
                let cloud = std::sync::Arc::new(cooper::cloud::InMemoryCloud::new(&catalog));
                serve(&args, clients, cloud, catalog, setup, shutdown).await;
            }
            CloudKind::Aws => {
                let (cloud, updates) =
                    connect_ec2(&args, &client, &catalog, &setup.metrics).await?;
                setup.catalog_updates = updates;
                serve(&args, clients, cloud, catalog, setup, shutdown).await;
            }
        }
        anyhow::Ok(ExitCode::SUCCESS)
    })
}

/// What every controller this process runs is built with.
struct Setup {
    settings: cooper::controller::Settings,
    metrics: std::sync::Arc<cooper::controller::metrics::Metrics>,
    catalog_updates: Option<tokio::sync::watch::Receiver<std::sync::Arc<Catalog>>>,
    defaults: Vec<cooper::controller::DefaultObject>,
}

/// Run the controller with this cloud, elected or alone, until `shutdown`.
async fn serve<C: cooper::cloud::CloudProvider + Send + Sync + 'static>(
    args: &ControllerArgs,
    clients: cooper::controller::Clients,
    cloud: std::sync::Arc<C>,
    catalog: std::sync::Arc<Catalog>,
    setup: Setup,
    shutdown: impl std::future::Future<Output = ()>,
) {
    use cooper::controller::{self, leader::LeaseSettings};
    let Setup {
        settings,
        metrics,
        catalog_updates,
        defaults,
    } = setup;
    let settings_stall_after = settings.stall_after;
    let build = move |client: kube::Client, stores| {
        let c = controller::Controller::new(
            client,
            cloud.clone(),
            catalog.clone(),
            settings.clone(),
            stores,
        )
        .with_defaults(defaults.clone());
        match &catalog_updates {
            Some(updates) => c.with_catalog_updates(updates.clone()),
            None => c,
        }
    };
    *metrics
        .stall_after
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = settings_stall_after;
    let client = clients.request.clone();
    if args.no_leader_election {
        let stores = controller::start_reflectors(&clients.watch).await;
        controller::run_alone(build(client, stores).with_metrics(metrics), shutdown).await;
    } else {
        let identity = args.identity.clone().unwrap_or_else(|| {
            std::env::var("HOSTNAME").unwrap_or_else(|_| format!("cooper-{}", std::process::id()))
        });
        let namespace = args
            .lease_namespace
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| client.default_namespace().to_string());
        tracing::info!(namespace = %namespace, identity = %identity, "campaigning for the leader lease");
        let lease = LeaseSettings {
            namespace,
            name: "cooper-controller".into(),
            identity,
            lease_duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(5),
        };
        controller::run_elected(
            clients,
            lease,
            metrics,
            move |stores| build(client.clone(), stores),
            shutdown,
        )
        .await;
    }
}

/// Connect to EC2 for `--cloud aws`, and start the live catalog refresh (unless turned
/// off), whose catalogs the controller plans with as they arrive.
async fn connect_ec2(
    args: &ControllerArgs,
    client: &kube::Client,
    catalog: &std::sync::Arc<Catalog>,
    metrics: &std::sync::Arc<cooper::controller::metrics::Metrics>,
) -> anyhow::Result<(
    std::sync::Arc<cooper::aws::Ec2Cloud>,
    Option<tokio::sync::watch::Receiver<std::sync::Arc<Catalog>>>,
)> {
    use cooper::aws::catalog::{LiveCatalog, RefreshSettings, refresh_loop};
    use cooper::aws::{ClusterInfo, Ec2Cloud, Ec2Settings};
    let aws = &args.aws;
    let required = |value: &Option<String>, flag: &str, env: &str| {
        value
            .clone()
            .filter(|v| !v.is_empty())
            .with_context(|| format!("--cloud aws needs {flag} (or {env})"))
    };
    let name = required(&aws.cluster_name, "--cluster-name", "COOPER_CLUSTER_NAME")?;
    let endpoint = required(
        &aws.cluster_endpoint,
        "--cluster-endpoint",
        "COOPER_CLUSTER_ENDPOINT",
    )?;
    let certificate_authority = required(
        &aws.cluster_ca_bundle,
        "--cluster-ca-bundle",
        "COOPER_CLUSTER_CA_BUNDLE",
    )?;
    let kubernetes_version = match &aws.kubernetes_version {
        Some(v) => v.clone(),
        None => {
            let info = client
                .apiserver_version()
                .await
                .context("reading the API server's version (or pass --kubernetes-version)")?;
            let minor: String = info
                .minor
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            format!("{}.{minor}", info.major)
        }
    };
    let ec2_settings = Ec2Settings {
        cluster: ClusterInfo {
            name,
            endpoint,
            certificate_authority,
            cidr: aws.cluster_cidr.clone(),
            kubernetes_version,
        },
        region: aws.aws_region.clone(),
        endpoint: aws.aws_endpoint.clone(),
        static_credentials: None,
        max_attempts: aws.aws_max_attempts,
        attempt_timeout: Some(aws.aws_attempt_timeout),
        operation_timeout: Some(aws.aws_operation_timeout),
    };
    let mut cloud = Ec2Cloud::connect(ec2_settings.clone())
        .await
        .with_catalog(catalog);
    if let Some(url) = aws.interruption_queue.as_ref().filter(|u| !u.is_empty()) {
        let queue = cooper::aws::interruption::InterruptionQueue::connect(
            &ec2_settings,
            url.clone(),
            Duration::from_secs(20),
        )
        .await;
        cloud = cloud.with_interruption_queue(queue);
    }
    let region = cloud
        .region()
        .context("no AWS region: pass --aws-region or set AWS_REGION")?;
    if region != catalog.region {
        bail!(
            "catalog {} covers region {}, but EC2 is in {region}; pass --catalog with a catalog for {region}",
            catalog.source,
            catalog.region
        );
    }
    let cloud = std::sync::Arc::new(cloud);
    if aws.no_live_catalog {
        return Ok((cloud, None));
    }
    let (publish, updates) = tokio::sync::watch::channel(catalog.clone());
    let failures = metrics.catalog_refresh_failures.clone();
    tokio::spawn(refresh_loop(
        cloud.clone(),
        LiveCatalog::new(catalog.clone()),
        RefreshSettings {
            types_every: aws.catalog_types_every,
            prices_every: aws.catalog_prices_every,
        },
        publish,
        move |_| {
            failures.inc();
        },
    ));
    Ok((cloud, Some(updates)))
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    // Colour only on a terminal, and never with NO_COLOR set (https://no-color.org).
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn load_catalog(path: Option<&Path>, region: Option<&str>) -> Result<Catalog> {
    let catalog = match path {
        Some(p) => Catalog::load(p)?,
        None => Catalog::embedded()?,
    };
    if let Some(r) = region
        && r != catalog.region
    {
        bail!(
            "catalog {} covers region {}, not {r}; pass --catalog with a catalog for {r}",
            catalog.source,
            catalog.region
        );
    }
    Ok(catalog)
}

fn load_pools(path: Option<&Path>) -> Result<Vec<NodePool>> {
    Ok(match path {
        Some(p) => nodepool::load(p)?,
        None => nodepool::defaults()?,
    })
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Plan {
            files,
            recursive,
            strict,
            fail_on_unschedulable,
            live,
            consolidation,
            kube,
            nodepools,
            catalog,
            region,
            strategy,
            time_limit,
            gap,
            output,
        } => {
            let catalog = load_catalog(catalog.as_deref(), region.as_deref())?;
            if !live
                && (kube.kubeconfig.is_some() || kube.context.is_some() || kube.namespace.is_some())
            {
                bail!(
                    "--kubeconfig, --context and -n/--namespace choose the cluster `plan --live` reads; with -f the manifests are the whole input"
                );
            }
            if live && consolidation {
                let runtime = runtime()?;
                let settings = cooper::controller::Settings {
                    strategy,
                    time_limit,
                    ..Default::default()
                };
                let controller =
                    live_controller(&runtime, &kube.target(), catalog.clone(), settings)?;
                let preview = runtime.block_on(controller.consolidation_now());
                match output {
                    Output::Json => println!("{}", serde_json::to_string_pretty(&preview)?),
                    Output::Yaml => print!("{}", serde_saphyr::to_string(&preview)?),
                    Output::Table | Output::Csv => match &preview {
                        Some(p) => println!("{}", p.description),
                        None => println!(
                            "no consolidation move worth making (pools with WhenEmptyOrUnderutilized only; a move must save $0.005/h and 10 % of what it removes)"
                        ),
                    },
                }
                return Ok(ExitCode::SUCCESS);
            }
            if live {
                let plan = plan_live(
                    &kube.target(),
                    kube.namespace.as_deref(),
                    catalog.clone(),
                    strategy,
                    time_limit,
                )?;
                match output {
                    Output::Json => println!("{}", serde_json::to_string_pretty(&plan)?),
                    Output::Yaml => print!("{}", serde_saphyr::to_string(&plan)?),
                    Output::Table => print!("{}", plan_table(&plan, None, &catalog)),
                    Output::Csv => print!("{}", plan_csv(&plan)),
                }
                return Ok(ExitCode::SUCCESS);
            }
            let pools = load_pools(nodepools.as_deref())?;
            let mut docs = Vec::new();
            for f in &files {
                docs.extend(manifest::read_source(f, recursive)?);
            }
            let w = workload::from_documents(&docs)?;
            if !w.skipped.is_empty() {
                let n = w.skipped.len();
                eprintln!(
                    "warning: skipped {n} object{}:",
                    if n == 1 { "" } else { "s" }
                );
                for s in &w.skipped {
                    eprintln!("  {s}");
                }
                if strict {
                    bail!("--strict: {n} object(s) skipped");
                }
            }
            let unavailable = BTreeSet::new();
            let input = PlanInput {
                pods: &w.pods,
                pools: &pools,
                catalog: &catalog,
                daemonsets: &w.daemonsets,
                gangs: &w.gangs,
                nodes: &[],
                unavailable: &unavailable,
                running: &[],
            };
            let options = PlanOptions {
                strategy,
                time_limit,
                relative_gap: gap,
                budget: planner::Budget::WallClock,
                exact_search: true,
            };
            let plan = planner::plan(input, &options);
            let problems = planner::verify::verify(&input, &plan);
            if !problems.is_empty() {
                for p in &problems {
                    eprintln!("plan check failed: {p}");
                }
                bail!(
                    "the plan failed its own check ({} problems): this is a bug in cooper",
                    problems.len()
                );
            }
            match output {
                Output::Json | Output::Yaml => {
                    let compared = compared_plans(&input, &options, &plan);
                    let out = PlanWithComparison {
                        plan: &plan,
                        compared_with: compared,
                    };
                    if output == Output::Json {
                        println!("{}", serde_json::to_string_pretty(&out)?);
                    } else {
                        print!(
                            "{}",
                            serde_saphyr::to_string(&out).context("serialising the plan")?
                        );
                    }
                }
                Output::Table => {
                    let greedy = (strategy != Strategy::Greedy).then(|| {
                        planner::plan(
                            input,
                            &PlanOptions {
                                strategy: Strategy::Greedy,
                                ..options.clone()
                            },
                        )
                    });
                    print!("{}", plan_table(&plan, greedy.as_ref(), &catalog));
                }
                Output::Csv => print!("{}", plan_csv(&plan)),
            }
            if fail_on_unschedulable && !plan.unschedulable.is_empty() {
                eprintln!(
                    "error: {} pod(s) cannot be placed (--fail-on-unschedulable)",
                    plan.unschedulable.len()
                );
                return Ok(ExitCode::from(UNSCHEDULABLE_EXIT));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Simulate {
            scenario,
            strategy,
            seed,
            report,
            out,
            compare,
        } => {
            let scenario = cooper::sim::scenario::load(&scenario)?;
            let progress: Option<fn(f64)> = std::io::stderr()
                .is_terminal()
                .then_some(show_progress as fn(f64));
            let started = *PROGRESS_START.get_or_init(std::time::Instant::now);
            let options = cooper::sim::SimOptions {
                strategy,
                seed,
                on_demand_only: false,
                consolidation: Default::default(),
                progress,
            };
            let mut main_report = cooper::sim::run(&scenario, &options)?;
            if compare {
                let main_cost = main_report.total_cost;
                let consolidates = scenario.pools.iter().any(|p| {
                    p.consolidation_policy
                        == cooper::nodepool::ConsolidationPolicy::WhenEmptyOrUnderutilized
                });
                if consolidates {
                    let still = cooper::sim::run(
                        &scenario,
                        &cooper::sim::SimOptions {
                            consolidation: cooper::sim::ConsolidationMode::Off,
                            ..options.clone()
                        },
                    )?;
                    main_report
                        .comparison
                        .push(still.as_comparison("cooper without consolidation", main_cost));
                }
                if main_report.strategy != "greedy" {
                    let greedy = cooper::sim::run(
                        &scenario,
                        &cooper::sim::SimOptions {
                            strategy: Some(Strategy::Greedy),
                            consolidation: cooper::sim::ConsolidationMode::Off,
                            ..options.clone()
                        },
                    )?;
                    main_report.comparison.push(greedy.as_comparison(
                        "greedy (first-fit-decreasing, no consolidation)",
                        main_cost,
                    ));
                    // Karpenter as it is: first-fit provisioning, and on pools that ask for
                    // it, consolidation without splits.
                    let karpenter = cooper::sim::run(
                        &scenario,
                        &cooper::sim::SimOptions {
                            strategy: Some(Strategy::Greedy),
                            consolidation: cooper::sim::ConsolidationMode::Karpenter,
                            ..options.clone()
                        },
                    )?;
                    main_report.comparison.push(karpenter.as_comparison(
                        "karpenter (first-fit-decreasing, its consolidation)",
                        main_cost,
                    ));
                }
                let on_demand = cooper::sim::run(
                    &scenario,
                    &cooper::sim::SimOptions {
                        on_demand_only: true,
                        ..options.clone()
                    },
                )?;
                main_report
                    .comparison
                    .push(on_demand.as_comparison("on-demand only", main_cost));
            }
            if PROGRESS_SHOWN.load(std::sync::atomic::Ordering::Relaxed) {
                eprintln!(
                    "\rsimulated {:.1} h in {:.1} s{}",
                    main_report.hours,
                    started.elapsed().as_secs_f64(),
                    " ".repeat(20)
                );
            }
            let text = match report {
                ReportFormat::Table => main_report.to_table(),
                ReportFormat::Json => serde_json::to_string_pretty(&main_report)? + "\n",
                ReportFormat::Yaml => {
                    serde_saphyr::to_string(&main_report).context("serialising the report")?
                }
                ReportFormat::Csv => main_report.to_csv(),
                ReportFormat::Html => main_report.to_html(),
            };
            match out {
                Some(path) => std::fs::write(&path, text)
                    .with_context(|| format!("writing {}", path.display()))?,
                None => print!("{text}"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Controller(args) => run_controller(*args),
        Command::Crd => {
            print!("{}", cooper::crd::to_yaml()?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Version => {
            println!("cooper {}", env!("CARGO_PKG_VERSION"));
            println!("commit: {}", env!("COOPER_COMMIT"));
            println!("catalog: {}", cooper::catalog::EMBEDDED_PRICES);
            println!("solver: {}", planner::lp::backend_name());
            Ok(ExitCode::SUCCESS)
        }
        Command::Completion { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut command, "cooper", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Report {
            live: _,
            kube,
            catalog,
            output,
        } => {
            let catalog = load_catalog(catalog.as_deref(), None)?;
            if kube.namespace.is_some() {
                bail!(
                    "report --live covers the whole cluster (nodes are shared by every namespace); -n/--namespace does not apply"
                );
            }
            let report = report_live(&kube.target(), catalog)?;
            match output {
                Output::Table => print_live_report(&report),
                Output::Csv => print!("{}", live_report_csv(&report)),
                Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
                Output::Yaml => print!("{}", serde_saphyr::to_string(&report)?),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Catalog {
            catalog,
            region,
            family,
            output,
        } => {
            let catalog = load_catalog(catalog.as_deref(), region.as_deref())?;
            print!("{}", catalog_listing(&catalog, &family, output)?);
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `plan -o json|yaml`: the plan's own fields, and the plans it is measured against.
#[derive(serde::Serialize)]
struct PlanWithComparison<'p> {
    #[serde(flatten)]
    plan: &'p Plan,
    /// The same pods planned Karpenter-style (first-fit-decreasing) and on-demand only,
    /// whole plans, not just totals.
    compared_with: Vec<ComparedPlan>,
}

#[derive(serde::Serialize)]
struct ComparedPlan {
    label: &'static str,
    /// How much cheaper the main plan is, percent of this one's price.
    saving_percent: f64,
    plan: Plan,
}

/// Greedy (unless the main plan is greedy) and on-demand-only plans for the same input.
fn compared_plans(input: &PlanInput<'_>, options: &PlanOptions, main: &Plan) -> Vec<ComparedPlan> {
    let saving = |other: &Plan| {
        let theirs = other.total_price_per_hour;
        if theirs > 0.0 {
            ((theirs - main.total_price_per_hour) / theirs * 10_000.0).round() / 100.0
        } else {
            0.0
        }
    };
    let mut out = Vec::new();
    if options.strategy != Strategy::Greedy {
        let greedy = planner::plan(
            *input,
            &PlanOptions {
                strategy: Strategy::Greedy,
                ..options.clone()
            },
        );
        out.push(ComparedPlan {
            label: "greedy (first-fit-decreasing)",
            saving_percent: saving(&greedy),
            plan: greedy,
        });
    }
    let mut pools = input.pools.to_vec();
    nodepool::restrict_to_on_demand(&mut pools);
    let mut pods = input.pods.to_vec();
    for p in &mut pods {
        p.selector.drop_capacity_type();
    }
    let on_demand = planner::plan(
        PlanInput {
            pods: &pods,
            pools: &pools,
            ..*input
        },
        options,
    );
    out.push(ComparedPlan {
        label: "on-demand only",
        saving_percent: saving(&on_demand),
        plan: on_demand,
    });
    out
}

/// `plan -o csv`: one row per new node, then one per pod that cannot be placed.
fn plan_csv(plan: &Plan) -> String {
    let mut out = String::from(
        "row,name,nodepool,instance_type,zone,capacity_type,price_per_hour,node_cost_per_hour,pods,reason\n",
    );
    for n in &plan.nodes {
        out.push_str(&format!(
            "node,{},{},{},{},{},{},{},{},\n",
            csv(&n.name),
            csv(&n.nodepool),
            csv(&n.instance_type),
            csv(&n.zone),
            n.capacity_type,
            n.price_per_hour,
            n.node_cost_per_hour,
            n.pods.len()
        ));
    }
    for u in &plan.unschedulable {
        out.push_str(&format!(
            "unschedulable,{},,,,,,,,{}\n",
            csv(&u.pod),
            csv(&u.reason)
        ));
    }
    out
}

/// `report --live -o csv`: one row per cooper node.
fn live_report_csv(report: &cooper::controller::live_report::LiveReport) -> String {
    let mut out = String::from(
        "nodeclaim,node,nodepool,instance_type,zone,capacity_type,price_per_hour,pods,cpu_percent,memory_percent\n",
    );
    for n in &report.nodes {
        let pct = |r: &str| {
            n.utilisation
                .get(r)
                .map_or(String::new(), |p| format!("{p:.1}"))
        };
        out.push_str(&format!(
            "{},{},{},{},{},{},{},{},{},{}\n",
            csv(&n.nodeclaim),
            csv(n.node.as_deref().unwrap_or("")),
            csv(&n.nodepool),
            csv(&n.instance_type),
            csv(&n.zone),
            csv(&n.capacity_type),
            n.price_per_hour,
            n.pods,
            pct(resources::CPU),
            pct(resources::MEMORY)
        ));
    }
    out
}

fn plan_table(plan: &Plan, greedy: Option<&Plan>, catalog: &Catalog) -> String {
    let mut t = Table::new(&[
        "NODE", "POOL", "TYPE", "ZONE", "CAPACITY", ">$/HOUR", ">CPU", ">MEMORY", ">ACCEL", ">PODS",
    ]);
    let usage = |n: &planner::PlannedNode, r: &str| {
        let alloc = n.allocatable.get(r);
        if alloc == 0 {
            "-".to_string()
        } else {
            format!(
                "{}/{}",
                format_human(r, n.requested.get(r)),
                format_human(r, alloc)
            )
        }
    };
    for n in &plan.nodes {
        // The accelerator's model and memory per device, as Karpenter's
        // instance-gpu-name / instance-gpu-memory labels name them.
        let spec = catalog.instance_type(&n.instance_type).map(|t| &t.spec);
        let accel = if n.allocatable.get(resources::NVIDIA_GPU) > 0 {
            match spec.and_then(|s| s.gpu.as_ref()) {
                Some(g) => format!(
                    "{} {} ({} GiB)",
                    g.name,
                    usage(n, resources::NVIDIA_GPU),
                    g.memory_mib / 1024
                ),
                None => format!("gpu {}", usage(n, resources::NVIDIA_GPU)),
            }
        } else if n.allocatable.get(resources::NEURON) > 0 {
            match spec.and_then(|s| s.neuron.as_ref()) {
                Some(d) => format!("{} {}", d.name, usage(n, resources::NEURON)),
                None => format!("neuron {}", usage(n, resources::NEURON)),
            }
        } else {
            "-".into()
        };
        t.row(vec![
            n.name.clone(),
            n.nodepool.clone(),
            n.instance_type.clone(),
            n.zone.clone(),
            n.capacity_type.to_string(),
            format!("{:.4}", n.price_per_hour),
            usage(n, resources::CPU),
            usage(n, resources::MEMORY),
            accel,
            n.pods.len().to_string(),
        ]);
    }
    let mut out = t.render();
    let pods_new: usize = plan.nodes.iter().map(|n| n.pods.len()).sum();
    let pods_existing: usize = plan.existing_nodes.iter().map(|n| n.pods.len()).sum();
    out.push_str(&format!(
        "\n{} nodes, {pods_new} pods on new nodes, {pods_existing} on existing nodes, {} unschedulable\n",
        plan.nodes.len(),
        plan.unschedulable.len()
    ));
    out.push_str(&format!(
        "total ${:.4}/hour: instances ${:.4} + per-node ${:.4} (volumes, addresses) ({:?}, solved in {:.0} ms)",
        plan.total_price_per_hour,
        plan.instance_price_per_hour,
        plan.node_costs_per_hour,
        plan.strategy,
        plan.solve_ms
    ));
    if let (Some(lb), Some(gap)) = (plan.lower_bound_per_hour, plan.gap()) {
        out.push_str(&format!(
            "; lower bound ${lb:.4}/hour, gap {:.2}%",
            gap * 100.0
        ));
    } else if plan.strategy == Strategy::Optimal
        && let Some(why) = &plan.bound_note
    {
        out.push_str(&format!("; no lower bound: {why}"));
    }
    if plan.deadline_reached {
        out.push_str("; stopped by the time limit");
    }
    out.push('\n');
    if let Some(g) = greedy {
        let saving = g.total_price_per_hour - plan.total_price_per_hour;
        out.push_str(&format!(
            "greedy (first-fit-decreasing) plan: ${:.4}/hour with {} nodes, {} unschedulable; saving ${saving:.4}/hour ({:.1}%)\n",
            g.total_price_per_hour,
            g.nodes.len(),
            g.unschedulable.len(),
            pct(saving, g.total_price_per_hour)
        ));
    }
    let od = plan.on_demand_price(catalog);
    out.push_str(&format!(
        "the same nodes on-demand: ${od:.4}/hour; spot saves ${:.4}/hour ({:.1}%)\n",
        od - plan.total_price_per_hour + 0.0,
        pct(od - plan.total_price_per_hour, od)
    ));
    if !plan.unschedulable.is_empty() {
        out.push_str("\nunschedulable pods:\n");
        for u in &plan.unschedulable {
            out.push_str(&format!("  {}: {}\n", u.pod, u.reason));
        }
    }
    if !plan.relaxed.is_empty() {
        out.push_str("\npreferences relaxed (the pods run without them):\n");
        for r in &plan.relaxed {
            out.push_str(&format!("  {}: {}\n", r.pod, r.preference));
        }
    }
    out
}

/// A one-line progress bar on a terminal's standard error.
/// When the simulation started; the bar appears only once a run has taken a second.
static PROGRESS_START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
static PROGRESS_SHOWN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn show_progress(done: f64) {
    let start = PROGRESS_START.get_or_init(std::time::Instant::now);
    if start.elapsed() < std::time::Duration::from_secs(1) {
        return;
    }
    PROGRESS_SHOWN.store(true, std::sync::atomic::Ordering::Relaxed);
    let width = 30;
    let filled = ((done * width as f64).round() as usize).min(width);
    eprint!(
        "\r[{}{}] {:>3.0}%",
        "#".repeat(filled),
        " ".repeat(width - filled),
        done * 100.0
    );
}

fn pct(part: f64, whole: f64) -> f64 {
    if whole.abs() < 1e-12 {
        0.0
    } else {
        100.0 * part / whole
    }
}

#[derive(serde::Serialize)]
struct OfferingRow<'a> {
    instance_type: &'a str,
    zone: &'a str,
    capacity_type: CapacityType,
    price_per_hour: f64,
    vcpu: u32,
    memory_mib: u64,
    gpus: u32,
    gpu_name: Option<&'a str>,
    /// Memory of one GPU (MiB), as the `instance-gpu-memory` label.
    gpu_memory_mib: Option<u64>,
    neuron_devices: u32,
    max_pods: u32,
    allocatable: &'a resources::Resources,
}

fn catalog_listing(catalog: &Catalog, families: &[String], output: Output) -> Result<String> {
    // Families are lower case in EC2's names; `G5` means g5.
    let families: Vec<String> = families.iter().map(|f| f.to_ascii_lowercase()).collect();
    let rows: Vec<OfferingRow> = catalog
        .offerings
        .iter()
        .filter(|o| families.is_empty() || families.contains(&catalog.types[o.type_index].family))
        .map(|o| {
            let t = &catalog.types[o.type_index];
            OfferingRow {
                instance_type: t.name(),
                zone: &o.zone,
                capacity_type: o.capacity_type,
                price_per_hour: o.price,
                vcpu: t.spec.vcpu,
                memory_mib: t.spec.memory_mib,
                gpus: t.spec.gpu.as_ref().map_or(0, |g| g.count),
                gpu_name: t.spec.gpu.as_ref().map(|g| g.name.as_str()),
                gpu_memory_mib: t.spec.gpu.as_ref().map(|g| g.memory_mib),
                neuron_devices: t.spec.neuron.as_ref().map_or(0, |n| n.count),
                max_pods: t.max_pods,
                allocatable: &t.allocatable,
            }
        })
        .collect();
    if rows.is_empty() {
        bail!("no offerings match (families: {families:?})");
    }
    Ok(match output {
        Output::Json => serde_json::to_string_pretty(&rows)? + "\n",
        Output::Yaml => serde_saphyr::to_string(&rows)?,
        Output::Csv => {
            let mut out = String::from(
                "instance_type,zone,capacity_type,price_per_hour,vcpu,memory_mib,gpus,gpu_name,gpu_memory_mib,neuron_devices,max_pods\n",
            );
            for r in &rows {
                out.push_str(&format!(
                    "{},{},{},{},{},{},{},{},{},{},{}\n",
                    csv(r.instance_type),
                    csv(r.zone),
                    r.capacity_type,
                    r.price_per_hour,
                    r.vcpu,
                    r.memory_mib,
                    r.gpus,
                    csv(r.gpu_name.unwrap_or("")),
                    r.gpu_memory_mib.map_or(String::new(), |m| m.to_string()),
                    r.neuron_devices,
                    r.max_pods
                ));
            }
            out
        }
        Output::Table => {
            let mut t = Table::new(&[
                "TYPE",
                "ZONE",
                "CAPACITY",
                ">$/HOUR",
                ">VCPU",
                ">MEMORY",
                ">ACCEL",
                ">ALLOC CPU",
                ">ALLOC MEMORY",
                ">MAX PODS",
            ]);
            for r in &rows {
                let accel = match (r.gpus, r.neuron_devices) {
                    (0, 0) => "-".to_string(),
                    (g, 0) => format!("{g}x {}", r.gpu_name.unwrap_or("gpu")),
                    (_, n) => format!("{n}x neuron"),
                };
                t.row(vec![
                    r.instance_type.into(),
                    r.zone.into(),
                    r.capacity_type.to_string(),
                    format!("{:.4}", r.price_per_hour),
                    r.vcpu.to_string(),
                    format_human(resources::MEMORY, r.memory_mib as i64 * (1 << 20)),
                    accel,
                    format_human(resources::CPU, r.allocatable.get(resources::CPU)),
                    format_human(resources::MEMORY, r.allocatable.get(resources::MEMORY)),
                    r.max_pods.to_string(),
                ]);
            }
            let prices = &catalog.node_costs;
            let ebs: Vec<String> = prices
                .ebs_per_gib_month
                .iter()
                .map(|(kind, p)| format!("{kind} ${p}"))
                .collect();
            t.render()
                + &format!(
                    "\nper node besides the instance: EBS per GiB-month {}; public IPv4 ${}/hour\n  ({})\n",
                    ebs.join(", "),
                    prices.public_ipv4_per_hour,
                    prices.source
                )
        }
    })
}

/// `--gap`: a fraction in [0, 1) (NaN, negative values and 1 or more mean nothing).
fn parse_gap(s: &str) -> Result<f64, String> {
    let g: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number; give a fraction such as 0.01"))?;
    if !(0.0..1.0).contains(&g) {
        return Err(format!(
            "{s} is outside 0..1: the gap is a fraction of the plan's price (0.01 = 1 %)"
        ));
    }
    Ok(g)
}
