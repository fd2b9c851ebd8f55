"""The CUDA paths (bf16 and fp16 autocast, channels_last, CUDA generators and RNG state, torch.compile),
run only where a GPU is present: CI has none, so these are skipped there; run
`python -m pytest tests/test_cuda.py` on a GPU machine."""

import json

import pytest
import torch

from conftest import run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("extra_flags", [[], ["--compile"], ["--precision", "fp16"]],
                         ids=["eager", "compile", "fp16"])   # fp16 + GradScaler: what a T4 or V100 runs
def test_tiny_chain_on_the_gpu(tmp_path, tiny_data, extra_flags):
    flags = ["--preset", "tiny", "--dataset", "folder", "--data-dir", tiny_data, "--device", "cuda"]
    for script in ("ddpm.py", "generate.py", "clsp.py", "evaluate.py"):
        extra = [] if script == "evaluate.py" and "--compile" in extra_flags else extra_flags
        run(script, *flags, *extra, cwd=tmp_path, gpu=True)
    result = json.load(open(tmp_path / "runs" / "eval.json"))
    assert result["device"].startswith("cuda") and 0 <= result["knn_top1"] <= 100
    ckpt = torch.load(tmp_path / "runs" / "clsp.pt", weights_only=True)
    assert "rng_cuda" in ckpt and ckpt["finished"]


def test_resume_on_the_gpu(tmp_path, tiny_data):
    flags = ["--preset", "tiny", "--dataset", "folder", "--data-dir", tiny_data, "--device", "cuda", "--lam", "0"]
    run("clsp.py", *flags, "--epochs", "3", "--stop-after-epoch", "1", cwd=tmp_path, gpu=True, check=False)
    run("clsp.py", "--resume", "--device", "cuda", cwd=tmp_path, gpu=True)
    assert torch.load(tmp_path / "runs" / "clsp.pt", weights_only=True)["epoch"] == 3


def test_compiled_train_step_through_cuda_graphs_matches_eager():
    """ddpm.make_train_step as ddpm.py runs it on a GPU: inductor, mode "reduce-overhead" (CUDA graphs:
    step 1 warms up, 2 records, 3 and on replay). From the same weights and draws (dropout 0), the first
    step's loss is eager's within bf16 tolerance, and every later step stays finite and trains."""
    import ddpm

    def steps(compiled, n):
        torch.manual_seed(0)
        unet = ddpm.UNet(ch=64, dropout=0.0).cuda()
        ema = ddpm.UNet(ch=64, dropout=0.0).cuda().requires_grad_(False)
        ema.load_state_dict(unet.state_dict())
        opt = torch.optim.Adam(unet.parameters(), lr=2e-4, fused=True)
        scaler = torch.amp.GradScaler("cuda", enabled=False)
        step = ddpm.make_train_step(unet, ema, opt, scaler, ddpm.make_schedule().cuda(),
                                    dict(lr=2e-4, warmup=0, grad_clip=1.0, ema_decay=0.999), torch.bfloat16, compiled)
        x = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8, device="cuda")
        torch.manual_seed(1)
        return [step(x, i).item() for i in range(n)]

    eager, compiled = steps(False, 1), steps(True, 6)
    assert abs(compiled[0] - eager[0]) < 0.02 * eager[0], (compiled[0], eager[0])
    assert all(torch.isfinite(torch.tensor(compiled))) and compiled[-1] < compiled[0]


def test_moco_and_the_control_on_the_gpu(tmp_path, tiny_data):
    """CLSP-MoCo compiled (two compiled encoders, the queues on the GPU) and SimCLR-aug, then evaluated."""
    flags = ["--preset", "tiny", "--dataset", "folder", "--data-dir", tiny_data, "--device", "cuda"]
    for script in ("ddpm.py", "generate.py"):
        run(script, *flags, cwd=tmp_path, gpu=True)
    run("clsp.py", *flags, "--base", "moco", "--compile", "--out", "runs/clsp_moco.pt", cwd=tmp_path, gpu=True)
    run("clsp.py", *flags, "--positive", "view", "--out", "runs/clsp_aug.pt", cwd=tmp_path, gpu=True)
    for name in ("clsp_moco", "clsp_aug"):
        run("evaluate.py", *flags, "--checkpoint", f"runs/{name}.pt", "--out", f"runs/eval_{name}.json",
            cwd=tmp_path, gpu=True)
        assert json.load(open(tmp_path / "runs" / f"eval_{name}.json"))["method"] in ("CLSP-MoCo", "SimCLR-aug")
    ckpt = torch.load(tmp_path / "runs" / "clsp_moco.pt", weights_only=True)
    assert ckpt["finished"] and ckpt["queue"].shape == (2, 64, 256) and "rng_cuda" in ckpt
