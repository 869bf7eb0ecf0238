"""The GANs (gm/models/improved_gan.py, dcgan.py, infogan.py): shapes and sampling, the losses against hand
computations in float64, minibatch discrimination in the discriminator on two backends, InfoGAN's mutual-information
bound, the evaluation metrics on constructed examples, and a few training steps."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import gm.models as gmmodels
from gm.models import dcgan, improved_gan, infogan
from gm.models.gan_common import GANBatch
from tests._util import fast_backends

TINY = [("improved_gan", "tiny"), ("improved_gan", "tiny-md"), ("dcgan", "tiny"), ("infogan", "tiny")]


@pytest.mark.parametrize(("name", "preset"), [*TINY, ("dcgan", "cifar10")], ids=lambda v: v)
def test_generate_shape_range_and_determinism(name, preset):
    model = gmmodels.get(name, preset)
    assert gmmodels.kind(name) == "gan"
    x = model.generate(5, generator=torch.Generator().manual_seed(1))
    assert x.shape == (5, *model.image_shape) and x.dtype == torch.float32
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert torch.equal(x, model.generate(5, generator=torch.Generator().manual_seed(1)))
    assert not torch.equal(x, model.generate(5, generator=torch.Generator().manual_seed(2)))
    assert model.training  # generate() restores the mode it found


def test_every_preset_names_its_channels_and_builds():
    for name in ("improved_gan", "dcgan", "infogan"):
        for preset, cfg in gmmodels.MODELS[name][1].items():
            assert cfg["channels"] in (1, 3), (name, preset)
            model = gmmodels.get(name, preset)
            assert model.image_shape == (cfg["channels"], cfg["size"], cfg["size"])


def test_mnist_architectures_follow_the_papers():
    ig = gmmodels.get("improved_gan", "mnist")
    widths = [m.v.shape[0] for m in ig.discriminator["features"] if isinstance(m, improved_gan.WeightNormLinear)]
    assert widths == [1000, 500, 250, 250, 250] and ig.discriminator["out"].v.shape == (10, 250)
    noise = [m.sigma for m in ig.discriminator["features"] if isinstance(m, improved_gan.GaussianNoise)]
    assert noise == [0.3, 0.5, 0.5, 0.5, 0.5] and ig.discriminator["noise"].sigma == 0.5
    md = gmmodels.get("improved_gan", "mnist-md")
    assert md.discriminator["minibatch"].out_features == 350 and md.discriminator["out"].v.shape == (10, 350)
    info = gmmodels.get("infogan", "mnist")
    x = torch.rand(3, 1, 28, 28)
    logit, q_logits, q_mean = info.heads(x)
    assert logit.shape == (3,) and q_logits.shape == (3, 10) and q_mean.shape == (3, 2)
    assert info.generator[0].in_features == 62 + 10 + 2
    dc = gmmodels.get("dcgan", "mnist")
    assert [s[0].out_channels for s in dc.discriminator["conv"].stages] == [64, 128]
    assert dc.features(x).shape == (3, (64 + 128) * 16)


def _hand_semi_supervised(lab, labels, unl, fake):
    """The K+1-class formulation written out: class K (fake) has logit 0."""

    def full(logits):
        return torch.cat([logits, torch.zeros(logits.shape[0], 1, dtype=logits.dtype)], dim=1)

    p_lab = torch.softmax(full(lab), dim=1)
    supervised = -torch.log(p_lab[torch.arange(lab.shape[0]), labels] / (1 - p_lab[:, -1])).mean()
    d_real = 1 - torch.softmax(full(unl), dim=1)[:, -1]  # P(real) = 1 - P(class K+1)
    d_fake = 1 - torch.softmax(full(fake), dim=1)[:, -1]
    unsupervised = 0.5 * (-torch.log(d_real)).mean() + 0.5 * (-torch.log(1 - d_fake)).mean()
    return supervised, unsupervised


def test_semi_supervised_losses_match_the_k_plus_1_formulation():
    g = torch.Generator().manual_seed(0)
    lab, unl, fake = (torch.randn(n, 10, generator=g, dtype=torch.float64) * 3 for n in (5, 7, 6))
    labels = torch.randint(10, (5,), generator=g)
    sup, unsup = improved_gan.semi_supervised_losses(lab, labels, unl, fake)
    hand_sup, hand_unsup = _hand_semi_supervised(lab, labels, unl, fake)
    torch.testing.assert_close(sup, hand_sup, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(unsup, hand_unsup, rtol=1e-12, atol=1e-12)
    # Stable where the direct form is not: huge logits give finite losses.
    big = torch.full((2, 10), 800.0, dtype=torch.float64)
    assert all(map(torch.isfinite, improved_gan.semi_supervised_losses(big, labels[:2], big, -big)))


def test_feature_matching_loss_by_hand():
    g = torch.Generator().manual_seed(1)
    f_real, f_fake = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(5, 4, generator=g).double()
    diff = [sum(f_real[i, k] for i in range(6)) / 6 - sum(f_fake[i, k] for i in range(5)) / 5 for k in range(4)]
    hand = sum(d * d for d in diff) / 4
    torch.testing.assert_close(improved_gan.feature_matching_loss(f_real, f_fake), hand, rtol=1e-12, atol=1e-12)


def test_improved_gan_d_and_g_losses_are_the_formulas_on_its_outputs():
    """d_loss / g_loss on a small batch equal the hand formulas on D's outputs (eval mode: no noise layers, so the
    same fake images are rebuilt from the same seed)."""
    model = gmmodels.get("improved_gan", "tiny").double().eval()
    g = torch.Generator().manual_seed(2)
    real, labelled = torch.rand(6, 1, 28, 28, generator=g).double(), torch.rand(4, 1, 28, 28, generator=g).double()
    labels = torch.randint(10, (4,), generator=g)
    batch = GANBatch(real, labelled, labels)
    torch.manual_seed(5)
    loss_d, stats = model.d_loss(batch)
    torch.manual_seed(5)
    fake = model.decode(model.latent(6))
    hand_sup, hand_unsup = _hand_semi_supervised(model.discriminate(labelled)[0], labels,
                                                 model.discriminate(real)[0], model.discriminate(fake)[0])  # fmt: skip
    torch.testing.assert_close(loss_d, hand_sup + hand_unsup, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(stats["sup"], hand_sup, rtol=1e-10, atol=1e-12)
    torch.manual_seed(6)
    loss_g, _ = model.g_loss(batch)
    torch.manual_seed(6)
    f_fake = model.discriminate(model.decode(model.latent(6)))[1]
    hand_fm = (model.discriminate(real)[1].mean(0) - f_fake.mean(0)).square().mean()
    torch.testing.assert_close(loss_g, hand_fm, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", fast_backends(torch.device("cpu")))
def test_minibatch_discrimination_in_d_same_on_reference_and_fused(backend):
    """The discriminator with minibatch discrimination (real and generated halves as separate groups): backend
    "reference" and gm's fused kernels on the CPU ("cpu"; "triton" under the interpreter) give the same logits,
    features and parameter gradients (float64)."""
    ref = gmmodels.get("improved_gan", "tiny-md", backend="reference").double().eval()
    cpu = gmmodels.get("improved_gan", "tiny-md", backend=backend).double().eval()
    cpu.load_state_dict(ref.state_dict())
    x = torch.rand(9, 1, 28, 28, generator=torch.Generator().manual_seed(3)).double()
    outs = []
    for model in (ref, cpu):
        logits, f = model.discriminate(x, groups=[5, 4])
        (logits.square().sum() + f.sum()).backward()
        grads = {n: p.grad for n, p in model.discriminator.named_parameters()}
        outs.append((logits, grads))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-10, atol=1e-10)
    assert outs[0][1]["minibatch.T"].abs().sum() > 0
    for n, g_ref in outs[0][1].items():
        torch.testing.assert_close(outs[1][1][n], g_ref, rtol=1e-10, atol=1e-10, msg=n)
    # groups: each half is its own minibatch, as if discriminated alone.
    with torch.no_grad():
        torch.testing.assert_close(cpu.discriminate(x, groups=[5, 4])[0][:5], cpu.discriminate(x[:5])[0])
        assert not torch.allclose(cpu.discriminate(x)[0][:5], cpu.discriminate(x[:5])[0])


def test_mutual_information_bound_for_known_q_outputs():
    cat = torch.tensor([0, 3, 9, 9])
    cont = torch.tensor([[0.5, -1.0], [0.0, 0.2], [1.0, 1.0], [-0.3, 0.7]], dtype=torch.float64)
    # Q knows nothing (uniform logits) -> the categorical bound is 0; Q certain and right -> log K.
    mi_cat, _ = infogan.mutual_information_bound(torch.zeros(4, 10, dtype=torch.float64), cont, cat, cont)
    assert abs(mi_cat.item()) < 1e-12
    certain = F.one_hot(cat, 10).double() * 1e3
    mi_cat, mi_cont = infogan.mutual_information_bound(certain, cont, cat, cont)
    assert abs(mi_cat.item() - math.log(10)) < 1e-9
    # Q's mean exactly right: log N(c; c, 1) + H(U[-1, 1]) per code.
    assert abs(mi_cont.item() - 2 * (-0.5 * math.log(2 * math.pi) + math.log(2))) < 1e-12
    logits = torch.randn(4, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    q_mean = cont + 0.5
    mi_cat, mi_cont = infogan.mutual_information_bound(logits, q_mean, cat, cont)
    hand_cat = math.log(10) + sum(math.log(torch.softmax(logits[i], 0)[cat[i]].item()) for i in range(4)) / 4
    hand_cont = 2 * (-0.5 * math.log(2 * math.pi) - 0.5 * 0.25 + math.log(2))
    assert abs(mi_cat.item() - hand_cat) < 1e-12 and abs(mi_cont.item() - hand_cont) < 1e-12


def test_majority_code_error_maps_codes_to_majority_labels():
    # Code 0 -> mostly label 7, code 1 -> label 2, code 2 -> tie of 4 and 5 (smallest: 4), code 3 never in training
    # (the most frequent training label: 7).
    codes_train = torch.tensor([0, 0, 0, 1, 1, 2, 2, 0])
    labels_train = torch.tensor([7, 7, 1, 2, 2, 5, 4, 7])
    codes_test = torch.tensor([0, 1, 2, 3, 0, 1])
    labels_test = torch.tensor([7, 2, 4, 7, 1, 3])
    assert infogan.majority_code_error(codes_train, labels_train, codes_test, labels_test) == pytest.approx(100 * 2 / 6)
    # A permutation of the labels is a perfect clustering.
    y = torch.arange(10).repeat(3)
    assert infogan.majority_code_error((y * 7 + 3) % 10, y, (y * 7 + 3) % 10, y) == 0.0


def test_ridge_classifier_error_on_separable_and_random_features():
    g = torch.Generator().manual_seed(5)
    y = torch.randint(4, (200,), generator=g)
    f = F.one_hot(y, 4).float() * 3 + 0.1 * torch.randn(200, 4, generator=g)
    f = torch.cat([f, torch.randn(200, 30, generator=g)], dim=1)
    assert dcgan.ridge_classifier_error(f[:150], y[:150], f[150:], y[150:], l2=1e-3) == 0.0
    noise = torch.randn(200, 600, generator=g)  # more features than images: the dual form
    err = dcgan.ridge_classifier_error(noise[:150], y[:150], noise[150:], y[150:])
    assert err == dcgan.ridge_classifier_error(noise[:150], y[:150], noise[150:], y[150:]) and err > 40


def test_balanced_subset():
    labels = torch.arange(10).repeat_interleave(30)[torch.randperm(300, generator=torch.Generator().manual_seed(0))]
    idx = improved_gan.balanced_subset(labels, 25, seed=3)
    assert idx.numel() == 25 == idx.unique().numel()
    assert torch.bincount(labels[idx], minlength=10).tolist() == [3] * 5 + [2] * 5
    assert torch.equal(idx, improved_gan.balanced_subset(labels, 25, seed=3))
    assert not torch.equal(idx, improved_gan.balanced_subset(labels, 25, seed=4))
    with pytest.raises(ValueError, match="n_labels=400 needs 40 images of class 0"):
        improved_gan.balanced_subset(labels, 400, seed=0)


def test_infogan_grid_rows_vary_the_categorical_code():
    """generate(n): row r (image_grid_png's ceil(sqrt(n)) columns) uses code r mod K, columns share z and c2, c3."""
    model = gmmodels.get("infogan", "tiny").eval()
    seen = []
    model.decode = lambda latent: seen.append(latent) or torch.zeros(latent.shape[0], 1, 28, 28)
    model.generate(12, generator=torch.Generator().manual_seed(0))
    latent = seen[0]
    z, cat, cont = latent[:, :4], latent[:, 4:14].argmax(1), latent[:, 14:]
    assert cat.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert torch.equal(z[0], z[4]) and torch.equal(cont[1], cont[9]) and not torch.equal(z[0], z[1])


def test_data_init_normalises_the_first_layer():
    model = gmmodels.get("improved_gan", "tiny")
    x = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(6))
    model.data_init(x)
    first = model.discriminator["features"][2]
    assert isinstance(first, improved_gan.WeightNormLinear)
    y = first(x.flatten(1))
    torch.testing.assert_close(y.mean(0), torch.zeros(y.shape[1]), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.std(0), torch.ones(y.shape[1]), atol=1e-4, rtol=0)


@pytest.mark.parametrize(("name", "preset"), TINY, ids=lambda v: v)
def test_a_few_steps_change_both_networks_and_keep_losses_finite(name, preset):
    model = gmmodels.get(name, preset)
    opt_d = torch.optim.Adam(model.discriminator.parameters(), lr=1e-3, betas=model.betas)
    opt_g = torch.optim.Adam(model.generator.parameters(), lr=1e-3, betas=model.betas)
    g = torch.Generator().manual_seed(7)
    batch = GANBatch(torch.rand(8, 1, 28, 28, generator=g), torch.rand(8, 1, 28, 28, generator=g),
                         torch.randint(10, (8,), generator=g))  # fmt: skip
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(3):
        loss_d, stats = model.d_loss(batch)
        opt_d.zero_grad()
        loss_d.backward()
        opt_d.step()
        loss_g, _ = model.g_loss(batch)
        opt_g.zero_grad()
        loss_g.backward()
        opt_g.step()
        assert math.isfinite(loss_d.item()) and math.isfinite(loss_g.item())
        assert all(math.isfinite(v.item()) for v in stats.values())
    for part in ("generator", "discriminator"):
        changed = [k for k, v in model.state_dict().items() if k.startswith(part) and not torch.equal(v, before[k])]
        assert changed, part


def test_evaluate_returns_a_percentage():
    g = torch.Generator().manual_seed(8)
    x, y = torch.rand(30, 1, 28, 28, generator=g), torch.randint(10, (30,), generator=g)
    for name in ("improved_gan", "dcgan", "infogan"):
        value, unit = gmmodels.get(name, "tiny").evaluate(x[:10], y[:10], x[10:], y[10:])
        assert unit == "%" and 0.0 <= value <= 100.0
    with pytest.raises(ValueError, match="needs train_images and train_labels"):
        gmmodels.get("dcgan", "tiny").evaluate(x, y)


GPU_BACKENDS = fast_backends(torch.device("cuda")) if torch.cuda.is_available() else ["cuda", "triton"]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_minibatch_discriminator_matches_reference(backend):
    """The mnist-md discriminator (minibatch discrimination on gm's GPU kernels, three groups as in training) in
    float32 with tf32 off against the float64 reference on the CPU: class logits and every parameter gradient."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    dev = torch.device("cuda")
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        torch.manual_seed(0)
        ref = gmmodels.get("improved_gan", "mnist-md", backend="reference").double().eval()
        fast = gmmodels.get("improved_gan", "mnist-md", backend=backend).to(dev).eval()
        fast.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
        x = torch.rand(30, 1, 28, 28, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        outs = []
        for model, xin in ((ref, x), (fast, x.float().to(dev))):
            logits, f = model.discriminate(xin, groups=[10, 12, 8])
            (logits.square().sum() + f.sum()).backward()
            outs.append((logits.double().cpu(), {n: p.grad.double().cpu() for n, p in model.named_parameters()
                                                  if p.grad is not None}))  # fmt: skip
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    (want, want_g), (got, got_g) = outs
    err = ((got - want).norm() / want.norm()).item()
    assert err <= 1e-5, f"{backend} logits: relative error {err:.3g}"
    assert want_g.keys() == got_g.keys() and "discriminator.minibatch.T" in want_g
    for n, g in want_g.items():
        e = ((got_g[n] - g).norm() / max(g.norm().item(), 1e-300)).item()
        assert e <= 1e-4, f"{backend} d{n}: relative error {e:.3g}"
