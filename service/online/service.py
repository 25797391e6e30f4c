"""Online sampling in this process: resolve a request, hand its chains to the engine,
collect. The `SamplingBackend` of embedded mode and of every `imh worker`.

No FastAPI here; errors are `service.errors` types.

Example:
    >>> answer = await service.sample(SampleCreate(generator="toy25", n=16))
    >>> answer.samples.shape, answer.stats["acceptance_rate"]
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import torch

from samplers.methods import TABLE
from service.errors import EngineFailure, InvalidRequest, ModelNotFound, ServiceError, error_from
from service.metrics import Metrics
from service.models.registry import Registry
from service.online.backend import Event, Sampled, Streaming
from service.online.chains import (
    SEED_BLOCK_ROWS,
    BlockOutcome,
    BlockSpec,
    ChainBlock,
    StreamDone,
    seed_blocks,
)
from service.online.checks import check_shapes
from service.online.engine import Engine
from service.online.fid import RunningFid
from service.online.plan import MethodPlan
from service.online.resolve import Limits, Resolved, resolve
from service.online.schemas import SampleCreate
from service.settings import Settings

# The scalar each method's chains are traced by for R-hat and ESS (absent: not a chain).
TRACED = {
    "imh": "calibrated logit", "pcn": "log target", "mala": "log target",
    "isir": "log target", "ex2mcmc": "log target",
}  # fmt: skip


class SamplingService:
    def __init__(self, registry: Registry, engine: Engine, settings: Settings, metrics: Metrics):
        self.registry, self.engine = registry, engine
        self.settings, self.metrics = settings, metrics
        self.limits = Limits.from_settings(settings)
        self._pilots: dict[tuple, torch.Tensor] = {}  # drs pilot logits per model pair
        self._compatible: set[tuple] = set()  # model combinations whose shapes fit

    async def resolve(self, body: SampleCreate, stream: bool) -> Resolved:
        seed = body.seed if body.seed is not None else secrets.randbits(63)
        try:
            resolved = resolve(self.registry, body, seed, stream, self.limits)
        except ModelNotFound:
            # A worker asked for versions its front end knows: load them from the shared
            # store rather than wait for (or miss) the announcement.
            pinned = [body.generator, body.discriminator]
            if not await asyncio.to_thread(self.registry.load_missing, pinned):
                raise
            resolved = resolve(self.registry, body, seed, stream, self.limits)
        models_key = resolved.key[:2] + resolved.key[4:]
        if resolved.discriminator is not None and models_key not in self._compatible:
            await asyncio.to_thread(check_shapes, resolved, self.registry.device)
            self._compatible.add(models_key)
        return resolved

    async def sample(self, body: SampleCreate, bulk: bool = False) -> Sampled:
        resolved = await self.resolve(body, stream=False)
        if bulk:
            resolved = replace(resolved, lane="bulk")  # job shards: never beside online work
        samples, stats = await self._final(resolved)
        return Sampled(resolved, samples, stats)

    async def events(self, body: SampleCreate) -> Streaming:
        resolved = await self.resolve(body, stream=True)
        [block] = self._submit(resolved)
        return Streaming(resolved, None, self._events(resolved, block))

    async def resume(self, request_id: str, last_event_id: str) -> AsyncIterator[Event]:
        raise ModelNotFound("streams resume in distributed mode only (IMH_REDIS_URL)")

    # Helpers -------------------------------------------------------------------------

    async def _final(self, resolved: Resolved) -> tuple[torch.Tensor, dict[str, Any]]:
        started = time.monotonic()
        if resolved.stream:  # stream mode through the JSON path: collect what streams
            return await self._collect(resolved)
        blocks = self._submit(resolved)
        try:
            outcomes = await asyncio.gather(*(block.result() for block in blocks))
        except BaseException as error:
            for block in blocks:
                block.cancel()
            self._count(resolved, error)
            raise
        samples = torch.cat([outcome.samples for outcome in outcomes])
        stats = self._stats(resolved, outcomes, len(samples), time.monotonic() - started)
        self._count(resolved, None, time.monotonic() - started)
        _check_strict(resolved, stats)
        return samples, stats

    async def _collect(self, resolved: Resolved) -> tuple[torch.Tensor, dict[str, Any]]:
        batches, stats = [], None
        [block] = self._submit(resolved)
        async with contextlib.aclosing(self._events(resolved, block)) as events:
            async for name, data, _ in events:
                if name == "samples":
                    batches.append(data)
                elif name == "done":
                    stats = data
                elif name == "error":
                    raise error_from(data)
        shape = resolved.generator.manifest.sample_shape
        return (torch.cat(batches) if batches else torch.empty(0, *shape)), stats

    async def _events(self, resolved: Resolved, block: ChainBlock) -> AsyncIterator[Event]:
        started, last_metrics = block.enqueued_at, time.monotonic()
        interval = self.settings.metrics_interval_s
        fid = self._running_fid(resolved)
        labels = self._labels(resolved)
        emitted, error, index = 0, None, 0
        try:
            while True:
                try:
                    samples = await block.next_samples(timeout=interval)
                except StreamDone:
                    break
                if samples is not None:
                    if emitted == 0:
                        first_sample = time.monotonic() - started
                        self.metrics.first_sample.labels(*labels).observe(first_sample)
                    emitted += len(samples)
                    if fid is not None:
                        await fid.update(samples)
                    index += 1
                    yield "samples", samples, str(index)
                if time.monotonic() - last_metrics >= interval:
                    last_metrics = time.monotonic()
                    index += 1
                    yield "metrics", self._progress(block, emitted, started, fid), str(index)
            outcome = block.future.result()
            yield "metrics", self._progress(block, emitted, started, fid), str(index + 1)
            stats = self._stats(resolved, [outcome], emitted, time.monotonic() - started)
            _check_strict(resolved, stats)
            yield "done", stats, str(index + 2)
        except ServiceError as failure:
            error = failure
            yield "error", failure.wire(), str(index + 1)
        except BaseException as failure:  # the client left (cancelled or generator closed)
            error = failure
            raise
        finally:
            block.cancel()
            self._count(resolved, error, time.monotonic() - started)

    def _submit(self, resolved: Resolved) -> list[ChainBlock]:
        """The request's blocks, queued: one stream block, or final-mode blocks of the
        batch size (each can share a batch with other requests)."""
        device = self.registry.device
        if resolved.stream:
            generators, rows = seed_blocks(resolved.seed, resolved.chains, 0, device)
            params = resolved.body.params
            specs = [
                BlockSpec(
                    resolved.chains, resolved.steps, generators, rows, resolved.options,
                    stream=True, thin=params.thin, target=resolved.body.n, trace=True,
                )
            ]  # fmt: skip
        else:
            per_block = max(1, self.settings.max_batch_size // SEED_BLOCK_ROWS) * SEED_BLOCK_ROWS
            specs = []
            for first in range(0, resolved.chains, per_block):
                count = min(per_block, resolved.chains - first)
                generators, rows = seed_blocks(
                    resolved.seed, count, first // SEED_BLOCK_ROWS, device
                )
                specs.append(
                    BlockSpec(count, resolved.steps, generators, rows, resolved.options,
                              trace=first == 0)  # the first block's chains are traced
                )  # fmt: skip
        plan = lambda: MethodPlan(resolved, self._pilots, device)  # noqa: E731
        loop = asyncio.get_running_loop()
        try:
            return self.engine.submit(resolved.key, self._labels(resolved), plan, specs, loop)
        except ServiceError as error:
            self._count(resolved, error)
            raise

    def _running_fid(self, resolved: Resolved) -> RunningFid | None:
        manifest = resolved.generator.manifest
        if resolved.generator.reference is None or manifest.features is None:
            return None
        try:
            features = self.registry.get(manifest.features, kind="features")
        except ServiceError:
            return None
        reference = resolved.generator.reference
        return RunningFid(features, reference, self.metrics, self._labels(resolved))

    def _progress(
        self, block: ChainBlock, emitted: int, started: float, fid: RunningFid | None
    ) -> dict:
        seconds = max(time.monotonic() - started, 1e-9)
        diagnostics = block.diagnostics() or {}
        return {
            "samples": emitted,
            "proposals": block.proposals,
            "accepted": block.accepted,
            "acceptance_rate": block.accepted / max(block.row_steps, 1),
            "proposals_per_second": block.proposals / seconds,
            "fid": fid.value() if fid else None,
            "fid_samples": fid.count if fid else 0,
            "r_hat": diagnostics.get("r_hat"),
            "ess": diagnostics.get("ess"),
            "warnings": diagnostics.get("warnings", []),
        }

    def _stats(
        self, resolved: Resolved, outcomes: list[BlockOutcome], n: int, seconds: float
    ) -> dict[str, Any]:
        proposals = sum(o.proposals for o in outcomes)
        accepted = sum(o.accepted for o in outcomes)
        row_steps = sum(o.row_steps for o in outcomes)
        fallback = sum(o.fallback for o in outcomes)
        diagnostics = next((o.diagnostics for o in outcomes if o.diagnostics), None) or {}
        warnings = list(diagnostics.get("warnings", []))
        if fallback:
            budget = TABLE[resolved.method].validate(resolved.options)["max_proposals_per_sample"]
            warnings.append(
                f"{fallback} of {n} samples are raw generator samples, not DRS samples: "
                f"their rows spent the budget of {budget} proposals without an acceptance. "
                "Raise params.max_proposals_per_sample, or send strict: true to fail instead."
            )
        if diagnostics.get("r_hat") is not None:
            self.metrics.r_hat.labels(*self._labels(resolved)).observe(diagnostics["r_hat"])
        return {
            "method": resolved.method,
            "n": n,
            "proposals": proposals,
            "accepted": accepted,
            "chain_steps": row_steps,
            "acceptance_rate": accepted / max(row_steps, 1),
            "seconds": seconds,
            "restarted": sum(o.restarted for o in outcomes),
            "fallback": fallback,
            "mode": "stream" if resolved.stream else "final",
            "steps": resolved.steps,
            "seed": resolved.seed,
            "generator": resolved.generator.ref,
            "discriminator": resolved.discriminator.ref if resolved.discriminator else None,
            "calibration": resolved.calibration,
            "r_hat": diagnostics.get("r_hat"),
            "ess": diagnostics.get("ess"),
            "trace": TRACED.get(resolved.method),
            "diagnostics_note": diagnostics.get("reason")
            if resolved.method in TRACED
            else "this method has no per-chain trace",
            "warnings": warnings,
        }

    def _labels(self, resolved: Resolved) -> tuple[str, str]:
        return resolved.generator.name, resolved.method

    def _count(self, resolved: Resolved, error: BaseException | None, seconds=None) -> None:
        if error is None:
            outcome = "ok"
        elif isinstance(error, EngineFailure):
            outcome = "error"
        elif isinstance(error, ServiceError):
            outcome = "rejected"  # queue full, bad options found late
        else:
            outcome = "cancelled"
        labels = self._labels(resolved)
        self.metrics.sample_requests.labels(*labels, outcome).inc()
        if seconds is not None and outcome == "ok":
            self.metrics.sample_duration.labels(*labels).observe(seconds)


def _check_strict(resolved: Resolved, stats: dict[str, Any]) -> None:
    """A strict request fails rather than answer with warnings."""
    if resolved.body.strict and stats["warnings"]:
        raise InvalidRequest("strict: " + " ".join(stats["warnings"]), ("strict",))
