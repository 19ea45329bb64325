"""Shared test setup.

On a machine without CUDA, Triton kernels run through the interpreter
(TRITON_INTERPRET=1 must be set before triton decorates any kernel, so it is
set here, before test modules import fastcount.kernels).
"""
import os
from pathlib import Path

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# after TRITON_INTERPRET is decided: importing fastcount may import triton
from fastcount.testing import randomize_bn  # noqa: F401  (re-exported for tests)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DATASETS = SHARED / "datasets"
SLIDES = SHARED / "fixtures" / "slides"

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu  # `-m gpu` selects these; without CUDA they report a skip


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped with a reason elsewhere)")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)




def rel_err(a, b):
    """max |a - b| / max |b|, in float64."""
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.fixture
def shared_dir():
    if not SHARED.is_dir():
        pytest.fail(f"../shared not found at {SHARED}: tests need the project's shared data")
    return SHARED


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: the CI machine's 2 cores are shared, and tiny-model
    tests lose more to thread spin-waits than they gain from a second core."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_model():
    """A width-0.0625 CountCeption with random BN statistics, in eval mode (reader and format tests)."""
    from fastcount import CountCeption

    torch.manual_seed(0)
    return randomize_bn(CountCeption(width=0.0625), seed=0).eval()


def whole_count(model, img):
    """Whole-image count of an HxWx3 array and the scale of its terms (for a relative tolerance)."""
    from fastcount import redundant_count

    with torch.inference_mode():
        cm = model(torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float())  # a writable copy
    return float(redundant_count(cm).sum()), float(cm.double().abs().sum()) / model.geometry.redundancy
