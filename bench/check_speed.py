"""`imagefit check builtin:fashion-mnist` on this machine: wall seconds from outside the
process (start to exit, imports included) for a few repeats, the check's own seconds, and
what it found (near-duplicate pairs per split pair, the verdicts). The issue's target: under
60 s on 2 cores.

    .venv/bin/python bench/check_speed.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import write_result

COMMAND = ["check", "builtin:fashion-mnist", "--no-progress"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as runs_dir:
        for _ in range(args.repeats):
            started = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "imagefit", *COMMAND, "--runs-dir",
                                   runs_dir], capture_output=True, text=True)
            wall = time.perf_counter() - started
            check_dir = Path(done.stdout.strip().splitlines()[-1])
            summary = json.loads((check_dir / "check.json").read_text())
            near = next(c for c in summary["checks"] if c["check"] == "near duplicates")
            runs.append({"wall_seconds": round(wall, 2), "check_seconds": summary["seconds"],
                         "exit_code": done.returncode,
                         "verdicts": {c["check"]: c["status"] for c in summary["checks"]},
                         "near_pairs": near["details"]["pairs"],
                         "near_by_split": near["details"]["by_split"],
                         "thresholds": {"hamming": near["details"]["hamming"],
                                        "pixel_diff": near["details"]["pixel_diff"]}})
            print(f"wall {wall:.1f} s, exit {done.returncode}, {runs[-1]['near_pairs']} "
                  "near pairs")
    write_result("check_speed", {
        "command": f"bench/check_speed.py --repeats {args.repeats}",
        "imagefit_command": "imagefit " + " ".join(COMMAND),
        "runs": runs,
        "median_wall_seconds": statistics.median(r["wall_seconds"] for r in runs),
        "median_check_seconds": statistics.median(r["check_seconds"] for r in runs),
    })


if __name__ == "__main__":
    main()
