"""The decode queries' sketch projections in the fused decode kernel's bit order, as int8 limbs.

``kernels.decode_attention`` takes the products of sign bit ``i`` of every packed byte ``j`` (sketch row ``8 j + i``)
one bit position at a time on int8 tensor cores, so it reads ``S q`` with its columns permuted to ``i * BP + j``
(``BP`` the bytes a key takes, padded to a power of two) and split into int8 limbs: a row ``x`` with
``s = max |x| / 127`` is ``s (L_0 + L_1 / 254 + L_2 / 254^2 ...)``, each limb in ``[-127, 127]`` refining the
remainder of the ones before (two limbs: ``max |x| 2^-16``, finer than one fp16 product; three: ``2^-24``, for fp32
queries). The products of limbs and sign bits are exact in int32. The decode kernel takes the bits as 0 and 1,
``b``, with each row's sum as the limbs hold it: ``x . (2 b - 1) = 2 x . b - sum_c x_c``. One program per (batch, KV
head) does this once per decode step, for the ``M`` queries of that KV head.

Reference: ``q @ S.T`` (``qjl.sketch.QJLSketch``), permuted and split as ``sketch_tables`` permutes and splits ``S``.
The kernel reads ``S`` as its fp16 high part and remainder, split once (``sketch_halves``), not float32 to split a
step at a time: the same bytes, and none of the conversions in a kernel of one program a KV head, bound by latency
(at four warps, each alone on its scheduler, a warp runs 1,536 instructions where it ran 2,874: Triton 3.6, sm_90,
compiled, not timed).
"""

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents

from .common import COMPILER_OPTIONS, dot_split, pow2

# Head-dim channels per step of the projection: the sketch's slice of them, [BLOCK_D, WIDTH] fp16 twice, goes through
# shared memory (32 KB at sketch 256), and the whole projection [M_PAD, WIDTH] stays in registers. Column blocks
# (``BLOCKS``) take the same steps; their narrower products need not round as one program's do (on the H100 two
# blocks' limbs were not all one program's).
PROJECT_SLICE_BYTES = 32 * 1024
# Each limb after the first is the remainder (within +-1/2) of those before, times this.
LIMB_BASE = tl.constexpr(254)


def limb_count(precise: bool) -> int:
    return 3 if precise else 2


def padded_bytes(sketch_dim: int) -> int:
    """``BP``: the bytes of a key's signs padded to a power of two, at least the 32 of an int8 product's depth."""
    return pow2(sketch_dim // 8, 32)


@triton.jit
def _store_limbs(proj, tables_ptr, scales_ptr, sums_ptr, bh, rows, M_PAD: tl.constexpr, WIDTH: tl.constexpr,
                 LIMBS: tl.constexpr):
    """The projection ``proj`` ``[M_PAD, WIDTH]`` of program ``bh`` as int8 limbs, row scales and sums."""
    columns = tl.arange(0, WIDTH)
    largest = tl.max(tl.abs(proj), axis=1)
    scale = tl.where(largest > 0, largest / 127.0, 1.0)
    tl.store(scales_ptr + bh * M_PAD + rows, scale)
    rest = proj / scale[:, None]
    out = tables_ptr + (bh * LIMBS * M_PAD + rows[:, None]) * WIDTH + columns[None, :]
    row_sums = tl.zeros((M_PAD,), dtype=tl.float32)
    weight = 1.0
    for limb in tl.static_range(LIMBS):
        whole = tl.floor(rest + 0.5)
        tl.store(out + limb * M_PAD * WIDTH, whole.to(tl.int8))
        row_sums += tl.sum(whole, axis=1) * weight
        rest = (rest - whole) * LIMB_BASE
        weight /= LIMB_BASE
    tl.store(sums_ptr + bh * M_PAD + rows, row_sums * scale)


@triton.jit
def project_kernel(q_ptr, s_hi_ptr, s_lo_ptr, tables_ptr, scales_ptr, sums_ptr, work_ptr, arrivals_ptr,
                   M: tl.constexpr, M_PAD: tl.constexpr, D: tl.constexpr, WIDTH: tl.constexpr, BLOCK_D: tl.constexpr,
                   LIMBS: tl.constexpr, BLOCKS: tl.constexpr = 1, PDL: tl.constexpr = False):
    """Program ``(bh, block)``: ``q @ S_perm`` ``[M_PAD, WIDTH]`` for the queries of one KV head as int8 limbs
    ``tables[bh, l, m, c]``, row scales ``scales[bh, m]`` and the rows' sums as the limbs hold them ``sums[bh, m]``
    (rows from ``M`` on are zeros). ``s_hi_ptr``, ``s_lo_ptr``: ``S`` in bit order, fp16 ``[D, WIDTH]`` each
    (``sketch_halves``); fp32 queries take three products, the others two (exact in fp16). One
    pass over the head dim, the whole projection held: on the H100 (cb8154c) two passes of 64-column blocks, 16
    channels a step, took 17.5 us, a third of a decode step at batch 1 and 32k tokens (latency, not work).

    ``BLOCKS`` programs share a KV head's columns, each reading its share of ``S`` (one program reads all 128 KB of
    it at head dim 128 and sketch 256, through one multiprocessor): each writes its float32 columns to ``work``
    ``[BH, M_PAD, WIDTH]`` and counts itself in ``arrivals[bh]`` (zero between launches), and the last to arrive
    makes the limbs of the whole rows (their scales take every column's largest) and sets the count back to zero:
    the same numbers as one program, each column's products taken alike. ``PDL``: the decode kernel may start at
    once (its programs wait for this one's results where they read them)."""
    if PDL:
        gdc_launch_dependents()
    bh = tl.program_id(0)
    COLUMNS: tl.constexpr = WIDTH // BLOCKS
    rows = tl.arange(0, M_PAD)
    columns = tl.program_id(1) * COLUMNS + tl.arange(0, COLUMNS)
    proj = tl.zeros((M_PAD, COLUMNS), dtype=tl.float32)
    for d_start in range(0, D, BLOCK_D):
        offs_d = d_start + tl.arange(0, BLOCK_D)
        q = tl.load(q_ptr + (bh * M + rows[:, None]) * D + offs_d[None, :],
                    mask=(rows[:, None] < M) & (offs_d[None, :] < D), other=0.0)
        s_offsets = offs_d[:, None] * WIDTH + columns[None, :]
        proj += dot_split(q, tl.load(s_hi_ptr + s_offsets, mask=offs_d[:, None] < D, other=0.0),
                          tl.load(s_lo_ptr + s_offsets, mask=offs_d[:, None] < D, other=0.0))
    if BLOCKS == 1:
        _store_limbs(proj, tables_ptr, scales_ptr, sums_ptr, bh, rows, M_PAD, WIDTH, LIMBS)
    else:
        work = work_ptr + (bh * M_PAD + rows[:, None]) * WIDTH
        tl.store(work + columns[None, :], proj)
        # every thread's columns written before one thread's release (a semaphore as CUTLASS's: a barrier, then
        # one release; the acquire's result reaches the other threads through shared memory, past a barrier)
        tl.debug_barrier()
        if tl.atomic_add(arrivals_ptr + bh, 1, sem="acq_rel") == BLOCKS - 1:
            everything = tl.load(work + tl.arange(0, WIDTH)[None, :], cache_modifier=".cg")  # L2, not L1
            _store_limbs(everything, tables_ptr, scales_ptr, sums_ptr, bh, rows, M_PAD, WIDTH, LIMBS)
            tl.store(arrivals_ptr + bh, 0)


def launch_config(queries: int, head_dim: int, sketch_dim: int, precise: bool = False, blocks: int = 1) -> dict:
    """The constexprs (and warps) for these shapes, with ``blocks`` programs a KV head; also what
    ``kernels-compile`` checks."""
    width = 8 * padded_bytes(sketch_dim)
    if width % blocks or width // blocks < 16:
        raise ValueError(f"{blocks} column blocks do not divide {width} columns into blocks of 16 or more")
    return dict(M=queries, M_PAD=pow2(queries, 16), D=head_dim, WIDTH=width,
                BLOCK_D=min(head_dim, max(16, PROJECT_SLICE_BYTES // (4 * width))),
                LIMBS=limb_count(precise), BLOCKS=blocks,
                # Eight warps, two a scheduler to take turns in a kernel bound by latency: at four, head dim 64 and
                # sketch 128 kept 8 bytes of stack on sm_90 (Triton 3.9). Untimed; decode_launches.py times four.
                num_warps=8, **COMPILER_OPTIONS)


# Counts of arrived column blocks, one per program row (``project_kernel``), zero between launches: kept per device
# and size for the process, so that a launch (and a CUDA graph that captured it) always finds them. Launches with
# column blocks on one device share them, so they must not run at once on two streams.
ARRIVALS = {}


def arrivals(rows: int, device: torch.device) -> torch.Tensor:
    key = (device, rows)
    if key not in ARRIVALS:
        ARRIVALS[key] = torch.zeros(rows, dtype=torch.int32, device=device)
    return ARRIVALS[key]


def int8_limbs(x: torch.Tensor, limbs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``x`` ``[..., W]`` (float32) as ``limbs`` int8 limbs ``[limbs, ..., W]`` and float32 scales ``[...]``,
    as ``project_kernel`` splits the projections."""
    largest = x.abs().amax(dim=-1)
    scale = torch.where(largest > 0, largest / 127.0, torch.ones_like(largest))
    rest = x / scale[..., None]
    parts = []
    for _ in range(limbs):
        whole = torch.floor(rest + 0.5)
        parts.append(whole.to(torch.int8))
        rest = (rest - whole) * LIMB_BASE.value
    return torch.stack(parts), scale


def from_limbs(limbs: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The float32 rows that ``int8_limbs`` split."""
    weights = LIMB_BASE.value ** -torch.arange(limbs.shape[0], dtype=torch.float64, device=limbs.device)
    total = (limbs.double() * weights.reshape(-1, *[1] * (limbs.dim() - 1))).sum(0)
    return (total * scale[..., None].double()).float()


def kept_on(matrix: torch.Tensor, name: str, make) -> tuple:
    """The tensors ``make()`` returns for ``matrix``, made once per version of it and kept on it under ``name`` as
    ``(version, *tensors)`` (sketches are never written)."""
    cached = getattr(matrix, name, None)
    if cached is None or cached[0] != matrix._version:
        cached = (matrix._version, *make())
        setattr(matrix, name, cached)
    return cached[1:]


def sketch_tables(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sketch ``[m, d]`` as the kernels read it: ``T[c, i * BP + j] = S[8 j + i, c]`` (``BP`` the byte count
    padded to a power of two, zero where ``8 j + i >= m``): float32 ``[d, 8 BP]``, and its rows (one per channel) as
    three int8 limbs ``[3, d, 8 BP]`` with scales ``[d]`` and the rows' sums as the first ``n`` limbs hold them,
    ``[3, d]`` (``n - 1`` first). Made once per matrix and kept on it (``kept_on``), under a name of its own: earlier
    kernels put beside this one (``scripts/decode_baseline.sh``) keep theirs, of another layout."""
    def make():
        m, d = matrix.shape
        bp = padded_bytes(m)
        padded = matrix.new_zeros(8 * bp, d, dtype=torch.float32)
        padded[:m] = matrix.float()
        # row 8 j + i -> column i * bp + j
        table = padded.reshape(bp, 8, d).permute(2, 1, 0).reshape(d, 8 * bp).contiguous()
        limbs, scales = int8_limbs(table, limb_count(precise=True))
        sums = torch.stack([from_limbs(limbs[:n], scales).double().sum(-1) for n in range(1, len(limbs) + 1)])
        return table, limbs.contiguous(), scales.contiguous(), sums.float()

    return kept_on(matrix, "_kernel_sketch_rows", make)


def sketch_halves(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 table of ``sketch_tables`` as fp16 high part and remainder (``kernels.common.split_fp16``), each
    ``[d, 8 BP]``, what ``project_kernel`` reads; kept on the matrix as the tables are."""
    def make():
        table = sketch_tables(matrix)[0]
        high = table.half()
        return high, (table - high.float()).half()

    return kept_on(matrix, "_kernel_sketch_halves", make)


def project_queries(q: torch.Tensor, matrix: torch.Tensor, precise: bool, pdl: bool = False,
                    tuning: dict | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q`` ``[BH, M, d]`` (the queries of each KV head), sketch ``matrix`` ``[m, d]``: ``q @ S.T`` with its columns
    in bit order (zeros past ``m``, zero rows past ``M``) as int8 limbs ``[BH, LIMBS, M_PAD, 8 BP]``, float32 row
    scales ``[BH, M_PAD]`` and the rows' sums as the limbs hold them ``[BH, M_PAD]``; three limbs if ``precise``
    (fp32 queries), else two. ``pdl``: the next kernel is launched programmatically (``kernels.common``).
    ``tuning`` overrides launch choices (``BLOCKS``: programs a KV head, ``BLOCK_D``, ``num_warps``, ``num_stages``)
    for benchmarks."""
    bh, queries, d = q.shape
    if matrix.shape[1] != d:
        raise ValueError(f"sketch matrix {tuple(matrix.shape)} does not match head dim {d}")
    tuning = dict(tuning or {})
    config = dict(launch_config(queries, d, matrix.shape[0], precise, tuning.pop("BLOCKS", 1)), **tuning)
    tables = q.new_empty(bh, config["LIMBS"], config["M_PAD"], config["WIDTH"], dtype=torch.int8)
    scales = q.new_empty(bh, config["M_PAD"], dtype=torch.float32)
    sums = torch.empty_like(scales)
    blocks = config["BLOCKS"]
    if blocks > 1:
        work = tables.new_empty(bh, config["M_PAD"], config["WIDTH"], dtype=torch.float32)
        counts = arrivals(bh, q.device)
    else:  # unread with one block: pointers of the types compiled, and no count to allocate
        work, counts = scales, sums.view(torch.int32)
    project_kernel[(bh, blocks)](q.contiguous(), *sketch_halves(matrix), tables, scales, sums, work, counts, PDL=pdl,
                                 **config)
    return tables, scales, sums
