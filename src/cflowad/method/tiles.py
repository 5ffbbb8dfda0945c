"""Native-resolution tiles: where each tile lies, and which part of the map it owns.

A tiled model keeps one input size (its ``image_size``, the whole image at the
resolution it is inspected at) and runs the encoder on tiles of it, so that memory
follows the tile, not the image. Neighbouring tiles overlap; each feature position
of the whole image is taken from the one tile that *owns* it, the tile in which it
lies furthest from an edge: a cut half-way through every overlap. A feature next to
a cut therefore sees at least half the overlap of real image around it, never a
tile's zero padding (the overlap-tile strategy of U-Net), and stitched features are
continuous across cuts without blending. Every start and cut is a multiple of the
largest stride, so the tiles' feature cells fall exactly on the image's.

The flows then score the stitched features with the positional condition of the
whole image, so a flow knows where in the image a tile lies.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

__all__ = ["Span", "TileLayout", "spans", "tile_layout"]


@dataclass(frozen=True)
class Span:
    """One tile along one axis, in input pixels: the tile is ``[start, start + length)``,
    it owns ``[own_start, own_end)``."""

    start: int
    own_start: int
    own_end: int

    def owned(self, stride: int) -> slice:
        """The owned part of the tile's feature map at ``stride``, in its own cells."""
        return slice((self.own_start - self.start) // stride, (self.own_end - self.start) // stride)


@dataclass(frozen=True)
class TileLayout:
    """Tiles of an input: (height, width) of every tile, and the spans along each axis
    (a tile is a row span crossed with a column span)."""

    size: tuple[int, int]
    rows: tuple[Span, ...]
    columns: tuple[Span, ...]

    @property
    def count(self) -> int:
        """Number of tiles."""
        return len(self.rows) * len(self.columns)

    def cells(self, stride: int) -> list[int]:
        """Where each cell of the image's feature map at ``stride`` (row-major) lies in
        the tiles' maps laid side by side, (tile row, tile column, row, column) with
        tiles row-major: the cell of the tile that owns it."""
        height, width = self.size[0] // stride, self.size[1] // stride
        index: list[int] = []
        for r, row in enumerate(self.rows):
            for y in range(row.own_start // stride, row.own_end // stride):
                for c, column in enumerate(self.columns):
                    tile = r * len(self.columns) + c
                    start = (tile * height + y - row.start // stride) * width
                    first, last = column.own_start // stride, column.own_end // stride
                    offset = start - column.start // stride
                    index.extend(range(offset + first, offset + last))
        return index


def spans(length: int, tile: int, overlap: float, step: int) -> tuple[int, tuple[Span, ...]]:
    """Tiles of ``tile`` pixels covering ``length`` with at least ``overlap`` of a tile
    shared by neighbours (rounded up to an even number of ``step``); starts and cuts
    on multiples of ``step``.

    Returns the tile length on this axis (``length`` itself when one tile covers it:
    then the tile is the whole axis, exactly the untiled model) and the spans.

    Example:
        >>> tile, parts = spans(640, 256, 0.25, 32)
        >>> tile, [(p.start, p.own_start, p.own_end) for p in parts]
        (256, [(0, 0, 224), (192, 224, 416), (384, 416, 640)])
    """
    if length % step or tile % step:
        raise ValueError(f"length {length} and tile {tile} must be multiples of {step}")
    if tile >= length:
        return length, (Span(0, 0, length),)
    # the overlap in whole pairs of steps, so that the cut can fall in its middle
    shared = 2 * step * math.ceil(tile * overlap / (2 * step))
    advance = max(step, tile - shared)  # the furthest apart neighbours may start
    count = math.ceil((length - tile) / advance) + 1
    # evenly spread, rounded down to the grid: gaps stay at most `advance`, the last
    # tile ends exactly at the edge
    starts = [step * ((i * (length - tile)) // ((count - 1) * step)) for i in range(count)]
    cuts = [0]
    for left, right in itertools.pairwise(starts):
        shared = left + tile - right  # the overlap of two neighbours, a multiple of step
        cuts.append(right + step * (shared // (2 * step)))
    cuts.append(length)
    return tile, tuple(Span(s, a, b) for s, a, b in zip(starts, cuts, cuts[1:], strict=False))


def tile_layout(
    image_size: tuple[int, int], tile_size: int, overlap: float, step: int
) -> TileLayout:
    """The tiles of an input of ``image_size`` (height, width): square tiles of
    ``tile_size``, or the whole side where the image is no larger."""
    height, rows = spans(image_size[0], tile_size, overlap, step)
    width, columns = spans(image_size[1], tile_size, overlap, step)
    return TileLayout((height, width), rows, columns)
