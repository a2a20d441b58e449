"""FID of EMA samples during and at the end of training, against cached reference statistics."""

import math
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import WandbLogger
from torch.utils.data import DataLoader, Subset

from ditlab.diffusion.labels import check_label_sampling, labels_for
from ditlab.diffusion.sampling import Evaluations, SamplingSpec, guide_options
from ditlab.io import atomic_write
from ditlab.training.callbacks.run_record import images_seen, train_compute_gflop, update_run_record


def datamodule_reference(
    datamodule: Any,
    net: torch.nn.Module,
    num_images: int,
    cache_dir: Any,
    batch_size: int,
    device: torch.device,
) -> Any:
    """Statistics of `num_images` images of the datamodule's validation split (its training split when it
    has none), drawn once with a fixed seed, cached under `cache_dir` (the FID reference of a run whose
    `callbacks.fid.reference` is null; also what `experiments/fid_seed_spread.py` compares against)."""
    from ditlab.metrics.reference import cached_reference, reference_from_images

    split = "val" if datamodule.build_dataset("val", random_flip=False) is not None else "train"
    dataset = datamodule.build_dataset(split, random_flip=False)
    n = min(num_images, len(dataset))
    keep = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:n].tolist()
    loader = DataLoader(Subset(dataset, keep), batch_size=batch_size, collate_fn=datamodule.collate_fn)
    batches = ((x + 1) / 2 for x, _ in loader)
    source = f"{type(datamodule).__name__} {split} ({n} images of {datamodule.source})"
    return cached_reference(
        f"{type(datamodule).__name__}-{split}-{datamodule.image_size}px-{n}",
        net,
        lambda: reference_from_images(batches, net, source=source, num_pr_images=0, device=device),
        cache_dir=cache_dir,
        fingerprint=f"{datamodule.source}|{keep[:8]}",
    )


class FIDMonitor(L.Callback):
    """FID of `num_samples` EMA samples against reference statistics, every `every_n_steps` steps (0: never)
    and at the end of training; FD-DINOv2 of the same samples beside it when `fd_dinov2` says so.

    The reference is an ADM `.npz`, an image folder or `fashion_mnist_test` (`reference=`), or, when
    null, `num_reference_images` images of the datamodule's validation split (its training split when it
    has none), drawn once with a fixed seed; its statistics are cached (`cache_dir`). Samples are split
    across ranks (each image seeded by its index, so the set does not depend on the batch size or the
    number of processes: `ditlab.diffusion.sampling`); features are gathered and rank 0 computes the FID with torchmetrics. Logged as `fid`
    with the run's Gflops, parameters and training compute so far (`train_compute_gflop`: masked training's
    masked steps counted at the masked pass, as the paper's Figure 9 counts training compute), and recorded
    in `results.json` with its wall time (`fid_seconds`; each `fid_history` point's `seconds`) and its NFE,
    the network evaluations per image it cost (`fid_nfe`, W&B's too; each point's `nfe`). Features come from the TensorFlow Inception-v3 (see `ditlab.metrics.features`).

    The protocol's options, recorded with every FID (`fid_labels`, `fid_seeds`):
    - `labels`: `uniform` (each image draws its label: the paper's protocol, the default) or `balanced`
      (image i gets class i mod K: equal images per class, the first N mod K classes one more; REPA-E's);
      see `ditlab.diffusion.labels`.
    - `seeds`: the sampling seeds (default `[seed]`: one FID, as before). With several, each seed's
      `num_samples` images give one FID; `fid` is their mean, `fid_std` their standard deviation (n − 1),
      `fid_per_seed` the values (EDM2 reports FID over three seeds).
    - `fd_dinov2`: `auto` (the default: FD-DINOv2 when the encoder's weights are at hand, a local
      `fd_dinov2_encoder_path` or timm's file in the Hugging Face cache, nothing downloaded, and the run is
      not on a CPU; else one line before the first step, and FID alone), `true` (downloads the weights if
      need be; refuses before the first step when there are none), `false`. The encoder: `fd_dinov2_encoder` (timm's name; default
      DINOv2 ViT-L/14) with `fd_dinov2_pretrained=false` and `fd_dinov2_encoder_kwargs` for a random,
      smaller one (tests only). Recorded as `fd_dinov2` (mean over seeds), `fd_dinov2_std`,
      `fd_dinov2_per_seed`, `fd_dinov2_network`; see `ditlab.metrics.dinov2`.

    `guide` ({ckpt, scale}: the run's `guide` node by default): autoguidance by a weaker checkpoint of the
    same objective (`DiTModule.guide_model`, checked and loaded in `setup`, before the first step), recorded
    as `fid_guide` and `fid_guide_scale` and in `fid_sampler`.
    """

    def __init__(
        self,
        output_dir: str,
        every_n_steps: int = 0,
        num_samples: int = 1000,
        reference: str | None = None,
        num_reference_images: int = 10_000,
        sampler: str = "ddim",
        sampler_options: dict[str, Any] | None = None,
        cfg_interval: tuple[float, float] | None = None,
        steps: int = 50,
        cfg_scale: float = 1.0,
        batch_size: int = 100,
        seed: int = 0,
        cache_dir: str | None = None,
        inception: str | None = None,
        save_samples: bool = False,
        labels: str = "uniform",
        seeds: list[int] | None = None,
        fd_dinov2: bool | str = "auto",
        fd_dinov2_encoder: str = "vit_large_patch14_dinov2.lvd142m",
        fd_dinov2_encoder_path: str | None = None,
        fd_dinov2_pretrained: bool = True,
        fd_dinov2_encoder_kwargs: dict[str, Any] | None = None,
        guide: dict[str, Any] | None = None,
    ):
        for key, value, low in (("num_samples", num_samples, 2), ("batch_size", batch_size, 1)):
            if value < low:
                raise ValueError(f"callbacks.fid.{key}={value} must be ≥ {low}")
        if every_n_steps < 0:
            raise ValueError(f"callbacks.fid.every_n_steps={every_n_steps} must be ≥ 0 (0: only at the end)")
        # Validated here, before training, naming the keys as the config spells them.
        self.sampling = SamplingSpec(
            sampler,
            sampler_options,
            steps,
            cfg_scale,
            cfg_interval,
            seed=seed,
            **guide_options(guide, "callbacks.fid.guide"),
            key="callbacks.fid.",
        )
        self.output_dir = Path(output_dir)
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self.reference = reference
        self.num_reference_images = num_reference_images
        self.batch_size = batch_size
        self.cache_dir = cache_dir
        self.inception = inception
        self.save_samples = save_samples
        self.labels = check_label_sampling(labels, "callbacks.fid.labels")
        self.seeds = [seed] if seeds is None else list(seeds)
        if (
            not self.seeds
            or len(set(self.seeds)) != len(self.seeds)
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in self.seeds)
        ):
            raise ValueError(
                f"callbacks.fid.seeds={self.seeds} must be a list of distinct integers (e.g. [0,1,2]), or null "
                "for callbacks.fid.seed alone"
            )
        from ditlab.metrics.dinov2 import parse_fd_dinov2

        self.fd_dinov2 = parse_fd_dinov2(fd_dinov2, "callbacks.fid.fd_dinov2")
        self.fd_dinov2_encoder = fd_dinov2_encoder
        self.fd_dinov2_encoder_path = fd_dinov2_encoder_path
        self.fd_dinov2_pretrained = fd_dinov2_pretrained
        self.fd_dinov2_encoder_kwargs = dict(fd_dinov2_encoder_kwargs or {})
        self.history: list[dict[str, Any]] = []
        self.last_result: dict[str, Any] | None = None
        self._net = None
        self._dinov2 = None  # the FD-DINOv2 network once `prepare_fd_dinov2` found its weights
        self._fd_prepared = False
        self._reference_stats: dict[str, Any] = {}  # by feature network

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Before the first training step: what the FID will need at the end is there (the Inception
        file, the reference source, FD-DINOv2's weights: `prepare_fd_dinov2`), so a run does not train for
        hours and then fail."""
        if stage != "fit" or trainer.fast_dev_run:
            return
        if self.sampling.guide is not None:
            pl_module.guide_model(self.sampling.guide, "callbacks.fid.guide.ckpt")
        if trainer.is_global_zero:
            from ditlab.metrics.features import find_inception_torchscript
            from ditlab.metrics.reference import check_reference_source

            find_inception_torchscript(self.inception)
            if self.reference is not None:
                check_reference_source(self.reference)
            elif trainer.datamodule is not None and trainer.datamodule.is_latent:
                raise ValueError(
                    "FID of a latent-space run needs reference images: set callbacks.fid.reference to an ADM "
                    ".npz (e.g. VIRTUAL_imagenet256_labeled.npz) or an image folder"
                )
        self.prepare_fd_dinov2(trainer)

    def prepare_fd_dinov2(self, trainer: L.Trainer | None = None) -> bool:
        """Loads the FD-DINOv2 network as `fd_dinov2` asks (called by `setup`, before the first step, on every
        rank); returns whether FD-DINOv2 will be computed. `auto` without weights at hand, or on a CPU, prints
        one line (rank 0) and goes on with FID alone (every rank, when any rank cannot compute it); `true`
        without weights raises `EncoderWeightsMissing` in one line naming the key
        (`ditlab.metrics.dinov2.fd_dinov2_network`)."""
        if self._fd_prepared:
            return self._dinov2 is not None
        self._fd_prepared = True
        if self.fd_dinov2 is False:
            return False
        from ditlab.encoders import EncoderWeightsMissing
        from ditlab.metrics.dinov2 import fd_dinov2_network

        missing = None  # `true` without weights: raised on every rank, after the ranks agree
        try:
            self._dinov2, why = fd_dinov2_network(
                self.fd_dinov2,
                self.fd_dinov2_encoder,
                self.fd_dinov2_encoder_path,
                key="callbacks.fid.fd_dinov2",
                device=None if trainer is None else trainer.strategy.root_device,
                pretrained=self.fd_dinov2_pretrained,
                encoder_kwargs=self.fd_dinov2_encoder_kwargs,
            )
        except EncoderWeightsMissing as error:
            self._dinov2, why, missing = None, None, error
        ready, any_missing = self._dinov2 is not None, missing is not None
        if trainer is not None and trainer.world_size > 1:  # no rank left waiting in a collective
            ready = trainer.strategy.reduce_boolean_decision(ready, all=True)
            any_missing = trainer.strategy.reduce_boolean_decision(any_missing, all=False)
        if missing is not None:
            raise missing
        if any_missing:
            raise EncoderWeightsMissing(
                "callbacks.fid.fd_dinov2=true, but another rank has no weights for it"
            )
        if not ready:
            self._dinov2 = None
            if trainer is None or trainer.is_global_zero:
                print(f"[ditlab] {why or 'FD-DINOv2 left out, FID alone: another rank cannot compute it'}")
        return ready

    def network(self, device: torch.device) -> torch.nn.Module:
        if self._net is None:
            from ditlab.metrics.features import InceptionFeatures

            self._net = InceptionFeatures(self.inception)
        return self._net.to(device)

    def reference_stats(self, trainer: L.Trainer, device: torch.device, net: Any = None) -> Any:
        """Reference statistics in the Inception's space (or `net`'s: the FD-DINOv2 network's), computed once
        (and cached on disk)."""
        from ditlab.metrics.reference import DEFAULT_CACHE_DIR, load_reference

        inception = net is None
        net = self.network(device) if inception else net.to(device)
        if net.identity in self._reference_stats:
            return self._reference_stats[net.identity]
        cache_dir = self.cache_dir or DEFAULT_CACHE_DIR
        if self.reference is not None:
            # Another network than the Inception: no precision/recall features, an ADM .npz's own (Inception)
            # statistics not used.
            options = {} if inception else {"num_pr_images": 0, "stored": False}
            stats = load_reference(self.reference, net, cache_dir=cache_dir, device=device, **options)
        else:
            stats = datamodule_reference(
                trainer.datamodule, net, self.num_reference_images, cache_dir, self.batch_size, device
            )
        self._reference_stats[net.identity] = stats
        return stats

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if (
            self.every_n_steps > 0
            and trainer.global_step % self.every_n_steps == 0
            and not trainer.fast_dev_run
        ):
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.fast_dev_run:  # a smoke test of the loop: no FID
            return
        if not self.history or self.history[-1]["step"] != trainer.global_step:
            self.evaluate(trainer, pl_module)

    @torch.no_grad()
    def sample_features(
        self, trainer: L.Trainer, pl_module: L.LightningModule, seed: int | None = None
    ) -> dict[str, torch.Tensor] | None:
        """Features of `num_samples` EMA samples of sampling seed `seed` (default the first of `seeds`),
        generated in shares across the ranks: `fid`, the Inception's pool features (num_samples, 2048), and
        with FD-DINOv2 `fd_dinov2`, the DINOv2 CLS tokens of the same images; None once a SIGTERM has
        arrived (pre-emption must not wait for an FID)."""
        spec = replace(self.sampling, seed=self.seeds[0] if seed is None else seed)
        device, world, rank = pl_module.device, trainer.world_size, trainer.global_rank
        nets = {"fid": self.network(device)}
        if self._dinov2 is not None:
            nets["fd_dinov2"] = self._dinov2.to(device)
        per_rank = math.ceil(self.num_samples / world)
        begin, end = rank * per_rank, min((rank + 1) * per_rank, self.num_samples)
        features = {
            name: torch.zeros(per_rank, net.num_features, device=device) for name, net in nets.items()
        }
        kept: list[tuple[torch.Tensor, torch.Tensor]] = []  # (labels, uint8 images) when save_samples
        self.evaluations = evaluations = Evaluations()  # the NFE of this FID, counted as the network runs
        num_classes = pl_module.model.num_classes
        for start in range(begin, end, self.batch_size):
            if trainer.received_sigterm:
                return None
            indices = range(start, min(start + self.batch_size, end))
            labels = labels_for(self.labels, indices, num_classes, device)  # uniform: None, drawn per image
            with trainer.precision_plugin.forward_context():
                images, labels = pl_module.sample(labels, spec, indices=indices, evaluations=evaluations)
            for name, net in nets.items():
                features[name][start - begin : start - begin + len(indices)] = net((images.float() + 1) / 2)
            if self.save_samples:
                kept.append((labels.cpu(), images.float().cpu()))
        if kept:
            self._save_samples(trainer.global_step, rank, kept, spec.seed if len(self.seeds) > 1 else None)
        if world > 1:
            features = {k: pl_module.all_gather(f).reshape(-1, f.shape[1]) for k, f in features.items()}
            counts = torch.tensor([evaluations.rows, evaluations.images], device=device)
            evaluations.rows, evaluations.images = pl_module.all_gather(counts).reshape(-1, 2).sum(0).tolist()
        return {name: f[: self.num_samples] for name, f in features.items()}

    def _save_samples(
        self, step: int, rank: int, kept: list[tuple[torch.Tensor, torch.Tensor]], seed: int | None = None
    ) -> None:
        """`<output_dir>/samples/fid_step<step>[_seed<s>][_rank<r>].npz` (the seed with several `seeds`) as
        `src/sample.py` writes them: `arr_0` (N, H, W, 3) uint8 and `arr_1` labels (N,), so that the same
        samples can be scored again later (`src/evaluate.py`, `experiments/class_accuracy.py --samples`)."""
        labels = torch.cat([k[0] for k in kept]).numpy()
        images = torch.cat([k[1] for k in kept])  # (N, C, H, W) in [-1, 1]
        pixels = (127.5 * images + 128.0).clamp(0, 255).to(torch.uint8)  # 128 = 127.5 + 0.5: rounds
        pixels = pixels.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy()
        name = f"fid_step{step:07d}{'' if seed is None else f'_seed{seed}'}{f'_rank{rank}' if rank else ''}"
        atomic_write(self.output_dir / "samples" / f"{name}.npz", lambda f: np.savez(f, pixels, labels))

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from ditlab.metrics.fid import PrecomputedFeatures, frechet_metric

        started = time.monotonic()

        skipped = f"[ditlab] SIGTERM: the FID at step {trainer.global_step} is skipped"
        if trainer.received_sigterm:  # Lightning's flag; the training loop has stopped or is stopping
            print(skipped)
            return
        self.prepare_fd_dinov2(trainer)  # done by `setup` in a run: a no-op then
        references = {}
        if trainer.is_global_zero:
            references["fid"] = self.reference_stats(trainer, pl_module.device)
            if self._dinov2 is not None:
                references["fd_dinov2"] = self.reference_stats(trainer, pl_module.device, self._dinov2)
        per_seed: dict[str, list[float]] = {}  # "fid", "fd_dinov2": one value per sampling seed
        rows = images = 0  # the NFE over all seeds' samples
        try:
            for seed in self.seeds:
                features = self.sample_features(trainer, pl_module, seed)
                if features is None:
                    print(skipped)
                    return
                rows, images = rows + self.evaluations.rows, images + self.evaluations.images
                for name, value in features.items():
                    if trainer.is_global_zero:
                        ref = references[name]
                        metric = frechet_metric(PrecomputedFeatures(value.shape[1]), ref.mu, ref.sigma)
                        metric.update(value.double().cpu(), real=False)
                        per_seed.setdefault(name, []).append(metric.compute().item())
        finally:
            if self._dinov2 is not None:  # DINOv2 ViT-L's 300M weights leave the GPU between FIDs
                self._dinov2.to("cpu")
        if not trainer.is_global_zero:
            return
        self.evaluations.rows, self.evaluations.images = rows, images
        # The mean over the seeds (one seed: its value, as before), their standard deviation (n − 1).
        summary = {name: statistics.fmean(values) for name, values in per_seed.items()}
        several = len(self.seeds) > 1
        for name, values in per_seed.items():
            summary |= {f"{name}_std": statistics.stdev(values)} if several else {}
        fid = summary["fid"]
        point = {
            "step": trainer.global_step,
            "images_seen": images_seen(trainer),
            "train_compute_gflop": train_compute_gflop(trainer, pl_module),
            "fid": fid,
            "nfe": self.evaluations.per_image,  # network evaluations per image (a guided step counts 2)
            "seconds": time.monotonic() - started,  # sampling, features and the reference's when not cached
        }
        extra = {k: v for k, v in summary.items() if k != "fid"}  # fid_std, fd_dinov2(_std): what there is
        point |= extra | ({f"{name}_per_seed": v for name, v in per_seed.items()} if several else {})
        self.history.append(point)
        for logger in trainer.loggers:
            logger.log_metrics(
                {"fid": fid, "fid_nfe": point["nfe"], "train_compute_gflop": point["train_compute_gflop"]}
                | extra,
                step=trainer.global_step,
            )
            if isinstance(logger, WandbLogger):
                logger.experiment.summary.update(
                    {
                        "fid": fid,
                        "fid_nfe": point["nfe"],
                        "train_compute_gflop": point["train_compute_gflop"],
                        "fid_num_samples": self.num_samples,
                        "feature_network": self._net.identity,
                        "fid_labels": self.labels,
                        "fid_seeds": self.seeds,
                        "fid_guide": self.sampling.guide,
                        "fid_guide_scale": self.sampling.guide_scale,
                    }
                    | extra
                )
        reference = references["fid"]
        self.last_result = {
            "fid": fid,
            "num_samples": self.num_samples,
            "reference": reference.source,
        } | extra
        spec = self.sampling
        fd_record = {}
        if "fd_dinov2" in per_seed:
            fd_ref = references["fd_dinov2"]
            fd_record = {
                "fd_dinov2": summary["fd_dinov2"],
                "fd_dinov2_std": summary.get("fd_dinov2_std"),
                "fd_dinov2_per_seed": per_seed["fd_dinov2"],
                "fd_dinov2_network": self._dinov2.identity,
                "fd_dinov2_reference": fd_ref.source,
                "fd_dinov2_reference_images": fd_ref.num_images,
            }
        update_run_record(
            self.output_dir,
            fid=fid,
            fid_num_samples=self.num_samples,
            fid_reference=reference.source,
            fid_reference_images=reference.num_images,
            feature_network=self._net.identity,
            fid_sampler=spec.summary(),
            fid_guide=spec.guide,  # autoguidance: the guide's checkpoint (null: none) and weight
            fid_guide_scale=spec.guide_scale,
            fid_nfe=point["nfe"],
            fid_labels=self.labels,
            fid_seeds=self.seeds,
            fid_per_seed=per_seed["fid"],
            fid_std=summary.get("fid_std"),  # null with one seed
            **fd_record,
            fid_history=self.history,
            fid_seconds=point["seconds"],
        )

        def shown(name: str) -> str:
            return f"{summary[name]:.2f}" + (f" ± {summary[f'{name}_std']:.2f}" if several else "")

        fd = f", FD-DINOv2 {shown('fd_dinov2')}" if "fd_dinov2" in summary else ""
        seeds = f", seeds {self.seeds}" if several else ""
        print(
            f"[ditlab] step {trainer.global_step}: FID {shown('fid')}{fd} ({self.num_samples} EMA samples, "
            f"{self.labels} labels{seeds}, {spec.summary()}, NFE {point['nfe']:g}; vs {reference.source})"
        )
