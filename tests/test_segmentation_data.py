"""The offline segmentation benchmark: digit scenes per domain, their splits, and mIoU."""

import pytest
import torch

from hdrq_examples.segmentation_metrics import (
    confusion_matrix,
    iou_per_class,
    mean_iou,
    mean_iou_from_confusion,
)
from hdrq_examples.segmentation_scenes import (
    BACKGROUND,
    NUM_CLASSES,
    SEGMENTATION_DOMAINS,
    SOURCE_DOMAIN,
    load_scene_domain,
)

SMALL = {"train": 8, "calib": 4, "val": 4, "test": 6}


@pytest.mark.parametrize("domain", SEGMENTATION_DOMAINS)
def test_scenes_label_every_pixel_with_a_digit_or_background(domain):
    splits = load_scene_domain(domain, scenes=SMALL)
    for split in ("train", "calib", "val", "test"):
        images, masks = getattr(splits, split).tensors
        assert images.shape == (SMALL[split], 3, 32, 32) and masks.shape == (SMALL[split], 32, 32)
        assert images.min() >= 0 and images.max() <= 1
        assert masks.dtype == torch.int64 and set(masks.unique().tolist()) <= set(range(NUM_CLASSES))
    masks = splits.train.tensors[1]
    assert (masks == BACKGROUND).any() and (masks != BACKGROUND).any()


def test_scenes_are_deterministic_per_seed():
    a, b = load_scene_domain(SOURCE_DOMAIN, scenes=SMALL), load_scene_domain(SOURCE_DOMAIN, scenes=SMALL)
    other = load_scene_domain(SOURCE_DOMAIN, scenes=SMALL, seed=1)
    assert torch.equal(a.test.tensors[0], b.test.tensors[0]) and torch.equal(a.test.tensors[1], b.test.tensors[1])
    assert not torch.equal(a.test.tensors[1], other.test.tensors[1])


def test_splits_are_drawn_from_different_scenes():
    splits = load_scene_domain(SOURCE_DOMAIN, scenes={"train": 16, "calib": 16, "val": 16, "test": 16})
    assert not torch.equal(splits.train.tensors[0], splits.test.tensors[0])
    assert not torch.equal(splits.val.tensors[0], splits.test.tensors[0])


def test_target_domains_shift_the_appearance():
    def background_colour(domain):
        images, masks = load_scene_domain(domain, scenes=SMALL).test.tensors
        return images.permute(1, 0, 2, 3)[:, masks == BACKGROUND].mean(1)

    source = background_colour(SOURCE_DOMAIN)
    assert (background_colour("seg-textured") - source).abs().max() > 0.2  # photo textures, not dark
    ink = {d: (load_scene_domain(d, scenes=SMALL).test.tensors[1] != BACKGROUND).float().mean()
           for d in (SOURCE_DOMAIN, "seg-strokes")}
    assert ink["seg-strokes"] > 1.3 * ink[SOURCE_DOMAIN]  # thicker strokes


def test_scene_counts_must_be_positive():
    with pytest.raises(ValueError, match="positive"):
        load_scene_domain(SOURCE_DOMAIN, scenes={"test": 0})


def test_unknown_domain_is_refused():
    with pytest.raises(ValueError, match="unknown segmentation domain"):
        load_scene_domain("cityscapes")


def test_mean_iou_of_a_perfect_prediction_is_one():
    labels = torch.tensor([[0, 1], [2, 2]])
    assert mean_iou_from_confusion(confusion_matrix(labels, labels, 3)) == 1.0


def test_mean_iou_follows_the_definition():
    labels = torch.tensor([0, 0, 1, 1])
    predictions = torch.tensor([0, 1, 1, 1])
    # class 0: TP 1, FN 1 -> 1/2; class 1: TP 2, FP 1 -> 2/3; class 2 absent everywhere: ignored
    iou = iou_per_class(confusion_matrix(predictions, labels, 3))
    assert iou[:2].tolist() == pytest.approx([0.5, 2 / 3]) and torch.isnan(iou[2])
    assert mean_iou_from_confusion(confusion_matrix(predictions, labels, 3)) == pytest.approx((0.5 + 2 / 3) / 2)


def test_confusion_refuses_labels_out_of_range_and_shape_mismatch():
    with pytest.raises(ValueError, match="labels must lie"):
        confusion_matrix(torch.tensor([0]), torch.tensor([5]), 3)
    with pytest.raises(ValueError, match="differ in shape"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0]), 3)


def test_mean_iou_of_a_model_counts_pixels_over_the_whole_set():
    class Constant(torch.nn.Module):  # predicts background everywhere
        def forward(self, x):
            logits = torch.zeros(len(x), NUM_CLASSES, *x.shape[-2:])
            logits[:, BACKGROUND] = 1.0
            return logits

    data = load_scene_domain(SOURCE_DOMAIN, scenes=SMALL).test
    masks = data.tensors[1]
    background_iou = (masks == BACKGROUND).float().mean().item()  # TP / (all pixels)
    digit_classes = len(set(masks.unique().tolist()) - {BACKGROUND})
    assert mean_iou(Constant(), data, NUM_CLASSES) == pytest.approx(background_iou / (1 + digit_classes))


def test_segmentation_zoo_is_cached_and_a_corrupt_cache_is_rebuilt(tmp_path):
    from hdrq_examples.segmentation_zoo import SegmentationRecipe, load_or_build_segmentation_zoo

    recipe = SegmentationRecipe.tiny(scenes={"train": 16, "calib": 4, "val": 4, "test": 4})
    built = load_or_build_segmentation_zoo(recipe, cache_dir=tmp_path)
    cached = load_or_build_segmentation_zoo(recipe, cache_dir=tmp_path)
    assert not built.from_cache and cached.from_cache
    for target in recipe.target_domains:
        for a, b in zip(built.adapted[target].state_dict().values(), cached.adapted[target].state_dict().values(), strict=True):
            assert torch.equal(a, b)
    built.cache_path.write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match="unusable"):
        rebuilt = load_or_build_segmentation_zoo(recipe, cache_dir=tmp_path)
    assert not rebuilt.from_cache


def test_segmentation_recipe_refuses_the_source_as_a_target():
    from hdrq_examples.segmentation_zoo import SegmentationRecipe

    with pytest.raises(ValueError, match="exclude"):
        SegmentationRecipe(target_domains=(SOURCE_DOMAIN,))


def test_segmentation_cache_key_follows_the_loss_and_the_width():
    from hdrq_examples.segmentation_loss import SegmentationLoss
    from hdrq_examples.segmentation_zoo import SegmentationRecipe

    base = SegmentationRecipe.tiny()
    assert SegmentationRecipe.tiny().cache_key() == base.cache_key()
    assert SegmentationRecipe.tiny(width=8).cache_key() != base.cache_key()
    plain = SegmentationLoss(NUM_CLASSES, BACKGROUND, background_weight=1.0, dice_weight=0.0)
    assert SegmentationRecipe.tiny(loss=plain).cache_key() != base.cache_key()
