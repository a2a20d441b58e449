"""The sample grids ditlab writes (`ditlab.grids`): upscaled exactly, rows labelled, titled; and the training
callback writing (and logging to W&B) that grid."""

import contextlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import WandbLogger
from PIL import Image

from ditlab.grids import PAD, grid_image, grid_title, upscale_factor
from ditlab.interop.generation import to_uint8_rgb
from ditlab.training.callbacks import SampleGrid

BACKGROUND = 255


def images_32(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)


def tile(grid: np.ndarray, top: int, left: int, size: int) -> np.ndarray:
    return grid[top : top + size, left : left + size]


def nearest(image: np.ndarray, factor: int) -> np.ndarray:
    return np.kron(image, np.ones((factor, factor, 1), dtype=np.uint8))


@pytest.mark.parametrize(("size", "factor"), [(32, 2), (28, 3), (8, 8), (64, 1), (256, 1)])
def test_upscale_factor_is_the_smallest_whole_factor_reaching_64_px(size, factor):
    assert upscale_factor(size) == factor


def test_grid_of_3_classes_upscales_each_image_exactly_in_class_rows_with_labels_and_title():
    images = images_32(6)
    grid = np.asarray(
        grid_image(
            images, [0, 0, 1, 1, 2, 2], per_row=2, class_names=["alpha", "beta", "gamma"], title="a title"
        )
    )
    cell = 64 + PAD  # 32 px at 2×, then the gap
    height, width, _ = grid.shape
    label_w, title_h = width - PAD - 2 * cell, height - PAD - 3 * cell
    assert label_w > 0 and title_h > 0
    for i, image in enumerate(images):
        row, col = divmod(i, 2)  # image i in row i // 2: the rows in the order of the labels, class 0 first
        top, left = title_h + PAD + row * cell, label_w + PAD + col * cell
        assert np.array_equal(tile(grid, top, left, 64), nearest(image, 2))
    labels = [grid[title_h + PAD + row * cell : title_h + (row + 1) * cell, :label_w] for row in range(3)]
    assert all((label != BACKGROUND).any() for label in labels)  # each row has its name
    assert not np.array_equal(labels[0], labels[1]) and not np.array_equal(labels[1], labels[2])
    assert (grid[:title_h] != BACKGROUND).any()


def test_grid_without_class_names_labels_rows_with_the_class_index():
    images, labels = images_32(4), [0, 0, 1, 1]
    unnamed = grid_image(images, labels, per_row=2, title="t")
    assert np.array_equal(
        np.asarray(unnamed),
        np.asarray(grid_image(images, labels, per_row=2, class_names=["0", "1"], title="t")),
    )
    assert not np.array_equal(
        np.asarray(unnamed),
        np.asarray(grid_image(images, labels, per_row=2, class_names=["a", "b"], title="t")),
    )


def test_grid_of_mixed_rows_captions_each_image_instead():
    """Labels drawn at random (sample.py without classes=): no label column, a caption under every image."""
    images = images_32(4)
    grid = np.asarray(grid_image(images, [0, 1, 2, 0], per_row=2, class_names=["alpha", "beta", "gamma"]))
    height, width, _ = grid.shape
    assert width == PAD + 2 * (64 + PAD)  # no label column
    cell_h = (height - PAD) // 2  # no title: two rows of a tile, its caption and the gap
    for i, image in enumerate(images):
        row, col = divmod(i, 2)
        top, left = PAD + row * cell_h, PAD + col * (64 + PAD)
        assert np.array_equal(tile(grid, top, left, 64), nearest(image, 2))
        assert (grid[top + 64 : top + cell_h - PAD, left : left + 64] != BACKGROUND).any()  # the caption


def test_grid_title_names_the_design_point_off_the_paper_the_step_and_the_sampling():
    paper = {"block": "adaln_zero", "model": "DiT-Ti", "patch": 4, "objective": "ddpm", "sampler": "ddim"}
    sampling = dict(weights="EMA", sampler="ddim", steps=50, cfg_scale=4.0)
    assert (
        grid_title(paper, step=3000, **sampling)
        == "adaln_zero-DiT-Ti-p4 · step 3000 · EMA weights, ddim 50 steps, cfg 4"
    )
    flow = paper | {"objective": "sit_linear", "predict": "velocity", "mlp": "swiglu", "sampler": "euler"}
    assert grid_title(flow, step=None, **sampling).startswith(
        "adaln_zero-DiT-Ti-p4+sit_linear+swiglu · EMA weights"
    )


class RecordingWandb(WandbLogger):
    def __init__(self) -> None:  # no W&B run: only what the callback logs is kept
        self.logged: list[tuple] = []

    def log_image(self, key: str, images: list, step: int | None = None, **kwargs) -> None:
        self.logged.append((key, images, step, kwargs))


def test_sample_grid_callback_saves_and_logs_the_labelled_grid(tmp_path):
    """A module of 3 classes: the grid has a row per class named from the run's data info, titled with its
    design point and step, and W&B gets that same image."""
    images = torch.rand(6, 1, 32, 32) * 2 - 1
    coordinates = {"block": "adaln_zero", "model": "DiT-Ti", "patch": 4, "objective": "ddpm"}
    module = SimpleNamespace(
        ema=SimpleNamespace(num_classes=3),
        device=torch.device("cpu"),
        sample=lambda labels, spec: (images[: len(labels)], None),
        info={"coordinates": coordinates, "data": {"class_names": ["alpha", "beta", "gamma"]}},
        model=SimpleNamespace(config={}),
    )
    wandb = RecordingWandb()
    trainer = SimpleNamespace(
        global_step=7,
        loggers=[wandb],
        precision_plugin=SimpleNamespace(forward_context=contextlib.nullcontext),
    )
    callback = SampleGrid(str(tmp_path), per_class=2, sampler="ddim", steps=5, cfg_scale=3.0)
    callback.make_grid(trainer, module, "final.png")
    title = "adaln_zero-DiT-Ti-p4 · step 7 · EMA weights, ddim 5 steps, cfg 3"
    expected = grid_image(
        to_uint8_rgb(images).numpy(),
        [0, 0, 1, 1, 2, 2],
        per_row=2,
        class_names=["alpha", "beta", "gamma"],
        title=title,
    )
    saved = Image.open(tmp_path / "samples" / "final.png")
    assert callback.last_path == tmp_path / "samples" / "final.png"
    assert np.array_equal(np.asarray(saved), np.asarray(expected))
    [(key, [logged], step, kwargs)] = wandb.logged
    assert (key, step, kwargs["caption"]) == ("samples", 7, [title])
    assert np.array_equal(np.asarray(logged), np.asarray(expected))
