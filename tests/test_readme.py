"""The README's quick start runs as written (on this machine's default device: the CPU here)."""
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_runs():
    text = README.read_text()
    assert "## Quick start" in text
    block = text.split("## Quick start", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    assert "F.attention(" in block and "F.attention_varlen(" in block and "F.feed_forward(" in block
    namespace = {}
    exec(compile(block, str(README) + " (quick start)", "exec"), namespace)
    assert namespace["out"].shape == (2, 8, 1024, 64)
    assert namespace["q"].grad is not None  # out.sum().backward() ran
    assert namespace["with_sinks"].shape == namespace["out"].shape and namespace["lse"].requires_grad
