"""The toy world: a procedural image-caption world, its automatic scorer, and the toy encoder, for CPU demos and CI.

Real SigLIP-2 weights cannot be downloaded without internet, and CI has none. So:
- ToyWorld: coloured shapes at named positions and rendered words on light backgrounds, with captions ("a red circle
  on the left", 'the word "cat" in blue'), a pure function of (seed, split, index), at any size.
- score_toy: its GenEval. Because the ground truth is known, colour / shape / position / text accuracy of generated
  images is measured by plain pixel analysis (segment by palette colour, match shape templates).
- The toy encoder: a tiny SigLIP-2 (112 px, patch 14: 64 latent tokens of 128 channels) with fixed random vision
  weights and a built, contextual text tower, written in the real HF format and read back by rae.load_siglip2, the
  very path of a downloaded checkpoint. It is a model, so this file builds on rae.py (data.py imports no model code).

    python toy.py    # renders, captions and scores toy images (the scorer on real, shuffled and noise images)
"""
import collections
import itertools
import json
import math
import os
import re
import shutil
from functools import lru_cache

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

import data
import rae
import tokenizer
from data import article, font, to_tensor

# ----------------------------------------------------------------------------- the toy world: palette, shapes, captions
# Saturated colours, far from each other and from the light, nearly neutral backgrounds, so that a pixel's colour
# is unambiguous even after anti-aliasing (the scorer relies on this).
COLORS = {"red": (215, 30, 30), "orange": (245, 135, 0), "yellow": (235, 215, 0), "green": (30, 150, 50),
          "blue": (30, 70, 215), "purple": (135, 50, 185), "pink": (245, 105, 185), "black": (25, 25, 25)}
SHAPES = ("circle", "square", "triangle", "star", "cross")
POSITIONS = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75),
             "center": (0.5, 0.5)}  # (x, y) anchors as fractions of the image side
PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
           "center": "in the center"}
WORDS = ("cat", "dog", "sun", "moon", "tree", "fish", "bird", "car", "hat", "cup", "key", "box", "kite", "frog",
         "milk", "rain")
PREFIXES = ("", "", "a picture of ", "a drawing of ")
WORD_TEMPLATES = ('the word "{word}" in {color}', 'the word "{word}" written in {color}', '"{word}" in {color} letters')
SPLITS = {"train": 0, "test": 1}


def _star(points=5, inner=0.45):
    angles = -np.pi / 2 + np.arange(2 * points) * np.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], 1)


def _unit(poly):  # stretch a polygon to touch all four sides of the unit square, so box = bounding box
    poly = np.asarray(poly, dtype=np.float64)
    return (poly - poly.min(0)) / (poly.max(0) - poly.min(0))


POLYGONS = {"square": _unit([(0, 0), (1, 0), (1, 1), (0, 1)]), "triangle": _unit([(0.5, 0), (1, 1), (0, 1)]),
            "star": _unit(_star()),
            "cross": _unit([(1, 0), (2, 0), (2, 1), (3, 1), (3, 2), (2, 2), (2, 3), (1, 3), (1, 2), (0, 2), (0, 1),
                            (1, 1)])}


def shape_mask(shape, box, width, height, ss=4):
    """Coverage in [0, 1], (height, width), of `shape` filling box = (x0, y0, x1, y1) pixels; drawn at ss x the
    resolution and box-filtered down, which is the anti-aliasing. The scorer draws its templates with it too."""
    canvas = Image.new("L", (width * ss, height * ss))
    x0, y0, x1, y1 = (v * ss for v in box)
    if shape == "circle":
        ImageDraw.Draw(canvas).ellipse((x0, y0, x1, y1), fill=255)
    else:
        pts = POLYGONS[shape] * (x1 - x0, y1 - y0) + (x0, y0)
        ImageDraw.Draw(canvas).polygon([tuple(p) for p in pts], fill=255)
    return np.asarray(canvas.reduce(ss), dtype=np.float32) / 255


def word_mask(word, center, width_px, width, height, ss=4):
    """Coverage (height, width) of `word` drawn bold, centred at `center`, about `width_px` wide."""
    ref = font(100).getbbox(word, stroke_width=3)
    px = max(2, round(100 * width_px * ss / (ref[2] - ref[0])))
    canvas = Image.new("L", (width * ss, height * ss))
    ImageDraw.Draw(canvas).text((center[0] * ss, center[1] * ss), word, fill=255, font=font(px), anchor="mm",
                                stroke_width=max(1, px * 3 // 100), stroke_fill=255)
    return np.asarray(canvas.reduce(ss), dtype=np.float32) / 255


def toy_attrs(rng):
    """Ground truth of one sample: 20% a word, 35% two objects (left/right or top/bottom, two colours), 45% one."""
    colors, u = list(COLORS), rng.random()
    if u < 0.2:
        return {"word": str(rng.choice(WORDS)), "color": str(rng.choice(colors))}
    if u < 0.55:
        positions = [("left", "right"), ("top", "bottom")][rng.integers(2)]
        pair = rng.choice(colors, 2, replace=False)
        return {"objects": [{"color": str(c), "shape": str(rng.choice(SHAPES)), "position": p}
                            for c, p in zip(pair, positions)]}
    return {"objects": [{"color": str(rng.choice(colors)), "shape": str(rng.choice(SHAPES)),
                         "position": str(rng.choice(list(POSITIONS)))}]}


def toy_caption(attrs, rng):
    if "word" in attrs:
        return str(rng.choice(WORD_TEMPLATES)).format(**attrs)
    parts = [f"{article(o['color'])} {o['color']} {o['shape']} {PHRASES[o['position']]}" for o in attrs["objects"]]
    if rng.random() < 0.5:  # "a blue square on the right and a red circle on the left" as often as the reverse
        parts.reverse()
    return str(rng.choice(PREFIXES)) + " and ".join(parts)


def toy_vocab():
    """Every word a toy caption can contain, lowercase, plus the quote mark around rendered words."""
    text = " ".join([*PREFIXES, *WORD_TEMPLATES, *PHRASES.values(), *COLORS, *SHAPES, *WORDS, "a an and"])
    return sorted(set(re.findall(r"[a-z]+", re.sub(r"\{\w+\}", " ", text)))) + ['"']


def render_toy(attrs, size, rng):
    """attrs -> PIL RGB size x size. All layout draws come before any size-dependent one, so the same (seed, index)
    gives the same scene at every resolution."""
    base = rng.uniform(200, 245) + rng.uniform(-8, 8, 3)  # light, nearly neutral
    texture, angle, freq = rng.integers(4), rng.uniform(0, 2 * np.pi), rng.uniform(3, 12)
    noise_seed = rng.integers(2**31)  # the noise texture's own generator: its size-dependent draws stay out of rng
    layout = []
    if "word" in attrs:
        layout.append((None, attrs["color"], rng.uniform(0.45, 0.75), 0.5 + rng.uniform(-0.05, 0.05, 2)))
    for o in attrs.get("objects", []):  # two objects are smaller, so the pair never overlaps
        side = rng.uniform(0.22, 0.32) if len(attrs["objects"]) == 1 else rng.uniform(0.2, 0.28)
        center = np.array(POSITIONS[o["position"]]) + rng.uniform(-0.03, 0.03, 2)
        layout.append((o["shape"], o["color"], side, center))
    jitter = rng.uniform(-10, 10, (len(layout), 3)).astype(np.float32)

    img = np.empty((size, size, 3), dtype=np.float32)  # (H, W, 3)
    img[:] = base
    if texture == 1:  # noise
        img += np.random.default_rng(noise_seed).normal(0, 5, (size, size, 1)).astype(np.float32)
    elif texture >= 2:  # a gradient or stripes along a random direction
        t = np.arange(size, dtype=np.float32) / size - 0.5
        along = t[None, :] * np.cos(angle) + t[:, None] * np.sin(angle)  # (H, W)
        img += (24 * along if texture == 2 else 7 * np.sin(2 * np.pi * freq * along))[..., None]
    for (shape, color, side, (cx, cy)), dc in zip(layout, jitter):
        if shape is None:
            a = word_mask(attrs["word"], (cx * size, cy * size), side * size, size, size)
        else:
            box = ((cx - side / 2) * size, (cy - side / 2) * size, (cx + side / 2) * size, (cy + side / 2) * size)
            a = shape_mask(shape, box, size, size)
        img += (np.float32(COLORS[color] + dc) - img) * a[..., None]  # blend by coverage
    return Image.fromarray(img.clip(0, 255).round().astype(np.uint8))


class ToyWorld(Dataset):
    """The procedural image-caption world: ds[i] = {"img": (3, size, size) in [-1, 1], "caption", "attrs"}, a pure
    function of (seed, split, i). No random flip, by design: captions name left and right, words would read
    mirrored, and a procedural world has unlimited samples, so a flip would add nothing."""

    def __init__(self, size=224, seed=0, length=100_000, split="train"):
        self.size, self.seed, self.length, self.split = size, seed, length, SPLITS[split]

    def __len__(self):
        return self.length

    def prompt(self, i):
        """(caption, attrs) of sample i without rendering it, and the generator that goes on to draw its layout."""
        rng = np.random.default_rng([self.seed, self.split, i])
        attrs = toy_attrs(rng)
        return toy_caption(attrs, rng), attrs, rng

    def __getitem__(self, i):
        if not 0 <= i < self.length:
            raise IndexError(i)
        caption, attrs, rng = self.prompt(i)
        return {"img": to_tensor(render_toy(attrs, self.size, rng)), "caption": caption, "attrs": attrs}


def toy_prompts(n, seed=0):
    """The fixed evaluation set: [(caption, attrs)] of the first n samples of the test split (never trained on)."""
    world = ToyWorld(seed=seed, split="test")
    return [world.prompt(i)[:2] for i in range(n)]


_OBJECT = re.compile(rf"an? ({'|'.join(COLORS)}) ({'|'.join(SHAPES)}) ({'|'.join(PHRASES.values())})")
_WORD = [re.compile(re.escape(t).replace(r"\{word\}", rf"(?P<word>{'|'.join(WORDS)})")
                    .replace(r"\{color\}", rf"(?P<color>{'|'.join(COLORS)})")) for t in WORD_TEMPLATES]


def toy_truth(prompts):
    """Toy captions -> their attrs (the inverse of toy_caption), to score images made from typed-in prompts; None
    if any prompt is not a toy caption."""
    position = {phrase: p for p, phrase in PHRASES.items()}
    out = []
    for prompt in prompts:
        text = " ".join(prompt.lower().split())
        text = next((text[len(p):] for p in PREFIXES if p and text.startswith(p)), text)
        word = next((m for m in (r.fullmatch(text) for r in _WORD) if m), None)
        objs = [_OBJECT.fullmatch(part) for part in text.split(" and ")]
        if word:
            out.append({"word": word["word"], "color": word["color"]})
        elif all(objs) and len(objs) <= 2:
            out.append({"objects": [{"color": m[1], "shape": m[2], "position": position[m[3]]} for m in objs]})
        else:
            return None
    return out


# ----------------------------------------------------------------------------- the toy scorer: GenEval by pixels
PALETTE = np.array(list(COLORS.values()), dtype=np.float32)  # (K, 3)


def segment(arr):
    """(H, W, 3) uint8 -> (colour index (H, W), foreground (H, W)). Each pixel is modelled as the background
    blended with one palette colour at coverage a (that is what anti-aliasing makes): per colour we solve for a,
    keep the colour whose blend line passes closest, and call the pixel foreground where a > 1/2."""
    h, w, _ = arr.shape
    x = arr.reshape(-1, 3).astype(np.float32)
    border = np.concatenate([arr[:2].reshape(-1, 3), arr[-2:].reshape(-1, 3), arr[:, :2].reshape(-1, 3),
                             arr[:, -2:].reshape(-1, 3)])
    bg = np.median(border, 0).astype(np.float32)  # objects never touch the border in the toy world
    d, dc = x - bg, PALETTE - bg  # (P, 3), (K, 3)
    dot, n2 = d @ dc.T, np.maximum((dc * dc).sum(1), 1)  # (P, K), (K,)
    a = np.clip(dot / n2, 0, 1)  # (P, K)
    resid = (d * d).sum(1, keepdims=True) - 2 * a * dot + a * a * n2  # |d - a dc|^2, (P, K)
    k = resid.argmin(1)
    return k.reshape(h, w), (a[np.arange(len(k)), k] > 0.5).reshape(h, w)


def detect(arr, n):
    """The n largest single-colour regions: [(colour name, mask (H, W))]. Grouping by colour rather than by
    connected component keeps a word's letters together (the world never draws two objects of one colour)."""
    k, fg = segment(arr)
    counts = np.bincount(k[fg], minlength=len(PALETTE))
    order = [j for j in np.argsort(-counts, kind="stable") if counts[j] >= max(4, 1e-3 * k.size)][:n]
    return [(list(COLORS)[j], fg & (k == j)) for j in order]


def _bbox(mask):
    ys, xs = np.nonzero(mask)
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


def _iou(a, b):
    return (a & b).sum() / max((a | b).sum(), 1)


def describe(color, mask):
    """One detected object -> {"color", "shape", "position"}: the position is the anchor nearest to the centroid,
    the shape the one whose template, drawn into the object's bounding box, overlaps its mask best (IoU)."""
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    c = np.array([xs.mean() / w, ys.mean() / h])
    position = min(POSITIONS, key=lambda p: np.linalg.norm(c - POSITIONS[p]))
    x0, y0, x1, y1 = _bbox(mask)
    crop = mask[y0:y1, x0:x1]
    shape = max(SHAPES, key=lambda s: _iou(crop, shape_mask(s, (0, 0, x1 - x0, y1 - y0), x1 - x0, y1 - y0) > 0.5))
    return {"color": color, "shape": shape, "position": position}


def read_word(mask):
    """The toy word whose rendering, fitted to the mask's bounding box, overlaps it best (template matching)."""
    x0, y0, x1, y1 = _bbox(mask)
    crop = mask[y0:y1, x0:x1]

    fit = lambda word: np.asarray(_word_ink(word).resize((x1 - x0, y1 - y0), Image.BILINEAR)) > 127
    return max(WORDS, key=lambda word: _iou(crop, fit(word)))


@lru_cache(maxsize=None)
def _word_ink(word):  # the word drawn 300 px wide, cropped to its ink
    ink = Image.fromarray((word_mask(word, (200, 100), 300, 400, 200, ss=1) * 255).astype(np.uint8))
    return ink.crop(ink.getbbox())


def score_toy(images, attrs_list):
    """Toy GenEval. images: (B, 3, H, W) in [-1, 1] or a list of PIL images; attrs_list: the prompts' ground truth.
    Returns colour / shape / position accuracy over all objects (colour also over words), text accuracy over word
    prompts, and n images. Two-object prompts are matched to the two largest detections in the assignment that
    identifies them best: by colour first, then shape (as GenEval finds an object by its class before judging
    its position), so a swapped pair scores its positions wrong rather than its colours. A missing detection gets
    every attribute wrong."""
    if torch.is_tensor(images):
        images = ((images.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1)
    hits, total = collections.Counter(), collections.Counter()
    for im, attrs in zip(images, attrs_list):
        arr = np.asarray(im.convert("RGB")) if isinstance(im, Image.Image) else im.numpy()
        if "word" in attrs:
            found = detect(arr, 1)
            hits["color"] += bool(found) and found[0][0] == attrs["color"]
            hits["text"] += bool(found) and read_word(found[0][1]) == attrs["word"]
            total["color"] += 1
            total["text"] += 1
            continue
        objs = attrs["objects"]
        dets = [describe(c, m) for c, m in detect(arr, len(objs))]
        best = max((collections.Counter({a: sum(d is not None and d[a] == o[a] for o, d in zip(objs, perm))
                                         for a in ("color", "shape", "position")})
                    for perm in itertools.permutations(dets + [None] * len(objs), len(objs))),
                   key=lambda c: (c["color"], c["shape"], c["position"]))
        hits.update(best)
        total.update({"color": len(objs), "shape": len(objs), "position": len(objs)})
    acc = {f"{a}_acc": hits[a] / total[a] if total[a] else float("nan") for a in ("color", "shape", "position", "text")}
    return {**acc, "n": len(attrs_list)}


# ----------------------------------------------------------------------------- the toy encoder
# A tiny SigLIP-2 (patch 14 at 224: the 16 x 16 grid of so400m-patch14-224) with fixed random weights, written once
# in the real HF format so the toy path goes through the same load_siglip2 as a downloaded checkpoint.
TOY_VISION = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, patch_size=14)
TOY_TEXT = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4)


TOY_WINDOW = (2, 5)  # each toy text state adds the words 2 to 5 places before it (see contextual_text_tower)


def contextual_text_tower(model, word_dims=96, sharpness=0.2):
    """Rebuild the toy text tower (in place) so that every token state carries the words a few places before it, as
    a trained text tower's states carry their context: "left" in "a red circle on the left" then says "red circle".
    A random tower cannot do this (its attention mixes all 64 positions alike; `python bench.py toy` probes how well
    the left object's colour reads from the state of "left" through each), and the DiT's connector, which has no
    positions of its own, can only bind a colour to an object through such states.
    How: words live in the first word_dims channels, positions in the rest as sin/cos of 16 slow frequencies. Block
    0's queries are the position code rotated back by the window's centre, so attention peaks on the words
    TOY_WINDOW places back, and its values copy the word channels. The MLPs and block 1 are switched off; shapes and
    keys stay those of the HF format."""
    tower, g = model.text, torch.Generator().manual_seed(0)
    D, heads = tower.pos_embed.shape[1], tower.blocks[0].attn.heads
    hd, P = D // heads, D - word_dims
    assert P == hd and P % 2 == 0 and word_dims % hd == 0, "one head's width of position channels"
    center = sum(TOY_WINDOW) / 2  # 3.5 places back
    omega = 2 * math.pi * torch.arange(1, P // 2 + 1) / 128  # (P/2,): periods >= 128 positions, no wrap-around in 64
    with torch.no_grad():
        for name, p in tower.named_parameters():
            if not name.startswith("head."):  # the pooling head stays random: sample.py --score uses it
                p.zero_()
        tower.token_embed.weight[:, :word_dims] = torch.randn(tower.token_embed.weight.shape[0], word_dims,
                                                              generator=g) * math.sqrt(D) / word_dims
        angles = torch.arange(tower.pos_embed.shape[0])[:, None] * omega  # (T, P/2)
        tower.pos_embed[:, word_dims:] = torch.cat([angles.cos(), angles.sin()], dim=1)
        for norm in [tower.final_norm, *(n for b in tower.blocks for n in (b.norm1, b.norm2))]:
            norm.weight.fill_(1)
        # rotation of the position code of i to that of i - center: per frequency a 2 x 2 rotation by -omega * center
        c, s = torch.cos(omega * center), torch.sin(omega * center)
        back = torch.zeros(P, P)
        back[range(P // 2), range(P // 2)], back[range(P // 2, P), range(P // 2, P)] = c, c
        back[range(P // 2), range(P // 2, P)], back[range(P // 2, P), range(P // 2)] = s, -s
        qkv, proj = tower.blocks[0].attn.qkv.weight, tower.blocks[0].attn.proj.weight  # (3D, D), (D, D)
        for h in range(word_dims // hd):  # the heads that carry words; the last one stays zero
            rows = slice(h * hd, (h + 1) * hd)
            qkv[rows, word_dims:] = sharpness * back  # q = position of i, moved back to i - center
            qkv[D + h * hd: D + (h + 1) * hd, word_dims:] = torch.eye(P)  # k = position of j
            qkv[2 * D + h * hd: 2 * D + (h + 1) * hd, rows] = torch.eye(hd)  # v = one slice of j's word channels
            proj[rows, rows] = torch.eye(hd)  # ... added back to the same slice of i's
    return model


def tiny_siglip2(words, vision=None, text=None, seed=0):
    """A random-weight SigLIP-2 (lecun-normal matrices, small random norms and biases) and a Gemma-format
    tokenizer.json over `words`: (model, tokenizer spec). vision/text override config fields."""
    tok = tokenizer.gemma_tokenizer_json(words)
    small = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
    vision_cfg = {**rae.VISION_DEFAULTS, **small, "image_size": 224, "patch_size": 14, **(vision or {})}
    text_cfg = {**rae.TEXT_DEFAULTS, **small, **(text or {}), "vocab_size": len(tok["model"]["vocab"])}
    g = torch.Generator().manual_seed(seed)
    model = rae.SigLIP2(vision_cfg, text_cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2 and "pos_embed" not in name:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-10.0)
    return model, tok


def write_tiny_siglip2(path, words, vision=None, text=None, seed=0):
    """Write `tiny_siglip2` as a snapshot in the real HF format (config.json, model.safetensors, tokenizer.json): the
    tests load it through rae.load_siglip2, the very path of a downloaded checkpoint."""
    rae.save_siglip2(path, *tiny_siglip2(words, vision, text, seed))


def write_toy_encoder(path, size=112):
    """Write the toy SigLIP-2 snapshot to `path`, atomically: several ranks may start at once, and none may see half
    a folder. 112 px with patch 14 is an 8 x 8 grid: at 224 px (256 tokens) the CPU demo's decoder and DiT cost 4x
    as much per image and do not fit its budget. The vision tower is random; the text tower is built
    (contextual_text_tower)."""
    model, tok = tiny_siglip2(toy_vocab(), vision=dict(TOY_VISION, image_size=size), text=TOY_TEXT, seed=0)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        rae.save_siglip2(tmp, contextual_text_tower(model), tok, config={"toy_text_window": list(TOY_WINDOW)})
        os.rename(tmp, path)
    except OSError:  # another rank won the race (the rename finds `path` there), or the write failed
        if not os.path.isdir(path):
            raise
    finally:  # no temp folder is left behind
        shutil.rmtree(tmp, ignore_errors=True)


def load_encoder(path=None, text=True, size=112, folder="toy_encoder"):
    """The frozen SigLIP-2 of every script: `path` (a HF snapshot folder), or, when path is None or "toy", the toy
    encoder in `folder`, written there first if missing. Returns a model with .vision, .text, .tokenizer."""
    if path not in (None, "toy"):
        return rae.load_siglip2(path, text=text)
    path = folder
    if not os.path.exists(path):
        write_toy_encoder(path, size)
    try:
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
        stale = config.get("toy_text_window") != list(TOY_WINDOW) or config["vision_config"]["image_size"] != size
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # a broken or half-deleted folder
        stale = True
    if stale:
        raise ValueError(f"{os.path.abspath(path)} holds a toy encoder of an older version or another size: delete "
                         f"that folder, and it is written again")
    return rae.load_siglip2(path, text=text)


def dataset(spec, size=224, rank=0, world_size=1, seed=0, flip=False, limit=0):
    """The --data of the training scripts: 'toy' or 'toy:SEED' -> ToyWorld (never flipped, see ToyWorld; `limit` > 0
    keeps the first `limit` scenes); any other spec -> data.build_dataset (folders, tar shards)."""
    if spec == "toy" or spec.startswith("toy:"):
        return ToyWorld(size, seed=int(spec[4:] or 0), **({"length": limit} if limit else {}))
    return data.build_dataset(spec, size, rank, world_size, seed, flip, limit)


# ----------------------------------------------------------------------------- smoke test
if __name__ == "__main__":
    ds = ToyWorld(size=128, seed=0)
    samples = [ds[i] for i in range(64)]
    for s in samples[:6]:
        print(s["caption"], "|", s["attrs"])
    images = torch.stack([s["img"] for s in samples])
    attrs = [s["attrs"] for s in samples]
    print("own images:  ", score_toy(images, attrs))
    print("shuffled:    ", score_toy(images, attrs[1:] + attrs[:1]))
    print("noise:       ", score_toy(torch.rand_like(images) * 2 - 1, attrs))
    print(f"vocabulary ({len(toy_vocab())} words):", " ".join(toy_vocab()))
