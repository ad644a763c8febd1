#!/usr/bin/env python3
"""Offline validation of deploy/ (run through tests/deploy/validate.sh).

1. Renders every kustomization under deploy/ with `kubectl kustomize`.
2. Validates every rendered object, and the plain files (static pod, egress
   selector configs, Prometheus scrape config), against JSON schemas:
   Kubernetes kinds with the strict schemas shipped by `kubernetes-validate`
   (unknown fields are errors), for each version in $K8S_VERSIONS;
   PodMonitor, EgressSelectorConfiguration (apiserver.k8s.io/v1beta1 is not in
   the OpenAPI schemas) and the scrape config with the schemas in ./schemas.
3. Checks what a schema cannot: the contract between the pieces (ports, flag
   names, socket path, token audience, selectors, ConfigMap keys), the agent's
   privileges and footprint, static-pod restrictions, the Grafana dashboard's
   metric names, the Containerfile.
4. Negative controls: known-bad mutations must be rejected by the validators.

Prints one line per check and ends with `N passed, M failed`; exit 1 on any
failure.
"""
from __future__ import annotations

import copy
import ipaddress
import json
import os
import posixpath
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import parse_qsl, urlparse

import jsonschema
import promql_parser
import yaml
from kubernetes_validate import utils as kv

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
DEPLOY = Path(os.environ.get("SPOKE_DEPLOY_DIR", REPO / "deploy")).resolve()
KUBECTL = os.environ.get("KUBECTL", "kubectl")
K8S_VERSIONS = os.environ.get("K8S_VERSIONS", "1.30.0 1.37.0").split()
VERBOSE = os.environ.get("VERBOSE", "1") != "0"

# ----------------------------------------------------------------- results ---
passed = 0
failed = 0


def ok(name: str) -> None:
    global passed
    passed += 1
    if VERBOSE:
        print(f"ok   {name}")


def fail(name: str, why: str) -> None:
    global failed
    failed += 1
    print(f"FAIL {name}: {why}")


def check(name: str, cond: bool, why: str = "") -> bool:
    if cond:
        ok(name)
    else:
        fail(name, why or "condition not met")
    return cond


def note(msg: str) -> None:
    print(f"note {msg}")


def rel(p: Path) -> str:
    try:
        return str(p.relative_to(REPO))
    except ValueError:
        return str(p)


# -------------------------------------------------------------------- flags ---
KLOG = {"v", "vmodule", "logtostderr", "alsologtostderr", "log-file", "log-file-max-size", "log-dir",
        "stderrthreshold", "skip-headers", "skip-log-headers", "add-dir-header", "one-output",
        "log-backtrace-at", "log-flush-frequency"}
AGENT_UPSTREAM = {"agent-cert", "agent-key", "ca-cert", "proxy-server-host", "proxy-server-port", "alpn-proto",
                  "health-server-host", "health-server-port", "admin-bind-address", "admin-server-port",
                  "enable-profiling", "enable-contention-profiling", "agent-id", "agent-identifiers",
                  "sync-interval", "probe-interval", "sync-interval-cap", "keepalive-time",
                  "service-account-token-path", "warn-on-channel-limit", "sync-forever", "xfr-channel-size",
                  "count-server-leases", "lease-namespace", "lease-label-selector", "lease-label",
                  "server-count-source", "kubeconfig", "kube-api-content-type"} | KLOG
# Spoke extensions the manifests use: the Rust agent must accept these.
AGENT_SPOKE = {"log-format", "ebpf", "cgroup-path", "allowed-destinations", "xdp-guard-interfaces",
               "xdp-protected-ports", "xdp-allow-cidrs", "cert-dir", "bootstrap-kubeconfig", "csr-signer-name",
               "csr-expiration", "csr-approval-timeout"}
SERVER_UPSTREAM = {"mode", "uds-name", "delete-existing-uds-file", "server-port", "server-bind-address",
                   "server-cert", "server-key", "server-ca-cert", "agent-port", "agent-bind-address",
                   "cluster-cert", "cluster-key", "cluster-ca-cert", "health-port", "health-bind-address",
                   "admin-port", "admin-bind-address", "keepalive-time", "frontend-keepalive-time",
                   "enable-profiling", "enable-contention-profiling", "server-id", "server-count",
                   "agent-namespace", "agent-service-account", "authentication-audience", "kubeconfig",
                   "kubeconfig-qps", "kubeconfig-burst", "kube-api-content-type", "proxy-strategies",
                   "cipher-suites", "tls-min-version", "xfr-channel-size", "enable-lease-controller",
                   "lease-namespace", "lease-label", "graceful-shutdown-timeout", "backend-dial-timeout",
                   "warn-on-channel-limit"} | KLOG
SERVER_SPOKE = {"log-format", "frontend-header-timeout", "max-connection-buffer-bytes", "max-grpc-message-size",
                "count-server-leases", "lease-label-selector", "approve-agent-csrs", "agent-csr-namespace",
                "agent-csr-service-account", "agent-csr-signer-name"}

AGENT_IDENTIFIER_KEYS = {"ipv4", "ipv6", "host", "cidr", "default-route"}
PROXY_STRATEGIES = {"default", "destHost", "defaultRoute"}
TOKEN_AUDIENCE = "system:konnectivity-server"


def parse_args(args: list[str]) -> tuple[dict[str, str | None], list[str]]:
    """--name=value / --name (bool) -> dict; returns (flags, problems)."""
    flags: dict[str, str | None] = {}
    problems = []
    for a in args:
        m = re.fullmatch(r"--([a-z0-9][a-z0-9-]*)(?:=(.*))?", a, re.S)
        if not m:
            problems.append(f"not a --flag[=value] argument: {a!r}")
            continue
        name, value = m.group(1), m.group(2)
        if name in flags:
            problems.append(f"flag given twice: --{name}")
        flags[name] = value
    return flags, problems


def port_ok(v: str | None, allow_zero: bool = False) -> bool:
    if v is None or not re.fullmatch(r"[0-9]+", v):
        return False
    n = int(v)
    return (allow_zero and n == 0) or 1 <= n <= 65535


# ------------------------------------------------------------- quantities ---
_SUFFIX = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30,
           "Ti": 2**40, "m": 10**-3}


def quantity(q) -> float:
    m = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(q))
    if not m or m.group(2) not in _SUFFIX:
        raise ValueError(f"bad quantity {q!r}")
    return float(m.group(1)) * _SUFFIX[m.group(2)]


# ---------------------------------------------------------------- loading ---
def load_yaml_docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d is not None]


def load_schema(name: str) -> dict:
    return json.loads((HERE / "schemas" / name).read_text())


EGRESS_SCHEMA = load_schema("egressselectorconfiguration-apiserver-v1beta1.json")
PODMONITOR_SCHEMA = load_schema("podmonitor-monitoring-v1.json")
SCRAPE_SCHEMA = load_schema("prometheus-scrape-configs.json")
OWN_SCHEMAS = {
    ("monitoring.coreos.com/v1", "PodMonitor"): PODMONITOR_SCHEMA,
    ("apiserver.k8s.io/v1beta1", "EgressSelectorConfiguration"): EGRESS_SCHEMA,
}


def own_schema_errors(schema: dict, obj) -> list[str]:
    v = jsonschema.Draft202012Validator(schema)
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in sorted(v.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))]


def k8s_schema_error(obj: dict, version: str) -> str | None:
    """None if valid against the strict Kubernetes schema, else the error."""
    key = (obj.get("apiVersion"), obj.get("kind"))
    if key in OWN_SCHEMAS:
        errs = own_schema_errors(OWN_SCHEMAS[key], obj)
        return "; ".join(errs[:3]) if errs else None
    try:
        kv.validate(obj, version, strict=True)
        return None
    except kv.ValidationError as e:
        path = "/".join(map(str, e.absolute_path)) or "<root>"
        return f"{path}: {e.message}"
    except kv.SchemaNotFoundError as e:
        return e.message


def obj_id(o: dict) -> str:
    md = o.get("metadata") or {}
    if not md:
        return str(o.get("kind"))
    ns = md.get("namespace")
    return f"{o.get('kind')}/{(ns + '/') if ns else ''}{md.get('name')}"


# ---------------------------------------------------------- 1. rendering ---
def kustomizations() -> list[Path]:
    dirs = sorted({p.parent for p in DEPLOY.rglob("kustomization.yaml")})
    # overlays first: they are what users apply
    return sorted(dirs, key=lambda d: (0 if "overlays" in d.parts else 1, str(d)))


def render(d: Path) -> list[dict] | None:
    name = f"render {rel(d)}"
    try:
        out = subprocess.run([KUBECTL, "kustomize", str(d)], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        fail(name, str(e))
        return None
    if out.returncode != 0:
        fail(name, (out.stderr or out.stdout).strip().splitlines()[-1] if (out.stderr or out.stdout) else
             f"exit {out.returncode}")
        return None
    try:
        docs = load_yaml_docs(out.stdout)
    except yaml.YAMLError as e:
        fail(name, f"output is not YAML: {e}")
        return None
    if not check(name, bool(docs), "rendered no objects"):
        return None
    return docs


# ------------------------------------------------------- 3. policy checks ---
def containers(pod_spec: dict) -> list[dict]:
    return list(pod_spec.get("initContainers") or []) + list(pod_spec.get("containers") or [])


def env_names(c: dict) -> set[str]:
    return {e["name"] for e in c.get("env") or []}


def mount_for(c: dict, path: str) -> dict | None:
    """The volumeMount whose mountPath is path or a parent directory of it."""
    best = None
    for m in c.get("volumeMounts") or []:
        mp = m["mountPath"].rstrip("/") or "/"
        if path == mp or path.startswith(mp + "/"):
            if best is None or len(mp) > len(best["mountPath"]):
                best = m
    return best


def check_common_pod(where: str, spec: dict, objs: list[dict], ns: str) -> None:
    vols = {v["name"]: v for v in spec.get("volumes") or []}
    for c in containers(spec):
        cn = c["name"]
        sc = c.get("securityContext") or {}
        if sc.get("allowPrivilegeEscalation") is False:
            check(f"{where}: container {cn} allowPrivilegeEscalation=false only without privileged/CAP_SYS_ADMIN "
                  "(API server rule)", not sc.get("privileged") and
                  "SYS_ADMIN" not in ((sc.get("capabilities") or {}).get("add") or []))
        bidi = [m["name"] for m in c.get("volumeMounts") or [] if m.get("mountPropagation") == "Bidirectional"]
        if bidi:
            check(f"{where}: container {cn} Bidirectional mount propagation only when privileged (API server rule)",
                  sc.get("privileged") is True, f"{bidi}")
        missing = [m["name"] for m in c.get("volumeMounts") or [] if m["name"] not in vols]
        check(f"{where}: container {cn} mounts only declared volumes", not missing, f"undeclared: {missing}")
        # $(VAR) references in command/args must name env vars of the container
        refs = set()
        for a in (c.get("command") or []) + (c.get("args") or []):
            refs |= set(re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", a))
        undefined = sorted(refs - env_names(c))
        check(f"{where}: container {cn} $(VAR) references are defined env vars", not undefined,
              f"undefined: {undefined}")
        # configMapKeyRef must resolve in the rendered output (kustomize renames generated maps)
        cms = {(o["metadata"].get("namespace", ns), o["metadata"]["name"]): o for o in objs
               if o.get("kind") == "ConfigMap"}
        bad = []
        for e in c.get("env") or []:
            ref = ((e.get("valueFrom") or {}).get("configMapKeyRef"))
            if ref:
                cm = cms.get((ns, ref["name"]))
                if cm is None:
                    bad.append(f"{e['name']}: no ConfigMap {ref['name']}")
                elif ref["key"] not in (cm.get("data") or {}):
                    bad.append(f"{e['name']}: ConfigMap {ref['name']} has no key {ref['key']}")
        if any(((e.get("valueFrom") or {}).get("configMapKeyRef")) for e in c.get("env") or []):
            check(f"{where}: container {cn} configMapKeyRefs resolve", not bad, "; ".join(bad))


def resolve_env(c: dict, objs: list[dict], ns: str) -> dict[str, str | None]:
    """env var -> literal value (ConfigMap values resolved), None for downward API."""
    cms = {(o["metadata"].get("namespace", ns), o["metadata"]["name"]): o for o in objs if o.get("kind") == "ConfigMap"}
    out: dict[str, str | None] = {}
    for e in c.get("env") or []:
        if "value" in e:
            out[e["name"]] = e["value"]
        elif (e.get("valueFrom") or {}).get("configMapKeyRef"):
            ref = e["valueFrom"]["configMapKeyRef"]
            cm = cms.get((ns, ref["name"]))
            out[e["name"]] = ((cm or {}).get("data") or {}).get(ref["key"])
        else:
            out[e["name"]] = None
    return out


def expand(value: str, env: dict[str, str | None]) -> str:
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: env[m.group(1)] if env.get(m.group(1)) is not None else f"<{m.group(1)}>", value)


def check_cidr_list(where: str, label: str, value: str, allow_node: bool = False, allow_empty: bool = True) -> None:
    items = [s for s in value.split(",") if s] if value else []
    bad = []
    for s in items:
        if allow_node and s == "node":
            continue
        try:
            ipaddress.ip_network(s, strict=True)
        except ValueError:
            bad.append(s)
    check(f"{where}: {label} is a valid list ({value!r})", (allow_empty or items) and not bad,
          f"invalid entries {bad}" if bad else "empty")


def check_agent(where: str, ds: dict, objs: list[dict], expect_privileged: bool) -> dict:
    spec = ds["spec"]["template"]["spec"]
    ns = ds["metadata"].get("namespace", "default")
    check_common_pod(where, spec, objs, ns)
    agent = [c for c in spec["containers"] if c["name"] == "spoke-agent"]
    if not check(f"{where}: has container spoke-agent", len(agent) == 1):
        return {}
    c = agent[0]
    check(f"{where}: runs /usr/local/bin/spoke-agent", (c.get("command") or [None])[0] == "/usr/local/bin/spoke-agent",
          f"command {c.get('command')}")
    flags, problems = parse_args(c.get("args") or [])
    check(f"{where}: args are well-formed --flag=value", not problems, "; ".join(problems))
    unknown = sorted(set(flags) - AGENT_UPSTREAM - AGENT_SPOKE)
    check(f"{where}: every agent flag is an upstream proxy-agent flag or a known Spoke extension", not unknown,
          f"unknown flags {unknown}")
    env = resolve_env(c, objs, ns)
    f = {k: (expand(v, env) if v is not None else None) for k, v in flags.items()}

    # topology / privileges
    check(f"{where}: hostNetwork", spec.get("hostNetwork") is True)
    check(f"{where}: dnsPolicy ClusterFirstWithHostNet", spec.get("dnsPolicy") == "ClusterFirstWithHostNet",
          f"dnsPolicy {spec.get('dnsPolicy')}")
    sc = c.get("securityContext") or {}
    caps = set(((sc.get("capabilities") or {}).get("add")) or [])
    drops = set(((sc.get("capabilities") or {}).get("drop")) or [])
    if expect_privileged:
        check(f"{where}: privileged fallback sets privileged: true", sc.get("privileged") is True)
    else:
        check(f"{where}: not privileged", sc.get("privileged") in (None, False), f"privileged={sc.get('privileged')}")
        want = {"BPF", "NET_ADMIN", "PERFMON", "SYS_RESOURCE"}
        check(f"{where}: adds capabilities BPF, NET_ADMIN, PERFMON, SYS_RESOURCE", want <= caps,
              f"missing {sorted(want - caps)}")
        check(f"{where}: adds nothing beyond them", caps <= want, f"extra {sorted(caps - want)}")
        check(f"{where}: drops ALL other capabilities", "ALL" in drops, f"drop={sorted(drops)}")
        check(f"{where}: no privilege escalation", sc.get("allowPrivilegeEscalation") is False)
    check(f"{where}: read-only root filesystem", sc.get("readOnlyRootFilesystem") is True)
    check(f"{where}: runs as uid 0 (capabilities apply only to root)", sc.get("runAsUser") == 0,
          f"runAsUser={sc.get('runAsUser')}")

    vols = {v["name"]: v for v in spec.get("volumes") or []}

    def host_mount(host_path: str) -> dict | None:
        for m in c.get("volumeMounts") or []:
            v = vols.get(m["name"], {})
            if (v.get("hostPath") or {}).get("path") == host_path:
                return m
        return None

    bpf = host_mount("/sys/fs/bpf")
    check(f"{where}: host /sys/fs/bpf mounted at /sys/fs/bpf", bool(bpf) and bpf["mountPath"] == "/sys/fs/bpf",
          f"mount {bpf}")
    if bpf and not expect_privileged:
        check(f"{where}: bpffs mount propagation allowed for an unprivileged container",
              bpf.get("mountPropagation") in (None, "None", "HostToContainer"),
              f"mountPropagation={bpf.get('mountPropagation')} needs privileged")
    cg = host_mount("/sys/fs/cgroup")
    check(f"{where}: host cgroup2 root (/sys/fs/cgroup) mounted", bool(cg))
    if cg:
        check(f"{where}: cgroup2 root not mounted over the container's own /sys/fs/cgroup",
              cg["mountPath"] != "/sys/fs/cgroup")
        check(f"{where}: --cgroup-path points at the host cgroup2 mount", f.get("cgroup-path") == cg["mountPath"],
              f"--cgroup-path={f.get('cgroup-path')} mount={cg['mountPath']}")

    # token + CA
    tok_path = f.get("service-account-token-path")
    agent_cert = f.get("agent-cert")
    cert_dir = f.get("cert-dir")
    check(f"{where}: authenticates with a token, a client cert or a CSR certificate (not neither)",
          bool(tok_path) or bool(agent_cert) or bool(cert_dir))
    check(f"{where}: --cert-dir excludes --agent-cert", not (cert_dir and agent_cert))
    if cert_dir:
        m = mount_for(c, cert_dir)
        check(f"{where}: --cert-dir is a writable hostPath (the certificate survives restarts)",
              bool(m) and not m.get("readOnly") and "hostPath" in (vols.get(m["name"]) or {}), f"{cert_dir}")
    talks_to_api = ("count-server-leases" in f and f.get("count-server-leases") in (None, "true")) or bool(cert_dir)
    check(f"{where}: --agent-cert and --agent-key given together",
          bool(f.get("agent-cert")) == bool(f.get("agent-key")))
    audience = None
    if tok_path:
        m = mount_for(c, tok_path)
        src = None
        if m:
            sub = posixpath.relpath(tok_path, m["mountPath"])
            for s in ((vols.get(m["name"]) or {}).get("projected") or {}).get("sources") or []:
                sat = s.get("serviceAccountToken")
                if sat and sat.get("path") == sub:
                    src = sat
        if check(f"{where}: --service-account-token-path is a projected serviceAccountToken", src is not None,
                 f"{tok_path} not provided by a projected serviceAccountToken"):
            audience = src.get("audience")
            check(f"{where}: token audience is {TOKEN_AUDIENCE}", audience == TOKEN_AUDIENCE, f"audience={audience}")
            exp = src.get("expirationSeconds", 3600)
            check(f"{where}: token expirationSeconds within 10m..24h", 600 <= exp <= 86400, f"{exp}")
        if not talks_to_api:
            check(f"{where}: default API token not automounted", spec.get("automountServiceAccountToken") is False)
    if talks_to_api:
        check(f"{where}: lease counting / the CSR API use the automounted service account token",
              spec.get("automountServiceAccountToken") is True)
    ca = f.get("ca-cert")
    if check(f"{where}: --ca-cert given", bool(ca)):
        m = mount_for(c, ca)
        provided = False
        if m:
            sub = posixpath.relpath(ca, m["mountPath"])
            v = vols.get(m["name"]) or {}
            for s in (v.get("projected") or {}).get("sources") or []:
                for key in ("configMap", "secret"):
                    if s.get(key) and any(i.get("path") == sub for i in s[key].get("items") or []):
                        provided = True
        check(f"{where}: --ca-cert file is provided by a mounted volume", provided, f"{ca}")

    # ports, identifiers, health
    check(f"{where}: --proxy-server-port is a port", port_ok(f.get("proxy-server-port")))
    check(f"{where}: --proxy-server-host set", bool(f.get("proxy-server-host")) and "<" not in f["proxy-server-host"],
          f"{f.get('proxy-server-host')}")
    hp = f.get("health-server-port", "8093")
    check(f"{where}: health server on 8093", hp == "8093", f"--health-server-port={hp}")
    check(f"{where}: admin server on 8094", f.get("admin-server-port", "8094") == "8094")
    ids = flags.get("agent-identifiers") or ""
    keys = {k for k, _ in parse_qsl(ids, keep_blank_values=True)}
    check(f"{where}: --agent-identifiers uses only known keys", keys <= AGENT_IDENTIFIER_KEYS,
          f"unknown {sorted(keys - AGENT_IDENTIFIER_KEYS)}")
    check(f"{where}: --agent-identifiers carries ipv4 and host (for destHost)", {"ipv4", "host"} <= keys, ids)
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        hg = (c.get(probe) or {}).get("httpGet") or {}
        check(f"{where}: {probe} GET {path} on the health port", hg.get("path") == path and str(hg.get("port")) == hp,
              f"{hg}")
    ports = {p.get("name"): p for p in c.get("ports") or []}
    check(f"{where}: health port declared as 'health' (scrape target)",
          str((ports.get("health") or {}).get("containerPort")) == hp)

    # Spoke extras
    check(f"{where}: --ebpf value known", f.get("ebpf") in ("auto", "on", "off"), f"{f.get('ebpf')}")
    check(f"{where}: --log-format=json", f.get("log-format") == "json", f"{f.get('log-format')}")
    check_cidr_list(where, "--allowed-destinations", f.get("allowed-destinations") or "", allow_node=True,
                    allow_empty=False)
    check_cidr_list(where, "--xdp-allow-cidrs", f.get("xdp-allow-cidrs") or "")
    xp = f.get("xdp-protected-ports") or ""
    check(f"{where}: --xdp-protected-ports is a port list ({xp!r})",
          all(port_ok(p) for p in xp.split(",") if p) and "10250" in xp.split(","))
    ifaces = f.get("xdp-guard-interfaces") or ""
    if ifaces:
        check(f"{where}: XDP guard on: interfaces are names ({ifaces!r})",
              all(re.fullmatch(r"[A-Za-z0-9_.:@-]{1,15}", i) for i in ifaces.split(",")))
        check(f"{where}: XDP guard on: allow list not empty (else the kubelet is unreachable from pods)",
              bool(f.get("xdp-allow-cidrs")))

    # footprint and scheduling
    res = c.get("resources") or {}
    try:
        mem = quantity((res.get("limits") or {}).get("memory", "0"))
        check(f"{where}: memory limit set and <= 30Mi", 0 < mem <= 30 * 2**20, f"{mem / 2**20:.1f}Mi")
        cpu = quantity((res.get("requests") or {}).get("cpu", "0"))
        check(f"{where}: cpu request 50m", abs(cpu - 0.05) < 1e-9, f"{cpu}")
        mreq = quantity((res.get("requests") or {}).get("memory", "0"))
        check(f"{where}: memory request <= limit", 0 < mreq <= mem)
    except ValueError as e:
        fail(f"{where}: resources parse", str(e))
    tol = spec.get("tolerations") or []
    check(f"{where}: tolerates every taint", any(t.get("operator") == "Exists" and not t.get("key") and
                                                 not t.get("effect") for t in tol), f"{tol}")
    check(f"{where}: priorityClassName system-node-critical or system-cluster-critical",
          spec.get("priorityClassName") in ("system-node-critical", "system-cluster-critical"))
    sa = spec.get("serviceAccountName")
    check(f"{where}: ServiceAccount {sa} is part of the install",
          any(o.get("kind") == "ServiceAccount" and o["metadata"]["name"] == sa and
              o["metadata"].get("namespace") == ns for o in objs))
    sel = ds["spec"]["selector"].get("matchLabels") or {}
    lbl = ds["spec"]["template"]["metadata"].get("labels") or {}
    check(f"{where}: selector matches the pod template labels", all(lbl.get(k) == v for k, v in sel.items()))
    return {"flags": f, "namespace": ns, "sa": sa, "audience": audience, "labels": lbl,
            "port_names": set(ports)}


def check_server(where: str, pod: dict) -> dict:
    spec = pod["spec"]
    ns = pod["metadata"].get("namespace", "default")
    check_common_pod(where, spec, [], ns)
    check(f"{where}: namespace kube-system", ns == "kube-system")
    # static pods may not reference API objects
    vols = {v["name"]: v for v in spec.get("volumes") or []}
    api_vols = [n for n, v in vols.items() if set(v) & {"configMap", "secret", "projected", "persistentVolumeClaim"}]
    check(f"{where}: static pod uses no ServiceAccount/ConfigMap/Secret/PVC",
          not api_vols and not spec.get("serviceAccountName") and
          not any((e.get("valueFrom") or {}).get(k) for c in containers(spec) for e in c.get("env") or []
                  for k in ("configMapKeyRef", "secretKeyRef")) and
          not any(c.get("envFrom") for c in containers(spec)),
          f"volumes {api_vols}")
    check(f"{where}: hostNetwork", spec.get("hostNetwork") is True)
    srv = [c for c in spec["containers"] if c["name"] == "spoke-server"]
    if not check(f"{where}: has container spoke-server", len(srv) == 1):
        return {}
    c = srv[0]
    check(f"{where}: runs /usr/local/bin/spoke-server",
          (c.get("command") or [None])[0] == "/usr/local/bin/spoke-server")
    f, problems = parse_args(c.get("args") or [])
    check(f"{where}: args are well-formed --flag=value", not problems, "; ".join(problems))
    unknown = sorted(set(f) - SERVER_UPSTREAM - SERVER_SPOKE)
    check(f"{where}: every server flag is an upstream proxy-server flag or a known Spoke extension", not unknown,
          f"unknown flags {unknown}")
    mode = f.get("mode", "grpc")
    check(f"{where}: --mode is grpc or http-connect", mode in ("grpc", "http-connect"), mode)

    def mounted(path: str | None, writable: bool = False) -> bool:
        if not path:
            return False
        m = mount_for(c, path)
        if not m:
            return False
        v = vols.get(m["name"]) or {}
        if "hostPath" not in v:
            return False
        return not (writable and m.get("readOnly"))

    uds = f.get("uds-name")
    if uds:
        d = posixpath.dirname(uds)
        m = mount_for(c, uds)
        hp = ((vols.get(m["name"]) if m else None) or {}).get("hostPath") or {}
        check(f"{where}: UDS directory is a writable hostPath mount", mounted(uds, writable=True), uds)
        check(f"{where}: UDS directory has the same path on the host (kube-apiserver sees {uds})",
              bool(m) and m["mountPath"] == d and hp.get("path") == d, f"mount {m} hostPath {hp}")
        check(f"{where}: with --uds-name, --server-port=0", f.get("server-port") == "0", f"{f.get('server-port')}")
        check(f"{where}: with --uds-name, no frontend TLS flags",
              not any(f.get(k) for k in ("server-cert", "server-key", "server-ca-cert")))
    else:
        sp = f.get("server-port", "8090")
        check(f"{where}: TCP frontend port in 1024..49151", port_ok(sp) and 1024 <= int(sp) <= 49151, sp)
        for k in ("server-cert", "server-key", "server-ca-cert"):
            check(f"{where}: TCP frontend --{k} on a host mount", mounted(f.get(k)), f"{f.get(k)}")
        check(f"{where}: TCP frontend bound to loopback", f.get("server-bind-address") in ("127.0.0.1", "::1"),
              f"{f.get('server-bind-address')}")
    for k in ("cluster-cert", "cluster-key", "kubeconfig"):
        check(f"{where}: --{k} on a host mount", mounted(f.get(k)), f"{f.get(k)}")
    auth = [f.get(k) for k in ("agent-namespace", "agent-service-account", "authentication-audience")]
    check(f"{where}: agents authenticate: token auth flags all set, or --cluster-ca-cert",
          all(auth) or (not any(auth) and bool(f.get("cluster-ca-cert"))), f"{auth}")
    if f.get("approve-agent-csrs") is not None:
        check(f"{where}: --approve-agent-csrs with client certificates required (--cluster-ca-cert)",
              bool(f.get("cluster-ca-cert")))
    check(f"{where}: token auth and --cluster-ca-cert are exclusive", not (all(auth) and f.get("cluster-ca-cert")))
    strategies = (f.get("proxy-strategies") or "default").split(",")
    check(f"{where}: --proxy-strategies valid ({','.join(strategies)})", set(strategies) <= PROXY_STRATEGIES)
    check(f"{where}: --server-count >= 1", (f.get("server-count") or "1").isdigit() and int(f.get("server-count") or 1) >= 1)
    for k, want in (("agent-port", "8091"), ("health-port", "8092"), ("admin-port", "8095")):
        check(f"{where}: --{k}={want}", f.get(k) == want, f"{f.get(k)}")
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        hg = (c.get(probe) or {}).get("httpGet") or {}
        check(f"{where}: {probe} GET {path} on --health-port",
              hg.get("path") == path and str(hg.get("port")) == f.get("health-port"), f"{hg}")
    ports = {p.get("name"): p for p in c.get("ports") or []}
    check(f"{where}: health port declared as 'health' (scrape target)",
          str((ports.get("health") or {}).get("containerPort")) == f.get("health-port"))
    check(f"{where}: agent port declared", str((ports.get("agent") or {}).get("containerPort")) == f.get("agent-port"))
    sc = c.get("securityContext") or {}
    check(f"{where}: drops all capabilities, no escalation, read-only root",
          "ALL" in ((sc.get("capabilities") or {}).get("drop") or []) and sc.get("allowPrivilegeEscalation") is False
          and sc.get("readOnlyRootFilesystem") is True and not sc.get("privileged"))
    check(f"{where}: priorityClassName system-node-critical or system-cluster-critical",
          spec.get("priorityClassName") in ("system-node-critical", "system-cluster-critical"))
    return {"flags": f, "labels": pod["metadata"].get("labels") or {}, "port_names": set(ports)}


def check_egress(where: str, cfg: dict) -> dict:
    errs = own_schema_errors(EGRESS_SCHEMA, cfg)
    check(f"{where}: matches the EgressSelectorConfiguration v1beta1 schema", not errs, "; ".join(errs[:3]))
    if errs:
        return {}
    sels = cfg["egressSelections"]
    names = [("controlplane" if s["name"] == "master" else s["name"]) for s in sels]
    check(f"{where}: selection names unique", len(names) == len(set(names)), f"{names}")
    by = {("controlplane" if s["name"] == "master" else s["name"]): s["connection"] for s in sels}
    for n, conn in by.items():
        p, t = conn["proxyProtocol"], conn.get("transport") or {}
        if p == "GRPC":
            check(f"{where}: {n}: GRPC uses the UDS transport", "uds" in t, "UDS transport must be specified for GRPC")
        elif p == "HTTPConnect":
            check(f"{where}: {n}: HTTPConnect has a transport", bool(t))
            if "tcp" in t:
                tls = t["tcp"].get("tlsConfig") or {}
                u = urlparse(t["tcp"]["url"])
                if u.scheme == "https":
                    check(f"{where}: {n}: https transport has clientCert and clientKey",
                          bool(tls.get("clientCert")) and bool(tls.get("clientKey")))
                else:
                    check(f"{where}: {n}: http transport has no tlsConfig", not tls)
        else:
            check(f"{where}: {n}: Direct has no transport", not t)
    cl = by.get("cluster")
    check(f"{where}: 'cluster' goes through the proxy", bool(cl) and cl["proxyProtocol"] != "Direct")
    return by


def check_podmonitor(where: str, pm: dict, targets: dict[str, dict]) -> None:
    errs = own_schema_errors(PODMONITOR_SCHEMA, pm)
    check(f"{where}: matches the PodMonitor schema", not errs, "; ".join(errs[:3]))
    if errs:
        return
    sel = pm["spec"]["selector"].get("matchLabels") or {}
    hit = [n for n, t in targets.items() if t and all(t["labels"].get(k) == v for k, v in sel.items())]
    check(f"{where}: selector {sel} matches a Spoke pod", len(hit) == 1, f"matches {hit}")
    if len(hit) == 1:
        t = targets[hit[0]]
        check(f"{where}: namespaceSelector covers kube-system",
              "kube-system" in (pm["spec"].get("namespaceSelector") or {}).get("matchNames", []))
        for ep in pm["spec"]["podMetricsEndpoints"]:
            check(f"{where}: endpoint port {ep.get('port')!r} is a named port of {hit[0]}",
                  ep.get("port") in t["port_names"], f"ports {sorted(t['port_names'])}")
        job_label = pm["spec"].get("jobLabel")
        if job_label:
            check(f"{where}: jobLabel {job_label} present on the pods", job_label in t["labels"])


# ------------------------------------------------------------ dashboards ---
KNOWN_METRICS = {
    # upstream agent (reference §4.1)
    *(f"konnectivity_network_proxy_agent_{m}" for m in (
        "dial_duration_seconds_bucket", "dial_duration_seconds_sum", "dial_duration_seconds_count",
        "endpoint_dial_failure_total", "server_connection_failure_count", "open_server_connections",
        "known_server_count", "open_endpoint_connections", "stream_packets_total", "stream_errors_total",
        "lease_lists_total", "lease_watches_total", "lease_list_latency_seconds_bucket")),
    # upstream server (reference §4.2)
    *(f"konnectivity_network_proxy_server_{m}" for m in (
        "dial_duration_seconds_bucket", "dial_duration_seconds_sum", "dial_duration_seconds_count",
        "frontend_write_duration_seconds_bucket", "connection_duration_seconds_bucket", "grpc_connections",
        "http_connections", "ready_backend_connections", "ready_backends", "pending_backend_dials",
        "established_connections", "full_receive_channels", "dial_failure_count", "stream_packets_total",
        "stream_errors_total", "culled_leases_count", "lease_delete_latency_seconds_bucket", "lease_delete_total",
        "lease_list_latency_seconds_bucket", "lease_list_total")),
    # Spoke data path (tunnel crate RelayMetrics; registered as spoke_ and, on the server, spoke_server_)
    *(f"spoke_{pre}{m}" for pre in ("", "server_", "agent_") for m in (
        "bytes_relayed_total", "connections_closed_total", "buffered_bytes", "flow_control_stalls_total")),
    "spoke_server_rejected_connections_total",
    # Spoke eBPF (agent/src/ebpf/metrics.rs; counters get _total in the text format)
    "spoke_ebpf_program_attached", "spoke_ebpf_xdp_packets_total",
    *(f"spoke_ebpf_{m}_total" for m in ("sockets_tracked", "socket_pairs", "sockets_closed", "redirected_messages",
                                        "redirected_bytes", "passed_messages", "sockhash_errors")),
    # cAdvisor (kubelet)
    "container_memory_working_set_bytes", "container_cpu_usage_seconds_total",
}
PROMQL_WORDS = {"sum", "by", "without", "rate", "irate", "increase", "histogram_quantile", "max", "min", "avg",
                "count", "or", "and", "unless", "on", "ignoring", "group_left", "group_right", "vector", "topk",
                "bottomk", "label_replace", "abs", "clamp_min", "clamp_max", "offset", "bool", "time", "delta",
                "deriv", "sort", "sort_desc", "scalar", "absent", "changes", "resets", "le", "quantile"}


def metric_names(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, __name__ regex matchers) used in a PromQL expression (heuristic)."""
    regexes = set(re.findall(r'__name__\s*=~\s*"([^"]+)"', expr))
    e = re.sub(r"\{[^}]*\}", "{}", expr)            # drop label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)                # drop ranges
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)
    e = re.sub(r'"[^"]*"', "", e)
    names = set()
    for tok in re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        if tok in PROMQL_WORDS or re.fullmatch(r"[0-9.e]+", tok):
            continue
        names.add(tok)
    return names, regexes


def check_dashboard(path: Path) -> None:
    where = rel(path)
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        fail(f"{where}: parses as JSON", str(e))
        return
    ok(f"{where}: parses as JSON")
    check(f"{where}: has uid, title, schemaVersion, panels",
          all(k in d for k in ("uid", "title", "schemaVersion", "panels")) and isinstance(d["panels"], list))
    panels = [p for p in d.get("panels", []) if isinstance(p, dict)]
    ids = [p.get("id") for p in panels]
    check(f"{where}: panel ids unique", len(ids) == len(set(ids)) and None not in ids)
    # no two panels overlap on the 24-column grid
    rects = [(p["gridPos"]["x"], p["gridPos"]["y"], p["gridPos"]["w"], p["gridPos"]["h"], p.get("title"))
             for p in panels if "gridPos" in p]
    overlaps = [(a[4], b[4]) for i, a in enumerate(rects) for b in rects[i + 1:]
                if a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]]
    check(f"{where}: panels fit the 24-column grid without overlapping",
          not overlaps and all(r[0] + r[2] <= 24 for r in rects), f"{overlaps[:3]}")
    used: set[str] = set()
    unknown = []
    bad_promql = []
    var_values = {}
    for v in (d.get("templating") or {}).get("list", []):
        cur = (v.get("current") or {}).get("value")
        var_values[v.get("name")] = cur if isinstance(cur, str) and cur else v.get("query", "x")
    variables = {v.get("name") for v in (d.get("templating") or {}).get("list", [])}
    undefined_vars = set()
    for p in panels:
        if p.get("type") == "row":
            continue
        if not p.get("targets"):
            fail(f"{where}: panel {p.get('title')!r} has queries", "no targets")
            continue
        for t in p["targets"]:
            expr = t.get("expr", "")
            for v in re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", expr):
                if not v.startswith("__") and v not in variables:
                    undefined_vars.add(v)
            # substitute Grafana's variables, then parse with a real PromQL parser
            concrete = re.sub(r"\$__(rate_interval|interval|range)\b", "5m", expr)
            concrete = re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: var_values.get(m.group(1), "x"), concrete)
            try:
                promql_parser.parse(concrete)
            except Exception as e:  # the binding raises ValueError with the parser's message
                bad_promql.append(f"{p.get('title')!r}: {e}")
            names, regexes = metric_names(expr)
            used |= names
            for rx in regexes:
                hits = {n for n in KNOWN_METRICS if re.fullmatch(rx, n)}
                if hits:
                    used |= hits
                else:
                    unknown.append(f"{{__name__=~{rx!r}}}")
            unknown += [n for n in names if n not in KNOWN_METRICS]
    check(f"{where}: every query parses as PromQL", not bad_promql, "; ".join(bad_promql[:3]))
    check(f"{where}: every query uses known metric names (reference §4 + spoke_*)", not unknown,
          f"unknown {sorted(set(unknown))}")
    check(f"{where}: query variables are defined", not undefined_vars, f"{sorted(undefined_vars)}")
    check(f"{where}: covers upstream server metrics",
          any(n.startswith("konnectivity_network_proxy_server_") for n in used))
    check(f"{where}: covers upstream agent metrics",
          any(n.startswith("konnectivity_network_proxy_agent_") for n in used))
    check(f"{where}: covers spoke_bytes_relayed_total", "spoke_bytes_relayed_total" in used)
    check(f"{where}: covers spoke_ebpf_*", any(n.startswith("spoke_ebpf_") for n in used))


def check_configmap_dashboard(where: str, cm: dict, path: Path) -> None:
    data = (cm.get("data") or {})
    key = next((k for k in data if k.endswith(".json")), None)
    check(f"{where}: ConfigMap carries the dashboard JSON", key is not None and
          json.loads(data[key]) == json.loads(path.read_text()))
    check(f"{where}: labelled for the Grafana sidecar", (cm["metadata"].get("labels") or {}).get("grafana_dashboard"))


# ----------------------------------------------------------- Containerfile ---
def check_containerfile(path: Path) -> None:
    where = rel(path)
    try:
        text = path.read_text()
    except OSError as e:
        fail(f"{where}: readable", str(e))
        return
    # join continuation lines, drop comments
    lines = []
    buf = ""
    for raw in text.splitlines():
        s = raw.strip()
        if s.startswith("#") or not s:
            continue
        if s.endswith("\\"):
            buf += s[:-1] + " "
            continue
        lines.append(buf + s)
        buf = ""
    instr = [(l.split(None, 1)[0].upper(), l.split(None, 1)[1] if " " in l else "") for l in lines]
    known = {"FROM", "RUN", "COPY", "ADD", "ARG", "ENV", "WORKDIR", "USER", "LABEL", "EXPOSE", "ENTRYPOINT", "CMD",
             "VOLUME", "STOPSIGNAL", "HEALTHCHECK", "SHELL", "ONBUILD"}
    bad = [i for i, _ in instr if i not in known]
    check(f"{where}: only Containerfile instructions", not bad, f"{bad}")
    froms = [a for i, a in instr if i == "FROM"]
    check(f"{where}: multi-stage (builder + runtime)", len(froms) >= 2 and " AS " in froms[0].upper())
    check(f"{where}: first instruction is ARG or FROM", bool(instr) and instr[0][0] in ("ARG", "FROM"))
    runtime = froms[-1] if froms else ""
    check(f"{where}: small runtime base (distroless/cc or debian:12-slim)",
          bool(re.search(r"distroless/cc|debian:12-slim|debian:bookworm-slim", runtime)), runtime)
    run = " ".join(a for i, a in instr if i == "RUN")
    check(f"{where}: builds both binaries with cargo build --release -p spoke-server -p spoke-agent",
          bool(re.search(r"cargo build --release( --locked)? -p spoke-server -p spoke-agent", run)))
    check(f"{where}: installs both binaries into the runtime",
          "target/release/spoke-server" in run and "target/release/spoke-agent" in run and
          any(i == "COPY" and "--from=" in a for i, a in instr))
    stages = {m.group(1).lower() for f in froms for m in [re.search(r"\bAS\s+(\S+)", f, re.I)] if m}
    copies = [re.search(r"--from=(\S+)", a).group(1).lower() for i, a in instr if i == "COPY" and "--from=" in a]
    check(f"{where}: COPY --from names a defined stage", all(s in stages for s in copies), f"{copies} vs {stages}")
    ep = next((a for i, a in reversed(instr) if i == "ENTRYPOINT"), None)
    if ep:
        try:
            json.loads(ep)
            ok(f"{where}: ENTRYPOINT in exec (JSON) form")
        except json.JSONDecodeError:
            fail(f"{where}: ENTRYPOINT in exec (JSON) form", ep)


# --------------------------------------------------------- negative tests ---
def negative_controls(sample: dict[str, dict]) -> None:
    """The validators must reject known-bad input (a validator that accepts
    everything would otherwise pass silently)."""
    v = K8S_VERSIONS[-1]
    ds = sample.get("DaemonSet")
    if ds:
        bad = copy.deepcopy(ds)
        bad["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "8093"
        check("negative: DaemonSet with containerPort as a string is rejected", k8s_schema_error(bad, v) is not None)
        bad = copy.deepcopy(ds)
        bad["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilitiez"] = {}
        check("negative: DaemonSet with an unknown field is rejected (strict)", k8s_schema_error(bad, v) is not None)
        bad = copy.deepcopy(ds)
        bad["spec"]["template"]["spec"]["hostNetwork"] = "yes"
        check("negative: DaemonSet with hostNetwork as a string is rejected", k8s_schema_error(bad, v) is not None)
    pm = sample.get("PodMonitor")
    if pm:
        bad = copy.deepcopy(pm)
        bad["spec"]["podMetricsEndpoints"][0]["intervall"] = "30s"
        check("negative: PodMonitor with a misspelt field is rejected", k8s_schema_error(bad, v) is not None)
        bad = copy.deepcopy(pm)
        bad["spec"]["podMetricsEndpoints"][0]["interval"] = 30
        check("negative: PodMonitor with a numeric interval is rejected", k8s_schema_error(bad, v) is not None)
    eg = sample.get("EgressSelectorConfiguration")
    if eg:
        bad = copy.deepcopy(eg)
        bad["egressSelections"][0]["connection"]["proxyProtocol"] = "Grpc"
        check("negative: egress selector with a wrong proxyProtocol is rejected", bool(own_schema_errors(EGRESS_SCHEMA, bad)))
        bad = copy.deepcopy(eg)
        bad["egressSelections"][0]["connection"]["transport"] = {"uds": {"udsName": "/x"}, "tcp": {"url": "https://a:1"}}
        check("negative: egress selector with two transports is rejected", bool(own_schema_errors(EGRESS_SCHEMA, bad)))
    f, probs = parse_args(["--proxy-server-hots=x"])
    check("negative: a misspelt agent flag is reported", bool(set(f) - AGENT_UPSTREAM - AGENT_SPOKE))
    names, _ = metric_names('sum by (x) (rate(konnectivity_network_proxy_server_dial_failures_count{a="b"}[5m]))')
    check("negative: a misspelt metric name is reported", bool(names - KNOWN_METRICS))
    try:
        promql_parser.parse('sum by (reason) (rate(foo{a="b"}[5m])')
        fail("negative: unbalanced PromQL is rejected by the parser", "accepted")
    except Exception:
        ok("negative: unbalanced PromQL is rejected by the parser")
    _, rx = metric_names('rate({__name__=~"spoke_(server_)?bytes_relayd_total"}[5m])')
    check("negative: a __name__ regex matching no known metric is reported",
          bool(rx) and not any(re.fullmatch(r, n) for r in rx for n in KNOWN_METRICS))


# ------------------------------------------------------------------- main ---
def rbac_rules(docs: list[dict], subject_kind: str, subject_name: str) -> set[tuple[str, str, str]]:
    """(resource, verb, resourceName or '') granted to a subject by the rendered (Cluster)Roles."""
    roles = {(o["kind"], o["metadata"]["name"]): o for o in docs if o.get("kind") in ("Role", "ClusterRole")}
    out = set()
    for b in docs:
        if b.get("kind") not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        if not any(s.get("kind") == subject_kind and s.get("name") == subject_name for s in b.get("subjects") or []):
            continue
        role = roles.get((b["roleRef"]["kind"], b["roleRef"]["name"]))
        for rule in (role or {}).get("rules") or []:
            for res in rule.get("resources") or []:
                for verb in rule.get("verbs") or []:
                    for rn in rule.get("resourceNames") or [""]:
                        out.add((res, verb, rn))
    return out


def check_ha_and_csr(rendered, agent_info, server_info, find) -> None:
    ha = rendered.get(DEPLOY / "overlays" / "ha") or []
    af = (agent_info.get("ha") or {}).get("flags", {})
    check("overlay ha: agents count leases (--count-server-leases, --lease-namespace=kube-system)",
          "count-server-leases" in af and af.get("lease-namespace") == "kube-system", f"{af}")
    check("overlay ha: agents dial several server addresses",
          "," in (af.get("proxy-server-host") or "") or "$(" in (af.get("proxy-server-host") or ""))
    cms = [o for o in find(ha, "ConfigMap") if o["metadata"]["name"].startswith("spoke-agent")]
    hosts = (cms[0]["data"].get("PROXY_SERVER_HOST") if cms else "") or ""
    check("overlay ha: PROXY_SERVER_HOST lists three servers", len([h for h in hosts.split(",") if h]) == 3, hosts)
    server = rbac_rules(ha, "User", "system:konnectivity-server")
    want_server = {("leases", v, "") for v in ("create", "get", "update", "delete", "list", "watch")}
    check("overlay ha: server may create/get/update/delete/list/watch leases",
          want_server <= server, f"missing {sorted(want_server - server)}")
    agent = {r for r in rbac_rules(ha, "ServiceAccount", "konnectivity-agent")}
    check("overlay ha: agent may list/watch leases and nothing else",
          agent == {("leases", "list", ""), ("leases", "watch", "")}, f"{sorted(agent)}")
    sf = (server_info.get("server-ha") or {}).get("flags", {})
    check("overlay server-ha: --server-count=3 until the first lease count", sf.get("server-count") == "3", f"{sf}")
    check("overlay server-ha: lease controller and lease counting on",
          "enable-lease-controller" in sf and "count-server-leases" in sf and sf.get("lease-namespace") == "kube-system",
          f"{sf}")
    csr = rendered.get(DEPLOY / "overlays" / "agent-csr") or []
    cf = (agent_info.get("agent-csr") or {}).get("flags", {})
    check("overlay agent-csr: --cert-dir and no token", bool(cf.get("cert-dir")) and not cf.get("service-account-token-path"),
          f"{cf}")
    agent = rbac_rules(csr, "ServiceAccount", "konnectivity-agent")
    check("overlay agent-csr: agent may create/get/watch CSRs and nothing more",
          agent == {("certificatesigningrequests", v, "") for v in ("create", "get", "watch")}, f"{sorted(agent)}")
    approver = rbac_rules(csr, "User", "system:konnectivity-server")
    check("overlay agent-csr: the approver may approve for kubernetes.io/kube-apiserver-client only",
          ("signers", "approve", "kubernetes.io/kube-apiserver-client") in approver
          and not any(r == "signers" and rn != "kubernetes.io/kube-apiserver-client" for r, _, rn in approver),
          f"{sorted(approver)}")
    pf = (server_info.get("server-csr-approver") or {}).get("flags", {})
    check("overlay server-csr-approver: approver on, token auth off, --cluster-ca-cert set",
          "approve-agent-csrs" in pf and bool(pf.get("cluster-ca-cert")) and not pf.get("agent-namespace"), f"{pf}")


def main() -> int:
    print(f"deploy dir: {rel(DEPLOY)}; kubectl: {KUBECTL}; Kubernetes schema versions: {' '.join(K8S_VERSIONS)}")
    if not DEPLOY.is_dir():
        fail("deploy/ exists", str(DEPLOY))
        return 1

    rendered: dict[Path, list[dict]] = {}
    for d in kustomizations():
        docs = render(d)
        if docs is not None:
            rendered[d] = docs
    check("every overlay is a kustomization",
          all((d / "kustomization.yaml").is_file() for d in (DEPLOY / "overlays").iterdir() if d.is_dir()))

    # -- schema validation of every rendered object
    sample: dict[str, dict] = {}
    for d, docs in rendered.items():
        for o in docs:
            sample.setdefault(o.get("kind"), o)
            for ver in K8S_VERSIONS:
                err = k8s_schema_error(o, ver)
                own = (o.get("apiVersion"), o.get("kind")) in OWN_SCHEMAS
                name = f"schema {rel(d)}: {obj_id(o)} ({'own schema' if own else 'k8s ' + ver.rsplit('.', 1)[0]})"
                check(name, err is None, err or "")
                if (o.get("apiVersion"), o.get("kind")) in OWN_SCHEMAS:
                    break  # own schemas are not versioned

    # -- plain files: static pod as a file, egress selector configs, scrape config
    static_pod_file = DEPLOY / "server" / "konnectivity-server.yaml"
    plain: list[tuple[Path, dict]] = []
    for p in [static_pod_file, *sorted((DEPLOY / "egress-selector").glob("*.yaml"))]:
        try:
            docs = load_yaml_docs(p.read_text())
            check(f"{rel(p)}: parses as one YAML document", len(docs) == 1, f"{len(docs)} documents")
            plain += [(p, o) for o in docs]
        except (OSError, yaml.YAMLError) as e:
            fail(f"{rel(p)}: parses as YAML", str(e))
    for p, o in plain:
        sample.setdefault(o.get("kind"), o)
        for ver in K8S_VERSIONS:
            err = k8s_schema_error(o, ver)
            own = (o.get("apiVersion"), o.get("kind")) in OWN_SCHEMAS
            check(f"schema {rel(p)}: {obj_id(o)} ({'own schema' if own else 'k8s ' + ver.rsplit('.', 1)[0]})",
                  err is None, err or "")
            if (o.get("apiVersion"), o.get("kind")) in OWN_SCHEMAS:
                break
    scrape = DEPLOY / "monitoring" / "prometheus-scrape-configs.yaml"
    try:
        sc = yaml.safe_load(scrape.read_text())
        errs = own_schema_errors(SCRAPE_SCHEMA, sc)
        check(f"schema {rel(scrape)}: Prometheus scrape_configs", not errs, "; ".join(errs[:3]))
        jobs = {j["job_name"] for j in sc.get("scrape_configs", [])} if not errs else set()
        check(f"{rel(scrape)}: jobs spoke-agent and spoke-server", {"spoke-agent", "spoke-server"} <= jobs, f"{jobs}")
    except (OSError, yaml.YAMLError) as e:
        fail(f"{rel(scrape)}: parses as YAML", str(e))

    # -- policy and contract checks per overlay
    def find(docs, kind, name=None):
        return [o for o in docs if o.get("kind") == kind and (name is None or o["metadata"]["name"] == name)]

    agent_info: dict[str, dict] = {}
    server_info: dict[str, dict] = {}
    for d, docs in rendered.items():
        for pod in find(docs, "Pod", "konnectivity-server"):
            server_info[d.name] = check_server(rel(d), pod)
    for d, docs in rendered.items():
        r = rel(d)
        for ds in find(docs, "DaemonSet", "konnectivity-agent"):
            agent_info[d.name] = check_agent(r, ds, docs, expect_privileged=(d.name == "agent-privileged"))
        for svc in find(docs, "Service", "konnectivity-server"):
            sel = svc["spec"].get("selector") or {}
            check(f"{r}: Service konnectivity-server publishes not-ready servers (readyz is 500 until an agent joins)",
                  svc["spec"].get("publishNotReadyAddresses") is True)
            check(f"{r}: Service konnectivity-server is headless", svc["spec"].get("clusterIP") == "None")
            srv = server_info.get("server-grpc") or {}
            check(f"{r}: Service selector {sel} matches the server static pod", bool(srv) and bool(sel) and
                  all(srv["labels"].get(k) == v for k, v in sel.items()))
        for crb in find(docs, "ClusterRoleBinding"):
            if crb["roleRef"]["name"] == "system:auth-delegator":
                check(f"{r}: system:auth-delegator bound to user system:konnectivity-server",
                      any(s.get("kind") == "User" and s.get("name") == "system:konnectivity-server"
                          for s in crb.get("subjects") or []))
    for name in ("default", "agent-privileged", "agent-xdp-guard", "ha", "agent-csr"):
        check(f"overlay {name} renders the agent DaemonSet", bool(agent_info.get(name)))
    check_ha_and_csr(rendered, agent_info, server_info, find)
    for name in ("server-grpc", "server-http-connect"):
        check(f"overlay {name} renders the server static pod", bool(server_info.get(name)))
    check("overlay agent-xdp-guard turns the XDP guard on",
          bool((agent_info.get("agent-xdp-guard") or {}).get("flags", {}).get("xdp-guard-interfaces")))
    check("overlay default leaves the XDP guard off",
          not (agent_info.get("default") or {}).get("flags", {}).get("xdp-guard-interfaces"))
    check("overlay server-grpc runs --mode=grpc over UDS",
          (server_info.get("server-grpc") or {}).get("flags", {}).get("mode") == "grpc" and
          bool((server_info.get("server-grpc") or {}).get("flags", {}).get("uds-name")))
    check("overlay server-http-connect runs --mode=http-connect over TCP",
          (server_info.get("server-http-connect") or {}).get("flags", {}).get("mode") == "http-connect" and
          not (server_info.get("server-http-connect") or {}).get("flags", {}).get("uds-name"))

    # -- the static pod file is what the server-grpc overlay renders (modulo the image transform)
    if rendered.get(DEPLOY / "overlays" / "server-grpc") and plain:
        a = copy.deepcopy(find(rendered[DEPLOY / "overlays" / "server-grpc"], "Pod")[0])
        b = copy.deepcopy(next(o for p, o in plain if p == static_pod_file))
        for x in (a, b):
            for c in x["spec"]["containers"]:
                c.pop("image", None)
        check("deploy/server/konnectivity-server.yaml equals the server-grpc render (but for the image)", a == b)

    # -- cross-component contract
    srv = (server_info.get("server-grpc") or {}).get("flags", {})
    srv_h = (server_info.get("server-http-connect") or {}).get("flags", {})
    agt = agent_info.get("default") or {}
    af = agt.get("flags", {})
    if srv and af:
        check("contract: agent --proxy-server-port == server --agent-port",
              af.get("proxy-server-port") == srv.get("agent-port") == srv_h.get("agent-port"),
              f"{af.get('proxy-server-port')} vs {srv.get('agent-port')}/{srv_h.get('agent-port')}")
        check("contract: server --agent-namespace/--agent-service-account name the agent's ServiceAccount",
              srv.get("agent-namespace") == agt["namespace"] and srv.get("agent-service-account") == agt["sa"],
              f"{srv.get('agent-namespace')}/{srv.get('agent-service-account')} vs {agt['namespace']}/{agt['sa']}")
        check("contract: server --authentication-audience == agent token audience",
              srv.get("authentication-audience") == agt.get("audience") == TOKEN_AUDIENCE)
        svc = find(rendered.get(DEPLOY / "overlays" / "default", []), "Service", "konnectivity-server")
        if svc:
            check("contract: Service port == server --agent-port",
                  any(str(p.get("targetPort")) == srv.get("agent-port") for p in svc[0]["spec"]["ports"]))
            host = af.get("proxy-server-host", "")
            check("contract: default --proxy-server-host is the Service's DNS name",
                  host.startswith(f"{svc[0]['metadata']['name']}.{svc[0]['metadata']['namespace']}.svc"), host)
        # (overlays/ha lists the control-plane addresses instead of the Service name)
        check("contract: agent --proxy-server-host same in every agent overlay but ha",
              len({(i.get("flags") or {}).get("proxy-server-host") for n, i in agent_info.items() if i and n != "ha"}) == 1)
    egress = {p.name: o for p, o in plain if o.get("kind") == "EgressSelectorConfiguration"}
    check("egress-selector: grpc-uds.yaml and http-connect-mtls.yaml present",
          {"grpc-uds.yaml", "http-connect-mtls.yaml"} <= set(egress))
    by_g = check_egress("deploy/egress-selector/grpc-uds.yaml", egress["grpc-uds.yaml"]) if "grpc-uds.yaml" in egress else {}
    by_h = (check_egress("deploy/egress-selector/http-connect-mtls.yaml", egress["http-connect-mtls.yaml"])
            if "http-connect-mtls.yaml" in egress else {})
    if by_g and srv:
        cl = by_g.get("cluster") or {}
        check("contract: grpc-uds.yaml is GRPC to the server-grpc --uds-name",
              cl.get("proxyProtocol") == "GRPC" and
              (cl.get("transport") or {}).get("uds", {}).get("udsName") == srv.get("uds-name"),
              f"{cl} vs {srv.get('uds-name')}")
    if by_h and srv_h:
        cl = by_h.get("cluster") or {}
        tcp = (cl.get("transport") or {}).get("tcp") or {}
        u = urlparse(tcp.get("url", ""))
        check("contract: http-connect-mtls.yaml is HTTPConnect over https to server-http-connect's bind address/port",
              cl.get("proxyProtocol") == "HTTPConnect" and u.scheme == "https" and
              u.hostname == srv_h.get("server-bind-address") and str(u.port) == srv_h.get("server-port"),
              f"{tcp.get('url')} vs {srv_h.get('server-bind-address')}:{srv_h.get('server-port')}")
        check("contract: kube-apiserver trusts the CA that the server uses for its frontend (--server-ca-cert pairing)",
              bool((tcp.get("tlsConfig") or {}).get("caBundle")))

    # -- monitoring
    mon = rendered.get(DEPLOY / "overlays" / "monitoring")
    check("overlay monitoring renders", mon is not None)
    if mon:
        targets = {"agent": agent_info.get("default"), "server": server_info.get("server-grpc")}
        pms = find(mon, "PodMonitor")
        check("monitoring: PodMonitors for agent and server",
              {p["metadata"]["name"] for p in pms} >= {"spoke-agent", "spoke-server"})
        for pm in pms:
            check_podmonitor(f"deploy/overlays/monitoring: PodMonitor {pm['metadata']['name']}", pm, targets)
        dash = DEPLOY / "monitoring" / "grafana" / "spoke-dashboard.json"
        for cm in find(mon, "ConfigMap"):
            check_configmap_dashboard(f"deploy/overlays/monitoring: ConfigMap {cm['metadata']['name']}", cm, dash)
    for p in sorted((DEPLOY / "monitoring").rglob("*.json")):
        check_dashboard(p)

    check_containerfile(DEPLOY / "Containerfile")
    readme = DEPLOY / "README.md"
    check("deploy/README.md mentions every overlay",
          readme.is_file() and all(f"overlays/{d.name}" in readme.read_text()
                                   for d in (DEPLOY / "overlays").iterdir() if d.is_dir()))

    negative_controls(sample)

    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
