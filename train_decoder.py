"""Stage 1: train the RAE decoder to turn frozen SigLIP-2 latents back into pixels (arXiv 2510.11690, Sec. 3).

Loss = L1 + perceptual + adaptive-weight hinge GAN, as the official RAE recipe, with two changes that need no
extra weights: the perceptual loss and the discriminator both read features of the frozen encoder itself
(RAE uses LPIPS-VGG and a frozen DINO-S/8). Latent noise augmentation z + sigma * eps, sigma ~ tau U(0, 1).

    python train_decoder.py --preset toy                     # CPU, the built-in toy world, a few minutes
    python train_decoder.py --encoder ckpt/siglip2-so400m-patch14-224 --data /data/images --decoder XL
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
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.nn.utils.parametrizations import spectral_norm
from tqdm import tqdm

import data
import rae

TOY = dict(data="toy", val_data="toy", decoder="toy", batch=16, steps=1500, lr=1e-3, min_lr=1e-4, warmup=50,
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
    p.add_argument("--decoder", default="XL", choices=list(rae.DECODER_PRESETS), help="decoder size")
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


def lr_at(step, args):
    """Linear warmup from 0, then cosine from lr to min_lr over the remaining steps."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def psnr(a, b):
    """Mean PSNR in dB of images in [-1, 1], each measured on [0, 1] after clamping."""
    mse = ((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(1 / mse.clamp_min(1e-10))).mean().item()


def save_grid(path, img, recon):
    """Rows of (input | reconstruction) as one PNG."""
    from PIL import Image
    pair = torch.cat([img, recon.clamp(-1, 1)], dim=3)  # (B, 3, H, 2W)
    grid = torch.cat(list(pair), dim=1)  # (3, B*H, 2W)
    Image.fromarray(((grid + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()).save(path)


# ----------------------------------------------------------------------------- training
def main(args):
    # setup: one process (python) or one per GPU (torchrun), the same code path
    ddp = "RANK" in os.environ
    if ddp:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", 0))
    else:
        rank, world, local = 0, 1, 0
    device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else nullcontext()
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} is not divisible by the world size {world}")
    master = rank == 0
    os.makedirs(args.out, exist_ok=True)
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    if os.path.exists(ckpt_path) and not args.resume:  # a forgotten --resume must not overwrite days of training
        raise SystemExit(f"{ckpt_path} exists: pass --resume to continue that run, or choose another --out")
    stop = {"signal": None}  # SIGTERM / SIGUSR1 (cluster preemption): finish the step, save, exit 0
    for s in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, lambda num, _: stop.update(signal=num))

    # frozen encoder: latents, perceptual features and discriminator features all come from it
    model = data.toy_encoder() if args.encoder is None and args.preset == "toy" else None
    if model is None:
        if args.encoder is None:
            raise SystemExit("--encoder is required (a SigLIP-2 snapshot folder; see `python rae.py download`)")
        model = rae.load_siglip2(args.encoder, text=False)
    encoder = model.vision.to(device)
    size = encoder.grid * encoder.patch
    ae = rae.RAE(encoder)
    depth = len(encoder.blocks)
    taps = sorted({max(0, depth * k // 4 - 1) for k in (1, 2, 3, 4)})  # e.g. 27 blocks -> 5, 12, 19, 26

    # data
    train_set = data.build_dataset(args.data, size, rank, world, seed=args.seed)
    val_set = data.ToyWorld(size, seed=args.seed, split="test") if args.val_data == "toy" else \
        data.build_dataset(args.val_data, size) if args.val_data else None
    val_img = torch.stack([val_set[i]["img"] for i in range(args.val_images)]).to(device) if val_set else None

    # trainable model + EMA; discriminator heads
    cfg = rae.DecoderConfig(latent_dim=encoder.pos_embed.shape[1], num_tokens=encoder.grid ** 2,
                            patch_size=encoder.patch, **rae.DECODER_PRESETS[args.decoder])
    torch.manual_seed(args.seed)  # identical initial weights on every rank
    decoder = rae.Decoder(cfg).to(device)
    ema = copy.deepcopy(decoder).requires_grad_(False)
    disc = Discriminator(encoder, taps).to(device)
    opt = torch.optim.AdamW(decoder.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
    if master:
        print(f"decoder {args.decoder}: {sum(p.numel() for p in decoder.parameters()) / 1e6:.1f}M params, "
              f"latents {cfg.num_tokens} x {cfg.latent_dim}, images {size}px, world {world}, device {device}")

    # resume: everything needed to continue exactly (weights, optimizers, step, data position)
    step, epoch, consumed = 0, 0, 0
    if args.resume and os.path.exists(ckpt_path):
        # checked first: another --decoder / --encoder, a truncated or foreign file fail here in one line
        ck = rae.load_resume(ckpt_path, dict(config=asdict(cfg), decoder=decoder.state_dict(), ema=ema.state_dict(),
                                             disc=disc.state_dict(), opt=opt, opt_d=opt_d, step=int, epoch=int,
                                             consumed=int, args=dict))
        decoder.load_state_dict(ck["decoder"])
        ema.load_state_dict(ck["ema"])
        disc.load_state_dict(ck["disc"])
        opt.load_state_dict(ck["opt"])
        opt_d.load_state_dict(ck["opt_d"])
        step, epoch, consumed = ck["step"], ck["epoch"], ck["consumed"]
        if master:
            print(f"resumed from {ckpt_path} at step {step}")

    # compile / wrap: keep `decoder` unwrapped for EMA and saving
    train_decoder = torch.compile(decoder) if args.compile else decoder
    train_disc = disc
    if ddp:
        train_decoder = DDP(train_decoder, device_ids=[local] if device.type == "cuda" else None)
        train_disc = DDP(disc, device_ids=[local] if device.type == "cuda" else None)

    def save():
        if master:
            ck = dict(decoder=decoder.state_dict(), ema=ema.state_dict(), disc=disc.state_dict(),
                      opt=opt.state_dict(), opt_d=opt_d.state_dict(), step=step, epoch=epoch, consumed=consumed,
                      config=asdict(cfg), args=vars(args))
            torch.save(ck, ckpt_path + ".tmp")
            os.replace(ckpt_path + ".tmp", ckpt_path)  # a crash mid-write leaves the previous checkpoint intact
            rae.save_decoder(os.path.join(args.out, "decoder.safetensors"), ema)
        if ddp:
            dist.barrier()

    def evaluate():
        ema.eval()
        with torch.no_grad(), autocast:
            recon = torch.cat([ema(ae.encode(b)) for b in val_img.split(16)]).float()
        save_grid(os.path.join(args.out, f"recon_{step:06d}.png"), val_img[:8], recon[:8])
        return psnr(recon, val_img)

    # loop
    per_rank = args.batch // world
    batches = data.infinite_batches(train_set, per_rank, rank, world, args.seed, args.workers, epoch, consumed)
    bad = data.BadSampleCounter()
    log = open(os.path.join(args.out, "metrics.jsonl"), "a") if master else None
    t0, seen = time.time(), 0
    def stopping():  # all ranks stop at the same step, even if the signal reached them at different times
        flag = torch.tensor([stop["signal"] is not None], dtype=torch.int32, device=device)
        if ddp:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def check_finite(name, value):
        """Stop every rank if `value` is not finite on any of them (a rank that stopped alone would leave the others
        waiting in the next collective), before the optimizer step it would feed; nothing is saved, so ckpt.pt and
        decoder.safetensors stay those of the last good save."""
        flag = (~torch.isfinite(value.detach())).int().reshape(1)
        if ddp:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            last = ckpt_path if os.path.exists(ckpt_path) else "none yet"
            raise SystemExit(f"step {step}: {name} is not finite (rank {rank}: {value.item()}); stopping without "
                             f"saving (last good checkpoint: {last})")

    # the bar only on rank 0 and only on a terminal (disable=None): a log file gets the metrics lines, not a bar
    bar = tqdm(total=args.steps, initial=step, disable=None if master else True, dynamic_ncols=True)
    while step < args.steps and not stopping():
        epoch, consumed, batch = next(batches)
        bad.update(batch.get("bad", {}))
        img = batch["img"].to(device, non_blocking=True)
        # per-step generators: noise and augmentation are a function of (seed, step, rank), so resume is exact
        gen = torch.Generator(device).manual_seed(args.seed * 1_000_003 + step * 101 + rank)
        lr = lr_at(step, args)
        for group in opt.param_groups + opt_d.param_groups:
            group["lr"] = lr
        decoder.train()
        with autocast:
            z = rae.noise_augment(ae.encode(img), args.noise_tau, generator=gen)  # (B, N, C)
            recon = train_decoder(z).float()  # (B, 3, H, W)
            l1 = (recon - img).abs().mean() / 2  # L1 on [0, 1] pixels, as RAE
            perc = perceptual_loss(encoder, taps, recon, img) if args.perceptual_weight > 0 else torch.zeros((), device=device)
            loss = l1 + args.perceptual_weight * perc
            gan, weight = torch.zeros((), device=device), torch.zeros((), device=device)
            if step >= args.gan_start and args.gan_weight > 0:
                gan = -disc(diff_augment(recon, gen)).mean()  # generator side of the hinge GAN
                weight = adaptive_weight(loss, gan, decoder.pred.weight, args.max_d_weight)
                loss = loss + args.gan_weight * weight * gan
        check_finite("loss", loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(decoder.parameters(), args.clip if args.clip > 0 else float("inf"))
        opt.step()
        with torch.no_grad():
            for e, p in zip(ema.parameters(), decoder.parameters()):
                e.lerp_(p, 1 - args.ema)
        d_loss = torch.zeros((), device=device)
        if step >= args.disc_start:  # hinge loss on 8-bit-quantized reconstructions vs real images
            fake = ((recon.detach().clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1
            with autocast:
                d_real = train_disc(diff_augment(img, gen), grad_to_input=False)
                d_fake = train_disc(diff_augment(fake, gen), grad_to_input=False)
                d_loss = 0.5 * (F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean())
            check_finite("discriminator loss", d_loss)
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
        step += 1
        seen += img.shape[0] * world
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        bar.update()

        if master and (step % args.log_every == 0 or step == args.steps):
            rec = dict(step=step, loss=loss.item(), l1=l1.item(), perceptual=perc.item(), gan=gan.item(),
                       gan_weight=weight.item(), d_loss=d_loss.item(), lr=lr, grad_norm=gnorm.item(),
                       img_per_s=seen / (time.time() - t0), bad_samples=bad.total())
            if val_img is not None and (step % args.eval_every == 0 or step == args.steps):
                rec["val_psnr"] = evaluate()
            log.write(json.dumps(rec) + "\n")
            log.flush()
            tqdm.write(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items()))
            sys.stdout.flush()  # tqdm.write does not: a cluster's log file would get these lines in bursts
            t0, seen = time.time(), 0
        if step % args.save_every == 0 or step == args.steps:
            save()

    bar.close()
    if step < args.steps:  # stopped by a signal (on this rank or another)
        save()
        if master:
            print(f"stop signal: saved step {step} to {ckpt_path}; rerun with --resume to continue")
    elif master:
        print(f"done: {args.out}/decoder.safetensors" + (f", held-out PSNR {evaluate():.2f} dB" if val_img is not None else ""))
        if bad.total():
            print(f"skipped bad samples: {bad}")
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(parse_args())
