//! Realistic, deterministic workload mixes for benchmarks, tests and large simulations:
//! web services, CPU batch, 1/4/8-GPU training (some as gangs), Neuron inference, with
//! some zone, architecture and capacity-type selectors and the tolerations the default
//! pools' taints ask for.

use crate::labels::{Labels, NodeSelector, TaintEffect, Toleration, keys};
use crate::resources::{self, Resources};
use crate::workload::{DaemonSetOverhead, Gang, PendingPod};

/// A small deterministic PRNG (SplitMix64), so that mixes need no extra crate and the
/// same seed gives the same pods on every platform.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [0, n).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }
}

const GIB: i64 = 1 << 30;
const MIB: i64 = 1 << 20;

fn tolerate(key: &str, value: Option<&str>) -> Toleration {
    Toleration {
        key: Some(key.into()),
        exists: value.is_none(),
        value: value.map(str::to_string),
        effect: Some(TaintEffect::NoSchedule),
    }
}

struct Shape {
    workload: &'static str,
    share: f64,
    cpu: i64,
    memory: i64,
    extra: &'static [(&'static str, i64)],
    selector: &'static [(&'static str, &'static str)],
    tolerations: fn() -> Vec<Toleration>,
    gang_size: u32,
}

fn none() -> Vec<Toleration> {
    Vec::new()
}
fn gpu() -> Vec<Toleration> {
    vec![tolerate(resources::NVIDIA_GPU, None)]
}
fn neuron() -> Vec<Toleration> {
    vec![tolerate(resources::NEURON, None)]
}
fn aiml_and_neuron() -> Vec<Toleration> {
    vec![
        tolerate("aiml", Some("true")),
        tolerate(resources::NEURON, None),
    ]
}

const SHAPES: &[Shape] = &[
    Shape {
        workload: "web-frontend",
        share: 0.17,
        cpu: 250,
        memory: 512 * MIB,
        extra: &[],
        selector: &[],
        tolerations: none,
        gang_size: 0,
    },
    Shape {
        workload: "web-api",
        share: 0.14,
        cpu: 500,
        memory: GIB,
        extra: &[],
        selector: &[],
        tolerations: none,
        gang_size: 0,
    },
    Shape {
        workload: "web-cache",
        share: 0.06,
        cpu: 1000,
        memory: 6 * GIB,
        extra: &[],
        selector: &[],
        tolerations: none,
        gang_size: 0,
    },
    Shape {
        workload: "web-critical",
        share: 0.05,
        cpu: 1000,
        memory: 2 * GIB,
        extra: &[],
        selector: &[(keys::CAPACITY_TYPE, "on-demand")],
        tolerations: none,
        gang_size: 0,
    },
    Shape {
        workload: "web-arm",
        share: 0.05,
        cpu: 500,
        memory: GIB,
        extra: &[],
        selector: &[(keys::ARCH, "arm64")],
        tolerations: none,
        gang_size: 0,
    },
    Shape {
        workload: "web-zonal",
        share: 0.04,
        cpu: 750,
        memory: 1536 * MIB,
        extra: &[],
        selector: &[(keys::ZONE, "us-east-1a")],
        tolerations: none,
        gang_size: 0,
    },
    Shape {
        workload: "batch-etl",
        share: 0.14,
        cpu: 2000,
        memory: 4 * GIB,
        extra: &[],
        selector: &[(keys::CAPACITY_TYPE, "spot")],
        tolerations: none,
        gang_size: 0,
    },
    Shape {
        workload: "batch-feature",
        share: 0.08,
        cpu: 4000,
        memory: 16 * GIB,
        extra: &[],
        selector: &[],
        tolerations: none,
        gang_size: 0,
    },
    Shape {
        workload: "batch-preprocess",
        share: 0.06,
        cpu: 3000,
        memory: 6 * GIB,
        extra: &[],
        selector: &[],
        tolerations: none,
        gang_size: 0,
    },
    Shape {
        workload: "train-1gpu",
        share: 0.05,
        cpu: 3000,
        memory: 12 * GIB,
        extra: &[(resources::NVIDIA_GPU, 1)],
        selector: &[],
        tolerations: gpu,
        gang_size: 0,
    },
    Shape {
        workload: "train-4gpu",
        share: 0.025,
        cpu: 20_000,
        memory: 80 * GIB,
        extra: &[(resources::NVIDIA_GPU, 4)],
        selector: &[],
        tolerations: gpu,
        gang_size: 0,
    },
    Shape {
        workload: "train-8gpu",
        share: 0.01,
        cpu: 60_000,
        memory: 400 * GIB,
        extra: &[(resources::NVIDIA_GPU, 8)],
        selector: &[],
        tolerations: gpu,
        gang_size: 4,
    },
    Shape {
        workload: "infer-inf2",
        share: 0.06,
        cpu: 1500,
        memory: 6 * GIB,
        extra: &[(resources::NEURON, 1)],
        selector: &[],
        tolerations: neuron,
        gang_size: 0,
    },
    Shape {
        workload: "infer-sentiment",
        share: 0.065,
        cpu: 1000,
        memory: 2 * GIB,
        extra: &[(resources::NEURON, 1)],
        selector: &[],
        tolerations: aiml_and_neuron,
        gang_size: 0,
    },
];

/// A generated mix.
#[derive(Debug, Clone, Default)]
pub struct Mix {
    pub pods: Vec<PendingPod>,
    pub daemonsets: Vec<DaemonSetOverhead>,
    pub gangs: Vec<Gang>,
}

impl Mix {
    /// The planner's input for this queue on empty pools (no existing nodes, nothing
    /// running), as the benchmarks and examples plan it.
    pub fn plan_input<'a>(
        &'a self,
        pools: &'a [crate::nodepool::NodePool],
        catalog: &'a crate::catalog::Catalog,
        unavailable: &'a std::collections::BTreeSet<crate::planner::OfferingKey>,
    ) -> crate::planner::PlanInput<'a> {
        crate::planner::PlanInput {
            pods: &self.pods,
            pools,
            catalog,
            daemonsets: &self.daemonsets,
            gangs: &self.gangs,
            nodes: &[],
            unavailable,
            running: &[],
        }
    }
}

/// `n` small pods of one Deployment (e.g. 250m CPU, 512 MiB), with the benchmark mix's
/// DaemonSets: the queue where per-node costs (root volume, address, DaemonSet
/// overhead) decide between many small nodes and fewer large ones.
pub fn small_pod_mix(n: usize, cpu_millis: i64, memory_mib: i64) -> Mix {
    let daemonsets = benchmark_mix(100, 1).daemonsets;
    let requests = Resources::from_pairs([
        (resources::CPU, cpu_millis),
        (resources::MEMORY, memory_mib * MIB),
        (resources::PODS, 1),
    ]);
    Mix {
        pods: (0..n)
            .map(|i| PendingPod {
                namespace: "apps".into(),
                name: format!("small-{i}"),
                requests: requests.clone(),
                selector: NodeSelector::default(),
                tolerations: Vec::new(),
                priority: 0,
                gang: None,
                workload: "Deployment small".into(),
                labels: [("app".to_string(), "small".to_string())].into(),
                constraints: None,
            })
            .collect(),
        daemonsets,
        gangs: Vec::new(),
    }
}

/// About `n` pending pods in the benchmark mix. Sizes vary a little around each
/// shape (a handful of distinct request sizes per workload), as real services do.
pub fn benchmark_mix(n: usize, seed: u64) -> Mix {
    let counts: Vec<usize> = SHAPES
        .iter()
        .map(|shape| {
            let count = ((n as f64) * shape.share).round() as usize;
            if shape.gang_size > 0 {
                count.div_ceil(shape.gang_size as usize) * shape.gang_size as usize
            } else {
                count
            }
        })
        .collect();
    mix_of(&counts, SplitMix64::new(seed), true)
}

/// A random queue of `n` pods (seeded): one to four of the benchmark's workloads, the
/// pods split between them at random, each pod one of its workload's size variants;
/// 8-GPU pods come alone rather than in gangs. The small-queue benchmark plans hundreds
/// of these, as a pending queue at one provisioning pass looks.
pub fn random_queue(n: usize, seed: u64) -> Mix {
    let mut rng = SplitMix64::new(seed ^ 0x005e_ed0f_0e0e);
    let kinds = 1 + rng.below(4) as usize;
    let mut chosen: Vec<usize> = Vec::new();
    while chosen.len() < kinds.min(SHAPES.len()) {
        let s = rng.below(SHAPES.len() as u64) as usize;
        if !chosen.contains(&s) {
            chosen.push(s);
        }
    }
    let mut counts = vec![0usize; SHAPES.len()];
    for i in 0..n {
        // Every chosen workload gets a pod first, then the rest at random.
        let s = if i < chosen.len() {
            chosen[i]
        } else {
            chosen[rng.below(chosen.len() as u64) as usize]
        };
        counts[s] += 1;
    }
    mix_of(&counts, rng, false)
}

/// Pods of each shape (`counts[i]` of `SHAPES[i]`), with the two benchmark DaemonSets;
/// `gangs`: 8-GPU pods form gangs of four.
fn mix_of(counts: &[usize], mut rng: SplitMix64, gangs: bool) -> Mix {
    let mut mix = Mix::default();
    for (shape, &count) in SHAPES.iter().zip(counts) {
        let gang_size = if gangs { shape.gang_size } else { 0 };
        let mut selector = NodeSelector::default();
        for (k, v) in shape.selector {
            selector.match_labels.insert(k.to_string(), v.to_string());
        }
        // Four variants per workload, e.g. different model sizes or versions.
        let variants: Vec<Resources> = (0..4)
            .map(|_| {
                let scale = [1.0, 1.0, 1.25, 1.5][rng.below(4) as usize];
                let mut r = Resources::from_pairs([
                    (
                        resources::CPU,
                        ((shape.cpu as f64 * scale) as i64 / 50) * 50,
                    ),
                    (
                        resources::MEMORY,
                        ((shape.memory as f64 * scale) as i64 / MIB) * MIB,
                    ),
                    (resources::PODS, 1),
                ]);
                for (k, v) in shape.extra {
                    r.set(*k, *v);
                }
                r
            })
            .collect();
        for i in 0..count {
            let gang = (gang_size > 0)
                .then(|| format!("ml/{}-{}", shape.workload, i / gang_size as usize));
            let requests = if gang.is_some() {
                variants[0].clone()
            } else {
                variants[rng.below(4) as usize].clone()
            };
            mix.pods.push(PendingPod {
                namespace: if shape.extra.is_empty() {
                    "apps".into()
                } else {
                    "ml".into()
                },
                name: format!("{}-{i}", shape.workload),
                requests,
                selector: selector.clone(),
                tolerations: (shape.tolerations)(),
                priority: if shape.workload == "web-critical" {
                    1000
                } else {
                    0
                },
                gang,
                workload: format!("Deployment {}", shape.workload),
                labels: [("app".to_string(), shape.workload.to_string())].into(),
                constraints: None,
            });
        }
        if gang_size > 0 {
            for g in 0..count / gang_size as usize {
                mix.gangs.push(Gang {
                    name: format!("ml/{}-{g}", shape.workload),
                    min_member: gang_size,
                });
            }
        }
    }
    // A node-exporter-like DaemonSet everywhere and a logging agent that tolerates all.
    mix.daemonsets.push(DaemonSetOverhead {
        name: "monitoring/node-exporter".into(),
        requests: Resources::from_pairs([
            (resources::CPU, 100),
            (resources::MEMORY, 128 * MIB),
            (resources::PODS, 1),
        ]),
        selector: NodeSelector::default(),
        tolerations: vec![Toleration {
            key: None,
            exists: true,
            value: None,
            effect: None,
        }],
    });
    let mut linux = Labels::new();
    linux.insert(keys::OS.into(), "linux".into());
    mix.daemonsets.push(DaemonSetOverhead {
        name: "kube-system/aws-node".into(),
        requests: Resources::from_pairs([(resources::CPU, 25), (resources::PODS, 1)]),
        selector: NodeSelector {
            match_labels: linux,
            terms: Vec::new(),
        },
        tolerations: vec![Toleration {
            key: None,
            exists: true,
            value: None,
            effect: None,
        }],
    });
    mix
}

/// The benchmark mix with `share` of its pods (say 0.3) carrying the scheduling
/// constraints production Deployments do, in groups of 20 replicas (each its own `app`
/// label): half spread over zones (`maxSkew: 1`, DoNotSchedule), a quarter one per node
/// (required hostname anti-affinity), a quarter spread over nodes as a preference and
/// over zones as a rule. Only web and batch pods (no accelerators, no gangs) get them.
pub fn constrained_mix(n: usize, seed: u64, share: f64) -> Mix {
    use crate::scheduling::{
        AffinityTerm, LabelSelector, Namespaces, PodConstraints, SpreadConstraint,
    };
    use std::sync::Arc;
    let mut mix = benchmark_mix(n, seed);
    let mut rng = SplitMix64::new(seed ^ 0xC0_05E7);
    let wanted = (mix.pods.len() as f64 * share).round() as usize;
    let eligible: Vec<usize> = (0..mix.pods.len())
        .filter(|&i| {
            let p = &mix.pods[i];
            p.gang.is_none()
                && p.requests.get(resources::NVIDIA_GPU) == 0
                && p.requests.get(resources::NEURON) == 0
        })
        .collect();
    let spread = |key: &str, hard: bool, app: &str| SpreadConstraint {
        max_skew: 1,
        topology_key: key.to_string(),
        hard,
        min_domains: None,
        selector: LabelSelector {
            match_labels: [("app".to_string(), app.to_string())].into(),
            expressions: Vec::new(),
        },
        honor_node_affinity: true,
        honor_taints: false,
    };
    for (g, chunk) in eligible.chunks(20).take(wanted.div_ceil(20)).enumerate() {
        let app = format!("svc-{g}");
        let namespace = mix.pods[chunk[0]].namespace.clone();
        let mut c = PodConstraints::default();
        match rng.below(4) {
            0 | 1 => c.spread.push(spread(keys::ZONE, true, &app)),
            2 => c.anti_affinity.push(AffinityTerm {
                selector: LabelSelector {
                    match_labels: [("app".to_string(), app.clone())].into(),
                    expressions: Vec::new(),
                },
                namespaces: Namespaces::List([namespace.clone()].into()),
                topology_key: keys::HOSTNAME.to_string(),
            }),
            _ => {
                c.spread.push(spread(keys::ZONE, true, &app));
                c.spread.push(spread(keys::HOSTNAME, false, &app));
            }
        }
        let c = Arc::new(c);
        // One Deployment: the same requests and namespace for every replica.
        let requests = mix.pods[chunk[0]].requests.clone();
        for &i in chunk {
            let p = &mut mix.pods[i];
            p.labels = [("app".to_string(), app.clone())].into();
            p.namespace = namespace.clone();
            p.requests = requests.clone();
            p.constraints = Some(c.clone());
        }
    }
    mix
}

/// The default pools with limits raised far enough for benchmark-sized mixes (the
/// shipped limits are sized for a small cluster). The inf1 pool keeps its 16-CPU
/// limit, so its overflow exercises the weight tiers.
pub fn benchmark_pools() -> Vec<crate::nodepool::NodePool> {
    let mut pools = crate::nodepool::defaults().expect("the shipped NodePools parse");
    for p in &mut pools {
        if p.name != "inf1" {
            p.limits = Resources::new();
        }
    }
    pools
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_is_deterministic_and_sized() {
        let a = benchmark_mix(1000, 7);
        let b = benchmark_mix(1000, 7);
        assert_eq!(a.pods, b.pods);
        assert!((990..=1010).contains(&a.pods.len()), "{}", a.pods.len());
        assert!(
            a.pods
                .iter()
                .any(|p| p.requests.get(resources::NVIDIA_GPU) == 8)
        );
        assert!(!a.gangs.is_empty());
    }
}
