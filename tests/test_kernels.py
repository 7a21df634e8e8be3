"""Triton kernels against the torch reference: on a GPU when there is one, else in Triton's interpreter.

Shapes are small (the interpreter runs every program in numpy) but cover head dims 64 and 128, 1, 3 and 4 query
heads per KV head, lengths that are not multiples of any block, batch 2, fp32/fp16/bf16 inputs, and outlier channels
sketched, kept exact (``exact_outliers``) or absent.
"""

import dataclasses
import os

import numpy
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated, so before importing them
pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from kernels.common import interpreting, multiprocessors  # noqa: E402


@triton.jit
def _dynamic_loop(out_ptr, n):
    total = 0
    for i in range(0, n, 2):
        total += i
    tl.store(out_ptr, total)


def interpreter_runs_dynamic_loops() -> bool:
    """Triton 3.6's interpreter turns a loop bound into an int with ``int(array)``, which NumPy 2.4 and newer refuse
    for the 1-element arrays it holds (2.3.5 runs, 2.4.0 fails); Triton 3.7 and newer, and the GPU, are unaffected."""
    if not interpreting():
        return True
    out = torch.zeros(1, dtype=torch.int32)
    try:
        _dynamic_loop[(1,)](out, 5)
    except Exception:  # noqa: BLE001  (InterpreterError wrapping the TypeError)
        return False
    return int(out) == 6


if not interpreter_runs_dynamic_loops():
    pytest.skip(f"Triton {triton.__version__}'s interpreter cannot run kernels with NumPy {numpy.__version__}: "
                "install numpy<2.4 or Triton 3.7 or newer", allow_module_level=True)

from kernels.combine_splits import combine_splits  # noqa: E402
from kernels.decode_attention import (  # noqa: E402
    VALUE_BLOCK,
    decode_attention,
    exact_split,
    query_chunks,
    split_size,
)
from kernels.decode_project import LIMB_BASE, from_limbs, project_queries, sketch_halves, sketch_tables  # noqa: E402
from kernels.quantize_keys import quantize_keys  # noqa: E402
from kernels.quantize_values import quantize_values  # noqa: E402
from kernels.scores import compressed_scores  # noqa: E402
from qjl import backend  # noqa: E402
from qjl import keys as ref_keys  # noqa: E402
from qjl import values as ref_values  # noqa: E402
from qjl.backend import decode_arguments  # noqa: E402
from qjl.cache import QJLCache, QJLLayer  # noqa: E402
from qjl.config import QJLConfig  # noqa: E402
from qjl.runner import cache_kwarg  # noqa: E402
from qjl.sketch import QJLSketch  # noqa: E402
from tests.ptx_kernels import helpers, part_indices  # noqa: E402
from tests.ptx_model import execute, inline_asm_in_interpreter  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def sketches(d, sketch_dim, outlier_dim):
    return QJLSketch(d, sketch_dim, 1, device=DEVICE), QJLSketch(d, outlier_dim, 2, device=DEVICE)


def keys_with_outliers(b, h, n, d, dtype, k, group_size=32):
    keys = torch.randn(b, h, n, d, generator=torch.Generator().manual_seed(n + d)).to(DEVICE)
    keys[..., 3] *= 8  # a real outlier channel
    keys = keys.to(dtype)
    group_idx = ref_keys.outlier_channels(keys, group_size, k) if k else None
    return keys, group_idx, ref_keys.per_token(group_idx, n, group_size) if k else None


def assert_signs_match(ref_signs, signs, max_fraction):
    # On a GPU a projection within rounding of 0 may take the other sign; in the interpreter none does.
    mismatch = (ref_signs != signs).float().mean().item()
    assert mismatch <= max_fraction, f"{mismatch:.2%} of sign bytes differ"


def test_backend_choice_follows_qjl_backend(monkeypatch):
    cpu = torch.empty(0)
    monkeypatch.delenv("QJL_BACKEND", raising=False)
    assert not backend.use_triton(cpu)  # the CPU gets the reference unless the kernels are asked for
    monkeypatch.setenv("QJL_BACKEND", "cuda")
    with pytest.raises(ValueError, match="'cuda' is not one of torch, triton"):
        backend.use_triton(cpu)
    monkeypatch.setenv("QJL_BACKEND", "Torch")
    assert backend.name("cpu") == "torch"
    monkeypatch.setenv("QJL_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="on the CPU needs TRITON_INTERPRET=1"):
        backend.use_triton(cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.name("cpu") == "triton"
    monkeypatch.setattr(backend, "triton_available", lambda: False)
    with pytest.raises(RuntimeError, match="Triton does not import; pip install triton"):
        backend.use_triton(cpu)


@pytest.mark.parametrize("d,sketch_dim,outlier_dim,k,dtype", [
    (64, 120, 64, 4, "fp32"), (128, 256, 128, 8, "bf16"), (64, 128, 64, 0, "fp16"), (64, 120, None, 4, "bf16"),
    (128, 248, None, 5, "fp16")])
def test_quantize_keys_matches_reference(d, sketch_dim, outlier_dim, k, dtype):
    """``outlier_dim`` None: exact outliers (fp16 outlier residuals, no outlier sketch)."""
    keys, _, idx = keys_with_outliers(2, 3, 45, d, DTYPES[dtype], k)
    sketch, outlier_sketch = sketches(d, sketch_dim, outlier_dim or 8)
    outlier_sketch = outlier_sketch if k and outlier_dim else None
    ref = ref_keys.quantize_keys(keys, sketch, outlier_sketch, idx)
    assert_keys_match(ref, quantize_keys(keys, sketch.matrix, outlier_sketch.matrix if outlier_sketch else None, idx),
                      keys.float(), sketch, idx)


@pytest.mark.parametrize("group_size,first_group_fill", [(16, 0), (32, 5)])
def test_quantize_keys_residuals_of_blocks_that_straddle_groups(group_size, first_group_fill):
    """The kernel takes 32-token blocks: groups of 16, or groups shifted by a crop (the first group already holding
    5 tokens), put two sets of outlier channels in a block, whose residuals are then made per token."""
    keys = torch.randn(2, 3, 45, 64, generator=torch.Generator().manual_seed(12)).to(DEVICE)
    keys[..., 3] *= 8
    idx = ref_keys.per_token(ref_keys.outlier_channels(keys, group_size, 4), 45, group_size, first_group_fill)
    assert (idx[:, :, 0] != idx[:, :, 31]).any()
    sketch, _ = sketches(64, 120, 8)
    ref = ref_keys.quantize_keys(keys, sketch, None, idx)
    assert_keys_match(ref, quantize_keys(keys, sketch.matrix, None, idx), keys, sketch, idx)


@pytest.mark.parametrize("exact", [False, True])
def test_quantize_keys_centres_keys_read_in_place(exact):
    """As ``QJLLayer.compress`` calls it: bf16 keys, a slice of the buffer (heads further apart than the tokens
    quantized), centred by the kernel as it reads them."""
    d, k = 64, 4
    buffer = torch.randn(2, 3, 50, d, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    buffer[..., 3] *= 8
    keys = buffer.bfloat16()[:, :, :45]
    mean = buffer[:, :, :45].mean(-2, keepdim=True).bfloat16()
    idx = ref_keys.per_token(ref_keys.outlier_channels(keys, 32, k, mean), 45, 32)
    sketch, outlier_sketch = sketches(d, 120, 64)
    outlier_sketch = None if exact else outlier_sketch
    ref = ref_keys.quantize_keys(keys, sketch, outlier_sketch, idx, mean)
    assert not keys.is_contiguous()
    assert_keys_match(ref, quantize_keys(keys, sketch.matrix, outlier_sketch.matrix if outlier_sketch else None, idx,
                                         mean), keys - mean.float(), sketch, idx)


def assert_keys_match(ref, out, centred_keys, sketch, idx):
    """``out`` (the kernel's) against the reference block ``ref``; the residuals against the reference's formula on
    the kernel's own signs and norms (a sign taken the other way on a GPU moves a residual by a sketch entry)."""
    signs, norms, osigns, onorms, oresiduals = out
    tolerance = 0.0 if DEVICE.type == "cpu" else 1e-3
    assert_signs_match(ref.signs, signs, tolerance)
    torch.testing.assert_close(norms, ref.norms, rtol=1e-3, atol=1e-3)
    if ref.outlier_signs is not None:
        assert_signs_match(ref.outlier_signs, osigns, tolerance)
        torch.testing.assert_close(onorms, ref.outlier_norms, rtol=1e-3, atol=1e-3)
    else:
        assert osigns is None and onorms is None
    assert (oresiduals is None) == (ref.outlier_residuals is None)
    if oresiduals is not None:
        expected = ref_keys.outlier_residuals(centred_keys, signs, norms, sketch, idx)
        assert oresiduals.dtype == torch.float16 and oresiduals.shape == expected.shape
        # S^T sign summed in another order: at most one fp16 step (2^-10 of the number) apart, most of them none
        torch.testing.assert_close(oresiduals, expected, rtol=2 ** -10, atol=2 ** -24)
        assert (oresiduals == expected).float().mean() > 0.9


@pytest.mark.parametrize("bits,d,group,dtype", [(2, 64, 32, "fp32"), (3, 128, 128, "bf16"), (4, 64, 16, "fp16"),
                                                (8, 128, 32, "fp32"), (1, 64, 64, "fp32")])
def test_quantize_values_matches_reference(bits, d, group, dtype):
    values = torch.randn(2, 3, 37, d, generator=torch.Generator().manual_seed(bits)).to(DEVICE, DTYPES[dtype])
    values[0, 0, 5] = 1.5  # a constant token: scale 0, codes 0
    ref = ref_values.quantize_values(values, bits, group)
    packed, scales, minimums = quantize_values(values, bits, group)
    assert torch.equal(scales, ref.scales) and torch.equal(minimums, ref.minimums)
    codes, ref_codes = ref_values.unpack_codes(packed, bits), ref_values.unpack_codes(ref.packed, bits)
    # A GPU division may round a code that sits on a half-way point the other way; the interpreter matches exactly.
    assert (codes.int() - ref_codes.int()).abs().max() <= (0 if DEVICE.type == "cpu" else 1)
    assert (codes != ref_codes).float().mean() <= (0 if DEVICE.type == "cpu" else 1e-4)


def test_quantize_values_reads_a_buffer_slice_in_place():
    """The prompt's values arrive as a slice of the cache's buffer (heads apart by the whole buffer), and programs
    straddle heads (37 tokens a head, 32 a program): the same codes as the contiguous copy's and the reference's."""
    buffer = torch.randn(2, 3, 50, 64, generator=torch.Generator().manual_seed(11)).to(DEVICE, torch.bfloat16)
    values = buffer[:, :, :37]
    assert not values.is_contiguous()
    ref = ref_values.quantize_values(values.contiguous(), 2, 32)
    for got, expected in zip(quantize_values(values, 2, 32), (ref.packed, ref.scales, ref.minimums)):
        assert got.shape == expected.shape and torch.equal(got, expected)


@pytest.mark.parametrize("d,queries,k,centered,exact", [
    (64, 3, 4, True, False), (128, 4, 8, False, False), (64, 1, 0, False, False), (128, 5, 0, True, False),
    (64, 3, 4, True, True), (128, 4, 5, False, True)])
def test_scores_match_reference(d, queries, k, centered, exact):
    n, group_size = 77, 32
    keys, group_idx, idx = keys_with_outliers(2, 2, n, d, torch.float32, k, group_size)
    sketch, outlier_sketch = sketches(d, 2 * d - 8, d)
    outlier_sketch = outlier_sketch if k and not exact else None
    block = ref_keys.quantize_keys(keys, sketch, outlier_sketch, idx)._replace(outlier_idx=group_idx)
    assert (block.outlier_residuals is not None) == exact
    query = torch.randn(2, 2, queries, d, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    mean = keys.mean(-2, keepdim=True).to(torch.bfloat16) if centered else None  # stored as a bf16 model's layer does
    ref = ref_keys.score_keys(query, block, sketch, outlier_sketch, group_size)
    if centered:
        ref = ref + query @ mean.float().transpose(-1, -2)
    out = compressed_scores(query, tuple(block), sketch.matrix, outlier_sketch.matrix if outlier_sketch else None,
                            group_size, mean)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize("queries,d,sketch_dim,dtype", [(3, 64, 120, "fp32"), (4, 128, 256, "bf16"),
                                                     (1, 64, 72, "fp16"), (2, 72, 512, "bf16")])
def test_query_projection_in_bit_order(queries, d, sketch_dim, dtype):
    """``q @ S.T`` with column ``i * BP + j`` holding sketch row ``8 j + i``, as int8 limbs and a scale per row: three
    limbs for fp32 queries (~2^-24 of the row's largest), two for the others (~2^-16); the sketch's own rows split
    the same way. Each row's sum as its limbs hold it comes beside them (for the sketch, one per count of limbs)."""
    sketch = QJLSketch(d, sketch_dim, 1, device=DEVICE)
    q = torch.randn(5, queries, d, generator=torch.Generator().manual_seed(queries)).to(DEVICE, DTYPES[dtype])
    precise = dtype == "fp32"
    tables, scales, sums = project_queries(q, sketch.matrix, precise)
    m_pad, width = tables.shape[2], tables.shape[3]
    bp = width // 8
    assert tables.shape == (5, 3 if precise else 2, m_pad, width) and scales.shape == (5, m_pad)
    assert m_pad >= queries and bp >= sketch_dim // 8 and tables.abs().max() <= 127
    column = torch.arange(width)
    row = 8 * (column % bp) + column // bp
    expected = torch.zeros(5, m_pad, width, device=DEVICE)
    expected[:, :queries, row < sketch_dim] = (q.float() @ sketch.matrix.float().T)[..., row[row < sketch_dim]]
    got = from_limbs(tables.transpose(0, 1), scales)
    largest = expected.abs().amax(dim=-1, keepdim=True)
    assert ((got - expected).abs() <= largest * (2 ** -20 if precise else 2 ** -15)).all()  # with fp32 rounding
    assert not got[:, queries:].any() and not got[..., row >= sketch_dim].any()
    torch.testing.assert_close(sums, got.sum(-1), rtol=0, atol=largest.max().item() * width * 2 ** -22)
    table, limbs, limb_scales, limb_sums = sketch_tables(sketch.matrix)
    assert torch.equal(table[:, row < sketch_dim], sketch.matrix.float().T[:, row[row < sketch_dim]])
    high, low = sketch_halves(sketch.matrix)  # what the projection reads: fp16, ~2^-22 together
    assert high.dtype == low.dtype == torch.float16
    assert ((high.float() + low.float() - table).abs() <= table.abs() * 2 ** -21 + 2 ** -25).all()
    rebuilt = from_limbs(limbs, limb_scales)
    assert ((rebuilt - table).abs() <= table.abs().amax(dim=-1, keepdim=True) * 2 ** -23).all()
    for n in (1, 2, 3):  # against the table's own sums: n limbs hold each entry to half a step of the last one
        step = limb_scales.double() * float(LIMB_BASE.value) ** -(n - 1)
        bound = table.shape[1] * step / 2 + table.abs().sum(-1) * 2 ** -22
        assert ((limb_sums[n - 1] - table.double().sum(-1)).abs() <= bound).all()


def test_query_projection_launches_agree():
    """The projection's other launches (``scripts/decode_launches.py`` times them: four warps, 16 or 64 channels a
    step) give what the default gives: the same projections to fp32 rounding of sums taken in another order, which
    may round the last limb the other way (one step of it, the row's largest / (127 * 254)); the columns in blocks,
    a program each, give the very same limbs, scales and sums launch after launch (the last block to arrive makes
    them and sets the count of arrivals back to zero). Not always the default's very bits: on the H100 two blocks'
    differed from one program's at 43a6c51 (narrower products, which the compiler may lay out and sum otherwise)."""
    from scripts.decode_launches import PROJECTION_TUNINGS
    sketch = QJLSketch(128, 256, 1, device=DEVICE)
    q = torch.randn(3, 4, 128, generator=torch.Generator().manual_seed(3)).to(DEVICE, torch.bfloat16)
    expected = project_queries(q, sketch.matrix, False)
    default = from_limbs(expected[0].transpose(0, 1), expected[1])
    for tuning in PROJECTION_TUNINGS:
        tables, scales, sums = project_queries(q, sketch.matrix, False, tuning=tuning)
        if "BLOCKS" in tuning:
            for _ in range(2):
                again = project_queries(q, sketch.matrix, False, tuning=tuning)
                assert all(map(torch.equal, (tables, scales, sums), again)), tuning
        got = from_limbs(tables.transpose(0, 1), scales)
        step = default.abs().amax(dim=-1, keepdim=True) / (127 * LIMB_BASE.value)
        assert ((got - default).abs() <= step * 1.01).all(), tuning


@triton.jit
def _codes_product(codes_ptr, weights_ptr, out_ptr):
    """fp16 weights as loaded, or fp32 ones converted in the kernel as the decode kernel converts them, times the
    codes as fp16 bit patterns."""
    offs = tl.arange(0, 16)[:, None] * 16 + tl.arange(0, 16)[None, :]
    codes = tl.load(codes_ptr + offs).to(tl.float16, bitcast=True)
    tl.store(out_ptr + offs, tl.dot(tl.load(weights_ptr + offs).to(tl.float16), codes))


def test_tensor_cores_keep_fp16_subnormal_codes():
    """The fused decode kernel hands value codes to fp16 products as their bit patterns, ``code * 2^-24`` (subnormal
    below 1024, exponent field 1 up to 2047): exact only where the tensor cores keep subnormal inputs."""
    generator = torch.Generator().manual_seed(11)
    codes = torch.randint(0, 2048, (16, 16), generator=generator, dtype=torch.int16)
    codes[0] = torch.arange(16)  # the smallest codes, 0 and 1 included
    weights = torch.randn(16, 16, generator=generator).to(torch.float16)
    out = torch.empty(16, 16, dtype=torch.float32, device=DEVICE)
    _codes_product[(1,)](codes.to(DEVICE), weights.to(DEVICE), out)
    expected = weights.double() @ codes.double() * 2.0 ** -24
    bound = weights.double().abs() @ codes.double().abs() * 2.0 ** -24 * 2 ** -20
    assert ((out.cpu().double() - expected).abs() <= bound).all()


@pytest.mark.parametrize("weights_from", ["fp16", "fp32"])
def test_tensor_cores_keep_subnormal_weights_of_subnormal_codes(weights_from):
    """With bf16 or fp16 queries a token's value weight (its softmax weight times its value scale) reaches the
    products in fp16, subnormal below 2^-14, times the subnormal codes: tokens far below the maximum score count
    only where the tensor cores keep such products (both inputs subnormal, products near 2^-40). ``fp32``: the
    weights converted in the kernel, as the decode kernel converts them."""
    generator = torch.Generator().manual_seed(12)
    codes = torch.randint(1, 1024, (16, 16), generator=generator, dtype=torch.int16)
    weights = (torch.rand(16, 16, generator=generator) * 2.0 ** -14).to(torch.float16)  # subnormal fp16
    assert (weights.float().abs() < 2.0 ** -14).all() and weights.any()
    out = torch.empty(16, 16, dtype=torch.float32, device=DEVICE)
    _codes_product[(1,)](codes.to(DEVICE), weights.to(DEVICE, DTYPES[weights_from]), out)
    expected = weights.double() @ codes.double() * 2.0 ** -24
    bound = weights.double().abs() @ codes.double().abs() * 2.0 ** -24 * 2 ** -20
    assert ((out.cpu().double() - expected).abs() <= bound).all()


def filled_layer(config, b, h, d, prompt, steps, dtype, seed=0, value_scale=1.0):
    """A QJLLayer after a prompt and ``steps`` decode tokens (built with the torch reference), its values
    ``value_scale`` times standard normal."""
    generator = torch.Generator().manual_seed(seed)
    layer = QJLLayer(config, layer_idx=1)
    for n in [prompt] + [1] * steps:
        k, v = (torch.randn(b, h, n, d, generator=generator) for _ in range(2))
        layer.update(k.to(DEVICE, dtype), (v * value_scale).to(DEVICE, dtype))
    return layer


@pytest.mark.parametrize("d,group,dtype,config", [
    (64, 3, "fp32", dataclasses.replace(QJLConfig.preset("3bit", head_dim=64), sketch_dim=120, exact_outliers=True)),
    (128, 4, "bf16", QJLConfig.preset("paper", head_dim=128)),
    (64, 1, "fp16", QJLConfig(sketch_dim=72, n_outliers=0, value_bits=3, value_group_size=16, buffer_size=32)),
    (128, 3, "fp32", QJLConfig(sketch_dim=136, outlier_sketch_dim=40, n_outliers=5, group_size=16, value_bits=4,
                               value_group_size=64, buffer_size=48, sink_tokens=3, center_keys=True)),
    # Head dim 256 (bit positions one at a time, tiles of half a group, outlier rows beyond 16; with bf16 queries
    # the residuals' product of its own, its 16 rows all outlier channels)
    (256, 2, "fp32", QJLConfig.preset("3bit", head_dim=256)),
    (256, 2, "bf16", QJLConfig.preset("3bit", head_dim=256)),
    # The benchmark's path (bf16, one value scale per token) and 8-bit codes, the widest fp16 trick's input
    (128, 4, "bf16", QJLConfig.preset("3bit", head_dim=128)),
    (64, 2, "fp16", QJLConfig(sketch_dim=64, n_outliers=2, exact_outliers=True, value_bits=8, value_group_size=64,
                              buffer_size=32)),
    # Groups of more queries than a program takes (two programs of 6 per KV head)
    (128, 12, "bf16", QJLConfig.preset("3bit", head_dim=128)),
])
def test_fused_decode_matches_reference_attend(monkeypatch, d, group, dtype, config):
    b, h = 2, 2
    layer = filled_layer(config, b, h, d, prompt=235, steps=2, dtype=DTYPES[dtype])
    assert layer.n_compressed and layer.n_compressed % 64  # lengths that are not block multiples
    query = torch.randn(b, h * group, 1, d, generator=torch.Generator().manual_seed(3)).to(DEVICE, DTYPES[dtype])
    monkeypatch.setenv("QJL_BACKEND", "torch")
    ref = layer.attend(query, None, d ** -0.5)
    monkeypatch.setenv("QJL_BACKEND", "triton")
    out = layer.attend(query, None, d ** -0.5)
    assert out.shape == ref.shape == (b, 1, h * group, d) and out.dtype == query.dtype
    atol = {"fp32": 1e-5, "fp16": 2e-3, "bf16": 1e-2}[dtype]
    torch.testing.assert_close(out, ref, rtol=atol, atol=atol)


@pytest.mark.parametrize("value_bits,value_group_size,group_size,refill", [(2, 64, 24, 50), (3, 32, 24, 50),
                                                                         (2, 64, 32, 0)])
def test_fused_decode_reads_value_blocks_a_crop_left_partly_filled(monkeypatch, value_bits, value_group_size,
                                                                   group_size, refill):
    """The value codes in blocks of 16 tokens (``qjl.values.block_tokens``) where tokens are not whole blocks: a crop
    into the compressed tokens (37 kept), then with groups of 24 tokens a flush appended to that partly filled block
    (72 tokens then, four blocks and a half) and tiles that start inside a block (the kernel's general address of the
    codes), or with groups of 32 tiles of whole blocks but the last (``WHOLE_BLOCKS``). Paired planes (2 bits, one
    scale a token) and three planes in groups of 32 channels. Codes in the old per-token layout are refused with a
    message."""
    assert VALUE_BLOCK == ref_values.TOKEN_BLOCK
    config = QJLConfig(sketch_dim=64, n_outliers=2, exact_outliers=True, group_size=group_size, value_bits=value_bits,
                       value_group_size=value_group_size, buffer_size=2 * group_size)
    layer = filled_layer(config, 2, 2, 64, prompt=150, steps=0, dtype=torch.bfloat16)
    layer.crop(37)
    if refill:
        layer.update(*(torch.randn(2, 2, refill, 64, generator=torch.Generator().manual_seed(9)).to(
            DEVICE, torch.bfloat16) for _ in range(2)))
    n = layer.n_compressed
    assert n == (72 if refill else 37) and layer.state["value_packed"].shape[2] == -(-n // VALUE_BLOCK)
    query = torch.randn(2, 4, 1, 64, generator=torch.Generator().manual_seed(3)).to(DEVICE, torch.bfloat16)
    monkeypatch.setenv("QJL_BACKEND", "torch")
    ref = layer.attend(query, None, 0.125)
    monkeypatch.setenv("QJL_BACKEND", "triton")
    torch.testing.assert_close(layer.attend(query, None, 0.125), ref, rtol=1e-2, atol=1e-2)
    arguments = list(decode_arguments(layer, query, 0.125))
    per_token = ref_values.unblock_tokens(layer.state["value_packed"], n)
    arguments[2] = (per_token, *arguments[2][1:])
    with pytest.raises(ValueError, match="blocks of 16 tokens"):
        decode_attention(*arguments)


@pytest.mark.parametrize("splits,d", [(3, 64), (133, 128), (300, 72)])
def test_combine_splits_merges_partial_softmaxes(splits, d):
    """Partial maxima (log2 units), sums and outputs of the splits merge into each row's softmax average: 133
    splits (batch 1 at eight programs a multiprocessor) take one block of 256 at 16 columns a program, 300 two, head
    dim 72 a masked column block, and empty splits (max -inf) count nothing."""
    generator = torch.Generator().manual_seed(splits)
    bh, m = 3, 4
    part_m = torch.randn(bh, splits, m, generator=generator) * 4
    part_m[:, 1] = float("-inf")  # a split that held no token
    part_l = torch.rand(bh, splits, m, generator=generator) + 0.5
    part_l[:, 1] = 0.0
    part_acc = torch.randn(bh, splits, m, d, generator=generator)
    part_acc[:, 1] = 0.0
    out = combine_splits(part_m.to(DEVICE), part_l.to(DEVICE), part_acc.to(DEVICE), torch.float32)
    weight = torch.exp2(part_m.double() - part_m.double().amax(dim=1, keepdim=True))
    expected = (weight[..., None] * part_acc.double()).sum(1) / (weight * part_l.double()).sum(1)[..., None]
    torch.testing.assert_close(out.cpu().double(), expected, rtol=1e-5, atol=1e-6)


def test_fused_decode_keeps_tokens_of_subnormal_weights(monkeypatch):
    """Values near 2^-14 (bf16 queries, the benchmark's path): each token's weight in the fp16 value products, its
    softmax weight times a value scale near 2^-13, is subnormal for most tokens, as are the codes. Losing such
    products would drop most of the output's code part; the test holds it to 2% of the output's size."""
    layer = filled_layer(QJLConfig.preset("3bit", head_dim=128), 2, 2, 128, prompt=235, steps=2, dtype=torch.bfloat16,
                         seed=4, value_scale=2.0 ** -14)
    assert (layer.state["value_scales"].float() < 2.0 ** -11).all()
    query = torch.randn(2, 8, 1, 128, generator=torch.Generator().manual_seed(5)).to(DEVICE, torch.bfloat16)
    monkeypatch.setenv("QJL_BACKEND", "torch")
    ref = layer.attend(query, None, 128 ** -0.5).float()
    monkeypatch.setenv("QJL_BACKEND", "triton")
    out = layer.attend(query, None, 128 ** -0.5).float()
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-2 * ref.abs().max().item())


@pytest.fixture
def gpu_branches():
    """The kernels' GPU branches (``ASM``, inline PTX) run: as they are on a GPU, in the interpreter with their PTX
    modelled in numpy (tests/ptx_model.py)."""
    if interpreting():
        with inline_asm_in_interpreter():
            yield
    else:
        yield


def test_ptx_model_follows_the_ptx_isa():
    """Known answers: CUB's ``PRMT`` example and a sign-replicating selector; ``lop3`` tables from ``F(0xF0, 0xCC,
    0xAA)``; shifts of 32 clear the register; two outputs of two 16-bit elements each from one input of four bytes."""
    def one(asm, constraints, *inputs):  # the one 32-bit output of one element of each input
        words = [numpy.array([x], dtype=numpy.uint32) for x in inputs]
        return execute(asm, constraints, words, [numpy.uint32], 1)[0][0]

    assert one("prmt.b32 $0, $1, $2, 0x7531;", "=r,r,r", 0x03020100, 0x07060504) == 0x07050301
    # nibbles 0 and 1: bytes 0 and 1 as they are; 8 and 9: their signs over the byte
    assert one("prmt.b32 $0, $1, 0, 0x1980;", "=r,r", 0x7F80) == 0x7F00FF80
    for table in (0xEA, 0xE4, 0x80, 0x96):
        assert one(f"lop3.b32 $0, $1, $2, $3, {table};", "=r,r,r,r", 0xF0, 0xCC, 0xAA) == table
    assert one("shl.b32 $0, $1, 32;", "=r,r", 5) == 0
    even, odd = execute("{ prmt.b32 $0, $4, 0, 0x4140; prmt.b32 $1, $4, 0, 0x4342; mov.b32 $2, $1; mov.b32 $3, "
                        "$0; }", "=r,=r,=r,=r,r", [numpy.arange(1, 5, dtype=numpy.uint8)],
                        [numpy.int16, numpy.int16], 4, seed=None)
    assert even.tolist() == [1, 2, 3, 4] and odd.tolist() == [3, 4, 1, 2]


def test_inline_ptx_gives_the_numbers_of_the_portable_branches(gpu_branches):
    """The decode kernel's helpers with inline PTX (``ASM``, a GPU's) against their portable branches (the
    interpreter's): sign bits, byte planes widened, shifted into codes and interleaved in pairs, fp16 norms as
    float32 (subnormal, zero, infinite), and the partials' row from the program ids (a grid of 3 by 5)."""
    generator = torch.Generator().manual_seed(21)
    plane0 = torch.randperm(256, generator=generator).to(torch.uint8)
    plane1 = torch.randint(0, 256, (256,), generator=generator, dtype=torch.uint8)
    half = torch.randn(256, generator=generator).to(torch.float16)
    half[:4] = torch.tensor([2.0 ** -24, -0.0, float("inf"), 6e4])
    outputs = {}
    for asm in (True, False):
        out = dict(bits=torch.empty(8, 256, dtype=torch.int8), shifted=torch.empty(15, 256, dtype=torch.int16),
                   widened=torch.empty(256, dtype=torch.int16), even=torch.empty(256, dtype=torch.int16),
                   odd=torch.empty(256, dtype=torch.int16), float=torch.empty(256, dtype=torch.float32),
                   part=torch.empty(15, dtype=torch.int32))
        out = {name: t.to(DEVICE) for name, t in out.items()}
        helpers[(1,)](plane0.to(DEVICE), plane1.to(DEVICE), half.to(DEVICE), out["bits"], out["shifted"],
                      out["widened"], out["even"], out["odd"], out["float"], ASM=asm)
        part_indices[(3, 5)](out["part"], ASM=asm)
        outputs[asm] = out
    for name, portable in outputs[False].items():
        assert torch.equal(outputs[True][name], portable), name
    assert torch.equal(outputs[False]["part"].cpu(), torch.arange(15, dtype=torch.int32))
    assert torch.equal(outputs[False]["widened"].cpu(), plane0.to(torch.int16))


@pytest.mark.parametrize("d,group,dtype,config,crop", [
    (128, 4, "bf16", QJLConfig.preset("3bit", head_dim=128), None),  # the benchmark's path: paired planes
    (128, 4, "bf16", QJLConfig.preset("paper", head_dim=128), None),  # sketched outliers, grouped value scales
    (64, 3, "fp32", QJLConfig(sketch_dim=136, outlier_sketch_dim=40, n_outliers=5, group_size=16, value_bits=4,
                              value_group_size=64, buffer_size=48, sink_tokens=3, center_keys=True), None),
    (64, 1, "fp16", QJLConfig(sketch_dim=72, n_outliers=0, value_bits=3, value_group_size=16, buffer_size=32), None),
    # a token count that is not a multiple of 16 (WHOLE_BLOCKS)
    (64, 2, "bf16", QJLConfig(sketch_dim=64, n_outliers=2, exact_outliers=True, group_size=32, value_bits=2,
                              value_group_size=64, buffer_size=64), 37),
])
def test_fused_decode_gpu_branches_give_the_same_numbers(gpu_branches, d, group, dtype, config, crop):
    """The fused decode kernel with its inline PTX (``ASM``, the PTX modelled) and without, in the interpreter: the
    same to the bit. A GPU runs the PTX itself in every decode test (each compile of this one's kernels there would
    cost a GPU slot 10 to 20 seconds of the CPU)."""
    if not interpreting():
        pytest.skip("on a GPU the decode tests run the inline PTX itself")
    layer = filled_layer(config, 2, 2, d, prompt=150, steps=1, dtype=DTYPES[dtype])
    if crop:
        layer.crop(crop)
        assert layer.n_compressed == crop
    query = torch.randn(2, 2 * group, 1, d, generator=torch.Generator().manual_seed(13)).to(DEVICE, DTYPES[dtype])
    arguments = decode_arguments(layer, query, d ** -0.5)
    assert torch.equal(decode_attention(*arguments, tuning=dict(ASM=True)),
                       decode_attention(*arguments, tuning=dict(ASM=False)))


def test_fused_decode_launch_choices_agree():
    """The sweep's launch choices (scripts/sweep_decode.py) split the tokens differently (5, 3 and 9 splits of the 288
    compressed tokens here), take the bit positions one or two at a time, load the per-token numbers a tile ahead or
    not, pipeline the tiles' copies over three stages, take the 17 buffered tokens 16 at a time (their queries padded
    to 16 rows or not), (on a Hopper GPU, where they are by default) launch the step's kernels programmatically or
    not, and project the queries in four programs a KV head, and change nothing in the result."""
    config = QJLConfig.preset("3bit", head_dim=64)
    layer = filled_layer(config, 1, 2, 64, prompt=300, steps=9, dtype=torch.float32)
    assert layer.n_compressed == 288 and layer.buffer_keys.shape[2] == 17
    query = torch.randn(1, 6, 1, 64, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    arguments = decode_arguments(layer, query, 0.125)
    default = decode_attention(*arguments)
    for tuning in (dict(programs_per_sm=1, min_tokens=64), dict(programs_per_sm=64, min_tokens=32, num_stages=1),
                   dict(UNROLL=2, num_warps=4, maxnreg=128), dict(UNROLL=1, PREFETCH=False), dict(num_stages=3),
                   dict(BLOCK_EXACT=16, maxnreg=144), dict(BLOCK_EXACT=16, EXACT_PADDED=False), dict(PDL=False),
                   dict(project_blocks=4)):
        torch.testing.assert_close(decode_attention(*arguments, tuning=tuning), default, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("d,group,dtype,config", [
    (128, 4, "bf16", QJLConfig.preset("3bit", head_dim=128)),  # the benchmark's path, exact outliers
    (128, 4, "bf16", QJLConfig.preset("paper", head_dim=128)),  # sketched outliers
    (64, 3, "fp32", QJLConfig(sketch_dim=136, outlier_sketch_dim=40, n_outliers=5, group_size=16, value_bits=4,
                              value_group_size=64, buffer_size=48, sink_tokens=3, center_keys=True)),
    (64, 1, "fp16", QJLConfig(sketch_dim=72, n_outliers=0, value_bits=3, value_group_size=16, buffer_size=32)),
])
def test_outlier_channels_a_tile_ahead_give_the_same_numbers(d, group, dtype, config):
    """``PREFETCH_CHANNELS`` (the default) loads each group's outlier channels a tile ahead (a split's last tile asks
    for none past its end) and computes as loading them at the tile does, so the step's output is the same to the bit:
    exact, sketched and no outliers, with the per-token numbers ahead or not, in splits of one tile and of several."""
    layer = filled_layer(config, 1, 2, d, prompt=170, steps=1, dtype=DTYPES[dtype])
    assert layer.n_compressed == 160
    query = torch.randn(1, 2 * group, 1, d, generator=torch.Generator().manual_seed(9)).to(DEVICE, DTYPES[dtype])
    arguments = decode_arguments(layer, query, d ** -0.5)
    # fixed splits (on a GPU the two launches' registers, so the programs a multiprocessor holds, may differ): of
    # 64 tokens and more, with the per-token numbers ahead or not, and of one tile
    for launch in (dict(programs_per_sm=1, min_tokens=64), dict(programs_per_sm=1, min_tokens=64, PREFETCH=False),
                   dict(programs_per_sm=64, min_tokens=16)):
        assert torch.equal(decode_attention(*arguments, tuning=dict(launch, PREFETCH_CHANNELS=True)),
                           decode_attention(*arguments, tuning=dict(launch, PREFETCH_CHANNELS=False)))


@pytest.mark.parametrize("d,group,dtype,config", [
    (128, 4, "bf16", QJLConfig.preset("3bit", head_dim=128)),  # the benchmark's path, exact outliers
    (128, 12, "bf16", QJLConfig.preset("3bit", head_dim=128)),  # 8 queries a program (6 and 2 zero ones)
    (64, 1, "fp16", QJLConfig(sketch_dim=72, n_outliers=0, value_bits=3, value_group_size=16, buffer_size=32)),
    (64, 3, "fp16", QJLConfig(sketch_dim=64, n_outliers=2, exact_outliers=True, value_bits=8, value_group_size=64,
                              buffer_size=32)),
])
def test_stacked_limbs_give_the_same_numbers(d, group, dtype, config):
    """``STACKED_LIMBS`` (both limbs of the queries' rows in one sign product a bit position, rows 8 on the second)
    sums the same integers as two products, so the step's output is the same to the bit, with outlier channels kept
    exact or none, 1, 3 (padded to 4), 4 and 8 queries a program; the default launch (eight programs a multiprocessor
    where outliers are exact, stacked) is close to the six programs' launch of 43a6c51, whose exact tokens take other
    tiles; fp32 queries (three limbs) are refused."""
    layer = filled_layer(config, 2, 2, d, prompt=235, steps=2, dtype=DTYPES[dtype])
    query = torch.randn(2, 2 * group, 1, d, generator=torch.Generator().manual_seed(7)).to(DEVICE, DTYPES[dtype])
    arguments = decode_arguments(layer, query, d ** -0.5)
    # the same splits whatever the programs a multiprocessor holds at each launch (on a GPU their registers differ)
    def launch(**tuning):
        return decode_attention(*arguments, tuning=dict(tuning, programs_per_sm=6))

    assert torch.equal(launch(STACKED_LIMBS=True), launch(STACKED_LIMBS=False))
    six_programs = dict(num_stages=2, maxnreg=168, BLOCK_EXACT=32, EXACT_PADDED=True, STACKED_LIMBS=False)
    atol = {"fp16": 2e-3, "bf16": 1e-2}[dtype]  # the exact tokens in other tiles, on a GPU other splits
    torch.testing.assert_close(launch(), launch(**six_programs), rtol=atol, atol=atol)
    with pytest.raises(ValueError, match="STACKED_LIMBS needs two limbs"):
        decode_attention(*decode_arguments(layer, query.float(), d ** -0.5), tuning=dict(STACKED_LIMBS=True))


def test_decode_splits_fill_one_wave():
    """The decode kernel's (batch, KV head) pairs split into one wave of the programs the multiprocessors hold (four
    each here, on the eight multiprocessors the launchers count off a GPU), never more, and no program takes fewer
    than ``min_tokens``."""
    sms, resident = multiprocessors(torch.device("cpu")), 4
    for heads, tokens in ((8, 130944), (64, 32640), (64, 100), (200, 4096), (3, 40)):
        per_split = split_size(tokens, heads, 32, resident, torch.device("cpu"))
        assert per_split % 32 == 0 and per_split >= 64
        programs = heads * triton.cdiv(tokens, per_split)
        assert programs <= max(resident * sms, heads), (heads, tokens, programs)
        assert per_split == 64 or programs > resident * sms - heads, (heads, tokens, programs)  # the wave is full


def merged_partials(monkeypatch) -> list:
    """The fused decode's merge, recorded: each call appends how many partials it merges into each output row (the
    splits' and the exact tokens' programs)."""
    import kernels.decode_attention as fused

    launched = []
    monkeypatch.setattr(fused, "combine_splits", lambda part_m, *rest, **options: launched.append(part_m.shape[1])
                        or combine_splits(part_m, *rest, **options))
    return launched


def test_fused_decode_takes_a_split_count(monkeypatch):
    """``tuning={"splits": s}`` (the sweep's way to time a split count) launches ``s`` splits a KV head, which
    change nothing in the result."""
    config = QJLConfig.preset("3bit", head_dim=64)
    layer = filled_layer(config, 1, 2, 64, prompt=300, steps=1, dtype=torch.float32)
    query = torch.randn(1, 6, 1, 64, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    arguments = decode_arguments(layer, query, 0.125)
    default = decode_attention(*arguments)
    launched = merged_partials(monkeypatch)
    for splits in (1, 3, 9):  # 288 tokens: 288, 96 and 32 a split, multiples of the tile step
        torch.testing.assert_close(decode_attention(*arguments, tuning=dict(splits=splits)), default, rtol=1e-5,
                                   atol=1e-5)
    assert launched == [2, 4, 10]  # the splits and the exact tokens' part


def test_exact_tokens_split_over_the_room_the_wave_leaves():
    """A (batch, KV head)'s sink and buffer tokens go to as many programs as the wave has room for beside the
    compressed splits (128 buffered tokens at batch 1 and 32k on the H100: four of 32), two tiles each at least, as
    small as that where the wave is full (batch 8: they wait for splits to end); a benchmark may give the tokens a
    program."""
    assert exact_split(128, 16, room=4) == (4, 32)
    assert exact_split(128, 16, room=1) == (1, 128)
    assert exact_split(128, 16, room=0) == (4, 32)
    assert exact_split(128, 16, room=-3) == (4, 32)
    assert exact_split(128, 16, room=100) == (4, 32)
    assert exact_split(128, 32, room=3) == (2, 64)
    assert exact_split(40, 16, room=3) == (2, 32)
    assert exact_split(0, 16, room=5) == (1, 32)  # one program, with nothing to do
    assert exact_split(128, 16, room=1, per_program=20) == (4, 32)
    with pytest.raises(ValueError, match="exact_tokens must be at least 1"):
        exact_split(128, 16, room=0, per_program=0)


@pytest.mark.parametrize("dtype,config,default_programs", [
    # 33 exact tokens: tiles of 32, so one program (two tiles at least); of 16 where eight programs share a
    # multiprocessor (bf16, exact outliers, paired values), so two
    ("fp32", QJLConfig(sketch_dim=64, n_outliers=0, buffer_size=64, group_size=32, sink_tokens=5), 1),
    ("bf16", dataclasses.replace(QJLConfig.preset("3bit", head_dim=64), sink_tokens=5), 2),
])
def test_fused_decode_takes_the_exact_tokens_in_several_programs(monkeypatch, dtype, config, default_programs):
    """The sink and buffer tokens in one program or several (``exact_tokens`` a program) give the same output, and
    the reference's, wherever a program's tokens start and end: in the sink, across its end into the buffer, inside
    the buffer, at its last token. By default, where the wave has room (the interpreter's has), as many programs as
    take two tiles each."""
    layer = filled_layer(config, 2, 2, 64, prompt=190, steps=3, dtype=DTYPES[dtype])
    n_exact = layer.sink_keys.shape[2] + layer.buffer_keys.shape[2]
    assert layer.sink_keys.shape[2] == 5 and n_exact == 33 and layer.n_compressed
    query = torch.randn(2, 6, 1, 64, generator=torch.Generator().manual_seed(8)).to(DEVICE, DTYPES[dtype])
    arguments = decode_arguments(layer, query, 0.125)
    launched = merged_partials(monkeypatch)
    one = decode_attention(*arguments, tuning=dict(BLOCK_EXACT=16, exact_tokens=1024))
    atol = {"fp32": 1e-5, "bf16": 1e-2}[dtype]
    monkeypatch.setenv("QJL_BACKEND", "torch")
    torch.testing.assert_close(one, layer.attend(query, None, 0.125), rtol=atol, atol=atol)
    # the partials merged in another order: fp32 sums round alike to 1e-5; a bf16 output may round a step apart
    for tokens in (16, 32):
        torch.testing.assert_close(decode_attention(*arguments, tuning=dict(BLOCK_EXACT=16, exact_tokens=tokens)),
                                   one, rtol=atol, atol=atol)
    torch.testing.assert_close(decode_attention(*arguments), one, rtol=atol, atol=atol)
    compressed = launched[0] - 1
    assert launched[1:3] == [compressed + triton.cdiv(n_exact, 16), compressed + triton.cdiv(n_exact, 32)]
    assert launched[3] == compressed + default_programs


def test_fused_decode_counts_the_programs_of_the_kernel_it_launches(monkeypatch):
    """On a GPU the launcher counts the programs a multiprocessor holds from a warm-up compile of the split kernel
    (``resident``), which the launch then reuses. Triton compiles a launch apart where an integer argument
    specializes otherwise (a 1 into the kernel, a multiple of 16 as one), so every integer the kernel specializes on
    must specialize in the warm-up as in the launch, but for those the kernel is not specialized on
    (``do_not_specialize``: ``exact_programs``)."""
    import kernels.decode_attention as fused
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    kernel = fused.decode_split_kernel  # the interpreter keeps the decorator's arguments apart
    names = kernel.arg_names
    unspecialized = set((kernel.kwargs["do_not_specialize"] if interpreting() else kernel.do_not_specialize)
                        or ())
    assert unspecialized == {"exact_programs"}  # the warm-up's 1 program and a launch's several: one kernel
    calls = {}

    class Launched(Exception):
        pass

    class SplitKernel:
        def warmup(self, *args, grid, **config):
            calls["warmup"] = args

        def __getitem__(self, grid):
            def launch(*args, **config):
                calls["launch"] = args
                raise Launched

            return launch

    monkeypatch.setattr(fused, "decode_split_kernel", SplitKernel())
    monkeypatch.setattr(fused, "interpreting", lambda: False)
    monkeypatch.setattr(fused, "resident", lambda config, dtype, device, compile_kernel: compile_kernel() or 8)
    layer = filled_layer(QJLConfig.preset("3bit", head_dim=64), 2, 2, 64, prompt=190, steps=3, dtype=torch.bfloat16)
    query = torch.randn(2, 6, 1, 64, generator=torch.Generator().manual_seed(8)).to(DEVICE, torch.bfloat16)
    with pytest.raises(Launched):
        decode_attention(*decode_arguments(layer, query, 0.125))

    def specialized(args):
        return {name: native_specialize_impl(BaseBackend, arg, False, True, True) for name, arg in zip(names, args)
                if type(arg) is int and name not in unspecialized}

    assert specialized(calls["warmup"]) == specialized(calls["launch"])
    assert {"exact_per_program", "tokens_per_split", "n_tokens"} <= specialized(calls["launch"]).keys()


def test_query_chunks_keep_rows_below_the_value_columns():
    """A KV head's queries split into the fewest equal chunks of fewer rows (padded to a power of two) than the value
    products' columns: 16 at head dims 64 and 128, 32 at 256."""
    for group, columns, chunks in ((1, 16, 1), (3, 16, 1), (4, 16, 1), (8, 16, 1), (12, 16, 2), (16, 16, 2),
                                   (11, 16, 11), (16, 32, 1), (24, 32, 2)):
        assert query_chunks(group, columns) == chunks, (group, columns)
        assert triton.next_power_of_2(group // chunks) < columns


def test_fused_decode_with_empty_buffer_and_no_compressed_tokens():
    config = QJLConfig(sketch_dim=64, n_outliers=0, buffer_size=32, group_size=32)
    layer = filled_layer(config, 1, 1, 64, prompt=31, steps=1, dtype=torch.float32)  # flush: buffer now empty
    assert layer.buffer_keys.shape[2] == 0 and layer.n_compressed == 32
    query = torch.randn(1, 1, 1, 64, device=DEVICE)
    probs_ref = layer.attend(query, None, 0.125)
    out = decode_attention(*decode_arguments(layer, query, 0.125))
    torch.testing.assert_close(out, probs_ref, rtol=1e-5, atol=1e-5)


@pytest.fixture
def one_cpu_thread():
    """torch on one CPU thread for the test. The two runs of a model compared below must see the same keys: with
    two threads, the rotary embedding's cos of positions 100 to 199 (the second half) was seen 1.5e-4 off (where fp32
    holds it to 7e-6) in the first forward of a process run after the bf16 fused-decode test, and not in the second:
    keys crossed sign boundaries and the logits moved by 5e-4, in about half of such runs here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_whole_model_decoding_through_kernels_matches_torch(monkeypatch, tiny_llama, one_cpu_thread):
    model = tiny_llama.to(DEVICE)
    # 200 tokens: past the preset's 128-token buffer, so decoding reads compressed tokens.
    ids = torch.randint(0, 256, (2, 200), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    # Exact outliers (with centred keys and sinks) from compression to the fused decode; sketched ones are above.
    config = dataclasses.replace(QJLConfig.preset("3bit", head_dim=64), exact_outliers=True)

    def decode(backend):
        monkeypatch.setenv("QJL_BACKEND", backend)
        cache = QJLCache(model, config)
        passed = {cache_kwarg(model): cache}  # forward's past_key_values goes at transformers 5.40
        with torch.no_grad():
            out = model(ids, use_cache=True, **passed)
            logits, token = [], out.logits[:, -1:].argmax(-1)
            for _ in range(4):
                out = model(token, use_cache=True, **passed)
                logits.append(out.logits[:, -1])
                token = out.logits[:, -1:].argmax(-1)
        return torch.stack(logits, 1), cache

    import kernels.decode_attention as fused

    calls = []
    monkeypatch.setattr(fused, "decode_attention", lambda *args: calls.append(1) or kernel(*args))
    kernel = decode_attention
    ref, ref_cache = decode("torch")
    assert not calls
    out, cache = decode("triton")
    assert len(calls) == 4 * len(cache.layers)  # every decode step of every layer took the fused kernel
    assert cache.nbytes() == ref_cache.nbytes()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(out.argmax(-1), ref.argmax(-1))


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU scripts/gpu-check.sh runs the sweep itself")
def test_sweep_times_every_launch_in_turning_rounds_at_both_decode_states(tmp_path, monkeypatch):
    """``scripts/sweep_decode.py`` end to end (a 140-token prompt, batch 1) with its CUDA-graph timer replaced by one
    that records the launch each timed call makes: every launch timed once a round, round ``r`` from launch ``r`` on
    (a timer's lambdas bound late would all make the last launch); the full-buffer state holds the buffer one short of
    a flush; every launch's numbers are the default's; the JSON holds both states with their medians. A kernel put
    beside the current one from before the value codes' blocks (a stand-in here) gets them a row per token and is timed
    in the prompt's state."""
    import json

    import profiling.cmd_bench_kernels as bench
    import scripts.sweep_decode as sweep

    launched, timing = [], []
    kernel = sweep.decode_attention

    def recorded(*args, tuning=None):
        if timing:
            launched.append(tuning or {})
            return None
        return kernel(*args, tuning=tuning)

    def timer(calls, rep=100):
        timing.append(True)
        for call in calls:
            call()
        timing.clear()
        return float(len(launched))  # the calls made so far: each launch's time says when it was timed

    def one_copy(make, nbytes, device, first=None):
        return [first if first is not None else make()]

    def earlier_kernel(*args):
        if timing:
            launched.append(dict(baseline="0000000"))
            return None
        packed, *numbers = args[2]
        assert packed.shape[2] == args[1][0].shape[2]  # a row per token
        return kernel(*args[:2], (ref_values.block_tokens(packed), *numbers), *args[3:])

    monkeypatch.setattr(sweep, "baseline_kernels", lambda: [("0000000", earlier_kernel, sweep.per_token_values)])
    monkeypatch.setattr(sweep, "decode_attention", recorded)
    monkeypatch.setattr(sweep, "graph_ms", timer)
    monkeypatch.setattr(bench, "graph_ms", lambda calls, rep=100: 1.0)  # SDPA
    monkeypatch.setattr(bench, "cold_inputs", one_copy)
    out = tmp_path / "sweep.json"
    sweep.main([str(out), "--device", "cpu", "--contexts", "140", "--batches", "1"])

    fewer = dict(splits=sweep.INTERPRETER_PROGRAMS_PER_SM * multiprocessors(torch.device("cpu")) // bench.KV_HEADS - 1)
    prompt_launches = [{}] + sweep.TUNINGS + [fewer, dict(baseline="0000000")]
    full_launches = [{}] + sweep.FULL_BUFFER_TUNINGS + [fewer]
    expected = [launches[(r + i) % len(launches)] for launches in (prompt_launches, full_launches)
                for r in range(sweep.ROUNDS) for i in range(len(launches))]
    assert launched == expected
    result = json.loads(out.read_text())
    assert result["baselines"] == ["0000000"]
    row = result["rows"][0]
    config = QJLConfig.preset("3bit", head_dim=128)
    assert row["bytes"]["exact_tokens"] == 12  # 140 = 4 sink + 128 compressed + 8 buffered
    assert row["full_buffer"]["bytes"]["exact_tokens"] == config.sink_tokens + config.buffer_size - 1
    for state, launches, calls_before in ((row, prompt_launches, 0),
                                          (row["full_buffer"], full_launches, len(prompt_launches) * sweep.ROUNDS)):
        n = len(launches)
        # the medians are round 1's times: call 2n of the state for the default (round 1's last), n + i for launch i
        assert state["default_ms"] == calls_before + 2 * n
        assert [t["ms"] for t in state["tunings"] + state["baselines"]] == [calls_before + n + i for i in range(1, n)]
        assert all(t["max_diff"] < 1e-2 for t in state["tunings"]), state["tunings"]
    assert [(b["commit"], b["max_diff"]) for b in row["baselines"]] == [("0000000", 0.0)]
    assert row["full_buffer"]["baselines"] == []


class Recorded:
    """Stands in for a ``@triton.jit`` kernel: a launch appends ``name`` to ``launched`` and runs nothing."""

    def __init__(self, name, launched):
        self.name, self.launched = name, launched

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launched.append(self.name)


class TorchOps(TorchDispatchMode):
    """Records every aten op torch is asked for while it is active."""

    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func))
        return func(*args, **(kwargs or {}))


# What a decode step may ask of torch besides its kernels: allocations and views, none of which runs on the device.
HOST_ONLY_OPS = {"aten.empty.memory_format", "aten.new_empty.default", "aten.empty_like.default", "aten.view.default",
                 "aten._unsafe_view.default", "aten.alias.default", "aten.detach.default", "aten.select.int",
                 "aten.slice.Tensor", "aten.as_strided.default", "aten.expand.default", "aten.view.dtype"}


@pytest.mark.parametrize("d,group", [(128, 4), (64, 3)])
def test_fused_decode_step_launches_its_three_kernels_and_nothing_else(monkeypatch, d, group):
    """At the benchmark's shapes (Llama-3.1-8B: 4 queries a KV head) and the embedded model's (SmolLM2: 3, taken as 4
    in the products), bf16, the 3bit preset's centred keys, one decode step is the projection, the splits and the
    merge: torch is asked for allocations and views only. A conversion of the keys' mean to float32 on the host was
    a fourth kernel each step, between the projection and the splits (and the kernel that the splits' programmatic
    launch waited on); at 3 queries a KV head, padding them to 4 and taking the real rows of the output were two
    more."""
    import kernels.combine_splits as merge_module
    import kernels.decode_attention as split_module
    import kernels.decode_project as project_module

    launched = []
    monkeypatch.setattr(project_module, "project_kernel", Recorded("projection", launched))
    monkeypatch.setattr(split_module, "decode_split_kernel", Recorded("splits", launched))
    monkeypatch.setattr(merge_module, "combine_splits_kernel", Recorded("merge", launched))
    # off the interpreter the launcher asks the driver how many programs fit, from the compiled kernel: not a launch
    monkeypatch.setattr(split_module, "resident", lambda *args: 8)

    layer = filled_layer(QJLConfig.preset("3bit", head_dim=d), 1, 2, d, prompt=300, steps=0, dtype=torch.bfloat16)
    query = torch.randn(1, 2 * group, 1, d, generator=torch.Generator().manual_seed(1)).to(DEVICE, torch.bfloat16)
    arguments = decode_arguments(layer, query, d ** -0.5)
    decode_attention(*arguments)  # the sketch's tables, made once per sketch, are not a step's
    launched.clear()
    with TorchOps() as mode:
        decode_attention(*arguments)
    assert launched == ["projection", "splits", "merge"]
    assert mode.ops <= HOST_ONLY_OPS, mode.ops - HOST_ONLY_OPS


def test_scores_path_launches_its_kernel_and_nothing_else(monkeypatch):
    """The scores path (several queries, or a mask) of a bf16 layer with centred keys, with the float32 queries
    ``QJLLayer.attend`` passes: one kernel, with torch asked for allocations and views only. It converted the keys'
    mean to float32 on the host, a kernel of its own, at every call."""
    import kernels.scores as scores_module

    launched = []
    monkeypatch.setattr(scores_module, "scores_kernel", Recorded("scores", launched))
    layer = filled_layer(QJLConfig.preset("3bit", head_dim=64), 1, 2, 64, prompt=300, steps=0, dtype=torch.bfloat16)
    assert layer.key_mean is not None and layer.key_mean.dtype == torch.bfloat16
    monkeypatch.setenv("QJL_BACKEND", "triton")  # the kernel under the interpreter too, as QJLLayer calls it
    query = torch.randn(1, 2, 6, 64, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with TorchOps() as mode:
        layer.compressed_scores(query)
    assert launched == ["scores"]
    assert mode.ops <= HOST_ONLY_OPS, mode.ops - HOST_ONLY_OPS
