"""HOT vs plain backprop: saved-activation bytes, peak of one step, backward time, batch fits, accuracy parity.

    python -m benchmarks.hot.memory                  # the table: ResNet-8 (64×32²) and a ResNet-18-like (8×224²)
    python -m benchmarks.hot.memory --parity         # adapt θ0 to every target with HOT vs plain (seeds, float merge)
    python -m benchmarks.hot.memory --parity --hdrq-iterations 200   # + HDRQ W4A4 merge of HOT- vs plain-adapted θt

Prints tables and updates ``benchmarks/results/hot.json`` (sections ``memory`` and ``parity``).

Every figure of every mode comes from its own fresh process, the modes side by side per model
and figure, with the load average before and after each. Saved bytes are counted with
``torch.autograd.graph.saved_tensors_hooks`` over one training step: "conv/linear inputs" are
what Conv2d/Linear keep for their weight gradient (plain: the float input; HOT: the projected
int8 buffer); "all saved" counts every distinct storage the graph holds. The peak of one step is
the highest live tensor bytes of a forward + backward (gradients included) from torch's
allocator events (``hdrq_plugin.hot.budget.measure_step_peak``; deterministic). Backward time is
the median CPU time of ``loss.backward()`` over steps, in two rounds of fresh processes with the
modes interleaved, one ``hot_mode`` session per process around every step (as a training loop
uses it); the first step (LQS calibration, kernel compilation) is timed apart. "fit" is the largest batch whose step peak fits the plain step's peak at the
benchmark batch (``fit_batch_to_budget``), on the 224² model and on the digits zoo's θ0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from hdrq_plugin._io import atomic_write_path  # noqa: E402
from hdrq_plugin.hot.mode import HOTConfig, hot_mode  # noqa: E402

_BENCHMARKS = Path(__file__).resolve().parents[1]
RESULTS = _BENCHMARKS / "results" / "hot.json"


class _Block(nn.Module):
    def __init__(self, inp: int, out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inp, out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out)
        self.conv2 = nn.Conv2d(out, out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out)
        self.down = (nn.Sequential(nn.Conv2d(inp, out, 1, stride, bias=False), nn.BatchNorm2d(out))
                     if stride != 1 or inp != out else nn.Identity())

    def forward(self, x):
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + self.down(x))


class ResNet18Like(nn.Module):
    """ImageNet ResNet-18 layout (He et al. 2016, Table 1): 7×7/2 stem, max-pool, 4 stages × 2 blocks."""

    def __init__(self, num_classes: int = 10, widths=(64, 128, 256, 512)) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 7, 2, 3, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        blocks, inp = [], widths[0]
        for stage, width in enumerate(widths):
            for index in range(2):
                blocks.append(_Block(inp, width, 2 if stage > 0 and index == 0 else 1))
                inp = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(inp, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1))


def _models() -> dict[str, tuple]:
    from hdrq_examples.models import build_resnet

    return {  # name → (factory, input shape, batch)
        "resnet8-32px": (lambda: build_resnet(), (3, 32, 32), 64),  # the demo zoo's model and batch
        "resnet18like-224px": (ResNet18Like, (3, 224, 224), 8),
    }


def _batch(shape, batch: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, *shape, generator=generator), torch.randint(0, 10, (batch,), generator=generator)


def _config(mode: str) -> HOTConfig | None:
    if mode == "plain":
        return None
    return HOTConfig(gemm={"hot": "auto", "hot-int-gemm": "int", "hot-float-gemm": "float"}[mode])


def _context(model, mode: str):
    import contextlib

    config = _config(mode)
    return contextlib.nullcontext(None) if config is None else hot_mode(model, config)


def saved_bytes(model: nn.Module, mode: str, shape, batch: int) -> dict:
    """Bytes the autograd graph of one step keeps: conv/linear inputs and every distinct storage."""
    inputs, labels = _batch(shape, batch)
    params = {p.data_ptr() for p in model.parameters()}
    layer_inputs: dict[int, int] = {}
    hooks = [m.register_forward_pre_hook(lambda m, a: layer_inputs.__setitem__(
        a[0].untyped_storage().data_ptr(), a[0].untyped_storage().nbytes()))
        for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    model.train()
    with _context(model, mode) as session, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(inputs), labels)
    for hook in hooks:
        hook.remove()
    if session is None:
        conv_linear = sum(nbytes for ptr, nbytes in layer_inputs.items() if ptr in storages)
    else:
        conv_linear = sum(row["saved_activation_bytes"] for row in session.report())
        skipped = [name for name in session.skipped]
        assert not skipped, skipped
    all_saved = sum(storages.values())
    loss.backward()
    report = session.report() if session is not None else None
    return {"conv_linear_saved_bytes": conv_linear, "all_saved_bytes": all_saved, "layers": report}


def backward_times(model: nn.Module, mode: str, shape, batch: int, steps: int) -> dict[str, float]:
    """Median wall and CPU seconds of loss.backward() over ``steps`` steps, after a first step.

    One ``hot_mode`` session around all steps, as in a training loop: the first backward makes
    the per-layer choices (LQS calibration) and compiles the fused kernels (``hdrq_plugin.hot.fused``);
    its time is reported apart (``first_step``), not in the median. (Entering ``hot_mode`` anew
    every step, as this benchmark did before, re-ran the calibration in every timed step.)
    """
    inputs, labels = _batch(shape, batch)
    wall, cpu = [], []
    first = {}
    model.train()
    with _context(model, mode):
        for step in range(steps + 1):
            loss = F.cross_entropy(model(inputs), labels)
            model.zero_grad(set_to_none=True)
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            loss.backward()
            elapsed_wall, elapsed_cpu = time.perf_counter() - start_wall, time.process_time() - start_cpu
            if step > 0:  # the first step warms up allocators and kernels, calibrates and compiles
                wall.append(elapsed_wall)
                cpu.append(elapsed_cpu)
            else:
                first = {"wall": elapsed_wall, "cpu": elapsed_cpu}
    return {"wall": statistics.median(wall), "cpu": statistics.median(cpu), "first_step": first}


def gemm_times(repeats: int = 20) -> list[dict]:
    """torch._int_mm vs float32 matmul of the same int8 codes, at HOT's Linear / 1×1 GEMM shapes."""
    from hdrq_plugin.hot.hadamard import integer_matmul

    shapes = {  # (rows, inner, cols): HQ g·w and HLA (P·g)ᵀ·(P·x) of the layers that use _int_mm
        "resnet8 fc HQ (64×10 · 10×128)": (64, 10, 128),
        "resnet8 fc HLA (10×32 · 32×128)": (10, 32, 128),
        "resnet18 1×1-like HQ (6272×128 · 128×64)": (6272, 128, 64),
        "resnet18 1×1-like HLA (128×3136 · 3136×64)": (128, 3136, 64),
    }
    generator = torch.Generator().manual_seed(0)
    rows = []
    for label, (m, k, n) in shapes.items():
        left = torch.randint(-7, 8, (m, k), generator=generator, dtype=torch.int8)
        right = torch.randint(-127, 128, (k, n), generator=generator, dtype=torch.int8)
        timing = {}
        for use_int_mm in (True, False):
            integer_matmul(left, right, use_int_mm=use_int_mm)
            start = time.perf_counter()
            for _ in range(repeats):
                integer_matmul(left, right, use_int_mm=use_int_mm)
            timing["int_mm" if use_int_mm else "float"] = (time.perf_counter() - start) / repeats
        rows.append({"gemm": label, **timing})
    return rows


def _load() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def _child_figure(kind: str, name: str, mode: str, steps: int) -> dict:
    """(Fresh process) one figure of one mode on one model."""
    from hdrq_plugin.hot.budget import measure_step_peak

    torch.manual_seed(0)
    if kind == "fit":
        return _fit(name, mode)
    factory, shape, batch = _models()[name]
    model = factory().train()
    inputs, labels = _batch(shape, batch)
    if kind == "saved":
        row = saved_bytes(model, mode, shape, batch)
        row.pop("layers")
        return row
    if kind == "peak":
        return {"live_peak_bytes": measure_step_peak(model, inputs, labels, _config(mode))}
    if kind == "time":
        return {"backward_s": backward_times(model, mode, shape, batch, steps)}
    raise ValueError(kind)


FIT_DATA = 64  # images the fit may use: batches up to this


def _fit(name: str, mode: str) -> dict:
    """Largest batch whose HOT / plain step peak fits the plain peak at the benchmark batch."""
    from hdrq_plugin.hot.budget import fit_batch_to_budget, measure_step_peak

    if name == "digits-zoo":
        from hdrq_examples.training import dataset_tensors
        from hdrq_examples.zoo import BenchmarkRecipe, load_or_build_benchmark

        bench = load_or_build_benchmark(BenchmarkRecipe())
        model, batch = bench.source_model, bench.recipe.adaptation.batch_size
        images, labels = dataset_tensors(bench.domains[bench.recipe.target_domains[0]].train)
        images, labels = images[:8 * batch], labels[:8 * batch]
    else:
        factory, shape, batch = _models()[name]
        model = factory()
        images, labels = _batch(shape, FIT_DATA)
    budget = measure_step_peak(model, images[:batch], labels[:batch])
    fit = fit_batch_to_budget(model, images, labels, budget, _config(mode))
    return {"budget_bytes": budget, "budget_batch": batch, "batch_size": fit.batch_size,
            "peak_bytes": fit.peak_bytes, "limited_by_data": fit.limited_by_data, "data": len(images)}


def _child(*args: str) -> dict:
    # the same module, from the repository root (where `benchmarks` imports), in a fresh process
    load_before = _load()
    out = subprocess.run([sys.executable, "-m", __spec__.name, "--child", *args], check=True,
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         cwd=_BENCHMARKS.parent)
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "load": [load_before, _load()]}


MODES = ("plain", "hot", "hot-float-gemm")
FIGURES = ("saved", "peak", "time", "time")  # two rounds of timing


def run_memory(steps: int, models: list[str] | None = None, fits: bool = True) -> dict:
    """Every figure of every mode in its own fresh process, the modes side by side per figure."""
    results = {}
    for name, (_, shape, batch) in _models().items():
        if models and name not in models:
            continue
        row = {"input": [batch, *shape], **{mode: {"time_rounds": []} for mode in MODES}}
        for kind in FIGURES:
            for mode in MODES if kind == "time" else MODES[:2]:
                figure = _child(kind, name, mode, str(steps))
                print(f"  {name} {kind} {mode}: {figure}", flush=True)
                if kind == "time":
                    row[mode]["time_rounds"].append(figure)
                else:
                    row[mode][kind] = figure
        results[name] = row
    if fits:
        results["fit"] = {name: {mode: _child("fit", name, mode, "0") for mode in MODES[:2]}
                          for name in ("digits-zoo", "resnet18like-224px")}
        print(f"  fit: {results['fit']}", flush=True)
        results["gemm_s"] = gemm_times()
    return results


def _mb(value: float) -> str:
    return f"{value / 2**20:.2f}"


def _cpu_s(row: dict) -> float:
    rounds = [figure["backward_s"]["cpu"] for figure in row["time_rounds"]]
    return statistics.median(rounds)


def print_memory(results: dict) -> None:
    print("| model | batch×input | conv/linear saved MiB plain → HOT (ratio) | all saved MiB plain → HOT (ratio) "
          "| peak of one step MiB plain → HOT (ratio) | backward CPU s plain / HOT (ratio) "
          "| HOT float32 kernels s (ratio) | load avg |")
    print("|---|---|---|---|---|---|---|---|")
    for name, row in results.items():
        if not isinstance(row, dict) or "plain" not in row:
            continue
        p, h, f = row["plain"], row["hot"], row["hot-float-gemm"]

        def cell(a, b):
            return f"{_mb(a)} → {_mb(b)} ({b / max(a, 1):.2f}×)"
        figures = [figure for mode in MODES for figure in
                   (*row[mode]["time_rounds"], *(row[mode][k] for k in ("saved", "peak") if k in row[mode]))]
        loads = [one_minute for figure in figures for one_minute, *_ in figure["load"]]
        print(f"| {name} | {'×'.join(map(str, row['input']))} "
              f"| {cell(p['saved']['conv_linear_saved_bytes'], h['saved']['conv_linear_saved_bytes'])} "
              f"| {cell(p['saved']['all_saved_bytes'], h['saved']['all_saved_bytes'])} "
              f"| {cell(p['peak']['live_peak_bytes'], h['peak']['live_peak_bytes'])} "
              f"| {_cpu_s(p):.3f} / {_cpu_s(h):.3f} ({_cpu_s(h) / _cpu_s(p):.2f}×) "
              f"| {_cpu_s(f):.3f} ({_cpu_s(f) / _cpu_s(p):.2f}×) "
              f"| {min(loads):.1f}–{max(loads):.1f} |")
    print("\n| model | budget = plain peak at batch | largest batch in it: plain / HOT | HOT peak MiB |\n|---|---|---|---|")
    for name, fits in results.get("fit", {}).items():
        p, h = fits["plain"], fits["hot"]
        more = "+" if h["limited_by_data"] else ""
        print(f"| {name} | {_mb(p['budget_bytes'])} MiB (batch {p['budget_batch']}) | {p['batch_size']} / "
              f"{h['batch_size']}{more} (of {h['data']}) | {_mb(h['peak_bytes'])} |")
    print("\n| GEMM on int8 codes | torch._int_mm ms | float32 matmul ms | float ÷ int |\n|---|---|---|---|")
    for row in results.get("gemm_s", []):
        print(f"| {row['gemm']} | {1e3 * row['int_mm']:.3f} | {1e3 * row['float']:.3f} | {row['float'] / row['int_mm']:.2f}× |")


def _merge_json(section: str, payload: dict) -> None:
    existing = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    existing[section] = payload
    with atomic_write_path(RESULTS) as tmp:
        tmp.write_text(json.dumps(existing, indent=2, default=str))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="timed backward steps per mode")
    parser.add_argument("--parity", action="store_true", help="run the accuracy-parity benchmark instead")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--hdrq-iterations", type=int, default=0,
                        help="also quantize (HDRQ W4A4) and merge the seed-0 adapted models with this budget")
    parser.add_argument("--models", nargs="+", help="re-measure only these models (no fits), keeping the others' rows")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.child:
        kind, name, mode, steps = args.child
        print(json.dumps(_child_figure(kind, name, mode, int(steps))))
        return 0
    if args.parity:
        from .parity import print_parity, run_parity

        results = run_parity(args.seeds, args.hdrq_iterations)
        print_parity(results)
        _merge_json("parity", results)
    else:
        print(f"load average before: {_load()}", flush=True)
        results = run_memory(args.steps, args.models, fits=not args.models)
        previous = json.loads(RESULTS.read_text()).get("memory", {}) if args.models and RESULTS.is_file() else {}
        results = {**previous, "torch": torch.__version__, "threads": 1, **results}  # --models: the others kept
        print_memory(results)
        print(f"load average after: {_load()}")
        _merge_json("memory", results)
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
