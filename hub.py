"""Resumable, checked downloads of Hugging Face model snapshots with nothing but urllib.

Each file goes to FILE.part and becomes FILE only once its size (and, where the hub gives one, its sha256) checks
out; rerunning a command resumes from the .part with an HTTP Range request. HF_ENDPOINT and HF_TOKEN are honoured.
Imports nothing of this project: `python rae.py download` passes its config check in.

Two modes. Without patterns: config.json (checked), tokenizer.json and the weights of a SigLIP-2-style repo.
With --include / --exclude (fnmatch on repo paths, repeatable) or a --preset: the file list comes from the hub API
(`/api/models/REPO/tree/REV?recursive=true`, which gives every file's size and the sha256 of LFS files) and only the
matching files are fetched, into OUT/<repo path>; files already complete (right size) are skipped.

    python rae.py download google/siglip2-so400m-patch14-224 --out ckpt/siglip2-so400m-patch14-224
    python rae.py download nyu-visionx/RAE-collections --out models --include 'decoders/dinov2/wReg_base/ViTXL_n08/*'
    python rae.py download --preset scale-rae --out ckpt/scale-rae          # PRESETS below lists the files
    python rae.py download --preset siglip2-decoder --out ckpt/siglip2_decoder
"""
import argparse
import hashlib
import json
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from fnmatch import fnmatchcase

from tqdm import tqdm

# name -> (repo, include patterns): the files a loader needs, nothing else (paths as the official configs name them)
PRESETS = {
    # Scale-RAE LLM + DiT head: config, slow/fast tokenizer files, weights (+ shard index); safetensors preferred
    "scale-rae": ("nyu-visionx/Scale-RAE-Qwen1.5B_DiT2.4B",
                  ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
                   "merges.txt", "special_tokens_map.json", "added_tokens.json", "*.safetensors",
                   "model.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json"]),
    # Scale-RAE's SigLIP-2 pixel decoder: a ViT-MAE-style config.json + a plain GeneralDecoder state dict
    "siglip2-decoder": ("nyu-visionx/siglip2_decoder", ["config.json", "model.pt"]),
    # RAE, DINOv2-B at 256 px: decoder (tau 0.8), latent stats, DiT^DH-XL and its AutoGuidance guide
    "rae-dinov2-b": ("nyu-visionx/RAE-collections",
                     ["decoders/dinov2/wReg_base/ViTXL_n08/*", "stats/dinov2/wReg_base/imagenet1k/*",
                      "DiTs/Dinov2/wReg_base/ImageNet256/DiTDH-XL/*",
                      "DiTs/Dinov2/wReg_base/ImageNet256/DiTDH-S_ep14/*"]),
}


def _request(url, token, start=0):
    req = urllib.request.Request(url, headers={"User-Agent": "rae-t2i"})
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    if start:
        req.add_header("Range", f"bytes={start}-")
    return urllib.request.urlopen(req, timeout=60)


def download_file(url, dest, token=None, chunk=1 << 20, size=None, sha256=None):
    """Resumable download to `dest`: bytes go to `dest.part` and only a complete, size-checked (and, when known,
    sha256-checked) file is renamed to `dest`. Rerunning resumes from the .part. `size` and `sha256` come from the hub
    listing; without them the Content-Length and a sha256 ETag (X-Linked-Etag, sent for LFS files) are used."""
    part = dest + ".part"
    start = os.path.getsize(part) if os.path.exists(part) else 0
    if size is not None and start > size:  # more bytes than the file has: not a prefix of it
        os.remove(part)
        start = 0
    resp = None
    if size is None or start < size:
        try:
            resp = _request(url, token, start)
        except urllib.error.HTTPError as e:
            if e.code != 416:  # 416: the .part already holds every byte, nothing left to fetch
                raise
    sha = hashlib.sha256()
    if start and os.path.exists(part):  # the hash covers the bytes we already have
        with open(part, "rb") as f:
            for block in iter(lambda: f.read(chunk), b""):
                sha.update(block)
    total, etag = (start if size is None else size), ""
    if resp is not None:
        with resp:
            if resp.status == 200 and start:  # the server ignored Range: start over
                start, sha = 0, hashlib.sha256()
            length = int(resp.headers.get("Content-Length", -1))
            total = size if size is not None else (start + length if length >= 0 else None)
            etag = (resp.headers.get("X-Linked-Etag") or resp.headers.get("ETag") or "").strip('"')
            with open(part, "ab" if start else "wb") as f, tqdm(total=total, initial=start, unit="B",
                                                                unit_scale=True, desc=os.path.basename(dest)) as bar:
                while block := resp.read(chunk):
                    f.write(block)
                    sha.update(block)
                    bar.update(len(block))
    want = sha256 or (etag if re.fullmatch(r"[0-9a-f]{64}", etag) else None)
    if not os.path.exists(part):  # an empty file: nothing was requested
        open(part, "wb").close()
    got = os.path.getsize(part)
    if total is not None and got < total:
        raise IOError(f"{dest}: incomplete download ({got} of {total} bytes); run the command again to resume")
    bad = (f"size mismatch ({got} bytes, hub says {total})" if total is not None and got > total else
           f"sha256 mismatch (got {sha.hexdigest()}, hub says {want})" if want and sha.hexdigest() != want else None)
    if bad:
        os.remove(part)  # corrupt bytes cannot be resumed from
        raise IOError(f"{dest}: {bad}; removed, run the command again")
    os.replace(part, dest)


def download(repo, out, revision="main", endpoint=None, token=None, check=None):
    """Fetch config.json, tokenizer.json and the weights (single file or shards) of a HF model repo. check(out), if
    given, runs once config.json is there: a wrong repo fails before gigabytes of weights."""
    endpoint, token = _endpoint_token(endpoint, token)
    os.makedirs(out, exist_ok=True)
    url = lambda name: f"{endpoint}/{repo}/resolve/{revision}/{name}"
    def get(name):
        dest = os.path.join(out, name)
        if not os.path.exists(dest):
            download_file(url(name), dest, token)
        return dest
    get("config.json")
    if check is not None:
        check(out)
    get("tokenizer.json")
    try:
        get("model.safetensors")
    except urllib.error.HTTPError as e:
        if e.code != 404:
            raise
        with open(get("model.safetensors.index.json")) as f:
            for shard in sorted(set(json.load(f)["weight_map"].values())):
                get(shard)
    return out


def _endpoint_token(endpoint, token):
    return ((endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/"),
            token or os.environ.get("HF_TOKEN"))


def list_files(repo, revision="main", endpoint=None, token=None):
    """Every file of a HF model repo as {"path", "size", "sha256"} (sha256 only for LFS files; git blobs have a
    sha1 oid we do not check), from the tree API. Pages are followed through the `Link: <...>; rel="next"` header."""
    endpoint, token = _endpoint_token(endpoint, token)
    url = f"{endpoint}/api/models/{repo}/tree/{urllib.parse.quote(revision, safe='')}?recursive=true"
    files = []
    while url:
        with _request(url, token) as resp:
            entries = json.load(resp)
            link = re.search(r'<([^>]+)>;\s*rel="next"', resp.headers.get("Link") or "")
        for e in entries:
            if e.get("type") == "file":
                files.append({"path": e["path"], "size": e["size"], "sha256": (e.get("lfs") or {}).get("oid")})
        url = link and link.group(1)
    return files


def select(files, include=(), exclude=()):
    """The files whose repo path matches some `include` pattern (all when none) and no `exclude` pattern; fnmatch,
    case-sensitive, `*` also crosses `/`."""
    hit = lambda path, patterns: any(fnmatchcase(path, p) for p in patterns)
    return [f for f in files if (not include or hit(f["path"], include)) and not hit(f["path"], exclude)]


def download_matching(repo, out, include=(), exclude=(), revision="main", endpoint=None, token=None,
                      prefer_safetensors=False):
    """Fetch the files of `repo` that `select` keeps into out/<repo path>, smallest first (configs before weights),
    each checked against the listing's size and sha256. Complete files (right size) are skipped, so a rerun
    resumes where it stopped. prefer_safetensors drops *.bin weights when *.safetensors ones are selected too."""
    endpoint, token = _endpoint_token(endpoint, token)
    files = select(list_files(repo, revision, endpoint, token), include, exclude)
    if prefer_safetensors and any(f["path"].endswith(".safetensors") for f in files):
        files = [f for f in files if not f["path"].endswith((".bin", ".bin.index.json"))]
    if not files:
        raise ValueError(f"{repo}@{revision}: no file matches --include {list(include)} --exclude {list(exclude)}")
    for f in sorted(files, key=lambda f: (f["size"], f["path"])):
        dest = os.path.join(out, *f["path"].split("/"))
        if os.path.exists(dest):
            if os.path.getsize(dest) != f["size"]:
                raise IOError(f"{dest}: {os.path.getsize(dest)} bytes, hub says {f['size']}; delete it and run again")
            continue
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        url = f"{endpoint}/{repo}/resolve/{urllib.parse.quote(revision, safe='')}/{urllib.parse.quote(f['path'])}"
        download_file(url, dest, token, size=f["size"], sha256=f["sha256"])
    return out


def main(argv=None, check=None):
    p = argparse.ArgumentParser(prog="rae.py download", description="Download a HF model snapshot, resumably: "
                                "config, tokenizer and weights, or the files matching --include / a --preset.")
    p.add_argument("repo", nargs="?", help="HF model id, e.g. google/siglip2-so400m-patch14-224 (a preset sets it)")
    p.add_argument("--out", required=True, help="destination folder")
    p.add_argument("--revision", default="main", help="branch, tag or commit")
    p.add_argument("--include", action="append", default=[], metavar="PATTERN",
                   help="fetch only repo paths matching this fnmatch pattern (repeatable), e.g. 'decoders/dinov2/*'")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="skip repo paths matching this fnmatch pattern (repeatable)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="a named repo + include list (hub.PRESETS)")
    a = p.parse_args(argv)
    if a.preset:
        repo, include = PRESETS[a.preset]
        if a.repo not in (None, repo):
            p.error(f"--preset {a.preset} is {repo}, not {a.repo}")
        a.repo, a.include = repo, include + a.include
    if a.repo is None:
        p.error("give a repo or a --preset")
    try:
        if a.include or a.exclude:  # selective mode: any file layout, so no SigLIP config check
            print(download_matching(a.repo, a.out, a.include, a.exclude, a.revision, prefer_safetensors=bool(a.preset)))
        else:
            print(download(a.repo, a.out, a.revision, check=check))
    except (urllib.error.URLError, IOError, ValueError) as e:
        sys.exit(f"download failed: {e}")


if __name__ == "__main__":
    main()
