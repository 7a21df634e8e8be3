"""``table``: the README's results table: per preset, the KV memory reduction against fp16 at a context length,
teacher-forced top-1 agreement and KL on the long document, and passkey accuracy (both caches), as Markdown."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

from qjl.presets import stored_bits
from qjl.runner import fork, prefill

from . import cli
from .caches import factory
from .cmd_passkey import accuracy
from .quality import passkey, teacher_forced

HELP = "measure memory reduction, agreement and passkey accuracy per preset and print the README's Markdown table"


def add_arguments(parser):
    cli.add_common(parser, out="results/table", presets="all", lengths="512,1024")
    parser.add_argument("--memory-tokens", type=int, default=4096, help="context length of the memory figure")
    parser.add_argument("--prefix", type=int, default=256)
    parser.add_argument("--eval-tokens", type=int, default=16)
    parser.add_argument("--depths", type=cli.float_list, default=cli.float_list("0.25,0.75"))


def markdown(rows: list[dict], args) -> str:
    lines = ["| preset | KV bytes vs fp16 | bits/number | top-1 agreement | KL (nats) | passkey full | passkey compressed |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['reduction_vs_fp16']:.2f}x smaller | {r['bits_per_number']:.2f} | "
                     f"{r['top1']:.3f} | {r['kl']:.4f} | {r['passkey_full']:.0%} | {r['passkey_compressed']:.0%} |")
    lines.append(f"\nKV bytes at {args.memory_tokens} tokens (sink and buffer included, exact numbers at fp16); "
                 f"agreement: {args.eval_tokens} tokens teacher-forced after a {args.prefix}-token prefix of the GPL v3 "
                 f"text; passkey: lengths {args.lengths} x depths {args.depths}.")
    return "\n".join(lines)


def run(args) -> int:
    import assets

    model, tokenizer = cli.load(args)
    device = next(model.parameters()).device
    ids = tokenizer(assets.long_text(), return_tensors="pt")["input_ids"].to(device)
    full, _, _ = prefill(model, ids[:, :args.memory_tokens])
    rows = []
    for preset in tqdm(cli.presets(args), desc="presets", file=sys.stderr):
        cache = fork(model, full, factory(preset))[0]
        forced = teacher_forced(model, ids, preset, args.prefix, args.eval_tokens, progress=True)
        grid = passkey(model, tokenizer, preset, args.lengths, args.depths, args.seed, progress=True)
        # Exact tokens, norms and scales counted at 16 bits: the figure of an fp16 deployment, also on a float32 CPU.
        bits = stored_bits(cache, float_bits=16)
        rows.append({"preset": preset, "bytes": cache.nbytes(), "fp16_bytes": cache.fp16_nbytes(),
                     "reduction_vs_fp16": 16 / bits, "bits_per_number": bits,
                     "top1": forced["top1"], "kl": forced["kl"], "passkey_full": accuracy(grid, "full"),
                     "passkey_compressed": accuracy(grid, "compressed"), "passkey_grid": grid})
        del cache
    table = markdown(rows, args)
    print(table)
    config = {"presets": cli.presets(args), "memory_tokens": args.memory_tokens, "prefix": args.prefix,
              "eval_tokens": args.eval_tokens, "lengths": args.lengths, "depths": args.depths, "seed": args.seed}
    cli.write_results(args, "table", config, {"rows": rows, "markdown": table}, {}, model)
    return 0
