"""Stage 4 of CLSP: how good is the frozen backbone? kNN and linear-probe accuracy, plus a look at the positives.

A self-supervised backbone is judged by what a very simple classifier can read off its frozen 512-d
features. CLSP reports both of the usual classifiers; we follow the authors' recipe (METHOD.md, stage 4):

  kNN     cosine similarity of L2-normalised features; the k nearest training images vote for their class
          with weight exp(sim / T) (Wu et al. 2018). Headline k = 200, T = 0.1, fixed in advance: the
          authors report the best k in {5..200} *on the test set*, which is optimistic; we print that
          grid too, labelled so, but never use it as the headline.
  linear  one Linear(512, classes) on the frozen features, SGD lr 1.0, no momentum, no weight decay,
          batch 256, 100 epochs, lr x0.1 at epochs 60 and 80, horizontal flips as the only augmentation;
          the last epoch's test top-1. The backbone never changes, so we compute the features of every
          training image and of its mirror image once, and each epoch pick one of the two per image with
          p 0.5: exactly the authors' protocol, without 100 passes through a ResNet.

When runs/synthetic.pt is there, it also measures the synthetic positives in the backbone's space: how
close a candidate is to its anchor (cosine) next to how close two augmented views of one image are (how
*hard* the positives are), and how often a candidate's kNN class is its anchor's label (how often it is a
*true* positive).

    python evaluate.py                               # runs/clsp.pt on its own data set, all numbers
    python evaluate.py --dataset cifar100            # transfer: a CIFAR-10 backbone probed on CIFAR-100
    python evaluate.py --checkpoint runs/clsp_lam0.pt --out runs/eval_lam0.json   # the SimCLR baseline
    python evaluate.py --preset tiny --dataset folder --data-dir DIR              # seconds on a CPU

Reads:  runs/clsp.pt (--checkpoint), the images of --dataset (default: the checkpoint's own),
        runs/synthetic.pt (--synthetic; optional, only for the diagnostics).
Writes: runs/eval.json (--out): every number, the settings, and what it was made from; prints a table.
Time:   the tiny preset takes seconds on a CPU. On a GPU the cost is one forward pass over 110,000
        CIFAR images plus ~20,000 tiny probe steps: well under a minute is expected, not yet measured.
"""

import argparse
import glob
import json
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from ddpm import (PRECISIONS, Progress, autocast_dtype, data_info, fail, load_artifact, load_dataset, pick_device,
                  resolve_settings, run_main)
from clsp import augment, channel_stats, make_backbone   # the ResNet-18, its augmentation and its
                                                           # normalisation are written once, in clsp.py

# ------------------------------------------------------------------------------------------------
# Settings. The protocols are the same in every preset but `tiny`; they are cheap on features.
# ------------------------------------------------------------------------------------------------

DEFAULTS = dict(
    dataset=None, data_dir=None, image_size=None,   # None: the data the backbone was trained on
    seed=0,
    knn_k=200, knn_temp=0.1,                        # fixed in advance (authors: best k on test)
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
KNN_GRID = (5, 10, 20, 50, 100, 200)   # the authors' search, shown only as "chosen on the test set"


# ------------------------------------------------------------------------------------------------
# The two classifiers. Both take features already on the device and never call .item() in a loop.
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def knn_predict(f_query, f_train, y_train, num_classes, k, temp, exclude=None, chunk=1024):
    """Weighted kNN: class = argmax_c sum_{j in top-k(i)} exp(cos(f_i, f_j) / temp) [y_j = c].

    exclude[i] (optional) is a training index left out of query i's neighbours (an anchor, when the
    query is its own synthetic candidate: otherwise the anchor would vote for itself).
    """
    f_train = F.normalize(f_train.float(), dim=1)
    k = min(k, f_train.shape[0] - (exclude is not None))    # the tiny data has 64 training images
    preds = []
    for i in range(0, f_query.shape[0], chunk):             # [chunk, N] similarities at a time
        sim = F.normalize(f_query[i:i + chunk].float(), dim=1) @ f_train.T
        if exclude is not None:
            sim.scatter_(1, exclude[i:i + chunk, None], -math.inf)
        sim_k, idx = sim.topk(k, dim=1)                      # the k most similar training images
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device)
        votes.scatter_add_(1, y_train[idx], (sim_k / temp).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds)


def linear_probe(f_train, f_train_flip, y_train, f_test, y_test, num_classes, epochs=100, batch_size=256,
                 lr=1.0, lr_drops=(0.6, 0.8), seed=0, log_every=10):
    """The authors' linear evaluation on frozen, precomputed features. Returns (test top-1 %, last loss).

    f_train_flip[i] is the feature of training image i mirrored, so choosing it with p 0.5 each epoch
    *is* the authors' RandomHorizontalFlip. Raw backbone features, as METHOD.md describes the protocol
    (no normalisation, no BatchNorm in front of the Linear).
    """
    device = f_train.device
    N = f_train.shape[0]
    torch.manual_seed(seed)                                  # the Linear's initialisation
    probe = nn.Linear(f_train.shape[1], num_classes).to(device)   # PyTorch's default init, as the authors'
    drops = [round(f * epochs) for f in lr_drops]            # epochs 60 and 80 of 100
    g = torch.Generator(device).manual_seed(seed)            # flips and order drawn on the device
    progress = Progress(epochs, 0, "probe epoch", N)
    for epoch in range(1, epochs + 1):
        lr_now = lr * 0.1 ** sum(epoch > d for d in drops)   # epochs 1-60: lr, 61-80: lr/10, 81-100: lr/100
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
# Settings and checks.
# ------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Stage 4 of CLSP: kNN and linear-probe accuracy of the backbone.")
    p.add_argument("--preset", default="standard", help="tiny | quick | standard | paper (default: %(default)s)")
    p.add_argument("--dataset", help="cifar10 | cifar100 | folder (default: the checkpoint's; another one = transfer)")
    p.add_argument("--data-dir", help="where the data set is (default: the checkpoint's)")
    p.add_argument("--image-size", type=int, help="images are resized to this (default: the checkpoint's)")
    p.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--seed", type=int, help="random seed of the probe and the diagnostics (default: 0)")
    p.add_argument("--knn-k", type=int, help="neighbours that vote (default: 200)")
    p.add_argument("--knn-temp", type=float, help="temperature T of the votes exp(sim / T) (default: 0.1)")
    p.add_argument("--probe-epochs", type=int, help="linear-probe epochs; lr x0.1 at 60%% and 80%% (default: 100)")
    p.add_argument("--probe-batch-size", type=int, help="linear-probe batch (default: 256)")
    p.add_argument("--probe-lr", type=float, help="linear-probe SGD learning rate (default: 1.0)")
    p.add_argument("--batch-size", type=int, help="images per backbone pass for features (default: 1024)")
    p.add_argument("--diag-anchors", type=int, help="anchors whose candidates are measured; 0 = none (default: 2000)")
    p.add_argument("--log-every", type=int, help="probe epochs between progress lines (default: 10)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="autocast dtype; auto: bf16 on A100/H100-class GPUs, fp16 on older ones, fp32 on a CPU")
    p.add_argument("--checkpoint", default="runs/clsp.pt", help="the backbone to evaluate (made by clsp.py) (default: %(default)s)")
    p.add_argument("--synthetic", default="runs/synthetic.pt",
                   help="candidates for the diagnostics (made by generate.py); 'none' to skip (default: %(default)s)")
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


def main(argv=None):
    t_start = time.perf_counter()
    args = parse_args(argv)
    s, _ = resolve_settings(args, DEFAULTS, PRESETS)
    device = pick_device(args.device)

    ckpt = load_artifact(args.checkpoint, "clsp.py")
    if not isinstance(ckpt, dict) or "backbone" not in ckpt or "data" not in ckpt:
        fail(f"{args.checkpoint} is not a clsp.py checkpoint; point --checkpoint at one, or run `python clsp.py`")
    if not ckpt.get("finished", True):
        print(f"note: {args.checkpoint} is unfinished (epoch {ckpt.get('epoch')} of "
              f"{ckpt['settings'].get('epochs')}); evaluating it as it is", flush=True)
    # The data defaults to what the backbone was trained on; any other data set is a transfer experiment.
    s["dataset"] = s["dataset"] or ckpt["data"]["dataset"]
    s["data_dir"] = s["data_dir"] or ckpt["settings"].get("data_dir", "data")
    s["image_size"] = s["image_size"] or ckpt["data"]["image_size"]
    check_settings(s)

    # --------------------------------------------------------------------------------------------
    # Data and the frozen backbone.
    # --------------------------------------------------------------------------------------------
    x_train, y_train, classes = load_dataset(s["dataset"], s["data_dir"], "train", s["image_size"])
    x_test, y_test, _ = load_dataset(s["dataset"], s["data_dir"], "test", s["image_size"])
    info = data_info(s["dataset"], x_train, classes)
    transfer = (info["dataset"], info["num_classes"], info["num_train"], classes) != \
               (ckpt["data"]["dataset"], ckpt["data"]["num_classes"], ckpt["data"]["num_train"], ckpt.get("classes"))
    # The synthetic candidates (optional), checked now so a mismatch stops us before any work is done.
    syn, note = None, None
    if args.synthetic.lower() == "none" or s["diag_anchors"] == 0:
        note = "diagnostics of the synthetic positives off"
    elif not os.path.exists(args.synthetic):
        note = f"no {args.synthetic}, so no diagnostics of the synthetic positives (`python generate.py` makes it)"
    elif transfer:
        note = "transfer: the synthetic positives belong to the backbone's own data set, so no diagnostics"
    else:
        syn = load_artifact(args.synthetic, "generate.py")
        images = syn.get("images") if isinstance(syn, dict) else None
        if images is None or syn.get("data") != info or images.shape[-1] != s["image_size"] \
                or images.shape[0] > info["num_train"]:
            fail(f"{args.synthetic} does not fit the training data evaluated here ({info}; it was made for "
                 f"{syn.get('data') if isinstance(syn, dict) else '?'}): point --synthetic at the right "
                 f"file, or pass --synthetic none")
    C = len(classes)
    # Normalise exactly as clsp.py does: the per-channel mean/std of the (evaluated) training images,
    # computed on the CPU by the same function. On the backbone's own data this is the checkpoint's
    # `norm`; in a transfer run it is the new data set's, as a Normalize transform for it would be.
    mean, std = channel_stats(x_train)
    mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
    x_train, y_train = x_train.to(device), y_train.to(device)   # uint8 on the device, as in training
    x_test, y_test = x_test.to(device), y_test.to(device)

    backbone = make_backbone()
    try:
        backbone.load_state_dict(ckpt["backbone"])
    except RuntimeError as e:
        fail(f"{args.checkpoint} holds a backbone that is not clsp.py's ResNet-18 ({str(e).splitlines()[0]}); "
             f"run `python clsp.py` again")
    # Autocast (bf16 on recent GPUs, fp16 on older ones: ddpm.autocast_dtype) + channels_last (NHWC, the
    # layout tensor cores want) on a GPU; plain fp32 NCHW on a CPU, where clsp.py measured NCHW faster.
    # eval(): BatchNorm uses its running statistics.
    amp = autocast_dtype(args.precision, device)
    layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    backbone = backbone.to(device, memory_format=layout).eval().requires_grad_(False)
    lam = ckpt["settings"].get("lam")
    method = "SimCLR baseline" if lam == 0 else "CLSP"
    print(f"backbone {args.checkpoint} ({method}, lam {lam}, epoch {ckpt.get('epoch')}, trained on "
          f"{ckpt['data']['dataset']}) evaluated on {info['dataset']}: {info['num_train']} training and "
          f"{x_test.shape[0]} test images, {C} classes{' [transfer]' if transfer else ''}; device {device}, "
          f"autocast {amp or 'off (fp32)'}", flush=True)

    def normalise(x):
        return (x.float() / 255 - mean_t) / std_t

    @torch.no_grad()
    def features(x, prepare=normalise):
        """uint8 images [N, 3, S, S] -> float32 backbone features [N, 512], in batches of --batch-size."""
        out = []
        for i in range(0, x.shape[0], s["batch_size"]):
            xb = prepare(x[i:i + s["batch_size"]].to(device)).contiguous(memory_format=layout)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                out.append(backbone(xb).float())
        return torch.cat(out)

    def sync_time():   # wall-clock that waits for the GPU, so each phase is timed honestly
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    times = {}
    t0 = sync_time()
    f_train = features(x_train)
    f_train_flip = features(x_train, lambda x: normalise(x.flip(3)))   # the mirror images, for the probe
    f_test = features(x_test)
    times["features"] = sync_time() - t0
    print(f"features of {2 * x_train.shape[0] + x_test.shape[0]} images in {times['features']:.1f} s", flush=True)

    # --------------------------------------------------------------------------------------------
    # kNN: the headline (k, T) and, labelled as optimistic, the authors' search over k.
    # --------------------------------------------------------------------------------------------
    t0 = sync_time()

    def knn_top1(k):
        pred = knn_predict(f_test, f_train, y_train, C, k, s["knn_temp"])
        return 100 * (pred == y_test).float().mean().item()

    knn = knn_top1(s["knn_k"])
    # k is capped at the number of training images, so on tiny data several k are the same k.
    knn_grid = {k: knn_top1(k) for k in sorted({min(k, info["num_train"]) for k in KNN_GRID})}
    times["knn"] = sync_time() - t0

    # --------------------------------------------------------------------------------------------
    # Linear probe, the authors' protocol, on the precomputed features.
    # --------------------------------------------------------------------------------------------
    t0 = sync_time()
    linear, probe_loss = linear_probe(f_train, f_train_flip, y_train, f_test, y_test, C, s["probe_epochs"],
                                      s["probe_batch_size"], s["probe_lr"], s["probe_lr_drops"], s["seed"],
                                      s["log_every"])
    times["probe"] = sync_time() - t0

    # --------------------------------------------------------------------------------------------
    # Diagnostics of the synthetic positives (optional): how hard, and how often truly positive.
    # --------------------------------------------------------------------------------------------
    diag = None
    if syn is not None:
        t0 = sync_time()
        K = images.shape[1]
        g = torch.Generator().manual_seed(s["seed"])         # a random subset of anchors, fixed by --seed
        pick = torch.randperm(images.shape[0], generator=g)[:s["diag_anchors"]].sort().values
        anchor = syn["anchor_index"][pick].to(device)        # training index of each picked anchor
        anchor_k = anchor.repeat_interleave(K)               # ... once per candidate
        f_cand = features(images[pick].flatten(0, 1))        # the n*K candidates, un-augmented
        cos_cand = F.cosine_similarity(f_cand, f_train[anchor_k]).mean().item()
        # Reference: two augmented views of the same anchor, with clsp.py's own augmentation.
        g_aug = torch.Generator(device).manual_seed(s["seed"])

        def views(x):
            return augment(x, s["image_size"], mean_t, std_t, generator=g_aug)
        f_v1, f_v2 = features(x_train[anchor], views), features(x_train[anchor], views)
        cos_views = F.cosine_similarity(f_v1, f_v2).mean().item()
        # A candidate is a true positive when it shows the anchor's class: its kNN vote among the real
        # training images (anchor left out) is our stand-in for a label nobody has.
        pred_cand = knn_predict(f_cand, f_train, y_train, C, s["knn_k"], s["knn_temp"], exclude=anchor_k)
        pred_view = knn_predict(f_v1, f_train, y_train, C, s["knn_k"], s["knn_temp"], exclude=anchor)
        diag = dict(anchors=len(pick), K=K, cos_anchor_candidate=cos_cand, cos_two_views=cos_views,
                    candidate_label_agreement=100 * (pred_cand == y_train[anchor_k]).float().mean().item(),
                    view_label_agreement=100 * (pred_view == y_train[anchor]).float().mean().item())
        times["diagnostics"] = sync_time() - t0
    times["total"] = time.perf_counter() - t_start

    # --------------------------------------------------------------------------------------------
    # The table and runs/eval.json.
    # --------------------------------------------------------------------------------------------
    tag = f"{ckpt['data']['dataset']} -> {info['dataset']} (transfer)" if transfer else info["dataset"]
    rows = [(f"kNN top-1 (k {min(s['knn_k'], info['num_train'])}, T {s['knn_temp']})", f"{knn:6.2f} %"),
            (f"linear probe top-1 ({s['probe_epochs']} epochs)", f"{linear:6.2f} %")]
    if diag:
        rows += [(f"cos(anchor, candidate), {diag['anchors']} anchors x {diag['K']}", f"{diag['cos_anchor_candidate']:6.3f}"),
                 ("cos(two augmented views of an image)", f"{diag['cos_two_views']:6.3f}"),
                 ("candidates whose kNN class = anchor's label", f"{diag['candidate_label_agreement']:6.2f} %"),
                 ("augmented views whose kNN class = label", f"{diag['view_label_agreement']:6.2f} %")]
    width = max(len(r[0]) for r in rows)
    print(f"\nevaluation of {args.checkpoint} ({method}, lam {lam}, epoch {ckpt.get('epoch')}) on {tag}")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    print("  kNN top-1 by k, chosen on the test set (optimistic): "
          + "  ".join(f"k {k}: {v:.2f}" for k, v in knn_grid.items()))
    if note:
        print(f"  ({note})")

    made_from = dict(checkpoint=dict(path=args.checkpoint, settings=ckpt.get("settings"), epoch=ckpt.get("epoch"),
                                     finished=ckpt.get("finished"), lam=lam, data=ckpt["data"],
                                     synthetic=ckpt.get("synthetic")),
                     synthetic=None if syn is None else dict(path=args.synthetic, settings=syn.get("settings"),
                                                             ddpm=syn.get("ddpm")))
    result = dict(knn_top1=knn, linear_top1=linear, probe_final_loss=probe_loss,
                  knn_top1_by_k_chosen_on_test=knn_grid, transfer=transfer,
                  data={**info, "data_dir": s["data_dir"], "num_test": int(x_test.shape[0])},
                  synthetic_diagnostics=diag, note=note, seconds=times, device=str(device),
                  autocast=str(amp or "fp32"), settings=s, made_from=made_from)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = f"{args.out}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(result, f, indent=2, default=str)     # default=str: any odd setting becomes text
        os.replace(tmp, args.out)                            # atomic: readers see the old file or the new one
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    print(f"\nwrote {args.out} in {times['total']:.1f} s", flush=True)
    print_all_results(os.path.dirname(os.path.abspath(args.out)))


def print_all_results(folder):
    """Every eval*.json in the folder as one Markdown table: after the README's quick block,
    runs/eval.json (CLSP) and runs/eval_lam0.json (SimCLR) side by side, ready for a report."""
    rows = []
    for path in sorted(glob.glob(os.path.join(folder, "eval*.json"))):
        try:
            with open(path) as f:
                r = json.load(f)
            c = r["made_from"]["checkpoint"]
            method = "SimCLR" if c["lam"] == 0 else f"CLSP, lam {c['lam']}"
            rows.append((os.path.basename(path), c["path"], method, str(c["epoch"]), r["data"]["dataset"],
                         f"{r['knn_top1']:.2f}", f"{r['linear_top1']:.2f}"))
        except (OSError, ValueError, KeyError, TypeError):
            continue                                       # not an evaluate.py result: left out
    if len(rows) > 1:
        print(f"\nall results in {folder}:\n")
        print("| file | checkpoint | method | epochs | evaluated on | kNN top-1 % | linear top-1 % |")
        print("|---|---|---|---|---|---|---|")
        for row in rows:
            print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    try:
        run_main(main, sys.argv[1:], "rerun with a smaller --batch-size (it only sets the feature batches)")
    except KeyboardInterrupt:   # nothing is written before the end, so there is nothing to clean up
        raise SystemExit("interrupted; no eval.json was written (an existing one is untouched): run it again")
