"""Compiles the CUDA kernels with nvcc for every target architecture and checks the
ptxas resource report: no errors, no register spills. Needs nvcc only (no GPU, no torch).

    python csrc/nvcc_check.py [file.cu ...]     # default: every csrc/cuda/*.cu
    SEQREC_CUDA_ARCHS="8.0;9.0" selects the architectures (the build's default).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CUDA_DIR = Path(__file__).resolve().parent / "cuda"
DEFAULT_ARCHS = "8.0;9.0"  # A100 (sm_80) and H100/H200 (sm_90)
NVCC_FLAGS = ["-std=c++17", "-O3", "-lineinfo", "-Xptxas", "-v"]

# ptxas -v prints, per kernel: "Compiling entry function '<mangled>' for 'sm_90'" and then
# "... N bytes spill stores, M bytes spill loads" and "Used R registers ...".
_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_REGISTERS = re.compile(r"Used (\d+) registers")


def cuda_archs() -> list[str]:
    """ "8.0;9.0" -> ["80", "90"]."""
    spec = os.environ.get("SEQREC_CUDA_ARCHS", DEFAULT_ARCHS)
    return [a.strip().replace(".", "") for a in spec.replace(",", ";").split(";") if a.strip()]


def demangle(names: list[str]) -> list[str]:
    if shutil.which("cu++filt") is None:
        return names
    result = subprocess.run(["cu++filt"], input="\n".join(names), capture_output=True, text=True)
    return result.stdout.splitlines() if result.returncode == 0 else names


def compile_report(source: Path, arch: str) -> tuple[list[dict], str]:
    """Compiles `source` for sm_<arch>; returns per-kernel {kernel, registers, spills} and the log."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [
            "nvcc", *NVCC_FLAGS, f"-gencode=arch=compute_{arch},code=sm_{arch}",
            "-c", str(source), "-o", str(Path(tmp) / "out.o"),
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True)
    log = result.stdout + result.stderr
    if result.returncode != 0:
        raise RuntimeError(f"nvcc failed on {source.name} for sm_{arch}:\n{log}")
    kernels: list[dict] = []
    for line in log.splitlines():
        if entry := _ENTRY.search(line):
            kernels.append({"kernel": entry.group(1), "registers": 0, "spills": 0})
        elif kernels and (spills := _SPILLS.search(line)):
            kernels[-1]["spills"] = int(spills.group(1)) + int(spills.group(2))
        elif kernels and (registers := _REGISTERS.search(line)):
            kernels[-1]["registers"] = int(registers.group(1))
    for kernel, name in zip(kernels, demangle([k["kernel"] for k in kernels])):
        kernel["kernel"] = name
    return kernels, log


def main(argv: list[str]) -> int:
    if shutil.which("nvcc") is None:
        print("nvcc not found", file=sys.stderr)
        return 2
    sources = [Path(a) for a in argv] or sorted(CUDA_DIR.glob("*.cu"))
    if not sources:
        print(f"no .cu sources in {CUDA_DIR}", file=sys.stderr)
        return 1
    failed = False
    for source in sources:
        for arch in cuda_archs():
            kernels, _ = compile_report(source, arch)
            spilling = [k for k in kernels if k["spills"]]
            most = max((k["registers"] for k in kernels), default=0)
            print(f"{source.name} sm_{arch}: {len(kernels)} kernels, max {most} registers, {len(spilling)} spilling")
            for kernel in spilling:
                print(f"  SPILLS {kernel['spills']} bytes: {kernel['kernel']}")
            failed |= bool(spilling) or not kernels
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
