"""fastai 2.8's fine-tuning recipe on a photo folder, within a wall-clock budget, timed from
the script's start (imports included, as imagefit's --budget counts its own).

Run with the fastai venv's python (fastai_env.ensure_fastai_venv(extra=("timm==...",))):

    python fastai_finetune.py ROOT WEIGHTS OUT_JSON --budget 60 [--seed 0] [--lr find|2e-3]

ROOT holds train/<class>/*.png and test/<class>/*.png. The model is fastai's vision_learner
shape on a timm body: timm's tf_efficientnet_lite0 without its classifier, filled from
WEIGHTS (a safetensors state dict of the same weights imagefit loads), and fastai's head
(concat pooling, BatchNorm, dropout, two linear layers); the body's and the head's
parameters are the two groups freeze() and the discriminative rates act on, and batches
are normalised with the weights' statistics, as vision_learner does for a pretrained body.

The recipe, as fastai's lessons give it: aug_transforms(), 20% of the training folder for
validation (a seeded RandomSplitter: imagefit's own split takes the same share), lr_find()'s
valley as the rate (or --lr), then fine_tune(epochs, base_lr): one frozen epoch, then every
layer at slice(base_lr/200, base_lr/2). fastai has no budget: the unfrozen epochs are chosen
the way a careful user would, from what is left after the frozen epoch, an unfrozen epoch's
time (the frozen epoch's, plus for each batch what a training step through every layer
takes over a frozen one: both timed on a copy of the model with fastai's own optimizer) and
the test evaluation's time (a fixed part and a part per image, from timings on 64 and 256
test images: scaling the 256 images' time whole had counted the loader's start-up once per
256 images and foreseen the evaluation up to twice too slow), never fewer than one.
"""

import time

t0 = time.perf_counter()

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import fastai  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from fastai.vision.all import (  # noqa: E402
    CategoryBlock,
    CrossEntropyLossFlat,
    DataBlock,
    ImageBlock,
    Learner,
    Normalize,
    RandomSplitter,
    accuracy,
    apply_init,
    aug_transforms,
    create_head,
    get_image_files,
    params,
    parent_label,
    set_seed,
)
from safetensors.torch import load_file  # noqa: E402
from torch import nn  # noqa: E402

NET = "tf_efficientnet_lite0"
TEST_SAMPLES = (64, 256)  # test images timed to foresee the test evaluation's seconds


def build_model(weights: Path, n_out: int) -> nn.Module:
    body = timm.create_model(NET, pretrained=False, num_classes=0, global_pool="")
    state = {key: value for key, value in load_file(str(weights)).items()
             if not key.startswith("classifier.")}
    missing, unexpected = body.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise SystemExit(f"weights do not fit {NET}: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    head = create_head(body.num_features, n_out)
    apply_init(head, nn.init.kaiming_normal_)
    return nn.Sequential(body, head)


def step_seconds(learn: Learner, frozen: bool, steps: int = 4) -> float:
    """Median seconds of a training step of a copy of the model, frozen body or not, with
    the learner's own optimizer (fastai's Adam steps each tensor in Python: torch's fused
    one had foreseen the unfrozen epochs up to a third too fast)."""
    model = copy.deepcopy(learn.model).train()
    for parameter in model[0].parameters():
        parameter.requires_grad_(not frozen)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = learn.opt_func(trainable, lr=0.0)
    x, y = (t.as_subclass(torch.Tensor) for t in learn.dls.train.one_batch())
    times = []
    for step in range(steps + 2):
        started = time.perf_counter()
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step >= 2:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def evaluation_seconds(learn: Learner, files: list) -> float:
    """Foreseen seconds of the predictions on all ``files``: a fixed part (the loader's
    start) and a part per image, from two timed samples."""
    sizes = [min(n, len(files)) for n in TEST_SAMPLES]
    times = []
    for n in sizes:
        started = time.perf_counter()
        learn.get_preds(dl=learn.dls.test_dl(files[:n], with_labels=True))
        times.append(time.perf_counter() - started)
    if sizes[1] == sizes[0]:
        return times[1]
    per_image = max(0.0, (times[1] - times[0]) / (sizes[1] - sizes[0]))
    fixed = max(0.0, times[0] - per_image * sizes[0])
    return fixed + per_image * len(files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("weights", type=Path)
    parser.add_argument("out_json", type=Path)
    parser.add_argument("--budget", type=float, required=True, help="seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", default="find", help="'find' (lr_find's valley) or a rate")
    parser.add_argument("--bs", type=int, default=64, help="fastai's default")
    args = parser.parse_args()

    set_seed(args.seed)
    weights_cfg = timm.get_pretrained_cfg(NET)  # the weights' normalization
    mean, std = weights_cfg.mean, weights_cfg.std
    block = DataBlock(blocks=(ImageBlock, CategoryBlock), get_items=get_image_files,
                      splitter=RandomSplitter(0.2, seed=args.seed), get_y=parent_label,
                      batch_tfms=[*aug_transforms(), Normalize.from_stats(mean, std)])
    dls = block.dataloaders(args.root / "train", bs=args.bs)
    model = build_model(args.weights, len(dls.vocab))
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), metrics=accuracy,
                    splitter=lambda m: [params(m[0]), params(m[1])])
    learn.freeze()
    timings = {"setup_seconds": round(time.perf_counter() - t0, 2)}
    with learn.no_bar(), learn.no_logging():
        if args.lr == "find":
            started = time.perf_counter()
            lr = float(learn.lr_find(show_plot=False).valley)
            timings["lr_find_seconds"] = round(time.perf_counter() - started, 2)
        else:
            lr = float(args.lr)
        # fine_tune(epochs, lr) is these two fits; the first is timed to choose the epochs
        started = time.perf_counter()
        learn.fit_one_cycle(1, slice(lr), pct_start=0.99)
        frozen_epoch = time.perf_counter() - started
        frozen_step, unfrozen_step = step_seconds(learn, True), step_seconds(learn, False)
        # an unfrozen epoch: the frozen one (loading, augmenting, validating) and, for each
        # batch, what a step through every layer adds
        unfrozen_epoch = frozen_epoch + len(dls.train) * (unfrozen_step - frozen_step)
        test_files = get_image_files(args.root / "test")
        test_seconds = evaluation_seconds(learn, test_files)
        left = args.budget - (time.perf_counter() - t0) - test_seconds - 1.0
        epochs = max(1, math.floor(left / unfrozen_epoch))
        timings.update(frozen_epoch_seconds=round(frozen_epoch, 2),
                       unfrozen_epoch_estimate_seconds=round(unfrozen_epoch, 2),
                       test_estimate_seconds=round(test_seconds, 2),
                       planned_unfrozen_epochs=epochs)
        learn.unfreeze()
        learn.fit_one_cycle(epochs, slice(lr / 2 / 100, lr / 2), pct_start=0.3, div=5.0)
        valid_accuracy = float(learn.validate()[1])
        started = time.perf_counter()
        test = learn.dls.test_dl(test_files, with_labels=True)
        probabilities, targets = learn.get_preds(dl=test)
        timings["test_seconds"] = round(time.perf_counter() - started, 2)
    test_accuracy = float((probabilities.argmax(1) == targets).float().mean())
    wall = time.perf_counter() - t0
    result = {"fastai": fastai.__version__, "timm": timm.__version__, "torch": torch.__version__,
              "net": NET, "lr": lr, "lr_source": "lr_find valley" if args.lr == "find"
              else "given", "bs": args.bs, "seed": args.seed, "budget_seconds": args.budget,
              "train_images": len(dls.train_ds), "valid_images": len(dls.valid_ds),
              "test_images": len(test_files), "unfrozen_epochs": epochs, **timings,
              "valid_accuracy": round(valid_accuracy, 4),
              "test_accuracy": round(test_accuracy, 4), "wall_seconds": round(wall, 1)}
    args.out_json.parent.mkdir(parents=True, exist_ok=True)
    args.out_json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result), file=sys.stderr)


if __name__ == "__main__":
    main()
