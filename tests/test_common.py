"""Tests of common.py, the plumbing the four stages share, called in this process on small inputs: the
data sets (the image folder and its cache, CIFAR's offline error, labels numbered by the training classes),
the data fingerprint, the seeded epoch order, the commands hints give, the precision switch, one-sentence
failures, the start-up signal handler and a second Ctrl-C's sentence, the lock on an output, the eager
fallback of a failed compile, and the progress and heartbeat lines.

The faults a user meets running a whole script (a second run at once, a kill, a full disk, a hint to
paste) are in test_faults.py; this file checks the pieces of common.py those scripts are built from.
"""

import copy
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import common
from conftest import REPO, make_image_folder


# ---- The data sets: the image folder, CIFAR, labels from the training classes ------------------------

def test_folder_loader(tiny_data):
    x, y, classes = common.load_dataset("folder", tiny_data, "train", 16)
    assert x.dtype == torch.uint8 and x.shape == (64, 3, 16, 16)
    assert classes == ["class0", "class1", "class2", "class3"] and torch.equal(torch.bincount(y), torch.full((4,), 16))
    x2, y2, _ = common.load_dataset("folder", tiny_data, "train", 16)          # second time: from the cache
    assert torch.equal(x, x2) and torch.equal(y, y2)


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


def test_cifar_offline_gives_a_clear_error(tmp_path, monkeypatch):
    import torchvision

    def no_network(*args, **kwargs):
        raise RuntimeError("<urlopen error [Errno -3] Temporary failure in name resolution>")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", no_network)
    with pytest.raises(SystemExit, match="could not find or download cifar10.*--dataset folder"):
        common.load_dataset("cifar10", str(tmp_path), "train")


def test_a_failed_download_leaves_no_folder(tmp_path, monkeypatch):
    """Not even the parents it made: --data-dir a/b used to leave a/ behind (torchvision makes both)."""
    import torchvision

    def half_download(root, **kwargs):
        os.makedirs(os.path.join(root, "cifar-10-batches-py"))
        raise RuntimeError("<urlopen error [Errno -3] Temporary failure in name resolution>")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", half_download)
    with pytest.raises(SystemExit, match="could not find or download"):
        common.load_dataset("cifar10", str(tmp_path / "nonexistent"), "train")
    assert not os.path.exists(tmp_path / "nonexistent")
    with pytest.raises(SystemExit, match="could not find or download"):
        common.load_dataset("cifar10", str(tmp_path / "a" / "b"), "train")
    assert os.listdir(tmp_path) == []
    (tmp_path / "kept").mkdir()                              # a folder that was there before stays
    with pytest.raises(SystemExit):
        common.load_dataset("cifar10", str(tmp_path / "kept" / "b"), "train")
    assert os.listdir(tmp_path) == ["kept"] and os.listdir(tmp_path / "kept") == []


# ---- The folder cache: one file per split and size, never stale, no temporary file left --------------

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


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid                                          # ended, and (almost surely) not reused yet


def test_a_cache_save_cut_short_leaves_no_temporary_file(tmp_path):
    d = make_image_folder(str(tmp_path / "d"))
    stale = os.path.join(d, f".clsp_cache_train_16px.pt.tmp{dead_pid()}")
    live = os.path.join(d, f".clsp_cache_train_16px.pt.tmp{os.getppid()}")  # a live run that is saving it
    for path in (stale, live):
        open(path, "wb").write(b"x" * 1000)
    common.load_dataset("folder", d, "train", 16)
    assert not os.path.exists(stale) and os.path.exists(live)
    os.remove(live)
    open(stale, "wb").write(b"x" * 1000)
    common.load_dataset("folder", d, "train", 16)            # the cache is valid: the temporary goes too
    assert sorted(f for f in os.listdir(d) if f.startswith(".")) == [".clsp_cache_train_16px.pt"]


def test_a_cache_save_cut_short_at_another_size_is_removed_too(tmp_path):
    """The README: the next run that reads the folder removes a temporary file a killed cache save left,
    whatever split and size that save was for."""
    d = make_image_folder(str(tmp_path / "d"), n_train=2, n_test=1)
    stale = [os.path.join(d, f".clsp_cache_{split}_{size}px.pt.tmp{dead_pid()}")
             for split, size in (("train", 32), ("test", 8))]
    live = os.path.join(d, f".clsp_cache_train_32px.pt.tmp{os.getppid()}")   # a live run saving it
    for path in stale + [live]:
        open(path, "wb").write(b"x" * 100)
    common.load_dataset("folder", d, "train", 16)
    assert not any(map(os.path.exists, stale)) and os.path.exists(live)


def test_the_cache_never_stands_in_for_changed_images(tmp_path):
    """A file replaced by another of the same size, with its old times (what `tar x` or `rsync -a` can
    give): the data is what the files hold now, with its own fingerprint."""
    from PIL import Image
    d = tmp_path / "d"
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in range(2):
            (d / split / f"c{c}").mkdir(parents=True)
            for i in range(3):                                # BMP: the same size for every 16x16 image
                pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(d / split / f"c{c}" / f"{i}.bmp")
    x1, y1, classes = common.load_dataset("folder", str(d), "train", 16)
    target, other = d / "train" / "c0" / "0.bmp", d / "train" / "c1" / "2.bmp"
    st = os.stat(target)
    target.write_bytes(other.read_bytes())
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.path.getsize(target) == st.st_size
    x2, y2, _ = common.load_dataset("folder", str(d), "train", 16)
    assert torch.equal(x2[0], x1[-1]) and not torch.equal(x2, x1)
    assert common.data_info("folder", x2, y2, classes) != common.data_info("folder", x1, y1, classes)


# ---- The data fingerprint: the pixels and the labels ------------------------------------------------

@pytest.mark.usefixtures("one_thread")
def test_the_fingerprint_changes_with_the_labels_alone():
    """The fingerprint hashes every pixel and every label: the same images under other labels are other
    data (a model trained on them learnt other classes), and so are other pixels under the same labels."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (12, 3, 8, 8), dtype=torch.uint8, generator=g)
    y = torch.arange(12) % 3
    classes = ["a", "b", "c"]
    info = common.data_info("folder", x, y, classes)
    assert common.data_info("folder", x.clone(), y.clone(), classes) == info         # a function of the data
    shuffled = y[torch.randperm(12, generator=g)]
    assert not torch.equal(shuffled, y) and torch.equal(shuffled.bincount(), y.bincount())   # same counts
    other_labels = common.data_info("folder", x, shuffled, classes)
    assert other_labels["fingerprint"] != info["fingerprint"]
    assert {**other_labels, "fingerprint": None} == {**info, "fingerprint": None}   # only the fingerprint tells
    other_pixels = x.clone()
    other_pixels[5, 1, 2, 3] ^= 1
    assert common.data_info("folder", other_pixels, y, classes)["fingerprint"] != info["fingerprint"]


def test_a_folder_whose_labels_changed_is_refused_by_the_next_stage(chain, tmp_path, monkeypatch):
    """One training image moved to another class folder, so the images load in the same order, pixel for
    pixel, under other labels: generate.py refuses the DDPM trained on the folder as it was."""
    import generate
    root = chain.copy_upto("ddpm.py", tmp_path / "chain")
    moved = str(tmp_path / "moved")
    shutil.copytree(chain.data, moved, ignore=shutil.ignore_patterns(".clsp_cache_*"))
    # class0 holds 000.png ... 015.png: zzz.png sorts after them, just before class1's 001.png.
    os.rename(os.path.join(moved, "train", "class1", "000.png"), os.path.join(moved, "train", "class0", "zzz.png"))
    x, y, classes = common.load_dataset("folder", chain.data, "train", 16)
    x2, y2, classes2 = common.load_dataset("folder", moved, "train", 16)
    assert torch.equal(x2, x) and classes2 == classes and not torch.equal(y2, y)   # the same images, relabelled
    monkeypatch.chdir(root)
    with pytest.raises(SystemExit) as e:
        generate.main(["--preset", "tiny", "--device", "cpu", "--data-dir", moved])
    assert "may have changed" in str(e.value) and "fingerprint" in str(e.value), str(e.value)
    assert not os.path.exists(os.path.join(root, "runs", "synthetic.pt"))


# ---- The epoch order: a new shuffle each epoch, the same one for the same seed ------------------------

@pytest.mark.usefixtures("one_thread")
def test_each_epoch_is_a_new_shuffle_and_a_seed_repeats_it():
    """EpochOrder(N, B, seed): each epoch visits N // B full batches of distinct images (drop_last), in an
    order of its own, so over the epochs every image is seen; the same seed gives the same order, also to
    an order made afresh and asked for a later step first (what a resumed run does); another seed another."""
    N, B, epochs = 10, 3, 8
    order = common.EpochOrder(N, B, 7, "cpu")
    assert order.steps_per_epoch == N // B
    seen = []
    for e in range(epochs):
        batches = [order.batch(e * order.steps_per_epoch + i) for i in range(order.steps_per_epoch)]
        assert all(b.shape == (B,) for b in batches)
        epoch = torch.cat(batches).tolist()
        assert len(set(epoch)) == len(epoch) == (N // B) * B and all(0 <= i < N for i in epoch), (e, epoch)
        seen.append(epoch)
    assert len({tuple(epoch) for epoch in seen}) == epochs                 # no two epochs in the same order
    assert set(sum(seen, [])) == set(range(N))                             # the dropped image changes too
    resumed = common.EpochOrder(N, B, 7, "cpu")
    step = 5 * order.steps_per_epoch + 2                                   # epoch 5, its third batch
    assert resumed.batch(step).tolist() == seen[5][2 * B:3 * B]
    assert [resumed.batch(s).tolist() for s in range(order.steps_per_epoch)] == \
        [seen[0][i * B:(i + 1) * B] for i in range(order.steps_per_epoch)]
    other = common.EpochOrder(N, B, 8, "cpu")
    assert [other.batch(s).tolist() for s in range(order.steps_per_epoch)] != \
        [seen[0][i * B:(i + 1) * B] for i in range(order.steps_per_epoch)]


# ---- Hints: the command to paste names the file it is to write ------------------------------------

def test_a_hint_command_names_the_file_it_is_to_write():
    args = type("Args", (), dict(preset="tiny", dataset="folder", data_dir="d", image_size=None))()
    assert common.command("ddpm.py", args, out="runs/ddpm.pt", default_out="runs/ddpm.pt") == \
        "`python ddpm.py --preset tiny --dataset folder --data-dir d`"
    assert common.command("ddpm.py", args, out="runs/x.pt", default_out="runs/ddpm.pt") == \
        "`python ddpm.py --preset tiny --dataset folder --data-dir d --out runs/x.pt`"
    # a flag the hint sets replaces the user's flag of that name, never repeats it
    assert common.command("ddpm.py", args, "--data-dir", "e") == \
        "`python ddpm.py --preset tiny --dataset folder --data-dir e`"


# ---- Precision follows the device --------------------------------------------------------------------

def test_autocast_dtype_follows_the_gpu(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda")   # a device object needs no GPU
    assert common.autocast_dtype("auto", cpu) is None
    for capability, dtype in [((7, 0), torch.float16), ((7, 5), torch.float16),      # V100, T4
                              ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)]:   # A100, H100
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        assert common.autocast_dtype("auto", gpu) == dtype
    assert [common.autocast_dtype(p, gpu) for p in ("bf16", "fp16", "fp32")] == [torch.bfloat16, torch.float16, None]


# ---- Failing clearly: one sentence, and Ctrl-C left alone outside the scripts ------------------------

def test_out_of_gpu_memory_is_one_sentence_that_says_what_to_change():
    def main(argv):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    with pytest.raises(SystemExit, match=r"^error: out of GPU memory .*; rerun with a smaller --batch-size$"):
        common.run_main(main, [], "rerun with a smaller --batch-size")


def test_the_start_up_handler_is_only_for_the_four_scripts(tmp_path):
    """Imported from a notebook, `python -c` or another script, Ctrl-C stays a KeyboardInterrupt."""
    code = "import signal, common; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"
    for cwd in (REPO, os.path.join(REPO, "tests")):
        proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": REPO})
        assert proc.stdout.strip() == "True", (cwd, proc.stdout, proc.stderr)


# ---- A second Ctrl-C says what was saved --------------------------------------------------------------

def test_a_second_ctrl_c_says_what_was_saved(tmp_path):
    args = type("Args", (), dict(preset="tiny", dataset=None, data_dir=None, image_size=None,
                                 out=str(tmp_path / "c.pt")))()
    hint = common.resume_hint("ddpm.py", args)
    assert hint() == "no checkpoint was saved yet: run the same command again"
    open(args.out, "wb").write(b"a checkpoint")
    assert f"continue with `python ddpm.py --preset tiny --resume --out {args.out}`" in hint()
    os.remove(args.out)
    with common.StopFlag(hint) as stop:
        os.kill(os.getpid(), signal.SIGINT)               # the first: stop at the end of the step
        deadline = time.monotonic() + 600
        while not stop.requested and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(SystemExit) as e:
            os.kill(os.getpid(), signal.SIGINT)           # the second: at once, saying what there is
            time.sleep(600)
    assert str(e.value) == "error: stopped at once by Ctrl-C; no checkpoint was saved yet: run the same command again"


# ---- One run per output: the lock --------------------------------------------------------------------

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


# ---- A failed compile: the eager repeat starts from the state before it ------------------------------

def test_a_repeated_call_after_a_failed_compile_keeps_batchnorm_statistics_and_randomness():
    """A compiled forward can update BatchNorm's running statistics and draw random numbers before a later
    compiled part fails (MoCo's key encoder is compiled apart from the query encoder): the eager repeat
    must start from the state before the failed call, or the run would not give the eager results."""
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm1d(3)
    x = torch.randn(8, 3)

    def step():
        bn(x + torch.rand(1))                             # a draw, then BatchNorm's update
        return bn.running_mean.clone()

    def half_compiled():
        step()
        raise RuntimeError("CUDA graph capture failed")   # after the buffers and the RNG moved

    eager_bn = copy.deepcopy(bn)
    torch.manual_seed(1)
    want = step()
    bn.load_state_dict(eager_bn.state_dict())
    torch.manual_seed(1)
    got = common.with_eager_fallback(half_compiled, lambda: step, "test step", torch.device("cpu"), [bn])()
    assert torch.equal(got, want) and int(bn.num_batches_tracked) == 1


# ---- Progress lines: a slow run is never silent for long ---------------------------------------------

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


def test_a_compile_shows_it_is_alive(capsys):
    """A CPU compile was silent for 257 s: now a line every few seconds until the first step is done."""
    progress = common.Progress(10, 0, "step", warming=True, heartbeat=0.05)
    lines, deadline = [], time.time() + 600                 # waits for three lines, not for a time: on a busy
    while len(lines) < 3 and time.time() < deadline:        # machine the heartbeat thread may run late
        time.sleep(0.05)
        lines += capsys.readouterr().out.splitlines()
    progress.warmed_up(1, "compile")
    assert len(lines) >= 3 and all("still compiling" in line and "so far" in line for line in lines)
    time.sleep(1.0)                                         # 20 heartbeats
    late = capsys.readouterr().out.splitlines()             # at most the one on its way as the compile ended
    assert len(late) <= 1 and all("still compiling" in line for line in late), late
    time.sleep(0.5)
    assert capsys.readouterr().out == ""                    # quiet once compiled
    import logging
    common.compile_enabled(True, torch.device("cpu"))       # and no "No CUDA runtime is found" on a CPU
    assert logging.getLogger("torch.utils.cpp_extension").getEffectiveLevel() >= logging.ERROR


def test_work_that_prints_nothing_for_long_is_named_by_heartbeat_lines(capsys):
    progress = common.Progress(10, 0, "epoch", heartbeat=0.05)
    progress.line(1)
    out = ""
    with progress.doing("the kNN check"):
        deadline = time.monotonic() + 600                  # a hang detector, not a speed check
        while "still the kNN check" not in out and time.monotonic() < deadline:
            time.sleep(0.02)
            out += capsys.readouterr().out
    # the time so far as fmt_time writes it (0m00s here, or more when a busy machine ran the thread late)
    assert re.search(r"^  \.\.\. still the kNN check, \d+m\d\ds so far$", out, re.M), out
    progress.line(2)
    capsys.readouterr()
    time.sleep(1.0)                                         # 20 heartbeats
    late = capsys.readouterr().out.splitlines()             # at most the one on its way as the block ended
    assert len(late) <= 1 and all("still the kNN check" in line for line in late), late
    time.sleep(0.5)
    assert capsys.readouterr().out == ""                    # nothing named: the loop's own lines only
