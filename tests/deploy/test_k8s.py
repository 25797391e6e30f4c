"""Kubernetes manifests (deploy/k8s): the base and every overlay render, validate against
the Kubernetes API schemas and KEDA's, and agree with each other and with the service.

No cluster runs here: `kubectl kustomize` renders (skipped without kubectl), the
`kubernetes-validate` package holds the Kubernetes API schemas, and
tests/deploy/schemas/ KEDA's ScaledObject. The consistency checks are in
tests/deploy/k8s.py; the last tests here feed them broken manifests.
"""

from __future__ import annotations

import copy
import functools
import os
from pathlib import Path

import pytest
import yaml

from tests.deploy import k8s
from tests.deploy.k8s import K8S, LABEL, facts, problems, render

pytestmark = pytest.mark.skipif(k8s.kubectl() is None, reason="kubectl is not installed")

TARGETS = ["base", "overlays/cpu", "overlays/gpu"]
OLDEST = "1.33"  # the oldest Kubernetes these manifests are checked against


def versions() -> tuple[str, ...]:
    """The oldest supported Kubernetes, and the newest kubernetes-validate knows."""
    from kubernetes_validate.utils import latest_version, major_minor

    return (OLDEST, major_minor(latest_version()))


@functools.cache
def rendered(target: str) -> tuple[dict, ...]:
    return tuple(render(K8S / target))


def objects(target: str) -> list[dict]:
    return copy.deepcopy(list(rendered(target)))


def user_overlay(tmp_path: Path, resource: str, **fields) -> list[dict]:
    """A user's overlay of deploy/k8s/<resource>, with more kustomization fields."""
    kustomization = {"resources": [os.path.relpath(K8S / resource, tmp_path)], **fields}
    if "components" in kustomization:
        kustomization["components"] = [
            os.path.relpath(K8S / c, tmp_path) for c in kustomization["components"]
        ]
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return render(tmp_path)


def find(objs: list[dict], kind: str, name: str) -> dict:
    (obj,) = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    return obj


def container(objs: list[dict], name: str) -> dict:
    return find(objs, "Deployment", name)["spec"]["template"]["spec"]["containers"][0]


def env_var(objs: list[dict], deployment: str, name: str) -> dict:
    (var,) = [v for v in container(objs, deployment)["env"] if v["name"] == name]
    return var


# --- The shipped manifests ---------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_renders_and_agrees_with_the_service(target):
    assert problems(objects(target)) == []


@pytest.mark.parametrize("target", TARGETS)
def test_validates_against_kubernetes_and_keda_schemas(target):
    pytest.importorskip("kubernetes_validate", reason="needs the kubernetes-validate package")
    assert problems(objects(target), versions()) == []


def test_external_redis_component_replaces_the_in_cluster_redis(tmp_path):
    objs = user_overlay(tmp_path, "base", components=["components/external-redis"])
    assert not [o for o in objs if o["kind"] == "StatefulSet"]
    assert "imh-redis" not in [o["metadata"]["name"] for o in objs if o["kind"] == "Service"]
    assert problems(objs) == []


def test_another_namespace_needs_the_names_that_depend_on_it(tmp_path):
    found = problems(user_overlay(tmp_path, "overlays/cpu", namespace="other"))
    assert any("IMH_ALLOWED_HOSTS lacks imh-api.other" in problem for problem in found), found
    assert any("watches Redis at imh-redis.imh.svc:6379" in problem for problem in found), found


def test_keda_crd_is_a_valid_custom_resource_definition():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    (crd,) = [d for d in yaml.safe_load_all(k8s.KEDA_CRD.read_text()) if d]
    kubernetes_validate.validate(crd, OLDEST, strict=True)
    assert k8s.keda_schema()["properties"]["spec"]["additionalProperties"] is False


def test_overlays_choose_the_device():
    cpu, gpu = objects("overlays/cpu"), objects("overlays/gpu")
    worker_cpu, worker_gpu = container(cpu, "imh-worker"), container(gpu, "imh-worker")
    assert env_var(cpu, "imh-worker", "IMH_DEVICE")["value"] == "cpu"
    assert "nvidia.com/gpu" not in worker_cpu["resources"]["limits"]
    assert env_var(gpu, "imh-worker", "IMH_DEVICE")["value"] == "cuda"
    assert worker_gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert k8s.image_tag(worker_gpu["image"]).startswith("cu")  # the CUDA build
    assert k8s.image_tag(container(gpu, "imh-api")["image"]) == "cpu"


@pytest.mark.parametrize("target", TARGETS)
def test_no_real_admin_token_is_committed(target):
    m = k8s.Manifests(objects(target))
    tokens = [m.data("Secret", s["metadata"]["name"]).get("IMH_ADMIN_TOKEN")
              for s in m.of("Secret")]  # fmt: skip
    assert [t for t in tokens if t is not None] == [""]
    var = env_var(objects(target), "imh-api", "IMH_ADMIN_TOKEN")
    assert "secretKeyRef" in var["valueFrom"]


def test_cors_is_closed_by_default():
    for target in TARGETS:
        assert env_var(objects(target), "imh-api", "IMH_ALLOWED_ORIGINS")["value"] == ""


def test_metric_names_in_the_k8s_files_are_exported_by_the_service():
    known = facts().metrics | {"up"}
    texts = [p for p in K8S.rglob("*") if p.suffix in (".yaml", ".md")]
    assert texts
    for path in texts:
        assert k8s.unknown_metric_names(path.read_text(), known) == set(), path
    assert k8s.unknown_metric_names("rate(imh_proposals_total[1m])", known) == set()
    assert k8s.unknown_metric_names("imh_nonexistent_total", known) == {"imh_nonexistent_total"}


def test_drain_time_and_trusted_hosts_are_settings():
    # The grace period, the Host check and CORS in the manifests rest on these.
    assert {"worker_drain_s", "allowed_hosts", "allowed_origins"} <= facts().settings


# --- The checker notices broken manifests ------------------------------------------------


def mutate_env(name: str, value: str | None, deployment: str = "imh-worker"):
    def change(objs):
        target = container(objs, deployment)
        target["env"] = [v for v in target["env"] if v["name"] != name]
        if value is not None:
            target["env"].append({"name": name, "value": value})

    return change


def mutate(path: str | list, value, kind: str = "Deployment", name: str = "imh-worker"):
    """Set a path (dotted, list indices as numbers; or a list of keys) in one object;
    value None deletes."""

    def change(objs):
        node = find(objs, kind, name)
        parts = path if isinstance(path, list) else path.split(".")
        parts = [int(p) if p.isdigit() else p for p in parts]
        for part in parts[:-1]:
            node = node[part]
        if value is None:
            del node[parts[-1]]
        else:
            node[parts[-1]] = value

    return change


POD = "spec.template.spec"
WORKER = f"{POD}.containers.0"
BROKEN = {
    "unknown setting": (mutate_env("IMH_NO_SUCH_SETTING", "1"), "is not a setting"),
    "bad setting value": (mutate_env("IMH_WORKER_SHARD_SLOTS", "0"), "refuses these settings"),
    "loopback host": (mutate_env("IMH_HOST", "127.0.0.1"), "probes need 0.0.0.0"),
    "wrong command": (mutate(f"{WORKER}.args", ["serve"]), "runs `imh serve`"),
    "unknown command": (mutate(f"{WORKER}.args", ["work"]), "no `imh` command"),
    "wrong probe path": (
        mutate(f"{WORKER}.readinessProbe.httpGet.path", "/ready"),
        "asks '/ready'",
    ),
    "wrong probe port": (
        mutate(f"{WORKER}.livenessProbe.httpGet.port", 8000),
        "not the service's port",
    ),
    "wrong scrape port": (
        mutate(
            "spec.template.metadata.annotations",
            {"prometheus.io/scrape": "true", "prometheus.io/port": "8000"},
        ),
        "scraped on '8000'",
    ),  # fmt: skip
    "worker port": (mutate_env("IMH_PORT", "9000"), "workers serve probes on"),
    "missing label": (
        mutate(["metadata", "labels", f"{LABEL}part-of"], None, "Service", "imh-api"),
        "missing labels",
    ),
    "stale version": (
        mutate(["metadata", "labels", f"{LABEL}version"], "0.0.1", "Service", "imh-api"),
        "label version",
    ),
    "wrong stream": (
        mutate("spec.triggers.0.metadata.stream", "imh:work:onlin", "ScaledObject"),
        "no work stream",
    ),
    "wrong group": (
        mutate("spec.triggers.1.metadata.consumerGroup", "worker", "ScaledObject"),
        "consumer group",
    ),
    "lag only": (
        lambda objs: find(objs, "ScaledObject", "imh-worker")["spec"]["triggers"].pop(3),
        "no pending trigger on the jobs stream",
    ),
    "scale to zero": (mutate("spec.minReplicaCount", 0, "ScaledObject"), "minReplicaCount < 1"),
    "formula divisor": (
        mutate(
            "spec.advanced.scalingModifiers.formula",
            "(online_lag + online_pending) / 64 + (jobs_lag + jobs_pending) / 4",
            "ScaledObject",
        ),
        "runs 2 shards",
    ),  # fmt: skip
    "short redis address": (
        mutate(
            "spec.triggers.0.metadata",
            {
                "address": "imh-redis:6379",
                "stream": "imh:work:online",
                "consumerGroup": "workers",
                "lagCount": "64",
            },
            "ScaledObject",
        ),
        "KEDA runs elsewhere",
    ),  # fmt: skip
    "redis db": (
        mutate("spec.triggers.2.metadata.databaseIndex", "1", "ScaledObject"),
        "databaseIndex",
    ),
    "short grace period": (
        mutate(f"{POD}.terminationGracePeriodSeconds", 30),
        "kills a draining worker",
    ),
    "replicas with autoscaler": (mutate("spec.replicas", 3), "sets replicas"),
    "threads above cpu": (mutate_env("IMH_TORCH_THREADS", "16"), "above the CPU limit"),
    "no limits": (mutate(f"{WORKER}.resources.limits", None), "needs cpu requests and limits"),
    "gpu without cuda": (
        mutate(f"{WORKER}.resources.limits", {"cpu": "2", "memory": "4Gi", "nvidia.com/gpu": 1}),
        "one GPU per worker",
    ),
    "store not mounted": (mutate_env("IMH_MODEL_STORE", "/models"), "not on a volume claim"),
    "untrusted probe host": (
        mutate(
            f"{WORKER}.readinessProbe.httpGet.httpHeaders",
            [{"name": "Host", "value": "x"}],
            "Deployment",
            "imh-api",
        ),
        "not in IMH_ALLOWED_HOSTS",
    ),  # fmt: skip
    "service name not allowed": (
        mutate_env("IMH_ALLOWED_HOSTS", "imh-api,imh.example.com", "imh-api"),
        "lacks imh-api.imh",
    ),
    "no redis persistence": (
        mutate(f"{POD}.containers.0.args", ["--maxmemory", "3gb"], "StatefulSet", "imh-redis"),
        "no --appendonly yes",
    ),
    "redis 6": (
        mutate(f"{POD}.containers.0.image", "redis:6.2", "StatefulSet", "imh-redis"),
        "Redis 7+",
    ),
    "service port": (
        mutate("spec.ports.0.targetPort", 8080, "Service", "imh-api"),
        "no port of its pods",
    ),
    "dangling secret": (
        mutate(
            f"{WORKER}.env",
            [
                {
                    "name": "IMH_REDIS_URL",
                    "valueFrom": {"secretKeyRef": {"name": "nope", "key": "IMH_REDIS_URL"}},
                }
            ],
        ),
        "which is not here",
    ),  # fmt: skip
    "root": (mutate(f"{POD}.securityContext", {}), "may run as root"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_checker_notices(case):
    change, expected = BROKEN[case]
    objs = objects("overlays/cpu")
    assert problems(objs) == []
    change(objs)
    found = problems(objs)
    assert any(expected in problem for problem in found), found


@pytest.mark.parametrize(
    "case, change, expected",
    [
        ("unknown field", mutate(f"{WORKER}.portz", [8001]), "Additional properties"),
        ("wrong type", mutate("spec.revisionHistoryLimit", "five"), "is not of type"),
        ("keda unknown field", mutate("spec.pollingIntervall", 5, "ScaledObject"), "KEDA schema"),
        ("keda trigger metadata", mutate("spec.triggers.0.metadata.lagCount", 64, "ScaledObject"),
         "KEDA schema"),
    ],
)  # fmt: skip
def test_schema_check_notices(case, change, expected):
    pytest.importorskip("kubernetes_validate", reason="needs the kubernetes-validate package")
    objs = objects("base")
    change(objs)
    found = problems(objs, (OLDEST,))
    assert any(expected in problem for problem in found), found


def test_crd_schema_conversion_refuses_unknown_fields_and_keeps_open_maps():
    crd = {"spec": {"versions": [{"name": "v1", "schema": {"openAPIV3Schema": {
        "type": "object", "properties": {
            "a": {"type": "object", "properties": {"b": {"type": "integer"}}},
            "m": {"type": "object", "additionalProperties": {"type": "string"}},
            "q": {"x-kubernetes-int-or-string": True},
            "s": {"type": "object", "x-kubernetes-preserve-unknown-fields": True,
                  "properties": {"c": {"type": "string", "nullable": True}}},
        }}}}]}}  # fmt: skip
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(k8s.crd_json_schema(crd, "v1"))
    assert validator.is_valid(
        {"a": {"b": 1}, "m": {"x": "y"}, "q": "1Gi", "s": {"z": 1, "c": None}}
    )
    assert not validator.is_valid({"a": {"c": 1}})
    assert not validator.is_valid({"m": {"x": 1}})
    assert validator.is_valid({"q": 2}) and not validator.is_valid({"q": 2.5})
