//! Scheduling parity in the planner, on the shipped catalog and pools: the manifests real
//! clusters run (topology spread, pod anti-affinity, host ports, volumes pinned to a
//! zone, preferences, DRA, preemption) plan the way kube-scheduler will bind them, and
//! every plan passes the independent checker (which applies the scheduler's rules to the
//! cluster the plan makes).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use cooper::catalog::Catalog;
use cooper::labels::keys;
use cooper::nodepool;
use cooper::planner::{self, Plan, PlanInput, PlanOptions, Strategy};
use cooper::workload;

fn plan_text(text: &str, strategy: Strategy) -> Plan {
    let docs = cooper::manifest::parse_documents(Path::new("w.yaml"), text).expect("yaml");
    let w = workload::from_documents(&docs).expect("workloads");
    let catalog = Catalog::embedded().expect("catalog");
    let pools = nodepool::defaults().expect("pools");
    let input = PlanInput {
        pods: &w.pods,
        pools: &pools,
        catalog: &catalog,
        daemonsets: &w.daemonsets,
        gangs: &w.gangs,
        nodes: &[],
        unavailable: &BTreeSet::new(),
        running: &[],
    };
    let plan = planner::plan(
        input,
        &PlanOptions {
            strategy,
            ..PlanOptions::default()
        },
    );
    let problems = planner::verify::verify(&input, &plan);
    assert!(problems.is_empty(), "{problems:#?}\n{plan:#?}");
    plan
}

fn both(text: &str) -> [Plan; 2] {
    [
        plan_text(text, Strategy::Optimal),
        plan_text(text, Strategy::Greedy),
    ]
}

/// Pods per zone, and per node.
fn layout(plan: &Plan) -> (BTreeMap<String, usize>, Vec<usize>) {
    let mut zones = BTreeMap::new();
    let mut per_node = Vec::new();
    for n in &plan.nodes {
        *zones.entry(n.zone.clone()).or_default() += n.pods.len();
        per_node.push(n.pods.len());
    }
    (zones, per_node)
}

const WEB: &str = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  replicas: REPLICAS\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec:\n      containers:\n      - name: c\n        resources: {requests: {cpu: 500m, memory: 512Mi}}\nEXTRA";

fn web(replicas: usize, extra: &str) -> String {
    WEB.replace("REPLICAS", &replicas.to_string())
        .replace("EXTRA", extra)
}

#[test]
fn six_zone_spread_replicas_land_two_per_zone_over_three_zones() {
    let text = web(
        6,
        "      topologySpreadConstraints:\n      - {maxSkew: 1, topologyKey: topology.kubernetes.io/zone, whenUnsatisfiable: DoNotSchedule, labelSelector: {matchLabels: {app: web}}}\n      nodeSelector: {karpenter.sh/capacity-type: on-demand}\n      affinity:\n        nodeAffinity:\n          requiredDuringSchedulingIgnoredDuringExecution:\n            nodeSelectorTerms:\n            - matchExpressions: [{key: topology.kubernetes.io/zone, operator: In, values: [us-east-1a, us-east-1b, us-east-1c]}]\n",
    );
    for plan in both(&text) {
        assert!(plan.unschedulable.is_empty(), "{plan:#?}");
        let (zones, _) = layout(&plan);
        assert_eq!(zones.len(), 3, "{zones:?}");
        assert!(zones.values().all(|n| *n == 2), "{zones:?}");
    }
}

#[test]
fn required_hostname_anti_affinity_puts_each_replica_on_its_own_node() {
    let text = web(
        4,
        "      affinity:\n        podAntiAffinity:\n          requiredDuringSchedulingIgnoredDuringExecution:\n          - {topologyKey: kubernetes.io/hostname, labelSelector: {matchLabels: {app: web}}}\n",
    );
    for plan in both(&text) {
        let (_, per_node) = layout(&plan);
        assert_eq!(per_node, [1, 1, 1, 1], "{plan:#?}");
    }
}

#[test]
fn a_host_port_allows_one_pod_per_node() {
    let text = web(
        3,
        "      hostNetwork: false\n      containers:\n      - name: c\n        ports: [{containerPort: 8080, hostPort: 80}]\n        resources: {requests: {cpu: 500m, memory: 512Mi}}\n",
    )
    .replace(
        "      containers:\n      - name: c\n        resources: {requests: {cpu: 500m, memory: 512Mi}}\n      hostNetwork",
        "      hostNetwork",
    );
    for plan in both(&text) {
        let (_, per_node) = layout(&plan);
        assert_eq!(per_node, [1, 1, 1], "{plan:#?}");
    }
}

#[test]
fn a_pod_whose_volume_is_pinned_to_a_zone_gets_a_node_there() {
    let text = r#"
apiVersion: v1
kind: PersistentVolume
metadata: {name: data}
spec:
  capacity: {storage: 10Gi}
  accessModes: [ReadWriteOnce]
  csi: {driver: ebs.csi.aws.com, volumeHandle: vol-1}
  nodeAffinity:
    required:
      nodeSelectorTerms:
      - matchExpressions: [{key: topology.ebs.csi.aws.com/zone, operator: In, values: [us-east-1f]}]
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: data, namespace: default}
spec: {accessModes: [ReadWriteOnce], volumeName: data, resources: {requests: {storage: 10Gi}}}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: default}
spec:
  containers: [{name: c, resources: {requests: {cpu: "1", memory: 2Gi}}}]
  volumes: [{name: d, persistentVolumeClaim: {claimName: data}}]
"#;
    for plan in both(text) {
        assert_eq!(plan.nodes.len(), 1, "{plan:#?}");
        assert_eq!(plan.nodes[0].zone, "us-east-1f");
    }
    // A claim bound to a volume the input does not hold is not planned blind.
    let missing = text.replace("volumeName: data", "volumeName: gone");
    for plan in both(&missing) {
        assert!(plan.nodes.is_empty());
        assert!(
            plan.unschedulable[0]
                .reason
                .contains("PersistentVolume gone"),
            "{plan:#?}"
        );
    }
}

#[test]
fn a_preferred_on_demand_zone_is_honoured_when_the_pool_allows_it() {
    let text = r#"
apiVersion: v1
kind: Pod
metadata: {name: api, namespace: default}
spec:
  containers: [{name: c, resources: {requests: {cpu: "1", memory: 2Gi}}}]
  affinity:
    nodeAffinity:
      preferredDuringSchedulingIgnoredDuringExecution:
      - weight: 50
        preference:
          matchExpressions:
          - {key: karpenter.sh/capacity-type, operator: In, values: [on-demand]}
          - {key: topology.kubernetes.io/zone, operator: In, values: [us-east-1c]}
"#;
    for plan in both(text) {
        assert_eq!(plan.nodes.len(), 1);
        assert_eq!(plan.nodes[0].zone, "us-east-1c", "{plan:#?}");
        assert_eq!(
            plan.nodes[0].capacity_type,
            cooper::catalog::CapacityType::OnDemand
        );
        assert!(plan.relaxed.is_empty());
    }
    // A preference no pool can satisfy is relaxed and said so.
    let impossible = text.replace("us-east-1c", "eu-west-1a");
    for plan in both(&impossible) {
        assert_eq!(plan.nodes.len(), 1);
        assert_eq!(plan.relaxed.len(), 1, "{plan:#?}");
        assert!(
            plan.relaxed[0]
                .preference
                .contains("preferred node affinity")
        );
    }
}

/// Preferences on what cooper cannot model (a topology key no pool sets, namespaces
/// by label) do not keep a pod from running, as they do not in kube-scheduler: the pod
/// is planned and the plan names each preference it left out.
#[test]
fn preferences_cooper_cannot_model_are_planned_without_and_reported() {
    let text = r#"
apiVersion: v1
kind: Pod
metadata: {name: soft, namespace: default, labels: {app: s}}
spec:
  containers: [{name: c, resources: {requests: {cpu: "1"}}}]
  topologySpreadConstraints:
  - {maxSkew: 1, topologyKey: example.com/rack, whenUnsatisfiable: ScheduleAnyway, labelSelector: {matchLabels: {app: s}}}
  affinity:
    podAntiAffinity:
      preferredDuringSchedulingIgnoredDuringExecution:
      - weight: 10
        podAffinityTerm: {topologyKey: kubernetes.io/hostname, labelSelector: {matchLabels: {app: s}}, namespaceSelector: {matchLabels: {team: a}}}
"#;
    for plan in both(text) {
        assert!(plan.unschedulable.is_empty(), "{plan:#?}");
        assert_eq!(plan.nodes.len(), 1);
        let relaxed: Vec<&str> = plan.relaxed.iter().map(|r| r.preference.as_str()).collect();
        assert_eq!(relaxed.len(), 2, "{relaxed:?}");
        assert!(
            relaxed.iter().any(|r| r.contains("example.com/rack")),
            "{relaxed:?}"
        );
        assert!(
            relaxed.iter().any(|r| r.contains("namespaceSelector")),
            "{relaxed:?}"
        );
    }
}

#[test]
fn dra_claims_and_unknown_topology_keys_are_answered_not_planned() {
    let text = r#"
apiVersion: v1
kind: Pod
metadata: {name: dra, namespace: default}
spec:
  containers: [{name: c, resources: {requests: {cpu: "1"}}}]
  resourceClaims: [{name: gpu, resourceClaimName: a100}]
---
apiVersion: v1
kind: Pod
metadata: {name: rack, namespace: default, labels: {app: r}}
spec:
  containers: [{name: c, resources: {requests: {cpu: "1"}}}]
  topologySpreadConstraints:
  - {maxSkew: 1, topologyKey: example.com/rack, whenUnsatisfiable: DoNotSchedule, labelSelector: {matchLabels: {app: r}}}
"#;
    for plan in both(text) {
        assert!(plan.nodes.is_empty(), "{plan:#?}");
        let reasons: BTreeMap<&str, &str> = plan
            .unschedulable
            .iter()
            .map(|u| (u.pod.as_str(), u.reason.as_str()))
            .collect();
        assert!(reasons["default/dra"].contains("DRA"), "{reasons:?}");
        assert!(
            reasons["default/rack"].contains("example.com/rack"),
            "{reasons:?}"
        );
    }
}

#[test]
fn equal_price_zones_share_the_new_nodes() {
    // Twelve 3-CPU pods on on-demand m-family nodes: the same price in every zone.
    let text = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: batch}
spec:
  replicas: 12
  selector: {matchLabels: {app: batch}}
  template:
    metadata: {labels: {app: batch}}
    spec:
      nodeSelector: {karpenter.sh/capacity-type: on-demand, node.kubernetes.io/instance-type: m5.xlarge}
      containers: [{name: c, resources: {requests: {cpu: "3", memory: 4Gi}}}]
"#;
    for plan in both(text) {
        assert_eq!(plan.nodes.len(), 12);
        let zones: BTreeSet<&str> = plan.nodes.iter().map(|n| n.zone.as_str()).collect();
        assert!(zones.len() > 1, "all in {zones:?}");
        let (per_zone, _) = layout(&plan);
        let max = per_zone.values().max().copied().unwrap_or(0);
        let min = per_zone.values().min().copied().unwrap_or(0);
        assert!(max - min <= 1, "{per_zone:?}");
    }
}

#[test]
fn required_pod_affinity_on_the_hostname_keeps_a_group_on_one_node() {
    let text = web(
        3,
        "      affinity:\n        podAffinity:\n          requiredDuringSchedulingIgnoredDuringExecution:\n          - {topologyKey: kubernetes.io/hostname, labelSelector: {matchLabels: {app: web}}}\n",
    );
    for plan in both(&text) {
        assert_eq!(plan.nodes.len(), 1, "{plan:#?}");
        assert_eq!(plan.nodes[0].pods.len(), 3);
    }
}

#[test]
fn zone_anti_affinity_uses_a_zone_per_replica_and_refuses_beyond() {
    let text = web(
        7,
        "      nodeSelector: {karpenter.sh/capacity-type: on-demand}\n      affinity:\n        podAntiAffinity:\n          requiredDuringSchedulingIgnoredDuringExecution:\n          - {topologyKey: topology.kubernetes.io/zone, labelSelector: {matchLabels: {app: web}}}\n",
    );
    for plan in both(&text) {
        let zones: BTreeSet<&str> = plan.nodes.iter().map(|n| n.zone.as_str()).collect();
        let placed: usize = plan.nodes.iter().map(|n| n.pods.len()).sum();
        assert_eq!(placed, zones.len(), "one replica per zone: {plan:#?}");
        assert_eq!(placed + plan.unschedulable.len(), 7);
        assert!(!plan.unschedulable.is_empty(), "more replicas than zones");
        assert!(
            plan.unschedulable[0].reason.contains("anti-affinity"),
            "{plan:#?}"
        );
    }
    let _ = keys::ZONE;
}

#[test]
fn anti_affinity_across_namespaces_puts_every_member_on_its_own_node() {
    let pod = |ns: &str, name: &str, app: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{app: {app}, tier: singleton}}}}\nspec:\n  containers: [{{name: c, resources: {{requests: {{cpu: 500m, memory: 512Mi}}}}}}]\n  affinity:\n    podAntiAffinity:\n      requiredDuringSchedulingIgnoredDuringExecution:\n      - {{topologyKey: kubernetes.io/hostname, labelSelector: {{matchLabels: {{tier: singleton}}}}, namespaces: [default, team-a]}}\n---\n"
        )
    };
    let text = [
        pod("default", "a-0", "a"),
        pod("default", "a-1", "a"),
        pod("team-a", "b-0", "b"),
        pod("team-a", "b-1", "b"),
        pod("team-a", "b-2", "b"),
    ]
    .concat();
    for plan in both(&text) {
        assert!(plan.unschedulable.is_empty(), "{:#?}", plan.unschedulable);
        let (_, per_node) = layout(&plan);
        assert_eq!(per_node, [1, 1, 1, 1, 1], "{plan:#?}");
    }
}

/// One pod per node, 40 nodes of about 2 vCPUs in a pool limited to 2,000 vCPUs: the
/// limit is nowhere near, so nothing is refused. (Reserving each open node's largest
/// candidate, as Karpenter does, ran the limit out after ten nodes.)
#[test]
fn many_one_per_node_pods_do_not_run_a_large_limit_out() {
    let text = web(
        40,
        "      affinity:\n        podAntiAffinity:\n          requiredDuringSchedulingIgnoredDuringExecution:\n          - {topologyKey: kubernetes.io/hostname, labelSelector: {matchLabels: {app: web}}}\n",
    );
    for plan in both(&text) {
        assert!(plan.unschedulable.is_empty(), "{:#?}", plan.unschedulable);
        assert_eq!(plan.nodes.len(), 40);
    }
}

/// `limits: {cpu: "0"}` freezes a pool (as Karpenter users write it), it does not lift
/// the limit.
#[test]
fn a_zero_limit_freezes_the_pool() {
    let pools_text = "apiVersion: cooper.dev/v1alpha1\nkind: NodePool\nmetadata: {name: frozen}\nspec:\n  template: {spec: {requirements: []}}\n  limits: {cpu: \"0\"}\n";
    let docs =
        cooper::manifest::parse_documents(Path::new("pools.yaml"), pools_text).expect("yaml");
    let pools = nodepool::from_documents(&docs).expect("pools");
    let docs = cooper::manifest::parse_documents(Path::new("w.yaml"), &web(2, "")).expect("yaml");
    let w = workload::from_documents(&docs).expect("workloads");
    let catalog = Catalog::embedded().expect("catalog");
    for strategy in [Strategy::Optimal, Strategy::Greedy] {
        let input = PlanInput {
            pods: &w.pods,
            pools: &pools,
            catalog: &catalog,
            daemonsets: &[],
            gangs: &[],
            nodes: &[],
            unavailable: &BTreeSet::new(),
            running: &[],
        };
        let plan = planner::plan(
            input,
            &PlanOptions {
                strategy,
                ..PlanOptions::default()
            },
        );
        assert!(plan.nodes.is_empty(), "{plan:#?}");
        assert_eq!(plan.unschedulable.len(), 2);
        assert!(
            plan.unschedulable[0].reason.contains("limit cpu=0"),
            "{}",
            plan.unschedulable[0].reason
        );
        assert!(planner::verify::verify(&input, &plan).is_empty());
    }
}
