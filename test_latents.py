"""Tests for latents.py: the cache's shards round-trip every sample and check their fields, a corrupt manifest is a
one-line error naming it, and `latents.py stats` writes the exact latent statistics that rae.load_latent_stats and
train_dit.py --stats read. (Training from the cache: test_train.py.) CPU, no network: python -m pytest -q test_latents.py"""
import json
import os
import re

import pytest
import torch

import latents
import rae
import toy
from conftest import one_line_naming, run


def encode(batch):  # a stand-in for the frozen towers: (B, 3, 28, 28) -> z (B, 4, 3), "text" (B, 2, 5)
    z = torch.nn.functional.avg_pool2d(batch["img"], 14).flatten(2).transpose(1, 2)
    return dict(z=z, text=z[:, :2, :1].expand(-1, -1, 5) + 1)


CORRUPT = {
    "truncated": lambda text, m: text[: len(text) // 2],  # a write cut off (disk full, a copy interrupted)
    "empty": lambda text, m: "",
    "not an object": lambda text, m: "[]",
    "no shards": lambda text, m: json.dumps({k: v for k, v in m.items() if k != "shards"}),
    "no count": lambda text, m: json.dumps({k: v for k, v in m.items() if k != "count"}),
    "shard without count": lambda text, m: json.dumps(dict(m, shards=[{"file": s["file"]} for s in m["shards"]])),
    "shards not a list": lambda text, m: json.dumps(dict(m, shards=5)),
}


@pytest.mark.parametrize("corrupt", list(CORRUPT))
def test_corrupt_manifest_is_one_line_naming_it(tmp_path, corrupt):
    folder = str(tmp_path / "cache")
    world = toy.ToyWorld(size=28, length=5)
    fields = dict(latent="toy", N=4, C=3, dtype="torch.float32")
    latents.write_manifest(folder, fields, [latents.encode_dataset(world, folder, encode, batch_size=3)])
    path = os.path.join(folder, latents.MANIFEST)
    assert len(latents.LatentCache(folder, fields)) == 5  # the intact cache reads
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(CORRUPT[corrupt](text, json.loads(text)))
    for expect in (fields, None):
        with pytest.raises(ValueError) as e:
            latents.LatentCache(folder, expect)
        one_line_naming(e, path)
        assert str(e.value).startswith(path)
    built = []  # a corrupt manifest is reported, not silently taken for "no cache" and encoded over
    with pytest.raises(ValueError) as e:
        latents.latent_cache(folder, fields, lambda: built.append(1) or world, encode)
    one_line_naming(e, path)
    assert built == []


@pytest.fixture(scope="module")
def toy_images():
    """The 16 toy images `latents.py stats --data toy --max-samples 16` reads, in its batches of 8."""
    world = toy.ToyWorld(112)
    img = torch.stack([world[i]["img"] for i in range(16)])
    return [img[:8], img[8:]]


@pytest.mark.parametrize("per,shape", [("channel", (128,)), ("element", (64, 128))])
def test_stats_command_writes_exact_latent_stats(tmp_path, toy_encoder, toy_images, per, shape):
    out = str(tmp_path / "stats.safetensors")
    r = run("latents.py", "stats", "--data", "toy", "--max-samples", "16", "--batch", "8", "--workers", "0",
            "--out", out, *(["--per", per] if per != "channel" else []))
    assert f"wrote {out}" in r.stdout
    stats = rae.load_latent_stats(out, 128, 64)  # the check train_dit.py --stats runs
    assert rae.load_latent_stats(out, 128).keys() == {"mean", "var"}
    want = rae.compute_latent_stats(rae.RAE(toy_encoder.vision), toy_images, per=per)
    for key in ("mean", "var"):
        assert stats[key].shape == shape and stats[key].dtype == torch.float32
        assert torch.allclose(stats[key], want[key], rtol=0, atol=1e-5), (key, (stats[key] - want[key]).abs().max())
    assert stats["var"].min() > 0  # 16 images: every channel varies


def test_latent_cache_shards_round_trip(tmp_path):
    """latents.encode_dataset on 2 ranks with 4-sample shards, write_manifest, LatentCache: every sample back in dataset
    order (exact in float32, bfloat16-rounded in bfloat16), batches through infinite_batches, and each way a cache
    can be wrong (fields, count, a missing shard) is a one-line error naming the manifest."""
    import data
    import latents
    import toy
    world = toy.ToyWorld(size=28, length=11)

    def encode(batch):  # a stand-in for the frozen towers: (B, 3, 28, 28) -> z (B, 4, 3), "text" (B, 2, 5)
        z = torch.nn.functional.avg_pool2d(batch["img"], 14).flatten(2).transpose(1, 2)
        return dict(z=z, text=z[:, :2, :1].expand(-1, -1, 5) + 1)

    for dtype in (torch.float32, torch.bfloat16):
        folder = str(tmp_path / str(dtype))
        parts = [latents.encode_dataset(world, folder, encode, rank, 2, batch_size=3, dtype=dtype, shard_size=4)
                 for rank in range(2)]
        assert [[s["count"] for s in p["shards"]] for p in parts] == [[4, 1], [4, 2]]  # slices [0, 5) and [5, 11)
        open(os.path.join(folder, "shard_002_00000.safetensors"), "w").close()  # left by an interrupted encode
        fields = dict(latent="toy", N=4, C=3, dtype=str(dtype))
        latents.write_manifest(folder, fields, parts)
        assert not os.path.exists(os.path.join(folder, "shard_002_00000.safetensors"))
        ds = latents.LatentCache(folder, fields)
        want = encode(data.collate([world[i] for i in range(11)]))
        assert len(ds) == 11 and [ds[i]["caption"] for i in range(11)] == [world[i]["caption"] for i in range(11)]
        for key in ("z", "text"):
            got = torch.stack([ds[i][key] for i in range(11)])
            assert got.dtype == torch.float32 and torch.equal(got, want[key].to(dtype).float())
        _, _, batch = next(data.infinite_batches(ds, 4, rank=1, world_size=2))
        assert batch["z"].shape == (4, 4, 3) and batch["text"].shape == (4, 2, 5) and len(batch["caption"]) == 4

    manifest = os.path.join(folder, "manifest.json")
    with pytest.raises(ValueError, match="^" + re.escape(f"{manifest}: field 'N' is 4 in the manifest but 256 in ")):
        latents.LatentCache(folder, dict(fields, N=256))
    m = json.load(open(manifest))
    json.dump(dict(m, count=12), open(manifest, "w"))
    with pytest.raises(ValueError, match="^" + re.escape(f"{manifest}: field 'count' is 12 but its shard list holds 11")):
        latents.LatentCache(folder)
    json.dump(m, open(manifest, "w"))
    os.remove(os.path.join(folder, "shard_001_00001.safetensors"))
    with pytest.raises(ValueError, match="shard_001_00001.safetensors: no such file"):
        latents.LatentCache(folder)
