"""The CUDA paths (bf16 autocast, channels_last, CUDA generators and RNG state, torch.compile), run only
where a GPU is present: CI has none, so these are skipped there; run `python -m pytest tests/test_cuda.py`
on a GPU machine."""

import json

import pytest
import torch

from conftest import run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("compile_flag", [[], ["--compile"]], ids=["eager", "compile"])
def test_tiny_chain_on_the_gpu(tmp_path, tiny_data, compile_flag):
    flags = ["--preset", "tiny", "--dataset", "folder", "--data-dir", tiny_data, "--device", "cuda"]
    for script, extra in (("ddpm.py", compile_flag), ("generate.py", compile_flag), ("clsp.py", compile_flag),
                          ("evaluate.py", [])):
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
