"""PyTorch anchors for the GPU check, on the same device in the same run:
- device-to-device copy bandwidth (the ceiling for corpus scans),
- similarity search as `torch.topk(queries @ corpus.T, k)` on f16 data,
- embeddings of 128-token texts with a MiniLM-shaped BERT in f16 through transformers' BertModel
  plus mean pooling and L2 normalisation (the modules sentence-transformers runs for
  all-MiniLM-L6-v2), tokenisation excluded, random weights as on our side,
- generation through transformers' `generate` (greedy, no end token) with random bf16 weights of
  the generator shapes in models/configs/, prompts of random tokens: output tokens per second,
  prefill included, as `gpu-check generate` counts them.

    python scripts/gpu_anchors.py --device cuda
    python scripts/gpu_anchors.py --device cpu --n 20000 --nq 1,4 --k 10 --batch 1,2   # dry run
"""
import argparse
import statistics
import sys
import time

torch = None  # imported in main, after the arguments are checked


def ints(s):
    return [int(x) for x in s.split(",")]


def timer(device, fn, min_runs=5, max_runs=30, budget_s=1.5):
    fn()  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    times = []
    started = time.perf_counter()
    while len(times) < min_runs or (len(times) < max_runs and time.perf_counter() - started < budget_s):
        if device == "cuda":
            a = torch.cuda.Event(enable_timing=True)
            b = torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--n", type=ints, default=[1_000_000, 10_000_000])
    ap.add_argument("--nq", type=ints, default=[1, 32, 256])
    ap.add_argument("--k", type=ints, default=[10, 100])
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--batch", type=ints, default=[1, 32, 256])
    ap.add_argument("--peak-tbs", type=float, default=4.8)
    ap.add_argument("--sample-batch", type=int, default=256)
    ap.add_argument("--vocab", type=ints, default=[32000, 151936])
    ap.add_argument("--gen-models", type=lambda s: s.split(","),
                    default=["smollm2-135m", "llama-3.2-1b"])
    ap.add_argument("--gen-batch", type=ints, default=[1, 32, 256])
    ap.add_argument("--gen-prompt", type=int, default=512)
    ap.add_argument("--gen-out", type=int, default=256)
    ap.add_argument("--only", type=lambda s: set(s.split(",")),
                    default={"similarity", "sampling", "bert", "generate"},
                    help="sections to run: similarity, sampling, bert, generate")
    args = ap.parse_args()
    global torch
    try:
        import torch as torch_module
    except ImportError:
        # Exit code 3: the arguments are fine, PyTorch is not here (a dry run on a machine
        # without it); gpu-check.sh tells this apart from a failure.
        print("ANCHOR\tskipped: PyTorch is not installed here")
        sys.exit(3)
    torch = torch_module
    dev = args.device
    half = torch.float16 if dev == "cuda" else torch.float32
    torch.manual_seed(0)
    print(f"ANCHOR\ttorch {torch.__version__}\t{torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'}")

    if dev == "cuda":
        x = torch.empty(2 * 1024**3, dtype=torch.uint8, device=dev)
        y = torch.empty_like(x)
        ms = timer(dev, lambda: y.copy_(x))
        print(f"ANCHOR\tcopy d2d 2 GiB\t{ms:.3f} ms\t{2 * x.numel() / ms / 1e9:.2f} TB/s (read + write)")
        del x, y

    for n in args.n if "similarity" in args.only else []:
        corpus = torch.randn(n, args.d, device=dev, dtype=half)
        nbytes = corpus.numel() * corpus.element_size()
        for nq in args.nq:
            q = torch.randn(nq, args.d, device=dev, dtype=half)
            for k in args.k:
                ms = timer(dev, lambda: torch.topk(q @ corpus.T, k, dim=1))
                tbs = nbytes / (ms / 1e3) / 1e12
                print(f"ANCHOR\ttorch matmul+topk\tn={n}\tnq={nq}\tk={k}\t{ms:.3f} ms\t{tbs:.2f} TB/s"
                      f"\t{100 * tbs / args.peak_tbs:.0f}% of {args.peak_tbs} TB/s")
        del corpus
        if dev == "cuda":
            torch.cuda.empty_cache()

    # A sort-based sampler, as Hugging Face and many servers write it: temperature, top-k,
    # softmax, a full sort, cumulative sum for top-p, then multinomial.
    def sort_sampler(logits, temperature, top_k, top_p):
        x = logits.float() / temperature
        if top_k > 0:
            kth = torch.topk(x, top_k, dim=-1).values[:, -1:]
            x = x.masked_fill(x < kth, float("-inf"))
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        cum = torch.cumsum(probs, dim=-1)
        drop = cum - probs > top_p
        sorted_x = sorted_x.masked_fill(drop, float("-inf"))
        choice = torch.multinomial(torch.softmax(sorted_x, dim=-1), 1)
        return order.gather(-1, choice)

    for vocab in args.vocab if "sampling" in args.only else []:
        for dtype in (torch.bfloat16, torch.float32):
            logits = (torch.randn(args.sample_batch, vocab, device=dev) * 3).to(dtype)
            for name, top_k, top_p in (("top_k50_top_p0.9", 50, 0.9), ("top_p0.95", 0, 0.95)):
                ms = timer(dev, lambda: sort_sampler(logits, 0.8, top_k, top_p))
                print(f"ANCHOR\ttorch sort sampler {name}\t{str(dtype).split('.')[-1]} batch={args.sample_batch} vocab={vocab}\t{ms:.3f} ms")
            ms = timer(dev, lambda: torch.argmax(logits, dim=-1))
            print(f"ANCHOR\ttorch argmax\t{str(dtype).split('.')[-1]} batch={args.sample_batch} vocab={vocab}\t{ms:.3f} ms")
            del logits

    if "bert" in args.only:
        bert_anchor(args, dev, half)
    if "generate" in args.only:
        generate_anchor(args, dev)


def bert_anchor(args, dev, half):
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                     intermediate_size=1536, hidden_act="gelu", max_position_embeddings=512)
    model = BertModel(cfg, add_pooling_layer=False).to(dev, half).eval()
    for b in args.batch:
        ids = torch.randint(0, 30522, (b, 128), device=dev)
        mask = torch.ones_like(ids)

        def run():
            with torch.inference_mode():
                h = model(input_ids=ids, attention_mask=mask).last_hidden_state
                m = mask.unsqueeze(-1).to(h.dtype)
                e = (h * m).sum(1) / m.sum(1)
                return torch.nn.functional.normalize(e.float(), dim=-1)

        ms = timer(dev, run)
        print(f"ANCHOR\ttransformers BERT {str(half).split('.')[-1]}\tbatch={b}\t{ms:.3f} ms\t{b / ms * 1e3:.0f} texts/s")


def generate_anchor(args, dev):
    import os
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "models", "configs")
    for name in args.gen_models:
        cfg = LlamaConfig.from_json_file(os.path.join(root, f"{name}.json"))
        with torch.device(dev):
            model = LlamaForCausalLM(cfg).to(dtype).eval()

        def generate(b, prompt, out):
            ids = torch.randint(0, cfg.vocab_size, (b, prompt), device=dev)
            with torch.inference_mode():
                y = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                   max_new_tokens=out, min_new_tokens=out, do_sample=False,
                                   pad_token_id=0)
            if dev == "cuda":
                torch.cuda.synchronize()
            assert y.shape == (b, prompt + out), f"generated {tuple(y.shape)}"

        generate(2, 16, 4)  # warm-up
        for b in args.gen_batch:
            started = time.perf_counter()
            generate(b, args.gen_prompt, args.gen_out)
            secs = time.perf_counter() - started
            print(f"ANCHOR\ttransformers generate {name} {str(dtype).split('.')[-1]}\tbatch={b} "
                  f"prompt={args.gen_prompt} out={args.gen_out}\t{b * args.gen_out / secs:.1f} tok/s"
                  f"\t{secs:.2f} s")
        del model
        if dev == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
