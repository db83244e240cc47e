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
//                                   part_scores, part_ids, seed, seed_stride)
//      grid (parts, ceil(nq / queries_per_block)), parts = ceil(n / rows_per_part);
//      block (threads); dynamic shared memory smem_bytes(k, d) from the table.
//      Part p is the corpus rows [p * rows_per_part, min(n, (p + 1) * rows_per_part)).
//      For each query q < nq and part p it writes k entries at (q * parts + p) * k + i of
//      part_scores / part_ids: the part's k best rows, best first; slots past the part's row
//      count hold score -INFINITY and id 0xFFFFFFFF.
//   2. similarity_merge(part_scores, part_ids, nq, parts, k, out_scores, out_ids)
//      grid (nq), block (MERGE_THREADS = 512), no dynamic shared memory.
//      Writes the k best of each query's parts * k candidates to out_* at q * k + i.
//   Shapes: d a multiple of 8 in 8..max_d of the variant (2048; 1024 for mmaq32, 512 for
//   mmaq64), 1 <= k <= max_k of the variant (256, or 128 for mma64 and mmaq64), n >= 1 (ids are
//   u32; 0xFFFFFFFF is reserved for padding), nq >= 1. Both input pointers must be 16-byte
//   aligned (every row start then is, as d is a multiple of 8).
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
//   after the final round, then top[0..k) is written out. (mmaq32 and mmaq64 handle a full
//   buffer differently, by folding and retrying; see VARIANTS.)
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
//   mmaq32 (queries_per_block 32, 256 threads, R = 128, BUF = 64, max_k 256, max_d 1024)
//   mmaq64 (queries_per_block 64, 256 threads, R = 128, BUF = 64, max_k 128, max_d 512)
//     Same code (partial_pipe<Q, MAXK, MAXD>), WMMA m16n16k16 as in mma, reorganised so that
//     the tensor cores are fed without stalls:
//     - The block's queries are copied into shared memory once (f16, rows of roundup(d, 64) + 8
//       halves, zeros past nq and d) and stay there: only corpus data moves per step. This is
//       what bounds max_d.
//     - The corpus streams through a ring of S stages of 128 rows x 64 columns (rows padded to
//       72 halves), filled with cp.async (16-byte cp.async.cg with zero-fill for rows past the
//       part and columns past d, an L2 256-byte prefetch hint, one commit group per step).
//       Step s waits for its own group, passes one barrier, issues step s + S - 1 into the
//       stage freed by step s - 1, then runs its MMAs: one barrier per step, S - 1 steps of
//       loads in flight. S is not compiled in: the kernel reads the dynamic shared memory size
//       of its launch (%dynamic_smem_size) and uses as many stages as fit after the queries
//       and the top-k state, at most 8; the table's formula fills the 227 KB a block may have
//       (3 to 8 stages over the supported shapes; one block per SM either way).
//     - Each warp owns a block of the 128 x Q score tile: in mmaq32 the 8 warps are stacked
//       along the rows (16 rows x 32 queries each: two accumulators, 1.5 fragment loads per
//       MMA); in mmaq64 they form 4 x 2 (32 rows x 32 queries each: four accumulators, one
//       fragment load per MMA).
//     - The tile is filtered straight from the accumulators, with no score tile in shared
//       memory. Which (row, query) an accumulator element holds is learned at start-up by
//       loading a matrix of element numbers into a fragment (the layout is not assumed). Each
//       score is compared as a float with a cached float copy of the query's threshold; only
//       survivors build a 64-bit key and compare it with the threshold key.
//     - Candidate buffers of BUF = 64 keys that may overflow: an offer that finds the buffer
//       full is kept (one bit per accumulator element), the block folds (pipe_fold: the
//       topk_reduce algorithm, skipping queries whose buffer is empty, also refreshing the
//       float thresholds) and the kept offers are made again, until none is left. Every round
//       stores BUF keys for each query that overflowed, so it ends. Buffers therefore need not
//       hold a whole tile, and a fold happens only when some buffer is really full.
//   Block order: the kernels renumber blocks so that consecutive block ids take the same corpus
//   part with different query groups; blocks running together then read the same rows, and the
//   second and later reads come from L2.
//
// GEMM FILTER
//   For batches, a search can also take its products from cuBLAS: the corpus is walked in
//   chunks of C rows; for each, one GEMM (f16 in, f32 out: every product exact, sums in f32
//   on the tensor cores) writes the chunk's nq x C scores into a buffer reused for every
//   chunk, and similarity_filter_scores(scores, C, row0, nq, k, rows_per_part, part0,
//   total_parts, part_scores, part_ids, seed, seed_stride) (grid (parts of the chunk, nq), 256
//   threads, (k2 + 512) keys of dynamic shared memory) turns each query's share of a part into
//   the part's k best with the running top-k above, one row per thread per round; parts are
//   numbered across chunks (part0 = the chunk's first), and the merge below combines them. Only
//   one chunk of scores exists at a time, never the nq x n matrix.
//
// SEEDED THRESHOLDS
//   The partial kernels take an optional seed (null: none): seed[q * seed_stride] is a lower
//   bound of query q's k-th best score, found by a first search over a prefix of the corpus of
//   at least k rows (the k-th best of a subset is never above the k-th best of the whole). Each
//   block then starts its sorted lists filled with the key (seed, id 0xFFFFFFFF) instead of
//   padding, so its threshold is the seed from the first row: a part whose rows all score
//   below it offers nothing and never folds, where without a seed every part fills its list
//   with its own k best first (the warm-up that dominated small parts at k = 100). The result
//   is exact: every row of the true top k scores at least the seed and has an id below
//   0xFFFFFFFF, so its key beats the seed's key, and at least k such rows exist (the prefix's
//   own top k), so no seed entry reaches the merged top k. The host launches the prefix search
//   and points `seed` at its merged scores (at k - 1, stride k), all on the device.
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
//   v1: warp, q8, mma, mma64 and the radix-select merge. Parity with the CPU reference on an
//   H200 (55 cases: odd sizes, poisoned outputs); compute-sanitizer memcheck clean.
//   ptxas -v (sm_90, CUDA 13.0), registers / static shared memory, no spills, no stack frame:
//     warp 61 / 16 B, q8 64 / 96 B, mma 64 / 22,912 B, mma64 102 / 36,608 B, merge 38 / 3,104 B.
//   __launch_bounds__ minimum blocks per SM (register caps): warp 4, q8 3, mma 2, mma64 1.
//   Measured on an NVIDIA H200, 2026-11-27: d = 384, f16 corpus, best rows_per_part per shape,
//   time per search (partial + merge), against PyTorch matmul + topk on the same card:
//         n     nq    k   best v1 variant     PyTorch
//       1e6     32   10   mma     0.669 ms   0.567 ms
//       1e6     32  100   mma     1.132 ms   0.571 ms
//       1e6    256   10   mma64   2.670 ms   2.384 ms
//       1e6    256  100   mma     4.170 ms   2.376 ms
//       1e7     32   10   mma     3.823 ms   4.371 ms
//       1e7     32  100   mma     4.616 ms   4.404 ms
//       1e7    256   10   mma64  21.45 ms   24.92 ms
//       1e7    256  100   mma    31.62 ms   24.89 ms
//   (nq = 1: warp reaches 88% of the H200's HBM bandwidth.) At nq = 256 and n = 1e7 the mma
//   kernels run near 90 TFLOP/s, far from both floors (reading 7.7 GB once ~1.8 ms; 2 TFLOP on
//   the tensor cores ~3 ms): the query chunk was re-copied for every tile, there were two
//   barriers per 64-column chunk with little overlap, and every score went through shared
//   memory and a 64-bit key compare.
//   v2: adds mmaq32 and mmaq64 (above); v1's kernels and the merge are unchanged.
//   ptxas -v (sm_90, CUDA 13.0): mmaq32 153 registers / 512 B, mmaq64 183 registers / 1,024 B
//   static shared memory, no spills, no stack frame; __launch_bounds__(256, 1) (one block per
//   SM is what their shared memory allows anyway). On the H200, 2026-11-27 (gpu-results/
//   2026-11-27-h200-run3.log): parity 124/124 cases for all six variants, memcheck clean,
//   racecheck 0 hazards. Same shapes, best rows_per_part, PyTorch in the same run:
//         n     nq    k   best v2 variant      PyTorch
//       1e6     32   10   mmaq32   0.541 ms   0.555 ms
//       1e6     32  100   mma      1.125 ms   0.550 ms
//       1e6    256   10   mmaq64   1.999 ms   2.335 ms
//       1e6    256  100   mmaq32   3.571 ms   2.329 ms
//       1e7     32   10   mmaq32   2.911 ms   4.384 ms
//       1e7     32  100   mmaq32   3.613 ms   4.410 ms
//       1e7    256   10   mmaq64  14.18 ms   24.68 ms
//       1e7    256  100   mmaq64  15.88 ms   24.63 ms
//   mmaq64 at nq = 256, n = 1e7 is ~140 TFLOP/s: better, still far from the ~3 ms floor. At
//   n = 1e6 and k = 100 the running top-k (warm-up folds on short parts) dominates: the next
//   thing to attack, with wgmma (sm_90a) for the products.
//   v3: seeded thresholds (SEEDED THRESHOLDS above), an option of every variant
//   (`Search::with_seed`); the warm-up it removes is what v2 left slowest at n = 1e6, k = 100.
//   Not yet run on a GPU: parity (with exact ties at the seed), memcheck and the sweep's
//   `+seed` rows will say whether it becomes the default.
//   v4: GEMM FILTER (`GemmSearch`): for batches, cuBLAS's f16 GEMM (f32 out) per chunk of
//   the corpus and similarity_filter_scores; v2's mmaq64 ran at ~140 TFLOP/s at nq = 256, n =
//   1e7, where cuBLAS's products run at several times that, and the score chunk (32 MB by
//   default) is written and read once. Also not yet run; the sweep's `gemm` rows time it.

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

// The starting threshold of query q (of nq): with a seed (a lower bound of the query's k-th
// best score, see SEEDED THRESHOLDS in the header), the key of that score with the reserved
// id, which every real row scoring at least as much beats; else padding.
__device__ __forceinline__ key64 seed_key(const float* __restrict__ seed, unsigned seed_stride,
                                          unsigned q, unsigned nq)
{
    if (seed == nullptr || q >= nq) return PAD_KEY;
    const float s = seed[static_cast<size_t>(q) * seed_stride];
    return isnan(s) ? PAD_KEY : make_key(s, 0xFFFFFFFFu);
}

// Sets every sorted list to the query's starting key (padding without a seed), buffers to
// padding, thresholds to the starting key and counts to 0. Query region a is query q0 + a.
// No barrier.
template <int QB, int BUF>
__device__ void topk_init(key64* keys, key64* thr, unsigned* cnt, unsigned k2,
                          const float* __restrict__ seed, unsigned seed_stride, unsigned q0,
                          unsigned nq)
{
    const unsigned stride = k2 + BUF;
    const unsigned total = QB * stride;
    for (unsigned t = threadIdx.x; t < total; t += blockDim.x) {
        const unsigned a = t / stride;
        keys[t] = (t - a * stride < k2) ? seed_key(seed, seed_stride, q0 + a, nq) : PAD_KEY;
    }
    for (unsigned t = threadIdx.x; t < QB; t += blockDim.x) {
        thr[t] = seed_key(seed, seed_stride, q0 + t, nq);
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
                                             unsigned* __restrict__ part_ids,
                                             const float* __restrict__ seed,
                                             unsigned seed_stride)
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
    topk_init<QB, BUF>(keys, s_thr, s_cnt, k2, seed, seed_stride, q0, nq);
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
                                            unsigned* __restrict__ part_ids,
                                             const float* __restrict__ seed,
                                             unsigned seed_stride)
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

    topk_init<Q, BUF>(keys, s_thr, s_cnt, k2, seed, seed_stride, q0, nq);
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

// ---------------------------------------------------------------------------------------------
// Pipelined tensor-core variants (mmaq32, mmaq64); design notes in the header.
// Dynamic shared memory, from the first 128-byte aligned address of the region (the table adds
// 128 bytes of slack for this):
//   Qs    Q x ldq f16, ldq = roundup(d, DK) + 8: the block's queries, loaded once
//   keys  Q x (k2 + BUF) keys: per query the sorted list, then the candidate buffer
//   As    S x R x LDA f16: ring of S corpus stages (R rows x DK columns each), S = as many as
//         the rest of the launch's dynamic shared memory holds, at most MAX_STAGES
// ---------------------------------------------------------------------------------------------
namespace pipecfg {
constexpr unsigned R = 128;         // corpus rows per tile
constexpr unsigned DK = 64;         // d columns per pipeline step
constexpr unsigned LDA = DK + 8;    // stage row length (f16): 144 bytes, 16 mod 128
constexpr unsigned STAGE_BYTES = R * LDA * 2;
constexpr unsigned MAX_STAGES = 8;
constexpr int BUF = 64;             // candidate buffer per query (overflow is retried)
constexpr unsigned ALIGN = 128;     // alignment of the dynamic regions
} // namespace pipecfg

// 16-byte global -> shared copy that bypasses L1. With full == false nothing is read and the
// 16 destination bytes are zero-filled (src must still be a valid address). The L2::256B hint
// lets L2 fetch the surrounding 256 bytes: a corpus row's next 64-column chunk, needed by the
// following step, is then already in L2.
__device__ __forceinline__ void cp_async16(void* smem_dst, const void* gmem_src, bool full)
{
    const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
    const unsigned nbytes = full ? 16u : 0u;
    asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16, %2;\n" ::"r"(dst),
                 "l"(gmem_src),
                 "r"(nbytes)
                 : "memory");
}

__device__ __forceinline__ void cp_async_commit()
{
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait()
{
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// The same for a block-uniform n (wait_group takes an immediate); any n outside the cases
// waits for everything, which is never wrong, only slower.
__device__ __forceinline__ void cp_async_wait_n(unsigned n)
{
    static_assert(pipecfg::MAX_STAGES == 8, "one case per possible n = stages - 2");
    switch (n) {
    case 1: cp_async_wait<1>(); break;
    case 2: cp_async_wait<2>(); break;
    case 3: cp_async_wait<3>(); break;
    case 4: cp_async_wait<4>(); break;
    case 5: cp_async_wait<5>(); break;
    case 6: cp_async_wait<6>(); break;
    default: cp_async_wait<0>(); break;
    }
}

// Bytes of dynamic shared memory this launch was given.
__device__ __forceinline__ unsigned dynamic_smem_bytes()
{
    unsigned b;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(b));
    return b;
}

// Folds the candidate buffer of every query with a non-zero count into its sorted list; lists
// of queries without candidates are left alone. Same algorithm as topk_reduce, plus the float
// copy of each threshold. All threads; callers must have passed a barrier since the last buffer
// write. Counts may exceed BUF (offers that found the buffer full); only the first BUF slots
// hold keys. Ends with a barrier.
template <int Q, int BUF>
__device__ void pipe_fold(key64* keys, key64* thr, float* thrf, unsigned* cnt, unsigned k,
                          unsigned k2, unsigned lk2)
{
    static_assert(BUF >= 2 && (BUF & (BUF - 1)) == 0, "BUF must be a power of two >= 2");
    constexpr unsigned NT = PARTIAL_THREADS;
    constexpr unsigned BH = BUF / 2;
    const unsigned stride = k2 + BUF;
    // 1. Sort the non-empty buffers descending (bitonic; runs alternate direction until the
    //    last, which is descending).
    for (unsigned size = 2; size <= static_cast<unsigned>(BUF); size <<= 1) {
        for (unsigned st = size >> 1; st > 0; st >>= 1) {
            for (unsigned t = threadIdx.x; t < Q * BH; t += NT) {
                const unsigned a = t / BH;
                if (cnt[a] == 0) continue;
                const unsigned i = t % BH;
                const unsigned lo = ((i & ~(st - 1u)) << 1) | (i & (st - 1u));
                const unsigned hi = lo + st;
                key64* b = keys + a * stride + k2;
                const key64 x = b[lo];
                const key64 y = b[hi];
                const bool desc = (lo & size) == 0;
                if (desc ? (x < y) : (x > y)) {
                    b[lo] = y;
                    b[hi] = x;
                }
            }
            __syncthreads();
        }
    }
    // 2. top[i] = max(top[i], buf[k2 - 1 - i]) (slots past BUF are padding and never win).
    for (unsigned t = threadIdx.x; t < Q * k2; t += NT) {
        const unsigned a = t >> lk2;
        if (cnt[a] == 0) continue;
        const unsigned i = t & (k2 - 1u);
        const unsigned j = k2 - 1u - i;
        if (j < static_cast<unsigned>(BUF)) {
            key64* top = keys + a * stride;
            const key64 b = top[k2 + j];
            if (b > top[i]) top[i] = b;
        }
    }
    __syncthreads();
    // 3. Bitonic merge of the changed lists (nothing to do when k2 == 1).
    for (unsigned st = k2 >> 1; st > 0; st >>= 1) {
        const unsigned half = k2 >> 1;
        for (unsigned t = threadIdx.x; t < Q * half; t += NT) {
            const unsigned a = t >> (lk2 - 1u);
            if (cnt[a] == 0) continue;
            const unsigned i = t & (half - 1u);
            const unsigned lo = ((i & ~(st - 1u)) << 1) | (i & (st - 1u));
            const unsigned hi = lo + st;
            key64* top = keys + a * stride;
            const key64 x = top[lo];
            const key64 y = top[hi];
            if (x < y) {
                top[lo] = y;
                top[hi] = x;
            }
        }
        __syncthreads();
    }
    // 4. Empty the used buffers, new thresholds; the counts are reset only after everybody has
    //    read them.
    for (unsigned t = threadIdx.x; t < Q * static_cast<unsigned>(BUF); t += NT) {
        const unsigned a = t / BUF;
        if (cnt[a] == 0) continue;
        keys[a * stride + k2 + (t % BUF)] = PAD_KEY;
    }
    for (unsigned t = threadIdx.x; t < Q; t += NT) {
        if (cnt[t] != 0) {
            const key64 th = keys[t * stride + (k - 1u)];
            thr[t] = th;
            thrf[t] = key_score(th);
        }
    }
    __syncthreads();
    for (unsigned t = threadIdx.x; t < Q; t += NT) cnt[t] = 0;
    __syncthreads();
}

template <int Q, unsigned MAXK, unsigned MAXD>
__device__ __forceinline__ void partial_pipe(const __half* __restrict__ queries,
                                             const __half* __restrict__ corpus, unsigned n,
                                             unsigned d, unsigned nq, unsigned k,
                                             unsigned rows_per_part,
                                             float* __restrict__ part_scores,
                                             unsigned* __restrict__ part_ids,
                                             const float* __restrict__ seed,
                                             unsigned seed_stride)
{
    using namespace nvcuda;
    using namespace pipecfg;
    typedef wmma::fragment<wmma::accumulator, 16, 16, 16, float> AccFrag;
    typedef wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> AFrag;
    typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> BFrag;
    constexpr unsigned NT = PARTIAL_THREADS;
    constexpr unsigned WQ = Q / 32;                    // warps side by side along the queries
    constexpr unsigned WR = (NT / 32) / WQ;            // warps along the rows
    constexpr unsigned MI = R / 16 / WR;               // 16-row fragments per warp
    constexpr unsigned NE = AccFrag::num_elements;     // accumulator elements per lane
    constexpr unsigned APT = R * (DK / 8) / NT;        // 16-byte copies per thread per stage
    constexpr unsigned LW = (NE + 3) / 4;              // words of packed element positions
    static_assert(Q == 32 || Q == 64, "each warp covers 32 queries");
    static_assert(MI >= 1 && MI * 16 * WR == R, "warps tile the R rows exactly");
    static_assert(NE * 32 == 256, "each accumulator element is held by exactly one lane");
    static_assert(MI * 2 * NE <= 32, "one bit per accumulator element in a 32-bit mask");
    static_assert(APT * NT == R * (DK / 8), "even stage loads");
    static_assert(MAXK <= MAX_K && MAXD % DK == 0, "limits");

    __shared__ key64 s_thr[Q];       // key of the k-th best so far
    __shared__ float s_thrf[Q];      // its score: a cheaper first test
    __shared__ unsigned s_cnt[Q];    // offers into the buffer since the last fold

    if (blockDim.x != NT || k == 0 || k > MAXK || d == 0 || (d & 7u) != 0 || d > MAXD ||
        rows_per_part == 0)
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
    const unsigned lk2 = static_cast<unsigned>(__ffs(k2) - 1);
    const unsigned stride = k2 + BUF;
    const unsigned C = d >> 3;                         // 16-byte pieces per row
    const unsigned nch = (d + DK - 1) / DK;            // steps per tile
    const unsigned ldq = nch * DK + 8;                 // resident query row (f16)
    const unsigned qpr = ldq >> 3;                     // its 16-byte pieces

    // Carve the regions; the stage count follows from what the launch provided (the table's
    // formula grants at least 3 stages for every k <= MAXK, d <= MAXD).
    const unsigned sbase = static_cast<unsigned>(__cvta_generic_to_shared(dyn_smem));
    const unsigned pad = (ALIGN - (sbase & (ALIGN - 1u))) & (ALIGN - 1u);
    const unsigned qbytes = Q * ldq * 2u;              // multiple of 128
    const unsigned kbytes = Q * stride * 8u;           // multiple of 256
    const unsigned dyn = dynamic_smem_bytes();
    if (dyn < pad + qbytes + kbytes + 2u * STAGE_BYTES) return;
    const unsigned S = min(MAX_STAGES, (dyn - pad - qbytes - kbytes) / STAGE_BYTES);
    unsigned char* base = dyn_smem + pad;
    __half* Qs = reinterpret_cast<__half*>(base);
    key64* keys = reinterpret_cast<key64*>(base + qbytes);
    __half* As = reinterpret_cast<__half*>(base + qbytes + kbytes);

    const uint4* q4 = reinterpret_cast<const uint4*>(queries);
    const uint4* c4 = reinterpret_cast<const uint4*>(corpus);

    // Queries: rows past nq and columns past d are zero-filled (so are stage columns past d:
    // both operands must be finite zeros there). They join the first commit group.
    for (unsigned t = threadIdx.x; t < Q * qpr; t += NT) {
        const unsigned a = t / qpr;
        const unsigned c = t - a * qpr;
        const bool ok = (q0 + a < nq) && (c < C);
        cp_async16(Qs + static_cast<size_t>(a) * ldq + c * 8u,
                   ok ? static_cast<const void*>(q4 + static_cast<size_t>(q0 + a) * C + c)
                      : static_cast<const void*>(q4),
                   ok);
    }

    // Corpus stage issue: rows [row0, row0 + R) x columns [ch * DK, ch * DK + DK).
    // (A part past n, impossible in a well-formed launch, has no tiles and is written as padding.)
    const unsigned long long nrows = row_end > row_begin ? row_end - row_begin : 0ull;
    const unsigned ntiles = static_cast<unsigned>((nrows + R - 1) / R);
    const unsigned total = ntiles * nch;
    unsigned f_step = 0, f_ch = 0, f_stage = 0;        // next step to fetch
    unsigned long long f_row0 = row_begin;
    auto fetch_next = [&]() {
        if (f_step < total) {
            __half* dst = As + static_cast<size_t>(f_stage) * R * LDA;
#pragma unroll
            for (unsigned j = 0; j < APT; ++j) {
                const unsigned e = threadIdx.x + j * NT;
                const unsigned r = e >> 3;
                const unsigned piece = f_ch * (DK / 8) + (e & 7u);
                const unsigned long long row = f_row0 + r;
                const bool ok = row < row_end && piece < C;
                cp_async16(dst + r * LDA + (e & 7u) * 8u,
                           ok ? static_cast<const void*>(c4 + row * C + piece)
                              : static_cast<const void*>(c4),
                           ok);
            }
            ++f_step;
            if (++f_ch == nch) {
                f_ch = 0;
                f_row0 += R;
            }
            f_stage = (f_stage + 1 == S) ? 0u : f_stage + 1;
        }
        cp_async_commit(); // empty groups keep the group count uniform
    };
    for (unsigned st = 0; st + 1 < S; ++st) fetch_next();

    // Which (row, query) of its 16 x 16 tile each accumulator element holds: load a matrix of
    // element numbers into an accumulator fragment (the keys region is free until topk init).
    const unsigned warp = threadIdx.x >> 5;
    const unsigned rbase = (warp / WQ) * (MI * 16);    // this warp's first row in the tile
    const unsigned qbase = (warp % WQ) * 32;           // this warp's first query
    unsigned lay[LW];                                  // packed bytes: 16 * row + column
    {
        float* m = reinterpret_cast<float*>(keys);
        for (unsigned t = threadIdx.x; t < 256; t += NT) m[t] = static_cast<float>(t);
        __syncthreads();
        AccFrag lf;
        wmma::load_matrix_sync(lf, m, 16, wmma::mem_row_major);
#pragma unroll
        for (unsigned w = 0; w < LW; ++w) lay[w] = 0;
#pragma unroll
        for (unsigned e = 0; e < NE; ++e)
            lay[e >> 2] |= (static_cast<unsigned>(lf.x[e]) & 0xffu) << ((e & 3u) * 8u);
        __syncthreads();
    }
    topk_init<Q, BUF>(keys, s_thr, s_cnt, k2, seed, seed_stride, q0, nq);
    for (unsigned t = threadIdx.x; t < Q; t += NT)
        s_thrf[t] = key_score(seed_key(seed, seed_stride, q0 + t, nq));
    __syncthreads();

    // Bit (mi * 2 + j) * NE + e of a mask stands for element e of accumulator acc[mi][j].
    const unsigned qv = min(static_cast<unsigned>(Q), nq - q0);   // valid queries here
    unsigned qmask = 0;
#pragma unroll
    for (unsigned mi = 0; mi < MI; ++mi)
#pragma unroll
        for (unsigned j = 0; j < 2; ++j)
#pragma unroll
            for (unsigned e = 0; e < NE; ++e) {
                const unsigned ix = (lay[e >> 2] >> ((e & 3u) * 8u)) & 0xffu;
                if (qbase + j * 16 + (ix & 15u) < qv) qmask |= 1u << ((mi * 2 + j) * NE + e);
            }

    AccFrag acc[MI][2];

    // Offers the elements named in pend (tile rows from row0); returns those that found their
    // query's buffer full.
    auto offer = [&](unsigned pend, unsigned long long row0) -> unsigned {
        unsigned dropped = 0;
#pragma unroll
        for (unsigned mi = 0; mi < MI; ++mi)
#pragma unroll
            for (unsigned j = 0; j < 2; ++j)
#pragma unroll
                for (unsigned e = 0; e < NE; ++e) {
                    const unsigned bit = 1u << ((mi * 2 + j) * NE + e);
                    if (pend & bit) {
                        const unsigned ix = (lay[e >> 2] >> ((e & 3u) * 8u)) & 0xffu;
                        const unsigned qa = qbase + j * 16 + (ix & 15u);
                        const float sc = acc[mi][j].x[e];
                        // Scores below the threshold's score cannot beat its key (NaN passes
                        // and is decided by the key, as in the other variants).
                        if (!(sc < s_thrf[qa])) {
                            const unsigned row =
                                static_cast<unsigned>(row0 + rbase + mi * 16 + (ix >> 4));
                            const key64 key = make_key(sc, row);
                            if (key > s_thr[qa]) {
                                const unsigned pos = atomicAdd(&s_cnt[qa], 1u);
                                if (pos < static_cast<unsigned>(BUF))
                                    keys[qa * stride + k2 + pos] = key;
                                else
                                    dropped |= bit;
                            }
                        }
                    }
                }
        return dropped;
    };

    unsigned ch = 0, stage = 0;
    unsigned long long row0 = row_begin;
    for (unsigned s = 0; s < total; ++s) {
        cp_async_wait_n(S - 2);                        // this thread's copies of step s landed
        __syncthreads();                               // everyone's; stage s - 1 is free again
        fetch_next();                                  // step s + S - 1 into stage (s - 1) mod S

        if (ch == 0) {
#pragma unroll
            for (unsigned mi = 0; mi < MI; ++mi)
#pragma unroll
                for (unsigned j = 0; j < 2; ++j) wmma::fill_fragment(acc[mi][j], 0.0f);
        }
        const __half* Ab = As + static_cast<size_t>(stage) * R * LDA + rbase * LDA;
        const __half* Bb = Qs + static_cast<size_t>(qbase) * ldq + ch * DK;
#pragma unroll
        for (unsigned ks = 0; ks < DK / 16; ++ks) {
            AFrag fa[MI];
            BFrag fb[2];
#pragma unroll
            for (unsigned mi = 0; mi < MI; ++mi)
                wmma::load_matrix_sync(fa[mi], Ab + mi * 16 * LDA + ks * 16, LDA);
            // B (k x query) element (kk, qq) sits at Qs[qq * ldq + column]: column-major.
#pragma unroll
            for (unsigned j = 0; j < 2; ++j)
                wmma::load_matrix_sync(fb[j], Bb + j * 16 * ldq + ks * 16, ldq);
#pragma unroll
            for (unsigned mi = 0; mi < MI; ++mi)
#pragma unroll
                for (unsigned j = 0; j < 2; ++j)
                    wmma::mma_sync(acc[mi][j], fa[mi], fb[j], acc[mi][j]);
        }

        if (ch == nch - 1) {
            // Tile complete: filter straight from the accumulators.
            unsigned pend = qmask;
            const unsigned long long left = row_end - row0;
            if (left < R) {                            // last tile of the part: mask rows
                const unsigned rv = static_cast<unsigned>(left);
#pragma unroll
                for (unsigned mi = 0; mi < MI; ++mi)
#pragma unroll
                    for (unsigned j = 0; j < 2; ++j)
#pragma unroll
                        for (unsigned e = 0; e < NE; ++e) {
                            const unsigned ix = (lay[e >> 2] >> ((e & 3u) * 8u)) & 0xffu;
                            if (rbase + mi * 16 + (ix >> 4) >= rv)
                                pend &= ~(1u << ((mi * 2 + j) * NE + e));
                        }
            }
            pend = offer(pend, row0);
            // A full buffer: fold, then offer again what did not fit (each round stores BUF
            // keys of every query that overflowed, so this ends).
            while (__syncthreads_or(pend != 0)) {
                pipe_fold<Q, BUF>(keys, s_thr, s_thrf, s_cnt, k, k2, lk2);
                pend = offer(pend, row0);
            }
            ch = 0;
            row0 += R;
        } else {
            ++ch;
        }
        stage = (stage + 1 == S) ? 0u : stage + 1;
    }
    cp_async_wait<0>();                                // nothing left in flight at exit

    // The last barrier (__syncthreads_or above, or the one after init) followed every offer.
    pipe_fold<Q, BUF>(keys, s_thr, s_thrf, s_cnt, k, k2, lk2);
    topk_write<Q, BUF>(keys, k, k2, q0, nq, p, parts, part_scores, part_ids);
}

} // namespace

// ---------------------------------------------------------------------------------------------
// Partial kernels (see the header for the launch contract).
// ---------------------------------------------------------------------------------------------
#define SIMILARITY_PARTIAL_ARGS                                                                \
    const __half *__restrict__ queries, const __half *__restrict__ corpus, unsigned int n,     \
        unsigned int d, unsigned int nq, unsigned int k, unsigned int rows_per_part,           \
        float *__restrict__ part_scores, unsigned int *__restrict__ part_ids,                   \
        const float *__restrict__ seed, unsigned int seed_stride

extern "C" __global__ void __launch_bounds__(PARTIAL_THREADS, 4)
    similarity_partial_warp(SIMILARITY_PARTIAL_ARGS)
{
    partial_rows<1, 4, 512>(queries, corpus, n, d, nq, k, rows_per_part, part_scores, part_ids,
                            seed, seed_stride);
}

extern "C" __global__ void __launch_bounds__(PARTIAL_THREADS, 3)
    similarity_partial_q8(SIMILARITY_PARTIAL_ARGS)
{
    partial_rows<8, 2, 128>(queries, corpus, n, d, nq, k, rows_per_part, part_scores, part_ids,
                            seed, seed_stride);
}

extern "C" __global__ void __launch_bounds__(PARTIAL_THREADS, 2)
    similarity_partial_mma(SIMILARITY_PARTIAL_ARGS)
{
    partial_mma<32>(queries, corpus, n, d, nq, k, rows_per_part, part_scores, part_ids,
                    seed, seed_stride);
}

extern "C" __global__ void __launch_bounds__(PARTIAL_THREADS, 1)
    similarity_partial_mma64(SIMILARITY_PARTIAL_ARGS)
{
    partial_mma<64>(queries, corpus, n, d, nq, k, rows_per_part, part_scores, part_ids,
                    seed, seed_stride);
}

extern "C" __global__ void __launch_bounds__(PARTIAL_THREADS, 1)
    similarity_partial_mmaq32(SIMILARITY_PARTIAL_ARGS)
{
    partial_pipe<32, 256, 1024>(queries, corpus, n, d, nq, k, rows_per_part, part_scores, part_ids,
                                seed, seed_stride);
}

extern "C" __global__ void __launch_bounds__(PARTIAL_THREADS, 1)
    similarity_partial_mmaq64(SIMILARITY_PARTIAL_ARGS)
{
    partial_pipe<64, 128, 512>(queries, corpus, n, d, nq, k, rows_per_part, part_scores, part_ids,
                               seed, seed_stride);
}

// ---------------------------------------------------------------------------------------------
// Filter of computed scores (GEMM FILTER in the header). Dynamic shared memory: (k2 + 512) keys.
// ---------------------------------------------------------------------------------------------
extern "C" __global__ void __launch_bounds__(PARTIAL_THREADS)
    similarity_filter_scores(const float* __restrict__ scores, unsigned int chunk_rows,
                             unsigned int row0, unsigned int nq, unsigned int k,
                             unsigned int rows_per_part, unsigned int part0,
                             unsigned int total_parts, float* __restrict__ part_scores,
                             unsigned int* __restrict__ part_ids,
                             const float* __restrict__ seed, unsigned int seed_stride)
{
    constexpr int BUF = 512;
    constexpr int R = PARTIAL_THREADS;  // rows per round: one per thread
    __shared__ key64 s_thr[1];
    __shared__ unsigned s_cnt[1];
    if (blockDim.x != PARTIAL_THREADS || k == 0 || k > MAX_K || rows_per_part == 0) return;
    const unsigned p = blockIdx.x, q = blockIdx.y;
    if (q >= nq) return;
    const unsigned k2 = next_pow2(k);
    key64* keys = reinterpret_cast<key64*>(dyn_smem);
    topk_init<1, BUF>(keys, s_thr, s_cnt, k2, seed, seed_stride, q, nq);
    __syncthreads();
    const unsigned begin = p * rows_per_part;
    const unsigned end = min(chunk_rows, begin + rows_per_part);
    const float* row = scores + static_cast<size_t>(q) * chunk_rows;
    for (unsigned base = begin; base < end; base += R) {
        const unsigned r = base + threadIdx.x;
        bool full = false;
        if (r < end) {
            full = topk_offer<BUF, R>(keys, s_thr, s_cnt, 0, k2, make_key(row[r], row0 + r));
        }
        if (__syncthreads_or(full)) topk_reduce<1, BUF>(keys, s_thr, s_cnt, k, k2);
    }
    topk_reduce<1, BUF>(keys, s_thr, s_cnt, k, k2);
    topk_write<1, BUF>(keys, k, k2, q, nq, part0 + p, total_parts, part_scores, part_ids);
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
