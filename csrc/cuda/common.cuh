// What the CUDA kernels (attention.cu, softmax_loss.cu) share, written once:
// - device: element conversions, the launch's dynamic shared memory, the PTX wrappers
//   (cp.async, ldmatrix, mma.sync m16n8k16), warp reductions, and the two warp tile
//   products of both ops in the mma accumulator layout (frag:: of tile_plan.h): tensor
//   cores for float16 / bfloat16, FFMA in the same layout for float32, and 3xTF32 tensor
//   cores for float32 scores under the "high" matmul precision;
// - host: the dtype dispatch (TypeTag / IntTag, with_dtype), element sizes, the copy
//   width of strided rows, and the kernel launch.
// nvcc only (CUDA headers, no torch). Everything here is inline: each .cu includes it.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "kernels.h"
#include "tile_plan.h"

namespace seqrec::cuda {

using i64 = int64_t;

constexpr float kInf = __builtin_huge_valf();
constexpr unsigned kFull = 0xffffffffu;  // every lane of a warp

// ------------------------------------------------------------------ element types --------

template <typename T>
struct IsF32 {
  static constexpr bool value = false;
};
template <>
struct IsF32<float> {
  static constexpr bool value = true;
};

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ float from_f<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_f<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Two floats as one 16-bit pair register, the lower column in the low half.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// ------------------------------------------------------------------ PTX wrappers ---------

// The launch's dynamic shared memory (16-byte aligned).
extern __shared__ __align__(16) unsigned char dynamic_smem[];

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// BYTES from global to shared, or zeros when !valid (src-size 0 reads nothing).
template <int BYTES>
__device__ __forceinline__ void cp_async(void* dst, const void* src, bool valid) {
  const int src_bytes = valid ? BYTES : 0;
  if constexpr (BYTES == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(src_bytes)
                 : "memory");
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(smem_addr(dst)), "l"(src), "n"(BYTES),
                 "r"(src_bytes)
                 : "memory");
  }
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// c[16x8] += a[16x16] b[16x8], float32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// x as a TF32 value (round to nearest, 10-bit mantissa) plus the TF32 value of the
// remainder: big + small carries ~21 bits of x's 24 (3xTF32).
__device__ __forceinline__ void split_tf32(float x, uint32_t& big, uint32_t& small) {
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(big) : "f"(x));
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(small) : "f"(x - __uint_as_float(big)));
}
// c[16x8] += a[16x8] b[8x8], TF32 operands (frag::tf32_*), float32 accumulators.
__device__ __forceinline__ void mma_1688_tf32(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// c0 and c1 (n tiles 2jp, 2jp + 1) += a b, b = (c0's k lo, k hi, c1's k lo, k hi): one x4 ldmatrix.
template <typename T>
__device__ __forceinline__ void mma_pair(float (&c0)[4], float (&c1)[4], const uint32_t (&a)[4],
                                         const uint32_t (&b)[4]) {
  mma_16816<T>(c0, a, b[0], b[1]);
  mma_16816<T>(c1, a, b[2], b[3]);
}

// ------------------------------------------------------------------ warp reductions ------

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}
// Reductions over the 4 lanes (tig) that share a tile row.
__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(kFull, v, 1));
  return fmaxf(v, __shfl_xor_sync(kFull, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(kFull, v, 1);
  return v + __shfl_xor_sync(kFull, v, 2);
}

// ------------------------------------------------------------------ warp tile products ---
// One warp's tiles in the accumulator layout of frag:: (tile_plan.h): s[j][e] is row g,
// column score_col(j, tig, e); s[j][2 + e] is row g + 8. Operands are in shared memory,
// rows of K (or 8 NC) elements at row strides xld / yld (padded: tile_plan.h).

// s[16, 8 NK] += x[16, K] y[8 NK, K]^T; x is the warp's first row. float32 under TF32x3
// (the "high" matmul precision): tensor cores, each operand split into a TF32 value and its
// TF32 remainder, products big*big + big*small + small*big (the small*small term, ~2^-22
// relative, dropped), small terms first; else FFMA.
template <typename T, int K, int NK, bool TF32X3 = false>
__device__ __forceinline__ void warp_scores(float (&s)[NK][4], const T* x, int xld, const T* y, int yld, int lane) {
  static_assert(!TF32X3 || IsF32<T>::value, "TF32x3 is a float32 mode");
  if constexpr (TF32X3) {
    const int g = lane >> 2, tig = lane & 3;
#pragma unroll 2
    for (int k = 0; k < K; k += 8) {
      uint32_t a_big[4], a_small[4];
#pragma unroll
      for (int i = 0; i < 4; ++i)
        split_tf32(x[frag::tf32_a_row(g, i) * xld + k + frag::tf32_a_col(tig, i)], a_big[i], a_small[i]);
#pragma unroll
      for (int j = 0; j < NK; ++j) {
        uint32_t b_big[2], b_small[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) split_tf32(y[(8 * j + g) * yld + k + frag::tf32_b_k(tig, i)], b_big[i], b_small[i]);
        mma_1688_tf32(s[j], a_small, b_big[0], b_big[1]);
        mma_1688_tf32(s[j], a_big, b_small[0], b_small[1]);
        mma_1688_tf32(s[j], a_big, b_big[0], b_big[1]);
      }
    }
  } else if constexpr (IsF32<T>::value) {
    const int g = lane >> 2, tig = lane & 3;
#pragma unroll 2
    for (int k = 0; k < K; k += 4) {
      const float4 xa = *reinterpret_cast<const float4*>(x + frag::score_row(g, 0) * xld + k);
      const float4 xb = *reinterpret_cast<const float4*>(x + frag::score_row(g, 1) * xld + k);
#pragma unroll
      for (int j = 0; j < NK; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float4 yv = *reinterpret_cast<const float4*>(y + frag::score_col(j, tig, e) * yld + k);
          s[j][e] = fmaf(xa.x, yv.x, fmaf(xa.y, yv.y, fmaf(xa.z, yv.z, fmaf(xa.w, yv.w, s[j][e]))));
          s[j][2 + e] = fmaf(xb.x, yv.x, fmaf(xb.y, yv.y, fmaf(xb.z, yv.z, fmaf(xb.w, yv.w, s[j][2 + e]))));
        }
      }
    }
  } else {
    constexpr int kUnroll = K <= 64 ? K / 16 : 2;  // bounds the fragments loaded ahead
#pragma unroll kUnroll
    for (int kk = 0; kk < K / 16; ++kk) {
      uint32_t af[4];  // rows 0-7 / 8-15 x k 0-7 / 8-15
      ldsm_x4(af, x + frag::ldsm_a_row(lane) * xld + kk * 16 + frag::ldsm_a_col(lane));
#pragma unroll
      for (int jp = 0; jp < NK / 2; ++jp) {
        uint32_t bf[4];  // (n tile 2jp, k lo), (2jp, k hi), (2jp + 1, k lo), (2jp + 1, k hi)
        ldsm_x4(bf, y + (16 * jp + frag::ldsm_b_row(lane)) * yld + kk * 16 + frag::ldsm_b_col(lane));
        mma_pair<T>(s[2 * jp], s[2 * jp + 1], af, bf);
      }
    }
  }
}

// acc[16, 8 NC] += p[16, 8 NK] y[8 NK, 8 NC] (p in the layout of warp_scores, rounded to T
// for the tensor cores). acc's layout is frag::'s for 16-bit T; for float32 it is the
// caller's: lane tig reads the float4 of y's row at column f32_col(q, tig) into
// acc[2q][0..1] (row g) / acc[2q][2..3] (row g + 8) and acc[2q + 1] likewise.
template <typename T, int NK, int NC, typename F32Col>
__device__ __forceinline__ void warp_accumulate(float (&acc)[NC][4], const float (&p)[NK][4], const T* y, int yld,
                                                int lane, F32Col f32_col) {
  if constexpr (IsF32<T>::value) {
    const int tig = lane & 3;
#pragma unroll
    for (int c = 0; c < 8 * NK; ++c) {
      // Column c of p (rows g, g + 8): lane col_lane, entries [col_tile][col_entry], [col_tile][2 + col_entry].
      const int src = frag::col_lane(lane, c);
      const float p0 = __shfl_sync(kFull, p[frag::col_tile(c)][frag::col_entry(c)], src);
      const float p1 = __shfl_sync(kFull, p[frag::col_tile(c)][2 + frag::col_entry(c)], src);
#pragma unroll
      for (int q = 0; q < NC / 2; ++q) {  // acc[2q][0..1], acc[2q + 1][0..1]: one float4
        const float4 yv = *reinterpret_cast<const float4*>(y + c * yld + f32_col(q, tig));
        acc[2 * q][0] = fmaf(p0, yv.x, acc[2 * q][0]);
        acc[2 * q][1] = fmaf(p0, yv.y, acc[2 * q][1]);
        acc[2 * q + 1][0] = fmaf(p0, yv.z, acc[2 * q + 1][0]);
        acc[2 * q + 1][1] = fmaf(p0, yv.w, acc[2 * q + 1][1]);
        acc[2 * q][2] = fmaf(p1, yv.x, acc[2 * q][2]);
        acc[2 * q][3] = fmaf(p1, yv.y, acc[2 * q][3]);
        acc[2 * q + 1][2] = fmaf(p1, yv.z, acc[2 * q + 1][2]);
        acc[2 * q + 1][3] = fmaf(p1, yv.w, acc[2 * q + 1][3]);
      }
    }
  } else {
#pragma unroll
    for (int kk = 0; kk < NK / 2; ++kk) {
      // The accumulator layout of two n tiles is the A layout of one k step.
      const uint32_t af[4] = {pack2<T>(p[2 * kk][0], p[2 * kk][1]), pack2<T>(p[2 * kk][2], p[2 * kk][3]),
                              pack2<T>(p[2 * kk + 1][0], p[2 * kk + 1][1]),
                              pack2<T>(p[2 * kk + 1][2], p[2 * kk + 1][3])};
#pragma unroll
      for (int jp = 0; jp < NC / 2; ++jp) {
        uint32_t bf[4];  // y is [k = row, n = column]: transposed loads give the "col" B layout
        ldsm_x4_trans(bf, y + (kk * 16 + frag::ldsm_a_row(lane)) * yld + 16 * jp + frag::ldsm_a_col(lane));
        mma_pair<T>(acc[2 * jp], acc[2 * jp + 1], af, bf);
      }
    }
  }
}

// ------------------------------------------------------------------ host side ------------

template <typename T>
struct TypeTag {
  using type = T;
};
template <int V>
struct IntTag {
  static constexpr int value = V;
};

// f(TypeTag<T>) for the element type; cudaErrorInvalidValue for an unknown one.
template <typename F>
cudaError_t with_dtype(ScalarType dtype, F&& f) {
  switch (dtype) {
    case ScalarType::kFloat32:
      return f(TypeTag<float>{});
    case ScalarType::kFloat16:
      return f(TypeTag<__half>{});
    case ScalarType::kBFloat16:
      return f(TypeTag<__nv_bfloat16>{});
  }
  return cudaErrorInvalidValue;
}

// f(std::true_type) for float32 inputs under 3xTF32 (the "high" matmul precision), else
// f(std::false_type): kernels with 3xTF32 scores exist for float32 only.
template <typename T, typename F>
cudaError_t with_tf32x3(bool tf32x3, F&& f) {
  if constexpr (IsF32<T>::value) {
    if (tf32x3) return f(std::true_type{});
  }
  return f(std::false_type{});
}

inline size_t element_size(ScalarType dtype) { return dtype == ScalarType::kFloat32 ? 4 : 2; }

// The widest copy, 16, 8 or 4 bytes, that the address `ptr` and every byte offset in
// `offsets` (row strides, the row length) are multiples of; else 2 (16-bit elements, one
// at a time).
inline int copy_width(const void* ptr, std::initializer_list<i64> offsets) {
  const int widths[] = {16, 8, 4};
  for (int v : widths) {
    bool aligned = reinterpret_cast<uintptr_t>(ptr) % v == 0;
    for (i64 offset : offsets) aligned = aligned && offset % v == 0;
    if (aligned) return v;
  }
  return 2;
}

// kernel<<<grid, threads, smem, stream>>>(args...), opting in to more than 48 KB of
// dynamic shared memory where smem needs it; the launch's error.
template <typename... KArgs, typename... Args>
cudaError_t launch(void (*kernel)(KArgs...), dim3 grid, int threads, size_t smem, cudaStream_t stream, Args... args) {
  if (smem > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  kernel<<<grid, threads, smem, stream>>>(args...);
  return cudaGetLastError();
}

}  // namespace seqrec::cuda
