"""The training steps against independent references written from the recipe, not from the code.

The other test files check the training steps against themselves (compiled against eager, resumed against
uninterrupted), so a mistake made on both sides passes them. Here each step runs on a stand-in network
small enough that the recipe can be written out by hand in float64: Ho et al.'s Algorithm 1 with Adam,
clipping and the EMA (ddpm.make_train_step); SimCLR's NT-Xent plus the CLSP term with SGD, momentum and
weight decay (clsp.make_train_step); the same term on MoCo-v2, with its key encoder's momentum update and
its queues (clsp.make_moco_step); NNCLR's step with its support set, predictor and LARS, as solo-learn's
CIFAR recipe (clsp.make_nnclr_step, clsp.LARS); both learning-rate schedules; and the authors' linear probe
(evaluate.linear_probe). The references share only the random draws with the code: they reseed torch and
draw in the order the step draws (read from the code), and the augmentation itself, which has its own test
against torchvision in test_clsp.py, is applied with clsp's functions.

Each test's docstring names the bug it was written to catch. Everything is tiny and runs on the CPU.
"""

import copy
import io
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import clsp
import ddpm
import evaluate


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py: tiny tensors, one thread


def no_scaler():
    return torch.amp.GradScaler("cpu", enabled=False)      # fp32 on the CPU: the scaler does nothing


# ------------------------------------------------------------------------------------------------
# Stage 1: one step of Algorithm 1 (Ho et al.) with Adam, clipping and the EMA
# ------------------------------------------------------------------------------------------------

ABAR64 = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))   # abar_t = prod_{s<=t} (1 - beta_s)


class StandIn(nn.Module):
    """eps_theta(x_t, t) = a 1x1 convolution of x_t (a 3x3 matrix and a bias): cheap to write out by hand.
    It records every (x_t, t) it is called with, so the test sees what the step fed the network."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        with torch.no_grad():
            g = torch.Generator().manual_seed(7)
            self.conv.weight.copy_(0.5 * torch.randn(3, 3, 1, 1, generator=g))
            self.conv.bias.copy_(0.2 * torch.randn(3, generator=g))
        self.seen = []

    def forward(self, x_t, t):
        self.seen.append((x_t.detach().clone(), t.detach().clone()))
        return self.conv(x_t)


def ddpm_step_parts(lr=0.05, warmup=8, grad_clip=0.05, ema_decay=0.5):
    """The stand-in, its EMA copy, Adam and make_train_step's settings."""
    model = StandIn()
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=lr)        # Adam's defaults: betas (0.9, 0.999), eps 1e-8
    s = dict(lr=lr, warmup=warmup, grad_clip=grad_clip, ema_decay=ema_decay)
    return model, ema, opt, s


def ddpm_reference(x_uint8, weights, steps, s, seed, clip=True):
    """Algorithm 1 written out in float64 for the stand-in, one entry per step in `steps` (the step index
    passed to train_step). Draws, from torch's global RNG reseeded with `seed`, in the step's order: the
    flip mask, t, eps. Returns what each step should feed the network, its loss, its (clipped) gradient,
    and the weights and EMA after it."""
    torch.manual_seed(seed)
    W, b = (w.detach().double().clone() for w in weights)     # [3, 3, 1, 1], [3]
    ema = [W.clone(), b.clone()]
    m, v = [torch.zeros_like(W), torch.zeros_like(b)], [torch.zeros_like(W), torch.zeros_like(b)]
    beta1, beta2, adam_eps = 0.9, 0.999, 1e-8
    out = []
    for n, k in enumerate(steps, start=1):
        B = x_uint8.shape[0]
        flip = torch.rand(B, 1, 1, 1) < 0.5                   # per image, p 0.5
        t = torch.randint(0, 1000, (B,))                      # t ~ U{0..T-1}: every index of abar
        eps = torch.randn(x_uint8.shape).double()             # eps ~ N(0, I)
        x0 = x_uint8.double() / 127.5 - 1                     # [0, 255] -> [-1, 1]
        x0 = torch.where(flip, x0.flip(3), x0)                # horizontal: the width axis of NCHW
        a = torch.from_numpy(ABAR64)[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        Wg, bg = W.clone().requires_grad_(), b.clone().requires_grad_()
        pred = torch.einsum("oc,bchw->bohw", Wg[:, :, 0, 0], x_t) + bg.view(1, 3, 1, 1)
        loss = ((eps - pred) ** 2).mean()
        grads = torch.autograd.grad(loss, [Wg, bg])
        loss = loss.detach()
        norm = math.sqrt(sum(float((g ** 2).sum()) for g in grads))
        if clip:                                              # clip to global norm grad_clip
            grads = [g * min(1.0, s["grad_clip"] / (norm + 1e-6)) for g in grads]
        lr = s["lr"] * min(1.0, (k + 1) / s["warmup"])        # linear warm-up, then flat
        new = []
        for i, (p, g) in enumerate(zip((W, b), grads)):       # Adam (Kingma & Ba, Algorithm 1)
            m[i] = beta1 * m[i] + (1 - beta1) * g
            v[i] = beta2 * v[i] + (1 - beta2) * g ** 2
            m_hat, v_hat = m[i] / (1 - beta1 ** n), v[i] / (1 - beta2 ** n)
            new.append(p - lr * m_hat / (v_hat.sqrt() + adam_eps))
        W, b = new
        decay = min(s["ema_decay"], (1 + k) / (10 + k))
        ema = [decay * e + (1 - decay) * p for e, p in zip(ema, (W, b))]
        out.append(dict(t=t, x_t=x_t, loss=loss.item(), norm=norm, grads=grads, weights=[W, b], ema=ema))
    return out


def test_ddpm_step_equals_algorithm_1_with_adam_clipping_and_ema():
    """Three steps of ddpm.make_train_step on the stand-in against ddpm_reference: what the network is fed
    (x_t from the horizontally flipped image, t), the loss, the clipped gradient, the weights after Adam at
    the warm-up learning rate, and the EMA. The step indices 0, 3, 12 with warm-up 8 and ema_decay 0.5
    visit the warm-up (lr/8, lr/2), the flat part (lr), the EMA ramp (0.1, 4/13) and its cap (0.5).

    Catches: the flip along the wrong axis (bug 3), t from [0, T-1) (bug 1: other draws), the EMA's two
    weights swapped (bug 2), a wrong EMA ramp, a warm-up off by one, missing or wrong clipping, a wrong
    x0 scaling, a wrong loss."""
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (8, 3, 4, 6), dtype=torch.uint8, generator=g)   # H != W: the two flips differ
    model, ema, opt, s = ddpm_step_parts()
    steps = [0, 3, 12]
    w0 = [p.detach().clone() for p in model.parameters()]
    ref = ddpm_reference(x, w0, steps, s, seed=5)
    # The settings are chosen so that every piece of the recipe changes the numbers:
    assert all(r["norm"] > 2 * s["grad_clip"] for r in ref)             # clipping bites at every step
    assert ref[0]["x_t"].shape == x.shape

    train_step = ddpm.make_train_step(model, ema, opt, no_scaler(), ddpm.make_schedule(), s)
    torch.manual_seed(5)
    for k, r in zip(steps, ref):
        loss = train_step(x, k)
        x_t, t = model.seen[-1]
        assert torch.equal(t, r["t"]), k
        np.testing.assert_allclose(x_t.double().numpy(), r["x_t"].numpy(), rtol=0, atol=2e-6, err_msg=f"x_t {k}")
        assert loss.item() == pytest.approx(r["loss"], rel=1e-5), k
        for p, g_ref in zip(model.parameters(), r["grads"]):           # the clipped gradient Adam used
            np.testing.assert_allclose(p.grad.double().numpy(), g_ref.numpy(), rtol=1e-4, atol=1e-8,
                                       err_msg=f"gradient {k}")
        for p, w_ref in zip(model.parameters(), r["weights"]):
            np.testing.assert_allclose(p.detach().double().numpy(), w_ref.numpy(), rtol=0, atol=2e-6,
                                       err_msg=f"weights {k}")
        for p, e_ref in zip(ema.parameters(), r["ema"]):
            np.testing.assert_allclose(p.double().numpy(), e_ref.numpy(), rtol=0, atol=2e-6, err_msg=f"EMA {k}")

    # And the reference itself would tell a step that skipped the clipping apart (by far more than the
    # tolerances above): after one step Adam's update is ~ lr * sign(g) whatever the scale, but from the
    # second step on the ratio of the gradients' sizes shows.
    unclipped = ddpm_reference(x, w0, steps, s, seed=5, clip=False)
    assert (unclipped[-1]["weights"][0] - ref[-1]["weights"][0]).abs().max() > 1e-4


def test_ddpm_step_draws_every_timestep_and_flips_half_the_images():
    """One step on 20,000 images of 1x2 pixels: every t in 0..999 is possible, t = 999 (the noisiest, the
    step sampling starts from) included; the chance that a value of t is missed by 20,000 uniform draws is
    1000 * e^-20. And the flip is drawn with p 0.5: on images whose two columns differ, the share of
    flipped images in x_t is ~1/2.

    Catches: t drawn from [0, T-1) (bug 1), t from 1..T (an index past abar), a flip probability other
    than 0.5 or no flip at all."""
    B = 20_000
    x = torch.zeros(B, 3, 1, 2, dtype=torch.uint8)
    x[..., 1] = 255                                            # left column -1, right column +1 in [-1, 1]
    model, ema, opt, s = ddpm_step_parts()
    train_step = ddpm.make_train_step(model, ema, opt, no_scaler(), ddpm.make_schedule(), s)
    torch.manual_seed(0)
    train_step(x, 0)
    x_t, t = model.seen[-1]
    assert t.min() == 0 and t.max() == 999                     # both ends of U{0..999}
    assert torch.unique(t).numel() == 1000                     # and everything in between
    assert abs(t.double().mean() - 499.5) < 10                 # uniform: the mean's std. error is ~2
    # Where t is small, x_t is x0 plus a little noise: its left column tells a flipped image.
    # (abar > 0.9: the columns differ by 1.9, the noise of the difference has std 0.45, so 4 sigma.)
    clean = ABAR64[t.numpy()] > 0.9
    flipped = (x_t[:, 0, 0, 0] > x_t[:, 0, 0, 1]).numpy()[clean]
    assert clean.sum() > 2000 and abs(flipped.mean() - 0.5) < 0.05


def test_ddpm_lr_is_a_linear_warm_up_then_flat():
    """ddpm.lr_at(k) = lr * min(1, (k + 1) / warmup): lr / warmup at step 0, lr from step warmup - 1 on.

    Catches: a warm-up off by one (0 at step 0, or lr reached a step late), no warm-up, a decay after it."""
    s = dict(lr=2e-4, warmup=100)
    for k, want in [(0, 2e-6), (1, 4e-6), (49, 1e-4), (98, 1.98e-4), (99, 2e-4), (100, 2e-4), (10 ** 6, 2e-4)]:
        assert ddpm.lr_at(k, s) == pytest.approx(want, rel=1e-12), k
    assert ddpm.lr_at(0, dict(lr=2e-4, warmup=0)) == pytest.approx(2e-4)   # no warm-up: flat from the start


# ------------------------------------------------------------------------------------------------
# Stage 3: one SGD step of NT-Xent + lam * the CLSP term
# ------------------------------------------------------------------------------------------------

def nt_xent64(z1, z2, tau):
    """NT-Xent (SimCLR eq. 1), from the paper: for each of the 2B embeddings, the cross-entropy of its
    positive (the other view of its image) against all 2B - 1 others, on cosine similarities / tau."""
    B = z1.shape[0]
    z = torch.cat([z1, z2])
    z = z / z.norm(dim=1, keepdim=True)                       # cosine similarity
    sim = z @ z.T / tau
    sim = sim.masked_fill(torch.eye(2 * B, dtype=torch.bool), -math.inf)   # k != i
    pos = torch.cat([torch.arange(B, 2 * B), torch.arange(0, B)])
    return (torch.logsumexp(sim, dim=1) - sim[torch.arange(2 * B), pos]).mean()


def clsp_term64(z1, z3):
    """mean_i || z1_i - z3_i ||^2."""
    return ((z1 - z3) ** 2).sum(dim=1).mean()


def unit64(n, d, seed):
    z = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return z / z.norm(dim=1, keepdim=True)


def test_total_loss_gradient_reaches_all_three_embeddings():
    """The gradient of clsp.total_loss: d/dz3 is the analytic 2 lam (z3 - z1) / B (the CLSP term only; z3
    is never a negative), d/dz1 is NT-Xent's plus 2 lam (z1 - z3) / B, d/dz2 is NT-Xent's alone
    (NT-Xent's from autograd on nt_xent64 above).

    Catches: a stop-gradient on the candidate (bug 4) in clsp_loss or total_loss, one on the anchor,
    a wrong factor of the CLSP term, z3 among NT-Xent's negatives."""
    B, lam, tau = 6, 0.7, 0.2
    z1, z2, z3 = (unit64(B, 5, seed).requires_grad_() for seed in (0, 1, 2))
    L, _, _ = clsp.total_loss(z1, z2, z3, lam, tau)
    L.backward()
    with torch.no_grad():
        pull = 2 * lam * (z3 - z1) / B
    g1, g2 = torch.autograd.grad(nt_xent64(z1, z2, tau), [z1, z2])
    assert z3.grad is not None, "no gradient reaches z3"
    torch.testing.assert_close(z3.grad, pull, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(z1.grad, g1 - pull, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(z2.grad, g2, rtol=1e-10, atol=1e-12)
    assert pull.abs().max() > 0.05                                # the term is not negligible here


H = W = 8                                                        # image size of the CLSP step tests
D_OUT = 16                                                       # embedding size of the tiny net


def tiny_net():
    """views -> Flatten -> Linear(3HW, 16) -> BatchNorm1d(16): one matrix to write out by hand, and a
    BatchNorm, whose batch statistics show whether v1, v2 and s went through the net in one pass."""
    torch.manual_seed(3)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * H * W, D_OUT), nn.BatchNorm1d(D_OUT))


def clsp_reference(net, x, s_img, mean, std, lrs, lam, tau, momentum, wd, seed, detach_z3=False):
    """The CLSP recipe in float64 for tiny_net, one entry per learning rate in lrs: views [v1; v2; s] from
    one draw of sample_augment_params(3B) (torch's global RNG, reseeded with `seed`) applied with
    apply_augment; z = normalize(BN(Linear(views))) over all 3B views at once; L = NT-Xent(z1, z2) +
    lam * mean ||z1 - z3||^2 with gradients into z1, z2 and z3; SGD with momentum and weight decay
    (PyTorch's form: g += wd p; buf = momentum buf + g, buf = g at the first step; p -= lr buf).
    detach_z3=True gives the wrong recipe with a stop-gradient on z3, only to show the test can see it."""
    torch.manual_seed(seed)
    params = [p.detach().double().clone() for p in net.parameters()]   # Linear W, b; BN gamma, beta
    bufs = [None] * len(params)
    out = []
    for lr in lrs:
        raw = torch.cat([x, x] + ([s_img] if s_img is not None else []))
        p = clsp.sample_augment_params(raw.shape[0], H, W, "cpu")
        views = clsp.apply_augment(raw, p, H, mean, std).double().flatten(1)
        leaf = [q.clone().requires_grad_() for q in params]
        Wl, bl, gamma, beta = leaf
        h = views @ Wl.T + bl
        mu, var = h.mean(0), h.var(0, unbiased=False)         # BatchNorm's batch statistics, all views
        h = (h - mu) / (var + 1e-5).sqrt() * gamma + beta
        z = h / h.norm(dim=1, keepdim=True)
        B = x.shape[0]
        z1, z2 = z[:B], z[B:2 * B]
        l_simclr = nt_xent64(z1, z2, tau)
        z3 = z[2 * B:].detach() if detach_z3 else z[2 * B:]
        l_clsp = clsp_term64(z1, z3) if s_img is not None else torch.zeros((), dtype=torch.float64)
        grads = torch.autograd.grad(l_simclr + lam * l_clsp, leaf)
        l_simclr, l_clsp = l_simclr.detach(), l_clsp.detach()
        for i, (q, g) in enumerate(zip(params, grads)):
            g = g + wd * q
            bufs[i] = g.clone() if bufs[i] is None else momentum * bufs[i] + g
            params[i] = q - lr * bufs[i]
        out.append(dict(L_simclr=l_simclr.item(), L_clsp=l_clsp.item(), params=[q.clone() for q in params]))
    return out


@pytest.mark.parametrize("lam", [0.7, 0.0])
def test_clsp_step_equals_the_recipe(lam):
    """Two steps of clsp.make_train_step on tiny_net against clsp_reference: both losses and all weights
    after each SGD step. Two steps, so the momentum buffer is used; weight decay 0.05, so it shows; lam
    0.7 with candidates, and lam 0 without (plain SimCLR: two views, no s).

    Catches: a stop-gradient on the candidate's embedding (bug 4: z3.detach() in the step), the views not
    normalised together (one BatchNorm pass per view), a missing momentum or weight decay, the learning
    rate not applied as given, a wrong temperature or lam, z3 among the negatives."""
    B, tau, momentum, wd = 6, 0.2, 0.9, 0.05
    g = torch.Generator().manual_seed(11)
    x = torch.randint(0, 256, (B, 3, H, W), dtype=torch.uint8, generator=g)
    s_img = torch.randint(0, 256, (B, 3, H, W), dtype=torch.uint8, generator=g) if lam else None
    mean, std = torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2, 0.25, 0.3])
    # A two-step run without warm-up: the cosine starts at the peak 0.3 and is halfway down at step 1.
    schedule = dict(lr=0.3 * 1024 / B, batch_size=B, epochs=1, warmup_epochs=0)
    lrs = [0.3, 0.15]

    net = tiny_net()
    ref = clsp_reference(net, x, s_img, mean, std, lrs, lam, tau, momentum, wd, seed=4)
    opt = torch.optim.SGD(net.parameters(), lr=0.0, momentum=momentum, weight_decay=wd)
    train_step = clsp.make_train_step(net, opt, no_scaler(), dict(lam=lam, tau=tau, **schedule), mean, std, 2)
    torch.manual_seed(4)
    for i, (lr, r) in enumerate(zip(lrs, ref)):
        losses = train_step(torch.arange(B), x, s_img, i)
        assert losses["L_simclr"].item() == pytest.approx(r["L_simclr"], rel=1e-5), i
        if lam:
            assert losses["L_clsp"].item() == pytest.approx(r["L_clsp"], rel=1e-5), i
        else:
            assert "L_clsp" not in losses
        for name, p, q in zip(("W", "b", "gamma", "beta"), net.parameters(), r["params"]):
            np.testing.assert_allclose(p.detach().double().numpy(), q.numpy(), rtol=1e-5, atol=1e-6,
                                       err_msg=f"{name} after step {i}")

    if lam:
        # The reference tells the bug it is meant to catch apart: with z3 detached the weights end elsewhere.
        wrong = clsp_reference(tiny_net(), x, s_img, mean, std, lrs, lam, tau, momentum, wd, seed=4, detach_z3=True)
        assert (wrong[-1]["params"][0] - ref[-1]["params"][0]).abs().max() > 1e-3


def clsp_lr64(k, lr, batch_size, warmup_epochs, epochs, steps_per_epoch):
    """The authors' schedule: peak lr * B / 1024 (linear scaling), linear warm-up, cosine to 0."""
    peak = lr * batch_size / 1024
    warm, total = warmup_epochs * steps_per_epoch, epochs * steps_per_epoch
    if k < warm:
        return peak * (k + 1) / warm
    return peak * 0.5 * (1 + math.cos(math.pi * (k - warm) / (total - warm)))


@pytest.mark.parametrize("batch_size,peak", [(1024, 0.5), (256, 0.125)])
def test_clsp_lr_warms_up_to_the_scaled_peak_then_falls_as_a_cosine_to_zero(batch_size, peak):
    """clsp.lr_at at the points that matter, 10 epochs of 5 steps with 2 warm-up epochs (warm-up: steps
    0..9, cosine: 10..49): lr 0.5 is the rate at batch 1024, so batch 256 peaks at 0.125.

    Catches: the learning rate not scaled by batch / 1024 (bug 5), a warm-up off by one, a cosine that
    starts late, stops short of 0 or runs over the whole run instead of after the warm-up."""
    s = dict(lr=0.5, batch_size=batch_size, warmup_epochs=2, epochs=10)
    spe = 5
    want = {0: peak / 10, 4: peak / 2, 9: peak, 10: peak, 30: peak / 2,      # mid-cosine: half the peak
            49: peak * 0.5 * (1 + math.cos(math.pi * 39 / 40)), 50: 0.0}   # the last step; the end: 0
    for k, v in want.items():
        assert clsp.lr_at(k, s, spe) == pytest.approx(v, rel=1e-12, abs=1e-15), k
        assert v == pytest.approx(clsp_lr64(k, 0.5, batch_size, 2, 10, spe), abs=1e-15)
    for k in range(50):
        assert clsp.lr_at(k, s, spe) == pytest.approx(clsp_lr64(k, 0.5, batch_size, 2, 10, spe), rel=1e-12), k
    assert 0 < clsp.lr_at(49, s, spe) < 0.01 * peak               # the last step is nearly at 0
    s0 = dict(s, warmup_epochs=0)                                   # no warm-up: the cosine from step 0
    assert clsp.lr_at(0, s0, spe) == pytest.approx(peak) and clsp.lr_at(25, s0, spe) == pytest.approx(peak / 2)


# ------------------------------------------------------------------------------------------------
# Stage 3 on MoCo-v2: one step of the MoCo loss + lam * the CLSP term, the key encoder and the queues
# ------------------------------------------------------------------------------------------------

def moco_net():
    """views -> Flatten -> Linear(3HW, 12) -> BatchNorm1d(12): cheap to write out, and the BatchNorm shows
    whether each view went through the encoder on its own (the authors' way)."""
    torch.manual_seed(3)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * H * W, 12), nn.BatchNorm1d(12))


def encode64(weight, bias, gamma, beta, v):
    """normalize(BN(Linear(v))) in float64, BatchNorm over this batch (training mode)."""
    h = v.flatten(1).double() @ weight.T + bias
    h = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + 1e-5) * gamma + beta
    return h / h.norm(dim=1, keepdim=True)


def info_nce64(q, k, queue, tau):
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], 1) / tau
    return (torch.logsumexp(logits, 1) - logits[:, 0]).mean()


@pytest.mark.parametrize("third", ["candidate", None])
def test_moco_step_equals_the_recipe(third):
    """Two steps of clsp.make_moco_step against the recipe: views from one draw of MoCo's augmentation
    parameters, each view through the query encoder on its own, the keys from the key encoder, the
    symmetric loss against the queues as they were before the step, the CLSP term on q1 and q3, SGD with
    momentum and weight decay, then k <- m k + (1 - m) q and the keys into the queues.

    Catches: the key encoder updated before the step or with the weights swapped, the queue updated
    before the loss (a batch among its own negatives), keys with a gradient, the views through one
    BatchNorm, a one-sided loss, the CLSP term on keys or without its weight."""
    B, Q, lam, tau, wd = 4, 8, 0.5, 0.2, 1e-3
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (B, 3, H, W), dtype=torch.uint8, generator=g)
    x3 = torch.randint(0, 256, (B, 3, H, W), dtype=torch.uint8, generator=g) if third else None
    mean, std = torch.tensor([0.5, 0.45, 0.4]), torch.tensor([0.25, 0.25, 0.3])
    net = moco_net()
    key_net = copy.deepcopy(net).requires_grad_(False)
    torch.manual_seed(1)
    queue = clsp.Queue(2, Q, 12, "cpu")
    opt = torch.optim.SGD(net.parameters(), lr=0.0, momentum=0.9, weight_decay=wd)
    # A two-step run: lr from its peak 0.3 halfway down the cosine, m from 0.9 halfway up to 0.95.
    s = dict(lam=lam, tau=tau, positive="synthetic", lr=0.3 * 1024 / B, batch_size=B, epochs=1, warmup_epochs=0,
             key_momentum=0.9, key_momentum_end=0.95)
    step = clsp.make_moco_step(net, key_net, queue, opt, torch.amp.GradScaler("cpu", enabled=False), s, mean, std, 2)

    # The reference's state, in float64: query weights, key weights, momentum buffers, queues.
    P = [p.detach().double().clone() for p in net.parameters()]            # weight, bias, gamma, beta
    K = [p.detach().double().clone() for p in key_net.parameters()]
    keys = queue.keys.double().clone()
    buf = [None] * 4
    for n, (lr, m) in enumerate([(0.3, 0.9), (0.15, 0.925)]):
        torch.manual_seed(10 + n)
        losses = step(torch.arange(B), x, x3, n)
        torch.manual_seed(10 + n)                           # the same draws: MoCo's parameters, 2B or 3B
        raw = torch.cat([x, x] + ([x3] if third else []))
        p = clsp.sample_augment_params(raw.shape[0], H, W, "cpu", **clsp.AUGMENT["moco"])
        views = clsp.apply_augment(raw, p, H, mean, std)
        v1, v2, v3 = views[:B], views[B:2 * B], views[2 * B:]
        Pg = [w.clone().requires_grad_() for w in P]
        q1, q2 = encode64(*Pg, v1), encode64(*Pg, v2)
        k1, k2 = encode64(*K, v1), encode64(*K, v2)
        l_moco = (info_nce64(q1, k2, keys[1], tau) + info_nce64(q2, k1, keys[0], tau)) / 2
        loss = l_moco
        if third:
            q3 = encode64(*Pg, v3)
            loss = loss + lam * ((q1 - q3) ** 2).sum(1).mean()
        grads = torch.autograd.grad(loss, Pg)
        for i, (w, gr) in enumerate(zip(P, grads)):          # SGD: d = g + wd w; buf = 0.9 buf + d; w -= lr buf
            d = gr + wd * w
            buf[i] = d if buf[i] is None else 0.9 * buf[i] + d
            P[i] = w - lr * buf[i]
        K = [m * kw + (1 - m) * qw for kw, qw in zip(K, P)]  # after the step, towards the new weights
        keys[0, n * B:(n + 1) * B], keys[1, n * B:(n + 1) * B] = k1, k2

        assert losses["L_moco"].item() == pytest.approx(l_moco.item(), rel=1e-5), n
        assert ("L_clsp" in losses) == bool(third)
        for got, want in [(net.parameters(), P), (key_net.parameters(), K)]:
            for a, b in zip(got, want):
                torch.testing.assert_close(a.detach().double(), b, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(queue.keys.double(), keys, rtol=1e-4, atol=1e-6)
        assert queue.ptr == (n + 1) * B % Q


# ---- NNCLR (clsp.make_nnclr_step): LARS and the step, against solo-learn's recipe ----------------
# The recipe (Dwibedi et al. 2021, as solo-learn's solo/methods/nnclr.py, solo/losses/nnclr.py,
# solo/utils/lars.py): z_v = normalize(projector(backbone(view_v))), each view through the network on its
# own; p_v = predictor(projector(...)) on the projection before normalisation; NN(z): the top-1 cosine row of
# a FIFO queue of earlier z1's, without gradient; L = (CE(NN(z1) p2^T / tau) + CE(NN(z2) p1^T / tau)) / 2 +
# lam * mean ||z1 - z3||^2; LARS per matrix d = (g + wd p) * min(eta ||p|| / (||g|| + wd ||p|| + eps) / lr, 1)
# (d = g when a norm is 0), biases and BatchNorm d = g; SGD momentum; then z1 and the indices into the queue.

# ------------------------------------------------------------------------------------------------
# LARS
# ------------------------------------------------------------------------------------------------

def lars64(P, G, bufs, lr, flags, eta, wd, momentum, eps=1e-8, cases=None):
    """solo-learn's LARS step (clip_lars_lr=True, exclude_bias_n_norm_lars=True) on float64 tensors,
    returning the new parameters; bufs (torch's SGD momentum buffers, None before the first step) in place."""
    out = []
    for i, (p, g) in enumerate(zip(P, G)):
        d = g
        if flags[i]:
            pn, gn = float(p.norm()), float(g.norm())
            if pn > 0 and gn > 0:
                ratio = eta * pn / (gn + wd * pn + eps)
                scale = min(ratio / lr, 1.0)
                d = (g + wd * p) * scale
                if cases is not None:
                    cases.add("clipped" if ratio / lr > 1 else "scaled")
            elif cases is not None:
                cases.add("zero p" if pn == 0 else "zero g")
        bufs[i] = d.clone() if bufs[i] is None else momentum * bufs[i] + d
        out.append(p - lr * bufs[i])
    return out


def test_lars_param_groups_split_matrices_from_biases_and_batchnorm():
    net = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3))
    other = nn.Sequential(nn.Linear(3, 2))
    groups = clsp.lars_param_groups([net, other])
    assert len(groups) == 2
    by_flag = {g["lars"]: {id(p) for p in g["params"]} for g in groups}
    assert by_flag[True] == {id(net[0].weight), id(net[3].weight), id(other[0].weight)}
    assert by_flag[False] == {id(net[0].bias), id(net[1].weight), id(net[1].bias), id(net[3].bias),
                              id(other[0].bias)}
    one = clsp.lars_param_groups(net)                       # a single module is fine too
    assert {g["lars"]: len(list(g["params"])) for g in one} == {True: 2, False: 4}


def lars_problem():
    """Parameters (float64) of a Linear(5, 4) + BatchNorm1d(4) + Linear(4, 3) whose second weight starts at
    0 (||p|| = 0), and four steps of hand-made gradients: step 0 small on W1 (eta ||p|| / (||g|| + wd ||p||)
    above lr: clipped to 1), step 1 large on W1 (below lr: scaled), step 2 zero on W1 and on the bias b1
    (d = g = 0: the momentum alone moves them), and every step a gradient on the BatchNorm weight while
    its value is far from 0 (a decay or a scaling there would show)."""
    g = torch.Generator().manual_seed(0)
    rnd = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
    P = [rnd(4, 5), rnd(4), 1 + 0.3 * rnd(4), 0.1 * rnd(4), torch.zeros(3, 4, dtype=torch.float64), rnd(3)]
    flags = [True, False, False, False, True, False]
    grads = []
    for k, w1_scale in enumerate([1e-3, 10.0, 0.0, 1.0]):
        G = [w1_scale * rnd(4, 5), rnd(4), 0.5 * rnd(4), rnd(4), rnd(3, 4), rnd(3)]
        if k == 2:
            G[1] = torch.zeros(4, dtype=torch.float64)
        grads.append(G)
    return P, flags, grads, [0.1, 0.05, 0.2, 0.15]


def test_lars_equals_solo_learns_in_float64():
    """clsp.LARS on float64 parameters against lars64 over four steps with four learning rates.

    Catches: no clip (min(., 1)), the clip on ratio rather than ratio / lr, decay or scaling on biases
    and BatchNorm, decay added when the scaling is skipped (||p|| or ||g|| 0), the weight decay left
    out of the trust ratio's denominator, momentum not torch SGD's (dampening, the first step's buffer),
    a stale group lr."""
    eta, wd, momentum = 0.02, 0.01, 0.9
    P, flags, grads, lrs = lars_problem()
    params = [nn.Parameter(p.clone()) for p in P]
    opt = clsp.LARS([dict(params=[p for p, f in zip(params, flags) if f], lars=True),
                     dict(params=[p for p, f in zip(params, flags) if not f], lars=False)],
                    lr=0.0, momentum=momentum, weight_decay=wd, eta=eta)
    assert isinstance(opt, torch.optim.Optimizer)
    ref, bufs, cases = [p.clone() for p in P], [None] * len(P), set()
    for k, (G, lr) in enumerate(zip(grads, lrs)):
        for p, gr in zip(params, G):
            p.grad = gr.clone()
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        ref = lars64(ref, G, bufs, lr, flags, eta, wd, momentum, cases=cases)
        for i, (p, q) in enumerate(zip(params, ref)):
            torch.testing.assert_close(p.detach(), q, rtol=1e-12, atol=1e-14, msg=f"tensor {i} after step {k}")
    assert cases == {"clipped", "scaled", "zero p", "zero g"}   # every branch was taken

    # The same four steps with two of the mistakes end elsewhere: the comparison above can see them.
    def variant(flags=flags, eta=eta):
        r, b = [p.clone() for p in P], [None] * len(P)
        for G, lr in zip(grads, lrs):
            r = lars64(r, G, b, lr, flags, eta, wd, momentum)
        return r
    for wrong in (variant(flags=[True] * 6), variant(eta=1e9)):   # biases and BN scaled; no trust ratio
        assert max((a - b).abs().max() for a, b in zip(wrong, ref)) > 1e-4


def test_lars_state_dict_resumes_bit_for_bit():
    """Two steps, the state saved and loaded as a checkpoint is (torch.save, weights_only load) into a
    fresh LARS over copies of the parameters; the next two steps agree exactly with the uninterrupted."""
    P, flags, grads, lrs = lars_problem()

    def make(values):
        params = [nn.Parameter(v.clone()) for v in values]
        opt = clsp.LARS([dict(params=[p for p, f in zip(params, flags) if f], lars=True),
                         dict(params=[p for p, f in zip(params, flags) if not f], lars=False)],
                        lr=0.0, momentum=0.9, weight_decay=0.01, eta=0.02)
        return params, opt

    def step(params, opt, G, lr):
        for p, gr in zip(params, G):
            p.grad = gr.clone()
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()

    params, opt = make(P)
    for G, lr in zip(grads[:2], lrs[:2]):
        step(params, opt, G, lr)
    f = io.BytesIO()
    torch.save(dict(optimizer=opt.state_dict(), params=[p.detach() for p in params]), f)
    f.seek(0)
    saved = torch.load(f, weights_only=True)
    params2, opt2 = make(saved["params"])
    opt2.load_state_dict(saved["optimizer"])
    assert [g["lars"] for g in opt2.param_groups] == [True, False]
    for G, lr in zip(grads[2:], lrs[2:]):
        step(params, opt, G, lr)
        step(params2, opt2, G, lr)
    for p, q in zip(params, params2):
        assert torch.equal(p, q)
    for k, st in opt.state_dict()["state"].items():
        for name, v in st.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(opt2.state_dict()["state"][k][name])), (k, name)


# ------------------------------------------------------------------------------------------------
# One whole NNCLR step against the recipe, on a stand-in network written out in float64
# ------------------------------------------------------------------------------------------------



def nnclr_standins():
    """backbone Flatten-Linear(3HW, 12); a projector and a predictor shaped as NNCLR's (Linear-BN-ReLU-
    Linear-BN; Linear-BN-ReLU-Linear) but tiny, BatchNorm weights away from 1 and 0 so they matter."""
    torch.manual_seed(3)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(3 * H * W, 12))
    projector = nn.Sequential(nn.Linear(12, 10), nn.BatchNorm1d(10), nn.ReLU(), nn.Linear(10, 8), nn.BatchNorm1d(8))
    predictor = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 8))
    with torch.no_grad():
        for m in [*projector, *predictor]:
            if isinstance(m, nn.BatchNorm1d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
    return nn.Sequential(backbone, projector), predictor


def bn64(h, gamma, beta):
    """BatchNorm1d in training mode: this batch's mean and biased variance, eps 1e-5."""
    return (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + 1e-5) * gamma + beta


def forward64(P, v):
    """The stand-ins in float64 on one view: (the projection z, unnormalised; the prediction p = predictor(z))."""
    W0, b0, W1, b1, g1, e1, W2, b2, g2, e2, W3, b3, g3, e3, W4, b4 = P
    h = v.flatten(1).double() @ W0.T + b0
    z = bn64(torch.relu(bn64(h @ W1.T + b1, g1, e1)) @ W2.T + b2, g2, e2)
    p = torch.relu(bn64(z @ W3.T + b3, g3, e3)) @ W4.T + b4
    return z, p


def nnclr64(nn1, nn2, p1, p2, tau):
    def side(a, b):
        logits = F.normalize(a, dim=1) @ F.normalize(b, dim=1).T / tau
        return (torch.logsumexp(logits, 1) - logits.diagonal()).mean()
    return (side(nn1, p2) + side(nn2, p1)) / 2


def lr64(k, s, steps_per_epoch):
    """solo-learn's schedule as this project scales it: peak lr * B / 1024, linear warm-up, cosine to 0."""
    peak = s["lr"] * s["batch_size"] / 1024
    warm, total = s["warmup_epochs"] * steps_per_epoch, s["epochs"] * steps_per_epoch
    if k < warm:
        return peak * (k + 1) / warm
    return peak * 0.5 * (1 + math.cos(math.pi * (k - warm) / (total - warm)))


def nnclr_views(raw, B, mean, std):
    """NNCLR's augmentation of [x; x; x3] as the step draws it: solo-learn's asymmetric pipeline
    (saturation 0.2; solarisation p 0 on view 1, p 0.2 on view 2 and the third view). clsp.py draws the
    parameters of all views in one call with solarisation p 0.2 and then clears view 1's solarisation."""
    p = clsp.sample_augment_params(raw.shape[0], H, W, "cpu", saturation=0.2, solarize=0.2)   # one draw, 2B or 3B
    p["solarize"] = p["solarize"] & (torch.arange(raw.shape[0]) >= B)   # view 1: p 0 (its draws cleared)
    return clsp.apply_augment(raw, p, H, mean, std)


@pytest.mark.parametrize("lam", [0.7, 0.0])
def test_nnclr_step_equals_the_recipe(lam):
    """Two steps of clsp.make_nnclr_step (at steps 1 and 3 of a 2-epoch run of 2 steps an epoch: the peak
    of the warm-up, then half-way down the cosine) against the recipe in float64: views from one draw of
    NNCLR's augmentation, each view through the network on its own, NN(z1), NN(z2) from the queue as it
    was before the step, the predictor on the unnormalised projection, the symmetric loss, the CLSP term
    on z1, z3, LARS with the step's learning rate, then z1 and the indices into the queue.

    Catches: the predictor on the normalised z, the views through one BatchNorm, the neighbours from the
    queue after the push (a batch its own neighbour), a gradient through the neighbours, z2 or p's in the
    queue, the indices not recorded, the learning rate not from the step (or not scaled by B / 1024), no
    LARS scaling or the bias/BN exclusion missing, the CLSP term without its weight or on the wrong views."""
    B, Q, tau, wd, eta = 4, 8, 0.2, 1e-3, 0.02
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (B, 3, H, W), dtype=torch.uint8, generator=g)
    x3 = torch.randint(0, 256, (B, 3, H, W), dtype=torch.uint8, generator=g) if lam else None
    mean, std = torch.tensor([0.5, 0.45, 0.4]), torch.tensor([0.25, 0.25, 0.3])
    s = dict(lam=lam, tau=tau, lr=25.6, batch_size=B, epochs=2, warmup_epochs=1, positive="synthetic",
             lars_eta=eta, weight_decay=wd, momentum=0.9)       # peak lr 25.6 * 4 / 1024 = 0.1
    spe = 2
    net, predictor = nnclr_standins()
    torch.manual_seed(1)
    queue = clsp.Queue(1, Q, 8, "cpu")
    opt = clsp.LARS(clsp.lars_param_groups([net, predictor]), lr=0.0, momentum=0.9, weight_decay=wd, eta=eta)
    step = clsp.make_nnclr_step(net, predictor, queue, opt, no_scaler(), s, mean, std, spe)
    params = [*net.parameters(), *predictor.parameters()]

    P = [p.detach().double().clone() for p in params]
    flags = [p.ndim > 1 for p in params]
    keys, index = queue.keys.double().clone(), queue.index.clone()
    bufs, cases = [None] * len(P), set()
    for n, (k, idx) in enumerate([(1, torch.tensor([5, 2, 7, 0])), (3, torch.tensor([1, 6, 3, 4]))]):
        torch.manual_seed(10 + n)
        losses = step(idx, x, x3, k)
        torch.manual_seed(10 + n)                           # the same draws
        raw = torch.cat([x, x] + ([x3] if lam else []))
        views = nnclr_views(raw, B, mean, std)
        Pg = [w.clone().requires_grad_() for w in P]
        (h1, p1), (h2, p2) = forward64(Pg, views[:B]), forward64(Pg, views[B:2 * B])
        z1, z2 = F.normalize(h1, dim=1), F.normalize(h2, dim=1)
        sim1, sim2 = z1.detach() @ keys[0].T, z2.detach() @ keys[0].T
        for sim in (sim1, sim2):                            # no near-tie: float32 picks the same rows
            top2 = sim.topk(2, dim=1).values
            assert (top2[:, 0] - top2[:, 1]).min() > 1e-4
        nn1, nn2 = keys[0][sim1.argmax(1)], keys[0][sim2.argmax(1)]
        l_nnclr = nnclr64(nn1, nn2, p1, p2, tau)
        loss = l_nnclr
        if lam:
            z3 = F.normalize(forward64(Pg, views[2 * B:])[0], dim=1)
            l_clsp = ((z1 - z3) ** 2).sum(1).mean()
            loss = loss + lam * l_clsp
        grads = torch.autograd.grad(loss, Pg)
        lr = lr64(k, s, spe)
        P = lars64(P, grads, bufs, lr, flags, eta, wd, 0.9, cases=cases)
        keys[0, n * B:(n + 1) * B], index[0, n * B:(n + 1) * B] = z1.detach(), idx

        assert losses["L_nnclr"].item() == pytest.approx(l_nnclr.item(), rel=1e-5), n
        if lam:
            assert losses["L_clsp"].item() == pytest.approx(l_clsp.item(), rel=1e-5), n
        else:
            assert set(losses) == {"L_nnclr"}
        assert all(group["lr"] == pytest.approx(lr, rel=1e-12) for group in opt.param_groups), n
        for i, (a, b) in enumerate(zip(params, P)):
            torch.testing.assert_close(a.detach().double(), b, rtol=1e-4, atol=1e-6, msg=f"tensor {i}, step {n}")
        torch.testing.assert_close(queue.keys.double(), keys, rtol=1e-4, atol=1e-6)
        assert torch.equal(queue.index, index) and queue.ptr == (n + 1) * B % Q
    assert lr64(1, s, spe) == pytest.approx(0.1) and lr64(3, s, spe) == pytest.approx(0.05)
    assert "scaled" in cases or "clipped" in cases


# ------------------------------------------------------------------------------------------------
# Stage 4: the linear probe (authors' protocol)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("epochs,first,second", [(100, 60, 80), (10, 6, 8), (5, 3, 4)])
def test_probe_lr_drops_tenfold_after_60_and_80_percent(epochs, first, second):
    """evaluate.probe_lr: epochs 1..60 lr, 61..80 lr / 10, 81..100 lr / 100 (and the same fractions of
    another number of epochs).

    Catches: the drops removed (bug 6), a drop one epoch early or late, a drop of the wrong size."""
    for lr in (1.0, 0.4):
        for epoch in range(1, epochs + 1):
            want = lr if epoch <= first else lr / 10 if epoch <= second else lr / 100
            assert evaluate.probe_lr(epoch, epochs, lr) == pytest.approx(want, rel=1e-12), (epoch, epochs)


def probe_reference(w0, b0, f_train, f_flip, y_train, epochs, batch_size, lr, seed, drops=True):
    """The authors' linear evaluation in float64: plain SGD (no momentum, no weight decay) on the
    softmax cross-entropy with its analytic gradient; each epoch every training feature replaced by its
    mirror image with p 0.5, then a random order, the last partial batch kept; lr x0.1 after 60% and after
    80% of the epochs. The flips and orders come from torch.Generator(seed), drawn as linear_probe draws
    them (flip mask, then permutation, each epoch). Returns the final W, b and the last epoch's mean loss."""
    Wt, b = w0.double().clone(), b0.double().clone()
    g = torch.Generator().manual_seed(seed)
    N, C = f_train.shape[0], Wt.shape[0]
    first, second = round(0.6 * epochs), round(0.8 * epochs)
    onehot = torch.eye(C, dtype=torch.float64)[y_train]
    for epoch in range(1, epochs + 1):
        lr_e = lr if not drops or epoch <= first else lr / 10 if epoch <= second else lr / 100
        flip = torch.rand(N, 1, generator=g) < 0.5
        f = torch.where(flip, f_flip, f_train).double()
        perm = torch.randperm(N, generator=g)
        loss_sum = 0.0
        for i in range(0, N, batch_size):
            idx = perm[i:i + batch_size]
            X, Y = f[idx], onehot[idx]
            logits = X @ Wt.T + b
            logp = logits - torch.logsumexp(logits, dim=1, keepdim=True)
            loss_sum += float(-(Y * logp).sum())              # the batch's mean loss times its size
            d = (logp.exp() - Y) / len(idx)                   # d(mean CE)/d logits
            Wt, b = Wt - lr_e * d.T @ X, b - lr_e * d.sum(0)
    return Wt, b, loss_sum / N


def test_linear_probe_equals_the_protocol(monkeypatch):
    """evaluate.linear_probe on 200 noisy 64-d training points (4 overlapping classes, so the weights keep
    moving at lr 1.0 and the step size matters to the end), 10 epochs at batch 32 (six full batches and
    one of 8 per epoch): the probe's final weights, the last epoch's loss and the test top-1 equal
    probe_reference's. The probe is caught as it is made (torch.nn.Linear replaced by a subclass that
    remembers its instance and initial weights).

    Catches: the learning-rate drops removed (bug 6) or misplaced, momentum or weight decay added, the
    last partial batch dropped, the flips not drawn (or drawn with another p), a wrong order of draws."""
    made = []

    class RecordingLinear(nn.Linear):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.initial = (self.weight.detach().clone(), self.bias.detach().clone())
            made.append(self)

    g = torch.Generator().manual_seed(0)
    D, C, N = 64, 4, 200
    centres = 0.04 * torch.randn(C, D, generator=g)
    y_train, y_test = torch.randint(0, C, (N,), generator=g), torch.randint(0, C, (300,), generator=g)
    f_train = centres[y_train] + 0.15 * torch.randn(N, D, generator=g)     # |f| ~ 1: lr 1.0 is stable
    f_flip = f_train + 0.05 * torch.randn(N, D, generator=g)               # the mirror images: close by
    f_test = centres[y_test] + 0.15 * torch.randn(300, D, generator=g)

    monkeypatch.setattr(torch.nn, "Linear", RecordingLinear)
    top1, last_loss = evaluate.linear_probe(f_train, f_flip, y_train, f_test, y_test, C, epochs=10, batch_size=32,
                                            lr=1.0, seed=3, log_every=1000)
    monkeypatch.undo()
    assert len(made) == 1, "linear_probe made no nn.Linear (or several): the test cannot see its weights"
    probe = made[0]
    W_ref, b_ref, loss_ref = probe_reference(*probe.initial, f_train, f_flip, y_train, 10, 32, 1.0, seed=3)

    np.testing.assert_allclose(probe.weight.detach().double().numpy(), W_ref.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(probe.bias.detach().double().numpy(), b_ref.numpy(), rtol=0, atol=1e-5)
    assert last_loss == pytest.approx(loss_ref, rel=1e-5)
    logits = f_test.double() @ W_ref.T + b_ref
    top2 = logits.topk(2, dim=1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-4                          # no test point on a boundary
    assert top1 == pytest.approx(100 * (logits.argmax(1) == y_test).double().mean().item(), abs=1e-4)
    assert 40 < top1 < 95                                                  # learnt something, not everything

    # Without the drops the reference ends far from the probe: the comparison above can see bug 6.
    W_flat, _, loss_flat = probe_reference(*probe.initial, f_train, f_flip, y_train, 10, 32, 1.0, seed=3, drops=False)
    assert (W_flat - W_ref).abs().max() > 1e-2 and abs(loss_flat - loss_ref) > 1e-3
