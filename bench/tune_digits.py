"""The acceptance runs of `imagefit tune` on builtin:digits: 20 trials with two local workers
on the default SQLite study, and 20 trials from two separate tune commands sharing one study
on a PostgreSQL server started here (Debian's binaries, a free loopback port, a temporary
folder). Each records the trials finished and pruned and the refits (--confirm 3: the three
best trials' options and the defaults on seeds 1-3) that choose best.yaml.

    .venv/bin/python bench/tune_digits.py
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

from common import write_result


def tune(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "imagefit", "tune", "builtin:digits",
                             "--n-trials", "20", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def summary(tune_dir: Path, seconds: float, command: str) -> dict:
    info = json.loads((tune_dir / "tune.json").read_text())
    return {"command": command, "seconds": round(seconds, 1), "trials": info["n_trials"],
            "complete": info["complete"], "pruned": info["pruned"], "failed": info["failed"],
            "pruned_share": info["pruned_share"], "best": info["best"],
            "confirm": info.get("confirm")}


def postgres(folder: Path):
    bin_dir = Path(sorted(glob.glob("/usr/lib/postgresql/*/bin"))[-1])
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_user:
        shutil.chown(folder, "postgres")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    subprocess.run([*as_user, str(bin_dir / "initdb"), "-D", str(folder / "data"), "-U",
                    "postgres", "--auth", "trust"], check=True, capture_output=True)
    subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(folder / "data"), "-l",
                    str(folder / "log"), "-w", "-o",
                    f"-p {port} -k {folder} -c listen_addresses=127.0.0.1", "start"],
                   check=True, capture_output=True)
    stop = [*as_user, str(bin_dir / "pg_ctl"), "-D", str(folder / "data"), "-m", "fast", "-w",
            "stop"]
    return f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres", stop


def main() -> None:
    results = {}
    with tempfile.TemporaryDirectory() as work:
        root = Path(work)
        started = time.perf_counter()
        command = tune("--workers", "2", "--runs-dir", str(root / "sqlite"))
        log = command.communicate()[0]
        assert command.returncode == 0, log[-3000:]
        results["sqlite_two_workers"] = summary(
            root / "sqlite" / "digits_tune", time.perf_counter() - started,
            "imagefit tune builtin:digits --n-trials 20 --workers 2")
        print(json.dumps(results["sqlite_two_workers"], indent=1), flush=True)

        folder = Path(tempfile.mkdtemp(prefix="imagefit-postgres-"))
        url, stop = postgres(folder)
        try:
            started = time.perf_counter()
            commands = [tune("--storage", url, "--study", "digits-shared", "--runs-dir",
                             str(root / f"machine{k}")) for k in range(2)]
            logs = [c.communicate()[0] for c in commands]
            for command, log in zip(commands, logs):
                assert command.returncode == 0, log[-3000:]
            seconds = time.perf_counter() - started
            both = [summary(root / f"machine{k}" / "digits-shared_tune", seconds,
                            "imagefit tune builtin:digits --n-trials 20 --storage "
                            "postgresql://... --study digits-shared") for k in range(2)]
            refitted = [b for b in both if b["confirm"]]  # one command refits, the last
            results["postgresql_two_commands"] = (refitted or both)[-1] | {
                "trials_by_command": [sum(1 for line in log.splitlines()
                                          if line.startswith("trial ")) for log in logs]}
            print(json.dumps(results["postgresql_two_commands"], indent=1), flush=True)
        finally:
            subprocess.run(stop, capture_output=True)
            shutil.rmtree(folder, ignore_errors=True)
    write_result("tune_digits", {"command": "bench/tune_digits.py", "optuna": version("optuna"),
                                 **results})


if __name__ == "__main__":
    main()
