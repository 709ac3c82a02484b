"""Benchmarks: each section prints measured numbers (nothing here is a test).

    python bench.py rae          # SigLIP-2 vision tower images/s, ours vs transformers (fp32, CPU)
    python bench.py tokenizer    # Gemma tokenizer strings/s
    python bench.py dit          # DiT training step: time, FLOPs, achieved FLOP/s vs plain matmuls
    python bench.py dit --compile  # the same step under torch.compile (inductor)
    python bench.py data         # data loading images/s per format
    python bench.py vae          # FLUX VAE encode/decode images/s, ours vs diffusers
    python bench.py toy          # after `python sample.py --demo`: where the toy demo's accuracy is lost
    python bench.py released     # the released models at full size (random weights, fp32): s per model call, memory
    python bench.py all

Reference libraries (transformers, diffusers) are imported inside the sections that compare against them.
"""
import argparse
import resource
import time

import torch

import data
import dit
import qwen
import rae
import tokenizer
import toy
import vae


def timeit(fn, warmup=1, iters=3):
    """Median wall time of fn() in seconds after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def interleaved(fns, iters=3):
    """Wall times of several functions timed in turn, the order rotated every round so that none always runs first
    (one warmup each): a list per function of `iters` times. Load on a shared machine then hits all of them alike."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for r in range(iters):
        for i in [(r + k) % len(fns) for k in range(len(fns))]:
            t0 = time.perf_counter()
            fns[i]()
            times[i].append(time.perf_counter() - t0)
    return times


def median(ts):
    return sorted(ts)[len(ts) // 2]


# ----------------------------------------------------------------------------- rae: SigLIP-2 encoder
def bench_rae(args):
    """so400m-patch14-224 vision tower (427.7M params), random weights, fp32: ours vs transformers (sdpa)."""
    import json, os, tempfile
    from safetensors.torch import save_file
    from transformers import SiglipVisionConfig, SiglipVisionModel
    torch.manual_seed(0)
    cfg = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
               image_size=224, patch_size=14)
    hf = SiglipVisionModel(SiglipVisionConfig(**cfg, attn_implementation="sdpa")).eval()
    with tempfile.TemporaryDirectory() as d:  # the same weights, written as a hub snapshot and read by us
        state = {("" if k.startswith("vision_model.") else "vision_model.") + k: v for k, v in hf.state_dict().items()}
        save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(d, "model.safetensors"))
        json.dump({"model_type": "siglip", "vision_config": cfg}, open(os.path.join(d, "config.json"), "w"))
        ours = rae.load_siglip2(d, text=False).vision
    img = torch.rand(args.batch, 3, 224, 224) * 2 - 1
    m = getattr(hf, "vision_model", hf)  # transformers 5 flattened SiglipVisionModel: no vision_model wrapper
    hf_latent = lambda: m.encoder(inputs_embeds=m.embeddings(img)).last_hidden_state  # the same work as ours(img)
    with torch.no_grad():
        diff = (ours(img) - hf_latent()).abs().max().item()
        diff_pool = (ours.pool(ours(img)) - hf(img).pooler_output).abs().max().item()
        t = interleaved([hf_latent, lambda: ours(img), lambda: hf(img), lambda: ours.pool(ours(img))], iters=args.iters)
    print(f"so400m/14 vision tower, batch {args.batch}, fp32, {torch.get_num_threads()} threads, {args.iters} rounds "
          f"(load average {os.getloadavg()[0]:.1f}); max|diff| block output {diff:.2e}, pooled {diff_pool:.2e}")
    for what, (t_hf, t_ours) in (("RAE latent (last block output)", t[:2]), ("pooled (post-LN + MAP head)", t[2:])):
        ratios = [a / b for a, b in zip(t_ours, t_hf)]
        print(f"  {what:31s} transformers {args.batch / median(t_hf):5.2f} img/s, ours {args.batch / median(t_ours):5.2f}"
              f" img/s; time ratio ours/transformers: median {median(ratios):.3f}, best-vs-best "
              f"{min(t_ours) / min(t_hf):.3f}")


# ----------------------------------------------------------------------------- tokenizer


def bench_tokenizer(args):
    """Pure-Python Gemma BPE strings/s on caption-like text (a 20k-word vocabulary), cold and cached."""
    import json, random, tempfile
    rng = random.Random(0)
    words = sorted({"".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 10)))
                    for _ in range(20000)})
    captions = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 25))).capitalize() + "."
                for _ in range(2000)]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(tokenizer.gemma_tokenizer_json(words), f)
    tok = tokenizer.GemmaTokenizer(f.name)
    t0 = time.perf_counter()
    tok(captions)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    tok(captions)
    warm = time.perf_counter() - t0
    line = f"vocab {len(tok.vocab)}, {len(captions)} captions of 5-25 words: cold {len(captions) / cold:,.0f} strings/s, " \
           f"cached {len(captions) / warm:,.0f} strings/s"
    try:
        from tokenizers import Tokenizer
        hf = Tokenizer.from_file(f.name)
        t_hf = timeit(lambda: hf.encode_batch([c.lower() for c in captions]), iters=3)
        line += f" (HF tokenizers, Rust, batched: {len(captions) / t_hf:,.0f} strings/s)"
    except ImportError:
        pass
    print(line)


# ----------------------------------------------------------------------------- dit: training step


def matmul_shapes():
    """A dispatch mode that counts the (batch, M, K, N) of every matmul it sees: CPU flash attention counts as its
    QK^T and PV products (2 of them forward, 4 backward: dV, dP, dQ, dK), as FLOP counters do."""
    from torch.utils._python_dispatch import TorchDispatchMode
    aten = torch.ops.aten

    class MatmulShapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = {}

        def add(self, shape, n=1):
            self.shapes[shape] = self.shapes.get(shape, 0) + n

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is aten.mm.default:
                self.add((1, *args[0].shape, args[1].shape[1]))
            elif func is aten.addmm.default:
                self.add((1, *args[1].shape, args[2].shape[1]))
            elif func is aten.bmm.default:
                self.add((*args[0].shape, args[1].shape[2]))
            elif func in (aten._scaled_dot_product_flash_attention_for_cpu.default,
                          aten._scaled_dot_product_flash_attention_for_cpu_backward.default):
                q = args[1] if func is aten._scaled_dot_product_flash_attention_for_cpu_backward.default else args[0]
                b, h, n, d = q.shape  # (B, H, N, hd)
                fwd = func is aten._scaled_dot_product_flash_attention_for_cpu.default
                self.add((b * h, n, d, n), 1 if fwd else 2)  # QK^T, (dP = dO V^T)
                self.add((b * h, n, n, d), 1 if fwd else 2)  # PV, (dV, dQ, dK share this size)
            return func(*args, **(kwargs or {}))

    return MatmulShapes()


def bench_dit(args):
    """One fp32 training step (forward + backward + AdamW) of DiT-S in text mode (Scale-RAE's per-token adaLN) on
    N = 256 tokens x C = 1152 channels, batch 8: step time, analytic FLOPs, achieved FLOP/s, and the FLOP/s of plain
    torch.matmul over exactly the matmul shapes the step runs (recorded by a dispatch mode), in the same process."""
    from dit import PRESETS, DiT, DiTConfig, flops, flow_loss, shift_alpha

    cfg, B = DiTConfig(**{**PRESETS["DiT-S"], "cond": "text"}), 8
    torch.manual_seed(0)
    model = DiT(cfg)
    # fused: one kernel over all parameters; the default per-parameter loop costs more than a fifth of this step on CPU
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
    z = torch.randn(B, cfg.num_tokens, cfg.in_channels)
    text = torch.randn(B, cfg.text_len, cfg.text_dim)
    alpha = shift_alpha(cfg.num_tokens, cfg.in_channels)

    # --compile: inductor fuses the elementwise work around the matmuls (adaLN modulate, RoPE, SwiGLU, norms)
    train_model = torch.compile(model) if args.compile else model

    def step():
        loss, _, _ = flow_loss(train_model, z, text, alpha)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up (allocator, AdamW state; compilation with --compile)
    with matmul_shapes() as rec:  # on the eager model: compiled kernels run below the dispatcher
        loss, _, _ = flow_loss(model, z, text, alpha)
        loss.backward()
        opt.zero_grad(set_to_none=True)
    operands = [(torch.randn(b, m, k).squeeze(0), torch.randn(b, k, n).squeeze(0), count)
                for (b, m, k, n), count in rec.shapes.items()]

    def matmuls():  # the step's matmuls, as plain contiguous fp32 torch.matmul calls
        for x, w, count in operands:
            for _ in range(count):
                torch.matmul(x, w)

    # interleaved, so that both see the same load on a shared machine
    step_s, mm_s = [sorted(ts)[1] for ts in zip(*[(timeit(step, 0, 1), timeit(matmuls, 0, 1)) for _ in range(3)])]
    step_flops = flops(cfg) * B  # analytic: 3 x forward
    mm_flops = sum(2 * b * m * k * n * count for (b, m, k, n), count in rec.shapes.items())
    achieved, roofline = step_flops / step_s, mm_flops / mm_s
    print(f"DiT-S text mode (D {cfg.hidden_size}, depth {cfg.depth}), N {cfg.num_tokens}, C {cfg.in_channels}, "
          f"T {cfg.text_len}, batch {B}, fp32, {torch.get_num_threads()} threads, "
          f"{'compiled' if args.compile else 'eager'}")
    print(f"train step (fwd + bwd + AdamW): {step_s:.3f} s")
    print(f"analytic FLOPs/step: {step_flops / 1e9:.1f} G (matmuls the step actually ran: {mm_flops / 1e9:.1f} G "
          f"in {sum(rec.shapes.values())} calls, {len(rec.shapes)} shapes)")
    print(f"achieved: {achieved / 1e9:.1f} GFLOP/s")
    print(f"plain torch.matmul, same shapes: {roofline / 1e9:.1f} GFLOP/s ({mm_s:.3f} s for the step's matmuls)")
    print(f"ratio: {achieved / roofline:.1%} of matmul FLOP/s (target >= 70%)")


# ----------------------------------------------------------------------------- data loading


def bench_data(args):
    """Images/s through a DataLoader at 224 px for each format, over the same few hundred ImageNet-sized JPEGs."""
    import io
    import os
    import tarfile
    import tempfile

    import numpy as np
    from PIL import Image
    from torch.utils.data import DataLoader


    n, size, batch = 384, 224, 32
    with tempfile.TemporaryDirectory() as root:
        # Photo-like 500x375 JPEGs (ImageNet's typical size): smooth colour fields plus grain, ~50 KB at quality 90.
        rng = np.random.default_rng(0)
        jpegs = []
        for _ in range(n):
            field = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((500, 375), Image.BICUBIC)
            pixels = np.asarray(field, dtype=np.float32) + rng.normal(0, 12, (375, 500, 1))
            buf = io.BytesIO()
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
            jpegs.append(buf.getvalue())
        os.makedirs(f"{root}/caps")
        for i, jpg in enumerate(jpegs):
            os.makedirs(f"{root}/classes/class_{i % 8}", exist_ok=True)
            for path in (f"{root}/caps/{i:04d}.jpg", f"{root}/classes/class_{i % 8}/{i:04d}.jpg"):
                with open(path, "wb") as f:
                    f.write(jpg)
            with open(f"{root}/caps/{i:04d}.txt", "w") as f:
                f.write(f"a photo number {i}")
        os.makedirs(f"{root}/shards")
        for s in range(8):
            with tarfile.open(f"{root}/shards/shard-{s}.tar", "w") as tar:
                for i in range(s, n, 8):
                    for name, payload in ((f"{i:04d}.jpg", jpegs[i]), (f"{i:04d}.txt", b"a photo number %d" % i)):
                        info = tarfile.TarInfo(name)
                        info.size = len(payload)
                        tar.addfile(info, io.BytesIO(payload))

        datasets = {"toy world": toy.ToyWorld(size, length=n), "image folder + .txt": f"{root}/caps",
                    "class folders": f"{root}/classes", "tar shards": f"{root}/shards/shard-{{0..7}}.tar"}
        print(f"{n} images -> {size} px, batch {batch}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
        print(f"{'format':<22}{'workers':>8}{'images/s':>10}")
        for name, ds in datasets.items():
            ds = data.build_dataset(ds, size) if isinstance(ds, str) else ds
            for workers in (0, 2):
                loader = DataLoader(ds, batch_size=batch, num_workers=workers, collate_fn=data.collate)
                seconds = timeit(lambda: sum(len(b.get("caption", [])) for b in loader), warmup=1, iters=3)
                print(f"{name:<22}{workers:>8}{n / seconds:>10.0f}")


# ----------------------------------------------------------------------------- vae: FLUX VAE


def bench_vae(args):
    """FLUX.1 VAE at full width (83.8M params, random weights), fp32, 256x256, batch 1: ours vs diffusers'
    AutoencoderKL on the same weights (saved by diffusers, loaded by our load_flux_vae)."""
    import tempfile

    from diffusers import AutoencoderKL


    torch.manual_seed(0)
    ref = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
                        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                        norm_num_groups=32, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                        use_post_quant_conv=False, mid_block_add_attention=True).eval()
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp)
        ours = vae.load_flux_vae(tmp)
    B, S = 1, 256
    img = torch.rand(B, 3, S, S) * 2 - 1  # (B, 3, H, W) in [-1, 1]
    z = torch.randn(B, 16, S // 8, S // 8)
    runs = {  # the FLUX pipelines' scale and shift around diffusers' encode/decode, as our encode/decode do inside
        "ours": (lambda: ours.encode(img), lambda: ours.decode(z)),
        "diffusers": (lambda: 0.3611 * (ref.encode(img).latent_dist.mode() - 0.1159),
                      lambda: ref.decode(z / 0.3611 + 0.1159).sample),
    }
    with torch.no_grad():
        # Rounds alternate ours and diffusers, so load from other processes on a shared machine hits both alike.
        seconds = {name: ([], []) for name in runs}
        for _ in range(4):  # the first round is the warmup
            for name, fns in runs.items():
                for fn, times in zip(fns, seconds[name]):
                    times.append(timeit(fn, warmup=0, iters=1))
        print(f"FLUX.1 VAE, fp32, {S}x{S}, batch {B}, {torch.get_num_threads()} threads; "
              f"images/s, median of 3 alternating rounds after 1 warmup")
        print(f"{'':10} {'encode':>8} {'decode':>8}")
        for name, (enc, dec) in seconds.items():
            print(f"{name:10} {B / sorted(enc[1:])[1]:8.3f} {B / sorted(dec[1:])[1]:8.3f}")
        diff_z = (runs["ours"][0]() - runs["diffusers"][0]()).abs().max()
        diff_img = (runs["ours"][1]() - runs["diffusers"][1]()).abs().max()
    print(f"max |ours - diffusers|: z {diff_z:.1e}, img {diff_img:.1e}")


# ----------------------------------------------------------------------------- toy: the demo's diagnosis


def bench_toy(args):
    """Run after `python sample.py --demo` (it reads runs/toy_decoder and runs/toy_dit). Three measurements that say
    where the demo's toy-GenEval accuracy is lost: the decoder's reconstructions scored like generated images; how
    far the DiT's latent moves when the prompt's colour or position word changes (same noise); and whether a colour
    is bound to its object, in the text states and in the DiT's per-token condition (linear probes)."""
    import math
    import tempfile
    import numpy as np

    enc, dec = toy.load_encoder(), rae.load_decoder("runs/toy_decoder/decoder.safetensors")
    ae = rae.RAE(enc.vision, dec)
    world = toy.ToyWorld(enc.vision.grid * enc.vision.patch, seed=1, split="test")
    items = [world[i] for i in range(96)]
    img = torch.stack([it["img"] for it in items])
    with torch.no_grad():
        recon = ae.decode(ae.encode(img)).clamp(-1, 1)
    acc = toy.score_toy(recon, toy.toy_truth([it["caption"] for it in items]))
    print("decoder reconstructions of 96 test images, toy GenEval: " +
          ", ".join(f"{k} {v:.1%}" for k, v in acc.items() if isinstance(v, float)))

    model, meta = dit.load_dit("runs/toy_dit", "cpu")
    colours = ["red", "blue", "green", "yellow", "purple", "orange"]
    places = ["on the left", "on the right", "at the top", "at the bottom"]
    prompts = [f"a {c} square in the center" for c in colours] + [f"a red square {p}" for p in places]
    noise = torch.randn(1, model.cfg.num_tokens, model.cfg.in_channels,
                        generator=torch.Generator().manual_seed(0)).repeat(len(prompts), 1, 1)
    with torch.no_grad():
        z = dit.sample(model, noise, enc.text(enc.tokenizer(prompts)), float(meta["alpha"]), steps=30, guidance=4.0)
    by_colour = [(z[0] - z[i]).norm().item() for i in range(1, len(colours))]
    by_place = [(z[len(colours)] - z[i]).norm().item() for i in range(len(colours) + 1, len(prompts))]
    print(f"DiT latents, same noise: a colour word changed moves z by {min(by_colour):.1f}-{max(by_colour):.1f}, "
          f"a position phrase changed by {min(by_place):.1f}-{max(by_place):.1f}")

    # binding: is the LEFT object's colour linearly readable (a probe fitted on 900 two-object prompts, tested on
    # 300) from the text state of the word "left", and from the DiT's condition y on the left half of the grid?
    rng = np.random.default_rng(0)
    prompts, left = [], []
    for _ in range(1200):
        a, b = rng.choice(list(toy.COLORS), 2, replace=False)
        parts = [f"{data.article(c)} {c} {rng.choice(toy.SHAPES)} on the {side}"
                 for c, side in ((a, "left"), (b, "right"))]
        prompts.append(" and ".join(parts[::-1] if rng.random() < 0.5 else parts))
        left.append(list(toy.COLORS).index(a))
    left, ids = torch.tensor(left), enc.tokenizer(prompts)
    with torch.no_grad():
        states = enc.text(ids)  # (1200, T, Dt)
        y = model.embed_condition(states)  # (1200, N, D)
    where = (torch.arange(len(ids)), (ids == enc.tokenizer.encode(" left")[0]).int().argmax(1))  # the word "left"
    with tempfile.TemporaryDirectory() as d:  # the same architecture with random text blocks, for comparison
        toy.write_tiny_siglip2(d, toy.toy_vocab(), vision=dict(toy.TOY_VISION, image_size=112), text=toy.TOY_TEXT)
        with torch.no_grad():
            random_states = rae.load_siglip2(d).text(ids)
    grid = math.isqrt(model.cfg.num_tokens)
    feats = {"state at 'left', random text tower": random_states[where], "state at 'left', toy text tower":
             states[where], "mean toy text state (bag of words)": states.mean(1),
             "DiT condition y, left half": y[:, torch.arange(grid**2) % grid < grid // 2].mean(1)}
    for name, f in feats.items():
        f = (f - f[:900].mean(0)) / (f[:900].std(0) + 1e-6)
        probe = torch.nn.Linear(f.shape[1], len(toy.COLORS))
        opt = torch.optim.Adam(probe.parameters(), 1e-2, weight_decay=1e-4)
        for _ in range(300):
            loss = torch.nn.functional.cross_entropy(probe(f[:900]), left[:900])
            opt.zero_grad()
            loss.backward()
            opt.step()
        acc = (probe(f[900:]).argmax(1) == left[900:]).float().mean().item()
        print(f"left object's colour read from the {name}: {acc:.0%} (chance among the two named: 50%)")


# ----------------------------------------------------------------------------- released: the papers' models, full size
def bench_released(args):
    """Seconds per model call of the released models' networks at full size (random weights, fp32, batch 1, this
    CPU), and the process's peak memory after each set is built and run: what sample.py spends per image is the
    DiT's 49 calls (x2 with RAE's AutoGuidance guide), plus Scale-RAE's LLM answer and one decode."""
    torch.manual_seed(0)
    peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # GiB (ru_maxrss is in KiB)
    nparams = lambda m: sum(p.numel() for p in m.parameters()) / 1e9

    def dit_call(cfg, cond):
        model = dit.DiT(cfg).eval()
        x, t, drop = torch.randn(1, cfg.num_tokens, cfg.in_channels), torch.rand(1), torch.zeros(1, dtype=torch.bool)
        with torch.no_grad():
            return model, timeit(lambda: model(x, t, cond, drop), warmup=1, iters=args.iters)

    def decode_call(C, p):
        dec = rae.Decoder(rae.DecoderConfig(latent_dim=C, num_tokens=256, patch_size=p)).eval()  # ViT-XL
        with torch.no_grad():
            return dec, timeit(lambda: dec(torch.randn(1, 256, C)), warmup=1, iters=args.iters)

    # RAE: DiT^DH-XL + its DiT^DH-S guide on DINOv2-B latents (256 x 768), the ViT-XL decoder
    xl = dict(in_channels=768, num_tokens=256, cond="class", cond_silu=True, connector_depth=0)
    label = torch.tensor([207])
    main_dit, t_xl = dit_call(dit.DiTConfig(**dit.PRESETS["DiTDH-XL"] | xl), label)
    guide, t_s = dit_call(dit.DiTConfig(**dit.PRESETS["DiTDH-XL"] | xl | dict(hidden_size=384, depth=12, num_heads=6)),
                          label)
    dec, t_dec = decode_call(768, 16)
    print(f"RAE DiT^DH-XL ({nparams(main_dit):.3f}B) {t_xl:.2f} s/call, DiT^DH-S guide ({nparams(guide):.3f}B) "
          f"{t_s:.2f} s/call, ViT-XL decoder {t_dec:.2f} s/image; one image with AutoGuidance: 49 x "
          f"{t_xl + t_s:.2f} + {t_dec:.2f} = {49 * (t_xl + t_s) + t_dec:.0f} s; peak memory {peak():.1f} GiB")
    del main_dit, guide, dec
    # Scale-RAE: Qwen2.5-1.5B (prompt, an answer of 5 tokens with the cache, the 256 queries), the 2.4B DiT, decoder
    llm = qwen.ScaleRAEText(qwen.QwenConfig(**qwen.PRESETS["Scale-RAE-1.5B"])).eval()
    llm.init_weights()
    ids = torch.randint(0, 151643, (1, 40))  # the ChatML prompt of a short caption: about 40 tokens

    def answer():
        cache = qwen.KVCache()
        h = llm.hidden(ids, cache=cache)
        for _ in range(5):
            h = llm.hidden(llm.logits(h[:, -1:]).argmax(-1), cache=cache)
        return llm.hidden(inputs_embeds=llm.model.latent_queries[None], cache=cache)

    with torch.no_grad():
        t_llm = timeit(answer, warmup=1, iters=args.iters)
    big, t_big = dit_call(dit.DiTConfig(**dit.PRESETS["T2I-2.4B"] | dict(cond="tokens", cond_silu=True,
                                                                          connector_depth=0)),
                          torch.randn(1, 256, 2048))
    dec, t_dec = decode_call(1152, 14)
    print(f"Scale-RAE LLM answer + queries ({nparams(llm):.3f}B) {t_llm:.2f} s, DiT ({nparams(big):.3f}B) {t_big:.2f} "
          f"s/call, decoder {t_dec:.2f} s/image; one image: {t_llm:.1f} + 49 x {t_big:.2f} + {t_dec:.2f} = "
          f"{t_llm + 49 * t_big + t_dec:.0f} s; peak memory {peak():.1f} GiB")


SECTIONS = {"rae": bench_rae, "tokenizer": bench_tokenizer, "dit": bench_dit, "data": bench_data, "vae": bench_vae,
            "toy": bench_toy, "released": bench_released}

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("section", choices=[*SECTIONS, "all"])
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--batch", type=int, default=4, help="images per forward in the encoder sections")
    p.add_argument("--iters", type=int, default=3, help="timed repetitions (the median is reported; rae: rounds, use 6+)")
    p.add_argument("--compile", action="store_true", help="dit: time the training step under torch.compile")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for name, fn in SECTIONS.items():
        if args.section in (name, "all"):
            print(f"== {name}")
            fn(args)
