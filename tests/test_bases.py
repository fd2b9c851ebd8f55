"""The bases CLSP is added to beside SimCLR, and the "-aug" controls: CLSP on MoCo-v2 (clsp.py --base moco),
NNCLR, the paper's foil (--base nnclr), and the controls whose third positive is another augmented view of
the real image (--positive view). For each base its loss and its queue (MoCo's keys, NNCLR's support set and
neighbour search, NNCLR's heads) against references written from the recipe, the compiled step against the
eager one, resuming, its augmentation, its methods end to end, and the refusals. (One whole step of each
against the recipe, written out in float64, and NNCLR's LARS, are in test_training.py with the other
training steps.)

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
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from conftest import make_image_folder, run

import clsp


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py: tiny tensors, one thread


def unit(n, d, seed, dtype=torch.float64):
    z = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return z / z.norm(dim=1, keepdim=True)


def no_scaler():
    return torch.amp.GradScaler("cpu", enabled=False)      # fp32 on the CPU: the scaler does nothing


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


def whole_and_resumed(flags):
    """The checkpoints of clsp.main(flags) run through, and of the same run stopped after epoch 1 and
    resumed (in the current directory)."""
    clsp.main(flags + ["--out", "runs/whole.pt"])
    with pytest.raises(SystemExit, match="interrupted"):
        clsp.main(flags + ["--out", "runs/parts.pt", "--stop-after-epoch", "1"])
    clsp.main(["--resume", "--out", "runs/parts.pt", "--device", "cpu"])
    return (torch.load(f"runs/{f}.pt", weights_only=True) for f in ("whole", "parts"))


def test_moco_resume_continues_bit_for_bit(tmp_path, monkeypatch):
    """Key encoder, queues and their pointer, SGD's momentum and the momentum schedule all continue."""
    make_image_folder(str(tmp_path / "data"), n_train=4, n_test=1, size=8)
    flags = [*SMALL, "--base", "moco", "--lam", "0", "--queue", "16", "--epochs", "3", "--dataset", "folder",
             "--data-dir", "data", "--device", "cpu"]
    monkeypatch.chdir(tmp_path)
    a, b = whole_and_resumed(flags)
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


# ================================================================================================
# NNCLR (clsp.py --base nnclr): its loss, support set, neighbour search and heads; compiled; as a user runs it
# ================================================================================================

# ------------------------------------------------------------------------------------------------
# The loss
# ------------------------------------------------------------------------------------------------

def nnclr_side_loop(nn_, p, tau):
    """solo-learn's nnclr_loss_func written out with Python floats: both sides normalised, the B-way
    cross-entropy of row i of NN . p^T / tau with column i its positive, mean over the rows."""
    rows = lambda t: [[float(v) for v in r] for r in t]
    norm = lambda r: [v / math.sqrt(sum(u * u for u in r)) for v in r]
    a, b = [norm(r) for r in rows(nn_)], [norm(r) for r in rows(p)]
    total = 0.0
    for i in range(len(a)):
        logits = [sum(x * y for x, y in zip(a[i], b[j])) / tau for j in range(len(b))]
        top = max(logits)
        total += -(logits[i] - top - math.log(sum(math.exp(l - top) for l in logits)))
    return total / len(a)


@pytest.mark.parametrize("tau", [0.2, 0.5])
def test_nnclr_loss_matches_the_formula(tau):
    """(CE(NN(z1) p2^T / tau) + CE(NN(z2) p1^T / tau)) / 2, every argument normalised inside (the
    predictions are not unit vectors). Catches: a side paired with its own view's prediction, a one-sided
    loss, the predictions not normalised, a 2B-way (SimCLR-like) softmax instead of B-way, a wrong tau."""
    g = torch.Generator().manual_seed(0)
    nn1, nn2 = unit(5, 8, 1), unit(5, 8, 2)
    p1, p2 = (torch.randn(5, 8, generator=g, dtype=torch.float64) * s for s in (3.0, 0.2))   # not unit
    want = (nnclr_side_loop(nn1, p2, tau) + nnclr_side_loop(nn2, p1, tau)) / 2
    got = clsp.nnclr_loss(nn1, nn2, p1, p2, tau)
    assert got.dim() == 0 and abs(got.item() - want) < 1e-10
    assert abs(clsp.nnclr_loss(2 * nn1, 0.5 * nn2, p1, p2, tau).item() - want) < 1e-10   # NNs normalised too
    wrong_pairing = (nnclr_side_loop(nn1, p1, tau) + nnclr_side_loop(nn2, p2, tau)) / 2
    assert abs(want - wrong_pairing) > 1e-3                 # so the test can tell the pairings apart
    # The gradient reaches the predictions (the neighbours are constants in the step).
    p1g, p2g = p1.clone().requires_grad_(), p2.clone().requires_grad_()
    clsp.nnclr_loss(nn1, nn2, p1g, p2g, tau).backward()
    assert p1g.grad.abs().sum() > 0 and p2g.grad.abs().sum() > 0


def test_nnclr_loss_and_neighbours_equal_lightlys():
    """Against lightly (not a dependency: runs only where it is installed), where the two truly coincide.

    lightly's NNCLR example pairs NNMemoryBankModule with NTXentLoss(memory_bank_size=0):
    criterion(NN(z1), p2) is a 2B-way SimCLR loss over both sets, in which NN(z1)_i is also contrasted
    with NN(z1)_j and p2_i with p2_j. solo-learn's (ours) is B-way: row i of NN(z1) against the B rows of
    p2 only. So lightly's example loss is not ours, and only this is equal: our row i is lightly's
    memory-bank (MoCo-form) NTXentLoss on (NN(z1)_i, p2_i) with the bank holding the other B - 1
    normalised predictions p2_j, j != i; the mean over rows and the two sides gives nnclr_loss. And
    NNMemoryBankModule's top-1 (cosine, returning the bank's row) is nearest_neighbour."""
    lightly_loss = pytest.importorskip("lightly.loss")
    lightly_modules = pytest.importorskip("lightly.models.modules")
    B, d, tau = 6, 16, 0.2
    g = torch.Generator().manual_seed(3)
    z1, z2 = unit(B, d, 1, torch.float32), unit(B, d, 2, torch.float32)
    p1, p2 = torch.randn(B, d, generator=g), torch.randn(B, d, generator=g)
    support = unit(32, d, 4, torch.float32)

    bank = lightly_modules.NNMemoryBankModule(size=(32, d))
    bank.bank = support.clone()                            # lightly's bank: [size, dim] rows
    nn1, nn2 = clsp.nearest_neighbour(z1, support)[0], clsp.nearest_neighbour(z2, support)[0]
    assert torch.equal(bank(z1, update=False), nn1) and torch.equal(bank(z2, update=False), nn2)

    def one_side(nn_, p):
        total = 0.0
        for i in range(B):
            others = F.normalize(torch.cat([p[:i], p[i + 1:]]), dim=1)
            loss_fn = lightly_loss.NTXentLoss(temperature=tau, memory_bank_size=(B - 1, d))
            loss_fn.memory_bank.bank = others.clone()
            total += loss_fn(nn_[i:i + 1], p[i:i + 1]).item()   # no gradient: the bank is not updated
        return total / B
    theirs = (one_side(nn1, p2) + one_side(nn2, p1)) / 2
    assert clsp.nnclr_loss(nn1, nn2, p1, p2, tau).item() == pytest.approx(theirs, rel=1e-5)
    # lightly's example loss is another number (2B-way), and never smaller: it only adds negatives.
    ntxent = lightly_loss.NTXentLoss(temperature=tau)
    example = 0.5 * (ntxent(nn1, p2) + ntxent(nn2, p1))
    assert example.item() > clsp.nnclr_loss(nn1, nn2, p1, p2, tau).item() + 1e-3


# ------------------------------------------------------------------------------------------------
# The queue and the nearest neighbour
# ------------------------------------------------------------------------------------------------

def test_the_nnclr_queue_is_a_fifo_of_view_1_with_its_training_indices():
    """Q = 8 entries, B = 2 a step, one view: each push lands at the pointer with its indices, the
    pointer wraps to 0 after Q / B = 4 pushes, and the fifth push replaces the oldest two."""
    torch.manual_seed(0)
    queue = clsp.Queue(1, 8, 3, "cpu")
    assert queue.keys.shape == (1, 8, 3) and queue.keys.dtype == torch.float32
    assert torch.allclose(queue.keys.norm(dim=2), torch.ones(1, 8))       # random unit vectors at first
    assert queue.index.shape == (1, 8) and queue.index.dtype == torch.long
    assert queue.index.tolist() == [[-1] * 8] and queue.ptr == 0
    first = queue.keys.clone()
    for b in range(1, 5):
        queue.push(torch.full((2, 3), float(b)), index=torch.tensor([10 * b, 10 * b + 1]))
        assert queue.ptr == (2 * b) % 8, b
        assert torch.equal(queue.keys[0, 2 * b:], first[0, 2 * b:]), b   # the rest untouched so far
    assert queue.keys[0, :, 0].tolist() == [1, 1, 2, 2, 3, 3, 4, 4]
    assert queue.index[0].tolist() == [10, 11, 20, 21, 30, 31, 40, 41]
    queue.push(torch.full((2, 3), 5.0), index=torch.tensor([50, 51]))      # the oldest two go
    assert queue.keys[0, :, 0].tolist() == [5, 5, 2, 2, 3, 3, 4, 4] and queue.ptr == 2
    assert queue.index[0].tolist() == [50, 51, 20, 21, 30, 31, 40, 41]


def test_the_moco_queue_is_the_same_ring_with_two_views():
    """MoCo's use of the same class: two views, push(k1, k2), no indices given (they stay -1)."""
    queue = clsp.Queue(2, 4, 3, "cpu")
    assert queue.keys.shape == (2, 4, 3) and queue.index.shape == (2, 4)
    queue.push(torch.ones(2, 3), -torch.ones(2, 3))
    assert queue.keys[0, :2].eq(1).all() and queue.keys[1, :2].eq(-1).all() and queue.ptr == 2
    assert queue.index.eq(-1).all()


def test_nearest_neighbour_is_the_top_1_cosine_without_gradient():
    """NN(z) = support[argmax z . support^T]: the support's rows themselves and their row numbers,
    no gradient. The case is built so that unnormalised support rows would have another top dot
    product (row 0, three times as long, points further away): with the normalised support the API
    asks for, row 1 is the neighbour."""
    raw = torch.tensor([[3.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.0, 1.0]])
    support = F.normalize(raw, dim=1)
    z = F.normalize(torch.tensor([[0.5, 1.0, 0.0], [0.1, 0.0, 1.0]]), dim=1).requires_grad_()
    assert (z @ raw.T).argmax(1).tolist() == [0, 2] and (z @ support.T).argmax(1).tolist() == [1, 2]
    nn_, rows = clsp.nearest_neighbour(z, support)
    assert rows.tolist() == [1, 2] and torch.equal(nn_, support[[1, 2]])
    assert z.requires_grad and not nn_.requires_grad and nn_.grad_fn is None
    # A bigger case against the brute force.
    zs, sup = unit(50, 16, 0, torch.float32), unit(40, 16, 1, torch.float32)
    nn_, rows = clsp.nearest_neighbour(zs.requires_grad_(), sup)
    want = [max(range(40), key=lambda j: float(zs[i].detach() @ sup[j])) for i in range(50)]
    assert rows.tolist() == want and torch.equal(nn_, sup[want]) and not nn_.requires_grad
    assert nn_.shape == (50, 16) and rows.shape == (50,)


# ------------------------------------------------------------------------------------------------
# The heads
# ------------------------------------------------------------------------------------------------

def test_nnclr_projector_and_predictor_are_solo_learns():
    """Projector: three Linears, a BatchNorm1d after each, a ReLU after the first two only (512 -> 2048
    -> 2048 -> 256); predictor: 256 -> 4096 -> 256 with BN and ReLU in the middle. Parameters counted by
    hand: a Linear(i, o) has i o + o, a BatchNorm1d(c) 2 c."""
    proj, pred = clsp.make_nnclr_projector(), clsp.make_nnclr_predictor()
    lin, bn = (lambda i, o: i * o + o), (lambda c: 2 * c)
    assert sum(p.numel() for p in proj.parameters()) == (lin(512, 2048) + bn(2048) + lin(2048, 2048) + bn(2048)
                                                         + lin(2048, 256) + bn(256)) == 5_780_224
    assert sum(p.numel() for p in pred.parameters()) == lin(256, 4096) + bn(4096) + lin(4096, 256) == 2_109_696
    kinds = lambda m: [type(c).__name__ for c in m.modules() if not isinstance(c, nn.Sequential)]
    assert kinds(proj) == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert kinds(pred) == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    linears = [m for m in proj.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 2048), (2048, 2048), (2048, 256)]
    assert [m.num_features for m in proj.modules() if isinstance(m, nn.BatchNorm1d)] == [2048, 2048, 256]
    linears = [m for m in pred.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(256, 4096), (4096, 256)]
    h = torch.randn(4, 512)
    z = proj(h)
    assert z.shape == (4, 256) and (z < 0).any()           # ends with BatchNorm, no ReLU
    assert pred(z).shape == (4, 256)


def test_compiled_nnclr_step_equals_eager(traced_compile):
    """make_nnclr_step with compiled=True (traced as inductor would trace it, one graph each) on the real
    ResNet-18 and NNCLR heads gives the eager losses, weights and queue."""
    mean, std = torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2, 0.25, 0.3])
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    x3 = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    s = dict(lam=1.0, tau=0.2, lr=1.6, batch_size=4, epochs=2, warmup_epochs=1, positive="synthetic",
             lars_eta=0.02, weight_decay=1e-5, momentum=0.9)

    def go(compiled):
        torch.manual_seed(0)
        net = nn.Sequential(clsp.make_backbone(), clsp.make_nnclr_projector())
        predictor = clsp.make_nnclr_predictor()
        queue = clsp.Queue(1, 8, 256, "cpu")
        opt = clsp.LARS(clsp.lars_param_groups([net, predictor]), lr=0.0, momentum=0.9, weight_decay=1e-5,
                        eta=0.02)
        step = clsp.make_nnclr_step(net, predictor, queue, opt, no_scaler(), s, mean, std, 2, None, compiled)
        torch.manual_seed(3)
        losses = [[v.item() for v in step(torch.arange(4 * k, 4 * k + 4), x, x3, k).values()] for k in range(2)]
        return losses, net.state_dict(), predictor.state_dict(), queue.keys.clone(), queue.index.clone(), queue.ptr

    (l_e, w_e, p_e, q_e, i_e, ptr_e), (l_c, w_c, p_c, q_c, i_c, ptr_c) = go(False), go(True)
    assert sum(l_c, []) == pytest.approx(sum(l_e, []), rel=1e-4)
    for a, b in [(w_e, w_c), (p_e, p_c)]:
        for key in a:
            torch.testing.assert_close(b[key].float(), a[key].float(), rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(q_c, q_e, rtol=1e-3, atol=1e-5)
    assert torch.equal(i_c, i_e) and ptr_c == ptr_e == 0


# ------------------------------------------------------------------------------------------------
# As a user runs it
# ------------------------------------------------------------------------------------------------

SMALL = ["--preset", "tiny", "--image-size", "8", "--batch-size", "8", "--knn-every", "0"]


def test_nnclr_resume_continues_bit_for_bit(tmp_path, monkeypatch):
    """Backbone, projector, predictor, the queue with its indices and pointer, and LARS's momentum all
    continue: stopped after epoch 1 of 3 and resumed, the run ends where the uninterrupted one does.
    NNCLR-aug (a third view), so no synthetic set is needed and the CLSP term is on."""
    make_image_folder(str(tmp_path / "data"), n_train=4, n_test=1, size=8)
    flags = [*SMALL, "--base", "nnclr", "--positive", "view", "--queue", "48", "--epochs", "3", "--dataset",
             "folder", "--data-dir", "data", "--device", "cpu"]   # 2 steps of 8 an epoch: 6 pushes fill 48
    monkeypatch.chdir(tmp_path)
    a, b = whole_and_resumed(flags)
    assert a["method"] == b["method"] == "NNCLR-aug" and a["finished"] and b["finished"]
    assert a["queue_ptr"] == b["queue_ptr"] == 6 * 8 % 48 == 0     # wrapped at the last push
    assert a["queue"].shape == (1, 48, 256) and a["queue_index"].shape == (1, 48)
    # Entries 0..15 are epoch 1's (written before the stop: they must survive the resume), 32..47 epoch 3's.
    assert torch.equal(a["queue"], b["queue"]) and torch.equal(a["queue_index"], b["queue_index"])
    for epoch in range(3):                                   # each epoch: every training image once
        assert sorted(a["queue_index"][0, 16 * epoch:16 * (epoch + 1)].tolist()) == list(range(16)), epoch
    for part in ("backbone", "head", "predictor"):
        assert set(a[part]) == set(b[part]) and all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert set(sa) == set(sb) and sa
    for k in sa:
        for name, v in sa[k].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(sb[k][name])), (k, name)
    assert [g["lars"] for g in a["optimizer"]["param_groups"]] == [g["lars"] for g in b["optimizer"]["param_groups"]]


def test_the_three_nnclr_methods_train_and_evaluate_in_the_tiny_chain(chain, tmp_path):
    """NNCLR (--lam 0), NNCLR-aug (--positive view) and CLSP-NNCLR (the default) at the tiny preset, one
    epoch each, NNCLR's own settings (lr 1.6 at batch 1024, weight decay 1e-5, LARS eta 0.02, lam 1.0),
    then evaluate.py on each: the names in the checkpoints and in the closing table."""
    root = chain.copy_upto("generate.py", tmp_path)         # runs/ddpm.pt, runs/synthetic.pt
    runs = {"nnclr": ["--lam", "0"], "nnclr_aug": ["--positive", "view"], "clsp_nnclr": []}
    names = {"nnclr": "NNCLR", "nnclr_aug": "NNCLR-aug", "clsp_nnclr": "CLSP-NNCLR"}
    for name, flags in runs.items():
        run("clsp.py", "--preset", "tiny", "--base", "nnclr", "--epochs", "1", "--knn-every", "0", *flags,
            "--out", f"runs/{name}.pt", cwd=root)
        ckpt = torch.load(os.path.join(root, "runs", f"{name}.pt"), weights_only=True)
        s = ckpt["settings"]
        assert ckpt["method"] == names[name] and s["base"] == "nnclr", name
        assert (s["lr"], s["weight_decay"], s["lars_eta"]) == (1.6, 1e-5, 0.02), name
        assert s["lam"] == (0 if name == "nnclr" else 1.0), name
        assert (ckpt["synthetic"] is None) == (name != "clsp_nnclr"), name
        assert ckpt["queue"].shape == (1, 64, 256) and ckpt["queue_ptr"] == 0     # 2 steps of 32 into 64
        assert sorted(ckpt["queue_index"][0].tolist()) == list(range(64))         # one epoch: each image once
        assert {"backbone", "head", "predictor", "optimizer"} <= set(ckpt)
        assert sum(p.numel() for p in ckpt["predictor"].values() if p.dtype.is_floating_point) >= 2_109_696
        assert sorted(g["lars"] for g in ckpt["optimizer"]["param_groups"]) == [False, True]
    for name in runs:
        proc = run("evaluate.py", "--preset", "tiny", "--probe-epochs", "2", "--checkpoint", f"runs/{name}.pt",
                   "--out", f"runs/eval_{name}.json", cwd=root)
        assert f"({names[name]}, lam" in proc.stdout, proc.stdout
    table = proc.stdout[proc.stdout.index("all results in"):]
    methods = [line.split(" | ")[2] for line in table.splitlines() if line.startswith("| eval")]
    assert methods == ["NNCLR", "NNCLR-aug", "CLSP-NNCLR"], table


BAD = [
    (["--base", "nnclr", "--queue", "4"], "--queue 4 must be a multiple of --batch-size 8"),
    (["--base", "nnclr", "--queue", "20"], "pass --queue 16"),
    (["--base", "byol"], "choose simclr, moco or nnclr"),
    (["--base", "nnclr", "--lars-eta", "0"], "--lars-eta"),
    (["--base", "nnclr", "--lars-eta", "-0.5"], "--lars-eta"),
]


@pytest.mark.parametrize("flags,message", BAD, ids=[" ".join(f) for f, _ in BAD])
def test_bad_nnclr_input_is_one_sentence(tmp_path, monkeypatch, flags, message):
    make_image_folder(str(tmp_path / "data"), n_train=4, n_test=1, size=8)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        clsp.main([*SMALL, "--dataset", "folder", "--data-dir", "data", "--device", "cpu", *flags])
    text = str(e.value)
    assert isinstance(e.value.code, str) and text.startswith("error: ") and message in text, text  # exit 1
    one = re.sub(r"\b(e\.g|i\.e|etc)\. ", "", text)
    assert "\n" not in text and ". " not in one, text                                            # one sentence
    assert not os.path.exists("runs")


def test_bad_nnclr_input_exits_non_zero_as_a_user_sees_it(tmp_path):
    make_image_folder(str(tmp_path / "data"), n_train=4, n_test=1, size=8)
    proc = run("clsp.py", *SMALL, "--dataset", "folder", "--data-dir", "data", "--base", "nnclr",
               "--lars-eta", "0", cwd=str(tmp_path), check=False)
    assert proc.returncode != 0
    lines = [l for l in proc.stderr.splitlines() + proc.stdout.splitlines() if l.startswith("error: ")]
    assert len(lines) == 1 and "--lars-eta" in lines[0] and "Traceback" not in proc.stderr, proc.stderr
