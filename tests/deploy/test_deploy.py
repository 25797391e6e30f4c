"""Deployment files: docker-compose.yml, the Dockerfile, Prometheus and Grafana config.

No Docker engine runs here, so these check what holds without one: every file parses,
refers to files that exist, and agrees with the others and with the service (its
commands, settings and metric names); and the image's health probe works against a
local HTTP server.
"""

from __future__ import annotations

import argparse
import copy
import http.server
import json
import re
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import pytest
import yaml

from service.metrics import Metrics
from tests.deploy.checks import (
    dashboard_queries,
    dockerfile_instructions,
    dockerignore_rules,
    exported_series_names,
    final_stage,
    healthcheck_command,
    is_ignored,
    promql_metric_names,
    read_json,
    unknown_metrics,
)

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
DOCKERFILE = dockerfile_instructions((ROOT / "Dockerfile").read_text())
IMAGE = final_stage(DOCKERFILE)
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROMETHEUS = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
DASHBOARD_PATH = ROOT / "deploy/grafana/dashboards/imh.json"
GRAFANA = ROOT / "deploy/grafana/provisioning"
KNOWN_SERIES = exported_series_names(Metrics().registry) | {"up"}


def instruction(name: str, stage: list[tuple[str, str]] = IMAGE) -> list[str]:
    return [arguments for keyword, arguments in stage if keyword == name]


def environment(service: str) -> dict[str, str]:
    env = SERVICES[service].get("environment", {})
    if isinstance(env, list):  # the KEY=VALUE list form
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def command(service: str) -> list[str]:
    value = SERVICES[service].get("command", [])
    return value.split() if isinstance(value, str) else list(value)


def port_mappings(service: str) -> list[tuple[str | None, str]]:
    """(host port or None, container port) for each `ports` entry."""
    mappings = []
    for entry in SERVICES[service].get("ports", []):
        if isinstance(entry, dict):
            host, target = entry.get("published"), entry["target"]
        else:
            *host_parts, target = str(entry).split("/")[0].split(":")
            host = host_parts[-1] if host_parts else None
        mappings.append((str(host) if host else None, str(target)))
    return mappings


def mounts(service: str) -> list[tuple[str, str, str]]:
    """(kind, source, target) with kind "bind" or "volume" for each `volumes` entry."""
    result = []
    for entry in SERVICES[service].get("volumes", []):
        if isinstance(entry, dict):
            result.append((entry["type"], entry["source"], entry["target"]))
            continue
        source, target = entry.split(":")[:2]
        kind = "bind" if source.startswith((".", "/", "~")) else "volume"
        result.append((kind, source, target))
    return result


def image_services() -> list[str]:
    """Services that run the project's image (they build from this repo's Dockerfile)."""
    return [name for name, spec in SERVICES.items() if "build" in spec]


def image_commands() -> list[str]:
    """`imh <command>` for every command the image runs: compose's and the Dockerfile CMD's."""
    commands = {command(name)[0] for name in image_services() if command(name)}
    commands.update(json.loads(cmd)[0] for cmd in instruction("CMD"))
    return sorted(commands)


# --- docker-compose.yml -----------------------------------------------------------------


def test_every_service_names_an_image_or_a_build():
    assert {"redis", "api", "worker", "prometheus", "grafana"} <= set(SERVICES)
    for name, spec in SERVICES.items():
        assert "image" in spec or "build" in spec, name


def test_compose_references_only_files_and_volumes_that_exist():
    declared_volumes = set(COMPOSE.get("volumes") or {})
    for name, spec in SERVICES.items():
        build = spec.get("build")
        if build is not None:
            context = ROOT / (build if isinstance(build, str) else build.get("context", "."))
            dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile")
            assert context.is_dir(), f"{name}: build context {context}"
            assert (context / (dockerfile or "Dockerfile")).is_file(), f"{name}: {dockerfile}"
        for kind, source, target in mounts(name):
            if kind == "bind":
                assert (ROOT / source).exists(), f"{name}: bind mount {source} -> {target}"
            else:
                assert source in declared_volumes, f"{name}: volume {source} is not declared"


def test_api_and_workers_run_one_image_built_from_the_dockerfile():
    assert image_services() == ["api", "worker"]
    assert SERVICES["api"]["image"] == SERVICES["worker"]["image"]
    assert SERVICES["api"]["build"] == SERVICES["worker"]["build"]
    assert command("api") == ["serve"]
    assert command("worker") == ["worker"]


def test_worker_can_be_scaled():
    worker = SERVICES["worker"]
    assert "container_name" not in worker, "a fixed name allows only one replica"
    published = [host for host, _ in port_mappings("worker") if host is not None]
    assert not published, f"a host port allows only one replica: {published}"


def test_api_publishes_its_port():
    api_port = environment("api").get("IMH_PORT", "8000")
    assert (api_port, api_port) in port_mappings("api")


def test_api_and_workers_share_redis_and_the_model_store():
    for name in image_services():
        env = environment(name)
        url = env["IMH_REDIS_URL"]
        assert re.fullmatch(r"redis://redis:6379(/\d+)?", url), f"{name}: {url}"
        assert SERVICES[name]["depends_on"]["redis"]["condition"] == "service_healthy"
        store = env["IMH_MODEL_STORE"]
        volumes = {target: source for kind, source, target in mounts(name) if kind == "volume"}
        assert store in volumes, f"{name}: IMH_MODEL_STORE={store} is not on a volume"
    api_volumes = {target: source for _, source, target in mounts("api")}
    worker_volumes = {target: source for _, source, target in mounts("worker")}
    store = environment("api")["IMH_MODEL_STORE"]
    assert api_volumes[store] == worker_volumes[environment("worker")["IMH_MODEL_STORE"]]


def test_workers_serve_probes_on_8001():
    assert environment("worker")["IMH_PORT"] == "8001"


def test_imh_variables_in_compose_are_settings():
    from service.settings import Settings

    prefix = Settings.model_config["env_prefix"]
    for name in image_services():
        for key in environment(name):
            if key.startswith(prefix):
                field = key.removeprefix(prefix).lower()
                assert field in Settings.model_fields, f"{name}: {key} is not a setting"


def test_redis_persists_its_data():
    redis = SERVICES["redis"]
    argv = command("redis")
    assert argv[argv.index("--appendonly") + 1] == "yes"
    assert ("volume", "redis-data", "/data") in mounts("redis")
    assert redis["healthcheck"]["test"][-2:] == ["redis-cli", "ping"]


# --- Prometheus and Grafana -------------------------------------------------------------


def scrape_jobs() -> dict[str, dict]:
    return {job["job_name"]: job for job in PROMETHEUS["scrape_configs"]}


def test_prometheus_scrapes_the_api_and_every_worker_replica():
    jobs = scrape_jobs()
    api_port = environment("api").get("IMH_PORT", "8000")
    targets = [t for config in jobs["api"]["static_configs"] for t in config["targets"]]
    assert targets == [f"api:{api_port}"]
    # Replicas share the service's DNS name: DNS discovery, not a fixed target.
    (discovery,) = jobs["worker"]["dns_sd_configs"]
    assert discovery["names"] == ["worker"]
    assert str(discovery["port"]) == environment("worker")["IMH_PORT"]
    mounted = {source for kind, source, _ in mounts("prometheus") if kind == "bind"}
    assert "./deploy/prometheus/prometheus.yml" in mounted


def test_grafana_provisioning_points_at_prometheus_and_the_dashboards():
    (datasource,) = yaml.safe_load((GRAFANA / "datasources/prometheus.yml").read_text())[
        "datasources"
    ]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((GRAFANA / "dashboards/imh.yml").read_text())["providers"]
    binds = {source: target for kind, source, target in mounts("grafana") if kind == "bind"}
    assert binds["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    assert binds["./deploy/grafana/dashboards"] == provider["options"]["path"]
    dashboard = read_json(DASHBOARD_PATH)
    sources = {panel["datasource"]["uid"] for panel in dashboard["panels"] if "datasource" in panel}
    assert sources == {datasource["uid"]}


def test_dashboard_queries_use_only_exported_metrics():
    dashboard = read_json(DASHBOARD_PATH)
    assert unknown_metrics(dashboard, KNOWN_SERIES) == {}


def test_dashboard_covers_the_service_health_signals():
    used = set()
    for _, expr in dashboard_queries(read_json(DASHBOARD_PATH)):
        used |= promql_metric_names(expr)
    expected = {
        "imh_http_requests_total",
        "imh_http_request_duration_seconds_bucket",
        "imh_batch_rows_bucket",
        "imh_accepted_total",
        "imh_proposals_total",
        "imh_running_fid",
        "imh_job_shards_total",
        "imh_job_items_total",
        "imh_jobs",
        "imh_queue_depth",
        "imh_queued_rows",
        "imh_workers",
        "up",
        "imh_redeliveries_total",
        "imh_dead_letters_total",
        "imh_redis_up",
    }
    assert expected - used == set()


def test_dashboard_panels_do_not_overlap():
    taken = set()
    for panel in read_json(DASHBOARD_PATH)["panels"]:
        box = panel["gridPos"]
        assert box["x"] + box["w"] <= 24, panel["title"]
        cells = {(x, y) for x in range(box["x"], box["x"] + box["w"])
                 for y in range(box["y"], box["y"] + box["h"])}  # fmt: skip
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells
        if panel["type"] != "row":
            assert panel.get("targets"), f"{panel['title']} has no query"


@pytest.mark.parametrize(
    "expr, unknown",
    [
        ("rate(imh_nonexistent_total[5m])", {"imh_nonexistent_total"}),
        ('sum by (route) (imh_nonexistent{route="/v1"})', {"imh_nonexistent"}),
        ("imh_workers_total", {"imh_workers_total"}),  # a gauge has no _total
        ("rate(imh_http_requests[5m])", {"imh_http_requests"}),  # a counter needs _total
        ("histogram_quantile(0.5, rate(imh_jobs_bucket[5m]))", {"imh_jobs_bucket"}),
        ("up or imh_redis_up2", {"imh_redis_up2"}),
        # Label names, functions, variables, strings and numbers are not metrics.
        (
            "histogram_quantile(0.95, sum by (le, model) (rate(imh_batch_rows_bucket"
            '{model=~"$model", method="imh_x"}[$__rate_interval])))',
            set(),
        ),
        ('count(up{job="worker"} == 1) or vector(0)', set()),
        ("sum(increase(imh_dead_letters_total[$__range])) * 1e3 offset 5m", set()),
        ("sum(rate(imh_batch_rows_sum[1m])) / sum(rate(imh_batch_rows_count[1m]))", set()),
        ("label_values(imh_proposals_total, model)", set()),
        ("label_values(imh_nope, model)", {"imh_nope"}),
    ],
)
def test_metric_check_tells_exported_names_from_unknown_ones(expr, unknown):
    assert promql_metric_names(expr) - KNOWN_SERIES == unknown


def test_metric_check_catches_a_bad_panel_in_the_dashboard():
    dashboard = copy.deepcopy(read_json(DASHBOARD_PATH))
    dashboard["panels"][-1]["targets"].append(
        {"refId": "Z", "expr": "sum(rate(imh_nonexistent_total[5m]))"}
    )
    (problem,) = unknown_metrics(dashboard, KNOWN_SERIES).values()
    assert problem == {"imh_nonexistent_total"}


# --- Dockerfile and .dockerignore -------------------------------------------------------


def test_dockerfile_builds_from_python_slim_and_runs_as_non_root():
    for base in instruction("FROM", DOCKERFILE):
        assert re.match(r"python:\S*slim", base), base
    users = instruction("USER")
    assert users and users[-1].split(":")[0] not in {"root", "0"}


def test_dockerfile_picks_the_torch_build_with_an_argument():
    args = dict(arg.partition("=")[::2] for arg in instruction("ARG", DOCKERFILE))
    assert args["TORCH_INDEX"] == "cpu"
    # The same torch as `make` installs for development.
    assert args["TORCH_VERSION"] in re.findall(r"torch==([\w.+]+)", (ROOT / "Makefile").read_text())
    # Each `pip install` command of each RUN, in build order: torch's must come first.
    installs = [
        command
        for run in instruction("RUN", DOCKERFILE)
        for command in re.split(r"&&|;|\|\|", run)
        if "pip install" in command
    ]
    assert "download.pytorch.org/whl/${TORCH_INDEX}" in installs[0], "torch is not installed first"
    assert re.search(r"torch==\S*(\d|TORCH_VERSION})", installs[0]), "torch is not pinned"
    # Then the project, whose `torch>=2.3` is met by then: nothing pulls another torch.
    assert any(re.search(r"pip install .*\s\.(\s|$)", run) for run in installs[1:])


def test_dockerfile_copies_every_package_the_project_installs():
    sources = set()
    for arguments in instruction("COPY", DOCKERFILE):
        if arguments.startswith("--from"):
            continue
        *paths, _destination = arguments.split()
        sources.update(path.strip("/") for path in paths)
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: no such file"
    packages = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    for package in packages:
        assert package.rstrip("*") in sources, f"package {package} is not copied into the image"
    assert {"pyproject.toml", PYPROJECT["project"]["readme"]} <= sources


def test_dockerignore_keeps_local_state_out_but_not_what_the_image_needs():
    rules = dockerignore_rules((ROOT / ".dockerignore").read_text())
    for path in [".venv/bin/python", ".git/HEAD", "docs/img/a.png", "service/__pycache__/x.pyc"]:
        assert is_ignored(path, rules), path
    copied = [
        package.rstrip("*")
        for package in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    ]
    needed = ["pyproject.toml", "README.md"] + [
        str(path.relative_to(ROOT))
        for folder in copied
        for path in (ROOT / folder).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    ]
    assert any(path.endswith(".safetensors") for path in needed)
    assert [path for path in needed if is_ignored(path, rules)] == []


@pytest.mark.parametrize(
    "pattern, path, ignored",
    [
        ("store", "store/a/1/manifest.json", True),
        ("store", "zoo/store/a/1/manifest.json", False),  # patterns start at the root
        ("**/*.pyc", "service/routes/x.pyc", True),
        ("*.egg-info", "imh_service.egg-info/PKG-INFO", True),
        ("docs/*", "docs/img/a.png", True),
        ("docs/*", "docsx/a", False),
    ],
)
def test_dockerignore_reader_follows_docker_patterns(pattern, path, ignored):
    assert is_ignored(path, dockerignore_rules(pattern)) is ignored
    assert is_ignored(path, dockerignore_rules(f"{pattern}\n!{path}")) is False


def test_image_runs_imh_and_listens_on_all_interfaces():
    (entrypoint,) = instruction("ENTRYPOINT")
    assert json.loads(entrypoint) == ["imh"]
    assert PYPROJECT["project"]["scripts"]["imh"] == "service.cli.main:main"
    assert [json.loads(cmd) for cmd in instruction("CMD")] == [["serve"]]
    env = " ".join(instruction("ENV"))
    assert re.search(r"\bIMH_HOST=0\.0\.0\.0\b", env)
    exposed = {port for ports in instruction("EXPOSE") for port in ports.split()}
    assert {"8000", "8001"} <= exposed
    for name in image_services():
        assert environment(name).get("IMH_PORT", "8000") in exposed, name


def cli_commands() -> set[str]:
    from service.cli.main import parser

    (subcommands,) = [a for a in parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return set(subcommands.choices)


@pytest.mark.parametrize("name", image_commands())
def test_image_command_runs_on_the_host(name):
    if name == "worker" and name not in cli_commands():
        pytest.skip("service/cli.py has no `worker` command yet")
    result = subprocess.run(
        [sys.executable, "-m", "service.cli.main", name, "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "usage: imh" in result.stdout


# --- The image's HEALTHCHECK ------------------------------------------------------------


class HealthHandler(http.server.BaseHTTPRequestHandler):
    status = 200  # what /healthz answers; set on the server's handler class per test

    def do_GET(self):  # noqa: N802 - the name http.server calls
        code = self.status if self.path == "/healthz" else 404
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):  # keep test output quiet
        pass


def run_probe(port: int, tmp_path: Path, **extra_env: str) -> int:
    """Runs the Dockerfile's HEALTHCHECK as Docker would: `/bin/sh -c` with IMH_PORT set."""
    (healthcheck,) = instruction("HEALTHCHECK")
    probe = healthcheck_command(healthcheck)
    assert isinstance(probe, str), "expected the shell form, which reads IMH_PORT"
    assert not re.search(r"\b(curl|wget)\b", probe), "the slim image has no curl or wget"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if not (bin_dir / "python").exists():
        (bin_dir / "python").symlink_to(sys.executable)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "IMH_PORT": str(port), **extra_env}
    return subprocess.run(["sh", "-c", probe], env=env, capture_output=True, timeout=30).returncode


def test_healthcheck_probes_the_default_ports_when_imh_port_is_unset():
    (healthcheck,) = instruction("HEALTHCHECK")
    defaults = re.search(r"\$\{IMH_PORT:-([\d ]+)\}", healthcheck_command(healthcheck))
    assert defaults, "the probe does not read IMH_PORT"
    exposed = {port for ports in instruction("EXPOSE") for port in ports.split()}
    assert set(defaults.group(1).split()) == exposed == {"8000", "8001"}
    assert "IMH_PORT=" not in " ".join(instruction("ENV")), "would override `imh worker`'s 8001"


def test_healthcheck_passes_only_when_healthz_answers_200(tmp_path):
    handler = type("Handler", (HealthHandler,), {})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert run_probe(port, tmp_path) == 0
        # A proxy set in the container's environment must not capture the loopback probe.
        assert (
            run_probe(
                port, tmp_path, HTTP_PROXY="http://127.0.0.1:9", http_proxy="http://127.0.0.1:9"
            )
            == 0
        )
        handler.status = 503
        assert run_probe(port, tmp_path) != 0
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    assert run_probe(port, tmp_path) != 0  # nothing listens any more
