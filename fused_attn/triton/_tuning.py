"""How much the Triton autotuners time.

``FUSED_ATTN_TRITON_AUTOTUNE``: on (the default; 1/true/yes/on) times every configuration the prune
keeps for a new key and uses the fastest; off (0/false/no/off) takes the first one kept without
timing anything. The second is for correctness runs on a GPU (``benchmarks/gpu_check.sh``'s test
steps), where hundreds of distinct small problems would otherwise each compile and time a dozen
configurations; benchmarks keep the default.
"""
from __future__ import annotations

from .._extension import _env_flag


def autotune_enabled() -> bool:
    # read with the extension switches' parser, so it takes the same words (1/true/yes/on,
    # 0/false/no/off) and refuses the rest with the same message; unset or empty is on
    return _env_flag("FUSED_ATTN_TRITON_AUTOTUNE", default=True)


def pick(configs: list) -> list:
    """The configurations to time: all of them, or the first alone when autotuning is off."""
    return configs if autotune_enabled() else configs[:1]


#: Options every launch (and the AOT compiles) pass: FMA contraction of ``a * b + c`` on, as Triton
#: 3.6 defaults to and as the kernels were verified with. Triton 3.9 warns when it is left
#: unset, and 3.10 turns it off by default; pinning it keeps the numerics the same across
#: versions. (The interpreter ignores it.)
LAUNCH_OPTIONS = {"enable_fp_fusion": True}
