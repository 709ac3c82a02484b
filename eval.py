"""Evaluation the field reports: FID, FD-DINOv2, precision / recall, density / coverage, the SigLIP-2 image-text
score and the toy GenEval; the feature extractors they need; a command line that runs them on image folders.

- Features (fp32). FID: the 2048-d pool features of the FID Inception-v3 (the 2015-12-05 TensorFlow graph as
  pytorch-fid ports it: FIDInceptionA/C/E_1/E_2), written from scratch here and read from pytorch-fid's
  pt_inception-2015-12-05-6726825d.pth or its safetensors conversion; inputs resized to 299 as pytorch-fid does.
  FD-DINOv2 (Stein et al. 2023, "Exposing flaws of generative model evaluation metrics", dgm-eval): the CLS token
  of DINOv2 ViT-L/14's final normed output, after PIL's 224 x 224 bicubic resize and ImageNet normalisation.
  SigLIP-2: the pooled image embedding, from pixels or straight from generated RAE latents (no decoding).
- Fréchet distance: |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) between Gaussians fitted to two feature sets,
  float64 (scipy's sqrtm formula of pytorch-fid and the ADM evaluator within ~1e-10; exact where that one loses
  digits: rank-deficient covariances). Reference statistics: from images, or the ADM evaluator's .npz.
- Precision / recall (Kynkäänniemi et al. 2019, k = 3) and density / coverage (Naeem et al. 2020, k = 5).
- SigLIP score: mean over samples of the logit cos * exp(scale) + bias of each image with its own prompt.
Images are (B, 3, H, W) in [-1, 1]; features (n, d); statistics (mu (d,), sigma (d, d)) float64.

    python eval.py --gen samples/ --ref VIRTUAL_imagenet256_labeled.npz --metrics fid --inception pt_inception.pth
    python eval.py --gen samples/ --ref imagenet/val --size 256 --metrics fid,fd_dinov2,pr,dc \\
        --inception inception.safetensors --dinov2 ckpt/dinov2-vitl14 --out results.json
    python eval.py --gen samples/ --metrics siglip,toy_geneval --siglip toy  # prompts: samples/latents.safetensors
    python eval.py --ref imagenet/val --size 256 --save-ref-stats ref.safetensors --inception inception.safetensors
    torchrun --nproc_per_node=8 eval.py --gen samples/ --ref ref.safetensors --metrics fid --inception PATH
    python eval.py convert-inception pt_inception-2015-12-05-6726825d.pth inception.safetensors
    python -m pytest -q test_eval.py
"""
import argparse
import io
import json
import math
import os
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

import ckpt
import data
import rae
import toy


# ----------------------------------------------------------------------------- the FID Inception-v3
class BasicConv(nn.Module):
    """Conv without bias -> BatchNorm (TensorFlow's eps 1e-3; running statistics: eval mode) -> ReLU: torchvision's
    BasicConv2d, keys conv.weight and bn.*."""
    def __init__(self, cin, cout, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def add_convs(module, **specs):
    """module.<name> = BasicConv(*spec) for each name: the branches keep torchvision's names, so its keys load."""
    for name, spec in specs.items():
        setattr(module, name, BasicConv(*spec))


def avg_pool(x):  # TensorFlow's 3x3 average pool ignores the zero padding, torchvision's counts it
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


class InceptionA(nn.Module):  # Mixed_5b-d, 35 x 35: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avg pool-1x1
    def __init__(self, cin, pool):
        super().__init__()
        add_convs(self, branch1x1=(cin, 64, 1), branch5x5_1=(cin, 48, 1), branch5x5_2=(48, 64, 5, 1, 2),
                  branch3x3dbl_1=(cin, 64, 1), branch3x3dbl_2=(64, 96, 3, 1, 1), branch3x3dbl_3=(96, 96, 3, 1, 1),
                  branch_pool=(cin, pool, 1))

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(avg_pool(x))], 1)


class InceptionB(nn.Module):  # Mixed_6a, 35 -> 17: stride-2 3x3 | 1x1-3x3-3x3/2 | max pool
    def __init__(self, cin):
        super().__init__()
        add_convs(self, branch3x3=(cin, 384, 3, 2), branch3x3dbl_1=(cin, 64, 1), branch3x3dbl_2=(64, 96, 3, 1, 1),
                  branch3x3dbl_3=(96, 96, 3, 2))

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, 2)], 1)


class InceptionC(nn.Module):  # Mixed_6b-e, 17 x 17: factorised 7x7 convolutions (1x7 then 7x1)
    def __init__(self, cin, c7):
        super().__init__()
        row, col = ((1, 7), 1, (0, 3)), ((7, 1), 1, (3, 0))  # (kernel, stride, padding)
        add_convs(self, branch1x1=(cin, 192, 1), branch7x7_1=(cin, c7, 1), branch7x7_2=(c7, c7, *row),
                  branch7x7_3=(c7, 192, *col), branch7x7dbl_1=(cin, c7, 1), branch7x7dbl_2=(c7, c7, *col),
                  branch7x7dbl_3=(c7, c7, *row), branch7x7dbl_4=(c7, c7, *col), branch7x7dbl_5=(c7, 192, *row),
                  branch_pool=(cin, 192, 1))

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d7 = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d7 = conv(d7)
        return torch.cat([self.branch1x1(x), b7, d7, self.branch_pool(avg_pool(x))], 1)


class InceptionD(nn.Module):  # Mixed_7a, 17 -> 8: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | max pool
    def __init__(self, cin):
        super().__init__()
        add_convs(self, branch3x3_1=(cin, 192, 1), branch3x3_2=(192, 320, 3, 2), branch7x7x3_1=(cin, 192, 1),
                  branch7x7x3_2=(192, 192, (1, 7), 1, (0, 3)), branch7x7x3_3=(192, 192, (7, 1), 1, (3, 0)),
                  branch7x7x3_4=(192, 192, 3, 2))

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, 2)], 1)


class InceptionE(nn.Module):
    """Mixed_7b / 7c, 8 x 8: 3x3s split into 1x3 | 3x1; pool: average in 7b, max in 7c, as in the 2015 graph."""
    def __init__(self, cin, pool):
        super().__init__()
        self.pool = pool
        row, col = ((1, 3), 1, (0, 1)), ((3, 1), 1, (1, 0))
        add_convs(self, branch1x1=(cin, 320, 1), branch3x3_1=(cin, 384, 1), branch3x3_2a=(384, 384, *row),
                  branch3x3_2b=(384, 384, *col), branch3x3dbl_1=(cin, 448, 1), branch3x3dbl_2=(448, 384, 3, 1, 1),
                  branch3x3dbl_3a=(384, 384, *row), branch3x3dbl_3b=(384, 384, *col), branch_pool=(cin, 192, 1))

    def forward(self, x):
        b3, d3 = self.branch3x3_1(x), self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = avg_pool(x) if self.pool == "avg" else F.max_pool2d(x, 3, 1, 1)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3), self.branch3x3dbl_3a(d3),
                          self.branch3x3dbl_3b(d3), self.branch_pool(pooled)], 1)


class InceptionV3(nn.Module):
    """The FID network up to its 2048-d average pool (the fc classifier is never used, so never built)."""
    def __init__(self):
        super().__init__()
        add_convs(self, Conv2d_1a_3x3=(3, 32, 3, 2), Conv2d_2a_3x3=(32, 32, 3), Conv2d_2b_3x3=(32, 64, 3, 1, 1),
                  Conv2d_3b_1x1=(64, 80, 1), Conv2d_4a_3x3=(80, 192, 3))
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = InceptionA(192, 32), InceptionA(256, 64), InceptionA(288, 64)
        self.Mixed_6a, self.Mixed_6b = InceptionB(288), InceptionC(768, 128)
        self.Mixed_6c, self.Mixed_6d, self.Mixed_6e = InceptionC(768, 160), InceptionC(768, 160), InceptionC(768, 192)
        self.Mixed_7a, self.Mixed_7b, self.Mixed_7c = InceptionD(768), InceptionE(1280, "avg"), InceptionE(2048, "max")

    def forward(self, img):
        """img (B, 3, H, W) in [-1, 1], any size -> (B, 2048). pytorch-fid resizes [0, 1] images, then maps them to
        [-1, 1]; a bilinear resize commutes with that affine map, so resizing [-1, 1] directly is the same."""
        x = F.interpolate(img, size=(299, 299), mode="bilinear", align_corners=False)  # (B, 3, 299, 299)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, 2)  # (B, 64, 73, 73)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, 2)  # (B, 192, 35, 35)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean((2, 3))  # (B, 2048, 8, 8) -> (B, 2048)


def read_inception(path):
    """pytorch-fid's .pth (read weights_only) or its safetensors, without the classifier fc.* and BN step counters."""
    state = ckpt.read_safetensors(path) if str(path).endswith(".safetensors") else ckpt.read_checkpoint(path)
    return {k: v for k, v in state.items() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}


def load_inception(path, device=None):
    """pt_inception-2015-12-05-6726825d.pth or its safetensors -> InceptionV3 (eval, frozen, fp32)."""
    with torch.device("meta"):
        net = InceptionV3()
    counters = {k: torch.zeros((), dtype=torch.long) for k in net.state_dict() if k.endswith("num_batches_tracked")}
    return ckpt.load_checked(net, {**read_inception(path), **counters}, path).to(device).eval().requires_grad_(False)


def convert_inception(src, dst):
    """pytorch-fid's .pth -> safetensors with the same keys (fc and the BN counters dropped: nothing reads them)."""
    ckpt.save_safetensors(dst, {k: v.float().contiguous() for k, v in read_inception(src).items()})


# ----------------------------------------------------------------------------- feature extractors (one batch each)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _device(model):
    return next(model.parameters()).device


@torch.no_grad()
def inception_features(net, img):
    """FID features: img (B, 3, H, W) in [-1, 1] -> (B, 2048) float32."""
    return net(img.to(_device(net), torch.float32)).float()


@torch.no_grad()
def dinov2_features(enc, img, size=224):
    """FD-DINOv2 features as dgm-eval computes them: resize to 224 x 224 with PIL's bicubic (Keys a = -0.5,
    antialiased: torch's antialias=True bicubic is that filter) on 8 bits, ImageNet normalisation, the CLS
    token of the final normed output. enc(pixel_values) -> (B, 1 [+ registers] + N, D), as rae.load_dinov2's encoder
    (= HF Dinov2Model's last_hidden_state). img (B, 3, H, W) in [-1, 1] -> (B, D) float32."""
    x = (img.to(_device(enc), torch.float32) + 1) * 127.5  # [0, 255]
    if x.shape[-2:] != (size, size):  # as PIL: a horizontal pass, then a vertical one, each rounded to 8 bits
        for hw in ((x.shape[-2], size), (size, size)):
            x = F.interpolate(x, size=hw, mode="bicubic", antialias=True).round().clamp(0, 255)
    mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    return enc((x / 255 - mean) / std)[:, 0].float()


@torch.no_grad()
def siglip_embeddings(siglip, img):
    """Pooled SigLIP-2 image embeddings (B, D) float32 = HF pooler_output; img (B, 3, H, W) in [-1, 1] is resized to the
    tower's resolution as data.py prepares training images (bilinear, antialiased) when its size differs."""
    size = siglip.vision.cfg["image_size"]
    x = img.to(_device(siglip.vision), torch.float32)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    return siglip.vision.pool(siglip.vision(x)).float()


@torch.no_grad()
def siglip_latent_embeddings(ae, z):
    """The same embedding straight from RAE latents z (B, N, C), no decoding (the unified-latent property). The latent
    is LayerNorm(h) without affine (h: the last block output) [then standardised by the RAE's stats]; the LayerNorm
    loses h's per-token mean and scale, so h cannot be recovered, but the head never sees them: it starts with
    post_layernorm, and LN(LN(h)) = LN(h) up to eps. So pooling ae.unnormalize(z) (stats undone) equals pooling h."""
    z = ae.unnormalize(z.to(_device(ae.encoder), torch.float32))
    return ae.encoder.pool(z).float()


@torch.no_grad()
def siglip_scores(siglip, img_emb, prompts):
    """(B,) SigLIP-2 logit of each image embedding (B, D) with its own prompt (the diagonal of siglip.logits, the
    zero-shot score sample.py prints)."""
    ids = siglip.tokenizer(prompts).to(siglip.logit_scale.device)
    txt = siglip.text.pool(siglip.text(ids))
    return siglip.logits(img_emb.to(txt), txt).diagonal().float()


# ----------------------------------------------------------------------------- images in, features out (sharded)
class Images(IterableDataset):
    """The images of a folder (recursively: class folders too; sample.py's grid.png is not a sample) or of tar shards
    ('a-{0000..0099}.tar', a glob), in a fixed order, as {"img", "index"}; reader r of R (ranks x workers) takes index
    % R == r. size > 0: shorter side resized and center-cropped (data.load_image); 0: cropped to the shorter side."""
    def __init__(self, spec, size=0, rank=0, world=1):
        self.spec, self.size, self.rank, self.world = spec, size, rank, world
        self.files = [f for f in data.list_images(spec) if f != "grid.png"] if os.path.isdir(spec) else None
        self.shards = data.expand_shards(spec) if self.files is None else None
        if self.files == []:
            raise ValueError(f"{spec}: no images found")

    def samples(self):
        """(name, image bytes or None) of every image, in order."""
        if self.files is not None:
            yield from ((os.path.join(self.spec, f), None) for f in self.files)
            return
        for key, files in data.tar_samples(self.shards):
            image = None if isinstance(files, str) else next((files[e] for e in files if e in data.IMAGE_EXTS), None)
            yield key, image

    def __iter__(self):
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        readers, me = self.world * workers, self.rank + self.world * worker  # index % world == rank still holds
        for i, (name, raw) in enumerate(self.samples()):
            if i % readers == me:
                yield self.decode(i, name, raw)

    def decode(self, i, name, raw):
        raw = data.read_file(name) if raw is None and self.files is not None else raw
        try:
            size = self.size or (min(Image.open(io.BytesIO(raw)).size) if raw else 0)
            return {"img": data.load_image(raw, size), "index": i}
        except data.BadSample as e:
            data.BAD.add(e.reason, name)
        except Exception:  # a header PIL cannot read
            data.BAD.add("not an image", name)
        return None


def collate(samples):
    shapes = sorted({tuple(s["img"].shape) for s in samples if s is not None})
    if len(shapes) > 1:
        raise ValueError(f"images of sizes {shapes[0]} and {shapes[-1]} in one batch: pass --size N to resize them")
    return data.collate(samples)


def all_gather_rows(t):
    """Every rank's (n_r, ...) tensor (n_r may differ, or be 0) concatenated; pickled: 50k x 2048 features is fine."""
    if not dist.is_initialized():
        return t
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, t.cpu())
    return torch.cat([p for p in parts if len(p)] or parts[:1])


@torch.no_grad()
def extract(spec, extractors, size=0, batch=50, workers=0):
    """{name: (n, d) features} of every image under `spec` in file order, extractors = {name: f(img) -> (B, d)}. Each
    rank embeds its share; the shares are all-gathered. Unreadable files are skipped and counted (stderr)."""
    images = Images(spec, size, *(dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1))
    loader = DataLoader(images, batch, num_workers=workers, collate_fn=collate)
    index, feats, bad = [], {k: [] for k in extractors}, data.BadSampleCounter()
    total = math.ceil(len(images.files[images.rank::images.world]) / batch) if images.files else None  # tar: unknown
    for b in tqdm(loader, total=total, desc=f"features {spec}", disable=images.rank != 0):
        bad.update(b.pop("bad"))
        if "img" in b:  # a batch of only bad files has none
            index.append(torch.tensor(b["index"]))
            for k, f in extractors.items():
                feats[k].append(f(b["img"]).cpu())
    if bad.total():
        print(f"{spec}: skipped {bad}", file=sys.stderr)
    order = all_gather_rows(torch.cat(index) if index else torch.zeros(0, dtype=torch.long)).argsort()  # file order
    return {k: all_gather_rows(torch.cat(v) if v else torch.zeros(0))[order] for k, v in feats.items()}


# ----------------------------------------------------------------------------- statistics and the Fréchet distance
def feature_stats(features):
    """(n, d) features -> (mu (d,), sigma (d, d)): their mean and unbiased covariance, in float64."""
    x = torch.as_tensor(np.asarray(features), dtype=torch.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"feature_stats: expected (n >= 2, d) features, got shape {tuple(x.shape)}")
    return x.mean(0), torch.cov(x.T).reshape(x.shape[1], x.shape[1])


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), as a float.
    tr((S1 S2)^(1/2)) = tr((A S2 A)^(1/2)) with A = S1^(1/2), and A S2 A = B^T B with B = S2^(1/2) A: the sum of the
    singular values of B. From B, not from eigenvalues of A S2 A, the rounding stays eps |S| and not sqrt(eps) |S| with
    rank-deficient covariances (fewer samples than dimensions): 3 samples in 2048-d: self-FD 1e-13 |S|, not 1e-6."""
    mu1, mu2, s1, s2 = (torch.as_tensor(np.asarray(v), dtype=torch.float64) for v in (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.numel(), mu1.numel()):
        raise ValueError(f"frechet_distance: shapes mu {tuple(mu1.shape)}, {tuple(mu2.shape)}, sigma "
                         f"{tuple(s1.shape)}, {tuple(s2.shape)} do not describe two Gaussians of one dimension")
    root_trace = torch.linalg.svdvals(psd_sqrt(s2) @ psd_sqrt(s1)).sum()
    return float((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * root_trace)


def psd_sqrt(s):
    """The symmetric square root of a covariance: V diag(w)^(1/2) V^T (negative eigenvalues are rounding: 0)."""
    w, v = torch.linalg.eigh((s + s.T) / 2)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def save_stats(path, mu, sigma):
    ckpt.save_safetensors(path, {"mu": torch.as_tensor(mu, dtype=torch.float64),
                                 "sigma": torch.as_tensor(sigma, dtype=torch.float64)})


def load_stats(path, name=None):
    """(mu, sigma) from our safetensors (save_stats; or set `name`, e.g. "inception", of a --save-ref-stats file) or an
    .npz with arrays mu and sigma: the ADM evaluator's reference batches (Inception), so FIDs compare with papers'."""
    if str(path).endswith(".npz"):
        try:
            with np.load(path, allow_pickle=False) as f:  # no pickled objects: arrays only
                stats = {k: torch.from_numpy(f[k]).double() for k in ("mu", "sigma") if k in f.files}
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: not a readable .npz ({type(e).__name__}: {e})") from None
    else:
        stats = ckpt.read_safetensors(path)
        if name is not None and f"{name}.mu" in stats:
            stats = {k: stats[f"{name}.{k}"] for k in ("mu", "sigma") if f"{name}.{k}" in stats}
    d = stats["mu"].numel() if "mu" in stats else None
    problems = [f"missing key '{name + '.' if name else ''}{k}'" for k in ("mu", "sigma") if k not in stats]
    if not problems and (stats["mu"].ndim != 1 or stats["sigma"].shape != (d, d)):
        problems.append(f"key 'sigma' has shape {tuple(stats['sigma'].shape)}, key 'mu' {tuple(stats['mu'].shape)}: "
                        f"expected (d, d) and (d,)")
    ckpt.report(path, problems)
    return stats["mu"].double(), stats["sigma"].double()


# ----------------------------------------------------------------------------- k-NN manifolds
def _kth_radius(x, k):
    """Distance of each row of x (n, d) to its k-th nearest other row: (n,)."""
    d = torch.cdist(x, x)  # (n, n), the diagonal is each point itself
    return d.kthvalue(k + 1, dim=1).values


def precision_recall(real, fake, k=3):
    """Kynkäänniemi et al.'s improved precision and recall with k-NN balls (k = 3, as they recommend): (precision,
    recall) in [0, 1]."""
    real, fake = (torch.as_tensor(np.asarray(v), dtype=torch.float64) for v in (real, fake))
    d = torch.cdist(fake, real)  # (n_fake, n_real)
    precision = (d <= _kth_radius(real, k)[None]).any(1).double().mean()  # fake inside some real ball
    recall = (d.T <= _kth_radius(fake, k)[None]).any(1).double().mean()  # real inside some fake ball
    return float(precision), float(recall)


def density_coverage(real, fake, k=5):
    """Naeem et al.'s density (mean number of real balls a fake sample falls in, over k; about 1 when the two sets
    match, above 1 where fakes crowd dense regions) and coverage (share of real balls holding a fake; k = 5, their
    recommendation)."""
    real, fake = (torch.as_tensor(np.asarray(v), dtype=torch.float64) for v in (real, fake))
    inside = torch.cdist(fake, real) <= _kth_radius(real, k)[None]  # (n_fake, n_real)
    return float(inside.sum() / (k * fake.shape[0])), float(inside.any(0).double().mean())
# ----------------------------------------------------------------------------- the toy demo's continuous measure
@torch.no_grad()
def toy_fd(gen_img, encoder=None, seed=1, start=100_000, batch=64):
    """FD in the toy encoder's pooled SigLIP space (encoder: default toy.load_encoder()) between generated toy images
    gen_img (n, 3, H, W) in [-1, 1] and n held-out real ones, and its floor: the FD between two disjoint real sets of
    the same n (FD is biased upwards at small n: only a distance well above the floor means something). Real sets:
    test-split images [start, start + 2n) of world `seed`, far from toy.toy_prompts(n, seed). -> {"fd", "floor", "n"}"""
    encoder = encoder if encoder is not None else toy.load_encoder(text=False)
    n = len(gen_img)
    world = toy.ToyWorld(size=encoder.vision.cfg["image_size"], seed=seed, split="test", length=start + 2 * n)
    embed = lambda img: torch.cat([siglip_embeddings(encoder, b) for b in img.split(batch)])
    real = lambda lo: embed(torch.stack([world[i]["img"] for i in range(lo, lo + n)]))
    ref = feature_stats(real(start))
    return {"fd": frechet_distance(*feature_stats(embed(gen_img)), *ref),
            "floor": frechet_distance(*feature_stats(real(start + n)), *ref), "n": n}


# ----------------------------------------------------------------------------- command line
METRICS = ("fid", "fd_dinov2", "pr", "dc", "siglip", "toy_geneval")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gen", help="folder of generated images (e.g. sample.py's --out)")
    p.add_argument("--ref", help="reference images (folder, class folders, tar shards), or .safetensors / .npz stats")
    p.add_argument("--metrics", default="fid", help=f"comma-separated, of: {','.join(METRICS)}")
    p.add_argument("--inception", help="FID Inception: pt_inception-2015-12-05-6726825d.pth or its .safetensors")
    p.add_argument("--dinov2", help="DINOv2 ViT-L/14 for FD-DINOv2 (a folder rae.load_dinov2 reads)")
    p.add_argument("--siglip", default="toy", help="SigLIP-2 snapshot folder for the siglip score ('toy': the toy one)")
    p.add_argument("--prompts", help="one prompt per line, in image order (default: --gen/latents.safetensors')")
    p.add_argument("--pr-features", default="inception", choices=("inception", "dinov2"), help="space of pr and dc")
    p.add_argument("--size", type=int, default=0, help="resize the shorter side and center-crop to this; 0: as stored")
    p.add_argument("--batch", type=int, default=50, help="images per forward on each process")
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers decoding images, per process")
    p.add_argument("--save-ref-stats", metavar="PATH", help="write --ref's feature statistics (safetensors) and stop")
    p.add_argument("--out", help="write the results as JSON here")
    return p.parse_args(argv)


def setup():
    """One process, or one per GPU under torchrun (gloo on CPU); returns (device, is rank 0). training.setup does
    more than evaluation needs (a run folder, --resume, batch splits). fp32 throughout: TF32 off."""
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    return device, not dist.is_initialized() or dist.get_rank() == 0


def load_extractors(args, metrics, device):
    """({kind: f(img) -> features} for the metrics asked, the SigLIP-2 model or None): each network loaded once."""
    kinds = {k for m, k in (("fid", "inception"), ("fd_dinov2", "dinov2"), ("siglip", "siglip")) if m in metrics}
    kinds |= {args.pr_features} if {"pr", "dc"} & set(metrics) else set()
    out, siglip = {}, None
    if "inception" in kinds:
        if not args.inception:
            raise SystemExit("fid / pr / dc need --inception pt_inception-2015-12-05-6726825d.pth (or .safetensors)")
        net = load_inception(args.inception, device)
        out["inception"] = lambda img: inception_features(net, img)
    if "dinov2" in kinds:
        if not args.dinov2:
            raise SystemExit("fd_dinov2 needs --dinov2 PATH (DINOv2 ViT-L/14, as dgm-eval)")
        enc = rae.load_dinov2(args.dinov2).to(device).eval().requires_grad_(False)
        out["dinov2"] = lambda img: dinov2_features(enc, img)
    if "siglip" in kinds:
        siglip = toy.load_encoder(args.siglip).to(device)
        out["siglip"] = lambda img: siglip_embeddings(siglip, img)
    return out, siglip


def read_prompts(args):
    """The prompts of the generated images, in file order: --prompts, else those sample.py --save-latents stored."""
    path = args.prompts or os.path.join(args.gen, "latents.safetensors")
    if not os.path.exists(path):
        raise SystemExit(f"siglip / toy_geneval need the prompts: --prompts FILE, or {path} (sample.py --save-latents)")
    if not args.prompts:
        return json.loads(ckpt.read_metadata(path).get("prompts", "[]"))
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def compute(args, metrics, gen, ref, siglip, prompts):
    """The metrics from the features (ref: features, or (mu, sigma) from a statistics file), as a flat dict."""
    stats = lambda feats: feats if isinstance(feats, tuple) else feature_stats(feats)
    files = [os.path.join(args.gen, f) for f in data.list_images(args.gen) if f != "grid.png"]
    out = {"n_gen": len(next(iter(gen.values()))) if gen else len(files)}
    for metric, kind in (("fid", "inception"), ("fd_dinov2", "dinov2")):
        if metric in metrics:
            out[metric] = frechet_distance(*stats(gen[kind]), *stats(ref[kind]))
    if "pr" in metrics:
        out["precision"], out["recall"] = precision_recall(ref[args.pr_features], gen[args.pr_features])
    if "dc" in metrics:
        out["density"], out["coverage"] = density_coverage(ref[args.pr_features], gen[args.pr_features])
    if prompts is not None and len(prompts) != out["n_gen"]:
        raise SystemExit(f"{len(prompts)} prompts for {out['n_gen']} generated images")
    if "siglip" in metrics:
        out["siglip"] = float(torch.cat([siglip_scores(siglip, gen["siglip"][i:i + 256], prompts[i:i + 256])
                                         for i in range(0, len(prompts), 256)]).mean())
    if "toy_geneval" in metrics:
        truth = toy.toy_truth(prompts)
        if truth is None:
            raise SystemExit("toy_geneval: the prompts are not toy-world captions")
        acc = toy.score_toy([Image.open(f).convert("RGB") for f in files], truth)
        out.update({f"toy_{k}": v for k, v in acc.items() if k != "n"})
    return out


def main(args):
    metrics = [m for m in args.metrics.split(",") if m]
    unknown, pairwise = sorted(set(metrics) - set(METRICS)), {"pr", "dc"} & set(metrics)
    stats_file = str(args.ref).endswith((".safetensors", ".npz")) and os.path.isfile(args.ref)
    problem = (f"--metrics: unknown {unknown}; choose from {','.join(METRICS)}" if unknown else
               "give --gen DIR, or --ref with --save-ref-stats PATH" if not (args.gen or args.save_ref_stats) else
               "fid, fd_dinov2, pr and dc need --ref (images or statistics)" if not args.ref and (
                   args.save_ref_stats or {"fid", "fd_dinov2"} & set(metrics) or pairwise) else
               "--save-ref-stats and pr / dc need --ref as images" if stats_file and (args.save_ref_stats or pairwise)
               else "--save-ref-stats writes fid / fd_dinov2 statistics: name them in --metrics" if args.save_ref_stats
               and not {"fid", "fd_dinov2"} & set(metrics) else None)
    if problem:
        raise SystemExit(problem)
    prompts = read_prompts(args) if {"siglip", "toy_geneval"} & set(metrics) else None  # before the long part
    device, master = setup()
    extractors, siglip = load_extractors(args, metrics, device)
    read = lambda spec, kinds: extract(spec, {k: extractors[k] for k in kinds}, args.size, args.batch, args.workers)
    kinds = sorted(set(extractors) - {"siglip"})  # what --ref is needed for
    ref = {k: load_stats(args.ref, k) for k in kinds} if stats_file else read(args.ref, kinds) if kinds else {}
    results = None
    if args.save_ref_stats and master:  # the reference statistics, computed once
        ckpt.save_safetensors(args.save_ref_stats, {f"{k}.{name}": t for k, f in ref.items()
                                                    for name, t in zip(("mu", "sigma"), feature_stats(f))})
        print(f"wrote {args.save_ref_stats}: {', '.join(kinds)} statistics of {len(ref[kinds[0]])} images")
    elif not args.save_ref_stats:
        gen = read(args.gen, sorted(extractors)) if extractors else {}
        results = compute(args, metrics, gen, ref, siglip, prompts) if master else None
        for k, v in (results or {}).items():  # one line per metric, on rank 0
            print(f"{k:16s} {v:.6g}" if isinstance(v, float) else f"{k:16s} {v}")
        if master and args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=2)
    if dist.is_initialized():
        dist.destroy_process_group()
    return results


if __name__ == "__main__":
    if sys.argv[1:2] == ["convert-inception"]:
        if len(sys.argv) != 4:
            raise SystemExit("usage: python eval.py convert-inception pt_inception-....pth OUT.safetensors")
        convert_inception(*sys.argv[2:])
    else:
        main(parse_args())
