"""Offline SASS histogram of a Triton kernel's hot loop (no GPU needed).

    python scripts/sass_count.py [CASE ...] [--launch BLOCK_N WARPS STAGES] [--full] [--loop I]
                                 [--arch 90] [--dump DIR] [--json FILE]

Compiles a kernel for an NVIDIA target with Triton's bundled ptxas (``triton.compile``
on an ``ASTSource`` with the specialization the JIT would compute from real arguments),
disassembles it, finds the loops (backward branches) and prints an opcode histogram of
one: by default the shortest of those over 50 instructions, which for the paged kernels
is the unmasked loop that carries the bulk of the keys (their three key stages compile to
three loops in SASS order: masked window edge, unmasked, masked causal edge; ``--loop I``
picks one by index, ``-1`` the largest). Counts are per loop iteration and, normalised, warp instructions per 1k KV
elements (the K and V codes of one iteration: ``2 * BLOCK_N * head_dim``, all warps), with
registers / local memory from ``cuobjdump -res-usage`` and a rough per-pipe cycle
estimate for Hopper (which pipe bounds elements per clock per SM at full issue).

CASEs are paged decode launches, GQA 32/8, head_dim 128, pages of 16, bf16 queries:
``engine-bf16`` (``kernels/paged_attention.py``), ``kq-bf16`` (bf16 pages through
``kernels/kv_attention.py``), ``int8`` / ``int4`` / ``fp8`` (kv_attention's fp16-code kernel), with
suffixes ``-generic`` (the dequantizing kernel), ``-noasm`` (portable conversions instead
of inline PTX), ``-defer`` (deferred row sums), ``-kivi`` (per-channel keys, generic
kernel). The launch arguments come from calling the real host wrapper on small CPU
tensors with the kernels swapped for a recorder, so the specialization (divisibility,
stride-1 constexprs) matches what a GPU run compiles, up to the Triton version: the SASS
is the installed Triton's, a proxy for another version's. To see exactly what the GPU
machine's Triton builds, put that version first on the path (no GPU needed: the wheel
carries ptxas)::

    pip download --no-deps triton==3.6.0 -d /tmp/w && unzip -q /tmp/w/triton-*.whl -d /tmp/t36
    PYTHONPATH=/tmp/t36 python scripts/sass_count.py engine-bf16 --dump /tmp/sass

The dumped TTGIR shows the software pipelining (``local_alloc <Nx...>`` buffers and the
``async_wait {num = ...}`` depth of the K/V copies).

Reusable from Python: :func:`capture_launch`, :func:`compile_kernel`, :func:`compile_sass`,
:func:`loops`, :func:`histogram`, :func:`pipe_cycles`.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import re
import sys
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("sass_count.py compiles real kernels: unset TRITON_INTERPRET")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
import triton  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Rough Hopper (sm_90) issue cost of one warp instruction, in cycles of its SM sub-partition
# (CUDA guide throughput table: 32-lane FMA pipes, 16-lane ALU/IMAD, 4-lane XU for
# conversions and transcendentals). Unlisted opcodes count 1 cycle of issue only.
PIPE_COST = {
    "fma": (1.0, ("FFMA", "FADD", "FMUL", "HFMA2", "HADD2", "HMUL2", "FMNMX", "FSEL", "FSETP")),
    "alu": (2.0, ("LOP3", "IADD3", "PRMT", "SHF", "ISETP", "SEL", "LEA", "IMNMX", "F2FP", "VIADD", "IABS",
                  "PLOP3", "LOP", "BMSK", "SGXT", "FLO", "POPC", "BREV")),
    "imad": (2.0, ("IMAD",)),
    "xu": (8.0, ("I2F", "F2F", "F2I", "MUFU", "I2I", "FRND")),
    "lsu": (1.0, ("LDG", "LDS", "LDSM", "STS", "LDGSTS", "STG", "LD", "ST", "SHFL", "ATOMS", "LDGDEPBAR")),
    "tensor": (0.0, ("HMMA", "HGMMA", "IMMA", "IGMMA", "QGMMA")),
}
_PIPE_OF = {op: pipe for pipe, (_, ops) in PIPE_COST.items() for op in ops}


# --------------------------------------------------------------------------------------
# Capture a launch from a host wrapper
# --------------------------------------------------------------------------------------


class _Recorder:
    """Stands in for a JIT kernel: ``rec[grid](*args, **kw)`` records the call."""

    def __init__(self, fn, calls: list):
        self.fn, self.calls = fn, calls

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((self.fn, args, kwargs))

        return launch


def capture_launch(call, module, names: list):
    """Run ``call()`` with ``module.<name>`` kernels (or ``(other_module, name)`` entries)
    replaced by recorders (CUDA device contexts disabled) and return the first recorded
    ``(jit_fn, args, kwargs)``."""
    from triton.runtime.jit import JITFunction

    calls: list = []
    targets = [n if isinstance(n, tuple) else (module, n) for n in names]
    saved = {(m, n): getattr(m, n) for m, n in targets}
    saved_dev = torch.cuda.device
    try:
        for (m, n), fn in saved.items():
            base = fn
            while not isinstance(base, JITFunction):  # autotuner / heuristics -> JITFunction
                base = base.fn
            setattr(m, n, _Recorder(base, calls))
        torch.cuda.device = lambda *_a, **_k: contextlib.nullcontext()
        call()
    finally:
        torch.cuda.device = saved_dev
        for (m, n), fn in saved.items():
            setattr(m, n, fn)
    if not calls:
        raise RuntimeError("the wrapper launched none of " + ", ".join(names))
    return calls[0]


# --------------------------------------------------------------------------------------
# Compile and disassemble
# --------------------------------------------------------------------------------------


def compile_kernel(fn, args, kwargs, arch: int = 90):
    """``triton.compile`` ``fn`` for ``sm_<arch>`` as the JIT would specialize it for ``args``."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = CUDABackend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, opts = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def _widen_disasm_addresses() -> None:
    """Triton <= 3.6 drops SASS instructions past byte 0xffff (4096 instructions) when it
    disassembles a cubin: its line pattern wants 4-digit addresses. Widen it (a no-op for
    later versions, which match 4 or more digits)."""
    try:
        from triton.tools import disasm
    except ImportError:  # pragma: no cover - a Triton without the helper
        return
    disasm.FLINE_RE = re.compile(r"\s*/\*\w{4,}\*/\s*([^;]*;)\s*/\* 0x(\w{16}) \*/\s*")


_widen_disasm_addresses()


def compile_sass(fn, args, kwargs, arch: int = 90) -> str:
    return compile_kernel(fn, args, kwargs, arch).asm["sass"]


def resource_usage(cubin: bytes) -> dict:
    """Registers, local memory (spills) and static shared memory, from ``cuobjdump -res-usage``."""
    import subprocess
    import tempfile

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(cubin)
        fh.flush()
        text = subprocess.run([str(tool), "-res-usage", fh.name], capture_output=True, text=True).stdout
    got = dict(re.findall(r"\b(REG|LOCAL|SHARED|STACK):(\d+)", text))
    return {"regs": int(got.get("REG", -1)), "local_bytes": int(got.get("LOCAL", -1))}


_LINE = re.compile(r"^\s*(?:[0-9a-f-]{2}:[^\s]*\s+)?(?:/\*[0-9a-f]+\*/\s*)?(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)\s*(.*?);")
_LABEL = re.compile(r"^\s*\.?(L[A-Za-z0-9_]+):")


def parse(sass: str) -> list[tuple[str, str, str]]:
    """``(label_or_empty, opcode, operands)`` per instruction, labels as pseudo-rows."""
    rows = []
    for line in sass.splitlines():
        m = _LABEL.match(line)
        if m:
            rows.append((m.group(1), "", ""))
            continue
        m = _LINE.match(line)
        if m:
            rows.append(("", m.group(2), m.group(3)))
    return rows


def loops(sass: str) -> list[list[tuple[str, str]]]:
    """Instruction lists ``[(opcode, operands)]`` of every backward-branch loop body."""
    rows = parse(sass)
    where: dict[str, int] = {}
    for i, (lab, _, _) in enumerate(rows):
        if lab:
            where[lab] = i
    out = []
    for i, (_, op, operands) in enumerate(rows):
        if op.startswith("BRA"):
            target = operands.split()[-1].strip("`()") if operands else ""
            target = target.lstrip(".")
            if target in where and where[target] < i:
                out.append([(o, a) for lab, o, a in rows[where[target]:i + 1] if not lab])
    return out


def histogram(body: list[tuple[str, str]], full: bool = False) -> collections.Counter:
    """Opcode counts (``full``: with modifiers, e.g. ``I2F.BF16.U16``)."""
    return collections.Counter(op if full else op.split(".")[0] for op, _ in body)


def pipe_cycles(hist: collections.Counter) -> dict[str, float]:
    """Cycles per SM sub-partition each pipe needs for one warp's pass over ``hist``."""
    cyc = collections.defaultdict(float)
    for op, n in hist.items():
        base = op.split(".")[0]
        pipe = _PIPE_OF.get(base)
        if pipe:
            cyc[pipe] += n * PIPE_COST[pipe][0]
        cyc["issue"] += n
    return dict(cyc)


# --------------------------------------------------------------------------------------
# Paged decode cases
# --------------------------------------------------------------------------------------

HQ, HKV, D, PAGE = 32, 8, 128, 16


def _decode_inputs(batch: int = 4, ctx: int = 256):
    nb = batch * ctx // PAGE + 1
    table = torch.arange(batch * (ctx // PAGE), dtype=torch.int32).view(batch, -1)
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32)
    cu = torch.arange(batch + 1, dtype=torch.int32)
    q = torch.zeros(batch, HQ, D, dtype=torch.bfloat16)
    return nb, table, seq_lens, cu, q


def case_launch(case: str, launch: tuple[int, int, int] | None, maxnreg: int | None = -1, **extra):
    """``(jit_fn, args, kwargs, BLOCK_N)`` of a decode launch of ``case`` (``maxnreg``: a
    register cap for kv_attention's launches, None for none, -1 for the wrapper's default)."""
    nb, table, seq_lens, cu, q = _decode_inputs()
    if case == "engine-bf16":
        from stream_attention.kernels import paged_attention as pa
        from stream_attention.kernels import split_combine

        k = torch.zeros(nb, PAGE, HKV, D, dtype=torch.bfloat16)
        lt = launch or pa.DEFAULT_LAUNCH["decode"]
        fn, args, kwargs = capture_launch(
            lambda: pa.paged_attention(q, k, k.clone(), table, seq_lens, cu, max_q_len=1, softmax_scale=D**-0.5,
                                       num_splits=2, launch=lt), pa,
            ["_paged_attn_kernel", (split_combine, "_combine_splits_kernel")])
        return fn, args, kwargs, kwargs["BLOCK_N"]
    from stream_attention.kernels import kv_attention as kq
    from stream_attention.kernels import kv_pages, split_combine

    parts = case.split("-")
    if parts[0] == "kq":
        kp = torch.zeros(nb, PAGE, HKV, D, dtype=torch.bfloat16)
        vp = kp.clone()
    elif parts[0] == "fp8":
        kp = kv_pages.Fp8Pages.empty(nb, PAGE, HKV, D)
        vp = kv_pages.Fp8Pages.empty(nb, PAGE, HKV, D)
    else:
        bits = {"int8": 8, "int4": 4}[parts[0]]
        kp = kv_pages.QuantizedPages.empty(nb, PAGE, HKV, D, bits, per_channel="kivi" in parts)
        vp = kv_pages.QuantizedPages.empty(nb, PAGE, HKV, D, bits)
    lt = launch or kq.DEFAULT_LAUNCH["decode"]
    ld = dict(zip(("BLOCK_N", "num_warps", "num_stages"), lt, strict=True))
    if maxnreg != -1:
        ld["maxnreg"] = maxnreg
    # "-generic": the dequantizing kernel (STREAM_ATTENTION_KV_FAST=0); "-noasm": the fast
    # kernel's portable conversions (STREAM_ATTENTION_KV_ASM=0); "-defer": row sums kept per
    # key column until the end (STREAM_ATTENTION_KV_DEFER_SUMS=1).
    variant = {"fast_kernel": "generic" not in parts, "inline_asm": "noasm" not in parts,
               "defer_sums": "defer" in parts}
    for p in parts:  # "-rs4": the row-split decode kernel with 4 key sub-tiles per tile
        if p.startswith("rs") and p[2:].isdigit():
            variant["row_splits"] = int(p[2:])
    fn, args, kwargs = capture_launch(
        lambda: kq.paged_attention_quantized(q, kp, vp, table, seq_lens, cu, max_q_len=1, num_splits=2,
                                             launch=ld, **variant, **extra),
        kq, ["_paged_attn_kernel", "_paged_attn_tuned_tokens", "_paged_attn_tuned_page",
             "_paged_attn_f16_kernel", "_paged_attn_f16_tuned", "_paged_attn_rowsplit_kernel",
             (split_combine, "_combine_splits_kernel")])
    return fn, args, kwargs, kwargs["BLOCK_N"]


CASES = ["engine-bf16", "kq-bf16", "int8", "int4", "fp8", "int8-noasm", "fp8-noasm", "int4-noasm", "int8-defer", "int4-defer",
         "int8-generic", "int4-generic", "int8-kivi", "int4-kivi"]


def report(case: str, launch, arch: int, full: bool, dump: str | None, loop: int | None = -2,
           maxnreg: int | None = -1) -> dict:
    fn, args, kwargs, block_n = case_launch(case, launch, maxnreg)
    ck = compile_kernel(fn, args, kwargs, arch)
    sass = ck.asm["sass"]
    if dump:
        Path(dump).mkdir(parents=True, exist_ok=True)
        stem = f"{case}-n{block_n}-w{kwargs.get('num_warps')}-s{kwargs.get('num_stages')}-r{kwargs.get('maxnreg')}"
        Path(dump, stem + ".sass").write_text(sass)
        Path(dump, stem + ".ptx").write_text(ck.asm["ptx"])
        Path(dump, stem + ".ttgir").write_text(ck.asm["ttgir"])
    bodies = loops(sass)
    if not bodies:
        raise RuntimeError(f"{case}: no loop found in the SASS")
    # The paged kernels' three key stages compile to three loops in SASS order (masked
    # window edge, unmasked, masked causal edge): the unmasked one, which carries the bulk
    # of the keys, is the shortest non-trivial loop.
    if loop == -2:
        body = min((b for b in bodies if len(b) > 50), key=len, default=max(bodies, key=len))
    else:
        body = bodies[loop] if loop is not None else max(bodies, key=len)
    hist = histogram(body, full)
    warps = kwargs.get("num_warps", 4)
    elems = 2 * block_n * kwargs.get("SUB", 1) * D  # K and V codes one iteration consumes (all sub-tiles)
    cyc = pipe_cycles(histogram(body, True))
    # Every warp runs the loop body; 4 sub-partitions share an SM's warps.
    per_sm = {p: c * warps / 4 for p, c in cyc.items()}
    bound = max(per_sm, key=per_sm.get)
    return {
        "case": case, "BLOCK_N": block_n, "num_warps": warps, "num_stages": kwargs.get("num_stages"),
        "maxnreg": kwargs.get("maxnreg"),
        "loops": [len(b) for b in bodies], "loop": loop, "instructions": len(body), "histogram": dict(hist.most_common()),
        "per_kelem": {op: round(n * warps * 1000 / elems, 2) for op, n in hist.most_common()},
        "per_kelem_total": round(len(body) * warps * 1000 / elems, 1),
        "sm_cycles_per_iter": {p: round(c, 1) for p, c in per_sm.items()},
        "bound_pipe": bound, "elems_per_sm_clk": round(elems / per_sm[bound], 2),
        **resource_usage(ck.asm["cubin"]),
        "shared_bytes": ck.metadata.shared,
    } | {"resident_ctas_per_sm": resident_ctas(resource_usage(ck.asm["cubin"])["regs"], ck.metadata.shared, warps)}


# Hopper SM limits: 64k registers (allocated per warp in units of 256), 228 KiB of shared
# memory of which 227 KiB per block plus 1 KiB reserved per resident block, 32 blocks.
_SM_REGS, _SM_SMEM, _SMEM_RESERVED, _SM_BLOCKS = 65536, 233472, 1024, 32


def resident_ctas(regs: int, shared: int, warps: int) -> int:
    """Programs of this kernel one SM holds at once (registers and shared memory; sm_90)."""
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = _SM_REGS // (per_warp * warps)
    by_smem = _SM_SMEM // (shared + _SMEM_RESERVED)
    return max(0, min(by_regs, by_smem, _SM_BLOCKS))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("cases", nargs="*", default=["engine-bf16", "int8-generic", "int8", "int4"],
                   help=f"any of {CASES}")
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--launch", type=int, nargs=3, metavar=("BLOCK_N", "WARPS", "STAGES"), default=None)
    p.add_argument("--maxnreg", type=int, default=-1,
                   help="register cap for kv_attention launches (0: none; default: the wrapper's own)")
    p.add_argument("--full", action="store_true", help="keep opcode modifiers in the histogram")
    p.add_argument("--loop", type=int, default=-2,
                   help="which loop (SASS order) to count; -1: the largest. Default: the unmasked one")
    p.add_argument("--dump", default=None, help="write SASS/PTX/TTGIR of each case here")
    p.add_argument("--json", default=None, help="write the reports as JSON here")
    args = p.parse_args()
    reports = []
    for case in args.cases:
        r = report(case, tuple(args.launch) if args.launch else None, args.arch, args.full, args.dump,
                   None if args.loop == -1 else args.loop, None if args.maxnreg == 0 else args.maxnreg)
        reports.append(r)
        cap = f", maxnreg {r['maxnreg']}" if r["maxnreg"] else ""
        print(f"\n{case}: BLOCK_N {r['BLOCK_N']}, {r['num_warps']} warps, {r['num_stages']} stages{cap}; "
              f"{r['regs']} regs, {r['local_bytes']} B local, {r['shared_bytes']} B shared "
              f"({r['resident_ctas_per_sm']} per SM); loops {r['loops']}")
        print(f"  loop {r['loop']}: {r['instructions']} instr/warp/iter = {r['per_kelem_total']} warp-instr per 1k KV "
              "elements (K+V codes); by opcode:")
        print("   " + "  ".join(f"{op} {v}" for op, v in r["per_kelem"].items()))
        print(f"  SM cycles/iter by pipe: {r['sm_cycles_per_iter']} -> {r['bound_pipe']}-bound, "
              f"{r['elems_per_sm_clk']} elem/clk/SM")
    if args.json:
        import json

        Path(args.json).write_text(json.dumps(reports, indent=1))


if __name__ == "__main__":
    main()
