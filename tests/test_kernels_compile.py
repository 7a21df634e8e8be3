"""The real Triton compiler (not the interpreter) accepts every kernel for sm_90 and sm_80 at the configurations the
launchers use (head dims 64, 128 and 256; sketches 128 to 512, with outliers sketched or exact and centred keys;
the decode kernels for bf16 and fp32 models), without spills and within each architecture's shared memory per
program."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ptx_model import register_slots

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]


def compiler_env() -> dict:
    """This process's environment without ``TRITON_INTERPRET`` (the kernel tests set it in this one, which makes the
    kernels interpreted functions that the compiler cannot take)."""
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def kernels_compile(*args: str, setup: str = "") -> int:
    """Runs ``python -m profiling kernels-compile ARGS`` in a fresh process, for the compiler (``compiler_env``)."""
    code = f"{setup}\nfrom profiling.__main__ import main\nraise SystemExit(main({['kernels-compile', *args]!r}))"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=compiler_env()).returncode

KERNEL_NAMES = {"quantize_keys", "quantize_values", "scores", "decode_project", "decode_split", "combine_splits"}


def test_every_kernel_compiles_for_hopper_and_ampere_without_spills(tmp_path):
    code = kernels_compile("--quick", "--arch", "90", "--arch", "80", "--out", str(tmp_path))
    kernels = json.loads((tmp_path / "results.json").read_text())["kernels"]
    for arch in (90, 80):
        compiled = [k for k in kernels if k["arch"] == arch]
        assert {k["name"] for k in compiled} == KERNEL_NAMES
        assert {k["config"]["D"] for k in compiled if k["name"] == "decode_split"} == {64, 128, 256}
        # bf16 and fp32 models: fp32 queries take three limbs and high and low parts of the weights
        assert {k["config"]["PRECISE"] for k in compiled if k["name"] == "decode_split"} == {False, True}
        assert {k["config"]["LIMBS"] for k in compiled if k["name"] == "decode_project"} == {2, 3}
        # the decode kernel also as launched with token counts that are multiples of 16 (Triton specializes on them)
        decode = [k for k in compiled if k["name"] == "decode_split"]
        assert {tuple(k["multiples_of_16"]) for k in decode} == {(), ("n_tokens", "tokens_per_split",
                                                                      "exact_per_program")}
        assert len(decode) == 2 * len({k["shapes"] for k in decode if not k["multiples_of_16"]})
        assert max(k["config"]["SKETCH"] for k in compiled if k["name"] == "scores") == 512
        for name in ("quantize_keys", "scores", "decode_split"):  # outliers sketched and exact, at every head dim
            variants = {(k["config"]["D"], k["config"]["EXACT"]) for k in compiled if k["name"] == name
                        and k["config"]["K"]}
            assert variants == {(d, exact) for d in (64, 128, 256) for exact in (False, True)}, name
    for k in kernels:
        assert k["config"]["enable_fp_fusion"] is True, k  # kernels.common.COMPILER_OPTIONS, in every launch_config
        assert k["registers"] > 0, k
        assert k["spill_bytes"] == 0, k
        assert k["shared_bytes"] <= {90: 227 * 1024, 80: 163 * 1024}[k["arch"]], k
    assert code == 0


def test_kernels_compile_fails_over_the_shared_memory_limit(tmp_path):
    """The check can fail: a kernel over the architecture's shared memory is reported and sets the exit code."""
    code = kernels_compile("--quick", "--arch", "80", "--only", "quantize_values", "--out", str(tmp_path),
                           setup="from profiling import cmd_kernels_compile\n"
                                 "cmd_kernels_compile.SHARED_LIMITS[80] = 64")
    rows = json.loads((tmp_path / "results.json").read_text())["kernels"]
    assert code == 1 and rows and all(k["shared_bytes"] > k["shared_limit"] == 64 for k in rows)


def register_share(programs: int) -> int:
    """The registers a thread of a two-warp program may take for ``programs`` of them to share a multiprocessor:
    65536 / (64 x programs), in the allocator's steps of 8."""
    return 65536 // (64 * programs) // 8 * 8


def sass_rows(tmp_path, shapes: list[str], tuning: list[str] = ()) -> dict:
    """``scripts/sass_decode.py``'s counts of the current decode kernel at ``shapes`` (with a sweep row's launch
    choices, ``tuning``), by shape."""
    out = tmp_path / "sass.json"
    subprocess.run([sys.executable, "scripts/sass_decode.py", "--shapes", *shapes, *(["--tuning", *tuning] if tuning
                    else []), "--json", str(out)], cwd=ROOT, env=compiler_env(), check=True)
    return {r["shapes"]: r for r in json.loads(out.read_text()) if r["kernel"] == "current"}


def test_sass_of_the_decode_main_loop(tmp_path):
    """``scripts/sass_decode.py`` finds the fused decode kernel's tile loop in the sm_90 disassembly: a tile's
    tensor-core products are there (at least one per bit position of the signs), amid many more instructions, and the
    accumulators' rescale is a branch that a tile where no max grows skips; with three pipeline stages the loop's
    wait leaves copies in flight, so a tile does not wait for its own loads."""
    shapes = ["smollm2/3bit/exact/sketch128", "smollm2/3bit/sketched/sketch128"]
    rows = sass_rows(tmp_path, shapes)
    assert sorted(rows) == sorted(shapes)
    for row in rows.values():
        assert row["mma"] >= 8 and row["instructions"] > 5 * row["mma"] and 0 < row["registers"] <= 255
        # the eight accumulators' rescale, at least two registers each
        assert row["instructions"] - 16 >= row["common_path"] > 5 * row["mma"]
        assert row["copies_in_flight"] > 0  # three stages, exact outliers (eight programs) and sketched alike


# The launch that was the default until 1014fa3 at the benchmark's shapes: six programs a multiprocessor (a cap of 168
# registers, two stages, the exact tokens 32 at a time with their queries padded to 16 rows, one sign product a limb),
# as sass_decode.py's arguments.
SIX_PROGRAMS = ["num_stages=2", "maxnreg=168", "BLOCK_EXACT=32", "EXACT_PADDED=1", "STACKED_LIMBS=0"]


@pytest.mark.parametrize("tuning,programs", [
    ([], 8), (["num_stages=4"], 8), (["maxnreg=144", "EXACT_PADDED=1"], 7), (["PREFETCH_CHANNELS=0"], 8)])
def test_sweep_launches_fit_without_stack(tmp_path, tuning, programs):
    """The default launch at the benchmark's shapes and the sweep's (``scripts/sweep_decode.py``) at three or four
    stages, and with the outlier channels loaded at the tile, keep copies in flight at the tile loop's wait, within the
    registers (``register_share``) and shared memory that let eight programs share a multiprocessor (the default: the
    exact tokens 16 at a time with their queries unpadded, both limbs in one sign product), or seven with the exact
    tokens' queries padded, and without stack (the next tile's key norms carried as float32: as fp16 pairs ptxas kept
    them on the stack at every cap tried). Six programs at three stages, a launch of neither since 1014fa3, keep 8 bytes
    of stack on Triton 3.6 since the exact tokens' programs take a range of them (one store before their loop, one load
    after it)."""
    row = sass_rows(tmp_path, ["llama8b/3bit/exact/sketch256"], tuning)["llama8b/3bit/exact/sketch256"]
    assert row["tuning"] == {name: int(value) for name, value in (t.split("=") for t in tuning)}
    assert row["copies_in_flight"] > 0 and row["stack_bytes"] == 0
    assert row["registers"] <= register_share(programs)
    assert programs * (row["shared_bytes"] + 1024) <= 228 * 1024  # the H100's 228 KB, 1 KB of it reserved a program


@pytest.mark.parametrize("tuning,programs", [(SIX_PROGRAMS, 6), (["num_stages=2"], 8), ([], 8)])
def test_stacked_limbs_take_one_sign_product_a_bit_position(tmp_path, tuning, programs):
    """``STACKED_LIMBS`` (the default at eight programs a multiprocessor): one int8 product a bit position where two
    limbs took two, so 16 fewer tensor-core products a tile (two a warp at each of the 8 positions) and fewer
    instructions (at the default launch of f7ae057 27 fewer on Triton 3.6, 414 against 441, and 23 on 3.9; 14 on 3.9
    at 7870952), within the registers of six or eight programs (eight at two stages or three, the default), no stack
    in the tile loop, and (but Triton 3.6 at six, 8 bytes in the exact tokens' loop) none at all."""
    shapes = ["llama8b/3bit/exact/sketch256"]
    plain = sass_rows(tmp_path, shapes, [*tuning, "STACKED_LIMBS=0"])[shapes[0]]
    row = sass_rows(tmp_path, shapes, [*tuning, "STACKED_LIMBS=1"])[shapes[0]]
    assert plain["mma"] - row["mma"] == 16
    assert row["common_path"] < plain["common_path"]
    assert row["stack_in_loop"] == 0 and row["registers"] <= register_share(programs)
    assert row["stack_bytes"] <= (8 if programs == 6 and triton.__version__.startswith("3.6") else 0)


def test_projection_in_column_blocks_compiles_without_spills():
    """The queries' projection with its columns in 2, 4 or 8 blocks, a program each (``project_blocks``, timed by
    ``scripts/decode_launches.py`` and the sweep), compiles for sm_90 and sm_80 without spills, in less shared memory
    than one program (each holds its share of the columns) and no more registers (ptxas may give the same count: 64
    for one block and for two at sm_80 on Triton 3.6, the precise projection), and counts its arrival with one atomic
    that both releases its columns and acquires the others' (none with one block)."""
    code = """
import json
from profiling.cmd_kernels_compile import POINTERS, compile_for, resource_usage
from kernels.decode_project import launch_config, project_kernel
rows = []
for arch in (90, 80):
    for blocks in (1, 2, 4, 8):
        for precise in (False, True):
            config = launch_config(4, 128, 256, precise, blocks)
            compiled = compile_for(project_kernel, POINTERS["decode_project"], config, arch)
            rows.append(dict(arch=arch, blocks=blocks, precise=precise, shared=compiled.metadata.shared,
                             atomics=compiled.asm["ptx"].count("atom.global.gpu.acq_rel"),
                             **resource_usage(compiled.asm["cubin"])))
print(json.dumps(rows))
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=compiler_env(), check=True, capture_output=True,
                          text=True)
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(rows) == 16
    for row in rows:
        one = next(r for r in rows if r["blocks"] == 1 and r["arch"] == row["arch"] and r["precise"] == row["precise"])
        assert row["LOCAL"] == 0 and row.get("STACK", 0) == 0, row
        assert row["atomics"] == (0 if row["blocks"] == 1 else 1), row
        if row["blocks"] > 1:
            assert row["REG"] <= one["REG"] and row["shared"] < one["shared"], row


# Each helper's inline assembly, found by a part of its PTX: its outputs' and inputs' bits an element, and its pack.
PTX_HELPERS = {"0x01010101": ([8], [8, 32], 4), "lop3.b32 $0, t,": ([16], [16, 16], 2),
               "prmt.b32 $0, $2,": ([16], [8], 4), "lop3.b32 e,": ([16, 16], [8, 8], 4), "cvt.f32.f16": ([32], [16], 1),
               "%ctaid.x": ([32], [32], 1)}


def llvm_registers(types: str) -> list[tuple[int, int]]:
    """``(bits an element, elements)`` of each register in LLVM IR types (``{ <2 x i16>, <2 x i16> }``, ``i32 3``)."""
    bits = {"half": 16, "float": 32}
    return [(bits.get(element) or int(element[1:]), int(count or 1))
            for count, element in re.findall(r"(?:<(\d+) x )?\b(i\d+|half|float)\b", types)]


def test_inline_ptx_operands_reach_the_registers_the_ptx_model_gives():
    """The PTX model that runs the kernels' inline assembly in the interpreter (tests/ptx_model.py) packs each
    operand's elements into registers as the real compiler does: in the LLVM IR of each helper of the decode kernel
    for sm_90, register ``k`` holds as many elements of as many bits as the model gives it (outputs first, each
    operand's registers in turn; ``tests/ptx_kernels.py``, the kernels the helpers' test runs)."""
    code = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tests.ptx_kernels import HELPERS_SIGNATURE, helpers, part_indices
for kernel, signature in ((helpers, HELPERS_SIGNATURE), (part_indices, dict(out_ptr="*i32"))):
    source = ASTSource(fn=kernel, signature=signature, constexprs=dict(ASM=True))
    print(triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["llir"])
"""
    llir = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=compiler_env(), check=True, capture_output=True,
                          text=True).stdout
    calls = re.findall(r'call (.+?) asm (?:sideeffect )?"(.*?)", "(.*?)"\((.*?)\)', llir)
    for part, (out_bits, in_bits, pack) in PTX_HELPERS.items():
        found = [(ret, constraints, args) for ret, asm, constraints, args in calls if part in asm]
        assert found, part
        for ret, constraints, args in found:
            expected = [(bits, per_register) for _, _, bits, per_register, count in
                        register_slots(constraints, out_bits + in_bits, len(out_bits), pack) for _ in range(count)]
            assert llvm_registers(ret) + llvm_registers(args) == expected, (part, ret, args)
