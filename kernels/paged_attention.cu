// Decode attention over the paged KV cache: one query token per sequence, the CUDA twin of
// `src/ops/paged_attention.rs` (whose `paged_attention_reference` is the reference).
//
// Storage of one layer: K and V each (num_blocks, kv_heads, block_size, head_dim) in f16; a
// sequence's block table lists its blocks in position order. One block of threads per
// (sequence, KV head, split): it reads each key and value of that head once and serves every
// query head of the group (grouped-query attention). The split's page indices are staged in
// shared memory; each warp takes whole positions in turn, each lane 16 bytes (8 halves) of a
// key or value row, so a 128-wide head is read by 16 lanes and a warp handles two positions at
// a time. Every warp keeps an online softmax per query head (running max, sum and its share of
// the output); warps are merged in shared memory. With several splits (long contexts), each
// split writes its (max, sum, unnormalised output) and `cited_paged_merge` combines them with a
// log-sum-exp.
//
// Shapes: head_dim a power of two from 8 to 256; group (query heads per KV head) at most 8; a
// split covers at most 1024 pages and starts on a page.

#include <cstdint>
#include <cuda_fp16.h>

namespace {

constexpr int THREADS = 128;
constexpr int WARPS = THREADS / 32;
constexpr int MAX_GROUP = 8;
constexpr int MAX_HEAD_DIM = 256;
constexpr int MAX_PAGES = 1024;  // pages of one split staged in shared memory

struct Acc {
    float m[MAX_GROUP];
    float l[MAX_GROUP];
};

}  // namespace

// q: (seqs, q_stride) f32, head h of sequence s at q[s * q_stride + h * head_dim];
// k, v: paged f16 storage; tables: (seqs, max_blocks) u32; lens: positions per sequence (the
// current token included); out: (seqs, heads * head_dim) f32 when splits == 1; otherwise
// part_max / part_sum: (seqs, heads, splits), part_out: (seqs, heads, splits, head_dim).
extern "C" __global__ void __launch_bounds__(THREADS)
    cited_paged_decode(const float* __restrict__ q, unsigned q_stride,
                       const __half* __restrict__ k, const __half* __restrict__ v,
                       const unsigned* __restrict__ tables, unsigned max_blocks,
                       const unsigned* __restrict__ lens, unsigned heads, unsigned kv_heads,
                       unsigned head_dim, unsigned block_size, unsigned split_len, float scale,
                       float* __restrict__ out, float* __restrict__ part_max,
                       float* __restrict__ part_sum, float* __restrict__ part_out) {
    const unsigned seq = blockIdx.x, kvh = blockIdx.y, split = blockIdx.z;
    const unsigned splits = gridDim.z;
    const unsigned group = heads / kv_heads;
    const unsigned len = lens[seq];
    const unsigned begin = split * split_len;
    const unsigned end = min(len, begin + split_len);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

    __shared__ float qs[MAX_GROUP][MAX_HEAD_DIM];
    __shared__ unsigned pages[MAX_PAGES];
    __shared__ float wm[WARPS][MAX_GROUP], wl[WARPS][MAX_GROUP];
    __shared__ float wacc[WARPS][MAX_GROUP][MAX_HEAD_DIM];

    for (unsigned i = threadIdx.x; i < group * head_dim; i += THREADS) {
        unsigned g = i / head_dim, d = i % head_dim;
        qs[g][d] = q[(size_t)seq * q_stride + (kvh * group + g) * head_dim + d] * scale;
    }
    const unsigned first_page = begin / block_size;
    const unsigned last_page = end > begin ? (end - 1) / block_size : first_page;
    for (unsigned i = threadIdx.x; end > begin && first_page + i <= last_page && i < MAX_PAGES;
         i += THREADS) {
        pages[i] = tables[(size_t)seq * max_blocks + first_page + i];
    }
    __syncthreads();

    // Lanes per position: 8 halves (16 bytes) each.
    const unsigned lanes_per_pos = head_dim / 8;               // 1..32
    const unsigned pos_per_warp = 32 / lanes_per_pos >= 1 ? 32 / lanes_per_pos : 1;
    const unsigned sub = lane / lanes_per_pos;                 // which position of the warp
    const unsigned piece = lane % lanes_per_pos;               // which 8 dims of it
    const bool active_lane = sub < pos_per_warp;

    float m[MAX_GROUP], l[MAX_GROUP], acc[MAX_GROUP][8];
#pragma unroll
    for (int g = 0; g < MAX_GROUP; g++) {
        m[g] = -INFINITY;
        l[g] = 0.0f;
#pragma unroll
        for (int j = 0; j < 8; j++) acc[g][j] = 0.0f;
    }

    const unsigned step = WARPS * pos_per_warp;
    for (unsigned base = begin + warp * pos_per_warp; base < end; base += step) {
        const unsigned pos = base + sub;
        const bool live = active_lane && pos < end;
        float kf[8], vf[8];
        if (live) {
            const unsigned page = pages[pos / block_size - first_page];
            const size_t off =
                (((size_t)page * kv_heads + kvh) * block_size + pos % block_size) * head_dim +
                piece * 8;
            const uint4 kr = *reinterpret_cast<const uint4*>(k + off);
            const uint4 vr = *reinterpret_cast<const uint4*>(v + off);
            const __half2* kh = reinterpret_cast<const __half2*>(&kr);
            const __half2* vh = reinterpret_cast<const __half2*>(&vr);
            for (int j = 0; j < 4; j++) {
                float2 a = __half22float2(kh[j]);
                float2 b = __half22float2(vh[j]);
                kf[2 * j] = a.x;
                kf[2 * j + 1] = a.y;
                vf[2 * j] = b.x;
                vf[2 * j + 1] = b.y;
            }
        } else {
#pragma unroll
            for (int j = 0; j < 8; j++) kf[j] = vf[j] = 0.0f;
        }
#pragma unroll
        for (int g = 0; g < MAX_GROUP; g++) {
            if (g >= (int)group) break;
            float s = 0.0f;
#pragma unroll
            for (int j = 0; j < 8; j++) s += qs[g][piece * 8 + j] * kf[j];
            // Sum over the lanes of this position (a power of two, aligned).
            for (unsigned o = lanes_per_pos / 2; o > 0; o >>= 1) {
                s += __shfl_xor_sync(0xFFFFFFFFu, s, o);
            }
            // Each position's lanes update the running softmax with their own score; the
            // positions of a warp are merged at the end like warps are.
            if (live) {
                float nm = fmaxf(m[g], s);
                float c = __expf(m[g] - nm);
                float p = __expf(s - nm);
                l[g] = l[g] * c + p;
#pragma unroll
                for (int j = 0; j < 8; j++) acc[g][j] = acc[g][j] * c + p * vf[j];
                m[g] = nm;
            }
        }
    }

    // Merge the positions of a warp (lanes with the same piece), then the warps.
#pragma unroll
    for (int g = 0; g < MAX_GROUP; g++) {
        if (g >= (int)group) break;
        for (unsigned o = lanes_per_pos; o < 32; o <<= 1) {
            float om = __shfl_xor_sync(0xFFFFFFFFu, m[g], o);
            float ol = __shfl_xor_sync(0xFFFFFFFFu, l[g], o);
            float nm = fmaxf(m[g], om);
            float c = nm == -INFINITY ? 0.0f : __expf(m[g] - nm);
            float oc = nm == -INFINITY ? 0.0f : __expf(om - nm);
            l[g] = l[g] * c + ol * oc;
#pragma unroll
            for (int j = 0; j < 8; j++) {
                float oa = __shfl_xor_sync(0xFFFFFFFFu, acc[g][j], o);
                acc[g][j] = acc[g][j] * c + oa * oc;
            }
            m[g] = nm;
        }
        if (lane < (int)lanes_per_pos) {
            if (piece == 0) {
                wm[warp][g] = m[g];
                wl[warp][g] = l[g];
            }
#pragma unroll
            for (int j = 0; j < 8; j++) wacc[warp][g][piece * 8 + j] = acc[g][j];
        }
    }
    __syncthreads();
    for (unsigned i = threadIdx.x; i < group * head_dim; i += THREADS) {
        unsigned g = i / head_dim, d = i % head_dim;
        float mm = -INFINITY;
        for (int w = 0; w < WARPS; w++) mm = fmaxf(mm, wm[w][g]);
        float sum = 0.0f, o = 0.0f;
        for (int w = 0; w < WARPS; w++) {
            float c = mm == -INFINITY ? 0.0f : __expf(wm[w][g] - mm);
            sum += wl[w][g] * c;
            o += wacc[w][g][d] * c;
        }
        const unsigned h = kvh * group + g;
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
