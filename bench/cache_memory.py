"""Memory while imagefit builds its image cache: the peak of anonymous memory (RssAnon in
/proc/PID/status) and of RSS, summed over the building process and any processes it starts,
sampled every 50 ms from a thread of this script. Each build runs ``loading.load_data`` with
the default options in a fresh Python process whose IMAGEFIT_CACHE is an empty temporary
folder, so the whole build is measured; its imports are part of the process (their share is
reported as the RssAnon after imports).

Cases: all 70,000 images of builtin:fashion-mnist, and 10,000 JPEGs of 256 x 256 px cut from
scikit-image's bundled photos (see photos.py; written once into a temporary folder, cached at
the default size, 224 px RGB). Target: peak RssAnon under 1.5 GB (the cache's file-backed
pages count in RSS, not in RssAnon).

    .venv/bin/python -m pip install scikit-image   # the photos
    .venv/bin/python bench/cache_memory.py [--cases fashion-mnist,jpegs] [--jpegs 10000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import write_result
from photos import write_photo_folder

TARGET_RSS_ANON_BYTES = 1.5e9
CASES = ("fashion-mnist", "jpegs")


def status_bytes(pid: int) -> tuple[int, int]:
    """RssAnon and VmRSS of ``pid`` in bytes (0, 0 when it is gone)."""
    anon = rss = 0
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    anon = int(line.split()[1]) * 1024
                elif line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return anon, rss


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants, from the parent ids in /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                parent = int(stat.read().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry))
    tree, pending = [], [root]
    while pending:
        pid = pending.pop()
        tree.append(pid)
        pending += children.get(pid, [])
    return tree


class PeakSampler(threading.Thread):
    """Samples the summed RssAnon and RSS of a process tree until ``stop`` is set."""

    def __init__(self, root: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.stop = threading.Event()
        self.peak_anon = self.peak_rss = self.samples = self.most_processes = 0

    def run(self) -> None:
        while not self.stop.is_set():
            tree = process_tree(self.root)
            sizes = [status_bytes(pid) for pid in tree]
            self.peak_anon = max(self.peak_anon, sum(anon for anon, _ in sizes))
            self.peak_rss = max(self.peak_rss, sum(rss for _, rss in sizes))
            self.most_processes = max(self.most_processes, len(tree))
            self.samples += 1
            self.stop.wait(self.interval)


def build_in_child(data: str) -> None:
    """The child process: build the cache of ``data`` and print what it did as JSON."""
    import numpy as np

    from imagefit.config import ImageOptions
    from imagefit.workflows.loading import load_data

    anon_after_imports, _ = status_bytes(os.getpid())
    started = time.perf_counter()
    loaded = load_data(data, ImageOptions(progress=False))
    seconds = time.perf_counter() - started
    images = loaded.prepared.cache.images
    print(json.dumps({
        "images": len(images), "size": loaded.settings.size,
        "channels": loaded.settings.channels,
        "cache_bytes": int(images.nbytes), "memory_mapped": isinstance(images, np.memmap),
        "build_seconds": round(seconds, 2), "rss_anon_after_imports": anon_after_imports,
    }))


def measure(data: str, label: str, interval: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="imagefit-cache-memory-") as cache_dir:
        env = {**os.environ, "IMAGEFIT_CACHE": cache_dir}
        child = subprocess.Popen([sys.executable, __file__, "--child", data], env=env,
                                 stdout=subprocess.PIPE, text=True)
        sampler = PeakSampler(child.pid, interval)
        sampler.start()
        output, _ = child.communicate()
        sampler.stop.set()
        sampler.join()
    if child.returncode:
        raise SystemExit(f"the build of {label} failed (exit {child.returncode})")
    built = json.loads(output.strip().splitlines()[-1])
    mb = 1e6
    result = {
        "data": label, "images": built["images"],
        "cache": f"{built['size']} px, {built['channels']} channel(s), "
                 f"{built['cache_bytes'] / mb:.0f} MB "
                 + ("memory-mapped file" if built["memory_mapped"] else "in memory"),
        "build_seconds": built["build_seconds"],
        "rss_anon_after_imports_mb": round(built["rss_anon_after_imports"] / mb, 1),
        "peak_rss_anon_mb": round(sampler.peak_anon / mb, 1),
        "peak_rss_mb": round(sampler.peak_rss / mb, 1),
        "most_processes": sampler.most_processes, "samples": sampler.samples,
        "meets_target": sampler.peak_anon < TARGET_RSS_ANON_BYTES,
    }
    print(result, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES), help=f"of {', '.join(CASES)}")
    parser.add_argument("--jpegs", type=int, default=10_000)
    parser.add_argument("--jpeg-size", type=int, default=256)
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between samples")
    parser.add_argument("--name", default="cache_memory")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        build_in_child(args.child)
        return
    cases = args.cases.split(",")
    if any(case not in CASES for case in cases):
        parser.error(f"--cases: choose from {', '.join(CASES)}")

    results = []
    with tempfile.TemporaryDirectory(prefix="imagefit-cache-memory-jpegs-") as scratch:
        for case in cases:
            if case == "fashion-mnist":
                results.append(measure("builtin:fashion-mnist", "builtin:fashion-mnist",
                                       args.interval))
                continue
            started = time.perf_counter()
            folder = write_photo_folder(Path(scratch) / "photos", args.jpegs, args.jpeg_size)
            print(f"wrote {args.jpegs} JPEGs in {time.perf_counter() - started:.0f} s",
                  flush=True)
            results.append(measure(str(folder), f"{args.jpegs} JPEGs of {args.jpeg_size} px",
                                   args.interval))
    write_result(args.name, {
        "command": "bench/cache_memory.py " + " ".join(sys.argv[1:]),
        "interval_seconds": args.interval,
        "target_rss_anon_mb": TARGET_RSS_ANON_BYTES / 1e6,
        "cases": results,
    })


if __name__ == "__main__":
    main()
