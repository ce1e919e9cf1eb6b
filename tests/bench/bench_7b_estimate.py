"""Benchmark (prints figures; not a test): what one Llama-7B-shaped forward costs here, and what the
paper-size scorecard of a 7B pair would cost, from forward-pass counts.

No 7B weights are needed: one decoder layer with Llama-7B's shape (hidden 4096, 32 heads, MLP 11008)
is built from a config with random weights and timed on this machine's CPU; a full forward is 32 of
them plus the (last-token) vocabulary projection. A GPU figure is an *estimate* from FLOPs and an
assumed utilisation, printed as such: this project's sessions had no GPU to measure on.

    python tests/bench/bench_7b_estimate.py [--batch 8] [--seq 54] [--passes N]
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                num_hidden_layers=32, vocab_size=32000, max_position_embeddings=2048)
PARAMS_PER_LAYER = 4 * 4096 * 4096 + 3 * 4096 * 11008  # attention q/k/v/o + MLP gate/up/down


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=54, help="the paper's 7-box prompt length in LLaMA tokens")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--passes", type=int, default=0,
                        help="forward-pass count (prompt batches) of a planned run, to turn into time")
    parser.add_argument("--gpu-tflops", type=float, default=989.0, help="assumed peak (H100 SXM bf16 dense)")
    parser.add_argument("--gpu-utilisation", type=float, default=0.3, help="assumed fraction of peak")
    args = parser.parse_args()
    torch.set_num_threads(2)
    config = LlamaConfig(**LLAMA_7B)
    config._attn_implementation = "sdpa"
    layer = LlamaDecoderLayer(config, layer_idx=0).eval()
    rotary = LlamaRotaryEmbedding(config)
    x = torch.randn(args.batch, args.seq, 4096)
    position_ids = torch.arange(args.seq).unsqueeze(0).expand(args.batch, -1)
    emb = rotary(x, position_ids)
    mask = torch.full((args.seq, args.seq), float("-inf")).triu(1)[None, None].expand(args.batch, 1, -1, -1)
    times = []
    with torch.no_grad():
        layer(x, attention_mask=mask, position_embeddings=emb, position_ids=position_ids)  # warm-up
        for _ in range(args.repeats):
            start = time.perf_counter()
            layer(x, attention_mask=mask, position_embeddings=emb, position_ids=position_ids)
            times.append(time.perf_counter() - start)
    per_layer = sorted(times)[len(times) // 2]
    tokens = args.batch * args.seq
    lm_head_flops = 2 * 4096 * 32000 * args.batch  # last token only (logits_to_keep=1)
    flops = 2 * PARAMS_PER_LAYER * tokens * 32 + lm_head_flops
    cpu_forward = per_layer * 32 + per_layer * lm_head_flops / (2 * PARAMS_PER_LAYER * tokens)
    gpu_forward = flops / (args.gpu_tflops * 1e12 * args.gpu_utilisation)
    print(f"one Llama-7B-shaped layer, batch {args.batch} x {args.seq} tokens, fp32, {torch.get_num_threads()} "
          f"CPU threads: {per_layer:.2f} s (median of {args.repeats}; all {[round(t, 2) for t in times]})")
    print(f"full forward ({flops / 1e12:.2f} TFLOP): measured-extrapolated CPU {cpu_forward:.1f} s; "
          f"GPU ESTIMATE (not measured) {gpu_forward * 1e3:.1f} ms at {args.gpu_utilisation:.0%} of "
          f"{args.gpu_tflops:.0f} TFLOP/s")
    if args.passes:
        print(f"{args.passes} forward passes: CPU ~{args.passes * cpu_forward / 3600:.1f} h; "
              f"GPU ESTIMATE ~{args.passes * gpu_forward / 60:.1f} min (backward passes count ~2x)")


if __name__ == "__main__":
    main()
