"""Small kernels that call each helper with inline PTX of the fused decode kernel: run by ``test_kernels.py`` (on a
GPU, or in the interpreter with the PTX modelled, ``ptx_model.py``) and compiled for sm_90 by
``test_kernels_compile.py``, which reads how their operands reach the registers."""

import triton
import triton.language as tl

from kernels.decode_attention import _bits, _float32, _paired_codes, _part_index, _plane_bits, _widened

HELPERS_SIGNATURE = dict(plane0_ptr="*u8", plane1_ptr="*u8", half_ptr="*fp16", bits_ptr="*i8", shifted_ptr="*i16",
                         widened_ptr="*i16", even_ptr="*i16", odd_ptr="*i16", float_ptr="*fp32")


@triton.jit
def helpers(plane0_ptr, plane1_ptr, half_ptr, bits_ptr, shifted_ptr, widened_ptr, even_ptr, odd_ptr, float_ptr,
            ASM: tl.constexpr):
    """Each helper with inline PTX of the decode kernel on 256 values: every byte in ``plane0``."""
    offs = tl.arange(0, 16)[:, None] * 16 + tl.arange(0, 16)[None, :]
    plane0 = tl.load(plane0_ptr + offs)
    plane1 = tl.load(plane1_ptr + offs)
    for i in tl.static_range(8):
        tl.store(bits_ptr + i * 256 + offs, _bits(plane0, i, ASM))
    widened = _widened(plane0, ASM)
    tl.store(widened_ptr + offs, widened)
    for s in tl.static_range(15):  # shifts from 7 left to 7 right, a whole byte's mask
        tl.store(shifted_ptr + s * 256 + offs, _plane_bits(widened, _widened(plane1, ASM), s - 7, 0xFF, ASM))
    even, odd = _paired_codes(plane0, plane1, ASM)
    tl.store(even_ptr + offs, even)
    tl.store(odd_ptr + offs, odd)
    tl.store(float_ptr + offs, _float32(tl.load(half_ptr + offs), ASM))


@triton.jit
def part_indices(out_ptr, ASM: tl.constexpr):
    """``_part_index`` of each program, stored at its row."""
    bh = tl.program_id(0)
    tl.store(out_ptr + bh * tl.num_programs(1) + tl.program_id(1), _part_index(bh, ASM))
