"""Helpers shared by the kernels: fp32-accurate matrix products on fp16 tensor cores, bit unpacking, and the layout
the quantization launchers read the prompt in.

fp32 operands go through tensor cores as an fp16 high part plus an fp16 remainder (error about 2^-22 of the
operands, against 2^-11 for one fp16 product), so a kernel agrees with the fp32 torch reference to ~1e-6 while the
products run at fp16 rate. Operands must stay below fp16's range (65504): true of projections, queries, keys,
values and probabilities of real models. (bf16 would have the range, but Triton's interpreter mis-computes bf16 dots.)
"""

import ctypes
import math
import os

import torch
import triton
import triton.language as tl


@triton.jit
def split_fp16(x):
    hi = x.to(tl.float16)
    return hi, (x - hi.to(tl.float32)).to(tl.float16)


@triton.jit
def dot_exact_rhs(a, b):
    """fp32 ``a @ b`` for ``b`` exactly representable in fp16 (signs, integer codes)."""
    a_hi, a_lo = split_fp16(a)
    b16 = b.to(tl.float16)
    return tl.dot(a_hi, b16) + tl.dot(a_lo, b16)


@triton.jit
def dot_exact_lhs(a, b):
    """fp32 ``a @ b`` for ``a`` exactly representable in fp16 (bf16 or fp16 queries, keys, values)."""
    b_hi, b_lo = split_fp16(b)
    a16 = a.to(tl.float16)
    return tl.dot(a16, b_hi) + tl.dot(a16, b_lo)


@triton.jit
def dot_split(a, b_hi, b_lo):
    """fp32 ``a @ b`` for ``b`` given as its fp16 high part and remainder (``split_fp16``, made once beforehand): two
    fp16 products for fp16 or bf16 ``a`` (exact in fp16 above its subnormals, as ``dot_exact_lhs`` takes it), three
    for fp32 ``a``."""
    if a.dtype == tl.float32:
        a_hi, a_lo = split_fp16(a)
        return tl.dot(a_hi, b_hi) + tl.dot(a_lo, b_hi) + tl.dot(a_hi, b_lo)
    else:
        a16 = a.to(tl.float16)
        return tl.dot(a16, b_hi) + tl.dot(a16, b_lo)


@triton.jit
def dot3(a, b):
    """fp32 ``a @ b`` from three fp16 products (the lo x lo term is below fp32 rounding), whatever ``a``'s dtype."""
    b_hi, b_lo = split_fp16(b)
    return dot_split(a.to(tl.float32), b_hi, b_lo)


@triton.jit
def unpack_rows(packed, ROWS: tl.constexpr, BYTES: tl.constexpr):
    """uint8 ``[ROWS, BYTES]`` -> int32 bits ``[ROWS, 8 BYTES]``, least significant bit first."""
    bits = (packed.to(tl.int32)[:, :, None] >> tl.arange(0, 8)[None, None, :]) & 1
    return tl.reshape(bits, (ROWS, BYTES * 8))


@triton.jit
def pack_rows(bits, ROWS: tl.constexpr, BYTES: tl.constexpr):
    """int32 0/1 ``[ROWS, 8 BYTES]`` -> uint8 ``[ROWS, BYTES]``, least significant bit first."""
    weighted = tl.reshape(bits, (ROWS, BYTES, 8)) << tl.arange(0, 8)[None, None, :]
    return tl.sum(weighted, axis=2).to(tl.uint8)


# Compiler options every launch passes (each launcher's ``launch_config``): fused multiply-adds, Triton's default up
# to 3.9, which 3.10 turns off. The kernels were tested and timed on GPUs with them; set here, the same code compiles
# whatever the default (Triton 3.9 builds the same cubins with it as without it, and warns without it).
COMPILER_OPTIONS = dict(enable_fp_fusion=True)


def interpreting() -> bool:
    """Whether Triton's interpreter runs the kernels (``TRITON_INTERPRET=1``): it cannot run inline PTX."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def programmatic_launch(device: torch.device) -> bool:
    """Whether a decode step's kernels launch while the one before still runs (programmatic dependent launch,
    ``griddepcontrol``; each waits for it before its first read): on Hopper and later GPUs, not under the
    interpreter."""
    return device.type == "cuda" and not interpreting() and torch.cuda.get_device_capability(device)[0] >= 9


def programmatic_options(pdl: bool) -> dict:
    """What a launch made programmatically takes: its ``PDL`` constexpr (the kernel then waits for the one before)
    and Triton's launch option; nothing otherwise."""
    return dict(PDL=True, launch_pdl=True) if pdl else {}


def multiprocessors(device: torch.device) -> int:
    """The GPU's multiprocessors; eight off a GPU, where the launchers' splits are only exercised."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8


def l2_cache_bytes(device: torch.device) -> int:
    """The GPU's L2 cache; the H100's 50 MB off a GPU (what sizes the benchmark's cold copies there)."""
    return torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else 50 * 2 ** 20


def resident_programs(kernel) -> int:
    """Programs of a compiled kernel that one multiprocessor runs at once, as the CUDA driver places them: its
    registers, threads and shared memory, with the shared-memory carveout the driver would pick
    (``cuOccupancyMaxActiveBlocksPerMultiprocessor``; Triton passes all of a kernel's shared memory as dynamic)."""
    kernel._init_handles()
    programs = ctypes.c_int()
    status = ctypes.CDLL("libcuda.so.1").cuOccupancyMaxActiveBlocksPerMultiprocessor(
        ctypes.byref(programs), ctypes.c_void_p(kernel.function), ctypes.c_int(32 * kernel.metadata.num_warps),
        ctypes.c_size_t(kernel.metadata.shared))
    if status != 0:
        raise RuntimeError(f"cuOccupancyMaxActiveBlocksPerMultiprocessor failed with CUresult {status}")
    return max(1, programs.value)


def sketch_scale(matrix: torch.Tensor) -> float:
    """``sqrt(pi / 2) / m`` for a sketch ``matrix`` ``[m, d]``: what turns sign agreements times a key's norm into an
    inner product estimate (``qjl.sketch.QJLSketch.scale``)."""
    return math.sqrt(math.pi / 2) / matrix.shape[0]


def pow2(n: int, minimum: int = 1) -> int:
    return max(minimum, triton.next_power_of_2(n))


def head_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` ``[..., n, d]`` as ``[heads, n, d]`` with each head's tokens contiguous rows: a view where the layout
    allows (heads any stride apart, as in a slice of the cache's buffer), else a contiguous copy."""
    n = x.shape[-2] if x.dim() > 1 else 1
    heads = x.reshape(math.prod(x.shape[:-2]), n, x.shape[-1])  # explicit sizes: -1 is ambiguous with no tokens
    return heads if heads.stride(1) == heads.shape[2] and heads.stride(2) == 1 else heads.contiguous()
