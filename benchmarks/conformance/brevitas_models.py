"""Brevitas models in, end to end (issue 19): ``python -m benchmarks.conformance.brevitas_models``.

Models of the installed ``brevitas_examples`` package — bnn_pynq CNV 2W2A and TFC 2W2A, an
ImageNet MobileNetV1 of reduced width (4-bit, per-channel inner weights, 8-bit per-channel first
and per-tensor last layer) — and a hand-written Brevitas model, all randomly initialised with
BatchNorm statistics from random batches (no weight downloads). Each goes adopt_brevitas_model →
hdrq_calibrate (two copies, 1 iteration per unit) → merge_models → export_qdq (INT8 container and
true INT4) → validate on 64 images; the figures are printed and written as JSON. The ties column
gives, per file (INT8/INT4), the predictions changed by certified activation-code tie flips and by
float32 logit ties (validate's "Top-1" rule, export/validation/parity.py), reported, not failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from hdrq_plugin import HDRQConfig, adopt_brevitas_model, hdrq_calibrate, merge_models
from hdrq_plugin._io import write_text_atomic
from hdrq_plugin.export import export_qdq, validate
from hdrq_plugin.quant.control import quantized_layers

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import brevitas.nn as qnn
    from brevitas.quant import (
        Int8ActPerTensorFloat,
        Int8WeightPerChannelFloat,
        Int8WeightPerTensorFloat,
        Uint8ActPerTensorFloat,
    )
    from brevitas_examples.bnn_pynq.models import model_with_cfg
    from brevitas_examples.imagenet_classification.models.mobilenetv1 import MobileNet

DEFAULT_OUT = Path("benchmarks/results/brevitas_models.json")


class HandWritten(nn.Module):
    """Brevitas layers with Brevitas quantizers, each at its own width and granularity."""

    def __init__(self):
        super().__init__()
        self.inp = qnn.QuantIdentity(act_quant=Int8ActPerTensorFloat, return_quant_tensor=True)
        self.conv1 = qnn.QuantConv2d(3, 8, 3, padding=1, weight_quant=Int8WeightPerChannelFloat, weight_bit_width=6)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu1 = qnn.QuantReLU(act_quant=Uint8ActPerTensorFloat, bit_width=5, return_quant_tensor=True)
        self.conv2 = qnn.QuantConv2d(8, 8, 3, padding=1, groups=8, weight_quant=Int8WeightPerTensorFloat,
                                     weight_bit_width=3)
        self.relu2 = qnn.QuantReLU(act_quant=Uint8ActPerTensorFloat, bit_width=4, return_quant_tensor=True)
        self.pool = nn.MaxPool2d(2)
        self.fc = qnn.QuantLinear(8 * 4 * 4, 10, bias=True, weight_quant=Int8WeightPerTensorFloat, weight_bit_width=8)

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(self.inp(x))))
        x = self.pool(self.relu2(self.conv2(x)))
        return self.fc(x.flatten(1))


def with_bn_statistics(model: nn.Module, shape) -> nn.Module:
    """Random-init networks: BatchNorm statistics from a few random batches, so activations do not vanish."""
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.rand(64, *shape))
    return model.eval()


def bnn_pynq(name: str, shape):
    def build():
        torch.manual_seed(0)
        return with_bn_statistics(model_with_cfg(name, pretrained=False)[0], shape), shape
    return build


def mobilenet_v1():
    torch.manual_seed(0)
    shape = (3, 16, 16)
    model = MobileNet(channels=[[8], [16], [16, 16], [32]], first_stage_stride=False, act_bit_width=4,
                      weight_bit_width=4, avg_pool_kernel_size=2, num_classes=10)
    return with_bn_statistics(model, shape), shape


def hand_written():
    torch.manual_seed(0)
    return with_bn_statistics(HandWritten(), (3, 8, 8)), (3, 8, 8)


MODELS = {"bnn_pynq-cnv-2w2a": bnn_pynq("cnv_2w2a", (3, 32, 32)), "bnn_pynq-tfc-2w2a": bnn_pynq("tfc_2w2a", (1, 28, 28)),
          "imagenet-mobilenetv1": mobilenet_v1, "hand-written": hand_written}
CONFIG = HDRQConfig.cpu_preset("hdrq", iterations=1, num_samples=16, batch_size=8)


def weight_formats(model: nn.Module) -> dict[str, tuple[int, bool]]:
    """Layer -> (weight bit width, per channel)."""
    return {name: (int(layer.weight_quant.bit_width()), layer.quant_weight().scale.numel() > 1)
            for name, layer in quantized_layers(model, enabled_only=False)}


def run_one(name: str, folder: Path) -> dict:
    start = time.perf_counter()
    model, shape = MODELS[name]()
    calibration = torch.rand(32, *shape, generator=torch.Generator().manual_seed(1))
    quantized = [hdrq_calibrate(adopt_brevitas_model(model), calibration[i * 16:(i + 1) * 16], config=CONFIG)
                 for i in range(2)]
    merged = merge_models(quantized).eval()
    kept = weight_formats(merged) == weight_formats(model)
    images = torch.rand(64, *shape, generator=torch.Generator().manual_seed(2))
    row = {"model": name, "layers": len(weight_formats(model)),
           "weight_bits": sorted({b for b, _ in weight_formats(model).values()}),
           "widths_and_granularity_kept": kept, "files": {}}
    for weights in ("int8", "int4"):
        path = export_qdq(merged, folder / f"{name}-{weights}.onnx", images[:1], weights=weights, overwrite=True)
        report = validate(path, merged, [images], batch_sizes=(1,), repeats=1, threads=1)
        parity = report.parity["data"]
        row["files"][weights] = {"ok": report.ok, "top1_agreement": next(iter(report.top1_agreement.values())),
                                 "tie_flip_samples": parity.tie_flip_samples,
                                 "logit_tie_samples": parity.logit_tie_samples,
                                 "samples_with_code_divergence": parity.samples_with_code_divergence,
                                 "max_diff_steps": parity.max_diff_steps,
                                 "output_bound_steps": report.output_bound_steps,
                                 "failures": report.failures, "integer_kernels": report.integer_kernels}
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.conformance.brevitas_models")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory(prefix="hdrq-brevitas-models-") as folder:
        rows = [run_one(name, Path(folder)) for name in args.models]
    print(f"{'model':<22} {'layers':>6} {'weight bits':<12} {'kept':<5} {'INT8 top-1':>10} {'INT4 top-1':>10} "
          f"{'ties (code/logit)':>17} {'ok':<5} {'s':>5}")
    for r in rows:
        files = r["files"]
        print(f"{r['model']:<22} {r['layers']:>6} {','.join(map(str, r['weight_bits'])):<12} "
              f"{str(r['widths_and_granularity_kept']):<5} {files['int8']['top1_agreement']:>10.4f} "
              f"{files['int4']['top1_agreement']:>10.4f} "
              f"{'/'.join(str(f['tie_flip_samples']) + ',' + str(f['logit_tie_samples']) for f in files.values()):>17} "
              f"{str(all(f['ok'] for f in files.values())):<5} "
              f"{r['seconds']:>5}")
        for weights, f in files.items():
            for failure in f["failures"]:
                print(f"  {weights}: {failure}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, json.dumps({"command": "python -m benchmarks.conformance.brevitas_models "
                                            + " ".join(argv if argv is not None else sys.argv[1:]),
                                            "rows": rows}, indent=1))
    return 0 if all(f["ok"] for r in rows for f in r["files"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
