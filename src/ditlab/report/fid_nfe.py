"""FID against network evaluations (NFE) of one checkpoint: every sampler × steps, one line per sampler.

The body of `src/fid_nfe.py` (options: conf/fid_nfe.yaml). Each point samples `num_samples` images per
sampling seed as `src/sample.py` does (`ImageSampler`: each image its own generator, labels uniform, x0
clipped in pixel space, uint8 images) and scores them with the TF Inception against the reference: the
run's own (its FID callback's reference, or its datamodule's validation images, statistics cached as in
training: `datamodule_reference`) or `ref` (an ADM .npz, an image folder, fashion_mnist_test). Its NFE is
counted as the network runs (`Evaluations`: a guided step counts 2, dopri5 what it took; autoguidance's
guide, `guide.ckpt` with `guide.scale`, loaded once, adds 1 per guided step). A point that
fails (a sampler that does not fit the objective, a non-finite sample) is skipped with one line and the
sweep goes on. Writes `fid_nfe.json` (the points, the skipped ones, the settings and how it was made) and
`fid_vs_nfe.png` into `out`.
"""

import importlib
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ditlab.cli import error_line, resolve_device
from ditlab.diffusion import build_objective
from ditlab.diffusion.labels import labels_for
from ditlab.diffusion.sampling import SAMPLERS, SamplingSpec, check_fits, guide_options
from ditlab.interop.checkpoints import load_dit, load_guide
from ditlab.interop.formats import LoadedDiT, describe, resolve_checkpoint
from ditlab.interop.generation import ImageSampler, _guidance_channels, save_npz
from ditlab.io import atomic_write, atomic_write_text, content_sha256
from ditlab.metrics.features import InceptionFeatures
from ditlab.metrics.fid import PrecomputedFeatures, frechet_metric
from ditlab.metrics.reference import DEFAULT_CACHE_DIR, ReferenceStats, load_reference
from ditlab.provenance import describe_device, git_state, versions
from ditlab.report.figures import plot_fid_vs_nfe

JSON_FILE, FIGURE_FILE = "fid_nfe.json", "fid_vs_nfe.png"


def run_folder(ckpt: str | Path) -> Path | None:
    """The training run a checkpoint belongs to (`<run>/checkpoints/<name>.ckpt` beside `<run>/results.json`
    or `<run>/.hydra/config.yaml`), or None."""
    path = Path(ckpt)
    run = path.parent.parent
    if path.parent.name == "checkpoints" and any(
        (run / name).is_file() for name in ("results.json", ".hydra/config.yaml")
    ):
        return run
    return None


def run_config(run: Path) -> dict[str, Any]:
    """The config a run was trained with: its record's (resolved as run), else `.hydra/config.yaml`'s."""
    record = run / "results.json"
    if record.is_file() and (config := json.loads(record.read_text()).get("config")):
        return config
    saved = OmegaConf.load(run / ".hydra" / "config.yaml")
    return {
        key: OmegaConf.to_container(saved[key], resolve=True)
        for key in ("data", "callbacks", "optim")
        if key in saved
    }


def fid_callback(config: dict[str, Any]) -> dict[str, Any]:
    """A run config's FID callback settings (its `callbacks.fid` node; {} when it trained without one)."""
    return (config.get("callbacks") or {}).get("fid") or {}


def reference_stats(
    cfg: DictConfig, net: InceptionFeatures, device: torch.device
) -> tuple[ReferenceStats, str | None]:
    """The reference statistics (and the cache folder that holds them): `cfg.ref`, else the run's own."""
    if cfg.ref is not None:
        cache_dir = cfg.cache_dir or DEFAULT_CACHE_DIR
        return load_reference(
            cfg.ref, net, cache_dir=cache_dir, batch_size=cfg.batch_size, device=device
        ), cache_dir
    run = run_folder(cfg.ckpt)  # not None: `_check`ed
    return run_reference(run, net, device, cfg.batch_size, cfg.cache_dir, cfg.num_reference_images)


def run_reference(
    run: Path,
    net: InceptionFeatures,
    device: torch.device,
    batch_size: int,
    cache_dir: str | None = None,
    num_reference_images: int | None = None,
) -> tuple[ReferenceStats, str]:
    """The run's own FID reference (and the cache folder that holds it): its FID callback's `reference`, else
    `num_reference_images` (None: the callback's) of its datamodule's validation images, statistics cached
    in `cache_dir` (None: the callback's), as in training."""
    config = run_config(run)
    fid = fid_callback(config)
    cache_dir = cache_dir or fid.get("cache_dir") or DEFAULT_CACHE_DIR
    if fid.get("reference"):
        reference = load_reference(
            fid["reference"], net, cache_dir=cache_dir, batch_size=batch_size, device=device
        )
        return reference, cache_dir
    from hydra.utils import instantiate

    from ditlab.training.callbacks.fid_monitor import datamodule_reference

    datamodule = instantiate(config["data"])
    if datamodule.is_latent:
        raise ValueError(
            f"the run {run} trained on latents: give the images to score against, ref=<an ADM .npz | an image folder>"
        )
    datamodule.prepare_data()
    count = num_reference_images or fid.get("num_reference_images") or 10_000
    return datamodule_reference(datamodule, net, count, cache_dir, batch_size, device), cache_dir


@torch.no_grad()
def fid_point(
    loaded: LoadedDiT,
    spec: SamplingSpec,
    seeds: list[int],
    num_samples: int,
    batch_size: int,
    net: InceptionFeatures,
    reference: ReferenceStats,
    device: torch.device,
    autoencoder: Any,
    guide: torch.nn.Module | None = None,
    labels: str = "uniform",
    samples: Callable[[int], Path] | None = None,
) -> dict[str, Any]:
    """The FID of `num_samples` images per sampling seed as `spec` samples them (with `guide`, the loaded
    guide that `spec.guide` names; `labels` the FID protocol's label sampling, uniform or balanced), and their
    NFE. With `samples`, each seed's images are also kept in `samples(seed)`, an `.npz` as sample.py writes."""
    started = time.monotonic()
    fids, rows, images = {}, 0, 0
    for seed in seeds:
        sampler = ImageSampler(
            loaded, replace(spec, seed=seed), device=device, autoencoder=autoencoder, guide=guide
        )
        metric = frechet_metric(PrecomputedFeatures(net.num_features), reference.mu, reference.sigma)
        kept: list[tuple[torch.Tensor, torch.Tensor]] = []
        for start in range(0, num_samples, batch_size):
            indices = range(start, min(start + batch_size, num_samples))
            classes = labels_for(labels, indices, loaded.model.num_classes, device)  # uniform: None, drawn
            pixels, drawn = sampler(indices, classes)  # (N, H, W, 3) uint8
            metric.update(net(pixels.permute(0, 3, 1, 2)).double().cpu(), real=False)
            if samples is not None:
                kept.append((pixels.cpu(), drawn.cpu()))
        if samples is not None:
            save_npz(samples(seed), *(torch.cat(k).numpy() for k in zip(*kept, strict=True)))
        fid = metric.compute().item()
        if not math.isfinite(fid):
            raise ValueError(f"the FID of sampling seed {seed} is {fid} (non-finite samples?)")
        fids[str(seed)] = fid
        rows, images = rows + sampler.evaluations.rows, images + sampler.evaluations.images
    values = list(fids.values())
    return {
        "fid": statistics.fmean(values),
        "fid_std": statistics.stdev(values) if len(values) > 1 else None,
        "fid_per_seed": fids,
        "nfe": rows / images,
        "seconds": time.monotonic() - started,
    }


def _check(
    cfg: DictConfig,
) -> tuple[list[str], list[int], list[int], dict[str, dict[str, Any]], dict[str, Any]]:
    """The samplers, steps, seeds, per-sampler options and the guide (`SamplingSpec`'s `guide`,
    `guide_scale`), validated before the checkpoint is read."""
    for module in cfg.modules or []:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ValueError(
                f"modules: {module} cannot be imported ({err}); put its package on the Python path"
            ) from None
    lists = {
        key: list(cfg[key]) if OmegaConf.is_list(cfg[key]) else [cfg[key]]
        for key in ("samplers", "steps", "seeds")
    }
    for key, values in lists.items():
        if not values:
            raise ValueError(
                f"{key}=[] is empty: give at least one, e.g. {key}=[{'ddim' if key == 'samplers' else 10}]"
            )
    for key in ("steps", "seeds"):
        bad = [v for v in lists[key] if not isinstance(v, int) or isinstance(v, bool) or v < (key == "steps")]
        if bad:
            raise ValueError(f"{key}={lists[key]}: {bad[0]} is not an integer ≥ {int(key == 'steps')}")
    if cfg.num_samples < 2 or cfg.batch_size < 1:
        raise ValueError(f"num_samples={cfg.num_samples} must be ≥ 2 and batch_size={cfg.batch_size} ≥ 1")
    options = OmegaConf.to_container(cfg.sampler_options) if cfg.sampler_options else {}
    stray = sorted(set(options) - set(lists["samplers"]))
    if stray:
        raise ValueError(f"sampler_options.{stray[0]}: {stray[0]} is not one of samplers={lists['samplers']}")
    for name in lists["samplers"]:  # an unknown name or a bad option ends here, in one line
        if name not in SAMPLERS:
            raise ValueError(f"samplers: {name} is not a sampler; valid: {', '.join(SAMPLERS)}")
        try:
            SamplingSpec(name, options.get(name) or {})
        except ValueError as err:
            raise ValueError(f"sampler_options.{name}: {err}") from None
    guide = guide_options(cfg.get("guide"), "guide")
    SamplingSpec(**guide)  # guide.scale without guide.ckpt (or the reverse) ends here, in one line
    if cfg.ref is None and run_folder(cfg.ckpt) is None:
        raise ValueError(
            f"ref=null scores against the checkpoint's own training run, but {cfg.ckpt} is not in a run's "
            "checkpoints/ folder; give ref=<an ADM .npz | an image folder | fashion_mnist_test>"
        )
    return lists["samplers"], lists["steps"], lists["seeds"], options, guide


def output_folder(cfg: DictConfig) -> Path:
    """`out`, else `<run>/fid_nfe` for a run's checkpoint, else `fid_nfe/<checkpoint name>`; with a guide
    `-guide<scale>-<its name>` added, so that an autoguided sweep does not overwrite the plain one."""
    if cfg.out:
        return Path(cfg.out)
    run = run_folder(cfg.ckpt)
    folder = run / "fid_nfe" if run is not None else Path("fid_nfe") / Path(cfg.ckpt).stem
    guide = guide_options(cfg.get("guide"), "guide")
    if guide["guide"] is not None:
        folder = folder.with_name(f"{folder.name}-guide{guide['guide_scale']:g}-{Path(guide['guide']).stem}")
    return folder


def run_fid_nfe(cfg: DictConfig) -> dict[str, Path]:
    """The body of `src/fid_nfe.py`; returns the paths written (`json`, and `png` when a point succeeded)."""
    samplers, steps, seeds, options, guide_opts = _check(cfg)
    interval = None if cfg.cfg_interval is None else list(cfg.cfg_interval)
    device = resolve_device(cfg.device)
    checkpoint_sha256 = content_sha256(resolve_checkpoint(cfg.ckpt, None))
    loaded = load_dit(cfg.ckpt, use_ema=cfg.use_ema)
    objective = build_objective(loaded.diffusion)
    guide, guide_sha256 = None, None
    if guide_opts["guide"] is not None:  # loaded once for all points; one line when it does not fit
        guide = load_guide(
            guide_opts["guide"],
            loaded.model.config,
            loaded.diffusion,
            map_location=device,
            autoencoder=loaded.autoencoder,
        )
        guide_sha256 = content_sha256(resolve_checkpoint(guide_opts["guide"], None))
    net = InceptionFeatures(cfg.inception).to(device)
    reference, cache_dir = reference_stats(cfg, net, device)
    autoencoder = loaded.build_autoencoder().to(device)
    guided = _guidance_channels(cfg.guidance_channels, loaded.guidance_channels)
    out = output_folder(cfg)
    print(
        f"{describe(loaded.model.config)} from {cfg.ckpt} ({loaded.weights} weights), step {loaded.step}; "
        f"FID of {cfg.num_samples} samples × {len(seeds)} seed(s) against {reference.source}; {device}"
    )

    points: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    for name in samplers:
        sampler_options = options.get(name) or {}
        # An adaptive solver (dopri5) ignores steps: one point.
        for count in steps if SAMPLERS[name].uses_steps else steps[:1]:
            where = {"sampler": name, "steps": count if SAMPLERS[name].uses_steps else None}
            try:
                spec = SamplingSpec(
                    name,
                    sampler_options,
                    count,
                    cfg.cfg_scale,
                    interval,
                    guided,
                    precision=cfg.precision,
                    **guide_opts,
                )
                check_fits(spec.solver(), objective)
                point = (
                    where
                    | {"options": sampler_options}
                    | fid_point(
                        loaded,
                        spec,
                        seeds,
                        cfg.num_samples,
                        cfg.batch_size,
                        net,
                        reference,
                        device,
                        autoencoder,
                        guide,
                    )
                )
            except Exception as error:  # a failing point is reported and skipped: the sweep goes on
                line = error_line(error)
                print(f"skipped {name} {where['steps'] or '(adaptive)'} steps: {line}")
                skipped.append(where | {"error": line})
                continue
            points.append(point)
            spread = f" ± {point['fid_std']:.2f}" if point["fid_std"] is not None else ""
            print(
                f"{name} {where['steps'] or '(adaptive)'} steps: FID {point['fid']:.2f}{spread}, "
                f"NFE {point['nfe']:g} ({point['seconds']:.0f} s)",
                flush=True,
            )

    document = {
        "checkpoint": str(cfg.ckpt),
        "checkpoint_sha256": checkpoint_sha256,
        "model": describe(loaded.model.config),
        "model_config": loaded.model.config,
        "coordinates": loaded.coordinates,
        "step": loaded.step,
        "weights": loaded.weights,
        "num_samples": cfg.num_samples,
        "seeds": seeds,
        "cfg_scale": cfg.cfg_scale,
        "cfg_interval": interval,
        "guidance_channels": guided,
        # Autoguidance: the guide's checkpoint (null: none), its weight, its file's sha256.
        "guide": guide_opts["guide"],
        "guide_scale": guide_opts["guide_scale"],
        "guide_sha256": guide_sha256,
        "precision": cfg.precision,
        "batch_size": cfg.batch_size,
        "reference": reference.source,
        "reference_images": reference.num_images,
        "reference_cache": None if cache_dir is None else str(cache_dir),
        "feature_network": net.identity,
        "points": points,
        "skipped": skipped,
        "device": describe_device(device),
        "git": git_state(),
        "versions": versions(),
    }
    written = {"json": atomic_write_text(out / JSON_FILE, json.dumps(document, indent=1) + "\n")}
    if points:
        guidance = f"cfg {cfg.cfg_scale:g}"
        if guide is not None:
            guidance += f", autoguidance {guide_opts['guide_scale']:g} by {Path(guide_opts['guide']).name}"
        guidance += f" on [{interval[0]:g}, {interval[1]:g}]" if interval else ""
        title = f"{describe(loaded.model.config)}, step {loaded.step}, {guidance}"
        label = f"FID ({cfg.num_samples} samples)"
        figure = plot_fid_vs_nfe(points, title=title, fid_label=label)
        written["png"] = atomic_write(out / FIGURE_FILE, lambda f: figure.savefig(f, format="png"))
    return summarize(points, skipped, written, lambda p: f"{p['sampler']:<16} {p['steps'] or '-':>5} steps")


def summarize(
    points: list[dict[str, Any]],
    skipped: list[dict[str, Any]],
    written: dict[str, Path],
    name: Callable[[dict[str, Any]], str],
) -> dict[str, Path]:
    """A sweep of FID points ends with its summary (each point's `name` and FID, each skipped one's error, the
    files written) and returns `written`; ValueError when every point failed."""
    print(f"\n{len(points)} point(s), {len(skipped)} skipped:")
    for p in points:
        print(f"  {name(p)}  NFE {p['nfe']:>7.1f}  FID {p['fid']:8.2f}")
    for p in skipped:
        print(f"  {name(p)}  skipped: {p['error']}")
    for kind, path in written.items():
        print(f"{kind}: {path}")
    if not points:
        raise ValueError(f"every point failed ({len(skipped)}); see the lines above and {written['json']}")
    return written
