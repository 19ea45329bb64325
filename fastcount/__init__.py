"""fastcount: fast, exact Count-ception cell counting, from small images to gigapixel slides.

Public API::

    import fastcount
    model = fastcount.CountCeption()                  # the reference network
    n = fastcount.count_image(image, model)           # one image -> float count
    t = fastcount.make_targets(dots)                  # dot map -> count-map target
    c = fastcount.redundant_count(model(x))           # count map -> count per image
    r = fastcount.count_slide("slide.svs", model)     # any size, tiled, exact -> SlideCount
    t = fastcount.count_slides(paths, model, client=c) # many slides on a Dask cluster -> SlidesResult
    p = fastcount.locate(model(x))                    # count map -> object positions (Points)
    fastcount.export_onnx(model, "model.onnx")         # BN folded, geometry in the metadata
"""
from . import geometry
from .api import count_image
from .export import export_onnx
from .io import load_model, save_model
from .localise import LocateParams, Points, locate
from .model import CountCeption
from .ops import make_targets, make_targets_from_points, redundant_count
from .slide import SlideCount, count_slide

__version__ = "0.1.0"

__all__ = [
    "CountCeption",
    "count_image",
    "count_slide",
    "export_onnx",
    "SlideCount",
    "geometry",
    "load_model",
    "locate",
    "Points",
    "LocateParams",
    "make_targets",
    "make_targets_from_points",
    "redundant_count",
    "save_model",
    "__version__",
    "count_slides",
    "SlidesResult",
]


def __getattr__(name):
    # Loaded on first use, so `import fastcount` stays fast: fastcount.data (datasets, annotation
    # readers), and count_slides / SlidesResult (they import dask).
    if name == "data":
        import importlib

        return importlib.import_module(".data", __name__)
    if name in ("count_slides", "SlidesResult"):
        from .distributed import SlidesResult, count_slides

        return {"count_slides": count_slides, "SlidesResult": SlidesResult}[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
