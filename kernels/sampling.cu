// One sampling step for a batch of rows, one block per row, sort-free: the CUDA twin of
// `src/ops/sampling.rs` (`filter` and `draw`), which is the reference.
//
// A row's logits are copied to an f32 work row, its own penalty entries (repetition, presence,
// frequency: cost grows with the tokens it generated, not the vocabulary) and its banned ids
// (suppressed tokens and the engine's logits-processor hook) are applied there, then:
//   - greedy (temperature 0): argmax, ties to the lower id;
//   - every filter keeps a prefix of the tokens ranked by logit (higher first, ties by lower id),
//     so each is a cut (value, id): min-p a logit floor; top-k the k-th token, found by a radix
//     select over the order-preserving bits of the logits (4 passes of 8 bits, counts in shared
//     memory) and an id-order scan among equal values; top-p the token where the mass taken in
//     rank order reaches top_p of the kept mass, by the same radix select with each bin's mass
//     summed in 2^-40 fixed point (integer atomics, so the result does not depend on thread
//     timing) and an id-order scan among equal values;
//   - the draw: a counter-based uniform u = SplitMix64(seed + (step + 1) * golden) (the CPU's
//     `SplitMix64::unit_at`), then the kept tokens walked in id order by a block-wide scan until
//     the running weight passes u times their mass.
// Weights are expf((x - max) / temperature). Sums run in a fixed order per launch configuration,
// so a seeded row draws the same token whatever else is in the batch.

#include <cstdint>
#include <cuda_bf16.h>

namespace {

constexpr int THREADS = 1024;
constexpr int WARPS = THREADS / 32;
constexpr unsigned NONE = 0xFFFFFFFFu;
constexpr double FIXED_ONE = 1099511627776.0;  // 2^40

struct RowParams {
    float temperature;
    float top_p;
    float min_p;
    float repetition_penalty;
    float presence_penalty;
    float frequency_penalty;
    unsigned top_k;
    unsigned penalty_start;  // entries [start, start + len) of the penalty arrays
    unsigned penalty_len;
    unsigned ban_start;      // entries [start, start + len) of `bans`
    unsigned ban_len;
    unsigned special_start;  // the fast variant's merged, id-sorted penalised and banned tokens
    unsigned special_len;
    unsigned pad;
    unsigned long long seed;
    unsigned long long step;
};

__device__ __forceinline__ float load(const float* p) { return *p; }
__device__ __forceinline__ float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }

__device__ __forceinline__ bool finite(float x) { return isfinite(x); }

// Order-preserving key, descending: a larger float gets a smaller key.
__device__ __forceinline__ unsigned desc_key(float x) {
    unsigned u = __float_as_uint(x);
    unsigned asc = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    return ~asc;
}

__device__ __forceinline__ float key_value(unsigned dkey) {
    unsigned asc = ~dkey;
    unsigned u = (asc & 0x80000000u) ? (asc & 0x7FFFFFFFu) : ~asc;
    return __uint_as_float(u);
}

struct Cut {
    float value;
    unsigned id;
};

__device__ __forceinline__ bool keeps(Cut c, float x, unsigned id) {
    return x > c.value || (x == c.value && id <= c.id);
}

__device__ __forceinline__ Cut tighter(Cut a, Cut b) {
    return (b.value > a.value || (b.value == a.value && b.id < a.id)) ? b : a;
}

// SplitMix64 finaliser, as in src/ops/rng.rs.
__device__ __forceinline__ float unit_at(unsigned long long seed, unsigned long long n) {
    unsigned long long z = seed + (n + 1ull) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z = z ^ (z >> 31);
    return (float)(z >> 40) / 16777216.0f;
}

struct Shared {
    float f[WARPS];
    unsigned u[WARPS];
    unsigned long long q[WARPS];
    double d[WARPS];
    unsigned hist[256];
    unsigned long long mass_hist[256];
    float bf;
    unsigned bu;
    unsigned bu2;
    unsigned long long bq;
    double bd;
};

// Sum of `v` over the block, through `warp_vals` and `bcast` in shared memory.
template <typename T>
__device__ T block_add(T v, T* warp_vals, T* bcast) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xFFFFFFFFu, v, o);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) warp_vals[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < WARPS ? warp_vals[lane] : T(0);
        for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xFFFFFFFFu, v, o);
        if (lane == 0) *bcast = v;
    }
    __syncthreads();
    T r = *bcast;
    __syncthreads();
    return r;
}

// Reduces (v, id) over the warp to its best in rank order (lane 0 holds it); NONE never wins.
__device__ __forceinline__ void warp_best(float& v, unsigned& id) {
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_down_sync(0xFFFFFFFFu, v, o);
        unsigned oi = __shfl_down_sync(0xFFFFFFFFu, id, o);
        if (oi != NONE && (id == NONE || ov > v || (ov == v && oi < id))) {
            v = ov;
            id = oi;
        }
    }
}

// Best (value, id) in rank order over the block; ids of NONE never win.
__device__ void block_argmax(float& v, unsigned& id, Shared& s) {
    warp_best(v, id);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) {
        s.f[warp] = v;
        s.u[warp] = id;
    }
    __syncthreads();
    if (warp == 0) {
        v = lane < WARPS ? s.f[lane] : -INFINITY;
        id = lane < WARPS ? s.u[lane] : NONE;
        warp_best(v, id);
        if (lane == 0) {
            s.bf = v;
            s.bu = id;
        }
    }
    __syncthreads();
    v = s.bf;
    id = s.bu;
    __syncthreads();
}

// Inclusive scan of `v` over the block in thread order; returns the thread's prefix and sets
// `total` to the block's sum.
template <typename T>
__device__ T block_scan(T v, T& total, T* warp_sums, T* bcast) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int o = 1; o < 32; o <<= 1) {
        T n = __shfl_up_sync(0xFFFFFFFFu, v, o);
        if (lane >= o) v += n;
    }
    if (lane == 31) warp_sums[warp] = v;
    __syncthreads();
    if (warp == 0) {
        T w = lane < WARPS ? warp_sums[lane] : T(0);
        for (int o = 1; o < 32; o <<= 1) {
            T n = __shfl_up_sync(0xFFFFFFFFu, w, o);
            if (lane >= o) w += n;
        }
        if (lane < WARPS) warp_sums[lane] = w;
        if (lane == WARPS - 1) *bcast = w;
    }
    __syncthreads();
    if (warp > 0) v += warp_sums[warp - 1];
    total = *bcast;
    __syncthreads();
    return v;
}

// The cut at the `rank`-th (from 1) kept token in rank order, given kept tokens whose value
// equals `value` are taken in id order after `before` tokens of higher value.
__device__ unsigned nth_equal(const float* row, unsigned vocab, Cut cut, float value,
                              unsigned need, Shared& s) {
    unsigned seen = 0;
    for (unsigned base = 0; base < vocab; base += THREADS) {
        unsigned i = base + threadIdx.x;
        float x = i < vocab ? row[i] : -INFINITY;
        unsigned flag = (i < vocab && finite(x) && x == value && keeps(cut, x, i)) ? 1u : 0u;
        unsigned total;
        unsigned incl = block_scan<unsigned>(flag, total, s.u, &s.bu2);
        if (flag && seen + incl == need) s.bu = i;
        __syncthreads();
        if (seen + total >= need) {
            unsigned id = s.bu;
            __syncthreads();
            return id;
        }
        seen += total;
    }
    return NONE;
}

// Radix select in rank order over the kept tokens: the key of the token where the running
// `weight` (a count, or mass in fixed point) first reaches `need`; `need` comes back as what is
// left of it among the tokens of exactly that key.
template <typename W, typename F>
__device__ unsigned radix_select(const float* row, unsigned vocab, Cut cut, F weight, W& need,
                                 W* hist, Shared& s) {
    unsigned prefix = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int b = threadIdx.x; b < 256; b += THREADS) hist[b] = 0;
        __syncthreads();
        unsigned mask = shift == 24 ? 0u : (0xFFFFFFFFu << (shift + 8));
        for (unsigned i = threadIdx.x; i < vocab; i += THREADS) {
            float x = row[i];
            if (!finite(x) || !keeps(cut, x, i)) continue;
            unsigned k = desc_key(x);
            if ((k & mask) == prefix) atomicAdd(&hist[(k >> shift) & 0xFF], weight(x));
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            W acc = 0;
            unsigned b = 0;
            for (; b < 255 && acc + hist[b] < need; b++) acc += hist[b];
            // Rounding can leave the need past every bin: step back to the last non-empty one.
            while (b > 0 && hist[b] == 0) {
                b--;
                acc -= hist[b];
            }
            s.bu = b;
            s.bq = need > acc ? (unsigned long long)(need - acc) : 0ull;
        }
        __syncthreads();
        prefix |= s.bu << shift;
        need = (W)s.bq;
        __syncthreads();
    }
    return prefix;
}

// Sum of the kept tokens' weights, in a fixed order.
__device__ float kept_mass(const float* row, unsigned vocab, Cut cut, float tmax, float t,
                           Shared& s) {
    float part = 0.0f;
    for (unsigned i = threadIdx.x; i < vocab; i += THREADS) {
        float x = row[i];
        if (finite(x) && keeps(cut, x, i)) part += expf((x - tmax) / t);
    }
    return block_add<float>(part, s.f, &s.bf);
}

template <typename T>
__device__ void sample_row(const T* __restrict__ logits, unsigned vocab, const RowParams& p,
                           const unsigned* __restrict__ penalty_ids,
                           const unsigned* __restrict__ penalty_counts,
                           const unsigned* __restrict__ penalty_recent,
                           const unsigned* __restrict__ bans, float* __restrict__ row,
                           unsigned* __restrict__ out) {
    __shared__ Shared s;
    // Work row, then the row's own penalties (ids unique per row), then its bans.
    // `+ 0.0f` turns -0.0 into 0.0, so the radix keys rank them equal, as the cuts compare them.
    for (unsigned i = threadIdx.x; i < vocab; i += THREADS) row[i] = load(logits + i) + 0.0f;
    __syncthreads();
    for (unsigned e = threadIdx.x; e < p.penalty_len; e += THREADS) {
        unsigned id = penalty_ids[p.penalty_start + e];
        if (id >= vocab) continue;
        float x = row[id];
        if (penalty_recent[p.penalty_start + e] && p.repetition_penalty != 1.0f) {
            x = x > 0.0f ? x / p.repetition_penalty : x * p.repetition_penalty;
        }
        unsigned n = penalty_counts[p.penalty_start + e];
        if (n > 0 && (p.presence_penalty != 0.0f || p.frequency_penalty != 0.0f)) {
            // Unfused, as the CPU computes it (a fused multiply-add rounds differently and could
            // move a greedy near-tie).
            float cost = __fadd_rn(p.presence_penalty, __fmul_rn(p.frequency_penalty, (float)n));
            x = __fsub_rn(x, cost);
        }
        row[id] = x;
    }
    __syncthreads();
    for (unsigned e = threadIdx.x; e < p.ban_len; e += THREADS) {
        unsigned id = bans[p.ban_start + e];
        if (id < vocab) row[id] = -INFINITY;
    }
    __syncthreads();

    // Argmax (NaN and -inf skipped), largest finite value, finite count.
    float best = -INFINITY, top = -INFINITY;
    unsigned best_id = NONE, finite_n = 0;
    for (unsigned i = threadIdx.x; i < vocab; i += THREADS) {
        float x = row[i];
        if (!isnan(x) && x != -INFINITY && (best_id == NONE || x > best)) {
            best = x;
            best_id = i;
        }
        if (finite(x)) {
            top = fmaxf(top, x);
            finite_n++;
        }
    }
    block_argmax(best, best_id, s);
    finite_n = block_add<unsigned>(finite_n, s.u, &s.bu);
    float tmax = top;
    unsigned dummy = threadIdx.x;
    block_argmax(tmax, dummy, s);  // the largest finite value (ids only break ties)
    if (best_id == NONE || p.temperature == 0.0f || finite_n == 0) {
        if (threadIdx.x == 0) *out = best_id;
        return;
    }
    const float t = p.temperature;
    Cut cut = {-INFINITY, NONE};
    if (p.min_p > 0.0f) cut = Cut{__fadd_rn(tmax, __fmul_rn(t, logf(p.min_p))), NONE};

    // Top-k: radix select of the k-th kept key, then the id among equal values.
    unsigned kept_n = finite_n;
    if (p.top_k > 0 && p.top_k < finite_n && p.min_p > 0.0f) {
        unsigned c = 0;
        for (unsigned i = threadIdx.x; i < vocab; i += THREADS) {
            float x = row[i];
            c += (finite(x) && keeps(cut, x, i)) ? 1u : 0u;
        }
        kept_n = block_add<unsigned>(c, s.u, &s.bu);
    }
    if (p.top_k > 0 && p.top_k < kept_n) {
        unsigned need = p.top_k;
        unsigned prefix = radix_select<unsigned>(
            row, vocab, cut, [](float) { return 1u; }, need, s.hist, s);
        float value = key_value(prefix);
        unsigned id = nth_equal(row, vocab, cut, value, need, s);
        if (id != NONE) cut = tighter(cut, Cut{value, id});
    }

    float mass = kept_mass(row, vocab, cut, tmax, t, s);

    // Top-p: radix select over mass in fixed point, then the id among equal values.
    if (p.top_p < 1.0f) {
        unsigned long long need = (unsigned long long)((double)(p.top_p * mass) * FIXED_ONE);
        auto fixed = [tmax, t](float x) {
            return (unsigned long long)((double)expf((x - tmax) / t) * FIXED_ONE);
        };
        unsigned prefix = radix_select<unsigned long long>(row, vocab, cut, fixed, need,
                                                           s.mass_hist, s);
        float value = key_value(prefix);
        // Among the kept tokens of this value, in id order: the first whose weight reaches the
        // rest of the need (all of them if rounding leaves some over).
        unsigned long long wq = fixed(value);
        unsigned n = wq == 0 ? 1u : (unsigned)((need + wq - 1) / wq);
        unsigned id = nth_equal(row, vocab, cut, value, n == 0 ? 1u : n, s);
        cut = tighter(cut, Cut{value, id});
        mass = kept_mass(row, vocab, cut, tmax, t, s);
    }

    // The draw: kept tokens in id order until the running weight passes u * mass.
    // The running weight is carried across tiles in double: in float a carry near the mass would
    // drop whole tiles of small weights.
    const double target = (double)unit_at(p.seed, p.step) * (double)mass;
    double carry = 0.0;
    unsigned last = NONE;
    for (unsigned base = 0; base < vocab; base += THREADS) {
        unsigned i = base + threadIdx.x;
        float x = i < vocab ? row[i] : -INFINITY;
        bool kept = i < vocab && finite(x) && keeps(cut, x, i);
        float w = kept ? expf((x - tmax) / t) : 0.0f;
        float total;
        float incl = block_scan<float>(w, total, s.f, &s.bf);
        // The first kept thread whose running weight passes the target.
        unsigned hit = (kept && target < carry + (double)incl) ? i : NONE;
        unsigned keep_last = kept ? i : NONE;
        float hv = 0.0f;
        block_argmax(hv, hit, s);  // lowest id among hits (all values equal)
        float lv = 0.0f;
        unsigned neg_last = keep_last == NONE ? NONE : (0xFFFFFFFEu - keep_last);
        block_argmax(lv, neg_last, s);  // highest kept id of the tile
        if (neg_last != NONE) last = 0xFFFFFFFEu - neg_last;
        if (hit != NONE) {
            if (threadIdx.x == 0) *out = hit;
            return;
        }
        carry += (double)total;
    }
    if (threadIdx.x == 0) *out = last;
}


// ---------------------------------------------------------------------------------------------
// The fast variant: two passes over the logits (three when the first guess of the candidate set
// falls short), every cut and the draw on at most 1,024 candidates in shared memory.
//
//   pass 1: argmax, largest finite logit, finite count (greedy stops here);
//   pass 2: for the tokens the min-p floor keeps: their count and mass, the mass of each
//           256-token segment (for draws over the whole kept set), a histogram of count and
//           mass by distance below the top in half-nat buckets, and the candidates, the kept
//           tokens less than FIRST_BUCKETS buckets below the top (a rank-order prefix, since the
//           bucket falls as the logit rises);
//   pass 3 (only when needed): the candidates again with the bucket limit the histogram
//           says holds top-k's k tokens or top-p's mass, within 1,024; or, for top-p alone
//           when that prefix is longer, the mass above the bucket holding the cut (per
//           segment) and that bucket's tokens as the candidates, so only the cut's own
//           bucket is sorted and the draw walks the segments.
// Then the candidates are sorted in rank order (bitonic, one per thread): top-k is a prefix,
// top-p the first prefix whose mass (double) reaches top_p of the kept mass; the kept prefix is
// sorted again by id and walked for the draw. Without top-k and top-p the draw walks the
// segment masses, then one segment. Penalised and banned tokens (sorted per row on the host)
// are looked up through a hashed bitmap and a binary search. Rows the fast path cannot take
// (over 1,024 such tokens, a vocabulary over 262,144, k over 1,024, a top-p cut past the
// histogram or in a bucket of over 1,024 tokens) run the general path above, so every row gets
// the reference's answer.

constexpr int CAND = THREADS;             // candidates, one per thread
constexpr int SPECIAL = 1024;             // penalised or banned tokens per row
constexpr int HASH_WORDS = 2048;          // 65,536 bits
constexpr int SEG = 256;                  // tokens per segment
constexpr int MAX_SEGS = THREADS;         // so vocabularies up to 262,144
constexpr int BUCKETS = 64;               // histogram buckets, half a nat each
constexpr float BUCKETS_PER_NAT = 2.0f;
constexpr int FIRST_BUCKETS = 14;
constexpr int HIST_COPIES = 8;         // first guess: within 7 nats (weights above 9e-4)
constexpr unsigned long long NO_KEY = 0xFFFFFFFFFFFFFFFFull;

struct FastShared {
    unsigned sp_id[SPECIAL];
    float sp_val[SPECIAL];
    unsigned bits[HASH_WORDS];
    unsigned long long key[CAND];
    double seg[MAX_SEGS];
    unsigned hist_n[HIST_COPIES][BUCKETS];  // a copy per group of 4 warps: fewer atomics collide
    float hist_m[HIST_COPIES][BUCKETS];
    unsigned ncand;
    unsigned limit;     // bucket limit of the candidates (mode 3: the bucket of the cut)
    int mode;           // 0: candidates, 1: segments, 2: general path, 3: top-p bucket cut
    double dq;
};

// The row's value of token `id` (raw logit `x`), penalties and bans applied.
__device__ __forceinline__ float fast_value(const FastShared& f, unsigned nsp, unsigned id,
                                            float x) {
    if (nsp && (f.bits[(id >> 5) & (HASH_WORDS - 1)] >> (id & 31)) & 1u) {
        unsigned lo = 0, hi = nsp;
        while (lo < hi) {
            unsigned mid = (lo + hi) >> 1;
            if (f.sp_id[mid] < id) lo = mid + 1; else hi = mid;
        }
        if (lo < nsp && f.sp_id[lo] == id) return f.sp_val[lo];
    }
    return x + 0.0f;  // -0.0 ranks with 0.0, as the cuts compare them
}

__device__ __forceinline__ int bucket_of(float x, float tmax, float t) {
    float d = (tmax - x) / t * BUCKETS_PER_NAT;
    return d < (float)BUCKETS ? (int)d : BUCKETS;
}

// Adds token `id` (value x) to the candidates when there is room (the count still grows, so an
// overflow is seen).
__device__ __forceinline__ void push_candidate(FastShared& f, float x, unsigned id) {
    unsigned slot = atomicAdd(&f.ncand, 1u);
    if (slot < CAND) f.key[slot] = ((unsigned long long)desc_key(x) << 32) | id;
}

// Stores a segment's mass (the warp's lanes' shares, summed in double) and clears the share.
__device__ __forceinline__ void store_segment(FastShared& f, float& share, unsigned sg,
                                              unsigned lane) {
    double m = share;
    for (int o = 16; o > 0; o >>= 1) m += __shfl_down_sync(0xFFFFFFFFu, m, o);
    if (lane == 0) f.seg[sg] = m;
    share = 0.0f;
}

// The first histogram bucket at which the running mass, from `start`, reaches `target`, with its
// count in `count`; -1 when none does. Read by one thread (it sums the copies).
__device__ int crossing_bucket(const FastShared& f, double start, double target,
                               unsigned& count) {
    double m = start;
    for (int b = 0; b < BUCKETS; ++b) {
        unsigned n = 0;
        for (int c = 0; c < HIST_COPIES; ++c) {
            n += f.hist_n[c][b];
            m += (double)f.hist_m[c][b];
        }
        if (m >= target) {
            count = n;
            return b;
        }
    }
    count = 0;
    return -1;
}

// The sub-bucket (of BUCKETS) of a value in bucket `b`: the same float steps as bucket_of, so
// the two agree, and monotone in x within the bucket.
__device__ __forceinline__ int sub_bucket(float x, float tmax, float t, int b) {
    float d = (tmax - x) / t * BUCKETS_PER_NAT;
    int sb = (int)((d - (float)b) * (float)BUCKETS);
    return sb < 0 ? 0 : (sb >= BUCKETS ? BUCKETS - 1 : sb);
}

// Ascending bitonic sort of the block's CAND keys (one per thread).
__device__ void bitonic(unsigned long long* key) {
    const unsigned i = threadIdx.x;
    for (unsigned size = 2; size <= CAND; size <<= 1) {
        for (unsigned stride = size >> 1; stride > 0; stride >>= 1) {
            __syncthreads();
            unsigned j = i ^ stride;
            if (j > i) {
                bool up = (i & size) == 0;
                unsigned long long a = key[i], b = key[j];
                if ((a > b) == up) {
                    key[i] = b;
                    key[j] = a;
                }
            }
        }
    }
    __syncthreads();
}

// Every kept token of the row (min-p floor `cut`) with its value, in segments of 256 ids: warp w
// takes segments w, w + 32, ...; `visit(id, x, seg)` per kept token, `seg_done(seg, lane)` after
// each segment.
template <typename T, typename V, typename S>
__device__ __forceinline__ void fast_pass(const T* __restrict__ logits, unsigned vocab,
                                          const FastShared& f, unsigned nsp, V visit, S seg_done) {
    const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const unsigned nseg = (vocab + SEG - 1) / SEG;
    constexpr int BATCH = 4;  // loads in flight per lane
    for (unsigned sg = warp; sg < nseg; sg += WARPS) {
        for (int j0 = 0; j0 < SEG / 32; j0 += BATCH) {
            float raw[BATCH];
#pragma unroll
            for (int j = 0; j < BATCH; ++j) {
                unsigned id = sg * SEG + (j0 + j) * 32 + lane;
                raw[j] = id < vocab ? load(logits + id) : -INFINITY;
            }
#pragma unroll
            for (int j = 0; j < BATCH; ++j) {
                unsigned id = sg * SEG + (j0 + j) * 32 + lane;
                if (id < vocab) visit(id, fast_value(f, nsp, id, raw[j]), sg);
            }
        }
        seg_done(sg, lane);
    }
}

// The general path as a call of its own, so its registers do not add to the fast path's.
template <typename T>
__device__ __noinline__ void general_row(const T* __restrict__ logits, unsigned vocab,
                                         const RowParams& p,
                                         const unsigned* __restrict__ penalty_ids,
                                         const unsigned* __restrict__ penalty_counts,
                                         const unsigned* __restrict__ penalty_recent,
                                         const unsigned* __restrict__ bans,
                                         float* __restrict__ row, unsigned* __restrict__ out) {
    sample_row<T>(logits, vocab, p, penalty_ids, penalty_counts, penalty_recent, bans, row, out);
}

// The draw over a kept set in id order by its segment masses (f.seg, double): the first segment
// whose running mass passes `target`, then that segment's tokens walked by warp 0. `keep(id, x)`
// says whether a token (value x) is kept and `weight(x)` its weight, as the masses were summed.
// When rounding leaves the target past the last segment: `last` when given, otherwise the last
// kept token of the last segment with mass.
template <typename T, typename K, typename W>
__device__ __noinline__ void segment_draw(const T* __restrict__ logits, unsigned vocab, FastShared& f,
                             Shared& s, unsigned nsp, double target, unsigned last, K keep,
                             W weight, unsigned* __restrict__ out) {
    const unsigned nseg = (vocab + SEG - 1) / SEG;
    const double v = threadIdx.x < nseg ? f.seg[threadIdx.x] : 0.0;
    double sum;
    const double incl = block_scan<double>(v, sum, s.d, &s.bd);
    unsigned hit = (threadIdx.x < nseg && target < incl) ? threadIdx.x : NONE;
    float hv = 0.0f;
    block_argmax(hv, hit, s);
    if (hit == NONE) {
        if (last != NONE) {
            if (threadIdx.x == 0) *out = last;
            return;
        }
        // The last segment with mass, walked to its end.
        float at = threadIdx.x < nseg && v > 0.0 ? (float)threadIdx.x : -1.0f;
        unsigned idx = threadIdx.x;
        block_argmax(at, idx, s);
        hit = at < 0.0f ? 0u : (unsigned)at;
        target = INFINITY;
    }
    // The segment's tokens in id order, by warp 0.
    __syncthreads();
    if (threadIdx.x == hit) f.dq = target == INFINITY ? 0.0 : incl - v;
    __syncthreads();
    if (threadIdx.x < 32) {
        const unsigned lane = threadIdx.x;
        double carry = f.dq;
        unsigned found = NONE, prev = NONE;
        for (int j = 0; j < SEG / 32 && found == NONE; ++j) {
            unsigned id = hit * SEG + j * 32 + lane;
            float x = id < vocab ? fast_value(f, nsp, id, load(logits + id)) : -INFINITY;
            bool k = id < vocab && keep(id, x);
            double w = k ? (double)weight(x) : 0.0;
            double c = w;
            for (int o = 1; o < 32; o <<= 1) {
                double n = __shfl_up_sync(0xFFFFFFFFu, c, o);
                if (lane >= o) c += n;
            }
            unsigned ball = __ballot_sync(0xFFFFFFFFu, k && target < carry + c);
            if (ball) found = hit * SEG + j * 32 + (__ffs(ball) - 1);
            unsigned kb = __ballot_sync(0xFFFFFFFFu, k);
            if (kb) prev = hit * SEG + j * 32 + (31 - __clz(kb));
            carry += __shfl_sync(0xFFFFFFFFu, c, 31);
        }
        // Rounding between the segment sums and this walk: the segment's last kept token.
        if (lane == 0) *out = found != NONE ? found : prev;
    }
}

// Mode 3 of the fast path (top-p alone, the cut past the candidates' first reach), a call of
// its own so its registers do not add to the fast path's. False (the same in every thread)
// when it cannot give the reference's answer and the row needs the general path.
template <typename T>
__device__ __noinline__ bool topp_bucket_cut(const T* __restrict__ logits, unsigned vocab,
                                             const RowParams& p, FastShared& f, Shared& s,
                                             unsigned nsp, float tmax, float t, float floor,
                                             double total, double u, unsigned* __restrict__ out) {
    const unsigned nseg = (vocab + SEG - 1) / SEG;
    // Top-p alone with a cut past the candidates' reach: the histogram bucket holding the
    // cut is refined. Pass 3 sums the mass of the tokens above that bucket per segment
    // (exactly as pass 2 did) and gathers the bucket's own tokens as the candidates; they
    // are sorted in rank order and the cut found on them, starting from the mass above.
    // Level 0 refines the histogram bucket holding the cut; when that bucket holds more than
    // 1,024 tokens, level 1 (a fourth pass) refines the sub-bucket (1/64 of it) holding the cut,
    // from a sub-histogram level 0 gathered on the way.
    const int cut_bucket = (int)f.limit;
    int cut_sub = -1;  // the sub-bucket at level 1
    // -1: ranks above the cut's (sub-)bucket, 0: in it, 1: below.
    auto cls = [&](float x, int b) {
        if (b != cut_bucket) return b < cut_bucket ? -1 : 1;
        if (cut_sub < 0) return 0;
        const int sb = sub_bucket(x, tmax, t, b);
        return sb < cut_sub ? -1 : (sb > cut_sub ? 1 : 0);
    };
    const unsigned copy = (threadIdx.x >> 5) % HIST_COPIES;
    const double need = (double)p.top_p * total;
    double above = 0.0;
    unsigned ncand = 0;
    for (int level = 0; level < 2; ++level) {
        f.key[threadIdx.x] = NO_KEY;
        if (threadIdx.x == 0) f.ncand = 0;
        if (level == 0) {
            for (unsigned b = threadIdx.x; b < HIST_COPIES * BUCKETS; b += THREADS) {
                f.hist_n[b / BUCKETS][b % BUCKETS] = 0;
                f.hist_m[b / BUCKETS][b % BUCKETS] = 0.0f;
            }
        }
        __syncthreads();
        float above_seg = 0.0f;
        fast_pass(logits, vocab, f, nsp,
                  [&](unsigned id, float x, unsigned) {
                      if (!finite(x) || x < floor) return;
                      const int b = bucket_of(x, tmax, t);
                      const int c = cls(x, b);
                      if (c < 0) {
                          above_seg += expf((x - tmax) / t);
                      } else if (c == 0) {
                          if (level == 0) {
                              const int sb = sub_bucket(x, tmax, t, b);
                              atomicAdd(&f.hist_n[copy][sb], 1u);
                              atomicAdd(&f.hist_m[copy][sb], expf((x - tmax) / t));
                          }
                          push_candidate(f, x, id);
                      }
                  },
                  [&](unsigned sg, unsigned lane) { store_segment(f, above_seg, sg, lane); });
        __syncthreads();
        above = block_add<double>(threadIdx.x < nseg ? f.seg[threadIdx.x] : 0.0, s.d, &s.bd);
        ncand = f.ncand;
        if (ncand <= CAND || level == 1) break;
        // Too many tokens in the bucket: the sub-bucket where the mass crosses the need.
        if (threadIdx.x == 0) {
            unsigned n = 0;
            int found = crossing_bucket(f, above, need, n);
            if (n == 0 || n > CAND) found = -1;
            f.limit = (unsigned)found;
        }
        __syncthreads();
        cut_sub = (int)f.limit;
        if (cut_sub < 0) break;  // the general path below
    }
    // The float histogram put the cut in the wrong bucket, or the bucket overflowed.
    if (ncand > CAND || ncand == 0 || above >= need) return false;
    bitonic(f.key);  // rank order: value descending, then id
    const unsigned i = threadIdx.x;
    const float xi = i < ncand ? key_value((unsigned)(f.key[i] >> 32)) : -INFINITY;
    const double wi = i < ncand ? (double)expf((xi - tmax) / t) : 0.0;
    double sum;
    const double cum = above + block_scan<double>(wi, sum, s.d, &s.bd);
    unsigned hit = (i < ncand && cum >= need) ? i : NONE;
    float hv = 0.0f;
    block_argmax(hv, hit, s);
    if (hit == NONE) return false;
    const unsigned m = hit + 1;
    const double kept_mass = above + block_add<double>(i < m ? wi : 0.0, s.d, &s.bd);
    // The kept part of the cut's (sub-)bucket joins its segments' masses; a token of it is
    // kept when it ranks at or before the cut.
    const unsigned long long cut = f.key[m - 1];
    if (i < m) atomicAdd(&f.seg[(unsigned)(f.key[i] & 0xFFFFFFFFull) / SEG], wi);
    __syncthreads();
    segment_draw(logits, vocab, f, s, nsp, u * kept_mass, NONE,
                 [&](unsigned id, float x) {
                     if (!finite(x) || x < floor) return false;
                     const int c = cls(x, bucket_of(x, tmax, t));
                     return c < 0 ||
                            (c == 0 && (((unsigned long long)desc_key(x) << 32) | id) <= cut);
                 },
                 [&](float x) { return expf((x - tmax) / t); }, out);
    return true;
}

template <typename T>
__device__ void sample_row_fast(const T* __restrict__ logits, unsigned vocab, const RowParams& p,
                                const unsigned* __restrict__ penalty_ids,
                                const unsigned* __restrict__ penalty_counts,
                                const unsigned* __restrict__ penalty_recent,
                                const unsigned* __restrict__ bans,
                                const unsigned* __restrict__ special_ids,
                                const unsigned* __restrict__ special_info,
                                float* __restrict__ row, unsigned* __restrict__ out) {
    __shared__ FastShared f;
    __shared__ Shared s;
    const unsigned nsp = p.special_len;
    if (nsp > SPECIAL || vocab > (unsigned)(MAX_SEGS * SEG) || p.top_k > CAND) {
        general_row<T>(logits, vocab, p, penalty_ids, penalty_counts, penalty_recent, bans, row,
                      out);
        return;
    }
    // Penalised and banned tokens: their values, and the hashed bitmap.
    for (unsigned w = threadIdx.x; w < HASH_WORDS; w += THREADS) f.bits[w] = 0;
    __syncthreads();
    for (unsigned e = threadIdx.x; e < nsp; e += THREADS) {
        unsigned id = special_ids[p.special_start + e];
        unsigned info = special_info[p.special_start + e];
        float x = id < vocab ? load(logits + id) + 0.0f : -INFINITY;
        if ((info >> 30) & 1u && p.repetition_penalty != 1.0f) {
            x = x > 0.0f ? x / p.repetition_penalty : x * p.repetition_penalty;
        }
        unsigned n = info & 0x3FFFFFFFu;
        if (n > 0 && (p.presence_penalty != 0.0f || p.frequency_penalty != 0.0f)) {
            float cost = __fadd_rn(p.presence_penalty, __fmul_rn(p.frequency_penalty, (float)n));
            x = __fsub_rn(x, cost);
        }
        if (info >> 31) x = -INFINITY;
        f.sp_id[e] = id;
        f.sp_val[e] = x;
        atomicOr(&f.bits[(id >> 5) & (HASH_WORDS - 1)], 1u << (id & 31));
    }
    __syncthreads();

    // Pass 1: argmax (NaN and -inf skipped, ties to the lower id), largest finite, finite count.
    float best = -INFINITY, top = -INFINITY;
    unsigned best_id = NONE, finite_n = 0;
    fast_pass(logits, vocab, f, nsp,
              [&](unsigned id, float x, unsigned) {
                  if (!isnan(x) && x != -INFINITY &&
                      (best_id == NONE || x > best || (x == best && id < best_id))) {
                      best = x;
                      best_id = id;
                  }
                  if (finite(x)) {
                      top = fmaxf(top, x);
                      finite_n++;
                  }
              },
              [](unsigned, unsigned) {});
    block_argmax(best, best_id, s);
    finite_n = block_add<unsigned>(finite_n, s.u, &s.bu);
    float tmax = top;
    unsigned dummy = threadIdx.x;
    block_argmax(tmax, dummy, s);
    if (best_id == NONE || p.temperature == 0.0f || finite_n == 0) {
        if (threadIdx.x == 0) *out = best_id;
        return;
    }
    const float t = p.temperature;
    const float floor = p.min_p > 0.0f ? __fadd_rn(tmax, __fmul_rn(t, logf(p.min_p))) : -INFINITY;

    // Pass 2.
    for (unsigned b = threadIdx.x; b < HIST_COPIES * BUCKETS; b += THREADS) {
        f.hist_n[b / BUCKETS][b % BUCKETS] = 0;
        f.hist_m[b / BUCKETS][b % BUCKETS] = 0.0f;
    }
    const unsigned copy = (threadIdx.x >> 5) % HIST_COPIES;
    f.key[threadIdx.x] = NO_KEY;
    if (threadIdx.x == 0) f.ncand = 0;
    __syncthreads();
    float seg_mass = 0.0f;  // this lane's share of the current segment (8 tokens)
    unsigned kept = 0, last = 0;
    fast_pass(logits, vocab, f, nsp,
              [&](unsigned id, float x, unsigned) {
                  if (!finite(x) || x < floor) return;
                  float w = expf((x - tmax) / t);
                  seg_mass += w;
                  kept++;
                  last = max(last, id + 1);
                  int b = bucket_of(x, tmax, t);
                  if (b < BUCKETS) {
                      atomicAdd(&f.hist_n[copy][b], 1u);
                      atomicAdd(&f.hist_m[copy][b], w);
                      if (b < FIRST_BUCKETS) {
                          push_candidate(f, x, id);
                      }
                  }
              },
              [&](unsigned sg, unsigned lane) { store_segment(f, seg_mass, sg, lane); });
    const unsigned kept_n = block_add<unsigned>(kept, s.u, &s.bu);
    // The kept mass, summed in double over the segments (a float running sum would drop the
    // long tail of small weights).
    const unsigned nseg = (vocab + SEG - 1) / SEG;
    const double total =
        block_add<double>(threadIdx.x < nseg ? f.seg[threadIdx.x] : 0.0, s.d, &s.bd);
    unsigned neg = last == 0 ? NONE : 0xFFFFFFFEu - (last - 1);
    float zero = 0.0f;
    block_argmax(zero, neg, s);
    const unsigned last_kept = neg == NONE ? NONE : 0xFFFFFFFEu - neg;
    const unsigned need_k = (p.top_k > 0 && p.top_k < kept_n) ? p.top_k : 0u;
    const bool top_p = p.top_p < 1.0f;

    // What the candidates must hold, and whether a third pass is needed.
    if (threadIdx.x == 0) {
        int mode = 0;
        unsigned limit = FIRST_BUCKETS;
        if (!need_k && !top_p) {
            mode = 1;  // the whole kept set: segments
        } else {
            // The fewest buckets that hold k tokens, or top_p of the mass with a margin for the
            // float histogram (the sorted prefix checks the real mass).
            double want_m = top_p && !need_k ? (double)p.top_p * total * (1.0 + 1e-3) : 0.0;
            unsigned cn = 0;
            double cm = 0.0;
            int b = 0;
            for (; b < BUCKETS; ++b) {
                for (int c = 0; c < HIST_COPIES; ++c) {
                    cn += f.hist_n[c][b];
                    cm += (double)f.hist_m[c][b];
                }
                if ((need_k ? cn >= need_k : cm >= want_m)) break;
            }
            if (b == BUCKETS || cn > CAND) {
                mode = 2;
                if (top_p && !need_k) {
                    // The bucket where the histogram's mass crosses top_p: refined in pass 3
                    // (and a fourth when its own tokens do not fit the candidates).
                    unsigned n2 = 0;
                    const int c2 = crossing_bucket(f, 0.0, (double)p.top_p * total, n2);
                    // Over 1,024 tokens in it: refined once more on the way.
                    if (c2 >= 0 && n2 > 0) {
                        mode = 3;
                        limit = (unsigned)c2;
                    }
                }
            } else {
                limit = (unsigned)(b + 1);
                // The first guess holds what is needed: keep it when it fits.
                if (limit <= FIRST_BUCKETS && f.ncand <= CAND) limit = FIRST_BUCKETS;
            }
        }
        f.mode = mode;
        f.limit = limit;
    }
    __syncthreads();
    const int mode = f.mode;
    if (mode == 2) {
        general_row<T>(logits, vocab, p, penalty_ids, penalty_counts, penalty_recent, bans, row,
                      out);
        return;
    }
    const double u = (double)unit_at(p.seed, p.step);
    if (mode == 1) {
        segment_draw(logits, vocab, f, s, nsp, u * total, last_kept,
                     [&](unsigned, float x) { return finite(x) && x >= floor; },
                     [&](float x) { return expf((x - tmax) / t); }, out);
        return;
    }
    if (mode == 3) {
        if (!topp_bucket_cut<T>(logits, vocab, p, f, s, nsp, tmax, t, floor, total, u, out)) {
            general_row<T>(logits, vocab, p, penalty_ids, penalty_counts, penalty_recent, bans,
                          row, out);
        }
        return;
    }

    // Mode 0: the candidates (a third pass when the limit moved).
    if (f.limit != FIRST_BUCKETS) {
        const int limit = (int)f.limit;
        f.key[threadIdx.x] = NO_KEY;
        __syncthreads();
        if (threadIdx.x == 0) f.ncand = 0;
        __syncthreads();
        fast_pass(logits, vocab, f, nsp,
                  [&](unsigned id, float x, unsigned) {
                      if (!finite(x) || x < floor) return;
                      if (bucket_of(x, tmax, t) < limit) {
                          push_candidate(f, x, id);
                      }
                  },
                  [](unsigned, unsigned) {});
        __syncthreads();
    }
    const unsigned ncand = f.ncand;
    if (ncand > CAND || ncand == 0 || need_k > ncand) {
        general_row<T>(logits, vocab, p, penalty_ids, penalty_counts, penalty_recent, bans, row,
                      out);
        return;
    }
    bitonic(f.key);  // rank order: value descending, then id
    const unsigned i = threadIdx.x;
    const float xi = i < ncand ? key_value((unsigned)(f.key[i] >> 32)) : -INFINITY;
    const double wi = i < ncand ? (double)expf((xi - tmax) / t) : 0.0;
    unsigned m = need_k ? need_k : ncand;
    double w_in = i < m ? wi : 0.0;
    double sum;
    double cum = block_scan<double>(w_in, sum, s.d, &s.bd);
    double kept_mass = need_k ? sum : total;
    if (top_p) {
        const double need = (double)p.top_p * kept_mass;
        unsigned hit = (i < m && cum >= need) ? i : NONE;
        float hv = 0.0f;
        block_argmax(hv, hit, s);
        if (hit == NONE && !need_k && ncand < kept_n) {
            // The candidates hold less than the need (the histogram's float mass misled).
            general_row<T>(logits, vocab, p, penalty_ids, penalty_counts, penalty_recent, bans,
                          row, out);
            return;
        }
        if (hit != NONE) m = hit + 1;
        kept_mass = block_add<double>(i < m ? wi : 0.0, s.d, &s.bd);
    }
    // The kept prefix in id order, then the draw.
    const unsigned long long mine = i < m ? (((f.key[i] & 0xFFFFFFFFull) << 32) |
                                              __float_as_uint(xi))
                                          : NO_KEY;
    __syncthreads();
    f.key[i] = mine;
    bitonic(f.key);
    const unsigned long long k2 = f.key[i];
    const double w2 = i < m ? (double)expf((__uint_as_float((unsigned)k2) - tmax) / t) : 0.0;
    double cum2 = block_scan<double>(w2, sum, s.d, &s.bd);
    const double target = u * kept_mass;
    unsigned hit = (i < m && target < cum2) ? i : NONE;
    float hv = 0.0f;
    block_argmax(hv, hit, s);
    if (threadIdx.x == 0) {
        unsigned pick = hit != NONE ? hit : m - 1;
        *out = (unsigned)(f.key[pick] >> 32);
    }
}

}  // namespace

#define SAMPLE_KERNEL(NAME, T)                                                                 \
    extern "C" __global__ void __launch_bounds__(THREADS)                                     \
        NAME(const T* __restrict__ logits, unsigned vocab, const RowParams* __restrict__ rows, \
             const unsigned* __restrict__ penalty_ids,                                        \
             const unsigned* __restrict__ penalty_counts,                                     \
             const unsigned* __restrict__ penalty_recent, const unsigned* __restrict__ bans,   \
             float* __restrict__ work, unsigned* __restrict__ out) {                          \
        const size_t r = blockIdx.x;                                                          \
        sample_row<T>(logits + r * vocab, vocab, rows[r], penalty_ids, penalty_counts,        \
                      penalty_recent, bans, work + r * vocab, out + r);                       \
    }

SAMPLE_KERNEL(cited_sample_f32, float)
SAMPLE_KERNEL(cited_sample_bf16, __nv_bfloat16)

#define SAMPLE_FAST_KERNEL(NAME, T)                                                            \
    extern "C" __global__ void __launch_bounds__(THREADS)                                     \
        NAME(const T* __restrict__ logits, unsigned vocab, const RowParams* __restrict__ rows, \
             const unsigned* __restrict__ penalty_ids,                                        \
             const unsigned* __restrict__ penalty_counts,                                     \
             const unsigned* __restrict__ penalty_recent, const unsigned* __restrict__ bans,   \
             const unsigned* __restrict__ special_ids,                                        \
             const unsigned* __restrict__ special_info, float* __restrict__ work,             \
             unsigned* __restrict__ out) {                                                    \
        const size_t r = blockIdx.x;                                                          \
        sample_row_fast<T>(logits + r * vocab, vocab, rows[r], penalty_ids, penalty_counts,   \
                           penalty_recent, bans, special_ids, special_info, work + r * vocab, \
                           out + r);                                                          \
    }

SAMPLE_FAST_KERNEL(cited_sample_fast_f32, float)
SAMPLE_FAST_KERNEL(cited_sample_fast_bf16, __nv_bfloat16)
