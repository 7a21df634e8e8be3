"""Side by side: one prompt, one model, a full-precision cache and a compressed one, decoded in lockstep.

The prompt is prefilled once (exact attention); its keys and values are copied into the compressed cache, whose
quantization is timed on its own. Then each tick runs one decode step of each side and yields a ``StepRecord``.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

import torch
from transformers import DynamicCache

from .cache import CompressedCache

CacheFactory = Callable[[torch.nn.Module], CompressedCache]


def cache_kwarg(model) -> str:
    """The name ``forward`` takes the cache under (``past_key_values`` became ``cache`` in later 5.x releases)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cache_nbytes(cache) -> int:
    """Exact bytes of a compressed cache, or of the tensors of a transformers ``DynamicCache``."""
    if hasattr(cache, "nbytes"):
        return cache.nbytes()
    return sum(t.numel() * t.element_size() for layer in cache.layers if layer.is_initialized
               for t in (layer.keys, layer.values))


def encode_prompt(tokenizer, prompt: str, chat: bool = True) -> torch.Tensor:
    """Token ids ``[1, n]`` of ``prompt``, wrapped in the model's chat template when it has one."""
    if not prompt or not prompt.strip():
        raise ValueError("the prompt is empty: give some text to run")
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    return ids


@dataclass
class PrefillRecord:
    prompt_tokens: int
    prefill_s: float
    quantize_s: float
    bytes_full: int
    bytes_compressed: int
    fp16_bytes: int


@dataclass
class StepRecord:
    step: int
    token_full: int | None
    token_compressed: int | None
    text_full: str
    text_compressed: str
    latency_full_s: float | None
    latency_compressed_s: float | None
    bytes_full: int
    bytes_compressed: int
    fp16_bytes: int
    context_tokens: int
    matches: int
    match_rate: float
    first_divergence: int | None
    elapsed_s: float
    finished: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


class Side:
    """One cache decoding its own tokens."""

    def __init__(self, model, cache, first_logits, generator, sample: Callable):
        self.model, self.cache, self.sample, self.generator = model, cache, sample, generator
        self.tokens: list[int] = []
        self.finished = False
        self.next_token = sample(first_logits, generator)

    def step(self, device, eos_ids) -> tuple[int, float]:
        token = self.next_token
        self.tokens.append(token)
        if token in eos_ids:
            self.finished = True
            return token, 0.0
        synchronize(device)
        start = time.perf_counter()
        with torch.no_grad():
            out = self.model(input_ids=torch.tensor([[token]], device=device), use_cache=True,
                             **{cache_kwarg(self.model): self.cache})
        self.next_token = self.sample(out.logits[:, -1], self.generator)
        synchronize(device)
        return token, time.perf_counter() - start


def make_sampler(do_sample: bool, temperature: float, top_p: float):
    def sample(logits: torch.Tensor, generator: torch.Generator) -> int:
        if not do_sample:
            return int(logits[0].argmax())
        probs = torch.softmax(logits[0].float() / max(temperature, 1e-5), dim=-1)
        if top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            keep = sorted_probs.cumsum(-1) - sorted_probs < top_p
            probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
        return int(torch.multinomial(probs.cpu(), 1, generator=generator))

    return sample


def prefill(model, input_ids: torch.Tensor):
    """Exact prefill into a ``DynamicCache``: ``(cache, last logits, seconds)``."""
    device = input_ids.device
    cache = DynamicCache()
    synchronize(device)
    start = time.perf_counter()
    with torch.no_grad():
        out = model(input_ids=input_ids, use_cache=True, **{cache_kwarg(model): cache})
    synchronize(device)
    return cache, out.logits[:, -1], time.perf_counter() - start


def fork(model, full_cache, make_cache: CacheFactory):
    """A compressed cache holding the same tokens as ``full_cache``: ``(cache, seconds)``."""
    compressed = make_cache(model)
    device = next(model.parameters()).device
    synchronize(device)
    start = time.perf_counter()
    for idx, layer in enumerate(full_cache.layers):
        compressed.layers[idx].update(layer.keys, layer.values)
    synchronize(device)
    return compressed, time.perf_counter() - start


def run_side_by_side(model, tokenizer, prompt: str | torch.Tensor, make_cache: CacheFactory, max_new_tokens: int = 64,
                     do_sample: bool = False, temperature: float = 0.7, top_p: float = 0.9, seed: int = 0,
                     should_stop: Callable[[], bool] | None = None, chat: bool = True,
                     ) -> Iterator[PrefillRecord | StepRecord]:
    """Yields a ``PrefillRecord``, then a ``StepRecord`` per step until both sides end (EOS or ``max_new_tokens``)
    or ``should_stop()`` returns True between steps."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1")
    device = next(model.parameters()).device
    input_ids = prompt if isinstance(prompt, torch.Tensor) else encode_prompt(tokenizer, prompt, chat)
    input_ids = input_ids.to(device)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and input_ids.shape[1] + max_new_tokens > limit:
        raise ValueError(f"the prompt has {input_ids.shape[1]} tokens; with {max_new_tokens} new tokens that exceeds "
                         f"the model's context of {limit} tokens")
    full_cache, logits, prefill_s = prefill(model, input_ids)
    compressed_cache, quantize_s = fork(model, full_cache, make_cache)
    yield PrefillRecord(input_ids.shape[1], prefill_s, quantize_s, cache_nbytes(full_cache),
                        compressed_cache.nbytes(), compressed_cache.fp16_nbytes())

    sample = make_sampler(do_sample, temperature, top_p)
    full = Side(model, full_cache, logits, torch.Generator().manual_seed(seed), sample)
    compressed = Side(model, compressed_cache, logits, torch.Generator().manual_seed(seed), sample)
    eos = tokenizer.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
    generation_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos_ids |= set(generation_eos if isinstance(generation_eos, list) else [generation_eos]) - {None}
    matches, first_divergence, start = 0, None, time.perf_counter()
    for step in range(max_new_tokens):
        if should_stop is not None and should_stop():
            return
        results = [side.step(device, eos_ids) if not side.finished else (None, None) for side in (full, compressed)]
        (token_full, latency_full), (token_compressed, latency_compressed) = results
        matches += token_full == token_compressed
        if token_full != token_compressed and first_divergence is None:
            first_divergence = step
        yield StepRecord(
            step=step, token_full=token_full, token_compressed=token_compressed,
            text_full=tokenizer.decode(full.tokens, skip_special_tokens=True),
            text_compressed=tokenizer.decode(compressed.tokens, skip_special_tokens=True),
            latency_full_s=latency_full, latency_compressed_s=latency_compressed,
            bytes_full=cache_nbytes(full_cache), bytes_compressed=compressed_cache.nbytes(),
            fp16_bytes=compressed_cache.fp16_nbytes(), context_tokens=compressed_cache.get_seq_length(),
            matches=matches, match_rate=matches / (step + 1), first_divergence=first_divergence,
            elapsed_s=time.perf_counter() - start, finished={"full": full.finished, "compressed": compressed.finished})
        if full.finished and compressed.finished:
            return
