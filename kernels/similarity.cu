// similarity.cu -- exact top-k by inner product over a device-resident f16 corpus.
//
// WHAT IT COMPUTES
//   For every query q (a row of `queries`, (nq, d) f16 row-major) and every corpus row r (a row
//   of `corpus`, (n, d) f16 row-major): score(q, r) = sum_i q[i] * r[i], each product formed
//   exactly in f32 and summed in f32. For each query the k best rows are returned, ordered by
//   score descending, equal scores by lower row id. The nq x n score matrix never reaches global
//   memory: each block keeps its own running top-k in shared memory.
//
// INTERFACE (launched by src/ops/similarity.rs; launch table in src/ops/similarity_variants.rs)
//   Two phases.
//   1. similarity_partial_<variant>(queries, corpus, n, d, nq, k, rows_per_part,
//                                   part_scores, part_ids)
//      grid (parts, ceil(nq / queries_per_block)), parts = ceil(n / rows_per_part);
//      block (threads); dynamic shared memory smem_bytes(k, d) from the table.
//      Part p is the corpus rows [p * rows_per_part, min(n, (p + 1) * rows_per_part)).
//      For each query q < nq and part p it writes k entries at (q * parts + p) * k + i of
//      part_scores / part_ids: the part's k best rows, best first; slots past the part's row
//      count hold score -INFINITY and id 0xFFFFFFFF.
//   2. similarity_merge(part_scores, part_ids, nq, parts, k, out_scores, out_ids)
//      grid (nq), block (MERGE_THREADS = 512), no dynamic shared memory.
//      Writes the k best of each query's parts * k candidates to out_* at q * k + i.
//   Shapes: d a multiple of 8 in 8..2048, 1 <= k <= max_k of the variant (256, or 128 for
//   mma64), n >= 1 (ids are u32; 0xFFFFFFFF is reserved for padding), nq >= 1. Both input
//   pointers must be 16-byte aligned (every row start then is, as d is a multiple of 8).
//
// ORDER KEY
//   Every candidate is a 64-bit key: high word = the score's f32 bits mapped so that unsigned
//   order equals float order (negative: all bits flipped; otherwise the sign bit set), low word =
//   the bitwise complement of the row id. A larger key is a better hit: higher score, then lower
//   id. -0.0 ranks just below +0.0, as f32::total_cmp does in the CPU reference. Padding is the
//   key of (-INFINITY, 0xFFFFFFFF), below every real (finite) hit. Real keys are all distinct.
//
// RUNNING TOP-K (shared by all partial variants)
//   Per query handled by the block, shared memory holds a list `top` of K2 = next_pow2(k) keys,
//   kept sorted descending, and a candidate buffer of BUF keys (a power of two), all initialised
//   to padding, plus a threshold thr = top[k - 1] and a fill count. Rows are scored in rounds of
//   R rows (R <= BUF); a hit enters the buffer (slot from a shared atomicAdd) only if its key beats
//   thr, so after warm-up nearly every row costs one comparison. A round adds at most R entries
//   per query, and a reduction runs as soon as some count exceeds BUF - R (known exactly from
//   the slot indices handed out, combined with __syncthreads_or), so the buffer never overflows.
//   The reduction: bitonic-sort each buffer descending; top[i] = max(top[i], buf[K2 - 1 - i])
//   (this keeps exactly the K2 best of both lists, as a bitonic sequence); a bitonic merge sorts
//   top again; buffers go back to padding, counts to 0, thr = top[k - 1]. One last reduction
//   after the final round, then top[0..k) is written out.
//
// VARIANTS
//   warp  (queries_per_block 1, 256 threads, U = 4, R = 128, BUF = 512)
//   q8    (queries_per_block 8, 256 threads, U = 2, R = 64,  BUF = 128)
//     Same code (partial_rows<QB, U, BUF>). The block's queries sit in shared memory as f16.
//     Each warp is four groups of 8 lanes; a group scores U corpus rows at a time, its lanes
//     splitting the row into 16-byte (8 x f16) pieces: lane j of the group takes pieces j, j+8,
//     j+16, ... so each group reads 128 contiguous bytes per step (coalesced). Each piece is
//     converted to f32 once and multiplied with the same piece of every query of the block, so
//     q8 reads the corpus once per 8 queries. Three xor-shuffles finish each sum inside the
//     group; lane j of the group then tests the hit of query j against its threshold.
//   mma   (queries_per_block 32, 256 threads, R = 64, BUF = 128, max_k 256)
//   mma64 (queries_per_block 64, 256 threads, R = 64, BUF = 128, max_k 128)
//     Same code (partial_mma<Q>). Tensor cores through WMMA m16n16k16 (f16 in, f32 accumulate).
//     A tile of 64 corpus rows times the block's Q queries; d is streamed in chunks of 64
//     columns: each step copies the corpus chunk (64 x 64) and query chunk (Q x 64) into padded
//     shared tiles (zeros past n, nq or d), and the next step's chunk is already loaded into
//     registers while the tensor cores work on this one. Warp w owns corpus rows
//     16 * (w / 2) .. +16 and Q/2 queries (one or two 16 x 16 accumulators). After the last
//     chunk of a tile the accumulators go to a shared score tile (column-major: one query's 64
//     scores contiguous), which the whole block then filters against the per-query thresholds.
//     mma64 halves the corpus traffic per query for big batches; its top-k state for k = 256
//     would not fit in shared memory, hence max_k 128.
//   Block order: the kernels renumber blocks so that consecutive block ids take the same corpus
//   part with different query groups; blocks running together then read the same rows, and the
//   second and later reads come from L2.
//
// MERGE
//   One block per query. A radix select over the 64-bit keys, one byte per pass from the top,
//   finds the k-th best key: each pass histograms (shared atomics, aggregated per warp with
//   __match_any_sync) the candidates whose already-chosen high bytes equal the prefix found so
//   far, then one warp scans the 256 bins from the top to pick the byte holding the k-th. It
//   stops early when the chosen bin holds exactly the number still needed (typically after the
//   score bytes). Then the candidates above the prefix, plus the needed number of those equal
//   to it, are gathered (at most k <= 256 keys) into shared memory, bitonic-sorted and written.
//   Candidates are read from global memory on every pass; nothing assumes they fit on chip.
//
// VERSIONS AND TIMINGS
//   v1: the four partial variants above and the radix-select merge. Not yet run on a GPU:
//   compiled and checked with ptxas only (sm_90, CUDA 13.0); no timings measured yet. Timings
//   per variant and shape will be filled in here after the first GPU run.
//   ptxas -v (sm_90), registers / static shared memory, no spills, no stack frame:
//     warp 61 / 16 B, q8 64 / 96 B, mma 64 / 22,912 B, mma64 102 / 36,608 B, merge 38 / 3,104 B.
//   __launch_bounds__ minimum blocks per SM (register caps): warp 4, q8 3, mma 2, mma64 1.

#include <cuda_fp16.h>
#include <mma.h>
#include <stdint.h>

namespace {

typedef unsigned long long key64;

constexpr unsigned FULL_MASK = 0xffffffffu;
// Key of (-INFINITY, 0xFFFFFFFF): score bits 0xFF800000 flipped -> 0x007FFFFF, id complement 0.
constexpr key64 PAD_KEY = 0x007FFFFF00000000ull;
// Largest k any kernel accepts.
constexpr unsigned MAX_K = 256;
// Threads of every partial kernel and of the merge (must match similarity_variants.rs).
constexpr unsigned PARTIAL_THREADS = 256;
constexpr unsigned MERGE_THREADS = 512;

// Single dynamic shared memory array for every kernel of this file.
extern __shared__ __align__(16) unsigned char dyn_smem[];

__device__ __forceinline__ key64 make_key(float score, unsigned id)
{
    const unsigned b = __float_as_uint(score);
    const unsigned o = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
    return (static_cast<key64>(o) << 32) | static_cast<key64>(~id);
}

__device__ __forceinline__ float key_score(key64 key)
{
    const unsigned o = static_cast<unsigned>(key >> 32);
    const unsigned b = (o & 0x80000000u) ? (o & 0x7fffffffu) : ~o;
    return __uint_as_float(b);
}

__device__ __forceinline__ unsigned key_id(key64 key)
{
    return ~static_cast<unsigned>(key & 0xffffffffull);
}

// Smallest power of two >= k, for 1 <= k <= 2^31.
__device__ __forceinline__ unsigned next_pow2(unsigned k)
{
    return 1u << (32 - __clz(k - 1u));
}

// The two f16 values packed in a 32-bit word, as f32 (low half first).
__device__ __forceinline__ float2 halves_to_float2(unsigned w)
{
    float2 f;
    f.x = __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xffffu)));
    f.y = __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
    return f;
}

// ---------------------------------------------------------------------------------------------
// Block-wide bitonic networks on shared-memory key arrays. Every thread of the block must call
// them with the same arguments. Array a (0 <= a < narr) starts at base + a * astride; len is a
// power of two. Each step ends with a barrier; nothing happens (and no barrier) when len == 1.
// ---------------------------------------------------------------------------------------------

// Sorts each array descending.
__device__ void bitonic_sort_desc(key64* base, unsigned astride, unsigned narr, unsigned len)
{
    const unsigned half = len >> 1;
    const unsigned total = narr * half;
    for (unsigned size = 2; size <= len; size <<= 1) {
        for (unsigned stride = size >> 1; stride > 0; stride >>= 1) {
            for (unsigned t = threadIdx.x; t < total; t += blockDim.x) {
                const unsigned a = t / half;
                const unsigned i = t - a * half;
                // i-th compare pair of this step: lo has a 0 in the `stride` bit, hi = lo + stride.
                const unsigned lo = ((i & ~(stride - 1u)) << 1) | (i & (stride - 1u));
                const unsigned hi = lo + stride;
                key64* arr = base + static_cast<size_t>(a) * astride;
                const key64 x = arr[lo];
                const key64 y = arr[hi];
                // Runs of length `size` alternate direction; the final run (size == len) is
                // descending, since lo < len.
                const bool desc = (lo & size) == 0;
                if (desc ? (x < y) : (x > y)) {
                    arr[lo] = y;
                    arr[hi] = x;
                }
            }
            __syncthreads();
        }
    }
}

// Sorts each array descending, given that each is bitonic (rises then falls or vice versa).
__device__ void bitonic_merge_desc(key64* base, unsigned astride, unsigned narr, unsigned len)
{
    const unsigned half = len >> 1;
    const unsigned total = narr * half;
    for (unsigned stride = half; stride > 0; stride >>= 1) {
        for (unsigned t = threadIdx.x; t < total; t += blockDim.x) {
            const unsigned a = t / half;
            const unsigned i = t - a * half;
            const unsigned lo = ((i & ~(stride - 1u)) << 1) | (i & (stride - 1u));
            const unsigned hi = lo + stride;
            key64* arr = base + static_cast<size_t>(a) * astride;
            const key64 x = arr[lo];
            const key64 y = arr[hi];
            if (x < y) {
                arr[lo] = y;
                arr[hi] = x;
            }
        }
        __syncthreads();
    }
}

// ---------------------------------------------------------------------------------------------
// Running top-k of QB queries. keys: QB regions of (k2 + BUF) keys: [0, k2) the sorted list,
// [k2, k2 + BUF) the candidate buffer. thr[a] = keys of region a at k - 1; cnt[a] = buffer fill.
// ---------------------------------------------------------------------------------------------

// Sets every key to padding, thresholds to padding and counts to 0. No barrier.
template <int QB, int BUF>
__device__ void topk_init(key64* keys, key64* thr, unsigned* cnt, unsigned k2)
{
    const unsigned total = QB * (k2 + BUF);
    for (unsigned t = threadIdx.x; t < total; t += blockDim.x) keys[t] = PAD_KEY;
    for (unsigned t = threadIdx.x; t < QB; t += blockDim.x) {
        thr[t] = PAD_KEY;
        cnt[t] = 0;
    }
}

// Folds every buffer into its sorted list (see the header). All threads; callers must have
// passed a barrier since the last buffer write. Ends with a barrier.
template <int QB, int BUF>
__device__ void topk_reduce(key64* keys, key64* thr, unsigned* cnt, unsigned k, unsigned k2)
{
    static_assert(BUF >= 2 && (BUF & (BUF - 1)) == 0, "BUF must be a power of two >= 2");
    const unsigned stride = k2 + BUF;
    // 1. Each buffer sorted descending (ends with a barrier since BUF >= 2).
    bitonic_sort_desc(keys + k2, stride, QB, BUF);
    // 2. top[i] = max(top[i], buf[k2 - 1 - i]); buffer slots past BUF count as padding. With
    //    both lists descending this leaves the k2 best of their union in top, as a sequence
    //    that falls then rises (bitonic).
    for (unsigned t = threadIdx.x; t < QB * k2; t += blockDim.x) {
        const unsigned a = t / k2;
        const unsigned i = t - a * k2;
        key64* top = keys + static_cast<size_t>(a) * stride;
        const unsigned j = k2 - 1u - i;
        const key64 b = (j < static_cast<unsigned>(BUF)) ? top[k2 + j] : PAD_KEY;
        if (b > top[i]) top[i] = b;
    }
    __syncthreads();
    // 3. Sort each top list again.
    bitonic_merge_desc(keys, stride, QB, k2);
    __syncthreads(); // (bitonic_merge_desc has no barrier when k2 == 1)
    // 4. Empty the buffers, new thresholds.
    for (unsigned t = threadIdx.x; t < QB * BUF; t += blockDim.x) {
        const unsigned a = t / BUF;
        const unsigned j = t - a * BUF;
        keys[static_cast<size_t>(a) * stride + k2 + j] = PAD_KEY;
    }
    for (unsigned t = threadIdx.x; t < QB; t += blockDim.x) {
        thr[t] = keys[static_cast<size_t>(t) * stride + (k - 1u)];
        cnt[t] = 0;
    }
    __syncthreads();
}

// Offers hit `key` to query a's buffer (one thread per hit). Returns true when this insertion
// leaves the buffer too full for another round of R rows.
template <int BUF, int R>
__device__ __forceinline__ bool topk_offer(key64* keys, const key64* thr, unsigned* cnt,
                                           unsigned a, unsigned k2, key64 key)
{
    if (key <= thr[a]) return false;
    const unsigned pos = atomicAdd(&cnt[a], 1u);
    // pos < BUF always holds (counts start a round at <= BUF - R, and a round adds <= R);
    // the test only keeps a logic error from writing past the buffer.
    if (pos < static_cast<unsigned>(BUF))
        keys[static_cast<size_t>(a) * (k2 + BUF) + k2 + pos] = key;
    return pos >= static_cast<unsigned>(BUF - R);
}

// Writes the first k keys of each valid query's list. Callers ran topk_reduce last.
template <int QB, int BUF>
__device__ void topk_write(const key64* keys, unsigned k, unsigned k2, unsigned q0, unsigned nq,
                           unsigned p, unsigned parts, float* __restrict__ part_scores,
                           unsigned* __restrict__ part_ids)
{
    const unsigned stride = k2 + BUF;
    for (unsigned t = threadIdx.x; t < QB * k; t += blockDim.x) {
        const unsigned a = t / k;
        const unsigned i = t - a * k;
        const unsigned q = q0 + a;
        if (q < nq) {
            const key64 key = keys[static_cast<size_t>(a) * stride + i];
            const size_t o = (static_cast<size_t>(q) * parts + p) * k + i;
            part_scores[o] = key_score(key);
            part_ids[o] = key_id(key);
        }
    }
}

// Block -> (part, query group), consecutive blocks sharing a part.
__device__ __forceinline__ void block_coords(unsigned& part, unsigned& qgroup)
{
    const unsigned long long lin =
        static_cast<unsigned long long>(blockIdx.y) * gridDim.x + blockIdx.x;
    part = static_cast<unsigned>(lin / gridDim.y);
    qgroup = static_cast<unsigned>(lin % gridDim.y);
}

// ---------------------------------------------------------------------------------------------
// CUDA-core variants (warp, q8).
// Dynamic shared memory: QB * d f16 (queries), then QB * (k2 + BUF) keys.
// ---------------------------------------------------------------------------------------------
template <int QB, int U, int BUF>
__device__ __forceinline__ void partial_rows(const __half* __restrict__ queries,
                                             const __half* __restrict__ corpus, unsigned n,
                                             unsigned d, unsigned nq, unsigned k,
                                             unsigned rows_per_part,
                                             float* __restrict__ part_scores,
                                             unsigned* __restrict__ part_ids)
{
    constexpr unsigned NT = PARTIAL_THREADS;
    constexpr unsigned GROUPS = NT / 8;      // 8-lane groups per block
    constexpr unsigned R = GROUPS * U;       // rows per round
    static_assert(BUF >= static_cast<int>(R), "a round must fit in the buffer");

    __shared__ key64 s_thr[QB];
    __shared__ unsigned s_cnt[QB];

    if (blockDim.x != NT || k == 0 || k > MAX_K || d == 0 || (d & 7u) != 0 || rows_per_part == 0)
        return;
    unsigned p, qg;
    block_coords(p, qg);
    const unsigned parts = gridDim.x;
    const unsigned q0 = qg * QB;
    if (q0 >= nq) return;
    const unsigned nqb = min(static_cast<unsigned>(QB), nq - q0); // valid queries here
    const unsigned long long row_begin = static_cast<unsigned long long>(p) * rows_per_part;
    const unsigned long long row_end =
        min(static_cast<unsigned long long>(n), row_begin + rows_per_part);

    const unsigned C = d >> 3;                // 16-byte pieces per row
    const unsigned k2 = next_pow2(k);
    uint4* qs = reinterpret_cast<uint4*>(dyn_smem);
    key64* keys = reinterpret_cast<key64*>(dyn_smem + static_cast<size_t>(QB) * d * 2u);

    const uint4* q4 = reinterpret_cast<const uint4*>(queries);
    const uint4* c4 = reinterpret_cast<const uint4*>(corpus);
    const uint4 zero4 = make_uint4(0u, 0u, 0u, 0u);

    for (unsigned t = threadIdx.x; t < QB * C; t += NT) {
        const unsigned a = t / C;
        const unsigned c = t - a * C;
        qs[t] = (a < nqb) ? __ldg(q4 + static_cast<size_t>(q0 + a) * C + c) : zero4;
    }
    topk_init<QB, BUF>(keys, s_thr, s_cnt, k2);
    __syncthreads();

    const unsigned lg = threadIdx.x & 7u;     // lane within the group
    const unsigned g = threadIdx.x >> 3;      // group within the block

    for (unsigned long long base = row_begin; base < row_end; base += R) {
        float acc[U][QB];
        bool valid[U];
        const uint4* rowp[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const unsigned long long row = base + g + static_cast<unsigned long long>(GROUPS) * u;
            valid[u] = row < row_end;
            rowp[u] = c4 + (valid[u] ? row * C : 0ull);
#pragma unroll
            for (int j = 0; j < QB; ++j) acc[u][j] = 0.f;
        }

        for (unsigned c = lg; c < C; c += 8) {
            float2 f[U][4];
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const uint4 v = valid[u] ? __ldg(rowp[u] + c) : zero4;
                f[u][0] = halves_to_float2(v.x);
                f[u][1] = halves_to_float2(v.y);
                f[u][2] = halves_to_float2(v.z);
                f[u][3] = halves_to_float2(v.w);
            }
#pragma unroll
            for (int j = 0; j < QB; ++j) {
                if (static_cast<unsigned>(j) < nqb) {
                    const uint4 w = qs[static_cast<size_t>(j) * C + c];
                    const float2 w0 = halves_to_float2(w.x);
                    const float2 w1 = halves_to_float2(w.y);
                    const float2 w2 = halves_to_float2(w.z);
                    const float2 w3 = halves_to_float2(w.w);
#pragma unroll
                    for (int u = 0; u < U; ++u) {
                        float s = acc[u][j];
                        s = fmaf(f[u][0].x, w0.x, s);
                        s = fmaf(f[u][0].y, w0.y, s);
                        s = fmaf(f[u][1].x, w1.x, s);
                        s = fmaf(f[u][1].y, w1.y, s);
                        s = fmaf(f[u][2].x, w2.x, s);
                        s = fmaf(f[u][2].y, w2.y, s);
                        s = fmaf(f[u][3].x, w3.x, s);
                        s = fmaf(f[u][3].y, w3.y, s);
                        acc[u][j] = s;
                    }
                }
            }
        }

        // Sum over the 8 lanes of each group (nqb is uniform, so every lane shuffles alike).
#pragma unroll
        for (int j = 0; j < QB; ++j) {
            if (static_cast<unsigned>(j) < nqb) {
#pragma unroll
                for (int u = 0; u < U; ++u) {
                    float s = acc[u][j];
                    s += __shfl_xor_sync(FULL_MASK, s, 4);
                    s += __shfl_xor_sync(FULL_MASK, s, 2);
                    s += __shfl_xor_sync(FULL_MASK, s, 1);
                    acc[u][j] = s;
                }
            }
        }

        // Lane lg of the group offers the hits of query lg.
        bool full = false;
        if (lg < nqb) {
#pragma unroll
            for (int u = 0; u < U; ++u) {
                if (valid[u]) {
                    float s = acc[u][0];
#pragma unroll
                    for (int j = 1; j < QB; ++j)
                        if (lg == static_cast<unsigned>(j)) s = acc[u][j];
                    const unsigned row = static_cast<unsigned>(
                        base + g + static_cast<unsigned long long>(GROUPS) * u);
                    full |= topk_offer<BUF, R>(keys, s_thr, s_cnt, lg, k2, make_key(s, row));
                }
            }
        }
        if (__syncthreads_or(full)) topk_reduce<QB, BUF>(keys, s_thr, s_cnt, k, k2);
    }

    topk_reduce<QB, BUF>(keys, s_thr, s_cnt, k, k2);
    topk_write<QB, BUF>(keys, k, k2, q0, nq, p, parts, part_scores, part_ids);
}

// ---------------------------------------------------------------------------------------------
// Tensor-core variants (mma, mma64). Dynamic shared memory: Q * (k2 + BUF) keys.
// ---------------------------------------------------------------------------------------------
namespace mmacfg {
constexpr unsigned R = 64;          // corpus rows per tile
constexpr unsigned DK = 64;         // d columns per chunk
constexpr unsigned LDA = DK + 8;    // padded row length (f16) of the corpus / query tiles
constexpr unsigned LDS = R + 4;     // padded column length (f32) of the score tile
constexpr int BUF = 128;
} // namespace mmacfg

// Loads chunk `step` (tile = step / nch, chunk = step % nch) of the corpus and the queries into
// registers; zeros outside the part, past nq or past d.
template <int Q>
__device__ __forceinline__ void mma_fetch(uint4 (&ra)[mmacfg::R * mmacfg::DK / 8 / PARTIAL_THREADS],
                                          uint4 (&rb)[Q * mmacfg::DK / 8 / PARTIAL_THREADS],
                                          const uint4* __restrict__ q4,
                                          const uint4* __restrict__ c4, unsigned long long step,
                                          unsigned nch, unsigned long long row_begin,
                                          unsigned long long row_end, unsigned d, unsigned q0,
                                          unsigned nq)
{
    using namespace mmacfg;
    constexpr unsigned APT = R * DK / 8 / PARTIAL_THREADS;
    constexpr unsigned BPT = Q * DK / 8 / PARTIAL_THREADS;
    const unsigned long long tile = step / nch;
    const unsigned ch = static_cast<unsigned>(step - tile * nch);
    const unsigned long long row0 = row_begin + tile * R;
    const unsigned C = d >> 3;
    const uint4 zero4 = make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
    for (unsigned j = 0; j < APT; ++j) {
        const unsigned e = threadIdx.x + j * PARTIAL_THREADS;
        const unsigned r = e >> 3;
        const unsigned piece = ch * (DK / 8) + (e & 7u);   // 16-byte piece within the row
        const unsigned long long row = row0 + r;
        ra[j] = (row < row_end && piece < C) ? __ldg(c4 + row * C + piece) : zero4;
    }
#pragma unroll
    for (unsigned j = 0; j < BPT; ++j) {
        const unsigned e = threadIdx.x + j * PARTIAL_THREADS;
        const unsigned a = e >> 3;
        const unsigned piece = ch * (DK / 8) + (e & 7u);
        const unsigned q = q0 + a;
        rb[j] = (q < nq && piece < C) ? __ldg(q4 + static_cast<size_t>(q) * C + piece) : zero4;
    }
}

template <int Q>
__device__ __forceinline__ void partial_mma(const __half* __restrict__ queries,
                                            const __half* __restrict__ corpus, unsigned n,
                                            unsigned d, unsigned nq, unsigned k,
                                            unsigned rows_per_part,
                                            float* __restrict__ part_scores,
                                            unsigned* __restrict__ part_ids)
{
    using namespace nvcuda;
    using namespace mmacfg;
    constexpr unsigned NT = PARTIAL_THREADS;
    constexpr unsigned QTW = Q / 32;                   // 16-query tiles per warp
    constexpr unsigned APT = R * DK / 8 / NT;
    constexpr unsigned BPT = Q * DK / 8 / NT;
    static_assert(Q == 32 || Q == 64, "8 warps cover 4 row tiles x (Q / 16) query tiles");
    static_assert(APT * NT * 8 == R * DK && BPT * NT * 8 == Q * DK, "even tile loads");
    static_assert(BUF >= static_cast<int>(R), "a tile must fit in the buffer");

    __shared__ __align__(128) __half As[R * LDA];     // corpus chunk, row-major
    __shared__ __align__(128) __half Bs[Q * LDA];     // query chunk, one query per row
    __shared__ __align__(128) float Ss[Q * LDS];      // scores, Ss[q * LDS + r]
    __shared__ key64 s_thr[Q];
    __shared__ unsigned s_cnt[Q];

    if (blockDim.x != NT || k == 0 || k > MAX_K || d == 0 || (d & 7u) != 0 || rows_per_part == 0)
        return;
    unsigned p, qg;
    block_coords(p, qg);
    const unsigned parts = gridDim.x;
    const unsigned q0 = qg * Q;
    if (q0 >= nq) return;
    const unsigned long long row_begin = static_cast<unsigned long long>(p) * rows_per_part;
    const unsigned long long row_end =
        min(static_cast<unsigned long long>(n), row_begin + rows_per_part);
    const unsigned k2 = next_pow2(k);
    // The caller sized dynamic shared memory for Q * (k2 + BUF) keys (max_k bounds it).
    key64* keys = reinterpret_cast<key64*>(dyn_smem);

    const uint4* q4 = reinterpret_cast<const uint4*>(queries);
    const uint4* c4 = reinterpret_cast<const uint4*>(corpus);

    topk_init<Q, BUF>(keys, s_thr, s_cnt, k2);
    __syncthreads();

    const unsigned warp = threadIdx.x >> 5;
    const unsigned rt = warp >> 1;                     // row tile 0..3
    const unsigned qt0 = (warp & 1u) * QTW;            // first query tile
    const unsigned nch = (d + DK - 1) / DK;
    const unsigned long long ntiles = (row_end - row_begin + R - 1) / R;
    const unsigned long long total = ntiles * nch;

    uint4 ra[APT];
    uint4 rb[BPT];
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[QTW];

    if (total > 0)
        mma_fetch<Q>(ra, rb, q4, c4, 0, nch, row_begin, row_end, d, q0, nq);

    for (unsigned long long s = 0; s < total; ++s) {
        const unsigned long long tile = s / nch;
        const unsigned ch = static_cast<unsigned>(s - tile * nch);

        __syncthreads();                               // all warps done with the last chunk
#pragma unroll
        for (unsigned j = 0; j < APT; ++j) {
            const unsigned e = threadIdx.x + j * NT;
            *reinterpret_cast<uint4*>(&As[(e >> 3) * LDA + (e & 7u) * 8]) = ra[j];
        }
#pragma unroll
        for (unsigned j = 0; j < BPT; ++j) {
            const unsigned e = threadIdx.x + j * NT;
            *reinterpret_cast<uint4*>(&Bs[(e >> 3) * LDA + (e & 7u) * 8]) = rb[j];
        }
        __syncthreads();
        if (s + 1 < total)                             // next chunk in flight during the mma
            mma_fetch<Q>(ra, rb, q4, c4, s + 1, nch, row_begin, row_end, d, q0, nq);

        if (ch == 0) {
#pragma unroll
            for (unsigned j = 0; j < QTW; ++j) wmma::fill_fragment(acc[j], 0.0f);
        }
#pragma unroll
        for (unsigned ks = 0; ks < DK / 16; ++ks) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
            wmma::load_matrix_sync(fa, As + rt * 16 * LDA + ks * 16, LDA);
#pragma unroll
            for (unsigned j = 0; j < QTW; ++j) {
                // B (k x query) element (kk, qq) sits at Bs[qq * LDA + kk]: column-major.
                wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> fb;
                wmma::load_matrix_sync(fb, Bs + (qt0 + j) * 16 * LDA + ks * 16, LDA);
                wmma::mma_sync(acc[j], fa, fb, acc[j]);
            }
        }

        if (ch == nch - 1) {
            // Score (row i, query jj) of this warp's tile goes to Ss[(qt*16 + jj) * LDS + rt*16 + i].
#pragma unroll
            for (unsigned j = 0; j < QTW; ++j)
                wmma::store_matrix_sync(Ss + (qt0 + j) * 16 * LDS + rt * 16, acc[j], LDS,
                                        wmma::mem_col_major);
            __syncthreads();
            const unsigned long long row0 = row_begin + tile * R;
            bool full = false;
            for (unsigned idx = threadIdx.x; idx < Q * R; idx += NT) {
                const unsigned a = idx / R;
                const unsigned r = idx - a * R;
                const unsigned long long row = row0 + r;
                if (row < row_end && q0 + a < nq) {
                    const key64 key = make_key(Ss[a * LDS + r], static_cast<unsigned>(row));
                    full |= topk_offer<BUF, R>(keys, s_thr, s_cnt, a, k2, key);
                }
            }
            if (__syncthreads_or(full)) topk_reduce<Q, BUF>(keys, s_thr, s_cnt, k, k2);
        }
    }

    topk_reduce<Q, BUF>(keys, s_thr, s_cnt, k, k2);
    topk_write<Q, BUF>(keys, k, k2, q0, nq, p, parts, part_scores, part_ids);
}

} // namespace

// ---------------------------------------------------------------------------------------------
// Partial kernels (see the header for the launch contract).
// ---------------------------------------------------------------------------------------------
#define SIMILARITY_PARTIAL_ARGS                                                                \
    const __half *__restrict__ queries, const __half *__restrict__ corpus, unsigned int n,     \
        unsigned int d, unsigned int nq, unsigned int k, unsigned int rows_per_part,           \
        float *__restrict__ part_scores, unsigned int *__restrict__ part_ids

extern "C" __global__ void __launch_bounds__(PARTIAL_THREADS, 4)
    similarity_partial_warp(SIMILARITY_PARTIAL_ARGS)
{
    partial_rows<1, 4, 512>(queries, corpus, n, d, nq, k, rows_per_part, part_scores, part_ids);
}

extern "C" __global__ void __launch_bounds__(PARTIAL_THREADS, 3)
    similarity_partial_q8(SIMILARITY_PARTIAL_ARGS)
{
    partial_rows<8, 2, 128>(queries, corpus, n, d, nq, k, rows_per_part, part_scores, part_ids);
}

extern "C" __global__ void __launch_bounds__(PARTIAL_THREADS, 2)
    similarity_partial_mma(SIMILARITY_PARTIAL_ARGS)
{
    partial_mma<32>(queries, corpus, n, d, nq, k, rows_per_part, part_scores, part_ids);
}

extern "C" __global__ void __launch_bounds__(PARTIAL_THREADS, 1)
    similarity_partial_mma64(SIMILARITY_PARTIAL_ARGS)
{
    partial_mma<64>(queries, corpus, n, d, nq, k, rows_per_part, part_scores, part_ids);
}

// ---------------------------------------------------------------------------------------------
// Merge: the k best of each query's parts * k candidates (see the header).
// ---------------------------------------------------------------------------------------------
extern "C" __global__ void __launch_bounds__(MERGE_THREADS)
    similarity_merge(const float* __restrict__ part_scores,
                     const unsigned int* __restrict__ part_ids, unsigned int nq,
                     unsigned int parts, unsigned int k, float* __restrict__ out_scores,
                     unsigned int* __restrict__ out_ids)
{
    __shared__ unsigned hist[256];
    __shared__ key64 sel[MAX_K];
    __shared__ key64 s_prefix;     // chosen high bits of the k-th key
    __shared__ key64 s_mask;       // which bits s_prefix fixes
    __shared__ unsigned s_rem;     // how many of the keys matching the prefix are still needed
    __shared__ unsigned s_done;
    __shared__ unsigned s_ngt;
    __shared__ unsigned s_neq;

    const unsigned q = blockIdx.x;
    if (q >= nq || k == 0 || k > MAX_K || blockDim.x != MERGE_THREADS) return;
    const unsigned tid = threadIdx.x;
    const unsigned lane = tid & 31u;
    const unsigned warp = tid >> 5;
    const size_t obase = static_cast<size_t>(q) * k;

    if (parts == 0) {
        for (unsigned i = tid; i < k; i += MERGE_THREADS) {
            out_scores[obase + i] = key_score(PAD_KEY);
            out_ids[obase + i] = key_id(PAD_KEY);
        }
        return;
    }

    const unsigned m = parts * k;   // candidates of this query (>= k)
    const float* sc = part_scores + static_cast<size_t>(q) * m;
    const unsigned* id = part_ids + static_cast<size_t>(q) * m;

    if (tid == 0) {
        s_prefix = 0;
        s_mask = 0;
        s_rem = k;
        s_done = 0;
    }

    // Invariant: 1 <= s_rem <= number of keys matching the prefix, and exactly k - s_rem keys
    // lie above every key matching it.
    for (int pass = 0; pass < 8; ++pass) {
        const unsigned shift = 56u - 8u * pass;
        for (unsigned i = tid; i < 256; i += MERGE_THREADS) hist[i] = 0;
        __syncthreads();
        const key64 prefix = s_prefix;
        const key64 mask = s_mask;
        // Uniform trip count so that whole warps reach the warp-wide intrinsics.
        for (unsigned j0 = 0; j0 < m; j0 += MERGE_THREADS) {
            const unsigned j = j0 + tid;
            const bool in = j < m;
            const key64 key = in ? make_key(sc[j], id[j]) : 0ull;
            const bool take = in && ((key & mask) == prefix);
            const unsigned digit = static_cast<unsigned>(key >> shift) & 0xffu;
            const unsigned active = __ballot_sync(FULL_MASK, take);
            if (take) {
                const unsigned peers = __match_any_sync(active, digit);
                if (lane == static_cast<unsigned>(__ffs(peers) - 1))
                    atomicAdd(&hist[digit], static_cast<unsigned>(__popc(peers)));
            }
        }
        __syncthreads();
        if (warp == 0) {
            // Lane l holds bins 255 - 8l down to 248 - 8l; lanes in order cover 255 .. 0.
            unsigned sum = 0;
#pragma unroll
            for (unsigned b = 0; b < 8; ++b) sum += hist[255u - 8u * lane - b];
            unsigned incl = sum;
#pragma unroll
            for (unsigned off = 1; off < 32; off <<= 1) {
                const unsigned y = __shfl_up_sync(FULL_MASK, incl, off);
                if (lane >= off) incl += y;
            }
            const unsigned excl = incl - sum;    // keys in bins above this lane's
            const unsigned rem = s_rem;
            if (excl < rem && rem <= incl) {     // exactly one lane
                unsigned above = excl;
                for (unsigned b = 0; b < 8; ++b) {
                    const unsigned bin = 255u - 8u * lane - b;
                    const unsigned h = hist[bin];
                    if (above + h >= rem) {
                        s_prefix = prefix | (static_cast<key64>(bin) << shift);
                        s_mask = mask | (0xffull << shift);
                        s_rem = rem - above;
                        s_done = (h == rem - above || shift == 0) ? 1u : 0u;
                        break;
                    }
                    above += h;
                }
            }
        }
        __syncthreads();
        if (s_done) break;
    }

    const key64 prefix = s_prefix;
    const key64 mask = s_mask;
    const unsigned rem = s_rem;
    const unsigned ngt = k - rem;   // keys above the prefix: all taken
    const unsigned k2 = next_pow2(k);
    for (unsigned i = tid; i < MAX_K; i += MERGE_THREADS) sel[i] = PAD_KEY;
    if (tid == 0) {
        s_ngt = 0;
        s_neq = 0;
    }
    __syncthreads();
    for (unsigned j = tid; j < m; j += MERGE_THREADS) {
        const key64 key = make_key(sc[j], id[j]);
        const key64 hi = key & mask;
        if (hi > prefix) {
            const unsigned pos = atomicAdd(&s_ngt, 1u);
            if (pos < ngt) sel[pos] = key;
        } else if (hi == prefix) {
            const unsigned pos = atomicAdd(&s_neq, 1u);
            if (pos < rem) sel[ngt + pos] = key;   // equal keys beyond rem are padding twins
        }
    }
    __syncthreads();
    bitonic_sort_desc(sel, 0, 1, k2);
    __syncthreads();
    for (unsigned i = tid; i < k; i += MERGE_THREADS) {
        out_scores[obase + i] = key_score(sel[i]);
        out_ids[obase + i] = key_id(sel[i]);
    }
}
