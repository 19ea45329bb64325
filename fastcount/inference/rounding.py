"""Count-calibrated bf16 rounding of the folded weights (``precision="bf16"``).

Rounding each folded weight and bias to the nearest bf16 value changes the
network a little, and the count with it: with the default weights by 0.08 per
256x256 VGG image on average (max 0.17), although bf16 activations alone cost
only 0.003. The change is first-order linear in the rounding errors ``d``:
``count error ~= g . d``, ``g`` the gradient of the image's count with respect
to the folded parameters (measured: predicted 0.057 mean against 0.054 actual).
The gradients of different images of one kind are nearly parallel (singular
values of 20 VGG images' gradients: 1, 0.10, 0.024, 0.013, ...).

:func:`calibrate_bf16` therefore rounds a few parameters to their *other* bf16
neighbour (each stays within one bf16 step of its exact value), chosen greedily
so that, layer by layer, ``G_layer . d_layer ~= 0`` for the gradients ``G`` of a
few calibration images. Per-layer balance keeps any subset of layers exact to
first order, whichever layers the backend runs in bf16. Calibrated on 10 VGG
training images, the default weights' bf16 count error on 20 VGG test images
fell from 0.078 to 0.016 (float simulation, ``benchmarks/RESULTS.md``).
Calibrate on images of the kind you count: synthetic cells did not carry over
to real VGG images.

A :class:`Bf16Rounding` holds the bf16 values; ``compile(..., precision="bf16",
rounding=r)`` uses them, ``save_model`` stores them with the weights and
``load_model`` attaches them as ``model.bf16_rounding``.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from ..model import INCEPTION, LARGE, CountCeption
from ..pixels import image_to_tensor
from .fft import fft_conv2d
from .plan import FoldedConv, FoldedInception, Plan, fold
from .spectral import MIN_FFT_KERNEL

__all__ = ["Bf16Rounding", "calibrate_bf16", "bf16_layer_names", "current_rounding", "STATE_PREFIX",
           "METADATA_KEY"]

# Key prefix of the rounding's tensors in a weights file (beside the model's state dict).
STATE_PREFIX = "bf16_rounding."
METADATA_KEY = "bf16_rounding"


def bf16_layer_names(plan: Plan) -> list[str]:
    """Names of the convs a bf16 backend may round: Inception branches and the large valid convs.

    The first conv (3 input channels) and the trailing 1x1 head stay fp32 in every backend.
    """
    names = []
    for i, (role, layer) in enumerate(plan.with_roles()):
        if role == INCEPTION:
            names += [f"layers.{i}.branch1", f"layers.{i}.branch3"]
        elif role == LARGE:
            names.append(f"layers.{i}")
    return names


def _convs(plan: Plan) -> dict[str, FoldedConv]:
    out = {}
    for i, layer in enumerate(plan.layers):
        if isinstance(layer, FoldedInception):
            out[f"layers.{i}.branch1"], out[f"layers.{i}.branch3"] = layer.branch1, layer.branch3
        else:
            out[f"layers.{i}"] = layer
    return out


def _replace(plan: Plan, new: dict[str, FoldedConv]) -> Plan:
    layers = []
    for i, layer in enumerate(plan.layers):
        if isinstance(layer, FoldedInception):
            layers.append(FoldedInception(new.get(f"layers.{i}.branch1", layer.branch1),
                                          new.get(f"layers.{i}.branch3", layer.branch3)))
        else:
            layers.append(new.get(f"layers.{i}", layer))
    return Plan(tuple(layers), plan.geometry, plan.in_channels, plan.roles)


def _forward(plan: Plan, x: torch.Tensor) -> torch.Tensor:
    """plan.reference(x), with the large valid convs by FFT (differentiable; ~3x faster backward on a CPU)."""
    for role, layer in plan.with_roles():
        if role == LARGE and layer.kernel >= MIN_FFT_KERNEL:
            x = torch.nn.functional.leaky_relu(fft_conv2d(x, layer.weight, layer.bias), layer.slope)
        else:
            x = layer.reference(x)
    return x


def _neighbours(exact: torch.Tensor):
    """(nearest bf16, the bf16 neighbour on the other side of ``exact``), as float64."""
    exact = exact.to(torch.float64)
    near = exact.to(torch.bfloat16)
    bits = near.view(torch.int16).to(torch.int32)

    def from_bits(b):
        return b.to(torch.int16).view(torch.bfloat16).to(torch.float64)

    # bf16 is sign-magnitude: bits +-1 step the magnitude; one of the two lies across `exact`
    a, b = from_bits(bits + 1), from_bits(bits - 1)
    near = near.to(torch.float64)
    side = near - exact

    def across(c):
        return torch.nan_to_num((c - exact) * side, nan=1.0) < 0

    va, vb = across(a), across(b)
    other = torch.where(va & (~vb | ((a - exact).abs() < (b - exact).abs())), a, b)
    other = torch.where(va | vb, other, near)  # exact values (side == 0) have nothing to flip to
    return near, other


@dataclass
class Bf16Rounding:
    """bf16 values for the folded conv parameters of one model (see module doc).

    ``tensors`` maps ``"<conv>.weight"`` / ``"<conv>.bias"`` (``<conv>`` as in
    :func:`bf16_layer_names`) to bfloat16 tensors in the folded layout.
    """

    tensors: dict
    info: dict = field(default_factory=dict)

    def check(self, plan: Plan) -> None:
        """Raise ValueError unless every value is a bf16 neighbour of the plan's exact value."""
        convs = _convs(plan)
        for key, t in self.tensors.items():
            name, _, kind = key.rpartition(".")
            if name not in convs or kind not in ("weight", "bias"):
                raise ValueError(f"rounding has {key!r}, which this model has no conv parameter for")
            exact = getattr(convs[name], kind)
            if tuple(t.shape) != tuple(exact.shape):
                raise ValueError(f"rounding {key!r} has shape {tuple(t.shape)}, the model's is {tuple(exact.shape)}")
            near, other = _neighbours(exact)
            v = t.to(torch.float64)
            if not bool(((v == near) | (v == other)).all()):
                raise ValueError(
                    f"rounding {key!r} does not match the model's weights (it was calibrated for other "
                    "weights or BN statistics); calibrate again with fastcount.inference.calibrate_bf16")

    def apply(self, plan: Plan) -> Plan:
        """The plan with the calibrated values in place of the exact ones (checked first)."""
        self.check(plan)
        convs, new = _convs(plan), {}
        for name, conv in convs.items():
            w, b = self.tensors.get(name + ".weight"), self.tensors.get(name + ".bias")
            if w is None and b is None:
                continue
            new[name] = FoldedConv(conv.weight if w is None else w.to(conv.weight.dtype),
                                   conv.bias if b is None else b.to(conv.bias.dtype),
                                   conv.kernel, conv.padding, conv.stride, conv.slope)
        return _replace(plan, new)

    def to_state(self) -> tuple[dict, dict]:
        """``(tensors, metadata)`` to store beside a model's weights: the bf16 tensors under
        :data:`STATE_PREFIX`, the calibration info as one JSON metadata string."""
        tensors = {STATE_PREFIX + k: v.contiguous() for k, v in self.tensors.items()}
        return tensors, {METADATA_KEY: json.dumps(self.info)}

    @classmethod
    def from_state(cls, tensors: dict, metadata: dict) -> "Bf16Rounding | None":
        """The rounding stored by :meth:`to_state` (its keys are removed from ``tensors``), or None."""
        keys = [k for k in tensors if k.startswith(STATE_PREFIX)]
        if not keys:
            return None
        values = {k[len(STATE_PREFIX):]: tensors.pop(k) for k in keys}
        return cls(values, json.loads(metadata.get(METADATA_KEY, "{}")))


def current_rounding(model: CountCeption) -> "Bf16Rounding | None":
    """``model.bf16_rounding`` if it still matches the weights; a stale one is dropped with a warning."""
    rounding = model.bf16_rounding
    if rounding is None:
        return None
    try:
        rounding.check(fold(model, dtype=torch.float64).to("cpu"))
    except ValueError as e:
        warnings.warn(f"not saving model.bf16_rounding, it no longer matches the weights "
                      f"(calibrate again with fastcount.inference.calibrate_bf16): {e}", stacklevel=3)
        return None
    return rounding


def _null_first_order(G: np.ndarray, d: np.ndarray, step: np.ndarray, batch: int = 256, max_passes: int = 500):
    """Greedy flips to the other neighbour that drive ``G @ d`` towards 0.

    G (K, P) gradients, d (P,) rounding errors, step (P,) change of d when flipped
    (0 = cannot flip). Returns the flipped mask.
    """
    V = G * step[None]
    n2 = (V * V).sum(0)
    r = G @ d
    target = 1e-6 * float(np.linalg.norm(r))
    flipped = np.zeros(d.shape, bool)
    usable = step != 0
    for _ in range(max_passes):
        gain = -2.0 * (r @ V) - n2
        gain[flipped | ~usable] = -np.inf
        k = min(batch, gain.size)
        cand = np.argpartition(-gain, k - 1)[:k]
        cand = cand[gain[cand] > 0]
        if cand.size == 0:
            break
        for i in cand[np.argsort(-gain[cand])]:
            # exact gain with the current residual (earlier flips in this batch moved it)
            if -2.0 * float(r @ V[:, i]) - n2[i] > 0:
                r += V[:, i]
                flipped[i] = True
        if np.linalg.norm(r) <= target:
            break
    return flipped


def calibrate_bf16(model: CountCeption, images, progress: bool = False) -> Bf16Rounding:
    """Choose bf16 roundings of ``model``'s folded weights that keep counts on ``images`` exact to first order.

    Args:
        model: the CountCeption to calibrate (its current BN statistics are folded).
        images: a few (4-16) images of the kind you will count: HxWx3 uint8 arrays or
            CHW / NCHW float tensors of 0..255 intensities (see ``fastcount.pixels.image_to_tensor``).
            Larger images calibrate better; 256x256 is plenty.
        progress: show a tqdm bar over the images (one backward pass each).

    Returns a :class:`Bf16Rounding`; pass it as ``compile(..., precision="bf16", rounding=...)``
    or set ``model.bf16_rounding`` so ``save_model`` stores it.
    """
    if not isinstance(model, CountCeption):
        raise TypeError(f"model must be a CountCeption, got {type(model).__name__}")
    if isinstance(images, (np.ndarray, torch.Tensor)) and getattr(images, "ndim", 0) == 4:
        images = list(images)
    if not isinstance(images, (list, tuple)):
        raise TypeError(f"images must be a list of images (arrays or tensors), got {type(images).__name__}")
    if len(images) == 0:
        raise ValueError("images must hold at least one calibration image, got none")
    xs = []
    for k, im in enumerate(images):
        try:
            x = image_to_tensor(im, model.in_channels).float().cpu()
        except (TypeError, ValueError) as e:
            raise type(e)(f"images[{k}]: {e}") from e
        xs += list(x.split(1))

    plan = fold(model, dtype=torch.float64).to("cpu")
    convs = _convs(plan)
    names = bf16_layer_names(plan)
    redundancy = float(model.geometry.redundancy)

    # Gradients of each image's count with respect to the folded parameters (fp32 reference).
    leaves = {}
    for name in names:
        c = convs[name]
        leaves[name] = (c.weight.float().requires_grad_(), c.bias.float().requires_grad_())
    base = plan.to(dtype=torch.float32)
    live = _replace(base, {n: FoldedConv(w, b, convs[n].kernel, convs[n].padding, convs[n].stride, convs[n].slope)
                           for n, (w, b) in leaves.items()})
    flat = [t for n in names for t in leaves[n]]
    grads = []
    it = xs
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(xs, desc="bf16 calibration", unit="image")
    with torch.enable_grad():
        for x in it:
            count = _forward(live, x).sum() / redundancy
            grads.append([g.detach().double() for g in torch.autograd.grad(count, flat)])

    tensors, before, after = {}, 0.0, 0.0
    for j, name in enumerate(names):
        c = convs[name]
        exact = torch.cat([c.weight.flatten(), c.bias.flatten()])
        near, other = _neighbours(exact)
        d = (near - exact).numpy()
        step = (other - near).numpy()
        G = np.stack([torch.cat([g[2 * j].flatten(), g[2 * j + 1].flatten()]).numpy() for g in grads])
        flipped = _null_first_order(G, d, step)
        chosen = np.where(flipped, other.numpy(), near.numpy())
        before += float(np.abs(G @ d).sum())
        after += float(np.abs(G @ (chosen - exact.numpy())).sum())
        chosen = torch.from_numpy(chosen).to(torch.bfloat16)
        nw = c.weight.numel()
        tensors[name + ".weight"] = chosen[:nw].view_as(c.weight).clone()
        tensors[name + ".bias"] = chosen[nw:].clone()
    k = len(xs)
    info = {"images": k, "first_order_error_nearest": before / k, "first_order_error_calibrated": after / k}
    return Bf16Rounding(tensors, info)
