"""The sampling service layer: check a request, hand its chains to the engine, collect.

Routes call `resolve` (synchronous checks: limits, models, options), then `sample`
(final answer) or `events` (a stream of ("samples" | "metrics" | "done" | "error", data)).
No FastAPI here; errors are `service.errors` types.

Example:
    >>> resolved = await service.resolve(SampleCreate(generator="toy25", n=16), stream=False)
    >>> samples, stats = await service.sample(resolved)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import torch

from service.errors import BadModelFile, EngineFailure, InvalidRequest, ServiceError, check_limit
from service.metrics import Metrics
from service.models.registry import Registry
from service.online import resolve as methods
from service.online.chains import SEED_BLOCK_ROWS, Job, JobOutcome, JobSpec, StreamDone, seed_blocks
from service.online.engine import Engine
from service.online.schemas import SampleCreate
from service.settings import Settings

log = logging.getLogger("imh.sampling")


class SamplingService:
    def __init__(self, registry: Registry, engine: Engine, settings: Settings, metrics: Metrics):
        self.registry, self.engine = registry, engine
        self.settings, self.metrics = settings, metrics
        self._pilots: dict[tuple, torch.Tensor] = {}  # drs pilot logits per model pair
        self._compatible: set[tuple] = set()  # model combinations whose shapes fit

    async def resolve(self, body: SampleCreate, stream: bool) -> methods.Resolved:
        """Check limits and resolve models; raises ModelNotFound / InvalidRequest."""
        settings = self.settings
        check_limit(body.n, settings.max_n, ("n",))
        seed = body.seed if body.seed is not None else secrets.randbits(63)
        resolved = methods.resolve(self.registry, body, seed, stream)
        check_limit(resolved.steps, settings.max_steps, ("steps",))
        if resolved.stream:
            field = ("params", body.method, "chains")
            check_limit(resolved.chains, min(settings.max_chains, settings.max_queued_rows), field)
            if body.format != "json":
                raise InvalidRequest("stream mode answers in JSON only", ("format",))
        check_limit(resolved.chains * max(resolved.steps, 1), settings.max_proposals, ("steps",),
               what="n (or chains) x steps")  # fmt: skip
        if body.format == "png" and not resolved.generator.manifest.is_image:
            raise InvalidRequest(
                f"{resolved.generator.ref} does not make images; use json or npy", ("format",)
            )
        await self._check_shapes(resolved)
        return resolved

    async def sample(self, resolved: methods.Resolved) -> tuple[torch.Tensor, dict[str, Any]]:
        """All samples at once: (n, *sample_shape) on the CPU, and the stats."""
        started = time.monotonic()
        if resolved.stream:  # stream mode through the JSON path: collect what streams
            batches, stats = [], None
            async with contextlib.aclosing(self.events(resolved, encode=False)) as events:
                async for event, data in events:
                    if event == "samples":
                        batches.append(data)
                    elif event == "done":
                        stats = data
                    elif event == "error":
                        raise EngineFailure(data["detail"])
            shape = resolved.generator.manifest.sample_shape
            return (torch.cat(batches) if batches else torch.empty(0, *shape)), stats
        jobs = self._submit(resolved)
        try:
            outcomes = await asyncio.gather(*(job.result() for job in jobs))
        except BaseException as error:
            for job in jobs:
                job.cancel()
            self._count(resolved, error)
            raise
        samples = torch.cat([outcome.samples for outcome in outcomes])
        stats = self._stats(resolved, outcomes, len(samples), time.monotonic() - started)
        self._count(resolved, None, time.monotonic() - started)
        return samples, stats

    def events(
        self, resolved: methods.Resolved, encode: bool = True
    ) -> AsyncIterator[tuple[str, Any]]:
        """Stream events. Submits at once, so QueueFull raises before the first event.

        Leaving the loop early (a client disconnect) cancels the chains.
        """
        [job] = self._submit(resolved)
        return self._events(resolved, job, encode)

    async def _events(
        self, resolved: methods.Resolved, job: Job, encode: bool
    ) -> AsyncIterator[tuple[str, Any]]:
        started, last_metrics = job.enqueued_at, time.monotonic()
        interval = self.settings.metrics_interval_s
        fid = await self._running_fid(resolved)
        labels = self._labels(resolved)
        emitted, error = 0, None
        try:
            while True:
                try:
                    samples = await job.next_samples(timeout=interval)
                except StreamDone:
                    break
                if samples is not None:
                    if emitted == 0:
                        first_sample = time.monotonic() - started
                        self.metrics.first_sample.labels(*labels).observe(first_sample)
                    emitted += len(samples)
                    if fid is not None:
                        await fid.update(samples)
                    yield "samples", ({"samples": samples.double().tolist()} if encode else samples)
                if time.monotonic() - last_metrics >= interval:
                    last_metrics = time.monotonic()
                    yield "metrics", self._progress(job, emitted, started, fid)
            outcome = job.future.result()
            yield "metrics", self._progress(job, emitted, started, fid)
            yield "done", self._stats(resolved, [outcome], emitted, time.monotonic() - started)
        except ServiceError as failure:
            error = failure
            yield "error", {"detail": failure.message}
        except BaseException as failure:  # the client left (cancelled or generator closed)
            error = failure
            raise
        finally:
            job.cancel()
            self._count(resolved, error, time.monotonic() - started)

    # Helpers -------------------------------------------------------------------------

    def _submit(self, resolved: methods.Resolved) -> list[Job]:
        device = self.registry.device
        if resolved.stream:
            generators, blocks = seed_blocks(resolved.seed, resolved.chains, 0, device)
            specs = [
                JobSpec(
                    resolved.chains, resolved.steps, generators, blocks, resolved.options,
                    stream=True, thin=resolved.body.params.thin, target=resolved.body.n,
                )
            ]  # fmt: skip
        else:  # final: blocks of the batch size, so each can share a batch with others
            per_job = max(1, self.settings.max_batch_size // SEED_BLOCK_ROWS) * SEED_BLOCK_ROWS
            specs = []
            for first in range(0, resolved.chains, per_job):
                rows = min(per_job, resolved.chains - first)
                block = first // SEED_BLOCK_ROWS
                generators, blocks = seed_blocks(resolved.seed, rows, block, device)
                specs.append(JobSpec(rows, resolved.steps, generators, blocks, resolved.options))
        plan = lambda: methods.MethodPlan(resolved, self._pilots, device)  # noqa: E731
        loop = asyncio.get_running_loop()
        try:
            return self.engine.submit(resolved.key, self._labels(resolved), plan, specs, loop)
        except ServiceError as error:
            self._count(resolved, error)
            raise

    async def _check_shapes(self, resolved: methods.Resolved) -> None:
        """Run the models once on two latents: mismatched shapes become a clear 422."""
        key = resolved.key[:2] + resolved.key[4:]
        if key in self._compatible or resolved.discriminator is None:
            return
        models = methods.build_models(resolved)

        def check() -> None:
            with torch.inference_mode():
                x = models.generator(torch.zeros(2, models.latent_dim, device=self.registry.device))
                if models.markov_proposal is not None:
                    moved = models.markov_proposal(
                        x, _TwoRowNoise(x.device), torch.ones(2, device=x.device)
                    )
                    _expect(tuple(moved.shape), tuple(x.shape), "the proposal's output")
                out = models.log_ratio(x) if models.log_ratio else models.log_pair(x, x)
                _expect(tuple(out.shape), (2,), f"{resolved.discriminator.ref}'s output")

        try:
            await asyncio.to_thread(check)
        except (BadModelFile, RuntimeError, ValueError, TypeError, AssertionError) as error:
            message = getattr(error, "message", str(error))
            raise InvalidRequest(
                f"{resolved.discriminator.ref} cannot score {resolved.generator.ref}'s samples: "
                f"{message}",
                ("discriminator",),
            ) from None
        self._compatible.add(key)

    async def _running_fid(self, resolved: methods.Resolved) -> RunningFid | None:
        manifest = resolved.generator.manifest
        if resolved.generator.reference is None or manifest.features is None:
            return None
        try:
            features = self.registry.get(manifest.features, kind="features")
        except ServiceError:
            return None
        reference = resolved.generator.reference
        return RunningFid(features, reference, self.metrics, self._labels(resolved))

    def _progress(self, job: Job, emitted: int, started: float, fid: RunningFid | None) -> dict:
        seconds = max(time.monotonic() - started, 1e-9)
        return {
            "samples": emitted,
            "proposals": job.proposals,
            "accepted": job.accepted,
            "acceptance_rate": job.accepted / max(job.proposals, 1),
            "proposals_per_second": job.proposals / seconds,
            "fid": fid.value() if fid else None,
            "fid_samples": fid.count if fid else 0,
        }

    def _stats(
        self, resolved: methods.Resolved, outcomes: list[JobOutcome], n: int, seconds: float
    ) -> dict[str, Any]:
        proposals = sum(o.proposals for o in outcomes)
        accepted = sum(o.accepted for o in outcomes)
        return {
            "method": resolved.method,
            "n": n,
            "proposals": proposals,
            "accepted": accepted,
            "acceptance_rate": accepted / max(proposals, 1),
            "seconds": seconds,
            "restarted": sum(o.restarted for o in outcomes),
            "fallback": sum(o.fallback for o in outcomes),
            "mode": "stream" if resolved.stream else "final",
            "steps": resolved.steps,
            "seed": resolved.seed,
            "generator": resolved.generator.ref,
            "discriminator": resolved.discriminator.ref if resolved.discriminator else None,
            "calibration": resolved.calibration,
        }

    def _labels(self, resolved: methods.Resolved) -> tuple[str, str]:
        return resolved.generator.name, resolved.method

    def _count(self, resolved: methods.Resolved, error: BaseException | None, seconds=None) -> None:
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


class RunningFid:
    """FID of everything a stream emitted so far, against the generator's reference stats.

    A features model or reference that does not fit the samples turns the FID off for
    that stream (logged once) rather than breaking the stream.
    """

    def __init__(self, features: Any, reference: Any, metrics: Metrics, labels: tuple[str, str]):
        from evaluation.stats import FeatureStats

        self.module = features.module
        self.stats = FeatureStats(features.manifest.feature_dim)
        self.reference, self.gauge = reference, metrics.running_fid.labels(*labels)
        self.device = next(iter(features.module.parameters()), torch.zeros(0)).device
        self.broken = False

    @property
    def count(self) -> int:
        return self.stats.count

    async def update(self, samples: torch.Tensor) -> None:
        def add() -> None:
            with torch.inference_mode():
                features = self.module(samples.to(self.device)).reshape(len(samples), -1)
            self.stats.update(features.double().cpu().numpy())

        if not self.broken:
            try:
                await asyncio.to_thread(add)
            except (ValueError, RuntimeError) as error:
                self._break(error)

    def value(self) -> float | None:
        if self.broken or self.stats.count < 2:
            return None
        try:
            fid = float(self.stats.fid_to(self.reference))
        except (ValueError, RuntimeError) as error:
            return self._break(error)
        self.gauge.set(fid)
        return fid

    def _break(self, error: Exception) -> None:
        self.broken = True
        log.warning("running FID turned off for this stream: %s", error)


class _TwoRowNoise:
    """Stand-in Noise for the shape check: zeros, two rows."""

    def __init__(self, device: torch.device):
        self.device, self.batch_size, self.rows = device, 2, [2]

    def normal(self, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.zeros(2, *shape, dtype=dtype, device=self.device)

    uniform = normal


def _expect(shape: tuple, expected: tuple, what: str) -> None:
    if shape != expected:
        raise ValueError(f"{what} has shape {shape} for 2 inputs, expected {expected}")
