"""Builds fused_attn and its extension fused_attn._C.

- The C++ sources (csrc/ops.cpp, csrc/cpu/*.cpp) are always compiled.
- The CUDA sources (csrc/cuda/*.cu, csrc/cuda/*.cpp) are added when a CUDA toolkit and a CUDA
  build of torch are present, or when FUSED_ATTN_FORCE_CUDA=1, for the architectures in
  fused_attn/_cuda_archs.py (sm_80 and sm_90 machine code, compute_90 PTX for newer GPUs);
  TORCH_CUDA_ARCH_LIST is ignored.
- FUSED_ATTN_NO_EXTENSION=1 skips the extension: fused_attn then runs on its Python backends.
- A failed build of the extension does not fail the install (import fused_attn works and
  fused_attn.available_backends() says why the compiled backends are missing), unless
  FUSED_ATTN_REQUIRE_EXTENSION=1, which CI and the Makefile set so that build errors are seen.
- FUSED_ATTN_DEBUG=1 keeps the C++ debug info (-g from Python's build flags); by default the
  extension is compiled with -g0 (the same code, without 40 MB of debug info).
- These variables take 1/true/yes/on or 0/false/no/off (any case; unset or empty is off); any
  other value stops the build with a message naming the variable.

Build without isolation so the extension compiles against the torch already installed:
    pip install --no-build-isolation -e .
"""
import glob
import os
import runpy
import sys

from setuptools import setup


HERE = os.path.dirname(os.path.abspath(__file__))
_ON, _OFF = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


def env_flag(name):
    """A yes/no environment variable: 1/true/yes/on or 0/false/no/off (any case; unset or empty
    is off). Anything else stops the build, naming the variable, rather than being read as on."""
    value = os.environ.get(name, "")
    if value.strip().lower() in _ON:
        return True
    if value.strip().lower() in _OFF:
        return False
    raise SystemExit(f"fused_attn: {name}={value!r} is not a yes/no value "
                     f"(use 1, true, yes, on or 0, false, no, off)")


# read up front, so that a value that is not yes/no stops the build before anything compiles
NO_EXTENSION = env_flag("FUSED_ATTN_NO_EXTENSION")
FORCE_CUDA = env_flag("FUSED_ATTN_FORCE_CUDA")
REQUIRE_EXTENSION = env_flag("FUSED_ATTN_REQUIRE_EXTENSION")
DEBUG = env_flag("FUSED_ATTN_DEBUG")

ext_modules, cmdclass, options = [], {}, {}
if not NO_EXTENSION:
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("fused_attn: torch is not importable at build time; building without fused_attn._C "
              "(install torch first and use --no-build-isolation)", file=sys.stderr)
    else:
        sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
        cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
        with_cuda = FORCE_CUDA or (
            torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None and bool(cuda_sources))
        # -fno-trapping-math (torch itself is built with it) lets GCC turn the branch-free float
        # selects of the CPU kernels (clamps, relu, dropout keep) into vector blends; NaN
        # semantics are unchanged.
        cxx_flags = ["-O3", "-std=c++20", "-fvisibility=hidden", "-fno-trapping-math"]
        if not DEBUG:
            # Python's sysconfig CFLAGS (ahead of these on the command line) carry -g: its debug
            # info made the .so 48 MB (6 MB without). -g0 drops it and changes no code;
            # FUSED_ATTN_DEBUG=1 keeps it.
            cxx_flags.append("-g0")
        # at::parallel_for is an inline template that only runs in parallel when the including
        # file is compiled with OpenMP (ATen/ParallelOpenMP.h); without -fopenmp the CPU kernels
        # would run on one thread. Linking with -fopenmp records libgomp.so.1, which resolves to
        # the copy torch has already loaded, so there is one OpenMP runtime and one thread pool.
        link_flags = []
        if sys.platform.startswith("linux"):
            cxx_flags.append("-fopenmp")
            link_flags.append("-fopenmp")
        # No -march=native: the build must run on any x86-64. An extension gets only at::vec's
        # generic flavour (ATen's per-ISA dispatch is internal), so the CPU kernels compile their
        # hot row loops a second time for AVX2+FMA and pick that copy at run time.
        extra = {"cxx": cxx_flags}
        if with_cuda:
            # The architectures come from fused_attn/_cuda_archs.py, which the cuda backend reads too
            # (it declines the GPUs they cannot run on). Naming them here also makes torch add no
            # arch flags of its own: TORCH_CUDA_ARCH_LIST is not used (the backend could not know
            # what it built).
            archs = runpy.run_path(os.path.join(HERE, "fused_attn", "_cuda_archs.py"))
            if os.environ.get("TORCH_CUDA_ARCH_LIST"):
                print(f"fused_attn: TORCH_CUDA_ARCH_LIST is ignored; fused_attn._C's CUDA kernels are built "
                      f"with {archs['describe']()} (fused_attn/_cuda_archs.py)", file=sys.stderr)
            # --threads 2: the architectures compile in parallel (attention.cu, with its
            # register-resident kernels for five head dims, is the longest unit of the build).
            extra["nvcc"] = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo", "--threads", "2",
                             *archs["nvcc_gencode_flags"]()]
            ext = cpp_extension.CUDAExtension("fused_attn._C", sources + cuda_sources, extra_compile_args=extra,
                                              extra_link_args=link_flags, define_macros=[("FUSED_ATTN_WITH_CUDA", "1")], py_limited_api=True)
        else:
            ext = cpp_extension.CppExtension("fused_attn._C", sources, extra_compile_args=extra,
                                             extra_link_args=link_flags, py_limited_api=True)
        ext_modules = [ext]
        # torch compiles a py_limited_api extension with -DPy_LIMITED_API=<its minimum CPython> and
        # setuptools names it _C.abi3.so: tag the wheel to match (cp310-abi3, not cp311-cp311).
        min_cpython = getattr(cpp_extension, "min_supported_cpython", None)
        if min_cpython:
            options["bdist_wheel"] = {"py_limited_api": f"cp{int(min_cpython[2:4], 16)}{int(min_cpython[4:6], 16)}"}
        base = cpp_extension.BuildExtension.with_options(use_ninja=True)

        class OptionalBuildExtension(base):
            """A failed extension build warns instead of failing the install (unless required), and
            removes what an earlier build left, which would otherwise load in its place."""

            def run(self):
                # setuptools' run() clears self.inplace while it builds and does not restore it
                # when the build raises: remember it here
                inplace = self.inplace
                try:
                    super().run()
                except Exception as exc:  # noqa: BLE001 - any compiler/linker failure
                    self.inplace = inplace
                    if REQUIRE_EXTENSION:
                        raise
                    removed = self.remove_stale_outputs()
                    note = (f" Removed the earlier build's {', '.join(removed)}, which would have loaded in its place."
                            if removed else "")
                    print(f"\n*** fused_attn: building fused_attn._C failed ({exc}); installing without it. "
                          f"The cpu/cuda backends will be unavailable.{note} ***\n", file=sys.stderr)

            def remove_stale_outputs(self):
                """Deletes the extension files of an earlier build: the copy in the build folder
                (a wheel or a plain install would pick it up) and, for an in-place or editable
                build, the one beside the Python sources. Returns the paths removed."""
                inplace, removed = self.inplace, []
                try:
                    for where in ((False, True) if inplace else (False,)):
                        self.inplace = where  # get_ext_fullpath answers for the build folder or the sources
                        for ext in self.extensions:
                            path = self.get_ext_fullpath(ext.name)
                            if os.path.lexists(path):
                                os.remove(path)
                                removed.append(path)
                finally:
                    self.inplace = inplace
                return removed

        cmdclass = {"build_ext": OptionalBuildExtension}

setup(ext_modules=ext_modules, cmdclass=cmdclass, options=options)
