// Fused multi-head attention (causal or not, with probability dropout) over padded and
// packed histories, forward and backward, for the `cuda` backend (semantics:
// seqrec_kernels/reference/attention.py; interface: kernels.h; algorithm: the Triton
// kernels of seqrec_kernels/triton/attention.py).
//
// - A program handles one tile of rows of one (sequence, head): grid (sequence * head,
//   tile in y, and z past 65535 tiles; the plans and index expressions are tile_plan.h's).
//   Rows are addressed relative to the sequence's first token, so padding is never
//   loaded, a program whose tile starts past the sequence exits at once, and tiles that
//   the causal mask hides entirely are never visited.
// - Each warp owns 16 "stationary" rows (queries in the forward and dq kernels, keys in
//   dk/dv) and the CTA streams tiles of kN rows of the other side through shared memory
//   (cp.async; single buffers, each refilled while the CTA works on the other operand; a
//   tuning candidate of the 16-bit forward double-buffers K and V: FwdPlan's STAGES, set by
//   seqrec::_set_attention_kv_stages).
//   Scores stay in registers in the mma.sync m16n8k16 accumulator layout; float16 and
//   bfloat16 multiply on tensor cores (float32 accumulation), float32 with FFMA in the
//   same row layout (no TF32). Softmax runs in base 2 with float32 statistics.
// - Head dims are padded with zero columns to DP = 32, 64, 128 or 256.
// - Outputs: a warp stages its [16, DP] result rows in shared memory rows that only it
//   uses (its own Q, K or V rows, once the loop is done), then writes its valid rows with
//   the widest copy that the output tensor's alignment allows (16 bytes when aligned).
// - Backward (FlashAttention-2): the dq kernel also writes delta = rowsum(dout * out) of
//   its rows to the workspace (dO from its shared tile, O from global memory in O's
//   copy width); the dk/dv kernel, launched after it, streams the query tiles that see
//   its key tile (for DP = 256, dv and dk in two launches so that one [16, 256]
//   accumulator per warp suffices). Every output row has one writer: no atomics,
//   deterministic results.
#include <atomic>

#include "common.cuh"
#include "dropout_hash.h"
#include "kernels.h"
#include "tile_plan.h"

namespace seqrec::cuda {
namespace {

using namespace attn_plan;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ------------------------------------------------------------------ sequences and tiles ---

// This program's sequence s and head h (blockIdx.x = s * H + h), its batch row b and
// first row, and its length, clamped like the Triton kernels (never past num_rows or
// max_seqlen) so that inputs the caller could not check never address outside the tensors;
// and the first position of the program's tile of `rows` positions (blockIdx.y, z): at or
// past len, the program has nothing to do.
struct Seq {
  int s, h, len;
  i64 b, start, first;
};

__device__ __forceinline__ Seq this_seq(const AttentionParams& p, int rows) {
  Seq q;
  q.s = static_cast<int>(blockIdx.x) / p.num_heads;
  q.h = static_cast<int>(blockIdx.x) - q.s * p.num_heads;
  const SeqRange r = clamp_seq(p.seq_start[q.s], p.seq_len[q.s], p.num_rows, p.max_seqlen);
  q.len = r.len;
  q.b = batch_row(q.s, p.batch, p.num_seqs);
  q.start = r.start;
  q.first = tile_first(blockIdx.y, blockIdx.z, rows);
  return q;
}

// This program's sequence's padding rows (tile_plan.h's pad_rows).
__device__ __forceinline__ PadRows seq_pad_rows(const AttentionParams& p, const Seq& q) {
  const int next_start = q.s + 1 < p.num_seqs ? p.seq_start[q.s + 1] : 0;
  return pad_rows(SeqRange{static_cast<int>(q.start), q.len}, q.s, p.num_seqs, p.batch == p.num_seqs, next_start,
                  p.num_rows);
}

// Writes `value` to elements [0, width) of this program's padding rows (pad_row; blocks of
// `rows` rows, strided over the (sequence, head)'s programs), in rows of `stride` elements
// from `base`, row 0 of its batch row and head.
template <typename T>
__device__ __forceinline__ void write_padding(T* base, i64 stride, int width, T value, PadRows pad, int rows) {
  const int count = pad_count(pad);
  const i64 programs = static_cast<i64>(gridDim.y) * gridDim.z;
  for (i64 first = tile_index(blockIdx.y, blockIdx.z) * rows; first < count; first += programs * rows)
    for (int u = threadIdx.x; u < rows * width; u += blockDim.x) {
      const i64 i = first + u / width;
      if (i < count) base[static_cast<i64>(pad_row(pad, static_cast<int>(i))) * stride + u % width] = value;
    }
}

// Row 0 of (b, h) in a [B, H, L, D] output, and in the [B, H, L] LSE.
template <typename T>
__device__ __forceinline__ T* row0(const Bhld& t, const Seq& q) {
  return static_cast<T*>(t.data) + q.b * t.batch_stride + q.h * t.head_stride;
}
__device__ __forceinline__ float* lse_row0(const AttentionParams& p, const Seq& q) {
  return p.lse + stat_index(q.b, q.h, p.num_heads, p.num_rows, 0);
}

// Element (sequence position 0, column 0) of (b, h) in a [B, H, L, D] tensor.
template <typename T>
__device__ __forceinline__ T* seq_rows(const Bhld& t, const Seq& q) {
  return row0<T>(t, q) + q.start * t.row_stride;
}

// Index of the sequence's first row in the contiguous [B, H, L] lse / delta.
__device__ __forceinline__ i64 stat_base(const AttentionParams& p, const Seq& q) {
  return stat_index(q.b, q.h, p.num_heads, p.num_rows, q.start);
}

// Dropout row key of the sequence's position 0 (add the query position).
__device__ __forceinline__ i64 dropout_key0(const AttentionParams& p, const Seq& q) {
  return (static_cast<i64>(q.s) * p.num_heads + q.h) * p.max_seqlen;
}

// What a program with a tile (Seq::first < Seq::len) works with: the tile's first
// position, the sequence's length and position 0 in q, k and v, the head dim D, the width
// read_dim of the rows it reads (AttentionParams), and this thread's place in the warp
// fragments: lane = 4 g + tig of warp `warp`.
template <typename T>
struct Program {
  int first, len, D, read_dim;
  int lane, warp, g, tig;
  const T *q, *k, *v, *dout;  // dout: the backward's upstream gradient
};

template <typename T>
__device__ __forceinline__ Program<T> this_program(const AttentionParams& p, const Seq& sq,
                                                   const Bhld* dout = nullptr) {
  Program<T> pg;
  pg.first = static_cast<int>(sq.first);
  pg.q = seq_rows<const T>(p.q, sq);
  pg.k = seq_rows<const T>(p.k, sq);
  pg.v = seq_rows<const T>(p.v, sq);
  pg.dout = dout != nullptr ? seq_rows<const T>(*dout, sq) : nullptr;
  pg.len = sq.len;
  pg.D = p.head_dim;
  pg.read_dim = p.read_dim;
  pg.lane = threadIdx.x & 31;
  pg.warp = threadIdx.x >> 5;
  pg.g = pg.lane >> 2;
  pg.tig = pg.lane & 3;
  return pg;
}

// dst[r, c] = src[r * stride + c] for r < rows, c < DP; zeros where r >= valid_rows or
// c >= D (the read width). D * sizeof(T) is a multiple of BYTES, so a copy is wholly
// inside or outside D.
template <typename T, int DP, int BYTES>
__device__ __forceinline__ void copy_tile(T* dst, int rows, const T* src, i64 stride, int valid_rows, int D) {
  constexpr int kElems = BYTES / sizeof(T), kPerRow = DP / kElems, kLd = tile_ld(sizeof(T), DP);
  for (int u = threadIdx.x; u < rows * kPerRow; u += blockDim.x) {
    const int r = u / kPerRow, c = (u - r * kPerRow) * kElems;
    const bool ok = r < valid_rows && c < D;
    const T* s = ok ? src + r * stride + c : src;
    if constexpr (BYTES >= 4) {
      cp_async<BYTES>(dst + r * kLd + c, s, ok);
    } else {
      dst[r * kLd + c] = ok ? *s : from_f<T>(0.f);
    }
  }
}

// A [rows, DP] tile (row stride tile_ld) with vec-byte copies: cp.async for 16 / 8 / 4
// bytes (completion: cp_async_wait), plain loads for 2 (16-bit elements at odd offsets).
template <typename T, int DP>
__device__ __forceinline__ void load_tile(T* dst, int rows, const T* src, i64 stride, int valid_rows, int D, int vec) {
  switch (vec) {
    case 16:
      copy_tile<T, DP, 16>(dst, rows, src, stride, valid_rows, D);
      break;
    case 8:
      copy_tile<T, DP, 8>(dst, rows, src, stride, valid_rows, D);
      break;
    case 4:
      copy_tile<T, DP, 4>(dst, rows, src, stride, valid_rows, D);
      break;
    default:
      if constexpr (sizeof(T) == 2) copy_tile<T, DP, 2>(dst, rows, src, stride, valid_rows, D);
  }
}

// ------------------------------------------------------------------ tile products --------

// s[16, 8 NK] = x[16, DP] y[8 NK, DP]^T for one warp (common.cuh's warp_scores, 3xTF32
// under TF32X3); x is its first row, both have row stride tile_ld.
template <typename T, int DP, int NK, bool TF32X3>
__device__ __forceinline__ void tile_scores(float (&s)[NK][4], const T* x, const T* y, int lane) {
  constexpr int ld = tile_ld(sizeof(T), DP);
#pragma unroll
  for (int j = 0; j < NK; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
  warp_scores<T, DP, NK, TF32X3>(s, x, ld, y, ld, lane);
}

// acc[16, DP] += p[16, 8 NK] y[8 NK, DP] for one warp (common.cuh's warp_accumulate; y
// with row stride tile_ld, acc's float32 columns those of acc_col).
template <typename T, int DP, int NK>
__device__ __forceinline__ void tile_accumulate(float (&acc)[DP / 8][4], const float (&p)[NK][4], const T* y,
                                                int lane) {
  warp_accumulate<T, NK, DP / 8>(acc, p, y, tile_ld(sizeof(T), DP), lane,
                                 [](int q, int tig) { return acc_col(true, 2 * q, 0, tig); });
}

// An unsigned integer of BYTES bytes: one global store or load of that width.
template <int BYTES>
struct Bits;
template <>
struct Bits<16> {
  using type = uint4;
};
template <>
struct Bits<8> {
  using type = uint2;
};
template <>
struct Bits<4> {
  using type = uint32_t;
};
template <>
struct Bits<2> {
  using type = uint16_t;
};

// The warp's [16, DP] accumulator (rows g, g + 8 of acc[j][0..1], acc[j][2..3]; columns
// acc_col) times mul[r >= 8], rounded to T, into `stage`: its 16 rows of shared memory (row
// stride tile_ld), every column < DP. One 4-byte store per column pair (16-bit) or 16-byte
// store per float4 of columns acc_col(true, 2q, 0, tig) + 0..3 (float32).
template <typename T, int DP>
__device__ __forceinline__ void stage_rows(T* stage, const float (&acc)[DP / 8][4], const float (&mul)[2], int lane) {
  constexpr int kLd = tile_ld(sizeof(T), DP);
  const int g = lane >> 2, tig = lane & 3;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    T* row = stage + frag::score_row(g, h) * kLd;
    const float m = mul[h];
    if constexpr (IsF32<T>::value) {
#pragma unroll
      for (int q = 0; q < DP / 16; ++q)
        *reinterpret_cast<float4*>(row + acc_col(true, 2 * q, 0, tig)) = make_float4(
            acc[2 * q][2 * h] * m, acc[2 * q][2 * h + 1] * m, acc[2 * q + 1][2 * h] * m, acc[2 * q + 1][2 * h + 1] * m);
    } else {
#pragma unroll
      for (int j = 0; j < DP / 8; ++j)
        *reinterpret_cast<uint32_t*>(row + acc_col(false, j, 0, tig)) =
            pack2<T>(acc[j][2 * h] * m, acc[j][2 * h + 1] * m);
    }
  }
}

// dst[r, c] = stage[r, c] for the warp's rows r < valid_rows and columns c < D in BYTES-wide
// copies (D * sizeof(T) is a multiple of BYTES: a copy is wholly inside or outside D).
template <typename T, int DP, int BYTES>
__device__ __forceinline__ void copy_rows_out(T* dst, i64 stride, const T* stage, int valid_rows, int D, int lane) {
  using V = typename Bits<BYTES>::type;
  constexpr int kElems = BYTES / sizeof(T), kPerRow = DP / kElems, kLd = tile_ld(sizeof(T), DP);
#pragma unroll 4
  for (int i = 0; i < 16 * kPerRow / 32; ++i) {
    const int u = lane + 32 * i, r = u / kPerRow, c = (u - r * kPerRow) * kElems;
    if (r < valid_rows && c < D)
      *reinterpret_cast<V*>(dst + r * stride + c) = *reinterpret_cast<const V*>(stage + r * kLd + c);
  }
}

// dst[r, c] = acc[r, c] * mul[r >= 8] for the warp's rows r < valid_rows and columns c < D;
// dst is the warp's first row, `width` the copy width of the output's rows (16, 8, 4 bytes;
// 2: 16-bit elements one at a time). The tile goes through `stage`, 16 rows of shared
// memory that only this warp uses and that no cp.async still writes.
template <typename T, int DP>
__device__ __forceinline__ void store_rows(T* dst, i64 stride, const float (&acc)[DP / 8][4], const float (&mul)[2],
                                           T* stage, int valid_rows, int D, int width, int lane) {
  stage_rows<T, DP>(stage, acc, mul, lane);
  __syncwarp();  // the rows are read back by other lanes of the warp
  switch (width) {
    case 16:
      copy_rows_out<T, DP, 16>(dst, stride, stage, valid_rows, D, lane);
      break;
    case 8:
      copy_rows_out<T, DP, 8>(dst, stride, stage, valid_rows, D, lane);
      break;
    case 4:
      copy_rows_out<T, DP, 4>(dst, stride, stage, valid_rows, D, lane);
      break;
    default:
      if constexpr (sizeof(T) == 2) copy_rows_out<T, DP, 2>(dst, stride, stage, valid_rows, D, lane);
  }
}

// ------------------------------------------------------------------ forward --------------

// The plans of tile_plan.h for element type T (4 bytes: the FFMA path; 2: tensor cores).
template <typename T, int DP, int STAGES = 1>
using FwdTiles = FwdPlan<sizeof(T), DP, STAGES>;

// STAGES: K/V buffers (FwdPlan): 1 by default, 2 double-buffered (a tuning candidate).
template <typename T, int DP, int STAGES, bool TF32X3>
__global__ void __launch_bounds__(FwdTiles<T, DP, STAGES>::kWarps * 32, 1)
    attention_fwd_kernel(const AttentionParams p, const int vec, const int out_vec) {
  using Tiles = FwdTiles<T, DP, STAGES>;
  constexpr int kM = Tiles::kM, kN = Tiles::kN, kNK = kN / 8, kLd = tile_ld(sizeof(T), DP);
  const Seq sq = this_seq(p, kM);
  const PadRows pad = seq_pad_rows(p, sq);
  write_padding(row0<T>(p.out, sq), p.out.row_stride, p.head_dim, from_f<T>(0.f), pad, kM);
  write_padding(lse_row0(p, sq), 1, 1, -kInf, pad, kM);
  if (sq.first >= sq.len) return;
  // Shared tiles, row stride kLd: Q [kM rows], K [STAGES][kN rows], V [STAGES][kN rows].
  T *qs = reinterpret_cast<T*>(dynamic_smem), *ks = qs + kM * kLd, *vs = ks + STAGES * kN * kLd;
  const Program<T> pg = this_program<T>(p, sq);
  const int r0 = pg.first + 16 * pg.warp;  // first query position of this warp
  const int ntiles = num_tiles(0, key_end(p.causal, pg.len, pg.first, kM), kN);
  const float scale_log2 = p.scale * kLog2e;
  const bool dropout = p.dropout_seed != nullptr;
  uint32_t rh[2] = {0u, 0u};  // dropout row hashes of rows g, g + 8
  if (dropout) {
    const i64 seed = *p.dropout_seed, key0 = dropout_key0(p, sq);
    rh[0] = dropout::row_hash(seed, key0 + r0 + pg.g);
    rh[1] = dropout::row_hash(seed, key0 + r0 + pg.g + 8);
  }

  float o[DP / 8][4] = {};                             // [16, DP] output rows, unnormalized
  float row_max[2] = {-kInf, -kInf}, row_sum[2] = {0.f, 0.f};  // rows g, g + 8; row_sum per lane
  // The online softmax of the key tile at n0: s [16, kN] from scores to (dropped)
  // probabilities; row_max, row_sum and o rescaled to the new maxima.
  auto probabilities = [&](float (&s)[kNK][4], int n0, bool unmasked) {
    float safe_max[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = r0 + frag::score_row(pg.g, h);
      float tile_max = -kInf;
#pragma unroll
      for (int j = 0; j < kNK; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = n0 + frag::score_col(j, pg.tig, e);
          s[j][2 * h + e] = unmasked || visible(p.causal, pg.len, row, col) ? s[j][2 * h + e] * scale_log2 : -kInf;
          tile_max = fmaxf(tile_max, s[j][2 * h + e]);
        }
      }
      const float new_max = fmaxf(row_max[h], quad_max(tile_max));
      safe_max[h] = new_max == -kInf ? 0.f : new_max;  // rows that saw no key yet: no (-inf) - (-inf)
      const float rescale = exp2f(row_max[h] - safe_max[h]);
      row_max[h] = new_max;
      row_sum[h] *= rescale;
#pragma unroll
      for (int j = 0; j < DP / 8; ++j) {
        o[j][2 * h] *= rescale;
        o[j][2 * h + 1] *= rescale;
      }
#pragma unroll
      for (int j = 0; j < kNK; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float pr = exp2f(s[j][2 * h + e] - safe_max[h]);
          row_sum[h] += pr;  // the LSE is of the undropped probabilities
          if (dropout) {
            const int col = n0 + frag::score_col(j, pg.tig, e);
            pr = dropout::keep(rh[h], col, p.keep_threshold) ? pr * p.dropout_scale : 0.f;
          }
          s[j][2 * h + e] = pr;
        }
      }
    }
  };

  if constexpr (STAGES == 1) {
    // Groups in flight: {Q, K tile 0}, {V tile 0}; then K t+1 and V t+1 as each buffer frees.
    load_tile<T, DP>(qs, kM, pg.q + pg.first * p.q.row_stride, p.q.row_stride, pg.len - pg.first, pg.read_dim, vec);
    load_tile<T, DP>(ks, kN, pg.k, p.k.row_stride, pg.len, pg.read_dim, vec);
    cp_async_commit();
    load_tile<T, DP>(vs, kN, pg.v, p.v.row_stride, pg.len, pg.read_dim, vec);
    cp_async_commit();
    for (int t = 0; t < ntiles; ++t) {
      const int n0 = t * kN;  // first key position of the tile
      // Warps whose rows are all padding, or all before the tile (causal), skip the math.
      const bool active = rows_active(p.causal, pg.len, r0, n0);
      const bool unmasked = tile_unmasked(p.causal, pg.len, r0, 16, n0, kN);
      float s[kNK][4];  // [16, kN] scores, then probabilities
      cp_async_wait<1>();
      __syncthreads();  // Q and K tile t landed
      if (active) {
        tile_scores<T, DP, kNK, TF32X3>(s, qs + 16 * pg.warp * kLd, ks, pg.lane);
        probabilities(s, n0, unmasked);
      }
      cp_async_wait<0>();
      __syncthreads();  // V tile t landed; every warp is done with K tile t
      if (t + 1 < ntiles)
        load_tile<T, DP>(ks, kN, pg.k + (n0 + kN) * p.k.row_stride, p.k.row_stride, pg.len - n0 - kN, pg.read_dim, vec);
      cp_async_commit();
      if (active) tile_accumulate<T, DP, kNK>(o, s, vs, pg.lane);
      __syncthreads();  // every warp is done with V tile t
      if (t + 1 < ntiles)
        load_tile<T, DP>(vs, kN, pg.v + (n0 + kN) * p.v.row_stride, p.v.row_stride, pg.len - n0 - kN, pg.read_dim, vec);
      cp_async_commit();
    }
  } else {
    // K and V of the tile at n0 into buffer b: one cp.async group with the caller's commit.
    auto load_kv = [&](int b, int n0) {
      load_tile<T, DP>(ks + b * kN * kLd, kN, pg.k + n0 * p.k.row_stride, p.k.row_stride, pg.len - n0, pg.read_dim,
                       vec);
      load_tile<T, DP>(vs + b * kN * kLd, kN, pg.v + n0 * p.v.row_stride, p.v.row_stride, pg.len - n0, pg.read_dim,
                       vec);
    };
    // Groups in flight: {Q, tile 0}, {tile 1}, ..., then tile t + STAGES as tile t's buffer frees
    // (tile_plan.h's kv_buffer schedule).
    load_tile<T, DP>(qs, kM, pg.q + pg.first * p.q.row_stride, p.q.row_stride, pg.len - pg.first, pg.read_dim, vec);
#pragma unroll
    for (int t = 0; t < STAGES; ++t) {
      if (t < ntiles) load_kv(kv_buffer(t, STAGES), t * kN);
      cp_async_commit();
    }
    for (int t = 0; t < ntiles; ++t) {
      const int n0 = t * kN, b = kv_buffer(t, STAGES);
      cp_async_wait<kv_pending_groups(STAGES)>();
      __syncthreads();  // Q and tile t's K and V landed
      if (rows_active(p.causal, pg.len, r0, n0)) {
        float s[kNK][4];  // [16, kN] scores, then probabilities
        tile_scores<T, DP, kNK, TF32X3>(s, qs + 16 * pg.warp * kLd, ks + b * kN * kLd, pg.lane);
        probabilities(s, n0, tile_unmasked(p.causal, pg.len, r0, 16, n0, kN));
        tile_accumulate<T, DP, kNK>(o, s, vs + b * kN * kLd, pg.lane);
      }
      __syncthreads();  // every warp is done with buffer b
      const int refill = kv_refill_tile(t, STAGES);
      if (refill < ntiles) load_kv(b, refill * kN);
      cp_async_commit();
    }
  }

  if (r0 >= pg.len) return;
  float inv_sum[2], lse[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const float total = quad_sum(row_sum[h]);
    inv_sum[h] = total > 0.f ? 1.f / total : 0.f;  // a row that sees no key keeps its zeros and -inf
    lse[h] = total > 0.f ? (row_max[h] + log2f(total)) * kLn2 : -kInf;
  }
  // Staged in the warp's own Q rows: no other warp reads them, and the loop left no cp.async
  // pending (its last groups are empty).
  store_rows<T, DP>(seq_rows<T>(p.out, sq) + r0 * p.out.row_stride, p.out.row_stride, o, inv_sum,
                    qs + 16 * pg.warp * kLd, pg.len - r0, pg.D, out_vec, pg.lane);
  if (pg.tig == 0) {
    const i64 base = stat_base(p, sq) + r0;
    if (pg.g < pg.len - r0) p.lse[base + pg.g] = lse[0];
    if (pg.g + 8 < pg.len - r0) p.lse[base + pg.g + 8] = lse[1];
  }
}

// ------------------------------------------------------------------ backward -------------

// Two 16-bit values of a 32-bit word as floats, the lower column in x.
template <typename T>
__device__ __forceinline__ float2 unpack2(uint32_t w);
template <>
__device__ __forceinline__ float2 unpack2<__half>(uint32_t w) {
  return __half22float2(*reinterpret_cast<const __half2*>(&w));
}
template <>
__device__ __forceinline__ float2 unpack2<__nv_bfloat16>(uint32_t w) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w));
}

// The 16 bytes at src (a 16-byte chunk of a row) as four words, in BYTES-wide loads; the
// loads at or past `valid` elements are left out (zeros). valid * sizeof(T) is a multiple
// of BYTES, so a load is wholly inside or outside.
template <typename T, int BYTES>
__device__ __forceinline__ void load_chunk(uint32_t (&w)[4], const T* src, int valid) {
  constexpr int kElems = BYTES / sizeof(T);  // per load
  if constexpr (BYTES == 16) {
    const uint4 v = *reinterpret_cast<const uint4*>(src);
    w[0] = v.x, w[1] = v.y, w[2] = v.z, w[3] = v.w;
  } else if constexpr (BYTES == 8) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const uint2 v = i * kElems < valid ? *reinterpret_cast<const uint2*>(src + i * kElems) : make_uint2(0u, 0u);
      w[2 * i] = v.x, w[2 * i + 1] = v.y;
    }
  } else if constexpr (BYTES == 4) {
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = i * kElems < valid ? *reinterpret_cast<const uint32_t*>(src + i * kElems) : 0u;
  } else {  // 16-bit elements one at a time
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t lo = 2 * i < valid ? *reinterpret_cast<const uint16_t*>(src + 2 * i) : 0u;
      const uint32_t hi = 2 * i + 1 < valid ? *reinterpret_cast<const uint16_t*>(src + 2 * i + 1) : 0u;
      w[i] = lo | hi << 16;
    }
  }
}

// delta = rowsum(dO * O) of the warp's 16 rows: dO from its rows of the dO tile `dos`
// (shared memory, row stride tile_ld, zeros past D), O from global (its first row, row
// stride `stride`) in BYTES-wide loads. Lane l sums row l % 16 over the row's 16-byte
// chunks 2 i + l / 16 in column order (float32 fmaf), and the two halves are added: every
// lane returns its row's delta, the same bits whatever BYTES; zero for rows >= valid_rows.
template <typename T, int DP, int BYTES>
__device__ __forceinline__ float warp_delta(const T* dos, const T* o, i64 stride, int valid_rows, int D, int lane) {
  constexpr int kLd = tile_ld(sizeof(T), DP), kChunk = 16 / sizeof(T);
  const int r = lane & 15;
  float dot = 0.f;
  if (r < valid_rows) {
    const T* dorow = dos + r * kLd;
    const T* orow = o + r * stride;
#pragma unroll 4
    for (int i = 0; i < DP / (2 * kChunk); ++i) {
      const int c = (2 * i + (lane >> 4)) * kChunk;
      if (c >= D) break;
      const uint4 d4 = *reinterpret_cast<const uint4*>(dorow + c);
      const uint32_t dw[4] = {d4.x, d4.y, d4.z, d4.w};
      uint32_t ow[4];
      load_chunk<T, BYTES>(ow, orow + c, D - c);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        if constexpr (IsF32<T>::value) {
          dot = fmaf(__uint_as_float(dw[k]), __uint_as_float(ow[k]), dot);
        } else {
          const float2 a = unpack2<T>(dw[k]), b = unpack2<T>(ow[k]);
          dot = fmaf(a.y, b.y, fmaf(a.x, b.x, dot));
        }
      }
    }
  }
  return dot + __shfl_xor_sync(kFull, dot, 16);
}

// warp_delta with O's copy width `width` (16, 8, 4; 2: 16-bit elements one at a time).
template <typename T, int DP>
__device__ __forceinline__ float warp_delta(const T* dos, const T* o, i64 stride, int valid_rows, int D, int width,
                                            int lane) {
  switch (width) {
    case 16:
      return warp_delta<T, DP, 16>(dos, o, stride, valid_rows, D, lane);
    case 8:
      return warp_delta<T, DP, 8>(dos, o, stride, valid_rows, D, lane);
    case 4:
      return warp_delta<T, DP, 4>(dos, o, stride, valid_rows, D, lane);
    default:
      if constexpr (sizeof(T) == 2) return warp_delta<T, DP, 2>(dos, o, stride, valid_rows, D, lane);
      return 0.f;
  }
}

template <typename T, int DP>
using BwdTiles = BwdPlan<sizeof(T), DP>;

enum Grads : int { kGradV = 1, kGradK = 2 };

template <typename T, int DP, bool TF32X3>
__global__ void __launch_bounds__(BwdTiles<T, DP>::kWarps * 32, 1)
    attention_bwd_dq_kernel(const AttentionBackwardParams bp, const int vec, const int out_vec, const int dq_vec) {
  using Tiles = BwdTiles<T, DP>;
  constexpr int kM = Tiles::kM, kN = Tiles::kN, kNK = kN / 8, kLd = tile_ld(sizeof(T), DP);
  const AttentionParams& p = bp.fwd;
  const Seq sq = this_seq(p, kM);
  write_padding(row0<T>(bp.dq, sq), bp.dq.row_stride, p.head_dim, from_f<T>(0.f), seq_pad_rows(p, sq), kM);
  if (sq.first >= sq.len) return;
  // Shared tiles, row stride kLd: Q and dO [kM rows], K and V [kN rows].
  T *qs = reinterpret_cast<T*>(dynamic_smem), *dos = qs + kM * kLd, *ks = dos + kM * kLd, *vs = ks + kN * kLd;
  const Program<T> pg = this_program<T>(p, sq, &bp.dout);
  const int r0 = pg.first + 16 * pg.warp;  // first query position of this warp
  const int ntiles = num_tiles(0, key_end(p.causal, pg.len, pg.first, kM), kN);
  const float scale_log2 = p.scale * kLog2e;
  const bool dropout = p.dropout_seed != nullptr;
  const i64 stats = stat_base(p, sq);

  // Groups in flight: {dO}, {Q, V tile 0}, {K tile 0}; then V t+1 and K t+1 as each buffer frees.
  load_tile<T, DP>(dos, kM, pg.dout + pg.first * bp.dout.row_stride, bp.dout.row_stride, pg.len - pg.first, pg.read_dim,
                   vec);
  cp_async_commit();
  load_tile<T, DP>(qs, kM, pg.q + pg.first * p.q.row_stride, p.q.row_stride, pg.len - pg.first, pg.read_dim, vec);
  load_tile<T, DP>(vs, kN, pg.v, p.v.row_stride, pg.len, pg.read_dim, vec);
  cp_async_commit();
  load_tile<T, DP>(ks, kN, pg.k, p.k.row_stride, pg.len, pg.read_dim, vec);
  cp_async_commit();

  // Rows g, g + 8 of this warp: base-2 LSE, dropout row hashes, and delta = rowsum(dout *
  // out) from the warp's rows of the dO tile once it has landed (written to the workspace
  // for the dk/dv kernel).
  float lse2[2] = {0.f, 0.f}, delta[2] = {0.f, 0.f};
  uint32_t rh[2] = {0u, 0u};
  if (r0 < pg.len) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = r0 + pg.g + 8 * h;
      if (row < pg.len) lse2[h] = p.lse[stats + row] * kLog2e;
    }
    if (dropout) {
      const i64 seed = *p.dropout_seed, key0 = dropout_key0(p, sq);
      rh[0] = dropout::row_hash(seed, key0 + r0 + pg.g);
      rh[1] = dropout::row_hash(seed, key0 + r0 + pg.g + 8);
    }
  }
  cp_async_wait<2>();
  __syncthreads();  // dO landed (the loop's first wait then finds Q and V tile 0)
  if (r0 < pg.len) {
    // Every lane gets the delta of row r0 + lane % 16.
    const T* orows = seq_rows<const T>(p.out, sq) + r0 * p.out.row_stride;
    const float dot =
        warp_delta<T, DP>(dos + 16 * pg.warp * kLd, orows, p.out.row_stride, pg.len - r0, pg.D, out_vec, pg.lane);
    if (pg.lane < imin(16, pg.len - r0)) bp.workspace[stats + r0 + pg.lane] = dot;
    delta[0] = __shfl_sync(kFull, dot, pg.g);      // row r0 + g
    delta[1] = __shfl_sync(kFull, dot, pg.g + 8);  // row r0 + g + 8
  }

  float dq[DP / 8][4] = {};  // [16, DP]
  for (int t = 0; t < ntiles; ++t) {
    const int n0 = t * kN;  // first key position of the tile
    const bool active = rows_active(p.causal, pg.len, r0, n0);
    const bool unmasked = tile_unmasked(p.causal, pg.len, r0, 16, n0, kN);
    float dp[kNK][4], s[kNK][4];  // [16, kN]: dP; scores, then dS
    cp_async_wait<1>();
    __syncthreads();  // Q, dO and V tile t landed
    if (active) tile_scores<T, DP, kNK, TF32X3>(dp, dos + 16 * pg.warp * kLd, vs, pg.lane);
    cp_async_wait<0>();
    __syncthreads();  // K tile t landed; every warp is done with V tile t
    if (t + 1 < ntiles)
      load_tile<T, DP>(vs, kN, pg.v + (n0 + kN) * p.v.row_stride, p.v.row_stride, pg.len - n0 - kN, pg.read_dim, vec);
    cp_async_commit();
    if (active) {
      tile_scores<T, DP, kNK, TF32X3>(s, qs + 16 * pg.warp * kLd, ks, pg.lane);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = r0 + frag::score_row(pg.g, h);
#pragma unroll
        for (int j = 0; j < kNK; ++j) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int col = n0 + frag::score_col(j, pg.tig, e);
            const bool seen = unmasked || visible(p.causal, pg.len, row, col);
            const float pr = seen ? exp2f(s[j][2 * h + e] * scale_log2 - lse2[h]) : 0.f;
            float dpr = dp[j][2 * h + e];
            if (dropout) dpr = dropout::keep(rh[h], col, p.keep_threshold) ? dpr * p.dropout_scale : 0.f;
            s[j][2 * h + e] = pr * (dpr - delta[h]);
          }
        }
      }
      tile_accumulate<T, DP, kNK>(dq, s, ks, pg.lane);
    }
    __syncthreads();  // every warp is done with K tile t
    if (t + 1 < ntiles)
      load_tile<T, DP>(ks, kN, pg.k + (n0 + kN) * p.k.row_stride, p.k.row_stride, pg.len - n0 - kN, pg.read_dim, vec);
    cp_async_commit();
  }

  if (r0 >= pg.len) return;
  const float mul[2] = {p.scale, p.scale};
  // Staged in the warp's own Q rows (no other warp reads them; no cp.async left pending).
  store_rows<T, DP>(seq_rows<T>(bp.dq, sq) + r0 * bp.dq.row_stride, bp.dq.row_stride, dq, mul, qs + 16 * pg.warp * kLd,
                    pg.len - r0, pg.D, dq_vec, pg.lane);
}

// dk and/or dv (GRADS) of kM keys, streaming the query tiles that can see them; needs the
// delta that the dq kernel wrote to the workspace. Products are transposed: a warp's
// scores are [16 keys, kN queries], so the query statistics are per column.
template <typename T, int DP, int GRADS, bool TF32X3>
__global__ void __launch_bounds__(BwdTiles<T, DP>::kWarps * 32, 1)
    attention_bwd_dkdv_kernel(const AttentionBackwardParams bp, const int vec, const int dk_vec, const int dv_vec) {
  using Tiles = BwdTiles<T, DP>;
  constexpr int kM = Tiles::kM, kN = Tiles::kN, kNK = kN / 8, kLd = tile_ld(sizeof(T), DP);
  constexpr bool kDv = (GRADS & kGradV) != 0, kDk = (GRADS & kGradK) != 0;
  const AttentionParams& p = bp.fwd;
  const Seq sq = this_seq(p, kM);
  const PadRows pad = seq_pad_rows(p, sq);
  if (kDk) write_padding(row0<T>(bp.dk, sq), bp.dk.row_stride, p.head_dim, from_f<T>(0.f), pad, kM);
  if (kDv) write_padding(row0<T>(bp.dv, sq), bp.dv.row_stride, p.head_dim, from_f<T>(0.f), pad, kM);
  if (sq.first >= sq.len) return;
  // Shared tiles, row stride kLd: K and V [kM rows], Q and dO [kN rows]; then per streamed query:
  T *ks = reinterpret_cast<T*>(dynamic_smem), *vs = ks + kM * kLd, *qs = vs + kM * kLd, *dos = qs + kN * kLd;
  float* lse_s = reinterpret_cast<float*>(dos + kN * kLd);  // [kN] LSE of the streamed queries
  float* delta_s = lse_s + kN;                               // [kN]
  uint32_t* rh_s = reinterpret_cast<uint32_t*>(delta_s + kN);  // [kN] their dropout row hashes
  const Program<T> pg = this_program<T>(p, sq, &bp.dout);
  const int k0 = pg.first + 16 * pg.warp;  // first key position of this warp
  const float scale_log2 = p.scale * kLog2e;
  const bool dropout = p.dropout_seed != nullptr;
  const i64 stats = stat_base(p, sq);
  const i64 seed = dropout ? *p.dropout_seed : 0, key0 = dropout_key0(p, sq);
  // Causal: queries before the key tile's query-tile boundary cannot see it.
  const int q_begin = query_begin(p.causal, pg.first, kN);
  const int ntiles = num_tiles(q_begin, pg.len, kN);

  // The query tile at m (Q rows, LSE, delta and dropout hashes): one cp.async group.
  auto load_queries = [&](int m) {
    load_tile<T, DP>(qs, kN, pg.q + m * p.q.row_stride, p.q.row_stride, pg.len - m, pg.read_dim, vec);
    for (int i = threadIdx.x; i < kN; i += blockDim.x) {
      const bool ok = m + i < pg.len;
      cp_async<4>(lse_s + i, p.lse + stats + (ok ? m + i : 0), ok);
      cp_async<4>(delta_s + i, bp.workspace + stats + (ok ? m + i : 0), ok);
      if (dropout) rh_s[i] = dropout::row_hash(seed, key0 + m + i);
    }
  };

  // Groups in flight: {K, V, query tile 0}, {dO tile 0}; then the next query tile and dO
  // tile as each buffer frees.
  load_tile<T, DP>(ks, kM, pg.k + pg.first * p.k.row_stride, p.k.row_stride, pg.len - pg.first, pg.read_dim, vec);
  load_tile<T, DP>(vs, kM, pg.v + pg.first * p.v.row_stride, p.v.row_stride, pg.len - pg.first, pg.read_dim, vec);
  load_queries(q_begin);
  cp_async_commit();
  load_tile<T, DP>(dos, kN, pg.dout + q_begin * bp.dout.row_stride, bp.dout.row_stride, pg.len - q_begin, pg.read_dim,
                   vec);
  cp_async_commit();

  float dk[DP / 8][4] = {}, dv[DP / 8][4] = {};  // [16, DP] each
  for (int t = 0; t < ntiles; ++t) {
    const int m0 = q_begin + t * kN;  // first query position of the tile
    // Warps whose keys are all padding, or all after the tile's queries (causal), skip the math.
    const bool active = keys_active(p.causal, pg.len, k0, m0, kN);
    const bool unmasked = tile_unmasked(p.causal, pg.len, m0, kN, k0, 16);
    float s[kNK][4], dp[kNK][4];  // [16 keys, kN queries]: scores, then dropped P; dP, then dS
    cp_async_wait<1>();
    __syncthreads();  // query tile t landed
    if (active) tile_scores<T, DP, kNK, TF32X3>(s, ks + 16 * pg.warp * kLd, qs, pg.lane);
    cp_async_wait<0>();
    __syncthreads();  // dO tile t landed
    if (active) {
      if (kDk) tile_scores<T, DP, kNK, TF32X3>(dp, vs + 16 * pg.warp * kLd, dos, pg.lane);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
#pragma unroll
        for (int j = 0; j < kNK; ++j) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int c = frag::score_col(j, pg.tig, e), query = m0 + c, key = k0 + frag::score_row(pg.g, h);
            const bool seen = unmasked || visible(p.causal, pg.len, query, key);
            const float pr = seen ? exp2f(s[j][2 * h + e] * scale_log2 - lse_s[c] * kLog2e) : 0.f;
            const bool kept = !dropout || dropout::keep(rh_s[c], key, p.keep_threshold);
            const float mult = kept ? (dropout ? p.dropout_scale : 1.f) : 0.f;
            if (kDk) dp[j][2 * h + e] = pr * (dp[j][2 * h + e] * mult - delta_s[c]);
            s[j][2 * h + e] = pr * mult;
          }
        }
      }
      if (kDk) tile_accumulate<T, DP, kNK>(dk, dp, qs, pg.lane);
    }
    __syncthreads();  // every warp is done with query tile t
    if (t + 1 < ntiles) load_queries(m0 + kN);
    cp_async_commit();
    if (active && kDv) tile_accumulate<T, DP, kNK>(dv, s, dos, pg.lane);
    __syncthreads();  // every warp is done with dO tile t
    if (t + 1 < ntiles)
      load_tile<T, DP>(dos, kN, pg.dout + (m0 + kN) * bp.dout.row_stride, bp.dout.row_stride, pg.len - m0 - kN,
                       pg.read_dim, vec);
    cp_async_commit();
  }

  if (k0 >= pg.len) return;
  // Staged in the warp's own K rows (dk) and V rows (dv): no other warp reads them, and the
  // loop left no cp.async pending.
  if (kDk) {
    const float mul[2] = {p.scale, p.scale};
    store_rows<T, DP>(seq_rows<T>(bp.dk, sq) + k0 * bp.dk.row_stride, bp.dk.row_stride, dk, mul,
                      ks + 16 * pg.warp * kLd, pg.len - k0, pg.D, dk_vec, pg.lane);
  }
  if (kDv) {
    const float mul[2] = {1.f, 1.f};
    store_rows<T, DP>(seq_rows<T>(bp.dv, sq) + k0 * bp.dv.row_stride, bp.dv.row_stride, dv, mul,
                      vs + 16 * pg.warp * kLd, pg.len - k0, pg.D, dv_vec, pg.lane);
  }
}

// ------------------------------------------------------------------ host side ------------

// f(TypeTag<T>, IntTag<DP>) for the dtype and the padded head dim; cudaErrorInvalidValue
// for an unknown dtype, a head dim outside 1..kMaxHeadDim or another read width than
// head_dim or padded_read_dim(head_dim).
template <typename F>
cudaError_t with_config(ScalarType dtype, int head_dim, int read_dim, F&& f) {
  return with_dtype(dtype, [&](auto tag) -> cudaError_t {
    if (head_dim < 1 || head_dim > kMaxHeadDim) return cudaErrorInvalidValue;
    if (read_dim != head_dim && read_dim != padded_read_dim(head_dim)) return cudaErrorInvalidValue;
    switch (padded_head_dim(head_dim)) {
      case 32:
        return f(tag, IntTag<32>{});
      case 64:
        return f(tag, IntTag<64>{});
      case 128:
        return f(tag, IntTag<128>{});
      default:
        return f(tag, IntTag<256>{});
    }
  });
}

// The copy width (common.cuh) that the rows of every [B, H, L, D] tensor in `ts` allow:
// their starts (the batch stride only when there are several batch rows) and `width`
// elements (read_dim for the inputs, head_dim for the outputs).
int bhld_copy_width(const AttentionParams& p, int width, std::initializer_list<Bhld> ts) {
  const i64 es = static_cast<i64>(element_size(p.dtype));
  int vec = 16;
  for (const Bhld& t : ts) {
    const i64 batch_bytes = p.batch > 1 ? t.batch_stride * es : 0;
    vec = min(vec, copy_width(t.data, {batch_bytes, t.head_stride * es, t.row_stride * es, width * es}));
  }
  return vec;
}

// The forward's K/V stages (FwdPlan) asked for process-wide: 1 (today's) or 2 (the
// double-buffered tuning candidate), set by seqrec::_set_attention_kv_stages (benchmarks/tune.py
// times both).
std::atomic<int> requested_kv_stages{1};

// The grid of tile_plan.h's attention_grid, empty (x == 0) when there is nothing to do;
// cudaErrorInvalidValue for bad sizes or beyond the grid limits.
cudaError_t attention_grid(const AttentionParams& p, int rows, dim3* grid) {
  Grid g{};
  if (!attn_plan::attention_grid(p.batch, p.num_seqs, p.num_heads, p.num_rows, p.max_seqlen, rows, &g))
    return cudaErrorInvalidValue;
  *grid = dim3(g.x, g.y, g.z);
  return cudaSuccess;
}

}  // namespace

cudaError_t attention_forward(const AttentionParams& p, cudaStream_t stream) {
  return with_config(p.dtype, p.head_dim, p.read_dim, [&](auto type_tag, auto dp_tag) -> cudaError_t {
    using T = typename decltype(type_tag)::type;
    constexpr int DP = decltype(dp_tag)::value;
    using Tiles = FwdTiles<T, DP>;
    dim3 grid;
    const cudaError_t err = attention_grid(p, Tiles::kM, &grid);
    if (err != cudaSuccess || grid.x == 0) return err;
    const int vec = bhld_copy_width(p, p.read_dim, {p.q, p.k, p.v});
    const int out_vec = bhld_copy_width(p, p.head_dim, {p.out});
    if constexpr (sizeof(T) == 2) {
      if (fwd_kv_stages(requested_kv_stages.load(), sizeof(T)) == 2) {
        using Double = FwdTiles<T, DP, 2>;
        return launch(attention_fwd_kernel<T, DP, 2, false>, grid, Double::kWarps * 32, Double::kSmem, stream, p, vec,
                      out_vec);
      }
    }
    return with_tf32x3<T>(p.tf32x3, [&](auto tf32x3) -> cudaError_t {
      return launch(attention_fwd_kernel<T, DP, 1, decltype(tf32x3)::value>, grid, Tiles::kWarps * 32, Tiles::kSmem,
                    stream, p, vec, out_vec);
    });
  });
}

int set_attention_kv_stages(int stages) { return requested_kv_stages.exchange(stages); }

size_t attention_backward_workspace_floats(const AttentionBackwardParams& p) {
  return workspace_floats(p.fwd.batch, p.fwd.num_heads, p.fwd.num_rows);
}

cudaError_t attention_backward(const AttentionBackwardParams& p, cudaStream_t stream) {
  const AttentionParams& f = p.fwd;
  return with_config(f.dtype, f.head_dim, f.read_dim, [&](auto type_tag, auto dp_tag) -> cudaError_t {
    using T = typename decltype(type_tag)::type;
    constexpr int DP = decltype(dp_tag)::value;
    using Tiles = BwdTiles<T, DP>;
    dim3 grid;
    cudaError_t err = attention_grid(f, Tiles::kM, &grid);
    if (err != cudaSuccess || grid.x == 0) return err;
    const int vec = bhld_copy_width(f, f.read_dim, {f.q, f.k, f.v, p.dout});
    // Each output's own width (O is read by the dq kernel's delta).
    const int out_vec = bhld_copy_width(f, f.head_dim, {f.out}), dq_vec = bhld_copy_width(f, f.head_dim, {p.dq});
    const int dk_vec = bhld_copy_width(f, f.head_dim, {p.dk}), dv_vec = bhld_copy_width(f, f.head_dim, {p.dv});
    const int threads = Tiles::kWarps * 32;
    return with_tf32x3<T>(f.tf32x3, [&](auto tf32x3) -> cudaError_t {
      constexpr bool kTf32x3 = decltype(tf32x3)::value;
      // dq first: it writes the delta that the dk/dv kernel reads.
      err = launch(attention_bwd_dq_kernel<T, DP, kTf32x3>, grid, threads, Tiles::kSmemDq, stream, p, vec, out_vec,
                   dq_vec);
      if (err != cudaSuccess) return err;
      const size_t smem = Tiles::kSmemDkDv;
      if constexpr (split_dkdv(DP)) {
        err = launch(attention_bwd_dkdv_kernel<T, DP, kGradV, kTf32x3>, grid, threads, smem, stream, p, vec, dk_vec,
                     dv_vec);
        if (err != cudaSuccess) return err;
        return launch(attention_bwd_dkdv_kernel<T, DP, kGradK, kTf32x3>, grid, threads, smem, stream, p, vec, dk_vec,
                      dv_vec);
      } else {
        return launch(attention_bwd_dkdv_kernel<T, DP, kGradV | kGradK, kTf32x3>, grid, threads, smem, stream, p, vec,
                      dk_vec, dv_vec);
      }
    });
  });
}

}  // namespace seqrec::cuda
