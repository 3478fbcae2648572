"""Packaging: the build script's switches, the failure path of the extension build, the sdist's
contents and the wheel's tags, checked without compiling anything."""
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SETUP_PY = ROOT / "setup.py"


def run_setup_py(monkeypatch, env=None, cwd=ROOT):
    """Runs setup.py in this process with setuptools.setup() replaced, returning its keyword
    arguments (ext_modules, cmdclass): what a build would be given, with nothing built."""
    import setuptools

    pytest.importorskip("torch.utils.cpp_extension")
    if not SETUP_PY.is_file():
        pytest.skip("no setup.py beside the tests (installed tests)")
    for name in ("FUSED_ATTN_NO_EXTENSION", "FUSED_ATTN_FORCE_CUDA", "FUSED_ATTN_REQUIRE_EXTENSION",
                 "FUSED_ATTN_DEBUG"):
        monkeypatch.delenv(name, raising=False)
    for name, value in (env or {}).items():
        monkeypatch.setenv(name, value)
    captured = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: captured.update(kw))
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["setup.py", "--version"])
    runpy.run_path(str(cwd / "setup.py"), run_name="__main__")
    return captured


# ---------------------------------------------------------------------------------------------
# yes/no environment variables
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["0", "false", "FALSE", "no", "Off", ""])
def test_no_extension_off_values_keep_the_extension(monkeypatch, value):
    kw = run_setup_py(monkeypatch, {"FUSED_ATTN_NO_EXTENSION": value})
    assert [e.name for e in kw["ext_modules"]] == ["fused_attn._C"], value


@pytest.mark.parametrize("value", ["1", "true", "True", "yes", "ON"])
def test_no_extension_on_values_skip_the_extension(monkeypatch, value):
    kw = run_setup_py(monkeypatch, {"FUSED_ATTN_NO_EXTENSION": value})
    assert kw["ext_modules"] == [] and kw["cmdclass"] == {}, value


@pytest.mark.parametrize("name", ["FUSED_ATTN_NO_EXTENSION", "FUSED_ATTN_REQUIRE_EXTENSION", "FUSED_ATTN_FORCE_CUDA"])
def test_setup_py_refuses_a_flag_that_is_not_yes_or_no(monkeypatch, name):
    with pytest.raises(SystemExit, match=f"{name}='maybe' is not a yes/no value"):
        run_setup_py(monkeypatch, {name: "maybe"})


@pytest.mark.parametrize("value, expected", [("1", True), ("true", True), ("YES", True), ("On", True),
                                             ("", False), ("0", False), ("False", False), ("no", False), ("OFF", False)])
def test_extension_env_flag_reads_yes_and_no_words(monkeypatch, value, expected):
    from fused_attn._extension import _env_flag

    monkeypatch.setenv("FUSED_ATTN_DISABLE_EXTENSION", value)
    assert _env_flag("FUSED_ATTN_DISABLE_EXTENSION") is expected


def test_extension_env_flag_refuses_other_values(monkeypatch):
    from fused_attn._extension import _env_flag

    monkeypatch.setenv("FUSED_ATTN_DISABLE_EXTENSION", "maybe")
    with pytest.raises(ValueError, match="FUSED_ATTN_DISABLE_EXTENSION='maybe' is not a yes/no value"):
        _env_flag("FUSED_ATTN_DISABLE_EXTENSION")


def test_disable_extension_false_keeps_the_extension():
    """End to end: FUSED_ATTN_DISABLE_EXTENSION=false at import does not disable fused_attn._C."""
    code = "import fused_attn._extension as e; print('ERROR:', e.ERROR)"
    env = dict(os.environ, FUSED_ATTN_DISABLE_EXTENSION="false")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                          cwd=str(ROOT))
    assert proc.returncode == 0, proc.stderr
    assert "disabled by FUSED_ATTN_DISABLE_EXTENSION" not in proc.stdout, proc.stdout


# ---------------------------------------------------------------------------------------------
# the sdist
# ---------------------------------------------------------------------------------------------

def _git_files():
    """The files of this checkout as git sees them (tracked, plus untracked ones not ignored), or a
    skip where there is no git or no repository (tests run from an unpacked sdist)."""
    import shutil

    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    top = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--show-toplevel"], capture_output=True, text=True)
    if top.returncode != 0 or Path(top.stdout.strip()).resolve() != ROOT:
        pytest.skip("the tests are not in a git checkout of fused_attn (an unpacked sdist?)")
    out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         capture_output=True, text=True, check=True).stdout
    return sorted(f for f in out.split("\0") if f and (ROOT / f).is_file())


def test_sdist_carries_every_source_header_and_test(tmp_path):
    """The sdist can build the extension and run the tests: every git file under csrc/ (headers
    and the CUDA sources included, though the sdist is made here without building anything) and
    the whole test tree are in it, with what the tests run (benchmarks/, examples/) and the build
    files. Made from a copy of the checkout's files as they are (edits not yet committed count),
    so that no build output lying in the checkout can stand in for a missing source."""
    import shutil
    import tarfile

    pytest.importorskip("setuptools")
    files = _git_files()
    src = tmp_path / "src"
    for f in files:
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, src / f)
    # FUSED_ATTN_NO_EXTENSION=1: MANIFEST.in alone must carry the sources (with the extension on,
    # setuptools adds the .cpp files it would compile, which hid the gap), and torch is not imported.
    env = dict(os.environ, FUSED_ATTN_NO_EXTENSION="1")
    proc = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")], cwd=src,
                          env=env, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 and "No module named" in proc.stderr:
        pytest.skip(f"cannot make an sdist here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (archive,) = (tmp_path / "dist").glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        in_sdist = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    wanted = [f for f in files if f.split("/", 1)[0] in ("csrc", "tests", "benchmarks", "examples", "fused_attn")]
    wanted += ["README.md", "Makefile", "pyproject.toml", "setup.py", "MANIFEST.in"]
    wanted += [f for f in files if f.startswith("docs/") and f.count("/") == 1 and f.endswith(".md")]  # the README links them
    missing = [f for f in wanted if f not in in_sdist]
    assert not missing, f"missing from the sdist: {missing}"
    assert not [f for f in in_sdist if f.endswith((".so", ".pyc"))]


# ---------------------------------------------------------------------------------------------
# a failed extension build
# ---------------------------------------------------------------------------------------------

def _failing_build_ext(monkeypatch, tmp_path, inplace, env=None):
    """setup.py's build_ext command for a copy of the project in tmp_path whose earlier build left
    fused_attn/_C*.so (in place) and build/lib.../fused_attn/_C*.so, with a compiler that fails at
    once (build_extensions raises as a failed compile does; nothing is compiled)."""
    import shutil

    from setuptools.dist import Distribution

    work = tmp_path / "src"
    (work / "fused_attn").mkdir(parents=True)
    shutil.copy2(SETUP_PY, work / "setup.py")
    shutil.copytree(ROOT / "csrc", work / "csrc")
    shutil.copy2(ROOT / "fused_attn" / "_cuda_archs.py", work / "fused_attn")  # (a CUDA build reads it)
    kw = run_setup_py(monkeypatch, env, cwd=work)
    dist = Distribution({"name": "fused_attn", "ext_modules": kw["ext_modules"], "cmdclass": kw["cmdclass"]})
    dist.script_name = "setup.py"
    cmd = kw["cmdclass"]["build_ext"](dist)
    cmd.inplace = inplace
    cmd.ensure_finalized()
    stale = []
    for where in (False, True):
        cmd.inplace = where
        path = Path(cmd.get_ext_fullpath("fused_attn._C"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"an earlier build's extension")
        stale.append(path)
    cmd.inplace = inplace

    def failing_compile(*args, **kwargs):
        raise RuntimeError("error compiling objects for extension (planted)")

    monkeypatch.setattr(cmd, "build_extensions", failing_compile)
    return cmd, stale


@pytest.mark.parametrize("inplace", [True, False])
def test_failed_build_removes_the_earlier_extension(monkeypatch, tmp_path, capsys, inplace):
    """An in-place (or editable) build that fails must not leave the previous fused_attn/_C*.so to
    load silently with stale kernels; nor may any build leave the build folder's copy for a wheel
    or an install to pick up."""
    cmd, (in_build_dir, in_place) = _failing_build_ext(monkeypatch, tmp_path, inplace)
    cmd.run()  # the failure is reported, not raised
    err = capsys.readouterr().err
    assert "building fused_attn._C failed (error compiling objects for extension (planted))" in err
    assert "The cpu/cuda backends will be unavailable." in err
    assert not in_build_dir.exists()
    assert in_place.exists() is not inplace  # an ordinary build leaves the source tree alone
    removed = [str(in_build_dir)] + ([str(in_place)] if inplace else [])
    assert f"Removed the earlier build's {', '.join(removed)}" in err
    assert cmd.inplace is inplace


def test_failed_build_raises_when_the_extension_is_required(monkeypatch, tmp_path):
    cmd, _ = _failing_build_ext(monkeypatch, tmp_path, True, {"FUSED_ATTN_REQUIRE_EXTENSION": "1"})
    with pytest.raises(RuntimeError, match="planted"):
        cmd.run()


# ---------------------------------------------------------------------------------------------
# the wheel and the compile flags
# ---------------------------------------------------------------------------------------------

def test_wheel_is_tagged_for_the_limited_api(monkeypatch):
    """fused_attn._C is built against the limited API (torch's -DPy_LIMITED_API, _C.abi3.so): the
    wheel says so (cp310-abi3), not cp311-cp311, so that one wheel serves later Pythons too."""
    from setuptools.dist import Distribution
    from torch.utils import cpp_extension

    kw = run_setup_py(monkeypatch)
    dist = Distribution({"name": "fused_attn", "version": "0", **kw})
    cmd = dist.get_command_obj("bdist_wheel")
    cmd.ensure_finalized()
    impl, abi, _plat = cmd.get_tag()
    assert abi == "abi3"
    minimum = int(cpp_extension.min_supported_cpython, 16)
    assert impl == f"cp{minimum >> 24}{(minimum >> 16) & 0xFF}" == "cp310"


def _compile_command(monkeypatch, tmp_path, env):
    """The C++ compile command a build would run (from the build.ninja torch writes), with ninja
    not run."""
    from setuptools.dist import Distribution
    from torch.utils import cpp_extension

    if not SETUP_PY.is_file():
        pytest.skip("no setup.py beside the tests (installed tests)")
    import shutil

    work = tmp_path / "src"
    (work / "fused_attn").mkdir(parents=True)
    shutil.copy2(SETUP_PY, work / "setup.py")
    shutil.copytree(ROOT / "csrc", work / "csrc")
    shutil.copy2(ROOT / "fused_attn" / "_cuda_archs.py", work / "fused_attn")  # (a CUDA build reads it)
    kw = run_setup_py(monkeypatch, {"FUSED_ATTN_REQUIRE_EXTENSION": "1", **env}, cwd=work)
    if kw["ext_modules"][0].extra_compile_args.get("nvcc"):
        pytest.skip("a CUDA build: torch checks nvcc's version before writing the ninja file")

    class NotRun(Exception):
        pass

    def no_ninja(build_directory, verbose, error_prefix):
        raise NotRun(build_directory)

    monkeypatch.setattr(cpp_extension, "_run_ninja_build", no_ninja)
    monkeypatch.setattr(cpp_extension, "verify_ninja_availability", lambda: None)
    dist = Distribution({"name": "fused_attn", "ext_modules": kw["ext_modules"], "cmdclass": kw["cmdclass"]})
    dist.script_name = "setup.py"
    cmd = kw["cmdclass"]["build_ext"](dist)
    cmd.ensure_finalized()
    with pytest.raises(NotRun) as stopped:
        cmd.run()
    ninja = (Path(stopped.value.args[0]) / "build.ninja").read_text()
    (line,) = [ln for ln in ninja.splitlines() if ln.startswith("cflags =")]
    (post,) = [ln for ln in ninja.splitlines() if ln.startswith("post_cflags =")]
    return (line.split("=", 1)[1] + " " + post.split("=", 1)[1]).split()


def test_release_build_has_no_debug_info_unless_asked(monkeypatch, tmp_path):
    """-g0 comes after Python's -g (the .so was 48 MB of mostly debug info); FUSED_ATTN_DEBUG=1
    keeps -g; nothing else about the compile changes."""
    release = _compile_command(monkeypatch, tmp_path / "release", {})
    debug = _compile_command(monkeypatch, tmp_path / "debug", {"FUSED_ATTN_DEBUG": "1"})
    debug_flags = [f for f in release if f.startswith("-g")]
    assert debug_flags[-1] == "-g0", debug_flags
    assert [f for f in debug if f.startswith("-g")][-1] != "-g0"
    assert [f for f in release if f != "-g0"] == debug


def test_build_requirements_admit_the_license_field():
    """pyproject's `license = "Apache-2.0"` (an SPDX expression, PEP 639) is read only by setuptools 77
    and newer; older ones stop with "invalid pyproject.toml config: `project.license`". Builds run
    without isolation (`--no-build-isolation`) use the installed setuptools, so the declared
    requirement has to say so (a fresh Python 3.11 venv ships setuptools 65)."""
    tomllib = pytest.importorskip("tomllib")
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert isinstance(meta["project"]["license"], str)
    (requirement,) = [r for r in meta["build-system"]["requires"] if r.startswith("setuptools")]
    minimum = requirement.split(">=")[1]
    assert int(minimum.split(".")[0]) >= 77, requirement
