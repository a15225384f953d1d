"""Perplexity throughput of `dus_plugin.eval` on a 48-layer model (SOLAR 10.7B shape, random init, bf16).

  python benchmarks/eval_perplexity.py --out benchmarks/results/eval_perplexity.json
  python benchmarks/eval_perplexity.py --tiny
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from pathlib import Path

SOLAR = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
             vocab_size=32000, num_hidden_layers=48, max_position_embeddings=4096)
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=512, num_hidden_layers=4, max_position_embeddings=512)


def main() -> None:
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    from dus_plugin.eval.perplexity import perplexity
    from dus_plugin.fixtures import make_tokenizer, tiny_corpus

    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--strides", default="2048,1024")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    shape = TINY if args.tiny else SOLAR
    if args.tiny:
        args.max_length, args.strides = 128, "128,64"
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = MistralConfig(**shape, tie_word_embeddings=False)
    with torch.device(dev):
        model = MistralForCausalLM(cfg).to(torch.bfloat16 if dev == "cuda" else torch.float32).eval()
    params = sum(p.numel() for p in model.parameters())
    tok = make_tokenizer()
    text = "\n\n".join(tiny_corpus(20000 if not args.tiny else 400, seed=3))
    runs = []
    for stride in (int(s) for s in args.strides.split(",")):
        perplexity(model, tok, [text[:20000]], max_length=args.max_length, stride=stride,
                   batch_size=args.batch_size, progress=False)  # warm-up
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        r = perplexity(model, tok, [text], max_length=args.max_length, stride=stride, batch_size=args.batch_size,
                       progress=False)
        if dev == "cuda":
            torch.cuda.synchronize()
        secs = time.perf_counter() - t0
        forwarded = r.tokens * args.max_length / stride  # tokens run through the model
        runs.append({"stride": stride, "scored_tokens": r.tokens, "seconds": secs, "scored_tok_s": r.tokens / secs,
                     "forward_tok_s": forwarded / secs})
        print(json.dumps(runs[-1]), flush=True)
    report = {"params": params, "layers": shape["num_hidden_layers"], "max_length": args.max_length,
              "batch_size": args.batch_size, "dtype": str(next(model.parameters()).dtype), "runs": runs,
              "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "date": dt.date.today().isoformat()}
    if dev == "cuda":
        report["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
