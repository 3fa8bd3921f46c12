"""A character-level CNN for short texts (names, words): an embedding of each character,
1-D convolutions of several context widths over them, the strongest response of each filter
anywhere in the text (max-pooling over time, padding masked out), then an MLP head."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import ImagefitError

PAD = 0  # data.text.PAD: padding's index, never a character


class CharCNN(nn.Module):
    """Texts as (B, L) character indices -> (B, n_out) raw outputs."""

    def __init__(self, vocabulary_size: int, n_out: int, *, embedding: int = 48,
                 filters: int = 128, widths: Sequence[int] = (2, 3, 4, 5), hidden: int = 256,
                 dropout: float = 0.3) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocabulary_size, embedding, padding_idx=PAD)
        # half a width of padding each side: an even width gives one position more, cut off
        self.convs = nn.ModuleList(nn.Conv1d(embedding, filters, width, padding=width // 2)
                                   for width in widths)
        self.act = nn.ReLU()
        self.num_features = filters * len(widths)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.num_features, hidden),
                                  nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, n_out))

    def group_matcher(self, coarse: bool = True) -> dict:
        """timm-style layer groups: the embedding, the convolutions, then the head."""
        return {"stem": r"^embedding", "blocks": r"^convs\.(\d+)"}

    def get_classifier(self) -> nn.Module:
        return self.head[-1]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, filters x widths): each filter's strongest response over the text."""
        padding = (x == PAD).unsqueeze(1)
        embedded = self.embedding(x).transpose(1, 2)
        length = x.shape[1]
        pooled = [self.act(conv(embedded)[..., :length]).masked_fill(padding, 0.0).amax(dim=2)
                  for conv in self.convs]
        return torch.cat(pooled, dim=1)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return features if pre_logits else self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


TEXT_MODELS = {"char_cnn": CharCNN}
TEXT_MODEL = "char_cnn"  # the default


def create_text_model(name: str, vocabulary_size: int, n_out: int,
                      dropout: float = 0.0) -> nn.Module:
    """A text model by name (``char_cnn``); ``dropout`` replaces its head's 0.3 when given."""
    if name not in TEXT_MODELS:
        raise ImagefitError(f"model {name} reads images, not text: leave out --model for "
                            f"--task text, or give one of {', '.join(TEXT_MODELS)}")
    return TEXT_MODELS[name](vocabulary_size, n_out, **({"dropout": dropout} if dropout else {}))
