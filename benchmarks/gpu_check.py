"""`make gpu-check`: the whole GPU lease as one prioritized script.

    python -m benchmarks.gpu_check [--results DIR] [--budget SECONDS] [--dry-run]

A lease gives about 9 minutes of command time, so the phases run in order of what a lost
minute would cost, each under its own time limit (SIGINT first, so that pytest and the
scripts still report what they saw, then SIGKILL), within one overall budget:

    phase       limit   what
    build        100 s  the extension for this GPU's architecture only (ninja, MAX_JOBS);
                        it must have its CUDA kernels, or the check fails
    sweep         80 s  tests/gpu_sweep.py: every op x backend x dtype vs float64
    sanitizer     50 s  compute-sanitizer memcheck, then racecheck, over tests/sanitizer_grid.py --quick
    tuning        80 s  benchmarks/tune.py: candidate launch configs timed, winners to the table
    bench        140 s  the key benchmark rows (attention, losses, SASRec step, host time per call), to results.csv
    profile       30 s  benchmarks/profile.py: launches, device vs wall time, top kernels
    tests       the rest (50 s at least)  the `gpu`-marked pytest suite, every test's verdict printed as it runs

A phase of several commands gives each an equal share of what is left of its limit (time
one leaves unused goes to the next).
Every phase writes as it goes, and the summary is rewritten after each, so a time-out loses
nothing already measured. At most 8 files land in --results (what the device tool returns):

    gpu-summary-<gpu>.md     phases with exit codes and seconds, the build and tuning logs
    gpu-sweep-<gpu>.txt      one line per case, then a summary table
    gpu-sanitizer-<gpu>.txt  memcheck and racecheck output
    tuning-<gpu>.json        the tuning table (also installed as seqrec_kernels/tuning/<gpu>.json,
                             so that the later phases run with it; commit it there)
    gpu-bench-<gpu>.txt      the benchmarks' printed tables
    results.csv              benchmarks/results/results.csv with this run's rows upserted
    gpu-profile-<gpu>.txt    the profile table
    gpu-tests-<gpu>.txt      pytest -v output: every failure and skip by name

--dry-run runs every phase on the CPU on tiny shapes (Triton's interpreter, the `cpp`
backend, a two-candidate tuning sweep to a scratch table, the profiler without CUDA), which
is how `make test` keeps this harness working between leases. The exit status is nonzero if
any phase failed or did not run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from seqrec_kernels.tuning import gpu_slug

REPO = Path(__file__).resolve().parents[1]
BUDGET_S = 530  # of a lease's ~9 minutes of command time, leaving the device tool its margin


@dataclasses.dataclass
class Phase:
    name: str
    limit_s: float | None  # None: whatever the budget has left (the last phase)
    commands: list[list[str]]  # run one after another within the phase's limit
    log: str | None  # its own file in --results, or None: appended to the summary
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    result: str = "not run"
    seconds: float = 0.0


def gpu_identity(dry_run: bool) -> tuple[str, str]:
    """(name, compute capability like '9.0') of the GPU, read without importing torch's CUDA
    state into this process (the phases are separate processes)."""
    if dry_run:
        return "CPU-dry-run", ""
    query = ["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"]
    name, arch = subprocess.run(query, capture_output=True, text=True, check=True).stdout.splitlines()[0].split(", ")
    return name.strip(), arch.strip()


def phases(python: str, slug: str, arch: str, results: Path, dry_run: bool) -> list[Phase]:
    table = results / f"tuning-{slug}.json"
    if dry_run:
        scratch = Path(tempfile.mkdtemp(prefix="gpu-check-dry-run-"))  # the benchmark's CSV and tables
        return [
            Phase("build", 60, [[python, "-c", "import seqrec_kernels._C"]], None),
            Phase("sweep", 120, [[python, "tests/gpu_sweep.py", "--device", "cpu", "--smoke", "--out",
                                  str(results / f"gpu-sweep-{slug}.txt")]], None, {"TRITON_INTERPRET": "1"}),
            Phase("sanitizer", 120, [[python, "tests/sanitizer_grid.py", "cpu", "--quick"]],
                  f"gpu-sanitizer-{slug}.txt"),
            Phase("tuning", 120, [[python, "-m", "benchmarks.tune", "--dry-run", "--table", str(table)]], None,
                  {"TRITON_INTERPRET": "1"}),
            Phase("bench", 180, [[python, "-m", "benchmarks", "attention", "--quick", "--device", "cpu",
                                  "--providers", "reference,cpp", "--csv", str(scratch / "results.csv")],
                                 [python, "-m", "benchmarks", "host", "--quick", "--device", "cpu", "--shapes",
                                  "attention", "--providers", "cpp,torch", "--csv", str(scratch / "results.csv")]],
                  f"gpu-bench-{slug}.txt"),
            Phase("profile", 180, [[python, "-m", "benchmarks.profile", "--quick", "--device", "cpu", "--out",
                                    str(results / f"gpu-profile-{slug}.txt")]], None, {"TRITON_INTERPRET": "1"}),
            Phase("tests", None, [[python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "-rs",
                                   "tests/test_attention.py"]], f"gpu-tests-{slug}.txt"),
        ]  # fmt: skip
    sanitizer = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    require_cuda = (
        "from seqrec_kernels.backends import extension_has_cuda_kernels as has; assert has(), 'no CUDA kernels'"
    )
    bench = [python, "-m", "benchmarks"]
    return [
        Phase("build", 100, [[python, "setup.py", "-q", "build_ext", "--inplace"], [python, "-c", require_cuda]], None,
              {"SEQREC_CUDA_ARCHS": arch, "MAX_JOBS": str(os.cpu_count() or 8)}),
        Phase("sweep", 80, [[python, "tests/gpu_sweep.py", "--out", str(results / f"gpu-sweep-{slug}.txt")]], None),
        Phase("sanitizer", 50, [
            [sanitizer, "--tool", tool, "--error-exitcode", "1", python, "tests/sanitizer_grid.py", "cuda", "--quick"]
            for tool in ("memcheck", "racecheck")
        ], f"gpu-sanitizer-{slug}.txt"),
        Phase("tuning", 80, [[python, "-m", "benchmarks.tune", "--table", str(table)]], None),
        Phase("bench", 140, [
            bench + ["attention", "--quick", "--shapes", "SASRec-Games,long-1024"],
            bench + ["softmax_loss", "--quick"],
            bench + ["sasrec", "--quick", "--shapes", "Games"],
            bench + ["host", "--quick", "--device", "cuda"],
        ], f"gpu-bench-{slug}.txt"),
        Phase("profile", 30, [[python, "-m", "benchmarks.profile", "--quick", "--out",
                               str(results / f"gpu-profile-{slug}.txt")]], None),
        Phase("tests", None, [[python, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-m", "gpu", "-rfEs",
                               "--durations=15", "-W", "ignore::pytest_benchmark.logger.PytestBenchmarkWarning",
                               "tests"]], f"gpu-tests-{slug}.txt"),
    ]  # fmt: skip


def run_phase(phase: Phase, deadline: float, results: Path, summary_log: list[str], env: dict[str, str]) -> None:
    """Runs the phase's commands under its limit (and the overall deadline), output to its log."""
    left = deadline - time.monotonic()
    limit = left if phase.limit_s is None else min(phase.limit_s, left)
    if limit < min(15, phase.limit_s or 15):  # too little left to be worth starting
        phase.result = "not run: out of time"
        return
    log_path = results / phase.log if phase.log else None
    lines: list[str] = []
    started = time.monotonic()
    phase.result = "ok"
    with open(log_path, "w") if log_path else open(os.devnull, "w") as log:  # noqa: SIM115
        for i, command in enumerate(phase.commands):
            share = (started + limit - time.monotonic()) / (len(phase.commands) - i)
            if share < 1:
                phase.result = "timed out"
                break
            header = f"$ {' '.join(command)}"
            log.write(header + "\n")
            log.flush()
            lines.append(header)
            process = subprocess.Popen(
                command, cwd=REPO, env={**env, **phase.env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True, start_new_session=True,
            )  # fmt: skip
            output, timed_out = _stream(process, share, log)
            lines += output
            if phase.result == "ok" and (timed_out or process.returncode != 0):
                phase.result = "timed out" if timed_out else f"failed (exit {process.returncode})"
    phase.seconds = time.monotonic() - started
    if not phase.log:
        summary_log += [f"\n## {phase.name}\n", "```", *lines[-200:], "```"]


def _stream(process: subprocess.Popen, limit_s: float, log) -> tuple[list[str], bool]:
    """(the process's output lines, whether it reached its limit): each line is written to
    `log` as it comes; SIGINT at the limit, SIGKILL 15 s later."""
    lines: list[str] = []

    def reader():
        for line in process.stdout:
            log.write(line)
            log.flush()
            lines.append(line.rstrip("\n"))

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    timed_out = False
    try:
        process.wait(timeout=limit_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        lines.append(f"[time limit of {limit_s:.0f} s reached]")
        log.write(lines[-1] + "\n")
    thread.join(timeout=5)
    return lines, timed_out


def write_summary(path: Path, title: str, all_phases: list[Phase], summary_log: list[str]) -> None:
    table = ["| phase | result | seconds |", "| --- | --- | --- |"]
    table += [f"| {p.name} | {p.result} | {p.seconds:.0f} |" for p in all_phases]
    path.write_text("\n".join([f"# {title}", "", *table, *summary_log]) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results",
                        help="where the (at most 8) result files go")  # fmt: skip
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for all phases together")
    parser.add_argument("--dry-run", action="store_true", help="every phase on the CPU, tiny shapes")
    parser.add_argument("--python", default=sys.executable, help="the interpreter the phases run")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.budget
    name, arch = gpu_identity(args.dry_run)
    slug = gpu_slug(name)
    results = args.results.resolve()
    results.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    if not args.dry_run:
        env.pop("TRITON_INTERPRET", None)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    title = (
        f"GPU check on {name} (sm {arch or 'n/a'}), commit {commit.strip() or 'unknown'}, budget {args.budget:.0f} s"
    )
    all_phases = phases(args.python, slug, arch, results, args.dry_run)
    summary_path, summary_log = results / f"gpu-summary-{slug}.md", []
    installed_table, measured_table = (
        REPO / "seqrec_kernels" / "tuning" / f"{slug}.json",
        results / f"tuning-{slug}.json",
    )
    if not args.dry_run and installed_table.exists() and not measured_table.exists():
        shutil.copy(installed_table, measured_table)  # the sweep adds to the committed table's entries
    write_summary(summary_path, title, all_phases, summary_log)
    for phase in all_phases:
        print(f"[{phase.name}] ...", flush=True)
        try:
            run_phase(phase, deadline, results, summary_log, env)
            if phase.name == "tuning" and not args.dry_run and measured_table.exists():
                json.loads(measured_table.read_text())  # a readable table only: every later launch reads it
                shutil.copy(measured_table, installed_table)
            bench_csv = REPO / "benchmarks" / "results" / "results.csv"
            if phase.name == "bench" and not args.dry_run and results != bench_csv.parent and bench_csv.exists():
                shutil.copy(bench_csv, results / "results.csv")
        except Exception as error:  # noqa: BLE001 - recorded; the later phases still run
            phase.result = f"failed: {type(error).__name__}: {error}"
        print(f"[{phase.name}] {phase.result} ({phase.seconds:.0f} s)", flush=True)
        write_summary(summary_path, title, all_phases, summary_log)
    failed = [p.name for p in all_phases if p.result != "ok"]
    print(f"GPU check: {'all phases ok' if not failed else 'not ok: ' + ', '.join(failed)}; summary {summary_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
