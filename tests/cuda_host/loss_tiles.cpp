// Host checks of the softmax-loss kernels' tile schedules (csrc/cuda/softmax_loss.cu), from
// the plans and index expressions of csrc/cuda/tile_plan.h that the kernels use:
// - the tile engine (forward with and without split-N, backward rows and items kernels,
//   the sampled d weight with split rows) scores every counted (row, candidate) pair
//   exactly once per output D chunk, each score summed over every D chunk once, with the
//   output chunk the last one in shared memory; every output entry (loss / LSE / partial,
//   d hidden, d weight) has one writer, ignored rows' zeros included, and split partials
//   stay inside the forward scratch and the backward workspace; the full softmax's target
//   logit is found exactly once;
// - the deterministic sampled d weight: the d weight kernel's partials [splits, G * K, D]
//   (every present (split, slot, D column) entry written exactly once, idle splits' zeros
//   included, absent negatives' at most once, all inside the workspace before the sort),
//   and sampled_weight_grad_partials's sum over each item's sorted slots, emulated on
//   integer values: each item's d weight the sum over its slots, written once;
// - ignored rows: compact_rows's order is a stable per-group partition (counted rows first),
//   and with 0%, 50%, 90% and 100% of the rows ignored the engine's work (whole tiles)
//   follows the counted rows (at 90%, at most 15% of the work with none ignored);
// - the warp-per-row kernels cover every (row, negative) and (slot, row) pair once;
// - shared memory within the A100 / H100 opt-in limits for every D in 1..1024 and dtype,
//   grids within CUDA's limits and int-typed counters without overflow for T, N up to 10^7.
// The loops mirror the kernels' (CTAs, pipeline stages, warps, lanes, fragment entries).
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
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

// Rows of the op: counted (1) or ignored (0), `ignored_pct` percent ignored at random.
std::vector<uint8_t> counted_rows(i64 T, int ignored_pct) {
  std::vector<uint8_t> counted(T);
  uint64_t state = 0x9e3779b97f4a7c15ull;
  for (i64 t = 0; t < T; ++t) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    counted[t] = static_cast<int>((state >> 33) % 100) >= ignored_pct;
  }
  return counted;
}

struct Compaction {
  std::vector<int32_t> order, count;  // [T], [G]
};

// compact_rows on the CPU: CTA g per group, its passes and threads, the block scan an
// exclusive sum in thread order. Checks that order is a permutation of each group's rows
// with its count[g] counted rows first, in row order.
Compaction compact_replay(const LossShape& s, const std::vector<uint8_t>& counted) {
  const i64 groups = s.sampled ? s.T / s.rpg : 1, rows = group_rows(s);
  const int threads = compact_threads(rows);
  const i64 pass = static_cast<i64>(threads) * kCompactRowsPerThread;
  Compaction c{std::vector<int32_t>(s.T, -1), std::vector<int32_t>(groups, 0)};
  std::vector<uint8_t> hits(s.T, 0);
  for (i64 g = 0; g < groups; ++g) {
    const i64 first = group_first_row(s, g);
    i64 n_counted = 0, n_ignored = 0;
    for (i64 c0 = 0; c0 < rows; c0 += pass) {
      i64 scan = 0;  // the exclusive sum of the threads' counted rows
      for (int tid = 0; tid < threads; ++tid) {
        int n = 0;
        for (int i = 0; i < kCompactRowsPerThread; ++i) {
          const i64 r = compact_row(c0, tid, i);
          n += r < rows && counted[first + r];
        }
        i64 ignored_before = imin(compact_row(0, tid, 0), rows - c0) - scan, counted_before = scan;
        for (int i = 0; i < kCompactRowsPerThread; ++i) {
          const i64 r = compact_row(c0, tid, i);
          if (r >= rows) continue;
          const i64 slot = counted[first + r] ? compact_slot(first, rows, true, n_counted + counted_before++)
                                              : compact_slot(first, rows, false, n_ignored + ignored_before++);
          CHECK(slot >= first && slot < first + rows, "compaction T=%lld rpg=%lld: slot %lld", (long long)s.T,
                (long long)s.rpg, (long long)slot);
          if (slot < first || slot >= first + rows) continue;
          ++hits[slot];
          c.order[slot] = static_cast<int32_t>(first + r);
        }
        scan += n;
      }
      n_counted += scan;
      n_ignored += imin(pass, rows - c0) - scan;
    }
    c.count[g] = static_cast<int32_t>(n_counted);
    long wrong = 0;
    for (i64 k = 0; k < rows; ++k) {
      const i64 t = c.order[first + k];
      const bool ok = hits[first + k] == 1 && t >= first && t < first + rows && counted[t] == (k < n_counted) &&
                      (k == 0 || k >= n_counted || t > c.order[first + k - 1]);
      wrong += !ok;
    }
    CHECK(wrong == 0, "compaction T=%lld rpg=%lld group %lld: %ld slots out of a stable partition", (long long)s.T,
          (long long)s.rpg, (long long)g, wrong);
  }
  return c;
}

struct Case {
  LossShape s;
  int es;
  char what[200];
};

Case make_case(LossShape s, int es, int kind, const EnginePlan& p, int ignored_pct = 0) {
  Case c{s, es, {}};
  std::snprintf(c.what, sizeof c.what, "%s %s T=%lld N=%lld D=%lld K=%lld rpg=%lld es=%d splits=%d ignored=%d%%",
                kind_name(kind), s.sampled ? "sampled" : "full", (long long)s.T, (long long)s.N, (long long)s.D,
                (long long)s.K, (long long)s.rpg, es, p.splits, ignored_pct);
  return c;
}

// The full softmax's target of row t (any id in [0, N)).
i64 target_of(const LossShape& s, i64 t) { return (t * 7919 + 3) % s.N; }

// The engine's work under plan p with the groups' counted rows `count`: score entries of
// the CTAs' pipeline stages (active warps' 16 lines x kTile), in whole tiles.
i64 engine_work(const LossShape& s, const EnginePlan& p, int kind, const std::vector<int32_t>& count) {
  const EngineGrid grid = engine_grid(p, kind);
  i64 work = 0;
  for (i64 bx = 0; bx < grid.x; ++bx)
    for (i64 by = 0; by < grid.y; ++by) {
      EngineCta cta = engine_cta(p, s, kind, bx, by, 16 * p.warps);
      cta = compacted_cta(cta, kind, count[cta.grp], p.nchunks);
      work += static_cast<i64>(cta.nstages) * ceil_div(cta.x_count, 16) * 16 * kTile;
    }
  return work;
}

// The deterministic sampled d weight's partials [splits, G * K, D] (sampled_part_floats),
// emulated: entry (split, slot, d) = (d + 1) * the sum of t + 1 over the rows t that the
// split's CTA scored against the slot; kUnwritten where no CTA wrote it.
constexpr i64 kUnwritten = INT64_MIN;
struct ItemPartials {
  std::vector<uint8_t> absent;  // [G * K] absent negatives (id outside [0, N): kNoItem)
  std::vector<i64> value;       // [splits, G * K, D]
};
// Negative slot idx of the host checks: absent for one slot in 7, else an item in [0, N).
bool absent_slot(i64 idx) { return idx % 7 == 3; }
i64 negative_of(const LossShape& s, i64 idx) { return absent_slot(idx) ? -1 : (idx * 104729 + 17) % s.N; }

// engine_kernel<T, kind> under plan p, with the rows `counted` compacted by compact_rows:
// visits of (output chunk, row t, candidate) with the candidate an item (full) or negative
// slot of t's group (sampled), and its writes. partials != null: the sampled d weight
// without atomics (deterministic), workspace_floats the partials' end in the workspace.
void check_engine(const Case& c, const EnginePlan& p, int kind, size_t workspace_floats,
                  const std::vector<uint8_t>& counted, ItemPartials* partials = nullptr) {
  const LossShape& s = c.s;
  const bool f32 = c.es == 4;
  const Compaction comp = compact_replay(s, counted);
  const EngineGrid grid = engine_grid(p, kind);
  CHECK(engine_launchable(p, kind, kOptinA100), "%s: grid (%lld, %lld), %zu bytes of shared memory", c.what,
        (long long)grid.x, (long long)grid.y, p.smem);
  const int rows_x = 16 * p.warps;  // blockDim.x / 2
  const i64 C = s.sampled ? s.K : s.N;
  const int nout = kind == kFwd ? 1 : p.nchunks;
  std::vector<uint8_t> visits(static_cast<size_t>(nout) * s.T * C, 0), found(s.T, 0);
  // Output entries: forward [splits, T] (loss / LSE or partials), d hidden [splits, T, D],
  // d weight [splits, N or G * K, D].
  const i64 x_rows = kind == kBwdItems ? items_rows(s, p) : s.T;
  CHECK(x_rows == (kind == kBwdItems ? (s.sampled ? s.T / s.rpg * s.K : s.N) : s.T), "%s: %lld X rows", c.what,
        (long long)x_rows);
  // (Counted when they fit in memory; the visits above cover every case.)
  const size_t entries = static_cast<size_t>(p.splits) * x_rows * (kind == kFwd ? 1 : s.D);
  std::vector<uint8_t> writes(entries <= (size_t{1} << 26) ? entries : 0, 0);
  auto write = [&](size_t index) {
    if (!writes.empty()) ++writes[index];
  };
  const uint32_t all_chunks = p.nchunks >= 32 ? ~0u : (1u << p.nchunks) - 1;
  // Backward partials in the workspace: full, or the deterministic sampled d weight's.
  const size_t part_offset = partials != nullptr ? sampled_part_offset(s) : full_backward_part_offset(s);
  if (partials != nullptr) {
    CHECK(kind == kBwdItems && s.sampled && workspace_floats == part_offset + sampled_part_floats(s, p), "%s: partials",
          c.what);
    partials->absent.assign(x_rows, 0);
    for (i64 idx = 0; idx < x_rows; ++idx) partials->absent[idx] = absent_slot(idx);
    partials->value.assign(static_cast<size_t>(p.splits) * x_rows * s.D, kUnwritten);
  }
  // A partial write at index of the [splits, x_rows, D] partials: inside the workspace.
  auto part_write = [&](i64 index, i64 value) {
    CHECK(index >= 0 && index < p.splits * x_rows * s.D && static_cast<size_t>(index) + part_offset < workspace_floats,
          "%s: partial %lld of a %zu-float workspace", c.what, (long long)index, workspace_floats);
    if (partials != nullptr && index >= 0 && index < p.splits * x_rows * s.D) partials->value[index] = value;
  };
  std::vector<i64> line_sum(rows_x);  // a CTA's sum of t + 1 over its scored rows, per line
  i64 work = 0;

  for (i64 bx = 0; bx < grid.x; ++bx)
    for (i64 by = 0; by < grid.y; ++by) {
      EngineCta cta = engine_cta(p, s, kind, bx, by, rows_x);
      CHECK(cta.x_count >= 1 && cta.ybeg < cta.yend, "%s: CTA (%lld, %lld) has no work", c.what, (long long)bx,
            (long long)by);
      CHECK(cta.oc >= 0 && cta.oc < p.nchunks && cta.split >= 0 && cta.split < p.splits, "%s: CTA (%lld, %lld)", c.what,
            (long long)bx, (long long)by);
      const i64 row_base = group_first_row(s, cta.grp);
      const int32_t* slot_row = comp.order.data() + row_base;  // the kernel's slot_row
      cta = compacted_cta(cta, kind, comp.count[cta.grp], p.nchunks);
      work += static_cast<i64>(cta.nstages) * ceil_div(cta.x_count, 16) * 16 * kTile;
      if (cta.nstages == 0) {  // the kernel's early exit: zero outputs only
        if (kind != kBwdItems)
          for (int r = 0; r < cta.x_count; ++r)
            CHECK(!counted[slot_row[cta.x0 + r]], "%s: idle CTA (%lld, %lld) holds counted row %d", c.what,
                  (long long)bx, (long long)by, slot_row[cta.x0 + r]);
        if (kind == kFwd) {
          if (p.splits == 1)
            for (int r = 0; r < cta.x_count; ++r) write(slot_row[cta.x0 + r]);
        } else if (kind == kBwdRows || !s.sampled || partials != nullptr) {  // (atomics: nothing)
          for (int u = 0; u < cta.x_count * kChunk; ++u) {
            const int r = u / kChunk;
            const i64 d = static_cast<i64>(cta.oc) * kChunk + (u - r * kChunk);
            if (d >= s.D) continue;
            const i64 line = kind == kBwdRows ? slot_row[cta.x0 + r] : items_line(s, cta.grp, cta.x0 + r);
            if (p.splits > 1 || partials != nullptr) part_write(bwd_part_index(cta.split, x_rows, line, s.D, d), 0);
            write((static_cast<size_t>(cta.split) * x_rows + line) * s.D + d);
          }
        }
        continue;
      }
      uint32_t chunks = 0;
      int expected_step = 0;
      std::fill(line_sum.begin(), line_sum.end(), 0);
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
              const i64 target = kind == kFwd && !s.sampled ? target_of(s, slot_row[x]) : -1;
              const int target_col = target >= first && target < first + kTile
                                         ? static_cast<int>(target - first) - frag::score_col(0, tig, 0)
                                         : -1000;
              for (int j = 0; j < kTile / 8; ++j)
                for (int e = 0; e < 2; ++e) {
                  const i64 y = first + frag::score_col(j, tig, e);
                  if (y >= cta.yend) continue;  // an absent streamed line: +inf bias / zero coefficient
                  const i64 t = kind == kBwdItems ? slot_row[y] : slot_row[x];
                  const i64 cand = kind == kBwdItems ? x : y;
                  ++visits[(static_cast<size_t>(kind == kFwd ? 0 : cta.oc) * s.T + t) * C + cand];
                  line_sum[r] += t + 1;
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
            const i64 line = kind == kBwdItems ? items_line(s, cta.grp, cta.x0 + r) : slot_row[cta.x0 + r];
            if (partials != nullptr && partials->absent[line]) continue;  // kNoItem: no d weight row
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
                // Full, split, or sampled deterministic: partials [splits, X rows, D] in the workspace.
                if ((p.splits > 1 && !s.sampled) || partials != nullptr)
                  part_write(bwd_part_index(cta.split, x_rows, line, s.D, d), line_sum[r] * (d + 1));
                write((static_cast<size_t>(cta.split) * x_rows + line) * s.D + d);
              }
          }
        }
      }
    }

  // Counted rows: every pair once. Ignored rows: at most once (in a tile with counted
  // rows, rows stationary), never in the streamed rows of the d weight.
  long wrong = 0;
  for (size_t i = 0; i < visits.size(); ++i) {
    const bool row_counted = counted[(i / C) % s.T];
    wrong += row_counted ? visits[i] != 1 : visits[i] > (kind == kBwdItems ? 0 : 1);
  }
  CHECK(wrong == 0, "%s: %ld (chunk, row, candidate) pairs not scored exactly once (at most once if ignored)", c.what,
        wrong);
  if (kind == kFwd && !s.sampled) {
    wrong = 0;
    for (i64 t = 0; t < s.T; ++t) wrong += counted[t] ? found[t] != 1 : found[t] > 1;
    CHECK(wrong == 0, "%s: %ld counted rows whose target logit is not found exactly once", c.what, wrong);
  }
  // Every entry once, but: split forward partials of ignored rows (combine_forward writes
  // their zeros, reading none), the sampled d weight by atomics (idle CTAs add nothing) and
  // the deterministic one's absent negatives (zeros from idle CTAs only, never read).
  wrong = 0;
  for (size_t i = 0; i < writes.size(); ++i) {
    const bool optional =
        (kind == kFwd && p.splits > 1 && !counted[i % s.T]) ||
        (kind == kBwdItems && s.sampled && (partials == nullptr || partials->absent[(i / s.D) % x_rows]));
    wrong += optional ? writes[i] > 1 : writes[i] != 1;
  }
  CHECK(wrong == 0, "%s: %ld output entries without exactly one writer", c.what, wrong);
  CHECK(work == engine_work(s, p, kind, comp.count), "%s: work %lld", c.what, (long long)work);
}

// sampled_weight_grad_partials after the deterministic d weight kernel (partials from
// check_engine): the slots sorted by key as sampled_slot_keys and the stable radix sort
// make them (row t's positive, or N when ignored; a negative slot's item, or N when
// absent), then warp (bx, w) owns the item at sorted position partial_sum_position(bx, w)
// if its run starts there and adds, per lane column, its slots in sorted order: a positive
// slot's row value, a negative slot's partials in split order. Each item's d weight must
// be the sum over its slots, written once; the partials read written and in the workspace.
void check_partial_sum(const Case& c, const EnginePlan& p, const std::vector<uint8_t>& counted,
                       const ItemPartials& partials) {
  const LossShape& s = c.s;
  const i64 num_slots = sort_slots(s), rows = items_rows(s, p);
  CHECK(num_slots == s.T + rows, "%s: %lld sort slots", c.what, (long long)num_slots);
  auto pos_value = [&](i64 t, i64 d) { return -(t + 1) * 1000003 * (d + 1); };  // row t's positive row
  std::vector<i64> key(num_slots), order(num_slots);
  for (i64 slot = 0; slot < num_slots; ++slot) {
    const i64 id = slot < s.T ? (counted[slot] ? target_of(s, slot) : -1) : negative_of(s, slot - s.T);
    key[slot] = id >= 0 && id < s.N ? id : s.N;
    order[slot] = slot;
  }
  std::stable_sort(order.begin(), order.end(), [&](i64 x, i64 y) { return key[x] < key[y]; });
  const int vpl = vpl_for_dim(s.D);
  std::vector<i64> dw(static_cast<size_t>(s.N) * s.D, 0), expected(dw.size(), 0);
  std::vector<uint8_t> dw_writes(dw.size(), 0);
  long unwritten = 0;
  for (i64 bx = 0; bx < partial_sum_blocks(num_slots); ++bx)
    for (int warp = 0; warp < kRowWarps; ++warp) {
      const i64 q0 = partial_sum_position(bx, warp);
      if (q0 >= num_slots) continue;
      const i64 item = key[order[q0]];
      if (item >= s.N || (q0 > 0 && key[order[q0 - 1]] == item)) continue;
      for (int lane = 0; lane < 32; ++lane)
        for (int i = 0; i < vpl; ++i) {
          const i64 d = static_cast<i64>(i) * 32 + lane;
          if (d >= s.D) continue;
          i64 acc = 0;
          for (i64 q = q0; q < num_slots && key[order[q]] == item; ++q) {
            const i64 slot = order[q];
            if (slot < s.T) {
              acc += pos_value(slot, d);
              continue;
            }
            CHECK(!partials.absent[slot - s.T], "%s: absent slot %lld summed", c.what, (long long)(slot - s.T));
            for (int sp = 0; sp < p.splits; ++sp) {
              const i64 index = bwd_part_index(sp, rows, slot - s.T, s.D, d);
              CHECK(
                  index >= 0 && index < p.splits * rows * s.D && static_cast<size_t>(index) < sampled_part_floats(s, p),
                  "%s: partial %lld read", c.what, (long long)index);
              const i64 v = partials.value[index];
              unwritten += v == kUnwritten;
              acc += v == kUnwritten ? 0 : v;
            }
          }
          dw[item * s.D + d] = acc;
          ++dw_writes[item * s.D + d];
        }
    }
  // The sum over each item's slots, from the definitions.
  for (i64 t = 0; t < s.T; ++t)
    if (counted[t])
      for (i64 d = 0; d < s.D; ++d) expected[target_of(s, t) * s.D + d] += pos_value(t, d);
  std::vector<i64> group_sum(s.T / s.rpg, 0);  // sum of t + 1 over each group's counted rows
  for (i64 t = 0; t < s.T; ++t) group_sum[t / s.rpg] += counted[t] ? t + 1 : 0;
  std::vector<uint8_t> has_slot(s.N, 0);
  for (i64 t = 0; t < s.T; ++t)
    if (counted[t]) has_slot[target_of(s, t)] = 1;
  for (i64 idx = 0; idx < rows; ++idx) {
    const i64 id = negative_of(s, idx);
    if (id < 0) continue;
    has_slot[id] = 1;
    for (i64 d = 0; d < s.D; ++d) expected[id * s.D + d] += group_sum[idx / s.K] * (d + 1);
  }
  long wrong = 0;
  for (size_t i = 0; i < dw.size(); ++i) wrong += dw_writes[i] != has_slot[i / s.D] || dw[i] != expected[i];
  CHECK(unwritten == 0 && wrong == 0, "%s: deterministic d weight: %ld unwritten partials read, %ld entries wrong",
        c.what, unwritten, wrong);
}

// The deterministic sampled d weight (partials, then their sum) under plan p, where its
// partials fit in memory.
void check_deterministic_weight(const LossShape& s, int es, const EnginePlan& p, int pct,
                                const std::vector<uint8_t>& counted) {
  if (static_cast<i64>(p.splits) * items_rows(s, p) * s.D > (i64{1} << 23)) return;
  ItemPartials partials;
  Case c = make_case(s, es, kBwdItems, p, pct);
  std::snprintf(c.what + std::strlen(c.what), sizeof c.what - std::strlen(c.what), " deterministic");
  check_engine(c, p, kBwdItems, sampled_part_offset(s) + sampled_part_floats(s, p), counted, &partials);
  check_partial_sum(c, p, counted, partials);
}

// Every plan the launchers make for a shape, with 0%, 50%, 90% and 100% of the rows
// ignored (float32: 0% and 90%, for time): forward unsplit (no memory pools) and split,
// backward as planned (split by the SM count: 108 as on an A100, or as many splits as the
// grid takes).
void check_shape(const LossShape& s, std::initializer_list<int> sm_counts = {108, 100000}) {
  if (!uses_engine(s)) return;
  for (int pct : {0, 50, 90, 100}) {
    const std::vector<uint8_t> counted = counted_rows(s.T, pct);
    for (int es : {4, 2})
      for (int sms : sm_counts) {
        if (es == 4 && (pct == 50 || pct == 100)) continue;
        const bool first_sms = sms == *sm_counts.begin();
        EnginePlan fwd = engine_plan(s, kFwd, es);
        if (first_sms) check_engine(make_case(s, es, kFwd, fwd, pct), fwd, kFwd, 0, counted);
        split_stream(&fwd, s, kFwd, 2 * static_cast<i64>(sms), 2);
        if (fwd.splits > 1) check_engine(make_case(s, es, kFwd, fwd, pct), fwd, kFwd, 0, counted);
        if (s.sampled) {
          const EnginePlan rows = engine_plan(s, kBwdRows, es), items = sampled_weight_plan(s, es, sms);
          if (first_sms) check_engine(make_case(s, es, kBwdRows, rows, pct), rows, kBwdRows, 0, counted);
          check_engine(make_case(s, es, kBwdItems, items, pct), items, kBwdItems, 0, counted);
          check_deterministic_weight(s, es, items, pct, counted);
        } else {
          const FullBackwardPlan plan = full_backward_plan(s, es, sms);
          const size_t workspace = full_backward_workspace_floats(s, plan);
          check_engine(make_case(s, es, kBwdRows, plan.rows, pct), plan.rows, kBwdRows, workspace, counted);
          check_engine(make_case(s, es, kBwdItems, plan.items, pct), plan.items, kBwdItems, workspace, counted);
        }
      }
  }
}

// The sampled d weight with shared negatives at T = 65536, K = 8192, D = 64 on 132 SMs
// (H100): its rows split to >= 2 CTAs per SM, each (slot, row) pair in one CTA per output
// chunk (CTA-level: the splits' row ranges tile the group's rows).
void check_sampled_weight_split() {
  const LossShape s{65536, 1000000, 64, 8192, 65536, true};
  for (int es : {4, 2}) {
    const EnginePlan p = sampled_weight_plan(s, es, 132);
    const EngineGrid g = engine_grid(p, kBwdItems);
    CHECK(engine_launchable(p, kBwdItems, kOptinH100) && g.x * g.y >= 2 * 132 && p.splits >= 2,
          "sampled d weight es=%d: grid (%lld, %lld), %d splits", es, (long long)g.x, (long long)g.y, p.splits);
    for (i64 bx = 0; bx < g.x; ++bx)
      for (int oc = 0; oc < p.nchunks; ++oc) {
        i64 next = 0;  // rows covered so far
        for (int split = 0; split < p.splits; ++split) {
          const EngineCta c = engine_cta(p, s, kBwdItems, bx, static_cast<i64>(split) * p.nchunks + oc, 16 * p.warps);
          CHECK(c.ybeg == next && c.yend > c.ybeg && c.oc == oc, "sampled d weight es=%d: CTA (%lld, %d)", es,
                (long long)bx, split);
          next = c.yend;
        }
        CHECK(next == s.rpg, "sampled d weight es=%d: rows up to %lld", es, (long long)next);
      }
    // Deterministic: the partials [splits, G * K, D] after the row order, before the sort.
    const size_t floats = sampled_part_floats(s, p);
    std::printf(
        "deterministic sampled d weight T=%lld K=%lld D=%lld es=%d, 132 SMs: %d splits, partials at word %zu, "
        "%zu floats (%.1f MB)\n",
        (long long)s.T, (long long)s.K, (long long)s.D, es, p.splits, sampled_part_offset(s), floats,
        floats * 4.0 / 1e6);
    CHECK(static_cast<size_t>(bwd_part_index(p.splits - 1, s.K, s.K - 1, s.D, s.D - 1)) < floats &&
              floats == static_cast<size_t>(p.splits) * s.K * s.D && uses_partials(s, p),
          "sampled d weight es=%d: %zu partial floats", es, floats);
    // Many groups of many negatives (4,096 lists of 1,024, 1 GB of partials): no partials.
    const LossShape many{65536, 1000000, 64, 1024, 16, true};
    CHECK(!uses_partials(many, sampled_weight_plan(many, es, 132)), "sampled d weight es=%d: 1 GB of partials", es);
  }
  // The same plan at a size whose (chunk, slot, row) visits fit in memory.
  const LossShape small{4096, 5000, 64, 1024, 4096, true};
  for (int es : {4, 2}) {
    const EnginePlan p = sampled_weight_plan(small, es, 132);
    CHECK(p.splits >= 2, "sampled d weight T=4096 es=%d: %d splits", es, p.splits);
    for (int pct : {0, 90, 100}) {
      const std::vector<uint8_t> counted = counted_rows(small.T, pct);
      if (pct != 100) check_engine(make_case(small, es, kBwdItems, p, pct), p, kBwdItems, 0, counted);
      check_deterministic_weight(small, es, p, pct, counted);
    }
  }
}

// Work at 0% / 90% / 100% ignored rows for the large SASRec-like shapes (132 SMs): none at
// 100%, at 90% at most 15% of the work at 0% in every kernel. Prints the ratios.
void check_ignored_work() {
  const LossShape shapes[] = {
      {65536, 1000000, 64, 8192, 65536, true},  // shared negatives
      {65536, 1000000, 64, 1024, 256, true},    // a list per sequence of 256 rows
      {65536, 50000, 64, 1, 1, false},          // full softmax
  };
  for (const LossShape& s : shapes)
    for (int es : {4, 2}) {
      EnginePlan plans[3] = {engine_plan(s, kFwd, es), engine_plan(s, kBwdRows, es), engine_plan(s, kBwdItems, es)};
      split_stream(&plans[kFwd], s, kFwd, 2 * 132, 2);
      if (s.sampled) {
        plans[kBwdItems] = sampled_weight_plan(s, es, 132);
      } else {
        const FullBackwardPlan full = full_backward_plan(s, es, 132);
        plans[kBwdRows] = full.rows;
        plans[kBwdItems] = full.items;
      }
      for (int kind : {kFwd, kBwdRows, kBwdItems}) {
        i64 work[3];
        const int pcts[3] = {0, 90, 100};
        for (int i = 0; i < 3; ++i)
          work[i] = engine_work(s, plans[kind], kind, compact_replay(s, counted_rows(s.T, pcts[i])).count);
        const double ratio = static_cast<double>(work[1]) / static_cast<double>(work[0]);
        std::printf("ignored rows %s %s rpg=%lld es=%d: work at 90%% = %.3f of 0%%\n", kind_name(kind),
                    s.sampled ? "sampled" : "full", (long long)s.rpg, es, ratio);
        // Work comes in whole tiles: 10% of a group of 256 rows still takes one of its 2
        // stationary tiles (128 lines), or one of its 4 streamed tiles (64 rows).
        const double bound = s.rpg == 256 ? (kind != kBwdItems ? 0.5 : 0.25) : 0.15;
        CHECK(work[2] == 0 && ratio <= bound, "%s rpg=%lld es=%d: work %lld / %lld / %lld at 0/90/100%% ignored",
              kind_name(kind), (long long)s.rpg, es, (long long)work[0], (long long)work[1], (long long)work[2]);
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
        EnginePlan rows = engine_plan(s, kBwdRows, es),
                   items = s.sampled ? sampled_weight_plan(s, es, sms) : engine_plan(s, kBwdItems, es);
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
          // Deterministic sampled d weight: the partials' last entry inside them; split only
          // when under 2 CTAs per SM, then under 2 * 2 * sms * 128 * kChunk floats.
          if (kind == kBwdItems && s.sampled) {
            const i64 rows = items_rows(s, p), largest = bwd_part_index(p.splits - 1, rows, rows - 1, s.D, s.D - 1);
            const size_t floats = sampled_part_floats(s, p);
            CHECK(rows == s.T / s.rpg * s.K && static_cast<size_t>(largest) < floats &&
                      (p.splits == 1 || floats <= align_words(4 * static_cast<size_t>(sms) * 128 * kChunk)),
                  "%s: deterministic partial %lld of %zu", c.what, (long long)largest, floats);
          }
          if (kind != kFwd && !s.sampled && p.splits > 1) {
            const i64 x_rows = kind == kBwdRows ? s.T : s.N;
            const i64 largest = bwd_part_index(p.splits - 1, x_rows, x_rows - 1, s.D, s.D - 1);
            CHECK(static_cast<size_t>(largest) + full_backward_part_offset(s) < workspace, "%s: partial %lld of %zu",
                  c.what, (long long)largest, workspace);
          }
        }
      }
}

}  // namespace

int main() {
  check_smem_limits();
  check_large();
  check_sorted_rows();
  check_sampled_weight_split();
  check_ignored_work();
  // Compaction passes (a warp or 1024 threads): groups within one pass, across passes, ragged.
  for (const LossShape& s : {LossShape{20000, 10, 8, 4, 20000, true}, LossShape{20000, 10, 8, 1, 1, false},
                             LossShape{8192 * 3, 10, 8, 4, 8192, true}, LossShape{4000, 10, 8, 4, 16, true},
                             LossShape{3000, 10, 8, 4, 1000, true}, LossShape{4100, 10, 8, 4, 1025, true}})
    for (int pct : {0, 50, 90, 100}) compact_replay(s, counted_rows(s.T, pct));
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
