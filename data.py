"""Data: readers for the datasets users bring, batches for the training loop, and what to do with a bad file.

Every reader yields dicts {"img": (3, H, W) float in [-1, 1], "caption": str} (+ "label" for class folders).
Preprocessing: RGB (alpha composited on white), EXIF orientation, shorter side resized (bilinear, antialiased) and
center-cropped to `size`, optional random horizontal flip (which also swaps "left" and "right" in the caption).
- ImageCaptionFolder (sidecar .txt or captions.jsonl), ClassFolders (ImageNet layout), TarShards (WebDataset .tar,
  streamed, split over ranks x workers); build_dataset(spec, size) picks one from a --data string.
- infinite_batches: the resumable stream of fixed-size batches both training scripts read; save_image_grid.
- A bad file never stops a run: the reader returns None and counts the reason, `collate` drops the None and
  hands the counts to the training loop in batch["bad"], which sums them with a BadSampleCounter and prints it.
The toy world lives in toy.py and the latent cache in latents.py; this file imports no model code.
"""
import collections
import glob
import io
import itertools
import json
import math
import os
import re
import sys
import tarfile
import textwrap
import warnings
from functools import lru_cache

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

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
    space (newlines in captions tokenize differently in SentencePiece and in HF tokenizers)."""
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


@lru_cache(maxsize=64)
def font(px):
    """PIL's bundled font (Aileron), scalable when Pillow has FreeType (the wheels do); nothing to download."""
    return ImageFont.load_default(size=px)


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
    """A folder -> ImageCaptionFolder if it has a captions.jsonl or any .txt, else ClassFolders (with
    root/class_names.json if present); anything else -> tar shards. `seed` only orders the tar stream. `limit` > 0
    keeps the first `limit` samples of a folder dataset (a stream has no "first n" before it is read). Iterate with
    infinite_batches, which splits map-style datasets over ranks (TarShards split themselves). (The toy world:
    toy.dataset, which takes 'toy' and passes any other spec here.)"""
    quiet = rank != 0
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
def split_batches(parts, n):
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
                batch, rest = split_batches(held, batch_size)
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
    face = font(max(8, w // 16))
    chars = max(8, int(w / (0.55 * face.size)))  # ~0.55 em per character in this font
    lines = [textwrap.wrap(c, chars)[:3] for c in captions] if captions else [[]] * b
    text_h = 3 * (face.size + 2) + 4 if captions else 0
    tiles = ((img.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    grid = Image.new("RGB", (columns * w, math.ceil(b / columns) * (h + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    for k, (tile, text) in enumerate(zip(tiles, lines)):
        x, y = k % columns * w, k // columns * (h + text_h)
        grid.paste(Image.fromarray(tile), (x, y))
        draw.multiline_text((x + 2, y + h + 2), "\n".join(text), fill=(0, 0, 0), font=face, spacing=2)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    grid.save(path)


# ----------------------------------------------------------------------------- smoke test
if __name__ == "__main__":  # python data.py FOLDER_OR_SHARDS: read a few batches, print what was skipped
    ds = build_dataset(sys.argv[1], size=224)
    for _, _, batch in itertools.islice(infinite_batches(ds, 8), 2):
        print(batch["img"].shape, batch["caption"][:2], batch["bad"])
