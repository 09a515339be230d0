"""iBOT specifics (training, resume and export are covered with the other methods in test_ssl_methods.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lightly.loss import IBOTPatchLoss

from medfoundry.config import IBOTConfig, PretrainConfig
from medfoundry.errors import ModelError
from medfoundry.models.backbones import create_encoder
from medfoundry.ssl.base import StepValues
from medfoundry.ssl.ibot import IBOT, masked_patch_cross_entropy

SMALL = IBOTConfig(out_dim=64, hidden_dim=32, bottleneck_dim=16)


def test_cnn_backbones_are_refused_with_a_clear_message() -> None:
    with pytest.raises(ModelError, match="iBOT .* needs a ViT backbone; got resnet18"):
        IBOT(create_encoder("resnet18", in_chans=1, img_size=28, seed=0), PretrainConfig(method="ibot", ibot=SMALL))


def test_patch_loss_equals_lightly_ibot_loss_for_the_same_targets() -> None:
    """With centring targets (center zero at the first call) lightly's loss and ours must agree exactly."""
    torch.manual_seed(0)
    mask = torch.rand(6, 4, 4) < 0.4
    mask[0] = False  # an unmasked image counts as zero in both
    teacher, student = torch.randn(int(mask.sum()), 64), torch.randn(int(mask.sum()), 64)
    expected = IBOTPatchLoss(output_dim=64, student_temp=0.1)(teacher, student, mask, teacher_temp=0.07)
    ours = masked_patch_cross_entropy(F.softmax(teacher / 0.07, dim=-1), student, mask, student_temp=0.1)
    assert torch.allclose(ours, expected, atol=1e-6)


def test_masks_are_seeded_by_step_and_leave_the_cls_token() -> None:
    encoder = create_encoder("vit_tiny_28", in_chans=1, seed=0)
    method = IBOT(encoder, PretrainConfig(method="ibot", ibot=SMALL))
    a, b = method._block_masks(32, 7, step=5, device=torch.device("cpu")), method._block_masks(32, 7, 5, "cpu")
    c = method._block_masks(32, 7, step=6, device=torch.device("cpu"))
    assert torch.equal(a, b) and not torch.equal(a, c)
    per_image = a.flatten(1).float().mean(dim=1)
    # Half the images are masked, each with at most mask_ratio_max of its 49 patches.
    assert int((per_image > 0).sum()) == 16 and float(per_image.max()) <= SMALL.mask_ratio_max + 1e-6

    views = [torch.randn(8, 1, 28, 28), torch.randn(8, 1, 28, 28), torch.randn(8, 1, 16, 16)]
    values = StepValues(step=0, epoch=0, lr=1e-4, weight_decay=0.04, momentum=0.99, teacher_temp=0.04)
    output = method.training_step(views, values)
    assert torch.isfinite(output.loss)
    assert {"teacher_entropy", "teacher_patch_entropy"} <= set(output.monitor_extra)
    assert 0.0 < output.logs["masked_share"] <= SMALL.mask_ratio_max
