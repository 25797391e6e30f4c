"""The OpenAPI document matches the server: schemathesis, every check, all its phases
(examples, coverage, fuzzing, stateful), a bounded number of examples per operation,
without and with the admin token, against a real server of its own.

Rules the document cannot express are listed, with their reasons, in schemathesis.toml
beside this file; nothing else is excepted.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.service.conftest import ADMIN_TOKEN

CONFIG = Path(__file__).with_name("schemathesis.toml")
EXAMPLES = 8  # per operation and phase: enough to find a schema drift, bounded in time


@pytest.fixture(scope="module")
def fuzzed_server(imh_server, model_store, tmp_path_factory):
    store = tmp_path_factory.mktemp("fuzzed-store")
    shutil.copytree(model_store, store, dirs_exist_ok=True)
    return imh_server(
        {
            "IMH_MODEL_STORE": str(store),
            "IMH_ADMIN_TOKEN": ADMIN_TOKEN,
            "IMH_TORCH_THREADS": "1",
            # Small limits keep the fuzzed work short; they are limits like any other.
            "IMH_MAX_N": "512",
            "IMH_MAX_STEPS": "64",
            "IMH_MAX_JOB_N": "2048",
            "IMH_MAX_QUEUED_ROWS": "4096",
        }  # fmt: skip
    )


@pytest.mark.parametrize("token", [None, ADMIN_TOKEN], ids=["anonymous", "admin"])
def test_the_server_matches_its_openapi_document(fuzzed_server, token):
    pytest.importorskip("schemathesis")
    command = [
        sys.executable, "-m", "schemathesis.cli", "--config-file", str(CONFIG), "run",
        f"{fuzzed_server.url}/openapi.json", "--checks", "all", "--max-examples", str(EXAMPLES),
        "--workers", "1", "--seed", "1", "--no-color",
    ]  # fmt: skip
    if token is not None:
        command += ["--header", f"Authorization: Bearer {token}"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600)
    report = run.stdout[-8000:] + run.stderr[-2000:]
    assert run.returncode == 0, report
    assert re.search(r"(\d+) generated, \1 passed", report), report  # every case passed
