#!/usr/bin/env python3
"""Hugging Face interoperability check, both directions, on random weights in fp32:

  1. import: a random transformers LlamaForCausalLM (GQA, untied, random norm weights) saved with
     save_pretrained is read by the engine (hf_logits logits, the same import as
     dmc-train --init_from); its logits must equal transformers' on the same tokens.
  2. export: a random model written by the engine (hf_logits write-random, the writers dmc-export
     uses) is loaded by LlamaForCausalLM.from_pretrained; its logits must equal the engine's.

Needs torch and transformers (present on the GPU machine, not in CI). Exit status 1 on a mismatch.
  python3 tests/hf/check_hf_logits.py --bin build/tests/hf/hf_logits --work /tmp/hf_check
"""
import argparse
import os
import subprocess
import sys

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

TOLERANCE = 1e-4  # relative L2 error; both sides compute in fp32


def engine_logits(binary, model_dir, tokens, work, vocab):
    out = os.path.join(work, "logits.f32")
    subprocess.run([binary, "logits", model_dir, ",".join(map(str, tokens)), out], check=True)
    return np.fromfile(out, dtype=np.float32).reshape(len(tokens), vocab)


def hf_logits(model_dir_or_model, tokens):
    model = model_dir_or_model
    if isinstance(model, str):
        model = LlamaForCausalLM.from_pretrained(model, torch_dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float().numpy()


def rel_error(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--bin", required=True, help="path of the hf_logits binary")
    p.add_argument("--work", default="/tmp/hf_check")
    args = p.parse_args()
    os.makedirs(args.work, exist_ok=True)
    rng = np.random.default_rng(7)
    tokens = rng.integers(0, 259, size=37).tolist()
    rows = []

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=259, hidden_size=128, intermediate_size=320,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
                         tie_word_embeddings=False, attention_bias=False, mlp_bias=False)
    model = LlamaForCausalLM(config).float()
    with torch.no_grad():
        for name, p_ in model.named_parameters():
            if name.endswith("norm.weight"):
                p_.copy_(1.0 + 0.2 * torch.randn_like(p_))
    hf_dir = os.path.join(args.work, "from_transformers")
    model.save_pretrained(hf_dir, safe_serialization=True)
    ours = engine_logits(args.bin, hf_dir, tokens, args.work, 259)
    rows.append(("import (transformers -> dmc)", rel_error(ours, hf_logits(model, tokens))))

    our_dir = os.path.join(args.work, "from_dmc")
    subprocess.run([args.bin, "write-random", our_dir, "11"], check=True)
    ours = engine_logits(args.bin, our_dir, tokens, args.work, 259)
    rows.append(("export (dmc -> transformers)", rel_error(ours, hf_logits(our_dir, tokens))))

    import transformers
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, fp32, T={len(tokens)}")
    print("| direction | rel. L2 error of logits | pass (< %.0e) |" % TOLERANCE)
    print("| --- | --- | --- |")
    ok = True
    for name, err in rows:
        ok &= err < TOLERANCE
        print(f"| {name} | {err:.2e} | {'yes' if err < TOLERANCE else 'NO'} |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
