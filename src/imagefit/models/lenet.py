"""A LeNet-style net with SELU, as in a course's MNIST notebook: two conv -> SELU -> max-pool
stages and a classifier with alpha dropout, for small grey or colour images."""

from __future__ import annotations

from torch import nn

POOLED_SIDE = 4  # the stages' map is pooled to this side, whatever the image size


class LeNetSELU(nn.Module):
    """conv 5x5 -> SELU -> 2x max-pool, twice (32 then 64 channels), adaptive average pooling
    to 4x4, then Linear -> SELU -> AlphaDropout -> Linear.

    The convolutions are padded and the pooling rounds up, so an 8 px image keeps a 2 px map;
    the adaptive pooling gives the classifier the same input at 8 px and 28 px. Weights start
    LeCun-normal (variance 1/fan-in), the initialisation under which SELU keeps activations
    near zero mean and unit variance, and alpha dropout keeps them there while training."""

    def __init__(self, in_chans: int, num_classes: int, widths: tuple[int, int] = (32, 64),
                 hidden: int = 256, dropout: float | None = None) -> None:
        super().__init__()
        inputs = (in_chans, widths[0])
        self.stages = nn.Sequential(*(
            nn.Sequential(nn.Conv2d(c_in, c_out, 5, padding=2), nn.SELU(),
                          nn.MaxPool2d(2, ceil_mode=True))
            for c_in, c_out in zip(inputs, widths)))
        self.pool = nn.AdaptiveAvgPool2d(POOLED_SIDE)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(widths[-1] * POOLED_SIDE ** 2, hidden), nn.SELU(),
            nn.AlphaDropout(0.1 if dropout is None else dropout), nn.Linear(hidden, num_classes),
        )
        self.feature_info = [  # timm's description of the feature maps, input to output
            {"module": f"stages.{i}", "num_chs": c, "reduction": 2 ** (i + 1)}
            for i, c in enumerate(widths)
        ]
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, nonlinearity="linear")
                nn.init.zeros_(module.bias)

    def group_matcher(self, coarse: bool = True) -> dict:
        """timm-style layer groups: each stage, then the head."""
        return {"blocks": r"^stages\.(\d+)"}

    def forward(self, x):
        return self.head(self.pool(self.stages(x)))
