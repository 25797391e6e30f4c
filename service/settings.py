"""Service configuration: one pydantic-settings class read from `IMH_*` variables.

Every field carries its default and a one-line meaning here, and nowhere else: `imh
serve --help` and `imh worker --help` print them (every field is also a flag, e.g.
`--max-n` for IMH_MAX_N), and the README's configuration table is checked against them.

Example:
    >>> settings = Settings(port=9000, zoo=False)     # keyword arguments beat the environment
    >>> settings.device
    'cpu'

`get_settings()` builds the process-wide instance once; tests build their own `Settings`
and pass it to `create_app`, so nothing is read at import time.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal, Self

import torch
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MIN_ADMIN_TOKEN_LENGTH = 16
MiB = 2**20


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class Settings(BaseSettings):
    """Every knob of `imh serve` and `imh worker`. Environment: IMH_<FIELD>."""

    model_config = SettingsConfigDict(env_prefix="IMH_", extra="ignore", validate_default=True)

    # The process -------------------------------------------------------------------
    env: Literal["development", "production"] = Field(
        "production", description="development relaxes the admin-token length rule, nothing else"
    )
    host: str = Field("127.0.0.1", description="listen address (loopback unless asked)")
    port: int = Field(
        8000, ge=0, le=65535, description="listen port (imh worker: its probe port, default 8001)"
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")
    device: str = Field(
        default_factory=_default_device,
        description="torch device: cuda when available, else cpu",
    )
    torch_threads: int | None = Field(
        None, ge=1, description="intra-op CPU threads (unset: one per core); 1 is often "
        "fastest on a CPU shared with other work, where idle threads spin",
    )  # fmt: skip

    # Models ---------------------------------------------------------------------------
    model_store: Path = Field(
        Path("store"), description="user model store <store>/<name>/<version>/; uploads land here"
    )
    zoo: bool = Field(True, description="load the built-in demo models")
    allow_zoo_delete: bool = Field(
        False, description="let DELETE /v1/models unload built-in models (the zoo)"
    )
    admin_token: SecretStr | None = Field(
        None, description="bearer token for uploads, deletes and every job (unset: uploads "
        "and deletes refused); 16+ characters unless env is development",
    )  # fmt: skip
    max_upload_bytes: int = Field(512 * MiB, ge=1, description="bytes of one model or job upload")
    compile: bool = Field(
        False, description="run generators, discriminators, proposals and features "
        "torch.compile'd where that was faster at load (a manifest's \"compile\" wins); "
        "loading takes longer",
    )  # fmt: skip

    # HTTP -----------------------------------------------------------------------------
    max_body_bytes: int = Field(
        4 * MiB, ge=1024, description="bytes of a JSON request body (uploads: max_upload_bytes)"
    )
    allowed_hosts: str = Field(
        "127.0.0.1,localhost,::1,[::1]",
        description="comma-separated Host names the API answers (* for any); DNS rebinding guard",
    )
    allowed_origins: str = Field(
        "", description="comma-separated browser origins allowed cross-site (CORS); empty: none"
    )

    # Batching ---------------------------------------------------------------------------
    max_batch_size: int = Field(
        4096, ge=1, description="rows of different requests stepped together per group"
    )
    batch_wait_ms: float = Field(
        2.0, ge=0.0, le=10_000.0,
        description="how long an idle group waits, from its first request, for more rows",
    )  # fmt: skip
    max_queued_rows: int = Field(
        131072, ge=1,
        description="rows one scheduler group holds, waiting or running; beyond it a "
        "request gets 503 with Retry-After",
    )  # fmt: skip
    interactive_rows: int = Field(
        1024, ge=1,
        description="requests of at most this many chains step in the interactive lane, "
        "larger ones and job shards in the bulk lane (its own thread)",
    )  # fmt: skip
    stream_buffer_events: int = Field(
        64, ge=1, description="stream events a slow client may leave unread before its chains "
        "pause (pausing, not dropping, keeps every accepted sample)",
    )  # fmt: skip
    metrics_interval_s: float = Field(
        0.5, gt=0.0, description="streams send `metrics` events at most this often"
    )
    group_idle_s: float = Field(60.0, gt=0.0, description="an idle scheduler thread exits after")

    # Request limits: anything outside gets a 422 naming the field ----------------------
    max_n: int = Field(65536, ge=1, description="samples of one request")
    max_steps: int = Field(10_000, ge=1, description="steps per chain of one request")
    max_chains: int = Field(4096, ge=1, description="concurrent chains of one stream request")
    max_proposals: int = Field(
        200_000_000, ge=1, description="proposals of one request: chains x steps x proposals "
        "per step (i-SIR particles, Ex2MCMC's MALA steps)",
    )  # fmt: skip
    max_result_bytes: int = Field(
        256 * MiB, ge=1, description="bytes of one answer's samples (float32)"
    )

    # Distributed mode -------------------------------------------------------------------
    redis_url: str | None = Field(
        None, description="distributed mode: imh serve becomes a front end and imh worker "
        "processes run the models; unset: everything in-process",
    )  # fmt: skip
    redis_prefix: str = Field(
        "imh", pattern=r"^[A-Za-z0-9_.-]{1,32}$", description="every Redis key starts so"
    )
    worker_slots: int = Field(256, ge=1, description="online requests one worker runs at once")
    worker_shard_slots: int = Field(2, ge=1, description="job shards one worker runs at once")
    worker_drain_s: float = Field(
        25.0, ge=0.0, description="on SIGTERM a worker finishes running work for this long, "
        "then hands the rest back to other workers",
    )  # fmt: skip
    claim_idle_s: float = Field(
        30.0, gt=0.0, description="work of a silent worker is reclaimed after this long"
    )
    max_deliveries: int = Field(
        5, ge=1, description="after this many deliveries a work message is dead-lettered"
    )
    heartbeat_s: float = Field(
        2.0, gt=0.0, description="worker heartbeat period; gone after 3 missed heartbeats"
    )
    stream_lease_s: float = Field(
        10.0, gt=0.0, description="a stream whose client left keeps running this long, so a "
        "reconnect with Last-Event-ID resumes it",
    )  # fmt: skip

    # Batch jobs -----------------------------------------------------------------------
    job_shard_rows: int = Field(4096, ge=1, description="generate jobs: samples per shard")
    filter_shard_rows: int = Field(16384, ge=1, description="filter jobs: candidates per shard")
    max_job_n: int = Field(1_000_000, ge=1, description="samples or candidates of one job")
    max_job_proposals: int = Field(
        2_000_000_000, ge=1, description="proposals of one generate job (n x steps x "
        "proposals per step)",
    )  # fmt: skip
    job_ttl_s: float = Field(
        7 * 86400.0, gt=0.0, description="a finished job and its result are kept this long"
    )
    job_result_dir: Path | None = Field(
        None, description="embedded mode: job results spill to files here (unset: a "
        "temporary folder), not process memory",
    )  # fmt: skip

    @field_validator("admin_token", mode="before")
    @classmethod
    def _empty_token_is_none(cls, value: object) -> object:
        return None if value in ("", None) else value

    @field_validator("device")
    @classmethod
    def _device_exists(cls, value: str) -> str:
        device = torch.device(value)  # raises on a malformed name
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("IMH_DEVICE is cuda but no CUDA device is available")
        return value

    @model_validator(mode="after")
    def _safe_and_consistent(self) -> Self:
        token = self.admin_token.get_secret_value() if self.admin_token else None
        if token is not None and len(token) < MIN_ADMIN_TOKEN_LENGTH and self.env != "development":
            raise ValueError(
                f"IMH_ADMIN_TOKEN must have at least {MIN_ADMIN_TOKEN_LENGTH} characters "
                "(or set IMH_ENV=development)"
            )
        if self.max_queued_rows < self.max_n:
            raise ValueError("IMH_MAX_QUEUED_ROWS must be >= IMH_MAX_N (a lone request must fit)")
        return self

    @property
    def batch_wait_s(self) -> float:
        return self.batch_wait_ms / 1000.0

    @property
    def host_names(self) -> list[str]:
        return [name.strip() for name in self.allowed_hosts.split(",") if name.strip()]

    @property
    def origins(self) -> list[str]:
        return [name.strip() for name in self.allowed_origins.split(",") if name.strip()]


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read from the environment on first use."""
    return Settings()
