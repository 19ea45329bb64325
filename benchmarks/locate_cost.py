"""count_slide with and without ``points=True``, interleaved, for the vgg and mbm models (issue 15 cost).

    python benchmarks/locate_cost.py [--side 2048] [--rounds 2]

Prints, per model and round: wall seconds, compute seconds and locate's own seconds
(``stats["locate_seconds"]``) at the default tile, after a small warm-up call.
"""
import argparse

import fastcount
from fastcount.data.synth import cell_image


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    img = cell_image(args.side, seed=0)[0]
    print("weights round points seconds compute_seconds locate_seconds n_points tile")
    for w in ("vgg", "mbm"):
        model = fastcount.load_model(w).eval()
        fastcount.count_slide(img[:600, :600], model, mask=None, progress=False, backend="cpu", points=True)
        for rnd in range(args.rounds):
            for points in (False, True):
                r = fastcount.count_slide(img, model, mask=None, progress=False, backend="cpu", points=points)
                st = r.stats
                print(w, rnd, points, f"{st['seconds']:.2f}", f"{st['compute_seconds']:.2f}",
                      f"{st.get('locate_seconds', 0.0):.2f}", len(r.points) if points else "-", st["tile"], flush=True)


if __name__ == "__main__":
    main()
