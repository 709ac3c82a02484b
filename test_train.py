"""End-to-end tests of train_decoder.py, train_dit.py and sample.py on the toy world (CPU, tiny, subprocesses).

Every run is a real `python` / `torchrun` process, as a user starts it. Determinism on CPU lets the resume tests
demand bitwise-equal weights: each process uses one thread (OMP_NUM_THREADS=1) so float sums run in one order.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

HERE = os.path.dirname(os.path.abspath(__file__))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
DEC = ["--preset", "toy", "--steps", "6", "--batch", "4", "--save-every", "2", "--log-every", "1", "--eval-every", "3",
       "--val-images", "4", "--disc-start", "2", "--gan-start", "3"]
DIT = ["--preset", "toy", "--steps", "4", "--batch", "8", "--save-every", "2", "--log-every", "1", "--sample-every", "0"]


def run(*args, check=True, **kw):
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


def interrupt(script, args, out, sig, after_lines):
    """Start a run, wait until metrics.jsonl has `after_lines` lines, send `sig`, wait for the exit."""
    p = subprocess.Popen([sys.executable, script, *args, "--out", out], cwd=HERE, env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    path = os.path.join(out, "metrics.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if os.path.exists(path) and sum(1 for _ in open(path)) >= after_lines:
            break
        time.sleep(0.05)
    p.send_signal(sig)
    return p.wait(timeout=300), p.stdout.read()


# ----------------------------------------------------------------------------- stage 1: the decoder
@pytest.fixture(scope="module")
def decoder_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dec"))
    r = run("train_decoder.py", *DEC, "--out", out)
    return out, r.stdout


def test_train_decoder_end_to_end(decoder_run):
    out, stdout = decoder_run
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[-1]["gan_weight"] > 0 and rows[-1]["d_loss"] > 0  # the GAN and the discriminator both ran
    assert "val_psnr" in rows[2] and os.path.exists(os.path.join(out, "recon_000003.png"))
    import rae
    dec = rae.load_decoder(os.path.join(out, "decoder.safetensors"))
    assert dec(torch.zeros(1, dec.cfg.num_tokens, dec.cfg.latent_dim)).shape == (1, 3, 224, 224)
    assert_same(load_file(os.path.join(out, "decoder.safetensors")), weights(out, "ema"))


def test_train_decoder_sigterm_then_resume_is_exact(decoder_run, tmp_path):
    out = str(tmp_path / "dec")
    code, log = interrupt("train_decoder.py", DEC, out, signal.SIGTERM, after_lines=2)
    assert code == 0 and "saved step" in log, log[-2000:]
    stopped = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["step"]
    assert 2 <= stopped < 6
    run("train_decoder.py", *DEC, "--out", out, "--resume")
    assert_same(weights(out, "decoder"), weights(decoder_run[0], "decoder"))
    assert_same(weights(out, "ema"), weights(decoder_run[0], "ema"))


def test_train_decoder_two_processes_gloo(tmp_path):
    out = str(tmp_path / "ddp")
    torchrun("train_decoder.py", *DEC[:2], "--steps", "2", "--batch", "4", "--save-every", "2", "--log-every", "1",
             "--eval-every", "2", "--val-images", "2", "--out", out)
    assert os.path.exists(os.path.join(out, "ckpt.pt")) and len(metrics(out)) == 2


# ----------------------------------------------------------------------------- stage 2: the DiT
@pytest.fixture(scope="module")
def dit_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dit"))
    run("train_dit.py", *DIT, "--out", out)
    return out


@pytest.mark.parametrize("mode", ["ddp", "fsdp", "accum"])
def test_train_dit_distributed_matches_one_process(dit_run, tmp_path, mode):
    """Global batch 8 as 2 ranks x 4 (DDP, FSDP2) or 2 micro-batches x 4 (accumulation): the same losses."""
    out = str(tmp_path / mode)
    if mode == "accum":
        run("train_dit.py", *DIT, "--grad-accum", "2", "--out", out)
    else:
        torchrun("train_dit.py", *DIT, "--out", out, *(["--fsdp"] if mode == "fsdp" else []))
    ref, got = metrics(dit_run), metrics(out)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    diffs = [abs(a["loss"] - b["loss"]) for a, b in zip(ref, got)]
    assert max(diffs) <= 1e-5, diffs
    final = weights(out)
    assert max((final[k] - v).abs().max().item() for k, v in weights(dit_run).items()) < 1e-4


def test_train_dit_kill_then_resume_is_exact(dit_run, tmp_path):
    out = str(tmp_path / "killed")
    code, _ = interrupt("train_dit.py", DIT, out, signal.SIGKILL, after_lines=3)  # kill -9 after a checkpoint
    assert code == -signal.SIGKILL
    run("train_dit.py", *DIT, "--out", out, "--resume")
    assert [r["step"] for r in metrics(out)][-1] == 4
    assert_same(weights(out), weights(dit_run))
    assert_same(weights(out, "ema"), weights(dit_run, "ema"))


def test_train_dit_fsdp_resume(dit_run, tmp_path):
    """FSDP2 saves a full state dict on rank 0 and every rank loads it back: 2 steps, then --resume to 4, lands on the
    one-process 4-step weights (the toy lr is still in its step-count-independent warmup here)."""
    out = str(tmp_path / "fsdp")
    torchrun("train_dit.py", *DIT, "--fsdp", "--steps", "2", "--out", out)
    torchrun("train_dit.py", *DIT, "--fsdp", "--out", out, "--resume")
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4]
    final = weights(out)
    assert max((final[k] - v).abs().max().item() for k, v in weights(dit_run).items()) < 1e-4


def test_train_dit_planner():
    r = run("train_dit.py", "--plan", "--model", "T2I-2.4B", "--gpus", "8", "--batch", "1024")
    assert "2.5" in r.stdout.split("B params")[0] and "FSDP2 x8" in r.stdout


# ----------------------------------------------------------------------------- sampling
def test_sample_writes_images_grid_latents_and_scores(decoder_run, dit_run, tmp_path):
    out = str(tmp_path / "samples")
    r = run("sample.py", "--ckpt", dit_run, "--decoder", os.path.join(decoder_run[0], "decoder.safetensors"),
            "--prompt", "a red circle on the left", "--prompt", "a blue square at the top", "--n", "2",
            "--steps", "3", "--cfg", "2", "--out", out, "--save-latents", "--score")
    from PIL import Image
    files = sorted(f for f in os.listdir(out) if f.endswith(".png"))
    assert files == ["0000.png", "0001.png", "0002.png", "0003.png", "grid.png"]
    assert Image.open(os.path.join(out, "0000.png")).size == (224, 224)
    assert Image.open(os.path.join(out, "grid.png")).size[0] == 2 * 224
    z = load_file(os.path.join(out, "latents.safetensors"))["z"]
    assert z.shape == (4, 256, 128) and torch.isfinite(z).all()
    assert r.stdout.count("siglip logit") == 4 and "toy GenEval" in r.stdout


@pytest.mark.parametrize("argv,message", [
    (["--prompt", "x"], "--ckpt is required"),
    (["--ckpt", "nowhere", "--steps", "-1"], "--steps, --n and --batch must be positive"),
])
def test_sample_cli_errors(argv, message):
    r = run("sample.py", *argv, check=False)
    assert r.returncode != 0 and message in r.stderr


def test_vae_latent_baseline_trains_and_samples(tmp_path):
    """--latent vae: FLUX VAE latents 2x2-patchified to 256 tokens x 64, alpha = 2 from the shape; sample.py decodes
    them with the same VAE (here a tiny random one in the BFL file format)."""
    import vae
    ae = str(tmp_path / "ae.safetensors")
    vae.write_tiny_flux_vae(ae)
    out = str(tmp_path / "vae_dit")
    r = run("train_dit.py", *DIT, "--steps", "2", "--latent", "vae", "--vae", ae, "--out", out)
    assert "latent vae 256 x 64, alpha 2.000" in r.stdout
    assert load_file(os.path.join(out, "dit.safetensors"))["x_embedder.weight"].shape[1] == 64
    run("sample.py", "--ckpt", out, "--prompt", "a red circle", "--steps", "2", "--out", str(tmp_path / "s"))
    from PIL import Image
    assert Image.open(tmp_path / "s" / "0000.png").size == (256, 256)
