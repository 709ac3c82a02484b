"""Benchmarks: each section prints measured numbers (nothing here is a test).

    python bench.py rae          # SigLIP-2 vision tower images/s, ours vs transformers (fp32, CPU)
    python bench.py tokenizer    # Gemma tokenizer strings/s
    python bench.py dit          # DiT training step: time, FLOPs, achieved FLOP/s vs plain matmuls
    python bench.py data         # data loading images/s per format
    python bench.py vae          # FLUX VAE encode/decode images/s, ours vs diffusers
    python bench.py all

Reference libraries (transformers, diffusers) are imported inside the sections that compare against them.
"""
import argparse
import time

import torch


def timeit(fn, warmup=1, iters=3):
    """Median wall time of fn() in seconds after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


# ----------------------------------------------------------------------------- rae: SigLIP-2 encoder
def bench_rae(args):
    raise NotImplementedError("rae section")


# ----------------------------------------------------------------------------- tokenizer


def bench_tokenizer(args):
    raise NotImplementedError("tokenizer section")


# ----------------------------------------------------------------------------- dit: training step


def bench_dit(args):
    """One fp32 training step (forward + backward + AdamW) of DiT-S in text mode (Scale-RAE's per-token adaLN) on
    N = 256 tokens x C = 1152 channels, batch 8: step time, analytic FLOPs, achieved FLOP/s, and the FLOP/s of plain
    torch.matmul over exactly the matmul shapes the step runs (recorded by a dispatch mode), in the same process."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from dit import PRESETS, DiT, DiTConfig, flops, flow_loss, shift_alpha

    aten = torch.ops.aten
    cfg, B = DiTConfig(**{**PRESETS["DiT-S"], "cond": "text"}), 8
    torch.manual_seed(0)
    model = DiT(cfg)
    # fused: one kernel over all parameters; the default per-parameter loop costs more than a fifth of this step on CPU
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
    z = torch.randn(B, cfg.num_tokens, cfg.in_channels)
    text = torch.randn(B, cfg.text_len, cfg.text_dim)
    alpha = shift_alpha(cfg.num_tokens, cfg.in_channels)

    def step():
        loss, _, _ = flow_loss(model, z, text, alpha)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    class MatmulShapes(TorchDispatchMode):
        """Counts the (batch, M, K, N) of every matmul; CPU flash attention counts as its QK^T and PV products
        (2 of them forward, 4 backward: dV, dP, dQ, dK), as FLOP counters do."""

        def __init__(self):
            super().__init__()
            self.shapes = {}

        def add(self, shape, n=1):
            self.shapes[shape] = self.shapes.get(shape, 0) + n

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is aten.mm.default:
                self.add((1, *args[0].shape, args[1].shape[1]))
            elif func is aten.addmm.default:
                self.add((1, *args[1].shape, args[2].shape[1]))
            elif func is aten.bmm.default:
                self.add((*args[0].shape, args[1].shape[2]))
            elif func in (aten._scaled_dot_product_flash_attention_for_cpu.default,
                          aten._scaled_dot_product_flash_attention_for_cpu_backward.default):
                q = args[1] if func is aten._scaled_dot_product_flash_attention_for_cpu_backward.default else args[0]
                b, h, n, d = q.shape  # (B, H, N, hd)
                fwd = func is aten._scaled_dot_product_flash_attention_for_cpu.default
                self.add((b * h, n, d, n), 1 if fwd else 2)  # QK^T, (dP = dO V^T)
                self.add((b * h, n, n, d), 1 if fwd else 2)  # PV, (dV, dQ, dK share this size)
            return func(*args, **(kwargs or {}))

    step()  # warm-up (allocator, AdamW state)
    with MatmulShapes() as rec:
        step()
    operands = [(torch.randn(b, m, k).squeeze(0), torch.randn(b, k, n).squeeze(0), count)
                for (b, m, k, n), count in rec.shapes.items()]

    def matmuls():  # the step's matmuls, as plain contiguous fp32 torch.matmul calls
        for x, w, count in operands:
            for _ in range(count):
                torch.matmul(x, w)

    # interleaved, so that both see the same load on a shared machine
    step_s, mm_s = [sorted(ts)[1] for ts in zip(*[(timeit(step, 0, 1), timeit(matmuls, 0, 1)) for _ in range(3)])]
    step_flops = flops(cfg) * B  # analytic: 3 x forward
    mm_flops = sum(2 * b * m * k * n * count for (b, m, k, n), count in rec.shapes.items())
    achieved, roofline = step_flops / step_s, mm_flops / mm_s
    print(f"DiT-S text mode (D {cfg.hidden_size}, depth {cfg.depth}), N {cfg.num_tokens}, C {cfg.in_channels}, "
          f"T {cfg.text_len}, batch {B}, fp32, {torch.get_num_threads()} threads")
    print(f"train step (fwd + bwd + AdamW): {step_s:.3f} s")
    print(f"analytic FLOPs/step: {step_flops / 1e9:.1f} G (matmuls the step actually ran: {mm_flops / 1e9:.1f} G "
          f"in {sum(rec.shapes.values())} calls, {len(rec.shapes)} shapes)")
    print(f"achieved: {achieved / 1e9:.1f} GFLOP/s")
    print(f"plain torch.matmul, same shapes: {roofline / 1e9:.1f} GFLOP/s ({mm_s:.3f} s for the step's matmuls)")
    print(f"ratio: {achieved / roofline:.1%} of matmul FLOP/s (target >= 70%)")


# ----------------------------------------------------------------------------- data loading


def bench_data(args):
    raise NotImplementedError("data section")


# ----------------------------------------------------------------------------- vae: FLUX VAE


def bench_vae(args):
    raise NotImplementedError("vae section")


# -----------------------------------------------------------------------------
SECTIONS = {"rae": bench_rae, "tokenizer": bench_tokenizer, "dit": bench_dit, "data": bench_data, "vae": bench_vae}

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("section", choices=[*SECTIONS, "all"])
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for name, fn in SECTIONS.items():
        if args.section in (name, "all"):
            print(f"== {name}")
            fn(args)
