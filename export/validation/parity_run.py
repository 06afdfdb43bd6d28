"""Runs the Brevitas model and an ONNX file side by side, a few samples at a time, and tallies parity.

Used by ``validate`` on the user's data and by ``export_qdq`` on its example input under every
onnxruntime optimization level. The arithmetic of what may differ: :mod:`.parity`.

Samples go through in chunks of ``CHUNK_SAMPLES``: every activation's codes of both sides, and on
a divergence the float32 and float64 grid values of every activation, are held for one chunk
only (measured on a 224x224 ResNet-18 W8A8 file, 64 images in one batch: 6.6 GB peak RSS when a
whole batch was held at once, docs/export.md §7).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from hdrq_plugin.data import plain_tensor, split_batch

from .activation_codes import EnoughActivations, OnnxCodeReader, alignment_problems, capture_activation_codes
from .localize import first_changed_layer
from .parity import (
    DatasetParity,
    ParityTolerance,
    certified_logit_ties,
    first_diverging_layer,
    judge_first_divergence,
)

CHUNK_SAMPLES = 8  # samples whose activations are held at once (memory bound, module docstring)
KEPT_INPUTS = 64  # inputs kept for the latency measurement


class ParityRun:
    """Runs both sides chunk by chunk and tallies one dataset; explains diverging samples."""

    def __init__(self, reader: OnnxCodeReader, model: nn.Module, output_step_: float | None,
                 bound_steps: float | None, tolerance: ParityTolerance, model64: nn.Module | None = None) -> None:
        self.reader, self.model, self.step, self.tolerance = reader, model, output_step_, tolerance
        self.bound_steps = bound_steps
        self._model64 = model64  # the float64 copy, made on the first divergence unless given
        self.misaligned: list[str] | None = None  # set on the first chunk; codes are compared only if empty
        self.deployed_only_inputs: list[torch.Tensor] = []  # samples only the deployed kernels got wrong

    def dataset(self, name: str, batches: Iterable, max_batches: int | None, kept: list) -> DatasetParity:
        tally = DatasetParity()
        input_rank = len(self.reader.session.get_inputs()[0].shape)
        for index, batch in enumerate(batches):
            if max_batches is not None and index >= max_batches:
                break
            x, y = split_batch(batch, f"dataset {name!r}")
            if x.dim() != input_rank:
                raise ValueError(f"dataset {name!r} batch {index} has shape {tuple(x.shape)}; the file "
                                 f"takes {input_rank}-D batches (batch axis first)")
            x = x.detach().to(torch.float32)
            if len(kept) < KEPT_INPUTS:
                kept.extend(x[: KEPT_INPUTS - len(kept)].clone())
            for start in range(0, len(x), CHUNK_SAMPLES):
                chunk = x[start:start + CHUNK_SAMPLES].contiguous()
                labels = None if y is None else y[start:start + CHUNK_SAMPLES].numpy()
                self._chunk(tally, chunk, labels)
        if self.deployed_only_inputs and tally.function_changes_at is None:
            tally.function_changes_at, tally.function_change_detail = first_changed_layer(
                self.reader.path, self.reader.sites, self.model, self.deployed_only_inputs[0][None],
                self.reader.level)
        return tally

    def _chunk(self, tally: DatasetParity, x: torch.Tensor, labels: np.ndarray | None) -> None:
        # grid values (the value each quantizer rounds) kept for the tie judgement: reading them in
        # this pass saves a second float32 forward per diverging chunk
        with torch.no_grad(), capture_activation_codes(self.model, keep_grid_values=True) as captured:
            reference = self.model(x)
        reference = plain_tensor(reference).numpy()
        candidate, twin, onnx_codes = self.reader.run(x.numpy())
        if self.misaligned is None:
            self.misaligned = alignment_problems(captured, self.reader.sites)
        if self.misaligned:  # outputs only: no code is known to agree
            tally.add_outputs(reference, candidate, labels, self.step, np.zeros(len(x), dtype=bool))
            return
        ours = [record.codes for record in captured]
        first = first_diverging_layer(ours, onnx_codes)
        twin_is_deployed = self._within_bound(twin, candidate)
        codes_agree = (first < 0) & twin_is_deployed
        tally.add_outputs(reference, candidate, labels, self.step, codes_agree)
        certified = np.zeros(len(x), dtype=bool)  # differences all certified (tie flips or point 3)
        if not twin_is_deployed.all():
            certified |= self._judge_against_float64(tally, x, reference, candidate, ~twin_is_deployed)
        tally.add_code_mismatches([record.name for record in captured], ours, onnx_codes, first)
        changed_predictions = _changed_predictions(reference, candidate)
        changed = changed_predictions > 0
        diverging = (first >= 0) & twin_is_deployed
        # every sample whose prediction changed is judged; others while the budget lasts
        must = np.flatnonzero(diverging & changed)
        room = max(self.tolerance.explained_samples - tally.examined_samples - must.size, 0)
        optional = np.flatnonzero(diverging & ~changed)[:room]
        examined = np.concatenate([must, optional])
        if examined.size:
            certified[examined] = self._explain(tally, x, captured, first, onnx_codes, examined)
        logit_ties = codes_agree & certified_logit_ties(reference, candidate, self.step, self.bound_steps)
        tally.add_top1_causes(changed & codes_agree & ~logit_ties, changed & ~codes_agree & certified,
                              changed & ~codes_agree & ~certified, logit_ties, changed_predictions)

    def _steps(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        diff = np.abs(a.astype(np.float64) - b.astype(np.float64)).reshape(len(a), -1).max(axis=1)
        return diff / self.step if self.step else diff

    def _within_bound(self, twin: np.ndarray, deployed: np.ndarray) -> np.ndarray:
        """Per sample: does the instrumented twin compute what the deployed graph computes?"""
        return self._steps(twin, deployed) <= (self.bound_steps or 0.0)

    @property
    def model64(self) -> nn.Module | None:
        return self._model64

    def _float64(self) -> nn.Module:
        if self._model64 is None:
            self._model64 = copy.deepcopy(self.model).double().eval()
        return self._model64

    def _judge_against_float64(self, tally: DatasetParity, x: torch.Tensor, reference: np.ndarray,
                               deployed: np.ndarray, samples: np.ndarray) -> np.ndarray:
        """Samples where exposing the activations changed onnxruntime's kernels (parity.py, point 3):
        the deployed output must be no farther from the float64 model than PyTorch's float32 is.
        Returns, per sample of the chunk, whether it was judged and passed."""
        with torch.no_grad():
            exact = plain_tensor(self._float64()(x.double())).numpy()
        passed = tally.add_deployed_only(self._steps(deployed, exact)[samples], self._steps(reference, exact)[samples],
                                         self.bound_steps or 0.0)
        failed = np.flatnonzero(samples)[~passed]
        self.deployed_only_inputs.extend(x[failed][: max(1 - len(self.deployed_only_inputs), 0)])
        ok = np.zeros(len(x), dtype=bool)
        ok[np.flatnonzero(samples)[passed]] = True
        return ok

    def _explain(self, tally: DatasetParity, x: torch.Tensor, run32: list, first: np.ndarray,
                 onnx_codes: list[np.ndarray], samples: np.ndarray) -> np.ndarray:
        """Judge diverging samples' first diverging layer against the float64 model (parity.py, 1);
        returns, per sample given, whether every differing code is a certified tie flip.

        ``run32``: the float32 pass that gave the compared codes, with its grid values; the
        float64 copy, run on the examined samples only, gives the exact values.
        """
        needed = int(first[samples].max()) + 1  # the float64 forward stops after the last layer judged
        with torch.no_grad(), capture_activation_codes(self._float64(), keep_grid_values=True,
                                                       stop_after=needed) as run64:
            with contextlib.suppress(EnoughActivations):
                self._model64(x[torch.from_numpy(samples)].double())
        all_ties = []
        for row, sample in enumerate(samples.tolist()):
            layer = int(first[sample])
            pick = slice(sample, sample + 1)
            verdict = judge_first_divergence(run32[layer].codes[pick], onnx_codes[layer][pick],
                                             run32[layer].grid_value[pick].numpy(),
                                             run64[layer].grid_value[row:row + 1].numpy(),
                                             self.tolerance.tie_window_steps)
            tally.add_verdict(run32[layer].name, verdict)
            all_ties.append(verdict.unexplained == 0)
        return np.array(all_ties, dtype=bool)


def _changed_predictions(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Per sample, how many argmax predictions over axis 1 changed (one per sample for
    ``[N, C]`` logits, one per pixel for ``[N, C, H, W]``)."""
    if reference.ndim < 2:  # no classes: nothing to predict
        return np.zeros(len(reference), dtype=np.int64)
    changed = reference.argmax(1) != candidate.argmax(1)
    return changed.reshape(len(reference), -1).sum(axis=1)
