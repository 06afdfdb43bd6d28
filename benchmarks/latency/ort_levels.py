"""Top-1 agreement of exported W8A8 files under every onnxruntime optimization level (issue 19).

Models: seeded Linear -> ReLU -> Linear patterns (an MLP head after a conv trunk, a VGG-style
classifier after max pooling, a squeeze-and-excitation gate made of Linear layers) at 16x16,
and a 224x224 ResNet-18 (random weights, BatchNorm statistics randomized) unless ``--no-224``.
Each is converted at W8A8, calibrated on random images, exported (``export_qdq`` checks its own
file at every level first) and run on ``--images`` random images under DISABLE_ALL, BASIC,
EXTENDED and ALL; each level is judged with validate's parity rules: predictions changed only by
certified tie flips are counted apart (docs/export.md §7).

    nice -n 10 python -m benchmarks.latency.ort_levels --out benchmarks/results/ort_levels.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import onnx
import torch
from torch import nn

from hdrq_examples.architectures import randomize_batchnorm, resnet18
from hdrq_plugin import convert_to_brevitas
from hdrq_plugin.convert import calibrate_activations
from hdrq_plugin.export import export_qdq
from hdrq_plugin.export.graph_facts import output_float_error_steps, output_step
from hdrq_plugin.export.validation.activation_codes import OnnxCodeReader
from hdrq_plugin.export.validation.ort_runtime import OPTIMIZATION_LEVELS
from hdrq_plugin.export.validation.parity import ParityTolerance
from hdrq_plugin.export.validation.parity_run import ParityRun


class MLPHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.head = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x):
        return self.head(torch.flatten(self.trunk(x), 1))


class VGGStyle(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4))
        self.classifier = nn.Sequential(nn.Linear(16 * 16, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


class LinearSE(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU())
        self.fc1, self.fc2, self.relu, self.gate = nn.Linear(16, 8), nn.Linear(8, 16), nn.ReLU(), nn.Sigmoid()
        self.pool, self.classifier = nn.AdaptiveAvgPool2d(1), nn.Linear(16, 10)

    def forward(self, x):
        x = self.conv(x)
        s = self.gate(self.fc2(self.relu(self.fc1(torch.flatten(self.pool(x), 1)))))
        return self.classifier(torch.flatten(self.pool(x * s.view(s.size(0), s.size(1), 1, 1)), 1))


def measure(name: str, model: nn.Module, shape: tuple, images: int, folder: Path, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = randomize_batchnorm(model, seed)
    calibration = torch.randn(16, *shape, generator=gen)
    x = torch.randn(images, *shape, generator=gen)
    qmodel = calibrate_activations(convert_to_brevitas(model, "w8a8"), list(calibration.split(8)))
    path = export_qdq(qmodel, folder / f"{name}.onnx", calibration[:2])
    onnx_model = onnx.load(path)
    step, bound = output_step(onnx_model), output_float_error_steps(onnx_model)
    rows = {}
    for level in OPTIMIZATION_LEVELS:
        run = ParityRun(OnnxCodeReader(path, 2, level=level), qmodel, step, bound, ParityTolerance())
        tally = run.dataset("images", [x], None, [])
        rows[level] = {"samples": tally.samples, "top1_agreeing": tally.top1_agreeing,
                       "tie_flip_samples": tally.tie_flip_samples,
                       "agreement_excluding_certified_ties": (tally.top1_agreeing + tally.tie_flip_samples) / tally.samples,
                       "failures": tally.failures("images", ParityTolerance(), bound)}
        print(f"{name:10s} {level:20s} top-1 {tally.top1_agreeing}/{tally.samples}  certified tie-flip samples "
              f"{tally.tie_flip_samples}  failures {len(rows[level]['failures'])}", flush=True)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--no-224", action="store_true", help="skip the 224x224 ResNet-18")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    models = [("mlp_head", MLPHead(), (3, 16, 16)), ("vgg_style", VGGStyle(), (3, 16, 16)),
              ("linear_se", LinearSE(), (3, 16, 16))]
    if not args.no_224:
        models.append(("resnet18", resnet18(), (3, 224, 224)))
    results = {}
    with tempfile.TemporaryDirectory(prefix="hdrq-ort-levels-") as folder:
        for seed, (name, model, shape) in enumerate(models):
            results[name] = measure(name, model, shape, args.images, Path(folder), seed)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
