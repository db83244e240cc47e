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
// Shapes: head_dim a power of two from 8 to 256; block_size a power of two; G from 1 to 8; a
// split covers at most 1024 pages and starts on a page. Dynamic shared memory, sized by the
// host: the split's page indices (16-byte aligned), then the larger of the copy ring
// (WARPS x 32 lanes x S x U x 2 x 16 bytes, when S > 1) and the warps' partial results
// (WARPS x G x (head_dim + 2) floats).

#include <cstdint>
#include <cuda_fp16.h>

namespace {

constexpr int THREADS = 128;
constexpr int WARPS = THREADS / 32;

// 16 bytes global -> shared without passing through registers; `live` false zero-fills.
__device__ __forceinline__ void cp_async16(uint4* dst, const __half* src, bool live) {
    const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src),
                 "r"(live ? 16 : 0));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void unpack8(const uint4& r, float f[8]) {
    const __half2* h = reinterpret_cast<const __half2*>(&r);
#pragma unroll
    for (int j = 0; j < 4; j++) {
        const float2 a = __half22float2(h[j]);
        f[2 * j] = a.x;
        f[2 * j + 1] = a.y;
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
    const unsigned splits = gridDim.z;
    const unsigned heads = kv_heads * G;
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
