"""Faults a user meets running the scripts: data or files that are not what they should be, two runs at
once, kills and signals, full disks, hints to paste, a compile that fails, a checkpoint from an older version.

Each test reproduces one case of a fault trial run on an earlier version (tiny preset, CPU, a fresh
clone), where the case went wrong: a wrong result without a word, lost work, a raw traceback or a late
failure. They run the scripts as a user does, or main() in this process where a fault is injected. The
sections say what they check; the unit tests of the pieces of common.py these rest on (the lock, the
folder cache, the progress lines, ...) are in test_common.py.
"""

import functools
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

import common
import ddpm
import evaluate
from conftest import REPO, make_image_folder, run


def tiny(data, *extra):
    return ["--preset", "tiny", "--dataset", "folder", "--data-dir", data, *extra]


def popen(script, *args, cwd):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, os.path.join(REPO, script), *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# How long a test waits for a run to reach the moment it waits for, or to end: a hang detector, not a speed
# check (a busy 2-core machine can be many times slower than an idle one). A test waits for what a run
# prints or writes, never for a time it guesses.
WAIT = 600


def wait_for(condition, proc, seconds=WAIT):
    deadline = time.time() + seconds
    while not condition() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert condition(), "the run ended or stalled before the moment the test waits for"


class Output:
    """What a running process prints, read on threads as it comes, so that a test can wait for a line the
    program prints (Output.wait_for) and still have all of it at the end (Output.finish)."""

    def __init__(self, proc):
        self.proc, self.lines = proc, dict(out=[], err=[])
        self.threads = [threading.Thread(target=self._read, args=(stream, self.lines[name]), daemon=True)
                        for name, stream in (("out", proc.stdout), ("err", proc.stderr))]
        for thread in self.threads:
            thread.start()

    @staticmethod
    def _read(stream, lines):
        for line in stream:                # each line as the program prints it (PYTHONUNBUFFERED)
            lines.append(line)

    @property
    def err(self):
        return "".join(self.lines["err"])

    def wait_for(self, text, seconds=WAIT):
        """Until stderr holds `text`, or the process has closed it (ended)."""
        deadline = time.time() + seconds
        while text not in self.err and any(t.is_alive() for t in self.threads) and time.time() < deadline:
            time.sleep(0.02)
        assert text in self.err, f"the run ended or stalled before it printed {text!r}:\n{self.err}"

    def finish(self, seconds=WAIT):
        """(stdout, stderr), once the process has ended."""
        self.proc.wait(timeout=seconds)
        for thread in self.threads:
            thread.join(seconds)
        return "".join(self.lines["out"]), self.err


def loading_torch(pid):
    """Whether process pid has begun to load PyTorch's libraries (Linux: /proc/PID/maps names them), so is
    inside `import torch`, which then takes seconds more."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            return "libtorch" in f.read()
    except OSError:
        return False


# ---- Wrong data and wrong files are refused before any work; the right data is found -----------------

def test_another_folder_with_the_same_counts_is_refused(chain, tmp_path):
    """Same number of images and classes, other pixels: the fingerprint tells them apart."""
    root = chain.copy_upto("generate.py", tmp_path)
    other = make_image_folder(str(tmp_path / "other"), seed=1)
    proc = run("generate.py", *tiny(other, "--out", "runs/other.pt"), cwd=root, check=False)
    assert proc.returncode != 0 and "may have changed" in proc.stderr and "Traceback" not in proc.stderr
    proc = run("clsp.py", *tiny(other), cwd=root, check=False)
    assert proc.returncode != 0 and "was made from" in proc.stderr and "fingerprint" in proc.stderr
    assert not os.path.exists(os.path.join(root, "runs", "clsp.pt"))


def test_a_missing_test_split_is_found_by_stage_1(tmp_path):
    d = make_image_folder(str(tmp_path / "d"))
    shutil.rmtree(os.path.join(d, "test"))
    proc = run("ddpm.py", *tiny(d), cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "test" in proc.stderr and "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "runs" / "ddpm.pt")


def test_a_file_that_is_not_an_artifact_is_refused(tmp_path, tiny_data):
    torch.save(torch.zeros(3), tmp_path / "f.pt")            # a bare tensor, not a generate.py dict
    proc = run("clsp.py", *tiny(tiny_data, "--synthetic", "f.pt"), cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "f.pt is a Tensor, not a generate.py candidate set" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_baseline_with_unreadable_artifacts_says_so(tmp_path):
    """clsp.py --lam 0 looked for its data in runs/synthetic.pt and runs/ddpm.pt, found neither readable,
    fell back to CIFAR-10, and reported a failed download."""
    (tmp_path / "runs").mkdir()
    for name in ("synthetic.pt", "ddpm.pt"):
        (tmp_path / "runs" / name).write_bytes(b"not an artifact")
    proc = run("clsp.py", "--preset", "tiny", "--lam", "0", cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "runs/synthetic.pt is there but is not a readable artifact" in proc.stderr
    assert "download" not in proc.stderr and not os.path.exists(tmp_path / "data")


def test_the_baseline_takes_its_data_from_the_artifacts(chain, tmp_path):
    root = chain.copy_upto("generate.py", tmp_path)
    proc = run("clsp.py", "--preset", "tiny", "--lam", "0", "--out", "runs/clsp_lam0.pt", cwd=root)
    assert "as in runs/synthetic.pt" in proc.stdout
    ckpt = torch.load(os.path.join(root, "runs", "clsp_lam0.pt"), weights_only=True)
    syn = torch.load(os.path.join(root, "runs", "synthetic.pt"), weights_only=True)
    assert ckpt["data"] == syn["data"] and ckpt["synthetic"] is None


# ---- A second run never clobbers the first -----------------------------------------------------------

def test_a_second_run_on_the_same_out_is_refused_while_the_first_runs(tmp_path, tiny_data):
    first = popen("ddpm.py", *tiny(tiny_data, "--steps", "100000"), cwd=tmp_path)
    try:
        wait_for(lambda: os.path.exists(tmp_path / "runs" / "ddpm.pt.lock"), first)
        proc = run("ddpm.py", *tiny(tiny_data), cwd=tmp_path, check=False)
        assert proc.returncode != 0 and "another run is writing runs/ddpm.pt" in proc.stderr
    finally:
        first.kill()                                       # kill -9: the lock must not stay stuck
        first.communicate()
    assert os.path.exists(tmp_path / "runs" / "ddpm.pt.lock")     # the file stays, the lock does not
    if os.path.exists(tmp_path / "runs" / "ddpm.pt"):
        os.remove(tmp_path / "runs" / "ddpm.pt")                   # the killed run's checkpoint
    proc = run("ddpm.py", *tiny(tiny_data), cwd=tmp_path)
    assert "wrote runs/ddpm.pt" in proc.stdout


def test_a_lock_left_by_a_killed_run_does_not_block(tmp_path, tiny_data):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "ddpm.pt.lock").write_text("")
    run("ddpm.py", *tiny(tiny_data), cwd=tmp_path)
    assert not os.path.exists(tmp_path / "runs" / "ddpm.pt.lock")   # removed when the run ended


def test_two_runs_never_write_one_picture_at_once(tmp_path, tiny_data):
    first = popen("ddpm.py", *tiny(tiny_data, "--steps", "100000", "--out", "runs/a.pt"), cwd=tmp_path)
    try:
        wait_for(lambda: os.path.exists(tmp_path / "runs" / "a.pt.lock"), first)
        proc = run("ddpm.py", *tiny(tiny_data, "--out", "runs/b.pt", "--samples", "runs/a_samples.png"),
                   cwd=tmp_path, check=False)
        assert proc.returncode != 0 and "another run is writing runs/a_samples.png" in proc.stderr, proc.stderr
    finally:
        first.kill()
        first.communicate()


def test_pictures_go_beside_their_artifact(chain, tmp_path):
    root = chain.copy_upto("ddpm.py", tmp_path)
    before = open(os.path.join(root, "runs", "ddpm_samples.png"), "rb").read()
    run("ddpm.py", *tiny(chain.data, "--out", "runs/other.pt"), cwd=root)
    assert os.path.exists(os.path.join(root, "runs", "other_samples.png"))
    assert open(os.path.join(root, "runs", "ddpm_samples.png"), "rb").read() == before
    run("generate.py", "--preset", "tiny", "--out", "runs/syn2.pt", cwd=root)
    assert sorted(f for f in os.listdir(os.path.join(root, "runs")) if f.startswith("syn")) == \
        ["syn2.pt", "syn2_preview.png", "syn2_w_sweep.png"]


def test_only_a_pt_artifact_names_pictures(chain, tmp_path):
    """runs/ddpm.ckpt and runs/ddpm would both have named runs/ddpm_samples.png, runs/ddpm.pt's picture."""
    root = chain.copy_upto("ddpm.py", tmp_path)
    before = open(os.path.join(root, "runs", "ddpm_samples.png"), "rb").read()
    for out in ("runs/ddpm.ckpt", "runs/ddpm"):
        proc = run("ddpm.py", *tiny(chain.data, "--out", out), cwd=root, check=False)
        assert proc.returncode != 0 and f"--out {out} must end in .pt" in proc.stderr, proc.stderr
    assert open(os.path.join(root, "runs", "ddpm_samples.png"), "rb").read() == before


# ---- A write that cannot be done is found before the work, and never damages the previous file -------

def test_an_out_that_cannot_be_written_fails_before_the_first_step(tmp_path, tiny_data):
    (tmp_path / "runs").write_text("a file, not a folder")
    for script, flags in [("ddpm.py", tiny(tiny_data)), ("clsp.py", tiny(tiny_data, "--lam", "0"))]:
        proc = run(script, *flags, "--out", "runs/x.pt", cwd=tmp_path, check=False)
        assert proc.returncode != 0 and "cannot write runs/x.pt" in proc.stderr, proc.stderr
        assert "runs is a file, not a folder" in proc.stderr and "File exists" not in proc.stderr   # issue 19
        assert "Traceback" not in proc.stderr and "step " not in proc.stdout and "epoch " not in proc.stdout


def test_a_disk_too_small_for_the_checkpoint_is_found_before_training(tmp_path, tiny_data, monkeypatch):
    """clsp.py found a full disk only at its first checkpoint, an epoch later."""
    import clsp
    monkeypatch.chdir(tmp_path)
    real = shutil.disk_usage
    monkeypatch.setattr(common.shutil, "disk_usage", lambda p: real(p)._replace(free=30_000_000))
    steps = []
    monkeypatch.setattr(clsp, "train", lambda *a, **k: steps.append(1))
    with pytest.raises(SystemExit) as e:
        clsp.main([*tiny(tiny_data, "--lam", "0"), "--device", "cpu"])
    assert "runs/clsp.pt needs about" in str(e.value) and "30 MB are free" in str(e.value)
    assert not steps and not os.path.exists("runs/clsp.pt")


def test_a_full_disk_is_one_sentence_and_keeps_the_previous_artifact(chain, tmp_path, monkeypatch):
    root = chain.copy_upto("evaluate.py", tmp_path)
    monkeypatch.chdir(root)
    before = {f: open(os.path.join("runs", f), "rb").read() for f in ("ddpm.pt", "eval.json")}

    def disk_full(*args, **kwargs):     # what torch.save raises when the disk fills up mid-write
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4608 vs 4496")
    with monkeypatch.context() as m:
        m.setattr(torch, "save", disk_full)
        with pytest.raises(SystemExit) as e:
            ddpm.main(["--resume", "--device", "cpu", "--data-dir", chain.data])   # finished: only saves
    assert "may be full" in str(e.value) and "runs/ddpm.pt, if there was one, is intact" in str(e.value)
    assert "enforce fail" not in str(e.value) and "the write stopped part-way" in str(e.value)   # not PyTorch's words

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")
    with monkeypatch.context() as m:
        m.setattr(json, "dump", no_space)
        with pytest.raises(SystemExit) as e:
            evaluate.main(["--preset", "tiny", "--device", "cpu"])
    assert "No space left on device" in str(e.value) and "may be full" in str(e.value)
    assert {f: open(os.path.join("runs", f), "rb").read() for f in before} == before
    assert not glob.glob("runs/*.tmp*")


def test_stale_temporary_files_are_removed(tmp_path, tiny_data):
    (tmp_path / "runs").mkdir()
    for name in ("ddpm.pt.tmp4242", "ddpm_samples.png.tmp4242.png"):
        (tmp_path / "runs" / name).write_bytes(b"x" * 1000)     # a save killed mid-write
    run("ddpm.py", *tiny(tiny_data), cwd=tmp_path)
    assert sorted(os.listdir(tmp_path / "runs")) == ["ddpm.pt", "ddpm_samples.png"]


# ---- Signals: one sentence, nothing lost -------------------------------------------------------------

def test_ctrl_c_twice_is_one_sentence(tmp_path, tiny_data):
    proc = popen("clsp.py", *tiny(tiny_data, "--lam", "0", "--epochs", "1000"), cwd=tmp_path)
    output = Output(proc)
    wait_for(lambda: os.path.exists(tmp_path / "runs" / "clsp.pt"), proc)
    proc.send_signal(signal.SIGINT)
    output.wait_for("stopping at the end of this step")     # the first one was handled: a second, not both at once
    proc.send_signal(signal.SIGINT)                          # the second one: quit at once
    _, err = output.finish()
    assert proc.returncode != 0 and "Traceback" not in err and err.strip().startswith(("error:", "stopping")), err
    assert len([line for line in err.splitlines() if line.strip()]) <= 2, err


@pytest.mark.parametrize("script,sig", [("clsp.py", signal.SIGINT), ("evaluate.py", signal.SIGTERM)])
def test_a_signal_while_starting_is_one_sentence(tmp_path, tiny_data, script, sig):
    """Importing PyTorch takes seconds: Ctrl-C then printed a KeyboardInterrupt traceback, and SIGTERM
    ended the run without a word (exit 143)."""
    proc = popen(script, *tiny(tiny_data, "--lam", "0") if script == "clsp.py" else tiny(tiny_data), cwd=tmp_path)
    if os.path.exists(f"/proc/{os.getpid()}/maps"):
        wait_for(lambda: loading_torch(proc.pid), proc)     # inside `import torch`, however slow the machine
    else:                                                    # no /proc (not Linux): a guess
        time.sleep(0.5)                                      # inside `import torch`
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == 1 and "Traceback" not in err, err
    assert err.strip().startswith("error: stopped by") and len(err.strip().splitlines()) == 1, err
    assert not os.path.exists(tmp_path / "runs") or not os.listdir(tmp_path / "runs")


def test_sigterm_stops_generate_after_a_batch_and_says_how_to_continue(chain, tmp_path):
    root = chain.copy_upto("ddpm.py", tmp_path)
    parts = os.path.join(root, "runs", "synthetic.pt.parts")
    proc = popen("generate.py", "--preset", "tiny", "--batch-size", "2", "--steps", "40", cwd=root)
    wait_for(lambda: os.path.exists(os.path.join(parts, "batch_000000.pt")), proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=WAIT)
    assert proc.returncode != 0 and "rerun the same command to resume" in err and "Traceback" not in err
    assert "batch_000000.pt" in os.listdir(parts)


def test_sigterm_after_the_last_batch_of_generate_says_how_to_finish(chain, tmp_path):
    """During the w sweep (after the last batch) SIGTERM killed generate.py without a word (exit 143),
    leaving its lock. Now: one sentence, the batches kept, and the same command finishes the set."""
    root = chain.copy_upto("ddpm.py", tmp_path)
    flags = ["--preset", "tiny", "--num-anchors", "8", "--K", "1", "--batch-size", "8", "--steps", "100"]
    proc = popen("generate.py", *flags, cwd=root)
    parts = os.path.join(root, "runs", "synthetic.pt.parts")
    wait_for(lambda: os.path.exists(os.path.join(parts, "batch_000000.pt")), proc)   # the only batch: done
    proc.send_signal(signal.SIGTERM)                        # now in the w sweep
    _, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == 1 and "Traceback" not in err, err
    assert "rerun the same command to finish" in err, err
    assert not os.path.exists(os.path.join(root, "runs", "synthetic.pt.lock"))
    proc = run("generate.py", *flags, cwd=root)
    assert "resuming: 1/1 batches" in proc.stdout and os.path.exists(os.path.join(root, "runs", "synthetic.pt"))


def test_a_stop_during_the_last_save_is_a_finished_run(tmp_path, tiny_data, monkeypatch):
    """Ctrl-C while the final checkpoint is written: the run is finished, not 'interrupted ... --resume'."""
    import clsp
    monkeypatch.chdir(tmp_path)
    real_save = clsp.atomic_save

    def save_then_ctrl_c(obj, path):
        real_save(obj, path)
        if obj.get("finished"):
            os.kill(os.getpid(), signal.SIGINT)           # StopFlag's handler: a stop request
    monkeypatch.setattr(clsp, "atomic_save", save_then_ctrl_c)
    clsp.main([*tiny(tiny_data, "--lam", "0", "--knn-every", "0"), "--device", "cpu"])   # returns: no SystemExit
    assert torch.load("runs/clsp.pt", weights_only=True)["finished"]


# ---- Hints can be pasted as they are -----------------------------------------------------------------

def test_hints_repeat_the_users_preset_and_data_flags(tmp_path, tiny_data):
    proc = run("generate.py", *tiny(tiny_data), cwd=tmp_path, check=False)
    assert f"run `python ddpm.py --preset tiny --dataset folder --data-dir {tiny_data}` first" in proc.stderr


def pasted(hint_text):
    """The command inside the first `backticks` of a message, as a list of arguments (without python)."""
    return hint_text.split("`")[1].split()[1:]


def test_every_hint_can_be_pasted_as_it_is(chain, tmp_path, monkeypatch):
    root = chain.copy_upto("clsp.py", tmp_path)
    # evaluate.py without a judge: the hint makes one, with the user's preset (pasted on a CPU, the
    # standard preset would start a 400-epoch run) and the judge's own path.
    proc = run("evaluate.py", "--preset", "tiny", cwd=root)
    assert "`python clsp.py --preset tiny --lam 0 --out runs/clsp_lam0.pt` makes one" in proc.stdout
    # An unreadable judge: the hint makes a judge, not runs/clsp.pt.
    (tmp_path / "runs" / "clsp_lam0.pt").write_bytes(b"half a file")
    proc = run("evaluate.py", "--preset", "tiny", "--judge", "runs/clsp_lam0.pt", cwd=root, check=False)
    assert "run `python clsp.py --preset tiny --lam 0 --out runs/clsp_lam0.pt` again" in proc.stderr
    # ddpm.py --resume of a file that is not there: start it, under that name.
    proc = run("ddpm.py", "--preset", "tiny", "--resume", "--out", "runs/x.pt", cwd=root, check=False)
    assert "run `python ddpm.py --preset tiny --out runs/x.pt` first" in proc.stderr
    # clsp.py's interrupt hint, pasted: it resumes with the checkpoint's settings, without a warning that
    # the standard preset takes days.
    msg = None
    monkeypatch.chdir(root)
    with pytest.raises(SystemExit) as e:
        import clsp
        clsp.main(["--preset", "tiny", "--lam", "0", "--out", "runs/c7.pt", "--stop-after-epoch", "1",
                   "--device", "cpu"])
    msg = str(e.value)
    assert "`python clsp.py --preset tiny --resume --out runs/c7.pt`" in msg, msg
    proc = run(*pasted(msg), cwd=root)
    assert "sized for a GPU" not in proc.stdout and "wrote runs/c7.pt" in proc.stdout


def error_of(main, argv, monkeypatch, cwd):
    """main(argv) in this process, in cwd: the one-sentence error it stops with."""
    monkeypatch.chdir(cwd)
    with pytest.raises(SystemExit) as e:
        main([*map(str, argv), "--device", "cpu"])
    return str(e.value)


def test_a_missing_input_hint_writes_the_file_the_flag_names(chain, tmp_path, monkeypatch):
    import clsp
    import evaluate
    import generate
    root = chain.copy_upto("clsp.py", tmp_path)
    tiny = ["--preset", "tiny"]
    assert "run `python ddpm.py --preset tiny --out runs/d2.pt` first" in \
        error_of(generate.main, [*tiny, "--ddpm", "runs/d2.pt"], monkeypatch, root)
    assert "run `python generate.py --preset tiny --out runs/s2.pt` first" in \
        error_of(clsp.main, [*tiny, "--synthetic", "runs/s2.pt"], monkeypatch, root)
    assert "run `python clsp.py --preset tiny --out runs/c2.pt` first" in \
        error_of(evaluate.main, [*tiny, "--checkpoint", "runs/c2.pt"], monkeypatch, root)


def test_the_changed_data_hint_keeps_the_preset_and_the_file(chain, tmp_path, monkeypatch):
    import generate
    root = chain.copy_upto("ddpm.py", tmp_path)
    shutil.move(os.path.join(root, "runs", "ddpm.pt"), os.path.join(root, "runs", "d3.pt"))
    other = make_image_folder(str(tmp_path / "other"), seed=1)       # same counts, other pixels
    msg = error_of(generate.main, ["--preset", "tiny", "--ddpm", "runs/d3.pt", "--data-dir", other],
                   monkeypatch, root)
    assert f"`python ddpm.py --preset tiny --dataset folder --data-dir {other} --image-size 16 --out runs/d3.pt`" \
        in msg, msg


def test_a_gpu_preset_on_a_cpu_warns_and_points_at_tiny(tmp_path, tiny_data):
    proc = run("ddpm.py", "--preset", "quick", "--dataset", "folder", "--data-dir", tiny_data, "--device", "cpu",
               "--steps", "1", "--batch-size", "2", "--ch", "32", "--sample-steps", "1", cwd=tmp_path)
    assert "warning: the quick preset is sized for a GPU" in proc.stdout and "--preset tiny" in proc.stdout


# ---- Long work is never silent -----------------------------------------------------------------------

def test_clsp_names_its_knn_check_while_it_runs(chain, tmp_path, monkeypatch, capsys):
    """The tiny run on 512 images was silent for 41 s around the end-of-epoch kNN check."""
    import clsp
    root = chain.copy_upto("generate.py", tmp_path)
    monkeypatch.setattr(clsp, "Progress", functools.partial(common.Progress, heartbeat=0.05))
    real = clsp.make_knn_monitor

    def slow_monitor(*a):
        monitor = real(*a)

        def wait_for_a_heartbeat():
            seen, deadline = "", time.monotonic() + 600
            while "still the kNN check" not in seen and time.monotonic() < deadline:
                time.sleep(0.02)
                seen += capsys.readouterr().out
            print(seen, end="")
            return monitor()
        return wait_for_a_heartbeat
    monkeypatch.setattr(clsp, "make_knn_monitor", slow_monitor)
    monkeypatch.chdir(root)
    clsp.main(["--preset", "tiny", "--epochs", "1", "--out", "runs/k.pt", "--device", "cpu"])
    assert "  ... still the kNN check" in capsys.readouterr().out


# ---- A compile that fails changes no result ----------------------------------------------------------

class CompileFails:
    """torch.compile as a GPU without a working Triton or CUDA graphs gives it: compiling works, the first
    call fails."""

    def __init__(self, fn=None, **kwargs):
        self.fn = fn

    def __call__(self, *args, **kwargs):
        raise RuntimeError("triton compilation failed: fake error for the test\ndetails")


@pytest.mark.parametrize("script", ["ddpm", "clsp", "moco", "generate"])
def test_a_failing_compile_goes_on_eagerly_with_the_same_results(chain, tmp_path, monkeypatch, capsys, script):
    import clsp
    import ddpm
    import generate
    root = chain.copy_upto("generate.py" if script in ("clsp", "moco") else "ddpm.py", tmp_path)
    monkeypatch.chdir(root)
    main = {"ddpm": ddpm.main, "clsp": clsp.main, "moco": clsp.main, "generate": generate.main}[script]
    flags = ["--preset", "tiny", "--device", "cpu"] + {"ddpm": ["--dataset", "folder", "--data-dir", chain.data],
                                                        "moco": ["--base", "moco", "--epochs", "1"]}.get(script, [])
    main(flags + ["--no-compile", "--out", "runs/eager.pt"])
    monkeypatch.setattr(torch, "compile", CompileFails)
    capsys.readouterr()
    main(flags + ["--compile", "--out", "runs/fallback.pt"])
    out = capsys.readouterr().out
    assert "failed (RuntimeError: triton compilation failed: fake error for the test); going on without compiling" \
        in out and out.count("note: the compiled") == 1, out
    a, b = (torch.load(f"runs/{f}.pt", weights_only=True) for f in ("eager", "fallback"))
    keys = {"ddpm": ["model", "ema"], "clsp": ["backbone", "head"], "moco": ["backbone", "head", "key", "queue"],
            "generate": ["images"]}
    for key in keys[script]:
        weights = a[key] if isinstance(a[key], dict) else {"": a[key]}
        other = b[key] if isinstance(b[key], dict) else {"": b[key]}
        assert all(torch.equal(weights[k], other[k]) for k in weights), key


# ---- A checkpoint from an older version still resumes ------------------------------------------------

def test_resume_of_a_checkpoint_older_than_a_setting_takes_its_default(tmp_path, tiny_data, monkeypatch):
    """A checkpoint from before --base existed continues as what it was (SimCLR); naming that default
    explicitly is no clash."""
    import clsp
    monkeypatch.chdir(tmp_path)
    flags = [*tiny(tiny_data, "--lam", "0", "--knn-every", "0"), "--device", "cpu", "--epochs", "2"]
    with pytest.raises(SystemExit, match="interrupted"):
        clsp.main(flags + ["--stop-after-epoch", "1"])
    old = torch.load("runs/clsp.pt", weights_only=True)
    for key in ("base", "positive", "queue", "key_momentum", "key_momentum_end"):
        del old["settings"][key]
    torch.save(old, "runs/clsp.pt")
    clsp.main(["--resume", "--base", "simclr", "--device", "cpu"])
    assert torch.load("runs/clsp.pt", weights_only=True)["finished"]


# ---- What a newcomer reads is all there: no missing file, pictures that name their columns -----------

def test_no_file_of_the_project_cites_a_file_the_clone_lacks():
    for path in glob.glob(os.path.join(REPO, "*.py")) + glob.glob(os.path.join(REPO, "tests", "*.py")) + \
            [os.path.join(REPO, "README.md")]:
        text = open(path).read()
        for name in ("METHOD" + ".md", "STYLE" + ".md", "../" + "shared"):
            assert name not in text, (path, name)


def test_the_w_sweep_names_its_columns(chain):
    from PIL import Image
    img = Image.open(os.path.join(chain.upto("generate.py"), "runs", "synthetic_w_sweep.png")).convert("L")
    header = torch.from_numpy(np.asarray(img)[:14].copy())
    assert (header >= 250).float().mean() > 0.8            # a white header above the tiles ...
    assert (header < 128).sum() > 50                       # ... with dark text on it: the w labels
