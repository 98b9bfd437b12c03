// Host checks of the attention kernels' tile schedules (csrc/cuda/attention.cu), from the
// plans and index expressions of csrc/cuda/tile_plan.h that the kernels use:
// - every visible (query, key) pair is visited exactly once, and no other pair, by the
//   forward, dq and dk/dv schedules (each dk/dv launch for DP = 256), for padded and
//   packed layouts, causal or not, each padded head dim and each dtype path (float32 FFMA,
//   16-bit mma: the tile shapes differ);
// - every output row, LSE and delta entry has one writer, delta within the workspace;
//   every padding row (no sequence's) written once by the programs' padding blocks;
//   every head-dim column is stored once: the warp's result tile staged in shared memory
//   (every padded column once, aligned stores), then copied out in the output's copy
//   width (each element of a valid row and column once, nothing else, aligned copies);
//   the dq kernel's delta sums each column of a row once;
// - a warp only works on a tile where it has a visible pair (the causal skip);
// - shared memory within the budget and the A100 / H100 opt-in limits for every head dim;
// - the grid within CUDA's limits up to the largest max_seqlen, each tile on one program;
// - the double-buffered forward's K/V pipeline (kv_buffer): each tile read from the buffer its
//   own copy filled, after that copy's cp.async group completed, never refilled before every
//   warp is done with it, nothing in flight after the loop.
// The loops mirror the kernels' (programs, warps, streamed tiles, lanes, fragment entries).
#include <cstdint>
#include <cstdio>
#include <vector>

#include "host_check.h"
#include "tile_plan.h"

using namespace seqrec::cuda;
using namespace seqrec::cuda::attn_plan;
using i64 = int64_t;

namespace {

constexpr i64 kOptinA100 = 166912, kOptinH100 = 232448;  // per-block shared memory opt-in

// Sequences s: rows [start[s], start[s] + len[s]) of batch row s (padded, batch == S) or 0
// (packed, batch == 1).
struct Layout {
  const char* name;
  int batch, num_rows, max_seqlen;
  std::vector<int> start, len;
};

// Counts per (batch row, head, row, row) or (batch row, head, row).
struct Counts {
  int batch, heads, rows;
  std::vector<uint8_t> pairs, row_writes, delta_writes;
  Counts(int b, int h, int l)
      : batch(b),
        heads(h),
        rows(l),
        pairs(static_cast<size_t>(b) * h * l * l),
        row_writes(static_cast<size_t>(b) * h * l),
        delta_writes(static_cast<size_t>(b) * h * l) {}
  uint8_t& pair(i64 b, int h, i64 query, i64 key) { return pairs[((b * heads + h) * rows + query) * rows + key]; }
  uint8_t& row(i64 b, int h, i64 r) { return row_writes[(b * heads + h) * rows + r]; }
};

struct Case {
  const Layout* layout;
  int heads, es, dp;
  bool causal;
};

void describe(char* buf, size_t size, const Case& c, const char* kernel) {
  std::snprintf(buf, size, "%s %s es=%d DP=%d causal=%d", kernel, c.layout->name, c.es, c.dp, c.causal);
}

// Expected visits: query i sees key j of its own sequence, causal: j <= i.
void check_pairs(const Case& c, Counts& n, const char* kernel) {
  const Layout& L = *c.layout;
  std::vector<int> seq_of(static_cast<size_t>(L.batch) * L.num_rows, -1);  // [B, L]: sequence of a row
  for (int s = 0; s < static_cast<int>(L.len.size()); ++s)
    for (int r = 0; r < L.len[s]; ++r)
      seq_of[batch_row(s, L.batch, static_cast<int>(L.len.size())) * L.num_rows + L.start[s] + r] = s;
  char what[160];
  describe(what, sizeof what, c, kernel);
  long wrong = 0;
  for (int b = 0; b < L.batch; ++b)
    for (int h = 0; h < c.heads; ++h)
      for (int i = 0; i < L.num_rows; ++i)
        for (int j = 0; j < L.num_rows; ++j) {
          const int si = seq_of[b * L.num_rows + i], sj = seq_of[b * L.num_rows + j];
          const bool seen = si >= 0 && si == sj && (!c.causal || j <= i);
          const int got = n.pair(b, h, i, j);
          if (got != (seen ? 1 : 0) && ++wrong <= 3)
            CHECK(false, "%s: pair (b=%d, h=%d, query row %d, key row %d) visited %d times, expected %d", what, b, h, i,
                  j, got, seen ? 1 : 0);
        }
  CHECK(wrong == 0, "%s: %ld pairs visited the wrong number of times", what, wrong);
}

// Each row of each sequence written once (count), no row outside the sequences.
void check_rows(const Case& c, const std::vector<uint8_t>& writes, const char* kernel, const char* output) {
  const Layout& L = *c.layout;
  std::vector<uint8_t> expected(writes.size(), 0);
  for (int s = 0; s < static_cast<int>(L.len.size()); ++s)
    for (int h = 0; h < c.heads; ++h)
      for (int r = 0; r < L.len[s]; ++r)
        expected[(batch_row(s, L.batch, static_cast<int>(L.len.size())) * c.heads + h) * L.num_rows + L.start[s] + r] =
            1;
  char what[160];
  describe(what, sizeof what, c, kernel);
  long wrong = 0;
  for (size_t i = 0; i < writes.size(); ++i) wrong += writes[i] != expected[i];
  CHECK(wrong == 0, "%s: %ld %s entries written the wrong number of times", what, wrong, output);
}

// The programs of a launch: f(s, h, b, seq, first position of the tile).
template <typename F>
void for_programs(const Case& c, int rows, F&& f) {
  const Layout& L = *c.layout;
  const int num_seqs = static_cast<int>(L.len.size());
  Grid g{};
  CHECK(attention_grid(L.batch, num_seqs, c.heads, L.num_rows, L.max_seqlen, rows, &g), "grid of %s", L.name);
  for (unsigned x = 0; x < g.x; ++x)
    for (unsigned z = 0; z < g.z; ++z)
      for (unsigned y = 0; y < g.y; ++y) {
        const int s = static_cast<int>(x) / c.heads, h = static_cast<int>(x) - s * c.heads;
        const SeqRange seq = clamp_seq(L.start[s], L.len[s], L.num_rows, L.max_seqlen);
        const i64 first = tile_first(y, z, rows);
        if (first >= seq.len) continue;  // the program exits at once
        f(h, batch_row(s, L.batch, num_seqs), seq, static_cast<int>(first));
      }
}

// attention_fwd_kernel (DQ = false) and attention_bwd_dq_kernel (DQ = true).
template <int ES, int DP, bool DQ>
void query_tiles(const Case& c, Counts& n, long* idle) {
  constexpr int kM = DQ ? BwdPlan<ES, DP>::kM : FwdPlan<ES, DP>::kM;
  constexpr int kN = DQ ? BwdPlan<ES, DP>::kN : FwdPlan<ES, DP>::kN;
  constexpr int kWarps = kM / 16;
  const Layout& L = *c.layout;
  const size_t workspace = workspace_floats(L.batch, c.heads, L.num_rows);
  for_programs(c, kM, [&](int h, i64 b, SeqRange seq, int m0) {
    const int len = seq.len;
    const int ntiles = num_tiles(0, key_end(c.causal, len, m0, kM), kN);
    for (int warp = 0; warp < kWarps; ++warp) {
      const int r0 = m0 + 16 * warp;
      for (int t = 0; t < ntiles; ++t) {
        const int n0 = t * kN;
        if (!rows_active(c.causal, len, r0, n0)) continue;
        const bool unmasked = tile_unmasked(c.causal, len, r0, 16, n0, kN);
        bool any = false;
        for (int lane = 0; lane < 32; ++lane)
          for (int hh = 0; hh < 2; ++hh)
            for (int j = 0; j < kN / 8; ++j)
              for (int e = 0; e < 2; ++e) {
                const int row = r0 + frag::score_row(lane >> 2, hh), col = n0 + frag::score_col(j, lane & 3, e);
                CHECK(!unmasked || visible(c.causal, len, row, col), "unmasked tile at rows %d, keys %d hides a pair",
                      r0, n0);
                if (!visible(c.causal, len, row, col)) continue;
                ++n.pair(b, h, seq.start + row, seq.start + col);
                any = true;
              }
        *idle += !any;
      }
      if (r0 >= len) continue;
      // store_rows and the LSE: rows g, g + 8 below len; dq's delta: row r0 + lane (lanes below 16).
      for (int lane = 0; lane < 32; lane += 4)
        for (int hh = 0; hh < 2; ++hh)
          if (frag::score_row(lane >> 2, hh) < len - r0) ++n.row(b, h, seq.start + r0 + frag::score_row(lane >> 2, hh));
      if (DQ) {
        for (int lane = 0; lane < 32; ++lane) {
          if (lane >= imin(16, len - r0)) continue;
          const int r = r0 + lane;
          const i64 index = stat_index(b, h, c.heads, L.num_rows, seq.start) + r;
          CHECK(index >= 0 && static_cast<size_t>(index) < workspace, "delta index %lld of %zu", (long long)index,
                workspace);
          ++n.delta_writes[index];
        }
      }
    }
  });
}

// attention_bwd_dkdv_kernel (one launch).
template <int ES, int DP>
void key_tiles(const Case& c, Counts& n, long* idle) {
  using P = BwdPlan<ES, DP>;
  constexpr int kM = P::kM, kN = P::kN, kWarps = P::kWarps;
  for_programs(c, kM, [&](int h, i64 b, SeqRange seq, int n0) {
    const int len = seq.len;
    const int q_begin = query_begin(c.causal, n0, kN);
    const int ntiles = num_tiles(q_begin, len, kN);
    for (int warp = 0; warp < kWarps; ++warp) {
      const int k0 = n0 + 16 * warp;
      for (int t = 0; t < ntiles; ++t) {
        const int m0 = q_begin + t * kN;
        if (!keys_active(c.causal, len, k0, m0, kN)) continue;
        const bool unmasked = tile_unmasked(c.causal, len, m0, kN, k0, 16);
        bool any = false;
        for (int lane = 0; lane < 32; ++lane)
          for (int hh = 0; hh < 2; ++hh)
            for (int j = 0; j < kN / 8; ++j)
              for (int e = 0; e < 2; ++e) {
                const int key = k0 + frag::score_row(lane >> 2, hh), query = m0 + frag::score_col(j, lane & 3, e);
                CHECK(!unmasked || visible(c.causal, len, query, key),
                      "unmasked tile at keys %d, queries %d hides a pair", k0, m0);
                if (!visible(c.causal, len, query, key)) continue;
                ++n.pair(b, h, seq.start + query, seq.start + key);
                any = true;
              }
        *idle += !any;
      }
      if (k0 >= len) continue;
      for (int lane = 0; lane < 32; lane += 4)
        for (int hh = 0; hh < 2; ++hh)
          if (frag::score_row(lane >> 2, hh) < len - k0) ++n.row(b, h, seq.start + k0 + frag::score_row(lane >> 2, hh));
    }
  });
}

template <int ES, int DP>
void check_config(const Case& c) {
  const Layout& L = *c.layout;
  char what[160];
  {
    Counts n(L.batch, c.heads, L.num_rows);
    long idle = 0;
    query_tiles<ES, DP, false>(c, n, &idle);
    check_pairs(c, n, "forward");
    check_rows(c, n.row_writes, "forward", "out/lse row");
    describe(what, sizeof what, c, "forward");
    CHECK(idle == 0, "%s: %ld warp tiles without a visible pair", what, idle);
  }
  {
    Counts n(L.batch, c.heads, L.num_rows);
    long idle = 0;
    query_tiles<ES, DP, true>(c, n, &idle);
    check_pairs(c, n, "dq");
    check_rows(c, n.row_writes, "dq", "dq row");
    check_rows(c, n.delta_writes, "dq", "delta");
    describe(what, sizeof what, c, "dq");
    CHECK(idle == 0, "%s: %ld warp tiles without a visible pair", what, idle);
  }
  for (int launch = 0; launch < (split_dkdv(DP) ? 2 : 1); ++launch) {
    Counts n(L.batch, c.heads, L.num_rows);
    long idle = 0;
    key_tiles<ES, DP>(c, n, &idle);
    check_pairs(c, n, "dk/dv");
    check_rows(c, n.row_writes, "dk/dv", "dk/dv row");
    describe(what, sizeof what, c, "dk/dv");
    CHECK(idle == 0, "%s: %ld warp tiles without a visible pair", what, idle);
  }
}

template <int ES>
void check_dtype_path(const Case& c) {
  switch (c.dp) {
    case 32:
      return check_config<ES, 32>(c);
    case 64:
      return check_config<ES, 64>(c);
    case 128:
      return check_config<ES, 128>(c);
    default:
      return check_config<ES, 256>(c);
  }
}

// Padded: two sequences, the first left-padded, the second shorter (empty for n = 1).
// Packed: four sequences in one batch row, in row order (as cu_seqlens gives them), with
// gaps, one of them empty.
std::vector<Layout> layouts(int n) {
  Layout padded{"padded", 2, n + 5, n, {5, 0}, {n, 2 * n / 3}};
  const int half = (n + 1) / 2;
  Layout packed{
      "packed",       1, 3 + n + 2 + half + 1 + 1 + 2, n, {3, 3 + n + 2, 3 + n + 2 + half, 3 + n + 2 + half + 1},
      {n, half, 0, 1}};
  return {padded, packed};
}

template <int ES, int DP>
void check_plan_limits() {
  using F = FwdPlan<ES, DP>;
  using B = BwdPlan<ES, DP>;
  // The double-buffered forward is instantiated at 16-bit only (fwd_kv_stages).
  i64 forward = static_cast<i64>(F::kSmem);
  if constexpr (ES == 2) forward = static_cast<i64>(FwdPlan<ES, DP, 2>::kSmem);
  const i64 largest = static_cast<i64>(B::kSmemDkDv) > forward ? static_cast<i64>(B::kSmemDkDv) : forward;
  CHECK(largest <= static_cast<i64>(kSmemBudget) && largest <= kOptinA100 && largest <= kOptinH100,
        "es=%d DP=%d: %lld bytes of shared memory", ES, DP, (long long)largest);
  CHECK(F::kN % 16 == 0 && B::kN % 16 == 0 && F::kM % 16 == 0 && B::kM % 16 == 0,
        "es=%d DP=%d: tiles of whole mma k steps", ES, DP);
  CHECK(B::kM >= B::kN, "es=%d DP=%d: dk/dv's query_begin assumes key tiles at least a query tile", ES, DP);
  // Positions stay ints: the largest accepted position plus a tile or two.
  CHECK(static_cast<i64>(kMaxSeqLen) + 2 * F::kM + 2 * B::kN < (i64{1} << 31), "es=%d DP=%d: int positions", ES, DP);
}

// store_rows' stage_rows: a row's lanes (tig) store every column of [0, DP) once, as
// 16-bit pairs acc[j][2h..2h + 1] at acc_col(false, j, 0, tig) (4-byte stores) or float32
// quads acc[2q][2h..2h + 1], acc[2q + 1][2h..2h + 1] at acc_col(true, 2q, 0, tig) (float4).
void check_staging(int es, int dp) {
  const bool f32 = es == 4;
  const int ld = tile_ld(es, dp);
  std::vector<int> staged(dp, 0);
  for (int tig = 0; tig < 4; ++tig)
    for (int j = 0; j < dp / 8; j += f32 ? 2 : 1) {
      const int base = acc_col(f32, j, 0, tig), bytes = f32 ? 16 : 4;
      CHECK(base >= 0 && base + bytes / es <= dp, "es=%d DP=%d: staged columns %d.. outside DP", es, dp, base);
      CHECK(base * es % bytes == 0 && ld * es % 16 == 0, "es=%d DP=%d: staging store at column %d misaligned", es, dp,
            base);
      for (int k = 0; k < bytes / es; ++k) {
        // The entry stored k-th: acc[j + k / 2][e = k % 2] (float32), acc[j][k] (16-bit).
        const int col = f32 ? acc_col(true, j + k / 2, k % 2, tig) : acc_col(false, j, k, tig);
        CHECK(col == base + k, "es=%d DP=%d: entry %d of the store at column %d is column %d", es, dp, k, base, col);
        if (col >= 0 && col < dp) ++staged[col];
      }
    }
  for (int col = 0; col < dp; ++col)
    CHECK(staged[col] == 1, "es=%d DP=%d: column %d staged %d times", es, dp, col, staged[col]);
}

// store_rows' copy_rows_out<BYTES> (lane + 32 i -> row, column) and warp_delta's chunks
// (lane l: row l % 16, 16-byte chunks 2 i + l / 16 until D) for head dim d: each element of
// rows < valid_rows and columns < d copied once and nothing else, at 16-byte-aligned shared
// rows and BYTES-aligned columns; each column < d of a row summed by one lane.
void check_copies(int es, int d) {
  const int dp = padded_head_dim(d), ld = tile_ld(es, dp), chunk = 16 / es;
  for (int bytes : {16, 8, 4, 2}) {
    if (bytes < es || d * es % bytes != 0) continue;  // not a copy width of this d (bhld_copy_width)
    const int elems = bytes / es, per_row = dp / elems;
    CHECK(16 * per_row % 32 == 0, "es=%d DP=%d: %d-byte copies not whole warp passes", es, dp, bytes);
    for (int valid = 1; valid <= 16; ++valid) {
      std::vector<int> copied(16 * static_cast<size_t>(dp), 0);
      for (int lane = 0; lane < 32; ++lane)
        for (int i = 0; i < 16 * per_row / 32; ++i) {
          const int u = lane + 32 * i, r = u / per_row, c = (u - r * per_row) * elems;
          if (!(r < valid && c < d)) continue;
          CHECK(c + elems <= d && (r * ld + c) * es % bytes == 0 && c * es % bytes == 0 && ld * es % 16 == 0,
                "es=%d d=%d: %d-byte copy at row %d column %d straddles D or is misaligned", es, d, bytes, r, c);
          for (int k = 0; k < elems; ++k) ++copied[r * dp + c + k];
        }
      long wrong = 0;
      for (int r = 0; r < 16; ++r)
        for (int c = 0; c < dp; ++c) wrong += copied[r * dp + c] != (r < valid && c < d ? 1 : 0);
      CHECK(wrong == 0, "es=%d d=%d %d-byte copies, %d valid rows: %ld elements copied the wrong number of times", es,
            d, bytes, valid, wrong);
    }
  }
  std::vector<int> summed(16 * static_cast<size_t>(dp), 0);
  for (int lane = 0; lane < 32; ++lane)
    for (int i = 0; i < dp / (2 * chunk); ++i) {
      const int c = (2 * i + (lane >> 4)) * chunk;
      if (c >= d) break;
      for (int k = 0; k < chunk; ++k) ++summed[(lane & 15) * dp + c + k];
    }
  long wrong = 0;
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < d; ++c) wrong += summed[r * dp + c] != 1;
  CHECK(wrong == 0, "es=%d d=%d: %ld delta columns summed the wrong number of times", es, d, wrong);
}

// Every head dim maps to a compiled DP that holds it; the stores of its output rows.
void check_head_dims() {
  for (int dp : {32, 64, 128, 256}) {
    check_staging(4, dp);
    check_staging(2, dp);
  }
  for (int d = 1; d <= kMaxHeadDim; ++d) {
    const int dp = padded_head_dim(d);
    CHECK((dp == 32 || dp == 64 || dp == 128 || dp == 256) && dp >= d && (dp == 32 || dp / 2 < d),
          "head dim %d -> DP %d", d, dp);
    const int read = padded_read_dim(d);  // the glue's zero-padded rows: 16-byte copies, same tiles
    CHECK(read >= d && read * 2 % 16 == 0 && padded_head_dim(read) == dp, "head dim %d: read width %d", d, read);
    check_copies(4, d);
    check_copies(2, d);
  }
}

// Grids for large inputs: within the limits, every tile on exactly one program.
void check_grids() {
  struct Big {
    const char* name;
    int batch, num_seqs, heads, num_rows, max_seqlen;
  };
  const Big bigs[] = {
      {"padded 4096 x 8 heads x 8192", 4096, 4096, 8, 8192, 8192},
      {"packed 10^7 rows, 10^6 sequences", 1, 1000000, 8, 10000000, 200},
      {"packed one sequence of 10^7", 1, 1, 2, 10000000, 10000000},
      {"65535 tiles of 64", 1, 1, 1, 65535 * 64, 65535 * 64},
      {"65535 tiles of 64, plus one row", 1, 1, 1, 65535 * 64 + 1, 65535 * 64 + 1},
      {"the largest max_seqlen", 1, 1, 1, kMaxSeqLen, kMaxSeqLen},
  };
  for (const Big& big : bigs)
    for (int rows : {32, 64}) {
      Grid g{};
      const bool ok = attention_grid(big.batch, big.num_seqs, big.heads, big.num_rows, big.max_seqlen, rows, &g);
      CHECK(ok, "%s, %d rows per tile: rejected", big.name, rows);
      if (!ok) continue;
      CHECK(g.x == static_cast<i64>(big.num_seqs) * big.heads && g.x <= kMaxGridX && g.y <= kMaxGridYZ &&
                g.z <= kMaxGridYZ,
            "%s: grid (%u, %u, %u)", big.name, g.x, g.y, g.z);
      const i64 tiles = ceil_div(big.max_seqlen, rows);
      std::vector<uint8_t> seen(static_cast<size_t>(tiles), 0);
      long extra = 0;
      for (unsigned z = 0; z < g.z; ++z)
        for (unsigned y = 0; y < g.y; ++y) {
          const i64 first = tile_first(y, z, rows);
          if (first >= big.max_seqlen) {  // exits at once, whatever the sequence
            ++extra;
            continue;
          }
          CHECK(first % rows == 0, "%s: tile start %lld", big.name, (long long)first);
          ++seen[first / rows];
        }
      long wrong = 0;
      for (uint8_t v : seen) wrong += v != 1;
      CHECK(wrong == 0, "%s, %d rows: %ld tiles not on exactly one program", big.name, rows, wrong);
      CHECK(extra < kMaxGridYZ, "%s: %ld idle programs", big.name, extra);
    }
  Grid g{};
  CHECK(!attention_grid(1, 1, 1, 0x7fffffff, 0x7fffffff, 64, &g), "max_seqlen past kMaxSeqLen must be rejected");
  CHECK(!attention_grid(1, 70000, 40000, 10, 10, 64, &g), "more than 2**31 - 1 programs must be rejected");
  CHECK(attention_grid(3, 3, 2, 0, 0, 64, &g) && g.x == 0, "no rows: an empty grid");
}

// The outputs start uninitialized: every row of every (batch row, head) is written once,
// the rows of its sequences by the tiles (check_rows), the others by the programs' padding
// blocks (attention.cu's write_padding, from pad_rows / pad_row) for programs of `rows`.
void check_padding(const Layout& L, int heads, int rows) {
  const int num_seqs = static_cast<int>(L.len.size());
  const bool padded = L.batch == num_seqs;
  Grid g{};
  CHECK(attention_grid(L.batch, num_seqs, heads, L.num_rows, L.max_seqlen, rows, &g), "grid of %s", L.name);
  std::vector<int> writes(static_cast<size_t>(L.batch) * heads * L.num_rows, 0);
  for (int s = 0; s < num_seqs; ++s)
    for (int h = 0; h < heads; ++h)
      for (int r = 0; r < L.len[s]; ++r)
        ++writes[(batch_row(s, L.batch, num_seqs) * heads + h) * L.num_rows + L.start[s] + r];
  const int64_t programs = static_cast<int64_t>(g.y) * g.z;
  for (unsigned x = 0; x < g.x; ++x)
    for (unsigned z = 0; z < g.z; ++z)
      for (unsigned y = 0; y < g.y; ++y) {
        const int s = static_cast<int>(x) / heads, h = static_cast<int>(x) - s * heads;
        const SeqRange seq = clamp_seq(L.start[s], L.len[s], L.num_rows, L.max_seqlen);
        const PadRows pad = pad_rows(seq, s, num_seqs, padded, s + 1 < num_seqs ? L.start[s + 1] : 0, L.num_rows);
        const int count = pad_count(pad);
        for (int64_t first = tile_index(y, z) * rows; first < count; first += programs * rows)
          for (int u = 0; u < rows && first + u < count; ++u)
            ++writes[(batch_row(s, L.batch, num_seqs) * heads + h) * L.num_rows +
                     pad_row(pad, static_cast<int>(first + u))];
      }
  long wrong = 0;
  for (int w : writes) wrong += w != 1;
  CHECK(wrong == 0, "%s (%d rows per program): %ld rows written the wrong number of times", L.name, rows, wrong);
}

// The multi-stage forward's K/V pipeline (attention.cu's STAGES >= 2 branch), replayed with a
// model of cp.async groups: a commit closes a group of the copies issued since the last one; a
// wait<N> completes all but the N most recent groups; the CTA syncs (__syncthreads) after the
// wait and after the tile's math. Every tile must be read from the buffer that its own copy
// filled, once that copy completed and with no copy into the buffer in flight, so a refill
// never lands in a buffer whose tile is still to be read; nothing is in flight after the loop
// (the output is staged in shared memory next). The replay issues each refill after the sync
// that follows the tile's math, as the kernel does: reads of earlier tiles are done by then.
void check_kv_pipeline(int stages, int ntiles) {
  constexpr int kQ = -1;  // the buffer index of Q's copy (with tile 0's)
  struct Copy {
    int buffer, tile;
  };
  std::vector<std::vector<Copy>> pending;  // groups in commit order
  std::vector<int> holds(stages, -1);      // tile whose copy into the buffer completed (-1: none / being refilled)
  bool q_landed = false;
  auto wait = [&](int n) {
    while (static_cast<int>(pending.size()) > n) {
      for (const Copy& c : pending.front()) {
        if (c.buffer == kQ)
          q_landed = true;
        else
          holds[c.buffer] = c.tile;
      }
      pending.erase(pending.begin());
    }
  };
  auto issue = [&](std::vector<Copy>& group, int tile) {
    const int b = kv_buffer(tile, stages);
    CHECK(b >= 0 && b < stages, "stages %d: tile %d into buffer %d", stages, tile, b);
    if (b < 0 || b >= stages) return;
    for (const auto& g : pending)
      for (const Copy& c : g)
        CHECK(c.buffer != b, "stages %d: two copies into buffer %d in flight (tiles %d, %d)", stages, b, c.tile, tile);
    holds[b] = -1;
    group.push_back({b, tile});
  };
  for (int t = 0; t < stages; ++t) {  // the prologue: Q joins tile 0's group
    std::vector<Copy> group;
    if (t == 0) group.push_back({kQ, 0});
    if (t < ntiles) issue(group, t);
    pending.push_back(group);
  }
  for (int t = 0; t < ntiles; ++t) {
    wait(kv_pending_groups(stages));
    const int b = kv_buffer(t, stages);  // __syncthreads(), then the tile's math
    CHECK(q_landed, "stages %d: Q read before its copy completed", stages);
    CHECK(b >= 0 && b < stages && holds[b] == t, "stages %d, %d tiles: tile %d read from buffer %d holding %d", stages,
          ntiles, t, b, b >= 0 && b < stages ? holds[b] : -2);
    for (const auto& g : pending)
      for (const Copy& c : g)
        CHECK(c.buffer != b, "stages %d: tile %d read while tile %d is copied into its buffer", stages, t, c.tile);
    std::vector<Copy> group;  // after __syncthreads(): every warp is done with tile t's buffer
    const int refill = kv_refill_tile(t, stages);
    if (refill < ntiles) issue(group, refill);
    pending.push_back(group);
  }
  long in_flight = 0;
  for (const auto& g : pending) in_flight += static_cast<long>(g.size());
  CHECK(in_flight == 0, "stages %d, %d tiles: %ld copies in flight after the loop", stages, ntiles, in_flight);
}

// The forward's stages: the double-buffered plan only at 16-bit, where requested.
void check_kv_stages() {
  CHECK(fwd_kv_stages(1, 2) == 1 && fwd_kv_stages(2, 2) == 2 && fwd_kv_stages(2, 4) == 1 && fwd_kv_stages(0, 2) == 1,
        "fwd_kv_stages");
  using Single = FwdPlan<2, 64>;
  using Double = FwdPlan<2, 64, 2>;
  CHECK(Double::kSmem - Single::kSmem == 2 * Single::kN * tile_row_bytes(2, 64), "the second stage: one K, one V tile");
  // A program that reaches the loop has a key tile: key_end > its first row >= 0.
  for (int stages : {2, 3})
    for (int ntiles = 1; ntiles <= 9; ++ntiles) check_kv_pipeline(stages, ntiles);
}

// Out-of-range starts and lengths are clamped into the batch row and max_seqlen.
void check_clamping() {
  for (int start : {-5, 0, 3, 9, 10, 12})
    for (int len : {-1, 0, 4, 7, 20}) {
      const SeqRange r = clamp_seq(start, len, 10, 6);
      CHECK(r.start >= 0 && r.len >= 0 && r.start + r.len <= 10 && r.len <= 6, "clamp(%d, %d) -> (%d, %d)", start, len,
            r.start, r.len);
    }
}

}  // namespace

int main() {
  check_head_dims();
  check_grids();
  check_clamping();
  check_kv_stages();
  check_plan_limits<4, 32>();
  check_plan_limits<4, 64>();
  check_plan_limits<4, 128>();
  check_plan_limits<4, 256>();
  check_plan_limits<2, 32>();
  check_plan_limits<2, 64>();
  check_plan_limits<2, 128>();
  check_plan_limits<2, 256>();

  std::vector<int> lengths;
  for (int n = 1; n <= 139; ++n) lengths.push_back(n);
  for (int n : {255, 256, 257, 513}) lengths.push_back(n);
  // A packed tail longer than the grid's tiles: each program writes several padding blocks.
  const Layout long_tail{"packed long tail", 1, 500, 10, {4, 14}, {10, 5}};
  for (int rows : {32, 64}) check_padding(long_tail, 3, rows);
  for (int n : lengths)
    for (const Layout& layout : layouts(n)) {
      for (int rows : {32, 64}) check_padding(layout, 2, rows);  // the kernels' kM
    }
  for (int n : lengths)
    for (const Layout& layout : layouts(n))
      for (int causal = 0; causal < 2; ++causal)
        for (int dp : {32, 64, 128, 256}) {
          check_dtype_path<4>(Case{&layout, 2, 4, dp, causal != 0});
          check_dtype_path<2>(Case{&layout, 2, 2, dp, causal != 0});
        }
  return host_check::report("attention tiles");
}
