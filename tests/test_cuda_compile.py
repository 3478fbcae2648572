"""The CUDA sources compile, without a GPU, for every architecture setup.py builds.

- every csrc/cuda/*.cu is compiled with nvcc (``-c``, the flags torch's CUDAExtension adds, the
  -gencode flags of fused_attn/_cuda_archs.py, which setup.py uses too: machine code for each
  of its SASS, PTX for each of its PTX; ``-Werror all-warnings`` plus host ``-Wall -Wextra``),
  and ptxas must report no register spills;
- the .cu files and launchers.h include no torch header (so this check needs no CUDA torch);
- every csrc/cuda/*_binding.cpp passes a host-compiler syntax check against torch's headers and
  the CUDA toolkit's (the CPU wheel of torch ships ATen/c10's CUDA headers).

Skipped, with the reason, where nvcc (or the headers) are absent.
"""
from __future__ import annotations

import os
import re
import runpy
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
KERNEL_SOURCES = sorted(CUDA_DIR.glob("*.cu"))
BINDING_SOURCES = sorted(CUDA_DIR.glob("*_binding.cpp"))
# read as setup.py reads it (runpy, without importing fused_attn): the architectures the build compiles
CUDA_ARCHS = runpy.run_path(str(ROOT / "fused_attn" / "_cuda_archs.py"))
# What torch.utils.cpp_extension adds to every nvcc call (COMMON_NVCC_FLAGS), written out so that this
# test does not depend on a private list; the kernels must build with the half/bfloat16 operators off.
TORCH_NVCC_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr"]


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return None


NVCC = _nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc (a CUDA toolkit) is not installed on this machine")


def test_sources_exist():
    assert KERNEL_SOURCES, "no csrc/cuda/*.cu files"
    assert BINDING_SOURCES, "no csrc/cuda/*_binding.cpp files"


@pytest.mark.parametrize("path", KERNEL_SOURCES + [CUDA_DIR / "launchers.h", *sorted(CUDA_DIR.glob("*.cuh"))],
                         ids=lambda p: p.name)
def test_kernel_sources_include_no_torch(path):
    includes = re.findall(r'^\s*#\s*include\s*[<"]([^>"]+)[>"]', path.read_text(), flags=re.M)
    torchy = [inc for inc in includes if inc.split("/")[0] in ("torch", "ATen", "c10", "caffe2", "pybind11", "Python.h")]
    assert not torchy, f"{path.name} includes torch headers {torchy}; kernels must take raw pointers only"


def _ptxas_spills(log: str) -> list[str]:
    """'kernel (sm_XX): N bytes spill stores, M bytes spill loads' for every kernel that spills."""
    spills, kernel = [], "?"
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\d+)'", line)
        if m:
            kernel = f"{m.group(1)} ({m.group(2)})"
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and (int(m.group(1)) or int(m.group(2))):
            spills.append(f"{kernel}: {line.strip()}")
    return spills


@needs_nvcc
@pytest.mark.parametrize("source", KERNEL_SOURCES, ids=lambda p: p.name)
def test_kernel_compiles_for_every_built_architecture(source, tmp_path):
    gencode = CUDA_ARCHS["nvcc_gencode_flags"]()
    cmd = [NVCC, "-c", str(source), "-o", str(tmp_path / (source.stem + ".o")), "-std=c++20", "-O3",
           *TORCH_NVCC_FLAGS, *gencode, "-Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra,-fPIC",
           "-Xptxas", "-v", "--threads", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"nvcc failed on {source.name}:\n{log[-6000:]}"
    warnings = [line for line in log.splitlines() if "warning" in line.lower()]
    assert not warnings, f"{source.name}: compiler warnings:\n" + "\n".join(warnings)
    for arch in CUDA_ARCHS["SASS"]:
        assert f"for 'sm_{arch}'" in log, f"{source.name}: no sm_{arch} code was generated"
    spills = _ptxas_spills(log)
    assert not spills, f"{source.name}: register spills:\n" + "\n".join(spills)


def test_compile_check_covers_every_architecture_setup_py_builds(monkeypatch, capsys):
    """setup.py (a CUDA build, nothing compiled) gives nvcc exactly the -gencode flags that
    test_kernel_compiles_for_every_built_architecture compiles with, PTX among them (newer GPUs
    JIT it), and no other arch flag; TORCH_CUDA_ARCH_LIST, which would disagree with the backend's
    check, is ignored, saying so."""
    import setuptools

    cpp_extension = pytest.importorskip("torch.utils.cpp_extension")
    if not (ROOT / "setup.py").is_file():
        pytest.skip("no setup.py beside the tests (installed tests)")
    for name in ("FUSED_ATTN_NO_EXTENSION", "FUSED_ATTN_REQUIRE_EXTENSION", "FUSED_ATTN_DEBUG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FUSED_ATTN_FORCE_CUDA", "1")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "7.5")
    built = {}
    # (the real CUDAExtension looks for the toolkit's libraries, which a CPU machine may lack)
    monkeypatch.setattr(cpp_extension, "CUDAExtension", lambda name, sources, **kw: built.update(kw, sources=sources))
    monkeypatch.setattr(setuptools, "setup", lambda **kw: None)
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr("sys.argv", ["setup.py", "--version"])
    runpy.run_path(str(ROOT / "setup.py"), run_name="__main__")
    nvcc = built["extra_compile_args"]["nvcc"]
    assert [flag for flag in nvcc if "arch" in flag] == CUDA_ARCHS["nvcc_gencode_flags"]()
    assert set(map(str, KERNEL_SOURCES)) <= {str(ROOT / src) for src in built["sources"]}
    ptx = CUDA_ARCHS["PTX"]
    assert ptx and f"-gencode=arch=compute_{max(ptx)},code=compute_{max(ptx)}" in nvcc
    assert "TORCH_CUDA_ARCH_LIST is ignored" in capsys.readouterr().err


def _binding_include_dirs() -> tuple[list[str], str | None]:
    """Include dirs for a host syntax check of the bindings, or a reason why it cannot run."""
    try:
        from torch.utils import cpp_extension
    except ImportError:
        return [], "torch is not importable"
    torch_dirs = cpp_extension.include_paths()
    if not any((Path(d) / "c10" / "cuda" / "CUDAGuard.h").exists() for d in torch_dirs):
        return [], "this torch install ships no c10/cuda headers"
    if NVCC is None:
        return [], "nvcc (a CUDA toolkit) is not installed on this machine"
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), cpp_extension.CUDA_HOME,
             str(Path(NVCC).resolve().parents[1]), "/usr/local/cuda"]
    candidates = [Path(h) / "include" for h in homes if h]
    found = [c for c in candidates if (c / "cuda_runtime_api.h").exists()]
    if not found:
        return [], "no cuda_runtime_api.h under " + ", ".join(map(str, candidates))
    return [*torch_dirs, str(found[0])], None


def test_bindings_pass_host_syntax_check(tmp_path):
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    include_dirs, why_not = _binding_include_dirs()
    if why_not:
        pytest.skip(why_not)
    # One translation unit including every binding parses torch's headers once (they dominate the
    # time); the bindings keep their helpers in distinct names, so they also link as one unit.
    unit = tmp_path / "all_bindings.cpp"
    unit.write_text("".join(f'#include "{p}"\n' for p in BINDING_SOURCES))
    # -isystem: warnings in torch's own headers are not ours. A CPU build of torch lacks the generated
    # c10/cuda/impl/cuda_cmake_macros.h, which C10_CUDA_NO_CMAKE_CONFIGURE_FILE lets us skip.
    cmd = [cxx, "-std=c++20", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
           *[arg for d in include_dirs for arg in ("-isystem", d)], str(unit)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"the bindings do not compile against torch's headers:\n{proc.stderr[-6000:]}"
