// Logits processors' edits that read the logits, applied in place before the sampling kernel:
// the CUDA twin of `Edit::apply` in `src/ops/sampling/edit.rs` (the reference) for its two
// such edits. One block per edited row.
//
// meta: per edit 7 words (row, kind, margin as f32 bits, ids start, ids length, mask start,
// mask words), then the id lists and the bit masks, all indexed from the start of meta.
//   kind 1, allow: every logit whose id is not in the (ascending) id list becomes -inf;
//   kind 2, nudge: when the row's top token (largest logit, ties to the lower id, -inf and NaN
//     skipped) is set in the mask, the best of the listed open tokens (IEEE total order, the
//     last of equals; ids past the vocabulary skipped) rises to top + 1 if it is finite and
//     above top - margin.

#include <cstdint>

namespace {

constexpr int THREADS = 256;
constexpr int WARPS = THREADS / 32;
constexpr unsigned NONE = 0xFFFFFFFFu;
constexpr unsigned META_WORDS = 7;
constexpr unsigned KIND_ALLOW = 1;
constexpr unsigned KIND_NUDGE = 2;

// Rust's `f32::total_cmp` order as a signed integer key.
__device__ __forceinline__ int total_key(float x) {
    int b = __float_as_int(x);
    return b ^ (int)(((unsigned)(b >> 31)) >> 1);
}

// Whether (v, i) ranks before (w, j): larger value, then lower id (NONE ranks last).
__device__ __forceinline__ bool before(float v, unsigned i, float w, unsigned j) {
    if (i == NONE) return false;
    if (j == NONE) return true;
    return v > w || (v == w && i < j);
}

__device__ bool contains(const unsigned* ids, unsigned len, unsigned t) {
    unsigned lo = 0, hi = len;
    while (lo < hi) {
        const unsigned mid = (lo + hi) / 2;
        if (ids[mid] < t) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    return lo < len && ids[lo] == t;
}

}  // namespace

extern "C" __global__ void __launch_bounds__(THREADS)
    cited_logits_edit(float* __restrict__ logits, unsigned vocab,
                      const unsigned* __restrict__ meta) {
    const unsigned* m = meta + (size_t)blockIdx.x * META_WORDS;
    const unsigned row = m[0], kind = m[1];
    const float margin = __uint_as_float(m[2]);
    const unsigned* ids = meta + m[3];
    const unsigned ids_len = m[4];
    const unsigned* mask = meta + m[5];
    const unsigned mask_words = m[6];
    float* x = logits + (size_t)row * vocab;

    if (kind == KIND_ALLOW) {
        for (unsigned t = threadIdx.x; t < vocab; t += THREADS) {
            if (!contains(ids, ids_len, t)) x[t] = -INFINITY;
        }
        return;
    }
    if (kind != KIND_NUDGE) return;

    // The top token: each thread's best over its strided ids, then the warps, then the block.
    float best = -INFINITY;
    unsigned best_id = NONE;
    for (unsigned t = threadIdx.x; t < vocab; t += THREADS) {
        const float v = x[t];
        if (isnan(v) || v == -INFINITY) continue;
        if (best_id == NONE || v > best) {
            best = v;
            best_id = t;
        }
    }
    for (int off = 16; off > 0; off >>= 1) {
        const float v = __shfl_down_sync(0xFFFFFFFFu, best, off);
        const unsigned i = __shfl_down_sync(0xFFFFFFFFu, best_id, off);
        if (before(v, i, best, best_id)) {
            best = v;
            best_id = i;
        }
    }
    __shared__ float warp_best[WARPS];
    __shared__ unsigned warp_id[WARPS];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) {
        warp_best[warp] = best;
        warp_id[warp] = best_id;
    }
    __syncthreads();
    if (threadIdx.x != 0) return;
    for (int w = 1; w < WARPS; w++) {
        if (before(warp_best[w], warp_id[w], best, best_id)) {
            best = warp_best[w];
            best_id = warp_id[w];
        }
    }
    if (best_id == NONE || best_id / 32 >= mask_words) return;
    if (((mask[best_id / 32] >> (best_id % 32)) & 1u) == 0) return;
    unsigned open = NONE;
    int open_key = 0;
    for (unsigned i = 0; i < ids_len; i++) {
        const unsigned o = ids[i];
        if (o >= vocab) continue;
        const int k = total_key(x[o]);
        if (open == NONE || k >= open_key) {
            open = o;
            open_key = k;
        }
    }
    if (open == NONE) return;
    const float top = x[best_id], v = x[open];
    if (isfinite(v) && v > top - margin) x[open] = top + 1.0f;
}
