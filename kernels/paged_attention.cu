// Decode attention over the paged KV cache: one query token per sequence, the CUDA twin of
// `src/ops/paged_attention.rs` (whose `paged_attention_reference` is the reference).
//
// Storage of one layer: K and V each (num_blocks, kv_heads, block_size, head_dim) in f16; a
// sequence's block table lists its blocks in position order. One block of threads per
// (sequence, KV head, split): it reads each key and value of that head once and serves every
// query head of the group (grouped-query attention). The split's page indices are staged in
// shared memory. Each lane holds 16 bytes (8 halves) of a key or value row, so a 128-wide head
// is read by 16 lanes and a warp covers two positions side by side; a warp takes U such steps
// at once (U x 32 bytes of K and V in flight per lane before any arithmetic), scores them, and
// rescales its online softmax once per U steps; with S > 1 the loads go through a per-lane
// cp.async ring S steps deep, so the next steps' copies are in flight while one is computed.
// G, U and S are template parameters, one kernel per triple
// (`cited_paged_decode_g{G}_u{U}_s{S}`), so the per-head loops unroll fully and the scaled
// query lives in registers. Every warp keeps a running max, sum and output share per query
// head; warps are merged in shared memory. With several splits
// (long contexts), each split writes its (max, sum, unnormalised output) and
// `cited_paged_merge` combines them with a log-sum-exp.
//
// Prompt chunks: `cited_paged_prefill_tc_h{64,128}` (below, after the decode kernels) takes
// tiles of up to 16 consecutive tokens of one sequence as the rows of a tensor-core tile, so a
// page of K and V is read once for 16 queries instead of once per query (the decode kernels
// serve prompt tokens too, each as a row of its own, when it is off or the shape is not one it
// takes). Written after the last GPU run; `gpu-check parity` checks it (decoder parity rows
// marked "tensor-core prefill") and `gpu-check generate` times it against the decode kernel.
//
// Shapes: head_dim a power of two from 8 to 256; block_size a power of two; G from 1 to 8; a
// split covers at most 1024 pages and starts on a page. Dynamic shared memory, sized by the
// host: the split's page indices (16-byte aligned), then the larger of the copy ring
// (WARPS x 32 lanes x S x U x 2 x 16 bytes, when S > 1) and the warps' partial results
// (WARPS x G x (head_dim + 2) floats).

#include <cstdint>
#include <cuda_fp16.h>

#include "tile.cuh"

namespace {

using namespace tile;

constexpr int THREADS = 128;
constexpr int WARPS = THREADS / 32;

__device__ __forceinline__ void unpack8(const uint4& r, float f[8]) {
    const __half2* h = reinterpret_cast<const __half2*>(&r);
#pragma unroll
    for (int j = 0; j < 4; j++) {
        const float2 a = __half22float2(h[j]);
        f[2 * j] = a.x;
        f[2 * j + 1] = a.y;
    }
}

// The warps' partial results (wacc: [WARPS][G][head_dim] unnormalised outputs, wm / wl: their
// maxima (natural-log units) and sums) merged into the block's output: normalised when the
// grid has one split, else the split's (max, sum, output) for cited_paged_merge.
template <int G>
__device__ __forceinline__ void finish(const float* wacc, const float* wm, const float* wl,
                                       unsigned head_dim, unsigned kv_heads,
                                       float* __restrict__ out, float* __restrict__ part_max,
                                       float* __restrict__ part_sum,
                                       float* __restrict__ part_out) {
    const unsigned seq = blockIdx.x, kvh = blockIdx.y, split = blockIdx.z;
    const unsigned splits = gridDim.z, heads = kv_heads * G;
    for (unsigned i = threadIdx.x; i < G * head_dim; i += THREADS) {
        const unsigned g = i / head_dim, d = i % head_dim;
        float mm = -INFINITY;
        for (int w = 0; w < WARPS; w++) mm = fmaxf(mm, wm[w * G + g]);
        float sum = 0.0f, o = 0.0f;
        for (int w = 0; w < WARPS; w++) {
            const float c = mm == -INFINITY ? 0.0f : __expf(wm[w * G + g] - mm);
            sum += wl[w * G + g] * c;
            o += wacc[((size_t)w * G + g) * head_dim + d] * c;
        }
        const unsigned h = kvh * G + g;
        if (splits == 1) {
            out[((size_t)seq * heads + h) * head_dim + d] = sum > 0.0f ? o / sum : 0.0f;
        } else {
            const size_t ps = ((size_t)seq * heads + h) * splits + split;
            part_out[ps * head_dim + d] = o;
            if (d == 0) {
                part_max[ps] = mm;
                part_sum[ps] = sum;
            }
        }
    }
}

// q: (seqs, q_stride) f32, head h of sequence s at q[s * q_stride + h * head_dim];
// k, v: paged f16 storage; tables: (seqs, max_blocks) u32; lens: positions per sequence (the
// current token included); out: (seqs, heads * head_dim) f32 when splits == 1; otherwise
// part_max / part_sum: (seqs, heads, splits), part_out: (seqs, heads, splits, head_dim).
template <int G, int U, int S>
__device__ __forceinline__ void decode(const float* __restrict__ q, unsigned q_stride,
                                       const __half* __restrict__ k,
                                       const __half* __restrict__ v,
                                       const unsigned* __restrict__ tables, unsigned max_blocks,
                                       const unsigned* __restrict__ lens, unsigned kv_heads,
                                       unsigned head_dim, unsigned block_size,
                                       unsigned split_len, float scale, float* __restrict__ out,
                                       float* __restrict__ part_max,
                                       float* __restrict__ part_sum,
                                       float* __restrict__ part_out) {
    const unsigned seq = blockIdx.x, kvh = blockIdx.y, split = blockIdx.z;
    const unsigned len = lens[seq];
    const unsigned begin = split * split_len;
    const unsigned end = min(len, begin + split_len);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

    // Shared memory: the split's page indices, then either the ring of K/V copies in flight
    // (main loop, S > 1) or the warps' partial results (merge), which reuse the same bytes.
    extern __shared__ __align__(16) unsigned char smem[];
    unsigned* pages = reinterpret_cast<unsigned*>(smem);
    unsigned char* after_pages = smem + ((split_len / block_size) * 4 + 15) / 16 * 16;
    uint4* ring = reinterpret_cast<uint4*>(after_pages);   // [WARPS][S][U][2][32]
    float* wacc = reinterpret_cast<float*>(after_pages);  // [WARPS][G][head_dim]
    float* wm = wacc + WARPS * G * head_dim;              // [WARPS][G]
    float* wl = wm + WARPS * G;                           // [WARPS][G]

    const unsigned first_page = begin / block_size;
    const unsigned last_page = end > begin ? (end - 1) / block_size : first_page;
    for (unsigned i = threadIdx.x; end > begin && first_page + i <= last_page; i += THREADS) {
        pages[i] = tables[(size_t)seq * max_blocks + first_page + i];
    }

    // Lanes per position: 8 halves (16 bytes) each.
    const unsigned lanes_per_pos = head_dim / 8;  // 1..32
    const unsigned pos_per_warp = 32 / lanes_per_pos;
    const unsigned sub = lane / lanes_per_pos;    // which position of the warp step
    const unsigned piece = lane % lanes_per_pos;  // which 8 dims of it

    // This lane's 8 dims of every query head of the group, scaled.
    float qr[G][8];
#pragma unroll
    for (int g = 0; g < G; g++) {
        const float* src =
            q + (size_t)seq * q_stride + (kvh * G + g) * head_dim + piece * 8;
#pragma unroll
        for (int j = 0; j < 8; j++) qr[g][j] = src[j] * scale;
    }
    float m[G], l[G], acc[G][8];
#pragma unroll
    for (int g = 0; g < G; g++) {
        m[g] = -INFINITY;
        l[g] = 0.0f;
#pragma unroll
        for (int j = 0; j < 8; j++) acc[g][j] = 0.0f;
    }
    __syncthreads();

    const unsigned warp_span = pos_per_warp * U;  // positions one warp takes per iteration
    const size_t head_off = (size_t)kvh * block_size * head_dim + piece * 8;
    const size_t page_elems = (size_t)kv_heads * block_size * head_dim;
    // Iterations of this warp: base(it) = begin + (warp + it * WARPS) * warp_span.
    const unsigned first = begin + warp * warp_span;
    const unsigned iters =
        first < end ? (end - first + WARPS * warp_span - 1) / (WARPS * warp_span) : 0;
    // Element offset of position `pos` of this lane's piece. Page sizes are powers of two
    // (checked by the host): a shift and a mask per position, not a division.
    const unsigned page_shift = __ffs(block_size) - 1, slot_mask = block_size - 1;
    auto offset = [&](unsigned pos) {
        const unsigned page = pages[(pos >> page_shift) - first_page];
        return page * page_elems + head_off + (size_t)(pos & slot_mask) * head_dim;
    };
    // S > 1: every lane copies its own 16 bytes of U keys and values per iteration into its
    // slots of a ring S iterations deep (cp.async; positions past the end are zero-filled) and
    // reads back only what it copied, so no barrier is needed, only the lane's own waits.
    uint4* my_ring = ring + (size_t)warp * S * U * 2 * 32 + lane;
    auto issue = [&](unsigned it) {
        if (it < iters) {
            const unsigned base = first + it * WARPS * warp_span;
            uint4* slot = my_ring + (size_t)(it % S) * U * 2 * 32;
#pragma unroll
            for (int u = 0; u < U; u++) {
                const unsigned pos = base + u * pos_per_warp + sub;
                const bool live = pos < end;
                const size_t off = live ? offset(pos) : 0;
                cp_async16(slot + (u * 2) * 32, k + off, live);
                cp_async16(slot + (u * 2 + 1) * 32, v + off, live);
            }
        }
        cp_async_commit();  // an empty group past the end keeps the counting uniform
    };
    if (S > 1) {
#pragma unroll
        for (int i = 0; i < S - 1; i++) issue(i);
    }
    for (unsigned it = 0; it < iters; it++) {
        const unsigned base = first + it * WARPS * warp_span;
        uint4 kr[U], vr[U];
        bool live[U];
        if (S > 1) {
            issue(it + S - 1);
            cp_async_wait<S - 1>();  // iteration `it`'s group has landed
            const uint4* slot = my_ring + (size_t)(it % S) * U * 2 * 32;
#pragma unroll
            for (int u = 0; u < U; u++) {
                live[u] = base + u * pos_per_warp + sub < end;
                kr[u] = slot[(u * 2) * 32];
                vr[u] = slot[(u * 2 + 1) * 32];
            }
        } else {
#pragma unroll
            for (int u = 0; u < U; u++) {
                const unsigned pos = base + u * pos_per_warp + sub;
                live[u] = pos < end;
                if (live[u]) {
                    const size_t off = offset(pos);
                    kr[u] = __ldg(reinterpret_cast<const uint4*>(k + off));
                    vr[u] = __ldg(reinterpret_cast<const uint4*>(v + off));
                } else {
                    kr[u] = make_uint4(0, 0, 0, 0);
                    vr[u] = make_uint4(0, 0, 0, 0);
                }
            }
        }
        // Scores: each key unpacked once and dotted with every query head of the group.
        float s[G][U];
#pragma unroll
        for (int u = 0; u < U; u++) {
            float kf[8];
            unpack8(kr[u], kf);
#pragma unroll
            for (int g = 0; g < G; g++) {
                float t = 0.0f;
#pragma unroll
                for (int j = 0; j < 8; j++) t = fmaf(qr[g][j], kf[j], t);
                s[g][u] = t;
            }
        }
        // Sum over the lanes of each position (a power of two, aligned); the G x U sums
        // interleave so the shuffles overlap.
        for (unsigned o = lanes_per_pos / 2; o > 0; o >>= 1) {
#pragma unroll
            for (int g = 0; g < G; g++) {
#pragma unroll
                for (int u = 0; u < U; u++) s[g][u] += __shfl_xor_sync(0xFFFFFFFFu, s[g][u], o);
            }
        }
        // One rescale per head for the U positions this lane saw (a lane's positions of a
        // warp are merged at the end like warps are); s becomes the weights.
#pragma unroll
        for (int g = 0; g < G; g++) {
            float nm = m[g];
#pragma unroll
            for (int u = 0; u < U; u++) nm = live[u] ? fmaxf(nm, s[g][u]) : nm;
            const float c = nm == -INFINITY ? 1.0f : __expf(m[g] - nm);
            l[g] *= c;
#pragma unroll
            for (int j = 0; j < 8; j++) acc[g][j] *= c;
#pragma unroll
            for (int u = 0; u < U; u++) {
                s[g][u] = live[u] ? __expf(s[g][u] - nm) : 0.0f;
                l[g] += s[g][u];
            }
            m[g] = nm;
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            float vf[8];
            unpack8(vr[u], vf);
#pragma unroll
            for (int g = 0; g < G; g++) {
#pragma unroll
                for (int j = 0; j < 8; j++) acc[g][j] = fmaf(s[g][u], vf[j], acc[g][j]);
            }
        }
    }

    if (S > 1) cp_async_wait<0>();  // only empty groups remain; nothing may land later
    __syncthreads();                 // every warp is done with the ring the merge reuses

    // Merge the positions of a warp (lanes with the same piece), then the warps.
#pragma unroll
    for (int g = 0; g < G; g++) {
        for (unsigned o = lanes_per_pos; o < 32; o <<= 1) {
            const float om = __shfl_xor_sync(0xFFFFFFFFu, m[g], o);
            const float ol = __shfl_xor_sync(0xFFFFFFFFu, l[g], o);
            const float nm = fmaxf(m[g], om);
            const float c = nm == -INFINITY ? 0.0f : __expf(m[g] - nm);
            const float oc = nm == -INFINITY ? 0.0f : __expf(om - nm);
            l[g] = l[g] * c + ol * oc;
#pragma unroll
            for (int j = 0; j < 8; j++) {
                const float oa = __shfl_xor_sync(0xFFFFFFFFu, acc[g][j], o);
                acc[g][j] = acc[g][j] * c + oa * oc;
            }
            m[g] = nm;
        }
        if (lane < (int)lanes_per_pos) {
            if (piece == 0) {
                wm[warp * G + g] = m[g];
                wl[warp * G + g] = l[g];
            }
            float* dst = wacc + ((size_t)warp * G + g) * head_dim + piece * 8;
#pragma unroll
            for (int j = 0; j < 8; j++) dst[j] = acc[g][j];
        }
    }
    __syncthreads();
    finish<G>(wacc, wm, wl, head_dim, kv_heads, out, part_max, part_sum, part_out);
}


// The tensor-core variant: the group's query heads are the rows of one 16-row mma tile (G <= 8
// real rows, the rest zero), so a page of 16 positions costs a few mma.sync instead of per-lane
// dot products and shuffle reductions. Each warp takes whole pages (block_size 16) in turn and
// copies a page's keys and values (one contiguous 16 x HD run each) into its own slots of a
// cp.async ring S pages deep; scores (Q K^T) and output (P V) run on tensor cores from ldmatrix
// loads (transposed for V). Q and P enter as f16 split in a high and a low half (x = hi + lo),
// two mma per product, so they keep about f32 accuracy. The online softmax runs in log2 units;
// a warp's maxima are handed to `finish` in natural units.
template <int HD>
struct TcTile {
    static constexpr int kPitch = HD + 8;             // halves per shared row (no conflicts)
    static constexpr int kHalves = 16 * kPitch;       // one page of K or of V
};

// The A fragments of a 16-row query tile: rows g and g + 8 come from `lo_row` and `hi_row`
// (head_dim floats each; null for padding rows, zero), dims 16 s + 2t (+1) and + 8, scaled
// into log2 units, split into f16 hi + lo.
template <int HD>
__device__ __forceinline__ void load_q(const float* lo_row, const float* hi_row, float qscale,
                                       int t, uint32_t (&qh)[HD / 16][4],
                                       uint32_t (&ql)[HD / 16][4]) {
#pragma unroll
    for (int s = 0; s < HD / 16; ++s) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const float* row = (r & 1) ? hi_row : lo_row;
            const int dim = 16 * s + 2 * t + ((r & 2) ? 8 : 0);
            float a = 0.f, b = 0.f;
            if (row != nullptr) {
                a = row[dim] * qscale;
                b = row[dim + 1] * qscale;
            }
            split_pack(a, b, qh[s][r], ql[s][r]);
        }
    }
}

// Scores of a staged page's 16 positions for the tile's 16 query rows (Q as hi + lo): two
// 8-wide tiles; one ldmatrix gives two 16-deep steps.
template <int HD>
__device__ __forceinline__ void page_scores(const __half* ks, const uint32_t (&qh)[HD / 16][4],
                                            const uint32_t (&ql)[HD / 16][4], int lane,
                                            float (&s)[2][4]) {
    constexpr int KS = HD / 16;
    constexpr int PITCH = TcTile<HD>::kPitch;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
        s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < KS; kk += 2) {
            uint32_t b[4];
            ldsm4<false>(b, ks + (8 * j + (lane & 7)) * PITCH + 16 * kk + 8 * (lane >> 3));
            mma16816(s[j], qh[kk], b[0], b[1]);
            mma16816(s[j], ql[kk], b[0], b[1]);
            mma16816(s[j], qh[kk + 1], b[2], b[3]);
            mma16816(s[j], ql[kk + 1], b[2], b[3]);
        }
    }
}

// o += P V for a staged page: the weights s (after the softmax step) as the A operand of one
// 16-deep step, split into hi + lo (keys 0-7 in tile 0, 8-15 in tile 1); one transposed
// ldmatrix gives two 8-wide output tiles.
template <int HD>
__device__ __forceinline__ void page_values(const __half* vs, const float (&s)[2][4], int lane,
                                            float (&o)[HD / 8][4]) {
    constexpr int NT = HD / 8;
    constexpr int PITCH = TcTile<HD>::kPitch;
    uint32_t ph[4], pl[4];
    split_pack(s[0][0], s[0][1], ph[0], pl[0]);
    split_pack(s[0][2], s[0][3], ph[1], pl[1]);
    split_pack(s[1][0], s[1][1], ph[2], pl[2]);
    split_pack(s[1][2], s[1][3], ph[3], pl[3]);
#pragma unroll
    for (int n = 0; n < NT; n += 2) {
        uint32_t b[4];
        ldsm4<true>(b, vs + (lane & 15) * PITCH + 8 * n + 8 * (lane >> 4));
        mma16816(o[n], ph, b[0], b[1]);
        mma16816(o[n], pl, b[0], b[1]);
        mma16816(o[n + 1], ph, b[2], b[3]);
        mma16816(o[n + 1], pl, b[2], b[3]);
    }
}

template <int G, int HD, int S>
__device__ __forceinline__ void decode_tc(const float* __restrict__ q, unsigned q_stride,
                                          const __half* __restrict__ k,
                                          const __half* __restrict__ v,
                                          const unsigned* __restrict__ tables,
                                          unsigned max_blocks, const unsigned* __restrict__ lens,
                                          unsigned kv_heads, unsigned split_len, float scale,
                                          float* __restrict__ out, float* __restrict__ part_max,
                                          float* __restrict__ part_sum,
                                          float* __restrict__ part_out) {
    static_assert(G >= 1 && G <= 8 && HD % 32 == 0, "rows of one tile, pairs of 16-deep steps");
    using Tile = TcTile<HD>;
    constexpr int KS = HD / 16;      // 16-deep steps over the head dim
    constexpr int NT = HD / 8;       // 8-wide output tiles
    constexpr int PIECES = HD / 8;   // 16-byte pieces of a row
    constexpr int PAGE = 16;         // positions per page
    const unsigned seq = blockIdx.x, kvh = blockIdx.y, split = blockIdx.z;
    const unsigned len = lens[seq];
    const unsigned begin = split * split_len;
    const unsigned end = min(len, begin + split_len);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;

    // Shared memory: the split's page indices, then the copy ring ([WARPS][S][K, V][16][pitch]
    // halves) or, for the merge, the warps' partial results in the same bytes.
    extern __shared__ __align__(16) unsigned char smem[];
    unsigned* pages = reinterpret_cast<unsigned*>(smem);
    unsigned char* after_pages = smem + ((split_len / PAGE) * 4 + 15) / 16 * 16;
    __half* ring = reinterpret_cast<__half*>(after_pages);
    float* wacc = reinterpret_cast<float*>(after_pages);  // [WARPS][G][HD]
    float* wm = wacc + WARPS * G * HD;                    // [WARPS][G]
    float* wl = wm + WARPS * G;                           // [WARPS][G]

    const unsigned first_page = begin / PAGE;
    const unsigned npages = end > begin ? (end - 1) / PAGE - first_page + 1 : 0;
    for (unsigned i = threadIdx.x; i < npages; i += THREADS) {
        pages[i] = tables[(size_t)seq * max_blocks + first_page + i];
    }

    // Q fragments: rows g and g + 8 are query heads g and g + 8 of the group (zero past G).
    uint32_t qh[KS][4], ql[KS][4];
    {
        const float* heads_q = q + (size_t)seq * q_stride + (size_t)kvh * G * HD;
        load_q<HD>(g < G ? heads_q + g * HD : nullptr,
                   g + 8 < G ? heads_q + (g + 8) * HD : nullptr,
                   scale * 1.4426950408889634f, t, qh, ql);
    }
    float o[NT][4];
#pragma unroll
    for (int n = 0; n < NT; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    float m_lo = -INFINITY, m_hi = -INFINITY;  // running maxima (log2 units), rows g, g + 8
    float l_lo = 0.f, l_hi = 0.f;              // this lane's share of the running sums
    __syncthreads();                           // the page indices are staged

    // This warp's pages: warp, warp + WARPS, ... of the split's npages.
    const unsigned iters = (unsigned)warp < npages ? (npages - warp + WARPS - 1) / WARPS : 0;
    __half* my_ring = ring + (size_t)warp * S * 2 * Tile::kHalves;
    const size_t page_elems = (size_t)kv_heads * PAGE * HD;
    auto issue = [&](unsigned it) {
        if (it < iters) {
            const unsigned i = warp + it * WARPS;
            const unsigned p0 = (first_page + i) * PAGE;
            const size_t base = pages[i] * page_elems + (size_t)kvh * PAGE * HD;
            __half* slot = my_ring + (size_t)(it % S) * 2 * Tile::kHalves;
#pragma unroll
            for (int c = lane; c < PAGE * PIECES; c += 32) {
                const int r = c / PIECES, piece = c % PIECES;
                const bool live = p0 + r < end;  // rows past the end are zero-filled
                const size_t off = live ? base + (size_t)r * HD + piece * 8 : 0;
                __half* dk = slot + r * Tile::kPitch + piece * 8;
                cp_async16(dk, k + off, live);
                cp_async16(dk + Tile::kHalves, v + off, live);
            }
        }
        cp_async_commit();  // an empty group past the end keeps the counting uniform
    };
#pragma unroll
    for (int i = 0; i < S - 1; i++) issue(i);
    for (unsigned it = 0; it < iters; it++) {
        issue(it + S - 1);
        cp_async_wait<S - 1>();  // this lane's copies of page `it` have landed
        __syncwarp();            // and every other lane's
        const __half* ks = my_ring + (size_t)(it % S) * 2 * Tile::kHalves;
        const __half* vs = ks + Tile::kHalves;
        const unsigned p0 = (first_page + warp + it * WARPS) * PAGE;

        float s[2][4];
        page_scores<HD>(ks, qh, ql, lane, s);
        // Positions past the end masked (the page's first is always live), then one softmax
        // step: s becomes the weights.
#pragma unroll
        for (int j = 0; j < 2; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                if (p0 + 8 * j + 2 * t + (e & 1) >= end) s[j][e] = -INFINITY;
            }
        }
        softmax_step(s, m_lo, m_hi, l_lo, l_hi, o);
        page_values<HD>(vs, s, lane, o);
        __syncwarp();  // the slot is read before a later issue overwrites it
    }
    cp_async_wait<0>();  // only empty groups remain; nothing may land later
    __syncthreads();     // every warp is done with the ring the merge reuses

    // Row g's sum over its quad; rows past G are padding.
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) l_lo += __shfl_xor_sync(0xffffffffu, l_lo, off);
    if (g < G) {
        float* dst = wacc + ((size_t)warp * G + g) * HD;
#pragma unroll
        for (int n = 0; n < NT; ++n) {
            dst[8 * n + 2 * t] = o[n][0];
            dst[8 * n + 2 * t + 1] = o[n][1];
        }
        if (t == 0) {
            wm[warp * G + g] = m_lo == -INFINITY ? -INFINITY : m_lo * 0.6931471805599453f;
            wl[warp * G + g] = l_lo;
        }
    }
    __syncthreads();
    finish<G>(wacc, wm, wl, HD, kv_heads, out, part_max, part_sum, part_out);
}

// Prefill attention on tensor cores: causal attention of prompt tokens over their sequence's
// pages (the chunk's own keys included, written by the K/V write before this launch). One warp
// per (tile, query head): a tile is up to 16 consecutive tokens of one sequence, the rows of a
// 16-row mma tile, so each page of K and V is read once for 16 queries. Pages of 16 positions
// go through a cp.async ring S pages deep; Q and P are split into f16 hi + lo (the products
// keep about f32 accuracy); the softmax runs in log2 units. Page 0 holds position 0, which
// every row sees, so each row's running maximum is finite from the first page on (later
// pages may mask a row entirely: its weights there are 0). No split: the warp walks every
// page up to the tile's last position, in order.
template <int HD, int S>
__device__ __forceinline__ void prefill_tc(const float* __restrict__ q, unsigned q_stride,
                                           const __half* __restrict__ k,
                                           const __half* __restrict__ v,
                                           const unsigned* __restrict__ tables,
                                           unsigned max_blocks,
                                           const unsigned* __restrict__ positions,
                                           const unsigned* __restrict__ tile_first,
                                           const unsigned* __restrict__ tile_rows,
                                           unsigned kv_heads, unsigned group, float scale,
                                           float* __restrict__ out) {
    static_assert(HD % 32 == 0, "pairs of 16-deep steps");
    using Tile = TcTile<HD>;
    constexpr int KS = HD / 16;
    constexpr int NT = HD / 8;
    constexpr int PIECES = HD / 8;
    constexpr int PAGE = 16;
    const unsigned tile_id = blockIdx.x, head = blockIdx.y, kvh = head / group;
    const unsigned heads = kv_heads * group;
    const unsigned first = tile_first[tile_id], rows = tile_rows[tile_id];
    const unsigned pos0 = positions[first];
    const unsigned last = pos0 + rows - 1;  // the tile's last position
    const unsigned* table = tables + (size_t)first * max_blocks;
    const int lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    // Positions of rows g and g + 8 (padding rows past the tile take the last one: their
    // scores stay finite, and they are not written).
    const unsigned rp_lo = (unsigned)g < rows ? pos0 + g : last;
    const unsigned rp_hi = (unsigned)g + 8 < rows ? pos0 + g + 8 : last;

    extern __shared__ __align__(16) unsigned char smem[];
    __half* ring = reinterpret_cast<__half*>(smem);

    // Q fragments: rows g and g + 8 are the tile's tokens g and g + 8 (zero past the tile).
    uint32_t qh[KS][4], ql[KS][4];
    {
        const float* head_q = q + (size_t)first * q_stride + (size_t)head * HD;
        load_q<HD>((unsigned)g < rows ? head_q + (size_t)g * q_stride : nullptr,
                   (unsigned)g + 8 < rows ? head_q + (size_t)(g + 8) * q_stride : nullptr,
                   scale * 1.4426950408889634f, t, qh, ql);
    }
    float o[NT][4];
#pragma unroll
    for (int n = 0; n < NT; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    float m_lo = -INFINITY, m_hi = -INFINITY;
    float l_lo = 0.f, l_hi = 0.f;

    const unsigned npages = last / PAGE + 1;
    const size_t page_elems = (size_t)kv_heads * PAGE * HD;
    auto issue = [&](unsigned it) {
        if (it < npages) {
            const size_t base = table[it] * page_elems + (size_t)kvh * PAGE * HD;
            __half* slot = ring + (size_t)(it % S) * 2 * Tile::kHalves;
#pragma unroll
            for (int c = lane; c < PAGE * PIECES; c += 32) {
                const int r = c / PIECES, piece = c % PIECES;
                const bool live = it * PAGE + r <= last;  // rows past the tile are zero-filled
                const size_t off = live ? base + (size_t)r * HD + piece * 8 : 0;
                __half* dk = slot + r * Tile::kPitch + piece * 8;
                cp_async16(dk, k + off, live);
                cp_async16(dk + Tile::kHalves, v + off, live);
            }
        }
        cp_async_commit();
    };
#pragma unroll
    for (int i = 0; i < S - 1; i++) issue(i);
    for (unsigned it = 0; it < npages; it++) {
        issue(it + S - 1);
        cp_async_wait<S - 1>();
        __syncwarp();
        const __half* ks = ring + (size_t)(it % S) * 2 * Tile::kHalves;
        const __half* vs = ks + Tile::kHalves;
        const unsigned p0 = it * PAGE;
        float s[2][4];
        page_scores<HD>(ks, qh, ql, lane, s);
        // Causal mask: a key after its row's position does not count.
#pragma unroll
        for (int j = 0; j < 2; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const unsigned kp = p0 + 8 * j + 2 * t + (e & 1);
                if (kp > ((e & 2) ? rp_hi : rp_lo)) s[j][e] = -INFINITY;
            }
        }
        softmax_step(s, m_lo, m_hi, l_lo, l_hi, o);
        page_values<HD>(vs, s, lane, o);
        __syncwarp();
    }
    cp_async_wait<0>();
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
        l_lo += __shfl_xor_sync(0xffffffffu, l_lo, off);
        l_hi += __shfl_xor_sync(0xffffffffu, l_hi, off);
    }
    const float inv_lo = 1.f / l_lo, inv_hi = 1.f / l_hi;
#pragma unroll
    for (int n = 0; n < NT; ++n) {
        const int dim = 8 * n + 2 * t;
        if ((unsigned)g < rows) {
            float* dst = out + ((size_t)(first + g) * heads + head) * HD + dim;
            dst[0] = o[n][0] * inv_lo;
            dst[1] = o[n][1] * inv_lo;
        }
        if ((unsigned)g + 8 < rows) {
            float* dst = out + ((size_t)(first + g + 8) * heads + head) * HD + dim;
            dst[0] = o[n][2] * inv_hi;
            dst[1] = o[n][3] * inv_hi;
        }
    }
}

}  // namespace

#define CITED_PAGED_DECODE(G, U, S)                                                            \
    extern "C" __global__ void __launch_bounds__(THREADS, 1)                                   \
        cited_paged_decode_g##G##_u##U##_s##S(                                                 \
            const float* __restrict__ q, unsigned q_stride, const __half* __restrict__ k,     \
            const __half* __restrict__ v, const unsigned* __restrict__ tables,                \
            unsigned max_blocks, const unsigned* __restrict__ lens, unsigned kv_heads,        \
            unsigned head_dim, unsigned block_size, unsigned split_len, float scale,          \
            float* __restrict__ out, float* __restrict__ part_max,                            \
            float* __restrict__ part_sum, float* __restrict__ part_out) {                     \
        decode<G, U, S>(q, q_stride, k, v, tables, max_blocks, lens, kv_heads, head_dim,       \
                        block_size, split_len, scale, out, part_max, part_sum, part_out);     \
    }
// Variants (U positions per warp step, S steps in flight): direct loads U = 2, 4; a cp.async
// ring of U x S = 8 steps (U = 2, S = 4 and U = 4, S = 2: 32 KiB) and 16 steps (U = 4, S = 4:
// 64 KiB, past the 48 KiB default, which the host raises for these).
#define CITED_PAGED_DECODE_ALL(G) \
    CITED_PAGED_DECODE(G, 2, 1)   \
    CITED_PAGED_DECODE(G, 4, 1)   \
    CITED_PAGED_DECODE(G, 2, 4)   \
    CITED_PAGED_DECODE(G, 4, 2)   \
    CITED_PAGED_DECODE(G, 4, 4)

CITED_PAGED_DECODE_ALL(1)
CITED_PAGED_DECODE_ALL(2)
CITED_PAGED_DECODE_ALL(3)
CITED_PAGED_DECODE_ALL(4)
CITED_PAGED_DECODE_ALL(5)
CITED_PAGED_DECODE_ALL(6)
CITED_PAGED_DECODE_ALL(7)
CITED_PAGED_DECODE_ALL(8)

// The tensor-core variant (pages of 16 positions, head dims 64 and 128, a ring 3 pages deep).
#define CITED_PAGED_DECODE_TC(G, HD)                                                           \
    extern "C" __global__ void __launch_bounds__(THREADS, 1) cited_paged_decode_tc_g##G##_h##HD( \
        const float* __restrict__ q, unsigned q_stride, const __half* __restrict__ k,         \
        const __half* __restrict__ v, const unsigned* __restrict__ tables,                    \
        unsigned max_blocks, const unsigned* __restrict__ lens, unsigned kv_heads,            \
        unsigned head_dim, unsigned block_size, unsigned split_len, float scale,              \
        float* __restrict__ out, float* __restrict__ part_max, float* __restrict__ part_sum,  \
        float* __restrict__ part_out) {                                                       \
        (void)head_dim;                                                                       \
        (void)block_size;                                                                     \
        decode_tc<G, HD, 3>(q, q_stride, k, v, tables, max_blocks, lens, kv_heads, split_len,  \
                            scale, out, part_max, part_sum, part_out);                        \
    }
#define CITED_PAGED_DECODE_TC_HD(G) \
    CITED_PAGED_DECODE_TC(G, 64)    \
    CITED_PAGED_DECODE_TC(G, 128)

CITED_PAGED_DECODE_TC_HD(1)
CITED_PAGED_DECODE_TC_HD(2)
CITED_PAGED_DECODE_TC_HD(3)
CITED_PAGED_DECODE_TC_HD(4)
CITED_PAGED_DECODE_TC_HD(5)
CITED_PAGED_DECODE_TC_HD(6)
CITED_PAGED_DECODE_TC_HD(7)
CITED_PAGED_DECODE_TC_HD(8)

// Combines the splits of each (sequence, head): out = sum_s e^(m_s - M) o_s / sum_s e^(m_s - M) l_s.
extern "C" __global__ void cited_paged_merge(const float* __restrict__ part_max,
                                             const float* __restrict__ part_sum,
                                             const float* __restrict__ part_out, unsigned heads,
                                             unsigned splits, unsigned head_dim,
                                             float* __restrict__ out) {
    const unsigned seq = blockIdx.x, h = blockIdx.y;
    const size_t base = ((size_t)seq * heads + h) * splits;
    float mm = -INFINITY;
    for (unsigned s = 0; s < splits; s++) mm = fmaxf(mm, part_max[base + s]);
    float sum = 0.0f;
    for (unsigned s = 0; s < splits; s++) {
        if (part_max[base + s] != -INFINITY) sum += part_sum[base + s] * __expf(part_max[base + s] - mm);
    }
    for (unsigned d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float o = 0.0f;
        for (unsigned s = 0; s < splits; s++) {
            if (part_max[base + s] != -INFINITY) {
                o += part_out[(base + s) * head_dim + d] * __expf(part_max[base + s] - mm);
            }
        }
        out[((size_t)seq * heads + h) * head_dim + d] = sum > 0.0f ? o / sum : 0.0f;
    }
}

// Prefill on tensor cores (pages of 16 positions, head dims 64 and 128, a ring 3 pages deep):
// grid (tiles, query heads), one warp each.
#define CITED_PAGED_PREFILL_TC(HD)                                                             \
    extern "C" __global__ void __launch_bounds__(32) cited_paged_prefill_tc_h##HD(             \
        const float* __restrict__ q, unsigned q_stride, const __half* __restrict__ k,         \
        const __half* __restrict__ v, const unsigned* __restrict__ tables,                    \
        unsigned max_blocks, const unsigned* __restrict__ positions,                          \
        const unsigned* __restrict__ tile_first, const unsigned* __restrict__ tile_rows,      \
        unsigned kv_heads, unsigned group, float scale, float* __restrict__ out) {            \
        prefill_tc<HD, 3>(q, q_stride, k, v, tables, max_blocks, positions, tile_first,        \
                          tile_rows, kv_heads, group, scale, out);                            \
    }
CITED_PAGED_PREFILL_TC(64)
CITED_PAGED_PREFILL_TC(128)
