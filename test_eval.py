"""Tests of eval.py against the standard implementations and known answers (CPU, seconds).

The Fréchet distance is compared with the formula of pytorch-fid and the ADM evaluator, which take the matrix square
root with scipy.linalg.sqrtm and drop its imaginary rounding; the k-NN metrics with sets whose answer is known; the
FID Inception with pytorch-fid's own InceptionV3 on the same random weights; the FD-DINOv2 features with dgm-eval's
preprocessing (PIL) in front of transformers' Dinov2Model; the command line on tiny folders, in one process and
under torchrun.

The Inception oracle is read as plain source files (pytorch_fid/inception.py and torchvision/models/inception.py),
never imported as packages: a torchvision wheel whose compiled ops do not match the installed torch fails on import,
and, once installed, breaks transformers' imports too. So on a CPU-only torch, keep torchvision off sys.path:
    pip install --no-deps pytorch-fid==0.3.0
    pip install --no-deps --target "$VIRTUAL_ENV/reference" torchvision==0.28.0
"""
import enum
import importlib.util
import json
import os
import sys
import tarfile
import types

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

import eval as metrics
import rae
import toy
from conftest import one_line_naming, run, torchrun


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One thread, as conftest runs every script: the in-process runs then compute as the torchrun ones do, and on a
    small shared machine a second thread mostly waits (the Inception tests ran 5x slower with two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reference_fd(mu1, sigma1, mu2, sigma2):
    """pytorch-fid's calculate_frechet_distance (and the ADM evaluator's), with scipy's sqrtm."""
    covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * 1e-6
        covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    covmean = covmean.real
    diff = mu1 - mu2
    return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


@pytest.mark.parametrize("n,d", [(500, 16), (300, 64), (2000, 128)])
def test_frechet_distance_equals_the_standard_implementation(n, d):
    rng = np.random.default_rng(d)
    a = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) / np.sqrt(d)  # correlated features
    b = rng.normal(loc=0.3, size=(n, d)) @ rng.normal(size=(d, d)) / np.sqrt(d)
    mu1, s1 = (t.numpy() for t in metrics.feature_stats(a))
    mu2, s2 = (t.numpy() for t in metrics.feature_stats(b))
    np.testing.assert_allclose(mu1, a.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(s1, np.cov(a, rowvar=False), rtol=1e-10, atol=1e-12)
    ours, ref = metrics.frechet_distance(mu1, s1, mu2, s2), reference_fd(mu1, s1, mu2, s2)
    assert abs(ours - ref) <= 1e-6 * abs(ref), (ours, ref)


def test_frechet_distance_exact_cases():
    """Equal Gaussians: 0. Means apart, equal covariances: |mu1 - mu2|^2. Diagonal covariances: the sum of
    (sqrt(s1) - sqrt(s2))^2. Rank-deficient covariances (fewer samples than dimensions) stay real and finite."""
    rng = np.random.default_rng(0)
    m = rng.normal(size=8)
    c = np.cov(rng.normal(size=(100, 8)), rowvar=False)
    assert abs(metrics.frechet_distance(m, c, m, c)) < 1e-9
    assert abs(metrics.frechet_distance(m, c, m + 1, c) - 8) < 1e-9
    d1, d2 = rng.uniform(0.1, 2, 8), rng.uniform(0.1, 2, 8)
    expected = ((np.sqrt(d1) - np.sqrt(d2)) ** 2).sum()
    assert abs(metrics.frechet_distance(m, np.diag(d1), m, np.diag(d2)) - expected) < 1e-9
    few = [metrics.feature_stats(rng.normal(size=(5, 32))) for _ in range(2)]
    fd = metrics.frechet_distance(*few[0], *few[1])
    assert np.isfinite(fd) and fd > 0
    with pytest.raises(ValueError, match="do not describe two Gaussians"):
        metrics.frechet_distance(m, c, m[:4], c[:4, :4])


def test_stats_files_round_trip_and_read_adm_npz(tmp_path):
    rng = np.random.default_rng(1)
    mu, sigma = metrics.feature_stats(rng.normal(size=(50, 6)))
    metrics.save_stats(str(tmp_path / "ref.safetensors"), mu, sigma)
    got = metrics.load_stats(str(tmp_path / "ref.safetensors"))
    assert torch.equal(got[0], mu) and torch.equal(got[1], sigma)
    np.savez(tmp_path / "VIRTUAL_ref.npz", mu=mu.numpy().astype(np.float32), sigma=sigma.numpy())  # ADM's layout
    got = metrics.load_stats(str(tmp_path / "VIRTUAL_ref.npz"))
    assert got[0].dtype == torch.float64 and torch.allclose(got[0], mu, atol=1e-6) and torch.equal(got[1], sigma)
    np.savez(tmp_path / "bad.npz", mu=mu.numpy(), sigma=sigma.numpy()[:3])
    with pytest.raises(ValueError) as e:
        metrics.load_stats(str(tmp_path / "bad.npz"))
    one_line_naming(e, str(tmp_path / "bad.npz"), "'sigma'")
    np.savez(tmp_path / "none.npz", x=mu.numpy())
    with pytest.raises(ValueError) as e:
        metrics.load_stats(str(tmp_path / "none.npz"))
    one_line_naming(e, "missing key 'mu'", "missing key 'sigma'")


def test_precision_recall_density_coverage_known_answers():
    rng = np.random.default_rng(2)
    real = rng.normal(size=(400, 8))
    # the same set: every sample lies in its own ball
    p, r = metrics.precision_recall(real, real)
    density, coverage = metrics.density_coverage(real, real)
    assert p == r == 1.0 and coverage == 1.0 and density >= 1.0
    # far away: nothing inside the other's manifold
    far = real + 100
    assert metrics.precision_recall(real, far) == (0.0, 0.0)
    assert metrics.density_coverage(real, far) == (0.0, 0.0)
    # mode collapse: the fakes are the real samples with x0 > 1 (70 of 400) -> precision 1, recall and coverage far
    # below 1 (above the 70 / 400 of the points themselves: k-NN balls reach past the edge of the kept region)
    part = real[real[:, 0] > 1]
    p, r = metrics.precision_recall(real, part)
    density, coverage = metrics.density_coverage(real, part)
    assert p == 1.0 and len(part) / len(real) < r < 0.6 and len(part) / len(real) < coverage < 0.6
    # a fresh sample of the same distribution scores high on all four, a shifted one lower on each
    fresh, shifted = rng.normal(size=(400, 8)), rng.normal(loc=1.5, size=(400, 8))
    good, bad = metrics.precision_recall(real, fresh), metrics.precision_recall(real, shifted)
    assert min(good) > 0.6 and all(g > b for g, b in zip(good, bad))
    good, bad = metrics.density_coverage(real, fresh), metrics.density_coverage(real, shifted)
    assert 0.7 < good[0] < 1.3 and good[1] > 0.8 and all(g > b for g, b in zip(good, bad))


# ----------------------------------------------------------------------------- the FID Inception against pytorch-fid
def source_folder(name):
    """An installed package's folder, found without importing it: on sys.path, or in $VIRTUAL_ENV/reference."""
    spec = importlib.util.find_spec(name)
    folder = os.path.dirname(spec.origin) if spec and spec.origin else os.path.join(sys.prefix, "reference", name)
    if not os.path.isdir(folder):
        pytest.fail(f"the reference {name} is not installed; see this file's docstring for the two pip commands")
    return folder


def load_source(monkeypatch, name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


def reference_inception(monkeypatch):
    """pytorch-fid's InceptionV3 (resize_input=True, normalize_input=True, the pool block) with random weights, and
    the state dict of the torchvision Inception3 it is cut from: the layout of pt_inception-2015-12-05-6726825d.pth.
    torchvision/models/inception.py runs as it is; only the imports it needs for pretrained-weight metadata and
    decorators are stubbed (under stub parent packages, so torchvision/__init__.py, which loads the ops, never runs)."""
    class WeightsEnum(enum.Enum):
        @classmethod
        def verify(cls, obj):
            return obj

    def stub(name, **attrs):
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, module)
        return module
    identity = lambda *a, **k: (lambda f: f)
    tv_folder, fid_folder = source_folder("torchvision"), source_folder("pytorch_fid")  # before the stubs exist
    tv = stub("torchvision", __version__="0.28.0", __path__=[])
    tv.models = stub("torchvision.models", __path__=[])
    stub("torchvision.transforms", __path__=[])
    stub("torchvision.transforms._presets", ImageClassification=dict)
    stub("torchvision.utils", _log_api_usage_once=lambda obj: None)
    stub("torchvision.models._api", register_model=identity, Weights=types.SimpleNamespace, WeightsEnum=WeightsEnum)
    stub("torchvision.models._meta", _IMAGENET_CATEGORIES=[])
    stub("torchvision.models._utils", _ovewrite_named_param=None, handle_legacy_interface=identity)
    inception = load_source(monkeypatch, "torchvision.models.inception",
                            os.path.join(tv_folder, "models", "inception.py"))
    tv.models.inception, tv.models.inception_v3 = inception, inception.inception_v3
    fid = load_source(monkeypatch, "pytorch_fid_oracle", os.path.join(fid_folder, "inception.py"))
    # fid_inception_v3() builds the network, then loads the weights it downloads: here nothing is downloaded or loaded
    monkeypatch.setattr(fid, "load_state_dict_from_url", lambda *a, **k: None)
    monkeypatch.setattr(inception.Inception3, "load_state_dict", lambda self, state: None)
    built, build = [], fid.fid_inception_v3
    monkeypatch.setattr(fid, "fid_inception_v3", lambda: built.append(build()) or built[0])
    model = fid.InceptionV3()
    net = built[0]
    # random weights whose activations stay O(1) through the 94 convolutions, as trained ones do: BN statistics
    # measured on a random batch, random BN scales and shifts
    g = torch.Generator().manual_seed(0)
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in bns:
        bn.momentum = None  # a cumulative average: the statistics of exactly this batch
        bn.reset_running_stats()
    with torch.no_grad():
        model.train()(torch.rand(4, 3, 299, 299, generator=g))
        for bn in bns:
            bn.weight.copy_(torch.rand(bn.weight.shape, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(bn.bias.shape, generator=g) * 0.2)
        net.fc.weight.normal_(generator=g)
    return model.eval(), net.state_dict()


@pytest.fixture(scope="module")
def fid_inception(tmp_path_factory):
    """(pytorch-fid's model, path of its random weights as a .pth in the FID file's layout)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        model, state = reference_inception(monkeypatch)
    path = str(tmp_path_factory.mktemp("inception") / "pt_inception-random.pth")
    torch.save(state, path)
    return model, path


def test_inception_equals_pytorch_fid(fid_inception, tmp_path):
    """Pool features of ours (from the .pth, and from its safetensors conversion by the command line) equal
    pytorch-fid's on the same weights, at 299 and at a size it resizes (pytorch-fid takes [0, 1], ours [-1, 1])."""
    reference, pth = fid_inception
    state = torch.load(pth, weights_only=True)
    assert "fc.weight" in state and any(k.endswith("num_batches_tracked") for k in state)  # both are skipped
    converted = str(tmp_path / "inception.safetensors")
    run("eval.py", "convert-inception", pth, converted)
    ours = [metrics.load_inception(pth), metrics.load_inception(converted)]
    g = torch.Generator().manual_seed(1)
    for shape in [(2, 3, 299, 299), (2, 3, 64, 80)]:
        img = torch.rand(shape, generator=g) * 2 - 1
        with torch.no_grad():
            want = reference((img + 1) / 2)[0][:, :, 0, 0]  # (B, 2048)
        assert want.std() > 0.1  # not a degenerate network
        for net in ours:
            got = metrics.inception_features(net, img)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    bad = {k: v for k, v in state.items() if k != "Mixed_7c.branch_pool.bn.running_var"}
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError) as e:
        metrics.load_inception(str(tmp_path / "bad.pth"))
    one_line_naming(e, "bad.pth", "missing key 'Mixed_7c.branch_pool.bn.running_var'")


# ----------------------------------------------------------------------------- DINOv2 and SigLIP-2 features
class HFEncoder(torch.nn.Module):
    """transformers' Dinov2Model behind rae.load_dinov2's contract: enc(pixel_values) = last_hidden_state."""
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        self.seen = pixel_values
        return self.model(pixel_values=pixel_values).last_hidden_state


def tiny_dinov2():
    from transformers import Dinov2Config, Dinov2Model
    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                       image_size=224, patch_size=14)
    return HFEncoder(Dinov2Model(cfg).eval())


def test_dinov2_features_follow_dgm_eval():
    """dgm-eval: PIL image -> Resize((224, 224), BICUBIC) (torchvision on a PIL image is PIL's resize) -> ToTensor ->
    ImageNet Normalize -> CLS of the final normed output. Ours from the same 8-bit images as [-1, 1] tensors, down
    (256) and up (64): on noise, the worst case, < 1% of the resized pixels differ, by at most 2 levels (rounding
    ties in PIL's fixed-point arithmetic, carried through its second pass); the features agree closely."""
    enc = tiny_dinov2()
    rng = np.random.default_rng(0)
    mean, std = np.array(metrics.IMAGENET_MEAN), np.array(metrics.IMAGENET_STD)
    for side in (256, 64):
        arrays = [rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for _ in range(2)]
        resized = np.stack([np.asarray(Image.fromarray(a).resize((224, 224), Image.BICUBIC)) for a in arrays])
        pixels = torch.from_numpy(((resized / 255 - mean) / std).transpose(0, 3, 1, 2)).float()
        with torch.no_grad():
            want = enc(pixels)[:, 0]
        img = torch.from_numpy(np.stack(arrays).transpose(0, 3, 1, 2)).float() / 127.5 - 1
        got = metrics.dinov2_features(enc, img)
        levels = ((enc.seen - pixels) * torch.tensor(std).view(1, 3, 1, 1).float() * 255).abs()  # 8-bit levels
        assert levels.max() < 2.001 and (levels > 0.5).float().mean() < 0.01, (side, levels.max())
        torch.testing.assert_close(got, want, rtol=0, atol=2e-2 * float(want.abs().max()))


def test_siglip_embedding_from_latents_equals_from_pixels(toy_encoder):
    """Pooling a generated latent needs no decoder: for z = RAE.encode(img) (LayerNorm, then per-channel stats), the
    pooled embedding of z equals that of the image, though the LayerNorm itself cannot be inverted."""
    g = torch.Generator().manual_seed(0)
    channels = toy_encoder.vision.pos_embed.shape[1]
    stats = {"mean": torch.randn(channels, generator=g) * 0.1, "var": torch.rand(channels, generator=g) + 0.5}
    ae = rae.RAE(toy_encoder.vision, None, stats)
    img = toy.ToyWorld(size=112, split="test")
    img = torch.stack([img[i]["img"] for i in range(3)])
    want = metrics.siglip_embeddings(toy_encoder, img)
    torch.testing.assert_close(metrics.siglip_latent_embeddings(ae, ae.encode(img)), want, rtol=1e-4, atol=1e-4)
    # images of another size are resized to the tower's: the same embedding, near enough
    big = torch.nn.functional.interpolate(img, size=(224, 224), mode="bilinear")
    assert torch.nn.functional.cosine_similarity(metrics.siglip_embeddings(toy_encoder, big), want).min() > 0.95
    prompts = ["a red circle on the left", "a blue square at the top", 'the word "cat" in green']
    torch.testing.assert_close(metrics.siglip_scores(toy_encoder, want, prompts),
                               toy_encoder.score(img, prompts).diagonal(), rtol=1e-5, atol=1e-5)


def test_toy_fd_floor_is_below_a_degraded_set(toy_encoder):
    """96 real toy images (the demo's count) against held-out real ones: near the real-vs-real floor. The same images
    in grey (a generator that lost colour): well above it."""
    world = toy.ToyWorld(size=112, seed=1, split="test")
    real = torch.stack([world[i]["img"] for i in range(1000, 1096)])  # not the sets toy_fd draws
    same = metrics.toy_fd(real, toy_encoder)
    grey = metrics.toy_fd(real.mean(1, keepdim=True).expand_as(real), toy_encoder)
    assert same["n"] == grey["n"] == 96 and same["floor"] == grey["floor"] > 0
    assert same["fd"] < 2 * same["floor"] < grey["fd"], (same, grey)


# ----------------------------------------------------------------------------- the command line
def write_folder(folder, images):
    os.makedirs(folder, exist_ok=True)
    for k, im in enumerate(images):
        Image.fromarray(im).save(os.path.join(folder, f"{k:04d}.png"))
    return str(folder)


def toy_folders(tmp_path, n=4, size=64):
    """Two folders of toy images (train split and test split) and one of noise, size x size PNGs."""
    to_uint8 = lambda img: ((img + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
    worlds = [toy.ToyWorld(size=size, split=s) for s in ("train", "test")]
    a, b = ([to_uint8(w[i]["img"]) for i in range(n)] for w in worlds)
    noise = list(np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8))
    return [write_folder(tmp_path / name, ims) for name, ims in (("a", a), ("b", b), ("noise", noise))]


def test_cli_fid_one_process_and_torchrun(fid_inception, tmp_path):
    """FD of a folder against itself is 0 (grid.png, sample.py's overview, is no sample); against the statistics of
    another folder, written by --save-ref-stats, > 0. torchrun (2 processes, gloo, unequal shares of 3 images)
    writes the statistics of the same features as one process."""
    _, pth = fid_inception
    a, _, noise = toy_folders(tmp_path, n=3)
    Image.fromarray(np.zeros((64, 128, 3), np.uint8)).save(os.path.join(a, "grid.png"))
    common = ["--metrics", "fid", "--inception", pth, "--batch", "2"]
    cli = lambda *args: metrics.main(metrics.parse_args([*args, *common]))
    stats = [str(tmp_path / f"{n}.safetensors") for n in ("one", "two")]
    cli("--ref", noise, "--save-ref-stats", stats[0], "--workers", "2")  # two DataLoader workers split the folder
    r = torchrun("eval.py", "--ref", noise, "--save-ref-stats", stats[1], *common, "--workers", "0")
    assert r.stdout.count("wrote") == 1  # rank 0 writes and prints
    for x, y in zip(*(metrics.load_stats(path, "inception") for path in stats)):  # the same, up to float rounding
        torch.testing.assert_close(x, y, rtol=0, atol=1e-4 * float(x.abs().max()))
    self_fd = cli("--gen", a, "--ref", a, "--workers", "0", "--out", str(tmp_path / "self.json"))
    fd = cli("--gen", a, "--ref", stats[1], "--workers", "0")
    assert self_fd == json.load(open(tmp_path / "self.json")) and self_fd["n_gen"] == fd["n_gen"] == 3
    assert abs(self_fd["fid"]) < 1e-9 * fd["fid"], (self_fd, fd)


def test_extract_reads_folders_and_tar_shards_in_file_order(tmp_path, capsys):
    """The same images as a folder (with an unreadable file among them) and as two WebDataset tar shards (no captions
    needed): the same features, in file order, with every split over DataLoader workers; the bad file is skipped and
    counted."""
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (40, 40 + 8 * (k % 2), 3), dtype=np.uint8) for k in range(5)]
    folder = write_folder(tmp_path / "images", arrays)
    (tmp_path / "images" / "0002_broken.png").write_bytes(b"not a png")
    for shard, ks in (("s-0.tar", (0, 1, 2)), ("s-1.tar", (3, 4))):
        with tarfile.open(tmp_path / shard, "w") as tar:
            for k in ks:
                tar.add(os.path.join(folder, f"{k:04d}.png"), arcname=f"{k:04d}.png")
    mean_colour = {"rgb": lambda img: img.mean((2, 3))}
    want = torch.tensor(np.stack([a[:, (a.shape[1] - 40) // 2:][:, :40].mean((0, 1)) for a in arrays])) / 127.5 - 1
    for spec in (folder, str(tmp_path / "s-{0..1}.tar")):
        for workers in (0, 2):
            got = metrics.extract(spec, mean_colour, size=40, batch=2, workers=workers)["rgb"]
            torch.testing.assert_close(got, want.float(), rtol=0, atol=1e-5)
    assert "0002_broken.png" in capsys.readouterr().err
    # size 0: as stored, center-cropped to the shorter side (40 for all of these); mixed sides need --size
    torch.testing.assert_close(metrics.extract(folder, mean_colour, batch=2)["rgb"], want.float(), rtol=0, atol=1e-5)
    mixed = write_folder(tmp_path / "mixed", [arrays[0], rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)])
    with pytest.raises(ValueError, match="--size"):
        metrics.extract(mixed, mean_colour, batch=2)


def read_folder(folder):
    return torch.stack([metrics.data.load_image(open(os.path.join(folder, f), "rb").read(), 64)
                        for f in sorted(os.listdir(folder))])


def test_cli_dinov2_prdc_siglip_and_toy_geneval(tmp_path, toy_encoder):
    """In one process with a tiny random plain DINOv2 snapshot (HF format; FD-DINOv2 uses DINOv2 without registers):
    FD-DINOv2, precision / recall and density / coverage in DINOv2 space equal the functions on the extracted
    features; the SigLIP score and the toy GenEval of real toy images with their own captions."""
    from test_encoders import hf_dinov2
    with torch.no_grad():
        hf_dinov2(str(tmp_path / "dino"), registers=False)
    enc = rae.load_dinov2(str(tmp_path / "dino"))
    a, b, noise = toy_folders(tmp_path, n=8)
    args = ["--dinov2", str(tmp_path / "dino"), "--pr-features", "dinov2", "--workers", "0", "--batch", "4"]
    got = metrics.main(metrics.parse_args(["--gen", a, "--ref", b, "--metrics", "fd_dinov2,pr,dc", *args]))
    feats = [metrics.dinov2_features(enc, read_folder(d)) for d in (a, b)]
    want = metrics.frechet_distance(*metrics.feature_stats(feats[0]), *metrics.feature_stats(feats[1]))
    assert abs(got["fd_dinov2"] - want) < 1e-6 * want
    assert (got["precision"], got["recall"]) == metrics.precision_recall(feats[1], feats[0])
    assert (got["density"], got["coverage"]) == metrics.density_coverage(feats[1], feats[0])
    prompts = [p for p, _ in toy.toy_prompts(8)]  # the captions of folder b (the test split)
    (tmp_path / "prompts.txt").write_text("\n".join(prompts))
    got = metrics.main(metrics.parse_args(["--gen", b, "--metrics", "siglip,toy_geneval", "--siglip", "toy",
                                           "--prompts", str(tmp_path / "prompts.txt"), "--workers", "0"]))
    img = read_folder(b)
    assert abs(got["siglip"] - float(toy_encoder.score(torch.nn.functional.interpolate(
        img, size=(112, 112), mode="bilinear", antialias=True), prompts).diagonal().mean())) < 1e-4
    assert got["toy_color_acc"] > 0.8 and got["toy_shape_acc"] > 0.5, got


@pytest.mark.parametrize("argv, needle", [
    (["--gen", "g", "--metrics", "fid,nope"], "unknown ['nope']"),
    (["--ref", "r"], "give --gen DIR"),
    (["--gen", "g", "--metrics", "fid"], "need --ref"),
    (["--ref", "r", "--save-ref-stats", "s.safetensors", "--metrics", "siglip"], "name them in --metrics"),
    (["--gen", "g", "--metrics", "siglip"], "need the prompts")])
def test_cli_misuse_is_one_line_before_any_work(argv, needle):
    """Flags that cannot work stop at once, in one line that says what to give."""
    with pytest.raises(SystemExit) as e:
        metrics.main(metrics.parse_args(argv))
    assert "\n" not in str(e.value) and needle in str(e.value), str(e.value)
