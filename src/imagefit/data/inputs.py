"""What a model reads: images (``ImageInput``: a square side, channels, the way images are
made square) or short texts (``TextInput``: the training split's characters and a length).
A loaded model holds one, built from its model.json by ``input_of``, so the rest of the
package asks it (what the graph takes, how inputs are encoded, what a random input looks
like) instead of testing which kind of input it is; a table's is ``input_class``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import ImagefitError
from .cache import CacheSettings
from .table import Table
from .text import SPECIAL, Vocabulary


@dataclass(frozen=True)
class ImageInput:
    """Images as the cache stores them: uint8 (N, C, S, S) once in channel order."""

    settings: CacheSettings
    name: ClassVar[str] = "image"
    noun: ClassVar[str] = "images"
    reads_images: ClassVar[bool] = True
    a_model: ClassVar[str] = "an image model"
    qualifier: ClassVar[str] = ""  # before the task kind in a report's title

    @classmethod
    def from_info(cls, info: dict) -> ImageInput:
        return cls(CacheSettings(info["image_size"], info["channels"], info["resize"]))

    @property
    def resize(self) -> str | None:
        return self.settings.resize

    def graph_input(self) -> dict:
        """What an exported graph takes: its name, type and shape."""
        size, channels = self.settings.size, self.settings.channels
        return {"name": "images", "dtype": "uint8", "shape": ["batch", channels, size, size]}

    def random_inputs(self, n: int, generator: torch.Generator) -> torch.Tensor:
        shape = (n, self.settings.channels, self.settings.size, self.settings.size)
        return torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8)


@dataclass(frozen=True)
class TextInput:
    """Texts as (N, length) character indices of the training split's characters."""

    vocabulary: Vocabulary
    length: int
    name: ClassVar[str] = "text"
    noun: ClassVar[str] = "texts"
    reads_images: ClassVar[bool] = False
    a_model: ClassVar[str] = "a text model"
    qualifier: ClassVar[str] = "text"

    @classmethod
    def from_info(cls, info: dict) -> TextInput:
        text = info["text"]
        return cls(Vocabulary(text["characters"], text.get("lowercase", True)), text["length"])

    @property
    def resize(self) -> str | None:
        return None

    def encode(self, texts: list[str]) -> torch.Tensor:
        """Texts as the model read its training texts."""
        return torch.from_numpy(self.vocabulary.encode(texts, self.length))

    def graph_input(self) -> dict:
        return {"name": "texts", "dtype": "int64", "shape": ["batch", self.length]}

    def random_inputs(self, n: int, generator: torch.Generator) -> torch.Tensor:
        high = len(self.vocabulary.characters) + SPECIAL
        return torch.randint(0, high, (n, self.length), generator=generator)


Input = ImageInput | TextInput
INPUTS: dict[str, type[ImageInput] | type[TextInput]] = {
    cls.name: cls for cls in (ImageInput, TextInput)}


def input_class(info: dict) -> type[ImageInput] | type[TextInput]:
    """The kind of input a model.json (or an export's copy of it) describes; images when it
    names none (every model before texts)."""
    name = info.get("input", ImageInput.name)
    if name not in INPUTS:
        raise ImagefitError(f"model.json names the input {name!r}, which is none of "
                            f"{', '.join(INPUTS)}: restore it from a copy of the run")
    return INPUTS[name]


def input_of(info: dict) -> Input:
    """The input a model.json describes, ready to encode and to describe."""
    return input_class(info).from_info(info)


def table_input(table: Table) -> type[ImageInput] | type[TextInput]:
    """What a table's rows are: texts when it holds them, else images."""
    return TextInput if table.texts is not None else ImageInput
