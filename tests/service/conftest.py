"""One real server for the service tests, over a store of small torch.export models."""

from __future__ import annotations

import httpx
import pytest

from tests.service.toy_models import build_store

ADMIN_TOKEN = "test-admin-token-0123456789"
JOB_OWNER = {"X-IMH-Job-Token": "test-job-owner-0123456789"}  # the jobs these tests make


@pytest.fixture(scope="session")
def model_store(tmp_path_factory):
    return build_store(tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="session")
def server(imh_server, model_store):
    return imh_server(
        {
            "IMH_MODEL_STORE": str(model_store),
            "IMH_ADMIN_TOKEN": ADMIN_TOKEN,
            "IMH_ZOO": "1",
            "IMH_BATCH_WAIT_MS": "1",
            "IMH_MAX_N": "4096",
            "IMH_MAX_QUEUED_ROWS": "8192",
            "IMH_METRICS_INTERVAL_S": "0.05",
            "IMH_STREAM_BUFFER_EVENTS": "4",
            "IMH_TORCH_THREADS": "1",  # small models on a shared machine: one thread is fastest
        }
    )


@pytest.fixture(scope="session")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60.0, headers=JOB_OWNER) as client:
        yield client


@pytest.fixture
def admin():
    return {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def metric(client: httpx.Client, name: str, **labels: str) -> float:
    """The current value of one Prometheus sample from GET /metrics (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0
