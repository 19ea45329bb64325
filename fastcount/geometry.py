"""The one place that knows Count-ception's geometry.

Every other module asks here for output sizes, the receptive field, the halo
a tile needs, and the normaliser of the redundant count.

Coordinates: an input image has ``H`` rows. The full-resolution count map
(stride 1) has ``H + r`` rows; its row ``Y`` covers the valid window of input
rows ``Y - r .. Y`` and, through the six zero-padded 3x3 convs on the
intermediate maps, depends on input rows ``Y - r - 6 .. Y + 6``. With output
stride ``s`` the count map is that full-resolution map sampled at rows
``0, s, 2s, ...``.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Geometry", "large_kernels", "check_patch_stride"]

# Number of zero-padded 3x3 convs an output pixel reaches through: Inception
# blocks 2, 3 (before the first large conv) and 5..8 (before the second).
PADDED_CONVS = 6
# The first conv is always 3x3 (pad r); the two large valid convs carry the
# remaining r - 2 of the window, split 13:17 as in the paper for r = 32.
FIRST_KERNEL = 3
MIN_PATCH = 4


def large_kernels(patch_size: int) -> tuple[int, int]:
    """Kernel sizes of the two large valid convs (14 and 18 for r = 32)."""
    check_patch_stride(patch_size, 1)
    rest = patch_size - (FIRST_KERNEL - 1)  # sum of (k - 1) over the two convs
    a = round(rest * 13 / 30)
    a = min(max(a, 1), rest - 1)
    return a + 1, rest - a + 1


def check_patch_stride(patch_size, stride) -> None:
    """Raise a clear error unless (patch_size, stride) is a geometry the model supports."""
    if isinstance(patch_size, bool) or not isinstance(patch_size, int):
        raise TypeError(f"patch_size must be an int, got {type(patch_size).__name__}")
    if isinstance(stride, bool) or not isinstance(stride, int):
        raise TypeError(f"stride must be an int, got {type(stride).__name__}")
    if patch_size < MIN_PATCH:
        raise ValueError(f"patch_size must be >= {MIN_PATCH}, got {patch_size}")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if patch_size % stride:
        raise ValueError(
            f"stride must divide patch_size so that the redundancy (r/s)^2 is whole; "
            f"got patch_size={patch_size}, stride={stride}"
        )


@dataclass(frozen=True)
class Geometry:
    patch_size: int = 32
    stride: int = 1

    def __post_init__(self):
        check_patch_stride(self.patch_size, self.stride)

    @property
    def r(self) -> int:
        return self.patch_size

    @property
    def kernels(self) -> tuple[int, int, int]:
        """Kernel sizes of the three valid-window convs (3, 14, 18 for r = 32)."""
        return (FIRST_KERNEL, *large_kernels(self.patch_size))

    @property
    def first_pad(self) -> int:
        return self.patch_size

    @property
    def receptive_field(self) -> int:
        """Theoretical receptive field side including the padded 3x3 convs (45 for r=32)."""
        return self.patch_size + 1 + 2 * PADDED_CONVS

    @property
    def halo_before(self) -> int:
        """Input rows needed above (left of) the first output row of a tile: r + 6."""
        return self.patch_size + PADDED_CONVS

    @property
    def halo_after(self) -> int:
        """Input rows needed below (right of) the last output row of a tile: 6."""
        return PADDED_CONVS

    @property
    def redundancy(self) -> int:
        """(r/s)^2: how many count-map pixels see each object."""
        return (self.patch_size // self.stride) ** 2

    @property
    def window_offset(self) -> float:
        """Full-resolution count-map row ``Y``'s r x r window is centred on input row ``Y - r/2``."""
        return self.patch_size / 2

    def full_size(self, n: int) -> int:
        """Side of the stride-1 count map for an ``n``-pixel input side."""
        return n + self.patch_size

    def output_side(self, n: int) -> int:
        """Side of the count map (with stride) for an ``n``-pixel input side."""
        if n < 1:
            raise ValueError(f"image side must be >= 1, got {n}")
        return (n + self.patch_size + self.stride - 1) // self.stride  # integer ceil: symbolic sizes work too

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        return self.output_side(height), self.output_side(width)

    def input_span(self, out_start: int, out_stop: int, n: int) -> tuple[int, int]:
        """Input rows ``[a, b)`` that exactly determine full-resolution output rows
        ``[out_start, out_stop)`` of an ``n``-row image.

        Running the network on input rows ``a..b-1`` gives a local count map
        whose row ``Y - a`` equals row ``Y`` of the whole-image count map for
        every ``Y`` in ``[out_start, out_stop)``: interior sides carry the full
        halo, and sides clipped at the true image border reproduce the whole
        image's own padding.
        """
        if not 0 <= out_start < out_stop <= self.full_size(n):
            raise ValueError(f"output span [{out_start}, {out_stop}) outside [0, {self.full_size(n)})")
        return max(0, out_start - self.halo_before), min(n, out_stop + self.halo_after)

