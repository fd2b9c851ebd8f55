"""The benchmark (run by hand on a GPU) must at least run: here on the CPU at tiny sizes."""

import os
import subprocess
import sys

from conftest import REPO


def test_benchmark_runs_on_cpu():
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tests", "benchmark.py"), "--device", "cpu"],
                          capture_output=True, text=True, timeout=1800, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr
    table = proc.stdout[proc.stdout.index("| stage"):]
    for stage in ("1 DDPM train", "2 sampler step", "3 CLSP step", "3 CLSP-MoCo step", "3 CLSP-NNCLR step",
                  "3 augmentation",
                  "4 features"):
        assert stage in table
    assert "DataLoader" in table                        # the plain stage-3 path with torchvision's transforms
    assert "host candidates" in table                    # clsp.HostCandidates' row, its loss checked below
    assert "per-epoch checkpoint: 115 MB" in table       # ResNet-18 + head weights and SGD momentum
    # The fast path computes the same function as the plain one: on the CPU (no bf16) exactly the same loss.
    for line in table.splitlines():
        if "(plain " in line:
            fast, plain = line.split("loss ")[1].split(" (plain ")
            assert abs(float(fast) - float(plain.rstrip(") |"))) < 1e-4, line


def test_benchmark_nproc_times_one_and_two_processes_of_the_same_function():
    """--nproc 2 on the CPU (gloo): a row for 1 process and one for 2 of stages 1 and 3, whose first-step
    losses agree (the same weights and whole-batch draws: the two-process step is the one-process step)."""
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tests", "benchmark.py"), "--nproc", "2", "--device",
                           "cpu", "--stages", "13"], capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr
    loss = {}
    for line in proc.stdout.splitlines():
        if line.startswith("| 1 DDPM train") or line.startswith("| 3 CLSP step"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            loss[cells[0], cells[1].split(",")[0]] = float(cells[-1].split("loss ")[1].split(";")[0])
    assert set(loss) == {(st, p) for st in ("1 DDPM train", "3 CLSP step") for p in ("1 proc", "2 procs")}
    for st in ("1 DDPM train", "3 CLSP step"):
        assert abs(loss[st, "1 proc"] - loss[st, "2 procs"]) < 1e-4, loss
