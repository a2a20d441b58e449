"""experiments/class_accuracy.py: the Fréchet distance against closed forms, and the per-class scores."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg

from ditlab.data.fashion_mnist import CLASS_NAMES
from ditlab.grids import grid_image
from ditlab.interop.generation import to_uint8_rgb

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("class_accuracy", ROOT / "experiments" / "class_accuracy.py")
class_accuracy = importlib.util.module_from_spec(spec)
spec.loader.exec_module(class_accuracy)


def test_frechet_distance_matches_the_closed_form():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 5, generator=g, dtype=torch.float64) @ torch.randn(
        5, 5, generator=g, dtype=torch.float64
    )
    b = torch.randn(300, 5, generator=g, dtype=torch.float64) * 2 + 1
    mu = (a.mean(0) - b.mean(0)).numpy()
    ca, cb = np.cov(a.numpy().T), np.cov(b.numpy().T)
    expected = mu @ mu + np.trace(ca + cb - 2 * linalg.sqrtm(ca @ cb).real)
    assert class_accuracy.frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)
    assert class_accuracy.frechet_distance(a, a) == pytest.approx(0, abs=1e-8)
    assert class_accuracy.frechet_distance(a, a + 3) == pytest.approx(5 * 9, rel=1e-8)  # a shift: |mu|² only


def test_scores_of_a_sampler_that_returns_real_images(monkeypatch):
    """Samples that are test images of their own class: every one labelled right, class FD ~0; samples
    from class c + 5: none labelled right, a large class FD."""
    torch.manual_seed(0)
    real_y = torch.arange(10).repeat_interleave(20)
    real_x = torch.rand(200, 1, 32, 32) * 2 - 1
    real_x[:, 0, 0, 0] = real_y / 10  # the class, written in one pixel
    real_x = ((real_x + 1) * 127.5).round() / 127.5 - 1  # values a uint8 image holds exactly
    # Features 20·c·v − c² of that pixel's value v peak at c = 10·v; the head is the identity.
    features = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(1024, 10))
    with torch.no_grad():
        features[1].weight.zero_()
        features[1].weight[:, 0] = torch.arange(10.0) * 20
        features[1].bias.copy_(-(torch.arange(10.0) ** 2))
    head = torch.nn.Identity()
    net = torch.nn.Sequential(*features, head)

    def sampler_drawing_class_plus(shift: int) -> type:
        class Sampler:
            def __init__(self, *args, **kwargs):
                pass

            def __call__(self, indices, labels):  # -> (N, H, W, 3) uint8, labels
                wanted = (labels + shift) % 10
                picks = torch.stack(
                    [torch.nonzero(real_y == c)[i % 20, 0] for i, c in enumerate(wanted.tolist())]
                )
                images = ((real_x[picks] + 1) * 127.5).round().to(torch.uint8)
                return images.permute(0, 2, 3, 1).expand(-1, -1, -1, 3), labels

        return Sampler

    monkeypatch.setattr(class_accuracy, "load_dit", lambda checkpoint: None)
    options = {"per_class": 20, "cfg_scale": 4.0, "sampler": "ddim", "steps": 2, "seed": 0}
    monkeypatch.setattr(class_accuracy, "ImageSampler", sampler_drawing_class_plus(0))
    accuracy, distance, images = class_accuracy.class_scores(net, (real_x, real_y), "ckpt", **options)
    assert accuracy == [1.0] * 10 and images.shape == (200, 1, 32, 32)
    assert max(distance) < 1e-6
    monkeypatch.setattr(class_accuracy, "ImageSampler", sampler_drawing_class_plus(5))
    accuracy, shifted, _ = class_accuracy.class_scores(net, (real_x, real_y), "ckpt", **options)
    assert accuracy == [0.0] * 10 and min(shifted) > 1000


def test_saved_samples_are_read_back_with_their_labels(tmp_path):
    """The FID callback's / sample.py's .npz layout: arr_0 (N, H, W, 3) uint8, arr_1 labels."""
    pixels = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 1), dtype=np.uint8).repeat(3, axis=-1)
    labels = np.array([3, 1, 4, 1, 5, 9])
    np.savez(tmp_path / "s.npz", pixels, labels)
    x, y = class_accuracy.saved_samples(tmp_path / "s.npz")
    assert x.shape == (6, 1, 32, 32) and y.tolist() == labels.tolist()
    assert torch.equal(((x + 1) * 127.5).round().to(torch.uint8)[:, 0], torch.from_numpy(pixels[..., 0]))
    np.savez(tmp_path / "no_labels.npz", pixels)
    with pytest.raises(SystemExit, match="no labels"):
        class_accuracy.saved_samples(tmp_path / "no_labels.npz")


def test_grid_has_a_row_per_class_drawn_of_as_many_images_each(tmp_path):
    """Labels in any order (saved samples): the grid takes each drawn class's first images, as many of
    each as the rarest class has, so that every row is one class (`ditlab.grids`)."""
    images = torch.rand(7, 1, 32, 32) * 2 - 1
    labels = torch.tensor([3, 1, 3, 1, 3, 5, 1])
    class_accuracy.write_grid(tmp_path / "g.png", images, labels, "title", per_row=8)
    expected = grid_image(
        to_uint8_rgb(images[[1, 0, 5]]).numpy(), [1, 3, 5], per_row=1, class_names=CLASS_NAMES, title="title"
    )
    assert np.array_equal(np.asarray(Image.open(tmp_path / "g.png")), np.asarray(expected))
