"""The conformance suite: every generated model × bit spec × weight storage, end to end.

Each case goes convert -> calibrate (1 iteration) -> merge of two copies -> export -> validate in
onnxruntime (``validate`` at ORT_ENABLE_ALL, and top-1 agreement of an ORT_DISABLE_ALL session
with the merged model). A case ends in one of three ways:

* ``validated``: exported and every check passed;
* ``refused``: the conversion raised ``UnsupportedLayerError`` naming the layer or graph node;
* anything else (an error at a later stage, a failed check): ``other``, which must never happen.

Convert, calibrate and merge run once per model and bit spec; export and validation once per storage.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import tempfile
import time
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from hdrq_plugin import HDRQConfig, NIPQConfig, convert_to_brevitas, hdrq_calibrate, merge_models
from hdrq_plugin._io import write_text_atomic
from hdrq_plugin.convert import UnsupportedLayerError
from hdrq_plugin.export import export_qdq, validate
from hdrq_plugin.nipq import nipq_train
from hdrq_plugin.run.checkpoint import quantizer_family

from .generator import BLOCK_TYPES, INPUT_SHAPE, NUM_CLASSES, ModelCase, generate

#: Bit specs: four uniform ones (HDRQ quantizers) and NIPQ's mixed precision (learned widths,
#: average 4 bits, projected onto the budget after one training step).
BIT_SPECS = ("w8a8", "w4a8", "w4a4", "w3a3", "nipq-mixed")
#: Weight storages: the INT8 container, true INT4 (only where weights are <= 4 bits), each with
#: both saturation modes (uint8 wide weights, the portable default, or int8 for VNNI CPUs).
STORAGES = (("int8", True), ("int8", False), ("int4", True), ("int4", False))
CALIBRATION = HDRQConfig.cpu_preset("hdrq", iterations=1, num_samples=8, batch_size=4)
NIPQ_ONE_STEP = NIPQConfig.cpu_preset(hard_epochs=0, batch_size=8, init_batches=1)
TEST_IMAGES = 16
DEFAULT_OUT = Path("benchmarks/results/conformance.json")


@dataclass(frozen=True)
class Storage:
    weights: str
    saturation_safe: bool

    @property
    def name(self) -> str:
        return f"{self.weights}-{'safe' if self.saturation_safe else 'vnni'}"


def storages_for(spec: str) -> list[Storage]:
    """True INT4 only where some weights are <= 4 bits (w8a8 has none)."""
    return [Storage(w, safe) for w, safe in STORAGES if w == "int8" or spec != "w8a8"]


def _images(count: int, seed: int) -> torch.Tensor:
    return torch.randn(count, *INPUT_SHAPE, generator=torch.Generator().manual_seed(seed))


def _second_copy(model: nn.Module, seed: int) -> nn.Module:
    """A target-adapted stand-in: the same model with 2 % seeded noise on every parameter."""
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.02 * p.abs().mean() * torch.randn(p.shape, generator=gen))
    return other


def _quantize(model: nn.Module, source: nn.Module, spec: str, seed: int) -> nn.Module:
    if spec == "nipq-mixed":
        qmodel = convert_to_brevitas(model, "nipq-w4a4")
        x = _images(8, seed)
        with torch.no_grad():
            y = source(x).argmax(1)
        nipq_train(qmodel, [(x, y)], target=4, epochs=1, config=NIPQ_ONE_STEP, progress=False)
        return qmodel.eval()
    qmodel = convert_to_brevitas(model, spec, **quantizer_family("hdrq"))
    return hdrq_calibrate(qmodel, _images(CALIBRATION.num_samples, seed), source=source, config=CALIBRATION)


def _storage_applies(merged: nn.Module, storage: Storage) -> bool:
    if storage.weights != "int4":
        return True
    from hdrq_plugin.merge.models import read_weight_grid
    from hdrq_plugin.quant.control import quantized_layers
    return any(read_weight_grid(layer).bit_width <= 4 for _, layer in quantized_layers(merged))


def _disable_all_agreement(path: Path, merged: nn.Module, images: torch.Tensor) -> float:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]
    with torch.no_grad():
        expected = merged(images).detach().numpy()
    return float((np.argmax(got, 1) == np.argmax(expected, 1)).mean())


def run_model_spec(case: ModelCase, spec: str, folder: Path) -> list[dict]:
    """Every storage of one generated model at one bit spec; one row per case."""
    rows = []
    base = {"block": case.block, "model_seed": case.seed, "spec": spec}
    start = time.perf_counter()

    def finish(storage: Storage, outcome: str, stage: str, detail: str = "", **extra) -> None:
        rows.append({**base, "storage": storage.name, "outcome": outcome, "stage": stage,
                     "detail": detail[:300], **extra})

    try:
        source = case.build()
        targets = [source, _second_copy(source, case.seed + 1)]
        quantized = [_quantize(t, source, spec, case.seed + 10 + i) for i, t in enumerate(targets)]
    except UnsupportedLayerError as err:  # refused at conversion: must name what it refuses
        named = "graph node" in str(err) or "layer '" in str(err) or "parameter '" in str(err)
        for storage in storages_for(spec):
            finish(storage, "refused" if named else "other", "convert", str(err))
        return _timed(rows, start)
    except Exception as err:  # noqa: BLE001 — the suite records every failure as a row
        for storage in storages_for(spec):
            finish(storage, "other", "convert/calibrate", f"{type(err).__name__}: {err}")
        return _timed(rows, start)
    stage = "merge"
    try:
        merged = merge_models(quantized).eval()
        images = _images(TEST_IMAGES, case.seed + 99)
        for storage in storages_for(spec):
            if not _storage_applies(merged, storage):
                continue
            stage = "export"
            path = folder / f"{case.block}-{case.seed}-{spec}-{storage.name}.onnx"
            try:
                export_qdq(merged, path, images[:1], weights=storage.weights,
                           saturation_safe=storage.saturation_safe, overwrite=True)
                stage = "validate"
                report = validate(path, merged, [images[:8], images[8:]], batch_sizes=(1,), repeats=1, threads=1)
                disabled = _disable_all_agreement(path, merged, images)
            except Exception as err:  # noqa: BLE001
                finish(storage, "other", stage, f"{type(err).__name__}: {err}")
                continue
            problems = list(report.failures) + ([f"ORT_DISABLE_ALL top-1 agreement {disabled:.3f}"]
                                                if disabled < 1.0 else [])
            finish(storage, "other" if problems else "validated", "validate", "; ".join(problems),
                   top1_enable_all=next(iter(report.top1_agreement.values()), None), top1_disable_all=disabled)
    except Exception as err:  # noqa: BLE001
        for storage in storages_for(spec)[len(rows):]:
            finish(storage, "other", stage, f"{type(err).__name__}: {err}")
    return _timed(rows, start)


def _timed(rows: list[dict], start: float) -> list[dict]:
    seconds = (time.perf_counter() - start) / max(len(rows), 1)
    for row in rows:
        row["seconds"] = round(seconds, 2)
    return rows


def run_cases(models: list[ModelCase], specs=BIT_SPECS, *, limit: int | None = None, progress=None) -> list[dict]:
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="hdrq-conformance-") as folder:
        for case in models:
            for spec in specs:
                rows += run_model_spec(case, spec, Path(folder))
                if progress is not None:
                    progress(rows)
                if limit is not None and len(rows) >= limit:
                    return rows
    return rows


def sample_subset(count: int, seed: int) -> list[tuple[ModelCase, str]]:
    """A seeded (model, spec) sample covering every block type once and specs in rotation."""
    offset = random.Random(seed).randrange(len(BIT_SPECS))
    models = generate(count, seed=seed)
    return [(m, BIT_SPECS[(i + offset) % len(BIT_SPECS)]) for i, m in enumerate(models)]


def table(rows: list[dict]) -> str:
    cells: dict[tuple, Counter] = defaultdict(Counter)
    for row in rows:
        cells[(row["block"], row["spec"], row["storage"])][row["outcome"]] += 1
    lines = [f"{'block':<18} {'spec':<11} {'storage':<10} {'cases':>5} {'validated':>9} {'refused':>7} {'other':>5}"]
    for (block, spec, storage), count in sorted(cells.items()):
        lines.append(f"{block:<18} {spec:<11} {storage:<10} {sum(count.values()):>5} {count['validated']:>9} "
                     f"{count['refused']:>7} {count['other']:>5}")
    total = Counter(row["outcome"] for row in rows)
    lines.append(f"{'all':<18} {'':<11} {'':<10} {len(rows):>5} {total['validated']:>9} {total['refused']:>7} "
                 f"{total['other']:>5}")
    return "\n".join(lines)


def markdown_table(rows: list[dict], wall_seconds: float, command: str) -> str:
    """The table of :func:`table` as markdown, with the command, the totals and the wall time."""
    cells: dict[tuple, Counter] = defaultdict(Counter)
    for row in rows:
        cells[(row["block"], row["spec"], row["storage"])][row["outcome"]] += 1
    total = Counter(row["outcome"] for row in rows)
    lines = [f"`{command}`", "", f"{len(rows)} cases: {total['validated']} validated, {total['refused']} refused naming the node, "
             f"{total['other']} other; {wall_seconds:.0f} s wall.", "",
             "| block | spec | storage | cases | validated | refused | other |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {block} | {spec} | {storage} | {sum(c.values())} | {c['validated']} | {c['refused']} | {c['other']} |"
              for (block, spec, storage), c in sorted(cells.items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.conformance", description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=int, default=22, help="generated models (2 per block type by default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--specs", nargs="+", default=list(BIT_SPECS), choices=BIT_SPECS)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    start = time.perf_counter()

    def save(rows: list[dict]) -> None:
        print(f"\r{len(rows)} cases, {time.perf_counter() - start:.0f} s", end="", file=sys.stderr, flush=True)
        payload = {"command": "python -m benchmarks.conformance " + " ".join(argv if argv is not None else sys.argv[1:]),
                   "wall_seconds": round(time.perf_counter() - start, 1), "cases": len(rows),
                   "outcomes": dict(Counter(r["outcome"] for r in rows)), "block_types": list(BLOCK_TYPES),
                   "num_classes": NUM_CLASSES, "rows": rows}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.out, json.dumps(payload, indent=1))

    rows = run_cases(generate(args.models, seed=args.seed), args.specs, progress=save)
    save(rows)
    print(file=sys.stderr)
    print(table(rows))
    command = "python -m benchmarks.conformance " + " ".join(argv if argv is not None else sys.argv[1:])
    write_text_atomic(args.out.with_suffix(".md"), markdown_table(rows, time.perf_counter() - start, command))
    print(f"wall time {time.perf_counter() - start:.0f} s; JSON: {args.out}")
    for row in rows:
        if row["outcome"] == "other":
            print(f"OTHER {row['block']} seed {row['model_seed']} {row['spec']} {row['storage']} at "
                  f"{row['stage']}: {row['detail']}")
    return 1 if any(r["outcome"] == "other" for r in rows) else 0
