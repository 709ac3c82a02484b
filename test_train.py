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
from PIL import Image
from safetensors.torch import load_file

import train_decoder
from conftest import DEC, DIT, ENV, HERE, assert_same, metrics, run, torchrun, weights


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


# ----------------------------------------------------------------------------- stage 1: the decoder (conftest's decoder_run)
def test_train_decoder_end_to_end(decoder_run):
    out, stdout = decoder_run
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[-1]["gan_weight"] > 0 and rows[-1]["d_loss"] > 0  # the GAN and the discriminator both ran
    assert "val_psnr" in rows[2] and os.path.exists(os.path.join(out, "recon_000003.png"))
    import rae
    dec = rae.load_decoder(os.path.join(out, "decoder.safetensors"))
    assert dec(torch.zeros(1, dec.cfg.num_tokens, dec.cfg.latent_dim)).shape == (1, 3, 112, 112)
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


# ----------------------------------------------------------------------------- stage 2: the DiT (conftest's dit_run)
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


# ----------------------------------------------------------------------------- stage 2 from a latent cache
def test_train_dit_cache_latents(tmp_path):
    """--cache-latents: 2 ranks encode disjoint slices into their own shards, rank 0 writes the manifest; training
    from the cache gives the uncached run's losses (the toy world is never flipped); a second run reuses the
    shards without encoding; a manifest that does not match the run is a one-line error naming file and field."""
    toy = [*DIT, "--steps", "2", "--max-samples", "40"]  # 40 samples: 5 global batches of 8
    cache = str(tmp_path / "cache")
    run("train_dit.py", *toy, "--out", str(tmp_path / "ref"))
    torchrun("train_dit.py", *toy, "--out", str(tmp_path / "a"), "--cache-latents", cache)
    manifest = json.load(open(os.path.join(cache, "manifest.json")))
    assert [s["count"] for s in manifest["shards"]] == [20, 20] and manifest["count"] == 40
    assert (manifest["latent"], manifest["N"], manifest["C"], manifest["text"]) == ("rae", 64, 128, [64, 128])
    assert sorted(os.listdir(cache)) == ["manifest.json", *(f"shard_00{r}_00000.safetensors" for r in (0, 1))]
    z = load_file(os.path.join(cache, "shard_001_00000.safetensors"))["z"]
    assert z.shape == (20, 64, 128) and z.dtype == torch.float32
    ref = [r["loss"] for r in metrics(tmp_path / "ref")]
    assert max(abs(a - b["loss"]) for a, b in zip(ref, metrics(tmp_path / "a"))) <= 1e-5
    mtimes = {f: os.stat(os.path.join(cache, f)).st_mtime_ns for f in os.listdir(cache)}
    r = run("train_dit.py", *toy, "--out", str(tmp_path / "b"), "--cache-latents", cache)
    assert "encoding the dataset" not in r.stdout and "training from 40 cached samples in 2 shards" in r.stdout, r.stdout
    assert "step 2 loss" in r.stdout  # the metrics lines still print where the tqdm bar is off (not a terminal)
    assert {f: os.stat(os.path.join(cache, f)).st_mtime_ns for f in os.listdir(cache)} == mtimes
    assert max(abs(a - b["loss"]) for a, b in zip(ref, metrics(tmp_path / "b"))) <= 1e-5
    manifest["N"] = 999
    json.dump(manifest, open(os.path.join(cache, "manifest.json"), "w"))
    r = run("train_dit.py", *toy, "--out", str(tmp_path / "c"), "--cache-latents", cache, check=False)
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1].startswith(  # one line, as a bad --resume ckpt
        f"ValueError: {cache}/manifest.json: field 'N' is 999 in the manifest but 64 in this run (delete {cache} ")


def test_connector_lr_param_groups():
    """--connector-lr: dit.py's text connector in its own param group, following the same warmup + cosine scaled
    to its own peak; without the flag one group, as before."""
    import dit
    import train_dit
    torch.manual_seed(0)
    model = dit.DiT(dit.DiTConfig(**dit.PRESETS["toy"]))
    args = train_dit.parse_args(["--preset", "toy", "--connector-lr", "6e-3"])  # toy: lr 2e-3, warmup 50, 1200 steps
    opt = train_dit.make_optimizer(model, args)
    names = {id(p): k for k, p in model.named_parameters()}
    trunk, conn = ({names[id(p)] for p in g["params"]} for g in opt.param_groups)
    assert [g["name"] for g in opt.param_groups] == ["dit", "connector"]
    assert {k.split(".")[0] for k in conn} == {"text_proj", "queries", "connector", "text_norm", "text_out", "text_pool"}
    assert trunk | conn == set(names.values()) and not trunk & conn
    lrs = []
    for step in (0, 24, 49, 50, 625, 1199):  # warmup, peak, cosine
        lrs.append(train_dit.set_lr(opt, step, args))
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([lrs[-1], 3 * lrs[-1]])
    assert lrs == pytest.approx([4e-5, 1e-3, 2e-3, 2e-3, 1e-3, 3.73e-9], rel=1e-2)
    one = train_dit.make_optimizer(model, train_dit.parse_args(["--preset", "toy"]))
    assert len(one.param_groups) == 1 and len(one.param_groups[0]["params"]) == len(names)
    with pytest.raises(SystemExit):
        train_dit.parse_args(["--preset", "toy", "--class-cond", "--connector-lr", "1e-4"])


# ----------------------------------------------------------------------------- sampling
def test_sample_writes_images_grid_latents_and_scores(decoder_run, dit_run, tmp_path):
    out = str(tmp_path / "samples")
    r = run("sample.py", "--ckpt", dit_run, "--decoder", os.path.join(decoder_run[0], "decoder.safetensors"),
            "--prompt", "a red circle on the left", "--prompt", "a blue square at the top", "--n", "2",
            "--steps", "3", "--guidance", "2", "--out", out, "--save-latents", "--score")
    from PIL import Image
    files = sorted(f for f in os.listdir(out) if f.endswith(".png"))
    assert files == ["0000.png", "0001.png", "0002.png", "0003.png", "grid.png"]
    assert Image.open(os.path.join(out, "0000.png")).size == (112, 112)
    assert Image.open(os.path.join(out, "grid.png")).size[0] == 2 * 112
    z = load_file(os.path.join(out, "latents.safetensors"))["z"]
    assert z.shape == (4, 64, 128) and torch.isfinite(z).all()
    assert r.stdout.count("siglip logit") == 4 and "toy GenEval" in r.stdout


def test_sample_image_depends_on_seed_and_index_not_on_batch(dit_run, tmp_path):
    """Each image draws its starting and its fresh stochastic-sampler noise from its own generator: --batch 3 and
    --batch 1 write the same latents (with one shared generator they differed by O(1)), another --seed other ones."""
    import sample

    def latents(*argv):
        out = str(tmp_path / "_".join(argv))
        sample.main(sample.parse_args(["--ckpt", dit_run, "--prompt", "a red circle", "--prompt", "a blue star",
                                       "--n", "2", "--steps", "3", "--sampler", "stochastic", "--save-latents",
                                       "--out", out, *argv]))
        return load_file(os.path.join(out, "latents.safetensors"))["z"]  # (4, 64, 128)

    z = latents("--batch", "3")
    assert torch.allclose(z, latents("--batch", "1"), atol=1e-5)  # up to float rounding of batched matmuls
    assert not torch.allclose(z, latents("--batch", "3", "--seed", "1"))


def test_generate_in_process_equals_sample_py(dit_run, tmp_path):
    """sample.generate called here on the dit_run export (dit.load_dit + toy.load_encoder) gives sample.py
    --save-latents' latents bit for bit, for the same prompts (--n repeats each), seed, steps and guidance flags.
    (The long-prompt note and a resume with a new --lr or --batch: test_reliability.py.)"""
    import ckpt
    import dit
    import sample
    import toy
    prompts = ["a blue square at the top", "a red circle on the left and a green star on the right"]
    flags = dict(seed=3, steps=3, guidance=2.0, guidance_interval=(0.0, 0.7))
    out = str(tmp_path / "s")
    run("sample.py", "--ckpt", dit_run, *sum((["--prompt", p] for p in prompts), []), "--n", "2",
        "--seed", "3", "--steps", "3", "--guidance", "2", "--guidance-interval", "0", "0.7",
        "--save-latents", "--out", out)
    model, meta = dit.load_dit(dit_run)
    siglip = toy.load_encoder(meta["encoder"], folder=os.path.join(HERE, "toy_encoder"))
    saved = load_file(os.path.join(out, "latents.safetensors"))["z"]
    repeated = [p for p in prompts for _ in range(2)]
    assert json.loads(ckpt.read_metadata(os.path.join(out, "latents.safetensors"))["prompts"]) == repeated
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocess (OMP_NUM_THREADS=1): the same float sums
    try:
        text = sample.text_conditions(siglip)
        z = sample.generate(model, text, repeated, float(meta["alpha"]), progress=False, **flags)
        unguided = sample.generate(model, text, repeated, float(meta["alpha"]), progress=False,
                                   **dict(flags, guidance=1.0))
    finally:
        torch.set_num_threads(threads)
    assert saved.shape == z.shape == (4, 64, 128) and torch.equal(z, saved)
    assert not torch.allclose(unguided, saved)  # the guidance flags reached the sampler


def test_rae_preset_and_flip(tmp_path, monkeypatch):
    """--preset rae sets RAE's class-conditional recipe (flags still win), --flip reaches the dataset reader, and a
    flip with fixed cached latents is refused."""
    import types
    import toy
    import train_dit
    args = train_dit.parse_args(["--preset", "rae", "--encoder", "e", "--data", "d", "--lr", "1e-4"])
    assert (args.class_cond, args.model, args.batch, args.schedule, args.warmup, args.hold, args.min_lr, args.clip,
            args.ema, args.flip, args.lr) == (True, "DiTDH-XL", 1024, "linear", 0, 50_040, 2e-5, 1.0, 0.9995, True, 1e-4)
    seen = {}
    monkeypatch.setattr(toy, "dataset", lambda *a, **k: seen.update(a=a, k=k) or "dataset")
    towers, run_ = types.SimpleNamespace(size=32), types.SimpleNamespace(rank=0, world=1)
    for flags, flip in (([], False), (["--flip"], True)):
        args = train_dit.parse_args(["--preset", "toy", "--data", "/data/imagenet", "--class-cond", *flags])
        assert train_dit.training_data(args, run_, towers) == "dataset"
        assert seen["a"] == ("/data/imagenet", 32, 0, 1, 0, flip, 0) and not seen["k"]  # spec ... seed, flip, limit
    r = run("train_dit.py", "--preset", "toy", "--flip", "--cache-latents", str(tmp_path / "cache"), check=False)
    assert r.returncode == 2 and "--flip" in r.stderr


def test_class_conditional_dit_trains_and_samples_with_autoguidance(decoder_run, dit_run, tmp_path):
    """train_dit.py --class-cond on class folders (the RAE paper's setting), then sample.py --class with --guide:
    a class-conditional export samples (it used to be fed text states), the guide being the model itself gives the
    unguided latents bit for bit, and prompts, out-of-range classes or a guide of another kind are refused."""
    import toy
    world = toy.ToyWorld(112, seed=0)
    for i in range(8):  # two classes of four toy images
        folder = tmp_path / "classes" / ("ab"[i % 2])
        folder.mkdir(parents=True, exist_ok=True)
        img = ((world[i]["img"] + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        Image.fromarray(img).save(folder / f"{i}.png")
    out = str(tmp_path / "dit")
    r = run("train_dit.py", *DIT, "--steps", "2", "--class-cond", "--data", str(tmp_path / "classes"), "--out", out)
    assert "DiT toy" in r.stdout and len(metrics(out)) == 2
    base = ["sample.py", "--ckpt", out, "--decoder", os.path.join(decoder_run[0], "decoder.safetensors"), "--steps", "2",
            "--class", "0", "--class", "1", "--n", "2", "--save-latents"]
    run(*base, "--guidance", "1", "--out", str(tmp_path / "plain"))  # unguided
    run(*base, "--guide", out, "--guidance", "3", "--out", str(tmp_path / "guided"))
    plain, guided = (load_file(str(tmp_path / d / "latents.safetensors"))["z"] for d in ("plain", "guided"))
    assert plain.shape == (4, 64, 128) and torch.equal(plain, guided)
    assert len([f for f in os.listdir(tmp_path / "plain") if f.endswith(".png")]) == 5  # 4 images + grid.png
    for extra, needle in ((["--prompt", "a red circle"], "class-conditional"), (["--class", "2"], "--class 2"),
                          (["--guide", dit_run], "the guide must")):  # dit_run is text-conditioned
        r = run(*base, *extra, "--out", str(tmp_path / "bad"), check=False)
        assert r.returncode != 0 and needle in r.stderr.strip().splitlines()[-1], r.stderr[-500:]


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


def test_noise_augment_sigma_per_sample():
    z = torch.zeros(2000, 64, 64)  # 4096 values per sample: its std estimates sigma to ~1%
    noisy = train_decoder.noise_augment(z, 0.8, generator=torch.Generator().manual_seed(0))
    sigma = noisy.std(dim=(1, 2))  # each sample's own sigma ~ U(0, 0.8)
    assert sigma.max() < 0.84 and sigma.min() < 0.01
    assert abs(sigma.mean().item() - 0.4) < 0.02 and abs(sigma.var().item() - 0.64 / 12) < 0.005
    assert train_decoder.noise_augment(z, 0.0) is z


def test_class_conditional_dit_on_dinov2_latents(tmp_path):
    """RAE's ImageNet setting on a tiny DINOv2 with registers (HF format): train_dit.py --class-cond --encoder DINOv2
    encodes 256-px images at 224 (16 x 16 patches, CLS and registers dropped) in fp32, exactly as rae.RAE with
    input_size 224 does; a DINOv2 encoder without --class-cond is refused (no text tower)."""
    import ckpt
    import rae
    import toy
    from test_encoders import hf_dinov2
    with torch.no_grad():
        hf_dinov2(str(tmp_path / "dino"))
    world = toy.ToyWorld(256, seed=0)
    for i in range(4):
        folder = tmp_path / "classes" / ("ab"[i % 2])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(((world[i]["img"] + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    out = str(tmp_path / "dit")
    base = ["train_dit.py", *DIT, "--steps", "1", "--batch", "4", "--data", str(tmp_path / "classes"),
            "--encoder", str(tmp_path / "dino"), "--out", out]
    run(*base, "--class-cond", "--cache-latents", str(tmp_path / "cache"))
    assert len(metrics(out)) == 1
    cfg = json.loads(ckpt.read_metadata(os.path.join(out, "dit.safetensors"))["dit_config"])
    assert (cfg["num_tokens"], cfg["in_channels"], cfg["cond"]) == (256, 32, "class")
    ae = rae.RAE(rae.load_dinov2(str(tmp_path / "dino")), input_size=224)
    cached = load_file(str(tmp_path / "cache" / "shard_000_00000.safetensors"))["z"].float()  # dataset order
    img = torch.stack([toy.dataset(str(tmp_path / "classes"), 256)[i]["img"] for i in range(len(cached))])
    torch.testing.assert_close(cached, ae.encode(img), atol=1e-5, rtol=1e-5)
    r = run(*base[:-1], str(tmp_path / "text"), check=False)
    assert r.returncode != 0 and "--class-cond" in r.stderr.strip().splitlines()[-1]
    run("sample.py", "--ckpt", out, "--class", "1", "--steps", "2", "--save-latents", "--out", str(tmp_path / "s"))
    assert load_file(str(tmp_path / "s" / "latents.safetensors"))["z"].shape == (1, 256, 32)


@pytest.mark.parametrize("flags, guidance", [([], "1.0"), (["--guidance", "2.5"], "2.5")])
def test_demo_trains_both_then_samples_the_held_out_prompts(tmp_path, monkeypatch, flags, guidance):
    """sample.py --demo (trainings replaced by finished stand-ins): both toy trainings are launched with --resume,
    then the 96 held-out prompts are sampled, scored and saved with the demo's flags (unguided unless --guidance)."""
    import sample
    monkeypatch.chdir(tmp_path)
    launched, sampled = [], []

    class Finished:  # a training process that has already succeeded
        def __init__(self, cmd, env=None, stdout=None, stderr=None):
            launched.append(cmd)
            if stdout is not None:
                stdout.write("done: held-out PSNR 99 dB\n")
                stdout.flush()

        def wait(self):
            return 0

    monkeypatch.setattr(sample.subprocess, "Popen", Finished)
    monkeypatch.setattr(sample, "main", lambda args: sampled.append(args) or {})
    sample.demo(sample.parse_args(["--demo", *flags]))
    assert [os.path.basename(c[1]) for c in launched] == ["train_decoder.py", "train_dit.py"]
    assert all("--resume" in c for c in launched)
    (args,) = sampled
    assert len(args.prompt) == 96 and args.score and args.save_latents and args.sampler == "stochastic"
    assert args.guidance == float(guidance) and args.ckpt == "runs/toy_dit"
