"""Compiled models: a loaded generator, discriminator (sample or pair), proposal or
features module run through `torch.compile` (inductor), where that is faster.

Opt in per server with IMH_COMPILE=1, or per model with the manifest's `"compile"`:

| manifest `compile` | IMH_COMPILE=1                        | IMH_COMPILE=0 (default) |
|--------------------|--------------------------------------|-------------------------|
| unset              | compiled where faster at warm-up     | eager                   |
| true               | compiled at every warmed batch size  | same                    |
| false              | eager                                | eager                   |

`compile_model` runs at load (`service.models.loading.load_model`), after the smoke
tests. It compiles the module once per autograd mode the kernels use (inference mode
for every kind; gradients too for generators and sample discriminators, which MALA and
Ex2MCMC differentiate), warms it up at `WARMUP_ROWS` and at the odd sizes `PROBE_ROWS` in
between, checks every warm-up output (and the gradient with respect to the inputs)
against eager within `RTOL`/`ATOL`, and times compiled against eager, interleaved, at
each `WARMUP_ROWS` size. A call then runs compiled when its autograd mode, input shapes
and dtypes match a warmed signature, it has at least `MIN_ROWS` rows, and compiled was at
least `MIN_SPEEDUP` times faster at the warm-up size nearest its row count (log scale);
otherwise eager, on the same weights. A manifest's `"compile": true` skips the timing
(compiled wherever warmed). Any failure (the compiler raises, the batch dimension cannot
stay dynamic, an output or gradient off eager's, inputs of unknown shape) leaves the
model eager, with one log line and the reason on `LoadedModel.compile_note` (shown by
/v1/models).

Batch sizes: a dynamic batch dimension, not padded buckets. Measured on the zoo's
digits G then D, one CPU thread, torch 2.13, a loaded 2-core machine, interleaved rounds,
speed-up over eager (a padded call runs the power-of-two bucket at or above its rows;
`python -m benchmarks.compiled --design` repeats this, docs/BENCHMARKS.md has a run):

| rows | inference: static, padded | inference: dynamic | gradients: static, padded | dynamic |
|------|------|------|------|------|
| 16   | x0.85 | x1.00 | x0.82 | x0.74 |
| 100  | x0.83 | x1.15 | x0.54 | x0.84 |
| 256  | x1.19 | x1.15 | x0.93 | x0.86 |
| 1000 | x1.51 | x1.66 | x1.07 | x1.46 |
| 3000 | x1.41 | x1.94 | x0.89 | x1.66 |
| 4096 | x2.24 | x2.36 | x1.23 | x1.48 |

Static shapes compile once per bucket, 10-18 s each with a cold inductor cache, so the
powers of two from 16 to 4096 cost 9 compiles per autograd mode, and a padded call pays
for up to twice its rows. The dynamic batch dimension (`torch._dynamo.mark_dynamic` on
dim 0 of every input) compiles once per mode (about 30 s cold, the process's first
compile included; a second graph where a kernel holds for a range of sizes only, e.g.
convolutions from 16 rows, tiny matmuls up to 24) and then serves every row count with no
recompile, as fast as the static graph or faster. Calls under 16 rows run eager: they
gained nothing compiled, and would cost another graph. After warm-up a model calls its
compiled code through `torch._dynamo.run`, which never compiles: an input that matches
no compiled graph runs eager instead of recompiling mid-request. On the toy25 MLPs
(4 x 100) compiled was slower at every size (x0.5-x1.0 inference, x0.3-x0.5 gradients):
the timing at load keeps such models eager.

GPU: the same code. CUDA graphs ("reduce-overhead") are not used: a group's row count
changes whenever requests join or leave and DRS rows finish, and each new count would
record a new graph; timing synchronises the device.

Shapes: a generator's inputs are known from its manifest; discriminators, pairs,
proposals and features learn the sample shape from the generator their manifest names
(or that names them as features) when it was loaded earlier in this process (the
registry loads folders in name order, so `mygan` comes before `mygan-d`). A model whose
generator is not known yet runs eager, saying so.

Inductor keeps compiled kernels in its cache (TORCHINDUCTOR_CACHE_DIR, by default under
/tmp): a restart on the same machine compiles in seconds instead of tens of seconds.
"""

from __future__ import annotations

import logging
import math
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

log = logging.getLogger("imh.compile")

COMPILED_KINDS = ("generator", "discriminator", "proposal", "features")
WARMUP_ROWS = (16, 256, 4096)  # the engine's usual batches: small requests, streams, blocks
PROBE_ROWS = (17, 63, 257, 1023, 4097)  # checked too, not timed: sizes in between
MIN_ROWS = 16  # fewer rows run eager: no faster compiled, and convolutions guard on 16
MIN_SPEEDUP = 1.1  # compiled at a size only when this much faster than eager there
RTOL, ATOL = 1e-3, 1e-4  # warm-up outputs against eager, per value (ATOL x largest |value|)
# Input gradients against eager, as a whole: |compiled - eager| <= GRAD_RTOL |eager| (2-norm).
# A piecewise-linear net's gradient jumps where rounding moves a unit across its kink, so a
# few values differ by O(1) in float32 whichever way it is computed: eager float32 itself
# was up to 7e-4 (relative norm) from float64 on the zoo's discriminators, compiled up to
# 1.9e-3 (digits-d-gan, uniform inputs); outputs agreed to 2e-6.
GRAD_RTOL = 1e-2
MAX_WARMUP_VALUES = 2**24  # input values of one warm-up call (a larger size is skipped)
TIMING_S = 0.25  # time spent per side on each (mode, size) speed check, at least 3 pairs
MAX_NOTE = 600

# Sample shapes by model name, from generators loaded in this process: a generator's own
# name, and the features model its manifest names.
_sample_shapes: dict[str, tuple[int, ...]] = {}
_compile_lock = threading.Lock()  # one model compiles at a time


class Outcome(NamedTuple):
    module: torch.nn.Module  # what LoadedModel.module becomes
    compiled: bool  # some calls run compiled code
    note: str | None  # where it runs eager, and why (None: compiled everywhere, or off)


# (mode, inputs): mode "inference" or "grad"; each input (shape after the rows, how
# warm-up draws it: "normal" for latents and noise, "uniform" in [0, 1) for samples).
Signature = tuple[str, tuple[tuple[tuple[int, ...], str], ...]]


def remember_shapes(manifest: Any, name: str) -> None:
    """Note a generator's sample shape for the models that name it (or its features)."""
    if manifest.kind != "generator":
        return
    shape = tuple(manifest.sample_shape)
    _sample_shapes[name] = shape
    if manifest.features is not None:
        _sample_shapes[manifest.features.partition(":")[0]] = shape


def requested(manifest: Any, server_setting: bool) -> str | None:
    """ "forced" (the manifest says true), "auto" (IMH_COMPILE), or None (eager)."""
    if manifest.kind not in COMPILED_KINDS:
        return None
    choice = getattr(manifest, "compile", None)
    if choice is None:
        return "auto" if server_setting else None
    return "forced" if choice else None


def signatures(manifest: Any, name: str) -> list[Signature] | str:
    """The (mode, inputs) the kernels call this model with; a str says why none."""
    kind = manifest.kind
    if kind == "generator":
        latent = (((manifest.latent_dim,), "normal"),)
        return [("inference", latent), ("grad", latent)]
    if kind == "features":
        shape = _sample_shapes.get(name)
        if shape is None:
            return "its input shape is unknown: no generator loaded before it names it"
        return [("inference", ((shape, "uniform"),))]
    owner = manifest.generator.partition(":")[0]
    shape = _sample_shapes.get(owner)
    if shape is None:
        return f"its input shape is unknown: generator {owner!r} was not loaded before it"
    sample = (shape, "uniform")
    if kind == "proposal":
        return [("inference", (sample, ((manifest.noise_dim,), "normal")))]
    if manifest.input == "pair":
        return [("inference", (sample, sample))]
    return [("inference", (sample,)), ("grad", (sample,))]


def compile_model(
    module: torch.nn.Module, manifest: Any, ref: str, device: torch.device, server_setting: bool
) -> Outcome:
    """The module to serve: compiled where it pays (or forced), else `module` itself."""
    remember_shapes(manifest, ref.partition(":")[0])
    how = requested(manifest, server_setting)
    if how is None:
        return Outcome(module, False, None)
    wanted = signatures(manifest, ref.partition(":")[0])
    if isinstance(wanted, str):
        return _eager(module, ref, wanted)
    started = time.monotonic()
    try:
        with _compile_lock:
            wrapper = CompiledModule.build(module, wanted, device, timed=how == "auto")
    except WarmupMismatch as error:
        return _eager(module, ref, str(error))
    except Exception as error:  # noqa: BLE001 - any compiler failure leaves the model eager
        return _eager(module, ref, f"compiling failed: {_reason(error)}")
    seconds = time.monotonic() - started
    if not wrapper.compiled_anywhere:
        return _eager(module, ref, f"compiled was not faster at warm-up ({wrapper.summary()})")
    note = wrapper.summary() if not wrapper.compiled_everywhere else None
    log.info(
        "%s compiled in %.1fs, %d graphs (%s)", ref, seconds, wrapper.compiles, wrapper.summary()
    )
    return Outcome(wrapper, True, note)


def _eager(module: torch.nn.Module, ref: str, reason: str) -> Outcome:
    reason = reason if len(reason) <= MAX_NOTE else reason[: MAX_NOTE - 3] + "..."
    log.warning("%s runs eager: %s", ref, reason)
    return Outcome(module, False, f"eager: {reason}")


def _reason(error: BaseException) -> str:
    """The innermost error's type and first line (the compiler wraps the cause)."""
    while (inner := getattr(error, "inner_exception", None) or error.__cause__) is not None:
        error = inner
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


class WarmupMismatch(Exception):
    """A warm-up output or gradient of the compiled module is off eager's."""


def _configure_dynamo() -> None:
    import torch._dynamo

    # Compiled code is cached per Python code object, with guards telling the entries
    # apart; every torch.export program shares one forward, and each model adds an entry
    # per autograd mode, so the default limit of 8 would be reached by a few uploads.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    torch._dynamo.config.accumulated_recompile_limit = max(
        torch._dynamo.config.accumulated_recompile_limit, 4096
    )


class CompiledModule(torch.nn.Module):
    """The eager module plus its compiled code, and which calls take which.

    `eager` is the loaded module (a submodule: parameters(), eval() and the state dict
    are the original ones); the compiled code runs the same parameters.
    """

    def __init__(self, eager: torch.nn.Module, device: torch.device):
        super().__init__()
        self.eager, self.device = eager, device
        self.compiles = 0  # graphs compiled (forwards and backwards); fixed after warm-up
        # (mode, input key) -> [(log2 rows, speed-up or None when untimed, run compiled)]
        self.routes: dict[tuple, list[tuple[float, float | None, bool]]] = {}
        self.calls = {"compiled": 0, "eager": 0}

        def backend(graph: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable:
            from torch._inductor.compile_fx import compile_fx

            self.compiles += 1
            return compile_fx(graph, example_inputs)

        from service.models.safe_files import ExportedModule

        # An ExportedModule's graph module itself: its train() is a no-op wrapper.
        target = eager.program if isinstance(eager, ExportedModule) else eager
        compiled = torch.compile(target, backend=backend, dynamic=None)
        object.__setattr__(self, "_compiled", compiled)  # not a submodule: no second copy
        object.__setattr__(self, "_run", torch._dynamo.run(compiled))  # never compiles

    # Building -------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        module: torch.nn.Module,
        wanted: Sequence[Signature],
        device: torch.device,
        timed: bool,
        rows: Sequence[int] = WARMUP_ROWS,
    ) -> CompiledModule:
        """Compile `module` for `wanted`, check it against eager at `rows` rows, and (when
        `timed`) keep compiled only at the sizes where it was faster."""
        _configure_dynamo()
        for parameter in module.parameters():  # served, never trained: no weight gradients
            parameter.requires_grad_(False)
        wrapper = cls(module, device)
        for mode, inputs in wanted:
            values = max(math.prod(shape) for shape, _ in inputs)
            sizes = [n for n in rows if n * values <= MAX_WARMUP_VALUES] or [min(rows)]
            # Odd sizes in between too: a graph may hold for a range of sizes only (tiny
            # matmuls are inlined up to some rows), or for even sizes only; each then
            # gets its own graph now rather than none later.
            probes = [n for n in PROBE_ROWS if n * values <= MAX_WARMUP_VALUES]
            for n in [*sizes, *probes]:
                wrapper._check(_example(inputs, n, device), mode, n)
            routes = []
            for n in sizes:  # timed once every size has run: no compiling inside the timing
                speedup = wrapper._time(_example(inputs, n, device), mode) if timed else None
                routes.append((math.log2(n), speedup, speedup is None or speedup >= MIN_SPEEDUP))
            key = tuple((shape, torch.float32, mode == "grad") for shape, _ in inputs)
            wrapper.routes[(mode, key)] = routes
        return wrapper

    def _check(self, args: list[torch.Tensor], mode: str, rows: int) -> None:
        """Run eager and compiled on `args` (compiling on first use); raise on a mismatch."""
        eager_out, eager_grads = _call(self.eager, args, mode)
        out, grads = _call(self._compiled, args, mode, dynamic=True)
        pairs = [("output", out, eager_out)]
        pairs += [
            ("gradient", ours, theirs) for ours, theirs in zip(grads, eager_grads, strict=True)
        ]
        for what, ours, theirs in pairs:
            if not isinstance(ours, torch.Tensor) or ours.shape != theirs.shape:
                shape = tuple(ours.shape) if isinstance(ours, torch.Tensor) else type(ours)
                raise WarmupMismatch(
                    f"compiled {what} has shape {shape}, eager {tuple(theirs.shape)} "
                    f"({_mode_name(mode)}, {rows} rows)"
                )
            ours, theirs = ours.detach().double(), theirs.detach().double()
            if what == "gradient":  # as a whole: see GRAD_RTOL
                gap = float((ours - theirs).nan_to_num().norm())
                size = max(float(theirs.nan_to_num().norm()), 1e-30)
                if gap > GRAD_RTOL * size or ours.isnan().ne(theirs.isnan()).any():
                    raise WarmupMismatch(
                        f"the compiled gradient differs from eager's by {gap / size:.3g} of "
                        f"its norm at warm-up (tolerance {GRAD_RTOL:g}; {rows} rows)"
                    )
                continue
            scale = max(1.0, float(theirs.abs().nan_to_num().max())) if theirs.numel() else 1.0
            if not torch.allclose(ours, theirs, rtol=RTOL, atol=ATOL * scale, equal_nan=True):
                gap = float((ours - theirs).abs().nan_to_num(nan=math.inf).max())
                raise WarmupMismatch(
                    f"the compiled output differs from eager's by {gap:.3g} at warm-up "
                    f"(tolerance {RTOL:g} relative + {ATOL * scale:.3g}; {_mode_name(mode)}, "
                    f"{rows} rows)"
                )

    def _time(self, args: list[torch.Tensor], mode: str) -> float:
        """Eager time over compiled time: the median of interleaved pairs."""
        ratios: list[float] = []
        spent = [0.0, 0.0]
        while len(ratios) < 3 or (min(spent) < TIMING_S and len(ratios) < 15):
            times = []
            for side, fn in enumerate((self.eager, self._run)):
                _sync(self.device)
                started = time.perf_counter()
                _call(fn, args, mode)
                _sync(self.device)
                times.append(time.perf_counter() - started)
                spent[side] += times[-1]
            ratios.append(times[0] / max(times[1], 1e-9))
        return statistics.median(ratios)

    # Serving --------------------------------------------------------------------------

    def forward(self, *args: Any) -> Any:
        if self._use_compiled(args):
            self.calls["compiled"] += 1
            return self._run(*(arg.contiguous() for arg in args))
        self.calls["eager"] += 1
        return self.eager(*args)

    def _use_compiled(self, args: Sequence[Any]) -> bool:
        if not args or not all(isinstance(arg, torch.Tensor) and arg.dim() for arg in args):
            return False
        rows = args[0].shape[0]
        if rows < MIN_ROWS:
            return False
        if torch.is_grad_enabled():
            mode = "grad"
        elif torch.is_inference_mode_enabled():
            mode = "inference"
        else:
            return False  # no_grad outside inference mode: not warmed
        grad = mode == "grad"
        key = tuple((tuple(arg.shape[1:]), arg.dtype, grad and arg.requires_grad) for arg in args)
        routes = self.routes.get((mode, key))
        if routes is None:
            return False
        where = math.log2(rows)
        return min(routes, key=lambda route: abs(route[0] - where))[2]

    # Reporting ------------------------------------------------------------------------

    @property
    def compiled_anywhere(self) -> bool:
        return any(route[2] for routes in self.routes.values() for route in routes)

    @property
    def compiled_everywhere(self) -> bool:
        return all(route[2] for routes in self.routes.values() for route in routes)

    def summary(self) -> str:
        """e.g. "inference: 16 rows eager x0.91, 256 rows x1.52; gradients: ..."."""
        parts = []
        for (mode, _), routes in self.routes.items():
            sizes = []
            for log_rows, speedup, used in routes:
                figure = "" if speedup is None else f" x{speedup:.2f}"
                sizes.append(f"{round(2**log_rows)} rows{'' if used else ' eager'}{figure}")
            parts.append(f"{_mode_name(mode)}: {', '.join(sizes)}")
        return "; ".join(parts)


def _mode_name(mode: str) -> str:
    return "gradients" if mode == "grad" else "inference"


def _example(
    inputs: Sequence[tuple[tuple[int, ...], str]], rows: int, device: torch.device
) -> list[torch.Tensor]:
    generator = torch.Generator(device="cpu").manual_seed(rows)
    draws = {"normal": torch.randn, "uniform": torch.rand}
    return [draws[how]((rows, *shape), generator=generator).to(device) for shape, how in inputs]


def _call(
    fn: Callable[..., Any], args: list[torch.Tensor], mode: str, dynamic: bool = False
) -> tuple[Any, list[torch.Tensor]]:
    """fn(*args) as the kernels call it: (output, gradients of output.sum() with respect to
    the inputs, in mode "grad"). `dynamic` marks the row dimension of every input dynamic."""
    if mode == "inference":
        with torch.inference_mode():
            inputs = [arg.clone() for arg in args]
            if dynamic:
                for arg in inputs:
                    torch._dynamo.mark_dynamic(arg, 0)
            return fn(*inputs), []
    with torch.inference_mode(False), torch.enable_grad():
        inputs = [arg.detach().clone().requires_grad_(True) for arg in args]
        if dynamic:
            for arg in inputs:
                torch._dynamo.mark_dynamic(arg, 0)
        out = fn(*inputs)
        grads = torch.autograd.grad(out.float().sum(), inputs, allow_unused=True)
    grads = [torch.zeros_like(a) if g is None else g for a, g in zip(inputs, grads, strict=True)]
    return out.detach(), grads


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
