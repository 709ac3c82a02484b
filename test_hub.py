"""Tests of hub.py (resumable, checked snapshot downloads) and of `python rae.py download`, against a local HTTP
server that serves a tiny SigLIP-2 snapshot as the hub does (Range requests, sha256 ETag, the paged tree API
listing). No network.

    python -m pytest -q test_hub.py
"""
import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import urllib.parse

import pytest
import torch

import hub
import rae
import toy
from conftest import ENV, HERE

REPO = "google/siglip2-tiny"
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    """A tiny SigLIP-2 snapshot in the HF format (config.json, model.safetensors, tokenizer.json)."""
    path = str(tmp_path_factory.mktemp("hub") / "siglip")
    toy.write_tiny_siglip2(path, ["red", "circle"], vision=dict(SMALL, image_size=28, patch_size=14), text=SMALL)
    return path


@pytest.fixture(scope="module")
def sharded(snapshot, tmp_path_factory):
    """The same weights saved by transformers in shards (model.safetensors.index.json + files), with the tokenizer."""
    from transformers import SiglipModel
    path = str(tmp_path_factory.mktemp("hub") / "sharded")
    SiglipModel.from_pretrained(snapshot).save_pretrained(path, max_shard_size="20KB")
    shutil.copy(os.path.join(snapshot, "tokenizer.json"), path)
    assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    assert not os.path.exists(os.path.join(path, "model.safetensors"))
    return path


def handler(root):
    """A handler class serving /{repo}/resolve/main/{file} from `root` with Range support. `cut` drops the first GET
    of a file after a third of its bytes (a broken connection); `hashes` are sent as the sha256 ETag header, as the
    hub does for LFS files; `served` records (file, first byte) and `auth` the Authorization headers."""
    class Snapshot(http.server.BaseHTTPRequestHandler):
        cut, served, hashes, auth, page = {}, [], {}, [], None

        def do_GET(self):
            self.auth.append(self.headers.get("Authorization"))
            if self.path.startswith("/api/models/"):
                return self.listing()
            name = urllib.parse.unquote(self.path.split("/resolve/main/")[-1])
            path = os.path.join(self.root, name)
            if not os.path.isfile(path):
                self.send_error(404)
                return
            data = open(path, "rb").read()
            start = int(self.headers["Range"].split("=")[1].rstrip("-")) if self.headers.get("Range") else 0
            self.served.append((name, start))
            self.send_response(206 if start else 200)
            self.send_header("Content-Length", str(len(data) - start))
            if name in self.hashes:
                self.send_header("X-Linked-Etag", self.hashes[name])
            self.end_headers()
            body = data[start:]
            if self.cut.pop(name, None) is not None:
                self.wfile.write(body[: len(body) // 3])
                self.wfile.flush()
                self.connection.shutdown(2)
                return
            self.wfile.write(body)

        def listing(self):
            """The hub's tree API: every file with its size, LFS files (those in `hashes`) with their sha256, folders
            as entries of their own; `page` entries per response, the next page named in a Link header."""
            entries = []
            for folder, dirs, names in sorted(os.walk(self.root)):
                rel = lambda n: os.path.relpath(os.path.join(folder, n), self.root).replace(os.sep, "/")
                entries += [{"type": "directory", "oid": "0" * 40, "size": 0, "path": rel(d)} for d in sorted(dirs)]
                for n in sorted(names):
                    e = {"type": "file", "oid": "1" * 40, "size": os.path.getsize(os.path.join(folder, n)),
                         "path": rel(n)}
                    if rel(n) in self.hashes:
                        e["lfs"] = {"oid": self.hashes[rel(n)], "size": e["size"], "pointerSize": 134}
                    entries.append(e)
            base, _, query = self.path.partition("?")
            start = int(urllib.parse.parse_qs(query).get("cursor", ["0"])[0])
            end = start + self.page if self.page else len(entries)
            body = json.dumps(entries[start:end]).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            if end < len(entries):
                next_url = f"http://{self.headers['Host']}{base}?recursive=true&cursor={end}"
                self.send_header("Link", f'<{next_url}>; rel="next"')
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass
    Snapshot.root = root
    return Snapshot


@pytest.fixture
def server(snapshot):
    """(endpoint URL, handler class): serves `snapshot` until the test ends; set .root, .cut, .hashes to change it."""
    weights = os.path.join(snapshot, "model.safetensors")
    h = handler(snapshot)
    h.hashes = {"model.safetensors": hashlib.sha256(open(weights, "rb").read()).hexdigest()}
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), h)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_port}", h
    httpd.shutdown()
    httpd.server_close()


def same_files(a, b, names):
    for name in names:
        assert open(os.path.join(a, name), "rb").read() == open(os.path.join(b, name), "rb").read(), name


def same_vision(a, b):
    img = torch.rand(1, 3, 28, 28) * 2 - 1
    with torch.no_grad():
        assert (rae.load_siglip2(a).vision(img) - rae.load_siglip2(b).vision(img)).abs().max().item() == 0


def test_download_resumes_after_interruption(server, snapshot, tmp_path):
    url, h = server
    out = str(tmp_path / "snap")
    h.cut = {"model.safetensors": True}
    with pytest.raises(IOError, match="incomplete download"):
        hub.download(REPO, out, endpoint=url)
    assert not os.path.exists(os.path.join(out, "model.safetensors"))  # nothing that looks complete
    assert os.path.getsize(os.path.join(out, "model.safetensors.part")) > 0
    hub.download(REPO, out, endpoint=url)
    assert ("model.safetensors", os.path.getsize(os.path.join(snapshot, "model.safetensors")) // 3) in h.served
    same_files(out, snapshot, ["config.json", "tokenizer.json", "model.safetensors"])
    assert not os.path.exists(os.path.join(out, "model.safetensors.part"))
    same_vision(out, snapshot)


def test_download_rejects_hash_mismatch(server, tmp_path):
    url, h = server
    h.hashes["model.safetensors"] = "0" * 64
    with pytest.raises(IOError, match="sha256 mismatch") as e:
        hub.download(REPO, str(tmp_path / "a"), endpoint=url)
    assert os.path.join(str(tmp_path / "a"), "model.safetensors") in str(e.value)
    assert not os.path.exists(tmp_path / "a" / "model.safetensors")
    assert not os.path.exists(tmp_path / "a" / "model.safetensors.part")  # corrupt bytes are not resumed from


def test_download_sharded_snapshot(server, sharded, tmp_path):
    url, h = server
    h.root, h.hashes = sharded, {}
    out = str(tmp_path / "b")
    hub.download(REPO, out, endpoint=url)
    shards = sorted(n for n in os.listdir(sharded) if n.startswith("model-"))
    assert len(shards) > 1 and sorted(n for n in os.listdir(out) if n.startswith("model-")) == shards
    same_files(out, sharded, ["model.safetensors.index.json", *shards])
    same_vision(out, sharded)


def test_download_command_line(server, snapshot, tmp_path):
    """`python rae.py download REPO --out DIR` as a user runs it, with HF_ENDPOINT and HF_TOKEN honoured."""
    url, h = server
    out = str(tmp_path / "cli")
    r = subprocess.run([sys.executable, "rae.py", "download", REPO, "--out", out], cwd=HERE, capture_output=True,
                       text=True, env={**ENV, "HF_ENDPOINT": url, "HF_TOKEN": "hf_test"}, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == out
    assert {name for name, _ in h.served} == {"config.json", "tokenizer.json", "model.safetensors"}
    assert h.auth and all(a == "Bearer hf_test" for a in h.auth)
    same_files(out, snapshot, ["config.json", "tokenizer.json", "model.safetensors"])
    same_vision(out, snapshot)


def test_download_checks_config_before_the_weights(server, snapshot, tmp_path, monkeypatch):
    """rae.py passes its config check to hub.main: a repo that is not a fixed-resolution SigLIP-2 fails in one line
    naming its config.json before any weights are fetched."""
    url, h = server
    clip = str(tmp_path / "clip")
    shutil.copytree(snapshot, clip)
    cfg = json.load(open(os.path.join(clip, "config.json")))
    json.dump({**cfg, "model_type": "clip"}, open(os.path.join(clip, "config.json"), "w"))
    h.root = clip
    out = str(tmp_path / "out")
    monkeypatch.setenv("HF_ENDPOINT", url)
    with pytest.raises(SystemExit) as e:
        hub.main([REPO, "--out", out], check=rae.read_siglip_config)
    msg = str(e.value.code)
    assert msg.startswith("download failed: ") and "\n" not in msg
    assert os.path.join(out, "config.json") in msg and "unknown model_type 'clip'" in msg
    assert [name for name, _ in h.served] == ["config.json"]  # no tokenizer, no weights
    assert not os.path.exists(os.path.join(out, "model.safetensors"))


# ----------------------------------------------------------------------------- selective downloads (--include, presets)
COLLECTION = ["README.md", "decoders/dinov2/wReg_base/ViTXL_n08/model.pt", "decoders/dinov2/wReg_base/ViTXL_n05/model.pt",
              "stats/dinov2/wReg_base/imagenet1k/stat.pt", "DiTs/Dinov2/wReg_base/ImageNet256/DiTDH-XL/stage2_model.pt"]


@pytest.fixture
def collection(tmp_path):
    """(endpoint URL, handler class, root): a RAE-collections-like repo of random files, the .pt files as LFS
    (sha256 in the listing), listed two entries per page."""
    root = str(tmp_path / "repo")
    for i, name in enumerate(COLLECTION):
        os.makedirs(os.path.dirname(os.path.join(root, name)), exist_ok=True)
        open(os.path.join(root, name), "wb").write(os.urandom(3000 + 1000 * i))
    h = handler(root)
    h.hashes = {n: hashlib.sha256(open(os.path.join(root, n), "rb").read()).hexdigest() for n in COLLECTION
                if n.endswith(".pt")}
    h.page = 2
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), h)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_port}", h, root
    httpd.shutdown()
    httpd.server_close()


def fetched(h):
    return {name for name, _ in h.served}


def test_list_files_follows_pages(collection):
    url, h, root = collection
    files = hub.list_files("nyu-visionx/RAE-collections", endpoint=url)
    assert sorted(f["path"] for f in files) == sorted(COLLECTION)  # folders dropped, every page read
    by_path = {f["path"]: f for f in files}
    assert by_path["README.md"]["sha256"] is None and by_path["README.md"]["size"] == 3000
    assert by_path[COLLECTION[1]]["sha256"] == h.hashes[COLLECTION[1]]


def test_include_and_exclude_filters(collection, tmp_path):
    url, h, root = collection
    out = str(tmp_path / "models")
    hub.download_matching("nyu-visionx/RAE-collections", out, include=["decoders/dinov2/wReg_base/*", "stats/*"],
                          exclude=["*/ViTXL_n05/*"], endpoint=url)
    want = {COLLECTION[1], COLLECTION[3]}
    assert fetched(h) == want
    got = {os.path.relpath(os.path.join(d, n), out).replace(os.sep, "/") for d, _, ns in os.walk(out) for n in ns}
    assert got == want
    same_files(out, root, sorted(want))
    with pytest.raises(ValueError, match="no file matches"):
        hub.download_matching("nyu-visionx/RAE-collections", out, include=["decoders/mae/*"], endpoint=url)


def test_selective_download_resumes_a_partial_file(collection, tmp_path):
    url, h, root = collection
    out, name = str(tmp_path / "models"), COLLECTION[4]
    h.cut = {name: True}
    with pytest.raises(IOError, match="incomplete download"):
        hub.download_matching("r/c", out, include=["DiTs/*", "stats/*"], endpoint=url)
    assert os.path.exists(os.path.join(out, COLLECTION[3]))  # smaller file first, complete
    part = os.path.join(out, name) + ".part"
    assert 0 < os.path.getsize(part) < os.path.getsize(os.path.join(root, name))
    h.served.clear()
    hub.download_matching("r/c", out, include=["DiTs/*", "stats/*"], endpoint=url)
    assert h.served == [(name, os.path.getsize(os.path.join(root, name)) // 3)]  # Range; the complete one skipped
    same_files(out, root, [COLLECTION[3], name])
    assert not os.path.exists(part)


def test_corrupt_partial_file_is_detected(collection, tmp_path, monkeypatch):
    """A .part whose bytes are not the file's: the resumed download fails the listing's sha256, in one line naming
    the file, and the .part is removed so the next run starts clean."""
    url, h, root = collection
    out, name = str(tmp_path / "models"), COLLECTION[1]
    dest = os.path.join(out, *name.split("/"))
    os.makedirs(os.path.dirname(dest))
    open(dest + ".part", "wb").write(b"x" * 1000)
    monkeypatch.setenv("HF_ENDPOINT", url)
    with pytest.raises(SystemExit) as e:
        hub.main(["r/c", "--out", out, "--include", name])
    msg = str(e.value.code)
    assert msg.startswith(f"download failed: {dest}: sha256 mismatch") and "\n" not in msg
    assert h.served == [(name, 1000)] and not os.path.exists(dest) and not os.path.exists(dest + ".part")
    hub.main(["r/c", "--out", out, "--include", name])
    same_files(out, root, [name])


def test_presets_fetch_only_what_a_loader_needs(tmp_path, monkeypatch):
    """--preset scale-rae: config, tokenizer files, safetensors shards + index (not the .bin copy, not the rest);
    --preset siglip2-decoder: config.json and model.pt. Both through `python rae.py download` (no SigLIP check)."""
    scale = ["config.json", "generation_config.json", "tokenizer_config.json", "vocab.json", "merges.txt",
             "added_tokens.json", "special_tokens_map.json", "model-00001-of-00002.safetensors",
             "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    extra = ["README.md", "pytorch_model.bin", "pytorch_model.bin.index.json", "images/teaser.png", "training_args.bin"]
    root = str(tmp_path / "repo")
    for name in scale + extra + ["model.pt"]:
        os.makedirs(os.path.dirname(os.path.join(root, name)), exist_ok=True)
        open(os.path.join(root, name), "wb").write(os.urandom(100))
    h = handler(root)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), h)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{httpd.server_port}")
        hub.main(["--preset", "scale-rae", "--out", str(tmp_path / "scale")])
        assert fetched(h) == set(scale)
        h.served.clear()
        r = subprocess.run([sys.executable, "rae.py", "download", "--preset", "siglip2-decoder", "--out",
                            str(tmp_path / "dec")], cwd=HERE, capture_output=True, text=True, timeout=120,
                           env={**ENV, "HF_ENDPOINT": f"http://127.0.0.1:{httpd.server_port}"})
        assert r.returncode == 0, r.stderr
        assert fetched(h) == {"config.json", "model.pt"}
        assert sorted(os.listdir(tmp_path / "dec")) == ["config.json", "model.pt"]
    finally:
        httpd.shutdown()
        httpd.server_close()
