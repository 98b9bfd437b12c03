// CPU implementations of the `cuda` backend's ops: plain loops with float32 accumulation
// that follow the kernels' algorithms (online row softmax, recomputed probabilities, the
// same dropout hash), independent of the PyTorch reference they are tested against.
// They make the backend usable and testable without a GPU; they are not tuned for speed.
// The ops (end of file) are op_impls.h's impl::*<CPU>: they get checked inputs.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "checks.h"
#include "cuda/dropout_hash.h"
#include "op_impls.h"

namespace seqrec {
namespace {

using at::Tensor;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

template <typename scalar_t>
float dot(const scalar_t* a, const scalar_t* b, int64_t n) {
  float sum = 0.0f;
  for (int64_t d = 0; d < n; ++d) sum += static_cast<float>(a[d]) * static_cast<float>(b[d]);
  return sum;
}

// ------------------------------------------------------------------------ attention ----

// Row `row` of head `head` of batch row `batch` of a [B, H, L, D] tensor (unit stride on D).
template <typename scalar_t>
struct RowsOf {
  scalar_t* data;
  int64_t batch_stride, head_stride, row_stride;
  explicit RowsOf(const Tensor& t)
      : data(static_cast<scalar_t*>(t.data_ptr())),
        batch_stride(t.stride(0)),
        head_stride(t.stride(1)),
        row_stride(t.stride(2)) {}
  scalar_t* operator()(int64_t batch, int64_t head, int64_t row) const {
    return data + batch * batch_stride + head * head_stride + row * row_stride;
  }
};

// One (sequence, head) pair: where its rows are and its dropout mask.
struct SequenceHead {
  int64_t batch, head, start, length;
  int64_t row_key_base;  // (sequence * H + head) * max_seqlen: the dropout row key at position 0
};

template <typename Body>
void for_each_sequence_head(const Tensor& q, const Tensor& seq_start, const Tensor& seq_len, int64_t max_seqlen,
                            const Body& body) {
  auto num_seqs = seq_len.size(0), num_heads = q.size(1);
  const int32_t* start = seq_start.data_ptr<int32_t>();  // contiguous (checks.h)
  const int32_t* length = seq_len.data_ptr<int32_t>();
  bool padded = q.size(0) == num_seqs;
  at::parallel_for(0, num_seqs * num_heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t pair = begin; pair < end; ++pair) {
      int64_t s = pair / num_heads, h = pair % num_heads;
      body(SequenceHead{padded ? s : 0, h, start[s], length[s], (s * num_heads + h) * max_seqlen});
    }
  });
}

// Keep-mask multiplier of (query position i, key position j): 0 or 1/(1-p); 1 without dropout.
struct Dropout {
  bool active;
  int64_t seed;
  uint32_t threshold;
  float scale;
  Dropout(double p, const std::optional<Tensor>& seed_tensor)
      : active(p > 0.0),
        seed(active ? seed_tensor->item<int64_t>() : 0),
        threshold(dropout::keep_threshold(p)),
        scale(static_cast<float>(1.0 / (1.0 - p))) {}
  float operator()(const SequenceHead& sh, int64_t i, int64_t j) const {
    if (!active) return 1.0f;
    return dropout::keep(dropout::row_hash(seed, sh.row_key_base + i), j, threshold) ? scale : 0.0f;
  }
};

template <typename scalar_t>
void attention_forward_loops(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                             const Tensor& seq_start, const Tensor& seq_len, int64_t max_seqlen, bool causal,
                             float scale, const Dropout& dropout) {
  RowsOf<scalar_t> q_rows(q), k_rows(k), v_rows(v), out_rows(out);
  auto num_heads = q.size(1), num_rows = q.size(2), head_dim = q.size(3);
  float* lse_data = lse.data_ptr<float>();  // [B, H, L]
  for_each_sequence_head(q, seq_start, seq_len, max_seqlen, [&](const SequenceHead& sh) {
    std::vector<float> acc(head_dim);
    for (int64_t i = 0; i < sh.length; ++i) {
      const scalar_t* q_i = q_rows(sh.batch, sh.head, sh.start + i);
      int64_t visible = causal ? i + 1 : sh.length;  // keys 0 .. visible - 1
      // Online softmax: running max m, running sum l, unnormalized accumulator acc.
      float m = kNegInf, l = 0.0f;
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t j = 0; j < visible; ++j) {
        float score = scale * dot(q_i, k_rows(sh.batch, sh.head, sh.start + j), head_dim);
        float m_new = std::max(m, score);
        float rescale = std::exp(m - m_new), p = std::exp(score - m_new);
        l = l * rescale + p;
        float weight = p * dropout(sh, i, j);
        const scalar_t* v_j = v_rows(sh.batch, sh.head, sh.start + j);
        for (int64_t d = 0; d < head_dim; ++d) acc[d] = acc[d] * rescale + weight * static_cast<float>(v_j[d]);
        m = m_new;
      }
      scalar_t* out_i = out_rows(sh.batch, sh.head, sh.start + i);
      for (int64_t d = 0; d < head_dim; ++d) out_i[d] = static_cast<scalar_t>(acc[d] / l);
      lse_data[(sh.batch * num_heads + sh.head) * num_rows + sh.start + i] = m + std::log(l);
    }
  });
}

template <typename scalar_t>
void attention_backward_loops(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                              const Tensor& lse, const Tensor& dq, const Tensor& dk, const Tensor& dv,
                              const Tensor& seq_start, const Tensor& seq_len, int64_t max_seqlen, bool causal,
                              float scale, const Dropout& dropout) {
  RowsOf<scalar_t> q_rows(q), k_rows(k), v_rows(v), out_rows(out), dout_rows(dout);
  RowsOf<scalar_t> dq_rows(dq), dk_rows(dk), dv_rows(dv);
  auto num_heads = q.size(1), num_rows = q.size(2), head_dim = q.size(3);
  auto lse_contiguous = lse.contiguous();
  const float* lse_data = lse_contiguous.data_ptr<float>();
  for_each_sequence_head(q, seq_start, seq_len, max_seqlen, [&](const SequenceHead& sh) {
    // float32 gradient accumulators of this (sequence, head): [length, D] each.
    std::vector<float> dq_acc(sh.length * head_dim, 0.0f), dk_acc(dq_acc), dv_acc(dq_acc);
    for (int64_t i = 0; i < sh.length; ++i) {
      const scalar_t* q_i = q_rows(sh.batch, sh.head, sh.start + i);
      const scalar_t* dout_i = dout_rows(sh.batch, sh.head, sh.start + i);
      float lse_i = lse_data[(sh.batch * num_heads + sh.head) * num_rows + sh.start + i];
      float delta = dot(dout_i, out_rows(sh.batch, sh.head, sh.start + i), head_dim);  // sum_j P_ij dP_ij
      int64_t visible = causal ? i + 1 : sh.length;
      for (int64_t j = 0; j < visible; ++j) {
        const scalar_t* k_j = k_rows(sh.batch, sh.head, sh.start + j);
        const scalar_t* v_j = v_rows(sh.batch, sh.head, sh.start + j);
        float p = std::exp(scale * dot(q_i, k_j, head_dim) - lse_i);  // recomputed probability
        float keep = dropout(sh, i, j);
        float dp = dot(dout_i, v_j, head_dim) * keep;
        float ds = p * (dp - delta) * scale;
        for (int64_t d = 0; d < head_dim; ++d) {
          dv_acc[j * head_dim + d] += p * keep * static_cast<float>(dout_i[d]);
          dq_acc[i * head_dim + d] += ds * static_cast<float>(k_j[d]);
          dk_acc[j * head_dim + d] += ds * static_cast<float>(q_i[d]);
        }
      }
    }
    for (int64_t i = 0; i < sh.length; ++i) {
      scalar_t* rows[3] = {dq_rows(sh.batch, sh.head, sh.start + i), dk_rows(sh.batch, sh.head, sh.start + i),
                           dv_rows(sh.batch, sh.head, sh.start + i)};
      const float* accs[3] = {&dq_acc[i * head_dim], &dk_acc[i * head_dim], &dv_acc[i * head_dim]};
      for (int g = 0; g < 3; ++g)
        for (int64_t d = 0; d < head_dim; ++d) rows[g][d] = static_cast<scalar_t>(accs[g][d]);
    }
  });
}

// --------------------------------------------------------------------- softmax losses ----

float logsumexp(const std::vector<float>& logits) {
  float m = kNegInf;
  for (float x : logits) m = std::max(m, x);
  if (m == kNegInf) return m;
  float sum = 0.0f;
  for (float x : logits) sum += std::exp(x - m);
  return m + std::log(sum);
}

// Row t's logits: [0] its positive, [1 + k] its negatives (-inf at accidental hits and
// absent negatives). Ids outside [0, N) are masked as in the kernels: a row whose positive
// is out of range counts as ignored, an absent negative leaves the denominator.
template <typename scalar_t>
struct SampledLogits {
  const scalar_t *hidden, *weight;
  int64_t hidden_stride, weight_stride, dim, num_items, num_neg, rows_per_group, ignore_index;
  const int64_t *pos_ids, *neg_ids;
  const float *pos_log_q, *neg_log_q;  // nullptr when not given
  bool remove_hits;
  float inv_temperature;

  bool present(int64_t id) const { return id >= 0 && id < num_items; }
  bool valid(int64_t t) const { return pos_ids[t] != ignore_index && present(pos_ids[t]); }
  int64_t safe_pos(int64_t t) const { return std::min(std::max<int64_t>(pos_ids[t], 0), num_items - 1); }
  const int64_t* negatives(int64_t t) const { return neg_ids + (t / rows_per_group) * num_neg; }

  void operator()(int64_t t, std::vector<float>& logits) const {
    const scalar_t* h = hidden + t * hidden_stride;
    logits[0] = dot(h, weight + safe_pos(t) * weight_stride, dim) * inv_temperature;
    if (pos_log_q) logits[0] -= pos_log_q[t];
    const int64_t* negs = negatives(t);
    const float* neg_q = neg_log_q ? neg_log_q + (t / rows_per_group) * num_neg : nullptr;
    for (int64_t k = 0; k < num_neg; ++k) {
      bool kept = present(negs[k]) && !(remove_hits && negs[k] == pos_ids[t]);
      logits[1 + k] = kept ? dot(h, weight + negs[k] * weight_stride, dim) * inv_temperature : kNegInf;
      if (neg_q && kept) logits[1 + k] -= neg_q[k];
    }
  }
};

// Contiguous int64 ids, contiguous float32 log_q (or an undefined tensor), kept alive here.
struct SampledInputs {
  Tensor pos_ids, neg_ids, pos_log_q, neg_log_q;
  SampledInputs(const Tensor& pos, const Tensor& neg, const std::optional<Tensor>& pos_q,
                const std::optional<Tensor>& neg_q)
      : pos_ids(pos.to(at::kLong).contiguous()),
        neg_ids(neg.to(at::kLong).contiguous()),
        pos_log_q(pos_q ? pos_q->to(at::kFloat).contiguous() : Tensor()),
        neg_log_q(neg_q ? neg_q->to(at::kFloat).contiguous() : Tensor()) {}

  template <typename scalar_t>
  SampledLogits<scalar_t> logits(const Tensor& hidden, const Tensor& weight, int64_t rows_per_group, bool remove_hits,
                                 double temperature, int64_t ignore_index) const {
    return {static_cast<const scalar_t*>(hidden.data_ptr()),
            static_cast<const scalar_t*>(weight.data_ptr()),
            hidden.stride(0),
            weight.stride(0),
            hidden.size(1),
            weight.size(0),
            neg_ids.size(1),
            rows_per_group,
            ignore_index,
            pos_ids.data_ptr<int64_t>(),
            neg_ids.data_ptr<int64_t>(),
            pos_log_q.defined() ? pos_log_q.data_ptr<float>() : nullptr,
            neg_log_q.defined() ? neg_log_q.data_ptr<float>() : nullptr,
            remove_hits,
            static_cast<float>(1.0 / temperature)};
  }
};

// Full softmax: rows are processed in blocks whose [rows, N] logits fit in memory.
constexpr int64_t kFullRowBlock = 32;

// logits[r * N + n] of rows rows[0..count-1]; -inf at excluded items.
template <typename scalar_t>
void full_logits_block(const Tensor& hidden, const Tensor& weight, const std::vector<bool>& excluded, float inv_temp,
                       const int64_t* rows, int64_t count, std::vector<float>& logits) {
  auto num_items = weight.size(0), dim = hidden.size(1);
  const auto* h = static_cast<const scalar_t*>(hidden.data_ptr());
  const auto* w = static_cast<const scalar_t*>(weight.data_ptr());
  at::parallel_for(0, count * num_items, 4096, [&](int64_t lo, int64_t hi) {
    for (int64_t idx = lo; idx < hi; ++idx) {
      int64_t r = idx / num_items, n = idx % num_items;
      logits[idx] =
          excluded[n] ? kNegInf : dot(h + rows[r] * hidden.stride(0), w + n * weight.stride(0), dim) * inv_temp;
    }
  });
}

std::vector<bool> excluded_mask(const Tensor& excluded_ids, int64_t num_items) {
  std::vector<bool> mask(num_items, false);
  auto ids = excluded_ids.to(at::kLong).contiguous();
  for (int64_t i = 0; i < ids.numel(); ++i) {
    int64_t id = ids.data_ptr<int64_t>()[i];
    if (id >= 0 && id < num_items) mask[id] = true;  // no item to exclude otherwise
  }
  return mask;
}

// A target that is not ignore_index and in [0, N) (an out-of-range one counts as ignored).
bool valid_target(int64_t target, int64_t ignore_index, int64_t num_items) {
  return target != ignore_index && target >= 0 && target < num_items;
}

// The rows with a valid target, in order: the only ones whose logits are computed.
std::vector<int64_t> counted_rows(const int64_t* targets, int64_t rows, int64_t ignore_index, int64_t num_items) {
  std::vector<int64_t> counted;
  for (int64_t t = 0; t < rows; ++t)
    if (valid_target(targets[t], ignore_index, num_items)) counted.push_back(t);
  return counted;
}

// Sets item_id_checks (checks.h); returns the previous setting.
bool set_item_id_checks(bool enabled) { return item_id_checks.exchange(enabled); }

}  // namespace

// ------------------------------------------------------------------------- the ops ----

template <>
std::tuple<Tensor, Tensor> impl::attention_fwd<c10::DispatchKey::CPU>(const AttentionArgs& a) {
  auto out = at::zeros_like(a.q);  // padding rows stay zero
  auto lse = at::full(a.q.sizes().slice(0, 3), kNegInf, a.q.options().dtype(at::kFloat));
  Dropout dropout(a.dropout_p, a.dropout_seed);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.q.scalar_type(), "attention_fwd_cpu", [&] {
    attention_forward_loops<scalar_t>(a.q, a.k, a.v, out, lse, a.seq_start, a.seq_len, a.max_seqlen, a.causal,
                                      static_cast<float>(a.scale), dropout);
  });
  return {out, lse};
}

template <>
std::tuple<Tensor, Tensor, Tensor> impl::attention_bwd<c10::DispatchKey::CPU>(const AttentionArgs& a,
                                                                              const Tensor& dout, const Tensor& out,
                                                                              const Tensor& lse) {
  auto dq = at::zeros_like(a.q), dk = at::zeros_like(a.k), dv = at::zeros_like(a.v);
  Dropout dropout(a.dropout_p, a.dropout_seed);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.q.scalar_type(), "attention_bwd_cpu", [&] {
    attention_backward_loops<scalar_t>(unit_stride_rows(dout), a.q, a.k, a.v, out, lse, dq, dk, dv, a.seq_start,
                                       a.seq_len, a.max_seqlen, a.causal, static_cast<float>(a.scale), dropout);
  });
  return {dq, dk, dv};
}

template <>
std::tuple<Tensor, Tensor> impl::sampled_softmax_fwd<c10::DispatchKey::CPU>(const SampledSoftmaxArgs& a) {
  SampledInputs inputs(a.pos_ids, a.neg_ids, a.pos_log_q, a.neg_log_q);
  auto rows = a.hidden.size(0);
  auto loss = at::empty({rows}, a.hidden.options().dtype(at::kFloat));
  auto lse = at::empty({rows}, a.hidden.options().dtype(at::kFloat));
  float *loss_data = loss.data_ptr<float>(), *lse_data = lse.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.hidden.scalar_type(), "sampled_softmax_fwd_cpu", [&] {
    auto logits_of =
        inputs.logits<scalar_t>(a.hidden, a.weight, a.rows_per_group, a.remove_hits, a.temperature, a.ignore_index);
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      std::vector<float> logits(1 + logits_of.num_neg);
      for (int64_t t = begin; t < end; ++t) {
        if (!logits_of.valid(t)) {  // ignored: no logits computed, loss 0 and LSE 0
          loss_data[t] = lse_data[t] = 0.0f;
          continue;
        }
        logits_of(t, logits);
        lse_data[t] = logsumexp(logits);
        loss_data[t] = lse_data[t] - logits[0];
      }
    });
  });
  return {loss, lse};
}

template <>
std::tuple<Tensor, Tensor> impl::sampled_softmax_bwd<c10::DispatchKey::CPU>(const SampledSoftmaxArgs& a,
                                                                            const Tensor& grad_loss, const Tensor& lse,
                                                                            bool /*deterministic: always*/) {
  SampledInputs inputs(a.pos_ids, a.neg_ids, a.pos_log_q, a.neg_log_q);
  auto rows = a.hidden.size(0), dim = a.hidden.size(1), num_neg = a.neg_ids.size(1);
  auto grad = grad_loss.to(at::kFloat).contiguous(), lse_f = lse.to(at::kFloat).contiguous();
  const float *grad_data = grad.data_ptr<float>(), *lse_data = lse_f.data_ptr<float>();
  auto d_hidden = at::empty({rows, dim}, a.hidden.options());
  auto d_weight = at::zeros({a.weight.size(0), dim}, a.weight.options().dtype(at::kFloat));
  // d loss / d logit = (softmax - onehot(positive)) * grad / temperature: [T, 1 + K].
  std::vector<float> coef(rows * (1 + num_neg));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.hidden.scalar_type(), "sampled_softmax_bwd_cpu", [&] {
    auto logits_of =
        inputs.logits<scalar_t>(a.hidden, a.weight, a.rows_per_group, a.remove_hits, a.temperature, a.ignore_index);
    auto* dh = d_hidden.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      std::vector<float> logits(1 + num_neg), row_grad(dim);
      for (int64_t t = begin; t < end; ++t) {
        if (!logits_of.valid(t)) {  // ignored: no gradient, no logits computed
          std::fill(dh + t * dim, dh + (t + 1) * dim, static_cast<scalar_t>(0));
          continue;
        }
        float* c = &coef[t * (1 + num_neg)];
        float row_scale = grad_data[t] * logits_of.inv_temperature;
        logits_of(t, logits);
        for (int64_t k = 0; k <= num_neg; ++k) c[k] = std::exp(logits[k] - lse_data[t]) * row_scale;
        c[0] -= row_scale;
        std::fill(row_grad.begin(), row_grad.end(), 0.0f);
        const int64_t* negs = logits_of.negatives(t);
        for (int64_t k = 0; k <= num_neg; ++k) {
          if (k > 0 && !logits_of.present(negs[k - 1])) continue;  // absent: no weight row to read
          const scalar_t* w = logits_of.weight + (k == 0 ? logits_of.safe_pos(t) : negs[k - 1]) * a.weight.stride(0);
          for (int64_t d = 0; d < dim; ++d) row_grad[d] += c[k] * static_cast<float>(w[d]);
        }
        for (int64_t d = 0; d < dim; ++d) dh[t * dim + d] = static_cast<scalar_t>(row_grad[d]);
      }
    });
    // d_weight in row order, one thread: deterministic (the CPU path always is).
    float* dw = d_weight.data_ptr<float>();
    for (int64_t t = 0; t < rows; ++t) {
      if (!logits_of.valid(t)) continue;
      const scalar_t* h = logits_of.hidden + t * a.hidden.stride(0);
      const int64_t* negs = logits_of.negatives(t);
      for (int64_t k = 0; k <= num_neg; ++k) {
        if (k > 0 && !logits_of.present(negs[k - 1])) continue;
        float c = coef[t * (1 + num_neg) + k];
        float* w = dw + (k == 0 ? logits_of.safe_pos(t) : negs[k - 1]) * dim;
        for (int64_t d = 0; d < dim; ++d) w[d] += c * static_cast<float>(h[d]);
      }
    }
  });
  return {d_hidden, d_weight.to(a.weight.scalar_type())};
}

template <>
std::tuple<Tensor, Tensor> impl::full_softmax_fwd<c10::DispatchKey::CPU>(const FullSoftmaxArgs& a) {
  auto rows = a.hidden.size(0), num_items = a.weight.size(0);
  auto target = a.targets.to(at::kLong).contiguous();
  const int64_t* target_data = target.data_ptr<int64_t>();
  auto loss = at::zeros({rows}, a.hidden.options().dtype(at::kFloat));  // ignored rows: loss 0, LSE 0
  auto lse = at::zeros({rows}, a.hidden.options().dtype(at::kFloat));
  auto excluded = excluded_mask(a.excluded_ids, num_items);
  auto counted = counted_rows(target_data, rows, a.ignore_index, num_items);
  auto num_counted = static_cast<int64_t>(counted.size());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.hidden.scalar_type(), "full_softmax_fwd_cpu", [&] {
    std::vector<float> logits(kFullRowBlock * num_items), row(num_items);
    for (int64_t begin = 0; begin < num_counted; begin += kFullRowBlock) {
      int64_t count = std::min(kFullRowBlock, num_counted - begin);
      full_logits_block<scalar_t>(a.hidden, a.weight, excluded, 1.0f / a.temperature, &counted[begin], count, logits);
      for (int64_t r = 0; r < count; ++r) {
        int64_t t = counted[begin + r];
        row.assign(logits.begin() + r * num_items, logits.begin() + (r + 1) * num_items);
        lse.data_ptr<float>()[t] = logsumexp(row);
        loss.data_ptr<float>()[t] = lse.data_ptr<float>()[t] - row[target_data[t]];
      }
    }
  });
  return {loss, lse};
}

template <>
std::tuple<Tensor, Tensor> impl::full_softmax_bwd<c10::DispatchKey::CPU>(const FullSoftmaxArgs& a,
                                                                         const Tensor& grad_loss, const Tensor& lse) {
  auto rows = a.hidden.size(0), num_items = a.weight.size(0), dim = a.hidden.size(1);
  auto target = a.targets.to(at::kLong).contiguous();
  auto grad = grad_loss.to(at::kFloat).contiguous(), lse_f = lse.to(at::kFloat).contiguous();
  auto d_hidden = at::zeros({rows, dim}, a.hidden.options());  // ignored rows: no gradient
  auto d_weight = at::zeros({num_items, dim}, a.weight.options().dtype(at::kFloat));
  auto excluded = excluded_mask(a.excluded_ids, num_items);
  auto counted = counted_rows(target.data_ptr<int64_t>(), rows, a.ignore_index, num_items);
  auto num_counted = static_cast<int64_t>(counted.size());
  float inv_temp = static_cast<float>(1.0 / a.temperature);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.hidden.scalar_type(), "full_softmax_bwd_cpu", [&] {
    const auto* h = static_cast<const scalar_t*>(a.hidden.data_ptr());
    const auto* w = static_cast<const scalar_t*>(a.weight.data_ptr());
    auto* dh = d_hidden.data_ptr<scalar_t>();
    float* dw = d_weight.data_ptr<float>();
    std::vector<float> coef(kFullRowBlock * num_items);  // [rows of the block, N], then the coefficients
    for (int64_t begin = 0; begin < num_counted; begin += kFullRowBlock) {
      int64_t count = std::min(kFullRowBlock, num_counted - begin);
      const int64_t* block_rows = &counted[begin];
      full_logits_block<scalar_t>(a.hidden, a.weight, excluded, inv_temp, block_rows, count, coef);
      for (int64_t r = 0; r < count; ++r) {
        int64_t t = block_rows[r], target_id = target.data_ptr<int64_t>()[t];
        float row_scale = grad.data_ptr<float>()[t] * inv_temp;
        float* c = &coef[r * num_items];
        for (int64_t n = 0; n < num_items; ++n) c[n] = std::exp(c[n] - lse_f.data_ptr<float>()[t]) * row_scale;
        c[target_id] -= row_scale;  // softmax - onehot(target)
      }
      at::parallel_for(0, count, 1, [&](int64_t lo, int64_t hi) {  // d_hidden of the block's rows
        std::vector<float> row_grad(dim);
        for (int64_t r = lo; r < hi; ++r) {
          std::fill(row_grad.begin(), row_grad.end(), 0.0f);
          for (int64_t n = 0; n < num_items; ++n) {
            const scalar_t* w_n = w + n * a.weight.stride(0);
            for (int64_t d = 0; d < dim; ++d) row_grad[d] += coef[r * num_items + n] * static_cast<float>(w_n[d]);
          }
          for (int64_t d = 0; d < dim; ++d) dh[block_rows[r] * dim + d] = static_cast<scalar_t>(row_grad[d]);
        }
      });
      at::parallel_for(0, num_items, 256, [&](int64_t lo, int64_t hi) {  // d_weight: items split, rows in order
        for (int64_t n = lo; n < hi; ++n)
          for (int64_t r = 0; r < count; ++r) {
            const scalar_t* h_t = h + block_rows[r] * a.hidden.stride(0);
            for (int64_t d = 0; d < dim; ++d) dw[n * dim + d] += coef[r * num_items + n] * static_cast<float>(h_t[d]);
          }
      });
    }
  });
  return {d_hidden, d_weight.to(a.weight.scalar_type())};
}

TORCH_LIBRARY_FRAGMENT(seqrec, m) { m.def("_set_item_id_checks(bool enabled) -> bool", &set_item_id_checks); }

TORCH_LIBRARY_IMPL(seqrec, CPU, m) { register_ops<c10::DispatchKey::CPU>(m); }

}  // namespace seqrec
