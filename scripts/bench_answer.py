"""Times cited answers over HTTP against a running server: streams the seed question N times and
prints, per run and as medians, the time to the first delta, the total time, the generated tokens
and the citations, checking the stream's shape on the way (sources first, done last, every
citation among the sources).

    python3 scripts/bench_answer.py [--url http://127.0.0.1:8080] [--runs 3] [--max-tokens 200]
"""
import argparse
import json
import statistics
import time
import urllib.request

SEED = "How is metastatic sarcoma different from other stages?"


def run(url, question, max_tokens):
    body = json.dumps({"question": question, "max_tokens": max_tokens}).encode()
    req = urllib.request.Request(url + "/v1/answer", data=body,
                                 headers={"content-type": "application/json"})
    started = time.perf_counter()
    first = None
    events = []
    with urllib.request.urlopen(req) as r:
        name, data = "message", []
        for raw in r:
            line = raw.decode().rstrip("\n")
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].lstrip())
            elif line == "" and data:
                if name == "delta" and first is None:
                    first = time.perf_counter() - started
                events.append((name, json.loads("\n".join(data))))
                name, data = "message", []
    total = time.perf_counter() - started
    assert events[0][0] == "sources" and events[-1][0] == "done", [e[0] for e in events]
    ids = [s["id"] for s in events[0][1]["sources"]]
    cites = [e[1] for e in events if e[0] == "citation"]
    assert all(c["passage_id"] in ids for c in cites)
    done = events[-1][1]
    return {
        "first_delta_s": first,
        "total_s": total,
        "tokens": done["usage"]["completion_tokens"],
        "prompt_tokens": done["usage"]["prompt_tokens"],
        "citations": len(cites),
        "first_source": events[0][1]["sources"][0]["title"] if ids else None,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=200)
    ap.add_argument("--question", default=SEED)
    a = ap.parse_args()
    results = []
    for i in range(a.runs):
        r = run(a.url, a.question, a.max_tokens)
        results.append(r)
        print(f"run {i + 1}: " + json.dumps(r))
    med = lambda k: statistics.median(r[k] for r in results)
    print(f"median: first delta {med('first_delta_s'):.2f} s, total {med('total_s'):.2f} s, "
          f"{med('tokens'):.0f} tokens, {med('citations'):.0f} citations, "
          f"decode {med('tokens') / (med('total_s') - med('first_delta_s')):.1f} tok/s after the first")


if __name__ == "__main__":
    main()
