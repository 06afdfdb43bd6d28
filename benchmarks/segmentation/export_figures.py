"""The exported segmentation files: integer kernels vs float ops, per-pixel agreement, latency, sizes.

    .venv/bin/python -m benchmarks.segmentation.export_figures --size tiny --resolution 256 \
        --out benchmarks/results/segmentation_export.json

For each model (U-Net, DeepLab) the zoo's θt are quantized by RTN at W8A8 and W4A4, merged, and
exported as INT8 (W8A8), 4-bit-in-int8 and true INT4 (W4A4) QDQ files plus the FP32 twin;
``validate`` (ORT_ENABLE_ALL) gives the optimized graph's op counts, per-pixel argmax agreement
with PyTorch on the targets' test scenes upsampled to ``--resolution`` (the networks are fully
convolutional), the batch-1 latency of each file against the FP32 twin, and file sizes. RTN is
used because these figures are about the file, not the method: every method exports the same ops.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch.nn.functional as F
from torch.utils.data import TensorDataset

from hdrq_examples.segmentation_demo import SIZES
from hdrq_examples.segmentation_zoo import load_or_build_segmentation_zoo
from hdrq_plugin._io import write_text_atomic
from hdrq_plugin.export import export_qdq, validate
from hdrq_plugin.merge.models import merge_models
from hdrq_plugin.quantize import quantize_model

FILES = {"w8a8": ("int8",), "w4a4": ("int4-in-int8", "int4")}


def _scenes_at(data: TensorDataset, resolution: int, count: int) -> TensorDataset:
    images, masks = data.tensors[0][:count], data.tensors[1][:count]
    images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False)
    masks = F.interpolate(masks[:, None].float(), size=(resolution, resolution), mode="nearest")[:, 0].long()
    return TensorDataset(images, masks)


def figures(model_name: str, size: str, resolution: int, scenes: int, seed: int, folder: Path,
            repeats: int = 10) -> dict:
    bench = load_or_build_segmentation_zoo(SIZES[size](model=model_name, seed=seed))
    targets = list(bench.recipe.target_domains)
    data = {t: [(x[None], y[None]) for x, y in _scenes_at(bench.domains[t].test, resolution, scenes)]
            for t in targets}
    found = {}
    for bits, storages in FILES.items():
        models = [quantize_model(bench.adapted[t], bench.domains[t].calib, bits=bits, method="rtn", seed=seed).model
                  for t in targets]
        merged = merge_models(models, rounding="half-to-even", seed=seed)
        example = data[targets[0]][0][0]
        for weights in storages:
            path = export_qdq(merged, folder / f"{model_name}-{bits}-{weights}.onnx", example, weights=weights,
                              overwrite=True)
            # every one of the repeats, interleaved with the FP32 twin (no time budget: 2-6 runs under load were inconclusive)
            report = validate(path, merged, data, batch_sizes=(1,), repeats=repeats, latency_budget_s=None)
            found[f"{bits}/{weights}"] = {
                "ok": report.ok, "failures": report.failures,
                "integer_kernels": report.integer_kernels, "float_compute_ops": report.float_compute_ops,
                "optimized_op_types": report.optimized_op_types,
                "pixel_agreement": report.top1_agreement,
                "tie_flip_pixels": {t: report.parity[t].tie_flip_predictions for t in targets},
                "latency_ms_batch1": report.latency_ms.get(1), "file_bytes": report.file_bytes}
            print(model_name, bits, weights, "ok" if report.ok else report.failures[0], report.integer_kernels,
                  report.float_compute_ops, report.latency_ms.get(1), report.file_bytes, flush=True)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=tuple(SIZES), default="tiny")
    parser.add_argument("--models", nargs="+", default=["unet", "deeplab"])
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--scenes", type=int, default=4, help="test scenes per target")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=10, help="timed batch-1 runs per file, interleaved with FP32")
    parser.add_argument("--out", default="benchmarks/results/segmentation_export.json")
    args = parser.parse_args(argv)
    results = {"settings": vars(args), "threads": 2, "models": {}}
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            results["models"][name] = figures(name, args.size, args.resolution, args.scenes, args.seed, Path(folder),
                                               args.repeats)
            write_text_atomic(args.out, json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
