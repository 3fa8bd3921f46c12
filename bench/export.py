"""Images per second of an exported model through onnxruntime against eager PyTorch (fp32,
and the bf16 autocast imagefit picks on CPUs with AMX), at batch 1 and 64, for small_cnn_16
(28 px, grey) and resnet18 (224 px, RGB): each the same module (normalization and softmax
inside; eager in channels-last memory order, as imagefit's inference runs it), timed in the
same process by torch.utils.benchmark (median of blocks after a warm-up).

    .venv/bin/python bench/export.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import onnxruntime
import torch
import torch.utils.benchmark as benchmark
from common import write_result

from imagefit.augment.pipeline import BatchPipeline
from imagefit.data.cache import CacheSettings
from imagefit.devices import autocast
from imagefit.evaluation.export import Exported, export_onnx
from imagefit.evaluation.inference import LoadedModel
from imagefit.models import create_model
from imagefit.tasks import Task

MODELS = {"small_cnn_16": (28, 1), "resnet18": (224, 3)}
BATCHES = (1, 64)


def loaded_model(name: str, size: int, channels: int) -> LoadedModel:
    torch.manual_seed(0)
    model = create_model(name, channels, 10).eval()
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else model.head
    torch.nn.init.normal_(classifier.weight, std=0.05)  # not the zeros of a new head: a
    # uniform output would make the parity check trivially exact
    task = Task("classification", [str(i) for i in range(10)])
    return LoadedModel(model, task, CacheSettings(size, channels, "crop"),
                       BatchPipeline([0.5] * channels, [0.25] * channels),
                       {"architecture": name, "task": task.to_dict()})


def seconds(call, batch: torch.Tensor, repeats: int) -> float:
    """Median seconds of ``call(batch)``: torch.utils.benchmark's blocked timing, ``repeats``
    blocks of at least 0.2 s each after its own warm-up."""
    timer = benchmark.Timer("call(batch)", globals={"call": call, "batch": batch},
                            num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=0.2 * repeats).median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    results = []
    for name, (size, channels) in MODELS.items():
        loaded = loaded_model(name, size, channels)
        generator = torch.Generator().manual_seed(0)
        samples = torch.randint(0, 256, (64, channels, size, size), generator=generator,
                                dtype=torch.uint8)
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / f"{name}.onnx"
            parity = export_onnx(loaded, path, samples[:16])["parity"]["max_abs_diff"]
            session = onnxruntime.InferenceSession(str(path),
                                                   providers=["CPUExecutionProvider"])

            def runtime(batch, session=session):
                return session.run(None, {"images": batch.numpy()})

            fast = Exported(loaded).eval().to(memory_format=torch.channels_last)

            def eager(batch, precision="fp32", module=fast):
                """As imagefit's own inference runs it: weights and batch channels-last."""
                with torch.no_grad(), autocast(precision, batch.device):
                    x = module.pipeline(batch).contiguous(memory_format=torch.channels_last)
                    return module.task.activate(module.model(x).float())

            for batch_size in BATCHES:
                batch = samples[:batch_size].contiguous()
                row = {"model": name, "image_size": size, "batch": batch_size,
                       "parity": parity}
                for label, call in (("onnxruntime", runtime), ("eager_fp32", eager),
                                    ("eager_bf16", lambda b: eager(b, "bf16"))):
                    row[label] = round(batch_size / seconds(call, batch, args.repeats), 1)
                row["onnxruntime_vs_eager_fp32"] = round(row["onnxruntime"] /
                                                         row["eager_fp32"], 2)
                print(row)
                results.append(row)
    write_result("export", {"command": f"bench/export.py --repeats {args.repeats}",
                            "unit": "images per second", "results": results})


if __name__ == "__main__":
    main()
