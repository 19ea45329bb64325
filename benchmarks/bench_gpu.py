"""pytest-benchmark: end-to-end Count-ception inference on a CUDA GPU.

    pytest benchmarks/bench_gpu.py --benchmark-json=bench_gpu.json
    FASTCOUNT_BENCH_SIZE=512 FASTCOUNT_BENCH_BATCHES=1,8 pytest benchmarks/bench_gpu.py

Contenders (same session, same inputs; grouped per batch size): eager fp32,
eager channels_last + bf16 autocast, torch.compile(mode="max-autotune") with
channels_last + bf16 autocast, fastcount triton fp32 and bf16. Each result's
``extra_info`` carries megapixels/s (input pixels) and TFLOP/s. Full-size
model, random weights, 1024x1024 tiles by default. Skipped without CUDA.
"""
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine); see benchmarks/gpu_report.py --dry-run"
)

SIZE = int(os.environ.get("FASTCOUNT_BENCH_SIZE", "1024"))
BATCHES = [int(b) for b in os.environ.get("FASTCOUNT_BENCH_BATCHES", "1,4,16").split(",")]
VARIANTS = ["eager fp32", "eager channels_last bf16", "torch.compile max-autotune bf16", "triton fp32", "triton bf16"]


@pytest.fixture(scope="module")
def setup():
    from gpu_report import layer_macs, make_variants, randomize_bn

    from fastcount import CountCeption

    torch.manual_seed(0)
    device = torch.device("cuda")
    model = randomize_bn(CountCeption()).eval().to(device)
    variants, _ = make_variants(model, device)
    macs = sum(m for _, m in layer_macs(model, SIZE, SIZE))
    return {name: fn for name, fn, _ in variants}, macs


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_end_to_end(benchmark, setup, variant, batch):
    fns, macs = setup
    fn = fns[variant]
    x = torch.rand(batch, 3, SIZE, SIZE, device="cuda") * 255
    fn(x)  # autotune / compile outside the clock
    torch.cuda.synchronize()

    def run():
        fn(x)
        torch.cuda.synchronize()

    benchmark.group = f"{SIZE}x{SIZE} batch {batch}"
    benchmark.pedantic(run, rounds=10, warmup_rounds=2, iterations=1)
    sec = benchmark.stats.stats.median
    benchmark.extra_info.update(
        variant=variant, batch=batch, size=SIZE,
        mpix_per_s=batch * SIZE * SIZE / sec / 1e6, tflops=2.0 * macs * batch / sec / 1e12,
    )
