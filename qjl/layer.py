"""A transformers cache layer with compressed history, exact attention sinks and an exact recent-token buffer.

Tokens are kept in logical order: ``sink | compressed | buffer``. The first ``sink_tokens`` tokens go to the sink and
stay exact. Later tokens enter the buffer; once it holds ``buffer_size`` tokens, its oldest tokens are compressed in
whole groups of ``group_size``, all but the newest ``buffer_keep`` (0 in the paper: the whole buffer, so right after a
flush no recent token is exact; ``buffer_size - group_size`` slides a window of exact recent tokens instead). A method (QJL, KIVI, TurboQuant) is a
subclass that says how a block is compressed, how a query scores it and how probabilities weight its values.

``update`` returns the new keys and values themselves on the first call (the prompt: attention is exact) and, once
the layer holds history, a view of them tagged with the layer, so the attention function registered in
``qjl.attention`` computes attention over the compressed state instead.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

LAYER_ATTRIBUTE = "qjl_layer"


def tensors_nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def flushed_tokens(n_compressed: int, n_buffered: int, buffer_keep: int, group_size: int) -> int:
    """Tokens a flush compresses: the oldest of ``n_buffered`` but the newest ``buffer_keep``, as many as leave the
    compressed count a multiple of the group."""
    n = n_buffered - buffer_keep
    return max(n - (n_compressed + n) % group_size, 0)


def prompt_split(n_tokens: int, sink_tokens: int, buffer_size: int, group_size: int, buffer_keep: int = 0,
                 n_decoded: int = 0) -> tuple[int, int]:
    """(compressed, exact) tokens of a layer that took an ``n_tokens`` prompt in one ``update``, then ``n_decoded``
    tokens one ``update`` each: each fills the sink first, then the buffer, which flushes whenever it reaches
    ``buffer_size``."""
    compressed, sink, buffered = 0, 0, 0
    for arriving in [n_tokens] + [1] * n_decoded:
        to_sink = min(arriving, sink_tokens - sink)
        sink, buffered = sink + to_sink, buffered + arriving - to_sink
        if buffered >= buffer_size:
            flushed = flushed_tokens(compressed, buffered, buffer_keep, group_size)
            compressed, buffered = compressed + flushed, buffered - flushed
    return compressed, sink + buffered


class CompressedLayer(DynamicLayer):
    """Sink and buffer bookkeeping, and attention over ``sink | compressed | buffer``; subclasses compress."""

    def __init__(self, sink_tokens: int, buffer_size: int, group_size: int, buffer_keep: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.sink_tokens, self.buffer_size, self.group_size = sink_tokens, buffer_size, group_size
        self.buffer_keep = buffer_keep
        self._clear()
        self.reset_compressed()

    # --- what a method implements -------------------------------------------------------------------------------
    def start(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Called once with the first compressible keys and values (the prompt), before any ``compress``."""

    def compress(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Appends a block of tokens (``[b, h, n, d]``) to the compressed state."""
        raise NotImplementedError

    def compressed_scores(self, query: torch.Tensor) -> torch.Tensor:
        """``query`` float32 ``[b, h, m, d]`` (query heads grouped by KV head) -> float32 ``[b, h, m, n_compressed]``."""
        raise NotImplementedError

    def compressed_output(self, probs: torch.Tensor) -> torch.Tensor:
        """float32 ``[b, h, m, n_compressed]`` -> float32 ``[b, h, m, d]``: probabilities times the stored values."""
        raise NotImplementedError

    def compressed_state(self) -> dict[str, torch.Tensor]:
        """Every tensor of the compressed state, batch first. Per-token tensors have tokens on dim 2."""
        raise NotImplementedError

    def set_compressed_state(self, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def crop_compressed(self, n_keep: int) -> None:
        raise NotImplementedError

    def reset_compressed(self) -> None:
        raise NotImplementedError

    # --- bookkeeping -----------------------------------------------------------------------------------------------
    def _clear(self):
        self.sink_keys = self.sink_values = self.buffer_keys = self.buffer_values = None
        self.n_compressed = 0
        self.started = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.batch_size, self.num_heads, _, self.head_dim = key_states.shape
        empty = key_states[:, :, :0]
        self.sink_keys, self.sink_values = empty, value_states[:, :, :0]
        self.buffer_keys, self.buffer_values = empty, value_states[:, :, :0]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        had_history = self.get_seq_length() > 0
        keys, values = key_states, value_states
        room = self.sink_tokens - self.sink_keys.shape[-2]
        if room > 0:
            self.sink_keys = torch.cat([self.sink_keys, keys[:, :, :room]], dim=-2)
            self.sink_values = torch.cat([self.sink_values, values[:, :, :room]], dim=-2)
            keys, values = keys[:, :, room:], values[:, :, room:]
        if keys.shape[-2] and not self.started:
            self.start(keys, values)
            self.started = True
        if self.buffer_keys.shape[-2]:
            self.buffer_keys = torch.cat([self.buffer_keys, keys], dim=-2)
            self.buffer_values = torch.cat([self.buffer_values, values], dim=-2)
        else:  # the prompt: held as given, no copy (nothing writes into the buffer; `flush` clones what it keeps)
            self.buffer_keys, self.buffer_values = keys, values
        if self.buffer_keys.shape[-2] >= self.buffer_size:
            self.flush()
        if not had_history:
            return key_states, value_states
        tagged_keys = key_states.view_as(key_states)
        setattr(tagged_keys, LAYER_ATTRIBUTE, self)
        return tagged_keys, value_states

    def flush(self) -> None:
        """Compresses the oldest buffered tokens but ``buffer_keep``, as many as leave the compressed count a multiple
        of the group."""
        n = flushed_tokens(self.n_compressed, self.buffer_keys.shape[-2], self.buffer_keep, self.group_size)
        if not n:
            return
        self.compress(self.buffer_keys[:, :, :n], self.buffer_values[:, :, :n])
        self.n_compressed += n
        self.buffer_keys = self.buffer_keys[:, :, n:].clone()
        self.buffer_values = self.buffer_values[:, :, n:].clone()

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        return self.sink_keys.shape[-2] + self.n_compressed + self.buffer_keys.shape[-2]

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        # Older transformers releases pass the cache positions instead of the query length.
        if isinstance(query_length, torch.Tensor):
            query_length = query_length.shape[0]
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self._clear()
        self.reset_compressed()
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        """Drops the newest tokens: ``crop(-n)`` removes ``n``; ``crop(n)`` with ``n >= 0`` keeps the first ``n``."""
        length = self.get_seq_length()
        keep = length + tokens_to_remove if tokens_to_remove < 0 else min(tokens_to_remove, length)
        keep = max(keep, 0)
        if keep >= length:
            return
        sinks = self.sink_keys.shape[-2]
        if keep <= sinks:
            self.sink_keys, self.sink_values = self.sink_keys[:, :, :keep], self.sink_values[:, :, :keep]
            self.buffer_keys, self.buffer_values = self.buffer_keys[:, :, :0], self.buffer_values[:, :, :0]
            self.reset_compressed()
            self.n_compressed, self.started = 0, False
        elif keep <= sinks + self.n_compressed:
            self.buffer_keys, self.buffer_values = self.buffer_keys[:, :, :0], self.buffer_values[:, :, :0]
            self.crop_compressed(keep - sinks)
            self.n_compressed = keep - sinks
        else:
            kept_buffer = keep - sinks - self.n_compressed
            self.buffer_keys = self.buffer_keys[:, :, :kept_buffer]
            self.buffer_values = self.buffer_values[:, :, :kept_buffer]

    def _map_batch(self, fn) -> None:
        if not self.is_initialized:
            return
        self.sink_keys, self.sink_values = fn(self.sink_keys), fn(self.sink_values)
        self.buffer_keys, self.buffer_values = fn(self.buffer_keys), fn(self.buffer_values)
        self.set_compressed_state({name: fn(t) for name, t in self.compressed_state().items()})
        self.batch_size = self.sink_keys.shape[0]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices.to(t.device)])

    def offload(self):
        self._map_batch(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self):
        if self.is_initialized and self.sink_keys.device != self.device:
            self._map_batch(lambda t: t.to(self.device, non_blocking=True))

    def nbytes(self) -> int:
        """Exact bytes of every tensor this layer holds for its tokens."""
        if not self.is_initialized:
            return 0
        exact = [self.sink_keys, self.sink_values, self.buffer_keys, self.buffer_values]
        return tensors_nbytes(exact) + tensors_nbytes(self.compressed_state().values())

    def fp16_nbytes(self) -> int:
        """Bytes an fp16 cache would hold for the same tokens."""
        if not self.is_initialized:
            return 0
        return 2 * 2 * self.batch_size * self.num_heads * self.head_dim * self.get_seq_length()

    # --- attention -------------------------------------------------------------------------------------------------
    def attend(self, query: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
        """Attention of ``query`` ``[b, hq, q, d]`` over every token held; returns ``[b, q, hq, d]``."""
        b, hq, q_len, d = query.shape
        h = self.num_heads
        group = hq // h
        q = query.float().reshape(b, h, group * q_len, d)
        sink_k, buffer_k = self.sink_keys.float(), self.buffer_keys.float()
        scores = torch.cat([q @ sink_k.transpose(-1, -2), self.compressed_scores(q), q @ buffer_k.transpose(-1, -2)],
                           dim=-1) * scaling
        length = scores.shape[-1]
        scores = scores.reshape(b, hq, q_len, length)
        scores = apply_mask(scores, attention_mask)
        probs = torch.softmax(scores, dim=-1).reshape(b, h, group * q_len, length)
        n_sink = sink_k.shape[-2]
        n_comp = self.n_compressed
        out = probs[..., :n_sink] @ self.sink_values.float()
        out = out + self.compressed_output(probs[..., n_sink:n_sink + n_comp])
        out = out + probs[..., n_sink + n_comp:] @ self.buffer_values.float()
        return out.reshape(b, hq, q_len, d).transpose(1, 2).to(query.dtype)


def apply_mask(scores: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Applies transformers' mask (boolean keep-mask or additive float), or the causal mask when there is none."""
    q_len, length = scores.shape[-2:]
    if attention_mask is None:
        if q_len == 1:
            return scores
        positions = torch.arange(length, device=scores.device)
        query_positions = torch.arange(length - q_len, length, device=scores.device)
        return scores.masked_fill(positions[None, :] > query_positions[:, None], float("-inf"))
    mask = attention_mask[..., -length:]
    if mask.dtype == torch.bool:
        return scores.masked_fill(~mask, float("-inf"))
    return scores + mask.float()
