"""What does pseudo-quantization noise cost per iteration compared with STE rounding?

    python -m benchmarks.calibration.noise_cost [--channels 64] [--kernel 3] [--repeats 300] [--threads 1]

Times one forward + backward of an HDRQ-quantized conv weight (``quant_weight()`` and a scalar
loss on it) in each mode, interleaved in one run so machine load hits all modes alike, and
prints milliseconds per call and the ratio to STE. Also times the noise pieces alone.
"""

from __future__ import annotations

import argparse
import time

import brevitas.nn as qnn
import torch

from hdrq_plugin.quant.control import set_noise_shape, set_quant_mode, weight_step
from hdrq_plugin.quant.noise import rounding_error_histogram, rounding_noise_like, sample_rounding_noise
from hdrq_plugin.quant.quantizers import HDRQQuantizer

MODES = ("ste", "noise", "noise-uniform", "round")


def _step(conv: qnn.QuantConv2d) -> None:
    weight = conv.quant_weight().value
    (weight * weight).sum().backward()


def _set_mode(conv: qnn.QuantConv2d, mode: str) -> None:
    set_quant_mode(conv, "noise" if mode.startswith("noise") else mode)
    set_noise_shape(conv, "uniform" if mode == "noise-uniform" else "histogram")


def time_modes(conv: qnn.QuantConv2d, repeats: int, rounds: int = 5) -> dict[str, float]:
    """Median over ``rounds`` of the mean time per call, modes interleaved round by round."""
    samples: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(rounds):
        for mode in MODES:
            _set_mode(conv, mode)
            for _ in range(10):  # warm-up
                _step(conv)
            start = time.perf_counter()
            for _ in range(repeats):
                _step(conv)
            samples[mode].append((time.perf_counter() - start) / repeats)
    return {mode: sorted(times)[len(times) // 2] for mode, times in samples.items()}


def time_call(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--kernel", type=int, default=3)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    conv = qnn.QuantConv2d(args.channels, args.channels, args.kernel, bias=False,
                           weight_quant=HDRQQuantizer, weight_bit_width=args.bits).train()
    shape = tuple(conv.weight.shape)
    times = time_modes(conv, args.repeats)
    print(f"weight {shape}, {args.bits} bits, {args.threads} thread(s); forward+backward per call:")
    for mode, seconds in times.items():
        print(f"  {mode:14s} {seconds * 1e3:7.3f} ms   {seconds / times['ste']:5.2f}x STE")
    w, step = conv.weight.detach(), weight_step(conv)
    qmin, qmax = -(2 ** (args.bits - 1)), 2 ** (args.bits - 1) - 1
    histogram = rounding_error_histogram(w, step, qmin, qmax)
    pieces = {
        "histogram": lambda: rounding_error_histogram(w, step, qmin, qmax),
        "sample": lambda: sample_rounding_noise(histogram, shape),
        "histogram+sample": lambda: rounding_noise_like(w, step, qmin, qmax),
        "uniform": lambda: rounding_noise_like(w, step, qmin, qmax, shape="uniform"),
    }
    print("noise pieces alone:")
    for name, fn in pieces.items():
        print(f"  {name:16s} {time_call(fn, args.repeats) * 1e3:7.3f} ms")


if __name__ == "__main__":
    main()
