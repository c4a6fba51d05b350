"""Network factories: lung segmenters (``unet``, ``resunet``) and the TB scorer.

Every factory takes plain keyword arguments that are stored in the weights' sidecar
JSON (``network``), so :mod:`models.registry` can rebuild the exact network.

* ``unet``    -- MONAI :class:`monai.networks.nets.UNet`, 2-D, channels 16..256, four
  stride-2 levels, ``num_res_units=2`` (the configuration timed in TOOLCHAIN.md §2).
* ``resunet`` -- a deep residual UNet after Zhang, Liu & Wang (arXiv:1711.10684), built
  here from torch blocks: *pre-activation* residual units (norm-ReLU-conv twice, plus a
  1x1 projection shortcut) in the encoder, the bridge and the decoder; downsampling by
  the first stride-2 convolution of each encoder unit (no pooling); decoder = bilinear
  upsampling, concatenation with the encoder feature, residual unit. The paper has three
  levels of 64..512 filters; we use four levels of 16..256 (a 256-px input) and
  instance norm instead of batch norm (batch-1 inference, small training batches).
* ``tb``      -- the TB scorer. ``densenet121`` (MONAI ``DenseNet121``) or ``smallcnn``
  (a VGG-style 5-stage CNN with global average pooling), two input channels
  (lung-cropped image, lung mask), one logit out. Which one ships was chosen by
  validation AUC; see ``models/cards/``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

SEGMENTATION_ARCHS = ("unet", "resunet")
TB_ARCHS = ("densenet121", "smallcnn", "resnet18")

DEFAULT_CHANNELS = (16, 32, 64, 128, 256)


def build_unet(channels: tuple[int, ...] = DEFAULT_CHANNELS, num_res_units: int = 2) -> nn.Module:
    """MONAI UNet: 1 input channel, 1 output logit."""
    from monai.networks.nets import UNet

    return UNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=1,
        channels=tuple(channels),
        strides=(2,) * (len(channels) - 1),
        num_res_units=num_res_units,
    )


class PreActResidualUnit(nn.Module):
    """Zhang et al.'s residual unit: (norm-ReLU-conv) x 2 + projection shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.InstanceNorm2d(cin, affine=True),
            nn.ReLU(inplace=False),
            nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
            nn.InstanceNorm2d(cout, affine=True),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        )
        self.shortcut = (
            nn.Identity()
            if cin == cout and stride == 1
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.InstanceNorm2d(cout, affine=True))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)


class ResUNet(nn.Module):
    """Deep residual UNet (Zhang, Liu & Wang 2018) for 2-D single-channel input."""

    def __init__(self, channels: tuple[int, ...] = DEFAULT_CHANNELS) -> None:
        super().__init__()
        c = list(channels)
        # Stem as in the paper: conv-norm-ReLU-conv with an added 1x1 shortcut.
        self.stem = nn.Sequential(
            nn.Conv2d(1, c[0], 3, padding=1, bias=False),
            nn.InstanceNorm2d(c[0], affine=True),
            nn.ReLU(inplace=True),
            nn.Conv2d(c[0], c[0], 3, padding=1, bias=False),
        )
        self.stem_skip = nn.Conv2d(1, c[0], 1, bias=False)
        self.down = nn.ModuleList(PreActResidualUnit(c[i], c[i + 1], stride=2) for i in range(len(c) - 1))
        self.up = nn.ModuleList(PreActResidualUnit(c[i + 1] + c[i], c[i]) for i in reversed(range(len(c) - 1)))
        self.head = nn.Conv2d(c[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [self.stem(x) + self.stem_skip(x)]
        for unit in self.down:
            feats.append(unit(feats[-1]))
        y = feats.pop()
        for unit in self.up:
            skip = feats.pop()
            y = nn.functional.interpolate(y, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            y = unit(torch.cat([y, skip], dim=1))
        return self.head(y)


class SmallCNN(nn.Module):
    """VGG-style classifier: 5 stages of two conv-BN-ReLU + max-pool, GAP, dropout, linear."""

    def __init__(self, in_channels: int = 2, width: int = 16, dropout: float = 0.3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for i in range(5):
            cout = width * 2**i
            for _ in range(2):
                layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
                cin = cout
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(cin, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_segmenter(arch: str, **kwargs: Any) -> nn.Module:
    """The segmentation network for ``arch`` (``unet`` or ``resunet``); outputs one logit map."""
    if arch == "unet":
        return build_unet(**kwargs)
    if arch == "resunet":
        return ResUNet(**kwargs)
    raise ValueError(f"unknown segmentation arch {arch!r}; choose from {', '.join(SEGMENTATION_ARCHS)}")


def build_tb_scorer(arch: str = "smallcnn", **kwargs: Any) -> nn.Module:
    """The TB classifier for ``arch``; input 2 channels (image, lung mask), output one logit."""
    if arch == "smallcnn":
        return SmallCNN(**kwargs)
    if arch == "densenet121":
        from monai.networks.nets import DenseNet121

        return DenseNet121(spatial_dims=2, in_channels=2, out_channels=1, **kwargs)
    if arch == "resnet18":
        from monai.networks.nets import resnet18

        return resnet18(spatial_dims=2, n_input_channels=2, num_classes=1, **kwargs)
    raise ValueError(f"unknown TB arch {arch!r}; choose from {', '.join(TB_ARCHS)}")


def count_parameters(net: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


class Ensemble(nn.Module):
    """Mean of the members' logits (members share one architecture)."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members]).mean(dim=0)


class Calibrated(nn.Module):
    """A logit network followed by Platt scaling: ``slope * logit + intercept``.

    Wrapped around a loaded TB scorer whose sidecar has a ``calibration`` (see
    :func:`models.registry.calibrate`), so the score ``sigmoid`` of it is a probability. The two
    numbers are plain attributes, not state: the weights file holds the uncalibrated network.
    """

    def __init__(self, net: nn.Module, slope: float, intercept: float) -> None:
        super().__init__()
        if not (slope > 0 and abs(slope) < 1e3 and abs(intercept) < 1e3):
            raise ValueError(f"calibration slope {slope} / intercept {intercept} out of range "
                             "(the slope must be positive so the ranking is kept)")
        self.net = net
        self.slope = float(slope)
        self.intercept = float(intercept)

    def extra_repr(self) -> str:
        # in the repr, so anything keyed on it (the ONNX cache's module digest) tells calibrations apart
        return f"slope={self.slope!r}, intercept={self.intercept!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * self.slope + self.intercept
