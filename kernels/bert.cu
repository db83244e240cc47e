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
//   cited_bert_add_norm_v<VEC>(same arguments): the same with 16-byte loads, for cols = 8 VEC L,
//       L a power of two up to 32 lanes per row (VEC 1..4; 384 = 8 x 3 x 16).
//   cited_bert_embed_norm_v<VEC>(ids, pos, word, position, type_row, gamma, beta, out, rows,
//       cols, eps): out = LayerNorm(word[ids] + position[pos] + type_row), the embedding stage.
//   cited_bert_pool_norm(hidden, starts, out, cols): out (seqs, cols) f32 = the mean of each
//       packed sequence's rows of hidden (tokens, cols) f16, scaled to unit L2 norm; cols even,
//       up to 1024.
//   cited_bert_bias_act(x, bias, out, rows, cols, act)
//       out = act(x + bias); act 0 exact (erf) GELU, 1 tanh GELU, 2 ReLU; cols a multiple of 8.
//
// Attention follows the flash-attention order on tensor cores (mma.sync m16n8k16, f16 inputs,
// f32 accumulators): each warp owns 16 queries; keys and values come through shared memory in
// chunks of 64 (cp.async, double-buffered, read back with ldmatrix); scores stay in registers, an
// online softmax rescales the running output, and the probabilities feed the second product
// straight from the score fragments (the accumulator layout of two 8-wide tiles is the operand
// layout of one 16-deep step).

#include <cuda_fp16.h>
#include <stdint.h>

#include "tile.cuh"

namespace {

using namespace tile;

constexpr int kWarps = 4;
constexpr int kQueries = 16 * kWarps;  // queries per block
constexpr int kChunk = 64;             // keys per shared-memory chunk
constexpr int kPad = 8;                // halves of padding per shared row (no bank conflicts)

__device__ __forceinline__ uint32_t add_bias2(uint32_t x, uint32_t b) {
    __half2 r = __hadd2(*reinterpret_cast<__half2*>(&x), *reinterpret_cast<__half2*>(&b));
    return *reinterpret_cast<uint32_t*>(&r);
}

// The key bias adds (q + b_q) . b_k to every score of a query, which the softmax cancels, so
// keys are used without it; the value bias comes out of the weighted mean unchanged (the
// weights sum to one), so it is added to the output. Keys and values therefore travel to
// shared memory untouched, 16 bytes at a time with cp.async, two chunks in flight, and reach
// the tensor cores through ldmatrix (transposed for V).
template <int HD>
__device__ void attention(const __half* __restrict__ qkv, const __half* __restrict__ bias,
                          const uint32_t* __restrict__ starts, __half* __restrict__ out,
                          int heads, float scale_log2) {
    static_assert(HD % 32 == 0, "head dim must be a multiple of 32");
    constexpr int KS = HD / 16;     // 16-deep steps over the head dim
    constexpr int NT = HD / 8;      // 8-wide output tiles
    constexpr int PIECES = HD / 8;  // 16-byte pieces of a key or value row
    __shared__ __align__(16) __half ks[2][kChunk][HD + kPad];  // keys, row per key
    __shared__ __align__(16) __half vs[2][kChunk][HD + kPad];  // values, row per key

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

    // Stages keys and values c0 .. c0 + 63 into buffer `buf`; rows past the sequence are
    // zeros (their scores are masked; their values must not be NaN).
    auto stage = [&](int buf, int c0) {
        for (int i = threadIdx.x; i < kChunk * PIECES; i += blockDim.x) {
            const int key = i / PIECES, piece = i % PIECES;
            __half* kd = &ks[buf][key][piece * 8];
            __half* vd = &vs[buf][key][piece * 8];
            if (c0 + key < len) {
                const __half* row =
                    qkv + (size_t)(begin + c0 + key) * row_stride + head * HD + piece * 8;
                cp_async16(kd, row + hidden);
                cp_async16(vd, row + 2 * hidden);
            } else {
                *reinterpret_cast<uint4*>(kd) = make_uint4(0, 0, 0, 0);
                *reinterpret_cast<uint4*>(vd) = make_uint4(0, 0, 0, 0);
            }
        }
        cp_async_commit();
    };
    stage(0, 0);

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

    const int chunks = (len + kChunk - 1) / kChunk;
    for (int c = 0; c < chunks; ++c) {
        const int c0 = c * kChunk, buf = c & 1;
        if (c + 1 < chunks) {
            stage(buf ^ 1, c0 + kChunk);  // the buffer the last iteration finished reading
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();  // chunk c is in shared memory for every thread
        if (q0 < len) {  // a warp without queries still stages
            // Scores for 64 keys: 8 tiles of 8 keys; one ldmatrix gives two 16-deep steps.
            float s[kChunk / 8][4];
#pragma unroll
            for (int n = 0; n < kChunk / 8; ++n) {
                s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
                for (int k = 0; k < KS; k += 2) {
                    uint32_t b[4];
                    ldsm4<false>(b, &ks[buf][8 * n + (lane & 7)][16 * k + 8 * (lane >> 3)]);
                    mma16816(s[n], qa[k], b[0], b[1]);
                    mma16816(s[n], qa[k + 1], b[2], b[3]);
                }
            }
            // Mask keys past the sequence and scale; every chunk holds at least one key of the
            // sequence, so each row has a finite score.
#pragma unroll
            for (int n = 0; n < kChunk / 8; ++n) {
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const int key = c0 + 8 * n + 2 * t + (j & 1);
                    s[n][j] = key < len ? s[n][j] * scale_log2 : -INFINITY;
                }
            }
            softmax_step(s, m_lo, m_hi, l_lo, l_hi, o);
            // Probabilities, packed as the A operand of P * V (keys 16 j .. 16 j + 15).
            uint32_t pa[kChunk / 16][4];
#pragma unroll
            for (int j = 0; j < kChunk / 16; ++j) {
                pa[j][0] = pack(s[2 * j][0], s[2 * j][1]);
                pa[j][1] = pack(s[2 * j][2], s[2 * j][3]);
                pa[j][2] = pack(s[2 * j + 1][0], s[2 * j + 1][1]);
                pa[j][3] = pack(s[2 * j + 1][2], s[2 * j + 1][3]);
            }
            // P * V; one transposed ldmatrix gives two 8-wide output tiles of a 16-key step.
#pragma unroll
            for (int n = 0; n < NT; n += 2) {
#pragma unroll
                for (int j = 0; j < kChunk / 16; ++j) {
                    uint32_t b[4];
                    ldsm4<true>(b, &vs[buf][16 * j + (lane & 15)][8 * n + 8 * (lane >> 4)]);
                    mma16816(o[n], pa[j], b[0], b[1]);
                    mma16816(o[n + 1], pa[j], b[2], b[3]);
                }
            }
        }
        __syncthreads();  // buffer `buf` is read; the next iteration may stage into it
    }
    if (q0 >= len) return;
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
        l_lo += __shfl_xor_sync(0xffffffffu, l_lo, off);
        l_hi += __shfl_xor_sync(0xffffffffu, l_hi, off);
    }
    const float inv_lo = 1.f / l_lo, inv_hi = 1.f / l_hi;
    const int row_lo = q0 + g, row_hi = q0 + g + 8;
    const __half* vb = bias + 2 * hidden + head * HD;
#pragma unroll
    for (int n = 0; n < NT; ++n) {
        const int d = 8 * n + 2 * t;
        const float2 bv = __half22float2(*reinterpret_cast<const __half2*>(vb + d));
        const int dim = head * HD + d;
        if (row_lo < len)
            *reinterpret_cast<uint32_t*>(out + (size_t)(begin + row_lo) * hidden + dim) =
                pack(o[n][0] * inv_lo + bv.x, o[n][1] * inv_lo + bv.y);
        if (row_hi < len)
            *reinterpret_cast<uint32_t*>(out + (size_t)(begin + row_hi) * hidden + dim) =
                pack(o[n][2] * inv_hi + bv.x, o[n][3] * inv_hi + bv.y);
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

namespace {

// LayerNorm(a + bias + residual) with 16-byte loads: L = cols / (8 VEC) lanes per row (a power
// of two up to 32), VEC uint4 of each input per lane, 32 / L rows per warp. GATHER: `a` is
// the word table row ids[r] and `residual` the position table row pos[r] (the embedding stage;
// ids and positions checked in range by the host).
template <int VEC, bool GATHER>
__device__ void norm_rows(const __half* __restrict__ a, const __half* __restrict__ bias,
                          const __half* residual, const uint32_t* __restrict__ ids,
                          const uint32_t* __restrict__ pos, const __half* __restrict__ gamma,
                          const __half* __restrict__ beta, __half* out, int rows, int cols,
                          float eps) {
    const int lanes = cols / (8 * VEC);
    const int lane = threadIdx.x & 31;
    const int row = (blockIdx.x * blockDim.x + threadIdx.x) / lanes;
    const int li = lane % lanes;
    // Lanes past the last row read the last row and write nothing: every lane of the warp
    // stays for the shuffles.
    const bool valid = row < rows;
    const int rw = valid ? row : rows - 1;
    const size_t ra = GATHER ? (size_t)ids[rw] : (size_t)rw;
    const size_t rr = GATHER ? (size_t)pos[rw] : (size_t)rw;
    const uint4* a4 = reinterpret_cast<const uint4*>(a + ra * cols);
    const uint4* r4 = reinterpret_cast<const uint4*>(residual + rr * cols);
    const uint4* b4 = reinterpret_cast<const uint4*>(bias);
    float x[VEC][8];
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
        const int c = j * lanes + li;
        const uint4 va = a4[c], vb = b4[c], vr = r4[c];
        const __half2* ha = reinterpret_cast<const __half2*>(&va);
        const __half2* hb = reinterpret_cast<const __half2*>(&vb);
        const __half2* hr = reinterpret_cast<const __half2*>(&vr);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const float2 fa = __half22float2(ha[e]), fb = __half22float2(hb[e]),
                         fr = __half22float2(hr[e]);
            x[j][2 * e] = fa.x + fb.x + fr.x;
            x[j][2 * e + 1] = fa.y + fb.y + fr.y;
            sum += x[j][2 * e] + x[j][2 * e + 1];
        }
    }
    // The lanes of a row are an aligned group of `lanes` within the warp.
    for (int off = lanes / 2; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    const float mean = sum / cols;
    float var = 0.f;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            const float d = x[j][e] - mean;
            var += d * d;
        }
    }
    for (int off = lanes / 2; off > 0; off >>= 1) var += __shfl_xor_sync(0xffffffffu, var, off);
    const float inv = rsqrtf(var / cols + eps);
    const uint4* g4 = reinterpret_cast<const uint4*>(gamma);
    const uint4* e4 = reinterpret_cast<const uint4*>(beta);
    uint4* o4 = reinterpret_cast<uint4*>(out + (size_t)row * cols);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
        const int c = j * lanes + li;
        const uint4 vg = g4[c], ve = e4[c];
        const __half2* hg = reinterpret_cast<const __half2*>(&vg);
        const __half2* he = reinterpret_cast<const __half2*>(&ve);
        uint4 res;
        __half2* ho = reinterpret_cast<__half2*>(&res);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const float2 fg = __half22float2(hg[e]), fe = __half22float2(he[e]);
            ho[e] = __floats2half2_rn((x[j][2 * e] - mean) * inv * fg.x + fe.x,
                                      (x[j][2 * e + 1] - mean) * inv * fg.y + fe.y);
        }
        if (valid) o4[c] = res;
    }
}

}  // namespace

#define CITED_NORM(VEC)                                                                      \
    extern "C" __global__ void __launch_bounds__(256) cited_bert_add_norm_v##VEC(           \
        const __half* __restrict__ a, const __half* __restrict__ bias, const __half* residual, \
        const __half* __restrict__ gamma, const __half* __restrict__ beta, __half* out,      \
        int rows, int cols, float eps) {                                                     \
        norm_rows<VEC, false>(a, bias, residual, nullptr, nullptr, gamma, beta, out, rows,   \
                              cols, eps);                                                    \
    }                                                                                        \
    extern "C" __global__ void __launch_bounds__(256) cited_bert_embed_norm_v##VEC(         \
        const uint32_t* __restrict__ ids, const uint32_t* __restrict__ pos,                  \
        const __half* __restrict__ word, const __half* __restrict__ position,                \
        const __half* __restrict__ type_row, const __half* __restrict__ gamma,               \
        const __half* __restrict__ beta, __half* out, int rows, int cols, float eps) {       \
        norm_rows<VEC, true>(word, type_row, position, ids, pos, gamma, beta, out, rows, cols, \
                             eps);                                                           \
    }
CITED_NORM(1)
CITED_NORM(2)
CITED_NORM(3)
CITED_NORM(4)

// Mean over each packed sequence's rows, then scaled to unit L2 norm (f32 out): one block of
// 256 threads per sequence, each thread two columns at a time; the sequence must be non-empty.
extern "C" __global__ void __launch_bounds__(256)
    cited_bert_pool_norm(const __half* __restrict__ hidden, const uint32_t* __restrict__ starts,
                         float* __restrict__ out, int cols) {
    constexpr int kMaxPairs = 2;  // column pairs per thread: cols up to 1024
    __shared__ float part[8];
    const int seq = blockIdx.x;
    const int begin = starts[seq], len = starts[seq + 1] - begin;
    const int pairs = cols / 2;
    float2 acc[kMaxPairs];
#pragma unroll
    for (int j = 0; j < kMaxPairs; ++j) acc[j] = make_float2(0.f, 0.f);
    const __half2* h2 = reinterpret_cast<const __half2*>(hidden + (size_t)begin * cols);
#pragma unroll 4
    for (int r = 0; r < len; ++r) {
#pragma unroll
        for (int j = 0; j < kMaxPairs; ++j) {
            const int c = threadIdx.x + j * 256;
            if (c < pairs) {
                const float2 v = __half22float2(h2[(size_t)r * pairs + c]);
                acc[j].x += v.x;
                acc[j].y += v.y;
            }
        }
    }
    float sq = 0.f;
#pragma unroll
    for (int j = 0; j < kMaxPairs; ++j) {
        acc[j].x /= len;
        acc[j].y /= len;
        if (threadIdx.x + j * 256 < pairs) sq += acc[j].x * acc[j].x + acc[j].y * acc[j].y;
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) sq += __shfl_xor_sync(0xffffffffu, sq, off);
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = sq;
    __syncthreads();
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < 8; ++w) total += part[w];
    const float inv = 1.f / fmaxf(sqrtf(total), 1e-12f);
    float2* o2 = reinterpret_cast<float2*>(out + (size_t)seq * cols);
#pragma unroll
    for (int j = 0; j < kMaxPairs; ++j) {
        const int c = threadIdx.x + j * 256;
        if (c < pairs) o2[c] = make_float2(acc[j].x * inv, acc[j].y * inv);
    }
}

extern "C" __global__ void __launch_bounds__(256)
    cited_bert_bias_act(const __half* __restrict__ x, const __half* __restrict__ bias,
                        __half* __restrict__ out, int rows, int cols, int act) {
    const size_t groups = (size_t)rows * cols / 8;
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    // The column advances by a fixed amount per step: one 64-bit division, not one a step.
    int c = (int)((i * 8) % cols);
    const int c_step = (int)((stride * 8) % cols);
    for (; i < groups; i += stride, c = c + c_step >= cols ? c + c_step - cols : c + c_step) {
        uint4 raw = reinterpret_cast<const uint4*>(x)[i];
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
