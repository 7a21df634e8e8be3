"""``pareto``: bits per stored number against quality for every cache preset (full, QJL, KIVI-style,
TurboQuant-style, transformers' quanto cache where installed), with the Pareto front.

Per preset: measured and analytic bits per number, teacher-forced top-1 agreement and KL against the full cache on
the long document, passkey accuracy over a small grid, and the median decode step time. Writes ``results.json``
(``results``: one entry per preset) and the figures ``pareto`` (top-1) and ``pareto-kl`` as HTML and PNG.
"""

from __future__ import annotations

import argparse
import sys

from tqdm.auto import tqdm

from . import cli
from .pareto import markdown_table, measure_preset, pareto_figure, pareto_front

HELP = "bits per number against top-1 agreement, KL, passkey and step time for every preset, with the Pareto front"


def add_arguments(parser):
    cli.add_common(parser, out="results/pareto", presets="all", lengths="1024")
    parser.add_argument("--presets", dest="preset", default=argparse.SUPPRESS, help="same as --preset")
    parser.add_argument("--prefix", type=int, default=1024, help="tokens of the long text prefilled exactly")
    parser.add_argument("--eval-tokens", type=int, default=64, help="tokens teacher-forced and compared")
    parser.add_argument("--depths", type=cli.float_list, default=cli.float_list("0.25,0.75"),
                        help="passkey depths (0 = start, 1 = end); lengths are --lengths")
    parser.add_argument("--steps", type=int, default=16, help="timed decode steps after a --prefix-token prompt")


def run(args) -> int:
    import assets

    model, tokenizer = cli.load(args)
    ids = tokenizer(assets.long_text(), return_tensors="pt")["input_ids"]
    rows = []
    for name in tqdm(cli.presets(args), desc="presets", file=sys.stderr):
        row = measure_preset(model, tokenizer, name, ids, args.prefix, args.eval_tokens, args.lengths, args.depths,
                             args.prefix, args.steps, args.seed)
        print(f"{name}: {row['bits']:.2f} bits, top-1 {row['top1']:.3f}, KL {row['kl']:.4f}, passkey "
              f"{row['passkey']:.0%}, step {1000 * row['step_s']:.1f} ms", file=sys.stderr)
        rows.append(row)
    figures = {"pareto": pareto_figure(rows, "top1"), "pareto-kl": pareto_figure(rows, "kl")}
    config = {"presets": [row["preset"] for row in rows], "prefix": args.prefix, "eval_tokens": args.eval_tokens,
              "passkey_lengths": args.lengths, "passkey_depths": args.depths, "steps": args.steps,
              "text": "assets/gpl-3.0.txt", "front_top1": [row["preset"] for row in pareto_front(rows, "bits", "top1")],
              "front_kl": [row["preset"] for row in pareto_front(rows, "bits", "kl", higher_is_better=False)]}
    cli.write_results(args, "pareto", config, rows, figures, model)
    print(markdown_table(rows))
    print(f"\nteacher-forced: {args.eval_tokens} tokens after a {args.prefix}-token prefix of assets/gpl-3.0.txt; "
          f"passkey: lengths {args.lengths} x depths {args.depths}; step time: median of {args.steps} decode steps "
          f"after a {args.prefix}-token prompt; bits measured on that cache, exact tokens counted at fp16.")
    return 0
