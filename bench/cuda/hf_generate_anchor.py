"""The peer of bench_generate: Hugging Face transformers `generate` (static cache, SDPA, bf16,
greedy) on the same GPU, at a given batch, prompt and generation length. Decode tokens/s counts
the generated tokens of the whole batch over the wall time of `generate` (prefill included), as
bench_generate does.

  python3 bench/cuda/hf_generate_anchor.py --model DIR | --shape 7b|1b  --batch B --prompt P --generate G

--model loads a checkpoint written by bench_generate --export_dir (dmc-export's layout); --shape
builds the same shape with random weights (decode speed does not depend on their values).
"""
import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
               num_attention_heads=32, num_key_value_heads=4),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--shape", default="1b")
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--generate", type=int, default=512)
    ap.add_argument("--reps", type=int, default=2)
    a = ap.parse_args()
    if a.model:
        model = LlamaForCausalLM.from_pretrained(a.model, torch_dtype=torch.bfloat16,
                                                 attn_implementation="sdpa")
    else:
        cfg = LlamaConfig(vocab_size=32000, max_position_embeddings=8192, **SHAPES[a.shape])
        cfg._attn_implementation = "sdpa"
        with torch.device("cuda"):
            model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model = model.cuda().eval()
    model.generation_config.cache_implementation = "static"
    ids = torch.randint(0, model.config.vocab_size, (a.batch, a.prompt), device="cuda")
    mask = torch.ones_like(ids)
    best = None
    for rep in range(a.reps + 1):  # the first run warms up (and compiles nothing: eager)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=a.generate,
                                 min_new_tokens=a.generate, do_sample=False)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if rep > 0:
            best = dt if best is None else min(best, dt)
    new = out.shape[1] - a.prompt
    print(f"transformers generate: {torch.cuda.get_device_name()}, "
          f"batch {a.batch}, prompt {a.prompt}, generated {new}: {a.batch * new / best:.0f} tokens/s "
          f"({best:.2f} s)", flush=True)


if __name__ == "__main__":
    main()
