"""The embedded SmolLM2-135M-Instruct on tiny real inputs."""

import re

import torch

import qjl
from qjl import QJLCache, QJLConfig
from qjl.runner import cache_kwarg

FACTS = ("The lighthouse keeper on the island of Varrow was named Tobias Fenwick. He kept a logbook of every ship "
         "that passed, noting the weather, the wind and the colour of the sea. ")


def test_generation_with_qjl_starts_like_full_cache_and_reads_as_text(embedded):
    """A prompt of several buffers (1.5k tokens of the GPL): the compressed cache starts with the full cache's tokens
    and writes a sensible answer about the text (sentences of real words that name the licence)."""
    import assets

    model, tokenizer = embedded
    prompt = (assets.truncate_to_tokens(assets.long_text(), tokenizer, 1500)
              + "\n\nSummarise the text above in two sentences.")
    ids = qjl.encode_prompt(tokenizer, prompt)
    assert ids.shape[1] > 1000
    kwargs = dict(max_new_tokens=24, do_sample=False, attention_mask=torch.ones_like(ids))
    full = model.generate(ids, **kwargs)[0, ids.shape[1]:]
    cache = QJLCache(model, QJLConfig.preset("3bit", head_dim=64))
    compressed = model.generate(ids, **{cache_kwarg(model): cache}, **kwargs)[0, ids.shape[1]:]
    assert torch.equal(full[:3], compressed[:3])
    text = tokenizer.decode(compressed, skip_special_tokens=True)
    assert "GPL" in text or "License" in text
    words = re.findall(r"[A-Za-z]+", text)
    assert len(words) >= 10 and sum(len(w) > 1 for w in words) / len(words) > 0.8
    assert cache.layers[0].n_compressed >= 10 * cache.config.buffer_size - 128  # several buffers were compressed


def test_runner_streams_both_sides(embedded):
    model, tokenizer = embedded
    records = list(qjl.run_side_by_side(model, tokenizer, FACTS * 8 + "Who kept the logbook?",
                                        lambda m: QJLCache(m, "paper"), max_new_tokens=6))
    prefill, steps = records[0], records[1:]
    assert isinstance(prefill, qjl.PrefillRecord) and prefill.prompt_tokens > 300
    assert prefill.bytes_compressed < prefill.bytes_full
    assert 1 <= len(steps) <= 6 and steps[0].token_full == steps[0].token_compressed  # same prefill logits
    last = steps[-1]
    assert last.text_full and last.text_compressed
    assert last.context_tokens == prefill.prompt_tokens + len(steps) - 1 + (not last.finished["compressed"])
    assert all(s.latency_full_s is None or s.latency_full_s >= 0 for s in steps)
    assert 0 <= last.match_rate <= 1


def test_runner_can_be_cancelled(embedded):
    model, tokenizer = embedded
    calls = []

    def stop_after_two():
        calls.append(1)
        return len(calls) > 2

    records = list(qjl.run_side_by_side(model, tokenizer, FACTS, lambda m: QJLCache(m, "3bit"), max_new_tokens=50,
                                        should_stop=stop_after_two))
    assert len(records) == 1 + 2
