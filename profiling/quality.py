"""What compression changes: next-token agreement, KL divergence, perplexity, passkey retrieval, attention-score
error, and the summary of a side-by-side run. Every metric takes a cache factory (``lambda model: cache``), so any
method plugs in.

Teacher forcing: a prefix is prefilled exactly, its KV copied into the compressed cache, then the same text is fed
one token per step into both caches (so the compressed cache's buffer fills and flushes as in decoding) and the two
next-token distributions are compared at every step.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from qjl.runner import cache_kwarg, fork, prefill, run_side_by_side

from .caches import factory
from .records import as_dict, as_dicts


# --- metrics on logits ------------------------------------------------------------------------------------------------
def top1_agreement(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """Per row (last dim = vocabulary): 1.0 where both argmaxes agree."""
    return (logits_a.argmax(-1) == logits_b.argmax(-1)).float()


def kl_divergence(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """Per row: KL(p || q) in nats, p and q the softmaxes of the logits."""
    log_p, log_q = torch.log_softmax(logits_p.float(), -1), torch.log_softmax(logits_q.float(), -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def negative_log_likelihood(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per row: ``-log softmax(logits)[target]`` in nats."""
    return -torch.log_softmax(logits.float(), -1).gather(-1, targets[..., None]).squeeze(-1)


# --- teacher forcing ----------------------------------------------------------------------------------------------------
def teacher_forced(model, input_ids: torch.Tensor, make_cache, prefix_tokens: int, eval_tokens: int,
                   progress: bool = False) -> dict:
    """Top-1 agreement and mean KL(full || compressed) of the next-token distributions over ``eval_tokens`` steps
    after an exact prefill of ``prefix_tokens`` tokens of ``input_ids`` ``[1, n]``, with per-step lists
    (``steps``) and the negative log-likelihood of the true next token on each side."""
    input_ids = input_ids.to(next(model.parameters()).device)
    if input_ids.shape[1] < prefix_tokens + eval_tokens + 1:
        raise ValueError(f"teacher forcing needs {prefix_tokens + eval_tokens + 1} tokens (prefix {prefix_tokens}, "
                         f"{eval_tokens} evaluated, one target), the text has {input_ids.shape[1]}")
    full, _, _ = prefill(model, input_ids[:, :prefix_tokens])
    compressed, _ = fork(model, full, factory(make_cache))
    key = cache_kwarg(model)
    steps = []
    with torch.no_grad():
        for i in tqdm(range(eval_tokens), desc="teacher forcing", disable=not progress, leave=False):
            position = prefix_tokens + i
            token = input_ids[:, position:position + 1]
            logits_full = model(input_ids=token, use_cache=True, **{key: full}).logits[:, -1]
            logits_compressed = model(input_ids=token, use_cache=True, **{key: compressed}).logits[:, -1]
            target = input_ids[:, position + 1]
            steps.append({
                "step": i, "position": position,
                "top1": float(top1_agreement(logits_full, logits_compressed)[0]),
                "kl": float(kl_divergence(logits_full, logits_compressed)[0]),
                "nll_full": float(negative_log_likelihood(logits_full, target)[0]),
                "nll_compressed": float(negative_log_likelihood(logits_compressed, target)[0]),
            })
    n = len(steps)
    mean = lambda name: sum(s[name] for s in steps) / n  # noqa: E731
    return {"top1": mean("top1"), "kl": mean("kl"), "n": n, "nll_full": mean("nll_full"),
            "nll_compressed": mean("nll_compressed"), "prefix_tokens": prefix_tokens, "steps": steps}


def perplexity(model, input_ids: torch.Tensor, make_cache, prefix_tokens: int, eval_tokens: int,
               progress: bool = False) -> dict:
    """Perplexity of ``eval_tokens`` tokens after an exact prefix, for both caches (teacher forced)."""
    result = teacher_forced(model, input_ids, make_cache, prefix_tokens, eval_tokens, progress)
    return {"ppl_full": math.exp(result["nll_full"]), "ppl_compressed": math.exp(result["nll_compressed"]),
            "n": result["n"], "prefix_tokens": prefix_tokens}


# --- passkey retrieval --------------------------------------------------------------------------------------------------
def passkey(model, tokenizer, make_cache, lengths, depths, seed: int = 0, max_new_tokens: int = 12,
            progress: bool = False) -> list[dict]:
    """For each prompt length (tokens) and depth (0..1): a pass key hidden in filler, greedy answers of both caches
    (one shared exact prefill) and whether each contains the key. The prompt is plain text ending in "The pass key
    is", continued by the model: small chat models asked the question through their chat template tend to talk about
    pass keys instead of quoting one, with either cache."""
    from assets import passkey_prompt

    grid = [(length, depth) for length in lengths for depth in depths]
    results = []
    for i, (length, depth) in enumerate(tqdm(grid, desc="passkey", disable=not progress, leave=False)):
        prompt, key = passkey_prompt(tokenizer, length, depth, seed + i)
        last = None
        for last in run_side_by_side(model, tokenizer, prompt, factory(make_cache), max_new_tokens=max_new_tokens,
                                     chat=False):
            pass
        answers = {"full": last.text_full, "compressed": last.text_compressed}
        results.append({"length": length, "depth": depth, "passkey": key, "found_full": key in answers["full"],
                        "found_compressed": key in answers["compressed"], "answers": answers})
    return results


# --- attention scores ---------------------------------------------------------------------------------------------------
def capture_queries(model, input_ids: torch.Tensor, layers) -> tuple[dict, object]:
    """Runs an exact prefill and records the (rotated) queries of ``layers``: ``({layer: [b, hq, n, d]}, cache)``."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    queries = {}

    def recording_attention(module, query, key, value, attention_mask, **kwargs):
        if module.layer_idx in layers:
            queries[module.layer_idx] = query.detach()
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("qjl_capture", recording_attention)
    previous = model.config._attn_implementation
    model.set_attn_implementation("qjl_capture")
    try:
        cache, _, _ = prefill(model, input_ids.to(next(model.parameters()).device))
    finally:
        model.set_attn_implementation(previous)
    return queries, cache


def attention_score_error(model, input_ids: torch.Tensor, make_cache_or_config, layers, n_queries: int = 16,
                          n_points: int = 2000, seed: int = 0) -> list[dict]:
    """Exact ``q . k`` against the compressed cache's estimate, on the real keys of the prompt and its last
    ``n_queries`` queries, per layer: relative error (Frobenius), Pearson correlation, and up to ``n_points``
    sampled ``(exact, estimated)`` pairs for a scatter plot. Only tokens the cache compressed are compared (its sink
    and buffer are exact)."""
    make_cache = factory(make_cache_or_config)
    layers = list(layers)
    cache = make_cache(model)  # builds first: a compressed cache switches the model to its attention function
    if not hasattr(cache.layers[0], "compressed_scores"):
        raise ValueError("attention_score_error needs a compressed cache (its layers estimate scores)")
    queries, full = capture_queries(model, input_ids, set(layers))
    generator = torch.Generator().manual_seed(seed)
    results = []
    for idx in layers:
        keys, values = full.layers[idx].keys, full.layers[idx].values
        layer = cache.layers[idx]
        layer.update(keys, values)
        n_sink, n_compressed = layer.sink_keys.shape[-2], layer.n_compressed
        if not n_compressed:
            raise ValueError(f"the prompt ({keys.shape[-2]} tokens) is too short: nothing was compressed")
        b, hq, _, d = queries[idx].shape
        h = keys.shape[1]
        query = queries[idx][:, :, -n_queries:].float()
        grouped = query.reshape(b, h, hq // h * query.shape[2], d)  # the grouping of CompressedLayer.attend
        exact = grouped @ keys[:, :, n_sink:n_sink + n_compressed].float().transpose(-1, -2)
        estimated = layer.compressed_scores(grouped)
        exact, estimated = exact.flatten().cpu(), estimated.flatten().cpu()
        picks = torch.randperm(exact.numel(), generator=generator)[:n_points]
        results.append({
            "layer": idx, "n_scores": exact.numel(),
            "relative_error": float((estimated - exact).norm() / exact.norm()),
            "correlation": float(torch.corrcoef(torch.stack([exact, estimated]))[0, 1]),
            "exact": exact[picks].tolist(), "estimated": estimated[picks].tolist(),
        })
    return results


# --- a side-by-side run -------------------------------------------------------------------------------------------------
def run_summary(prefill_record, step_records) -> dict:
    """Match rate, first divergence, tokens per second of each side and the speed-up, and the KV bytes of the last
    step: full, compressed, their ratio and the compressed cache's bits per stored number."""
    prefill_record, steps = as_dict(prefill_record), as_dicts(step_records)
    last = steps[-1] if steps else None
    source = last or prefill_record

    def tokens_per_s(side):
        latencies = [s[f"latency_{side}_s"] for s in steps if s[f"latency_{side}_s"]]
        return len(latencies) / sum(latencies) if latencies else None

    tps_full, tps_compressed = tokens_per_s("full"), tokens_per_s("compressed")
    return {
        "prompt_tokens": prefill_record["prompt_tokens"] if prefill_record else None,
        "prefill_s": prefill_record["prefill_s"] if prefill_record else None,
        "quantize_s": prefill_record["quantize_s"] if prefill_record else None,
        "steps": len(steps),
        "match_rate": last["match_rate"] if last else None,
        "first_divergence": last["first_divergence"] if last else None,
        "tokens_per_s_full": tps_full, "tokens_per_s_compressed": tps_compressed,
        "speedup": tps_compressed / tps_full if tps_full and tps_compressed else None,
        "bytes_full": source["bytes_full"], "bytes_compressed": source["bytes_compressed"],
        "ratio": source["bytes_full"] / source["bytes_compressed"] if source["bytes_compressed"] else None,
        # fp16_bytes / 2 is the number of stored numbers (keys and values).
        "bits_per_number": 16 * source["bytes_compressed"] / source["fp16_bytes"] if source["fp16_bytes"] else None,
    }
