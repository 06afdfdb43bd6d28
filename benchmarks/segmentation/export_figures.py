"""The exported segmentation files: integer kernels vs float ops, per-pixel agreement, latency, sizes.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.segmentation.export_figures --size tiny --resolution 256 \
        --out benchmarks/results/segmentation_export.json

For each model (U-Net, DeepLab) the zoo's θt are quantized by RTN at W8A8 and W4A4, merged, and
exported as INT8 (W8A8), 4-bit-in-int8 and true INT4 (W4A4) QDQ files plus the FP32 twin;
``validate`` (ORT_ENABLE_ALL) gives the optimized graph's op counts, per-pixel argmax agreement
with PyTorch on the targets' test scenes upsampled to ``--resolution`` (the networks are fully
convolutional), the batch-1 latency of each file against the FP32 twin (``--repeats`` timed runs,
each interleaved with the twin's, medians, ``--threads`` onnxruntime intra-op threads; the load
average before and after each file is printed and recorded, since other jobs move these medians),
and file sizes. RTN is used because these figures are about the file, not the method: every
method exports the same ops.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch.nn.functional as F
from torch.utils.data import TensorDataset

from hdrq_examples.segmentation_demo import SIZES
from hdrq_examples.segmentation_models import SEGMENTATION_MODELS
from hdrq_examples.segmentation_zoo import load_or_build_segmentation_zoo
from hdrq_plugin._io import write_text_atomic
from hdrq_plugin.export import export_qdq, validate
from hdrq_plugin.merge.models import merge_models
from hdrq_plugin.quantize import quantize_model

FILES = {"w8a8": ("int8",), "w4a4": ("int4-in-int8", "int4")}
MIN_REPEATS = 10  # fewer interleaved runs than this gave no stable median under load (BENCHMARKS.md)


def _scenes_at(data: TensorDataset, resolution: int, count: int) -> TensorDataset:
    images, masks = data.tensors[0][:count], data.tensors[1][:count]
    images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False)
    masks = F.interpolate(masks[:, None].float(), size=(resolution, resolution), mode="nearest")[:, 0].long()
    return TensorDataset(images, masks)


def figures(model_name: str, size: str, resolution: int, scenes: int, seed: int, folder: Path,
            repeats: int = 12, threads: int = 1) -> dict:
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
            load_before = os.getloadavg()
            report = validate(path, merged, data, batch_sizes=(1,), repeats=repeats, threads=threads,
                              latency_budget_s=None)
            load_after = os.getloadavg()
            latency = report.latency_ms.get(1) or {}
            found[f"{bits}/{weights}"] = {
                "ok": report.ok, "failures": report.failures,
                "integer_kernels": report.integer_kernels, "float_compute_ops": report.float_compute_ops,
                "optimized_op_types": report.optimized_op_types,
                "pixel_agreement": report.top1_agreement,
                "tie_flip_pixels": {t: report.parity[t].tie_flip_predictions for t in targets},
                "latency_ms_batch1": latency, "file_bytes": report.file_bytes,
                "latency_ratio_file_over_fp32": latency["quantized"] / latency["float32"] if latency else None,
                "load_average_1min_before_after": [load_before[0], load_after[0]]}
            ratio = found[f"{bits}/{weights}"]["latency_ratio_file_over_fp32"]
            print(f"{model_name} {bits} {weights}: {'ok' if report.ok else report.failures[0]}; "
                  f"integer {report.integer_kernels}, float {report.float_compute_ops}; "
                  f"median ms {latency.get('quantized', float('nan')):.1f} / FP32 {latency.get('float32', float('nan')):.1f}"
                  f" = {ratio if ratio is not None else float('nan'):.2f}x over {latency.get('timed_runs')} runs; "
                  f"bytes {report.file_bytes}; load {load_before[0]:.1f} -> {load_after[0]:.1f}", flush=True)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.segmentation.export_figures",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=tuple(SIZES), default="tiny")
    parser.add_argument("--models", nargs="+", choices=SEGMENTATION_MODELS, default=list(SEGMENTATION_MODELS))
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--scenes", type=int, default=4, help="test scenes per target")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=12, help="timed batch-1 runs per file, interleaved with FP32")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads of the timed runs")
    parser.add_argument("--out", default="benchmarks/results/segmentation_export.json")
    args = parser.parse_args(argv)
    if args.repeats < MIN_REPEATS or args.threads < 1 or args.resolution < 1 or args.scenes < 1:
        parser.exit(2, f"{parser.prog}: error: need --repeats >= {MIN_REPEATS}, --threads, --resolution and "
                       "--scenes >= 1\n")
    results = {"settings": vars(args), "threads": args.threads, "models": {}}
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            results["models"][name] = figures(name, args.size, args.resolution, args.scenes, args.seed, Path(folder),
                                               args.repeats, args.threads)
            write_text_atomic(args.out, json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
