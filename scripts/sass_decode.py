"""The fused decode kernel's main loop in real GPU code, read on any machine: what changes to the kernel do to it when
no GPU is at hand to time them.

Compiles ``kernels.decode_attention`` for sm_ARCH (``triton.compile``, pointers 16-byte aligned as the launcher's
tensors are, and the token count and tokens per split multiples of 16 as at the benchmark's contexts, where whole
groups of 32 tokens are compressed: Triton specializes a launch on both) at the launch configuration of each shape,
disassembles the cubin (the ``nvdisasm`` inside the Triton wheel) and counts the instructions of its longest loop, the
loop over 32-token tiles: all of them, the barriers, the shared-memory and shuffle instructions, the tensor-core
products, the plain global loads, and how many groups of asynchronous copies the loop's wait leaves in flight (0: each
tile waits for memory); and the registers, which set how many programs share a multiprocessor. With earlier kernels
beside it (``bash scripts/decode_baseline.sh COMMIT``, once per commit) it does the same for each.

Counts are a proxy: the kernel is bound by instruction issue and latency, not bandwidth, on the H100 and H200
(``profiling/results``), but only a GPU says what a change is worth.

With ``--lines N`` it also prints the N source lines behind most of the loop's instructions (the disassembler's line
information): where a change would pay.

    python scripts/sass_decode.py [--arch 90] [--shapes llama8b/3bit/exact/sketch256 ...] [--lines N] [--json OUT]
        [--tuning num_stages=3 ...]
"""

import argparse
import collections
import importlib
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from profiling.cmd_kernels_compile import (  # noqa: E402
    LAUNCH_MULTIPLES_OF_16,
    POINTERS,
    SHAPES,
    compile_for,
    cubin_tool,
    launch_configs,
    resource_usage,
)

DEFAULT_SHAPES = ["llama8b/3bit/exact/sketch256", "llama8b/3bit/sketched/sketch256", "smollm2/3bit/exact/sketch128"]
SHARED_OR_SHUFFLE = {"LDS", "STS", "LDSM", "STSM", "SHFL", "BAR"}
# Kernels up to e843268 read the projections and the sketch's rows as fp16 high and low parts, not int8 limbs.
FP16_TABLES = dict(tables_ptr="*fp16", sp_hi_ptr="*fp16", sp_lo_ptr="*fp16", spo_hi_ptr="*fp16", spo_lo_ptr="*fp16")
# Kernels before 289b49f read the exact outlier channels' values, not residuals.
OUTLIER_VALUES = dict(ovalues_ptr="*fp16")


def disassemble(cubin: bytes) -> list[tuple[int, str, str | None]]:
    """(address, instruction, ``path:line`` of the source it came from) of every instruction of ``cubin``, by the
    ``nvdisasm`` inside the Triton wheel (with line information; branch targets as addresses)."""
    text = cubin_tool("nvdisasm", cubin, "-gi", "-c")
    rows, labels, pending, where = [], {}, [], None
    for line in text.splitlines():
        if m := re.match(r"\s*(\.L_x_\d+):", line):
            pending.append(m.group(1))
        elif m := re.search(r'//## File "([^"]+)", line (\d+)', line):
            where = f"{m.group(1)}:{m.group(2)}"
        elif m := re.match(r"\s+/\*([0-9a-f]{4,5})\*/\s+(.*?);", line):
            address = int(m.group(1), 16)
            labels.update((label, address) for label in pending)
            pending = []
            rows.append((address, m.group(2).strip(), where))
    return [(address, re.sub(r"`\((\.L_x_\d+)\)", lambda m: hex(labels[m.group(1)]), text), where)
            for address, text, where in rows]


def loop_body(instructions: list[tuple[int, str, str | None]]) -> list[tuple[int, str, str | None]]:
    """The instructions (address, text with predicates stripped, source line) of the tile loop: the longest backward
    branch's body with int8 tensor-core products (the sign products; the sink and buffer tokens' loops have none and
    can be as long), or the longest for kernels without them."""
    loops = [(int(m.group(1), 16), address) for address, text, _ in instructions
             if (m := re.search(r"BRA 0x([0-9a-f]+)", text)) and int(m.group(1), 16) < address]

    def int8_products_and_length(loop):
        start, end = loop
        return any("IMMA" in text for address, text, _ in instructions if start <= address <= end), end - start

    start, end = max(loops, key=int8_products_and_length)
    return [(address, re.sub(r"^@!?U?P\w+\s+", "", text), where) for address, text, where in instructions
            if start <= address <= end]


def common_path(body: list[tuple[int, str, str | None]]) -> list[tuple[int, str, str | None]]:
    """``body`` less what its forward branches skip: the rescale of the accumulators, which runs only in a tile where
    some query's max grows (rarely, once the maxima settle)."""
    skipped = [(address, int(m.group(1), 16)) for address, text, _ in body
               if (m := re.match(r"BRA 0x([0-9a-f]+)", text)) and address < int(m.group(1), 16) <= body[-1][0]]
    return [row for row in body if not any(branch < row[0] < target for branch, target in skipped)]


def source_lines(body: list[tuple[int, str, str | None]], top: int) -> list[tuple[int, str, str]]:
    """The ``top`` source lines with the most of ``body``'s instructions: (count, ``file:line``, the line's text)."""
    lines = []
    for where, n in collections.Counter(where for _, _, where in body).most_common(top):
        path, number = where.rsplit(":", 1) if where else ("?", "0")
        text = Path(path).read_text().splitlines()[int(number) - 1].strip() if Path(path).is_file() else ""
        lines.append((n, f"{Path(path).name}:{number}", text))
    return lines


def copies_in_flight(body: list[str]) -> int | None:
    """Asynchronous copy groups the loop's wait leaves in flight (``DEPBAR.LE SB0, n``): 0 when a tile waits for
    every copy issued, its own included, so for memory; None without copies."""
    waits = [int(m.group(1), 16) for text in body if (m := re.match(r"DEPBAR\.LE SB0, 0x([0-9a-f]+)", text))]
    return min(waits) if waits else None


def baseline_modules() -> dict:
    """The decode kernels put beside the current one (``scripts/decode_baseline.sh``), by the commit that names
    their files."""
    return {path.stem.rsplit("_", 1)[1]: importlib.import_module(f"kernels.{path.stem}")
            for path in sorted(Path(__file__).resolve().parents[1].glob("kernels/decode_attention_baseline_*.py"))}


def count(module, config: dict, group: int, arch: int, top: int = 0, tuning: dict | None = None) -> dict:
    """Registers, stack, shared memory and main-loop counts of ``module``'s decode kernel at the launch of
    ``config``'s shapes (``group`` queries a KV head), with ``tuning``'s launch choices in place of the launcher's (as
    ``decode_attention`` takes them), and the ``top`` source lines behind most of the loop's instructions."""
    own = module.launch_config(group, config["D"], config["BYTES"] * 8, config["OBYTES"] * 8, config["K"],
                               config["GROUP"], config["CENTERED"], config["BITS"], config["VGROUP"],
                               config["EXACT"], config["PRECISE"])
    own.update(tuning or {})
    fn = module.decode_split_kernel
    pointers = {**POINTERS["decode_split"], **(FP16_TABLES if "sp_hi_ptr" in fn.arg_names else {}),
                **(OUTLIER_VALUES if "ovalues_ptr" in fn.arg_names else {})}
    compiled = compile_for(fn, pointers, own, arch, LAUNCH_MULTIPLES_OF_16["decode_split"])
    cubin = compiled.asm["cubin"]
    instructions = disassemble(cubin)
    body = loop_body(instructions)
    texts = [text for _, text, _ in body]
    ops = collections.Counter(text.split()[0].split(".")[0] for text in texts)
    usage = resource_usage(cubin)
    return dict(registers=usage["REG"], stack_bytes=usage.get("STACK", 0), shared_bytes=compiled.metadata.shared,
                instructions=sum(ops.values()), common_path=len(common_path(body)), barriers=ops["BAR"],
                shared_or_shuffle=sum(n for op, n in ops.items() if op in SHARED_OR_SHUFFLE),
                mma=ops["HMMA"] + ops["IMMA"], global_loads=ops["LDG"], stack_in_loop=ops["LDL"] + ops["STL"],
                copies_in_flight=copies_in_flight(texts), source_lines=source_lines(body, top))


def main():
    import triton

    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--tuning", nargs="+", default=[], metavar="NAME=INT",
                        help="launch choices in place of the launcher's, e.g. num_stages=3 maxnreg=200 (as "
                        "scripts/sweep_decode.py's rows)")
    parser.add_argument("--lines", type=int, default=0, help="also print the N source lines with the most of the "
                        "loop's instructions")
    args = parser.parse_args()
    tuning = {name: int(value) for name, value in (item.split("=", 1) for item in args.tuning)}
    configs = {label: config for kernel, label, config in launch_configs(SHAPES) if kernel == "decode_split"}
    groups = {name: group for name, _, group, _ in SHAPES}
    unknown = sorted(set(args.shapes) - set(configs))
    if unknown:
        raise SystemExit(f"unknown shapes {unknown}; known: {sorted(configs)}")
    modules = {"current": importlib.import_module("kernels.decode_attention"), **baseline_modules()}
    rows = []
    for label in args.shapes:
        for name, module in modules.items():
            row = dict(kernel=name, shapes=label, arch=args.arch, triton=triton.__version__, tuning=tuning,
                       **count(module, configs[label], groups[label.split("/")[0]], args.arch, args.lines, tuning))
            rows.append(row)
            print(f"{name:8s} {label:32s} sm_{args.arch} triton {row['triton']} {tuning or ''}: "
                  f"{row['registers']} registers, {row['stack_bytes']} bytes of stack, {row['shared_bytes']} bytes "
                  f"of shared memory, main loop "
                  f"{row['instructions']} instructions ({row['common_path']} in a tile where no max grows), "
                  f"{row['barriers']} barriers, {row['shared_or_shuffle']} shared-memory/shuffle, {row['mma']} "
                  f"tensor-core products, {row['global_loads']} global loads, {row['copies_in_flight']} copy groups in "
                  f"flight at the wait", flush=True)
            for n, where, text in row["source_lines"]:
                print(f"    {n:4d} {where:34s} {text[:100]}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
