"""HOT vs plain backprop: saved-activation bytes, peak memory, backward time, accuracy parity.

    python -m benchmarks.hot.memory                  # memory + time on ResNet-8 (32×32) and a ResNet-18-like (224×224)
    python -m benchmarks.hot.memory --parity         # adapt θ0 to every target with HOT vs plain (seeds, float merge)
    python -m benchmarks.hot.memory --parity --hdrq-iterations 200   # + HDRQ W4A4 merge of HOT- vs plain-adapted θt

Prints tables and updates ``benchmarks/results/hot.json`` (sections ``memory`` and ``parity``).

Saved bytes are counted with ``torch.autograd.graph.saved_tensors_hooks`` over one training
step: "conv/linear inputs" are what Conv2d/Linear keep for their weight gradient (plain: the
float input; HOT: the projected int8 buffer); "all saved" counts every distinct storage the
graph holds (BatchNorm inputs, ReLU outputs, … stay float under HOT). Peak memory is the peak
RSS growth of one step in a fresh child process. Backward time is the median over steps of
``loss.backward()``, HOT and plain alternating in one process; HOT's GEMM modes (auto:
_int_mm for Linear/1×1, float conv kernels on the codes for k×k; all-int8 via im2col; all-float)
are timed side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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


def _context(model, mode: str):
    import contextlib

    if mode == "plain":
        return contextlib.nullcontext(None)
    return hot_mode(model, HOTConfig(gemm={"hot": "auto", "hot-int-gemm": "int", "hot-float-gemm": "float"}[mode]))


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


def backward_times(model: nn.Module, shape, batch: int, steps: int) -> dict[str, float]:
    """Median seconds of loss.backward() per mode, modes interleaved step by step."""
    inputs, labels = _batch(shape, batch)
    times: dict[str, list[float]] = {"plain": [], "hot": [], "hot-int-gemm": [], "hot-float-gemm": []}
    model.train()
    for step in range(steps + 1):
        for mode in times:
            with _context(model, mode):
                loss = F.cross_entropy(model(inputs), labels)
                model.zero_grad(set_to_none=True)
                start = time.perf_counter()
                loss.backward()
                if step > 0:  # the first step warms up allocators and kernels
                    times[mode].append(time.perf_counter() - start)
    return {mode: statistics.median(values) for mode, values in times.items()}


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


def _current_rss_kb() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def peak_child(name: str, mode: str) -> None:
    """(Child process) one training step; prints the peak RSS growth in bytes as JSON."""
    torch.manual_seed(0)
    factory, shape, batch = _models()[name]
    model = factory().train()
    inputs, labels = _batch(shape, batch)
    before_peak, before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, _current_rss_kb()
    with _context(model, mode):
        F.cross_entropy(model(inputs), labels).backward()
    after_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_growth_bytes": (after_peak - before) * 1024, "masked": after_peak <= before_peak}))


def _peak(name: str, mode: str) -> dict:
    # the same module, from the repository root (where `benchmarks` imports), in a fresh process
    out = subprocess.run([sys.executable, "-m", __spec__.name, "--peak-child", name, mode], check=True,
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=_BENCHMARKS.parent)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_memory(steps: int) -> dict:
    results = {}
    for name, (factory, shape, batch) in _models().items():
        torch.manual_seed(0)
        model = factory()
        row = {"input": [batch, *shape]}
        for mode in ("plain", "hot"):
            row[mode] = saved_bytes(model, mode, shape, batch)
            row[mode]["peak"] = _peak(name, mode)
        row["backward_s"] = backward_times(model, shape, batch, steps)
        results[name] = row
    results["gemm_s"] = gemm_times()
    return results


def _mb(value: float) -> str:
    return f"{value / 2**20:8.2f}"


def print_memory(results: dict) -> None:
    print("| model | batch×input | conv/linear saved MB plain → HOT (ratio) | all saved MB plain → HOT (ratio) "
          "| peak step MB plain → HOT (ratio) | backward s plain / HOT auto / all-int8 / all-float GEMM (HOT÷plain) |")
    print("|---|---|---|---|---|---|")
    for name, row in results.items():
        if name == "gemm_s":
            continue
        p, h = row["plain"], row["hot"]
        def ratio(key, p=p, h=h):
            return p[key] / h[key]
        peak_p, peak_h = p["peak"]["peak_growth_bytes"], h["peak"]["peak_growth_bytes"]
        t = row["backward_s"]
        print(f"| {name} | {'×'.join(map(str, row['input']))} "
              f"| {_mb(p['conv_linear_saved_bytes'])} → {_mb(h['conv_linear_saved_bytes'])} ({ratio('conv_linear_saved_bytes'):.2f}×) "
              f"| {_mb(p['all_saved_bytes'])} → {_mb(h['all_saved_bytes'])} ({ratio('all_saved_bytes'):.2f}×) "
              f"| {_mb(peak_p)} → {_mb(peak_h)} ({peak_p / max(peak_h, 1):.2f}×) "
              f"| {t['plain']:.3f} / {t['hot']:.3f} / {t['hot-int-gemm']:.3f} / {t['hot-float-gemm']:.3f} "
              f"({t['hot'] / t['plain']:.2f}×) |")
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
    parser.add_argument("--steps", type=int, default=3, help="timed backward steps per mode")
    parser.add_argument("--parity", action="store_true", help="run the accuracy-parity benchmark instead")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--hdrq-iterations", type=int, default=0,
                        help="also quantize (HDRQ W4A4) and merge the seed-0 adapted models with this budget")
    parser.add_argument("--peak-child", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.peak_child:
        peak_child(*args.peak_child)
        return 0
    if args.parity:
        from .parity import print_parity, run_parity

        results = run_parity(args.seeds, args.hdrq_iterations)
        print_parity(results)
        _merge_json("parity", results)
    else:
        results = run_memory(args.steps)
        print_memory(results)
        _merge_json("memory", {"torch": torch.__version__, "threads": 1, **results})
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
