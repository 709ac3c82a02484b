"""Flow matching in a latent space (both papers): the dimension-shifted time, the rectified-flow loss, and the sampler
(Euler / Heun / stochastic, classifier-free guidance, AutoGuidance, and the released models' own step schedules).

Nothing here depends on the network: a model is any callable model(x (B, N, C), t (B,), cond, drop (B,) bool) -> v.
Time t in [0, 1] with t = 0 data and t = 1 noise: x_t = (1 - t) z + t eps; the model predicts v = eps - z.
dit.py re-exports these names (dit.sample, dit.time_shift, ...), the public API of DESIGN.md.

    python -m pytest -q test_dit.py      # the sampler's exact-math tests live with the DiT's
"""
import math

import torch


# ----------------------------------------------------------------------------- flow matching: time shift, loss
def shift_alpha(num_tokens, channels, base=4096):
    """Dimension-dependent shift a = sqrt(N * C / base): sqrt(72) ~ 8.49 for 256 x 1152, 2 for 256 x 64 (FLUX VAE).
    More dimensions keep more signal at a given noise level, so training and sampling spend more time near t = 1."""
    return math.sqrt(num_tokens * channels / base)


def time_shift(t, a):
    """t' = a t / (1 + (a - 1) t), written as a t / (a t + 1 - t) so that 0 and 1 map exactly to themselves."""
    return a * t / (a * t + 1 - t)


def sample_t(B, alpha, generator=None, device=None):
    """Training times: logit-normal t = sigmoid(N(0, 1)), then shifted (median a / (a + 1): 0.895 for a = sqrt(72))."""
    return time_shift(torch.sigmoid(torch.randn(B, generator=generator, device=device)), alpha)


def flow_loss(model, z, cond, alpha, p_drop=0.1, generator=None, noise=None):
    """Rectified-flow loss on clean latents z (B, N, C): x_t = (1 - t) z + t eps, target v = eps - z, plain MSE
    (no weighting, as both papers). Returns (loss, per-sample loss (B,), t (B,)); the last two for loss_per_t_bin.
    `noise` = (t, eps, drop) drawn by the caller replaces the draws (train_dit.py draws them per sample so that
    any split of a batch over ranks gives the same numbers)."""
    B = z.shape[0]
    if noise is None:
        t = sample_t(B, alpha, generator, z.device)
        eps = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        drop = torch.rand(B, generator=generator, device=z.device) < p_drop  # condition dropout, for CFG
    else:
        t, eps, drop = noise
    tt = t.to(z.dtype)[:, None, None]
    v = model((1 - tt) * z + tt * eps, t, cond, drop)  # (B, N, C)
    per_sample = (v.float() - (eps - z).float()).square().mean(dim=(1, 2))  # (B,)
    return per_sample.mean(), per_sample, t


def loss_per_t_bin(per_sample_loss, t, bins=10):
    """Loss summed per t-bin, and counts: (bins,), (bins,), a per-noise-level view of training (as minRF logs it).
    Sums rather than means, so a loop can accumulate them over steps (and all-reduce over ranks) before dividing."""
    idx = (t.detach() * bins).long().clamp(0, bins - 1)  # (B,)
    sums = torch.zeros(bins, device=t.device).index_add_(0, idx, per_sample_loss.detach().float())
    return sums, torch.bincount(idx, minlength=bins)


# ----------------------------------------------------------------------------- sampler
@torch.no_grad()
def sample(model, noise, cond, alpha, steps=50, method="euler", guidance=1.0, guidance_interval=(0.0, 1.0),
           guide=None, progress=None, eta=1.0, generator=None, schedule=None):
    """Integrate dx/dt = v(x, t) from t = 1 (noise (B, N, C)) to t = 0 on the shifted grid
    time_shift(linspace(1, 0, steps + 1), alpha), with Euler (steps NFEs) or Heun (2 * steps NFEs).
    schedule: a list of (t, t_next) steps replaces that grid (official_schedule: the released models' samplers).
    Classifier-free guidance: v = v_u + guidance * (v_c - v_u) where t is in guidance_interval (conditional only
    elsewhere), cond and uncond batched in one forward. AutoGuidance (RAE, after Karras et al. 2024): with a `guide`
    model (a smaller or less trained DiT of the same latent and condition), v = v_g + guidance * (v - v_g), both
    models given the same condition. Only model(x, t, cond, drop) is called, so any wrapper (DDP,
    FSDP, compile) works; the price is that the text connector reruns at every step (a few blocks next to the
    trunk's depth). progress: None, or a wrapper of the step range that shows progress (e.g. tqdm.tqdm).
    "stochastic": each step splits x_t into the model's clean estimate x0 = x - t v and noise estimate e = x + (1 - t) v,
    and steps to x_s = (1 - s) x0 + s (sqrt(1 - eta^2) e + eta xi) with fresh noise xi (B, N, C) from `generator`:
    one torch.Generator, or a list of B (row b's noise from generator[b], so a sample does not depend on its batch).
    eta = 0 is exactly Euler; eta = 1 re-noises the clean estimate (multistep consistency-model sampling). Fresh
    noise lets later steps correct what earlier ones got wrong (on the toy demo it draws better shapes than Euler)."""
    if method not in ("euler", "heun", "stochastic"):
        raise ValueError(f"method must be 'euler', 'heun' or 'stochastic', got {method!r}")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    if isinstance(generator, (list, tuple)) and len(generator) != noise.shape[0]:  # one short would broadcast
        raise ValueError(f"generator: a list needs one per sample ({noise.shape[0]}), got {len(generator)}")
    if schedule is None:  # our grid ends exactly at t = 0 (the official samplers stop short of it: official_schedule)
        ts = time_shift(torch.linspace(1, 0, steps + 1, dtype=torch.float64), alpha).tolist()
        schedule = list(zip(ts[:-1], ts[1:]))
    B = noise.shape[0]
    keep = torch.zeros(B, dtype=torch.bool, device=noise.device)
    if guidance != 1.0 and guide is None:
        cond2, drop2 = torch.cat([cond, cond]), torch.cat([keep, ~keep])  # [conditional ; null]

    def velocity(x, t):
        tb = torch.full((B,), t, device=x.device, dtype=x.dtype)
        if guidance == 1.0 or not guidance_interval[0] <= t <= guidance_interval[1]:
            return model(x, tb, cond, keep)
        if guide is not None:  # the weaker model takes the place of the unconditional prediction
            v, v_g = model(x, tb, cond, keep), guide(x, tb, cond, keep)
            return v_g + guidance * (v - v_g)
        v_c, v_u = model(torch.cat([x, x]), torch.cat([tb, tb]), cond2, drop2).chunk(2)  # 2 x (B, N, C)
        return v_u + guidance * (v_c - v_u)

    x = noise
    for t, t_next in progress(schedule) if progress else schedule:
        v = velocity(x, t)
        if method == "euler":
            x = x + (t_next - t) * v
        elif method == "stochastic":
            x0, e = x - t * v, x + (1 - t) * v  # (B, N, C) each; x = (1 - t) x0 + t e
            if isinstance(generator, (list, tuple)):  # one generator per row
                xi = torch.stack([torch.randn(x.shape[1:], generator=g, device=x.device, dtype=x.dtype)
                                  for g in generator])
            else:
                xi = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = (1 - t_next) * x0 + t_next * ((1 - eta**2) ** 0.5 * e + eta * xi)
        else:  # Heun: average the slopes at both ends of the step (trapezoid rule, second order)
            x_next = x + (t_next - t) * v
            x = x + (t_next - t) * 0.5 * (v + velocity(x_next, t_next))
    return x


def official_schedule(kind, alpha):
    """The (t, t_next) Euler steps of the released models' samplers, so that their latents can be reproduced.
    "rae": RAE's sample_ddp.py: the float32 grid 1 - linspace(0, 0.999, 50), shifted, as 49 steps (it stops at
    t ~ 0.0069: torchdiffeq's Euler on that grid). "scale-rae": Scale-RAE's rectified-flow sampler: 1000 shifted times
    time_shift((j + 1) / 1000), of which the 50 respaced ones (round((j * 999) / 49)) are walked down from the second
    largest to the smallest (48 steps, ending at t ~ 0.0084), then one last step from the second largest time up to
    t = 1 (+0.0024 for a = sqrt(72)) on the nearly clean sample: 49 model calls, as the released code does."""
    if kind == "rae":
        t = 1 - torch.linspace(0, 0.999, 50)  # float32, as the official code
        ts = (alpha * t / (1 + (alpha - 1) * t)).tolist()
        return list(zip(ts[:-1], ts[1:]))
    if kind == "scale-rae":
        ts = [alpha * t / (1 + (alpha - 1) * t) for t in torch.linspace(1 / 1000, 1, 1000, dtype=torch.float64).tolist()]
        used = [ts[round(j * 999 / 49)] for j in range(50)]  # space_timesteps(1000, "50"): a stride of 999 / 49
        f32 = lambda u: torch.tensor(u, dtype=torch.float32).item()  # the official loop feeds float32 times
        steps = [(used[i], used[i - 1]) for i in range(48, 0, -1)] + [(used[48], used[49])]
        return [(f32(a), f32(b)) for a, b in steps]
    raise ValueError(f"official schedule must be 'rae' or 'scale-rae', got {kind!r}")


# ----------------------------------------------------------------------------- smoke test
if __name__ == "__main__":  # a constant velocity is integrated exactly along our grid and the official schedules
    v = torch.full((1, 4, 2), 0.5)
    for name in ("ours", "rae", "scale-rae"):
        schedule = None if name == "ours" else official_schedule(name, math.sqrt(48))
        x = sample(lambda x, t, cond, drop: v, torch.zeros(1, 4, 2), None, math.sqrt(48), steps=10, schedule=schedule)
        exact = -0.5 if schedule is None else 0.5 * sum(t_next - t for t, t_next in schedule)
        print(f"{name:9s}: {len(schedule or range(10))} steps, x = {x[0, 0, 0].item():+.6f} (exact {exact:+.6f})")
