"""Resumable, checked downloads of Hugging Face model snapshots with nothing but urllib.

Each file goes to FILE.part and becomes FILE only once its size (and, where the hub sends one, its sha256 ETag)
checks out; rerunning a command resumes from the .part with an HTTP Range request. HF_ENDPOINT and HF_TOKEN are
honoured. Imports nothing of this project: `python rae.py download` passes its config check in.

    python rae.py download google/siglip2-so400m-patch14-224 --out ckpt/siglip2-so400m-patch14-224
"""
import argparse
import hashlib
import json
import os
import re
import sys
import urllib.error
import urllib.request

from tqdm import tqdm


def _request(url, token, start=0):
    req = urllib.request.Request(url, headers={"User-Agent": "rae-t2i"})
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    if start:
        req.add_header("Range", f"bytes={start}-")
    return urllib.request.urlopen(req, timeout=60)


def download_file(url, dest, token=None, chunk=1 << 20):
    """Resumable download to `dest`: bytes go to `dest.part` and only a complete, size-checked (and, when the
    hub sends a sha256 ETag, hash-checked) file is renamed to `dest`. Rerunning resumes from the .part."""
    part = dest + ".part"
    start = os.path.getsize(part) if os.path.exists(part) else 0
    try:
        resp = _request(url, token, start)
    except urllib.error.HTTPError as e:
        if e.code == 416:  # the .part already holds every byte: nothing left to fetch
            resp = None
        else:
            raise
    sha = hashlib.sha256()
    if start and os.path.exists(part):  # the hash covers the bytes we already have
        with open(part, "rb") as f:
            for block in iter(lambda: f.read(chunk), b""):
                sha.update(block)
    if resp is None:
        total, etag = start, ""
    else:
        with resp:
            if resp.status == 200 and start:  # the server ignored Range: start over
                start, sha = 0, hashlib.sha256()
            length = int(resp.headers.get("Content-Length", -1))
            total = start + length if length >= 0 else None
            etag = (resp.headers.get("X-Linked-Etag") or resp.headers.get("ETag") or "").strip('"')
            with open(part, "ab" if start else "wb") as f, tqdm(total=total, initial=start, unit="B",
                                                                unit_scale=True, desc=os.path.basename(dest)) as bar:
                while block := resp.read(chunk):
                    f.write(block)
                    sha.update(block)
                    bar.update(len(block))
    got = os.path.getsize(part)
    if total is not None and got != total:
        raise IOError(f"{dest}: incomplete download ({got} of {total} bytes); run the command again to resume")
    if re.fullmatch(r"[0-9a-f]{64}", etag) and sha.hexdigest() != etag:
        os.remove(part)  # corrupt bytes cannot be resumed from
        raise IOError(f"{dest}: sha256 mismatch (got {sha.hexdigest()}, hub says {etag}); removed, run again")
    os.replace(part, dest)


def download(repo, out, revision="main", endpoint=None, token=None, check=None):
    """Fetch config.json, tokenizer.json and the weights (single file or shards) of a HF model repo. check(out), if
    given, runs once config.json is there: a wrong repo fails before gigabytes of weights."""
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    token = token or os.environ.get("HF_TOKEN")
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


def main(argv=None, check=None):
    p = argparse.ArgumentParser(prog="rae.py download", description="Download a HF model snapshot (config, tokenizer, "
                                "weights), resumably.")
    p.add_argument("repo", help="HF model id, e.g. google/siglip2-so400m-patch14-224")
    p.add_argument("--out", required=True, help="destination folder")
    p.add_argument("--revision", default="main", help="branch, tag or commit")
    a = p.parse_args(argv)
    try:
        print(download(a.repo, a.out, a.revision, check=check))
    except (urllib.error.URLError, IOError, ValueError) as e:
        sys.exit(f"download failed: {e}")


if __name__ == "__main__":
    main()
