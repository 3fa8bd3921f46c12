"""Writes docs/BENCHMARKS.md from the JSON files in bench/results/ (never typed by hand).

    .venv/bin/python bench/tables.py
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from common import RESULTS

DOCS = Path(__file__).resolve().parent.parent / "docs" / "BENCHMARKS.md"


def header(result: dict, versions: dict | None = None, cores_note: str = "",
           also: str = "") -> list[str]:
    """The date, machine, versions and command of a result. ``versions`` replaces the
    result's own, ``cores_note`` follows the core count, ``also`` the version list."""
    versions = ", ".join(f"{k} {v}" for k, v in (versions or result["versions"]).items())
    gpu = f", GPU {result['gpu']}" if result.get("gpu") else ", no GPU"
    return [
        f"Measured {result['date']} on {result['cpu']} ({result['cores']} cores{cores_note}"
        f"{gpu}), Python {result['python']}; {versions}{also}.",
        "",
        f"Command: `{result['command']}`",
        "",
    ]


def fashion_mnist_default(result: dict) -> list[str]:
    lines = ["## Fashion-MNIST, default fit", ""] + header(result)
    lines += [
        f"Training images/s: **{result['train_images_per_second']:.0f}** "
        f"({result['n_train']} training images); median seconds per epoch (training plus "
        f"validation and the test evaluation for the curve): "
        f"**{result['median_epoch_seconds']:.1f}**; final test accuracy: "
        f"**{result['final_test_accuracy']:.4f}**.",
        "",
        "| epoch | seconds | valid accuracy | test accuracy |",
        "|---|---|---|---|",
    ]
    lines += [f"| {e['epoch']} | {e['seconds']:.1f} | {e['valid_accuracy']:.4f} | "
              f"{e['test_accuracy']:.4f} |" for e in result["epochs"]]
    return lines


def fashion_mnist_folder(result: dict) -> list[str]:
    lines = ["## Fashion-MNIST through a folder of PNGs", ""] + header(result)
    lines += [
        f"Writing the 70,000 PNGs took {result['png_write_seconds']:.0f} s. "
        f"Test-accuracy gap between the two paths: **{result['test_accuracy_gap_points']:.2f} "
        "points**.",
        "",
        "| source | test accuracy | cache build s | whole fit s | training images/s |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r['data']} | {r['test_accuracy']:.4f} | {r['cache_seconds']:.1f} | "
              f"{r['seconds']:.0f} | {r['train_images_per_second']:.0f} |"
              for r in result["runs"].values()]
    return lines


def augment(result: dict) -> list[str]:
    lines = ["## Augmentation speed", ""] + header(result)
    lines += [
        f"Batches of {result['batch_size']}. End to end: files to normalized, augmented 224 px "
        "batches (`side_on`), images/s from the second epoch on (median); imagefit's cache of "
        "256 px is built once beforehand and its build time is listed apart. torchvision: "
        "transforms.v2 per image in a DataLoader with 2 workers.",
        "",
        "| JPEG size | images | imagefit cache build s | imagefit img/s | torchvision img/s "
        "| ratio |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {name} | {r['images']} | {r['imagefit_cache_build_seconds']:.1f} | "
              f"{r['imagefit_images_per_second']:.0f} | {r['torchvision_images_per_second']:.0f}"
              f" | {r['ratio']:.2f} |" for name, r in result["end_to_end_224"].items()]
    lines += [
        "",
        "The augmentation step alone, on decoded images in memory (input 8/7 of the output "
        "size):",
        "",
        "| size | preset | imagefit img/s | torchvision img/s | ratio |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r['size']} | {r['preset']} | {r['imagefit_images_per_second']:.0f} | "
              f"{r['torchvision_images_per_second']:.0f} | {r['ratio']:.2f} |"
              for r in result["augmentation_alone"]]
    return lines


def augment_accuracy(result: dict) -> list[str]:
    lines = ["## Augmentation and accuracy (Fashion-MNIST, 10 epochs)", ""] + header(result)
    lines += ["| preset | test accuracy per seed | median | spread |", "|---|---|---|---|"]
    lines += [f"| {name} | {', '.join(f'{a:.4f}' for a in r['test_accuracy'])} | "
              f"{r['median']:.4f} | {r['spread']:.4f} |" for name, r in result["runs"].items()]
    return lines


def transfer(result: dict) -> list[str]:
    lines = ["## Transfer learning on 1,000 Fashion-MNIST images (64 px, RGB)", ""]
    lines += header(result)
    lines += ["| side | test accuracy per seed | median | spread |", "|---|---|---|---|"]
    lines += [f"| {name} | {', '.join(f'{a:.4f}' for a in r['test_accuracy'])} | "
              f"{r['median']:.4f} | {r['spread']:.4f} |" for name, r in result["accuracy"].items()]
    lines += [
        "",
        f"Head training, seconds per epoch: **{result['head_epoch_seconds_precomputed']:.3f}** on "
        f"precomputed features against **{result['head_epoch_seconds_full_forward']:.2f}** with "
        f"full forward passes through the frozen body: **{result['speedup']:.1f}x** (computing "
        f"the features once took {result['feature_seconds']:.1f} s).",
    ]
    return lines


def saliency_focus(result: dict) -> list[str]:
    lines = ["## Saliency maps on the object (Fashion-MNIST)", ""] + header(result)
    lines += [
        f"{result['n_images']} test images (model accuracy on them "
        f"{result['test_accuracy_on_them']:.4f}); object pixels are brighter than "
        f"{result['threshold']:.0%} of white. Mass and area are means over the images whose "
        "map is not all zero; the ratio is per image (a map blind to the object scores 1); "
        "own vs other: mass on the image's object over mass on the next image's object region "
        "(a map that only knows where objects usually are scores 1). Default Grad-CAM layer: "
        f"`{result['default_gradcam_layer']}`.",
        "",
        "| map | empty maps | mass on object | object area | median ratio | ratio > 1 "
        "| own vs other object | ms/image |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in result["methods"].items():
        default = r.get("default") and name.startswith("gradcam")
        marked = f"**{name}** (default)" if default else name
        speed = f"{r['ms_per_image']:.2f}" if "ms_per_image" in r else ""
        lines.append(f"| {marked} | {r['empty_maps']:.1%} | {r['mass_on_object']:.3f} | "
                     f"{r['object_area']:.3f} | {r['median_ratio']:.2f} | "
                     f"{r['share_ratio_above_1']:.1%} | {r['own_vs_other_object']:.3f} | "
                     f"{speed} |")
    return lines


SWITCH_NAMES = {"default": "defaults (channels-last, eager)", "contiguous": "channels-last off",
                "compile": "torch.compile"}


FLOOR_NOTES = {
    "compute_floor": "This run had the loader's background prefetch thread on, as the code "
    "then did on every device. The small CNN's profile below shows the same operators "
    "(convolution backward, batch norm) taking longer per call end to end than in the floor: "
    "on 2 cores the loader thread competes with the two compute threads. The loader now "
    "prefetches on CUDA devices only; the runs below measure the code with that change.",
    "compute_floor_no_prefetch": "The loader without its prefetch thread on CPUs (the current "
    "default); same script, default switches.",
}


def compute_floor(result: dict) -> list[str]:
    lines = ["## Training speed against the compute floor", ""] + header(result)
    note = FLOOR_NOTES.get(result["benchmark"].removesuffix("_128"))
    lines += [note, ""] if note else []
    runs = result["runs"]
    first = runs[0] if runs else {}
    lines += [
        "Floor: the model's forward, backward and AdamW step (imagefit's own model, optimizer, "
        f"batch size, memory format and precision, {first.get('precision', '?')} here) run "
        "again and again on one training batch already on the device. End to end: imagefit's "
        "`Learner` reading the image cache (built beforehand), validation off, one epoch of "
        f"about {result['seconds']:g} s, from the second epoch on. Floor runs and epochs "
        f"alternate, {result['pairs']} pairs per line: images/s are medians, the ratio is the "
        "median of the per-pair ratios (end to end / floor) and its range the lowest and "
        "highest pair. 'vs default' is the line's end-to-end images/s over its row's default "
        "line, measured in the same run. Compile time is left out of the rates and listed "
        "apart. Data: the small CNN on Fashion-MNIST (28 px, grey); ResNet-18 on "
        f"{result['photos']} JPEGs cut from scikit-image's photos, cached at 64 or 128 px RGB. "
        f"Augmentation: {result['augment']}.",
        "",
        "| model | switch | batch | floor img/s | end-to-end img/s | ratio | ratio range "
        "| vs default | compile s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    defaults = {r["row"]: r["end_to_end_images_per_second"] for r in runs
                if r["switch"] == "default"}
    for r in runs:
        model = "small CNN" if r["model"] == "small_cnn" else r["model"]
        colour = "grey" if r["channels"] == 1 else "RGB"
        default = defaults.get(r["row"])
        versus = f"{r['end_to_end_images_per_second'] / default:.2f}x" if default else ""
        compiled = f"{r['compile_seconds']:.0f}" if r["compile_seconds"] is not None else ""
        switch = SWITCH_NAMES.get(r["switch"], r["switch"])
        lines.append(
            f"| {model}, {r['image_size']} px {colour} | {switch} | {r['batch_size']} | "
            f"{r['floor_images_per_second']:.0f} | "
            f"{r['end_to_end_images_per_second']:.0f} | **{r['ratio']:.2f}** | "
            f"{min(r['ratios']):.2f}-{max(r['ratios']):.2f} | {versus} | {compiled} |")
    profiled = [r for r in runs if r.get("profile")]
    if profiled:
        which = ("every line" if result.get("profile") == "always"
                 else f"the lines with a ratio under {result['profile_below']}")
        lines += ["", f"Profiles of {which} (torch.profiler, top operators by share of self "
                  "CPU time; full tables in `bench/results/`):", ""]
    for r in profiled:
        profile = r["profile"]
        lines.append(f"- {r['row']}, {SWITCH_NAMES.get(r['switch'], r['switch'])} "
                     f"(`{profile['file']}`): end to end "
                     f"{top_operators(profile['end_to_end_top'])}; floor "
                     f"{top_operators(profile['floor_top'])}.")
    return lines


def top_operators(rows: list[dict], count: int = 5) -> str:
    return ", ".join(f"`{row['op']}` {row['share']:.0%}" for row in rows[:count])


def cache_memory(result: dict) -> list[str]:
    lines = ["## Memory while building the image cache", ""] + header(result)
    lines += [
        "Each build is `loading.load_data` with the default options in a fresh process with an "
        "empty cache folder (IMAGEFIT_CACHE). Peaks of RssAnon (anonymous memory) and of RSS, "
        "summed over the process and any it starts, sampled every "
        f"{result['interval_seconds'] * 1000:.0f} ms; the process's own imports (torch) are "
        "part of it and listed apart. The cache file's pages are file-backed: they count in "
        f"RSS, not in RssAnon. Target: peak RssAnon under {result['target_rss_anon_mb']:.0f} MB.",
        "",
        "| data | images | cache | build s | RssAnon after imports MB | peak RssAnon MB "
        "| peak RSS MB | target |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['data']} | {r['images']} | {r['cache']} | {r['build_seconds']:.1f} | "
              f"{r['rss_anon_after_imports_mb']:.0f} | **{r['peak_rss_anon_mb']:.0f}** | "
              f"{r['peak_rss_mb']:.0f} | {'met' if r['meets_target'] else 'missed'} |"
              for r in result["cases"]]
    return lines


def sharded_cache(result: dict) -> list[str]:
    lines = ["## Two machines, each rank caching its share: memory per rank", ""] + \
        header(result)
    lines += [
        f"The first {result['images']:,} Fashion-MNIST training images as PNGs in a folder per "
        f"class, `imagefit fit FOLDER {result['flags']}` ({result['image_bytes'] / 1000:.1f} KB "
        "an image in the cache). Two machines are two `torchrun --nnodes 2 --nproc-per-node 1 "
        "--rdzv-backend c10d` launches on loopback, each with its own cache folder; \"whole "
        "caches\" is the same with IMAGEFIT_SHARD_CACHE=0 (every rank reading its part of each "
        "global batch from a cache of every image). Peaks per training process, sampled every "
        "50 ms: the resident pages of its cache file (images.u8 in /proc/PID/smaps: what the "
        "cache costs it) and its peak RSS (VmHWM: torch's own memory included).",
        "",
        "| run | rank | cache rows (of all) | cache on disk MB | cache resident MB | against one "
        "process | peak RSS MB | against one process | wall s | valid accuracy |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    names = {"one": "one process", "sharded": "two machines, sharded",
             "whole": "two machines, whole caches"}
    for case in result["cases"]:
        caches = case["caches"]
        for k, rank in enumerate(case["ranks"]):
            cache = caches[k] if k < len(caches) else caches[0]
            lines.append(
                f"| {names.get(case['case'], case['case'])} | {k} | {cache['rows']:,} "
                f"({cache['of']:,}) | {cache['disk_mb']:.0f} | {rank['peak_cache_rss_mb']:.0f} | "
                f"**{case['cache_of_one_process'][k]:.2f}** | {rank['peak_rss_mb']:.0f} | "
                f"{case['rss_of_one_process'][k]:.2f} | {case['seconds']:.0f} | "
                f"{case['valid_accuracy']:.4f} |")
    lines += ["", "The cache rows are counted per machine's cache folder (the rank on the node "
              "launched first may be rank 1: the rendezvous decides). Accuracy after "
              f"{result['epochs']} epochs is one seed's, not a comparison."]
    return lines


def noisy_labels(result: dict) -> list[str]:
    lines = ["## Noisy labels: plain training, soft labels, Progressive Label Correction", ""]
    lines += header(result) + [result["data"] + ".", ""]
    results = result["results"]
    plain = results.get("plain", {}).get("median")
    lines += ["| method | clean test accuracy per seed | median | spread | vs plain (points) | "
              "seconds per run (median) |", "|---|---|---|---|---|---|"]
    for method, entry in results.items():
        if not entry["test_accuracy"]:
            continue
        gain = (f"{100 * (entry['median'] - plain):+.1f}" if plain is not None
                and method != "plain" else "")
        seconds = sorted(entry["seconds"])[len(entry["seconds"]) // 2]
        lines.append(f"| {method.replace('_', ' ')} | "
                     f"{', '.join(f'{a:.4f}' for a in entry['test_accuracy'])} | "
                     f"**{entry['median']:.4f}** | {entry['spread']:.4f} | {gain} | "
                     f"{seconds:.0f} |")
    soft = results.get("soft_labels")
    if soft and soft.get("kfold_seconds"):
        costs = ", ".join(f"{s:.0f}" for s in soft["kfold_seconds"])
        agreement = ", ".join(f"{a:.3f}" for a in soft["oof_accuracy_vs_noisy_labels"])
        lines += ["", "Soft labels' cost: the 5-fold cross-validation that makes the "
                  f"out-of-fold predictions took {costs} s (included in their seconds above); "
                  f"the out-of-fold predictions agreed with the noisy labels on {agreement} of "
                  "the training rows."]
    plc = results.get("plc")
    if plc and plc.get("corrections"):
        parts = [f"{c['changed']} labels changed, {c['changed_to_clean']} to the clean label "
                 f"({c['noisy_rows_fixed']} of {c['noisy_rows']} noisy rows fixed)"
                 for c in plc["corrections"] if c]
        lines += ["", "PLC's corrections at the end of each run: " + "; ".join(parts) + "."]
    return lines


def time_to_accuracy(result: dict) -> list[str]:
    lines = ["## Time to accuracy: imagefit --budget against fastai", ""] + header(result)
    fastai = result["fastai"]
    lines += [
        f"imagefit: `{result['imagefit_command']}` (all 60,000 training images, the recipe "
        "chosen on a carved validation split: docs/RECIPES.md); accuracy is the run's final "
        "figure on the official test set, with its flip TTA where it ran (a fit planning "
        "under 10 epochs trains and ends without augmentation, and a budget that holds 15 "
        "epochs of small_cnn_32 trains it instead of small_cnn_16: docs/RECIPES.md). fastai "
        f"{fastai['fastai']}: {fastai['recipe']}, one seed, the test set as its validation "
        "set; seconds from its process's start to the end of each epoch's evaluation.",
        "",
        "| wall seconds to test accuracy | " + " | ".join(result["imagefit_times"]) + " |",
        "|---|" + "---|" * len(result["imagefit_times"]),
        "| imagefit (median of 3 seeds) | " + " | ".join(
            "not reached" if v is None else f"{v:.0f}" for v in result["imagefit_times"].values())
        + " |",
        "| fastai | " + " | ".join(
            "not reached" if v is None else f"{v:.0f}" for v in fastai["times"].values()) + " |",
        "| fastai / imagefit | " + " | ".join(
            "" if v is None else f"**{v:.1f}x**" for v in result["fastai_over_imagefit"].values())
        + " |",
        "",
        "| imagefit --budget | test accuracy per seed (with TTA where it ran) | median "
        "| median without TTA | median wall s | longest wall s (process exit) "
        "| longest s to the run directory complete | all exits within budget "
        "| epochs (median) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["imagefit_budgets"]:
        runs = [r for r in result["imagefit_runs"] if r["budget"] == row["budget"]]
        complete = max(r["used_seconds"] for r in runs)
        nets = sorted({r["model"] for r in runs if r.get("model")})
        lines.append(
            f"| {row['budget']} | {', '.join(f'{a:.4f}' for a in row['accuracies'])} | "
            f"**{row['median_accuracy']:.4f}** | {row['median_test_accuracy_without_tta']:.4f} "
            f"| {row['median_wall_seconds']:.1f} | {row['max_wall_seconds']:.1f} | "
            f"{complete:.1f} | {'yes' if row['all_within_budget'] else 'NO'} | "
            f"{row['median_epochs']:.1f}{' (' + ', '.join(nets) + ')' if nets else ''} |")
    lines += ["", "| fastai epoch | seconds since start | test accuracy |", "|---|---|---|"]
    lines += [f"| {e['epoch']} | {e['seconds']:.0f} | {e['test_accuracy']:.4f} |"
              for e in fastai["epochs"]]
    return lines


def recipe_ablation(result: dict) -> list[str]:
    if len(result.get("seeds", [0])) > 1:
        return recipe_ablation_by_seed(result)
    lines = ["## The small-image recipe's ablation", ""] + header(result)
    spread = result.get("recipe_range")
    lines += [
        f"Each row: `imagefit fit builtin:fashion-mnist --budget {result['budget']} "
        f"--valid-pct {result['valid_pct']}` and one change; accuracy on the carved "
        "validation split (10,000 images), seed 0."
        + (f" The recipe over seeds 0-2: median {result['recipe_median']:.4f} (range "
           f"{spread[0]:.4f}-{spread[1]:.4f}), the noise to read the rows against."
           if spread and len(result.get("recipe_seeds", [])) > 1 else
           " One seed: differences of about 0.3 points are within the recipe's spread "
           "between seeds (see the 1-minute table)."),
        "",
        "| change | valid accuracy | with TTA | vs recipe (points, TTA) | epochs in budget "
        "| training images/s |",
        "|---|---|---|---|---|---|",
    ]
    base = result["rows"][0].get("valid_tta_accuracy") if result["rows"] else None
    for row in result["rows"]:
        if "error" in row:
            lines.append(f"| {row['change']} | failed: {row['error']} | | | | |")
            continue
        gain = "" if row is result["rows"][0] or base is None else \
            f"{100 * (row['valid_tta_accuracy'] - base):+.2f}"
        lines.append(f"| {row['change']} | {row['valid_accuracy']:.4f} | "
                     f"{row['valid_tta_accuracy']:.4f} | {gain} | {row['epochs']:.1f} | "
                     f"{row['images_per_second']:.0f} |")
    return lines


def recipe_ablation_by_seed(result: dict) -> list[str]:
    """An ablation run at several seeds: each change's accuracies seed by seed and their
    mean, against the first row's."""
    seeds = result["seeds"]
    lines = [f"## The small-image recipe's ablation at --budget {result['budget']}, seeds "
             f"{', '.join(map(str, seeds))}", ""] + header(result)
    lines += [
        f"Each row: `imagefit fit builtin:fashion-mnist --budget {result['budget']} "
        f"--valid-pct {result['valid_pct']} --seed S` and one change; accuracy with TTA on "
        "the carved validation split (10,000 images), for each seed.",
        "",
        "| change | with TTA, per seed | mean | vs first row (points) | without TTA, mean "
        "| epochs in budget | training images/s |",
        "|---|---|---|---|---|---|---|",
    ]
    changes: dict[str, list[dict]] = {}
    for row in result["rows"]:
        changes.setdefault(row["change"], []).append(row)
    first = None
    for change, rows in changes.items():
        done = sorted((r for r in rows if "error" not in r), key=lambda r: r["seed"])
        if not done:
            lines.append(f"| {change} | failed: {rows[0]['error']} | | | | | |")
            continue
        mean = statistics.mean(r["valid_tta_accuracy"] for r in done)
        gain = "" if first is None else f"{100 * (mean - first):+.2f}"
        first = mean if first is None else first
        per_seed = ", ".join(f"{r['valid_tta_accuracy']:.4f}" for r in done)
        lines.append(
            f"| {change} | {per_seed} | "
            f"**{mean:.4f}** | {gain} | "
            f"{statistics.mean(r['valid_accuracy'] for r in done):.4f} | "
            f"{statistics.median(r['epochs'] for r in done):.1f} | "
            f"{statistics.median(r['images_per_second'] for r in done):.0f} |")
    return lines


def augment_by_length(result: dict) -> list[str]:
    split = "the carved validation split" if result["split"] == "valid" else \
        "the official test split (not used to choose)"
    lines = [f"## The recipe's augmentation by the fit's length (--budget {result['budget']})",
             ""] + header(result)
    lines += [
        f"Fashion-MNIST, `imagefit fit builtin:fashion-mnist --budget {result['budget']}` with "
        "`--augment light --tta` (the recipe's flip TTA) against `--augment none --no-tta`; "
        f"accuracy on {split} (TTA's where it ran); epochs as the budget planned them. The "
        "recipe trains without augmentation below AUGMENT_FROM_EPOCHS (10) epochs, and a "
        "budget fit decides at its first plan.",
        "",
        "| variant | accuracy per seed | median | epochs planned per seed | training images |",
        "|---|---|---|---|---|",
    ]
    names = {"aug": "light + flip TTA", "noaug": "none"}
    for variant, summary in result["summary"].items():
        rows = sorted((r for r in result["rows"] if r["variant"] == variant),
                      key=lambda r: r["seed"])
        accuracies = ", ".join(f"{r['accuracy']:.4f}" for r in rows)
        epochs = ", ".join(str(r["epochs"]) for r in rows)
        lines.append(f"| {names.get(variant, variant)} | {accuracies} | "
                     f"**{summary['median']:.4f}** | {epochs} | {rows[0]['n_train']:,} |")
    return lines


def pretrained_regression(result: dict) -> list[str]:
    lines = ["## Pretrained regression: the rotation angle of photo crops", ""] + header(result)
    low, high = result["angle_range"]
    lines += [
        f"{result['train_images']} training and {result['test_images']} test crops of "
        f"scikit-image's photos at {result['image_size']} px, each rotated by an angle drawn "
        f"from {low:g} to {high:g} degrees (the target). Each side takes its learning rate "
        "from the LR finder (a flat sweep: a tenth of the rate where the loss starts to "
        "rise). The mean predictor (the training angles' mean for every test crop) has a "
        f"test MAE of **{result['mean_predictor_test_mae']:.2f}** degrees.",
        "",
        "| side | test MAE per seed | median | spread | of the mean predictor's | lr per seed |",
        "|---|---|---|---|---|---|",
    ]
    for name, side in result["sides"].items():
        share = side["median"] / result["mean_predictor_test_mae"]
        lines.append(f"| {name} | {', '.join(f'{v:.2f}' for v in side['test_mae'])} | "
                     f"**{side['median']:.2f}** | {side['spread']:.2f} | {share:.0%} | "
                     f"{', '.join(f'{v:.2g}' for v in side['lr'])} |")
    return lines


def precision(result: dict) -> list[str]:
    lines = ["## fp32 against bf16 autocast on this CPU", ""] + header(result)
    lines += [
        f"AMX on this CPU: {'yes' if result['cpu_has_amx'] else 'no'}, so `--precision auto` "
        f"means **{result['auto_means']}** here. Default Fashion-MNIST fits of "
        f"{result['epochs']} epochs, the two precisions alternating; bf16 trains "
        f"**{result['bf16_speedup']:.2f}x** as many images per second.",
        "",
        "| precision | training images/s per run | median | test accuracy per run | median |",
        "|---|---|---|---|---|",
    ]
    for name, side in result["precisions"].items():
        speeds = ", ".join(f"{r['train_images_per_second']:.0f}" for r in side["runs"])
        accuracies = ", ".join(f"{r['test_accuracy']:.4f}" for r in side["runs"])
        lines.append(f"| {name} | {speeds} | **{side['median_images_per_second']:.0f}** | "
                     f"{accuracies} | **{side['median_test_accuracy']:.4f}** |")
    return lines


def bf16_stress(result: dict) -> list[str]:
    lines = ["## bf16 against fp32: runs that diverge", ""] + header(result)
    lines += [
        f"AMX on this CPU: {'yes' if result['cpu_has_amx'] else 'no'}; oneDNN "
        f"{result['onednn']}. ResNet-18 on 16 px digits, two precomputed epochs then one of the "
        "whole model, each seed in both precisions. A bf16 step whose loss or gradient is not "
        "finite is computed again in fp32 (docs/DESIGN.md, Training): such runs are counted "
        "apart from those that diverged.",
        "",
        "| precision | runs | diverged | runs with steps redone in fp32 | steps redone |",
        "|---|---|---|---|---|",
    ]
    for name, count in result["counts"].items():
        lines.append(f"| {name} | {count['runs']} | **{count['diverged']}** | "
                     f"{count['runs_with_steps_redone']} | {count['steps_redone']} |")
    return lines


def budget_regression(result: dict) -> list[str]:
    lines = ["## --budget on Fashion-MNIST: the regression check", ""] + header(result)
    lines += [
        f"`{result['imagefit_command']}`, the imagefit side of the time-to-accuracy "
        "benchmark alone. Accuracy: the official test set's, with test-time augmentation "
        "where the run used it; wall seconds from outside the process, start to exit.",
        "",
        "| budget | test accuracy per seed | median | wall seconds per seed | all within budget "
        "| epochs (median) |",
        "|---|---|---|---|---|---|",
    ]
    for summary in result["budgets"]:
        walls = ", ".join(f"{r['wall_seconds']:.1f}" for r in result["runs"]
                          if r["budget"] == summary["budget"])
        lines.append(
            f"| {summary['budget']} | {', '.join(f'{a:.4f}' for a in summary['accuracies'])} | "
            f"**{summary['median_accuracy']:.4f}** | {walls} | "
            f"{'yes' if summary['all_within_budget'] else 'no'} | "
            f"{summary['median_epochs']:.1f} |")
    return lines


def _cell(text: str) -> str:
    """Source code as a table cell: one line, its pipes escaped."""
    return " ".join(line.strip() for line in text.splitlines()).replace("|", "\\|")


def mutation_check(result: dict) -> list[str]:
    lines = ["## Mutation check of the tests", ""] + header(result)
    lines += [
        "Each option's or feature's effect disabled by changing one place of the source "
        "(found by module, function and a pattern over its syntax tree), in a copy of the "
        "tree; the tests named for it then run. Caught: "
        f"**{result['caught']} of {result['total']}**, in {result['seconds'] / 60:.0f} min "
        f"(the unchanged tests first: {result['baseline_seconds']:.0f} s).",
        "",
        "| mutation | function | line | changed to | failing tests | s |",
        "|---|---|---|---|---|---|",
    ]
    for m in result["mutations"]:
        failed = ", ".join(f"`{name.split('::')[-1]}`" for name in m["failing_tests"])
        if m["timed_out"]:
            failed = "timed out"
        lines.append(f"| {m['name']} | `{m['module']}:{m['function']}` | `{_cell(m['before'])}` "
                     f"| `{_cell(m['after'])}` | {failed or '**none**'} | {m['seconds']:.0f} |")
    gaps = [m for m in result["mutations"] if not m["caught"]]
    if gaps:
        lines += ["", "Not caught:", ""]
        lines += [f"- {m['name']}: {m['gap']}" for m in gaps]
    return lines


def check_speed(result: dict) -> list[str]:
    lines = ["## imagefit check on Fashion-MNIST", ""] + header(result)
    first = result["runs"][0]
    pairs = ", ".join(f"{e['pairs']} {e['splits']}" for e in first["near_by_split"]
                      if e["pairs"])
    lines += [
        f"`{result['imagefit_command']}`: every check of docs/CHECKS.md on the 70,000 images. "
        "Wall seconds from outside the process, start to exit (imports and the page "
        "included); check seconds: the checks themselves.",
        "",
        "| run | wall seconds | check seconds | exit | near-duplicate pairs |",
        "|---|---|---|---|---|",
    ]
    for k, run in enumerate(result["runs"], start=1):
        lines.append(f"| {k} | {run['wall_seconds']:.1f} | {run['check_seconds']:.1f} | "
                     f"{run['exit_code']} | {run['near_pairs']} |")
    lines += ["", f"Median wall **{result['median_wall_seconds']:.1f} s** (target: under 60 s). "
              f"Near-duplicates at dHash distance <= {first['thresholds']['hamming']} of 64 "
              f"and mean pixel difference <= {first['thresholds']['pixel_diff']:g} of 255: "
              f"{pairs}. Verdicts: " + ", ".join(f"{k} {v}" for k, v in
                                                first["verdicts"].items()) + "."]
    return lines


def sweep_fashion_mnist(result: dict) -> list[str]:
    lines = ["## imagefit sweep on Fashion-MNIST", ""] + header(result)
    lines += [
        f"`{result['imagefit_command']}`; wall {result['wall_seconds']:.0f} s from outside "
        f"the process (budget {result['budget_seconds']:.0f} s). Figure: "
        f"`bench/results/{result['figure']}`.",
        "",
        "| model | params | best valid accuracy | best epoch | gap at best | epochs | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        best = "-" if row["best"] is None else f"{row['best']:.4f}"
        gap = "-" if row["gap_at_best"] is None else f"{row['gap_at_best']:+.4f}"
        params = "-" if row["params"] is None else f"{row['params']:,}"
        lines.append(f"| {row['model']} | {params} | {best} | "
                     f"{row['best_epoch']} | {gap} | {row['epochs']} | {row['seconds']:.0f} |")
    return lines


def label_issues(result: dict) -> list[str]:
    lines = ["## Label issues on Fashion-MNIST (cleanlab on 5-fold out-of-fold predictions)",
             ""] + header(result)
    lines += [
        f"{result['data']}. A 5-fold CV with the small-image recipe "
        f"({result['cv']['model']}, {result['cv']['epochs']} epochs); `imagefit label-issues` "
        f"flags rows by confident learning (filter_by {result['cv']['filter_by']}); the "
        "top-loss baseline takes as many rows, ranked by their out-of-fold loss (the report's "
        "top losses). Then fits of 10 epochs on the same noisy rows, clean test accuracy, "
        "medians of 3 seeds (spread: max - min).",
        "",
        "| noise | flipped | flagged | cleanlab precision | cleanlab recall | top-loss "
        "precision | top-loss recall | CV seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for entry in result["results"]:
        c, t = entry["cleanlab"], entry["top_loss"]
        lines.append(f"| {entry['noise']:.0%} | {entry['flipped']} | {c['flagged']} | "
                     f"**{c['precision']:.3f}** | **{c['recall']:.3f}** | {t['precision']:.3f} "
                     f"| {t['recall']:.3f} | {entry['cv_seconds']:.0f} |")
    lines += ["", "cleanlab's other flagging rules on the same out-of-fold predictions "
              "(precision / recall, flagged):", "", "| noise | " + " | ".join(
                  result["results"][0]["other_filters"]) + " |",
              "|---|" + "---|" * len(result["results"][0]["other_filters"])]
    for entry in result["results"]:
        cells = [f"{v['precision']:.3f} / {v['recall']:.3f} ({v['flagged']})"
                 for v in entry["other_filters"].values()]
        lines.append(f"| {entry['noise']:.0%} | " + " | ".join(cells) + " |")
    lines += ["", "| noise | fit | test accuracy per seed | median | spread | seconds per "
              "seed |", "|---|---|---|---|---|---|"]
    for entry in result["results"]:
        for name, fit in entry["fits"].items():
            dropped = f" ({fit['dropped']} rows dropped)" if "dropped" in fit else ""
            lines.append(f"| {entry['noise']:.0%} | {name}{dropped} | "
                         f"{', '.join(f'{a:.4f}' for a in fit['test_accuracy'])} | "
                         f"**{fit['median']:.4f}** | {fit['spread']:.4f} | "
                         f"{', '.join(f'{s:.0f}' for s in fit['seconds'])} |")
    return lines


def label_issues_rules(result: dict) -> list[str]:
    lines = ["## Label issues: cleanlab's flagging rules compared", ""] + header(result)
    lines += [
        f"The data of the section above; one 5-fold CV per noise level "
        f"({result['cv']['model']}, {result['cv']['epochs']} epochs). Each rule's flagged set "
        "against the planted flips (precision / recall, flagged), and the same number of "
        "rows taken by out-of-fold loss.",
        "",
        "| noise | OOF accuracy | rule | flagged | precision | recall | top-loss precision "
        "| top-loss recall |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for entry in result["results"]:
        for rule, v in entry["rules"].items():
            t = v["top_loss_same_count"]
            lines.append(f"| {entry['noise']:.0%} | {entry['oof_accuracy']:.4f} | {rule} | "
                         f"{v['flagged']} | {v['precision']:.3f} | {v['recall']:.3f} | "
                         f"{t['precision']:.3f} | {t['recall']:.3f} |")
    return lines


def data_issue_features(result: dict) -> list[str]:
    lines = ["## Label issues: the features Datalab compares for outliers and near-duplicates",
             ""] + header(result)
    lines += [
        f"tests/test_label_issues.py's digits ({result['results'][0]['rows']} 16-pixel files, "
        "10% of labels moved, row i in fold i % 5, a 5-fold CV of "
        f"{result['cv']['epochs']} epochs with --train-on-all per seed) with planted copies (3 "
        "in their original's fold, 3 in another; 5 altered in another: JPEG, a 1-pixel shift, "
        "darker, noisier, blurred) and 8 odd images (3 of uniform noise, an inverted digit, "
        "gray, a checkerboard, a hollow square, bars). Each candidate's features go to "
        "Datalab as label-issues gives them; per seed, separated by commas: copies paired with "
        "their original, other rows called duplicates, odd images flagged outliers, the worst "
        "outlier rank of an odd image, and other rows flagged outliers (how many of them had "
        "a label moved).",
        "",
        "| features | copies | altered copies | other duplicates | odd images flagged "
        "| worst odd rank | other outliers (label moved) |",
        "|---|---|---|---|---|---|---|",
    ]
    runs = result["results"]
    for name in runs[0]["candidates"]:
        per_seed = [run["candidates"][name] for run in runs]
        cells = [", ".join(str(v[key]) for v in per_seed) for key in (
            "copies found", "altered copies found", "other rows called duplicates",
            "odd images flagged")]
        cells.append(", ".join(str(max(v["odd images' outlier ranks"])) for v in per_seed))
        cells.append(", ".join(f"{v['other rows flagged outliers']} "
                               f"({v['of which label moved']})" for v in per_seed))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def summary_speed(result: dict) -> list[str]:
    lines = ["## imagefit summary and imagefit models", ""] + header(result)
    lines += ["Wall seconds from outside the process, start to exit, imports included "
              "(target for the summary: under 5 s).", "",
              "| command | wall seconds per run | median | lines printed |",
              "|---|---|---|---|"]
    for entry in result["results"].values():
        lines.append(f"| `{entry['command']}` | "
                     f"{', '.join(f'{w:.2f}' for w in entry['wall_seconds'])} | "
                     f"**{entry['median']:.2f}** | {entry['lines']} |")
    lines += [
        "",
        "Almost all of it is importing torch, torchvision (which timm imports) and timm: 4.2 s "
        "of",
        "`import imagefit.models.zoo` in the same hour, against 0.19 s to build regnety_002 on "
        "the meta",
        "device and count it; `import torch` alone took 2.1 s. The same command measured a "
        "median of",
        "3.70 s (3.71, 3.68, 3.70) on 2026-12-02T03:59 on this shared machine: the margin "
        "under 5 s",
        "depends on how fast it imports torch at the time.",
    ]
    return lines


TEXT_MODELS = {"baseline": "TF-IDF char 1-4-grams + logistic regression"}


def text(result: dict) -> list[str]:
    lines = ["## Text: the char-CNN against TF-IDF + logistic regression on names", ""]
    lines += header(result, also="; scikit-learn's TfidfVectorizer and LogisticRegression")
    runs, summary = result["runs"], result["summary"]
    cnns = [name for name in summary if name != "baseline"]
    epochs = " or ".join(name.removeprefix("char_cnn_") for name in cnns)
    split = " / ".join(f"{n:,}" for n in sorted({(r["n_train"], r["n_held_out"]) for r in runs})[0])
    cs = [r["baseline"]["C"] for r in runs]
    chosen = f"{cs[0]:g} on every seed" if len(set(cs)) == 1 else \
        ", ".join(f"{c:g}" for c in cs) + " on the seeds"
    length = runs[0][cnns[0]]["length"] if cnns else "?"
    lines += [
        f"Data: `builtin:names`, the {result['n_names']:,} given names of gender-guesser's "
        "name list marked plainly male",
        "or female (unisex and uncertain marks dropped, names marked both ways dropped). Per "
        "seed, one",
        f"stratified 80/20 split ({split} names) that both models share; accuracy on the 20%.",
        "Baseline: TF-IDF over character 1-4-grams (sublinear tf) and logistic regression, "
        "its C chosen",
        f"from 1, 3, 10, 30 by 3-fold CV on the 80% ({chosen}). char-CNN: `imagefit fit` with",
        "every default of `--task text` (char_cnn, one-cycle AdamW 3e-3, batch 128, length "
        f"{length} = the",
        f"99th percentile), no validation split, {epochs} epochs. Seconds: wall time of each, "
        "the",
        "baseline's CV search included.",
        "",
        "| model | " + " | ".join(f"seed {r['seed']}" for r in runs)
        + " | median accuracy | median seconds | beats the baseline |",
        "|---|" + "---|" * (len(runs) + 3),
    ]
    best = [max(r[name]["accuracy"] for name in summary) for r in runs]
    best_median = max(s["median_accuracy"] for s in summary.values())
    base = summary["baseline"]["median_accuracy"]
    # The baseline's own seed-to-seed range: a median gain inside it is read as a tie.
    noise = max(r["baseline"]["accuracy"] for r in runs) - \
        min(r["baseline"]["accuracy"] for r in runs)

    def bold(value: float, top: float) -> str:
        return f"**{value:.4f}**" if value == top else f"{value:.4f}"

    for name, entry in summary.items():
        model = TEXT_MODELS.get(name, f"char-CNN, {name.removeprefix('char_cnn_')} epochs")
        accuracies = " | ".join(bold(r[name]["accuracy"], top) for r, top in zip(runs, best))
        if name == "baseline":
            beats = "-"
        else:
            wins = sum(r[name]["accuracy"] > r["baseline"]["accuracy"] for r in runs)
            gain = 100 * (entry["median_accuracy"] - base)
            seeds = "every seed" if wins == len(runs) else \
                "no seed" if wins == 0 else f"{wins} of {len(runs)} seeds"
            median = f"a tie in the median: {gain:+.2f} points" \
                if abs(gain) < 100 * noise and wins < len(runs) \
                else f"{gain:+.2f} points in the median"
            beats = f"{seeds} ({median})"
        lines.append(f"| {model} | {accuracies} | "
                     f"{bold(entry['median_accuracy'], best_median)} | "
                     f"{entry['median_seconds']:.1f} | {beats} |")
    lines += [
        "",
        "At imagefit's default 5 epochs the char-CNN only ties the tuned linear baseline; 10 "
        "epochs",
        "beat it on every seed. What else was tried, median of seeds 0 and 1 (the defaults "
        "there:",
        "0.8781 at 5 epochs, 0.8846 at 10), with /tmp scripts over `imagefit.fit`: learning "
        "rate 1e-2,",
        "0.8771; 5e-3 with batch 64, 0.8778; batch 32, 0.8809; 256 filters of widths 1-6, "
        "0.8802, and",
        "with batch 64, 0.8821 at 1.7x the time of 5 default epochs (10 default epochs are "
        "faster and",
        "better); embedding 64, 256 filters, dropout 0.5 over 10 epochs, 0.8843; boundary "
        "marks before",
        "and after each text, 0.8768 at 5 epochs and 0.8841 at 10 (the padding after a text, "
        "whose",
        "embedding is zero, already marks its end for the convolutions: dropped). A course's",
        "Spanish-only name list reached 0.929 in 5 epochs; this list mixes the naming habits "
        "of",
        "dozens of countries (an ending that marks women in one language marks men in "
        "another).",
    ]
    return lines


ENGINES = ("onnxruntime", "eager_fp32", "eager_bf16")
# bench/export.py records neither these versions nor whether the CPU has AMX: the figures
# measured on 2026-12-02, used while a result lacks them.
EXPORT_VERSIONS = {"onnxruntime": "1.32.0", "onnx": "1.23.2"}


def export(result: dict) -> list[str]:
    lines = ["## Export: onnxruntime against eager PyTorch", ""]
    versions = {k: result["versions"][k] for k in ("imagefit", "torch", "timm")
                if k in result["versions"]}
    versions |= {k: result["versions"].get(k, v) for k, v in EXPORT_VERSIONS.items()}
    lines += header(result, versions=versions, cores_note=" with AMX")
    lines += [
        "Images per second of the same module (uint8 in; normalization, the model and softmax "
        "inside),",
        "timed by torch.utils.benchmark's blocked timing (median of blocks after a warm-up), "
        "in one",
        "process: onnxruntime (CPU provider) on the file `imagefit export` writes, and eager "
        "PyTorch as",
        "imagefit's inference runs it (channels-last), in fp32 and in the bf16 autocast "
        "imagefit picks",
        "on CPUs with AMX. Parity: the largest difference of a probability between onnxruntime "
        "and",
        "eager fp32 on 16 images (classifiers given random weights, so the outputs are not "
        "uniform).",
        "",
        "| model | px | batch | onnxruntime | eager fp32 | eager bf16 | onnxruntime / eager fp32 "
        "| parity |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["results"]:
        best = max(r[engine] for engine in ENGINES)
        rates = " | ".join(f"**{r[e]:,.1f}**" if r[e] == best else f"{r[e]:,.1f}"
                           for e in ENGINES)
        lines.append(f"| {r['model']} | {r['image_size']} | {r['batch']} | {rates} | "
                     f"{r['onnxruntime_vs_eager_fp32']:g}x | {r['parity']:.1e} |")
    rows = {(r["model"], r["batch"]): r for r in result["results"]}
    one, many = rows.get(("resnet18", 1)), rows.get(("resnet18", 64))
    if one and many:
        lines += [
            "",
            "At batch 1 onnxruntime is the fastest of the three for both nets (resnet18: "
            f"{one['onnxruntime']:.0f} images/s",
            f"against {one['eager_bf16']:.0f} in bf16 and {one['eager_fp32']:.0f} in fp32); at "
            "batch 64 it stays ahead of fp32, but eager bf16 on",
            f"AMX is faster for resnet18 ({many['eager_bf16']:.0f} against "
            f"{many['onnxruntime']:.0f} images/s): for large batches on such CPUs, the",
            "run itself (`imagefit predict RUN`) is the faster way. (An earlier run of the same "
            "benchmark",
            "with a hand-written timer, earlier the same day, gave the same order: resnet18 at "
            "batch 1 64 /",
            "48 / 35.)",
        ]
    return lines


def serve(result: dict) -> list[str]:
    lines = ["## imagefit serve: requests per second and latency on loopback", ""]
    lines += header(result, also="; " + ", ".join(
        f"{k} {v}" for k, v in result.get("server_versions", {}).items()))
    lines += [
        "`imagefit serve` in its own process; client threads in another, each with its own "
        "keep-alive",
        "connection, posting one image per request (a Fashion-MNIST test image as PNG for "
        "small_cnn_16",
        "at 28 px, one of four scikit-image photos at 256 px for resnet18 at 224 px, trained 1 "
        "epoch on",
        "digits), for a fixed time after a 2 s warm-up. Clients and server share the 2 cores. "
        "torch: the",
        "run directory (eager, the precision imagefit picks); onnxruntime: its `imagefit "
        "export`.",
        "Images per pass: how many requests' images the batcher ran together on average.",
        "",
        "| model | engine | clients | requests | failed | requests/s | p50 ms | p99 ms "
        "| images per pass |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows = result["results"] + [dict(r, engine=r["engine"] + ", batching off")
                                for r in result["batching_off"]]
    rows.sort(key=lambda r: (r["model"] != "small_cnn_16", r["clients"], r["engine"]))
    for r in rows:
        lines.append(f"| {r['model']} | {r['engine']} | {r['clients']} | {r['requests']:,} | "
                     f"{r['failed']} | {r['requests_per_second']:,.1f} | {r['p50_ms']} | "
                     f"{r['p99_ms']} | {r['images_per_forward_pass']} |")
    def rate(model: str, engine: str, clients: int) -> float:
        return next(r["requests_per_second"] for r in rows
                    if (r["model"], r["engine"], r["clients"]) == (model, engine, clients))

    gains = ", ".join(f"{rate(m, 'torch', 32) / rate(m, 'torch, batching off', 32):.1f}x for {m}"
                      for m in dict.fromkeys(r["model"] for r in result["batching_off"]))
    lines += [
        "",
        f"Sharing forward passes between concurrent requests serves, at 32 clients, {gains} "
        "the requests per second of one pass per request (`--max-batch 1`), and cuts the "
        "median latency as much. onnxruntime answers one client fastest (resnet18: "
        f"{rate('resnet18', 'onnxruntime', 1):.0f} against {rate('resnet18', 'torch', 1):.0f} "
        "requests/s); with many clients the batches grow and eager torch, in the bf16 autocast "
        "it runs on CPUs with AMX, overtakes it on resnet18 "
        f"({rate('resnet18', 'torch', 32):.0f} against "
        f"{rate('resnet18', 'onnxruntime', 32):.0f}), as bench/export.py found at batch 64.",
    ]
    hold, flood = result["hold"], result["flood"]
    statuses = ", ".join(f"{count} x {status}" for status, count in flood["statuses"].items())
    lines += [
        "",
        f"Held load: {hold['clients']} clients for {hold['seconds']:g} s on {hold['model']} "
        f"({hold['engine']}): **{hold['requests']:,} requests, {hold['failed']} failed**, "
        f"{hold['requests_per_second']:,.1f} requests/s, p50 {hold['p50_ms']} ms, "
        f"**p99 {hold['p99_ms']} ms**.",
        "",
        f"Flood of bad uploads: {flood['clients']} clients for {flood['seconds']:g} s sending "
        "text files, truncated PNGs, empty files, 11 MB files and 20-file requests: "
        f"{statuses} ({'only 4xx' if flood['only_4xx'] else 'NOT only 4xx'}); /health "
        f"answered {flood['health_checks'] - flood['health_failed']} of "
        f"{flood['health_checks']} checks meanwhile (slowest {flood['health_max_ms']} ms); "
        f"server errors: {flood['server_failed']}; a good image afterwards: "
        f"{flood['good_after']}.",
    ]
    return lines


def _params(params: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in params.items())


def _optuna(result: dict) -> str:
    return f", optuna {result['optuna']}" if result.get("optuna") else ""


def tune_digits(result: dict) -> list[str]:
    lines = ["## imagefit tune on digits", ""] + header(result, also=_optuna(result))
    runs = [("SQLite, `--workers 2`", result["sqlite_two_workers"])]
    if "postgresql_two_commands" in result:
        runs.append(("PostgreSQL, two commands", result["postgresql_two_commands"]))
    lines += [
        "20 trials of the default space (5 epochs each, the median pruner) on builtin:digits' "
        "carved validation split, then `--confirm 3`: the three best trials' options and the "
        "defaults refitted on seeds 1-3 (validation splits and starts the search did not "
        "see); best.yaml takes the best median.",
        "",
        "| study | seconds (search and refits) | trials | pruned | failed | "
        "best trial (its valid accuracy) | chosen: median valid accuracy | "
        "defaults: median valid accuracy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, run in runs:
        best = run["best"]
        confirm = run.get("confirm") or {}
        chosen = "-" if not confirm else (
            f"**{confirm['median_chosen']:.4f}** (trial {confirm['chosen']})")
        defaults = "-" if not confirm else f"{confirm['median_defaults']:.4f}"
        lines.append(f"| {label} | {run['seconds']:.0f} | {run['trials']} | {run['pruned']} "
                     f"({run['pruned_share']:.0%} of finished) | {run['failed']} | "
                     f"{best['number']} ({best['value']:.4f}) | {chosen} | {defaults} |")
    for label, run in runs:
        confirm = run.get("confirm")
        if not confirm:
            continue
        seeds = confirm["seeds"]
        lines += ["", f"Refits, {label}:", "",
                  "| options | search's valid accuracy | "
                  + " | ".join(f"seed {s}" for s in seeds) + " | median |",
                  "|---|---|" + "---|" * len(seeds) + "---|"]
        for entry in confirm["entries"]:
            searched = entry.get("search_value")
            values = " | ".join(f"{v:.4f}" for v in entry["values"])
            what = entry["label"] if not entry["params"] else \
                f"{entry['label']}: {_params(entry['params'])}"
            lines.append(f"| {what} | {'-' if searched is None else f'{searched:.4f}'} | "
                         f"{values} | {entry['median']:.4f} |")
        if "trials_by_command" in run:
            lines += ["", "Trials started by each command: "
                      + ", ".join(map(str, run["trials_by_command"])) + "."]
    return lines


TUNE_NOTES = {
    "tune_fashion_mnist_epoch_pruning": "An earlier run of the same command, when the pruner "
    "still compared budget trials by epoch: each trial plans its own epochs for its two "
    "minutes (small_cnn_16 24, small_cnn_64 4), so at epoch 2 the short schedules were far "
    "ahead and every trial of the narrower nets after the fourth was pruned at epoch 2 or 3. "
    "The pruner now compares budget trials at tenths of their schedules (the run above).",
}


def tune_fashion_mnist(result: dict) -> list[str]:
    lines = ["## imagefit tune on Fashion-MNIST", ""] + header(result, also=_optuna(result))
    note = TUNE_NOTES.get(result["benchmark"])
    lines += [note, ""] if note else []
    best = result["best"]
    defaults = result["defaults"]
    lines += [
        f"`imagefit tune builtin:fashion-mnist --timeout {result['timeout']} --budget "
        f"{result['budget']}` (the default space, one worker, trials of {result['budget']} "
        f"each): {result['n_trials']} trials in {result['tune_seconds']:.0f} s, "
        f"{result['pruned']} pruned, {result['failed']} failed. Then the default recipe, "
        f"`imagefit fit builtin:fashion-mnist --budget {result['budget']}` on seeds "
        f"{', '.join(str(d['seed']) for d in defaults)}, in the same run.",
        "",
        "| | test accuracy | valid accuracy | epochs |",
        "|---|---|---|---|",
        f"| best trial ({best['number']}: {_params(best['params'])}) | "
        f"**{best['test_accuracy']:.4f}** | {best['value']:.4f} | {best['epochs']} |",
    ]
    for d in defaults:
        lines.append(f"| defaults, seed {d['seed']} | {d['test_accuracy']:.4f} | "
                     f"{d['valid_accuracy']:.4f} | {d['epochs']} |")
    lines += [f"| defaults, median | **{result['defaults_median_test_accuracy']:.4f}** | | |",
              "", "Trials ('reported to the pruner': epochs when it compared by epoch, "
              "tenths of the schedule since):", "",
              "| trial | state | valid accuracy | reported to the pruner | seconds | options |",
              "|---|---|---|---|---|---|"]
    for t in result["trials"]:
        params = {k.removeprefix("param_"): v for k, v in t.items()
                  if k.startswith("param_") and v is not None}
        value = "-" if t["value"] is None else f"{t['value']:.4f}"
        seconds = "-" if t["seconds"] is None else f"{t['seconds']:.0f}"
        reported = t.get("reports", t["epochs"])  # before "reports": epochs held them
        lines.append(f"| {t['number']} | {t['state']} | {value} | {reported} | {seconds} | "
                     f"{_params(params)} |")
    return lines


def photo_default(result: dict) -> list[str]:
    lines = ["## Photos by default: pretrained tf_efficientnet_lite0 against resnet18 from "
             "scratch", ""] + header(result)
    lines += [
        "`imagefit fit FOLDER --budget B --seed S` and nothing else (the new default: "
        "tf_efficientnet_lite0 from the ImageNet weights of the installed package, one frozen "
        "epoch, then every layer at lr/100 .. lr), against the same with `--pretrained none` "
        "(the old default: resnet18 from scratch). Wall seconds from outside the process "
        "(imports, the first cache build and the report included; the budget does not count "
        "the cache build). Accuracy on the set's own test folder, with TTA when the fit ran "
        "it. fashion-mnist-64: 2,000 training images of Fashion-MNIST upscaled to 64 px RGB, "
        "2,000 test images (a poor domain for ImageNet weights). photo-crops-48: 60 training "
        "crops of six scikit-image photos at 48 px, 600 test crops (easy: one photo a class).",
        "",
    ]
    if any(r["side"].startswith("fastai") for r in result["summary"]):
        lines += [
            "fastai rows: fastai 2.8's `fine_tune` on the same timm body loaded with the same "
            "weights, fastai's head, `aug_transforms()`, the weights' normalization, 20% of the "
            "training folder for validation, batches of 64 (16 on the 60 crops), at "
            "`lr_find()`'s valley or at fine_tune's default 2e-3; one frozen epoch, then as "
            "many unfrozen epochs as its timings say fit what is left of the budget (at least "
            "one), timed from the script's start (bench/fastai_finetune.py)."
            + (" Its epochs foreseen from steps timed with fastai's own optimizer and its test "
               "evaluation as a fixed part and a part per image (timed on 64 and 256 images)."
               if any("test_estimate_seconds" in r.get("seconds", {}) for r in result["runs"])
               else ""),
            ""]
    if result.get("note"):
        lines += [result["note"], ""]
    if result.get("complete") is False:
        lines += ["Interrupted: the sides finished before it.", ""]
    lines += [
        "| set | budget | side | model | accuracy (median) | seeds | wall s (median) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["summary"]:
        accuracies = ", ".join(f"{a:.4f}" for a in r["accuracies"])
        lines.append(f"| {r['set']} | {r['budget']} | {r['side']} | {r['model']} | "
                     f"**{r['median_accuracy']:.4f}** | {accuracies} | "
                     f"{r['median_wall_seconds']:.1f} |")
    speed = result.get("training_images_per_second") or {}
    if speed:
        lines += ["", "Training images a second of the candidate nets (batch 32, channels-last, "
                  "AdamW, random weights; median of 3 repeats of 5 steps), same run:", "",
                  "| net @ size | images/s |", "|---|---|"]
        lines += [f"| {name} | {rate:.1f} |" for name, rate in speed.items()]
    return lines


def photo_recipe(result: dict) -> list[str]:
    lines = [f"## The photo fine-tuning recipe's ablation at --budget {result['budget']}", ""]
    lines += header(result)
    lines += [
        "`imagefit fit FOLDER --budget B --seed S` with the change's flags, each change alone "
        "against the default (pretrained tf_efficientnet_lite0: one frozen epoch with its "
        "BatchNorm weights training, then every layer at lr/100 .. lr; lr 3e-3; the images' "
        "own size; no augmentation; TTA dropped when over a tenth of the budget; no label "
        "smoothing) measured in the same run. Accuracy on the set's own test folder (with TTA "
        "when the fit ran it), wall seconds from outside the process. 'better seeds': on how "
        "many seeds the change beat the default's same seed.", ""]
    if result.get("complete") is False:
        lines += ["Interrupted: the changes finished before it.", ""]
    lines += ["| set | change | accuracy (median) | vs default | better seeds | seeds | "
              "epochs (median) | wall s (median) |", "|---|---|---|---|---|---|---|---|"]
    for r in result["summary"]:
        accuracies = ", ".join(f"{a:.4f}" for a in r["accuracies"])
        lines.append(f"| {r['set']} | {r['change']} | **{r['median_accuracy']:.4f}** | "
                     f"{r['vs_default']:+.4f} | {r['better_seeds']}/{len(r['accuracies'])} | "
                     f"{accuracies} | {r['median_epochs']:g} | "
                     f"{r['median_wall_seconds']:.1f} |")
    return lines


SECTIONS = {"time_to_accuracy": time_to_accuracy,
            "recipe_ablation": recipe_ablation,
            "augment_by_length": augment_by_length,
            "fashion_mnist_default": fashion_mnist_default,
            "fashion_mnist_folder": fashion_mnist_folder,
            "augment": augment,
            "augment_accuracy": augment_accuracy,
            "transfer": transfer,
            "photo_default": photo_default,
            "photo_recipe": photo_recipe,
            "saliency_focus": saliency_focus,
            "compute_floor": compute_floor,
            "cache_memory": cache_memory,
            "sharded_cache": sharded_cache,
            "noisy_labels": noisy_labels,
            "pretrained_regression": pretrained_regression,
            "precision": precision,
            "bf16_stress": bf16_stress,
            "budget_regression": budget_regression,
            "mutation_check": mutation_check,
            "check_speed": check_speed,
            "sweep_fashion_mnist": sweep_fashion_mnist,
            "label_issues": label_issues,
            "label_issues_rules": label_issues_rules,
            "data_issue_features": data_issue_features,
            "summary_speed": summary_speed,
            "text": text,
            "export": export,
            "serve": serve,
            "tune_digits": tune_digits,
            "tune_fashion_mnist": tune_fashion_mnist}


def section_of(benchmark: str) -> str | None:
    """The section a result belongs to: its benchmark name, or the longest section name it
    extends (augment_accuracy_side_on -> augment_accuracy)."""
    matching = [name for name in SECTIONS if benchmark == name or benchmark.startswith(name + "_")]
    return max(matching, key=len, default=None)


def main() -> None:
    lines = ["# Benchmarks", "",
             "Generated by `bench/tables.py` from `bench/results/*.json`; each section says how "
             "to rerun it. Timings come from a shared machine: compare figures measured in the "
             "same run.", ""]
    results = [json.loads(path.read_text()) for path in sorted(RESULTS.glob("*.json"))]
    for name, render in SECTIONS.items():
        for result in results:
            if section_of(result["benchmark"]) == name:
                lines += render(result) + [""]
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    DOCS.write_text("\n".join(lines))
    print(f"wrote {DOCS}")


if __name__ == "__main__":
    main()
