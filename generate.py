"""Stage 2 of CLSP: make K synthetic positives for every training image with the trained DDPM.

CLSP (Zeng et al., ECCV 2024) samples new images from pure noise with the stage-1 DDPM while pulling
the UNet's bottleneck features h towards those of a real training image x_a, the "anchor":

    h_anchor, _, _ = encode(x_a noised to step t)         # the anchor's semantics at this noise level
    h, skips, temb = encode(x_t, t)                       # the sample's own features
    eps = decode(w * h + (1 - w) * h_anchor, skips, temb) # interpolate the bottleneck only

at every step of a DDIM sampler (Song et al. 2021). The deep features h carry what the image shows, the
skip connections carry how it looks, so the result keeps the anchor's content with a new background,
pose and colour: a *hard* positive. The authors use w = 0.1 (90% anchor), S = 100 DDIM steps,
eta = 0.1 and K = 8 candidates for each of the 50,000 training images (400,000 images, 1.2 GB).

    python generate.py                              # standard preset: K = 8, S = 100, every training image
    python generate.py --preset quick               # K = 2, S = 25: for the ~10 minute pipeline
    python generate.py --preset tiny --dataset folder --data-dir DIR    # seconds on a CPU, for tests
    python generate.py --w 1                        # plain unconditional DDIM samples, for comparison

Reads:  runs/ddpm.pt (the EMA weights; its data set and image size are the defaults here) and the
        training images (the anchors, in the order ddpm.load_dataset gives them).
Writes: runs/synthetic.pt: images uint8 [N, K, 3, S, S], candidate k of training image i is images[i, k];
        runs/synthetic_preview.png: each row an anchor (first column) and its K candidates;
        runs/synthetic_w_sweep.png: the same anchors sampled with w = 0, 0.1, 0.25, 0.5, 1.
        While it runs, finished batches are kept in runs/synthetic.pt.parts/, so an interrupted run,
        restarted with the same command, resumes where it stopped.
Time:   tiny: about 6 s on an idle 2-core CPU. On a GPU: not yet measured (the goal is the
        full standard set, 400,000 images x 100 steps, in under 15 minutes on one H100).
"""

import argparse
import math
import os
import shutil
import sys
import time

import torch

from ddpm import (PRECISIONS, Progress, atomic_save, autocast_dtype, build_unet, compile_enabled, count_flops, ddim_step,
                  ddim_timesteps, data_info, fail, load_artifact, load_dataset, make_schedule, peak_flops,
                  pick_device, q_sample, refuse_to_overwrite, resolve_settings, run_main, save_grid, to_uint8)

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
    # 100). 50,000 x 2 x 25 = 2.5 M sampler steps: a minute or two on an H100 (a reasoned guess, not yet
    # measured).
    "quick": dict(K=2, S=25),
    "standard": dict(),
    "paper": dict(),    # the standard preset already is the authors' recipe (their bigger UNet is ddpm.py's)
}
SWEEP_W = [0.0, 0.1, 0.25, 0.5, 1.0]   # the columns of synthetic_w_sweep.png; w = 1 is plain sampling


# ------------------------------------------------------------------------------------------------
# The interpolated DDIM sampler: ddpm.ddim_sample with one change, how eps is computed.
# ------------------------------------------------------------------------------------------------

def interpolated_eps(unet, x_t, xa_t, t, w):
    """eps for the sample x_t, with its bottleneck pulled towards the (noised) anchor's by 1 - w.
    w: a number, or a 0-d tensor (then a compiled sampler serves every w without recompiling)."""
    h, skips, temb = unet.encode(x_t, t)       # the sample's bottleneck h, its skips, the time embedding
    h_anchor, _, _ = unet.encode(xa_t, t)      # the anchor's bottleneck (its skips are not used)
    h = (w * h + (1 - w) * h_anchor).to(h.dtype)   # the CLSP interpolation, on the bottleneck only
    return unet.decode(h, skips, temb).float() # the skips come from the sample: its appearance


@torch.no_grad()
def interpolated_ddim_sample(unet, x_T, x_a, abar, w, S, eta, generator, anchor_generator,
                             eps_fn=interpolated_eps):
    """DDIM from x_T towards the anchors x_a (in [-1, 1], one per row of x_T). The step noise is drawn
    from `generator` exactly as ddpm.ddim_sample draws it, so with w = 1 both return the same tensor; the
    anchor's noise comes from its own `anchor_generator`, so it does not shift the sample's stream.
    eps_fn: interpolated_eps, or the same function compiled."""
    x = x_T
    steps = ddim_timesteps(S, abar.numel())
    for t, t_next in zip(steps, steps[1:] + [-1]):             # t_next = -1: the last step returns x0
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        # The anchor is noised to the same t with fresh noise at every step, so its features are those
        # the UNet expects at this noise level (as in the authors' sampler).
        xa_t = q_sample(x_a, tt, torch.randn(x_a.shape, device=x.device, generator=anchor_generator), abar)
        eps = eps_fn(unet, x, xa_t, tt, w)
        noise = torch.randn(x.shape, device=x.device, generator=generator) if t_next >= 0 else None
        x = ddim_step(x, eps, t, t_next, abar, eta, noise)     # Song et al. eq. 12, shared with ddpm.py
    return x


def generators(seed, b, device):
    """Two seeded random streams for batch b: x_T and the DDIM noise, and the anchors' noise. Seeding by
    batch (not by run) is what makes a resumed run give exactly the images an uninterrupted one gives."""
    base = 2 * (seed * 1_000_003 + b)
    return torch.Generator(device).manual_seed(base), torch.Generator(device).manual_seed(base + 1)


def make_candidates(unet, anchors, K, w, S, eta, seed, b, abar, rows, amp=None, eps_fn=interpolated_eps):
    """uint8 anchors [A, 3, H, W] -> uint8 candidates [A, K, 3, H, W], from batch b's random streams.

    The batch is padded with blank anchors to `rows` images, so every call has the same shape: a
    compiled sampler then compiles once (a last, smaller batch would compile it again, a minute)."""
    A, device = anchors.shape[0], abar.device
    x_a = (anchors.to(device).float() / 127.5 - 1).repeat_interleave(K, dim=0)   # rows: a0 x K, a1 x K, ...
    x_a = torch.cat([x_a, x_a.new_zeros(rows - x_a.shape[0], *x_a.shape[1:])])     # padding, dropped below
    g, g_anchor = generators(seed, b, device)
    x_T = torch.randn(x_a.shape, device=device, generator=g)   # every candidate its own x_T: independent
    w = torch.tensor(float(w), device=device)                  # a tensor: one compile for every w
    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):   # amp: the autocast dtype
        x = interpolated_ddim_sample(unet, x_T, x_a, abar, w, S, eta, g, g_anchor, eps_fn)[:A * K]
    if not torch.isfinite(x).all():
        fail("the sampler produced NaN or inf values: the DDPM checkpoint looks broken; retrain it with "
             "`python ddpm.py`")
    return to_uint8(x).contiguous().view(A, K, *x.shape[1:]).cpu()   # contiguous: NCHW, not channels_last


def mean_abs_diff(a, b):
    """Mean |pixel difference| in [0, 255] units over every colour value (an L1 distance per value)."""
    return (a.float() - b.float()).abs().mean().item()


# ------------------------------------------------------------------------------------------------
# Settings, checkpoint and data: every mismatch is refused with a sentence that says what to run.
# ------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Stage 2 of CLSP: synthetic positives by interpolated DDIM sampling.")
    p.add_argument("--preset", default="standard", help="tiny | quick | standard | paper (default: %(default)s)")
    p.add_argument("--dataset", help="cifar10 | cifar100 | folder (default: the DDPM's)")
    p.add_argument("--data-dir", help="where the training images are (default: where the DDPM found them)")
    p.add_argument("--image-size", type=int, help="must be the DDPM's (default: the DDPM's)")
    p.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--seed", type=int, help="random seed of the samples (standard: 0)")
    p.add_argument("--w", type=float,
                   help="weight of the sample's own bottleneck, in [0, 1]; 1 = plain sampling (standard: 0.1)")
    p.add_argument("--steps", dest="S", type=int, help="DDIM steps S (standard: 100)")
    p.add_argument("--eta", type=float, help="DDIM noise, 0 = deterministic, in [0, 1] (standard: 0.1)")
    p.add_argument("--K", type=int, help="candidates per training image (standard: 8)")
    p.add_argument("--num-anchors", type=int, help="only the first N training images (standard: all)")
    p.add_argument("--batch-size", type=int, help="images per batch, best a multiple of K (standard: 2048)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="autocast dtype; auto: bf16 on A100/H100-class GPUs, fp16 on older ones, fp32 on a CPU")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="torch.compile the sampler's model call (default: on with a CUDA GPU, off on a CPU)")
    p.add_argument("--ddpm", default="runs/ddpm.pt", help="the DDPM checkpoint made by ddpm.py (default: %(default)s)")
    p.add_argument("--out", default="runs/synthetic.pt", help="the candidate set to write (default: %(default)s)")
    p.add_argument("--preview", default="runs/synthetic_preview.png", help="anchors and their candidates (default: %(default)s)")
    p.add_argument("--sweep", default="runs/synthetic_w_sweep.png", help="the same anchors across w (default: %(default)s)")
    return p.parse_args(argv)


def check_settings(s):
    if not 0 <= s["w"] <= 1:
        fail(f"--w must be in [0, 1] (1: plain sampling, 0: only the anchor's bottleneck), got {s['w']}")
    if not 0 <= s["eta"] <= 1:   # above 1 the DDIM update would take the square root of a negative number
        fail(f"--eta must be in [0, 1] (0: deterministic DDIM), got {s['eta']}")
    for k, flag in (("K", "--K"), ("S", "--steps"), ("batch_size", "--batch-size")):
        if s[k] < 1:
            fail(f"{flag} must be a positive whole number, got {s[k]}")
    if s["num_anchors"] is not None and s["num_anchors"] < 1:
        fail(f"--num-anchors must be a positive whole number, got {s['num_anchors']}")


def load_ddpm(path, s, explicit):
    """The DDPM checkpoint, refused unless it has EMA weights and fits the data set and size asked for."""
    ckpt = load_artifact(path, "ddpm.py")
    if not isinstance(ckpt, dict) or not {"ema", "settings", "data"} <= ckpt.keys():
        fail(f"{path} is not a ddpm.py checkpoint with EMA weights; run `python ddpm.py` to make one")
    ds = ckpt["settings"]
    for key, flag in (("dataset", "--dataset"), ("image_size", "--image-size")):
        if key in explicit and explicit[key] != ds[key]:
            fail(f"{path} was trained on {ds['dataset']} at {ds['image_size']}x{ds['image_size']} pixels, "
                 f"but {flag} {explicit[key]} was asked for: first train a DDPM for it with `python ddpm.py "
                 f"--dataset {s['dataset'] or ds['dataset']} --image-size {s['image_size'] or ds['image_size']}`, "
                 f"or drop {flag}")
    if s["S"] > ds["T"]:
        fail(f"--steps must be at most the DDPM's T = {ds['T']}, got {s['S']}")
    if not ckpt.get("finished", True):
        print(f"note: {path} is an unfinished run (step {ckpt.get('step')}/{ds.get('steps')}); "
              f"`python ddpm.py --resume` finishes it and gives better candidates", flush=True)
    return ckpt


def main(argv=None):
    args = parse_args(argv)
    s, explicit = resolve_settings(args, DEFAULTS, PRESETS)
    check_settings(s)
    device = pick_device(args.device)
    ckpt = load_ddpm(args.ddpm, s, explicit)
    ds = ckpt["settings"]
    for key in ("dataset", "data_dir", "image_size"):          # default to what the DDPM was trained on
        s[key] = s[key] if s[key] is not None else ds[key]

    # The anchors: the training split exactly as ddpm.py saw it (no augmentation), so anchor i is image i.
    x_train, _, classes = load_dataset(s["dataset"], s["data_dir"], "train", s["image_size"])
    info = data_info(s["dataset"], x_train, classes)
    if info != ckpt["data"]:
        fail(f"the training data under {s['data_dir']!r} ({info}) is not what {args.ddpm} was trained on "
             f"({ckpt['data']}); the folder may have changed: point --data-dir at the data ddpm.py used, "
             f"or retrain with `python ddpm.py --dataset {s['dataset']} --data-dir {s['data_dir']}`")
    N = info["num_train"] if s["num_anchors"] is None else s["num_anchors"]
    if N > info["num_train"]:
        fail(f"--num-anchors {N} is more than the {info['num_train']} training images; pass at most that")
    s["num_anchors"] = N                       # recorded as a number: "all" and "--num-anchors N" agree
    K = s["K"]
    A = max(1, s["batch_size"] // K)           # anchors per batch, each repeated K times
    n_batches = math.ceil(N / A)
    x_train = x_train[:N].to(device)           # uint8 on the device: 150 MB for all of CIFAR-10

    # The EMA weights in eval mode (dropout off), as the authors sample.
    unet = build_unet(ds)
    try:
        unet.load_state_dict(ckpt["ema"])
    except RuntimeError:
        fail(f"the EMA weights in {args.ddpm} do not fit its own settings; retrain with `python ddpm.py`")
    unet = unet.to(device).eval().requires_grad_(False)   # NCHW: ddpm.py says why, not channels_last
    abar = make_schedule(ds["T"], ds["beta_1"], ds["beta_T"]).to(device)
    amp = autocast_dtype(args.precision, device)   # bf16 on recent GPUs, fp16 on older ones, CPU: fp32
    # FLOPs of one sampler step on one image (2 encodes + 1 decode), for the MFU on a known GPU.
    peak, flops_step = peak_flops(device), None
    if peak:
        with torch.no_grad():
            x1 = torch.zeros(1, 3, s["image_size"], s["image_size"], device=device)
            t1 = torch.zeros(1, dtype=torch.long, device=device)
            flops_step = count_flops(lambda: interpolated_eps(unet, x1, x1, t1, s["w"]))
    # On a GPU the sampler's model call (2 encoder passes, the interpolation, 1 decoder pass) is compiled
    # once for its fixed batch shape: eager, a batch of 2,048 took as long in bf16 as in fp32 (114 ms a
    # forward pass), bound by GroupNorm, SiLU and the casts between them, which inductor fuses. At this
    # batch size the GPU, not the kernel launches, is the limit, so no CUDA graphs ("reduce-overhead").
    compiled = compile_enabled(args.compile, device)
    eps_fn = torch.compile(interpolated_eps) if compiled else interpolated_eps
    print(f"{N} anchors x K = {K} candidates, S = {s['S']} DDIM steps, w = {s['w']}, eta = {s['eta']}; "
          f"{A} anchors ({A * K} images) per batch; DDPM {args.ddpm} (step {ckpt['step']}); device {device}, "
          f"autocast {amp or 'off (fp32)'}, compile {'on (the first batch compiles, about a minute)' if compiled else 'off'}",
          flush=True)

    # Resuming: finished batches live in <out>.parts/ next to a manifest of what made them. Only a run
    # with the same manifest may use them, so one candidate set never mixes two settings or two DDPMs.
    refuse_to_overwrite(args.out, "it is ready for `python clsp.py`")
    parts = args.out + ".parts"
    fingerprint = float(sum(v.double().abs().sum() for v in ckpt["ema"].values() if v.is_floating_point()))
    manifest = dict(settings={**{k: v for k, v in s.items() if k not in ("data_dir", "preview_anchors")},
                              "autocast": str(amp or "fp32"), "compile": compiled},   # other pixels
                    data=info, ddpm=dict(step=ckpt["step"], fingerprint=fingerprint))
    chunk_path = lambda b: os.path.join(parts, f"batch_{b:06d}.pt")
    chunks = {}
    if os.path.isdir(parts):
        try:
            old = torch.load(os.path.join(parts, "manifest.pt"), weights_only=True)
        except Exception:
            fail(f"{parts} holds an unfinished run but no readable manifest; delete {parts} and run again")
        if old != manifest:
            diff = {k: (old["settings"].get(k), v) for k, v in manifest["settings"].items()
                    if old["settings"].get(k) != v}
            fail(f"{parts} holds an unfinished run made with other settings or another DDPM "
                 f"({diff or 'the DDPM checkpoint or the data changed'}, as (then, now)); rerun with the old "
                 f"settings to finish it, or delete {parts} to start afresh")
        for b in range(n_batches):
            try:
                chunks[b] = torch.load(chunk_path(b), weights_only=True)["images"]
            except Exception:
                pass                            # not written yet (or unreadable): it is simply made again
        print(f"resuming: {len(chunks)}/{n_batches} batches already done in {parts}", flush=True)
    else:
        os.makedirs(parts)
        atomic_save(manifest, os.path.join(parts, "manifest.pt"))

    # ------------------------------------------------------------------------------------------------
    # The main loop: batch b makes the candidates of anchors b*A .. b*A+A-1, from its own random streams.
    # ------------------------------------------------------------------------------------------------
    done = sum(c.shape[0] for c in chunks.values())
    progress = Progress(N, done, "anchor", K, flops_step and K * s["S"] * flops_step, peak, warming=compiled)
    t_start = t0 = time.perf_counter()
    made = 0
    rows = A * K                               # every sampler call has this many images (padded)

    def sample(anchors, K, w, b):
        return make_candidates(unet, anchors, K, w, s["S"], s["eta"], s["seed"], b, abar, rows, amp, eps_fn)

    try:
        for b in range(n_batches):
            if b in chunks:
                continue
            chunks[b] = sample(x_train[b * A:(b + 1) * A], K, s["w"], b)
            atomic_save({"images": chunks[b]}, chunk_path(b))   # the .cpu() above waited for the GPU
            done, made = done + chunks[b].shape[0], made + chunks[b].shape[0] * K
            if progress.warmup == "compiling":
                progress.warmed_up(done, "compile")
                t0, made = time.perf_counter(), 0   # images/s below: after the compile
            if progress.due(10) or done == N:       # a line every ~10 s
                progress.line(done, batch=f"{b + 1}/{n_batches}")
        images = torch.cat([chunks[b] for b in range(n_batches)])  # [N, K, 3, S, S], row i = anchor i
        seconds, rate = time.perf_counter() - t_start, made / (time.perf_counter() - t0) if made else None

        # The w sweep: anchors spread over the data set (a folder sorted by class shows several classes),
        # as many as one batch holds, sampled once per w with the same random streams (batch index -1),
        # so only w changes from column to column.
        idx = torch.linspace(0, N - 1, min(rows, N)).round().long()
        real = x_train[idx].cpu()
        sweep = [sample(x_train[idx], 1, w, -1)[:, 0] for w in SWEEP_W]
        # Pictures of a few of them: each anchor with its K candidates, and the same anchor across w.
        show = torch.linspace(0, len(idx) - 1, min(s["preview_anchors"], len(idx))).round().long()
        save_grid(torch.cat([real[show, None], images[idx[show]]], 1).flatten(0, 1), args.preview, nrow=1 + K)
        save_grid(torch.stack([real[show]] + [x[show] for x in sweep], 1).flatten(0, 1), args.sweep,
                  nrow=1 + len(SWEEP_W))
    except KeyboardInterrupt:
        fail(f"interrupted with {done}/{N} anchors done; the finished batches are kept in {parts}: "
             f"rerun the same command to resume")
    except torch.cuda.OutOfMemoryError:
        fail(f"out of GPU memory at --batch-size {s['batch_size']}; rerun with a smaller --batch-size "
             f"(and delete {parts}: its batches were made with this batch size)")

    # The effect, measured: how far the candidates are from their anchor, and from each other, with two
    # unrelated training images for scale. On at most the first 1000 anchors (enough for a mean).
    n = min(N, 1000)
    c, a = images[:n], x_train[:n].cpu()
    summary = dict(
        metric="mean |pixel difference| in [0, 255] units (L1 per colour value)", anchors_measured=n,
        anchor_to_candidate=mean_abs_diff(c, a[:, None]),
        between_candidates=(sum(mean_abs_diff(c[:, i], c[:, j]) for i in range(K) for j in range(i + 1, K))
                            / (K * (K - 1) / 2)) if K > 1 else None,
        anchor_to_other_image=mean_abs_diff(a, a.roll(1, 0)) if n > 1 else None,
        anchor_to_sample_by_w={str(w): mean_abs_diff(x, real) for w, x in zip(SWEEP_W, sweep)},
        seconds=seconds, images_per_second=rate)
    fmt = lambda v: "n/a" if v is None else f"{v:.1f}"
    print(f"summary: {summary['metric']}, over the first {n} anchors\n"
          f"  anchor    <-> its candidates:             {fmt(summary['anchor_to_candidate'])}\n"
          f"  candidate <-> candidate, same anchor:     {fmt(summary['between_candidates'])}\n"
          f"  anchor    <-> another training image:     {fmt(summary['anchor_to_other_image'])}  (for scale)\n"
          f"  anchor    <-> sample by w ({len(idx)} anchors):  "
          + ", ".join(f"w={w}: {v:.1f}" for w, v in summary["anchor_to_sample_by_w"].items()), flush=True)

    atomic_save(dict(images=images, anchor_index=torch.arange(N), settings=s, data=info,
                     ddpm=dict(path=args.ddpm, step=ckpt["step"], settings=ds), summary=summary), args.out)
    shutil.rmtree(parts)                        # only now: the final file is complete
    print(f"wrote {args.out} ({N} x {K} candidates, {images.numel() / 1e6:.0f} MB), {args.preview} "
          f"and {args.sweep}", flush=True)


if __name__ == "__main__":
    run_main(main, sys.argv[1:], "rerun with a smaller --batch-size")
