"""A generated, deterministic, learnable image dataset (the embedded default and the tests use it).

Ten classes of shapes and textures drawn in a random colour, size and place on a noisy background
of another colour. Sample ``i`` depends only on ``(seed, i, image_size, multi_label)``. In the
multi-label variant an image holds one to three different classes (smaller, in separate quadrants)
and its labels are all of them.
"""
from __future__ import annotations

import colorsys
import io

import numpy as np
from PIL import Image, ImageDraw

DEMO_CLASSES: tuple[str, ...] = (
    "circle", "square", "triangle", "cross", "ring",
    "diamond", "horizontal_stripes", "vertical_stripes", "checkerboard", "dots",
)


def _colour(rng: np.random.Generator, lightness: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hls_to_rgb(float(rng.random()), lightness, 0.4 + 0.6 * float(rng.random()))
    return int(r * 255), int(g * 255), int(b * 255)


def _draw(draw: ImageDraw.ImageDraw, cls: int, box: tuple[float, float, float, float],
          fill: tuple[int, int, int], rng: np.random.Generator) -> None:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    line = max(1, int(min(w, h) / 7))
    name = DEMO_CLASSES[cls]
    if name == "circle":
        draw.ellipse(box, fill=fill)
    elif name == "square":
        draw.rectangle(box, fill=fill)
    elif name == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif name == "cross":
        draw.rectangle((cx - line, y0, cx + line, y1), fill=fill)
        draw.rectangle((x0, cy - line, x1, cy + line), fill=fill)
    elif name == "ring":
        draw.ellipse(box, outline=fill, width=line + 1)
    elif name == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    elif name in ("horizontal_stripes", "vertical_stripes"):
        period = max(2, int(min(w, h) / (3 + rng.integers(3))))
        extent = h if name == "horizontal_stripes" else w
        for k in range(0, int(extent), period):
            if name == "horizontal_stripes":
                draw.rectangle((x0, y0 + k, x1, min(y1, y0 + k + period // 2)), fill=fill)
            else:
                draw.rectangle((x0 + k, y0, min(x1, x0 + k + period // 2), y1), fill=fill)
    elif name == "checkerboard":
        cells = 4
        for i in range(cells):
            for j in range(cells):
                if (i + j) % 2 == 0:
                    draw.rectangle((x0 + i * w / cells, y0 + j * h / cells,
                                    x0 + (i + 1) * w / cells, y0 + (j + 1) * h / cells), fill=fill)
    elif name == "dots":
        radius = max(1.0, min(w, h) / 12)
        for i in range(3):
            for j in range(3):
                px, py = x0 + (i + 0.5) * w / 3, y0 + (j + 0.5) * h / 3
                draw.ellipse((px - radius, py - radius, px + radius, py + radius), fill=fill)


def demo_sample(index: int, image_size: int = 64, seed: int = 0,
                multi_label: bool = False) -> tuple[Image.Image, tuple[int, ...]]:
    """The ``index``-th demo image (RGB) and its class indices (sorted)."""
    rng = np.random.default_rng([seed, index, image_size, int(multi_label)])
    s = image_size
    background = np.array(_colour(rng, 0.25 + 0.5 * float(rng.random())), dtype=np.float32)
    noise = rng.normal(0.0, 18.0, size=(s, s, 3)).astype(np.float32)
    image = Image.fromarray(np.clip(background + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    bg_lightness = colorsys.rgb_to_hls(*(background / 255))[1]
    fg_lightness = 0.15 if bg_lightness > 0.5 else 0.85

    if multi_label:
        count = int(rng.integers(1, 4))
        classes = rng.choice(len(DEMO_CLASSES), size=count, replace=False)
        quadrants = rng.permutation(4)[:count]
        for cls, quadrant in zip(classes, quadrants):
            qx, qy = (quadrant % 2) * s / 2, (quadrant // 2) * s / 2
            size = s / 2 * (0.6 + 0.35 * float(rng.random()))
            ox = qx + float(rng.random()) * (s / 2 - size)
            oy = qy + float(rng.random()) * (s / 2 - size)
            _draw(draw, int(cls), (ox, oy, ox + size, oy + size), _colour(rng, fg_lightness), rng)
        labels = tuple(sorted(int(c) for c in classes))
    else:
        cls = int(rng.integers(len(DEMO_CLASSES)))
        size = s * (0.4 + 0.45 * float(rng.random()))
        ox, oy = float(rng.random()) * (s - size), float(rng.random()) * (s - size)
        _draw(draw, cls, (ox, oy, ox + size, oy + size), _colour(rng, fg_lightness), rng)
        labels = (cls,)
    return image, labels


def demo_jpeg(index: int, image_size: int = 64, seed: int = 0, multi_label: bool = False,
              quality: int = 90) -> tuple[bytes, tuple[int, ...]]:
    image, labels = demo_sample(index, image_size, seed, multi_label)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue(), labels
