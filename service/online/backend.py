"""What the sampling routes talk to: one protocol, two implementations.

- `service.online.service.SamplingService` runs the chains in this process (embedded
  mode, and inside every `imh worker`);
- `service.online.remote.RemoteSampling` sends them to workers over Redis (an API front
  end in distributed mode).

Both take the same calls with the same signatures, so routes never ask which one they
have. A route hands over the request body once: `sample` and `events` resolve it (limits,
models, options) and return the resolution with the answer; `resolve` alone is for
callers that only check a request (a job's submission).

Events are `(name, data, event_id)`: name is "samples" (data: a (k, *shape) array of
newly accepted samples), "metrics", "done" (data: the final stats) or "error" (data:
`ServiceError.wire()`); event ids are what an SSE client sends back as Last-Event-ID.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, NamedTuple, Protocol

import torch

from service.models.registry import Registry
from service.online.resolve import Resolved
from service.online.schemas import SampleCreate

Event = tuple[str, Any, str]


class Sampled(NamedTuple):
    resolved: Resolved
    samples: torch.Tensor  # (n, *sample_shape) on the CPU
    stats: dict[str, Any]


class Streaming(NamedTuple):
    resolved: Resolved
    request_id: str | None  # set where the stream can be resumed (distributed mode)
    events: AsyncIterator[Event]


class SamplingBackend(Protocol):
    registry: Registry

    async def resolve(self, body: SampleCreate, stream: bool) -> Resolved:
        """Check limits and pick models; raises ModelNotFound / InvalidRequest."""
        ...

    async def sample(self, body: SampleCreate, bulk: bool = False) -> Sampled:
        """Every sample at once, (n, *sample_shape) on the CPU, and the stats. `bulk`:
        step in the bulk lane whatever the size (job shards)."""
        ...

    async def events(self, body: SampleCreate) -> Streaming:
        """The stream's events; submits at once, so a full queue raises before the first
        event; closing the iterator early (a client that left) frees the chains."""
        ...

    async def resume(self, request_id: str, last_event_id: str) -> AsyncIterator[Event]:
        """The events of a stream after `last_event_id`; ModelNotFound if there is none."""
        ...
