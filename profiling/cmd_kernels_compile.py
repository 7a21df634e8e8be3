"""Compile every Triton kernel for a GPU this machine need not have, and read registers, shared memory and spills.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` runs the real compiler (the interpreter
accepts code it rejects) down to a cubin; the ``cuobjdump`` inside the Triton wheel reads its resource usage. Each
kernel is compiled at the constexprs and launch options its launcher uses (``launch_config``) for the model shapes
below, with every pointer marked 16-byte aligned, as Triton's launcher marks the tensors the launchers pass (without
the mark the compiler assumes less alignment, vectorises fewer loads and allocates registers differently from the
code a GPU runs); a kernel fails the check if it spills (local memory or a stack frame) or needs more shared memory
per program than the architecture allows.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import inspect
import itertools
import json
import multiprocessing
import os
import re
import subprocess
import tempfile
from pathlib import Path

HELP = "compile the Triton kernels for sm_ARCH on any machine; report registers, shared memory, spills"

# (label, head dim, query heads per KV head, preset): the embedded model, Llama-3.1-8B and a head dim of 256. The
# paper preset sketches by 4 x head dim in its first layers (512 at 128, 1024 at 256). Presets with outlier channels
# are compiled both ways, sketched and exact (``exact_outliers``), whichever the preset chooses.
SHAPES = [("smollm2", 64, 3, "3bit"), ("smollm2", 64, 3, "paper"), ("llama8b", 128, 4, "3bit"),
          ("llama8b", 128, 4, "paper"), ("hd256", 256, 2, "3bit"), ("hd256", 256, 2, "paper")]
# Every kernel at each head dim, sketches 128 to 512, outliers (64 to 256 sketch, or exact) and centred keys.
QUICK_SHAPES = [("smollm2", 64, 3, "3bit"), ("llama8b", 128, 4, "paper"), ("hd256", 256, 2, "3bit")]

# Shared memory one program may use (opt-in maximum per block), bytes.
SHARED_LIMITS = {80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024}

# Pointer and scalar types of each kernel's runtime arguments, as the launchers pass them for a bf16 model.
POINTERS = {
    "quantize_keys": dict(keys_ptr="*bf16", mean_ptr="*fp32", idx_ptr="*u8", s_ptr="*fp32", so_ptr="*fp32",
                          signs_ptr="*u8", norms_ptr="*fp16", osigns_ptr="*u8", onorms_ptr="*fp16",
                          oresiduals_ptr="*fp16", n_tokens="i32", keys_head_stride="i32", scale="fp32"),
    "quantize_values": dict(values_ptr="*bf16", packed_ptr="*u8", scales_ptr="*fp16", mins_ptr="*fp16",
                            n_rows="i32", tokens_per_head="i32", head_stride="i32"),
    "scores": dict(q_ptr="*fp32", s_ptr="*fp32", so_ptr="*fp32", mean_ptr="*bf16", signs_ptr="*u8",
                   norms_ptr="*fp16", idx_ptr="*u8", osigns_ptr="*u8", onorms_ptr="*fp16", oresiduals_ptr="*fp16",
                   proj_ptr="*fp32", out_ptr="*fp32", n_tokens="i32", n_groups="i32", tokens_per_program="i32",
                   scale="fp32", oscale="fp32"),
    "decode_project": dict(q_ptr="*bf16", s_hi_ptr="*fp16", s_lo_ptr="*fp16", tables_ptr="*i8", scales_ptr="*fp32",
                           sums_ptr="*fp32", work_ptr="*fp32", arrivals_ptr="*i32"),
    "decode_split": dict(q_ptr="*bf16", tables_ptr="*i8", table_scales_ptr="*fp32", table_sums_ptr="*fp32",
                         sp_ptr="*i8", sp_scales_ptr="*fp32", sp_sums_ptr="*fp32", spo_ptr="*i8",
                         spo_scales_ptr="*fp32", spo_sums_ptr="*fp32", mean_ptr="*bf16",
                         signs_ptr="*u8", norms_ptr="*fp16", idx_ptr="*u8",
                         osigns_ptr="*u8", onorms_ptr="*fp16", oresiduals_ptr="*fp16", vpacked_ptr="*u8",
                         vscales_ptr="*fp16", vmins_ptr="*fp16", sink_k_ptr="*bf16", sink_v_ptr="*bf16",
                         buf_k_ptr="*bf16", buf_v_ptr="*bf16", part_m_ptr="*fp32", part_l_ptr="*fp32",
                         part_acc_ptr="*fp32", n_tokens="i32", n_groups="i32", tokens_per_split="i32", n_sink="i32",
                         n_buffer="i32", scale="fp32", oscale="fp32", qk_scale="fp32",
                         exact_programs="i32", exact_per_program="i32"),
    "combine_splits": dict(part_m_ptr="*fp32", part_l_ptr="*fp32", part_acc_ptr="*fp32", out_ptr="*bf16",
                           n_splits="i32"),
}
# The arguments in the model's dtype, fp32 where a launch is for an fp32 model (``PRECISE``).
FP32_MODEL_POINTERS = ("q_ptr", "mean_ptr", "sink_k_ptr", "sink_v_ptr", "buf_k_ptr", "buf_v_ptr")
# launch options a launch_config may set, not constexprs (``kernels.common.COMPILER_OPTIONS`` among them)
LAUNCH_OPTIONS = ("num_warps", "num_stages", "maxnreg", "enable_fp_fusion")
# Integer arguments that are multiples of 16 at the usual launches, which Triton specializes on (it compiles such a
# launch apart): the decode kernel's token count (whole groups of 32 tokens are compressed), tokens per split (a
# multiple of its tile) and exact tokens a program (always whole tiles). Each such kernel is compiled both ways.
LAUNCH_MULTIPLES_OF_16 = {"decode_split": ("n_tokens", "tokens_per_split", "exact_per_program")}


def add_arguments(parser):
    parser.add_argument("--arch", type=int, action="append", help="compute capability, e.g. 90 (H100) or 80 "
                        "(A100); repeat for several (default: 90)")
    parser.add_argument("--out", type=Path, default=Path("profiling/results/kernels-compile"),
                        help="directory for results.json")
    parser.add_argument("--quick", action="store_true", help="a representative subset: head dims 64, 128 and 256")
    parser.add_argument("--only", action="append", help="compile only this kernel (repeatable)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="compile in this many processes (default: one per CPU)")


def launch_configs(shapes) -> list[tuple[str, str, dict]]:
    """(kernel, label, constexprs incl. num_warps) for every distinct configuration the launchers would compile."""
    from kernels import KERNELS
    from kernels import combine_splits as merge
    from qjl.config import QJLConfig

    seen, configs = set(), []
    for label, d, group, preset in shapes:
        c = QJLConfig.preset(preset, head_dim=d)
        variants = [c, dataclasses.replace(c, exact_outliers=not c.exact_outliers)] if c.n_outliers else [c]
        for c, sketch in itertools.product(variants, sorted({c.sketch_dim, c.layer_sketch_dim(0)})):
            k, outlier, exact = c.n_outliers, c.outlier_sketch_dim, c.exact_outliers
            wanted = [
                ("quantize_keys", (d, sketch, outlier, k, exact)),
                ("quantize_values", (d, c.value_bits, c.value_group_size)),
                ("scores", (group, d, sketch, outlier, k, c.group_size, c.center_keys, exact)),
                # the merge's launches: the most splits at full columns, and the most it takes at once
                ("combine_splits", (d, merge.BLOCK_ELEMENTS // merge.BLOCK_COLUMNS)),
                ("combine_splits", (d, merge.MAX_BLOCK_SPLITS)),
            ]
            for precise in (False, True):  # bf16 or fp16 models, and fp32 ones (more limbs, high and low parts)
                decode = (group, d, sketch, outlier, k, c.group_size, c.center_keys, c.value_bits, c.value_group_size,
                          exact, precise)
                # a decode program's queries are what it projects, and its padded rows what it combines
                split = KERNELS["decode_split"][1](*decode)
                queries, padded = split["QUERIES"], split["M"]
                wanted += [("decode_project", (queries, d, sketch, precise)), ("decode_split", decode)]
            for kernel, args in wanted:
                config = KERNELS[kernel][1](*args)
                if kernel == "combine_splits":
                    config = dict(config, M=padded, ROWS=queries)
                key = (kernel, tuple(sorted(config.items())))
                if key not in seen:
                    seen.add(key)
                    outliers = ("/exact" if exact else "/sketched") if k else ""
                    fp32 = "/fp32" if config.get("PRECISE") or config.get("LIMBS") == 3 else ""
                    configs.append((kernel, f"{label}/{preset}{outliers}/sketch{sketch}{fp32}", config))
    return configs


def cubin_tool(tool: str, cubin: bytes, *flags: str) -> str:
    """The output of ``TOOL FLAGS`` on a cubin (``cuobjdump -res-usage``, ``nvdisasm -gi -c``), with the binary
    inside the Triton wheel."""
    import triton

    binary = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(binary), *flags, f.name], capture_output=True, text=True, check=True).stdout


def resource_usage(cubin: bytes) -> dict:
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", cubin_tool("cuobjdump", cubin, "-res-usage")))
    return {name: int(value) for name, value in fields.items()}


def compile_for(fn, pointers: dict, config: dict, arch: int, multiples_of_16: tuple = ()):
    """``triton.compile`` of ``fn`` for sm_``arch`` at ``config`` (constexprs and launch options), every pointer
    marked 16-byte aligned, and the integer arguments ``multiples_of_16`` marked so (Triton specializes a launch on
    that)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    options = {name: config[name] for name in LAUNCH_OPTIONS if name in config}
    # A constexpr left out takes what a launch gives it (``triton.compile`` would take None): its default, but
    # ``PDL`` as the launchers set it, programmatic launches from sm_90 on (kernels.common); one with no default is an
    # error here, not a silently different kernel.
    constexprs = {param.name: param.default for param in fn.params if param.is_constexpr}
    if "PDL" in constexprs:
        constexprs["PDL"] = arch >= 90
    constexprs.update((name, value) for name, value in config.items() if name not in LAUNCH_OPTIONS)
    missing = sorted(name for name, value in constexprs.items() if value is inspect.Parameter.empty)
    if missing:
        raise ValueError(f"{fn.__name__}: no value for constexprs {missing}")
    signature = {name: pointers.get(name, "constexpr") for name in fn.arg_names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
               if signature[name][0] == "*" or name in multiples_of_16}
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=aligned),
                          target=GPUTarget("cuda", arch, 32), options=options)


def compile_kernel(kernel: str, config: dict, arch: int, multiples_of_16: tuple = ()) -> dict:
    from kernels import KERNELS
    from kernels.decode_attention import launch_specialization

    if kernel == "decode_split":  # what a launch adds for its token count: a multiple of 16 where Triton takes one
        config = {**config, **launch_specialization(16 if "n_tokens" in multiples_of_16 else 1)}

    pointers = POINTERS[kernel]
    if config.get("PRECISE"):  # an fp32 model's queries and exact tokens
        pointers = {**pointers, **{name: "*fp32" for name in FP32_MODEL_POINTERS if name in pointers}}
    compiled = compile_for(KERNELS[kernel][0], pointers, config, arch, multiples_of_16)
    usage = resource_usage(compiled.asm["cubin"])
    return dict(registers=usage.get("REG"), shared_bytes=max(compiled.metadata.shared, usage.get("SHARED", 0)),
                spill_bytes=usage.get("LOCAL", 0) + usage.get("STACK", 0))


def run(args) -> int:
    import triton

    archs = args.arch or [90]
    unknown = [arch for arch in archs if arch not in SHARED_LIMITS]
    if unknown:
        raise SystemExit(f"no shared memory limit known for sm_{unknown[0]}; known: {sorted(SHARED_LIMITS)}")
    if args.jobs < 1:
        raise SystemExit(f"--jobs must be at least 1, not {args.jobs}")
    rows = []
    for arch in archs:
        for kernel, label, config in launch_configs(QUICK_SHAPES if args.quick else SHAPES):
            if args.only and kernel not in args.only:
                continue
            variants = [()]
            if kernel in LAUNCH_MULTIPLES_OF_16:
                variants.append(LAUNCH_MULTIPLES_OF_16[kernel])
            for multiples in variants:
                shapes = label + ("/x16" if multiples else "")
                rows.append(dict(name=kernel, arch=arch, shapes=shapes, config=config,
                                 multiples_of_16=list(multiples), shared_limit=SHARED_LIMITS[arch]))
    # Each compile is single-threaded Python and LLVM, then ptxas: a process each keeps every CPU busy. Spawned,
    # not forked, so no worker inherits the threads torch may have started here.
    tasks = [(row["name"], row["config"], row["arch"], tuple(row["multiples_of_16"])) for row in rows]
    with concurrent.futures.ProcessPoolExecutor(min(args.jobs, len(tasks) or 1),
                                                mp_context=multiprocessing.get_context("spawn")) as pool:
        for row, usage in zip(rows, pool.map(compile_kernel, *zip(*tasks))):
            row.update(usage)
            print(f"sm_{row['arch']} {row['name']:15s} {row['shapes']:28s} warps={row['config'].get('num_warps', 4)} "
                  f"regs={row['registers']:3d} shared={row['shared_bytes']:6d} B spills={row['spill_bytes']} B",
                  flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(dict(triton=triton.__version__, kernels=rows), indent=1))
    spilling = [r for r in rows if r["spill_bytes"]]
    over = [r for r in rows if r["shared_bytes"] > r["shared_limit"]]
    print(f"{len(rows)} kernels compiled, {len(spilling)} spill, {len(over)} over the shared memory limit; wrote "
          f"{args.out / 'results.json'}")
    return 1 if spilling or over else 0
