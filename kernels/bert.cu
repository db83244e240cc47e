// bert.cu -- the fused pieces of one f16 BERT encoder layer on the GPU, around cuBLAS's GEMMs.
//
// INTERFACE (launched by src/ops/bert_fused.rs; the CPU path of src/models/bert.rs is the
// reference)
//   cited_bert_attention_<HD>(qkv, bias, starts, out, heads, scale_log2), HD 32 or 64
//       qkv: (tokens, 3 * heads * HD) f16, the packed sequences' Q | K | V projections without
//       their bias; bias: (3 * heads * HD) f16; starts: seqs + 1 token offsets; out: (tokens,
//       heads * HD) f16. Each sequence attends to itself only (no padding, no mask).
//       Grid (query tiles of 64, heads, seqs), 128 threads; a tile past its sequence exits.
//   cited_bert_add_norm(a, bias, residual, gamma, beta, out, rows, cols, eps)
//       out = LayerNorm(a + bias + residual) * gamma + beta, one warp per row, cols a multiple
//       of 64 up to 1024. `out` may be `residual` (a row is read whole before it is written).
//   cited_bert_bias_act(x, bias, out, rows, cols, act)
//       out = act(x + bias); act 0 exact (erf) GELU, 1 tanh GELU, 2 ReLU; cols a multiple of 8.
//
// Attention follows the flash-attention order on tensor cores (mma.sync m16n8k16, f16 inputs,
// f32 accumulators): each warp owns 16 queries; keys and values come through shared memory in
// chunks of 64 (bias added on the way in, V stored transposed); scores stay in registers, an
// online softmax rescales the running output, and the probabilities feed the second product
// straight from the score fragments (the accumulator layout of two 8-wide tiles is the operand
// layout of one 16-deep step).

#include <cuda_fp16.h>
#include <stdint.h>

namespace {

constexpr int kWarps = 4;
constexpr int kQueries = 16 * kWarps;  // queries per block
constexpr int kChunk = 64;             // keys per shared-memory chunk
constexpr int kPad = 8;                // halves of padding per shared row (no bank conflicts)

__device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
}

__device__ __forceinline__ uint32_t add_bias2(uint32_t x, uint32_t b) {
    __half2 r = __hadd2(*reinterpret_cast<__half2*>(&x), *reinterpret_cast<__half2*>(&b));
    return *reinterpret_cast<uint32_t*>(&r);
}

// D = A (16x16, row) * B (16x8, col) + D, f16 operands, f32 accumulators.
__device__ __forceinline__ void mma16816(float* d, const uint32_t* a, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <int HD>
__device__ void attention(const __half* __restrict__ qkv, const __half* __restrict__ bias,
                          const uint32_t* __restrict__ starts, __half* __restrict__ out,
                          int heads, float scale_log2) {
    static_assert(HD % 16 == 0, "head dim must be a multiple of 16");
    constexpr int KS = HD / 16;  // 16-deep steps over the head dim
    constexpr int NT = HD / 8;   // 8-wide output tiles
    __shared__ __align__(16) __half ks[kChunk][HD + kPad];   // keys, row per key
    __shared__ __align__(16) __half vt[HD][kChunk + kPad];   // values, row per dimension

    const int seq = blockIdx.z;
    const int head = blockIdx.y;
    const int begin = starts[seq];
    const int len = starts[seq + 1] - begin;
    const int tile = blockIdx.x * kQueries;
    if (tile >= len) return;
    const int hidden = heads * HD;
    const int row_stride = 3 * hidden;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const int q0 = tile + warp * 16;  // this warp's first query (within the sequence)

    // Q fragments with their bias: rows g and g + 8, dims 16 ks + 2t (+1) and + 8.
    uint32_t qa[KS][4];
    {
        const __half* qb = bias + head * HD;
#pragma unroll
        for (int s = 0; s < KS; ++s) {
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const int row = q0 + g + ((r & 1) ? 8 : 0);
                const int dim = 16 * s + 2 * t + ((r & 2) ? 8 : 0);
                uint32_t b = *reinterpret_cast<const uint32_t*>(qb + dim);
                uint32_t x = 0;
                if (row < len) {
                    x = *reinterpret_cast<const uint32_t*>(
                        qkv + (size_t)(begin + row) * row_stride + head * HD + dim);
                    x = add_bias2(x, b);
                }
                qa[s][r] = x;
            }
        }
    }

    float o[NT][4];
#pragma unroll
    for (int n = 0; n < NT; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    float m_lo = -INFINITY, m_hi = -INFINITY;  // running max (scaled, log2 units), rows g, g+8
    float l_lo = 0.f, l_hi = 0.f;              // this lane's share of the running sums

    const __half* kb = bias + hidden + head * HD;
    const __half* vb = bias + 2 * hidden + head * HD;
    for (int c0 = 0; c0 < len; c0 += kChunk) {
        __syncthreads();  // the previous chunk is no longer read
        // Stage keys and values: each thread moves pairs of dims.
        for (int i = threadIdx.x; i < kChunk * (HD / 2); i += blockDim.x) {
            const int key = i / (HD / 2);
            const int dim = 2 * (i % (HD / 2));
            uint32_t kx = 0, vx = 0;
            if (c0 + key < len) {
                const __half* row = qkv + (size_t)(begin + c0 + key) * row_stride;
                kx = add_bias2(*reinterpret_cast<const uint32_t*>(row + hidden + head * HD + dim),
                               *reinterpret_cast<const uint32_t*>(kb + dim));
                vx = add_bias2(
                    *reinterpret_cast<const uint32_t*>(row + 2 * hidden + head * HD + dim),
                    *reinterpret_cast<const uint32_t*>(vb + dim));
            }
            *reinterpret_cast<uint32_t*>(&ks[key][dim]) = kx;
            __half2 v2 = *reinterpret_cast<__half2*>(&vx);
            vt[dim][key] = __low2half(v2);
            vt[dim + 1][key] = __high2half(v2);
        }
        __syncthreads();
        if (q0 >= len) continue;  // this warp has no queries (it still helped stage)

        // Scores for 64 keys: 8 tiles of 8 keys.
        float s[kChunk / 8][4];
#pragma unroll
        for (int n = 0; n < kChunk / 8; ++n) {
            s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
            for (int k = 0; k < KS; ++k) {
                const __half* kr = &ks[8 * n + g][16 * k + 2 * t];
                uint32_t b0 = *reinterpret_cast<const uint32_t*>(kr);
                uint32_t b1 = *reinterpret_cast<const uint32_t*>(kr + 8);
                mma16816(s[n], qa[k], b0, b1);
            }
        }
        // Mask keys past the sequence, scale, and take the chunk's row maxima.
        float cm_lo = -INFINITY, cm_hi = -INFINITY;
#pragma unroll
        for (int n = 0; n < kChunk / 8; ++n) {
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int key = c0 + 8 * n + 2 * t + (j & 1);
                s[n][j] = key < len ? s[n][j] * scale_log2 : -INFINITY;
            }
            cm_lo = fmaxf(cm_lo, fmaxf(s[n][0], s[n][1]));
            cm_hi = fmaxf(cm_hi, fmaxf(s[n][2], s[n][3]));
        }
#pragma unroll
        for (int off = 1; off < 4; off <<= 1) {
            cm_lo = fmaxf(cm_lo, __shfl_xor_sync(0xffffffffu, cm_lo, off));
            cm_hi = fmaxf(cm_hi, __shfl_xor_sync(0xffffffffu, cm_hi, off));
        }
        // Every chunk holds at least one key of the sequence, so the new maxima are finite.
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
        // Probabilities, packed as the A operand of P * V (keys 16 j .. 16 j + 15).
        uint32_t pa[kChunk / 16][4];
#pragma unroll
        for (int j = 0; j < kChunk / 16; ++j) {
            float p[2][4];
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                p[h][0] = exp2f(s[2 * j + h][0] - m_lo);
                p[h][1] = exp2f(s[2 * j + h][1] - m_lo);
                p[h][2] = exp2f(s[2 * j + h][2] - m_hi);
                p[h][3] = exp2f(s[2 * j + h][3] - m_hi);
                l_lo += p[h][0] + p[h][1];
                l_hi += p[h][2] + p[h][3];
            }
            pa[j][0] = pack(p[0][0], p[0][1]);
            pa[j][1] = pack(p[0][2], p[0][3]);
            pa[j][2] = pack(p[1][0], p[1][1]);
            pa[j][3] = pack(p[1][2], p[1][3]);
        }
#pragma unroll
        for (int n = 0; n < NT; ++n) {
#pragma unroll
            for (int j = 0; j < kChunk / 16; ++j) {
                const __half* vr = &vt[8 * n + g][16 * j + 2 * t];
                uint32_t b0 = *reinterpret_cast<const uint32_t*>(vr);
                uint32_t b1 = *reinterpret_cast<const uint32_t*>(vr + 8);
                mma16816(o[n], pa[j], b0, b1);
            }
        }
    }
    if (q0 >= len) return;
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
        l_lo += __shfl_xor_sync(0xffffffffu, l_lo, off);
        l_hi += __shfl_xor_sync(0xffffffffu, l_hi, off);
    }
    const float inv_lo = 1.f / l_lo, inv_hi = 1.f / l_hi;
    const int row_lo = q0 + g, row_hi = q0 + g + 8;
#pragma unroll
    for (int n = 0; n < NT; ++n) {
        const int dim = head * HD + 8 * n + 2 * t;
        if (row_lo < len)
            *reinterpret_cast<uint32_t*>(out + (size_t)(begin + row_lo) * hidden + dim) =
                pack(o[n][0] * inv_lo, o[n][1] * inv_lo);
        if (row_hi < len)
            *reinterpret_cast<uint32_t*>(out + (size_t)(begin + row_hi) * hidden + dim) =
                pack(o[n][2] * inv_hi, o[n][3] * inv_hi);
    }
}

}  // namespace

#define CITED_ATTENTION(HD)                                                                  \
    extern "C" __global__ void __launch_bounds__(128)                                        \
        cited_bert_attention_##HD(const __half* __restrict__ qkv,                            \
                                  const __half* __restrict__ bias,                           \
                                  const uint32_t* __restrict__ starts,                       \
                                  __half* __restrict__ out, int heads, float scale_log2) {   \
        attention<HD>(qkv, bias, starts, out, heads, scale_log2);                            \
    }
CITED_ATTENTION(32)
CITED_ATTENTION(64)

extern "C" __global__ void __launch_bounds__(256)
    cited_bert_add_norm(const __half* __restrict__ a, const __half* __restrict__ bias,
                        const __half* residual, const __half* __restrict__ gamma,
                        const __half* __restrict__ beta, __half* out, int rows, int cols,
                        float eps) {
    constexpr int kMax = 16;  // half2 pairs per lane: cols up to 1024
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const int pairs = cols / 64;  // per lane
    const __half2* a2 = reinterpret_cast<const __half2*>(a + (size_t)row * cols);
    const __half2* r2 = reinterpret_cast<const __half2*>(residual + (size_t)row * cols);
    const __half2* b2 = reinterpret_cast<const __half2*>(bias);
    float x[2 * kMax];
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < kMax; ++i) {
        if (i < pairs) {
            const int c = lane + 32 * i;
            const float2 va = __half22float2(a2[c]);
            const float2 vb = __half22float2(b2[c]);
            const float2 vr = __half22float2(r2[c]);
            x[2 * i] = va.x + vb.x + vr.x;
            x[2 * i + 1] = va.y + vb.y + vr.y;
            sum += x[2 * i] + x[2 * i + 1];
        }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    const float mean = sum / cols;
    float var = 0.f;
#pragma unroll
    for (int i = 0; i < kMax; ++i) {
        if (i < pairs) {
            const float d0 = x[2 * i] - mean, d1 = x[2 * i + 1] - mean;
            var += d0 * d0 + d1 * d1;
        }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) var += __shfl_xor_sync(0xffffffffu, var, off);
    const float inv = rsqrtf(var / cols + eps);
    const __half2* g2 = reinterpret_cast<const __half2*>(gamma);
    const __half2* be2 = reinterpret_cast<const __half2*>(beta);
    __half2* o2 = reinterpret_cast<__half2*>(out + (size_t)row * cols);
#pragma unroll
    for (int i = 0; i < kMax; ++i) {
        if (i < pairs) {
            const int c = lane + 32 * i;
            const float2 vg = __half22float2(g2[c]);
            const float2 vb = __half22float2(be2[c]);
            o2[c] = __floats2half2_rn((x[2 * i] - mean) * inv * vg.x + vb.x,
                                      (x[2 * i + 1] - mean) * inv * vg.y + vb.y);
        }
    }
}

extern "C" __global__ void __launch_bounds__(256)
    cited_bert_bias_act(const __half* __restrict__ x, const __half* __restrict__ bias,
                        __half* __restrict__ out, int rows, int cols, int act) {
    const size_t groups = (size_t)rows * cols / 8;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < groups;
         i += (size_t)gridDim.x * blockDim.x) {
        uint4 raw = reinterpret_cast<const uint4*>(x)[i];
        const int c = (int)((i * 8) % cols);
        const uint4 braw = *reinterpret_cast<const uint4*>(bias + c);
        __half2* h = reinterpret_cast<__half2*>(&raw);
        const __half2* b = reinterpret_cast<const __half2*>(&braw);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            float2 v = __half22float2(h[j]);
            const float2 bv = __half22float2(b[j]);
            v.x += bv.x;
            v.y += bv.y;
            if (act == 0) {
                v.x = 0.5f * v.x * (1.f + erff(v.x * 0.70710678f));
                v.y = 0.5f * v.y * (1.f + erff(v.y * 0.70710678f));
            } else if (act == 1) {
                const float k = 0.7978845608f;
                v.x = 0.5f * v.x * (1.f + tanhf(k * (v.x + 0.044715f * v.x * v.x * v.x)));
                v.y = 0.5f * v.y * (1.f + tanhf(k * (v.y + 0.044715f * v.y * v.y * v.y)));
            } else {
                v.x = fmaxf(v.x, 0.f);
                v.y = fmaxf(v.y, 0.f);
            }
            h[j] = __floats2half2_rn(v.x, v.y);
        }
        reinterpret_cast<uint4*>(out)[i] = raw;
    }
}
