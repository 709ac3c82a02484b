"""Latents of a whole dataset: the latent cache that train_dit.py trains from, and the latent statistics.

- The cache (`train_dit.py --cache-latents DIR`): the dataset encoded once by the frozen towers into safetensors
  shards, then read back as a map-style dataset of latents and text states, so the training loop runs no frozen
  tower at all. Under torchrun every rank encodes its own slice.
- The statistics (`train_dit.py --stats FILE`): the exact mean and variance of the RAE latent over a dataset, per
  channel (C,) or per element (N, C), the optional standardisation of the RAE papers.

    python latents.py stats --data toy --out runs/toy_stats.safetensors                       # the toy encoder
    python latents.py stats --encoder ckpt/siglip2-so400m-patch14-224 --data /data/images --out stats.safetensors
"""
import argparse
import collections
import datetime
import json
import os
import sys

import numpy as np
import torch
import torch.distributed
from safetensors import safe_open
from torch.utils.data import DataLoader, Dataset, IterableDataset
from tqdm import tqdm

import ckpt
import data
import rae
import toy


# ----------------------------------------------------------------------------- latent cache: encode once, train from shards
# A folder of safetensors shards, shard_RRR_KKKKK.safetensors (rank RRR's K-th), each holding `count` samples:
# tensors "z" (n, N, C) and "text" (n, T, Dt) (or "label" (n,) for class conditioning) and the captions as JSON in
# the header's metadata; plus manifest.json, which lists them and says what they were encoded from. The manifest is
# written last, from a temp file with os.replace: a folder without one is an interrupted encode, never a cache.
# Why the text tower's output and not token ids: for so400m it is 64 x 1152 x 4 B = 288 KiB per caption next to
# the latent's 256 x 1152 x 4 B = 1152 KiB, +25% of disk; in return the training loop runs no frozen tower at all,
# where the text tower would cost 2 x 0.41B x 64 = 52 GFLOPs per sample and step, plus tokenizing in Python on the
# CPU (0.1-0.6 ms per caption). bfloat16 storage halves the disk and rounds each value by up to 2^-8 relative.
MANIFEST = "manifest.json"
CACHE_VERSION = 1
CACHE_SHARD = 1024  # samples per shard; a rank holds one shard in host memory while encoding (1.4 GiB at so400m fp32)


def encode_dataset(dataset, folder, encode, rank=0, world_size=1, batch_size=64, workers=0, dtype=torch.float32,
                   shard_size=CACHE_SHARD, progress=False):
    """Encode this rank's part of `dataset` into shards in `folder`. encode(batch) -> {name: (B, ...) tensor} runs the
    frozen towers on a collated batch; floating tensors are stored as `dtype`. Map-style datasets: rank r takes the
    r-th contiguous slice, so the shards, read in rank order, keep the dataset's order (and a cached run sees the
    same batches as an uncached one); TarShards: their own rank x worker split, in file order. Bad samples are
    skipped and counted. Returns {"shards": [{"file", "count"}], "bad": {reason: n}}: once every rank has
    returned, one process passes them all to write_manifest."""
    if isinstance(dataset, IterableDataset):
        dataset.buffer, dataset.epoch, sampler, total = 0, 0, None, None  # file order: the reader shuffles
    else:
        lo, hi = rank * len(dataset) // world_size, (rank + 1) * len(dataset) // world_size
        sampler, total = range(lo, hi), hi - lo
    loader = DataLoader(dataset, batch_size, sampler=sampler, num_workers=workers, collate_fn=data.collate)
    os.makedirs(folder, exist_ok=True)
    shards, bad, pending = [], data.BadSampleCounter(), []

    def write(part):  # one batch-like dict of n samples -> one shard file, under a temp name first
        name = f"shard_{rank:03d}_{len(shards):05d}.safetensors"
        path = os.path.join(folder, name)
        tensors = {k: v for k, v in part.items() if torch.is_tensor(v)}
        ckpt.save_safetensors(path, tensors, metadata={"captions": json.dumps(part["caption"])})  # atomic, 0644
        shards.append({"file": name, "count": len(part["caption"])})

    with tqdm(total=total, desc="encoding", unit="img", disable=None if progress else True, dynamic_ncols=True) as bar:
        for batch in loader:
            bad.update(batch.pop("bad"))
            if not batch:  # every sample of it was bad
                continue
            out = {k: v.to("cpu", dtype if v.is_floating_point() else v.dtype) for k, v in encode(batch).items()}
            pending.append({**out, "caption": batch["caption"]})
            while sum(len(p["caption"]) for p in pending) >= shard_size:
                part, rest = data.split_batches(pending, shard_size)
                write(part)
                pending = [rest] if rest["caption"] else []
            bar.update(len(batch["caption"]))
    if pending:
        write(data.split_batches(pending, sum(len(p["caption"]) for p in pending))[0])
    return {"shards": shards, "bad": bad.drain()}


def write_manifest(folder, fields, parts, classes=None):
    """After every rank's encode_dataset: folder/manifest.json = `fields` (what the latents were encoded from) +
    count + the shard list in rank order + bad-sample counts (+ class names), written atomically. Shard files that
    the list does not name (left by an interrupted encode on more ranks) are deleted."""
    shards = [s for part in parts for s in part["shards"]]
    bad = collections.Counter()
    for part in parts:
        bad.update(part["bad"])
    count = sum(s["count"] for s in shards)
    if count == 0:
        raise ValueError(f"{folder}: no usable sample to cache ({sum(bad.values())} bad: {dict(bad)})")
    keep = {s["file"] for s in shards}
    for f in os.listdir(folder):
        if f.startswith("shard_") and f.endswith((".safetensors", ".tmp")) and f not in keep:
            os.remove(os.path.join(folder, f))
    manifest = dict(version=CACHE_VERSION, **fields, count=count, shards=shards, bad=dict(bad))
    if classes:
        manifest["classes"] = list(classes)
    path = os.path.join(folder, MANIFEST)
    with open(path + ".tmp", "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(path + ".tmp", path)
    return manifest


def latent_cache(folder, fields, build, encode, rank=0, world_size=1, batch_size=64, workers=0, dtype=torch.float32):
    """`folder` as a LatentCache whose manifest must match `fields`. If the folder has no manifest, first build() the
    dataset and encode it: each rank its own slice into its own shards, then rank 0 writes the manifest when every
    rank is done. Under torchrun every rank calls this (it needs a folder all ranks share)."""
    if not os.path.exists(os.path.join(folder, MANIFEST)):
        if rank == 0:
            print(f"{folder}: no {MANIFEST}, encoding the dataset on {world_size} rank(s)", flush=True)
        dataset = build()
        parts = [encode_dataset(dataset, folder, encode, rank, world_size, batch_size, workers, dtype,
                                progress=rank == 0)]
        if world_size > 1:  # on gloo with a long timeout: ranks may finish their slices hours apart
            group = torch.distributed.new_group(backend="gloo", timeout=datetime.timedelta(days=2))
            parts = [parts[0]] + [None] * (world_size - 1)
            torch.distributed.all_gather_object(parts, parts[0], group=group)
        if rank == 0:
            write_manifest(folder, fields, parts, getattr(dataset, "classes", None))
        if world_size > 1:
            torch.distributed.barrier(group=group)
    cache = LatentCache(folder, fields)
    if rank == 0:
        print(f"{folder}: training from {len(cache)} cached samples in {len(cache.files)} shards "
              f"({fields.get('dtype')}; {sum(cache.manifest['bad'].values())} bad samples were skipped when encoding)",
              flush=True)
    return cache


class LatentCache(Dataset):
    """The shards of a folder written by encode_dataset + write_manifest, as a map-style dataset in encoding order:
    ds[i] = {"z": (N, C) float32, "text": (T, Dt) float32 (or "label": int), "caption": str}. It plugs into
    infinite_batches like any dataset (rank split, shuffling, resume position). `expect`: the manifest fields this
    run needs (latent kind, shapes, encoder, data spec, ...); a difference is a one-line ValueError naming the
    manifest and the field. No random flip: the latents are fixed."""

    def __init__(self, folder, expect=None):
        self.folder, path = folder, os.path.join(folder, MANIFEST)
        again = f" (delete {folder} to encode again, or pick another cache folder)"
        try:
            with open(path) as f:
                self.manifest = m = json.load(f)
            self.files, counts = [s["file"] for s in m["shards"]], [int(s["count"]) for s in m["shards"]]
            m["count"], m.setdefault("bad", {})
        except (OSError, ValueError, KeyError, TypeError) as e:  # unreadable, not JSON, fields missing or mistyped
            raise ValueError(f"{path}: not a readable cache manifest ({type(e).__name__}: {e}){again}") from None
        problems = [f"field {key!r} is {m.get(key)!r} in the manifest but {want!r} in this run"
                    for key, want in {"version": CACHE_VERSION, **(expect or {})}.items() if m.get(key) != want]
        ckpt.report(path, problems, again)
        if sum(counts) != m["count"]:
            raise ValueError(f"{path}: field 'count' is {m['count']} but its shard list holds {sum(counts)} samples")
        missing = [f for f in self.files if not os.path.isfile(os.path.join(folder, f))]
        if missing:
            raise ValueError(f"{os.path.join(folder, missing[0])}: no such file ({len(missing)} of the "
                             f"{len(self.files)} shards in {path} are missing)")
        self.starts = np.cumsum([0] + counts)  # global index of each shard's first sample
        if "classes" in m:
            self.classes = m["classes"]
        self.handles = {}

    def __getstate__(self):  # DataLoader workers open their own handles (safe_open objects do not pickle)
        return {**self.__dict__, "handles": {}}

    def __len__(self):
        return int(self.starts[-1])

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        if k not in self.handles:  # memory-mapped, opened once per process; a read copies just the rows it needs
            f = safe_open(os.path.join(self.folder, self.files[k]), "pt")
            self.handles[k] = f, json.loads(f.metadata()["captions"])
        f, captions = self.handles[k]
        j = i - int(self.starts[k])
        out = {"caption": captions[j]}
        for key in f.keys():
            v = f.get_slice(key)[j:j + 1][0]
            out[key] = int(v) if key == "label" else v.float()
        return out


# ----------------------------------------------------------------------------- the RAE a script's --encoder gives
def load_rae(encoder, device=None, stats=None, text=True):
    """--encoder -> (RAE, the image size it reads, the SigLIP-2 with its text tower, or None). A SigLIP-2 snapshot (or
    the toy one for None / "toy") encodes at its own resolution. A DINOv2 snapshot gives RAE's ImageNet latent:
    256-px images, resized to 224 inside the RAE (16 x 16 patches of 14 px), CLS and registers dropped ((256, 768)
    for DINOv2-B); it has no text tower. stats: a latent statistics file (ours or the official stat.pt)."""
    config = os.path.join(encoder or "", "config.json")
    if os.path.isfile(config) and ckpt.read_json(config, "a config").get("model_type", "").startswith("dinov2"):
        vision, siglip, size, input_size = rae.load_dinov2(encoder, device), None, 256, 224
    else:
        siglip = toy.load_encoder(encoder, text=text).to(device)
        vision, size, input_size = siglip.vision, siglip.vision.grid * siglip.vision.patch, None
    stats = rae.load_latent_stats(stats, vision.width) if stats else None
    return rae.RAE(vision, stats=stats, input_size=input_size).to(device), size, siglip


# ----------------------------------------------------------------------------- latent statistics over a dataset
def stats_main(argv=None):
    p = argparse.ArgumentParser(prog="latents.py stats", description="Mean and variance of the RAE latent over a "
                                "dataset, for train_dit.py --stats (one process; GPU when present).")
    p.add_argument("--encoder", help="SigLIP-2 or DINOv2 snapshot folder (default: the toy encoder)")
    p.add_argument("--data", required=True, help="'toy', an image folder, class folders, or .tar shards")
    p.add_argument("--out", required=True, help="the stats file to write (safetensors: mean, var)")
    p.add_argument("--per", choices=["channel", "element"], default="channel",
                   help="channel: (C,) over all tokens; element: (N, C), one per token position")
    p.add_argument("--max-samples", type=int, default=0, help="only the first N samples (toy, folders; 0: all)")
    p.add_argument("--batch", type=int, default=64, help="images per forward")
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers")
    a = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ae, size, _ = load_rae(a.encoder, device, text=False)  # fp32: the statistics of the real latent
    dataset = toy.dataset(a.data, size, limit=a.max_samples)
    loader = DataLoader(dataset, a.batch, num_workers=a.workers, collate_fn=data.collate)
    bad = data.BadSampleCounter()
    def images():  # (B, 3, H, W) batches; bad samples were dropped and counted by the reader
        for batch in tqdm(loader, desc="latent statistics", unit="batch"):
            bad.update(batch.pop("bad"))
            if batch:
                yield batch["img"].to(device)
    stats = rae.compute_latent_stats(ae, images(), per=a.per)
    rae.save_latent_stats(a.out, stats)
    print(f"wrote {a.out}: mean and var {tuple(stats['mean'].shape)}; {bad}")


if __name__ == "__main__":
    if sys.argv[1:2] != ["stats"]:
        sys.exit("usage: python latents.py stats --data SPEC --out FILE [--encoder DIR] [--per channel|element]")
    stats_main(sys.argv[2:])
