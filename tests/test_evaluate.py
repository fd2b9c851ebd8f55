"""Tests of stage 4 (evaluate.py): the two classifiers against independent computations, and the whole
tiny pipeline as a user runs it, including what happens when a stage is run before its input exists."""

import glob
import json
import math
import os
import shutil

import pytest
import torch

from conftest import make_image_folder, run
from clsp import knn_predict
from evaluate import linear_probe


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py: tiny tensors, one thread


# ------------------------------------------------------------------------------------------------
# kNN: the vectorised, chunked version against a float64 brute force written with plain loops.
# ------------------------------------------------------------------------------------------------

def knn_reference(f_query, f_train, y_train, num_classes, k, temp, exclude=None):
    """For each query: cosine similarity to every training point, the k largest, sum exp(sim / T) per class."""
    preds = []
    for i in range(f_query.shape[0]):
        q = f_query[i].double()
        sims = []
        for j in range(f_train.shape[0]):
            if exclude is not None and j in exclude[i].view(-1).tolist():
                continue
            t = f_train[j].double()
            sims.append((float(q @ t / (q.norm() * t.norm())), int(y_train[j])))
        sims.sort(key=lambda p: -p[0])
        votes = [0.0] * num_classes
        for sim, label in sims[:k]:                      # fewer than k points: all of them vote
            votes[label] += math.exp(sim / temp)
        preds.append(max(range(num_classes), key=lambda c: votes[c]))
    return torch.tensor(preds)


@pytest.mark.parametrize("k,temp", [(1, 0.1), (7, 0.1), (20, 0.5), (500, 0.1)])
def test_knn_matches_float64_brute_force(k, temp):
    g = torch.Generator().manual_seed(k)
    C = 5
    centres = torch.randn(C, 16, generator=g)
    y_train = torch.randint(0, C, (60,), generator=g)
    f_train = centres[y_train] + 1.5 * torch.randn(60, 16, generator=g)    # overlapping classes: votes matter
    f_query = centres[torch.randint(0, C, (40,), generator=g)] + 1.5 * torch.randn(40, 16, generator=g)
    got = knn_predict(f_query, f_train, y_train, C, k, temp, chunk=16)     # 3 chunks, the last one short
    want = knn_reference(f_query, f_train, y_train, C, k, temp)
    assert torch.equal(got, want)
    # Leaving one training point out per query (the anchor of a synthetic candidate).
    exclude = torch.randint(0, 60, (40,), generator=g)
    got = knn_predict(f_query, f_train, y_train, C, k, temp, exclude=exclude, chunk=16)
    assert torch.equal(got, knn_reference(f_query, f_train, y_train, C, k, temp, exclude))
    # Two left out per query (a nearest neighbour and its anchor, in evaluate.py's diagnostics).
    exclude2 = torch.stack([exclude, (exclude + 1 + torch.randint(0, 58, (40,), generator=g)) % 60], 1)
    got = knn_predict(f_query, f_train, y_train, C, k, temp, exclude=exclude2, chunk=16)
    assert torch.equal(got, knn_reference(f_query, f_train, y_train, C, k, temp, exclude2))


def test_knn_excluded_point_never_votes():
    # Every query is a copy of a training point whose label is unique: kNN with k = 1 finds it,
    # unless it is excluded, and then it must not.
    f_train = torch.eye(4)
    y_train = torch.tensor([0, 1, 2, 3])
    assert torch.equal(knn_predict(f_train, f_train, y_train, 4, 1, 0.1), y_train)
    pred = knn_predict(f_train, f_train, y_train, 4, 1, 0.1, exclude=torch.arange(4))
    assert not torch.equal(pred, y_train) and (pred != y_train).all()


# ------------------------------------------------------------------------------------------------
# The linear probe: it learns what is linearly there, and nothing more.
# ------------------------------------------------------------------------------------------------

def gaussian_classes(n, centres, g, noise=1.0):
    y = torch.randint(0, centres.shape[0], (n,), generator=g)
    return centres[y] + noise * torch.randn(n, centres.shape[1], generator=g), y


def test_probe_separates_separable_classes():
    g = torch.Generator().manual_seed(0)
    centres = 4 * torch.randn(4, 32, generator=g)
    f_train, y_train = gaussian_classes(400, centres, g)
    f_flip = f_train + 0.1 * torch.randn(400, 32, generator=g)              # "mirror images": close by
    f_test, y_test = gaussian_classes(300, centres, g)
    top1, loss = linear_probe(f_train, f_flip, y_train, f_test, y_test, 4, epochs=100, batch_size=256,
                              log_every=1000)
    assert top1 > 98 and loss < 0.1


def test_probe_trains_on_plain_and_mirrored_features():
    # The class is in the first 16 dimensions of the plain features and in the last 16 of the mirrored
    # ones (noise elsewhere). A probe that sees both, each with p 0.5, classifies test points of either
    # kind; one that skipped the flips (or always flipped) would be at chance on one of the two kinds.
    g = torch.Generator().manual_seed(2)
    centres = 4 * torch.randn(4, 16, generator=g)

    def split_features(n, mirrored):
        signal, y = gaussian_classes(n, centres, g)
        noise = torch.randn(n, 16, generator=g)
        return (torch.cat([noise, signal], 1) if mirrored else torch.cat([signal, noise], 1)), y

    f_plain, y_train = split_features(400, mirrored=False)
    f_mirror = torch.cat([torch.randn(400, 16, generator=g), f_plain[:, :16]], 1)   # same images, mirrored
    for mirrored in (False, True):
        f_test, y_test = split_features(300, mirrored)
        top1, _ = linear_probe(f_plain, f_mirror, y_train, f_test, y_test, 4, log_every=1000)
        assert top1 > 90, mirrored


def test_probe_is_at_chance_on_random_labels():
    # Random features with random labels: the probe can memorise the training set, but on held-out data
    # it must be at chance (25% for 4 classes; 2000 test points: one standard deviation is ~1%).
    g = torch.Generator().manual_seed(1)
    f_train, y_train = torch.randn(400, 32, generator=g), torch.randint(0, 4, (400,), generator=g)
    f_test, y_test = torch.randn(2000, 32, generator=g), torch.randint(0, 4, (2000,), generator=g)
    top1, _ = linear_probe(f_train, f_train.clone(), y_train, f_test, y_test, 4, epochs=100, batch_size=256,
                           log_every=1000)
    assert 20 < top1 < 30


# ------------------------------------------------------------------------------------------------
# The linear probe's mirror images, and the diagnostics' nearest neighbour (NNCLR's positive).
# ------------------------------------------------------------------------------------------------

def test_the_probes_mirror_images_are_left_right_mirrors(tmp_path, monkeypatch):
    """evaluate.py hands the probe, beside each training image's features, those of its horizontal mirror
    image (the probe's only augmentation): exactly the features evaluate.py finds for a folder holding
    the same images mirrored left to right by PIL, not upside down (the width axis of NCHW, not the height)."""
    from PIL import Image, ImageOps
    import clsp
    import evaluate
    make_image_folder(str(tmp_path / "data"), n_train=4, n_test=1, size=8)
    for split in ("train", "test"):                             # the same folder, each image mirrored
        for path in glob.glob(str(tmp_path / "data" / split / "*" / "*.png")):
            out = path.replace(str(tmp_path / "data"), str(tmp_path / "mirrored"))
            os.makedirs(os.path.dirname(out), exist_ok=True)
            ImageOps.mirror(Image.open(path)).save(out)
    monkeypatch.chdir(tmp_path)
    clsp.main(["--preset", "tiny", "--image-size", "8", "--batch-size", "8", "--knn-every", "0", "--lam", "0",
               "--epochs", "1", "--dataset", "folder", "--data-dir", "data", "--device", "cpu"])
    handed = []

    def recording_probe(f_train, f_train_flip, *args, **kwargs):
        handed.append((f_train, f_train_flip))
        return 50.0, 1.0                                        # its own accuracy is tested above
    monkeypatch.setattr(evaluate, "linear_probe", recording_probe)
    for name in ("data", "mirrored"):
        evaluate.main(["--preset", "tiny", "--data-dir", name, "--synthetic", "none", "--device", "cpu",
                       "--out", f"runs/eval_{name}.json"])
    (plain, flipped), (of_mirrored, _) = handed
    torch.testing.assert_close(flipped, of_mirrored, rtol=1e-4, atol=1e-5)
    assert (flipped - plain).abs().max() > 1e-3                 # a mirror image has features of its own


def test_nnclrs_positive_is_the_training_image_of_highest_cosine(monkeypatch):
    """NNCLR's positive in evaluate.py's diagnostics: the training image whose features have the highest
    cosine similarity with those of a view of the anchor (the anchor itself left out). Each anchor here has
    a neighbour of its own class at cosine 0.995 but a small norm, and one of another class at cosine 0.71
    with a large norm, the highest dot product: the true-label agreement is 100 %, not 0 %.

    A stand-in backbone makes this exact: its features are an image's mean colour (every image here has
    one colour), and the views are the images themselves (the augmentation is replaced)."""
    import evaluate
    colours = [(200, 0, 0), (255, 255, 0), (77, 8, 0), (0, 0, 200), (0, 255, 255), (0, 8, 77)]
    y_train = torch.tensor([0, 1, 0, 1, 0, 1])
    # anchor 0 (red): image 1 (cos 0.71, dot 1.0, class 1) against image 2 (cos 0.995, dot 0.30, class 0);
    # anchor 3 (blue): image 4 (cos 0.71, dot 1.0, class 0) against image 5 (cos 0.995, dot 0.30, class 1).
    x_train = torch.tensor(colours, dtype=torch.uint8).view(6, 3, 1, 1).expand(6, 3, 8, 8).contiguous()

    class MeanColour(torch.nn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3))
    monkeypatch.setattr(evaluate, "augment", lambda x, size, mean, std, generator=None, base="simclr":
                        (x.float() / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1))
    mean, std = torch.zeros(3), torch.ones(3)                   # features: the colour / 255
    f_train = x_train.float().mean(dim=(2, 3)) / 255
    cos = torch.nn.functional.normalize(f_train, dim=1) @ torch.nn.functional.normalize(f_train, dim=1).T
    dot = f_train @ torch.nn.functional.normalize(f_train, dim=1).T
    assert cos[[0, 3], [2, 5]].min() > 0.99 and (cos[[0, 3], [1, 4]] - 2 ** -0.5).abs().max() < 1e-6
    assert (dot[[1, 4], [0, 3]] > 3 * dot[[2, 5], [0, 3]]).all()   # the dot product would pick 1 and 4
    syn = dict(images=x_train[[0, 3]].unsqueeze(1), anchor_index=torch.tensor([0, 3]))   # K = 1
    data = dict(x_train=x_train, y_train=y_train, C=2, mean=mean, std=std)
    s = dict(seed=0, diag_anchors=2, image_size=8, batch_size=64, knn_k=3, knn_temp=0.1)
    diag = evaluate.diagnose_candidates(syn, MeanColour(), f_train, None, data, s, None)
    assert diag["neighbour_true_label_agreement"] == 100.0, diag
    assert diag["cos_anchor_neighbour"] == pytest.approx(float(cos[0, 2]), abs=1e-5), diag


# ------------------------------------------------------------------------------------------------
# The pipeline as a user meets it.
# ------------------------------------------------------------------------------------------------

def check_eval_json(path):
    with open(path) as f:
        result = json.load(f)
    for key in ("knn_top1", "linear_top1", "knn_top1_by_k_chosen_on_test", "transfer", "data",
                "synthetic_diagnostics", "settings", "made_from", "seconds"):
        assert key in result, key
    for acc in [result["knn_top1"], result["linear_top1"], *result["knn_top1_by_k_chosen_on_test"].values()]:
        assert 0 <= acc <= 100
    return result


def test_tiny_chain_ends_with_eval_json(chain):
    # `python ddpm.py && python generate.py && python clsp.py && python evaluate.py`, each with
    # --preset tiny --dataset folder --data-dir DIR, as four commands in one fresh directory.
    root = chain.upto("evaluate.py")
    result = check_eval_json(os.path.join(root, "runs", "eval.json"))
    assert result["transfer"] is False
    assert result["data"]["num_classes"] == 4 and result["data"]["num_train"] == 64
    assert result["made_from"]["checkpoint"]["path"] == "runs/clsp.pt"
    assert result["made_from"]["synthetic"]["path"] == "runs/synthetic.pt"
    diag = result["synthetic_diagnostics"]                   # runs/synthetic.pt is there: measured
    assert -1 <= diag["cos_anchor_candidate"] <= 1 and -1 <= diag["cos_two_views"] <= 1
    assert 0 <= diag["candidate_label_agreement"] <= 100


@pytest.mark.parametrize("script,first", [("generate.py", "ddpm.py"), ("clsp.py", "generate.py"),
                                          ("evaluate.py", "clsp.py")])
def test_stage_before_its_input_names_the_script_to_run(script, first, tmp_path, tiny_data):
    proc = run(script, "--preset", "tiny", "--dataset", "folder", "--data-dir", tiny_data, cwd=tmp_path,
               check=False)
    assert proc.returncode != 0
    assert f"python {first}" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr                    # one sentence, not a stack trace
    assert not os.path.exists(tmp_path / "runs") or not os.listdir(tmp_path / "runs")


def test_transfer_to_another_data_set(chain, tmp_path):
    # The tiny backbone (4 classes) probed on another folder with 3 classes: a transfer experiment.
    other = make_image_folder(str(tmp_path / "other"), seed=1)
    for split in ("train", "test"):
        shutil.rmtree(os.path.join(other, split, "class3"))
    runs = os.path.join(chain.upto("evaluate.py"), "runs")
    (tmp_path / "runs").mkdir()
    shutil.copy(os.path.join(runs, "eval.json"), tmp_path / "runs" / "eval_same_data.json")
    (tmp_path / "runs" / "eval_junk.json").write_text('{"old": 1}')
    proc = run("evaluate.py", "--preset", "tiny", "--dataset", "folder", "--data-dir", other,
               "--checkpoint", os.path.join(runs, "clsp.pt"), "--synthetic", os.path.join(runs, "synthetic.pt"),
               cwd=tmp_path)
    # Both results, this one and the one already in runs/, end the output as one table; junk is skipped.
    table = proc.stdout[proc.stdout.index("all results in"):]
    assert "| eval.json |" in table and "| eval_same_data.json |" in table and "junk" not in table
    result = check_eval_json(tmp_path / "runs" / "eval.json")
    assert result["transfer"] is True
    assert result["data"]["num_classes"] == 3 and result["data"]["num_train"] == 48
    assert result["synthetic_diagnostics"] is None           # the candidates are of the other data set


def test_synthetic_that_does_not_fit_is_refused(chain, tmp_path):
    runs = os.path.join(chain.upto("clsp.py"), "runs")
    syn = torch.load(os.path.join(runs, "synthetic.pt"), weights_only=True)
    syn["data"] = {**syn["data"], "num_train": syn["data"]["num_train"] + 1}   # made from other data
    torch.save(syn, tmp_path / "other_synthetic.pt")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "eval.json").write_text('{"old": 1}')
    proc = run("evaluate.py", "--preset", "tiny", "--checkpoint", os.path.join(runs, "clsp.pt"),
               "--synthetic", tmp_path / "other_synthetic.pt", cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "does not fit" in proc.stderr and "--synthetic none" in proc.stderr
    assert (tmp_path / "runs" / "eval.json").read_text() == '{"old": 1}'   # the old result is untouched
