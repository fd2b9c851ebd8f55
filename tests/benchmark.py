"""Speed benchmark of the four stages: the fast path each script takes against the plain path a typical
implementation takes, on random data of the real shapes, in one run, so every speed-up is a measured ratio.

    python tests/benchmark.py                    # on the GPU: the real sizes
    python tests/benchmark.py --compile          # also the torch.compile variant of each fast path
    python tests/benchmark.py --device cpu       # tiny sizes, seconds: checks that it runs (tests do this)

For each stage it prints images/s, the achieved TFLOP/s (FLOPs counted by torch.utils.flop_counter, in
fp32 terms: a bf16 multiply-add counts the same as an fp32 one), MFU against the GPU's dense bf16 peak
(fp16 on GPUs without bf16 tensor cores) and peak memory; and, for the same batch, the loss (or output)
of the fast and the plain path side by side: they should agree within bf16 tolerance, since the fast
path computes the same function (tests/test_benchmark.py asserts it on the CPU). Stage 3 also times
the augmentation alone (its share of a step) and the checkpoint clsp.py writes every epoch.

  fast  = what the scripts do: bf16 autocast (fp16 before Ampere, as --precision auto does),
          channels_last, data on the GPU as uint8, batched GPU augmentation (stage 3), optionally
          torch.compile.
  plain = fp32, NCHW, no compile; for stage 3 a DataLoader with torchvision's transforms on CPU workers.

Not collected by pytest (its name does not start with test_); tests/test_benchmark.py runs the CPU mode.
"""

import argparse
import os
import sys
import tempfile
import time
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import clsp      # noqa: E402
import ddpm      # noqa: E402
import generate  # noqa: E402


def timed(fn, iters, warmup, device):
    """Seconds per call of fn(), after `warmup` calls; CUDA events on a GPU (no host timer skew)."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1000 / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


class Table:
    def __init__(self, device):
        self.peak = ddpm.peak_flops(device)
        self.device = device
        self.rows, self.notes = [], []

    def add(self, stage, path, images, seconds, flops, check=""):
        mem = torch.cuda.max_memory_allocated(self.device) / 2 ** 30 if self.device.type == "cuda" else float("nan")
        tflops = f"{flops / seconds / 1e12:8.1f}" if flops else "       -"       # no matmuls: no TFLOP/s
        mfu = f"{100 * flops / seconds / self.peak:5.1f}%" if self.peak and flops else "  n/a"
        self.rows.append((stage, path, f"{images / seconds:12,.0f}", f"{seconds * 1e3:9.2f}", tflops,
                          mfu, f"{mem:6.1f}", check))
        print(" | ".join(self.rows[-1]), flush=True)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def show(self):
        head = ("stage", "path", "images/s", "ms/step", "TFLOP/s", "MFU", "GiB", "same function?")
        widths = [max(len(str(r[i])) for r in self.rows + [head]) for i in range(len(head))]
        line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"
        print("\n" + line(head))
        print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        for r in self.rows:
            print(line(r))
        for note in self.notes:
            print(note)


def variants(model, device, compile_too):
    """(name, module, autocast dtype or None, layout) for the plain path, the fast path and optionally
    compiled. The fast path's dtype is the scripts' --precision auto: bf16, or fp16 on pre-Ampere GPUs."""
    amp = ddpm.autocast_dtype("auto", device)
    fast_layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    fast = "fast" + (f" ({str(amp).replace('torch.', '')})" if amp else "")
    out = [("plain fp32", model, None, torch.contiguous_format), (fast, model, amp, fast_layout)]
    if compile_too:
        out.append((fast + "+compile", torch.compile(model), amp, fast_layout))
    return out


def autocast(device, amp):
    return torch.autocast(device.type, dtype=amp, enabled=amp is not None)


# ------------------------------------------------------------------------------------------------

def bench_ddpm(table, device, sz, compile_too):
    """Stage 1: one training step (forward, backward, Adam) at the training batch."""
    torch.manual_seed(0)
    unet = ddpm.UNet(ch=sz["ch"], ch_mult=sz["ch_mult"], attn_res=sz["attn_res"], image_size=sz["img"]).to(device)
    abar = ddpm.make_schedule().to(device)
    B = sz["ddpm_batch"]
    x0 = torch.rand(B, 3, sz["img"], sz["img"], device=device) * 2 - 1
    t = torch.randint(0, 1000, (B,), device=device)
    eps = torch.randn_like(x0)
    x_t = ddpm.q_sample(x0, t, eps, abar)
    unet.eval()                                              # dropout off: both paths see the same function
    flops = ddpm.count_flops(lambda: F.mse_loss(unet(x_t, t), eps).backward())
    losses = {}
    for name, m, amp, layout in variants(unet, device, compile_too):
        unet.to(memory_format=layout)
        # A fresh optimiser after the layout change, as ddpm.py makes it: Adam's state then has the
        # weights' strides, which its fused multi-tensor kernels need (else one launch per tensor).
        opt = torch.optim.Adam(unet.parameters(), lr=1e-12)  # a tiny lr: the weights barely move
        scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)   # as ddpm.py
        xl = x_t.contiguous(memory_format=layout)

        def step():
            with autocast(device, amp):
                loss = F.mse_loss(m(xl, t).float(), eps)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            scaler.step(opt)
            scaler.update()
            return loss
        losses[name] = step().item()
        sec = timed(step, sz["iters"], sz["warmup"], device)
        check = f"loss {losses[name]:.5f}" + (f" (plain {losses['plain fp32']:.5f})" if name != "plain fp32" else "")
        table.add("1 DDPM train", name, B, sec, flops, check)


def bench_generate(table, device, sz, compile_too):
    """Stage 2: one interpolated sampler step (2 encoder passes + 1 decoder pass) at the generation batch."""
    torch.manual_seed(0)
    unet = ddpm.UNet(ch=sz["ch"], ch_mult=sz["ch_mult"], attn_res=sz["attn_res"], image_size=sz["img"])
    unet = unet.to(device).eval().requires_grad_(False)
    B = sz["gen_batch"]
    x = torch.randn(B, 3, sz["img"], sz["img"], device=device)
    xa = torch.randn_like(x)
    t = torch.full((B,), 500, device=device, dtype=torch.long)
    with torch.no_grad():
        flops = ddpm.count_flops(lambda: generate.interpolated_eps(unet, x, xa, t, 0.1))
    outs = {}
    plain, fast = variants(unet, device, False)
    for name, m, amp, layout in [plain, fast] + (
            # generate.py compiles encode and decode separately (the sampler calls them separately)
            [(fast[0] + "+compile", SimpleNamespace(encode=torch.compile(unet.encode),
                                                    decode=torch.compile(unet.decode)), fast[2], fast[3])]
            if compile_too else []):
        unet.to(memory_format=layout)
        xl, xal = x.contiguous(memory_format=layout), xa.contiguous(memory_format=layout)

        @torch.no_grad()
        def step():
            with autocast(device, amp):
                return generate.interpolated_eps(m, xl, xal, t, 0.1)
        outs[name] = step()
        sec = timed(step, sz["iters"], sz["warmup"], device)
        check = "" if name == "plain fp32" else \
            f"eps rel. err {((outs[name] - outs['plain fp32']).norm() / outs['plain fp32'].norm()).item():.1e}"
        table.add("2 sampler step", name, B, sec, flops, check)


def bench_clsp(table, device, sz, compile_too):
    """Stage 3: one CLSP step, B real images -> [v1; v2; s] = 3B views, forward, backward, SGD."""
    torch.manual_seed(0)
    B, S, N, K = sz["clsp_batch"], sz["img"], sz["clsp_images"], 2
    net = nn.Sequential(clsp.make_backbone(), clsp.make_head()).to(device)
    new_opt = lambda: torch.optim.SGD(net.parameters(), lr=1e-12, momentum=0.9, weight_decay=1e-4)
    x_train = torch.randint(0, 256, (N, 3, S, S), dtype=torch.uint8, device=device)
    synthetic = torch.randint(0, 256, (N, K, 3, S, S), dtype=torch.uint8, device=device)
    mean, std = torch.tensor([0.49, 0.48, 0.45], device=device), torch.tensor([0.25, 0.24, 0.26], device=device)

    def loss_of(views, m, amp):
        with autocast(device, amp):
            z = m(views)
        z = F.normalize(z.float(), dim=1)
        return clsp.total_loss(z[:B], z[B:2 * B], z[2 * B:], 1.0, 0.2)[0]

    # The same augmented batch through both paths: the check that they compute the same function.
    net.train()
    g = torch.Generator(device).manual_seed(0)
    idx = torch.randperm(N, device=device)[:B]
    fixed = clsp.augment(torch.cat([x_train[idx], x_train[idx], clsp.pick_candidates(synthetic, idx)]), S,
                         mean, std, generator=g)
    flops = ddpm.count_flops(lambda: loss_of(fixed, net, None).backward())
    net.zero_grad(set_to_none=True)
    ref = None
    for name, m, amp, layout in variants(net, device, compile_too):
        net.to(memory_format=layout)
        opt = new_opt()                                      # its momentum in the weights' layout
        scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)   # as clsp.py
        with torch.no_grad():
            same = loss_of(fixed.contiguous(memory_format=layout), m, amp).item()
        ref = same if ref is None else ref
        if name == "plain fp32":
            continue                                         # the plain path below uses a DataLoader

        def step():
            i = torch.randint(0, N, (B,), device=device)
            views = clsp.augment(torch.cat([x_train[i], x_train[i], clsp.pick_candidates(synthetic, i)]), S, mean, std)
            loss = loss_of(views.contiguous(memory_format=layout), m, amp)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        sec = timed(step, sz["iters"], sz["warmup"], device)
        table.add("3 CLSP step", name, 3 * B, sec, flops, f"loss {same:.5f} (plain {ref:.5f})")

    # The augmentation alone (random parameters + apply_augment, as clsp.py does it): its share of a
    # step, eager and, with --compile, compiled as clsp.py --compile compiles it.
    raw = torch.cat([x_train[idx], x_train[idx], clsp.pick_candidates(synthetic, idx)])
    p = clsp.sample_augment_params(3 * B, S, S, device, g)
    eager = clsp.apply_augment(raw, p, S, mean, std)
    for name, fn in [("fast", clsp.apply_augment)] + (
            [("fast+compile", torch.compile(clsp.apply_augment))] if compile_too else []):
        diff = (fn(raw, p, S, mean, std) - eager).abs().max().item()
        sec = timed(lambda: fn(raw, clsp.sample_augment_params(3 * B, S, S, device), S, mean, std),
                    sz["iters"], sz["warmup"], device)
        table.add("3 augmentation", name, 3 * B, sec, 0, "" if name == "fast" else f"max diff to eager {diff:.1e}")

    # The checkpoint clsp.py writes at the end of every epoch (weights + SGD momentum), to a local file.
    state = dict(net=net.state_dict(), optimizer=opt.state_dict())
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "clsp.pt")
        sec = timed(lambda: ddpm.atomic_save(state, path), sz["iters"] // 4 + 1, 1, torch.device("cpu"))
        table.notes.append(f"clsp.py's per-epoch checkpoint: {os.path.getsize(path) / 1e6:.0f} MB written "
                           f"in {sec:.2f} s (to {tempfile.gettempdir()})")

    # The plain path: PIL-free torchvision transforms on CPU workers, as most SimCLR code does it.
    import torchvision.transforms.v2 as T
    tf = T.Compose([T.RandomResizedCrop(S, scale=(0.08, 1.0), antialias=True), T.RandomHorizontalFlip(),
                    T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(0.2),
                    T.ToDtype(torch.float32, scale=True), T.Normalize(mean.tolist(), std.tolist())])
    x_cpu, syn_cpu = x_train.cpu(), synthetic.cpu()

    class Views(torch.utils.data.Dataset):
        def __len__(self):
            return N

        def __getitem__(self, i):
            return tf(x_cpu[i]), tf(x_cpu[i]), tf(syn_cpu[i, torch.randint(0, K, ()).item()])

    workers = sz["workers"]
    loader = torch.utils.data.DataLoader(Views(), batch_size=B, shuffle=True, drop_last=True, num_workers=workers,
                                         pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    net.to(memory_format=torch.contiguous_format)
    opt = new_opt()
    it = iter(loader)

    def plain_step():
        nonlocal it
        try:
            v1, v2, s = next(it)
        except StopIteration:
            it = iter(loader)
            v1, v2, s = next(it)
        views = torch.cat([v1, v2, s]).to(device, non_blocking=True)
        loss = loss_of(views, net, None)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sec = timed(plain_step, sz["iters"], sz["warmup"], device)
    table.add("3 CLSP step", f"plain fp32 + DataLoader({workers} workers)", 3 * B, sec, flops, f"loss {ref:.5f}")


def bench_features(table, device, sz, compile_too):
    """Stage 4: the frozen backbone's forward pass in eval mode (feature extraction)."""
    torch.manual_seed(0)
    net = clsp.make_backbone().to(device).eval()
    B = sz["feat_batch"]
    x = torch.randn(B, 3, sz["img"], sz["img"], device=device)
    with torch.no_grad():
        flops = ddpm.count_flops(lambda: net(x))
    outs = {}
    for name, m, amp, layout in variants(net, device, compile_too):
        net.to(memory_format=layout)
        xl = x.contiguous(memory_format=layout)

        @torch.no_grad()
        def step():
            with autocast(device, amp):
                return m(xl).float()
        outs[name] = step()
        sec = timed(step, sz["iters"], sz["warmup"], device)
        cos = F.cosine_similarity(outs[name], outs["plain fp32"], dim=1).min().item()
        table.add("4 features", name, B, sec, flops, "" if name == "plain fp32" else f"min cos to plain {cos:.4f}")


SIZES = {  # the real shapes on a GPU; tiny ones on a CPU, where only "it runs" is being checked
    "cuda": dict(img=32, ch=64, ch_mult=(1, 2, 2, 2), attn_res=16, ddpm_batch=128, gen_batch=2048,
                 clsp_batch=1024, clsp_images=20_000, feat_batch=1024, iters=20, warmup=5,
                 workers=min(16, os.cpu_count() or 1)),
    "cpu": dict(img=16, ch=32, ch_mult=(1, 2), attn_res=8, ddpm_batch=4, gen_batch=4, clsp_batch=4,
                clsp_images=16, feat_batch=4, iters=1, warmup=0, workers=0),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--compile", action="store_true", help="also time the torch.compile variant of the fast paths")
    p.add_argument("--stages", default="1234", help="which stages to run, e.g. 13")
    args = p.parse_args(argv)
    device = ddpm.pick_device(args.device)
    sz = SIZES["cuda" if device.type == "cuda" else "cpu"]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        print(f"device: {torch.cuda.get_device_name(device)}; torch {torch.__version__}; "
              f"dense bf16 peak {ddpm.peak_flops(device) and ddpm.peak_flops(device) / 1e12} TFLOP/s", flush=True)
    else:
        print(f"device: cpu; torch {torch.__version__}; tiny sizes (a check that it runs, not a measurement)")
    table = Table(device)
    for k, fn in zip("1234", (bench_ddpm, bench_generate, bench_clsp, bench_features)):
        if k in args.stages:
            fn(table, device, sz, args.compile and device.type == "cuda")
    table.show()


if __name__ == "__main__":
    main()
