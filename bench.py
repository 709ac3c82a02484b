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
    raise NotImplementedError("dit section")


# ----------------------------------------------------------------------------- data loading


def bench_data(args):
    raise NotImplementedError("data section")


# ----------------------------------------------------------------------------- vae: FLUX VAE


def bench_vae(args):
    """FLUX.1 VAE at full width (83.8M params, random weights), fp32, 256x256, batch 1: ours vs diffusers'
    AutoencoderKL on the same weights (saved by diffusers, loaded by our load_flux_vae)."""
    import tempfile

    from diffusers import AutoencoderKL

    from vae import load_flux_vae

    torch.manual_seed(0)
    ref = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
                        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                        norm_num_groups=32, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                        use_post_quant_conv=False, mid_block_add_attention=True).eval()
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp)
        ours = load_flux_vae(tmp)
    B, S = 1, 256
    img = torch.rand(B, 3, S, S) * 2 - 1  # (B, 3, H, W) in [-1, 1]
    z = torch.randn(B, 16, S // 8, S // 8)
    runs = {  # the FLUX pipelines' scale and shift around diffusers' encode/decode, as our encode/decode do inside
        "ours": (lambda: ours.encode(img), lambda: ours.decode(z)),
        "diffusers": (lambda: 0.3611 * (ref.encode(img).latent_dist.mode() - 0.1159),
                      lambda: ref.decode(z / 0.3611 + 0.1159).sample),
    }
    with torch.no_grad():
        # Rounds alternate ours and diffusers, so load from other processes on a shared machine hits both alike.
        seconds = {name: ([], []) for name in runs}
        for _ in range(4):  # the first round is the warmup
            for name, fns in runs.items():
                for fn, times in zip(fns, seconds[name]):
                    times.append(timeit(fn, warmup=0, iters=1))
        print(f"FLUX.1 VAE, fp32, {S}x{S}, batch {B}, {torch.get_num_threads()} threads; "
              f"images/s, median of 3 alternating rounds after 1 warmup")
        print(f"{'':10} {'encode':>8} {'decode':>8}")
        for name, (enc, dec) in seconds.items():
            print(f"{name:10} {B / sorted(enc[1:])[1]:8.3f} {B / sorted(dec[1:])[1]:8.3f}")
        diff_z = (runs["ours"][0]() - runs["diffusers"][0]()).abs().max()
        diff_img = (runs["ours"][1]() - runs["diffusers"][1]()).abs().max()
    print(f"max |ours - diffusers|: z {diff_z:.1e}, img {diff_img:.1e}")


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
