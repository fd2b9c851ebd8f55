"""Tests of STL-10 at 64 pixels, as the authors run it: its binary files read as torchvision reads them, its
recipe as every stage's defaults, the sampler's --interp-layers against the authors' definition, the
"mid" ResNet stem, the candidates kept in host memory, and the whole tiny chain on a tiny STL-10.

No test can download STL-10 (2.6 GB): conftest.make_stl10 writes a tiny one in its own binary layout.
torchvision's STL10 checks the md5 sums of the real files, which a tiny copy cannot pass; the project
reads the .bin files itself (common._load_stl10) and uses torchvision only to download them. The reader
is checked against torchvision's own on the tiny files, with only its md5 check switched off.
"""

import os

import numpy as np
import pytest
import torch

import clsp
import common
import ddpm
import generate
from conftest import COLOURS, make_stl10, run

T = 1000


# ------------------------------------------------------------------------------------------------
# The data
# ------------------------------------------------------------------------------------------------

def test_stl10_reader_equals_torchvisions(tiny_stl10, monkeypatch):
    """Every split, read at 96 px, holds torchvision's images and labels (unlabeled: -1), in its order."""
    import torchvision
    root, written = tiny_stl10
    monkeypatch.setattr(torchvision.datasets.STL10, "_check_integrity", lambda self: True)   # tiny files: no md5
    for split, tv_split in (("pretrain", "unlabeled"), ("train", "train"), ("test", "test")):
        x, y, classes = common.load_dataset("stl10", root, split, 96)
        tv = torchvision.datasets.STL10(root, split=tv_split)
        assert torch.equal(x, torch.from_numpy(tv.data)), split
        assert torch.equal(y, torch.from_numpy(np.asarray(tv.labels, dtype=np.int64))), split
        assert torch.equal(x, torch.from_numpy(written[tv_split][0])), split   # rows by rows, as written
        assert classes == tv.classes and len(classes) == 10
    assert (common.load_dataset("stl10", root, "pretrain", 96)[1] == -1).all()


def test_stl10_is_resized_as_torchvisions_resize_of_a_pil_image(tiny_stl10):
    """96 -> 64 px as the authors' transforms.Resize(64) on each PIL image: within one grey level (PIL
    filters in fixed point: about one value in six is one level off, none more)."""
    from PIL import Image
    import torchvision
    root, written = tiny_stl10
    x, _, _ = common.load_dataset("stl10", root, "train", 64)
    resize = torchvision.transforms.Resize(64)
    ref = np.stack([np.asarray(resize(Image.fromarray(img.transpose(1, 2, 0)))) for img in written["train"][0]])
    diff = np.abs(x.permute(0, 2, 3, 1).numpy().astype(int) - ref.astype(int))
    assert x.shape == (len(ref), 3, 64, 64) and diff.max() <= 1 and diff.mean() < 0.25, (diff.max(), diff.mean())


def test_a_damaged_stl10_file_is_one_sentence_and_nothing_is_written(tmp_path):
    root, _ = make_stl10(str(tmp_path / "data"), n_unlabeled=4, n_train=1, n_test=1)
    with open(os.path.join(root, "stl10_binary", "unlabeled_X.bin"), "r+b") as f:
        f.truncate(3 * 96 * 96 * 3 + 100)           # a download cut short
    proc = run("ddpm.py", "--preset", "tiny", "--dataset", "stl10", "--data-dir", root, cwd=tmp_path, check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "unlabeled_X.bin" in proc.stderr, proc.stderr
    assert "download STL-10 anew" in proc.stderr and not os.path.exists(tmp_path / "runs" / "ddpm.pt")


def test_attention_at_no_level_of_the_unet_is_one_sentence(tmp_path, tiny_stl10):
    root, _ = tiny_stl10
    proc = run("ddpm.py", "--preset", "tiny", "--dataset", "stl10", "--data-dir", root, "--attn-res", "8,7",
               cwd=tmp_path, check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "7 px is no level of this UNet" in proc.stderr and "16,8" in proc.stderr
    assert not os.path.exists(tmp_path / "runs")


# ------------------------------------------------------------------------------------------------
# The recipe: a data set's defaults sit beside the presets; a preset and a flag win over them
# ------------------------------------------------------------------------------------------------

def settings_of(module, argv, dataset_known=True):
    args = module.parse_args(argv)
    s, explicit = common.resolve_settings(args, module.DEFAULTS, module.PRESETS)
    if module is clsp:
        clsp.base_settings(s, explicit, args.preset)
        clsp.data_set_settings(s, explicit, args.preset)
    else:
        s["dataset"] = s["dataset"] or "stl10"   # generate.py: the DDPM's data set
        common.dataset_settings(s, explicit, args.preset, module.DATASETS, module.PRESETS)
    return s


def test_stl10_recipe_is_every_stages_default():
    d = settings_of(ddpm, ["--dataset", "stl10"])
    assert (d["image_size"], d["ch"], d["ch_mult"], d["attn_res"], d["num_res_blocks"], d["dropout"], d["lr"]) == \
        (64, 64, [1, 2, 3, 4], [32, 16], 2, 0.15, 5e-5)                      # standard: the authors' layout, ch 64
    d = settings_of(ddpm, ["--dataset", "stl10", "--preset", "paper"])
    assert (d["ch"], d["batch_size"], d["steps"], d["attn_res"]) == (192, 80, 1_250_000, [32, 16])  # theirs
    assert settings_of(ddpm, ["--dataset", "cifar10"])["image_size"] == 32   # CIFAR unchanged
    g = settings_of(generate, ["--dataset", "stl10"])
    assert (g["S"], g["eta"], g["w"], g["K"], g["interp_layers"]) == (200, 0.1, 0.1, 8, 4)
    assert settings_of(generate, ["--dataset", "stl10", "--preset", "tiny"])["S"] == 5   # the preset wins
    assert settings_of(generate, ["--dataset", "stl10", "--interp-layers", "2"])["interp_layers"] == 2   # a flag
    c = settings_of(clsp, ["--dataset", "stl10"])
    assert (c["image_size"], c["stem"], c["batch_size"], c["lr"], c["lam"]) == (64, "mid", 1024, 0.5, 1.0)
    m = settings_of(clsp, ["--dataset", "stl10", "--base", "moco"])
    assert (m["lam"], m["lr"], m["batch_size"]) == (0.4, 0.3, 1024)
    assert settings_of(clsp, ["--base", "moco"])["lam"] == 0.5               # MoCo on CIFAR unchanged
    assert settings_of(clsp, ["--dataset", "stl10", "--base", "moco", "--lam", "0.2"])["lam"] == 0.2
    assert settings_of(clsp, ["--dataset", "stl10", "--preset", "paper"])["epochs"] == 1000
    assert settings_of(clsp, ["--dataset", "stl10", "--preset", "quick"])["epochs"] == 15   # its own quick
    assert settings_of(clsp, ["--dataset", "stl10", "--preset", "tiny"])["image_size"] == 16


# ------------------------------------------------------------------------------------------------
# The sampler: --interp-layers
# ------------------------------------------------------------------------------------------------

def random_unet(seed=0, dtype=torch.float32):
    """A random 16x16 UNet of 3 levels x 2 blocks (8 skips: input conv, 6 blocks, 2 down-samplings), its
    weights redrawn at PyTorch's usual scale (ddpm.py starts every residual branch near 0)."""
    torch.manual_seed(seed)
    unet = ddpm.UNet(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, attn_res=(8,), dropout=0.0, image_size=16)
    for m in unet.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            m.reset_parameters()
    return unet.to(dtype).eval()


def todays_interpolated_eps(unet, x_t, xa_t, t, w, layers=1):
    """The bottleneck-only sampler's eps, written out: what --interp-layers 1 must give, bit for bit."""
    h, skips, temb = unet.encode(x_t, t)
    h_anchor, _, _ = unet.encode(xa_t, t)
    h = (w * h + (1 - w) * h_anchor).to(h.dtype)
    return unet.decode(h, skips, temb).float()


def run_sampler(unet, x_a, w, layers, eps_fn=generate.interpolated_eps, S=3, eta=0.1):
    g = torch.Generator().manual_seed(1)
    x_T = torch.randn(x_a.shape, generator=g, dtype=x_a.dtype)
    return generate.interpolated_ddim_sample(unet, x_T, x_a, ddpm.make_schedule(), w, S, eta, g,
                                             torch.Generator().manual_seed(2), eps_fn, layers)


def test_interp_layers_1_is_todays_sampler_bit_for_bit():
    unet, x_a = random_unet(), torch.randn(2, 3, 16, 16).tanh()
    assert torch.equal(run_sampler(unet, x_a, 0.1, 1), run_sampler(unet, x_a, 0.1, 1, todays_interpolated_eps))


@pytest.mark.parametrize("layers", [2, 4])
def test_interp_layers_equal_the_authors_definition_on_the_unet(layers):
    """The authors' UNet.forward_with_anchor(x, t, x_anchor, weight, num_layers): h = w h + (1 - w) h_anchor,
    then for i in 1..num_layers-1: hs[-i] = w hs[-i] + (1 - w) hs_anchor[-i], then the decoder; written here
    on the UNet's encode and decode, step by step as they write it."""
    unet = random_unet()
    x, xa = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
    t, w = torch.tensor([500, 30]), 0.1
    with torch.no_grad():
        h, hs, temb = unet.encode(x, t)
        h_anchor, hs_anchor, _ = unet.encode(xa, t)
        h = w * h + (1 - w) * h_anchor
        for i in range(1, layers):
            hs[-i] = w * hs[-i] + (1 - w) * hs_anchor[-i]
        expected = unet.decode(h, hs, temb)
        got = generate.interpolated_eps(unet, x, xa, t, w, layers)
        bottleneck_only = generate.interpolated_eps(unet, x, xa, t, w, 1)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert (got - bottleneck_only).abs().max() > 1e-3                       # the skips were mixed: not a no-op


class ClosedFormUNet:
    """encode/decode with a known formula, so the whole sampler can be recomputed in float64 numpy: five
    skips, each its own function of the input, each read by the decoder with its own weight, so a skip
    taken from the wrong image (or left unmixed) changes the result."""
    C = [0.3, -0.2, 0.5, 0.7, -0.4]

    def encode(self, x, t):
        return torch.tanh(x) + t.view(-1, 1, 1, 1) / T, [x, 0.5 * x, torch.sin(x), x * x / 4, torch.tanh(2 * x)], t

    def decode(self, h, skips, temb):
        return 0.8 * h - sum(c * s for c, s in zip(self.C, skips)) * (1 + temb.view(-1, 1, 1, 1) / T)


def test_interp_layers_4_sampler_matches_float64_formula():
    """The whole sampler at --interp-layers 4 in float64 numpy, from the authors' definition: the bottleneck
    and the 3 deepest skips (here skips 2, 3, 4 of 0..4) interpolated between the sample and its anchor."""
    S, shape, w, eta = 4, (2, 3, 4, 4), 0.1, 0.1
    x_a = torch.randn(shape, generator=torch.Generator().manual_seed(10)).tanh()
    g = torch.Generator().manual_seed(1)
    x_T = torch.randn(shape, generator=g)
    out = generate.interpolated_ddim_sample(ClosedFormUNet(), x_T, x_a, ddpm.make_schedule(), w, S, eta, g,
                                            torch.Generator().manual_seed(2), layers=4)

    g, g_a = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    x = torch.randn(shape, generator=g).double().numpy()
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, T, dtype=np.float64))
    skips = lambda v: [v, 0.5 * v, np.sin(v), v * v / 4, np.tanh(2 * v)]
    xa = x_a.double().numpy()
    for t, t_next in zip([999, 749, 499, 249], [749, 499, 249, -1]):
        a = abar[t]
        xa_t = np.sqrt(a) * xa + np.sqrt(1 - a) * torch.randn(shape, generator=g_a).double().numpy()
        h = w * (np.tanh(x) + t / T) + (1 - w) * (np.tanh(xa_t) + t / T)
        mixed = [s if j < 2 else w * s + (1 - w) * sa for j, (s, sa) in enumerate(zip(skips(x), skips(xa_t)))]
        eps = 0.8 * h - sum(c * s for c, s in zip(ClosedFormUNet.C, mixed)) * (1 + t / T)
        x0 = (x - np.sqrt(1 - a) * eps) / np.sqrt(a)
        if t_next < 0:
            x = x0
            break
        an = abar[t_next]
        sigma = eta * np.sqrt((1 - an) / (1 - a)) * np.sqrt(1 - a / an)
        x = np.sqrt(an) * x0 + np.sqrt(1 - an - sigma ** 2) * eps + sigma * torch.randn(shape, generator=g).double().numpy()
    np.testing.assert_allclose(out.double().numpy(), x, rtol=1e-4, atol=1e-4 * np.abs(x).max())


@pytest.mark.parametrize("layers", [1, 2, 4, 9])
def test_w1_is_plain_ddim_at_any_layer_count(layers):
    unet = random_unet()
    x_a = torch.randn(2, 3, 16, 16).tanh()
    g = torch.Generator().manual_seed(1)
    plain = ddpm.ddim_sample(unet, torch.randn(x_a.shape, generator=g), ddpm.make_schedule(), S=3, eta=0.1,
                             generator=g)
    assert torch.equal(run_sampler(unet, x_a, 1.0, layers), plain)


def test_interp_layers_beyond_the_ddpms_skips_is_one_sentence(tmp_path, tiny_stl10):
    root, _ = tiny_stl10
    run("ddpm.py", "--preset", "tiny", "--dataset", "stl10", "--data-dir", root, "--steps", "2", cwd=tmp_path)
    proc = run("generate.py", "--preset", "tiny", "--interp-layers", "6", cwd=tmp_path, check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "--interp-layers must be between 1" in proc.stderr and "and 5" in proc.stderr   # tiny UNet: 4 skips
    assert not os.path.exists(tmp_path / "runs" / "synthetic.pt")


# ------------------------------------------------------------------------------------------------
# The ResNet's "mid" stem
# ------------------------------------------------------------------------------------------------

def feature_map_sizes(net, size):
    sizes = {}
    for name in ("conv1", "maxpool", "layer1", "layer2", "layer3", "layer4"):
        getattr(net, name).register_forward_hook(lambda m, i, o, name=name: sizes.update({name: tuple(o.shape[1:])}))
    with torch.no_grad():
        net.eval()(torch.zeros(1, 3, size, size))
    return sizes


def test_mid_stem_gives_the_authors_feature_map_sizes_at_64_px():
    """The authors' get_resnet(size='mid'): torchvision's ResNet-18 with conv1 a 3x3 stride-1 conv, the
    max-pool kept; built here as they build it."""
    import torchvision
    theirs = torchvision.models.resnet18()
    theirs.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    ours = clsp.make_backbone("mid")
    expected = {"conv1": (64, 64, 64), "maxpool": (64, 32, 32), "layer1": (64, 32, 32), "layer2": (128, 16, 16),
                "layer3": (256, 8, 8), "layer4": (512, 4, 4)}
    assert feature_map_sizes(ours, 64) == feature_map_sizes(theirs, 64) == expected
    assert ours(torch.zeros(2, 3, 64, 64)).shape == (2, 512)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters()) - 512 * 1000 - 1000
    cifar = feature_map_sizes(clsp.make_backbone("cifar"), 64)               # the CIFAR stem: 4x the pixels
    assert cifar["layer1"] == (64, 64, 64) and cifar["layer4"] == (512, 8, 8)


# ------------------------------------------------------------------------------------------------
# Candidates in host memory: the same step as candidates on the device
# ------------------------------------------------------------------------------------------------

def test_host_candidates_pick_what_device_candidates_pick():
    images = torch.randint(0, 256, (20, 3, 3, 8, 8), dtype=torch.uint8)
    idx = torch.tensor([3, 0, 19, 3, 7])
    torch.manual_seed(5)
    on_device = clsp.pick_candidates(images, idx)
    after = torch.rand(1)
    torch.manual_seed(5)
    host = clsp.HostCandidates(images, torch.device("cpu"))
    assert torch.equal(clsp.pick_candidates(host, idx), on_device)
    assert torch.equal(torch.rand(1), after)                                 # the same random stream after it


def test_host_candidates_give_the_same_training_run(tmp_path, tiny_stl10):
    """clsp.py with --candidates-on host trains the very network the in-memory candidates train."""
    root, _ = tiny_stl10
    run("ddpm.py", "--preset", "tiny", "--dataset", "stl10", "--data-dir", root, "--steps", "2", cwd=tmp_path)
    run("generate.py", "--preset", "tiny", "--num-anchors", "64", cwd=tmp_path)
    runs = {}
    for where in ("auto", "host"):
        out = f"runs/clsp_{where}.pt"
        proc = run("clsp.py", "--preset", "tiny", "--candidates-on", where, "--knn-every", "0", "--out", out,
                   cwd=tmp_path)
        assert "candidates" in proc.stdout.splitlines()[0] and (where != "host" or "host memory" in proc.stdout)
        runs[where] = torch.load(tmp_path / out, weights_only=True)
    for part in ("backbone", "head"):
        for k, v in runs["auto"][part].items():
            assert torch.equal(v, runs["host"][part][k]), (part, k)


# ------------------------------------------------------------------------------------------------
# The whole tiny chain on STL-10, every method
# ------------------------------------------------------------------------------------------------

def test_the_tiny_chain_runs_on_stl10_with_every_method(tmp_path, tiny_stl10, tiny_data):
    root, written = tiny_stl10
    run("ddpm.py", "--preset", "tiny", "--dataset", "stl10", "--data-dir", root, cwd=tmp_path)
    ckpt = torch.load(tmp_path / "runs" / "ddpm.pt", weights_only=True)
    assert ckpt["data"]["dataset"] == "stl10" and ckpt["data"]["num_train"] == len(written["unlabeled"][0])
    out = run("generate.py", "--preset", "tiny", cwd=tmp_path).stdout
    assert "4 interpolated layers" in out                                   # STL-10's own value survives tiny
    syn = torch.load(tmp_path / "runs" / "synthetic.pt", weights_only=True)
    assert syn["images"].shape == (64, 2, 3, 16, 16) and syn["settings"]["interp_layers"] == 4
    methods = {"CLSP-SimCLR": [], "SimCLR": ["--lam", "0"], "SimCLR-aug": ["--positive", "view"],
               "CLSP-MoCo": ["--base", "moco"], "MoCo": ["--base", "moco", "--lam", "0"],
               "MoCo-aug": ["--base", "moco", "--positive", "view"], "CLSP-NNCLR": ["--base", "nnclr"],
               "NNCLR": ["--base", "nnclr", "--lam", "0"], "NNCLR-aug": ["--base", "nnclr", "--positive", "view"]}
    for method, flags in methods.items():
        name = method.lower().replace("-", "_")
        proc = run("clsp.py", "--preset", "tiny", *flags, "--out", f"runs/clsp_{name}.pt", cwd=tmp_path)
        assert proc.stdout.count("kNN ") == 2                                 # the monitor, both epochs
        c = torch.load(tmp_path / "runs" / f"clsp_{name}.pt", weights_only=True)
        assert c["method"] == method and c["data"]["dataset"] == "stl10" and c["settings"]["stem"] == "mid"
    # Another preset than the candidates' (standard: 64 px on STL-10) keeps the image size they were made at.
    proc = run("clsp.py", "--epochs", "1", "--batch-size", "32", "--knn-every", "0", "--out", "runs/clsp_std.pt",
               cwd=tmp_path)
    assert "stl10 at 16px" in proc.stdout
    for method in ("CLSP-SimCLR", "CLSP-MoCo", "NNCLR"):
        name = method.lower().replace("-", "_")
        run("evaluate.py", "--preset", "tiny", "--checkpoint", f"runs/clsp_{name}.pt", "--out",
            f"runs/eval_{name}.json", cwd=tmp_path)
        import json
        r = json.load(open(tmp_path / "runs" / f"eval_{name}.json"))
        assert r["method"] == method and not r["transfer"] and r["data"]["dataset"] == "stl10"
        assert r["data"]["num_train"] == len(written["train"][0]) and r["data"]["num_test"] == len(written["test"][0])
        assert r["synthetic_diagnostics"] is None and "no labels" in r["note"]
    # Transfer: the STL-10 backbone on another data set, its images resized to the backbone's size (CIFAR
    # cannot be downloaded here: the image folder of 32 px images stands in for it).
    proc = run("evaluate.py", "--preset", "tiny", "--checkpoint", "runs/clsp_clsp_simclr.pt", "--dataset", "folder",
               "--data-dir", tiny_data, "--out", "runs/eval_transfer.json", cwd=tmp_path)
    r = json.load(open(tmp_path / "runs" / "eval_transfer.json"))
    assert r["transfer"] and r["data"]["dataset"] == "folder" and r["data"]["image_size"] == 16
    assert "stl10 -> folder (transfer)" in proc.stdout


# ------------------------------------------------------------------------------------------------
# Stage 2's memory: the candidate set is held once, made or resumed (STL-10's is 9.8 GB)
# ------------------------------------------------------------------------------------------------

MEMORY_CHECK = r'''
import os, resource, sys, torch
sys.path.insert(0, sys.argv[1])
import common, generate
N, K, S, parts = 4000, 8, 64, sys.argv[2]            # a set of 4000 x 8 x 3 x 64 x 64 bytes: 393 MB

class Stub:                                          # generate.Sampler's interface, without a UNet
    rows, abar, unet = 4000, torch.zeros(1000), None
    def candidates(self, anchors, K, w, b):
        return torch.full((anchors.shape[0], K, 3, S, S), b % 251, dtype=torch.uint8)

x = torch.zeros(N, 3, S, S, dtype=torch.uint8)
s = dict(K=K, S=1, w=0.1, image_size=S, batch_size=4000 // 8)
manifest = dict(settings=s)
if sys.argv[3] == "resume":                          # half the batches finished by an earlier run
    os.makedirs(parts)
    common.atomic_save(manifest, os.path.join(parts, "manifest.pt"))
    for b in range(0, 8, 2):
        common.atomic_save({"images": Stub().candidates(x[:500], K, 0.1, b)}, common.part_path(parts, b))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
with common.StopFlag() as stop:
    images, _ = generate.make_all(Stub(), x, s, parts, manifest, False, stop)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
assert all((images[b * 500:(b + 1) * 500] == b % 251).all() for b in range(8))
print("GROWTH", (peak - base) / images.numel())
'''


@pytest.mark.parametrize("how", ["fresh", "resume"])
def test_stage_2_holds_the_candidate_set_once(tmp_path, how):
    """generate.make_all fills the set in place: the process grows by about the set's size, made batch by
    batch or read back from an interrupted run's parts (keeping every batch and joining them at the end,
    as it once did, grows by twice the set)."""
    import subprocess
    import sys
    from conftest import REPO
    proc = subprocess.run([sys.executable, "-c", MEMORY_CHECK, REPO, str(tmp_path / "parts"), how],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    growth = float(proc.stdout.split("GROWTH")[1])
    assert growth < 1.5, growth                                   # in units of the set's size


def test_a_missing_stl10_label_file_is_fetched_and_a_failed_fetch_is_one_sentence(tmp_path, monkeypatch):
    """Any file of a split missing (a partial copy) sends it to the download; its failure is one sentence."""
    import torchvision
    root, _ = make_stl10(str(tmp_path / "data"), n_unlabeled=4, n_train=1, n_test=1)
    os.remove(os.path.join(root, "stl10_binary", "train_y.bin"))
    asked = []

    def no_network(*args, **kwargs):
        asked.append(kwargs)
        raise OSError("no network")
    monkeypatch.setattr(torchvision.datasets, "STL10", no_network)
    with pytest.raises(SystemExit) as e:
        common.load_dataset("stl10", root, "train", 16)
    assert asked and asked[0]["download"] and "could not find or download stl10" in str(e.value)
    assert "\n" not in str(e.value)
    common.load_dataset("stl10", root, "pretrain", 16)            # the unlabeled split is whole: no download
    assert len(asked) == 1


def test_an_interrupted_candidate_set_of_before_interp_layers_still_resumes(tmp_path):
    """A parts folder whose manifest predates a setting (here interp_layers) resumes when the setting
    has its default value, and is refused when it has another."""
    parts = str(tmp_path / "parts")
    old = dict(settings=dict(K=2, S=5, w=0.1), data={}, ddpm={})
    os.makedirs(parts)
    common.atomic_save(old, os.path.join(parts, "manifest.pt"))
    common.atomic_save({"images": torch.ones(3, 2, 3, 4, 4, dtype=torch.uint8)}, common.part_path(parts, 0))
    kept = {}
    new = dict(settings=dict(K=2, S=5, w=0.1, interp_layers=1), data={}, ddpm={})
    assert common.resume_parts(parts, new, 2, kept.__setitem__, generate.DEFAULTS) == {0} and 0 in kept
    four = dict(settings=dict(K=2, S=5, w=0.1, interp_layers=4), data={}, ddpm={})
    with pytest.raises(SystemExit, match="interp_layers"):
        common.resume_parts(parts, four, 2, kept.__setitem__, generate.DEFAULTS)
