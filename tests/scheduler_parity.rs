//! Parity with the real kube-scheduler (v1.26): generated workloads that use every
//! constraint cooper models — zone and hostname topology spread (hard, soft, minDomains,
//! nodeAffinityPolicy), pod affinity and anti-affinity on the hostname and the zone
//! (required and preferred, across namespaces), host ports, PersistentVolumes pinned to a
//! zone, WaitForFirstConsumer claims limited by `allowedTopologies`, preferred node
//! affinity, GPU pods on tainted nodes — are planned by cooper; the planned nodes are
//! created as Nodes (labels as cooper and the kubelet set them, allocatable, Ready) in a
//! real API server together with the pods, PVs, PVCs and StorageClasses; and the real
//! scheduler must bind every pod the plan placed, while the pods the plan refused stay
//! pending.
//!
//! Each pod is nominated to the node the plan chose (`status.nominatedNodeName`, which
//! kube-scheduler evaluates first with all of its filters) before the scheduler starts:
//! the scheduler still decides, and binds elsewhere when the nominated node fails a
//! filter, but it follows the plan's packing instead of its own scoring, which would
//! otherwise strand pods by packing differently (the same thing cooper's controller does
//! with nominations). A second round plans more pods beside the bound ones (existing
//! nodes with room, running pods whose anti-affinity, ports and labels count) and checks
//! those the same way.
//!
//! The harness plays the EBS CSI provisioner for WaitForFirstConsumer claims: when the
//! scheduler selects a node for a claim, it creates a PV in that node's zone and binds it.
//! `COOPER_PARITY_SEED` picks the workload (default 1).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::k8s::{ControlPlane, Parts};
use cooper::catalog::{CapacityType, Catalog};
use cooper::labels::{Labels, keys};
use cooper::manifest::Document;
use cooper::mix::SplitMix64;
use cooper::nodepool::{self, NodePool};
use cooper::planner::{self, ExistingNode, Plan, PlanInput, PlanOptions, Strategy};
use cooper::resources::Resources;
use cooper::scheduling::PlacedPod;
use cooper::workload::{self, PendingPod};
use k8s_openapi::api::core::v1::{
    Namespace, Node, PersistentVolume, PersistentVolumeClaim, Pod, ServiceAccount,
};
use k8s_openapi::api::scheduling::v1::PriorityClass;
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

const NAMESPACES: [&str; 2] = ["default", "team-a"];
const THREE_ZONES: [&str; 3] = ["us-east-1a", "us-east-1b", "us-east-1c"];
const ALL_ZONES: [&str; 6] = [
    "us-east-1a",
    "us-east-1b",
    "us-east-1c",
    "us-east-1d",
    "us-east-1e",
    "us-east-1f",
];
const WFFC_CLASS: &str = "gp3-wffc";
const WFFC_ZONES: [&str; 2] = ["us-east-1b", "us-east-1d"];

/// Generated objects: pods (in creation order) and the volumes they use.
#[derive(Default)]
struct Workload {
    pods: Vec<Value>,
    volumes: Vec<Value>,
    /// Group name → (namespace, app label) of every group, for later rounds.
    groups: Vec<(String, String, Value)>,
}

fn pick<'a, T>(rng: &mut SplitMix64, xs: &'a [T]) -> &'a T {
    &xs[rng.below(xs.len() as u64) as usize]
}

fn requests(rng: &mut SplitMix64) -> Value {
    let cpu = pick(rng, &["250m", "500m", "1", "1500m", "2"]);
    let mem = pick(rng, &["256Mi", "512Mi", "1Gi", "2Gi", "3Gi"]);
    json!({"cpu": cpu, "memory": mem})
}

fn selector(app: &str) -> Value {
    json!({"matchLabels": {"app": app}})
}

fn zones_in(zones: &[&str]) -> Value {
    json!({"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "topology.kubernetes.io/zone", "operator": "In", "values": zones}]}
    ]}})
}

/// A pod template of one generated group: its spec (without containers' requests) and
/// what kind of group it is.
fn group_spec(rng: &mut SplitMix64, kind: u64, app: &str, index: usize) -> (Value, usize) {
    let mut spec = json!({});
    let mut affinity = json!({});
    let n;
    match kind {
        // Zone spread, hard, over three zones; sometimes minDomains or a node-affinity
        // policy of Ignore (all zones' nodes count).
        0 => {
            n = 3 + rng.below(7) as usize;
            let mut c = json!({"maxSkew": 1 + rng.below(2), "topologyKey": keys::ZONE,
                "whenUnsatisfiable": "DoNotSchedule", "labelSelector": selector(app)});
            if rng.below(3) == 0 {
                c["minDomains"] = json!(3);
            }
            spec["topologySpreadConstraints"] = json!([c]);
            affinity["nodeAffinity"] = zones_in(&THREE_ZONES);
        }
        // One per node: required hostname anti-affinity.
        1 => {
            n = 2 + rng.below(5) as usize;
            affinity["podAntiAffinity"] = json!({"requiredDuringSchedulingIgnoredDuringExecution": [
                {"topologyKey": keys::HOSTNAME, "labelSelector": selector(app)}]});
        }
        // One per zone over three zones: the rest cannot run anywhere.
        2 => {
            n = 2 + rng.below(3) as usize;
            affinity["podAntiAffinity"] = json!({"requiredDuringSchedulingIgnoredDuringExecution": [
                {"topologyKey": keys::ZONE, "labelSelector": selector(app)}]});
            affinity["nodeAffinity"] = zones_in(&THREE_ZONES);
        }
        // Together on one node: hostname pod affinity to the group itself.
        3 => {
            n = 2 + rng.below(3) as usize;
            affinity["podAffinity"] = json!({"requiredDuringSchedulingIgnoredDuringExecution": [
                {"topologyKey": keys::HOSTNAME, "labelSelector": selector(app)}]});
        }
        // A host port: one per node.
        4 => {
            n = 2 + rng.below(4) as usize;
            spec["hostPort"] = json!(8000 + index);
        }
        // A zonal PersistentVolume each (handled by the caller).
        5 => n = 1 + rng.below(2) as usize,
        // A WaitForFirstConsumer claim each (handled by the caller).
        6 => n = 1 + rng.below(2) as usize,
        // Preferred on-demand in us-east-1c.
        7 => {
            n = 1 + rng.below(3) as usize;
            affinity["nodeAffinity"] = json!({"preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 50, "preference": {"matchExpressions": [
                    {"key": "karpenter.sh/capacity-type", "operator": "In", "values": ["on-demand"]},
                    {"key": keys::ZONE, "operator": "In", "values": ["us-east-1c"]}]}}]});
        }
        // Soft hostname spread and preferred anti-affinity.
        8 => {
            n = 2 + rng.below(5) as usize;
            spec["topologySpreadConstraints"] = json!([{"maxSkew": 1, "topologyKey": keys::HOSTNAME,
                "whenUnsatisfiable": "ScheduleAnyway", "labelSelector": selector(app)}]);
            affinity["podAntiAffinity"] = json!({"preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 10, "podAffinityTerm": {"topologyKey": keys::HOSTNAME, "labelSelector": selector(app)}}]});
        }
        // Hard hostname spread.
        9 => {
            n = 2 + rng.below(5) as usize;
            spec["topologySpreadConstraints"] = json!([{"maxSkew": 1, "topologyKey": keys::HOSTNAME,
                "whenUnsatisfiable": "DoNotSchedule", "labelSelector": selector(app)}]);
        }
        // GPU pods (tainted pool).
        10 => {
            n = 1 + rng.below(3) as usize;
            spec["tolerations"] =
                json!([{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]);
            spec["gpu"] = json!(true);
        }
        // Anti-affinity across both namespaces on the hostname.
        11 => {
            n = 2 + rng.below(3) as usize;
            affinity["podAntiAffinity"] = json!({"requiredDuringSchedulingIgnoredDuringExecution": [
                {"topologyKey": keys::HOSTNAME, "labelSelector": json!({"matchLabels": {"tier": "singleton"}}),
                 "namespaces": NAMESPACES}]});
            spec["tier"] = json!("singleton");
        }
        // Required pod affinity to a pod that does not exist: never runs.
        12 => {
            n = 1;
            affinity["podAffinity"] = json!({"requiredDuringSchedulingIgnoredDuringExecution": [
                {"topologyKey": keys::ZONE, "labelSelector": selector("nobody")}]});
        }
        // Plain pods.
        _ => n = 2 + rng.below(8) as usize,
    }
    if affinity.as_object().is_some_and(|o| !o.is_empty()) {
        spec["affinity"] = affinity;
    }
    (spec, n)
}

/// Generate `groups` groups; `first` numbers them (pod names sort in creation order).
fn generate(rng: &mut SplitMix64, first: usize, min_pods: usize, out: &mut Workload) {
    let mut index = first;
    let mut count = 0;
    while count < min_pods {
        let kind = rng.below(14);
        let namespace = *pick(rng, &NAMESPACES);
        let app = format!("g{index:03}");
        let (template, n) = group_spec(rng, kind, &app, index);
        out.groups
            .push((namespace.to_string(), app.clone(), template.clone()));
        let req = requests(rng);
        for j in 0..n {
            let claim = out_volumes(rng, kind, namespace, &app, j, &mut out.volumes);
            out.pods
                .push(pod_from(&template, namespace, &app, j, &req, claim));
            count += 1;
        }
        index += 1;
    }
}

/// The volume a pod of this group mounts (creating its PV/PVC), if any.
fn out_volumes(
    rng: &mut SplitMix64,
    kind: u64,
    namespace: &str,
    app: &str,
    j: usize,
    volumes: &mut Vec<Value>,
) -> Option<String> {
    let claim = format!("{app}-{j}");
    match kind {
        5 => {
            let zone = *pick(rng, &ALL_ZONES);
            volumes.push(json!({"apiVersion": "v1", "kind": "PersistentVolume",
                "metadata": {"name": format!("pv-{namespace}-{claim}")},
                "spec": {"capacity": {"storage": "10Gi"}, "accessModes": ["ReadWriteOnce"],
                    "persistentVolumeReclaimPolicy": "Retain",
                    "csi": {"driver": "ebs.csi.aws.com", "volumeHandle": format!("vol-{claim}")},
                    "claimRef": {"namespace": namespace, "name": claim},
                    "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                        {"key": "topology.ebs.csi.aws.com/zone", "operator": "In", "values": [zone]}]}]}}}}));
            volumes.push(json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                "metadata": {"name": claim, "namespace": namespace,
                    "annotations": {"pv.kubernetes.io/bind-completed": "yes"}},
                "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "",
                    "volumeName": format!("pv-{namespace}-{claim}"),
                    "resources": {"requests": {"storage": "10Gi"}}}}));
            Some(claim)
        }
        6 => {
            volumes.push(json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                "metadata": {"name": claim, "namespace": namespace},
                "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": WFFC_CLASS,
                    "resources": {"requests": {"storage": "10Gi"}}}}));
            Some(claim)
        }
        _ => None,
    }
}

fn pod_from(
    template: &Value,
    namespace: &str,
    app: &str,
    j: usize,
    req: &Value,
    claim: Option<String>,
) -> Value {
    let mut spec = template.clone();
    let mut labels = json!({"app": app});
    if let Some(t) = spec.as_object_mut().and_then(|o| o.remove("tier")) {
        labels["tier"] = t;
    }
    let gpu = spec.as_object_mut().and_then(|o| o.remove("gpu")).is_some();
    let port = spec.as_object_mut().and_then(|o| o.remove("hostPort"));
    let mut container = json!({"name": "c", "image": "registry.k8s.io/pause:3.9",
        "resources": {"requests": req.clone()}});
    if gpu {
        container["resources"]["limits"] = json!({"nvidia.com/gpu": 1});
    }
    if let Some(p) = port {
        container["ports"] = json!([{"containerPort": 80, "hostPort": p, "protocol": "TCP"}]);
    }
    spec["containers"] = json!([container]);
    spec["terminationGracePeriodSeconds"] = json!(0);
    if let Some(c) = claim {
        spec["volumes"] = json!([{"name": "data", "persistentVolumeClaim": {"claimName": c}}]);
    }
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("{app}-{j}"), "namespace": namespace, "labels": labels},
        "spec": spec})
}

fn documents(values: &[Value]) -> Vec<Document> {
    values
        .iter()
        .map(|v| Document {
            file: PathBuf::from("parity.yaml"),
            line: 1,
            value: v.clone(),
        })
        .collect()
}

fn storage_class() -> Value {
    json!({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
        "metadata": {"name": WFFC_CLASS}, "provisioner": "ebs.csi.aws.com",
        "volumeBindingMode": "WaitForFirstConsumer",
        "allowedTopologies": [{"matchLabelExpressions": [
            {"key": "topology.ebs.csi.aws.com/zone", "values": WFFC_ZONES}]}]})
}

/// The labels a cooper node carries once registered: the offering's, the pool's,
/// cooper's and Karpenter's names for them, and what the kubelet and the EBS CSI node
/// plugin add.
fn node_labels(
    catalog: &Catalog,
    pool: &NodePool,
    name: &str,
    t: &str,
    zone: &str,
    ct: CapacityType,
) -> Labels {
    let off = catalog
        .offerings
        .iter()
        .find(|o| {
            catalog.types[o.type_index].name() == t && o.zone == zone && o.capacity_type == ct
        })
        .expect("planned offering is in the catalog");
    let mut labels = catalog.offering_labels(off).clone();
    labels.extend(pool.labels.clone());
    labels.insert(keys::NODEPOOL.into(), pool.name.clone());
    labels.insert(keys::INSTANCE_TYPE.into(), t.into());
    labels.extend(cooper::labels::karpenter_aliases(&labels));
    labels.insert(keys::HOSTNAME.into(), name.into());
    labels.insert(keys::OS.into(), "linux".into());
    labels.insert("topology.ebs.csi.aws.com/zone".into(), zone.into());
    labels
}

async fn create_node(
    client: &Client,
    name: &str,
    labels: &Labels,
    pool: &NodePool,
    t: &cooper::catalog::InstanceType,
) {
    let quantities = |r: &Resources| r.to_quantities();
    let taints: Vec<Value> = pool
        .taints
        .iter()
        .map(|taint| {
            let mut v = json!({"key": taint.key, "effect": format!("{:?}", taint.effect)});
            if let Some(value) = &taint.value {
                v["value"] = json!(value);
            }
            v
        })
        .collect();
    let status = json!({
        "capacity": quantities(&t.capacity),
        "allocatable": quantities(&t.allocatable),
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
            "message": "ready", "lastHeartbeatTime": cooper::crd::now_rfc3339(),
            "lastTransitionTime": cooper::crd::now_rfc3339()}],
    });
    let node: Node = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": labels},
        "spec": {"providerID": format!("aws:///x/i-{name}"), "taints": taints},
        "status": status}))
    .expect("node");
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .create(&PostParams::default(), &node)
        .await
        .expect("create node");
    nodes
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(&json!({"status": status})),
        )
        .await
        .expect("node status");
    // The TaintNodesByCondition admission adds `node.kubernetes.io/not-ready` to every
    // new Node; the node lifecycle controller lifts it once the node is Ready, and no
    // controller-manager runs here.
    nodes
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"taints": taints}})),
        )
        .await
        .expect("node taints");
}

async fn create_volumes(client: &Client, volumes: &[Value]) {
    for v in volumes {
        match v["kind"].as_str() {
            Some("PersistentVolume") => {
                let pv: PersistentVolume = serde_json::from_value(v.clone()).expect("pv");
                let api: Api<PersistentVolume> = Api::all(client.clone());
                let name = pv.name_any();
                api.create(&PostParams::default(), &pv)
                    .await
                    .expect("create pv");
                api.patch_status(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(&json!({"status": {"phase": "Bound"}})),
                )
                .await
                .expect("pv status");
            }
            Some("PersistentVolumeClaim") => {
                let pvc: PersistentVolumeClaim = serde_json::from_value(v.clone()).expect("pvc");
                let ns = pvc.namespace().unwrap_or_default();
                let name = pvc.name_any();
                let api: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns);
                api.create(&PostParams::default(), &pvc)
                    .await
                    .expect("create pvc");
                if pvc
                    .spec
                    .as_ref()
                    .and_then(|s| s.volume_name.as_ref())
                    .is_some()
                {
                    api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&json!({"status": {
                        "phase": "Bound", "accessModes": ["ReadWriteOnce"], "capacity": {"storage": "10Gi"}}})))
                        .await
                        .expect("pvc status");
                }
            }
            Some("StorageClass") => {
                let sc: StorageClass = serde_json::from_value(v.clone()).expect("sc");
                Api::<StorageClass>::all(client.clone())
                    .create(&PostParams::default(), &sc)
                    .await
                    .expect("create sc");
            }
            other => panic!("unexpected volume kind {other:?}"),
        }
    }
}

/// Play the EBS CSI external-provisioner: a claim the scheduler has selected a node for
/// gets a PV in that node's zone, bound to it.
async fn provision_selected_claims(client: &Client, provisioned: &mut BTreeSet<String>) {
    let claims: Api<PersistentVolumeClaim> = Api::all(client.clone());
    let Ok(list) = claims.list(&ListParams::default()).await else {
        return;
    };
    let nodes: Api<Node> = Api::all(client.clone());
    for pvc in list {
        let ns = pvc.namespace().unwrap_or_default();
        let name = pvc.name_any();
        let key = format!("{ns}/{name}");
        let Some(node) = pvc
            .annotations()
            .get("volume.kubernetes.io/selected-node")
            .cloned()
        else {
            continue;
        };
        if provisioned.contains(&key)
            || pvc
                .spec
                .as_ref()
                .and_then(|s| s.volume_name.as_ref())
                .is_some()
        {
            continue;
        }
        let Ok(node) = nodes.get(&node).await else {
            continue;
        };
        let zone = node.labels().get(keys::ZONE).cloned().unwrap_or_default();
        let pv_name = format!("pvc-{}", pvc.uid().unwrap_or_default());
        let pv: PersistentVolume = serde_json::from_value(json!({"metadata": {"name": pv_name},
            "spec": {"capacity": {"storage": "10Gi"}, "accessModes": ["ReadWriteOnce"],
                "storageClassName": WFFC_CLASS, "persistentVolumeReclaimPolicy": "Delete",
                "csi": {"driver": "ebs.csi.aws.com", "volumeHandle": format!("vol-{name}")},
                "claimRef": {"namespace": ns, "name": name, "uid": pvc.uid()},
                "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                    {"key": "topology.ebs.csi.aws.com/zone", "operator": "In", "values": [zone]}]}]}}}}))
        .expect("pv");
        let pvs: Api<PersistentVolume> = Api::all(client.clone());
        if pvs.create(&PostParams::default(), &pv).await.is_err() {
            continue;
        }
        let _ = pvs
            .patch_status(
                &pv_name,
                &PatchParams::default(),
                &Patch::Merge(&json!({"status": {"phase": "Bound"}})),
            )
            .await;
        let api: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns);
        let _ = api
            .patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(&json!({
                "metadata": {"annotations": {"pv.kubernetes.io/bind-completed": "yes"}},
                "spec": {"volumeName": pv_name}})),
            )
            .await;
        let _ = api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&json!({"status": {
                "phase": "Bound", "accessModes": ["ReadWriteOnce"], "capacity": {"storage": "10Gi"}}})))
            .await;
        provisioned.insert(key);
    }
}

/// Pod key → node name, for every bound pod.
async fn bindings(client: &Client) -> BTreeMap<String, String> {
    let pods: Api<Pod> = Api::all(client.clone());
    pods.list(&ListParams::default())
        .await
        .expect("list pods")
        .into_iter()
        .filter_map(|p| {
            let node = p.spec.as_ref()?.node_name.clone()?;
            Some((
                format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any()),
                node,
            ))
        })
        .collect()
}

/// Where the plan put each pod.
fn placements(plan: &Plan) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for n in &plan.nodes {
        for p in &n.pods {
            out.insert(p.clone(), n.name.clone());
        }
    }
    for e in &plan.existing_nodes {
        for p in &e.pods {
            out.insert(p.clone(), e.node.clone());
        }
    }
    out
}

struct Round {
    planned: usize,
    refused: usize,
    on_planned_node: usize,
    nodes: usize,
}

/// Plan `pods` beside `existing`/`running`, create the new nodes and the pods, nominate
/// each pod to its planned node, start the scheduler and check its verdicts.
#[allow(clippy::too_many_arguments)]
async fn round(
    number: usize,
    plane: &ControlPlane,
    client: &Client,
    catalog: &Catalog,
    pools: &[NodePool],
    pod_values: &[Value],
    pods: &[PendingPod],
    existing: &[ExistingNode],
    running: &[PlacedPod],
    provisioned: &mut BTreeSet<String>,
) -> (Round, Plan) {
    let gangs = workload::Gang::of_pending(pods);
    let unavailable = BTreeSet::new();
    let input = PlanInput {
        pods,
        pools,
        catalog,
        daemonsets: &[],
        gangs: &gangs,
        nodes: existing,
        unavailable: &unavailable,
        running,
    };
    let plan = planner::plan(
        input,
        &PlanOptions {
            strategy: Strategy::Optimal,
            ..PlanOptions::default()
        },
    );
    let problems = planner::verify::verify(&input, &plan);
    assert!(problems.is_empty(), "cooper's checker: {problems:#?}");
    let placed = placements(&plan);
    let refused: BTreeMap<String, String> = plan
        .unschedulable
        .iter()
        .map(|u| (u.pod.clone(), u.reason.clone()))
        .collect();
    assert_eq!(
        placed.len() + refused.len(),
        pods.len(),
        "every pod is placed or refused"
    );

    // The order the scheduler takes the pods in, as distinct priorities (its queue
    // orders by priority, and a pod's filters count the pods nominated to the node
    // with a priority at least its own: exactly those placed before it). Layer by
    // layer over each group's zones, so that while the plan is being bound no
    // intermediate state breaks a spread the final state keeps.
    let zone_of: BTreeMap<&str, &str> = plan
        .nodes
        .iter()
        .map(|n| (n.name.as_str(), n.zone.as_str()))
        .chain(existing.iter().map(|n| {
            (
                n.name.as_str(),
                n.labels.get(keys::ZONE).map(String::as_str).unwrap_or(""),
            )
        }))
        .collect();
    let group = |k: &str| {
        k.rsplit_once('-')
            .map(|(g, _)| g.to_string())
            .unwrap_or_default()
    };
    // The group's pods already running in each zone count as earlier layers.
    let mut layer: BTreeMap<(String, &str), usize> = BTreeMap::new();
    for p in running {
        if let (Some(app), Some(zone)) = (p.labels.get("app"), zone_of.get(p.node.as_str())) {
            *layer
                .entry((format!("{}/{app}", p.namespace), zone))
                .or_default() += 1;
        }
    }
    let mut order: Vec<(usize, String, &str, String)> = Vec::new();
    for (k, node) in &placed {
        let zone = zone_of.get(node.as_str()).copied().unwrap_or("");
        let r = layer.entry((group(k), zone)).or_default();
        *r += 1;
        order.push((*r, group(k), zone, k.clone()));
    }
    order.sort();
    let mut priority: BTreeMap<String, String> = BTreeMap::new();
    let keys_in_order = order
        .into_iter()
        .map(|(.., k)| k)
        .chain(refused.keys().cloned());
    let classes: Api<PriorityClass> = Api::all(client.clone());
    for (i, k) in keys_in_order.enumerate() {
        let name = format!("parity-{number}-{i:04}");
        let class: PriorityClass = serde_json::from_value(json!({
            "metadata": {"name": name}, "value": 1_000_000 - i as i64,
            "preemptionPolicy": "Never"}))
        .expect("priority class");
        classes
            .create(&PostParams::default(), &class)
            .await
            .expect("create priority class");
        priority.insert(k, name);
    }

    // The scene, built while no scheduler runs.
    plane.stop_scheduler();
    for n in &plan.nodes {
        let pool = pools.iter().find(|p| p.name == n.nodepool).expect("pool");
        let t = catalog.instance_type(&n.instance_type).expect("type");
        let labels = node_labels(
            catalog,
            pool,
            &n.name,
            &n.instance_type,
            &n.zone,
            n.capacity_type,
        );
        create_node(client, &n.name, &labels, pool, t).await;
    }
    for v in pod_values {
        let mut v = v.clone();
        let key = format!(
            "{}/{}",
            v["metadata"]["namespace"].as_str().unwrap_or_default(),
            v["metadata"]["name"].as_str().unwrap_or_default()
        );
        v["spec"]["priorityClassName"] = json!(priority[&key]);
        let pod: Pod = serde_json::from_value(v).expect("pod");
        let ns = pod.namespace().unwrap_or_default();
        let name = pod.name_any();
        let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
        api.create(&PostParams::default(), &pod)
            .await
            .unwrap_or_else(|e| panic!("create pod {ns}/{name}: {e}"));
        if let Some(node) = placed.get(&format!("{ns}/{name}")) {
            api.patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(&json!({"status": {"nominatedNodeName": node}})),
            )
            .await
            .expect("nominate");
        }
    }
    plane.start_scheduler();

    // Every planned pod bound; the provisioner plays its part meanwhile.
    let deadline = Instant::now() + Duration::from_secs(120);
    let bound = loop {
        provision_selected_claims(client, provisioned).await;
        let bound = bindings(client).await;
        if placed.keys().all(|k| bound.contains_key(k)) {
            break bound;
        }
        if Instant::now() > deadline {
            // What the plan did with each missing pod's group, and where the
            // scheduler put its members.
            let zone_of: BTreeMap<&str, &str> = plan
                .nodes
                .iter()
                .map(|n| (n.name.as_str(), n.zone.as_str()))
                .chain(existing.iter().map(|n| {
                    (
                        n.name.as_str(),
                        n.labels.get(keys::ZONE).map(String::as_str).unwrap_or(""),
                    )
                }))
                .collect();
            let mut report = String::new();
            for k in placed.keys().filter(|k| !bound.contains_key(*k)) {
                let group = k.rsplit_once('-').map(|(g, _)| g).unwrap_or(k);
                report += &format!(
                    "{k}: planned on {} ({})\n",
                    placed[k],
                    zone_of[placed[k].as_str()]
                );
                for (m, n) in placed.iter().filter(|(m, _)| m.starts_with(group)) {
                    report += &format!(
                        "  {m}: plan {n} ({}), bound {:?}\n",
                        zone_of[n.as_str()],
                        bound.get(m).map(|b| (b, zone_of.get(b.as_str())))
                    );
                }
                if let Some(p) = pods.iter().find(|p| p.key() == *k) {
                    report += &format!("  constraints {:?}\n", p.constraints);
                }
            }
            let log = plane.scheduler_log();
            panic!(
                "the scheduler did not bind every planned pod:\n{report}\n{}",
                log.lines()
                    .filter(|l| l.contains("no fit"))
                    .take(20)
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    // The refused ones stay pending: give the scheduler time to try them again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = bindings(client).await;
    for (pod, reason) in &refused {
        assert!(
            !after.contains_key(pod),
            "{pod} was refused by the plan ({reason}) but the scheduler bound it to {}",
            after[pod]
        );
    }
    let on_planned_node = placed
        .iter()
        .filter(|(k, n)| bound.get(*k) == Some(*n))
        .count();
    for (k, n) in placed.iter().filter(|(k, n)| bound.get(*k) != Some(*n)) {
        eprintln!(
            "round {number}: {k} bound to {} ({}), not to the planned {n} ({}): {:?}",
            bound[k],
            zone_of.get(bound[k].as_str()).copied().unwrap_or("?"),
            zone_of.get(n.as_str()).copied().unwrap_or("?"),
            pods.iter()
                .find(|p| p.key() == *k)
                .map(|p| (&p.requests, &p.constraints))
        );
    }
    for (pod, reason) in &refused {
        eprintln!("round {number}: refused {pod}: {reason}");
    }
    // Each pod was nominated to its planned node, which the scheduler tries first with
    // all of its filters: a pod bound anywhere else means the plan's node failed one.
    assert_eq!(
        on_planned_node,
        placed.len(),
        "pods bound elsewhere than planned (listed above)"
    );
    (
        Round {
            planned: placed.len(),
            refused: refused.len(),
            on_planned_node,
            nodes: plan.nodes.len(),
        },
        plan,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_scheduler_binds_every_pod_the_plan_places() {
    let seed: u64 = std::env::var("COOPER_PARITY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    eprintln!("COOPER_PARITY_SEED={seed}");
    let mut rng = SplitMix64::new(seed);
    let catalog = Catalog::embedded().expect("catalog");
    let pools = nodepool::defaults().expect("pools");

    let plane = ControlPlane::start_with(Parts {
        scheduler: false,
        controller_manager: false,
    })
    .await;
    let client = plane.admin().await;
    let ns: Namespace =
        serde_json::from_value(json!({"metadata": {"name": "team-a"}})).expect("ns");
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .expect("namespace");
    let sa: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": "default", "namespace": "team-a"}}))
            .expect("sa");
    Api::<ServiceAccount>::namespaced(client.clone(), "team-a")
        .create(&PostParams::default(), &sa)
        .await
        .expect("service account");

    // Round 1: a fresh cluster.
    let mut first = Workload::default();
    first.volumes.push(storage_class());
    generate(&mut rng, 0, 220, &mut first);
    let mut docs = documents(&first.volumes);
    docs.extend(documents(&first.pods));
    if let Ok(path) = std::env::var("COOPER_PARITY_DUMP") {
        // The round's input for `cooper plan -f`, to reproduce a finding.
        let text: Vec<String> = first
            .volumes
            .iter()
            .chain(&first.pods)
            .map(|v| v.to_string())
            .collect();
        std::fs::write(&path, text.join("\n---\n")).expect("dump");
    }
    let parsed = workload::from_documents(&docs).expect("generated workload parses");
    assert_eq!(parsed.pods.len(), first.pods.len());
    create_volumes(&client, &first.volumes).await;
    let mut provisioned = BTreeSet::new();
    let (r1, plan1) = round(
        1,
        &plane,
        &client,
        &catalog,
        &pools,
        &first.pods,
        &parsed.pods,
        &[],
        &[],
        &mut provisioned,
    )
    .await;
    eprintln!(
        "round 1: {} pods planned on {} new nodes, {} refused; the scheduler bound all of them, {} on the node the plan chose",
        r1.planned, r1.nodes, r1.refused, r1.on_planned_node
    );
    assert!(r1.planned >= 200, "only {} pods planned", r1.planned);

    // The pods round 1 refused are not round 2's business (deleted, or they would
    // compete for round 2's room unplanned).
    for u in &plan1.unschedulable {
        let (ns, name) = u.pod.split_once('/').expect("key");
        Api::<Pod>::namespaced(client.clone(), ns)
            .delete(
                name,
                &kube::api::DeleteParams {
                    grace_period_seconds: Some(0),
                    ..Default::default()
                },
            )
            .await
            .expect("delete refused pod");
    }

    // Round 2: more pods, some in the same groups (the running ones count for spreading
    // and anti-affinity), beside the nodes of round 1.
    let bound = bindings(&client).await;
    let by_key: BTreeMap<String, &PendingPod> = parsed.pods.iter().map(|p| (p.key(), p)).collect();
    let running: Vec<PlacedPod> = bound
        .iter()
        .filter_map(|(k, node)| Some(by_key.get(k)?.placed_on(node)))
        .collect();
    let mut existing = Vec::new();
    for n in &plan1.nodes {
        let pool = pools.iter().find(|p| p.name == n.nodepool).expect("pool");
        let t = catalog.instance_type(&n.instance_type).expect("type");
        let requested = bound
            .iter()
            .filter(|(_, node)| **node == n.name)
            .filter_map(|(k, _)| by_key.get(k))
            .fold(Resources::new(), |r, p| r.plus(&p.requests));
        existing.push(ExistingNode {
            name: n.name.clone(),
            nodepool: Some(n.nodepool.clone()),
            labels: node_labels(
                &catalog,
                pool,
                &n.name,
                &n.instance_type,
                &n.zone,
                n.capacity_type,
            ),
            taints: pool.taints.clone(),
            allocatable: t.allocatable.clone(),
            capacity: t.capacity.clone(),
            requested,
            in_flight: false,
        });
    }
    let mut second = Workload::default();
    // More replicas of round 1's groups (not the volume ones: their claims are taken).
    for (i, (namespace, app, template)) in first.groups.iter().enumerate() {
        if rng.below(3) != 0 || template.to_string().contains("nobody") {
            continue;
        }
        let req = requests(&mut rng);
        for j in 0..1 + rng.below(3) as usize {
            second
                .pods
                .push(pod_from(template, namespace, app, 100 + j, &req, None));
        }
        let _ = i;
    }
    generate(&mut rng, first.groups.len(), 60, &mut second);
    let mut docs2 = documents(&first.volumes);
    docs2.extend(documents(&second.volumes));
    docs2.extend(documents(&second.pods));
    let parsed2 = workload::from_documents(&docs2).expect("round 2 parses");
    create_volumes(&client, &second.volumes).await;
    let (r2, _) = round(
        2,
        &plane,
        &client,
        &catalog,
        &pools,
        &second.pods,
        &parsed2.pods,
        &existing,
        &running,
        &mut provisioned,
    )
    .await;
    eprintln!(
        "round 2: {} pods planned ({} new nodes, the rest on round 1's), {} refused; all bound, {} on the planned node",
        r2.planned, r2.nodes, r2.refused, r2.on_planned_node
    );
    assert!(r2.planned > 0);
}
