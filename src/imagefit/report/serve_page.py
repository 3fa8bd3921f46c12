"""The page ``imagefit serve`` shows at ``/``: drop images, see each with its top classes as
bars and its Grad-CAM overlay. Every string from the model or the user is escaped (the
template's autoescape; the page's script sets text, never HTML)."""

from __future__ import annotations

from .html import environment, format_value


def serve_page(description: dict, limits: dict) -> str:
    """The page's HTML from ``GET /model``'s description and the request limits."""
    metrics = description.get("metrics") or {}
    main = next((k for k in ("test_accuracy", "valid_accuracy", "test_mae", "valid_mae",
                             "test_f1_macro", "valid_f1_macro") if k in metrics), None)
    classes = description.get("classes") or description.get("targets") or []
    facts = [("task", description["task"]), ("model", description.get("architecture") or "-"),
             ("image", f"{description['image_size']} px, {description['channels']} channel"
                       f"{'s' if description['channels'] > 1 else ''}, {description['resize']}"),
             ("classes" if "classes" in description else "targets", len(classes)),
             ("engine", description["engine"])]
    if description.get("members", 1) > 1:
        facts.append(("folds averaged", description["members"]))
    if main:
        facts.append((main.replace("_", " "), format_value(metrics[main])))
    return environment.get_template("serve.html").render(
        title=f"imagefit serve: {description['source']}", facts=facts,
        saliency=description["saliency"],
        limits=f"up to {limits['max_files']} images a request, {limits['max_file_mb']:g} MB "
               "each",
    )
