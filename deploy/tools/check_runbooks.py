#!/usr/bin/env python3
"""Runs every kubectl line of the runbooks (docs/operations/*.md) through the real kubectl, and
checks that every curl line addresses something the shipped manifests make reachable.

Usage: check_runbooks.py REPO_ROOT [DOCS_DIR]   (deploy/check-runbooks.sh calls it)

What is a line: each logical command of a fenced code block (yaml/json blocks aside), with `\\`
continuations and multi-line quoted arguments joined, and each inline code span that starts with
`kubectl ` or `curl ` and has three words or more (a span like `kubectl cp` names a command, it
does not run one). Pipes, `;`, `&&` and redirections split a line into commands; each command
that starts with `kubectl` or `curl` is checked, and a `kubectl` or `curl` word anywhere else
(say inside `$(...)` after other words) fails, so that no line goes unchecked. Placeholders such
as `<pod-name>` are replaced by a sample name first.

1. Syntax, every kubectl command: run against an API server that is not there (127.0.0.1:1).
   kubectl parses its flags, arguments and patch bodies before it connects, so a wrong line
   fails with its own message ("unknown flag", "unknown command", "unable to parse", ...),
   while a good one fails only to connect ("connection refused"). Exit codes are 1 for both:
   the output tells them apart. A command passes only when every line it printed is about the
   refused connection (or the TTY warning of `-it` without a terminal).
2. Reads, every `kubectl get` and `kubectl logs` command: run against a fake API server on
   127.0.0.1 that serves discovery and the objects of the rendered prod overlay plus
   secret.example.yaml and two sample pods of the Deployment, one whose container was
   OOMKilled. Output formats are parsed only once objects arrive (a bad jsonpath passes step
   1), and resource names, namespaces and label selectors must match the manifests. A `get`
   must exit 0; a line reading `lastState.terminated.reason` must print `OOMKilled`; a
   `logs` must reach a pod's log, and without an explicit `--tail` kubectl must not send
   `tailLines` (with `-l` it otherwise keeps only 10 lines per pod, `--since` or not).
3. curl: inside `kubectl exec ... --` it must address the pod's own port (localhost:8080 or
   127.0.0.1:8080: the NetworkPolicy admits only the ingress controller and monitoring on
   8080). Anywhere else it must address the public host: `$RDEV/...`, with `RDEV=https://HOST`
   set in a code block of the same file, or `https://HOST/...`, HOST a host of an Ingress or
   HTTPRoute in the rendered overlays; and the path must not start with one the edge refuses
   (/metrics, /debug).
"""
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml

SAMPLE = {"pod-name": "rdev-api-5d8f7c9b6-abcde", "ns": "rdev"}
PODS = ["rdev-api-5d8f7c9b6-abcde", "rdev-api-5d8f7c9b6-fghij"]
EDGE_REFUSED = ("/metrics", "/debug")
SEPARATORS = {"|", "||", "&", "&&", ";", "(", ")", "$"}
LEADING_WORDS = {"do", "then", "else", "!", "{", "time"}


def placeholders(text):
    return re.sub(r"<([A-Za-z][A-Za-z0-9 _-]*)>", lambda m: SAMPLE.get(m.group(1), "sample"), text)


def tokens(text):
    lexer = shlex.shlex(text, posix=True, punctuation_chars="|&;<>()")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    return list(lexer)


def complete(text):
    if text.endswith("\\"):
        return False
    try:
        tokens(text)
    except ValueError:  # "No closing quotation": the argument goes on on the next line
        return False
    return True


def logical_lines(path):
    """(line number, text, where) for each fenced command line and command-like inline span."""
    out, fence, cur, start = [], None, None, 0
    for number, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            if fence is None:
                fence = stripped[3:].strip().lower()
            else:
                if cur is not None:
                    sys.exit(f"{path}:{start}: a command runs past the end of its code block")
                fence = None
            continue
        if fence is not None:
            if fence in ("yaml", "yml", "json", "text"):
                continue
            if cur is None:
                if not stripped:
                    continue
                cur, start = line, number
            elif cur.endswith("\\"):
                cur = cur[:-1] + " " + line.strip()
            else:
                cur += "\n" + line
            if complete(cur):
                out.append((start, cur, "code block"))
                cur = None
            continue
        for span in re.findall(r"`([^`\n]+)`", line):
            span = span.replace("\\|", "|")  # an escaped pipe inside a table cell
            if re.match(r"(kubectl|curl)\s", span) and len(span.split()) >= 3:
                out.append((number, span, "inline"))
    return out


def commands(text):
    """Splits a line into simple commands: lists of words, redirections dropped."""
    result, current, redirect = [], [], False
    for token in tokens(placeholders(text)):
        if token in SEPARATORS or set(token) <= set("|&;()"):
            result.append(current)
            current, redirect = [], False
        elif set(token) <= set("<>"):
            redirect = True
        elif redirect:
            redirect = False  # the file name after > or <
        else:
            current.append(token)
    result.append(current)
    cleaned = []
    for words in result:
        while words and (words[0] in LEADING_WORDS or re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0])):
            words = words[1:]
        if words:
            cleaned.append(words)
    return cleaned


def subcommand(args):
    """The kubectl verb: the first word that is neither a flag nor a flag's value."""
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg in ("-n", "--namespace", "--context", "--kubeconfig", "-s", "--server"):
            skip = True
        elif not arg.startswith("-"):
            return arg
    return None


# --- step 1: an API server that is not there -------------------------------------------------

REFUSED_OK = [
    re.compile(r"connect: connection refused"),
    re.compile(r"^The connection to the server 127\.0\.0\.1:1 was refused"),
    re.compile(r"^Warning: the server doesn't have a resource type"),  # discovery failed
    re.compile(r"^Unable to use a TTY"),  # -it with no terminal on stdin
]


def run_kubectl(args, kubeconfig, home):
    env = {**os.environ, "KUBECONFIG": kubeconfig, "HOME": home}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    proc = subprocess.run(["kubectl", *args], env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=60)
    return proc.returncode, proc.stdout, proc.stderr


def syntax_problem(args, kubeconfig, home):
    code, out, err = run_kubectl(args, kubeconfig, home)
    lines = [line for line in (out + err).splitlines() if line.strip()]
    if code == 0:
        return None
    stray = [line for line in lines if not any(p.search(line) for p in REFUSED_OK)]
    if stray or not any("refused" in line for line in lines):
        return "\n".join(stray or lines)[:1500]
    return None


# --- step 2: a fake API server with the shipped objects --------------------------------------

KINDS = {  # kind: (group, version, plural, namespaced)
    "Namespace": ("", "v1", "namespaces", False),
    "Pod": ("", "v1", "pods", True),
    "Event": ("", "v1", "events", True),
    "Secret": ("", "v1", "secrets", True),
    "ConfigMap": ("", "v1", "configmaps", True),
    "Service": ("", "v1", "services", True),
    "ServiceAccount": ("", "v1", "serviceaccounts", True),
    "Endpoints": ("", "v1", "endpoints", True),
    "Node": ("", "v1", "nodes", False),
    "Deployment": ("apps", "v1", "deployments", True),
    "ReplicaSet": ("apps", "v1", "replicasets", True),
    "HorizontalPodAutoscaler": ("autoscaling", "v2", "horizontalpodautoscalers", True),
    "PodDisruptionBudget": ("policy", "v1", "poddisruptionbudgets", True),
    "NetworkPolicy": ("networking.k8s.io", "v1", "networkpolicies", True),
    "Ingress": ("networking.k8s.io", "v1", "ingresses", True),
    "Role": ("rbac.authorization.k8s.io", "v1", "roles", True),
    "RoleBinding": ("rbac.authorization.k8s.io", "v1", "rolebindings", True),
    "ServiceMonitor": ("monitoring.coreos.com", "v1", "servicemonitors", True),
    "PrometheusRule": ("monitoring.coreos.com", "v1", "prometheusrules", True),
    "HTTPRoute": ("gateway.networking.k8s.io", "v1", "httproutes", True),
}
SHORT = {"pods": ["po"], "deployments": ["deploy"], "services": ["svc"], "events": ["ev"],
         "horizontalpodautoscalers": ["hpa"], "configmaps": ["cm"], "namespaces": ["ns"],
         "ingresses": ["ing"], "nodes": ["no"], "poddisruptionbudgets": ["pdb"]}


def sample_pods(deployment):
    template = deployment["spec"]["template"]
    container = template["spec"]["containers"][0]["name"]
    pods = []
    for i, name in enumerate(PODS):
        last = {"terminated": {"reason": "OOMKilled", "exitCode": 137,
                               "startedAt": "2026-01-01T09:00:00Z", "finishedAt": "2026-01-01T10:00:00Z"}} if i == 0 else {}
        pods.append({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": deployment["metadata"]["namespace"],
                         "labels": dict(template["metadata"]["labels"]),
                         "creationTimestamp": "2026-01-01T08:00:00Z", "uid": f"uid-{i}"},
            "spec": {"containers": [{"name": container, "image": "rdev-api"}], "nodeName": "node-a"},
            "status": {"phase": "Running", "startTime": "2026-01-01T08:00:00Z", "podIP": f"10.0.0.{i + 10}",
                       "containerStatuses": [{"name": container, "ready": True, "restartCount": 2 if i == 0 else 0,
                                              "image": "rdev-api", "imageID": "", "started": True,
                                              "state": {"running": {"startedAt": "2026-01-01T10:00:01Z"}},
                                              "lastState": last}]},
        })
    return pods


class FakeAPI:
    def __init__(self, objects):
        self.objects = objects
        self.requests = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                fake.requests.append(self.path)
                status, body = fake.answer(urllib.parse.urlsplit(self.path))
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain" if isinstance(body, str) else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_POST = do_PUT = do_PATCH = do_DELETE = lambda self: self.refuse()

            def refuse(self):
                fake.requests.append(f"{self.command} {self.path}")
                self.send_response(405)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @staticmethod
    def not_found(what):
        return 404, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                     "message": f"{what} not found", "reason": "NotFound", "code": 404}

    def answer(self, url):
        parts = [p for p in url.path.split("/") if p]
        query = urllib.parse.parse_qs(url.query)
        if url.path == "/version":
            return 200, {"major": "1", "minor": "33", "gitVersion": "v1.33.0"}
        if url.path == "/api":
            return 200, {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}
        groups = sorted({(g, v) for g, v, _, _ in KINDS.values() if g})
        if url.path == "/apis":
            return 200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
                {"name": g, "versions": [{"groupVersion": f"{g}/{v}", "version": v}],
                 "preferredVersion": {"groupVersion": f"{g}/{v}", "version": v}} for g, v in groups]}
        if parts[:1] == ["api"]:
            group, version, rest = "", parts[1] if len(parts) > 1 else "", parts[2:]
        elif parts[:1] == ["apis"] and len(parts) >= 3:
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            return self.not_found(url.path)
        gv = f"{group}/{version}" if group else version
        if not rest:
            resources = []
            for kind, (g, v, plural, namespaced) in KINDS.items():
                if (g, v) == (group, version):
                    resources.append({"name": plural, "singularName": kind.lower(), "namespaced": namespaced,
                                      "kind": kind, "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"],
                                      "shortNames": SHORT.get(plural, [])})
                    if plural == "pods":
                        resources += [{"name": f"pods/{s}", "singularName": "", "namespaced": True, "kind": k,
                                       "verbs": ["get", "create"]} for s, k in (("log", "Pod"), ("exec", "PodExecOptions"))]
            return 200, {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}
        namespace = None
        if rest[0] == "namespaces" and len(rest) >= 3:
            namespace, rest = rest[1], rest[2:]
        plural, name, sub = rest[0], (rest[1] if len(rest) > 1 else None), (rest[2] if len(rest) > 2 else None)
        kind = next((k for k, (g, v, p, _) in KINDS.items() if (g, v, p) == (group, version, plural)), None)
        if kind is None:
            return self.not_found(url.path)
        matching = [o for o in self.objects if o["kind"] == kind
                    and (namespace is None or o["metadata"].get("namespace") == namespace)]
        if name is None:
            selector = query.get("labelSelector", [""])[0]
            wanted = dict(pair.split("=", 1) for pair in selector.split(",") if "=" in pair)
            items = [o for o in matching if all(o["metadata"].get("labels", {}).get(k) == v for k, v in wanted.items())]
            return 200, {"kind": f"{kind}List", "apiVersion": gv, "metadata": {"resourceVersion": "1"}, "items": items}
        found = next((o for o in matching if o["metadata"]["name"] == name), None)
        if found is None:
            return self.not_found(f'{plural} "{name}"')
        if sub == "log":
            return 200, ('{"level":"INFO","fields":{"message":"SSE connection opened","key":"rdev_abcdefgh"}}\n'
                         '{"level":"WARN","fields":{"message":"webhook attempt not delivered"}}\n')
        if sub:
            return self.not_found(url.path)
        return 200, found


def read_problems(args, kubeconfig, home, fake, line_text):
    before = len(fake.requests)
    code, out, err = run_kubectl(args, kubeconfig, home)
    requests = fake.requests[before:]
    if code != 0:
        return f"exit {code}: {(err or out).strip()[:1500]}"
    verb = subcommand(args)
    if verb == "get" and "lastState.terminated.reason" in line_text and "OOMKilled" not in out:
        return f"prints no OOMKilled for a pod whose container was OOMKilled:\n{out.strip()}"
    if verb == "logs":
        logs = [r for r in requests if "/log" in r.split("?")[0]]
        if not logs:
            return f"read no pod's log (requests: {requests})"
        if not any(a == "--tail" or a.startswith("--tail=") for a in args):
            capped = [r for r in logs if "tailLines=" in r]
            if capped:
                return ("kubectl asked for the last lines only (" + capped[0] + "): with -l it keeps 10 lines "
                        "per pod, --since or not; write --tail=-1")
    return None


# --- step 3: curl ------------------------------------------------------------------------------

def url_words(words):
    return [w for w in words if re.match(r"^(https?://|localhost[:/]|127\.0\.0\.1[:/]|\$\{?RDEV\b)", w)]


def curl_problem(words, in_pod, rdev_hosts, public_hosts):
    urls = url_words(words)
    if not urls:
        return "no URL found"
    for url in urls:
        if in_pod:
            if not re.match(r"^(http://)?(localhost|127\.0\.0\.1):8080(/|$)", url):
                return f"{url}: inside the pod, address the server's own port, localhost:8080"
            continue
        m = re.match(r"^\$\{?RDEV\}?(/.*)?$", url)
        literal = re.match(r"^https://([^/:]+)(/.*)?$", url)
        if m:
            if not rdev_hosts:
                return "uses $RDEV, but no code block of this file sets RDEV=https://HOST"
            bad = [h for h in rdev_hosts if h not in public_hosts]
            if bad:
                return f"RDEV names {bad}, not a host of the shipped Ingress/HTTPRoute ({sorted(public_hosts)})"
            path = m.group(1) or "/"
        elif literal and literal.group(1) in public_hosts:
            path = literal.group(2) or "/"
        else:
            return (f"{url}: from outside the cluster only the public host is reachable (the NetworkPolicy "
                    "admits the ingress controller and monitoring only); use $RDEV/... or kubectl exec")
        if path.startswith(EDGE_REFUSED):
            return f"{url}: the edge refuses {path.split('?')[0]}; read it inside a pod (kubectl exec ... curl localhost:8080)"
    return None


def main():
    root = Path(sys.argv[1]).resolve()
    docs = Path(sys.argv[2]).resolve() if len(sys.argv) > 2 else root / "docs/operations"
    overlays = sorted(p for p in (root / "deploy/k8s/overlays").iterdir() if (p / "kustomization.yaml").exists())
    rendered = {}
    for overlay in overlays:
        text = subprocess.run(["kubectl", "kustomize", str(overlay)], check=True, capture_output=True, text=True).stdout
        rendered[overlay.name] = [d for d in yaml.safe_load_all(text) if d]
    public_hosts = set()
    for objs in rendered.values():
        for o in objs:
            if o["kind"] == "Ingress":
                public_hosts |= {r["host"] for r in o["spec"].get("rules", []) if r.get("host")}
            if o["kind"] == "HTTPRoute":
                public_hosts |= set(o["spec"].get("hostnames", []))
    objects = [o for o in rendered["prod"] if o["kind"] in KINDS]
    objects.append(yaml.safe_load((root / "deploy/k8s/secret.example.yaml").read_text()))
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    objects += sample_pods(deployment)

    tmp = tempfile.mkdtemp(prefix="check-runbooks-")
    nowhere = os.path.join(tmp, "nowhere.kubeconfig")
    Path(nowhere).write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "nowhere",
        "clusters": [{"name": "nowhere", "cluster": {"server": "https://127.0.0.1:1", "insecure-skip-tls-verify": True}}],
        "users": [{"name": "nobody", "user": {"token": "not-a-token"}}],
        "contexts": [{"name": "nowhere", "context": {"cluster": "nowhere", "user": "nobody", "namespace": "default"}}]}))
    fake = FakeAPI(objects)
    fakecfg = os.path.join(tmp, "fake.kubeconfig")
    Path(fakecfg).write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": fake.url}}],
        "users": [{"name": "nobody", "user": {}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "nobody", "namespace": "default"}}]}))

    failures, counts = [], {"kubectl": 0, "read": 0, "curl": 0}
    for path in sorted(docs.glob("*.md")):
        lines = logical_lines(path)
        rdev_hosts = set()
        for _, text, where in lines:
            if where == "code block":
                for m in re.finditer(r"(?:^|\s)RDEV=[\"']?https://([^/\"'\s]+)", text):
                    rdev_hosts.add(m.group(1))
        for number, text, where in lines:
            where_text = f"{path.relative_to(root) if path.is_relative_to(root) else path}:{number} ({where})"
            shown = " ".join(text.split())
            parsed = commands(text)
            if re.search(r"http://rdev-api[.:]", text) and not any("curl" in words for words in parsed):
                failures.append((where_text, shown, "http://rdev-api... is the Service, which admits only the "
                                 "ingress controller and monitoring"))
            for words in parsed:
                stray = [w for w in words[1:] if w in ("kubectl", "curl")]
                if words[0] == "kubectl":
                    after = words.index("--") + 1 if "--" in words else len(words)
                    if words[after:after + 1] == ["curl"]:
                        counts["curl"] += 1
                        problem = curl_problem(words[after + 1:], True, rdev_hosts, public_hosts)
                        if problem:
                            failures.append((where_text, shown, "curl: " + problem))
                        stray = [w for w in words[1:after] if w in ("kubectl", "curl")]
                    counts["kubectl"] += 1
                    args = words[1:]
                    problem = syntax_problem(args, nowhere, tmp)
                    if problem:
                        failures.append((where_text, shown, "kubectl rejects it:\n" + problem))
                    elif subcommand(args) in ("get", "logs"):
                        counts["read"] += 1
                        problem = read_problems(args, fakecfg, tmp, fake, text)
                        if problem:
                            failures.append((where_text, shown, "against the shipped objects: " + problem))
                elif words[0] == "curl":
                    counts["curl"] += 1
                    problem = curl_problem(words[1:], False, rdev_hosts, public_hosts)
                    if problem:
                        failures.append((where_text, shown, "curl: " + problem))
                if stray:
                    failures.append((where_text, shown, f"'{stray[0]}' in the middle of a command: this check "
                                     "cannot run it; start a line (or a pipe stage) with it"))
    fake.server.shutdown()
    for where, shown, problem in failures:
        print(f"FAIL {where}: {shown}\n     {problem}".replace("\n", "\n     "))
    print(f"{counts['kubectl']} kubectl commands (syntax against 127.0.0.1:1), {counts['read']} of them "
          f"reads run against the shipped objects, {counts['curl']} curl commands; {len(failures)} problems")
    subprocess.run(["rm", "-rf", tmp], check=False)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
