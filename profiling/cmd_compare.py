"""``compare``: one prompt through the full cache and each compressed preset side by side; KV bytes, device memory,
latency and agreement per step."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

from qjl.runner import run_side_by_side

from . import cli, figures
from .caches import factory
from .memory import MemorySampler
from .quality import run_summary

HELP = "run one prompt with the full and the compressed cache side by side (memory, latency, agreement per step)"


def add_arguments(parser):
    import assets

    cli.add_common(parser, out="results/compare")
    parser.add_argument("--prompt", default=None, help="the prompt text (default: --prompt-preset)")
    parser.add_argument("--prompt-preset", default="Summarise the document (first 1k tokens)",
                        choices=list(assets.PROMPTS), help="a prompt from assets.PROMPTS")
    parser.add_argument("--max-new-tokens", type=int, default=16)


def run(args) -> int:
    import assets

    model, tokenizer = cli.load(args)
    prompt = args.prompt or assets.PROMPTS[args.prompt_preset](tokenizer)
    results, all_figures = {}, {}
    for preset in cli.presets(args):
        sampler = MemorySampler(next(model.parameters()).device)
        prefill, steps = None, []
        with sampler, tqdm(total=args.max_new_tokens, desc=preset, file=sys.stderr) as bar:
            for record in run_side_by_side(model, tokenizer, prompt, factory(preset), args.max_new_tokens,
                                           seed=args.seed):
                if prefill is None:
                    prefill = record
                    continue
                steps.append(record)
                bar.update()
        summary = run_summary(prefill, steps)
        print(f"{preset}: {format_summary(summary)}", file=sys.stderr)
        results[preset] = {"summary": summary, "prefill": prefill, "steps": steps, "memory": sampler.samples,
                           "memory_info": sampler.info(), "text_full": steps[-1].text_full,
                           "text_compressed": steps[-1].text_compressed}
        all_figures |= {f"{preset}-kv-memory": figures.live_memory(steps, prefill),
                        f"{preset}-latency": figures.live_latency(steps),
                        f"{preset}-agreement": figures.live_agreement(steps),
                        f"{preset}-memory-over-time": figures.memory_over_time(sampler.samples, sampler.info())}
    config = {"presets": cli.presets(args), "prompt": prompt, "max_new_tokens": args.max_new_tokens,
              "seed": args.seed}
    cli.write_results(args, "compare", config, results, all_figures, model)
    return 0


def format_summary(s: dict) -> str:
    speed = f"{s['speedup']:.2f}x" if s["speedup"] else "n/a"
    return (f"match rate {s['match_rate']:.2f}, first divergence {s['first_divergence']}, KV {s['bytes_full']} -> "
            f"{s['bytes_compressed']} bytes ({s['ratio']:.2f}x, {s['bits_per_number']:.2f} bits/number), "
            f"speed-up {speed}")
