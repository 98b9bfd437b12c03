// Host checks of the softmax-loss kernels' tile schedules (csrc/cuda/softmax_loss.cu), from
// the plans and index expressions of csrc/cuda/tile_plan.h that the kernels use:
// - the tile engine (forward with and without split-N, backward rows and items kernels)
//   scores every (row, candidate) pair exactly once per output D chunk, each score summed
//   over every D chunk once, with the output chunk the last one in shared memory; every
//   output entry (loss / LSE / partial, d hidden, d weight) has one writer, and split
//   partials stay inside the forward scratch and the backward workspace; the full
//   softmax's target logit is found exactly once;
// - the warp-per-row kernels cover every (row, negative) and (slot, row) pair once;
// - shared memory within the A100 / H100 opt-in limits for every D in 1..1024 and dtype,
//   grids within CUDA's limits and int-typed counters without overflow for T, N up to 10^7.
// The loops mirror the kernels' (CTAs, pipeline stages, warps, lanes, fragment entries).
#include <cstdint>
#include <cstdio>
#include <initializer_list>
#include <vector>

#include "host_check.h"
#include "tile_plan.h"

using namespace seqrec::cuda;
using namespace seqrec::cuda::loss_plan;

namespace {

constexpr i64 kOptinA100 = 166912, kOptinH100 = 232448;  // per-block shared memory opt-in
constexpr i64 kMaxInt = 0x7fffffff;

const char* kind_name(int kind) { return kind == kFwd ? "forward" : kind == kBwdRows ? "d hidden" : "d weight"; }

struct Case {
  LossShape s;
  int es;
  char what[200];
};

Case make_case(LossShape s, int es, int kind, const EnginePlan& p) {
  Case c{s, es, {}};
  std::snprintf(c.what, sizeof c.what, "%s %s T=%lld N=%lld D=%lld K=%lld rpg=%lld es=%d splits=%d", kind_name(kind),
                s.sampled ? "sampled" : "full", (long long)s.T, (long long)s.N, (long long)s.D, (long long)s.K,
                (long long)s.rpg, es, p.splits);
  return c;
}

// The full softmax's target of row t (any id in [0, N)).
i64 target_of(const LossShape& s, i64 t) { return (t * 7919 + 3) % s.N; }

// engine_kernel<T, kind> under plan p: visits of (output chunk, row t, candidate) with the
// candidate an item (full) or negative slot of t's group (sampled), and its writes.
void check_engine(const Case& c, const EnginePlan& p, int kind, size_t workspace_floats) {
  const LossShape& s = c.s;
  const bool f32 = c.es == 4;
  const EngineGrid grid = engine_grid(p, kind);
  CHECK(engine_launchable(p, kind, kOptinA100), "%s: grid (%lld, %lld), %zu bytes of shared memory", c.what,
        (long long)grid.x, (long long)grid.y, p.smem);
  const int rows_x = 16 * p.warps;  // blockDim.x / 2
  const i64 C = s.sampled ? s.K : s.N;
  const int nout = kind == kFwd ? 1 : p.nchunks;
  std::vector<uint8_t> visits(static_cast<size_t>(nout) * s.T * C, 0), found(s.T, 0);
  // Output entries: forward [splits, T] (loss / LSE or partials), d hidden [splits, T, D],
  // d weight [splits, N or G * K, D].
  const i64 x_rows = kind == kBwdItems ? (s.sampled ? s.T / s.rpg * s.K : s.N) : s.T;
  // (Counted when they fit in memory; the visits above cover every case.)
  const size_t entries = static_cast<size_t>(p.splits) * x_rows * (kind == kFwd ? 1 : s.D);
  std::vector<uint8_t> writes(entries <= (size_t{1} << 26) ? entries : 0, 0);
  auto write = [&](size_t index) {
    if (!writes.empty()) ++writes[index];
  };
  const uint32_t all_chunks = p.nchunks >= 32 ? ~0u : (1u << p.nchunks) - 1;

  for (i64 bx = 0; bx < grid.x; ++bx)
    for (i64 by = 0; by < grid.y; ++by) {
      const EngineCta cta = engine_cta(p, s, kind, bx, by, rows_x);
      CHECK(cta.x_count >= 1 && cta.ybeg < cta.yend, "%s: CTA (%lld, %lld) has no work", c.what, (long long)bx,
            (long long)by);
      CHECK(cta.oc >= 0 && cta.oc < p.nchunks && cta.split >= 0 && cta.split < p.splits, "%s: CTA (%lld, %lld)", c.what,
            (long long)bx, (long long)by);
      const i64 row_base = group_first_row(s, cta.grp);
      uint32_t chunks = 0;
      int expected_step = 0;
      for (int st = 0; st < cta.nstages; ++st) {
        const Stage sg = stage_of(st, p.nchunks);
        const int chunk = stage_chunk(cta.oc, sg.step, p.nchunks);
        CHECK(sg.step == expected_step && chunk >= 0 && chunk < p.nchunks, "%s: stage %d", c.what, st);
        expected_step = (expected_step + 1) % p.nchunks;
        chunks |= 1u << chunk;
        if (sg.step != p.nchunks - 1) continue;
        // The tile's scores are complete: every chunk once; tile_accumulate reads the chunk in
        // shared memory, which must be the output chunk.
        CHECK(chunks == all_chunks && chunk == cta.oc, "%s: tile %d chunks %x, last %d, output %d", c.what, sg.tile,
              chunks, chunk, cta.oc);
        chunks = 0;
        const i64 first = tile_first_line(cta.ybeg, sg.tile);
        for (int warp = 0; warp < p.warps; ++warp) {
          const int r0 = 16 * warp;
          if (r0 >= cta.x_count) continue;  // inactive warp
          for (int lane = 0; lane < 32; ++lane) {
            const int g = lane >> 2, tig = lane & 3;
            for (int rr = 0; rr < 2; ++rr) {
              const int r = r0 + frag::score_row(g, rr);
              if (r >= cta.x_count) continue;  // an absent stationary line: zero rows, masked
              const i64 x = cta.x0 + r;
              // Full forward: the target's column relative to this lane, as the kernel finds it.
              const i64 target = kind == kFwd && !s.sampled ? target_of(s, row_base + x) : -1;
              const int target_col = target >= first && target < first + kTile
                                         ? static_cast<int>(target - first) - frag::score_col(0, tig, 0)
                                         : -1000;
              for (int j = 0; j < kTile / 8; ++j)
                for (int e = 0; e < 2; ++e) {
                  const i64 y = first + frag::score_col(j, tig, e);
                  if (y >= cta.yend) continue;  // an absent streamed line: +inf bias / zero coefficient
                  const i64 t = kind == kBwdItems ? row_base + y : row_base + x;
                  const i64 cand = kind == kBwdItems ? x : y;
                  ++visits[(static_cast<size_t>(kind == kFwd ? 0 : cta.oc) * s.T + t) * C + cand];
                  if (frag::score_col(j, 0, e) == target_col) ++found[t];
                }
            }
          }
        }
      }
      // Writes of the warp's lines: rows g, g + 8 below x_count.
      for (int warp = 0; warp < p.warps; ++warp) {
        const int r0 = 16 * warp;
        if (r0 >= cta.x_count) continue;
        for (int lane = 0; lane < 32; ++lane) {
          const int g = lane >> 2, tig = lane & 3;
          for (int rr = 0; rr < 2; ++rr) {
            const int r = r0 + frag::score_row(g, rr);
            if (r >= cta.x_count) continue;
            const i64 line =
                kind == kBwdItems ? (s.sampled ? cta.grp * s.K + cta.x0 + r : cta.x0 + r) : row_base + cta.x0 + r;
            if (kind == kFwd) {
              if (tig != 0) continue;  // lane tig == 0 writes the row
              if (p.splits > 1) {
                const i64 index = fwd_part_index(cta.split, s.T, line);
                CHECK(index >= 0 && static_cast<size_t>(index + 1) < forward_scratch_floats(p.splits, s.T) &&
                          index + 1 < 2 * p.splits * s.T,
                      "%s: partial %lld", c.what, (long long)index);
              }
              write(static_cast<size_t>(cta.split) * s.T + line);
              continue;
            }
            for (int j = 0; j < 8; ++j)
              for (int e = 0; e < 2; ++e) {
                const i64 d = static_cast<i64>(cta.oc) * kChunk + chunk_col(f32, j, e, tig);
                if (d >= s.D) continue;
                // Full, split: partials [splits, X rows, D] in the workspace after kScaleMaxWords.
                if (p.splits > 1) {
                  const i64 index = bwd_part_index(cta.split, x_rows, line, s.D, d);
                  CHECK(index >= 0 && static_cast<size_t>(index) + kScaleMaxWords < workspace_floats,
                        "%s: partial %lld of a %zu-float workspace", c.what, (long long)index, workspace_floats);
                }
                write((static_cast<size_t>(cta.split) * x_rows + line) * s.D + d);
              }
          }
        }
      }
    }

  long wrong = 0;
  for (uint8_t v : visits) wrong += v != 1;
  CHECK(wrong == 0, "%s: %ld (chunk, row, candidate) pairs not scored exactly once", c.what, wrong);
  if (kind == kFwd && !s.sampled) {
    wrong = 0;
    for (uint8_t v : found) wrong += v != 1;
    CHECK(wrong == 0, "%s: %ld rows whose target logit is not found exactly once", c.what, wrong);
  }
  wrong = 0;
  for (uint8_t v : writes) wrong += v != 1;
  CHECK(wrong == 0, "%s: %ld output entries without exactly one writer", c.what, wrong);
}

// Every plan the launchers make for a shape: forward unsplit (no memory pools) and split,
// backward as planned (full: split by the SM count: 108 as on an A100, or as many splits
// as the grid takes).
void check_shape(const LossShape& s, std::initializer_list<int> sm_counts = {108, 100000}) {
  for (int es : {4, 2}) {
    if (!uses_engine(s)) continue;
    for (int sms : sm_counts) {
      EnginePlan fwd = engine_plan(s, kFwd, es);
      if (sms == *sm_counts.begin()) check_engine(make_case(s, es, kFwd, fwd), fwd, kFwd, 0);
      split_stream(&fwd, s, kFwd, 2 * static_cast<i64>(sms), 2);
      if (fwd.splits > 1) check_engine(make_case(s, es, kFwd, fwd), fwd, kFwd, 0);
      if (s.sampled) {
        if (sms != *sm_counts.begin()) continue;
        const EnginePlan rows = engine_plan(s, kBwdRows, es), items = engine_plan(s, kBwdItems, es);
        check_engine(make_case(s, es, kBwdRows, rows), rows, kBwdRows, 0);
        check_engine(make_case(s, es, kBwdItems, items), items, kBwdItems, 0);
      } else {
        const FullBackwardPlan plan = full_backward_plan(s, es, sms);
        const size_t workspace = full_backward_workspace_floats(s, plan);
        check_engine(make_case(s, es, kBwdRows, plan.rows), plan.rows, kBwdRows, workspace);
        check_engine(make_case(s, es, kBwdItems, plan.items), plan.items, kBwdItems, workspace);
      }
    }
  }
}

// sampled_rows_forward / _backward: warp (threadIdx.x >> 5) of CTA bx takes row
// bx * kRowWarps + warp and walks the negatives in batches of batch_rows(VPL).
void check_row_kernels(const LossShape& s) {
  const int vpl = vpl_for_dim(s.D), B = batch_rows(vpl);
  CHECK(vpl * 32 >= s.D, "D=%lld: VPL %d", (long long)s.D, vpl);
  const i64 blocks = ceil_div(s.T, kRowWarps);
  CHECK(blocks <= kMaxGridX, "T=%lld: %lld row blocks", (long long)s.T, (long long)blocks);
  std::vector<uint8_t> visits(static_cast<size_t>(s.T) * s.K, 0);
  for (i64 bx = 0; bx < blocks; ++bx)
    for (int warp = 0; warp < kRowWarps; ++warp) {
      const i64 t = bx * kRowWarps + warp;
      if (t >= s.T) continue;
      for (i64 k = 0; k < s.K; k += B)
        for (int u = 0; u < B; ++u)
          if (k + u < s.K) ++visits[t * s.K + k + u];
    }
  long wrong = 0;
  for (uint8_t v : visits) wrong += v != 1;
  CHECK(wrong == 0, "row kernels T=%lld K=%lld D=%lld: %ld (row, negative) pairs not visited once", (long long)s.T,
        (long long)s.K, (long long)s.D, wrong);
}

// sampled_weight_grad_sorted: warp w of the item's CTA takes rows w * B + u, stepping by
// kRowWarps * B, of each slot (count = rpg rows for a negative, 1 for a positive).
void check_sorted_rows() {
  for (int vpl : {2, 4, 8, 32}) {
    const int B = batch_rows(vpl);
    CHECK(kRowWarps * vpl * 32 * sizeof(float) <= 48 * 1024, "VPL %d: static shared memory", vpl);
    for (i64 count : {1, 7, 15, 16, 17, 31, 32, 33, 100, 1000}) {
      std::vector<int> seen(count, 0);
      for (int warp = 0; warp < kRowWarps; ++warp)
        for (i64 r = static_cast<i64>(warp) * B; r < count; r += static_cast<i64>(kRowWarps) * B)
          for (int u = 0; u < B; ++u)
            if (r + u < count) ++seen[r + u];
      long wrong = 0;
      for (int v : seen) wrong += v != 1;
      CHECK(wrong == 0, "sorted d weight, B=%d, %lld rows: %ld rows not summed once", B, (long long)count, wrong);
    }
  }
}

// Shared memory of every engine plan within the opt-in limits, for D 1..1024 and both
// element sizes, with as many stationary lines as a CTA takes.
void check_smem_limits() {
  for (int es : {4, 2})
    for (i64 d = 1; d <= kMaxKernelHiddenDim; ++d)
      for (int kind : {kFwd, kBwdRows, kBwdItems})
        for (bool sampled : {false, true}) {
          const LossShape s{sampled ? 4096 : 100000, 100000, d, 4096, sampled ? 256 : 1, sampled};
          const EnginePlan p = engine_plan(s, kind, es);
          CHECK(p.warps >= 1 && p.warps <= kMaxWarps && static_cast<i64>(p.smem) <= kOptinA100 &&
                    static_cast<i64>(p.smem) <= kOptinH100,
                "%s es=%d D=%lld: %d warps, %zu bytes of shared memory", kind_name(kind), es, (long long)d, p.warps,
                p.smem);
          // The kernel's carve-up: X [rows_x, dpad + pad], Y [2, kTile, kChunk + pad], then
          // 16-byte lines: every part starts 16-byte aligned (cp.async, ldmatrix, Line).
          const size_t x_bytes = 16 * p.warps * static_cast<size_t>(p.dpad + smem_pad(es)) * es;
          const size_t y_bytes = 2 * kTile * static_cast<size_t>(kChunk + smem_pad(es)) * es;
          CHECK(x_bytes % 16 == 0 && y_bytes % 16 == 0 && p.dpad % kChunk == 0 && p.dpad >= d,
                "es=%d D=%lld: shared-memory carve-up", es, (long long)d);
        }
}

// Plans for large T and N: launchable, int-typed stage counts without overflow, and the
// partials within the workspace.
void check_large() {
  const LossShape shapes[] = {
      {10000000, 10000000, 64, 1, 1, false},
      {10000000, 10000000, 1024, 1, 1, false},
      {1, 10000000, 1024, 1, 1, false},
      {10000000, 1, 1024, 1, 1, false},
      {10000000, 10000000, 1, 1, 1, false},
      {64, 0xfffffffeLL, 1024, 1, 1, false},
      {10000000, 10000000, 256, 1000, 16, true},
      {10000000, 10000000, 1024, 100, 1000, true},
      {10000000, 10000000, 1024, 100000, 10000000, true},
  };
  for (const LossShape& s : shapes)
    for (int es : {4, 2})
      for (int sms : {108, 132}) {
        EnginePlan fwd = engine_plan(s, kFwd, es);
        split_stream(&fwd, s, kFwd, 2 * static_cast<i64>(sms), 2);
        EnginePlan rows = engine_plan(s, kBwdRows, es), items = engine_plan(s, kBwdItems, es);
        size_t workspace = 0;
        if (!s.sampled) {
          const FullBackwardPlan plan = full_backward_plan(s, es, sms);
          rows = plan.rows;
          items = plan.items;
          workspace = full_backward_workspace_floats(s, plan);
        }
        const EnginePlan* plans[] = {&fwd, &rows, &items};
        for (int kind : {kFwd, kBwdRows, kBwdItems}) {
          const EnginePlan& p = *plans[kind];
          const Case c = make_case(s, es, kind, p);
          const EngineGrid g = engine_grid(p, kind);
          CHECK(engine_launchable(p, kind, kOptinA100) && engine_launchable(p, kind, kOptinH100),
                "%s: grid (%lld, %lld), %zu bytes", c.what, (long long)g.x, (long long)g.y, p.smem);
          // The CTAs with the most stages (split 0) and the last stationary tile.
          const EngineCta first = engine_cta(p, s, kind, 0, 0, 16 * p.warps);
          const i64 stages = ceil_div(first.yend - first.ybeg, kTile) * p.nchunks;
          CHECK(stages <= kMaxInt && first.nstages == stages, "%s: %lld stages", c.what, (long long)stages);
          const EngineCta last = engine_cta(p, s, kind, g.x - 1, g.y - 1, 16 * p.warps);
          CHECK(last.x_count >= 1 && last.x_count <= 16 * p.warps && last.ybeg < last.yend, "%s: last CTA", c.what);
          if (kind == kFwd && p.splits > 1)
            CHECK(static_cast<size_t>(fwd_part_index(p.splits - 1, s.T, s.T - 1) + 1) <
                      forward_scratch_floats(p.splits, s.T),
                  "%s: forward scratch", c.what);
          if (kind != kFwd && !s.sampled && p.splits > 1) {
            const i64 x_rows = kind == kBwdRows ? s.T : s.N;
            const i64 largest = bwd_part_index(p.splits - 1, x_rows, x_rows - 1, s.D, s.D - 1);
            CHECK(static_cast<size_t>(largest) + kScaleMaxWords < workspace, "%s: partial %lld of %zu", c.what,
                  (long long)largest, workspace);
          }
        }
      }
}

}  // namespace

int main() {
  check_smem_limits();
  check_large();
  check_sorted_rows();
  const LossShape full[] = {
      {1, 1, 1, 1, 1, false},       {17, 63, 64, 1, 1, false},    {17, 5000, 65, 1, 1, false},
      {130, 700, 200, 1, 1, false}, {300, 2000, 50, 1, 1, false}, {700, 1500, 16, 1, 1, false},
      {129, 64, 1024, 1, 1, false},
  };
  for (const LossShape& s : full) check_shape(s);
  // More stream tiles than grid.y takes splits of: the split count stops at 65535 / 16 chunks.
  check_shape({2, 270000, 1024, 1, 1, false}, {100000});
  const LossShape sampled[] = {
      {16, 1000, 1, 1, 16, true},        {51, 1000, 50, 64, 17, true},      {66, 1000, 128, 100, 33, true},
      {800, 1000, 1024, 300, 200, true}, {1000, 1000, 64, 700, 1000, true}, {256, 1000, 300, 65, 128, true},
  };
  for (const LossShape& s : sampled) check_shape(s);
  const LossShape per_row[] = {
      {5, 100, 10, 7, 1, true},
      {45, 100, 300, 100, 15, true},
      {20, 100, 1024, 64, 2, true},
      {9, 100, 129, 1, 3, true},
  };
  for (const LossShape& s : per_row) {
    CHECK(!uses_engine(s), "rpg=%lld runs the warp-per-row kernels", (long long)s.rpg);
    check_row_kernels(s);
  }
  for (i64 d = 1; d <= kMaxKernelHiddenDim; ++d)
    CHECK(vpl_for_dim(d) * 32 >= d, "D=%lld: VPL %d", (long long)d, vpl_for_dim(d));
  return host_check::report("loss tiles");
}
