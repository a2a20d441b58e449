"""The PNG grids of samples that ditlab writes (training's `SampleGrid` callback, `src/sample.py`), made to be
read at a glance: every image upscaled by a whole factor, nearest-neighbour (its pixels repeated, never
blended, so the grid still shows the exact sample values), each row labelled with its class name, and a
title naming the design point, the step and how the images were sampled.
"""

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ditlab.design import point_name
from ditlab.io import atomic_path

MIN_TILE = 64  # px: a 32-px image is shown at 2×, 28 px at 3×, 8 px at 8×; 256 px stays 1×
PAD = 2  # px between tiles
MARGIN = 6  # px around text
BACKGROUND, INK = (255, 255, 255), (0, 0, 0)  # white gaps keep black-background tiles apart


def upscale_factor(size: int) -> int:
    """The smallest whole factor that shows a `size`-px image at ≥ `MIN_TILE` px."""
    return max(1, math.ceil(MIN_TILE / size))


def grid_title(
    coordinates: Mapping[str, Any],
    *,
    step: int | None,
    weights: str,
    sampler: str,
    steps: int,
    cfg_scale: float,
    guide_scale: float = 1.0,
) -> str:
    """E.g. "adaln_zero-DiT-Ti-p4+sit_linear · step 3000 · EMA weights, euler 50 steps, cfg 4.0": the design
    point (`ditlab.design.point_name`: block, model, patch, then the axes off the paper's values), the
    training step (None: unknown, left out) and the sampling (", autoguidance 2" where `guide_scale` ≠ 1)."""
    parts = [point_name(dict(coordinates))]
    if step is not None:
        parts.append(f"step {step}")
    guided = f", autoguidance {guide_scale:g}" if guide_scale != 1 else ""
    parts.append(f"{weights} weights, {sampler} {steps} steps, cfg {cfg_scale:g}{guided}")
    return " · ".join(parts)


def grid_image(
    images: np.ndarray,
    labels: Sequence[int],
    *,
    per_row: int,
    class_names: Sequence[str] | None = None,
    title: str = "",
) -> Image.Image:
    """`images` (N, H, W, 3) uint8 in rows of `per_row`, each upscaled by `upscale_factor`, under `title`.

    A row whose images share a class is labelled on its left with the class's name (`class_names[label]`;
    the index where there are no names); in a row of several classes (labels drawn at random) each image
    is captioned with its own.
    """
    if images.ndim != 4 or not len(images) or images.shape[3] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be (N ≥ 1, H, W, 3) uint8, got {images.shape} {images.dtype}")
    if len(labels) != len(images) or per_row < 1:
        raise ValueError(
            f"need one label per image and per_row ≥ 1; got {len(labels)} labels, per_row={per_row}"
        )
    count, height, width, _ = images.shape
    scale = upscale_factor(min(height, width))
    tile_w, tile_h = width * scale, height * scale
    font = ImageFont.load_default(size=min(24, max(12, tile_h // 5)))
    ascent, descent = font.getmetrics()
    line = ascent + descent
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength

    def fit(text: str, room: float) -> str:
        """`text`, cut with an ellipsis to `room` px."""
        if measure(text, font=font) <= room:
            return text
        while text and measure(text + "…", font=font) > room:
            text = text[:-1]
        return text + "…"

    names = [
        class_names[label] if class_names is not None and 0 <= label < len(class_names) else str(label)
        for label in labels
    ]
    rows = [range(start, min(start + per_row, count)) for start in range(0, count, per_row)]
    by_row = all(len({labels[i] for i in row}) == 1 for row in rows)
    # Capped so that a long name (ImageNet's "great white shark, white shark, man-eater, ...") is cut,
    # not left to widen the grid.
    label_room = min(max(measure(names[row[0]], font=font) for row in rows), max(2 * tile_w, 160))
    label_w = math.ceil(label_room) + 2 * MARGIN if by_row else 0
    caption_h = 0 if by_row else line
    cell_w, cell_h = tile_w + PAD, tile_h + caption_h + PAD
    grid_w = label_w + PAD + min(per_row, count) * cell_w

    title_lines: list[str] = []
    for part in title.split(" · ") if title else ():  # wrapped between its parts, to the grid's width
        if title_lines and measure(f"{title_lines[-1]} · {part}", font=font) <= grid_w - 2 * MARGIN:
            title_lines[-1] += f" · {part}"
        else:
            title_lines.append(part)
    title_h = len(title_lines) * line + 2 * MARGIN if title_lines else 0
    text_w = max((measure(text, font=font) for text in title_lines), default=0)
    canvas = Image.new(
        "RGB", (max(grid_w, math.ceil(text_w) + 2 * MARGIN), title_h + PAD + len(rows) * cell_h), BACKGROUND
    )
    draw = ImageDraw.Draw(canvas)
    for i, text in enumerate(title_lines):
        draw.text((MARGIN, MARGIN + i * line), text, font=font, fill=INK)
    tiles = images.repeat(scale, axis=1).repeat(scale, axis=2)  # nearest-neighbour, exactly
    for r, row in enumerate(rows):
        top = title_h + PAD + r * cell_h
        if by_row:
            draw.text(
                (MARGIN, top + (tile_h - line) // 2), fit(names[row[0]], label_room), font=font, fill=INK
            )
        for c, i in enumerate(row):
            left = label_w + PAD + c * cell_w
            canvas.paste(Image.fromarray(tiles[i]), (left, top))
            if not by_row:
                draw.text((left, top + tile_h), fit(names[i], tile_w), font=font, fill=INK)
    return canvas


def save_grid(
    path: str | Path,
    images: np.ndarray,
    labels: Sequence[int],
    *,
    per_row: int,
    class_names: Sequence[str] | None = None,
    title: str = "",
) -> Image.Image:
    """Write `grid_image(...)` of these arguments to `path` as PNG, atomically; returns the image."""
    image = grid_image(images, labels, per_row=per_row, class_names=class_names, title=title)
    with atomic_path(path) as tmp:
        image.save(tmp, format="png")
    return image
