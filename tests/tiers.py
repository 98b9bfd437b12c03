"""The two tiers of the CPU test suite, stated in one place.

`make test` (the tier a developer runs often, in at most 15 minutes on 2 cores) runs every
test not marked `full`; `make test-full` runs the tests marked `full`: the slowest grids,
each of which has a smaller sibling in the main tier or checks what the main tier checks
at more points. CI (.ci/run) runs both, so together they are the whole suite. conftest.py
marks each test whose node id starts with an entry below (a file, a test, or a test with
some of its parameters), so that test files need no edits to move between tiers.

Times are from `pytest --durations` on the 2-core development machine while other work
ran on it (docs/testing.md#test-tiers has the totals).
"""

FULL_TIER = {
    # Triton's compiler for sm_80 and sm_90 over the `ci` grid (1,192 launches, 2 processes).
    "tests/test_offline_compile.py::test_the_grid_reaches_every_kernel_on_every_target": "offline compile, ci grid",
    "tests/test_offline_compile.py::test_every_kernel_compiles": "offline compile, ci grid",
    "tests/test_offline_compile.py::test_kernels_spill_nothing_and_use_tensor_cores": "offline compile, ci grid",
    "tests/test_offline_compile.py::test_shared_memory_and_grids_within_limits": "offline compile, ci grid",
    # nvcc over every csrc/cuda/*.cu for sm_80 and sm_90, and the SASS checks.
    "tests/test_extension.py::test_cuda_sources_compile_and_their_sass_meets_expectations": "nvcc + SASS",
}


def in_full_tier(nodeid: str) -> bool:
    """Whether the test with this node id (tests/file.py::test[params]) is in the full tier."""
    return any(nodeid == entry or nodeid.startswith((entry + "[", entry + "::")) for entry in FULL_TIER)
