"""Data: the built-in toy world and its scorer, the toy encoder, and readers for the datasets users bring.

Every reader yields dicts {"img": (3, H, W) float in [-1, 1], "caption": str} (+ "label" for class folders,
"attrs" for the toy world). Preprocessing as DESIGN.md says: RGB (alpha composited on white), EXIF orientation,
shorter side resized (bilinear, antialiased) and center-cropped to `size`, optional random horizontal flip.
- ToyWorld: coloured shapes at named positions and rendered words, deterministic in (seed, index), at any size;
  score_toy is its GenEval: colour / shape / position / text accuracy of images by plain pixel analysis.
- ImageCaptionFolder (sidecar .txt or captions.jsonl), ClassFolders (ImageNet layout), TarShards (WebDataset
  .tar, streamed, split over ranks x workers); build_dataset(spec, size) picks one from a --data string.
- encode_latents / write_manifest / LatentCache: a dataset encoded once by the frozen towers into safetensors
  shards (--cache-latents of train_dit.py), read back as a dataset of latents and text states.
- A bad file never stops a run: the reader returns None and counts the reason, `collate` drops the None and
  hands the counts to the training loop in batch["bad"], which sums them with a BadSampleCounter and prints it.

Smoke test (renders, captions and scores toy images): python data.py
"""
import collections
import datetime
import glob
import io
import itertools
import json
import math
import os
import re
import shutil
import sys
import tarfile
import textwrap
import warnings
from functools import lru_cache

import numpy as np
import torch
import torch.distributed
from PIL import Image, ImageDraw, ImageFont, ImageOps
from safetensors import safe_open
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info
from tqdm import tqdm

IMAGE_EXTS = {"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"}
MAX_PIXELS = 64 * 2**20  # decode cap (a 192 MB RGB array); larger is treated as a decompression bomb
MIN_SIZE = 32  # shorter side below this is skipped: upscaling a thumbnail to 224 px teaches blur
MAX_CAPTION_CHARS = 1000  # the tokenizer keeps 64 tokens (~300 chars); this only bounds memory and tokenizing time


# ----------------------------------------------------------------------------- bad samples: skip, count, log once
class BadSample(Exception):
    """Raised while reading a sample that cannot be used; `reason` names the problem for the counts."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


class BadSampleCounter:
    """Counts by reason; prints the first `max_logged` paths once each to stderr (not a flood on a bad shard)."""

    max_logged = 20

    def __init__(self):
        self.counts = collections.Counter()
        self.logged = set()

    def add(self, reason, path, log=True):
        self.counts[reason] += 1
        if log and path not in self.logged and len(self.logged) < self.max_logged:
            self.logged.add(path)
            more = " (later ones are only counted)" if len(self.logged) == self.max_logged else ""
            print(f"data: {path}: {reason}{more}", file=sys.stderr)

    def update(self, counts):
        self.counts.update(counts)

    def drain(self):
        counts = dict(self.counts)
        self.counts.clear()
        return counts

    def total(self):
        return sum(self.counts.values())

    def __str__(self):
        parts = ", ".join(f"{reason}: {n}" for reason, n in self.counts.most_common())
        return f"bad samples: {self.total()}" + (f" ({parts})" if parts else "")


# One counter per process. DataLoader workers are separate processes, so counts kept in a dataset object would
# never reach the training loop; `collate` runs in the worker right after its samples were read and moves the
# counts into the batch.
BAD = BadSampleCounter()


def collate(batch):
    """Samples (None = bad, dropped) -> {"img": (B, 3, H, W), "caption": [B], "label": (B,), "attrs": [B],
    "bad": {reason: n}} (a LatentCache has "z" and "text" in place of "img"). A batch whose samples were all bad
    holds only "bad"."""
    good = [s for s in batch if s is not None]
    out = {"bad": BAD.drain()}
    for key in good[0] if good else ():
        values = [s[key] for s in good]
        # images (and a LatentCache's latents and text states) stack, labels become a tensor, the rest stay lists
        out[key] = (torch.stack(values) if torch.is_tensor(values[0]) else torch.tensor(values) if key == "label"
                    else values)
    return out


# ----------------------------------------------------------------------------- images and captions
def to_rgb(im):
    """Any PIL mode -> RGB. Transparency is composited on white; 16/32-bit integer images are rescaled, because
    PIL's own convert would clip everything above 255 to white."""
    if im.mode.startswith("I"):  # "I;16" grayscale PNGs, "I" from TIFF: assume the 16-bit range
        im = Image.fromarray((np.asarray(im, dtype=np.float32) / 257).clip(0, 255).round().astype(np.uint8))
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im.convert("RGBA"))
    return im.convert("RGB")  # CMYK, P, L, 1, YCbCr


def to_tensor(im):
    """PIL RGB (H, W) -> (3, H, W) float in [-1, 1]."""
    # numpy, not torch ops: on one small image torch's thread-pool dispatch costs more than it saves
    return torch.from_numpy(np.ascontiguousarray(np.asarray(im, dtype=np.float32).transpose(2, 0, 1)) / 127.5 - 1)


def load_image(data, size, min_size=MIN_SIZE, max_pixels=MAX_PIXELS):
    """Encoded image bytes (None: the file could not be read) -> (3, size, size) in [-1, 1]; raises BadSample."""
    if data is None:
        raise BadSample("unreadable file")
    if len(data) == 0:
        raise BadSample("zero-byte")
    try:
        # We check the header's pixel count against our own cap instead of setting PIL.Image.MAX_IMAGE_PIXELS, a
        # process-wide global; PIL's own bomb warning/error (above 89 / 179 Mpx) is turned into the same skip.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))  # reads the header only
            w, h = im.size
            if w * h > max_pixels:
                raise BadSample("decompression bomb")
            if min(w, h) < min_size:
                raise BadSample("too small")
            im.draft(im.mode, (size, size))  # JPEG: decode at 1/2, 1/4, 1/8 scale, still >= size (much faster)
            im = to_rgb(ImageOps.exif_transpose(im))
            # Shorter side -> size, then the center crop, done as one antialiased resize of the crop box.
            w, h = im.size
            s = min(w, h)
            im = im.resize((size, size), Image.BILINEAR, box=((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2))
    except BadSample:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadSample("decompression bomb") from None
    except Image.UnidentifiedImageError:
        raise BadSample("not an image") from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error ... on broken data
        raise BadSample("truncated" if "truncated" in str(e).lower() else "corrupt") from None
    return to_tensor(im)


def read_caption(raw, path, log=True):
    """Caption bytes or str -> one clean line. Missing or empty raises BadSample; non-UTF-8 is decoded with U+FFFD
    replacement characters and very long text is trimmed, both kept and counted. Whitespace runs collapse to one
    space (newlines in captions tokenize differently between SentencePiece and HF, see checkpoint-formats.md)."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            raw = raw.decode("utf-8", errors="replace")
            BAD.add("caption not utf-8 (kept)", path, log)
    if not isinstance(raw, str):
        raise BadSample("caption missing")
    text = " ".join(raw.split())
    if not text:
        raise BadSample("caption empty")
    if len(text) > MAX_CAPTION_CHARS:
        text = text[:MAX_CAPTION_CHARS]
        BAD.add("caption trimmed (kept)", path, log)
    return text


_LEFT_RIGHT = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def swap_left_right(caption):
    """'on the left' <-> 'on the right', case kept: a mirrored image needs a mirrored caption."""

    def swap(m):
        new = "right" if m.group(0).lower() == "left" else "left"
        return new.upper() if m.group(0).isupper() else new.capitalize() if m.group(0)[0].isupper() else new

    return _LEFT_RIGHT.sub(swap, caption)


def make_sample(path, data, caption, size, flip=False, log=True):
    """(image bytes, caption bytes/str/None) -> {"img", "caption"}, or None with the reason counted. Flip: with
    probability 1/2 the image is mirrored and left/right swapped in the caption (text in the image, and words
    like "sign that says STOP", still come out mirrored: that is why flip is off unless asked for)."""
    try:
        caption = read_caption(caption, path, log)  # first: cheap, and spares the decode when it fails
        img = load_image(data, size)
    except BadSample as e:
        BAD.add(e.reason, path, log)
        return None
    if flip and torch.rand(()) < 0.5:  # torch RNG: DataLoader seeds it differently in every worker
        img, caption = img.flip(-1), swap_left_right(caption)
    return {"img": img, "caption": caption}


def read_file(path):
    """File bytes, or None where it cannot be opened (load_image then counts an 'unreadable file')."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def article(word):
    return "an" if word[0].lower() in "aeiou" else "a"


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


@lru_cache(maxsize=64)
def _font(px):
    # PIL's bundled font (Aileron), scalable when Pillow has FreeType (the wheels do); nothing to download.
    return ImageFont.load_default(size=px)


def word_mask(word, center, width_px, width, height, ss=4):
    """Coverage (height, width) of `word` drawn bold, centred at `center`, about `width_px` wide."""
    ref = _font(100).getbbox(word, stroke_width=3)
    px = max(2, round(100 * width_px * ss / (ref[2] - ref[0])))
    canvas = Image.new("L", (width * ss, height * ss))
    ImageDraw.Draw(canvas).text((center[0] * ss, center[1] * ss), word, fill=255, font=_font(px), anchor="mm",
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
    A random tower cannot do this (its attention mixes all 64 positions alike): the left object's colour is 73%
    readable from the state of "left" through it, 100% through this one (`python bench.py toy`), and the DiT's
    connector, which has no positions of its own, can only bind a colour to an object through such states.
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


def toy_encoder(path="toy_encoder", size=112):
    """Write the toy SigLIP-2 to `path` if missing, then load it: a model with .vision, .text, .tokenizer.
    112 px with patch 14: an 8 x 8 grid, 64 latent tokens of 128 channels. At 224 px (256 tokens) the CPU demo's
    decoder and DiT cost 4x as much per image and do not fit its 15-minute budget. The vision tower is random; the
    text tower is built to give contextual states (contextual_text_tower)."""
    import rae  # here, not at the top: everything else in this file works without rae.py

    if not os.path.exists(path):
        # Write to a private folder, then rename: several ranks may start at once and must not see half a folder.
        tmp = f"{path}.tmp{os.getpid()}"
        rae.write_tiny_siglip2(tmp, toy_vocab(), vision=dict(TOY_VISION, image_size=size), text=TOY_TEXT, seed=0)
        model = contextual_text_tower(rae.load_siglip2(tmp))
        rae.save_safetensors(os.path.join(tmp, "model.safetensors"), rae.ours_to_hf(model.state_dict()),
                             metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json")) as f:
            config = json.load(f)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump({**config, "toy_text_window": list(TOY_WINDOW)}, f, indent=2)
        try:
            os.rename(tmp, path)
        except OSError:  # another rank won the race
            shutil.rmtree(tmp)
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    if config.get("toy_text_window") != list(TOY_WINDOW):
        raise ValueError(f"{path} holds an older toy encoder (its text tower has no context window): delete it")
    if config["vision_config"]["image_size"] != size:
        raise ValueError(f"{path} holds a toy encoder for {config['vision_config']['image_size']} px images, not "
                         f"{size}: delete it or pick a path")
    return rae.load_siglip2(path)


# ----------------------------------------------------------------------------- real data: folders
def list_images(root):
    """Relative paths of the image files under root in a fixed order (the same indices on every rank and run).
    Names starting with '.' are skipped: macOS '._x.jpg' metadata files are not images."""
    out = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs.sort()
        out += [os.path.relpath(os.path.join(folder, f), root) for f in sorted(files)
                if not f.startswith(".") and f.rsplit(".", 1)[-1].lower() in IMAGE_EXTS]
    return out


class ImageCaptionFolder(Dataset):
    """Images under root with captions: from root/captions.jsonl ({"file": path relative to root, "caption": ...}
    per line) when it exists, else from a sidecar .txt next to each image (cat.jpg -> cat.txt). An image with no
    caption is skipped ("caption missing"): condition dropout already teaches the unconditional model."""

    def __init__(self, root, size=224, flip=False, quiet=False):
        self.root, self.size, self.flip, self.log = root, size, flip, not quiet
        index = os.path.join(root, "captions.jsonl")
        self.jsonl = os.path.exists(index)
        self.items = self._read_jsonl(index) if self.jsonl else [(f, None) for f in list_images(root)]
        if not self.items:
            raise ValueError(f"no images with captions found under {root}")

    def _read_jsonl(self, index):
        items, bad = [], []
        with open(index, "rb") as f:
            for n, line in enumerate(f, 1):
                try:
                    entry = json.loads(line)
                    items.append((entry["file"], entry.get("caption")))
                except (ValueError, KeyError, TypeError):  # bad JSON, bad UTF-8, no "file", not an object
                    if line.strip():
                        bad.append(n)
        if bad and self.log:
            print(f"data: {index}: skipped {len(bad)} malformed lines (first: line {bad[0]})", file=sys.stderr)
        return items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        rel, caption = self.items[i]
        path = os.path.join(self.root, rel)
        if not self.jsonl:
            caption = read_file(os.path.splitext(path)[0] + ".txt")
        return make_sample(path, read_file(path), caption, self.size, self.flip, self.log)


class ClassFolders(Dataset):
    """ImageNet layout root/<class>/**/<image>. label = the class folder's index in sorted order (ImageNet's
    convention); caption = "a photo of a <name>". `names`: a json file mapping class index or folder name to a name
    or to a list ending with it (imagenet_class_index.json); else the folder name with '_' -> ' '. Only the part
    before the first comma is used ("goldfish, Carassius auratus" -> "goldfish")."""

    def __init__(self, root, size=224, names=None, flip=False, quiet=False):
        self.root, self.size, self.flip, self.log = root, size, flip, not quiet
        self.classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
        table = {}
        if names is not None:
            with open(names) as f:
                table = json.load(f)
        self.names = []
        for label, folder in enumerate(self.classes):
            name = table.get(str(label), table.get(folder, folder.replace("_", " ")))
            self.names.append((name[-1] if isinstance(name, list) else name).split(",")[0].strip())
        self.items = [(os.path.join(c, f), label) for label, c in enumerate(self.classes)
                      for f in list_images(os.path.join(root, c))]
        if not self.items:
            raise ValueError(f"no images in class folders under {root}")

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        rel, label = self.items[i]
        path = os.path.join(self.root, rel)
        name = self.names[label]
        sample = make_sample(path, read_file(path), f"a photo of {article(name)} {name}", self.size, self.flip,
                             self.log)
        return sample and {**sample, "label": label}


# ----------------------------------------------------------------------------- real data: WebDataset tar shards
def expand_shards(spec):
    """'shards/a-{0000..0099}.tar', a glob, 'a.tar,b.tar' or a list -> list of paths (brace ranges kept in order,
    globs sorted)."""
    out = []
    for s in spec.split(",") if isinstance(spec, str) else spec:
        m = re.search(r"\{(\d+)\.\.(\d+)\}", s)
        if m:
            out += [s[:m.start()] + str(i).zfill(len(m.group(1))) + s[m.end():]
                    for i in range(int(m.group(1)), int(m.group(2)) + 1)]
        elif any(c in s for c in "*?["):
            out += sorted(glob.glob(s))
        else:
            out.append(s)
    if not out:
        raise ValueError(f"no tar shards match {spec!r}")
    missing = [s for s in out if not os.path.isfile(s)]
    if missing:  # at start-up a typo is an error; a shard that goes missing later is counted and skipped
        raise ValueError(f"{missing[0]}: no such file ({len(missing)} of {len(out)} shards missing)")
    return out


def tar_samples(shards):
    """Stream (key, {ext: bytes}) per sample. WebDataset grouping: consecutive members sharing a key (the path up to
    the first dot of the file name) form a sample. A shard that cannot be opened or ends early yields what it had,
    then (shard, reason): the reason is counted where the sample would have been decoded, by exactly one reader."""
    for shard in shards:
        key, files, broken = None, {}, None
        try:
            tar = tarfile.open(shard, "r|*")  # streaming mode: no seeks, works on pipes and network mounts
        except (OSError, tarfile.TarError):
            yield shard, "unreadable shard"
            continue
        try:
            with tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    folder, name = os.path.split(member.name)
                    stem, _, ext = name.partition(".")
                    if os.path.join(folder, stem) != key:
                        if files:
                            yield f"{shard}:{key}", files
                        key, files = os.path.join(folder, stem), {}
                    files[ext.lower()] = tar.extractfile(member).read()
        except (OSError, EOFError, tarfile.TarError):  # ends mid-archive or corrupt (gzip errors included)
            broken = "truncated shard"
        if files:
            yield f"{shard}:{key}", files
        if broken:
            yield shard, broken


def shuffle_buffer(items, size, rng):
    """Streaming shuffle: hold `size` items and emit a random one as each new item arrives (WebDataset's method)."""
    buf = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = rng.integers(len(buf))
        yield buf[j]
        buf[j] = item
    rng.shuffle(buf)
    yield from buf


class TarShards(IterableDataset):
    """WebDataset-style .tar shards: per sample an image (jpg/png/webp/...) and a caption (.txt, or "caption" /
    "text" in .json). Each of the world_size x num_workers readers gets every n-th shard of a per-epoch shuffled
    order, or, with fewer shards than readers, every shard but every n-th sample: each sample once per epoch in
    total. Ranks may get unequal counts, so train by steps. Call set_epoch(e) before each epoch (new shard order and
    buffer shuffle; persistent_workers would keep the old one). shuffle_buffer=0: file order, for evaluation."""

    def __init__(self, shards, size=224, shuffle_buffer=1000, seed=0, rank=0, world_size=1, flip=False, quiet=None):
        self.shards, self.size, self.buffer, self.seed = expand_shards(shards), size, shuffle_buffer, seed
        self.rank, self.world_size, self.flip = rank, world_size, flip
        self.log = rank == 0 if quiet is None else not quiet
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        readers, me = self.world_size * workers, self.rank * workers + worker
        shards = list(self.shards)
        if self.buffer:  # the same permutation on every reader (same seed), so the shard split stays disjoint
            shards = [shards[j] for j in np.random.default_rng([self.seed, self.epoch]).permutation(len(shards))]
        if len(shards) >= readers:
            samples = tar_samples(shards[me::readers])
        else:
            samples = (s for n, s in enumerate(tar_samples(shards)) if n % readers == me)
        if self.buffer:
            samples = shuffle_buffer(samples, self.buffer, np.random.default_rng([self.seed, self.epoch, me]))
        for key, files in samples:  # decode only what leaves the buffer: the buffer holds encoded bytes
            yield self.decode(key, files)

    def decode(self, key, files):
        if isinstance(files, str):  # a broken shard, see tar_samples
            BAD.add(files, key, self.log)
            return None
        image = next((files[e] for e in files if e in IMAGE_EXTS), None)
        if image is None:
            BAD.add("image missing", key, self.log)
            return None
        caption = files.get("txt")
        if caption is None and "json" in files:
            try:
                meta = json.loads(files["json"])
                caption = meta.get("caption", meta.get("text"))
            except (ValueError, AttributeError):  # not JSON / not an object: counted as a missing caption
                pass
        return make_sample(key, image, caption, self.size, self.flip, self.log)


# ----------------------------------------------------------------------------- one entry point for --data
def build_dataset(spec, size=224, rank=0, world_size=1, seed=0, flip=False, limit=0):
    """'toy' or 'toy:SEED' -> ToyWorld (never flipped, see ToyWorld); a folder -> ImageCaptionFolder if it has a
    captions.jsonl or any .txt, else ClassFolders (with root/class_names.json if present); anything else -> tar
    shards. `seed` only orders the tar stream: the toy world's content is set by SEED in the spec. `limit` > 0
    keeps the first `limit` samples of a toy or folder dataset (a stream has no "first n" before it is read).
    Iterate with infinite_batches, which splits map-style datasets over ranks (TarShards split themselves)."""
    quiet = rank != 0
    if spec == "toy" or spec.startswith("toy:"):
        return ToyWorld(size, seed=int(spec[4:] or 0), **({"length": limit} if limit else {}))
    if os.path.isdir(spec):
        has_txt = any(f.endswith(".txt") for _, _, files in os.walk(spec) for f in files)
        if has_txt or os.path.exists(os.path.join(spec, "captions.jsonl")):
            ds = ImageCaptionFolder(spec, size, flip=flip, quiet=quiet)
        else:
            names = os.path.join(spec, "class_names.json")
            ds = ClassFolders(spec, size, names=names if os.path.exists(names) else None, flip=flip, quiet=quiet)
        ds.items = ds.items[:limit or None]
        return ds
    if limit:
        raise ValueError(f"{spec}: a sample limit works on toy and folder datasets, not on streamed tar shards")
    return TarShards(spec, size, seed=seed, rank=rank, world_size=world_size, flip=flip, quiet=quiet)


# ----------------------------------------------------------------------------- for the training loop: batches, grids
def _split(parts, n):
    """Collated batches -> (their first n samples as one batch, the rest). Refilling works on collated batches, not
    single samples, so each worker ships one tensor per batch (one shared-memory file, not one per image)."""
    if len(parts) == 1 and len(parts[0]["caption"]) == n:  # the usual case: nothing was bad, nothing to copy
        return parts[0], {"caption": []}
    whole = {k: torch.cat([p[k] for p in parts]) if torch.is_tensor(v) else [x for p in parts for x in p[k]]
             for k, v in parts[0].items()}
    return {k: v[:n] for k, v in whole.items()}, {k: v[n:] for k, v in whole.items()}


def infinite_batches(dataset, batch_size, rank=0, world_size=1, seed=0, workers=0, epoch=0, consumed=0):
    """Endless (epoch, consumed, batch): batch = collate of exactly batch_size good samples (bad ones are replaced
    by the next; their counts ride along in batch["bad"]). (epoch, consumed) is the position after the batch, in
    DataLoader batches of this rank's epoch: save it, pass it back, and a resumed run goes on from there (the few
    samples held over for refilling at that moment are skipped). Map-style datasets are shuffled with (seed, epoch)
    and each global batch is cut into contiguous rank slices, so every rank takes the same number of steps; TarShards split themselves and
    are fast-forwarded by reading. The random flip draws from torch's RNG (DataLoader seeds each worker from it)."""
    held, bad = [], BadSampleCounter()
    while True:
        if isinstance(dataset, IterableDataset):
            dataset.set_epoch(epoch)
            loader = DataLoader(dataset, batch_size, num_workers=workers, collate_fn=collate)
            loader = itertools.islice(loader, consumed, None)
        else:
            # global batch k is order[k*B:(k+1)*B] and rank r takes its r-th contiguous slice: so any number of
            # ranks sees the same global batches, sample for sample (equal shares also keep the ranks in step)
            # (the last, partial global batch is split the same way, in equal contiguous parts)
            order = np.random.default_rng([seed, epoch]).permutation(len(dataset))
            n = len(dataset) // world_size * world_size
            if n == 0:
                raise ValueError(f"{type(dataset).__name__} has {len(dataset)} samples, fewer than {world_size} ranks")
            head = n // (batch_size * world_size) * batch_size * world_size
            share = np.concatenate([order[:head].reshape(-1, world_size, batch_size)[:, rank].reshape(-1),
                                    order[head:n].reshape(world_size, -1)[rank]])
            loader = DataLoader(dataset, batch_size, sampler=share[consumed * batch_size:].tolist(),
                                num_workers=workers, collate_fn=collate)
        good_in_epoch = 0
        for part in loader:
            consumed += 1
            bad.update(part.pop("bad"))
            if part:  # {} when every sample of it was bad
                held.append(part)
                good_in_epoch += len(part["caption"])
            while sum(len(p["caption"]) for p in held) >= batch_size:
                batch, rest = _split(held, batch_size)
                held = [rest] if rest["caption"] else []
                batch["bad"] = bad.drain()
                yield epoch, consumed, batch
        if good_in_epoch == 0:
            raise RuntimeError(f"a whole epoch of {type(dataset).__name__} gave no usable sample ({bad})")
        epoch, consumed = epoch + 1, 0


def save_image_grid(path, img, captions=None, columns=None):
    """(B, 3, H, W) in [-1, 1] -> one PNG: a grid `columns` wide (default: square), each caption wrapped below its
    tile (up to three lines)."""
    b, _, h, w = img.shape
    columns = columns or math.ceil(math.sqrt(b))
    font = _font(max(8, w // 16))
    chars = max(8, int(w / (0.55 * font.size)))  # ~0.55 em per character in this font
    lines = [textwrap.wrap(c, chars)[:3] for c in captions] if captions else [[]] * b
    text_h = 3 * (font.size + 2) + 4 if captions else 0
    tiles = ((img.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    grid = Image.new("RGB", (columns * w, math.ceil(b / columns) * (h + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    for k, (tile, text) in enumerate(zip(tiles, lines)):
        x, y = k % columns * w, k // columns * (h + text_h)
        grid.paste(Image.fromarray(tile), (x, y))
        draw.multiline_text((x + 2, y + h + 2), "\n".join(text), fill=(0, 0, 0), font=font, spacing=2)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    grid.save(path)


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


def encode_latents(dataset, folder, encode, rank=0, world_size=1, batch_size=64, workers=0, dtype=torch.float32,
                   shard_size=CACHE_SHARD, progress=False):
    """Encode this rank's part of `dataset` into shards in `folder`. encode(batch) -> {name: (B, ...) tensor} runs the
    frozen towers on a collated batch; floating tensors are stored as `dtype`. Map-style datasets: rank r takes the
    r-th contiguous slice, so the shards, read in rank order, keep the dataset's order (and a cached run sees the
    same batches as an uncached one); TarShards: their own rank x worker split, in file order. Bad samples are
    skipped and counted. Returns {"shards": [{"file", "count"}], "bad": {reason: n}}: once every rank has
    returned, one process passes them all to write_manifest."""
    import rae  # here, not at the top: only the cache writer needs it (as toy_encoder)
    if isinstance(dataset, IterableDataset):
        dataset.buffer, dataset.epoch, sampler, total = 0, 0, None, None  # file order: the reader shuffles
    else:
        lo, hi = rank * len(dataset) // world_size, (rank + 1) * len(dataset) // world_size
        sampler, total = range(lo, hi), hi - lo
    loader = DataLoader(dataset, batch_size, sampler=sampler, num_workers=workers, collate_fn=collate)
    os.makedirs(folder, exist_ok=True)
    shards, bad, pending = [], BadSampleCounter(), []

    def write(part):  # one batch-like dict of n samples -> one shard file, under a temp name first
        name = f"shard_{rank:03d}_{len(shards):05d}.safetensors"
        path = os.path.join(folder, name)
        tensors = {k: v for k, v in part.items() if torch.is_tensor(v)}
        rae.save_safetensors(path, tensors, metadata={"captions": json.dumps(part["caption"])})  # atomic, 0644
        shards.append({"file": name, "count": len(part["caption"])})

    with tqdm(total=total, desc="encoding", unit="img", disable=None if progress else True, dynamic_ncols=True) as bar:
        for batch in loader:
            bad.update(batch.pop("bad"))
            if not batch:  # every sample of it was bad
                continue
            out = {k: v.to("cpu", dtype if v.is_floating_point() else v.dtype) for k, v in encode(batch).items()}
            pending.append({**out, "caption": batch["caption"]})
            while sum(len(p["caption"]) for p in pending) >= shard_size:
                part, rest = _split(pending, shard_size)
                write(part)
                pending = [rest] if rest["caption"] else []
            bar.update(len(batch["caption"]))
    if pending:
        write(_split(pending, sum(len(p["caption"]) for p in pending))[0])
    return {"shards": shards, "bad": bad.drain()}


def write_manifest(folder, fields, parts, classes=None):
    """After every rank's encode_latents: folder/manifest.json = `fields` (what the latents were encoded from) +
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
        parts = [encode_latents(dataset, folder, encode, rank, world_size, batch_size, workers, dtype,
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
    """The shards of a folder written by encode_latents + write_manifest, as a map-style dataset in encoding order:
    ds[i] = {"z": (N, C) float32, "text": (T, Dt) float32 (or "label": int), "caption": str}. It plugs into
    infinite_batches like any dataset (rank split, shuffling, resume position). `expect`: the manifest fields this
    run needs (latent kind, shapes, encoder, data spec, ...); a difference is a one-line ValueError naming the
    manifest and the field. No random flip: the latents are fixed."""

    def __init__(self, folder, expect=None):
        self.folder, path = folder, os.path.join(folder, MANIFEST)
        with open(path) as f:
            self.manifest = m = json.load(f)
        for key, want in {"version": CACHE_VERSION, **(expect or {})}.items():
            if m.get(key) != want:
                raise ValueError(f"{path}: field {key!r} is {m.get(key)!r} in the manifest but {want!r} in this run "
                                 f"(delete {folder} to encode again, or pick another cache folder)")
        self.files, counts = [s["file"] for s in m["shards"]], [s["count"] for s in m["shards"]]
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
