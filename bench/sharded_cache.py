"""Memory per rank of a two-machine fit, each rank caching only its share, against one
process caching everything. Two "machines" are two `torchrun --nnodes 2 --nproc-per-node 1
--rdzv-backend c10d` launches on loopback, each with its own cache folder (IMAGEFIT_CACHE),
as two hosts would have; `IMAGEFIT_SHARD_CACHE=0` runs the same two launches the old way
(every rank reading its part of each global batch from a whole cache) for comparison.

Data: the first N Fashion-MNIST training images written as PNGs in a folder per class,
cached at 112 px RGB (--image-size 112 --channels 3: 37.6 KB an image, so the cache is large
against the process's own memory); small_cnn_16 for 3 epochs. Sampled every 50 ms from this
script: each training process's VmHWM (peak RSS) from /proc/PID/status and the peak of the
resident pages of its cache file's mapping (images.u8 in /proc/PID/smaps: the memory the
cache costs it; the rest is torch's own). Also each cache folder's size on disk and rows.

    apt-get install -y dataset-fashion-mnist
    .venv/bin/python bench/sharded_cache.py [--images 12000] [--epochs 3]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from common import write_result
from PIL import Image

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def write_folder(folder: Path, count: int) -> None:
    with gzip.open(FASHION_MNIST / "train-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)[:count]
    with gzip.open(FASHION_MNIST / "train-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)[:count]
    for row, (image, label) in enumerate(zip(images, labels)):
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / str(label) / f"{row:05d}.png")


def status(pid: int) -> dict[str, int]:
    """VmHWM (peak RSS), RssAnon and, from smaps, the resident pages of the image cache's
    file (the mapping of images.u8) of process ``pid``."""
    found = {}
    try:
        with open(f"/proc/{pid}/status") as text:
            for line in text:
                key, _, value = line.partition(":")
                if key in ("VmHWM", "RssAnon"):
                    found[key] = int(value.split()[0]) * 1024
        cache, in_cache = 0, False
        with open(f"/proc/{pid}/smaps") as text:
            for line in text:
                if not line[0].isupper():  # a mapping's first line: address range ... path
                    in_cache = line.rstrip().endswith("/images.u8")
                elif in_cache and line.startswith("Rss:"):
                    cache += int(line.split()[1]) * 1024
        found["cache"] = cache
    except (FileNotFoundError, ProcessLookupError):
        pass
    return found


def trainers(marker: str) -> list[int]:
    """The training processes (not torchrun's agents) whose command line holds ``marker``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = [part.decode(errors="replace") for part in command]
        if marker in text and "fit" in text and "torch.distributed.run" not in text:
            pids.append(int(entry.name))
    return pids


def watch(marker: str, stop: threading.Event, peaks: dict) -> None:
    while not stop.is_set():
        for pid in trainers(marker):
            now = status(pid)
            if not now:
                continue
            peak = peaks.setdefault(pid, {"VmHWM": 0, "cache": 0, "RssAnon": 0})
            for key, value in now.items():
                peak[key] = max(peak[key], value)
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def cache_folders(root: Path) -> list[dict]:
    found = []
    for meta in sorted(root.glob("*/meta.json")):
        info = json.loads(meta.read_text())
        used = sum(p.stat().st_blocks * 512 for p in meta.parent.iterdir() if p.is_file())
        found.append({"rows": info["count"], "of": info.get("rows", info["count"]),
                      "disk_mb": round(used / 1e6, 1)})
    return found


def run_case(name: str, data: Path, work: Path, flags: list[str], nodes: int,
             shard: str | None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1" if nodes > 1 else "2"}
    if shard is not None:
        env["IMAGEFIT_SHARD_CACHE"] = shard
    stop, peaks = threading.Event(), {}
    watcher = threading.Thread(target=watch, args=(str(data), stop, peaks), daemon=True)
    watcher.start()
    started = time.perf_counter()
    if nodes == 1:
        commands = [[sys.executable, "-m", "imagefit", "fit", str(data), *flags,
                     "--runs-dir", str(work / f"{name}-runs")]]
    else:
        port = free_port()
        commands = [[sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes),
                     "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                     f"127.0.0.1:{port}", "--rdzv-id", name, "-m", "imagefit", "fit",
                     str(data), *flags, "--runs-dir", str(work / f"{name}-runs{k}")]
                    for k in range(nodes)]
    processes = [subprocess.Popen(command, env={**env, "IMAGEFIT_CACHE": str(
        work / f"{name}-cache{k}")}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True) for k, command in enumerate(commands)]
    outputs = [p.communicate()[0] for p in processes]
    seconds = time.perf_counter() - started
    stop.set()
    watcher.join()
    if any(p.returncode for p in processes):
        raise SystemExit(f"{name} failed:\n" + "\n".join(o[-3000:] for o in outputs))
    (metrics_path,) = work.glob(f"{name}-runs*/*/metrics.json")
    metrics = json.loads(metrics_path.read_text())
    ranks = [{"peak_rss_mb": round(p["VmHWM"] / 1e6, 1),
              "peak_cache_rss_mb": round(p["cache"] / 1e6, 1),
              "peak_rss_anon_mb": round(p["RssAnon"] / 1e6, 1)}
             for _, p in sorted(peaks.items())]
    caches = [c for k in range(nodes) for c in cache_folders(work / f"{name}-cache{k}")]
    print(name, ranks, caches, f"{seconds:.0f} s", metrics["valid_accuracy"], flush=True)
    return {"case": name, "nodes": nodes, "seconds": round(seconds, 1), "ranks": ranks,
            "caches": caches, "valid_accuracy": metrics["valid_accuracy"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=12_000)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    flags = ["--epochs", str(args.epochs), "--image-size", "112", "--channels", "3",
             "--model", "small_cnn_16", "--no-tta", "--no-report", "--no-progress",
             "--seed", "0"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "fashion-mnist-png"
        write_folder(data, args.images)
        cases = [run_case("one", data, work, flags, 1, None),
                 run_case("sharded", data, work, flags, 2, None),
                 run_case("whole", data, work, flags, 2, "0")]
    one = cases[0]["ranks"][0]
    for case in cases:
        case["cache_of_one_process"] = [round(r["peak_cache_rss_mb"] / one["peak_cache_rss_mb"],
                                              3) for r in case["ranks"]]
        case["rss_of_one_process"] = [round(r["peak_rss_mb"] / one["peak_rss_mb"], 3)
                                      for r in case["ranks"]]
    write_result("sharded_cache", {
        "command": f"python bench/sharded_cache.py --images {args.images} "
                   f"--epochs {args.epochs}",
        "images": args.images, "epochs": args.epochs, "flags": " ".join(flags),
        "image_bytes": 112 * 112 * 3, "cases": cases})


if __name__ == "__main__":
    main()
