"""The classifier head of the reference recipe, for any timm body: average and max pooling
concatenated, then BatchNorm, dropout, linear, ReLU, BatchNorm, dropout, linear."""

from __future__ import annotations

import torch
from torch import nn


class ConcatPoolHead(nn.Module):
    """Pools a feature map two ways and classifies through a small MLP."""

    def __init__(self, n_features: int, n_out: int, hidden: int = 512,
                 dropout: float = 0.5) -> None:
        super().__init__()
        self.avg, self.max = nn.AdaptiveAvgPool2d(1), nn.AdaptiveMaxPool2d(1)
        self.classifier = nn.Sequential(
            nn.BatchNorm1d(2 * n_features), nn.Dropout(dropout / 2),
            nn.Linear(2 * n_features, hidden), nn.ReLU(inplace=True),
            nn.BatchNorm1d(hidden), nn.Dropout(dropout),
            nn.Linear(hidden, n_out),
        )

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.avg(features), self.max(features)], dim=1).flatten(1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(features))


class WithHead(nn.Module):
    """A timm body without its pooling and classifier, and a ``ConcatPoolHead``. It answers
    the timm calls imagefit uses: forward_features, forward_head, get_classifier."""

    def __init__(self, body: nn.Module, n_out: int, dropout: float = 0.5) -> None:
        super().__init__()
        body.reset_classifier(0, global_pool="")
        self.body = body
        self.head = ConcatPoolHead(body.num_features, n_out, dropout=dropout)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head.pool(features) if pre_logits else self.head(features)

    def get_classifier(self) -> nn.Module:
        return self.head.classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))
