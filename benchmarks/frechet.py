"""Frechet distance at 2048 dimensions: eigenvalue form vs scipy.linalg.sqrtm.

Covariances are np.cov of 10k x 2048 Gaussian features with decaying column scales
(an Inception-like spectrum); both methods see the same float64 statistics in the same
run. Reports the median time of several repetitions, the relative difference of each
FID from the sqrtm reference (pytorch-fid's calculate_frechet_distance), and the speed
ratio; writes the "frechet" section of docs/BENCHMARKS.md.

Run (about 2-3 minutes on 2 cores):
    .venv/bin/python -m benchmarks.frechet
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import scipy.linalg
import torch
from threadpoolctl import threadpool_limits

from benchmarks.report import machine, markdown_table, write_section
from evaluation.frechet import (
    CovarianceFactor,
    FrechetReference,
    frechet_distance,
    trace_sqrt_product,
)

COMMAND = ".venv/bin/python -m benchmarks.frechet"


def sqrtm_frechet(mu1, sigma1, mu2, sigma2) -> float:
    """pytorch-fid's formula: float64 scipy sqrtm of the non-symmetric product."""
    product_root = scipy.linalg.sqrtm(sigma1 @ sigma2)
    difference = mu1 - mu2
    trace = np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(product_root).real
    return float(difference @ difference + trace)


def eigh_factor_frechet(mu1, sigma1, mu2, sigma2) -> float:
    """The eigenvalue form with the eigh factor (the path singular covariances take)."""
    eigenvalues, eigenvectors = np.linalg.eigh(sigma1)
    factor = CovarianceFactor(eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None)), False)
    difference = mu1 - mu2
    trace = np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(factor, sigma2)
    return float(difference @ difference + trace)


def torch_frechet(mu1, sigma1, mu2, sigma2) -> float:
    """The same eigenvalue form with torch.linalg in float64 (the backend not chosen)."""
    s1, s2 = torch.from_numpy(sigma1), torch.from_numpy(sigma2)
    eigenvalues, eigenvectors = torch.linalg.eigh(s1)
    factor = eigenvectors * eigenvalues.clamp(min=0).sqrt()
    inner = factor.T @ s2 @ factor
    cross = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp(min=0).sqrt().sum()
    difference = torch.from_numpy(mu1 - mu2)
    return float(difference @ difference + s1.trace() + s2.trace() - 2 * cross)


def gaussian_stats(
    rng: np.random.Generator, samples: int, dims: int, shift: float
) -> tuple[np.ndarray, np.ndarray]:
    scales = (1.0 + np.arange(dims)) ** -0.5 * rng.uniform(0.5, 1.5, dims)
    features = rng.standard_normal((samples, dims)) * scales + shift * rng.standard_normal(dims)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def timed(function: Callable[[], float], repeats: int) -> tuple[float, float, float]:
    """(value, median wall seconds, median CPU seconds of this process) over `repeats`.

    With one BLAS thread the CPU time is the work itself, unaffected by other jobs
    taking turns on the shared cores; the wall time is what a caller waits.
    """
    walls, cpus, value = [], [], 0.0
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        value = function()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return value, statistics.median(walls), statistics.median(cpus)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, default=2048)
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--sqrtm-repeats", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, default=1, help="BLAS and torch threads for every method"
    )
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    # On 2 cores shared with other jobs, OpenBLAS with 2 threads ran 6-20x slower than
    # with 1 (its threads spin waiting for each other), so all methods get the same count.
    torch.set_num_threads(args.threads)
    with threadpool_limits(args.threads):
        run(args)


def run(args: argparse.Namespace) -> None:

    rng = np.random.default_rng(0)
    mu1, sigma1 = gaussian_stats(rng, args.samples, args.dims, shift=0.0)
    mu2, sigma2 = gaussian_stats(rng, args.samples, args.dims, shift=0.05)
    reference = FrechetReference(mu1, sigma1)
    few, many = args.sqrtm_repeats, args.repeats
    candidates = [  # (name, FID function of (mu1, sigma1, mu2, sigma2), repetitions)
        ("scipy.linalg.sqrtm (pytorch-fid)", sqrtm_frechet, few),
        ("frechet_distance (Cholesky factor)", frechet_distance, many),
        ("eigenvalue form, eigh factor (singular path)", eigh_factor_frechet, few),
        ("FrechetReference.distance (factor cached)", lambda *s: reference.distance(*s[2:]), many),
        ("eigenvalue form in torch.linalg float64", torch_frechet, few),
    ]

    results = []
    for name, function, repeats in candidates:
        value, wall, cpu = timed(lambda f=function: f(mu1, sigma1, mu2, sigma2), repeats)
        results.append((name, value, wall, cpu, repeats))
        print(f"{name}: FID {value:.10g}, median {wall:.3f} s wall, {cpu:.3f} s CPU", flush=True)

    _, sqrtm_value, sqrtm_wall, sqrtm_cpu, _ = results[0]
    rows = [
        [
            name,
            f"{value:.10g}",
            f"{abs(value - sqrtm_value) / abs(sqrtm_value):.1e}",
            f"{wall:.2f}",
            f"{cpu:.2f}",
            f"{sqrtm_wall / wall:.1f}x",
            f"{sqrtm_cpu / cpu:.1f}x",
            repeats,
        ]
        for name, value, wall, cpu, repeats in results
    ]
    header = ["method", "FID", "relative difference to sqrtm", "median wall s"]
    header += ["median CPU s", "speed-up (wall)", "speed-up (CPU)", "runs"]
    table = markdown_table(header, rows)
    markdown = f"""## Frechet distance at {args.dims} dimensions

Command: `{COMMAND}` (machine: {machine()}; {args.threads} BLAS thread(s); the
machine is shared with other jobs, so times are medians, every ratio comes from the
same run, and the CPU-time columns show the work without the waiting).
Statistics: float64 mean and np.cov of {args.samples} x {args.dims} Gaussian features with
decaying column scales, two distributions; every method gets the same arrays.

{table}

The eigenvalue form sums the square roots of the eigenvalues of A^T S2 A with
A A^T = S1 (evaluation/frechet.py): with the Cholesky factor L when S1 is positive
definite (L^T S2 L by LAPACK sygst), with the eigh factor otherwise (two matrix
products). numpy/scipy LAPACK is the backend; the torch.linalg row is the eigh-factor
algorithm in torch, kept to show why it was not chosen. FrechetReference keeps the
reference's factor, which is what a running FID against fixed reference statistics
pays per update. Wall times depend on what else the 2 cores run: across repeated runs
while other jobs were busy, the speed-ups moved by about 20% either way; the CPU
columns move less.
"""
    print(markdown)
    if not args.no_write:
        print("wrote", write_section("BENCHMARKS.md", "frechet", markdown))


if __name__ == "__main__":
    main()
