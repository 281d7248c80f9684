"""A small Kubernetes API server emulator for cooper's integration tests.

No kube-apiserver can be installed here, so the tests talk to this over real HTTP
with kube-rs. It follows the API server's semantics wherever cooper depends on them:

- every write bumps a cluster-wide resourceVersion; objects get uid,
  creationTimestamp, generation (bumped on spec changes);
- list returns the current resourceVersion; watch replays events after a given
  resourceVersion (410 Gone / reason Expired when it is too old), sends BOOKMARKs
  when asked, and ends after timeoutSeconds;
- label selectors (=, ==, !=, in, notin, exists, !exists) and field selectors
  (metadata.name, metadata.namespace, spec.nodeName, status.phase, spec.schedulerName);
- create (201, generateName, 409 AlreadyExists), get/list (404 NotFound),
  replace with optimistic concurrency (409 Conflict), delete with finalizers
  (deletionTimestamp, then gone when the last finalizer is removed), merge, JSON,
  strategic-merge (as merge) and server-side apply patches (apply creates);
- status subresources: writes to the main resource keep the old status, writes to
  /status keep everything else;
- pods/binding sets spec.nodeName; pods/eviction honours PodDisruptionBudgets (429);
- RBAC: when COOPER_EMULATOR_RBAC names a file of Roles, ClusterRoles and bindings
  (deploy/base/rbac.yaml), a request impersonating a ServiceAccount
  (`Impersonate-User: system:serviceaccount:NS:NAME`) is allowed only by the rules bound to
  it, else 403 Forbidden as the API server words it; every denial is listed at
  /emulator/stats. Requests without impersonation are the tests' own (cluster-admin).

Errors are `Status` objects with machine-readable `reason`s, as kube-rs expects.
Usage: python emulator.py PORT   (prints "ready" on stdout when listening)
"""

import asyncio
import bisect
import copy
import json
import os
import sys
import uuid
from datetime import datetime, timezone

from aiohttp import web

KINDS = {
    ("", "pods"): "Pod",
    ("", "nodes"): "Node",
    ("", "namespaces"): "Namespace",
    ("", "events"): "Event",
    ("", "configmaps"): "ConfigMap",
    ("", "services"): "Service",
    ("", "serviceaccounts"): "ServiceAccount",
    ("apps", "daemonsets"): "DaemonSet",
    ("apps", "deployments"): "Deployment",
    ("policy", "poddisruptionbudgets"): "PodDisruptionBudget",
    ("coordination.k8s.io", "leases"): "Lease",
    ("events.k8s.io", "events"): "Event",
    ("apiextensions.k8s.io", "customresourcedefinitions"): "CustomResourceDefinition",
    ("cooper.dev", "nodepools"): "NodePool",
    ("cooper.dev", "nodeclasses"): "NodeClass",
    ("cooper.dev", "nodeclaims"): "NodeClaim",
}
CLUSTER_SCOPED = {"nodes", "namespaces", "customresourcedefinitions", "nodepools", "nodeclasses", "nodeclaims"}
WITH_STATUS = {"pods", "nodes", "nodepools", "nodeclasses", "nodeclaims", "deployments", "daemonsets", "poddisruptionbudgets"}
HISTORY = 20000


def now():
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def status(code, reason, message, name=None, kind=None):
    body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}
    if name is not None:
        body["details"] = {"name": name, "kind": kind or ""}
    return web.json_response(body, status=code)


def merge_patch(target, patch):
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


def json_pointer(path):
    return [p.replace("~1", "/").replace("~0", "~") for p in path.split("/")[1:]]


def json_patch(doc, ops):
    doc = copy.deepcopy(doc)
    for op in ops:
        parts = json_pointer(op["path"])
        parent = doc
        for p in parts[:-1]:
            parent = parent[int(p)] if isinstance(parent, list) else parent[p]
        last = parts[-1] if parts else None
        kind = op["op"]
        if kind == "test":
            cur = parent[int(last)] if isinstance(parent, list) else parent.get(last)
            if cur != op.get("value"):
                raise ValueError(f"test failed at {op['path']}")
        elif kind in ("add", "replace"):
            if isinstance(parent, list):
                if last == "-":
                    parent.append(op["value"])
                elif kind == "add":
                    parent.insert(int(last), op["value"])
                else:
                    parent[int(last)] = op["value"]
            else:
                if kind == "replace" and last not in parent:
                    raise ValueError(f"replace of missing {op['path']}")
                parent[last] = op["value"]
        elif kind == "remove":
            if isinstance(parent, list):
                parent.pop(int(last))
            else:
                if last not in parent:
                    raise ValueError(f"remove of missing {op['path']}")
                del parent[last]
        else:
            raise ValueError(f"unsupported op {kind}")
    return doc


def parse_label_selector(text):
    reqs = []
    if not text:
        return reqs
    # split on commas outside parentheses
    depth, cur, parts = 0, "", []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    for p in (x.strip() for x in parts if x.strip()):
        if " notin " in p:
            k, v = p.split(" notin ", 1)
            reqs.append((k.strip(), "notin", {x.strip() for x in v.strip()[1:-1].split(",")}))
        elif " in " in p:
            k, v = p.split(" in ", 1)
            reqs.append((k.strip(), "in", {x.strip() for x in v.strip()[1:-1].split(",")}))
        elif "!=" in p:
            k, v = p.split("!=", 1)
            reqs.append((k.strip(), "notin", {v.strip()}))
        elif "==" in p or "=" in p:
            k, v = p.split("==", 1) if "==" in p else p.split("=", 1)
            reqs.append((k.strip(), "in", {v.strip()}))
        elif p.startswith("!"):
            reqs.append((p[1:].strip(), "!exists", None))
        else:
            reqs.append((p, "exists", None))
    return reqs


def labels_match(reqs, labels):
    for k, op, vals in reqs:
        v = labels.get(k)
        if op == "in" and v not in vals:
            return False
        if op == "notin" and v in vals:
            return False
        if op == "exists" and v is None:
            return False
        if op == "!exists" and v is not None:
            return False
    return True


def field_value(obj, path):
    cur = obj
    for p in path.split("."):
        if not isinstance(cur, dict):
            return ""
        cur = cur.get(p)
    return "" if cur is None else str(cur)


def fields_match(text, obj):
    if not text:
        return True
    for p in text.split(","):
        if "!=" in p:
            k, v = p.split("!=", 1)
            if field_value(obj, k) == v:
                return False
        else:
            k, v = p.split("==", 1) if "==" in p else p.split("=", 1)
            if field_value(obj, k) != v:
                return False
    return True


class Store:
    def __init__(self):
        self.rv = 0
        self.objects = {}  # (group, resource) -> {(ns, name): obj}
        self.events = []  # (rv, group, resource, type, obj)
        self.changed = asyncio.Condition()
        self.requests = 0
        self.denied = []  # RBAC denials, for the tests to assert on

    def bucket(self, group, resource):
        return self.objects.setdefault((group, resource), {})

    async def record(self, group, resource, etype, obj):
        self.events.append((self.rv, group, resource, etype, copy.deepcopy(obj)))
        if len(self.events) > HISTORY:
            del self.events[: len(self.events) - HISTORY]
        async with self.changed:
            self.changed.notify_all()

    def bump(self, obj):
        self.rv += 1
        obj.setdefault("metadata", {})["resourceVersion"] = str(self.rv)


STORE = None


def route(request):
    """(group, version, namespace, resource, name, subresource) from the path."""
    parts = [p for p in request.path.split("/") if p]
    if parts[0] == "api":
        group, version, rest = "", parts[1], parts[2:]
    else:
        group, version, rest = parts[1], parts[2], parts[3:]
    ns = None
    if len(rest) >= 3 and rest[0] == "namespaces":
        ns, rest = rest[1], rest[2:]
    resource = rest[0]
    name = rest[1] if len(rest) > 1 else None
    sub = rest[2] if len(rest) > 2 else None
    return group, version, ns, resource, name, sub


def api_version(group, version):
    return f"{group}/{version}" if group else version


def kind_of(group, resource, body=None):
    return KINDS.get((group, resource)) or (body or {}).get("kind") or resource.capitalize()


def load_rbac(path):
    """(subject, namespace or None for cluster-wide, rules) for every binding in the file."""
    import yaml
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    roles = {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]): d.get("rules", [])
             for d in docs if d["kind"] in ("Role", "ClusterRole")}
    grants = []
    for d in docs:
        if d["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        ref = d["roleRef"]
        ns = d["metadata"].get("namespace") if d["kind"] == "RoleBinding" else None
        role_ns = ns if ref["kind"] == "Role" else None
        rules = roles.get((ref["kind"], role_ns, ref["name"]), [])
        for subject in d.get("subjects", []):
            if subject["kind"] == "ServiceAccount":
                user = f"system:serviceaccount:{subject['namespace']}:{subject['name']}"
                grants.append((user, ns, rules))
    return grants


RBAC = load_rbac(os.environ["COOPER_EMULATOR_RBAC"]) if os.environ.get("COOPER_EMULATOR_RBAC") else None


def verb_of(method, name, query):
    if method == "GET":
        if name is None:
            return "watch" if query.get("watch") in ("1", "true") else "list"
        return "get"
    return {"POST": "create", "PUT": "update", "PATCH": "patch",
            "DELETE": "delete" if name else "deletecollection"}.get(method, method.lower())


def allowed(user, verb, group, resource, sub, ns):
    full = f"{resource}/{sub}" if sub else resource
    for subject, scope, rules in RBAC:
        if subject != user or (scope is not None and scope != ns):
            continue
        for rule in rules:
            if (group in rule.get("apiGroups", []) or "*" in rule.get("apiGroups", [])) \
                    and (full in rule.get("resources", []) or "*" in rule.get("resources", [])) \
                    and (verb in rule.get("verbs", []) or "*" in rule.get("verbs", [])):
                return True
    return False


async def handle(request):
    STORE.requests += 1
    try:
        group, version, ns, resource, name, sub = route(request)
    except (IndexError, ValueError):
        return status(404, "NotFound", f"the server could not find the requested resource {request.path}")
    if resource in CLUSTER_SCOPED:
        ns = None
    user = request.headers.get("Impersonate-User")
    if RBAC is not None and user:
        verb = verb_of(request.method, name, request.query)
        if not allowed(user, verb, group, resource, sub, ns):
            full = f"{resource}/{sub}" if sub else resource
            where = f'in the namespace "{ns}"' if ns else "at the cluster scope"
            message = (f'{full} "{name or ""}" is forbidden: User "{user}" cannot {verb} '
                       f'resource "{full}" in API group "{group}" {where}')
            STORE.denied.append(message)
            return status(403, "Forbidden", message, name, kind_of(group, resource))
    bucket = STORE.bucket(group, resource)
    kind = kind_of(group, resource)
    method = request.method
    q = request.query
    if method == "GET" and name is None:
        if q.get("watch") in ("1", "true"):
            return await watch(request, group, version, resource, ns)
        reqs = parse_label_selector(q.get("labelSelector", ""))
        items = [copy.deepcopy(o) for (ons, _), o in sorted(bucket.items())
                 if (ns is None or ons == ns)
                 and labels_match(reqs, o["metadata"].get("labels", {}))
                 and fields_match(q.get("fieldSelector", ""), o)]
        return web.json_response({"kind": kind + "List", "apiVersion": api_version(group, version),
                                  "metadata": {"resourceVersion": str(STORE.rv)}, "items": items})
    key = (ns, name)
    if method == "GET":
        obj = bucket.get(key)
        if obj is None:
            return status(404, "NotFound", f'{resource} "{name}" not found', name, kind)
        return web.json_response(obj)
    body = None
    if request.can_read_body:
        text = await request.text()
        body = json.loads(text) if text else None
    if method == "POST" and sub == "binding":
        pod = bucket.get(key)
        if pod is None:
            return status(404, "NotFound", f'pods "{name}" not found', name, "Pod")
        if pod.get("spec", {}).get("nodeName"):
            return status(409, "Conflict", f"pod {name} is already assigned to node {pod['spec']['nodeName']}", name, "Pod")
        pod = copy.deepcopy(pod)
        pod["spec"]["nodeName"] = body["target"]["name"]
        STORE.bump(pod)
        bucket[key] = pod
        await STORE.record(group, resource, "MODIFIED", pod)
        return web.json_response({"kind": "Status", "apiVersion": "v1", "status": "Success", "code": 201}, status=201)
    if method == "POST" and sub == "eviction":
        pod = bucket.get(key)
        if pod is None:
            return status(404, "NotFound", f'pods "{name}" not found', name, "Pod")
        blocked = eviction_blocked(pod)
        if blocked:
            return status(429, "TooManyRequests", f"Cannot evict pod as it would violate the pod's disruption budget {blocked}", name, "Pod")
        await delete(group, resource, key, kind)
        # The API server answers a granted eviction with a Status, not the pod.
        return web.json_response({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}, status=201)
    if method == "POST":
        if not isinstance(body, dict):
            return status(400, "BadRequest", "body must be an object")
        meta = body.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        if not meta.get("name"):
            return status(422, "Invalid", f"{kind} is invalid: metadata.name: Required value", None, kind)
        if ns is not None:
            meta["namespace"] = ns
        key = (ns, meta["name"])
        if key in bucket:
            return status(409, "AlreadyExists", f'{resource} "{meta["name"]}" already exists', meta["name"], kind)
        return web.json_response(await create(group, version, resource, key, body), status=201)
    if method == "DELETE":
        if key not in bucket:
            return status(404, "NotFound", f'{resource} "{name}" not found', name, kind)
        return await delete(group, resource, key, kind)
    if method in ("PUT", "PATCH"):
        old = bucket.get(key)
        ctype = request.headers.get("Content-Type", "").split(";")[0]
        if old is None:
            if method == "PATCH" and ctype == "application/apply-patch+yaml":
                body.setdefault("metadata", {})["name"] = name
                if ns is not None:
                    body["metadata"]["namespace"] = ns
                return web.json_response(await create(group, version, resource, key, body), status=201)
            return status(404, "NotFound", f'{resource} "{name}" not found', name, kind)
        if method == "PUT":
            new = copy.deepcopy(body)
            want = new.get("metadata", {}).get("resourceVersion")
            if want and want != old["metadata"]["resourceVersion"]:
                return status(409, "Conflict", f'Operation cannot be fulfilled on {resource} "{name}": the object has been modified; please apply your changes to the latest version and try again', name, kind)
        else:
            try:
                if ctype == "application/json-patch+json":
                    new = json_patch(old, body)
                else:  # merge, strategic merge (treated as merge), apply
                    new = merge_patch(old, body)
            except (ValueError, KeyError, IndexError, TypeError) as e:
                return status(422, "Invalid", f"patch failed: {e}", name, kind)
            want = (body or {}).get("metadata", {}).get("resourceVersion") if isinstance(body, dict) else None
            if want and want != old["metadata"]["resourceVersion"]:
                return status(409, "Conflict", f'Operation cannot be fulfilled on {resource} "{name}": the object has been modified', name, kind)
        return await update(group, resource, key, old, new, sub)
    return status(405, "MethodNotAllowed", f"{method} is not supported")


async def create(group, version, resource, key, body):
    obj = copy.deepcopy(body)
    obj["apiVersion"] = api_version(group, version)
    obj["kind"] = kind_of(group, resource, body)
    meta = obj["metadata"]
    meta["uid"] = str(uuid.uuid4())
    meta["creationTimestamp"] = now()
    meta["generation"] = 1
    meta.pop("deletionTimestamp", None)
    if resource == "pods":
        obj.setdefault("status", {}).setdefault("phase", "Pending")
    STORE.bump(obj)
    STORE.bucket(group, resource)[key] = obj
    await STORE.record(group, resource, "ADDED", obj)
    return obj


async def update(group, resource, key, old, new, sub):
    bucket = STORE.bucket(group, resource)
    new.setdefault("metadata", {})
    for f in ("uid", "creationTimestamp", "namespace", "name", "deletionTimestamp"):
        if f in old["metadata"]:
            new["metadata"][f] = old["metadata"][f]
    new["apiVersion"], new["kind"] = old["apiVersion"], old["kind"]
    if resource in WITH_STATUS:
        if sub == "status":
            new = {**copy.deepcopy(old), "status": new.get("status", {})}
        elif "status" in old or "status" in new:
            new["status"] = copy.deepcopy(old.get("status", {}))
            if not new["status"]:
                new.pop("status")
    generation = old["metadata"].get("generation", 1)
    if new.get("spec") != old.get("spec"):
        generation += 1
    new["metadata"]["generation"] = generation
    if new == {**old, "metadata": {**old["metadata"], "generation": generation}}:
        return web.json_response(old)  # no-op: no new resourceVersion, no event
    STORE.bump(new)
    if new["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers"):
        del bucket[key]
        await STORE.record(group, resource, "DELETED", new)
        return web.json_response(new)
    bucket[key] = new
    await STORE.record(group, resource, "MODIFIED", new)
    return web.json_response(new)


async def delete(group, resource, key, kind):
    bucket = STORE.bucket(group, resource)
    obj = copy.deepcopy(bucket[key])
    if obj["metadata"].get("finalizers"):
        if not obj["metadata"].get("deletionTimestamp"):
            obj["metadata"]["deletionTimestamp"] = now()
            obj["metadata"]["deletionGracePeriodSeconds"] = 0
            STORE.bump(obj)
            bucket[key] = obj
            await STORE.record(group, resource, "MODIFIED", obj)
        return web.json_response(obj)
    del bucket[key]
    STORE.bump(obj)
    await STORE.record(group, resource, "DELETED", obj)
    return web.json_response(obj)


def eviction_blocked(pod):
    ns = pod["metadata"].get("namespace")
    labels = pod["metadata"].get("labels", {})
    pods = STORE.bucket("", "pods")
    for (pns, pname), pdb in STORE.bucket("policy", "poddisruptionbudgets").items():
        if pns != ns:
            continue
        sel = pdb.get("spec", {}).get("selector", {}) or {}
        reqs = [(k, "in", {v}) for k, v in (sel.get("matchLabels") or {}).items()]
        for e in sel.get("matchExpressions") or []:
            op = {"In": "in", "NotIn": "notin", "Exists": "exists", "DoesNotExist": "!exists"}[e["operator"]]
            reqs.append((e["key"], op, set(e.get("values") or [])))
        if not labels_match(reqs, labels):
            continue
        matching = [p for (ons, _), p in pods.items() if ons == ns and labels_match(reqs, p["metadata"].get("labels", {}))]
        healthy = [p for p in matching if p.get("spec", {}).get("nodeName") and not p["metadata"].get("deletionTimestamp")]
        spec = pdb.get("spec", {})
        if "minAvailable" in spec:
            allowed = len(healthy) - resolve(spec["minAvailable"], len(matching))
        else:
            allowed = resolve(spec.get("maxUnavailable", 0), len(matching)) - (len(matching) - len(healthy))
        if allowed < 1:
            return pname
    return None


def resolve(value, total):
    if isinstance(value, str) and value.endswith("%"):
        import math
        return math.ceil(total * float(value[:-1]) / 100.0)
    return int(value)


async def watch(request, group, version, resource, ns):
    q = request.query
    since = int(q.get("resourceVersion") or 0)
    reqs = parse_label_selector(q.get("labelSelector", ""))
    fsel = q.get("fieldSelector", "")
    bookmarks = q.get("allowWatchBookmarks") in ("1", "true")
    timeout = min(int(q.get("timeoutSeconds") or 300), 300)
    oldest = STORE.events[0][0] if STORE.events else STORE.rv
    if since and since < oldest - 1 and len(STORE.events) >= HISTORY:
        return status(410, "Expired", f"too old resource version: {since} ({oldest})")
    resp = web.StreamResponse(headers={"Content-Type": "application/json"})
    await resp.prepare(request)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    sent_rv = since
    last_bookmark = loop.time()
    try:
        while loop.time() < deadline:
            start = bisect.bisect_right(STORE.events, sent_rv, key=lambda e: e[0])
            for rv, g, r, etype, obj in STORE.events[start:]:
                sent_rv = rv
                if g != group or r != resource:
                    continue
                if ns is not None and obj["metadata"].get("namespace") != ns:
                    continue
                if not labels_match(reqs, obj["metadata"].get("labels", {})) or not fields_match(fsel, obj):
                    continue
                await resp.write((json.dumps({"type": etype, "object": obj}) + "\n").encode())
            if bookmarks and loop.time() - last_bookmark >= 1.0:
                last_bookmark = loop.time()
                bm = {"type": "BOOKMARK", "object": {"kind": kind_of(group, resource), "apiVersion": api_version(group, version),
                                                    "metadata": {"resourceVersion": str(sent_rv)}}}
                await resp.write((json.dumps(bm) + "\n").encode())
            async with STORE.changed:
                try:
                    await asyncio.wait_for(STORE.changed.wait(), timeout=1.0)
                except asyncio.TimeoutError:
                    pass
    except (ConnectionResetError, asyncio.CancelledError):
        return resp
    return resp


async def version(_request):
    return web.json_response({"major": "1", "minor": "33", "gitVersion": "v1.33.0-cooper-emulator", "platform": "linux/amd64"})


async def stats(_request):
    return web.json_response({"requests": STORE.requests, "resourceVersion": STORE.rv, "denied": STORE.denied})


def main():
    global STORE
    port = int(sys.argv[1])
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_get("/version", version)
    app.router.add_get("/emulator/stats", stats)
    app.router.add_route("*", "/api/{tail:.*}", handle)
    app.router.add_route("*", "/apis/{tail:.*}", handle)

    async def start():
        global STORE
        STORE = Store()
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", port)
        await site.start()
        print("ready", flush=True)
        while True:
            await asyncio.sleep(3600)

    asyncio.run(start())


if __name__ == "__main__":
    main()
