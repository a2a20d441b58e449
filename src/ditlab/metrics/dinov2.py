"""FD-DINOv2 (Stein et al. 2023, "Exposing flaws of generative model evaluation metrics"; EDM2 reports it beside
FID): the Fréchet distance of DINOv2 ViT-L/14 features, computed like FID (`ditlab.metrics.fid`, torchmetrics
in float64) from `DINOv2Features` instead of the Inception.

The protocol, as the public code of both defines it (dgm-eval, Stein et al.'s; EDM2's `calculate_metrics.py`):

- images as RGB in [0, 255] (grey replicated), resized to 224×224 by bicubic interpolation of the whole image
  (no crop, the aspect ratio not kept). dgm-eval resizes with PIL's bicubic; EDM2 replaced it by
  `F.interpolate(mode="bicubic", antialias=True)`, which is PIL's filter (Keys a = -0.5, widened when
  shrinking) on unrounded values: ditlab does the same, on the float samples of training (no rounding to
  uint8 first) or the uint8 images of an `.npz`. It differs from PIL's float resize by < 5e-3 of 255.
- scaled to [0, 1] and normalised with the ImageNet mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225);
- the CLS token after the final norm (1024-d for ViT-L/14): what the hub's `dinov2_vitl14` returns.
- at 224² the 37×37 position embedding (trained at 518²) is resampled once as the hub's DINOv2 does at every
  forward (bicubic, scale factor (16 + 0.1)/37, no antialiasing), not as timm's `dynamic_img_size` would
  (antialiased, to the exact size): the features are those of the hub's model, whose numbers papers report.

The weights are timm's `vit_large_patch14_dinov2.lvd142m` (the hub's `dinov2_vitl14` converted) by name, or
a local file (`ditlab.encoders`, shared with REPA). Reference statistics: `ditlab.metrics.reference` with this
network (cached under its `identity`); an ADM `.npz`'s stored `mu`/`sigma` are the Inception's and are not
used for it (`stored=False`): its `arr_0` images are.
"""

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ditlab.encoders import EncoderWeightsMissing, encoder_weights, load_encoder
from ditlab.io import content_sha256
from ditlab.metrics.features import _full_fp32

DINOV2_ENCODER = "vit_large_patch14_dinov2.lvd142m"
INPUT_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
POS_EMBED_OFFSET = 0.1  # the hub DINOv2's `interpolate_offset`
CPU_CHUNK = 16  # images per pass on a CPU (ViT-L at 224²: ~0.5 GB of attention scores per 16)


def parse_fd_dinov2(value: Any, key: str) -> bool | str:
    """`true`, `false` or `auto` (as Hydra or a user gives them) → True, False or "auto"; else a ValueError."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "false", "auto"):
        return {"true": True, "false": False}.get(text, "auto")
    raise ValueError(
        f"{key}={value}: must be auto (FD-DINOv2 when its weights are at hand, else FID alone), true "
        "(FD-DINOv2 or refuse) or false"
    )


def fd_dinov2_network(
    mode: bool | str,
    encoder: str = DINOV2_ENCODER,
    path: str | Path | None = None,
    *,
    key: str = "fd_dinov2",
    device: torch.device | str | None = None,
    pretrained: bool = True,
    encoder_kwargs: dict[str, Any] | None = None,
) -> tuple["DINOv2Features | None", str]:
    """The FD-DINOv2 network as `mode` (the value of the option `key`: True, False or "auto") asks, or None
    and the one line that says why (empty for False). The training FID and `evaluate.py` decide alike:

    - True: the network, its weights downloaded if need be; with none at hand an `EncoderWeightsMissing`
      in one line naming `key`.
    - "auto": the network when its weights are at hand (`<key>_encoder_path`, or timm's file in the Hugging
      Face cache: never a download) and `device` is no CPU: ViT-L/14 costs ~155 GFLOP per image, ~2 s on
      two CPU cores, minutes for an FID's few hundred images (True computes it on a CPU all the same).
    """
    if mode is False:
        return None, ""
    options = f"{key}_"
    try:
        if mode == "auto" and pretrained and device is not None and torch.device(device).type == "cpu":
            encoder_weights(encoder, path, key=options, download=False)  # missing weights: that line first
            return None, (
                f"FD-DINOv2 left out on the CPU, FID alone: DINOv2 ViT-L/14 takes ~2 s per image on two CPU "
                f"cores ({key}=true computes it anyway, {key}=false silences this)"
            )
        net = DINOv2Features(
            encoder,
            path,
            pretrained=pretrained,
            download=mode is True,  # auto: only weights already here
            encoder_kwargs=encoder_kwargs,
            key=options,
        )
        return net, ""
    except EncoderWeightsMissing as error:
        if mode is True:
            raise EncoderWeightsMissing(f"{key}=true, but {error}, or set {key}=auto for FID alone") from None
        return None, (
            f"FD-DINOv2 left out, FID alone: {error} ({key}=true downloads them, {key}=false silences this)"
        )


def preprocess(images: Tensor) -> Tensor:
    """(N, 1|3, H, W) uint8 in [0, 255] or float in [0, 1] → (N, 3, 224, 224) float32, as the protocol says
    (module docstring): bicubic (antialiased) resize of the [0, 255] values, then ImageNet normalisation."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"Expected images of shape (N, 3, H, W) or (N, 1, H, W), got {tuple(images.shape)}.")
    if images.dtype == torch.uint8:
        x = images.float()
    elif images.is_floating_point():
        if images.numel() and (images.min() < 0 or images.max() > 1):
            raise ValueError("Float images must lie in [0, 1] (for [-1, 1] images pass (x + 1) / 2).")
        x = images.float() * 255
    else:
        raise ValueError(f"Images must be uint8 or float, got {images.dtype}.")
    x = x.expand(-1, 3, -1, -1)
    x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bicubic", antialias=True) / 255
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def resample_pos_embed(patch_pos_embed: Tensor, grid: int, offset: float = POS_EMBED_OFFSET) -> Tensor:
    """(1, M·M, d) position embeddings of an M×M patch grid → (1, grid², d), as the hub's DINOv2 interpolates
    them: bicubic with scale factor (grid + offset) / M, no antialiasing, in float32."""
    _, n, dim = patch_pos_embed.shape
    m = round(n**0.5)
    if m * m != n:
        raise ValueError(f"position embeddings of {n} patches are not a square grid")
    x = patch_pos_embed.float().reshape(1, m, m, dim).permute(0, 3, 1, 2)
    scale = (grid + offset) / m
    x = F.interpolate(x, scale_factor=(scale, scale), mode="bicubic", antialias=False)
    if x.shape[-2:] != (grid, grid):
        raise ValueError(
            f"resampling {m}×{m} position embeddings gave {tuple(x.shape[-2:])}, not {grid}×{grid}"
        )
    return x.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).to(patch_pos_embed.dtype)


@contextlib.contextmanager
def _ieee_fp32(device_type: str) -> Iterator[None]:
    # The Inception's guard (true float32 convolutions, no autocast), and float32 matrix products, which a
    # ViT is made of: not TF32 (`torch.set_float32_matmul_precision("high")`) on a GPU.
    matmul = torch.backends.cuda.matmul
    previous = matmul.fp32_precision
    matmul.fp32_precision = "ieee"
    try:
        with _full_fp32(device_type):
            yield
    finally:
        matmul.fp32_precision = previous


def _weights_identity(overlay: dict[str, Any]) -> str:
    """Names the weights' content: the Hugging Face cache's blob name (their sha256) or a file's sha256."""
    file = overlay.get("file")
    if file is None:
        return "timm's download"
    path = Path(file)
    blob = path.resolve().name
    digest = blob if len(blob) == 64 and all(c in "0123456789abcdef" for c in blob) else content_sha256(path)
    return f"{path.name}, sha256 {digest[:12]}"


class DINOv2Features(nn.Module):
    """DINOv2 CLS features of images, the FD-DINOv2 network (see the module docstring for the protocol).

    Args:
        encoder: a timm model name (default `vit_large_patch14_dinov2.lvd142m`, DINOv2 ViT-L/14).
        path: local weights (a .safetensors, .pth/.bin or a folder); None: timm's source, through the
            Hugging Face cache (`ditlab.encoders.encoder_weights`).
        pretrained: False leaves the encoder random: tests and cost checks only (its `identity` says so).
        download: whether missing weights may be downloaded (else `EncoderWeightsMissing`).
        encoder_kwargs: more arguments of `timm.create_model` (tests shrink the model).
        key: the options' prefix in error messages, e.g. "callbacks.fid.fd_dinov2_".

    `features(images)` → {"pool": (N, d)} float32, `forward(images)` → (N, d); images as `preprocess` takes
    them. The interface of `InceptionFeatures` (`features`, `num_features`, `identity`), so that
    `ditlab.metrics.reference` computes and caches reference statistics of either.
    """

    def __init__(
        self,
        encoder: str = DINOV2_ENCODER,
        path: str | Path | None = None,
        *,
        pretrained: bool = True,
        download: bool = True,
        encoder_kwargs: dict[str, Any] | None = None,
        key: str = "",
    ) -> None:
        super().__init__()
        if path is not None and not pretrained:
            raise ValueError(f"{key}encoder_path is set but {key}pretrained is false")
        overlay = encoder_weights(encoder, path, key=key, download=download) if pretrained else {}
        kwargs = dict(encoder_kwargs or {})
        net = load_encoder(
            encoder, path=overlay.get("file"), pretrained=pretrained, download=download, key=key, **kwargs
        )
        if getattr(net, "cls_token", None) is None or not hasattr(net, "patch_embed"):
            raise ValueError(
                f"{key}encoder={encoder} is not a ViT with a CLS token: FD-DINOv2 reads that token"
            )
        patch = net.patch_embed.patch_size[0]
        if INPUT_SIZE % patch:
            raise ValueError(
                f"{key}encoder={encoder}: its {patch}px patches do not tile {INPUT_SIZE}² images"
            )
        grid = INPUT_SIZE // patch
        if tuple(net.patch_embed.grid_size) != (grid, grid):
            prefix = 0 if net.no_embed_class else net.num_prefix_tokens
            trained = net.pos_embed.data
            resampled = resample_pos_embed(trained[:, prefix:], grid)
            net.patch_embed.set_input_size(img_size=(INPUT_SIZE, INPUT_SIZE))
            net.pos_embed = nn.Parameter(torch.cat([trained[:, :prefix], resampled], 1), requires_grad=False)
        self.net = net
        self.num_features = net.num_features
        self.encoder_name = encoder
        weights = _weights_identity(overlay) if pretrained else "random weights: not for results"
        if kwargs:
            weights += ", " + ", ".join(f"{k}={v}" for k, v in sorted(kwargs.items()))
        self.identity = f"DINOv2 {encoder} ({weights}), CLS token of {INPUT_SIZE}² bicubic-resized images"

    @property
    def device(self) -> torch.device:
        return self.net.cls_token.device

    @torch.no_grad()
    def features(self, images: Tensor) -> dict[str, Tensor]:
        """{"pool": (N, d)}: the CLS token after the final norm, float32, in true float32 arithmetic."""
        device = self.device
        if device.type == "cpu" and len(images) > CPU_CHUNK:
            return {"pool": torch.cat([self.features(chunk)["pool"] for chunk in images.split(CPU_CHUNK)])}
        x = preprocess(images.to(device))
        with _ieee_fp32(device.type):
            tokens = self.net.forward_features(x)  # (N, prefix + grid², d) after the final norm
        return {"pool": tokens[:, 0].float().contiguous()}

    def forward(self, images: Tensor) -> Tensor:
        return self.features(images)["pool"]
