import os
import random

import pytest
import torch
from hypothesis import HealthCheck, settings
from tiers import in_full_tier

# Without a GPU, Triton kernels run on CPU tensors in Triton's interpreter. This must be
# set before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

settings.register_profile("default", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(autouse=True)
def fresh_seed(request):
    """A new seed per test and run (SEQREC_TEST_SEED pins it); printed so a failure can be replayed."""
    seed = int(os.environ.get("SEQREC_TEST_SEED", random.randrange(2**31)))
    torch.manual_seed(seed)
    print(f"{request.node.nodeid}: SEQREC_TEST_SEED={seed}")
    return seed


def pytest_collection_modifyitems(config, items):
    for item in items:  # the fuller tier (make test-full): tests/tiers.py
        if in_full_tier(item.nodeid):
            item.add_marker(pytest.mark.full)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
