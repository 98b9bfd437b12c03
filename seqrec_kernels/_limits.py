"""The ops' input limits, stated once for Python. csrc/op_limits.h states them for C++
(the C++ ops' checks and the CUDA kernels); tests/test_limits.py keeps the two tables equal.

Each op's dispatcher checks every limit before any backend runs, with the message below
whatever the backend; the Triton launchers and the C++ ops (csrc/checks.h) check again,
with the same message, for direct calls of their torch ops. No torch import here: the
Triton code imports this module too.
"""

# Attention: the head dim D of q, k, v is in 1..MAX_HEAD_DIM on every backend, the
# reference included (one contract; the CUDA kernels pad D to 32, 64, 128 or 256).
MAX_HEAD_DIM = 256

# Softmax losses: the hidden size D is at most MAX_KERNEL_HIDDEN_DIM on the kernel backends
# (triton, cuda). The reference has no such limit, by design: it is the path for any D.
MAX_KERNEL_HIDDEN_DIM = 1024

# Retrieval: topk_items' k is at most MAX_KERNEL_K on the Triton backend, which keeps each row's
# best k (padded to a power of two) in registers while it sorts them; beyond this it would spill.
# The reference takes any k. Python only: the C++ extension has no retrieval ops.
MAX_KERNEL_K = 2048


def check_head_dim(head_dim: int, layout: str = "[B, H, L, D]") -> None:
    """Raises ValueError unless 1 <= head_dim <= MAX_HEAD_DIM; `layout` names q's dimensions."""
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"q: head dim (the last dimension of {layout}) must be in 1..{MAX_HEAD_DIM}, got {head_dim}")


def check_kernel_hidden_dim(backend: str, dim: int) -> None:
    """Raises ValueError if `backend` (a backend's value) is a kernel backend and dim > MAX_KERNEL_HIDDEN_DIM."""
    if backend != "reference" and dim > MAX_KERNEL_HIDDEN_DIM:
        raise ValueError(
            f"hidden: expected D <= {MAX_KERNEL_HIDDEN_DIM} (the kernel backends' limit; "
            f"backend='reference' has none), got D={dim}"
        )


def check_kernel_k(backend: str, k: int) -> None:
    """Raises ValueError if `backend` (a backend's value) is 'triton' and k > MAX_KERNEL_K."""
    if backend == "triton" and k > MAX_KERNEL_K:
        raise ValueError(f"k: expected k <= {MAX_KERNEL_K} on backend 'triton' (the reference has no limit), got {k}")
