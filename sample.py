"""Generate images: noise -> DiT (Euler / Heun / stochastic on the shifted grid, CFG or AutoGuidance) -> latent z -> decoder.

    python sample.py --demo                                   # CPU, no download: train the toy decoder + DiT, sample, score
    python sample.py --ckpt runs/dit --decoder runs/decoder/decoder.safetensors --prompt "a red circle on the left"
    python sample.py --ckpt runs/dit/dit.safetensors --decoder dec.safetensors --prompts prompts.txt --n 4 --guidance 4
    # the released models (README, "Sample from the released models"): RAE's DiT^DH-XL with AutoGuidance
    python sample.py --ckpt rae/DiTs/Dinov2/wReg_base/ImageNet256/DiTDH-XL/stage2_model.pt \
        --guide rae/DiTs/Dinov2/wReg_base/ImageNet256/DiTDH-S_ep14/stage2_model.pt --guidance 1.42 \
        --decoder rae/decoders/dinov2/wReg_base/ViTXL_n08 --stats rae/stats/dinov2/wReg_base/imagenet1k/stat.pt --class 207
    # and Scale-RAE's text-to-image model (Qwen2.5-1.5B + 2.4B DiT)
    python sample.py --ckpt scale-rae --decoder siglip2-decoder --prompt "a photo of a cat on a windowsill"
    # the 50k-sample protocol of RAE's FID: 50 per class, sharded over GPUs, resumable, PNGs + an ADM .npz
    torchrun --nproc_per_node=8 sample.py --ckpt ... --per-class 50 --npz --out fid50k

`generate()` is the whole method in one function (conditions -> latents); the rest of the file loads the models, writes
PNGs and scores. Three kinds of --ckpt: a train_dit.py export (dit.safetensors, EMA weights; the encoder path and the
latent kind come from its metadata unless given), RAE's released stage2_model.pt (class-conditional ImageNet), and
Scale-RAE's released snapshot folder (text-to-image). The released ones sample in fp32 with their own code's step
schedule (dit.official_schedule), so that the same noise gives the official code's latents. --score prints each
sample's zero-shot SigLIP-2 image-text logit computed on the generated latent itself (no decoding: generated latents
live in the encoder's own space), and, for toy-world prompts, the toy GenEval accuracies.
"""
import argparse
import functools
import json
import math
import os
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

import ckpt
import data
import dit
import eval
import latents
import qwen
import rae
import toy
import vae

# the pixel statistics the released decoders' outputs are normalised with (their encoder's image processor)
PIXEL_STATS = {"imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), "siglip": ((0.5,) * 3, (0.5,) * 3)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", action="store_true", help="train the toy decoder and DiT on CPU, then sample and score")
    p.add_argument("--ckpt", help="a train_dit.py run folder or its dit.safetensors; RAE's stage2_model.pt; or "
                   "Scale-RAE's snapshot folder")
    p.add_argument("--decoder", help="decoder.safetensors (train_decoder.py) or a released decoder (model.pt or its "
                   "folder); without it only latents are saved")
    p.add_argument("--encoder", help="SigLIP-2 snapshot folder (default: the one the DiT was trained with)")
    p.add_argument("--vae", help="FLUX VAE for a --latent vae DiT (default: the one it was trained with)")
    p.add_argument("--stats", help="latent statistics of a released RAE DiT (its stat.pt)")
    p.add_argument("--pixel-stats", choices=sorted(PIXEL_STATS), default="imagenet",
                   help="a released RAE decoder's pixel normalisation: imagenet (DINOv2, MAE) or siglip (SigLIP2-B)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", help="a text file with one prompt per line")
    p.add_argument("--class", dest="classes", action="append", default=[],
                   help="a class id, or a name of --class-names, for a class-conditional DiT (repeatable)")
    p.add_argument("--class-names", help="a text file with the name of class k on line k (e.g. ImageNet's 1000)")
    p.add_argument("--per-class", type=int, default=0, help="the FID protocol: this many samples of every class, in "
                   "a seeded random order, one PNG each (resumable; shards over torchrun ranks)")
    p.add_argument("--npz", action="store_true", help="with --per-class: also write samples.npz (arr_0, uint8 "
                   "(N, H, W, 3)), the ADM evaluator's input")
    p.add_argument("--guide", help="AutoGuidance: a weaker DiT of the same latent and condition (the same kind of "
                   "file as --ckpt), which takes the unconditional prediction's place (scale: --guidance)")
    p.add_argument("--n", type=int, default=1, help="samples per prompt")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale, or AutoGuidance's "
                   "with --guide (1: off; default 4 for our DiTs, 1 for --demo and the released models, 1.42 for a "
                   "released DiT with --guide, RAE's scale at 256 px)")
    p.add_argument("--guidance-interval", type=float, nargs=2, default=(0.0, 1.0),
                   help="apply guidance only for t in [lo, hi]")
    p.add_argument("--steps", type=int, default=50, help="sampler steps (our grid)")
    p.add_argument("--schedule", choices=["auto", "ours", "official"], default="auto", help="time steps: ours "
                   "(--steps on the shifted grid) or the released code's (auto: official for a released --ckpt)")
    p.add_argument("--sampler", choices=["euler", "heun", "stochastic"], default="euler",
                   help="Euler / Heun ODE, or stochastic: fresh noise each step (dit.sample; --demo uses it)")
    p.add_argument("--eta", type=float, default=1.0, help="stochastic sampler: share of fresh noise (0: Euler)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto", help="bf16 autocast on a GPU "
                   "(auto: for our DiTs; the released ones sample in fp32, as their code)")
    p.add_argument("--batch", type=int, default=16, help="samples per forward")
    p.add_argument("--seed", type=int, default=0, help="noise seed (image j of the run: seed * 1e6 + j, whatever --batch)")
    p.add_argument("--out", default="samples", help="output folder: one PNG per sample + grid.png")
    p.add_argument("--save-latents", action="store_true", help="also save the latents as latents.safetensors")
    p.add_argument("--score", action="store_true", help="print SigLIP scores of the latents (+ toy GenEval)")
    p.add_argument("--raw", action="store_true", help="use the non-EMA weights of a run folder's ckpt.pt")
    args = p.parse_args(argv)
    if args.steps < 1 or args.n < 1 or args.batch < 1 or args.per_class < 0:
        p.error("--steps, --n and --batch must be positive, --per-class not negative")
    if not args.demo and not args.ckpt:
        p.error("--ckpt is required (or --demo)")
    if not 0.0 <= args.eta <= 1.0:
        p.error(f"--eta must be in [0, 1], got {args.eta}")
    return args


# ----------------------------------------------------------------------------- the method
def autocast(device, enabled=True):
    """bf16 on a GPU, fp32 on the CPU (whose bf16 matmuls are far slower) or when not enabled."""
    return torch.autocast("cuda", torch.bfloat16) if enabled and device.type == "cuda" else nullcontext()


@torch.no_grad()
def generate(model, conditions, items, alpha, seed=0, steps=50, sampler="euler", guidance=1.0,
             guidance_interval=(0.0, 1.0), eta=1.0, batch=16, progress=True, guide=None, schedule=None,
             indices=None, bf16=True):
    """Prompts or class ids -> latents z (len(items), N, C) in the DiT's latent space. model: a DiT (dit.load_dit,
    dit.load_rae_dit, dit.load_scale_rae_dit); conditions: a function from a list of items to the DiT's condition
    (text_conditions, class ids as a tensor, or Scale-RAE's LLM queries); alpha: the time shift; guide: a DiT for
    AutoGuidance, or None for classifier-free guidance; schedule: the (t, t_next) steps (None: `steps` on our grid).
    Item k starts from noise drawn from its own generator, seeded seed * 10^6 + indices[k] (default k), which also
    draws its fresh noise in the stochastic sampler: the same image whatever `batch` or sharding."""
    device = next(model.parameters()).device
    N, C = model.cfg.num_tokens, model.cfg.in_channels
    indices = range(len(items)) if indices is None else indices
    gens = [torch.Generator(device).manual_seed(seed * 1_000_000 + j) for j in indices]
    noise = torch.stack([torch.randn(N, C, generator=g, device=device) for g in gens])  # (B, N, C)
    out = []
    for i in range(0, len(items), batch):
        chunk = items[i:i + batch]
        cond = conditions(chunk)  # (b, T, Dt) text states, (b,) class ids or (b, N, Dy) per-token conditions
        with autocast(device, bf16):
            out.append(dit.sample(model, noise[i:i + len(chunk)], cond, alpha, steps=steps, method=sampler,
                                  guidance=guidance, guidance_interval=tuple(guidance_interval), guide=guide,
                                  progress=functools.partial(tqdm, desc="sampling") if progress else None,
                                  eta=eta, generator=gens[i:i + len(chunk)], schedule=schedule).float())
    return torch.cat(out)


def text_conditions(siglip):
    """Our text-conditioned DiTs read the SigLIP-2 text tower's token states (B, 64, Dt) of the prompts."""
    device = next(siglip.parameters()).device
    return lambda prompts: siglip.text(siglip.tokenizer(prompts).to(device)).float()


def class_conditions(device):
    """Class-conditional DiTs read the class ids themselves, (B,) long."""
    return lambda ids: torch.tensor(ids, device=device)


# ----------------------------------------------------------------------------- loading the three kinds of checkpoint
@dataclass
class Models:
    kind: str  # "ours", "rae" (a released stage2_model.pt) or "scale-rae" (a released snapshot)
    model: torch.nn.Module  # the DiT
    alpha: float  # its time shift
    conditions: object  # items -> the DiT's condition (see generate)
    decode: object  # latents (B, N, C) -> pixels (B, 3, H, W) in [-1, 1]; None without --decoder
    guide: torch.nn.Module | None = None
    meta: dict | None = None  # our export's metadata
    siglip: torch.nn.Module | None = None  # our DiTs' text encoder (and the scorer)
    ae: rae.RAE | None = None


def checkpoint_kind(path):
    """'scale-rae' for a Scale-RAE snapshot folder, 'rae' for RAE's torch-pickled stage2_model.pt, else 'ours'."""
    config = os.path.join(path, "config.json")
    if os.path.isdir(path) and os.path.exists(config) and ckpt.read_json(config).get("model_type") == "cambrian_qwen":
        return "scale-rae"
    return "rae" if os.path.isfile(path) and rae.is_torch_file(path) else "ours"


def load_models(args, device):
    """The DiT of --ckpt with everything it needs: its condition encoder, time shift, decode function and --guide.
    Pieces that do not fit each other fail here, before any sampling."""
    kind = checkpoint_kind(args.ckpt)
    m = {"ours": load_ours, "rae": load_rae_release, "scale-rae": load_scale_rae_release}[kind](args, device)
    if m.guide is not None and [getattr(m.guide.cfg, k) for k in ("num_tokens", "in_channels", "cond", "num_classes")] \
            != [getattr(m.model.cfg, k) for k in ("num_tokens", "in_channels", "cond", "num_classes")]:
        raise SystemExit(f"{args.guide}: the guide must generate the same latent ({m.model.cfg.num_tokens}, "
                         f"{m.model.cfg.in_channels}) under the same condition as {args.ckpt}")
    return m


def load_ours(args, device):
    """A train_dit.py export (EMA, or ckpt.pt's weights with --raw) with the SigLIP-2 and latent it was trained on."""
    model, meta = dit.load_dit(args.ckpt, device)
    if args.raw:
        path = os.path.join(args.ckpt if os.path.isdir(args.ckpt) else os.path.dirname(args.ckpt), "ckpt.pt")
        ck = ckpt.read_checkpoint(path)
        if not isinstance(ck.get("model"), dict):
            raise ValueError(f"{path}: missing key 'model' (not a train_dit.py checkpoint)")
        ckpt.load_checked(model, ck["model"], path)
        model = model.to(device)
    cfg, encoder = model.cfg, args.encoder or meta.get("encoder")
    ae, _, siglip = latents.load_rae(encoder, device, meta.get("stats") or None)  # siglip: None for DINOv2
    decoder = load_decoder(args, cfg, device) if args.decoder and meta.get("latent", "rae") == "rae" else None
    if cfg.cond == "text" and (siglip is None or siglip.text.pos_embed.shape[1] != cfg.text_dim):
        width = "it has no text tower" if siglip is None else f"its text tower is {siglip.text.pos_embed.shape[1]} wide"
        raise SystemExit(f"{encoder or 'toy'}: {width}, but {args.ckpt} was trained on text_dim {cfg.text_dim}; pass "
                         f"the --encoder it was trained with")
    ae.decoder = decoder  # RAE.decode: the decoder's pixels (the encoder's normalisation) -> [-1, 1]
    decode = ae.decode if decoder is not None else None
    if meta.get("latent") == "vae":  # the FLUX VAE baseline: tokens -> (B, 16, h, w) -> VAE decoder
        flux, h = vae.load_flux_vae(args.vae or meta.get("vae"), device=device), 2 * math.isqrt(cfg.num_tokens)
        decode = lambda z: flux.decode(vae.unpack(z, h, h))
    conditions = text_conditions(siglip) if cfg.cond == "text" else class_conditions(device)
    guide = dit.load_dit(args.guide, device)[0] if args.guide else None
    return Models("ours", model, float(meta["alpha"]), conditions, decode, guide, meta, siglip, ae)


def load_rae_release(args, device):
    """RAE's class-conditional ImageNet models: a stage2_model.pt DiT (+ a --guide), the decoder of its encoder, and
    its stat.pt. The latent is the normalised one (stat.pt), the pixels the encoder's (--pixel-stats)."""
    model = dit.load_rae_dit(args.ckpt, device)
    guide = dit.load_rae_dit(args.guide, device) if args.guide else None
    cfg, decode = model.cfg, None
    if args.decoder:
        decoder = load_decoder(args, cfg, device)
        if not args.stats:
            raise SystemExit(f"--stats: {args.ckpt} generates normalised latents; give its stat.pt to decode them")
        stats = rae.load_latent_stats(args.stats, cfg.in_channels, cfg.num_tokens)
        mean, std = PIXEL_STATS[args.pixel_stats]
        decode = rae.RAE(None, decoder, stats, pixel_mean=mean, pixel_std=std).to(device).decode
    alpha = dit.shift_alpha(cfg.num_tokens, cfg.in_channels)  # sqrt(N C / 4096): sqrt(48) for 256 x 768
    return Models("rae", model, alpha, class_conditions(device), decode, guide)


def load_scale_rae_release(args, device):
    """Scale-RAE's text-to-image model: its snapshot's Qwen2.5 + 256 latent queries + projector turn a prompt into
    per-token conditions of its 2.4B DiT; the siglip2_decoder draws the 224-px image."""
    text = qwen.load_scale_rae(args.ckpt, device)
    tokenizer = qwen.Tokenizer(args.ckpt)
    # the DiT's heads are in no tensor shape: config.json says them
    heads = ckpt.read_json(os.path.join(args.ckpt, "config.json")).get("diffusion_model_heads")
    model = dit.load_scale_rae_dit(qwen.read_dit_state(args.ckpt), num_heads=heads, device=device, path=args.ckpt)
    if args.guide:
        raise SystemExit("--guide: Scale-RAE released no guide model; use --guidance W for classifier-free guidance")

    def conditions(prompts):  # greedy decoding until <im_start>, then the queries' states: (b, 256, Dy)
        out = []
        for p in prompts:
            with tqdm(desc="LLM answer", unit="token") as bar:
                y, answer = qwen.conditions(text, tokenizer, p, progress=lambda ids: bar.update(1))
            print(f"LLM answer: {answer!r}")
            out.append(y)
        return torch.cat(out)

    decode = None
    if args.decoder:
        decoder = load_decoder(args, model.cfg, device)  # Scale-RAE's decoder ignores a leading token: it is given N
        mean, std = PIXEL_STATS["siglip"]
        decode = rae.RAE(None, decoder, None, pixel_mean=mean, pixel_std=std).to(device).decode
    alpha = dit.shift_alpha(model.cfg.num_tokens, model.cfg.in_channels)  # sqrt(72) for 256 x 1152
    return Models("scale-rae", model, alpha, conditions, decode)


def load_decoder(args, cfg, device):
    """--decoder, checked against the latent (N, C) that the DiT of cfg generates, before any sampling."""
    decoder = rae.load_decoder(args.decoder, device)
    if (decoder.cfg.num_tokens, decoder.cfg.latent_dim) != (cfg.num_tokens, cfg.in_channels):
        raise SystemExit(f"{args.decoder}: decodes latents ({decoder.cfg.num_tokens}, {decoder.cfg.latent_dim}), but "
                         f"{args.ckpt} generates ({cfg.num_tokens}, {cfg.in_channels})")
    return decoder


def read_items(args, m):
    """--prompt / --prompts FILE (or --class, for a class-conditional DiT) -> the list of conditions, each repeated
    --n times; --per-class: every class --per-class times, in a seeded random order (as RAE's "equal" labels)."""
    cfg = m.model.cfg
    if cfg.cond == "class":
        names = read_lines(args.class_names, "class names") if args.class_names else []
        if args.per_class:
            order = torch.randperm(cfg.num_classes * args.per_class, generator=torch.Generator().manual_seed(args.seed))
            return (order % cfg.num_classes).tolist()
        ids = [int(c) if c.isdigit() else (names.index(c) if c in names else -1) for c in args.classes]
        bad = [c for c, i in zip(args.classes, ids) if not 0 <= i < cfg.num_classes]
        if not args.classes or bad or args.prompt or args.prompts:
            raise SystemExit(f"{args.ckpt} is class-conditional: give --class N (repeatable, 0 <= N < {cfg.num_classes}"
                             f", or a name of --class-names) and no prompt" + (f"; got --class {bad[0]}" if bad else ""))
        return [c for c in ids for _ in range(args.n)]
    if args.classes or args.per_class:
        raise SystemExit(f"--class / --per-class: {args.ckpt} is conditioned on text; give --prompt TEXT instead")
    prompts = list(args.prompt) + (read_lines(args.prompts, "prompts") if args.prompts else [])
    if not prompts:
        raise SystemExit("no prompt: give --prompt TEXT (repeatable) or --prompts FILE")
    if m.siglip is not None:  # our DiTs read the tower's 64 positions, of which the first text_len
        limit = min(m.siglip.tokenizer.max_len, cfg.text_len)
        for p in prompts:
            n = len(m.siglip.tokenizer.encode(p.lower())) + 1  # + EOS
            if n > limit:
                print(f"note: this prompt is {n} tokens with EOS, the DiT reads the first {limit}: {p[:40]!r}...")
    return [p for p in prompts for _ in range(args.n)]


def read_lines(path, what):
    """The non-empty lines of a UTF-8 text file; an unreadable one stops with one line naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"{path}: cannot read the {what} ({type(e).__name__}: {e})") from None


def score(siglip, ae, z, img, prompts):
    """Print each sample's SigLIP logit with its own prompt, straight from its latent z; with images, and when every
    prompt is a toy caption, the toy GenEval accuracies overall and by kind of prompt, and the FD to real toy images
    in the toy encoder's space beside its real-vs-real floor (returned with the accuracies)."""
    if z is not None:
        with torch.no_grad():
            logits = eval.siglip_scores(siglip, eval.siglip_latent_embeddings(ae, z), prompts)
        for p, s in zip(prompts, logits.tolist()):
            print(f"siglip logit {s:7.3f}  {p}")
    truth = toy.toy_truth(prompts)  # None for prompts that are not toy-world captions
    if img is None or truth is None:
        return None
    show = lambda acc: ", ".join(f"{k} {v:.1%}" for k, v in acc.items() if k != "n" and v == v)  # not NaN
    acc = toy.score_toy(img.cpu(), truth)
    print(f"toy GenEval: {show(acc)}, n {acc['n']}")
    # by kind of prompt: two objects need each colour bound to its own position, which one object does not
    for kind, count in (("one object", 1), ("two objects", 2), ("a word", 0)):
        idx = [i for i, a in enumerate(truth) if len(a.get("objects", [])) == count]
        if idx and len(idx) < len(truth):
            print(f"  {kind:11s} ({len(idx)} prompts): {show(toy.score_toy(img[idx].cpu(), [truth[i] for i in idx]))}")
    with torch.no_grad():
        fd = eval.toy_fd(img.cpu())  # a continuous measure beside the accuracies: 0 would be the real distribution
    print(f"toy FD to {fd['n']} real images: {fd['fd']:.3f} (two real sets of that size: {fd['floor']:.3f})")
    return {**acc, "toy_fd": fd["fd"], "toy_fd_floor": fd["floor"]}


def main(args):
    if args.demo:
        return demo(args)
    # --per-class under torchrun: one process per GPU, each drawing its share (eval.setup joins the process group and
    # picks this rank's device, as eval.py's feature extraction does)
    device = eval.setup()[0] if args.per_class else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    m = load_models(args, device)
    released = m.kind != "ours"
    if args.guidance is None:  # released: unguided, or RAE's AutoGuidance scale (256 px) with a guide; ours: CFG 4
        args.guidance = (1.42 if m.guide is not None else 1.0) if released else 4.0
    official = args.schedule == "official" or (args.schedule == "auto" and released)
    kw = dict(seed=args.seed, steps=args.steps, sampler=args.sampler, guidance=args.guidance,
              guidance_interval=args.guidance_interval, eta=args.eta, batch=args.batch, guide=m.guide,
              schedule=dit.official_schedule(m.kind if released else "rae", m.alpha) if official else None,
              bf16=args.precision == "bf16" or (args.precision == "auto" and not released))
    items = read_items(args, m)
    if args.per_class:
        return protocol(args, m, items, device, kw)
    t0 = time.time()
    z = generate(m.model, m.conditions, items, m.alpha, **kw)  # (len(items), N, C)
    print(f"{len(items)} samples in {time.time() - t0:.1f}s")
    os.makedirs(args.out, exist_ok=True)
    if args.save_latents:
        ckpt.save_safetensors(os.path.join(args.out, "latents.safetensors"), {"z": z.cpu()},
                              metadata={"prompts": json.dumps(items)})
    scorable = m.kind == "ours" and m.meta.get("latent", "rae") == "rae" and m.model.cfg.cond == "text"
    captions = [p if isinstance(p, str) else f"class {p}" for p in items]  # the grid's captions
    if m.decode is None:
        if args.score and scorable:
            score(m.siglip, m.ae, z, None, captions)
        print("no --decoder: saved latents only" if args.save_latents else "no --decoder given: nothing to draw")
        return None
    with torch.no_grad(), autocast(device, kw["bf16"]):
        img = torch.cat([m.decode(b).float() for b in z.split(args.batch)]).clamp(-1, 1)  # (B, 3, H, W)
    for k, im in enumerate(img):
        data.save_image_grid(os.path.join(args.out, f"{k:04d}.png"), im[None])
    columns = args.n if args.n > 1 else min(6, len(items))  # a row per prompt, or rows of 6 single samples
    data.save_image_grid(os.path.join(args.out, "grid.png"), img, captions, columns=columns)
    print(f"wrote {len(img)} images and grid.png to {args.out}")
    return score(m.siglip, m.ae, z if scorable else None, img, captions) if args.score and m.siglip else None


def protocol(args, m, labels, device, kw):
    """RAE's FID protocol: --per-class samples of every class (labels: all classes, each --per-class times, in a seeded
    order), image j written as OUT/{j:06d}.png from the noise of index j, quantised as the official script does
    (clamp to [0, 1], x 255, truncate). Rank r of W draws the j with j % W == r; PNGs already there are skipped, so a
    stopped run resumes. --npz: rank 0 then packs them into samples.npz (arr_0, uint8 (N, H, W, 3))."""
    if m.decode is None:
        raise SystemExit("--per-class writes images: give --decoder")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    os.makedirs(args.out, exist_ok=True)
    path = lambda j: os.path.join(args.out, f"{j:06d}.png")
    todo = [j for j in range(rank, len(labels), world) if not os.path.exists(path(j))]
    if rank == 0:
        print(f"{len(labels)} samples ({args.per_class} per class) in {args.out}: {len(todo)} to draw on rank 0 of {world}")
    for i in tqdm(range(0, len(todo), args.batch), desc="batches", disable=rank != 0):
        js = todo[i:i + args.batch]  # this rank's next batch of image indices
        z = generate(m.model, m.conditions, [labels[j] for j in js], m.alpha, **kw, indices=js, progress=False)
        with torch.no_grad(), autocast(device, kw["bf16"]):
            img = m.decode(z).float()  # (b, 3, H, W), about [-1, 1]
        pixels = ((img + 1) / 2).clamp(0, 1).mul(255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        for j, px in zip(js, pixels):
            Image.fromarray(px).save(path(j) + ".tmp.png")
            os.replace(path(j) + ".tmp.png", path(j))  # a PNG is there whole or not at all
    if dist.is_initialized():
        dist.barrier()
    if args.npz and rank == 0:
        arr = np.stack([np.asarray(Image.open(path(j)).convert("RGB")) for j in range(len(labels))])
        np.savez(os.path.join(args.out, "samples.npz"), arr_0=arr)
        print(f"wrote {args.out}/samples.npz {arr.shape}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return labels


def demo(args):
    """The whole method on CPU with no download: toy decoder and toy DiT, samples of a fixed prompt set, scores.
    The two trainings run side by side, each on half the cores: the DiT needs the decoder only to draw pictures, and
    two small models on one core each use a CPU better than one after the other on all of them."""
    t0 = time.time()
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // 2))}
    os.makedirs("runs", exist_ok=True)
    toy.load_encoder()  # written once here, before two processes would race to write it
    # --resume: a second demo continues (or, when finished, reuses) the runs instead of being refused
    with open(os.path.join("runs", "toy_decoder.log"), "w") as log:
        print(f"training the toy decoder (log: {log.name}) and the toy DiT side by side")
        jobs = [subprocess.Popen([sys.executable, os.path.join(here, "train_decoder.py"), "--preset", "toy", "--resume"],
                                 env=env, stdout=log, stderr=subprocess.STDOUT),
                subprocess.Popen([sys.executable, os.path.join(here, "train_dit.py"), "--preset", "toy", "--resume",
                                  "--sample-every", "0"], env=env)]
        codes = [job.wait() for job in jobs]
    if any(codes):
        raise SystemExit(f"demo: a training run failed (exit codes: decoder {codes[0]}, DiT {codes[1]}); see above and "
                         f"runs/toy_decoder.log. If runs/ holds the runs of an older version, delete runs/ and rerun")
    with open(os.path.join("runs", "toy_decoder.log")) as log:
        print(log.read().strip().splitlines()[-1])  # "done: ..., held-out PSNR ... dB"
    prompts = [p for p, _ in toy.toy_prompts(96, seed=1)]  # 96 held-out prompts: ~130 objects, ~3% standard error
    out = os.path.join("runs", "toy_demo")
    acc = main(parse_args(["--ckpt", "runs/toy_dit", "--decoder", "runs/toy_decoder/decoder.safetensors",
                           "--out", out, "--score", "--save-latents", "--guidance", str(1.0 if args.guidance is None else args.guidance), "--steps", "30",
                           "--batch", "48", "--sampler", "stochastic", *sum((["--prompt", p] for p in prompts), [])]))
    print(f"demo done in {(time.time() - t0) / 60:.1f} min: grid at {out}/grid.png")
    return acc


if __name__ == "__main__":
    main(parse_args())
