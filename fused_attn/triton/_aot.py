"""Ahead-of-time compilation of Triton kernels for a GPU this machine does not have.

GPU readiness is checked without a GPU: each configuration a launcher may pick is compiled for
``GPUTarget("cuda", arch, 32)``; the result must fit the chip's shared memory, spill nothing to
local memory (for attention: nothing inside a loop, i.e. no ``LDL``/``STL`` between a backward
branch and its target in the SASS) and, on sm_90, use the Hopper tensor-core instruction
(``HGMMA``) in its main loop. The SASS is printed by the ``cuobjdump`` that ships in Triton's
wheel.

Spills outside loops are allowed where a program's time is one long loop (attention: a loop over
the whole sequence): a register saved before the main loop and restored after it costs two
instructions per program, nothing per iteration. Triton 3.6 does this for the attention dK/dV
kernel at 128 keys x 32 queries (one STL before the loop, one LDL after), the configuration whose
score GEMMs are twice as wide as the clean 16-query one's (see ``attention.CONFIGS``). Not for a
GEMM tile's epilogue or a norm's row, which run once per short program: there every spill counts.
``spills`` counts every LDL/STL, ``loop_spills`` those inside a loop.

AOT compilation fails when ``TRITON_INTERPRET=1`` is set (interpreted functions have no
cache key), and the interpreter must be on for the CPU tests, so tests call ``run_isolated``,
which runs a snippet in a fresh Python without it and returns the JSON it prints last.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

from ._tuning import LAUNCH_OPTIONS

#: usable shared memory per block (opt-in maximum), bytes
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}


@dataclass
class AotResult:
    kernel: str
    arch: int
    num_warps: int
    num_stages: int
    shared: int  # bytes of shared memory the kernel needs
    registers: int  # per thread
    spills: int  # LDL/STL instructions in the SASS
    loop_spills: int  # those inside a loop body (what costs time on every iteration)
    hgmma: int  # HGMMA instructions in the SASS
    tma_loads: int  # UTMALDG (tensor-memory-accelerator copies) in the SASS
    vector_loads: int  # ld.global.v4 / v8 in the PTX (16-byte loads)
    constexprs: dict

    def problems(self, require_hgmma: bool = False, spills_around_loops_ok: bool = False) -> list[str]:
        """What is wrong with this compiled kernel (empty = ready for the GPU). Any spill is a
        problem unless ``spills_around_loops_ok`` (kernels whose programs spend their time in one
        long loop, such as attention's: then only spills inside a loop are)."""
        out = []
        if self.shared > SHARED_LIMIT[self.arch]:
            out.append(f"needs {self.shared} B of shared memory, sm_{self.arch} has {SHARED_LIMIT[self.arch]}")
        if self.loop_spills:
            out.append(f"{self.loop_spills} local-memory spill instructions (LDL/STL) inside loops "
                       f"({self.spills} in all)")
        elif self.spills and not spills_around_loops_ok:
            out.append(f"{self.spills} local-memory spill instructions (LDL/STL)")
        if require_hgmma and self.arch >= 90 and not self.hgmma:
            out.append("no HGMMA (wgmma) instruction on sm_90")
        return out

    def to_dict(self):
        return asdict(self)


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def loop_spill_count(sass: str) -> int:
    """LDL/STL instructions inside loop bodies: the address ranges [target, branch] of every
    backward branch (``BRA`` to a lower address; Triton's loops end in one), nested ones included."""
    instrs = [(int(m.group(1), 16), m.group(2)) for m in _SASS_LINE.finditer(sass)]
    loops = []
    for addr, text in instrs:
        branch = re.search(r"\bBRA\s+(?:`\(\S+\)\s*)?0x([0-9a-f]+)", text)
        if branch and int(branch.group(1), 16) < addr:
            loops.append((int(branch.group(1), 16), addr))
    return sum(1 for addr, text in instrs if re.search(r"\b(?:LDL|STL)\b", text)
               and any(lo <= addr <= hi for lo, hi in loops))


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def aot_compile(fn, signature: dict, constexprs: dict, *, arch: int = 90, num_warps: int = 4,
                num_stages: int = 3, divisible_by_16: tuple = ()) -> AotResult:
    """Compile ``fn`` (a @triton.jit function) for sm_``arch`` and inspect the result.

    ``signature`` maps every runtime argument to its Triton type ("*fp16", "i32", "fp32", ...);
    ``constexprs`` gives the tl.constexpr values (they are added to the signature as "constexpr").
    ``divisible_by_16`` names the arguments to compile as a launch would see them when they are
    16-byte aligned pointers / integers divisible by 16 (Triton's specialisation, which is what
    lets it emit 16-byte vector loads).
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = dict(signature)
    for name in constexprs:
        sig[name] = "constexpr"
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible_by_16}
    src = ASTSource(fn=fn, signature=sig, constexprs=dict(constexprs), attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages, **LAUNCH_OPTIONS})
    ptx = compiled.asm["ptx"]
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", res)
    return AotResult(
        kernel=fn.__name__, arch=arch, num_warps=num_warps, num_stages=num_stages,
        shared=int(compiled.metadata.shared), registers=int(regs.group(1)) if regs else -1,
        spills=len(re.findall(r"\b(?:LDL|STL)\b", sass)), loop_spills=loop_spill_count(sass),
        hgmma=len(re.findall(r"\bHGMMA\b", sass)),
        tma_loads=len(re.findall(r"\bUTMALDG\b", sass)),
        vector_loads=len(re.findall(r"ld\.global(?:\.\w+)*\.v[48]\b", ptx)),
        constexprs={k: (v if isinstance(v, (int, float, bool, str)) else str(v)) for k, v in constexprs.items()},
    )


def run_isolated(code: str, timeout: float = 600) -> object:
    """Run ``code`` in a fresh interpreter without TRITON_INTERPRET; return the JSON of its last line."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"AOT subprocess failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
