"""PyTorch anchors for bench_dmc_attention, run in the same device call: the bf16 GEMM ceiling
and SDPA flash causal attention fwd / bwd on the same shapes (median of CUDA-event timings after
warm-up). FLOPs counted as in bench_dmc_attention: causal forward 4*B*H*T^2*D/2, backward 2.5x."""
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def median_ms(fn, reps=20, warmup=3):
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
    reps = int(sys.argv[1]) if len(sys.argv) > 1 else 20
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
    for (B, H, Hkv, T, D) in [(4, 32, 32, 1024, 128), (4, 32, 32, 4096, 128),
                              (4, 32, 32, 8192, 128), (4, 32, 8, 4096, 128),
                              (4, 32, 32, 4096, 64)]:
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
        del q, k, v, g, out
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
