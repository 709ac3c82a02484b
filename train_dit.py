"""Stage 2: train the DiT with flow matching on frozen latents, conditioned on the frozen SigLIP-2 text tower.

`--latent rae`: z = LayerNorm(SigLIP-2 vision tower) (B, 256, 1152), the paper's latent; `--latent vae`: the FLUX.1
VAE latent, 2x2-packed to (B, 256, 64), for the controlled comparison (Scale-RAE Sec. 4). The time shift
alpha = sqrt(N * C / 4096) is computed from the latent shape. One script for one CPU, one GPU and many GPUs:

    python train_dit.py --preset toy                                            # CPU, toy world, minutes
    python train_dit.py --latent rae --encoder ckpt/siglip2-so400m-patch14-224 --data /data/shards/{000..099}.tar
    torchrun --nproc_per_node=8 train_dit.py --latent rae --encoder ckpt/siglip2-so400m-patch14-224 --data ...
    torchrun --nproc_per_node=8 train_dit.py --model T2I-2.4B --fsdp --grad-ckpt ...   # multi-billion presets
    torchrun --nproc_per_node=8 train_dit.py --preset rae --encoder ... --data /data/imagenet/train  # RAE's recipe
    python train_dit.py --plan --model T2I-2.4B --gpus 8 --batch 1024               # memory / FLOPs planner
    python train_dit.py --preset toy --max-samples 2000 --cache-latents runs/toy_cache  # encode once, train from it
    torchrun --nproc_per_node=8 train_dit.py ... --cache-latents /data/cache/so400m    # ranks encode disjoint slices

Writes to --out: metrics.jsonl, samples_*.png, ckpt.pt (--resume continues exactly; SIGTERM/SIGUSR1 save and
exit 0) and dit.safetensors (EMA weights + config + latent description, for sample.py).
"""
import argparse
import copy
import functools
import itertools
import json
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import ckpt
import data
import dit
import latents
import rae
import toy
import training
import vae

TOY = dict(data="toy", model="toy", batch=32, steps=1200, lr=2e-3, warmup=50, ema=0.99, log_every=50,
           save_every=400, sample_every=400, workers=0, out="runs/toy_dit", guidance=3.0)
# RAE's class-conditional ImageNet recipe (DiT^DH-XL, 800 epochs of 1,251 steps at batch 1024): AdamW 2e-4, no
# warmup, held for 40 epochs then linear to 2e-5 at epoch 800, grad clip 1, EMA 0.9995, random horizontal flip.
RAE = dict(class_cond=True, model="DiTDH-XL", batch=1024, steps=1_000_800, lr=2e-4, min_lr=2e-5, schedule="linear",
           warmup=0, hold=50_040, clip=1.0, ema=0.9995, flip=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["toy", "rae"], help="toy: toy world + toy encoder + toy DiT on CPU; rae: RAE's "
                   "class-conditional ImageNet recipe (DiT^DH-XL, its schedule, EMA, batch, flip). Flags still win")
    p.add_argument("--latent", choices=["rae", "vae"], default="rae", help="latent space: SigLIP-2 RAE or FLUX VAE")
    p.add_argument("--encoder", help="SigLIP-2 snapshot folder (text tower always; vision tower for --latent rae)")
    p.add_argument("--vae", help="FLUX VAE weights for --latent vae (ae.safetensors or a diffusers vae/ folder)")
    p.add_argument("--stats", help="latent mean/var safetensors for --latent rae (`python latents.py stats` writes it)")
    p.add_argument("--decoder", help="decoder.safetensors from train_decoder.py, to decode the sample grids")
    p.add_argument("--data", help="'toy', an image folder, class folders, or .tar shards")
    p.add_argument("--class-cond", action="store_true", help="condition on class ids (class-folder datasets)")
    p.add_argument("--flip", action="store_true", help="random horizontal flip (a caption's left/right swap with it)")
    p.add_argument("--max-samples", type=int, default=0, help="only the first N samples (toy, folders; 0: all)")
    p.add_argument("--cache-latents", metavar="DIR", help="encode the data once into DIR (safetensors shards of latents "
                   "and text states) and train from it; later runs reuse DIR. The latents are fixed: no random flip")
    p.add_argument("--cache-dtype", choices=["float32", "bfloat16"], default="float32",
                   help="storage of --cache-latents: bfloat16 halves the disk and rounds values by up to 2^-8 relative")
    p.add_argument("--model", default="T2I-2.4B", choices=list(dit.PRESETS), help="DiT preset")
    p.add_argument("--out", default="runs/dit", help="output folder")
    p.add_argument("--steps", type=int, default=60_000, help="optimizer steps")
    p.add_argument("--batch", type=int, default=1024, help="global batch size (split over ranks and accumulation)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=5.65e-4, help="peak learning rate (Scale-RAE's DiT lr)")
    p.add_argument("--connector-lr", type=float, help="peak lr of the text connector, same schedule (default: --lr)")
    p.add_argument("--min-lr", type=float, default=0.0, help="end of the cosine schedule")
    p.add_argument("--schedule", choices=["cosine", "linear", "constant"], default="cosine",
                   help="after warmup and --hold: cosine or linear down to --min-lr at --steps, or constant")
    p.add_argument("--warmup", type=int, default=800, help="linear warmup steps from 0")
    p.add_argument("--hold", type=int, default=0, help="steps at the peak lr after warmup, before the decay")
    p.add_argument("--wd", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--clip", type=float, default=1.0, help="grad-norm clip (0: off)")
    p.add_argument("--ema", type=float, default=0.9995, help="EMA decay per step")
    p.add_argument("--p-drop", type=float, default=0.1, help="condition dropout to the learned null (for CFG)")
    p.add_argument("--text-stats", type=int, default=1024, help="training captions (over all ranks) whose text states "
                   "fix the DiT's text standardisation at step 0 (dit.DiT.set_text_stats)")
    p.add_argument("--fsdp", action="store_true", help="shard every block with FSDP2 fully_shard (else DDP)")
    p.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing per DiT block")
    p.add_argument("--compile", action="store_true", help="torch.compile the DiT")
    p.add_argument("--workers", type=int, default=8, help="DataLoader workers per rank")
    p.add_argument("--log-every", type=int, default=100, help="steps between metrics lines")
    p.add_argument("--save-every", type=int, default=1000, help="steps between checkpoints")
    p.add_argument("--sample-every", type=int, default=5000, help="steps between sample grids (0: never)")
    p.add_argument("--prompt", action="append", help="a fixed prompt of the sample grid (repeatable)")
    p.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale of the sample grid")
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt if there is one (required if so)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, data order and noise")
    p.add_argument("--plan", action="store_true", help="print parameters, FLOPs and memory per GPU, then exit")
    p.add_argument("--gpus", type=int, default=8, help="GPU count for --plan")
    p.add_argument("--gpu-mem", type=float, default=80, help="GiB per GPU for --plan")
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset")
    p.set_defaults(**{"toy": TOY, "rae": RAE}.get(pre.parse_known_args(argv)[0].preset, {}))
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch < 1 or args.grad_accum < 1:
        p.error(f"--steps, --batch and --grad-accum must be positive (got {args.steps}, {args.batch}, {args.grad_accum})")
    if not args.plan and args.data is None:
        p.error("--data is required (or use --preset toy)")
    if not args.plan and args.encoder is None and args.preset != "toy":
        p.error("--encoder is required (a SigLIP-2 snapshot folder; see `python rae.py download`)")
    if args.latent == "vae" and args.vae is None and not args.plan:
        p.error("--latent vae needs --vae (FLUX ae.safetensors or a diffusers vae/ folder)")
    if args.flip and args.cache_latents:
        p.error("--flip: cached latents are fixed, a random flip cannot apply (drop one of --flip, --cache-latents)")
    if args.class_cond and args.connector_lr is not None:
        p.error("--connector-lr: class conditioning has no text connector")
    args.connector_lr = args.lr if args.connector_lr is None else args.connector_lr
    return args


# ----------------------------------------------------------------------------- planner
def plan(args):
    """Parameters, FLOPs per step and memory per GPU under DDP and FSDP2, from a model built on the meta device."""
    cfg = dit.DiTConfig(**dit.PRESETS[args.model])
    with torch.device("meta"):
        n = sum(p.numel() for p in dit.DiT(cfg).parameters())
    per_gpu = args.batch / args.gpus / args.grad_accum  # samples per micro-batch: what activations scale with
    D, L, N = cfg.hidden_size, cfg.depth + cfg.ddt_depth, cfg.num_tokens
    text = cfg.cond == "text"
    # activations kept for backward, bf16, per sample and block: ~34 N D bytes (Korthikanti et al. 2022, with
    # SDPA so no N^2 term), plus 12 N D for the per-token adaLN modulations (6 D per token) in text mode; the
    # connector's blocks run over T + N tokens. Checkpointing keeps each block's input (2 N D) and one block live.
    per_block = (34 + 12 * text) * N * D
    conn = 34 * (cfg.text_len + N) * D * cfg.connector_depth if text else 0
    act = (per_block * L + conn) * per_gpu / 2**30
    act_ckpt = (2 * N * D * L + per_block + conn) * per_gpu / 2**30
    state = 16 * n / 2**30  # fp32 params 4 + grads 4 + Adam m, v 8 bytes
    ema = 4 * n / 2**30
    print(f"{args.model}: {n / 1e9:.3f}B params, {dit.flops(cfg) / 1e12:.2f} TFLOPs/sample (fwd+bwd), "
          f"{dit.flops(cfg) * args.batch / 1e15:.2f} PFLOPs/step at global batch {args.batch}, {per_gpu:g} samples/GPU "
          f"per micro-batch")
    print(f"{'GiB per GPU':12s} {'params+grads+Adam':>18s} {'EMA':>6s} {'activations':>12s} {'act. ckpt':>10s} "
          f"{'total':>7s} {'total ckpt':>11s}")
    for name, shard in (("DDP", 1), (f"FSDP2 x{args.gpus}", args.gpus)):
        fixed = (state + ema) / shard
        print(f"{name:12s} {state / shard:18.1f} {ema / shard:6.1f} {act:12.1f} {act_ckpt:10.1f} {fixed + act:7.1f} "
              f"{fixed + act_ckpt:11.1f}{'' if fixed + act_ckpt < args.gpu_mem else f'  > {args.gpu_mem:g} GiB even with ckpt'}")


# ----------------------------------------------------------------------------- optimizer, noise, frozen models
def make_optimizer(model, args):
    """AdamW, betas as Scale-RAE's DiT. With --connector-lr the text connector (dit.py's text_proj, queries,
    connector, text_norm, text_out, text_pool) is a second param group; the default keeps one group, as older
    checkpoints have."""
    split = args.connector_lr != args.lr
    in_conn = lambda name: split and name.startswith(dit.CONNECTOR_PREFIXES)
    conn = [p for k, p in model.named_parameters() if in_conn(k)]
    rest = [p for k, p in model.named_parameters() if not in_conn(k)]
    groups = [dict(params=rest, name="dit")] + ([dict(params=conn, name="connector")] if conn else [])
    # fused: one kernel for all parameters (the per-parameter loop was ~17% of a CPU step)
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), weight_decay=args.wd, fused=True)


def set_lr(opt, step, args):
    """The schedule at this step; the connector's group follows it scaled to its own peak."""
    lr = training.lr_at(step, args.lr, args.warmup, args.steps, args.min_lr, args.schedule, args.hold)
    for group in opt.param_groups:
        group["lr"] = lr * (args.connector_lr / args.lr if group.get("name") == "connector" else 1.0)
    return lr


def per_sample_noise(seed, step, indices, shape, alpha, p_drop, device):
    """(t, eps, drop) for samples with these global batch positions: a function of (seed, step, position)
    only, so any split over ranks and micro-batches draws the same numbers as one process would."""
    t, eps, drop = [], [], []
    for i in indices:
        g = torch.Generator(device).manual_seed((seed * 1_000_003 + step) * 65_537 + i)
        t.append(dit.sample_t(1, alpha, g, device))
        eps.append(torch.randn(shape, generator=g, device=device))
        drop.append(torch.rand(1, generator=g, device=device) < p_drop)
    return torch.cat(t), torch.stack(eps), torch.cat(drop)


class FrozenTowers:
    """The frozen models: images -> latents z (B, N, C) (the RAE, or the FLUX VAE with --latent vae), captions ->
    text states (B, 64, Dt) (the SigLIP-2 text tower). Never trained, wrapped or saved. They run in fp32 (TF32 matmuls
    on a GPU), as the official code encodes: only the DiT trains under bf16 autocast, so the latents are the fp32
    ones the released DiTs and decoders were made with.
    A DINOv2 snapshot as --encoder gives RAE's ImageNet latent (latents.load_rae); it has no text tower."""
    def __init__(self, args, run):
        self.kind, self.device = args.latent, run.device
        if args.latent == "rae":
            self.rae, self.size, self.siglip = latents.load_rae(args.encoder, run.device, args.stats)
        else:
            self.siglip = toy.load_encoder(args.encoder or "toy").to(run.device)
            self.vae = vae.load_flux_vae(args.vae, device=run.device)
            self.size = 256  # 256 px -> 32 x 32 x 16 -> 2x2 patches: 256 tokens x 64, as Scale-RAE's baseline
        if self.siglip is None and not args.class_cond:
            raise SystemExit(f"--encoder {args.encoder}: DINOv2 has no text tower; train it class-conditional "
                             f"(--class-cond)")
        self.text = self.siglip.text if self.siglip is not None else None
        self.shape = tuple(self.latents(torch.zeros(1, 3, self.size, self.size, device=run.device)).shape[1:])  # (N, C)

    @torch.no_grad()
    def latents(self, img):
        """img (B, 3, H, W) in [-1, 1] -> z (B, N, C)."""
        z = self.rae.encode(img) if self.kind == "rae" else vae.pack(self.vae.encode(img))
        return z.float()

    @torch.no_grad()
    def text_states(self, captions):
        """B captions -> (B, 64, Dt), the text tower's last states."""
        return self.siglip.text(self.siglip.tokenizer(captions).to(self.device)).float()

    def for_cache(self, class_cond, batch):
        """A collated batch -> what --cache-latents stores: z (B, N, C) and text states (B, T, Dt) or labels (B,)."""
        z = self.latents(batch["img"].to(self.device))
        return dict(z=z, label=batch["label"]) if class_cond else dict(z=z, text=self.text_states(batch["caption"]))


# ----------------------------------------------------------------------------- the steps of main
def training_data(args, run, towers):
    """The dataset to train on: --data read on the fly, or its latents cached once in --cache-latents DIR."""
    build = functools.partial(toy.dataset, args.data, towers.size, run.rank, run.world, args.seed, args.flip,
                              args.max_samples)
    if not args.cache_latents:
        return build()
    N, C = towers.shape
    text = None if args.class_cond else list(towers.text.pos_embed.shape)  # (T, Dt)
    fields = dict(latent=args.latent, N=N, C=C, text=text, encoder=args.encoder or "toy", vae=args.vae,
                  stats=args.stats, data=args.data, max_samples=args.max_samples, size=towers.size,
                  dtype=args.cache_dtype)  # what a later run must match to reuse DIR
    encode = functools.partial(towers.for_cache, args.class_cond)
    return latents.latent_cache(args.cache_latents, fields, build, encode, run.rank, run.world,
                                args.batch // run.world, args.workers, getattr(torch, args.cache_dtype))


def build_model(args, run, towers, train_set):
    """The DiT preset, fitted to the latent (N, C) and the text tower (or the classes), and its EMA copy."""
    N, C = towers.shape
    tower = towers.text
    preset = dict(dit.PRESETS[args.model])
    T, Dt = tower.pos_embed.shape if tower is not None else (0, 0)  # the text tower's positions and width
    preset.update(in_channels=C, num_tokens=N, text_dim=Dt, text_len=min(preset.get("text_len", 64), T))
    if args.class_cond:
        preset.update(cond="class", num_classes=len(getattr(train_set, "classes", [])) or preset.get("num_classes", 1000))
    else:
        preset.update(cond="text")
    cfg = dit.DiTConfig(**preset)
    torch.manual_seed(args.seed)  # identical initial weights on every rank
    model = dit.DiT(cfg).to(run.device)
    ema = copy.deepcopy(model).requires_grad_(False)
    if run.master:
        print(f"DiT {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params; latent {args.latent} "
              f"{N} x {C}, alpha {dit.shift_alpha(N, C):.3f}; world {run.world}, "
              f"{'FSDP2' if args.fsdp else 'DDP' if run.ddp else 'single'}, {run.device}")
    if args.grad_ckpt:  # recompute each block in backward: activation memory of one block instead of all
        for block in model.blocks:
            block.forward = functools.partial(torch.utils.checkpoint.checkpoint, block.forward, use_reentrant=False)
    return cfg, model, ema


def wrap(args, run, model, ema):
    """FSDP2 (every block and the model sharded; the EMA too), DDP, or nothing; then torch.compile if asked. The
    unwrapped `model` stays the one for EMA, saving and sampling."""
    if args.fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if run.device.type == "cuda" else MixedPrecisionPolicy()
        for m in (model, ema):
            for block in m.blocks:
                fully_shard(block, mp_policy=mp)
            fully_shard(m, mp_policy=mp)
        train_model = model
    elif run.ddp:
        train_model = DDP(model, device_ids=[run.local] if run.device.type == "cuda" else None)
    else:
        train_model = model
    return torch.compile(train_model) if args.compile else train_model


def resume(args, run, cfg, model, ema, opt):
    """Continue exactly from OUT/ckpt.pt -> (step, epoch, consumed). Checked first: another --model or --encoder, a
    changed --batch or --grad-accum (which would move the data position), a truncated or foreign file fail here in
    one message naming every bad key. Full state dicts, scattered to the shards under FSDP2."""
    if not (args.resume and os.path.exists(run.ckpt_path)):
        return 0, 0, 0
    ck = ckpt.check_resume(run.ckpt_path, dict(config=asdict(cfg), model=model.state_dict(), ema=ema.state_dict(),
                                               opt=opt, step=int, epoch=int, consumed=int, args=dict),
                           vars(args), fixed=("batch", "grad_accum"))
    load = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, ck["model"], options=load)
    set_model_state_dict(ema, ck["ema"], options=load)
    set_optimizer_state_dict(model, opt, ck["opt"], options=load)
    changed = training.note_changes(ck["args"], args, ("steps", "lr", "connector_lr", "min_lr", "warmup", "hold",
                                                       "schedule"))
    if run.master:
        print(f"resumed from {run.ckpt_path} at step {ck['step']}" + (f" ({', '.join(changed)})" if changed else ""))
    return ck["step"], ck["epoch"], ck["consumed"]


def save(args, run, cfg, model, ema, opt, alpha, step, epoch, consumed):
    """ckpt.pt (everything to resume exactly) and dit.safetensors (the EMA weights with the config, the time shift
    and the latent's description, for sample.py). Gathering the full state is a collective: every rank calls."""
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    states = dict(model=get_model_state_dict(model, options=full), ema=get_model_state_dict(ema, options=full),
                  opt=get_optimizer_state_dict(model, opt, options=full))
    if run.master:
        ckpt.save_checkpoint(run.ckpt_path, dict(**states, step=step, epoch=epoch, consumed=consumed,
                                                 config=asdict(cfg), args=vars(args)))
        meta = dict(dit_config=json.dumps(asdict(cfg)), alpha=str(alpha), latent=args.latent, step=str(step),
                    encoder=str(args.encoder or "toy"), vae=str(args.vae or ""), stats=str(args.stats or ""))
        ckpt.save_safetensors(os.path.join(args.out, "dit.safetensors"), states["ema"], metadata=meta)
    run.barrier()


def sample_grid(args, run, towers, cfg, ema, alpha, decoder, prompts, step):
    """Fixed prompts -> EMA samples -> samples_STEP.png (decoded when --decoder is given). Under FSDP2 every rank
    runs the sharded EMA forward (its all-gathers need them all); only rank 0 writes."""
    g = torch.Generator(run.device).manual_seed(args.seed)
    noise = torch.randn(len(prompts), *towers.shape, generator=g, device=run.device)
    cond = towers.text_states(prompts) if cfg.cond == "text" else \
        torch.arange(len(prompts), device=run.device) % cfg.num_classes
    with run.autocast():
        z = dit.sample(ema, noise, cond, alpha, steps=25, guidance=args.guidance)
    if decoder is None or not run.master:
        return
    img = towers.rae.decode(z.float()).clamp(-1, 1)  # (B, 3, H, W); main gave the RAE its decoder
    data.save_image_grid(os.path.join(args.out, f"samples_{step:06d}.png"), img, prompts)


def text_states(towers, batch):
    """(b, T, Dt) text states of a batch: cached by --cache-latents, or from the frozen text tower."""
    return batch["text"].to(towers.device).float() if "z" in batch else towers.text_states(batch["caption"])


def fix_text_stats(args, run, model, ema, towers, batches):
    """A fresh text-conditioned run fixes the DiT's text standardisation from its first --text-stats captions (over
    all ranks), computed once on the model and copied to the EMA; the batches read for it are then trained on, in
    order. (A resumed run has the statistics in its checkpoint.)"""
    held, states = [], []
    while sum(len(s) for s in states) < max(1, args.text_stats // run.world):  # this rank's share of the captions
        held.append(next(batches))
        states.append(text_states(towers, held[-1][2]))
    states = torch.cat(states)  # (K, T, Dt)
    model.set_text_stats(states, dist.all_reduce if run.ddp else None)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)
    if run.master:
        print(f"text standardisation from {len(states) * run.world} training captions")
    return itertools.chain(held, batches)


def train_step(args, run, cfg, train_model, model, opt, towers, batch, step, alpha):
    """One optimizer step over --grad-accum micro-batches that really accumulate (one step, one clip). The noise of
    each sample is a function of (seed, step, its global position), so any split over ranks and micro-batches
    gives the same numbers. Returns (loss, lr, grad norm, loss sums and counts per t-bin)."""
    lr = set_lr(opt, step, args)
    if "z" in batch:  # --cache-latents: latents and text states were encoded once, no frozen tower runs here
        z = batch["z"].to(run.device, non_blocking=True)
    else:
        z = towers.latents(batch["img"].to(run.device, non_blocking=True))  # (b, N, C)
    cond = text_states(towers, batch) if cfg.cond == "text" else batch["label"].to(run.device)
    micro = args.batch // (run.world * args.grad_accum)
    loss_sum, bins = torch.zeros((), device=run.device), torch.zeros(2, 10, device=run.device)
    for m in range(args.grad_accum):
        sl = slice(m * micro, (m + 1) * micro)
        first = run.rank * (args.batch // run.world) + m * micro  # global position of this micro-batch's first sample
        noise = per_sample_noise(args.seed, step, range(first, first + micro), towers.shape, alpha, args.p_drop,
                                 run.device)
        sync = nullcontext() if not run.ddp or args.fsdp or m == args.grad_accum - 1 else train_model.no_sync()
        with sync, run.autocast():
            loss, per_sample, t = dit.flow_loss(train_model, z[sl], cond[sl], alpha, noise=noise)
            (loss / args.grad_accum).backward()
        loss_sum += loss.detach() / args.grad_accum
        s, n = dit.loss_per_t_bin(per_sample, t)
        bins += torch.stack([s, n])
    run.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip if args.clip > 0 else float("inf"))
    # before the step: the weights and the last checkpoint stay good
    training.check_finite(run, step, loss=loss_sum, gradient_norm=gnorm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss_sum, lr, gnorm, bins


def main(args):
    if args.plan:
        return plan(args)
    # setup: one process (python) or one per GPU (torchrun), the same code path
    run = training.setup(args, divides=args.grad_accum)
    stop = training.StopSignal()
    # the frozen models, the data, the trainable model
    towers = FrozenTowers(args, run)
    alpha = dit.shift_alpha(*towers.shape)  # from the latent shape, never hard-coded
    train_set = training_data(args, run, towers)
    cfg, model, ema = build_model(args, run, towers, train_set)
    train_model = wrap(args, run, model, ema)
    opt = make_optimizer(model, args)
    step, epoch, consumed = resume(args, run, cfg, model, ema, opt)
    prompts = args.prompt or ([p for p, _ in toy.toy_prompts(8)] if args.data.startswith("toy") else
                               ["a photo of a cat", "a red car on a street", "a bowl of fruit", "a mountain lake at sunrise"])
    decoder = rae.load_decoder(args.decoder, run.device) if args.decoder and args.latent == "rae" else None
    if decoder is not None:  # its pixels are the encoder's (ImageNet-normalised for DINOv2): RAE.decode maps them
        towers.rae.decoder = decoder

    # the loop
    batches = data.infinite_batches(train_set, args.batch // run.world, run.rank, run.world, args.seed, args.workers,
                                    epoch, consumed)
    if cfg.cond == "text" and step == 0:
        batches = fix_text_stats(args, run, model, ema, towers, batches)
    bad = data.BadSampleCounter()
    log = open(os.path.join(args.out, "metrics.jsonl"), "a") if run.master else None
    bins = torch.zeros(2, 10, device=run.device)  # loss sums and counts per t-bin since the last log line
    t0, seen, first = time.time(), 0, step
    # the bar only on rank 0 and only on a terminal (disable=None): a log file gets the metrics lines, not a bar
    bar = tqdm(total=args.steps, initial=step, disable=None if run.master else True, dynamic_ncols=True)
    while step < args.steps and not stop.requested(run):
        epoch, consumed, batch = next(batches)
        bad.update(batch.get("bad", {}))
        if step == first and "img" in batch:  # where the data enters: once, not in every forward (a device sync)
            rae.check_pixels(batch["img"], f"--data {args.data}")
        loss, lr, gnorm, step_bins = train_step(args, run, cfg, train_model, model, opt, towers, batch, step, alpha)
        bins += step_bins
        training.ema_update(ema, model, args.ema)
        step += 1
        seen += args.batch
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        bar.update()
        if step % args.log_every == 0 or step == args.steps:
            run.all_reduce(bins)
            if run.master:
                dt = time.time() - t0
                rec = dict(step=step, loss=loss.item(), lr=lr, grad_norm=float(gnorm), samples_per_s=seen / dt,
                           flops_per_s=dit.flops(cfg) * seen / dt, bad_samples=bad.total(),
                           loss_per_t_bin=[round(v, 4) for v in (bins[0] / bins[1].clamp_min(1)).tolist()])
                log.write(json.dumps(rec) + "\n")
                log.flush()
                tqdm.write(f"step {step} loss {rec['loss']:.4f} lr {lr:.3g} grad {rec['grad_norm']:.3g} "
                           f"{rec['samples_per_s']:.1f} samples/s")  # above the bar, which stays at the bottom
                sys.stdout.flush()  # tqdm.write does not: a cluster's log file would get these lines in bursts
            bins.zero_()
            t0, seen = time.time(), 0
        if step % args.save_every == 0 or step == args.steps:
            save(args, run, cfg, model, ema, opt, alpha, step, epoch, consumed)
        if args.sample_every and step % args.sample_every == 0 and (run.master or args.fsdp):
            sample_grid(args, run, towers, cfg, ema, alpha, decoder, prompts, step)

    # the end: a signal saves where it stopped
    bar.close()
    if step < args.steps:
        save(args, run, cfg, model, ema, opt, alpha, step, epoch, consumed)
        if run.master:
            print(f"stop signal: saved step {step} to {run.ckpt_path}; rerun with --resume to continue")
    if run.master and bad.total():
        print(f"skipped bad samples: {bad}")
    if run.ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(parse_args())
