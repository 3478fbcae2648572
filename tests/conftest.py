"""Test configuration shared by every test file.

Without a GPU, the Triton kernels run under the interpreter, which must be switched on before
any module defining kernels is imported: this file sets TRITON_INTERPRET=1 first thing. The
ahead-of-time compilation checks need it off and therefore run in subprocesses
(see tests/aot.py).
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def device():
    return "cuda" if HAS_CUDA else "cpu"
