"""Stage 2 of CLSP: make K synthetic positives for every training image with the trained DDPM.

CLSP (Zeng et al., ECCV 2024) samples new images from pure noise with the stage-1 DDPM while pulling
the UNet's bottleneck features h towards those of a real training image x_a, the "anchor":

    h_anchor, _, _ = encode(x_a noised to step t)         # the anchor's semantics at this noise level
    h, skips, temb = encode(x_t, t)                       # the sample's own features
    eps = decode(w * h + (1 - w) * h_anchor, skips, temb) # interpolate the bottleneck only

at every step of a DDIM sampler (Song et al. 2021, eq. 12). The deep features h carry what the image
shows, the skip connections carry how it looks, so the result keeps the anchor's content with a new
background, pose and colour: a *hard* positive. (On STL-10 at 64 px the authors interpolate the three
deepest skip connections too, --interp-layers 4: interpolated_eps says which.) The authors use w = 0.1
(90% anchor), S = 100 DDIM steps, eta = 0.1 and K = 8 candidates for each of the 50,000 training images
(400,000 images, 1.2 GB).
The whole loop, line by line (`interpolated_ddim_sample` below is exactly this):

    x = randn                                                # x_T
    for (t, t_next) in (999, 989), (989, 979), ..., (9, -1): # S steps
        xa_t = sqrt(abar_t) x_a + sqrt(1 - abar_t) randn     # the anchor, re-noised with fresh noise
        h, skips, temb = encode(x, t);  h_a = encode(xa_t, t)[0]
        eps = decode(w h + (1 - w) h_a, skips, temb)         # the sample's skips, the mixed bottleneck
        x0 = (x - sqrt(1 - abar_t) eps) / sqrt(abar_t)       # the model's guess of the clean image
        if t_next < 0: x = x0; break
        sigma = eta sqrt((1 - abar_next) / (1 - abar_t)) sqrt(1 - abar_t / abar_next)
        x = sqrt(abar_next) x0 + sqrt(1 - abar_next - sigma^2) eps + sigma randn
    image = round((clip(x, -1, 1) + 1) * 127.5) as uint8

    python generate.py                              # standard preset: K = 8, S = 100, every training image
    python generate.py --preset quick               # K = 2, S = 25: for the ~10 minute pipeline
    python generate.py --preset tiny --dataset folder --data-dir DIR    # seconds on a CPU, for tests
    python generate.py --w 1                        # plain unconditional DDIM samples, for comparison
    python generate.py --ddpm runs/ddpm_stl10.pt --out runs/synthetic_stl10.pt   # STL-10: S = 200, 4 layers
    torchrun --standalone --nproc-per-node 4 generate.py   # 4 GPUs: the same candidates, bit for bit

Reads:  runs/ddpm.pt (the EMA weights; its data set and image size are the defaults here) and the
        training images (the anchors, in the order common.load_dataset gives them).
Writes: runs/synthetic.pt: images uint8 [N, K, 3, S, S], candidate k of training image i is images[i, k];
        runs/synthetic_preview.png: each row an anchor (first column) and its K candidates;
        runs/synthetic_w_sweep.png: anchors sampled with w = 0, 0.1, 0.25, 0.5, 1 (columns labelled);
        the pictures are named after --out. While it runs, finished batches are kept in
        runs/synthetic.pt.parts/, so an interrupted run, restarted with the same command, resumes where
        it stopped, and the result is the one an uninterrupted run gives.
Time:   tiny: 4.7 s on an idle 2-core CPU. On a GPU: not yet measured (the goal is the
        full standard set, 400,000 images x 100 steps, in at most 10 minutes on one H100).
"""

import argparse
import math
import os
import shutil
import sys
import time

# common.py first: it turns a Ctrl-C while PyTorch loads (seconds) into one sentence, not a traceback.
from common import (MAIN, RANK, WORLD_SIZE, Progress, StopFlag, add_run_flags, atomic_save, autocast_dtype, barrier,
                    beside, claim_output, command, compile_enabled, count_flops, data_info, dataset_settings, fail,
                    from_main, load_artifact, load_dataset, part_path, peak_flops, refuse_to_overwrite, require_free_space,
                    require_same_data, resolve_settings, resume_parts, run_main, save_grid, settings_adder,
                    start_processes, with_eager_fallback)

import torch

from ddpm import build_unet, ddim_step, ddim_timesteps, make_schedule, q_sample, to_uint8   # stage 1's method

# ------------------------------------------------------------------------------------------------
# Settings. `standard` is the default; a preset changes some values; an explicit flag wins over both.
# dataset / data_dir / image_size stay None here: they default to the DDPM checkpoint's own.
# ------------------------------------------------------------------------------------------------

DEFAULTS = dict(  # the `standard` preset: the authors' settings
    dataset=None, data_dir=None, image_size=None, seed=0,
    w=0.1,              # authors: 0.1, i.e. 90% of the bottleneck comes from the anchor
    S=100,              # authors: 100 DDIM steps (999, 989, ..., 9)
    eta=0.1,            # authors: 0.1, a little fresh noise at each DDIM step
    K=8,                # authors: 8 candidates per image (their ablation: 16 or 32 add nothing)
    interp_layers=1,    # authors on CIFAR: 1, the bottleneck h only (interpolated_eps); on STL-10: 4
    num_anchors=None,   # None: every training image
    # 2048 images (256 anchors x 8) per batch: no gradients are kept, so memory is a few GB even for the
    # paper's UNet, and a large batch keeps a big GPU busy with this small model (a reasoned guess).
    batch_size=2048,
    preview_anchors=8,  # rows of the two pictures
)
PRESETS = {
    # seconds on a CPU with the tiny DDPM (16x16 images, 0.7 M parameters, 64 images); numbers mean nothing
    "tiny": dict(K=2, S=5, batch_size=32, preview_anchors=4),
    # part of the ~10 minute pipeline. K = 2 gives about half of the gain of K = 8 in the authors' K
    # ablation on CIFAR-10 (linear 92.24 at K = 1, 93.29 at K = 2, 94.37 at K = 8), less on CIFAR-100.
    # S = 25 DDIM steps loses little (Song et al., CIFAR-10 FID at eta 0: 6.84 with 20 steps, 4.16 with
    # 100). 50,000 x 2 x 25 = 2.5 M sampler steps (its GPU time is not yet measured).
    "quick": dict(K=2, S=25),
    "standard": dict(),
    "paper": dict(),    # the standard preset already is the authors' recipe (their bigger UNet is ddpm.py's)
}
# A data set's own recipe (common.dataset_settings; a preset or a flag wins over "standard"). STL-10 at 64 px,
# the authors' README command for it: 200 DDIM steps (CIFAR: 100), eta 0.1, w 0.1, K 8, and
# --num_interpolation_layers 4 (CIFAR: 1). 512 images a batch: the pixels of CIFAR's 2048 (a reasoned guess).
DATASETS = {"stl10": {"standard": dict(S=200, interp_layers=4, batch_size=512)}}
SWEEP_W = [0.0, 0.1, 0.25, 0.5, 1.0]   # the columns of synthetic_w_sweep.png; w = 1 is plain sampling


# ------------------------------------------------------------------------------------------------
# The interpolated DDIM sampler: ddpm.ddim_sample with one change, how eps is computed.
# ------------------------------------------------------------------------------------------------

def interpolated_eps(unet, x_t, xa_t, t, w, layers=1):
    """eps for the sample x_t, with its bottleneck pulled towards the (noised) anchor's by 1 - w.
    w: a number, or a 0-d tensor (then a compiled sampler serves every w without recompiling).

    layers (--interp-layers): how many features are interpolated, as the authors' `num_interpolation_layers`
    (their UNet.forward_with_anchor): 1 is the bottleneck h alone; L > 1 also the L - 1 deepest skip
    connections, skips[-1], ..., skips[-(L - 1)], each mixed with the anchor's the same way. The skips are
    the down path's outputs, shallowest first; the up path concatenates them back in deepest first, so these
    are the ones its lowest level reads. With 2 res blocks a level, L = 4 (the authors on STL-10) takes the
    bottleneck and all three skips of the lowest level (8x8 at 64 px: the last down-sampling and that
    level's two blocks): the anchor decides the content down to that scale, and the sample keeps every
    finer level's skips, its own appearance. (Why the authors do so at 64 px, our reading: the 8x8
    bottleneck of a 64-px image leaves more of the content to the skips than CIFAR's 4x4 one does.)"""
    h, skips, temb = unet.encode(x_t, t)       # the sample's bottleneck h, its skips, the time embedding
    h_anchor, skips_anchor, _ = unet.encode(xa_t, t)   # the anchor's (its skips only if layers > 1)
    h = (w * h + (1 - w) * h_anchor).to(h.dtype)   # the CLSP interpolation, on the bottleneck
    if layers > 1:                             # ... and on the layers - 1 deepest skips
        n = len(skips) - (layers - 1)
        skips = skips[:n] + [(w * a + (1 - w) * b).to(a.dtype) for a, b in zip(skips[n:], skips_anchor[n:])]
    return unet.decode(h, skips, temb).float() # the other skips come from the sample: its appearance


@torch.no_grad()
def interpolated_ddim_sample(unet, x_T, x_a, abar, w, S, eta, generator, anchor_generator,
                             eps_fn=interpolated_eps, layers=1):
    """DDIM from x_T towards the anchors x_a (in [-1, 1], one per row of x_T). The step noise is drawn
    from `generator` exactly as ddpm.ddim_sample draws it, so with w = 1 both return the same tensor; the
    anchor's noise comes from its own `anchor_generator`, so it does not shift the sample's stream.
    eps_fn: interpolated_eps, or the same function compiled; layers: its interpolated features (1: h)."""
    x = x_T
    steps = ddim_timesteps(S, abar.numel())
    for t, t_next in zip(steps, steps[1:] + [-1]):             # t_next = -1: the last step returns x0
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        # The anchor is noised to the same t with fresh noise at every step, so its features are those
        # the UNet expects at this noise level (as in the authors' sampler).
        xa_t = q_sample(x_a, tt, torch.randn(x_a.shape, device=x.device, generator=anchor_generator), abar)
        eps = eps_fn(unet, x, xa_t, tt, w, layers)
        noise = torch.randn(x.shape, device=x.device, generator=generator) if t_next >= 0 else None
        x = ddim_step(x, eps, t, t_next, abar, eta, noise)     # Song et al. eq. 12, shared with ddpm.py
    return x


class Sampler:
    """The sampler with everything that stays fixed for a run: the EMA UNet, the schedule abar, S steps,
    eta, the seed, and `rows`, the images of every call: a batch is padded to it, so every call has one
    shape and a compiled sampler compiles once (a last, smaller batch would compile again, a minute).
    Made once in main; then only `candidates(anchors, K, w, b)` is called, with what changes per batch."""

    def __init__(self, unet, abar, S, eta, seed, rows, amp=None, eps_fn=interpolated_eps, layers=1):
        self.unet, self.abar, self.S, self.eta, self.seed, self.rows = unet, abar, S, eta, seed, rows
        self.amp, self.eps_fn = amp, eps_fn        # the autocast dtype (None: fp32); eps, maybe compiled
        self.layers = layers                       # the features interpolated (--interp-layers)

    def candidates(self, anchors, K, w, b):
        """uint8 anchors [A, 3, H, W] -> uint8 candidates [A, K, 3, H, W], from batch b's random streams:
        seeded per batch (not per run), so a resumed run makes exactly the images an uninterrupted one makes."""
        A, device = anchors.shape[0], self.abar.device
        x_a = (anchors.to(device).float() / 127.5 - 1).repeat_interleave(K, dim=0)   # rows: a0 x K, a1 x K, ...
        x_a = torch.cat([x_a, x_a.new_zeros(self.rows - x_a.shape[0], *x_a.shape[1:])])   # padding, cut below
        seed = 2 * (self.seed * 1_000_003 + b)
        g, g_anchor = torch.Generator(device).manual_seed(seed), torch.Generator(device).manual_seed(seed + 1)
        x_T = torch.randn(x_a.shape, device=device, generator=g)   # every candidate its own x_T: independent
        w = torch.tensor(float(w), device=device)                  # a tensor: one compile for every w
        with torch.autocast(device.type, dtype=self.amp, enabled=self.amp is not None):
            x = interpolated_ddim_sample(self.unet, x_T, x_a, self.abar, w, self.S, self.eta, g, g_anchor,
                                         self.eps_fn, self.layers)[:A * K]
        if not torch.isfinite(x).all():
            fail("the sampler produced NaN or inf values: the DDPM checkpoint looks broken; retrain it with "
                 "`python ddpm.py`")
        return to_uint8(x).contiguous().view(A, K, *x.shape[1:]).cpu()   # contiguous: NCHW, not channels_last


def mean_abs_diff(a, b):
    """Mean |pixel difference| in [0, 255] units over every colour value (an L1 distance per value)."""
    return (a.float() - b.float()).abs().mean().item()


# ------------------------------------------------------------------------------------------------
# The run: every training image's K candidates, batch by batch, then the pictures and the numbers.
# ------------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    s, explicit = resolve_settings(args, DEFAULTS, PRESETS)
    ckpt = load_ddpm(args, s, explicit)                       # fills in the DDPM's data set and size
    dataset_settings(s, explicit, args.preset, DATASETS, PRESETS)   # STL-10: 200 steps, 4 layers
    check_settings(s, ckpt["settings"])
    x_train, info = load_anchors(s, ckpt, args)
    preview = args.preview or beside(args.out, "_preview.png")
    sweep_png = args.sweep or beside(args.out, "_w_sweep.png")
    # Every check has passed: the device, and under torchrun the process group (common.start_processes).
    device = start_processes(args.device, args.preset)

    # No other run writes these files until this one ends; Ctrl-C or SIGTERM stops after the current batch.
    with claim_output(args.out, preview, sweep_png), StopFlag() as stop:
        refuse_to_overwrite(args.out, f"it is ready for {command('clsp.py', args)}")
        # the finished batches and the final file, both on disk before the batches are deleted
        require_free_space(args.out, 2 * x_train[:1].numel() * x_train.shape[0] * s["K"])
        sampler, compiled = make_sampler(ckpt, s, args, device)
        K, N = s["K"], s["num_anchors"]
        print(f"{N} anchors x K = {K} candidates, S = {s['S']} DDIM steps, w = {s['w']}, eta = {s['eta']}, "
              f"{s['interp_layers']} interpolated layer{'s' * (s['interp_layers'] > 1)}; "
              f"{sampler.rows // K} anchors ({sampler.rows} images) per batch; DDPM {args.ddpm} (step "
              f"{ckpt['step']}); device {device}, autocast {sampler.amp or 'off (fp32)'}, compile "
              f"{'on (the first batch compiles)' if compiled else 'off'}", flush=True)
        parts = args.out + ".parts"
        manifest = dict(settings={**{k: v for k, v in s.items() if k not in ("data_dir", "preview_anchors")},
                                  "autocast": str(sampler.amp or "fp32"), "compile": compiled},   # other pixels
                        data=info, ddpm=dict(step=ckpt["step"], fingerprint=weights_fingerprint(ckpt["ema"])))
        images, timing = make_all(sampler, x_train, s, parts, manifest, compiled, stop)
        if not MAIN:                                # torchrun: rank 0 alone makes the pictures and the file
            return

        # The w sweep: anchors spread over the data set (a folder sorted by class shows several classes),
        # as many as one batch holds, sampled once per w with the same random streams (batch index -1),
        # so only w changes from column to column.
        idx = torch.linspace(0, N - 1, min(sampler.rows, N)).round().long()
        real, sweep = x_train[idx].cpu(), []
        for w in SWEEP_W:
            sweep.append(sampler.candidates(x_train[idx], 1, w, -1)[:, 0])
            if stop.requested:
                fail(f"interrupted after all {N} anchors were done; they are kept in {parts}: rerun the same "
                     f"command to finish (only the w sweep, the pictures and the final file are left)")
        show = torch.linspace(0, len(idx) - 1, min(s["preview_anchors"], len(idx))).round().long()
        save_grid(torch.cat([real[show, None], images[idx[show]]], 1).flatten(0, 1), preview, nrow=1 + K,
                  labels=["anchor"] + [f"k={k}" for k in range(K)])
        save_grid(torch.stack([real[show]] + [x[show] for x in sweep], 1).flatten(0, 1), sweep_png,
                  nrow=1 + len(SWEEP_W), labels=["anchor"] + [f"w={w:g}" for w in SWEEP_W])

        summary = {**distances(images, x_train, real, sweep, K), **timing}
        atomic_save(dict(images=images, anchor_index=torch.arange(N), settings=s, data=info,
                         ddpm=dict(path=args.ddpm, step=ckpt["step"], settings=ckpt["settings"]),
                         summary=summary), args.out)
        shutil.rmtree(parts)                        # only now: the final file is complete
    print(f"wrote {args.out} ({N} x {K} candidates, {images.numel() / 1e6:.0f} MB), {preview} and {sweep_png}",
          flush=True)


def make_all(sampler, x_train, s, parts, manifest, compiled, stop):
    """All candidates, batch b making those of anchors b*A .. b*A+A-1 from its own random streams.
    Finished batches are kept in `parts` beside a manifest of what made them; only a run with the same
    manifest may use them, so one candidate set never mixes two settings or two DDPMs. Ctrl-C (or
    SIGTERM) stops after the current batch, which is kept. Under torchrun the batches left to make are
    dealt round by round, one to each process (batch b is made from b's streams wherever it is made, so
    the set is the one-process set, and a rerun with another N resumes the same folder); each process
    writes its own parts, and rank 0, which holds the others' from disk at the end, returns them all."""
    N, K = x_train.shape[0], s["K"]
    A = sampler.rows // K                       # anchors per batch, each repeated K times
    n_batches = math.ceil(N / A)
    # The whole set, filled in place batch by batch (rank 0): made, resumed or read from another process's
    # part, each batch is copied into it and dropped, so the set (9.8 GB for STL-10) is never held twice.
    images = torch.empty(N, K, *x_train.shape[1:], dtype=torch.uint8) if MAIN else None

    def keep(b, batch):
        images[b * A:b * A + batch.shape[0]] = batch

    finished = resume_parts(parts, manifest, n_batches, keep, DEFAULTS) if MAIN else set()   # an earlier run's
    todo = from_main([b for b in range(n_batches) if b not in finished])  # torchrun: as rank 0 found them
    made_here = set()
    done = N - sum(min(A, N - b * A) for b in todo)
    device = sampler.abar.device
    peak = peak_flops(device)                   # the MFU only where the GPU's peak is known
    flops = peak and K * s["S"] * flops_per_sampler_step(sampler.unet, s["image_size"], device, s["interp_layers"])
    progress = Progress(N, done, "anchor", K, flops, peak, warming=compiled)
    t_start = t0 = time.perf_counter()
    made = 0
    rounds = math.ceil(len(todo) / WORLD_SIZE)  # one process: a round is a batch
    try:
        for r in range(rounds):
            if r * WORLD_SIZE + RANK < len(todo):
                b = todo[r * WORLD_SIZE + RANK]
                batch = sampler.candidates(x_train[b * A:(b + 1) * A], K, s["w"], b)
                atomic_save({"images": batch}, part_path(parts, b))    # the .cpu() in it waited for the GPU
                if MAIN:                                               # rank 0 reads the others' at the end
                    keep(b, batch)
                    made_here.add(b)
                # torchrun: every process makes one batch a round, so rank 0 counts its own N times
                done = min(N, done + batch.shape[0] * WORLD_SIZE)
                made += batch.shape[0] * K * WORLD_SIZE
            if progress.warmup == "compiling":
                progress.warmed_up(done, "compile")
                t0, made = time.perf_counter(), 0   # images/s: after the compile
            if progress.due(10) or r == rounds - 1: # a line every ~10 s
                progress.line(done, batch=f"{n_batches - len(todo) + min((r + 1) * WORLD_SIZE, len(todo))}"
                                          f"/{n_batches}")
            if stop.agreed() and r < rounds - 1:    # torchrun: all stop after the same round
                raise KeyboardInterrupt
        barrier()                                   # every part is on disk
        for b in todo if MAIN else ():
            if b not in made_here:
                keep(b, torch.load(part_path(parts, b), weights_only=True)["images"])
    except KeyboardInterrupt:                       # that stop, or a second Ctrl-C within a batch
        fail(f"interrupted with {done}/{N} anchors done; the finished batches are kept in {parts}: "
             f"rerun the same command to resume")
    except torch.cuda.OutOfMemoryError:
        fail(f"out of GPU memory at --batch-size {s['batch_size']}; rerun with a smaller --batch-size "
             f"(and delete {parts}: its batches were made with this batch size)")
    rate = made / (time.perf_counter() - t0) if made else None
    if not MAIN:
        return None, None
    return images, dict(seconds=time.perf_counter() - t_start, images_per_second=rate)


def distances(images, x_train, real, sweep, K):
    """The effect, measured in pixels: how far the candidates are from their anchor and from each other,
    with two unrelated training images for scale (on at most the first 1000 anchors), and how far a
    sample moves from its anchor as w goes from 0 (all anchor) to 1 (plain sampling)."""
    n = min(images.shape[0], 1000)
    c, a = images[:n], x_train[:n].cpu()
    d = dict(
        metric="mean |pixel difference| in [0, 255] units (L1 per colour value)", anchors_measured=n,
        anchor_to_candidate=mean_abs_diff(c, a[:, None]),
        between_candidates=(sum(mean_abs_diff(c[:, i], c[:, j]) for i in range(K) for j in range(i + 1, K))
                            / (K * (K - 1) / 2)) if K > 1 else None,
        anchor_to_other_image=mean_abs_diff(a, a.roll(1, 0)) if n > 1 else None,
        anchor_to_sample_by_w={str(w): mean_abs_diff(x, real) for w, x in zip(SWEEP_W, sweep)},
        sweep_anchors=real.shape[0])
    fmt = lambda v: "n/a" if v is None else f"{v:.1f}"
    print(f"summary: {d['metric']}, over the first {n} anchors\n"
          f"  anchor    <-> its candidates:             {fmt(d['anchor_to_candidate'])}\n"
          f"  candidate <-> candidate, same anchor:     {fmt(d['between_candidates'])}\n"
          f"  anchor    <-> another training image:     {fmt(d['anchor_to_other_image'])}  (for scale)\n"
          f"  anchor    <-> sample by w ({real.shape[0]} anchors):  "
          + ", ".join(f"w={w}: {v:.1f}" for w, v in d["anchor_to_sample_by_w"].items()), flush=True)
    return d


# ------------------------------------------------------------------------------------------------
# The command line, and the glue: the DDPM, the anchors, the sampler.
# ------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Stage 2 of CLSP: synthetic positives by interpolated DDIM sampling.")
    add = settings_adder(p, DEFAULTS, PRESETS)
    add("--dataset", "cifar10 | cifar100 | stl10 | folder (default: the DDPM's)")
    add("--data-dir", "where the training images are (default: where the DDPM found them)")
    add("--image-size", "must be the DDPM's (default: the DDPM's)", type=int)
    add("--seed", "random seed of the samples", type=int)
    add("--w", "weight of the sample's own bottleneck, in [0, 1]; 1 = plain sampling", type=float)
    add("--steps", "DDIM steps S", dest="S", type=int)
    add("--eta", "DDIM noise, 0 = deterministic, in [0, 1]", type=float)
    add("--K", "candidates per training image", type=int)
    add("--interp-layers", "features interpolated: 1 = the bottleneck only; L = also the L - 1 deepest skip "
                           "connections (the authors on STL-10: 4)", type=int)
    add("--num-anchors", "only the first N training images (default: all)", type=int)
    add("--batch-size", "images per batch, best a multiple of K", type=int)
    add_run_flags(p, "the sampler's model call")
    p.add_argument("--ddpm", default="runs/ddpm.pt",
                   help="the DDPM checkpoint made by ddpm.py (default: %(default)s)")
    p.add_argument("--out", default="runs/synthetic.pt", help="the candidate set to write (default: %(default)s)")
    p.add_argument("--preview",
                   help="anchors and their candidates (default: beside --out, runs/synthetic_preview.png)")
    p.add_argument("--sweep", help="the same anchors across w (default: beside --out, runs/synthetic_w_sweep.png)")
    return p.parse_args(argv)


def check_settings(s, ddpm_settings):
    if not 0 <= s["w"] <= 1:
        fail(f"--w must be in [0, 1] (1: plain sampling, 0: only the anchor's bottleneck), got {s['w']}")
    if not 0 <= s["eta"] <= 1:   # above 1 the DDIM update would take the square root of a negative number
        fail(f"--eta must be in [0, 1] (0: deterministic DDIM), got {s['eta']}")
    for k, flag in (("K", "--K"), ("S", "--steps"), ("batch_size", "--batch-size")):
        if s[k] < 1:
            fail(f"{flag} must be a positive whole number, got {s[k]}")
    if s["num_anchors"] is not None and s["num_anchors"] < 1:
        fail(f"--num-anchors must be a positive whole number, got {s['num_anchors']}")
    levels, blocks = len(ddpm_settings["ch_mult"]), ddpm_settings["num_res_blocks"]
    most = 1 + 1 + levels * blocks + levels - 1   # the bottleneck + every skip (input conv, blocks, down-samplings)
    if not 1 <= s["interp_layers"] <= most:
        fail(f"--interp-layers must be between 1 (the bottleneck only) and {most} (the bottleneck and every skip "
             f"connection of this DDPM), got {s['interp_layers']}")


def load_ddpm(args, s, explicit):
    """The DDPM checkpoint, refused unless it has EMA weights and fits the data set and size asked for;
    the data set, folder and size not given as flags are taken from it."""
    train_ddpm = command("ddpm.py", args, out=args.ddpm, default_out="runs/ddpm.pt")
    ckpt = load_artifact(args.ddpm, ("ema", "settings", "data", "step"), "a ddpm.py checkpoint with EMA weights",
                         train_ddpm)
    ds = ckpt["settings"]
    for key, flag in (("dataset", "--dataset"), ("image_size", "--image-size")):
        if key in explicit and explicit[key] != ds[key]:
            dataset, size = s["dataset"] or ds["dataset"], s["image_size"] or ds["image_size"]
            new = os.path.join(os.path.dirname(args.ddpm), f"ddpm_{dataset}_{size}px.pt")
            fail(f"{args.ddpm} was trained on {ds['dataset']} at {ds['image_size']}x{ds['image_size']} pixels, "
                 f"but {flag} {explicit[key]} was asked for: first train a DDPM for it with "
                 f"{command('ddpm.py', args, '--dataset', dataset, '--image-size', size, '--out', new)} and "
                 f"pass --ddpm {new}, or drop {flag}")
    if s["S"] > ds["T"]:
        fail(f"--steps must be at most the DDPM's T = {ds['T']}, got {s['S']}")
    if not ckpt.get("finished", True):
        print(f"note: {args.ddpm} is an unfinished run (step {ckpt.get('step')}/{ds.get('steps')}); "
              f"{command('ddpm.py', args, '--resume', '--out', args.ddpm)} finishes it and gives better "
              f"candidates", flush=True)
    for key in ("dataset", "data_dir", "image_size"):          # default to what the DDPM was trained on
        s[key] = s[key] if s[key] is not None else ds[key]
    return ckpt


def load_anchors(s, ckpt, args):
    """The anchors: the images ddpm.py learnt from (STL-10: the unlabeled split), exactly as it saw them
    (no augmentation), so anchor i is
    image i; refused unless it is the very data the DDPM was trained on (same fingerprint)."""
    x_train, y_train, classes = load_dataset(s["dataset"], s["data_dir"], "pretrain", s["image_size"])
    info = data_info(s["dataset"], x_train, y_train, classes)
    require_same_data(info, ckpt["data"], f"{args.ddpm} was trained on",
                      f"the folder under {s['data_dir']!r} may have changed: point --data-dir at the data ddpm.py "
                      f"used, or delete {args.ddpm} and train it again on this data with "
                      + command("ddpm.py", args, "--dataset", s["dataset"], "--data-dir", s["data_dir"],
                                "--image-size", s["image_size"], out=args.ddpm, default_out="runs/ddpm.pt"))
    N = info["num_train"] if s["num_anchors"] is None else s["num_anchors"]
    if N > info["num_train"]:
        fail(f"--num-anchors {N} is more than the {info['num_train']} training images; pass at most that")
    s["num_anchors"] = N                       # recorded as a number: "all" and "--num-anchors N" agree
    return x_train[:N], info


def make_sampler(ckpt, s, args, device):
    """The EMA weights in eval mode (dropout off), as the authors sample, the noise schedule, the
    autocast dtype, and the model call compiled or not; returns the Sampler and whether it compiles."""
    unet = build_unet(ckpt["settings"])
    try:
        unet.load_state_dict(ckpt["ema"])
    except RuntimeError:
        fail(f"the EMA weights in {args.ddpm} do not fit its own settings; delete it and train it again with "
             f"{command('ddpm.py', args, out=args.ddpm, default_out='runs/ddpm.pt')}")
    unet = unet.to(device).eval().requires_grad_(False)   # NCHW: ddpm.py says why, not channels_last
    ds = ckpt["settings"]
    abar = make_schedule(ds["T"], ds["beta_1"], ds["beta_T"]).to(device)
    amp = autocast_dtype(args.precision, device)          # bf16 on recent GPUs, fp16 on older ones, CPU: fp32
    # On a GPU the sampler's model call (2 encoder passes, the interpolation, 1 decoder pass) is
    # compiled once for its fixed batch shape: eager, its passes are bound by GroupNorm, SiLU and the
    # casts between them, not by the convolutions, so bf16 gains little over fp32; inductor fuses them
    # (`python tests/benchmark.py --stages 2` times eager against compiled). At this batch size the GPU,
    # not the kernel launches, is the limit, so no CUDA graphs ("reduce-overhead") here.
    compiled = compile_enabled(args.compile, device)
    eps_fn = interpolated_eps
    if compiled:              # a compile failure on this GPU: one sentence, then eager
        eps_fn = with_eager_fallback(torch.compile(interpolated_eps), lambda: interpolated_eps,
                                     "sampler's model call", device)
    rows = max(1, s["batch_size"] // s["K"]) * s["K"]     # whole anchors per batch, each repeated K times
    return Sampler(unet, abar, s["S"], s["eta"], s["seed"], rows, amp, eps_fn, s["interp_layers"]), compiled


def weights_fingerprint(state):
    """A number that changes when the DDPM's weights do: the batches of an unfinished run are reused
    only with the very DDPM that made them."""
    return float(sum(v.double().abs().sum() for v in state.values() if v.is_floating_point()))


def flops_per_sampler_step(unet, image_size, device, layers=1):
    """FLOPs of one sampler step on one image (2 encodes + 1 decode), for the MFU on a known GPU."""
    x1 = torch.zeros(1, 3, image_size, image_size, device=device)
    t1 = torch.zeros(1, dtype=torch.long, device=device)
    with torch.no_grad():
        return count_flops(lambda: interpolated_eps(unet, x1, x1, t1, 0.5, layers))


if __name__ == "__main__":
    run_main(main, sys.argv[1:], "rerun with a smaller --batch-size",
             "the finished batches are kept in the .parts folder beside --out: rerun the same command to resume")
