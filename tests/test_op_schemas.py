"""The ops' schemas: the reference and Triton ops are defined from the Python strings of
seqrec_kernels/ops (via ops/_library.py), the `cuda` ones by csrc/ops.cpp; both spell the
same schema for each op, and every op of the extension has its Python twin."""

import pytest
import torch

from seqrec_kernels.backends import EXTENSION_ERROR, cpp_op
from seqrec_kernels.ops._library import SCHEMAS

PHASES = ("fwd", "bwd")
CASES = [(family, i) for family in sorted(SCHEMAS) for i in range(2)]


def test_every_family_is_registered():
    assert sorted(SCHEMAS) == ["attention", "full_softmax", "sampled_softmax"]


@pytest.mark.parametrize("family, phase", CASES, ids=[f"{f}_{PHASES[i]}" for f, i in CASES])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_python_ops_have_the_python_schemas(family, phase, backend):
    name = f"seqrec::{family}_{PHASES[phase]}_{backend}"
    assert str(cpp_op(name)._schema) == str(torch._C.parse_schema(name + SCHEMAS[family][phase]))


@pytest.mark.skipif(EXTENSION_ERROR is not None, reason=str(EXTENSION_ERROR))
@pytest.mark.parametrize("family, phase", CASES, ids=[f"{f}_{PHASES[i]}" for f, i in CASES])
def test_cpp_schemas_equal_the_python_ones(family, phase):
    name = f"seqrec::{family}_{PHASES[phase]}_cuda"
    assert str(cpp_op(name)._schema) == str(torch._C.parse_schema(name + SCHEMAS[family][phase]))


@pytest.mark.skipif(EXTENSION_ERROR is not None, reason=str(EXTENSION_ERROR))
def test_every_cpp_op_has_a_python_schema():
    cpp_ops = {name for name in torch._C._dispatch_get_all_op_names() if name.startswith("seqrec::")}
    cpp_ops = {name for name in cpp_ops if name.endswith("_cuda")}
    assert cpp_ops == {f"seqrec::{family}_{phase}_cuda" for family in SCHEMAS for phase in PHASES}
