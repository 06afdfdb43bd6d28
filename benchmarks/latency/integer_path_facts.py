"""Graph facts before and after the exporter's integer-path rewrites (issue 10, deliverable 4).

For each model — the tiny block family of the tests (``hdrq_examples.block_models``) and the
224×224 ResNet-18 / MobileNetV2 — converted at W8A8 and W4A4 and calibrated (RTN, 8 random
images), the script writes Brevitas' raw QCDQ file ("before": ``write_brevitas_qcdq``, what
Brevitas alone gives) and ``export_qdq``'s file ("after": with
:mod:`hdrq_plugin.export.rewrites.integer_path`), and counts in onnxruntime's optimized graph
(ORT_ENABLE_ALL) the nodes on integer kernels, integer elementwise ops on codes and compute left
in float, with the op histogram of what stays in float.

    nice -n 10 python -m benchmarks.latency.integer_path_facts
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from hdrq_examples.architectures import randomize_batchnorm
from hdrq_plugin import convert_to_brevitas
from hdrq_plugin._io import write_text_atomic
from hdrq_plugin.convert import calibrate_activations
from hdrq_plugin.export import export_qdq
from hdrq_plugin.export.formats.qdq import write_brevitas_qcdq

from .edge_latency import MODELS, kernel_split

_MOVEMENT_OR_INTEGER = ("QuantizeLinear", "DequantizeLinear", "Transpose", "Flatten", "Reshape", "MaxPool",
                        "NhwcMaxPool", "ReorderInput", "ReorderOutput", "Clip", "QGemm")


def facts(path: Path) -> dict:
    ops, split = kernel_split(path)
    in_float = {op: n for op, n in sorted(ops.items())
                if op not in _MOVEMENT_OR_INTEGER and not op.startswith("QLinear")}
    return {**split, "float_ops": in_float}


def models(size: str):
    if size in ("tiny", "all"):
        from hdrq_examples.block_models import BLOCK_MODELS, INPUT_SHAPE, block_model

        for name in BLOCK_MODELS:
            yield name, block_model(name), INPUT_SHAPE
    if size in ("224", "all"):
        for name, build in MODELS.items():
            torch.manual_seed(0)
            yield name, randomize_batchnorm(build(), 0), (3, 224, 224)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/integer_path_facts.json"))
    parser.add_argument("--size", choices=("tiny", "224", "all"), default="all")
    parser.add_argument("--bits", nargs="+", default=["w8a8", "w4a4"])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="hdrq-facts-") as folder:
        for name, model, shape in models(args.size):
            images = torch.randn(8, *shape, generator=torch.Generator().manual_seed(0))
            for bits in args.bits:
                qmodel = calibrate_activations(convert_to_brevitas(model, bits), list(images.split(4)))
                before, after = Path(folder) / f"{name}_{bits}_raw.onnx", Path(folder) / f"{name}_{bits}.onnx"
                write_brevitas_qcdq(qmodel, images[:1], before)
                export_qdq(qmodel, after, images[:1])
                results[f"{name} {bits}"] = {"before": facts(before), "after": facts(after)}
                b, a = results[f"{name} {bits}"]["before"], results[f"{name} {bits}"]["after"]
                print(f"{name:20} {bits}  integer kernels {b['integer_kernel_nodes']:3d} -> {a['integer_kernel_nodes']:3d}"
                      f"   float compute {b['float_compute_nodes']:3d} -> {a['float_compute_nodes']:3d}"
                      f"   left in float after: {a['float_ops'] or '-'}", flush=True)
    write_text_atomic(args.out, json.dumps(results, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
