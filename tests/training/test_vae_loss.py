"""The VAE's foreground-balanced reconstruction loss (vae.foreground_balance) and its mask."""
from __future__ import annotations

import pytest
import torch

from ldm_deploy.errors import LdmError
from training.stages.vae import VAEObjective, balanced_mean, foreground_mask


def _image(bg=(-1.0, -1.0, -1.0), fg=(1.0, -1.0, -1.0), box=(2, 5, 3, 7), size=16) -> torch.Tensor:
    x = torch.tensor(bg).view(3, 1, 1).expand(3, size, size).clone()
    y0, y1, x0, x1 = box
    x[:, y0:y1, x0:x1] = torch.tensor(fg).view(3, 1, 1)
    return x


def test_mask_is_the_object_on_a_flat_background():
    x = torch.stack([_image(), _image(bg=(0.2, 0.4, 0.6), fg=(0.2, 0.45, 0.6), box=(0, 4, 0, 4))])
    mask = foreground_mask(x, 0.1)
    assert mask.shape == (2, 1, 16, 16)
    assert mask[0, 0, 2:5, 3:7].all() and mask[0].sum() == 12
    assert not mask[1].any()                     # a 0.05 difference is under the threshold


def test_balanced_mean_gives_the_object_its_share_whatever_its_size():
    x = _image().unsqueeze(0)
    mask = foreground_mask(x, 0.1)
    err = torch.zeros_like(x)
    err[:, :, 2:5, 3:7] = 1.0                    # all error on the 12 object pixels
    assert balanced_mean(err, mask, 0.5).item() == pytest.approx(0.5)
    assert balanced_mean(err, mask, 0.25).item() == pytest.approx(0.25)
    assert err.mean().item() == pytest.approx(12 / 256)      # the plain mean hides it


def test_images_without_foreground_fall_back_to_the_plain_mean():
    err = torch.rand(2, 3, 8, 8)
    empty = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    assert balanced_mean(err, empty, 0.5).item() == pytest.approx(err.mean().item())
    assert balanced_mean(err, ~empty, 0.5).item() == pytest.approx(err.mean().item())


def test_objective_rejects_a_share_out_of_range():
    with pytest.raises(LdmError, match="foreground_balance"):
        VAEObjective(torch.nn.Identity(), "l1", 1e-6, foreground_balance=1.0)
