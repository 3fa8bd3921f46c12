"""imagefit check: planted defects are caught with the verdict and message promised in
docs/CHECKS.md, a clean dataset passes every check, and fit --check stops before training."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import imagefit
from imagefit.data.near_duplicates import near_duplicate_pairs
from imagefit.workflows import build

FAST = {"progress": False, "sanity_steps": 30}


def smooth_images(n: int, size: int, seed: int, channels: int = 3) -> np.ndarray:
    """Distinct textured images: random 6x6 fields enlarged smoothly (no two alike)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, size, size, channels), dtype=np.uint8)
    for i in range(n):
        small = rng.integers(0, 256, (6, 6, channels), dtype=np.uint8)
        mode = "RGB" if channels == 3 else "L"
        image = Image.fromarray(small if channels == 3 else small[..., 0], mode)
        big = np.asarray(image.resize((size, size), Image.BICUBIC))
        out[i] = big.reshape(size, size, channels)
    return out


def by_check(result) -> dict:
    return {f.check: f for f in result.findings}


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "imagefit", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def planted_folder(tmp_path_factory) -> tuple[Path, dict]:
    """A CSV dataset of 48 px photos-like images: 120 training, 24 test, and among the test
    rows 3 byte-for-byte copies of training images and 3 copies resized to 80 px and saved
    as JPEG (quality 90)."""
    root = tmp_path_factory.mktemp("planted")
    images = smooth_images(144, 48, seed=1)
    labels = np.arange(144) % 3
    rows = ["path,label,split"]
    for i, image in enumerate(images):
        path = root / f"img_{i}.png"
        Image.fromarray(image).save(path)
        rows.append(f"{path.name},c{labels[i]},{'train' if i < 120 else 'test'}")
    for k in range(3):  # exact copies of training images 0-2, under their labels
        shutil.copy(root / f"img_{k}.png", root / f"copy_{k}.png")
        rows.append(f"copy_{k}.png,c{labels[k]},test")
    for k in range(3, 6):  # resized and re-encoded copies of training images 3-5
        Image.fromarray(images[k]).resize((80, 80), Image.BICUBIC).save(
            root / f"jpeg_{k}.jpg", quality=90)
        rows.append(f"jpeg_{k}.jpg,c{labels[k]},test")
    (root / "data.csv").write_text("\n".join(rows) + "\n")
    return root / "data.csv", {"exact": 3, "near": 3, "test": 30}


def test_copies_across_train_and_test_are_found_counted_and_fail_the_leak_check(
        planted_folder, tmp_path):
    csv, planted = planted_folder
    result = imagefit.check(csv, runs_dir=tmp_path, image_size=32, valid_pct=0, **FAST)
    found = by_check(result)
    exact, near, leak = (found["exact duplicates"], found["near duplicates"],
                         found["leakage across splits"])
    assert exact.details["evaluated_with_train_copy"]["test"] == planted["exact"]
    assert near.details["evaluated_with_train_copy"]["test"] == planted["near"]
    assert near.details["by_split"][2] == {"splits": "train-test", "pairs": planted["near"]}
    assert leak.status == "fail"
    assert leak.details["copies"]["test"] == planted["exact"] + planted["near"]
    assert "6 of 30 test images (20.00%) copy a training image" in leak.result
    assert leak.advice.startswith("their figures measure memory, not generalization")
    assert "copy_" in exact.result  # the file named
    listed = json.loads((result.check_dir / "check.json").read_text())["pairs"]
    assert {Path(p["second"]).name for p in listed} == {f"jpeg_{k}.jpg" for k in (3, 4, 5)}
    assert (result.check_dir / "pairs.png").is_file()
    assert result.failed == [leak]


def test_resized_and_reencoded_copies_are_near_and_distinct_images_are_not():
    images = smooth_images(40, 48, seed=2)
    copy = np.asarray(Image.fromarray(images[0]).resize((80, 80)).resize((48, 48)))
    shifted = np.roll(images[1], 6, axis=1)  # the same picture moved: another image
    stack = np.concatenate([images, copy[None], shifted[None]])
    pairs, diffs = near_duplicate_pairs(stack, np.arange(len(stack)))
    assert pairs.tolist() == [[0, 40]]
    assert 0 < diffs[0] <= 3


def test_a_label_written_in_a_corner_pixel_fails_the_label_sanity_check(tmp_path):
    images = smooth_images(300, 16, seed=3, channels=1)
    labels = np.arange(300) % 3
    images[:, 0, 0, 0] = labels * 100  # the label, in the top-left pixel
    table = imagefit.from_arrays(images, labels)
    result = imagefit.check(table, runs_dir=tmp_path, valid_pct=0.3, **FAST)
    probe = by_check(result)["label in pixels"]
    assert probe.status == "fail"
    assert probe.details["pixel"] == {"x": 0, "y": 0, "channel": 0}
    assert probe.details["balanced_accuracy"] > 0.99
    assert "the best single pixel (x 0, y 0) tells the class" in probe.result
    assert probe.advice.startswith("the label is written into the images")
    clean = imagefit.check(imagefit.from_arrays(smooth_images(300, 16, 3, 1), labels),
                           runs_dir=tmp_path, valid_pct=0.3, **FAST)
    assert by_check(clean)["label in pixels"].status == "pass"


def test_a_frozen_model_fails_the_one_batch_check_with_the_frozen_hint(monkeypatch, tmp_path):
    create = build.create_model

    def frozen(*args, **kwargs):
        model = create(*args, **kwargs)
        for p in model.parameters():
            p.requires_grad_(False)
        return model

    monkeypatch.setattr(build, "create_model", frozen)
    result = imagefit.check("builtin:digits", runs_dir=tmp_path, **FAST)
    one = by_check(result)["one batch"]
    assert one.status == "fail"
    total = one.details["parameters"]
    assert one.result == f"no step taken: all {total:,} parameters are frozen"
    assert one.advice == (f"{total:,} of {total:,} parameters are frozen (requires_grad "
                          "False): unfreeze the model")


def test_a_model_mostly_frozen_names_the_frozen_share(monkeypatch, tmp_path):
    create = build.create_model

    def body_frozen(*args, **kwargs):
        model = create(*args, **kwargs)
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("head") and name.endswith("bias"))
        return model

    monkeypatch.setattr(build, "create_model", body_frozen)
    result = imagefit.check("builtin:digits", runs_dir=tmp_path, **FAST)
    one = by_check(result)["one batch"]
    assert one.status == "fail"
    assert f"{one.details['frozen']:,} of {one.details['parameters']:,} parameters are " \
        "frozen (requires_grad False): unfreeze the model" in one.advice


def test_a_learning_rate_of_1e7_fails_the_one_batch_check_with_the_rate_hint(tmp_path):
    result = imagefit.check("builtin:digits", runs_dir=tmp_path, lr=1e-7, **FAST)
    one = by_check(result)["one batch"]
    assert one.status == "fail"
    assert one.advice.startswith("the rate is too low: the sweep on this batch fits it at ")
    assert "(at 1e-07 the loss ends at " in one.advice
    assert one.advice.endswith("give a --lr in that range, or --lr auto")
    fitted = [float(rate) for rate, ratio in one.details["sweep"].items() if ratio <= 0.05]
    assert fitted and min(fitted) > 1e-7


def test_a_diverging_rate_names_the_nan_and_a_lower_range(tmp_path):
    result = imagefit.check("builtin:digits", runs_dir=tmp_path, lr=1e4, **FAST)
    one = by_check(result)["one batch"]
    assert one.status == "fail"
    assert "the loss became NaN or infinite at step" in one.advice
    assert "the rate is too high: the sweep on this batch fits it at " in one.advice


def test_a_clean_digits_run_passes_every_check_and_exits_0(tmp_path):
    done = run_cli("check", "builtin:digits", "--no-progress", "--runs-dir", str(tmp_path),
                   cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    table = lines[1:lines.index(next(x for x in lines if " failed, " in x))]
    statuses = {line.split()[0] for line in table if line[:1].strip()}
    assert "check" not in statuses  # header skipped above
    summary = json.loads((Path(lines[-1]) / "check.json").read_text())
    assert {c["status"] for c in summary["checks"]} == {"pass"}
    assert len(summary["checks"]) == 14
    assert lines[-2] == f"report: {Path(lines[-1]) / 'check.html'}"


def test_the_shuffled_label_check_fails_when_labels_reach_the_model_another_way(
        monkeypatch, tmp_path):
    """A leak planted in the evaluation: the validation outputs are the true labels."""
    import torch

    from imagefit.workflows import check as check_module

    real = check_module.loader_outputs

    def leaking(*args, **kwargs):
        out = real(*args, **kwargs)
        out["outputs"] = torch.nn.functional.one_hot(out["targets"].long(), 10).float() * 9
        return out

    monkeypatch.setattr(check_module, "loader_outputs", leaking)
    result = imagefit.check("builtin:digits", runs_dir=tmp_path, **FAST)
    shuffled = by_check(result)["shuffled labels"]
    assert shuffled.status == "fail"
    assert shuffled.result.startswith("validation accuracy 1.000 after 30 steps on shuffled "
                                      "labels (chance 0.")
    assert shuffled.advice.startswith("the labels reach the model by another path than the "
                                      "training targets")


def test_folds_that_cannot_be_made_fail_when_asked_and_warn_by_default(tmp_path):
    labels = np.array([0] * 40 + [1] * 40 + [2] * 3)
    table = imagefit.from_arrays(smooth_images(83, 16, 4, 1), labels, names=["a", "b", "rare"])
    asked = by_check(imagefit.check(table, runs_dir=tmp_path, valid_pct=0, folds=5, **FAST))
    assert asked["folds"].status == "fail"
    assert asked["folds"].result == "5 stratified folds need 5 images of each class: 'rare' (3)"
    assert asked["folds"].advice == "use --folds 3 at most, or add images of it"
    assert asked["small classes"].status == "warn"
    assert asked["small classes"].result == "1 class(es) under 10 training images: 'rare' (3)"
    assert asked["label balance"].status == "warn"  # 40 / 3 > 10
    default = by_check(imagefit.check(table, runs_dir=tmp_path, valid_pct=0, **FAST))
    assert default["folds"].status == "warn"
    assert default["shuffled labels"].status == "skip"  # no validation rows


def test_regression_outliers_and_multilabel_labels_always_together(tmp_path):
    images = smooth_images(120, 16, 5, 1)
    ages = np.random.default_rng(0).normal(50, 5, 120)
    ages[7] = 500.0  # a typo
    found = by_check(imagefit.check(imagefit.from_arrays(images, ages, names=["age"]),
                                    runs_dir=tmp_path, **FAST))
    target = found["target age"]
    assert target.status == "warn"
    assert target.details["n_outliers"] == 1 and target.details["outliers"] == ["row 7"]
    assert "1 outlier(s) more than 5 robust deviations from the median (e.g. row 7)" \
        in target.result
    assert found["label in pixels"].status == "skip"

    tags = np.zeros((120, 3), dtype=np.float32)
    tags[::2, 0] = tags[::2, 1] = 1  # 'sea' and 'sky' always together
    tags[1::3, 2] = 1
    table = imagefit.from_arrays(images, tags, task="multilabel", names=["sea", "sky", "sun"])
    found = by_check(imagefit.check(table, runs_dir=tmp_path, **FAST))
    assert found["co-occurrence"].status == "warn"
    assert found["co-occurrence"].result == "1 pair(s) of labels are always together: sea + sky"


def test_unreadable_and_blank_images_are_listed(tmp_path):
    folder = tmp_path / "data"
    images = smooth_images(60, 24, 6)
    for i, image in enumerate(images):
        (folder / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"c{i % 2}" / f"{i}.png")
    Image.new("RGB", (24, 24), (40, 40, 40)).save(folder / "c0" / "blank.png")
    (folder / "c1" / "broken.png").write_bytes(b"not an image")
    found = by_check(imagefit.check(folder, runs_dir=tmp_path / "runs", **FAST))
    assert found["constant images"].status == "warn"
    assert "1 image(s) are one colour throughout, e.g. " in found["constant images"].result
    assert "blank.png" in found["constant images"].result
    assert found["unreadable files"].status == "warn"
    assert found["unreadable files"].result.startswith("1 of 62 images cannot be read: ")
    assert "broken.png" in found["unreadable files"].result


def test_exit_codes_and_the_page_escapes_user_strings(tmp_path):
    folder = tmp_path / "data"
    images = smooth_images(40, 16, 7, 1)
    for i, image in enumerate(images):
        name = "<script>alert(1)</script>" if i % 2 else "plain"
        (folder / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[..., 0]).save(folder / name / f"{i}.png")
    shutil.copy(folder / "plain" / "0.png", folder / "plain" / "copy.png")
    done = run_cli("check", str(folder), "--no-progress", "--runs-dir", str(tmp_path / "r"),
                   "--overfit-steps", "40", "--sanity-steps", "20", cwd=tmp_path)
    # the copy only warns, and nothing fails: distinct textures, one batch overfitted
    # (loss 0.8 -> 3e-5, under its 5% goal), and so few validation images (8) that no
    # accuracy on shuffled labels exceeds the limit: exit 0
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert any(line.split()[:3] == ["exact", "duplicates", "warn"] for line in lines)
    assert "(1 exact copies in 1 groups)" in done.stdout
    assert lines[-3].startswith("0 failed, 1 warned, 13 passed in ")
    page = (Path(done.stdout.splitlines()[-1]) / "check.html").read_text()
    assert "<script>alert(1)</script>" not in page
    missing = run_cli("check", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert missing.returncode == 2
    assert missing.stderr.startswith("imagefit: error: ")
    assert "nowhere" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1
    auto = run_cli("check", "builtin:digits", "--lr", "auto", cwd=tmp_path)
    assert auto.returncode == 2
    assert auto.stderr.strip() == (
        "imagefit: error: option --lr: the check trains at the rate a fit would use; give a "
        "number (the one batch's sweep suggests one when it fails)")


def test_fit_check_stops_before_the_run_directory_when_a_check_fails(tmp_path):
    runs = tmp_path / "runs"
    done = run_cli("fit", "builtin:digits", "--check", "--lr", "1e-7", "--epochs", "1",
                   "--runs-dir", str(runs), "--no-progress", cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip().startswith(
        "imagefit: --check: 1 check(s) failed, so the fit did not start (one batch: loss ")
    assert done.stderr.strip().endswith("see the table above, or run imagefit check DATA for "
                                        "every check")
    assert "one batch              fail" in done.stdout
    assert not runs.exists() or not any(runs.iterdir())
    ok = run_cli("fit", "builtin:digits", "--check", "--epochs", "1", "--runs-dir", str(runs),
                 "--no-progress", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "0 failed" in ok.stdout and Path(ok.stdout.splitlines()[-1]).is_dir()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed: `make test` installs "
                    "it (Debian's chromium) when run as root")
def test_the_check_page_shows_the_verdicts_and_the_pairs_in_chromium(planted_folder, tmp_path):
    csv, _ = planted_folder
    result = imagefit.check(csv, runs_dir=tmp_path, image_size=32, valid_pct=0, **FAST)
    url = (result.check_dir / "check.html").as_uri()
    dom = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
         "--disable-background-networking", f"--user-data-dir={tmp_path / 'profile'}",
         "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True).stdout
    assert dom.count('<tr class="') == len(result.findings)
    assert '<tr class="fail"><td>leakage across splits</td>' in dom
    assert "1 check(s) failed: leakage across splits" in dom
    pairs_table = dom.split('<section id="pairs">')[1].split("<figure>")[0]
    assert pairs_table.count("jpeg_") == 3  # the three re-encoded copies, a row each
    assert 'alt="near-duplicate pairs"' in dom and 'src="data:image/png;base64,' in dom
