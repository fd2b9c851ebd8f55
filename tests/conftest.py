"""Shared test fixtures: a tiny image folder and a tiny STL-10 made on the spot, and the four scripts run as a
user runs them.

Everything runs on the CPU with no network: the data set is a folder of coloured-noise PNGs
(32x32; the tiny preset resizes them to 16x16) whose four classes differ in colour, so a model can learn something in a few steps.
"""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)          # so tests can `import ddpm`, `import generate`, ...

COLOURS = [(220, 40, 40), (40, 200, 40), (40, 40, 220), (220, 220, 40)]


def make_image_folder(root, n_train=16, n_test=4, size=32, seed=0):
    """DIR/train/classK/*.png and DIR/test/classK/*.png: four colours plus noise."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for c, colour in enumerate(COLOURS):
            d = os.path.join(root, split, f"class{c}")
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                img = np.clip(np.array(colour)[None, None] + rng.normal(0, 40, (size, size, 3)), 0, 255)
                Image.fromarray(img.astype(np.uint8)).save(os.path.join(d, f"{i:03d}.png"))
    return root


def make_stl10(root, n_unlabeled=64, n_train=8, n_test=4, seed=0):
    """A tiny STL-10 in its own binary layout, as torchvision's download unpacks it: root/stl10_binary/ with
    {unlabeled,train,test}_X.bin (uint8, 3 x 96 x 96 an image, each channel stored column by column),
    {train,test}_y.bin (one byte an image, the class 1..10) and class_names.txt. The images are coloured
    noise, one colour per class (four classes of STL-10's ten are used; the unlabeled images take the same
    colours). Returns root and the images as written, [N, 3, 96, 96] rows by rows, with their labels 0..9."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "stl10_binary")
    os.makedirs(folder, exist_ok=True)
    written = {}
    for split, n in (("unlabeled", n_unlabeled), ("train", n_train * len(COLOURS)), ("test", n_test * len(COLOURS))):
        y = np.arange(n) % len(COLOURS) if split != "unlabeled" else rng.integers(0, len(COLOURS), n)
        x = np.clip(np.array(COLOURS)[y][:, :, None, None] + rng.normal(0, 40, (n, 3, 96, 96)), 0, 255).astype(np.uint8)
        np.ascontiguousarray(x.transpose(0, 1, 3, 2)).tofile(os.path.join(folder, f"{split}_X.bin"))   # columns
        if split != "unlabeled":
            (y + 1).astype(np.uint8).tofile(os.path.join(folder, f"{split}_y.bin"))
        written[split] = (x, y)
    with open(os.path.join(folder, "class_names.txt"), "w") as f:
        f.write("\n".join(["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]) + "\n")
    return root, written


def run(script, *args, cwd, check=True, timeout=1800, gpu=False):
    """Run `python <script> <args>` in cwd exactly as a user would, on the CPU unless gpu=True. The timeout
    is a hang detector, not a speed check: on a 2-core machine kept busy by two other processes, a test of
    two generate.py runs (test_faults.py's SIGTERM after the last batch) took six minutes in all."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if not gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run([sys.executable, os.path.join(REPO, script), *map(str, args)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} failed ({proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def one_thread():
    """Tiny tensors: on a busy 2-core machine, two OpenMP threads per op made the probe tests 100x slower
    (100 ms per step instead of 1 ms) than one thread. Used by the modules of small-tensor unit tests."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A tiny image folder: 4 classes x 16 training and 4 test images, 32x32."""
    return make_image_folder(str(tmp_path_factory.mktemp("tiny_data")))


class Chain:
    """The pipeline run once per test session with --preset tiny, each stage only when a test needs it.

    chain.upto("generate.py") returns a directory whose runs/ holds ddpm.pt and synthetic.pt.
    Tests that change or delete artifacts must work on a copy: chain.copy_upto(stage, dest).
    """

    STAGES = ["ddpm.py", "generate.py", "clsp.py", "evaluate.py"]
    MAKES = {"ddpm.py": "ddpm", "generate.py": "synthetic", "clsp.py": "clsp", "evaluate.py": "eval"}  # file prefixes

    def __init__(self, root, data):
        self.root, self.data, self.done = root, data, set()

    def upto(self, stage):
        for s in self.STAGES[: self.STAGES.index(stage) + 1]:
            if s not in self.done:
                run(s, "--preset", "tiny", "--dataset", "folder", "--data-dir", self.data, cwd=self.root)
                self.done.add(s)
        return self.root

    def copy_upto(self, stage, dest):
        """A copy of runs/ holding the artifacts of the stages up to `stage` only (later ones may exist
        in the shared chain when another test needed them first)."""
        self.upto(stage)
        keep = tuple(self.MAKES[s] for s in self.STAGES[: self.STAGES.index(stage) + 1])
        os.makedirs(os.path.join(dest, "runs"), exist_ok=True)
        for f in os.listdir(os.path.join(self.root, "runs")):
            if f.startswith(keep):
                shutil.copy2(os.path.join(self.root, "runs", f), os.path.join(dest, "runs", f))
        return str(dest)


@pytest.fixture(scope="session")
def chain(tmp_path_factory, tiny_data):
    return Chain(str(tmp_path_factory.mktemp("chain")), tiny_data)


@pytest.fixture(scope="session")
def tiny_stl10(tmp_path_factory):
    """A tiny STL-10 (make_stl10): 64 unlabeled, 32 labelled training and 16 test images."""
    return make_stl10(str(tmp_path_factory.mktemp("tiny_stl10")))


@pytest.fixture
def traced_compile(monkeypatch):
    """torch.compile as the scripts call it, but with the aot_eager backend and fullgraph=True: dynamo
    and AOTAutograd trace the function as inductor would (any graph break fails), without inductor's
    C++ build, so a test of the compiled path takes seconds on a CPU."""
    import torch
    real = torch.compile

    def compile(fn=None, *, mode=None, **kwargs):
        return real(fn, backend="aot_eager", fullgraph=True)
    monkeypatch.setattr(torch, "compile", compile)
    return real
