"""Tests of stage 2 (generate.py): the interpolated DDIM sampler against independent computations,
the candidate set's layout, resuming after an interruption, and every refusal.

Unit tests use small randomly initialised UNets or stand-ins with a closed form; the CLI tests use the
tiny chain (`python ddpm.py --preset tiny ...` then `python generate.py --preset tiny ...`).
"""

import os

import numpy as np
import pytest
import torch

import common
import ddpm
import generate
from conftest import run

T = 1000


def small_unet(seed=0):
    """A random 16x16 UNet. ddpm.py starts every residual branch and the output layer at ~0 (gain 1e-5),
    so a fresh UNet's eps would hardly depend on h: the weights are redrawn at PyTorch's usual scale."""
    torch.manual_seed(seed)
    unet = ddpm.UNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_res=8, dropout=0.0, image_size=16)
    for m in unet.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            m.reset_parameters()
    return unet.eval()


def randn(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def sample(unet, x_a, w, eta, S=4, seed=1, step_seed=None, anchor_seed=2):
    """interpolated_ddim_sample with x_T drawn from the sample's generator, as generate.py does."""
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(x_a.shape, generator=g)
    if step_seed is not None:                   # a different stream for the DDIM noise only
        g = torch.Generator().manual_seed(step_seed)
    return generate.interpolated_ddim_sample(unet, x_T, x_a, ddpm.make_schedule(), w, S, eta, g,
                                             torch.Generator().manual_seed(anchor_seed))


# ------------------------------------------------------------------------------------------------
# The sampler
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_w1_is_plain_ddim_and_ignores_the_anchor(eta):
    unet, shape = small_unet(), (3, 3, 16, 16)
    g = torch.Generator().manual_seed(1)
    x_T = torch.randn(shape, generator=g)
    plain = ddpm.ddim_sample(unet, x_T, ddpm.make_schedule(), S=4, eta=eta, generator=g)
    a1, a2 = randn(shape, 10).tanh(), randn(shape, 11).tanh()
    assert torch.equal(sample(unet, a1, 1.0, eta), plain)          # bit for bit, same noise
    assert torch.equal(sample(unet, a2, 1.0, eta), plain)          # another anchor: no influence


@pytest.mark.parametrize("w", [0.0, 0.1, 0.5])
def test_w_below_1_follows_the_anchor(w):
    unet, shape = small_unet(), (3, 3, 16, 16)
    a1, a2 = randn(shape, 10).tanh(), randn(shape, 11).tanh()
    out1, out2 = sample(unet, a1, w, 0.1), sample(unet, a2, w, 0.1)
    # The change is small next to the first step's 1/sqrt(abar_999) ~ 160x blow-up of a random UNet's
    # x0, but far above float32 rounding (and the sampler is deterministic: see the next line).
    assert (out1 - out2).abs().mean() > 1e-5 * out1.abs().mean()
    assert torch.equal(out1, sample(unet, a1, w, 0.1))            # same seeds, same result


def test_eta_0_is_deterministic():
    """eta = 0: the DDIM noise stream does not matter; eta > 0: it does (so the test can fail)."""
    unet, x_a = small_unet(), randn((2, 3, 16, 16), 10).tanh()
    assert torch.equal(sample(unet, x_a, 0.1, 0.0, step_seed=5), sample(unet, x_a, 0.1, 0.0, step_seed=6))
    assert not torch.equal(sample(unet, x_a, 0.1, 0.5, step_seed=5), sample(unet, x_a, 0.1, 0.5, step_seed=6))


class ClosedFormUNet:
    """encode/decode with a known formula, so the whole sampler can be recomputed in float64 numpy.
    The skips are a function of the input, so taking them from the anchor instead would be caught."""

    def encode(self, x, t):
        return torch.tanh(x) + t.view(-1, 1, 1, 1) / T, [x, 0.5 * x], t

    def decode(self, h, skips, temb):
        return 0.8 * h - skips.pop() * (1 + temb.view(-1, 1, 1, 1) / T)   # uses the last skip


@pytest.mark.parametrize("w,eta", [(0.1, 0.1), (0.5, 0.0), (0.3, 1.0)])
def test_sampler_matches_float64_formula(w, eta):
    """Every step of the sampler's pseudo-code (generate.py's docstring), in float64 numpy, with the same
    random numbers: x_T and then one DDIM noise per step but the last from the sample's stream; one
    anchor noise per step from the anchor's stream."""
    S, shape = 4, (2, 3, 4, 4)
    x_a = randn(shape, 10).tanh()
    out = sample(ClosedFormUNet(), x_a, w, eta, S=S)

    g, g_a = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    x = torch.randn(shape, generator=g).double().numpy()
    beta = np.linspace(1e-4, 0.02, T, dtype=np.float64)
    abar = np.cumprod(1 - beta)
    steps = [999, 749, 499, 249, -1]                       # S = 4 evenly spaced steps, then "done"
    xa = x_a.double().numpy()
    for t, t_next in zip(steps[:-1], steps[1:]):
        a = abar[t]
        xa_t = np.sqrt(a) * xa + np.sqrt(1 - a) * torch.randn(shape, generator=g_a).double().numpy()
        h = w * (np.tanh(x) + t / T) + (1 - w) * (np.tanh(xa_t) + t / T)
        eps = 0.8 * h - 0.5 * x * (1 + t / T)
        x0 = (x - np.sqrt(1 - a) * eps) / np.sqrt(a)
        if t_next < 0:
            x = x0
            break
        an = abar[t_next]
        sigma = eta * np.sqrt((1 - an) / (1 - a)) * np.sqrt(1 - a / an)
        noise = torch.randn(shape, generator=g).double().numpy()
        x = np.sqrt(an) * x0 + np.sqrt(1 - an - sigma ** 2) * eps + sigma * noise
    np.testing.assert_allclose(out.double().numpy(), x, rtol=1e-4, atol=1e-4 * np.abs(x).max())


class CopyUNet(torch.nn.Module):
    """A stand-in whose eps makes the DDIM guess x0 = h / sqrt(abar_t). With w = 0, h is the noised
    anchor, so the sampler returns the anchor plus a little noise: which anchor each candidate came
    from is then visible in its pixels. It has no weights (load_state_dict accepts anything)."""

    def __init__(self, abar):
        super().__init__()
        self.abar = abar

    def encode(self, x, t):
        return x, [x], t

    def decode(self, h, skips, temb):
        return (skips[0] - h) / (1 - self.abar[temb].view(-1, 1, 1, 1)).sqrt()

    def load_state_dict(self, *args, **kwargs):
        pass


def test_candidate_k_of_image_i_is_images_i_k(chain, tmp_path, monkeypatch):
    """The whole of main() (batching, chunk files, assembly) with CopyUNet: every candidate must be
    nearest to its own anchor, for anchors spread over several batches (3 anchors per batch)."""
    d = chain.copy_upto("ddpm.py", tmp_path)
    monkeypatch.chdir(d)
    monkeypatch.setattr(generate, "build_unet", lambda s: CopyUNet(ddpm.make_schedule(s["T"])))
    generate.main(["--preset", "tiny", "--device", "cpu", "--w", "0", "--eta", "0", "--steps", "100",
                   "--K", "3", "--batch-size", "9", "--num-anchors", "10", "--out", "runs/copies.pt"])
    art = torch.load("runs/copies.pt", weights_only=True)
    images = art["images"]
    assert images.shape == (10, 3, 3, 16, 16) and images.dtype == torch.uint8
    x, _, _ = common.load_dataset("folder", chain.data, "train", 16)
    dist = (images[:, :, None].float() - x[None, None, :10].float()).abs().mean((3, 4, 5))   # [i, k, j]
    assert (dist.argmin(-1) == torch.arange(10)[:, None]).all()
    assert dist[torch.arange(10), :, torch.arange(10)].max() < 10        # a near copy: ~4 of 255 off
    assert not os.path.exists("runs/copies.pt.parts")


# ------------------------------------------------------------------------------------------------
# The CLI, as a user runs it
# ------------------------------------------------------------------------------------------------

def test_tiny_chain_writes_the_candidate_set(chain):
    d = chain.upto("generate.py")
    art = torch.load(os.path.join(d, "runs", "synthetic.pt"), weights_only=True)
    ck = torch.load(os.path.join(d, "runs", "ddpm.pt"), weights_only=True)
    s = art["settings"]
    N, K = art["data"]["num_train"], s["K"]
    assert (N, K, s["S"], s["w"], s["eta"]) == (64, 2, 5, 0.1, 0.1)
    assert art["images"].shape == (N, K, 3, 16, 16) and art["images"].dtype == torch.uint8
    assert art["images"].float().std() > 0                               # not a blank tensor
    assert torch.equal(art["anchor_index"], torch.arange(N))
    assert art["data"] == ck["data"]
    assert art["ddpm"]["step"] == ck["step"] and art["ddpm"]["settings"] == ck["settings"]
    summ = art["summary"]
    assert set(summ["anchor_to_sample_by_w"]) == {"0.0", "0.1", "0.25", "0.5", "1.0"}
    assert 0 <= summ["anchor_to_candidate"] <= 255 and 0 <= summ["between_candidates"] <= 255
    from PIL import Image
    # 4 anchors of 16x16 enlarged 4x, with 2-pixel borders and a 14-pixel header naming the columns:
    # K + 1 = 3 columns, and 1 + 5 columns for the w sweep.
    assert Image.open(os.path.join(d, "runs", "synthetic_preview.png")).size == (3 * 66 + 2, 4 * 66 + 2 + 14)
    assert Image.open(os.path.join(d, "runs", "synthetic_w_sweep.png")).size == (6 * 66 + 2, 4 * 66 + 2 + 14)
    assert not os.path.exists(os.path.join(d, "runs", "synthetic.pt.parts"))


def test_missing_ddpm_as_a_user_sees_it(tmp_path):
    proc = run("generate.py", "--preset", "tiny", cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert "ddpm.py" in proc.stderr and "Traceback" not in proc.stderr


def test_interrupted_run_resumes_to_the_same_result(chain, tmp_path, monkeypatch, capsys):
    d = chain.copy_upto("ddpm.py", tmp_path)
    monkeypatch.chdir(d)
    # No --dataset / --data-dir: they come from runs/ddpm.pt. 12 anchors, 3 per batch: 4 batches.
    flags = ["--preset", "tiny", "--device", "cpu", "--num-anchors", "12", "--batch-size", "6", "--steps", "2"]
    generate.main(flags + ["--out", "runs/reference.pt"])

    real_save, chunks_saved = generate.atomic_save, []

    def ctrl_c_at_the_third_batch(obj, path):
        if os.path.basename(path).startswith("batch_"):
            chunks_saved.append(path)
            if len(chunks_saved) == 3:
                raise KeyboardInterrupt
        real_save(obj, path)

    with monkeypatch.context() as m:
        m.setattr(generate, "atomic_save", ctrl_c_at_the_third_batch)
        with pytest.raises(SystemExit) as e:
            generate.main(flags)
    assert "rerun the same command to resume" in str(e.value)
    assert sorted(os.listdir("runs/synthetic.pt.parts")) == ["batch_000000.pt", "batch_000001.pt", "manifest.pt"]
    assert not os.path.exists("runs/synthetic.pt")     # never a partial file under the final name

    with pytest.raises(SystemExit) as e:                 # other settings may not reuse those batches
        generate.main(flags + ["--w", "0.5"])
    assert "delete runs/synthetic.pt.parts" in str(e.value) and "old settings" in str(e.value)

    capsys.readouterr()
    generate.main(flags)
    assert "resuming: 2/4 batches" in capsys.readouterr().out
    resumed = torch.load("runs/synthetic.pt", weights_only=True)
    reference = torch.load("runs/reference.pt", weights_only=True)
    assert torch.equal(resumed["images"], reference["images"])
    assert resumed["settings"] == reference["settings"]
    assert not os.path.exists("runs/synthetic.pt.parts")
    with pytest.raises(SystemExit) as e:                 # and a finished set is never made again over itself
        generate.main(flags)
    assert "already exists" in str(e.value) and torch.equal(
        torch.load("runs/synthetic.pt", weights_only=True)["images"], reference["images"])


# ------------------------------------------------------------------------------------------------
# Refusals: one sentence, nothing damaged
# ------------------------------------------------------------------------------------------------

def refused(*flags):
    """Run main() in-process, expect a refusal, and return its message."""
    with pytest.raises(SystemExit) as e:
        generate.main(["--preset", "tiny", "--device", "cpu", *flags])
    msg = str(e.value)
    assert msg.startswith("error: ")
    return msg


def test_bad_inputs_are_refused_and_nothing_is_damaged(chain, tmp_path, monkeypatch):
    d = chain.copy_upto("ddpm.py", tmp_path)
    monkeypatch.chdir(d)
    with open("runs/synthetic.pt", "wb") as f:
        f.write(b"an older candidate set")
    ck = torch.load("runs/ddpm.pt", weights_only=True)

    for flags, words in [(["--w", "1.5"], "--w"), (["--w", "-0.1"], "--w"), (["--K", "0"], "--K"),
                         (["--steps", "0"], "--steps"), (["--steps", "2000"], "T = 1000"),
                         (["--eta", "-1"], "--eta"), (["--batch-size", "0"], "--batch-size"),
                         (["--num-anchors", "0"], "--num-anchors"), (["--num-anchors", "65"], "64 training"),
                         (["--dataset", "cifar10"], "python ddpm.py --preset tiny --dataset cifar10 --image-size 16 "
                                                    "--out runs/ddpm_cifar10_16px.pt` and pass --ddpm "
                                                    "runs/ddpm_cifar10_16px.pt"),
                         (["--image-size", "32"], "--image-size 32")]:
        assert words in refused(*flags), flags

    def save_changed(change):
        c = {**ck, "settings": dict(ck["settings"]), "data": dict(ck["data"])}
        change(c)
        torch.save(c, "runs/ddpm.pt")

    # A checkpoint made for CIFAR-100 at 32x32, asked for the folder data set.
    save_changed(lambda c: (c["settings"].update(dataset="cifar100", image_size=32),
                            c["data"].update(dataset="cifar100", image_size=32, num_classes=100)))
    assert "`python ddpm.py --preset tiny --dataset folder --image-size 32 --out runs/ddpm_folder_32px.pt`" in \
        refused("--dataset", "folder")
    # The data folder changed since the DDPM was trained (another image count).
    save_changed(lambda c: c["data"].update(num_train=100))
    assert "may have changed" in refused()
    save_changed(lambda c: c.pop("ema"))
    assert "EMA" in refused()
    with open("runs/ddpm.pt", "wb") as f:
        f.write(b"not a checkpoint")
    assert "ddpm.py" in refused()
    os.remove("runs/ddpm.pt")
    assert "run `python ddpm.py --preset tiny` first" in refused()   # the hint repeats the user's preset
    assert open("runs/synthetic.pt", "rb").read() == b"an older candidate set"
    assert not os.path.exists("runs/synthetic.pt.parts")


def test_compiled_sampler_equals_eager(traced_compile):
    """generate.py compiles interpolated_eps once (w a tensor, the batch padded to one shape): traced as
    inductor would trace it, in one graph, the whole sampler gives the eager result, for two values of w
    without a second trace."""
    from torch._dynamo.testing import CompileCounterWithBackend
    unet, x_a = small_unet(), randn((3, 3, 16, 16), 10).tanh()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = traced_compile(generate.interpolated_eps, backend=counter, fullgraph=True)
    for w in (0.1, 0.5):
        w = torch.tensor(w)
        eager = sample(unet, x_a, w, 0.1)
        g, g_a = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
        x_T = torch.randn(x_a.shape, generator=g)
        out = generate.interpolated_ddim_sample(unet, x_T, x_a, ddpm.make_schedule(), w, 4, 0.1, g, g_a, compiled)
        torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1                       # one trace for every step and both values of w


def test_sampler_pads_every_batch_to_one_shape(monkeypatch):
    """A last, smaller batch is padded to the full number of rows (one shape: one compile); the padding
    never reaches the candidates."""
    shapes = []

    def eps_fn(unet, x, xa_t, t, w, layers):
        shapes.append(tuple(x.shape))
        return generate.interpolated_eps(unet, x, xa_t, t, w, layers)
    unet, abar = small_unet(), ddpm.make_schedule()
    anchors = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    sampler = generate.Sampler(unet, abar, S=3, eta=0.1, seed=0, rows=10, eps_fn=eps_fn)
    out = sampler.candidates(anchors, 2, 0.1, 5)
    assert out.shape == (3, 2, 3, 16, 16) and out.dtype == torch.uint8
    assert set(shapes) == {(10, 3, 16, 16)}


def test_each_batch_starts_from_noise_of_its_own():
    """The same anchor in batch 0 and in batch 1 gets other candidates: each batch draws its own x_T and
    noise (one seed for every batch would repeat batch 0's noise in every batch, and identical anchors,
    or any two batches at w near 1, would get identical candidates). Batch b made again, as a resumed run
    makes it, is the same, bit for bit; and the K candidates of one anchor differ from one another."""
    unet, abar = small_unet(), ddpm.make_schedule()
    anchor = torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    sampler = generate.Sampler(unet, abar, S=3, eta=0.1, seed=0, rows=2)
    first, second = sampler.candidates(anchor, 2, 0.1, 0), sampler.candidates(anchor, 2, 0.1, 1)
    assert torch.equal(sampler.candidates(anchor, 2, 0.1, 0), first)           # resume: the same batch again
    differ = lambda a, b: (a.float() - b.float()).abs().mean().item()
    assert differ(first, second) > 1.0, differ(first, second)                  # of 255: other noise, not rounding
    assert differ(first[0, 0], first[0, 1]) > 1.0                              # and K = 2 draws of its own
    assert differ(first[0], sampler.candidates(anchor, 2, 0.1, 5)[0]) > 1.0   # any two batches
