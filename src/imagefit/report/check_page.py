"""check.html: the verdicts of ``imagefit check`` as a page in report.html's style, with the
closest near-duplicate pairs across splits. Rendered by the report's jinja2 environment
(autoescaping on): file names, class names and messages reach the page as text."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import torch

from .html import environment, format_value
from .plots import save_image_grid

PAGE = "check.html"
PAIRS = "pairs.png"


def save_pairs(images: np.ndarray, pairs: list, first: list[str], second: list[str],
               path: Path) -> Path:
    """The pairs side by side: each pair a column of two images titled by split and file."""
    order = [a for a, _, _ in pairs] + [b for _, b, _ in pairs]
    shown = torch.from_numpy(np.stack([images[r] for r in order])).permute(0, 3, 1, 2)
    titles = [_short(t) for t in first] + [_short(t) for t in second]
    return save_image_grid(shown.float() / 255, titles, path, columns=len(pairs),
                           title="near-duplicate pairs across splits (top and bottom)")


def _short(text: str, width: int = 28) -> str:
    return text if len(text) <= width else "..." + text[-(width - 3):]


def write_check_page(check_dir: Path, summary: dict) -> Path:
    rows = [{"check": c["check"], "status": c["status"], "result": c["result"],
             "advice": c["advice"]} for c in summary["checks"]]
    pairs_png = check_dir / PAIRS
    figure = None
    if pairs_png.is_file():
        figure = "data:image/png;base64," + base64.b64encode(pairs_png.read_bytes()).decode()
    failed = summary["failed"]
    html = environment.get_template("check.html").render(
        title=f"imagefit check: {summary['data']}", data=summary["data"],
        seconds=format_value(summary["seconds"]) + " s", rows=rows,
        verdict=(f"{len(failed)} check(s) failed: {', '.join(failed)}" if failed
                 else "no check failed"),
        failed=bool(failed), pairs=summary["pairs"], pairs_figure=figure)
    path = check_dir / PAGE
    path.write_text(html, encoding="utf-8")
    return path
