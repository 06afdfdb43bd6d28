"""Export figures of issue 4: onnxruntime-vs-Brevitas parity, INT8/FP32 latency, file sizes.

Two model sources, both CIFAR-style ResNet-8 (widths 32/64/128, 32x32 inputs):
- ``--models random`` (default): seeded random weights and BatchNorm statistics, calibrated and
  checked on random images (the arithmetic under test does not depend on training);
- ``--models zoo``: the demo zoo's trained target models (cached by ``hdrq demo``; built,
  which takes minutes, if absent), each quantized with ``convert_to_brevitas`` and calibrated
  on its own target, then merged with ``merge_models`` (noise-sampling rounding); parity and
  accuracy are checked on every target's test split.
Each model is exported as INT8 and (for <=4-bit weights) true-INT4 QDQ files and validated in
onnxruntime (CPU, ORT_ENABLE_ALL), each file timed against the model's float32 ONNX twin with
the two sessions taking turns.

    python -m benchmarks.latency.export_latency --out runs/export_latency.json
    python -m benchmarks.latency.export_latency --models zoo --out runs/export_latency_zoo.json

``--suite 224`` runs the 224x224 ResNet-18 / MobileNetV2 suite of issue 10 instead
(:mod:`benchmarks.latency.edge_latency`, which documents its own options):

    nice -n 10 python -m benchmarks.latency.export_latency --suite 224
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from hdrq_examples.models import ResNetConfig, build_resnet
from hdrq_plugin import BitSpec, convert_to_brevitas
from hdrq_plugin._io import write_text_atomic
from hdrq_plugin.convert import calibrate_activations
from hdrq_plugin.export import export_float, export_qdq, validate

BITS = ("w8a8", "w4a8", "w4a4")
INPUT_SHAPE = (3, 32, 32)  # CIFAR-style images


def seeded_float_model(widths: tuple[int, ...], blocks: int, seed: int) -> torch.nn.Module:
    """A ResNet with seeded weights and non-trivial BatchNorm statistics (folded at conversion)."""
    torch.manual_seed(seed)
    model = build_resnet(ResNetConfig(widths=widths, blocks_per_stage=blocks))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def random_batches(count: int, batch: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, *INPUT_SHAPE, generator=gen), torch.randint(0, 10, (batch,), generator=gen))
            for _ in range(count)]


def random_model_and_data(bits: str, args: argparse.Namespace) -> tuple[torch.nn.Module, dict]:
    qmodel = convert_to_brevitas(seeded_float_model(args.widths, args.blocks, args.seed), bits)
    calibrate_activations(qmodel, random_batches(4, 32, seed=args.seed + 1))
    return qmodel, {"random": random_batches(args.samples // 64, 64, seed=args.seed + 2)}


def merged_zoo_model_and_data(bits: str, args: argparse.Namespace) -> tuple[torch.nn.Module, dict]:
    from torch.utils.data import DataLoader

    from hdrq_examples.zoo import BenchmarkRecipe, load_or_build_benchmark
    from hdrq_plugin.merge.models import merge_models

    bench = load_or_build_benchmark(BenchmarkRecipe())
    targets = bench.recipe.target_domains
    quantized = [calibrate_activations(convert_to_brevitas(bench.adapted[t], bits),
                                       DataLoader(bench.domains[t].calib, batch_size=32)) for t in targets]
    merged = merge_models(quantized, seed=args.seed)
    return merged, {t: DataLoader(bench.domains[t].test, batch_size=256) for t in targets}


def measure(bits: str, args: argparse.Namespace, folder: Path) -> dict:
    source = merged_zoo_model_and_data if args.models == "zoo" else random_model_and_data
    qmodel, data = source(bits, args)
    example = next(iter(next(iter(data.values()))))[0][:2]
    float_path = export_float(qmodel, folder / f"{bits}_fp32.onnx", example)
    result = {}
    for weights in ("int8", "int4") if BitSpec.parse(bits).weight_bits <= 4 else ("int8",):
        path = export_qdq(qmodel, folder / f"{bits}_{weights}.onnx", example, weights=weights,
                          metadata={"method": "rtn" if args.models == "random" else "rtn+merge"})
        report = validate(path, qmodel, data, batch_sizes=(1, args.serving_batch), repeats=args.repeats,
                          threads=args.threads, float_onnx_path=float_path)
        result[weights] = report.to_dict()
    return result


def print_table(results: dict) -> None:
    print(f"{'bits':6} {'file':5} {'max|diff|':>10} {'steps':>7} {'top-1 agr':>9} "
          f"{'ms b=1':>8} {'fp32/q':>7} {'ms b=64':>8} {'fp32/q':>7} {'KiB':>7} {'q/fp32':>7}  ops left in float")
    for bits, files in results.items():
        for weights, r in files.items():
            lat = {int(k): v for k, v in r["latency_ms"].items()}
            small, big = sorted(lat)
            steps = r["max_diff_in_output_steps"]
            print(f"{bits:6} {weights:5} {r['max_abs_diff']:10.3g} {steps if steps is not None else float('nan'):7.1f} "
                  f"{100 * min(a for a in r['top1_agreement'].values() if a is not None):8.2f}% {lat[small]['quantized']:8.2f} {lat[small]['float32_over_quantized']:7.2f} "
                  f"{lat[big]['quantized']:8.1f} {lat[big]['float32_over_quantized']:7.2f} "
                  f"{r['file_bytes']['quantized'] / 1024:7.0f} "
                  f"{r['file_bytes']['quantized'] / r['file_bytes']['float32']:7.3f}  "
                  f"{r['float_compute_ops'] or '-'}{'' if r['ok'] else '  FAILED: ' + r['failures'][0]}")
            for target, acc in r["accuracy"].items():
                print(f"{'':6} {'':5} accuracy {target}: onnxruntime {acc['onnxruntime']:.4f} "
                      f"pytorch {acc['pytorch']:.4f} ({acc['changed_predictions']} of {acc['samples']} changed)")
        if "int4" in files:
            sizes = {w: files[w]["file_bytes"]["quantized"] for w in ("int8", "int4")}
            fp32 = files["int8"]["file_bytes"]["float32"]
            print(f"{bits:6} sizes INT4 : INT8 : FP32 = {sizes['int4'] / fp32:.3f} : {sizes['int8'] / fp32:.3f} : 1"
                  f"  (INT4/INT8 = {sizes['int4'] / sizes['int8']:.3f})")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:2] == ["--suite", "224"]:
        from .edge_latency import main as edge_latency_main

        return edge_latency_main(argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/export_latency.json"))
    parser.add_argument("--bits", nargs="+", default=list(BITS))
    parser.add_argument("--models", choices=("random", "zoo"), default="random")
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--blocks", type=int, default=1, help="basic blocks per stage (1: ResNet-8)")
    parser.add_argument("--samples", type=int, default=256, help="images for parity (multiple of 64)")
    parser.add_argument("--serving-batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.widths = tuple(args.widths)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="hdrq-export-bench-") as folder:
        results = {bits: measure(bits, args, Path(folder)) for bits in args.bits}
    print_table(results)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    write_text_atomic(args.out, json.dumps({"settings": settings, "results": results}, indent=2, default=str))
    print(f"wrote {args.out}")
    failed = [f"{r['onnx_path']}: {r['failures'][0]}" for files in results.values() for r in files.values() if not r["ok"]]
    for line in failed:  # the JSON above holds every figure; one line per failed file here
        print(f"validation failed: {line}", file=sys.stderr)
    return 3 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
