"""The CUDA kernels' tile logic, checked on the CPU (issue 10): tests/cuda_host/*.cpp include
csrc/cuda/tile_plan.h, the constants, launch plans and index expressions that the kernels
themselves use, and emulate the kernels' schedules from them (each source says what it checks):

- attention_tiles: every visible (query, key) pair visited once by the forward, dq and dk/dv
  schedules; one writer per output row; shared memory and grids within CUDA's limits;
- loss_tiles: every (row, candidate) pair scored once by the tile engine (split-N forward,
  backward rows and items) and the warp-per-row kernels; workspace bounds; large T and N;
- fragments: ldmatrix / mma.sync m16n8k16 fragments and the FFMA layout against X Y^T, P V.

Compiled with the host compiler ($CXX, default g++), no CUDA toolkit or GPU needed; what only
a GPU run shows (execution, speed, races) is `make gpu-check`'s.
"""

import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
SOURCES = ROOT / "tests" / "cuda_host"
PROGRAMS = ["attention_tiles", "loss_tiles", "fragments"]
CXX = os.environ.get("CXX", "g++")

pytestmark = pytest.mark.skipif(shutil.which(CXX) is None, reason=f"no host C++ compiler ({CXX})")


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """{program: (executable, compiler result)}, compiled in parallel; the header must build
    with the plain host compiler (no CUDA include path)."""
    out = tmp_path_factory.mktemp("cuda_host")

    def build(name):
        exe = out / name
        command = [CXX, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", f"-I{CUDA_DIR}", "-o", str(exe),
                   str(SOURCES / f"{name}.cpp")]  # fmt: skip
        return name, exe, subprocess.run(command, capture_output=True, text=True)

    with ThreadPoolExecutor(len(PROGRAMS)) as pool:
        return {name: (exe, result) for name, exe, result in pool.map(build, PROGRAMS)}


@pytest.mark.parametrize("program", PROGRAMS)
def test_tile_logic(builds, program):
    exe, build = builds[program]
    assert build.returncode == 0, f"{' '.join(build.args)}\n{build.stderr}"
    result = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_kernels_use_the_plan_header():
    """The checks hold for the kernels only while the kernels take their plans from the header."""
    for source in sorted(CUDA_DIR.glob("*.cu")):
        assert '#include "tile_plan.h"' in source.read_text(), f"{source.name} does not include tile_plan.h"
