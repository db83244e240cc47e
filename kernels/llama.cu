// The fused pieces of a Llama decoder step on the GPU, around the projections' GEMMs: the CUDA
// twins of the host code in `src/models/llama.rs` (`Llama::rope`, `KvCache::write`, candle's
// RMSNorm, SiLU and products there: the reference the GPU forward pass is checked against by
// `gpu-check parity`). Each saves launches and intermediate tensors: a layer runs 3 of these
// where candle ran 6 operations (norm, add, norm, silu, mul, add).
//
// cited_llama_rope_kv: rotary embedding of each token's query and key heads, straight from the
// QKV projection, and the key and value rows written into the layer's paged cache in one pass.
//   qkv        (tokens, stride) f32: each row holds the token's Q heads, K heads, V heads
//   cos, sin   (max_positions, head_dim / 2) f32: the angle tables the host path uses
//   positions  (tokens) u32; slots (tokens) u32: block * block_size + offset of the token's row
//   q          (tokens, heads * head_dim) f32 out: the rotated query heads
//   k, v       (num_blocks, kv_heads, block_size, head_dim) f16: the rotated key and the value
//              rows land at the token's slot
// Grid (tokens, heads + 2 * kv_heads), one block per head of a token, head_dim / 2 threads (one
// per rotated pair; head_dim even, at most 512). The products are rounded as the host rounds
// them (no fused multiply-add), so the cache holds the same halves on both paths.

#include <cstdint>
#include <cuda_fp16.h>

extern "C" __global__ void cited_llama_rope_kv(
    const float* __restrict__ qkv, unsigned stride, const float* __restrict__ cos_t,
    const float* __restrict__ sin_t, const unsigned* __restrict__ positions,
    const unsigned* __restrict__ slots, unsigned heads, unsigned kv_heads, unsigned head_dim,
    unsigned block_size, unsigned interleaved, float* __restrict__ q, __half* __restrict__ k,
    __half* __restrict__ v) {
    const unsigned t = blockIdx.x, h = blockIdx.y, i = threadIdx.x;
    const unsigned half_dim = head_dim / 2;
    if (i >= half_dim) return;
    const float* row = qkv + (size_t)t * stride + (size_t)h * head_dim;
    // The pair this thread rotates: (2i, 2i + 1) or (i, i + head_dim / 2).
    const unsigned a = interleaved ? 2 * i : i;
    const unsigned b = interleaved ? 2 * i + 1 : i + half_dim;
    float x0 = row[a], x1 = row[b];
    if (h < heads + kv_heads) {
        const size_t at = (size_t)positions[t] * half_dim + i;
        const float c = cos_t[at], s = sin_t[at];
        const float y0 = __fsub_rn(__fmul_rn(x0, c), __fmul_rn(x1, s));
        const float y1 = __fadd_rn(__fmul_rn(x0, s), __fmul_rn(x1, c));
        x0 = y0;
        x1 = y1;
    }
    if (h < heads) {
        float* out = q + ((size_t)t * heads + h) * head_dim;
        out[a] = x0;
        out[b] = x1;
        return;
    }
    const bool is_k = h < heads + kv_heads;
    const unsigned kvh = is_k ? h - heads : h - heads - kv_heads;
    const unsigned slot = slots[t];
    const size_t off =
        (((size_t)(slot / block_size) * kv_heads + kvh) * block_size + slot % block_size) *
        head_dim;
    __half* dst = (is_k ? k : v) + off;
    dst[a] = __float2half_rn(x0);
    dst[b] = __float2half_rn(x1);
}

// cited_llama_add_norm: the residual add and the RMSNorm that follows it, in one pass over each
// row: y = x + delta (written to x_out; with no delta, y = x and x_out is not written), then
// h = y * rsqrt(mean(y^2) + eps) * w. x, delta, x_out, h: (rows, cols) f32; w: (cols) f32.
// Grid (rows), NORM_THREADS threads; the row is read back from x_out (or x) for the second pass.
constexpr unsigned NORM_THREADS = 256;

extern "C" __global__ void __launch_bounds__(NORM_THREADS)
    cited_llama_add_norm(const float* __restrict__ x, const float* __restrict__ delta,
                         const float* __restrict__ w, unsigned cols, float eps,
                         float* __restrict__ x_out, float* __restrict__ h) {
    __shared__ float warp_sums[NORM_THREADS / 32];
    const size_t base = (size_t)blockIdx.x * cols;
    const float* in = x + base;
    float sum = 0.f;
    for (unsigned c = threadIdx.x; c < cols; c += NORM_THREADS) {
        float y = in[c];
        if (delta != nullptr) {
            y += delta[base + c];
            x_out[base + c] = y;
        }
        sum += y * y;
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = sum;
    __syncthreads();
    float total = 0.f;
#pragma unroll
    for (unsigned i = 0; i < NORM_THREADS / 32; i++) total += warp_sums[i];
    const float inv = rsqrtf(total / (float)cols + eps);
    // Each thread reads back only the elements it wrote, so no barrier is needed before this.
    const float* y = delta != nullptr ? x_out + base : in;
    for (unsigned c = threadIdx.x; c < cols; c += NORM_THREADS) h[base + c] = y[c] * inv * w[c];
}

// cited_llama_silu_mul: the gated activation of the feed-forward block,
// act[r][c] = silu(gu[r][c]) * gu[r][ff + c] for gu (rows, 2 ff) holding the gate and up
// projections side by side; act (rows, ff). A grid-stride loop over rows x ff.
extern "C" __global__ void cited_llama_silu_mul(const float* __restrict__ gu, unsigned rows,
                                                unsigned ff, float* __restrict__ act) {
    const size_t total = (size_t)rows * ff;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t r = i / ff, c = i % ff;
        const float g = gu[r * 2 * ff + c];
        act[i] = g / (1.f + expf(-g)) * gu[r * 2 * ff + ff + c];
    }
}
