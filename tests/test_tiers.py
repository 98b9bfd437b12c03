"""tests/tiers.py names tests that exist: an entry left behind by a renamed test would
silently move nothing, and its test would run in neither tier's intended place."""

import ast
from pathlib import Path

import pytest
from tiers import FULL_TIER, in_full_tier

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("entry", sorted(FULL_TIER))
def test_each_entry_names_a_test_function_that_exists(entry):
    path, _, test = entry.partition("::")
    assert (ROOT / path).is_file(), f"{path}: no such file"
    name = test.split("[")[0]
    tree = ast.parse((ROOT / path).read_text())
    assert name in {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}, f"{path}: no {name}"


def test_entries_match_whole_names_and_parameters():
    entry = "tests/test_attention.py::test_kernel_matches_naive[triton]"
    assert entry in FULL_TIER
    assert in_full_tier(entry)
    assert not in_full_tier("tests/test_attention.py::test_kernel_matches_naive[cpp]")
    assert in_full_tier("tests/test_offline_compile.py::test_every_kernel_compiles")
    assert not in_full_tier("tests/test_offline_compile.py::test_every_kernel_compiles_too")
