"""`make gpu-check`'s dry run: every phase of the GPU lease script on the CPU, on tiny shapes,
so that the harness works when the next GPU comes."""

import subprocess
import sys
import time

from benchmarks import gpu_check


def test_dry_run_runs_every_phase_and_returns_at_most_8_files(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--results", str(tmp_path)],
        cwd=gpu_check.REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    summary = tmp_path / "gpu-summary-CPU-dry-run.md"
    assert result.returncode == 0, result.stdout[-3000:] + summary.read_text()
    rows = [line.split("|")[1:3] for line in summary.read_text().splitlines() if line.startswith("| ")][2:]
    phases = [name.strip() for name, _ in rows]
    assert phases == ["build", "sweep", "sanitizer", "tuning", "bench", "profile", "tests"]
    assert all(verdict.strip() == "ok" for _, verdict in rows), rows
    files = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert len(files) <= 8, files  # what the device tool brings back
    assert "all" in (tmp_path / "gpu-sweep-CPU-dry-run.txt").read_text().splitlines()[-1]  # "all N cases passed"
    assert '"attention_fwd"' in (tmp_path / "tuning-CPU-dry-run.json").read_text()
    assert "fused_attention fwd+bwd" in (tmp_path / "gpu-profile-CPU-dry-run.txt").read_text()


def test_a_phase_past_its_limit_is_stopped_and_reported(tmp_path):
    sleeper = "import time; print('begun', flush=True); time.sleep(60)"
    phase = gpu_check.Phase("slow", 2, [[sys.executable, "-c", sleeper]], "slow.txt")
    summary = []
    gpu_check.run_phase(phase, deadline=float("inf"), results=tmp_path, summary_log=summary, env={})
    assert phase.result == "timed out" and phase.seconds < 30
    assert "begun" in (tmp_path / "slow.txt").read_text()  # written as it went


def test_phases_left_without_time_are_not_run(tmp_path):
    phase = gpu_check.Phase("late", 60, [[sys.executable, "-c", "pass"]], None)
    gpu_check.run_phase(phase, deadline=time.monotonic() + 3, results=tmp_path, summary_log=[], env={})
    assert phase.result == "not run: out of time"
