"""Validate Kubernetes manifests offline, as `tests/manifests.rs` asks.

Usage: python validate_manifests.py CRDS.yaml FILE... (`-` reads standard input)

Every file must parse as YAML. Every Kubernetes object in it (a mapping with apiVersion and
kind, at the top level or nested, e.g. a simulation scenario's `manifest:`; and the objects
in a ConfigMap's `*.yaml` data) is validated:
- built-in kinds against the Kubernetes 1.33 OpenAPI schemas (kubernetes-validate, strict:
  unknown fields are errors);
- cooper.dev kinds against the openAPIV3Schema of cooper's CRDs (jsonschema);
- ServiceMonitor and Volcano PodGroup (no schema offline) for their required fields.
Kustomize files (kustomize.config.k8s.io) are parsed, not validated.
Prints one line per problem and a summary; exits 1 on any problem.
"""

import sys

import jsonschema
import kubernetes_validate
import yaml

K8S_VERSION = "1.33.0"

# Third-party kinds with no schema offline: the spec fields they require.
STRUCTURAL = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): ["selector", "endpoints"],
    ("scheduling.volcano.sh/v1beta1", "PodGroup"): ["minMember"],
}


def crd_schemas(path):
    schemas = {}
    with open(path) as f:
        for doc in yaml.safe_load_all(f):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            group = doc["spec"]["group"]
            kind = doc["spec"]["names"]["kind"]
            for version in doc["spec"]["versions"]:
                schemas[(f"{group}/{version['name']}", kind)] = version["schema"]["openAPIV3Schema"]
    return schemas


def objects(value):
    """Kubernetes objects in a parsed document, nested ones included."""
    if isinstance(value, dict):
        if isinstance(value.get("apiVersion"), str) and isinstance(value.get("kind"), str):
            yield value
            if value["kind"] == "ConfigMap":
                for key, text in (value.get("data") or {}).items():
                    if key.endswith((".yaml", ".yml")):
                        for doc in yaml.safe_load_all(text):
                            yield from objects(doc)
            return
        for v in value.values():
            yield from objects(v)
    elif isinstance(value, list):
        for v in value:
            yield from objects(v)


def describe(obj):
    meta = obj.get("metadata") or {}
    return f"{obj.get('kind')} {meta.get('name', '?')}"


def check(obj, schemas, counts):
    api, kind = obj["apiVersion"], obj["kind"]
    group = api.split("/")[0] if "/" in api else ""
    if group in ("kustomize.config.k8s.io",):
        counts["kustomize"] += 1
        return None
    if (api, kind) in schemas:
        counts["cooper"] += 1
        try:
            jsonschema.validate(obj, schemas[(api, kind)])
        except jsonschema.ValidationError as e:
            where = "/".join(str(p) for p in e.absolute_path) or "(root)"
            return f"{where}: {e.message}"
        return None
    if (api, kind) == ("cooper.dev/v1alpha1", "Catalog"):
        counts["files"] += 1  # cooper's catalog file, checked by its loader (Catalog::load)
        return None
    if group == "cooper.dev":
        return f"no CRD for {api} {kind}"
    if (api, kind) in STRUCTURAL:
        counts["structural"] += 1
        spec = obj.get("spec") or {}
        missing = [f for f in STRUCTURAL[(api, kind)] if f not in spec]
        return f"spec.{', spec.'.join(missing)} required" if missing else None
    counts["kubernetes"] += 1
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        where = "/".join(str(p) for p in e.path) or "(root)"
        return f"{where}: {e.message}"
    except kubernetes_validate.SchemaNotFoundError:
        return f"no Kubernetes {K8S_VERSION} schema for {api} {kind}"
    return None


def main():
    schemas = crd_schemas(sys.argv[1])
    problems = []
    counts = {"kubernetes": 0, "cooper": 0, "structural": 0, "kustomize": 0, "files": 0}
    for name in sys.argv[2:]:
        text = sys.stdin.read() if name == "-" else open(name).read()
        try:
            docs = list(yaml.safe_load_all(text))
        except yaml.YAMLError as e:
            problems.append(f"{name}: does not parse: {e}")
            continue
        for obj in objects(docs):
            problem = check(obj, schemas, counts)
            if problem:
                problems.append(f"{name}: {describe(obj)}: {problem}")
    for p in problems:
        print(p)
    print(f"validated {counts['kubernetes']} Kubernetes, {counts['cooper']} cooper.dev and "
          f"{counts['structural']} third-party objects; {counts['kustomize']} kustomize and "
          f"{counts['files']} cooper data files parsed; "
          f"{len(problems)} problems")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
