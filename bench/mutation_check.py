"""Mutation check of the option tests: for each training option, one line of the source is
changed so that the option no longer acts, the option tests run, and at least one must fail.
The source is restored after each (also when interrupted).

    .venv/bin/python bench/mutation_check.py [--tests tests/test_option_effects.py]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

from common import write_result

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "imagefit"

# option: (file, the line as it is, the line that disables the option)
MUTATIONS = {
    "lr auto": ("workflows/fit.py", 'cfg.lr = distributed.from_main(finder.suggestions["valley"])',
                "cfg.lr = 0.1"),
    "early stop": ("train/callbacks/checkpoint.py", "        learner.stop = True",
                   "        learner.stop = False"),
    "EMA": ("train/learner.py", "            self.ema.update(self.model)",
            "            pass"),
    "accumulate": ("train/learner.py", "        if (self.step + 1) % self.accumulate:",
                   "        if (self.step + 1) % 1:"),
    "grad clip": ("train/learner.py",
                  "            torch.nn.utils.clip_grad_norm_(self.model.parameters(), "
                  "self.grad_clip)", "            pass"),
    "label smoothing": ("tasks.py", "                               label_smoothing="
                        "self.label_smoothing)",
                        "                               label_smoothing=0.0)"),
    "plateau": ("train/callbacks/checkpoint.py", "        learner.lr_factor *= self.factor",
                "        learner.lr_factor *= 1.0"),
    "lr groups": ("train/learner.py",
                  "        self.lr_scales = [rate / rates[-1] for rate in rates]",
                  "        self.lr_scales = None"),
    "freeze epochs": ("workflows/phases.py", "        learner.freeze(cfg.train_bn)",
                      "        learner.unfreeze()"),
    "TTA": ("forward.py", "        for _ in range(tta.n):", "        for _ in range(0):"),
    "image sizes": ("train/callbacks/augment.py",
                    "        learner.image_size = self.size_at(learner.epoch, learner.n_epochs)",
                    "        learner.image_size = None"),
    "threshold": ("workflows/conclude.py", '        info["task"]["threshold"] = threshold',
                  '        info["task"]["threshold"] = 0.5'),
}


def run_tests(tests: list[str]) -> tuple[int, list[str]]:
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           *tests], cwd=ROOT, capture_output=True,
                          text=True)
    failed = re.findall(r"^FAILED (\S+)", done.stdout, flags=re.MULTILINE)
    return done.returncode, [name.split("::", 1)[1].split(" ")[0] for name in failed]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", nargs="+", default=["tests/test_option_effects.py"])
    args = parser.parse_args()
    code, failed = run_tests(args.tests)
    if code != 0:
        raise SystemExit(f"the tests fail before any mutation: {failed}")
    results = []
    for option, (name, line, mutant) in MUTATIONS.items():
        path = SRC / name
        original = path.read_text()
        if original.count(line + "\n") != 1:
            raise SystemExit(f"{name}: the line for {option} is not there exactly once: {line}")
        try:
            path.write_text(original.replace(line + "\n", mutant + "\n"))
            code, failed = run_tests(args.tests)
        finally:
            path.write_text(original)
        results.append({"option": option, "file": f"src/imagefit/{name}",
                        "line": line.strip(), "mutant": mutant.strip(),
                        "tests_failed": failed, "caught": bool(failed)})
        print(f"{option}: {'caught by ' + ', '.join(failed) if failed else 'NOT CAUGHT'}",
              flush=True)
    write_result("mutation_check", {
        "command": "bench/mutation_check.py --tests " + " ".join(args.tests),
        "mutations": results,
        "caught": sum(r["caught"] for r in results), "total": len(results),
    })


if __name__ == "__main__":
    main()
