"""Classifier heads for any timm body (``--head``): the plain linear head, the residual MLP
head of an X-ray regression document, and the concat-pool head of the reference recipe."""

from __future__ import annotations

import torch
from torch import nn

DEFAULT_HIDDEN = 512  # --head-hidden's default for the heads with a hidden layer
DEFAULT_DROPOUT = 0.5  # --dropout's default for them, when the user leaves it at 0


class LinearHead(nn.Module):
    """The plain head: the body's pooled features, dropout, one linear layer."""

    pools_map = False  # takes the body's own pooled features

    def __init__(self, n_features: int, n_out: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(n_features, n_out)

    def pre_logits(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.dropout(pooled)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pre_logits(pooled))


def hidden_layer(n_in: int, n_out: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, n_out), nn.BatchNorm1d(n_out), nn.ReLU(inplace=True),
                         nn.Dropout(dropout))


class Residual(nn.Module):
    """``x + block(x)``."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class ResidualMLPHead(nn.Module):
    """The body's pooled features through Linear -> BatchNorm -> ReLU -> dropout, a residual
    block of the same, and a linear layer: the whole MLP is the classifier, so features
    precomputed by the frozen body train all of it."""

    pools_map = False

    def __init__(self, n_features: int, n_out: int, hidden: int = DEFAULT_HIDDEN,
                 dropout: float = DEFAULT_DROPOUT) -> None:
        super().__init__()
        self.classifier = nn.Sequential(
            hidden_layer(n_features, hidden, dropout),
            Residual(hidden_layer(hidden, hidden, dropout)),
            nn.Linear(hidden, n_out),
        )

    def pre_logits(self, pooled: torch.Tensor) -> torch.Tensor:
        return pooled

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.classifier(pooled)


class ConcatPoolHead(nn.Module):
    """Pools a feature map two ways (average and max, concatenated) and classifies through
    BatchNorm, dropout, linear, ReLU, BatchNorm, dropout, linear."""

    pools_map = True  # takes the body's feature map and pools it itself

    def __init__(self, n_features: int, n_out: int, hidden: int = DEFAULT_HIDDEN,
                 dropout: float = DEFAULT_DROPOUT) -> None:
        super().__init__()
        self.avg, self.max = nn.AdaptiveAvgPool2d(1), nn.AdaptiveMaxPool2d(1)
        self.classifier = nn.Sequential(
            nn.BatchNorm1d(2 * n_features), nn.Dropout(dropout / 2),
            nn.Linear(2 * n_features, hidden), nn.ReLU(inplace=True),
            nn.BatchNorm1d(hidden), nn.Dropout(dropout),
            nn.Linear(hidden, n_out),
        )

    def pre_logits(self, features: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.avg(features), self.max(features)], dim=1).flatten(1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pre_logits(features))


HEADS: dict[str, type[nn.Module]] = {
    "linear": LinearHead, "mlp": ResidualMLPHead, "concat_pool": ConcatPoolHead,
}
HIDDEN_HEADS = ("mlp", "concat_pool")  # the heads --head-hidden sizes


def resolve_head(kind: str, hidden: int | None, dropout: float) -> tuple[int | None, float]:
    """The hidden size and dropout a head of ``kind`` is built with: --head-hidden's and
    --dropout's defaults (512 and 0.5 for the heads with a hidden layer) filled in; no hidden
    size for the others, and --dropout as given (timm's own head: its drop rate)."""
    if kind not in HIDDEN_HEADS:
        return None, dropout
    return hidden or DEFAULT_HIDDEN, dropout or DEFAULT_DROPOUT


class WithHead(nn.Module):
    """A timm body without its classifier and one of ``HEADS`` on it. It answers the timm
    calls imagefit uses: forward_features (the body's feature map), forward_head (with
    ``pre_logits``: what get_classifier takes) and get_classifier (the head after its
    pooling and dropout)."""

    def __init__(self, body: nn.Module, n_out: int, kind: str = "concat_pool",
                 hidden: int | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        hidden, dropout = resolve_head(kind, hidden, dropout)
        head_class = HEADS[kind]
        if head_class.pools_map:
            body.reset_classifier(0, global_pool="")
        else:
            body.reset_classifier(0)  # keeps the body's own pooling
        self.body = body
        sizes = {"hidden": hidden} if hidden else {}
        self.head = head_class(body.num_features, n_out, dropout=dropout, **sizes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body.forward_features(x)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = self.body.forward_head(features)  # the map itself when the head pools it
        return self.head.pre_logits(pooled) if pre_logits else self.head(pooled)

    def get_classifier(self) -> nn.Module:
        return self.head.classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
