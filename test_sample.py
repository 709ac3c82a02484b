"""Tests for sample.py on the released models' layouts (tiny random weights written as the released files are):
RAE's stage2_model.pt + decoder model.pt + stat.pt, class names, AutoGuidance and the official schedule; the FID
protocol (--per-class: every class, resumable, sharded over torchrun ranks, an ADM .npz); Scale-RAE's snapshot +
siglip2_decoder from a prompt. Our own checkpoints' sample.py tests live in test_train.py and test_reliability.py.

    python -m pytest -q test_sample.py
"""
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import dit
import qwen
import sample
from conftest import torchrun
from test_qwen import write_tiny_scale_rae

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # as the torchrun subprocesses (OMP_NUM_THREADS=1): the same float sums
    yield
    torch.set_num_threads(n)


def fixture(name):
    return torch.load(os.path.join(HERE, "fixtures", name), weights_only=True)


def decoder_state(C, D, layers, inner, p, seed=0):
    """A GeneralDecoder state dict (the released decoders' layout) with random weights and no decoder_pos_embed (the
    loader then builds the fixed sin-cos table)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"trainable_cls_token": (1, 1, D), "decoder_embed.weight": (D, C), "decoder_embed.bias": (D,),
              "decoder_norm.weight": (D,), "decoder_norm.bias": (D,), "decoder_pred.weight": (p * p * 3, D),
              "decoder_pred.bias": (p * p * 3,)}
    for i in range(layers):
        a = f"decoder_layers.{i}."
        shapes |= {a + f"attention.attention.{n}.{w}": (D, D) if w == "weight" else (D,)
                   for n in ("query", "key", "value") for w in ("weight", "bias")}
        shapes |= {a + "attention.output.dense.weight": (D, D), a + "attention.output.dense.bias": (D,),
                   a + "intermediate.dense.weight": (inner, D), a + "intermediate.dense.bias": (inner,),
                   a + "output.dense.weight": (D, inner), a + "output.dense.bias": (D,)}
        shapes |= {a + f"{n}.{w}": (D,) for n in ("layernorm_before", "layernorm_after") for w in ("weight", "bias")}
    return {k: torch.randn(s, generator=g) * 0.1 + (1.0 if k.endswith("norm.weight") or "layernorm" in k and
                                                     k.endswith("weight") else 0.0) for k, s in shapes.items()}


def write_decoder(folder, state, C, D, layers, heads, inner, p, image):
    os.makedirs(folder, exist_ok=True)
    torch.save(state, os.path.join(folder, "model.pt"))
    with open(os.path.join(folder, "config.json"), "w") as f:  # HF ViTMAEConfig fields, as the released decoders'
        json.dump({"model_type": "vit_mae", "hidden_size": C, "decoder_hidden_size": D, "decoder_num_hidden_layers":
                   layers, "decoder_num_attention_heads": heads, "decoder_intermediate_size": inner,
                   "patch_size": p, "image_size": image, "layer_norm_eps": 1e-12, "hidden_act": "gelu"}, f)
    return folder


@pytest.fixture(scope="module")
def rae_release(tmp_path_factory):
    """RAE-collections' files in miniature: a DiT^DH stage2_model.pt (the official module's weights, fixtures/), the
    decoder of the same latent (8 channels, 4 x 4 tokens, 16 px) with its config.json, and a var-only stat.pt."""
    root = tmp_path_factory.mktemp("rae")
    torch.save(fixture("rae_ditdh.pt")["state"], root / "stage2_model.pt")
    dec = fixture("rae_decoder.pt")
    cfg = dec["config"]
    write_decoder(str(root / "decoder"), dec["state"], 8, cfg["decoder_hidden_size"], cfg["decoder_num_hidden_layers"],
                  cfg["decoder_num_attention_heads"], cfg["decoder_intermediate_size"], cfg["patch_size"], 16)
    torch.save({"var": torch.rand(8, 4, 4, generator=torch.Generator().manual_seed(1)) + 0.5}, root / "stat.pt")
    (root / "names.txt").write_text("\n".join(f"class number {k}" for k in range(10)) + "\n")
    return root


def rae_args(root, out, *extra):
    return sample.parse_args(["--ckpt", str(root / "stage2_model.pt"), "--decoder", str(root / "decoder"),
                              "--stats", str(root / "stat.pt"), "--out", str(out), *extra])


def test_rae_release_samples_with_the_official_schedule_class_names_and_autoguidance(rae_release, tmp_path):
    """--class (an id and a name of --class-names) on an official DiT^DH: the latents are dit.sample's with the official
    49-step schedule on noise seed * 10^6 + j; AutoGuidance with the model as its own guide changes nothing, and a
    different guide does; the images are the decoder's, 16 px."""
    root = rae_release
    sample.main(rae_args(root, tmp_path / "a", "--class", "3", "--class-names", str(root / "names.txt"),
                         "--class", "class number 7", "--n", "2", "--seed", "5", "--save-latents"))
    z = load_file(str(tmp_path / "a" / "latents.safetensors"))["z"]
    model = dit.load_rae_dit(str(root / "stage2_model.pt"))
    noise = torch.stack([torch.randn(16, 8, generator=torch.Generator().manual_seed(5_000_000 + j)) for j in range(4)])
    alpha = math.sqrt(16 * 8 / 4096)
    expect = dit.sample(model, noise, torch.tensor([3, 3, 7, 7]), alpha, schedule=dit.official_schedule("rae", alpha))
    assert torch.equal(z, expect)
    assert Image.open(tmp_path / "a" / "0003.png").size == (16, 16)
    sample.main(rae_args(root, tmp_path / "b", "--class", "3", "--class", "7", "--n", "2", "--seed", "5",
                         "--save-latents", "--guide", str(root / "stage2_model.pt"), "--guidance", "1.42"))
    assert torch.equal(load_file(str(tmp_path / "b" / "latents.safetensors"))["z"], z)
    with pytest.raises(SystemExit, match="--class"):
        sample.main(rae_args(root, tmp_path / "c", "--class", "no such class", "--class-names", str(root / "names.txt")))
    with pytest.raises(SystemExit, match="--stats"):
        sample.main(sample.parse_args(["--ckpt", str(root / "stage2_model.pt"), "--decoder", str(root / "decoder"),
                                       "--class", "1", "--out", str(tmp_path / "d")]))


def test_per_class_protocol_is_balanced_resumable_and_sharded(rae_release, tmp_path):
    """--per-class 2 over 10 classes: 20 PNGs, each class twice; a rerun after deleting some redraws exactly those; two
    torchrun ranks write the same bytes as one process; --npz packs them (20, 16, 16, 3) uint8."""
    root, out = rae_release, tmp_path / "one"
    labels = sample.main(rae_args(root, out, "--per-class", "2", "--batch", "3", "--npz"))
    assert sorted(labels) == sorted(list(range(10)) * 2)
    pngs = sorted(p for p in os.listdir(out) if p.endswith(".png"))
    assert pngs == [f"{j:06d}.png" for j in range(20)]
    first = {p: (out / p).read_bytes() for p in pngs}
    for p in pngs[4:7]:
        os.remove(out / p)
    sample.main(rae_args(root, out, "--per-class", "2", "--batch", "3"))
    assert {p: (out / p).read_bytes() for p in pngs} == first
    arr = np.load(out / "samples.npz")["arr_0"]
    assert arr.shape == (20, 16, 16, 3) and arr.dtype == np.uint8
    assert np.array_equal(arr[5], np.asarray(Image.open(out / pngs[5])))
    two = tmp_path / "two"
    torchrun("sample.py", "--ckpt", str(root / "stage2_model.pt"), "--decoder", str(root / "decoder"), "--stats",
             str(root / "stat.pt"), "--out", str(two), "--per-class", "2", "--batch", "3")
    assert {p: (two / p).read_bytes() for p in pngs} == first


def test_scale_rae_release_from_a_prompt(tmp_path):
    """A tiny snapshot in Scale-RAE's layout and a siglip2_decoder-style folder: sample.py --prompt gives the latents of
    the official path (greedy answer, queries, projector, the DiT on its schedule from noise seed * 10^6), a 32-px
    image, and --guidance really applies (against the learned null condition)."""
    snap, dec = tmp_path / "snap", tmp_path / "dec"
    with torch.no_grad():
        tok = write_tiny_scale_rae(snap)  # the released latent: 256 tokens x 1152 (a tiny DiT and LLM around it)
    write_decoder(str(dec), decoder_state(1152, 32, 1, 64, 2), 1152, 32, 1, 2, 64, 2, 32)
    args = ["--ckpt", str(snap), "--decoder", str(dec), "--prompt", "a cat", "--seed", "2", "--save-latents"]
    sample.main(sample.parse_args([*args, "--out", str(tmp_path / "a")]))
    z = load_file(str(tmp_path / "a" / "latents.safetensors"))["z"]
    text = qwen.load_scale_rae(str(snap))
    y, answer = qwen.conditions(text, tok, "a cat")
    assert answer == "Hi!"
    heads = json.load(open(snap / "config.json"))["diffusion_model_heads"]
    model = dit.load_scale_rae_dit(qwen.read_dit_state(str(snap)), num_heads=heads)
    alpha = math.sqrt(256 * 1152 / 4096)
    noise = torch.randn(256, 1152, generator=torch.Generator().manual_seed(2_000_000))[None]
    assert torch.equal(z, dit.sample(model, noise, y, alpha, schedule=dit.official_schedule("scale-rae", alpha)))
    assert Image.open(tmp_path / "a" / "0000.png").size == (32, 32)
    sample.main(sample.parse_args([*args, "--guidance", "3", "--out", str(tmp_path / "b")]))
    assert not torch.equal(load_file(str(tmp_path / "b" / "latents.safetensors"))["z"], z)
