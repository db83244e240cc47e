"""faiss-cpu anchor for benches/search.rs: IndexFlatIP, d = 384, random unit vectors, 200 single
queries and 20 batches of 32 at 10^4, 10^5 and 10^6 rows (SEARCH_SIZES to choose), k = 10;
prints p50 and p99 latency.

    pip install faiss-cpu
    python scripts/bench_faiss.py
"""
import os
import time

import faiss
import numpy as np


def percentiles(ms):
    ms = sorted(ms)
    return ms[round((len(ms) - 1) * 0.5)], ms[round((len(ms) - 1) * 0.99)]


def main():
    d, queries = 384, 200
    rng = np.random.default_rng(0)
    sizes = [int(x) for x in os.environ.get("SEARCH_SIZES", "10000,100000,1000000").split(",")]
    for n in sizes:
        xb = rng.random((n, d), dtype=np.float32) - 0.5
        xb /= np.linalg.norm(xb, axis=1, keepdims=True)
        index = faiss.IndexFlatIP(d)
        index.add(xb)
        xq = rng.random((queries, d), dtype=np.float32) - 0.5
        xq /= np.linalg.norm(xq, axis=1, keepdims=True)
        index.search(xq[:1], 10)  # warm-up
        ms = []
        for i in range(queries):
            t = time.perf_counter()
            index.search(xq[i : i + 1], 10)
            ms.append((time.perf_counter() - t) * 1e3)
        p50, p99 = percentiles(ms)
        print(f"faiss IndexFlatIP top-10, 1 query\tn={n}\tp50 {p50:.3f} ms\tp99 {p99:.3f} ms "
              f"(faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads)")
        ms = []
        for b in range(20):
            i = (b * 32) % (queries - 32)
            t = time.perf_counter()
            index.search(xq[i : i + 32], 10)
            ms.append((time.perf_counter() - t) * 1e3)
        p50, p99 = percentiles(ms)
        print(f"faiss IndexFlatIP top-10, 32 queries\tn={n}\tp50 {p50:.3f} ms\tp99 {p99:.3f} ms")


if __name__ == "__main__":
    main()
