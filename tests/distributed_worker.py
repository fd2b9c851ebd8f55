"""What tests/test_distributed.py runs, as one process (`python distributed_worker.py ...`) or as several
(`torchrun --nproc-per-node 2 distributed_worker.py ...`), so the two can be compared.

    steps OUT BASE LAM POSITIVE   four training steps of clsp.py's step for that base, the networks in
                                  float64 (the tiny ResNet's BatchNorms amplify float32 rounding within
                                  a few steps; so the N-process run must be the one-process run to 1e-10;
                                  the steps cast the embeddings to float32 for the losses, as they do),
                                  through clsp.train, so the loop's slicing is the one tested; rank 0
                                  saves the losses of every step and the final weights in OUT
    gather OUT NAIVE              the gradient of NT-Xent over the gathered embeddings of a fixed batch
                                  (NAIVE=1: with a gather whose backward keeps only this process's own
                                  gradient, lightly's old bug); every rank saves OUT.<rank>
    raise ARGS...                 clsp.py's main with ARGS, where rank 1's second training step raises
"""

import copy
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import common  # noqa: E402  (first: RANK, WORLD_SIZE from torchrun's environment)
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import clsp  # noqa: E402


def steps(out, base, lam, positive):
    device = common.start_processes("cpu")
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x_train = torch.randint(0, 256, (16, 3, 16, 16), dtype=torch.uint8, generator=g)
    synthetic = torch.randint(0, 256, (16, 2, 3, 16, 16), dtype=torch.uint8, generator=g)
    s = {**clsp.DEFAULTS, **clsp.BASES[base], "base": base, "lam": float(lam), "positive": positive,
         "batch_size": 8, "epochs": 2, "warmup_epochs": 1, "queue": 16, "lr": 2.0}
    head = clsp.make_nnclr_projector() if base == "nnclr" else clsp.make_head()
    net = common.sync_batchnorm(nn.Sequential(clsp.make_backbone(), head).double())
    mean, std = torch.tensor([0.5] * 3, dtype=torch.float64), torch.tensor([0.25] * 3, dtype=torch.float64)
    augment = clsp.apply_augment
    clsp.apply_augment = lambda *a: augment(*a).double()     # the views in float64 (read when a step is made)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    if base == "simclr":
        opt = torch.optim.SGD(net.parameters(), lr=0.0, momentum=0.9, weight_decay=1e-4)
        extra = queue = None
        train_step = clsp.make_train_step(net, opt, scaler, s, mean, std, 2)
    elif base == "moco":
        extra, queue = copy.deepcopy(net).requires_grad_(False), clsp.Queue(2, 16, 256, device)
        opt = torch.optim.SGD(net.parameters(), lr=0.0, momentum=0.9, weight_decay=1e-4)
        train_step = clsp.make_moco_step(net, extra, queue, opt, scaler, s, mean, std, 2)
    else:
        extra, queue = common.sync_batchnorm(clsp.make_nnclr_predictor().double()), clsp.Queue(1, 16, 256, device)
        opt = clsp.LARS(clsp.lars_param_groups([net, extra]), weight_decay=s["weight_decay"], eta=s["lars_eta"])
        train_step = clsp.make_nnclr_step(net, extra, queue, opt, scaler, s, mean, std, 2)
    losses = []

    def recorded(*args):
        out_ = train_step(*args)
        losses.append({k: float(v) for k, v in out_.items()})
        return out_

    third = clsp.third_positive(s, x_train, synthetic)
    with common.StopFlag() as stop:
        progress = common.Progress(2, 0, "epoch", 1)
        steps_done = clsp.train(recorded, x_train, third, s, 0, lambda step: None, stop, progress)   # 2 x 2
    state = {f"net.{k}": v for k, v in net.state_dict().items()}
    if extra is not None:
        state.update({f"extra.{k}": v for k, v in extra.state_dict().items()})
        state.update(queue=queue.keys, queue_index=queue.index)
    if common.MAIN:
        torch.save(dict(losses=losses, state=state, steps=steps_done), out)


def gather(out, naive):
    common.start_processes("cpu")
    torch.manual_seed(0)
    z = torch.randn(8, 2, 5, dtype=torch.float64)          # the whole batch: 8 images, 2 views, 5 dims
    mine = z[common.this_process(8)].clone().requires_grad_(True)
    if naive == "1":                                       # backward: only this process's own gradient
        class Naive(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                return common._Gather.forward(ctx, x)

            @staticmethod
            def backward(ctx, grad):
                return grad[common.this_process(grad.shape[0])]
        whole = Naive.apply(mine)
    else:
        whole = common.gather(mine)
    loss = clsp.nt_xent(whole[:, 0], whole[:, 1], 0.2)
    loss.backward()
    # What average_gradients does to a parameter's gradient: the mean over the processes. Here the
    # "parameter" is the embedding itself: the whole batch's gradient is every process's rows, averaged
    # as a parameter's would be (each process's rows scaled by 1 / N, as they enter that mean).
    grads = [torch.zeros_like(z) for _ in range(common.WORLD_SIZE)]
    full = torch.zeros_like(z)
    full[common.this_process(8)] = mine.grad
    if common.WORLD_SIZE > 1:
        torch.distributed.all_gather(grads, full)
        full = sum(grads) / common.WORLD_SIZE
    torch.save(dict(loss=loss.item(), grad=full), f"{out}.{common.RANK}")


def raise_on_rank_1(argv):
    make = clsp.make_train_step

    def failing(*args, **kwargs):
        step_fn = make(*args, **kwargs)

        def train_step(idx, x, x3, step):
            if common.RANK == 1 and step == 1:
                raise RuntimeError("a failure planted on rank 1")
            return step_fn(idx, x, x3, step)
        return train_step
    clsp.make_train_step = failing
    common.run_main(clsp.main, argv, "smaller batch", "nothing saved")


if __name__ == "__main__":
    what, rest = sys.argv[1], sys.argv[2:]
    if what == "steps":
        steps(*rest)
    elif what == "gather":
        gather(*rest)
    else:
        raise_on_rank_1(rest)
    common.end_processes()
