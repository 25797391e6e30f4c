"""A classifier job on a worker against a real Redis: an sbp-prune shard killed in the
middle of training resumes from the checkpoint it left in the job store, and ends where
an uninterrupted run ends; the new classifier lands in the shared model store."""

from __future__ import annotations

import asyncio
import json
import secrets

import torch

from classifiers.sbp_job import PruneSettings, run_sbp_prune
from service.batch.shards import ShardRunner
from service.batch.store import JobStore
from service.distributed.connection import Broker
from service.metrics import Metrics
from service.models.registry import Registry
from tests.classifiers.conftest import DIGITS_SPEC, export, lenet5_bn, train
from tests.service.test_classifier_jobs import MANIFEST, program_file
from zoo.data import load_digits_split

SETTINGS = {"epochs": 2, "sbp_lr_factor": 100.0, "checkpoint_every": 10, "seed": 0}


def test_a_killed_sbp_prune_shard_resumes_from_its_checkpoint(redis_url, tmp_path):
    split = load_digits_split()
    x, y = torch.from_numpy(split.x_train.copy()), torch.from_numpy(split.y_train.copy())
    from classifiers.upload_data import Dataset

    module = train(lambda: lenet5_bn(8, 16, 64), Dataset(x, y), epochs=2)
    folder = tmp_path / "store" / "mynet" / "1"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps(MANIFEST))
    (folder / "classifier.pt2").write_bytes(program_file(module))
    registry = Registry(torch.device("cpu"))
    registry.load_store(tmp_path / "store", "store")

    async def main():
        broker = Broker.connect(redis_url, prefix=f"t{secrets.token_hex(4)}")
        await broker.ensure_groups()
        store = JobStore(broker, 60)
        spec = {"type": "sbp-prune", "classifier": "mynet:1", **SETTINGS}
        arrays = {"data.x": x.numpy(), "data.y": y.numpy()}
        job_id = await store.create("sbp-prune", spec, len(x), [len(x)], (), arrays)
        runner = ShardRunner(store, None, registry, Metrics(), tmp_path / "store")
        first = asyncio.create_task(runner.run(job_id, 0))
        while await store.checkpoint(job_id) is None:  # wait for the first checkpoint
            assert not first.done(), first
            await asyncio.sleep(0.05)
        first.cancel()  # the worker dies: its shard will be delivered again
        await asyncio.gather(first, return_exceptions=True)
        saved = await store.checkpoint(job_id)
        assert (await store.get(job_id))["state"] == "running"
        assert await runner.run(job_id, 0) == ("sbp-prune", "done")
        job = await store.get(job_id)
        await broker.close()
        return job, saved

    job, saved = asyncio.run(main())
    assert job["state"] == "succeeded" and job["output"] == "mynet-sbp:1"
    assert (tmp_path / "store" / "mynet-sbp" / "1" / "classifier.pt2").is_file()
    settings = PruneSettings(**SETTINGS)
    train_set, held_out = Dataset(x, y), None
    uninterrupted = run_sbp_prune(
        export(module), DIGITS_SPEC, train_set, held_out, settings, measure_speed=False
    ).report
    assert len(saved) > 0
    assert job["report"]["sbp"]["history"] == uninterrupted["sbp"]["history"]
    assert job["report"]["sbp"]["units_after"] == uninterrupted["sbp"]["units_after"]
