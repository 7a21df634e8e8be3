"""What every subcommand shares: common arguments, loading the model, the environment, and writing results.

Each subcommand writes ``OUT/results.json``: ``{"command", "config", "environment", "results", "figures"}`` where
``figures`` maps a name to its plotly JSON and the HTML/PNG files written beside it.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch

from . import export
from .caches import preset_names


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def float_list(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def add_common(parser: argparse.ArgumentParser, out: str, presets: str = "qjl-3bit", lengths: str | None = None):
    parser.add_argument("--model", default=None, help="Hub id or local folder (default: the embedded SmolLM2-135M)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--dtype", default=None, help="float32, float16, bfloat16 (default: per device)")
    parser.add_argument("--preset", default=presets,
                        help=f"comma-separated compressed presets, or 'all' (default: {presets})")
    if lengths is not None:
        parser.add_argument("--lengths", type=int_list, default=int_list(lengths),
                            help=f"comma-separated context lengths in tokens (default: {lengths})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(out), help=f"output folder (default: {out})")
    parser.add_argument("--no-png", action="store_true", help="skip PNG figures (HTML is always written)")


def presets(args) -> list[str]:
    names = preset_names() if args.preset == "all" else [p.strip() for p in args.preset.split(",") if p.strip()]
    unknown = [name for name in names if name not in preset_names() and name != "full"]
    if unknown:
        raise SystemExit(f"unknown preset(s) {', '.join(unknown)}; known: {', '.join(preset_names())}")
    return names


def load(args):
    import qjl

    print(f"loading {args.model or 'the embedded model'} ...", file=sys.stderr)
    return qjl.load_model(args.model, device=args.device, dtype=args.dtype)


def environment(model) -> dict:
    import transformers

    device = next(model.parameters()).device
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or
        platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "dtype": str(next(model.parameters()).dtype),
        "model": getattr(model.config, "_name_or_path", None),
        "model_type": model.config.model_type,
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "cuda": torch.version.cuda, "platform": platform.platform(), "git_commit": commit,
    }


def write_results(args, command: str, config: dict, results, figures: dict, model) -> Path:
    """Writes every figure as HTML (and PNG unless ``--no-png`` or impossible) and ``results.json``."""
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    written, png_note = {}, None
    for name, figure in figures.items():
        entry = {"html": export.write_html(figure, out / f"{name}.html").name, "png": None,
                 "plotly": json.loads(figure.to_json())}
        if not args.no_png and png_note is None:
            try:
                entry["png"] = export.write_png(figure, out / f"{name}.png").name
            except export.PNGUnavailable as error:
                png_note = str(error)
                print(f"note: {png_note}", file=sys.stderr)
        written[name] = entry
    path = export.write_json({"command": command, "argv": sys.argv[1:], "config": config,
                              "environment": environment(model), "png_note": png_note, "results": results,
                              "figures": written}, out / "results.json")
    print(f"wrote {path} and {len(figures)} figure(s) to {out}", file=sys.stderr)
    return path
