"""Write parity fixtures from the OFFICIAL RAE and Scale-RAE code (tiny configs, random weights, fp32, CPU).

Needs: a checkout of github.com/bytetriper/RAE, one of github.com/ZitengWangNYU/Scale-RAE, and a scratch venv
(outside this repo) with torch + numpy + einops (+ tqdm; torchdiffeq for the RAE sampler). It never imports
transformers or timm: it installs small sys.modules stubs for them (and for `regex` and the `scale_rae`
package) before importing the official modules, so that neither needs installing.

    python3 -m venv /tmp/refvenv && /tmp/refvenv/bin/pip install torch==2.13.0 numpy einops tqdm torchdiffeq
    /tmp/refvenv/bin/python make_fixtures.py --rae /path/RAE --scale-rae /path/Scale-RAE --out fixtures

Every file is a plain dict of tensors/primitives (torch.load(..., weights_only=True)); fixtures/README.md lists
the keys. Nothing in the project imports this script.
"""
import argparse
import importlib
import math
import os
import sys
import types

import torch
from torch import nn


# ----------------------------------------------------------------------------- stubs for the official imports
def _module(name, **attrs):
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    sys.modules[name] = mod
    return mod


class PatchEmbed(nn.Module):
    """timm.models.vision_transformer.PatchEmbed as the official code uses it: conv k=s=p, flatten, no norm."""
    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, bias=True, **_):
        super().__init__()
        self.img_size, self.patch_size = (img_size, img_size), (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size, bias=bias)
        self.norm = nn.Identity()

    def forward(self, x):
        assert x.shape[-2:] == self.img_size, "timm asserts the input size (strict_img_size)"
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))  # (B, N, D)


class PretrainedConfig:
    """transformers.PretrainedConfig reduced to what RAE's ViTMAEConfig and GeneralDecoder read."""
    def __init__(self, **kwargs):
        self.chunk_size_feed_forward = 0
        self.output_hidden_states = False
        self.__dict__.update(kwargs)


def install_stubs(rae_root, scale_rae_root):
    unused = type("Unused", (nn.Module,), {"__init__": lambda self, *a, **k: nn.Module.__init__(self)})
    _module("regex", B=None)                                          # DDT.py: dead `from regex import B`
    _module("transformers", SwinModel=unused)                         # DDT.py: dead import
    _module("transformers.configuration_utils", PretrainedConfig=PretrainedConfig)
    _module("transformers.utils", ModelOutput=object)                 # outputs are only read as .logits
    _module("transformers.activations", ACT2FN={"gelu": nn.GELU()})   # HF "gelu" = exact erf GELU
    _module("transformers.modeling_outputs", BaseModelOutput=object)
    _module("timm"), _module("timm.models")
    _module("timm.models.vision_transformer", PatchEmbed=PatchEmbed, Mlp=unused, Attention=unused)
    # RAE: import stage1.decoders without stage1/__init__.py (which builds HF encoders)
    sys.path.insert(0, os.path.join(rae_root, "src"))
    _module("stage1", __path__=[os.path.join(rae_root, "src", "stage1")])
    # Scale-RAE: skip scale_rae/__init__.py and scale_rae/model/__init__.py (the Qwen2 wrapper, XLA, ...)
    _module("scale_rae", __path__=[os.path.join(scale_rae_root, "scale_rae")])
    _module("scale_rae.utils", IS_XLA_AVAILABLE=False)
    _module("scale_rae.model", __path__=[os.path.join(scale_rae_root, "scale_rae", "model")])


# ----------------------------------------------------------------------------- helpers
@torch.no_grad()
def randomise(model, seed, std=0.1):
    """Every trainable param ~ N(0, std) (norm weights 1 + N(0, std)); the official init zeros adaLN and the final
    layer, which would make every output vacuous. Frozen params (sin-cos pos_embed, t_embedder.W) and buffers
    (RoPE tables) keep what the official constructor computed."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        noise = torch.randn(p.shape, generator=gen) * std
        p.copy_(1 + noise if "norm" in name and name.endswith("weight") else noise)


def state_of(model):
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def official(name):
    """An official module, by name (the checkouts are on sys.path / stubbed packages after install_stubs)."""
    return importlib.import_module(name)


def git_head(root):
    head = os.popen(f"git -C {root} rev-parse HEAD 2>/dev/null").read().strip()
    return head or "unknown"


# ----------------------------------------------------------------------------- RAE stage 2: DiT^DH and LightningDiT
def rae_euler(model_forward, noise, y, shift):
    """The official sampler of §A7: create_transport + Sampler.sample_ode(euler, 50 steps) via torchdiffeq."""
    transport_mod = official("stage2.transport")
    Sampler, create_transport = transport_mod.Sampler, transport_mod.create_transport
    transport = create_transport(path_type="Linear", prediction="velocity", time_dist_type="uniform",
                                 time_dist_shift=shift)
    sample_fn = Sampler(transport).sample_ode(sampling_method="euler", num_steps=50, atol=1e-6, rtol=1e-3,
                                              reverse=False)
    calls = []

    def logged(x, t, y):
        calls.append(t[0].clone())
        return model_forward(x, t, y)
    with torch.no_grad():
        out = sample_fn(noise, logged, y=y)[-1]
    return out, sample_fn.__self__.t.clone(), torch.stack(calls)


def make_rae_dit(cls, config, seed, out_path, guide_config=None):
    torch.manual_seed(seed)
    model = cls(**config).eval()
    randomise(model, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    C, S, K = config["in_channels"], config["input_size"], config["num_classes"]
    x = torch.randn(3, C, S, S, generator=gen)
    t = torch.tensor([0.9, 0.5, 0.05])
    y = torch.tensor([1, 7, K])                     # the last one is the null class
    with torch.no_grad():
        out = model(x, t, y)
    # grid of the released 256-px sampler: time_dist_shift_dim = 16*16*768 (s = sqrt(48)); the tiny C*H*W = 128
    # would give s < 1, which Transport's `assert time_dist_shift >= 1.0` rejects.
    shift_dim = 196608
    shift = math.sqrt(shift_dim / 4096)
    noise = torch.randn(2, C, S, S, generator=gen)
    y_sample = torch.tensor([3, 9])
    euler_out, grid, t_calls = rae_euler(model.forward, noise, y_sample, shift)
    fx = dict(state=state_of(model), config=dict(config), x=x, t=t, y=y, out=out,
              time_dist_shift_dim=shift_dim, shift=shift, noise=noise, y_sample=y_sample,
              grid=grid, t_calls=t_calls, euler_out=euler_out)
    if guide_config is not None:                    # AutoGuidance (§A7.7): guide = another random tiny DiT^DH
        torch.manual_seed(seed + 2)
        guide = cls(**guide_config).eval()
        randomise(guide, seed + 2)
        with torch.no_grad():
            ag_out = model.forward_with_autoguidance(x, t, y, cfg_scale=1.42, additional_model_forward=guide.forward,
                                                     cfg_interval=(0.0, 1.0))
        fx.update(guide_state=state_of(guide), guide_config=dict(guide_config), ag_scale=1.42, ag_out=ag_out)
    torch.save(fx, out_path)
    return fx


# ----------------------------------------------------------------------------- RAE stage 1: GeneralDecoder
def make_rae_decoder(seed, out_path):
    GeneralDecoder = official("stage1.decoders.decoder").GeneralDecoder
    ViTMAEConfig = official("stage1.decoders.utils").ViTMAEConfig
    config = dict(hidden_size=8, decoder_hidden_size=64, decoder_num_hidden_layers=2, decoder_num_attention_heads=4,
                  decoder_intermediate_size=128, patch_size=4, image_size=16, layer_norm_eps=1e-12, hidden_act="gelu")
    num_patches = 16
    torch.manual_seed(seed)
    decoder = GeneralDecoder(ViTMAEConfig(**config), num_patches=num_patches).eval()
    randomise(decoder, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    z = torch.randn(2, num_patches, config["hidden_size"], generator=gen)
    z_drop = torch.randn(2, 1 + num_patches, config["hidden_size"], generator=gen)
    with torch.no_grad():
        out = decoder.unpatchify(decoder(z, drop_cls_token=False).logits)             # RAE: rae.py L106-107
        out_drop = decoder.unpatchify(decoder(z_drop, drop_cls_token=True).logits)    # Scale-RAE: token 0 dropped
    fx = dict(state=state_of(decoder), config=dict(config, num_patches=num_patches), z=z, out=out,
              z_drop=z_drop, out_drop=out_drop)
    torch.save(fx, out_path)
    return fx


# ----------------------------------------------------------------------------- Scale-RAE: LightningDiT + RF sampler
def make_scale_rae(seed, out_path):
    diffloss = official("scale_rae.model.diffusion_loss.diffloss")
    FullSequenceRectifiedFlowProjector = diffloss.FullSequenceRectifiedFlowProjector
    LightningDiT = official("scale_rae.model.diffusion_loss.models.lightningDiT").LightningDiT
    config = dict(input_size=4, patch_size=1, in_channels=8, hidden_size=32, depth=2, num_heads=4,
                  class_dropout_prob=0.1, z_channels=16, cond_silu=True)
    torch.manual_seed(seed)
    model = LightningDiT(**config).eval()
    randomise(model, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(3, 8, 4, 4, generator=gen)
    t = torch.tensor([0.9, 0.5, 0.05])
    y = torch.randn(3, 16, 16, generator=gen)       # (B, L, z_channels): per-token conditions
    with torch.no_grad():
        out = model(x, t, y)
    # the full projector, with the same DiT weights
    # base_dim = 128/72 gives the shift of the released model, sqrt(256*1152/4096) = sqrt(72), on the tiny C*N = 128
    # (the default base_dim 4096 would give 1/sqrt(32) < 1, a grid no released model sees).
    proj_config = dict(z_channels=16, diffusion_channels=8, diffusion_tokens=16, model_hidden_size=32, model_depth=2,
                       model_heads=4, class_dropout_prob=0.1, cond_silu=True, inference_step=50, base_dim=128 / 72)
    proj = FullSequenceRectifiedFlowProjector(**proj_config).eval()
    proj.model.load_state_dict(model.state_dict(), strict=True)
    flow = proj.inference_flow
    steps = []

    def logged_euler(model_fn, x_t, t_curr, t_next, denoised_fn, model_kwargs, _euler=flow.euler_forward):
        steps.append(torch.stack([t_curr[0], t_next[0]]))
        return _euler(model_fn, x_t, t_curr, t_next, denoised_fn, model_kwargs)
    flow.step_fn = flow.euler_forward = logged_euler  # p_sample_loop calls both names
    z_cond = torch.randn(1, 16, 16, generator=gen)
    x_end = torch.randn(1, 8, 4, 4, generator=gen)
    with torch.no_grad():
        infer_out = proj.infer(z_cond, x_end=x_end)  # (1, 16 tokens, 8 channels)
    steps = torch.stack(steps)                       # (K, 2): (t_in, t_next) per model call
    fx = dict(state=state_of(model), config=config, W=model.t_embedder.W.clone(), x=x, t=t, y=y, out=out,
              projector_config=proj_config, base_dim=proj.base_dim, shift=1 / flow.size_ratio,
              z_cond=z_cond, x_end=x_end, infer_out=infer_out, steps=steps, dt=steps[:, 1] - steps[:, 0])
    torch.save(fx, out_path)
    return fx


# ----------------------------------------------------------------------------- main
def main(args):
    install_stubs(args.rae, args.scale_rae)
    DiTwDDTHead = official("stage2.models.DDT").DiTwDDTHead
    LightningDiT = official("stage2.models.lightningDiT").LightningDiT
    os.makedirs(args.out, exist_ok=True)
    ddt = dict(input_size=4, patch_size=1, in_channels=8, hidden_size=[32, 64], depth=[2, 1], num_heads=[4, 4],
               mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=10, use_qknorm=False, use_swiglu=True,
               use_rope=True, use_rmsnorm=True, wo_shift=False, use_pos_embed=True)
    guide = dict(ddt, hidden_size=[16, 16], depth=[1, 1])
    ldit = dict(input_size=4, patch_size=1, in_channels=8, hidden_size=32, depth=2, num_heads=4, mlp_ratio=4.0,
                class_dropout_prob=0.1, num_classes=10, learn_sigma=False, use_qknorm=False, use_swiglu=True,
                use_rope=True, use_rmsnorm=True, wo_shift=False)
    made = {
        "rae_ditdh.pt": make_rae_dit(DiTwDDTHead, ddt, 0, os.path.join(args.out, "rae_ditdh.pt"), guide),
        "rae_lightningdit.pt": make_rae_dit(LightningDiT, ldit, 10, os.path.join(args.out, "rae_lightningdit.pt")),
        "rae_decoder.pt": make_rae_decoder(20, os.path.join(args.out, "rae_decoder.pt")),
        "scale_rae_dit.pt": make_scale_rae(30, os.path.join(args.out, "scale_rae_dit.pt")),
    }
    print(f"RAE {git_head(args.rae)}  Scale-RAE {git_head(args.scale_rae)}  torch {torch.__version__}")
    for name, fx in made.items():
        size = os.path.getsize(os.path.join(args.out, name))
        shapes = {k: tuple(v.shape) for k, v in fx.items() if torch.is_tensor(v)}
        print(f"{name} ({size / 1024:.0f} KiB): {shapes}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rae", required=True, help="checkout of github.com/bytetriper/RAE")
    p.add_argument("--scale-rae", required=True, help="checkout of github.com/ZitengWangNYU/Scale-RAE")
    p.add_argument("--out", default="fixtures", help="output folder")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
