"""Fused QJL decode attention, flash-decoding style: each program takes one (batch, KV head) and a range of compressed
tokens, scores them from the packed signs, takes their values from the packed codes, and keeps an online softmax (the
accumulators rescaled only in a tile where some query's max grows, a branch the other tiles skip); extra programs per
(batch, KV head) do the exact sink and buffer tokens, as many as the wave has room for. Partial maxima, sums and outputs
go to ``kernels.combine_splits``. A decode step reads each compressed byte once.

The bits reach the tensor cores one bit position at a time, so unpacking is a shift and a mask of the packed bytes in
the products' operand layout (no reshape):

- scores: ``<S q, sign(S k)> = sum_i P_i . sign_i`` where ``sign_i[j]`` is bit ``i`` of byte ``j`` (sketch row
  ``8 j + i``) and ``P_i`` those entries of ``S q``, as int8 limbs from ``kernels.decode_project``: the products run
  on int8 tensor cores, exact in int32, and the packed bytes are the sign operand's registers as they are, four
  bytes a register: a bit position's bits, ``b`` (0 or 1), cost a shift and a mask a register, and each row's sum
  from ``kernels.decode_project`` makes them signs, ``P_i . sign_i = 2 P_i . b_i - sum P_i``;
- outlier channels (one set per token group, so a tile is one group): exact ones add ``q[i_k] r_k``, ``r_k`` the
  stored residuals (``qjl.keys``), which already take the inlier sketch's share of channel ``i_k`` off, so the sign
  products are the queries' alone; sketched ones: the inlier sketch saw ``k`` without them, ``S (q * mask) . sign =
  S q . sign - sum_k q[i_k] u_k`` with ``u_k = S[:, i_k] . sign`` from ``S``'s columns in the same bit order, taken
  in the same product as ``S q . sign`` (more rows of one operand), and they add ``q[i_k] (S_o[:, i_k] . sign_o)``;
- values: ``code * scale + minimum``; the output columns ``8 j + i`` come from bit ``i`` of byte ``j``, so eight
  products, one per bit position, each of the planes shifted and masked by constants: the compiler then unpacks them
  in the operand's layout, from the pipeline's shared-memory copy of the planes (two planes: one ``lop3`` a product,
  from two interleavings of the planes). The planes are kept in blocks of 16 tokens, a byte's tokens side by side
  (``qjl.values.block_tokens``), so the operand's registers come from shared memory four tokens at a time
  (``ldmatrix``) and one ``prmt`` makes two of them 16-bit codes; with one group per token row ``p @ v = (p *
  scale) @ codes + p . minimum`` with the integer codes exact in fp16, else the dequantized values in fp32.

The softmax and the value products take a program's ``M`` queries, a power of two (the launcher adds zero queries;
tensor cores pad a small product themselves), not padded to 16: Triton spreads the warps of a product that feeds
another over its columns only when it has fewer rows than columns (else each warp would make all of a 16-row
product).

Reference: ``qjl.layer.CompressedLayer.attend`` with ``QJLLayer``'s scores and values, for one query token.
"""

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .combine_splits import combine_splits
from .common import (COMPILER_OPTIONS, dot3, interpreting, multiprocessors, pow2, programmatic_launch,
                     programmatic_options, resident_programs, sketch_scale)
from .decode_project import LIMB_BASE, limb_count, padded_bytes, project_queries, sketch_tables
from .scores import BLOCK_TOKENS, load_queries, query_mean

BLOCK_EXACT = 32
# Tokens a block of the value codes as ``QJLLayer`` keeps them (``qjl.values.TOKEN_BLOCK``, which ``qjl`` defines
# without importing Triton; a test keeps the two equal).
VALUE_BLOCK = 16
# The splits make one wave: as many programs as the multiprocessors hold at once (``resident_programs``, the driver's
# count for the compiled kernel). On the H100 (31602b4, two warps a program), a wave and a half (six programs per
# multiprocessor where four fit) took 15% longer at 128k tokens, batch 1. Under the interpreter, which compiles
# nothing, this many per "multiprocessor" (eight of them) exercise the splits.
INTERPRETER_PROGRAMS_PER_SM = 6
# Short contexts split down to two tiles a program, not scores' 256 tokens (which amortise a projection each of its
# programs makes; here one kernel makes it for all): at 1k tokens the H100 took 4.3x SDPA's time with 4 programs per
# KV head, each walking its 8 tiles one after another.
MIN_TILES = 2
MIN_TOKENS = MIN_TILES * BLOCK_TOKENS
LOG2E = 1.4426950408889634


@triton.jit
def _bits(packed, i, ASM: tl.constexpr):
    """int8 0 or 1, bit ``i`` of the bytes ``packed``. On a GPU (``ASM``) four bytes a register at once, a shift and a
    mask (Triton's interpreter cannot run PTX; it takes the same numbers a byte at a time)."""
    if ASM:
        return tl.inline_asm_elementwise("{ .reg .b32 t; shr.b32 t, $1, $2; and.b32 $0, t, 0x01010101; }",
                                         "=r,r,r,r,r,r", [packed, tl.full(packed.shape, i, tl.int32)], dtype=tl.int8,
                                         is_pure=True, pack=4)
    else:
        return ((packed.to(tl.int32) >> i) & 1).to(tl.int8)


@triton.jit
def _limb_product(acc, limb_rows, inside, bits, i, offs_j, BP: tl.constexpr):
    """``acc`` plus one limb's bit position ``i`` times the bits ``i``, exact in int32."""
    limb = tl.load(limb_rows[:, None] + i * BP + offs_j[None, :], mask=inside[:, None], other=0)
    return tl.dot(limb, bits, acc, out_dtype=tl.int32)


@triton.jit
def _packed_signs(signs_ptr, rows, ok, offs_j, BYTES: tl.constexpr):
    """The tile's packed signs as the sign products take them, byte ``j`` of token ``t`` at ``[j, t]`` (uint8
    ``[BP, BLOCK_N]``, zero past the ``BYTES`` bytes and for tokens not ``ok``)."""
    return tl.load(signs_ptr + rows[None, :] * BYTES + offs_j[:, None], mask=ok[None, :] & (offs_j[:, None] < BYTES),
                   other=0)


@triton.jit
def _sign_sums(signs_ptr, row_ptrs, limb_stride, row_scales, row_sums, inside, rows, ok, BYTES: tl.constexpr,
               BP: tl.constexpr, BLOCK_N: tl.constexpr, LIMBS: tl.constexpr, UNROLL: tl.constexpr, ASM: tl.constexpr,
               INT_SUM: tl.constexpr):
    """``sum_s T[r, s] sign_t[s]`` ``[R, BLOCK_N]`` for the tile's tokens (global rows ``rows``), with ``T`` in bit
    order as int8 limbs (``kernels.decode_project``): limb ``l`` of row ``r`` is ``8 BP`` int8 from pointer
    ``row_ptrs[r] + l limb_stride[r]``, its scale ``row_scales[r]``, the sum of the row as the limbs hold it
    ``row_sums[r]``; zero where not ``inside[r]``. The products take the bits, ``b``: ``T . sign = 2 T . b - sum_s
    T[r, s]``. Each limb sums apart, so the products make ``LIMBS`` chains, not one; ``INT_SUM``: two limbs are then
    summed in int32 and converted once (not with sketched outliers: there Triton 3.9 spills 8 bytes at two
    launches)."""
    offs_j = tl.arange(0, BP)
    packed = _packed_signs(signs_ptr, rows, ok, offs_j, BYTES)
    acc0 = tl.zeros((row_ptrs.shape[0], BLOCK_N), dtype=tl.int32)
    acc1 = tl.zeros((row_ptrs.shape[0], BLOCK_N), dtype=tl.int32)
    acc2 = tl.zeros((row_ptrs.shape[0], BLOCK_N), dtype=tl.int32)
    for i in tl.range(0, 8, loop_unroll_factor=UNROLL):
        bits = _bits(packed, i, ASM)
        acc0 = _limb_product(acc0, row_ptrs, inside, bits, i, offs_j, BP)
        acc1 = _limb_product(acc1, row_ptrs + limb_stride, inside, bits, i, offs_j, BP)
        if LIMBS == 3:
            acc2 = _limb_product(acc2, row_ptrs + 2 * limb_stride, inside, bits, i, offs_j, BP)
    if LIMBS == 2 and INT_SUM:  # |acc0| 254 + |acc1| < 2^31, and exact in fp32 below 2^24 (sketches to 512)
        total = (acc0 * LIMB_BASE + acc1).to(tl.float32)
        doubled_scales = row_scales * (2.0 / LIMB_BASE)
    else:
        total = (acc0.to(tl.float32) + acc1.to(tl.float32) * (1.0 / LIMB_BASE)
                 + acc2.to(tl.float32) * (1.0 / (LIMB_BASE * LIMB_BASE)))
        doubled_scales = row_scales * 2.0
    return total * doubled_scales[:, None] - row_sums[:, None]


@triton.jit
def _stacked_sign_sums(signs_ptr, table, row_scales, row_sums, rows, ok, M: tl.constexpr, M_PAD: tl.constexpr,
                       BYTES: tl.constexpr, BP: tl.constexpr, BLOCK_N: tl.constexpr, UNROLL: tl.constexpr,
                       ASM: tl.constexpr):
    """``_sign_sums`` of the ``M`` queries' rows (``M <= 8``) with two limbs in one product a bit position, not two:
    the product's 16 rows hold limb 0 of the queries from row 0 and limb 1 from row 8 (``table``: limb 0 of the
    program's first query), so each half takes the place of rows a product pads anyway. Rows ``r`` and ``r + 8`` of
    a tensor-core product's result are in one thread's registers, so parting them moves nothing. ``[8, BLOCK_N]``,
    rows ``M`` on zero; the same integers as two products, hence the same numbers."""
    s = tl.arange(0, 16)
    query = s % 8
    stacked = table + ((s // 8) * M_PAD + query) * (8 * BP)
    offs_j = tl.arange(0, BP)
    packed = _packed_signs(signs_ptr, rows, ok, offs_j, BYTES)
    acc = tl.zeros((16, BLOCK_N), dtype=tl.int32)
    for i in tl.range(0, 8, loop_unroll_factor=UNROLL):
        acc = _limb_product(acc, stacked, query < M, _bits(packed, i, ASM), i, offs_j, BP)
    limb0, limb1 = tl.split(tl.permute(tl.reshape(acc, (2, 8, BLOCK_N)), (1, 2, 0)))
    total = (limb0 * LIMB_BASE + limb1).to(tl.float32)  # exact, as in _sign_sums
    return total * (row_scales * (2.0 / LIMB_BASE))[:, None] - row_sums[:, None]


@triton.jit
def _first_rows(x, ROWS: tl.constexpr):
    """Rows ``0 .. ROWS - 1`` of ``x`` ``[R, N]`` (``R`` a power-of-two multiple of ``ROWS``), by halving splits:
    fewer instructions than an identity product (Triton 3.6, sm_90), and exact."""
    R: tl.constexpr = x.shape[0]
    N: tl.constexpr = x.shape[1]
    blocks = tl.permute(tl.reshape(x, (R // ROWS, ROWS, N)), (1, 2, 0))  # [ROWS, N, R // ROWS]: row b of block a
    for _ in tl.static_range(R // ROWS // 2):
        if blocks.shape[2] > 1:  # each split keeps the even blocks, down to block 0
            blocks, _ = tl.split(tl.reshape(blocks, (ROWS, N, blocks.shape[2] // 2, 2)))
    return tl.reshape(blocks, (ROWS, N))


@triton.jit
def _tile_rows(bh, start, end, n_tokens, STEP: tl.constexpr, BLOCK_N: tl.constexpr):
    """The ``STEP`` tokens from ``start`` (before ``end``) as global rows of the ``[BH, n]`` arrays, and which are
    real."""
    tokens = start + tl.arange(0, BLOCK_N)
    ok = (tl.arange(0, BLOCK_N) < STEP) & (tokens < end)
    return bh * n_tokens + tokens, ok


@triton.jit
def _float32(x, ASM: tl.constexpr):
    """fp16 ``x`` as float32; on a GPU (``ASM``) by PTX, which the compiler cannot move: it moves a conversion of a
    loaded value to where it is used, so a value loaded a tile ahead would be carried as fp16 pairs, and ptxas then
    keeps those on the stack at three pipeline stages, at every register cap tried from 160 to 184 (Triton 3.6,
    sm_90)."""
    if ASM:
        return tl.inline_asm_elementwise("cvt.f32.f16 $0, $1;", "=r,h", [x], dtype=tl.float32, is_pure=True, pack=1)
    else:
        return x.to(tl.float32)


@triton.jit
def _token_numbers(norms_ptr, scales_ptr, mins_ptr, rows, ok, scale, VGROUP: tl.constexpr, D: tl.constexpr,
                   ASM: tl.constexpr):
    """The tile's key weights (norms times the sketch's ``scale``) and, with one value group per token, its value
    scales and minimums (float32 ``[BLOCK_N]``; zeros for grouped scales, which ``_tile_values`` loads itself)."""
    weights = _float32(tl.load(norms_ptr + rows, mask=ok, other=0.0), ASM) * scale
    if VGROUP == D:
        scales = tl.load(scales_ptr + rows, mask=ok, other=0.0).to(tl.float32)
        minimums = tl.load(mins_ptr + rows, mask=ok, other=0.0).to(tl.float32)
    else:
        scales = tl.zeros_like(weights)
        minimums = tl.zeros_like(weights)
    return weights, scales, minimums


@triton.jit
def _outlier_channels(idx_ptr, kv, start, end, n_groups, FIRST: tl.constexpr, K: tl.constexpr,
                      R_PAD: tl.constexpr, GROUP: tl.constexpr):
    """The outlier channels of the group that holds token ``start``, on rows ``FIRST .. FIRST + K - 1``
    (``_tile_scores``; int32 ``[R_PAD]``; 0 on the other rows, and on all from the split's ``end`` on)."""
    r = tl.arange(0, R_PAD)
    if K == 0:
        return tl.zeros((R_PAD,), dtype=tl.int32)
    wanted = (r >= FIRST) & (r < FIRST + K) & (r * 0 + start < end)  # a block: the interpreter takes no scalar
    return tl.load(idx_ptr + (kv * n_groups + start // GROUP) * K + (r - FIRST), mask=wanted, other=0).to(tl.int32)


@triton.jit
def _tile_scores(tables_ptr, table_scales_ptr, table_sums_ptr, q_ptr, bh, channel, rows, ok, weight,
                 signs_ptr, osigns_ptr, onorms_ptr, oresiduals_ptr, sp_ptr, sp_scales_ptr, sp_sums_ptr,
                 spo_ptr, spo_scales_ptr, spo_sums_ptr, scale, oscale, QUERIES: tl.constexpr, M: tl.constexpr,
                 M_PAD: tl.constexpr, D: tl.constexpr, BYTES: tl.constexpr, BP: tl.constexpr, OBYTES: tl.constexpr,
                 OBP: tl.constexpr, K: tl.constexpr, R_PAD: tl.constexpr, FIRST: tl.constexpr, EXACT: tl.constexpr,
                 BLOCK_N: tl.constexpr, LIMBS: tl.constexpr, PRECISE: tl.constexpr, UNROLL: tl.constexpr,
                 ASM: tl.constexpr, STACKED: tl.constexpr):
    """Estimated scores ``[M, BLOCK_N]`` of the tile of global rows ``rows`` (real where ``ok``; within one outlier
    group, whose channels are ``channel``, on rows ``FIRST + k``, ``_outlier_channels``) whose keys' norms times
    ``scale`` are ``weight``, for the program's ``QUERIES`` queries (rows from there to ``M`` as zero queries').

    Rows ``r < M`` of the sign product ``u = T . sign`` are the queries' (``S q . sign``); with sketched outliers,
    rows ``M + k`` (``FIRST = M``) are the sketch's column ``idx_k`` (``S[:, idx_k]``, bit order) in the same
    product, and ``Y`` replaces them by each channel's correction and outlier term; ``W @ Y`` with ``W = [I |
    q[idx]]`` sums them per query. Exact outliers: ``Y``'s outlier rows are the stored residuals, zero in ``u``; with
    bf16 or fp16 queries ``q[idx] @ R`` is a product of its own onto the queries' rows of ``u`` (``FIRST = 0``: ``R``
    the residuals as stored, an exact fp16 product). ``STACKED``: the queries' rows take both limbs in one product
    (``_stacked_sign_sums``)."""
    r = tl.arange(0, R_PAD)
    table = tables_ptr + (bh * LIMBS * M_PAD + r) * (8 * BP)  # rows r < M
    table_scales = tl.load(table_scales_ptr + bh * M_PAD + r, mask=r < M, other=0.0)
    table_sums = tl.load(table_sums_ptr + bh * M_PAD + r, mask=r < M, other=0.0)
    if STACKED:
        tl.static_assert(LIMBS == 2 and M <= 8 and (K == 0 or EXACT), "stacked limbs: see stackable()")
        q8 = tl.arange(0, 8)
        u = _stacked_sign_sums(signs_ptr, tables_ptr + bh * LIMBS * M_PAD * (8 * BP),
                               tl.load(table_scales_ptr + bh * M_PAD + q8, mask=q8 < M, other=0.0),
                               tl.load(table_sums_ptr + bh * M_PAD + q8, mask=q8 < M, other=0.0), rows, ok, M, M_PAD,
                               BYTES, BP, BLOCK_N, UNROLL, ASM)  # [8, BLOCK_N]
    if K == 0 and STACKED:
        scores = _first_rows(u, M) * weight[None, :]
    elif K == 0:
        scores = _sign_sums(signs_ptr, table, M_PAD * 8 * BP, table_scales, table_sums, r < M, rows, ok, BYTES, BP,
                            BLOCK_N, LIMBS, UNROLL, ASM, True) * weight[None, :]
    else:
        # W = [I | q[idx]] needs the outlier channels after the queries' rows; q[idx] @ R alone takes them anywhere
        tl.static_assert(FIRST == M or (EXACT and not PRECISE), "launch_config's CHANNEL_ROW")
        is_outlier = (r >= FIRST) & (r < FIRST + K)
        if EXACT:  # the queries' rows alone: the residuals already hold the outlier rows' share
            if not STACKED:
                u = _sign_sums(signs_ptr, table, M_PAD * 8 * BP, table_scales, table_sums, r < M, rows, ok, BYTES,
                               BP, BLOCK_N, LIMBS, UNROLL, ASM, True)
            term = tl.load(oresiduals_ptr + rows[None, :] * K + (r - FIRST)[:, None],
                           mask=is_outlier[:, None] & ok[None, :], other=0.0)  # fp16 as stored, zero on other rows
        else:
            # The select between two bases loses their alignment; without it each row is read a byte at a time and
            # reaches the product through shared memory, a barrier per bit position.
            row_ptrs = tl.multiple_of(tl.where(is_outlier, sp_ptr + channel * (8 * BP), table), 16)
            limb_stride = tl.where(is_outlier, D * 8 * BP, M_PAD * 8 * BP)
            row_scales = tl.where(is_outlier, tl.load(sp_scales_ptr + channel, mask=is_outlier, other=0.0),
                                  table_scales)
            row_sums = tl.where(is_outlier, tl.load(sp_sums_ptr + channel, mask=is_outlier, other=0.0), table_sums)
            u = _sign_sums(signs_ptr, row_ptrs, limb_stride, row_scales, row_sums, r < M + K, rows, ok, BYTES, BP,
                           BLOCK_N, LIMBS, UNROLL, ASM, False)
            orow_ptrs = tl.where(is_outlier, spo_ptr + channel * (8 * OBP), spo_ptr)
            oscales = tl.load(spo_scales_ptr + channel, mask=is_outlier, other=0.0)
            osums = tl.load(spo_sums_ptr + channel, mask=is_outlier, other=0.0)
            oweight = tl.load(onorms_ptr + rows, mask=ok, other=0.0).to(tl.float32) * oscale
            term = _sign_sums(osigns_ptr, orow_ptrs, D * 8 * OBP, oscales, osums, is_outlier, rows, ok, OBYTES, OBP,
                              BLOCK_N, LIMBS, UNROLL, ASM, False)
            term *= oweight[None, :]
        u *= weight[None, :]
        q_rows = tl.arange(0, M)
        wanted = is_outlier[None, :] & (q_rows[:, None] < QUERIES) if QUERIES < M else is_outlier[None, :]
        w = tl.load(q_ptr + (bh * QUERIES + q_rows[:, None]) * D + channel[None, :], mask=wanted,
                    other=0.0).to(tl.float32)
        if EXACT and not PRECISE:
            scores = tl.dot(w.to(tl.float16), term, _first_rows(u, M))
        else:  # fp32 queries; and sketched outliers, which spill 8 bytes at two warps with two (Triton 3.9)
            w = tl.where(q_rows[:, None] == r[None, :], 1.0, w)
            scores = dot3(w, tl.where(is_outlier[:, None], term.to(tl.float32) - u, u))
    return scores


@triton.jit
def _plane_bits(codes, planes, SHIFT: tl.constexpr, MASK: tl.constexpr, ASM: tl.constexpr):
    """``codes | ((planes >> SHIFT) & MASK)`` (a left shift for a negative ``SHIFT``) of int16 ``[BLOCK_N, DB_PAD]``.
    On a GPU (``ASM``) two numbers a register: a shift of the whole register and one ``lop3``; what the shift moves
    from one half into the other lands above bit 8, outside the mask, so each half is its own number."""
    if ASM:
        shift: tl.constexpr = (f"shr.b32 t, $2, {SHIFT}" if SHIFT > 0 else f"shl.b32 t, $2, {-SHIFT}" if SHIFT < 0
                               else "mov.b32 t, $2")
        return tl.inline_asm_elementwise(f"{{ .reg .b32 t; {shift}; lop3.b32 $0, t, {MASK * 0x10001}, $1, 0xEA; }}",
                                         "=r,r,r", [codes, planes], dtype=tl.int16, is_pure=True, pack=2)
    elif SHIFT >= 0:
        return codes | ((planes >> SHIFT) & MASK)
    else:
        return codes | ((planes << -SHIFT) & MASK)


@triton.jit
def _widened(planes, ASM: tl.constexpr):
    """uint8 ``planes`` as int16. On a GPU (``ASM``) one ``prmt`` a register: the bytes come four tokens to a
    register from shared memory (the planes' tokens lie side by side, ``qjl.values.block_tokens``), and Triton's own
    conversion took three for each (each byte taken out, then two put together)."""
    if ASM:
        return tl.inline_asm_elementwise("{ prmt.b32 $0, $2, 0, 0x4140; prmt.b32 $1, $2, 0, 0x4342; }", "=r,=r,r",
                                         [planes], dtype=tl.int16, is_pure=True, pack=4)
    else:
        return planes.to(tl.int16)


@triton.jit
def _paired_codes(plane0, plane1, ASM: tl.constexpr):
    """Two uint8 planes as int16 ``even`` and ``odd``: ``even`` bits ``2k`` of ``plane0`` and ``2k + 1`` of ``plane1
    << 1``, ``odd`` bits ``2k`` of ``plane0 >> 1`` and ``2k + 1`` of ``plane1``, so that ``even & (3 << i)`` is the
    code of bit position ``i`` times ``2^i`` for even ``i``, and ``odd & (3 << (i - 1))`` times ``2^(i - 1)`` for odd
    ``i``. On a GPU (``ASM``) four tokens at a time, as ``_widened``: two shifts and two ``lop3`` (a shift past a
    byte lands on bits the mask takes from the other plane), then the bytes spread to 16 bits."""
    if ASM:
        return tl.inline_asm_elementwise(
            "{ .reg .b32 t, e, o; shl.b32 t, $5, 1; lop3.b32 e, $4, t, 0x55555555, 0xE4; shr.b32 t, $4, 1;"
            " lop3.b32 o, t, $5, 0x55555555, 0xE4; prmt.b32 $0, e, 0, 0x4140; prmt.b32 $1, e, 0, 0x4342;"
            " prmt.b32 $2, o, 0, 0x4140; prmt.b32 $3, o, 0, 0x4342; }",
            "=r,=r,=r,=r,r,r", [plane0, plane1], dtype=(tl.int16, tl.int16), is_pure=True, pack=4)
    else:
        low, high = plane0.to(tl.int16), plane1.to(tl.int16)
        return (low & 0x55) | ((high << 1) & 0xAA), ((low >> 1) & 0x55) | (high & 0xAA)


@triton.jit
def _value_planes(packed_ptr, first, plane, inside, tokens, D: tl.constexpr, DB_PAD: tl.constexpr,
                  BITS: tl.constexpr, BLOCK_N: tl.constexpr, TOKEN_BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
                  WHOLE_BLOCKS: tl.constexpr):
    """Bytes ``j`` of bit plane ``plane`` of the tile's tokens (uint8 ``[BLOCK_N, DB_PAD]``; zeros outside
    ``inside``), from the blocks of ``TOKEN_BLOCK`` tokens the values are kept in (``qjl.values.block_tokens``);
    ``first``: the tile's first token in the blocks' order. ``ALIGNED`` (tiles start at whole blocks, as each does
    where the tile's step is a multiple of ``TOKEN_BLOCK``): each run of a block's tokens is one copy; else the
    address divides each token's number. ``WHOLE_BLOCKS`` (``launch_specialization``: a token count that is not a
    multiple of 16) takes whole blocks up to the split's ``tokens`` from the tile's first, the padding and the next
    split's tokens included (their weights are zero): the tokens' own mask would then leave the copies' runs unknown,
    copies of single bytes, and the benchmark's launch spilled 8 bytes at its cap of 128 registers (Triton 3.6,
    sm_90 and sm_80), fp32 queries' at grouped value scales 8-24 (Triton 3.9, sm_90). Where the count is a multiple
    of 16 the tokens' own mask, which the tile's other loads share, is 6 instructions a tile cheaper (408 against 414
    at the benchmark's shapes, Triton 3.6)."""
    t = tl.arange(0, BLOCK_N)[:, None]
    j = tl.arange(0, DB_PAD)[None, :]
    column = plane * (D // 8) + j
    block_bytes: tl.constexpr = TOKEN_BLOCK * BITS * D // 8
    if ALIGNED:
        first = tl.multiple_of(first, TOKEN_BLOCK)
        offsets = first * (BITS * D // 8) + (t // TOKEN_BLOCK) * block_bytes + column * TOKEN_BLOCK + t % TOKEN_BLOCK
        if WHOLE_BLOCKS:
            inside = (t < tl.cdiv(tokens, TOKEN_BLOCK) * TOKEN_BLOCK) & (j < D // 8)
    else:
        token = first + t
        offsets = (token // TOKEN_BLOCK) * block_bytes + column * TOKEN_BLOCK + token % TOKEN_BLOCK
    return tl.load(packed_ptr + offsets, mask=inside, other=0)


@triton.jit
def _value_product(weights, values, acc, CODES: tl.constexpr, PRECISE: tl.constexpr):
    """``acc + weights @ values``; ``CODES``: the values are integers, exact in fp16. fp32 queries (``PRECISE``) with
    codes take fp32 multiplies and sums: on the H100 fp16 products of the weights' high and low parts with the codes
    left the outputs 2.8e-5 to 5.6e-5 from the reference, fp32 arithmetic 4.5e-7 to 7.2e-7
    (profiling/results/nvidia-h100/fp32-diagnosis.txt)."""
    if PRECISE and CODES:
        return acc + tl.sum(weights[:, :, None] * values[None, :, :], axis=1)
    elif PRECISE:
        return acc + dot3(weights, values)
    else:
        return tl.dot(weights.to(tl.float16), values.to(tl.float16), acc)


@triton.jit
def _values(codes, scales, minimums, CODES: tl.constexpr, PRECISE: tl.constexpr):
    """``CODES``: the int16 codes as the fp16 numbers ``code * 2^-24``, with no instruction at all (below 2048, the
    bit pattern ``n`` of an fp16 number, subnormal or with exponent field 1, is ``n * 2^-24``: tensor cores keep
    subnormal inputs times normal ones), or for fp32 queries (``PRECISE``, ``_value_product``) as fp32 integers;
    else the codes dequantized in fp32."""
    if CODES and PRECISE:
        return codes.to(tl.float32)
    elif CODES:
        return codes.to(tl.float16, bitcast=True)
    else:
        return codes.to(tl.float32) * scales + minimums


@triton.jit
def _tile_values(p, accs, packed_ptr, scales_ptr, mins_ptr, token_scales, rows, first, tokens, ok, D: tl.constexpr,
                 DB_PAD: tl.constexpr, BITS: tl.constexpr, VGROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                 STEP: tl.constexpr, TOKEN_BLOCK: tl.constexpr, WHOLE_BLOCKS: tl.constexpr, PAIRS: tl.constexpr,
                 PRECISE: tl.constexpr, ASM: tl.constexpr):
    """The eight float32 ``[M, DB_PAD]`` accumulators ``accs`` plus ``p @ values`` of the tile, one per bit
    position: in product ``i`` column ``j`` is output column ``8 j + i``, from bit ``i`` of byte ``j`` of each
    plane. With one minimum per token (``VGROUP == D``) the products leave it out, ``p @ v = (p * scale) @ codes +
    p . minimum`` (the caller sums ``p . minimum``), the codes exact in fp16; grouped scales dequantize the codes in
    fp32.

    ``PAIRS`` (two planes, one scale per token): product ``i`` takes its codes doubled ``2 (i // 2)`` times, two bits
    of one of two interleavings of the planes (``_paired_codes``), so a product's codes cost one ``lop3`` in place of a
    shift and a ``lop3`` per plane; the caller halves accumulator ``i`` as many times (``_value_columns``). ``rows``:
    the tile's tokens' rows in the per-token arrays; ``first``, ``tokens``: its first token in the blocks of the
    codes, and the split's tokens from it (``_value_planes``)."""
    acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7 = accs
    ALIGNED: tl.constexpr = STEP % TOKEN_BLOCK == 0
    j = tl.arange(0, DB_PAD)
    inside = ok[:, None] & (j[None, :] < D // 8)
    codes0 = tl.zeros((BLOCK_N, DB_PAD), dtype=tl.int16)
    codes1 = codes0
    codes2 = codes0
    codes3 = codes0
    codes4 = codes0
    codes5 = codes0
    codes6 = codes0
    codes7 = codes0
    if PAIRS:
        plane0 = _value_planes(packed_ptr, first, 0, inside, tokens, D, DB_PAD, BITS, BLOCK_N, TOKEN_BLOCK, ALIGNED,
                               WHOLE_BLOCKS)
        plane1 = _value_planes(packed_ptr, first, 1, inside, tokens, D, DB_PAD, BITS, BLOCK_N, TOKEN_BLOCK, ALIGNED,
                               WHOLE_BLOCKS)
        even, odd = _paired_codes(plane0, plane1, ASM)
        codes0 = _plane_bits(codes0, even, 0, 3, ASM)
        codes1 = _plane_bits(codes1, odd, 0, 3, ASM)
        codes2 = _plane_bits(codes2, even, 0, 3 << 2, ASM)
        codes3 = _plane_bits(codes3, odd, 0, 3 << 2, ASM)
        codes4 = _plane_bits(codes4, even, 0, 3 << 4, ASM)
        codes5 = _plane_bits(codes5, odd, 0, 3 << 4, ASM)
        codes6 = _plane_bits(codes6, even, 0, 3 << 6, ASM)
        codes7 = _plane_bits(codes7, odd, 0, 3 << 6, ASM)
    else:
        for b in tl.static_range(BITS):
            planes = _widened(_value_planes(packed_ptr, first, b, inside, tokens, D, DB_PAD, BITS, BLOCK_N,
                                            TOKEN_BLOCK, ALIGNED, WHOLE_BLOCKS), ASM)
            codes0 = _plane_bits(codes0, planes, 0 - b, 1 << b, ASM)
            codes1 = _plane_bits(codes1, planes, 1 - b, 1 << b, ASM)
            codes2 = _plane_bits(codes2, planes, 2 - b, 1 << b, ASM)
            codes3 = _plane_bits(codes3, planes, 3 - b, 1 << b, ASM)
            codes4 = _plane_bits(codes4, planes, 4 - b, 1 << b, ASM)
            codes5 = _plane_bits(codes5, planes, 5 - b, 1 << b, ASM)
            codes6 = _plane_bits(codes6, planes, 6 - b, 1 << b, ASM)
            codes7 = _plane_bits(codes7, planes, 7 - b, 1 << b, ASM)
    if VGROUP == D:  # one scale per token: the products take the codes, weighted by it
        w = p * token_scales[None, :]
        scales, minimums = None, None
    else:
        w = p
        groups = rows[:, None] * (D // VGROUP) + j[None, :] // (VGROUP // 8)
        scales = tl.load(scales_ptr + groups, mask=inside, other=0.0).to(tl.float32)
        minimums = tl.load(mins_ptr + groups, mask=inside, other=0.0).to(tl.float32)
    CODES: tl.constexpr = VGROUP == D
    return (_value_product(w, _values(codes0, scales, minimums, CODES, PRECISE), acc0, CODES, PRECISE),
            _value_product(w, _values(codes1, scales, minimums, CODES, PRECISE), acc1, CODES, PRECISE),
            _value_product(w, _values(codes2, scales, minimums, CODES, PRECISE), acc2, CODES, PRECISE),
            _value_product(w, _values(codes3, scales, minimums, CODES, PRECISE), acc3, CODES, PRECISE),
            _value_product(w, _values(codes4, scales, minimums, CODES, PRECISE), acc4, CODES, PRECISE),
            _value_product(w, _values(codes5, scales, minimums, CODES, PRECISE), acc5, CODES, PRECISE),
            _value_product(w, _values(codes6, scales, minimums, CODES, PRECISE), acc6, CODES, PRECISE),
            _value_product(w, _values(codes7, scales, minimums, CODES, PRECISE), acc7, CODES, PRECISE))


@triton.jit
def _rescaled(accs, alpha):
    """The eight accumulators times ``alpha``."""
    a0, a1, a2, a3, a4, a5, a6, a7 = accs
    return a0 * alpha, a1 * alpha, a2 * alpha, a3 * alpha, a4 * alpha, a5 * alpha, a6 * alpha, a7 * alpha


@triton.jit
def _value_columns(accs, PAIRS: tl.constexpr, SUBNORMAL_CODES: tl.constexpr):
    """The eight bit-position accumulators (``_tile_values``) as one ``[M, 8 DB_PAD]``, column ``8 j + i``:
    ``SUBNORMAL_CODES``, each times ``2^24`` (the codes were ``code * 2^-24``, ``_values``), and with ``PAIRS``
    accumulator ``i`` halved ``2 (i // 2)`` times (exact: powers of two)."""
    a0, a1, a2, a3, a4, a5, a6, a7 = accs
    unit: tl.constexpr = 2.0 ** 24 if SUBNORMAL_CODES else 1.0
    quarter: tl.constexpr = 0.25 if PAIRS else 1.0
    a0, a1, a2, a3 = a0 * unit, a1 * unit, a2 * (unit * quarter), a3 * (unit * quarter)
    a4, a5 = a4 * (unit * quarter ** 2), a5 * (unit * quarter ** 2)
    a6, a7 = a6 * (unit * quarter ** 3), a7 * (unit * quarter ** 3)
    both = tl.join(tl.join(tl.join(a0, a4), tl.join(a2, a6)),
                   tl.join(tl.join(a1, a5), tl.join(a3, a7)))  # [M, j, i // 4, i // 2 % 2, i % 2]
    return tl.reshape(both, (a0.shape[0], 8 * a0.shape[1]))


@triton.jit
def _exact_tokens(q, k_ptr, v_ptr, bh, n, first, last, qk_scale, m_i, l_i, acc, D: tl.constexpr,
                  D_PAD: tl.constexpr, BLOCK_N: tl.constexpr):
    """The online softmax state ``m_i``, ``l_i``, ``acc`` taking tokens ``first .. last - 1`` of the ``n`` that
    ``k_ptr`` and ``v_ptr`` hold for KV head ``bh``."""
    offs_d = tl.arange(0, D_PAD)
    # Two stages whatever the launch's: this loop's buffers (keys and values of 32 tokens, bf16) would otherwise set
    # the kernel's shared memory, 43 KB a program at three stages where the tile loop takes 27 KB (Triton 3.6, sm_90,
    # Llama-3.1-8B shapes), five programs a multiprocessor in place of six.
    for start in tl.range(first, last, BLOCK_N, num_stages=2):
        tokens = start + tl.arange(0, BLOCK_N)
        ok = tokens < last
        inside = ok[:, None] & (offs_d[None, :] < D)
        offsets = (bh * n + tokens[:, None]) * D + offs_d[None, :]
        k = tl.load(k_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        scores = tl.where(ok[None, :], dot3(q, tl.trans(k)) * qk_scale, float("-inf"))
        m_i, alpha, p = _softmax_step(scores, m_i)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + dot3(p, v)
    return m_i, l_i, acc


@triton.jit
def _softmax_step(scores, m_i):
    """New running max, the old terms' rescale factor and the tile's weights (``scores`` in log2 units)."""
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing seen yet
    return m_new, tl.exp2(m_i - m_safe), tl.exp2(scores - m_safe[:, None])


@triton.jit
def _part_index(bh, ASM: tl.constexpr):
    """The program's row of the partials, ``bh * num_programs(1) + program_id(1)``, read from the program ids where
    it is stored: made at the start, it lived across the tile loop, and at eight programs a multiprocessor (128
    registers) Triton 3.6 kept it on the stack where token counts are not multiples of 16 (8 bytes, sm_90). Not
    pure, so the compiler neither hoists it nor merges it with the ids read at the start. ``bh`` is unused by the
    PTX (an operand gives the result its shape)."""
    if ASM:
        return tl.inline_asm_elementwise(
            "{ .reg .b32 x, y, n; mov.u32 x, %ctaid.x; mov.u32 y, %ctaid.y; mov.u32 n, %nctaid.y; "
            "mad.lo.s32 $0, x, n, y; }", "=r,r", [bh], dtype=tl.int32, is_pure=False, pack=1)
    else:
        return bh * tl.num_programs(1) + tl.program_id(1)


@triton.jit
def _store_partial(part_m_ptr, part_l_ptr, part_acc_ptr, part, m_i, l_i, acc, M: tl.constexpr, D: tl.constexpr):
    rows = tl.arange(0, acc.shape[0])
    offs_d = tl.arange(0, acc.shape[1])
    tl.store(part_m_ptr + part * M + rows, m_i, mask=rows < M)
    tl.store(part_l_ptr + part * M + rows, l_i, mask=rows < M)
    tl.store(part_acc_ptr + (part * M + rows[:, None]) * D + offs_d[None, :], acc,
             mask=(rows[:, None] < M) & (offs_d[None, :] < D))


# Not specialized on the exact tokens' program count: one of them would compile a kernel of its own (Triton
# specializes an integer of 1), whose registers need not be those the launcher's count of programs a multiprocessor
# read (``resident``).
@triton.jit(do_not_specialize=["exact_programs"])
def decode_split_kernel(q_ptr, tables_ptr, table_scales_ptr, table_sums_ptr, sp_ptr, sp_scales_ptr, sp_sums_ptr,
                        spo_ptr, spo_scales_ptr, spo_sums_ptr,
                        mean_ptr, signs_ptr, norms_ptr, idx_ptr, osigns_ptr, onorms_ptr, oresiduals_ptr, vpacked_ptr,
                        vscales_ptr, vmins_ptr,
                        sink_k_ptr, sink_v_ptr, buf_k_ptr, buf_v_ptr, part_m_ptr, part_l_ptr, part_acc_ptr, n_tokens,
                        n_groups, tokens_per_split, n_sink, n_buffer, scale, oscale, qk_scale,
                        exact_programs, exact_per_program, QUERIES: tl.constexpr, M: tl.constexpr,
                        M_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
                        DB_PAD: tl.constexpr,
                        BYTES: tl.constexpr, BP: tl.constexpr, OBYTES: tl.constexpr, OBP: tl.constexpr,
                        K: tl.constexpr, R_PAD: tl.constexpr, CHANNEL_ROW: tl.constexpr, EXACT: tl.constexpr,
                        GROUP: tl.constexpr,
                        STEP: tl.constexpr,
                        BLOCK_N: tl.constexpr, CENTERED: tl.constexpr, BITS: tl.constexpr, VGROUP: tl.constexpr,
                        BLOCK_EXACT: tl.constexpr, PRECISE: tl.constexpr, LIMBS: tl.constexpr,
                        UNROLL: tl.constexpr, ASM: tl.constexpr, PREFETCH: tl.constexpr, CHUNKS: tl.constexpr,
                        PAIRS: tl.constexpr, TOKEN_BLOCK: tl.constexpr, EXACT_PADDED: tl.constexpr,
                        PDL: tl.constexpr = False,
                        STACKED_LIMBS: tl.constexpr = False, PREFETCH_CHANNELS: tl.constexpr = False,
                        WHOLE_BLOCKS: tl.constexpr = False):
    """Program ``(bh, split)``: ``bh`` stands for ``QUERIES`` queries (``q`` ``[BH, QUERIES, D]``), taken as ``M``
    (a power of two; zero queries past the real ones), chunk ``bh % CHUNKS`` of the group of (batch row and) KV head
    ``bh // CHUNKS``. Splits ``0 .. S-1`` take compressed tokens, splits ``S .. S + E - 1`` (``E``:
    ``exact_programs``) the exact ones, ``exact_per_program`` each, the sink's before the buffer's. Writes the
    split's max and sum (log2 units) ``[BH, S + E, M]`` and unnormalised output ``[BH, S + E, M, D]``.
    ``tables``, ``table_scales``, ``table_sums``: ``kernels.decode_project``'s limbs of the queries' projections,
    their rows' scales and sums; ``sp``, ``sp_scales``, ``sp_sums`` (``spo_*``): those of the (outlier) sketch's
    rows, ``sketch_tables`` (the sums of the first ``LIMBS`` limbs). ``PDL``: launched while the kernel before it
    (the projection, or a copy of some input the launcher made) still runs, it waits for it before it reads
    anything; and it lets the merge start at once. ``STACKED_LIMBS``: the sign products take both limbs of the
    queries' rows at once (``_stacked_sign_sums``). ``PREFETCH_CHANNELS``: each group's outlier channels load a tile
    ahead. ``WHOLE_BLOCKS``: ``launch_specialization``."""
    if PDL:
        gdc_launch_dependents()
    bh, split = tl.program_id(0), tl.program_id(1)
    kv = bh // CHUNKS
    n_splits = tl.num_programs(1) - exact_programs  # the compressed tokens' splits
    if PDL:
        gdc_wait()
    if split < n_splits:
        m_i = tl.full((M,), float("-inf"), dtype=tl.float32)
        zeros = tl.zeros((M, DB_PAD), dtype=tl.float32)
        accs = (zeros, zeros, zeros, zeros, zeros, zeros, zeros, zeros)
        # Sums over tokens stay per column until the end: summed each tile they would cross warps (a barrier each).
        weight_sums = tl.zeros((M, BLOCK_N), dtype=tl.float32)
        minimum_sums = tl.zeros((M, BLOCK_N), dtype=tl.float32)
        bias = tl.zeros((M,), dtype=tl.float32)
        if CENTERED:
            bias = query_mean(load_queries(q_ptr, bh, QUERIES, M, D, D_PAD), mean_ptr, kv, D, D_PAD) * qk_scale
        first = split * tokens_per_split
        last = tl.minimum(first + tokens_per_split, n_tokens)
        # The value codes' blocks: each KV head's tokens padded to whole blocks.
        value_first = kv * (tl.cdiv(n_tokens, TOKEN_BLOCK) * TOKEN_BLOCK)
        # With PREFETCH the next tile's key weights, value scales and minimums load while this tile is computed: the
        # pipeliner leaves these small loads in the loop, where each would wait for memory once a tile.
        if PREFETCH:
            rows, ok = _tile_rows(kv, first, last, n_tokens, STEP, BLOCK_N)
            key_weights, token_scales, token_minimums = _token_numbers(norms_ptr, vscales_ptr, vmins_ptr, rows, ok,
                                                                       scale, VGROUP, D, ASM)
        # With PREFETCH_CHANNELS the next group's outlier channels load a tile ahead too: loaded at the tile, their
        # first use waits for memory, the kernel's most sampled instruction on the H100 at e057ae0 (8.7% of the
        # split kernel's stall samples, batch 1 and 32k, ncu-source-e057ae0.csv.gz).
        if PREFETCH_CHANNELS:
            channels = _outlier_channels(idx_ptr, kv, first, last, n_groups, CHANNEL_ROW, K, R_PAD, GROUP)
        for start in range(first, last, STEP):
            rows, ok = _tile_rows(kv, start, last, n_tokens, STEP, BLOCK_N)
            if PREFETCH:
                next_rows, next_ok = _tile_rows(kv, start + STEP, last, n_tokens, STEP, BLOCK_N)
                next_weights, next_scales, next_minimums = _token_numbers(norms_ptr, vscales_ptr, vmins_ptr,
                                                                          next_rows, next_ok, scale, VGROUP, D, ASM)
            else:
                key_weights, token_scales, token_minimums = _token_numbers(norms_ptr, vscales_ptr, vmins_ptr, rows,
                                                                           ok, scale, VGROUP, D, ASM)
            if PREFETCH_CHANNELS:
                next_channels = _outlier_channels(idx_ptr, kv, start + STEP, last, n_groups, CHANNEL_ROW, K,
                                                   R_PAD, GROUP)
            else:
                channels = _outlier_channels(idx_ptr, kv, start, last, n_groups, CHANNEL_ROW, K, R_PAD, GROUP)
            scores = _tile_scores(tables_ptr, table_scales_ptr, table_sums_ptr, q_ptr, bh, channels, rows, ok,
                                  key_weights, signs_ptr, osigns_ptr, onorms_ptr, oresiduals_ptr, sp_ptr,
                                  sp_scales_ptr, sp_sums_ptr, spo_ptr, spo_scales_ptr, spo_sums_ptr, scale, oscale,
                                  QUERIES, M, M_PAD, D, BYTES, BP, OBYTES, OBP, K, R_PAD, CHANNEL_ROW, EXACT, BLOCK_N,
                                  LIMBS, PRECISE, UNROLL, ASM, STACKED_LIMBS)
            scores = tl.where(ok[None, :], scores * qk_scale + bias[:, None], float("-inf"))
            m_tile = tl.max(scores, axis=1)
            # The old terms are rescaled only when some query's max grew: rarely, once the maxima settle (every row
            # has a token each tile, so after the first the maxima are finite).
            if tl.max(m_tile - m_i, axis=0) > 0:
                m_new = tl.maximum(m_i, m_tile)
                alpha = tl.exp2(m_i - m_new)[:, None]
                accs = _rescaled(accs, alpha)
                weight_sums *= alpha
                if VGROUP == D:
                    minimum_sums *= alpha
                m_i = m_new
            p = tl.exp2(scores - m_i[:, None])
            weight_sums += p
            accs = _tile_values(p, accs, vpacked_ptr, vscales_ptr, vmins_ptr, token_scales, rows, value_first + start,
                                last - start, ok, D, DB_PAD, BITS, VGROUP, BLOCK_N, STEP, TOKEN_BLOCK, WHOLE_BLOCKS,
                                PAIRS, PRECISE, ASM)
            if VGROUP == D:
                minimum_sums += p * token_minimums[None, :]
            if PREFETCH:
                key_weights, token_scales, token_minimums = next_weights, next_scales, next_minimums
            if PREFETCH_CHANNELS:
                channels = next_channels
        l_i = tl.sum(weight_sums, axis=1)
        out = _value_columns(accs, PAIRS, VGROUP == D and not PRECISE) + tl.sum(minimum_sums, axis=1)[:, None]
        _store_partial(part_m_ptr, part_l_ptr, part_acc_ptr, _part_index(bh, ASM), m_i, l_i, out, M, D)
    else:
        # With EXACT_PADDED the exact tokens keep the queries padded to 16 rows: with M rows their loop took 20%
        # more instructions (Triton 3.6, sm_90), but they take fewer registers and less shared memory (the
        # benchmark's shapes at a cap of 128, three stages and 16 tokens a tile: no stack, not 16 bytes). A name
        # both branches set must keep one shape, hence exact_.
        ROWS: tl.constexpr = M_PAD if EXACT_PADDED else M
        q = load_queries(q_ptr, bh, QUERIES, ROWS, D, D_PAD)
        exact_m = tl.full((ROWS,), float("-inf"), dtype=tl.float32)
        exact_l = tl.zeros((ROWS,), dtype=tl.float32)
        exact_acc = tl.zeros((ROWS, D_PAD), dtype=tl.float32)
        first = (split - n_splits) * exact_per_program  # of the sink's tokens and the buffer's, in that order
        last = first + exact_per_program
        exact_m, exact_l, exact_acc = _exact_tokens(q, sink_k_ptr, sink_v_ptr, kv, n_sink, tl.minimum(first, n_sink),
                                                    tl.minimum(last, n_sink), qk_scale, exact_m, exact_l, exact_acc,
                                                    D, D_PAD, BLOCK_EXACT)
        exact_m, exact_l, exact_acc = _exact_tokens(q, buf_k_ptr, buf_v_ptr, kv, n_buffer,
                                                    tl.maximum(first - n_sink, 0),
                                                    tl.minimum(tl.maximum(last - n_sink, 0), n_buffer), qk_scale,
                                                    exact_m, exact_l, exact_acc, D, D_PAD, BLOCK_EXACT)
        _store_partial(part_m_ptr, part_l_ptr, part_acc_ptr, _part_index(bh, ASM), exact_m, exact_l, exact_acc,
                       M, D)


def stackable(config: dict) -> bool:
    """Whether a launch's sign products can take both limbs of the queries' rows in one (``STACKED_LIMBS``): two
    limbs (not fp32 queries), at most 8 queries a program, and no sketched outlier rows in the product."""
    return config["LIMBS"] == 2 and config["M"] <= 8 and (config["K"] == 0 or config["EXACT"])


def query_chunks(group: int, columns: int) -> int:
    """How many programs share a KV head's ``group`` queries: the fewest whose equal shares, padded to a power of
    two, stay below the value products' ``columns`` (so that the warps split the columns, module docstring)."""
    rows = columns // 2
    return next(c for c in range(triton.cdiv(group, rows), group + 1) if group % c == 0)


def launch_config(group: int, head_dim: int, sketch_dim: int, outlier_sketch_dim: int, n_outliers: int,
                  group_size: int, centered: bool, value_bits: int, value_group_size: int,
                  exact_outliers: bool = False, precise: bool = False, asm: bool = True) -> dict:
    """The constexprs (and warps) for ``group`` queries a KV head; also what ``kernels-compile`` checks. ``precise``:
    fp32 queries, whose products take three int8 limbs of the projections (~2^-24) and fp32 arithmetic or fp16 high
    and low parts of the weights (~2^-22); fp16 and bf16 queries take two limbs (~2^-16) and one fp16 product
    (~2^-11). ``asm``:
    the helpers' inline PTX (sign bits four bytes at a time, the value codes' bytes widened and paired, fp16 numbers
    converted, the partials' row): False under Triton's interpreter, which cannot run PTX (its tests run these
    branches with the PTX modelled in numpy, tests/ptx_model.py)."""
    step = group_size if n_outliers else BLOCK_TOKENS
    narrow = sketch_dim <= 256 and head_dim <= 128  # rows that leave registers for the choices below
    two_warps = not precise and narrow
    six_programs = two_warps and n_outliers and exact_outliers and head_dim in (64, 128)
    # Two value planes and one scale a token (``PAIRS`` below) leave the registers for eight.
    pairs = value_bits == 2 and value_group_size == head_dim
    eight_programs = six_programs and pairs
    if (head_dim >= 256 or sketch_dim >= 512) and step % 16 == 0:
        step = 16  # tiles of half a group: wide rows leave no registers for 32 tokens
    sketched = n_outliers and not exact_outliers
    obytes = outlier_sketch_dim // 8 if sketched else 2
    db_pad = pow2(head_dim // 8, 16)
    chunks = query_chunks(group, db_pad)
    # A program's products take its queries padded to a power of two, ``M``, with zero queries: the products pad them
    # anyway, and a partial count in the products took registers (3 queries at head dim 64: 218 registers and 470
    # instructions a tile, 4: 201 and 444, Triton 3.6). The kernels read the ``QUERIES`` real ones as zeros past
    # them, so that no copy pads them (nor takes the outputs' real rows from padded ones) each step.
    queries = pow2(group // chunks)
    # The outlier channels' first row in the products (``_tile_scores``): after the queries' rows where one product
    # takes both (sketched outliers, and fp32 queries' ``W = [I | q[idx]]``), row 0 where the exact residuals take a
    # product of their own (bf16 and fp16 queries). Their rows after the queries' (4 to 11 of 16 at the benchmark's
    # shapes) took 16 instructions a tile more there, 430 against 414 (Triton 3.6, sm_90; 451 against 421 on 3.9),
    # and each token's residuals two 8-byte copies in place of one of 16. SmolLM2's shapes: 444 either way on 3.6, 440
    # against 447 on 3.9. Not yet timed on a GPU.
    channel_row = 0 if exact_outliers and not precise else queries
    config = dict(CHUNKS=chunks, QUERIES=group // chunks, M=queries, M_PAD=pow2(queries, 16), D=head_dim,
                  D_PAD=pow2(head_dim, 16), DB_PAD=db_pad, BYTES=sketch_dim // 8,
                  BP=padded_bytes(sketch_dim), OBYTES=obytes, OBP=padded_bytes(8 * obytes), K=n_outliers,
                  # the rows of the products that take the outlier channels: the queries' and the channels' (from
                  # CHANNEL_ROW), or (no outliers) the scores' own M rows
                  R_PAD=pow2(max(queries, channel_row + n_outliers), 16) if n_outliers else queries,
                  CHANNEL_ROW=channel_row,
                  EXACT=bool(n_outliers and exact_outliers),
                  GROUP=group_size, STEP=step, BLOCK_N=pow2(step, 16),
                  CENTERED=centered, BITS=value_bits, VGROUP=value_group_size,
                  # Two planes and one scale per token: each value product's codes in one instruction (_tile_values).
                  PAIRS=pairs, TOKEN_BLOCK=VALUE_BLOCK,
                  # The exact tokens' loop at eight programs a multiprocessor: 16 tokens a tile and the queries at their
                  # own count of rows, not padded to 16 (fewer registers and less shared memory: the exact tokens'
                  # branch of decode_split_kernel).
                  BLOCK_EXACT=16 if eight_programs else BLOCK_EXACT, EXACT_PADDED=not eight_programs,
                  # Both limbs of the queries' rows in one sign product a bit position (_stacked_sign_sums), set below
                  # where stackable: 16 tensor-core products a tile fewer; see the register cap.
                  STACKED_LIMBS=False,
                  PRECISE=precise,
                  LIMBS=limb_count(precise), ASM=asm,
                  # How many of the eight bit positions are unrolled: all, up to sketch 256 and head dim 128 (fastest);
                  # the table loads of the unrolled positions are hoisted and held, so wider sketches unroll as many as
                  # make 128 table columns (more of them spill, and so does a loop of single positions at sketch 512).
                  UNROLL=8 if narrow else max(1, 1024 // sketch_dim),
                  # Three pipeline stages and the per-token numbers a tile ahead where they fit in registers: three
                  # stages spill at head dim 256 and at sketch 512, the prefetch at head dim 256 with sketch 1024. Two
                  # where the register cap below makes room for six programs a multiprocessor.
                  num_stages=3 if narrow and (eight_programs or not six_programs) else 2,
                  PREFETCH=head_dim * sketch_dim < 256 * 1024,
                  # Each group's outlier channels a tile ahead too (decode_split_kernel says why), at eight programs
                  # (with sketched outliers, or at six, they spill on Triton 3.9, sm_90): on the H100 at ebed0ed 0.98x,
                  # 0.99x, 0.95x and 0.95x the time of loading them at the tile, batch 1 with 32k and 128k tokens and
                  # batch 8 with 32k and 128k (profiling/results/nvidia-h100/sweep-decode-ebed0ed.txt).
                  PREFETCH_CHANNELS=bool(eight_programs),
                  # Two warps a program where they fit in registers: on the H100 at 31602b4, 27-33% faster than four at
                  # 32k and 128k tokens, batch 1 and 8, bf16 (fewer instructions a tile, four programs a multiprocessor
                  # in place of two). fp32 queries (two products per value pair, three limbs) spill with two on Triton
                  # 3.9, and at head dim 256 with four.
                  num_warps=(8 if head_dim >= 256 else 4) if precise else 2 if two_warps else 4,
                  # Eight programs of two warps a multiprocessor need at most 128 registers (65536 / (8 x 64)), six
                  # 168 (in steps of 8) and two stages' shared memory. Exact outliers at head dims 64 and 128 compile
                  # within six's without spills (Triton 3.6 and 3.9, sm_90 and sm_80), and within eight's where the
                  # values are paired (grouped value scales spill 16-48 bytes at 128, Triton 3.9, sm_90). On the H100
                  # at 43a6c51 (bf16, 3bit preset, Llama-3.1-8B shapes) eight took 0.91x, 0.80x, 0.78x and 0.75x the
                  # time of six at batch 1 with 32k and 128k tokens and batch 8 with 32k and 128k; six had taken
                  # 0.85-0.92x the time of four from 128k or at batch 8, and 1.00-1.05x at batch 1 and 32k
                  # (profiling/results/nvidia-h100/sweep-decode-43a6c51.txt and earlier).
                  maxnreg=128 if eight_programs else 168 if six_programs else 255, **COMPILER_OPTIONS)
    config["STACKED_LIMBS"] = bool(eight_programs and stackable(config))
    return config


def launch_specialization(n_tokens: int) -> dict:
    """The constexprs a launch adds for its ``n_tokens`` compressed tokens, beside Triton's own specialization on a
    multiple of 16 (``_value_planes``)."""
    return dict(WHOLE_BLOCKS=n_tokens % 16 != 0)


# The driver's count for each launch (``resident``), kept for the process; scripts/sweep_decode.py prints it.
RESIDENT_PROGRAMS = {}


def resident(config: dict, dtype: torch.dtype, device: torch.device, compile_kernel) -> int:
    """Programs of the decode kernel one multiprocessor holds at once at ``config`` for queries of ``dtype`` (which
    set the other inputs' types): read from the kernel ``compile_kernel()`` returns, once, then remembered."""
    key = (device, dtype, tuple(config.items()))
    if key not in RESIDENT_PROGRAMS:
        RESIDENT_PROGRAMS[key] = resident_programs(compile_kernel())
    return RESIDENT_PROGRAMS[key]


def split_size(n_tokens: int, heads: int, step: int, programs_per_sm: int, device: torch.device,
               min_tokens: int = MIN_TOKENS, splits: int | None = None) -> int:
    """Tokens per program, a multiple of ``step``: the (batch, KV head) pairs split so that all programs run in one
    wave of ``programs_per_sm`` on every multiprocessor, down to ``min_tokens`` a program; or, where a benchmark
    gives ``splits``, into that many a pair."""
    if splits is None:
        splits = max(1, programs_per_sm * multiprocessors(device) // heads)
        tokens = max(triton.cdiv(n_tokens, splits), min_tokens)
    elif splits < 1:
        raise ValueError(f"tuning splits must be at least 1, got {splits}")
    else:
        tokens = triton.cdiv(n_tokens, splits)
    return triton.cdiv(tokens, step) * step


def exact_split(n_exact: int, block: int, room: int, per_program: int | None = None) -> tuple[int, int]:
    """(programs, tokens each) for a (batch, KV head)'s ``n_exact`` sink and buffer tokens: as many programs as the
    wave has ``room`` for beside the compressed splits, each at least ``MIN_TILES`` tiles of ``block`` tokens; or,
    where a benchmark gives ``per_program``, that many tokens each. One program walking a whole buffer (128 tokens,
    eight tiles) outlasts splits of two tiles, those of short contexts. Where the wave is full (no room) the exact
    tokens' programs come last and wait for splits to finish, so the smallest, which end soonest."""
    if per_program is None:
        per_program = MIN_TILES * block if room < 1 else max(MIN_TILES * block, triton.cdiv(n_exact, room))
    elif per_program < 1:
        raise ValueError(f"tuning exact_tokens must be at least 1, got {per_program}")
    per_program = triton.cdiv(per_program, block) * block
    return max(1, triton.cdiv(n_exact, per_program)), per_program


def split_plan(n_tokens: int, n_exact: int, programs: int, config: dict, programs_per_sm: int, device: torch.device,
               exact_tokens: int | None = None, **split_tuning) -> tuple[int, int, tuple[int, int]]:
    """How a launch at ``config`` splits ``programs`` (batch, KV head) rows of ``n_tokens`` compressed and
    ``n_exact`` sink and buffer tokens, ``programs_per_sm`` a multiprocessor: (tokens per split, splits,
    ``exact_split``'s programs and tokens each). ``exact_tokens`` and ``split_tuning`` (``split_size``'s
    ``min_tokens`` and ``splits``): a benchmark's choices."""
    per_split = split_size(n_tokens, programs, config["STEP"], programs_per_sm, device, **split_tuning)
    splits = triton.cdiv(n_tokens, per_split) if n_tokens else 0
    room = programs_per_sm * multiprocessors(device) // programs - splits
    return per_split, splits, exact_split(n_exact, config["BLOCK_EXACT"], room, exact_tokens)


def decode_attention(query: torch.Tensor, keys, values, value_bits: int, matrix: torch.Tensor,
                     outlier_matrix: torch.Tensor | None, group_size: int, key_mean: torch.Tensor | None,
                     exact_keys, exact_values, scaling: float, tuning: dict | None = None) -> torch.Tensor:
    """Attention of one decode token. ``query`` ``[b, hq, 1, d]``; ``keys`` = (signs, norms, outlier_idx,
    outlier_signs, outlier_norms, outlier_residuals) (exact outliers: no ``outlier_matrix``) and ``values`` = (packed,
    scales, minimums) as ``QJLLayer`` stores them (``[b, h, n, ...]``, the codes ``[b, h, ceil(n / 16), bits d / 8,
    16]``, ``qjl.values.block_tokens``); ``exact_keys``/``exact_values`` = (sink,
    buffer) ``[b, h, *, d]``. Returns ``[b, 1, hq, d]`` in the query's dtype. ``tuning`` overrides launch choices
    (``num_warps``, ``num_stages``, ``maxnreg``, ``UNROLL``, ``PREFETCH``, ``ASM``, ``BLOCK_EXACT``: the exact
    tokens' tile, ``EXACT_PADDED``: their queries padded to 16 rows, ``STACKED_LIMBS``: both limbs in one sign
    product, ``PREFETCH_CHANNELS``: outlier channels a tile ahead, ``PDL``: programmatic launches,
    ``programs_per_sm``, ``min_tokens``, ``splits``: compressed splits per (batch, KV head), ``exact_tokens``: sink
    and buffer tokens a program, ``project_blocks``: programs a KV head in the queries' projection) for benchmarks."""
    signs, norms, idx, osigns, onorms, oresiduals = keys
    b, hq, _, d = query.shape
    h, n = signs.shape[1], signs.shape[2]
    group = hq // h
    k = 0 if idx is None else idx.shape[-1]
    tuning = dict(tuning or {})
    config = launch_config(group, d, matrix.shape[0], outlier_matrix.shape[0] if outlier_matrix is not None else 16,
                           k, group_size, key_mean is not None, value_bits, d // values[1].shape[-1],
                           oresiduals is not None, query.dtype == torch.float32, asm=not interpreting())
    config.update(launch_specialization(n))
    config.update({name: tuning.pop(name) for name in ("num_warps", "num_stages", "maxnreg", "UNROLL", "PREFETCH",
                                                           "ASM", "BLOCK_EXACT", "EXACT_PADDED", "STACKED_LIMBS",
                                                           "PREFETCH_CHANNELS")
                   if name in tuning})
    if config["STACKED_LIMBS"] and not stackable(config):
        raise ValueError("STACKED_LIMBS needs two limbs (bf16 or fp16 queries), at most 8 queries a program and no "
                         "sketched outliers")
    pdl = tuning.pop("PDL", programmatic_launch(query.device))
    config.update(programmatic_options(pdl))
    project_tuning = dict(BLOCKS=tuning.pop("project_blocks", 1))
    programs, m = b * h * config["CHUNKS"], config["QUERIES"]
    q = query.reshape(programs, m, d).contiguous()  # the kernels take them as zero queries up to M (launch_config)
    def rows_of(sketch):  # limbs, scales, and the rows' sums of the limbs this launch takes
        _, limbs, limb_scales, sums = sketch_tables(sketch)
        return limbs, limb_scales, sums[config["LIMBS"] - 1]

    sketch_rows = rows_of(matrix)
    outlier_rows = rows_of(outlier_matrix) if outlier_matrix is not None else sketch_rows
    if n:  # read by splits only
        query_rows = project_queries(q, matrix, config["PRECISE"], pdl, project_tuning)
    else:
        query_rows = (q.new_empty(0, dtype=torch.int8), *[q.new_empty(0, dtype=torch.float32)] * 2)
    sink_k, buf_k = (t.contiguous() for t in exact_keys)
    sink_v, buf_v = (t.contiguous() for t in exact_values)
    packed, scales, minimums = (t.contiguous() for t in values)
    blocked = (b, h, triton.cdiv(n, VALUE_BLOCK), value_bits * d // 8, VALUE_BLOCK)
    if packed.shape != blocked:
        raise ValueError(f"value codes of shape {tuple(packed.shape)} for {n} tokens: expected blocks of {VALUE_BLOCK} "
                         f"tokens, {list(blocked)} (qjl.values.block_tokens)")

    def present(t):  # what a constexpr compiles away still needs a pointer
        return signs if t is None else t.contiguous()

    # the mean as the layer stores it (the kernel converts it): a conversion here would be a kernel of its own each
    # step, between the projection and the splits
    mean = key_mean.contiguous() if key_mean is not None else q
    oscale = sketch_scale(outlier_matrix) if outlier_matrix is not None else 0.0

    def arguments(parts, per_split, exact):
        return (q, *query_rows, *sketch_rows, *outlier_rows, mean, signs.contiguous(), norms.contiguous(),
                present(idx), present(osigns), present(onorms), present(oresiduals), packed, scales, minimums, sink_k,
                sink_v, buf_k, buf_v, *parts, n, idx.shape[2] if k else 0, per_split, sink_k.shape[2],
                buf_k.shape[2], sketch_scale(matrix), oscale, scaling * LOG2E, *exact)

    if "programs_per_sm" in tuning or interpreting():
        programs_per_sm = tuning.pop("programs_per_sm", INTERPRETER_PROGRAMS_PER_SM)
    else:
        # Exact tokens a program in whole tiles, as every launch gives them: Triton compiles a 1 into the kernel
        # (and a multiple of 16 as one), so a 1 here would build a kernel no launch runs and count its programs.
        programs_per_sm = resident(config, query.dtype, query.device, lambda: decode_split_kernel.warmup(
            *arguments([q.new_empty(1, dtype=torch.float32)] * 3, config["STEP"], (1, config["BLOCK_EXACT"])),
            grid=(1,), **config))
    per_split, splits, exact = split_plan(n, sink_k.shape[2] + buf_k.shape[2], programs, config, programs_per_sm,
                                          query.device, **tuning)
    part_m = q.new_empty(programs, splits + exact[0], config["M"], dtype=torch.float32)
    part_l = torch.empty_like(part_m)
    part_acc = q.new_empty(programs, splits + exact[0], config["M"], d, dtype=torch.float32)
    decode_split_kernel[(programs, splits + exact[0])](*arguments((part_m, part_l, part_acc), per_split, exact),
                                                    **config)
    out = combine_splits(part_m, part_l, part_acc, query.dtype, pdl, rows=m)  # [b h chunks, m, d]
    return out.reshape(b, 1, hq, d)
