"""Augment: one batched definition for workers and devices; seeded, shape- and dtype-exact."""

from __future__ import annotations

import pytest
import torch

from cxrdist.data.transforms import Augment, to_float


def batch(dtype=torch.uint8, b=4, s=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    peak = 255 if dtype == torch.uint8 else 65535
    return torch.randint(0, peak + 1, (b, 1, s, s), generator=g, dtype=torch.int64).to(dtype)


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype,peak", [(torch.uint8, 255.0), (torch.int32, 65535.0)])
def test_eval_same_size_is_exact_normalisation(dtype, peak):
    x = batch(dtype)
    out = Augment(64, train=False, mean=0.5, std=0.25)(x)
    assert out.dtype == torch.float32 and out.shape == (4, 1, 64, 64)
    torch.testing.assert_close(out, (x.double() / peak - 0.5).div(0.25).float())
    assert torch.equal(out, Augment(64, train=False)(x))  # deterministic
    assert out.min() >= -2.0 and out.max() <= 2.0


def test_eval_resizes_when_sizes_differ():
    x = torch.full((2, 1, 64, 64), 200, dtype=torch.uint8)
    out = Augment(32, train=False)(x)
    assert out.shape == (2, 1, 32, 32)
    torch.testing.assert_close(out, torch.full_like(out, (200 / 255 - 0.5) / 0.25))
    assert Augment(48, train=False)(batch(b=2, s=80)[..., :60]).shape == (2, 1, 48, 48)  # non-square: crop


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32])
def test_train_seeded_and_resamples(dtype):
    x = batch(dtype, s=64)
    aug = Augment(48, train=True)
    a = aug(x, generator=gen(1))
    assert a.shape == (4, 1, 48, 48) and a.dtype == torch.float32
    assert torch.equal(a, aug(x, generator=gen(1)))
    assert not torch.allclose(a, aug(x, generator=gen(2)))
    assert torch.isfinite(a).all()
    assert a.min() >= (0 - 0.5) / 0.25 - 1e-6 and a.max() <= (1 - 0.5) / 0.25 + 1e-6
    # per-sample parameters: two copies of one image come out differently
    same = x[:1].repeat(2, 1, 1, 1)
    b = aug(same, generator=gen(3))
    assert not torch.allclose(b[0], b[1])


def test_train_with_no_randomness_is_the_identity():
    x = batch(torch.uint8, s=32)
    aug = Augment(32, train=True, rotate_deg=0, translate=0, scale=(1, 1), brightness=0, contrast=0)
    torch.testing.assert_close(aug(x, generator=gen(0)), Augment(32, train=False)(x), atol=1e-5, rtol=0)


def test_rotation_moves_pixels_and_keeps_the_centre():
    x = torch.zeros(1, 1, 33, 33, dtype=torch.uint8)
    x[..., 16, 16] = 255
    x[..., 16, 28] = 255
    aug = Augment(33, train=True, rotate_deg=30, translate=0, scale=(1, 1), brightness=0, contrast=0)
    out = aug(x, generator=gen(4))
    assert out[0, 0, 16, 16] > 1.5  # the centre stays put
    assert out[0, 0, 16, 28] < 0.5  # an off-centre point moved


def test_channels_and_memory_format():
    x = batch(torch.uint8, b=2, s=32)
    out = Augment(32, train=True, in_chans=3, channels_last=True)(x, generator=gen(0))
    assert out.shape == (2, 3, 32, 32) and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out[:, 0], out[:, 2])


def test_to_float_and_input_untouched():
    x = batch(torch.uint8, b=1, s=8)
    assert to_float(x).max() <= 1 and to_float(x).dtype == torch.float32
    f = to_float(x)
    g = to_float(f)
    g.add_(1)
    assert torch.equal(f, to_float(x))  # float input is copied, never modified in place
    assert to_float(torch.full((1,), 65535, dtype=torch.int32)).item() == 1.0
