"""Generate images from text: noise -> DiT (Euler / Heun / stochastic on the shifted grid, CFG) -> latent z -> decoder.

    python sample.py --demo                                   # CPU, no download: train the toy decoder + DiT, sample, score
    python sample.py --ckpt runs/dit --decoder runs/decoder/decoder.safetensors --prompt "a red circle on the left"
    python sample.py --ckpt runs/dit/dit.safetensors --decoder dec.safetensors --prompts prompts.txt --n 4 --guidance 4

`generate()` is the whole method in one function (prompts -> latents); the rest of the file loads the models, writes
PNGs and scores. The DiT is rebuilt from the config stored in its export (dit.safetensors, EMA weights); the encoder
path and the latent kind come from there too unless given. --score prints each sample's zero-shot SigLIP-2
image-text logit computed on the generated latent itself (no decoding: generated latents live in the encoder's own
space), and, for toy-world prompts, the toy GenEval accuracies.
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

import torch
from tqdm import tqdm

import ckpt
import data
import dit
import rae
import toy
import vae


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", action="store_true", help="train the toy decoder and DiT on CPU, then sample and score")
    p.add_argument("--ckpt", help="a train_dit.py run folder or its dit.safetensors")
    p.add_argument("--decoder", help="decoder.safetensors (train_decoder.py); without it only latents are saved")
    p.add_argument("--encoder", help="SigLIP-2 snapshot folder (default: the one the DiT was trained with)")
    p.add_argument("--vae", help="FLUX VAE for a --latent vae DiT (default: the one it was trained with)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", help="a text file with one prompt per line")
    p.add_argument("--class", dest="classes", type=int, action="append", default=[],
                   help="a class id, for a class-conditional DiT (repeatable)")
    p.add_argument("--guide", help="AutoGuidance: a weaker DiT export of the same latent and condition, which takes "
                   "the unconditional prediction's place (scale: --guidance)")
    p.add_argument("--n", type=int, default=1, help="samples per prompt")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (1: off; default 4, and 1 for --demo, where it scores best)")
    p.add_argument("--guidance-interval", type=float, nargs=2, default=(0.0, 1.0),
                   help="apply guidance only for t in [lo, hi]")
    p.add_argument("--steps", type=int, default=50, help="sampler steps")
    p.add_argument("--sampler", choices=["euler", "heun", "stochastic"], default="euler",
                   help="Euler / Heun ODE, or stochastic: fresh noise each step (dit.sample; --demo uses it)")
    p.add_argument("--eta", type=float, default=1.0, help="stochastic sampler: share of fresh noise (0: Euler)")
    p.add_argument("--batch", type=int, default=16, help="samples per forward")
    p.add_argument("--seed", type=int, default=0, help="noise seed (image j of the run: seed * 1e6 + j, whatever --batch)")
    p.add_argument("--out", default="samples", help="output folder: one PNG per sample + grid.png")
    p.add_argument("--save-latents", action="store_true", help="also save the latents as latents.safetensors")
    p.add_argument("--score", action="store_true", help="print SigLIP scores of the latents (+ toy GenEval)")
    p.add_argument("--raw", action="store_true", help="use the non-EMA weights of a run folder's ckpt.pt")
    args = p.parse_args(argv)
    if args.steps < 1 or args.n < 1 or args.batch < 1:
        p.error("--steps, --n and --batch must be positive")
    if not args.demo and not args.ckpt:
        p.error("--ckpt is required (or --demo)")
    if not 0.0 <= args.eta <= 1.0:
        p.error(f"--eta must be in [0, 1], got {args.eta}")
    if args.guidance is None:  # the toy DiT draws sharper shapes unguided (NOTES.md, the guidance sweep)
        args.guidance = 1.0 if args.demo else 4.0
    return args


# ----------------------------------------------------------------------------- the method
def autocast(device):
    """bf16 on a GPU, fp32 on the CPU (whose bf16 matmuls are far slower)."""
    return torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else nullcontext()


@torch.no_grad()
def generate(model, siglip, prompts, alpha, seed=0, steps=50, sampler="euler", guidance=1.0,
             guidance_interval=(0.0, 1.0), eta=1.0, batch=16, progress=True, guide=None):
    """Prompts (or class ids, for a class-conditional DiT) -> latents z (len(prompts), N, C) in the DiT's latent
    space. model: a DiT (dit.load_dit); siglip: the frozen SigLIP-2 whose text tower conditions it; alpha: its time
    shift; guide: a DiT for AutoGuidance, or None for classifier-free guidance. Image j starts from noise drawn from
    its own generator, seeded seed * 10^6 + j, which also draws its fresh noise in the stochastic sampler: the same
    image j whatever `batch`."""
    device = next(model.parameters()).device
    N, C = model.cfg.num_tokens, model.cfg.in_channels
    gens = [torch.Generator(device).manual_seed(seed * 1_000_000 + j) for j in range(len(prompts))]
    noise = torch.stack([torch.randn(N, C, generator=g, device=device) for g in gens])  # (B, N, C)
    out = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        with autocast(device):
            if model.cfg.cond == "text":
                cond = siglip.text(siglip.tokenizer(chunk).to(device)).float()  # (b, 64, Dt) text states
            else:
                cond = torch.tensor(chunk, device=device)  # (b,) class ids
            out.append(dit.sample(model, noise[i:i + len(chunk)], cond, alpha, steps=steps, method=sampler,
                                  guidance=guidance, guidance_interval=tuple(guidance_interval), guide=guide,
                                  progress=functools.partial(tqdm, desc="sampling") if progress else None,
                                  eta=eta, generator=gens[i:i + len(chunk)]).float())
    return torch.cat(out)


# ----------------------------------------------------------------------------- loading, checking, writing
def load_models(args, device):
    """The DiT (EMA, or ckpt.pt's weights with --raw), its metadata, the SigLIP-2 it was trained with, the RAE, a
    decode function (latents -> pixels; None without --decoder) and the --guide DiT (or None). Towers, decoder and
    guide that do not fit the DiT fail here, before any sampling."""
    model, meta = dit.load_dit(args.ckpt, device)
    if args.raw:
        path = os.path.join(args.ckpt if os.path.isdir(args.ckpt) else os.path.dirname(args.ckpt), "ckpt.pt")
        ck = ckpt.read_checkpoint(path)
        if not isinstance(ck.get("model"), dict):
            raise ValueError(f"{path}: missing key 'model' (not a train_dit.py checkpoint)")
        ckpt.load_checked(model, ck["model"], path)
        model = model.to(device)
    cfg, encoder = model.cfg, args.encoder or meta.get("encoder")
    siglip = toy.load_encoder(encoder).to(device)
    stats = rae.load_latent_stats(meta["stats"], cfg.in_channels, cfg.num_tokens) if meta.get("stats") else None
    decoder = rae.load_decoder(args.decoder, device) if args.decoder else None
    if cfg.cond == "text" and siglip.text.pos_embed.shape[1] != cfg.text_dim:
        raise SystemExit(f"{encoder or 'toy'}: its text tower is {siglip.text.pos_embed.shape[1]} wide, but {args.ckpt} "
                         f"was trained on text_dim {cfg.text_dim}; pass the --encoder it was trained with")
    if decoder is not None and meta.get("latent", "rae") == "rae" and \
            (decoder.cfg.num_tokens, decoder.cfg.latent_dim) != (cfg.num_tokens, cfg.in_channels):
        raise SystemExit(f"{args.decoder}: decodes latents ({decoder.cfg.num_tokens}, {decoder.cfg.latent_dim}), but "
                         f"{args.ckpt} generates ({cfg.num_tokens}, {cfg.in_channels})")
    guide = dit.load_dit(args.guide, device)[0] if args.guide else None
    if guide is not None and [getattr(guide.cfg, k) for k in ("num_tokens", "in_channels", "cond", "num_classes")] != \
            [getattr(cfg, k) for k in ("num_tokens", "in_channels", "cond", "num_classes")]:
        raise SystemExit(f"{args.guide}: the guide must generate the same latent ({cfg.num_tokens}, {cfg.in_channels}) "
                         f"under the same condition ({cfg.cond}, {cfg.num_classes} classes) as {args.ckpt}")
    ae = rae.RAE(siglip.vision, decoder, stats).to(device)
    decode = ae.decode if decoder is not None else None  # latents (B, N, C) -> pixels (B, 3, H, W)
    if meta.get("latent") == "vae":  # the FLUX VAE baseline: tokens -> (B, 16, h, w) -> VAE decoder
        flux, h = vae.load_flux_vae(args.vae or meta.get("vae"), device=device), 2 * math.isqrt(cfg.num_tokens)
        decode = lambda z: flux.decode(vae.unpack(z, h, h))
    return model, meta, siglip, ae, decode, guide


def read_prompts(args, tokenizer, cfg):
    """--prompt and --prompts FILE (or --class, for a class-conditional DiT) -> the list of conditions, each
    repeated --n times. A prompt longer than the DiT reads is cut; say so, in tokens."""
    if cfg.cond == "class":
        bad = [c for c in args.classes if not 0 <= c < cfg.num_classes]
        if not args.classes or bad or args.prompt or args.prompts:
            raise SystemExit(f"{args.ckpt} is class-conditional: give --class N (repeatable, 0 <= N < "
                             f"{cfg.num_classes}) and no prompt" + (f"; got --class {bad[0]}" if bad else ""))
        return [c for c in args.classes for _ in range(args.n)]
    if args.classes:
        raise SystemExit(f"--class: {args.ckpt} is conditioned on text; give --prompt TEXT instead")
    prompts = list(args.prompt)
    if args.prompts:
        try:
            with open(args.prompts, encoding="utf-8") as f:
                prompts += [line.strip() for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise SystemExit(f"{args.prompts}: cannot read the prompts ({type(e).__name__}: {e})") from None
    if not prompts:
        raise SystemExit("no prompt: give --prompt TEXT (repeatable) or --prompts FILE")
    limit = min(tokenizer.max_len, cfg.text_len)  # the tower's 64 positions, of which the DiT reads text_len
    for p in prompts:
        n = len(tokenizer.encode(p.lower())) + 1  # + EOS
        if n > limit:
            print(f"note: this prompt is {n} tokens with EOS, the DiT reads the first {limit}: {p[:40]!r}...")
    return [p for p in prompts for _ in range(args.n)]


def score(siglip, ae, z, img, prompts):
    """Print each sample's SigLIP logit with its own prompt, straight from its latent z; with images, and when every
    prompt is a toy caption, the toy GenEval accuracies overall and by kind of prompt (returned)."""
    if z is not None:
        with torch.no_grad():
            img_emb = siglip.vision.pool(ae.unnormalize(z))
            txt_emb = siglip.text.pool(siglip.text(siglip.tokenizer(prompts).to(z.device)))
            logits = siglip.logits(img_emb, txt_emb).diagonal()
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
    return acc


def main(args):
    if args.demo:
        return demo(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, meta, siglip, ae, decode, guide = load_models(args, device)
    prompts = read_prompts(args, siglip.tokenizer, model.cfg)
    t0 = time.time()
    z = generate(model, siglip, prompts, float(meta["alpha"]), args.seed, args.steps, args.sampler, args.guidance,
                 args.guidance_interval, args.eta, args.batch, guide=guide)  # (len(prompts), N, C)
    print(f"{len(prompts)} samples in {time.time() - t0:.1f}s")
    os.makedirs(args.out, exist_ok=True)
    if args.save_latents:
        ckpt.save_safetensors(os.path.join(args.out, "latents.safetensors"), {"z": z.cpu()},
                              metadata={"prompts": json.dumps(prompts)})
    scorable = meta.get("latent", "rae") == "rae" and model.cfg.cond == "text"  # SigLIP logits: RAE latent, prompt
    prompts = [p if isinstance(p, str) else f"class {p}" for p in prompts]  # the grid's captions
    if decode is None:
        if args.score and scorable:
            score(siglip, ae, z, None, prompts)
        print("no --decoder: saved latents only" if args.save_latents else "no --decoder given: nothing to draw")
        return None
    with torch.no_grad(), autocast(device):
        img = torch.cat([decode(b).float() for b in z.split(args.batch)]).clamp(-1, 1)  # (B, 3, H, W)
    for k, im in enumerate(img):
        data.save_image_grid(os.path.join(args.out, f"{k:04d}.png"), im[None])
    columns = args.n if args.n > 1 else min(6, len(prompts))  # a row per prompt, or rows of 6 single samples
    data.save_image_grid(os.path.join(args.out, "grid.png"), img, prompts, columns=columns)
    print(f"wrote {len(img)} images and grid.png to {args.out}")
    return score(siglip, ae, z if scorable else None, img, prompts) if args.score else None


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
                           "--out", out, "--score", "--guidance", str(args.guidance), "--steps", "30", "--batch", "48",
                           "--sampler", "stochastic", *sum((["--prompt", p] for p in prompts), [])]))
    print(f"demo done in {(time.time() - t0) / 60:.1f} min: grid at {out}/grid.png")
    return acc


if __name__ == "__main__":
    main(parse_args())
