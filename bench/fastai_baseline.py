"""fastai's usual recipe on Fashion-MNIST PNG folders, timed from the script's start.

Run with the fastai venv's python (see fastai_env.py):

    python fastai_baseline.py PNG_ROOT OUT_JSON [--epochs 5] [--limit N] [--workers 0]

PNG_ROOT holds train/<class>/*.png and test/<class>/*.png; the official 10k test set is
fastai's validation set, so each epoch's validation accuracy is the test accuracy.
"""

import time

t0 = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import fastai  # noqa: E402
import torch  # noqa: E402
from fastai.vision.all import (  # noqa: E402
    Callback,
    CategoryBlock,
    DataBlock,
    Flip,
    GrandparentSplitter,
    ImageBlock,
    Learner,
    PILImageBW,
    Recorder,
    accuracy,
    get_image_files,
    parent_label,
    set_seed,
    xresnet18,
)

RECIPE = ("DataBlock(ImageBlock(cls=PILImageBW), CategoryBlock; get_image_files, "
          "GrandparentSplitter(train='train', valid='test'), parent_label, batch_tfms=[Flip()]), "
          "bs=128; Learner(xresnet18(c_in=1, n_out=10), CrossEntropyLossFlat, metrics=accuracy), "
          "set_seed(0); fit_one_cycle(epochs, 3e-3)")


class TestAccuracyLog(Callback):
    """The seconds since t0 when fit starts, and after each epoch's validation the test
    accuracy and the seconds since t0."""

    order = Recorder.order + 1  # after the Recorder has filled in this epoch's metrics

    def __init__(self):
        self.epochs, self.setup_seconds = [], None

    def before_fit(self):
        self.setup_seconds = round(time.perf_counter() - t0, 3)

    def after_epoch(self):
        recorder = self.learn.recorder
        acc = float(recorder.log[recorder.metric_names.index("accuracy")])
        seconds = time.perf_counter() - t0
        self.epochs.append({"epoch": self.epoch + 1, "seconds": round(seconds, 3),
                            "test_accuracy": round(acc, 4)})
        print(f"epoch {self.epoch + 1}: test accuracy {acc:.4f} at {seconds:.1f} s",
              file=sys.stderr, flush=True)


def items(limit: int | None):
    """get_image_files, keeping only `limit` training images (a seeded sample) when given."""
    if limit is None:
        return get_image_files

    def limited(path):
        files = sorted(get_image_files(path), key=str)
        train = [f for f in files if f.parent.parent.name == "train"]
        test = [f for f in files if f.parent.parent.name != "train"]
        return random.Random(0).sample(train, min(limit, len(train))) + test

    return limited


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("png_root", type=Path)
    parser.add_argument("out_json", type=Path)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--limit", type=int, default=None, help="keep N training images")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader num_workers")
    args = parser.parse_args()

    set_seed(0)
    torch.manual_seed(0)
    block = DataBlock(blocks=(ImageBlock(cls=PILImageBW), CategoryBlock),
                      get_items=items(args.limit),
                      splitter=GrandparentSplitter(train_name="train", valid_name="test"),
                      get_y=parent_label, batch_tfms=[Flip()])
    dls = block.dataloaders(args.png_root, bs=128, num_workers=args.workers)
    learn = Learner(dls, xresnet18(c_in=1, n_out=10), metrics=accuracy)
    log = TestAccuracyLog()
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(args.epochs, 3e-3, cbs=[log])

    result = {"fastai": fastai.__version__, "torch": torch.__version__, "recipe": RECIPE,
              "train_images": len(dls.train_ds), "test_images": len(dls.valid_ds),
              "num_workers": args.workers, "torch_threads": torch.get_num_threads(),
              "epochs": log.epochs, "setup_seconds": log.setup_seconds}
    args.out_json.parent.mkdir(parents=True, exist_ok=True)
    args.out_json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out_json}", file=sys.stderr)


if __name__ == "__main__":
    main()
