"""The IAF VAE (gm/models/iaf_vae.py): the negative ELBO against a hand computation from its parts (the flow's
log-determinant against autograd's Jacobian), the importance-weighted estimate, backends agree, training lowers the
loss, sampling, mixed precision, bad options, and `gm train | eval | sample` end to end with an exact resume."""

from __future__ import annotations

import json

import pytest
import torch
from torch.distributions import Bernoulli, Normal

import gm.models as M
from gm.cli import main
from gm.models.iaf_vae import EVAL_SEED
from tests._util import assert_rel, fast_backends

CPU = torch.device("cpu")


def _images(n: int, seed: int = 1, p: float = 0.3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, 28, 28, generator=g) < p).double()


def _model(backend="reference", seed=0, **overrides):
    torch.manual_seed(seed)
    return M.get("iaf_vae", "tiny", backend=backend, **overrides).double()


def test_negative_elbo_matches_a_hand_computation():
    """forward(x) = log q(z_T|x) − log p(z_T) − log p(x|z_T) for the noise it draws, with log q from the Gaussian
    density of z_0 minus log|det dz_T/dz_0| taken from autograd's Jacobian of the flow (not from the flow's own
    log-determinant), and every density from torch.distributions."""
    model = _model()
    x = _images(3)
    torch.manual_seed(7)
    got = model(x)
    assert got.shape == (3,) and torch.isfinite(got).all()
    torch.manual_seed(7)
    eps = torch.randn(3, model.latent).double()  # the model draws eps in float32 right after the encoder
    with torch.no_grad():
        mu, log_sigma, h = model.encode(x)
        z0 = mu + log_sigma.exp() * eps
        z, _ = model.transform(z0, h)
        logits = model.decode(z)
    assert model.flow is not None and len(model.flow.steps) == 2
    want = []
    for i in range(3):
        jac = torch.autograd.functional.jacobian(lambda v, i=i: model.transform(v, h[i : i + 1])[0], z0[i : i + 1])
        jac = jac.reshape(model.latent, model.latent)
        log_det = torch.linalg.slogdet(jac).logabsdet
        log_q = Normal(mu[i], log_sigma[i].exp()).log_prob(z0[i]).sum() - log_det
        log_pz = Normal(torch.zeros_like(z[i]), torch.ones_like(z[i])).log_prob(z[i]).sum()
        log_px = Bernoulli(logits=logits[i]).log_prob(x[i]).sum()
        want.append(log_q - log_pz - log_px)
    assert_rel(got.detach(), torch.stack(want), torch.float64, "negative ELBO", device=CPU)


def test_flow_log_determinant_matches_autograd():
    """The per-image Σ logdet the model subtracts is log|det| of the flow's Jacobian, with the sign that makes
    log q(z_T) = log q(z_0) − Σ logdet."""
    model = _model()
    z0 = torch.randn(4, model.latent, dtype=torch.float64)
    h = torch.randn(4, model.context, dtype=torch.float64)
    _, logdet = model.transform(z0, h)
    for i in range(4):
        jac = torch.autograd.functional.jacobian(lambda v, i=i: model.transform(v, h[i : i + 1])[0], z0[i : i + 1])
        want = torch.linalg.slogdet(jac.reshape(model.latent, model.latent)).logabsdet
        assert abs(logdet[i].item() - want.item()) < 1e-12 * max(1.0, abs(want.item()))


def test_importance_weighted_estimate():
    """k = 1 is the negative ELBO on the same noise; for the same k draws the estimate is at most the mean negative
    ELBO of those draws (Jensen, exactly); over fresh draws it is below the mean negative ELBO on average; and it
    leaves the global RNG as it found it."""
    model = _model()
    x = _images(6, seed=2)
    with torch.no_grad():
        torch.manual_seed(11)
        one = model(x, samples=1)
        torch.manual_seed(11)
        elbo = model(x)
        assert torch.equal(one, elbo)

        k = 32
        torch.manual_seed(12)
        iw = model(x, samples=k)
        assert iw.shape == (6,) and torch.isfinite(iw).all()
        torch.manual_seed(12)
        eps = torch.randn(k, 6, model.latent)
        neg_log_w = -model.log_weights(x, model.encode(x), eps)
        assert (iw <= neg_log_w.mean(0) + 1e-9).all()
        want = torch.log(torch.tensor(float(k), dtype=torch.float64)) - torch.logsumexp(-neg_log_w, 0)
        torch.testing.assert_close(iw, want, rtol=1e-9, atol=0)  # float64, summed in another order

        torch.manual_seed(13)
        mean_elbo = torch.stack([model(x) for _ in range(64)]).mean()
        mean_iw = torch.stack([model(x, samples=k) for _ in range(4)]).mean()
        assert mean_iw < mean_elbo, (mean_iw, mean_elbo)

        state = torch.get_rng_state()
        model.eval()
        model.nll(x)
        assert torch.equal(torch.get_rng_state(), state)


def test_nll_follows_the_mode():
    """Training mode: nll(x, out) is out and nll(x) is one-sample −ELBO; eval mode: eval_samples-sample IW."""
    model = _model()
    x = _images(2)
    out = torch.tensor([1.0, 2.0])
    assert model.nll(x, out) is out
    torch.manual_seed(3)
    a = model.nll(x)
    torch.manual_seed(3)
    assert torch.equal(a, model(x))
    model.eval()
    torch.manual_seed(3)
    b = model.nll(x)
    torch.manual_seed(4)
    assert torch.equal(b, model.nll(x)), "the eval-mode estimate uses fixed noise, whatever the global RNG"
    torch.manual_seed(EVAL_SEED)
    assert torch.equal(b, model(x, samples=model.eval_samples))
    assert torch.equal(b, model(x, samples=model.eval_samples, seed=EVAL_SEED))
    assert model.metric_name == "nats/image" and torch.equal(model.metric(b, 784), b)


@pytest.mark.parametrize("backend", fast_backends(CPU))
def test_backends_give_the_reference_loss_and_gradients(backend):
    """The IAF steps on gm's fused backends against the reference: same weights and noise, same loss and every
    parameter gradient (float64)."""
    ref = _model("reference")
    fast = _model(backend)
    fast.load_state_dict(ref.state_dict())
    assert all(step.backend == backend for step in fast.flow.steps)
    x = _images(3, seed=4)
    torch.manual_seed(5)
    loss_ref = ref(x).mean()
    loss_ref.backward()
    torch.manual_seed(5)
    loss = fast(x).mean()
    loss.backward()
    assert_rel(loss.detach(), loss_ref.detach(), torch.float64, "loss", device=CPU)
    grads = dict(fast.named_parameters())
    for name, p in ref.named_parameters():
        assert_rel(grads[name].grad, p.grad, torch.float64, f"d{name}", device=CPU)


def test_training_steps_lower_the_loss():
    import gm.data as D  # noqa: PLC0415

    torch.manual_seed(0)
    model = M.get("iaf_vae", "tiny")
    x = D.to_levels(D.load_digits()["train"][:32], 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def fixed_noise_loss():
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(0)
            return torch.stack([model(x).mean() for _ in range(4)]).mean().item()

    before = fixed_noise_loss()
    for _ in range(15):
        loss = model.loss(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = fixed_noise_loss()
    assert after < 0.8 * before, (before, after)


def test_sampling_is_binary_shaped_and_follows_the_generator():
    model = M.get("iaf_vae", "tiny")
    a = model.sample(5, (28, 28), generator=torch.Generator().manual_seed(3))
    b = model.sample(5, (28, 28), generator=torch.Generator().manual_seed(3))
    c = model.sample(5, (28, 28), generator=torch.Generator().manual_seed(4))
    assert a.shape == (5, 1, 28, 28) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert set(a.unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(ValueError, match="size must be"):
        model.sample(2, (6, 6))


def test_bf16_compute_is_close_to_fp32_and_trains_fp32_masters():
    torch.manual_seed(0)
    model = M.get("iaf_vae", "tiny")
    x = _images(4).float()
    torch.manual_seed(1)
    ref = model(x).mean().item()
    model.compute_dtype = torch.bfloat16
    torch.manual_seed(1)
    loss = model(x).mean()
    loss.backward()
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref) / ref < 2e-2
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model.nll(x)).all()


def test_presets_and_bad_options():
    for name, cfg in M.iaf_vae.PRESETS.items():
        assert cfg["channels"] == 1 and cfg["levels"] == 2, name
    cfg = M.config("iaf_vae", "mnist")
    assert cfg["latent"] == 32 and cfg["iaf_steps"] >= 2 and cfg["context"] > 0
    flow = M.get("iaf_vae", "tiny").flow
    assert [s.made.degrees.tolist() for s in flow.steps] == [[1, 2, 3, 4], [4, 3, 2, 1]]  # order reversed
    assert M.get("iaf_vae", "tiny", iaf_steps=0).flow is None
    for option, value in (("latent", 0), ("maps", -3), ("size", 0), ("iaf_hidden", 0), ("eval_samples", 0),
                          ("blocks", 1.5), ("channels", 3), ("levels", 256), ("iaf_mode", "planar")):  # fmt: skip
        with pytest.raises(ValueError, match=option):
            M.IAFVAE(**{**M.iaf_vae.PRESETS["tiny"], option: value})
    with pytest.raises(ValueError, match="unknown IAFVAE options.*depth"):
        M.IAFVAE(depth=3)
    with pytest.raises(ValueError, match=r"x must have shape \(N, 1, 28, 28\)"):
        M.get("iaf_vae", "tiny")(torch.zeros(2, 1, 14, 14))


def _state(run):
    return torch.load(run / "checkpoint.pt", weights_only=True)


def _losses(run):
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_cli_train_eval_sample_and_resume(tmp_path, capsys):
    """`gm train iaf_vae` (an evaluation at step 3, a sample grid at step 2), `gm eval`, `gm sample`; then 4 steps
    straight against 2 steps and --resume to 4: identical losses and weights. The evaluations (at step 3 in one run,
    at the end of the first half in the other) draw their noise without moving the training RNG."""
    common = ["iaf_vae", "--preset", "tiny", "--data", "synthetic:64:28", "--batch-size", "8", "--log-every", "1",
              "--device", "cpu", "--seed", "3"]  # fmt: skip
    straight, resumed = tmp_path / "a", tmp_path / "b"
    assert main(["train", *common, "--steps", "4", "--eval-every", "3", "--sample-every", "2", "--n-samples", "4",
                 "--out", str(straight)]) == 0  # fmt: skip
    assert "test NLL" in capsys.readouterr().out
    assert (straight / "samples_step0000002.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["eval", str(straight / "checkpoint.pt"), "--device", "cpu"]) == 0
    assert "nats/image" in capsys.readouterr().out
    grid = tmp_path / "grid.png"
    assert main(["sample", str(straight / "checkpoint.pt"), "--n", "3", "--out", str(grid)]) == 0
    assert grid.read_bytes()[:4] == b"\x89PNG"
    # Images of another size: a clear message and exit status 2 from each command, nothing written.
    capsys.readouterr()
    assert main(["eval", str(straight / "checkpoint.pt"), "--data", "synthetic:16:12", "--device", "cpu"]) == 2
    assert "takes 28x28 images, --data synthetic:16:12 has 12x12" in capsys.readouterr().err
    assert main(["sample", str(straight / "checkpoint.pt"), "--size", "12", "--out", str(tmp_path / "s.png")]) == 2
    assert "--size 12: this model makes 28x28 images" in capsys.readouterr().err
    # the VAE decodes whole images: no pixel-by-pixel method, no completion
    assert main(["sample", str(straight / "checkpoint.pt"), "--method", "full", "--out", str(tmp_path / "s.png")]) == 2
    assert "only the PixelCNN and PixelRNN models sample pixel by pixel" in capsys.readouterr().err
    assert main(["sample", str(straight / "checkpoint.pt"), "--complete", "3", "--out", str(tmp_path / "s.png")]) == 2
    assert "only the PixelCNN and PixelRNN models complete images" in capsys.readouterr().err
    assert main(["train", *common, "--data", "synthetic:16:12", "--out", str(tmp_path / "c")]) == 2
    assert "takes 28x28 images but --data synthetic:16:12 has 12x12" in capsys.readouterr().err
    assert not (tmp_path / "s.png").exists() and not (tmp_path / "c").exists()

    assert main(["train", *common, "--steps", "2", "--eval-every", "0", "--n-samples", "0", "--out",
                 str(resumed)]) == 0  # fmt: skip
    assert main(["train", "iaf_vae", "--preset", "tiny", "--steps", "4", "--out", str(resumed), "--resume",
                 "--log-every", "1", "--n-samples", "0", "--eval-every", "0", "--device", "cpu"]) == 0  # fmt: skip
    a, b = _state(straight), _state(resumed)
    assert a["step"] == b["step"] == 4
    for name, t in a["model_state"].items():
        assert torch.equal(t, b["model_state"][name]), name
    assert _losses(straight) == _losses(resumed)


GPU_BACKENDS = fast_backends(torch.device("cuda")) if torch.cuda.is_available() else ["cuda", "triton"]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_backends_give_the_reference_elbo_and_gradients(backend):
    """The mnist preset's IAF steps on the GPU's backends (float32, tf32 off) against the float64 reference on the CPU,
    on the same weights and the same posterior noise (given explicitly: the devices' RNGs differ): the negative ELBO
    and every parameter gradient."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    dev = torch.device("cuda")
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        torch.manual_seed(0)
        ref = M.get("iaf_vae", "mnist", backend="reference").double()
        fast = M.get("iaf_vae", "mnist", backend=backend).to(dev)
        fast.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
        x = _images(8, seed=6)
        eps = torch.randn(1, 8, ref.latent, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        loss_ref = -ref.log_weights(x, ref.encode(x), eps).mean()
        loss_ref.backward()
        xf = x.float().to(dev)
        loss = -fast.log_weights(xf, fast.encode(xf), eps.float().to(dev)).mean()
        loss.backward()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    err = abs(loss.item() - loss_ref.item()) / abs(loss_ref.item())
    assert err <= 1e-5, f"{backend} negative ELBO: relative error {err:.3g}"
    grads = dict(fast.named_parameters())
    for name, p in ref.named_parameters():
        g = grads[name].grad.double().cpu()
        err = (g - p.grad).norm().item() / max(p.grad.norm().item(), 1e-300)
        assert err <= 1e-4, f"{backend} d{name}: relative error {err:.3g}"
