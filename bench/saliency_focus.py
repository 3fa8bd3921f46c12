"""Do the saliency maps sit on the object? The default fit on builtin:fashion-mnist, then on
test images (bright garments on a black background): the share of each map's mass on object
pixels (value > threshold) against the share of the image those pixels cover. A map blind to
the object has a ratio near 1. Fashion-MNIST's objects are centred, so a centred blob scores
well without looking at the image: the mass on the image's own object against that on
another image's object tells maps that follow the object from maps that follow the centre.

    .venv/bin/python bench/saliency_focus.py [--epochs 3] [--images 500] [--run RUN_DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from common import RESULTS, write_result

import imagefit
from imagefit.data.builtin import read_builtin
from imagefit.evaluation.inference import load_model
from imagefit.evaluation.saliency import (
    default_targets,
    feature_blocks,
    gradcam_layer,
    model_outputs,
    saliency_maps,
)
from imagefit.report.overlays import explain_images


def focus(maps: torch.Tensor, objects: torch.Tensor) -> dict:
    """Over the images whose map is not all zero: the mean share of map mass on the object
    and the object's mean area; the per-image ratio of the two (median, and how often it is
    above 1); and the mass on the image's own object over the mass on the object region of
    the next image (a map that only knows where objects usually are scores 1)."""
    total = maps.sum(dim=(1, 2))
    kept = total > 0
    maps, objects, total = maps[kept], objects[kept], total[kept]
    own = (maps * objects).sum(dim=(1, 2)) / total
    other = (maps * objects.roll(1, dims=0)).sum(dim=(1, 2)) / total
    area = objects.mean(dim=(1, 2))
    ratio = own / area
    return {"empty_maps": round(1 - kept.float().mean().item(), 3),
            "mass_on_object": round(own.mean().item(), 4),
            "object_area": round(area.mean().item(), 4),
            "median_ratio": round(ratio.median().item(), 3),
            "share_ratio_above_1": round((ratio > 1).float().mean().item(), 3),
            "own_vs_other_object": round(own.mean().item() / other.mean().item(), 3)}


def centred_blob(size: int, count: int) -> torch.Tensor:
    coords = torch.linspace(-1, 1, size)
    blob = torch.exp(-(coords[:, None] ** 2 + coords[None, :] ** 2) / (2 * 0.4 ** 2))
    return blob.expand(count, size, size)


def measure(run_dir: Path, n_images: int, threshold: float) -> dict:
    loaded = load_model(run_dir, "cpu")
    table = read_builtin("fashion-mnist")
    rows = table.rows("test")[:n_images]
    images = torch.from_numpy(table.arrays[rows]).permute(0, 3, 1, 2).contiguous()
    objects = (images[:, 0] > threshold * 255).float()
    outputs = model_outputs(loaded, images)
    predicted = default_targets(loaded.task, outputs)
    accuracy = (predicted.numpy() == table.targets[rows]).mean()
    default_layer = gradcam_layer(loaded.model, loaded.settings.size, loaded.settings.channels)
    results = {}
    for layer in feature_blocks(loaded.model):
        started = time.perf_counter()
        maps = saliency_maps(loaded, images, "gradcam", predicted, layer=layer)
        results[f"gradcam {layer}"] = {**focus(maps, objects), "ms_per_image": round(
            1000 * (time.perf_counter() - started) / len(images), 2),
            "default": layer == default_layer}
    started = time.perf_counter()
    maps = saliency_maps(loaded, images, "guided-backprop", predicted)
    results["guided-backprop"] = {**focus(maps, objects), "ms_per_image": round(
        1000 * (time.perf_counter() - started) / len(images), 2), "default": True}
    results["centred blob (baseline)"] = focus(centred_blob(images.shape[-1], len(images)),
                                               objects)
    results["the image itself (bound)"] = focus(images[:, 0].float(), objects)
    shown = images[:6]
    explain_images(loaded, shown, None, "gradcam", RESULTS / "saliency_focus_gradcam.png")
    last = feature_blocks(loaded.model)[-1]
    explain_images(loaded, shown, None, "gradcam", RESULTS / "saliency_focus_gradcam_last.png",
                   layer=last)
    explain_images(loaded, shown, None, "guided-backprop",
                   RESULTS / "saliency_focus_guided-backprop.png")
    return {"n_images": len(images), "test_accuracy_on_them": round(float(accuracy), 4),
            "default_gradcam_layer": default_layer, "methods": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--threshold", type=float, default=0.1,
                        help="object pixels are brighter than this fraction of white")
    parser.add_argument("--run", help="measure this run directory instead of training one")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as runs_dir:
        run_dir = Path(args.run) if args.run else imagefit.fit(
            "builtin:fashion-mnist", epochs=args.epochs, seed=args.seed, runs_dir=runs_dir,
            progress=False).run_dir
        measured = measure(run_dir, args.images, args.threshold)
    command = ("imagefit fit builtin:fashion-mnist "
               f"--epochs {args.epochs} --seed {args.seed}, then saliency maps of the "
               f"first {args.images} test images (object: pixel > {args.threshold} of white)")
    write_result("saliency_focus", {"command": command, "threshold": args.threshold,
                                    **measured})


if __name__ == "__main__":
    main()
