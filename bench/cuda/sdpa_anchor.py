"""PyTorch anchors for bench_dmc_attention, run in the same device call: the bf16 GEMM ceiling,
SDPA flash causal attention fwd / bwd on the same shapes, and (T <= 4096, no GQA) SDPA with a dense
additive DMC-style bias, the straightforward PyTorch route (median of CUDA-event timings after
warm-up, each from a second of idle). FLOPs counted as in bench_dmc_attention: causal forward
4*B*H*T^2*D/2, backward 2.5x."""
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def median_ms(fn, reps=20, warmup=3):
    # from a GPU at rest, as bench_dmc_attention times (its rest(): the power cap's clocks)
    time.sleep(1.0)
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def main():
    reps = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 20
    dense = "--no-dense" not in sys.argv
    dense_rows = []
    default_rows = []
    dev = "cuda"
    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    n = 8192
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    ms = median_ms(lambda: a @ b, reps)
    print(f"GEMM {n}^3 bf16: {2 * n**3 / ms * 1e-9:.1f} TFLOP/s ({ms:.3f} ms)")
    del a, b
    print(f"{'SDPA flash causal (B H/Hkv T D)':<34} {'fwd ms':>9} {'bwd ms':>9} {'f+b ms':>9} "
          f"{'fwd TF/s':>9} {'f+b TF/s':>9}")
    for (B, H, Hkv, T, D) in [(4, 32, 32, 1024, 128), (4, 16, 16, 2048, 128),
                              (4, 32, 32, 4096, 128), (4, 32, 32, 8192, 128),
                              (4, 32, 8, 4096, 128), (4, 32, 32, 4096, 64)]:
        q = torch.randn(B, H, T, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(B, Hkv, T, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(B, Hkv, T, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn(B, H, T, D, device=dev, dtype=torch.bfloat16)
        gqa = H != Hkv
        try:
          with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            def fwd():
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
            out = fwd()
            tf = median_ms(fwd, reps)

            def fb():
                o = fwd()
                o.backward(g)
            tfb = median_ms(fb, reps)
        except RuntimeError as e:
            print(f"B{B} H{H}/{Hkv} T{T} D{D}: SDPA flash unavailable: {str(e)[:120]}")
            continue
        flops_f = 4.0 * B * H * T * T * D / 2
        label = f"B{B} H{H}/{Hkv} T{T} D{D}"
        print(f"{label:<34} {tf:9.3f} {tfb - tf:9.3f} {tfb:9.3f} {flops_f / tf * 1e-9:9.1f} "
              f"{3.5 * flops_f / tfb * 1e-9:9.1f}", flush=True)
        # PyTorch's default SDPA choice on this GPU (cuDNN's Hopper kernels where available)
        def fb_default():
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
            o.backward(g)
        try:
            tdef = median_ms(fb_default, reps)
            default_rows.append(f"{label:<34} {tdef:9.3f} {3.5 * flops_f / tdef * 1e-9:9.1f}")
        except RuntimeError as e:
            default_rows.append(f"{label:<34} failed: {str(e)[:100]}")
        try:  # cuDNN attention forced, to name the default's choice
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                tcu = median_ms(fb_default, reps)
            default_rows[-1] += f"   cudnn forced: {tcu:9.3f}"
        except RuntimeError as e:
            default_rows[-1] += f"   cudnn forced: unavailable ({str(e)[:60]})"
        if dense and T <= 4096 and H == Hkv:
            # the straightforward PyTorch route: a dense additive bias per (head, query, key) built
            # from a per-key vector (with its gradient), SDPA picks a backend that takes a mask
            bias_k = torch.randn(B, H, 1, T, device=dev, dtype=torch.bfloat16, requires_grad=True)
            causal = torch.full((T, T), float("-inf"), device=dev, dtype=torch.bfloat16).triu(1)

            def fb_dense():
                m = bias_k + causal
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
                o.backward(g)
            try:
                td = median_ms(fb_dense, max(3, reps // 4))
                dense_rows.append(f"{label:<34} {td:9.3f} {3.5 * flops_f / td * 1e-9:9.1f}")
            except RuntimeError as e:
                dense_rows.append(f"{label:<34} failed: {str(e)[:100]}")
            del bias_k, causal
        del q, k, v, g, out
        torch.cuda.empty_cache()
    print(f"{'SDPA default backend causal':<34} {'f+b ms':>9} {'f+b TF/s':>9}")
    for r in default_rows:
        print(r, flush=True)
    if dense_rows:
        print(f"{'SDPA dense additive mask (B H/Hkv T D)':<34} {'f+b ms':>9} {'f+b TF/s':>9}")
        for r in dense_rows:
            print(r, flush=True)


if __name__ == "__main__":
    main()
