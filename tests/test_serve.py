"""imagefit serve: the real server, started on a free loopback port by each test and stopped
at its end; its JSON API, its refusals of bad uploads (4xx with a message, never a crash),
the batching of concurrent requests, and its page driven in headless Chromium."""

from __future__ import annotations

import base64
import builtins
import io
import os
import re
import resource
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from matplotlib import colormaps
from PIL import Image

import imagefit
from conftest import as_from_a_terminal, isolated
from imagefit import api
from imagefit.cli import main
from imagefit.data.builtin import read_digits
from imagefit.evaluation.serving import Batcher, ServedModel
from imagefit.report.serve_page import serve_page

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    with isolated(root):
        result = imagefit.fit("builtin:digits", epochs=2, progress=False, report=False,
                              runs_dir=str(root / "runs"))
    return result.run_dir


@pytest.fixture(scope="module")
def digit_pngs(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("digits")
    files = []
    for k, image in enumerate(read_digits().arrays[:6]):
        files.append(folder / f"digit_{k}.png")
        Image.fromarray(image[..., 0]).resize((64, 64), Image.Resampling.NEAREST).save(files[-1])
    return files


@contextmanager
def server(source, *options: str):
    """``imagefit serve SOURCE --port 0`` in its own process: its URL once it answers; at
    the end, Ctrl-C (SIGINT), and the process must exit 0."""
    process = subprocess.Popen([sys.executable, "-m", "imagefit", "serve", str(source),
                                "--port", "0", *options], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True,
                               preexec_fn=as_from_a_terminal)
    try:
        line = process.stdout.readline()
        found = re.search(r"http://\S+/", line)
        assert found, f"no address printed: {line!r} {process.stderr.read() if not line else ''}"
        url = found.group(0)
        deadline, status = time.monotonic() + 30, None
        while status != 200 and time.monotonic() < deadline:  # it listens before it prints
            try:
                status = httpx.get(url + "health", timeout=2).status_code
            except httpx.TransportError:
                time.sleep(0.1)
        assert status == 200, f"{url}health answered {status} for 30 s"
        yield url
    finally:
        process.send_signal(signal.SIGINT)
        try:
            code = process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
        stderr = process.stderr.read()
    assert code == 0, stderr
    assert "Traceback" not in stderr, stderr


JET = colormaps["jet"](np.linspace(0, 1, 1001))[:, :3] * 255.0


def map_under(overlay_url: str, plain: torch.Tensor) -> np.ndarray:
    """The saliency map an overlay carries: the overlay is half the plain image (C, S, S)
    and half the jet colour of the map, so 2 * overlay - plain is a jet colour at every
    pixel, whose place on the colour scale is the map's value (to about 0.005)."""
    header, data = overlay_url.split(",", 1)
    assert header == "data:image/png;base64"
    with Image.open(io.BytesIO(base64.b64decode(data))) as overlay:
        assert overlay.size == tuple(plain.shape[1:]) and overlay.mode == "RGB"
        pixels = np.asarray(overlay, dtype=np.float64)
    heat = 2 * pixels - plain.permute(1, 2, 0).numpy().astype(np.float64)
    distance = np.abs(heat[..., None, :] - JET).max(axis=-1)
    assert distance.min(axis=-1).max() <= 3, "not the image under a jet heat map"
    return distance.argmin(axis=-1) / (len(JET) - 1)


def gradcam_of(run: Path, files: list[Path], targets: list[int]) -> tuple[torch.Tensor,
                                                                          torch.Tensor]:
    """The images as the server reads them and the run's Grad-CAM maps of ``targets``,
    computed here by the server's own model class."""
    served = ServedModel.load(run)
    images = torch.stack([served.decode(f.read_bytes(), f.name, 10**6) for f in files])
    return images, served.explain(images, torch.tensor(targets))


def assert_overlays_carry_the_runs_gradcam(answers: list[dict], run: Path,
                                           files: list[Path]) -> None:
    """Each overlay is its image under a heat map spanning the whole scale (Grad-CAM scales
    each map to 0..1), the run's Grad-CAM of the class it names (to 0.02: the PNG's 8-bit
    rounding), not a blank or constant map."""
    names = [str(k) for k in range(10)]
    images, maps = gradcam_of(run, files, [names.index(a["explained"]) for a in answers])
    for answer, image, expected in zip(answers, images, maps):
        found = map_under(answer["saliency"], image)
        assert found.min() < 0.02 and found.max() > 0.98, answer["file"]
        np.testing.assert_allclose(found, expected.numpy(), atol=0.02, err_msg=answer["file"])


def post(url: str, *files: tuple[str, bytes], timeout: float = 30, **params) -> httpx.Response:
    return httpx.post(url + "predict", files=[("files", f) for f in files], params=params,
                      timeout=timeout)


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header says ``width`` x ``height`` (1-bit grey) over one tiny IDAT: PIL
    reads its size without decoding it, and making it costs nothing."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0,
                                                                 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b""))


def test_predict_answers_what_predict_answers_with_top_k_and_saliency(digits_run, digit_pngs):
    expected = api.predict(digits_run, digit_pngs, progress=False)
    with server(digits_run) as url:
        health = httpx.get(url + "health").json()
        assert health["status"] == "ok" and health["requests"] == 0
        described = httpx.get(url + "model").json()
        assert described["task"] == "classification" and described["engine"] == "torch"
        assert described["classes"] == [str(k) for k in range(10)]
        assert (described["image_size"], described["channels"]) == (8, 1)
        assert described["saliency"] and 0.5 < described["metrics"]["valid_accuracy"] <= 1
        assert described["limits"]["max_files"] == 16

        response = post(url, *[(p.name, p.read_bytes()) for p in digit_pngs], top_k=3,
                        saliency="true")
        assert response.status_code == 200
        answers = response.json()["predictions"]
        assert [a["file"] for a in answers] == [p.name for p in digit_pngs]
        for answer, (_, row) in zip(answers, expected.iterrows()):
            assert answer["label"] == row["label"] == answer["top"][0]["label"]
            assert len(answer["top"]) == 3
            probabilities = [entry["probability"] for entry in answer["top"]]
            assert probabilities == sorted(probabilities, reverse=True)
            for entry in answer["top"]:
                assert entry["probability"] == pytest.approx(row[f"prob_{entry['label']}"],
                                                             abs=1e-5)
            assert answer["explained"] == answer["label"]
        assert_overlays_carry_the_runs_gradcam(answers, digits_run, digit_pngs)
        plain = post(url, (digit_pngs[0].name, digit_pngs[0].read_bytes())).json()
        assert len(plain["predictions"][0]["top"]) == 5 and "saliency" not in plain[
            "predictions"][0]
        assert httpx.get(url + "health").json()["images"] == 7
        page = httpx.get(url)
        assert page.status_code == 200 and "Drop images here" in page.text


def test_an_exported_model_is_served_by_onnxruntime_with_the_runs_gradcam(
        digits_run, digit_pngs, tmp_path):
    api.export(digits_run, tmp_path / "digits.onnx", progress=False)
    expected = api.predict(tmp_path / "digits.onnx", digit_pngs, progress=False)
    with server(tmp_path / "digits.onnx") as url:
        described = httpx.get(url + "model").json()
        assert described["engine"] == "onnxruntime" and described["saliency"]
        answers = post(url, *[(p.name, p.read_bytes()) for p in digit_pngs],
                       saliency="true").json()["predictions"]
    for answer, (_, row) in zip(answers, expected.iterrows()):
        assert answer["label"] == row["label"] == answer["explained"]
        assert answer["top"][0]["probability"] == pytest.approx(row[f"prob_{row['label']}"],
                                                                abs=1e-6)
    assert_overlays_carry_the_runs_gradcam(answers, digits_run, digit_pngs)


def test_bad_uploads_get_4xx_with_a_message_and_the_server_goes_on(digits_run, digit_pngs,
                                                                   tmp_path):
    good = (digit_pngs[0].name, digit_pngs[0].read_bytes())
    photo = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), np.uint8)).save(
        photo, "PNG")
    large = photo.getvalue()
    big = io.BytesIO()
    Image.new("L", (1200, 1000)).save(big, "PNG")
    with server(digits_run, "--max-files", "4", "--max-file-mb", "0.3",
                "--max-pixels", "1000000") as url:
        cases = {
            "not an image": (post(url, ("notes.txt", b"hello, not a picture")), 415,
                             "notes.txt is not an image"),
            "truncated": (post(url, ("cut.png", large[: len(large) // 2])), 422,
                          "cut.png could not be decoded (image file is truncated)"),
            "empty file": (post(url, ("empty.png", b"")), 400, "empty.png is empty"),
            "too large": (post(url, ("huge.png", large + b"\0" * 300_000)), 413,
                          "huge.png is over the limit of 0.3 MB"),
            "too many pixels": (post(url, ("wide.png", big.getvalue())), 413,
                                "wide.png has 1200 x 1000 pixels, more than the limit of "
                                "1,000,000"),
            "over PIL's limit": (post(url, ("big.png", png_claiming(10_000, 10_000))), 413,
                                 "big.png has 10000 x 10000 pixels, more than the limit of "
                                 "1,000,000"),
            "a decompression bomb": (post(url, ("bomb.png", png_claiming(20_000, 20_000))),
                                     413, "bomb.png has 400,000,000 pixels, more than the "
                                     "limit of 1,000,000"),
            "too many files": (post(url, *[good] * 5), 413,
                               "too many files: at most 4 images per request"),
            "no files": (httpx.post(url + "predict", data={"x": "1"}), 400,
                         "no images in the request"),
            "no body": (httpx.post(url + "predict"), 400, "no images in the request"),
            "broken form": (httpx.post(url + "predict", content=b"garbage", headers={
                "content-type": "multipart/form-data; boundary=zz"}), 400,
                "the request body is not a readable multipart form"),
            "request too large": (httpx.post(url + "predict", content=b"x" * 2_300_000,
                                             headers={"content-type": "application/x"}), 413,
                                  "the request is over the limit of 2.2 MB"),
            "chunked, too large": (httpx.post(url + "predict", content=iter([
                b'--zz\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n'
                b"Content-Type: image/png\r\n\r\n"] + [b"x" * 1_000_000] * 3),
                                              headers={"content-type": "multipart/form-data; "
                                                       "boundary=zz"}), 413,
                                   "the request is over the limit of 2.2 MB"),
            "bad top_k": (post(url, good, top_k=0), 422, "top_k must be 1 or more"),
        }
        for name, (response, status, message) in cases.items():
            assert response.status_code == status, (name, response.text)
            assert response.json()["detail"].startswith(message), (name, response.text)

        def flood(k: int) -> int:
            body = [("notes.txt", b"%d not an image" % k)] if k % 3 else [
                ("cut.png", large[: 1000 + k])]
            return post(url, *body).status_code

        with ThreadPoolExecutor(16) as pool:
            statuses = list(pool.map(flood, range(96)))
        assert set(statuses) <= {415, 422}
        health = httpx.get(url + "health").json()
        assert health["status"] == "ok" and health["failed"] == 0
        assert health["refused"] == len(cases) + 96
        assert post(url, good).status_code == 200


def test_silent_connections_are_closed_after_the_idle_timeout_and_never_starve_health(
        digits_run, digit_pngs):
    """300 connections that send nothing and 2 that stop halfway through their headers:
    /health and /predict answer at once, the oldest connections beyond --max-connections are
    closed as new ones come, and every other one when it has waited the idle timeout."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the server inherits it too
    if hard < 1024:
        pytest.skip(f"the limit of open files is {hard}: 300 connections need more")
    timeout, bound = 1.5, 256
    opened, closed, sockets = {}, {}, []
    try:
        with server(digits_run, "--idle-timeout", str(timeout),
                    "--max-connections", str(bound)) as url:
            address = (httpx.URL(url).host, httpx.URL(url).port)
            for k in range(302):
                sockets.append(socket.create_connection(address, timeout=5))
                opened[sockets[-1]] = time.monotonic()
                if k >= 300:
                    sockets[-1].sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Wait")
            started = time.perf_counter()
            health = httpx.get(url + "health", timeout=5)
            latency = time.perf_counter() - started
            predicted = post(url, (digit_pngs[0].name, digit_pngs[0].read_bytes()), timeout=5)
            with selectors.DefaultSelector() as waiting:
                for sock in sockets:
                    waiting.register(sock, selectors.EVENT_READ)
                deadline = time.monotonic() + timeout + 8
                while waiting.get_map() and time.monotonic() < deadline:
                    for key, _ in waiting.select(timeout=0.5):
                        assert key.fileobj.recv(1) == b""  # closed by the server, unanswered
                        closed[key.fileobj] = time.monotonic()
                        waiting.unregister(key.fileobj)
            print(f"/health in {latency * 1000:.1f} ms with 302 silent connections open")
    finally:
        for sock in sockets:
            sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert health.status_code == 200 and latency < 1.0, (health.status_code, latency)
    assert predicted.status_code == 200, predicted.text
    assert len(closed) == len(sockets), f"{len(sockets) - len(closed)} still open"
    waited = [closed[sock] - opened[sock] for sock in sockets]
    evicted = [k for k, seconds in enumerate(waited) if seconds < timeout - 0.1]
    assert len(evicted) >= len(sockets) - bound and evicted == list(range(len(evicted)))
    later = waited[len(evicted):]
    assert timeout - 0.1 < min(later) and max(later) < timeout + 3, (min(later), max(later))
    print(f"evicted {len(evicted)} oldest; the others closed after {min(later):.2f} to "
          f"{max(later):.2f} s")


def test_503_counts_requests_in_progress_not_idle_connections(digits_run):
    """With --max-connections 2, silent connections cost nothing (the oldest are closed),
    two requests whose bodies never come make the next one 503, and once they are gone the
    server answers again."""
    stalled = (b"POST /predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
               b"Content-Type: multipart/form-data; boundary=zz\r\n\r\n")
    with server(digits_run, "--max-connections", "2") as url:
        address = (httpx.URL(url).host, httpx.URL(url).port)
        silent = [socket.create_connection(address, timeout=5) for _ in range(5)]
        assert httpx.get(url + "health", timeout=5).status_code == 200
        waiting = [socket.create_connection(address, timeout=5) for _ in range(2)]
        for sock in waiting:
            sock.sendall(stalled)
        deadline, busy = time.monotonic() + 10, None
        while time.monotonic() < deadline and getattr(busy, "status_code", None) != 503:
            busy = httpx.get(url + "health", timeout=5)  # until both have reached the app
        for sock in silent + waiting:
            sock.close()
        deadline, status = time.monotonic() + 10, None
        while time.monotonic() < deadline and status != 200:
            status = httpx.get(url + "health", timeout=5).status_code
    assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
    assert busy.json()["detail"] == "the server is busy with 2 requests: try again in a moment"
    assert status == 200


def test_the_page_and_the_api_name_the_run_never_its_path_on_the_server(digits_run):
    with server(digits_run) as url:
        texts = {path: httpx.get(url + path, timeout=10).text
                 for path in ("", "openapi.json", "docs", "model")}
    for path, text in texts.items():
        assert str(digits_run.parent) not in text, path
    for path in ("", "openapi.json", "model"):
        assert digits_run.name in texts[path], path


def test_concurrent_requests_share_forward_passes_and_each_gets_its_own_rows(
        digits_run, digit_pngs):
    files = [(p.name, p.read_bytes()) for p in digit_pngs]
    with server(digits_run, "--batch-wait-ms", "50") as url:
        alone = [post(url, f).json()["predictions"][0] for f in files]
        before = httpx.get(url + "health").json()
        with ThreadPoolExecutor(12) as pool:
            together = list(pool.map(lambda k: post(url, files[k % 6]).json()["predictions"][0],
                                     range(24)))
        after = httpx.get(url + "health").json()
    for k, answer in enumerate(together):
        assert answer["file"] == files[k % 6][0]
        assert answer["top"][0] == pytest.approx(alone[k % 6]["top"][0], abs=1e-5)
    assert after["batched_images"] - before["batched_images"] == 24
    assert after["forward_passes"] - before["forward_passes"] < 24  # some were batched


def test_the_batcher_splits_batches_at_max_batch_and_survives_a_failed_pass():
    seen = []

    def run_batch(images):
        seen.append(len(images))
        if (images == -1).any():
            raise RuntimeError("bad batch")
        return images * 10

    batcher = Batcher(run_batch, max_batch=4, wait_s=0.05)
    try:
        futures = [batcher.submit(torch.full((1 + k % 2, 2), float(k))) for k in range(8)]
        for k, future in enumerate(futures):
            result = future.result(timeout=10)
            assert result.shape == (1 + k % 2, 2) and (result == 10 * k).all()
        assert max(seen) <= 4 and len(seen) < 8
        failing = batcher.submit(torch.full((1, 2), -1.0))
        with pytest.raises(RuntimeError, match="bad batch"):
            failing.result(timeout=10)
        assert (batcher.submit(torch.ones(1, 2)).result(timeout=10) == 10).all()
    finally:
        batcher.close()
    assert not batcher.thread.is_alive()


def test_serve_refusals_are_one_line(digits_run, tmp_path, capsys, monkeypatch):
    names = tmp_path / "names.csv"
    names.write_text("name,gender\n" + "\n".join(
        f"{n},{g}" for n, g in [("maria", "f"), ("jose", "m"), ("ana", "f"), ("luis", "m")] * 20))
    assert main(["fit", str(names), "--epochs", "1", "--runs-dir", str(tmp_path / "runs"),
                 "--no-progress", "--no-report"]) == 0
    text_run = next((tmp_path / "runs").iterdir())
    capsys.readouterr()
    cases = [
        ([str(text_run)], f"{text_run} holds a text model; serve shows images"),
        ([str(tmp_path / "nothing")], f"{tmp_path / 'nothing'} not found: give a run directory"),
        ([str(text_run), "--max-pixels", "100000000"], "--max-pixels 100,000,000 is over the "
         "89,478,485 pixels PIL opens"),
    ]
    for argv, message in cases:
        assert main(["serve", *argv, "--port", "0"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"imagefit: error: {message}") and err.count("\n") == 1, err

    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        assert main(["serve", str(digits_run), "--port", str(port)]) == 2
    finally:
        taken.close()
    err = capsys.readouterr().err
    assert err.startswith(f"imagefit: error: cannot listen on 127.0.0.1:{port} (Address "
                          "already in use): choose another --port") and err.count("\n") == 1

    real_import = builtins.__import__

    def without_fastapi(name, *args, **kwargs):
        if name.split(".")[0] in ("fastapi", "starlette"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_fastapi)
    assert main(["serve", str(digits_run)]) == 2
    assert capsys.readouterr().err == ("imagefit: error: serve needs fastapi, uvicorn and "
                                       "python-multipart: pip install 'imagefit[serve]' (or pip "
                                       "install fastapi uvicorn python-multipart)\n")


def test_the_page_escapes_the_source_and_the_model_facts(digits_run):
    described = ServedModel.load(digits_run, "cpu").describe()
    described["source"] = "<script>alert('x')</script>"
    described["architecture"] = "<img src=x onerror=alert(1)>"
    html = serve_page(described, {"max_files": 4, "max_file_mb": 1.0})
    assert "<script>alert" not in html and "&lt;script&gt;alert" in html
    assert "<img src=x" not in html
    assert ".innerHTML" not in html  # the script writes text only


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed: `make test` installs "
                    "it (Debian's chromium) when run as root")
def test_the_page_shows_bars_and_the_overlay_and_a_text_file_shows_its_error(
        digits_run, digit_pngs, tmp_path):
    from playwright.sync_api import sync_playwright

    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture")
    with server(digits_run) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM,
                                             args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 700})
            page.goto(url)
            assert "small_cnn_16" in page.inner_text("header")
            page.set_input_files("#files", str(digit_pngs[3]))
            card = page.locator(".card.done")
            card.wait_for(timeout=20_000)
            assert card.locator(".name").inner_text() == digit_pngs[3].name
            assert card.locator(".bar").count() == 5
            assert card.locator(".bar.chosen").count() == 1
            widths = card.locator(".bar .fill").evaluate_all(
                "bars => bars.map(b => b.getBoundingClientRect().width)")
            assert widths == sorted(widths, reverse=True) and widths[0] > widths[-1] >= 0
            overlay = card.locator("img.overlay")
            overlay.wait_for()
            page.wait_for_function("document.querySelector('img.overlay').naturalWidth > 0")
            assert overlay.evaluate("img => img.naturalWidth") == 8
            shot = tmp_path / "page.png"
            page.screenshot(path=str(shot), full_page=True)
            pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
            assert pixels.std() > 20  # not blank: header, bars, pictures

            page.set_input_files("#files", str(notes))
            error = page.locator(".card.failed .error")
            error.wait_for(timeout=20_000)
            assert error.inner_text().startswith("notes.txt is not an image")
            assert page.locator(".card").count() == 2
        finally:
            browser.close()
    if os.environ.get("IMAGEFIT_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["IMAGEFIT_KEEP_SCREENSHOT"])


def test_answers_name_labels_over_the_threshold_and_regression_values():
    from imagefit.data.cache import CacheSettings
    from imagefit.tasks import Task

    settings = CacheSettings(8, 1, "crop")
    labels = ServedModel(Path("x"), Task("multilabel", ["cloud", "water", "road"], threshold=0.4),
                         settings, {}, "torch")
    answer = labels.answer(torch.tensor([0.9, 0.1, 0.45]), top_k=2)
    assert answer["labels"] == ["cloud", "road"] and "label" not in answer
    assert [t["label"] for t in answer["top"]] == ["cloud", "road"] and answer["target"] == 0
    values = ServedModel(Path("x"), Task("regression", ["age", "height"]), settings, {}, "torch")
    assert values.answer(torch.tensor([41.5, 170.0]), top_k=5) == {
        "values": {"age": 41.5, "height": 170.0}, "target": 0}
    described = values.describe()
    assert described["targets"] == ["age", "height"] and "classes" not in described
