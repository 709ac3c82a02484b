"""Tests of hub.py (resumable, checked snapshot downloads) and of `python rae.py download`, against a local HTTP
server that serves a tiny SigLIP-2 snapshot as the hub does (Range requests, sha256 ETag). No network.

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
        cut, served, hashes, auth = {}, [], {}, []

        def do_GET(self):
            name = self.path.split("/resolve/main/")[-1]
            self.auth.append(self.headers.get("Authorization"))
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
