"""The default INT8 file against FP32, and INT4 on disk run on integer kernels (issue 22).

ResNet-18 at 224×224 (random weights, non-trivial BatchNorm statistics: kernel speed and graph
fusions do not depend on training), onnxruntime CPU, one thread, every file's session taking
turns with the others (``median_latencies_ms``), at batch 1 and 8. Files:

* ``fp32``: the float model;
* ``w8a8-default``: ``export_qdq(weights="int8")`` as shipped (``saturation_safe=True``: weights
  with codes beyond ±64 stored as uint8, u8u8 kernels);
* ``w8a8-vnni-only``: ``saturation_safe=False`` (int8 weights; saturates on x86 without VNNI);
* ``w8a8-7bit-grid``: the same model converted with 7-bit weights (codes -64..63: cannot saturate
  ``vpmaddubsw``, so the file keeps int8 weights and u8s8 kernels) — onnxruntime's
  ``reduce_range``, the candidate safe-and-fast default;
* ``w4a4-in-int8`` (8-bit edges, default storage), ``w4a4-in-int8-7bit-edges``;
* ``w4a4-int4``: true INT4 weights, run by stock onnxruntime;
* ``w4a4-int4-widened``: the same file through ``int4_session`` (4-bit weights widened to int8
  in memory at load, :mod:`hdrq_plugin.export.formats.int4_loading`).

Per file: size, the optimized graph's integer-kernel / float-compute node counts (from
``SessionOptions.optimized_model_filepath``) and the median latencies; the widened INT4 session's
outputs are checked equal to the INT8 container's.

    OMP_NUM_THREADS=1 nice -n 10 python -m benchmarks.latency.int8_default --out benchmarks/results/int8_default.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from hdrq_examples.architectures import randomize_batchnorm, resnet18
from hdrq_plugin import BitSpec, convert_to_brevitas
from hdrq_plugin._io import write_text_atomic
from hdrq_plugin.convert import calibrate_activations
from hdrq_plugin.export import export_float, export_qdq
from hdrq_plugin.export.formats.int4_loading import int4_session
from hdrq_plugin.export.validation.ort_runtime import (
    FLOAT_COMPUTE_OPS,
    INTEGER_KERNELS,
    median_latencies_ms,
    session_options,
)

#: label -> (bit spec, weight storage, saturation_safe, widen 4-bit weights at load)
FILES = {
    "w8a8-default": (BitSpec(8, 8), "int8", True, False),
    "w8a8-vnni-only": (BitSpec(8, 8), "int8", False, False),
    "w8a8-7bit-grid": (BitSpec(7, 8, edge_weight_bits=7), "int8", True, False),
    "w4a4-in-int8": (BitSpec(4, 4), "int4-in-int8", True, False),
    "w4a4-in-int8-7bit-edges": (BitSpec(4, 4, edge_weight_bits=7), "int4-in-int8", True, False),
    "w4a4-int4": (BitSpec(4, 4), "int4", True, False),
    "w4a4-int4-widened": (BitSpec(4, 4), "int4", True, True),
}


def _session(path: Path, threads: int, widen: bool, optimized: Path | None = None) -> ort.InferenceSession:
    options = session_options(threads, optimized)
    if widen:
        return int4_session(path, options)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def kernel_counts(path: Path, widen: bool, folder: Path) -> dict[str, int]:
    optimized = folder / f"{path.stem}{'-widened' if widen else ''}.optimized.onnx"
    _session(path, 1, widen, optimized)
    ops = Counter(node.op_type for node in onnx.load(optimized).graph.node)
    return {"integer_kernel_nodes": sum(ops[op] for op in INTEGER_KERNELS),
            "float_compute_nodes": sum(ops[op] for op in FLOAT_COMPUTE_OPS)}


def build(folder: Path, seed: int, calibration_images: int) -> dict[str, tuple[Path, bool]]:
    torch.manual_seed(seed)
    model = randomize_batchnorm(resnet18(), seed)
    calibration = torch.randn(calibration_images, 3, 224, 224, generator=torch.Generator().manual_seed(seed))
    example = calibration[:1]
    files = {"fp32": (export_float(model, folder / "fp32.onnx", example), False)}
    models: dict[BitSpec, torch.nn.Module] = {}
    for label, (spec, weights, safe, widen) in FILES.items():
        if spec not in models:
            models[spec] = calibrate_activations(convert_to_brevitas(model, spec), list(calibration.split(8)))
        path = folder / f"{label.removesuffix('-widened')}.onnx"
        if not path.exists():
            export_qdq(models[spec], path, example, weights=weights, saturation_safe=safe)
        files[label] = (path, widen)
        print(f"built {label}", flush=True)
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/int8_default.json"))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--calibration-images", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    result: dict = {"settings": {k: str(v) for k, v in vars(args).items()}, "load_average_start": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="hdrq-int8-default-") as tmp:
        folder = Path(tmp)
        files = build(folder, args.seed, args.calibration_images)
        result["file_bytes"] = {label: path.stat().st_size for label, (path, _) in files.items()}
        result["kernels"] = {label: kernel_counts(path, widen, folder) for label, (path, widen) in files.items()}
        sessions = {label: _session(path, 1, widen) for label, (path, widen) in files.items()}
        images = np.random.default_rng(args.seed).standard_normal((max(args.batches), 3, 224, 224), dtype=np.float32)
        feed = {"input": images[:2]}
        container = sessions["w4a4-in-int8"].run(None, feed)[0]
        result["widened_equals_container"] = bool(np.array_equal(sessions["w4a4-int4-widened"].run(None, feed)[0],
                                                                 container))
        result["latency_ms"] = {}
        for batch in args.batches:
            print(f"timing batch {batch}: {args.repeats} interleaved runs per file", flush=True)
            medians = median_latencies_ms(sessions, np.ascontiguousarray(images[:batch]), args.repeats,
                                          warmup=2)
            result["latency_ms"][f"batch={batch}"] = medians
    result["load_average_end"] = os.getloadavg()
    write_text_atomic(args.out, json.dumps(result, indent=2))
    print_table(result)
    return 0


def print_table(result: dict) -> None:
    batches = list(result["latency_ms"])
    print(f"{'file':26} {'MiB':>6} {'int.k':>5} {'float':>5}  " + "  ".join(f"{b + ' ms (÷fp32)':>22}" for b in batches))
    for label, size in result["file_bytes"].items():
        k = result["kernels"][label]
        cells = "  ".join(f"{result['latency_ms'][b][label]:12.1f} ({result['latency_ms'][b][label] / result['latency_ms'][b]['fp32']:5.2f})"
                          for b in batches)
        print(f"{label:26} {size / 2**20:6.2f} {k['integer_kernel_nodes']:5d} {k['float_compute_nodes']:5d}  {cells}")
    print(f"widened INT4 output == INT8 container output: {result['widened_equals_container']}; "
          f"load average {result['load_average_start']} -> {result['load_average_end']}")


if __name__ == "__main__":
    raise SystemExit(main())
