"""Dense-prediction models (U-Net, DeepLab): conversion, calibration, merge, export, validation."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hdrq_examples.segmentation_models import SEGMENTATION_MODELS, UNet, build_segmentation_model
from hdrq_plugin import merge_models, quantize_model
from hdrq_plugin.convert import calibrate_activations
from hdrq_plugin.convert.to_brevitas import convert_to_brevitas
from hdrq_plugin.data import plain_tensor
from hdrq_plugin.export import export_qdq, validate
from hdrq_plugin.export.validation.ort_runtime import FLOAT_COMPUTE_OPS
from hdrq_plugin.export.validation.parity import DatasetParity, ParityTolerance, certified_logit_ties
from hdrq_plugin.export.validation.validate import _kernel_failures

FAST = {"batch_sizes": (1,), "repeats": 2}  # latency is measured, not judged, here
SIZE = 32


def _batches(count: int, seed: int, batch: int = 8, size: int = SIZE):
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(batch, 3, size, size, generator=gen) for _ in range(count)]


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_segmentation_model(name).eval()
    with torch.no_grad():  # random BN statistics, so folding is exercised with non-trivial values
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
    return model


@pytest.mark.parametrize("name", SEGMENTATION_MODELS)
@pytest.mark.parametrize("shape", [(32, 32), (48, 64), (30, 30), (33, 47), (5, 7), (1, 1)])
def test_segmentation_models_return_per_pixel_logits_at_input_size(name, shape):
    x = torch.rand(2, 3, *shape)
    assert _model(name)(x).shape == (2, 11, *shape)
    qmodel = calibrate_activations(convert_to_brevitas(_model(name), "w8a8"), [x])
    assert qmodel(x).shape == (2, 11, *shape)


@pytest.mark.parametrize("name", SEGMENTATION_MODELS)
@pytest.mark.parametrize("bits", ["w8a8", "w4a4", "w3a3"])
def test_segmentation_model_exports_as_integer_qdq_and_agrees_per_pixel(name, bits, tmp_path):
    qmodel = calibrate_activations(convert_to_brevitas(_model(name), bits), _batches(4, seed=1))
    path = export_qdq(qmodel, tmp_path / f"{name}.onnx", example_input=_batches(1, seed=2, batch=2)[0],
                      weights="int8")  # the export's self-check runs all four ORT levels
    report = validate(path, qmodel, {"random": [(x, None) for x in _batches(2, seed=3)]}, **FAST)
    assert report.ok, report.failures
    assert report.parity["random"].predictions == 2 * 8 * SIZE * SIZE  # one prediction per pixel
    # every pixel whose prediction changed is a certified tie (the classification rule, per pixel):
    # a random untrained net has near-equal logits on some pixels, so the raw rate is not 100 %
    parity = report.parity["random"]
    changed = parity.predictions - parity.top1_agreeing
    assert parity.top1_changed_uncertified == 0
    assert changed == parity.tie_flip_predictions + parity.logit_tie_predictions
    assert report.top1_agreement["random"] >= 0.99  # ties are rare: a broken file changes far more
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in _model(name).modules())
    assert report.integer_kernels == {"QLinearConv": convs}  # every conv, the logits head included
    # onnxruntime has no integer ConvTranspose: the U-Net's one up-convolution stays float
    assert report.float_compute_ops == ({"ConvTranspose": 1} if name == "unet" else {})


def test_unet_crop_changes_no_value_at_multiples_of_four():
    # the odd-size crop and ceil-mode pools are no-ops where the old U-Net ran: the cached zoo's
    # weights give the same float and quantized outputs (the crop keeps the concat's unsigned grid)
    x = _batches(1, seed=5)[0]

    class Uncropped(UNet):  # the U-Net before odd sizes were supported
        def forward(self, x):
            skip1 = self.enc1(x)
            skip2 = self.enc2(self.pool1(skip1))
            y = self.dec2(torch.cat([self.relu_up2(self.up2(self.bottleneck(self.pool2(skip2)))), skip2], dim=1))
            y = F.interpolate(self.reduce1(y), size=skip1.shape[-2:], mode="bilinear", align_corners=False)
            y = self.dec1(torch.cat([y, skip1], dim=1))
            return self.head(F.interpolate(F.max_pool2d(y, 2), scale_factor=2.0, mode="nearest") + self.refine(y))

    old = _model("unet")
    old.__class__ = Uncropped
    assert torch.equal(old(x), _model("unet")(x))
    quantized = [calibrate_activations(convert_to_brevitas(m, "w4a4"), [x]) for m in (old, _model("unet"))]
    assert torch.equal(*(plain_tensor(q(x)) for q in quantized))


@pytest.mark.parametrize("shape", [(33, 47), (1, 1)])
def test_unet_exports_and_agrees_per_pixel_at_odd_sizes(shape, tmp_path):
    x = torch.rand(4, 3, *shape, generator=torch.Generator().manual_seed(6))
    qmodel = calibrate_activations(convert_to_brevitas(_model("unet"), "w4a4"), [x])
    path = export_qdq(qmodel, tmp_path / "unet.onnx", example_input=x[:1], weights="int8")
    report = validate(path, qmodel, {"random": [(x, None)]}, **FAST)
    assert report.ok, report.failures
    assert report.integer_kernels == {"QLinearConv": 9} and report.float_compute_ops == {"ConvTranspose": 1}


def test_segmentation_models_calibrate_with_hdrq_merge_and_export(tmp_path):
    data = _batches(4, seed=4, size=16)  # 32 samples: the engine's calibration set
    models = []
    for seed in (0, 1):
        float_model = _model("unet")
        with torch.no_grad():  # two "adapted" models: the same source, slightly moved
            for p in float_model.parameters():
                p.add_(1e-2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
        models.append(quantize_model(float_model, data, method="hdrq", bits="w4a4", iterations=2,
                                     source=_model("unet")).model)
    merged = merge_models(models)
    path = export_qdq(merged, tmp_path / "merged.onnx", example_input=data[0][:2])
    report = validate(path, merged, {"random": [(x, None) for x in data[:1]]}, **FAST)
    assert report.ok, report.failures


def test_dense_parity_counts_changed_pixels_against_the_agreement_floor():
    reference = np.zeros((2, 3, 4, 4), dtype=np.float32)
    reference[:, 0] = 1.0  # class 0 everywhere
    candidate = reference.copy()
    candidate[0, 1, 0, :] = 2.0  # four pixels of the first sample flip to class 1
    tally = DatasetParity()
    tally.add_outputs(reference, candidate, np.zeros((2, 4, 4), dtype=np.int64), None,
                      codes_agree=np.array([False, True]))
    assert tally.predictions == 32 and tally.top1_agreeing == 28
    assert tally.accuracy() == {"onnxruntime": 28 / 32, "pytorch": 1.0}
    tally.add_top1_causes(np.zeros(2, bool), np.zeros(2, bool), np.array([True, False]),
                          changed_predictions=np.array([4, 0]))
    failures = tally.failures("d", ParityTolerance(), None)
    assert any("not rounding ties" in f for f in failures) and any("87.50 %" in f for f in failures)


def test_dense_parity_counts_certified_tie_pixels_as_agreeing():
    reference = np.zeros((1, 2, 10, 10), dtype=np.float32)
    candidate = reference.copy()
    candidate[0, 1, 0, 0] = 1.0
    tally = DatasetParity()
    tally.add_outputs(reference, candidate, None, None, codes_agree=np.array([False]))
    tally.add_top1_causes(np.zeros(1, bool), np.array([True]), np.zeros(1, bool), changed_predictions=np.array([1]))
    assert tally.top1_agreement == 0.99 and tally.tie_flip_predictions == 1
    assert tally.failures("d", ParityTolerance(), None) == []


def test_dense_logit_ties_are_certified_only_when_every_changed_pixel_is_within_2b():
    reference = np.zeros((2, 2, 4, 4), dtype=np.float32)
    reference[:, 0] = 1.0
    reference[:, 1] = 1.0 - 1e-6  # every pixel: class 0 wins by 1e-6
    reference[1, 1, 3, 3] = 0.5  # sample 1: one pixel wins by 0.5
    candidate = reference.copy()
    candidate[:, 1, 0, 0] = 1.0 + 1e-6  # pixel (0, 0) flips to class 1 in both samples
    candidate[1, 1, 3, 3] = 2.0  # and in sample 1 the pixel with the wide margin flips too
    ties = certified_logit_ties(reference, candidate, 1.0, 1e-3)
    assert ties.tolist() == [True, False]
    assert not certified_logit_ties(reference, reference, 1.0, 1e-3).any()  # nothing changed


def test_dense_parity_refuses_labels_of_another_shape():
    outputs = np.zeros((1, 2, 4, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="labels of shape"):
        DatasetParity().add_outputs(outputs, outputs, np.zeros((1,), dtype=np.int64), None, np.array([True]))


def test_only_conv_transpose_may_stay_float_in_an_integer_file():
    assert "ConvTranspose" in FLOAT_COMPUTE_OPS
    assert _kernel_failures("int8", {"QLinearConv": 3, "ConvTranspose": 1}) == []
    assert _kernel_failures("int8", {"QLinearConv": 3, "Conv": 1})  # a float Conv still fails


@pytest.mark.parametrize("name", SEGMENTATION_MODELS)
def test_segmentation_model_width_scales_every_stage(name):
    def parameters(width):
        return sum(p.numel() for p in build_segmentation_model(name, width=width).parameters())

    assert parameters(8) < parameters(16) / 3  # convs scale with width², the head with width
    assert build_segmentation_model(name, width=8)(torch.zeros(1, 3, 32, 32)).shape == (1, 11, 32, 32)
    with pytest.raises(ValueError, match="width"):
        build_segmentation_model(name, width=0)
