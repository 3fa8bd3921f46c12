"""A small from-scratch CNN for tiny images (32 px or less), in the spirit of airbench."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


def conv_bn(c_in: int, c_out: int, act_layer: type[nn.Module] = nn.GELU) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), act_layer()
    )


class Stage(nn.Sequential):
    """conv -> 2x max-pool -> BN -> GELU -> conv -> BN -> GELU: pooling early halves the
    cost of the second convolution. ``act_layer`` replaces GELU (--act)."""

    def __init__(self, c_in: int, c_out: int, act_layer: type[nn.Module] = nn.GELU) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.BatchNorm2d(c_out),
            act_layer(),
            conv_bn(c_out, c_out, act_layer),
        )


class SmallCNN(nn.Module):
    """An optional stem convolution, pooling stages and a global-max-pool linear head.

    ``stem=False`` starts with the first stage on the input: its convolution runs at full
    resolution and pooling follows at once, which is what makes the small-image recipe's
    nets (``small_cnn_16``, ``small_cnn_32``, ``small_cnn_64``; see docs/RECIPES.md) fast."""

    def __init__(self, in_chans: int, num_classes: int,
                 widths: Sequence[int] = (16, 32, 64, 128), stem: bool = True,
                 act_layer: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.stem = conv_bn(in_chans, widths[0], act_layer) if stem else nn.Identity()
        inputs = widths[:-1] if stem else (in_chans, *widths[:-1])
        outputs = widths[1:] if stem else widths
        self.stages = nn.Sequential(*(Stage(c_in, c_out, act_layer)
                                      for c_in, c_out in zip(inputs, outputs)))
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.head = nn.Linear(widths[-1], num_classes)
        if not stem:  # Grad-CAM's layer: see explain.gradcam_layer
            self.cam_rule = "deepest_wide_enough"
        self.feature_info = [  # timm's description of the feature maps, input to output
            *([{"module": "stem", "num_chs": widths[0], "reduction": 1}] if stem else []),
            *({"module": f"stages.{i}", "num_chs": c, "reduction": 2 ** (i + 1)}
              for i, c in enumerate(outputs)),
        ]

    def group_matcher(self, coarse: bool = True) -> dict:
        """timm-style layer groups: the stem, each stage, then the head."""
        return {"stem": r"^stem", "blocks": r"^stages\.(\d+)"}

    def forward(self, x):
        x = self.pool(self.stages(self.stem(x))).flatten(1)
        return self.head(x)


def small_cnn(widths: Sequence[int], stem: bool = False):
    """A named SmallCNN of these stage widths, for the model registry."""
    def create(in_chans: int, num_classes: int,
               act_layer: type[nn.Module] = nn.GELU) -> SmallCNN:
        return SmallCNN(in_chans, num_classes, widths, stem=stem, act_layer=act_layer)
    return create
