"""What every benchmark records beside its numbers: date, machine and versions."""

from __future__ import annotations

import json
import os
import platform
from datetime import datetime
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    import numpy
    import PIL
    import timm
    import torch
    import torchvision

    import imagefit

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "date": datetime.now().isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "versions": {"imagefit": imagefit.__version__, "torch": torch.__version__,
                     "torchvision": torchvision.__version__, "timm": timm.__version__,
                     "numpy": numpy.__version__, "pillow": PIL.__version__},
    }


def write_result(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"benchmark": name, **machine(), **data}, indent=2) + "\n")
    print(f"wrote {path}")
    return path
