"""Every Triton kernel the public API launches, compiled for sm_80 and sm_90 by Triton's
real compiler (no GPU needed): see `offline_compile.py` for the harness and the grid.
The interpreter the other tests use accepts code the compiler rejects and says nothing
about spills, shared memory or tensor cores; this is where those are checked."""

import pytest

pytest.importorskip("triton")

from offline_compile import TARGETS, describe, expects_tensor_cores, run_targets, violations  # noqa: E402

# Every @triton.jit kernel with a launcher; the grid must reach each on each target.
LAUNCHED_KERNELS = {
    "_attention_fwd_kernel", "_attention_bwd_delta_kernel", "_attention_bwd_dq_kernel", "_attention_bwd_dkdv_kernel",
    "_sampled_fwd_kernel", "_sampled_bwd_kernel", "_sampled_dw_by_item_kernel",
    "_full_fwd_kernel", "_full_bwd_hidden_kernel", "_full_bwd_weight_kernel", "_compact_rows_kernel",
    "_topk_kernel", "_ranks_kernel", "_pad_rows_kernel", "_pad_columns_kernel",
}  # fmt: skip


@pytest.fixture(scope="module")
def rows():
    return run_targets("ci")


def _report(failing):
    return "\n".join(f"{describe(row)}: {'; '.join(violations(row))}" for row in failing[:20])


def test_the_grid_reaches_every_kernel_on_every_target(rows):
    for cc in TARGETS:
        assert {r["kernel"] for r in rows if r["cc"] == cc} >= LAUNCHED_KERNELS, f"sm_{cc}"
    # The target is honoured: Hopper's warp-group MMA appears only on sm_90.
    assert any(r.get("mma") == "wgmma" for r in rows if r["cc"] == 90)
    assert not any(r.get("mma") == "wgmma" for r in rows if r["cc"] == 80)


def test_every_kernel_compiles(rows):
    failing = [r for r in rows if "error" in r]
    assert not failing, _report(failing)


def test_kernels_spill_nothing_and_use_tensor_cores(rows):
    """No kernel spills (16-bit, and float32 in every matmul precision mode, at every D);
    tile products run on tensor cores at 16-bit and at float32 under the "high" (3xTF32) and
    "medium" matmul precisions."""
    failing = [r for r in rows if "error" not in r and r["local_bytes"]]
    failing += [r for r in rows if "error" not in r and expects_tensor_cores(r) and violations(r)]
    assert not failing, _report(failing)
    for precision in ("highest", "high"):  # the ci grid's float32 modes are reached, at its widest D too
        reached = {r["D"] for r in rows if r["dtype"] == "float32" and r.get("precision") == precision}
        assert max(reached) >= 256, (precision, reached)
    assert any(expects_tensor_cores(r) and r.get("precision") == "high" for r in rows)


def test_shared_memory_and_grids_within_limits(rows):
    failing = [r for r in rows if "error" not in r and violations(r)]
    assert not failing, _report(failing)


def test_violations_names_each_defect():
    """The checks themselves can fail: each defect of a made-up kernel is reported."""
    row = dict(cc=80, kernel="_full_fwd_kernel", dtype="bfloat16", D=64, grid=(1, 70_000, 1), local_bytes=96,
               mma_count=0, shared=170_000, cp_async=0, tma=0, loads_16=12)  # fmt: skip
    problems = " | ".join(violations(row))
    for words in ("grid", "spills: 96 B", "no tensor-core MMA", "shared memory 170000 B > sm_80", "no cp.async/TMA",
                  "12 scalar 16-bit global loads"):  # fmt: skip
        assert words in problems
    assert violations(dict(row, grid=(1, 1, 1), local_bytes=0, mma_count=4, shared=0, tma=2, loads_16=0)) == []
    float32 = dict(row, dtype="float32", grid=(1, 1, 1), shared=0)
    assert violations(dict(float32, precision="high")) == [
        "spills: 96 B of local memory per thread",
        "no tensor-core MMA in a tile-product kernel at 16-bit or TF32",
    ]
    assert violations(dict(float32, precision="highest")) == ["spills: 96 B of local memory per thread"]
    assert violations(dict(float32, precision="highest", D=1024)) == ["spills: 96 B of local memory per thread"]
    clean = dict(float32, D=1024, local_bytes=0)
    assert violations(dict(clean, atomics=4, atomic_sem=["relaxed"])) == []
    assert violations(dict(clean, atomics=4, atomic_sem=["acq_rel"])) == [
        "atomics not relaxed (acq_rel): a fence per add"
    ]
    assert violations(dict(row, error="CompilationError: x")) == ["does not compile: CompilationError: x"]
