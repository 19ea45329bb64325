"""count_slide on CUDA: pinned host buffers, a copy stream, batched tiles (skipped without a GPU)."""
import numpy as np
import pytest
import torch

from conftest import gpu, randomize_bn
from fastcount import CountCeption, count_slide, redundant_count


@gpu
@pytest.mark.parametrize("batch_size", [1, 4])
def test_cuda_tiled_equals_whole(batch_size):
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    model = randomize_bn(CountCeption(width=0.25), seed=0).eval().cuda()
    img = np.random.default_rng(0).integers(0, 256, (300, 411, 3), dtype=np.uint8)
    with torch.inference_mode():
        cm = model(torch.from_numpy(img).cuda().permute(2, 0, 1)[None].float())
    ref = float(redundant_count(cm).sum())
    scale = float(cm.double().abs().sum()) / 1024
    res = count_slide(img, model, tile=96, batch_size=batch_size, device="cuda", backend="eager", mask=None,
                      progress=False, pin_memory=True)
    assert res.stats["device"].startswith("cuda")
    assert abs(res.total - ref) <= 1e-5 * scale
