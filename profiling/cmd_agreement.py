"""``agreement``: teacher-forced next-token agreement, KL and perplexity of each preset against the full cache on
the long document, and the attention-score error of the estimator on real keys and queries."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

from . import cli, figures
from .quality import attention_score_error, teacher_forced

HELP = "teacher-forced top-1 agreement, KL, perplexity and attention-score error of each preset on the long text"


def add_arguments(parser):
    cli.add_common(parser, out="results/agreement")
    parser.add_argument("--prefix", type=int, default=256, help="tokens prefilled exactly before evaluating")
    parser.add_argument("--eval-tokens", type=int, default=16, help="tokens fed one per step and compared")
    parser.add_argument("--layers", type=cli.int_list, default=None,
                        help="layers for the score error (default: first, middle, last)")
    parser.add_argument("--score-tokens", type=int, default=512, help="prompt tokens for the score error")


def run(args) -> int:
    import assets

    model, tokenizer = cli.load(args)
    ids = tokenizer(assets.long_text(), return_tensors="pt")["input_ids"]
    n_layers = model.config.num_hidden_layers
    layers = args.layers or sorted({0, n_layers // 2, n_layers - 1})
    forced, scores = {}, {}
    for preset in tqdm(cli.presets(args), desc="presets", file=sys.stderr):
        forced[preset] = teacher_forced(model, ids, preset, args.prefix, args.eval_tokens, progress=True)
        result = forced[preset]
        print(f"{preset}: top-1 {result['top1']:.3f}, KL {result['kl']:.4f}, nll full {result['nll_full']:.3f} / "
              f"compressed {result['nll_compressed']:.3f} (n={result['n']})", file=sys.stderr)
        try:
            scores[preset] = attention_score_error(model, ids[:, :args.score_tokens], preset, layers,
                                                   seed=args.seed)
        except (ValueError, NotImplementedError) as error:  # a method whose layers do not estimate scores
            scores[preset] = {"error": str(error)}
    results = {"teacher_forced": forced, "attention_scores": scores}
    all_figures = {"agreement-over-steps": figures.agreement_over_steps(forced)}
    all_figures |= {f"{preset}-scores": figures.score_scatter(rows) for preset, rows in scores.items()
                    if isinstance(rows, list)}
    config = {"presets": cli.presets(args), "prefix": args.prefix, "eval_tokens": args.eval_tokens,
              "layers": layers, "score_tokens": args.score_tokens, "text": "assets/gpl-3.0.txt"}
    cli.write_results(args, "agreement", config, results, all_figures, model)
    return 0
