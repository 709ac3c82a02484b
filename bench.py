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
    """Images/s through a DataLoader at 224 px for each format, over the same few hundred ImageNet-sized JPEGs."""
    import io
    import os
    import tarfile
    import tempfile

    import numpy as np
    from PIL import Image
    from torch.utils.data import DataLoader

    import data

    n, size, batch = 384, 224, 32
    with tempfile.TemporaryDirectory() as root:
        # Photo-like 500x375 JPEGs (ImageNet's typical size): smooth colour fields plus grain, ~50 KB at quality 90.
        rng = np.random.default_rng(0)
        jpegs = []
        for _ in range(n):
            field = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((500, 375), Image.BICUBIC)
            pixels = np.asarray(field, dtype=np.float32) + rng.normal(0, 12, (375, 500, 1))
            buf = io.BytesIO()
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
            jpegs.append(buf.getvalue())
        os.makedirs(f"{root}/caps")
        for i, jpg in enumerate(jpegs):
            os.makedirs(f"{root}/classes/class_{i % 8}", exist_ok=True)
            for path in (f"{root}/caps/{i:04d}.jpg", f"{root}/classes/class_{i % 8}/{i:04d}.jpg"):
                with open(path, "wb") as f:
                    f.write(jpg)
            with open(f"{root}/caps/{i:04d}.txt", "w") as f:
                f.write(f"a photo number {i}")
        os.makedirs(f"{root}/shards")
        for s in range(8):
            with tarfile.open(f"{root}/shards/shard-{s}.tar", "w") as tar:
                for i in range(s, n, 8):
                    for name, payload in ((f"{i:04d}.jpg", jpegs[i]), (f"{i:04d}.txt", b"a photo number %d" % i)):
                        info = tarfile.TarInfo(name)
                        info.size = len(payload)
                        tar.addfile(info, io.BytesIO(payload))

        datasets = {"toy world": data.ToyWorld(size, length=n), "image folder + .txt": f"{root}/caps",
                    "class folders": f"{root}/classes", "tar shards": f"{root}/shards/shard-{{0..7}}.tar"}
        print(f"{n} images -> {size} px, batch {batch}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
        print(f"{'format':<22}{'workers':>8}{'images/s':>10}")
        for name, ds in datasets.items():
            ds = data.build_dataset(ds, size) if isinstance(ds, str) else ds
            for workers in (0, 2):
                loader = DataLoader(ds, batch_size=batch, num_workers=workers, collate_fn=data.collate)
                seconds = timeit(lambda: sum(len(b.get("caption", [])) for b in loader), warmup=1, iters=3)
                print(f"{name:<22}{workers:>8}{n / seconds:>10.0f}")


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
