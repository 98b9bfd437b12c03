// The C++ ops of ops.cpp's schemas, stated once for every dispatch key that implements
// them: their arguments, their input checks (checks.h) and their registration. An
// implementation for key K (ops_cpu.cpp: CPU; ops_cuda.cpp: CUDA) defines the
// specializations impl::attention_fwd<K>, ..., impl::full_softmax_bwd<K>, which get checked
// inputs, and registers them with register_ops<K>(m) in its TORCH_LIBRARY_IMPL block.
#pragma once

#include <torch/library.h>

#include <optional>
#include <tuple>

#include "checks.h"

namespace seqrec {

using at::Tensor;

// The inputs that the forward and backward of an op share, in schema order.
struct AttentionArgs {
  const Tensor &q, &k, &v, &seq_start, &seq_len;
  int64_t max_seqlen;
  bool causal;
  double scale, dropout_p;
  const std::optional<Tensor>& dropout_seed;
};

struct SampledSoftmaxArgs {
  const Tensor &hidden, &weight, &pos_ids, &neg_ids;
  const std::optional<Tensor>& pos_log_q;
  const std::optional<Tensor>& neg_log_q;
  int64_t rows_per_group;
  bool remove_hits;
  double temperature;
  int64_t ignore_index;
};

struct FullSoftmaxArgs {
  const Tensor &hidden, &weight, &targets, &excluded_ids;
  double temperature;
  int64_t ignore_index;
};

// The implementations for dispatch key K, on checked inputs; results as in the schemas.
namespace impl {
template <c10::DispatchKey K>
std::tuple<Tensor, Tensor> attention_fwd(const AttentionArgs& a);  // out, lse
template <c10::DispatchKey K>
std::tuple<Tensor, Tensor, Tensor> attention_bwd(const AttentionArgs& a, const Tensor& dout, const Tensor& out,
                                                 const Tensor& lse);  // dq, dk, dv
template <c10::DispatchKey K>
std::tuple<Tensor, Tensor> sampled_softmax_fwd(const SampledSoftmaxArgs& a);  // loss, lse
template <c10::DispatchKey K>
std::tuple<Tensor, Tensor> sampled_softmax_bwd(const SampledSoftmaxArgs& a, const Tensor& grad_loss, const Tensor& lse,
                                               bool deterministic);  // d hidden, d weight
template <c10::DispatchKey K>
std::tuple<Tensor, Tensor> full_softmax_fwd(const FullSoftmaxArgs& a);  // loss, lse
template <c10::DispatchKey K>
std::tuple<Tensor, Tensor> full_softmax_bwd(const FullSoftmaxArgs& a, const Tensor& grad_loss,
                                            const Tensor& lse);  // d hidden, d weight
}  // namespace impl

// The ops as registered (the schemas' arguments): the input checks, then K's implementation.
template <c10::DispatchKey K>
std::tuple<Tensor, Tensor> attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& seq_start,
                                         const Tensor& seq_len, int64_t max_seqlen, bool causal, double scale,
                                         double dropout_p, const std::optional<Tensor>& dropout_seed) {
  check_attention_inputs(q, k, v, seq_start, seq_len, max_seqlen, dropout_p, dropout_seed);
  return impl::attention_fwd<K>({q, k, v, seq_start, seq_len, max_seqlen, causal, scale, dropout_p, dropout_seed});
}

template <c10::DispatchKey K>
std::tuple<Tensor, Tensor, Tensor> attention_bwd(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                                                 const Tensor& out, const Tensor& lse, const Tensor& seq_start,
                                                 const Tensor& seq_len, int64_t max_seqlen, bool causal, double scale,
                                                 double dropout_p, const std::optional<Tensor>& dropout_seed) {
  check_attention_inputs(q, k, v, seq_start, seq_len, max_seqlen, dropout_p, dropout_seed);
  check_attention_backward_inputs(dout, q, out, lse);
  return impl::attention_bwd<K>({q, k, v, seq_start, seq_len, max_seqlen, causal, scale, dropout_p, dropout_seed}, dout,
                                out, lse);
}

template <c10::DispatchKey K>
std::tuple<Tensor, Tensor> sampled_softmax_fwd(const Tensor& hidden, const Tensor& weight, const Tensor& pos_ids,
                                               const Tensor& neg_ids, const std::optional<Tensor>& pos_log_q,
                                               const std::optional<Tensor>& neg_log_q, int64_t rows_per_group,
                                               bool remove_hits, double temperature, int64_t ignore_index) {
  check_sampled_inputs(hidden, weight, pos_ids, neg_ids, pos_log_q, neg_log_q, rows_per_group, temperature,
                       ignore_index);
  return impl::sampled_softmax_fwd<K>(
      {hidden, weight, pos_ids, neg_ids, pos_log_q, neg_log_q, rows_per_group, remove_hits, temperature, ignore_index});
}

template <c10::DispatchKey K>
std::tuple<Tensor, Tensor> sampled_softmax_bwd(const Tensor& grad_loss, const Tensor& hidden, const Tensor& weight,
                                               const Tensor& pos_ids, const Tensor& neg_ids,
                                               const std::optional<Tensor>& pos_log_q,
                                               const std::optional<Tensor>& neg_log_q, const Tensor& lse,
                                               int64_t rows_per_group, bool remove_hits, double temperature,
                                               int64_t ignore_index, bool deterministic) {
  check_sampled_inputs(hidden, weight, pos_ids, neg_ids, pos_log_q, neg_log_q, rows_per_group, temperature,
                       ignore_index);
  check_loss_grads(grad_loss, lse, hidden);
  return impl::sampled_softmax_bwd<K>(
      {hidden, weight, pos_ids, neg_ids, pos_log_q, neg_log_q, rows_per_group, remove_hits, temperature, ignore_index},
      grad_loss, lse, deterministic);
}

template <c10::DispatchKey K>
std::tuple<Tensor, Tensor> full_softmax_fwd(const Tensor& hidden, const Tensor& weight, const Tensor& targets,
                                            const Tensor& excluded_ids, double temperature, int64_t ignore_index) {
  check_full_inputs(hidden, weight, targets, excluded_ids, temperature, ignore_index);
  return impl::full_softmax_fwd<K>({hidden, weight, targets, excluded_ids, temperature, ignore_index});
}

template <c10::DispatchKey K>
std::tuple<Tensor, Tensor> full_softmax_bwd(const Tensor& grad_loss, const Tensor& hidden, const Tensor& weight,
                                            const Tensor& targets, const Tensor& excluded_ids, const Tensor& lse,
                                            double temperature, int64_t ignore_index) {
  check_full_inputs(hidden, weight, targets, excluded_ids, temperature, ignore_index);
  check_loss_grads(grad_loss, lse, hidden);
  return impl::full_softmax_bwd<K>({hidden, weight, targets, excluded_ids, temperature, ignore_index}, grad_loss, lse);
}

// Registers every op of ops.cpp for dispatch key K.
template <c10::DispatchKey K>
void register_ops(torch::Library& m) {
  m.impl("attention_fwd_cuda", &attention_fwd<K>);
  m.impl("attention_bwd_cuda", &attention_bwd<K>);
  m.impl("sampled_softmax_fwd_cuda", &sampled_softmax_fwd<K>);
  m.impl("sampled_softmax_bwd_cuda", &sampled_softmax_bwd<K>);
  m.impl("full_softmax_fwd_cuda", &full_softmax_fwd<K>);
  m.impl("full_softmax_bwd_cuda", &full_softmax_bwd<K>);
}

}  // namespace seqrec
