"""Tests for toy.py: the toy world and its captions, the toy scorer, the toy --data specs, and the toy encoder (its
HF-format folder, the refusal of a stale one, the atomic write, the contextual text tower). CPU, no network:
python -m pytest -q test_toy.py"""
import json
import os
import re

import pytest
import torch
from PIL import Image

import data
import toy
from conftest import one_line_naming


# ----------------------------------------------------------------------------- toy world
def test_toy_same_seed_and_index_same_pixels():
    a, b = toy.ToyWorld(64, seed=3)[7], toy.ToyWorld(64, seed=3)[7]
    assert torch.equal(a["img"], b["img"]) and a["caption"] == b["caption"] and a["attrs"] == b["attrs"]
    assert not torch.equal(a["img"], toy.ToyWorld(64, seed=4)[7]["img"])
    assert not torch.equal(a["img"], toy.ToyWorld(64, seed=3)[8]["img"])
    assert a["img"].shape == (3, 64, 64) and a["img"].dtype == torch.float32
    assert a["img"].min() >= -1 and a["img"].max() <= 1


def test_toy_same_scene_at_every_resolution():
    for i in range(6):
        small, big = toy.ToyWorld(48)[i], toy.ToyWorld(144)[i]
        assert small["caption"] == big["caption"] and small["attrs"] == big["attrs"]
        down = torch.nn.functional.interpolate(big["img"][None], size=48, mode="area")[0]
        assert (down - small["img"]).abs().mean() < 0.03


def parse_caption(caption):
    """An independent reading of a toy caption back into attrs (regexes, not the generator's tables)."""
    m = re.fullmatch(r'(?:the word "(\w+)"(?: written)? in (\w+)|"(\w+)" in (\w+) letters)', caption)
    if m:
        word, color = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
        return {"word": word, "color": color}
    caption = re.sub(r"^a (picture|drawing) of ", "", caption)
    objs = [re.fullmatch(r"an? (\w+) (\w+) (?:on|at|in) the (\w+)", part) for part in caption.split(" and ")]
    return {"objects": sorted(({"color": o[1], "shape": o[2], "position": o[3]} for o in objs),
                              key=lambda o: o["position"])}


def test_toy_caption_matches_attrs():
    prompts = toy.toy_prompts(500, seed=1)
    for caption, attrs in prompts:
        parsed = parse_caption(caption)
        if "objects" in attrs:
            attrs = {"objects": sorted(attrs["objects"], key=lambda o: o["position"])}
        assert parsed == attrs, caption
        for o in attrs.get("objects", []):  # articles read right: "an orange", "a red"
            assert f"{'an' if o['color'][0] in 'aeiou' else 'a'} {o['color']} {o['shape']}" in caption
    pairs = [a["objects"] for _, a in prompts if len(a.get("objects", [])) == 2]
    assert all({o["position"] for o in p} in ({"left", "right"}, {"top", "bottom"}) for p in pairs)
    assert all(p[0]["color"] != p[1]["color"] for p in pairs)  # the scorer groups pixels by colour
    objects = [o for _, a in prompts for o in a.get("objects", [])]
    assert {o["color"] for o in objects} == set(toy.COLORS) and len(toy.COLORS) >= 6
    assert {o["shape"] for o in objects} == set(toy.SHAPES) and len(toy.SHAPES) >= 4
    assert {o["position"] for o in objects} == {"left", "right", "top", "bottom", "center"}
    kinds = [("word" in a) + len(a.get("objects", [])) * 10 for _, a in prompts]
    assert 0.1 < kinds.count(1) / 500 < 0.3 and 0.25 < kinds.count(20) / 500 < 0.45  # words, pairs


def test_toy_vocab_covers_every_caption():
    vocab = set(toy.toy_vocab())
    assert all(w == w.lower() for w in vocab)
    for caption, _ in toy.toy_prompts(1000, seed=2):
        words = caption.replace('"', ' " ').split()
        assert set(words) <= vocab, caption


def test_toy_prompts_are_the_test_split():
    test, train = toy.ToyWorld(32, split="test"), toy.ToyWorld(32)
    prompts = toy.toy_prompts(20)
    assert [(test[i]["caption"], test[i]["attrs"]) for i in range(20)] == prompts
    assert sum(train[i]["caption"] == prompts[i][0] for i in range(20)) < 5


def test_toy_truth_inverts_toy_captions():
    by_position = lambda a: {"objects": sorted(a["objects"], key=lambda o: o["position"])} if "objects" in a else a
    prompts = toy.toy_prompts(300, seed=5)
    truth = toy.toy_truth([c.upper() for c, _ in prompts])  # typed-in prompts: case and spacing do not matter
    assert [by_position(t) for t in truth] == [by_position(a) for _, a in prompts]
    assert toy.toy_truth(["a red circle on the left", "a photo of a dog"]) is None
    assert toy.toy_truth(['the word "zebra" in red']) is None  # not a toy word: the scorer could not read it


# ----------------------------------------------------------------------------- toy scorer
def toy_batch(n, size, seed=0):
    ds = toy.ToyWorld(size, seed=seed)
    samples = [ds[i] for i in range(n)]
    return torch.stack([s["img"] for s in samples]), [s["attrs"] for s in samples]


@pytest.mark.parametrize("size", [64, 224])
def test_score_own_images_near_100(size):
    images, attrs = toy_batch(120, size)
    s = toy.score_toy(images, attrs)
    assert s["n"] == 120
    for key in ("color_acc", "shape_acc", "position_acc", "text_acc"):
        assert s[key] >= 0.95, s


def test_score_wrong_images_near_chance():
    # chance: colour 1/8, shape 1/5, position 1/5 (one object) to 1/2 (pairs), text 1/16
    images, attrs = toy_batch(160, 64)
    wrong = {"shuffled attrs": (images, attrs[1:] + attrs[:1]),
             "noise": (torch.rand(images.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1, attrs),
             "blank": (torch.ones_like(images), attrs)}
    for name, (x, a) in wrong.items():
        s = toy.score_toy(x, a)
        assert s["color_acc"] < 0.3 and s["shape_acc"] < 0.4 and s["position_acc"] < 0.4, (name, s)
        assert s["text_acc"] < 0.3, (name, s)


def test_score_accepts_pil_images():
    images, attrs = toy_batch(12, 64)
    pil = [Image.fromarray(((x + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()) for x in images]
    assert toy.score_toy(pil, attrs) == toy.score_toy(images, attrs)


def test_mirrored_toy_image_needs_the_swapped_caption():
    images, attrs = toy_batch(80, 64)
    keep = [i for i, a in enumerate(attrs) if "objects" in a and a["objects"][0]["position"] in ("left", "right")]
    images, attrs = images[keep].flip(-1), [attrs[i] for i in keep]
    swap = {"left": "right", "right": "left"}
    swapped = [{"objects": [{**o, "position": swap.get(o["position"], o["position"])} for o in a["objects"]]}
               for a in attrs]
    assert toy.score_toy(images, swapped)["position_acc"] >= 0.95
    assert toy.score_toy(images, attrs)["position_acc"] <= 0.05


# ----------------------------------------------------------------------------- toy.dataset: the --data of the scripts
def test_toy_world_is_never_flipped():
    ds = toy.dataset("toy", size=32, flip=True)
    for i in range(10):
        assert torch.equal(ds[i]["img"], toy.ToyWorld(32)[i]["img"])


def test_dataset_toy_specs_and_limit():
    assert toy.dataset("toy", 32).seed == 0 and toy.dataset("toy:5", 32).seed == 5
    assert len(toy.dataset("toy", 32)) == len(toy.ToyWorld(32))  # no limit: the whole world
    ds = toy.dataset("toy:3", 32, limit=5)
    assert isinstance(ds, toy.ToyWorld) and ds.seed == 3 and len(ds) == 5 and ds.size == 32
    for i in (0, 4):
        want = toy.ToyWorld(32, seed=3)[i]
        assert torch.equal(ds[i]["img"], want["img"]) and ds[i]["caption"] == want["caption"]
    with pytest.raises(IndexError):
        ds[5]


def test_dataset_other_specs_go_to_build_dataset(tmp_path, monkeypatch):
    folder = tmp_path / "caps"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (48, 48), (200, 30, 30)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"caption {i}")
    ds = toy.dataset(str(folder), 32, limit=2)
    assert isinstance(ds, data.ImageCaptionFolder) and len(ds) == 2 and ds[0]["img"].shape == (3, 32, 32)
    calls = []

    def spy(spec, size=224, rank=0, world_size=1, seed=0, flip=False, limit=0):
        calls.append(dict(spec=spec, size=size, rank=rank, world_size=world_size, seed=seed, flip=flip, limit=limit))
        return "built"

    monkeypatch.setattr(data, "build_dataset", spy)
    specs = ["/shards/x-{00..03}.tar", "toyland", "toys/", "my_toy:3"]  # only 'toy' and 'toy:N' are the toy world
    for spec in specs:
        assert toy.dataset(spec, 64, rank=1, world_size=2, seed=7, flip=True, limit=9) == "built"
    assert calls == [dict(spec=s, size=64, rank=1, world_size=2, seed=7, flip=True, limit=9) for s in specs]


# ----------------------------------------------------------------------------- the toy encoder
def test_toy_encoder_written_once_in_hf_format_and_loaded(tmp_path):
    path = str(tmp_path / "toy_encoder")
    model = toy.load_encoder(folder=path)
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert os.listdir(tmp_path) == ["toy_encoder"]  # no temp folder left
    mtime = os.path.getmtime(os.path.join(path, "model.safetensors"))
    again = toy.load_encoder(folder=path)  # loads, does not rewrite
    assert os.path.getmtime(os.path.join(path, "model.safetensors")) == mtime
    assert toy.load_encoder("toy", folder=path) is not None  # "toy" is the toy encoder too
    assert os.path.getmtime(os.path.join(path, "model.safetensors")) == mtime
    captions = [c for c, _ in toy.toy_prompts(200)]
    ids = model.tokenizer(captions)
    assert ids.shape == (200, 64)
    unk, byte_fallback = 3, set(range(5, 5 + 256))
    assert not (ids == unk).any() and not set(ids.unique().tolist()) & byte_fallback
    assert all(model.tokenizer.decode(model.tokenizer.encode(c)) == c for c in captions)
    assert all(len(model.tokenizer.encode(" " + w)) == 1 for w in toy.toy_vocab())  # one token per word
    img = torch.stack([toy.ToyWorld(112)[i]["img"] for i in range(2)])
    with torch.no_grad():
        z, t = model.vision(img), model.text(ids[:2])
        assert z.shape == (2, 64, toy.TOY_VISION["hidden_size"]) and t.shape == (2, 64, toy.TOY_TEXT["hidden_size"])
        assert torch.equal(z, again.vision(img))  # fixed weights
    with pytest.raises(ValueError) as e:  # a 112 px folder asked for at 224 px
        toy.load_encoder(folder=path, size=224)
    one_line_naming(e, os.path.abspath(path), "delete")


def test_load_encoder_with_a_snapshot_path_loads_that_snapshot(tmp_path):
    """A real snapshot path is loaded as it is: never the toy folder, never written, whatever `folder` says."""
    snap = str(tmp_path / "snap")
    toy.write_tiny_siglip2(snap, toy.toy_vocab(), vision=dict(image_size=56), seed=1)
    model = toy.load_encoder(snap, folder=str(tmp_path / "unused"))
    assert not os.path.exists(tmp_path / "unused")
    assert model.vision.pos_embed.shape == (16, 64)  # 56 px / patch 14: a 4 x 4 grid of the snapshot's width
    assert toy.load_encoder(snap, text=False).text is None


@pytest.mark.parametrize("stale", ["no window", "other window", "other size"])
def test_stale_toy_encoder_is_refused_naming_the_folder(tmp_path, monkeypatch, stale):
    path = tmp_path / "enc"
    toy.write_toy_encoder(str(path))
    with open(path / "config.json") as f:
        config = json.load(f)
    if stale == "no window":  # a folder written before the contextual text tower
        del config["toy_text_window"]
    elif stale == "other window":
        config["toy_text_window"] = [1, 4]
    else:  # written by a run at another resolution
        config["vision_config"]["image_size"] = 224
    with open(path / "config.json", "w") as f:
        json.dump(config, f)
    monkeypatch.chdir(tmp_path)  # a relative folder is named by its absolute path
    for folder in ("enc", str(path)):
        with pytest.raises(ValueError) as e:
            toy.load_encoder(folder=folder)
        one_line_naming(e, str(path), "delete")
        assert str(e.value).startswith(str(path))
    assert json.loads((path / "config.json").read_text()) == config  # refused, not rewritten


def test_write_toy_encoder_is_atomic(tmp_path):
    path = tmp_path / "enc"
    toy.write_toy_encoder(str(path))
    assert os.listdir(tmp_path) == ["enc"]
    (path / "config.json").write_text((path / "config.json").read_text() + "\n")  # marks the first folder's files
    before = {f: ((path / f).read_bytes(), os.stat(path / f).st_mtime_ns) for f in os.listdir(path)}
    toy.write_toy_encoder(str(path))  # a second rank starting at once: the folder exists when it renames
    after = {f: ((path / f).read_bytes(), os.stat(path / f).st_mtime_ns) for f in os.listdir(path)}
    assert after == before and sorted(before) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert os.listdir(tmp_path) == ["enc"]  # no temp folder behind


def test_toy_text_tower_gives_each_word_the_words_just_before_it(toy_encoder):
    model = toy_encoder
    base = "a drawing of a red circle on the left"  # "left" is token 8 (0-based)
    def left_state(caption):
        ids = model.tokenizer([caption])
        with torch.no_grad():
            return model.text(ids)[0, 8]
    ref = left_state(base)
    moved = lambda caption: ((left_state(caption) - ref).norm() / ref.norm()).item()
    assert moved("a drawing of a blue circle on the left") > 0.1  # the colour, 4 places back: 24%
    assert moved("a drawing of a red star on the left") > 0.1  # the shape, 3 places back: 27%
    assert moved("a picture of a red circle on the left") < 0.02  # 7 places back, outside the window: 0.6%
    # the toy DiT reads the first 24 text states (dit.PRESETS["toy"]["text_len"]): every toy caption fits, with EOS
    import dit
    longest = max(len(model.tokenizer.encode(c.lower())) + 1 for c, _ in toy.toy_prompts(2000))
    assert longest == 17 <= dit.PRESETS["toy"]["text_len"]
