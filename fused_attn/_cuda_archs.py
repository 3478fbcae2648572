"""The GPU architectures fused_attn._C's CUDA kernels are compiled for, in one place.

setup.py builds exactly these (it reads this file with runpy, without importing fused_attn),
the cuda backend declines a device none of them can run (a launch there fails with
cudaErrorNoKernelImageForDevice), and tests/test_cuda_compile.py compiles every one. Plain
Python with no imports, so that setup.py can read it before anything is built.

Compute capabilities are written major * 10 + minor (80 = sm_80).
"""

#: machine code (SASS). A cubin for sm_XY runs on sm_XZ with Z >= Y (same major): sm_80's serves
#: sm_86/sm_89 too. sm_75 is not here: attention.cu's bfloat16 wmma tiles need sm_80 (nvcc stops
#: on them for sm_75), and CUDA 13 targets nothing older than sm_75.
SASS = (80, 90)
#: PTX, which the driver JIT-compiles (once, on first use; it keeps a cache) for any newer GPU:
#: sm_100 (B200), sm_120 (RTX 50xx), ... have no machine code here but run this.
PTX = (90,)


def nvcc_gencode_flags() -> list[str]:
    """The -gencode flags for nvcc: machine code for each of SASS, PTX for each of PTX."""
    return ([f"-gencode=arch=compute_{a},code=sm_{a}" for a in SASS] +
            [f"-gencode=arch=compute_{a},code=compute_{a}" for a in PTX])


def can_run(major: int, minor: int) -> bool:
    """Whether a device of compute capability major.minor can run kernels built for SASS / PTX."""
    return (any(a // 10 == major and a % 10 <= minor for a in SASS)
            or any(a <= major * 10 + minor for a in PTX))


def describe() -> str:
    """What the build holds, for messages: 'sm_80, sm_90 machine code and compute_90 PTX'."""
    return (", ".join(f"sm_{a}" for a in SASS) + " machine code and " +
            ", ".join(f"compute_{a}" for a in PTX) + " PTX")
