"""faiss-cpu anchor for benches/search.rs: IndexFlatIP, d = 384, random unit vectors, 200 single
queries at 10^4 and 10^5 rows, k = 10; prints p50 and p99 latency.

    pip install faiss-cpu
    python scripts/bench_faiss.py
"""
import time

import faiss
import numpy as np


def main():
    d, queries = 384, 200
    rng = np.random.default_rng(0)
    for n in (10_000, 100_000):
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
        ms.sort()
        p50 = ms[round((len(ms) - 1) * 0.5)]
        p99 = ms[round((len(ms) - 1) * 0.99)]
        print(f"faiss IndexFlatIP top-10\tn={n}\tp50 {p50:.3f} ms\tp99 {p99:.3f} ms "
              f"(faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads)")


if __name__ == "__main__":
    main()
