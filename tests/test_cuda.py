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
