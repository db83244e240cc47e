"""llama.cpp anchor for benches/generate.rs: one stream of SmolLM2-135M-Instruct Q4_1 through
llama-cpp-python, 2 threads, the same prompt text, prefill of 128 tokens and greedy decode after
98 tokens (64 steps per run). Prints medians over several runs.

    pip install llama-cpp-python==0.3.36
    python scripts/bench_llama_cpp.py
"""
import pathlib
import re
import statistics
import sys
import time

import llama_cpp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
GGUF = ROOT / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
BENCH_TEXT = (ROOT / "benches" / "common.rs").read_text()


def bench_text() -> str:
    # The same paragraph the Rust benches use, read from benches/common.rs (a Rust string whose
    # backslash-newline continuations drop the newline and the next line's indentation).
    start = BENCH_TEXT.index('"', BENCH_TEXT.index("pub const TEXT: &str =")) + 1
    end = BENCH_TEXT.index('";', start)
    return re.sub(r"\\\n\s*", "", BENCH_TEXT[start:end])


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 7
    llm = llama_cpp.Llama(model_path=str(GGUF), n_ctx=512, n_batch=512, n_threads=2,
                          n_threads_batch=2, verbose=False)
    ids = llm.tokenize((bench_text() * 2).encode(), add_bos=False)
    prefill, decode = [], []
    for _ in range(runs):
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids[:128])
        prefill.append(128 / (time.perf_counter() - t))

        llm.reset()
        llm.eval(ids[:98])
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        t = time.perf_counter()
        for _ in range(64):
            llm.eval([nxt])
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        decode.append(64 / (time.perf_counter() - t))
    print(f"llama.cpp (llama-cpp-python {llama_cpp.__version__}, 2 threads): "
          f"prefill 128 tokens median {statistics.median(prefill):.1f} tok/s, "
          f"decode after 98 median {statistics.median(decode):.1f} tok/s ({runs} runs)")


if __name__ == "__main__":
    main()
