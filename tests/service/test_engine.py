"""The batching engine without HTTP: batching, determinism, cancellation, back-pressure,
queue limits and failure isolation. Tests wait on conditions, never on the wall clock."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from samplers import Kernel, Noise, run_final
from samplers.methods import DEFAULTS, Models, prepare
from service.errors import EngineFailure, QueueFull
from service.metrics import Metrics
from service.online.chains import BlockSpec, StreamDone, seed_blocks
from service.online.engine import Engine, EngineConfig
from tests.samplers import targets

CPU = torch.device("cpu")
LABELS = ("toy", "imh")
MODELS = Models(
    generator=targets.generator,
    latent_dim=1,
    log_ratio=targets.log_ratio,
    real=torch.full((32, 1), 1.5),  # high-ratio starts: many chains stay put, then restart
)


class ToyPlan:
    """imh on an exactly known target; records batch sizes and can fail on demand."""

    def __init__(self, fail_steps: int = 0, gate: threading.Event | None = None):
        self.batch_sizes: list[int] = []
        self.fail_steps, self.gate = fail_steps, gate
        self.entered = threading.Event()

    def start(self, spec: BlockSpec, noise: Noise):
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(10), "test gate never opened"
        if spec.options.get("fail"):
            raise RuntimeError("this block's start fails")
        options = {k: v for k, v in spec.options.items() if k in DEFAULTS["imh"]}
        kernel, state = prepare("imh", MODELS, options, noise)
        return Kernel(self._recording(kernel.step), kernel.output, kernel.restart), state

    def _recording(self, step):
        def recorded(state, noise):
            self.batch_sizes.append(len(state.x))
            if self.fail_steps > 0:
                self.fail_steps -= 1
                raise RuntimeError("the model blew up")
            return step(state, noise)

        return recorded

    def points_per_step(self, options) -> int:
        return 1

    def fallback_rows(self, state) -> int:
        return 0


def spec(seed: int, rows: int, steps: int, **kwargs) -> BlockSpec:
    generators, blocks = seed_blocks(seed, rows, 0, CPU)
    options = kwargs.pop("options", {"init": "real"})
    return BlockSpec(rows, steps, generators, blocks, options, **kwargs)


def make_engine(**config) -> Engine:
    defaults = {"max_batch_size": 4096, "batch_wait_s": 0.0, "idle_s": 5.0}
    return Engine(EngineConfig(**(defaults | config)), Metrics())


def submit(engine: Engine, plan: ToyPlan, *specs: BlockSpec, key: str = "group"):
    return engine.submit(key, LABELS, lambda: plan, list(specs), asyncio.get_running_loop())


async def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


def active_chains(engine: Engine) -> float:
    value = engine.metrics.registry.get_sample_value(
        "imh_active_chains", {"model": LABELS[0], "method": LABELS[1]}
    )
    return value or 0.0


def test_rows_of_concurrent_requests_share_a_batch_up_to_max_batch_size():
    async def main():
        engine, plan = make_engine(max_batch_size=16, batch_wait_s=0.5), ToyPlan()
        try:
            # Ray's rule: the group waits (here up to 0.5 s) for more rows after the first
            # block, but starts as soon as the batch is full: 8 + 8 rows fill it at once.
            no_restarts = {"init": "generator"}
            blocks = [submit(engine, plan, spec(s, 8, 3, options=no_restarts))[0] for s in range(3)]
            await asyncio.gather(*(block.result() for block in blocks))
        finally:
            engine.close()
        return plan.batch_sizes

    batch_sizes = asyncio.run(main())
    assert batch_sizes[0] == 16, batch_sizes
    assert max(batch_sizes) <= 16
    # Three blocks of 8 rows and 3 steps share full batches: 72 rows in 5 steps, not 6.
    assert batch_sizes == [16, 16, 16, 16, 8], batch_sizes


def test_a_newcomer_gets_rows_at_the_next_step_whatever_runs_already():
    async def main():
        engine, plan = make_engine(max_batch_size=64), ToyPlan()
        try:
            no_restarts = {"init": "generator"}
            [big] = submit(engine, plan, spec(0, 64, 10**6, options=no_restarts))
            await wait_for(lambda: len(plan.batch_sizes) >= 3)
            steps_before = len(plan.batch_sizes)
            [small] = submit(engine, plan, spec(1, 4, 5, options=no_restarts))
            await small.result()
            big.cancel()
            return plan.batch_sizes[steps_before:]
        finally:
            engine.close()

    sizes = asyncio.run(main())
    # The big block fills the batch alone, so the two take turns: the newcomer's 5 steps
    # come within 5 big ones (plus the steps running when it arrived), whatever the load.
    small_steps = [index for index, rows in enumerate(sizes) if rows == 4][:5]
    assert len(small_steps) == 5 and small_steps[-1] <= 2 * 5 + 1, sizes


def test_a_seed_gives_the_same_samples_whoever_shares_the_batch():
    steps, rows = 3, 4096 + 300  # two seed blocks; real starts make some rows restart

    async def sample(seeds):
        engine = make_engine()
        try:
            blocks = submit(engine, ToyPlan(), *(spec(seed, rows, steps) for seed in seeds))
            return await asyncio.gather(*(block.result() for block in blocks))
        finally:
            engine.close()

    alone = asyncio.run(sample([7]))[0]
    shared = asyncio.run(sample([3, 7, 11]))[1]
    generators, blocks = seed_blocks(7, rows, 0, CPU)
    noise = Noise(generators, blocks)
    kernel, state = prepare("imh", MODELS, {"init": "real"}, noise)
    reference = run_final(kernel, state, noise, steps)
    assert torch.equal(alone.samples, shared.samples)
    assert torch.equal(alone.samples, reference.samples)
    assert alone.restarted == reference.restarted > 0
    assert (alone.proposals, alone.accepted) == (reference.proposals, reference.accepted)
    assert not (alone.samples == 1.5).any(), "a real starting point was returned"


def test_cancelling_a_stream_frees_its_chains():
    async def main():
        engine = make_engine()
        try:
            [block] = submit(engine, ToyPlan(), spec(0, 64, 10**7, stream=True, target=10**9))
            await block.next_samples(timeout=10)
            await wait_for(lambda: active_chains(engine) == 64)
            block.cancel()
            await wait_for(lambda: active_chains(engine) == 0)
            assert not block.future.done()  # dropped, not finished
        finally:
            engine.close()

    asyncio.run(main())


def test_a_slow_stream_client_pauses_its_chains_and_loses_nothing():
    limit, target = 2, 500

    async def main():
        engine = make_engine(buffer_events=limit)
        try:
            [block] = submit(engine, ToyPlan(), spec(1, 16, 10**6, stream=True, target=target))
            await wait_for(lambda: block.events.qsize() >= limit)
            steps_when_full = block.steps_done
            await asyncio.sleep(0.05)  # give a broken engine time to run ahead
            assert block.events.qsize() <= limit and block.steps_done == steps_when_full
            received = 0
            while True:
                try:
                    batch = await block.next_samples(timeout=10)
                except StreamDone:
                    break
                received += len(batch)
                assert block.events.qsize() <= limit + 1
            return received
        finally:
            engine.close()

    assert asyncio.run(main()) == target


def test_a_full_queue_rejects_new_requests():
    async def main():
        gate = threading.Event()
        engine, plan = make_engine(max_queued_rows=10), ToyPlan(gate=gate)
        try:
            [first] = submit(engine, plan, spec(0, 4, 2))
            await asyncio.to_thread(plan.entered.wait, 10)  # first block left the queue
            [second] = submit(engine, plan, spec(1, 4, 2))  # 8 rows held: fits
            with pytest.raises(QueueFull):
                submit(engine, plan, spec(2, 4, 2))
            gate.set()
            await asyncio.gather(first.result(), second.result())
        finally:
            gate.set()
            engine.close()

    asyncio.run(main())


def test_a_failing_start_fails_only_its_own_request():
    async def main():
        engine = make_engine(batch_wait_s=1.0, max_batch_size=8)
        try:
            bad, good = submit(
                engine, ToyPlan(), spec(0, 4, 2, options={"fail": True}), spec(1, 4, 2)
            )
            outcome = await good.result()
            with pytest.raises(EngineFailure, match="start fails"):
                await bad.result()
            return outcome
        finally:
            engine.close()

    assert asyncio.run(main()).samples.shape == (4, 1)


def test_a_failing_step_fails_its_batch_and_the_group_keeps_serving():
    async def main():
        engine, plan = make_engine(), ToyPlan(fail_steps=1)
        try:
            [doomed] = submit(engine, plan, spec(0, 4, 2))
            with pytest.raises(EngineFailure, match="blew up"):
                await doomed.result()
            [later] = submit(engine, plan, spec(1, 4, 2))
            return await later.result()
        finally:
            engine.close()

    assert asyncio.run(main()).samples.shape == (4, 1)


def test_an_idle_group_exits_and_a_new_request_starts_another():
    async def main():
        engine, plan = make_engine(idle_s=0.05), ToyPlan()
        try:
            [block] = submit(engine, plan, spec(0, 4, 2))
            await block.result()
            await wait_for(lambda: engine.groups == 0)
            [block] = submit(engine, plan, spec(1, 4, 2))
            return await block.result()
        finally:
            engine.close()

    assert asyncio.run(main()).samples.shape == (4, 1)
