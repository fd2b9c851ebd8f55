"""Tests of stage 3 (clsp.py): the losses against loops, the augmentation against torchvision, the
candidate pick, and the script run as a user runs it (tiny chain, lam = 0, resume, the errors).

The command-line tests other than the chain use a smaller folder (16 images at 8x8, batch 8) so that a
ResNet-18 on two CPU cores finishes in seconds; the chain test runs the real `--preset tiny`.
"""

import math
import os
import re
import shutil

import pytest
import torch
import torchvision
import torchvision.transforms.functional as TF
from conftest import make_image_folder, run
from torchvision.transforms import InterpolationMode

import clsp
import common


def unit(n, d, seed):
    z = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return z / z.norm(dim=1, keepdim=True)


# ------------------------------------------------------------------------------------------------
# The losses
# ------------------------------------------------------------------------------------------------

def nt_xent_loop(z1, z2, tau):
    """NT-Xent written out over all pairs, in float64 with Python scalars."""
    z = [list(map(float, r)) for r in torch.cat([z1, z2])]
    n, B = len(z), len(z1)
    total = 0.0
    for a in range(n):
        sims = [sum(p * q for p, q in zip(z[a], z[b])) / tau for b in range(n)]
        pos = (a + B) % n
        denom = sum(math.exp(sims[b]) for b in range(n) if b != a)
        total += -math.log(math.exp(sims[pos]) / denom)
    return total / n


@pytest.mark.parametrize("tau", [0.2, 0.5])
def test_nt_xent_matches_double_loop(tau):
    z1, z2 = unit(5, 7, 0), unit(5, 7, 1)
    assert abs(clsp.nt_xent(z1, z2, tau).item() - nt_xent_loop(z1, z2, tau)) < 1e-10
    # With z2 = z1 the positive is the most similar of all: the loss is below that of random pairs.
    assert clsp.nt_xent(z1, z1, tau).item() < nt_xent_loop(z1, z2, tau)


def test_nt_xent_is_safe_on_embeddings_that_are_not_normalised():
    """Its similarities are cosines for any caller: scaling the embeddings changes nothing."""
    z1, z2 = unit(5, 7, 0), unit(5, 7, 1)
    assert abs(clsp.nt_xent(3 * z1, 0.5 * z2, 0.2).item() - nt_xent_loop(z1, z2, 0.2)) < 1e-10


def test_clsp_term_and_total():
    z1, z2, z3 = unit(6, 4, 2), unit(6, 4, 3), unit(6, 4, 4)
    loop = sum(sum((float(a) - float(b)) ** 2 for a, b in zip(z1[i], z3[i])) for i in range(6)) / 6
    assert abs(clsp.clsp_loss(z1, z3).item() - loop) < 1e-12
    cos = sum(sum(float(a) * float(b) for a, b in zip(z1[i], z3[i])) for i in range(6)) / 6
    assert abs(clsp.clsp_loss(z1, z3).item() - (2 - 2 * cos)) < 1e-12      # on the unit sphere
    assert clsp.clsp_loss(z1, z1).item() == 0
    simclr = nt_xent_loop(z1, z2, 0.2)
    L, l_s, l_c = clsp.total_loss(z1, z2, None, 0.0, 0.2)                  # lam = 0: SimCLR, no z3
    assert abs(L.item() - simclr) < 1e-10 and l_c.item() == 0
    L, _, _ = clsp.total_loss(z1, z2, z3, 0.0, 0.2)                        # z3 is never a negative
    assert abs(L.item() - simclr) < 1e-10
    L, _, _ = clsp.total_loss(z1, z2, z3, 0.7, 0.2)
    assert abs(L.item() - (simclr + 0.7 * loop)) < 1e-10


def test_backbone_and_head():
    net = clsp.make_backbone()
    c = net.conv1
    assert (c.kernel_size, c.stride, c.padding, c.bias) == ((3, 3), (1, 1), (1, 1), None)
    assert isinstance(net.maxpool, torch.nn.Identity) and isinstance(net.fc, torch.nn.Identity)
    # torchvision's ResNet-18 has 11,689,512 parameters: minus fc (512*1000 + 1000), minus the 7x7 stem
    # (3*64*49), plus the 3x3 one (3*64*9).
    assert sum(p.numel() for p in net.parameters()) == 11_689_512 - 513_000 - 9408 + 1728
    assert net.eval()(torch.zeros(2, 3, 32, 32)).shape == (2, 512)
    head = clsp.make_head()
    assert [type(m) for m in head] == [torch.nn.Linear, torch.nn.ReLU, torch.nn.Linear]
    assert (head[0].in_features, head[0].out_features, head[2].out_features) == (512, 4096, 256)


# ------------------------------------------------------------------------------------------------
# The augmentation
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def params():
    """20,000 draws of our parameters for a 32x32 image, seeded."""
    return clsp.sample_augment_params(20_000, 32, 32, "cpu", torch.Generator().manual_seed(0))


def crop_stats(boxes):
    h, w = boxes[:, 2].double(), boxes[:, 3].double()
    area, aspect = h * w / (32 * 32), w / h
    q = torch.tensor([0.005, 0.995], dtype=torch.float64)
    (area_lo, area_hi), (aspect_lo, aspect_hi) = area.quantile(q), aspect.quantile(q)
    return dict(area_mean=area.mean(), area_lo=area_lo, area_hi=area_hi, area_max=area.max(),
                aspect_mean=aspect.mean(), aspect_lo=aspect_lo, aspect_hi=aspect_hi,
                whole=((h == 32) & (w == 32)).double().mean())


def test_crop_statistics_match_torchvision(params):
    torch.manual_seed(0)
    img = torch.zeros(3, 32, 32)
    tv = torch.tensor([torchvision.transforms.RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3])
                       for _ in range(10_000)])
    ours, theirs = crop_stats(params["box"]), crop_stats(tv)
    # Standard errors: ~0.003 (area mean), ~0.002 (aspect mean); a wrong scale or ratio bound moves
    # these, or the 0.5% / 99.5% quantiles (which sit near the bounds 0.08, 3/4 and 4/3), by 0.03 or more.
    # (Not the extremes: rounding to whole pixels can give w/h = 13/9 > 4/3 now and then, in both.)
    tol = dict(area_mean=0.012, area_lo=0.006, area_hi=0.006, area_max=1e-9, aspect_mean=0.01,
               aspect_lo=0.02, aspect_hi=0.02, whole=0.01)
    for k, t in tol.items():
        assert abs(ours[k] - theirs[k]) <= t, (k, float(ours[k]), float(theirs[k]))
    i, j, h, w = params["box"].unbind(1)
    assert (i >= 0).all() and (j >= 0).all() and (i + h <= 32).all() and (j + w <= 32).all()
    assert ((i == i.round()) & (h == h.round())).all()                        # whole pixels, like torchvision
    free = h < 32                                                             # top offset uniform over 0..32-h
    assert abs((i[free] / (32 - h[free])).mean() - 0.5) < 0.01


def test_flip_jitter_grayscale_rates_and_ranges(params):
    n = params["flip"].numel()
    for key, p in [("flip", 0.5), ("jitter", 0.8), ("gray", 0.2)]:            # std. errors <= 0.0035
        assert abs(params[key].double().mean() - p) < 0.015, key
    jitter = torchvision.transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)             # torchvision's own ranges
    for col, (lo, hi) in enumerate([jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue]):
        f = params["factors"][:, col]
        assert lo <= f.min() < lo + 0.01 * (hi - lo) and hi - 0.01 * (hi - lo) < f.max() <= hi, col
        assert abs(f.mean() - (lo + hi) / 2) < 0.01 * (hi - lo) * 2, col
    order = params["order"]
    assert (order.sort(dim=1).values == torch.arange(4)).all()                 # each row a permutation
    for pos in range(4):                                                        # each op equally often in each place
        counts = torch.bincount(order[:, pos], minlength=4).double() / n
        assert (counts - 0.25).abs().max() < 0.015


def reference_augment(x, p, size, mean, std):
    """The same parameters applied one image at a time with torchvision.transforms.functional."""
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    out = []
    for b in range(x.shape[0]):
        y = x[b].float() / 255
        i, j, h, w = (int(v) for v in p["box"][b])
        y = TF.resized_crop(y, i, j, h, w, [size, size], InterpolationMode.BILINEAR, antialias=True)
        if p["flip"][b]:
            y = TF.hflip(y)
        if p["jitter"][b]:
            for o in p["order"][b].tolist():
                y = ops[o](y, float(p["factors"][b, o]))
        if p["gray"][b]:
            y = TF.rgb_to_grayscale(y, num_output_channels=3)
        out.append(TF.normalize(y, mean, std))
    return torch.stack(out)


def test_augment_equals_torchvision_given_the_same_parameters():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8, generator=g)
    p = clsp.sample_augment_params(64, 16, 16, "cpu", g)
    assert p["flip"].any() and (~p["flip"]).any() and p["gray"].any() and (p["jitter"] & ~p["gray"]).any()
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    ours = clsp.apply_augment(x, p, 16, mean, std)
    assert ours.shape == (64, 3, 16, 16) and ours.dtype == torch.float32
    assert (ours - reference_augment(x, p, 16, mean, std)).abs().max() < 1e-5


def test_augment_compiles_as_one_graph_with_the_same_output():
    # clsp.py --compile compiles apply_augment. fullgraph=True fails on any graph break (a host sync,
    # a data-dependent shape); the aot_eager backend traces it as inductor would, without the C++
    # compile, so this stays fast on a CPU and the traced function must equal the eager one exactly.
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 256, (48, 3, 16, 16), dtype=torch.uint8, generator=g)
    p = clsp.sample_augment_params(48, 16, 16, "cpu", g)
    mean, std = torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2, 0.25, 0.3])
    traced = torch.compile(clsp.apply_augment, fullgraph=True, backend="aot_eager")
    assert torch.equal(traced(x, p, 16, mean, std), clsp.apply_augment(x, p, 16, mean, std))


def test_augment_draws_independent_parameters_per_image():
    x = torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8).expand(64, 3, 16, 16)
    out = clsp.augment(x, 16, [0.5] * 3, [0.25] * 3, torch.Generator().manual_seed(0))
    assert torch.unique(out.flatten(1), dim=0).shape[0] == 64                 # 64 copies, 64 different views
    again = clsp.augment(x, 16, [0.5] * 3, [0.25] * 3, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)                                             # and a seed fixes them
    p = clsp.sample_augment_params(256, 32, 32, "cpu", torch.Generator().manual_seed(0))
    assert torch.unique(p["box"], dim=0).shape[0] > 200
    assert torch.unique(p["factors"][:, 0]).numel() == 256


def test_candidate_pick_is_uniform_over_K():
    N, K = 10, 8
    synthetic = torch.zeros(N, K, 3, 1, 1, dtype=torch.uint8)
    synthetic[:, :, 0] = torch.arange(K).view(1, K, 1, 1)                      # channel 0 says k
    synthetic[:, :, 1] = torch.arange(N).view(N, 1, 1, 1)                      # channel 1 says i
    g = torch.Generator().manual_seed(0)
    idx = torch.tensor([3, 3, 7, 0, 3])
    picks = torch.stack([clsp.pick_candidates(synthetic, idx, g) for _ in range(4000)])   # [4000, 5, 3, 1, 1]
    assert (picks[:, :, 1, 0, 0] == idx).all()                                 # always one of image i's own
    k = picks[:, :, 0, 0, 0].long()
    for col in range(5):                                                       # each draw of each image afresh
        counts = torch.bincount(k[:, col], minlength=K).double()
        expected = 4000 / K
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert (counts > 0).all() and chi2 < 35, (col, counts)                 # df 7: P(chi2 > 35) ~ 1e-5
    assert (k[:, 0] != k[:, 1]).any()                                          # the two draws of image 3 differ


# ------------------------------------------------------------------------------------------------
# The script, as a user runs it
# ------------------------------------------------------------------------------------------------

def test_tiny_preset_after_generate(chain):
    root = chain.upto("clsp.py")                                               # ddpm -> generate -> clsp
    ckpt = torch.load(os.path.join(root, "runs", "clsp.pt"), weights_only=True)
    syn = torch.load(os.path.join(root, "runs", "synthetic.pt"), weights_only=True)
    assert ckpt["finished"] and ckpt["epoch"] == ckpt["settings"]["epochs"] == 2
    assert ckpt["settings"]["lam"] == 1.0 and ckpt["data"] == syn["data"]
    assert ckpt["synthetic"]["ddpm_step"] == syn["ddpm"]["step"]
    assert ckpt["synthetic"]["settings"]["K"] == syn["images"].shape[1]
    backbone, head = clsp.make_backbone(), clsp.make_head()
    backbone.load_state_dict(ckpt["backbone"])
    head.load_state_dict(ckpt["head"])
    assert len(ckpt["norm"]["mean"]) == 3 and all(0 < v < 1 for v in ckpt["norm"]["std"])
    h = backbone.eval()(torch.zeros(2, 3, 16, 16))
    assert torch.isfinite(h).all()


def make_fake_synthetic(root, data_dir, image_size, K=3, num_anchors=None):
    """root/runs/synthetic.pt in generate.py's format (data_dir relative to root, as a user in root would
    have run it) whose candidates are the anchors shifted by k pixels."""
    path = os.path.join(root, "runs", "synthetic.pt")
    x, y, classes = common.load_dataset("folder", os.path.join(root, data_dir), "train", image_size)
    n = x.shape[0] if num_anchors is None else num_anchors
    images = torch.stack([x[:n].roll(k, dims=-1) for k in range(K)], dim=1)
    common.atomic_save(dict(images=images, anchor_index=torch.arange(n),
                          settings=dict(w=0.1, S=5, eta=0.1, K=K, num_anchors=n, seed=0, batch_size=32,
                                        dataset="folder", data_dir=data_dir, image_size=image_size),
                          data=common.data_info("folder", x, y, classes),
                          ddpm=dict(path="runs/ddpm.pt", step=20, settings=dict(data_dir=data_dir)),
                          summary={}), path)


SMALL = ["--preset", "tiny", "--image-size", "8", "--batch-size", "8"]   # 16 images: 2 steps per epoch


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A directory with a 4 x 4-image folder at 8x8, a fake synthetic set, and one finished lam = 1 run."""
    root = str(tmp_path_factory.mktemp("clsp_small"))
    make_image_folder(os.path.join(root, "data"), n_train=4, n_test=2, size=8)
    make_fake_synthetic(root, "data", 8)
    proc = run("clsp.py", *SMALL, cwd=root)      # dataset and data dir come from the synthetic set
    return root, proc


def copy_dir(root, dest):
    shutil.copytree(root, dest, dirs_exist_ok=True)
    return str(dest)


def main_in(root, monkeypatch, *args):
    """clsp.main(argv) in this process (no second torch import): for runs that stop early or that
    only continue what a subprocess run started. Returns the error sentence, or None on success."""
    monkeypatch.chdir(root)
    try:
        clsp.main([*map(str, args), "--device", "cpu"])
    except SystemExit as e:
        assert e.code not in (0, None)
        return str(e.code)
    return None


def files(root):
    d = os.path.join(root, "runs")
    return {f: open(os.path.join(d, f), "rb").read() for f in sorted(os.listdir(d))}


def test_small_run_prints_both_losses_and_writes_the_artifact(small):
    """One line at the end of each of the 2 epochs, `epoch N/2 | ...`, with both losses and the kNN monitor.
    A slow machine also prints time-driven lines within an epoch (`epoch 1.50/2 | ...`, common.Progress.due):
    those are not counted, so the test does not depend on the machine's speed."""
    root, proc = small
    lines = [l for l in proc.stdout.splitlines() if re.match(r"epoch \d+/2 \|", l)]
    assert [l.split(" |")[0] for l in lines] == ["epoch 1/2", "epoch 2/2"], proc.stdout
    assert all("L_simclr" in l and "L_clsp" in l and "kNN" in l for l in lines)
    assert all(re.match(r"epoch \d+(\.\d\d)?/2 \|", l) for l in proc.stdout.splitlines() if l.startswith("epoch "))
    ckpt = torch.load(os.path.join(root, "runs", "clsp.pt"), weights_only=True)
    assert ckpt["finished"] and ckpt["epoch"] == 2 and ckpt["data"]["image_size"] == 8
    assert ckpt["settings"]["dataset"] == "folder" and ckpt["settings"]["data_dir"] == "data"   # from synthetic.pt
    assert ckpt["synthetic"]["path"] == "runs/synthetic.pt" and ckpt["synthetic"]["settings"]["K"] == 3


def test_lam0_needs_no_ddpm_or_synthetic(tmp_path):
    make_image_folder(str(tmp_path / "data"), n_train=4, n_test=2, size=8)
    proc = run("clsp.py", *SMALL, "--lam", "0", "--dataset", "folder", "--data-dir", "data", cwd=tmp_path)
    assert "SimCLR: 16 training images" in proc.stdout and "L_clsp" not in proc.stdout
    assert sorted(os.listdir(tmp_path / "runs")) == ["clsp.pt"]
    ckpt = torch.load(tmp_path / "runs" / "clsp.pt", weights_only=True)
    assert ckpt["synthetic"] is None and ckpt["finished"] and ckpt["settings"]["lam"] == 0.0


def test_fp16_trains_with_loss_scaling_and_resumes_it_exactly(tmp_path):
    # fp16 (what --precision auto picks on a T4 or V100) trains through a GradScaler, whose state (the
    # scale, cut at each overflow) is checkpointed: a resumed run ends with the same scale and weights.
    # Four images, one step per epoch, lam 0, no kNN: fp16 convolutions are very slow on a CPU.
    make_image_folder(str(tmp_path / "data"), n_train=1, n_test=1, size=8)
    fp16 = [*SMALL, "--batch-size", "4", "--precision", "fp16", "--lam", "0", "--dataset", "folder",
            "--data-dir", "data", "--knn-every", "0"]
    proc = run("clsp.py", *fp16, "--out", "runs/whole.pt", cwd=tmp_path)
    assert "autocast torch.float16" in proc.stdout
    run("clsp.py", *fp16, "--out", "runs/parts.pt", "--stop-after-epoch", "1", cwd=tmp_path, check=False)
    run("clsp.py", *fp16, "--out", "runs/parts.pt", "--resume", cwd=tmp_path)
    whole, parts = (torch.load(tmp_path / "runs" / f, weights_only=True) for f in ("whole.pt", "parts.pt"))
    assert whole["scaler"]["scale"] > 0 and whole["scaler"] == parts["scaler"]
    assert all(torch.equal(whole["backbone"][k], parts["backbone"][k]) for k in whole["backbone"])


def test_resume_after_an_interruption_ends_where_an_uninterrupted_run_ends(small, tmp_path, monkeypatch):
    root = copy_dir(small[0], tmp_path)
    msg = main_in(root, monkeypatch, *SMALL, "--out", "runs/b.pt", "--stop-after-epoch", "1")
    assert "interrupted" in msg and "--resume" in msg
    half = torch.load(os.path.join(root, "runs", "b.pt"), weights_only=True)
    assert half["epoch"] == 1 and not half["finished"]
    msg = main_in(root, monkeypatch, "--resume", "--out", "runs/b.pt", "--lr", "0.1")
    assert "own settings" in msg                                               # a resume keeps its settings
    assert main_in(root, monkeypatch, "--resume", "--out", "runs/b.pt") is None
    a = torch.load(os.path.join(root, "runs", "clsp.pt"), weights_only=True)   # the uninterrupted run
    b = torch.load(os.path.join(root, "runs", "b.pt"), weights_only=True)
    assert b["finished"] and b["epoch"] == 2 and b["settings"] == a["settings"]
    for part in ("backbone", "head"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    for k, st in a["optimizer"]["state"].items():                              # SGD's momentum buffers too
        assert torch.equal(st["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"])


@pytest.mark.parametrize("case", ["num_anchors", "dataset", "image_size", "missing", "not_an_artifact"])
def test_a_synthetic_set_that_does_not_fit_is_refused(small, tmp_path, monkeypatch, case):
    root = copy_dir(small[0], tmp_path)
    syn_path = os.path.join(root, "runs", "synthetic.pt")
    args = list(SMALL)
    if case == "num_anchors":
        make_fake_synthetic(root, "data", 8, num_anchors=8)                   # made with --num-anchors 8
    elif case == "dataset":
        syn = torch.load(syn_path, weights_only=True)
        syn["data"]["dataset"] = "cifar100"
        common.atomic_save(syn, syn_path)
        args += ["--dataset", "folder", "--data-dir", "data"]
    elif case == "image_size":
        args = ["--preset", "tiny", "--image-size", "16", "--batch-size", "8"]
    elif case == "missing":
        os.remove(syn_path)
    else:
        with open(syn_path, "wb") as f:
            f.write(b"half a file")
    before = files(root)
    msg = main_in(root, monkeypatch, *args)
    expected = {"num_anchors": "--num-anchors", "dataset": "cifar100", "image_size": "image size 8",
                "missing": "does not exist", "not_an_artifact": "not a readable artifact"}[case]
    assert expected in msg and "generate.py" in msg, msg
    assert files(root) == before                                               # nothing written or damaged


def test_a_nan_loss_stops_and_keeps_the_last_good_checkpoint(small, tmp_path, monkeypatch):
    root = copy_dir(small[0], tmp_path)
    before = files(root)
    # A real divergence: with lr 1e30 the very first epoch is non-finite, so nothing is saved.
    msg = main_in(root, monkeypatch, *SMALL, "--lr", "1e30", "--out", "runs/diverged.pt")
    assert "loss became" in msg and "--lr" in msg
    assert files(root) == before                     # no checkpoint, no temp files left
    # A loss that turns NaN in epoch 2 (of 2 steps each): epoch 1's checkpoint is kept as it was.
    real_loss, calls = clsp.total_loss, []

    def nan_from_step_3(*args, **kwargs):
        calls.append(1)
        out = real_loss(*args, **kwargs)
        return tuple(o * float("nan") for o in out) if len(calls) > 2 else out
    monkeypatch.setattr(clsp, "total_loss", nan_from_step_3)
    msg = main_in(root, monkeypatch, *SMALL, "--epochs", "2", "--out", "runs/nan.pt")
    assert "loss became" in msg
    kept = torch.load(os.path.join(root, "runs", "nan.pt"), weights_only=True)
    assert kept["epoch"] == 1 and not kept["finished"]
    assert all(torch.isfinite(v).all() for v in kept["backbone"].values() if v.is_floating_point())
    after = files(root)
    del after["nan.pt"]
    assert after == before


def test_a_new_run_never_overwrites_a_checkpoint(small, tmp_path, monkeypatch):
    root = copy_dir(small[0], tmp_path)
    before = files(root)
    msg = main_in(root, monkeypatch, *SMALL)
    assert "already exists" in msg and "--resume" in msg
    assert files(root) == before



def test_compiled_train_step_equals_eager(traced_compile):
    """clsp.make_train_step with compiled=True (the network and the augmentation compiled, as clsp.py
    runs on a GPU; traced here as inductor would be) gives the eager losses and weights from the same seed."""
    mean, std = torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2, 0.25, 0.3])
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    s = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))

    def run(compiled):
        torch.manual_seed(0)
        net = torch.nn.Sequential(clsp.make_backbone(), clsp.make_head())
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        settings = dict(lam=1.0, tau=0.2, lr=0.05 * 1024 / 4, batch_size=4, epochs=1, warmup_epochs=0)
        step = clsp.make_train_step(net, opt, torch.amp.GradScaler("cpu", enabled=False), settings, mean, std, 2,
                                    None, compiled)
        torch.manual_seed(3)
        losses = [[v.item() for v in step(torch.arange(4), x, s, i).values()] for i in range(2)]
        return losses, net.state_dict()

    (l_eager, w_eager), (l_comp, w_comp) = run(False), run(True)
    assert sum(l_comp, []) == pytest.approx(sum(l_eager, []), rel=1e-4)
    for k in w_eager:
        torch.testing.assert_close(w_comp[k].float(), w_eager[k].float(), rtol=1e-3, atol=1e-5)
