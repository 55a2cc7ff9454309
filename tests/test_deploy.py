"""The deployment artefacts, checked offline with the real tools: Helm's Go library renders and lints the chart,
kubernetes-validate holds every object to the Kubernetes 1.31 schemas, checkov audits the rendered manifests,
hadolint the Dockerfile, promtool the alerts (and their unit tests) and every PromQL query of the dashboard.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import asyncpg
import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from devstack import processes
from shared import metrics
from shared.config import SETTINGS_DOC
from tests.conftest import SECRETS_KEY
from tests.support import natsauth

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "routstr-node"
ALERTS = DEPLOY / "prometheus" / "alerts.yaml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts_test.yaml"
DASHBOARD = DEPLOY / "grafana" / "routstr-node.json"
KUBE_VERSION = "1.31.0"
SERVICES = {"gateway": "PORT", "billing": "BILLING_PORT", "wallet": "WALLET_PORT", "discovery": "DISCOVERY_PORT"}
SECRETS = {name for name, (_, _, secret) in SETTINGS_DOC.items() if secret}
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


# What a working node needs (the schema refuses to render without it); merged under every variant.
WORKING = {
    "config": {"NATS_URL": "nats://nats.nats.svc:4222", "CASHU_MINTS": "https://mint.example.com",
               "UPSTREAM_BASE_URL": "https://api.openai.com/v1"},
    "secrets": {"DATABASE_URL": "postgresql://routstr@db/routstr"},
}  # fmt: skip


def _merged(base: dict, values: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in values.items():
        nested = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merged(merged[key], value) if nested else value
    return merged


EVERYTHING_ON = {
    "ingress": {
        "enabled": True,
        "className": "nginx",
        "hosts": [{"host": "node.example.org", "paths": [{"path": "/", "pathType": "Prefix"}]}],
        "tls": [{"secretName": "node-tls", "hosts": ["node.example.org"]}],
    },
    "metrics": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}},
    "models": {"json": '{"models": []}'},
    "image": {"digest": "sha256:" + "ab" * 32},
    "networkPolicy": {"metricsFrom": []},
}
EVERYTHING_OFF = {
    "autoscaling": {"enabled": False},
    "podDisruptionBudget": {"enabled": False},
    "networkPolicy": {"enabled": False},
    "migrations": {"enabled": False},
    "serviceAccount": {"create": False},
    "metrics": {"podAnnotations": False},
    "existingSecret": "operator-secret",
}
VARIANTS = {
    "default": WORKING,
    "production": _load(CHART / "examples" / "production.yaml"),
    "everything-on": _merged(WORKING, EVERYTHING_ON),
    "everything-off": _merged(WORKING, EVERYTHING_OFF),
}


def render(values: dict) -> list[dict]:
    """Every object the chart renders with these values (chart defaults underneath, as `helm install -f`)."""
    with helm.Chart.load(CHART) as chart:
        files = chart.render(values=copy.deepcopy(values), name="node", namespace="routstr", is_install=True)
    objects = []
    for path, text in sorted(files.items()):
        if path.endswith(".txt"):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


@pytest.fixture(scope="module", params=list(VARIANTS))
def rendered(request) -> tuple[str, list[dict]]:
    return request.param, render(VARIANTS[request.param])


def by_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def deployments(objects: list[dict]) -> dict[str, dict]:
    found = by_kind(objects, "Deployment")
    return {service: found[f"node-routstr-node-{service}"] for service in SERVICES}


def tool(name: str) -> str:
    """A tool `make test` installs: the project venv, the tools venv or the system (promtool)."""
    for folder in (Path(sys.executable).parent, ROOT / ".venv-tools" / "bin"):
        if (folder / name).exists():
            return str(folder / name)
    found = shutil.which(name)
    assert found, f"{name} is missing: run `make test` (it installs the tools)"
    return found


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300)


# --- the chart ---------------------------------------------------------------------------------------------


def test_every_object_validates_against_kubernetes_schemas(rendered):
    _, objects = rendered
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "Service", "ConfigMap"} <= kinds
    for obj in objects:
        if obj["kind"] in CRD_KINDS:
            continue  # CRDs: no published schema offline; their content is checked by the tests below
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


def test_validation_catches_a_bad_object():
    deployment = deployments(render(WORKING))["gateway"]
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["pathh"] = "/x"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSION, strict=True)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_helm_lint_strict(variant):
    report = helm.lint(CHART, copy.deepcopy(VARIANTS[variant]), strict=True, kube_version=f"v{KUBE_VERSION}")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems and not report["errors"], (problems, report["errors"])


@pytest.mark.parametrize(
    "values",
    [
        {"config": {"NATS_ULR": "nats://typo:4222"}},
        {"secrets": {"NATS_URL": "a secret that is not one"}},
        {"config": {"NSEC": "nsec1 in a ConfigMap"}},
        {"services": {"gateway": {"replicas": "two"}}},
        {"services": {"wallet": {"secretEnv": ["NATS_URL"]}}},
    ],
)
def test_values_schema_rejects_typos_and_misplaced_secrets(values):
    with pytest.raises(helm.HelmError, match="schema"):
        render(_merged(WORKING, values))


@pytest.mark.parametrize(
    "values",
    [
        {},  # the chart's defaults: no NATS, mint, upstream or database
        {
            "config": {"NATS_URL": "", "CASHU_MINTS": "https://m", "UPSTREAM_BASE_URL": "https://u"},
            "existingSecret": "s",
        },
        {"config": {"NATS_URL": "nats://n:4222", "CASHU_MINTS": "https://m"}, "existingSecret": "s"},  # no upstream
        {"config": {"NATS_URL": "nats://n:4222", "CASHU_MINTS": "https://m", "UPSTREAM_BASE_URL": "https://u"}},
        {**WORKING, "providers": [{"provider_type": "openai", "api_key": "sk-in-values"}]},  # keys go in Secrets
        {**WORKING, "providers": [{"provider_type": "azure"}]},
    ],
)
def test_chart_refuses_to_render_what_cannot_run(values):
    with pytest.raises(helm.HelmError, match="schema"):
        render(values)


def test_production_example_sells_priced_providers():
    """The production example names real, priced providers, their keys from a Secret given to billing."""
    values = VARIANTS["production"]
    objects = render(values)
    providers = yaml.safe_load(by_kind(objects, "ConfigMap")["node-routstr-node-providers"]["data"]["providers.yaml"])
    assert {p["provider_type"] for p in providers["providers"]} >= {"openai", "anthropic", "openrouter"}
    assert all("api_key" not in p and p["api_key_env"] for p in providers["providers"])
    config = by_kind(objects, "ConfigMap")["node-routstr-node"]["data"]
    assert config["PROVIDERS_PATH"] == "/etc/routstr-providers/providers.yaml"
    for service, deployment in deployments(objects).items():
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        mount = {"name": "providers", "mountPath": "/etc/routstr-providers", "readOnly": True}
        assert mount in container["volumeMounts"]
        env = {e["name"]: e for e in container.get("env", [])}
        assert ("OPENAI_API_KEY" in env) == (service == "billing")
    billing = deployments(objects)["billing"]["spec"]["template"]["spec"]["containers"][0]
    openai = {e["name"]: e for e in billing["env"]}["OPENAI_API_KEY"]
    assert openai["valueFrom"]["secretKeyRef"] == {"name": "provider-keys", "key": "openai"}


def test_helm_lint_fails_on_a_broken_chart(tmp_path):
    broken = tmp_path / "routstr-node"
    shutil.copytree(CHART, broken)
    (broken / "templates" / "broken.yaml").write_text("kind: ConfigMap\nmetadata: {{ .Values.nope.missing }}\n")
    report = helm.lint(broken, strict=True)
    assert report["errors"] or any(m["severity"] >= 2 for m in report["messages"])


def test_deployments_are_hardened_and_probed(rendered):
    name, objects = rendered
    values = VARIANTS[name]
    for service, deployment in deployments(objects).items():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["terminationGracePeriodSeconds"] >= 30
        [container] = pod["containers"]
        assert container["args"] == [f"services.{service}"]
        security = container["securityContext"]
        assert security["allowPrivilegeEscalation"] is False
        assert security["readOnlyRootFilesystem"] is True
        assert security["runAsNonRoot"] is True and security["runAsUser"] >= 10000
        assert security["capabilities"] == {"drop": ["ALL"]}
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}
        assert {"cpu", "memory"} <= set(container["resources"]["requests"])
        assert {"cpu", "memory"} <= set(container["resources"]["limits"])
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
        assert container["lifecycle"]["preStop"]["sleep"]["seconds"] > 0
        port = int(SETTINGS_DOC[SERVICES[service]][0])
        ports = [{"name": "http", "containerPort": port, "protocol": "TCP"}]
        if service == "gateway":  # /metrics apart from the public port
            ports.append({"name": "metrics", "containerPort": int(SETTINGS_DOC["METRICS_PORT"][0]), "protocol": "TCP"})
        assert container["ports"] == ports
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert "emptyDir" in volumes[mounts["/tmp"]]
        digest = values.get("image", {}).get("digest")
        assert container["image"].endswith(f"@{digest}" if digest else ":0.2.0")
    gateway = deployments(objects)["gateway"]["spec"]["template"]["spec"]
    upstream_timeout = int(SETTINGS_DOC["UPSTREAM_TIMEOUT"][0])
    assert gateway["terminationGracePeriodSeconds"] > upstream_timeout, "streams must be able to finish"


def test_grace_period_and_replicas_are_configurable():
    values = {"services": {"gateway": {"terminationGracePeriodSeconds": 900, "preStopSeconds": 20}}}
    values["services"]["wallet"] = {"replicas": 3}
    found = deployments(render(_merged(WORKING, values)))
    assert found["gateway"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 900
    assert found["gateway"]["spec"]["template"]["spec"]["containers"][0]["lifecycle"]["preStop"]["sleep"] == {
        "seconds": 20
    }
    assert found["wallet"]["spec"]["replicas"] == 3


def test_secrets_reach_pods_only_from_secrets(rendered):
    name, objects = rendered
    for configmap in by_kind(objects, "ConfigMap").values():
        assert not SECRETS & set(configmap.get("data", {})), "a secret variable is in a ConfigMap"
    pods = [d["spec"]["template"]["spec"] for d in deployments(objects).values()]
    pods += [j["spec"]["template"]["spec"] for j in by_kind(objects, "Job").values()]
    for pod in pods:
        for container in pod["containers"] + pod.get("initContainers", []):
            for env in container.get("env", []):
                if env["name"] in SECRETS:
                    assert "value" not in env and "secretKeyRef" in env["valueFrom"], env
    secrets = by_kind(objects, "Secret")
    if VARIANTS[name].get("existingSecret"):
        assert "node-routstr-node" not in secrets
        gateway = deployments(objects)["gateway"]["spec"]["template"]["spec"]["containers"][0]
        refs = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in gateway["env"] if e["name"] in SECRETS}
        nats = VARIANTS[name].get("natsAuth", {}).get("existingSecret")
        assert refs.pop("NATS_PASSWORD", nats) == nats  # each service's own NATS password, from its Secret
        assert set(refs.values()) == {VARIANTS[name]["existingSecret"]}
    else:
        assert set(secrets["node-routstr-node"]["stringData"]) == SECRETS


def test_secret_ref_takes_database_url_from_cloudnativepg():
    objects = render(VARIANTS["production"])
    for service in ("billing", "wallet", "discovery"):
        env = deployments(objects)[service]["spec"]["template"]["spec"]["containers"][0]["env"]
        [database] = [e for e in env if e["name"] == "DATABASE_URL"]
        assert database["valueFrom"]["secretKeyRef"] == {"name": "routstr-db-app", "key": "uri"}
    job = by_kind(objects, "Job")["node-routstr-node-migrate"]["spec"]["template"]["spec"]
    for container in job["initContainers"] + job["containers"]:
        [database] = [e for e in container["env"] if e["name"] == "DATABASE_URL"]
        assert database["valueFrom"]["secretKeyRef"]["name"] == "routstr-db-app"


def test_config_values_reach_the_configmap():
    values = {"config": {"NATS_URL": "nats://nats.nats:4222", "USAGE_STREAM_REPLICAS": 3}}
    data = by_kind(render(_merged(WORKING, values)), "ConfigMap")["node-routstr-node"]["data"]
    assert data["NATS_URL"] == "nats://nats.nats:4222"
    assert data["USAGE_STREAM_REPLICAS"] == "3"
    assert set(data) == set(SETTINGS_DOC) - SECRETS


def test_migrations_run_as_a_hook_before_install_and_upgrade(rendered):
    name, objects = rendered
    jobs = by_kind(objects, "Job")
    if VARIANTS[name].get("migrations", {}).get("enabled") is False:
        assert not jobs
        return
    job = jobs["node-routstr-node-migrate"]
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    pod = job["spec"]["template"]["spec"]
    steps = [c["args"] for c in pod.get("initContainers", []) + pod["containers"]]
    assert steps == [["services.billing", "migrate"], ["services.wallet", "migrate"], ["services.discovery", "migrate"]]
    assert pod["restartPolicy"] == "Never"
    # A hook runs before the release's own Secret exists: whatever Secret it reads must exist by then.
    refs = {
        e["valueFrom"]["secretKeyRef"]["name"]
        for c in pod.get("initContainers", []) + pod["containers"]
        for e in c["env"]
        if "valueFrom" in e
    }
    hook_secrets = {
        s["metadata"]["name"]
        for s in by_kind(objects, "Secret").values()
        if "helm.sh/hook" in s["metadata"].get("annotations", {})
    }
    values = VARIANTS[name]
    external = {values.get("existingSecret")} | {r["name"] for r in values.get("secretRefs", {}).values()}
    assert refs <= hook_secrets | external, refs


def test_network_policies_let_only_the_gateway_take_traffic(rendered):
    name, objects = rendered
    policies = by_kind(objects, "NetworkPolicy")
    if VARIANTS[name].get("networkPolicy", {}).get("enabled") is False:
        assert not policies
        return
    for service in [*SERVICES, "migrate"]:
        spec = policies[f"node-routstr-node-{service}"]["spec"]
        assert spec["policyTypes"] == ["Ingress", "Egress"]
        assert spec["egress"] == [{}], "egress stays open to NATS, Postgres, upstreams, mints and relays"
        if service == "gateway":
            assert [p["port"] for p in spec["ingress"][0]["ports"]] == ["http"]
            assert all(rule["from"] for rule in spec["ingress"][1:]), "the metrics port is for Prometheus only"
        elif service == "migrate" or not spec["ingress"]:
            assert spec["ingress"] == []
        else:
            [rule] = spec["ingress"]
            assert rule["from"], "an empty `from` would admit everyone"
            assert rule["ports"] == [{"port": "http", "protocol": "TCP"}]


def test_gateway_service_ingress_and_autoscaling():
    objects = render(VARIANTS["production"])
    ingress = by_kind(objects, "Ingress")["node-routstr-node"]
    assert ingress["spec"]["tls"][0]["hosts"] == ["node.example.com"]
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": "node-routstr-node-gateway", "port": {"name": "http"}}
    hpa = by_kind(objects, "HorizontalPodAutoscaler")["node-routstr-node-gateway"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "node-routstr-node-gateway"
    assert "replicas" not in deployments(objects)["gateway"]["spec"], "the HPA owns the gateway's replicas"
    for service, deployment in deployments(objects).items():
        if service != "gateway":
            assert deployment["spec"]["replicas"] >= 2, f"{service} is not highly available"
    assert hpa["spec"]["minReplicas"] >= 2
    assert set(by_kind(objects, "PodDisruptionBudget")) == {f"node-routstr-node-{s}" for s in SERVICES}
    assert by_kind(objects, "ServiceMonitor") and by_kind(objects, "PrometheusRule")
    services = by_kind(objects, "Service")
    assert {s: services[f"node-routstr-node-{s}"]["spec"]["type"] for s in SERVICES} == dict.fromkeys(
        SERVICES, "ClusterIP"
    )


def test_prometheus_scraping(rendered):
    name, objects = rendered
    for service, deployment in deployments(objects).items():
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        if VARIANTS[name].get("metrics", {}).get("podAnnotations", True):
            assert annotations["prometheus.io/scrape"] == "true"
            port = SETTINGS_DOC["METRICS_PORT" if service == "gateway" else SERVICES[service]][0]
            assert annotations["prometheus.io/port"] == port
            assert annotations["prometheus.io/path"] == "/metrics"
        else:
            assert "prometheus.io/scrape" not in annotations
    for monitor in by_kind(objects, "ServiceMonitor").values():
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
        assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
        labels = monitor["spec"]["selector"]["matchLabels"]
        for service in by_kind(objects, "Service").values():
            assert labels.items() <= service["metadata"]["labels"].items()


def test_prometheus_rule_carries_the_alerts_file(tmp_path):
    objects = render(VARIANTS["everything-on"])
    [rule] = by_kind(objects, "PrometheusRule").values()
    assert rule["spec"]["groups"] == _load(ALERTS)["groups"]
    extracted = tmp_path / "rule.yaml"
    extracted.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    result = run(tool("promtool"), "check", "rules", str(extracted))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_copy_in_chart_is_identical():
    assert (CHART / "files" / "alerts.yaml").read_bytes() == ALERTS.read_bytes(), (
        "copy deploy/prometheus/alerts.yaml to deploy/helm/routstr-node/files/alerts.yaml"
    )


CHECKOV_ALLOWED = {
    # Deliberate: documented in deploy/README.md.
    "CKV_K8S_15": "pull policy IfNotPresent: tags are immutable releases; set image.digest to pin",
    "CKV_K8S_35": "the node reads its settings from the environment (twelve-factor), fed from a Secret",
    "CKV_K8S_43": "image digest: set image.digest in production (the everything-on variant does)",
}
# The checks the brief names (probes, resources, privilege, root, capabilities, service-account tokens) and
# their neighbours; each must have run and passed on every workload.
CHECKOV_REQUIRED = {
    "CKV_K8S_8", "CKV_K8S_9",  # liveness, readiness
    "CKV_K8S_10", "CKV_K8S_11", "CKV_K8S_12", "CKV_K8S_13",  # cpu/memory requests and limits
    "CKV_K8S_16", "CKV_K8S_20", "CKV_K8S_17", "CKV_K8S_18", "CKV_K8S_19",  # privilege, host namespaces
    "CKV_K8S_23", "CKV_K8S_40", "CKV_K8S_22",  # root, high UID, read-only root filesystem
    "CKV_K8S_25", "CKV_K8S_28", "CKV_K8S_37", "CKV_K8S_39",  # capabilities
    "CKV_K8S_38",  # service-account tokens
    "CKV_K8S_31",  # seccomp
}  # fmt: skip


def test_checkov_passes_on_rendered_manifests(rendered, tmp_path):
    name, objects = rendered
    (tmp_path / "manifests.yaml").write_text(yaml.safe_dump_all(objects))
    result = run(tool("checkov"), "-d", str(tmp_path), "--framework", "kubernetes", "-o", "json")
    assert result.stdout.strip(), result.stderr
    report = json.loads(result.stdout)
    failed = {(c["check_id"], c["resource"]) for c in report["results"]["failed_checks"]}
    allowed = set(CHECKOV_ALLOWED)
    if VARIANTS[name].get("networkPolicy", {}).get("enabled") is False:
        allowed.add("CKV2_K8S_6")  # pods without a NetworkPolicy: what switching them off means
    unexpected = sorted(f for f in failed if f[0] not in allowed)
    assert not unexpected, unexpected
    passed = {c["check_id"] for c in report["results"]["passed_checks"]}
    assert CHECKOV_REQUIRED <= passed, CHECKOV_REQUIRED - passed
    if name == "everything-on":
        assert not {f for f in failed if f[0] == "CKV_K8S_43"}


def test_checkov_catches_a_privileged_container(tmp_path):
    deployment = deployments(render(WORKING))["gateway"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["securityContext"].update(privileged=True, allowPrivilegeEscalation=True)
    del container["livenessProbe"]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(deployment))
    result = run(tool("checkov"), "-d", str(tmp_path), "--framework", "kubernetes", "-o", "json")
    failed = {c["check_id"] for c in json.loads(result.stdout)["results"]["failed_checks"]}
    assert {"CKV_K8S_8", "CKV_K8S_16", "CKV_K8S_20"} <= failed


# --- the image ---------------------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint():
    result = run(tool("hadolint"), "--failure-threshold", "style", "deploy/Dockerfile")
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN apt-get update && apt-get install -y curl\nRUN pip install requests\n")
    result = run(tool("hadolint"), "--failure-threshold", "style", str(bad))
    assert result.returncode != 0 and "DL3006" in result.stdout


def test_dockerfile_shape():
    text = (DEPLOY / "Dockerfile").read_text()
    instructions = [line.split(None, 1) for line in text.splitlines() if line and not line.startswith((" ", "#"))]
    froms = [args for op, args in instructions if op == "FROM"]
    assert len(froms) >= 2, "multi-stage"
    assert all(f.split()[0] == "python:3.11-slim-bookworm" for f in froms)
    final = text[text.rindex("\nFROM ") :]
    assert re.search(r"^USER \d+:\d+$", final, re.M), "the final stage runs as a numeric non-root user"
    assert "HEALTHCHECK" not in [op for op, _ in instructions]
    assert not re.search(r"^(ARG|ENV) .*(PASSWORD|NSEC|API_KEY|DATABASE_URL|SECRET)", text, re.M)
    assert "--from=build" in final and "pip install" not in final
    ignore = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if not line.startswith("#")]
    assert ignore[0] == "*", "the build context admits only what the image needs"
    assert {"!pyproject.toml", "!shared/", "!services/", "**/.env"} <= set(ignore)
    copied = {args.split()[0] for op, args in instructions if op == "COPY" and not args.startswith("--")}
    assert copied == {"pyproject.toml", "shared", "services"}


# --- alerts and dashboard ----------------------------------------------------------------------------------


def _metric_names() -> set[str]:
    """Every series name the node exports, from the metric classes themselves."""
    registry = CollectorRegistry()
    for cls in (metrics.GatewayMetrics, metrics.BillingMetrics, metrics.WalletMetrics, metrics.DiscoveryMetrics):
        cls(registry)
    names = set()
    for family in registry.collect():
        names.add(family.name)
        suffixes = {
            "counter": ("_total",),
            "histogram": ("_bucket", "_count", "_sum"),
        }.get(family.type, ())
        names.update(family.name + suffix for suffix in suffixes)
    return names


def _series_in(expr: str) -> set[str]:
    return set(re.findall(r"\b(routstr_[a-z0-9_]+)", expr))


def _alert_rules() -> list[dict]:
    return [rule for group in _load(ALERTS)["groups"] for rule in group["rules"]]


def test_promtool_checks_the_alert_rules():
    result = run(tool("promtool"), "check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_every_alert():
    result = run(tool("promtool"), "test", "rules", ALERTS_TEST.name, cwd=ALERTS_TEST.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    tested = {case["alertname"] for test in _load(ALERTS_TEST)["tests"] for case in test.get("alert_rule_test", [])}
    firing = {
        case["alertname"]
        for test in _load(ALERTS_TEST)["tests"]
        for case in test.get("alert_rule_test", [])
        if case["exp_alerts"]
    }
    alerts = {rule["alert"] for rule in _alert_rules()}
    assert alerts == tested == firing, "every alert needs a test where it fires"


def test_promtool_unit_tests_can_fail(tmp_path):
    shutil.copy(ALERTS_TEST, tmp_path / ALERTS_TEST.name)
    (tmp_path / ALERTS.name).write_text(ALERTS.read_text().replace("> 1000", "> 100000"))
    result = run(tool("promtool"), "test", "rules", ALERTS_TEST.name, cwd=tmp_path)
    assert result.returncode != 0 and "RoutstrUsageEventsPilingUp" in result.stdout + result.stderr


def test_alerts_cover_what_the_issue_asks_with_real_metric_names():
    known = _metric_names()
    used = set()
    for rule in _alert_rules():
        series = _series_in(rule["expr"])
        assert series <= known, series - known
        used |= series
    assert {
        "routstr_reconcile_difference_msat",
        "routstr_mint_up",
        "routstr_usage_events_pending",
        "routstr_http_requests_total",
        "routstr_upstream_request_duration_seconds_bucket",
        "routstr_relay_last_publish_timestamp_seconds",
    } <= used


def _dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert panels
    return [target["expr"] for panel in panels for target in panel["targets"]]


def test_dashboard_queries_parse_and_use_real_metrics(tmp_path):
    queries = _dashboard_queries()
    known = _metric_names()
    for expr in queries:
        assert _series_in(expr) <= known, _series_in(expr) - known
    # Grafana's variables, as Grafana substitutes them, then promtool parses every query as a recording rule.
    substituted = [q.replace("$__rate_interval", "5m").replace("$namespace", ".*") for q in queries]
    rules = [{"record": f"dashboard:query_{i}", "expr": q} for i, q in enumerate(substituted)]
    path = tmp_path / "dashboard_rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run(tool("promtool"), "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    broken = {"groups": [{"name": "bad", "rules": [{"record": "x", "expr": "sum(rate(x[5m])"}]}]}
    path.write_text(yaml.safe_dump(broken))
    assert run(tool("promtool"), "check", "rules", str(path)).returncode != 0


def test_dashboard_shows_what_operators_need():
    dashboard = json.loads(DASHBOARD.read_text())
    used = set().union(*(_series_in(q) for q in _dashboard_queries()))
    assert {
        "routstr_http_requests_total",
        "routstr_http_request_duration_seconds_bucket",
        "routstr_upstream_request_duration_seconds_bucket",
        "routstr_revenue_msat",
        "routstr_balances_owed_msat",
        "routstr_reconcile_difference_msat",
        "routstr_mint_up",
        "routstr_relay_connected",
        "routstr_relay_last_publish_timestamp_seconds",
        "routstr_quota_grants",
        "routstr_grants_held_msat",
        "routstr_grants_expired_total",
    } <= used
    assert dashboard["uid"] and dashboard["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def _metric_rows() -> dict[str, tuple[str, str]]:
    """The exported metrics as README rows: {name: (type, labels)}, counters named with `_total`."""
    rows = {}
    for cls in (metrics.GatewayMetrics, metrics.BillingMetrics, metrics.WalletMetrics, metrics.DiscoveryMetrics):
        for metric in vars(cls(CollectorRegistry())).values():
            if isinstance(metric, Counter | Gauge | Histogram):  # prometheus_client keeps the names privately
                name = metric._name + ("_total" if metric._type == "counter" else "")
                rows[name] = (metric._type, set(metric._labelnames))
    return rows


def test_readme_metrics_table_lists_every_metric_with_its_type_and_labels():
    section = (ROOT / "README.md").read_text().split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    table = {
        name: (kind, set() if labels.strip() == "—" else {label.strip() for label in labels.split(",")})
        for name, kind, labels in re.findall(r"^\| `(routstr_[a-z0-9_]+)` \| (\w+) \| ([^|]+) \|", section, re.M)
    }
    exported = _metric_rows()
    assert set(table) == set(exported), (set(exported) - set(table), set(table) - set(exported))
    for name, (kind, labels) in table.items():
        assert kind == exported[name][0], name
        assert labels == exported[name][1], name


# --- the hook Job's commands, run for real -----------------------------------------------------------------


async def test_migrate_hook_commands_apply_every_schema(database, tmp_path):
    """The Job's exact arguments, with only the environment the Job gives, against a fresh Postgres; twice,
    since every upgrade runs them again."""
    pod = by_kind(render(WORKING), "Job")["node-routstr-node-migrate"]["spec"]["template"]["spec"]
    containers = pod["initContainers"] + pod["containers"]
    env = {"PATH": str(Path(sys.executable).parent), "HOME": str(tmp_path), "DATABASE_URL": database}
    env |= {e["name"]: e["value"] for c in containers for e in c["env"] if "value" in e}
    for _ in range(2):
        for container in containers:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", *container["args"], cwd=tmp_path, env=env,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
            output, _ = await asyncio.wait_for(process.communicate(), 120)
            assert process.returncode == 0, output.decode()
    conn = await asyncpg.connect(database)
    try:
        schemas = {r["schema_name"] for r in await conn.fetch("SELECT schema_name FROM information_schema.schemata")}
    finally:
        await conn.close()
    assert {"billing", "wallet", "discovery"} <= schemas


async def test_migrate_hook_fails_loudly_without_a_database(tmp_path):
    env = {"PATH": str(Path(sys.executable).parent), "HOME": str(tmp_path)}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.billing", "migrate", cwd=tmp_path, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 2 and b"DATABASE_URL" in output


async def test_services_run_as_the_pods_run_them(database, nats_server, mint, upstream, tmp_path, http):
    """Each Deployment's container, started as the kubelet would (its args, the ConfigMap and its secret
    variables only, a scratch HOME), passes its own readiness and liveness probes, then drains on SIGTERM
    well inside its grace period."""
    ports = {key: processes.free_port() for key in SERVICES.values()}
    values = {
        "config": {
            **{key: str(port) for key, port in ports.items()},
            "HOST": "127.0.0.1",
            "METRICS_PORT": str(processes.free_port()),
            "NATS_URL": natsauth.plain_url(nats_server.url),  # each service as its own NATS user
            "CASHU_MINTS": mint.url,
            "UPSTREAM_BASE_URL": upstream,
            "RELAYS": f"ws://127.0.0.1:{processes.free_port()}",  # nothing listens: no traffic leaves the host
        },
        "secrets": {"DATABASE_URL": database, "UPSTREAM_API_KEY": "upstream-key", "SECRETS_KEY": SECRETS_KEY},
        "natsAuth": {"passwords": nats_server.extra},
    }
    objects = render(values)
    config = by_kind(objects, "ConfigMap")["node-routstr-node"]["data"]
    secrets = {name: obj["stringData"] for name, obj in by_kind(objects, "Secret").items()}
    started = {}
    try:
        for service, deployment in deployments(objects).items():
            [container] = deployment["spec"]["template"]["spec"]["containers"]
            env = {"PATH": str(Path(sys.executable).parent), "HOME": str(tmp_path), **config}
            refs = [(e["name"], e["valueFrom"]["secretKeyRef"]) for e in container["env"]]
            env |= {name: secrets[ref["name"]][ref["key"]] for name, ref in refs if ref["key"] in secrets[ref["name"]]}
            log = (tmp_path / f"{service}.log").open("wb")
            started[service] = (
                await asyncio.create_subprocess_exec(
                    sys.executable, "-m", *container["args"], cwd=tmp_path, env=env, stdout=log, stderr=log
                ),
                container,
                deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"],
            )
        for service, (process, container, _) in started.items():
            port = container["ports"][0]["containerPort"]
            probes = (container["readinessProbe"], container["livenessProbe"])
            for probe in probes:
                url = f"http://127.0.0.1:{port}{probe['httpGet']['path']}"
                status = None
                for _ in range(300):
                    assert process.returncode is None, (tmp_path / f"{service}.log").read_text()
                    try:
                        async with http.get(url, timeout=aiohttp.ClientTimeout(total=2)) as response:
                            status = response.status
                    except aiohttp.ClientError:
                        status = None
                    if status == 200:
                        break
                    await asyncio.sleep(0.1)
                assert status == 200, f"{service} {url}: {status}\n" + (tmp_path / f"{service}.log").read_text()
        for service, (process, _, grace) in started.items():
            process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(process.wait(), min(grace, 30))
            assert process.returncode == 0, (service, (tmp_path / f"{service}.log").read_text())
    finally:
        for process, _, _ in started.values():
            if process.returncode is None:
                process.kill()
                await process.wait()
