"""deploy/k8s and deploy/grafana: every kustomization renders and validates, and agrees with the server.

Nothing here copies a list out of the server: flag and env names come from its flag parser,
ports from parsing the ConfigMap with that parser, health service names from the server's
module, metric and label names from a real ``/metrics`` scrape of a real server on the tiny
bundle, and the batch Job's command is run, as rendered, N times in this process.

Needs ``kubectl`` (kustomize) and ``promtool`` on PATH (Debian: kubernetes-client,
prometheus); the tests that need one skip without it.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import kubernetes_validate
import numpy as np
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from vaegan.service.server.app import HEALTH_SERVICES
from vaegan.service.server.config import (
    ServiceConfig,
    add_serve_arguments,
    config_from_args,
    env_name,
)
from vaegan.service.server.servicer import SERVICE, SERVICE_NAME
from vaegan.service.server.testing import ServerThread

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
DASHBOARD = REPO / "deploy" / "grafana" / "vaegan-dashboard.json"
K8S_VERSION = "1.33.0"  # the Kubernetes whose OpenAPI schemas the manifests must pass, strictly
USER = 10001  # the images' numeric user

OVERLAYS = sorted(p.parent.relative_to(K8S).as_posix() for p in K8S.glob("overlays/*/kustomization.yaml"))
JOBS = sorted(p.parent.relative_to(K8S).as_posix() for p in K8S.glob("jobs/*/kustomization.yaml"))
COMPONENTS = sorted(p.parent.relative_to(K8S).as_posix() for p in K8S.glob("components/*/kustomization.yaml"))
# every overlay alone and with each component; every job kustomization
TARGETS = [(o, ()) for o in OVERLAYS] + [(o, (c,)) for o in OVERLAYS for c in COMPONENTS] + [(j, ()) for j in JOBS]
# labels Prometheus (Operator) adds to every scraped series
TARGET_LABELS = {"namespace", "pod", "job", "instance", "service", "container", "endpoint"}
GRAFANA_BUILTINS = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h"}

Doc = dict[str, Any]


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        package = {"kubectl": "kubernetes-client", "promtool": "prometheus"}[tool]
        pytest.skip(f"{tool} is not on PATH (Debian: apt-get install {package})")
    return path


@functools.cache
def _kustomize(path: str, components: tuple[str, ...]) -> tuple[Doc, ...]:
    """``kubectl kustomize`` of ``deploy/k8s/<path>`` (plus components, through a temporary
    kustomization beside the repository's, since kustomize takes relative paths only)."""
    kubectl = need("kubectl")
    if not components:
        out = subprocess.run([kubectl, "kustomize", str(K8S / path)], capture_output=True, text=True)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            rel = os.path.relpath(K8S, tmp)
            spec = {"resources": [f"{rel}/{path}"], "components": [f"{rel}/{c}" for c in components]}
            Path(tmp, "kustomization.yaml").write_text(yaml.safe_dump(spec))
            out = subprocess.run([kubectl, "kustomize", tmp], capture_output=True, text=True)
    assert out.returncode == 0, f"kubectl kustomize {path} {components}: {out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def render(path: str, components: tuple[str, ...] = ()) -> list[Doc]:
    return list(_kustomize(path, components))


def one(docs: list[Doc], kind: str, name: str | None = None) -> Doc:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_specs(docs: list[Doc]) -> list[tuple[str, Doc]]:
    return [(d["metadata"]["name"], d["spec"]["template"]["spec"]) for d in docs if d["kind"] in ("Deployment", "Job")]


def serve_parser(environ: dict[str, str]) -> argparse.ArgumentParser:
    return add_serve_arguments(argparse.ArgumentParser(prog="vaegan serve", exit_on_error=False), environ)


def serve_env_names() -> set[str]:
    """Every ``VAEGAN_*`` name ``vaegan serve`` reads: one per flag of the real parser."""
    parser = serve_parser({"VAEGAN_MODEL": "x"})
    return {env_name(o) for a in parser._actions for o in a.option_strings if o.startswith("--") and o != "--help"}


def container_env(docs: list[Doc], container: Doc) -> dict[str, str]:
    """The environment a container starts with: its ConfigMaps (envFrom), then its own env."""
    env: dict[str, str] = {}
    for src in container.get("envFrom", []):
        env.update(one(docs, "ConfigMap", src["configMapRef"]["name"])["data"])
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return env


def serving(docs: list[Doc]) -> tuple[Doc, Doc, ServiceConfig]:
    """(Deployment, its server container, the ServiceConfig its environment parses to)."""
    dep = one(docs, "Deployment")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    env = container_env(docs, c)
    try:
        args = serve_parser(env).parse_args(c.get("args", []))
        config = config_from_args(args)
    except (argparse.ArgumentError, SystemExit, ValueError) as e:  # a bad VAEGAN_* value, no --model
        pytest.fail(f"vaegan serve rejects the Deployment's settings: {e}")
    return dep, c, config


def selects(selector: Doc, labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, "only matchLabels selectors are checked here"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def resolve_port(container: Doc, port: int | str) -> int:
    if isinstance(port, int):
        return port
    (p,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return p


# ---- render and validate ------------------------------------------------------------------
def check_service_monitor(d: Doc) -> None:
    """The fields prometheus-operator needs of a ServiceMonitor (its CRD is not in the schemas)."""
    assert d["apiVersion"] == "monitoring.coreos.com/v1"
    assert d["metadata"]["name"]
    assert d["spec"]["selector"].get("matchLabels") or d["spec"]["selector"].get("matchExpressions")
    assert d["spec"]["endpoints"], "a ServiceMonitor without endpoints scrapes nothing"
    for ep in d["spec"]["endpoints"]:
        assert isinstance(ep.get("port"), str) or "targetPort" in ep, ep


def check_prometheus_rule(d: Doc) -> None:
    """The fields prometheus-operator (and Alertmanager routing) need of a PrometheusRule."""
    assert d["apiVersion"] == "monitoring.coreos.com/v1"
    assert d["metadata"]["name"]
    groups = d["spec"]["groups"]
    assert groups and len({g["name"] for g in groups}) == len(groups)
    for g in groups:
        assert g["rules"], g["name"]
        for r in g["rules"]:
            assert isinstance(r["expr"], str) and r["expr"].strip()
            assert ("alert" in r) != ("record" in r), r
            if "alert" in r:
                assert re.fullmatch(r"\d+[smh]", r["for"]), r["alert"]
                assert r["labels"]["severity"] in ("critical", "warning", "info"), r["alert"]
                assert r["annotations"]["summary"] and r["annotations"]["description"], r["alert"]


CRD_CHECKS = {"ServiceMonitor": check_service_monitor, "PrometheusRule": check_prometheus_rule}


@pytest.mark.parametrize(("path", "components"), TARGETS, ids=["+".join((p, *c)) for p, c in TARGETS])
def test_renders_and_validates(path: str, components: tuple[str, ...]) -> None:
    docs = render(path, components)
    kinds = Counter(d["kind"] for d in docs)
    if path.startswith("overlays/"):
        for kind in ("Deployment", "ConfigMap", "HorizontalPodAutoscaler", "PodDisruptionBudget",
                     "NetworkPolicy", "ServiceMonitor", "PrometheusRule"):
            assert kinds[kind] == 1, f"{path}: {kinds[kind]} {kind}"
        assert kinds["Service"] == 2, "a ClusterIP and a headless Service"
    else:
        assert kinds["Job"] == 1
    for d in docs:
        if d["kind"] in CRD_CHECKS:
            CRD_CHECKS[d["kind"]](d)
            continue
        try:
            kubernetes_validate.validate(d, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{path}: {d['kind']} {d['metadata']['name']} is not valid Kubernetes {K8S_VERSION}: {e.message}")


@pytest.mark.parametrize(("path", "components"), TARGETS, ids=["+".join((p, *c)) for p, c in TARGETS])
def test_pods_are_locked_down(path: str, components: tuple[str, ...]) -> None:
    """Every container (init containers too) as the "restricted" Pod Security Standard and the
    images want it: non-root 10001, read-only root, nothing to escalate, /tmp an emptyDir."""
    docs = render(path, components)
    for name, spec in pod_specs(docs):
        assert spec["automountServiceAccountToken"] is False, name
        pod_sc = spec.get("securityContext", {})
        volumes = {v["name"]: v for v in spec["volumes"]}
        for c in spec.get("initContainers", []) + spec["containers"]:
            sc = {**pod_sc, **c.get("securityContext", {})}
            where = f"{name}/{c['name']}"
            assert sc["runAsNonRoot"] is True and sc["runAsUser"] == USER, where
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"], where
            assert sc["seccompProfile"]["type"] == "RuntimeDefault", where
            tmp = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert len(tmp) == 1 and "emptyDir" in volumes[tmp[0]["name"]], f"{where}: /tmp must be an emptyDir"
            res = c["resources"]
            assert res["requests"]["cpu"] and res["requests"]["memory"] and res["limits"]["memory"], where


# ---- the serving Deployment against the server's code ---------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_settings_are_serve_flags(overlay: str) -> None:
    """Every VAEGAN_* variable is the env name of a real `vaegan serve` flag, and the whole
    environment parses with the server's parser into a valid ServiceConfig."""
    docs = render(overlay)
    _, c, cfg = serving(docs)
    env = container_env(docs, c)
    unknown = {k for k in env if k.startswith("VAEGAN_")} - serve_env_names()
    assert not unknown, f"{overlay}: not a vaegan serve setting: {sorted(unknown)}"
    assert str(cfg.model).startswith("/models/"), "the bundle lives on the models volume"
    for host in (cfg.host, cfg.metrics_host):  # probes, clients and Prometheus come from outside
        assert host.strip("[]") not in ("localhost", "127.0.0.1", "::1"), f"{host}: loopback only"
    assert any(m["mountPath"] == "/models" for m in c["volumeMounts"])
    # the thread defaults count the node's cores, not the pod's: they must be set for the pod
    cpus = float(c["resources"]["limits"]["cpu"])
    assert cfg.intra_op_threads >= 1 and cfg.decode_workers >= 1, "set VAEGAN_INTRA_OP_THREADS and VAEGAN_DECODE_WORKERS"
    assert cfg.intra_op_threads * cfg.model_instances <= cpus


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ports_and_probes_match_the_server(overlay: str) -> None:
    docs = render(overlay)
    dep, c, cfg = serving(docs)
    pod = dep["spec"]["template"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": cfg.port, "metrics": cfg.metrics_port}
    probes = [c[k] for k in ("startupProbe", "readinessProbe", "livenessProbe")]
    for probe in probes:  # native gRPC probes on grpc.health.v1, on a service the server reports
        assert probe["grpc"]["port"] == cfg.port
        assert probe["grpc"].get("service", "") in HEALTH_SERVICES
    assert c["readinessProbe"]["grpc"]["service"] == SERVICE_NAME
    # drain: the kubelet's SIGKILL comes after the preStop sleep and the server's grace
    sleep = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["spec"]["terminationGracePeriodSeconds"] > sleep + cfg.grace_seconds
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0

    services = [d for d in docs if d["kind"] == "Service"]
    for svc in services:
        assert selects({"matchLabels": svc["spec"]["selector"]}, pod["metadata"]["labels"]), svc["metadata"]["name"]
        for p in svc["spec"]["ports"]:
            assert resolve_port(c, p["targetPort"]) in (cfg.port, cfg.metrics_port)
    headless = [s for s in services if s["spec"].get("clusterIP") == "None"]
    assert len(headless) == 1 and [resolve_port(c, p["targetPort"]) for p in headless[0]["spec"]["ports"]] == [cfg.port]
    # the ServiceMonitor scrapes each pod once: through exactly one Service, on the metrics port
    sm = one(docs, "ServiceMonitor")
    scraped = [s for s in services if selects(sm["spec"]["selector"], s["metadata"]["labels"])]
    assert len(scraped) == 1
    (ep,) = sm["spec"]["endpoints"]
    (sp,) = [p for p in scraped[0]["spec"]["ports"] if p["name"] == ep["port"]]
    assert resolve_port(c, sp["targetPort"]) == cfg.metrics_port
    # NetworkPolicy: gRPC from labelled clients, metrics from the monitoring namespace, nothing else
    np_ = one(docs, "NetworkPolicy")
    assert selects(np_["spec"]["podSelector"], pod["metadata"]["labels"])
    rules = {resolve_port(c, p["port"]): r["from"] for r in np_["spec"]["ingress"] for p in r["ports"]}
    assert set(rules) == {cfg.port, cfg.metrics_port}
    assert any(f.get("podSelector", {}).get("matchLabels", {}).get("vaegan-client") == "true" for f in rules[cfg.port])
    monitoring = {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
    assert rules[cfg.metrics_port] == [{"namespaceSelector": monitoring}]
    # PDB, HPA and topology spread point at these pods
    assert selects(one(docs, "PodDisruptionBudget")["spec"]["selector"], pod["metadata"]["labels"])
    hpa = one(docs, "HorizontalPodAutoscaler")
    target = {"apiVersion": "apps/v1", "kind": "Deployment", "name": dep["metadata"]["name"]}
    assert hpa["spec"]["scaleTargetRef"] == target
    assert any(m["type"] == "Resource" and m["resource"]["name"] == "cpu" for m in hpa["spec"]["metrics"])
    assert hpa["spec"]["minReplicas"] >= 2 and "replicas" not in dep["spec"]
    for tsc in pod["spec"]["topologySpreadConstraints"]:
        assert selects(tsc["labelSelector"], pod["metadata"]["labels"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_service_links_clash_with_settings(overlay: str) -> None:
    """Kubernetes injects <SERVICE>_PORT=tcp://... for every Service of the namespace: the
    Service "vaegan" would set VAEGAN_PORT, which `vaegan serve` reads as --port."""
    docs = render(overlay)
    links: set[str] = set()
    for svc in (d for d in docs if d["kind"] == "Service"):
        prefix = svc["metadata"]["name"].upper().replace("-", "_")
        links |= {f"{prefix}_SERVICE_HOST", f"{prefix}_SERVICE_PORT", f"{prefix}_PORT"}
        links |= {f"{prefix}_PORT_{p['port']}_TCP" for p in svc["spec"]["ports"]}
    if links & serve_env_names():
        for name, spec in pod_specs(docs):
            assert spec.get("enableServiceLinks") is False, f"{name}: {sorted(links & serve_env_names())}"


def test_gpu_overlay() -> None:
    docs = render("overlays/gpu")
    dep, c, cfg = serving(docs)
    spec = dep["spec"]["template"]["spec"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in spec["tolerations"])
    assert spec.get("nodeSelector") or spec.get("affinity", {}).get("nodeAffinity")
    assert c["image"].split("/")[-1].split(":")[0] == "vaegan-serve-gpu"
    assert cfg.providers in ("cuda", "tensorrt")  # never a silent CPU fallback on a GPU pod
    _, cpu_c, cpu_cfg = serving(render("overlays/cpu"))
    assert cpu_c["image"].split("/")[-1].split(":")[0] == "vaegan-serve"
    assert cpu_cfg.providers == "cpu" and "nvidia.com/gpu" not in cpu_c["resources"]["limits"]


def test_bundle_from_oci_component() -> None:
    """The init-container alternative: no PVC, the models volume an emptyDir that the init
    container writes and the server reads."""
    docs = render("overlays/cpu", ("components/bundle-from-oci",))
    assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    dep, c, cfg = serving(docs)
    spec = dep["spec"]["template"]["spec"]
    (models,) = [v for v in spec["volumes"] if v["name"] == "models"]
    assert set(models) == {"name", "emptyDir"}
    (init,) = spec["initContainers"]
    writes = [m["mountPath"] for m in init["volumeMounts"] if m["name"] == "models" and not m.get("readOnly")]
    assert writes and any(str(cfg.model).startswith(w) for w in writes)
    assert any(str(cfg.model) in a for a in init["args"]), "the init container fills the path VAEGAN_MODEL serves"


# ---- metrics: alerts, dashboard, autoscaling ----------------------------------------------
@pytest.fixture(scope="module")
def scrape(tiny_bundle: Path) -> tuple[set[str], dict[str, set[str]]]:
    """(sample names, {label name: values}) of a real server's /metrics after one Score."""
    from vaegan.service.client import OutlierClient

    cfg = ServiceConfig(model=tiny_bundle, host="127.0.0.1", port=0, metrics_host="127.0.0.1", metrics_port=0)
    with ServerThread(cfg) as srv, OutlierClient(srv.target) as client:
        client.score([np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)])
        deadline = time.monotonic() + 10
        while True:  # the call is booked a moment after the client has its answer
            with urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10) as r:
                text = r.read().decode()
            names: set[str] = set()
            labels: dict[str, set[str]] = {}
            for family in text_string_to_metric_families(text):
                for s in family.samples:
                    names.add(s.name)
                    for k, v in s.labels.items():
                        labels.setdefault(k, set()).add(v)
            if "vaegan_requests_total" in names or time.monotonic() > deadline:
                return names, labels
            time.sleep(0.05)


def prometheus_rule() -> Doc:
    return one(render(OVERLAYS[0]), "PrometheusRule")


def dashboard_exprs() -> dict[str, str]:
    """{panel/refId: PromQL} of every dashboard query, Grafana variables substituted."""
    board = json.loads(DASHBOARD.read_text())
    values = dict(GRAFANA_BUILTINS)
    for v in board["templating"]["list"]:  # a textbox's default; any value for the others
        values[v["name"]] = v["query"] if v["type"] == "textbox" else "x"
    exprs = {}
    for panel in board["panels"]:
        for t in panel.get("targets", []):
            expr = re.sub(r"\$\{?(\w+)\}?", lambda m: values[m.group(1)], t["expr"])
            exprs[f"{panel['title']}/{t['refId']}"] = expr
    for v in board["templating"]["list"]:
        if v["type"] == "query":
            m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", v["query"]["query"])
            assert m, v["query"]
            exprs[f"variable {v['name']}"] = re.sub(r"\$(\w+)", lambda m: values[m.group(1)], m.group(1))
    return exprs


def promql_names(expr: str) -> tuple[set[str], set[str], list[tuple[str, str]]]:
    """(metric names, label names, (label, value) of equality/regex matchers) in ``expr``."""
    metrics = set(re.findall(r"\b(vaegan_\w+)", expr))
    matchers = re.findall(r"(\w+)\s*(?:=~|!~|!=|=)\s*\"([^\"]*)\"", expr)
    grouped = {g.strip() for m in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr) for g in m.split(",") if g.strip()}
    return metrics, {k for k, _ in matchers} | grouped, matchers


def check_promql(where: str, expr: str, scraped: tuple[set[str], dict[str, set[str]]]) -> None:
    names, labels = scraped
    metrics, used_labels, matchers = promql_names(expr)
    assert metrics or expr.startswith("vector("), f"{where}: no vaegan metric in {expr!r}"
    assert metrics <= names, f"{where}: not exported by the server: {sorted(metrics - names)}"
    unknown = used_labels - set(labels) - TARGET_LABELS - {"le"}
    assert not unknown, f"{where}: labels the server does not export: {sorted(unknown)}"
    known = {"method": {m.name for m in SERVICE.methods}, "code": {c.name for c in grpc.StatusCode}}
    for label, value in matchers:
        if label in known:
            assert set(value.split("|")) <= known[label], f"{where}: {label}={value!r}"


def test_alerts_use_exported_metrics(scrape: tuple[set[str], dict[str, set[str]]]) -> None:
    for g in prometheus_rule()["spec"]["groups"]:
        for r in g["rules"]:
            check_promql(r.get("alert") or r["record"], r["expr"], scrape)


def test_dashboard_uses_exported_metrics(scrape: tuple[set[str], dict[str, set[str]]]) -> None:
    exprs = dashboard_exprs()
    for where, expr in exprs.items():
        assert "$" not in expr, f"{where}: an unknown Grafana variable in {expr!r}"
        check_promql(where, expr, scrape)
    # and every metric the server exports has a panel
    shown = set().union(*(promql_names(e)[0] for e in exprs.values()))
    families = {re.sub(r"_(bucket|sum|count|created)$", "", n) for n in scrape[0] if n.startswith("vaegan_")}
    missing = {f for f in families if not any(s == f or s.startswith(f + "_") for s in shown)}
    assert not missing, f"exported but on no dashboard panel: {sorted(missing)}"


def test_autoscaling_on_in_flight(scrape: tuple[set[str], dict[str, set[str]]]) -> None:
    """components/hpa-in-flight: the HPA's Pods metric is the name prometheus-adapter gives a
    gauge the server really exports."""
    hpa = one(render(OVERLAYS[0], ("components/hpa-in-flight",)), "HorizontalPodAutoscaler")
    (pods,) = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    values = yaml.safe_load((K8S / "components/hpa-in-flight/prometheus-adapter-values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    assert rule["name"]["as"] == pods["metric"]["name"]
    check_promql("prometheus-adapter seriesQuery", rule["seriesQuery"], scrape)


def promtool(*args: str, cwd: Path) -> None:
    out = subprocess.run([need("promtool"), *args], capture_output=True, text=True, cwd=cwd)
    assert out.returncode == 0, f"promtool {' '.join(args)}:\n{out.stdout}\n{out.stderr}"


def test_promtool_checks_the_rules(tmp_path: Path) -> None:
    Path(tmp_path, "rules.yaml").write_text(yaml.safe_dump({"groups": prometheus_rule()["spec"]["groups"]}))
    promtool("check", "rules", "rules.yaml", cwd=tmp_path)


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """Each dashboard query as a recording rule: promtool parses every one."""
    rules = [{"record": f"dashboard:query_{i}", "expr": e} for i, e in enumerate(dashboard_exprs().values())]
    Path(tmp_path, "dashboard.yaml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    promtool("check", "rules", "dashboard.yaml", cwd=tmp_path)


def _series(name: str, per_minute: float, **labels: str) -> Doc:
    sel = ", ".join(f'{k}="{v}"' for k, v in {"namespace": "vaegan", **labels}.items())
    return {"series": f"{name}{{{sel}}}", "values": f"0+{per_minute}x120"}


def test_alerts_fire_when_they_should(tmp_path: Path) -> None:
    """promtool unit tests: each alert fires on its bad case and stays quiet on a healthy one.
    Jobs (one per case) keep the cases apart; 10 requests/s of traffic."""
    groups = prometheus_rule()["spec"]["groups"]
    for g in groups:  # annotations render $value: their text is checked by `check rules` above
        for r in g["rules"]:
            r.pop("annotations", None)
    Path(tmp_path, "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    severity = {r["alert"]: r["labels"]["severity"] for g in groups for r in g["rules"] if "alert" in r}
    req, img, out = "vaegan_requests_total", "vaegan_images_total", "vaegan_outliers_total"
    lat = "vaegan_request_duration_seconds"

    def latency(job: str, le_hit: str) -> list[Doc]:  # every Score call in the bucket le_hit
        return [_series(f"{lat}_bucket", 600 if float(le) >= float(le_hit) else 0, job=job, method="Score", le=le)
                for le in ("0.05", "0.25", "0.5", "+Inf")]

    series = [
        # server faults: 9% INTERNAL fires; 0.2% does not
        _series(req, 600, job="faults", method="Score", code="OK"),
        _series(req, 60, job="faults", method="Score", code="INTERNAL"),
        _series(req, 600, job="rare-faults", method="Score", code="OK"),
        _series(req, 1, job="rare-faults", method="Score", code="INTERNAL"),
        # refusals: 17% RESOURCE_EXHAUSTED fires; 33% INVALID_ARGUMENT (the client's fault) does not
        _series(req, 600, job="overload", method="Score", code="OK"),
        _series(req, 120, job="overload", method="Score", code="RESOURCE_EXHAUSTED"),
        _series(req, 600, job="bad-clients", method="Score", code="OK"),
        _series(req, 300, job="bad-clients", method="Score", code="INVALID_ARGUMENT"),
        # latency: every call in the 0.25-0.5 s bucket fires; in the 50 ms one does not
        *latency("slow", "0.5"), *latency("fast", "0.05"),
        # drift: 10% flagged at a 1% target fires; 1% does not; 50% of 6 images a minute is too few
        _series(img, 600, job="drift", method="Score"), _series(out, 60, job="drift"),
        _series(img, 600, job="normal", method="Score"), _series(out, 6, job="normal"),
        _series(img, 6, job="quiet", method="Score"), _series(out, 3, job="quiet"),
    ]
    fires = {"VaeganServerErrors": "faults", "VaeganRequestsFailing": "overload",
             "VaeganHighLatencyP99": "slow", "VaeganOutlierRateDrift": "drift"}
    assert set(fires) == set(severity), "a new alert needs a case here"
    tests = {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": series,
            "alert_rule_test": [
                {"eval_time": "100m", "alertname": a,
                 "exp_alerts": [{"exp_labels": {"severity": severity[a], "namespace": "vaegan", "job": job}}]}
                for a, job in fires.items()
            ],
        }],
    }
    Path(tmp_path, "tests.yaml").write_text(yaml.safe_dump(tests))
    promtool("test", "rules", "tests.yaml", cwd=tmp_path)


# ---- the ConfigMap really serves ------------------------------------------------------------
def test_configured_server_serves_and_drains_in_time(tmp_path: Path, tiny_bundle: Path) -> None:
    """`vaegan serve` with the CPU overlay's environment (bundle and ports swapped for the
    test's): SERVING on the probes' health services, and after SIGTERM it exits 0 well inside
    the pod's termination grace period."""
    docs = render("overlays/cpu")
    dep, c, cfg = serving(docs)
    ready = tmp_path / "ready.json"
    env = {**os.environ, **container_env(docs, c), "VAEGAN_MODEL": str(tiny_bundle), "VAEGAN_PORT": "0",
           "VAEGAN_METRICS_PORT": "0", "VAEGAN_READY_FILE": str(ready)}
    proc = subprocess.Popen([sys.executable, "-m", "vaegan", "serve"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "not SERVING within 60 s"
            time.sleep(0.05)
        port = json.loads(ready.read_text())["port"]
        with grpc.insecure_channel(f"localhost:{port}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                reply = stub.Check(health_pb2.HealthCheckRequest(service=c[probe]["grpc"].get("service", "")), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING, probe
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        pod = dep["spec"]["template"]["spec"]
        budget = pod["terminationGracePeriodSeconds"] - c["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert proc.wait(timeout=budget) == 0
        assert time.monotonic() - t0 < cfg.grace_seconds
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---- batch Jobs ----------------------------------------------------------------------------
def job(path: str) -> tuple[Doc, Doc]:
    (j,) = [d for d in render(path) if d["kind"] == "Job"]
    (c,) = j["spec"]["template"]["spec"]["containers"]
    return j, c


def local_command(j: Doc, c: Doc, volumes_root: Path) -> list[str]:
    """The container's `vaegan` arguments with each mounted path moved under ``volumes_root``:
    one folder per PVC (by claim) and subPath, so two Jobs on one claim share the folder."""
    assert c["command"] == ["vaegan"]
    vols = {v["name"]: v for v in j["spec"]["template"]["spec"]["volumes"]}
    mounts = {}
    for m in c["volumeMounts"]:
        v = vols[m["name"]]
        pvc = v.get("persistentVolumeClaim")
        key = pvc["claimName"] if pvc else f"{j['metadata']['name']}-{m['name']}"
        mounts[m["mountPath"]] = volumes_root / key / m.get("subPath", "")
    out = []
    for arg in c["args"]:
        root = max((p for p in mounts if arg == p or arg.startswith(p + "/")), key=len, default=None)
        out.append(arg if root is None else str(mounts[root]) + arg[len(root):])
    return out


def test_indexed_job_covers_every_input_once_and_merge_joins(
    tmp_path: Path, tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    from PIL import Image

    from vaegan import cli
    from vaegan.service.batch.table import shard_path

    j, c = job("jobs/score")
    spec = j["spec"]
    n = spec["completions"]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert spec["completionMode"] == "Indexed" and n >= 2
    assert 1 <= spec["parallelism"] <= n and spec["backoffLimitPerIndex"] >= 1
    assert env["VAEGAN_NUM_SHARDS"] == str(n), "every index must know the number of shards"
    assert spec["template"]["spec"]["restartPolicy"] == "Never"
    fail_index = {code for r in spec["podFailurePolicy"]["rules"] if r["action"] == "FailIndex"
                  for code in r["onExitCodes"]["values"]}
    assert fail_index == {cli.EXIT_USAGE, cli.EXIT_PARTIAL}, "no retries for what a retry cannot fix"
    assert "--shard-index" not in c["args"] and "--num-shards" not in c["args"]
    assert "--resume" in c["args"], "a retried index must go on from what its predecessor committed"

    args = local_command(j, c, tmp_path / "volumes")
    a = cli.build_parser().parse_args(args)
    # the models volume holds the tiny bundle as version 1; the inputs volume a tree of PNGs
    a.model.mkdir(parents=True)
    (a.model / "1").symlink_to(tiny_bundle, target_is_directory=True)
    (inputs,) = a.inputs
    rng = np.random.default_rng(0)
    ids = []
    for k in range(36):
        rel = Path(f"line{k % 3}", f"cam{k % 2}", f"img{k:03d}.png")
        Path(inputs, rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (24 + k, 40, 3), dtype=np.uint8)).save(Path(inputs, rel))
        ids.append(rel.as_posix())
    a.out.parent.mkdir(parents=True, exist_ok=True)

    for var, value in env.items():
        monkeypatch.setenv(var, value)
    for index in range(n):  # what the Job controller does: one pod per index
        monkeypatch.setenv("JOB_COMPLETION_INDEX", str(index))
        assert cli.main(args) == 0, f"index {index}"
    shards = [shard_path(a.out, i, n) for i in range(n)]
    seen = Counter(i for s in shards for i in pq.read_table(s, columns=["id"]).column("id").to_pylist())
    assert seen == Counter(ids), "every input exactly once over the shards"

    mj, mc = job("jobs/merge")
    margs = local_command(mj, mc, tmp_path / "volumes")
    assert margs[0] == "score-merge" and margs[2:] == [str(s) for s in shards], "the merge joins exactly the shard files"
    assert cli.main(margs) == 0
    merged = pq.read_table(margs[1])
    assert merged.column("id").to_pylist() == sorted(ids)
    assert merged.column("error").null_count == len(ids)


def test_training_job_runs_vaegan_train_under_torchrun() -> None:
    from vaegan import cli

    j, c = job("jobs/train")
    args = c["args"]
    assert c["command"] == ["torchrun"] and "--standalone" in args
    m = args.index("-m")
    assert args[m + 1] == "vaegan"
    gpus = int(c["resources"]["limits"]["nvidia.com/gpu"])
    assert int(args[args.index("--nproc-per-node") + 1]) == gpus, "one process per GPU"
    try:
        a = cli.build_parser().parse_args(args[m + 2:])
    except SystemExit:
        pytest.fail(f"vaegan rejects the training Job's arguments {args[m + 2:]}")
    assert a.command == "train" and a.device == "cuda"
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert not mounts["/runs"].get("readOnly") and a.out.is_relative_to("/runs")
    assert a.data_root.is_relative_to("/data")
    spec = j["spec"]["template"]["spec"]
    assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    shm = {v["name"]: v for v in spec["volumes"]}[mounts["/dev/shm"]["name"]]
    assert shm["emptyDir"]["medium"] == "Memory", "NCCL needs more than the default 64 MiB /dev/shm"

