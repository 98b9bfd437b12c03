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
    # Triton's compiler for sm_80 and sm_90 over the `ci` grid (1,192 launches, 2 processes; ~9 min
    # on 2 idle cores). The main tier keeps test_violations_names_each_defect (the checks themselves).
    "tests/test_offline_compile.py::test_the_grid_reaches_every_kernel_on_every_target": "offline compile",
    "tests/test_offline_compile.py::test_every_kernel_compiles": "offline compile",
    "tests/test_offline_compile.py::test_kernels_spill_nothing_and_use_tensor_cores": "offline compile",
    "tests/test_offline_compile.py::test_shared_memory_and_grids_within_limits": "offline compile",
    # nvcc over every csrc/cuda/*.cu for sm_80 and sm_90, and the SASS checks; the main tier keeps
    # the checks' arithmetic (test_sass_check_arithmetic_and_parsing) and the glue's compile.
    "tests/test_extension.py::test_cuda_sources_compile_and_their_sass_meets_expectations": "nvcc + SASS",
    # The GPU check's sanitizer grid run on the CPU through `cpp` (328 s under load); every op it
    # calls is fuzzed on `cpp` by the main tier.
    "tests/test_extension.py::test_sanitizer_grid_runs_on_cpu": "sanitizer grid on CPU",
    # The interpreter's slowest fuzz grids (seconds under load, 4x the idle time). The main tier
    # fuzzes the same properties on `cpp` and Triton's attention against the padded truth
    # (test_varlen_matches_padded_truth_and_its_tail_is_padding[triton]).
    "tests/test_attention.py::test_kernel_matches_naive[triton]": "fuzz, 326 s",
    "tests/test_attention.py::test_kernel_dropout_matches_naive_with_same_mask[triton]": "fuzz, 328 s",
    "tests/test_softmax_loss.py::test_sampled_kernel_matches_naive[triton]": "fuzz, 250 s",
    # D=50 over several item tiles in deterministic mode at N=3,000 (217 s); the main tier keeps
    # N=3,000 without it and N=40 with it.
    "tests/test_softmax_loss.py::test_sampled_triton_hidden_size_50[3000-shared-True]": "grid",
    "tests/test_softmax_loss.py::test_sampled_triton_hidden_size_50[3000-per_sequence-True]": "grid",
    "tests/test_softmax_loss.py::test_sampled_triton_hidden_size_50[3000-per_row-True]": "grid",
}


def in_full_tier(nodeid: str) -> bool:
    """Whether the test with this node id (tests/file.py::test[params]) is in the full tier."""
    return any(nodeid == entry or nodeid.startswith((entry + "[", entry + "::")) for entry in FULL_TIER)
