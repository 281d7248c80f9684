//! A node's whole life against the real control plane (kube-apiserver, kube-scheduler,
//! kube-controller-manager): every deletion drains through the Eviction API, PDBs hold
//! until the pool's `terminationGracePeriod`, expired and drifted nodes are replaced
//! before they drain, budgets limit drift by reason and schedule, a `do-not-disrupt` pod
//! keeps its node, and deleting a NodePool removes its nodes through the same flow.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use cooper::controller::Settings;
use cooper::crd::{NodeClaim, NodeClass, ResolvedAmi};
use cooper::nodepool::NodePoolResource;
use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;

mod common;
use common::cluster::{claims, create_pod, events, guard_with_pdb, running};
use common::harness::{settings, setup};
use common::kubelet::KubeletOptions;
use common::wait_for;

/// Create a NodePool from its spec.
async fn pool(client: &Client, name: &str, spec: serde_json::Value) {
    let api: Api<NodePoolResource> = Api::all(client.clone());
    let np: NodePoolResource = serde_json::from_value(json!({
        "apiVersion": "cooper.dev/v1alpha1", "kind": "NodePool",
        "metadata": {"name": name}, "spec": spec,
    }))
    .expect("pool");
    api.create(&PostParams::default(), &np)
        .await
        .expect("create pool");
}

/// A ReplicaSet of `replicas` pods requesting `cpu` each, labelled `app: <name>`: its
/// pods come back when evicted, as a Deployment's do.
/// The `default` pool on two on-demand types, never expiring, consolidating
/// (`WhenEmptyOrUnderutilized`) after 3 s with at most `budget` nodes at a time.
async fn consolidating_pool(client: &Client, types: [&str; 2], budget: u32) {
    pool(
        client,
        "default",
        json!({"template": {"spec": {
                  "expireAfter": "Never",
                  "requirements": [
                      {"key": "node.kubernetes.io/instance-type", "operator": "In", "values": types},
                      {"key": "karpenter.sh/capacity-type", "operator": "In", "values": ["on-demand"]}]}},
               "disruption": {"consolidationPolicy": "WhenEmptyOrUnderutilized",
                              "consolidateAfter": "3s",
                              "budgets": [{"nodes": budget.to_string()}]}}),
    )
    .await;
}

async fn replica_set(client: &Client, name: &str, replicas: i32, cpu: &str) {
    let api: Api<ReplicaSet> = Api::namespaced(client.clone(), "default");
    let rs: ReplicaSet = serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "ReplicaSet",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"replicas": replicas,
                 "selector": {"matchLabels": {"app": name}},
                 "template": {"metadata": {"labels": {"app": name}},
                              "spec": {"terminationGracePeriodSeconds": 1,
                                       "containers": [{"name": "c", "image": "x",
                                           "resources": {"requests": {"cpu": cpu, "memory": "1Gi"}}}]}}}
    }))
    .expect("replicaset");
    api.create(&PostParams::default(), &rs)
        .await
        .expect("create replicaset");
}

/// The ReplicaSet's pods: (name, node, running).
async fn replicas(client: &Client, app: &str) -> Vec<(String, Option<String>, bool)> {
    Api::<Pod>::namespaced(client.clone(), "default")
        .list(&ListParams::default().labels(&format!("app={app}")))
        .await
        .expect("pods")
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .map(|p| {
            let running = p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
            (p.name_any(), p.spec.and_then(|s| s.node_name), running)
        })
        .collect()
}

/// Wait until every one of the ReplicaSet's `n` pods runs; returns their nodes.
async fn all_running(client: &Client, app: &str, n: usize, timeout: Duration) -> BTreeSet<String> {
    wait_for(&format!("{n} {app} pods running"), timeout, || async {
        let pods = replicas(client, app).await;
        (pods.len() == n && pods.iter().all(|(_, _, r)| *r))
            .then(|| pods.into_iter().filter_map(|(_, n, _)| n).collect())
    })
    .await
}

fn is_true(claim: &NodeClaim, type_: &str) -> bool {
    claim.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == type_ && c.status == "True")
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_deleted_by_hand_is_drained_through_evictions_and_a_pdb_holds_until_the_grace_period()
 {
    let h = setup().await;
    let client = &h.client;
    pool(
        client,
        "default",
        json!({"template": {"spec": {
                  "terminationGracePeriod": "12s",
                  "requirements": [{"key": "node.kubernetes.io/instance-type", "operator": "In", "values": ["m6i.xlarge"]}]}},
               "disruption": {"consolidateAfter": "Never"}}),
    )
    .await;
    // Two pods on one node: one a PDB protects (grace 5 s), one free to go.
    create_pod(
        client,
        "guarded",
        json!({"cpu": "1", "memory": "1Gi"}),
        false,
    )
    .await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let free: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "free", "namespace": "default", "labels": {"app": "free"}},
        "spec": {"terminationGracePeriodSeconds": 1,
                 "containers": [{"name": "c", "image": "x", "resources": {"requests": {"cpu": "1", "memory": "1Gi"}}}]}
    }))
    .expect("pod");
    pods.create(&PostParams::default(), &free)
        .await
        .expect("create");
    let _kubelet = h.kubelet(KubeletOptions::default());
    let _stop = h.controller(settings()).await;
    let node = running(client, "guarded", Duration::from_secs(40)).await;
    assert_eq!(running(client, "free", Duration::from_secs(20)).await, node);
    guard_with_pdb(client, "guard", "sentiment").await;
    let claim = claims(client).await.remove(0);
    let instance = claim
        .status
        .as_ref()
        .and_then(|s| s.instance_id.clone())
        .expect("instance");
    let claims_api: Api<NodeClaim> = Api::all(client.clone());
    let deleted = Instant::now();
    claims_api
        .delete(&claim.name_any(), &DeleteParams::default())
        .await
        .expect("delete claim");
    // The node is tainted and cordoned; the free pod is evicted at once.
    let nodes: Api<Node> = Api::all(client.clone());
    wait_for("the node tainted", Duration::from_secs(10), || async {
        let n = nodes.get(&node).await.ok()?;
        let spec = n.spec?;
        (spec.unschedulable == Some(true)
            && spec
                .taints?
                .iter()
                .any(|t| t.key == "cooper.dev/disrupted" && t.effect == "NoSchedule"))
        .then_some(())
    })
    .await;
    wait_for("the free pod evicted", Duration::from_secs(10), || async {
        pods.get_opt("free")
            .await
            .ok()?
            .is_none_or(|p| p.metadata.deletion_timestamp.is_some())
            .then_some(())
    })
    .await;
    assert!(
        events(client)
            .await
            .iter()
            .any(|(reason, name, _)| reason == "Evicted" && name == "free"),
        "evicted through the Eviction API, with an Event"
    );
    // The guarded pod stays while the PDB refuses: until 12 s less its 5 s grace.
    let guarded_went = wait_for(
        "the guarded pod deleted",
        Duration::from_secs(30),
        || async {
            let gone = pods
                .get_opt("guarded")
                .await
                .ok()?
                .is_none_or(|p| p.metadata.deletion_timestamp.is_some());
            gone.then(|| deleted.elapsed())
        },
    )
    .await;
    assert!(
        guarded_went >= Duration::from_secs(6),
        "the PDB was overridden after {guarded_went:?}, before the grace period required it"
    );
    // The Event is written right after the deletion it reports.
    wait_for(
        "an Event saying why the guarded pod was deleted",
        Duration::from_secs(10),
        || async {
            events(client)
                .await
                .iter()
                .any(|(reason, name, m)| {
                    reason == "Deleted" && name == "guarded" && m.contains("terminationGracePeriod")
                })
                .then_some(())
        },
    )
    .await;
    wait_for("the claim gone", Duration::from_secs(20), || async {
        claims(client).await.is_empty().then_some(())
    })
    .await;
    assert!(
        deleted.elapsed() <= Duration::from_secs(25),
        "the grace period bounds the drain"
    );
    assert!(!h.cloud.instances().iter().any(|i| i.id == instance));
    assert!(
        nodes.get_opt(&node).await.expect("get").is_none(),
        "the Node is deleted, its finalizer released"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_nodes_are_replaced_first_then_drained_and_no_pod_is_left_pending() {
    let h = setup().await;
    let client = &h.client;
    pool(
        client,
        "default",
        json!({"template": {"spec": {
                  "expireAfter": "25s",
                  "requirements": [{"key": "node.kubernetes.io/instance-type", "operator": "In", "values": ["m6i.xlarge"]}]}},
               "disruption": {"consolidateAfter": "2s"}}),
    )
    .await;
    replica_set(client, "web", 2, "1").await;
    // Nodes take 3 s to boot, so the old node is seen waiting for its replacement.
    let _kubelet = h.kubelet(KubeletOptions {
        boot: Duration::from_secs(3),
        ..KubeletOptions::default()
    });
    let _stop = h.controller(settings()).await;
    let first = all_running(client, "web", 2, Duration::from_secs(40)).await;
    let old = claims(client).await;
    assert_eq!(old.len(), 1, "both pods fit one m6i.xlarge");
    let old_name = old[0].name_any();
    // At 25 s the node expires: a replacement is launched and initialised before the old
    // claim is deleted.
    let claims_api: Api<NodeClaim> = Api::all(client.clone());
    let replacement = wait_for("a replacement claim", Duration::from_secs(60), || async {
        claims(client)
            .await
            .into_iter()
            .find(|c| c.annotations().get("cooper.dev/replaces") == Some(&old_name))
    })
    .await;
    // (The replacement's claim is created first, then the old one is marked.)
    let old_claim = wait_for("the old claim marked", Duration::from_secs(10), || async {
        let c = claims_api.get(&old_name).await.ok()?;
        (is_true(&c, "Disrupting") || c.metadata.deletion_timestamp.is_some()).then_some(c)
    })
    .await;
    assert!(
        old_claim.metadata.deletion_timestamp.is_none(),
        "not drained before its replacement is up"
    );
    // Stop further expiry so the test sees one generation.
    let pools: Api<NodePoolResource> = Api::all(client.clone());
    pools
        .patch(
            "default",
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"template": {"spec": {"expireAfter": "Never"}}}})),
        )
        .await
        .expect("patch pool");
    // Watch the old claim until it is gone: when its deletion begins, the replacement
    // is initialised.
    let waited = Instant::now();
    let mut deletion_checked = false;
    while let Some(c) = claims_api.get_opt(&old_name).await.expect("get") {
        if c.metadata.deletion_timestamp.is_some() && !deletion_checked {
            deletion_checked = true;
            let r = claims_api
                .get(&replacement.name_any())
                .await
                .expect("replacement");
            assert!(
                is_true(&r, "Initialized"),
                "the old node drains only once its replacement is initialised"
            );
        }
        assert!(
            waited.elapsed() < Duration::from_secs(60),
            "the expired claim was never removed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let now_on = all_running(client, "web", 2, Duration::from_secs(60)).await;
    assert!(now_on.is_disjoint(&first), "{now_on:?} vs {first:?}");
    let node_of_replacement = claims_api
        .get(&replacement.name_any())
        .await
        .expect("replacement")
        .status
        .and_then(|s| s.node_name)
        .expect("registered");
    assert_eq!(now_on, BTreeSet::from([node_of_replacement]));
    assert!(
        events(client)
            .await
            .iter()
            .any(|(reason, name, _)| reason == "Expired" && name == &old_name),
        "the replacement is an Event on the expired claim"
    );
    // The NodePool reports what it runs (written on the configuration pass).
    let status = wait_for("the pool's status", Duration::from_secs(20), || async {
        let status = pools.get("default").await.ok()?.status?;
        (status.nodes == 1).then_some(status)
    })
    .await;
    assert_eq!(status.resources.get("cpu").map(String::as_str), Some("4"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ami_release_drifts_nodes_one_at_a_time_and_none_while_a_budget_window_is_closed() {
    let h = setup().await;
    let client = &h.client;
    let image = |id: &str| ResolvedAmi {
        id: id.into(),
        variant: "standard".into(),
        architecture: "x86_64".into(),
    };
    h.cloud.set_images(vec![image("ami-old")]);
    let classes: Api<NodeClass> = Api::all(client.clone());
    classes
        .create(
            &PostParams::default(),
            &NodeClass::new("default", common::node_class_spec()),
        )
        .await
        .expect("create class");
    // One node per pod (3 CPU on 4-CPU nodes); drift one node at a time.
    pool(
        client,
        "default",
        json!({"template": {"spec": {
                  "nodeClassRef": {"name": "default"},
                  "expireAfter": "Never",
                  "requirements": [{"key": "node.kubernetes.io/instance-type", "operator": "In", "values": ["m6i.xlarge"]}]}},
               "disruption": {"consolidateAfter": "2s", "budgets": [
                   {"nodes": "1", "reasons": ["Drifted"]}]}}),
    )
    .await;
    replica_set(client, "train", 2, "3").await;
    let _kubelet = h.kubelet(KubeletOptions::default());
    let _stop = h
        .controller(Settings {
            resolve_node_classes_every: Duration::from_secs(1),
            ..settings()
        })
        .await;
    all_running(client, "train", 2, Duration::from_secs(60)).await;
    let old: BTreeSet<String> = claims(client).await.iter().map(|c| c.name_any()).collect();
    assert_eq!(old.len(), 2);
    for c in claims(client).await {
        assert!(
            c.annotations().contains_key("cooper.dev/nodeclass-hash"),
            "the launch records what it launched from"
        );
    }
    let undisturbed = |what: &'static str| {
        let old = old.clone();
        async move {
            let current = claims(client).await;
            for c in &current {
                assert!(
                    !is_true(c, "Disrupting") && c.metadata.deletion_timestamp.is_none(),
                    "{} disrupted {what}",
                    c.name_any()
                );
            }
            let names: BTreeSet<String> = current.iter().map(|c| c.name_any()).collect();
            assert_eq!(names, old, "nodes replaced {what}");
        }
    };
    // Nothing has changed: nothing drifts (re-resolving the NodeClass changes nothing).
    tokio::time::sleep(Duration::from_secs(4)).await;
    undisturbed("with nothing changed").await;
    // A window closed to all disruption (open every minute for an hour: always), then an
    // AMI release: nothing moves while the window is in force.
    let pools: Api<NodePoolResource> = Api::all(client.clone());
    pools
        .patch(
            "default",
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"disruption": {"budgets": [
                {"nodes": "1", "reasons": ["Drifted"]},
                {"nodes": "0", "schedule": "* * * * *", "duration": "1h"}]}}})),
        )
        .await
        .expect("patch pool");
    tokio::time::sleep(Duration::from_secs(2)).await;
    h.cloud.set_images(vec![image("ami-new")]);
    wait_for(
        "the new image resolved",
        Duration::from_secs(10),
        || async {
            let c = classes.get("default").await.ok()?;
            (c.status?.amis.first()?.id == "ami-new").then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    undisturbed("inside a nodes: 0 window").await;
    // Open the window: the nodes drift, one at a time.
    pools
        .patch(
            "default",
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"disruption": {"budgets": [
                {"nodes": "1", "reasons": ["Drifted"]}]}}})),
        )
        .await
        .expect("patch pool");
    let start = Instant::now();
    loop {
        let current = claims(client).await;
        let in_disruption = current
            .iter()
            .filter(|c| old.contains(&c.name_any()))
            .filter(|c| is_true(c, "Disrupting") || c.metadata.deletion_timestamp.is_some())
            .count();
        assert!(
            in_disruption <= 1,
            "{in_disruption} drifted nodes in disruption at once"
        );
        if !current.iter().any(|c| old.contains(&c.name_any())) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the drifted nodes were not all replaced"
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    all_running(client, "train", 2, Duration::from_secs(60)).await;
    assert!(
        events(client)
            .await
            .iter()
            .filter(|(reason, _, m)| reason == "Drifted" && m.contains("NodeClass"))
            .count()
            >= 2,
        "each drift is an Event naming what changed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_do_not_disrupt_pod_keeps_its_node_until_it_finishes_and_a_deleted_pool_takes_its_nodes_away()
 {
    let h = setup().await;
    let client = &h.client;
    pool(
        client,
        "default",
        json!({"template": {"spec": {
                  "expireAfter": "5s",
                  "requirements": [{"key": "node.kubernetes.io/instance-type", "operator": "In", "values": ["m6i.xlarge"]}]}},
               "disruption": {"consolidateAfter": "Never"}}),
    )
    .await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let job: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "training", "namespace": "default",
                     "annotations": {"karpenter.sh/do-not-disrupt": "true"}},
        "spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "x",
                 "resources": {"requests": {"cpu": "1", "memory": "1Gi"}}}]}
    }))
    .expect("pod");
    pods.create(&PostParams::default(), &job)
        .await
        .expect("create");
    let _kubelet = h.kubelet(KubeletOptions::default());
    let _stop = h.controller(settings()).await;
    running(client, "training", Duration::from_secs(40)).await;
    let claim = claims(client).await.remove(0);
    // Expired for a while now, but the job says do-not-disrupt.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let claims_api: Api<NodeClaim> = Api::all(client.clone());
    let kept = claims_api.get(&claim.name_any()).await.expect("claim");
    assert!(
        !is_true(&kept, "Disrupting") && kept.metadata.deletion_timestamp.is_none(),
        "{:?}",
        kept.status
    );
    // The job finishes: the node expires at once (nothing to move).
    pods.patch_status(
        "training",
        &PatchParams::default(),
        &Patch::Merge(&json!({"status": {"phase": "Succeeded"}})),
    )
    .await
    .expect("finish");
    wait_for(
        "the expired node removed",
        Duration::from_secs(30),
        || async {
            claims_api
                .get_opt(&claim.name_any())
                .await
                .ok()?
                .is_none()
                .then_some(())
        },
    )
    .await;

    // Deleting the pool removes its nodes through the same flow (the claims are owned by
    // it; kube-controller-manager's garbage collector deletes them).
    let pools: Api<NodePoolResource> = Api::all(client.clone());
    pools
        .patch(
            "default",
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"template": {"spec": {"expireAfter": "Never"}}}})),
        )
        .await
        .expect("patch pool");
    create_pod(client, "web", json!({"cpu": "1", "memory": "1Gi"}), false).await;
    running(client, "web", Duration::from_secs(40)).await;
    let owned = claims(client).await.remove(0);
    assert_eq!(
        owned.owner_references().first().map(|o| o.kind.as_str()),
        Some("NodePool")
    );
    let instance = owned
        .status
        .as_ref()
        .and_then(|s| s.instance_id.clone())
        .expect("instance");
    pools
        .delete("default", &DeleteParams::default())
        .await
        .expect("delete pool");
    wait_for(
        "the pool's claim removed",
        Duration::from_secs(60),
        || async { claims(client).await.is_empty().then_some(()) },
    )
    .await;
    assert!(!h.cloud.instances().iter().any(|i| i.id == instance));
    assert!(
        events(client)
            .await
            .iter()
            .any(|(reason, name, _)| reason == "Evicted" && name == "web"),
        "drained through the Eviction API"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_node_is_replaced_by_a_cheaper_one_launched_first_and_a_pdb_holds_the_drain() {
    let h = setup().await;
    let client = &h.client;
    consolidating_pool(client, ["m6i.xlarge", "m6i.2xlarge"], 1).await;
    // Three 2-CPU replicas: one m6i.2xlarge (three m6i.xlarge would cost more).
    replica_set(client, "web", 3, "2").await;
    let _kubelet = h.kubelet(KubeletOptions::default());
    let _stop = h.controller(settings()).await;
    let first = all_running(client, "web", 3, Duration::from_secs(60)).await;
    assert_eq!(first.len(), 1);
    let old = claims(client).await.remove(0);
    assert_eq!(
        old.status.as_ref().and_then(|s| s.instance_type.as_deref()),
        Some("m6i.2xlarge")
    );
    // A pending pod that fits nowhere holds consolidation off.
    create_pod(client, "huge", json!({"cpu": "64", "memory": "1Gi"}), false).await;
    // Scale down to one replica: the m6i.2xlarge is twice what it needs.
    let rs: Api<ReplicaSet> = Api::namespaced(client.clone(), "default");
    rs.patch(
        "web",
        &PatchParams::default(),
        &Patch::Merge(&json!({"spec": {"replicas": 1}})),
    )
    .await
    .expect("scale down");
    all_running(client, "web", 1, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let claims_api: Api<NodeClaim> = Api::all(client.clone());
    let now_claims = claims(client).await;
    assert_eq!(
        now_claims.len(),
        1,
        "nothing consolidated while a pod was pending"
    );
    assert!(!is_true(&now_claims[0], "Disrupting"));
    // `cooper plan --live --consolidation` says what it would do, and does nothing.
    let kubeconfig = h.plane.controller_kubeconfig().to_path_buf();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_cooper"))
            .args(["plan", "--live", "--consolidation", "-o", "json"])
            .env("KUBECONFIG", &kubeconfig)
            .output()
            .expect("run cooper")
    })
    .await
    .expect("join");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let preview: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(preview["kind"], "replace", "{preview}");
    assert_eq!(
        preview["launch"][0]["instance_type"], "m6i.xlarge",
        "{preview}"
    );
    assert!(
        preview["savings_per_hour"].as_f64().unwrap_or(0.0) > 0.15,
        "{preview}"
    );
    assert_eq!(claims(client).await.len(), 1, "the preview wrote nothing");
    // A PDB that allows no disruption of the remaining replica.
    guard_with_pdb(client, "web", "web").await;
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), "default");
    Api::<Pod>::namespaced(client.clone(), "default")
        .delete("huge", &DeleteParams::default().grace_period(0))
        .await
        .expect("delete the pending pod");
    // Consolidation replaces the node with an m6i.xlarge, launched and initialised
    // before the old one is drained.
    let replacement = wait_for("a cheaper replacement", Duration::from_secs(60), || async {
        claims(client)
            .await
            .into_iter()
            .find(|c| c.annotations().get("cooper.dev/replaces") == Some(&old.name_any()))
    })
    .await;
    assert_eq!(
        replacement
            .spec
            .offerings
            .first()
            .map(|o| o.instance_type.as_str()),
        Some("m6i.xlarge")
    );
    wait_for(
        "the replacement initialised",
        Duration::from_secs(60),
        || async {
            let r = claims_api.get(&replacement.name_any()).await.ok()?;
            is_true(&r, "Initialized").then_some(())
        },
    )
    .await;
    // The old claim is deleted, but the PDB holds its pod: it stays, draining.
    wait_for(
        "the old claim deleting",
        Duration::from_secs(30),
        || async {
            claims_api
                .get(&old.name_any())
                .await
                .ok()?
                .metadata
                .deletion_timestamp
                .map(|_| ())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        claims_api
            .get_opt(&old.name_any())
            .await
            .expect("get")
            .is_some(),
        "the PDB holds the drain"
    );
    let still = all_running(client, "web", 1, Duration::from_secs(5)).await;
    assert_eq!(
        still, first,
        "the replica has not moved while the PDB refuses"
    );
    // The PDB goes: the replica moves to the new node and the old node goes.
    pdbs.delete("web", &DeleteParams::default())
        .await
        .expect("delete pdb");
    wait_for("the old claim gone", Duration::from_secs(60), || async {
        claims_api
            .get_opt(&old.name_any())
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    let moved = all_running(client, "web", 1, Duration::from_secs(60)).await;
    let new_node = claims_api
        .get(&replacement.name_any())
        .await
        .expect("replacement")
        .status
        .and_then(|s| s.node_name)
        .expect("registered");
    assert_eq!(moved, BTreeSet::from([new_node]));
    assert!(
        events(client)
            .await
            .iter()
            .any(|(reason, name, m)| reason == "Underutilized"
                && name == &old.name_any()
                && m.contains("replace")),
        "the move is an Event naming what it saves"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_pods_fit_elsewhere_is_deleted_and_its_pods_evicted_onto_the_others() {
    let h = setup().await;
    let client = &h.client;
    consolidating_pool(client, ["m6i.xlarge", "m6i.2xlarge"], 1).await;
    let _kubelet = h.kubelet(KubeletOptions::default());
    let _stop = h.controller(settings()).await;
    // Three 2-CPU web replicas fill most of an m6i.2xlarge; two 1.5-CPU workers then need
    // a second node for one of them.
    replica_set(client, "web", 3, "2").await;
    all_running(client, "web", 3, Duration::from_secs(60)).await;
    replica_set(client, "worker", 2, "1500m").await;
    all_running(client, "worker", 2, Duration::from_secs(60)).await;
    assert_eq!(claims(client).await.len(), 2);
    // Web scales down: the big node has room for the lone worker of the small one.
    let rs: Api<ReplicaSet> = Api::namespaced(client.clone(), "default");
    rs.patch(
        "web",
        &PatchParams::default(),
        &Patch::Merge(&json!({"spec": {"replicas": 1}})),
    )
    .await
    .expect("scale down");
    wait_for("one node left", Duration::from_secs(90), || async {
        (claims(client).await.len() == 1).then_some(())
    })
    .await;
    let left = claims(client).await.remove(0);
    assert_eq!(
        left.status
            .as_ref()
            .and_then(|s| s.instance_type.as_deref()),
        Some("m6i.2xlarge"),
        "the small node was the one deleted"
    );
    let node = left.status.and_then(|s| s.node_name).expect("node");
    let web = all_running(client, "web", 1, Duration::from_secs(30)).await;
    let workers = all_running(client, "worker", 2, Duration::from_secs(60)).await;
    assert_eq!(web, BTreeSet::from([node.clone()]));
    assert_eq!(
        workers,
        BTreeSet::from([node]),
        "the moved worker runs beside the others"
    );
    let evicted = events(client)
        .await
        .into_iter()
        .filter(|(reason, name, _)| reason == "Evicted" && name.starts_with("worker-"))
        .count();
    assert!(evicted >= 1, "the worker moved through the Eviction API");
    assert!(
        events(client)
            .await
            .iter()
            .any(|(reason, _, m)| reason == "Underutilized" && m.contains("delete")),
        "the delete is an Event"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_launched_apart_are_merged_into_one_cheaper_node_launched_first() {
    let h = setup().await;
    let client = &h.client;
    consolidating_pool(client, ["m6i.xlarge", "c6i.2xlarge"], 2).await;
    let _kubelet = h.kubelet(KubeletOptions {
        boot: Duration::from_secs(2),
        ..KubeletOptions::default()
    });
    let _stop = h.controller(settings()).await;
    // One 2.5-CPU replica, then another: each got an m6i.xlarge (neither fits beside the
    // other), where one c6i.2xlarge for both costs less.
    replica_set(client, "a", 1, "2500m").await;
    all_running(client, "a", 1, Duration::from_secs(60)).await;
    replica_set(client, "b", 1, "2500m").await;
    all_running(client, "b", 1, Duration::from_secs(60)).await;
    // (The merge may already be under way: its claim is not one of the old ones.)
    let old: BTreeSet<String> = claims(client)
        .await
        .iter()
        .filter(|c| !c.annotations().contains_key("cooper.dev/replaces"))
        .map(|c| c.name_any())
        .collect();
    assert_eq!(old.len(), 2);
    let merged = wait_for("a merged replacement", Duration::from_secs(60), || async {
        claims(client)
            .await
            .into_iter()
            .find(|c| c.annotations().contains_key("cooper.dev/replaces"))
    })
    .await;
    assert_eq!(
        merged
            .spec
            .offerings
            .first()
            .map(|o| o.instance_type.as_str()),
        Some("c6i.2xlarge")
    );
    // Both old claims wait for it, then go; both replicas end up on it.
    let claims_api: Api<NodeClaim> = Api::all(client.clone());
    // (The new claim is created first, then the old ones are marked.)
    for name in &old {
        let c = wait_for("the old claim marked", Duration::from_secs(10), || async {
            match claims_api.get_opt(name).await.ok()? {
                // Gone already: drained (the merged node was up, checked below).
                None => Some(None),
                Some(c) if is_true(&c, "Disrupting") || c.metadata.deletion_timestamp.is_some() => {
                    Some(Some(c))
                }
                Some(_) => None,
            }
        })
        .await;
        if c.is_none_or(|c| c.metadata.deletion_timestamp.is_some()) {
            let m = claims_api.get(&merged.name_any()).await.expect("merged");
            assert!(
                is_true(&m, "Initialized"),
                "drained before the merge node was up"
            );
        }
    }
    wait_for("the old claims gone", Duration::from_secs(60), || async {
        let left: BTreeSet<String> = claims(client).await.iter().map(|c| c.name_any()).collect();
        left.is_disjoint(&old).then_some(())
    })
    .await;
    let node = claims_api
        .get(&merged.name_any())
        .await
        .expect("merged")
        .status
        .and_then(|s| s.node_name)
        .expect("registered");
    for app in ["a", "b"] {
        let on = all_running(client, app, 1, Duration::from_secs(60)).await;
        assert_eq!(on, BTreeSet::from([node.clone()]), "{app}");
    }
    assert!(
        events(client)
            .await
            .iter()
            .any(|(reason, _, m)| reason == "Underutilized" && m.contains("merge")),
        "the merge is an Event"
    );
}
