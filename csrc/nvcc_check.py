"""Compiles the CUDA kernels with nvcc for every target architecture and checks what the
compiler made of them, without a GPU. Each (source, architecture) is compiled once; the
ptxas report and the SASS come from that one object:

- ptxas (-Xptxas -v): no errors, no register spills;
- SASS (cuobjdump -res-usage / -sass / -elf), per kernel, against EXPECTED below: no
  local memory (LOCAL:0, no stack, no STL/LDL); tensor-core MMA (HMMA) fed by ldmatrix
  (LDSM) where the kernel multiplies 16-bit tiles, and cp.async (LDGSTS) where it streams
  tiles through shared memory; 128-bit global stores (STG.E.128) where it writes its
  output rows 16 bytes at a time; registers x threads per CTA that let the SM hold the
  CTAs that the kernel's __launch_bounds__ (or launch plan) intends.

    python csrc/nvcc_check.py [file.cu ...]     # default: every csrc/cuda/*.cu
    SEQREC_CUDA_ARCHS="8.0;9.0" selects the architectures (the build's default).

Needs nvcc and cuobjdump (next to nvcc, on PATH, or the copy in the triton wheel); no
GPU, no torch. Exit status 1 on any violation, 2 when a tool is missing.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import importlib.util
import math
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

# sm_80 and sm_90 alike: 64K 32-bit registers, 2048 threads and 32 CTAs per SM; registers
# are allocated per warp in units of 256 (8 per thread).
REGISTERS_PER_SM, REGISTER_UNIT, THREADS_PER_SM, CTAS_PER_SM = 65536, 256, 2048, 32

# ptxas -v prints, per kernel: "Compiling entry function '<mangled>' for 'sm_90'" and then
# "... N bytes spill stores, M bytes spill loads" and "Used R registers ...".
_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_REGISTERS = re.compile(r"Used (\d+) registers")
# cuobjdump -res-usage: "Function <mangled>:" then "REG:n STACK:n SHARED:n LOCAL:n ...".
_RESOURCES = re.compile(r"Function ([^\s:]+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
# cuobjdump -sass: "Function : <mangled>", then "/*0af0*/  @!P0 HMMA.16816.F32 R4, ... ;" or
# "/*9630*/  @!P1 STG.E.128 desc[UR16][R2.64], R4 ;" (sm_90; sm_80 has no desc[...]): the
# opcode, then its modifiers.
_SASS_FUNCTION = re.compile(r"^\s*Function : (\S+)\s*$", re.M)
_OPCODE = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P[T\d]\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Z0-9_]+)*)", re.M)
# Opcodes counted whatever their modifiers, and 128-bit accesses as "<opcode>.128".
COUNTED = ("HMMA", "LDSM", "LDGSTS", "STL", "LDL", "STG.128")


@dataclasses.dataclass(frozen=True)
class Expect:
    """What a kernel family is built to be; `pattern` matches its short name, e.g.
    "engine_kernel<__half, 1>" (first match wins)."""

    pattern: str
    min_ctas: int  # CTAs per SM its registers must allow: the __launch_bounds__ minimum or the plan's
    mma: bool  # HMMA and LDSM present: it multiplies 16-bit tiles on tensor cores
    cp_async: bool  # LDGSTS present: it streams tiles through shared memory with cp.async
    why: str
    wide_stores: bool = False  # STG.128 present: it writes output rows 16 bytes at a time where aligned
    tf32: bool = False  # HMMA present: float32 scores on 3xTF32 tensor cores (operands from plain shared loads)
    threads: int | None = None  # threads per launch, for kernels without __launch_bounds__


HALF = r"(__half|__nv_bfloat16)"
# The table of expectations. Tensor cores (HMMA fed by LDSM) where a kernel multiplies
# 16-bit tiles; the float32 tile kernels use FFMA (IEEE, "highest") or, instantiated with
# TF32X3 = true ("high"), 3xTF32 tensor cores for their scores (HMMA); the warp-per-row
# and elementwise kernels have no tile product at all (each row gathers its own negatives;
# dot products are warp shuffles).
EXPECTED = (
    # softmax_loss.cu: the tile engine; __launch_bounds__(256, 2), (256, 1) for float32 backward.
    Expect(rf"engine_kernel<{HALF}, \d, false>", 2, mma=True, cp_async=True, why="loss tile engine, 16-bit"),
    Expect(r"engine_kernel<float, 0, false>", 2, mma=False, cp_async=True, why="loss tile engine, float32 forward"),
    Expect(r"engine_kernel<float, [12], false>", 1, mma=False, cp_async=True, why="loss tile engine, float32 bwd"),
    Expect(r"engine_kernel<float, 0, true>", 2, mma=False, tf32=True, cp_async=True, why="float32 forward, 3xTF32"),
    Expect(r"engine_kernel<float, [12], true>", 1, mma=False, tf32=True, cp_async=True, why="float32 bwd, 3xTF32"),
    # softmax_loss.cu: per-row negatives and the deterministic d weight, warp per row; elementwise.
    Expect(r"sampled_rows_(forward|backward)<", min_ctas=1, mma=False, cp_async=False, why="warp per row"),
    Expect(r"sampled_weight_grad_sorted<", min_ctas=1, mma=False, cp_async=False, why="CTA per item, warp per row"),
    Expect(r"sampled_weight_grad_partials<", 1, mma=False, cp_async=False, why="warp per item, slot partials"),
    Expect(r"combine_forward|reduce_splits<|slot_keys", 1, mma=False, cp_async=False, why="elementwise", threads=256),
    Expect(r"grad_scale_max", min_ctas=1, mma=False, cp_async=False, why="one-CTA max", threads=1024),
    Expect(r"compact_rows<", min_ctas=1, mma=False, cp_async=False, why="CTA per group (32 or 1024), block scan"),
    # attention.cu: __launch_bounds__(threads, 1); kSmemBudget (112 KB) is sized for two CTAs per SM on H100.
    # Output rows staged in shared memory and stored with the output's copy width (16 bytes when aligned).
    Expect(
        rf"attention_\w+_kernel<{HALF},", 2, mma=True, cp_async=True, why="attention tiles, 16-bit", wide_stores=True
    ),
    Expect(
        r"attention_\w+_kernel<float, [\d, ]+true>",
        2,
        mma=False,
        cp_async=True,
        why="attention tiles, float32 3xTF32",
        wide_stores=True,
        tf32=True,
    ),  # fmt: skip
    Expect(
        r"attention_\w+_kernel<float,", 2, mma=False, cp_async=True, why="attention tiles, float32", wide_stores=True
    ),
)
MMA_REQUIRED = ("HMMA", "LDSM")
TABLED = ("HMMA", "LDSM", "LDGSTS", "STG.128")  # the opcode columns of the report


def cuda_archs() -> list[str]:
    """ "8.0;9.0" -> ["80", "90"]."""
    spec = os.environ.get("SEQREC_CUDA_ARCHS", DEFAULT_ARCHS)
    return [a.strip().replace(".", "") for a in spec.replace(",", ";").split(";") if a.strip()]


def find_cuobjdump() -> str | None:
    """cuobjdump next to nvcc, on PATH, or in the triton wheel (which ships one)."""
    nvcc = shutil.which("nvcc")
    candidates = [Path(nvcc).resolve().parent / "cuobjdump"] if nvcc else []
    if found := shutil.which("cuobjdump"):
        candidates.append(Path(found))
    triton = importlib.util.find_spec("triton")  # located, not imported
    if triton is not None and triton.submodule_search_locations:
        for location in triton.submodule_search_locations:
            candidates.append(Path(location) / "backends" / "nvidia" / "bin" / "cuobjdump")
    return next((str(c) for c in candidates if c.is_file() and os.access(c, os.X_OK)), None)


def demangle(names: list[str]) -> list[str]:
    for tool in ("cu++filt", "c++filt"):
        if shutil.which(tool) is not None:
            result = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
            if result.returncode == 0 and len(result.stdout.splitlines()) == len(names):
                return result.stdout.splitlines()
    return names


def short_name(demangled: str) -> str:
    """ "void seqrec::cuda::(anonymous namespace)::engine_kernel<__half, 1>(...)" ->
    "engine_kernel<__half, 1>"; other namespaces keep theirs ("cub::...")."""
    name = demangled.removeprefix("void ").replace("(anonymous namespace)", "{anonymous}")
    depth = 0
    for i, char in enumerate(name):
        depth += {"<": 1, ">": -1}.get(char, 0)
        if char == "(" and depth == 0:  # the parameter list
            name = name[:i]
            break
    return name.replace("seqrec::cuda::{anonymous}::", "").replace("seqrec::cuda::", "")


def ctas_per_sm(registers: int, threads: int) -> int:
    """CTAs of `threads` threads at `registers` per thread that one SM holds (registers and
    thread slots; shared memory is the launch plan's business)."""
    warps = math.ceil(threads / 32)
    per_warp = max(REGISTER_UNIT, math.ceil(registers * 32 / REGISTER_UNIT) * REGISTER_UNIT)
    return min(REGISTERS_PER_SM // (per_warp * warps), THREADS_PER_SM // (warps * 32), CTAS_PER_SM)


def parse_ptxas(log: str) -> dict[str, dict]:
    """Mangled name -> {registers, spills} from the ptxas -v log."""
    kernels: dict[str, dict] = {}
    current = None
    for line in log.splitlines():
        if entry := _ENTRY.search(line):
            current = kernels.setdefault(entry.group(1), {"registers": 0, "spills": 0})
        elif current is not None and (spills := _SPILLS.search(line)):
            current["spills"] = int(spills.group(1)) + int(spills.group(2))
        elif current is not None and (registers := _REGISTERS.search(line)):
            current["registers"] = int(registers.group(1))
    return kernels


def parse_resources(text: str) -> dict[str, dict]:
    """Mangled name -> {registers, stack, shared, local} from cuobjdump -res-usage."""
    return {
        m.group(1): dict(zip(("registers", "stack", "shared", "local"), map(int, m.groups()[1:])))
        for m in _RESOURCES.finditer(text)
    }


def parse_sass(text: str) -> dict[str, collections.Counter]:
    """Mangled name -> opcode counts from cuobjdump -sass: HMMA.16816.F32 counts as HMMA,
    STG.E.128 as STG and as STG.128 (any opcode with a .128 modifier)."""
    parts = _SASS_FUNCTION.split(text)
    sass = {}
    for name, body in zip(parts[1::2], parts[2::2]):
        counts = sass[name] = collections.Counter()
        for opcode, modifiers in _OPCODE.findall(body):
            counts[opcode] += 1
            if "128" in modifiers.split("."):
                counts[f"{opcode}.128"] += 1
    return sass


def parse_max_threads(text: str) -> dict[str, int]:
    """Mangled name -> threads per CTA of its __launch_bounds__ (EIATTR_MAX_THREADS) from cuobjdump -elf."""
    threads, current, pending = {}, None, False
    for line in text.splitlines():
        if line.startswith(".nv.info."):
            current, pending = line.removeprefix(".nv.info.").strip(), False
        elif "EIATTR_MAX_THREADS" in line:
            pending = True
        elif pending and line.strip().startswith("Value:"):
            threads[current] = math.prod(int(v, 16) for v in line.split()[1:4])
            pending = False
    return threads


def compile_and_inspect(source: Path, arch: str, cuobjdump: str) -> list[dict]:
    """Compiles `source` for sm_<arch> once and returns one row per kernel: ptxas registers
    and spills, SASS resources, opcode counts and launch-bound threads."""
    with tempfile.TemporaryDirectory() as tmp:
        obj = Path(tmp) / "out.o"
        command = [
            "nvcc",
            *NVCC_FLAGS,
            f"-gencode=arch=compute_{arch},code=sm_{arch}",
            "-c",
            str(source),
            "-o",
            str(obj),
        ]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"nvcc failed on {source.name} for sm_{arch}:\n{result.stdout}{result.stderr}")
        dumps = {}
        for flag in ("-res-usage", "-sass", "-elf"):
            dump = subprocess.run([cuobjdump, flag, str(obj)], capture_output=True, text=True)
            if dump.returncode != 0:
                raise RuntimeError(f"cuobjdump {flag} failed on {source.name} for sm_{arch}:\n{dump.stderr}")
            dumps[flag] = dump.stdout
    ptxas = parse_ptxas(result.stdout + result.stderr)
    resources, sass = parse_resources(dumps["-res-usage"]), parse_sass(dumps["-sass"])
    max_threads = parse_max_threads(dumps["-elf"])
    mangled = sorted(ptxas)
    rows = []
    for name, demangled in zip(mangled, demangle(mangled)):
        counts = sass.get(name, collections.Counter())
        rows.append({
            "kernel": short_name(demangled), "source": source.name, "arch": f"sm_{arch}", **ptxas[name],
            "resources": resources.get(name), "launch_threads": max_threads.get(name),
            **{op: counts[op] for op in COUNTED},
        })  # fmt: skip
    return rows


def expectation(kernel: str) -> Expect | None:
    return next((e for e in EXPECTED if re.search(e.pattern, kernel)), None)


def check(row: dict) -> list[str]:
    """Violations of one kernel row; fills row["threads"], row["ctas"], row["min_ctas"]."""
    name = f"{row['source']} {row['arch']} {row['kernel']}"
    problems = [f"{name}: {row['spills']} bytes of register spills"] if row["spills"] else []
    resources = row["resources"]
    if resources is None:
        return [*problems, f"{name}: not in cuobjdump -res-usage"]
    if resources["local"] or resources["stack"] or row["STL"] or row["LDL"]:
        problems.append(
            f"{name}: local memory (LOCAL:{resources['local']} STACK:{resources['stack']}, "
            f"{row['STL']} STL / {row['LDL']} LDL)"
        )
    if row["kernel"].startswith("cub::"):  # CUB's own kernels and tuning
        return problems
    expect = expectation(row["kernel"])
    if expect is None:
        return [*problems, f"{name}: no entry in nvcc_check.EXPECTED (say what the kernel is built to be)"]
    threads = row["launch_threads"] or expect.threads
    if row["launch_threads"] and expect.threads and row["launch_threads"] != expect.threads:
        problems.append(f"{name}: __launch_bounds__ {row['launch_threads']} threads, EXPECTED says {expect.threads}")
    if threads is None:
        return [*problems, f"{name}: no __launch_bounds__ and no threads in EXPECTED"]
    row.update(threads=threads, ctas=ctas_per_sm(resources["registers"], threads), min_ctas=expect.min_ctas)
    if row["ctas"] < expect.min_ctas:
        problems.append(
            f"{name}: {resources['registers']} registers x {threads} threads allow {row['ctas']} CTAs per SM, "
            f"{expect.min_ctas} intended ({expect.why})"
        )
    required = (
        *(MMA_REQUIRED if expect.mma else ()),
        *(("HMMA",) if expect.tf32 else ()),
        *(("LDGSTS",) if expect.cp_async else ()),
        *(("STG.128",) if expect.wide_stores else ()),
    )
    missing = [op for op in required if not row[op]]
    if missing:
        problems.append(f"{name}: no {'/'.join(missing)} in the SASS ({expect.why})")
    return problems


def table(rows: list[dict]) -> str:
    header = f"  {'kernel':<50} {'regs':>4} {'threads':>7} {'CTAs/SM (min)':>13} {'local':>5}"
    lines = [header + "".join(f" {op:>7}" for op in TABLED)]
    for row in rows:
        if "ctas" not in row:
            continue  # library kernels (CUB)
        local = row["resources"]["local"] + row["resources"]["stack"] + row["STL"] + row["LDL"]
        ctas = f"{row['ctas']} ({row['min_ctas']})"
        lines.append(
            f"  {row['kernel']:<50} {row['resources']['registers']:>4} {row['threads']:>7} {ctas:>13} {local:>5}"
            + "".join(f" {row[op]:>7}" for op in TABLED)
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if shutil.which("nvcc") is None:
        print("nvcc not found", file=sys.stderr)
        return 2
    cuobjdump = find_cuobjdump()
    if cuobjdump is None:
        print("cuobjdump not found (looked next to nvcc, on PATH and in the triton wheel)", file=sys.stderr)
        return 2
    sources = [Path(a) for a in argv] or sorted(CUDA_DIR.glob("*.cu"))
    if not sources:
        print(f"no .cu sources in {CUDA_DIR}", file=sys.stderr)
        return 1
    jobs = [(source, arch) for source in sources for arch in cuda_archs()]
    # nvcc is single-threaded: one process per (source, architecture).
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1)) as pool:
        results = list(pool.map(lambda job: compile_and_inspect(*job, cuobjdump), jobs))
    failed = False
    for (source, arch), rows in zip(jobs, results):
        problems = [p for row in rows for p in check(row)]
        spilling = sum(1 for row in rows if row["spills"])
        library = sum(1 for row in rows if "ctas" not in row)
        most = max((row["registers"] for row in rows), default=0)
        print(
            f"{source.name} sm_{arch}: {len(rows)} kernels ({library} library), max {most} registers, "
            f"{spilling} spilling, {len(problems)} SASS violations"
        )
        print(table(rows))
        for problem in problems:
            print(f"  VIOLATION {problem}")
        failed |= bool(problems) or not rows
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
