"""How much the Triton autotuners time.

``FUSED_ATTN_TRITON_AUTOTUNE``: "1" (default) times every configuration the prune keeps for a new
key and uses the fastest; "0" takes the first one kept without timing anything. The second is for
correctness runs on a GPU (``benchmarks/gpu_check.sh``'s test steps), where hundreds of distinct
small problems would otherwise each compile and time a dozen configurations; benchmarks keep the
default.
"""
from __future__ import annotations

import os


def autotune_enabled() -> bool:
    value = os.environ.get("FUSED_ATTN_TRITON_AUTOTUNE", "1").strip().lower()
    if value in ("", "1", "true", "on"):
        return True
    if value in ("0", "false", "off"):
        return False
    raise ValueError(f"FUSED_ATTN_TRITON_AUTOTUNE must be 1 or 0; got {os.environ['FUSED_ATTN_TRITON_AUTOTUNE']!r}")


def pick(configs: list) -> list:
    """The configurations to time: all of them, or the first alone when autotuning is off."""
    return configs if autotune_enabled() else configs[:1]


#: Options every launch (and the AOT compiles) pass: FMA contraction of ``a * b + c`` on, as Triton
#: 3.6 defaults to and as the kernels were verified with. Triton 3.9 warns when it is left
#: unset, and 3.10 turns it off by default; pinning it keeps the numerics the same across
#: versions. (The interpreter ignores it.)
LAUNCH_OPTIONS = {"enable_fp_fusion": True}
