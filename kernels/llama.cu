// The fused pieces of a Llama decoder step on the GPU, around the projections' GEMMs: the CUDA
// twins of the host code in `src/models/llama.rs` (`Llama::rope` and `KvCache::write`, the
// reference the GPU forward pass is checked against by `gpu-check generate`).
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
