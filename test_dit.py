"""Tests for dit.py: exact math (adaLN-Zero identity, time shift, ODE integration, guidance algebra, FLOP count against
torch's counter, parameter counts of the RAE / Scale-RAE code), the export round trip (dit.load_dit), the learning-rate
schedule (training.lr_at) and one learning test on a known distribution.

    python -m pytest -q test_dit.py
"""
import copy
import json
import math
import os
import socket
import types
from dataclasses import asdict

import pytest
import torch
import torch.distributed as dist
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import ckpt
import dit
import released
import training
from dit import (PRESETS, DiT, DiTConfig, flops, flow_loss, loss_per_t_bin, rope_2d, apply_rope, sample, sample_t,
                 shift_alpha, time_shift)
from training import lr_at

TINY = dict(in_channels=8, num_tokens=16, hidden_size=32, depth=2, num_heads=2, text_dim=12, text_len=5,
            connector_depth=1, num_classes=5)


@pytest.fixture(autouse=True)
def one_thread():
    # these models are tiny: one thread is faster than two, and far faster on a CPU shared with other jobs
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(cond="text", **kw):
    torch.manual_seed(0)
    return DiT(DiTConfig(**{**TINY, "cond": cond, **kw}))


def randomize(model):
    """Perturb every parameter, zero-initialised ones included, so outputs depend on everything."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def inputs(model, B=4):
    cfg = model.cfg
    x = torch.randn(B, cfg.num_tokens, cfg.in_channels)
    t = torch.rand(B)
    cond = torch.randn(B, cfg.text_len, cfg.text_dim) if cfg.cond == "text" else torch.randint(cfg.num_classes, (B,))
    return x, t, cond


# ----------------------------------------------------------------------------- config and presets
def test_config_round_trips_through_a_plain_dict():
    for preset in PRESETS.values():
        cfg = DiTConfig(**preset)
        d = json.loads(json.dumps(asdict(cfg)))  # plain data only, as stored in checkpoints
        assert DiTConfig(**d) == cfg


def test_meta_presets_match_the_reference_parameter_counts():
    # Counts of the official modules (RAE's LightningDiT / DiT^DH on its 768-channel DINOv2-B latent; Scale-RAE's
    # 2.4B DiT, without our text connector), as their repositories build them.
    rae = {"DiT-S": 33.6e6, "DiT-B": 131.7e6, "DiT-L": 459.7e6, "DiT-XL": 677.0e6, "DiTDH-XL": 838.4e6}
    for name, expected in rae.items():
        with torch.device("meta"):
            model = DiT(DiTConfig(**{**PRESETS[name], "in_channels": 768}))
        n = sum(p.numel() for p in model.parameters())
        assert abs(n - expected) < 0.05e6, (name, n)
    with torch.device("meta"):
        model = DiT(DiTConfig(**PRESETS["T2I-2.4B"]))
    assert model.pos_embed.is_meta
    trunk = sum(p.numel() for k, p in model.named_parameters() if not k.startswith(("text_", "queries", "connector")))
    assert abs(trunk - 2.435e9) < 0.5e6
    assert abs(sum(p.numel() for p in model.blocks[0].parameters()) - 75.5e6) < 0.05e6


# ----------------------------------------------------------------------------- model
@pytest.mark.parametrize("kw", [dict(cond="text"), dict(cond="class", qk_norm=True),
                                dict(cond="class", ddt_depth=2, ddt_width=48, ddt_heads=3)])
def test_adaln_zero_init_makes_blocks_identity_and_output_zero(kw):
    model = tiny(**kw)
    seen = []
    for block in [*model.blocks, *model.head_blocks]:
        block.register_forward_hook(lambda mod, args, out: seen.append(torch.equal(out, args[0])))
    v = model(*inputs(model))
    assert seen == [True] * (kw.get("ddt_depth", 0) + TINY["depth"])
    assert torch.equal(v, torch.zeros_like(v))


@pytest.mark.parametrize("cond", ["text", "class"])
def test_forward_shapes(cond):
    model = randomize(tiny(cond))
    x, t, c = inputs(model, B=3)
    assert model.embed_condition(c).shape == (3, TINY["num_tokens"] if cond == "text" else 1, TINY["hidden_size"])
    assert model(x, t, c).shape == x.shape
    # the text connector takes any number of text tokens
    if cond == "text":
        assert model(x, t, torch.randn(3, 7, TINY["text_dim"])).shape == x.shape


@pytest.mark.parametrize("cond", ["text", "class"])
def test_null_drop_changes_exactly_the_dropped_samples(cond):
    model = randomize(tiny(cond))
    x, t, c = inputs(model)
    drop = torch.tensor([False, True, False, True])
    v, v_drop = model(x, t, c), model(x, t, c, drop)
    assert torch.allclose(v[~drop], v_drop[~drop], atol=1e-6, rtol=0)
    assert ((v[drop] - v_drop[drop]).abs().amax(dim=(1, 2)) > 1e-3).all()
    # a dropped sample ignores its condition
    c_other = inputs(model)[2]
    assert torch.allclose(v_drop[drop], model(x, t, c_other, drop)[drop], atol=1e-6, rtol=0)
    assert torch.equal(model(x, t, c, torch.zeros(4, dtype=torch.bool)), v)


def test_absolute_positions_tell_identical_tokens_apart():
    # with the same input at every token and one class condition, attention with RoPE alone is translation-equivariant
    # and would give every token the same output; the fixed sin-cos positions must break that symmetry
    model = randomize(tiny("class"))
    x = torch.randn(2, 1, TINY["in_channels"]).expand(2, TINY["num_tokens"], -1)
    v = model(x, torch.rand(2), torch.tensor([0, 3]))  # (2, N, C)
    assert (v - v[:, :1]).abs().amax(dim=2)[:, 1:].min() > 1e-3


def test_text_stats_standardise_the_training_captions_and_travel_in_the_state_dict():
    # frozen-tower-like states: a large part common to every caption, a small part that differs (1% of the norm)
    torch.manual_seed(0)
    common = 3 * torch.randn(TINY["text_len"], TINY["text_dim"])
    states = common + 0.03 * torch.randn(64, *common.shape)  # (K, T, Dt)
    model = randomize(tiny())
    x, t, cond = inputs(model)
    v_identity = model(x, t, cond)  # before set_text_stats the standardisation is the identity
    model.set_text_stats(states)
    s = states.double()
    mean, std = s.mean((0, 1)), s.std((0, 1))
    pooled = ((s - mean) / std).mean(1)  # (K, Dt)
    for buf, want in ((model.text_mean, mean), (model.text_std, std), (model.pool_mean, pooled.mean(0)),
                      (model.pool_std, pooled.std(0))):
        assert torch.allclose(buf.double(), want, rtol=1e-5, atol=1e-6)
    # what text_pool sees: a pooled vector whose every channel varies over the captions with std 1, where the raw
    # mean state varies by well under 1% of its norm
    raw = states.mean(1)  # (K, Dt)
    assert raw.std(0).max() < 0.01 * raw.norm(dim=1).mean()
    standardised = ((states - model.text_mean) / model.text_std).mean(1)
    standardised = (standardised - model.pool_mean) / model.pool_std
    assert torch.allclose(standardised.std(0), torch.ones(TINY["text_dim"]), atol=1e-4)
    assert not torch.allclose(model(x, t, cond), v_identity)
    fresh = randomize(tiny())
    fresh.load_state_dict(model.state_dict())  # persistent buffers: a checkpoint or export carries them
    assert torch.equal(fresh.pool_std, model.pool_std) and torch.equal(fresh(x, t, cond), model(x, t, cond))


def _text_stats_rank(rank, port, halves, folder):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    model = tiny()
    model.set_text_stats(halves[rank], dist.all_reduce)
    torch.save({k: v for k, v in model.state_dict().items() if k.startswith(("text_mean", "text_std", "pool_"))},
               f"{folder}/{rank}.pt")
    dist.destroy_process_group()


def test_text_stats_over_two_ranks_equal_those_of_all_captions(tmp_path):
    torch.manual_seed(0)
    states = 2 + torch.randn(40, TINY["text_len"], TINY["text_dim"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_text_stats_rank, args=(port, (states[:15], states[15:]), str(tmp_path)), nprocs=2)
    whole = tiny()
    whole.set_text_stats(states)
    for rank in range(2):  # unequal shares (15 and 25 captions), and both ranks get the statistics of all 40
        got = torch.load(tmp_path / f"{rank}.pt")
        for k, v in got.items():
            assert torch.allclose(v, whole.state_dict()[k], rtol=1e-5, atol=1e-6), (rank, k)


def test_rope_2d_depends_only_on_grid_offsets():
    torch.manual_seed(0)
    grid, hd = 6, 16
    rope = rope_2d(grid, hd)
    q, k = torch.randn(2, hd)

    def score(pq, pk):  # q at grid position pq, k at pk: (row, col)
        tq = apply_rope(q.expand(1, 1, grid * grid, hd), rope)[0, 0, pq[0] * grid + pq[1]]
        tk = apply_rope(k.expand(1, 1, grid * grid, hd), rope)[0, 0, pk[0] * grid + pk[1]]
        return tq @ tk

    assert torch.allclose(score((0, 1), (2, 4)), score((3, 2), (5, 5)), atol=1e-5)  # same offset (2, 3)
    assert torch.allclose(score((4, 0), (1, 1)), score((5, 4), (2, 5)), atol=1e-5)  # same offset (-3, 1)
    assert not torch.allclose(score((0, 1), (2, 4)), score((0, 1), (4, 2)), atol=1e-3)  # offset (2, 3) vs (4, 1)
    assert not torch.allclose(score((1, 1), (1, 4)), score((1, 1), (1, 2)), atol=1e-3)  # columns alone matter
    assert not torch.allclose(score((1, 1), (4, 1)), score((1, 1), (2, 1)), atol=1e-3)  # rows alone matter
    assert torch.allclose(apply_rope(q.expand(1, 1, 36, hd), rope).norm(dim=-1), q.norm().expand(1, 1, 36))


def test_connector_reads_the_first_text_len_states_as_a_bag():
    model = randomize(tiny("text"))
    cond = torch.randn(2, TINY["text_len"], TINY["text_dim"])
    y = model.embed_condition(cond)
    # states past text_len (a tower that pads to more positions than the prompts need) are not read
    assert torch.equal(model.embed_condition(torch.cat([cond, torch.randn(2, 3, TINY["text_dim"])], 1)), y)
    # the connector has no positions of its own: word order, and so which colour goes with which object, must come
    # from the text tower's states (the toy tower's window, a real tower's attention)
    assert torch.allclose(model.embed_condition(cond[:, [1, 0, *range(2, TINY["text_len"])]]), y, atol=1e-5)
    assert model.embed_condition(cond[:, :2]).shape == y.shape


@pytest.mark.parametrize("kw", [dict(cond="text"), dict(cond="class"),
                                dict(cond="text", ddt_depth=1, ddt_width=48, ddt_heads=3)])
def test_analytic_flops_equal_torch_flop_counter(kw):
    model = tiny(**kw)
    # the math backend runs attention as two bmm's, which the counter sees (the CPU flash kernel it does not count)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(*inputs(model, B=3))
    assert counter.get_total_flops() == 3 * flops(model.cfg, training=False)
    assert flops(model.cfg) == 3 * flops(model.cfg, training=False)


def test_bf16_autocast_and_compile_without_graph_breaks():
    model = randomize(tiny("text", ddt_depth=1, ddt_width=48, ddt_heads=3))
    x, t, c = inputs(model)
    drop = torch.tensor([True, False, False, True])
    v = model(x, t, c, drop)
    # bf16 autocast (the GPU recipe): dtypes must line up through RoPE, attention and the fp32 residual stream
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v_bf16 = model(x, t, c, drop)
    assert v_bf16.dtype == torch.bfloat16
    assert (v_bf16.float() - v).norm() < 0.05 * v.norm()
    # no python-side state or data-dependent branches: dynamo captures forward as one graph
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    assert torch.allclose(compiled(x, t, c, drop), v, atol=1e-6)


# ----------------------------------------------------------------------------- export round trip
def test_load_dit_round_trips_a_train_dit_export(tmp_path):
    """train_dit.py's save() writes ckpt.pt and dit.safetensors (the EMA weights, with dit_config / alpha / latent /
    step / encoder in the metadata); dit.load_dit reads the export back, from the file or from its run folder: the
    same config, the EMA's every tensor (text statistics included) bit for bit, the same outputs, in eval mode, and
    the metadata as written."""
    import train_dit
    model = randomize(tiny("text"))
    model.set_text_stats(torch.randn(16, TINY["text_len"], TINY["text_dim"]))
    ema = copy.deepcopy(model)
    with torch.no_grad():  # the export must hold the EMA, not the trained weights
        for p in ema.parameters():
            p.mul_(0.5)
    alpha = shift_alpha(TINY["num_tokens"], TINY["in_channels"])
    args = types.SimpleNamespace(out=str(tmp_path), latent="rae", encoder=None, vae=None, stats=None)
    run = training.Run(0, 1, 0, torch.device("cpu"), False, str(tmp_path / "ckpt.pt"))
    opt = torch.optim.AdamW(model.parameters())
    train_dit.save(args, run, model.cfg, model, ema, opt, alpha, 7, 0, 56)
    x, t, c = inputs(model)
    for path in (str(tmp_path / "dit.safetensors"), str(tmp_path)):
        loaded, meta = dit.load_dit(path)
        assert loaded.cfg == model.cfg and not loaded.training
        want = ema.state_dict()
        assert loaded.state_dict().keys() == want.keys()
        assert all(torch.equal(v, want[k]) for k, v in loaded.state_dict().items())
        assert torch.equal(loaded(x, t, c), ema(x, t, c))
        assert json.loads(meta["dit_config"]) == asdict(model.cfg)
        assert float(meta["alpha"]) == alpha and meta["latent"] == "rae" and meta["step"] == "7"
        assert meta["encoder"] == "toy"
    # the minimal export: config, time shift and latent only (a class-conditioned DiT-DH on the VAE latent)
    other = randomize(tiny("class", ddt_depth=1, ddt_width=48, ddt_heads=3))
    meta = dict(dit_config=json.dumps(asdict(other.cfg)), alpha="2.0", latent="vae")
    path = str(tmp_path / "other.safetensors")
    ckpt.save_safetensors(path, other.state_dict(), metadata=meta)
    loaded, got = dit.load_dit(path, "cpu")
    assert got == meta and loaded.cfg == other.cfg
    x, t, c = inputs(other)
    assert torch.equal(loaded(x, t, c), other(x, t, c))


# ----------------------------------------------------------------------------- learning-rate schedule
def test_lr_at_hold_then_linear_decay():
    """RAE's DiT schedule: no warmup, the peak held for `hold` steps, then a straight line to `floor` at `total`."""
    from training import lr_at
    peak, floor, hold, total = 2e-4, 2e-5, 40, 100
    assert all(lr_at(s, peak, 0, total, floor, "linear", hold) == peak for s in range(hold + 1))
    assert lr_at(hold + 30, peak, 0, total, floor, "linear", hold) == 0.5 * peak + 0.5 * floor
    assert lr_at(total, peak, 0, total, floor, "linear", hold) == floor == lr_at(10 * total, peak, 0, total, floor,
                                                                                    "linear", hold)
    # with a warmup, the hold starts after it; hold = 0 leaves the cosine as it was
    assert lr_at(5, peak, 10, total, floor, "linear", hold) == peak * 6 / 10
    assert lr_at(10 + hold, peak, 10, total, floor, "linear", hold) == peak
    assert lr_at(55, peak, 10, total, floor) == lr_at(55, peak, 10, total, floor, "cosine", 0)


def test_lr_at_warmup_cosine_floor_and_constant():
    peak, warmup, total, floor = 3e-3, 10, 110, 1e-4
    # warmup: linear from peak / warmup at step 0 to peak at step warmup - 1
    assert lr_at(0, peak, warmup, total, floor) == peak / warmup
    for s in range(warmup):
        assert lr_at(s, peak, warmup, total, floor) == peak * (s + 1) / warmup
    assert lr_at(warmup - 1, peak, warmup, total, floor) == peak
    # cosine from peak at step warmup to floor at step total, then floor for good
    cosine = [lr_at(s, peak, warmup, total, floor) for s in range(warmup, total + 1)]
    want = [floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))
            for s in range(warmup, total + 1)]
    assert cosine == pytest.approx(want, rel=1e-12, abs=0)
    assert cosine[0] == pytest.approx(peak, rel=1e-12, abs=0)
    assert cosine[(total - warmup) // 2] == pytest.approx((peak + floor) / 2, rel=1e-12, abs=0)
    assert all(a > b for a, b in zip(cosine, cosine[1:]))  # strictly decreasing to the floor
    for s in (total, total + 1, total + 50, 10 * total):
        assert lr_at(s, peak, warmup, total, floor) == floor
    assert lr_at(total, peak, warmup, total) == 0.0  # the default floor
    # constant: the same warmup, then peak exactly, past total too
    for s in range(warmup):
        assert lr_at(s, peak, warmup, total, floor, "constant") == peak * (s + 1) / warmup
    for s in (warmup, warmup + 1, total // 2, total, 10 * total):
        assert lr_at(s, peak, warmup, total, floor, "constant") == peak
    # no warmup: the cosine starts at peak at step 0
    assert lr_at(0, peak, 0, total, floor) == pytest.approx(peak, rel=1e-12, abs=0)
    assert lr_at(total, peak, 0, total, floor) == floor


# ----------------------------------------------------------------------------- time shift and loss
def test_time_shift_formula_and_endpoints():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    for a in (0.5, 1.0, 2.0, math.sqrt(72), 13.856):
        assert torch.allclose(time_shift(t, a), a * t / (1 + (a - 1) * t), atol=1e-15)
        assert time_shift(0.0, a) == 0.0 and time_shift(1.0, a) == 1.0
        assert time_shift(torch.tensor(1.0), a).item() == 1.0  # exact also in fp32
        assert torch.allclose(time_shift(time_shift(t, a), 1 / a), t)  # shifting multiplies the odds t / (1 - t) by a
    assert torch.allclose(time_shift(t, 1.0), t, atol=1e-15, rtol=0)
    assert abs(time_shift(0.5, math.sqrt(72)) - 0.8946) < 1e-4  # the median training t quoted for Scale-RAE


def test_shift_alpha():
    assert shift_alpha(256, 1152) == math.sqrt(72)
    assert shift_alpha(256, 64) == 2.0
    assert shift_alpha(256, 768) == math.sqrt(48)  # RAE's DINOv2-B at 256 px


def test_sample_t_is_shifted_logit_normal():
    a = math.sqrt(72)
    t = sample_t(200_000, a, generator=torch.Generator().manual_seed(0))
    u = torch.logit(time_shift(t.double(), 1 / a))  # undo the shift and the sigmoid: should be N(0, 1)
    assert abs(u.mean()) < 0.01 and abs(u.std() - 1) < 0.01
    assert abs(t.median() - a / (a + 1)) < 0.003


def test_flow_loss_target_and_dropout():
    z0 = 0.7
    z = torch.full((4000, 4, 8), z0)
    # x_t = (1 - t) z + t eps and v = eps - z give v = (x_t - z) / t: a model that knows z has zero loss
    seen = {}

    def oracle(x, t, cond, drop):
        seen["drop"] = drop
        return (x - z0) / t[:, None, None]

    loss, per_sample, t = flow_loss(oracle, z, None, alpha=3.0, p_drop=0.25, generator=torch.Generator().manual_seed(0))
    assert loss < 1e-8 and per_sample.shape == t.shape == (4000,)
    assert abs(seen["drop"].float().mean() - 0.25) < 0.02
    # a model predicting 0 pays E (eps - z)^2 = 1 + z0^2
    zero = lambda x, t, cond, drop: torch.zeros_like(x)
    loss, _, _ = flow_loss(zero, z, None, alpha=3.0, generator=torch.Generator().manual_seed(0))
    assert abs(loss - (1 + z0**2)) < 0.01


def test_loss_per_t_bin():
    loss = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    t = torch.tensor([0.05, 0.5, 0.55, 0.999, 1.0])
    sums, counts = loss_per_t_bin(loss, t, bins=4)
    assert torch.equal(sums, torch.tensor([1.0, 0.0, 5.0, 9.0]))
    assert torch.equal(counts, torch.tensor([1, 0, 2, 2]))


# ----------------------------------------------------------------------------- sampler
class Recorder:
    """A velocity field v(x, t) that records every call's times and batch size."""

    def __init__(self, field):
        self.field, self.calls = field, []

    def __call__(self, x, t, cond, drop):
        self.calls.append((x.shape[0], t[0].item()))
        return self.field(x, t[:, None, None])


def test_stochastic_sampler_is_euler_at_eta_0_and_lands_on_a_point_mass_at_any_eta():
    c = torch.randn(1, 4, 3, dtype=torch.float64)
    noise = torch.randn(2, 4, 3, dtype=torch.float64)
    euler = sample(Recorder(lambda x, t: c.expand_as(x)), noise, None, alpha=5.0, steps=7)
    z = sample(Recorder(lambda x, t: c.expand_as(x)), noise, None, alpha=5.0, steps=7, method="stochastic", eta=0.0)
    assert torch.allclose(z, euler, atol=1e-12)
    # data = the single point z0: the exact field is v = (x - z0) / t, so every clean estimate x - t v is z0, and
    # however much fresh noise the steps add, the last one (to t = 0) returns z0
    z0 = torch.randn(1, 4, 3, dtype=torch.float64)
    for eta in (0.5, 1.0):
        g = torch.Generator().manual_seed(0)
        z = sample(Recorder(lambda x, t: (x - z0) / t), noise, None, alpha=3.0, steps=9, method="stochastic",
                   eta=eta, generator=g)
        assert torch.allclose(z, z0.expand_as(z), atol=1e-10)
    with pytest.raises(ValueError, match="eta must be in"):
        sample(Recorder(lambda x, t: x), noise, None, alpha=1.0, steps=2, method="stochastic", eta=1.5)


def test_stochastic_sampler_with_one_generator_per_row_matches_each_row_alone():
    field = lambda x, t: x * (1 + t) - 0.5  # any field that depends on x and t
    noise = torch.randn(3, 4, 2, dtype=torch.float64)
    gens = [torch.Generator().manual_seed(s) for s in (5, 6, 7)]
    z = sample(Recorder(field), noise, None, alpha=2.0, steps=4, method="stochastic", generator=gens)
    for b, s in enumerate((5, 6, 7)):
        alone = sample(Recorder(field), noise[b:b + 1], None, alpha=2.0, steps=4, method="stochastic",
                       generator=[torch.Generator().manual_seed(s)])
        assert torch.equal(z[b:b + 1], alone)
    assert not torch.allclose(z[0], z[1])
    with pytest.raises(ValueError, match="one per sample"):
        sample(Recorder(field), noise, None, alpha=2.0, steps=4, method="stochastic", generator=gens[:1])


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_sampler_integrates_a_constant_velocity_exactly(method):
    c = torch.randn(1, 4, 3, dtype=torch.float64)
    model = Recorder(lambda x, t: c.expand_as(x))
    noise = torch.randn(2, 4, 3, dtype=torch.float64)
    z = sample(model, noise, None, alpha=5.0, steps=7, method=method)
    assert torch.allclose(z, noise - c, atol=1e-12)  # x(0) = x(1) - c
    assert len(model.calls) == (7 if method == "euler" else 14)
    assert model.calls[0][1] == 1.0  # starts exactly at t = 1 ...
    if method == "heun":
        assert model.calls[-1][1] == 0.0  # ... and its last evaluation is exactly at t = 0


def test_sampler_linear_fields_against_the_analytic_solution():
    noise = torch.randn(3, 4, 2, dtype=torch.float64)
    # v = 2 t + 1 (linear in t): Heun is the trapezoid rule, exact for it; x(0) = x(1) - (1 + 1)
    z = sample(Recorder(lambda x, t: (2 * t + 1).expand_as(x)), noise, None, alpha=3.0, steps=5, method="heun")
    assert torch.allclose(z, noise - 2, atol=1e-12)
    # v = k x: x(0) = x(1) exp(-k); Heun's error falls 4x when the steps double (order 2), Euler's 2x (order 1)
    k = 1.5
    exact = noise * math.exp(-k)
    err = {(m, n): (sample(Recorder(lambda x, t: k * x), noise, None, 2.0, n, m) - exact).abs().max().item()
           for m in ("euler", "heun") for n in (25, 50)}
    assert err[("heun", 50)] < 1e-3 * exact.abs().max()
    assert 3.5 < err[("heun", 25)] / err[("heun", 50)] < 4.5
    assert 1.8 < err[("euler", 25)] / err[("euler", 50)] < 2.2


def test_sampler_with_the_exact_gaussian_velocity_recovers_the_gaussian():
    # For data z ~ N(m, s^2) the ideal velocity E[eps - z | x_t] is linear in x_t; integrating it must give back
    # N(m, s^2). This checks direction of time, grid and integrator together, with no learning involved.
    m, s = 0.7, 0.3

    def field(x, t):
        var = (1 - t) ** 2 * s**2 + t**2  # Var x_t
        ez = m + (1 - t) * s**2 / var * (x - (1 - t) * m)  # E[z | x_t]
        eeps = t / var * (x - (1 - t) * m)  # E[eps | x_t]
        return eeps - ez

    torch.manual_seed(0)
    z = sample(Recorder(field), torch.randn(20_000, 4, 4, dtype=torch.float64), None, 2.0, steps=50, method="heun")
    assert abs(z.mean() - m) < 0.005 and abs(z.std() / s - 1) < 0.02


def test_guidance_scale_one_is_the_conditional_prediction_and_guidance_is_batched():
    model = randomize(tiny("text"))
    x, _, c = inputs(model)
    ones, keep = torch.ones(4), torch.zeros(4, dtype=torch.bool)
    # one Euler step from t = 1 to 0: z = x - v(x, 1)
    z = sample(model, x, c, alpha=2.0, steps=1, guidance=1.0)
    assert torch.allclose(z, x - model(x, ones, c, keep), atol=1e-6)
    # cond and uncond in one batched forward equal two separate forwards
    v2 = model(torch.cat([x, x]), torch.cat([ones, ones]), torch.cat([c, c]), torch.cat([keep, ~keep]))
    v_c, v_u = model(x, ones, c, keep), model(x, ones, c, ~keep)
    assert torch.allclose(v2, torch.cat([v_c, v_u]), atol=1e-5)
    z = sample(model, x, c, alpha=2.0, steps=1, guidance=3.0)
    assert torch.allclose(z, x - (v_u + 3.0 * (v_c - v_u)), atol=1e-5)


def test_guidance_runs_one_doubled_forward_only_inside_its_interval():
    model = Recorder(lambda x, t: torch.zeros_like(x))
    sample(model, torch.zeros(3, 4, 2), torch.zeros(3, 5, 2), alpha=1.0, steps=4, guidance=2.0,
           guidance_interval=(0.0, 0.6))
    assert model.calls == [(3, 1.0), (3, 0.75), (6, 0.5), (6, 0.25)]


def test_autoguidance_with_the_model_as_its_own_guide_is_the_unguided_sampler():
    """v = v_g + w (v - v_g) is v when the guide is the model itself: the same samples as guidance 1, bit for bit, and
    neither the null condition nor a doubled batch is used."""
    model = randomize(tiny("class"))
    x, _, c = inputs(model)
    plain = sample(model, x, c, alpha=2.0, steps=3)
    for w in (1.5, 4.0):
        assert torch.equal(sample(model, x, c, alpha=2.0, steps=3, guidance=w, guide=model), plain)
    recorder = Recorder(lambda x, t: torch.zeros_like(x))
    sample(recorder, torch.zeros(3, 4, 2), torch.zeros(3, dtype=torch.long), alpha=1.0, steps=2, guidance=2.0,
           guide=recorder)
    assert recorder.calls == [(3, 1.0)] * 2 + [(3, 0.5)] * 2  # model and guide, each on the batch as it is


def test_autoguidance_mixes_two_constant_fields_exactly():
    """Model field a, guide field b: every step moves by v_g + w (v - v_g) = b + w (a - b), so x(0) = x(1) - that,
    exactly (Euler on a constant field); outside the guidance interval the model alone."""
    a, b = torch.randn(1, 4, 3, dtype=torch.float64), torch.randn(1, 4, 3, dtype=torch.float64)
    noise = torch.randn(2, 4, 3, dtype=torch.float64)
    main, guide = Recorder(lambda x, t: a.expand_as(x)), Recorder(lambda x, t: b.expand_as(x))
    z = sample(main, noise, None, alpha=3.0, steps=6, guidance=2.5, guide=guide)
    assert torch.allclose(z, noise - (b + 2.5 * (a - b)), atol=1e-12)
    z = sample(main, noise, None, alpha=1.0, steps=4, guidance=2.5, guide=guide, guidance_interval=(0.0, 0.5))
    assert torch.allclose(z, noise - 0.5 * a - 0.5 * (b + 2.5 * (a - b)), atol=1e-12)  # t in (1, 0.5]: model only


# ----------------------------------------------------------------------------- the learning test
@pytest.mark.parametrize("cond", ["class", "text"])
def test_dit_learns_per_condition_gaussians(cond):
    """Three Gaussian clusters (per-token means ~ N(0, 1), so about 1.4 apart in RMS; spreads 0.1, 0.3, 0.5), chosen by
    a class id or by a fixed random 'text' (3 token states per class). After 400 AdamW steps, 300 samples per condition
    (Heun, 16 steps) must have a per-condition mean within 0.1 of the truth (RMS over the 4 x 8 elements) and a spread
    (per-element std, averaged) within 20% of the truth. An untrained model (mean error ~1) or one that ignores the
    condition fails by far."""
    torch.manual_seed(0)
    K, N, C = 3, 4, 8
    mu, sigma, text = torch.randn(K, N, C), torch.tensor([0.1, 0.3, 0.5]), torch.randn(K, 3, 16)
    cfg = DiTConfig(in_channels=C, num_tokens=N, hidden_size=64, depth=2, num_heads=2, cond=cond, num_classes=K,
                    text_dim=16, text_len=3, connector_depth=1)
    model = DiT(cfg)
    steps = 400
    opt = torch.optim.AdamW(model.parameters(), lr=4e-3, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / steps)
    for _ in range(steps):
        k = torch.randint(K, (128,))
        z = mu[k] + sigma[k, None, None] * torch.randn(128, N, C)
        loss, _, _ = flow_loss(model, z, k if cond == "class" else text[k], alpha=1.0)  # alpha 1: only 32 dims
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    k = torch.arange(K).repeat_interleave(300)
    z = sample(model, torch.randn(len(k), N, C), k if cond == "class" else text[k], alpha=1.0, steps=16, method="heun")
    for j in range(K):
        mean_err = (z[k == j].mean(0) - mu[j]).square().mean().sqrt()
        spread = z[k == j].std(0).mean() / sigma[j]
        assert mean_err < 0.1 and 0.8 < spread < 1.2, (j, mean_err.item(), spread.item())


# ----------------------------------------------------------------------------- the released checkpoints (official layouts)
def official_ddt_shapes(E, depth, heads, H, head_depth, head_heads, C=768, grid=16, classes=1000):
    """Every tensor of RAE's DiTwDDTHead (its stage2_model.pt), written down from the official module tree."""
    N, h = grid * grid, lambda d: int(2 / 3 * int(4 * d))
    s = {"pos_embed": (1, N, E), "x_embedder.proj.weight": (H, C, 1, 1), "x_embedder.proj.bias": (H,),
         "s_embedder.proj.weight": (E, C, 1, 1), "s_embedder.proj.bias": (E,), "s_projector.weight": (H, E),
         "s_projector.bias": (H,), "t_embedder.W": (256,), "t_embedder.mlp.0.weight": (E, 512),
         "t_embedder.mlp.0.bias": (E,), "t_embedder.mlp.2.weight": (E, E), "t_embedder.mlp.2.bias": (E,),
         "y_embedder.embedding_table.weight": (classes + 1, E), "final_layer.norm_final.weight": (H,),
         "final_layer.linear.weight": (C, H), "final_layer.linear.bias": (C,),
         "final_layer.adaLN_modulation.1.weight": (2 * H, H), "final_layer.adaLN_modulation.1.bias": (2 * H,),
         "enc_feat_rope.freqs_cos": (N, E // heads), "enc_feat_rope.freqs_sin": (N, E // heads),
         "dec_feat_rope.freqs_cos": (N, H // head_heads), "dec_feat_rope.freqs_sin": (N, H // head_heads)}
    for i in range(depth + head_depth):
        D = E if i < depth else H
        s |= {f"blocks.{i}.{k}": v for k, v in {
            "norm1.weight": (D,), "norm2.weight": (D,), "attn.qkv.weight": (3 * D, D), "attn.qkv.bias": (3 * D,),
            "attn.proj.weight": (D, D), "attn.proj.bias": (D,), "mlp.w12.weight": (2 * h(D), D),
            "mlp.w12.bias": (2 * h(D),), "mlp.w3.weight": (D, h(D)), "mlp.w3.bias": (D,),
            "adaLN_modulation.1.weight": (6 * D, D), "adaLN_modulation.1.bias": (6 * D,)}.items()}
    return s


def scale_rae_dit_shapes(D=2048, depth=32, heads=32, C=1152, Dc=2048, N=256):
    """Every tensor of Scale-RAE's released LightningDiT (diff_head.model.*, prefix dropped), from its module tree."""
    h = int(2 / 3 * int(4 * D))
    s = {"pos_embed": (1, N, D), "x_embedder.proj.weight": (D, C, 1, 1), "x_embedder.proj.bias": (D,),
         "t_embedder.mlp.0.weight": (Dc, 512), "t_embedder.mlp.0.bias": (Dc,), "t_embedder.mlp.2.weight": (Dc, Dc),
         "t_embedder.mlp.2.bias": (Dc,), "y_embedder.dropout_embedding": (Dc,), "final_layer.norm_final.weight": (D,),
         "final_layer.linear.weight": (C, D), "final_layer.linear.bias": (C,),
         "final_layer.adaLN_modulation.1.weight": (2 * D, Dc), "final_layer.adaLN_modulation.1.bias": (2 * D,),
         "feat_rope.freqs_cos": (N, D // heads), "feat_rope.freqs_sin": (N, D // heads)}
    for i in range(depth):
        s |= {f"dit_blocks.{i}.{k}": v for k, v in {
            "norm1.weight": (D,), "norm2.weight": (D,), "attn.qkv.weight": (3 * D, D), "attn.qkv.bias": (3 * D,),
            "attn.proj.weight": (D, D), "attn.proj.bias": (D,), "mlp.w12.weight": (2 * h, D), "mlp.w12.bias": (2 * h,),
            "mlp.w3.weight": (D, h), "mlp.w3.bias": (D,), "adaLN_modulation.1.weight": (6 * D, Dc),
            "adaLN_modulation.1.bias": (6 * D,)}.items()}
    return s


@pytest.mark.parametrize("name, shapes, kind, params", [
    ("DiT^DH-XL", official_ddt_shapes(1152, 28, 16, 2048, 2, 16), "rae", 838_675_796),
    ("DiT^DH-S", official_ddt_shapes(384, 12, 6, 2048, 2, 16), "rae", 196_455_764),
    ("DiT^DH-XL 512 px", official_ddt_shapes(1152, 28, 16, 2048, 2, 16, grid=32), "rae", 839_560_532),
    ("Scale-RAE 2.4B", scale_rae_dit_shapes(), "scale-rae", 2_435_944_896)])
def test_official_dits_round_trip_every_key_and_shape_at_full_size(name, shapes, kind, params):
    """Import then export on the meta device gives back exactly the official keys and shapes (parameter counts as
    a walk of the official module trees counts them: frozen tables included, RoPE buffers not)."""
    state = {k: torch.empty(v, device="meta") for k, v in shapes.items()}
    assert sum(v.numel() for k, v in state.items() if "rope" not in k) == params
    cfg = DiTConfig(**released.official_config(state, kind))
    with torch.device("meta"):
        model = DiT(cfg)
    ours = released.official_state(state, cfg, kind)
    model.load_state_dict(ours, assign=True)  # strict: every key of our model, no other
    back = released.official_state(model.state_dict(), cfg, kind, to_ours=False)
    if kind == "scale-rae":
        assert "t_embedder.freqs" in ours  # regenerated: the file has no t_embedder.W
    assert {k: tuple(v.shape) for k, v in back.items()} == shapes


def test_official_import_is_exact_on_random_weights_both_ways():
    """Our DiT -> official layout -> our DiT gives the same tensors and the same outputs (DiT^DH, LightningDiT and
    Scale-RAE's per-token mode with a condition narrower than the trunk)."""
    torch.manual_seed(0)
    for kw, kind in [(dict(cond="class", num_classes=5, ddt_depth=1, ddt_width=64, ddt_heads=4, cond_silu=True), "rae"),
                     (dict(cond="class", num_classes=5), "rae"), (dict(cond="tokens", cond_dim=16, cond_silu=True),
                                                                   "scale-rae")]:
        cfg = DiTConfig(in_channels=8, num_tokens=16, hidden_size=32, depth=2, num_heads=4, connector_depth=0, **kw)
        model = DiT(cfg)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.2)
            model.t_embedder.freqs.copy_(released.scale_rae_freqs()) if kind == "scale-rae" else None
        theirs = released.official_state(model.state_dict(), cfg, kind, to_ours=False)
        assert DiTConfig(**released.official_config(theirs, kind)) == cfg
        loaded = dit.load_official(theirs, kind, "tiny")
        x, t, drop = torch.randn(3, 16, 8), torch.rand(3), torch.tensor([False, True, False])
        y = torch.randint(0, 5, (3,)) if kind == "rae" else torch.randn(3, 16, 16)
        assert torch.equal(model(x, t, y, drop), loaded(x, t, y, drop))


def test_official_rope_order_is_the_neighbour_pairing():
    """Official RoPE rotates channel pairs (2i, 2i + 1) with each frequency repeated twice, rows then columns: our
    table with its columns reordered and our rotation of permuted channels give their rotation exactly."""
    grid, hd = 4, 8
    freqs = 1 / 10000 ** (torch.arange(0, hd // 2, 2).float() / (hd // 2))  # (hd/4,)
    pos = torch.arange(grid).float()
    row = (pos[:, None] * freqs).repeat_interleave(2, dim=1)  # (grid, hd/2): neighbours share a frequency
    table = torch.cat([row[:, None].expand(grid, grid, -1), row[None].expand(grid, grid, -1)], -1).reshape(-1, hd)
    q = torch.randn(1, 1, grid * grid, hd)
    rot = torch.stack([-q[..., 1::2], q[..., ::2]], -1).flatten(-2)  # their rotate_half
    theirs = q * table.cos() + rot * table.sin()
    order = released.rope_order(hd)
    ours = apply_rope(q[..., order], torch.stack([table.cos(), table.sin()])[..., order])
    torch.testing.assert_close(ours, theirs[..., order], atol=1e-6, rtol=0)
    torch.testing.assert_close(rope_2d(grid, hd)[..., :], torch.stack([table.cos(), table.sin()])[..., order],
                               atol=1e-6, rtol=0)


def test_official_schedules():
    """RAE: 49 Euler steps on 1 - linspace(0, 0.999, 50) shifted by sqrt(48); Scale-RAE: 48 steps down its respaced
    grid, then the last step back up to t = 1 (49 model calls). Values as the official grids compute them."""
    rae = dit.official_schedule("rae", math.sqrt(48))
    assert len(rae) == 49 and rae[0][0] == 1.0 and all(a[1] == b[0] for a, b in zip(rae, rae[1:]))
    assert [round(t, 5) for t, _ in rae[:4]] == [1.0, 0.99701, 0.9939, 0.99068]
    assert [round(t, 5) for _, t in rae[-3:]] == [0.23198, 0.13151, 0.00689]
    srae = dit.official_schedule("scale-rae", math.sqrt(72))
    assert len(srae) == 49 and round(srae[0][0], 5) == 0.9976 and round(srae[-2][1], 6) == 0.008422
    assert srae[-1] == (srae[0][0], 1.0)  # the odd last step: from the first time up to t = 1
    v = torch.full((1, 4, 2), 0.5)  # a constant field is integrated exactly along any schedule
    x = sample(lambda x, t, c, d: v, torch.zeros(1, 4, 2), None, 1.0, schedule=rae)
    torch.testing.assert_close(x, v * (rae[-1][1] - 1.0))


def test_scale_rae_time_frequencies_are_the_official_seeded_draw():
    """Scale-RAE does not store its Gaussian-Fourier frequencies: they are torch.normal from seed 114514 (pinned here, so
    a torch whose generator drew otherwise would fail)."""
    w = released.scale_rae_freqs()
    assert w.shape == (256,)
    torch.testing.assert_close(w[:4], torch.tensor([0.164998, -0.4287392, -0.0242669, 0.1494236]), atol=1e-6, rtol=0)


def fixture(name):
    """Outputs of the official code on tiny random weights (fixtures/README.md; make_fixtures.py regenerates them)."""
    return torch.load(os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", name), weights_only=True)


def tokens(x):  # the official (B, C, h, w) latent -> our (B, N, C) tokens in raster order
    return x.flatten(2).transpose(1, 2)


@pytest.mark.parametrize("name", ["rae_ditdh.pt", "rae_lightningdit.pt"])
def test_rae_dits_equal_the_official_modules(name, tmp_path):
    """load_rae_dit on a stage2_model.pt written by the official DiTwDDTHead / LightningDiT: the forward (a null-class
    sample included), AutoGuidance, and the official 49-step Euler sampler (torchdiffeq on its grid) on our side."""
    f = fixture(name)
    path = tmp_path / "stage2_model.pt"
    torch.save({"ema": f["state"]} if "ag_out" in f else f["state"], path)  # both containers the release may use
    model = dit.load_rae_dit(str(path))
    y, null = f["y"].clone(), f["y"] == f["config"]["num_classes"]
    out = model(tokens(f["x"]), f["t"], y.masked_fill(null, 0), null)
    torch.testing.assert_close(out, tokens(f["out"]), atol=1e-5, rtol=1e-5)
    schedule = dit.official_schedule("rae", f["shift"])
    torch.testing.assert_close(torch.tensor([t for t, _ in schedule]), f["t_calls"], atol=1e-7, rtol=0)
    z = sample(model, tokens(f["noise"]), f["y_sample"], f["shift"], schedule=schedule)
    torch.testing.assert_close(z, tokens(f["euler_out"]), atol=1e-5, rtol=1e-5)
    if "ag_out" in f:
        torch.save(f["guide_state"], tmp_path / "guide.pt")
        with pytest.raises(ValueError, match="head_depth"):  # a trunk as wide as the head: shapes can't tell
            dit.load_rae_dit(str(tmp_path / "guide.pt"))
        guide = dit.load_rae_dit(str(tmp_path / "guide.pt"), head_depth=f["guide_config"]["depth"][1])
        v, v_g = (m(tokens(f["x"]), f["t"], y.masked_fill(null, 0), null) for m in (model, guide))
        torch.testing.assert_close(v_g + f["ag_scale"] * (v - v_g), tokens(f["ag_out"]), atol=1e-5, rtol=1e-5)


def test_scale_rae_dit_equals_the_official_module_and_sampler():
    """load_scale_rae_dit on the official LightningDiT's state (with the snapshot's diff_head.model. prefix): the
    regenerated time frequencies, the forward with per-token conditions, and the rectified-flow sampler's 49 steps."""
    f = fixture("scale_rae_dit.pt")
    model = dit.load_scale_rae_dit({"diff_head.model." + k: v for k, v in f["state"].items()})
    assert torch.equal(model.t_embedder.freqs, f["W"])
    keep = torch.zeros(3, dtype=torch.bool)
    torch.testing.assert_close(model(tokens(f["x"]), f["t"], f["y"], keep), tokens(f["out"]), atol=1e-5, rtol=1e-5)
    schedule = dit.official_schedule("scale-rae", f["shift"])
    assert schedule == [tuple(s) for s in f["steps"].tolist()]
    z = sample(model, tokens(f["x_end"]), f["z_cond"], f["shift"], schedule=schedule)
    torch.testing.assert_close(z, f["infer_out"], atol=1e-5, rtol=1e-5)
