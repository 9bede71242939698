"""csrc's CPU sources compile for aarch64 (a Jetson's CPU) with Debian's cross compiler.

Object files only (-c), in a temporary folder. What this shows is that no CPU source needs x86:
the AVX2/F16C paths sit behind `__x86_64__`, with a portable path beside them that aarch64
builds (mask_pool's GCC vectors become NEON). Nothing here runs the code on an ARM core.
`make test` installs the compiler where it can (`make aarch64-compiler`); elsewhere this skips.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CXX = "aarch64-linux-gnu-g++"

# The flags the _C target's C++ sources get in a Release build (CMakeLists.txt, pybind11 and
# CMAKE_CXX_FLAGS_RELEASE, as build.ninja shows them), less pybind11's -flto=auto
# -fno-fat-lto-objects: with those, -c writes GIMPLE and no aarch64 code would be generated.
FLAGS = [
    "-O3", "-DNDEBUG", "-fPIC", "-fvisibility=hidden",
    "-Wall", "-Wextra", "-Wno-unused-parameter", "-std=gnu++17",
    f"-I{ROOT / 'csrc'}",
]  # fmt: skip
# The defines of a Jetson Orin build: CUDA kernels on, for sm_87 (CMAKE_CUDA_ARCHITECTURES=87).
JETSON_DEFINES = [
    '-DRGPT_VERSION="0.1.0"',
    '-DRGPT_CXX_COMPILER="GNU cross"',
    "-DRGPT_WITH_CUDA=1",
    '-DRGPT_CUDA_COMPILER="NVIDIA"',
    '-DRGPT_CUDA_ARCHITECTURES="87-real"',
]
# The pybind11 glue: these include Python.h, whose pyconfig.h differs per architecture.
PYTHON_GLUE = {"csrc/bindings.cpp", "csrc/build_info.cpp"}
EM_AARCH64 = 183  # ELF e_machine

pytestmark = pytest.mark.skipif(
    shutil.which(CXX) is None,
    reason=f"{CXX} is not on PATH: `make aarch64-compiler` installs it "
    "(apt-get install g++-aarch64-linux-gnu) where it can",
)


def cpu_sources() -> list[str]:
    """What CMakeLists.txt compiles as C++: csrc/*.cpp and csrc/*/*.cpp (not the .cu files)."""
    found = sorted(ROOT.glob("csrc/*.cpp")) + sorted(ROOT.glob("csrc/*/*.cpp"))
    return [str(path.relative_to(ROOT)) for path in found]


def compile_all(sources: list[str], out: Path, extra: list[str]) -> dict[str, str]:
    """Compiles each source to an object in `out`, two at a time; {source: error} for failures."""

    def one(source: str) -> tuple[str, str | None]:
        obj = out / (source.replace("/", "_") + ".o")
        command = [CXX, *FLAGS, *JETSON_DEFINES, *extra, "-c", str(ROOT / source), "-o", str(obj)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            return source, result.stderr[-3000:]
        machine = int.from_bytes(obj.read_bytes()[18:20], "little")  # e_machine, little endian
        if machine != EM_AARCH64:
            return source, f"{obj.name} is for ELF machine {machine}, not aarch64 ({EM_AARCH64})"
        return source, None

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(one, sources))
    return {source: error for source, error in results if error is not None}


def aarch64_python_includes() -> list[str]:
    """-isystem flags for pybind11 and an aarch64 Python.h; skips, saying what is missing."""
    try:
        import pybind11
    except ImportError:
        pytest.skip("pybind11 is not installed: the pybind11 glue cannot be compiled")
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    # Debian's multiarch layout: /usr/include/pythonX.Y/pyconfig.h includes
    # <aarch64-linux-gnu/pythonX.Y/pyconfig.h>, which the cross compiler finds in /usr/include.
    flags = ["-isystem", f"/usr/include/{version}", "-isystem", pybind11.get_include()]
    probe = subprocess.run(
        [CXX, *flags, "-x", "c++", "-M", "-"],
        input="#include <Python.h>\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    if probe.returncode != 0 or f"aarch64-linux-gnu/{version}/pyconfig.h" not in probe.stdout:
        pytest.skip(
            f"no aarch64 Python headers (aarch64-linux-gnu/{version}/pyconfig.h, Debian's "
            f"lib{version}-dev:arm64, or a folder holding it in CPLUS_INCLUDE_PATH): "
            f"{', '.join(sorted(PYTHON_GLUE))} not compiled"
        )
    return flags


@pytest.mark.slow  # five compiles, two at a time: 4-6 s on 2 busy cores
def test_cpu_kernels_compile_for_aarch64(tmp_path):
    kernels = [source for source in cpu_sources() if source not in PYTHON_GLUE]
    # the kernel families, and no pybind11 among them: kernels see pointers, not Python
    assert {"csrc/int4/int4_cpu.cpp", "csrc/mask_pool/mask_pool_cpu.cpp"} <= set(kernels)
    failures = compile_all(kernels, tmp_path, [])
    assert not failures, "\n\n".join(f"{source}:\n{error}" for source, error in failures.items())


@pytest.mark.slow  # pybind11 is heavy: 8-15 s on 2 busy cores
def test_pybind11_glue_compiles_for_aarch64(tmp_path):
    glue = [source for source in cpu_sources() if source in PYTHON_GLUE]
    assert sorted(glue) == sorted(PYTHON_GLUE), "a glue source was moved or renamed"
    failures = compile_all(glue, tmp_path, aarch64_python_includes())
    assert not failures, "\n\n".join(f"{source}:\n{error}" for source, error in failures.items())
