"""QJL key quantization with outlier channels: the reference of the key and score kernels.

Tokens come in groups of ``group_size``; per group and KV head the ``n_outliers`` channels of largest norm are the
outliers. A key ``k`` is split into ``k_in`` (outlier channels zeroed) and ``k_out`` (the rest zeroed), each stored
as sign bits of its own sketch plus its norm (or, with ``exact_outliers``, ``k_out``'s channels as fp16 numbers,
less what the inlier sketch estimates for them: below). A query is split the same way for each group, so the score
is ``est(q_in, k_in) + est(q_out, k_out)``. The inlier sketch of ``q_in`` never needs recomputing per group:
``S (q * mask) = S q - S[:, idx] q[idx]``, and only the ``n_outliers`` columns ``idx`` change.

Exact outliers are stored as residuals, ``r_c = k[c] - est(e_c, k_in)`` for each outlier channel ``c``, where
``est(e_c, k_in) = w (S^T sign(S k_in))[c]`` (``w`` the stored norm times the sketch's scale) is what the inlier
sketch estimates for channel ``c`` of ``k_in`` (truly zero). Then ``est(q_in, k_in) + q_out . k_out = est(q, k_in)
+ sum_c q[c] r_c``: the same score, with the whole query through the inlier sketch and no per-group correction at
decode time (only at quantization, where the key is at hand). The residuals take the values' fp16 bits.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .sketch import QJLSketch, unpack_signs


class QuantizedKeyBlock(NamedTuple):
    signs: torch.Tensor  # uint8 [b, h, n, m // 8]
    norms: torch.Tensor  # float16 [b, h, n]
    outlier_idx: torch.Tensor | None  # uint8 [b, h, groups, n_outliers]
    outlier_signs: torch.Tensor | None  # uint8 [b, h, n, mo // 8]
    outlier_norms: torch.Tensor | None  # float16 [b, h, n]
    outlier_residuals: torch.Tensor | None = None  # float16 [b, h, n, n_outliers], exact outliers instead of a sketch


def outlier_channels(keys: torch.Tensor, group_size: int, n_outliers: int,
                     mean: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 ``[b, h, groups, n_outliers]``: the channels of largest norm of ``keys - mean`` over each group of
    tokens (the last group may be short)."""
    b, h, n, d = keys.shape
    groups = -(-n // group_size)
    # One fp32 temporary of our own (``keys - mean`` casts to fp32 as it subtracts), squared in place.
    squares = keys.to(torch.float32, copy=True) if mean is None else keys - mean.float()
    squares.square_()
    if n % group_size:  # only a short last group needs padding; `compress` passes whole groups
        squares = torch.nn.functional.pad(squares, (0, 0, 0, groups * group_size - n))
    energy = squares.reshape(b, h, groups, group_size, d).sum(-2)
    return energy.topk(n_outliers, dim=-1).indices.sort(-1).values.to(torch.uint8)


def per_token(group_values: torch.Tensor, n: int, group_size: int, first_group_fill: int = 0) -> torch.Tensor:
    """Repeats per-group rows (dim 2) for the tokens of each group. ``first_group_fill`` tokens already sit in the
    first group, so it only has ``group_size - first_group_fill`` left."""
    positions = torch.arange(n, device=group_values.device) + first_group_fill
    return group_values[:, :, positions // group_size]


def outlier_mask(idx_per_token: torch.Tensor, head_dim: int) -> torch.Tensor:
    """bool ``[b, h, n, d]``, True on each token's outlier channels."""
    mask = torch.zeros(*idx_per_token.shape[:-1], head_dim, dtype=torch.bool, device=idx_per_token.device)
    return mask.scatter_(-1, idx_per_token.long(), True)


def quantize_keys(keys: torch.Tensor, sketch: QJLSketch, outlier_sketch: QJLSketch | None = None,
                  idx_per_token: torch.Tensor | None = None, mean: torch.Tensor | None = None) -> QuantizedKeyBlock:
    """Quantizes ``keys - mean`` (``keys`` ``[b, h, n, d]``, ``mean`` ``[b, h, 1, d]``, subtracted in fp32); with
    outliers, ``idx_per_token`` ``[b, h, n, n_outliers]`` says which channels of each token go to ``outlier_sketch``
    (or, without an outlier sketch, are kept as fp16 residuals: module docstring)."""
    if mean is not None:
        keys = keys - mean.float()
    if idx_per_token is None:
        signs, norms = sketch.quantize(keys)
        return QuantizedKeyBlock(signs, norms, None, None, None)
    mask = outlier_mask(idx_per_token, keys.shape[-1])
    keys = keys.float()
    inliers, outliers = keys.masked_fill(mask, 0), keys.masked_fill(~mask, 0)
    signs, norms = sketch.quantize(inliers)
    if outlier_sketch is None:
        return QuantizedKeyBlock(signs, norms, None, None, None,
                                 outlier_residuals(keys, signs, norms, sketch, idx_per_token))
    outlier_signs, outlier_norms = outlier_sketch.quantize(outliers)
    return QuantizedKeyBlock(signs, norms, None, outlier_signs, outlier_norms)


def outlier_residuals(keys: torch.Tensor, signs: torch.Tensor, norms: torch.Tensor, sketch: QJLSketch,
                      idx_per_token: torch.Tensor) -> torch.Tensor:
    """float16 ``[b, h, n, n_outliers]``: ``k[c] - w (S^T sign(S k_in))[c]`` at each token's outlier channels ``c``
    (module docstring), from the float32 ``keys`` and the inliers' ``signs`` and (fp16) ``norms``."""
    estimates = (unpack_signs(signs) @ sketch.matrix) * (norms.float() * sketch.scale).unsqueeze(-1)  # [b, h, n, d]
    return (keys - estimates).gather(-1, idx_per_token.long()).half()


def score_keys(query: torch.Tensor, block: QuantizedKeyBlock, sketch: QJLSketch,
               outlier_sketch: QJLSketch | None, group_size: int) -> torch.Tensor:
    """Estimated ``query @ keys^T``: ``query`` float32 ``[b, h, m, d]`` -> float32 ``[b, h, m, n]``."""
    projected = sketch.project(query)  # [b, h, m, sketch_dim]
    if block.outlier_idx is None:
        return sketch.score_projected(projected, block)
    b, h, m, d = query.shape
    n = block.signs.shape[-2]
    groups = block.outlier_idx.shape[-2]
    pad = groups * group_size - n

    def grouped(t):  # [b, h, n, ...] -> [b, h, groups, group_size, ...]
        if pad:
            t = torch.nn.functional.pad(t, (0, 0) * (t.dim() - 3) + (0, pad))
        return t.reshape(b, h, groups, group_size, *t.shape[3:])

    def ungrouped(t):  # [b, h, groups, m, group_size] -> [b, h, m, n]
        return t.permute(0, 1, 3, 2, 4).reshape(b, h, m, groups * group_size)[..., :n]

    idx = block.outlier_idx.long()  # [b, h, groups, k]
    query_outliers = torch.gather(query.unsqueeze(2).expand(b, h, groups, m, d), -1,
                                  idx.unsqueeze(-2).expand(b, h, groups, m, idx.shape[-1]))  # [b, h, g, m, k]
    if block.outlier_residuals is not None:  # the whole query through the inlier sketch, plus q[idx] . residuals
        exact = query_outliers @ grouped(block.outlier_residuals.float()).transpose(-1, -2)
        return sketch.score_projected(projected, block) + ungrouped(exact)
    inlier_projection = projected.unsqueeze(2) - query_outliers @ sketch.matrix.T[idx]  # [b, h, g, m, sketch_dim]
    outlier_projection = query_outliers @ outlier_sketch.matrix.T[idx]

    def estimate(proj, signs, norms, scale):
        s = unpack_signs(grouped(signs))  # [b, h, g, group_size, dim]
        est = proj @ s.transpose(-1, -2) * (grouped(norms.float().unsqueeze(-1)).squeeze(-1) * scale).unsqueeze(-2)
        return ungrouped(est)

    return (estimate(inlier_projection, block.signs, block.norms, sketch.scale)
            + estimate(outlier_projection, block.outlier_signs, block.outlier_norms, outlier_sketch.scale))
