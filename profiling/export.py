"""Export: figures as HTML (always) and PNG (kaleido, which drives a Chromium), records as CSV and JSON, and a whole
run as one zip.

PNG needs a Chromium-family browser: Debian's ``chromium`` package (``apt-get install -y chromium``) works; it is
found on the PATH or through ``BROWSER_PATH``. Without one, ``write_png`` raises ``PNGUnavailable`` saying so.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import zipfile
from pathlib import Path

from plotly.offline import get_plotlyjs

from .records import as_dicts

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


class PNGUnavailable(RuntimeError):
    """No PNG export: kaleido or a Chromium browser is missing."""


def find_browser() -> str | None:
    """The browser kaleido will drive: ``BROWSER_PATH`` if set, else the first Chromium on the PATH."""
    if os.environ.get("BROWSER_PATH"):
        return os.environ["BROWSER_PATH"]
    return next((path for path in map(shutil.which, BROWSERS) if path), None)


def png_bytes(figure, width: int = 1000, height: int = 550) -> bytes:
    """The figure as PNG bytes (kaleido)."""
    try:
        import kaleido  # noqa: F401
    except ImportError as error:
        raise PNGUnavailable("PNG export needs kaleido: pip install kaleido") from error
    browser = find_browser()
    if browser is None:
        raise PNGUnavailable("PNG export needs a Chromium browser for kaleido: install one (on Debian/Ubuntu "
                             "`apt-get install -y chromium`) or set BROWSER_PATH to it; HTML export still works")
    os.environ.setdefault("BROWSER_PATH", browser)  # kaleido's browser finder (choreographer) reads it
    try:
        return figure.to_image(format="png", width=width, height=height)
    except Exception as error:
        raise PNGUnavailable(f"kaleido could not render a PNG with {browser}: {error}") from error


def write_html(figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # "directory": the page loads plotly.min.js from beside it (plotly writes it there), so it works offline.
    figure.write_html(path, include_plotlyjs="directory", full_html=True)
    return path


def write_png(figure, path, width: int = 1000, height: int = 550) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(figure, width, height))
    return path


def _clean(value):
    """JSON-safe: NaN and infinities become None, tuples lists, unknown objects strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def to_json(obj) -> str:
    return json.dumps(_clean(obj), indent=2)


def write_json(obj, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_json(obj))
    return path


def to_csv(records) -> str:
    """Records as CSV: one row each, columns in first-seen order; nested values (dicts, lists) as JSON."""
    rows = as_dicts(records)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: json.dumps(_clean(v)) if isinstance(v, (dict, list, tuple)) else v
                         for k, v in row.items()})
    return out.getvalue()


def write_csv(records, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_csv(records))
    return path


def export_run(path, figures: dict, records: dict, config: dict, png: bool = True) -> tuple[Path, list[str]]:
    """Writes a zip of a run: ``charts/<name>.html`` (+ ``.png`` where possible), ``records/<name>.csv`` and
    ``.json`` for each list of records, and ``config.json``. Returns the path and notes (e.g. why PNGs are missing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    notes = []
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        if figures:
            archive.writestr("charts/plotly.min.js", get_plotlyjs())
        for name, figure in figures.items():
            archive.writestr(f"charts/{name}.html", figure.to_html(include_plotlyjs="directory", full_html=True))
            if png and not notes:  # after one failure, the browser is missing for every figure: say it once
                try:
                    archive.writestr(f"charts/{name}.png", png_bytes(figure))
                except PNGUnavailable as error:
                    notes.append(str(error))
        for name, rows in records.items():
            archive.writestr(f"records/{name}.csv", to_csv(rows))
            archive.writestr(f"records/{name}.json", to_json(as_dicts(rows)))
        archive.writestr("config.json", to_json(config))
        if notes:
            archive.writestr("NOTES.txt", "\n".join(notes) + "\n")
    return path, notes
