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
    import torch  # the merged halves are the attention over all the keys, as the comment says

    F, q, k, v = namespace["F"], namespace["q"], namespace["k"], namespace["v"]
    torch.testing.assert_close(namespace["whole"], F.attention(q, k, v), rtol=1e-4, atol=1e-5)


def _blocks_after(heading: str) -> list:
    section = README.read_text().split(heading, 1)[1].split("\n## ", 1)[0]
    return [part.split("```", 1)[0] for part in section.split("```python")[1:]]


def test_module_and_swap_examples_run():
    """The Modules section's first two examples run as written (their inputs defined in them)."""
    blocks = _blocks_after("## Modules and swapping into existing models")
    namespace = {}
    exec(compile(blocks[0], str(README) + " (modules)", "exec"), namespace)
    assert namespace["out"].shape == (40, 512)
    exec(compile(blocks[1], str(README) + " (swap)", "exec"), namespace)
    assert str(namespace["report"]).startswith("fused_attn.swap_modules: 5 replaced, 0 left")


def test_flash_attn_example_runs():
    """The FlashAttention example of the Modules section runs as written and undoes its patch."""
    import sys

    blocks = [b for b in _blocks_after("## Modules and swapping into existing models") if "patch_flash_attn" in b]
    assert len(blocks) == 1
    namespace = {}
    exec(compile(blocks[0], str(README) + " (flash_attn)", "exec"), namespace)
    assert namespace["out"].shape == (2, 128, 8, 64)
    assert "flash_attn" not in sys.modules


def test_xformers_example_runs():
    import sys

    blocks = [b for b in _blocks_after("## Modules and swapping into existing models") if "patch_xformers" in b]
    assert len(blocks) == 1
    namespace = {}
    exec(compile(blocks[0], str(README) + " (xformers)", "exec"), namespace)
    assert namespace["first"].shape == (1, 5, 4, 32) and namespace["second"].shape == (1, 9, 4, 32)
    assert "xformers" not in sys.modules


def test_bert_example_matches_the_original():
    """The BERT worked example's snippet gives the original model's logits, as its comment says
    (with BERT's default dropout it did not: the model is in train mode)."""
    import copy

    import pytest
    import torch

    import fused_attn
    transformers = pytest.importorskip("transformers")
    blocks = _blocks_after("### Worked example: a text classifier from a BERT config")
    assert len(blocks) == 1 and "== original(...)" in blocks[0]
    torch.manual_seed(0)
    input_ids = torch.randint(0, 30522, (2, 16))
    attention_mask = torch.ones(2, 16, dtype=torch.long)
    attention_mask[1, 10:] = 0
    namespace = {"copy": copy, "torch": torch, "fused_attn": fused_attn, "BertConfig": transformers.BertConfig,
                 "BertForSequenceClassification": transformers.BertForSequenceClassification,
                 "input_ids": input_ids, "attention_mask": attention_mask}
    exec(compile(blocks[0], str(README) + " (BERT)", "exec"), namespace)
    assert namespace["model"].training
    expected = namespace["original"](input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(namespace["logits"], expected, rtol=1e-4, atol=1e-5)


def _github_slugs(path: Path) -> set:
    """The anchors GitHub gives the headings of a Markdown file (code blocks skipped)."""
    import re

    seen, slugs, code = {}, set(), False
    for line in path.read_text().split("\n"):
        if line.startswith("```"):
            code = not code
        m = None if code else re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", m.group(1)).replace("`", "")
            slug = re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            slugs.add(slug if n == 0 else f"{slug}-{n}")
    return slugs


def test_doc_links_resolve():
    """Every relative link of README.md and docs/*.md names a file that exists and, with an
    anchor, a heading of that file: the README's details live in docs/, and a section moved or
    renamed must not leave a dead link. (The measured data under docs/results/ is not in the
    sdist, which carries the Markdown files only: links into it are checked where it exists.)"""
    import re

    root = README.parent
    files = [README] + sorted((root / "docs").glob("*.md"))
    assert len(files) > 1
    broken, checked = [], 0
    for f in files:
        code = False
        for i, line in enumerate(f.read_text().split("\n"), 1):
            if line.startswith("```"):
                code = not code
            if code:
                continue
            line = re.sub(r"`[^`]*`(?!\])", lambda m: "x" * len(m.group(0)), line)  # code spans, but link text
            for target in re.findall(r"\]\(([^)\s]+)\)", line):
                if re.match(r"[a-z]+:", target):
                    continue
                path, _, anchor = target.partition("#")
                full = (f.parent / path).resolve() if path else f
                if not full.exists():
                    if (root / "docs" / "results") in full.parents and not (root / "docs" / "results").exists():
                        continue
                    broken.append(f"{f.name}:{i}: {target} (no such file)")
                elif anchor and (full.suffix != ".md" or anchor not in _github_slugs(full)):
                    broken.append(f"{f.name}:{i}: {target} (no such heading)")
                checked += 1
    assert checked > 50 and not broken, broken
