"""Does an image show what its caption says? The shapes world's renderer statistics as the judge.

Shapes: H/W image side, 3 RGB channels.

jobs/data/synth.py draws each object as one flat palette colour (COLOR_RGB) on a light grey
background, so a picture can be read back without a learned model:
- pixels are given the nearest palette colour when they are within `COLOR_RADIUS` of it (and are
  not the grey background), then split into 4-connected components;
- a component of at least `MIN_AREA` pixels is an object; its shape class comes from two statistics
  of the renderer's polygons, measured in the component's bounding box: the fill ratio (square 1,
  circle pi/4, triangle and diamond 1/2) and the share of the pixels in the box's top half
  (triangle 1/4, the others 1/2): the nearest prototype wins.
A caption matches an image when the image's colours (those with an object) are exactly the
caption's colours (`color_match`), and every (colour, shape) the caption names is an object of that
colour and shape (`shape_match`); `match` needs both. tests/unit/test_dalle_eval.py calibrates it on
rendered scenes (their own captions match, other scenes' captions mostly do not).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from jobs.data.synth import COLOR_RGB, COLORS, SHAPES, SIZES

COLOR_RADIUS = 80.0  # RGB distance to a palette colour that still counts as that colour
MIN_AREA = 12  # pixels of a component that counts as an object (a small 48px triangle covers ~40)
# (fill ratio of the bounding box, share of pixels in the box's top half) of each drawn shape
PROTOTYPES: dict[str, tuple[float, float]] = {
    "square": (1.0, 0.5), "circle": (np.pi / 4, 0.5), "triangle": (0.5, 0.25), "diamond": (0.5, 0.5)}
_PALETTE_K3 = np.array([COLOR_RGB[c] for c in COLORS], dtype=np.float32)
_OBJECT = re.compile(rf"\b(?:{'|'.join(SIZES)})\s+({'|'.join(COLORS)})\s+({'|'.join(SHAPES)})\b")


@dataclass(frozen=True)
class Verdict:
    color_match: bool
    shape_match: bool

    @property
    def match(self) -> bool:
        return self.color_match and self.shape_match


def caption_objects(caption: str) -> set[tuple[str, str]]:
    """The (colour, shape) pairs a shapes-world caption names."""
    return set(_OBJECT.findall(caption.lower()))


def _components(mask_HW: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, each as an [M, 2] array of (row, col)."""
    seen = np.zeros_like(mask_HW, dtype=bool)
    H, W = mask_HW.shape
    out: list[np.ndarray] = []
    for r0, c0 in zip(*np.nonzero(mask_HW), strict=True):
        if seen[r0, c0]:
            continue
        seen[r0, c0] = True
        stack, pixels = [(r0, c0)], []
        while stack:
            r, c = stack.pop()
            pixels.append((r, c))
            for rr, cc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                if 0 <= rr < H and 0 <= cc < W and mask_HW[rr, cc] and not seen[rr, cc]:
                    seen[rr, cc] = True
                    stack.append((rr, cc))
        out.append(np.array(pixels))
    return out


def shape_of(pixels_M2: np.ndarray) -> str:
    """The drawn shape whose (fill ratio, top-half share) is nearest to the component's."""
    r0, c0 = pixels_M2.min(0)
    r1, c1 = pixels_M2.max(0)
    fill = len(pixels_M2) / float((r1 - r0 + 1) * (c1 - c0 + 1))
    top = float((pixels_M2[:, 0] < (r0 + r1 + 1) / 2).mean())
    return min(PROTOTYPES, key=lambda s: (PROTOTYPES[s][0] - fill) ** 2 + (PROTOTYPES[s][1] - top) ** 2)


def image_objects(image_HW3: np.ndarray) -> set[tuple[str, str]]:
    """The (colour, shape) of every object found in a uint8 RGB image."""
    pixels = image_HW3.astype(np.float32)
    dist_HWK = np.linalg.norm(pixels[:, :, None, :] - _PALETTE_K3[None, None], axis=-1)
    nearest_HW = dist_HWK.argmin(-1)
    # the background is grey: its channels agree; palette colours are saturated
    saturated_HW = (pixels.max(-1) - pixels.min(-1)) > 40
    colored_HW = (dist_HWK.min(-1) < COLOR_RADIUS) & saturated_HW
    found: set[tuple[str, str]] = set()
    for k, color in enumerate(COLORS):
        for comp in _components(colored_HW & (nearest_HW == k)):
            if len(comp) >= MIN_AREA:
                found.add((color, shape_of(comp)))
    return found


def check(image_HW3: np.ndarray, caption: str) -> Verdict:
    """Whether the image's colours and shapes are the caption's."""
    named, seen = caption_objects(caption), image_objects(image_HW3)
    return Verdict(color_match={c for c, _ in seen} == {c for c, _ in named} and bool(named),
                   shape_match=bool(named) and named <= seen)


def match_rates(images: Sequence[np.ndarray], captions: Sequence[str]) -> dict[str, float]:
    """Shares of `images` whose colours / shapes / both match their caption."""
    verdicts = [check(im, cap) for im, cap in zip(images, captions, strict=True)]
    n = max(len(verdicts), 1)
    return {"match": sum(v.match for v in verdicts) / n, "color_match": sum(v.color_match for v in verdicts) / n,
            "shape_match": sum(v.shape_match for v in verdicts) / n}


__all__ = ["Verdict", "caption_objects", "check", "image_objects", "match_rates", "shape_of"]
