// Sampled-softmax and full-catalog softmax losses, forward and backward, for the `cuda`
// backend (semantics: seqrec_kernels/reference/softmax_loss.py; interface: kernels.h).
// Logits are never materialized: every kernel recomputes them tile by tile, and the
// backward recomputes probabilities from the forward's LSE.
//
// The tile engine (engine_kernel) runs every op whose candidates are shared by many rows
// (full softmax, and sampled softmax when rows_per_group >= kEngineMinRows):
// - a CTA holds a "stationary" block of X lines in shared memory (whole padded D) and
//   streams tiles of kTile "streamed" Y lines through a 2-stage cp.async pipeline in
//   kChunk-wide D chunks; a warp owns 16 X lines and a [16, kTile] float32 score tile in
//   registers, in the m16n8k16 accumulator layout (rows g, g+8; columns 8j + 2*tig + e).
// - float16/bfloat16: mma.sync m16n8k16 tensor cores with float32 accumulation;
//   float32: plain FFMA in the same layout; under the "high" matmul precision (tf32x3) the
//   scores on 3xTF32 tensor cores (mma.sync m16n8k8), the products with them on FFMA.
// - forward (X = hidden rows, Y = items): online log-sum-exp per row; when the rows alone
//   do not fill the GPU the item range is split across CTAs (blockIdx.y), with (max,
//   sumexp) partials in a stream-ordered scratch allocation (the forward has no workspace
//   argument), combined by combine_forward.
// - backward d hidden (X = hidden rows, Y = items): coef tile [16, kTile] times the Y
//   chunk of the CTA's output D chunk (blockIdx.y), so acc is [16, kChunk] per warp.
// - backward d weight (X = items, Y = hidden rows): the transpose, no atomics for the
//   full softmax (each item row has one writer); sampled negatives use float32 atomics,
//   or, deterministic, write each negative slot's row (below).
// - full backward: a badly underfilled grid also splits the streamed lines, with
//   [splits, rows, D] partials in the workspace summed in split order (reduce_splits);
//   the sampled d weight splits them too (atomics: no partials; deterministic: partials
//   [splits, G * K, D] per negative slot, one split or more).
// - ignored rows (positive / target == ignore_index or outside [0, N); SASRec batches are
//   mostly padding) cost (close to) nothing, with no host sync: compact_rows first writes,
//   per group, its counted rows then its ignored ones (order [T], count [G], from the
//   workspace), and the engine reads hidden rows through order. A rows-stationary CTA whose
//   lines are all ignored only writes their zero outputs (loss 0, LSE 0, zero d hidden);
//   the rows stream of the d weight ends at count[grp].
// Rows with few rows per group (per-row negatives) use one warp per row instead; ignored
// rows skip their negatives there.
// Deterministic sampled d weight: the (item -> sample slot) list is radix-sorted by item
// (CUB, stable) and each item's slots are summed in sorted (= slot) order. With shared
// negatives (tile engine), a warp per item adds its positive slots' rows (one hidden row
// each) and its negative slots' partial rows from the engine's d weight kernel, split by
// split (sampled_weight_grad_partials); with per-row negatives, a CTA per item re-reads
// each slot's hidden rows (sampled_weight_grad_sorted). A fixed order throughout.
#include <cub/block/block_scan.cuh>
#include <cub/device/device_radix_sort.cuh>

#include "common.cuh"
#include "kernels.h"
#include "tile_plan.h"

namespace seqrec::cuda {
namespace {

using namespace loss_plan;  // the engine's constants, plans and index expressions

constexpr i64 kNoItem = -0x7fffffffffffffffLL - 1;  // id of an absent item line
constexpr i64 kNoRow = kNoItem + 1;                 // id of an absent hidden line

// ------------------------------------------------------------------ op arguments ---------

// One view of both ops for the kernels. pos is the positive (sampled) or target (full).
struct LossArgs {
  const void* hidden;          // [T, D], row stride hs
  const void* weight;          // [N, D], row stride ws
  i64 hs, ws, T, N, D;
  float inv_temp;
  i64 ignore;
  bool sampled, remove_hits;
  const i64* pos;              // [T]
  const i64* neg;              // [G, K] (sampled)
  const float* pos_lq;         // [T] or null (sampled)
  const float* neg_lq;         // [G, K] or null (sampled)
  i64 K, rpg;                  // sampled: negatives per group, rows per group
  const int32_t* excl;         // [E] sorted (full)
  i64 E;
  const float* grad;           // [T] backward only
  const float* lse;            // [T] backward only
  const float* scale_max;      // [1] max |grad| / temperature over kept rows (d weight tiles)
  int vec_h, vec_w;            // widest copy (bytes: 16, 8, 4, or 2 = element-wise) for hidden / weight rows
  bool tf32x3;                 // float32: the engine's logits on 3xTF32 tensor cores ("high")
  const int32_t* order;        // [T] engine: each group's rows, counted first (compact_rows)
  const int32_t* count;        // [G] engine: counted rows per group
};

__host__ __device__ __forceinline__ LossShape shape_of(const LossArgs& a) {
  return {a.T, a.N, a.D, a.K, a.rpg, a.sampled};
}

// A streamed or stationary line of the tile engine: an item (id, a = logit offset: log_q,
// or +inf when absent/excluded) or a hidden row (id = positive/target, a = LSE,
// b = grad / temperature, 0 for ignored rows).
struct alignas(16) Line {
  i64 id;
  float a, b;
};
static_assert(sizeof(Line) == kLineBytes, "engine_smem() counts 16-byte lines");

// Ids outside [0, N) reach the kernels only when no host check ran (torch.compile, CUDA
// graph capture). They are masked as in the Triton kernels and never dereferenced: an
// absent negative leaves the denominator and gets no gradient, and a row whose positive
// (target) is out of range counts as ignored.
__device__ __forceinline__ bool in_range(const LossArgs& a, i64 id) { return id >= 0 && id < a.N; }
__device__ __forceinline__ bool valid_row(const LossArgs& a, i64 pos) { return pos != a.ignore && in_range(a, pos); }
// The item of negative slot idx ([G, K] flat), kNoItem when absent.
__device__ __forceinline__ i64 negative_id(const LossArgs& a, i64 idx) {
  const i64 id = a.neg[idx];
  return in_range(a, id) ? id : kNoItem;
}

__device__ bool is_excluded(const LossArgs& a, i64 n) {
  i64 lo = 0, hi = a.E;  // lower_bound of n in the sorted excluded ids
  while (lo < hi) {
    const i64 mid = (lo + hi) >> 1;
    if (a.excl[mid] < n)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo < a.E && a.excl[lo] == n;
}

// Item line y: the item y (full) or negative slot y of group grp (sampled).
__device__ Line item_line(const LossArgs& a, i64 grp, i64 y, bool valid) {
  if (!valid) return {kNoItem, kInf, 0.f};
  if (a.sampled) {
    const i64 idx = grp * a.K + y, id = negative_id(a, idx);
    if (id == kNoItem) return {kNoItem, kInf, 0.f};
    return {id, a.neg_lq != nullptr ? a.neg_lq[idx] : 0.f, 0.f};
  }
  return {y, is_excluded(a, y) ? kInf : 0.f, 0.f};
}

__device__ Line hidden_line(const LossArgs& a, i64 t, bool valid, float inv_scale_max) {
  if (!valid) return {kNoRow, 0.f, 0.f};
  const i64 id = a.pos[t];
  const bool kept = a.grad != nullptr && valid_row(a, id);
  return {id, a.lse != nullptr ? a.lse[t] : 0.f, kept ? a.grad[t] * a.inv_temp * inv_scale_max : 0.f};
}

// ------------------------------------------------------------------ tile loads -----------

template <typename T, int BYTES, typename Src>
__device__ __forceinline__ void copy_rows_async(T* dst, int ld, int rows, int cols, const T* base, i64 stride, i64 dim,
                                                i64 col0, Src src) {
  constexpr int kElems = BYTES / sizeof(T);
  const int per_row = cols / kElems;
  for (int u = threadIdx.x; u < rows * per_row; u += blockDim.x) {
    const int r = u / per_row, c = (u - r * per_row) * kElems;
    const i64 row = src(r), col = col0 + c;
    const bool ok = row >= 0 && col < dim;  // dim * sizeof(T) is a multiple of BYTES
    cp_async<BYTES>(dst + r * ld + c, ok ? base + row * stride + col : base, ok);
  }
}

// dst[r, c] = base[src(r), col0 + c] for r < rows, c < cols (cols a multiple of 64); zeros
// where src(r) < 0 or col0 + c >= dim. Asynchronous unless vec == 2 (odd 16-bit offsets).
template <typename T, typename Src>
__device__ __forceinline__ void load_rows(T* dst, int ld, int rows, int cols, const T* base, i64 stride, i64 dim,
                                          i64 col0, int vec, Src src) {
  switch (vec) {
    case 16:
      copy_rows_async<T, 16>(dst, ld, rows, cols, base, stride, dim, col0, src);
      break;
    case 8:
      copy_rows_async<T, 8>(dst, ld, rows, cols, base, stride, dim, col0, src);
      break;
    case 4:
      copy_rows_async<T, 4>(dst, ld, rows, cols, base, stride, dim, col0, src);
      break;
    default:
      for (int u = threadIdx.x; u < rows * cols; u += blockDim.x) {
        const int r = u / cols, c = u - r * cols;
        const i64 row = src(r), col = col0 + c;
        dst[r * ld + c] = (row >= 0 && col < dim) ? base[row * stride + col] : from_f<T>(0.f);
      }
  }
}

// ------------------------------------------------------------------ tile products --------

// Column of acc[j][e] (and acc[j][2 + e]) within the output chunk.
template <typename T>
__device__ __forceinline__ int acc_col(int j, int e, int tig) {
  return chunk_col(IsF32<T>::value, j, e, tig);
}

// f(j, e, d) for the accumulator entries acc[j][e] (row g) / acc[j][2 + e] (row g + 8) whose
// column d of output chunk oc is inside D.
template <typename T, typename F>
__device__ __forceinline__ void for_chunk_cols(int oc, i64 D, int tig, F&& f) {
#pragma unroll
  for (int j = 0; j < kChunk / 8; ++j) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int d = oc * kChunk + acc_col<T>(j, e, tig);
      if (d >= D) continue;
      f(j, e, d);
    }
  }
}

// The engine's warp tile products (common.cuh): s[16, kTile] += x[16, kChunk] y[kTile,
// kChunk]^T (3xTF32 under TF32X3), x at the warp's first row; acc[16, kChunk] += p[16,
// kTile] y[kTile, kChunk], acc's float32 columns those of chunk_col.
template <typename T, bool TF32X3>
__device__ __forceinline__ void tile_scores(float (&s)[8][4], const T* x, int xld, const T* y, int yld, int lane) {
  warp_scores<T, kChunk, kTile / 8, TF32X3>(s, x, xld, y, yld, lane);
}
template <typename T>
__device__ __forceinline__ void tile_accumulate(float (&acc)[8][4], const float (&p)[8][4], const T* y, int yld,
                                                int lane) {
  warp_accumulate<T, kTile / 8, kChunk / 8>(acc, p, y, yld, lane,
                                            [](int q, int tig) { return chunk_col(true, 2 * q, 0, tig); });
}

// ------------------------------------------------------------------ tile engine ----------

struct EngineOut {
  float* loss;       // [T] forward, one split
  float* lse;        // [T] forward, one split
  float* part;       // forward: [splits, T, 2] (max, sumexp); backward: [splits, X rows, D]
                     // (sampled d weight without atomics: [splits, G * K, D], any splits)
  float* row_logit;  // forward with splits: [T] positive / target logits
  void* d_hidden;    // [T, D] backward rows, one split
  float* d_weight;   // [N, D] backward items (full, one split; sampled: atomics)
  void* d_weight_out;  // [N, D] in T instead of d_weight: full, one split (LossGradients::d_weight_out)
  bool atomic_dw;    // sampled, not deterministic: backward rows also add the positives' d
                     // weight, backward items the negatives' (float32 atomics)
};

// blockIdx.x: (group, stationary tile); blockIdx.y: (stream split, output D chunk).
// KIND kFwd / kBwdRows: X = hidden rows of one group, Y = its candidate items;
// kBwdItems: X = items (full) or negative slots (sampled), Y = hidden rows of the group.
// Hidden lines are slots of the group's order (counted rows first): x0 + r or y.
// Two CTAs per SM (128 registers), except the float32 backward (FFMA tiles, no spills).
template <typename T, int KIND, bool TF32X3>
__global__ void __launch_bounds__(kMaxWarps * 32, IsF32<T>::value&& KIND != kFwd ? 1 : 2)
    engine_kernel(const LossArgs a, const EnginePlan p, const EngineOut o) {
  constexpr bool kRowsX = KIND != kBwdItems;
  constexpr bool kBwd = KIND != kFwd;
  constexpr int kPad = smem_pad(sizeof(T));
  constexpr int yld = kChunk + kPad;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, tig = lane & 3;
  const int rows_x = blockDim.x / 2;  // 16 per warp
  const int xld = p.dpad + kPad;
  T* xs = reinterpret_cast<T*>(dynamic_smem);                                           // [rows_x, xld]
  T* ys = xs + rows_x * xld;                                           // [2, kTile, yld]
  Line* xlines = reinterpret_cast<Line*>(ys + 2 * kTile * yld);        // [rows_x]
  Line* ylines = xlines + rows_x;                                      // [2, kTile]
  float* xlogit = reinterpret_cast<float*>(ylines + 2 * kTile);        // [rows_x] sampled positives' logits
  const T* hidden = static_cast<const T*>(a.hidden);
  const T* weight = static_cast<const T*>(a.weight);

  EngineCta cta = engine_cta(p, shape_of(a), KIND, blockIdx.x, blockIdx.y, rows_x);
  cta = compacted_cta(cta, KIND, a.count[cta.grp], p.nchunks);
  const i64 grp = cta.grp, x0 = cta.x0, ybeg = cta.ybeg, yend = cta.yend;
  const int x_count = cta.x_count, split = cta.split, oc = cta.oc, nstages = cta.nstages;
  const int32_t* slot_row = a.order + group_first_row(shape_of(a), grp);  // [group rows] hidden row of a slot

  if (nstages == 0) {  // nothing to score: the zero outputs of its ignored rows, or of its split
    if constexpr (KIND == kFwd) {
      for (int r = tid; r < x_count && p.splits == 1; r += blockDim.x) {  // (split: combine_forward)
        const i64 t = slot_row[x0 + r];
        o.loss[t] = 0.f;
        o.lse[t] = 0.f;
      }
    } else if (KIND == kBwdRows || !o.atomic_dw) {  // the epilogue's entries: chunk oc of its lines
      for (int u = tid; u < x_count * kChunk; u += blockDim.x) {
        const int r = u / kChunk;
        const i64 d = static_cast<i64>(oc) * kChunk + (u - r * kChunk);
        if (d >= a.D) continue;
        // Hidden row, or item (full) / negative slot (sampled; absent ones too: never read).
        const i64 line = kRowsX ? slot_row[x0 + r] : items_line(shape_of(a), grp, x0 + r);
        if (p.splits > 1 || (!kRowsX && a.sampled))
          o.part[bwd_part_index(split, kRowsX ? a.T : items_rows(shape_of(a), p), line, a.D, d)] = 0.f;
        else if constexpr (kRowsX)
          static_cast<T*>(o.d_hidden)[line * a.D + d] = from_f<T>(0.f);
        else if (o.d_weight_out != nullptr)
          static_cast<T*>(o.d_weight_out)[line * a.D + d] = from_f<T>(0.f);
        else
          o.d_weight[line * a.D + d] = 0.f;
      }
    }  // (sampled d weight by atomics: nothing to add)
    return;
  }
  const float scale_max = (KIND == kBwdItems && a.scale_max != nullptr) ? *a.scale_max : 1.f;

  // Stationary lines and rows (first cp.async group).
  for (int r = tid; r < rows_x; r += blockDim.x) {
    const bool valid = r < x_count;
    xlines[r] = kRowsX ? hidden_line(a, valid ? slot_row[x0 + r] : 0, valid, 1.f) : item_line(a, grp, x0 + r, valid);
  }
  auto x_src = [&](int r) -> i64 {
    if (r >= x_count) return -1;
    if constexpr (kRowsX)
      return slot_row[x0 + r];
    else
      return a.sampled ? negative_id(a, grp * a.K + x0 + r) : x0 + r;  // kNoItem < 0: zeros
  };
  if constexpr (kRowsX)
    load_rows(xs, xld, rows_x, p.dpad, hidden, a.hs, a.D, 0, a.vec_h, x_src);
  else
    load_rows(xs, xld, rows_x, p.dpad, weight, a.ws, a.D, 0, a.vec_w, x_src);
  cp_async_commit();

  // Stage st = (tile i, chunk q) into buffer st & 1; the tile's lines into ylines[i & 1].
  // Chunks run from oc + 1 round to oc, so the output chunk is the one left in shared memory.
  auto load_stage = [&](int st) {
    const Stage sg = stage_of(st, p.nchunks);
    const int i = sg.tile, q = sg.step;
    const i64 first = tile_first_line(ybeg, i);
    if (q == 0) {
      Line* yl = ylines + (i & 1) * kTile;
      for (int c = tid; c < kTile; c += blockDim.x) {
        const i64 y = first + c;
        yl[c] = kRowsX ? item_line(a, grp, y, y < yend)
                       : hidden_line(a, y < yend ? slot_row[y] : 0, y < yend, 1.f / scale_max);
      }
    }
    auto y_src = [&](int r) -> i64 {
      const i64 y = first + r;
      if (y >= yend) return -1;
      if constexpr (kRowsX)
        return a.sampled ? negative_id(a, grp * a.K + y) : y;
      else
        return slot_row[y];
    };
    const i64 col0 = static_cast<i64>(stage_chunk(oc, q, p.nchunks)) * kChunk;
    T* dst = ys + (st & 1) * kTile * yld;
    if constexpr (kRowsX)
      load_rows(dst, yld, kTile, kChunk, weight, a.ws, a.D, col0, a.vec_w, y_src);
    else
      load_rows(dst, yld, kTile, kChunk, hidden, a.hs, a.D, col0, a.vec_h, y_src);
    cp_async_commit();
  };
  load_stage(0);

  // Sampled positives' logits, from the stationary rows (the same in forward and backward).
  if (kRowsX && a.sampled) {
    cp_async_wait<1>();
    __syncthreads();
    for (int r = warp * 16; r < imin(warp * 16 + 16, x_count); ++r) {
      const i64 t = slot_row[x0 + r];
      const T* w = weight + imin(imax(a.pos[t], i64{0}), a.N - 1) * a.ws;  // any id: an in-bounds read
      float dot = 0.f;
      for (int d = lane; d < a.D; d += 32) dot = fmaf(to_f(xs[r * xld + d]), to_f(w[d]), dot);
      dot = warp_sum(dot);
      if (lane == 0) xlogit[r] = dot * a.inv_temp - (a.pos_lq != nullptr ? a.pos_lq[t] : 0.f);
    }
  }

  const int r0 = warp * 16;
  const bool active = r0 < x_count;  // warps without lines only help load
  float s[8][4];                     // [16, kTile] scores, then probabilities / coefficients
  float acc[8][4] = {};              // backward: [16, kChunk] gradient rows
  float run_max[2] = {-kInf, -kInf}, run_sum[2] = {0.f, 0.f};  // forward: rows g, g + 8
  float target_logit[2] = {0.f, 0.f};
  bool target_found[2] = {false, false};

  for (int st = 0; st < nstages; ++st) {
    if (st + 1 < nstages) {
      load_stage(st + 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // stage st visible to all
    const Stage sg = stage_of(st, p.nchunks);
    const int i = sg.tile, q = sg.step;
    const T* yb = ys + (st & 1) * kTile * yld;
    if (active) {
      if (q == 0) {
#pragma unroll
        for (int j = 0; j < 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
      }
      tile_scores<T, TF32X3>(s, xs + r0 * xld + stage_chunk(oc, q, p.nchunks) * kChunk, xld, yb, yld, lane);
      if (q == p.nchunks - 1) {  // the tile's scores are complete
        const Line* yl = ylines + (i & 1) * kTile;
        const i64 first = tile_first_line(ybeg, i);
        if constexpr (kRowsX) {
          const Line xr[2] = {xlines[r0 + g], xlines[r0 + g + 8]};
          // Full softmax: the target's column in this tile, less this lane's score_col(0, tig, 0), to
          // compare with score_col(j, 0, e) (items are contiguous).
          int target_col[2] = {-1000, -1000};
#pragma unroll
          for (int rr = 0; rr < 2; ++rr)
            if (!a.sampled && xr[rr].id >= first && xr[rr].id < first + kTile)
              target_col[rr] = static_cast<int>(xr[rr].id - first) - frag::score_col(0, tig, 0);
          float tile_max[2] = {-kInf, -kInf};
#pragma unroll
          for (int j = 0; j < 8; ++j) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {  // column by column: each line is used at once by both rows
              const int c = frag::score_col(j, tig, e);
              const float bias = yl[c].a;
              const bool hits = a.sampled && a.remove_hits;
              const i64 id = hits ? yl[c].id : kNoItem;
#pragma unroll
              for (int rr = 0; rr < 2; ++rr) {
                float x = s[j][2 * rr + e] * a.inv_temp - bias;
                if (hits && id == xr[rr].id) x = -kInf;  // accidental hit
                if constexpr (KIND == kFwd) {
                  if (frag::score_col(j, 0, e) == target_col[rr]) {
                    target_logit[rr] = x;
                    target_found[rr] = true;
                  }
                  tile_max[rr] = fmaxf(tile_max[rr], x);
                  s[j][2 * rr + e] = x;
                } else {  // softmax - onehot(target); the row scale is applied to acc at the end
                  s[j][2 * rr + e] = __expf(x - xr[rr].a) - (frag::score_col(j, 0, e) == target_col[rr] ? 1.f : 0.f);
                }
              }
            }
          }
          if constexpr (KIND == kFwd) {
#pragma unroll
            for (int rr = 0; rr < 2; ++rr) {
              const float new_max = fmaxf(run_max[rr], quad_max(tile_max[rr]));
              const float ref = new_max == -kInf ? 0.f : new_max;  // no (-inf) - (-inf)
              float sum = 0.f;
#pragma unroll
              for (int j = 0; j < 8; ++j) sum += __expf(s[j][2 * rr] - ref) + __expf(s[j][2 * rr + 1] - ref);
              run_sum[rr] = run_sum[rr] * __expf(run_max[rr] - ref) + sum;
              run_max[rr] = new_max;
            }
          }
        } else {
          const Line xi[2] = {xlines[r0 + g], xlines[r0 + g + 8]};
#pragma unroll
          for (int j = 0; j < 8; ++j) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const Line h = yl[frag::score_col(j, tig, e)];
#pragma unroll
              for (int rr = 0; rr < 2; ++rr) {
                float x = s[j][2 * rr + e] * a.inv_temp - xi[rr].a;
                const bool same = xi[rr].id == h.id;
                if (a.sampled && a.remove_hits && same) x = -kInf;  // accidental hit
                const float prob = __expf(x - h.a) - ((!a.sampled && same) ? 1.f : 0.f);
                s[j][2 * rr + e] = h.b != 0.f ? prob * h.b : 0.f;  // b = grad / temperature / scale_max
              }
            }
          }
        }
        if constexpr (kBwd) tile_accumulate<T>(acc, s, yb, yld, lane);
      }
    }
    __syncthreads();  // buffer st & 1 free for stage st + 2
  }

  if (!active) return;
  if constexpr (KIND == kFwd) {
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      const float sum = quad_sum(run_sum[rr]);
      const float tlogit = quad_sum(target_found[rr] ? target_logit[rr] : 0.f);
      const bool found = quad_sum(target_found[rr] ? 1.f : 0.f) > 0.f;
      const int r = r0 + frag::score_row(g, rr);
      if (tig != 0 || r >= x_count) continue;
      const i64 t = slot_row[x0 + r];
      if (p.splits == 1) {
        float m = run_max[rr], l = sum, row_logit = tlogit;
        if (a.sampled) {  // the positive is always in the denominator
          row_logit = xlogit[r];
          const float new_max = fmaxf(m, row_logit);
          l = l * __expf(m - new_max) + __expf(row_logit - new_max);
          m = new_max;
        }
        const float lse = m + logf(l);
        const bool valid = valid_row(a, a.pos[t]);  // ignored rows: loss 0, LSE 0 (as the reference)
        o.lse[t] = valid ? lse : 0.f;
        o.loss[t] = valid ? lse - row_logit : 0.f;
      } else {
        o.part[fwd_part_index(split, a.T, t)] = run_max[rr];
        o.part[fwd_part_index(split, a.T, t) + 1] = sum;
        if (a.sampled ? split == 0 : found) o.row_logit[t] = a.sampled ? xlogit[r] : tlogit;
      }
    }
  } else if constexpr (KIND == kBwdRows) {
    float* dw = o.d_weight;
    T* dh = static_cast<T*>(o.d_hidden);
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      const int r = r0 + frag::score_row(g, rr);
      if (r >= x_count) continue;
      const i64 t = slot_row[x0 + r];
      const Line xr = xlines[r];
      const float scale = xr.b;  // grad / temperature, 0 for ignored rows
      if (a.sampled && split == 0) {  // the positive: (softmax - 1) w_pos, and its d weight
        const i64 pos = imin(imax(xr.id, i64{0}), a.N - 1);
        const float coef = __expf(xlogit[r] - xr.a) - 1.f;
        const bool scatter = o.atomic_dw && scale != 0.f;
        for_chunk_cols<T>(oc, a.D, tig, [&](int j, int e, int d) {
          acc[j][2 * rr + e] = fmaf(coef, to_f(weight[pos * a.ws + d]), acc[j][2 * rr + e]);
          if (scatter) atomicAdd(dw + pos * a.D + d, coef * scale * to_f(xs[r * xld + d]));
        });
      }
      for_chunk_cols<T>(oc, a.D, tig, [&](int j, int e, int d) {
        const float v = scale != 0.f ? acc[j][2 * rr + e] * scale : 0.f;
        if (p.splits == 1)
          dh[t * a.D + d] = from_f<T>(v);
        else
          o.part[bwd_part_index(split, a.T, t, a.D, d)] = v;
      });
    }
  } else {
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      const int r = r0 + frag::score_row(g, rr);
      if (r >= x_count || xlines[r].id == kNoItem) continue;  // an absent negative has no d weight row
      const i64 item = xlines[r].id;
      for_chunk_cols<T>(oc, a.D, tig, [&](int j, int e, int d) {
        const float v = acc[j][2 * rr + e] * scale_max;
        if (o.atomic_dw)  // sampled: duplicates across slots and groups
          atomicAdd(o.d_weight + item * a.D + d, v);
        else if (p.splits == 1 && !a.sampled && o.d_weight_out != nullptr)  // the item's one writer
          static_cast<T*>(o.d_weight_out)[item * a.D + d] = from_f<T>(v);
        else if (p.splits == 1 && !a.sampled)
          o.d_weight[item * a.D + d] = v;
        else  // split, or sampled deterministic: the item's (slot's) row of this split
          o.part[bwd_part_index(split, items_rows(shape_of(a), p), items_line(shape_of(a), grp, x0 + r), a.D, d)] = v;
      });
    }
  }
}

// Forward with split streams: lse and loss from the (max, sumexp) partials [splits, T, 2];
// loss 0 and LSE 0 at ignored rows, whose partials idle CTAs leave unwritten.
__global__ void combine_forward(const LossArgs a, const float* part, const float* row_logit, int splits, float* loss,
                                float* lse) {
  for (i64 t = blockIdx.x * static_cast<i64>(blockDim.x) + threadIdx.x; t < a.T;
       t += static_cast<i64>(gridDim.x) * blockDim.x) {
    if (!valid_row(a, a.pos[t])) {
      loss[t] = lse[t] = 0.f;
      continue;
    }
    float m = a.sampled ? row_logit[t] : -kInf, l = a.sampled ? 1.f : 0.f;
    for (int sp = 0; sp < splits; ++sp) {
      const float pm = part[fwd_part_index(sp, a.T, t)], pl = part[fwd_part_index(sp, a.T, t) + 1];
      if (pm == -kInf) continue;  // a split with no kept candidate
      const float new_max = fmaxf(m, pm);
      l = l * expf(m - new_max) + pl * expf(pm - new_max);
      m = new_max;
    }
    const float value = m + logf(l);
    lse[t] = value;
    loss[t] = value - row_logit[t];
  }
}

// The engine's order and count (compacted_cta): CTA g partitions group g's rows, counted
// rows (valid_row) to the front in row order, ignored rows to the back. Each pass scans
// THREADS * kCompactRowsPerThread rows, kCompactRowsPerThread consecutive rows per thread.
template <int THREADS>
__global__ void __launch_bounds__(THREADS) compact_rows(const LossArgs a, int32_t* order, int32_t* count) {
  using Scan = cub::BlockScan<int, THREADS>;
  __shared__ typename Scan::TempStorage scan;
  constexpr i64 kPass = static_cast<i64>(THREADS) * kCompactRowsPerThread;
  const i64 rows = group_rows(shape_of(a)), first = group_first_row(shape_of(a), blockIdx.x);
  i64 counted = 0, ignored = 0;  // of the earlier passes
  for (i64 c0 = 0; c0 < rows; c0 += kPass) {
    bool keep[kCompactRowsPerThread];
    int n = 0;
#pragma unroll
    for (int i = 0; i < kCompactRowsPerThread; ++i) {
      const i64 r = compact_row(c0, threadIdx.x, i);
      keep[i] = r < rows && valid_row(a, a.pos[first + r]);
      n += keep[i];
    }
    int before, total;  // counted rows of the pass before this thread's, and in all
    Scan(scan).ExclusiveSum(n, before, total);
    // The pass's ignored rows before this thread's: its rows before them, less the counted.
    i64 ignored_before = imin(compact_row(0, threadIdx.x, 0), rows - c0) - before;
    i64 counted_before = before;
#pragma unroll
    for (int i = 0; i < kCompactRowsPerThread; ++i) {
      const i64 r = compact_row(c0, threadIdx.x, i);
      if (r >= rows) continue;
      const i64 slot = keep[i] ? compact_slot(first, rows, true, counted + counted_before++)
                               : compact_slot(first, rows, false, ignored + ignored_before++);
      order[slot] = static_cast<int32_t>(first + r);
    }
    counted += total;
    ignored += imin(kPass, rows - c0) - total;
    __syncthreads();  // the scan storage is reused by the next pass
  }
  if (threadIdx.x == 0) count[blockIdx.x] = static_cast<int32_t>(counted);
}

// out[i] = sum over splits of part[split, i], in split order.
template <typename Out>
__global__ void reduce_splits(const float* part, int splits, i64 count, Out* out) {
  for (i64 i = blockIdx.x * static_cast<i64>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<i64>(gridDim.x) * blockDim.x) {
    float v = 0.f;
    for (int sp = 0; sp < splits; ++sp) v += part[sp * count + i];
    out[i] = from_f<Out>(v);
  }
}

// out[0] = max |grad| / temperature over kept rows (1 when 0 or not finite): d weight tiles
// carry grad / temperature / out[0] in [-1, 1], safe in float16, and multiply back by out[0].
__global__ void grad_scale_max(const LossArgs a, float* out) {
  __shared__ float warp_max[32];
  float v = 0.f;
  for (i64 t = threadIdx.x; t < a.T; t += blockDim.x)
    if (valid_row(a, a.pos[t])) v = fmaxf(v, fabsf(a.grad[t]));
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, o));
  if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x >> 5] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < static_cast<int>(blockDim.x >> 5); ++w) v = fmaxf(v, warp_max[w]);
    const float m = v * a.inv_temp;
    out[0] = (m > 0.f && m < kInf) ? m : 1.f;
  }
}

// ------------------------------------------------------------------ warp per row ---------

// v[i] = row[i * 32 + lane] (0 past D): a row of D <= VPL * 32 spread over the warp.
template <typename T, int VPL>
__device__ __forceinline__ void load_vec(float (&v)[VPL], const T* row, i64 dim, int lane) {
#pragma unroll
  for (int i = 0; i < VPL; ++i) v[i] = i * 32 + lane < dim ? to_f(row[i * 32 + lane]) : 0.f;
}

template <int VPL>
__device__ __forceinline__ float dot_part(const float (&x)[VPL], const float (&y)[VPL]) {
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < VPL; ++i) s = fmaf(x[i], y[i], s);
  return s;
}
template <int N>
__device__ __forceinline__ void warp_sums(float (&v)[N]) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
#pragma unroll
    for (int u = 0; u < N; ++u) v[u] += __shfl_xor_sync(kFull, v[u], o);
  }
}

// Row t's hidden row h, positive weight row w_pos and positive logit (same in fwd and bwd).
template <typename T, int VPL>
__device__ __forceinline__ float positive_logit(const LossArgs& a, i64 t, float (&h)[VPL], float (&w_pos)[VPL],
                                                int lane) {
  load_vec(h, static_cast<const T*>(a.hidden) + t * a.hs, a.D, lane);
  const i64 pos = imin(imax(a.pos[t], i64{0}), a.N - 1);  // ignored rows may hold any id: read in bounds
  load_vec(w_pos, static_cast<const T*>(a.weight) + pos * a.ws, a.D, lane);
  return warp_sum(dot_part(h, w_pos)) * a.inv_temp - (a.pos_lq != nullptr ? a.pos_lq[t] : 0.f);
}

// Negatives k .. k + B - 1 of group grp for a row with positive pos: their ids, weight
// rows w [B, D] and logits x (-inf where absent or an accidental hit).
template <typename T, int VPL, int B>
__device__ __forceinline__ void negative_batch(const LossArgs& a, i64 grp, i64 k, i64 pos, const float (&h)[VPL],
                                               int lane, i64 (&id)[B], float (&w)[B][VPL], float (&x)[B]) {
#pragma unroll
  for (int u = 0; u < B; ++u) {
    id[u] = k + u < a.K ? negative_id(a, grp * a.K + k + u) : kNoItem;
    if (id[u] != kNoItem)
      load_vec(w[u], static_cast<const T*>(a.weight) + id[u] * a.ws, a.D, lane);
    else
#pragma unroll
      for (int i = 0; i < VPL; ++i) w[u][i] = 0.f;
    x[u] = dot_part(h, w[u]);
  }
  warp_sums(x);
#pragma unroll
  for (int u = 0; u < B; ++u) {
    const bool kept = id[u] != kNoItem && !(a.remove_hits && id[u] == pos);
    const float lq = a.neg_lq != nullptr && id[u] != kNoItem ? a.neg_lq[grp * a.K + k + u] : 0.f;
    x[u] = kept ? x[u] * a.inv_temp - lq : -kInf;
  }
}

// One warp per row: lse and loss of the sampled softmax (both 0 for ignored rows).
template <typename T, int VPL>
__global__ void __launch_bounds__(kRowWarps * 32) sampled_rows_forward(const LossArgs a, float* loss, float* lse) {
  const i64 t = static_cast<i64>(blockIdx.x) * kRowWarps + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (t >= a.T) return;
  const i64 pos = a.pos[t], grp = t / a.rpg;
  if (!valid_row(a, pos)) {  // ignored (or out of range): no logits
    if (lane == 0) loss[t] = lse[t] = 0.f;
    return;
  }
  float h[VPL], w_pos[VPL];
  const float pos_logit = positive_logit<T>(a, t, h, w_pos, lane);
  constexpr int B = batch_rows(VPL);
  float m = pos_logit, l = 1.f;  // the positive is always in the denominator
  for (i64 k = 0; k < a.K; k += B) {
    i64 id[B];
    float w[B][VPL], x[B];
    negative_batch<T>(a, grp, k, pos, h, lane, id, w, x);
    float new_max = m;
#pragma unroll
    for (int u = 0; u < B; ++u) new_max = fmaxf(new_max, x[u]);
    float sum = 0.f;
#pragma unroll
    for (int u = 0; u < B; ++u) sum += __expf(x[u] - new_max);
    l = l * __expf(m - new_max) + sum;
    m = new_max;
  }
  if (lane == 0) {
    const float value = m + logf(l);
    lse[t] = value;
    loss[t] = value - pos_logit;
  }
}

// One warp per row: d hidden, and d weight by float32 atomics when d_weight != null. The
// explicit minimum of one CTA per SM keeps ptxas from trading a register spill for
// occupancy (it did, for D <= 128, without one).
template <typename T, int VPL>
__global__ void __launch_bounds__(kRowWarps * 32, 1)
    sampled_rows_backward(const LossArgs a, T* d_hidden, float* d_weight) {
  const i64 t = static_cast<i64>(blockIdx.x) * kRowWarps + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (t >= a.T) return;
  T* dh_row = d_hidden + t * a.D;
  const i64 pos = a.pos[t];
  if (!valid_row(a, pos)) {  // ignored (or out of range): no gradient
    for (i64 d = lane; d < a.D; d += 32) dh_row[d] = from_f<T>(0.f);
    return;
  }
  float h[VPL], w_pos[VPL], dh[VPL];
  const float pos_logit = positive_logit<T>(a, t, h, w_pos, lane);
  const float lse = a.lse[t], scale = a.grad[t] * a.inv_temp;
  const float pos_coef = (__expf(pos_logit - lse) - 1.f) * scale;  // softmax - 1
#pragma unroll
  for (int i = 0; i < VPL; ++i) {
    dh[i] = pos_coef * w_pos[i];
    if (d_weight != nullptr && i * 32 + lane < a.D) atomicAdd(d_weight + pos * a.D + i * 32 + lane, pos_coef * h[i]);
  }
  const i64 grp = t / a.rpg;
  constexpr int B = batch_rows(VPL);
  for (i64 k = 0; k < a.K; k += B) {
    i64 id[B];
    float w[B][VPL], x[B];
    negative_batch<T>(a, grp, k, pos, h, lane, id, w, x);
#pragma unroll
    for (int u = 0; u < B; ++u) {
      if (id[u] == kNoItem || x[u] == -kInf) continue;  // absent or an accidental hit: no gradient
      const float coef = __expf(x[u] - lse) * scale;
#pragma unroll
      for (int i = 0; i < VPL; ++i) {
        dh[i] = fmaf(coef, w[u][i], dh[i]);
        if (d_weight != nullptr && i * 32 + lane < a.D) atomicAdd(d_weight + id[u] * a.D + i * 32 + lane, coef * h[i]);
      }
    }
  }
#pragma unroll
  for (int i = 0; i < VPL; ++i)
    if (i * 32 + lane < a.D) dh_row[i * 32 + lane] = from_f<T>(dh[i]);
}

// ------------------------------------------------------------------ deterministic d weight

// Sample slot s < T is row s's positive; slot T + g * K + k is negative k of group g. Slots
// of ignored rows and absent negatives get key N (after every item, owned by no CTA): keys
// stay <= N, which the sort's end bit assumes.
__global__ void sampled_slot_keys(const LossArgs a, uint32_t* keys, uint32_t* slots, i64 num_slots) {
  for (i64 s = blockIdx.x * static_cast<i64>(blockDim.x) + threadIdx.x; s < num_slots;
       s += static_cast<i64>(gridDim.x) * blockDim.x) {
    i64 key;
    if (s < a.T) {
      key = valid_row(a, a.pos[s]) ? a.pos[s] : a.N;
    } else {
      const i64 id = negative_id(a, s - a.T);
      key = id != kNoItem ? id : a.N;
    }
    keys[s] = static_cast<uint32_t>(key);
    slots[s] = static_cast<uint32_t>(s);
  }
}

// CTA p owns the item keys[p] if p starts its run in the sorted keys: it sums, slot by slot
// in sorted (= slot) order, each slot's rows' contributions; warp w takes rows w * B + u
// (mod warps * B), and the warps' sums are added in warp order.
template <typename T, int VPL>
__global__ void __launch_bounds__(kRowWarps * 32)
    sampled_weight_grad_sorted(const LossArgs a, const uint32_t* keys, const uint32_t* slots, i64 num_slots,
                               float* d_weight) {
  __shared__ float partial[kRowWarps][VPL * 32];
  const i64 p = blockIdx.x;
  const uint32_t key = keys[p];
  if (key >= a.N || (p > 0 && keys[p - 1] == key)) return;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const T* hidden = static_cast<const T*>(a.hidden);
  const i64 item = key;
  constexpr int B = batch_rows(VPL);
  float w[VPL], acc[VPL] = {};
  load_vec(w, static_cast<const T*>(a.weight) + item * a.ws, a.D, lane);
  for (i64 q = p; q < num_slots && keys[q] == key; ++q) {
    const i64 slot = slots[q];
    const bool is_pos = slot < a.T;
    const i64 first = is_pos ? slot : (slot - a.T) / a.K * a.rpg, count = is_pos ? 1 : a.rpg;
    const float lq =
        is_pos ? (a.pos_lq != nullptr ? a.pos_lq[slot] : 0.f) : (a.neg_lq != nullptr ? a.neg_lq[slot - a.T] : 0.f);
    for (i64 r = static_cast<i64>(warp) * B; r < count; r += static_cast<i64>(kRowWarps) * B) {
      float hv[B][VPL], x[B];
      bool kept[B];
#pragma unroll
      for (int u = 0; u < B; ++u) {
        const i64 t = first + r + u;
        const i64 pos = r + u < count ? a.pos[t] : a.ignore;
        kept[u] = valid_row(a, pos) && (is_pos || !a.remove_hits || pos != item);
        if (kept[u])
          load_vec(hv[u], hidden + t * a.hs, a.D, lane);
        else
#pragma unroll
          for (int i = 0; i < VPL; ++i) hv[u][i] = 0.f;
        x[u] = dot_part(hv[u], w);
      }
      warp_sums(x);
#pragma unroll
      for (int u = 0; u < B; ++u) {
        if (!kept[u]) continue;
        const i64 t = first + r + u;
        const float prob = __expf(x[u] * a.inv_temp - lq - a.lse[t]);
        const float coef = (prob - (is_pos ? 1.f : 0.f)) * a.grad[t] * a.inv_temp;
#pragma unroll
        for (int i = 0; i < VPL; ++i) acc[i] = fmaf(coef, hv[u][i], acc[i]);
      }
    }
  }
#pragma unroll
  for (int i = 0; i < VPL; ++i) partial[warp][i * 32 + lane] = acc[i];
  __syncthreads();
  if (warp != 0) return;
#pragma unroll
  for (int i = 0; i < VPL; ++i) {
    if (i * 32 + lane >= a.D) continue;
    float v = 0.f;
    for (int w2 = 0; w2 < kRowWarps; ++w2) v += partial[w2][i * 32 + lane];
    d_weight[item * a.D + i * 32 + lane] = v;
  }
}

// With shared negatives (the tile engine ran): warp w of CTA bx owns the item keys[p], p =
// partial_sum_position(bx, w), if p starts its run in the sorted keys, and sums its slots
// in sorted (= slot) order: a positive slot's (softmax - 1) * grad / temperature * h as
// sampled_weight_grad_sorted, a negative slot's partial rows (the d weight kernel's,
// [splits, G * K, D]) in split order. One warp, one fixed order: bitwise reproducible.
template <typename T, int VPL>
__global__ void __launch_bounds__(kRowWarps * 32)
    sampled_weight_grad_partials(const LossArgs a, const uint32_t* keys, const uint32_t* slots, i64 num_slots,
                                 const float* part, int splits, float* d_weight) {
  const i64 p = partial_sum_position(blockIdx.x, threadIdx.x >> 5);
  if (p >= num_slots) return;
  const uint32_t key = keys[p];
  if (key >= a.N || (p > 0 && keys[p - 1] == key)) return;
  const int lane = threadIdx.x & 31;
  const i64 item = key, rows = sort_slots(shape_of(a)) - a.T;  // G * K partial rows per split
  float w[VPL], acc[VPL] = {};
  load_vec(w, static_cast<const T*>(a.weight) + item * a.ws, a.D, lane);
  for (i64 q = p; q < num_slots && keys[q] == key; ++q) {
    const i64 slot = slots[q];
    if (slot < a.T) {  // row slot's positive (a counted row: ignored rows have key N)
      float h[VPL];
      load_vec(h, static_cast<const T*>(a.hidden) + slot * a.hs, a.D, lane);
      const float x = warp_sum(dot_part(h, w));
      const float lq = a.pos_lq != nullptr ? a.pos_lq[slot] : 0.f;
      const float coef = (__expf(x * a.inv_temp - lq - a.lse[slot]) - 1.f) * a.grad[slot] * a.inv_temp;
#pragma unroll
      for (int i = 0; i < VPL; ++i) acc[i] = fmaf(coef, h[i], acc[i]);
    } else {  // negative slot slot - T (present: absent ones have key N)
      for (int sp = 0; sp < splits; ++sp) {
#pragma unroll
        for (int i = 0; i < VPL; ++i)
          if (i * 32 + lane < a.D) acc[i] += part[bwd_part_index(sp, rows, slot - a.T, a.D, i * 32 + lane)];
      }
    }
  }
#pragma unroll
  for (int i = 0; i < VPL; ++i)
    if (i * 32 + lane < a.D) d_weight[item * a.D + i * 32 + lane] = acc[i];
}

// ------------------------------------------------------------------ host side ------------

// f(IntTag<VPL>) with VPL * 32 >= D for the warp-per-row kernels.
template <typename F>
cudaError_t with_vpl(i64 dim, F&& f) {
  switch (vpl_for_dim(dim)) {
    case 2:
      return f(IntTag<2>{});
    case 4:
      return f(IntTag<4>{});
    case 8:
      return f(IntTag<8>{});
    default:
      return f(IntTag<32>{});
  }
}

cudaError_t common_args(const LossInputs& in, LossArgs* a) {
  const bool known =
      in.dtype == ScalarType::kFloat32 || in.dtype == ScalarType::kFloat16 || in.dtype == ScalarType::kBFloat16;
  if (!known || in.dim < 1 || in.dim > kMaxKernelHiddenDim || in.num_rows < 0 || in.num_items < 1 ||
      in.num_items >= 0xffffffffLL || !(in.temperature > 0.f) || in.hidden == nullptr || in.weight == nullptr)
    return cudaErrorInvalidValue;
  // The fields up to `ignore`, in their order; the op's own ones are set by the caller.
  *a = LossArgs{in.hidden,    in.weight, in.hidden_row_stride, in.weight_row_stride, in.num_rows,
                in.num_items, in.dim,    1.f / in.temperature, in.ignore_index};
  const i64 es = static_cast<i64>(element_size(in.dtype));
  a->vec_h = copy_width(in.hidden, {in.hidden_row_stride * es, in.dim * es});
  a->vec_w = copy_width(in.weight, {in.weight_row_stride * es, in.dim * es});
  a->tf32x3 = in.tf32x3;
  return cudaSuccess;
}

cudaError_t sampled_args(const SampledSoftmaxParams& p, LossArgs* a) {
  const cudaError_t err = common_args(p.in, a);
  if (err != cudaSuccess) return err;
  if (p.num_neg < 1 || p.rows_per_group < 1 || p.num_groups * p.rows_per_group != p.in.num_rows ||
      p.pos_ids == nullptr || p.neg_ids == nullptr)
    return cudaErrorInvalidValue;
  a->sampled = true;
  a->remove_hits = p.remove_hits;
  a->pos = p.pos_ids;
  a->neg = p.neg_ids;
  a->pos_lq = p.pos_log_q;
  a->neg_lq = p.neg_log_q;
  a->K = p.num_neg;
  a->rpg = p.rows_per_group;
  return cudaSuccess;
}

cudaError_t full_args(const FullSoftmaxParams& p, LossArgs* a) {
  const cudaError_t err = common_args(p.in, a);
  if (err != cudaSuccess) return err;
  if (p.targets == nullptr || p.num_excluded < 0 || p.num_excluded >= p.in.num_items ||
      (p.num_excluded > 0 && p.excluded_ids == nullptr))
    return cudaErrorInvalidValue;
  a->pos = p.targets;
  a->excl = p.excluded_ids;
  a->E = p.num_excluded;
  return cudaSuccess;
}

struct DeviceInfo {
  int sms, smem_optin;
};

cudaError_t device_info(DeviceInfo* info) {
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&info->sms, cudaDevAttrMultiProcessorCount, dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&info->smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  return err;
}

template <int KIND>
cudaError_t launch_engine(const LossArgs& a, const EnginePlan& p, const EngineOut& o, ScalarType dtype,
                          const DeviceInfo& dev, cudaStream_t stream) {
  if (!engine_launchable(p, KIND, dev.smem_optin)) return cudaErrorInvalidValue;
  const EngineGrid grid = engine_grid(p, KIND);
  return with_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const dim3 blocks(static_cast<unsigned>(grid.x), static_cast<unsigned>(grid.y));
    return with_tf32x3<T>(a.tf32x3, [&](auto tf32x3) {
      return launch(engine_kernel<T, KIND, decltype(tf32x3)::value>, blocks, p.warps * 32, p.smem, stream, a, p, o);
    });
  });
}

// Blocks of 256 for the grid-stride elementwise kernels.
unsigned elementwise_blocks(i64 count) {
  return static_cast<unsigned>(imax<i64>(1, imin<i64>(ceil_div(count, 256), 65535)));
}

// The engine's order and count (compact_rows) into `words` [compact_words], set in *a.
cudaError_t compact(LossArgs* a, float* words, cudaStream_t stream) {
  if (a->T > 0x7fffffff) return cudaErrorInvalidValue;  // order holds int32 rows
  int32_t* order = reinterpret_cast<int32_t*>(words);
  int32_t* count = order + compact_count_offset(shape_of(*a));
  a->order = order;
  a->count = count;
  const i64 groups = a->sampled ? a->T / a->rpg : 1;
  const unsigned blocks = static_cast<unsigned>(groups);
  if (compact_threads(group_rows(shape_of(*a))) == 32)
    return launch(compact_rows<32>, blocks, 32, 0, stream, *a, order, count);
  return launch(compact_rows<1024>, blocks, 1024, 0, stream, *a, order, count);
}

// The tile-engine forward's plan on the current device: the item stream split across
// programs when T alone leaves SMs idle. The workspace size and the launch both use it.
cudaError_t forward_plan(const LossArgs& a, ScalarType dtype, DeviceInfo* dev, EnginePlan* plan) {
  const cudaError_t err = device_info(dev);
  *plan = engine_plan(shape_of(a), kFwd, element_size(dtype));
  split_stream(plan, shape_of(a), kFwd, 2 * static_cast<i64>(dev->sms), 2);
  return err;
}

size_t engine_forward_workspace_floats(const LossArgs& a, ScalarType dtype) {
  DeviceInfo dev{};
  EnginePlan plan{};
  if (forward_plan(a, dtype, &dev, &plan) != cudaSuccess) return 0;
  return forward_workspace_floats(shape_of(a), plan);
}

// Tile-engine forward (full, or sampled with shared negatives). The row order and, with a
// split stream, the partials go to `workspace` (engine_forward_workspace_floats, from the
// caller's allocator).
cudaError_t engine_forward(LossArgs a, ScalarType dtype, float* loss, float* lse, float* workspace,
                           cudaStream_t stream) {
  DeviceInfo dev{};
  EnginePlan plan{};
  cudaError_t err = forward_plan(a, dtype, &dev, &plan);
  if (err != cudaSuccess || (err = compact(&a, workspace, stream)) != cudaSuccess) return err;
  float* scratch = workspace + compact_words(shape_of(a));
  EngineOut o{};
  o.loss = loss;
  o.lse = lse;
  o.part = plan.splits > 1 ? scratch : nullptr;                             // [splits, T, 2]
  o.row_logit = plan.splits > 1 ? scratch + 2 * plan.splits * a.T : nullptr;  // [T]
  err = launch_engine<kFwd>(a, plan, o, dtype, dev, stream);
  if (err != cudaSuccess || plan.splits == 1) return err;
  return launch(combine_forward, elementwise_blocks(a.T), 256, 0, stream, a, o.part, o.row_logit, plan.splits, loss,
                lse);
}

// Deterministic sampled d weight: workspace words (4 bytes) for keys, slots and CUB.
struct SortLayout {
  i64 num_slots;
  int end_bit;
  size_t keys0, keys1, slots0, slots1, temp, temp_bytes, total_words;
};

cudaError_t sort_layout(const LossArgs& a, SortLayout* s) {
  s->num_slots = sort_slots(shape_of(a));
  if (s->num_slots > 0x7fffffff) return cudaErrorInvalidValue;
  s->end_bit = 1;
  while (s->end_bit < 32 && (i64{1} << s->end_bit) <= a.N) ++s->end_bit;  // keys are <= N
  cub::DoubleBuffer<uint32_t> keys(nullptr, nullptr), slots(nullptr, nullptr);
  s->temp_bytes = 0;
  const cudaError_t err = cub::DeviceRadixSort::SortPairs(nullptr, s->temp_bytes, keys, slots,
                                                          static_cast<int>(s->num_slots), 0, s->end_bit);
  const size_t n = align_words(static_cast<size_t>(s->num_slots));
  s->keys0 = 0;
  s->keys1 = n;
  s->slots0 = 2 * n;
  s->slots1 = 3 * n;
  s->temp = 4 * n;
  s->total_words = 4 * n + align_words((s->temp_bytes + 3) / 4);
  return err;
}

// words: [SortLayout::total_words] of the workspace. part: null (per-row negatives: every
// slot's rows re-read), or the d weight kernel's partials [splits, G * K, D] (tile engine).
cudaError_t sampled_weight_grad_deterministic(const LossArgs& a, ScalarType dtype, const LossGradients& g,
                                              float* workspace, const float* part, int splits, cudaStream_t stream) {
  SortLayout s{};
  cudaError_t err = sort_layout(a, &s);
  if (err != cudaSuccess) return err;
  uint32_t* words = reinterpret_cast<uint32_t*>(workspace);
  err = launch(sampled_slot_keys, elementwise_blocks(s.num_slots), 256, 0, stream, a, words + s.keys0, words + s.slots0,
               s.num_slots);
  if (err != cudaSuccess) return err;
  cub::DoubleBuffer<uint32_t> keys(words + s.keys0, words + s.keys1), slots(words + s.slots0, words + s.slots1);
  size_t temp_bytes = s.temp_bytes;
  err = cub::DeviceRadixSort::SortPairs(words + s.temp, temp_bytes, keys, slots, static_cast<int>(s.num_slots), 0,
                                        s.end_bit, stream);
  if (err != cudaSuccess) return err;
  return with_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return with_vpl(a.D, [&](auto vpl) {
      constexpr int kVpl = decltype(vpl)::value;
      if (part != nullptr)
        return launch(sampled_weight_grad_partials<T, kVpl>, static_cast<unsigned>(partial_sum_blocks(s.num_slots)),
                      kRowWarps * 32, 0, stream, a, keys.Current(), slots.Current(), s.num_slots, part, splits,
                      g.d_weight);
      return launch(sampled_weight_grad_sorted<T, kVpl>, static_cast<unsigned>(s.num_slots), kRowWarps * 32, 0, stream,
                    a, keys.Current(), slots.Current(), s.num_slots, g.d_weight);
    });
  });
}

unsigned row_blocks(i64 rows) { return static_cast<unsigned>(ceil_div(rows, kRowWarps)); }

}  // namespace

// ------------------------------------------------------------------ launchers ------------

size_t sampled_softmax_forward_workspace_floats(const SampledSoftmaxParams& p) {
  LossArgs a;
  if (sampled_args(p, &a) != cudaSuccess || a.T == 0 || !uses_engine(shape_of(a))) return 0;
  return engine_forward_workspace_floats(a, p.in.dtype);
}

cudaError_t sampled_softmax_forward(const SampledSoftmaxParams& p, float* loss, float* lse, float* workspace,
                                    cudaStream_t stream) {
  LossArgs a;
  const cudaError_t err = sampled_args(p, &a);
  if (err != cudaSuccess || a.T == 0) return err;
  if (uses_engine(shape_of(a))) return engine_forward(a, p.in.dtype, loss, lse, workspace, stream);
  return with_dtype(p.in.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return with_vpl(a.D, [&](auto vpl) {
      return launch(sampled_rows_forward<T, decltype(vpl)::value>, row_blocks(a.T), kRowWarps * 32, 0, stream, a, loss,
                    lse);
    });
  });
}

// The sampled backward's workspace: grad_scale_max; with the tile engine, its row order and,
// with partials, the d weight partials (plan `items`, sampled_part_floats); then the sort.
size_t sampled_sort_offset(const LossArgs& a, const EnginePlan& items, bool partials) {
  const LossShape s = shape_of(a);
  if (!uses_engine(s)) return kScaleMaxWords;
  return sampled_part_offset(s) + (partials ? sampled_part_floats(s, items) : 0);
}

size_t sampled_softmax_backward_workspace_floats(const SampledSoftmaxParams& p, bool deterministic) {
  LossArgs a;
  if (sampled_args(p, &a) != cudaSuccess || a.T == 0) return 0;
  EnginePlan items{};  // the launch's d weight plan (its splits size the partials)
  DeviceInfo dev{};
  if (deterministic && uses_engine(shape_of(a))) {
    if (device_info(&dev) != cudaSuccess) return 0;
    items = sampled_weight_plan(shape_of(a), element_size(p.in.dtype), dev.sms);
  }
  SortLayout s{};
  if (deterministic && sort_layout(a, &s) != cudaSuccess) return 0;
  const bool partials = deterministic && uses_partials(shape_of(a), items);
  return sampled_sort_offset(a, items, partials) + (deterministic ? s.total_words : 0);
}

cudaError_t sampled_softmax_backward(const SampledSoftmaxParams& p, const LossGradients& g, bool deterministic,
                                     cudaStream_t stream) {
  LossArgs a;
  cudaError_t err = sampled_args(p, &a);
  if (err != cudaSuccess || a.T == 0) return err;
  a.grad = g.grad_loss;
  a.lse = g.lse;
  if (uses_engine(shape_of(a))) {
    DeviceInfo dev{};
    if ((err = device_info(&dev)) != cudaSuccess) return err;
    if ((err = compact(&a, g.workspace + kScaleMaxWords, stream)) != cudaSuccess) return err;
    const size_t esize = element_size(p.in.dtype);
    const EnginePlan items = sampled_weight_plan(shape_of(a), esize, dev.sms);  // rows split across CTAs
    EngineOut o{};
    o.d_hidden = g.d_hidden;
    o.d_weight = g.d_weight;
    o.atomic_dw = !deterministic;
    err = launch_engine<kBwdRows>(a, engine_plan(shape_of(a), kBwdRows, esize), o, p.in.dtype, dev, stream);
    if (err != cudaSuccess) return err;
    const bool partials = deterministic && uses_partials(shape_of(a), items);
    if (deterministic && !partials)  // partials too large: each slot's rows re-read per item
      return sampled_weight_grad_deterministic(a, p.in.dtype, g, g.workspace + sampled_sort_offset(a, items, false),
                                               nullptr, 1, stream);
    if ((err = launch(grad_scale_max, 1, 1024, 0, stream, a, g.workspace)) != cudaSuccess) return err;
    a.scale_max = g.workspace;
    // Deterministic: the negative slots' rows per split, no atomics, summed per item below.
    o.part = partials ? g.workspace + sampled_part_offset(shape_of(a)) : nullptr;  // [splits, G * K, D]
    err = launch_engine<kBwdItems>(a, items, o, p.in.dtype, dev, stream);
    if (err != cudaSuccess || !deterministic) return err;
    return sampled_weight_grad_deterministic(a, p.in.dtype, g, g.workspace + sampled_sort_offset(a, items, true),
                                             o.part, items.splits, stream);
  }
  err = with_dtype(p.in.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return with_vpl(a.D, [&](auto vpl) {
      return launch(sampled_rows_backward<T, decltype(vpl)::value>, row_blocks(a.T), kRowWarps * 32, 0, stream, a,
                    static_cast<T*>(g.d_hidden), deterministic ? nullptr : g.d_weight);
    });
  });
  if (err != cudaSuccess || !deterministic) return err;
  return sampled_weight_grad_deterministic(a, p.in.dtype, g, g.workspace + sampled_sort_offset(a, EnginePlan{}, false),
                                           nullptr, 1, stream);
}

size_t full_softmax_forward_workspace_floats(const FullSoftmaxParams& p) {
  LossArgs a;
  if (full_args(p, &a) != cudaSuccess || a.T == 0) return 0;
  return engine_forward_workspace_floats(a, p.in.dtype);
}

cudaError_t full_softmax_forward(const FullSoftmaxParams& p, float* loss, float* lse, float* workspace,
                                 cudaStream_t stream) {
  LossArgs a;
  const cudaError_t err = full_args(p, &a);
  if (err != cudaSuccess || a.T == 0) return err;
  return engine_forward(a, p.in.dtype, loss, lse, workspace, stream);
}

size_t full_softmax_backward_workspace_floats(const FullSoftmaxParams& p) {
  LossArgs a;
  DeviceInfo dev{};
  if (full_args(p, &a) != cudaSuccess || a.T == 0 || device_info(&dev) != cudaSuccess) return 0;
  const LossShape s = shape_of(a);
  return full_backward_workspace_floats(s, full_backward_plan(s, element_size(p.in.dtype), dev.sms));
}

cudaError_t full_softmax_backward(const FullSoftmaxParams& p, const LossGradients& g, cudaStream_t stream) {
  LossArgs a;
  cudaError_t err = full_args(p, &a);
  if (err != cudaSuccess || a.T == 0) return err;
  DeviceInfo dev{};
  if ((err = device_info(&dev)) != cudaSuccess) return err;
  a.grad = g.grad_loss;
  a.lse = g.lse;
  const FullBackwardPlan plan = full_backward_plan(shape_of(a), element_size(p.in.dtype), dev.sms);
  if ((err = compact(&a, g.workspace + kScaleMaxWords, stream)) != cudaSuccess) return err;
  // Split partials, reused by both kernels in stream order.
  float* part = g.workspace + full_backward_part_offset(shape_of(a));
  EngineOut o{};
  o.part = part;
  o.d_hidden = g.d_hidden;
  o.d_weight = g.d_weight;

  // d hidden: rows stationary, items streamed.
  if ((err = launch_engine<kBwdRows>(a, plan.rows, o, p.in.dtype, dev, stream)) != cudaSuccess) return err;
  if (plan.rows.splits > 1) {
    err = with_dtype(p.in.dtype, [&](auto tag) {
      using T = typename decltype(tag)::type;
      return launch(reduce_splits<T>, elementwise_blocks(a.T * a.D), 256, 0, stream, part, plan.rows.splits, a.T * a.D,
                    static_cast<T*>(g.d_hidden));
    });
    if (err != cudaSuccess) return err;
  }

  // d weight: items stationary, rows streamed.
  if ((err = launch(grad_scale_max, 1, 1024, 0, stream, a, g.workspace)) != cudaSuccess) return err;
  a.scale_max = g.workspace;
  o.d_weight_out = g.d_weight_out;
  if ((err = launch_engine<kBwdItems>(a, plan.items, o, p.in.dtype, dev, stream)) != cudaSuccess) return err;
  if (plan.items.splits > 1 && g.d_weight_out != nullptr) {
    err = with_dtype(p.in.dtype, [&](auto tag) {
      using T = typename decltype(tag)::type;
      return launch(reduce_splits<T>, elementwise_blocks(a.N * a.D), 256, 0, stream, part, plan.items.splits, a.N * a.D,
                    static_cast<T*>(g.d_weight_out));
    });
  } else if (plan.items.splits > 1) {
    err = launch(reduce_splits<float>, elementwise_blocks(a.N * a.D), 256, 0, stream, part, plan.items.splits,
                 a.N * a.D, g.d_weight);
  }
  return err;
}

}  // namespace seqrec::cuda
