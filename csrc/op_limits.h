// The ops' input limits, stated once for C++: the C++ ops' checks (csrc/checks.h) and the
// CUDA kernels (csrc/cuda/tile_plan.h) use these. seqrec_kernels/_limits.py states them for
// Python, whose dispatchers check them before any backend runs; tests/test_limits.py keeps
// the two tables equal (kMaxHeadDim here is MAX_HEAD_DIM there, and so on).
// Standard headers only: the host tests (tests/cuda_host) and nvcc include it too.
#pragma once

namespace seqrec {

// Attention: the head dim D of q, k, v is in 1..kMaxHeadDim on every backend (the CUDA
// kernels pad D to 32, 64, 128 or 256).
constexpr int kMaxHeadDim = 256;

// Softmax losses: the hidden size D is at most kMaxKernelHiddenDim on the kernel backends
// (triton, cuda). The reference has no such limit, by design.
constexpr int kMaxKernelHiddenDim = 1024;

}  // namespace seqrec
