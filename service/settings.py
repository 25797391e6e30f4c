"""Service configuration: one pydantic-settings class read from `IMH_*` variables.

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


class Settings(BaseSettings):
    """Every knob of `imh serve`. Environment: IMH_<FIELD> (IMH_PORT, IMH_ADMIN_TOKEN, ...)."""

    model_config = SettingsConfigDict(env_prefix="IMH_", extra="ignore", validate_default=True)

    # "development" relaxes the admin-token rule, nothing else.
    env: Literal["development", "production"] = "production"
    host: str = "127.0.0.1"  # loopback unless asked: uploads and sampling are not public by default
    port: int = Field(8000, ge=0, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    # Models: the built-in zoo (inside the package) plus a user store, both
    # <store>/<name>/<version>/manifest.json. Uploads are written to model_store.
    model_store: Path = Path("store")
    zoo: bool = True
    admin_token: SecretStr | None = None  # None: uploads and deletes are refused (403)
    max_upload_bytes: int = Field(512 * 2**20, ge=1)

    # "cuda" when available, else "cpu"; any torch device string works.
    device: str = Field(default_factory=lambda: "cuda" if torch.cuda.is_available() else "cpu")
    # Intra-op CPU threads for torch (None: torch's default, one per core). On a CPU
    # shared with other work, 1 is often several times faster: idle intra-op threads
    # spin while they wait for a core.
    torch_threads: int | None = Field(None, ge=1)

    # Batching (Ray Serve's rule): a group's scheduler blocks for its first request, then
    # waits at most batch_wait_ms (counted from that request) for more rows, up to
    # max_batch_size rows per step. Requests join and leave between steps. The cap is on
    # rows of different requests sharing a step: one request's random stream (up to 4096
    # chains, service/engine_jobs.py) always steps as one.
    max_batch_size: int = Field(4096, ge=1)
    batch_wait_ms: float = Field(2.0, ge=0.0, le=10_000.0)
    # Rows waiting to join a group's batch; beyond this a request gets 503 + Retry-After.
    max_queued_rows: int = Field(65536, ge=1)
    # Stream events (batches of samples) a slow client may leave unread before its
    # chains pause; pausing, not dropping, keeps every accepted sample.
    stream_buffer_events: int = Field(64, ge=1)
    metrics_interval_s: float = Field(0.5, gt=0.0)  # stream `metrics` events at most this often
    group_idle_s: float = Field(60.0, gt=0.0)  # an idle scheduler thread exits after this

    # Request limits: anything outside gets a 422 naming the field.
    max_n: int = Field(65536, ge=1)
    max_steps: int = Field(10_000, ge=1)
    max_chains: int = Field(4096, ge=1)  # stream mode: concurrent chains of one request
    max_proposals: int = Field(200_000_000, ge=1)  # n (or chains) x steps of one request

    # Distributed mode: with redis_url, `imh serve` is a stateless front end and `imh
    # worker` processes run the models, over Redis Streams (service/distributed/). Without
    # it, sampling runs in this process and batch jobs use an in-process store.
    redis_url: str | None = None
    redis_prefix: str = Field("imh", pattern=r"^[A-Za-z0-9_.-]{1,32}$")  # every key starts so
    worker_slots: int = Field(256, ge=1)  # online requests one worker runs at once
    worker_shard_slots: int = Field(2, ge=1)  # job shards one worker runs at once
    # A message neither acknowledged nor refreshed for this long belongs to a dead worker
    # and is reclaimed by another; after max_deliveries it goes to the dead-letter stream.
    claim_idle_s: float = Field(30.0, gt=0.0)
    max_deliveries: int = Field(5, ge=1)
    heartbeat_s: float = Field(2.0, gt=0.0)  # a worker is gone after 3 missed heartbeats
    # A stream whose client left keeps running this long, so a reconnect with
    # Last-Event-ID resumes it; then its chains are freed.
    stream_lease_s: float = Field(10.0, gt=0.0)

    # Batch jobs (POST /v1/jobs): work is cut into shards that workers share.
    job_shard_rows: int = Field(4096, ge=1)  # generate: samples per shard
    filter_shard_rows: int = Field(16384, ge=1)  # filter: candidates per shard
    max_job_n: int = Field(1_000_000, ge=1)  # samples or candidates per job
    job_ttl_s: float = Field(7 * 86400.0, gt=0.0)  # a finished job and its result are kept so long

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


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read from the environment on first use."""
    return Settings()
