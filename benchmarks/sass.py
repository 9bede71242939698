"""Static check of the INT4 GEMV and GEMM kernels: registers and SASS instructions per weight of
the main loop (group size 128), per kernel and architecture, old (layout nk8i) beside new (layout
n16k64): the GEMVs at M = 1, the GEMM at M = 16 and 64. No GPU.

    python benchmarks/sass.py                  # the built rgpt_rt._C
    python benchmarks/sass.py --compile        # compile csrc/int4/*.cu here with nvcc instead
    python benchmarks/sass.py --arch sm_87,sm_90 --json FILE

How it counts: cuobjdump disassembles each kernel; a loop is a backward branch and the
instructions from its target to it (inclusive; NOPs counted). The main loop is the loop holding
the most of the kernel's "weight marks", and the weights it consumes per iteration (per thread)
come from those marks: the nk8i kernel unpacks every pair of codes with one AND of 0x000F000F
(2 weights each), the n16k64 GEMV feeds every 16×16 tile to one HMMA (8 weights per thread), the
GEMM to MB HMMAs, one per 8 rows of x (8 / MB weights per HMMA and thread).
instructions per weight = loop instructions / weights per iteration (for the GEMM: per weight and
block, each weight serving 8·MB rows of x; its HMMA share is printed beside). Registers and stack bytes
come from `cuobjdump -res-usage`. Target (issue 23): ≤ 3.5 instructions per weight, ≤ 64 registers.

cuobjdump and nvdisasm are found on PATH, in the CUDA toolkit, or in the pip packages
nvidia-cuda-cuobjdump and nvidia-cuda-nvdisasm.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [
    "csrc/int4/int4_cuda.cu",
    "csrc/int4/int4_n16k64_cuda.cu",
    "csrc/int4/int4_n16k64_gemm_cuda.cu",
]
# the flags CMakeLists.txt gives nvcc
NVCC_FLAGS = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr", "-std=c++17"]


@dataclass(frozen=True)
class Kernel:
    """An M = 1 GEMV kernel: how to find it (demangled name) and how to count its weights."""

    name: str  # what the table prints
    layout: str
    dtype: str
    pattern: str  # regex on the demangled name
    mark: str  # regex on one SASS instruction: a weight mark
    weights_per_mark: float


NK8I_MARK = r"^LOP3\.LUT\b.*\b0xf000f\b"  # (word >> 4i) & 0x000F000F: one pair of codes
MMA_MARK = r"^HMMA\.16816"  # one 16×16 tile of weights: 8 per thread
KERNELS = [  # the variants int4_linear runs for group size 128
    Kernel("int4_gemv (nk8i)", "nk8i", "fp16", r"int4_gemv_kernel<__half, 1>", NK8I_MARK, 2),
    Kernel("int4_gemv (nk8i)", "nk8i", "bf16", r"int4_gemv_kernel<__nv_bfloat16, 1>", NK8I_MARK, 2),
    Kernel("gemv_n16k64", "n16k64", "fp16", r"gemv_n16k64_kernel<__half, true, 2, 1>", MMA_MARK, 8),
    Kernel(
        "gemv_n16k64",
        "n16k64",
        "bf16",
        r"gemv_n16k64_kernel<__nv_bfloat16, true, 2, 1>",
        MMA_MARK,
        8,
    ),
    # the GEMM (2-step stages for G = 128): MB = 2 at M ≤ 16, MB = 8 at M = 64
    Kernel(
        "gemm_n16k64 M=16", "n16k64", "fp16", r"gemm_n16k64_kernel<__half, 2, 2, 1>", MMA_MARK, 4
    ),
    Kernel(
        "gemm_n16k64 M=64", "n16k64", "fp16", r"gemm_n16k64_kernel<__half, 8, 2, 1>", MMA_MARK, 1
    ),
    Kernel(
        "gemm_n16k64 M=16",
        "n16k64",
        "bf16",
        r"gemm_n16k64_kernel<__nv_bfloat16, 2, 2, 1>",
        MMA_MARK,
        4,
    ),
    Kernel(
        "gemm_n16k64 M=64",
        "n16k64",
        "bf16",
        r"gemm_n16k64_kernel<__nv_bfloat16, 8, 2, 1>",
        MMA_MARK,
        1,
    ),
]


@dataclass
class LoopCount:
    kernel: str
    layout: str
    dtype: str
    arch: str
    registers: int | None
    stack_bytes: int | None
    loop_instructions: int | None
    weights_per_iteration: int | None
    instructions_per_weight: float | None
    mmas: int | None = None  # HMMAs per iteration
    note: str = ""


def find_tool(name: str) -> str:
    """The path of a CUDA binary tool: PATH, CUDA_HOME, /usr/local/cuda, or the pip package."""
    found = shutil.which(name)
    if found:
        return found
    candidates = [Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / name]
    for entry in sys.path:
        candidates += sorted(Path(entry).glob(f"nvidia/*/bin/{name}"))
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate)
    raise SystemExit(
        f"{name} not found: install it (pip install nvidia-cuda-{name.replace('cuobjdump', 'cuobjdump')}) "
        "or put the CUDA toolkit's bin/ on PATH"
    )


def tool_env() -> dict[str, str]:
    """cuobjdump -sass runs nvdisasm: put it on PATH wherever it was found."""
    env = dict(os.environ)
    env["PATH"] = str(Path(find_tool("nvdisasm")).parent) + os.pathsep + env.get("PATH", "")
    return env


def run(command: list[str]) -> str:
    result = subprocess.run(command, capture_output=True, text=True, env=tool_env())
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command[:3])} ... failed:\n{result.stderr.strip()[-2000:]}")
    return result.stdout


def demangle(names: list[str]) -> dict[str, str]:
    cxxfilt = shutil.which("c++filt") or shutil.which("llvm-cxxfilt")
    if cxxfilt is None:
        return {name: name for name in names}
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout
    return dict(zip(names, out.splitlines(), strict=True))


def parse_sass(text: str) -> dict[str, list[tuple[int, str]]]:
    """{mangled kernel name: [(address, instruction text without predicate guard)]}."""
    kernels: dict[str, list[tuple[int, str]]] = {}
    current = None
    for line in text.splitlines():
        header = re.match(r"\s*Function : (\S+)", line)
        if header:
            current = kernels.setdefault(header.group(1), [])
            continue
        instruction = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if instruction and current is not None:
            text_ = re.sub(r"^@!?U?P[T0-9]+\s+", "", instruction.group(2).strip())
            current.append((int(instruction.group(1), 16), text_))
    return kernels


def parse_resources(text: str) -> dict[str, tuple[int, int]]:
    """{mangled name: (registers, stack bytes)} from `cuobjdump -res-usage`."""
    usage, name = {}, None
    for line in text.splitlines():
        header = re.match(r"\s*Function (\S+):", line)
        if header:
            name = header.group(1)
            continue
        registers = re.search(r"REG:(\d+)", line)
        if registers and name is not None:
            stack = re.search(r"STACK:(\d+)", line)
            usage[name] = (int(registers.group(1)), int(stack.group(1)) if stack else 0)
            name = None
    return usage


def main_loop(instructions: list[tuple[int, str]], mark: str) -> tuple[int, int] | None:
    """(instructions, marks) of the loop holding the most marks, or None without a marked loop."""
    best = None
    for position, (address, text) in enumerate(instructions):
        branch = re.match(r"BRA\b.*?(0x[0-9a-f]+)", text)
        if not branch or int(branch.group(1), 16) >= address:
            continue
        target = int(branch.group(1), 16)
        body = [t for a, t in instructions[: position + 1] if a >= target]
        marks = sum(1 for t in body if re.search(mark, t))
        if marks and (best is None or (marks, len(body)) > (best[1], best[0])):
            best = (len(body), marks)
    return best


def count(sass: str, resources: str, arch: str) -> list[LoopCount]:
    kernels = parse_sass(sass)
    usage = parse_resources(resources)
    names = demangle(list(kernels))
    rows = []
    for kernel in KERNELS:
        matches = [m for m, d in names.items() if re.search(re.escape(kernel.pattern), d)]
        if not matches:
            rows.append(LoopCount(kernel.name, kernel.layout, kernel.dtype, arch, None, None, None,
                                  None, None, "not in this build"))  # fmt: skip
            continue
        mangled = matches[0]
        registers, stack = usage.get(mangled, (None, None))
        loop = main_loop(kernels[mangled], kernel.mark)
        if loop is None:
            rows.append(LoopCount(kernel.name, kernel.layout, kernel.dtype, arch, registers, stack,
                                  None, None, None, "no loop with weight marks found"))  # fmt: skip
            continue
        length, marks = loop
        weights = round(marks * kernel.weights_per_mark)
        rows.append(LoopCount(kernel.name, kernel.layout, kernel.dtype, arch, registers, stack,
                              length, weights, round(length / weights, 3), marks))  # fmt: skip
    return rows


def disassemble(binary: Path, arch: str) -> tuple[str, str]:
    cuobjdump = find_tool("cuobjdump")
    sass = run([cuobjdump, "-sass", "-arch", arch, str(binary)])
    resources = run([cuobjdump, "-res-usage", "-arch", arch, str(binary)])
    return sass, resources


def compile_here(arch: str, folder: Path) -> list[Path]:
    """csrc/int4/*.cu compiled for `arch` to cubins, with the build's nvcc flags."""
    nvcc = find_tool("nvcc")
    cubins = []
    for source in SOURCES:
        cubin = folder / f"{Path(source).stem}.{arch}.cubin"
        command = [nvcc, "-cubin", f"-arch={arch}", *NVCC_FLAGS, f"-I{ROOT / 'csrc'}",
                   "-DRGPT_WITH_CUDA=1", str(ROOT / source), "-o", str(cubin)]  # fmt: skip
        run(command)
        cubins.append(cubin)
    return cubins


def built_extension() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("rgpt_rt._C")
    if spec is None or spec.origin is None:
        raise SystemExit("rgpt_rt._C is not built: run `make install`, or use --compile")
    return Path(spec.origin)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--arch", default="sm_87,sm_90", help="comma-separated (default sm_87,sm_90)"
    )
    parser.add_argument("--compile", action="store_true",
                        help="compile csrc/int4/*.cu with nvcc here instead of reading rgpt_rt._C")  # fmt: skip
    parser.add_argument("--json", type=Path, default=None, help="write the counts here")
    args = parser.parse_args()
    archs = [a.strip() for a in args.arch.split(",") if a.strip()]

    rows: list[LoopCount] = []
    with tempfile.TemporaryDirectory() as scratch:
        for arch in archs:
            binaries = compile_here(arch, Path(scratch)) if args.compile else [built_extension()]
            sass, resources = "", ""
            for binary in binaries:
                text, usage = disassemble(binary, arch)
                sass, resources = sass + text, resources + usage
            rows += count(sass, resources, arch)
    source = "nvcc here (" + ", ".join(SOURCES) + ")" if args.compile else str(built_extension())

    print(
        f"# INT4 GEMV (M = 1) and GEMM main loops: SASS instructions per weight and registers\n\nfrom {source}\n"
    )
    print("| kernel | x | " + " | ".join(f"{a} instr/weight | {a} regs" for a in archs) + " |")
    print("|---|---|" + "---|---|" * len(archs))
    for kernel in KERNELS:
        cells = []
        for arch in archs:
            row = next(
                r
                for r in rows
                if r.arch == arch and (r.kernel, r.dtype) == (kernel.name, kernel.dtype)
            )
            if row.instructions_per_weight is None:
                cells += [row.note or "–", "–" if row.registers is None else str(row.registers)]
                continue
            spill = f" (+{row.stack_bytes} B stack)" if row.stack_bytes else ""
            gemm = (
                f", {row.loop_instructions / row.mmas:.1f} per HMMA" if "gemm" in row.kernel else ""
            )
            cells += [
                f"{row.instructions_per_weight:.2f} ({row.loop_instructions} / {row.weights_per_iteration}{gemm})",
                f"{row.registers}{spill}",
            ]
        print(f"| {kernel.name} | {kernel.dtype} | " + " | ".join(cells) + " |")
    print("\ntarget (issue 23, the GEMVs): ≤ 3.5 instructions per weight, ≤ 64 registers")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {"source": source, "archs": archs, "kernels": [asdict(r) for r in rows]}
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
