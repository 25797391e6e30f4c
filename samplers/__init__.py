"""Batched MCMC kernels over tensors: imh, drs, markov, pcn, mala, isir, ex2mcmc.

Each module exports `State`, its `init` functions, `build(...) -> Kernel` and its
`METHOD` spec (options, needs, start); rows are independent chains. `samplers.methods`
holds the table of methods, `samplers.diagnostics` split R-hat, ESS and a bounded trace
recorder. No HTTP, no Redis here.
"""

from samplers import diagnostics, drs, ex2mcmc, imh, isir, mala, markov, pcn, proposals
from samplers._core import Info, Kernel, Noise, concat, make_generator, put, split, take
from samplers.chain import Result, run_final, run_stream
from samplers.methods import METHODS, TABLE

__all__ = [
    "METHODS",
    "TABLE",
    "Info",
    "Kernel",
    "Noise",
    "Result",
    "concat",
    "diagnostics",
    "drs",
    "ex2mcmc",
    "imh",
    "isir",
    "make_generator",
    "mala",
    "markov",
    "pcn",
    "proposals",
    "put",
    "run_final",
    "run_stream",
    "split",
    "take",
]
