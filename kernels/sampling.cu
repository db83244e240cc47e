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
    unsigned hist[256];
    unsigned long long mass_hist[256];
    float bf;
    unsigned bu;
    unsigned bu2;
    unsigned long long bq;
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
    float target = unit_at(p.seed, p.step) * mass;
    float carry = 0.0f;
    unsigned last = NONE;
    for (unsigned base = 0; base < vocab; base += THREADS) {
        unsigned i = base + threadIdx.x;
        float x = i < vocab ? row[i] : -INFINITY;
        bool kept = i < vocab && finite(x) && keeps(cut, x, i);
        float w = kept ? expf((x - tmax) / t) : 0.0f;
        float total;
        float incl = block_scan<float>(w, total, s.f, &s.bf);
        // The first kept thread whose running weight passes the target.
        unsigned hit = (kept && target < carry + incl) ? i : NONE;
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
        carry += total;
    }
    if (threadIdx.x == 0) *out = last;
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
