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
