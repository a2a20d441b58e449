"""Sampling many images reproducibly, in the reference evaluation's format.

Every image i has its own random stream (`ditlab.diffusion.sampling`, the sampling of training's grids and
FID too), from which its label (when drawn), its starting noise and every step's noise are taken: image i is the same whatever the
batch size, the number of ranks, or how often the job was interrupted. Work is cut into batches; each
finished batch is written atomically as a shard `<out>.parts/<start>-<end>.npz`, so a killed job re-run
with the same arguments skips finished shards. Ranks (torchrun's RANK/WORLD_SIZE) take disjoint ranges of
batches; rank 0 waits for all shards and writes `<out>.npz` in the ADM layout (`arr_0`: N×H×W×3 uint8,
`arr_1`: labels), streamed so that 50,000 images never sit in memory at once, a labelled PNG grid
(`ditlab.grids`), and `<out>.json`, the job's arguments (checkpoint, guidance, sampler, seed...) and the
network evaluations per image it cost (`nfe`), which `evaluate.py` records beside the FID.
"""

import contextlib
import json
import os
import shutil
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from tqdm.auto import tqdm

from ditlab.autoencoders import Autoencoder, IdentityAutoencoder
from ditlab.cli import resolve_device
from ditlab.design import import_registering_modules
from ditlab.diffusion import build_objective
from ditlab.diffusion.labels import check_label_sampling, labels_for
from ditlab.diffusion.sampling import Evaluations, SamplingSpec, guide_options, image_generators, sample
from ditlab.grids import grid_title, save_grid
from ditlab.interop.checkpoints import load_dit, load_guide
from ditlab.interop.formats import LoadedDiT, config_coordinates, describe, resolve_checkpoint
from ditlab.io import atomic_path, atomic_write, atomic_write_text, content_sha256


def to_uint8_rgb(images: Tensor) -> Tensor:
    """Images (N, 1 or 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8, grey replicated, rounded as the reference."""
    if images.shape[1] not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels to be saved, got {images.shape[1]}")
    pixels = (127.5 * images + 128.0).clamp(0, 255).to(torch.uint8)  # 128 = 127.5 + 0.5: rounds
    return pixels.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).contiguous()


def save_npz(path: Path, images: np.ndarray, labels: np.ndarray, evaluations: int | None = None) -> None:
    """Write `arr_0` (images) and `arr_1` (labels) atomically; a shard also keeps `arr_2`, the network
    evaluations (batch rows) its images cost, so that a resumed job still knows its NFE."""
    extra = [] if evaluations is None else [np.int64(evaluations)]
    atomic_write(path, lambda f: np.savez(f, images, labels, *extra))


def _shards_nfe(parts: list[Path], num_samples: int) -> float | None:
    """The network evaluations per image of a job's shards (None when a shard does not record them)."""
    rows = 0
    for part in parts:
        with np.load(part, allow_pickle=False) as shard:
            if "arr_2" not in shard.files:
                return None
            rows += int(shard["arr_2"])
    return rows / num_samples


def concat_npz(path: Path, parts: list[Path]) -> tuple[int, ...]:
    """Concatenate the `arr_0`/`arr_1` of shard files, in order, into one `.npz`, atomically and streaming
    (one shard in memory at a time). Returns the shape of `arr_0`."""
    shapes = {}
    for key in ("arr_0", "arr_1"):
        with np.load(parts[0], allow_pickle=False) as first:
            dtype, rest = first[key].dtype, first[key].shape[1:]
        count = 0
        for part in parts:
            with np.load(part, allow_pickle=False) as shard:
                count += shard[key].shape[0]
        shapes[key] = (count, *rest), dtype
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for key, (shape, dtype) in shapes.items():  # an .npz is a zip of .npy files
            with archive.open(f"{key}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(
                    f, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
                )
                for part in parts:
                    with np.load(part, allow_pickle=False) as shard:
                        f.write(np.ascontiguousarray(shard[key]).tobytes())
    return shapes["arr_0"][0]


@contextlib.contextmanager
def _matmul_precision(precision: str) -> Iterator[None]:
    """TF32 matrix products for "tf32" only (restored afterwards)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def output_paths(out: str | os.PathLike) -> dict[str, Path]:
    """`npz`, `png`, `json` (the job's arguments) and `parts` paths of an output stem (a trailing .npz or
    .png is dropped)."""
    stem = Path(out)
    if stem.suffix in (".npz", ".png"):
        stem = stem.with_suffix("")
    return {ext: stem.with_name(stem.name + "." + ext) for ext in ("npz", "png", "json", "parts")}


class ImageSampler:
    """Images of a loaded DiT by global index: `sampler(indices, labels)` -> ((N, H, W, 3) uint8, labels (N,)).

    Image i comes from its own generator (`image_generators`, seeded by `spec.seed`), so it does not depend
    on which other images share its batch. `spec.precision`: fp32, tf32 (TF32 matrix products) or bf16
    (autocast of the model). Latents are decoded by `autoencoder` (default: the checkpoint's); in pixel
    space x0 is clipped to [-1, 1] at every step (ADM). `evaluations` counts the network evaluations of
    every image it made (`evaluations.per_image`: the NFE). With `spec.guide`, autoguidance by `guide` (a
    DiT from `load_guide`), or, when None, by the checkpoint `spec.guide` names, loaded here; the guide runs
    in the model's precision.
    """

    def __init__(
        self,
        loaded: LoadedDiT,
        spec: SamplingSpec,
        *,
        device: str | torch.device = "cpu",
        autoencoder: Autoencoder | None = None,
        guide: torch.nn.Module | None = None,
    ):
        objective = build_objective(loaded.diffusion)
        model = loaded.model
        self.spec = spec.resolve(objective, in_channels=model.in_channels)  # "auto": the objective's sampler
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.autoencoder = (autoencoder or loaded.build_autoencoder()).to(self.device).eval()
        self.diffusion = objective.to(self.device)
        self.channels = loaded.data.get("channels")
        self.shape = (model.in_channels, model.input_size, model.input_size)
        self.pixel_space = isinstance(self.autoencoder, IdentityAutoencoder)
        self.evaluations = Evaluations()
        if spec.guide is not None and guide is None:
            guide = load_guide(
                spec.guide,
                model.config,
                loaded.diffusion,
                key=f"{spec.key}guide.ckpt",
                autoencoder=loaded.autoencoder,
            )
        self.guide = None if guide is None else guide.to(self.device).eval()

    def _in_precision(self, net: torch.nn.Module) -> Callable[..., Tensor]:
        """`net` called under the spec's precision (bf16 autocast or not), its output in float32; keyword
        tensors beyond (x, t, y) (MeanFlow's second time r) passed on."""

        def call(x: Tensor, t: Tensor, y: Tensor, **kwargs: Tensor) -> Tensor:
            bf16 = self.spec.precision == "bf16"
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
                return net(x, t, y, **kwargs).float()

        return call

    @torch.no_grad()
    def __call__(self, indices: Sequence[int], labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Images of `indices` with `labels` (N,), or labels drawn uniformly from each image's generator."""
        with _matmul_precision(self.spec.precision):
            z, labels = sample(
                self._in_precision(self.model),
                self.diffusion,
                image_generators(self.spec.seed, indices, self.device),
                self.shape,
                self.spec,
                labels=None if labels is None else labels.to(self.device),
                num_classes=self.model.num_classes,
                clip_denoised=self.pixel_space,
                evaluations=self.evaluations,
                guide=None if self.guide is None else self._in_precision(self.guide),
            )
            return to_uint8_rgb(self.autoencoder.decode(z, channels=self.channels)), labels


def _check_manifest(parts: Path, manifest: dict[str, Any]) -> None:
    """Record the arguments of this job in `parts`, or check them against those of an interrupted one."""
    path = parts / "job.json"
    if path.is_file():
        old = json.loads(path.read_text())
        then, now = old.get("checkpoint_sha256"), manifest.get("checkpoint_sha256")
        if then and now and then != now:  # same path and arguments, other weights: training went on
            raise ValueError(
                f"the checkpoint (ckpt=) changed since the shards in {parts} were written (sha256 {then[:12]} "
                f"then, {now[:12]} now), and resuming would mix two sets of weights in one .npz; delete {parts} "
                "to sample anew from the current weights, or choose another out="
            )
        if old != manifest:
            diff = sorted(k for k in old.keys() | manifest.keys() if old.get(k) != manifest.get(k))
            raise ValueError(
                f"{parts} holds shards of a job with other arguments ({', '.join(diff)} differ); rerun with the "
                "same arguments to resume it, or delete that folder / choose another out="
            )
        return
    _write_json(path, manifest)


def _without_nfe(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != "nfe"}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=1))


def _write_grid(
    path: Path, parts: list[Path], count: int, nrow: int, loaded: LoadedDiT, sampler: ImageSampler
) -> None:
    """A PNG grid of the first `count` images of the shards, labelled with `loaded`'s class names and titled
    with its design point and `sampler`'s settings."""
    images, labels, have = [], [], 0
    for part in parts:
        if have >= count:
            break
        with np.load(part, allow_pickle=False) as shard:
            images.append(shard["arr_0"])
            labels.append(shard["arr_1"])
        have += len(images[-1])
    title = grid_title(
        # The model config's coordinates where the file does not record its run's.
        config_coordinates(loaded.model.config) | (loaded.coordinates or {}),
        step=loaded.step,
        weights="EMA" if loaded.weights == "ema" else "raw",
        sampler=sampler.spec.sampler,
        steps=sampler.spec.steps,
        cfg_scale=sampler.spec.cfg_scale,
        guide_scale=sampler.spec.guide_scale,
    )
    save_grid(
        path,
        np.concatenate(images)[:count],
        np.concatenate(labels)[:count].tolist(),
        per_row=nrow,
        class_names=loaded.data.get("class_names"),
        title=title,
    )


def generate(
    loaded: LoadedDiT,
    out: str | os.PathLike,
    spec: SamplingSpec,
    *,
    labels: Sequence[int] | None = None,
    num_samples: int | None = None,
    label_sampling: str = "uniform",
    batch_size: int = 32,
    rank: int = 0,
    world_size: int = 1,
    npz: bool = True,
    png: bool = True,
    png_images: int | None = 64,
    png_nrow: int = 8,
    keep_parts: bool = False,
    progress: bool = True,
    job: dict[str, Any] | None = None,
    checkpoint_sha256: str | None = None,
    device: str | torch.device = "cpu",
    autoencoder: Autoencoder | None = None,
    guide: torch.nn.Module | None = None,
) -> dict[str, Path]:
    """Sample `labels` (one image each) or `num_samples` images with labels as `label_sampling` says
    (`uniform`: drawn per image; `balanced`: image i gets class i mod K, `ditlab.diffusion.labels`); see the
    module docstring.

    `spec`, `device`, `autoencoder`, `guide`: those of `ImageSampler`. The PNG grid shows the first `png_images` images (None: all) in rows
    of `png_nrow`. `job` is extra identifying data (e.g. the checkpoint path) recorded in `<out>.json`
    and checked on resumption; a finished job with the same arguments is not run again.
    `checkpoint_sha256` (`ditlab.io.content_sha256` of the checkpoint, taken before loading it) is
    recorded too: shards of other weights under the same path (a checkpoint overwritten as training went
    on) are refused rather than mixed. Returns the paths written (on rank 0; other ranks return {}).
    """
    if not (npz or png):
        raise ValueError("nothing to write: set npz and/or png")
    if batch_size < 1:
        raise ValueError(
            f"batch_size={batch_size} is out of range: it must be ≥ 1 (images per batch and rank)"
        )
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} of world size {world_size}: need 0 <= rank < world_size")
    num_classes = loaded.model.num_classes
    check_label_sampling(label_sampling, "labels")
    if labels is not None and label_sampling != "uniform":
        raise ValueError(
            f"labels={label_sampling} chooses the labels of num_samples images, and classes= lists them already "
            f"(per_class of each: balanced too): drop one of them"
        )
    if labels is not None:
        labels = [int(label) for label in labels]
        if not labels:
            raise ValueError(
                "labels is empty: give at least one, or None for num_samples uniformly drawn labels"
            )
        bad = [label for label in labels if not 0 <= label < num_classes]
        if bad:
            raise ValueError(f"labels {bad} are outside [0, {num_classes}) for this model")
        num_samples = len(labels)
    if num_samples is None or num_samples < 1:
        raise ValueError(
            f"num_samples={num_samples} is out of range: it must be ≥ 1 (images with uniformly drawn labels)"
        )
    manifest = {
        **(job or {}),
        "checkpoint_sha256": checkpoint_sha256,
        "model_config": loaded.model.config,
        "weights": loaded.weights,
        # classes= as a list; null: uniform; "balanced"
        "labels": labels if label_sampling == "uniform" else label_sampling,
        "num_samples": num_samples,
        "batch_size": batch_size,
        **spec.as_record(),
        "device": torch.device(device).type,  # the kind of device changes the numbers
        "autoencoder": autoencoder.config if autoencoder is not None else loaded.autoencoder,
    }
    manifest = json.loads(json.dumps(manifest))  # as it reads back from <out>.json (tuples as lists)
    paths = output_paths(out)
    wanted = {kind: paths[kind] for kind, on in (("npz", npz), ("png", png)) if on}
    # <out>.json is the manifest and, once finished, the NFE the job cost
    finished = paths["json"].is_file() and _without_nfe(json.loads(paths["json"].read_text())) == manifest
    if finished and all(path.is_file() for path in wanted.values()):  # this very job ran to its end
        return wanted if rank == 0 else {}

    # Checked before any write.
    sample = ImageSampler(loaded, spec, device=device, autoencoder=autoencoder, guide=guide)
    paths["parts"].mkdir(parents=True, exist_ok=True)
    _check_manifest(paths["parts"], manifest)
    shards = [(a, min(a + batch_size, num_samples)) for a in range(0, num_samples, batch_size)]
    shard_path = lambda a, b: paths["parts"] / f"{a:08d}-{b:08d}.npz"  # noqa: E731
    mine = shards[rank * len(shards) // world_size : (rank + 1) * len(shards) // world_size]
    todo = [(a, b) for a, b in mine if not shard_path(a, b).is_file()]
    if todo:
        label_table = torch.tensor(labels) if labels is not None else None
        total, done = sum(b - a for a, b in mine), sum(b - a for a, b in mine if (a, b) not in todo)
        desc = f"sampling (rank {rank}/{world_size})"
        with tqdm(total=total, initial=done, unit="img", desc=desc, disable=not progress or rank != 0) as bar:
            for a, b in todo:
                y = labels_for(label_sampling, range(a, b), num_classes)  # uniform: None, drawn per image
                before = sample.evaluations.rows
                images, y = sample(range(a, b), label_table[a:b] if label_table is not None else y)
                rows = sample.evaluations.rows - before
                save_npz(shard_path(a, b), images.cpu().numpy(), y.cpu().numpy(), evaluations=rows)
                bar.update(b - a)
    if rank != 0:
        return {}

    missing = [s for s in shards if not shard_path(*s).is_file()]
    if missing:
        print(
            f"rank 0: waiting for {len(missing)} shards of other ranks in {paths['parts']} (rerun to resume)"
        )
    while missing:
        time.sleep(2)
        missing = [s for s in missing if not shard_path(*s).is_file()]
    parts = [shard_path(a, b) for a, b in shards]
    if npz:
        concat_npz(paths["npz"], parts)
    if png:
        count = num_samples if png_images is None else min(png_images, num_samples)
        _write_grid(paths["png"], parts, count, png_nrow, loaded, sample)
    nfe = _shards_nfe(parts, num_samples)  # network evaluations per image (a guided step counts 2)
    _write_json(paths["json"], manifest | {"nfe": nfe})  # after the outputs: marks the job finished
    if not keep_parts:
        shutil.rmtree(paths["parts"])
    return wanted


def _guidance_channels(value: int | str, recommended: int | None) -> int | None:
    """`auto` -> the checkpoint's recommendation, `all` -> None, else the number."""
    if value == "auto":
        return recommended
    if value == "all":
        return None
    if isinstance(value, int):
        return value
    raise ValueError(f"guidance_channels must be auto, all or an integer, got {value!r}")


def run_sample(cfg: DictConfig) -> dict[str, Path]:
    """The body of `src/sample.py`: `cfg` is conf/sample.yaml with the command line's overrides."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = resolve_device(cfg.device)  # auto: cuda:LOCAL_RANK, never the global rank
    if device.type == "cuda":
        torch.cuda.set_device(device)

    if cfg.classes is not None and not (OmegaConf.is_list(cfg.classes) and len(cfg.classes)):
        raise ValueError(
            f"classes={cfg.classes} is {'empty' if OmegaConf.is_list(cfg.classes) else 'not a list'}: give the "
            f"classes to sample, e.g. classes=[0,1,2] (per_class={cfg.per_class} images of each), or "
            f"classes=null for num_samples={cfg.num_samples} images with uniformly drawn labels"
        )
    if cfg.classes is not None and cfg.per_class < 1:
        raise ValueError(f"per_class={cfg.per_class} is out of range: it must be ≥ 1 (images of each class)")
    import_registering_modules(cfg)
    spec = SamplingSpec(  # validated before the checkpoint is read; guidance channels once it is loaded
        cfg.sampler.name,
        OmegaConf.to_container(cfg.sampler.options) if cfg.sampler.get("options") else {},
        cfg.steps,
        cfg.cfg_scale,
        None if cfg.cfg_interval is None else list(cfg.cfg_interval),
        seed=cfg.seed,
        precision=cfg.precision,
        **guide_options(cfg.get("guide"), "guide"),  # autoguidance: guide.ckpt, guide.scale
    )
    # The whole file's sha256 (about a second per GB, next to hours of sampling), before it is loaded: a
    # resumed job must not add shards of newer weights to old ones. Size and mtime would miss a copy that
    # keeps them; a hash of parts of the file would miss weights outside those parts.
    checkpoint_sha256 = content_sha256(resolve_checkpoint(cfg.ckpt, cfg.cache_dir))
    job = {"ckpt": str(cfg.ckpt), "use_ema": cfg.use_ema}
    if spec.guide is not None:  # the guide's weights too: a resumed job must not change its guide either
        try:
            job["guide_sha256"] = content_sha256(resolve_checkpoint(spec.guide, cfg.cache_dir))
        except FileNotFoundError as error:
            raise FileNotFoundError(f"guide.ckpt={spec.guide}: {error}") from None
    loaded = load_dit(cfg.ckpt, use_ema=cfg.use_ema, cache_dir=cfg.cache_dir)
    if cfg.vae:
        loaded.autoencoder = {**loaded.autoencoder, "pretrained": cfg.vae}
    guided = _guidance_channels(cfg.guidance_channels, loaded.guidance_channels)
    labels = [c for c in cfg.classes for _ in range(cfg.per_class)] if cfg.classes is not None else None
    name = f"{Path(cfg.ckpt).stem}-{loaded.weights}-{cfg.sampler.name}{cfg.steps}-cfg{cfg.cfg_scale}"
    name += f"-guide{spec.guide_scale:g}-{Path(spec.guide).stem}" if spec.guide is not None else ""
    name += f"-seed{cfg.seed}-" + ("classes" if labels else str(cfg.num_samples))
    name += "-balanced" if cfg.get("labels", "uniform") == "balanced" else ""
    if rank == 0:
        print(
            f"{describe(loaded.model.config)} from {cfg.ckpt} ({loaded.source_format}, {loaded.weights} weights); "
            f"guidance on {'all' if guided is None else guided} channels"
            + (f", autoguidance {spec.guide_scale:g} by {spec.guide}" if spec.guide is not None else "")
            + f"; {world_size} rank(s), {device}"
        )
    guide = None
    if spec.guide is not None:  # from the file hashed above (a released name: the same cache)
        guide = load_guide(
            spec.guide,
            loaded.model.config,
            loaded.diffusion,
            cache_dir=cfg.cache_dir,
            autoencoder=loaded.autoencoder,
        )
    written = generate(
        loaded,
        cfg.out or Path("samples") / name,
        replace(spec, guidance_channels=guided),
        guide=guide,
        labels=labels,
        num_samples=cfg.num_samples,
        label_sampling=check_label_sampling(cfg.get("labels", "uniform"), "labels"),
        batch_size=cfg.batch_size,
        device=device,
        rank=rank,
        world_size=world_size,
        npz=cfg.npz,
        png=cfg.png,
        png_images=None if labels else 64,
        png_nrow=cfg.per_class if labels else 8,
        keep_parts=cfg.keep_parts,
        progress=cfg.progress,
        job=job,
        checkpoint_sha256=checkpoint_sha256,
    )
    for kind, path in written.items():
        print(f"{kind}: {path}")
    return written
