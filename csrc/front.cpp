// The public functions' eager path on the kernel backends (`cpp`, `cuda`, `triton`), in C++:
// what seqrec_kernels/ops/attention.py and softmax_loss.py do before, around and after the
// kernel ops (the extension's of ops.cpp, or the Triton launchers registered as the custom ops
// seqrec::*_triton), for a plain eager call (no torch.compile, dispatch mode, functorch
// transform or tensor subclass: the Python caller decides, seqrec_kernels/ops/_front.py).
//
// A front either runs the call, or declines it before any side effect (no RNG draw, no
// device flag, no launch) by returning no output: then the public function takes its general
// path, whose Python checks raise the error naming the argument. The error messages live in
// one place (Python), and a front declines whatever the general path rejects. Running a call:
// the argument checks, the int32 sequence rows, the index value checks (CPU tensors: loops
// over their data; device tensors: a bool flag computed on the device, returned for
// seqrec_kernels.check(), no sync), the operand casts of the general path (the "medium"
// float32 precision rule of ops/_library.py's extension_operands on the extension, then
// autocast's), and one autograd node whose forward and backward are the registered kernel ops'
// CPU or CUDA kernels (redispatched below autograd and autocast, as the general path's eager
// Function calls them), so those ops still define what is computed. The losses' reduction
// runs inside that node too.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>

#include "op_impls.h"

namespace seqrec {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// ----------------------------------------------------------------------------- helpers ----

// The registered op `name` (ops.cpp's, or a Triton custom op), typed like its kernels.
template <typename Signature>
c10::TypedOperatorHandle<Signature> registered_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// A kernel phase's op on the extension (`cpp`/`cuda`: ops.cpp) or on Triton (its launcher, a
// Python function that ops/_library.py registers as the custom op seqrec::<family>_<phase>_triton,
// with the same schema), typed like the kernels; both found at first use, after the Python
// package (which calls the fronts) has defined the Triton ops.
template <typename Signature>
struct KernelOp {
  c10::TypedOperatorHandle<Signature> extension, triton;
  KernelOp(const char* extension_name, const char* triton_name)
      : extension(registered_op<Signature>(extension_name)), triton(registered_op<Signature>(triton_name)) {}
  const c10::TypedOperatorHandle<Signature>& operator()(bool on_triton) const { return on_triton ? triton : extension; }
};

// The dispatch keys of t's kernel, below autograd and autocast: what the eager path runs.
c10::DispatchKeySet kernel_keys(const Tensor& t) {
  return c10::DispatchKeySet(t.is_cuda() ? c10::DispatchKey::CUDA : c10::DispatchKey::CPU);
}

// The dispatch keys excluded around a kernel op's call. Autocast always: the tensor ops inside a
// kernel (the Triton launchers' allocations, casts and sorts) run with autocast off, as the
// general path runs them. Python dispatch modes for the extension's C++ kernels: modes see them
// as kernels, not the tensor ops inside them (their allocations; on the CPU the stand-in loops'
// read of a dropout seed), as under the custom ops. The Triton launchers are Python: a mode sees
// their tensor ops as on the general path (a host read inside one is seen).
c10::DispatchKeySet kernel_excluded(bool on_triton) {
  const c10::DispatchKeySet autocast{c10::DispatchKey::AutocastCPU, c10::DispatchKey::AutocastCUDA};
  return on_triton ? autocast
                   : autocast | c10::DispatchKeySet{c10::DispatchKey::Python, c10::DispatchKey::PythonTLSSnapshot};
}

bool dense(const Tensor& t) { return t.layout() == at::kStrided && !t.is_nested(); }

// float16, bfloat16 or float32: the dtypes of the kernel backends (float64 is reference-only).
bool kernel_dtype(const Tensor& t) {
  auto dtype = t.scalar_type();
  return dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16;
}

bool same_shape_dtype_device(const Tensor& t, const Tensor& like) {
  return dense(t) && t.sizes() == like.sizes() && t.scalar_type() == like.scalar_type() && t.device() == like.device();
}

bool index_tensor(const Tensor& t, const Tensor& like) {
  return dense(t) && (t.scalar_type() == at::kInt || t.scalar_type() == at::kLong) && t.device() == like.device();
}

// f(data) on the values of the index tensor t (int32 or int64, on the CPU; contiguous or copied).
template <typename Function>
void with_index_data(const Tensor& t, const Function& f) {
  auto values = t.contiguous();
  if (values.scalar_type() == at::kInt) {
    f(values.const_data_ptr<int32_t>());
  } else {
    f(values.const_data_ptr<int64_t>());
  }
}

// Whether every value of the index tensor t (int32 or int64, on the CPU) satisfies ok(value).
template <typename Predicate>
bool all_values(const Tensor& t, const Predicate& ok) {
  bool all = true;
  with_index_data(t, [&](const auto* data) {
    for (int64_t i = 0; i < t.numel(); ++i) all &= ok(int64_t{data[i]});
  });
  return all;
}

// Tensors flagged on the device: "values outside [low, high] (other than `allowed`)", a bool scalar.
Tensor outside(const Tensor& values, int64_t low, int64_t high, std::optional<int64_t> allowed = std::nullopt) {
  auto bad = values.clamp(low, high).ne(values);
  if (allowed && !(low <= *allowed && *allowed <= high)) bad &= values.ne(*allowed);
  return bad.any();
}

// The general path's operand casts: on the extension (not on Triton, whose kernels convert their
// tiles in registers), under torch's "medium" float32 matmul precision float32
// operands become bfloat16 copies (ops/_library.py's extension_operands); then, under autocast
// of their device type, floating operands other than float64 take the autocast dtype
// (_library._with_autocast). Returns whether the medium rule cast them (outputs go back).
bool cast_operands(std::initializer_list<Tensor*> operands, bool on_triton) {
  bool medium = !on_triton && at::globalContext().float32MatmulPrecision() == at::Float32MatmulPrecision::MEDIUM &&
                (*operands.begin())->scalar_type() == at::kFloat;
  if (medium) {
    for (Tensor* t : operands) *t = t->to(at::kBFloat16);
  }
  auto device_type = (*operands.begin())->device().type();
  if ((device_type == at::kCPU || device_type == at::kCUDA) && at::autocast::is_autocast_enabled(device_type)) {
    auto dtype = at::autocast::get_autocast_dtype(device_type);
    for (Tensor* t : operands) {
      if (t->is_floating_point() && t->scalar_type() != at::kDouble) *t = t->to(dtype);
    }
  }
  return medium;
}

std::optional<Tensor> optional(const Tensor& t) { return t.defined() ? std::optional<Tensor>(t) : std::nullopt; }

// ------------------------------------------------------------------------ attention ----

using AttentionFwd = decltype(attention_fwd<c10::DispatchKey::CPU>);
using AttentionBwd = decltype(attention_bwd<c10::DispatchKey::CPU>);

// A tensor over `base`'s memory with `sizes` and `strides`, made without a dispatch: not an
// autograd view (a kernel's fresh output relaid is a plain output of the node, modifiable in
// place as the general path's views of its outputs are).
Tensor relaid(const Tensor& base, at::IntArrayRef sizes, at::IntArrayRef strides) {
  auto own = at::detail::make_tensor<c10::TensorImpl>(c10::Storage(base.storage()), base.key_set(), base.dtype());
  own.unsafeGetTensorImpl()->set_sizes_and_strides(sizes, strides, base.storage_offset());
  return own;
}

// Packed [T, H, D] as the kernels' [1, H, T, D], without a dispatch; it shares the input's
// version counter, so an in-place change of a saved input is still refused.
Tensor batch_view(const Tensor& packed) {
  auto view = relaid(packed, {1, packed.size(1), packed.size(0), packed.size(2)},
                     {packed.size(0) * packed.stride(0), packed.stride(1), packed.stride(0), packed.stride(2)});
  view.unsafeGetTensorImpl()->set_version_counter(packed.unsafeGetTensorImpl()->version_counter());
  return view;
}

// A kernel's [1, H, T, D] output or gradient as [T, H, D].
Tensor unbatched(const Tensor& t) {
  return relaid(t, {t.size(2), t.size(1), t.size(3)}, {t.stride(2), t.stride(1), t.stride(3)});
}

}  // namespace

// The autograd node of the eager path (its name shows as seqrec::AttentionFunction): the
// forward op's kernel, and the backward op's on the gradient of out, as ops/_library.py's
// rule runs them (the LSE is not differentiable; its gradient is never materialized). Packed
// q, k, v [T, H, D] are viewed as [1, H, T, D] in here, below autograd, and out, lse come out
// as [T, H, D], [H, T] (five view nodes less than autograd views around the node).
struct AttentionFunction : torch::autograd::Function<AttentionFunction> {
  static constexpr size_t kArguments = 12;  // of forward, after ctx

  static variable_list forward(AutogradContext* ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                               const Tensor& seq_start, const Tensor& seq_len, int64_t max_seqlen, bool causal,
                               double scale, double dropout_p, const std::optional<Tensor>& seed, bool packed,
                               bool on_triton) {
    static const KernelOp<AttentionFwd> op("seqrec::attention_fwd_cuda", "seqrec::attention_fwd_triton");
    // [B, H, L, D] with unit stride on D, as the kernels read them; anything else is copied once here.
    auto operand = [packed](const Tensor& t) {
      auto view = packed ? batch_view(t) : t;
      return view.stride(-1) == 1 ? view : view.contiguous();
    };
    auto q4 = operand(q), k4 = operand(k), v4 = operand(v);
    c10::impl::ExcludeDispatchKeyGuard kernel_only(kernel_excluded(on_triton));
    auto [out, lse] =  // [B, H, L, D], [B, H, L]
        op(on_triton).redispatch(kernel_keys(q), q4, k4, v4, seq_start, seq_len, max_seqlen, causal, scale, dropout_p,
                                 seed);
    if (packed) {  // [T, H, D], [H, T]
      out = unbatched(out);
      lse = relaid(lse, {lse.size(1), lse.size(2)}, {lse.stride(1), lse.stride(2)});
    }
    ctx->save_for_backward({q4, k4, v4, out, lse, seq_start, seq_len, seed.value_or(Tensor())});
    ctx->saved_data["max_seqlen"] = max_seqlen;
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["packed"] = packed;
    ctx->saved_data["on_triton"] = on_triton;
    ctx->mark_non_differentiable({lse});
    ctx->set_materialize_grads(false);
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list result(kArguments);
    const Tensor& dout = grads[0];
    if (!dout.defined()) return result;  // out took no part in what is differentiated
    static const KernelOp<AttentionBwd> op("seqrec::attention_bwd_cuda", "seqrec::attention_bwd_triton");
    auto saved = ctx->get_saved_variables();  // q, k, v, out, lse, seq_start, seq_len, seed
    auto& data = ctx->saved_data;
    bool packed = data["packed"].toBool();
    auto batched = [packed](const Tensor& t) { return packed ? batch_view(t) : t; };
    auto lse = packed ? saved[4].unsqueeze(0) : saved[4];
    c10::impl::ExcludeDispatchKeyGuard kernel_only(kernel_excluded(data["on_triton"].toBool()));
    auto grads_qkv = op(data["on_triton"].toBool())
                         .redispatch(kernel_keys(dout), batched(dout), saved[0], saved[1], saved[2], batched(saved[3]),
                                     lse, saved[5], saved[6], data["max_seqlen"].toInt(), data["causal"].toBool(),
                                     data["scale"].toDouble(), data["dropout_p"].toDouble(), optional(saved[7]));
    auto input_shaped = [packed](const Tensor& grad) { return packed ? unbatched(grad) : grad; };
    result[0] = input_shaped(std::get<0>(grads_qkv));
    result[1] = input_shaped(std::get<1>(grads_qkv));
    result[2] = input_shaped(std::get<2>(grads_qkv));
    return result;
  }
};

namespace {

// ops/attention.py's _attention after the backend is resolved: out, lse [B, H, L, D] and [B, H, L]
// on q, k, v [B, H, L, D] (packed: [T, H, D] in, [T, H, D] and [H, T] out) and int32 contiguous
// rows seq_start, seq_len.
std::tuple<Tensor, Tensor> attention(Tensor q, Tensor k, Tensor v, const Tensor& seq_start, const Tensor& seq_len,
                                     int64_t max_seqlen, bool causal, double scale, double dropout_p, bool packed,
                                     bool on_triton) {
  const auto dtype = q.scalar_type();
  // The seed is drawn on the device from torch's generator, as the general path draws it.
  std::optional<Tensor> seed;
  if (dropout_p > 0.0) seed = at::randint(2147483647, {1}, at::TensorOptions().dtype(at::kLong).device(q.device()));
  bool medium = cast_operands({&q, &k, &v}, on_triton);
  auto outputs = AttentionFunction::apply(q, k, v, seq_start, seq_len, max_seqlen, causal, scale, dropout_p, seed,
                                          packed, on_triton);  // out, lse
  return {medium ? outputs[0].to(dtype) : outputs[0], outputs[1]};  // bfloat16 copies: back to float32
}

// q, k, v of `ndim` dimensions, one kernel dtype, shape and device; head dim in 1..kMaxHeadDim.
bool attention_operands(const Tensor& q, const Tensor& k, const Tensor& v, int64_t ndim) {
  return dense(q) && q.dim() == ndim && kernel_dtype(q) && same_shape_dtype_device(k, q) &&
         same_shape_dtype_device(v, q) && q.size(-1) >= 1 && q.size(-1) <= kMaxHeadDim;
}

bool attention_options(double dropout_p, std::optional<double> scale) {
  return dropout_p >= 0.0 && dropout_p < 1.0 && (!scale || std::isfinite(*scale));
}

double scale_or_default(std::optional<double> scale, int64_t head_dim) {
  return scale ? *scale : 1.0 / std::sqrt(static_cast<double>(head_dim));
}

// fused_attention: (out, lse, the seq_lens flag or undefined); out undefined when declined.
std::tuple<Tensor, Tensor, Tensor> fused_attention_front(const Tensor& q, const Tensor& k, const Tensor& v,
                                                         const std::optional<Tensor>& seq_lens, bool causal,
                                                         bool left_padding, double dropout_p,
                                                         std::optional<double> scale, bool return_lse,
                                                         bool values_on_host, bool check_values, bool on_triton) {
  if (!attention_operands(q, k, v, 4) || !attention_options(dropout_p, scale)) return {};
  const int64_t batch = q.size(0), length = q.size(2);
  if (seq_lens && !(index_tensor(*seq_lens, q) && seq_lens->dim() == 1 && seq_lens->size(0) == batch)) return {};
  Tensor seq_start, seq_len, flag;
  if (values_on_host && q.is_cpu()) {  // the rows by a loop over the lengths
    if (seq_lens && check_values && !all_values(*seq_lens, [&](int64_t n) { return 0 <= n && n <= length; })) {
      return {};
    }
    auto int32 = at::TensorOptions().dtype(at::kInt);
    seq_start = at::empty({batch}, int32);
    seq_len = at::empty({batch}, int32);
    int32_t* start = seq_start.data_ptr<int32_t>();
    int32_t* len = seq_len.data_ptr<int32_t>();
    if (seq_lens) {
      with_index_data(*seq_lens, [&](const auto* lengths) {
        for (int64_t b = 0; b < batch; ++b) len[b] = static_cast<int32_t>(lengths[b]);
      });
    } else {
      std::fill(len, len + batch, static_cast<int32_t>(length));
    }
    for (int64_t b = 0; b < batch; ++b) start[b] = left_padding ? static_cast<int32_t>(length - len[b]) : 0;
  } else {  // tensor ops on the device: no sync
    auto int32 = q.options().dtype(at::kInt);
    seq_len = seq_lens ? seq_lens->to(at::kInt).contiguous() : at::full({batch}, length, int32);
    seq_start = left_padding ? at::rsub(seq_len, length) : at::zeros_like(seq_len);
    if (seq_lens && check_values && seq_lens->numel()) flag = outside(*seq_lens, 0, length);
  }
  auto [out, lse] = attention(q, k, v, seq_start, seq_len, length, causal, scale_or_default(scale, q.size(3)),
                              dropout_p, /*packed=*/false, on_triton);
  return {out, return_lse ? lse : Tensor(), flag};
}

// fused_attention_varlen: (out [T, H, D], lse [H, T], the cu_seqlens flag or undefined).
std::tuple<Tensor, Tensor, Tensor> fused_attention_varlen_front(const Tensor& q, const Tensor& k, const Tensor& v,
                                                                const Tensor& cu_seqlens, int64_t max_seqlen,
                                                                bool causal, double dropout_p,
                                                                std::optional<double> scale, bool return_lse,
                                                                bool values_on_host, bool check_values,
                                                                bool on_triton) {
  if (!attention_operands(q, k, v, 3) || !attention_options(dropout_p, scale)) return {};
  if (!(index_tensor(cu_seqlens, q) && cu_seqlens.dim() == 1 && cu_seqlens.size(0) >= 2 && max_seqlen >= 0)) return {};
  const int64_t total = q.size(0), num_seqs = cu_seqlens.size(0) - 1;
  Tensor seq_start, seq_len, flag;
  if (values_on_host && q.is_cpu()) {
    bool valid = true;
    auto int32 = at::TensorOptions().dtype(at::kInt);
    seq_start = at::empty({num_seqs}, int32);
    seq_len = at::empty({num_seqs}, int32);
    int32_t* start = seq_start.data_ptr<int32_t>();
    int32_t* len = seq_len.data_ptr<int32_t>();
    with_index_data(cu_seqlens, [&](const auto* offset) {
      valid = offset[0] == 0 && offset[num_seqs] <= total;
      for (int64_t b = 0; b < num_seqs; ++b) {
        int64_t length = int64_t{offset[b + 1]} - offset[b];
        valid &= 0 <= length && length <= max_seqlen;
        start[b] = static_cast<int32_t>(offset[b]);
        len[b] = static_cast<int32_t>(length);
      }
    });
    if (check_values && !valid) return {};
  } else {
    seq_start = cu_seqlens.slice(0, 0, num_seqs).to(at::kInt).contiguous();
    seq_len = cu_seqlens.diff().to(at::kInt);
    if (check_values) {
      flag = seq_len.clamp(0, max_seqlen).ne(seq_len).any() | cu_seqlens[0].ne(0) | cu_seqlens[-1].gt(total);
    }
  }
  auto [out, lse] = attention(q, k, v, seq_start, seq_len, max_seqlen, causal, scale_or_default(scale, q.size(2)),
                              dropout_p, /*packed=*/true, on_triton);
  return {out, return_lse ? lse : Tensor(), flag};
}

// --------------------------------------------------------------------- softmax losses ----

enum Reduction : int64_t { kMean = 0, kSum = 1, kNone = 2 };  // ops/_front.py's REDUCTIONS

// hidden [T, D] or [B, L, D] and item_weight [N, D] as the general path's checks want them,
// D within the kernels' limit.
bool loss_operands(const Tensor& hidden, const Tensor& weight, double temperature) {
  return dense(hidden) && kernel_dtype(hidden) && (hidden.dim() == 2 || hidden.dim() == 3) &&
         hidden.size(-1) <= kMaxKernelHiddenDim && dense(weight) && weight.dim() == 2 &&
         weight.device() == hidden.device() && weight.scalar_type() == hidden.scalar_type() &&
         weight.size(1) == hidden.size(-1) && weight.size(0) >= 1 && temperature > 0.0 && std::isfinite(temperature);
}

// Item ids of `shape` on hidden's device; on the host (check_values) in [0, N) or == ignore_index.
bool item_ids(const Tensor& ids, at::IntArrayRef shape, const Tensor& hidden, int64_t num_items, bool check_values,
              std::optional<int64_t> ignore_index = std::nullopt) {
  if (!index_tensor(ids, hidden) || ids.sizes() != shape) return false;
  if (!check_values) return true;
  return all_values(ids,
                    [&](int64_t id) { return (0 <= id && id < num_items) || (ignore_index && id == *ignore_index); });
}

// The number of rows that count in `mean` (ops/softmax_loss.py's _valid_rows: positive/target
// not ignore_index and in [0, N)), at least 1: an int64 scalar tensor on the device, as the
// general path counts them, or counted on the host. Dividing by either gives the same float32
// quotient (the count is exact in float32; the CPU kernel divides by a scalar as by a tensor).
struct RowCount {
  Tensor on_device;  // undefined when counted on the host
  double on_host = 1.0;
};

RowCount counted_rows(const Tensor& ids, int64_t ignore_index, int64_t num_items, bool values_on_host) {
  bool ignore_in_range = 0 <= ignore_index && ignore_index < num_items;
  if (values_on_host && ids.is_cpu()) {
    int64_t count = 0;
    all_values(ids, [&](int64_t id) {
      count += 0 <= id && id < num_items && !(ignore_in_range && id == ignore_index);
      return true;
    });
    return {Tensor(), static_cast<double>(std::max<int64_t>(count, 1))};
  }
  auto valid = ids.clamp(0, num_items - 1) == ids;
  if (ignore_in_range) valid = valid & (ids != ignore_index);
  return {valid.sum().clamp_min(1)};
}

// The reduction of row_loss [T] (ops/softmax_loss.py's _reduce) and the gradient of the rows
// from the reduced loss's (what autograd's sum and div nodes give the general path).
Tensor reduce(const Tensor& row_loss, int64_t reduction, const RowCount& count) {
  if (reduction == kNone) return row_loss;
  auto total = row_loss.sum();
  if (reduction == kSum) return total;
  return count.on_device.defined() ? total / count.on_device : total.div_(count.on_host);
}

// The extension's kernels take it contiguous: divided after the expand, one op writes it (no
// copy). Triton's get it expanded (stride 0), as the general path gives it: their kernels are
// specialized on the stride, and a contiguous one would compile (and tune) another variant.
Tensor row_gradient(const Tensor& grad, int64_t reduction, const RowCount& count, int64_t rows, bool on_triton) {
  if (reduction == kNone) return grad;
  if (reduction == kSum) return grad.expand({rows});
  auto per_row = [&](const Tensor& g) { return count.on_device.defined() ? g / count.on_device : g / count.on_host; };
  return on_triton ? per_row(grad).expand({rows}) : per_row(grad.expand({rows}));
}

// The count as the losses' nodes keep it.
void save_count(AutogradContext* ctx, const RowCount& count) { ctx->saved_data["count"] = count.on_host; }
RowCount saved_count(AutogradContext* ctx, const Tensor& on_device) {
  return {on_device, ctx->saved_data["count"].toDouble()};
}

using SampledFwd = decltype(sampled_softmax_fwd<c10::DispatchKey::CPU>);
using SampledBwd = decltype(sampled_softmax_bwd<c10::DispatchKey::CPU>);
using FullFwd = decltype(full_softmax_fwd<c10::DispatchKey::CPU>);
using FullBwd = decltype(full_softmax_bwd<c10::DispatchKey::CPU>);

// hidden [T, D] or [B, L, D] as the ops take it, [T, D]; a view made below autograd (a view
// node less). The backward views d hidden back (as_hidden).
Tensor hidden_rows(AutogradContext* ctx, const Tensor& hidden) {
  if (hidden.dim() == 2) return hidden;
  ctx->saved_data["hidden_shape"] = hidden.sizes();
  return hidden.reshape({-1, hidden.size(-1)});
}

Tensor as_hidden(AutogradContext* ctx, const Tensor& d_hidden) {
  auto shape = ctx->saved_data.find("hidden_shape");
  return shape == ctx->saved_data.end() ? d_hidden : d_hidden.view(shape->second.toIntVector());
}

// The losses' options the backward reads from ctx->saved_data.
void save_loss_options(AutogradContext* ctx, double temperature, int64_t ignore_index, int64_t reduction,
                       bool on_triton) {
  ctx->saved_data["on_triton"] = on_triton;
  ctx->saved_data["temperature"] = temperature;
  ctx->saved_data["ignore_index"] = ignore_index;
  ctx->saved_data["reduction"] = reduction;
}

}  // namespace

// The losses' autograd nodes (seqrec::SampledSoftmaxFunction, seqrec::FullSoftmaxFunction):
// the forward op's kernel and the reduction (count: the rows that count, for `mean`); the
// reduction's gradient and the backward op's kernel. Outputs: the loss and the per-row LSE
// (not differentiable).
struct SampledSoftmaxFunction : torch::autograd::Function<SampledSoftmaxFunction> {
  static constexpr size_t kArguments = 13;

  static variable_list forward(AutogradContext* ctx, const Tensor& hidden, const Tensor& weight, const Tensor& pos_ids,
                               const Tensor& neg_ids, const std::optional<Tensor>& pos_log_q,
                               const std::optional<Tensor>& neg_log_q, int64_t rows_per_group, bool remove_hits,
                               double temperature, int64_t ignore_index, int64_t reduction, const RowCount& count,
                               bool on_triton) {
    static const KernelOp<SampledFwd> op("seqrec::sampled_softmax_fwd_cuda", "seqrec::sampled_softmax_fwd_triton");
    auto rows = hidden_rows(ctx, hidden);
    c10::impl::ExcludeDispatchKeyGuard kernel_only(kernel_excluded(on_triton));
    auto [row_loss, lse] = op(on_triton).redispatch(kernel_keys(hidden), rows, weight, pos_ids, neg_ids, pos_log_q,
                                                    neg_log_q, rows_per_group, remove_hits, temperature, ignore_index);
    ctx->save_for_backward({rows, weight, pos_ids, neg_ids, pos_log_q.value_or(Tensor()), neg_log_q.value_or(Tensor()),
                            lse, count.on_device});
    save_count(ctx, count);
    save_loss_options(ctx, temperature, ignore_index, reduction, on_triton);
    ctx->saved_data["rows_per_group"] = rows_per_group;
    ctx->saved_data["remove_hits"] = remove_hits;
    ctx->mark_non_differentiable({lse});
    ctx->set_materialize_grads(false);
    return {reduce(row_loss, reduction, count), lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list result(kArguments);
    if (!grads[0].defined()) return result;
    static const KernelOp<SampledBwd> op("seqrec::sampled_softmax_bwd_cuda", "seqrec::sampled_softmax_bwd_triton");
    auto saved = ctx->get_saved_variables();  // hidden, weight, pos_ids, neg_ids, pos_log_q, neg_log_q, lse, count
    auto& data = ctx->saved_data;
    auto grad_loss = row_gradient(grads[0], data["reduction"].toInt(), saved_count(ctx, saved[7]), saved[0].size(0),
                                  data["on_triton"].toBool());
    c10::impl::ExcludeDispatchKeyGuard kernel_only(kernel_excluded(data["on_triton"].toBool()));
    // Deterministic when torch.use_deterministic_algorithms(True) is in effect when it runs.
    std::tie(result[0], result[1]) =
        op(data["on_triton"].toBool())
            .redispatch(kernel_keys(grad_loss), grad_loss, saved[0], saved[1], saved[2], saved[3], optional(saved[4]),
                        optional(saved[5]), saved[6], data["rows_per_group"].toInt(), data["remove_hits"].toBool(),
                        data["temperature"].toDouble(), data["ignore_index"].toInt(),
                        at::globalContext().deterministicAlgorithms());
    result[0] = as_hidden(ctx, result[0]);
    return result;
  }
};

struct FullSoftmaxFunction : torch::autograd::Function<FullSoftmaxFunction> {
  static constexpr size_t kArguments = 9;

  static variable_list forward(AutogradContext* ctx, const Tensor& hidden, const Tensor& weight, const Tensor& targets,
                               const Tensor& excluded_ids, double temperature, int64_t ignore_index, int64_t reduction,
                               const RowCount& count, bool on_triton) {
    static const KernelOp<FullFwd> op("seqrec::full_softmax_fwd_cuda", "seqrec::full_softmax_fwd_triton");
    auto rows = hidden_rows(ctx, hidden);
    c10::impl::ExcludeDispatchKeyGuard kernel_only(kernel_excluded(on_triton));
    auto [row_loss, lse] =
        op(on_triton).redispatch(kernel_keys(hidden), rows, weight, targets, excluded_ids, temperature, ignore_index);
    ctx->save_for_backward({rows, weight, targets, excluded_ids, lse, count.on_device});
    save_count(ctx, count);
    save_loss_options(ctx, temperature, ignore_index, reduction, on_triton);
    ctx->mark_non_differentiable({lse});
    ctx->set_materialize_grads(false);
    return {reduce(row_loss, reduction, count), lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list result(kArguments);
    if (!grads[0].defined()) return result;
    static const KernelOp<FullBwd> op("seqrec::full_softmax_bwd_cuda", "seqrec::full_softmax_bwd_triton");
    auto saved = ctx->get_saved_variables();  // hidden, weight, targets, excluded_ids, lse, count
    auto& data = ctx->saved_data;
    auto grad_loss = row_gradient(grads[0], data["reduction"].toInt(), saved_count(ctx, saved[5]), saved[0].size(0),
                                  data["on_triton"].toBool());
    c10::impl::ExcludeDispatchKeyGuard kernel_only(kernel_excluded(data["on_triton"].toBool()));
    std::tie(result[0], result[1]) =
        op(data["on_triton"].toBool())
            .redispatch(kernel_keys(grad_loss), grad_loss, saved[0], saved[1], saved[2], saved[3], saved[4],
                        data["temperature"].toDouble(), data["ignore_index"].toInt());
    result[0] = as_hidden(ctx, result[0]);
    return result;
  }
};

namespace {

// sampled_softmax_loss: (loss, the pos_ids flag, the neg_ids flag); loss undefined when declined.
std::tuple<Tensor, Tensor, Tensor> sampled_softmax_loss_front(const Tensor& hidden, const Tensor& item_weight,
                                                              const Tensor& pos_ids, const Tensor& neg_ids,
                                                              const std::optional<Tensor>& pos_log_q,
                                                              const std::optional<Tensor>& neg_log_q, bool remove_hits,
                                                              double temperature, int64_t ignore_index,
                                                              int64_t reduction, bool values_on_host, bool check_values,
                                                              bool on_triton) {
  if (!loss_operands(hidden, item_weight, temperature)) return {};
  const auto row_shape = hidden.sizes().slice(0, hidden.dim() - 1);
  const int64_t num_items = item_weight.size(0), rows = c10::multiply_integers(row_shape);
  const bool host_checks = check_values && values_on_host && hidden.is_cpu();
  if (!item_ids(pos_ids, row_shape, hidden, num_items, host_checks, ignore_index)) return {};
  if (!index_tensor(neg_ids, hidden)) return {};
  // neg_ids as [G, K] and the number of consecutive rows sharing each list (_negative_groups).
  Tensor groups;
  int64_t rows_per_group = 1;
  if (neg_ids.dim() == 1) {
    groups = neg_ids.unsqueeze(0);
    rows_per_group = rows;
  } else if (hidden.dim() == 3 && neg_ids.dim() == 2 && neg_ids.size(0) == hidden.size(0)) {
    groups = neg_ids;
    rows_per_group = hidden.size(1);
  } else if (neg_ids.dim() >= 1 && neg_ids.sizes().slice(0, neg_ids.dim() - 1) == pos_ids.sizes()) {
    groups = neg_ids.reshape({rows, neg_ids.size(-1)});
  } else {
    return {};
  }
  if (groups.size(1) == 0 || !item_ids(neg_ids, neg_ids.sizes(), hidden, num_items, host_checks)) return {};
  for (const auto& [log_q, ids] : {std::pair{&pos_log_q, &pos_ids}, {&neg_log_q, &neg_ids}}) {
    if (*log_q && !(dense(**log_q) && (kernel_dtype(**log_q) || (*log_q)->scalar_type() == at::kDouble) &&
                    (*log_q)->device() == hidden.device() && (*log_q)->sizes() == ids->sizes())) {
      return {};
    }
  }
  Tensor pos_flag, neg_flag;
  if (check_values && !host_checks) {
    if (pos_ids.numel()) pos_flag = outside(pos_ids, 0, num_items - 1, ignore_index);
    if (neg_ids.numel()) neg_flag = outside(neg_ids, 0, num_items - 1);
  }

  auto pos_flat = (pos_ids.dim() == 1 ? pos_ids : pos_ids.reshape(-1)).contiguous();
  auto groups_contiguous = groups.contiguous();
  auto pos_log_q_flat = pos_log_q ? std::optional<Tensor>(pos_log_q->reshape(-1)) : std::nullopt;
  auto neg_log_q_groups = neg_log_q ? std::optional<Tensor>(neg_log_q->reshape(groups.sizes())) : std::nullopt;
  Tensor h = hidden, w = item_weight;
  cast_operands({&h, &w}, on_triton);
  auto count = reduction == kMean ? counted_rows(pos_flat, ignore_index, num_items, values_on_host) : RowCount{};
  auto loss =
      SampledSoftmaxFunction::apply(h, w, pos_flat, groups_contiguous, pos_log_q_flat, neg_log_q_groups, rows_per_group,
                                    remove_hits, temperature, ignore_index, reduction, count, on_triton)[0];
  return {reduction == kNone ? loss.view(row_shape) : loss, pos_flag, neg_flag};
}

// full_softmax_loss: (loss, lse in the shape of targets, the targets range flag, the targets
// excluded flag); loss undefined when declined. excluded_ids: sorted, distinct, in [0, N), fewer
// than N (ops/_library.py's excluded_items); check_excluded: whether one of them is not ignore_index.
std::tuple<Tensor, Tensor, Tensor, Tensor> full_softmax_loss_front(const Tensor& hidden, const Tensor& item_weight,
                                                                   const Tensor& targets, const Tensor& excluded_ids,
                                                                   bool check_excluded, double temperature,
                                                                   int64_t ignore_index, int64_t reduction,
                                                                   bool return_lse, bool values_on_host,
                                                                   bool check_values, bool on_triton) {
  if (!loss_operands(hidden, item_weight, temperature)) return {};
  const auto row_shape = hidden.sizes().slice(0, hidden.dim() - 1);
  const int64_t num_items = item_weight.size(0);
  const bool host_checks = check_values && values_on_host && hidden.is_cpu();
  if (!item_ids(targets, row_shape, hidden, num_items, host_checks, ignore_index)) return {};
  if (!index_tensor(excluded_ids, hidden) || excluded_ids.dim() != 1 || excluded_ids.size(0) >= num_items) return {};
  Tensor range_flag, excluded_flag;
  if (check_values && check_excluded && targets.numel()) {
    if (host_checks) {
      bool none_excluded = true;
      with_index_data(excluded_ids, [&](const auto* excluded) {
        const auto* end = excluded + excluded_ids.numel();
        none_excluded = all_values(
            targets, [&](int64_t id) { return id == ignore_index || !std::binary_search(excluded, end, id); });
      });
      if (!none_excluded) return {};
    } else {
      excluded_flag = (at::isin(targets, excluded_ids) & (targets != ignore_index)).any();
    }
  }
  if (check_values && !host_checks && targets.numel()) range_flag = outside(targets, 0, num_items - 1, ignore_index);

  auto targets_flat = (targets.dim() == 1 ? targets : targets.reshape(-1)).contiguous();
  Tensor h = hidden, w = item_weight;
  cast_operands({&h, &w}, on_triton);
  auto count = reduction == kMean ? counted_rows(targets_flat, ignore_index, num_items, values_on_host) : RowCount{};
  auto outputs = FullSoftmaxFunction::apply(h, w, targets_flat, excluded_ids, temperature, ignore_index, reduction,
                                            count, on_triton);
  auto loss = outputs[0];
  return {reduction == kNone ? loss.view(row_shape) : loss, return_lse ? outputs[1].view(row_shape) : Tensor(),
          range_flag, excluded_flag};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(seqrec, m) {
  m.def(
      "_fused_attention_front(Tensor q, Tensor k, Tensor v, Tensor? seq_lens, bool causal, bool left_padding,"
      " float dropout_p, float? scale, bool return_lse, bool values_on_host, bool check_values, bool on_triton)"
      " -> (Tensor, Tensor, Tensor)",
      &fused_attention_front);
  m.def(
      "_fused_attention_varlen_front(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, int max_seqlen, bool causal,"
      " float dropout_p, float? scale, bool return_lse, bool values_on_host, bool check_values, bool on_triton)"
      " -> (Tensor, Tensor, Tensor)",
      &fused_attention_varlen_front);
  m.def(
      "_sampled_softmax_loss_front(Tensor hidden, Tensor item_weight, Tensor pos_ids, Tensor neg_ids,"
      " Tensor? pos_log_q, Tensor? neg_log_q, bool remove_hits, float temperature, int ignore_index, int reduction,"
      " bool values_on_host, bool check_values, bool on_triton) -> (Tensor, Tensor, Tensor)",
      &sampled_softmax_loss_front);
  m.def(
      "_full_softmax_loss_front(Tensor hidden, Tensor item_weight, Tensor targets, Tensor excluded_ids,"
      " bool check_excluded, float temperature, int ignore_index, int reduction, bool return_lse,"
      " bool values_on_host, bool check_values, bool on_triton) -> (Tensor, Tensor, Tensor, Tensor)",
      &full_softmax_loss_front);
}

}  // namespace seqrec
