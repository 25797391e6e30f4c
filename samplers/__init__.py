"""Batched MCMC kernels over tensors: imh, drs, markov, pcn, mala.

Each module exports `State`, its `init` functions and `build(...) -> Kernel`; rows are
independent chains. No HTTP, no Redis here.
"""

from samplers import drs, imh, mala, markov, pcn, proposals
from samplers._core import Info, Kernel, Noise, concat, make_generator, split, take
from samplers.chain import Result, run_final, run_stream

METHODS = ("none", "imh", "drs", "markov", "pcn", "mala")

__all__ = [
    "METHODS",
    "Info",
    "Kernel",
    "Noise",
    "Result",
    "concat",
    "drs",
    "imh",
    "make_generator",
    "mala",
    "markov",
    "pcn",
    "proposals",
    "run_final",
    "run_stream",
    "split",
    "take",
]
