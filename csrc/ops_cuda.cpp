// CUDA implementations of the `cuda` backend's ops (op_impls.h's impl::*<CUDA>, on checked
// inputs): allocation and launch of the kernels in csrc/cuda/*.cu (declared in
// cuda/kernels.h) on the current stream of the inputs' device. Compiled only when the
// extension is built with CUDA.
#include <ATen/Context.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <atomic>
#include <limits>
#include <tuple>

#include "checks.h"
#include "cuda/dropout_hash.h"
#include "cuda/kernels.h"
#include "cuda/tile_plan.h"
#include "op_impls.h"

namespace seqrec {
namespace {

using at::Tensor;

cuda::ScalarType kernel_dtype(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf:
      return cuda::ScalarType::kFloat16;
    case at::kBFloat16:
      return cuda::ScalarType::kBFloat16;
    default:
      return cuda::ScalarType::kFloat32;  // the checks allow nothing else
  }
}

// float32 tile products on 3xTF32 tensor cores under torch.set_float32_matmul_precision(
// "high") (also set by torch.backends.cuda.matmul.allow_tf32), IEEE FFMA under "highest";
// "medium" never reaches here (the Python glue casts its operands to bfloat16).
bool uses_tf32x3(const Tensor& t) {
  return t.scalar_type() == at::kFloat &&
         at::globalContext().float32MatmulPrecision() == at::Float32MatmulPrecision::HIGH;
}

cuda::Bhld bhld(const Tensor& t) { return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)}; }

// Kernel scratch from torch's caching allocator (visible to it and to CUDA-graph pools).
Tensor float_workspace(size_t floats, const Tensor& like) {
  return at::zeros({static_cast<int64_t>(floats)}, like.options().dtype(at::kFloat));
}
Tensor scratch(size_t floats, const Tensor& like) {  // not initialized: the kernels write it before reading
  return at::empty({static_cast<int64_t>(floats)}, like.options().dtype(at::kFloat));
}

// The operand rows the kernels read (tile_plan.h's padded_read_dim): `t` itself, or, for
// 16-bit rows that allow only 2-byte copies (an odd head dim, row stride or start) where
// the kernels re-read them (a sequence longer than kPadAfterRows), a copy whose rows are
// zero-padded to padded_read_dim elements (16-byte cp.async).
bool pads_rows(const Tensor& q, int64_t max_seqlen) {
  if (q.element_size() != 2 || max_seqlen <= cuda::attn_plan::kPadAfterRows) return false;
  const int64_t batch_stride = q.size(0) > 1 ? q.stride(0) : 0;  // unused with one batch row
  const bool odd = ((q.size(3) | batch_stride | q.stride(1) | q.stride(2)) & 1) != 0;
  return odd || reinterpret_cast<uintptr_t>(q.data_ptr()) % 4 != 0;
}
Tensor read_rows(const Tensor& t, bool pad) {
  if (!pad) return t;
  const int64_t d = t.size(3);
  return at::constant_pad_nd(t, {0, cuda::attn_plan::padded_read_dim(static_cast<int>(d)) - d});
}

// Whether the attention kernels launch: an empty grid (no rows, sequences or heads, or
// max_seqlen 0) launches nothing.
bool launches(const AttentionArgs& a) { return a.q.numel() > 0 && a.seq_len.numel() > 0 && a.max_seqlen > 0; }

cuda::AttentionParams attention_params(const AttentionArgs& a, const Tensor& out, const Tensor& lse) {
  TORCH_CHECK_VALUE(
      a.max_seqlen <= std::numeric_limits<int32_t>::max() && a.q.size(2) <= std::numeric_limits<int32_t>::max(),
      "max_seqlen: expected at most 2**31 - 1, got ", a.max_seqlen);
  cuda::AttentionParams p{};
  p.q = bhld(a.q);
  p.k = bhld(a.k);
  p.v = bhld(a.v);
  p.out = bhld(out);
  p.lse = lse.data_ptr<float>();
  p.seq_start = a.seq_start.data_ptr<int32_t>();  // contiguous: check_attention_inputs
  p.seq_len = a.seq_len.data_ptr<int32_t>();
  p.batch = static_cast<int>(a.q.size(0));
  p.num_heads = static_cast<int>(a.q.size(1));
  p.num_rows = static_cast<int>(a.q.size(2));
  p.head_dim = static_cast<int>(out.size(3));
  p.read_dim = static_cast<int>(a.q.size(3));
  p.num_seqs = static_cast<int>(a.seq_len.size(0));
  p.max_seqlen = static_cast<int>(a.max_seqlen);
  p.causal = a.causal;
  p.scale = static_cast<float>(a.scale);
  p.keep_threshold = dropout::keep_threshold(a.dropout_p);
  p.dropout_scale = static_cast<float>(1.0 / (1.0 - a.dropout_p));
  p.dropout_seed = a.dropout_seed ? a.dropout_seed->data_ptr<int64_t>() : nullptr;
  p.dtype = kernel_dtype(a.q);
  p.tf32x3 = uses_tf32x3(a.q);
  return p;
}

cuda::LossInputs loss_inputs(const Tensor& hidden, const Tensor& weight, double temperature, int64_t ignore_index) {
  return {hidden.data_ptr(), weight.data_ptr(),    hidden.stride(0),   weight.stride(0),
          hidden.size(0),    weight.size(0),       hidden.size(1),     static_cast<float>(temperature),
          ignore_index,      kernel_dtype(hidden), uses_tf32x3(hidden)};
}

// Keeps the converted ids and log_q alive while the kernels read them.
struct SampledArguments {
  Tensor pos_ids, neg_ids, pos_log_q, neg_log_q;
  cuda::SampledSoftmaxParams params{};

  explicit SampledArguments(const SampledSoftmaxArgs& a)
      : pos_ids(a.pos_ids.to(at::kLong).contiguous()),
        neg_ids(a.neg_ids.to(at::kLong).contiguous()),
        pos_log_q(a.pos_log_q ? a.pos_log_q->to(at::kFloat).contiguous() : Tensor()),
        neg_log_q(a.neg_log_q ? a.neg_log_q->to(at::kFloat).contiguous() : Tensor()) {
    params.in = loss_inputs(a.hidden, a.weight, a.temperature, a.ignore_index);
    params.pos_ids = pos_ids.data_ptr<int64_t>();
    params.neg_ids = neg_ids.data_ptr<int64_t>();
    params.pos_log_q = pos_log_q.defined() ? pos_log_q.data_ptr<float>() : nullptr;
    params.neg_log_q = neg_log_q.defined() ? neg_log_q.data_ptr<float>() : nullptr;
    params.num_groups = neg_ids.size(0);
    params.num_neg = neg_ids.size(1);
    params.rows_per_group = a.rows_per_group;
    params.remove_hits = a.remove_hits;
  }
};

std::tuple<Tensor, Tensor> row_outputs(const Tensor& hidden) {
  auto options = hidden.options().dtype(at::kFloat);
  return {at::empty({hidden.size(0)}, options), at::empty({hidden.size(0)}, options)};
}

// The full loss's d weight written by its kernels in the input dtype (LossGradients::d_weight_out),
// a tuning candidate that waits for a GPU measurement: off by default, set process-wide by
// seqrec::_set_full_loss_item_grad_in_dtype (benchmarks/tune.py times both).
std::atomic<bool> full_loss_item_grad_in_dtype{false};

bool set_full_loss_item_grad_in_dtype(bool enabled) { return full_loss_item_grad_in_dtype.exchange(enabled); }

// The attention forward's K/V stages (csrc/cuda/attention.cu): 1 (today's) or 2 (double-buffered,
// 16-bit), a tuning candidate set process-wide by seqrec::_set_attention_kv_stages (benchmarks/tune.py).
int64_t set_attention_kv_stages(int64_t stages) {
  TORCH_CHECK_VALUE(stages == 1 || stages == 2, "_set_attention_kv_stages: stages must be 1 or 2, got ", stages);
  return cuda::set_attention_kv_stages(static_cast<int>(stages));
}

// Gradient buffers: d_hidden [T, D] in the input dtype, d_weight [N, D] float32 (zeroed), or,
// with in_dtype (full loss), d_weight in the input dtype, not initialized: the kernels write it.
struct GradientBuffers {
  Tensor grad_loss, lse, d_hidden, d_weight, workspace;
  cuda::LossGradients grads{};

  GradientBuffers(const Tensor& grad, const Tensor& lse_in, const Tensor& hidden, const Tensor& weight,
                  size_t workspace_floats, bool in_dtype = false)
      : grad_loss(grad.to(at::kFloat).contiguous()),
        lse(lse_in.to(at::kFloat).contiguous()),
        d_hidden(at::empty({hidden.size(0), hidden.size(1)}, hidden.options())),
        d_weight(in_dtype ? at::empty({weight.size(0), weight.size(1)}, hidden.options())
                          : at::zeros({weight.size(0), weight.size(1)}, weight.options().dtype(at::kFloat))),
        workspace(float_workspace(workspace_floats, hidden)) {
    grads = {grad_loss.data_ptr<float>(), lse.data_ptr<float>(),
             d_hidden.data_ptr(),         in_dtype ? nullptr : d_weight.data_ptr<float>(),
             workspace.data_ptr<float>(), in_dtype ? d_weight.data_ptr() : nullptr};
  }
  std::tuple<Tensor, Tensor> result(const Tensor& weight) const {
    return {d_hidden, d_weight.to(weight.scalar_type())};
  }
};

// targets and excluded_ids: a's, as contiguous int64 / int32.
cuda::FullSoftmaxParams full_params(const FullSoftmaxArgs& a, const Tensor& targets, const Tensor& excluded_ids) {
  return {loss_inputs(a.hidden, a.weight, a.temperature, a.ignore_index), targets.data_ptr<int64_t>(),
          excluded_ids.data_ptr<int32_t>(), excluded_ids.numel()};
}

}  // namespace

// ------------------------------------------------------------------------- the ops ----

template <>
std::tuple<Tensor, Tensor> impl::attention_fwd<c10::DispatchKey::CUDA>(const AttentionArgs& a) {
  c10::cuda::CUDAGuard guard(a.q.device());
  const auto lse_sizes = a.q.sizes().slice(0, 3);
  const auto lse_options = a.q.options().dtype(at::kFloat);
  // The kernels write every row, padding included; without a launch (an empty grid) every
  // row is padding.
  if (!launches(a))
    return {at::zeros_like(a.q), at::full(lse_sizes, -std::numeric_limits<float>::infinity(), lse_options)};
  auto out = at::empty_like(a.q);
  auto lse = at::empty(lse_sizes, lse_options);
  const bool pad = pads_rows(a.q, a.max_seqlen) || pads_rows(a.k, a.max_seqlen) || pads_rows(a.v, a.max_seqlen);
  const Tensor q = read_rows(a.q, pad), k = read_rows(a.k, pad), v = read_rows(a.v, pad);
  auto p = attention_params(
      {q, k, v, a.seq_start, a.seq_len, a.max_seqlen, a.causal, a.scale, a.dropout_p, a.dropout_seed}, out, lse);
  C10_CUDA_CHECK(cuda::attention_forward(p, c10::cuda::getCurrentCUDAStream()));
  return {out, lse};
}

template <>
std::tuple<Tensor, Tensor, Tensor> impl::attention_bwd<c10::DispatchKey::CUDA>(const AttentionArgs& a,
                                                                               const Tensor& dout, const Tensor& out,
                                                                               const Tensor& lse) {
  c10::cuda::CUDAGuard guard(a.q.device());
  if (!launches(a)) return {at::zeros_like(a.q), at::zeros_like(a.k), at::zeros_like(a.v)};
  auto dq = at::empty_like(a.q), dk = at::empty_like(a.k), dv = at::empty_like(a.v);  // written in full
  const bool pad = pads_rows(a.q, a.max_seqlen) || pads_rows(a.k, a.max_seqlen) || pads_rows(a.v, a.max_seqlen) ||
                   pads_rows(dout, a.max_seqlen);
  // Kept alive until the kernels are queued.
  const Tensor q = read_rows(a.q, pad), k = read_rows(a.k, pad), v = read_rows(a.v, pad);
  const Tensor dout_read = read_rows(unit_stride_rows(dout), pad);
  auto lse_contiguous = lse.contiguous();
  cuda::AttentionBackwardParams p{};
  p.fwd =
      attention_params({q, k, v, a.seq_start, a.seq_len, a.max_seqlen, a.causal, a.scale, a.dropout_p, a.dropout_seed},
                       out, lse_contiguous);
  p.dout = bhld(dout_read);
  p.dq = bhld(dq);
  p.dk = bhld(dk);
  p.dv = bhld(dv);
  auto workspace = scratch(cuda::attention_backward_workspace_floats(p), a.q);  // delta: the dq kernel writes it
  p.workspace = workspace.data_ptr<float>();
  C10_CUDA_CHECK(cuda::attention_backward(p, c10::cuda::getCurrentCUDAStream()));
  return {dq, dk, dv};
}

template <>
std::tuple<Tensor, Tensor> impl::sampled_softmax_fwd<c10::DispatchKey::CUDA>(const SampledSoftmaxArgs& a) {
  c10::cuda::CUDAGuard guard(a.hidden.device());
  SampledArguments args(a);
  auto [loss, lse] = row_outputs(a.hidden);
  if (a.hidden.size(0) == 0) return {loss, lse};
  auto workspace = scratch(cuda::sampled_softmax_forward_workspace_floats(args.params), a.hidden);
  C10_CUDA_CHECK(cuda::sampled_softmax_forward(args.params, loss.data_ptr<float>(), lse.data_ptr<float>(),
                                               workspace.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()));
  return {loss, lse};
}

template <>
std::tuple<Tensor, Tensor> impl::sampled_softmax_bwd<c10::DispatchKey::CUDA>(const SampledSoftmaxArgs& a,
                                                                             const Tensor& grad_loss, const Tensor& lse,
                                                                             bool deterministic) {
  c10::cuda::CUDAGuard guard(a.hidden.device());
  SampledArguments args(a);
  GradientBuffers buffers(grad_loss, lse, a.hidden, a.weight,
                          cuda::sampled_softmax_backward_workspace_floats(args.params, deterministic));
  if (a.hidden.size(0) == 0) return buffers.result(a.weight);
  C10_CUDA_CHECK(
      cuda::sampled_softmax_backward(args.params, buffers.grads, deterministic, c10::cuda::getCurrentCUDAStream()));
  return buffers.result(a.weight);
}

template <>
std::tuple<Tensor, Tensor> impl::full_softmax_fwd<c10::DispatchKey::CUDA>(const FullSoftmaxArgs& a) {
  c10::cuda::CUDAGuard guard(a.hidden.device());
  auto target = a.targets.to(at::kLong).contiguous();
  auto excluded = a.excluded_ids.to(at::kInt).contiguous();
  auto [loss, lse] = row_outputs(a.hidden);
  if (a.hidden.size(0) == 0) return {loss, lse};
  auto params = full_params(a, target, excluded);
  auto workspace = scratch(cuda::full_softmax_forward_workspace_floats(params), a.hidden);
  C10_CUDA_CHECK(cuda::full_softmax_forward(params, loss.data_ptr<float>(), lse.data_ptr<float>(),
                                            workspace.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()));
  return {loss, lse};
}

template <>
std::tuple<Tensor, Tensor> impl::full_softmax_bwd<c10::DispatchKey::CUDA>(const FullSoftmaxArgs& a,
                                                                          const Tensor& grad_loss, const Tensor& lse) {
  c10::cuda::CUDAGuard guard(a.hidden.device());
  auto target = a.targets.to(at::kLong).contiguous();
  auto excluded = a.excluded_ids.to(at::kInt).contiguous();
  auto params = full_params(a, target, excluded);
  // (no rows: no kernel writes d weight, the zeroed float32 buffer is the gradient)
  GradientBuffers buffers(grad_loss, lse, a.hidden, a.weight, cuda::full_softmax_backward_workspace_floats(params),
                          full_loss_item_grad_in_dtype.load() && a.hidden.size(0) > 0);
  if (a.hidden.size(0) == 0) return buffers.result(a.weight);
  C10_CUDA_CHECK(cuda::full_softmax_backward(params, buffers.grads, c10::cuda::getCurrentCUDAStream()));
  return buffers.result(a.weight);
}

TORCH_LIBRARY_FRAGMENT(seqrec, m) {
  m.def("_set_full_loss_item_grad_in_dtype(bool enabled) -> bool", &set_full_loss_item_grad_in_dtype);
  m.def("_set_attention_kv_stages(int stages) -> int", &set_attention_kv_stages);
}

TORCH_LIBRARY_IMPL(seqrec, CUDA, m) { register_ops<c10::DispatchKey::CUDA>(m); }

}  // namespace seqrec
