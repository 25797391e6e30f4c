"""The batching engine: one scheduler thread per (generator, discriminator, method) group.

Each group steps the chains of every request it holds together, as one batch (DESIGN.md
section 7). Batching follows Ray Serve's rule: block for the first job, then wait at
most `batch_wait_s`, counted from that job's arrival, for more rows, up to
`max_batch_size` rows. Batching is continuous: jobs join and leave between steps, so a
long request never holds a short one back.

A job (service/engine_jobs.py) is one request's block of chains with its own random streams.
Final-mode jobs follow `samplers.run_final` exactly, restart round included; stream-mode
jobs follow `samplers.run_stream` and stop after `target` samples.

Model work runs in the group thread; results cross to the event loop with
`call_soon_threadsafe`. A failing step fails the jobs in that batch (each gets the
error) and the group keeps running. A stream job whose client leaves `buffer_events`
events unread is paused, not dropped, until the client catches up.

Example:
    >>> engine = Engine(EngineConfig(max_batch_size=4096), metrics)
    >>> [job] = engine.submit(key, ("toy25", "imh"), make_plan, [spec], loop)
    >>> outcome = await job.result()
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch

from samplers import Kernel, Noise, concat, split, take
from service.errors import EngineFailure, QueueFull, ServiceError
from service.online.chains import Job, JobSpec, call, settle

log = logging.getLogger("imh.engine")


class Plan(Protocol):
    """What a group needs from its method: start chains, read fallbacks."""

    def start(self, spec: JobSpec, noise: Noise) -> tuple[Kernel, Any]: ...

    def fallback_rows(self, state: Any) -> int: ...


@dataclass
class EngineConfig:
    max_batch_size: int = 4096
    batch_wait_s: float = 0.002
    max_queued_rows: int = 65536
    buffer_events: int = 64
    idle_s: float = 60.0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


class _Batch(NamedTuple):
    members: list[Job]
    state: Any
    noise: Noise
    rows: list[int]
    offsets: list[int]  # job i owns rows offsets[i]:offsets[i + 1]
    owner: torch.Tensor  # (B,) index of each row's job


class Group:
    """The scheduler thread of one (generator, discriminator, method, ...) group."""

    def __init__(self, engine: Engine, key: Hashable, labels: tuple[str, str], plan_factory):
        self.engine, self.key, self.config = engine, key, engine.config
        self._plan_factory = plan_factory
        self._cond = threading.Condition()
        self._pending: deque[Job] = deque()
        self._pending_rows = self._active_rows = 0
        self.closed = self._stopping = False
        m = engine.metrics
        self._m = {
            name: getattr(m, name).labels(*labels)
            for name in (
                "batch_rows",
                "step_duration",
                "proposals",
                "accepted",
                "queued_rows",
                "active_chains",
            )
        }
        self._thread = threading.Thread(
            target=self._run, name=f"imh-group-{labels[0]}-{labels[1]}", daemon=True
        )
        self._thread.start()

    # Called from the event loop ------------------------------------------------------

    def enqueue(self, jobs: list[Job]) -> bool:
        rows = sum(job.rows for job in jobs)
        with self._cond:
            if self.closed:
                return False
            if self._pending_rows + rows > self.config.max_queued_rows:
                raise QueueFull(f"the scheduler queue is full ({self._pending_rows} rows waiting)")
            for job in jobs:
                job.group = self
                self._pending.append(job)
            self._pending_rows += rows
            self._m["queued_rows"].set(self._pending_rows)
            self._cond.notify()
        return True

    def cancel(self, job: Job) -> None:
        with self._cond:
            job.cancelled = True
            if job in self._pending:
                self._pending.remove(job)
                self._pending_rows -= job.rows
                self._m["queued_rows"].set(self._pending_rows)
            self._cond.notify()

    def drained(self, job: Job) -> None:
        with self._cond:
            job.buffered -= 1
            if job.buffered == self.config.buffer_events - 1:
                self._cond.notify()  # the job was paused: let it run again

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()

    # The group thread ----------------------------------------------------------------

    def _run(self) -> None:
        # OpenMP keeps its thread count per thread: apply the process's setting here too.
        torch.set_num_threads(torch.get_num_threads())
        try:
            plan, plan_error = self._plan_factory(), None
        except Exception as error:  # noqa: BLE001 - every job of this group gets the reason
            plan, plan_error = None, error
        active: list[Job] = []
        self._batch: _Batch | None = None
        self._kernel: Kernel | None = None
        while (newcomers := self._admit(active)) is not None:
            if plan_error is not None:
                self._fail(newcomers, plan_error)
            else:
                self._start(plan, newcomers, active)
            with self._cond:
                active[:] = [job for job in active if not job.cancelled and job.state is not None]
                runnable = [job for job in active if job.buffered < self.config.buffer_events]
                if active and not runnable:  # all paused: sleep until a client reads or leaves
                    self._cond.wait(timeout=1.0)
            if runnable:
                try:
                    self._step(plan, runnable)
                except Exception as error:  # noqa: BLE001 - fail this batch, keep serving
                    log.exception("step failed for group %s", self.key)
                    self._fail(runnable, error)
                    self._batch = None
            self._sync_active(active)
        self._sync_active([])
        self._fail(active + list(self._pending), EngineFailure("the server is shutting down"))
        self._batch = None
        self.engine.forget(self)  # drop its models too: a deleted model is freed here

    def _admit(self, active: list[Job]) -> list[Job] | None:
        """Jobs that join the batch now; None when the thread should exit."""
        config = self.config
        with self._cond:
            if not active:  # Ray's rule: block for the first job, then wait for more rows
                deadline = time.monotonic() + config.idle_s
                while not self._pending and not self._stopping:
                    if (
                        not self._cond.wait(timeout=max(deadline - time.monotonic(), 0))
                        and time.monotonic() >= deadline
                    ):
                        self.closed = True
                        return None
                first = self._pending[0].enqueued_at if self._pending else 0.0
                while self._pending_rows < config.max_batch_size and not self._stopping:
                    remaining = first + config.batch_wait_s - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(timeout=remaining)
            if self._stopping:
                self.closed = True
                return None
            rows = sum(job.rows for job in active)
            taken: list[Job] = []
            while self._pending:
                job = self._pending[0]
                if rows > 0 and rows + job.rows > config.max_batch_size:
                    break  # a job larger than the batch runs alone once the batch drains
                self._pending.popleft()
                self._pending_rows -= job.rows
                rows += job.rows
                taken.append(job)
            self._m["queued_rows"].set(self._pending_rows)
            return taken

    def _start(self, plan: Plan, jobs: list[Job], active: list[Job]) -> None:
        """Initialise newcomers; jobs with equal options start in one batched call."""
        by_options: dict[str, list[Job]] = {}
        for job in jobs:
            by_options.setdefault(repr(sorted(job.spec.options.items())), []).append(job)
        for batch in by_options.values():
            try:
                kernel, state = plan.start(batch[0].spec, self._noise(batch))
                parts = split(state, [job.rows for job in batch])
            except Exception as error:  # noqa: BLE001 - retry alone: only the culprit fails
                if len(batch) > 1:
                    for job in batch:
                        self._start(plan, [job], active)
                else:
                    self._fail(batch, error)
                continue
            self._kernel = self._kernel or kernel
            for job, part in zip(batch, parts, strict=True):
                job.state = part
                if job.spec.steps > 0:
                    active.append(job)
                else:  # method "none", final mode: the first proposals are the samples
                    job.proposals = job.accepted = job.rows
                    settle(job, job.outcome(kernel.output(part).cpu()), None)

    def _noise(self, jobs: list[Job]) -> Noise:
        """One Noise over the jobs' rows in order: each block keeps its own generator."""
        return Noise(
            [g for job in jobs for g in job.spec.generators],
            [n for job in jobs for n in job.block_rows],
            self.config.device,
        )

    def _step(self, plan: Plan, runnable: list[Job]) -> None:
        batch = self._batch
        if batch is None or batch.members != runnable:
            if batch is not None:  # hand each member its rows back before regrouping
                for job, part in zip(batch.members, split(batch.state, batch.rows), strict=True):
                    job.state = part
            batch = self._batch = self._build(runnable)
        started = time.perf_counter()
        state, info = self._kernel.step(batch.state, batch.noise)
        counts = torch.zeros(len(runnable), dtype=torch.long, device=info.is_accepted.device)
        counts = counts.index_add_(0, batch.owner, info.is_accepted.long()).tolist()
        emits = [j.spec.stream and (j.steps_done + 1) % j.spec.thin == 0 for j in runnable]
        outputs = self._kernel.output(state) if any(emits) else None
        self._batch = batch._replace(state=state)
        changed: set[int] = set()  # jobs that leave the batch or change their rows
        for index, job in enumerate(runnable):
            rows = slice(batch.offsets[index], batch.offsets[index + 1])
            job.steps_done += 1
            job.proposals += job.rows
            job.accepted += counts[index]
            if job.spec.stream:
                if emits[index] and counts[index]:
                    self._emit(job, outputs[rows][info.is_accepted[rows]])
                if job.emitted >= job.spec.target or job.steps_done >= job.spec.steps:
                    job.state = None
                    settle(job, job.outcome(None), None)
                    changed.add(index)
            elif job.steps_done >= job.spec.steps:
                self._end_round(plan, job, take(state, rows))
                changed.add(index)
        if changed:  # the others take their rows back; the next step rebuilds the batch
            for index, job in enumerate(runnable):
                if index not in changed:
                    job.state = take(state, slice(batch.offsets[index], batch.offsets[index + 1]))
            self._batch = None
        self._m["batch_rows"].observe(batch.offsets[-1])
        self._m["step_duration"].observe(time.perf_counter() - started)
        self._m["proposals"].inc(batch.offsets[-1])
        self._m["accepted"].inc(sum(counts))

    def _build(self, jobs: list[Job]) -> _Batch:
        rows = [job.rows for job in jobs]
        noise = self._noise(jobs)
        owner = torch.repeat_interleave(
            torch.arange(len(jobs), device=self.config.device),
            torch.tensor(rows, device=self.config.device),
        )
        offsets = np.cumsum([0, *rows]).tolist()
        return _Batch(list(jobs), concat([job.state for job in jobs]), noise, rows, offsets, owner)

    def _emit(self, job: Job, samples: torch.Tensor) -> None:
        samples = samples[: job.spec.target - job.emitted].cpu()
        job.emitted += len(samples)
        with self._cond:
            job.buffered += 1
        call(job, job.events.put_nowait, samples)

    def _end_round(self, plan: Plan, job: Job, state: Any) -> None:
        """run_final's ending: one restart round for flagged rows, then the samples."""
        restart = self._kernel.restart
        if job.phase == 0 and restart is not None:
            state, stuck = restart(state)
            if bool(stuck.any()):
                job.kept, job.stuck_index = state, stuck.nonzero().squeeze(1)
                job.state = take(state, stuck)
                job.block_rows = [
                    int(part.sum()) for part in torch.split(stuck.cpu(), job.block_rows)
                ]
                job.rows = job.restarted = len(job.stuck_index)
                job.phase, job.steps_done = 1, 0
                return
        elif job.phase == 1:
            state = type(job.kept)(
                *(
                    whole.index_copy(0, job.stuck_index, part)
                    for whole, part in zip(job.kept, state, strict=True)
                )
            )
        job.state = None
        settle(job, job.outcome(self._kernel.output(state).cpu(), plan.fallback_rows(state)), None)

    def _fail(self, jobs: list[Job], error: BaseException) -> None:
        failure = (
            error
            if isinstance(error, ServiceError)
            else EngineFailure(f"model error while sampling: {type(error).__name__}: {error}")
        )
        for job in jobs:
            job.state = None
            settle(job, None, failure)

    def _sync_active(self, active: list[Job]) -> None:
        active[:] = [job for job in active if not job.cancelled and job.state is not None]
        rows = sum(job.rows for job in active)
        if rows != self._active_rows:
            self._active_rows = rows
            self._m["active_chains"].set(rows)


class Engine:
    """Groups by key; `submit` routes jobs to their group, creating it on first use."""

    def __init__(self, config: EngineConfig, metrics: Any):
        self.config, self.metrics = config, metrics
        self._groups: dict[Hashable, Group] = {}
        self._lock = threading.Lock()

    def submit(
        self,
        key: Hashable,
        labels: tuple[str, str],
        plan_factory: Callable[[], Plan],
        specs: list[JobSpec],
        loop: asyncio.AbstractEventLoop,
    ) -> list[Job]:
        """Queue jobs (all or none); raises QueueFull when the group's queue is full.

        `plan_factory` runs once, in the group's thread, when the group starts.
        """
        jobs = [Job(spec, loop) for spec in specs]
        while True:
            with self._lock:
                group = self._groups.get(key)
                if group is None or group.closed:
                    group = self._groups[key] = Group(self, key, labels, plan_factory)
            if group.enqueue(jobs):
                return jobs

    def forget(self, group: Group) -> None:
        with self._lock:
            if self._groups.get(group.key) is group:
                del self._groups[group.key]

    def close(self) -> None:
        with self._lock:
            groups = list(self._groups.values())
            self._groups.clear()
        for group in groups:
            group.stop()
        for group in groups:
            group._thread.join(timeout=10)

    @property
    def groups(self) -> int:
        """Scheduler threads running now."""
        with self._lock:
            return sum(not group.closed for group in self._groups.values())
