"""Faults a user meets: data that changed, two runs at once, kills, full disks, wrong files, friction.

Each test reproduces one case of a fault trial run on an earlier version (tiny preset, CPU, a fresh
clone), where the case went wrong: a wrong result without a word, lost work, a raw traceback or a late
failure. They run the scripts as a user does, or main() in this process where a fault is injected.
"""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
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


def wait_for(condition, proc, seconds=120):
    deadline = time.time() + seconds
    while not condition() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert condition(), "the run ended or stalled before the moment the test waits for"


# ---- Wrong results without a word ------------------------------------------------------------------

def test_labels_come_from_the_training_class_names(tmp_path):
    """test/ without one of the training classes: the others keep the training split's numbers (they
    shifted by one before, and evaluate.py reported 0 %)."""
    d = make_image_folder(str(tmp_path / "d"))
    shutil.rmtree(os.path.join(d, "test", "class1"))
    _, y_train, classes = common.load_dataset("folder", d, "train", 16)
    _, y_test, test_classes = common.load_dataset("folder", d, "test", 16)
    assert classes == test_classes == ["class0", "class1", "class2", "class3"]
    assert sorted(set(y_test.tolist())) == [0, 2, 3]


def test_a_test_class_the_training_split_lacks_is_refused(tmp_path):
    d = make_image_folder(str(tmp_path / "d"))
    os.rename(os.path.join(d, "test", "class3"), os.path.join(d, "test", "zebra"))
    with pytest.raises(SystemExit, match="zebra.*training folder of the same name"):
        common.load_dataset("folder", d, "test", 16)


def test_a_single_class_is_called_trivial(tmp_path, capsys):
    d = make_image_folder(str(tmp_path / "d"))
    for split in ("train", "test"):
        for c in ("class1", "class2", "class3"):
            shutil.rmtree(os.path.join(d, split, c))
    common.load_dataset("folder", d, "train", 16)
    assert "single class" in capsys.readouterr().out


def test_another_folder_with_the_same_counts_is_refused(chain, tmp_path):
    """Same number of images and classes, other pixels: the fingerprint tells them apart."""
    root = chain.copy_upto("generate.py", tmp_path)
    other = make_image_folder(str(tmp_path / "other"), seed=1)
    proc = run("generate.py", *tiny(other, "--out", "runs/other.pt"), cwd=root, check=False)
    assert proc.returncode != 0 and "may have changed" in proc.stderr and "Traceback" not in proc.stderr
    proc = run("clsp.py", *tiny(other), cwd=root, check=False)
    assert proc.returncode != 0 and "was made from" in proc.stderr and "fingerprint" in proc.stderr
    assert not os.path.exists(os.path.join(root, "runs", "clsp.pt"))


# ---- Work lost without a word -----------------------------------------------------------------------

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


def test_a_lock_file_removed_while_it_is_being_taken_is_taken_anew(tmp_path, monkeypatch):
    """Run A ends (removing its lock file) just after run B opened that file: B must not lock the removed
    file, or a third run C, creating the file anew, would write at the same time as B."""
    path = str(tmp_path / "x.pt")
    a = common.claim_output(path)
    a.__enter__()
    opened = []

    def open_then_a_ends(name, mode="r"):
        f = open(name, mode)
        if not opened:
            a.__exit__(None, None, None)                 # A ends between B's open and B's lock
        opened.append(name)
        return f
    monkeypatch.setattr(common, "open", open_then_a_ends, raising=False)
    with common.claim_output(path):                        # B
        monkeypatch.undo()
        with pytest.raises(SystemExit, match="another run is writing"):
            with common.claim_output(path):                # C
                pass
    assert len(opened) == 2                              # B took the lock file that was there


def test_pictures_go_beside_their_artifact(chain, tmp_path):
    root = chain.copy_upto("ddpm.py", tmp_path)
    before = open(os.path.join(root, "runs", "ddpm_samples.png"), "rb").read()
    run("ddpm.py", *tiny(chain.data, "--out", "runs/other.pt"), cwd=root)
    assert os.path.exists(os.path.join(root, "runs", "other_samples.png"))
    assert open(os.path.join(root, "runs", "ddpm_samples.png"), "rb").read() == before
    run("generate.py", "--preset", "tiny", "--out", "runs/syn2.pt", cwd=root)
    assert sorted(f for f in os.listdir(os.path.join(root, "runs")) if f.startswith("syn")) == \
        ["syn2.pt", "syn2_preview.png", "syn2_w_sweep.png"]


def test_stale_temporary_files_are_removed(tmp_path, tiny_data):
    (tmp_path / "runs").mkdir()
    for name in ("ddpm.pt.tmp4242", "ddpm_samples.png.tmp4242.png"):
        (tmp_path / "runs" / name).write_bytes(b"x" * 1000)     # a save killed mid-write
    run("ddpm.py", *tiny(tiny_data), cwd=tmp_path)
    assert sorted(os.listdir(tmp_path / "runs")) == ["ddpm.pt", "ddpm_samples.png"]


# ---- Raw tracebacks and late failures ---------------------------------------------------------------

def test_an_out_that_cannot_be_written_fails_before_the_first_step(tmp_path, tiny_data):
    (tmp_path / "runs").write_text("a file, not a folder")
    for script, flags in [("ddpm.py", tiny(tiny_data)), ("clsp.py", tiny(tiny_data, "--lam", "0"))]:
        proc = run(script, *flags, "--out", "runs/x.pt", cwd=tmp_path, check=False)
        assert proc.returncode != 0 and "cannot write runs/x.pt" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and "step " not in proc.stdout and "epoch " not in proc.stdout


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

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")
    with monkeypatch.context() as m:
        m.setattr(json, "dump", no_space)
        with pytest.raises(SystemExit) as e:
            evaluate.main(["--preset", "tiny", "--device", "cpu"])
    assert "No space left on device" in str(e.value) and "may be full" in str(e.value)
    assert {f: open(os.path.join("runs", f), "rb").read() for f in before} == before
    assert not glob.glob("runs/*.tmp*")


def test_a_file_that_is_not_an_artifact_is_refused(tmp_path, tiny_data):
    torch.save(torch.zeros(3), tmp_path / "f.pt")            # a bare tensor, not a generate.py dict
    proc = run("clsp.py", *tiny(tiny_data, "--synthetic", "f.pt"), cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "f.pt is not a generate.py candidate set" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_ctrl_c_twice_is_one_sentence(tmp_path, tiny_data):
    proc = popen("clsp.py", *tiny(tiny_data, "--lam", "0", "--epochs", "1000"), cwd=tmp_path)
    wait_for(lambda: os.path.exists(tmp_path / "runs" / "clsp.pt"), proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.1)
    proc.send_signal(signal.SIGINT)                          # the second one: quit at once
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "Traceback" not in err and err.strip().startswith(("error:", "stopping")), err
    assert len([line for line in err.splitlines() if line.strip()]) <= 2, err


def test_sigterm_stops_generate_after_a_batch_and_says_how_to_continue(chain, tmp_path):
    root = chain.copy_upto("ddpm.py", tmp_path)
    parts = os.path.join(root, "runs", "synthetic.pt.parts")
    proc = popen("generate.py", "--preset", "tiny", "--batch-size", "2", "--steps", "40", cwd=root)
    wait_for(lambda: os.path.exists(os.path.join(parts, "batch_000000.pt")), proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "rerun the same command to resume" in err and "Traceback" not in err
    assert "batch_000000.pt" in os.listdir(parts)


def test_a_missing_test_split_is_found_by_stage_1(tmp_path):
    d = make_image_folder(str(tmp_path / "d"))
    shutil.rmtree(os.path.join(d, "test"))
    proc = run("ddpm.py", *tiny(d), cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "test" in proc.stderr and "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "runs" / "ddpm.pt")


def test_a_failed_download_leaves_no_folder(tmp_path, monkeypatch):
    import torchvision

    def half_download(root, **kwargs):
        os.makedirs(os.path.join(root, "cifar-10-batches-py"))
        raise RuntimeError("<urlopen error [Errno -3] Temporary failure in name resolution>")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", half_download)
    with pytest.raises(SystemExit, match="could not find or download"):
        common.load_dataset("cifar10", str(tmp_path / "nonexistent"), "train")
    assert not os.path.exists(tmp_path / "nonexistent")


# ---- A newcomer's friction --------------------------------------------------------------------------

def test_no_file_of_the_project_cites_a_file_the_clone_lacks():
    for path in glob.glob(os.path.join(REPO, "*.py")) + glob.glob(os.path.join(REPO, "tests", "*.py")) + \
            [os.path.join(REPO, "README.md")]:
        text = open(path).read()
        for name in ("METHOD" + ".md", "STYLE" + ".md", "../" + "shared"):
            assert name not in text, (path, name)


def test_a_gpu_preset_on_a_cpu_warns_and_points_at_tiny(tmp_path, tiny_data):
    proc = run("ddpm.py", "--preset", "quick", "--dataset", "folder", "--data-dir", tiny_data, "--device", "cpu",
               "--steps", "1", "--batch-size", "2", "--ch", "32", "--sample-steps", "1", cwd=tmp_path)
    assert "warning: the quick preset is sized for a GPU" in proc.stdout and "--preset tiny" in proc.stdout


def test_a_progress_line_is_due_within_seconds_whatever_log_every(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(common.time, "perf_counter", lambda: now[0])
    progress = common.Progress(1000, 0, "step")
    assert not progress.due()
    now[0] += 6                                              # the first line within 5 s
    assert progress.due()
    progress.line(1)
    now[0] += 20
    assert not progress.due()
    now[0] += 11                                             # then at least every 30 s
    assert progress.due()


def test_hints_repeat_the_users_preset_and_data_flags(tmp_path, tiny_data):
    proc = run("generate.py", *tiny(tiny_data), cwd=tmp_path, check=False)
    assert f"run `python ddpm.py --preset tiny --dataset folder --data-dir {tiny_data}` first" in proc.stderr


def test_the_baseline_takes_its_data_from_the_artifacts(chain, tmp_path):
    root = chain.copy_upto("generate.py", tmp_path)
    proc = run("clsp.py", "--preset", "tiny", "--lam", "0", "--out", "runs/clsp_lam0.pt", cwd=root)
    assert "as in runs/synthetic.pt" in proc.stdout
    ckpt = torch.load(os.path.join(root, "runs", "clsp_lam0.pt"), weights_only=True)
    syn = torch.load(os.path.join(root, "runs", "synthetic.pt"), weights_only=True)
    assert ckpt["data"] == syn["data"] and ckpt["synthetic"] is None


def test_the_folder_cache_is_one_file_per_split_and_size(tmp_path):
    d = make_image_folder(str(tmp_path / "d"))
    x1, _, _ = common.load_dataset("folder", d, "train", 16)
    image = os.path.join(d, "train", "class0", "000.png")
    os.utime(image, (time.time() + 10, time.time() + 10))    # a file changed: the cache is rebuilt
    x2, _, _ = common.load_dataset("folder", d, "train", 16)
    common.load_dataset("folder", d, "train", 8)
    assert torch.equal(x1, x2)
    assert sorted(f for f in os.listdir(d) if f.startswith(".")) == [".clsp_cache_train_16px.pt",
                                                                     ".clsp_cache_train_8px.pt"]


def test_the_w_sweep_names_its_columns(chain):
    from PIL import Image
    img = Image.open(os.path.join(chain.upto("generate.py"), "runs", "synthetic_w_sweep.png")).convert("L")
    header = torch.from_numpy(np.asarray(img)[:14].copy())
    assert (header >= 250).float().mean() > 0.8            # a white header above the tiles ...
    assert (header < 128).sum() > 50                       # ... with dark text on it: the w labels
