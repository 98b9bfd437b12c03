// Input checks of the C++ ops, run by op_impls.h before the CPU or CUDA implementation.
// The public Python API validates first (with the same wording); these guard direct calls
// to torch.ops.seqrec.*_cuda so that bad input is an error naming the argument, never a
// crash. Value checks that would read device memory (a host sync) are left to Python.
#pragma once

#include <torch/library.h>

#include <ATen/ATen.h>

#include <atomic>
#include <optional>
#include <string>

#include "op_limits.h"

namespace seqrec {

// Whether the CPU ops check item id values (on by default). With the checks off they see
// out-of-range ids as the CUDA kernels do when no host check ran (torch.compile, CUDA
// graph capture): masked, never dereferenced. Tests turn them off to compare the masking
// with Triton's (op seqrec::_set_item_id_checks, ops_cpu.cpp).
inline std::atomic<bool> item_id_checks{true};

inline std::string dtype_name(const at::Tensor& t) { return std::string(c10::toString(t.scalar_type())); }

// float16, bfloat16 or float32 (float64 runs on backend='reference').
inline void check_kernel_dtype(const char* name, const at::Tensor& t) {
  auto dtype = t.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, name,
                   ": the 'cuda' backend takes float16, bfloat16 or float32, got ", dtype_name(t),
                   " (float64 runs on backend='reference')");
}

inline void check_dim(const char* name, const at::Tensor& t, int64_t ndim, const char* layout) {
  TORCH_CHECK_VALUE(t.dim() == ndim, name, ": expected ", ndim, " dimensions ", layout, ", got shape ", t.sizes());
}

inline void check_like(const char* name, const at::Tensor& t, const char* like_name, const at::Tensor& like) {
  TORCH_CHECK_VALUE(t.sizes() == like.sizes(), name, ": expected shape ", like.sizes(), " (the shape of ", like_name,
                    "), got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == like.scalar_type(), name, ": expected dtype ", dtype_name(like),
                   " (the dtype of ", like_name, "), got ", dtype_name(t));
  TORCH_CHECK_VALUE(t.device() == like.device(), name, ": expected device ", like.device(), " (the device of ",
                    like_name, "), got ", t.device());
}

inline void check_device(const char* name, const at::Tensor& t, const at::Tensor& like) {
  TORCH_CHECK_VALUE(t.device() == like.device(), name, ": expected a tensor on ", like.device(),
                    " (the device of the other inputs), got ", t.device());
}

// The kernels read index tensors through their raw data pointer.
inline void check_contiguous_index(const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.is_contiguous(), name, ": expected a contiguous index tensor, got shape ", t.sizes(),
                    " with strides ", t.strides(), " (call .contiguous())");
}

inline void check_index(const char* name, const at::Tensor& t, const at::Tensor& like) {
  check_device(name, t, like);
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, name,
                   ": expected dtype int32 or int64, got ", dtype_name(t));
  check_contiguous_index(name, t);
}

inline void check_unit_stride(const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.size(-1) <= 1 || t.stride(-1) == 1, name,
                    ": expected unit stride on the last dimension, got strides ", t.strides());
}

inline at::Tensor unit_stride_rows(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// ------------------------------------------------------------------------ attention ----

// q, k, v [B, H, L, D]; seq_start, seq_len int32 [S] with B == S (padded) or B == 1 (packed).
inline void check_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const at::Tensor& seq_start, const at::Tensor& seq_len, int64_t max_seqlen,
                                   double dropout_p, const std::optional<at::Tensor>& dropout_seed) {
  check_dim("q", q, 4, "[B, H, L, D]");
  check_kernel_dtype("q", q);
  check_like("k", k, "q", q);
  check_like("v", v, "q", q);
  for (const auto& [name, t] : {std::pair{"q", &q}, {"k", &k}, {"v", &v}}) check_unit_stride(name, *t);
  auto head_dim = q.size(3);
  TORCH_CHECK_VALUE(head_dim >= 1 && head_dim <= kMaxHeadDim, "q: head dim (the last dimension of [B, H, L, D]) must",
                    " be in 1..", kMaxHeadDim, ", got ", head_dim);
  for (const auto& [name, t] : {std::pair{"seq_start", &seq_start}, {"seq_len", &seq_len}}) {
    check_device(name, *t, q);
    TORCH_CHECK_TYPE(t->scalar_type() == at::kInt, name, ": expected dtype int32, got ", dtype_name(*t));
    check_dim(name, *t, 1, "[S]");
    check_contiguous_index(name, *t);
  }
  TORCH_CHECK_VALUE(seq_start.size(0) == seq_len.size(0), "seq_start: expected shape (", seq_len.size(0),
                    ",) (the shape of seq_len), got ", seq_start.sizes());
  auto num_seqs = seq_len.size(0), batch = q.size(0);
  TORCH_CHECK_VALUE(batch == num_seqs || batch == 1, "seq_len: expected one length per batch row of q (", batch,
                    ") or, packed, any number with B == 1, got ", num_seqs);
  TORCH_CHECK_VALUE(max_seqlen >= 0, "max_seqlen: expected an int >= 0, got ", max_seqlen);
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p: expected a value in [0.0, 1.0), got ", dropout_p);
  TORCH_CHECK_VALUE(dropout_seed.has_value() == (dropout_p > 0.0),
                    "dropout_seed: expected a [1] seed tensor iff dropout_p > 0, got ",
                    dropout_seed.has_value() ? "one" : "none", " with dropout_p=", dropout_p);
  if (dropout_seed) {
    check_device("dropout_seed", *dropout_seed, q);
    TORCH_CHECK_TYPE(dropout_seed->scalar_type() == at::kLong, "dropout_seed: expected dtype int64, got ",
                     dtype_name(*dropout_seed));
    TORCH_CHECK_VALUE(dropout_seed->numel() == 1, "dropout_seed: expected one element, got shape ",
                      dropout_seed->sizes());
  }
  // Sequences must lie inside their batch row: cheap on the host, a sync on a device.
  // A loop over the int32 values (contiguous, checked above), no tensor ops: host time.
  if (q.is_cpu()) {
    const int32_t* start = seq_start.data_ptr<int32_t>();
    const int32_t* length = seq_len.data_ptr<int32_t>();
    bool inside = true;
    for (int64_t s = 0; s < num_seqs; ++s) {
      inside &=
          start[s] >= 0 && length[s] >= 0 && int64_t{start[s]} + length[s] <= q.size(2) && length[s] <= max_seqlen;
    }
    TORCH_CHECK_VALUE(inside, "seq_start/seq_len: every sequence must lie in rows [0, L=", q.size(2),
                      ") of its batch row and be at most max_seqlen=", max_seqlen, " long");
  }
}

// dout may have any strides (autograd often hands in an expanded one): callers make it
// unit-stride on D with unit_stride_rows().
inline void check_attention_backward_inputs(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& out,
                                            const at::Tensor& lse) {
  check_like("dout", dout, "q", q);
  check_like("out", out, "q", q);
  check_unit_stride("out", out);
  check_device("lse", lse, q);
  TORCH_CHECK_TYPE(lse.scalar_type() == at::kFloat, "lse: expected dtype float32, got ", dtype_name(lse));
  TORCH_CHECK_VALUE(lse.sizes() == q.sizes().slice(0, 3), "lse: expected shape ", q.sizes().slice(0, 3),
                    " ([B, H, L] of q), got ", lse.sizes());
}

// --------------------------------------------------------------------- softmax losses ----

// hidden [T, D] and weight [N, D] of one kernel dtype, unit stride on D, D <= kMaxKernelHiddenDim.
inline void check_loss_inputs(const at::Tensor& hidden, const at::Tensor& weight, double temperature) {
  check_dim("hidden", hidden, 2, "[T, D]");
  check_kernel_dtype("hidden", hidden);
  TORCH_CHECK_VALUE(hidden.size(1) <= kMaxKernelHiddenDim, "hidden: expected D <= ", kMaxKernelHiddenDim,
                    " (the kernel backends' limit; backend='reference' has none), got D=", hidden.size(1));
  check_dim("weight", weight, 2, "[N, D]");
  check_device("weight", weight, hidden);
  TORCH_CHECK_TYPE(weight.scalar_type() == hidden.scalar_type(), "weight: expected dtype ", dtype_name(hidden),
                   " (the dtype of hidden), got ", dtype_name(weight));
  TORCH_CHECK_VALUE(weight.size(1) == hidden.size(1), "weight: expected D=", hidden.size(1),
                    " columns (the last dimension of hidden), got shape ", weight.sizes());
  TORCH_CHECK_VALUE(weight.size(0) >= 1, "weight: expected at least one item row, got shape ", weight.sizes());
  check_unit_stride("hidden", hidden);
  check_unit_stride("weight", weight);
  TORCH_CHECK_VALUE(temperature > 0.0, "temperature: expected a value > 0, got ", temperature);
}

// Whether every one of the n ids is in [0, num_items) or == ignore_index (a loop: host time).
template <typename index_t>
bool ids_in_range(const index_t* ids, int64_t n, int64_t num_items, std::optional<int64_t> ignore_index) {
  bool in_range = true;
  for (int64_t i = 0; i < n; ++i) {
    in_range &= (ids[i] >= 0 && ids[i] < num_items) || (ignore_index && ids[i] == *ignore_index);
  }
  return in_range;
}

template <typename index_t>
bool strictly_increasing(const index_t* ids, int64_t n) {
  bool increasing = true;
  for (int64_t i = 1; i < n; ++i) increasing &= ids[i - 1] < ids[i];
  return increasing;
}

// ids of `shape` in [0, N) or == ignore_index (values checked on the host only).
inline void check_ids(const char* name, const at::Tensor& ids, at::IntArrayRef shape, const at::Tensor& hidden,
                      int64_t num_items, std::optional<int64_t> ignore_index) {
  check_index(name, ids, hidden);
  TORCH_CHECK_VALUE(ids.sizes() == shape, name, ": expected shape ", shape, ", got ", ids.sizes());
  if (ids.is_cpu() && item_id_checks) {
    bool in_range = ids.scalar_type() == at::kInt
                        ? ids_in_range(ids.data_ptr<int32_t>(), ids.numel(), num_items, ignore_index)
                        : ids_in_range(ids.data_ptr<int64_t>(), ids.numel(), num_items, ignore_index);
    TORCH_CHECK_VALUE(in_range, name, ": expected item ids in [0, ", num_items, ") (N)");
  }
}

inline void check_log_q(const char* name, const std::optional<at::Tensor>& log_q, const char* ids_name,
                        const at::Tensor& ids) {
  if (!log_q) return;
  check_device(name, *log_q, ids);
  TORCH_CHECK_TYPE(at::isFloatingType(log_q->scalar_type()), name, ": expected a floating dtype, got ",
                   dtype_name(*log_q));
  TORCH_CHECK_VALUE(log_q->sizes() == ids.sizes(), name, ": expected shape ", ids.sizes(), " (the shape of ", ids_name,
                    "), got ", log_q->sizes());
}

// neg_ids [G, K] with G * rows_per_group == T.
inline void check_sampled_inputs(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& pos_ids,
                                 const at::Tensor& neg_ids, const std::optional<at::Tensor>& pos_log_q,
                                 const std::optional<at::Tensor>& neg_log_q, int64_t rows_per_group, double temperature,
                                 int64_t ignore_index) {
  check_loss_inputs(hidden, weight, temperature);
  auto rows = hidden.size(0), num_items = weight.size(0);
  check_ids("pos_ids", pos_ids, {rows}, hidden, num_items, ignore_index);
  check_dim("neg_ids", neg_ids, 2, "[G, K]");
  check_ids("neg_ids", neg_ids, neg_ids.sizes(), hidden, num_items, std::nullopt);
  TORCH_CHECK_VALUE(neg_ids.size(1) >= 1, "neg_ids: expected at least one negative (K >= 1), got shape ",
                    neg_ids.sizes());
  TORCH_CHECK_VALUE(rows_per_group >= 1 && neg_ids.size(0) * rows_per_group == rows,
                    "rows_per_group: expected G * rows_per_group == T (G=", neg_ids.size(0), ", T=", rows, "), got ",
                    rows_per_group);
  check_log_q("pos_log_q", pos_log_q, "pos_ids", pos_ids);
  check_log_q("neg_log_q", neg_log_q, "neg_ids", neg_ids);
}

inline void check_full_inputs(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                              const at::Tensor& excluded_ids, double temperature, int64_t ignore_index) {
  check_loss_inputs(hidden, weight, temperature);
  auto num_items = weight.size(0);
  check_ids("targets", targets, {hidden.size(0)}, hidden, num_items, ignore_index);
  check_dim("excluded_ids", excluded_ids, 1, "[E]");
  check_ids("excluded_ids", excluded_ids, excluded_ids.sizes(), hidden, num_items, std::nullopt);
  TORCH_CHECK_VALUE(excluded_ids.size(0) < num_items, "excluded_ids: excludes all ", num_items,
                    " items, leaving no class");
  if (excluded_ids.is_cpu() && item_id_checks) {
    bool increasing = excluded_ids.scalar_type() == at::kInt
                          ? strictly_increasing(excluded_ids.data_ptr<int32_t>(), excluded_ids.numel())
                          : strictly_increasing(excluded_ids.data_ptr<int64_t>(), excluded_ids.numel());
    TORCH_CHECK_VALUE(increasing, "excluded_ids: expected sorted, distinct ids");
  }
}

inline void check_loss_grads(const at::Tensor& grad_loss, const at::Tensor& lse, const at::Tensor& hidden) {
  for (const auto& [name, t] : {std::pair{"grad_loss", &grad_loss}, {"lse", &lse}}) {
    check_device(name, *t, hidden);
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == hidden.size(0), name, ": expected shape (", hidden.size(0),
                      ",) (one value per row of hidden), got ", t->sizes());
    TORCH_CHECK_TYPE(at::isFloatingType(t->scalar_type()), name, ": expected a floating dtype, got ", dtype_name(*t));
  }
}

}  // namespace seqrec
