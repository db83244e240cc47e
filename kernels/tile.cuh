// tile.cuh -- pieces shared by the tensor-core kernels (bert.cu, paged_attention.cu): f16 pair
// packing, mma.sync m16n8k16, ldmatrix, cp.async, and one online-softmax step of a 16-row tile.
#pragma once

#include <cuda_fp16.h>
#include <stdint.h>

namespace tile {

__device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
}

// (a, b) as hi + lo, both f16 pairs: an f16 operand that keeps about f32 accuracy over two mma.
__device__ __forceinline__ void split_pack(float a, float b, uint32_t& hi, uint32_t& lo) {
    const __half2 h = __floats2half2_rn(a, b);
    const float2 back = __half22float2(h);
    hi = *reinterpret_cast<const uint32_t*>(&h);
    lo = pack(a - back.x, b - back.y);
}

// D = A (16x16, row) * B (16x8, col) + D, f16 operands, f32 accumulators.
__device__ __forceinline__ void mma16816(float* d, const uint32_t* a, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 16 bytes global -> shared without passing through registers (sm_80+); `live` false writes
// zeros and reads nothing.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool live = true) {
    const uint32_t d = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src),
                 "r"(live ? 16 : 0));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Four 8x8 f16 matrices from shared memory, lane L giving the row address of matrix L / 8;
// with TRANS each lane receives a column pair instead of a row pair.
template <bool TRANS>
__device__ __forceinline__ void ldsm4(uint32_t* r, const void* p) {
    const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(p));
    if (TRANS) {
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(a));
    } else {
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(a));
    }
}

// One online-softmax step of a 16-row mma tile (this lane: rows g and g + 8) over NS 8-key
// score tiles in accumulator layout, masked and in log2 units: the rows' maxima over the quad,
// the running maxima, sums and NT output tiles rescaled, and the scores turned into weights
// (added to the sums in tile order). Each row must hold at least one finite score.
template <int NS, int NT>
__device__ __forceinline__ void softmax_step(float (&s)[NS][4], float& m_lo, float& m_hi,
                                             float& l_lo, float& l_hi, float (&o)[NT][4]) {
    float cm_lo = -INFINITY, cm_hi = -INFINITY;
#pragma unroll
    for (int n = 0; n < NS; ++n) {
        cm_lo = fmaxf(cm_lo, fmaxf(s[n][0], s[n][1]));
        cm_hi = fmaxf(cm_hi, fmaxf(s[n][2], s[n][3]));
    }
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
        cm_lo = fmaxf(cm_lo, __shfl_xor_sync(0xffffffffu, cm_lo, off));
        cm_hi = fmaxf(cm_hi, __shfl_xor_sync(0xffffffffu, cm_hi, off));
    }
    const float mn_lo = fmaxf(m_lo, cm_lo), mn_hi = fmaxf(m_hi, cm_hi);
    const float corr_lo = exp2f(m_lo - mn_lo), corr_hi = exp2f(m_hi - mn_hi);
    m_lo = mn_lo;
    m_hi = mn_hi;
    l_lo *= corr_lo;
    l_hi *= corr_hi;
#pragma unroll
    for (int n = 0; n < NT; ++n) {
        o[n][0] *= corr_lo;
        o[n][1] *= corr_lo;
        o[n][2] *= corr_hi;
        o[n][3] *= corr_hi;
    }
#pragma unroll
    for (int n = 0; n < NS; ++n) {
        s[n][0] = exp2f(s[n][0] - m_lo);
        s[n][1] = exp2f(s[n][1] - m_lo);
        s[n][2] = exp2f(s[n][2] - m_hi);
        s[n][3] = exp2f(s[n][3] - m_hi);
        l_lo += s[n][0] + s[n][1];
        l_hi += s[n][2] + s[n][3];
    }
}

}  // namespace tile
