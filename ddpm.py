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
    python ddpm.py --dataset stl10 --out runs/ddpm_stl10.pt   # STL-10's unlabeled images at 64 px
    python ddpm.py --resume                          # continue an interrupted run
    torchrun --standalone --nproc-per-node 4 ddpm.py --preset paper   # 4 GPUs: the same run (README)

Reads:  the training images (--dataset cifar10 | cifar100 | stl10 | folder, --data-dir; STL-10: its
        100,000 unlabeled ones); it also checks that the labelled images the later stages need are there.
Writes: runs/ddpm.pt (raw + EMA weights, optimiser, step, settings; checkpointed as it trains)
        runs/ddpm_samples.png (an 8x8 grid of DDIM samples from the EMA weights; named after --out).
Time:   tiny: 5.5 s on a 2-core CPU (the whole command). On a GPU: not yet measured with the compiled
        training step.

Read top to bottom: the settings, the forward process, the UNet, DDIM sampling, the training step and
its loop, then the command line. What every stage shares and is no part of the method (data loading,
safe artifacts, progress lines, Ctrl-C) is imported from common.py.
"""

import argparse
import math
import sys

# common.py first: it turns a Ctrl-C while PyTorch loads (seconds) into one sentence, not a traceback.
from common import (MAIN, WORLD_SIZE, EpochOrder, Progress, StopFlag, add_run_flags, atomic_save, autocast_dtype,
                    average_gradients, barrier, beside, claim_output, command, compile_enabled, count_flops, data_info,
                    dataset_settings, fail, has_own_pretrain_split, load_dataset, load_for_resume, mean_over_processes, own_rows, peak_flops,
                    refuse_to_overwrite, require_divisible, require_free_space, require_same_data, resolve_settings,
                    restore_training_state, resume_hint, run_main, save_grid, settings_adder, start_processes,
                    tensor_bytes, this_process, training_state, with_eager_fallback)

import torch
import torch.nn as nn
import torch.nn.functional as F


# ------------------------------------------------------------------------------------------------
# Settings. `standard` is the default; a preset changes some values; an explicit flag wins over both.
# ------------------------------------------------------------------------------------------------

DEFAULTS = dict(  # the `standard` preset: the authors' recipe with the design card's small UNet
    dataset="cifar10", data_dir="data", image_size=32, seed=0,
    ch=64, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_res=(16,), dropout=0.1,   # authors: ch 128
    T=1000, beta_1=1e-4, beta_T=0.02,                                          # Ho et al.
    batch_size=128, lr=2e-4, warmup=5000, grad_clip=1.0, ema_decay=0.9999,     # Ho et al. / authors
    steps=60_000,                      # authors: batch 4 x 50, 2000 epochs (~500k steps); Ho et al.: 800k at 128
    sample_steps=100, eta=0.0,         # DDIM sampler used for the picture at the end
    log_every=200, save_every=5000,
)
PRESETS = {
    # seconds on a CPU: a toy UNet (2 levels, 1 block each) that shows the loop works; numbers mean nothing
    # (16x16 images: a 2-core CPU trains ~25 images/s at 32x32 even with this toy UNet)
    "tiny": dict(image_size=16, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_res=(8,), batch_size=16,
                 steps=20, warmup=10, ema_decay=0.9, sample_steps=5, log_every=5, save_every=10),
    # the DDPM of the ~10 minute quick pipeline (its GPU time is not yet measured)
    "quick": dict(steps=8_000, warmup=1000, ema_decay=0.999, save_every=2000),
    "standard": dict(),
    # the authors' model, the 35.7 M UNet of Ho et al., trained on as many images as theirs saw (102 M:
    # they ran batch 200 for ~500k steps on 4 GPUs), in fewer, larger steps, which suit one GPU better
    "paper": dict(ch=128, batch_size=512, steps=200_000, ema_decay=0.9999),
}
# A data set's own recipe (common.dataset_settings): "standard" sits beside DEFAULTS (a preset or a flag wins
# over it), another preset's entry is the data set's own version of that preset. STL-10 at 64 px follows the
# authors' configs/diffusion_stl10.yaml, the last of the five variants it lists ("V5", with which they resumed
# their run at epoch 300): ch 192, ch_mult (1, 2, 3, 4) (levels of 64, 32, 16 and 8 px), attention at levels
# 1 and 2 (32 and 16 px), 2 res blocks, dropout 0.15, lr 5e-5, batch 20 per GPU on 4 GPUs, 1000 epochs; T and
# the betas as on CIFAR. (Their first variant, "V1", was ch 128, attention at 32, 16 and 8 px, 3 res blocks,
# lr 2e-4, batch 50 per GPU.) `standard` keeps V5's layout at the design card's width, ch 64, as CIFAR's
# standard keeps the CIFAR layout at ch 64; `paper` is V5 itself.
DATASETS = {"stl10": {
    "standard": dict(image_size=64, ch_mult=(1, 2, 3, 4), attn_res=(32, 16), dropout=0.15, lr=5e-5),
    "paper": dict(ch=192, batch_size=80, steps=1_250_000),   # 1000 epochs of the 100,000 images at batch 80
}}
FREE_ON_RESUME = {"data_dir", "log_every", "save_every", "sample_steps"}   # flags --resume may change


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
    """GroupNorm over `ch` channels in 32 groups (the DDPM reference's), or ch / 2 groups when ch < 64.

    Why never one channel per group: a ResBlock adds the time embedding as one constant per channel, and
    a GroupNorm whose groups hold one channel each subtracts each channel's mean, so it would erase the
    embedding entirely (32 groups on the tiny preset's 32-channel level would). With two or more channels
    per group only their common shift is removed. ch 64 and 128 keep 32 groups: the authors' model.

    On a GPU under bf16/fp16 autocast it also runs in the input's dtype. Autocast runs group_norm in
    fp32, so an eager bf16 step would cast every GroupNorm's input up and its output back down: two copy
    kernels per GroupNorm, hundreds a step, enough to make bf16 slower than fp32. CUDA's GroupNorm
    kernel takes bf16 and fp16 inputs and accumulates its mean and variance in fp32 itself, so the casts
    buy nothing. (Compiled, inductor fuses GroupNorm, SiLU and the casts anyway; this is for the eager
    path. `python tests/benchmark.py --stages 1 --no-compile --profile 1` lists an eager step's kernels.)"""

    def __init__(self, ch):
        super().__init__(min(32, ch // 2), ch)

    def forward(self, x):
        if torch.compiler.is_compiling() or not (x.is_cuda and torch.is_autocast_enabled("cuda")):
            return super().forward(x)
        with torch.autocast("cuda", enabled=False):
            return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class ResBlock(nn.Module):
    """GN-SiLU-conv, + the projected time embedding, GN-SiLU-dropout-conv, + (1x1-projected) input."""

    def __init__(self, in_ch, out_ch, tdim, dropout, attn=False):
        super().__init__()
        self.block1 = nn.Sequential(GroupNorm(in_ch), nn.SiLU(), nn.Conv2d(in_ch, out_ch, 3, padding=1))
        self.temb_proj = nn.Sequential(nn.SiLU(), nn.Linear(tdim, out_ch))
        self.block2 = nn.Sequential(GroupNorm(out_ch), nn.SiLU(), nn.Dropout(dropout),
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
        self.norm = GroupNorm(ch)
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

    def __init__(self, ch=64, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_res=(16,), dropout=0.1, image_size=32):
        super().__init__()
        self.ch = ch
        attn_res = (attn_res,) if isinstance(attn_res, int) else tuple(attn_res)   # the resolutions with attention
        tdim = 4 * ch
        self.temb = nn.Sequential(nn.Linear(ch, tdim), nn.SiLU(), nn.Linear(tdim, tdim))
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)

        # Down path: num_res_blocks ResBlocks per level, a stride-2 conv between levels. Every output is
        # remembered (`chans`) because the up path concatenates it back in (the UNet's skip connections).
        self.down, chans, now, res = nn.ModuleList(), [ch], ch, image_size
        for i, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                self.down.append(ResBlock(now, ch * mult, tdim, dropout, attn=(res in attn_res)))
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
                self.up.append(ResBlock(chans.pop() + now, ch * mult, tdim, dropout, attn=(res in attn_res)))
                now = ch * mult
            if i != 0:
                self.up.append(Upsample(now))
                res *= 2
        self.out = nn.Sequential(GroupNorm(now), nn.SiLU(), nn.Conv2d(now, 3, 3, padding=1))
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
# Training: one step of Algorithm 1 (Ho et al.), then the loop that repeats it.
# ------------------------------------------------------------------------------------------------

def lr_at(step, s):
    """Adam's learning rate at `step` (counted from 0): a linear warm-up over s["warmup"] steps, then flat."""
    return s["lr"] * min(1.0, (step + 1) / max(s["warmup"], 1))


def make_train_step(model, ema, opt, scaler, abar, s, amp=None, compiled=False):
    """train_step(x_uint8, step) -> loss: one optimiser step of Algorithm 1 (Ho et al.) on a batch of
    uint8 training images, then the EMA update (s: lr, warmup, grad_clip, ema_decay; amp: the autocast
    dtype or None). Used by the loop below and by tests/benchmark.py."""
    weights, ema_weights = list(model.parameters()), list(ema.parameters())

    def loss_of(x_uint8, flip, t, eps):
        x0 = x_uint8.float() / 127.5 - 1.0                                  # [0, 255] -> [-1, 1]
        x0 = torch.where(flip, x0.flip(3), x0)                              # random horizontal flip
        with torch.autocast(x0.device.type, dtype=amp, enabled=amp is not None):
            return ddpm_loss(model, x0, abar, t, eps)

    # On a GPU the loss is compiled, and so its backward: inductor fuses GroupNorm, SiLU and the casts
    # into few kernels, and "reduce-overhead" replays forward and backward as two CUDA graphs, so the CPU
    # does not issue the kernels one by one. Eager, the small UNet's step is bound by those launches,
    # not by the GPU's arithmetic: a step at batch 32 takes about as long as one at batch 128
    # (`python tests/benchmark.py --stages 1 --more` times eager, compiled and the batch sizes). The
    # first steps compile (about a minute). Algorithm 1's random draws (flips, t, eps) stay outside the
    # graph, in plain PyTorch; dropout's are inside it, from inductor's own generator. Under torchrun,
    # no CUDA graphs: public reports find them fragile beside the collectives of several processes.
    if compiled:
        loss_of = torch.compile(loss_of, mode="reduce-overhead" if abar.is_cuda and WORLD_SIZE == 1 else "default")

    def train_step(x_uint8, step):
        # Under torchrun x_uint8 is this process's slice of the batch: the draws are made for the whole batch
        # of B, as one process makes them, and each process keeps its own rows of them (common.own_rows).
        B, device = x_uint8.shape[0] * WORLD_SIZE, x_uint8.device
        flip = torch.rand(B, 1, 1, 1, device=device) < 0.5
        t = torch.randint(0, abar.numel(), (B,), device=device)            # t ~ U{0..T-1}: the paper's 1..T
        eps = torch.randn((B, *x_uint8.shape[1:]), device=device)          # eps ~ N(0, I)
        flip, t, eps = own_rows(flip), own_rows(t), own_rows(eps)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, s)
        opt.zero_grad(set_to_none=True)         # before the forward: no gradient outlives its step
        if compiled:
            torch.compiler.cudagraph_mark_step_begin()   # a new step: the last one's graph outputs are done
        loss = loss_of(x_uint8, flip, t, eps)
        scaler.scale(loss).backward()           # fp16: the loss times 2^k, so small gradients survive
        average_gradients(weights)              # torchrun: the mean of the slices' gradients, the whole batch's
        scaler.unscale_(opt)                    # the true gradients again, before they are clipped
        torch.nn.utils.clip_grad_norm_(weights, s["grad_clip"])   # on the device: no host sync
        scaler.step(opt)                        # fp16: skipped when a gradient overflowed, then k shrinks
        scaler.update()
        # EMA of the weights. Our one addition to the recipe: the decay ramps up as (1+step)/(10+step)
        # (TensorFlow's ExponentialMovingAverage with num_updates), so a short run's EMA is not stuck
        # near the random init; it is 0.999 at step 9k and 0.99985 at the standard run's last step.
        decay = min(s["ema_decay"], (1 + step) / (10 + step))
        with torch.no_grad():                   # one multi-tensor kernel for all weights
            torch._foreach_lerp_(ema_weights, weights, 1 - decay)
        return mean_over_processes(loss.detach())   # torchrun: the whole batch's loss, as one process has it

    return train_step


def train(train_step, x_train, s, step, progress, save, stop):
    """Repeat the step until step s["steps"], each on a batch of B training images in a seeded per-epoch
    order (so --resume sees the same order). Returns the step reached (earlier on Ctrl-C)."""
    order = EpochOrder(x_train.shape[0], s["batch_size"], s["seed"], x_train.device)
    mine = this_process(s["batch_size"])                    # torchrun: this process's slice of each batch
    warm_until = step + (3 if progress.warmup else 1)       # CUDA graphs: 1 warms up, 2 records, 3 replays
    while step < s["steps"]:
        loss = train_step(x_train[order.batch(step)[mine]], step)
        step += 1
        # ---- bookkeeping, at a step boundary, where model, EMA, optimiser and RNG agree ----
        progress.add(loss=loss)                             # summed on the device: no host sync
        if step == warm_until:
            progress.warmed_up(step, "compile + warm-up" if progress.warmup else "warm-up")
        stopping = stop.agreed()                            # Ctrl-C, SIGTERM (torchrun: in any process)
        due_save = (step % s["save_every"] == 0 and step < s["steps"]) or stopping
        if step % s["log_every"] == 0 or step == s["steps"] or due_save or progress.due():
            progress.line(step, lr=f"{lr_at(step - 1, s):.1e}")   # stops the run if the loss is not finite
        if due_save:
            save(step)
        if stopping:                                        # saved just above
            break
    return step


def sample_grid(ema, abar, s, amp, device):
    """64 DDIM samples from the EMA weights, as uint8, from a fixed seed: a picture of what was learned."""
    g = torch.Generator(device).manual_seed(s["seed"])
    x_T = torch.randn(64, 3, s["image_size"], s["image_size"], device=device, generator=g)
    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        return to_uint8(ddim_sample(ema, x_T, abar, s["sample_steps"], s["eta"], g))


# ------------------------------------------------------------------------------------------------
# The command line, and the glue between it and the loop.
# ------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Stage 1 of CLSP: train a small UNet DDPM.")
    add = settings_adder(p, DEFAULTS, PRESETS)   # each help ends with the default, read from DEFAULTS
    add("--dataset", "cifar10 | cifar100 | stl10 (64 px, its unlabeled split) | folder (an image folder "
                     "DIR/train/<class>/*, DIR/test/<class>/*)")
    add("--data-dir", "where the data set is, or is downloaded to")
    add("--image-size", "images are resized to this", type=int)
    add("--seed", "random seed", type=int)
    add("--ch", "UNet base width; 64 -> 9 M parameters, 128 -> 35.7 M", type=int)
    add("--ch-mult", "width multiplier per resolution level", type=lambda v: tuple(int(c) for c in v.split(",")))
    add("--num-res-blocks", "residual blocks per level", type=int)
    add("--attn-res", "the resolutions (in pixels) whose blocks have self-attention",
        type=lambda v: tuple(int(c) for c in v.split(",")))
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


def check_settings(s, resumed=False):
    positive = ["image_size", "ch", "num_res_blocks", "steps", "batch_size", "warmup", "sample_steps",
                "log_every", "save_every"]
    for k in positive:
        if s[k] < (0 if k == "warmup" else 1):
            fail(f"--{k.replace('_', '-')} must be a positive whole number, got {s[k]}")
    if s["ch"] % 32:
        fail(f"--ch must be a multiple of 32 (the GroupNorms split the channels into groups), got {s['ch']}")
    if not 0 <= s["dropout"] < 1:
        fail(f"--dropout must be in [0, 1), got {s['dropout']}")
    if not 0 <= s["ema_decay"] < 1:
        fail(f"--ema-decay must be in [0, 1), got {s['ema_decay']}")
    if not (s["lr"] > 0 and math.isfinite(s["lr"])):
        fail(f"--lr must be a positive number, got {s['lr']}")
    if s["image_size"] % 2 ** (len(s["ch_mult"]) - 1):
        fail(f"--image-size {s['image_size']} must be divisible by 2^(levels-1) = {2 ** (len(s['ch_mult']) - 1)}")
    sizes = [s["image_size"] // 2 ** i for i in range(len(s["ch_mult"]))]   # each level's resolution
    attn = [s["attn_res"]] if isinstance(s["attn_res"], int) else s["attn_res"]   # an int: an older checkpoint's
    wrong = [r for r in attn if r not in sizes]
    if wrong and not resumed:   # a checkpoint made before this check keeps its own UNet
        fail(f"--attn-res {','.join(map(str, attn))}: {wrong[0]} px is no level of this UNet at --image-size "
             f"{s['image_size']}; pass --attn-res with some of its levels' resolutions, {','.join(map(str, sizes))}")
    if s["sample_steps"] > s["T"]:
        fail(f"--sample-steps must be at most T = {s['T']}")
    require_divisible(s["batch_size"])          # torchrun: one equal slice of each batch per process


def main(argv=None):
    args = parse_args(argv)
    s, explicit = resolve_settings(args, DEFAULTS, PRESETS)
    ckpt = None
    if args.resume:           # the checkpoint's own settings rule, so the run ends where it would have
        ckpt, s = load_for_resume(args.out, "ema", explicit, FREE_ON_RESUME,
                                  command("ddpm.py", args, "--out", args.out), DEFAULTS)
    else:
        dataset_settings(s, explicit, args.preset, DATASETS, PRESETS)   # STL-10: 64 px, the authors' layout
    check_settings(s, resumed=ckpt is not None)
    x_train, classes, info = training_images(s, ckpt, args)
    samples_png = args.samples or beside(args.out, "_samples.png")
    # Every check has passed: the device, and under torchrun the process group (common.start_processes).
    device = start_processes(args.device, None if args.resume else args.preset)   # resumed: its own settings

    # No other run writes these files until this one ends; Ctrl-C stops at the end of a step and saves.
    with claim_output(args.out, samples_png), StopFlag(resume_hint("ddpm.py", args)) as stop:
        if ckpt is None:
            refuse_to_overwrite(args.out, f"continue it with {command('ddpm.py', args, '--resume', '--out', args.out)}")
        model, ema, opt, scaler, amp, step = make_model(s, args, device, ckpt)
        abar = make_schedule(s["T"], s["beta_1"], s["beta_T"]).to(device)
        compiled = compile_enabled(args.compile, device)
        train_step = make_train_step(model, ema, opt, scaler, abar, s, amp, compiled)
        if compiled:          # a compile or CUDA-graph failure on this GPU: one sentence, then eager
            train_step = with_eager_fallback(train_step, lambda: make_train_step(model, ema, opt, scaler, abar, s, amp),
                                             "training step", device)   # (GroupNorm keeps no running statistics)
        # model, EMA, Adam's two moments: about 4 copies of the weights in each checkpoint
        require_free_space(args.out, 2 * tensor_bytes(model.state_dict().values())
                           + 2 * tensor_bytes(model.parameters()))
        progress = Progress(s["steps"], step, "step", s["batch_size"],
                            flops_per_image(model, s, device) * s["batch_size"], peak_flops(device),
                            warming=compiled, on_nan=f"the last good checkpoint {args.out} "
                            f"(if any) is kept; start a new run with a lower --lr")

        def save(step, final=False):              # torchrun: rank 0 writes, the others wait for the file
            if MAIN:
                atomic_save(dict(model=model.state_dict(), ema=ema.state_dict(), step=step, settings=s, data=info,
                                 classes=classes, finished=final, num_params=sum(p.numel() for p in model.parameters()),
                                 **training_state(opt, scaler, device)), args.out)
            barrier()

        if compiled:
            print(f"compiling the training step (the first steps take "
                  f"{'about a minute' if device.type == 'cuda' else 'minutes on a CPU'})...", flush=True)
        model.train()
        step = train(train_step, x_train.to(device), s, step, progress, save, stop)   # uint8: 150 MB for CIFAR-10
        if stop.requested:
            raise SystemExit(f"interrupted at step {step}; saved {args.out}: continue with "
                             f"{command('ddpm.py', args, '--resume', '--out', args.out)}")
        if MAIN:
            save_grid(sample_grid(ema, abar, s, amp, device), samples_png, nrow=8)
        save(step, final=True)
    print(f"wrote {args.out} (step {step}) and {samples_png}", flush=True)


def training_images(s, ckpt, args):
    """The images the DDPM learns from (common.load_dataset's "pretrain" split: the training split, on
    STL-10 the 100,000 unlabeled images) as uint8 [N, 3, S, S], with what the artifact records of them;
    refused when they are not what a resumed checkpoint was trained on. Stage 4's labelled splits are
    checked now too: a missing one should not be found after hours of stages 1 to 3."""
    x_train, y_train, classes = load_dataset(s["dataset"], s["data_dir"], "pretrain", s["image_size"])
    for split in ("train", "test") if has_own_pretrain_split(s["dataset"]) else ("test",):
        load_dataset(s["dataset"], s["data_dir"], split, s["image_size"])
    info = data_info(s["dataset"], x_train, y_train, classes)
    if ckpt is not None:
        require_same_data(info, ckpt["data"], f"{args.out} was trained on",
                          "point --data-dir at the original data or start a new run without --resume")
    if s["batch_size"] > x_train.shape[0]:
        fail(f"--batch-size {s['batch_size']} is larger than the {x_train.shape[0]} training images; "
             f"pass a smaller --batch-size")
    return x_train, classes, info


def make_model(s, args, device, ckpt):
    """The UNet, its EMA copy (which samples: dropout off), Adam, the fp16 loss scaler and the autocast
    dtype; from the checkpoint when resuming. Returns them and the step to start from."""
    torch.manual_seed(s["seed"])                # fixes the initial weights (a resumed run loads its own)
    # NCHW, not channels_last: CUDA's GroupNorm has no NHWC kernel, so a channels_last UNet is copied to
    # NCHW and back around every GroupNorm (`python tests/benchmark.py --stages 1 --more` times both
    # layouts). Compiled, inductor chooses each convolution's layout itself.
    model = build_unet(s).to(device)
    ema = build_unet(s).to(device).requires_grad_(False).eval()
    ema.load_state_dict(model.state_dict())
    # Adam's fused CUDA kernel updates all parameter tensors in a few launches instead of several per
    # tensor, launches that bound an eager step (above). The CPU keeps the plain one.
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


if __name__ == "__main__":
    run_main(main, sys.argv[1:], "rerun with a smaller --batch-size (a saved checkpoint is kept)",
             "a checkpoint saved in --out is kept (continue it with --resume); with none saved yet, run the "
             "same command again")
