"""Shapes, dtypes and the training step of the three networks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vaegan.models import VAEGAN, AdversarialLoss, KLDivergence, ModelConfig, ReconstructionLoss
from vaegan.trainer.step import Losses, Optimizers, random_masks, shape_negatives, train_step


@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32), (1, 64), (3, 100), (3, 256)])
def test_shapes_and_dtypes(channels: int, size: int) -> None:
    cfg = ModelConfig(num_channels=channels, image_size=size, latent_dim=8, base_width=4)
    m = VAEGAN(cfg).eval()
    x = torch.rand(2, channels, size, size) * 2 - 1
    mu, logvar = m.encoder(x)
    assert mu.shape == logvar.shape == (2, 8) and mu.dtype == torch.float32
    x_hat = m.generator(mu)
    assert x_hat.shape == x.shape
    assert float(x_hat.detach().abs().max()) <= 1.0  # tanh range
    logit, feats, patch = m.discriminator(x)
    assert logit.shape == (2, 1)
    assert feats.shape == (2, cfg.feature_dim)
    assert patch is not None and patch.shape == (2, 1, size, size)  # per-pixel logits at image size
    # a config saved before the patch head existed rebuilds a network without one
    old = ModelConfig.from_dict({k: v for k, v in cfg.to_dict().items() if k != "patch_head"})
    assert old.patch_head is False and VAEGAN(old).discriminator(x)[2] is None
    assert cfg.work_size % 2**cfg.num_stages == 0 and cfg.bottom_size >= 2


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="image_size"):
        ModelConfig(image_size=20)
    with pytest.raises(ValueError, match="num_channels"):
        ModelConfig(num_channels=2)
    assert ModelConfig.from_dict(ModelConfig(latent_dim=7).to_dict()).latent_dim == 7


def test_reconstruct_is_deterministic() -> None:
    m = VAEGAN(ModelConfig(num_channels=1, image_size=28, latent_dim=8, base_width=4)).eval()
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    assert torch.equal(m.reconstruct(x), m.reconstruct(x))


def test_losses_known_values() -> None:
    kl = KLDivergence(weight=2.0)
    assert float(kl(torch.zeros(4, 3), torch.zeros(4, 3))) == 0.0
    # mu = 1 in each of 3 dims: KL = 0.5 * 3 per sample
    assert float(kl(torch.ones(4, 3), torch.zeros(4, 3))) == pytest.approx(2.0 * 1.5)
    rec = ReconstructionLoss(feature_weight=2.0, pixel_weight=3.0)
    f, p = rec(torch.zeros(2, 4), torch.ones(2, 4), torch.zeros(2, 5), torch.full((2, 5), 2.0))
    assert float(f) == pytest.approx(8.0) and float(p) == pytest.approx(3.0)
    # a perfect D: BCE on confident logits, LSGAN on exact 1/0 outputs
    for kind, real_v, fake_v in (("bce", 10.0, -10.0), ("lsgan", 1.0, 0.0)):
        adv = AdversarialLoss(kind)
        real, fake = torch.full((4, 1), real_v), torch.full((4, 1), fake_v)
        assert float(adv.discriminator_loss(real, fake, fake)) < 0.01
        assert float(adv.generator_loss(fake)) >= 1.0  # fooled nobody
        assert float(adv.generator_loss(real)) < 0.01  # fooled D completely
    assert float(AdversarialLoss("none").generator_loss(torch.zeros(4, 1))) == 0.0


def _setup(seed: int = 0, adv: str = "bce"):
    torch.manual_seed(seed)
    cfg = ModelConfig(num_channels=1, image_size=28, latent_dim=8, base_width=8)
    m = VAEGAN(cfg)
    opt = Optimizers(*(torch.optim.Adam(n.parameters(), lr=1e-3, betas=(0.5, 0.999)) for n in (m.encoder, m.generator, m.discriminator)))
    losses = Losses(KLDivergence(1.0 / 784), ReconstructionLoss(1.0, 1.0), AdversarialLoss(adv, 0.01))
    return m, opt, losses


@pytest.mark.parametrize("adv", ["bce", "lsgan", "none"])
def test_train_step_lowers_loss_on_fixed_batch(adv: str) -> None:
    m, opt, losses = _setup(adv=adv)
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(16, 1, 28, 28, generator=g) > 0.7).float() * 2 - 1
    first = train_step(m, x, opt, losses)
    assert set(first) == {"kl", "recon_feature", "recon_pixel", "adv_g", "adv_d", "patch_d"}
    for _ in range(30):
        last = train_step(m, x, opt, losses)
    assert last["recon_pixel"] < 0.7 * first["recon_pixel"]


def test_train_step_updates_each_network_with_its_own_loss() -> None:
    m, opt, losses = _setup()
    before = {k: [p.detach().clone() for p in getattr(m, k).parameters()] for k in ("encoder", "generator", "discriminator")}
    x = torch.rand(8, 1, 28, 28) * 2 - 1
    train_step(m, x, opt, losses, mask=random_masks(8, 28))
    for k, ps in before.items():
        changed = any(not torch.equal(a, b) for a, b in zip(ps, getattr(m, k).parameters(), strict=True))
        assert changed, f"{k} was not updated"


def test_random_masks_cover_a_rectangle() -> None:
    m = random_masks(50, 32, generator=torch.Generator().manual_seed(0))
    assert m.shape == (50, 1, 32, 32)
    area = m.sum(dim=(1, 2, 3))
    assert bool((area >= 16).all()) and bool((area <= 16 * 16).all())


def test_hole_masks_cover_their_share_and_repeat_per_seed() -> None:
    """The training holes: a centred square of a quarter of the image (moved a little), free-form
    strokes of about 10-30%, rectangles; each kind deterministic per seed; a mix draws them all."""
    from vaegan.trainer.step import hole_masks

    def share(kind: str) -> torch.Tensor:
        return hole_masks(100, 32, [kind], torch.Generator().manual_seed(1)).flatten(1).mean(1)

    assert torch.equal(share("centre"), torch.full((100,), 0.25))
    strokes = share("strokes")
    assert float(strokes.mean()) > 0.08 and float(strokes.max()) < 0.4 and float(strokes.min()) > 0.0
    rects = share("rects")
    assert float(rects.min()) >= 16 / 32**2 and float(rects.max()) <= 0.25
    mix = hole_masks(300, 32, ["rects", "centre", "strokes"], torch.Generator().manual_seed(2))
    centred = (mix.flatten(1).mean(1) == 0.25) & (mix[:, 0, 16, 16] == 1)
    assert 60 < int(centred.sum()) < 160  # about a third are centre squares
    again = hole_masks(300, 32, ["rects", "centre", "strokes"], torch.Generator().manual_seed(2))
    assert torch.equal(mix, again) and set(mix.unique().tolist()) == {0.0, 1.0}
    with pytest.raises(ValueError, match="hole kinds must be among rects, centre, strokes"):
        hole_masks(4, 32, ["circles"])


def test_hole_weight_adds_the_hole_error_to_the_pixel_loss() -> None:
    from vaegan.trainer.config import TrainConfig
    from vaegan.trainer.step import StepNoise

    x = torch.rand(8, 1, 28, 28) * 2 - 1
    mask = random_masks(8, 28, generator=torch.Generator().manual_seed(0))
    terms = {}
    for w in (0.0, 4.0):
        m, opt, losses = _setup()
        terms[w] = train_step(m, x, opt, losses, mask=mask, noise=StepNoise.seeded(3), hole_weight=w)
    assert terms[4.0]["recon_pixel"] > terms[0.0]["recon_pixel"] * 1.5
    assert terms[4.0]["kl"] == terms[0.0]["kl"]  # the same step otherwise
    with pytest.raises(ValueError, match="hole_kinds: unknown kind"):
        TrainConfig(hole_kinds="rects,blobs")


def test_instance_noise_reaches_only_the_discriminator_update() -> None:
    """d_noise perturbs D's own inputs: with the same seed D's step differs, E/G see clean x."""
    x = torch.rand(8, 1, 28, 28) * 2 - 1
    runs = {}
    for noise in (0.0, 0.5):
        m, opt, losses = _setup(seed=3)
        torch.manual_seed(7)
        terms = train_step(m, x, opt, losses, d_noise=noise)
        runs[noise] = (terms, [p.detach().clone() for p in m.discriminator.parameters()])
    (t0, d0), (t1, d1) = runs[0.0], runs[0.5]
    assert t0["adv_d"] != t1["adv_d"]  # D's loss was computed on noisy inputs
    assert any(not torch.equal(a, b) for a, b in zip(d0, d1, strict=True))


def _digits(n: int) -> torch.Tensor:
    """Stroke images: background -1, a bright bar per image at a different place."""
    x = torch.full((n, 1, 28, 28), -1.0)
    for i in range(n):
        x[i, 0, 4 + (i * 5) % 20, 4:24] = 1.0
        x[i, 0, 4:24, 4 + (i * 7) % 20] = 0.5
    return x


def test_shape_negatives_erase_paste_swap_rot() -> None:
    x = _digits(6)
    gen = torch.Generator().manual_seed(0)
    erased, masks = shape_negatives(x, ("erase",), gen)
    changed = erased != x
    assert bool((masks[:, 0][changed[:, 0]] == 1).all())  # every changed pixel is in its mask
    assert bool(changed.any())
    assert bool((erased[changed] == -1.0).all())  # filled with the background (the median)
    for i in range(6):  # one box of 7..14 rows and columns changed at most
        rows, cols = changed[i, 0].any(1).nonzero(), changed[i, 0].any(0).nonzero()
        if len(rows):
            assert int(rows.max() - rows.min()) < 14 and int(cols.max() - cols.min()) < 14
    pasted, _ = shape_negatives(x, ("paste",), gen)
    assert bool((pasted >= x).all()) and bool((pasted > x).any())  # strokes added, none cut
    swapped, _ = shape_negatives(x, ("swap",), gen)
    for i in range(6):
        assert torch.equal(swapped[i], torch.roll(x[i], 14, dims=1)) or torch.equal(swapped[i], torch.roll(x[i], 14, dims=2))
    rotated, _ = shape_negatives(x, ("rot",), gen)
    for i in range(6):
        assert any(torch.equal(rotated[i], torch.rot90(x[i], k, dims=(1, 2))) for k in (1, 3))
    # the same generator state gives the same negatives; the input is never modified
    a, _ = shape_negatives(x, ("erase", "paste"), torch.Generator().manual_seed(5))
    b, _ = shape_negatives(x, ("erase", "paste"), torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and torch.equal(x, _digits(6))
    with pytest.raises(ValueError, match="unknown negative kind 'blur'"):
        shape_negatives(x, ("blur",), gen)


def test_local_negatives_are_small_and_masked() -> None:
    """``local``: one small defect per image, every altered pixel inside its mask, the mask a
    few percent of the image at most, and on the image's content."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(16, 3, 64, 64, generator=g) * 2 - 1
    out, masks = shape_negatives(x, ("local",), torch.Generator().manual_seed(2))
    changed = (out != x).any(1)  # (B, H, W)
    assert bool(changed.any())
    assert bool((masks[:, 0][changed] == 1).all())
    frac = masks.flatten(1).mean(1)
    assert float(frac.max()) < 0.05 and int((frac > 0).sum()) >= 12


def test_patch_loss_trains_d_to_find_local_defects() -> None:
    """A few D updates with ``local`` negatives lower D's per-pixel loss, and its per-pixel
    logits then rank the defect pixels of a new negative below (more fake than) the rest."""
    from vaegan.trainer.step import patch_loss

    torch.manual_seed(0)
    cfg = ModelConfig(num_channels=1, image_size=32, latent_dim=8, base_width=8)
    D = VAEGAN(cfg).discriminator
    opt = torch.optim.Adam(D.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    base = torch.linspace(-1, 1, 32)[None, None, :, None].expand(1, 1, 32, 32)
    losses = []
    for _ in range(60):
        x = (base + 0.05 * torch.randn(16, 1, 32, 32, generator=g)).clamp(-1, 1)
        neg, m = shape_negatives(x, ("local",), g)
        _, _, p = D(torch.cat([x, neg]))
        loss = patch_loss(p[:16], [], p[16:], m)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:5])
    x = (base + 0.05 * torch.randn(8, 1, 32, 32, generator=g)).clamp(-1, 1)
    neg, m = shape_negatives(x, ("local",), g)
    with torch.no_grad():
        _, _, p = D(neg)
    inside, outside = p[m > 0], p[m == 0]
    assert float(inside.mean()) < float(outside.mean())


def test_shape_negatives_reach_only_the_discriminator_update() -> None:
    """With d_negatives D's loss has a fourth batch of fakes; E and G see the same inputs."""
    x = _digits(8)
    runs = {}
    for kinds in ((), ("erase",)):
        m, opt, losses = _setup(seed=3)
        torch.manual_seed(7)
        terms = train_step(m, x, opt, losses, d_negatives=kinds)
        runs[kinds] = (terms, [p.detach().clone() for p in m.discriminator.parameters()])
    (t0, d0), (t1, d1) = runs[()], runs[("erase",)]
    assert t0["adv_d"] != t1["adv_d"]
    assert any(not torch.equal(a, b) for a, b in zip(d0, d1, strict=True))


def test_d_negatives_config() -> None:
    from vaegan.trainer.config import TrainConfig

    assert TrainConfig(d_negatives="erase, paste").negative_kinds == ("erase", "paste")
    assert TrainConfig().negative_kinds == ("erase", "local")  # the default: see README
    assert TrainConfig(d_negatives="").negative_kinds == ()
    with pytest.raises(ValueError, match=r"d_negatives: unknown kind\(s\) \['blur'\]"):
        TrainConfig(d_negatives="erase,blur")


def test_discriminator_learning_rate_scale() -> None:
    from vaegan.trainer.config import TrainConfig
    from vaegan.trainer.loop import _build

    cfg = TrainConfig(lr=1e-3, d_lr_scale=0.25)
    _, opt, _ = _build(ModelConfig(num_channels=1, image_size=28, latent_dim=8, base_width=4), cfg, torch.device("cpu"))
    assert opt.discriminator.param_groups[0]["lr"] == pytest.approx(2.5e-4)
    assert opt.encoder.param_groups[0]["lr"] == opt.generator.param_groups[0]["lr"] == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="d_lr_scale"):
        TrainConfig(d_lr_scale=0)
    with pytest.raises(ValueError, match="d_noise"):
        TrainConfig(d_noise=-1)


def test_each_negative_depends_on_its_own_draws_only() -> None:
    """Images altered as a batch: image i's negative is a function of image i and row i of the
    draws alone (what data-parallel ranks rely on), for every kind but ``paste`` (which takes the
    next image of the batch); the input is never modified."""
    from vaegan.trainer.step import NEGATIVE_DRAWS

    g = torch.Generator().manual_seed(3)
    x = torch.rand(12, 3, 24, 32, generator=g) * 2 - 1  # not square: rows and columns kept apart
    draws = torch.rand(12, NEGATIVE_DRAWS, generator=g)
    before = x.clone()
    out, masks = shape_negatives(x, ("erase", "swap", "local"), draws=draws)
    perm = torch.randperm(12, generator=g)
    out_p, masks_p = shape_negatives(x[perm], ("erase", "swap", "local"), draws=draws[perm])
    assert torch.equal(out_p, out[perm]) and torch.equal(masks_p, masks[perm])
    assert torch.equal(x, before)
    assert bool(((out != x).any(1) <= (masks[:, 0] > 0)).all())  # nothing altered outside a mask
    # one image alone equals its row of the batch
    one, _ = shape_negatives(x[5:6], ("erase", "swap", "local"), draws=draws[5:6])
    assert torch.equal(one[0], out[5])


def test_local_negatives_cover_every_kind_of_defect() -> None:
    """The four local defects (blob, line, copied patch, dark spot) all occur, each a connected
    small region centred on content at least as bright as the image's median."""
    from vaegan.trainer.step import NEGATIVE_DRAWS

    g = torch.Generator().manual_seed(4)
    n = 64
    x = torch.rand(n, 1, 32, 32, generator=g) * 2 - 1
    draws = torch.rand(n, NEGATIVE_DRAWS, generator=g)
    out, masks = shape_negatives(x, ("local",), draws=draws)
    sub = (draws[:, 3] * 4).floor().long()  # the defect kind of each image
    assert set(sub.tolist()) == {0, 1, 2, 3}
    dark = sub == 3
    # a dark spot only darkens; a copied patch holds pixels of the same image
    assert bool((out[dark] <= x[dark] + 1e-6).all())
    area = masks.flatten(1).sum(1)
    assert bool((area >= 1).all()) and float(area.max()) < 0.06 * 32 * 32
