"""Stage 4 of CLSP: how good is the frozen backbone? kNN and linear-probe accuracy, plus a look at the positives.

A self-supervised backbone is judged by what a very simple classifier can read off its frozen 512-d
features. CLSP reports both of the usual classifiers; we follow the authors' recipe:

  kNN     cosine similarity of L2-normalised features; the k nearest training images vote for their class
          with weight exp(sim / T) (Wu et al. 2018). Headline k = 200, T = 0.1, fixed in advance. The
          authors report the best k in {5..200} at T = 0.07 *chosen on the test set*, which is
          optimistic; we print that grid too (at their T = 0.07), labelled so, never as the headline.
  linear  one Linear(512, classes) on the frozen features, SGD lr 1.0, no momentum, no weight decay,
          batch 256, 100 epochs, lr x0.1 at epochs 60 and 80, horizontal flips as the only augmentation;
          the last epoch's test top-1. The backbone never changes, so we compute the features of every
          training image and of its mirror image once, and each epoch pick one of the two per image with
          p 0.5: exactly the authors' protocol, without 100 passes through a ResNet.

When runs/synthetic.pt is there, it also measures the synthetic positives, each augmented as in training:
how close a view of a candidate is to a view of its anchor (cosine) next to how close two views of the
anchor are (how *hard* the positives are), and how often a candidate's kNN class is its anchor's label
next to how often a view's is (how often it is a *true* positive).
That share is judged in the space of an independent backbone, the SimCLR baseline (lam = 0) that never
saw a candidate (--judge, by default runs/clsp_lam0.pt when there is one), beside the same share for
augmented views: a CLSP backbone, trained to pull candidates to their anchors, would flatter them.
Beside both, the same two numbers for the positive that nearest-neighbour methods (NNCLR) take instead,
the training image nearest to a view of the anchor, with its true label: the paper's case is that such
a neighbour is an *easy* positive and, early in training, often of another class.

Any of clsp.py's nine methods (SimCLR, MoCo-v2 and NNCLR, each plain, "-aug" and CLSP) is evaluated the
same way: the query encoder's backbone for MoCo. For an NNCLR checkpoint the neighbour row is read twice:
from the training set, as for every method, and from the checkpoint's own support set, the neighbours its
training took. The closing table names each run by its method.

    python evaluate.py                               # runs/clsp.pt on its own data set, all numbers
    python evaluate.py --dataset cifar100            # transfer: a CIFAR-10 backbone probed on CIFAR-100
    python evaluate.py --checkpoint runs/clsp_lam0.pt --out runs/eval_lam0.json   # the SimCLR baseline
    python evaluate.py --preset tiny --dataset folder --data-dir DIR              # seconds on a CPU
    python evaluate.py --checkpoint runs/clsp_stl10.pt                # STL-10: probe on train, test on test
    python evaluate.py --checkpoint runs/clsp_stl10.pt --dataset cifar10   # transfer, CIFAR resized to 64 px

On STL-10 the backbone learnt from the 100,000 unlabeled images; the kNN votes and the probe come from the
5,000 labelled training images and are tested on the 8,000 test images, all at the backbone's 64 px. A
transfer to CIFAR-10 or CIFAR-100 resizes their images to the backbone's size.

Reads:  runs/clsp.pt (--checkpoint), the images of --dataset (default: the checkpoint's own),
        runs/synthetic.pt (--synthetic; optional, only for the diagnostics), runs/clsp_lam0.pt (--judge;
        optional, the diagnostics' independent judge).
Writes: runs/eval.json (--out): every number, the settings, and what it was made from; prints a table,
        and, when runs/ holds several results, all of them as one Markdown table.
Time:   the tiny preset takes 4.0 s on a 2-core CPU. On a GPU the cost is one forward pass over 110,000
        CIFAR images plus ~20,000 tiny probe steps (not yet measured on its own).
"""

import argparse
import glob
import json
import math
import os
import sys
import time

# common.py first: it turns a Ctrl-C while PyTorch loads (seconds) into one sentence, not a traceback.
from common import (WORLD_SIZE, Progress, add_run_flags, atomic_write, autocast_dtype, claim_output, command, data_info, fail,
                    has_own_pretrain_split, load_artifact, load_dataset, pick_device, resolve_settings, run_main,
                    settings_adder)

import torch
import torch.nn as nn
import torch.nn.functional as F

# Stage 3's method, written once in clsp.py: the ResNet-18, its augmentation and normalisation, and the kNN vote.
from clsp import (augment, channel_stats, features, knn_predict, make_backbone, make_nnclr_projector, method_name,
                  nearest_neighbour)

# ------------------------------------------------------------------------------------------------
# Settings. The protocols are the same in every preset but `tiny`; they are cheap on features.
# ------------------------------------------------------------------------------------------------

DEFAULTS = dict(
    dataset=None, data_dir=None, image_size=None,   # None: the data the backbone was trained on
    seed=0,
    knn_k=200, knn_temp=0.1,                        # fixed in advance (authors: best k on test, T 0.07)
    probe_epochs=100, probe_batch_size=256, probe_lr=1.0,
    probe_lr_drops=(0.6, 0.8),                      # lr x0.1 after 60% and 80% of the epochs (60, 80)
    batch_size=1024,                                # images per backbone pass when computing features
    diag_anchors=2000,                              # anchors whose candidates are measured (x K images)
    log_every=10,                                   # probe epochs between progress lines
)
PRESETS = {
    "tiny": dict(probe_epochs=5, probe_batch_size=16, batch_size=64, diag_anchors=8, log_every=1),
    "quick": dict(),      # the full protocol: cheap on precomputed features
    "standard": dict(),
    "paper": dict(),
}
KNN_GRID = (5, 10, 20, 50, 100, 200)   # the authors' search over k, shown only as "chosen on the test set"
KNN_GRID_TEMP = 0.07                   # ... at the authors' temperature, so the two can be compared


# ------------------------------------------------------------------------------------------------
# The linear probe (the kNN vote is clsp.knn_predict). It takes features already on the device; its
# only host syncs are the progress lines' (every --log-every epochs), so no step waits for the GPU.
# ------------------------------------------------------------------------------------------------

def probe_lr(epoch, epochs, lr=1.0, drops=(0.6, 0.8)):
    """The probe's learning rate in epoch `epoch` (1..epochs): lr, then x0.1 after each fraction in
    `drops` of the epochs: epochs 1-60 lr, 61-80 lr / 10, 81-100 lr / 100 for the authors' 100."""
    return lr * 0.1 ** sum(epoch > round(f * epochs) for f in drops)


def linear_probe(f_train, f_train_flip, y_train, f_test, y_test, num_classes, epochs=100, batch_size=256,
                 lr=1.0, lr_drops=(0.6, 0.8), seed=0, log_every=10):
    """The authors' linear evaluation on frozen, precomputed features. Returns (test top-1 %, last loss).

    f_train_flip[i] is the feature of training image i mirrored, so choosing it with p 0.5 each epoch
    *is* the authors' RandomHorizontalFlip. Raw backbone features, as in the authors' linear evaluation
    (no normalisation, no BatchNorm in front of the Linear).
    """
    device = f_train.device
    N = f_train.shape[0]
    torch.manual_seed(seed)                                  # the Linear's initialisation
    probe = nn.Linear(f_train.shape[1], num_classes).to(device)   # PyTorch's default init, as the authors'
    g = torch.Generator(device).manual_seed(seed)            # flips and order drawn on the device
    progress = Progress(epochs, 0, "probe epoch", N)
    for epoch in range(1, epochs + 1):
        lr_now = probe_lr(epoch, epochs, lr, lr_drops)       # epochs 1-60: lr, 61-80: lr/10, 81-100: lr/100
        flip = torch.rand(N, 1, device=device, generator=g) < 0.5
        f_epoch = torch.where(flip, f_train_flip, f_train)  # this epoch's augmented training set
        perm = torch.randperm(N, device=device, generator=g)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)
        for i in range(0, N, batch_size):                    # the last batch may be smaller, as in a DataLoader
            idx = perm[i:i + batch_size]
            logits = probe(f_epoch[idx])
            loss = F.cross_entropy(logits, y_train[idx])
            loss.backward()
            with torch.no_grad():                            # plain SGD: no momentum, no weight decay, so
                for p in probe.parameters():                 # torch.optim.SGD would do just this
                    p -= lr_now * p.grad
                    p.grad = None
            loss_sum += loss.detach() * idx.shape[0]
            correct += (logits.argmax(1) == y_train[idx]).sum()
        if epoch % log_every == 0 or epoch == epochs:        # the only host syncs: once per log line
            progress.line(epoch, loss=loss_sum.item() / N, train_top1=f"{100 * correct.item() / N:.2f}%",
                          lr=f"{lr_now:.0e}")
    last_loss = loss_sum.item() / N
    if not math.isfinite(last_loss):
        fail(f"the linear probe's loss became {last_loss}; try a smaller --probe-lr")
    with torch.no_grad():
        top1 = 100 * (probe(f_test).argmax(1) == y_test).float().mean().item()
    return top1, last_loss


# ------------------------------------------------------------------------------------------------
# kNN accuracy, and the diagnostics of the positives: how hard, how often true, beside views and neighbours.
# ------------------------------------------------------------------------------------------------

def knn_accuracy(f_test, f_train, data, k, temp):
    pred = knn_predict(f_test, f_train, data["y_train"], data["C"], k, temp)
    return 100 * (pred == data["y_test"]).float().mean().item()


def diagnose_candidates(syn, backbone, f_train, judge, data, s, amp, base="simclr", support=None):
    """How hard the candidates are and how often they are true positives, like for like: each candidate
    is augmented with clsp.py's own pipeline, as in training, and set beside an augmented view of its
    anchor. Hard: the cosine of a view of the anchor and its candidate, beside that of two views of the
    anchor. True: the share of candidates whose kNN class among the real training images (their own
    anchor left out) is the anchor's label, beside the same share for a view of the anchor; read in the
    evaluated backbone's space and, when there is one, in the independent judge's.

    And the positive that nearest-neighbour methods (NNCLR) use instead: the training image nearest to a
    view of the anchor in this backbone's space (the anchor left out), measured the same way, a view of
    it beside a view of the anchor, with its true label too. The paper's point: such a neighbour is an
    easy positive (close already) and, early in training, often of another class.

    For an NNCLR checkpoint (support: its projector's weights and its support set, with the training
    index of each entry), also the neighbour its training actually took: the support-set entry nearest to
    the projection of view 1 of the anchor, read as the training image it came from (one saved at most an
    epoch earlier, possibly the anchor itself)."""
    images, y_train, device = syn["images"], data["y_train"], data["x_train"].device
    K = images.shape[1]
    g = torch.Generator().manual_seed(s["seed"])         # a random subset of anchors, fixed by --seed
    pick = torch.randperm(images.shape[0], generator=g)[:s["diag_anchors"]].sort().values
    anchor = syn["anchor_index"][pick].to(device)        # training index of each picked anchor
    anchor_k = anchor.repeat_interleave(K)               # ... once per candidate
    x_anchor, cand = data["x_train"][anchor], images[pick].flatten(0, 1).to(device)   # n and n*K images
    feats = lambda net, x, prepare=None: features(net, x, data["mean"], data["std"], amp, s["batch_size"], prepare)

    def views(x, seed):
        """Features of augmented views of x, the same draws for every backbone (a generator per call)."""
        g_aug = torch.Generator(device).manual_seed(seed)
        return lambda net: feats(net, x, lambda xb: augment(xb, s["image_size"], data["mean"], data["std"],
                                                            generator=g_aug, base=base))

    def embed(net):
        """Two views of each anchor and one of each candidate."""
        return [views(x, s["seed"] + i)(net) for i, x in enumerate((x_anchor, x_anchor, cand))]

    def agreement(f_bank, f_cand, f_view, f_nn):
        """The share (%) of candidates, views and neighbours whose kNN class is the anchor's label: each
        query's own anchor left out of the vote, and a neighbour's own image too."""
        knn = lambda f, exclude: knn_predict(f, f_bank, y_train, data["C"], s["knn_k"], s["knn_temp"],
                                             exclude=exclude)
        return [100 * (knn(f, exclude) == y_train[a]).float().mean().item()
                for f, exclude, a in ((f_cand, anchor_k, anchor_k), (f_view, anchor, anchor),
                                      (f_nn, torch.stack([neighbour, anchor], 1), anchor))]

    f_v1, f_v2, f_cand = embed(backbone)
    # NNCLR's positive: the training image nearest to view 1 of the anchor (the anchor itself left out);
    # NNCLR pairs it with view 2, so that is the cosine reported, as two views are compared with each other.
    sim = F.normalize(f_v1, dim=1) @ F.normalize(f_train, dim=1).T
    sim[torch.arange(len(anchor), device=device), anchor] = -math.inf
    neighbour = sim.argmax(dim=1)
    nn_views = views(data["x_train"][neighbour], s["seed"] + 3)
    f_nn = nn_views(backbone)
    cos = lambda a, b: F.cosine_similarity(a, b).mean().item()
    diag = dict(anchors=len(pick), K=K, cos_anchor_candidate=cos(f_v1.repeat_interleave(K, dim=0), f_cand),
                cos_two_views=cos(f_v1, f_v2), cos_anchor_neighbour=cos(f_v2, f_nn),
                neighbour_true_label_agreement=100 * (y_train[neighbour] == y_train[anchor]).float().mean().item())
    # In the evaluated backbone's own space (a CLSP backbone was trained to agree with its candidates).
    (diag["candidate_label_agreement"], diag["view_label_agreement"],
     diag["neighbour_label_agreement"]) = agreement(f_train, f_cand, f_v2, f_nn)
    if judge is not None:                                # in the independent judge's space
        jb = frozen_backbone(judge[1]["backbone"], judge[0], device, judge[1]["settings"].get("stem", "cifar"))
        _, f_v2_j, f_cand_j = embed(jb)
        diag["judge"] = judge[0]
        (diag["candidate_label_agreement_judge"], diag["view_label_agreement_judge"],
         diag["neighbour_label_agreement_judge"]) = agreement(feats(jb, data["x_train"]), f_cand_j, f_v2_j,
                                                              nn_views(jb))
    if support is not None:                              # NNCLR's own neighbour, from its support set
        head = make_nnclr_projector()
        head.load_state_dict(support["head"])
        with torch.no_grad():
            z1 = F.normalize(head.to(device).eval()(f_v1), dim=1)
        _, row = nearest_neighbour(z1, support["keys"].to(device))
        source = support["index"].to(device)[row]        # the training image of each neighbour; -1: random
        known = source >= 0                              # (a support set still holding its random start)
        if known.any():
            a, nb = anchor[known], source[known]
            f_snn = views(data["x_train"][nb], s["seed"] + 4)(backbone)
            diag.update(support_neighbours=int(known.sum()),
                        cos_anchor_support_neighbour=cos(f_v2[known], f_snn),
                        support_neighbour_true_label_agreement=100 * (y_train[nb] == y_train[a]).float().mean().item(),
                        support_neighbour_is_anchor=100 * (nb == a).float().mean().item())
    diag["chance"] = 100 / data["C"]
    return diag


# ------------------------------------------------------------------------------------------------
# The command line, and the glue: the checkpoint, the data, the judge, the tables.
# ------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Stage 4 of CLSP: kNN and linear-probe accuracy of the backbone.")
    add = settings_adder(p, DEFAULTS, PRESETS)
    add("--dataset", "cifar10 | cifar100 | stl10 | folder (default: the checkpoint's; another one = transfer)")
    add("--data-dir", "where the data set is (default: the checkpoint's)")
    add("--image-size", "images are resized to this (default: the checkpoint's)", type=int)
    add("--seed", "random seed of the probe and the diagnostics", type=int)
    add("--knn-k", "neighbours that vote", type=int)
    add("--knn-temp", "temperature T of the votes exp(sim / T)", type=float)
    add("--probe-epochs", "linear-probe epochs; lr x0.1 at 60% and 80%", type=int)
    add("--probe-batch-size", "linear-probe batch", type=int)
    add("--probe-lr", "linear-probe SGD learning rate", type=float)
    add("--batch-size", "images per backbone pass for features", type=int)
    add("--diag-anchors", "anchors whose candidates are measured; 0 = none", type=int)
    add("--log-every", "probe epochs between progress lines", type=int)
    add_run_flags(p, None)
    p.add_argument("--checkpoint", default="runs/clsp.pt",
                   help="the backbone to evaluate (made by clsp.py) (default: %(default)s)")
    p.add_argument("--synthetic", default="runs/synthetic.pt",
                   help="candidates for the diagnostics (made by generate.py); 'none' to skip (default: %(default)s)")
    p.add_argument("--judge", help="the independent backbone that judges the candidates, a clsp.py --lam 0 "
                                   "checkpoint (default: the evaluated one if it is lam 0, else "
                                   "clsp_lam0.pt beside --checkpoint when there is one); 'none' to skip")
    p.add_argument("--out", default="runs/eval.json", help="where to write every number (default: %(default)s)")
    return p.parse_args(argv)


def check_settings(s):
    for k in ("knn_k", "probe_epochs", "probe_batch_size", "batch_size", "log_every", "image_size"):
        if s[k] < 1:
            fail(f"--{k.replace('_', '-')} must be a positive whole number, got {s[k]}")
    for k in ("knn_temp", "probe_lr"):
        if not (s[k] > 0 and math.isfinite(s[k])):
            fail(f"--{k.replace('_', '-')} must be a positive number, got {s[k]}")
    if s["diag_anchors"] < 0:
        fail(f"--diag-anchors must be 0 or more, got {s['diag_anchors']}")



CHECKPOINT_KEYS = ("backbone", "data", "settings", "epoch")


def main(argv=None):
    t_start = time.perf_counter()
    args = parse_args(argv)
    if WORLD_SIZE > 1:        # torchrun: stages 1 to 3 use several GPUs; this one is seconds to minutes on one
        fail(f"evaluate.py runs as one process (seconds to minutes on one GPU), not under torchrun: run "
             f"{command('evaluate.py', args)}")
    s, _ = resolve_settings(args, DEFAULTS, PRESETS)
    device = pick_device(args.device, args.preset)
    ckpt = load_artifact(args.checkpoint, CHECKPOINT_KEYS, "a clsp.py checkpoint",
                         command("clsp.py", args, out=args.checkpoint, default_out="runs/clsp.pt"))
    if not ckpt.get("finished", True):
        print(f"note: {args.checkpoint} is unfinished (epoch {ckpt.get('epoch')} of "
              f"{ckpt['settings'].get('epochs')}); evaluating it as it is", flush=True)
    # The data defaults to what the backbone was trained on; any other data set is a transfer experiment.
    s["dataset"] = s["dataset"] or ckpt["data"]["dataset"]
    other_data_set = s["dataset"] != ckpt["data"]["dataset"]       # a transfer: its own --data-dir, or data/
    s["data_dir"] = s["data_dir"] or ("data" if other_data_set else ckpt["settings"].get("data_dir", "data"))
    s["image_size"] = s["image_size"] or ckpt["data"]["image_size"]
    check_settings(s)
    data = load_data(s, device)
    # A transfer: other images than the backbone learnt from. On STL-10 the probe's labelled splits are other
    # images than its unlabeled pre-training split by design, so there only another data set is a transfer.
    transfer = (s["dataset"] != ckpt["data"]["dataset"] if has_own_pretrain_split(s["dataset"]) else
                data["info"]["fingerprint"] != ckpt["data"].get("fingerprint"))
    if not transfer and ckpt.get("norm"):      # the backbone's own data: the Normalize it was trained with
        data["mean"], data["std"] = (torch.tensor(ckpt["norm"][k], device=device) for k in ("mean", "std"))
    syn, judge, note = diagnostics_inputs(args, s, ckpt, data["info"], transfer)

    with claim_output(args.out):                  # checked now: a wrong --out fails before any work
        amp = autocast_dtype(args.precision, device)
        backbone = frozen_backbone(ckpt["backbone"], args.checkpoint, device, ckpt["settings"].get("stem", "cifar"))
        lam = ckpt["settings"].get("lam")
        method = method_name(ckpt["settings"])     # SimCLR, SimCLR-aug, CLSP-SimCLR, MoCo, ..., CLSP-NNCLR
        print(f"backbone {args.checkpoint} ({method}, lam {lam}, epoch {ckpt.get('epoch')}, trained on "
              f"{ckpt['data']['dataset']}) evaluated on {data['info']['dataset']}: {data['info']['num_train']} "
              f"training and {data['x_test'].shape[0]} test images, {data['C']} classes"
              f"{' [transfer]' if transfer else ''}; device {device}, autocast {amp or 'off (fp32)'}", flush=True)
        times = {}

        t0 = sync_time(device)
        f_train, f_train_flip, f_test = (features(backbone, x, data["mean"], data["std"], amp, s["batch_size"])
                                         for x in (data["x_train"], data["x_train"].flip(3), data["x_test"]))
        times["features"] = sync_time(device) - t0
        print(f"features of {2 * f_train.shape[0] + f_test.shape[0]} images in {times['features']:.1f} s", flush=True)

        # kNN: the headline (k, T) and, labelled as optimistic, the authors' search over k at their T.
        t0 = sync_time(device)
        knn = knn_accuracy(f_test, f_train, data, s["knn_k"], s["knn_temp"])
        # k is capped at the number of training images, so on tiny data several k are the same k.
        knn_grid = {k: knn_accuracy(f_test, f_train, data, k, KNN_GRID_TEMP)
                    for k in sorted({min(k, data["info"]["num_train"]) for k in KNN_GRID})}
        times["knn"] = sync_time(device) - t0

        # Linear probe, the authors' protocol, on the precomputed features.
        t0 = sync_time(device)
        linear, probe_loss = linear_probe(f_train, f_train_flip, data["y_train"], f_test, data["y_test"], data["C"],
                                          s["probe_epochs"], s["probe_batch_size"], s["probe_lr"],
                                          s["probe_lr_drops"], s["seed"], s["log_every"])
        times["probe"] = sync_time(device) - t0

        diag = None
        if syn is not None:
            t0 = sync_time(device)
            base = ckpt["settings"].get("base", "simclr")   # its augmentation: SimCLR's, MoCo's or NNCLR's
            support = dict(head=ckpt["head"], keys=ckpt["queue"][0], index=ckpt["queue_index"][0]) \
                if base == "nnclr" else None                 # NNCLR: its neighbours from its own support set
            diag = diagnose_candidates(syn, backbone, f_train, judge, data, s, amp, base, support)
            times["diagnostics"] = sync_time(device) - t0
        times["total"] = time.perf_counter() - t_start

        made_from = dict(checkpoint=dict(path=args.checkpoint, settings=ckpt.get("settings"), epoch=ckpt.get("epoch"),
                                         finished=ckpt.get("finished"), lam=lam, data=ckpt["data"],
                                         synthetic=ckpt.get("synthetic")),
                         synthetic=None if syn is None else dict(path=args.synthetic, settings=syn.get("settings"),
                                                                 ddpm=syn.get("ddpm")),
                         judge=None if judge is None else dict(path=judge[0], epoch=judge[1].get("epoch")))
        result = dict(method=method, knn_top1=knn, linear_top1=linear, probe_final_loss=probe_loss,
                      knn_top1_by_k_chosen_on_test=knn_grid, knn_grid_temperature=KNN_GRID_TEMP, transfer=transfer,
                      data={**data["info"], "data_dir": s["data_dir"], "num_test": int(data["x_test"].shape[0])},
                      synthetic_diagnostics=diag, note=note, seconds=times, device=str(device),
                      autocast=str(amp or "fp32"), settings=s, made_from=made_from)
        print_table(result, method)
        atomic_write(args.out, lambda tmp: write_json(result, tmp))
    print(f"\nwrote {args.out} in {times['total']:.1f} s", flush=True)
    print_all_results(os.path.dirname(os.path.abspath(args.out)))


def load_data(s, device):
    """Both splits on the device as uint8, their labels (numbered by the training classes' names, the
    same in both splits), and the normalisation clsp.py uses: the per-channel mean/std of the evaluated
    training images. On the backbone's own data main replaces it with the checkpoint's `norm` (the same on
    CIFAR; on STL-10 that of the unlabeled images it was trained on); in a transfer run it is
    the new data set's, as a Normalize transform for it would be."""
    x_train, y_train, classes = load_dataset(s["dataset"], s["data_dir"], "train", s["image_size"])
    x_test, y_test, _ = load_dataset(s["dataset"], s["data_dir"], "test", s["image_size"])
    mean, std = channel_stats(x_train)
    return dict(info=data_info(s["dataset"], x_train, y_train, classes), C=len(classes),
                x_train=x_train.to(device), y_train=y_train.to(device), x_test=x_test.to(device),
                y_test=y_test.to(device), mean=torch.tensor(mean, device=device),
                std=torch.tensor(std, device=device))


def diagnostics_inputs(args, s, ckpt, info, transfer):
    """The candidate set and the independent judge for the diagnostics, checked now so that a mismatch
    stops the run before any work; (None, None, why) when there are no diagnostics to make."""
    if args.synthetic.lower() == "none" or s["diag_anchors"] == 0:
        return None, None, "diagnostics of the synthetic positives off"
    if has_own_pretrain_split(s["dataset"]) and not transfer:   # each compares a positive's class with its anchor's
        return None, None, ("the synthetic positives belong to STL-10's unlabeled images, which have no labels "
                            "to judge them by, so no diagnostics")
    if not os.path.exists(args.synthetic):
        return None, None, (f"no {args.synthetic}, so no diagnostics of the synthetic positives "
                            f"({command('generate.py', args, out=args.synthetic, default_out='runs/synthetic.pt')} "
                            f"makes it)")
    if transfer:
        return None, None, ("transfer: the synthetic positives belong to the backbone's own data set, "
                            "so no diagnostics")
    syn = load_artifact(args.synthetic, ("images", "data", "anchor_index"), "a generate.py candidate set",
                        command("generate.py", args, out=args.synthetic, default_out="runs/synthetic.pt"))
    if syn["data"] != info:
        fail(f"{args.synthetic} does not fit the training data evaluated here ({info}; it was made for "
             f"{syn['data']}): point --synthetic at the right file, or pass --synthetic none")
    # The judge: a backbone that never saw a candidate (lam = 0), trained on the same images.
    if ckpt["settings"].get("lam") == 0 and args.judge is None:
        return syn, (args.checkpoint, ckpt), None
    path = args.judge or os.path.join(os.path.dirname(args.checkpoint), "clsp_lam0.pt")
    make_judge = command("clsp.py", args, "--lam", "0", "--out", path)   # the SimCLR baseline
    if path.lower() == "none" or (args.judge is None and not os.path.exists(path)):
        return syn, None, (f"no independent judge ({path}): the candidates' kNN labels are read in this "
                           f"backbone's own space; {make_judge} makes one")
    judge = load_artifact(path, CHECKPOINT_KEYS, "a clsp.py checkpoint", make_judge)
    if (judge["settings"].get("lam") != 0 or judge["data"] != info) and args.judge is None:
        return syn, None, (f"{path} is no independent judge here (lam {judge['settings'].get('lam')}, or other "
                           f"data): the candidates' kNN labels are read in this backbone's own space")
    if judge["settings"].get("lam") != 0 or judge["data"] != info:
        fail(f"--judge {path} must be a clsp.py --lam 0 backbone trained on the data evaluated here (it has "
             f"lam {judge['settings'].get('lam')}, data {judge['data'].get('dataset')}); pass another, "
             f"or --judge none")
    return syn, (path, judge), None


def frozen_backbone(state, path, device, stem="cifar"):
    """clsp.py's ResNet-18 (with the stem it was trained with) with the given weights, in eval mode
    (BatchNorm uses its running statistics), channels_last on a GPU (the layout tensor cores want), NCHW on a CPU."""
    backbone = make_backbone(stem)
    try:
        backbone.load_state_dict(state)
    except RuntimeError as e:
        fail(f"{path} holds a backbone that is not clsp.py's ResNet-18 ({str(e).splitlines()[0]}); "
             f"run `python clsp.py` again")
    layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    return backbone.to(device, memory_format=layout).eval().requires_grad_(False)


def write_json(result, path):
    with open(path, "w") as f:
        json.dump(result, f, indent=2, default=str)     # default=str: any odd setting becomes text


def sync_time(device):
    """Wall-clock that waits for the GPU, so each phase is timed honestly."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def print_table(result, method):
    """The numbers of one evaluation (what eval.json holds), as a table to read."""
    c, info, s = result["made_from"]["checkpoint"], result["data"], result["settings"]
    diag = result["synthetic_diagnostics"]
    tag = f"{c['data']['dataset']} -> {info['dataset']} (transfer)" if result["transfer"] else info["dataset"]
    rows = [(f"kNN top-1 (k {min(s['knn_k'], info['num_train'])}, T {s['knn_temp']})", f"{result['knn_top1']:6.2f} %"),
            (f"linear probe top-1 ({s['probe_epochs']} epochs)", f"{result['linear_top1']:6.2f} %")]
    width = max(len(r[0]) for r in rows)
    print(f"\nevaluation of {c['path']} ({method}, lam {c['lam']}, epoch {c['epoch']}) on {tag}")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    print(f"  kNN top-1 by k at T {KNN_GRID_TEMP}, as the authors report it, chosen on the test set "
          f"(optimistic): " + "  ".join(f"k {k}: {v:.2f}" for k, v in result["knn_top1_by_k_chosen_on_test"].items()))
    if diag:
        judged = "judge" in diag
        pct = lambda key: f"{diag[key]:5.1f} %" if key in diag else "    -  "
        print(f"\n  the positives of {diag['anchors']} anchors, each beside a view of its anchor (views augmented as "
              f"in training):\n  {'':<34} {'cosine':>7}  {'kNN class = anchor label':>24}  {'true label':>10}"
              f"\n  {'':<34} {'':>7}  {'this backbone' + (' / judge' if judged else ''):>24}")
        for name, cos, key, true in [("another view of the anchor", "cos_two_views", "view", None),
                                     (f"a synthetic candidate (of K = {diag['K']})", "cos_anchor_candidate",
                                      "candidate", None),
                                     ("its nearest training image", "cos_anchor_neighbour", "neighbour",
                                      "neighbour_true_label_agreement")]:
            agree = pct(f"{key}_label_agreement") + (f" / {pct(key + '_label_agreement_judge')}" if judged else "")
            print(f"  {name:<34} {diag[cos]:7.3f}  {agree:>24}  {pct(true) if true else '':>10}")
        if "support_neighbours" in diag:            # an NNCLR checkpoint: the neighbour its training took
            print(f"  {'its support-set neighbour':<34} {diag['cos_anchor_support_neighbour']:7.3f}  "
                  f"{'-':>24}  {pct('support_neighbour_true_label_agreement'):>10}\n"
                  f"  (the support set: NNCLR's own positives, {diag['support_neighbours']} of them read as the "
                  f"training image they came from, {diag['support_neighbour_is_anchor']:.1f} % the anchor itself; "
                  f"the nearest training image leaves the anchor out)")
        print(f"  (chance {diag['chance']:.1f} %{'; judge: ' + diag['judge'] if judged else ''})")
    if info["num_classes"] < 2:
        print("  (a single class: every accuracy above is 100 % by construction and means nothing)")
    if result["note"]:
        print(f"  ({result['note']})")


def print_all_results(folder):
    """Every eval*.json in the folder as one Markdown table: after the README's quick block, CLSP beside
    the SimCLR baseline and the SimCLR-aug control (and any MoCo runs), ready for a report."""
    rows = []
    for path in sorted(glob.glob(os.path.join(folder, "eval*.json"))):
        try:
            with open(path) as f:
                r = json.load(f)
            c = r["made_from"]["checkpoint"]
            rows.append((os.path.basename(path), c["path"], method_name(c["settings"]), str(c["lam"]),
                         str(c["epoch"]), r["data"]["dataset"],
                         f"{r['knn_top1']:.2f}", f"{r['linear_top1']:.2f}"))
        except (OSError, ValueError, KeyError, TypeError):
            continue                                       # not an evaluate.py result: left out
    order = ["SimCLR", "SimCLR-aug", "CLSP-SimCLR", "MoCo", "MoCo-aug", "CLSP-MoCo",   # the paper's table,
             "NNCLR", "NNCLR-aug", "CLSP-NNCLR"]                                      # then its foil
    rows.sort(key=lambda r: (order.index(r[2]), r[0]))
    if len(rows) > 1:
        print(f"\nall results in {folder}:\n")
        print("| file | checkpoint | method | lam | epochs | evaluated on | kNN top-1 % | linear top-1 % |")
        print("|---|---|---|---|---|---|---|---|")
        for row in rows:
            print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    run_main(main, sys.argv[1:], "rerun with a smaller --batch-size (it only sets the feature batches)",
             "no eval.json was written (an existing one is untouched): run it again")
