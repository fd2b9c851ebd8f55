"""The plumbing every stage of CLSP shares, and none of the method.

The method lives in the four stage files, each read top to bottom on its own:

    ddpm.py      stage 1: the forward process, the UNet, DDIM sampling, Algorithm 1 of Ho et al.
    generate.py  stage 2: interpolated DDIM sampling, K synthetic positives per training image
    clsp.py      stage 3: the ResNet-18, the augmentations, SimCLR's NT-Xent + the CLSP term, the same
                 term on MoCo-v2 and on NNCLR, the '-aug' controls, the kNN vote
    evaluate.py  stage 4: the linear probe, the diagnostics of the positives

This file holds what makes each of them a dependable program and what none of them is about: settings
and presets, devices, precision and compile switches, the data sets and their fingerprint, safe
artifacts (a lock, atomic writes, checked loads, resume state), progress lines and MFU, Ctrl-C and
SIGTERM, one-sentence failures and the picture grid. A stage imports method only from an earlier stage
(`from ddpm import UNet`) and plumbing only from here, so copying clsp.py into another project means
copying clsp.py and this file. Nothing here needs reading to understand CLSP.

What it guarantees, in one place:
  - a mistake (a flag, a missing or mismatched artifact, a data set that is not there) stops the run
    before any work with one sentence that says what to do, never a traceback;
  - artifacts are written to a temporary file and renamed, so a kill or a full disk leaves the previous
    file intact; a stale temporary file is removed by the next run that writes that path;
  - two runs never write the same artifact at once (a lock beside it, freed by the OS even on kill -9);
  - every artifact records a fingerprint of the data it was made from, and the next stage checks it.
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
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor


def _quit_quietly(hint):
    """A signal handler: Ctrl-C (SIGINT) or SIGTERM ends the run at once with one sentence, no traceback."""
    def handler(signum, frame):
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        raise SystemExit(f"error: stopped by {name}; {hint}")
    return handler


def _quit_at_once(signum, frame):
    """The start-up handler: the sentence, then the process ends at once. Not SystemExit: raised inside
    `import numpy`, numpy would turn it into a long ImportError about a bad install. Nothing is written
    yet, so there is nothing to clean up."""
    name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
    sys.stderr.write(f"error: stopped by {name}; nothing was written yet: run the same command again\n")
    sys.stderr.flush()
    os._exit(1)


# The scripts import this file before PyTorch, which takes seconds to load: when one of them is the
# program being run (not imported by a test or a notebook), a Ctrl-C or SIGTERM from here on is one
# sentence, not a traceback.
_main = getattr(sys.modules["__main__"], "__file__", None)
if _main and os.path.basename(_main) in ("ddpm.py", "generate.py", "clsp.py", "evaluate.py") and \
        os.path.dirname(os.path.abspath(_main)) == os.path.dirname(os.path.abspath(__file__)):
    for _sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(_sig, _quit_at_once)

# Several processes: `torchrun --nproc-per-node N script.py` starts N copies of a script and tells each
# which one it is in its environment (RANK 0..N-1 in the whole job, LOCAL_RANK: its GPU on this
# machine, WORLD_SIZE N); plain `python script.py` is the one process, rank 0 of 1. Rank 0 alone prints:
# the others' standard output goes nowhere, so N processes read as one run (errors still reach stderr).
RANK, WORLD_SIZE = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
LOCAL_RANK = int(os.environ.get("LOCAL_RANK", 0))
MAIN = RANK == 0              # the process that prints, takes the output's lock and writes every file
if not MAIN:
    sys.stdout = open(os.devnull, "w")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# ------------------------------------------------------------------------------------------------
# Failing clearly
# ------------------------------------------------------------------------------------------------

def fail(msg):
    """Stop with one clear sentence (and exit code 1), never with a traceback, for a user's mistake."""
    raise SystemExit(f"error: {msg}")


def run_main(main, argv, oom_hint, interrupt_hint="nothing was lost that was saved"):
    """main(argv), with the GPU running out of memory (a smaller GPU than the preset assumes, or another
    program on it), Ctrl-C or SIGTERM outside a training loop, and a second Ctrl-C inside one, each turned
    into one sentence instead of a traceback. (A loop's own StopFlag turns the first Ctrl-C into a stop
    at the end of the step.) Under torchrun, each sentence is said once (said_once)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _quit_quietly(interrupt_hint))
    try:
        try:
            main(argv)
            end_processes()
        except torch.cuda.OutOfMemoryError:
            fail(f"out of GPU memory (nvidia-smi shows what else uses it); {oom_hint}")
        except KeyboardInterrupt:
            fail(f"stopped at once by Ctrl-C; {interrupt_hint}")
        except Exception as e:                      # torchrun: a collective failed (another process ended or hung)
            if not _STARTED or not _in_a_collective(e):
                raise
            for sig in (signal.SIGINT, signal.SIGTERM):  # torchrun's SIGTERM to the survivors follows: the
                signal.signal(sig, signal.SIG_IGN)        # process is ending already, with this sentence
            raise _lost_the_others(e) from None
    except SystemExit as e:
        # torchrun's SIGTERM may land while the failed collective's error is on its way out (its sentence,
        # "stopped by SIGTERM", would hide why): the lost processes are the cause, and said so.
        if _STARTED and e.__context__ is not None and _in_a_collective(e.__context__):
            e = _lost_the_others(e.__context__)
        raise said_once(e) from None


def _lost_the_others(e):
    first_line = (str(e).strip().splitlines() or [""])[0][:160]
    return SystemExit(f"error: process {RANK} lost the other processes of this run ({type(e).__name__}: "
                      f"{first_line}); one of them stopped, and its own message says why")


def _in_a_collective(e):
    """Did e come from torch.distributed (gloo says "Connection closed by peer" as a plain RuntimeError)?"""
    import traceback
    return isinstance(e, torch.distributed.DistError) or any(
        f"torch{os.sep}distributed" in frame.filename for frame in traceback.extract_tb(e.__traceback__)[-3:])


def said_once(e):
    """The SystemExit a process of a torchrun job ends with. Every process runs the same checks and the
    same loop, so most sentences would be said N times: rank 0 says them. Another process says only what
    is its own (its GPU ran out of memory, it lost the others), after the process group started, with its
    rank; a stop (Ctrl-C, SIGTERM, an interrupted run) is rank 0's to report."""
    msg = e.code
    if MAIN or not isinstance(msg, str):
        return e
    shared = msg.startswith(("interrupted", "error: interrupted", "error: stopped")) or not _STARTED
    if shared or "lost the other processes" in msg:
        return SystemExit(1)
    return SystemExit(msg.replace("error: ", f"error: process {RANK} of {WORLD_SIZE}: ", 1))


# ------------------------------------------------------------------------------------------------
# Settings: defaults <- preset <- the flags the user gave; hints that repeat those flags
# ------------------------------------------------------------------------------------------------

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


def resolve_settings(args, defaults, presets):
    """settings = defaults <- preset <- every flag the user gave explicitly (argparse default None).
    Returns (settings, explicit), tuples as lists, as an artifact saves them."""
    if args.preset not in presets:
        fail(f"unknown --preset {args.preset!r}; choose one of {', '.join(presets)}")
    as_saved = lambda d: {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
    explicit = as_saved({k: v for k, v in vars(args).items() if v is not None and k in defaults})
    return as_saved({**defaults, **presets[args.preset], **explicit}), explicit


def dataset_settings(s, explicit, preset, datasets, presets):
    """A data set's own recipe, once s["dataset"] is known (STL-10's 64 px and the authors' STL-10 values).
    datasets[name]["standard"] holds its defaults, which sit beside DEFAULTS: a preset and a flag win over
    them, as over DEFAULTS; datasets[name][preset] is the data set's own version of a preset (STL-10's
    `paper` is the authors' STL-10 run), which wins over the preset; a flag wins over everything."""
    own = datasets.get(s["dataset"], {})
    as_saved = lambda v: list(v) if isinstance(v, tuple) else v
    s.update({k: as_saved(v) for k, v in own.get("standard", {}).items()
              if k not in explicit and k not in presets[preset]})
    if preset != "standard":
        s.update({k: as_saved(v) for k, v in own.get(preset, {}).items() if k not in explicit})


def command(script, args, *extra, out=None, default_out=None):
    """`python ddpm.py --preset tiny --dataset folder --data-dir DIR ...` (under torchrun, the torchrun that
    started this run: launcher): a command for a hint, with the user's own --preset and data flags (those
    given on this command line), so it can be pasted as it is.
    A flag in `extra` replaces the user's flag of that name; `out`, the file the command is to write, is
    passed as --out unless it is the script's own default (default_out)."""
    flags = [] if args.preset == "standard" else ["--preset", args.preset]
    extra = list(map(str, extra)) + (["--out", out] if out is not None and out != default_out else [])
    for key in ("dataset", "data_dir", "image_size"):
        flag = f"--{key.replace('_', '-')}"
        if getattr(args, key, None) is not None and flag not in extra:
            flags += [flag, str(getattr(args, key))]
    return "`" + " ".join(launcher(script) + [shlex.quote(f) for f in flags + extra]) + "`"


def launcher(script):
    """How a hint starts a script: `python`, or under torchrun the torchrun of this job (one machine: its
    --nproc-per-node; several: the same torchrun flags), except for evaluate.py, which is one process."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", WORLD_SIZE))
    if WORLD_SIZE == 1 or script == "evaluate.py":
        return ["python", script]
    if local == WORLD_SIZE:
        return ["torchrun", "--standalone", "--nproc-per-node", str(WORLD_SIZE), script]
    return ["torchrun", "[the same torchrun flags]", script]


# ------------------------------------------------------------------------------------------------
# Devices, precision, compile
# ------------------------------------------------------------------------------------------------

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
    of stages 1 and 3; it does nothing in bf16 or fp32). On a CPU, auto is fp32."""
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def compile_enabled(flag, device):
    """--compile / --no-compile, or by default: on with a CUDA GPU that Triton (inductor's GPU code
    generator) supports, off on a CPU, where compiling takes longer than the small runs it would speed up."""
    if flag and device.type == "cpu":   # inductor's C++ build logs "No CUDA runtime is found": true, and moot
        import logging
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
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


def with_eager_fallback(compiled_fn, make_eager_fn, what, device, modules=()):
    """compiled_fn, made safe: if a call raises (a compile error, a Triton or CUDA-graph problem on this
    GPU), one sentence says so, and the same call runs again with make_eager_fn()'s function, from the
    same random state and the same buffers of `modules` (BatchNorm's running statistics, which a compiled
    forward may have updated before a later compiled part failed), then and from then on: the run goes
    on, with the same results, only slower. (The weights, the optimiser and MoCo's key encoder and queue
    are updated only after the compiled parts return, so the call can be repeated.)"""
    current = [compiled_fn]
    buffers = [b for m in modules for b in m.buffers()]
    saved = [b.clone() for b in buffers]

    def call(*args, **kwargs):
        if current[0] is compiled_fn:
            rng = torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
            if buffers:
                torch._foreach_copy_(saved, buffers)        # one multi-tensor copy a step
            try:
                return compiled_fn(*args, **kwargs)
            except (torch.cuda.OutOfMemoryError, KeyboardInterrupt, SystemExit):
                raise                       # not a compile problem: a smaller batch, or a stop
            except Exception as e:
                first_line = (str(e).strip().splitlines() or [""])[0][:200]
                print(f"note: the compiled {what} failed ({type(e).__name__}: {first_line}); going on without "
                      f"compiling, with the same results, slower (--no-compile skips the attempt)", flush=True)
                current[0] = make_eager_fn()
                torch.set_rng_state(rng[0])
                if rng[1] is not None:
                    torch.cuda.set_rng_state(rng[1], device)
                if buffers:
                    torch._foreach_copy_(buffers, saved)
        return current[0](*args, **kwargs)
    return call


# ------------------------------------------------------------------------------------------------
# Several processes (torchrun), one per GPU. The promise: an N-process run computes the one-process run.
#   - --batch-size is the whole (global) batch B; process r takes its rows r*B/N .. (r+1)*B/N - 1
#     (this_process);
#   - every process draws the whole batch's random numbers from the same seeded stream and keeps its own
#     rows (own_rows): the draws are the one process's, and the streams stay equal in every process;
#   - what a loss needs of the whole batch (NT-Xent's negatives, MoCo's keys, NNCLR's neighbours) is
#     gathered (gather), BatchNorm normalises over the whole batch (sync_batchnorm), and the gradients
#     are averaged before each update (average_gradients), so the weights stay equal everywhere;
#   - rank 0 alone prints, locks and writes; a stop is agreed (StopFlag.agreed), so all stop together.
# With one process each function returns its input or does nothing: no torch.distributed at all.
# ------------------------------------------------------------------------------------------------

_STARTED = False       # the process group exists: torchrun, once every check has passed
_HOST_GROUP = None     # gloo: the host-side stop vote and barriers, which must not wait for the GPUs


def start_processes(device_name, preset=None):
    """This process's device, called once every check of the flags and inputs has passed (so a mistake
    is found before any process group starts): pick_device for a plain run; under torchrun, GPU
    LOCAL_RANK (or the CPU with --device cpu) and the process group, NCCL between GPUs and gloo on CPUs.
    Its collectives give up after 30 minutes: a hang detector, longer than anything rank 0 does alone
    while the others wait (a save, the kNN check)."""
    global _STARTED, _HOST_GROUP
    device = pick_device(device_name, preset)
    if WORLD_SIZE == 1:
        return device
    import datetime
    import torch.distributed as dist
    if device.type == "cuda":
        if device_name not in (None, "cuda"):
            fail(f"--device {device_name}: under torchrun each process takes the GPU of its LOCAL_RANK; leave "
                 f"out --device, and choose the GPUs with CUDA_VISIBLE_DEVICES")
        here, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", WORLD_SIZE)), torch.cuda.device_count()
        if here > gpus:
            fail(f"torchrun started {here} processes on this machine, which has {gpus} GPU{'s' * (gpus != 1)}: "
                 f"pass --nproc-per-node {gpus} (or fewer)")
        device = torch.device("cuda", LOCAL_RANK)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=30),
                            **({"device_id": device} if device.type == "cuda" else {}))
    _HOST_GROUP = dist.new_group(backend="gloo") if device.type == "cuda" else dist.group.WORLD
    _STARTED = True
    print(f"{WORLD_SIZE} processes ({dist.get_backend()}), each on {device.type}"
          f"{' (GPU = LOCAL_RANK)' if device.type == 'cuda' else ''}; --batch-size is the whole batch", flush=True)
    return device


def end_processes():
    """After a run that ended well: the process group is closed (after a failure, exiting is enough)."""
    global _STARTED
    if _STARTED:
        torch.distributed.destroy_process_group()
        _STARTED = False


def require_divisible(B, flag="--batch-size"):
    """Under torchrun the batch of B is cut into N equal slices: refused, before any work, unless N divides B."""
    if B % WORLD_SIZE:
        lower, upper = B // WORLD_SIZE * WORLD_SIZE, -(-B // WORLD_SIZE) * WORLD_SIZE
        fail(f"{flag} {B} does not split into {WORLD_SIZE} equal parts, one per process; pass {flag} "
             f"{upper}" + (f" or {lower}" if lower else ""))


def this_process(B):
    """The slice of a whole batch of B rows that this process takes."""
    n = B // WORLD_SIZE
    return slice(RANK * n, (RANK + 1) * n)


def own_rows(draws, views=1):
    """This process's rows of the random draws made for the whole batch: a tensor (or a dict of them) of
    `views` blocks of B rows (view 1 of every image, then view 2, ...), of which it keeps its slice of each."""
    if WORLD_SIZE == 1:
        return draws
    mine = lambda t: t.unflatten(0, (views, -1))[:, this_process(t.shape[0] // views)].flatten(0, 1)
    return {k: mine(v) for k, v in draws.items()} if isinstance(draws, dict) else mine(draws)


class _Gather(torch.autograd.Function):
    """all_gather with a backward. Every process computes the whole batch's loss from the gathered rows,
    so the gradient of its own rows comes from every process's copy of the loss: the backward sums the
    gradients of all processes (all_reduce) and keeps this process's rows. (A gather that keeps only its
    own process's gradient, lightly's bug until 2024, leaves out the others' copies: test_distributed.py's
    gradient test fails on it.) The N copies add N times the gradient; average_gradients divides by N."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(WORLD_SIZE)]
        torch.distributed.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        torch.distributed.all_reduce(grad)                  # the sum over every process's copy of the loss
        return grad[this_process(grad.shape[0])]


def gather(x):
    """The whole batch's rows [B, ...] from every process's slice [B / N, ...], in rank order, which is the
    batch's own order (this_process); with gradient. One process (or None): x itself."""
    return x if not _STARTED or x is None else _Gather.apply(x)


class _SumOverProcesses(torch.autograd.Function):
    """all_reduce (sum) with its backward, which is the same sum of the gradients of every process."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        torch.distributed.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        return _SumOverProcesses.apply(grad)


class WholeBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the whole batch, summed over the processes: what
    torch.nn.SyncBatchNorm computes, for any device (SyncBatchNorm runs on GPUs only; this one serves the
    CPU, gloo and the tests). Per channel: mean = sum(x) / n, then var = sum((x - mean)^2) / n over every
    process's rows, n of them in all; the running statistics are updated with them as BatchNorm does."""

    def _check_input_dim(self, x):
        pass

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        dims, shape = [0] + list(range(2, x.dim())), [1, -1] + [1] * (x.dim() - 2)
        n = x.numel() // x.shape[1] * WORLD_SIZE
        mean = _SumOverProcesses.apply(x.sum(dims)) / n
        x = x - mean.view(shape)            # two passes, as BatchNorm's own kernels: sum(x^2)/n - mean^2
        var = _SumOverProcesses.apply(x.pow(2).sum(dims)) / n   # loses float32's digits (1 % gradient errors)
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * n / (n - 1), self.momentum)     # unbiased, as BatchNorm keeps it
        return x * torch.rsqrt(var.view(shape) + self.eps) * self.weight.view(shape) + self.bias.view(shape)


def sync_batchnorm(module):
    """Under torchrun, every BatchNorm of module made to normalise over the whole batch, as one process
    normalises: torch.nn.SyncBatchNorm on GPUs, WholeBatchNorm on a CPU. The weights and statistics are
    kept, and so are the names in state_dict: a checkpoint does not depend on the number of processes."""
    if not _STARTED:
        return module
    if next(module.parameters()).is_cuda:
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for parent in list(module.modules()):
        for name, child in parent.named_children():
            if isinstance(child, torch.nn.modules.batchnorm._BatchNorm):
                new = WholeBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                     child.track_running_stats).to(child.weight.device, child.weight.dtype)
                new.load_state_dict(child.state_dict())
                setattr(parent, name, new)
    return module


def average_gradients(params):
    """Under torchrun: every parameter's gradient (params: any iterable, only read here) replaced by its mean over the processes, in one
    all_reduce of all of them flattened together (a collective per tensor would cost a launch each)."""
    if not _STARTED:
        return
    grads = [w.grad for w in params if w.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= WORLD_SIZE
    torch._foreach_copy_(grads, [f.view_as(g) for f, g in zip(flat.split([g.numel() for g in grads]), grads)])


def mean_over_processes(x):
    """The mean of a (detached) tensor over the processes: a loss as the whole batch's, for the progress lines."""
    if not _STARTED:
        return x
    x = x.detach().clone()
    torch.distributed.all_reduce(x)
    return x / WORLD_SIZE


def any_process(flag):
    """True in every process when flag is True in any: a host-side vote (gloo), which waits for no GPU."""
    if not _STARTED:
        return flag
    t = torch.tensor([int(flag)])
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=_HOST_GROUP)
    return bool(t.item())


def from_main(obj):
    """Rank 0's value of a Python object, in every process (what it found on disk, say); one process: obj."""
    if not _STARTED:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0, group=_HOST_GROUP)
    return box[0]


def barrier():
    """Every process waits here until all have come (rank 0's file is written before the others read it)."""
    if _STARTED:
        torch.distributed.barrier(group=_HOST_GROUP)


# ------------------------------------------------------------------------------------------------
# Data: the whole data set as one uint8 tensor [N, 3, H, W] (150 MB for CIFAR-10). Every stage loads it
# the same way, so "image i" means the same picture in all four scripts, and labels come from the
# class names of the training split, the same numbers in train/ and test/.
#   Three splits: "pretrain", the images stages 1 to 3 learn from without labels; "train", the labelled
# images stage 4's probe is fitted on (and the kNN votes come from); "test". On CIFAR and image folders
# "pretrain" is "train"; on STL-10 it is the 100,000-image unlabeled split, whose labels are all -1
# (none), and "train" is its 5,000 labelled images.
# ------------------------------------------------------------------------------------------------

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".gif", ".tif", ".tiff")


def load_dataset(name, data_dir, split, image_size=32):
    """Returns (x uint8 [N, 3, S, S], y int64 [N], class_names) for split 'pretrain', 'train' or 'test'
    (above). y is -1 for every image of a split without labels (STL-10's unlabeled one)."""
    same = "train" if split == "pretrain" else split   # CIFAR and folders: pretrain is the training split
    if name in ("cifar10", "cifar100"):
        x, y, classes = _load_cifar(name, data_dir, same)
        if image_size != 32:
            x = _resize(x, image_size)
    elif name == "stl10":
        x, y, classes = _load_stl10(data_dir, split, image_size)
    elif name == "folder":
        x, y, classes = _load_folder(data_dir, same, image_size)
    else:
        fail(f"unknown --dataset {name!r}; choose cifar10, cifar100, stl10 or folder (with --data-dir DIR)")
    if split in ("pretrain", "train") and len(classes) < 2:
        print(f"warning: {data_dir} has a single class, so every accuracy this pipeline reports is 100 % "
              f"and means nothing; give it two or more class folders", flush=True)
    return x, y, classes


def has_own_pretrain_split(name):
    """True when stages 1 to 3 learn from other images than stage 4's labelled training split (STL-10)."""
    return name == "stl10"


def _resize(x, size):
    """uint8 images [N, 3, H, W] -> [N, 3, size, size], bilinear with antialiasing (as torchvision's Resize
    of a PIL image filters), a chunk at a time: 100,000 STL-10 images as floats at once would be 11 GB."""
    out = torch.empty(x.shape[0], 3, size, size, dtype=torch.uint8)
    for i in range(0, x.shape[0], 4096):
        out[i:i + 4096] = F.interpolate(x[i:i + 4096].float(), size=size, mode="bilinear", antialias=True,
                                        align_corners=False).round().clamp(0, 255).to(torch.uint8)
    return out


def _load_cifar(name, data_dir, split):
    import torchvision  # imported here: only this branch needs it
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    made = _outermost_new_folder(data_dir)
    try:
        ds = cls(root=data_dir, train=(split == "train"), download=True)
    except Exception as e:  # no network, a half-downloaded archive, a read-only directory...
        _download_failed(name, data_dir, made, e)
    x = torch.from_numpy(np.asarray(ds.data)).permute(0, 3, 1, 2).contiguous()   # NHWC -> NCHW
    return x, torch.tensor(ds.targets, dtype=torch.int64), list(ds.classes)


def _outermost_new_folder(data_dir):
    """The outermost folder a download into data_dir would create (None: data_dir exists already)."""
    made = os.path.abspath(data_dir)
    while not os.path.exists(os.path.dirname(made)):
        made = os.path.dirname(made)
    return None if os.path.exists(made) else made


def _download_failed(name, data_dir, made, e):
    if made:             # a failed download leaves no folder behind, nor the parents it made
        shutil.rmtree(made, ignore_errors=True)
    fail(f"could not find or download {name} under {data_dir!r} ({type(e).__name__}: {e}); "
         f"download it on a machine with internet into that directory, or point at an image "
         f"folder with --dataset folder --data-dir DIR (DIR/train/<class>/*, DIR/test/<class>/*)")


# STL-10 (Coates et al. 2011) as torchvision downloads it: DIR/stl10_binary/ holds unlabeled_X.bin (100,000
# images), train_X.bin + train_y.bin (5,000, 500 per class), test_X.bin + test_y.bin (8,000) and
# class_names.txt. An X file is raw uint8, 3 x 96 x 96 bytes an image, each colour channel stored column
# by column (hence the transpose below); a y file is one byte an image, the class 1..10.
STL10_FILES = {"pretrain": ("unlabeled_X.bin", None), "train": ("train_X.bin", "train_y.bin"),
               "test": ("test_X.bin", "test_y.bin")}
STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]


def _load_stl10(data_dir, split, image_size):
    """One STL-10 split, read from its binary files here. torchvision's STL10 checks the md5 sum of all
    2.6 GB each time one is made (tens of seconds, in every stage); it is used only to download and check
    the archive, once, when the files are not there yet. The images are read in chunks straight from the
    file (a memory map), so the 100,000 unlabeled ones never need 2.8 GB at 96 px beside their 1.2 GB at
    64 px, and resized to image_size (the authors: Resize(64) of each PIL image)."""
    folder = os.path.join(data_dir, "stl10_binary")
    x_name, y_name = STL10_FILES[split]
    if not all(os.path.exists(os.path.join(folder, f)) for f in (x_name, y_name) if f):
        import torchvision  # only to download: 2.6 GB, checked against torchvision's md5 sums
        made = _outermost_new_folder(data_dir)
        try:
            torchvision.datasets.STL10(root=data_dir, split="test", download=True)
        except Exception as e:
            _download_failed("stl10", data_dir, made, e)
    path, per_image = os.path.join(folder, x_name), 3 * 96 * 96
    size = os.path.getsize(path)
    if size == 0 or size % per_image:
        fail(f"{path} holds {size} bytes, not a whole number of 96x96 colour images ({per_image} bytes each): "
             f"it is damaged or cut short; delete {folder} and run again to download STL-10 anew")
    raw = np.memmap(path, dtype=np.uint8, mode="r").reshape(-1, 3, 96, 96)
    n = raw.shape[0]
    if y_name is None:
        y = torch.full((n,), -1, dtype=torch.int64)       # the unlabeled split: no labels
    else:
        labels = np.fromfile(os.path.join(folder, y_name), dtype=np.uint8).astype(np.int64)
        if labels.shape[0] != n or labels.min() < 1 or labels.max() > 10:
            fail(f"{os.path.join(folder, y_name)} does not hold one label in 1..10 for each of the {n} images of "
                 f"{path}; delete {folder} and run again to download STL-10 anew")
        y = torch.from_numpy(labels - 1)                  # stored 1..10, returned 0..9
    names = os.path.join(folder, "class_names.txt")
    classes = open(names).read().split() if os.path.exists(names) else STL10_CLASSES
    x = torch.empty(n, 3, image_size, image_size, dtype=torch.uint8)
    for i in range(0, n, 4096):
        chunk = torch.from_numpy(np.ascontiguousarray(raw[i:i + 4096].transpose(0, 1, 3, 2)))   # columns -> rows
        x[i:i + 4096] = chunk if image_size == 96 else _resize(chunk, image_size)
    return x, y, classes


def _load_folder(data_dir, split, image_size):
    """An image-folder tree DIR/<split>/<class>/*.png, decoded once with PIL and cached in
    DIR/.clsp_cache_<split>_<size>px.pt (one file per split and size, rebuilt when any file's content changes)."""
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
    # The cache is keyed by a hash of every file's bytes (reading them is far cheaper than decoding), their
    # names and labels, the classes and the size: it never stands in for data that changed, not even for a
    # folder replaced by another with the same names, sizes and times (as `tar x` or `rsync -a` can give).
    def file_hash(path):
        with open(path, "rb") as f:
            return hashlib.blake2b(f.read(), digest_size=16).hexdigest()
    with ThreadPoolExecutor(8) as pool:
        hashes = list(pool.map(file_hash, [p for p, _ in files]))
    key = hashlib.sha1(json.dumps([[os.path.relpath(p, data_dir), i, h] for (p, i), h in zip(files, hashes)]
                                  + [image_size, classes]).encode()).hexdigest()
    cache = os.path.join(data_dir, f".clsp_cache_{split}_{image_size}px.pt")
    for c in glob.glob(os.path.join(glob.escape(data_dir), ".clsp_cache_*px.pt.tmp*")):
        remove_stale_temps(c.rsplit(".tmp", 1)[0])   # a cache save, of any split and size, that a kill cut short
    try:
        c = torch.load(cache, weights_only=True)
        if c["key"] == key:
            return c["x"], c["y"], c["classes"]
    except Exception:
        pass  # no cache yet, or a damaged one: (re)built below

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
    except (OSError, RuntimeError):
        pass  # a read-only or full data directory: no cache, just slower next time
    return x, y, classes


def remove_stale_temps(path):
    """Remove <path>.tmp<pid> files whose process has ended: saves a kill cut short. A live process's
    file is left alone: two runs may build the same data cache at once."""
    for tmp in glob.glob(glob.escape(path) + ".tmp*"):
        pid = tmp.rsplit(".tmp", 1)[1]
        if pid.isdigit() and os.name != "nt":  # (on Windows, os.kill would end the process, not test it)
            try:
                os.kill(int(pid), 0)           # signal 0: only asks whether the process exists
            except ProcessLookupError:
                with contextlib.suppress(OSError):
                    os.remove(tmp)
            except PermissionError:
                pass                           # another user's live process


def data_info(name, x, y, classes):
    """What every artifact records about the data it was made from, so the next stage can check it. The
    fingerprint (a hash of every pixel and label) tells two folders with the same counts apart."""
    h = hashlib.blake2b(x.contiguous().numpy(), digest_size=8)   # read in place: no copy of 1.2 GB (STL-10)
    h.update(y.numpy().tobytes())               # STL-10's unlabeled split: all -1, so its pixels alone decide
    return dict(dataset=name, image_size=int(x.shape[-1]), num_classes=len(classes),
                num_train=int(x.shape[0]), fingerprint=h.hexdigest())


def describe_data(info):
    """'cifar10 (50000 images, 10 classes, 32px, fingerprint 1a2b...)' for messages."""
    return (f"{info.get('dataset')} ({info.get('num_train')} images, {info.get('num_classes')} classes, "
            f"{info.get('image_size')}px, fingerprint {info.get('fingerprint', 'none')})")


def require_same_data(info, recorded, made, remedy):
    """Stop unless the data found now is the data an artifact was made from: `made` says which artifact
    ("runs/ddpm.pt was trained on"), `remedy` what to do."""
    if info != recorded:
        fail(f"{made} {describe_data(recorded)}, but the training data found now is {describe_data(info)}; {remedy}")


class EpochOrder:
    """order.batch(step) -> the indices of that step's batch of B images. Each epoch is a new shuffle of
    the N images from its own seeded generator, so a resumed run sees the same order, cut into N // B
    full batches (a last partial batch is dropped, like drop_last=True). The shuffle is made on the CPU
    and moved to the device once per epoch: a copy per step would stall the GPU."""

    def __init__(self, N, B, seed, device):
        self.N, self.B, self.seed, self.device = N, B, seed, device
        self.steps_per_epoch = N // B
        self.epoch = self.perm = None

    def batch(self, step):
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self.epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self.perm, self.epoch = torch.randperm(self.N, generator=g).to(self.device), epoch
        return self.perm[i * self.B:(i + 1) * self.B]


# ------------------------------------------------------------------------------------------------
# Artifacts: plain dicts of tensors and Python values, so torch.load(..., weights_only=True) reads them;
# written to a temporary file and renamed, so an interruption never leaves half a file.
# ------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def claim_output(*paths):
    """`with claim_output(out, picture):` the body runs only if every path can be written and no other
    run is writing any of them. Checked before any work, so a wrong --out fails in a second, not after an
    epoch. Each lock is a file beside its path held with flock, which the OS releases when the process
    ends, even on kill -9, so a crashed run never leaves it stuck. Temporary files that an interrupted
    save of these paths left behind are removed."""
    locks = []
    try:
        # each path once (the same picture named twice is one file); under torchrun rank 0 writes, and locks
        for p in dict.fromkeys(paths) if MAIN else ():
            locks.append((p, lock_file(p)))
            for tmp in glob.glob(glob.escape(p) + ".tmp*"):
                os.remove(tmp)              # ours: the lock says no other run writes this path
        yield
    finally:
        for p, lock in locks:
            with contextlib.suppress(OSError):
                os.remove(p + ".lock")      # tidy; a run that opened it just before locks anew (below)
            lock.close()


def lock_file(path):
    """The open lock file of `path` (<path>.lock), locked by this process, or one sentence saying why not."""
    lock_path = path + ".lock"
    for _ in range(100):
        try:
            os.makedirs(os.path.dirname(os.path.abspath(lock_path)), exist_ok=True)
            lock = open(lock_path, "a")
        except OSError as e:
            folder = os.path.dirname(os.path.abspath(lock_path))
            while not os.path.exists(folder):
                folder = os.path.dirname(folder)
            if not os.path.isdir(folder):   # makedirs says "File exists" or "Not a directory"
                fail(f"cannot write {path}: {folder} is a file, not a folder; pass an --out in a folder")
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
            fail(f"another run is writing {path} right now; wait for it to end, or write elsewhere (another --out, "
                 f"or another path for that picture)")
        # The run before us removes the file when it ends; if it did so between our open and our lock,
        # we hold a lock on a file nobody else sees: then lock the file that is there now instead.
        with contextlib.suppress(OSError):
            if os.stat(lock_path).st_ino == os.fstat(lock.fileno()).st_ino:
                return lock
        lock.close()
    fail(f"could not lock {lock_path}; another program keeps replacing it")


def beside(path, suffix):
    """runs/ddpm.pt, '_samples.png' -> runs/ddpm_samples.png: pictures go beside their artifact and are
    named after it. Only a .pt artifact has pictures: `runs/ddpm` or `runs/ddpm.ckpt` would both name
    runs/ddpm_samples.png, the picture of runs/ddpm.pt."""
    if not path.endswith(".pt"):
        fail(f"--out {path} must end in .pt (its pictures are named after it: runs/a.pt -> runs/a{suffix})")
    return path[:-len(".pt")] + suffix


def atomic_write(path, write):
    """write(tmp) to a temporary file, then rename it to `path`: readers see the old file or the new
    one, never half of one. A full disk (or any failed write) is one sentence; the old file is intact."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)   # atomic on POSIX and Windows
    except (OSError, RuntimeError) as e:   # torch.save raises RuntimeError when the disk fills up
        free = shutil.disk_usage(folder).free / 1e6
        reason = (e.strerror or str(e))[:120] if isinstance(e, OSError) else "the write stopped part-way"
        fail(f"could not write {path} ({reason}); {free:,.0f} MB are free on its disk, so it may be full: "
             f"free some space and run the same command again (--resume where the script has it); the "
             f"previous {path}, if there was one, is intact")
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_save(obj, path):
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_artifact(path, keys, what, remedy, mmap=False):
    """Load an artifact, or stop with a sentence that says how to make it (`remedy`, a command). It must
    be a dict with `keys` (`what` names it in messages), not some other file of the same name. mmap: its
    tensors are read from the file only when used (STL-10's 9.8 GB of candidates, copied once where they go)."""
    if not os.path.exists(path):
        fail(f"{path} does not exist; run {remedy} first (or point the flag at the right file)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        fail(f"{path} is not a readable artifact ({type(e).__name__}); it may be truncated or from "
             f"another program: delete it and run {remedy} again")
    if not isinstance(obj, dict):
        fail(f"{path} is a {type(obj).__name__}, not {what}; point the flag at the right file, or run {remedy}")
    if not set(keys) <= obj.keys():
        fail(f"{path} is not {what} (it lacks {sorted(set(keys) - obj.keys())}); point the flag at the right "
             f"file, or run {remedy}")
    return obj


def require_free_space(path, nbytes):
    """Stop now, not at the first save an epoch later, if the disk of `path` cannot hold a file of about
    nbytes: an atomic save writes the new file in full beside the old one before the rename."""
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    free = shutil.disk_usage(folder).free
    if free < 1.1 * nbytes + 20e6:           # a margin for the file's own overhead and other writers
        fail(f"{path} needs about {nbytes / 1e6:,.0f} MB, but only {free / 1e6:,.0f} MB are free on its disk; "
             f"free some space, or pass an --out on another disk")


def tensor_bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def refuse_to_overwrite(path, how_to_continue):
    """A new run never replaces an existing artifact (hours of work): it says what to do instead. (Under
    torchrun rank 0, the writer, checks and says it; the others end when it does.)"""
    if MAIN and os.path.exists(path):
        fail(f"{path} already exists; {how_to_continue}, write elsewhere with --out, or delete it to start over")


def resume_hint(script, args):
    """For StopFlag: what a second Ctrl-C leaves of a training run writing args.out. A new run refuses an
    existing --out, so the file is there only once this run (or the one it resumes) has saved."""
    def hint():
        if os.path.exists(args.out):
            return (f"the last checkpoint saved is kept in {args.out}: continue with "
                    f"{command(script, args, '--resume', '--out', args.out)}")
        return "no checkpoint was saved yet: run the same command again"
    return hint


def load_for_resume(path, must_have, explicit, free, remedy, defaults):
    """--resume: the checkpoint and its own settings, so the run ends exactly where it would have (a
    setting added to the script after the checkpoint was made takes its default). Only the settings in
    `free` (paths, logging) may be changed by a flag; any other is refused."""
    ckpt = load_artifact(path, (must_have, "settings", "data", "step", "optimizer"), "a checkpoint to resume", remedy)
    settings = {**defaults, **ckpt["settings"]}
    clash = {k: v for k, v in explicit.items() if k not in free and settings.get(k) != v}
    if clash:
        fail(f"--resume continues {path} with its own settings, but you asked for {clash}; "
             f"drop those flags, or start a new run without --resume")
    return ckpt, {**settings, **{k: v for k, v in explicit.items() if k in free}}


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


def part_path(parts, b):
    return os.path.join(parts, f"batch_{b:06d}.pt")


def resume_parts(parts, manifest, n_batches, keep, defaults=None):
    """A long artifact made batch by batch (generate.py's candidates) keeps each finished batch b in
    part_path(parts, b), beside a manifest of what made them (settings, inputs). Each batch an interrupted
    run with the same manifest finished is handed to keep(b, images) as it is read (one batch in memory at
    a time, so the whole set is never held twice); returns their numbers, or an empty set and a new, empty
    parts folder. A parts folder of other settings is refused, so one artifact never mixes two of them; a
    setting added to the script after it was made counts as its value in `defaults`."""
    chunks = set()
    if not os.path.isdir(parts):
        os.makedirs(parts)
        atomic_save(manifest, os.path.join(parts, "manifest.pt"))
        return chunks
    try:
        old = torch.load(os.path.join(parts, "manifest.pt"), weights_only=True)
    except Exception:
        fail(f"{parts} holds an unfinished run but no readable manifest; delete {parts} and run again")
    added = {k: v for k, v in (defaults or {}).items() if k in manifest["settings"] and k not in old["settings"]}
    old = {**old, "settings": {**added, **old["settings"]}}
    if old != manifest:
        diff = {k: (old["settings"].get(k), v) for k, v in manifest["settings"].items()
                if old["settings"].get(k) != v}
        fail(f"{parts} holds an unfinished run made with other settings or inputs "
             f"({diff or 'an input or the data changed'}, as (then, now)); rerun with the old "
             f"settings to finish it, or delete {parts} to start afresh")
    for name in os.listdir(parts):
        if ".tmp" in name:
            os.remove(os.path.join(parts, name))    # a save that a kill cut short
    for b in range(n_batches):
        try:
            images = torch.load(part_path(parts, b), weights_only=True)["images"]
        except Exception:
            continue                        # not written yet (or unreadable): it is simply made again
        keep(b, images)
        chunks.add(b)
    print(f"resuming: {len(chunks)}/{n_batches} batches already done in {parts}", flush=True)
    return chunks


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


# ------------------------------------------------------------------------------------------------
# Progress lines and model FLOPs utilisation (MFU = achieved FLOP/s / the GPU's dense bf16 peak; for
# V100 and T4, which have no bf16 tensor cores, the fp16 peak that --precision auto uses there)
# ------------------------------------------------------------------------------------------------

PEAK_BF16_TFLOPS = {"H100": 989, "H100 PCIe": 756, "H100 NVL": 835, "H800": 989, "H200": 989,
                    "H200 NVL": 835, "GH200": 989, "A100": 312, "A800": 312, "L40S": 362, "L40": 181,
                    "L4": 121, "A10": 125, "RTX 4090": 165, "RTX 3090": 71, "V100": 125, "T4": 65}


def peak_flops(device):
    """The GPU's dense bf16 tensor-core peak in FLOP/s, or None when unknown (then no MFU is shown); under
    torchrun, the N GPUs' together, as the speed shown is the whole batch's."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in sorted(PEAK_BF16_TFLOPS.items(), key=lambda kv: -len(kv[0])):
        if key in name:
            return tflops * 1e12 * WORLD_SIZE
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
    """Prints `step 1200/60000 | loss 0.0310 | 5230 img/s | MFU 41.0% | 2m10s elapsed, 14m05s left`.

    A training loop hands it its losses each step (`add(loss=...)`, summed on the device: no host sync)
    and asks for a line now and then (`line`): the mean of each loss since the last line, checked to be
    finite, as a run must not save a diverged model. Speed and time left are measured from `warmed_up()`
    on, so a first step that compiles (a minute) does not distort them; the elapsed time includes it.
    Work that prints nothing for long is named (`with progress.doing("the kNN check"):`; a first step
    that compiles, warming=True, is "compiling" until `warmed_up`): while it lasts, a line every
    `heartbeat` seconds says how long so far, so a run is never silent for long."""

    def __init__(self, total, done=0, unit="step", images_per_unit=1, flops_per_unit=None, peak=None,
                 warming=False, on_nan="start a new run with a lower --lr", heartbeat=15):
        self.total, self.start_done, self.unit = total, done, unit
        self.images_per_unit, self.flops_per_unit, self.peak = images_per_unit, flops_per_unit, peak
        self.t_start = self.t0 = self.last = time.perf_counter()
        self.warmup = "compiling" if warming else None     # until warmed_up(): no speed, no time left
        self.activity = ("compiling", self.t_start) if warming else None   # (what, since when) or None
        self.on_nan = on_nan                               # what to do when a loss is not finite
        self.names, self.sums, self.n = (), None, 0
        self.quiet = not MAIN                              # under torchrun, rank 0 alone keeps the account
        # A thread of its own: the main thread is inside the compiler (minutes on a CPU) or the kNN check.
        if not self.quiet:
            threading.Thread(target=_heartbeat, args=(weakref.ref(self), heartbeat), daemon=True).start()

    def warmed_up(self, done, what="warm-up"):
        now = time.perf_counter()
        self.warmup = f"{what} {now - self.t_start:.0f}s"
        self.t0, self.start_done = now, done
        self.activity = None

    @contextlib.contextmanager
    def doing(self, what):
        """`with progress.doing("the kNN check"):` heartbeat lines while the block runs."""
        before, self.activity = self.activity, (what, time.perf_counter())
        try:
            yield
        finally:
            self.activity = before

    def due(self, seconds=30):
        """True when no line was printed for `seconds` (the first one after 5 s): a slow run is never
        silent for long, whatever its --log-every."""
        return not self.quiet and time.perf_counter() - self.last > (5 if self.last == self.t_start else seconds)

    def add(self, **losses):
        """This step's losses, 0-d tensors by name (L_simclr=..., L_clsp=...), summed on the device."""
        if self.quiet:
            return
        values = torch.stack([v.detach().float() for v in losses.values()])
        self.sums = values if self.sums is None else self.sums + values
        self.names, self.n = tuple(losses), self.n + 1

    def line(self, done, **metrics):
        """Print a line; with losses added since the last one, their means first (one host sync), and
        stop the run, before anything is saved, if one is not finite. (Rank 0's losses are the whole
        batch's: the other processes, which hold the same numbers, neither sync nor print.)"""
        if self.quiet:
            return
        if self.n:
            means = dict(zip(self.names, (self.sums / self.n).tolist()))
            if not all(map(math.isfinite, means.values())):
                fail(f"the loss became {means} at {self.unit} {done:g}; {self.on_nan}")
            metrics = {**means, **metrics}
            self.sums, self.n = None, 0
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


def _heartbeat(progress_ref, every, give_up=3600):
    """`  ... still compiling, 1m15s so far` when `every` seconds passed without a line while the Progress
    names an activity; ends with the run (only a weak reference to its Progress is kept). An activity
    over an hour old is not reported (a failed run whose traceback is kept, in a notebook say, keeps its
    Progress alive: it must not talk forever)."""
    while True:
        time.sleep(min(every, 1.0))
        progress = progress_ref()
        if progress is None:
            return
        activity, now = progress.activity, time.perf_counter()
        if activity and now - progress.last >= every and now - activity[1] < give_up:
            print(f"  ... still {activity[0]}, {fmt_time(now - activity[1])} so far", flush=True)
            progress.last = now
        del progress


# ------------------------------------------------------------------------------------------------
# Ctrl-C and SIGTERM: stop at a step boundary, where a checkpoint resumes exactly
# ------------------------------------------------------------------------------------------------

class StopFlag:
    """`with StopFlag() as stop:` Ctrl-C (or SIGTERM) inside the block asks the loop to stop at the end
    of the current step instead of killing it mid-update (the loop reads stop.requested): a checkpoint
    written then is consistent, so --resume continues exactly. A second Ctrl-C quits at once. After the
    block, the handlers from before it are back (run_main's: one sentence, at once). quit_hint() says, in
    that second Ctrl-C's sentence, what is kept and how to go on (it depends on what was saved by then)."""

    def __init__(self, quit_hint=None):
        self.requested, self.quit_hint = False, quit_hint
        self.before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        for sig in self.before:
            signal.signal(sig, self._handler)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    def agreed(self):
        """At a step boundary: has a stop been asked for, here or (under torchrun) in any process? Each
        process gets its own signal and may be a step ahead of another, so they vote: all stop together."""
        self.requested = any_process(self.requested)
        return self.requested

    def release(self):
        for sig, handler in self.before.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)   # None: not set from Python

    def _handler(self, signum, frame):
        if self.requested:
            if self.quit_hint:
                fail(f"stopped at once by Ctrl-C; {self.quit_hint()}")
            raise KeyboardInterrupt
        self.requested = True
        if MAIN:
            print("\nstopping at the end of this step (Ctrl-C again to quit at once)...", file=sys.stderr, flush=True)
