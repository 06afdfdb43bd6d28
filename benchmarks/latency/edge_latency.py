"""Edge latency at 224×224 (issue 10): ResNet-18 and MobileNetV2 exported by hdrq-plugin vs
onnxruntime's own ``quantize_static``, side by side in one run.

For each model (random weights, non-trivial BatchNorm statistics; the kernels' speed and the
graph's fusions do not depend on training) the script writes, in one temporary folder:

* ``fp32``: the float model (``export_float``);
* ``w8a8``, ``w4a8-in-int8``, ``w4a4-in-int8``: ``convert_to_brevitas`` + calibration, exported
  with ``export_qdq(weights="int8" | "int4-in-int8")`` (the INT8 container); W4A8 is calibrated
  with HDRQ at a short iteration budget (``--hdrq-iterations``), the others with RTN;
* ``w4a8-int4``: the same W4A8 model with true INT4 weights (``weights="int4"``);
* ``ort-quantize-static``: ``onnxruntime.quantization.quantize_static`` on the fp32 file (after
  its ``quant_pre_process``), with the same calibration images and its defaults (QDQ, int8
  activations and weights, per tensor, MinMax) — the tool a user would otherwise pick.

It then reports, per file: size, the op types onnxruntime runs after ORT_ENABLE_ALL (integer
kernels vs compute left in float), top-1 agreement (our files vs the Brevitas model they came
from; quantize_static vs the float model), and the median latency at batch 1 and 64 with 1 and
2 threads, every file's session taking turns with the others (``median_latencies_ms``). The
HDRQ calibration of the W4A8 ResNet-18 on 32 images is timed, and the process's peak resident
memory is read just after it (it is the first heavy step in the process).

    nice -n 10 python -m benchmarks.latency.export_latency --suite 224 --out benchmarks/results/export_latency_224.json
    nice -n 10 python -m benchmarks.latency.edge_latency --out benchmarks/results/export_latency_224.json  # the same
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from hdrq_examples.architectures import mobilenet_v2, randomize_batchnorm, resnet18
from hdrq_plugin import HDRQConfig, convert_to_brevitas
from hdrq_plugin._io import write_text_atomic
from hdrq_plugin.convert import calibrate_activations
from hdrq_plugin.export import export_float, export_qdq
from hdrq_plugin.export.graph_facts import output_step
from hdrq_plugin.export.validation.ort_runtime import (
    INTEGER_KERNELS,
    cpu_session,
    median_latencies_ms,
    session_options,
)
from hdrq_plugin.ptq.calibrate import calibrate_with_report
from hdrq_plugin.run.checkpoint import quantizer_family

MODELS = {"resnet18": resnet18, "mobilenet_v2": mobilenet_v2}
# onnxruntime ops that move or reshape data, or convert between grids: neither integer compute
# nor float compute.
_DATA_MOVEMENT = ("QuantizeLinear", "DequantizeLinear", "Transpose", "Reshape", "Flatten", "Squeeze",
                  "Unsqueeze", "MaxPool", "NhwcMaxPool", "ReorderInput", "ReorderOutput", "Identity",
                  "DynamicQuantizeLinear")


def kernel_split(path: Path) -> tuple[Counter, dict[str, int]]:
    """Op types of the graph onnxruntime runs, and its nodes split three ways: integer kernels
    (QLinear*, QGemm, ...), elementwise ops on integer codes (the Clip of a 4-bit activation
    stored in uint8, fed by a QuantizeLinear or an integer kernel), and compute left in float."""
    with tempfile.TemporaryDirectory(prefix="hdrq-edge-opt-") as folder:
        optimized = Path(folder) / "optimized.onnx"
        ort.InferenceSession(str(path), session_options(1, optimized), providers=["CPUExecutionProvider"])
        graph = onnx.load(optimized).graph
    integer_outputs: set[str] = set()
    split = {"integer_kernel_nodes": 0, "integer_elementwise_nodes": 0, "float_compute_nodes": 0}
    for node in graph.node:  # topological order
        op = node.op_type
        if op in INTEGER_KERNELS or op.startswith("QLinear") or op == "QuantizeLinear":
            if op != "QuantizeLinear":
                split["integer_kernel_nodes"] += 1
            if not op.endswith("ToFloat"):
                integer_outputs.update(node.output)
        elif node.input and node.input[0] in integer_outputs and op != "DequantizeLinear":
            integer_outputs.update(node.output)  # Clip/Transpose/MaxPool on codes stay integer
            if op not in _DATA_MOVEMENT:
                split["integer_elementwise_nodes"] += 1
        elif op not in _DATA_MOVEMENT:
            split["float_compute_nodes"] += 1
    return Counter(node.op_type for node in graph.node), split


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over a list of input batches."""

    def __init__(self, name: str, batches: list[np.ndarray]) -> None:
        self._feeds = iter([{name: b} for b in batches])

    def get_next(self):
        return next(self._feeds, None)


def ort_quantize_static(fp32: Path, out: Path, calibration: np.ndarray) -> Path:
    from onnxruntime.quantization import quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = out.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32), str(prepared))
    name = onnx.load(str(prepared)).graph.input[0].name
    quantize_static(str(prepared), str(out), _Reader(name, list(np.split(calibration, len(calibration) // 8))))
    return out


def hdrq_w4a8(model, calibration: torch.Tensor, iterations: int) -> tuple[torch.nn.Module, dict]:
    """Convert to W4A8 and calibrate with HDRQ; return the model and the calibration's cost."""
    before_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    qmodel = convert_to_brevitas(model, "w4a8", **quantizer_family("hdrq"))
    config = HDRQConfig.cpu_preset("hdrq", iterations=iterations, num_samples=len(calibration))
    report = calibrate_with_report(qmodel, calibration, source=model, config=config)
    seconds = time.perf_counter() - start
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return qmodel, {"images": len(calibration), "iterations_per_unit": iterations, "units": len(report.units),
                    "batch_size": config.batch_size, "seconds": seconds,
                    "reconstruction_seconds": report.seconds,
                    "peak_rss_mib": peak_rss / 1024, "peak_rss_before_mib": before_rss / 1024,
                    "boundary_cache_peak_mib": report.cache_peak_bytes / 2**20,
                    "threads": torch.get_num_threads()}


def top1_agreement(path: Path, reference: np.ndarray, images: np.ndarray, differences: dict | None = None,
                   label: str = "") -> float:
    """Share of images whose onnxruntime top-1 equals the reference's; the largest logit
    difference (absolute and in steps of the file's output grid) goes into ``differences``."""
    session = cpu_session(path, threads=2)
    name = session.get_inputs()[0].name
    got = np.concatenate([session.run(None, {name: b})[0] for b in np.split(images, len(images) // 16)])
    if differences is not None:
        step = output_step(onnx.load(str(path)))
        worst = float(np.abs(got - reference).max())
        differences[label] = {"max_abs_logit_diff": worst, "output_step": step,
                              "max_diff_in_output_steps": worst / step if step else None}
    return float((got.argmax(1) == reference.argmax(1)).mean())


@torch.no_grad()
def logits(model, images: np.ndarray) -> np.ndarray:
    model.eval()
    return torch.cat([model(torch.from_numpy(b)).detach() for b in np.split(images, len(images) // 16)]).numpy()


def build_files(name: str, args, folder: Path) -> tuple[dict, dict]:
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    model = randomize_batchnorm(MODELS[name](), args.seed)
    calibration = torch.randn(args.calibration_images, 3, 224, 224, generator=gen)
    images = torch.randn(args.check_images, 3, 224, 224, generator=gen).numpy()
    example = calibration[:1]
    info: dict = {"parameters": sum(p.numel() for p in model.parameters())}
    files: dict[str, Path] = {"fp32": export_float(model, folder / f"{name}_fp32.onnx", example)}
    float_logits = logits(model, images)
    agreement = {"fp32": top1_agreement(files["fp32"], float_logits, images)}
    info["logit_differences"] = differences = {}
    print(f"[{name}] hdrq w4a8 calibration: {args.hdrq_iterations} iterations/unit on "
          f"{args.calibration_images} images", flush=True)
    w4a8, info["hdrq_calibration"] = hdrq_w4a8(model, calibration, args.hdrq_iterations)
    models = {"w4a8": w4a8}
    for bits in ("w8a8", "w4a4"):
        qmodel = convert_to_brevitas(model, bits)
        calibrate_activations(qmodel, list(calibration.split(8)))
        models[bits] = qmodel
    for label, bits, weights in (("w8a8", "w8a8", "int8"), ("w4a8-in-int8", "w4a8", "int4-in-int8"),
                                 ("w4a4-in-int8", "w4a4", "int4-in-int8"), ("w4a8-int4", "w4a8", "int4")):
        files[label] = export_qdq(models[bits], folder / f"{name}_{label}.onnx", example, weights=weights)
        agreement[label] = top1_agreement(files[label], logits(models[bits], images), images, differences, label)
        print(f"[{name}] {label}: top-1 agreement with Brevitas {agreement[label]:.3f}, largest logit "
              f"difference {differences[label]['max_diff_in_output_steps']:.0f} output steps", flush=True)
    files["ort-quantize-static"] = ort_quantize_static(files["fp32"], folder / f"{name}_ort_qs.onnx",
                                                       calibration.numpy())
    agreement["ort-quantize-static"] = top1_agreement(files["ort-quantize-static"], float_logits, images)
    info["top1_agreement"] = agreement
    info["top1_agreement_reference"] = {k: ("float model" if k in ("fp32", "ort-quantize-static") else
                                            "the Brevitas model exported") for k in agreement}
    info["quantized_vs_float_top1"] = {bits: float((logits(m, images).argmax(1) == float_logits.argmax(1)).mean())
                                       for bits, m in models.items()}
    return files, info


def measure(name: str, args, folder: Path) -> dict:
    files, info = build_files(name, args, folder)
    info["file_bytes"] = {label: path.stat().st_size for label, path in files.items()}
    info["optimized_ops"] = {}
    info["kernels"] = {}
    for label, path in files.items():
        ops, split = kernel_split(path)
        info["optimized_ops"][label] = dict(sorted(ops.items()))
        info["kernels"][label] = split
    info["latency_ms"] = {}
    images = np.random.default_rng(args.seed).standard_normal((max(args.batches), 3, 224, 224), dtype=np.float32)
    for threads in args.threads:
        sessions = {label: cpu_session(path, threads) for label, path in files.items()}
        for batch in args.batches:
            repeats = args.repeats if batch == 1 else args.repeats_large
            print(f"[{name}] timing batch {batch}, {threads} thread(s), {repeats} runs per file", flush=True)
            medians = median_latencies_ms(sessions, np.ascontiguousarray(images[:batch]), repeats,
                                          warmup=1 if batch > 1 else 3)
            info["latency_ms"][f"threads={threads},batch={batch}"] = medians
        del sessions
    return info


def print_tables(results: dict) -> None:
    for name, info in results.items():
        print(f"\n== {name} ({info['parameters'] / 1e6:.2f} M parameters)")
        keys = list(info["latency_ms"])
        print(f"{'file':22} {'MiB':>7} {'int.nodes':>9} {'int.elt':>7} {'float':>6} {'top1':>6}  " + "  ".join(f"{k:>22}" for k in keys))
        for label in info["file_bytes"]:
            k = info["kernels"][label]
            lat = "  ".join(f"{info['latency_ms'][key][label]:10.1f} ms ({info['latency_ms'][key][label] / info['latency_ms'][key]['fp32']:4.2f}x)"
                            for key in keys)
            print(f"{label:22} {info['file_bytes'][label] / 2**20:7.2f} {k['integer_kernel_nodes']:9d} "
                  f"{k['integer_elementwise_nodes']:7d} {k['float_compute_nodes']:6d} {info['top1_agreement'][label]:6.3f}  {lat}")
        sizes = info["file_bytes"]
        print(f"INT4/INT8 file size: w4a8-int4 / w4a8-in-int8 = {sizes['w4a8-int4'] / sizes['w4a8-in-int8']:.3f}; "
              f"w4a8-int4 / w8a8 = {sizes['w4a8-int4'] / sizes['w8a8']:.3f}")
        cal = info.get("hdrq_calibration")
        if cal:
            print(f"HDRQ W4A8 calibration: {cal['images']} images, {cal['iterations_per_unit']} iterations x "
                  f"{cal['units']} units: {cal['seconds']:.0f} s, peak RSS {cal['peak_rss_mib']:.0f} MiB "
                  f"(before: {cal['peak_rss_before_mib']:.0f} MiB), boundary cache {cal['boundary_cache_peak_mib']:.0f} MiB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="224x224 edge latency: ResNet-18 and MobileNetV2")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/export_latency_224.json"))
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per file at batch 1")
    parser.add_argument("--repeats-large", type=int, default=3, help="timed runs per file at larger batches")
    parser.add_argument("--calibration-images", type=int, default=32)
    parser.add_argument("--check-images", type=int, default=64, help="images for top-1 agreement")
    parser.add_argument("--hdrq-iterations", type=int, default=20, help="HDRQ iterations per unit (W4A8)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the calibration and the Brevitas references; ORT sets its own
    results = {}
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    with tempfile.TemporaryDirectory(prefix="hdrq-edge-") as folder:
        for name in args.models:
            results[name] = measure(name, args, Path(folder))
            # written after every model, so a long run that is stopped keeps what it measured
            write_text_atomic(args.out, json.dumps({"settings": settings, "results": results}, indent=2, default=str))
    print_tables(results)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
