"""Stochastic Batch Normalization (SBN): uncertainty from any batch-normalised network.

During training a BN layer normalises with the statistics of a random mini-batch, so for
a fixed input the mean and variance it divides by are random variables. SBN models them
per channel with

    r(mu)            = N(m1, m2 - m1^2)       m1, m2: smoothed batch mean and its square
    r(sigma^2 + eps) = LogN(l1, l2 - l1^2)    l1, l2: smoothed log(batch var + eps), square

and predicts by repeating each input K times in one "virtual batch", drawing independent
statistics for every row, and averaging the softmax. That costs one forward pass of N*K
rows, where MC-BatchNorm (the straightforward estimate) needs K passes, each with a
training mini-batch.

Why log(var + eps) and not log(var): eps is what BN itself adds before the square root,
so this is exactly the quantity a row is divided by; for any live channel (variance well
above eps = 1e-5) the two agree, and a dead channel (variance 0) stays finite.

Usage:
    model = convert(model)                       # in place; deterministic output unchanged
    fit_statistics(model, train_batches)         # batches at the training batch size
    prediction = predict(model, x, samples=32, generator=torch.Generator().manual_seed(0))
    prediction.probs, prediction.entropy, prediction.mutual_information

Buffers added to each BN layer's state dict (so a converted model's safetensors carry
them): batch_mean_avg, batch_mean_sq_avg, batch_log_var_avg, batch_log_var_sq_avg,
batches_fitted.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import nn

from classifiers.common import Prediction, deterministic, summarize

MAX_SAMPLES = 1024  # K per input; the virtual batch grows linearly with it
MAX_ROWS_PER_PASS = 16384  # inputs are chunked so that N*K rows per forward stay below this
# On CPU a smaller virtual batch stays in cache: the digits04 net predicted 256 inputs at
# K=32 about 1.3x faster in passes of 1024 rows than in one pass of 8192.
CPU_ROWS_PER_PASS = 1024
SBN_BUFFERS = (
    "batch_mean_avg",
    "batch_mean_sq_avg",
    "batch_log_var_avg",
    "batch_log_var_sq_avg",
    "batches_fitted",
)


@dataclass
class _Mode:
    """What the SBN layers do in the current forward pass (absent: act like eval BN).

    kind: "fit" (batch statistics, smoothed into the buffers), "sample" (per-row draws),
    "record" (batch statistics, kept in `recorded` for MC-BatchNorm), "replay" (the
    recorded statistics).
    """

    kind: str
    generator: torch.Generator | None = None
    momentum: float = 0.1
    recorded: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


# A context variable rather than a flag on the modules: two threads can predict with the
# same model at once (one in a deterministic pass, one sampling) without seeing each
# other's mode.
_MODE: ContextVar[_Mode | None] = ContextVar("sbn_mode", default=None)


class _StochasticBatchNormMixin:
    """SBN behaviour on top of a torch BatchNorm class (see the module docstring).

    Outside predict/fit (no mode set) forward is the parent's: eval mode uses running
    statistics, train mode uses batch statistics and updates them, exactly like BN.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        device, dtype = kwargs.get("device"), kwargs.get("dtype")
        for name in SBN_BUFFERS[:-1]:
            self.register_buffer(name, torch.zeros(self.num_features, device=device, dtype=dtype))
        self.register_buffer("batches_fitted", torch.zeros((), dtype=torch.long, device=device))

    def _broadcast(self, per_channel: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # (C,) or (rows, C) -> shape that broadcasts against x (rows, C, *spatial)
        lead = per_channel.shape[:-1] if per_channel.dim() > 1 else (1,)
        return per_channel.reshape(*lead, self.num_features, *([1] * (x.dim() - 2)))

    def _normalise(
        self, x: torch.Tensor, mean: torch.Tensor, inv_std: torch.Tensor
    ) -> torch.Tensor:
        """(x - mean) * inv_std, then BN's scale and shift; statistics (C,) or (rows, C)."""
        scale = inv_std * self.weight if self.affine else inv_std
        shift = -mean * scale + (self.bias if self.affine else 0.0)
        # one fused pass over x: shift + x * scale
        return torch.addcmul(self._broadcast(shift, x), x, self._broadcast(scale, x))

    def _batch_statistics(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        values_per_channel = x.numel() // max(x.shape[1], 1)
        if values_per_channel < 2:
            raise ValueError(
                "a batch needs more than one value per channel to have a variance; "
                "fit SBN statistics with batches of the training batch size"
            )
        dims = [0, *range(2, x.dim())]
        # biased variance: what BN divides by during training
        return x.mean(dims), x.var(dims, unbiased=False)

    def _fit(self, x: torch.Tensor, momentum: float) -> torch.Tensor:
        mean, var = self._batch_statistics(x)
        log_var = (var + self.eps).log()
        # the first batch sets the averages; later ones are blended in with `momentum`
        weight = torch.where(self.batches_fitted == 0, 1.0, momentum).to(mean.dtype)
        with torch.no_grad():
            for name, value in zip(
                SBN_BUFFERS[:-1], (mean, mean**2, log_var, log_var**2), strict=True
            ):
                buffer = getattr(self, name)
                buffer.lerp_(value.to(buffer.dtype), weight.to(buffer.dtype))
            self.batches_fitted += 1
        return self._normalise(x, mean, (var + self.eps).rsqrt())

    def _sample(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        rows = x.shape[0]
        mean_std = (self.batch_mean_sq_avg - self.batch_mean_avg**2).clamp_min(0).sqrt()
        log_var_std = (self.batch_log_var_sq_avg - self.batch_log_var_avg**2).clamp_min(0).sqrt()
        draw_device = generator.device if generator is not None else x.device
        noise = torch.randn(2, rows, self.num_features, generator=generator, device=draw_device).to(
            x.device, x.dtype
        )  # (2, rows, C): one mean and one variance per row
        mean = self.batch_mean_avg + mean_std * noise[0]  # (rows, C)
        inv_std = (-0.5 * (self.batch_log_var_avg + log_var_std * noise[1])).exp()  # (rows, C)
        return self._normalise(x, mean, inv_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = _MODE.get()
        if mode is None:
            return super().forward(x)
        self._check_input_dim(x)
        if mode.kind == "sample":
            return self._sample(x, mode.generator)
        if mode.kind == "fit":
            return self._fit(x, mode.momentum)
        if mode.kind == "record":
            mean, var = self._batch_statistics(x)
            mode.recorded[id(self)] = (mean, var)
        mean, var = mode.recorded[id(self)]
        return self._normalise(x, mean, (var + self.eps).rsqrt())


class StochasticBatchNorm1d(_StochasticBatchNormMixin, nn.BatchNorm1d):
    """SBN for (N, C) or (N, C, L) inputs; a drop-in for nn.BatchNorm1d."""


class StochasticBatchNorm2d(_StochasticBatchNormMixin, nn.BatchNorm2d):
    """SBN for (N, C, H, W) inputs; a drop-in for nn.BatchNorm2d."""


class StochasticBatchNorm3d(_StochasticBatchNormMixin, nn.BatchNorm3d):
    """SBN for (N, C, D, H, W) inputs; a drop-in for nn.BatchNorm3d."""


_SBN_FOR = {
    nn.BatchNorm1d: StochasticBatchNorm1d,
    nn.BatchNorm2d: StochasticBatchNorm2d,
    nn.BatchNorm3d: StochasticBatchNorm3d,
}
_SBN_TYPES = tuple(_SBN_FOR.values())


def sbn_layers(model: nn.Module) -> list[nn.Module]:
    """The SBN layers of a converted model, in module order."""
    return [module for module in model.modules() if isinstance(module, _SBN_TYPES)]


def _to_sbn(bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    cls = next(sbn for base, sbn in _SBN_FOR.items() if isinstance(bn, base))
    reference = bn.weight if bn.affine else bn.running_mean
    sbn = cls(
        bn.num_features,
        eps=bn.eps,
        momentum=bn.momentum,
        affine=bn.affine,
        track_running_stats=bn.track_running_stats,
        device=None if reference is None else reference.device,
        dtype=None if reference is None else reference.dtype,
    )
    missing, unexpected = sbn.load_state_dict(bn.state_dict(), strict=False)
    assert not unexpected and set(missing) == set(SBN_BUFFERS), (missing, unexpected)
    if bn.affine:  # share the Parameters, so an optimiser holding them keeps working
        sbn.weight, sbn.bias = bn.weight, bn.bias
    return sbn.train(bn.training)


def convert(model: nn.Module) -> nn.Module:
    """Replace every nn.BatchNorm1d/2d/3d in `model` by its SBN layer, IN PLACE; returns it.

    Parameters and running statistics carry over, so outside `predict`/`fit_statistics`
    the converted model computes exactly what the original did (eval and train mode).
    A model that is itself a BN layer is returned as a new layer. Converting twice is a
    no-op. Deep-copy first (copy.deepcopy) to keep the original.
    """
    if isinstance(model, tuple(_SBN_FOR)) and not isinstance(model, _SBN_TYPES):
        return _to_sbn(model)
    for name, child in list(model.named_children()):
        if isinstance(child, tuple(_SBN_FOR)) and not isinstance(child, _SBN_TYPES):
            setattr(model, name, _to_sbn(child))
        else:
            convert(child)
    return model


def _require_sbn(model: nn.Module) -> list[nn.Module]:
    layers = sbn_layers(model)
    if not layers:
        raise ValueError("model has no SBN layers: call classifiers.sbn.convert(model) first")
    return layers


def _first_tensor(batch: torch.Tensor | tuple | list) -> torch.Tensor:
    return batch[0] if isinstance(batch, tuple | list) else batch


def _model_device(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


@contextmanager
def _sbn_pass(model: nn.Module, mode: _Mode | None) -> Iterator[None]:
    """SBN layers in `mode`, every other layer in eval mode (dropout off), no autograd.

    Each module's own train/eval flag is put back afterwards.
    """
    flags = [(module, module.training) for module in model.modules()]
    token = _MODE.set(mode)
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        _MODE.reset(token)
        for module, training in flags:
            module.training = training


def fit_statistics(
    model: nn.Module,
    batches: Iterable[torch.Tensor | tuple | list],
    momentum: float = 0.1,
) -> nn.Module:
    """Fit r(mu), r(sigma^2) of every SBN layer from training batches; returns `model`.

    Each batch (a tensor, or a tuple/list whose first item is the inputs, as a DataLoader
    yields) goes through the network with every SBN layer normalising by that batch's own
    statistics, as during training; each layer smooths batch mean, its square, log(batch
    var + eps) and its square with `momentum` (the first batch sets them). Starts afresh on
    every call. Use batches of the training batch size: the spread of the statistics, and
    so the uncertainty, depends on it. Running statistics (deterministic mode) are left
    alone. Works for any pre-trained network after `convert`.
    """
    if not 0.0 < momentum <= 1.0:
        raise ValueError(f"momentum must be in (0, 1], got {momentum}")
    layers = _require_sbn(model)
    for layer in layers:
        layer.batches_fitted.zero_()
    device = _model_device(model)
    with _sbn_pass(model, _Mode("fit", momentum=momentum)):
        for batch in batches:
            model(_first_tensor(batch).to(device))
    if int(layers[0].batches_fitted) == 0:
        raise ValueError("fit_statistics got no batches")
    return model


def _validate(model: nn.Module, x: torch.Tensor, input_shape: tuple[int, ...] | None) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError("x must be a floating-point tensor")
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError("x must hold at least one input along its first dimension")
    expected = input_shape if input_shape is not None else getattr(model, "input_shape", None)
    if expected is not None and tuple(x.shape[1:]) != tuple(expected):
        raise ValueError(f"each input must have shape {list(expected)}, got {list(x.shape[1:])}")
    if not torch.isfinite(x).all():
        raise ValueError("x contains NaN or infinite values")


def _validate_samples(samples: int) -> None:
    if isinstance(samples, bool) or not isinstance(samples, int):
        raise ValueError(f"samples must be an integer, got {samples!r}")
    if not 1 <= samples <= MAX_SAMPLES:
        raise ValueError(f"samples must be between 1 and {MAX_SAMPLES}, got {samples}")


def predict_deterministic(
    model: nn.Module, x: torch.Tensor, *, input_shape: tuple[int, ...] | None = None
) -> Prediction:
    """One eval-mode pass (running statistics, as plain BN): mutual information is 0.

    Works on converted and unconverted models. x: (N, *input_shape); the shape is checked
    against `input_shape`, else `model.input_shape` when the model has one.
    Raises ValueError on bad input. Tensors come back on the model's device.
    """
    _validate(model, x, input_shape)
    with _sbn_pass(model, None):
        logits = model(x.to(_model_device(model)))
    return deterministic(logits.float().softmax(-1))


def predict(
    model: nn.Module,
    x: torch.Tensor,
    samples: int,
    generator: torch.Generator | None = None,
    *,
    input_shape: tuple[int, ...] | None = None,
) -> Prediction:
    """SBN prediction: each input repeated `samples` (K) times, statistics drawn per row.

    Returns averaged softmax, its entropy and mutual information (classifiers.common).
    Same generator seed, same answer (for the same x); generator None draws from torch's
    global generator. The model must be converted and
    fitted. Raises ValueError for a bad x (shape, NaN/inf), K outside [1, MAX_SAMPLES], or
    an unfitted model. Tensors come back on the model's device.
    """
    _validate(model, x, input_shape)
    _validate_samples(samples)
    layers = _require_sbn(model)
    if any(int(layer.batches_fitted) == 0 for layer in layers):
        raise ValueError("SBN statistics are not fitted: call fit_statistics first")
    device = _model_device(model)
    rows_per_pass = MAX_ROWS_PER_PASS
    if device.type == "cpu":
        rows_per_pass = min(rows_per_pass, CPU_ROWS_PER_PASS)
    inputs_per_pass = max(1, rows_per_pass // samples)
    sample_probs = []
    with _sbn_pass(model, _Mode("sample", generator=generator)):
        for chunk in x.to(device).split(inputs_per_pass):
            virtual_batch = chunk.repeat_interleave(samples, dim=0)  # (n*K, *input_shape)
            probs = model(virtual_batch).float().softmax(-1)
            sample_probs.append(probs.reshape(len(chunk), samples, -1))  # (n, K, C)
    return summarize(torch.cat(sample_probs))


def predict_mc_batchnorm(
    model: nn.Module,
    x: torch.Tensor,
    train_x: torch.Tensor,
    samples: int,
    batch_size: int,
    generator: torch.Generator | None = None,
) -> Prediction:
    """MC-BatchNorm baseline: K passes, each normalising with a real training mini-batch.

    Per pass: draw `batch_size` rows of `train_x` without replacement, forward them with
    batch statistics (every layer's mean and biased variance are kept), then forward x
    normalised with those statistics. Needs a converted model (statistics need not be
    fitted). This is the straightforward estimate SBN approximates: 2K forward passes.
    """
    _validate(model, x, None)
    _validate_samples(samples)
    _require_sbn(model)
    if not 2 <= batch_size <= len(train_x):
        raise ValueError(f"batch_size must be between 2 and {len(train_x)}, got {batch_size}")
    device = _model_device(model)
    x, train_x = x.to(device), train_x.to(device)
    draw_device = generator.device if generator is not None else device
    sample_probs = []
    for _ in range(samples):
        rows = torch.randperm(len(train_x), generator=generator, device=draw_device)
        rows = rows[:batch_size]
        mode = _Mode("record")
        with _sbn_pass(model, mode):
            model(train_x[rows.to(device)])
            mode.kind = "replay"
            sample_probs.append(model(x).float().softmax(-1))
    return summarize(torch.stack(sample_probs, dim=1))  # (N, K, C)
