// The interface between the torch glue (csrc/*.cpp) and the CUDA kernels (csrc/cuda/*.cu).
// Only CUDA runtime types appear here, so the .cu files compile with nvcc and the CUDA
// headers alone (no torch), which is how CI checks them on a machine without a GPU.
//
// Op semantics are those of the reference backend (seqrec_kernels/reference/*.py); the
// caller (csrc/ops_cuda.cpp) has validated every input, made ids int64/int32 and log_q
// float32 contiguous, and allocated and initialized every output as noted below.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace seqrec::cuda {

enum class ScalarType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// A strided [B, H, L, D] tensor with unit stride on D; strides are in elements.
struct Bhld {
  void* data;
  int64_t batch_stride, head_stride, row_stride;
};

// ---------------------------------------------------------------- attention ----------
// Sequence s occupies rows seq_start[s] .. seq_start[s] + seq_len[s] - 1 of batch row s
// when batch == num_seqs (padded form) or of batch row 0 when batch == 1 (packed form).
// Query i sees key j iff both are in the same sequence and (!causal or pos(j) <= pos(i)),
// positions counted from the sequence's first token. The kernels write every row of
// their outputs: rows outside every sequence get zeros (-inf LSE), in the packed form for
// sequences in row order (as cu_seqlens gives them; gaps between them allowed).
struct AttentionParams {
  Bhld q, k, v;                // [B, H, L, D] inputs
  Bhld out;                    // [B, H, L, D] output, dtype of q (the forward writes every row)
  float* lse;                  // [B, H, L] contiguous (the forward writes every row: -inf at padding)
  const int32_t* seq_start;    // [S]
  const int32_t* seq_len;      // [S]
  int batch, num_heads, num_rows, head_dim, num_seqs, max_seqlen;
  int read_dim;                // width of the q, k, v (and dout) rows read: head_dim, or
                               // padded_read_dim(head_dim) with zeros past head_dim
  bool tf32x3;                 // float32: q k^T and dO v^T on 3xTF32 tensor cores ("high")
  bool causal;
  float scale;
  // Dropout on the probabilities (csrc/cuda/dropout_hash.h): keep iff the hash's top 24
  // bits >= keep_threshold, kept values times dropout_scale = 1/(1-p). No dropout iff
  // dropout_seed == nullptr.
  uint32_t keep_threshold;
  float dropout_scale;
  const int64_t* dropout_seed; // [1] on the device
  ScalarType dtype;
};

struct AttentionBackwardParams {
  AttentionParams fwd;         // inputs, out and lse of the forward (all read-only here)
  Bhld dout;                   // [B, H, L, D] upstream gradient, dtype of q
  Bhld dq, dk, dv;             // [B, H, L, D] outputs, dtype of q (the kernels write every row)
  float* workspace;            // attention_backward_workspace_floats(p) floats, uninitialized
};

cudaError_t attention_forward(const AttentionParams& p, cudaStream_t stream);
// The forward's K/V stages from the next call on, process-wide: 1 (the default) or 2 (double-
// buffered, 16-bit; a tuning candidate); returns the previous value.
int set_attention_kv_stages(int stages);
size_t attention_backward_workspace_floats(const AttentionBackwardParams& p);
cudaError_t attention_backward(const AttentionBackwardParams& p, cudaStream_t stream);

// ------------------------------------------------------------- softmax losses --------
// logit(t, n) = <hidden[t], weight[n]> / temperature (- log_q where given); rows whose
// positive/target == ignore_index have loss 0, LSE 0 and no gradient, and cost (close to)
// no work: the kernels compact them away on the device.
struct LossInputs {
  const void* hidden;          // [T, D], row stride hidden_row_stride, unit stride on D
  const void* weight;          // [N, D], row stride weight_row_stride, unit stride on D
  int64_t hidden_row_stride, weight_row_stride;
  int64_t num_rows, num_items, dim;  // T, N, D
  float temperature;
  int64_t ignore_index;
  ScalarType dtype;
  bool tf32x3;                 // float32: logits on 3xTF32 tensor cores ("high")
};

struct LossGradients {
  const float* grad_loss;      // [T] upstream gradient of the per-row loss
  const float* lse;            // [T] from the forward
  void* d_hidden;              // [T, D] contiguous, dtype of hidden (every row written)
  float* d_weight;             // [N, D] contiguous float32, zero-filled by the caller
  float* workspace;            // *_backward_workspace_floats(...) floats, zero-filled
  // Full softmax only, a tuning candidate: if set, d weight [N, D] contiguous in the dtype of
  // hidden, every row written by the kernels (no zero fill, no cast), and d_weight unused.
  void* d_weight_out = nullptr;
};

// Sampled: row t scores its positive against the negatives of group t / rows_per_group;
// loss(t) = logsumexp(pos logit, neg logits except accidental hits) - pos logit.
struct SampledSoftmaxParams {
  LossInputs in;
  const int64_t* pos_ids;      // [T]
  const int64_t* neg_ids;      // [G, K] contiguous
  const float* pos_log_q;      // [T] or nullptr
  const float* neg_log_q;      // [G, K] or nullptr
  int64_t num_groups, num_neg, rows_per_group;  // G, K, T / G
  bool remove_hits;            // a negative equal to the row's positive is left out
};

// The forwards' scratch (the tile engine's row order, split-stream partials) comes from the
// caller's allocator: *_forward_workspace_floats(p) floats (0 for the warp-per-row
// sampled forward), not initialized.
size_t sampled_softmax_forward_workspace_floats(const SampledSoftmaxParams& p);
cudaError_t sampled_softmax_forward(const SampledSoftmaxParams& p, float* loss, float* lse, float* workspace,
                                    cudaStream_t stream);
// deterministic: d_weight is bitwise reproducible run to run (no float atomics order).
size_t sampled_softmax_backward_workspace_floats(const SampledSoftmaxParams& p, bool deterministic);
cudaError_t sampled_softmax_backward(const SampledSoftmaxParams& p, const LossGradients& g, bool deterministic,
                                     cudaStream_t stream);

// Full: loss(t) = logsumexp over items not in excluded_ids - logit(target).
struct FullSoftmaxParams {
  LossInputs in;
  const int64_t* targets;      // [T]
  const int32_t* excluded_ids; // [E] sorted, distinct, E < N
  int64_t num_excluded;
};

size_t full_softmax_forward_workspace_floats(const FullSoftmaxParams& p);
cudaError_t full_softmax_forward(const FullSoftmaxParams& p, float* loss, float* lse, float* workspace,
                                 cudaStream_t stream);
size_t full_softmax_backward_workspace_floats(const FullSoftmaxParams& p);
cudaError_t full_softmax_backward(const FullSoftmaxParams& p, const LossGradients& g, cudaStream_t stream);

}  // namespace seqrec::cuda
