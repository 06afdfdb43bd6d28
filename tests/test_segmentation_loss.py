"""The segmentation zoo's loss: class-weighted cross-entropy plus soft Dice (examples/segmentation_loss.py)."""

import pytest
import torch
import torch.nn.functional as F

from hdrq_examples.segmentation_loss import SegmentationLoss, soft_dice
from hdrq_examples.segmentation_scenes import BACKGROUND, NUM_CLASSES


def _masks() -> torch.Tensor:
    masks = torch.full((2, 8, 8), BACKGROUND)
    masks[0, 2:5, 2:5] = 3
    masks[1, 4:8, 1:3] = 7
    return masks


def _logits_for(predicted: torch.Tensor, margin: float = 20.0) -> torch.Tensor:
    return margin * F.one_hot(predicted, NUM_CLASSES).permute(0, 3, 1, 2).float()


def test_soft_dice_is_one_for_a_perfect_prediction_and_near_zero_for_a_missed_class():
    masks = _masks()
    assert torch.allclose(soft_dice(_logits_for(masks), masks, NUM_CLASSES), torch.ones(NUM_CLASSES), atol=1e-4)
    all_background = soft_dice(_logits_for(torch.full_like(masks, BACKGROUND)), masks, NUM_CLASSES)
    assert all_background[3] < 0.2 and all_background[7] < 0.2  # (0 + 1) / (9 + 1), (0 + 1) / (8 + 1)


def test_loss_is_weighted_cross_entropy_plus_dice_by_definition():
    torch.manual_seed(0)
    logits, masks = torch.randn(2, NUM_CLASSES, 8, 8), _masks()
    loss = SegmentationLoss(NUM_CLASSES, BACKGROUND, background_weight=0.25, dice_weight=0.5)
    weight = torch.ones(NUM_CLASSES)
    weight[BACKGROUND] = 0.25
    expected = F.cross_entropy(logits, masks, weight=weight) + 0.5 * (1 - soft_dice(logits, masks, NUM_CLASSES).mean())
    assert torch.allclose(loss(logits, masks), expected)
    plain = SegmentationLoss(NUM_CLASSES, BACKGROUND, background_weight=1.0, dice_weight=0.0)
    assert torch.allclose(plain(logits, masks), F.cross_entropy(logits, masks))


def test_painting_everything_background_costs_more_than_with_plain_cross_entropy():
    """The reason for the loss: the all-background answer must not be a cheap minimum."""
    masks = _masks()
    lazy = _logits_for(torch.full_like(masks, BACKGROUND), margin=3.0)
    plain = F.cross_entropy(lazy, masks)
    assert SegmentationLoss(NUM_CLASSES, BACKGROUND)(lazy, masks) > plain + 0.5


@pytest.mark.parametrize("changes", [{"background": NUM_CLASSES}, {"background_weight": 0.0}, {"dice_weight": -1.0},
                                     {"smooth": 0.0}])
def test_bad_loss_settings_are_refused(changes):
    with pytest.raises(ValueError):
        SegmentationLoss(**{"num_classes": NUM_CLASSES, "background": BACKGROUND, **changes})
