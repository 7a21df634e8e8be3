"""``passkey``: retrieval of a pass key hidden in filler text over a grid of prompt lengths and depths, with the
full and each compressed cache."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

from . import cli, figures
from .quality import passkey

HELP = "passkey retrieval accuracy over prompt lengths and depths, full against each compressed preset"


def add_arguments(parser):
    cli.add_common(parser, out="results/passkey", lengths="512,1024")
    parser.add_argument("--depths", type=cli.float_list, default=cli.float_list("0.25,0.75"),
                        help="comma-separated depths of the key, 0 (start) to 1 (end)")
    parser.add_argument("--max-new-tokens", type=int, default=10)


def accuracy(rows: list[dict], side: str) -> float:
    return sum(r[f"found_{side}"] for r in rows) / len(rows)


def run(args) -> int:
    model, tokenizer = cli.load(args)
    results, all_figures = {}, {}
    for preset in tqdm(cli.presets(args), desc="presets", file=sys.stderr):
        rows = passkey(model, tokenizer, preset, args.lengths, args.depths, args.seed, args.max_new_tokens,
                       progress=True)
        results[preset] = {"accuracy_full": accuracy(rows, "full"), "accuracy_compressed": accuracy(rows,
                                                                                                    "compressed"),
                           "grid": rows}
        print(f"{preset}: accuracy full {results[preset]['accuracy_full']:.2f}, compressed "
              f"{results[preset]['accuracy_compressed']:.2f} over {len(rows)} prompts", file=sys.stderr)
        all_figures[f"{preset}-passkey"] = figures.passkey_heatmap(rows, "compressed", f"Passkey retrieval ({preset})")
    first = next(iter(results.values()))["grid"]
    all_figures["full-passkey"] = figures.passkey_heatmap(first, "full", "Passkey retrieval (full cache)")
    config = {"presets": cli.presets(args), "lengths": args.lengths, "depths": args.depths, "seed": args.seed,
              "max_new_tokens": args.max_new_tokens}
    cli.write_results(args, "passkey", config, results, all_figures, model)
    return 0
