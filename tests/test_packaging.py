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
