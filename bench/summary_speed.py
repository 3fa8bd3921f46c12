"""`imagefit summary regnety_002 --image-size 224` and `imagefit models 'regnety_*'`: wall
seconds from outside the process (start to exit, imports included), medians of a few runs.
The zoo issue's target: the summary in under 5 s.

    .venv/bin/python bench/summary_speed.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from common import write_result

COMMANDS = {"summary": ["summary", "regnety_002", "--image-size", "224"],
            "models": ["models", "regnety_*", "--image-size", "224"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    results = {}
    for name, command in COMMANDS.items():
        walls = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "imagefit", *command],
                                  capture_output=True, text=True, check=True)
            walls.append(round(time.perf_counter() - started, 2))
        results[name] = {"command": "imagefit " + " ".join(command), "wall_seconds": walls,
                         "median": statistics.median(walls),
                         "lines": len(done.stdout.splitlines())}
        print(name, walls)
    write_result("summary_speed", {"command": f"bench/summary_speed.py --repeats "
                                              f"{args.repeats}", "results": results})


if __name__ == "__main__":
    main()
