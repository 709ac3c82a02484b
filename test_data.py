"""Tests for data.py: preprocessing, every bad-file case, the readers (images and captions, class folders, tar
shards), the tar shard split over ranks x workers, infinite_batches and save_image_grid. (The toy world, its scorer
and the toy encoder: test_toy.py.) CPU, no network: python -m pytest -q test_data.py"""
import io
import json
import os
import struct
import tarfile
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import data
import toy


def encode(im, fmt, **kw):
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def photo(w=96, h=64):
    """An RGB test image with no symmetry: red left half, blue right half, a green square top-left."""
    im = Image.new("RGB", (w, h), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, w // 2, h))
    im.paste((0, 255, 0), (0, 0, w // 8, h // 8))
    return im


@pytest.fixture(autouse=True)
def fresh_counter():
    data.BAD.drain()
    data.BAD.logged.clear()
    yield


def read_one(tmp_path, image_bytes, caption=b"a photo", name="x.jpg", size=32):
    """Write one image (+ sidecar caption unless None) and read it through ImageCaptionFolder."""
    (tmp_path / name).write_bytes(image_bytes)
    if caption is not None:
        (tmp_path / name).with_suffix(".txt").write_bytes(caption)
    sample = data.ImageCaptionFolder(str(tmp_path), size=size)[0]
    return sample, data.BAD.drain()


# ----------------------------------------------------------------------------- flip and left/right
def test_swap_left_right():
    assert data.swap_left_right("a red circle on the left and a blue square on the right") == \
        "a red circle on the right and a blue square on the left"
    assert data.swap_left_right("Left of the LEFT sign, bright lefty") == "Right of the RIGHT sign, bright lefty"


def test_reader_flip_mirrors_image_and_caption(tmp_path):
    (tmp_path / "x.png").write_bytes(encode(photo(64, 64), "PNG"))
    (tmp_path / "x.txt").write_text("a red block on the left")
    ds = data.ImageCaptionFolder(str(tmp_path), size=32, flip=True)
    torch.manual_seed(0)
    seen = set()
    for _ in range(20):
        s = ds[0]
        mirrored = s["img"][0, 16, 2] < 0  # red channel on the left is low once mirrored
        assert mirrored == ("right" in s["caption"])
        seen.add(bool(mirrored))
    assert seen == {True, False}
    assert data.ImageCaptionFolder(str(tmp_path), size=32)[0]["caption"] == "a red block on the left"


# ----------------------------------------------------------------------------- preprocessing
def test_shorter_side_resize_and_center_crop():
    im = Image.new("RGB", (300, 100), (255, 0, 0))
    im.paste((0, 255, 0), (100, 0, 200, 100))  # only the middle third survives a center crop
    img = data.load_image(encode(im, "PNG"), 56)
    assert img.shape == (3, 56, 56)
    assert torch.allclose(img[:, :, 2:-2], torch.tensor([-1.0, 1, -1])[:, None, None])
    tall = data.load_image(encode(im.rotate(90, expand=True), "PNG"), 56)
    assert torch.allclose(tall[:, 2:-2], torch.tensor([-1.0, 1, -1])[:, None, None])


def test_exif_orientation_is_applied():
    im = Image.new("RGB", (80, 40), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 40, 40))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the left edge becomes the top
    img = data.load_image(encode(im, "JPEG", exif=exif, quality=95), 40)
    assert img[0, 2, 20] > 0.8 and img[0, 37, 20] < -0.8


# ----------------------------------------------------------------------------- bad files: one test per case
def test_zero_byte(tmp_path):
    assert read_one(tmp_path, b"") == (None, {"zero-byte": 1})


def test_truncated_jpeg(tmp_path):
    jpg = encode(photo(), "JPEG")
    assert read_one(tmp_path, jpg[: len(jpg) // 2]) == (None, {"truncated": 1})


def test_truncated_png(tmp_path):
    png = encode(photo(), "PNG")
    assert read_one(tmp_path, png[: len(png) // 2], name="x.png") == (None, {"truncated": 1})


def test_corrupt_bytes(tmp_path):
    assert read_one(tmp_path, np.random.default_rng(0).bytes(5000)) == (None, {"not an image": 1})


def test_corrupt_png_data(tmp_path):
    png = bytearray(encode(Image.effect_noise((64, 64), 50).convert("RGB"), "PNG"))
    start = png.index(b"IDAT") + 8
    png[start:start + 200] = bytes(200)  # valid header, broken compressed stream
    assert read_one(tmp_path, bytes(png), name="x.png") == (None, {"corrupt": 1})


def test_text_file_named_jpg(tmp_path):
    assert read_one(tmp_path, b"<html>404 not found</html>\n" * 10) == (None, {"not an image": 1})


def test_cmyk_jpeg(tmp_path):
    sample, bad = read_one(tmp_path, encode(Image.new("CMYK", (64, 64), (0, 255, 255, 0)), "JPEG"))
    assert bad == {} and torch.allclose(sample["img"][:, 10, 10], torch.tensor([1.0, -1, -1]), atol=0.05)


def test_16bit_png_is_rescaled_not_clipped(tmp_path):
    a = np.zeros((64, 64), np.uint16)
    a[:, 32:] = 32768  # half of the 16-bit range: mid grey, which PIL's convert("RGB") would clip to white
    sample, bad = read_one(tmp_path, encode(Image.fromarray(a), "PNG"), name="x.png")
    assert bad == {}
    assert torch.allclose(sample["img"][:, 5, 28], torch.zeros(3), atol=0.02)
    assert torch.allclose(sample["img"][:, 5, 2], -torch.ones(3))


def test_palette_png_with_transparency(tmp_path):
    im = Image.new("P", (64, 64), 0)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    im.paste(1, (32, 0, 64, 64))
    sample, bad = read_one(tmp_path, encode(im, "PNG", transparency=0), name="x.png")
    assert bad == {}
    assert torch.equal(sample["img"][:, 5, 2], torch.ones(3))  # transparent black -> white
    assert torch.equal(sample["img"][:, 5, 29], torch.tensor([1.0, -1, -1]))


def test_rgba_composited_on_white(tmp_path):
    im = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    im.paste((255, 0, 0, 128), (32, 0, 64, 64))
    sample, bad = read_one(tmp_path, encode(im, "PNG"), name="x.png")
    assert bad == {}
    assert torch.equal(sample["img"][:, 5, 2], torch.ones(3))
    assert torch.allclose(sample["img"][:, 5, 29], torch.tensor([1.0, 0, 0]), atol=0.02)  # half red over white


@pytest.mark.parametrize("mode", ["L", "LA", "1"])
def test_grayscale_and_1bit(tmp_path, mode):
    im = Image.new(mode, (64, 64), 0 if mode != "LA" else (0, 0))
    im.paste(255 if mode != "LA" else (255, 255), (32, 0, 64, 64))
    sample, bad = read_one(tmp_path, encode(im, "PNG"), name="x.png")
    assert bad == {} and sample["img"].shape == (3, 32, 32)
    expect_left = 1.0 if mode == "LA" else -1.0  # LA: fully transparent black -> white
    assert torch.equal(sample["img"][:, 5, 2], torch.full((3,), expect_left))
    assert torch.equal(sample["img"][:, 5, 29], torch.ones(3))


def test_1x1_image_too_small(tmp_path):
    assert read_one(tmp_path, encode(Image.new("RGB", (1, 1)), "PNG"), name="x.png") == (None, {"too small": 1})


def png_header_only(width, height):
    """A PNG whose header claims width x height (and no pixel data): what a decompression bomb looks like."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + \
        chunk(b"IEND", b"")


def test_decompression_bomb_header(tmp_path):
    sample, bad = read_one(tmp_path, png_header_only(100_000, 100_000), name="x.png")
    assert (sample, bad) == (None, {"decompression bomb": 1})
    with pytest.raises(data.BadSample, match="decompression bomb"):  # under PIL's own limit, over ours
        data.load_image(png_header_only(10_000, 8_000), 32)


def test_decompression_bomb_lowered_caps(monkeypatch):
    png = encode(Image.new("RGB", (100, 100)), "PNG")
    assert data.load_image(png, 32).shape == (3, 32, 32)
    with pytest.raises(data.BadSample, match="decompression bomb"):
        data.load_image(png, 32, max_pixels=1000)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)  # PIL warns above this and raises above twice this
    for side in (80, 100):
        with pytest.raises(data.BadSample, match="decompression bomb"):
            data.load_image(encode(Image.new("RGB", (side, side)), "PNG"), 32)


def test_caption_missing(tmp_path):
    assert read_one(tmp_path, encode(photo(), "JPEG"), caption=None) == (None, {"caption missing": 1})


def test_caption_empty(tmp_path):
    assert read_one(tmp_path, encode(photo(), "JPEG"), caption=b" \n\t ") == (None, {"caption empty": 1})


def test_caption_not_utf8_is_kept_and_counted(tmp_path):
    sample, bad = read_one(tmp_path, encode(photo(), "JPEG"), caption="a caf\xe9\nau lait".encode("latin-1"))
    assert sample["caption"] == "a caf\ufffd au lait" and bad == {"caption not utf-8 (kept)": 1}


def test_caption_10k_chars_is_kept_trimmed(tmp_path):
    sample, bad = read_one(tmp_path, encode(photo(), "JPEG"), caption=b"word " * 2000)
    assert sample["caption"] == ("word " * 2000)[: data.MAX_CAPTION_CHARS]
    assert bad == {"caption trimmed (kept)": 1}


def test_bad_samples_are_logged_once_per_path(tmp_path, capsys):
    (tmp_path / "x.jpg").write_bytes(b"")
    (tmp_path / "x.txt").write_text("a cat")
    ds = data.ImageCaptionFolder(str(tmp_path), size=32)
    assert ds[0] is None and ds[0] is None
    assert capsys.readouterr().err.count("zero-byte") == 1
    assert data.BAD.drain() == {"zero-byte": 2}
    data.BAD.logged.clear()
    assert data.ImageCaptionFolder(str(tmp_path), size=32, quiet=True)[0] is None  # rank > 0: count, never print
    assert capsys.readouterr().err == "" and data.BAD.drain() == {"zero-byte": 1}
    for i in range(30):
        (tmp_path / f"{i}.jpg").write_bytes(b"")
        (tmp_path / f"{i}.txt").write_text("a cat")
    ds = data.ImageCaptionFolder(str(tmp_path), size=32)
    assert all(ds[i] is None for i in range(len(ds)))
    err = capsys.readouterr().err.splitlines()
    assert len(err) == data.BadSampleCounter.max_logged and "only counted" in err[-1]  # no flood
    assert data.BAD.drain() == {"zero-byte": 31}


def test_collate_counts_reach_the_main_process_from_workers(tmp_path):
    good = encode(photo(), "JPEG")
    files = {f"good{i}.jpg": (good, b"a cat") for i in range(6)}
    files.update({"zero.jpg": (b"", b"x"), "text.jpg": (b"hello", b"x"), "cut.jpg": (good[:300], b"x"),
                  "nocap.jpg": (good, None)})
    for name, (img, cap) in files.items():
        (tmp_path / name).write_bytes(img)
        if cap is not None:
            (tmp_path / name).with_suffix(".txt").write_bytes(cap)
    ds = data.ImageCaptionFolder(str(tmp_path), size=32, quiet=True)
    total, n = data.BadSampleCounter(), 0
    for batch in DataLoader(ds, batch_size=3, num_workers=2, collate_fn=data.collate):
        total.update(batch["bad"])
        n += len(batch.get("caption", []))
        assert "img" not in batch or batch["img"].shape == (len(batch["caption"]), 3, 32, 32)
    assert n == 6
    assert dict(total.counts) == {"zero-byte": 1, "not an image": 1, "truncated": 1, "caption missing": 1}
    assert total.total() == 4 and str(total).startswith("bad samples: 4 (")


# ----------------------------------------------------------------------------- readers
def test_captions_jsonl(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(encode(photo(), "PNG"))
    (tmp_path / "b.png").write_bytes(encode(photo(), "PNG"))
    lines = [json.dumps({"file": "img/a.png", "caption": "first"}), "{not json", json.dumps({"file": "b.png"}),
             json.dumps({"file": "gone.png", "caption": "x"}), ""]
    (tmp_path / "captions.jsonl").write_text("\n".join(lines))
    ds = data.ImageCaptionFolder(str(tmp_path), size=32)
    assert len(ds) == 3 and ds[0]["caption"] == "first" and ds[1] is None and ds[2] is None
    assert data.BAD.drain() == {"caption missing": 1, "unreadable file": 1}


def test_class_folders(tmp_path):
    for folder in ("n01443537", "apple_tree", ".hidden"):
        (tmp_path / folder).mkdir()
        for i in range(2):
            (tmp_path / folder / f"{i}.jpg").write_bytes(encode(photo(), "JPEG"))
    (tmp_path / "apple_tree" / "._0.jpg").write_bytes(b"macOS metadata")
    (tmp_path / "class_names.json").write_text(json.dumps({"1": ["n01443537", "goldfish, Carassius auratus"]}))
    ds = data.build_dataset(str(tmp_path), size=32)
    assert isinstance(ds, data.ClassFolders) and len(ds) == 4
    batch = data.collate([ds[i] for i in range(4)])
    assert batch["label"].tolist() == [0, 0, 1, 1]  # sorted folder order: "apple_tree" < "n01443537"
    assert batch["caption"] == ["a photo of an apple tree"] * 2 + ["a photo of a goldfish"] * 2
    assert batch["img"].shape == (4, 3, 32, 32) and batch["bad"] == {}


def test_build_dataset_picks_the_reader(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for spec in ("toy", "toy:5"):  # the toy world is toy.dataset's: here 'toy' is just a (missing) shard name
        with pytest.raises(ValueError, match=f"^{spec}: no such file"):
            data.build_dataset(spec, 32)
    (tmp_path / "caps" / "sub").mkdir(parents=True)
    (tmp_path / "caps" / "sub" / "a.jpg").write_bytes(encode(photo(), "JPEG"))
    (tmp_path / "caps" / "sub" / "a.txt").write_text("a thing")
    assert isinstance(data.build_dataset(str(tmp_path / "caps"), 32), data.ImageCaptionFolder)
    (tmp_path / "caps" / "sub" / "b.jpg").write_bytes(encode(photo(), "JPEG"))
    (tmp_path / "caps" / "sub" / "b.txt").write_text("another thing")
    caps = str(tmp_path / "caps")
    full, limited = data.build_dataset(caps, 32), data.build_dataset(caps, 32, limit=1)
    assert len(full) == 2 and len(limited) == 1 and limited[0]["caption"] == full[0]["caption"]  # the first n
    write_shards(tmp_path, 3, 2)
    for spec in (str(tmp_path / "shard-*.tar"), str(tmp_path / "shard-{00..02}.tar"),
                 f"{tmp_path}/shard-00.tar,{tmp_path}/shard-01.tar,{tmp_path}/shard-02.tar"):
        ds = data.build_dataset(spec, 32)
        assert isinstance(ds, data.TarShards) and len(ds.shards) == 3
        assert sorted(s["caption"] for s in ds) == sorted(f"sample {s} {i}" for s in range(3) for i in range(2))
    with pytest.raises(ValueError, match="no tar shards"):
        data.build_dataset(str(tmp_path / "nothing-*.tar"), 32)
    with pytest.raises(ValueError, match="shard-00.tar.*a sample limit works on toy and folder datasets"):
        data.build_dataset(f"{tmp_path}/shard-00.tar", 32, limit=2)  # a stream has no "first n"


# ----------------------------------------------------------------------------- tar shards
def add_member(tar, name, payload):
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def write_shards(root, n_shards, per_shard):
    jpg = encode(photo(40, 40), "JPEG")
    for s in range(n_shards):
        with tarfile.open(root / f"shard-{s:02d}.tar", "w") as tar:
            for i in range(per_shard):
                add_member(tar, f"{s:02d}/{i:04d}.jpg", jpg)
                add_member(tar, f"{s:02d}/{i:04d}.txt", f"sample {s} {i}".encode())
    return sorted(f"sample {s} {i}" for s in range(n_shards) for i in range(per_shard))


@pytest.mark.parametrize("n_shards", [5, 3])  # 5 >= 4 readers: split by shard; 3 < 4: split by sample index
def test_tar_two_ranks_two_workers_see_each_sample_once_per_epoch(tmp_path, n_shards):
    expected = write_shards(tmp_path, n_shards, 7)
    orders = []
    for epoch in range(2):
        seen = []
        for rank in range(2):
            ds = data.TarShards(str(tmp_path / "*.tar"), size=32, shuffle_buffer=4, seed=1, rank=rank, world_size=2)
            ds.set_epoch(epoch)
            loader = DataLoader(ds, batch_size=3, num_workers=2, collate_fn=data.collate)
            seen += [c for batch in loader for c in batch["caption"]]
        assert sorted(seen) == expected
        orders.append(seen)
    assert orders[0] != orders[1]  # a new shuffle every epoch


def test_tar_bad_members_and_truncated_shard_are_counted(tmp_path):
    jpg = encode(photo(40, 40), "JPEG")
    with tarfile.open(tmp_path / "a.tar", "w") as tar:
        add_member(tar, "ok.jpg", jpg)
        add_member(tar, "ok.txt", b"plain caption")
        add_member(tar, "dir.v2/js.png", encode(photo(40, 40), "PNG"))  # dots in folders are not part of the key
        add_member(tar, "dir.v2/js.json", json.dumps({"caption": "json caption", "url": "x"}).encode())
        add_member(tar, "noimage.txt", b"lonely caption")
        add_member(tar, "nocap.jpg", jpg)
        add_member(tar, "badjson.jpg", jpg)
        add_member(tar, "badjson.json", b"{oops")
        add_member(tar, "broken.jpg", b"not a jpeg")
        add_member(tar, "broken.txt", b"x")
    with tarfile.open(tmp_path / "b.tar", "w") as tar:
        for i in range(4):
            add_member(tar, f"{i}.jpg", jpg)
            add_member(tar, f"{i}.txt", b"from b %d" % i)
    with tarfile.open(tmp_path / "b.tar") as tar:
        cut = tar.getmember("2.jpg").offset_data + 100
    (tmp_path / "b.tar").write_bytes((tmp_path / "b.tar").read_bytes()[:cut])  # ends inside 2.jpg
    with tarfile.open(tmp_path / "c.tar", "w") as tar:
        add_member(tar, "last.jpg", jpg)
        add_member(tar, "last.txt", b"after the broken shard")
    ds = data.TarShards([str(tmp_path / f"{x}.tar") for x in "abc"], size=32, shuffle_buffer=0)
    samples = list(ds)
    captions = [s["caption"] for s in samples if s is not None]
    assert captions[:2] == ["plain caption", "json caption"] and captions[-1] == "after the broken shard"
    assert [c for c in captions if c.startswith("from b")] == ["from b 0", "from b 1"]
    assert data.BAD.drain() == {"truncated shard": 1, "image missing": 1, "not an image": 1, "caption missing": 2}
    assert sum(s is None for s in samples) == 5


def test_tar_missing_shard_is_an_error_at_start_and_skipped_later(tmp_path):
    write_shards(tmp_path, 2, 3)
    with pytest.raises(ValueError, match="gone.tar: no such file"):
        data.TarShards([str(tmp_path / "gone.tar"), str(tmp_path / "shard-00.tar")], size=32)
    ds = data.TarShards(str(tmp_path / "shard-*.tar"), size=32, shuffle_buffer=0)
    os.remove(tmp_path / "shard-00.tar")  # vanishes mid-run (a network mount, a cleanup job)
    assert [s and s["caption"] for s in ds] == [None, "sample 1 0", "sample 1 1", "sample 1 2"]
    assert data.BAD.drain() == {"unreadable shard": 1}


# ----------------------------------------------------------------------------- for the training loop
def test_infinite_batches_split_ranks_and_resume_exactly():
    ds = toy.ToyWorld(16, length=50)
    take = lambda it, n: [next(it) for _ in range(n)]
    ranks = [take(data.infinite_batches(ds, 8, rank=r, world_size=2, seed=3), 3) for r in range(2)]
    seen = [x.numpy().tobytes() for r in ranks for _, _, b in r for x in b["img"]]  # captions can repeat, pixels not
    assert len(seen) == 48 == len(set(seen))  # 3 full steps per rank from 25 each, no sample twice in the epoch
    assert [(e, c) for e, c, _ in ranks[0]] == [(0, 1), (0, 2), (0, 3)]
    full = take(data.infinite_batches(ds, 8, rank=1, world_size=2, seed=3), 6)
    resumed = take(data.infinite_batches(ds, 8, rank=1, world_size=2, seed=3, epoch=0, consumed=2), 4)
    assert [b["caption"] for _, _, b in resumed] == [b["caption"] for _, _, b in full[2:]]
    assert full[3][0] == 1 and full[3][2]["caption"] != full[0][2]["caption"]  # epoch 1: a new order


def test_infinite_batches_refill_bad_samples_and_fail_when_all_bad(tmp_path):
    for i in range(10):
        (tmp_path / f"{i}.jpg").write_bytes(encode(photo(), "JPEG") if i % 3 else b"")
        (tmp_path / f"{i}.txt").write_text(f"photo {i}")
    ds = data.ImageCaptionFolder(str(tmp_path), size=32, quiet=True)
    batches = data.infinite_batches(ds, 4, workers=2)
    first = [next(batches) for _ in range(3)]
    assert all(b["img"].shape == (4, 3, 32, 32) for _, _, b in first)  # 6 good of 10 per epoch, still full batches
    assert sum(b["bad"].get("zero-byte", 0) for _, _, b in first) >= 4
    for i in range(10):
        (tmp_path / f"{i}.jpg").write_bytes(b"")
    with pytest.raises(RuntimeError, match=r"no usable sample \(bad samples: 10 \(zero-byte: 10\)\)"):
        next(data.infinite_batches(data.ImageCaptionFolder(str(tmp_path), size=32, quiet=True), 4))


def test_save_image_grid(tmp_path):
    img = torch.stack([toy.ToyWorld(32)[i]["img"] for i in range(5)])
    data.save_image_grid(str(tmp_path / "a" / "grid.png"), img, [f"caption {i}" for i in range(5)], columns=3)
    grid = np.asarray(Image.open(tmp_path / "a" / "grid.png"))
    tile_h = grid.shape[0] // 2
    assert grid.shape[1] == 96 and tile_h > 32
    expect = ((img[4] + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    assert np.array_equal(grid[tile_h:tile_h + 32, 32:64], expect)  # tile 4: row 1, column 1
    assert (grid[32:tile_h, :32] < 128).any()  # its caption is drawn below the tile
    data.save_image_grid(str(tmp_path / "one.png"), img[4:])  # no captions: exactly the image
    assert np.array_equal(np.asarray(Image.open(tmp_path / "one.png")), expect)
