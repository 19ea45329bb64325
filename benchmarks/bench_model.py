"""Reference model costs: eager forward and one training step, full width.

    python -m pytest benchmarks/bench_model.py --benchmark-only
"""
import pytest
import torch

import fastcount

SIDE = 256


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return fastcount.CountCeption()


def test_forward_256(benchmark, model):
    model.eval()
    x = torch.rand(1, 3, SIDE, SIDE) * 255

    def run():
        with torch.inference_mode():
            return model(x)

    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    s = benchmark.stats.stats.median
    benchmark.extra_info.update(mpx_per_s=SIDE * SIDE / s / 1e6, seconds=s, threads=torch.get_num_threads())


@pytest.mark.parametrize("batch,crop", [(1, 256), (4, 128)])
def test_train_step(benchmark, model, batch, crop):
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.rand(batch, 3, crop, crop) * 255
    dots = (torch.rand(batch, crop, crop) < 0.003).to(torch.int64)
    t = fastcount.make_targets(dots).unsqueeze(1)

    def step():
        loss = torch.nn.functional.l1_loss(model(x), t)
        opt.zero_grad()
        loss.backward()
        opt.step()

    benchmark.pedantic(step, rounds=3, warmup_rounds=1)
    s = benchmark.stats.stats.median
    benchmark.extra_info.update(seconds_per_step=s, seconds_per_image=s / batch,
                                mpx_per_s=batch * crop * crop / s / 1e6)
