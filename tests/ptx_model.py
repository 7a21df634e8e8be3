"""The PTX instructions of the kernels' inline assembly, modelled in numpy, so that Triton's interpreter (which
refuses ``tl.inline_asm_elementwise``) runs the kernels' GPU branches (``ASM``) on a CPU machine.

Semantics from the PTX ISA (``prmt``: bytes ``{b, a}`` numbered 0 to 7, a selector nibble per output byte whose msb
replicates the byte's sign; ``lop3``: the result bit is bit ``4a + 2b + c`` of the table; shifts of 32 or more clear
the register). How Triton hands the operands over is read from the LLVM IR it emits for sm_90: each output, then each
input, takes ``pack * bits / register bits`` registers in turn (``=r``/``r`` 32 bits, ``h`` 16), and a register holds
consecutive elements from its low bits up. Which elements share a register on a GPU depends on the layout, so the
model groups them in a random order: a helper whose elements leak into each other then fails its test.
"""

import contextlib

import numpy as np

REGISTER_BITS = {"r": 32, "h": 16}  # the constraints the kernels use (64-bit registers are not modelled)
WORD = np.uint64(0xFFFFFFFF)


def lop3(a, b, c, table: int):
    """Bitwise ``table(a, b, c)``: bit ``4a + 2b + c`` of ``table`` (the PTX ISA's ``F(0xF0, 0xCC, 0xAA)``)."""
    out = np.zeros_like(a)
    for index in range(8):
        if table >> index & 1:
            out |= (a if index & 4 else ~a) & (b if index & 2 else ~b) & (c if index & 1 else ~c)
    return out & WORD


def prmt(a, b, selector):
    """Default-mode ``prmt.b32``: byte ``i`` of the result is byte ``s & 7`` of ``b:a`` for nibble ``i`` of
    ``selector``, its sign replicated where ``s & 8``."""
    source = (b << np.uint64(32)) | a
    out = np.zeros_like(a)
    for i in range(4):
        s = (selector >> np.uint64(4 * i)) & np.uint64(0xF)
        byte = (source >> (np.uint64(8) * (s & np.uint64(7)))) & np.uint64(0xFF)
        byte = np.where(s & np.uint64(8), np.where(byte & np.uint64(0x80), np.uint64(0xFF), np.uint64(0)), byte)
        out |= byte << np.uint64(8 * i)
    return out


def shift(x, amount, left: bool):
    """Logical ``shl.b32``/``shr.b32``: amounts of 32 and more clear the register."""
    amount = np.minimum(amount, np.uint64(32))
    return ((x << amount) if left else (x >> amount)) & WORD


def f16_to_f32(x):
    """``cvt.f32.f16``: the fp16 number in the low 16 bits as float32 bits."""
    bits = (x & np.uint64(0xFFFF)).astype(np.uint16)
    return bits.view(np.float16).astype(np.float32).view(np.uint32).astype(np.uint64)


# the instructions the kernels' inline assembly uses, and no more
INSTRUCTIONS = {
    "shr.b32": lambda a, n: shift(a, n, left=False),
    "shl.b32": lambda a, n: shift(a, n, left=True),
    "and.b32": lambda a, b: a & b,
    "mov.b32": lambda a: a,
    "mov.u32": lambda a: a,
    "mad.lo.s32": lambda a, b, c: (a * b + c) & WORD,
    "lop3.b32": lambda a, b, c, table: lop3(a, b, c, int(table.flat[0])),
    "prmt.b32": prmt,
    "cvt.f32.f16": f16_to_f32,
}


def statements(asm: str) -> list[tuple[str, list[str]]]:
    """``(opcode, operands)`` of each instruction of ``asm`` (braces and ``.reg`` declarations dropped)."""
    out = []
    for line in asm.replace("{", ";").replace("}", ";").split(";"):
        line = line.strip()
        if not line or line.startswith(".reg"):
            continue
        opcode, _, operands = line.partition(" ")
        if opcode not in INSTRUCTIONS:
            raise NotImplementedError(f"PTX instruction {opcode!r} is not modelled (tests/ptx_model.py)")
        out.append((opcode, [o.strip() for o in operands.split(",")]))
    return out


def register_slots(constraints: str, bits: list[int], n_out: int, pack: int) -> list[tuple[int, int, int, int, int]]:
    """``(operand, first register, bits of an element, elements a register, registers)`` of each operand of an inline
    assembly of ``pack`` elements, outputs first, whose elements have ``bits`` bits."""
    kinds = constraints.split(",")
    slots, position = [], 0
    for operand, width in enumerate(bits):
        kind = kinds[position] if position < len(kinds) else "?"
        if kind.startswith("=") != (operand < n_out) or kind.lstrip("=") not in REGISTER_BITS:
            raise ValueError(f"constraint {kind!r} for operand {operand} in {constraints!r}")
        per_register = max(1, REGISTER_BITS[kind.lstrip("=")] // width)
        slots.append((operand, position, width, per_register, pack // per_register))
        position += pack // per_register
    if position != len(kinds):
        raise ValueError(f"{len(kinds)} registers in {constraints!r}, {position} for the operands")
    return slots


def execute(asm: str, constraints: str, inputs: list[np.ndarray], out_dtypes: list[np.dtype], pack: int,
            special: dict | None = None, seed: int | None = 0) -> list[np.ndarray]:
    """What ``tl.inline_asm_elementwise(asm, constraints, inputs, out_dtypes, pack=pack)`` gives on a GPU: numpy
    arrays of one shape (broadcast) in, one array an output dtype out. ``special``: the values of ``%ctaid.x`` and
    the like. ``seed``: the random order in which elements share registers (None: in order)."""
    shape = np.broadcast_shapes(*(x.shape for x in inputs))
    inputs = [np.broadcast_to(x, shape).reshape(-1) for x in inputs]
    n = int(np.prod(shape))
    if n % pack:
        raise ValueError(f"{n} elements in packs of {pack}")
    # the elements of each pack, in a random order (a GPU packs those a thread holds, by its layout)
    packs = (np.arange(n) if seed is None else np.random.default_rng(seed).permutation(n)).reshape(-1, pack)
    n_out = len(out_dtypes)
    slots = register_slots(constraints, [np.dtype(t).itemsize * 8 for t in [*out_dtypes, *(x.dtype for x in inputs)]],
                           n_out, pack)
    registers = {}
    for operand, first, bits, per_register, count in slots[n_out:]:
        raw = inputs[operand - n_out].view(f"u{bits // 8}").astype(np.uint64)[packs]  # [packs, pack]
        for r in range(count):
            value = np.zeros(len(packs), dtype=np.uint64)
            for e in range(per_register):
                value |= raw[:, r * per_register + e] << np.uint64(bits * e)
            registers[f"${first + r}"] = value
    for name, value in (special or {}).items():
        registers[name] = np.full(len(packs), value, dtype=np.uint64)

    def read(token):
        if token in registers:
            return registers[token]
        if token.startswith("%") or token.startswith("$"):
            raise ValueError(f"PTX operand {token!r} has no value")
        return np.full(len(packs), int(token, 0) & 0xFFFFFFFF, dtype=np.uint64)

    for opcode, operands in statements(asm):
        registers[operands[0]] = INSTRUCTIONS[opcode](*(read(o) for o in operands[1:]))
    outputs = []
    for operand, first, bits, per_register, count in slots[:n_out]:
        raw = np.zeros((len(packs), pack), dtype=np.uint64)
        for r in range(count):
            value = registers[f"${first + r}"]
            for e in range(per_register):
                raw[:, r * per_register + e] = (value >> np.uint64(bits * e)) & np.uint64((1 << bits) - 1)
        flat = np.zeros(n, dtype=f"u{bits // 8}")
        flat[packs] = raw.astype(f"u{bits // 8}")
        outputs.append(flat.view(out_dtypes[operand]).reshape(shape))
    return outputs


@contextlib.contextmanager
def inline_asm_in_interpreter(seed: int = 0):
    """Triton's interpreter running ``tl.inline_asm_elementwise`` by ``execute`` (the program's ids as the special
    registers) while the context lasts."""
    from triton.runtime import interpreter

    class Call:
        def __init__(self, handles):
            self.handles = handles

        def get_result(self, i):
            return self.handles[i]

    def create_inline_asm(builder, asm, constraints, values, types, is_pure, pack):
        scalar = [getattr(t, "element_ty", t) for t in types]
        special = {f"%ctaid.{axis}": builder.grid_idx[i] for i, axis in enumerate("xyz")}
        special.update({f"%nctaid.{axis}": builder.grid_dim[i] for i, axis in enumerate("xyz")})
        outputs = execute(asm, constraints, [v.data for v in values],
                          [interpreter._get_np_dtype(t) for t in scalar], pack, special, seed)
        return Call([interpreter.TensorHandle(o, t) for o, t in zip(outputs, scalar)])

    original = interpreter.InterpreterBuilder.create_inline_asm
    interpreter.InterpreterBuilder.create_inline_asm = create_inline_asm
    try:
        yield
    finally:
        interpreter.InterpreterBuilder.create_inline_asm = original

