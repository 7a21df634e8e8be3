import math

import pytest
import torch

from qjl import QJLSketch, dequantize_values, pack_bits, quantize_values, unpack_bits
from qjl.keys import outlier_channels, per_token, quantize_keys, score_keys
from qjl.sketch import chi_mean, sketch_matrix
from qjl.values import TOKEN_BLOCK, append_blocked, block_tokens, unblock_tokens


def test_pack_bits_round_trip():
    bits = torch.rand(3, 5, 40, generator=torch.Generator().manual_seed(0)) > 0.5
    packed = pack_bits(bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, 5)
    assert torch.equal(unpack_bits(packed), bits)
    # LSB first: channel 0 is bit 0 of byte 0.
    one = torch.zeros(8, dtype=torch.bool)
    one[0] = True
    assert pack_bits(one).item() == 1


def test_orthogonal_sketch_blocks():
    matrix = sketch_matrix(64, 160, torch.Generator().manual_seed(1))
    block = matrix[:64].double()
    gram = block @ block.T
    assert torch.allclose(gram, torch.eye(64, dtype=torch.float64) * chi_mean(64) ** 2, atol=1e-3)
    assert matrix.shape == (160, 64)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("orthogonal", [False, True])
def test_estimator_unbiased_and_variance_bounded(head_dim, orthogonal):
    """Over many independent sketches: mean error within a few standard errors of 0, variance under the bound."""
    gen = torch.Generator().manual_seed(head_dim + orthogonal)
    sketch_dim, trials = 64, 3000
    q = torch.randn(head_dim, generator=gen)
    k = torch.randn(head_dim, generator=gen) + 0.7 * q  # correlated, so <q, k> is far from 0
    exact = float(q @ k)
    estimates = torch.empty(trials, dtype=torch.float64)
    for t in range(trials):
        sketch = QJLSketch(head_dim, sketch_dim, seed=10_000 * head_dim + t, orthogonal=orthogonal)
        estimates[t] = float(sketch.score(q[None], sketch.quantize(k[None])))
    error = estimates - exact
    standard_error = error.std() / math.sqrt(trials)
    assert abs(error.mean()) < 4 * standard_error
    bound = math.pi / (2 * sketch_dim) * float(q.norm() ** 2 * k.norm() ** 2)
    assert error.var() < 1.15 * bound  # sampling tolerance of a variance over 3000 draws
    assert error.var() > 0.05 * bound  # and the estimate is really random


def test_score_broadcasts_over_batch_and_heads():
    sketch = QJLSketch(64, 128, seed=3)
    keys = torch.randn(2, 3, 10, 64)
    queries = torch.randn(2, 3, 4, 64)
    scores = sketch.score(queries, sketch.quantize(keys))
    assert scores.shape == (2, 3, 4, 10)
    exact = queries @ keys.transpose(-1, -2)
    # A 128-bit sketch correlates strongly with the exact scores.
    assert torch.corrcoef(torch.stack([scores.flatten(), exact.flatten()]))[0, 1] > 0.8


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_value_quantization_error_within_bound(bits):
    values = torch.randn(2, 3, 17, 64) * 3
    quantized = quantize_values(values, bits, 32)
    assert quantized.packed.shape == (2, 3, 17, bits * 64 // 8)
    restored = dequantize_values(quantized, bits)
    grouped = values.reshape(2, 3, 17, 2, 32)
    step = (grouped.amax(-1) - grouped.amin(-1)) / (2**bits - 1)
    # Half a step, plus the fp16 rounding of the scale and minimum.
    bound = (step / 2 * (1 + 2**bits * 1e-3) + grouped.abs().amax(-1) * 1e-3).repeat_interleave(32, -1)
    assert ((restored - values).abs().reshape(2, 3, 17, 64) <= bound.reshape(2, 3, 17, 64)).all()


def test_value_blocks_hold_each_bytes_tokens_side_by_side():
    """``QJLLayer``'s layout of the value codes: blocks of ``TOKEN_BLOCK`` tokens, byte ``c`` of token ``t`` at
    ``[t // TOKEN_BLOCK, c, t % TOKEN_BLOCK]``; appends that start in a partly filled block (a crop, or groups that
    are not a block's multiple) keep every token, and the padding of the last block is zeros."""
    packed = torch.randint(0, 256, (2, 3, 61, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    blocked = block_tokens(packed)
    assert blocked.shape == (2, 3, 4, 8, TOKEN_BLOCK)
    assert blocked[1, 2, 37 // TOKEN_BLOCK, 5, 37 % TOKEN_BLOCK] == packed[1, 2, 37, 5]
    assert not blocked[:, :, -1, :, 61 % TOKEN_BLOCK:].any()
    grown, n = None, 0
    for k in (5, 11, 16, 3, 26):
        grown, n = append_blocked(grown, n, packed[:, :, n:n + k]), n + k
        assert grown.shape[2] == -(-n // TOKEN_BLOCK)
        assert torch.equal(unblock_tokens(grown, n), packed[:, :, :n])


def test_constant_group_is_exact():
    values = torch.full((1, 1, 3, 32), 1.5)
    assert torch.equal(dequantize_values(quantize_values(values, 2, 32), 2), values)


def test_outlier_split_reconstructs_key_and_score_is_sum_of_parts():
    gen = torch.Generator().manual_seed(5)
    keys = torch.randn(1, 2, 64, 64, generator=gen)
    keys[..., 7] *= 20  # an outlier channel
    idx = outlier_channels(keys, group_size=32, n_outliers=4)
    assert idx.shape == (1, 2, 2, 4) and (idx == 7).any(-1).all()
    idx_tokens = per_token(idx, 64, 32)
    mask = torch.zeros_like(keys, dtype=torch.bool).scatter_(-1, idx_tokens.long(), True)
    inliers, outliers = keys.masked_fill(mask, 0), keys.masked_fill(~mask, 0)
    assert torch.equal(inliers + outliers, keys)
    sketch, outlier_sketch = QJLSketch(64, 128, seed=1), QJLSketch(64, 64, seed=2)
    block = quantize_keys(keys, sketch, outlier_sketch, idx_tokens)._replace(outlier_idx=idx)
    query = torch.randn(1, 2, 3, 64, generator=gen)
    q_tokens = query.unsqueeze(3).expand(1, 2, 3, 64, 64)
    token_mask = mask.unsqueeze(2)
    # The same estimate computed by splitting the query token by token.
    inlier_est = sketch.score_projected(sketch.project(q_tokens.masked_fill(token_mask, 0)).unsqueeze(-2),
                                        sketch.quantize(inliers.unsqueeze(2).unsqueeze(-2)))
    outlier_est = outlier_sketch.score_projected(
        outlier_sketch.project(q_tokens.masked_fill(~token_mask, 0)).unsqueeze(-2),
        outlier_sketch.quantize(outliers.unsqueeze(2).unsqueeze(-2)))
    expected = (inlier_est + outlier_est).reshape(1, 2, 3, 64)
    got = score_keys(query, block, sketch, outlier_sketch, group_size=32)
    assert torch.allclose(got, expected, atol=1e-4)


def test_exact_outlier_residuals_give_the_split_query_score():
    """Exact outliers are stored as residuals and the whole query goes through the inlier sketch: the score is still
    ``est(q_in, k_in) + q_out . k_out``, the query split token by token, up to the residuals' fp16 rounding."""
    gen = torch.Generator().manual_seed(9)
    keys = torch.randn(1, 2, 64, 64, generator=gen)
    keys[..., 7] *= 20
    idx = outlier_channels(keys, group_size=32, n_outliers=4)
    idx_tokens = per_token(idx, 64, 32)
    mask = torch.zeros_like(keys, dtype=torch.bool).scatter_(-1, idx_tokens.long(), True)
    sketch = QJLSketch(64, 128, seed=1)
    block = quantize_keys(keys, sketch, None, idx_tokens)._replace(outlier_idx=idx)
    assert not torch.equal(block.outlier_residuals, torch.gather(keys, -1, idx_tokens.long()).half())
    query = torch.randn(1, 2, 3, 64, generator=gen)
    q_tokens = query.unsqueeze(3).expand(1, 2, 3, 64, 64)
    token_mask = mask.unsqueeze(2)
    inlier_est = sketch.score_projected(sketch.project(q_tokens.masked_fill(token_mask, 0)).unsqueeze(-2),
                                        sketch.quantize(keys.masked_fill(mask, 0).unsqueeze(2).unsqueeze(-2)))
    exact = (q_tokens.masked_fill(~token_mask, 0) * keys.unsqueeze(2)).sum(-1)
    expected = inlier_est.reshape(1, 2, 3, 64) + exact
    got = score_keys(query, block, sketch, None, group_size=32)
    # Half an fp16 step of each residual, times the query's channel; plus fp32 rounding of scores near 100.
    q_out = torch.gather(q_tokens.abs(), -1, idx_tokens.long().unsqueeze(2).expand(1, 2, 3, 64, 4))
    bound = (q_out * block.outlier_residuals.float().abs().unsqueeze(2)).sum(-1) * 2**-11 + 1e-4
    assert ((got - expected).abs() <= bound).all()


def test_exact_outliers_are_scored_without_error():
    """With exact outlier channels, the score is the inlier sketch estimate plus the exact outlier product: with the
    inliers zeroed, the estimate is exact."""
    gen = torch.Generator().manual_seed(8)
    keys = torch.zeros(1, 1, 32, 64)
    keys[..., [3, 9, 20, 41]] = torch.randn(1, 1, 32, 4, generator=gen) * 10
    idx = outlier_channels(keys, group_size=32, n_outliers=4)
    sketch = QJLSketch(64, 64, seed=1)
    block = quantize_keys(keys, sketch, None, per_token(idx, 32, 32))._replace(outlier_idx=idx)
    assert block.outlier_signs is None and block.outlier_residuals.dtype == torch.float16
    query = torch.randn(1, 1, 3, 64, generator=gen)
    exact = query @ keys.half().float().transpose(-1, -2)
    assert torch.allclose(score_keys(query, block, sketch, None, group_size=32), exact, atol=1e-3)


def test_sketches_of_one_seed_share_one_matrix():
    # Each new cache draws its layers' sketches again; one seed gives one (cached, never written) matrix.
    a, b, other = QJLSketch(64, 128, seed=7), QJLSketch(64, 128, seed=7), QJLSketch(64, 128, seed=8)
    assert a.matrix is b.matrix
    assert not torch.equal(a.matrix, other.matrix)
    fresh = sketch_matrix(64, 128, torch.Generator().manual_seed(7))
    assert torch.equal(a.matrix, fresh)
