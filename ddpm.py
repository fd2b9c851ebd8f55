"""Stage 1 of CLSP: train a small unconditional DDPM (Ho et al. 2020) from scratch.

CLSP ("Contrastive Learning with Synthetic Positives", Zeng et al., ECCV 2024, arXiv 2408.16965) makes
hard positives for contrastive learning with a diffusion model. This file trains that diffusion model.

The model learns to undo the forward (noising) process

    q(x_t | x_0) = N( sqrt(abar_t) x_0, (1 - abar_t) I ),   abar_t = prod_{s<=t} (1 - beta_s)

by predicting the noise: L = || eps - eps_theta( sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t ) ||^2
(Ho et al., Algorithm 1). The UNet is split into `encode` (down path + middle, giving the bottleneck
features h) and `decode` (up path), because stage 2 (`generate.py`) interpolates h between a sample
and a real "anchor" image.

    python ddpm.py                                   # standard preset: CIFAR-10, ch 64 UNet
    python ddpm.py --preset quick                    # the short DDPM of the ~10 minute pipeline
    python ddpm.py --preset tiny --dataset folder --data-dir DIR   # seconds on a CPU, for tests
    python ddpm.py --resume                          # continue an interrupted run

Reads:  the training images (--dataset cifar10 | cifar100 | folder, --data-dir); it also checks that
        the test images the later stages need are there.
Writes: runs/ddpm.pt (raw + EMA weights, optimiser, step, settings; checkpointed as it trains)
        runs/ddpm_samples.png (an 8x8 grid of DDIM samples from the EMA weights; named after --out).
Time:   tiny: 5.6 s on a 2-core CPU (the whole command). On a GPU: not yet measured with the compiled
        training step.

Read top to bottom: the settings, the forward process, the UNet, the DDIM sampler and the training
loop; then, under their own heading, the small pieces of plumbing that every stage shares (data,
safe artifacts, progress lines, Ctrl-C), which generate.py, clsp.py and evaluate.py import from here.
"""

import argparse
import contextlib
import glob
import hashlib
import json
import math
import os
import shlex
import shutil
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ------------------------------------------------------------------------------------------------
# Settings. `standard` is the default; a preset changes some values; an explicit flag wins over both.
# ------------------------------------------------------------------------------------------------

DEFAULTS = dict(  # the `standard` preset: the authors' recipe with the design card's small UNet
    dataset="cifar10", data_dir="data", image_size=32, seed=0,
    ch=64, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_res=16, dropout=0.1,   # authors: ch 128
    T=1000, beta_1=1e-4, beta_T=0.02,                                          # Ho et al.
    batch_size=128, lr=2e-4, warmup=5000, grad_clip=1.0, ema_decay=0.9999,     # Ho et al. / authors
    steps=60_000,                      # authors: batch 4 x 50, 2000 epochs (~500k steps); Ho et al.: 800k at 128
    sample_steps=100, eta=0.0,         # DDIM sampler used for the picture at the end
    log_every=200, save_every=5000,
)
PRESETS = {
    # seconds on a CPU: a toy UNet (2 levels, 1 block each) that shows the loop works; numbers mean nothing
    # (16x16 images: a 2-core CPU trains ~25 images/s at 32x32 even with this toy UNet)
    "tiny": dict(image_size=16, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_res=8, batch_size=16,
                 steps=20, warmup=10, ema_decay=0.9, sample_steps=5, log_every=5, save_every=10),
    # the DDPM of the ~10 minute quick pipeline (its GPU time is not yet measured)
    "quick": dict(steps=8_000, warmup=1000, ema_decay=0.999, save_every=2000),
    "standard": dict(),
    # the authors' model, the 35.7 M UNet of Ho et al., trained on as many images as theirs saw (102 M:
    # they ran batch 200 for ~500k steps on 4 GPUs), in fewer, larger steps, which suit one GPU better
    "paper": dict(ch=128, batch_size=512, steps=200_000, ema_decay=0.9999),
}
FREE_ON_RESUME = {"data_dir", "log_every", "save_every", "sample_steps"}   # flags --resume may change


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Stage 1 of CLSP: train a small UNet DDPM.")
    add = settings_adder(p, DEFAULTS, PRESETS)   # each help ends with the default, read from DEFAULTS
    add("--dataset", "cifar10 | cifar100 | folder (an image folder DIR/train/<class>/*, DIR/test/<class>/*)")
    add("--data-dir", "where the data set is, or is downloaded to")
    add("--image-size", "images are resized to this", type=int)
    add("--seed", "random seed", type=int)
    add("--ch", "UNet base width; 64 -> 9 M parameters, 128 -> 35.7 M", type=int)
    add("--ch-mult", "width multiplier per resolution level", type=lambda v: tuple(int(c) for c in v.split(",")))
    add("--num-res-blocks", "residual blocks per level", type=int)
    add("--dropout", "dropout in the residual blocks", type=float)
    add("--steps", "optimiser steps in all", type=int)
    add("--batch-size", "images per step", type=int)
    add("--lr", "Adam learning rate after warm-up", type=float)
    add("--warmup", "linear learning-rate warm-up steps", type=int)
    add("--ema-decay", "EMA decay of the weights used to sample", type=float)
    add("--sample-steps", "DDIM steps for the sample grid", type=int)
    add("--log-every", "print a progress line every N steps (and at least every 30 s)", type=int)
    add("--save-every", "write the checkpoint every N steps", type=int)
    add_run_flags(p, "the training step")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out to its final step")
    p.add_argument("--out", default="runs/ddpm.pt", help="the checkpoint / artifact to write (default: %(default)s)")
    p.add_argument("--samples", help="the sample grid to write (default: beside --out, runs/ddpm_samples.png)")
    return p.parse_args(argv)


def check_settings(s):
    positive = ["image_size", "ch", "num_res_blocks", "steps", "batch_size", "warmup", "sample_steps",
                "log_every", "save_every"]
    for k in positive:
        if s[k] < (0 if k == "warmup" else 1):
            fail(f"--{k.replace('_', '-')} must be a positive whole number, got {s[k]}")
    if s["ch"] % 32:
        fail(f"--ch must be a multiple of 32 (GroupNorm uses 32 groups), got {s['ch']}")
    if not 0 <= s["dropout"] < 1:
        fail(f"--dropout must be in [0, 1), got {s['dropout']}")
    if not 0 <= s["ema_decay"] < 1:
        fail(f"--ema-decay must be in [0, 1), got {s['ema_decay']}")
    if not (s["lr"] > 0 and math.isfinite(s["lr"])):
        fail(f"--lr must be a positive number, got {s['lr']}")
    if s["image_size"] % 2 ** (len(s["ch_mult"]) - 1):
        fail(f"--image-size {s['image_size']} must be divisible by 2^(levels-1) = {2 ** (len(s['ch_mult']) - 1)}")
    if s["sample_steps"] > s["T"]:
        fail(f"--sample-steps must be at most T = {s['T']}")


# ------------------------------------------------------------------------------------------------
# The forward process. Ho et al. eq. (4): x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps.
# ------------------------------------------------------------------------------------------------

def make_schedule(T=1000, beta_1=1e-4, beta_T=0.02):
    """abar_t for t = 0..T-1 (index 0 is the paper's t = 1), computed in float64 then stored as float32."""
    beta = torch.linspace(beta_1, beta_T, T, dtype=torch.float64)   # linear schedule, Ho et al. sec. 4
    abar = torch.cumprod(1.0 - beta, dim=0)
    return abar.float()


def q_sample(x0, t, eps, abar):
    """Noise clean images x0 to step t in one jump (the closed form of q(x_t | x_0))."""
    a = abar[t].view(-1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * eps


def ddpm_loss(model, x0, abar, t=None, eps=None):
    """Algorithm 1 of Ho et al.: t ~ Uniform, eps ~ N(0, I), minimise ||eps - eps_theta(x_t, t)||^2.
    t and eps are drawn here unless given (the training step draws them outside its compiled part)."""
    t = torch.randint(0, abar.numel(), (x0.shape[0],), device=x0.device) if t is None else t
    eps = torch.randn_like(x0) if eps is None else eps
    x_t = q_sample(x0, t, eps, abar)
    return F.mse_loss(model(x_t, t).float(), eps)


# ------------------------------------------------------------------------------------------------
# The UNet (the DDPM CIFAR-10 layout). ch 128 -> 35.7 M parameters (the authors'), ch 64 -> 9.0 M.
# ------------------------------------------------------------------------------------------------

def timestep_embedding(t, dim):
    """Sinusoidal embedding of the step t (as in the Transformer), [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / (half - 1))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm(32, ch) that, on a GPU under bf16/fp16 autocast, runs in the input's dtype.

    Autocast runs group_norm in fp32, so every GroupNorm of an eager bf16 step cast its input up and its
    output back down: a profile of one eager training step (H200, batch 128) counted about 900 copy
    kernels, a third of the GPU time, and bf16 ran slower than fp32. CUDA's GroupNorm kernel takes bf16
    and fp16 inputs and accumulates its mean and variance in fp32 itself, so the casts buy nothing.
    (Compiled, inductor fuses GroupNorm, SiLU and the casts anyway; this is for the eager path.)"""

    def forward(self, x):
        if torch.compiler.is_compiling() or not (x.is_cuda and torch.is_autocast_enabled("cuda")):
            return super().forward(x)
        with torch.autocast("cuda", enabled=False):
            return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class ResBlock(nn.Module):
    """GN-SiLU-conv, + the projected time embedding, GN-SiLU-dropout-conv, + (1x1-projected) input."""

    def __init__(self, in_ch, out_ch, tdim, dropout, attn=False):
        super().__init__()
        self.block1 = nn.Sequential(GroupNorm(32, in_ch), nn.SiLU(), nn.Conv2d(in_ch, out_ch, 3, padding=1))
        self.temb_proj = nn.Sequential(nn.SiLU(), nn.Linear(tdim, out_ch))
        self.block2 = nn.Sequential(GroupNorm(32, out_ch), nn.SiLU(), nn.Dropout(dropout),
                                    nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        self.attn = Attention(out_ch) if attn else nn.Identity()

    def forward(self, x, temb):
        h = self.block1(x) + self.temb_proj(temb)[:, :, None, None]
        h = self.block2(h) + self.shortcut(x)
        return self.attn(h)


class Attention(nn.Module):
    """Single-head self-attention over all H*W positions, with a residual connection."""

    def __init__(self, ch):
        super().__init__()
        self.norm = GroupNorm(32, ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).transpose(-1, -2).unbind(1)  # [B, HW, C]
        h = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]           # fused kernel
        return x + self.proj(h.transpose(-1, -2).reshape(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x, temb=None):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, temb=None):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class UNet(nn.Module):
    """eps_theta(x_t, t), split as decode(encode(x_t, t)) so stage 2 can edit the bottleneck h."""

    def __init__(self, ch=64, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_res=16, dropout=0.1, image_size=32):
        super().__init__()
        self.ch = ch
        tdim = 4 * ch
        self.temb = nn.Sequential(nn.Linear(ch, tdim), nn.SiLU(), nn.Linear(tdim, tdim))
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)

        # Down path: num_res_blocks ResBlocks per level, a stride-2 conv between levels. Every output is
        # remembered (`chans`) because the up path concatenates it back in (the UNet's skip connections).
        self.down, chans, now, res = nn.ModuleList(), [ch], ch, image_size
        for i, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                self.down.append(ResBlock(now, ch * mult, tdim, dropout, attn=(res == attn_res)))
                now = ch * mult
                chans.append(now)
            if i != len(ch_mult) - 1:
                self.down.append(Downsample(now))
                chans.append(now)
                res //= 2
        # Middle, at the lowest resolution (4x4 for 32x32 inputs): its output is the bottleneck h.
        self.mid = nn.ModuleList([ResBlock(now, now, tdim, dropout, attn=True),
                                  ResBlock(now, now, tdim, dropout)])
        # Up path, the mirror image: one more ResBlock per level, each eating one skip connection.
        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(ResBlock(chans.pop() + now, ch * mult, tdim, dropout, attn=(res == attn_res)))
                now = ch * mult
            if i != 0:
                self.up.append(Upsample(now))
                res *= 2
        self.out = nn.Sequential(GroupNorm(32, now), nn.SiLU(), nn.Conv2d(now, 3, 3, padding=1))
        self._init_weights()

    def _init_weights(self):
        # As in the DDPM reference code: Xavier-uniform everywhere, and the last layer of every residual
        # branch (and of the network) nearly zero, so each block starts as the identity.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, ResBlock):
                nn.init.xavier_uniform_(m.block2[-1].weight, gain=1e-5)
            if isinstance(m, Attention):
                nn.init.xavier_uniform_(m.proj.weight, gain=1e-5)
        nn.init.xavier_uniform_(self.out[-1].weight, gain=1e-5)

    def encode(self, x_t, t):
        """Input conv, down path and middle blocks -> (h, skips, temb). h: [B, 2ch, 4, 4] for 32x32."""
        temb = self.temb(timestep_embedding(t, self.ch))
        h = self.conv_in(x_t)
        skips = [h]
        for block in self.down:
            h = block(h, temb)
            skips.append(h)
        for block in self.mid:
            h = block(h, temb)
        return h, skips, temb

    def decode(self, h, skips, temb):
        """Up path (concatenating the skips, deepest first) and output layers -> eps."""
        skips = list(skips)          # a copy: the caller's list is left as it was
        for block in self.up:
            if isinstance(block, ResBlock):
                h = torch.cat([h, skips.pop()], dim=1)
            h = block(h, temb)
        return self.out(h)

    def forward(self, x_t, t):
        return self.decode(*self.encode(x_t, t))


def build_unet(s):
    return UNet(s["ch"], tuple(s["ch_mult"]), s["num_res_blocks"], s["attn_res"], s["dropout"], s["image_size"])


# ------------------------------------------------------------------------------------------------
# DDIM sampling (Song et al. 2021, eq. 12). eta = 0 is deterministic; eta = 1 is DDPM-like.
# ------------------------------------------------------------------------------------------------

def ddim_timesteps(S, T=1000):
    """S evenly spaced steps, from T-1 down: 999, 989, ..., 9 for S = 100 (then -1 means 'done').
    (i * T) // S rather than i * (T // S), so an S that does not divide T still spans the whole range."""
    return [T - 1 - (i * T) // S for i in range(S)]


def ddim_step(x, eps, t, t_next, abar, eta, noise):
    """One DDIM update x_t -> x_{t_next}, given the predicted eps. Returns x0 itself when t_next < 0."""
    a_t = abar[t]
    x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()            # the model's guess of the clean image
    if t_next < 0:
        return x0
    a_next = abar[t_next]
    sigma = eta * ((1 - a_next) / (1 - a_t)).sqrt() * (1 - a_t / a_next).sqrt()
    return a_next.sqrt() * x0 + (1 - a_next - sigma ** 2).sqrt() * eps + sigma * noise


@torch.no_grad()
def ddim_sample(model, x_T, abar, S=100, eta=0.0, generator=None):
    """Plain DDIM from x_T. The step noise is drawn from `generator`, so a seed fixes the result."""
    x = x_T
    steps = ddim_timesteps(S, abar.numel())
    for t, t_next in zip(steps, steps[1:] + [-1]):
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        eps = model(x, tt).float()
        noise = torch.randn(x.shape, device=x.device, generator=generator) if t_next >= 0 else None
        x = ddim_step(x, eps, t, t_next, abar, eta, noise)
    return x


def to_uint8(x):
    """[-1, 1] floats -> uint8 pixels, as the DDPM reference saves its samples."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


# ------------------------------------------------------------------------------------------------
# Training: the step, then the loop.
# ------------------------------------------------------------------------------------------------

def make_train_step(model, ema, opt, scaler, abar, amp, compiled, lr, warmup, grad_clip, ema_decay):
    """train_step(x_uint8, step) -> loss: one optimiser step of Algorithm 1 (Ho et al.) on a batch of
    uint8 training images, then the EMA update. Used by the loop below and by tests/benchmark.py."""
    weights, ema_weights = list(model.parameters()), list(ema.parameters())

    def loss_of(x_uint8, flip, t, eps):
        x0 = x_uint8.float() / 127.5 - 1.0                                  # [0, 255] -> [-1, 1]
        x0 = torch.where(flip, x0.flip(3), x0)                              # random horizontal flip
        with torch.autocast(x0.device.type, dtype=amp, enabled=amp is not None):
            return ddpm_loss(model, x0, abar, t, eps)

    # On a GPU the loss is compiled, and so its backward: inductor fuses GroupNorm, SiLU and the casts
    # into few kernels, and "reduce-overhead" replays forward and backward as two CUDA graphs, so the CPU
    # no longer issues the kernels one by one. Eager, a step at batch 128 was bound by those launches
    # (H200: batch 32 took 40.9 ms a step, batch 128 42.7 ms; 61 ms of CPU time for 28 ms of GPU work),
    # and in that profile the UNet alone, compiled with mode="reduce-overhead", took 14.2 ms a step. The
    # first steps compile (about a minute). Algorithm 1's random draws (flips, t, eps) stay outside the
    # graph, in plain PyTorch; dropout's are inside it, from inductor's own generator.
    if compiled:
        loss_of = torch.compile(loss_of, mode="reduce-overhead" if abar.is_cuda else "default")

    def train_step(x_uint8, step):
        B, device = x_uint8.shape[0], x_uint8.device
        flip = torch.rand(B, 1, 1, 1, device=device) < 0.5
        t = torch.randint(0, abar.numel(), (B,), device=device)            # t ~ Uniform({1..T})
        eps = torch.randn(x_uint8.shape, device=device)                    # eps ~ N(0, I)
        for g in opt.param_groups:                                          # linear warm-up
            g["lr"] = lr * min(1.0, (step + 1) / max(warmup, 1))
        opt.zero_grad(set_to_none=True)         # before the forward: no gradient outlives its step
        if compiled:
            torch.compiler.cudagraph_mark_step_begin()   # a new step: the last one's graph outputs are done
        loss = loss_of(x_uint8, flip, t, eps)
        scaler.scale(loss).backward()           # fp16: the loss times 2^k, so small gradients survive
        scaler.unscale_(opt)                    # the true gradients again, before they are clipped
        torch.nn.utils.clip_grad_norm_(weights, grad_clip)   # on the device: no host sync
        scaler.step(opt)                        # fp16: skipped when a gradient overflowed, then k shrinks
        scaler.update()
        # EMA of the weights. Our one addition to the recipe: the decay ramps up as (1+step)/(10+step)
        # (TensorFlow's ExponentialMovingAverage with num_updates), so a short run's EMA is not stuck
        # near the random init; it is 0.999 at step 9k and 0.99985 at the standard run's last step.
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():                   # one multi-tensor kernel for all weights
            torch._foreach_lerp_(ema_weights, weights, 1 - decay)
        return loss.detach()

    return train_step


def main(argv=None):
    args = parse_args(argv)
    s, explicit = resolve_settings(args, DEFAULTS, PRESETS)
    device = pick_device(args.device, args.preset)
    ckpt = None
    if args.resume:           # the checkpoint's own settings rule, so the run ends where it would have
        ckpt, s = load_for_resume(args.out, "ddpm.py", "ema", explicit, FREE_ON_RESUME)
    check_settings(s)
    x_train, classes, info = training_images(s, ckpt, args.out)
    samples_png = args.samples or beside(args.out, "_samples.png")

    # No other run writes these files until this one ends; Ctrl-C stops at the end of a step and saves.
    with claim_output(args.out, samples_png), StopFlag() as stop:
        if ckpt is None:
            refuse_to_overwrite(args.out, "continue it with `python ddpm.py --resume`")
        model, ema, opt, scaler, amp, step = make_model(s, args, device, ckpt)
        abar = make_schedule(s["T"], s["beta_1"], s["beta_T"]).to(device)
        compiled = compile_enabled(args.compile, device)
        train_step = make_train_step(model, ema, opt, scaler, abar, amp, compiled, s["lr"], s["warmup"],
                                     s["grad_clip"], s["ema_decay"])

        def save(final=False):
            atomic_save(dict(model=model.state_dict(), ema=ema.state_dict(), step=step, settings=s, data=info,
                             classes=classes, finished=final, num_params=sum(p.numel() for p in model.parameters()),
                             **training_state(opt, scaler, device)), args.out)

        # The loop: each step a batch of B images in a seeded, per-epoch order (so --resume sees the
        # same order), the loss summed on the device and read only when a line is printed.
        x_train, N, B = x_train.to(device), x_train.shape[0], s["batch_size"]   # uint8: 150 MB for CIFAR-10
        steps_per_epoch = N // B                # drop the last partial batch, like drop_last=True
        progress = Progress(s["steps"], step, "step", B, flops_per_image(model, s, device) * B,
                            peak_flops(device), warming=compiled)
        if compiled:
            print("compiling the training step (the first steps take about a minute)...", flush=True)
        warm_until = step + (3 if compiled else 1)   # CUDA graphs: step 1 warms up, 2 records, 3 replays
        loss_sum, last_log, epoch_of_perm = torch.zeros((), device=device), step, None
        model.train()
        while step < s["steps"]:
            epoch, i = divmod(step, steps_per_epoch)
            if epoch != epoch_of_perm:                                     # a new epoch: a new order
                perm, epoch_of_perm = epoch_order(N, s["seed"], epoch, device), epoch
            loss_sum += train_step(x_train[perm[i * B:(i + 1) * B]], step)
            step += 1
            if step == warm_until:
                progress.warmed_up(step, "compile + warm-up" if compiled else "warm-up")

            # Ctrl-C also saves, here at a step boundary, where model, optimiser, EMA and RNG agree.
            due_save = (step % s["save_every"] == 0 and step < s["steps"]) or stop.requested
            if step % s["log_every"] == 0 or step == s["steps"] or due_save or progress.due():
                mean_loss = loss_sum.item() / (step - last_log)    # checked before anything is saved
                if not math.isfinite(mean_loss):
                    fail(f"the loss became {mean_loss} near step {step}; the last good checkpoint "
                         f"{args.out} (if any) is kept; start a new run with a lower --lr")
                progress.line(step, loss=mean_loss, lr=f"{opt.param_groups[0]['lr']:.1e}")
                loss_sum.zero_()
                last_log = step
            if due_save:
                save()
            if stop.requested:
                raise SystemExit(f"interrupted at step {step}; saved {args.out}: continue with "
                                 f"`python ddpm.py --resume --out {args.out}`")

        # A picture of what the model learned: 64 DDIM samples from the EMA weights.
        save_grid(sample_grid(ema, abar, s, amp, device), samples_png, nrow=8)
        save(final=True)
    print(f"wrote {args.out} (step {step}) and {samples_png}", flush=True)


def training_images(s, ckpt, out):
    """The training split as uint8 [N, 3, S, S], with what the artifact records of it; refused when it is
    not what a resumed checkpoint was trained on. The test split is checked now too: stage 4 needs it,
    and a missing one should not be found after hours of stages 1 to 3."""
    x_train, y_train, classes = load_dataset(s["dataset"], s["data_dir"], "train", s["image_size"])
    load_dataset(s["dataset"], s["data_dir"], "test", s["image_size"])
    info = data_info(s["dataset"], x_train, y_train, classes)
    if ckpt is not None and ckpt["data"] != info:
        fail(f"{out} was trained on {describe_data(ckpt['data'])}, but the data found now is "
             f"{describe_data(info)}; point --data-dir at the original data or start a new run without --resume")
    if s["batch_size"] > x_train.shape[0]:
        fail(f"--batch-size {s['batch_size']} is larger than the {x_train.shape[0]} training images; "
             f"pass a smaller --batch-size")
    return x_train, classes, info


def make_model(s, args, device, ckpt):
    """The UNet, its EMA copy (which samples: dropout off), Adam, the fp16 loss scaler and the autocast
    dtype; from the checkpoint when resuming. Returns them and the step to start from."""
    torch.manual_seed(s["seed"])                # fixes the initial weights (a resumed run loads its own)
    # NCHW, not channels_last: CUDA's GroupNorm has no NHWC kernel, so a channels_last UNet is copied to
    # NCHW and back around every GroupNorm (seen in a profile of an eager step). Compiled, inductor
    # chooses each convolution's layout itself.
    model = build_unet(s).to(device)
    ema = build_unet(s).to(device).requires_grad_(False).eval()
    ema.load_state_dict(model.state_dict())
    # Adam's fused CUDA kernel updates all parameter tensors in a few launches instead of several per
    # tensor (the unfused Adam took 3 ms of GPU time in a 43 ms eager step). The CPU keeps the plain one.
    opt = torch.optim.Adam(model.parameters(), lr=s["lr"], fused=device.type == "cuda")
    amp = autocast_dtype(args.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)   # fp16 only: autocast_dtype
    step = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        step = restore_training_state(ckpt, opt, scaler, device)
        print(f"resuming {args.out} at step {step}/{s['steps']}", flush=True)
    print(f"UNet: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters (ch {s['ch']}, ch_mult "
          f"{tuple(s['ch_mult'])}); {s['dataset']} at {s['image_size']}px; device {device}, autocast "
          f"{amp or 'off (fp32)'}", flush=True)
    return model, ema, opt, scaler, amp, step


def flops_per_image(model, s, device):
    """FLOPs of one training step (forward + backward) on one image, counted once, for the MFU. Its
    dropout draws from a forked random stream: a resumed run's restored streams stay untouched."""
    x1 = torch.zeros(1, 3, s["image_size"], s["image_size"], device=device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        flops = count_flops(lambda: model(x1, torch.zeros(1, dtype=torch.long, device=device)).sum().backward())
    model.zero_grad(set_to_none=True)
    return flops


def sample_grid(ema, abar, s, amp, device):
    """64 DDIM samples from the EMA weights, as uint8, from a fixed seed."""
    g = torch.Generator(device).manual_seed(s["seed"])
    x_T = torch.randn(64, 3, s["image_size"], s["image_size"], device=device, generator=g)
    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        return to_uint8(ddim_sample(ema, x_T, abar, s["sample_steps"], s["eta"], g))


# ================================================================================================
# The plumbing every stage shares. generate.py, clsp.py and evaluate.py import it from here; none of
# it is DDPM-specific. What it guarantees, in one place:
#   - a mistake (a flag, a missing or mismatched artifact, a data set that is not there) stops the
#     run before any work with one sentence that says what to do, never a traceback;
#   - artifacts are written to a temporary file and renamed, so a kill or a full disk leaves the
#     previous file intact; a stale temporary file is removed by the next run that writes that path;
#   - two runs never write the same artifact at once (a lock beside it, freed by the OS even on kill -9);
#   - every artifact records a fingerprint of the data it was made from, and the next stage checks it.
# ================================================================================================

# ---- Failing clearly ----------------------------------------------------------------------------

def fail(msg):
    """Stop with one clear sentence (and exit code 1), never with a traceback, for a user's mistake."""
    raise SystemExit(f"error: {msg}")


def run_main(main, argv, oom_hint, interrupt_hint="nothing was lost that was saved"):
    """main(argv), with the GPU running out of memory (a smaller GPU than the preset assumes, or another
    program on it) and a second Ctrl-C turned into one sentence each, instead of a traceback."""
    try:
        main(argv)
    except torch.cuda.OutOfMemoryError:
        fail(f"out of GPU memory (nvidia-smi shows what else uses it); {oom_hint}")
    except KeyboardInterrupt:
        fail(f"stopped at once by Ctrl-C; {interrupt_hint}")


# ---- Settings, devices and how to run the next stage --------------------------------------------

HINT_FLAGS = []   # the user's --preset and data flags, repeated in every "run this first" hint


def resolve_settings(args, defaults, presets):
    """settings = defaults <- preset <- every flag the user gave explicitly (argparse default None)."""
    if args.preset not in presets:
        fail(f"unknown --preset {args.preset!r}; choose one of {', '.join(presets)}")
    explicit = {k: list(v) if isinstance(v, tuple) else v             # tuples as lists, as saved
                for k, v in vars(args).items() if v is not None and k in defaults}
    settings = {**defaults, **presets[args.preset], **explicit}
    HINT_FLAGS[:] = ([f"--preset {args.preset}"] if args.preset != "standard" else []) + [
        f"--{k.replace('_', '-')} {shlex.quote(str(explicit[k]))}" for k in ("dataset", "data_dir", "image_size")
        if k in explicit]
    return {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}, explicit


def run_hint(script):
    """`python ddpm.py --preset tiny --dataset folder --data-dir DIR`: the command to run, with the
    user's own preset and data flags, so a hint can be pasted as it is."""
    return "`" + " ".join(["python", script, *HINT_FLAGS]) + "`"


def settings_adder(p, defaults, presets):
    """add("--lr", "help", type=float): a flag whose default is written once, in `defaults`. argparse's
    own default stays None, so resolve_settings knows which flags were given; --help shows the standard
    value and the presets that change it."""
    def add(flag, help, **kw):
        key = kw.get("dest") or flag[2:].replace("-", "_")
        if key in defaults and defaults[key] is not None:
            show = lambda v: ",".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)
            other = [f"{name} {show(pr[key])}" for name, pr in presets.items() if key in pr]
            help += f" (standard: {show(defaults[key])}" + (f"; {', '.join(other)}" if other else "") + ")"
        p.add_argument(flag, help=help.replace("%", "%%"), **kw)
    p.add_argument("--preset", default="standard", help="tiny | quick | standard | paper (default: %(default)s)")
    p.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available)")
    return add


PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def add_run_flags(p, what_compiles):
    """--precision and --compile, the same in every stage."""
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="autocast dtype; auto: bf16 on A100/H100-class GPUs, fp16 on older ones, fp32 on a CPU")
    if what_compiles:
        p.add_argument("--compile", action=argparse.BooleanOptionalAction,
                       help=f"torch.compile {what_compiles} (default: on with a CUDA GPU, off on a CPU)")


def pick_device(name, preset=None):
    """--device, or cuda when PyTorch sees a GPU. A GPU preset on a CPU is allowed, with a warning."""
    if name is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(name)
        except RuntimeError:
            fail(f"--device {name!r} is not a device name; use cuda, cuda:1 or cpu")
        if device.type == "cuda" and not torch.cuda.is_available():
            fail(f"--device {name} was asked for but PyTorch sees no CUDA GPU here; use --device cpu")
    if device.type == "cpu" and preset not in (None, "tiny"):
        print(f"warning: the {preset} preset is sized for a GPU and takes hours to days on a CPU; "
              f"for a first look at every stage on this machine, use --preset tiny", flush=True)
    return device


def autocast_dtype(precision, device):
    """--precision -> the dtype autocast runs convolutions and matmuls in, or None for plain fp32.

    auto: bf16 on a GPU with bf16 tensor cores (compute capability 8.0 and up: A100, H100, L4, RTX 30xx
    and 40xx), with fp32's range, so nothing else changes. Older GPUs (T4, V100, RTX 20xx) have no bf16
    tensor cores (PyTorch emulates bf16 there; public reports find it slower than fp32) but do have
    fp16 ones: there auto means fp16, whose small range needs loss scaling in training (the GradScaler
    in the training loops; it does nothing in bf16 or fp32). On a CPU, auto is fp32."""
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def compile_enabled(flag, device):
    """--compile / --no-compile, or by default: on with a CUDA GPU that Triton (inductor's GPU code
    generator) supports, off on a CPU, where compiling takes longer than the small runs it would speed up."""
    if flag is not None:
        return flag
    if device.type != "cuda":
        return False
    import importlib.util
    if importlib.util.find_spec("triton") is None or torch.cuda.get_device_capability(device) < (7, 0):
        print("note: torch.compile is off: it needs Triton (`pip install triton`) and a GPU of compute "
              "capability 7.0 or newer; the run is eager, slower but the same", flush=True)
        return False
    return True


# ---- Data: the whole data set as one uint8 tensor [N, 3, H, W] (150 MB for CIFAR-10) ------------
# Every stage loads it the same way, so "image i" means the same picture in all four scripts, and
# labels come from the class names of the training split, the same numbers in train/ and test/.

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".gif", ".tif", ".tiff")


def load_dataset(name, data_dir, split, image_size=32):
    """Returns (x uint8 [N, 3, S, S], y int64 [N], class_names) for split 'train' or 'test'."""
    if name in ("cifar10", "cifar100"):
        x, y, classes = _load_cifar(name, data_dir, split)
        if image_size != 32:
            x = F.interpolate(x.float(), size=image_size, mode="bilinear", antialias=True,
                              align_corners=False).round().clamp(0, 255).to(torch.uint8)
    elif name == "folder":
        x, y, classes = _load_folder(data_dir, split, image_size)
    else:
        fail(f"unknown --dataset {name!r}; choose cifar10, cifar100 or folder (with --data-dir DIR)")
    if split == "train" and len(classes) < 2:
        print(f"warning: {data_dir} has a single class, so every accuracy this pipeline reports is 100 % "
              f"and means nothing; give it two or more class folders", flush=True)
    return x, y, classes


def _load_cifar(name, data_dir, split):
    import torchvision  # imported here: only this branch needs it
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    existed = os.path.isdir(data_dir)
    try:
        ds = cls(root=data_dir, train=(split == "train"), download=True)
    except Exception as e:  # no network, a half-downloaded archive, a read-only directory...
        if not existed:      # a failed download leaves no empty folder behind
            shutil.rmtree(data_dir, ignore_errors=True)
        fail(f"could not find or download {name} under {data_dir!r} ({type(e).__name__}: {e}); "
             f"download it on a machine with internet into that directory, or point at an image "
             f"folder with --dataset folder --data-dir DIR (DIR/train/<class>/*, DIR/test/<class>/*)")
    x = torch.from_numpy(np.asarray(ds.data)).permute(0, 3, 1, 2).contiguous()   # NHWC -> NCHW
    return x, torch.tensor(ds.targets, dtype=torch.int64), list(ds.classes)


def _load_folder(data_dir, split, image_size):
    """An image-folder tree DIR/<split>/<class>/*.png, decoded once with PIL and cached in
    DIR/.clsp_cache_<split>_<size>px.pt (one file per split and size, rebuilt when the files change)."""
    from PIL import Image
    root = os.path.join(data_dir, split)
    if not os.path.isdir(root):
        fail(f"no folder {root!r}: --dataset folder expects DIR/train/<class>/* and DIR/test/<class>/*")
    subdirs = lambda r: sorted(d for d in os.listdir(r) if os.path.isdir(os.path.join(r, d)))
    train_root = os.path.join(data_dir, "train")
    classes = subdirs(train_root) if os.path.isdir(train_root) else subdirs(root)   # train/ names them
    unknown = [c for c in subdirs(root) if c not in classes]
    if unknown:
        fail(f"{root} has class folders that {train_root} lacks ({', '.join(unknown)}); labels come from the "
             f"training classes, so every test class needs a training folder of the same name")
    files = [(os.path.join(root, c, f), i) for i, c in enumerate(classes) if os.path.isdir(os.path.join(root, c))
             for f in sorted(os.listdir(os.path.join(root, c))) if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not files:
        fail(f"found no images under {root!r}; expected {root}/<class>/<image>.png")
    # The cache is keyed by the file list, sizes and times, so the PNGs are decoded only the first time.
    key = hashlib.sha1(json.dumps([(p, os.path.getsize(p), os.path.getmtime(p)) for p, _ in files]
                                  + [image_size, classes]).encode()).hexdigest()
    cache = os.path.join(data_dir, f".clsp_cache_{split}_{image_size}px.pt")
    try:
        c = torch.load(cache, weights_only=True)
        if c["key"] == key:
            return c["x"], c["y"], c["classes"]
    except Exception:
        pass  # no cache yet, an old one, or a damaged one: (re)built below

    def read(path):
        try:
            img = Image.open(path).convert("RGB")
        except Exception as e:
            fail(f"cannot read image {path!r} ({e}); remove or replace it")
        if img.size != (image_size, image_size):
            img = img.resize((image_size, image_size), Image.BICUBIC)
        return np.asarray(img)

    with ThreadPoolExecutor(8) as pool:
        x = np.stack(list(pool.map(read, [p for p, _ in files])))
    x = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    y = torch.tensor([i for _, i in files], dtype=torch.int64)
    try:
        torch.save({"key": key, "x": x, "y": y, "classes": classes}, f"{cache}.tmp{os.getpid()}")
        os.replace(f"{cache}.tmp{os.getpid()}", cache)
        for old in glob.glob(os.path.join(glob.escape(data_dir), f".cache_{split}_{image_size}px_*.pt")):
            os.remove(old)    # the one-file-per-file-list caches of earlier versions of this project
    except (OSError, RuntimeError):
        pass  # a read-only or full data directory: no cache, just slower next time
    return x, y, classes


def data_info(name, x, y, classes):
    """What every artifact records about the data it was made from, so the next stage can check it. The
    fingerprint (a hash of every pixel and label) tells two folders with the same counts apart."""
    h = hashlib.blake2b(x.contiguous().numpy().tobytes(), digest_size=8)
    h.update(y.numpy().tobytes())
    return dict(dataset=name, image_size=int(x.shape[-1]), num_classes=len(classes),
                num_train=int(x.shape[0]), fingerprint=h.hexdigest())


def describe_data(info):
    """'cifar10 (50000 images, 10 classes, 32px, fingerprint 1a2b...)' for messages."""
    return (f"{info.get('dataset')} ({info.get('num_train')} images, {info.get('num_classes')} classes, "
            f"{info.get('image_size')}px, fingerprint {info.get('fingerprint', 'none')})")


# ---- Artifacts: plain dicts of tensors and Python values, so torch.load(..., weights_only=True) reads
# them; written to a temporary file and renamed, so an interruption never leaves half a file. ------

@contextlib.contextmanager
def claim_output(path, *pictures):
    """`with claim_output(out, picture):` the body runs only if `out` can be written and no other run is
    writing it. Checked before any work, so a wrong --out fails in a second, not after an epoch. The
    lock is a file beside the artifact held with flock, which the OS releases when the process ends,
    even on kill -9, so a crashed run never leaves it stuck. Temporary files that an interrupted save
    of these paths left behind are removed."""
    lock = lock_file(path)
    try:
        for p in (path, *pictures):
            for tmp in glob.glob(glob.escape(p) + ".tmp*"):
                os.remove(tmp)              # ours: the lock says no other run writes this path
        yield
    finally:
        with contextlib.suppress(OSError):
            os.remove(path + ".lock")       # tidy; a run that opened it just before locks anew (below)
        lock.close()


def lock_file(path):
    """The open lock file of `path` (<path>.lock), locked by this process, or one sentence saying why not."""
    lock_path = path + ".lock"
    for _ in range(100):
        try:
            os.makedirs(os.path.dirname(os.path.abspath(lock_path)), exist_ok=True)
            lock = open(lock_path, "a")
        except OSError as e:
            fail(f"cannot write {path} ({e.strerror or e}); pass an --out in a folder you can write")
        try:
            if os.name == "nt":
                import msvcrt
                msvcrt.locking(lock.fileno(), msvcrt.LK_NBLCK, 1)
                return lock
            import fcntl
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            fail(f"another run is writing {path} right now; wait for it to end, or pass another --out")
        # The run before us removes the file when it ends; if it did so between our open and our lock,
        # we hold a lock on a file nobody else sees: then lock the file that is there now instead.
        with contextlib.suppress(OSError):
            if os.stat(lock_path).st_ino == os.fstat(lock.fileno()).st_ino:
                return lock
        lock.close()
    fail(f"could not lock {lock_path}; another program keeps replacing it")


def beside(path, suffix):
    """runs/ddpm.pt, '_samples.png' -> runs/ddpm_samples.png: pictures go beside their artifact."""
    return os.path.splitext(path)[0] + suffix


def atomic_write(path, write):
    """write(tmp) to a temporary file, then rename it to `path`: readers see the old file or the new
    one, never half of one. A full disk (or any failed write) is one sentence; the old file is intact."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)   # atomic on POSIX and Windows
    except (OSError, RuntimeError) as e:
        free = shutil.disk_usage(folder).free / 1e6
        reason = (getattr(e, "strerror", None) or str(e).splitlines()[0])[:120]
        fail(f"could not write {path} ({reason}); {free:,.0f} MB are free on its disk, so it may be full: "
             f"free some space and run the same command again (--resume where the script has it); the "
             f"previous {path}, if there was one, is intact")
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_save(obj, path):
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_artifact(path, made_by, keys=(), what=None):
    """Load an artifact, or stop with a sentence that says which script makes it. It must be a dict
    with `keys`: what `made_by` writes (`what`, in the message), not some other file of the same name."""
    if not os.path.exists(path):
        fail(f"{path} does not exist; run {run_hint(made_by)} first (or point the flag at the right file)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"{path} is not a readable artifact ({type(e).__name__}); it may be truncated or from "
             f"another program: delete it and run {run_hint(made_by)} again")
    if not isinstance(obj, dict) or not set(keys) <= obj.keys():
        missing = sorted(set(keys) - obj.keys()) if isinstance(obj, dict) else f"a {type(obj).__name__}"
        fail(f"{path} is not {what or 'what ' + made_by + ' writes'} (it lacks {missing}); point the flag at "
             f"a file {made_by} made, or run {run_hint(made_by)}")
    return obj


def refuse_to_overwrite(path, how_to_continue):
    """A new run never replaces an existing artifact (hours of work): it says what to do instead."""
    if os.path.exists(path):
        fail(f"{path} already exists; {how_to_continue}, write elsewhere with --out, or delete it to start over")


def load_for_resume(path, made_by, must_have, explicit, free):
    """--resume: the checkpoint and its own settings, so the run ends exactly where it would have.
    Only the settings in `free` (paths, logging) may be changed by a flag; any other is refused."""
    ckpt = load_artifact(path, made_by, (must_have, "settings", "data", "step", "optimizer"))
    clash = {k: v for k, v in explicit.items() if k not in free and ckpt["settings"].get(k) != v}
    if clash:
        fail(f"--resume continues {path} with its own settings, but you asked for {clash}; "
             f"drop those flags, or start a new run without --resume")
    return ckpt, {**ckpt["settings"], **{k: v for k, v in explicit.items() if k in free}}


def training_state(opt, scaler, device):
    """What a resumed run must continue besides the weights (stages 1 and 3 save it every time): the
    optimiser's state (momentum, Adam's moments), the fp16 loss scale, and the random streams, the
    CPU's and the GPU's when on one."""
    return dict(optimizer=opt.state_dict(), scaler=scaler.state_dict(), rng_cpu=torch.get_rng_state(),
                **({"rng_cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {}))


def restore_training_state(ckpt, opt, scaler, device):
    """The inverse of training_state, after the weights are loaded; returns the step to continue from."""
    opt.load_state_dict(ckpt["optimizer"])
    if scaler.is_enabled() and ckpt.get("scaler"):   # fp16 only: a bf16 or fp32 run saves an empty one
        scaler.load_state_dict(ckpt["scaler"])
    torch.set_rng_state(ckpt["rng_cpu"])
    if device.type == "cuda" and "rng_cuda" in ckpt:
        torch.cuda.set_rng_state(ckpt["rng_cuda"], device)
    return ckpt["step"]


def epoch_order(N, seed, epoch, device):
    """The shuffle of one epoch, from its own seeded generator, so a resumed run sees the same order.
    Made on the CPU and moved to the device once per epoch: a copy per step would stall the GPU."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(N, generator=g).to(device)


def save_grid(images, path, nrow, labels=None):
    """uint8 [N, 3, H, W] -> one PNG grid, written atomically. torchvision.utils.make_grid lays out the
    tiles; ours adds two things it cannot: small images are enlarged (nearest neighbour, to at least
    64 pixels, so 16- and 32-pixel tiles can be seen), and `labels` name the columns in a header."""
    from PIL import Image, ImageDraw
    from torchvision.utils import make_grid
    scale = max(1, math.ceil(64 / images.shape[-1]))
    tiles = images.cpu().repeat_interleave(scale, dim=-1).repeat_interleave(scale, dim=-2)
    grid = make_grid(tiles, nrow=nrow, padding=2, pad_value=255).permute(1, 2, 0).numpy()
    img = Image.fromarray(grid)
    if labels:
        top = 14
        header = Image.new("RGB", (img.width, img.height + top), "white")
        header.paste(img, (0, top))
        draw, tile = ImageDraw.Draw(header), tiles.shape[-1] + 2
        for col, text in enumerate(labels):
            draw.text((2 + col * tile + 2, 1), text, fill="black")
        img = header
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


# ---- Progress lines and model FLOPs utilisation (MFU = achieved FLOP/s / the GPU's dense bf16 peak;
# for V100 and T4, which have no bf16 tensor cores, the fp16 peak that --precision auto uses there) --

PEAK_BF16_TFLOPS = {"H100": 989, "H100 PCIe": 756, "H100 NVL": 835, "H800": 989, "H200": 989,
                    "H200 NVL": 835, "GH200": 989, "A100": 312, "A800": 312, "L40S": 362, "L40": 181,
                    "L4": 121, "A10": 125, "RTX 4090": 165, "RTX 3090": 71, "V100": 125, "T4": 65}


def peak_flops(device):
    """The GPU's dense bf16 tensor-core peak in FLOP/s, or None when unknown (then no MFU is shown)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in sorted(PEAK_BF16_TFLOPS.items(), key=lambda kv: -len(kv[0])):
        if key in name:
            return tflops * 1e12
    return None


def count_flops(fn):
    """FLOPs of one call of fn(), counted by PyTorch's own operator-level counter."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def fmt_time(seconds):
    seconds = int(max(seconds, 0))
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
    """Prints `step 1200/60000 | loss 0.031 | 5230 img/s | 41% MFU | 2m10s elapsed, 14m05s left`.

    Speed and time left are measured from `warmed_up()` on, so a first step that compiles (a minute) does
    not distort them; the elapsed time includes it, and the line says how long it took."""

    def __init__(self, total, done=0, unit="step", images_per_unit=1, flops_per_unit=None, peak=None,
                 warming=False):
        self.total, self.start_done, self.unit = total, done, unit
        self.images_per_unit, self.flops_per_unit, self.peak = images_per_unit, flops_per_unit, peak
        self.t_start = self.t0 = self.last = time.perf_counter()
        self.warmup = "compiling" if warming else None     # until warmed_up(): no speed, no time left

    def warmed_up(self, done, what="warm-up"):
        now = time.perf_counter()
        self.warmup = f"{what} {now - self.t_start:.0f}s"
        self.t0, self.start_done = now, done

    def due(self, seconds=30):
        """True when no line was printed for `seconds` (the first one after 5 s): a slow run is never
        silent for long, whatever its --log-every."""
        return time.perf_counter() - self.last > (5 if self.last == self.t_start else seconds)

    def line(self, done, **metrics):
        now = time.perf_counter()
        rate = 0.0 if self.warmup == "compiling" else (done - self.start_done) / max(now - self.t0, 1e-9)
        parts = [f"{self.unit} {done:.2f}/{self.total}" if isinstance(done, float) else
                 f"{self.unit} {done}/{self.total}"]
        parts += [f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()]
        if rate > 0:
            parts.append(f"{rate * self.images_per_unit:,.0f} img/s")
            if self.flops_per_unit and self.peak:
                parts.append(f"MFU {100 * rate * self.flops_per_unit / self.peak:.1f}%")
        if self.warmup:
            parts.append(self.warmup)
        left = (self.total - done) / rate if rate > 0 else float("inf")
        parts.append(f"{fmt_time(now - self.t_start)} elapsed, {fmt_time(left) if math.isfinite(left) else '?'} left")
        print(" | ".join(parts), flush=True)
        self.last = now


class StopFlag:
    """`with StopFlag() as stop:` Ctrl-C (or SIGTERM) inside the block asks the loop to stop at the end
    of the current step instead of killing it mid-update (the loop reads stop.requested): a checkpoint
    written then is consistent, so --resume continues exactly. A second Ctrl-C quits at once. After the
    block, Ctrl-C interrupts at once again."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGINT, self._handler)
        signal.signal(signal.SIGTERM, self._handler)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    def release(self):
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping at the end of this step (Ctrl-C again to quit at once)...", file=sys.stderr, flush=True)


if __name__ == "__main__":
    run_main(main, sys.argv[1:], "rerun with a smaller --batch-size (a saved checkpoint is kept)",
             "the last checkpoint saved in --out is kept: continue with --resume")
