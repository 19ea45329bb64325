"""fastcount: fast, exact Count-ception cell counting, from small images to gigapixel slides.

Public API::

    import fastcount
    model = fastcount.CountCeption()                  # the reference network
    n = fastcount.count_image(image, model)           # one image -> float count
    t = fastcount.make_targets(dots)                  # dot map -> count-map target
    c = fastcount.redundant_count(model(x))           # count map -> count per image
    r = fastcount.count_slide("slide.svs", model)     # any size, tiled, exact -> SlideCount
"""
from . import geometry
from .api import count_image
from .io import load_model, save_model
from .model import CountCeption
from .ops import make_targets, make_targets_from_points, redundant_count
from .slide import SlideCount, count_slide

__version__ = "0.1.0"


def __getattr__(name):
    # fastcount.data (datasets, annotation readers) loads on first use, so `import fastcount` stays fast.
    if name == "data":
        import importlib

        return importlib.import_module(".data", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "CountCeption",
    "count_image",
    "count_slide",
    "SlideCount",
    "geometry",
    "load_model",
    "make_targets",
    "make_targets_from_points",
    "redundant_count",
    "save_model",
    "__version__",
]
