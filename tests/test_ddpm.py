"""Stage 1 tests: the DDPM math against float64 references, the UNet's split, and ddpm.py as a user runs it."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import ddpm
from conftest import REPO, run

TINY_UNET = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_res=8, dropout=0.1)


# ---- the forward process ------------------------------------------------------------------------

def test_schedule_matches_float64_formula():
    beta = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    abar_ref = np.cumprod(1 - beta)
    abar = ddpm.make_schedule(1000, 1e-4, 0.02).double().numpy()
    np.testing.assert_allclose(abar, abar_ref, rtol=1e-6)
    assert abar[0] == pytest.approx(1 - 1e-4) and abar[-1] < 1e-4    # x_T is almost pure noise


def test_q_sample_matches_float64_formula():
    abar = ddpm.make_schedule()
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(5, 3, 8, 8, generator=g) * 2 - 1
    eps = torch.randn(5, 3, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 998, 999])
    x_t = ddpm.q_sample(x0, t, eps, abar)
    a = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[t.numpy()][:, None, None, None]
    ref = np.sqrt(a) * x0.double().numpy() + np.sqrt(1 - a) * eps.double().numpy()
    np.testing.assert_allclose(x_t.double().numpy(), ref, atol=1e-5)


def test_loss_is_mse_between_eps_and_prediction():
    """ddpm_loss draws t ~ U{0..T-1} and eps ~ N(0, I); with the same seed we redraw them and recompute."""
    abar = ddpm.make_schedule()
    model = lambda x_t, t: 0.3 * x_t + 0.001 * t.float()[:, None, None, None]  # any known function
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    torch.manual_seed(123)
    loss = ddpm.ddpm_loss(model, x0, abar)
    torch.manual_seed(123)
    t = torch.randint(0, 1000, (4,)).numpy()
    eps = torch.randn(4, 3, 8, 8).double().numpy()
    a = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[t][:, None, None, None]
    x_t = np.sqrt(a) * x0.double().numpy() + np.sqrt(1 - a) * eps
    pred = 0.3 * x_t + 0.001 * t[:, None, None, None]
    assert loss.item() == pytest.approx(np.mean((eps - pred) ** 2), rel=1e-5)


# ---- the UNet ----------------------------------------------------------------------------------

def test_parameter_counts():
    n = lambda m: sum(p.numel() for p in m.parameters())
    paper = n(ddpm.UNet(ch=128))
    assert abs(paper - 35.7e6) / 35.7e6 < 0.01          # the authors' model, 35.7 M
    assert paper == 35_746_307                           # the DDPM CIFAR-10 layout exactly
    small = n(ddpm.UNet(ch=64))
    assert 8.5e6 < small < 9.5e6                         # the design card's small UNet, ~9 M


@pytest.mark.parametrize("ch_mult,size,bottleneck", [((1, 2, 2, 2), 32, 4), ((1, 2), 16, 8)])
def test_encode_decode_is_forward_and_shapes(ch_mult, size, bottleneck):
    torch.manual_seed(0)
    unet = ddpm.UNet(ch=32, ch_mult=ch_mult, num_res_blocks=1, attn_res=16).eval()  # eval: no dropout
    x_t = torch.randn(3, 3, size, size)
    t = torch.tensor([0, 400, 999])
    h, skips, temb = unet.encode(x_t, t)
    assert h.shape == (3, 32 * ch_mult[-1], bottleneck, bottleneck)   # 2ch x 4 x 4 for CIFAR
    assert temb.shape == (3, 4 * 32)
    n_skips = len(skips)
    eps = unet.decode(h, skips, temb)
    assert len(skips) == n_skips                          # decode leaves the caller's list alone
    assert eps.shape == x_t.shape
    assert torch.equal(eps, unet(x_t, t))


def test_every_resblock_of_the_tiny_unet_sees_t():
    """Each ResBlock adds the time embedding as one constant per channel; a GroupNorm with one channel per
    group after it would subtract exactly that constant (the tiny preset's 32-channel level did). So for
    every block of the tiny UNet, at every level, down, middle and up: another t must change its output.
    The weights are redrawn at PyTorch's usual scale (ddpm.py starts each residual branch near zero)."""
    s = {**ddpm.DEFAULTS, **ddpm.PRESETS["tiny"]}
    torch.manual_seed(0)
    unet = ddpm.build_unet(s).eval()
    for m in unet.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            m.reset_parameters()
    blocks = [m for m in unet.modules() if isinstance(m, ddpm.ResBlock)]
    assert len(blocks) == 2 + 2 + 4           # down: one a level; middle: two; up: two a level
    temb = unet.temb(ddpm.timestep_embedding(torch.tensor([10, 900]), s["ch"]))
    for block in blocks:
        x = torch.randn(1, block.block1[0].num_channels, 8, 8).expand(2, -1, -1, -1)   # one input, two t
        with torch.no_grad():
            out = block(x, temb)
        change = (out[0] - out[1]).abs().mean() / out.abs().mean()
        assert change > 1e-2, (block.block2[0], float(change))


def test_timestep_embedding_distinguishes_steps():
    e = ddpm.timestep_embedding(torch.tensor([0, 1, 999]), 32)
    assert e.shape == (3, 32)
    assert torch.allclose(e[0, :16], torch.zeros(16)) and torch.allclose(e[0, 16:], torch.ones(16))
    assert (e[1] - e[2]).abs().max() > 0.1


def test_it_learns():
    """A few hundred Adam steps on four 8x8 images: the loss on a fixed set of (t, eps) falls by half."""
    torch.manual_seed(0)
    unet = ddpm.UNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_res=0, dropout=0.0, image_size=8)
    abar = ddpm.make_schedule()
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    g = torch.Generator().manual_seed(1)
    t_eval = torch.randint(0, 1000, (64,), generator=g)
    eps_eval = torch.randn(64, 3, 8, 8, generator=g)
    x0_eval = x0.repeat(16, 1, 1, 1)

    def eval_loss():
        with torch.no_grad():
            return torch.mean((unet(ddpm.q_sample(x0_eval, t_eval, eps_eval, abar), t_eval) - eps_eval) ** 2).item()

    before = eval_loss()
    opt = torch.optim.Adam(unet.parameters(), lr=1e-3)
    for _ in range(300):
        loss = ddpm.ddpm_loss(unet, x0.repeat(4, 1, 1, 1), abar)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert before > 0.8            # it starts by predicting ~nothing: loss ~ E[eps^2] = 1
    assert after < 0.5 * before, (before, after)


def test_ddim_step_matches_float64_formula():
    abar = ddpm.make_schedule()
    g = torch.Generator().manual_seed(0)
    x, eps, noise = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
    t, t_next, eta = 500, 490, 0.1
    out = ddpm.ddim_step(x, eps, t, t_next, abar, eta, noise).double().numpy()
    A = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    a, an = A[t], A[t_next]
    xd, ed, nd = (v.double().numpy() for v in (x, eps, noise))
    x0 = (xd - np.sqrt(1 - a) * ed) / np.sqrt(a)
    sigma = eta * np.sqrt((1 - an) / (1 - a)) * np.sqrt(1 - a / an)
    ref = np.sqrt(an) * x0 + np.sqrt(1 - an - sigma ** 2) * ed + sigma * nd
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    last = ddpm.ddim_step(x, eps, 9, -1, abar, eta, None).double().numpy()   # the last step returns x0
    np.testing.assert_allclose(last, (xd - np.sqrt(1 - A[9]) * ed) / np.sqrt(A[9]), rtol=1e-4, atol=1e-4)


def test_ddim_timesteps():
    steps = ddpm.ddim_timesteps(100, 1000)
    assert steps[:3] == [999, 989, 979] and steps[-1] == 9 and len(steps) == 100


# ---- ddpm.py as a user runs it -----------------------------------------------------------------

def tiny(data, *extra):
    return ["--preset", "tiny", "--dataset", "folder", "--data-dir", data, *extra]


def test_cli_tiny_writes_a_safe_artifact_and_a_picture(chain):
    root = chain.upto("ddpm.py")
    ckpt = torch.load(os.path.join(root, "runs", "ddpm.pt"), weights_only=True)
    assert ckpt["step"] == ckpt["settings"]["steps"] == 20 and ckpt["finished"]
    fingerprint = ckpt["data"].pop("fingerprint")       # a hash of the pixels and labels
    assert ckpt["data"] == dict(dataset="folder", image_size=16, num_classes=4, num_train=64)
    assert len(fingerprint) == 16 and int(fingerprint, 16) >= 0
    assert set(ckpt["ema"]) == set(ckpt["model"])
    assert ckpt["scaler"] == {}                        # fp32 on a CPU: no loss scaling
    from PIL import Image
    img = Image.open(os.path.join(root, "runs", "ddpm_samples.png"))
    assert img.size == (8 * 66 + 2, 8 * 66 + 2)        # 8x8 tiles of 16 px, enlarged 4x, with 2-px borders


def test_fp16_training_scales_the_loss(tmp_path, tiny_data):
    # fp16 (what --precision auto picks on a T4 or V100) trains through a GradScaler; on the CPU too.
    proc = run("ddpm.py", *tiny(tiny_data, "--precision", "fp16", "--steps", "2", "--batch-size", "4",
                                "--sample-steps", "1"), cwd=tmp_path)
    assert "autocast torch.float16" in proc.stdout
    scaler = torch.load(tmp_path / "runs" / "ddpm.pt", weights_only=True)["scaler"]
    assert scaler["scale"] == 2.0 ** 16 and scaler["_growth_tracker"] == 2    # two steps, no overflow


def test_resume_after_interruption_equals_an_uninterrupted_run(tmp_path, tiny_data):
    flags = tiny(tiny_data, "--steps", "40", "--save-every", "4", "--log-every", "4")
    whole = tmp_path / "whole"
    whole.mkdir()
    run("ddpm.py", *flags, cwd=whole)

    part = tmp_path / "part"
    part.mkdir()
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "ddpm.py"), *flags], cwd=part, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckpt_path = part / "runs" / "ddpm.pt"
    deadline = time.time() + 600                        # a hang detector, not a speed check
    while not ckpt_path.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert ckpt_path.exists(), "the run ended or stalled before its first checkpoint"
    proc.send_signal(signal.SIGINT)                     # Ctrl-C after the first checkpoint
    out, err = proc.communicate(timeout=600)
    stopped = torch.load(ckpt_path, weights_only=True)
    if proc.returncode != 0:                            # it was interrupted (not already finished)
        assert "--resume" in err and stopped["step"] < 40 and not stopped["finished"]
    run("ddpm.py", *flags, "--resume", cwd=part)
    a = torch.load(whole / "runs" / "ddpm.pt", weights_only=True)
    b = torch.load(ckpt_path, weights_only=True)
    assert b["step"] == 40 and b["finished"]
    for weights in ("model", "ema"):                   # bit for bit, not merely close
        assert all(torch.equal(a[weights][k], b[weights][k]) for k in a[weights]), weights


def test_resume_refuses_other_settings(tmp_path, chain):
    root = chain.copy_upto("ddpm.py", tmp_path)
    proc = run("ddpm.py", *tiny(chain.data, "--resume", "--ch", "64"), cwd=root, check=False)
    assert proc.returncode != 0 and "--resume continues" in proc.stderr


BAD = [
    (["--dataset", "imagenet"], "unknown --dataset"),
    (["--dataset", "folder", "--data-dir", "no/such/dir"], "no folder"),
    (["--steps", "0"], "--steps must be a positive"),
    (["--lr", "-1"], "--lr must be a positive"),
    (["--ch", "48"], "multiple of 32"),
    (["--preset", "huge"], "unknown --preset"),
    (["--device", "tpu"], "--device"),
    (["--ema-decay", "1.5"], "--ema-decay"),
    (["--batch-size", "1000"], "larger than the 64 training images"),
]


@pytest.mark.parametrize("flags,message", BAD, ids=[m for _, m in BAD])
def test_bad_input_is_a_clear_error_and_damages_nothing(tmp_path, chain, flags, message):
    root = chain.copy_upto("ddpm.py", tmp_path)
    path = os.path.join(root, "runs", "ddpm.pt")
    before = open(path, "rb").read()
    args = ["--preset", "tiny", "--dataset", "folder", "--data-dir", chain.data]
    proc = run("ddpm.py", *args, *flags, cwd=root, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert open(path, "rb").read() == before


def test_corrupt_checkpoint_to_resume(tmp_path, tiny_data):
    (tmp_path / "runs").mkdir()
    path = tmp_path / "runs" / "ddpm.pt"
    path.write_bytes(b"this is not a checkpoint")
    proc = run("ddpm.py", *tiny(tiny_data, "--resume"), cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "not a readable artifact" in proc.stderr
    assert path.read_bytes() == b"this is not a checkpoint"


def test_resume_without_a_checkpoint_names_the_fix(tmp_path, tiny_data):
    proc = run("ddpm.py", *tiny(tiny_data, "--resume"), cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "does not exist" in proc.stderr


def test_a_new_run_never_overwrites_a_checkpoint(tmp_path, chain):
    root = chain.copy_upto("ddpm.py", tmp_path)
    path = os.path.join(root, "runs", "ddpm.pt")
    before = open(path, "rb").read()
    proc = run("ddpm.py", *tiny(chain.data), cwd=root, check=False)
    assert proc.returncode != 0 and "already exists" in proc.stderr and "--resume" in proc.stderr
    assert open(path, "rb").read() == before


def test_compiled_train_step_equals_eager(traced_compile):
    """make_train_step with compiled=True (what ddpm.py runs on a GPU, traced here as inductor would be
    without its C++ build) computes the same losses and weights as the eager step from the same seeds."""
    def run(compiled):
        torch.manual_seed(0)
        unet = ddpm.UNet(**{**TINY_UNET, "dropout": 0.0}, image_size=16)
        ema = ddpm.UNet(**{**TINY_UNET, "dropout": 0.0}, image_size=16).requires_grad_(False)
        ema.load_state_dict(unet.state_dict())
        opt = torch.optim.Adam(unet.parameters(), lr=1e-3)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        step = ddpm.make_train_step(unet, ema, opt, scaler, ddpm.make_schedule(),
                                    dict(lr=1e-3, warmup=2, grad_clip=1.0, ema_decay=0.999), None, compiled)
        x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
        torch.manual_seed(2)
        losses = [step(x, i).item() for i in range(3)]
        return losses, unet.state_dict(), ema.state_dict()

    (l_eager, w_eager, e_eager), (l_comp, w_comp, e_comp) = run(False), run(True)
    assert l_eager == pytest.approx(l_comp, rel=1e-5) and l_eager[0] != l_eager[2]   # it trains
    for k in w_eager:
        torch.testing.assert_close(w_comp[k], w_eager[k], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(e_comp[k], e_eager[k], rtol=1e-4, atol=1e-6)
