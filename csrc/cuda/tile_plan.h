// The CUDA kernels' tile plans: their constants, launch plans (grids, shared memory,
// workspace) and the index expressions that decide which rows, columns and fragment
// elements each thread handles. attention.cu and softmax_loss.cu use these very functions,
// and so do the host tests (tests/cuda_host/*.cpp, compiled with plain g++ -std=c++17):
// the tests emulate the kernels' schedules on the CPU from the kernels' own definitions.
// Standard headers only, no CUDA ones.
#pragma once

#include <cstddef>
#include <cstdint>

#include "../op_limits.h"

#ifdef __CUDACC__
#define SEQREC_HD __host__ __device__
#else
#define SEQREC_HD
#endif

namespace seqrec::cuda {

constexpr int64_t kMaxGridX = 0x7fffffff;  // CUDA grid limits
constexpr int64_t kMaxGridYZ = 65535;

template <typename A>
SEQREC_HD constexpr A imin(A x, A y) {
  return x < y ? x : y;
}
template <typename A>
SEQREC_HD constexpr A imax(A x, A y) {
  return x < y ? y : x;
}
SEQREC_HD constexpr int64_t ceil_div(int64_t x, int64_t y) { return (x + y - 1) / y; }

// ------------------------------------------------------------ fragment layouts ---------
// A warp's [16, 8 NK] tile in the mma.sync m16n8k16 accumulator layout (used by the FFMA
// float32 paths too): lane = 4 g + tig holds acc[j][2 h + e] = element
// (score_row(g, h), score_col(j, tig, e)).
namespace frag {

SEQREC_HD constexpr int score_row(int g, int h) { return g + 8 * h; }
SEQREC_HD constexpr int score_col(int j, int tig, int e) { return 8 * j + 2 * tig + e; }
// The inverse for column c of the row of `lane`: the lane holding it, its n tile and entry.
SEQREC_HD constexpr int col_lane(int lane, int c) { return (lane & ~3) | ((c >> 1) & 3); }
SEQREC_HD constexpr int col_tile(int c) { return c >> 3; }
SEQREC_HD constexpr int col_entry(int c) { return c & 1; }

// ldmatrix .x4: lane supplies the address of row lane & 7 of 8x8 matrix lane >> 3, at
// (row, column) offsets of a 16x16 block:
// - "a" order, matrices (rows 0-7, cols 0-7), (8-15, 0-7), (0-7, 8-15), (8-15, 8-15): the
//   m16n8k16 A fragment of a [m, k] tile, or with .trans two B fragments of a [k, n] tile;
// - "b" order, matrices (0-7, 0-7), (0-7, 8-15), (8-15, 0-7), (8-15, 8-15): two B
//   fragments (n tiles) of an [n, k] tile.
SEQREC_HD constexpr int ldsm_a_row(int lane) { return 8 * ((lane >> 3) & 1) + (lane & 7); }
SEQREC_HD constexpr int ldsm_a_col(int lane) { return 8 * (lane >> 4); }
SEQREC_HD constexpr int ldsm_b_row(int lane) { return 8 * (lane >> 4) + (lane & 7); }
SEQREC_HD constexpr int ldsm_b_col(int lane) { return 8 * ((lane >> 3) & 1); }

// mma.sync m16n8k8 with TF32 operands (float32 "high": 3xTF32 scores), one float32 element
// per register: A [16, 8] register i of lane (g, tig) at (tf32_a_row(g, i), tf32_a_col(tig,
// i)); B [8 k, 8 n] register i at (k = tf32_b_k(tig, i), n = g); C as m16n8k16's.
SEQREC_HD constexpr int tf32_a_row(int g, int i) { return g + 8 * (i & 1); }
SEQREC_HD constexpr int tf32_a_col(int tig, int i) { return tig + 4 * (i >> 1); }
SEQREC_HD constexpr int tf32_b_k(int tig, int i) { return tig + 4 * i; }

}  // namespace frag

// ------------------------------------------------------------------ attention ----------
namespace attn_plan {

using seqrec::kMaxHeadDim;  // csrc/op_limits.h
constexpr size_t kSmemBudget = 112 * 1024;  // per CTA: fits A100 (163 KB), two CTAs per SM on H100
// Positions are ints: the largest max_seqlen keeps every position + tile rows below 2**31.
constexpr int kMaxSeqLen = 0x7fffffff - 1024;

// Head dims 1..kMaxHeadDim are padded with zero columns to DP = 32, 64, 128 or 256.
SEQREC_HD constexpr int padded_head_dim(int head_dim) {
  return head_dim <= 32 ? 32 : head_dim <= 64 ? 64 : head_dim <= 128 ? 128 : 256;
}
static_assert(padded_head_dim(kMaxHeadDim) >= kMaxHeadDim, "the kernels have no tiles for kMaxHeadDim");

// q, k, v and dout rows go to shared memory by cp.async, which copies 4, 8 or 16 bytes:
// 16-bit rows of an odd head dim (or stride) allow only synchronous 2-byte loads. Where the
// kernels re-read them (a sequence longer than kPadAfterRows), the glue first copies them
// into rows of padded_read_dim(D) elements, zero past D (16-byte copies; zeros add nothing
// to a product), and the kernels read that width. It fits the tiles: <= padded_head_dim.
constexpr int kPadAfterRows = 64;  // the forward's query rows per program
SEQREC_HD constexpr int padded_read_dim(int head_dim) { return (head_dim + 7) / 8 * 8; }

// Shared tiles are [rows, DP + pad] (ES = element bytes: 4 float32, 2 float16/bfloat16): the
// pad makes ldmatrix rows (16-bit) and float4 rows (float32) of consecutive tile rows fall
// into different banks.
SEQREC_HD constexpr int tile_ld(int es, int dp) { return dp + (es == 4 ? 4 : 8); }
SEQREC_HD constexpr size_t tile_row_bytes(int es, int dp) { return static_cast<size_t>(tile_ld(es, dp)) * es; }
// Streamed rows per tile: 64, fewer for wide rows (16 KB of unpadded row data at most).
SEQREC_HD constexpr int stream_rows(int es, int dp) { return imin(16384 / (dp * es), 64); }

// STAGES: K and V buffers of the forward, each. 1 (the default): one K and one V buffer, each
// refilled while the CTA works on the other. 2 (a tuning candidate, 16-bit only: float32 at
// DP = 256 exceeds the budget): double-buffered, tile t + 2's K and V load (issued once tile t
// has freed its buffer) while the CTA computes tile t + 1 (the schedule of kv_buffer below).
template <int ES, int DP, int STAGES = 1>
struct FwdPlan {
  static constexpr int kWarps = 4;
  static constexpr int kM = 16 * kWarps;             // query rows per program
  static constexpr int kN = stream_rows(ES, DP);     // key rows per streamed tile
  static constexpr int kStages = STAGES;
  static constexpr size_t kSmem = (kM + 2 * STAGES * kN) * tile_row_bytes(ES, DP);  // Q, STAGES x (K, V) tiles
  static_assert(kSmem <= kSmemBudget, "forward tiles exceed the shared-memory budget");
};

// The forward's K/V stages for a request (seqrec::_set_attention_kv_stages, read by the glue
// of attention.cu) and element size: 2 where requested at 16-bit, else 1.
SEQREC_HD constexpr int fwd_kv_stages(int requested, int es) { return requested == 2 && es == 2 ? 2 : 1; }

// The multi-stage forward's pipeline (stages >= 2 buffers of K and V): the prologue commits
// one cp.async group per tile 0 .. stages - 1 into buffer kv_buffer(tile) (Q joins tile 0's;
// a group past the last tile is empty). Iteration t waits until at most kv_pending_groups are
// pending, when tile t's group has landed, computes tile t from buffer kv_buffer(t), syncs the
// CTA (every warp done with that buffer), then loads tile kv_refill_tile(t) into the same
// buffer as one group (empty past the last tile: the same count of groups at every wait, and
// none pending after the loop).
SEQREC_HD constexpr int kv_buffer(int tile, int stages) { return tile % stages; }
SEQREC_HD constexpr int kv_pending_groups(int stages) { return stages - 1; }
SEQREC_HD constexpr int kv_refill_tile(int tile, int stages) { return tile + stages; }

// dq: kM queries per program (16 per warp), streaming kN keys; dk/dv: kM keys per program,
// streaming kN queries. Four warps unless that exceeds the shared-memory budget.
template <int ES, int DP>
struct BwdPlan {
  // At most 4096 / DP: registers hold [16, kN] scores and dP next to [16, DP] gradient rows.
  static constexpr int kN = imin(stream_rows(ES, DP), 4096 / DP);
  static constexpr size_t kStatBytes = 3 * kN * sizeof(float);  // dk/dv: lse, delta, dropout hash per query
  static constexpr int kWarps = (2 * 64 + 2 * kN) * tile_row_bytes(ES, DP) + kStatBytes <= kSmemBudget ? 4 : 2;
  static constexpr int kM = 16 * kWarps;
  static constexpr size_t kSmemDq = (2 * kM + 2 * kN) * tile_row_bytes(ES, DP);  // Q, dO, K, V
  static constexpr size_t kSmemDkDv = kSmemDq + kStatBytes;                    // K, V, Q, dO, stats
  static_assert(kSmemDkDv <= kSmemBudget, "backward tiles exceed the shared-memory budget");
};

// Which gradients each dk/dv launch computes: both, or (DP = 256) one per launch.
SEQREC_HD constexpr bool split_dkdv(int dp) { return dp >= 256; }

// Column of acc[j][e] (row g) and acc[j][2 + e] (row g + 8) of a [16, DP] accumulator: the
// mma layout for 16-bit types; for float32, lanes tig read adjacent float4 of a row, the
// one at f32 column acc_col(2q, 0) filling acc[2q][0..1], acc[2q + 1][0..1].
SEQREC_HD constexpr int acc_col(bool f32, int j, int e, int tig) {
  return f32 ? 16 * (j >> 1) + 4 * tig + 2 * (j & 1) + e : frag::score_col(j, tig, e);
}

// Sequence s: its rows [start, start + len) of batch row batch_row(s), clamped like the
// Triton kernels (never past num_rows or max_seqlen) so that inputs the caller could not
// check never address outside the tensors.
struct SeqRange {
  int start, len;
};
SEQREC_HD constexpr SeqRange clamp_seq(int seq_start, int seq_len, int num_rows, int max_seqlen) {
  const int start = imin(imax(seq_start, 0), num_rows);
  return {start, imin(imax(seq_len, 0), imin(num_rows - start, max_seqlen))};
}
// Padded (batch == num_seqs): batch row s; packed (batch == 1): the one batch row.
SEQREC_HD constexpr int64_t batch_row(int s, int batch, int num_seqs) { return batch == num_seqs ? s : 0; }
// Index of (b, h, row) in a contiguous [B, H, L] lse / delta.
SEQREC_HD constexpr int64_t stat_index(int64_t b, int h, int num_heads, int num_rows, int64_t row) {
  return (b * num_heads + h) * num_rows + row;
}
// delta = rowsum(dout * out) of the backward, laid out like the LSE: [B, H, L].
constexpr size_t workspace_floats(int batch, int num_heads, int num_rows) {
  return static_cast<size_t>(batch) * num_heads * num_rows;
}

// The grid: x = sequence * head, the tile of `rows` positions in (y, z) (z past 65535
// tiles). x == 0 when there is nothing to do; false for bad sizes or beyond the limits.
struct Grid {
  unsigned x, y, z;
};
constexpr bool attention_grid(int batch, int num_seqs, int num_heads, int num_rows, int max_seqlen, int rows,
                              Grid* grid) {
  if (num_heads < 0 || num_seqs < 0 || num_rows < 0 || max_seqlen < 0 || max_seqlen > kMaxSeqLen ||
      (batch != num_seqs && batch != 1))
    return false;
  const int64_t programs = static_cast<int64_t>(num_seqs) * num_heads;
  const int64_t tiles = num_rows == 0 ? 0 : ceil_div(max_seqlen, rows);
  if (programs > kMaxGridX) return false;
  const int64_t y = imin(tiles, kMaxGridYZ);
  *grid = Grid{tiles == 0 ? 0u : static_cast<unsigned>(programs), static_cast<unsigned>(y),
               static_cast<unsigned>(y == 0 ? 1 : ceil_div(tiles, y))};
  return true;
}
// Index of program (., y, z) among the gridDim.y * gridDim.z of its (sequence, head), and
// the first position of its tile; programs at or past the sequence's end exit.
SEQREC_HD constexpr int64_t tile_index(unsigned y, unsigned z) { return static_cast<int64_t>(z) * kMaxGridYZ + y; }
SEQREC_HD constexpr int64_t tile_first(unsigned y, unsigned z, int rows) { return tile_index(y, z) * rows; }

// The outputs start uninitialized: the programs of each (sequence, head) write the rows of
// its batch row that no sequence holds, [0, lead_end) and [tail_begin, tail_end). Padded
// (one sequence per batch row): the rows before and after it. Packed (batch row 0, the
// sequences in order): sequence 0 also the rows before it, each sequence those from its
// end to the next one's start (the last: to num_rows). r: sequence s (clamp_seq);
// next_start: seq_start[s + 1] as given (unread in the padded form and for the last).
struct PadRows {
  int lead_end, tail_begin, tail_end;
};
SEQREC_HD constexpr PadRows pad_rows(SeqRange r, int s, int num_seqs, bool padded, int next_start, int num_rows) {
  const int tail_end = padded || s == num_seqs - 1 ? num_rows : imin(imax(next_start, 0), num_rows);
  return {padded || s == 0 ? r.start : 0, r.start + r.len, imax(r.start + r.len, tail_end)};
}
SEQREC_HD constexpr int pad_count(PadRows p) { return p.lead_end + (p.tail_end - p.tail_begin); }
// Padding row number u (0 <= u < pad_count): its row. Program i of G writes rows u of blocks
// [b * rows, (b + 1) * rows) for b = i, i + G, ... (one block when the padding fits G tiles).
SEQREC_HD constexpr int pad_row(PadRows p, int u) { return u < p.lead_end ? u : p.tail_begin + (u - p.lead_end); }

// Forward and dq: a program's queries [m0, m0 + kM) see keys [0, key_end), streamed in
// tiles of kN; warp rows [r0, r0 + 16) skip the key tile at n0 when none of them sees it.
SEQREC_HD constexpr int key_end(bool causal, int len, int m0, int k_m) { return causal ? imin(len, m0 + k_m) : len; }
SEQREC_HD constexpr int num_tiles(int begin, int end, int k_n) { return (end - begin + k_n - 1) / k_n; }
SEQREC_HD constexpr bool rows_active(bool causal, int len, int r0, int n0) {
  return r0 < len && (!causal || n0 <= r0 + 15);
}
// dk/dv: a program's keys [n0, n0 + kM) are seen by queries from query_begin on (causal:
// none before the key tile's query-tile boundary); warp keys [k0, k0 + 16) skip the query
// tile at m0 when none of its queries sees them.
SEQREC_HD constexpr int query_begin(bool causal, int n0, int k_n) { return causal ? n0 / k_n * k_n : 0; }
SEQREC_HD constexpr bool keys_active(bool causal, int len, int k0, int m0, int k_n) {
  return k0 < len && (!causal || m0 + k_n - 1 >= k0);
}
// Query `query` sees key `key` (positions in the sequence).
SEQREC_HD constexpr bool visible(bool causal, int len, int query, int key) {
  return query < len && key < len && (!causal || key <= query);
}
// Every query of [q0, q0 + nq) sees every key of [k0, k0 + nk): a tile the kernels compute
// without the per-element mask (as FlashAttention-2, which masks boundary tiles only).
SEQREC_HD constexpr bool tile_unmasked(bool causal, int len, int q0, int nq, int k0, int nk) {
  return q0 + nq <= len && k0 + nk <= len && (!causal || k0 + nk - 1 <= q0);
}

}  // namespace attn_plan

// --------------------------------------------------------------- softmax losses --------
namespace loss_plan {

using i64 = int64_t;

constexpr int kTile = 64;          // streamed lines per tile
constexpr int kChunk = 64;         // D columns per pipeline stage and per backward output chunk
constexpr int kMaxWarps = 8;       // 16 stationary lines per warp: at most 128 per CTA
using seqrec::kMaxKernelHiddenDim;  // csrc/op_limits.h
constexpr size_t kStationaryBudget = 96 * 1024;  // shared-memory bytes for the X block
constexpr i64 kEngineMinRows = 16;  // sampled: rows per group from which the tile engine runs
constexpr int kRowWarps = 8;        // warp-per-row kernels: rows per CTA
constexpr size_t kScaleMaxWords = 64;  // workspace[0]: grad_scale_max, padded to 256 bytes

// Row padding of shared tiles (elements; es = element bytes): conflict-free ldmatrix rows
// (16-bit) / float4 loads (float32).
SEQREC_HD constexpr int smem_pad(int es) { return es == 4 ? 4 : 8; }

// Column of acc[j][e] (and acc[j][2 + e]) within a [16, kChunk] output chunk: the mma
// layout for 16-bit types; for float32, lane tig reads the float4 at f32 column
// chunk_col(2q, 0) into acc[2q][0..1], acc[2q + 1][0..1].
SEQREC_HD constexpr int chunk_col(bool f32, int j, int e, int tig) {
  return f32 ? 16 * tig + 2 * j + e : frag::score_col(j, tig, e);
}

// Warp-per-row kernels: floats per lane (VPL * 32 >= D) and gathered rows in flight
// (registers: batch_rows * VPL floats).
SEQREC_HD constexpr int vpl_for_dim(i64 dim) { return dim <= 64 ? 2 : dim <= 128 ? 4 : dim <= 256 ? 8 : 32; }
SEQREC_HD constexpr int batch_rows(int vpl) { return vpl >= 32 ? 1 : 4; }

// The sizes of an op: T rows, N items, D; sampled: K negatives per group of rpg rows.
struct LossShape {
  i64 T, N, D, K, rpg;
  bool sampled;
};

SEQREC_HD constexpr bool uses_engine(const LossShape& s) { return !s.sampled || s.rpg >= kEngineMinRows; }

// The tile engine's kernels: X = stationary lines (16 per warp, whole padded D in shared
// memory), Y = streamed lines.
enum Kind : int {
  kFwd = 0,      // X = hidden rows of a group, Y = its candidate items
  kBwdRows = 1,  // the same, accumulating d hidden
  kBwdItems = 2  // X = items (full) or negative slots (sampled), Y = the group's hidden rows
};
SEQREC_HD constexpr i64 stationary_extent(const LossShape& s, int kind) {
  return kind != kBwdItems ? (s.sampled ? s.rpg : s.T) : (s.sampled ? s.K : s.N);
}
SEQREC_HD constexpr i64 streamed_extent(const LossShape& s, int kind) {
  return kind != kBwdItems ? (s.sampled ? s.K : s.N) : (s.sampled ? s.rpg : s.T);
}

struct EnginePlan {
  int warps, dpad, nchunks, splits;  // dpad = D rounded up to kChunk
  i64 tiles_per_group, groups;       // grid.x = groups * tiles_per_group
  i64 split_len;                     // streamed lines per split (a multiple of kTile)
  size_t smem;
};

// Shared memory of the engine, in this order: X [16 warps, dpad + pad], Y [2, kTile,
// kChunk + pad], X lines [16 warps], Y lines [2, kTile] (16-byte Line each), sampled
// positives' logits [16 warps] (float).
constexpr size_t kLineBytes = 16;
constexpr size_t engine_smem(int warps, int dpad, size_t es) {
  const int pad = smem_pad(static_cast<int>(es));
  return warps * 16 * static_cast<size_t>(dpad + pad) * es + 2 * kTile * static_cast<size_t>(kChunk + pad) * es +
         (16 * warps + 2 * kTile) * kLineBytes + 16 * warps * sizeof(float);
}

// Warps (16 stationary lines each, as many as the shared-memory budget allows), tiles and
// shared memory of the tile engine for `kind`; one stream split.
constexpr EnginePlan engine_plan(const LossShape& s, int kind, size_t es) {
  EnginePlan p{};
  p.dpad = static_cast<int>(ceil_div(s.D, kChunk) * kChunk);
  p.nchunks = p.dpad / kChunk;
  const i64 x_extent = stationary_extent(s, kind), y_extent = streamed_extent(s, kind);
  const size_t warp_bytes = 16 * static_cast<size_t>(p.dpad + smem_pad(static_cast<int>(es))) * es;
  p.warps = static_cast<int>(imin<size_t>(kMaxWarps, imax<size_t>(1, kStationaryBudget / warp_bytes)));
  p.warps = static_cast<int>(imin<i64>(p.warps, ceil_div(x_extent, 16)));
  p.tiles_per_group = ceil_div(x_extent, 16 * p.warps);
  p.groups = s.sampled ? s.T / s.rpg : 1;
  p.splits = 1;
  p.split_len = ceil_div(y_extent, kTile) * kTile;
  p.smem = engine_smem(p.warps, p.dpad, es);
  return p;
}

// Splits the streamed lines so that the grid has about `target_ctas` CTAs (no empty split),
// if that takes at least `min_splits` splits. Backward partials are [splits, X rows, D]:
// with min_splits = 4, at most about 4/3 * target_ctas * 128 * kChunk floats, whatever N or T.
constexpr void split_stream(EnginePlan* p, const LossShape& s, int kind, i64 target_ctas, i64 min_splits) {
  const i64 y_extent = streamed_extent(s, kind);
  const i64 nout = kind == kFwd ? 1 : p->nchunks;
  const i64 ctas = p->groups * p->tiles_per_group * nout;
  const i64 ytiles = ceil_div(y_extent, kTile);
  i64 splits = imax<i64>(1, imin(imin(ceil_div(target_ctas, ctas), ytiles), kMaxGridYZ / nout));
  if (splits < min_splits) splits = 1;
  p->split_len = ceil_div(ytiles, splits) * kTile;
  p->splits = static_cast<int>(ceil_div(y_extent, p->split_len));
}

// grid.x = (group, stationary tile), grid.y = (stream split, output D chunk of the backward).
struct EngineGrid {
  i64 x, y;
};
constexpr EngineGrid engine_grid(const EnginePlan& p, int kind) {
  return {p.groups * p.tiles_per_group, static_cast<i64>(p.splits) * (kind == kFwd ? 1 : p.nchunks)};
}
constexpr bool engine_launchable(const EnginePlan& p, int kind, i64 smem_optin) {
  const EngineGrid g = engine_grid(p, kind);
  return g.x >= 1 && g.x <= kMaxGridX && g.y >= 1 && g.y <= kMaxGridYZ && p.smem <= static_cast<size_t>(smem_optin);
}

// CTA (bx, by) of the engine: its group, stationary lines [x0, x0 + x_count) of the group,
// stream split with streamed lines [ybeg, yend), output D chunk oc (the forward, which
// has no output chunk, ends on the last one), and its (tile, chunk) pipeline stages.
struct EngineCta {
  i64 grp, x0, ybeg, yend;
  int x_count, split, oc, nstages;
};
SEQREC_HD constexpr EngineCta engine_cta(const EnginePlan& p, const LossShape& s, int kind, i64 bx, i64 by,
                                         int rows_x) {
  EngineCta c{};
  const int nout = kind != kFwd ? p.nchunks : 1;
  c.grp = bx / p.tiles_per_group;
  c.x0 = (bx - c.grp * p.tiles_per_group) * rows_x;
  c.split = static_cast<int>(by / nout);
  c.oc = kind != kFwd ? static_cast<int>(by) - c.split * nout : p.nchunks - 1;
  c.x_count = static_cast<int>(imin<i64>(rows_x, stationary_extent(s, kind) - c.x0));
  c.ybeg = c.split * p.split_len;
  c.yend = imin(streamed_extent(s, kind), c.ybeg + p.split_len);
  c.nstages = static_cast<int>(ceil_div(c.yend - c.ybeg, kTile)) * p.nchunks;
  return c;
}
// First hidden row of group grp (sampled: groups of rpg rows; full: one group).
SEQREC_HD constexpr i64 group_first_row(const LossShape& s, i64 grp) { return s.sampled ? grp * s.rpg : 0; }
SEQREC_HD constexpr i64 group_rows(const LossShape& s) { return s.sampled ? s.rpg : s.T; }

// Ignored rows (positive / target == ignore_index or outside [0, N)) are compacted away
// on the device: compact_rows writes order [T] (int32 rows) and count [G], each group's
// range [first, first + rows) of order holding its counted rows in row order, then its
// ignored rows (in reverse row order: one pass), and the engine reads hidden rows through
// order. A CTA's work once count[grp] = `counted` is known: rows stationary, none when
// all its lines hold ignored rows (it only writes their zero outputs); rows streamed, the
// stream ends at `counted` (none when its split starts past it).
SEQREC_HD constexpr EngineCta compacted_cta(EngineCta c, int kind, i64 counted, int nchunks) {
  if (kind != kBwdItems) {
    if (c.x0 >= counted) c.nstages = 0;
  } else {
    c.yend = imin(c.yend, imax(c.ybeg, counted));
    c.nstages = static_cast<int>(ceil_div(c.yend - c.ybeg, kTile)) * nchunks;
  }
  return c;
}
// Slot in order of a group's row with `before` counted (or ignored) rows before it.
SEQREC_HD constexpr i64 compact_slot(i64 first, i64 rows, bool counted, i64 before) {
  return counted ? first + before : first + rows - 1 - before;
}
// compact_rows: one CTA of compact_threads(rows) per group (a warp for small groups, which
// come by the thousand); a pass takes threads * kCompactRowsPerThread rows,
// kCompactRowsPerThread consecutive rows per thread.
constexpr int kCompactRowsPerThread = 8;
SEQREC_HD constexpr int compact_threads(i64 group_rows) { return group_rows <= 1024 ? 32 : 1024; }
SEQREC_HD constexpr i64 compact_row(i64 chunk_first, int tid, int i) {
  return chunk_first + static_cast<i64>(tid) * kCompactRowsPerThread + i;
}
// Workspace words (4 bytes) of order [T] and count [G], each padded to 256 bytes; order at
// word 0, count at compact_count_offset.
constexpr size_t align_words(size_t words) { return (words + 63) / 64 * 64; }
constexpr size_t compact_count_offset(const LossShape& s) { return align_words(static_cast<size_t>(s.T)); }
constexpr size_t compact_words(const LossShape& s) {
  return compact_count_offset(s) + align_words(static_cast<size_t>(s.sampled ? s.T / s.rpg : 1));
}

// Stage st of a CTA: streamed tile st / nchunks, D chunk step st % nchunks. Steps visit the
// chunks from oc + 1 round to oc, so that the output chunk is the one left in shared memory.
struct Stage {
  int tile, step;
};
SEQREC_HD constexpr Stage stage_of(int st, int nchunks) { return {st / nchunks, st - st / nchunks * nchunks}; }
SEQREC_HD constexpr int stage_chunk(int oc, int step, int nchunks) { return (oc + 1 + step) % nchunks; }
SEQREC_HD constexpr i64 tile_first_line(i64 ybeg, int tile) { return ybeg + static_cast<i64>(tile) * kTile; }

// Split partials: forward (max, sumexp) [splits, T, 2]; backward [splits, X rows, D].
SEQREC_HD constexpr i64 fwd_part_index(int split, i64 T, i64 t) { return 2 * (split * T + t); }
SEQREC_HD constexpr i64 bwd_part_index(int split, i64 rows, i64 x, i64 D, i64 d) { return (split * rows + x) * D + d; }
// Forward scratch: the partials and the rows' positive / target logits [T].
constexpr size_t forward_scratch_floats(int splits, i64 T) { return static_cast<size_t>(2 * splits + 1) * T; }
// Forward workspace: the row order (compact_words), then the scratch when split.
constexpr size_t forward_workspace_floats(const LossShape& s, const EnginePlan& p) {
  return compact_words(s) + (p.splits > 1 ? forward_scratch_floats(p.splits, s.T) : 0);
}

// Full backward: the stream splits of the d hidden and d weight kernels and their workspace.
struct FullBackwardPlan {
  EnginePlan rows, items;
};
constexpr FullBackwardPlan full_backward_plan(const LossShape& s, size_t es, int sms) {
  FullBackwardPlan p{engine_plan(s, kBwdRows, es), engine_plan(s, kBwdItems, es)};
  split_stream(&p.rows, s, kBwdRows, 2 * static_cast<i64>(sms), 4);
  split_stream(&p.items, s, kBwdItems, 2 * static_cast<i64>(sms), 4);
  return p;
}
// Its workspace: grad_scale_max, the row order (compact_words), then the split partials.
constexpr size_t full_backward_part_offset(const LossShape& s) { return kScaleMaxWords + compact_words(s); }
constexpr size_t full_backward_workspace_floats(const LossShape& s, const FullBackwardPlan& p) {
  const size_t rows = p.rows.splits > 1 ? p.rows.splits * s.T * s.D : 0;     // [splits, T, D]
  const size_t items = p.items.splits > 1 ? p.items.splits * s.N * s.D : 0;  // [splits, N, D]
  return full_backward_part_offset(s) + imax(rows, items);
}

// Sampled backward with shared negatives: the d weight kernel (rows streamed, float32
// atomics, so no partials) also splits the streamed rows when the slots alone leave SMs
// idle (one group of K = 8192 slots: 64 CTAs).
constexpr EnginePlan sampled_weight_plan(const LossShape& s, size_t es, int sms) {
  EnginePlan p = engine_plan(s, kBwdItems, es);
  split_stream(&p, s, kBwdItems, 2 * static_cast<i64>(sms), 2);
  return p;
}

// The d weight kernel's (kBwdItems) X lines over all groups: line grp * extent + x of
// stationary line x of group grp (full: the item x; sampled: negative slot grp * K + x),
// and their count (full: N; sampled: G * K), the rows of its [splits, rows, D] partials.
SEQREC_HD constexpr i64 items_line(const LossShape& s, i64 grp, i64 x) {
  return grp * stationary_extent(s, kBwdItems) + x;
}
SEQREC_HD constexpr i64 items_rows(const LossShape& s, const EnginePlan& p) {
  return p.groups * stationary_extent(s, kBwdItems);
}

// Deterministic sampled d weight with shared negatives (uses_engine): the d weight kernel
// (plan sampled_weight_plan) writes, without atomics, each present negative slot's d weight
// row per split into [splits, G * K, D] float32 partials (bwd_part_index of items_line; a
// split with no counted rows writes zeros); sampled_weight_grad_partials then sums each
// item's slots in slot order, a negative slot's partials in split order. The workspace:
// grad_scale_max, the row order (compact_words), these partials, then the sort. Memory:
// splits * G * K * D floats; splits > 1 only when the slots alone fill under 2 CTAs per
// SM, so then under 2 * 2 * sms * 128 * kChunk floats (17.3 MB on 132 SMs); with one split
// G * K * D, a float32 row per negative slot.
constexpr size_t sampled_part_offset(const LossShape& s) { return kScaleMaxWords + compact_words(s); }
constexpr size_t sampled_part_floats(const LossShape& s, const EnginePlan& p) {
  return align_words(static_cast<size_t>(p.splits) * static_cast<size_t>(items_rows(s, p)) * static_cast<size_t>(s.D));
}
// Partials past 128 MiB (many groups of many negatives) are not worth their memory: there
// the per-item sum re-reads each negative slot's rows instead (sampled_weight_grad_sorted).
constexpr size_t kMaxPartialFloats = size_t{1} << 25;
constexpr bool uses_partials(const LossShape& s, const EnginePlan& items) {
  return uses_engine(s) && sampled_part_floats(s, items) <= kMaxPartialFloats;
}
// Sort slots (sampled_slot_keys): T positives, then the G * K negative slots.
SEQREC_HD constexpr i64 sort_slots(const LossShape& s) { return s.T + s.T / s.rpg * s.K; }
// sampled_weight_grad_partials: warp w of CTA bx takes sorted position bx * kRowWarps + w.
SEQREC_HD constexpr i64 partial_sum_position(i64 bx, int warp) { return bx * kRowWarps + warp; }
SEQREC_HD constexpr i64 partial_sum_blocks(i64 num_slots) { return ceil_div(num_slots, kRowWarps); }

}  // namespace loss_plan
}  // namespace seqrec::cuda
