"""FID, sFID, Inception Score, precision/recall, reference statistics and the Inception feature network.

Most tests use a small stub feature network, so that results can be checked against float64 closed forms
(scipy.linalg.sqrtm) in milliseconds; one group runs the real TF Inception on a handful of images.
"""

import json

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from ditlab.data.fashion_mnist import DEBIAN_DIR
from ditlab.metrics import features as features_module
from ditlab.metrics.evaluation import evaluate_samples, format_metrics, write_metrics_json
from ditlab.metrics.features import (
    SPATIAL_CHANNELS,
    TORCHSCRIPT_PIP,
    InceptionFeatures,
    find_inception_torchscript,
    load_inception_torchscript,
    tf1_resize_bilinear,
)
from ditlab.metrics.fid import PrecomputedFeatures, frechet_metric, real_gaussian
from ditlab.metrics.image_sources import iter_image_files, iter_npz_images, list_image_files, npz_image_shape
from ditlab.metrics.inception_score import inception_score
from ditlab.metrics.precision_recall import manifold_radii, precision_recall
from ditlab.metrics.reference import (
    ReferenceStats,
    cached_reference,
    load_reference,
    reference_from_folder,
    reference_from_images,
    reference_from_npz,
)


def frechet_closed_form(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance of the Gaussians fitted to feature sets a, b, in float64 with scipy's sqrtm."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    sigma_a, sigma_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(sigma_a @ sigma_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(sigma_a + sigma_b - 2 * covmean))


def gaussian_features(n: int, d: int, shift: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) / np.sqrt(d) + shift


class StubFeatures(nn.Module):
    """Stand-in for InceptionFeatures: 12-d pool (2×2 RGB means), 9-d spatial, 5 logits; instant and exact."""

    identity = "stub feature network"
    num_features = 12

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("logit_weight", torch.linspace(-3, 3, 5 * 12).reshape(5, 12))

    def features(self, images: Tensor) -> dict[str, Tensor]:
        x = (images.float() / 255 if images.dtype == torch.uint8 else images).expand(-1, 3, -1, -1)
        pool = F.adaptive_avg_pool2d(x, 2).flatten(1)
        return {
            "pool": pool,
            "spatial": F.adaptive_avg_pool2d(x[:, :1], 3).flatten(1),
            "logits": pool @ self.logit_weight.T,
        }

    def forward(self, images: Tensor) -> Tensor:
        return self.features(images)["pool"]


def random_images(n: int, seed: int, size: int = 8, high: int = 256) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, high, (n, size, size, 3), dtype=np.uint8)


def stub_features_of(images: np.ndarray) -> dict[str, np.ndarray]:
    out = StubFeatures().features(torch.from_numpy(images).permute(0, 3, 1, 2))
    return {k: v.double().numpy() for k, v in out.items()}


# FID and sFID -----------------------------------------------------------------------------------------------


def test_fid_matches_closed_form_frechet_distance():
    real, fake = gaussian_features(400, 16, 0.0, seed=0), gaussian_features(300, 16, 0.5, seed=1)
    metric = frechet_metric(PrecomputedFeatures(16))
    metric.update(torch.from_numpy(real), real=True)
    metric.update(torch.from_numpy(fake), real=False)
    fid = metric.compute()
    assert fid.dtype == torch.float64
    assert fid.item() == pytest.approx(frechet_closed_form(real, fake), rel=1e-9)


def test_fid_of_a_set_against_itself_is_zero():
    features = torch.from_numpy(gaussian_features(200, 16, 1.0, seed=2))
    metric = frechet_metric(PrecomputedFeatures(16))
    metric.update(features, real=True)
    metric.update(features, real=False)
    assert abs(metric.compute().item()) < 1e-8


def test_fid_does_not_depend_on_batch_split():
    real, fake = (
        torch.from_numpy(gaussian_features(256, 8, 0.0, 3)),
        torch.from_numpy(gaussian_features(256, 8, 1, 4)),
    )
    whole, split = frechet_metric(PrecomputedFeatures(8)), frechet_metric(PrecomputedFeatures(8))
    whole.update(real, real=True)
    whole.update(fake, real=False)
    for chunk in real.split(37):
        split.update(chunk, real=True)
    for chunk in fake.split(5):
        split.update(chunk, real=False)
    assert split.compute().item() == pytest.approx(whole.compute().item(), rel=1e-10)


def test_reference_statistics_load_into_the_metric_and_survive_reset():
    real, fake = gaussian_features(500, 16, 0.0, seed=5), gaussian_features(300, 16, 0.3, seed=6)
    expected = frechet_closed_form(real, fake)
    for num_images in (500, None):  # the count only scales the stored sums
        metric = frechet_metric(PrecomputedFeatures(16), real.mean(0), np.cov(real, rowvar=False), num_images)
        metric.update(torch.from_numpy(fake), real=False)
        assert metric.compute().item() == pytest.approx(expected, rel=1e-9)
        metric.reset()  # keeps the reference (reset_real_features=False), drops the samples
        metric.update(torch.from_numpy(real), real=False)
        assert abs(metric.compute().item()) < 1e-8


def test_real_gaussian_is_the_sample_mean_and_unbiased_covariance():
    features = gaussian_features(100, 6, 2.0, seed=7)
    metric = frechet_metric(PrecomputedFeatures(6))
    metric.update(torch.from_numpy(features), real=True)
    mu, sigma = real_gaussian(metric)
    np.testing.assert_allclose(mu, features.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(features, rowvar=False), rtol=1e-9, atol=1e-12)


def test_feature_and_statistics_shape_mismatch_are_clear_errors():
    with pytest.raises(ValueError, match="does not match the reference"):
        frechet_metric(PrecomputedFeatures(16)).update(torch.zeros(4, 8), real=False)
    with pytest.raises(ValueError, match="expected"):
        frechet_metric(PrecomputedFeatures(16), np.zeros(8), np.eye(8))


# precision / recall -----------------------------------------------------------------------------------------


def test_manifold_radii_on_a_grid():
    points = torch.tensor([[float(i), 0.0] for i in range(10)])  # on a line, unit spacing
    radii = manifold_radii(points, k=3, batch_size=4)
    # 3rd nearest other point: at the ends it is 3 away, one step in 2 (1, 1, 2 on the short side), inside 2.
    expected = torch.tensor([3.0, 2, 2, 2, 2, 2, 2, 2, 2, 3])
    torch.testing.assert_close(radii, expected)


def test_precision_recall_known_answers():
    rng = torch.Generator().manual_seed(0)
    cluster_a = torch.randn(60, 5, generator=rng)
    cluster_b = torch.randn(60, 5, generator=rng) + 100.0
    assert precision_recall(cluster_a, cluster_a.clone()) == (1.0, 1.0)
    assert precision_recall(cluster_a, cluster_b) == (0.0, 0.0)
    # Samples cover one of the reference's two clusters: all samples are real-looking, half the reference is missed.
    assert precision_recall(torch.cat([cluster_a, cluster_b]), cluster_a) == (1.0, 0.5)


def test_precision_recall_does_not_depend_on_batch_size():
    rng = torch.Generator().manual_seed(1)
    real, fake = torch.randn(150, 8, generator=rng), torch.randn(130, 8, generator=rng) * 1.3 + 0.3
    precision, recall = precision_recall(real, fake, batch_size=1000)
    assert 0 < precision < 1 and 0 < recall < 1
    assert precision_recall(real, fake, batch_size=16) == (precision, recall)


def test_precision_recall_rejects_too_few_points():
    with pytest.raises(ValueError, match="more than 3 points"):
        precision_recall(torch.zeros(3, 4), torch.zeros(10, 4))


# Inception Score --------------------------------------------------------------------------------------------


def test_inception_score_closed_forms():
    assert inception_score(torch.zeros(100, 1008)) == pytest.approx(1.0, abs=1e-12)  # p(y|x) = p(y)
    confident = torch.full((100, 10), -50.0)
    confident[torch.arange(100), torch.arange(100) % 10] = (
        50.0  # certain and balanced: IS = number of classes
    )
    assert inception_score(confident) == pytest.approx(10.0, rel=1e-9)


def test_inception_score_matches_float64_reference_with_ordered_splits():
    logits = torch.randn(100, 7, generator=torch.Generator().manual_seed(0)) * 3
    p = scipy.special.softmax(logits.double().numpy(), axis=1)
    scores = []
    for start in range(0, 100, 30):  # splits of 30, 30, 30, 10, in order
        part = p[start : start + 30]
        scores.append(np.exp(np.mean(np.sum(part * (np.log(part) - np.log(part.mean(0))), axis=1))))
    assert inception_score(logits, split_size=30) == pytest.approx(np.mean(scores), rel=1e-12)


# image sources ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_images_stream_in_batches(tmp_path, save):
    images = random_images(23, seed=0, size=5)
    save(tmp_path / "s.npz", arr_0=images)
    assert npz_image_shape(tmp_path / "s.npz") == (23, 5, 5, 3)
    batches = list(iter_npz_images(tmp_path / "s.npz", batch_size=10))
    assert [b.shape[0] for b in batches] == [10, 10, 3]
    assert batches[0].shape[1:] == (3, 5, 5) and batches[0].dtype == torch.uint8
    np.testing.assert_array_equal(torch.cat(batches).permute(0, 2, 3, 1).numpy(), images)


def test_npz_images_grey_and_bad_inputs(tmp_path):
    np.savez(tmp_path / "grey.npz", arr_0=random_images(4, 0)[..., 0])
    assert next(iter_npz_images(tmp_path / "grey.npz", 8)).shape == (4, 1, 8, 8)
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((4, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        npz_image_shape(tmp_path / "float.npz")
    with pytest.raises(ValueError, match="no array `images`"):
        npz_image_shape(tmp_path / "grey.npz", key="images")


def test_image_folder_batches_split_where_the_size_changes(tmp_path):
    for i, size in enumerate([8, 8, 8, 6, 6]):
        Image.fromarray(random_images(1, i, size)[0]).save(tmp_path / f"{i}.png")
    Image.fromarray(random_images(1, 9)[0, ..., 0]).save(tmp_path / "sub_grey.png")  # grey → RGB
    (tmp_path / "notes.txt").write_text("not an image")
    files = list_image_files(tmp_path)
    assert len(files) == 6
    shapes = [tuple(b.shape) for b in iter_image_files(files, batch_size=2)]
    assert shapes == [(2, 3, 8, 8), (1, 3, 8, 8), (2, 3, 6, 6), (1, 3, 8, 8)]


# reference statistics ---------------------------------------------------------------------------------------


def test_reference_stats_save_load_round_trip(tmp_path):
    reference = ReferenceStats(
        np.arange(3.0), np.eye(3), None, None, np.ones((4, 3), np.float32), None, "src", "net"
    )
    reference.save(tmp_path / "ref.npz")
    loaded = ReferenceStats.load(tmp_path / "ref.npz")
    np.testing.assert_array_equal(loaded.mu, reference.mu)
    np.testing.assert_array_equal(loaded.pool_features, reference.pool_features)
    assert (loaded.mu_s, loaded.num_images, loaded.source, loaded.network) == (None, None, "src", "net")
    assert [p.name for p in tmp_path.iterdir()] == ["ref.npz"]  # no temporary file left


def test_reference_from_adm_npz_keeps_the_stored_statistics(tmp_path):
    images = random_images(20, seed=0)
    stats = {"mu": np.full(12, 0.5), "sigma": np.eye(12), "mu_s": np.zeros(9), "sigma_s": 2 * np.eye(9)}
    np.savez(tmp_path / "adm.npz", arr_0=images, **stats)
    reference = reference_from_npz(tmp_path / "adm.npz", StubFeatures(), num_pr_images=15)
    for key, value in stats.items():
        np.testing.assert_array_equal(getattr(reference, key), value)
    np.testing.assert_allclose(reference.pool_features, stub_features_of(images)["pool"][:15], rtol=1e-6)
    assert "as stored in adm.npz" in reference.network
    np.savez(tmp_path / "stats_only.npz", **stats)
    assert reference_from_npz(tmp_path / "stats_only.npz", StubFeatures()).pool_features is None
    np.savez(tmp_path / "neither.npz", labels=np.zeros(3))
    with pytest.raises(ValueError, match="needs `arr_0` images or `mu` and `sigma`"):
        reference_from_npz(tmp_path / "neither.npz", StubFeatures())


def test_reference_from_folder_matches_the_images_statistics(tmp_path):
    images = random_images(30, seed=1)
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"{i:02d}.png")
    reference = reference_from_folder(tmp_path, StubFeatures(), batch_size=7)
    pool = stub_features_of(images)["pool"]
    np.testing.assert_allclose(reference.mu, pool.mean(0), rtol=1e-6)
    np.testing.assert_allclose(reference.sigma, np.cov(pool, rowvar=False), rtol=1e-5, atol=1e-9)
    assert reference.num_images == 30 and reference.pool_features.shape == (30, 12)


@pytest.mark.skipif(not DEBIAN_DIR.is_dir(), reason="Fashion-MNIST is not installed")
def test_fashion_mnist_reference_sees_the_padded_training_images():
    seen = set()

    class Recorder(StubFeatures):
        def features(self, images: Tensor) -> dict[str, Tensor]:
            border = torch.cat([images[..., :2, :], images[..., -2:, :]], dim=-2).amax().item()
            seen.add((images.dtype, tuple(images.shape[1:]), border))
            return super().features(images)

    reference = load_reference("fashion_mnist_test", Recorder(), cache_dir=None, num_pr_images=100)
    assert seen == {(torch.uint8, (1, 32, 32), 0)}  # 28×28 zero-padded to 32×32, as in training
    assert reference.num_images == 10_000 and reference.pool_features.shape == (100, 12)
    assert reference.source == "Fashion-MNIST test, 32×32"


def test_load_reference_caches_by_source_and_network(tmp_path, monkeypatch):
    np.savez(tmp_path / "ref.npz", arr_0=random_images(10, seed=2))
    net, calls = StubFeatures(), []
    monkeypatch.setattr(net, "features", lambda x, f=net.features: calls.append(len(x)) or f(x))
    first = load_reference(tmp_path / "ref.npz", net, cache_dir=tmp_path / "cache")
    second = load_reference(tmp_path / "ref.npz", net, cache_dir=tmp_path / "cache")
    assert calls == [10]  # the second call read the cache
    np.testing.assert_array_equal(first.sigma, second.sigma)
    net.identity = "another network"
    load_reference(tmp_path / "ref.npz", net, cache_dir=tmp_path / "cache")
    assert calls == [10, 10] and len(list((tmp_path / "cache").iterdir())) == 2
    with pytest.raises(FileNotFoundError, match=r"neither an \.npz file, an image folder"):
        load_reference(tmp_path / "missing.npz", net, cache_dir=None)


def test_reference_from_a_loader_of_labelled_batches_cached_by_name(tmp_path):
    images = torch.from_numpy(random_images(24, seed=3)).permute(0, 3, 1, 2)
    loader = [(x.float() / 255, torch.zeros(len(x))) for x in images.split(10)]  # (images, labels) batches
    net, calls = StubFeatures(), []

    def compute() -> ReferenceStats:
        calls.append(1)
        return reference_from_images(loader, net, source="toy loader", num_pr_images=16)

    first = cached_reference("toy/loader v1", net, compute, cache_dir=tmp_path)
    second = cached_reference("toy/loader v1", net, compute, cache_dir=tmp_path)
    assert len(calls) == 1 and second.source == "toy loader" and second.pool_features.shape == (16, 12)
    np.testing.assert_allclose(
        first.mu, stub_features_of(random_images(24, seed=3))["pool"].mean(0), rtol=1e-6
    )
    assert [p.name.startswith("toy_loader_v1-") for p in tmp_path.iterdir()] == [True]


# end to end with the stub network ---------------------------------------------------------------------------


def test_evaluate_samples_matches_closed_forms(tmp_path):
    samples, ref_images = random_images(40, seed=3, high=200), random_images(50, seed=4)
    np.savez(tmp_path / "samples.npz", arr_0=samples)
    np.savez(tmp_path / "ref.npz", arr_0=ref_images)
    net = StubFeatures()
    reference = load_reference(tmp_path / "ref.npz", net, cache_dir=None, batch_size=16)
    results = evaluate_samples(tmp_path / "samples.npz", reference, net, batch_size=16)
    fake, real = stub_features_of(samples), stub_features_of(ref_images)
    assert results["fid"] == pytest.approx(frechet_closed_form(real["pool"], fake["pool"]), rel=1e-5)
    assert results["sfid"] == pytest.approx(frechet_closed_form(real["spatial"], fake["spatial"]), rel=1e-5)
    assert results["inception_score"] == pytest.approx(
        inception_score(torch.from_numpy(fake["logits"])), rel=1e-6
    )
    expected_pr = precision_recall(
        torch.from_numpy(real["pool"]).float(), torch.from_numpy(fake["pool"]).float()
    )
    assert (results["precision"], results["recall"]) == pytest.approx(expected_pr)
    assert results["num_samples"] == 40 and results["feature_network"] == "stub feature network"

    path = write_metrics_json(results, tmp_path / "samples.npz")
    assert path == tmp_path / "samples.metrics.json"
    assert json.loads(path.read_text())["fid"] == results["fid"]
    assert "stub feature network" in format_metrics(results)


def test_fid_metric_on_images_with_a_feature_network():
    # The training-time route: torchmetrics runs the feature network on images, the reference is N(mu, sigma).
    real, fake = random_images(40, seed=8), random_images(30, seed=9, high=180)
    real_pool, fake_pool = stub_features_of(real)["pool"], stub_features_of(fake)["pool"]
    metric = frechet_metric(StubFeatures(), real_pool.mean(0), np.cov(real_pool, rowvar=False), num_images=40)
    for batch in torch.from_numpy(fake).permute(0, 3, 1, 2).split(8):
        metric.update(batch, real=False)
    assert metric.compute().item() == pytest.approx(frechet_closed_form(real_pool, fake_pool), rel=1e-5)


def test_evaluate_samples_against_themselves(tmp_path):
    np.savez(tmp_path / "samples.npz", arr_0=random_images(40, seed=5))
    net = StubFeatures()
    reference = load_reference(tmp_path / "samples.npz", net, cache_dir=None)
    results = evaluate_samples(tmp_path / "samples.npz", reference, net, batch_size=9)
    assert abs(results["fid"]) < 1e-6 and abs(results["sfid"]) < 1e-6
    assert (results["precision"], results["recall"]) == (1.0, 1.0)
    assert "nfe" not in results  # no sample.py job record beside the samples


def test_evaluate_samples_records_the_nfe_of_sample_py_s_job(tmp_path):
    np.savez(tmp_path / "samples.npz", arr_0=random_images(20, seed=5))
    job = {
        "sampler": "unipc",
        "steps": 10,
        "cfg_scale": 1.5,
        "seed": 2,
        "checkpoint_sha256": "x",
        "nfe": 20.0,
    }
    (tmp_path / "samples.json").write_text(json.dumps(job))
    net = StubFeatures()
    reference = load_reference(tmp_path / "samples.npz", net, cache_dir=None)
    results = evaluate_samples(tmp_path / "samples.npz", reference, net)
    assert results["nfe"] == 20.0
    assert results["sampling"] == {"sampler": "unipc", "steps": 10, "cfg_scale": 1.5, "seed": 2}
    assert "NFE              20.0" in format_metrics(results)


def test_evaluate_samples_reports_what_it_cannot_compute(tmp_path):
    np.savez(tmp_path / "samples.npz", arr_0=random_images(20, seed=6))
    reference = ReferenceStats(np.zeros(12), np.eye(12), None, None, None, 1000, "stats only", "stub")

    class NoLogits(StubFeatures):
        def features(self, images: Tensor) -> dict[str, Tensor]:
            return {k: v for k, v in super().features(images).items() if k != "logits"}

    results = evaluate_samples(tmp_path / "samples.npz", reference, NoLogits())
    assert results["fid"] > 0
    assert [results[k] for k in ("sfid", "inception_score", "precision", "recall")] == [None] * 4
    assert len(results["notes"]) == 3 and "pt_inception-2015-12-05-6726825d.pth" in results["notes"][1]


# the real TF Inception --------------------------------------------------------------------------------------


def test_tf1_resize_bilinear_closed_forms():
    x = torch.rand(2, 3, 7, 7)
    torch.testing.assert_close(tf1_resize_bilinear(x, 7), x)
    ramp = torch.arange(10.0).expand(1, 1, 10, 10)  # value = column index
    out = tf1_resize_bilinear(ramp, 25)
    expected = (torch.arange(25.0) * 10 / 25).clamp(max=9)  # sample at i·in/out, clamped at the last column
    torch.testing.assert_close(out[0, 0], expected.expand(25, 25))


def test_missing_fid_helper_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(features_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=f"`{TORCHSCRIPT_PIP}`"):
        find_inception_torchscript()


@pytest.fixture(scope="module")
def inception() -> InceptionFeatures:
    return InceptionFeatures()


def test_folded_inception_agrees_with_the_torchscript_graph(inception):
    # The folded network against the TorchScript file's own forward on the same preprocessed images, 9 of them
    # so that the CPU path runs one chunk of 8 and one of 1.
    layers, _ = load_inception_torchscript()
    images = torch.from_numpy(random_images(9, seed=3, size=32)).permute(0, 3, 1, 2)
    out = inception.features(images)
    with torch.no_grad():
        x = inception.preprocess(images)
        for name, layer in layers.named_children():
            if name == "mixed_6":
                spatial = layer.conv(x)[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)
            x = layer(x)
    for ours, graph in ((out["pool"], x.flatten(1)), (out["spatial"], spatial)):
        assert (ours - graph).abs().max() <= 1e-5 * graph.abs().max()  # float32 rounding, another order


def test_average_pool_tower_commutes_its_conv_in_float64():
    # relu(bn(conv1x1(avg_pool(x)))), the TF graph's order, against the tower's conv-then-pool, in float64 where
    # only the exact algebra is left; the pool counts no padding, so border pixels average fewer inputs.
    g = torch.Generator().manual_seed(0)
    node = nn.Module()
    for name, shape in (("weight", (5, 6, 1, 1)), ("beta", (5,)), ("mean", (5,))):
        setattr(node, name, torch.randn(shape, generator=g, dtype=torch.float64))
    node.var, node.stride, node.padding = torch.rand(5, generator=g, dtype=torch.float64) + 0.5, 1, 0
    x = torch.randn(2, 6, 7, 7, generator=g, dtype=torch.float64)
    pooled = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    graph = F.batch_norm(F.conv2d(pooled, node.weight), node.mean, node.var, None, node.beta, eps=1e-3).relu()
    torch.testing.assert_close(features_module._Tower([node], pool="avg")(x), graph, rtol=1e-12, atol=1e-12)
    node.weight = torch.randn(5, 6, 3, 3, generator=g, dtype=torch.float64)
    with pytest.raises(ValueError, match="one 1×1 conv"):
        features_module._Tower([node], pool="avg")


def test_real_inception_features(inception):
    images = torch.from_numpy(random_images(2, seed=7, size=16)).permute(0, 3, 1, 2)
    precision_flag = torch.backends.cudnn.conv.fp32_precision
    with torch.autocast("cpu", dtype=torch.bfloat16):  # ignored: the features are computed in float32
        out = inception.features(images)
    assert torch.backends.cudnn.conv.fp32_precision == precision_flag  # restored after the forward pass
    assert out["pool"].shape == (2, 2048) and out["spatial"].shape == (2, 17 * 17 * 7) and "logits" not in out
    assert torch.isfinite(out["pool"]).all() and (out["pool"] >= 0).all() and out["pool"].std() > 0
    assert out["pool"].dtype == torch.float32 and torch.equal(inception(images), out["pool"])  # deterministic
    torch.testing.assert_close(inception(images.float() / 255), out["pool"], rtol=1e-4, atol=1e-4)
    grey = images[:, :1]
    torch.testing.assert_close(inception(grey), inception(grey.expand(-1, 3, -1, -1)))
    x = inception.preprocess(torch.tensor([0, 255], dtype=torch.uint8).reshape(1, 1, 1, 2))
    assert (x.min().item(), x.max().item()) == (-1.0, 0.9921875)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        inception(images.float() / 127.5 - 1)


def test_inception_logits_from_classifier_weights(tmp_path, inception):
    weight = torch.randn(1008, 2048, generator=torch.Generator().manual_seed(0))
    torch.save({"fc.weight": weight, "fc.bias": torch.zeros(1008)}, tmp_path / "fc.pth")
    net = InceptionFeatures(fc_weights_path=tmp_path / "fc.pth")
    images = torch.from_numpy(random_images(2, seed=8)).permute(0, 3, 1, 2)
    out = net.features(images)
    torch.testing.assert_close(out["logits"], inception(images) @ weight.T)
    torch.save({"conv.weight": weight}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"no \(1008, 2048\) `fc\.weight`"):
        InceptionFeatures(fc_weights_path=tmp_path / "other.pth")
    with pytest.raises(FileNotFoundError, match=r"pt_inception-2015-12-05-6726825d\.pth"):
        InceptionFeatures(fc_weights_path=tmp_path / "missing.pth")
