"""Plain block networks and their compression into physically smaller ones.

A `BlockNet` is a stack of conv blocks then dense blocks:

    ConvBlock:  conv (no bias) [+ offset] [* noise] + bias -> [BN] -> ReLU -> [max-pool]
    DenseBlock: flatten [-> gather] [* noise] -> linear -> [ReLU]

The optional `sbp` slot of each block holds a noise layer (classifiers.sbp.SBPLayer) on
the conv's output channels or the dense layer's input features; a plain network has none.
`compress` turns a trained SBP network into a plain BlockNet with only the kept units:
E[theta] is folded into the weights, a removed conv channel's constant output
relu(BN(bias)) is folded into the next layer (a per-position `offset` map for a padded
conv, whose border taps see fewer constants; the bias for a dense layer), and the dense
inputs that survive are picked with a fixed `gather` index. No masks run at inference.

The compressed network's manifest names `classifiers.compress:BlockNet` with
`model.config` (which carries the surviving widths), so architectures.build loads it.

Example:
    small, report = compress(sbp_model)
    report.units_after, report.flops_reduction
    timings = measure_speedup(original, small, batch_sizes=(1, 256))
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from architectures import architecture


def _max_pool(y: torch.Tensor, size: int) -> torch.Tensor:
    if size == 1:
        return y
    if size == 2 and (torch.compiler.is_exporting() or y.shape[0] >= 8):
        # two strided maxima: on this CPU build about 8x faster than F.max_pool2d for a
        # batch of small maps (and slower for a single one), same values. An exported
        # program has a dynamic batch, so it cannot branch on it: it always takes this way
        height, width = y.shape[-2] // 2 * 2, y.shape[-1] // 2 * 2
        y = y[..., :height, :width]
        y = torch.maximum(y[..., 0::2, :], y[..., 1::2, :])
        return torch.maximum(y[..., 0::2], y[..., 1::2])
    return F.max_pool2d(y, size)


class ConvBlock(nn.Module):
    """Stride-1 conv with 'same'-style padding, then bias, optional BN, ReLU, max-pool."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        padding: int = 1,
        pool: int = 1,
        batch_norm: bool = False,
        offset: list[int] | None = None,
    ):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, bias=False)
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.bn = nn.BatchNorm2d(out_channels) if batch_norm else None
        self.pool = pool
        self.sbp: nn.Module | None = None
        if offset is not None:  # constants of pruned input channels, (out, H, W)
            self.register_buffer("offset", torch.zeros(out_channels, *offset))
        else:
            self.offset = None

    @property
    def units(self) -> int:
        return self.conv.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sbp is None and type(self.conv) is nn.Conv2d:  # bias fused into the conv
            y = F.conv2d(x, self.conv.weight, self.bias, padding=self.conv.padding)
            if self.offset is not None:
                y = y + self.offset
        else:
            y = self.conv(x)
            if self.offset is not None:
                y = y + self.offset
            if self.sbp is not None:
                y = self.sbp(y)
            y = y + self.bias[:, None, None]
        if self.bn is not None:
            y = self.bn(y)
        return _max_pool(F.relu(y), self.pool)

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, int, int]:
        _, height, width = shape
        k, p = self.conv.kernel_size[0], self.conv.padding[0]
        height, width = height + 2 * p - k + 1, width + 2 * p - k + 1
        return self.conv.out_channels, height // self.pool, width // self.pool

    def constant_output(self) -> torch.Tensor:
        """relu(BN(bias)) per channel in float64: what a channel with zero conv output emits."""
        y = self.bias.detach().double()
        if self.bn is not None:
            bn = self.bn
            y = (y - bn.running_mean.double()) / torch.sqrt(bn.running_var.double() + bn.eps)
            y = y * bn.weight.detach().double() + bn.bias.detach().double()
        return y.clamp_min(0.0)


class DenseBlock(nn.Module):
    """Flatten, optionally gather fixed input positions, then linear and optional ReLU."""

    def __init__(
        self, in_features: int, out_features: int, relu: bool = True, gather: bool = False
    ):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.relu = relu
        self.sbp: nn.Module | None = None
        if gather:  # which flattened inputs this layer reads, (in_features,)
            self.register_buffer("index", torch.zeros(in_features, dtype=torch.long))
        else:
            self.index = None

    @property
    def units(self) -> int:
        return self.linear.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        if self.index is not None:
            x = x.index_select(1, self.index)
        if self.sbp is not None:
            x = self.sbp(x)
        x = self.linear(x)
        return F.relu(x) if self.relu else x


def _make_block(spec: dict[str, Any]) -> nn.Module:
    spec = dict(spec)
    kind = spec.pop("kind", None)
    if kind == "conv":
        return ConvBlock(**spec)
    if kind == "dense":
        return DenseBlock(**spec)
    raise ValueError(f"block kind must be 'conv' or 'dense', got {kind!r}")


@architecture
class BlockNet(nn.Module):
    """Conv blocks then dense blocks (see the module docstring); output logits.

    input_shape: (C, H, W) of one input ((features,) without conv blocks); blocks: one
    dict per block, {"kind": "conv" |
    "dense", ...constructor kwargs of ConvBlock / DenseBlock}.
    """

    def __init__(self, input_shape: list[int], blocks: list[dict[str, Any]]):
        super().__init__()
        kinds = [spec.get("kind") for spec in blocks]
        # vectors (N, features) are fine for dense-only networks
        if len(input_shape) != 3 and not (len(input_shape) == 1 and "conv" not in kinds):
            raise ValueError(f"input_shape must be [C, H, W] (or [features]), got {input_shape}")
        if not kinds or kinds[-1] != "dense" or "conv" in kinds[kinds.index("dense") :]:
            raise ValueError(f"need conv blocks then at least one dense block, got {kinds}")
        self.input_shape = tuple(input_shape)
        self.block_specs = [dict(spec) for spec in blocks]
        self.blocks = nn.ModuleList(_make_block(spec) for spec in blocks)

    @property
    def block_config(self) -> dict[str, Any]:
        """Constructor kwargs of classifiers.compress:BlockNet for this network (JSON-able)."""
        return {"input_shape": list(self.input_shape), "blocks": copy.deepcopy(self.block_specs)}

    @property
    def config(self) -> dict[str, Any]:
        """Constructor kwargs of this class (subclasses with their own kwargs override)."""
        return self.block_config

    def block_input_shapes(self) -> list[tuple[int, ...]]:
        shapes, shape = [], self.input_shape
        for block in self.blocks:
            shapes.append(shape)
            if isinstance(block, ConvBlock):
                shape = block.output_shape(shape)
            else:
                shape = (block.linear.out_features,)
        return shapes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def _check_plain_blocks(model: BlockNet) -> None:
    if not isinstance(model, BlockNet):
        raise ValueError(f"expected a BlockNet, got {type(model).__name__}")
    for block in model.blocks:
        if getattr(block, "offset", None) is not None or getattr(block, "index", None) is not None:
            raise ValueError("this network is already compressed (it has offsets or gathers)")


def _kept_outputs(model: BlockNet, keep: list[torch.Tensor], shapes) -> list[torch.Tensor]:
    """Which output units of each block must physically remain."""
    blocks, kept = list(model.blocks), []
    for i, block in enumerate(blocks):
        following = blocks[i + 1] if i + 1 < len(blocks) else None
        if isinstance(block, ConvBlock):
            needed = torch.ones(block.units, dtype=torch.bool)
            if isinstance(following, DenseBlock):  # a channel none of whose features is read
                channels = block.units
                needed = keep[i + 1].view(channels, -1).any(1)
            rows = keep[i] & needed
            if not rows.any():  # keep one (unread) channel so the layer stays well formed
                rows[int(keep[i].int().argmax())] = True
        elif following is not None:
            rows = keep[i + 1].clone()
        else:
            rows = torch.ones(block.linear.out_features, dtype=torch.bool)
        kept.append(rows)
    return kept


@torch.no_grad()
def slice_units(model: BlockNet, keep: list[torch.Tensor], scale: list[torch.Tensor]) -> BlockNet:
    """A plain BlockNet equal to `model` with each block's units multiplied by `scale`.

    keep[i] / scale[i] (one entry per unit of block i: conv output channels, dense input
    features) say which units survive and what they are multiplied by; scale is ignored
    where keep is False (the unit is multiplied by 0). Any noise layers in `model` are
    ignored. Computed in float64, returned in float32 on the model's device, eval mode.
    """
    _check_plain_blocks(model)
    blocks = list(model.blocks)
    if len(keep) != len(blocks) or len(scale) != len(blocks):
        raise ValueError(f"need keep and scale for each of the {len(blocks)} blocks")
    keep = [k.detach().cpu().bool().flatten() for k in keep]
    scale = [s.detach().cpu().double().flatten() for s in scale]
    for block, k, s in zip(blocks, keep, scale, strict=True):
        if k.numel() != block.units or s.numel() != block.units:
            raise ValueError(f"a block has {block.units} units, got {k.numel()} and {s.numel()}")
    scale = [s * k for s, k in zip(scale, keep, strict=True)]
    shapes = model.block_input_shapes()
    rows_kept = _kept_outputs(model, keep, shapes)

    specs, state = [], {}
    in_keep = torch.ones(model.input_shape[0], dtype=torch.bool)  # per incoming channel/unit
    in_const = torch.zeros(model.input_shape[0], dtype=torch.float64)
    from_dense = False
    for i, (block, rows) in enumerate(zip(blocks, rows_kept, strict=True)):
        prefix = f"blocks.{i}."
        spec = dict(model.block_specs[i])
        if isinstance(block, ConvBlock):
            weight = block.conv.weight.detach().cpu().double() * scale[i].view(-1, 1, 1, 1)
            weight = weight[rows]  # (out kept, in, k, k)
            state[prefix + "conv.weight"] = weight[:, in_keep]
            constant_in = in_const * ~in_keep
            if constant_in.any():  # removed input channels that still emit a constant
                _, height, width = shapes[i]
                const_map = constant_in.view(1, -1, 1, 1).expand(1, -1, height, width)
                offset = F.conv2d(const_map, weight, padding=block.conv.padding)[0]
                state[prefix + "offset"] = offset
                spec["offset"] = list(offset.shape[1:])
            state[prefix + "bias"] = block.bias.detach().cpu().double()[rows]
            if block.bn is not None:
                for name, value in block.bn.state_dict().items():
                    state[prefix + "bn." + name] = value.cpu()[rows] if value.dim() else value
            spec.update(in_channels=int(in_keep.sum()), out_channels=int(rows.sum()))
            # a channel its SBP removed emits relu(BN(bias)); an unread one needs nothing
            in_const = torch.where(~keep[i], block.constant_output().cpu(), 0.0)
            from_dense = False
        else:
            weight = block.linear.weight.detach().cpu().double() * scale[i].view(1, -1)
            bias = block.linear.bias.detach().cpu().double()
            if from_dense:  # the previous block already dropped the rows this one ignores
                columns, index = in_keep, None
            else:
                n_in = block.units
                positions = n_in // in_keep.numel()  # spatial positions per channel
                channel = torch.arange(n_in) // positions
                available = in_keep[channel]
                bias = bias + weight @ (in_const[channel] * (keep[i] & ~available))
                rank = torch.cumsum(in_keep.long(), 0) - 1
                flat = rank[channel] * positions + torch.arange(n_in) % positions
                columns = keep[i] & available
                index = None if torch.equal(columns, available) else flat[columns]
            weight = weight[rows][:, columns]
            if index is not None and index.numel() == 0:  # only constants reach this layer
                index, weight = torch.zeros(1, dtype=torch.long), weight.new_zeros(len(weight), 1)
            state[prefix + "linear.weight"] = weight
            state[prefix + "linear.bias"] = bias[rows]
            if index is not None:
                state[prefix + "index"] = index
            spec.update(
                in_features=weight.shape[1], out_features=int(rows.sum()), gather=index is not None
            )
            in_const = torch.zeros(int(rows.numel()), dtype=torch.float64)
            from_dense = True
        specs.append(spec)
        in_keep = rows
    small = BlockNet(list(model.input_shape), specs)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    missing, unexpected = small.load_state_dict(state, strict=False)
    if unexpected or any(not k.endswith("num_batches_tracked") for k in missing):
        raise RuntimeError(f"slicing bug: missing {missing}, unexpected {unexpected}")
    return small.to(next(model.parameters()).device).eval()


def count_flops(model: BlockNet) -> int:
    """FLOPs of one input: 2 per multiply-add of the convs and linear layers.

    Biases, offsets, BN, ReLU, pooling and gathers are not counted (each is at most one
    operation per activation, a few percent of the total here).
    """
    total = 0
    for block, shape in zip(model.blocks, model.block_input_shapes(), strict=True):
        if isinstance(block, ConvBlock):
            out_channels, height, width = block.output_shape(shape)
            conv = block.conv
            k = conv.kernel_size[0] * conv.kernel_size[1]
            spatial = (height * block.pool) * (width * block.pool)  # before pooling
            total += 2 * out_channels * conv.in_channels * k * spatial
        else:
            total += 2 * block.linear.in_features * block.linear.out_features
    return total


def count_params(model: nn.Module) -> int:
    """Stored floating-point numbers a deployed network needs (noise parameters excluded)."""
    return sum(
        v.numel()
        for k, v in model.state_dict().items()
        if v.is_floating_point() and ".sbp." not in k
    )


def unit_counts(model: BlockNet) -> list[int]:
    """Units per layer in the thesis' form: conv output channels, dense input features."""
    return [block.units for block in model.blocks]


def layer_names(model: BlockNet) -> list[str]:
    names, counts = [], {"conv": 0, "dense": 0}
    for block in model.blocks:
        kind = "conv" if isinstance(block, ConvBlock) else "dense"
        counts[kind] += 1
        names.append(f"{kind}{counts[kind]}")
    return names


@dataclass
class CompressionReport:
    """What compression removed; units are per layer (conv outputs, dense inputs)."""

    layers: list[str]
    units_before: list[int]
    units_after: list[int]  # units the pruning rule kept
    widths_after: list[int]  # units physically left in the compressed network
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int

    @property
    def params_reduction(self) -> float:
        return self.params_before / self.params_after

    @property
    def flops_reduction(self) -> float:
        return self.flops_before / self.flops_after

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "params_reduction": self.params_reduction,
            "flops_reduction": self.flops_reduction,
        }


def compress(model: BlockNet) -> tuple[BlockNet, CompressionReport]:
    """Slice a trained SBP network into a plain, smaller BlockNet (see the module docstring).

    Every block must carry an SBP layer (`block.sbp` with `mask()` and `multiplier()`).
    The result computes what `model.eval()` computes, up to float32 rounding.
    """
    _check_plain_blocks(model)
    if any(block.sbp is None for block in model.blocks):
        raise ValueError("every block needs an SBP layer: use classifiers.sbp.add_sbp first")
    keep = [block.sbp.mask() for block in model.blocks]
    scale = [block.sbp.multiplier() for block in model.blocks]
    small = slice_units(model, keep, scale)
    report = CompressionReport(
        layers=layer_names(model),
        units_before=unit_counts(model),
        units_after=[int(k.sum()) for k in keep],
        widths_after=unit_counts(small),
        params_before=count_params(model),
        params_after=count_params(small),
        flops_before=count_flops(model),
        flops_after=count_flops(small),
    )
    return small, report


@torch.inference_mode()
def _time_call(model: nn.Module, x: torch.Tensor, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        model(x)
    if x.is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls


def measure_latencies(
    models: dict[str, nn.Module],
    input_shape: tuple[int, ...],
    batch_sizes: tuple[int, ...] = (1, 256),
    *,
    repeats: int = 30,
    min_seconds: float = 0.02,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Median seconds per batch, {model name: {str(batch size): seconds}}.

    The models are timed in turn within each of `repeats` rounds, each timing enough
    calls to last about `min_seconds`, so load from other processes hits all alike.
    Eval mode, no autograd, on each model's device, random inputs in [0, 1).
    """
    generator = torch.Generator().manual_seed(seed)
    names = list(models)
    results: dict[str, dict[str, float]] = {name: {} for name in names}
    for batch in batch_sizes:
        x = torch.rand((batch, *input_shape), generator=generator)
        inputs = {name: x.to(next(m.parameters()).device) for name, m in models.items()}
        calls = {}
        for name, model in models.items():  # warm-up (first calls build kernels), calibration
            _time_call(model.eval(), inputs[name], 3)
            calls[name] = 1
            while _time_call(model, inputs[name], calls[name]) * calls[name] < min_seconds:
                calls[name] *= 2
        times: dict[str, list[float]] = {name: [] for name in names}
        for _ in range(repeats):
            # a fresh order each round, so no model always runs right after another
            for i in torch.randperm(len(names), generator=generator).tolist():
                times[names[i]].append(
                    _time_call(models[names[i]], inputs[names[i]], calls[names[i]])
                )
        for name in models:
            results[name][str(batch)] = statistics.median(times[name])
    return results


def measure_speedup(
    original: nn.Module,
    compressed: nn.Module,
    input_shape: tuple[int, ...],
    batch_sizes: tuple[int, ...] = (1, 256),
    *,
    repeats: int = 30,
    min_seconds: float = 0.02,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Latency (ms per batch), throughput (inputs/s) and speed-up per batch size.

    {str(batch size): {"original_ms", "compressed_ms", "original_per_s",
    "compressed_per_s", "speedup"}}, timed alternately (see `measure_latencies`).
    """
    seconds = measure_latencies(
        {"original": original, "compressed": compressed},
        input_shape,
        batch_sizes,
        repeats=repeats,
        min_seconds=min_seconds,
        seed=seed,
    )
    results = {}
    for batch in map(str, batch_sizes):
        t_orig, t_small = seconds["original"][batch], seconds["compressed"][batch]
        results[batch] = {
            "original_ms": 1e3 * t_orig,
            "compressed_ms": 1e3 * t_small,
            "original_per_s": int(batch) / t_orig,
            "compressed_per_s": int(batch) / t_small,
            "speedup": t_orig / t_small,
        }
    return results
