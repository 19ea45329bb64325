"""The GPU report script runs end to end (``--dry-run``: tiny, CPU interpreter)."""
import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import gpu

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_report.py"


def test_gpu_report_dry_run(tmp_path):
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--precisions", "fp32,bf16", "--json", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    for title in ("### Per layer", "### End to end", "### Count difference"):
        assert title in text
    res = json.loads(out.read_text())
    assert res["dry_run"] is True
    # 6 inception + 3 conv + head, at each precision
    assert len(res["layers"]) == 2 * 10
    names = {r["layer"] for r in res["layers"]}
    assert {"inception1", "inception6", "head 1x1x3"} <= names
    variants = {r["variant"] for r in res["end_to_end"]}
    assert variants == {"eager fp32", "eager channels_last bf16", "torch.compile max-autotune bf16", "triton fp32", "triton bf16"}
    assert {r["batch"] for r in res["end_to_end"]} == {1, 2}
    assert all(r["mpix_per_s"] > 0 for r in res["end_to_end"])
    fp32 = next(c for c in res["counts"] if c["precision"] == "fp32")
    assert fp32["max_abs_diff"] <= 1e-4 * max(fp32["mean_abs_count"], 1.0)


def test_gpu_report_needs_cuda_without_dry_run():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # hide any GPU: the script must refuse clearly
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--batches", "1"], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env
    )
    assert proc.returncode != 0
    assert "--dry-run" in proc.stderr


@gpu
def test_gpu_report_small_on_gpu(tmp_path):
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--size", "256", "--batches", "1,2", "--layer-batch", "1", "--reps", "2",
         "--skip-compile", "--count-images", "2", "--json", str(out)],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(json.loads(out.read_text())["layers"]) == 2 * 10
