// CUDA implementations of the `cuda` backend's ops: checks, allocation and launch of the
// kernels in csrc/cuda/*.cu (declared in cuda/kernels.h) on the current stream of the
// inputs' device. Compiled only when the extension is built with CUDA.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <tuple>

#include "checks.h"
#include "cuda/dropout_hash.h"
#include "cuda/kernels.h"

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

cuda::Bhld bhld(const Tensor& t) { return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)}; }

Tensor float_workspace(size_t floats, const Tensor& like) {
  return at::zeros({static_cast<int64_t>(floats)}, like.options().dtype(at::kFloat));
}

cuda::AttentionParams attention_params(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                                       const Tensor& lse, const Tensor& seq_start, const Tensor& seq_len,
                                       int64_t max_seqlen, bool causal, double scale, double dropout_p,
                                       const std::optional<Tensor>& dropout_seed) {
  TORCH_CHECK_VALUE(
      max_seqlen <= std::numeric_limits<int32_t>::max() && q.size(2) <= std::numeric_limits<int32_t>::max(),
      "max_seqlen: expected at most 2**31 - 1, got ", max_seqlen);
  cuda::AttentionParams p{};
  p.q = bhld(q);
  p.k = bhld(k);
  p.v = bhld(v);
  p.out = bhld(out);
  p.lse = lse.data_ptr<float>();
  p.seq_start = seq_start.data_ptr<int32_t>();  // contiguous: check_attention_inputs
  p.seq_len = seq_len.data_ptr<int32_t>();
  p.batch = static_cast<int>(q.size(0));
  p.num_heads = static_cast<int>(q.size(1));
  p.num_rows = static_cast<int>(q.size(2));
  p.head_dim = static_cast<int>(q.size(3));
  p.num_seqs = static_cast<int>(seq_len.size(0));
  p.max_seqlen = static_cast<int>(max_seqlen);
  p.causal = causal;
  p.scale = static_cast<float>(scale);
  p.keep_threshold = dropout::keep_threshold(dropout_p);
  p.dropout_scale = static_cast<float>(1.0 / (1.0 - dropout_p));
  p.dropout_seed = dropout_seed ? dropout_seed->data_ptr<int64_t>() : nullptr;
  p.dtype = kernel_dtype(q);
  return p;
}

std::tuple<Tensor, Tensor> attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& seq_start,
                                         const Tensor& seq_len, int64_t max_seqlen, bool causal, double scale,
                                         double dropout_p, const std::optional<Tensor>& dropout_seed) {
  check_attention_inputs(q, k, v, seq_start, seq_len, max_seqlen, dropout_p, dropout_seed);
  c10::cuda::CUDAGuard guard(q.device());
  auto out = at::zeros_like(q);  // rows outside every sequence stay zero
  auto lse = at::full(q.sizes().slice(0, 3), -std::numeric_limits<float>::infinity(), q.options().dtype(at::kFloat));
  if (q.numel() == 0 || seq_len.numel() == 0 || max_seqlen == 0) return {out, lse};  // no launch with an empty grid
  auto p = attention_params(q, k, v, out, lse, seq_start, seq_len, max_seqlen, causal, scale, dropout_p, dropout_seed);
  C10_CUDA_CHECK(cuda::attention_forward(p, c10::cuda::getCurrentCUDAStream()));
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> attention_bwd(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                                                 const Tensor& out, const Tensor& lse, const Tensor& seq_start,
                                                 const Tensor& seq_len, int64_t max_seqlen, bool causal, double scale,
                                                 double dropout_p, const std::optional<Tensor>& dropout_seed) {
  check_attention_inputs(q, k, v, seq_start, seq_len, max_seqlen, dropout_p, dropout_seed);
  check_attention_backward_inputs(dout, q, out, lse);
  c10::cuda::CUDAGuard guard(q.device());
  auto dq = at::zeros_like(q), dk = at::zeros_like(k), dv = at::zeros_like(v);
  if (q.numel() == 0 || seq_len.numel() == 0 || max_seqlen == 0) return {dq, dk, dv};
  auto dout_unit = unit_stride_rows(dout);  // kept alive until the kernels are queued
  auto lse_contiguous = lse.contiguous();
  cuda::AttentionBackwardParams p{};
  p.fwd = attention_params(q, k, v, out, lse_contiguous, seq_start, seq_len, max_seqlen, causal, scale, dropout_p,
                           dropout_seed);
  p.dout = bhld(dout_unit);
  p.dq = bhld(dq);
  p.dk = bhld(dk);
  p.dv = bhld(dv);
  auto workspace = float_workspace(cuda::attention_backward_workspace_floats(p), q);
  p.workspace = workspace.data_ptr<float>();
  C10_CUDA_CHECK(cuda::attention_backward(p, c10::cuda::getCurrentCUDAStream()));
  return {dq, dk, dv};
}

cuda::LossInputs loss_inputs(const Tensor& hidden, const Tensor& weight, double temperature, int64_t ignore_index) {
  return {hidden.data_ptr(), weight.data_ptr(),   hidden.stride(0), weight.stride(0),
          hidden.size(0),    weight.size(0),      hidden.size(1),   static_cast<float>(temperature),
          ignore_index,      kernel_dtype(hidden)};
}

// Keeps the converted ids and log_q alive while the kernels read them.
struct SampledArguments {
  Tensor pos_ids, neg_ids, pos_log_q, neg_log_q;
  cuda::SampledSoftmaxParams params{};

  SampledArguments(const Tensor& hidden, const Tensor& weight, const Tensor& pos, const Tensor& neg,
                   const std::optional<Tensor>& pos_q, const std::optional<Tensor>& neg_q, int64_t rows_per_group,
                   bool remove_hits, double temperature, int64_t ignore_index)
      : pos_ids(pos.to(at::kLong).contiguous()),
        neg_ids(neg.to(at::kLong).contiguous()),
        pos_log_q(pos_q ? pos_q->to(at::kFloat).contiguous() : Tensor()),
        neg_log_q(neg_q ? neg_q->to(at::kFloat).contiguous() : Tensor()) {
    params.in = loss_inputs(hidden, weight, temperature, ignore_index);
    params.pos_ids = pos_ids.data_ptr<int64_t>();
    params.neg_ids = neg_ids.data_ptr<int64_t>();
    params.pos_log_q = pos_log_q.defined() ? pos_log_q.data_ptr<float>() : nullptr;
    params.neg_log_q = neg_log_q.defined() ? neg_log_q.data_ptr<float>() : nullptr;
    params.num_groups = neg_ids.size(0);
    params.num_neg = neg_ids.size(1);
    params.rows_per_group = rows_per_group;
    params.remove_hits = remove_hits;
  }
};

std::tuple<Tensor, Tensor> row_outputs(const Tensor& hidden) {
  auto options = hidden.options().dtype(at::kFloat);
  return {at::empty({hidden.size(0)}, options), at::empty({hidden.size(0)}, options)};
}

// Gradient buffers: d_hidden [T, D] in the input dtype, d_weight [N, D] float32 (zeroed).
struct GradientBuffers {
  Tensor grad_loss, lse, d_hidden, d_weight, workspace;
  cuda::LossGradients grads{};

  GradientBuffers(const Tensor& grad, const Tensor& lse_in, const Tensor& hidden, const Tensor& weight,
                  size_t workspace_floats)
      : grad_loss(grad.to(at::kFloat).contiguous()),
        lse(lse_in.to(at::kFloat).contiguous()),
        d_hidden(at::empty({hidden.size(0), hidden.size(1)}, hidden.options())),
        d_weight(at::zeros({weight.size(0), weight.size(1)}, weight.options().dtype(at::kFloat))),
        workspace(float_workspace(workspace_floats, hidden)) {
    grads = {grad_loss.data_ptr<float>(), lse.data_ptr<float>(), d_hidden.data_ptr(), d_weight.data_ptr<float>(),
             workspace.data_ptr<float>()};
  }
  std::tuple<Tensor, Tensor> result(const Tensor& weight) const {
    return {d_hidden, d_weight.to(weight.scalar_type())};
  }
};

std::tuple<Tensor, Tensor> sampled_softmax_fwd(const Tensor& hidden, const Tensor& weight, const Tensor& pos_ids,
                                               const Tensor& neg_ids, const std::optional<Tensor>& pos_log_q,
                                               const std::optional<Tensor>& neg_log_q, int64_t rows_per_group,
                                               bool remove_hits, double temperature, int64_t ignore_index) {
  check_sampled_inputs(hidden, weight, pos_ids, neg_ids, pos_log_q, neg_log_q, rows_per_group, temperature,
                       ignore_index);
  c10::cuda::CUDAGuard guard(hidden.device());
  SampledArguments args(hidden, weight, pos_ids, neg_ids, pos_log_q, neg_log_q, rows_per_group, remove_hits,
                        temperature, ignore_index);
  auto [loss, lse] = row_outputs(hidden);
  if (hidden.size(0) == 0) return {loss, lse};
  C10_CUDA_CHECK(cuda::sampled_softmax_forward(args.params, loss.data_ptr<float>(), lse.data_ptr<float>(),
                                               c10::cuda::getCurrentCUDAStream()));
  return {loss, lse};
}

std::tuple<Tensor, Tensor> sampled_softmax_bwd(const Tensor& grad_loss, const Tensor& hidden, const Tensor& weight,
                                               const Tensor& pos_ids, const Tensor& neg_ids,
                                               const std::optional<Tensor>& pos_log_q,
                                               const std::optional<Tensor>& neg_log_q, const Tensor& lse,
                                               int64_t rows_per_group, bool remove_hits, double temperature,
                                               int64_t ignore_index, bool deterministic) {
  check_sampled_inputs(hidden, weight, pos_ids, neg_ids, pos_log_q, neg_log_q, rows_per_group, temperature,
                       ignore_index);
  check_loss_grads(grad_loss, lse, hidden);
  c10::cuda::CUDAGuard guard(hidden.device());
  SampledArguments args(hidden, weight, pos_ids, neg_ids, pos_log_q, neg_log_q, rows_per_group, remove_hits,
                        temperature, ignore_index);
  GradientBuffers buffers(grad_loss, lse, hidden, weight,
                          cuda::sampled_softmax_backward_workspace_floats(args.params, deterministic));
  if (hidden.size(0) == 0) return buffers.result(weight);
  C10_CUDA_CHECK(
      cuda::sampled_softmax_backward(args.params, buffers.grads, deterministic, c10::cuda::getCurrentCUDAStream()));
  return buffers.result(weight);
}

cuda::FullSoftmaxParams full_params(const Tensor& hidden, const Tensor& weight, const Tensor& targets,
                                    const Tensor& excluded_ids, double temperature, int64_t ignore_index) {
  return {loss_inputs(hidden, weight, temperature, ignore_index), targets.data_ptr<int64_t>(),
          excluded_ids.data_ptr<int32_t>(), excluded_ids.numel()};
}

std::tuple<Tensor, Tensor> full_softmax_fwd(const Tensor& hidden, const Tensor& weight, const Tensor& targets,
                                            const Tensor& excluded_ids, double temperature, int64_t ignore_index) {
  check_full_inputs(hidden, weight, targets, excluded_ids, temperature, ignore_index);
  c10::cuda::CUDAGuard guard(hidden.device());
  auto target = targets.to(at::kLong).contiguous();
  auto excluded = excluded_ids.to(at::kInt).contiguous();
  auto [loss, lse] = row_outputs(hidden);
  if (hidden.size(0) == 0) return {loss, lse};
  C10_CUDA_CHECK(cuda::full_softmax_forward(full_params(hidden, weight, target, excluded, temperature, ignore_index),
                                            loss.data_ptr<float>(), lse.data_ptr<float>(),
                                            c10::cuda::getCurrentCUDAStream()));
  return {loss, lse};
}

std::tuple<Tensor, Tensor> full_softmax_bwd(const Tensor& grad_loss, const Tensor& hidden, const Tensor& weight,
                                            const Tensor& targets, const Tensor& excluded_ids, const Tensor& lse,
                                            double temperature, int64_t ignore_index) {
  check_full_inputs(hidden, weight, targets, excluded_ids, temperature, ignore_index);
  check_loss_grads(grad_loss, lse, hidden);
  c10::cuda::CUDAGuard guard(hidden.device());
  auto target = targets.to(at::kLong).contiguous();
  auto excluded = excluded_ids.to(at::kInt).contiguous();
  auto params = full_params(hidden, weight, target, excluded, temperature, ignore_index);
  GradientBuffers buffers(grad_loss, lse, hidden, weight, cuda::full_softmax_backward_workspace_floats(params));
  if (hidden.size(0) == 0) return buffers.result(weight);
  C10_CUDA_CHECK(cuda::full_softmax_backward(params, buffers.grads, c10::cuda::getCurrentCUDAStream()));
  return buffers.result(weight);
}

}  // namespace

TORCH_LIBRARY_IMPL(seqrec, CUDA, m) {
  m.impl("attention_fwd_cuda", &attention_fwd);
  m.impl("attention_bwd_cuda", &attention_bwd);
  m.impl("sampled_softmax_fwd_cuda", &sampled_softmax_fwd);
  m.impl("sampled_softmax_bwd_cuda", &sampled_softmax_bwd);
  m.impl("full_softmax_fwd_cuda", &full_softmax_fwd);
  m.impl("full_softmax_bwd_cuda", &full_softmax_bwd);
}

}  // namespace seqrec
