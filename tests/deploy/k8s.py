"""Checks for the Kubernetes manifests in deploy/k8s, shared by test_k8s.py.

`render(path)` runs `kubectl kustomize`. `problems(objects)` returns what is wrong with a
rendered set of objects as sentences (empty when all is well): against the Kubernetes API
schemas (kubernetes-validate) and KEDA's ScaledObject schema, against each other (names,
selectors, ports, references) and against the service's own code (its settings, commands,
probe paths, Redis keys and metric names). Returning sentences rather than asserting lets
a test show every problem at once, and feed the checker broken manifests to see that it
notices.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import functools
import importlib
import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from tests.deploy.checks import dockerfile_instructions, exported_series_names, final_stage

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
KEDA_CRD = Path(__file__).resolve().parent / "schemas" / "keda-scaledobject-crd.yaml"

LABEL = "app.kubernetes.io/"
RECOMMENDED_LABELS = tuple(
    LABEL + name for name in ("name", "instance", "component", "part-of", "version", "managed-by")
)
PROJECT_IMAGE = "imh-service"  # the repository name of the image the Dockerfile builds
SHUTDOWN_MARGIN_S = 10.0  # uvicorn's HTTP shutdown (5 s) before the drain, closing after
# The redis-streams scaler's parameters (keda.sh/docs/latest/scalers/redis-streams).
REDIS_STREAMS_PARAMETERS = {
    "address", "addressFromEnv", "host", "hostFromEnv", "port", "portFromEnv",
    "usernameFromEnv", "passwordFromEnv", "stream", "consumerGroup", "pendingEntriesCount",
    "streamLength", "lagCount", "activationLagCount", "databaseIndex", "enableTLS",
    "unsafeSsl",
}  # fmt: skip
PROBES = {"startupProbe": "/healthz", "readinessProbe": "/readyz", "livenessProbe": "/healthz"}


# --- Rendering ---------------------------------------------------------------------------


def kubectl() -> str | None:
    return shutil.which("kubectl")


def render(path: Path) -> list[dict]:
    """The objects `kubectl kustomize path` renders."""
    result = subprocess.run(
        [kubectl() or "kubectl", "kustomize", str(path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {path}: {result.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


# --- What the service says about itself ----------------------------------------------------


@dataclass(frozen=True)
class Facts:
    settings: frozenset[str]  # Settings fields, lower case
    env_prefix: str  # "IMH_"
    defaults: dict  # field -> default
    commands: frozenset[str]  # `imh` subcommands
    worker_port: int
    entrypoint: tuple[str, ...]  # the image's ENTRYPOINT
    served_paths: frozenset[str]  # GET paths the service's apps declare
    metrics: frozenset[str]  # series names service.metrics.Metrics exports
    version: str  # pyproject's
    group: str  # the work streams' consumer group
    streams: tuple[str, ...]  # work stream suffixes (online, jobs)

    def work_stream(self, prefix: str, stream: str) -> str:
        from service.distributed.keys import Keys

        return Keys(prefix).work(stream)


@functools.cache
def facts() -> Facts:
    from service.distributed.keys import GROUP, STREAMS
    from service.metrics import Metrics
    from service.settings import Settings

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    module_name = pyproject["project"]["scripts"]["imh"].split(":")[0]
    cli = importlib.import_module(module_name)
    (subparsers,) = [
        action for action in cli.parser()._actions
        if isinstance(action, argparse._SubParsersAction)
    ]  # fmt: skip
    instructions = final_stage(dockerfile_instructions((ROOT / "Dockerfile").read_text()))
    (entrypoint,) = [args for keyword, args in instructions if keyword == "ENTRYPOINT"]
    route = re.compile(r"\.(?:get|api_route)\(\s*[\"'](/[^\"']*)[\"']")
    served = {
        path
        for source in (ROOT / "service").rglob("*.py")
        for path in route.findall(source.read_text())
    }
    fields = Settings.model_fields
    return Facts(
        settings=frozenset(fields),
        env_prefix=Settings.model_config["env_prefix"],
        defaults={name: field.default for name, field in fields.items()},
        commands=frozenset(subparsers.choices),
        worker_port=int(getattr(cli, "WORKER_PORT", 8001)),
        entrypoint=tuple(yaml.safe_load(entrypoint)),
        served_paths=frozenset(served),
        metrics=frozenset(exported_series_names(Metrics().registry)),
        version=pyproject["project"]["version"],
        group=GROUP,
        streams=tuple(STREAMS),
    )


def unknown_metric_names(text: str, known: set[str] | frozenset[str]) -> set[str]:
    """`imh_*` names in a text (YAML, Markdown) that are not exported series."""
    return set(re.findall(r"\bimh_[a-z0-9_]+\b", text)) - set(known)


# --- Reading rendered objects ------------------------------------------------------------


def name_of(obj: dict) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def labels(obj: dict) -> dict[str, str]:
    return obj.get("metadata", {}).get("labels") or {}


def quantity(value: object) -> float:
    """A Kubernetes quantity (2, "500m", "4Gi") or Redis size ("3gb") as a number."""
    text = str(value).strip()
    units = {
        "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
        "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
        "kb": 2**10, "mb": 2**20, "gb": 2**30, "tb": 2**40,  # Redis's, powers of 2
    }  # fmt: skip
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", text)
    if not match or (match.group(2) and match.group(2) not in units):
        raise ValueError(f"not a quantity: {value!r}")
    return float(match.group(1)) * units.get(match.group(2), 1)


class Manifests:
    def __init__(self, objects: list[dict]):
        self.objects = objects

    def of(self, kind: str) -> list[dict]:
        return [obj for obj in self.objects if obj.get("kind") == kind]

    def get(self, kind: str, name: str) -> dict | None:
        for obj in self.of(kind):
            if obj["metadata"]["name"] == name:
                return obj
        return None

    def workloads(self) -> list[dict]:
        return self.of("Deployment") + self.of("StatefulSet")

    @staticmethod
    def pod(workload: dict) -> dict:
        return workload["spec"]["template"]

    @staticmethod
    def containers(workload: dict) -> list[dict]:
        return workload["spec"]["template"]["spec"].get("containers", [])

    def project_containers(self) -> Iterator[tuple[dict, dict]]:
        """(workload, container) for every container running the project's image."""
        for workload in self.workloads():
            for container in self.containers(workload):
                if image_repository(container.get("image", "")) == PROJECT_IMAGE:
                    yield workload, container

    def data(self, kind: str, name: str) -> dict[str, str] | None:
        """A ConfigMap's or Secret's keys and (decoded) values; None if it is not here."""
        obj = self.get(kind, name)
        if obj is None:
            return None
        values = dict(obj.get("stringData") or {})
        for key, value in (obj.get("data") or {}).items():
            values[key] = base64.b64decode(value).decode() if kind == "Secret" else value
        return values

    def env(self, container: dict) -> dict[str, str | None]:
        """Environment variables and their values (None where a reference is missing)."""
        env: dict[str, str | None] = {}
        for source in container.get("envFrom", []):
            ref = source.get("configMapRef") or source.get("secretRef")
            kind = "ConfigMap" if "configMapRef" in source else "Secret"
            env.update({source.get("prefix", "") + k: v
                        for k, v in (self.data(kind, ref["name"]) or {}).items()})  # fmt: skip
        for var in container.get("env", []):
            if "value" in var or "valueFrom" not in var:
                env[var["name"]] = str(var.get("value", ""))
                continue
            ref = var["valueFrom"].get("configMapKeyRef") or var["valueFrom"].get("secretKeyRef")
            if ref is None:
                env[var["name"]] = None  # fieldRef, resourceFieldRef
                continue
            kind = "ConfigMap" if "configMapKeyRef" in var["valueFrom"] else "Secret"
            env[var["name"]] = (self.data(kind, ref["name"]) or {}).get(ref["key"])
        return env

    def namespace(self, obj: dict) -> str:
        return obj["metadata"].get("namespace", "default")

    def service_for(self, host: str, namespace: str) -> dict | None:
        """The Service an in-cluster DNS name (name, name.ns, name.ns.svc[.cluster.local])
        names, seen from `namespace`."""
        for service in self.of("Service"):
            name, ns = service["metadata"]["name"], self.namespace(service)
            names = {f"{name}.{ns}", f"{name}.{ns}.svc", f"{name}.{ns}.svc.cluster.local"}
            if host in names or (host == name and ns == namespace):
                return service
        return None

    def selected_workloads(self, selector: dict) -> list[dict]:
        return [
            w for w in self.workloads()
            if selector and selector.items() <= labels(self.pod(w)).items()
        ]  # fmt: skip


def image_repository(image: str) -> str:
    """`registry.example.com:5000/team/imh-service:cpu` -> `imh-service`."""
    last = image.rsplit("/", 1)[-1]
    return last.split("@")[0].split(":")[0]


def image_tag(image: str) -> str:
    last = image.rsplit("/", 1)[-1].split("@")[0]
    return last.split(":", 1)[1] if ":" in last else "latest"


def container_port(container: dict, port: int | str) -> int | None:
    """A probe's or Service's port (a number or a port name) as the container's number."""
    for entry in container.get("ports", []):
        if port in (entry.get("name"), entry["containerPort"]):
            return entry["containerPort"]
    return port if isinstance(port, int) else None


def split_list(value: str | None) -> list[str]:
    return [item.strip() for item in (value or "").split(",") if item.strip()]


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """os.environ with every IMH_* variable replaced by `values`, restored afterwards."""
    saved = dict(os.environ)
    try:
        for key in [k for k in os.environ if k.startswith("IMH_")]:
            del os.environ[key]
        os.environ.update(values)
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


# --- The checks ----------------------------------------------------------------------------


def check_labels(m: Manifests, f: Facts) -> Iterator[str]:
    image_of = {}  # app name -> the image tag its workload runs
    for workload in m.workloads():
        image_of.setdefault(labels(workload).get(LABEL + "name"),
                            image_tag(m.containers(workload)[0].get("image", "")))  # fmt: skip
    for obj in m.objects:
        where = [(name_of(obj), labels(obj))]
        if obj["kind"] in ("Deployment", "StatefulSet"):
            where.append((f"{name_of(obj)} pod template", labels(m.pod(obj))))
        for place, found in where:
            missing = [label for label in RECOMMENDED_LABELS if label not in found]
            if missing:
                yield f"{place}: missing labels {missing}"
                continue
            app, version = found[LABEL + "name"], found[LABEL + "version"]
            expected = f.version if app == PROJECT_IMAGE else image_of.get(app)
            if expected is not None and version != expected:
                yield f"{place}: label version {version!r}, but {app} is {expected!r}"


def check_selectors(m: Manifests, f: Facts) -> Iterator[str]:
    for workload in m.workloads():
        selector = workload["spec"]["selector"].get("matchLabels", {})
        if not selector.items() <= labels(m.pod(workload)).items():
            yield f"{name_of(workload)}: selector {selector} does not match its pod template"
        if LABEL + "version" in selector:
            yield f"{name_of(workload)}: selector holds the version (immutable across upgrades)"
    for service in m.of("Service"):
        selector = service["spec"].get("selector") or {}
        targets = m.selected_workloads(selector)
        if not targets:
            yield f"{name_of(service)}: selector {selector} matches no workload"
            continue
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            if not any(
                container_port(c, target) in [p["containerPort"] for p in c.get("ports", [])]
                for w in targets for c in m.containers(w)
            ):  # fmt: skip
                yield f"{name_of(service)}: targetPort {target!r} is no port of its pods"
    for pdb in m.of("PodDisruptionBudget"):
        if not m.selected_workloads(pdb["spec"]["selector"].get("matchLabels", {})):
            yield f"{name_of(pdb)}: selector matches no workload"
    targeted: dict[str, str] = {}
    for scaler in m.of("HorizontalPodAutoscaler") + m.of("ScaledObject"):
        ref = scaler["spec"]["scaleTargetRef"]
        target = m.get(ref.get("kind", "Deployment"), ref["name"])
        if target is None:
            yield f"{name_of(scaler)}: scales {ref['name']!r}, which is not here"
            continue
        if ref["name"] in targeted:
            yield f"{name_of(scaler)}: {ref['name']} is already scaled by {targeted[ref['name']]}"
        targeted[ref["name"]] = name_of(scaler)
        if "replicas" in target["spec"]:
            yield f"{name_of(target)}: sets replicas, which {name_of(scaler)} owns"


def check_references(m: Manifests, f: Facts) -> Iterator[str]:
    for workload in m.workloads():
        spec = m.pod(workload)["spec"]
        account = spec.get("serviceAccountName")
        if account and m.get("ServiceAccount", account) is None:
            yield f"{name_of(workload)}: service account {account!r} is not here"
        for volume in spec.get("volumes", []):
            claim = volume.get("persistentVolumeClaim", {}).get("claimName")
            if claim and m.get("PersistentVolumeClaim", claim) is None:
                yield f"{name_of(workload)}: volume claim {claim!r} is not here"
        for container in m.containers(workload):
            for source in container.get("envFrom", []):
                ref = source.get("configMapRef") or source.get("secretRef")
                kind = "ConfigMap" if "configMapRef" in source else "Secret"
                if m.get(kind, ref["name"]) is None:
                    yield f"{name_of(workload)}: envFrom {kind} {ref['name']!r} is not here"
            for var in container.get("env", []):
                value_from = var.get("valueFrom", {})
                ref = value_from.get("configMapKeyRef") or value_from.get("secretKeyRef")
                if ref is None:
                    continue
                kind = "ConfigMap" if "configMapKeyRef" in value_from else "Secret"
                data = m.data(kind, ref["name"])
                if data is None or ref["key"] not in data:
                    yield (f"{name_of(workload)}: {var['name']} reads {kind} "
                           f"{ref['name']!r} key {ref['key']!r}, which is not here")  # fmt: skip
    for ingress in m.of("Ingress"):
        for rule in ingress["spec"].get("rules", []):
            for path in rule.get("http", {}).get("paths", []):
                backend = path["backend"]["service"]
                service = m.get("Service", backend["name"])
                wanted = backend["port"].get("name") or backend["port"].get("number")
                if service is None:
                    yield f"{name_of(ingress)}: backend Service {backend['name']!r} is not here"
                elif not any(
                    wanted in (p.get("name"), p["port"]) for p in service["spec"]["ports"]
                ):
                    yield f"{name_of(ingress)}: {name_of(service)} has no port {wanted!r}"


def check_commands(m: Manifests, f: Facts) -> Iterator[str]:
    found = set()
    for workload, container in m.project_containers():
        where = f"{name_of(workload)} container {container['name']}"
        command, args = container.get("command"), container.get("args", [])
        if command is not None and tuple(command) != f.entrypoint:
            yield f"{where}: command {command}, the image runs {list(f.entrypoint)}"
        if not args or args[0] not in f.commands:
            yield f"{where}: args {args} start with no `imh` command ({sorted(f.commands)})"
            continue
        component = labels(workload).get(LABEL + "component")
        expected = {"api": "serve", "worker": "worker"}.get(component)
        if expected and args[0] != expected:
            yield f"{where}: component {component} runs `imh {args[0]}`, not `imh {expected}`"
        found.add(args[0])
    for command in ("serve", "worker"):
        if command not in found:
            yield f"no workload runs `imh {command}`"


def settings_error(env: dict[str, str]) -> str | None:
    """Why the service would refuse these IMH_* values at start, or None."""
    import torch
    from pydantic import ValidationError

    from service.settings import Settings

    values = {k: v for k, v in env.items() if k.startswith("IMH_")}
    device = values.get("IMH_DEVICE")
    if device is not None:
        try:
            torch.device(device)
        except RuntimeError as error:
            return f"IMH_DEVICE={device!r}: {error}"
        values["IMH_DEVICE"] = "cpu"  # this machine may have no GPU; the name is checked
    with environment(values):
        try:
            Settings()
        except ValidationError as error:
            return "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in error.errors()
            )
    return None


def scaled_objects_of(m: Manifests, workload: dict) -> list[dict]:
    return [s for s in m.of("ScaledObject")
            if s["spec"]["scaleTargetRef"]["name"] == workload["metadata"]["name"]]  # fmt: skip


def check_environment(m: Manifests, f: Facts) -> Iterator[str]:
    for workload, container in m.project_containers():
        where = f"{name_of(workload)} container {container['name']}"
        env = m.env(container)
        from_env = {
            value for scaler in scaled_objects_of(m, workload)
            for trigger in scaler["spec"]["triggers"]
            for key, value in trigger["metadata"].items() if key.endswith("FromEnv")
        }  # fmt: skip
        for name in env:
            if name.startswith(f.env_prefix):
                field = name.removeprefix(f.env_prefix).lower()
                if field not in f.settings:
                    yield f"{where}: {name} is not a setting (service/settings.py)"
            elif name not in from_env:
                yield f"{where}: {name} is neither a setting nor read by a KEDA trigger"
        for name in sorted(from_env - set(env)):
            yield f"{where}: KEDA reads {name} from this container, which does not set it"
        missing = [name for name, value in env.items() if value is None]
        if missing:
            yield f"{where}: no value for {missing}"
            continue
        error = settings_error(env)
        if error:
            yield f"{where}: the service refuses these settings: {error}"
        if env.get("IMH_HOST") != "0.0.0.0":
            yield f"{where}: IMH_HOST is {env.get('IMH_HOST')!r}; probes need 0.0.0.0"


def check_ports_and_probes(m: Manifests, f: Facts) -> Iterator[str]:
    for workload, container in m.project_containers():
        where = f"{name_of(workload)} container {container['name']}"
        env, args = m.env(container), container.get("args") or [""]
        default = f.worker_port if args[0] == "worker" else f.defaults.get("port", 8000)
        port = int(env.get("IMH_PORT") or default)
        if args[0] == "worker" and port != f.worker_port:
            yield f"{where}: workers serve probes on {f.worker_port}, IMH_PORT is {port}"
        if port not in [p["containerPort"] for p in container.get("ports", [])]:
            yield f"{where}: listens on {port} (IMH_PORT), which is no containerPort"
        hosts = split_list(env.get("IMH_ALLOWED_HOSTS"))
        for probe, path in PROBES.items():
            spec = container.get(probe)
            if spec is None:
                if probe != "startupProbe":
                    yield f"{where}: no {probe}"
                continue
            get = spec.get("httpGet")
            if get is None:
                yield f"{where}: {probe} is not an HTTP GET"
                continue
            if get.get("path") != path:
                yield f"{where}: {probe} asks {get.get('path')!r}; the service answers {path}"
            if get.get("path") not in f.served_paths:
                yield f"{where}: {probe} path {get.get('path')!r} is served nowhere in service/"
            if container_port(container, get["port"]) != port:
                yield f"{where}: {probe} port {get['port']!r} is not the service's port {port}"
            host = {h["name"].lower(): h["value"] for h in get.get("httpHeaders", [])}.get("host")
            if hosts and host is not None and host not in hosts:
                yield f"{where}: {probe} sends Host {host!r}, not in IMH_ALLOWED_HOSTS"
        notes = m.pod(workload)["metadata"].get("annotations") or {}
        if notes.get("prometheus.io/scrape") != "true":
            yield f"{where}: not marked for scraping (prometheus.io/scrape)"
        elif notes.get("prometheus.io/port") != str(port):
            yield f"{where}: scraped on {notes.get('prometheus.io/port')!r}, serves {port}"
        elif notes.get("prometheus.io/path", "/metrics") not in f.served_paths:
            yield f"{where}: scrape path {notes.get('prometheus.io/path')!r} is served nowhere"


def check_hosts(m: Manifests, f: Facts) -> Iterator[str]:
    for workload, container in m.project_containers():
        if labels(workload).get(LABEL + "component") != "api":
            continue
        where = f"{name_of(workload)} container {container['name']}"
        env = m.env(container)
        if "IMH_ALLOWED_HOSTS" not in env or "IMH_ALLOWED_ORIGINS" not in env:
            yield f"{where}: IMH_ALLOWED_HOSTS and IMH_ALLOWED_ORIGINS must be set"
            continue
        hosts = split_list(env["IMH_ALLOWED_HOSTS"])
        if "*" in hosts or "*" in split_list(env["IMH_ALLOWED_ORIGINS"]):
            yield f"{where}: a wildcard in IMH_ALLOWED_HOSTS or IMH_ALLOWED_ORIGINS"
        pod = labels(m.pod(workload)).items()
        services = [s for s in m.of("Service") if (s["spec"].get("selector") or {}).items() <= pod]
        for service in services:
            name, ns = service["metadata"]["name"], m.namespace(service)
            for dns in (name, f"{name}.{ns}", f"{name}.{ns}.svc", f"{name}.{ns}.svc.cluster.local"):
                if dns not in hosts:
                    yield f"{where}: IMH_ALLOWED_HOSTS lacks {dns} ({name_of(service)})"
        names = {s["metadata"]["name"] for s in services}
        for ingress in m.of("Ingress"):
            for rule in ingress["spec"].get("rules", []):
                backends = {p["backend"]["service"]["name"]
                            for p in rule.get("http", {}).get("paths", [])}  # fmt: skip
                if backends & names and rule.get("host") not in hosts:
                    host = rule.get("host")
                    yield f"{where}: IMH_ALLOWED_HOSTS lacks {host} ({name_of(ingress)})"


def redis_target(m: Manifests, host: str, port: int, namespace: str) -> tuple | str:
    """(Service name, port) for an in-cluster name, (host, port) outside; a sentence when
    an in-cluster name names no Service here."""
    service = m.service_for(host, namespace)
    if service is not None:
        return ("service", service["metadata"]["name"], port)
    if "." not in host or host.endswith((".svc", ".svc.cluster.local")):
        return f"{host} names no Service here"
    return ("external", host, port)


def check_redis(m: Manifests, f: Facts) -> Iterator[str]:
    urls = {}
    for workload, container in m.project_containers():
        url = m.env(container).get("IMH_REDIS_URL")
        if not url:
            yield f"{name_of(workload)}: no IMH_REDIS_URL (distributed mode needs it)"
            continue
        urls[name_of(workload)] = (url, m.namespace(workload))
    if len({url for url, _ in urls.values()}) > 1:
        yield f"API and workers use different Redis: {urls}"
    if not urls:
        return
    url, namespace = next(iter(urls.values()))
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        yield f"IMH_REDIS_URL {url!r} is not a redis:// URL"
        return
    port, db = parts.port or 6379, (parts.path.strip("/") or "0")
    target = redis_target(m, parts.hostname, port, namespace)
    if isinstance(target, str):
        yield f"IMH_REDIS_URL: {target}"
        return
    if target[0] == "service":
        yield from check_redis_server(m, m.get("Service", target[1]), port)
    for scaler in m.of("ScaledObject"):
        workload = m.get("Deployment", scaler["spec"]["scaleTargetRef"]["name"])
        env = m.env(m.containers(workload)[0]) if workload else {}
        for trigger in scaler["spec"]["triggers"]:
            meta, where = trigger["metadata"], f"{name_of(scaler)} trigger {trigger.get('name')}"
            address = meta.get("address") or env.get(meta.get("addressFromEnv", ""), None)
            if address is None and (meta.get("host") or meta.get("hostFromEnv")):
                host = meta.get("host") or env.get(meta.get("hostFromEnv", ""))
                address = f"{host}:{meta.get('port') or env.get(meta.get('portFromEnv', ''))}"
            if not address or ":" not in address:
                yield f"{where}: no Redis address ({address!r})"
                continue
            host, _, trigger_port = address.rpartition(":")
            if host.count(".") == 0 and target[0] == "service":
                yield f"{where}: {host!r} resolves only in {namespace}; KEDA runs elsewhere"
            seen = redis_target(m, host, int(trigger_port), namespace)
            if seen != target:
                yield f"{where}: watches Redis at {address}, the service uses {url}"
            if meta.get("databaseIndex", "0") != db:
                index = meta.get("databaseIndex", "0")
                yield f"{where}: databaseIndex {index}, IMH_REDIS_URL's database {db}"


def check_redis_server(m: Manifests, service: dict, port: int) -> Iterator[str]:
    if not any(p["port"] == port for p in service["spec"]["ports"]):
        yield f"{name_of(service)}: no port {port} (IMH_REDIS_URL)"
    servers = m.selected_workloads(service["spec"].get("selector") or {})
    if [w["kind"] for w in servers] != ["StatefulSet"]:
        yield f"{name_of(service)}: should select one StatefulSet, selects {len(servers)} workloads"
        return
    (server,) = servers
    (container,) = m.containers(server)
    tag = image_tag(container["image"])
    if image_repository(container["image"]) != "redis" or int(tag.split(".")[0]) < 7:
        yield f"{name_of(server)}: runs {container['image']}; KEDA's lagCount needs Redis 7+"
    argv = (container.get("command") or []) + (container.get("args") or [])
    options = {argv[i]: argv[i + 1] for i in range(len(argv) - 1) if argv[i].startswith("--")}
    if options.get("--appendonly") != "yes":
        yield f"{name_of(server)}: no --appendonly yes: queued work dies with the pod"
    if options.get("--maxmemory-policy", "noeviction") != "noeviction":
        yield f"{name_of(server)}: maxmemory-policy evicts keys (queued work, results)"
    limit = container.get("resources", {}).get("limits", {}).get("memory")
    if "--maxmemory" not in options or limit is None:
        yield f"{name_of(server)}: set --maxmemory below the memory limit"
    elif quantity(options["--maxmemory"]) >= quantity(limit):
        yield f"{name_of(server)}: --maxmemory {options['--maxmemory']} >= memory limit {limit}"
    claims = {t["metadata"]["name"] for t in server["spec"].get("volumeClaimTemplates", [])}
    data_dir = options.get("--dir", "/data")
    if not any(v["mountPath"] == data_dir and v["name"] in claims
               for v in container.get("volumeMounts", [])):  # fmt: skip
        yield f"{name_of(server)}: {data_dir} is not on a volume claim (the append-only file)"


def check_keda(m: Manifests, f: Facts) -> Iterator[str]:
    workers = [w for w, _ in m.project_containers()
               if labels(w).get(LABEL + "component") == "worker"]  # fmt: skip
    if not workers:
        return
    for worker in workers:
        scalers = scaled_objects_of(m, worker)
        if len(scalers) != 1:
            yield f"{name_of(worker)}: scaled by {len(scalers)} ScaledObjects, not 1"
            continue
        (scaler,) = scalers
        env = m.env(m.containers(worker)[0])
        prefix = env.get("IMH_REDIS_PREFIX") or f.defaults.get("redis_prefix", "imh")
        streams = {f.work_stream(prefix, s): s for s in f.streams}
        spec, where = scaler["spec"], name_of(scaler)
        if spec.get("minReplicaCount", 0) < 1:
            yield f"{where}: minReplicaCount < 1: with no worker the API queues nothing to scale on"
        if spec.get("maxReplicaCount", 100) < spec.get("minReplicaCount", 0):
            yield f"{where}: maxReplicaCount < minReplicaCount"
        modes: dict[str, tuple[str, str]] = {}  # trigger name -> (stream suffix, lag|pending)
        for trigger in spec["triggers"]:
            meta, name = trigger["metadata"], trigger.get("name", "?")
            if trigger["type"] != "redis-streams":
                yield f"{where} trigger {name}: type {trigger['type']}, not redis-streams"
                continue
            unknown = set(meta) - REDIS_STREAMS_PARAMETERS
            if unknown:
                yield f"{where} trigger {name}: unknown redis-streams parameters {sorted(unknown)}"
            if meta.get("stream") not in streams:
                yield (f"{where} trigger {name}: stream {meta.get('stream')!r} is no work "
                       f"stream ({sorted(streams)})")  # fmt: skip
                continue
            if meta.get("consumerGroup") != f.group:
                yield (f"{where} trigger {name}: consumer group "
                       f"{meta.get('consumerGroup')!r}, the workers' is {f.group!r}")  # fmt: skip
            kinds = [k for k in ("lagCount", "pendingEntriesCount", "streamLength") if k in meta]
            if len(kinds) != 1 or kinds[0] == "streamLength":
                yield f"{where} trigger {name}: needs exactly one of lagCount, pendingEntriesCount"
                continue
            modes[name] = (streams[meta["stream"]], "lag" if kinds[0] == "lagCount" else "pending")
        for stream in f.streams:
            for mode in ("lag", "pending"):
                if (stream, mode) not in modes.values():
                    yield f"{where}: no {mode} trigger on the {stream} stream"
        modifiers = spec.get("advanced", {}).get("scalingModifiers")
        if modifiers is None:
            yield f"{where}: no scalingModifiers formula adding lag and pending per stream"
            continue
        formula = modifiers.get("formula", "")
        used = set(re.findall(r"[A-Za-z_]\w*", formula))
        if used != set(modes):
            yield f"{where}: formula uses {sorted(used)}, triggers are {sorted(modes)}"
        terms = re.findall(r"\(\s*(\w+)\s*\+\s*(\w+)\s*\)\s*/\s*([0-9.]+)", formula)
        slots = {
            "jobs": int(
                env.get("IMH_WORKER_SHARD_SLOTS") or f.defaults.get("worker_shard_slots", 2)
            ),
            "online": int(env.get("IMH_WORKER_SLOTS") or f.defaults.get("worker_slots", 256)),
        }
        per_stream = {}
        for a, b, divisor in terms:
            pair = {modes.get(a), modes.get(b)}
            streams_of = {mode[0] for mode in pair if mode}
            if len(streams_of) != 1 or {mode[1] for mode in pair if mode} != {"lag", "pending"}:
                yield f"{where}: formula term ({a} + {b}) is not one stream's lag plus pending"
                continue
            per_stream[streams_of.pop()] = float(divisor)
        if set(per_stream) != set(f.streams):
            yield f"{where}: formula {formula!r} has no (lag + pending) / n term per stream"
        if "jobs" in per_stream and per_stream["jobs"] != slots["jobs"]:
            yield (f"{where}: jobs backlog divided by {per_stream['jobs']:g}, a worker runs "
                   f"{slots['jobs']} shards (IMH_WORKER_SHARD_SLOTS)")  # fmt: skip
        if "online" in per_stream and per_stream["online"] > slots["online"]:
            yield (f"{where}: online backlog divided by {per_stream['online']:g}, more "
                   f"than IMH_WORKER_SLOTS {slots['online']}")  # fmt: skip


def check_termination(m: Manifests, f: Facts) -> Iterator[str]:
    for workload, container in m.project_containers():
        if labels(workload).get(LABEL + "component") != "worker":
            continue
        env = m.env(container)
        drain = float(env.get("IMH_WORKER_DRAIN_S") or f.defaults["worker_drain_s"])
        grace = m.pod(workload)["spec"].get("terminationGracePeriodSeconds", 30)
        if grace < drain + SHUTDOWN_MARGIN_S:
            yield (f"{name_of(workload)}: terminationGracePeriodSeconds {grace} < drain "
                   f"{drain:g} s + {SHUTDOWN_MARGIN_S:g} s: the kubelet kills a draining "
                   "worker")  # fmt: skip


def check_resources(m: Manifests, f: Facts) -> Iterator[str]:
    for workload in m.workloads():
        for container in m.containers(workload):
            where = f"{name_of(workload)} container {container['name']}"
            resources = container.get("resources", {})
            requests, limits = resources.get("requests", {}), resources.get("limits", {})
            for kind in ("cpu", "memory"):
                if kind not in requests or kind not in limits:
                    yield f"{where}: needs {kind} requests and limits"
                elif quantity(requests[kind]) > quantity(limits[kind]):
                    yield f"{where}: {kind} request above its limit"
    for workload, container in m.project_containers():
        where = f"{name_of(workload)} container {container['name']}"
        env, limits = m.env(container), container.get("resources", {}).get("limits", {})
        threads = env.get("IMH_TORCH_THREADS")
        if threads and "cpu" in limits and int(threads) > quantity(limits["cpu"]):
            yield f"{where}: IMH_TORCH_THREADS {threads} above the CPU limit {limits['cpu']}"
        gpus = limits.get("nvidia.com/gpu")
        device = (env.get("IMH_DEVICE") or "").split(":")[0]
        if device == "cuda" and gpus is None:
            yield f"{where}: IMH_DEVICE=cuda without an nvidia.com/gpu limit"
        if gpus is not None and (int(gpus) != 1 or device != "cuda"):
            yield f"{where}: one GPU per worker, with IMH_DEVICE=cuda ({gpus}, {device!r})"


def check_model_store(m: Manifests, f: Facts) -> Iterator[str]:
    claims = set()
    for workload, container in m.project_containers():
        where = f"{name_of(workload)} container {container['name']}"
        store = m.env(container).get("IMH_MODEL_STORE")
        if not store:
            yield f"{where}: IMH_MODEL_STORE is not set"
            continue
        volumes = {v["name"]: v for v in m.pod(workload)["spec"].get("volumes", [])}
        mounts = [
            v for v in container.get("volumeMounts", []) if v["mountPath"] == store.rstrip("/")
        ]
        claim = (
            volumes.get(mounts[0]["name"], {}).get("persistentVolumeClaim", {}) if mounts else {}
        )
        if not claim:
            yield f"{where}: IMH_MODEL_STORE {store} is not on a volume claim"
            continue
        claims.add(claim["claimName"])
        pvc = m.get("PersistentVolumeClaim", claim["claimName"])
        if pvc is not None and "ReadWriteMany" not in pvc["spec"].get("accessModes", []):
            yield f"{name_of(pvc)}: pods on several nodes share it: needs ReadWriteMany"
    if len(claims) > 1:
        yield f"API and workers mount different model stores: {sorted(claims)}"


def check_security(m: Manifests, f: Facts) -> Iterator[str]:
    for workload in m.workloads():
        spec = m.pod(workload)["spec"]
        if not spec.get("securityContext", {}).get("runAsNonRoot"):
            yield f"{name_of(workload)}: pods may run as root (runAsNonRoot)"
        if spec.get("automountServiceAccountToken") is not False:
            yield f"{name_of(workload)}: mounts a service account token it never uses"
        for container in m.containers(workload):
            context = container.get("securityContext", {})
            if context.get("allowPrivilegeEscalation") is not False or context.get("privileged"):
                yield f"{name_of(workload)} container {container['name']}: may escalate privileges"


CHECKS = [
    check_labels, check_selectors, check_references, check_commands, check_environment,
    check_ports_and_probes, check_hosts, check_redis, check_keda, check_termination,
    check_resources, check_model_store, check_security,
]  # fmt: skip


# --- Schemas ---------------------------------------------------------------------------


def crd_json_schema(crd: dict, version: str) -> dict:
    """The JSON Schema of one version of a CRD, refusing unknown fields (as kubectl's
    strict field validation does; the API server would silently drop them)."""
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]

    def convert(node: dict) -> dict:
        node = dict(node)
        if node.pop("x-kubernetes-int-or-string", False):
            node.pop("type", None)
            node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        open_object = node.pop("x-kubernetes-preserve-unknown-fields", False)
        node = {k: v for k, v in node.items() if not k.startswith("x-kubernetes-")}
        if node.pop("nullable", False) and "type" in node:
            node["type"] = [node["type"], "null"]
        if "properties" in node:
            node["properties"] = {k: convert(v) for k, v in node["properties"].items()}
            if "additionalProperties" not in node and not open_object:
                node["additionalProperties"] = False
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                node[key] = convert(node[key])
        for key in ("anyOf", "oneOf", "allOf"):
            if key in node:
                node[key] = [convert(item) for item in node[key]]
        return node

    return convert(served["schema"]["openAPIV3Schema"])


@functools.cache
def keda_schema() -> dict:
    documents = [d for d in yaml.safe_load_all(KEDA_CRD.read_text()) if d]
    (crd,) = [d for d in documents if d["metadata"]["name"] == "scaledobjects.keda.sh"]
    return crd_json_schema(crd, "v1alpha1")


def schema_problems(m: Manifests, versions: tuple[str, ...]) -> Iterator[str]:
    """Every object against the Kubernetes API schemas of `versions` (strict: unknown
    fields are errors), ScaledObjects against KEDA's CRD schema."""
    import jsonschema
    import kubernetes_validate

    keda = jsonschema.Draft202012Validator(keda_schema())
    for obj in m.objects:
        if obj.get("apiVersion") == "keda.sh/v1alpha1" and obj.get("kind") == "ScaledObject":
            for error in keda.iter_errors(obj):
                path = ".".join(map(str, error.absolute_path))
                yield f"{name_of(obj)}: KEDA schema: {path}: {error.message}"
            continue
        for version in versions:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                path = ".".join(map(str, error.path))
                yield f"{name_of(obj)}: Kubernetes {version} schema: {path}: {error.message}"
            except kubernetes_validate.SchemaNotFoundError as error:
                yield f"{name_of(obj)}: {error.message}"


def problems(objects: list[dict], versions: tuple[str, ...] = ()) -> list[str]:
    """Everything wrong with a rendered set of objects; schema checks for `versions`."""
    m, f = Manifests(objects), facts()
    found = [problem for check in CHECKS for problem in check(m, f)]
    if versions:
        found += list(schema_problems(m, versions))
    return found
