"""A fault-injecting HTTP proxy in front of moto, so tests see EC2 as it behaves in the
wild: latency per action, throttling (RequestLimitExceeded), InternalError, connections
reset before the request reaches EC2 or *after* EC2 acted, responses held for minutes,
and insufficient-capacity answers from CreateFleet for chosen offerings.

It also does what moto does not and EC2 does: a CreateFleet or RunInstances repeated
with the same ClientToken returns the first call's response instead of launching again,
unless that response was a server error (idempotency, https://docs.aws.amazon.com/ec2/latest/devguide/ec2-api-idempotency.html).

    proxy.py --upstream 127.0.0.1:MOTO_PORT [--port 0]

prints `ready PORT` once listening. Control (same port, never forwarded):
    POST /__proxy/config   {"seed": 1, "rules": [RULE, ...]}   replaces the rules
    GET  /__proxy/stats    counts per action and outcome, calls in flight (now, peak)
A RULE applies to one action ("action": "CreateFleet", or "*" for any) and may set
    latency_ms: [min, max]        uniform delay before answering
    throttle: p                   503 RequestLimitExceeded, not forwarded
    internal_error: p             500 InternalError, not forwarded
    reset_before: p               connection reset, not forwarded
    reset_after: p                forwarded (EC2 acted), then the connection is reset
    hang: {"count": n, "seconds": s, "then": "respond" | "reset"}
                                  the first n calls are forwarded, then held s seconds
    capacity: [{"instance_type": t, "zone": z}, ...]   (CreateFleet) those offerings
                                  answer InsufficientInstanceCapacity; the others launch
The first rule naming the action wins, then the "*" rule.
"""

import argparse
import asyncio
import json
import random
import re
import sys
import time
import urllib.parse
from collections import defaultdict

import aiohttp

STATE = {
    "rules": [],
    "random": random.Random(1),
    "stats": defaultdict(lambda: defaultdict(int)),
    "in_flight": 0,
    "peak_in_flight": 0,
    "tokens": {},  # ClientToken -> Future[(status, headers, body)]
    "hang_counts": defaultdict(int),
    "launched": {},  # instance id -> time.monotonic() of its launch
    "reset_tokens": {},  # ClientToken -> resets done
}
IDEMPOTENT = {"CreateFleet", "RunInstances"}


def error_response(status, code, message):
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Response><Errors><Error><Code>{code}</Code><Message>{message}</Message></Error></Errors>"
        f"<RequestID>{random.getrandbits(64):016x}</RequestID></Response>"
    ).encode()
    return status, [("Content-Type", "text/xml;charset=UTF-8")], body


def fleet_capacity_errors(form, blocked):
    """Remove blocked overrides from a CreateFleet form; return (new form or None when
    nothing is left, the error XML items for the blocked ones)."""
    overrides = defaultdict(dict)
    rest = []
    pattern = re.compile(r"^LaunchTemplateConfigs\.(\d+)\.Overrides\.(\d+)\.(.+)$")
    for k, v in form:
        m = pattern.match(k)
        if m:
            overrides[(int(m.group(1)), int(m.group(2)))][m.group(3)] = v
        else:
            rest.append((k, v))
    kept = defaultdict(list)
    errors = []
    for (config, index), fields in sorted(overrides.items()):
        key = (fields.get("InstanceType"), fields.get("AvailabilityZone"))
        if key in blocked:
            errors.append(
                "<item><launchTemplateAndOverrides><overrides>"
                f"<instanceType>{key[0]}</instanceType><availabilityZone>{key[1]}</availabilityZone>"
                "</overrides></launchTemplateAndOverrides><lifecycle>on-demand</lifecycle>"
                "<errorCode>InsufficientInstanceCapacity</errorCode>"
                f"<errorMessage>We currently do not have sufficient {key[0]} capacity in the "
                f"Availability Zone you requested ({key[1]}).</errorMessage></item>"
            )
        else:
            kept[config].append(fields)
    if not errors:
        return form, []
    if not any(kept.values()):
        return None, errors
    new = list(rest)
    for config, items in kept.items():
        for i, fields in enumerate(items, 1):
            for name, value in fields.items():
                new.append((f"LaunchTemplateConfigs.{config}.Overrides.{i}.{name}", value))
    return new, errors


def fleet_errors_response(errors):
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<CreateFleetResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">'
        f"<requestId>{random.getrandbits(64):016x}</requestId>"
        f"<fleetId>fleet-{random.getrandbits(64):016x}</fleetId>"
        f"<errorSet>{''.join(errors)}</errorSet><fleetInstanceSet/></CreateFleetResponse>"
    ).encode()
    return 200, [("Content-Type", "text/xml;charset=UTF-8")], body


INSTANCE_ID = re.compile(r">(i-[0-9a-f]{8,17})<")


def record_launches(body):
    now = time.monotonic()
    for m in INSTANCE_ID.finditer(body.decode("utf-8", "replace")):
        STATE["launched"].setdefault(m.group(1), now)


def hide_recent(body, lag):
    """Drop reservations holding instances launched less than `lag` seconds ago."""
    import xml.etree.ElementTree as ET

    text = body.decode("utf-8", "replace")
    match = re.match(r"<\?xml[^>]*>\s*", text)
    root = ET.fromstring(text[match.end():] if match else text)
    ns = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    ET.register_namespace("", ns.strip("{}"))
    now = time.monotonic()
    hidden = 0
    for reservations in root.iter(f"{ns}reservationSet"):
        for item in list(reservations):
            ids = [e.text for e in item.iter(f"{ns}instanceId")]
            if any(now - STATE["launched"].get(i, -1e9) < lag for i in ids):
                reservations.remove(item)
                hidden += 1
    return ET.tostring(root, encoding="unicode").encode(), hidden


def reset_by_token(rule, token):
    spec = rule.get("reset_after_token")
    if not spec or not token:
        return False
    seen = STATE["reset_tokens"]
    if token not in seen:
        if len(seen) >= spec.get("tokens", 1):
            return False
        seen[token] = 0
    if seen[token] >= spec.get("times", 1):
        return False
    seen[token] += 1
    return True


def take(rule, action, key):
    """Count down a rule's "first n calls" budget for this action."""
    n = rule.get(key, 0)
    used = STATE["hang_counts"][(action, key)]
    if used < n:
        STATE["hang_counts"][(action, key)] = used + 1
        return True
    return False


def rule_for(action):
    star = None
    for rule in STATE["rules"]:
        if rule.get("action") == action:
            return rule
        if rule.get("action") == "*" and star is None:
            star = rule
    return star or {}


async def read_request(reader):
    line = await reader.readline()
    if not line:
        return None
    method, target, _ = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
    headers = []
    while True:
        h = await reader.readline()
        if h in (b"\r\n", b"\n", b""):
            break
        k, v = h.decode("latin-1").rstrip("\r\n").split(":", 1)
        headers.append((k.strip(), v.strip()))
    lower = {k.lower(): v for k, v in headers}
    body = b""
    if lower.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readline()).strip().split(b";")[0], 16)
            if size == 0:
                await reader.readline()
                break
            body += await reader.readexactly(size)
            await reader.readline()
    elif "content-length" in lower:
        body = await reader.readexactly(int(lower["content-length"]))
    return method, target, headers, body


def write_response(writer, status, headers, body, keep_alive=True):
    reason = {200: "OK", 400: "Bad Request", 500: "Internal Server Error", 503: "Service Unavailable"}
    out = [f"HTTP/1.1 {status} {reason.get(status, 'Status')}"]
    for k, v in headers:
        if k.lower() in ("content-length", "transfer-encoding", "connection", "content-encoding"):
            continue
        out.append(f"{k}: {v}")
    out.append(f"Content-Length: {len(body)}")
    out.append("Connection: keep-alive" if keep_alive else "Connection: close")
    writer.write(("\r\n".join(out) + "\r\n\r\n").encode("latin-1") + body)


async def forward(session, upstream, method, target, headers, body):
    hdrs = [(k, v) for k, v in headers if k.lower() not in ("host", "content-length", "transfer-encoding", "connection", "expect")]
    async with session.request(method, f"http://{upstream}{target}", headers=hdrs, data=body) as r:
        data = await r.read()
        return r.status, [(k, v) for k, v in r.headers.items()], data


async def control(writer, method, target, body):
    if target.startswith("/__proxy/config") and method == "POST":
        config = json.loads(body or b"{}")
        STATE["rules"] = config.get("rules", [])
        STATE["random"] = random.Random(config.get("seed", 1))
        STATE["hang_counts"].clear()
        STATE["reset_tokens"].clear()
        write_response(writer, 200, [("Content-Type", "application/json")], b"{}")
    elif target.startswith("/__proxy/stats"):
        stats = {a: dict(c) for a, c in STATE["stats"].items()}
        out = {"actions": stats, "in_flight": STATE["in_flight"], "peak_in_flight": STATE["peak_in_flight"]}
        write_response(writer, 200, [("Content-Type", "application/json")], json.dumps(out).encode())
    elif target.startswith("/__proxy/reset-stats"):
        STATE["stats"].clear()
        STATE["peak_in_flight"] = STATE["in_flight"]
        write_response(writer, 200, [("Content-Type", "application/json")], b"{}")
    else:
        write_response(writer, 404, [], b"unknown control path")
    await writer.drain()


async def handle(reader, writer, session, upstream):
    try:
        while True:
            request = await read_request(reader)
            if request is None:
                break
            method, target, headers, body = request
            if target.startswith("/__proxy/"):
                await control(writer, method, target, body)
                break  # one control request per connection
            lower = {k.lower(): v for k, v in headers}
            form = urllib.parse.parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)
            fields = dict(form)
            action = fields.get("Action") or lower.get("x-amz-target", "").split(".")[-1] or "?"
            stats = STATE["stats"][action]
            stats["calls"] += 1
            rule = rule_for(action)
            rnd = STATE["random"]
            STATE["in_flight"] += 1
            STATE["peak_in_flight"] = max(STATE["peak_in_flight"], STATE["in_flight"])
            try:
                latency = rule.get("latency_ms")
                if latency:
                    await asyncio.sleep(rnd.uniform(latency[0], latency[1]) / 1000.0)
                if rnd.random() < rule.get("reset_before", 0.0):
                    stats["reset_before"] += 1
                    writer.transport.abort()
                    return
                if rnd.random() < rule.get("throttle", 0.0):
                    stats["throttled"] += 1
                    write_response(writer, *error_response(503, "RequestLimitExceeded", "Request limit exceeded."))
                    await writer.drain()
                    continue
                if rnd.random() < rule.get("internal_error", 0.0):
                    stats["internal_error"] += 1
                    write_response(writer, *error_response(500, "InternalError", "An internal error has occurred."))
                    await writer.drain()
                    continue
                token = fields.get("ClientToken") if action in IDEMPOTENT else None
                response = None
                if token and token in STATE["tokens"]:
                    stats["deduplicated"] += 1
                    response = await asyncio.shield(STATE["tokens"][token])
                else:
                    future = asyncio.get_running_loop().create_future() if token else None
                    if token:
                        STATE["tokens"][token] = future
                    try:
                        blocked = {(c["instance_type"], c["zone"]) for c in rule.get("capacity", [])}
                        errors = []
                        send = body
                        if action == "CreateFleet" and blocked:
                            new_form, errors = fleet_capacity_errors(form, blocked)
                            if errors:
                                stats["capacity_errors"] += 1
                            send = None if new_form is None else urllib.parse.urlencode(new_form).encode()
                        if send is None:
                            response = fleet_errors_response(errors)
                        else:
                            response = await forward(session, upstream, method, target, headers, send)
                            if errors and response[0] == 200:
                                # Report the blocked offerings' errors beside the launch.
                                text = response[2].decode()
                                items = "".join(errors)
                                if "<errorSet/>" in text:
                                    text = text.replace("<errorSet/>", f"<errorSet>{items}</errorSet>")
                                elif "<errorSet>" in text:
                                    text = text.replace("<errorSet>", f"<errorSet>{items}", 1)
                                else:
                                    text = text.replace(
                                        "</CreateFleetResponse>",
                                        f"<errorSet>{items}</errorSet></CreateFleetResponse>",
                                    )
                                response = (response[0], response[1], text.encode())
                        stats["forwarded" if send is not None else "answered"] += 1
                        if future is not None:
                            future.set_result(response)
                            # EC2 keeps a token's outcome only once the request has
                            # been handled; after a server error (5xx) a retry with the
                            # same token is tried afresh.
                            if response[0] >= 500:
                                del STATE["tokens"][token]
                    except Exception as e:
                        if future is not None:
                            del STATE["tokens"][token]
                            future.set_exception(e)
                            future.exception()  # retrieved: no warning
                        raise
                if action in IDEMPOTENT and response[0] == 200:
                    record_launches(response[2])
                lag = rule.get("tag_lag_s", 0)
                if action == "DescribeInstances" and lag and any(k.startswith("Filter") and v.startswith("tag:") for k, v in form):
                    body_out, hidden = hide_recent(response[2], lag)
                    if hidden:
                        stats["hidden_by_tag_lag"] += hidden
                        response = (response[0], response[1], body_out)
                if (
                    rnd.random() < rule.get("reset_after", 0.0)
                    or take(rule, action, "reset_after_first")
                    or reset_by_token(rule, token)
                ):
                    stats["reset_after"] += 1
                    writer.transport.abort()
                    return
                hang = rule.get("hang")
                if hang and STATE["hang_counts"][action] < hang.get("count", 1):
                    STATE["hang_counts"][action] += 1
                    stats["hung"] += 1
                    await asyncio.sleep(hang.get("seconds", 300))
                    if hang.get("then", "respond") == "reset":
                        writer.transport.abort()
                        return
                write_response(writer, *response)
                await writer.drain()
            finally:
                STATE["in_flight"] -= 1
    except (ConnectionError, asyncio.IncompleteReadError, ValueError):
        pass
    finally:
        try:
            writer.close()
        except Exception:
            pass


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False) as session:
        server = await asyncio.start_server(
            lambda r, w: handle(r, w, session, args.upstream), "127.0.0.1", args.port
        )
        port = server.sockets[0].getsockname()[1]
        print(f"ready {port}", flush=True)
        async with server:
            await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
