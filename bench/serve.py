"""Requests per second and latency (p50, p99) of `imagefit serve` on loopback, for 1, 8 and 32
concurrent clients, eager PyTorch (the run) against onnxruntime (its export), for
small_cnn_16 on Fashion-MNIST (28 px) and resnet18 at 224 px; with and without batching of
concurrent requests; then the acceptance runs: 32 clients for 30 s without a failed request,
and a flood of bad uploads (only 4xx, /health still answering).

Each client is a thread with its own keep-alive connection (httpx) posting one image per
request; each level runs for --seconds or --max-requests, whichever comes first, after a
warm-up. The clients share the 2 cores with the server, as any loopback test does.

    .venv/bin/python bench/serve.py [--seconds 10] [--hold 30]
"""

from __future__ import annotations

import argparse
import io
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
from common import write_result
from PIL import Image

import imagefit
from imagefit.data.builtin import read_builtin

CLIENTS = (1, 8, 32)


def client_session() -> httpx.Client:
    """A keep-alive connection with Nagle's algorithm off, as browsers have it: else each
    request's body waits for the ACK of its headers (40 ms of delayed ACK on Linux)."""
    nodelay = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
    return httpx.Client(timeout=60, transport=httpx.HTTPTransport(socket_options=nodelay))


@contextmanager
def server(source: Path, *options: str):
    process = subprocess.Popen([sys.executable, "-m", "imagefit", "serve", str(source),
                                "--port", "0", *options], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        url = re.search(r"http://\S+/", process.stdout.readline()).group(0)
        for _ in range(200):
            try:
                httpx.get(url + "health", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        yield url
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)


def load(url: str, images: list[bytes], clients: int, seconds: float, max_requests: int,
         warmup: float = 2.0) -> dict:
    """``clients`` threads posting one image per request until time or count runs out."""
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    start_at = time.perf_counter() + warmup
    stop_at = start_at + seconds

    def client(k: int) -> None:
        with client_session() as session:
            n = k
            while True:
                now = time.perf_counter()
                if now >= stop_at:
                    return
                with lock:
                    if len(latencies) + len(failures) >= max_requests:
                        return
                body = images[n % len(images)]
                n += clients
                began = time.perf_counter()
                try:
                    response = session.post(url + "predict", files={"files": ("x.png", body)})
                    ok = response.status_code == 200
                    problem = f"{response.status_code} {response.text[:100]}"
                except httpx.HTTPError as error:
                    ok, problem = False, f"{type(error).__name__}: {error}"
                ended = time.perf_counter()
                if began >= start_at:
                    with lock:
                        (latencies.append(ended - began) if ok else failures.append(problem))

    before = httpx.get(url + "health").json()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    after = httpx.get(url + "health").json()
    elapsed = min(time.perf_counter(), stop_at) - start_at
    passes = after["forward_passes"] - before["forward_passes"]
    images_run = after["batched_images"] - before["batched_images"]
    ms = np.array(latencies) * 1000.0
    return {"clients": clients, "requests": len(latencies), "failed": len(failures),
            "failures": failures[:5], "seconds": round(elapsed, 1),
            "requests_per_second": round(len(latencies) / elapsed, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 1) if len(ms) else None,
            "p99_ms": round(float(np.percentile(ms, 99)), 1) if len(ms) else None,
            "images_per_forward_pass": round(images_run / passes, 2) if passes else None}


def flood(url: str, good: bytes, seconds: float, clients: int = 32) -> dict:
    """Bad uploads from ``clients`` threads while /health is asked every 0.2 s."""
    bad = [("notes.txt", b"not an image at all"), ("cut.png", good[: len(good) // 2]),
           ("empty.png", b""), ("huge.png", b"\x89PNG" + b"\0" * 11_000_000)]
    statuses: dict[int, int] = {}
    health: list[float] = []
    health_failed = 0
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def client(k: int) -> None:
        with client_session() as session:
            n = k
            while time.perf_counter() < stop_at:
                name, body = bad[n % len(bad)]
                n += 1
                files = [("files", (name, body))] * (20 if n % 7 == 0 else 1)
                try:
                    status = session.post(url + "predict", files=files).status_code
                except httpx.HTTPError:
                    status = -1
                with lock:
                    statuses[status] = statuses.get(status, 0) + 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for thread in threads:
        thread.start()
    while time.perf_counter() < stop_at:
        began = time.perf_counter()
        try:
            ok = httpx.get(url + "health", timeout=10).status_code == 200
        except httpx.HTTPError:
            ok = False
        health.append(time.perf_counter() - began) if ok else None
        health_failed += not ok
        time.sleep(0.2)
    for thread in threads:
        thread.join()
    after = httpx.get(url + "health").json()
    return {"seconds": seconds, "clients": clients, "statuses": dict(sorted(statuses.items())),
            "only_4xx": all(400 <= s < 500 for s in statuses),
            "health_checks": len(health) + health_failed, "health_failed": health_failed,
            "health_max_ms": round(max(health) * 1000, 1) if health else None,
            "server_failed": after["failed"],
            "good_after": httpx.post(url + "predict", files={"files": ("ok.png", good)}
                                     ).status_code}


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array.squeeze()).save(buffer, "PNG")
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--max-requests", type=int, default=20_000)
    parser.add_argument("--hold", type=float, default=30.0)
    parser.add_argument("--flood", type=float, default=10.0)
    args = parser.parse_args()
    fashion = read_builtin("fashion-mnist")
    test_rows = np.flatnonzero(fashion.split == "test")[:32]
    small_images = [png(fashion.arrays[r]) for r in test_rows]
    from skimage import data as photos

    big_images = [png(np.asarray(Image.fromarray(getattr(photos, name)()).convert("RGB")
                                 .resize((256, 256)))) for name in ("chelsea", "coffee",
                                                                    "astronaut", "rocket")]
    results, batching = [], []
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        runs = {
            "small_cnn_16": (imagefit.fit("builtin:fashion-mnist", epochs=1, progress=False,
                                          report=False, runs_dir=str(root / "runs")).run_dir,
                             small_images),
            "resnet18": (imagefit.fit("builtin:digits", model="resnet18", image_size=224,
                                      epochs=1, bs=32, progress=False, report=False,
                                      runs_dir=str(root / "runs")).run_dir, big_images),
        }
        for name, (run, images) in runs.items():
            onnx = root / f"{name}.onnx"
            imagefit.api.export(run, onnx, progress=False)
            for engine, source in (("torch", run), ("onnxruntime", onnx)):
                with server(source) as url:
                    for clients in CLIENTS:
                        row = {"model": name, "engine": engine,
                               **load(url, images, clients, args.seconds, args.max_requests)}
                        print(row, flush=True)
                        results.append(row)
            with server(run, "--max-batch", "1") as url:  # batching off, for comparison
                row = {"model": name, "engine": "torch", "batching": "off",
                       **load(url, images, 32, args.seconds, args.max_requests)}
                print(row, flush=True)
                batching.append(row)
        with server(runs["small_cnn_16"][0]) as url:
            hold = {"model": "small_cnn_16", "engine": "torch",
                    **load(url, small_images, 32, args.hold, 10 ** 9)}
            print("hold", hold, flush=True)
            flooded = flood(url, small_images[0], args.flood)
            print("flood", flooded, flush=True)
    import fastapi
    import onnxruntime
    import uvicorn

    write_result("serve", {
        "server_versions": {"fastapi": fastapi.__version__, "uvicorn": uvicorn.__version__,
                            "onnxruntime": onnxruntime.__version__,
                            "httpx (clients)": httpx.__version__},
        "command": f"bench/serve.py --seconds {args.seconds:g} --hold {args.hold:g} "
                   f"--flood {args.flood:g}",
        "results": results, "batching_off": batching, "hold": hold, "flood": flooded})


if __name__ == "__main__":
    main()
