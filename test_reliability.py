"""Reliability of the whole pipeline: interrupted runs, bad files and bad inputs (CPU, tiny, seconds each).

- kill -9, SIGTERM and SIGUSR1 at seeded random points, then --resume: bit for bit the uninterrupted run.
- A checkpoint write that fails halfway (a full disk) keeps the previous ckpt.pt, leaves no .tmp behind, and
  --resume is still exact.
- A NaN or inf loss, or a non-finite gradient norm, stops the run with one line before the optimizer step, and what
  is on disk is the last good step.
- --resume refuses a bad ckpt.pt, another model, a changed --batch / --grad-accum, naming every problem in one
  line before any step; a changed --lr / --steps is allowed and printed.
- Every loader refuses truncated files, wrong shapes, missing and extra keys, wrong dtypes and mismatched configs
  with one line naming the file and the key. Cases test_rae.py and test_vae.py already cover are not repeated:
  the FLUX VAE has all six there, SigLIP-2 all but the config ones.
- CLI misuse, a stale toy encoder folder, a corrupt latent cache manifest give a clear error or a documented
  behaviour.
Runs that depend on the process (signals, torchrun) are subprocesses. The others call main(parse_args([...])) here,
on one thread like the subprocesses (OMP_NUM_THREADS=1), so that both sum floats in the same order and bitwise
comparisons between them hold.
"""
import ast
import errno
import io
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import ckpt
import dit
import rae
import sample
import tokenizer
import toy
import train_decoder
import train_dit
import training
from conftest import DEC, DIT, ENV, HERE, metrics, one_line_naming, run

SCRIPTS = {"train_decoder.py": (train_decoder, DEC, 6), "train_dit.py": (train_dit, DIT, 4)}  # module, args, steps


def read_ckpt(out):
    return torch.load(os.path.join(out, "ckpt.pt"), map_location="cpu", weights_only=True)


def ckpt_step(out):
    return read_ckpt(out)["step"] if os.path.exists(os.path.join(out, "ckpt.pt")) else 0


def assert_same_tree(a, b, where="ckpt"):
    """Nested dicts / lists of tensors and primitives (a whole checkpoint, optimizers included) equal bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_tree(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_run(out, reference):
    """Everything a checkpoint holds but its args (--out and --resume differ): weights, EMA, optimizers, position."""
    got, want = read_ckpt(out), read_ckpt(reference)
    got.pop("args"), want.pop("args")
    assert_same_tree(got, want)


def reference(script, request):
    return request.getfixturevalue("decoder_run")[0] if script == "train_decoder.py" else request.getfixturevalue("dit_run")


@pytest.fixture
def in_process(monkeypatch):
    """main() in this process as in a subprocess: one thread, the repository as cwd (the toy encoder's folder), grad
    on, and afterwards the SIGTERM / SIGUSR1 handlers that main() installs taken away again."""
    threads, handlers = torch.get_num_threads(), {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    monkeypatch.chdir(HERE)
    torch.set_num_threads(1)
    with torch.enable_grad():
        yield
    torch.set_num_threads(threads)
    for s, h in handlers.items():
        signal.signal(s, h)


# ----------------------------------------------------------------------------- interrupted runs
def signal_run(script, args, out, sig, after_lines, delay):
    """Start `script ... --resume`, wait until it has logged `after_lines` new metrics lines, sleep `delay` s, send
    `sig`; return (exit code, output)."""
    path = os.path.join(out, "metrics.jsonl")
    lines = lambda: sum(1 for _ in open(path)) if os.path.exists(path) else 0
    target = lines() + after_lines
    p = subprocess.Popen([sys.executable, script, *args, "--out", out, "--resume"], cwd=HERE, env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while lines() < target and p.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(delay)
    assert p.poll() is None, f"the run ended before its {signal.Signals(sig).name}: {p.stdout.read()[-2000:]}"
    p.send_signal(sig)
    return p.wait(timeout=120), p.stdout.read()


INTERRUPTIONS = {"train_decoder.py": [signal.SIGKILL, signal.SIGUSR1, signal.SIGKILL],
                 "train_dit.py": [signal.SIGKILL, signal.SIGTERM, signal.SIGKILL]}


@pytest.mark.parametrize("script", INTERRUPTIONS)
def test_interrupted_anywhere_then_resumed_is_exact(script, request, tmp_path, in_process):
    """kill -9, a graceful stop (SIGUSR1 / SIGTERM: save, exit 0), kill -9 again, each at a point drawn with a fixed
    seed, then --resume until done: the final checkpoint (model, EMA, optimizer state, data position) equals the
    uninterrupted run's bit for bit. A kill may land before the first checkpoint, mid-step or during a save."""
    module, args, steps = SCRIPTS[script]
    out, rng = str(tmp_path / "run"), random.Random(9)
    for n, sig in enumerate(INTERRUPTIONS[script]):
        start = ckpt_step(out)
        # After 1 or more logged steps (the handlers are installed). The last one leaves at least one step to run, so
        # it lands before the end; the others leave three, so the checkpoint stays at or below steps - 2 and there
        # is room for the rest (a graceful stop may finish one more step before it saves).
        lines = rng.randint(1, steps - start - (1 if n == len(INTERRUPTIONS[script]) - 1 else 3))
        code, log = signal_run(script, args, out, sig, lines, delay=rng.uniform(0, 0.15))
        if sig == signal.SIGKILL:
            assert code == -signal.SIGKILL, log[-2000:]
            assert ckpt_step(out) >= start  # a kill never takes a checkpoint back
        else:
            assert code == 0 and f"stop signal: saved step {ckpt_step(out)}" in log, log[-2000:]
            assert start + lines <= ckpt_step(out) < steps
    module.main(module.parse_args([*args, "--out", out, "--resume"]))  # the last leg here: same code, same sums
    assert metrics(out)[-1]["step"] == steps
    assert_same_run(out, reference(script, request))


@pytest.mark.parametrize("script", SCRIPTS)
def test_checkpoint_write_that_fails_halfway_keeps_the_previous(script, request, tmp_path, monkeypatch, in_process):
    """The disk fills up while the step-4 checkpoint is written: half of it reaches ckpt.pt.tmp, then OSError. The
    step-2 ckpt.pt is untouched, no ckpt.pt.tmp is left behind, and --resume from it lands on the uninterrupted run's
    weights."""
    module, args, _ = SCRIPTS[script]
    out, real_save, saves = str(tmp_path / "run"), torch.save, []

    def full_disk(obj, f, *a, **kw):
        saves.append(f)
        if len(saves) < 2:
            return real_save(obj, f, *a, **kw)
        buf = io.BytesIO()
        real_save(obj, buf)
        with open(f, "wb") as fh:
            fh.write(buf.getvalue()[: buf.tell() // 2])
        with pytest.raises(ValueError, match="not a readable checkpoint: truncated"):  # the half-written file
            ckpt.read_checkpoint(f)
        raise OSError(errno.ENOSPC, "No space left on device", f)

    with monkeypatch.context() as m:
        m.setattr(torch, "save", full_disk)
        with pytest.raises(OSError, match="No space left on device"):
            module.main(module.parse_args([*args, "--out", out]))
    assert saves[-1] == os.path.join(out, "ckpt.pt.tmp") and len(saves) == 2
    assert sorted(f for f in os.listdir(out) if f.endswith(".tmp")) == []  # the failed write removed its temp file
    assert read_ckpt(out)["step"] == 2
    module.main(module.parse_args([*args, "--out", out, "--resume"]))
    assert_same_run(out, reference(script, request))


def test_safetensors_write_that_fails_halfway_keeps_the_previous(tmp_path, monkeypatch):
    """ckpt.save_safetensors (every export: decoder, DiT, latents, stats) over an existing file, with the disk full
    halfway: OSError, no .tmp left behind, and the previous file still reads back whole."""
    path = str(tmp_path / "dit.safetensors")
    old = {"w": torch.arange(6.0).reshape(2, 3)}
    ckpt.save_safetensors(path, old, metadata={"step": "2"})
    real_save_file, calls = ckpt.save_file, []

    def full_disk(tensors, f, metadata=None):
        calls.append(f)
        real_save_file(tensors, f, metadata=metadata)
        raw = open(f, "rb").read()
        open(f, "wb").write(raw[: len(raw) // 2])
        raise OSError(errno.ENOSPC, "No space left on device", f)

    monkeypatch.setattr(ckpt, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left on device"):
        ckpt.save_safetensors(path, {"w": torch.ones(2, 3)}, metadata={"step": "4"})
    assert calls == [path + ".tmp"]
    assert os.listdir(tmp_path) == ["dit.safetensors"]
    assert torch.equal(ckpt.read_safetensors(path)["w"], old["w"]) and ckpt.read_metadata(path) == {"step": "2"}


def poisoned(fn, call, value):
    """fn, except that its `call`-th call (1-based) returns its loss times `value`: a NaN or inf loss at that step."""
    calls = [0]
    def inner(*args, **kw):
        calls[0] += 1
        out = fn(*args, **kw)
        if calls[0] != call:
            return out
        return (out[0] * value, *out[1:]) if isinstance(out, tuple) else out * value
    return inner


def poison_discriminator(value):
    """The discriminator's logits plus `value` in its step (grad_to_input=False) at step index 2, its first one
    (--disc-start 2): real and fake calls both, so the hinge loss is `value` itself."""
    real = train_decoder.Discriminator.forward
    calls = [0]
    def forward(self, img, grad_to_input=True):
        out = real(self, img, grad_to_input)
        calls[0] += not grad_to_input
        return out + value if not grad_to_input and calls[0] <= 2 else out
    return forward


@pytest.mark.parametrize("script,what,value,resume", [("train_decoder.py", "loss", math.nan, True),
                                                      ("train_decoder.py", "discriminator loss", math.inf, False),
                                                      ("train_dit.py", "loss", math.inf, False)])
def test_non_finite_loss_stops_and_keeps_the_last_good_files(script, what, value, resume, request, tmp_path,
                                                             monkeypatch, in_process):
    """A NaN / inf at step index 2 (after the step-2 save): a one-line SystemExit that says so; ckpt.pt and the export
    on disk are still step 2, finite, the export equal to the checkpoint's EMA. In the first case also --resume from
    them (the injected fault gone) is bitwise the uninterrupted run: nothing on disk was touched by the bad step."""
    module, args, _ = SCRIPTS[script]
    out = str(tmp_path / "run")
    with monkeypatch.context() as m:
        if what == "discriminator loss":
            m.setattr(train_decoder.Discriminator, "forward", poison_discriminator(value))
        elif script == "train_decoder.py":
            m.setattr(train_decoder, "perceptual_loss", poisoned(train_decoder.perceptual_loss, 3, value))
        else:
            m.setattr(dit, "flow_loss", poisoned(dit.flow_loss, 3, value))
        with pytest.raises(SystemExit) as e:
            module.main(module.parse_args([*args, "--out", out]))
    one_line_naming(e, f"step 2: {what} is {value} (rank 0)", "not finite", os.path.join(out, "ckpt.pt"),
                    "stopping without saving")
    ck = read_ckpt(out)
    export = load_file(os.path.join(out, "decoder.safetensors" if script == "train_decoder.py" else "dit.safetensors"))
    assert ck["step"] == 2 and all(torch.isfinite(t).all() for t in ck["ema"].values())
    assert_same_tree(export, ck["ema"])
    if resume:
        module.main(module.parse_args([*args, "--out", out, "--resume"]))
        assert_same_run(out, reference(script, request))


@pytest.mark.parametrize("script", SCRIPTS)
def test_non_finite_gradient_stops_before_the_optimizer_step(script, tmp_path, monkeypatch, in_process):
    """A finite loss whose gradient is not (one parameter's gradient NaN at step index 2, as an overflow in backward
    makes it): the run stops with one line saying "gradient norm is nan" before the optimizer step, which would have
    turned that parameter (AdamW: every moment) into NaN; ckpt.pt and the export stay at step 2."""
    module, args, _ = SCRIPTS[script]
    out, real_clip, calls, seen = str(tmp_path / "run"), torch.nn.utils.clip_grad_norm_, [0], []

    def clip(parameters, *a, **kw):
        parameters = list(parameters)
        calls[0] += 1
        if calls[0] == 3:  # step index 2, after the step-2 save
            seen.extend(parameters)
            next(p for p in parameters if p.grad is not None).grad.fill_(math.nan)
        return real_clip(parameters, *a, **kw)

    with monkeypatch.context() as m:
        m.setattr(torch.nn.utils, "clip_grad_norm_", clip)
        with pytest.raises(SystemExit) as e:
            module.main(module.parse_args([*args, "--out", out]))
    one_line_naming(e, "step 2: gradient norm is nan (rank 0)", "not finite", "stopping without saving",
                    os.path.join(out, "ckpt.pt"))
    assert calls[0] == 3 and seen and all(torch.isfinite(p).all() for p in seen)  # no optimizer step took the NaN
    ck = read_ckpt(out)
    export = load_file(os.path.join(out, "decoder.safetensors" if script == "train_decoder.py" else "dit.safetensors"))
    assert ck["step"] == 2 and all(torch.isfinite(t).all() for t in ck["ema"].values())
    assert_same_tree(export, ck["ema"])
    assert [r["step"] for r in metrics(out)] == [1, 2]  # the bad step logged nothing either


NAN_ON_RANK_1 = """
import os, sys
sys.path.insert(0, {here!r})
import train_decoder
real = train_decoder.perceptual_loss
calls = []
def perceptual_loss(*args):  # NaN on rank 1 only, at its second step
    calls.append(1)
    return real(*args) * (float("nan") if os.environ["RANK"] == "1" and len(calls) == 2 else 1.0)
train_decoder.perceptual_loss = perceptual_loss
train_decoder.main(train_decoder.parse_args(sys.argv[1:]))
"""


def test_decoder_ranks_agree_on_a_non_finite_loss(tmp_path):
    """torchrun x2, NaN on rank 1 only: both ranks stop at the same step with the message (a rank that stopped alone
    would leave the other in the next all-reduce until torchrun killed it); ckpt.pt stays at step 1."""
    script, out = tmp_path / "nan_rank1.py", str(tmp_path / "run")
    script.write_text(NAN_ON_RANK_1.format(here=HERE))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
                        "--preset", "toy", "--steps", "3", "--batch", "4", "--save-every", "1", "--log-every", "1",
                        "--eval-every", "3", "--val-images", "2", "--out", out],
                       cwd=HERE, env=ENV, capture_output=True, text=True, timeout=240)
    assert r.returncode != 0
    # rank 1 names its value; rank 0, whose loss was finite, stops at the same step because of the other rank
    stops = [line for line in r.stderr.splitlines() if "stopping without saving" in line]
    for rank, what in ((0, "a value on another rank"), (1, "loss is nan")):
        assert any(f"step 1: {what} (rank {rank})" in line and os.path.join(out, "ckpt.pt") in line
                   for line in stops), r.stderr[-3000:]
    assert read_ckpt(out)["step"] == 1


# ----------------------------------------------------------------------------- the resume checkpoint
class Pwn:
    """A pickle that would create `marker` when unpickled: what a foreign ckpt.pt could do with weights_only=False."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def truncate(path):
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[: len(raw) // 2])


def edit(fn):
    """A case that loads ckpt.pt, changes it with fn(ck, names) and writes it back."""
    def apply(path, names):
        ck = torch.load(path, weights_only=True)
        fn(ck, names)
        torch.save(ck, path)
    return apply


def files(folder):
    """Every file under `folder` -> its bytes: what a run that fails before its first step must leave as it was."""
    return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
            for d, _, names in os.walk(folder) for f in names}


def moment(ck):
    return ck["opt"]["state"][next(iter(ck["opt"]["state"]))]


# name: (edit(path, names), what the one line must say); names: the script's model key and a tensor name in it
BAD_RESUMES = {
    "truncated": (lambda path, n: truncate(path), ["not a readable checkpoint: truncated"]),
    "a foreign pickle": (lambda path, n: torch.save({n["model"]: Pwn(path + ".pwned")}, path),
                         ["refused unread (weights_only=True)"]),
    "not a dict": (lambda path, n: torch.save(torch.zeros(3), path), ["holds a Tensor"]),
    "missing top key": (edit(lambda ck, n: ck.pop("ema")), ["missing key 'ema'"]),
    "extra top key": (edit(lambda ck, n: ck.update(scaler={})), ["unexpected key 'scaler'"]),
    "missing tensor": (edit(lambda ck, n: ck["ema"].pop(n["tensor"])), ["missing key 'ema.{tensor}'"]),
    "extra tensor": (edit(lambda ck, n: ck[n["model"]].update(extra=torch.zeros(1))), ["unexpected key '{model}.extra'"]),
    "wrong shape": (edit(lambda ck, n: ck["ema"].update({n["tensor"]: torch.zeros(3)})), ["'ema.{tensor}'", "(3,)"]),
    "wrong dtype": (edit(lambda ck, n: ck[n["model"]].update({n["tensor"]: ck[n["model"]][n["tensor"]].double()})),
                    ["'{model}.{tensor}'", "torch.float64"]),
    "wrong optimizer moment": (edit(lambda ck, n: moment(ck).update(exp_avg=torch.zeros(3))), ["'opt.state.", "exp_avg'"]),
    "step not an int": (edit(lambda ck, n: ck.update(step=2.0)), ["key 'step' is a float"]),
    "mismatched config": (edit(lambda ck, n: ck["config"].update(depth=ck["config"]["depth"] + 1)), ["'config.depth'"]),
}
NAMES = {"train_decoder.py": dict(model="decoder", tensor="pred.weight"),
         "train_dit.py": dict(model="model", tensor="final_layer.linear.weight")}


@pytest.mark.parametrize("script", ["train_decoder.py", "train_dit.py"])
@pytest.mark.parametrize("case", BAD_RESUMES)
def test_bad_resume_checkpoint_is_refused(script, case, request, tmp_path, in_process):
    """--resume on a bad ckpt.pt: ValueError in one line naming the file and the key, before any step, and the file
    is left as it was (nothing overwrites it); a foreign pickle's code never runs."""
    module, args, _ = SCRIPTS[script]
    out = tmp_path / "run"
    shutil.copytree(reference(script, request), out)
    path, names = str(out / "ckpt.pt"), NAMES[script]
    assert names["tensor"] in read_ckpt(str(out))["ema"]
    BAD_RESUMES[case][0](path, names)
    before = files(out)
    with pytest.raises(ValueError) as e:
        module.main(module.parse_args([*args, "--out", str(out), "--resume"]))
    one_line_naming(e, path, *(s.format(**names) for s in BAD_RESUMES[case][1]))
    assert files(out) == before and not os.path.exists(path + ".pwned")  # nothing written, ckpt.pt as it was


@pytest.mark.parametrize("script", ["train_decoder.py", "train_dit.py"])
def test_bad_resume_checkpoint_names_every_problem_in_one_line(script, request, tmp_path, in_process):
    """A ckpt.pt with three problems at once (a missing EMA tensor, a mis-shaped model tensor, another depth in its
    config): ONE line names the file and each of them, so a user fixes the file once; nothing is written."""
    module, args, _ = SCRIPTS[script]
    out = tmp_path / "run"
    shutil.copytree(reference(script, request), out)
    path, names = str(out / "ckpt.pt"), NAMES[script]
    ck = read_ckpt(str(out))
    model_key = next(k for k in ck[names["model"]] if k != names["tensor"])
    depth = ck["config"]["depth"]
    del ck["ema"][names["tensor"]]
    ck[names["model"]][model_key] = torch.zeros(3)
    ck["config"]["depth"] = depth + 1
    torch.save(ck, path)
    before = files(out)
    with pytest.raises(ValueError) as e:
        module.main(module.parse_args([*args, "--out", str(out), "--resume"]))
    one_line_naming(e, path, f"missing key 'ema.{names['tensor']}'", f"key '{names['model']}.{model_key}' has shape (3,)",
                    f"'config.depth' is {depth + 1} in the checkpoint but {depth} in this run")
    assert files(out) == before


@pytest.mark.parametrize("script,flags,field", [
    pytest.param("train_decoder.py", ["--model", "B"], "'config.depth' is 4 in the checkpoint but 12 in this run"),
    pytest.param("train_dit.py", ["--model", "DiT-S"], "'config.connector_depth' is 1 in the checkpoint but 2 in this run")])
def test_resume_with_another_model_flag_names_the_config_field(script, flags, field, request, tmp_path, in_process):
    module, args, _ = SCRIPTS[script]
    out = tmp_path / "run"
    shutil.copytree(reference(script, request), out)
    before = files(out)
    with pytest.raises(ValueError) as e:
        module.main(module.parse_args([*args, *flags, "--out", str(out), "--resume"]))
    one_line_naming(e, str(out / "ckpt.pt"), field)
    assert files(out) == before


@pytest.mark.parametrize("script,flags,flag", [
    ("train_decoder.py", ["--batch", "2"], "--batch is 4 in the checkpoint but 2 in this run"),
    ("train_dit.py", ["--batch", "4"], "--batch is 8 in the checkpoint but 4 in this run"),
    ("train_dit.py", ["--grad-accum", "2"], "--grad-accum is 1 in the checkpoint but 2 in this run")])
def test_resume_with_another_batch_or_grad_accum_is_refused(script, flags, flag, request, tmp_path, in_process):
    """--batch and --grad-accum set the data position and the noise of every sample: a resumed run that changed them
    would not continue the same run. Refused in one line naming the flag, before any step; nothing is written."""
    module, args, _ = SCRIPTS[script]
    out = tmp_path / "run"
    shutil.copytree(reference(script, request), out)
    before = files(out)
    with pytest.raises(ValueError) as e:  # --steps + 2: without the check, two steps would overwrite ckpt.pt
        module.main(module.parse_args([*args, *flags, "--steps", str(SCRIPTS[script][2] + 2), "--out", str(out),
                                       "--resume"]))
    one_line_naming(e, str(out / "ckpt.pt"), flag)
    assert files(out) == before


@pytest.mark.parametrize("script,flags,notes", [
    ("train_decoder.py", ["--steps", "7", "--lr", "0.002"], ["--steps 6 -> 7", "--lr 0.001 -> 0.002"]),
    ("train_dit.py", ["--steps", "6", "--lr", "0.001"], ["--steps 4 -> 6", "--lr 0.002 -> 0.001"])])
def test_resume_with_another_lr_or_steps_continues_and_says_so(script, flags, notes, request, tmp_path, capsys,
                                                               in_process):
    """A longer --steps or a new --lr is how a run is extended or rescued: allowed, printed in the "resumed" line,
    and used from the next step on (the logged lr is the schedule's with the new flags)."""
    module, args, steps = SCRIPTS[script]
    out = tmp_path / "run"
    shutil.copytree(reference(script, request), out)
    new = module.parse_args([*args, *flags, "--out", str(out), "--resume"])
    module.main(new)
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("resumed from"))
    assert line.startswith(f"resumed from {out / 'ckpt.pt'} at step {steps} (") and all(n in line for n in notes), line
    ck, logged = read_ckpt(str(out)), metrics(str(out))
    assert ck["step"] == new.steps and ck["args"]["lr"] == new.lr
    assert [r["step"] for r in logged] == [*range(1, new.steps + 1)]
    assert logged[-1]["lr"] == training.lr_at(new.steps - 1, new.lr, new.warmup, new.steps, new.min_lr,
                                              getattr(new, "schedule", "cosine"))


@pytest.mark.parametrize("script", ["train_decoder.py", "train_dit.py"])
def test_a_forgotten_resume_does_not_overwrite_the_checkpoint(script, request, tmp_path, in_process):
    module, args, _ = SCRIPTS[script]
    out = tmp_path / "run"
    shutil.copytree(reference(script, request), out)
    before = open(out / "ckpt.pt", "rb").read()
    with pytest.raises(SystemExit) as e:  # --steps 1: without the check, one step would overwrite ckpt.pt
        module.main(module.parse_args([*args, "--steps", "1", "--out", str(out)]))
    one_line_naming(e, str(out / "ckpt.pt"), "pass --resume")
    assert open(out / "ckpt.pt", "rb").read() == before


def test_no_code_path_unpickles():
    """Every torch.load outside the tests passes weights_only=True, nothing calls pickle, and numpy's loader (which
    can unpickle object arrays) only with allow_pickle=False (eval.py's .npz statistics): weights come from
    safetensors, checkpoints through ckpt.read_checkpoint."""
    calls = []
    for name in sorted(f for f in os.listdir(HERE) if f.endswith(".py") and not f.startswith("test_")):
        for node in ast.walk(ast.parse(open(os.path.join(HERE, name)).read())):
            if isinstance(node, ast.Call):
                fn = ast.unparse(node.func)
                safe = any(k.arg == "weights_only" and getattr(k.value, "value", None) is True for k in node.keywords)
                no_pickle = any(k.arg == "allow_pickle" and getattr(k.value, "value", None) is False
                                for k in node.keywords)
                assert fn not in ("pickle.load", "pickle.loads"), (name, fn)
                assert fn not in ("np.load", "numpy.load") or no_pickle, f"{name}:{node.lineno}: {fn} may unpickle"
                assert fn != "torch.load" or safe, f"{name}:{node.lineno}: torch.load without weights_only=True"
                calls += [name] if fn == "torch.load" else []
    assert "ckpt.py" in calls  # ckpt.read_checkpoint, which the tests above exercise


# ----------------------------------------------------------------------------- exports: decoder, DiT, latent stats
def bad_export(src, dst, drop=(), put=None, meta=None):
    """Copy safetensors src to dst without `drop`, with `put` added or replaced and `meta` merged into the metadata."""
    state = load_file(src)
    for k in drop:
        del state[k]
    state.update(put or {})
    save_file(state, dst, metadata={**ckpt.read_metadata(src), **(meta or {})})
    return dst


def half(src, dst):
    raw = open(src, "rb").read()
    open(dst, "wb").write(raw[: len(raw) // 2])
    return dst


@pytest.fixture(scope="module")
def decoder_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("dec") / "decoder.safetensors")
    torch.manual_seed(0)
    rae.save_decoder(path, rae.Decoder(rae.DecoderConfig(latent_dim=8, num_tokens=4, patch_size=2, hidden_size=16,
                                                         depth=1, num_heads=2, mlp_dim=32)))
    return path


def test_bad_decoder_exports(decoder_file, tmp_path):
    cfg = json.loads(ckpt.read_metadata(decoder_file)["decoder_config"])
    k = "blocks.0.attn.qkv.weight"
    cases = {  # name: (file, what the one line must say besides its path)
        "truncated": (half(decoder_file, tmp_path / "t.safetensors"), "truncated"),
        "wrong shape": (bad_export(decoder_file, tmp_path / "s.safetensors", put={k: torch.zeros(48, 15)}),
                        f"key '{k}' has shape (48, 15), expected (48, 16)"),
        "missing key": (bad_export(decoder_file, tmp_path / "m.safetensors", drop=[k]), f"missing key '{k}'"),
        "extra key": (bad_export(decoder_file, tmp_path / "e.safetensors", put={"extra": torch.zeros(1)}),
                      "unexpected key 'extra'"),
        "wrong dtype": (bad_export(decoder_file, tmp_path / "d.safetensors", put={k: torch.zeros(48, 16).long()}),
                        f"key '{k}' has dtype torch.int64"),
        "config says deeper": (bad_export(decoder_file, tmp_path / "c.safetensors",
                                          meta={"decoder_config": json.dumps({**cfg, "depth": 2})}),
                               "missing key 'blocks.1."),
        "config field unknown": (bad_export(decoder_file, tmp_path / "u.safetensors",
                                            meta={"decoder_config": json.dumps({**cfg, "dropout": 0.1})}),
                                 "metadata 'decoder_config' has unknown field 'dropout'"),
        "config field missing": (bad_export(decoder_file, tmp_path / "f.safetensors", meta={"decoder_config": json.dumps(
                                     {f: v for f, v in cfg.items() if f != "mlp_dim"})}),
                                 "metadata 'decoder_config' is missing field 'mlp_dim'"),
        "config field of wrong type": (bad_export(decoder_file, tmp_path / "w.safetensors",
                                                  meta={"decoder_config": json.dumps({**cfg, "depth": "1"})}),
                                       "field 'depth' is '1', expected int"),
        "config not JSON": (bad_export(decoder_file, tmp_path / "j.safetensors", meta={"decoder_config": "{depth: 1"}),
                            "metadata 'decoder_config' is not valid JSON"),
        "config heads do not divide": (bad_export(decoder_file, tmp_path / "h.safetensors",
                                                  meta={"decoder_config": json.dumps({**cfg, "num_heads": 3})}),
                                       "hidden_size 16 is not divisible by num_heads 3"),
    }
    for name, (path, needle) in cases.items():
        with pytest.raises(ValueError) as e:
            rae.load_decoder(str(path))
        one_line_naming(e, str(path), needle)


def test_bad_dit_exports(dit_run, tmp_path):
    good = os.path.join(dit_run, "dit.safetensors")
    cfg = json.loads(ckpt.read_metadata(good)["dit_config"])
    k = "final_layer.linear.weight"
    shape = tuple(load_file(good)[k].shape)
    cases = {
        "truncated": (half(good, tmp_path / "t.safetensors"), "truncated"),
        "wrong shape": (bad_export(good, tmp_path / "s.safetensors", put={k: torch.zeros(3, 3)}),
                        f"key '{k}' has shape (3, 3), expected {shape}"),
        "missing key": (bad_export(good, tmp_path / "m.safetensors", drop=[k]), f"missing key '{k}'"),
        "extra key": (bad_export(good, tmp_path / "e.safetensors", put={"extra": torch.zeros(1)}), "unexpected key 'extra'"),
        "wrong dtype": (bad_export(good, tmp_path / "d.safetensors", put={k: torch.zeros(shape, dtype=torch.int32)}),
                        f"key '{k}' has dtype torch.int32"),
        "config of another size": (bad_export(good, tmp_path / "c.safetensors",
                                              meta={"dit_config": json.dumps({**cfg, "hidden_size": 96})}),
                                   "has shape"),
        "config field unknown": (bad_export(good, tmp_path / "u.safetensors",
                                            meta={"dit_config": json.dumps({**cfg, "rope": True})}),
                                 "metadata 'dit_config' has unknown field 'rope'"),
        "config not a DiT": (bad_export(good, tmp_path / "g.safetensors",
                                        meta={"dit_config": json.dumps({**cfg, "num_tokens": 63})}),
                             "metadata 'dit_config': num_tokens must be a square grid"),
        "no config": (bad_export(good, tmp_path / "n.safetensors", meta={"dit_config": "null"}), "is a JSON NoneType"),
        "no time shift": (bad_export(good, tmp_path / "a.safetensors", meta={"alpha": "nan"}), "metadata 'alpha' is 'nan'"),
        "unknown latent": (bad_export(good, tmp_path / "l.safetensors", meta={"latent": "dino"}), "metadata 'latent' is 'dino'"),
    }
    for name, (path, needle) in cases.items():
        with pytest.raises(ValueError) as e:
            dit.load_dit(str(path), "cpu")
        one_line_naming(e, str(path), needle)


def test_sample_raw_loads_the_non_ema_weights(dit_run, monkeypatch):
    """--raw was accepted and ignored (the EMA was sampled); now it loads ckpt.pt's model weights."""
    monkeypatch.chdir(HERE)  # the toy encoder's folder
    model = sample.load_models(sample.parse_args(["--ckpt", dit_run, "--raw"]), torch.device("cpu")).model
    ema = sample.load_models(sample.parse_args(["--ckpt", dit_run]), torch.device("cpu")).model
    assert_same_tree(ema.state_dict(), load_file(os.path.join(dit_run, "dit.safetensors")))  # without --raw: the EMA
    ck = read_ckpt(dit_run)
    assert_same_tree(model.state_dict(), ck["model"])
    assert any(not torch.equal(ck["model"][k], v) for k, v in ck["ema"].items())  # so the test can tell them apart


def test_bad_latent_stats(tmp_path):
    def stats(name, **tensors):
        path = str(tmp_path / f"{name}.safetensors")
        save_file(tensors, path)
        return path
    good = stats("good", mean=torch.zeros(4, 8), var=torch.ones(4, 8))
    assert rae.load_latent_stats(good, 8, tokens=4)["var"].shape == (4, 8)
    cases = {
        "truncated": (half(good, tmp_path / "t.safetensors"), "truncated"),
        "wrong shape": (stats("s", mean=torch.zeros(9), var=torch.ones(9)), "key 'mean' has shape (9,), expected (8,) or (4, 8)"),
        "extra key": (stats("e", mean=torch.zeros(8), var=torch.ones(8), std=torch.ones(8)), "unexpected key 'std'"),
        "wrong dtype": (stats("d", mean=torch.zeros(8, dtype=torch.int64), var=torch.ones(8)),
                        "key 'mean' has dtype torch.int64"),
        "stats of another resolution": (stats("r", mean=torch.zeros(16, 8), var=torch.ones(16, 8)),
                                        "key 'mean' has shape (16, 8), expected (8,) or (4, 8)"),
        "mean and var disagree": (stats("m", mean=torch.zeros(8), var=torch.ones(4, 8)), "'var' has (4, 8)"),
        "negative variance": (stats("n", mean=torch.zeros(8), var=-torch.ones(8)), "key 'var' has negative entries"),
        "NaN mean": (stats("f", mean=torch.full((8,), math.nan), var=torch.ones(8)), "key 'mean' has non-finite entries"),
    }
    for name, (path, needle) in cases.items():
        with pytest.raises(ValueError) as e:
            rae.load_latent_stats(str(path), 8, tokens=4)
        one_line_naming(e, str(path), needle)


# ----------------------------------------------------------------------------- SigLIP-2 snapshot: config and tokenizer
@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("snap") / "siglip")
    toy.write_tiny_siglip2(path, ["red", "circle"], vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                                 num_attention_heads=2, image_size=28, patch_size=14),
                           text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2))
    return path


def json_edit(fn):
    """A change of a JSON file's text: parse, fn(spec) in place, dump."""
    def change(text):
        spec = json.loads(text)
        fn(spec)
        return json.dumps(spec)
    return change


def test_bad_snapshot_configs(snapshot, tmp_path):
    """The config.json, shard index and tokenizer.json side of a snapshot (test_rae.py covers model.safetensors)."""
    weights = "model.safetensors"
    cases = {  # name: (file, its new text from the old ("" if new), the file the line names, what else it says)
        "config truncated": ("config.json", lambda t: t[: len(t) // 2], "config.json", "not valid JSON"),
        "config disagrees with the weights": ("config.json", json_edit(lambda c: c["text_config"].update(hidden_size=48)),
                                              weights, "key 'text_model.embeddings.position_embedding.weight' has "
                                                       "shape (64, 32), expected (64, 48)"),
        "config has more layers": ("config.json", json_edit(lambda c: c["vision_config"].update(num_hidden_layers=2)),
                                   weights, "missing key 'vision_model.encoder.layers.1."),
        "shard index truncated": ("model.safetensors.index.json", lambda t: '{"weight_map": {"logit_scale": "mo',
                                  "model.safetensors.index.json", "not a readable shard index, need key 'weight_map'"),
    }
    for name, (file, change, named, needle) in cases.items():
        folder = str(tmp_path / name.replace(" ", "_"))
        shutil.copytree(snapshot, folder)
        path = os.path.join(folder, file)
        old = open(path).read() if os.path.exists(path) else ""
        open(path, "w").write(change(old))
        with pytest.raises(ValueError) as e:
            rae.load_siglip2(folder)
        one_line_naming(e, os.path.join(folder, named), needle)
        if named == weights:  # the line says where the expected shapes come from
            one_line_naming(e, "config.json sets the expected shapes")


def test_tokenizer_of_another_model(snapshot, tmp_path):
    """A tokenizer.json with ids past the text tower's vocab_size loads (test_rae.py's download test pairs such
    files), but a prompt that reaches such an id fails in one line, not as an IndexError inside the embedding."""
    folder = str(tmp_path / "snap")
    shutil.copytree(snapshot, folder)
    path = os.path.join(folder, "tokenizer.json")
    vocab = json.load(open(os.path.join(folder, "config.json")))["text_config"]["vocab_size"]
    zebra = dict(id=vocab, content="zebra", single_word=False, lstrip=False, rstrip=False, normalized=False, special=False)
    text = json_edit(lambda s: s["added_tokens"].append(zebra))(open(path).read())
    open(path, "w").write(text)
    model = rae.load_siglip2(folder)
    assert model.tokenizer(["red circle"]).max() < vocab
    with pytest.raises(ValueError) as e:
        model.tokenizer(["a red zebra"])
    one_line_naming(e, path, f"token 'zebra' has id {vocab}, past the text_config.vocab_size {vocab} of config.json")


TOKENIZER_CASES = {  # name: (change to tokenizer.json, what the one line must say)
    "truncated": (lambda t: t[: len(t) // 2], "not a readable tokenizer.json (JSONDecodeError"),
    "not a tokenizer": (lambda t: "[1, 2]", "missing key 'model'"),
    "missing key": (json_edit(lambda s: s["model"].pop("vocab")), "key 'model.vocab' must map each token to an integer id"),
    "wrong type of ids": (json_edit(lambda s: s["model"].update(vocab={k: str(v) for k, v in s["model"]["vocab"].items()})),
                          "key 'model.vocab' must map each token to an integer id"),
    "wrong shape of a merge": (json_edit(lambda s: s["model"]["merges"].append("r e d")),
                               "key 'model.merges' has an entry that is not a pair of tokens: ['r', 'e', 'd']"),
    "an extra setting that changes the ids": (json_edit(lambda s: s["model"].update(dropout=0.1)),
                                              "key 'model.dropout' is 0.1; only null is supported"),
    "another model type": (json_edit(lambda s: s["model"].update(type="WordPiece")),
                           "key 'model.type' is 'WordPiece', only 'BPE' is supported"),
    "added token without an id": (json_edit(lambda s: s["added_tokens"][0].pop("id")), "key 'added_tokens' must be a list"),
    "malformed normalizer": (json_edit(lambda s: s.update(normalizer={"type": "Sequence"})),
                             "key 'normalizer' or 'pre_tokenizer' is malformed (KeyError: 'normalizers')"),
    "merge into a token not in the vocab": (json_edit(lambda s: s["model"]["merges"].append(["<pad>", "<eos>"])),
                                            "merge '<pad>' + '<eos>' makes '<pad><eos>', which is not in the vocab"),
}


@pytest.mark.parametrize("case", TOKENIZER_CASES)
def test_bad_tokenizer_json(case, snapshot, tmp_path):
    change, needle = TOKENIZER_CASES[case]
    path = str(tmp_path / "tokenizer.json")
    open(path, "w").write(change(open(os.path.join(snapshot, "tokenizer.json")).read()))
    with pytest.raises(ValueError) as e:
        tokenizer.GemmaTokenizer(path)
    one_line_naming(e, path, needle)


# ----------------------------------------------------------------------------- command lines
@pytest.mark.parametrize("module", [train_decoder, train_dit])
@pytest.mark.parametrize("argv,message", [
    (["--preset", "huge"], "argument --preset: invalid choice: 'huge'"),
    (["--preset", "toy", "--steps", "-5"], "must be positive (got -5, "),
    (["--preset", "toy", "--batch", "0"], "must be positive (got "),
    (["--steps", "10"], "--data is required (or use --preset toy)"),
])
def test_training_cli_misuse(module, argv, message, capsys):
    """argparse errors: exit code 2, usage, then one line that names the flag."""
    with pytest.raises(SystemExit) as e:
        module.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err.strip().splitlines()[-1]


def test_batch_not_divisible_by_world_size(tmp_path):
    """torchrun x2 with --batch 3: every rank exits with the message before any step. (train_dit.py checks the same
    with --grad-accum in one expression, tested in one process below.)"""
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "train_decoder.py", "--preset", "toy", "--batch", "3", "--out", str(tmp_path / "run")],
                       cwd=HERE, env=ENV, capture_output=True, text=True, timeout=240)
    assert r.returncode != 0 and r.stderr.count("--batch 3 is not divisible by the world size 2") == 2, r.stderr[-2000:]
    assert not os.path.exists(tmp_path / "run" / "ckpt.pt")


@pytest.mark.parametrize("script", SCRIPTS)
def test_missing_or_wrong_encoder(script, tmp_path, capsys, in_process):
    """No --encoder (and no --preset toy): an argparse error naming the flag. A folder that does not exist: one line
    naming its config.json, before any step."""
    module, _, _ = SCRIPTS[script]
    out = tmp_path / "run"
    base = ["--data", "toy", "--steps", "1", "--batch", "2", "--workers", "0", "--out", str(out)]
    with pytest.raises(SystemExit) as e:
        module.parse_args(base)
    assert e.value.code == 2 and "--encoder is required" in capsys.readouterr().err.strip().splitlines()[-1]
    with pytest.raises(FileNotFoundError) as e:
        module.main(module.parse_args([*base, "--encoder", str(tmp_path / "nowhere")]))
    one_line_naming(e, os.path.join(str(tmp_path / "nowhere"), "config.json"), "file not found")
    assert not os.path.exists(out / "ckpt.pt") and not os.path.exists(out / "metrics.jsonl")


def test_dit_batch_not_divisible_by_world_size_x_grad_accum(tmp_path, in_process):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train_dit.main(train_dit.parse_args([*DIT, "--grad-accum", "3", "--out", str(out)]))
    one_line_naming(e, "--batch 8 is not divisible by", "world size 1", "--grad-accum 3")
    assert not os.path.exists(out / "ckpt.pt") and not os.path.exists(out / "metrics.jsonl")


@pytest.mark.parametrize("stale", ["older version", "another size"])
def test_stale_toy_encoder_says_to_delete_the_folder(stale, tmp_path, monkeypatch, toy_encoder, in_process):
    """A toy_encoder/ folder written by an older version (its config.json has no toy_text_window) or at another
    image size: train_dit.py --preset toy, run where that folder is, fails in one line that names the folder and
    says to delete it, before any step (not with a shape error deep in a forward, or worse, training on it)."""
    folder = tmp_path / "toy_encoder"
    folder.mkdir()
    config = json.load(open(os.path.join(HERE, "toy_encoder", "config.json")))
    if stale == "older version":
        del config["toy_text_window"]
    else:
        config["vision_config"]["image_size"] = 224
    json.dump(config, open(folder / "config.json", "w"))
    monkeypatch.chdir(tmp_path)
    before = files(folder)
    with pytest.raises(ValueError) as e:
        train_dit.main(train_dit.parse_args([*DIT, "--out", str(tmp_path / "run")]))
    one_line_naming(e, str(folder), "delete that folder")
    assert files(folder) == before and not os.path.exists(tmp_path / "run" / "ckpt.pt")


@pytest.mark.parametrize("manifest", ["{\"version\": 1, \"shards\": [", "{}", "[1, 2]"])
def test_corrupt_cache_manifest_is_named(manifest, tmp_path, in_process):
    """train_dit.py --cache-latents DIR whose manifest.json is not JSON, lacks its fields, or is not an object: one
    line naming manifest.json, before any step, and the folder is left as it was (test_latents.py covers the class;
    this is the end to end run)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "manifest.json").write_text(manifest)
    with pytest.raises(ValueError) as e:
        train_dit.main(train_dit.parse_args([*DIT, "--cache-latents", str(cache), "--out", str(tmp_path / "run")]))
    one_line_naming(e, str(cache / "manifest.json"), "not a readable cache manifest")
    assert files(cache) == {"manifest.json": manifest.encode()}
    assert not os.path.exists(tmp_path / "run" / "ckpt.pt")


LONG = "a red circle on the left " * 400  # 10,000 characters
ODD = ["", LONG, "un chat noir über 東京 🐈"]


def notes(stdout):
    return [line for line in stdout.splitlines() if line.startswith("note:")]


def test_prompts_empty_long_and_non_ascii(decoder_run, dit_run, toy_encoder, tmp_path):
    """Documented behaviour: "" is EOS alone; 10,000 characters are cut to 63 tokens + EOS, with a note that gives
    the token count and what the DiT reads; non-ASCII text goes through the byte fallback and back. All three sample,
    draw and caption the grid."""
    tok = toy_encoder.tokenizer
    ids = tok(ODD)  # (3, 64)
    assert ids[0].tolist() == [tok.eos_id] + [tok.pad_id] * 63
    assert ids[1, 63].item() == tok.eos_id and (ids[1, :63] != tok.pad_id).all()
    odd = ids[2][ids[2] != tok.pad_id][:-1].tolist()
    assert tok.decode(odd) == ODD[2].lower() and any(tok.id_to_token[i].startswith("<0x") for i in odd)
    text_len = json.loads(ckpt.read_metadata(os.path.join(dit_run, "dit.safetensors"))["dit_config"])["text_len"]
    out = str(tmp_path / "s")
    r = run("sample.py", "--ckpt", dit_run, "--decoder", os.path.join(decoder_run[0], "decoder.safetensors"),
            *sum((["--prompt", p] for p in ODD), []), "--steps", "2", "--out", out, "--save-latents")
    long_note = f"note: this prompt is {len(tok.encode(LONG.lower())) + 1} tokens with EOS, the DiT reads the first " \
                f"{text_len}: 'a red circle"
    assert any(line.startswith(long_note) for line in notes(r.stdout)), r.stdout
    assert len(notes(r.stdout)) == sum(len(tok.encode(p.lower())) + 1 > text_len for p in ODD), r.stdout
    assert sorted(os.listdir(out)) == ["0000.png", "0001.png", "0002.png", "grid.png", "latents.safetensors"]
    assert torch.isfinite(load_file(os.path.join(out, "latents.safetensors"))["z"]).all()


def test_prompt_longer_than_the_dit_reads_gets_a_note(dit_run, toy_encoder, tmp_path, capsys, monkeypatch):
    """The toy DiT reads the first 24 of the text tower's 64 positions: a prompt of 25 to 64 tokens is not cut by
    the tokenizer but is by the DiT, and sample.py says so with the token count; a prompt that fits gets no note."""
    monkeypatch.chdir(HERE)
    tok = toy_encoder.tokenizer
    text_len = json.loads(ckpt.read_metadata(os.path.join(dit_run, "dit.safetensors"))["dit_config"])["text_len"]
    assert text_len == 24
    short = "a red circle on the left"
    mid = " and ".join(["a red circle on the left", "a blue square on the right", "a green triangle at the top"] * 2)
    n_short, n_mid = (len(tok.encode(p)) + 1 for p in (short, mid))
    assert n_short <= text_len < n_mid < tok.max_len, (n_short, n_mid)
    sample.main(sample.parse_args(["--ckpt", dit_run, "--prompt", short, "--prompt", mid, "--steps", "1",
                                   "--out", str(tmp_path / "s")]))
    assert notes(capsys.readouterr().out) == [f"note: this prompt is {n_mid} tokens with EOS, the DiT reads the first "
                                              f"{text_len}: {mid[:40]!r}..."]


def test_sample_cli_misuse(dit_run, tmp_path, monkeypatch):
    """Each fails before any sampling, in one line that names the file or flag."""
    monkeypatch.chdir(HERE)
    base = ["--ckpt", dit_run, "--prompt", "a red circle", "--out", str(tmp_path / "s")]
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n  \n")
    with pytest.raises(SystemExit, match="no prompt: give --prompt TEXT"):
        sample.main(sample.parse_args(["--ckpt", dit_run, "--prompts", str(empty)]))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("un chat noir über Tokyo\n".encode("latin-1"))
    for path, needle in ((latin1, "UnicodeDecodeError: 'utf-8' codec can't decode byte 0xfc"),
                         (tmp_path / "none.txt", "FileNotFoundError")):
        with pytest.raises(SystemExit) as e:
            sample.main(sample.parse_args(["--ckpt", dit_run, "--prompts", str(path)]))
        one_line_naming(e, str(path), "cannot read the prompts", needle)
    with pytest.raises(FileNotFoundError) as e:
        sample.main(sample.parse_args([*base[:1], str(tmp_path / "nowhere"), *base[2:]]))
    one_line_naming(e, str(tmp_path / "nowhere"), "file not found")
    with pytest.raises(FileNotFoundError) as e:
        sample.main(sample.parse_args([*base, "--encoder", str(tmp_path / "noenc")]))
    one_line_naming(e, str(tmp_path / "noenc"), "file not found")
    other = str(tmp_path / "other_encoder")
    toy.write_tiny_siglip2(other, ["red"], vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                       num_attention_heads=2, image_size=28, patch_size=14),
                           text=dict(hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2))
    cfg = json.loads(ckpt.read_metadata(os.path.join(dit_run, "dit.safetensors"))["dit_config"])
    with pytest.raises(SystemExit) as e:
        sample.main(sample.parse_args([*base, "--encoder", other]))
    one_line_naming(e, other, "text tower is 48 wide", f"text_dim {cfg['text_dim']}", "pass the --encoder it was")
    dec = str(tmp_path / "dec.safetensors")
    rae.save_decoder(dec, rae.Decoder(rae.DecoderConfig(latent_dim=8, num_tokens=4, patch_size=2, hidden_size=16, depth=1,
                                                        num_heads=2, mlp_dim=32)))
    with pytest.raises(SystemExit) as e:
        sample.main(sample.parse_args([*base, "--decoder", dec]))
    one_line_naming(e, dec, "decodes latents (4, 8), but", f"generates ({cfg['num_tokens']}, {cfg['in_channels']})")
