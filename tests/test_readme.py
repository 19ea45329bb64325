"""Every Python example in README.md runs as written.

Convention (for anyone adding a README example):
- Each fenced ```python block of README.md is executed, top to bottom, in ONE
  shared namespace (a later block may use a name an earlier block made, as a
  reader following the README would), with the working directory set to a
  temporary folder.
- That folder holds small stand-in files named as the README names them, and
  the namespace holds small stand-in variables for the names the README
  leaves to the reader (``image_hwc_uint8``, ``dots``, ...). Both are made in
  ``_stand_ins`` below: if your example needs another file or variable, add
  it there (keep it tiny: a width-0.0625 model, images of a few dozen pixels).
- A block that genuinely cannot run here (it needs a GPU or a cluster) gets
  an HTML comment on the line right before its fence, e.g.
  ``<!-- not-run: needs a GPU -->``; the test reports it as skipped with that
  reason. Use this sparingly: every other block must run.
"""
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

README = Path(__file__).resolve().parents[1] / "README.md"
NOT_RUN = re.compile(r"<!--\s*not-run:\s*(.*?)\s*-->")


def readme_blocks(text: str):
    """(line number, code, not-run reason or None) of each ```python block."""
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start, j = i + 1, i + 1
            while j < len(lines) and lines[j].strip() != "```":
                j += 1
            prev = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
            m = NOT_RUN.search(prev)
            out.append((start + 1, "\n".join(lines[start:j]), m.group(1) if m else None))
            i = j
        i += 1
    return out


def _stand_ins(folder: Path) -> dict:
    """Files in ``folder`` and variables the README's examples use; tiny on purpose."""
    import fastcount
    from fastcount.data.synth import cell_image, write_synthetic_slide
    from fastcount.testing import randomize_bn

    torch.manual_seed(0)
    fastcount.save_model(randomize_bn(fastcount.CountCeption(width=0.0625), seed=0).eval(), folder / "w.safetensors")
    write_synthetic_slide(folder / "slide.svs", 384, seed=0, tile=128, progress=False)  # a tiled TIFF
    feats = [{"type": "Feature", "properties": {"classification": {"name": "Cell"}},
              "geometry": {"type": "Point", "coordinates": [40.5, 50.5]}},
             {"type": "Feature", "properties": {"classification": {"name": "Region"}},
              "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [96, 0], [96, 96], [0, 96], [0, 0]]]}}]
    (folder / "annotations.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    cells = folder / "my_cells"
    (cells / "images").mkdir(parents=True)
    (cells / "annotations").mkdir()
    images = []
    for i in range(3):
        img, d = cell_image(40, seed=i)
        images.append(img)
        Image.fromarray(img).save(cells / "images" / f"im{i}.png")
        r, c = np.nonzero(d)
        (cells / "annotations" / f"im{i}.csv").write_text(
            "x,y,class\n" + "".join(f"{x},{y},Tumor\n" for y, x in zip(r, c)))
    img, dots = cell_image(48, seed=5)
    return {"image_hwc_uint8": img, "dots": dots, "points": np.argwhere(dots), "H": 48, "W": 48,
            "images": images, "x": torch.rand(1, 3, 40, 44) * 255}


BLOCKS = readme_blocks(README.read_text())


def test_the_readme_has_python_examples():
    assert len([b for b in BLOCKS if b[2] is None]) >= 3


def test_block_finder_reads_fences_and_not_run_marks():
    text = "x\n```python\na = 1\n```\n<!-- not-run: needs a GPU -->\n\n```python\nb = 2\n```\n```bash\nc\n```\n"
    assert readme_blocks(text) == [(3, "a = 1", None), (8, "b = 2", "needs a GPU")]


NOT_RUN_BLOCKS = [b for b in BLOCKS if b[2] is not None]
if NOT_RUN_BLOCKS:  # defined only when some block is marked, so an unmarked README adds no skip
    @pytest.mark.parametrize("line,code,reason", NOT_RUN_BLOCKS)
    def test_not_run_blocks_are_reported(line, code, reason):
        pytest.skip(f"README.md line {line}: not run here ({reason})")


def test_every_python_example_runs(tmp_path, monkeypatch, one_thread):
    ns = {"__name__": "readme"}
    ns.update(_stand_ins(tmp_path))
    monkeypatch.chdir(tmp_path)
    ran = 0
    for line, code, reason in BLOCKS:
        if reason is not None:
            continue
        try:
            exec(compile(code, f"README.md:{line}", "exec"), ns)
        except Exception as e:
            raise AssertionError(f"README.md block at line {line} failed: {type(e).__name__}: {e}\n{code}") from e
        ran += 1
    assert ran == len([b for b in BLOCKS if b[2] is None]) and os.getcwd() == str(tmp_path)
