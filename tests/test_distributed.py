"""Several processes (torchrun, gloo on the CPU): an N-process run computes the one-process run.

Each test runs the same thing as one process (`python`) and as two (`torchrun --nproc-per-node 2`), as a
user would, and compares: stage 1's tiny run (its weights, to float32 rounding), stage 2's candidate set
(bit for bit), stage 3's steps of every base (in float64: the tiny ResNet's BatchNorms, at 2x2 pixels in
its last stage, amplify float32 rounding to a 1e-3 drift within a few steps, so float32 would test the
rounding, not the code), the gathered loss's gradient (and that a gather without the summed backward
fails that check), a stop and a resume on another number of processes, and the faults: a bad flag, an
error on one process, evaluate.py under torchrun.
"""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, run

WORKER = os.path.join(REPO, "tests", "distributed_worker.py")


def torchrun(script, *args, cwd, nproc=2, check=True, timeout=900):
    """`torchrun --standalone --nproc-per-node 2 SCRIPT ARGS` on the CPU; the timeout detects a hang."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", script,
           *map(str, args)]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun {script} {' '.join(map(str, args))} failed ({proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


def python(script, *args, cwd, check=True):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, script, *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def errors(proc):
    """Our one-sentence errors in a run's output (torchrun's own report of a failed process aside)."""
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error:")]


TINY = ["--preset", "tiny", "--dataset", "folder"]


# ------------------------------------------------------------------------------------------------
# Stage 1 and stage 2 as a user runs them
# ------------------------------------------------------------------------------------------------

def test_two_processes_train_the_one_process_ddpm(tmp_path, tiny_data):
    """The bug: a slice drawing its own t, eps and flips (each process its own stream), gradients not
    averaged, or a loss that is one slice's. With --dropout 0 (dropout's masks are drawn inside the model)
    two processes must give the one process's weights, EMA and random state."""
    flags = TINY + ["--data-dir", tiny_data, "--dropout", "0"]
    run("ddpm.py", *flags, "--out", "one/ddpm.pt", cwd=tmp_path)
    out = torchrun(os.path.join(REPO, "ddpm.py"), *flags, "--out", "two/ddpm.pt", "--device", "cpu", cwd=tmp_path)
    assert "2 processes (gloo)" in out.stdout
    assert out.stdout.count("wrote two/ddpm.pt") == 1             # rank 0 alone prints
    one, two = (torch.load(tmp_path / d / "ddpm.pt", weights_only=True) for d in ("one", "two"))
    assert two["step"] == one["step"] == 20 and two["settings"]["batch_size"] == 16   # the whole batch
    for part in ("model", "ema"):
        for k in one[part]:
            torch.testing.assert_close(two[part][k], one[part][k], rtol=0, atol=1e-5)
    assert torch.equal(two["rng_cpu"], one["rng_cpu"])


def test_two_processes_make_the_one_process_candidates_bit_for_bit(chain, tmp_path):
    """The bug: a batch's candidates drawn from the process's stream rather than the batch's own seed, or a
    batch made twice or never when the batches are dealt. Batches of 8 images: 16 batches, dealt in rounds."""
    root = chain.copy_upto("ddpm.py", tmp_path)
    args = ["--preset", "tiny", "--batch-size", "8"]
    run("generate.py", *args, "--out", "runs/one.pt", cwd=root)
    torchrun(os.path.join(REPO, "generate.py"), *args, "--out", "runs/two.pt", "--device", "cpu", cwd=root)
    one, two = (torch.load(os.path.join(root, "runs", f), weights_only=True) for f in ("one.pt", "two.pt"))
    assert torch.equal(one["images"], two["images"])
    assert not os.path.exists(os.path.join(root, "runs", "two.pt.parts"))


# ------------------------------------------------------------------------------------------------
# Stage 3: every base's step, and the gather under it
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("base,lam,positive", [("simclr", 0, "synthetic"), ("simclr", 1, "synthetic"),
                                               ("simclr", 1, "view"), ("moco", 0.5, "synthetic"),
                                               ("nnclr", 1, "synthetic")])
def test_two_processes_take_the_one_process_steps(tmp_path, base, lam, positive):
    """SimCLR, CLSP, SimCLR-aug, CLSP-MoCo and CLSP-NNCLR: four steps through clsp.train on two processes
    against one, in float64. The bugs: negatives from the local slice only, BatchNorm over a slice, a queue
    or support set of one process's keys, the augmentation or the candidates drawn per slice, NNCLR's view 1
    solarised in the second slice, gradients not averaged."""
    args = ["steps", None, base, lam, positive]
    python(WORKER, *[str(tmp_path / "one.pt") if a is None else a for a in args], cwd=tmp_path)
    torchrun(WORKER, *[str(tmp_path / "two.pt") if a is None else a for a in args], cwd=tmp_path)
    one, two = (torch.load(tmp_path / f, weights_only=True) for f in ("one.pt", "two.pt"))
    assert one["steps"] == two["steps"] == 4 and len(one["losses"]) == 4
    for a, b in zip(one["losses"], two["losses"]):
        assert a.keys() == b.keys()
        for k in a:
            assert abs(a[k] - b[k]) < 1e-10 * max(1, abs(a[k])), (k, a[k], b[k])
    for k, v in one["state"].items():
        if v.is_floating_point():
            torch.testing.assert_close(two["state"][k], v, rtol=1e-9, atol=1e-10, msg=k)
        else:
            assert torch.equal(two["state"][k], v), k          # the support set's indices, the BN counters


def test_the_gathered_loss_has_the_whole_batchs_gradient(tmp_path):
    """NT-Xent over embeddings gathered from two processes, averaged as parameters' gradients are, against
    the one-process gradient of the whole batch; a gather whose backward keeps only its own process's
    gradient (lightly's bug until 2024) must fail the same check."""
    python(WORKER, "gather", str(tmp_path / "one"), "0", cwd=tmp_path)
    torchrun(WORKER, "gather", str(tmp_path / "two"), "0", cwd=tmp_path)
    torchrun(WORKER, "gather", str(tmp_path / "naive"), "1", cwd=tmp_path)
    one = torch.load(tmp_path / "one.0", weights_only=True)
    for rank in (0, 1):
        two = torch.load(tmp_path / f"two.{rank}", weights_only=True)
        naive = torch.load(tmp_path / f"naive.{rank}", weights_only=True)
        assert abs(two["loss"] - one["loss"]) < 1e-12
        torch.testing.assert_close(two["grad"], one["grad"], rtol=1e-10, atol=1e-12)
        assert not torch.allclose(naive["grad"], one["grad"], rtol=1e-3)


# ------------------------------------------------------------------------------------------------
# A stop, a resume on another number of processes, and the faults
# ------------------------------------------------------------------------------------------------

def test_sigterm_stops_every_process_and_a_resume_on_one_process_ends_where_one_would(tmp_path, tiny_data):
    """torchrun passes a SIGTERM (or Ctrl-C) to every process; they must stop after the same step, rank 0
    saving once, and the checkpoint must not depend on the number of processes: resumed by one process,
    the run ends with the weights of an uninterrupted one-process run."""
    flags = TINY + ["--data-dir", tiny_data, "--dropout", "0", "--steps", "60", "--save-every", "10"]
    run("ddpm.py", *flags, "--out", "whole/ddpm.pt", cwd=tmp_path)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                             os.path.join(REPO, "ddpm.py"), *flags, "--out", "cut/ddpm.pt", "--device", "cpu"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    while not os.path.exists(tmp_path / "cut" / "ddpm.pt") and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)                                  # the first checkpoint (step 10) is there: stop
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode != 0 and out.count("interrupted at step") == 1, out
    assert "continue with `torchrun --standalone --nproc-per-node 2 ddpm.py" in out   # the hint: this job's launcher
    cut = torch.load(tmp_path / "cut" / "ddpm.pt", weights_only=True)
    assert 10 <= cut["step"] < 60 and not cut["finished"]
    run("ddpm.py", "--resume", "--data-dir", tiny_data, "--out", "cut/ddpm.pt", cwd=tmp_path)
    whole, resumed = (torch.load(tmp_path / d / "ddpm.pt", weights_only=True) for d in ("whole", "cut"))
    assert resumed["step"] == 60
    for k in whole["model"]:
        torch.testing.assert_close(resumed["model"][k], whole["model"][k], rtol=0, atol=1e-5)


def test_a_bad_flag_on_two_processes_is_one_sentence(tmp_path, tiny_data):
    """Both processes find it before any process group starts; rank 0 alone says it."""
    out = torchrun(os.path.join(REPO, "clsp.py"), *TINY, "--data-dir", tiny_data, "--lam", "0",
                   "--batch-size", "31", "--device", "cpu", cwd=tmp_path, check=False)
    assert out.returncode != 0
    assert errors(out) == ["error: --batch-size 31 does not split into 2 equal parts, one per process; pass "
                           "--batch-size 32 or 30"]


def test_an_error_on_one_process_ends_them_all(tmp_path, tiny_data):
    """Rank 1 raises in its second step while rank 0 goes on: rank 0 must end too (never wait for rank 1
    forever), and nothing is written."""
    out = torchrun(WORKER, "raise", *TINY, "--data-dir", tiny_data, "--lam", "0", "--out", "runs/x.pt",
                   "--device", "cpu", "--knn-every", "0", cwd=tmp_path, check=False, timeout=600)
    assert out.returncode != 0
    assert "a failure planted on rank 1" in out.stdout + out.stderr
    assert len(errors(out)) <= 1                            # rank 0: at most that it lost the others
    assert all("lost the other processes" in e for e in errors(out)), errors(out)
    assert not os.path.exists(tmp_path / "runs" / "x.pt")


def test_evaluate_under_torchrun_says_it_is_one_process(tmp_path):
    out = torchrun(os.path.join(REPO, "evaluate.py"), "--preset", "tiny", cwd=tmp_path, check=False)
    assert out.returncode != 0
    assert len(errors(out)) == 1 and "runs as one process" in errors(out)[0]


def test_an_existing_out_is_refused_once(chain, tmp_path):
    """Rank 0 (the writer) refuses to overwrite; the other process ends with it, silently."""
    root = chain.copy_upto("ddpm.py", tmp_path)
    out = torchrun(os.path.join(REPO, "ddpm.py"), *TINY, "--data-dir", chain.data, "--device", "cpu", cwd=root,
                   check=False)
    assert out.returncode != 0
    assert len(errors(out)) == 1 and "runs/ddpm.pt already exists" in errors(out)[0]


def test_an_interrupted_two_process_candidate_set_is_finished_by_one_process(chain, tmp_path):
    """SIGTERM to a 2-process generate.py keeps the finished batches; one process resumes the parts folder
    (its manifest does not depend on N) and ends with the set an uninterrupted run makes, bit for bit."""
    root = chain.copy_upto("ddpm.py", tmp_path)
    args = ["--preset", "tiny", "--batch-size", "8", "--steps", "20"]
    run("generate.py", *args, "--out", "runs/whole.pt", cwd=root)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                             os.path.join(REPO, "generate.py"), *args, "--out", "runs/cut.pt", "--device", "cpu"],
                            cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    parts, deadline = os.path.join(root, "runs", "cut.pt.parts"), time.time() + 600
    while time.time() < deadline and proc.poll() is None and not (
            os.path.isdir(parts) and any(f.startswith("batch_") and f.endswith(".pt") for f in os.listdir(parts))):
        time.sleep(0.05)                                  # the first batch is on disk: stop
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode != 0 and out.count("interrupted with") == 1, out
    kept = [f for f in os.listdir(parts) if f.startswith("batch_")]
    assert 0 < len(kept) < 16
    resumed = run("generate.py", *args, "--out", "runs/cut.pt", cwd=root)
    assert f"resuming: {len(kept)}/16 batches already done" in resumed.stdout
    whole, cut = (torch.load(os.path.join(root, "runs", f), weights_only=True) for f in ("whole.pt", "cut.pt"))
    assert torch.equal(whole["images"], cut["images"])
