"""Named bundles of augmentation parameters, chosen with ``--augment``.

- ``none``: no augmentation.
- ``light``: left-right flip and a shift of up to 1/14 of the side (gathers only: cheap, no
  blur); a safe start for small images of objects.
- ``side_on``: photos taken from the side: flip, rotation up to 10 degrees, zoom up to 1.1,
  brightness and contrast +-0.2.
- ``top_down``: satellite, microscopy, histopathology: any of the 8 symmetries, rotation up to
  10 degrees, zoom up to 1.1, brightness and contrast +-0.2.
- ``randaugment``: flip plus RandAugment with 2 operations at magnitude 9.
- ``trivial``: flip plus TrivialAugment.
- ``imagenet``: the RegNet recipe: random resized crop (area 0.08-1), flip, PCA lighting 0.1,
  MixUp 0.2.
"""

from __future__ import annotations

from ..config import AugmentOptions

PRESETS: dict[str, dict] = {
    "none": {},
    "light": {"flip": 0.5, "shift": 1 / 14},
    "side_on": {"flip": 0.5, "rotate": 10.0, "zoom": (1.0, 1.1), "brightness": 0.2,
                "contrast": 0.2},
    "top_down": {"dihedral": 1.0, "rotate": 10.0, "zoom": (1.0, 1.1), "brightness": 0.2,
                 "contrast": 0.2},
    "randaugment": {"flip": 0.5, "randaugment_n": 2, "randaugment_m": 9.0},
    "trivial": {"flip": 0.5, "trivial": True, "randaugment_m": 10.0},
    "imagenet": {"crop_area": (0.08, 1.0), "flip": 0.5, "lighting": 0.1, "mixup": 0.2},
}


def resolve_augment(preset: str, overrides: AugmentOptions | None = None) -> AugmentOptions:
    """The preset's parameters with the explicitly set ``overrides`` on top."""
    values = dict(PRESETS[preset])
    if overrides is not None:
        values.update(overrides.model_dump(exclude_unset=True))
    return AugmentOptions(**values)
