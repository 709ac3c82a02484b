"""Fixtures and helpers that several test files share: running the scripts as a user does, the two tiny training
runs most end-to-end tests start from, and one-line-error checks.

Every script run is a real `python` / `torchrun` process with one thread (OMP_NUM_THREADS=1), so float sums run in
one order and runs can be compared bit for bit.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
# the tiny toy runs: 6 decoder steps (the GAN and the discriminator start inside them), 4 DiT steps
DEC = ["--preset", "toy", "--steps", "6", "--batch", "4", "--save-every", "2", "--log-every", "1", "--eval-every", "3",
       "--val-images", "4", "--disc-start", "2", "--gan-start", "3"]
DIT = ["--preset", "toy", "--steps", "4", "--batch", "8", "--save-every", "2", "--log-every", "1", "--sample-every", "0"]


def run(*args, check=True, **kw):
    """`python ARGS` in the repository, as a user runs it; the CompletedProcess (stdout, stderr as text)."""
    return subprocess.run([sys.executable, *args], cwd=HERE, env=ENV, check=check, capture_output=True, text=True, **kw)


def torchrun(*args):
    return run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args)


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def weights(out, key="model"):
    return torch.load(os.path.join(out, "ckpt.pt"), map_location="cpu", weights_only=True)[key]


def assert_same(a, b):
    assert a.keys() == b.keys()
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[0]}"


def one_line_naming(e, *needles):
    """The error of pytest.raises context `e` is one line that contains every needle (a file, a key, a field)."""
    msg = str(e.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)


@pytest.fixture(scope="session")
def decoder_run(tmp_path_factory):
    """train_decoder.py on the toy preset, 6 steps: (out folder, stdout)."""
    out = str(tmp_path_factory.mktemp("dec"))
    r = run("train_decoder.py", *DEC, "--out", out)
    return out, r.stdout


@pytest.fixture(scope="session")
def dit_run(tmp_path_factory):
    """train_dit.py on the toy preset, 4 steps: the out folder."""
    out = str(tmp_path_factory.mktemp("dit"))
    run("train_dit.py", *DIT, "--out", out)
    return out


@pytest.fixture(scope="session")
def toy_encoder():
    """The toy SigLIP-2 the scripts use (written to ./toy_encoder on first use), loaded in this process."""
    import toy
    return toy.load_encoder(folder=os.path.join(HERE, "toy_encoder"))
