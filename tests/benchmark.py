"""Speed benchmark of the four stages: the paths the scripts take against the plain path a typical
implementation takes, on random data of the real shapes, in one run, so every speed-up is a measured ratio.

    python tests/benchmark.py                    # on the GPU: the real sizes, eager and compiled
    python tests/benchmark.py --stages 12        # only stages 1 and 2
    python tests/benchmark.py --more             # also channels_last and batch-size scaling (stage 1)
    python tests/benchmark.py --profile 1        # also a torch.profiler table of stage 1's compiled step
    python tests/benchmark.py --device cpu       # tiny sizes, seconds: checks that it runs (tests do this)
    python tests/benchmark.py --nproc 4         # stages 1-3 on 1 and on 4 GPUs (torchrun), the same global batch
    python tests/benchmark.py --dataset stl10   # STL-10's shapes: 64 px, its UNet layout, the mid stem

For each stage it prints images/s, the achieved TFLOP/s (FLOPs counted by torch.utils.flop_counter, in
fp32 terms: a bf16 multiply-add counts the same as an fp32 one), MFU against the GPU's dense bf16 peak
(fp16 on GPUs without bf16 tensor cores), peak memory, and a check that the row computes the same
function as the reference row: the loss of the first step from the same weights and the same random
draws (tests/test_benchmark.py asserts it on the CPU), or the relative error of the output.

Rows, named as the scripts' flags are:
  plain     fp32, NCHW, eager; for stage 3 a DataLoader with torchvision's transforms on CPU workers.
  eager     what a script runs with --no-compile: the autocast dtype of --precision auto (bf16, or fp16
            before Ampere), the scripts' layouts, data on the GPU as uint8, batched GPU augmentation,
            fused Adam (stage 1).
  compiled  what a script runs by default on a GPU: the same, torch.compile'd as the script compiles
            it. Its first call compiles; the check column says how long that took.
The training rows call the scripts' own step functions (ddpm.make_train_step, clsp.make_train_step),
so a row times exactly what the script runs.

Not collected by pytest (its name does not start with test_); tests/test_benchmark.py runs the CPU mode.
"""

import argparse
import copy
import os
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import clsp      # noqa: E402
import common    # noqa: E402
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
        self.peak = common.peak_flops(device)
        self.device = device
        self.rows, self.notes = [], []

    def first_loss(self, stage):
        """The loss in the first row of a stage (its plain row), from the check column."""
        row = next(r for r in self.rows if r[0] == stage)
        return float(row[-1].split("loss ")[1].split(" ")[0])

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


def autocast(device, amp):
    return torch.autocast(device.type, dtype=amp, enabled=amp is not None)


def first_call(fn):
    """fn() once, synchronised: (its result, seconds). For a compiled row, the compile time."""
    t0 = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def compile_note(seconds, compiled):
    return f"; compiled in {seconds:.0f} s" if compiled else ""


# ------------------------------------------------------------------------------------------------

def bench_ddpm(table, device, opts):
    """Stage 1: ddpm.make_train_step (loss, backward, clipping, Adam, EMA) at the training batch."""
    sz, amp = opts.sz, common.autocast_dtype("auto", device)
    rows = [("plain fp32", None, False, torch.contiguous_format, False, sz["ddpm_batch"]),
            ("eager", amp, False, torch.contiguous_format, True, sz["ddpm_batch"])]
    if opts.compile:
        rows.append(("compiled", amp, True, torch.contiguous_format, True, sz["ddpm_batch"]))
    if opts.more:   # is NCHW the right layout (CUDA's GroupNorm has no NHWC kernel)? is it launch-bound?
        rows += [("eager, channels_last", amp, False, torch.channels_last, True, sz["ddpm_batch"]),
                 ("eager, batch 32", amp, False, torch.contiguous_format, True, 32),
                 ("eager, batch 512", amp, False, torch.contiguous_format, True, 512)]
        if opts.compile:
            rows += [("compiled, channels_last", amp, True, torch.channels_last, True, sz["ddpm_batch"]),
                     ("compiled, batch 512", amp, True, torch.contiguous_format, True, 512)]
    ref = None
    for name, dtype, compiled, layout, fused, B in rows:
        torch.manual_seed(0)                                 # the same initial weights in every row
        unet = ddpm.UNet(ch=sz["ch"], ch_mult=sz["ch_mult"], attn_res=sz["attn_res"], image_size=sz["img"])
        unet = unet.to(device, memory_format=layout).eval()  # dropout off: every row the same function
        ema = copy.deepcopy(unet).requires_grad_(False)
        abar = ddpm.make_schedule().to(device)
        opt = torch.optim.Adam(unet.parameters(), lr=1e-12, fused=fused and device.type == "cuda")   # tiny lr
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        settings = dict(lr=1e-12, warmup=0, grad_clip=1.0, ema_decay=0.9999)
        step = ddpm.make_train_step(unet, ema, opt, scaler, abar, settings, dtype, compiled)
        x = torch.randint(0, 256, (B, 3, sz["img"], sz["img"]), dtype=torch.uint8, device=device)
        x = x.contiguous(memory_format=layout)
        if name == "plain fp32":
            flops = common.count_flops(lambda: step(x, 0)) / B      # per image
        torch.manual_seed(1)                                 # the same flips, t and eps in every row
        loss, first = first_call(lambda: step(x, 0).item())
        check = f"loss {loss:.5f}" + (f" (plain {ref:.5f})" if ref is not None and B == sz["ddpm_batch"] else "")
        ref = loss if ref is None else ref
        sec = timed(lambda: step(x, 1000), sz["iters"], sz["warmup"], device)
        table.add("1 DDPM train", name, B, sec, flops * B, check + compile_note(first, compiled))
        if opts.profile and "1" in opts.profile and name == rows[-1][0]:
            profile(lambda: step(x, 1000), device, f"stage 1, {name}")


def bench_generate(table, device, opts):
    """Stage 2: one interpolated sampler step as generate.py takes it (the anchor re-noised, 2 encoder
    passes + 1 decoder pass, the DDIM update) at the generation batch."""
    sz, amp = opts.sz, common.autocast_dtype("auto", device)
    torch.manual_seed(0)
    unet = ddpm.UNet(ch=sz["ch"], ch_mult=sz["ch_mult"], attn_res=sz["attn_res"], image_size=sz["img"])
    unet = unet.to(device).eval().requires_grad_(False)
    abar = ddpm.make_schedule().to(device)
    B = sz["gen_batch"]
    x = torch.randn(B, 3, sz["img"], sz["img"], device=device)
    x_a = torch.rand_like(x) * 2 - 1
    t = torch.full((B,), 500, device=device, dtype=torch.long)
    w = torch.tensor(0.1, device=device)
    with torch.no_grad():
        flops = common.count_flops(lambda: generate.interpolated_eps(unet, x, x_a, t, 0.1))
    rows = [("plain fp32", None, generate.interpolated_eps), ("eager", amp, generate.interpolated_eps)]
    if opts.compile:
        rows.append(("compiled", amp, torch.compile(generate.interpolated_eps)))   # as generate.py compiles it
    outs = {}
    for name, dtype, eps_fn in rows:
        @torch.no_grad()
        def step():
            xa_t = ddpm.q_sample(x_a, t, torch.randn_like(x_a), abar)
            with autocast(device, dtype):
                eps = eps_fn(unet, x, xa_t, t, w)
            return ddpm.ddim_step(x, eps, 500, 490, abar, 0.1, torch.randn_like(x)), eps
        torch.manual_seed(1)
        (_, outs[name]), first = first_call(step)
        sec = timed(step, sz["iters"], sz["warmup"], device)
        check = "" if name == "plain fp32" else \
            f"eps rel. err {((outs[name] - outs['plain fp32']).norm() / outs['plain fp32'].norm()).item():.1e}"
        table.add("2 sampler step", name, B, sec, flops, check + compile_note(first, name == "compiled"))
        if opts.profile and "2" in opts.profile and name == rows[-1][0]:
            profile(step, device, f"stage 2, {name}")


def bench_clsp(table, device, opts):
    """Stage 3: clsp.make_train_step, B real images -> [v1; v2; s] = 3B views, forward, backward, SGD;
    then clsp.make_moco_step and clsp.make_nnclr_step, the same on MoCo-v2 and on NNCLR."""
    sz, amp = opts.sz, common.autocast_dtype("auto", device)
    B, S, N, K = sz["clsp_batch"], sz["img"], sz["clsp_images"], 2
    layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format   # as clsp.py
    x_train = torch.randint(0, 256, (N, 3, S, S), dtype=torch.uint8, device=device)
    synthetic = torch.randint(0, 256, (N, K, 3, S, S), dtype=torch.uint8, device=device)
    mean, std = torch.tensor([0.49, 0.48, 0.45], device=device), torch.tensor([0.25, 0.24, 0.26], device=device)

    def new_net(layout, head=clsp.make_head):
        torch.manual_seed(0)                                 # the same initial weights in every row
        net = nn.Sequential(clsp.make_backbone(sz.get("stem", "cifar")), head()).to(device, memory_format=layout)
        return net, torch.optim.SGD(net.parameters(), lr=1e-12, momentum=0.9, weight_decay=1e-4)

    def settings(batch, **kw):
        """A one-step schedule at learning rate 1e-12 (lr_at's cosine starts at its peak), so every row
        times the same weights."""
        return dict(tau=0.2, positive="synthetic", lr=1e-12 * 1024 / batch, batch_size=batch, epochs=1,
                    warmup_epochs=0, **kw)

    def batch(size):
        i = torch.randint(0, N, (size,), device=device)
        return i, x_train[i], clsp.pick_candidates(synthetic, i)

    rows = [("eager fp32", None, False, torch.contiguous_format), ("eager", amp, False, layout)]
    if opts.compile:
        rows.append(("compiled", amp, True, layout))

    def bench_base(label, size, make_step, head=clsp.make_head):
        """One table row per path of a base's step; make_step(net, opt, scaler, dtype, compiled, layout) ->
        (train_step, its queue or None)."""
        ref = flops = None
        for name, dtype, compiled, lay in rows:
            net, opt = new_net(lay, head)
            scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
            step, queue = make_step(net, opt, scaler, dtype, compiled, lay)
            torch.manual_seed(1)                             # the same images and augmentations
            args = batch(size)
            if ref is None:
                saved = None if queue is None else (queue.keys.clone(), queue.index.clone(), queue.ptr)
                flops = common.count_flops(lambda: step(*args, 0))
                if queue is not None:                        # the queue as it was before the counted step
                    queue.keys.copy_(saved[0])
                    queue.index.copy_(saved[1])
                    queue.ptr = saved[2]
                torch.manual_seed(1)
                args = batch(size)
            losses, first = first_call(lambda: [v.item() for v in step(*args, 0).values()])
            loss = losses[0] + losses[1]
            ref = loss if ref is None else ref
            sec = timed(lambda: step(*batch(size), 0), sz["iters"], sz["warmup"], device)
            table.add(label, name, 3 * size, sec, flops, f"loss {loss:.5f} (plain {ref:.5f})"
                      + compile_note(first, compiled))
            if opts.profile and "3" in opts.profile and name == rows[-1][0] and label == "3 CLSP step":
                profile(lambda: step(*batch(size), 0), device, f"stage 3, {name}")
        return flops

    flops = bench_base("3 CLSP step", B, lambda net, opt, scaler, dtype, compiled, lay: (clsp.make_train_step(
        net, opt, scaler, settings(B, lam=1.0), mean, std, 1, dtype, compiled, lay), None))

    # The candidates in pinned host memory (clsp.HostCandidates, as clsp.py --candidates-on host): the last
    # row's step, each batch's picks gathered on the host and copied in; its loss must be the plain row's.
    name, dtype, compiled, lay = rows[-1]
    host = clsp.HostCandidates(synthetic.cpu(), device)
    net, opt = new_net(lay)
    step = clsp.make_train_step(net, opt, torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
                                settings(B, lam=1.0), mean, std, 1, dtype, compiled, lay)

    def host_batch(size):
        i = torch.randint(0, N, (size,), device=device)
        return i, x_train[i], clsp.pick_candidates(host, i)
    torch.manual_seed(1)
    args = host_batch(B)
    losses, first = first_call(lambda: [v.item() for v in step(*args, 0).values()])
    sec = timed(lambda: step(*host_batch(B), 0), sz["iters"], sz["warmup"], device)
    table.add("3 CLSP step", f"{name}, host candidates", 3 * B, sec, flops,
              f"loss {losses[0] + losses[1]:.5f} (plain {table.first_loss('3 CLSP step'):.5f})"
              + compile_note(first, compiled))

    # CLSP on MoCo-v2 (clsp.make_moco_step, as clsp.py --base moco runs it): each view through the query
    # encoder on its own, two more through the key encoder, the queues on the device, at MoCo's batch.
    def moco_step(net, opt, scaler, dtype, compiled, lay):
        torch.manual_seed(2)                                 # the same queue in every row
        queue = clsp.Queue(2, sz["moco_queue"], 256, device)
        s = settings(sz["moco_batch"], lam=0.5, key_momentum=0.99, key_momentum_end=0.99)
        return clsp.make_moco_step(net, copy.deepcopy(net).requires_grad_(False), queue, opt, scaler, s,
                                   mean, std, 1, dtype, compiled, lay), queue
    bench_base("3 CLSP-MoCo step", sz["moco_batch"], moco_step)

    # CLSP on NNCLR (clsp.make_nnclr_step): each view through the network and the predictor on its own,
    # the nearest neighbours searched in the support set, LARS, at NNCLR's batch of 256 (CPU: tiny).
    def nnclr_step(net, opt, scaler, dtype, compiled, lay):
        torch.manual_seed(2)                                 # the same predictor and support set in every row
        predictor = clsp.make_nnclr_predictor().to(device)
        support = clsp.Queue(1, sz["nnclr_queue"], 256, device)
        opt = clsp.LARS(clsp.lars_param_groups([net, predictor]))
        s = settings(sz["nnclr_batch"], lam=1.0)
        return clsp.make_nnclr_step(net, predictor, support, opt, scaler, s, mean, std, 1, dtype, compiled,
                                    lay), support
    bench_base("3 CLSP-NNCLR step", sz["nnclr_batch"], nnclr_step, head=clsp.make_nnclr_projector)

    # The augmentation alone (random parameters + apply_augment, as clsp.py does it): its share of a
    # step, eager and compiled as clsp.py compiles it.
    g = torch.Generator(device).manual_seed(0)
    idx = torch.randperm(N, device=device)[:B]
    raw = torch.cat([x_train[idx], x_train[idx], clsp.pick_candidates(synthetic, idx)])
    p = clsp.sample_augment_params(3 * B, S, S, device, g)
    eager = clsp.apply_augment(raw, p, S, mean, std)
    for name, fn in [("eager", clsp.apply_augment)] + (
            [("compiled", torch.compile(clsp.apply_augment))] if opts.compile else []):
        diff = (fn(raw, p, S, mean, std) - eager).abs().max().item()
        sec = timed(lambda: fn(raw, clsp.sample_augment_params(3 * B, S, S, device), S, mean, std),
                    sz["iters"], sz["warmup"], device)
        table.add("3 augmentation", name, 3 * B, sec, 0, "" if name == "eager" else f"max diff to eager {diff:.1e}")

    # The checkpoint clsp.py writes at the end of every epoch (weights + SGD momentum), to a local file.
    net, opt = new_net(layout)                               # a SimCLR checkpoint, one step into a run
    clsp.make_train_step(net, opt, torch.amp.GradScaler(device.type, enabled=False), settings(B, lam=1.0), mean,
                         std, 1)(*batch(B), 0)
    state = dict(net=net.state_dict(), optimizer=opt.state_dict())
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "clsp.pt")
        sec = timed(lambda: common.atomic_save(state, path), sz["iters"] // 4 + 1, 1, torch.device("cpu"))
        table.notes.append(f"clsp.py's per-epoch checkpoint: {os.path.getsize(path) / 1e6:.0f} MB written "
                           f"in {sec:.2f} s (to {tempfile.gettempdir()})")

    # The plain path: torchvision's transforms on CPU workers, as most SimCLR code does it.
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
    net, opt = new_net(torch.contiguous_format)
    it = iter(loader)

    def plain_step():
        nonlocal it
        try:
            v1, v2, s = next(it)
        except StopIteration:
            it = iter(loader)
            v1, v2, s = next(it)
        z = F.normalize(net(torch.cat([v1, v2, s]).to(device, non_blocking=True)), dim=1)
        loss = clsp.total_loss(z[:B], z[B:2 * B], z[2 * B:], 1.0, 0.2)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sec = timed(plain_step, sz["iters"], sz["warmup"], device)
    table.add("3 CLSP step", f"plain fp32 + DataLoader({workers} workers)", 3 * B, sec, flops, "")


def bench_features(table, device, opts):
    """Stage 4: the frozen backbone's forward pass in eval mode (feature extraction)."""
    sz, amp = opts.sz, common.autocast_dtype("auto", device)
    torch.manual_seed(0)
    net = clsp.make_backbone().to(device).eval()
    B = sz["feat_batch"]
    x = torch.randn(B, 3, sz["img"], sz["img"], device=device)
    with torch.no_grad():
        flops = common.count_flops(lambda: net(x))
    layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format   # as evaluate.py
    rows = [("plain fp32", net, None, torch.contiguous_format), ("eager", net, amp, layout)]
    outs = {}
    for name, m, dtype, lay in rows:
        net.to(memory_format=lay)
        xl = x.contiguous(memory_format=lay)

        @torch.no_grad()
        def step():
            with autocast(device, dtype):
                return m(xl).float()
        outs[name] = step()
        sec = timed(step, sz["iters"], sz["warmup"], device)
        cos = F.cosine_similarity(outs[name], outs["plain fp32"], dim=1).min().item()
        table.add("4 features", name, B, sec, flops, "" if name == "plain fp32" else f"min cos to plain {cos:.4f}")


def profile(fn, device, title):
    """The kernels of 5 calls of fn(), the most expensive first, and the CPU and GPU time they took."""
    from torch.profiler import ProfilerActivity
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for _ in range(3):
        fn()
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(5):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(f"\nprofile of {title}, 5 calls:\n" + prof.key_averages().table(sort_by=key, row_limit=20), flush=True)


SIZES = {  # the real shapes on a GPU; tiny ones on a CPU, where only "it runs" is being checked
    "cuda": dict(img=32, ch=64, ch_mult=(1, 2, 2, 2), attn_res=16, ddpm_batch=128, gen_batch=2048,
                 clsp_batch=1024, clsp_images=20_000, moco_batch=512, moco_queue=32768, nnclr_batch=256,
                 nnclr_queue=65536, feat_batch=1024, iters=20, warmup=5,
                 workers=min(16, os.cpu_count() or 1)),
    "cpu": dict(img=16, ch=32, ch_mult=(1, 2), attn_res=8, ddpm_batch=4, gen_batch=4, clsp_batch=4,
                clsp_images=16, moco_batch=4, moco_queue=8, nnclr_batch=4, nnclr_queue=8, feat_batch=4, iters=1,
                warmup=0, workers=0),
}
STL10_SIZES = {  # --dataset stl10: what changes (ddpm.py's, generate.py's and clsp.py's STL-10 recipes)
    "cuda": dict(img=64, ch_mult=(1, 2, 3, 4), attn_res=(32, 16), gen_batch=512, stem="mid"),
    "cpu": dict(stem="mid"),
}


# ------------------------------------------------------------------------------------------------
# --nproc N: the training steps and the sampler on N processes (torchrun), beside the same on one
# ------------------------------------------------------------------------------------------------

def bench_processes(opts):
    """Runs this file as one process, then under torchrun as N, each timing the stages' steps at the
    same global batch (stage 2: each process its own batch, as generate.py deals them). The loss column
    is the first step's, from the same weights and draws: the N-process rows must show the 1-process loss."""
    for n in (1, opts.nproc):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
               os.path.abspath(__file__), "--processes-worker", "--stages", opts.stages] + \
              (["--device", opts.device] if opts.device else []) + ([] if opts.compile else ["--no-compile"])
        print(f"\n{n} process{'es' * (n > 1)}: {' '.join(cmd[1:])}", flush=True)
        if subprocess.run(cmd).returncode != 0:
            raise SystemExit(f"error: the {n}-process run failed (its output is above)")


def processes_worker(opts):
    """One process of bench_processes: the global batch cut into N slices, as the scripts cut it."""
    device = common.start_processes(opts.device)
    sz, amp, n = SIZES["cuda" if device.type == "cuda" else "cpu"], common.autocast_dtype("auto", device), \
        common.WORLD_SIZE
    compiled = opts.compile and device.type == "cuda"
    path = f"{n} proc{'s' * (n > 1)}" + (", compiled" if compiled else ", eager")
    mine, table = common.this_process, Table(device)
    if "1" in opts.stages:
        B = sz["ddpm_batch"]
        common.require_divisible(B)
        torch.manual_seed(0)
        unet = ddpm.UNet(ch=sz["ch"], ch_mult=sz["ch_mult"], attn_res=sz["attn_res"], image_size=sz["img"])
        unet = unet.to(device).eval()                        # dropout off: the same function on any N
        opt = torch.optim.Adam(unet.parameters(), lr=1e-12, fused=device.type == "cuda")
        step = ddpm.make_train_step(unet, copy.deepcopy(unet).requires_grad_(False), opt,
                                    torch.amp.GradScaler(device.type, enabled=amp == torch.float16),
                                    ddpm.make_schedule().to(device),
                                    dict(lr=1e-12, warmup=0, grad_clip=1.0, ema_decay=0.9999), amp, compiled)
        x = torch.randint(0, 256, (B, 3, sz["img"], sz["img"]), dtype=torch.uint8, device=device)[mine(B)]
        torch.manual_seed(1)
        loss, first = first_call(lambda: step(x, 0).item())
        sec = timed(lambda: step(x, 1000), sz["iters"], sz["warmup"], device)
        table.add("1 DDPM train", path, B, sec, 0, f"loss {loss:.5f}" + compile_note(first, compiled))
    if "2" in opts.stages:                                   # no communication: each process its own batch
        torch.manual_seed(0)
        unet = ddpm.UNet(ch=sz["ch"], ch_mult=sz["ch_mult"], attn_res=sz["attn_res"], image_size=sz["img"])
        unet, abar, B = unet.to(device).eval().requires_grad_(False), ddpm.make_schedule().to(device), sz["gen_batch"]
        x = torch.randn(B, 3, sz["img"], sz["img"], device=device)
        t, w = torch.full((B,), 500, device=device, dtype=torch.long), torch.tensor(0.1, device=device)
        eps_fn = torch.compile(generate.interpolated_eps) if compiled else generate.interpolated_eps

        @torch.no_grad()
        def sampler_step():
            with autocast(device, amp):
                return ddpm.ddim_step(x, eps_fn(unet, x, x, t, w), 500, 490, abar, 0.1, torch.randn_like(x))
        _, first = first_call(sampler_step)
        sec = timed(sampler_step, sz["iters"], sz["warmup"], device)
        common.barrier()
        table.add("2 sampler step", path, n * B, sec, 0, compile_note(first, compiled).lstrip("; "))
    if "3" in opts.stages:
        B, S = sz["clsp_batch"], sz["img"]
        common.require_divisible(B)
        layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format
        torch.manual_seed(0)
        net = nn.Sequential(clsp.make_backbone(), clsp.make_head()).to(device, memory_format=layout)
        net = common.sync_batchnorm(net)
        opt = torch.optim.SGD(net.parameters(), lr=1e-12, momentum=0.9, weight_decay=1e-4)
        mean, std = torch.tensor([0.49, 0.48, 0.45], device=device), torch.tensor([0.25, 0.24, 0.26], device=device)
        s = dict(tau=0.2, lam=1.0, positive="synthetic", lr=1e-12 * 1024 / B, batch_size=B, epochs=1, warmup_epochs=0)
        step = clsp.make_train_step(net, opt, torch.amp.GradScaler(device.type, enabled=amp == torch.float16), s,
                                    mean, std, 1, amp, compiled, layout)
        x_train = torch.randint(0, 256, (sz["clsp_images"], 3, S, S), dtype=torch.uint8, device=device)
        synthetic = torch.randint(0, 256, (sz["clsp_images"], 2, 3, S, S), dtype=torch.uint8, device=device)

        def batch():                                         # the whole batch's draws; this process's slice
            i = torch.randint(0, sz["clsp_images"], (B,), device=device)
            x3 = clsp.pick_candidates(synthetic, i)
            return i[mine(B)], x_train[i[mine(B)]], x3[mine(B)]
        torch.manual_seed(1)
        args = batch()
        losses, first = first_call(lambda: [v.item() for v in step(*args, 0).values()])
        sec = timed(lambda: step(*batch(), 0), sz["iters"], sz["warmup"], device)
        table.add("3 CLSP step", path, 3 * B, sec, 0, f"loss {sum(losses):.5f}" + compile_note(first, compiled))
    if common.MAIN:
        table.show()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--stages", default="1234", help="which stages to run, e.g. 13")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="skip the compiled rows (each compiles for up to a minute)")
    p.add_argument("--more", action="store_true",
                   help="stage 1 also with channels_last and at batch 32 and 512 (launch- or compute-bound?)")
    p.add_argument("--profile", default="", help="stages whose last row is also profiled, e.g. 12")
    p.add_argument("--dataset", default="cifar10", choices=["cifar10", "stl10"],
                   help="the shapes: CIFAR's 32 px, or STL-10's 64 px with its UNet layout and the ResNet's mid stem")
    p.add_argument("--nproc", type=int, help="stages 1 to 3's steps on 1 and on N processes (torchrun; one GPU "
                                             "each, or the CPU with --device cpu)")
    p.add_argument("--processes-worker", action="store_true", help=argparse.SUPPRESS)   # one of those processes
    opts = p.parse_args(argv)
    if opts.processes_worker:
        return processes_worker(opts)
    if opts.nproc:
        opts.stages = "".join(k for k in opts.stages if k in "123")
        return bench_processes(opts)
    device = common.pick_device(opts.device)
    kind = "cuda" if device.type == "cuda" else "cpu"
    opts.sz = {**SIZES[kind], **(STL10_SIZES[kind] if opts.dataset == "stl10" else {})}
    opts.compile = opts.compile and device.type == "cuda"    # on a CPU, compiling would take minutes
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True                # as clsp.py sets it
        print(f"device: {torch.cuda.get_device_name(device)}; torch {torch.__version__}; "
              f"dense bf16 peak {common.peak_flops(device) and common.peak_flops(device) / 1e12} TFLOP/s", flush=True)
    else:
        print(f"device: cpu; torch {torch.__version__}; tiny sizes (a check that it runs, not a measurement)")
    table = Table(device)
    for k, fn in zip("1234", (bench_ddpm, bench_generate, bench_clsp, bench_features)):
        if k in opts.stages:
            fn(table, device, opts)
    table.show()


if __name__ == "__main__":
    main()
