"""The stepping loop of one scheduler group: every admitted block of chains steps through
the method's kernel, as one batch on the device.

The group's thread takes newcomers from its admission queue between steps, starts their
chains (blocks with equal options start in one batched call), then steps. When the
blocks hold more rows than `max_batch_size`, each step takes the blocks that waited
longest (newcomers first) up to that many rows, so requests share the device step by
step instead of queueing behind each other. Final-mode blocks follow
`samplers.run_final` exactly, restart round included; stream blocks follow
`samplers.run_stream` and stop after `target` samples.

A failing step fails the blocks in that batch (each gets the error) and the group keeps
running. Results cross to the event loop with `call_soon_threadsafe` (chains.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch

from samplers import Kernel, Noise, concat, split, take
from samplers.chain import emitted
from service.errors import EngineFailure, ServiceError
from service.online.admission import AdmissionQueue
from service.online.chains import BlockSpec, ChainBlock, call, settle

log = logging.getLogger("imh.engine")
STREAM_BURN_IN = 100  # steps
_GAUGES = ("batch_rows", "step_duration", "proposals", "accepted", "queued_rows", "active_chains")


class Plan(Protocol):
    """What a group needs from its method: start chains, read fallbacks."""

    def start(self, spec: BlockSpec, noise: Noise) -> tuple[Kernel, Any]: ...

    def points_per_step(self, options: dict[str, Any]) -> int: ...

    def fallback_rows(self, state: Any) -> int: ...


def _burn_in(block: ChainBlock) -> int:
    """Steps before a chain's trace counts: half of a final-mode request's steps; the
    same, at most STREAM_BURN_IN, for a stream (which may stop long before its steps)."""
    half = block.spec.steps // 2
    return min(half, STREAM_BURN_IN) if block.spec.stream else half


class _Batch(NamedTuple):
    members: list[ChainBlock]
    state: Any
    noise: Noise
    rows: list[int]
    offsets: list[int]  # block i owns rows offsets[i]:offsets[i + 1]
    owner: torch.Tensor  # (B,) index of each row's block


class Group:
    """The scheduler thread of one (generator, discriminator, method, ..., lane) group."""

    def __init__(
        self,
        config: Any,
        metrics: Any,
        key: Hashable,
        labels: tuple[str, str],
        plan_factory: Callable[[], Plan],
        on_exit: Callable[[Group], None],
    ):
        self.config, self.key, self._plan_factory, self._on_exit = (
            config,
            key,
            plan_factory,
            on_exit,
        )
        self._m = {name: getattr(metrics, name).labels(*labels) for name in _GAUGES}
        self.queue = AdmissionQueue(
            config.max_batch_size, config.batch_wait_s, config.max_queued_rows,
            config.buffer_events, config.idle_s, self._m["queued_rows"],
        )  # fmt: skip
        self._batch: _Batch | None = None
        self._kernel: Kernel | None = None
        self._steps = 0
        self.thread = threading.Thread(
            target=self._run, name=f"imh-group-{labels[0]}-{labels[1]}", daemon=True
        )
        self.thread.start()

    def _run(self) -> None:
        # OpenMP keeps its thread count per thread: apply the process's setting here too.
        torch.set_num_threads(torch.get_num_threads())
        try:
            plan, plan_error = self._plan_factory(), None
        except Exception as error:  # noqa: BLE001 - every block of this group gets the reason
            plan, plan_error = None, error
        active: list[ChainBlock] = []
        while (newcomers := self.queue.take(busy=bool(active))) is not None:
            active.extend(newcomers)
            if plan_error is not None:
                self._fail(newcomers, plan_error)
            else:
                self._start(plan, newcomers)
            self._forget_finished(active)
            runnable = self._share(self.queue.runnable(active))
            if runnable:
                try:
                    self._step(plan, runnable)
                except Exception as error:  # noqa: BLE001 - fail this batch, keep serving
                    log.exception("step failed for group %s", self.key)
                    self._fail(runnable, error)
                    self._batch = None
            self._forget_finished(active)
        self._fail(active + self.queue.leftovers(), EngineFailure("the server is shutting down"))
        self._forget_finished(active)
        self._batch = None
        self._on_exit(self)  # drop its models too: a deleted model is freed here

    def _share(self, ready: list[ChainBlock]) -> list[ChainBlock]:
        """The blocks this step: all of them if they fit in max_batch_size, else the ones
        that waited longest (newcomers first) up to that many rows, at least one."""
        limit = self.config.max_batch_size
        if sum(block.rows for block in ready) <= limit:
            return ready
        chosen, rows = set(), 0
        for block in sorted(ready, key=lambda b: b.last_stepped):
            if chosen and rows + block.rows > limit:
                continue
            chosen.add(id(block))
            rows += block.rows
        return [block for block in ready if id(block) in chosen]  # stable order: batch reuse

    def _start(self, plan: Plan, blocks: list[ChainBlock]) -> None:
        """Initialise newcomers; blocks with equal options start in one batched call.

        Each block ends up with a state, or finished (method "none" in final mode: the
        first proposals are the samples) or failed (state None)."""
        by_options: dict[str, list[ChainBlock]] = {}
        for block in blocks:
            by_options.setdefault(repr(sorted(block.spec.options.items())), []).append(block)
        for batch in by_options.values():
            try:
                kernel, state = plan.start(batch[0].spec, self._noise(batch))
                parts = split(state, [block.rows for block in batch])
                points = plan.points_per_step(batch[0].spec.options)
            except Exception as error:  # noqa: BLE001 - retry alone: only the culprit fails
                if len(batch) > 1:
                    for block in batch:
                        self._start(plan, [block])
                else:
                    self._fail(batch, error)
                continue
            self._kernel = self._kernel or kernel
            for block, part in zip(batch, parts, strict=True):
                block.state, block.points_per_step = part, points
                if block.spec.steps == 0:
                    block.proposals = block.accepted = block.row_steps = block.rows
                    self._finish(block, block.outcome(kernel.output(part).cpu()), None)

    def _noise(self, blocks: list[ChainBlock]) -> Noise:
        """One Noise over the blocks' rows in order: each seed block keeps its generator."""
        return Noise(
            [g for block in blocks for g in block.spec.generators],
            [n for block in blocks for n in block.block_rows],
            self.config.device,
        )

    def _step(self, plan: Plan, runnable: list[ChainBlock]) -> None:
        batch = self._batch
        if batch is None or batch.members != runnable:
            if batch is not None:  # hand each member its rows back before regrouping
                for block, part in zip(batch.members, split(batch.state, batch.rows), strict=True):
                    block.state = part
            batch = self._batch = self._build(runnable)
        started = time.perf_counter()
        state, info = self._kernel.step(batch.state, batch.noise)
        self._steps += 1
        shown = emitted(info)
        counts = self._per_block(batch, info.is_accepted)
        shown_counts = self._per_block(batch, shown) if shown is not info.is_accepted else counts
        emits = [b.spec.stream and (b.steps_done + 1) % b.spec.thin == 0 for b in runnable]
        outputs = self._kernel.output(state) if any(emits) else None
        self._batch = batch._replace(state=state)
        changed: set[int] = set()  # blocks that leave the batch or change their rows
        for index, block in enumerate(runnable):
            rows = slice(batch.offsets[index], batch.offsets[index + 1])
            block.steps_done += 1
            block.last_stepped = self._steps
            block.row_steps += block.rows
            block.proposals += block.rows * block.points_per_step
            block.accepted += counts[index]
            self._record(block, info, rows)
            if block.spec.stream:
                if emits[index] and shown_counts[index]:
                    self._emit(block, outputs[rows][shown[rows]])
                if block.emitted >= block.spec.target or block.steps_done >= block.spec.steps:
                    self._finish(block, block.outcome(None), None)
                    changed.add(index)
            elif self._kernel.done is not None or block.steps_done >= block.spec.steps:
                if self._end_round(plan, block, take(state, rows)):
                    changed.add(index)
        if changed:  # the others take their rows back; the next step rebuilds the batch
            for index, block in enumerate(runnable):
                if index not in changed:
                    rows = slice(batch.offsets[index], batch.offsets[index + 1])
                    block.state = take(state, rows)
            self._batch = None
        self._m["batch_rows"].observe(batch.offsets[-1])
        self._m["step_duration"].observe(time.perf_counter() - started)
        self._m["proposals"].inc(sum(b.rows * b.points_per_step for b in runnable))
        self._m["accepted"].inc(sum(counts))

    def _per_block(self, batch: _Batch, mask: torch.Tensor) -> list[int]:
        """How many rows of each block the (B,) mask marks."""
        counts = torch.zeros(len(batch.members), dtype=torch.long, device=mask.device)
        return counts.index_add_(0, batch.owner, mask.long()).tolist()

    def _record(self, block: ChainBlock, info: Any, rows: slice) -> None:
        """The block's trace for R-hat and ESS: its first round only, after warm-up.

        Every chain's first steps are warm-up: adaptation where the method adapts
        (`info.in_warmup`), burn-in from its start otherwise (a real sample, a prior
        draw), so the diagnostics judge the chains where their samples come from."""
        if block.recorder is None or block.phase != 0 or block.steps_done <= _burn_in(block):
            return
        trace = None if info.trace is None else info.trace[rows]
        warmup = None if info.in_warmup is None else info.in_warmup[rows]
        with block.trace_lock:
            block.recorder.record(trace, warmup)

    def _build(self, blocks: list[ChainBlock]) -> _Batch:
        rows = [block.rows for block in blocks]
        owner = torch.repeat_interleave(
            torch.arange(len(blocks), device=self.config.device),
            torch.tensor(rows, device=self.config.device),
        )
        offsets = np.cumsum([0, *rows]).tolist()
        state = concat([block.state for block in blocks])
        return _Batch(list(blocks), state, self._noise(blocks), rows, offsets, owner)

    def _emit(self, block: ChainBlock, samples: torch.Tensor) -> None:
        samples = samples[: block.spec.target - block.emitted].cpu()
        block.emitted += len(samples)
        self.queue.count_emitted(block)
        call(block, block.events.put_nowait, samples)

    def _end_round(self, plan: Plan, block: ChainBlock, state: Any) -> bool:
        """After a final-mode step: True when the block's stepping rows change.

        A `done` kernel (drs) steps each row until it is done (the others leave), whatever
        the step count; a chain method runs its steps, then one restart round for the rows
        the kernel flags (run_final's rule), then the block has its samples."""
        done = self._kernel.done
        if done is not None:
            finished = done(state)
            if bool(finished.all()):
                whole = block.widen(state)
                self._finish(block, block.outcome(self._kernel.output(whole).cpu(),
                                                  plan.fallback_rows(whole)), None)  # fmt: skip
            elif bool(finished.any()):
                self._narrow(block, state, ~finished)
            else:
                return False
            return True
        if block.phase == 0 and self._kernel.restart is not None:
            state, stuck = self._kernel.restart(state)
            if bool(stuck.any()):
                block.restarted = int(stuck.sum())
                block.phase, block.steps_done = 1, 0
                self._narrow(block, state, stuck)
                return True
        whole = block.widen(state)
        outcome = block.outcome(self._kernel.output(whole).cpu(), plan.fallback_rows(whole))
        self._finish(block, outcome, None)
        return True

    def _narrow(self, block: ChainBlock, state: Any, mask: torch.Tensor) -> None:
        before = block.rows
        block.narrow(state, mask)
        self.queue.release(before - block.rows)

    def _fail(self, blocks: list[ChainBlock], error: BaseException) -> None:
        failure = (
            error
            if isinstance(error, ServiceError)
            else EngineFailure(f"model error while sampling: {type(error).__name__}: {error}")
        )
        for block in blocks:
            self._finish(block, None, failure)

    def _finish(self, block: ChainBlock, outcome: Any, error: BaseException | None) -> None:
        block.state = None
        settle(block, outcome, error)

    def _forget_finished(self, active: list[ChainBlock]) -> None:
        """Drop finished and cancelled blocks; their rows leave the held count."""
        gone = [block for block in active if block.cancelled or block.state is None]
        if gone:
            active[:] = [block for block in active if block not in gone]
            self.queue.release(sum(block.rows for block in gone))
        self._m["active_chains"].set(sum(block.rows for block in active))
