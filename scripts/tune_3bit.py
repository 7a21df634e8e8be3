"""The study behind the ``3bit`` preset: teacher-forced top-1 agreement and KL against the full cache of QJL settings
at about 3 bits per number, on the embedded model, 256 tokens after a 2k-token prefix of the long text.

    python scripts/tune_3bit.py [--prefix 2048] [--eval-tokens 256]
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import assets  # noqa: E402
import qjl  # noqa: E402
from profiling.quality import teacher_forced  # noqa: E402

BASE = qjl.QJLConfig.preset("3bit", head_dim=64)
VARIANTS = {
    "3bit": BASE,
    "3bit, sliding buffer (keep 96)": BASE.sliding(),
    "3bit, sketch 96, values in groups of 32": BASE.replace(sketch_dim=96, value_group_size=32),
    "3bit, outliers sketched (64 bits)": BASE.replace(exact_outliers=False, outlier_sketch_dim=64),
    "3bit, no sinks, no centring": BASE.replace(sink_tokens=0, center_keys=False),
    "paper": qjl.QJLConfig.preset("paper", head_dim=64),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefix", type=int, default=2048)
    parser.add_argument("--eval-tokens", type=int, default=256)
    args = parser.parse_args()
    model, tokenizer = qjl.load_model(device="cpu")
    ids = tokenizer(assets.long_text(), return_tensors="pt")["input_ids"][:, :args.prefix + args.eval_tokens + 1]
    print(f"{'settings':45s} {'bits':>5s} {'top-1':>6s} {'KL':>6s}")
    for name, config in VARIANTS.items():
        result = teacher_forced(model, ids, lambda m, c=config: qjl.QJLCache(m, c), args.prefix, args.eval_tokens)
        bits = config.bits_per_fpn(64, model.config.num_hidden_layers)
        print(f"{name:45s} {bits:5.2f} {result['top1']:6.3f} {result['kl']:6.3f}", flush=True)


if __name__ == "__main__":
    main()
