// Host checks of the kernels' warp-level tile products (tile_scores, tile_accumulate in
// csrc/cuda/attention.cu and softmax_loss.cu): which element of X, Y, P each lane holds.
// ldmatrix .x4 (.trans) and mma.sync m16n8k16 are emulated as the PTX ISA defines their
// fragments; the addresses come from tile_plan.h's frag:: helpers and the column maps from
// its acc_col / chunk_col, exactly as the kernels compute them. Checked against X Y^T and
// P V for every padded head dim of the attention (its kN tiles) and the loss engine's
// [16, 64] tiles, float32 (FFMA; 3xTF32 mma.sync m16n8k8 scores) and 16-bit (mma) paths:
// - scores: s[j][2h + e] == (X Y^T)[score_row(g, h), score_col(j, tig, e)];
// - products: acc[j][2h + e] == (P V)[score_row(g, h), acc_col(j, e, tig)];
// - ldmatrix row addresses 16-byte aligned and conflict-free (8 rows of a matrix in 8
//   distinct 16-byte bank groups), float4 loads 16-byte aligned.
// What the kernels write around these calls (which register feeds which mma, the float4
// lanes .x-.w into acc[2q][0..1], acc[2q + 1][0..1]) is mirrored in the loops below.
#include <array>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "host_check.h"
#include "tile_plan.h"

using namespace seqrec::cuda;

namespace {

// A 32-bit register of two 16-bit values: lo holds the lower column (or k).
struct Pair {
  float lo, hi;
};

// A shared-memory tile of small integers (exact in float16 and float32), row stride ld.
struct Tile {
  int rows, cols, ld;
  std::vector<float> v;
  Tile(int r, int c, int l, int seed) : rows(r), cols(c), ld(l), v(static_cast<size_t>(r) * l, 0.f) {
    for (int i = 0; i < r; ++i)
      for (int k = 0; k < c; ++k) v[i * l + k] = static_cast<float>((i * 7 + k * 3 + seed) % 9 - 4);
  }
  float at(int offset) const { return v.at(offset); }
};

// ldmatrix.sync.aligned.m8n8.x4(.trans).shared.b16: lane l supplies the address (element
// offset) of row l % 8 of matrix l / 8; register i of lane l receives matrix i's row l / 4,
// columns 2 (l % 4) and + 1, or with .trans its column l / 4, rows 2 (l % 4) and + 1.
void ldmatrix_x4(const Tile& t, const int (&addr)[32], bool trans, int es, Pair (&r)[32][4], const char* what) {
  for (int m = 0; m < 4; ++m) {
    bool group_used[8] = {};
    for (int row = 0; row < 8; ++row) {
      const long bytes = static_cast<long>(addr[8 * m + row]) * es;
      CHECK(bytes % 16 == 0, "%s: ldmatrix row address %ld bytes is not 16-byte aligned", what, bytes);
      const int group = static_cast<int>((bytes / 16) % 8);
      CHECK(!group_used[group], "%s: ldmatrix matrix %d has a bank conflict", what, m);
      group_used[group] = true;
    }
  }
  for (int lane = 0; lane < 32; ++lane)
    for (int m = 0; m < 4; ++m) {
      const int g = lane >> 2, c = 2 * (lane & 3);
      if (!trans) {
        r[lane][m] = {t.at(addr[8 * m + g] + c), t.at(addr[8 * m + g] + c + 1)};
      } else {
        r[lane][m] = {t.at(addr[8 * m + c] + g), t.at(addr[8 * m + c + 1] + g)};
      }
    }
}

// mma.sync.aligned.m16n8k16.row.col.f32: lane (g, tig) holds A (16x16) rows g, g + 8 at
// k 2 tig, 2 tig + 1 (a[0]: row g, a[1]: row g + 8) and k + 8 (a[2], a[3]); B (16x8) at
// k 2 tig, 2 tig + 1 (b0) and + 8 (b1), column g; C (16x8) rows g (c[0..1]) and g + 8
// (c[2..3]), columns 2 tig, 2 tig + 1.
void mma_16816(float (&c)[32][4], const Pair (&a)[32][4], const Pair (&b)[32][2]) {
  float A[16][16], B[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, k = 2 * (lane & 3);
    for (int i = 0; i < 4; ++i) {
      const int row = g + 8 * (i & 1), col = k + 8 * (i >> 1);
      A[row][col] = a[lane][i].lo;
      A[row][col + 1] = a[lane][i].hi;
    }
    for (int i = 0; i < 2; ++i) {
      B[k + 8 * i][g] = b[lane][i].lo;
      B[k + 8 * i + 1][g] = b[lane][i].hi;
    }
  }
  for (int lane = 0; lane < 32; ++lane)
    for (int i = 0; i < 4; ++i) {
      const int row = (lane >> 2) + 8 * (i >> 1), col = 2 * (lane & 3) + (i & 1);
      float sum = 0.f;
      for (int k = 0; k < 16; ++k) sum += A[row][k] * B[k][col];
      c[lane][i] += sum;
    }
}

// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32: lane (g, tig) holds A (16x8) rows g
// (a[0], a[2]) and g + 8 (a[1], a[3]) at k tig (a[0], a[1]) and tig + 4 (a[2], a[3]); B
// (8x8) at k tig (b0) and tig + 4 (b1), column g; C as m16n8k16's. One element per register.
void mma_1688(float (&c)[32][4], const float (&a)[32][4], const float (&b)[32][2]) {
  float A[16][8], B[8][8];
  int held_a[16][8] = {}, held_b[8][8] = {};
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, tig = lane & 3;
    for (int i = 0; i < 4; ++i) {
      A[g + 8 * (i & 1)][tig + 4 * (i >> 1)] = a[lane][i];
      ++held_a[g + 8 * (i & 1)][tig + 4 * (i >> 1)];
    }
    for (int i = 0; i < 2; ++i) {
      B[tig + 4 * i][g] = b[lane][i];
      ++held_b[tig + 4 * i][g];
    }
  }
  for (int r = 0; r < 16; ++r)
    for (int k = 0; k < 8; ++k) CHECK(held_a[r][k] == 1 && (r >= 8 || held_b[r][k] == 1), "m16n8k8 fragment holes");
  for (int lane = 0; lane < 32; ++lane)
    for (int i = 0; i < 4; ++i) {
      const int row = (lane >> 2) + 8 * (i >> 1), col = 2 * (lane & 3) + (i & 1);
      float sum = 0.f;
      for (int k = 0; k < 8; ++k) sum += A[row][k] * B[k][col];
      c[lane][i] += sum;
    }
}

// cvt.rna.tf32.f32: x rounded to 10 mantissa bits, ties away from zero (finite x).
float round_tf32(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  bits = (bits + 0x1000u) & 0xffffe000u;
  std::memcpy(&x, &bits, 4);
  return x;
}

// The 32 lanes' 4-byte shared loads of one instruction at word offsets `addr`: 32 banks.
void check_banks(const int (&addr)[32], const char* what) {
  bool used[32] = {};
  for (int lane = 0; lane < 32; ++lane) {
    const int bank = addr[lane] % 32;
    CHECK(!used[bank], "%s: 3xTF32 operand load has a bank conflict (bank %d)", what, bank);
    used[bank] = true;
  }
}

// Registers of a warp: acc[lane][j][i] for NT n tiles.
using Acc = std::vector<std::vector<std::array<float, 4>>>;
Acc zeros(int tiles) { return Acc(32, std::vector<std::array<float, 4>>(tiles, {0.f, 0.f, 0.f, 0.f})); }

// tile_scores: s[16, 8 NK] = x[16, K] y[8 NK, K]^T, x and y starting at element offsets.
// tf32x3 (float32 under "high"): each operand split into TF32 big + small, three mma.sync
// m16n8k8 per k step and n tile, small terms first (common.cuh's warp_scores).
Acc scores(const Tile& x, int x0, const Tile& y, int y0, int K, int NK, bool f32, bool tf32x3, const char* what) {
  Acc s = zeros(NK);
  if (tf32x3) {
    for (int k = 0; k < K; k += 8) {
      float a_big[32][4], a_small[32][4];
      for (int i = 0; i < 4; ++i) {
        int addr[32];
        for (int lane = 0; lane < 32; ++lane) {
          const int g = lane >> 2, tig = lane & 3;
          addr[lane] = x0 + frag::tf32_a_row(g, i) * x.ld + k + frag::tf32_a_col(tig, i);
          a_big[lane][i] = round_tf32(x.at(addr[lane]));
          a_small[lane][i] = round_tf32(x.at(addr[lane]) - a_big[lane][i]);
        }
        check_banks(addr, what);
      }
      for (int j = 0; j < NK; ++j) {
        float b_big[32][2], b_small[32][2], c[32][4];
        for (int i = 0; i < 2; ++i) {
          int addr[32];
          for (int lane = 0; lane < 32; ++lane) {
            const int g = lane >> 2, tig = lane & 3;
            addr[lane] = y0 + (8 * j + g) * y.ld + k + frag::tf32_b_k(tig, i);
            b_big[lane][i] = round_tf32(y.at(addr[lane]));
            b_small[lane][i] = round_tf32(y.at(addr[lane]) - b_big[lane][i]);
          }
          check_banks(addr, what);
        }
        for (int lane = 0; lane < 32; ++lane)
          for (int i = 0; i < 4; ++i) c[lane][i] = s[lane][j][i];
        mma_1688(c, a_small, b_big);
        mma_1688(c, a_big, b_small);
        mma_1688(c, a_big, b_big);
        for (int lane = 0; lane < 32; ++lane)
          for (int i = 0; i < 4; ++i) s[lane][j][i] = c[lane][i];
      }
    }
    return s;
  }
  if (f32) {  // FFMA: rows score_row(g, h) of x, score_col(j, tig, e) of y, float4 at a time
    for (int lane = 0; lane < 32; ++lane) {
      const int g = lane >> 2, tig = lane & 3;
      for (int k = 0; k < K; k += 4)
        for (int j = 0; j < NK; ++j)
          for (int e = 0; e < 2; ++e)
            for (int h = 0; h < 2; ++h) {
              const int xo = x0 + frag::score_row(g, h) * x.ld + k, yo = y0 + frag::score_col(j, tig, e) * y.ld + k;
              CHECK(xo % 4 == 0 && yo % 4 == 0, "%s: float4 load not 16-byte aligned", what);
              for (int u = 0; u < 4; ++u) s[lane][j][2 * h + e] += x.at(xo + u) * y.at(yo + u);
            }
    }
    return s;
  }
  for (int kk = 0; kk < K / 16; ++kk) {
    int addr[32];
    for (int lane = 0; lane < 32; ++lane)
      addr[lane] = x0 + frag::ldsm_a_row(lane) * x.ld + kk * 16 + frag::ldsm_a_col(lane);
    Pair af[32][4];
    ldmatrix_x4(x, addr, false, 2, af, what);
    for (int jp = 0; jp < NK / 2; ++jp) {
      for (int lane = 0; lane < 32; ++lane)
        addr[lane] = y0 + (16 * jp + frag::ldsm_b_row(lane)) * y.ld + kk * 16 + frag::ldsm_b_col(lane);
      Pair bf[32][4];
      ldmatrix_x4(y, addr, false, 2, bf, what);
      for (int half = 0; half < 2; ++half) {  // n tile 2 jp + half: registers bf[2 half], bf[2 half + 1]
        Pair b[32][2];
        float c[32][4];
        for (int lane = 0; lane < 32; ++lane) {
          b[lane][0] = bf[lane][2 * half];
          b[lane][1] = bf[lane][2 * half + 1];
          for (int i = 0; i < 4; ++i) c[lane][i] = s[lane][2 * jp + half][i];
        }
        mma_16816(c, af, b);
        for (int lane = 0; lane < 32; ++lane)
          for (int i = 0; i < 4; ++i) s[lane][2 * jp + half][i] = c[lane][i];
      }
    }
  }
  return s;
}

// tile_accumulate: acc[16, W] += p[16, 8 NK] y[8 NK, W] (y at element offset y0), with
// acc_col the kernel's column map (attention acc_col or the loss engine's chunk_col).
template <typename AccCol>
Acc accumulate(const Acc& p, const Tile& y, int y0, int W, int NK, bool f32, AccCol acc_col, const char* what) {
  Acc acc = zeros(W / 8);
  if (f32) {
    for (int lane = 0; lane < 32; ++lane) {
      const int tig = lane & 3;
      for (int c = 0; c < 8 * NK; ++c) {  // column c of p from lane col_lane (a shuffle)
        const int src = frag::col_lane(lane, c);
        const float p0 = p[src][frag::col_tile(c)][frag::col_entry(c)];
        const float p1 = p[src][frag::col_tile(c)][2 + frag::col_entry(c)];
        for (int q = 0; q < W / 16; ++q) {
          const int yo = y0 + c * y.ld + acc_col(true, 2 * q, 0, tig);
          CHECK(yo % 4 == 0, "%s: float4 load not 16-byte aligned", what);
          const float yv[4] = {y.at(yo), y.at(yo + 1), y.at(yo + 2), y.at(yo + 3)};
          acc[lane][2 * q][0] += p0 * yv[0];
          acc[lane][2 * q][1] += p0 * yv[1];
          acc[lane][2 * q + 1][0] += p0 * yv[2];
          acc[lane][2 * q + 1][1] += p0 * yv[3];
          acc[lane][2 * q][2] += p1 * yv[0];
          acc[lane][2 * q][3] += p1 * yv[1];
          acc[lane][2 * q + 1][2] += p1 * yv[2];
          acc[lane][2 * q + 1][3] += p1 * yv[3];
        }
      }
    }
    return acc;
  }
  for (int kk = 0; kk < NK / 2; ++kk) {
    Pair af[32][4];  // the accumulator layout of n tiles 2 kk, 2 kk + 1 as one A fragment
    for (int lane = 0; lane < 32; ++lane) {
      af[lane][0] = {p[lane][2 * kk][0], p[lane][2 * kk][1]};
      af[lane][1] = {p[lane][2 * kk][2], p[lane][2 * kk][3]};
      af[lane][2] = {p[lane][2 * kk + 1][0], p[lane][2 * kk + 1][1]};
      af[lane][3] = {p[lane][2 * kk + 1][2], p[lane][2 * kk + 1][3]};
    }
    for (int jp = 0; jp < W / 16; ++jp) {
      int addr[32];
      for (int lane = 0; lane < 32; ++lane)
        addr[lane] = y0 + (kk * 16 + frag::ldsm_a_row(lane)) * y.ld + 16 * jp + frag::ldsm_a_col(lane);
      Pair bf[32][4];
      ldmatrix_x4(y, addr, true, 2, bf, what);
      for (int half = 0; half < 2; ++half) {
        Pair b[32][2];
        float c[32][4];
        for (int lane = 0; lane < 32; ++lane) {
          b[lane][0] = bf[lane][2 * half];
          b[lane][1] = bf[lane][2 * half + 1];
          for (int i = 0; i < 4; ++i) c[lane][i] = acc[lane][2 * jp + half][i];
        }
        mma_16816(c, af, b);
        for (int lane = 0; lane < 32; ++lane)
          for (int i = 0; i < 4; ++i) acc[lane][2 * jp + half][i] = c[lane][i];
      }
    }
  }
  return acc;
}

// One warp's scores and product against the plain matrix products. x: the warp's 16
// stationary rows, K columns; y: 8 NK streamed rows, K columns; v: the same streamed rows
// with W output columns (the attention's V, or the loss engine's output chunk of Y).
template <typename AccCol>
void check_products(const Tile& x, int x0, const Tile& y, int y0, const Tile& v, int v0, int K, int NK, int W, bool f32,
                    bool tf32x3, AccCol acc_col, const char* what) {
  const Acc s = scores(x, x0, y, y0, K, NK, f32, tf32x3, what);
  std::vector<std::vector<float>> S(16, std::vector<float>(8 * NK, 0.f));  // the scores, from the kernel's layout
  long wrong = 0;
  for (int lane = 0; lane < 32; ++lane)
    for (int j = 0; j < NK; ++j)
      for (int h = 0; h < 2; ++h)
        for (int e = 0; e < 2; ++e) {
          const int row = frag::score_row(lane >> 2, h), col = frag::score_col(j, lane & 3, e);
          float expected = 0.f;
          for (int k = 0; k < K; ++k) expected += x.at(x0 + row * x.ld + k) * y.at(y0 + col * y.ld + k);
          wrong += s[lane][j][2 * h + e] != expected;
          S[row][col] = s[lane][j][2 * h + e];
        }
  CHECK(wrong == 0, "%s: %ld scores differ from X Y^T", what, wrong);
  const Acc acc = accumulate(s, v, v0, W, NK, f32, acc_col, what);
  wrong = 0;
  std::vector<int> covered(16 * W, 0);
  for (int lane = 0; lane < 32; ++lane)
    for (int j = 0; j < W / 8; ++j)
      for (int h = 0; h < 2; ++h)
        for (int e = 0; e < 2; ++e) {
          const int row = frag::score_row(lane >> 2, h), col = acc_col(f32, j, e, lane & 3);
          float expected = 0.f;
          for (int c = 0; c < 8 * NK; ++c) expected += S[row][c] * v.at(v0 + c * v.ld + col);
          wrong += acc[lane][j][2 * h + e] != expected;
          ++covered[row * W + col];
        }
  CHECK(wrong == 0, "%s: %ld product entries differ from P V", what, wrong);
  for (int i = 0; i < 16 * W; ++i) CHECK(covered[i] == 1, "%s: product entry %d held %d times", what, i, covered[i]);
}

// Attention: Q/K/V tiles [rows, DP] with row stride tile_ld; a warp's 16 rows start at
// row 16 warp (the last warp, to catch offset slips); kN streamed rows.
template <int ES, int DP, int KN, int KM>
void check_attention(const char* kernel) {
  using namespace attn_plan;
  constexpr int ld = tile_ld(ES, DP);
  char what[96];
  std::snprintf(what, sizeof what, "attention %s es=%d DP=%d kN=%d", kernel, ES, DP, KN);
  const Tile x(KM, DP, ld, 1), y(KN, DP, ld, 2), v(KN, DP, ld, 3);
  const int x0 = (KM - 16) * ld;
  check_products(x, x0, y, 0, v, 0, DP, KN / 8, DP, ES == 4, false, attn_plan::acc_col, what);
  if (ES == 4)  // and the 3xTF32 scores of "high"
    check_products(x, x0, y, 0, v, 0, DP, KN / 8, DP, true, true, attn_plan::acc_col, what);
}

template <int ES, int DP>
void check_attention_dp() {
  using namespace attn_plan;
  check_attention<ES, DP, FwdPlan<ES, DP>::kN, FwdPlan<ES, DP>::kM>("forward");
  check_attention<ES, DP, BwdPlan<ES, DP>::kN, BwdPlan<ES, DP>::kM>("backward");
}

// Loss engine: X [rows_x, dpad + pad] scored chunk by chunk (columns chunk * kChunk..),
// against a stage Y [kTile, kChunk + pad]; the product's output chunk is the stage's.
void check_loss(int es, int dpad, int warps) {
  using namespace loss_plan;
  const int xld = dpad + smem_pad(es), yld = kChunk + smem_pad(es);
  const Tile x(16 * warps, dpad, xld, 4), y(kTile, kChunk, yld, 5);
  for (int chunk = 0; chunk < dpad / kChunk; ++chunk) {
    char what[96];
    std::snprintf(what, sizeof what, "loss es=%d dpad=%d warps=%d chunk=%d", es, dpad, warps, chunk);
    const int x0 = 16 * (warps - 1) * xld + chunk * kChunk;
    check_products(x, x0, y, 0, y, 0, kChunk, kTile / 8, kChunk, es == 4, false, loss_plan::chunk_col, what);
    if (es == 4) check_products(x, x0, y, 0, y, 0, kChunk, kTile / 8, kChunk, true, true, loss_plan::chunk_col, what);
  }
}

}  // namespace

int main() {
  check_attention_dp<4, 32>();
  check_attention_dp<4, 64>();
  check_attention_dp<4, 128>();
  check_attention_dp<4, 256>();
  check_attention_dp<2, 32>();
  check_attention_dp<2, 64>();
  check_attention_dp<2, 128>();
  check_attention_dp<2, 256>();
  for (int es : {4, 2})
    for (int dpad : {64, 128, 320, 1024}) {
      const loss_plan::LossShape s{1000, 1000, dpad, 1, 1, false};
      check_loss(es, dpad, loss_plan::engine_plan(s, loss_plan::kFwd, es).warps);
    }
  return host_check::report("fragments");
}
