"""NIPQ on the digits zoo: learned mixed precision at an average of 4 bits against uniform W4A4.

    python -m benchmarks.nipq [--targets mnist optdigits mnistm] [--seeds 0] [--epochs 3]
        [--hard-epochs 1] [--hdrq-iterations 500] [--output benchmarks/results/nipq.json]

Per target θt (fine-tuned from θ0, ``hdrq_examples.zoo``), with the same labelled train split,
epochs, batch order and seed for both QAT methods:

- ``nipq``: ``convert_to_brevitas(θt, "nipq-w4a4")`` + :func:`hdrq_plugin.nipq_train` at an
  average of 4 bits for weights and for activations (over the learned tensors; the first conv,
  the classifier and the input stay 8-bit in every method), distillation from θt;
- ``lsq``: the same engine with :meth:`NIPQConfig.uniform_ste` — every learned width pinned at
  4, STE rounding with LSQ step scaling, no noise, no cost term (uniform W4A4 QAT);
- ``hdrq``: HDRQ W4A4 post-training quantization (``quantize_model``, ``--hdrq-iterations``);
- ``float``: one epoch of plain float fine-tuning of the BN-folded θt with the same loss and
  optimizer, timed, the unit of the training-cost ratios.

Then every method's three target models are merged (``merge_models``; NIPQ's differing widths
take the wider, ``hdrq_plugin.nipq.widths``) and evaluated per target. Each NIPQ model (and the
merged one) is exported as mixed-precision ONNX (INT8 containers; true INT4 where the file has
<= 4-bit layers) and checked in onnxruntime: ``validate`` (parity, kernels, accuracy) and the
top-1 agreement between onnxruntime and Brevitas on the target's test split.

CPU budget: the PQN noise is the uniform one here (``--noise histogram`` for the default),
which docs/nipq_method.md allows and costs less per step. Prints a table, writes JSON atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from hdrq_plugin import convert_to_brevitas, merge_models, quantize_model
from hdrq_plugin._io import atomic_write_path, write_text_atomic
from hdrq_plugin.convert import fold_batchnorm
from hdrq_plugin.evaluation import accuracy
from hdrq_plugin.export import export_qdq, validate
from hdrq_plugin.nipq.cost import describe_costs
from hdrq_plugin.nipq.train import NIPQConfig, quantize_nipq

BATCH = 128
METHODS = ("nipq", "lsq", "hdrq")
TARGET_BITS = 4.0


def loader(dataset, *, seed: int, shuffle: bool = True) -> DataLoader:
    return DataLoader(dataset, batch_size=BATCH, shuffle=shuffle, generator=torch.Generator().manual_seed(seed))


def float_epoch_seconds(model, train, teacher, config: NIPQConfig) -> float:
    """One epoch of plain float fine-tuning (BN folded, same loss and optimizer): the cost unit."""
    folded = fold_batchnorm(model).train()
    opt = torch.optim.SGD(folded.parameters(), lr=config.lr, momentum=config.momentum, nesterov=True,
                          weight_decay=config.weight_decay)
    tic = time.perf_counter()
    for x, y in train:
        out = folded(x)
        with torch.no_grad():
            soft = teacher(x)
        loss = F.cross_entropy(out, y) + F.kl_div(F.log_softmax(out, 1), F.softmax(soft, 1), reduction="batchmean")
        opt.zero_grad()
        loss.backward()
        opt.step()
    return time.perf_counter() - tic


def onnx_agreement(path: Path, model, test) -> dict:
    """Top-1 agreement of onnxruntime with Brevitas, and both accuracies, on ``test``."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    agree = correct_ort = correct_pt = total = 0
    model.eval()
    for x, y in DataLoader(test, batch_size=256):
        ort_pred = session.run(None, {"input": x.numpy()})[0].argmax(1)
        with torch.no_grad():
            pt_pred = model(x).argmax(1).numpy()
        agree += int((ort_pred == pt_pred).sum())
        correct_ort += int((ort_pred == y.numpy()).sum())
        correct_pt += int((pt_pred == y.numpy()).sum())
        total += len(y)
    return {"top1_agreement": agree / total, "onnxruntime_accuracy": correct_ort / total,
            "brevitas_accuracy": correct_pt / total}


def export_and_check(model, name: str, tests: dict, folder: Path) -> dict:
    """Mixed-precision export (int8 containers, and true INT4 when some layers are <= 4-bit)."""
    x = next(iter(DataLoader(next(iter(tests.values())), batch_size=1)))[0]
    out = {}
    storages = ["int8"]
    costs = describe_costs(model, x)
    if any(bits <= 4 for bits in costs.report().weight_bits.values()):
        storages.append("int4")
    for weights in storages:
        path = folder / f"{name}-{weights}.onnx"
        export_qdq(model, path, x, weights=weights, metadata={"method": "nipq"}, overwrite=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = validate(path, model, {t: DataLoader(d, batch_size=256) for t, d in tests.items()},
                              repeats=5)
        out[weights] = {"ok": report.ok, "failures": report.failures, "max_abs_diff": report.max_abs_diff,
                        "file_bytes": report.file_bytes,
                        "agreement": {t: onnx_agreement(path, model, d) for t, d in tests.items()}}
    return out


def single_target(args, bench, target: str, seed: int, folder: Path) -> dict:
    """Quantize one target with every method; returns rows, timings, learned bits, exports, states."""
    tests = {target: bench.domains[target].test}
    theta = bench.adapted[target]
    train_set = bench.domains[target].train
    if args.max_train is not None:  # smoke runs only
        train_set = torch.utils.data.Subset(train_set, range(min(args.max_train, len(train_set))))
    base = NIPQConfig.cpu_preset(seed=seed, noise_shape=args.noise, hard_epochs=args.hard_epochs)
    float_s = float_epoch_seconds(theta, loader(train_set, seed=seed), theta, base)
    out = {"rows": [], "timings": [], "bits": {}, "exports": {}, "states": {}}
    for method, config in (("nipq", base), ("lsq", NIPQConfig.cpu_preset(
            seed=seed, noise=False, learn_bits=False, hard_epochs=args.hard_epochs))):
        if method not in args.methods:
            continue
        qmodel, result = quantize_nipq(theta, train_set, "w4a4", target=TARGET_BITS, epochs=args.epochs, seed=seed,
                                       config=config, batch_size=BATCH, progress=False)
        acc = accuracy(qmodel, tests[target])
        out["states"][method] = qmodel.state_dict()
        report = result.report
        out["rows"].append({"method": method, "target": target, "seed": seed, "stage": "single", "accuracy": acc,
                            "average_weight_bits": report.average_weight_bits,
                            "average_act_bits": report.average_act_bits, "gbops": report.gbops,
                            "weight_bytes": report.weight_bytes,
                            "at_freeze": None if result.report_at_freeze is None else {
                                "average_weight_bits": result.report_at_freeze.average_weight_bits,
                                "average_act_bits": result.report_at_freeze.average_act_bits}})
        out["timings"].append({"method": method, "target": target, "seed": seed, "float_epoch_s": float_s,
                               **{f"{phase}_epoch_s": v for phase, v in result.seconds_per_epoch.items()},
                               **{f"{phase}_epoch_vs_float": v / float_s
                                  for phase, v in result.seconds_per_epoch.items()}})
        if method == "nipq":
            out["bits"][f"{target}/seed{seed}"] = {"weights": report.weight_bits, "activations": report.act_bits}
            if seed == args.seeds[0]:
                out["exports"][target] = export_and_check(qmodel, f"nipq-{target}-s{seed}", tests, folder)
        print(f"[{seed}] {method:5s} {target:9s} acc {acc:.4f}  w {report.average_weight_bits:.2f} "
              f"a {report.average_act_bits:.2f}  {report.gbops:.3f} GBOPs", flush=True)
    if args.hdrq_iterations > 0 and "hdrq" in args.methods:
        tic = time.perf_counter()
        qmodel = quantize_model(theta, bench.domains[target].calib, bits="w4a4", method="hdrq",
                                source=bench.source_model, seed=seed, iterations=args.hdrq_iterations).model
        out["states"]["hdrq"] = qmodel.state_dict()
        out["rows"].append({"method": "hdrq", "target": target, "seed": seed, "stage": "single",
                            "accuracy": accuracy(qmodel, tests[target]), "seconds": time.perf_counter() - tic})
        print(f"[{seed}] hdrq  {target:9s} acc {out['rows'][-1]['accuracy']:.4f}", flush=True)
    return out


def rebuild(bench, target: str, method: str, state: dict):
    from hdrq_plugin.run.checkpoint import quantizer_family

    theta = bench.adapted[target]
    model = (convert_to_brevitas(theta, "w4a4", **quantizer_family("hdrq")) if method == "hdrq"
             else convert_to_brevitas(theta, "nipq-w4a4"))
    model.load_state_dict(state)
    return model.eval()


def merge_pass(args, bench, parts: dict, folder: Path) -> dict:
    """Merge every method's target models per seed, evaluate per target, export the NIPQ merge."""
    tests = {t: bench.domains[t].test for t in args.targets}
    rows, timings, bits, exports = [], [], {}, {}
    for part in parts.values():
        rows += part["rows"]
        timings += part["timings"]
        bits.update(part["bits"])
        exports.update(part["exports"])
    for seed in args.seeds:
        for method in ("nipq", "lsq", "hdrq"):
            members = [rebuild(bench, t, method, parts[(t, seed)]["states"][method]) for t in args.targets
                       if method in parts[(t, seed)]["states"]]
            if len(members) < 2:
                continue
            merged = merge_models(members, rounding="noise-sampling", seed=seed)
            for target in args.targets:
                rows.append({"method": method, "target": target, "seed": seed, "stage": "merged",
                             "accuracy": accuracy(merged, tests[target])})
            if method == "nipq" and seed == args.seeds[0]:
                x = next(iter(DataLoader(tests[args.targets[0]], batch_size=1)))[0]
                report = describe_costs(merged, x).report()
                bits[f"merged/seed{seed}"] = {"weights": report.weight_bits, "activations": report.act_bits,
                                              "average_weight_bits": report.average_weight_bits,
                                              "average_act_bits": report.average_act_bits}
                exports["merged"] = export_and_check(merged, f"nipq-merged-s{seed}", tests, folder)
            print(f"[{seed}] {method:5s} merged   " + "  ".join(
                f"{r['target']} {r['accuracy']:.4f}" for r in rows if r["stage"] == "merged"
                and r["method"] == method and r["seed"] == seed), flush=True)
    return {"rows": rows, "timings": timings, "learned_bits": bits, "exports": exports,
            "settings": {"targets": args.targets, "seeds": args.seeds, "epochs": args.epochs,
                         "hard_epochs": args.hard_epochs, "noise": args.noise, "target_bits": TARGET_BITS,
                         "hdrq_iterations": args.hdrq_iterations, "batch_size": BATCH, "max_train": args.max_train,
                         "config": NIPQConfig.cpu_preset(noise_shape=args.noise).__dict__},
            "machine": platform.platform(), "torch": torch.__version__, "threads": 1}


def bops_check(args, bench) -> list[dict]:
    """NIPQ in BOPs mode on every target: the deployed BOPs against the target (issue: within 2 %)."""
    rows = []
    for seed in args.seeds:
        for target in args.targets:
            theta = bench.adapted[target]
            config = NIPQConfig.cpu_preset(seed=seed, noise_shape=args.noise, hard_epochs=args.hard_epochs)
            qmodel, result = quantize_nipq(theta, bench.domains[target].train, "w4a4",
                                           target={"gbops": args.bops_target}, epochs=args.epochs, seed=seed,
                                           config=config, batch_size=BATCH, progress=False)
            achieved = result.report.gbops
            rows.append({"target": target, "seed": seed, "target_gbops": args.bops_target,
                         "learned_gbops": result.report_at_freeze.gbops, "deployed_gbops": achieved,
                         "relative_gap": achieved / args.bops_target - 1.0,
                         "accuracy": accuracy(qmodel, bench.domains[target].test),
                         "weight_bits": result.report.weight_bits, "act_bits": result.report.act_bits})
            print(f"[{seed}] bops  {target:9s} target {args.bops_target:.3f} learned "
                  f"{result.report_at_freeze.gbops:.3f} deployed {achieved:.3f} GBOPs "
                  f"({100 * rows[-1]['relative_gap']:+.2f} %), acc {rows[-1]['accuracy']:.4f}", flush=True)
    return rows


def replace_methods(old: dict, new: dict, methods) -> dict:
    """A saved part with ``methods``' rows, timings, widths, exports and states taken from ``new``."""
    merged = {"rows": [r for r in old["rows"] if r["method"] not in methods] + new["rows"],
              "timings": [t for t in old["timings"] if t["method"] not in methods] + new["timings"],
              "states": {**{k: v for k, v in old["states"].items() if k not in methods}, **new["states"]},
              "bits": new["bits"] if "nipq" in methods else old["bits"],
              "exports": new["exports"] if "nipq" in methods else old["exports"]}
    return merged


def run(args) -> dict | None:
    from hdrq_examples.zoo import load_or_build_benchmark

    torch.set_num_threads(1)
    bench = load_or_build_benchmark()
    if args.phase == "bops":
        return {"bops": bops_check(args, bench), "settings": {"epochs": args.epochs, "hard_epochs": args.hard_epochs,
                                                             "noise": args.noise, "seeds": args.seeds}}
    folder = Path(tempfile.mkdtemp(prefix="nipq-bench-"))
    parts_dir = Path(args.parts)
    parts_dir.mkdir(parents=True, exist_ok=True)
    if args.phase in ("single", "all"):
        for seed in args.seeds:
            for target in args.targets:
                part = single_target(args, bench, target, seed, folder)
                path = parts_dir / f"{target}-s{seed}.pt"
                if set(args.methods) != set(METHODS) and path.is_file():  # replace only these methods' results
                    part = replace_methods(torch.load(path, weights_only=True), part, args.methods)
                with atomic_write_path(parts_dir / f"{target}-s{seed}.pt") as tmp:
                    torch.save(part, tmp)
    if args.phase == "single":
        return None
    parts = {(t, s): torch.load(parts_dir / f"{t}-s{s}.pt", weights_only=True)
             for t in args.targets for s in args.seeds}
    return merge_pass(args, bench, parts, folder)


def table(result: dict) -> str:
    lines = ["| method | stage | " + " | ".join(result["settings"]["targets"]) + " | mean |",
             "|---|---|" + "---|" * (len(result["settings"]["targets"]) + 1)]
    for method in ("nipq", "lsq", "hdrq"):
        for stage in ("single", "merged"):
            cells = []
            for target in result["settings"]["targets"]:
                values = [r["accuracy"] for r in result["rows"] if r["method"] == method and r["stage"] == stage
                          and r["target"] == target]
                cells.append(statistics.mean(values) if values else float("nan"))
            if all(np.isnan(cells)):
                continue
            lines.append(f"| {method} | {stage} | " + " | ".join(f"{c:.4f}" for c in cells)
                         + f" | {statistics.mean(cells):.4f} |")
    ratios = [t for t in result["timings"]]
    for method in ("nipq", "lsq"):
        phase = "noise" if method == "nipq" else "ste"
        values = [t[f"{phase}_epoch_vs_float"] for t in ratios if t["method"] == method]
        hard = [t["hard_epoch_vs_float"] for t in ratios if t["method"] == method and "hard_epoch_vs_float" in t]
        if values:
            lines.append(f"\n{method}: {phase} epoch = {statistics.mean(values):.2f}x float fine-tuning epoch; "
                         f"hard epoch = {statistics.mean(hard) if hard else float('nan'):.2f}x")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.nipq", description=__doc__.split("\n")[0])
    parser.add_argument("--targets", nargs="+", default=["mnist", "optdigits", "mnistm"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--epochs", type=int, default=10, help="noise (NIPQ) / STE (LSQ) epochs")
    parser.add_argument("--hard-epochs", type=int, default=1)
    parser.add_argument("--noise", default="uniform", choices=("uniform", "histogram"))
    parser.add_argument("--hdrq-iterations", type=int, default=500)
    parser.add_argument("--max-train", type=int, default=None, help="cap the train split (smoke runs)")
    parser.add_argument("--output", default=None,
                        help="default benchmarks/results/nipq.json (--phase bops: nipq_bops.json)")
    parser.add_argument("--bops-target", type=float, default=0.6, help="--phase bops: the GBOPs budget")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                        help="--phase single: the methods to run; with a saved part, only theirs are replaced")
    parser.add_argument("--phase", default="all", choices=("all", "single", "merge", "bops"),
                        help="single: quantize --targets and save parts; merge: merge saved parts "
                             "(run one 'single' process per target in parallel, then 'merge'); bops: NIPQ "
                             "in BOPs mode (--bops-target) on every target, the deployed BOPs against it")
    parser.add_argument("--parts", default="runs/nipq_bench", help="folder of the per-target parts")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    tic = time.perf_counter()
    result = run(args)
    if result is None:
        print(f"saved parts for {args.targets} in {args.parts} ({time.perf_counter() - tic:.0f} s)")
        return 0
    result["wall_seconds"] = time.perf_counter() - tic
    output = args.output or f"benchmarks/results/{'nipq_bops' if args.phase == 'bops' else 'nipq'}.json"
    write_text_atomic(output, json.dumps(result, indent=1, default=str))
    if args.phase != "bops":
        print(table(result))
        print(json.dumps(result["learned_bits"], indent=1))
    print(f"wrote {output} ({result['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
