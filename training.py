"""What both training scripts share: one process or many, the learning-rate schedule, stopping cleanly, and refusing
to step on a non-finite loss or gradient.

The same script runs under `python` (one process, CPU or one GPU) and under `torchrun` (one process per GPU, DDP or
FSDP2): `setup` reads the environment torchrun sets, and nothing else changes. Only rank 0 prints and writes.
"""
import math
import os
import signal
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Run:
    """Where this process stands: rank of world, its device, and the autocast it trains under."""
    rank: int
    world: int
    local: int
    device: torch.device
    ddp: bool  # launched by torchrun: a process group exists
    ckpt_path: str  # OUT/ckpt.pt

    @property
    def master(self):
        return self.rank == 0

    def autocast(self):
        """bf16 autocast on GPU with fp32 master weights; fp32 on CPU (whose bf16 matmuls are far slower)."""
        return torch.autocast("cuda", torch.bfloat16) if self.device.type == "cuda" else nullcontext()

    def all_reduce(self, tensor, op=dist.ReduceOp.SUM):
        if self.ddp:
            dist.all_reduce(tensor, op=op)
        return tensor

    def barrier(self):
        if self.ddp:
            dist.barrier()


def setup(args, divides=1):
    """Join torchrun's process group (if launched by it), pick the device, check that --batch splits into `divides`
    equal parts per rank, and guard --out: a forgotten --resume must not overwrite days of training."""
    ddp = "RANK" in os.environ
    if ddp:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank, world, local = dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    else:
        rank, world, local = 0, 1, 0
    device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if args.batch % (world * divides):
        by = f"the world size {world}" + (f" x --grad-accum {divides}" if divides > 1 else "")
        raise SystemExit(f"--batch {args.batch} is not divisible by {by}")
    os.makedirs(args.out, exist_ok=True)
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    if os.path.exists(ckpt_path) and not args.resume:
        raise SystemExit(f"{ckpt_path} exists: pass --resume to continue that run, or choose another --out")
    return Run(rank, world, local, device, ddp, ckpt_path)


def lr_at(step, peak, warmup, total, floor=0.0, schedule="cosine", hold=0):
    """Linear warmup from 0 to `peak` over `warmup` steps, `hold` steps at peak, then down to `floor` at step `total`
    along a cosine or a line (RAE's DiT: no warmup, 40 epochs held, linear to 1/10 at epoch 800), or constant."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    progress = min(1.0, max(0, step - warmup - hold) / max(1, total - warmup - hold))
    if schedule == "linear":
        return (1 - progress) * peak + progress * floor  # exactly peak at 0, floor at 1
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def ema_update(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter (buffers are fixed tables or statistics)."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)


class StopSignal:
    """SIGTERM / SIGUSR1 (cluster preemption): the loop finishes its step, saves and exits 0. `requested(run)` is
    agreed over ranks, so all stop at the same step even if the signal reached them at different times."""
    def __init__(self):
        self.signal = None
        for s in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(s, self.catch)

    def catch(self, num, frame):
        self.signal = num

    def requested(self, run):
        flag = torch.tensor([self.signal is not None], dtype=torch.int32, device=run.device)
        return bool(run.all_reduce(flag, op=dist.ReduceOp.MAX).item())


def check_finite(run, step, **values):
    """Stop every rank if any value (a loss, a gradient norm) is not finite on any rank, before the optimizer step
    it would feed (a rank that stopped alone would leave the others waiting in the next collective). Nothing is
    saved, so ckpt.pt and the export stay those of the last good save."""
    values = {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in values.items()}  # scalars
    bad = [name for name, v in values.items() if not math.isfinite(v)]
    flag = run.all_reduce(torch.tensor([len(bad)], dtype=torch.int32, device=run.device), op=dist.ReduceOp.MAX)
    if flag.item():
        # the first in the order given: a non-finite loss makes a non-finite gradient, and the cause is what to say
        what = f"{bad[0].replace('_', ' ')} is {values[bad[0]]}" if bad else "a value on another rank"
        last = run.ckpt_path if os.path.exists(run.ckpt_path) else "none yet"
        raise SystemExit(f"step {step}: {what} (rank {run.rank}); not finite, stopping without saving "
                         f"(last good checkpoint: {last})")


def note_changes(saved, args, names):
    """A resumed run may change some flags (a longer --steps, a new --lr): say which, so the log shows it."""
    return [f"--{n.replace('_', '-')} {saved.get(n)!r} -> {getattr(args, n)!r}" for n in names
            if n in saved and saved[n] != getattr(args, n)]
