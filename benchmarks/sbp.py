"""Structured Bayesian Pruning on digits: the thesis' table for LeNet-5-like net and MLP.

For each network the table compares the stored original, a Sparse Variational Dropout
baseline trained here from the same original (seeded), and the stored SBP-compressed
network: held-out error, units per layer, nonzero parameters, FLOPs reduction and
measured CPU speed-up at batch 1 and batch 256 (one torch thread, models timed
alternately, median of rounds). Writes the "sbp" section of docs/RESULTS.md.

Run (about three minutes on two shared cores; needs `python -m zoo.train_sbp` first):
    .venv/bin/python -m benchmarks.sbp
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from benchmarks.report import machine, markdown_table, write_section
from classifiers import sbp, svd
from classifiers.compress import count_flops, count_params, measure_latencies, unit_counts
from zoo.data import load_digits_split
from zoo.digits_sbp import INPUT_SHAPE, STORE, load

COMMAND = ".venv/bin/python -m benchmarks.sbp"
BATCH_SIZES = (1, 256)
NETWORKS = {"LeNet-5-like": "digits-lenet5", "MLP": "digits-mlp"}
# kl_weight 0.1: with one KL term per weight (414k in LeNet) against N = 1347 examples,
# weight 1 zeroes every weight; 0.1 keeps the error within a quarter point (0.03 and
# 0.01 keep more weights for no accuracy gain)
SVD_RECIPE = {"kl_weight": 0.1, "epochs": 30, "batch_size": 32, "lr": 1e-3, "seed": 0}
THESIS_LENET5 = (
    "Thesis, LeNet-5 on MNIST (SBP): units 20-50-800-500 -> 3-18-284-283, error +0.06 "
    "points, 5.41x CPU speed-up."
)


def error_percent(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return 100 * (sbp.predict(model, x).label != y).float().mean().item()


def units(counts: list[int]) -> str:
    return "-".join(map(str, counts))


def benchmark(label: str, name: str, repeats: int, log=print) -> tuple[list[list], dict]:
    split = load_digits_split()
    x_train, y_train = torch.from_numpy(split.x_train.copy()), torch.from_numpy(split.y_train)
    x_test, y_test = torch.from_numpy(split.x_test.copy()), torch.from_numpy(split.y_test)
    original, compressed = load(name), load(name + "-sbp")
    manifest = json.loads((STORE / f"{name}-sbp" / "1" / "manifest.json").read_text())
    params, flops = count_params(original), count_flops(original)
    original_error = error_percent(original, x_test, y_test)

    start = time.perf_counter()
    noisy = svd.train_svd(original, x_train, y_train, **SVD_RECIPE)
    svd_seconds = time.perf_counter() - start
    sparse, sparsity = svd.sparsify(noisy)
    sliced = svd.slice_empty_units(sparse)
    svd_error = error_percent(sparse, x_test, y_test)
    log(f"{label}: sparse VD in {svd_seconds:.0f}s, sparsity {sparsity.sparsity:.3f}")

    sbp_error = error_percent(compressed, x_test, y_test)
    variants = {"original": original, "sbp": compressed, "svd": sparse, "svd_sliced": sliced}
    seconds = measure_latencies(variants, tuple(INPUT_SHAPE), BATCH_SIZES, repeats=repeats)
    speedup = {
        name: {b: seconds["original"][b] / seconds[name][b] for b in seconds[name]}
        for name in variants
    }

    def row(method, error, unit_list, nonzero, flops_reduction, variant):
        return [
            label,
            method,
            f"{error:.2f}",
            f"{error - original_error:+.2f}",
            units(unit_list),
            f"{nonzero:,}",
            f"{flops_reduction:.2f}x",
            *(f"{speedup[variant][str(b)]:.2f}x" for b in BATCH_SIZES),
        ]

    rows = [
        row("Original", original_error, unit_counts(original), params, 1.0, "original"),
        row(
            "SparseVD (dense kernels)",
            svd_error,
            sparsity.units_after,
            sparsity.params_after,
            sparsity.flops / sparsity.flops_nonzero,
            "svd",
        ),
        row(
            "SparseVD, empty units sliced",
            error_percent(sliced, x_test, y_test),
            unit_counts(sliced),
            sparsity.params_after,
            flops / count_flops(sliced),
            "svd_sliced",
        ),
        row(
            "StructuredBP",
            sbp_error,
            manifest["sbp"]["units_after"],
            count_params(compressed),
            flops / count_flops(compressed),
            "sbp",
        ),
    ]
    details = {
        "sparsity": sparsity.to_dict(),
        "svd_seconds": svd_seconds,
        "sbp_widths": unit_counts(compressed),
        "sbp_recipe": manifest["training"]["recipe"],
        "latency_ms": {
            name: {b: 1e3 * t for b, t in times.items()} for name, times in seconds.items()
        },
    }
    return rows, details


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=60, help="timing rounds per model")
    parser.add_argument("--no-write", action="store_true", help="print, do not write docs")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # timings on one thread: two busy shared cores are too noisy
    rows, details = [], {}
    for label, name in NETWORKS.items():
        network_rows, details[label] = benchmark(label, name, args.repeats)
        rows += network_rows
    header = [
        "Network",
        "Method",
        "Error %",
        "vs original",
        "Units per layer",
        "Nonzero params",
        "FLOPs reduction",
        "CPU speed-up, batch 1",
        "CPU speed-up, batch 256",
    ]
    markdown = render(markdown_table(header, rows), details)
    print(markdown)
    if not args.no_write:
        print("wrote", write_section("RESULTS.md", "sbp", markdown))


def render(table: str, details: dict) -> str:
    latency_lines = []
    for label, info in details.items():
        ms = info["latency_ms"]
        latency_lines.append(
            f"- {label}: original {ms['original']['1']:.3f} ms at batch 1, "
            f"{ms['original']['256']:.2f} ms at batch 256; SBP {ms['sbp']['1']:.3f} ms, "
            f"{ms['sbp']['256']:.2f} ms; SparseVD (dense kernels) "
            f"{ms['svd']['1']:.3f} ms, {ms['svd']['256']:.2f} ms. SBP widths "
            f"physically left: {units(info['sbp_widths'])}; SparseVD sparsity "
            f"{100 * info['sparsity']['sparsity']:.1f}% (trained in {info['svd_seconds']:.0f}s)."
        )
    recipe = next(iter(details.values()))["sbp_recipe"]
    recipe = (
        f"kl_weight {recipe['kl_weight']}, {recipe['sbp_epochs']} epochs at batch "
        f"{recipe['sbp_batch_size']}, lr {recipe['sbp_lr']} and {recipe['sbp_lr_factor']:g}x "
        "for mu and log sigma"
    )
    svd_recipe = (
        f"kl_weight {SVD_RECIPE['kl_weight']}, {SVD_RECIPE['epochs']} epochs at batch "
        f"{SVD_RECIPE['batch_size']}, lr {SVD_RECIPE['lr']}"
    )
    return f"""## Structured Bayesian Pruning (digits)

Command: `{COMMAND}` after `python -m zoo.train_sbp` (machine: {machine()}).
Error on the held-out split of zoo.data.load_digits_split (450 images, so one image is
0.22 points). Speed-ups: median of timing rounds in which the four variants run in a
fresh random order; two copies of one network timed this way differ by up to about 15%
on this shared machine, so figures near 1x mean no change.

{table}

Units per layer are conv1 and conv2 output channels and the inputs of each dense layer
(the thesis' convention: 20-50-800-500 for LeNet-5, 64-500-300 for the MLP). StructuredBP
rows are the stored `digits-*-sbp` models (SBP fine-tuning: {recipe}), plain networks
with the pruned units sliced out (E[theta] folded into the weights, constants of removed
channels folded into the next layer); their units are the ones whose SNR exceeded 1.
SparseVD (Molchanov et al., log alpha threshold 3; {svd_recipe}) is unstructured: its
FLOPs reduction counts only nonzero multiply-adds, which needs sparse kernels; with the
dense kernels used here its network runs at the original's speed (about 1x, as
measured). Slicing out the units SparseVD left with no weight at all is the structured
by-product the thesis reports for it.

{THESIS_LENET5}

Latencies:
{chr(10).join(latency_lines)}
"""


if __name__ == "__main__":
    main()
