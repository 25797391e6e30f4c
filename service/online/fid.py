"""The running FID of a stream: everything it emitted so far, against the generator's
reference statistics, in the features model the generator's manifest names."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import torch

from evaluation.stats import FeatureStats
from service.metrics import Metrics

log = logging.getLogger("imh.sampling")


class RunningFid:
    """FID of everything a stream emitted so far, against the generator's reference stats.

    A features model or reference that does not fit the samples turns the FID off for
    that stream (logged once) rather than breaking the stream.
    """

    def __init__(self, features: Any, reference: Any, metrics: Metrics, labels: tuple[str, str]):
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
