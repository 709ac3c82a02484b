"""Stage 1: train the RAE decoder to turn frozen SigLIP-2 latents back into pixels (arXiv 2510.11690, Sec. 3).

Loss = L1 + perceptual + adaptive-weight hinge GAN, as the official RAE recipe, with two changes that need no
extra weights: the perceptual loss and the discriminator both read features of the frozen encoder itself
(RAE uses LPIPS-VGG and a frozen DINO-S/8). Latent noise augmentation z + sigma * eps, sigma ~ tau U(0, 1).

    python train_decoder.py --preset toy                     # CPU, the built-in toy world, a few minutes
    python train_decoder.py --encoder ckpt/siglip2-so400m-patch14-224 --data /data/images --model XL
    torchrun --nproc_per_node=8 train_decoder.py --encoder ckpt/siglip2-so400m-patch14-224 --data /data/shards/{000..999}.tar

Writes to --out: metrics.jsonl, recon_*.png (input | output on held-out images), ckpt.pt (resumable with
--resume, which an --out holding one requires) and decoder.safetensors (EMA weights + config, for rae.load_decoder /
sample.py).
"""
import argparse
import copy
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.nn.utils.parametrizations import spectral_norm
from tqdm import tqdm

import ckpt
import data
import rae
import toy
import training

TOY = dict(data="toy", val_data="toy", model="toy", batch=16, steps=1500, lr=1e-3, min_lr=1e-4, warmup=50,
           ema=0.99, noise_tau=0.4, disc_start=900, gan_start=1100, gan_weight=0.1, log_every=25, eval_every=250,
           save_every=250, val_images=32, workers=0, out="runs/toy_decoder")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["toy"], help="toy: toy world, toy encoder, toy decoder on CPU (flags still win)")
    p.add_argument("--encoder", help="SigLIP-2 snapshot folder (default with --preset toy: the toy encoder)")
    p.add_argument("--data", help="training data: 'toy', an image folder, class folders, or .tar shards")
    p.add_argument("--val-data", help="held-out images for PSNR ('toy' uses the toy world's test split)")
    p.add_argument("--val-images", type=int, default=256, help="held-out images for PSNR")
    p.add_argument("--out", default="runs/decoder", help="output folder")
    p.add_argument("--model", default="XL", choices=list(rae.DECODER_PRESETS), help="decoder size preset")
    p.add_argument("--steps", type=int, default=40_000, help="optimizer steps (RAE: 16 ImageNet epochs at 512)")
    p.add_argument("--batch", type=int, default=512, help="global batch size, split over ranks")
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (decoder and discriminator)")
    p.add_argument("--min-lr", type=float, default=2e-5, help="cosine floor")
    p.add_argument("--warmup", type=int, default=2500, help="linear warmup steps from 0")
    p.add_argument("--ema", type=float, default=0.9978, help="EMA decay per step")
    p.add_argument("--clip", type=float, default=0.0, help="grad-norm clip (0: off, as in RAE)")
    p.add_argument("--noise-tau", type=float, default=0.8, help="latent noise augmentation tau (0 disables)")
    p.add_argument("--perceptual-weight", type=float, default=1.0, help="weight of the encoder-feature loss")
    p.add_argument("--gan-weight", type=float, default=0.75, help="weight of the adaptive GAN term")
    p.add_argument("--max-d-weight", type=float, default=1e4, help="clamp of the adaptive GAN weight")
    p.add_argument("--disc-start", type=int, default=15_000, help="step at which the discriminator starts training")
    p.add_argument("--gan-start", type=int, default=20_000, help="step at which the GAN loss reaches the decoder")
    p.add_argument("--workers", type=int, default=8, help="DataLoader workers per rank")
    p.add_argument("--log-every", type=int, default=50, help="steps between metrics lines")
    p.add_argument("--eval-every", type=int, default=1000, help="steps between held-out PSNR + recon grid")
    p.add_argument("--save-every", type=int, default=1000, help="steps between checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt if there is one (required if so)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decoder")
    p.add_argument("--seed", type=int, default=0, help="seed for data order, noise and augmentation")
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset")
    if pre.parse_known_args(argv)[0].preset == "toy":  # the preset changes defaults; explicit flags still win
        p.set_defaults(**TOY)
    args = p.parse_args(argv)
    if args.data is None:
        p.error("--data is required (or use --preset toy)")
    if args.encoder is None and args.preset != "toy":
        p.error("--encoder is required (a SigLIP-2 snapshot folder; see `python rae.py download`)")
    if args.steps < 1 or args.batch < 1:
        p.error(f"--steps and --batch must be positive (got {args.steps}, {args.batch})")
    return args


# ----------------------------------------------------------------------------- losses
def perceptual_loss(encoder, layers, recon, img):
    """LPIPS-like distance in the frozen encoder's feature space: unit-normalize each token's features at
    several depths, mean squared difference. Gradients flow to `recon` only."""
    with torch.no_grad():
        target = encoder.features(img, layers)
    loss = 0.0
    for f, t in zip(encoder.features(recon.clamp(-1, 1), layers), target):  # (B, N, D) each
        loss = loss + (F.normalize(f, dim=-1) - F.normalize(t, dim=-1)).pow(2).sum(-1).mean()
    return loss / len(layers)


def noise_augment(z, tau, generator=None):
    """RAE decoder-training augmentation: z + sigma * eps with sigma ~ tau * U(0, 1) per sample (tau = 0.8)."""
    if tau <= 0:
        return z
    sigma = tau * torch.rand(z.shape[0], 1, 1, device=z.device, dtype=z.dtype, generator=generator)
    return z + sigma * torch.randn(z.shape, device=z.device, dtype=z.dtype, generator=generator)


def diff_augment(x, generator):
    """DiffAugment as in RAE (from StyleGAN-T): brightness, saturation, contrast, and an integer translation
    of up to 1/8 of the size with zero fill; differentiable, per-sample randomness. x in [-1, 1]."""
    B = x.shape[0]
    r = lambda: torch.rand(B, 1, 1, 1, device=x.device, generator=generator)  # one draw per sample
    x = x + (r() - 0.5)  # brightness
    m = x.mean(1, keepdim=True)
    x = (x - m) * (r() * 2) + m  # saturation
    m = x.mean((1, 2, 3), keepdim=True)
    x = (x - m) * (r() + 0.5) + m  # contrast
    H, W = x.shape[2:]
    shift = (torch.rand(B, 2, device=x.device, generator=generator) * 2 - 1) * 0.125  # fraction of the size
    shift = (shift * torch.tensor([W, H], device=x.device)).round() * 2 / torch.tensor([W, H], device=x.device)
    theta = torch.zeros(B, 2, 3, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, :, 2] = shift  # whole pixels, in grid units
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


class Discriminator(nn.Module):
    """Frozen encoder features at several depths + one small trainable head per depth (RAE's design, with the
    encoder in place of DINO-S/8): spectral-norm 1x1 conv, a residual k=9 circular conv over tokens, 1 logit
    per token. The encoder is held as a plain attribute so it is never trained, wrapped or saved."""
    def __init__(self, encoder, layers, width=256):
        super().__init__()
        self.__dict__["encoder"] = encoder  # not a submodule
        self.layers = layers
        dim = encoder.pos_embed.shape[1]
        def head():
            return nn.ModuleDict(dict(
                inp=nn.Sequential(spectral_norm(nn.Conv1d(dim, width, 1)), nn.GroupNorm(width, width, eps=1e-6),
                                  nn.LeakyReLU(0.2)),
                res=nn.Sequential(spectral_norm(nn.Conv1d(width, width, 9, padding=4, padding_mode="circular")),
                                  nn.GroupNorm(width, width, eps=1e-6), nn.LeakyReLU(0.2)),
                out=spectral_norm(nn.Conv1d(width, 1, 1))))
        self.heads = nn.ModuleList(head() for _ in layers)

    def forward(self, img, grad_to_input=True):
        with torch.no_grad() if not grad_to_input else nullcontext():
            feats = self.encoder.features(img.clamp(-1, 1), self.layers)
        logits = []
        for h, f in zip(self.heads, feats):
            x = h["inp"](f.transpose(1, 2))  # (B, width, N)
            x = (x + h["res"](x)) / math.sqrt(2)
            logits.append(h["out"](x)[:, 0])  # (B, N)
        return torch.cat(logits, dim=1)  # (B, len(layers) * N)


def adaptive_weight(rec_loss, gan_loss, last_layer, max_weight):
    """VQGAN's balance: ||grad rec|| / ||grad gan|| at the decoder's last layer, clamped, no gradient."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    return (g_rec.norm() / (g_gan.norm() + 1e-6)).clamp(0, max_weight).detach()


def psnr(a, b):
    """Mean PSNR in dB of images in [-1, 1], each measured on [0, 1] after clamping."""
    mse = ((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(1 / mse.clamp_min(1e-10))).mean().item()


# ----------------------------------------------------------------------------- the steps of main
def frozen_encoder(args, run):
    """The frozen SigLIP-2 vision tower as an RAE without decoder: latents (ae.encode), perceptual features and
    discriminator features (ae.encoder.features) all come from it. Returns (ae, the block indices the losses tap)."""
    ae = rae.RAE(toy.load_encoder(args.encoder or "toy", text=False).vision.to(run.device))
    depth = len(ae.encoder.blocks)
    return ae, sorted({max(0, depth * k // 4 - 1) for k in (1, 2, 3, 4)})  # e.g. 27 blocks -> 5, 12, 19, 26


def held_out_images(args, run, size):
    """(val_images, 3, size, size) on the device for the PSNR, or None without --val-data."""
    if not args.val_data:
        return None
    val_set = toy.ToyWorld(size, seed=args.seed, split="test") if args.val_data == "toy" else \
        data.build_dataset(args.val_data, size)
    return torch.stack([val_set[i]["img"] for i in range(args.val_images)]).to(run.device)


def build_models(args, run, encoder, taps):
    """Decoder + EMA copy + discriminator heads, and their AdamW optimizers (RAE's betas, no weight decay)."""
    cfg = rae.DecoderConfig(latent_dim=encoder.pos_embed.shape[1], num_tokens=encoder.grid ** 2,
                            patch_size=encoder.patch, **rae.DECODER_PRESETS[args.model])
    torch.manual_seed(args.seed)  # identical initial weights on every rank
    decoder = rae.Decoder(cfg).to(run.device)
    ema = copy.deepcopy(decoder).requires_grad_(False)
    disc = Discriminator(encoder, taps).to(run.device)
    opt = torch.optim.AdamW(decoder.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
    if run.master:
        print(f"decoder {args.model}: {sum(p.numel() for p in decoder.parameters()) / 1e6:.1f}M params, latents "
              f"{cfg.num_tokens} x {cfg.latent_dim}, images {encoder.grid * encoder.patch}px, world {run.world}, "
              f"device {run.device}")
    return cfg, dict(decoder=decoder, ema=ema, disc=disc), dict(opt=opt, opt_d=opt_d)


def resume(args, run, cfg, models, opts):
    """Continue exactly from OUT/ckpt.pt: weights, optimizers, step and data position -> (step, epoch, consumed).
    The file is checked first: another --model or --encoder, a changed --batch, a truncated or foreign file fail
    here in one message naming every bad key."""
    if not (args.resume and os.path.exists(run.ckpt_path)):
        return 0, 0, 0
    expect = dict(config=asdict(cfg), **{k: m.state_dict() for k, m in models.items()}, **opts, step=int, epoch=int,
                  consumed=int, args=dict)
    ck = ckpt.check_resume(run.ckpt_path, expect, vars(args), fixed=("batch",))
    for name, obj in {**models, **opts}.items():
        obj.load_state_dict(ck[name])
    changed = training.note_changes(ck["args"], args, ("steps", "lr", "min_lr", "warmup"))
    if run.master:
        print(f"resumed from {run.ckpt_path} at step {ck['step']}" + (f" ({', '.join(changed)})" if changed else ""))
    return ck["step"], ck["epoch"], ck["consumed"]


def save(args, run, cfg, models, opts, step, epoch, consumed):
    """ckpt.pt (everything to resume exactly) and decoder.safetensors (the EMA weights, for sampling)."""
    if run.master:
        ck = dict(**{k: m.state_dict() for k, m in {**models, **opts}.items()}, step=step, epoch=epoch,
                  consumed=consumed, config=asdict(cfg), args=vars(args))
        ckpt.save_checkpoint(run.ckpt_path, ck)
        rae.save_decoder(os.path.join(args.out, "decoder.safetensors"), models["ema"])
    run.barrier()


@torch.no_grad()
def evaluate(args, run, ema, ae, val_img, step):
    """Held-out PSNR of the EMA decoder, and recon_STEP.png: rows of (input | reconstruction)."""
    ema.eval()
    with run.autocast():
        recon = torch.cat([ema(ae.encode(b)) for b in val_img.split(16)]).float()
    pairs = torch.stack([val_img[:8], recon[:8].clamp(-1, 1)], dim=1).flatten(0, 1)  # (16, 3, H, W): in, out, ...
    data.save_image_grid(os.path.join(args.out, f"recon_{step:06d}.png"), pairs, columns=2)
    return psnr(recon, val_img)


def train_step(args, run, m, opts, wrapped, ae, taps, img, step):
    """One step of the decoder, then one of the discriminator once it has started. Noise and augmentation are drawn
    from a generator of (seed, step, rank), so a resumed run draws the same. Returns the step's metrics."""
    gen = torch.Generator(run.device).manual_seed(args.seed * 1_000_003 + step * 101 + run.rank)
    lr = training.lr_at(step, args.lr, args.warmup, args.steps, args.min_lr)
    for group in opts["opt"].param_groups + opts["opt_d"].param_groups:
        group["lr"] = lr
    m["decoder"].train()
    zero = torch.zeros((), device=run.device)
    with run.autocast():
        z = noise_augment(ae.encode(img), args.noise_tau, generator=gen)  # (B, N, C)
        recon = wrapped["decoder"](z).float()  # (B, 3, H, W)
        l1 = (recon - img).abs().mean() / 2  # L1 on [0, 1] pixels, as RAE
        perc = perceptual_loss(ae.encoder, taps, recon, img) if args.perceptual_weight > 0 else zero
        loss = l1 + args.perceptual_weight * perc
        gan, weight = zero, zero
        if step >= args.gan_start and args.gan_weight > 0:
            gan = -m["disc"](diff_augment(recon, gen)).mean()  # generator side of the hinge GAN
            weight = adaptive_weight(loss, gan, m["decoder"].pred.weight, args.max_d_weight)
            loss = loss + args.gan_weight * weight * gan
    # the loss before backward (under DDP the gradients mix the ranks, so this is where a rank's own NaN shows), the
    # gradient after it, both before the step
    training.check_finite(run, step, loss=loss)
    opts["opt"].zero_grad(set_to_none=True)
    loss.backward()
    gnorm = torch.nn.utils.clip_grad_norm_(m["decoder"].parameters(), args.clip if args.clip > 0 else float("inf"))
    training.check_finite(run, step, gradient_norm=gnorm)
    opts["opt"].step()
    training.ema_update(m["ema"], m["decoder"], args.ema)
    d_loss = zero
    if step >= args.disc_start:  # hinge loss on 8-bit-quantized reconstructions vs real images
        fake = ((recon.detach().clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1
        with run.autocast():
            d_real = wrapped["disc"](diff_augment(img, gen), grad_to_input=False)
            d_fake = wrapped["disc"](diff_augment(fake, gen), grad_to_input=False)
            d_loss = 0.5 * (F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean())
        training.check_finite(run, step, discriminator_loss=d_loss)
        opts["opt_d"].zero_grad(set_to_none=True)
        d_loss.backward()
        opts["opt_d"].step()
    return dict(loss=loss.item(), l1=l1.item(), perceptual=perc.item(), gan=gan.item(), gan_weight=weight.item(),
                d_loss=d_loss.item(), lr=lr, grad_norm=gnorm.item())


def main(args):
    # setup: one process (python) or one per GPU (torchrun), the same code path
    run = training.setup(args)
    stop = training.StopSignal()
    # the frozen encoder, the data, the trainable models
    ae, taps = frozen_encoder(args, run)
    size = ae.encoder.grid * ae.encoder.patch
    train_set = toy.dataset(args.data, size, run.rank, run.world, seed=args.seed)
    val_img = held_out_images(args, run, size)
    cfg, models, opts = build_models(args, run, ae.encoder, taps)
    step, epoch, consumed = resume(args, run, cfg, models, opts)
    # compile / wrap: keep the unwrapped decoder for EMA and saving
    wrapped = dict(decoder=torch.compile(models["decoder"]) if args.compile else models["decoder"], disc=models["disc"])
    if run.ddp:
        wrapped = {k: DDP(w, device_ids=[run.local] if run.device.type == "cuda" else None) for k, w in wrapped.items()}

    # the loop
    batches = data.infinite_batches(train_set, args.batch // run.world, run.rank, run.world, args.seed, args.workers,
                                    epoch, consumed)
    bad = data.BadSampleCounter()
    log = open(os.path.join(args.out, "metrics.jsonl"), "a") if run.master else None
    t0, seen, first = time.time(), 0, step
    # the bar only on rank 0 and only on a terminal (disable=None): a log file gets the metrics lines, not a bar
    bar = tqdm(total=args.steps, initial=step, disable=None if run.master else True, dynamic_ncols=True)
    while step < args.steps and not stop.requested(run):
        epoch, consumed, batch = next(batches)
        bad.update(batch.get("bad", {}))
        img = batch["img"].to(run.device, non_blocking=True)
        if step == first:  # where the data enters: once, not in every forward (it reads the values: a device sync)
            rae.check_pixels(img, f"--data {args.data}")
        rec = train_step(args, run, models, opts, wrapped, ae, taps, img, step)
        step += 1
        seen += img.shape[0] * run.world
        bar.set_postfix(loss=f"{rec['loss']:.4f}", refresh=False)
        bar.update()
        if run.master and (step % args.log_every == 0 or step == args.steps):
            rec = dict(step=step, **rec, img_per_s=seen / (time.time() - t0), bad_samples=bad.total())
            if val_img is not None and (step % args.eval_every == 0 or step == args.steps):
                rec["val_psnr"] = evaluate(args, run, models["ema"], ae, val_img, step)
            log.write(json.dumps(rec) + "\n")
            log.flush()
            tqdm.write(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items()))
            sys.stdout.flush()  # tqdm.write does not: a cluster's log file would get these lines in bursts
            t0, seen = time.time(), 0
        if step % args.save_every == 0 or step == args.steps:
            save(args, run, cfg, models, opts, step, epoch, consumed)

    # the end: a signal saves where it stopped; a finished run reports its held-out PSNR
    bar.close()
    if step < args.steps:
        save(args, run, cfg, models, opts, step, epoch, consumed)
        if run.master:
            print(f"stop signal: saved step {step} to {run.ckpt_path}; rerun with --resume to continue")
    elif run.master:
        held_out = "" if val_img is None else \
            f", held-out PSNR {evaluate(args, run, models['ema'], ae, val_img, step):.2f} dB"
        print(f"done: {args.out}/decoder.safetensors{held_out}")
    if run.master and bad.total():
        print(f"skipped bad samples: {bad}")
    if run.ddp:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(parse_args())
