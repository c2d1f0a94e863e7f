"""Static checks of deploy/: the files parse and agree with the code.

Nothing here needs Docker or a cluster. The settings names come from
``streaming.settings.Settings``, the ports from its defaults, the metric names
from the Prometheus registries of the worker and the gateway, the torch pin from
the Makefile; so a renamed setting, a moved port or a renamed metric fails here
instead of in production.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
import tomllib
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from streaming.gateway.auth import MIN_SECRET_CHARS
from streaming.gateway.metrics import GatewayMetrics
from streaming.settings import Settings
from workers.metrics import WorkerMetrics, serve_ops

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
DASHBOARD = DEPLOY / "grafana" / "cfnesa-dashboard.json"

DEFAULTS = Settings()
SETTINGS_ENV = {f"CFNESA_{name.upper()}" for name in Settings.model_fields}
# Read by the code but never to be set by a deployment, with the reason.
TEST_ONLY_ENV = {
    "CFNESA_FAULTS": "deliberate crashes (kill -9 at a loop stage) for the crash tests",
}
CFNESA_NAME = re.compile(r"\bCFNESA_[A-Z0-9_]+")
PUBLIC_IMAGES = {"apache/kafka", "redis"}  # the only images not built from this repo


# ------------------------------------------------------------------ helpers


def _yaml_docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _yaml_files() -> list[Path]:
    return sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])


def _compose() -> dict[str, Any]:
    (doc,) = _yaml_docs(COMPOSE)
    return doc


def _k8s_objects() -> list[dict[str, Any]]:
    """Every object the kustomization applies."""
    kustomization = _yaml_docs(K8S / "kustomization.yaml")[0]
    return [obj for name in kustomization["resources"] for obj in _yaml_docs(K8S / name)]


def _k8s(kind: str, name: str) -> dict[str, Any]:
    found = [o for o in _k8s_objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def _configmap() -> dict[str, str]:
    return _k8s("ConfigMap", "cfnesa-settings")["data"]


def _containers() -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(deployment name, pod template, container) of every Deployment."""
    for obj in _k8s_objects():
        if obj["kind"] == "Deployment":
            template = obj["spec"]["template"]
            for container in template["spec"]["containers"]:
                yield obj["metadata"]["name"], template, container


def _container_env(container: dict[str, Any]) -> dict[str, Any]:
    """The container's CFNESA_* variables: the ConfigMap's, then its own `env`
    (which wins in Kubernetes); a value from a Secret is the marker "<secret>"."""
    env: dict[str, Any] = {}
    for source in container.get("envFrom", []):
        assert source["configMapRef"]["name"] == "cfnesa-settings"
        env.update(_configmap())
    for item in container.get("env", []):
        env[item["name"]] = item.get("value", "<secret>")
    return env


def _service_env(name: str) -> dict[str, str]:
    return {k: str(v) for k, v in _compose()["services"][name].get("environment", {}).items()}


def _effective(env: dict[str, Any], setting: str) -> Any:
    """A setting as the process would see it: the env value, else the default."""
    value = env.get(f"CFNESA_{setting.upper()}")
    if value is None:
        return getattr(DEFAULTS, setting)
    return type(getattr(DEFAULTS, setting))(value) if setting.endswith("port") else value


# Which source serves each command's HTTP paths (test_the_code_serves_these_paths).
SERVERS = {
    "worker": (ROOT / "workers" / "metrics.py", {"/healthz", "/metrics"}),
    "featurize": (ROOT / "workers" / "metrics.py", {"/healthz", "/metrics"}),
    "gateway": (ROOT / "streaming" / "gateway" / "server.py", {"/healthz", "/metrics"}),
}


def _served(command: str, env: dict[str, Any]) -> tuple[int, set[str]] | None:
    """(port, HTTP paths) the cfnesa ``command`` serves with this environment;
    None for a command that serves no HTTP endpoint."""
    if command == "worker":  # serve_ops, on CFNESA_METRICS_PORT
        return _effective(env, "metrics_port"), SERVERS["worker"][1]
    if command == "featurize":  # serve_ops too, on CFNESA_FEATURIZER_METRICS_PORT
        return _effective(env, "featurizer_metrics_port"), SERVERS["featurize"][1]
    if command == "gateway":  # one port for the WebSocket, the dashboard and these
        return _effective(env, "gateway_port"), SERVERS["gateway"][1]
    return None


def _code_env_names() -> set[str]:
    """CFNESA_* names the code reads from os.environ directly (besides Settings)."""
    pattern = re.compile(r"""(?:environ(?:\.get|\.setdefault)?|getenv)\(\s*["'](CFNESA_\w+)""")
    subscript = re.compile(r"""environ\[\s*["'](CFNESA_\w+)""")
    names: set[str] = set()
    for package in ("streaming", "workers", "model"):
        for path in (ROOT / package).rglob("*.py"):
            text = path.read_text()
            names.update(pattern.findall(text))
            names.update(subscript.findall(text))
    return names


def _healthcheck_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("cfnesa_healthcheck", DEPLOY / "healthcheck.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    assert not pending, "the Dockerfile ends inside a continuation"
    out = []
    for line in lines:
        instruction, _, args = line.partition(" ")
        out.append((instruction.upper(), args.strip()))
    return out


def _topics_service() -> tuple[list[str], int]:
    env = _compose()["services"]["topics"]["environment"]
    return str(env["TOPICS"]).split(), int(env["PARTITIONS"])


# ------------------------------------------------------------------ YAML, images


def test_every_yaml_file_parses():
    files = _yaml_files()
    names = {p.relative_to(DEPLOY).as_posix() for p in files}
    assert {"docker-compose.yml", "k8s/kustomization.yaml"} <= names
    assert len(files) >= 10
    for path in files:
        docs = _yaml_docs(path)
        assert docs, f"{path} holds no document"
        for doc in docs:
            assert isinstance(doc, dict), f"{path}: a document is not a mapping"


def test_the_kustomization_applies_every_manifest_and_no_secret():
    kustomization = _yaml_docs(K8S / "kustomization.yaml")[0]
    listed = kustomization["resources"]
    for name in listed:
        assert (K8S / name).is_file(), f"kustomization lists a missing file {name}"
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    examples = {n for n in on_disk if n.endswith(".example.yaml")}
    assert set(listed) == on_disk - examples, "a manifest is not in the kustomization"
    assert examples == {"gateway-secret.example.yaml", "connections-secret.example.yaml"}
    kinds = {o["kind"] for o in _k8s_objects()}
    assert "Secret" not in kinds, "a Secret would overwrite the real one on every apply"
    assert {"Namespace", "ConfigMap", "Deployment", "Service", "Ingress"} <= kinds
    assert {"PodDisruptionBudget", "ScaledObject"} <= kinds
    # every container image is the one the kustomization points at the registry
    (image,) = kustomization["images"]
    images = {container["image"] for _, _, container in _containers()}
    assert images == {image["name"]}
    assert image["newName"] and image["newTag"]


def test_compose_images_are_public_or_built_from_this_repo():
    services = _compose()["services"]
    built = 0
    for name, service in services.items():
        if "build" in service:
            build = service["build"]
            assert (COMPOSE.parent / build["context"]).resolve() == ROOT, name
            assert build["dockerfile"] == "deploy/Dockerfile", name
            assert (ROOT / build["dockerfile"]).is_file()
            built += 1
            continue
        repository, _, tag = service["image"].partition(":")
        assert repository in PUBLIC_IMAGES, f"{name}: {service['image']} is neither public nor ours"
        assert tag and tag != "latest", f"{name}: pin the image's tag"
    assert built == 3, "worker, featurizer and gateway are built here"
    assert {services[n]["command"][0] for n in ("worker", "featurizer", "gateway")} == {
        "worker",
        "featurize",
        "gateway",
    }


# ------------------------------------------------------------------ settings


def test_every_cfnesa_name_in_deploy_is_a_real_setting():
    from_code = _code_env_names()
    # the scan must see the direct reads, or the exclusion below means nothing
    assert "CFNESA_FAULTS" in from_code, "the code no longer reads it: update TEST_ONLY_ENV"
    assert "CFNESA_DATA_DIR" in from_code
    known = SETTINGS_ENV | from_code
    used: dict[str, set[str]] = {}
    for path in sorted(DEPLOY.rglob("*")):
        if path.is_file():
            for name in CFNESA_NAME.findall(path.read_text()):
                used.setdefault(name, set()).add(path.relative_to(DEPLOY).as_posix())
    assert len(used) >= 10
    unknown = {n: where for n, where in used.items() if n not in known}
    assert not unknown, f"not a setting the code reads (a typo?): {unknown}"
    test_only = {n: where for n, where in used.items() if n in TEST_ONLY_ENV}
    assert not test_only, f"test-only variables in deploy/: {test_only}"


def test_compose_sets_what_the_services_need():
    services = _compose()["services"]
    kafka_env = services["kafka"]["environment"]
    internal = next(
        listener.removeprefix("PLAINTEXT://")
        for listener in kafka_env["KAFKA_ADVERTISED_LISTENERS"].split(",")
        if listener.startswith("PLAINTEXT://")
    )
    for name in ("worker", "featurizer", "gateway"):
        env = _service_env(name)
        assert env["CFNESA_KAFKA_BOOTSTRAP"] == internal, name
        assert urlsplit(env["CFNESA_REDIS_URL"]).hostname in services, name
        given = {k: v for k, v in env.items() if k != "CFNESA_GATEWAY_SECRET"}
        Settings(**{k.removeprefix("CFNESA_").lower(): v for k, v in given.items()})
    worker = _service_env("worker")
    assert worker["CFNESA_METRICS_HOST"] == "0.0.0.0"
    assert "CFNESA_METRICS_PORT" in worker
    gateway = _service_env("gateway")
    assert gateway["CFNESA_GATEWAY_HOST"] == "0.0.0.0"
    assert "CFNESA_GATEWAY_PORT" in gateway
    # the secret is interpolated from deploy/.env and required, never written here
    assert gateway["CFNESA_GATEWAY_SECRET"].startswith("${CFNESA_GATEWAY_SECRET:?")
    example = (DEPLOY / ".env.example").read_text()
    assert re.search(r"^CFNESA_GATEWAY_SECRET=$", example, re.MULTILINE)
    assert ".env" in (DEPLOY / ".gitignore").read_text().split()
    # several workers share the group; a replica count makes them several
    assert services["worker"]["deploy"]["replicas"] >= 2


def test_k8s_sets_what_the_pods_need():
    config = _configmap()
    required = {
        "CFNESA_KAFKA_BOOTSTRAP",
        "CFNESA_REDIS_URL",
        "CFNESA_REDIS_CLUSTER",
        "CFNESA_METRICS_HOST",
        "CFNESA_METRICS_PORT",
        "CFNESA_GATEWAY_HOST",
        "CFNESA_GATEWAY_PORT",
    }
    assert required <= set(config)
    assert all(isinstance(v, str) for v in config.values()), "ConfigMap values are strings"
    settings = Settings(**{k.removeprefix("CFNESA_").lower(): v for k, v in config.items()})
    assert settings.redis_cluster is True
    assert settings.metrics_host == "0.0.0.0"
    assert settings.gateway_host == "0.0.0.0"
    # Redis Cluster has database 0 only
    assert urlsplit(settings.redis_url).path.strip("/") in ("", "0")
    if settings.checkpoint is not None:
        assert settings.checkpoint.is_absolute()
    # the gateway's secret comes from a Secret, and the example is unusable as one
    gateway = next(c for name, _, c in _containers() if name == "cfnesa-gateway")
    (secret_env,) = [e for e in gateway["env"] if e["name"] == "CFNESA_GATEWAY_SECRET"]
    ref = secret_env["valueFrom"]["secretKeyRef"]
    (example,) = _yaml_docs(K8S / "gateway-secret.example.yaml")
    assert example["kind"] == "Secret"
    assert ref["name"] == example["metadata"]["name"]
    placeholder = example["stringData"][ref["key"]]
    assert len(placeholder) < MIN_SECRET_CHARS, "the placeholder must not work as a secret"


def test_torch_threads_per_process():
    threads = {
        name: int(_container_env(c)["CFNESA_TORCH_THREADS"])
        for name, _, c in _containers()
        if "CFNESA_TORCH_THREADS" in _container_env(c)
    }
    assert threads == {"cfnesa-worker": 1, "cfnesa-featurizer": 2}
    assert _service_env("worker")["CFNESA_TORCH_THREADS"] == "1"


# ------------------------------------------------------------------ probes, ports


def test_the_code_serves_these_paths():
    for command, (source, paths) in SERVERS.items():
        text = source.read_text()
        for path in paths:
            assert f'== "{path}"' in text, f"{source.name} no longer serves {path} ({command})"
    featurizer = (ROOT / "workers" / "featurize.py").read_text()
    assert "serve_ops(" in featurizer, "the featurizer no longer serves HTTP: drop its probes"


def test_k8s_probes_and_scrape_annotations_match_what_the_code_serves():
    checked = 0
    for name, template, container in _containers():
        command = container["args"][0]
        served = _served(command, _container_env(container))
        ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
        probes = {
            k: container[k]
            for k in ("startupProbe", "readinessProbe", "livenessProbe")
            if k in container
        }
        annotations = template["metadata"].get("annotations", {})
        if served is None:
            assert not probes, f"{name}: `cfnesa {command}` serves no HTTP endpoint"
            assert "prometheus.io/scrape" not in annotations, name
            continue
        port, paths = served
        assert {"readinessProbe", "livenessProbe"} <= set(probes), name
        for kind, probe in probes.items():
            get = probe["httpGet"]
            assert get["path"] == "/healthz", f"{name} {kind}"
            assert get["path"] in paths
            probe_port = ports[get["port"]] if isinstance(get["port"], str) else get["port"]
            assert probe_port == port, f"{name} {kind}: port {probe_port}, the code serves {port}"
            checked += 1
        assert annotations["prometheus.io/scrape"] == "true"
        assert int(annotations["prometheus.io/port"]) == port, name
        assert annotations["prometheus.io/path"] in paths
    assert checked >= 9


def test_gateway_service_and_ingress_reach_the_gateway_port():
    config = _configmap()
    port = _effective(config, "gateway_port")
    service = _k8s("Service", "cfnesa-gateway")
    deployment = _k8s("Deployment", "cfnesa-gateway")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["sessionAffinity"] == "ClientIP"
    (service_port,) = service["spec"]["ports"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert named[service_port["targetPort"]] == port
    ingress = _k8s("Ingress", "cfnesa-gateway")
    timeouts = {k: v for k, v in ingress["metadata"]["annotations"].items() if "timeout" in k}
    # longer than the keepalive ping interval, or the proxy cuts idle sockets
    assert timeouts and all(int(v) > DEFAULTS.ping_interval_s for v in timeouts.values())
    (rule,) = ingress["spec"]["rules"]
    backend = rule["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == "cfnesa-gateway"
    assert backend["port"]["name"] == service_port["name"]


def test_compose_healthchecks_match_what_the_code_serves():
    hc = _healthcheck_module()
    services = _compose()["services"]
    checked = 0
    for name in ("worker", "featurizer", "gateway"):
        service = services[name]
        env = _service_env(name)
        served = _served(service["command"][0], env)
        if served is None:
            assert "healthcheck" not in service, f"{name} serves no /healthz"
            continue
        port, paths = served
        test = service["healthcheck"]["test"]
        assert test[:2] == ["CMD", "cfnesa-healthcheck"], name
        url = urlsplit(test[2])
        assert url.path == "/healthz" and url.path in paths, name
        assert url.port == port, f"{name}: {url.port}, the code serves {port}"
        # the image's own health check finds the same URL from the command line
        assert hc.endpoint(["/opt/cfnesa/bin/cfnesa", *service["command"]], env) == test[2]
        checked += 1
    assert checked == 3


def test_grace_periods_cover_a_drain():
    # on SIGTERM a worker finishes its batch, produces (the producer waits up to
    # 15 s for the broker), commits and leaves the group
    worker = _k8s("Deployment", "cfnesa-worker")["spec"]["template"]["spec"]
    assert worker["terminationGracePeriodSeconds"] >= 30
    stop = _compose()["services"]["worker"]["stop_grace_period"]
    assert int(stop.removesuffix("s")) >= 30
    pdb = _k8s("PodDisruptionBudget", "cfnesa-worker")
    labels = _k8s("Deployment", "cfnesa-worker")["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1


# ------------------------------------------------------------------ scaling, topics


def test_topics_are_the_settings_and_keda_stays_within_the_partitions():
    topics, partitions = _topics_service()
    expected = {
        DEFAULTS.input_topic,
        DEFAULTS.output_topic,
        DEFAULTS.dlq_topic,
        DEFAULTS.text_topic,
        f"{DEFAULTS.text_topic}.dlq",  # the featurizer's dead letters
    }
    assert set(topics) == expected
    kafka = _compose()["services"]["kafka"]["environment"]
    assert str(kafka["KAFKA_AUTO_CREATE_TOPICS_ENABLE"]).lower() == "false"

    scaled = _k8s("ScaledObject", "cfnesa-worker")
    spec = scaled["spec"]
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"] <= partitions
    worker = _k8s("Deployment", "cfnesa-worker")
    assert spec["scaleTargetRef"]["name"] == worker["metadata"]["name"]
    assert "replicas" not in worker["spec"], "KEDA owns the worker count"
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    config = _configmap()
    assert meta["consumerGroup"] == _effective(config, "group_id") == "cfnesa-workers"
    assert meta["topic"] == _effective(config, "input_topic") == "utterance-features"
    assert meta["bootstrapServers"] == config["CFNESA_KAFKA_BOOTSTRAP"]
    assert str(meta.get("allowIdleConsumers", "false")).lower() == "false"
    assert int(meta["lagThreshold"]) > 0


# ------------------------------------------------------------------ the image


def test_dockerfile():
    instructions = _dockerfile_instructions()
    args = {
        a.split("=", 1)[0]: a.split("=", 1)[1] for i, a in instructions if i == "ARG" and "=" in a
    }
    bases = [a.split()[0] for i, a in instructions if i == "FROM"]
    assert bases and all(b in ("${PYTHON_IMAGE}", "python:3.11-slim") for b in bases)
    assert args["PYTHON_IMAGE"] == "python:3.11-slim"

    # torch: the Makefile's exact pin, from the CPU index, before the project
    makefile_pin = re.search(r"^TORCH\s*:=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M)
    assert makefile_pin is not None
    runs = [a for i, a in instructions if i == "RUN"]
    torch_runs = [r for r in runs if "torch==" in r]
    assert len(torch_runs) == 1
    assert makefile_pin.group(1) == "torch==2.13.0"
    assert re.search(r"(?<![\w.-])torch==2\.13\.0(?![\w.+-])", torch_runs[0])
    assert "--index-url https://download.pytorch.org/whl/cpu" in torch_runs[0]
    assert runs.index(torch_runs[0]) < next(i for i, r in enumerate(runs) if "pip install ." in r)
    # pyproject's torch range admits the pinned build, so `pip install .` keeps it
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    torch_req = next(Requirement(d) for d in project["dependencies"] if d.startswith("torch"))
    assert torch_req.specifier.contains(Version("2.13.0+cpu"))

    # non-root, numerically (Kubernetes' runAsNonRoot checks a number)
    users = [a for i, a in instructions if i == "USER"]
    assert users, "no USER: the container would run as root"
    user = users[-1].split(":")[0]
    assert user.isdigit() and int(user) != 0
    for _, template, _ in _containers():
        assert template["spec"]["securityContext"]["runAsUser"] == int(user)
        assert template["spec"]["securityContext"]["runAsNonRoot"] is True

    # every COPY from the build context exists and is not excluded from it
    ignore = [
        line.strip()
        for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert not [p for p in ignore if p.startswith("!")], "exceptions: extend the check below"
    sources = []
    for instruction, arguments in instructions:
        if instruction != "COPY" or "--from=" in arguments:
            continue
        words = [w for w in arguments.split() if not w.startswith("--")]
        sources += words[:-1]
    assert {"pyproject.toml", "README.md", "model/", "streaming/", "workers/"} <= set(sources)
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
        path = ROOT / source
        files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
        for file in files:
            relative = file.relative_to(ROOT)
            if "__pycache__" in relative.parts:
                continue  # bytecode: kept out on purpose
            # a pattern excludes what it matches and everything under it
            prefixes = ["/".join(relative.parts[: n + 1]) for n in range(len(relative.parts))]
            excluded = [p for p in ignore if any(fnmatch(prefix, p) for prefix in prefixes)]
            assert not excluded, f"{relative}: left out of the build context by {excluded}"

    entrypoint = next(json.loads(a) for i, a in instructions if i == "ENTRYPOINT")
    assert entrypoint == ["cfnesa"]
    assert "cfnesa" in project["scripts"]
    exposed = {int(p) for i, a in instructions if i == "EXPOSE" for p in a.split()}
    assert {DEFAULTS.metrics_port, DEFAULTS.gateway_port} <= exposed
    assert any(i == "HEALTHCHECK" and "cfnesa-healthcheck" in a for i, a in instructions)


def test_the_shipped_model_and_files_are_package_data():
    """`pip install .` (not editable) must carry what the code loads at run time."""
    from model.checkpoint import DEFAULT_CHECKPOINT
    from model.encoder import DEFAULT_ADAPTER

    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]
    shipped = [
        ("model", DEFAULT_CHECKPOINT),
        ("model", DEFAULT_ADAPTER),  # the encoder adapter the default model's features need
        ("streaming", ROOT / "streaming" / "gateway" / "static"),
    ]
    for package, folder in shipped:
        files = [p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
        assert files, folder
        for path in files:
            relative = path.relative_to(ROOT / package).as_posix()
            assert any(fnmatch(relative, g) for g in package_data[package]), (
                f"{package}/{relative} would be missing from the image"
            )
    assert "alert_rules.toml" in package_data["streaming"]
    assert DEFAULT_CHECKPOINT.is_relative_to(ROOT / "model")


# ------------------------------------------------------------------ Grafana


def _metric_series() -> dict[str, set[str]]:
    """Every series name the worker and the gateway export -> its label names."""
    registries = [
        WorkerMetrics().registry,
        GatewayMetrics(clients=lambda: 0, subscriptions=lambda: (0, 0)).registry,
    ]
    series: dict[str, set[str]] = {}
    for registry in registries:
        # prometheus_client keeps no public list of a registry's collectors with
        # their label names (samples exist only once a label value was used)
        collectors = {id(c): c for c in registry._names_to_collectors.values()}
        for c in collectors.values():
            name, labels = c._name, set(c._labelnames)
            if c._type == "counter":
                for suffix in ("_total", "_created"):
                    series[name + suffix] = labels
            elif c._type == "histogram":
                series[name + "_bucket"] = labels | {"le"}
                for suffix in ("_sum", "_count", "_created"):
                    series[name + suffix] = labels
            else:
                series[name] = labels
    return series


def test_grafana_dashboard_queries_real_metrics():
    dashboard = json.loads(DASHBOARD.read_text())
    series = _metric_series()
    assert "cfnesa_consumer_lag" in series and "cfnesa_gateway_clients" in series
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert exprs and all(panel["targets"] for panel in dashboard["panels"])
    used: set[str] = set()
    for expr in exprs:
        names = set(re.findall(r"\bcfnesa_[a-z0-9_]+", expr))
        assert names, f"no cfnesa metric in {expr!r}"
        unknown = names - set(series)
        assert not unknown, f"{expr!r} queries metrics that do not exist: {unknown}"
        used |= names
        labels = set().union(*(series[n] for n in names))
        for group in re.findall(r"\bby\s*\(([^)]*)\)", expr):
            for label in filter(None, (x.strip() for x in group.split(","))):
                assert label in labels | {"instance", "job"}, f"{expr!r}: no label {label!r}"
        for selector in re.findall(r"\{([^}]*)\}", expr):
            for label in re.findall(r"(\w+)\s*=~?", selector):
                assert label in labels, f"{expr!r}: no label {label!r}"
    wanted = {
        "cfnesa_consumer_lag",
        "cfnesa_end_to_end_seconds_bucket",
        "cfnesa_events_out_total",
        "cfnesa_dead_letters_total",
        "cfnesa_gateway_clients",
    }
    assert wanted <= used
    assert any("histogram_quantile(0.99" in e and "end_to_end" in e for e in exprs)
    assert any("histogram_quantile(0.5" in e and "end_to_end" in e for e in exprs)
    assert any('type="alert"' in e for e in exprs)
    (variable,) = dashboard["templating"]["list"]
    assert variable["type"] == "datasource" and variable["query"] == "prometheus"
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


# ------------------------------------------------------------------ the health-check script


def test_healthcheck_finds_the_endpoint_of_each_command():
    hc = _healthcheck_module()
    script = "/opt/cfnesa/bin/cfnesa"
    port = DEFAULTS.metrics_port
    assert hc.endpoint(["python", script, "worker"], {}) == f"http://127.0.0.1:{port}/healthz"
    assert (
        hc.endpoint([script, "worker"], {"CFNESA_METRICS_PORT": "9500"})
        == "http://127.0.0.1:9500/healthz"
    )
    assert (
        hc.endpoint([script, "worker", "--metrics-port", "9600"], {"CFNESA_METRICS_PORT": "9500"})
        == "http://127.0.0.1:9600/healthz"
    )
    assert hc.endpoint([script, "worker"], {"CFNESA_METRICS_PORT": "0"}) is None
    assert (
        hc.endpoint([script, "gateway"], {"CFNESA_GATEWAY_HOST": "0.0.0.0"})
        == f"http://127.0.0.1:{DEFAULTS.gateway_port}/healthz"
    )
    assert (
        hc.endpoint([script, "gateway", "--port", "9000"], {"CFNESA_GATEWAY_HOST": "10.1.2.3"})
        == "http://10.1.2.3:9000/healthz"
    )
    assert (
        hc.endpoint([script, "featurize"], {})
        == f"http://127.0.0.1:{DEFAULTS.featurizer_metrics_port}/healthz"
    )
    assert hc.endpoint([script, "featurize"], {"CFNESA_FEATURIZER_METRICS_PORT": "0"}) is None
    assert hc.endpoint(["python", "-m", "pytest"], {}) is None


@pytest.mark.parametrize("healthy", [True, False])
async def test_healthcheck_against_a_worker_endpoint(healthy):
    hc = _healthcheck_module()
    server = await serve_ops(
        "127.0.0.1", 0, WorkerMetrics(), lambda: (healthy, {"ok": healthy, "outage": None})
    )
    try:
        port = server.sockets[0].getsockname()[1]
        status = await asyncio.to_thread(
            hc.main, ["cfnesa-healthcheck", f"http://127.0.0.1:{port}/healthz"]
        )
        assert status == (0 if healthy else 1)
        # /metrics answers on the same port: what the scrape annotations point at
        ok, detail = await asyncio.to_thread(hc.check, f"http://127.0.0.1:{port}/metrics")
        assert ok, detail
        missing, _ = await asyncio.to_thread(hc.check, f"http://127.0.0.1:{port}/nothing")
        assert not missing
    finally:
        server.close()
        await server.wait_closed()


def test_connection_secrets_are_mounted_where_the_settings_point():
    """The optional Secret with CA files and passwords (connections-secret.example.yaml)
    is mounted by every pod at the folder the commented settings in configmap.yaml name,
    and every file those settings name is a key of the example Secret."""
    folder = "/etc/cfnesa/connections"
    (example,) = _yaml_docs(K8S / "connections-secret.example.yaml")
    assert example["kind"] == "Secret"
    keys = set(example["stringData"])
    named = set(re.findall(rf"{folder}/([\w.-]+)", (K8S / "configmap.yaml").read_text()))
    assert named and named <= keys, f"configmap.yaml names files the Secret lacks: {named - keys}"
    for name, template, container in _containers():
        mounts = {m["name"]: m for m in container.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
        assert mounts["connections"]["mountPath"] == folder, name
        assert mounts["connections"]["readOnly"] is True, name
        secret = volumes["connections"]["secret"]
        assert secret["secretName"] == example["metadata"]["name"], name
        assert secret["optional"] is True, f"{name}: plaintext deployments have no such Secret"
