"""Stage 3 of CLSP: contrastive pre-training of a ResNet-18 with synthetic positives.

SimCLR (Chen et al. 2020) pulls two augmented views of an image together and pushes them away from
every other image in the batch. CLSP (Zeng et al., ECCV 2024) adds a third, *hard* positive: one of
the K synthetic images that stage 2 (`generate.py`) made from the same training image, with the
anchor's semantics but a different background, pose and colour. The loss is

    L = L_simclr(z1, z2) + lam * mean_i || z1_i - z3_i ||^2          (z = normalize(head(backbone(x))))

where z1, z2 are the embeddings of two augmented views of real image i, z3 that of an augmented
synthetic candidate s_i = synthetic[i, k], k ~ Uniform{0..K-1} drawn afresh every time i is drawn.
The paper adds the same term to MoCo-v2 too (`--base moco`: a momentum key encoder and a queue of keys;
the term on the queries, lam 0.5), and argues against NNCLR (`--base nnclr`: each view's positive is its
nearest neighbour in a support set of earlier embeddings, an *easy* positive). This file trains all three
bases, each with and without a third positive, nine methods:

                       --lam 0 (the base)   --positive view ("-aug")   (the default: CLSP)
    (--base simclr)    SimCLR               SimCLR-aug                 CLSP-SimCLR
    --base moco        MoCo                 MoCo-aug                   CLSP-MoCo
    --base nnclr       NNCLR                NNCLR-aug                  CLSP-NNCLR

`--lam 0` is the plain base, the baseline every CLSP number is compared with. The "-aug" controls make
the third positive another augmented view of the real image instead of a candidate: the same term and
the same cost, so CLSP beside its "-aug" control shows what a *synthetic* positive adds beyond a third
view. Neither reads synthetic data. CLSP-NNCLR (the term on NNCLR's projections) is no paper's method.

    python clsp.py                                   # standard preset, after `python generate.py`
    python clsp.py --lam 0 --out runs/clsp_lam0.pt   # the SimCLR baseline (needs no candidates)
    python clsp.py --positive view --out runs/clsp_aug.pt          # the SimCLR-aug control
    python clsp.py --base moco --out runs/clsp_moco.pt             # CLSP on MoCo-v2
    python clsp.py --base nnclr --lam 0 --out runs/clsp_nnclr_lam0.pt   # NNCLR, the paper's foil
    python clsp.py --preset quick                    # ~30 epochs, part of the ~10 min quick pipeline
    python clsp.py --preset tiny --dataset folder --data-dir DIR   # seconds on a CPU, for tests
    python clsp.py --synthetic runs/synthetic_stl10.pt --out runs/clsp_stl10.pt   # STL-10 at 64 px
    python clsp.py --resume                          # continue an interrupted run to its last epoch
    torchrun --standalone --nproc-per-node 4 clsp.py --preset paper   # 4 GPUs: the same run (README)

Reads:  runs/synthetic.pt (from generate.py; only for CLSP) and the training images. The data set,
        directory and image size default to the ones the synthetic set was made from; without
        candidates, to those of runs/synthetic.pt or runs/ddpm.pt when there is one (it says which), so
        baselines and controls train on the same images as CLSP.
Writes: runs/clsp.pt (backbone + head weights, for MoCo the key encoder and queues, for NNCLR the
        predictor and support set, optimiser, epoch, settings, the method's name, what it was made from),
        saved atomically at the end of every epoch.

Speed: the whole data set (real and synthetic, uint8) lives on the GPU and the augmentations are
batched tensor code there, so no DataLoader sits on the hot path (the airbench recipe). Goal: one
CIFAR-10 epoch (50,000 images x 3 views, batch 1024) in at most 2 s on one H100, i.e. the authors'
1000 epochs in well under an hour (theirs: ~6 h on 4 GPUs). GPU times are not yet measured. The tiny
preset (64 images at 16x16, 2 epochs) takes 5 to 8 s on a 2-core CPU, any of the SimCLR and MoCo methods.
"""

import argparse
import copy
import math
import os
import sys

# common.py first: it turns a Ctrl-C while PyTorch loads (seconds) into one sentence, not a traceback.
from common import (MAIN, WORLD_SIZE, EpochOrder, Progress, StopFlag, add_run_flags, atomic_save, autocast_dtype,
                    average_gradients, barrier, claim_output, command, compile_enabled, count_flops, data_info,
                    dataset_settings, fail, gather, has_own_pretrain_split, load_artifact, load_dataset,
                    load_for_resume, own_rows, peak_flops, refuse_to_overwrite, require_divisible, require_free_space, require_same_data, resolve_settings,
                    restore_training_state, resume_hint, run_main, settings_adder, start_processes, sync_batchnorm,
                    tensor_bytes, this_process, training_state, with_eager_fallback)

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision


# ------------------------------------------------------------------------------------------------
# Settings. `standard` is the default; a preset changes some values; an explicit flag wins over both.
# ------------------------------------------------------------------------------------------------

DEFAULTS = dict(  # the `standard` preset: the authors' recipe, 400 instead of 1000 epochs
    dataset="cifar10", data_dir="data", image_size=32, seed=0,
    stem="cifar",                        # the ResNet's first layers (make_backbone); STL-10: "mid"
    base="simclr",                       # the contrastive method the third positive is added to: simclr | moco | nnclr
    positive="synthetic",                # the third positive: a synthetic candidate (CLSP), or "view": another
                                         # augmented view of the real image (the "-aug" control)
    lam=1.0, tau=0.2,                    # authors: lambda 1.0 (their ablation: 94.37; 1.6 gave 94.59), tau 0.2
    epochs=400, batch_size=1024,         # authors: 1000 epochs at batch 1024 (the `paper` preset)
    lr=0.5, momentum=0.9, weight_decay=1e-4, warmup_epochs=10,   # authors' SGD; lr is the one at batch 1024
    queue=32768, key_momentum=0.99, key_momentum_end=0.999,      # MoCo only (the authors' MoCo-v2 config);
                                                                 # NNCLR: its support set, 65,536 (BASES)
    lars_eta=0.02,                       # NNCLR only: LARS's trust coefficient (solo-learn's CIFAR recipe)
    knn_every=50, knn_k=200, knn_T=0.1,  # the quick kNN monitor uses evaluate.py's headline k and T
    synthetic="runs/synthetic.pt",
    candidates_on="auto",                # where the candidates live: gpu, host (pinned memory) or auto
)
# What each base changes (a flag or a preset still wins). MoCo-v2: the authors' config (train_moco_clsp.py,
# after solo-learn's MoCo-v2+); their lr 0.3 is at batch 512, unscaled; ours is given at batch 1024 and
# scaled, so 0.6. NNCLR: solo-learn's CIFAR recipe (nnclr.yaml): LARS at lr 0.4 for batch 256 (1.6 at
# 1024: solo-learn scales linearly too), weight decay 1e-5, a support set of 65,536. Its CLSP weight is
# SimCLR's 1.0: no paper reports CLSP on NNCLR, and its loss is SimCLR's with the positive replaced.
BASES = {"simclr": dict(), "moco": dict(lam=0.5, lr=0.6, batch_size=512),
         "nnclr": dict(lr=1.6, batch_size=256, weight_decay=1e-5, queue=65536)}
PRESETS = {
    # seconds on a CPU (64 images at 16x16 after the tiny ddpm/generate): shows the loop works, numbers
    # mean nothing. The architecture is the real one: a toy head would test a different program.
    "tiny": dict(image_size=16, epochs=2, batch_size=32, warmup_epochs=1, knn_every=1, queue=64),
    # Part of the ~10 minute quick pipeline (three runs: SimCLR, SimCLR-aug, CLSP). At the 2 s/epoch goal,
    # 30 epochs are ~1 min a run; batch 512 gives twice the optimiser steps of 1024 in so short a run, and
    # a 10% warm-up replaces the authors' 10 of 1000 epochs. Time not yet measured on a GPU.
    "quick": dict(epochs=30, batch_size=512, warmup_epochs=3, knn_every=10),
    "standard": dict(),
    "paper": dict(epochs=1000, knn_every=100),
}
# A data set's own recipe (common.dataset_settings): "standard" sits beside DEFAULTS (a preset or a flag wins
# over it), another preset's entry is the data set's own version of that preset. STL-10, the authors'
# configs/simclr_clsp_stl10.yaml and moco_clsp_stl10.yaml: 64 px, ResNet-18 with the "mid" stem
# (make_backbone), SimCLR at batch 1024, lr 0.5, lam 1.0 (DEFAULTS already); `standard` trains 200 epochs,
# as many images as CIFAR's 400 (100,000 images, not 50,000), `quick` 15 (CIFAR's 30), `paper` the authors' 1000.
DATASETS = {"stl10": {"standard": dict(image_size=64, stem="mid", epochs=200),
                      "quick": dict(epochs=15, knn_every=5), "paper": dict(epochs=1000)}}
# A base's own values on a data set, over BASES. MoCo on STL-10: batch 1024 and lr 0.3 unscaled (so 0.3 at
# our batch 1024) and lam 0.4, as the authors' published moco_clsp_stl10.yaml, whose batch is the one in the
# name of their reported run (moco_clsp_stl10_resnet18_bs-1024); an earlier version of that file had batch
# 512 and lam 0.2. NNCLR has no STL-10 recipe in the authors' code or solo-learn's: it keeps its CIFAR one.
DATASET_BASES = {"stl10": {"moco": dict(lam=0.4, lr=0.3, batch_size=1024)}}
FREE_ON_RESUME = {"data_dir", "knn_every", "synthetic", "candidates_on"}   # the flags --resume may change


def method_name(s):
    """One name per method, the paper's: SimCLR, SimCLR-aug, CLSP-SimCLR, MoCo, MoCo-aug, CLSP-MoCo, and
    NNCLR, NNCLR-aug, CLSP-NNCLR."""
    base = {"simclr": "SimCLR", "moco": "MoCo", "nnclr": "NNCLR"}[s.get("base", "simclr")]
    if s["lam"] == 0:
        return base                                   # the plain base: no third positive
    return f"{base}-aug" if s.get("positive", "synthetic") == "view" else f"CLSP-{base}"


# ------------------------------------------------------------------------------------------------
# The model: ResNet-18 with a small-image stem (512-d features h) and the projection head (z).
# ------------------------------------------------------------------------------------------------

STEMS = ("cifar", "mid")


def make_backbone(stem="cifar"):
    """torchvision's ResNet-18 with a stem for small images -> 512-d features (11.2 M parameters).

    ImageNet's 7x7 stride-2 stem plus max-pool would shrink a 32x32 image to 8x8 before the first
    block; the CIFAR variant (He et al. 2016 sec. 4.2, SimCLR appendix B.9) is a 3x3 stride-1 conv and no
    max-pool, so the blocks see the full resolution (32, 16, 8, 4 px). "mid", the authors' stem for
    STL-10 at 64 px (their utils.get_resnet(size='mid')), keeps the 3x3 stride-1 conv but also the
    max-pool: the blocks see 32, 16, 8 and 4 px, as on CIFAR, where the CIFAR stem at 64 px would cost
    4x (64, 32, 16, 8 px). evaluate.py imports this, so the weights in runs/clsp.pt load into exactly this module.
    """
    net = torchvision.models.resnet18()
    net.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")  # as torchvision inits convs
    if stem == "cifar":
        net.maxpool = nn.Identity()           # "mid": torchvision's 3x3 stride-2 max-pool stays
    net.fc = nn.Identity()
    return net


def make_head():
    """Projection head g: 512 -> 4096 -> 256 with a ReLU, no BatchNorm (the authors'). The loss lives on z = g(h);
    the features h before it are what transfers (SimCLR sec. 4.2), so the head is dropped after training."""
    return nn.Sequential(nn.Linear(512, 4096), nn.ReLU(inplace=True), nn.Linear(4096, 256))


# ------------------------------------------------------------------------------------------------
# The losses. z1, z2, z3: [B, d] embeddings of v1, v2 and s, L2-normalised (SimCLR's z).
# ------------------------------------------------------------------------------------------------

def nt_xent(z1, z2, tau):
    """SimCLR's NT-Xent: each of the 2B embeddings has the other view of its image as its positive and
    the other 2B - 2 as negatives; cross-entropy over cosine similarities / tau, mean over all 2B.
    The similarities are cosines, so z1 and z2 are normalised here (a no-op on SimCLR's own z)."""
    B = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = z @ z.T / tau
    logits = logits.masked_fill(torch.eye(2 * B, dtype=torch.bool, device=z.device), float("-inf"))  # not itself
    positive = (torch.arange(2 * B, device=z.device) + B) % (2 * B)      # row a's partner: a + B mod 2B
    return F.cross_entropy(logits, positive)


def clsp_loss(z1, z3):
    """The CLSP term: mean_i ||z1_i - z3_i||^2 (= mean_i 2 - 2 z1_i . z3_i on the unit sphere)."""
    return (z1 - z3).pow(2).sum(dim=1).mean()


def total_loss(z1, z2, z3, lam, tau):
    """L = L_simclr + lam * L_clsp. z3 = None (lam = 0) is SimCLR. z3 is never a negative."""
    l_simclr = nt_xent(z1, z2, tau)
    l_clsp = clsp_loss(z1, z3) if z3 is not None else torch.zeros((), device=z1.device)
    return l_simclr + lam * l_clsp, l_simclr, l_clsp


def info_nce(q, k, queue, tau):
    """MoCo's InfoNCE (He et al. 2020, eq. 1): query q_i's positive is its key k_i (the other view, from
    the key encoder); its negatives are the Q keys in the queue. Logits [B, 1 + Q] = [q_i . k_i, q_i . queue]
    / tau, the positive in column 0, cross-entropy, mean over the batch. q, k, queue rows: unit vectors."""
    positive = (q * k).sum(dim=1, keepdim=True)                          # [B, 1]
    logits = torch.cat([positive, q @ queue.T], dim=1) / tau             # [B, 1 + Q]
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


def moco_loss(q1, q2, k1, k2, queue, tau):
    """The symmetric MoCo-v2 loss of the authors' code (and solo-learn's MoCo-v2+): each view's queries
    against the other view's keys and the other view's queue: (InfoNCE(q1, k2, queue_2) + InfoNCE(q2, k1,
    queue_1)) / 2. queue: [2, Q, d], the keys of view 1 and of view 2 of earlier batches."""
    return (info_nce(q1, k2, queue[1], tau) + info_nce(q2, k1, queue[0], tau)) / 2


def pick_candidates(synthetic, idx, generator=None):
    """s_i = synthetic[i, k], k ~ Uniform{0..K-1} drawn afresh at every draw of image i (not one per epoch).
    synthetic: the candidates [N, K, 3, H, W] on idx's device, or HostCandidates (below)."""
    k = torch.randint(0, synthetic.shape[1], idx.shape, device=idx.device, generator=generator)
    if isinstance(synthetic, HostCandidates):
        return synthetic.take(idx, k)
    return synthetic[idx, k]


class HostCandidates:
    """The candidates in (pinned) host memory, for a GPU they do not fit on beside the model: STL-10's
    100,000 x 8 at 64 px are 9.8 GB. take(idx, k) gathers the batch's picks on the host into one pinned
    buffer and copies it to the GPU asynchronously (non_blocking: the copy is queued behind the GPU's work,
    and the host goes on). pick_candidates draws k on the GPU exactly as for candidates held there, so a
    step is the same step; the picks are then read on the host (idx.cpu()), which waits until the GPU
    has finished the steps queued before it: one wait per step, and since the last copy is queued
    before it, one buffer serves every step. Under torchrun every process holds its own copy: N x 9.8 GB
    of host memory on a machine of N GPUs."""

    def __init__(self, images, device):
        self.shape, self.device = images.shape, device
        pin = device.type == "cuda"               # pinned (page-locked) memory: the GPU copies from it directly
        self.images = torch.empty(images.shape, dtype=torch.uint8, pin_memory=pin)
        self.images.copy_(images)                 # from the artifact's memory map: the 9.8 GB once, not twice
        self.flat = self.images.view(-1, *images.shape[2:])   # [N * K, 3, H, W]: row i * K + k
        self.buffer = None

    def take(self, idx, k):
        rows = (idx * self.shape[1] + k).cpu()
        if self.buffer is None or self.buffer.shape[0] != rows.shape[0]:
            self.buffer = torch.empty((rows.shape[0], *self.shape[2:]), dtype=torch.uint8,
                                      pin_memory=self.device.type == "cuda")
        torch.index_select(self.flat, 0, rows, out=self.buffer)
        return self.buffer.to(self.device, non_blocking=True)


def place_candidates(images, device, where):
    """The candidates on the GPU (where: "gpu") or in pinned host memory ("host", HostCandidates); "auto"
    chooses the GPU when they take at most half of its free memory (the other half for the model, the
    batch and its activations: not measured at 64 px, a margin), the host otherwise; on a CPU the two are
    one memory. Returns them and a sentence that says which, and why, for the run's first lines."""
    size, gb = images.numel(), lambda n: f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"
    if device.type != "cuda":
        if where == "host":                       # the host path on a CPU: for the tests, no pinning
            return HostCandidates(images, device), f"candidates {gb(size)} in host memory (--candidates-on host)"
        return images.to(device), f"candidates {gb(size)} in memory (device {device})"
    free = torch.cuda.mem_get_info(device)[0]
    if where == "auto":
        where = "gpu" if size <= free / 2 else "host"
        why = f"{'at most' if where == 'gpu' else 'more than'} half of the GPU's free {gb(free)}"
    else:
        why = f"--candidates-on {where}"
    if where == "gpu":
        return images.to(device), f"candidates {gb(size)} on the GPU ({why})"
    return HostCandidates(images, device), (f"candidates {gb(size)} in pinned host memory, each batch's picks "
                                            f"copied to the GPU as it trains ({why})")


# ------------------------------------------------------------------------------------------------
# Augmentation: SimCLR's CIFAR pipeline as batched tensor code, every image with its own random draws.
#   RandomResizedCrop(scale (0.08, 1), ratio (3/4, 4/3)) + HorizontalFlip(0.5)
#   -> ColorJitter(0.4, 0.4, 0.4, 0.1) with p 0.8, in a random order per image -> RandomGrayscale(0.2)
#   -> Normalize(mean, std).
# The authors' MoCo pipeline differs in two places: saturation 0.2, and RandomSolarize with p 0.2 after
# the grayscale (AUGMENT below). NNCLR's (solo-learn's "asymmetric" CIFAR one) is MoCo's, except that
# view 1 is never solarised (its step clears view 1's draws). Parameters are drawn like torchvision draws
# them, so the statistics match (tests/test_clsp.py checks).
# ------------------------------------------------------------------------------------------------

AUGMENT = {"simclr": dict(saturation=0.4, solarize=0.0), "moco": dict(saturation=0.2, solarize=0.2),
           "nnclr": dict(saturation=0.2, solarize=0.2)}


def sample_augment_params(B, H, W, device, generator=None, saturation=0.4, solarize=0.0):
    """One independent set of random parameters per image, as a dict of [B, ...] tensors. saturation: the
    colour jitter's saturation strength; solarize: the probability of solarising (0: SimCLR, no draw)."""
    def uniform(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(*shape, device=device, generator=generator)

    # RandomResizedCrop.get_params: up to 10 tries of (area fraction, log-uniform aspect ratio); the
    # first try whose box fits wins. Drawn for all 10 tries at once, then the first that fits is taken.
    area = H * W * uniform(0.08, 1.0, B, 10)
    ratio = torch.exp(uniform(math.log(3 / 4), math.log(4 / 3), B, 10))
    w, h = (area * ratio).sqrt().round(), (area / ratio).sqrt().round()   # round half to even, like Python
    fits = (w >= 1) & (w <= W) & (h >= 1) & (h <= H)
    first = fits.int().argmax(dim=1, keepdim=True)                       # first try that fits
    ok = fits.any(dim=1)
    # No try fits (rare): torchvision falls back to a centre crop, which is the whole image when the
    # image is square, as ours always are.
    w = torch.where(ok, w.gather(1, first)[:, 0], float(W))
    h = torch.where(ok, h.gather(1, first)[:, 0], float(H))
    i = (torch.rand(B, device=device, generator=generator) * (H - h + 1)).floor()   # randint(0, H - h + 1)
    j = (torch.rand(B, device=device, generator=generator) * (W - w + 1)).floor()
    return dict(
        box=torch.stack([i, j, h, w], dim=1),                                         # top, left, height, width
        flip=torch.rand(B, device=device, generator=generator) < 0.5,
        jitter=torch.rand(B, device=device, generator=generator) < 0.8,               # RandomApply(p=0.8)
        factors=torch.stack([uniform(0.6, 1.4, B), uniform(0.6, 1.4, B),              # brightness, contrast,
                             uniform(1 - saturation, 1 + saturation, B),              # saturation,
                             uniform(-0.1, 0.1, B)], dim=1),                          # hue
        order=torch.rand(B, 4, device=device, generator=generator).argsort(dim=1),   # a random permutation each
        gray=torch.rand(B, device=device, generator=generator) < 0.2,
        **({"solarize": torch.rand(B, device=device, generator=generator) < solarize} if solarize else {}),
    )


def grayscale(x):
    """ITU-R 601 luma with torchvision's weights: [B, 3, H, W] -> [B, 1, H, W]."""
    return 0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def shift_hue(x, shift):
    """RGB -> HSV, h <- (h + shift) mod 1, -> RGB (torchvision's adjust_hue), per image shift [B]."""
    r, g, b = x.unbind(dim=1)
    v, c = x.amax(dim=1), x.amax(dim=1) - x.amin(dim=1)              # value and chroma
    cd = torch.where(c > 0, c, torch.ones_like(c))                   # grey pixels (c = 0) have hue 0
    h = torch.where(v == r, (g - b) / cd, torch.where(v == g, 2 + (b - r) / cd, 4 + (r - g) / cd))
    h = (h / 6 + shift.view(-1, 1, 1)) % 1.0
    # HSV -> RGB in closed form: channel n (5, 3, 1 for r, g, b) is v - c * clamp(min(k, 4 - k), 0, 1)
    # with k = (n + 6h) mod 6; the same as the six-sector table, in four lines.
    n = (5 - 2 * torch.arange(3, device=x.device)).view(1, 3, 1, 1)   # made on the device: no host copy
    k = (n + 6 * h[:, None]) % 6
    return v[:, None] - c[:, None] * torch.minimum(k, 4 - k).clamp(0, 1)


def apply_augment(x, p, size, mean, std):
    """Apply the parameters p to uint8 images x [B, 3, H, W] -> normalised float [B, 3, size, size]."""
    B, _, H, W = x.shape
    x = x.float() / 255
    # Crop + resize + flip as one affine map sampled bilinearly. With align_corners=False, the box
    # [left, left + w) in pixels is [2 left / W - 1, 2 (left + w) / W - 1] in grid units; a negative
    # x-scale mirrors the crop about its own centre, which is the horizontal flip.
    i, j, h, w = p["box"].unbind(dim=1)
    sx = torch.where(p["flip"], -w / W, w / W)
    zero = torch.zeros_like(sx)
    theta = torch.stack([torch.stack([sx, zero, (2 * j + w) / W - 1], 1),
                         torch.stack([zero, h / H, (2 * i + h) / H - 1], 1)], 1)
    grid = F.affine_grid(theta, [B, 3, size, size], align_corners=False)
    # torchvision resizes the cropped image alone, so an edge pixel of the output sees only the
    # crop's own edge pixel: clamp the sampling points to the centres of the crop's outer pixels.
    lo = torch.stack([(2 * j + 1) / W - 1, (2 * i + 1) / H - 1], 1).view(B, 1, 1, 2)
    hi = torch.stack([(2 * (j + w) - 1) / W - 1, (2 * (i + h) - 1) / H - 1], 1).view(B, 1, 1, 2)
    grid = torch.minimum(torch.maximum(grid, lo), hi)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    # Colour jitter in each image's own random order: in round r, image b applies op order[b, r]
    # (0 brightness, 1 contrast, 2 saturation, 3 hue; -1 = this image skips jitter). Brightness,
    # contrast and saturation are all blends x <- f x + (1 - f) target (target: black, the mean grey
    # level, the grey image), clamped to [0, 1] as torchvision does; so one blend per round does all
    # three with per-image f and target, and f = 1 is "not this round". Hue needs HSV and is computed
    # for every image each round, kept only where it is that image's turn (torch.where: no host sync).
    f_all = p["factors"]
    for r in range(4):
        op = torch.where(p["jitter"], p["order"][:, r], -1)
        gray = grayscale(x)
        target = torch.where((op == 1).view(B, 1, 1, 1), gray.mean(dim=(1, 2, 3), keepdim=True),
                             torch.where((op == 2).view(B, 1, 1, 1), gray, 0.0))
        f = torch.where((op >= 0) & (op <= 2), f_all.gather(1, op.clamp(0, 2)[:, None])[:, 0], 1.0)
        f = f.view(B, 1, 1, 1)
        x = (f * x + (1 - f) * target).clamp(0, 1)
        x = torch.where((op == 3).view(B, 1, 1, 1), shift_hue(x, f_all[:, 3]), x)

    x = torch.where(p["gray"].view(B, 1, 1, 1), grayscale(x).expand(B, 3, size, size), x)  # RandomGrayscale
    if "solarize" in p:   # MoCo's RandomSolarize: every value at or above the threshold 128/255 inverted
        x = torch.where(p["solarize"].view(B, 1, 1, 1) & (x >= 128 / 255), 1 - x, x)
    mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def augment(x, size, mean, std, generator=None, base="simclr"):
    """The augmentation of uint8 images x [B, 3, H, W] (SimCLR's, or the authors' MoCo one), independent
    random parameters per image."""
    p = sample_augment_params(x.shape[0], x.shape[2], x.shape[3], x.device, generator, **AUGMENT[base])
    return apply_augment(x, p, size, mean, std)


def channel_stats(x):
    """Per-channel mean and std of uint8 images in [0, 1] units: the data set's Normalize constants."""
    xs = [x[:, c].float() / 255 for c in range(3)]   # one channel at a time: a third of the memory
    return [float(xc.mean()) for xc in xs], [float(xc.std()) for xc in xs]


# ------------------------------------------------------------------------------------------------
# Training: one step of SimCLR + the CLSP term, then the same term on MoCo-v2 and on NNCLR, then the loop
# that repeats any of them. Every base's step has one signature, train_step(idx, x, x3, step): the batch's
# training indices, its uint8 real images x [B, 3, H, W], their third positives x3 (a synthetic candidate
# for CLSP, the image again for the "-aug" control, None for the plain base) and the step number, from
# which each step computes its own learning rate (and MoCo its key momentum). So the loop never asks
# which base or which positive it runs.
#   Under torchrun (several processes, one per GPU) a step gets this process's slice of the batch, and
# three lines of each step make it compute what one process computes (common.py explains them): the
# augmentation is drawn for the whole batch and each process keeps its rows (own_rows); the embeddings
# are gathered (gather) before the loss, which every process then computes over the whole batch; the
# gradients are averaged before the update (optimiser_step). BatchNorm sees the whole batch
# (sync_batchnorm, in make_model). With one process these calls return their input.
# ------------------------------------------------------------------------------------------------

def lr_at(step, s, steps_per_epoch):
    """The learning rate at `step` (counted from 0): a linear warm-up to lr * B / 1024 over
    s["warmup_epochs"], then a cosine to 0 at the last step."""
    peak = s["lr"] * s["batch_size"] / 1024
    warm, total = s["warmup_epochs"] * steps_per_epoch, s["epochs"] * steps_per_epoch
    if step < warm:
        return peak * (step + 1) / warm
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(total - warm, 1)))


def term_name(s):
    """The name of the third positive's term in progress lines: L_clsp (a candidate) or L_aug (a view)."""
    return "L_aug" if s.get("positive") == "view" else "L_clsp"


def compiled_network(module, compiled):
    """The network as a step calls it: compiled (with torch.compile on, the default on a GPU), or as it is.
    Under torchrun it stays eager: SyncBatchNorm's collectives break a compiled graph at every BatchNorm
    and are reported to crash it; the augmentation, which has none, is compiled either way."""
    return torch.compile(module) if compiled and WORLD_SIZE == 1 else module


def optimiser_step(opt, scaler, loss, lr):
    """Backward and one update at learning rate lr, the same for every base (fp16: with loss scaling)."""
    opt.zero_grad(set_to_none=True)
    for g in opt.param_groups:
        g["lr"] = lr
    scaler.scale(loss).backward()              # fp16 only: loss scaling; otherwise plain backward()
    average_gradients(w for g in opt.param_groups for w in g["params"])   # torchrun: the mean over processes
    scaler.step(opt)
    scaler.update()


def make_train_step(net, opt, scaler, s, mean, std, steps_per_epoch, amp=None, compiled=False, layout=None):
    """SimCLR's step: train_step(idx, x, x3, step) -> {"L_simclr": ..., "L_clsp" (or "L_aug"): ...}, one SGD
    step on the uint8 real images x and their third positives x3 (None when lam = 0: then only
    L_simclr). s holds lam and tau; mean, std are the Normalize constants (tensors on the device). Used by
    the loop below and by tests/benchmark.py."""
    layout = layout or (torch.channels_last if mean.is_cuda else torch.contiguous_format)
    # Compiled (the default on a GPU): the network and, separately, apply_augment, whose ~290 small
    # operations each read and write the whole batch eagerly; inductor fuses the elementwise ones. The
    # random parameters stay eager, so a compiled run draws the very augmentations an eager run draws.
    # (`python tests/benchmark.py --stages 3` times both.) Under torchrun the network stays eager
    # (compiled_network says why).
    forward = compiled_network(net, compiled)
    augment_views = torch.compile(apply_augment) if compiled else apply_augment

    def train_step(idx, x, x3, step):
        B, H, W = x.shape[0], x.shape[2], x.shape[3]
        # [v1; v2; v3]: the real batch twice and one third positive per image, all augmented in one call
        # with independent parameters per image, so v1 and v2 (and a "-aug" v3) differ.
        raw = torch.cat([x, x] + ([x3] if x3 is not None else []))         # uint8 [V*B, 3, H, W]
        p = sample_augment_params(raw.shape[0] * WORLD_SIZE, H, W, x.device)   # augment() in two steps;
        p = own_rows(p, views=raw.shape[0] // B)                           # torchrun: this process's rows
        views = augment_views(raw, p, H, mean, std).contiguous(memory_format=layout)
        # One forward pass over all 3B images, so BatchNorm normalises v1, v2 and v3 together.
        with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
            z = forward(views)
        z = F.normalize(z.float(), dim=1)          # the losses in fp32, outside autocast
        z1, z2, z3 = z[:B], z[B:2 * B], (z[2 * B:] if x3 is not None else None)
        z1, z2, z3 = gather(z1), gather(z2), gather(z3)   # torchrun: the whole batch, every negative
        loss, l_simclr, l_clsp = total_loss(z1, z2, z3, s["lam"], s["tau"])
        optimiser_step(opt, scaler, loss, lr_at(step, s, steps_per_epoch))
        return dict(L_simclr=l_simclr.detach(), **({} if z3 is None else {term_name(s): l_clsp.detach()}))

    return train_step


class Queue:
    """A ring of L2-normalised embeddings of earlier batches, one per view ([views, Q, d]): MoCo's keys
    (two queues, the negatives of the other view's queries) and NNCLR's support set (one, of view 1). Each
    step's B embeddings replace the oldest B, at `ptr` (Q is a multiple of B, so a batch never wraps).
    Filled with random unit vectors at first, as MoCo and solo-learn's NNCLR start; `index` keeps the
    training index of each entry (-1: still random), so evaluate.py can read the labels of NNCLR's
    neighbours."""

    def __init__(self, views, Q, d, device):
        self.keys = F.normalize(torch.randn(views, Q, d, device=device), dim=2)
        self.index = torch.full((views, Q), -1, dtype=torch.long, device=device)
        self.ptr = 0

    def push(self, *keys, index=None):
        B = keys[0].shape[0]
        for v, k in enumerate(keys):
            self.keys[v, self.ptr:self.ptr + B] = k
        if index is not None:
            self.index[:, self.ptr:self.ptr + B] = index
        self.ptr = (self.ptr + B) % self.keys.shape[1]


# ---- MoCo-v2 (He et al. 2020; Chen et al. 2020b), the authors' second base ----------------------

def key_momentum_at(step, s, total_steps):
    """MoCo's key-encoder momentum m after step `step`: from key_momentum (0.99) up to key_momentum_end
    (0.999) on a half cosine over the run (the authors', after solo-learn's MoCo-v2+)."""
    m0, m1 = s["key_momentum"], s["key_momentum_end"]
    return m1 - (m1 - m0) * (math.cos(math.pi * step / total_steps) + 1) / 2


def make_moco_step(net, key_net, queue, opt, scaler, s, mean, std, steps_per_epoch, amp=None, compiled=False,
                   layout=None):
    """MoCo-v2's step: train_step(idx, x, x3, step) -> {"L_moco": ..., "L_clsp" (or "L_aug"): ...}. The
    query encoder net (backbone + head) learns; the key encoder key_net is its moving average,
    k <- m k + (1 - m) q after each step; queue (2 views) holds the keys of earlier batches. The CLSP
    term is the SimCLR one on the queries: lam * mean ||q1 - q3||^2, q3 the third positive's query."""
    layout = layout or (torch.channels_last if mean.is_cuda else torch.contiguous_format)
    query = compiled_network(net, compiled)                        # compiled as the SimCLR step is
    key = compiled_network(key_net, compiled)
    augment_views = torch.compile(apply_augment) if compiled else apply_augment
    q_weights, k_weights = list(net.parameters()), list(key_net.parameters())
    total_steps = s["epochs"] * steps_per_epoch

    def embed(encoder, v):
        with torch.autocast(v.device.type, dtype=amp, enabled=amp is not None):
            return F.normalize(encoder(v).float(), dim=1)

    def train_step(idx, x, x3, step):
        B, H, W = x.shape[0], x.shape[2], x.shape[3]
        raw = torch.cat([x, x] + ([x3] if x3 is not None else []))
        p = sample_augment_params(raw.shape[0] * WORLD_SIZE, H, W, x.device, **AUGMENT["moco"])   # MoCo's colours
        views = augment_views(raw, own_rows(p, raw.shape[0] // B), H, mean, std).contiguous(memory_format=layout)
        # One pass per view, so each view has its own BatchNorm statistics, as in the authors' code.
        q1, q2 = embed(query, views[:B]), embed(query, views[B:2 * B])
        with torch.no_grad():                      # the keys: no gradient, the encoder is an average
            k1, k2 = embed(key, views[:B]), embed(key, views[B:2 * B])
        q1, q2, k1, k2 = gather(q1), gather(q2), gather(k1), gather(k2)   # torchrun: the whole batch
        l_moco = moco_loss(q1, q2, k1, k2, queue.keys, s["tau"])
        losses = dict(L_moco=l_moco.detach())
        loss = l_moco
        if x3 is not None:
            l_third = clsp_loss(q1, gather(embed(query, views[2 * B:])))
            loss = loss + s["lam"] * l_third
            losses[term_name(s)] = l_third.detach()
        optimiser_step(opt, scaler, loss, lr_at(step, s, steps_per_epoch))
        # Only now, after the backward, what changes between steps (a compiled call that failed can be
        # repeated): the key encoder follows the query encoder, and this batch's keys enter the queue,
        # the negatives of the next batches, never of their own (torchrun: every process's keys, so
        # every process holds the same queue).
        m = key_momentum_at(step, s, total_steps)
        with torch.no_grad():
            torch._foreach_lerp_(k_weights, q_weights, 1 - m)          # k <- m k + (1 - m) q
        queue.push(k1, k2)
        return losses

    return train_step


# ---- NNCLR (Dwibedi et al. 2021), the paper's foil: the nearest neighbour as the positive ----------
# NNCLR replaces each view's embedding by its nearest neighbour in a support set of earlier embeddings,
# so the positive is another image that the network already finds close: an *easy* positive, and early
# in training often of another class. CLSP argues for hard synthetic positives instead; here the CLSP
# term can be added to NNCLR as to the other bases (CLSP-NNCLR, a combination no paper reports).

def make_nnclr_projector():
    """NNCLR's projector g: 512 -> 2048 -> 2048 -> 256, BatchNorm after every Linear, ReLU after the
    first two (solo-learn's). Its output z is what the support set stores and the CLSP term compares."""
    return nn.Sequential(nn.Linear(512, 2048), nn.BatchNorm1d(2048), nn.ReLU(inplace=True),
                         nn.Linear(2048, 2048), nn.BatchNorm1d(2048), nn.ReLU(inplace=True),
                         nn.Linear(2048, 256), nn.BatchNorm1d(256))


def make_nnclr_predictor():
    """NNCLR's predictor q: 256 -> 4096 -> 256 with BatchNorm + ReLU in its hidden layer. It takes the
    projection (before normalisation) and gives p, the side of each pair that receives the gradient."""
    return nn.Sequential(nn.Linear(256, 4096), nn.BatchNorm1d(4096), nn.ReLU(inplace=True), nn.Linear(4096, 256))


@torch.no_grad()
def nearest_neighbour(z, support):
    """NN(z): for each unit vector z_i [B, d], the support-set row [Q, d] of highest cosine (top-1), and its
    row number. No gradient flows through the search or the neighbour: it is data, as a view is."""
    row = (z @ support.T).argmax(dim=1)
    return support[row], row


def nnclr_loss(nn1, nn2, p1, p2, tau):
    """NNCLR's symmetric loss (solo-learn's): (CE(NN(z1) p2^T / tau) + CE(NN(z2) p1^T / tau)) / 2. Row i of
    NN(z1) p2^T holds the neighbour of view 1 of image i against the predictions of view 2 of every image
    in the batch; the positive is column i, the other B - 1 are the negatives. Inputs are normalised here."""
    def ce(nn_, p):
        logits = F.normalize(nn_, dim=1) @ F.normalize(p, dim=1).T / tau
        return F.cross_entropy(logits, torch.arange(p.shape[0], device=p.device))
    return (ce(nn1, p2) + ce(nn2, p1)) / 2


class LARS(torch.optim.Optimizer):
    """SGD with momentum and LARS (You et al. 2017), as solo-learn's CIFAR recipe runs it (clip_lr,
    biases and norms excluded). At a large batch one learning rate fits no layer: a layer whose gradient
    is large next to its weights takes too big a step. LARS scales each weight tensor's step by its trust
    ratio eta * ||w|| / (||g|| + wd ||w||), so each update moves a weight by about a fixed share of its
    own norm; clipped at 1 (min(ratio / lr, 1)) it only ever lowers the scheduled lr. Groups with
    lars False (biases and BatchNorm, lars_param_groups) take plain SGD with momentum and no decay."""

    def __init__(self, params, lr=0.0, momentum=0.9, weight_decay=1e-5, eta=0.02, eps=1e-8):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, eps=eps,
                                      lars=True))

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for w in g["params"]:
                if w.grad is None:
                    continue
                d = w.grad
                if g["lars"]:                      # torch.where, not `if`: no host sync per tensor
                    w_norm, g_norm = w.norm(), d.norm()
                    trust = g["eta"] * w_norm / (g_norm + g["weight_decay"] * w_norm + g["eps"])
                    scaled = (d + g["weight_decay"] * w) * (trust / g["lr"]).clamp(max=1)
                    d = torch.where((w_norm > 0) & (g_norm > 0), scaled, d)
                state = self.state[w]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = d.clone()
                else:
                    state["momentum_buffer"].mul_(g["momentum"]).add_(d)
                w.add_(state["momentum_buffer"], alpha=-g["lr"])


def lars_param_groups(modules):
    """LARS's two groups: weight tensors (adapted and decayed) and the 1-d biases and BatchNorm parameters
    (neither), solo-learn's exclude_bias_n_norm."""
    params = [w for m in (modules if isinstance(modules, (list, tuple)) else [modules]) for w in m.parameters()]
    return [dict(params=[w for w in params if w.ndim > 1], lars=True),
            dict(params=[w for w in params if w.ndim <= 1], lars=False)]


def make_nnclr_step(net, predictor, queue, opt, scaler, s, mean, std, steps_per_epoch, amp=None, compiled=False,
                    layout=None):
    """NNCLR's step: train_step(idx, x, x3, step) -> {"L_nnclr": ..., "L_clsp" (or "L_aug"): ...}. net is
    backbone + projector, predictor the predictor, queue (1 view) the support set, opt LARS. The CLSP
    term is the SimCLR one on the projections: lam * mean ||z1 - z3||^2."""
    layout = layout or (torch.channels_last if mean.is_cuda else torch.contiguous_format)
    forward = compiled_network(net, compiled)                     # compiled as the SimCLR step is
    predict = compiled_network(predictor, compiled)
    augment_views = torch.compile(apply_augment) if compiled else apply_augment

    def embed(v, with_prediction=True):
        """z = normalize(g(f(v))) and p = q(g(f(v))), one pass per view: BatchNorm per view (solo-learn's)."""
        with torch.autocast(v.device.type, dtype=amp, enabled=amp is not None):
            y = forward(v)
            p = predict(y).float() if with_prediction else None
        return F.normalize(y.float(), dim=1), p

    def train_step(idx, x, x3, step):
        B, H, W = x.shape[0], x.shape[2], x.shape[3]
        raw = torch.cat([x, x] + ([x3] if x3 is not None else []))
        p = sample_augment_params(raw.shape[0] * WORLD_SIZE, H, W, x.device, **AUGMENT["nnclr"])
        p["solarize"][:B * WORLD_SIZE] = False     # the asymmetric recipe: view 1 is never solarised
        views = augment_views(raw, own_rows(p, raw.shape[0] // B), H, mean, std).contiguous(memory_format=layout)
        (z1, p1), (z2, p2) = embed(views[:B]), embed(views[B:2 * B])
        z1, p1, z2, p2 = gather(z1), gather(p1), gather(z2), gather(p2)   # torchrun: the whole batch
        # Each view's positive: its nearest neighbour in the support set, paired with the other view's p.
        (nn1, _), (nn2, _) = nearest_neighbour(z1, queue.keys[0]), nearest_neighbour(z2, queue.keys[0])
        l_nnclr = nnclr_loss(nn1, nn2, p1, p2, s["tau"])
        losses = dict(L_nnclr=l_nnclr.detach())
        loss = l_nnclr
        if x3 is not None:
            l_third = clsp_loss(z1, gather(embed(views[2 * B:], with_prediction=False)[0]))
            loss = loss + s["lam"] * l_third
            losses[term_name(s)] = l_third.detach()
        optimiser_step(opt, scaler, loss, lr_at(step, s, steps_per_epoch))
        queue.push(z1.detach(), index=gather(idx))   # after the update, as MoCo's keys: never its own batch's
        return losses

    return train_step


# ---- The loop, the same for every base -------------------------------------------------------------

def third_positive(s, x_train, synthetic):
    """idx -> the third positives x3 of a batch, chosen once for the run: None for the plain base (lam 0),
    the images again for the "-aug" control (the step augments them into a third view), or for CLSP one
    of image i's K candidates, drawn afresh at every draw of i."""
    if s["lam"] == 0:
        return lambda idx: None
    if s["positive"] == "view":
        return lambda idx: x_train[idx]
    return lambda idx: pick_candidates(synthetic, idx)


def train(train_step, x_train, third, s, step, end_of_epoch, stop, progress):
    """Repeat the step until the last epoch, each on B real images in a seeded per-epoch order (so
    --resume sees the same order) and their third positives. end_of_epoch(step) prints the epoch's
    line and saves. Returns the step reached (earlier on Ctrl-C)."""
    order = EpochOrder(x_train.shape[0], s["batch_size"], s["seed"], x_train.device)
    steps_per_epoch, total_steps = order.steps_per_epoch, s["epochs"] * order.steps_per_epoch
    mine = this_process(s["batch_size"])                    # torchrun: this process's slice of each batch
    while step < total_steps:
        idx = order.batch(step)
        x3 = third(idx)                                     # drawn for the whole batch, as one process draws
        losses = train_step(idx[mine], x_train[idx[mine]], None if x3 is None else x3[mine], step)
        step += 1
        # ---- bookkeeping, at a step boundary, where weights, momentum and RNG agree ----
        progress.add(**losses)                              # summed on the device: no host sync
        stopping = stop.agreed()                            # Ctrl-C, SIGTERM (torchrun: in any process)
        if step % steps_per_epoch == 0:
            end_of_epoch(step)                              # a line (NaN stops the run), a checkpoint
        elif progress.due() or stopping:                    # a slow epoch (on a CPU) still prints every 30 s
            progress.line(step / steps_per_epoch)           # and a partial epoch is checked before its save
        if stop.requested:                                  # (end_of_epoch may ask for it: --stop-after-epoch)
            break
    return step


# ------------------------------------------------------------------------------------------------
# The kNN vote, for the monitor below and for evaluate.py: cosine similarity of L2-normalised backbone
# features; the k nearest training images vote for their class with weight exp(sim / T) (Wu et al. 2018).
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def features(backbone, x, mean, std, amp=None, batch_size=1024, prepare=None):
    """float32 backbone features [N, 512] of uint8 images x, in batches on the backbone's device.
    prepare(x_uint8) -> normalised float images; default: the Normalize of training, no augmentation."""
    prepare = prepare or (lambda xb: (xb.float() / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1))
    device = mean.device
    layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    out = []
    for i in range(0, x.shape[0], batch_size):
        xb = prepare(x[i:i + batch_size].to(device)).contiguous(memory_format=layout)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            out.append(backbone(xb).float())
    return torch.cat(out)


@torch.no_grad()
def knn_predict(f_query, f_train, y_train, num_classes, k, temp, exclude=None, chunk=1024):
    """Weighted kNN: class = argmax_c sum_{j in top-k(i)} exp(cos(f_i, f_j) / temp) [y_j = c].

    exclude[i] (optional) is a training index left out of query i's neighbours (an anchor, when the
    query is its own synthetic candidate: otherwise the anchor would vote for itself), or a row of
    indices, exclude [n, m], to leave out several.
    """
    f_train = F.normalize(f_train.float(), dim=1)
    if exclude is not None and exclude.dim() == 1:
        exclude = exclude[:, None]
    k = min(k, f_train.shape[0] - (0 if exclude is None else exclude.shape[1]))   # the tiny data: 64 images
    preds = []
    for i in range(0, f_query.shape[0], chunk):             # [chunk, N] similarities at a time
        sim = F.normalize(f_query[i:i + chunk].float(), dim=1) @ f_train.T
        if exclude is not None:
            sim.scatter_(1, exclude[i:i + chunk], -math.inf)
        sim_k, idx = sim.topk(k, dim=1)                      # the k most similar training images
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device)
        votes.scatter_add_(1, y_train[idx], (sim_k / temp).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds)


def make_knn_monitor(s, backbone, x_train, y_train, mean, std, C, amp):
    """monitor() -> the kNN top-1 on the test split with the backbone in eval mode (a quick look during
    training; evaluate.py does the real evaluation), or None when --knn-every is 0. The votes come from
    the labelled training split: the training images themselves, except on STL-10, whose unlabeled
    images have no labels to vote with; there the 5,000 labelled ones vote, as in evaluate.py."""
    if not s["knn_every"]:
        return None
    device = x_train.device
    if has_own_pretrain_split(s["dataset"]):
        x_train, y_train, _ = load_dataset(s["dataset"], s["data_dir"], "train", s["image_size"])
        x_train = x_train.to(device)
    x_test, y_test, _ = load_dataset(s["dataset"], s["data_dir"], "test", s["image_size"])
    x_test, y_test, y_train = x_test.to(device), y_test.to(device), y_train.to(device)

    def monitor():
        was_training = backbone.training
        backbone.eval()
        f_train, f_test = (features(backbone, x, mean, std, amp) for x in (x_train, x_test))
        backbone.train(was_training)
        pred = knn_predict(f_test, f_train, y_train, C, s["knn_k"], s["knn_T"])
        return (pred == y_test).float().mean().item()
    return monitor


# ------------------------------------------------------------------------------------------------
# The command line, and the glue: the data, the candidates, the model, the checkpoint.
# ------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Stage 3 of CLSP: SimCLR, MoCo-v2 or NNCLR + synthetic positives on a "
                                            "ResNet-18.")
    add = settings_adder(p, DEFAULTS, PRESETS)
    add("--dataset", "cifar10 | cifar100 | stl10 | folder (default: the synthetic set's, or without one the one "
                     "in runs/)")
    add("--data-dir", "where the data set is (default: the synthetic set's, or without one the one in runs/)")
    add("--image-size", "image size (default: the synthetic set's, or without one the one in runs/)", type=int)
    add("--seed", "random seed", type=int)
    add("--stem", "cifar | mid: the ResNet's first layers; mid keeps the max-pool (STL-10's standard)")
    add("--base", "simclr | moco | nnclr: the contrastive method the third positive is added to")
    add("--positive", "synthetic | view: the third positive, a synthetic candidate (CLSP) or another augmented "
                      "view of the real image (the '-aug' control, no synthetic data)")
    add("--lam", "weight lambda of the third positive's term; 0 = the plain base; MoCo's standard: 0.5", type=float)
    add("--tau", "temperature of NT-Xent (SimCLR), InfoNCE (MoCo) or NNCLR's loss", type=float)
    add("--epochs", "training epochs (authors: 1000)", type=int)
    add("--batch-size", "real images per step; 3 views each; MoCo's standard: 512, NNCLR's: 256", type=int)
    add("--lr", "learning rate AT BATCH 1024; the run uses lr * batch / 1024 (linear scaling, Goyal et al. "
                "2017); MoCo's standard: 0.6 (the authors' 0.3 at batch 512), NNCLR's: 1.6 (solo-learn's 0.4 at "
                "batch 256)", type=float)
    add("--weight-decay", "SGD: on all parameters; NNCLR's LARS: not on biases and BatchNorm; NNCLR's "
                          "standard: 1e-5", type=float)
    add("--warmup-epochs", "linear warm-up, then cosine to 0", type=int)
    add("--queue", "MoCo: keys in each of the two queues; NNCLR: projections in the support set (standard "
                   "65536); a multiple of --batch-size", type=int)
    add("--key-momentum", "MoCo: the key encoder's momentum m at the start, in [0, 1)", type=float)
    add("--key-momentum-end", "MoCo: m at the end, reached on a half cosine", type=float)
    add("--lars-eta", "NNCLR: LARS's trust coefficient eta", type=float)
    add("--synthetic", "stage 2's candidate set")
    add("--candidates-on", "auto | gpu | host: where the candidates live while training; host = pinned memory, "
                           "each batch's picks copied to the GPU (auto: the GPU when they fit in half its free memory)")
    add("--knn-every", "print a quick kNN top-1 on the test split every N epochs; 0: never", type=int)
    add_run_flags(p, "the network and the augmentation")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out to its final epoch")
    p.add_argument("--out", default="runs/clsp.pt", help="the checkpoint / artifact to write (default: %(default)s)")
    # For tests of --resume: behave exactly as if Ctrl-C were pressed right after epoch N is saved.
    p.add_argument("--stop-after-epoch", type=int, help="act as if interrupted after epoch N (to try --resume)")
    return p.parse_args(argv)


def base_settings(s, explicit, preset):
    """The base's own defaults (BASES: MoCo's lam 0.5, lr 0.6, batch 512; NNCLR's LARS recipe), under the
    preset and the flags given."""
    if s["base"] not in BASES:
        fail(f"unknown --base {s['base']!r}; choose simclr, moco or nnclr")
    s.update({k: v for k, v in BASES[s["base"]].items() if k not in explicit and k not in PRESETS[preset]})


def shorten_warmup(s, explicit):
    """A shortened run (--epochs 5) keeps warm-up to a tenth of it, as the authors' 10 of 1000 epochs."""
    if "warmup_epochs" not in explicit:
        s["warmup_epochs"] = min(s["warmup_epochs"], max(1, s["epochs"] // 10))


def data_set_settings(s, explicit, preset):
    """Once the data set is known: its own recipe (DATASETS) and its base's (DATASET_BASES: MoCo on STL-10),
    each under the preset and the flags given."""
    own = DATASET_BASES.get(s["dataset"], {}).get(s["base"], {})
    s.update({k: v for k, v in own.items() if k not in explicit and k not in PRESETS[preset]})
    dataset_settings(s, explicit, preset, DATASETS, PRESETS)


def check_settings(s, explicit):
    for k in ["image_size", "epochs", "batch_size"]:
        if s[k] < 1:
            fail(f"--{k.replace('_', '-')} must be a positive whole number, got {s[k]}")
    if s["batch_size"] < 2:
        fail("--batch-size must be at least 2: the loss needs other images in the batch as negatives")
    require_divisible(s["batch_size"])          # torchrun: one equal slice of each batch per process
    if not 0 <= s["warmup_epochs"] <= s["epochs"]:
        fail(f"--warmup-epochs must be between 0 and --epochs ({s['epochs']}), got {s['warmup_epochs']}")
    if s["knn_every"] < 0:
        fail(f"--knn-every must be 0 (never) or a positive number of epochs, got {s['knn_every']}")
    for k in ["lr", "tau"]:
        if not (s[k] > 0 and math.isfinite(s[k])):
            fail(f"--{k} must be a positive number, got {s[k]}")
    for k in ["lam", "weight_decay"]:
        if not (s[k] >= 0 and math.isfinite(s[k])):
            fail(f"--{k.replace('_', '-')} must be zero or a positive number, got {s[k]}")
    if s["stem"] not in STEMS:
        fail(f"unknown --stem {s['stem']!r}; choose cifar (32 px) or mid (64 px: the max-pool kept)")
    if s["candidates_on"] not in ("auto", "gpu", "host"):
        fail(f"unknown --candidates-on {s['candidates_on']!r}; choose auto, gpu or host")
    if s["positive"] not in ("synthetic", "view"):
        fail(f"unknown --positive {s['positive']!r}; choose synthetic (CLSP) or view (the '-aug' control)")
    if s["positive"] == "view" and "synthetic" in explicit:
        fail("--positive view takes another augmented view of the real image as the third positive and "
             "reads no synthetic set; drop --synthetic, or use --positive synthetic")
    if s["base"] in ("moco", "nnclr"):
        B, Q = s["batch_size"], s["queue"]
        if Q < B or Q % B:
            what = "keys replace the oldest in the queue" if s["base"] == "moco" else \
                "projections replace the oldest in the support set"
            fail(f"--queue {Q} must be a multiple of --batch-size {B}: each step's {B} {what}; "
                 f"pass --queue {max(B, round(Q / B) * B)}")
    if s["base"] == "nnclr" and not (s["lars_eta"] > 0 and math.isfinite(s["lars_eta"])):
        fail(f"--lars-eta must be a positive number (LARS's trust coefficient; NNCLR's: 0.02), got {s['lars_eta']}")
    if s["base"] == "moco":
        for k in ["key_momentum", "key_momentum_end"]:
            if not 0 <= s[k] < 1:
                fail(f"--{k.replace('_', '-')} must be in [0, 1) (the key encoder keeps that share of its "
                     f"weights each step), got {s[k]}")


def main(argv=None):
    args = parse_args(argv)
    s, explicit = resolve_settings(args, DEFAULTS, PRESETS)
    ckpt = None
    if args.resume:           # the checkpoint's own settings rule, so the run ends where it would have
        ckpt, s = load_for_resume(args.out, "backbone", explicit, FREE_ON_RESUME,
                                  command("clsp.py", args, "--out", args.out), DEFAULTS)
        if ckpt["finished"]:
            print(f"{args.out} already finished all {ckpt['epoch']} epochs; nothing to do", flush=True)
            return
    else:
        base_settings(s, explicit, args.preset)
        shorten_warmup(s, explicit)
    check_settings(s, explicit)                 # a mistake is said before a candidate set is looked for
    uses_candidates = s["lam"] > 0 and s["positive"] == "synthetic"   # CLSP; otherwise no synthetic data
    syn = load_candidates(s, explicit, ckpt, args) if uses_candidates else None
    from_artifact = uses_candidates or (ckpt is None and take_data_from_artifacts(s, explicit))
    if ckpt is None:
        # The data set is known now: its own recipe (STL-10's), except the image size an artifact fixed.
        given = {**explicit, **({"image_size": s["image_size"]} if from_artifact else {})}
        data_set_settings(s, given, args.preset)
        shorten_warmup(s, explicit)
        check_settings(s, explicit)             # again, with the data set's values
    method = method_name(s)
    x_train, y_train, classes, info = training_images(s, syn, ckpt, args)
    # Every check has passed: the device, and under torchrun the process group (common.start_processes).
    device = start_processes(args.device, None if args.resume else args.preset)   # resumed: its own settings

    # No other run writes it until this one ends; Ctrl-C stops at the end of a step and saves.
    with claim_output(args.out), StopFlag(resume_hint("clsp.py", args)) as stop:
        if ckpt is None:
            refuse_to_overwrite(args.out, f"continue it with {command('clsp.py', args, '--resume', '--out', args.out)}")
        N, B, V = x_train.shape[0], s["batch_size"], 2 if s["lam"] == 0 else 3   # views: v1, v2 (+ v3)
        # The whole data set on the device as uint8: CIFAR-10 is 150 MB, its K = 8 candidates 1.2 GB (STL-10
        # at 64 px: 1.2 GB and 9.8 GB; place_candidates keeps those on the host when they do not fit).
        norm = channel_stats(x_train)             # the Normalize constants, of the real training images
        mean, std = (torch.tensor(v, device=device) for v in norm)
        x_train = x_train.to(device)
        synthetic, where = place_candidates(syn["images"], device, s["candidates_on"]) if uses_candidates \
            else (None, None)
        if where:
            print(where, flush=True)
        net, extra, queue, opt, scaler, amp, step = make_model(s, args, device, ckpt)   # extra: MoCo's key
        backbone, head = net                                                           # encoder, NNCLR's predictor
        knn_monitor = make_knn_monitor(s, backbone, x_train, y_train, mean, std, len(classes), amp) if MAIN else None
        print(f"{method}: {N} training images of {info['dataset']} at {info['image_size']}px; lam {s['lam']}, "
              f"tau {s['tau']}, {V} views per image, stem {s['stem']}" + (f", K = {synthetic.shape[1]} candidates each" if
              uses_candidates else "") + f"; device {device}, autocast {amp or 'off (fp32)'}", flush=True)
        compiled = compile_enabled(args.compile, device)
        steps_per_epoch = N // B                  # drop_last: every step sees a full batch

        def make_step(compiled):                  # the base is chosen here, once: the loop never asks
            if s["base"] == "moco":
                return make_moco_step(net, extra, queue, opt, scaler, s, mean, std, steps_per_epoch, amp, compiled)
            if s["base"] == "nnclr":
                return make_nnclr_step(net, extra, queue, opt, scaler, s, mean, std, steps_per_epoch, amp, compiled)
            return make_train_step(net, opt, scaler, s, mean, std, steps_per_epoch, amp, compiled)
        train_step = make_step(compiled)
        if compiled:          # a compile or CUDA-graph failure on this GPU: one sentence, then eager
            train_step = with_eager_fallback(train_step, lambda: make_step(False), "training step", device,
                                             modules=[m for m in (net, extra) if m is not None])
        # a checkpoint holds the weights and the optimiser's momentum, and the base's own parts
        require_free_space(args.out, tensor_bytes(net.state_dict().values()) + tensor_bytes(net.parameters()) +
                           tensor_bytes(t for t in base_state(s, extra, queue).values() if torch.is_tensor(t)) +
                           (0 if extra is None else tensor_bytes(extra.state_dict().values())))
        peak = peak_flops(device)
        progress = Progress(s["epochs"], step // steps_per_epoch, "epoch", V * B * steps_per_epoch,
                            peak and steps_per_epoch * flops_per_step(net, V, B, s["image_size"], device,
                                                                      key_views=2 if s["base"] == "moco" else 0), peak,
                            warming=compiled, on_nan=f"the last good checkpoint {args.out} (if any) is kept; "
                                                     f"start a new run with a lower --lr")

        def save(step):                           # torchrun: rank 0 writes, the others wait for the file
            if MAIN:
                atomic_save(dict(backbone=backbone.state_dict(), head=head.state_dict(), epoch=step // steps_per_epoch,
                                 step=step, settings=s, method=method, data=info, classes=classes,
                                 synthetic=made_from(syn, s["synthetic"]) if uses_candidates else None,
                                 norm=dict(mean=norm[0], std=norm[1]), finished=step == s["epochs"] * steps_per_epoch,
                                 num_params=dict(backbone=sum(p.numel() for p in backbone.parameters()),
                                                 head=sum(p.numel() for p in head.parameters())),
                                 **base_state(s, extra, queue), **training_state(opt, scaler, device)), args.out)
            barrier()

        def end_of_epoch(step):
            done = step // steps_per_epoch
            metrics = dict(lr=f"{lr_at(step - 1, s, steps_per_epoch):.2e}")
            if knn_monitor and (done % s["knn_every"] == 0 or done == s["epochs"]):
                with progress.doing("the kNN check"):   # seconds to minutes of features: heartbeat lines
                    metrics["kNN"] = f"{100 * knn_monitor():.2f}%"
            if progress.warmup == "compiling":   # speed and time left from the second epoch on
                progress.warmed_up(done, "compile + first epoch")
            progress.line(done, **metrics)        # stops the run if a loss is not finite: nothing saved
            save(step)
            if done == args.stop_after_epoch and done < s["epochs"]:
                stop.requested = True             # as if Ctrl-C were pressed now (to try --resume)

        if compiled:
            print(f"compiling the training step (the first steps take "
                  f"{'about a minute' if device.type == 'cuda' else 'minutes on a CPU'})...", flush=True)
        net.train()
        third = third_positive(s, x_train, synthetic)   # chosen once: the loop never asks which positive
        step = train(train_step, x_train, third, s, step, end_of_epoch, stop, progress)
        if stop.requested and step < s["epochs"] * steps_per_epoch:   # (a stop in the last step: finished)
            save(step)                            # at a step boundary: weights, momentum and RNG agree
            raise SystemExit(f"interrupted at step {step} (epoch {step / steps_per_epoch:.2f}/{s['epochs']}); saved "
                             f"{args.out}: continue with {command('clsp.py', args, '--resume', '--out', args.out)}")
    print(f"wrote {args.out} ({method}, {s['epochs']} epoch{'s' * (s['epochs'] != 1)})", flush=True)


def load_candidates(s, explicit, ckpt, args):
    """Stage 2's candidate set. The data set, its directory and image size not given as flags are
    taken from it, so `python clsp.py` just works after `python generate.py`."""
    path = s["synthetic"]
    make_candidates = command("generate.py", args, out=path, default_out="runs/synthetic.pt")
    syn = load_artifact(path, ("images", "data", "settings", "ddpm"), "a generate.py candidate set", make_candidates,
                        mmap=True)             # read where they go (place_candidates), not into memory first
    if ckpt is None:
        s.update({k: v for k, v in artifact_data_settings(syn).items() if k not in explicit})
    for k in ("dataset", "image_size"):
        if syn["data"][k] != s[k]:
            new = f"{os.path.splitext(path)[0]}_{s[k]}.pt"     # runs/synthetic_cifar100.pt, runs/synthetic_16.pt
            fail(f"{path} holds synthetic positives for {k.replace('_', ' ')} {syn['data'][k]}, but this run "
                 f"asks for {s[k]}; make candidates for that data first with {command('generate.py', args, out=new)} "
                 f"and pass --synthetic {new}, drop --{k.replace('_', '-')}, or train the SimCLR baseline with --lam 0")
    if ckpt is not None and {**ckpt["synthetic"], "path": path} != made_from(syn, path):   # it may move
        fail(f"{args.out} was trained with another synthetic set than {path}; point --synthetic at the "
             f"one it used, or start a new run without --resume")
    return syn


def artifact_data_settings(art):
    """The data set, folder and image size a generate.py or ddpm.py artifact was made from."""
    data_dir = art["settings"].get("data_dir") or art.get("ddpm", {}).get("settings", {}).get("data_dir")
    return dict(dataset=art["data"]["dataset"], image_size=art["data"]["image_size"], data_dir=data_dir)


def take_data_from_artifacts(s, explicit):
    """A run without candidates (lam 0, or the "-aug" control) and no data flags: train on the data of the
    candidate set or the DDPM in the same folder, when there is one, so the baselines and controls see the
    very images CLSP sees; say where it came from. Returns whether it took them from an artifact."""
    if {"dataset", "data_dir", "image_size"} & explicit.keys():
        return False
    for path in (s["synthetic"], os.path.join(os.path.dirname(s["synthetic"]), "ddpm.pt")):
        if not os.path.exists(path):
            continue                              # not there: try the next
        try:
            art = torch.load(path, map_location="cpu", weights_only=True, mmap=True)   # reads no pixels
            s.update(artifact_data_settings(art))
        except Exception as e:
            fail(f"{path} is there but is not a readable artifact ({type(e).__name__}), so the data it was made "
                 f"from is unknown; delete it, or pass --dataset and --data-dir to say which data to train on")
        print(f"data: {s['dataset']} in {s['data_dir']} at {s['image_size']}px, as in {path} "
              f"(pass --dataset / --data-dir to choose another)", flush=True)
        return True
    return False


def training_images(s, syn, ckpt, args):
    """The training split, with what the checkpoint records of it; refused unless it is the very data
    (same fingerprint) the candidates were made from and a resumed run was trained on."""
    x_train, y_train, classes = load_dataset(s["dataset"], s["data_dir"], "pretrain", s["image_size"])
    info = data_info(s["dataset"], x_train, y_train, classes)   # STL-10: the unlabeled split, its pixels
    if ckpt is not None:
        require_same_data(info, ckpt["data"], f"{args.out} was trained on",
                          "point --data-dir at the original data or start a new run without --resume")
    if syn is not None:
        require_same_data(info, syn["data"], f"{s['synthetic']} was made from",
                          f"point --data-dir at the data it was made from, or delete it and run "
                          f"{command('generate.py', args, out=s['synthetic'], default_out='runs/synthetic.pt')} again")
        if syn["images"].shape[0] != x_train.shape[0]:
            fail(f"{s['synthetic']} has candidates for only {syn['images'].shape[0]} of the {x_train.shape[0]} "
                 f"training images (made with --num-anchors?); CLSP needs them for every image: run "
                 f"`python generate.py` without --num-anchors, or train the SimCLR baseline with --lam 0")
    if s["batch_size"] > x_train.shape[0]:
        fail(f"--batch-size {s['batch_size']} is larger than the {x_train.shape[0]} training images; "
             f"pass a smaller --batch-size")
    return x_train, y_train, classes, info


def make_model(s, args, device, ckpt):
    """The ResNet-18 and its head (net = Sequential(backbone, head)); the base's own parts, `extra` and
    `queue` (MoCo: the key encoder and its two queues; NNCLR: the predictor and the support set; SimCLR:
    None); the optimiser (SGD, or NNCLR's LARS), the fp16 loss scaler and the autocast dtype; from the
    checkpoint when resuming. Returns them and the step to start from."""
    torch.manual_seed(s["seed"])
    # channels_last (NHWC) is the layout tensor cores want on a GPU; on a CPU plain NCHW measured faster.
    layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    head = make_nnclr_projector() if s["base"] == "nnclr" else make_head()
    net = nn.Sequential(make_backbone(s.get("stem", "cifar")), head).to(device, memory_format=layout)
    net = sync_batchnorm(net)   # torchrun: BatchNorm over the whole batch, as in one process (common.py)
    extra = queue = None
    if s["base"] == "moco":   # the key encoder starts as a copy of the query encoder and never learns itself
        extra = copy.deepcopy(net).requires_grad_(False)
        queue = Queue(2, s["queue"], head[-1].out_features, device)
    if s["base"] == "nnclr":
        extra = sync_batchnorm(make_nnclr_predictor().to(device))
        queue = Queue(1, s["queue"], head[-1].num_features, device)
        opt = LARS(lars_param_groups([net, extra]), momentum=s["momentum"], weight_decay=s["weight_decay"],
                   eta=s["lars_eta"])
    else:   # SGD with weight decay on every parameter, BatchNorm and biases included (the authors' recipe)
        opt = torch.optim.SGD(net.parameters(), lr=0.0, momentum=s["momentum"], weight_decay=s["weight_decay"])
    # Autocast: bf16 on recent GPUs, fp16 + loss scaling on older ones (common.autocast_dtype says why).
    amp = autocast_dtype(args.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    step = 0
    if ckpt is not None:
        net[0].load_state_dict(ckpt["backbone"])
        net[1].load_state_dict(ckpt["head"])
        if extra is not None:
            extra.load_state_dict(ckpt[EXTRA_NAME[s["base"]]])
            queue.keys.copy_(ckpt["queue"])
            queue.index.copy_(ckpt.get("queue_index", queue.index))
            queue.ptr = ckpt["queue_ptr"]
        step = restore_training_state(ckpt, opt, scaler, device)
        print(f"resuming {args.out} at epoch {ckpt['epoch']}/{s['epochs']} (step {step})", flush=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True     # fixed shapes: let cuDNN pick its fastest kernels
    millions = lambda m: f"{sum(p.numel() for p in m.parameters()) / 1e6:.2f} M"
    parts = {"simclr": lambda: "",
             "moco": lambda: f", and a key encoder of the same size; 2 queues of {s['queue']} keys",
             "nnclr": lambda: f" + predictor {millions(extra)}; a support set of {s['queue']} projections; LARS"}
    print(f"ResNet-18 {millions(net[0])} + head {millions(net[1])} parameters" + parts[s["base"]](), flush=True)
    return net, extra, queue, opt, scaler, amp, step


EXTRA_NAME = {"moco": "key", "nnclr": "predictor"}   # the checkpoint key of each base's extra module


def base_state(s, extra, queue):
    """What a checkpoint holds beyond the backbone and head: MoCo's key encoder and queues, NNCLR's
    predictor and support set (with the training index of each entry)."""
    if extra is None:
        return {}
    return {EXTRA_NAME[s["base"]]: extra.state_dict(), "queue": queue.keys,
            "queue_index": queue.index, "queue_ptr": queue.ptr}


def flops_per_step(net, V, B, image_size, device, key_views=0):
    """FLOPs of one training step (forward + backward of V views; MoCo: and a forward of key_views views
    through the key encoder), for the MFU on a known GPU: counted on a copy (so BatchNorm's running
    statistics are not nudged) with 2 images per view, scaled to the batch."""
    m, x = copy.deepcopy(net), torch.zeros(2 * V, 3, image_size, image_size, device=device)
    flops = count_flops(lambda: m(x).sum().backward())
    with torch.no_grad():
        flops += count_flops(lambda: m(x[:2 * key_views])) if key_views else 0
    return flops / 2 * B


def made_from(syn, path):
    """What runs/clsp.pt records of its synthetic set (the data directory may move, so it is left out)."""
    return dict(path=path, settings={k: v for k, v in syn["settings"].items() if k != "data_dir"},
                ddpm_step=syn["ddpm"]["step"])


if __name__ == "__main__":
    run_main(main, sys.argv[1:], "rerun with a smaller --batch-size (the learning rate scales with it; "
                                 "a saved checkpoint is kept)",
             "an epoch saved in --out is kept (continue it with --resume); with none saved yet, run the same "
             "command again")
