"""The bases CLSP is added to beside SimCLR, and the "-aug" controls: CLSP on MoCo-v2 (clsp.py --base moco)
and the controls whose third positive is another augmented view of the real image (--positive view). The
MoCo loss, the key encoder's momentum and the queue against references written from the recipe, the
compiled step against the eager one, resuming, the MoCo augmentation, the six methods end to end, and the
refusals. (One whole MoCo step against the recipe, written out in float64, is in test_training.py with
the other training steps.)

The recipe (He et al. 2020, Chen et al. 2020b; the authors' train_moco_clsp.py after solo-learn's
MoCo-v2+): a query encoder q = normalize(head(backbone(.))) and a key encoder k, its moving average
k <- m k + (1 - m) q after every step, m rising from 0.99 to 0.999 on a half cosine; one queue of
normalised keys per view; L = (InfoNCE(q1, k2, queue_2) + InfoNCE(q2, k1, queue_1)) / 2 with the key as
the positive and the queue as negatives, temperature 0.2; then the batch's keys enter the queues; the
CLSP term lam * mean ||q1 - q3||^2 on the queries, lam 0.5.
"""

import copy
import math
import os

import pytest
import torch
import torch.nn as nn
import torchvision
from conftest import make_image_folder, run

import clsp


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py: tiny tensors, one thread


def unit(n, d, seed):
    z = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return z / z.norm(dim=1, keepdim=True)


def info_nce_loop(q, k, queue, tau):
    """InfoNCE written out with Python floats: -log exp(q.k / tau) / (exp(q.k / tau) + sum_j exp(q.n_j / tau))."""
    total = 0.0
    for i in range(q.shape[0]):
        dot = lambda a, b: sum(float(x) * float(y) for x, y in zip(a, b))
        pos = math.exp(dot(q[i], k[i]) / tau)
        neg = sum(math.exp(dot(q[i], n) / tau) for n in queue)
        total += -math.log(pos / (pos + neg))
    return total / q.shape[0]


# ------------------------------------------------------------------------------------------------
# The loss, the key encoder's momentum, the queue
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tau", [0.2, 0.5])
def test_info_nce_matches_the_formula(tau):
    q, k, queue = unit(5, 8, 0), unit(5, 8, 1), unit(7, 8, 2)
    assert abs(clsp.info_nce(q, k, queue, tau).item() - info_nce_loop(q, k, queue, tau)) < 1e-10
    assert clsp.info_nce(q, q, queue, tau).item() < info_nce_loop(q, k, queue, tau)   # its own key: easier


def test_moco_loss_pairs_each_view_with_the_other_views_queue():
    """(InfoNCE(q1, k2, queue_2) + InfoNCE(q2, k1, queue_1)) / 2: catches a queue used with the wrong view,
    a key of the same view as the positive, or a one-sided loss."""
    q1, q2, k1, k2 = (unit(4, 6, seed) for seed in range(4))
    queue = torch.stack([unit(5, 6, 10), unit(5, 6, 11)])
    want = (info_nce_loop(q1, k2, queue[1], 0.2) + info_nce_loop(q2, k1, queue[0], 0.2)) / 2
    assert abs(clsp.moco_loss(q1, q2, k1, k2, queue, 0.2).item() - want) < 1e-10
    swapped = (info_nce_loop(q1, k2, queue[0], 0.2) + info_nce_loop(q2, k1, queue[1], 0.2)) / 2
    assert abs(want - swapped) > 1e-3                       # so the test can tell the queues apart


def test_moco_loss_equals_lightlys():
    """lightly's NTXentLoss with a memory bank is its MoCo loss (one-sided): the same number, given the
    same bank. Runs where lightly is installed (it is not a dependency of this project)."""
    lightly_loss = pytest.importorskip("lightly.loss")
    q, k, queue = unit(6, 16, 0).float(), unit(6, 16, 1).float(), unit(32, 16, 2).float()
    loss_fn = lightly_loss.NTXentLoss(temperature=0.2, memory_bank_size=(32, 16))
    loss_fn.memory_bank.bank = queue.clone()                # the bank's rows: the queue's keys
    theirs = loss_fn(q, k).item()
    assert clsp.info_nce(q, k, queue, 0.2).item() == pytest.approx(theirs, rel=1e-5)


def test_key_momentum_rises_from_099_to_0999_on_a_half_cosine():
    s = dict(key_momentum=0.99, key_momentum_end=0.999)
    m = [clsp.key_momentum_at(step, s, 100) for step in range(101)]
    assert m[0] == pytest.approx(0.99) and m[50] == pytest.approx(0.9945) and m[100] == pytest.approx(0.999)
    assert m[25] == pytest.approx(0.999 - 0.009 * (math.cos(math.pi / 4) + 1) / 2)
    assert all(a < b for a, b in zip(m, m[1:]))             # rising all the way


def test_the_queue_is_a_ring_of_the_latest_keys():
    """Q = 6 keys a view, B = 2 a step: what goes in lands at the pointer, the oldest falls out."""
    queue = clsp.Queue(2, 6, 3, "cpu")
    assert torch.allclose(queue.keys.norm(dim=2), torch.ones(2, 6))   # random unit vectors at first
    batches = [(torch.full((2, 3), float(b)), torch.full((2, 3), -float(b))) for b in range(1, 5)]
    for b, (k1, k2) in enumerate(batches[:3], start=1):
        queue.push(k1, k2)
        assert queue.ptr == (2 * b) % 6
    assert queue.keys[0, :, 0].tolist() == [1, 1, 2, 2, 3, 3]
    assert queue.keys[1, :, 0].tolist() == [-1, -1, -2, -2, -3, -3]
    queue.push(*batches[3])                                 # the fourth batch replaces the first
    assert queue.keys[0, :, 0].tolist() == [4, 4, 2, 2, 3, 3] and queue.ptr == 2


def test_compiled_moco_step_equals_eager(traced_compile):
    """make_moco_step with compiled=True (query and key encoders and the augmentation compiled, traced here
    as inductor would trace them, in one graph each) gives the eager losses, weights and queues."""
    mean, std = torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2, 0.25, 0.3])
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    x3 = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))

    def run(compiled):
        torch.manual_seed(0)
        net = nn.Sequential(clsp.make_backbone(), clsp.make_head())
        key_net = copy.deepcopy(net).requires_grad_(False)
        queue = clsp.Queue(2, 8, 256, "cpu")
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        s = dict(lam=0.5, tau=0.2, positive="synthetic", lr=0.05 * 1024 / 4, batch_size=4, epochs=1,
                 warmup_epochs=0, key_momentum=0.99, key_momentum_end=0.999)
        step = clsp.make_moco_step(net, key_net, queue, opt, torch.amp.GradScaler("cpu", enabled=False),
                                   s, mean, std, 2, None, compiled)
        torch.manual_seed(3)
        losses = [[v.item() for v in step(torch.arange(4), x, x3, i).values()] for i in range(2)]
        return losses, net.state_dict(), key_net.state_dict(), queue.keys.clone()

    (l_e, w_e, k_e, q_e), (l_c, w_c, k_c, q_c) = run(False), run(True)
    assert sum(l_c, []) == pytest.approx(sum(l_e, []), rel=1e-4)
    for a, b in [(w_e, w_c), (k_e, k_c)]:
        for key in a:
            torch.testing.assert_close(b[key].float(), a[key].float(), rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(q_c, q_e, rtol=1e-3, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# The augmentation of the authors' MoCo pipeline: saturation 0.2, solarisation with p 0.2
# ------------------------------------------------------------------------------------------------

def test_moco_augmentation_draws_and_solarises_like_torchvision():
    p = clsp.sample_augment_params(20_000, 32, 32, "cpu", torch.Generator().manual_seed(0), **clsp.AUGMENT["moco"])
    saturation = p["factors"][:, 2]
    assert 0.8 <= saturation.min() < 0.801 and 1.199 < saturation.max() <= 1.2   # ColorJitter(saturation=0.2)
    assert abs(p["solarize"].double().mean() - 0.2) < 0.015
    assert "solarize" not in clsp.sample_augment_params(8, 32, 32, "cpu")         # SimCLR: no solarisation
    # Given the same parameters, our batched solarisation is torchvision's, image by image.
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (32, 3, 16, 16), dtype=torch.uint8, generator=g)
    p = clsp.sample_augment_params(32, 16, 16, "cpu", g, saturation=0.2, solarize=0.5)
    mean, std = [0.0] * 3, [1.0] * 3
    without = clsp.apply_augment(x, {k: v for k, v in p.items() if k != "solarize"}, 16, mean, std)
    ours = clsp.apply_augment(x, p, 16, mean, std)
    import torchvision.transforms.functional as TF
    for b in range(32):
        want = TF.solarize(without[b], 128 / 255) if p["solarize"][b] else without[b]
        assert torch.equal(ours[b], want), b
    assert p["solarize"].any() and (~p["solarize"]).any()
    assert torchvision.transforms.RandomSolarize(128 / 255).threshold == 128 / 255


# ------------------------------------------------------------------------------------------------
# As a user runs it
# ------------------------------------------------------------------------------------------------

SMALL = ["--preset", "tiny", "--image-size", "8", "--batch-size", "8", "--knn-every", "0"]


def test_moco_resume_continues_bit_for_bit(tmp_path, monkeypatch):
    """Key encoder, queues and their pointer, SGD's momentum and the momentum schedule all continue."""
    make_image_folder(str(tmp_path / "data"), n_train=4, n_test=1, size=8)
    flags = [*SMALL, "--base", "moco", "--lam", "0", "--queue", "16", "--epochs", "3", "--dataset", "folder",
             "--data-dir", "data", "--device", "cpu"]
    monkeypatch.chdir(tmp_path)
    clsp.main(flags + ["--out", "runs/whole.pt"])
    with pytest.raises(SystemExit, match="interrupted"):
        clsp.main(flags + ["--out", "runs/parts.pt", "--stop-after-epoch", "1"])
    clsp.main(["--resume", "--out", "runs/parts.pt", "--device", "cpu"])
    a, b = (torch.load(f"runs/{f}.pt", weights_only=True) for f in ("whole", "parts"))
    assert a["method"] == b["method"] == "MoCo" and a["queue_ptr"] == b["queue_ptr"]
    assert torch.equal(a["queue"], b["queue"])
    for part in ("backbone", "head", "key"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    for k, st in a["optimizer"]["state"].items():
        assert torch.equal(st["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"])


def test_the_six_methods_train_and_evaluate_in_the_tiny_chain(chain, tmp_path):
    """The README's commands for the paper's six methods, on the tiny chain (whose CLSP-SimCLR run is
    there already; one epoch each for the other five), and evaluate.py's table of them all, in the
    paper's order, with the positives side by side."""
    root = chain.copy_upto("evaluate.py", tmp_path)         # runs/clsp.pt (CLSP-SimCLR), runs/eval.json
    runs = {"clsp_lam0": ["--lam", "0"], "simclr_aug": ["--positive", "view"],
            "moco": ["--base", "moco", "--lam", "0"], "moco_aug": ["--base", "moco", "--positive", "view"],
            "clsp_moco": ["--base", "moco"]}
    for name, flags in runs.items():
        run("clsp.py", "--preset", "tiny", "--epochs", "1", "--knn-every", "0", *flags, "--out", f"runs/{name}.pt",
            cwd=root)
    for name in runs:                                       # the SimCLR baseline (clsp_lam0) judges the rest
        proc = run("evaluate.py", "--preset", "tiny", "--probe-epochs", "2", "--checkpoint", f"runs/{name}.pt",
                   "--out", f"runs/eval_{name}.json", cwd=root)
    table = proc.stdout[proc.stdout.index("all results in"):]
    methods = [line.split(" | ")[2] for line in table.splitlines() if line.startswith("| eval")]
    assert methods == ["SimCLR", "SimCLR-aug", "CLSP-SimCLR", "MoCo", "MoCo-aug", "CLSP-MoCo"], table
    assert "its nearest training image" in proc.stdout and "judge: runs/clsp_lam0.pt" in proc.stdout
    ckpt = torch.load(os.path.join(root, "runs", "moco_aug.pt"), weights_only=True)
    assert ckpt["method"] == "MoCo-aug" and ckpt["synthetic"] is None and ckpt["settings"]["lam"] == 0.5
    assert ckpt["queue"].shape == (2, 64, 256)                               # two queues of 64 keys
    assert set(ckpt["key"]) == {"0." + k for k in ckpt["backbone"]} | {"1." + k for k in ckpt["head"]}


BAD = [
    (["--base", "byol"], "unknown --base 'byol'"),
    (["--positive", "neighbour"], "unknown --positive"),
    (["--base", "moco", "--queue", "4"], "--queue 4 must be a multiple of --batch-size 8"),
    (["--base", "moco", "--queue", "20"], "pass --queue 16"),
    (["--base", "moco", "--key-momentum", "1.0"], "--key-momentum must be in [0, 1)"),
    (["--base", "moco", "--key-momentum-end", "-0.1"], "--key-momentum-end must be in [0, 1)"),
    (["--positive", "view", "--synthetic", "runs/synthetic.pt"], "reads no synthetic set; drop --synthetic"),
]


@pytest.mark.parametrize("flags,message", BAD, ids=[m for _, m in BAD])
def test_bad_moco_and_control_input_is_one_sentence(tmp_path, monkeypatch, flags, message):
    make_image_folder(str(tmp_path / "data"), n_train=4, n_test=1, size=8)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        clsp.main([*SMALL, "--dataset", "folder", "--data-dir", "data", "--device", "cpu", *flags])
    assert str(e.value).startswith("error: ") and message in str(e.value), str(e.value)
    assert not os.path.exists("runs")
