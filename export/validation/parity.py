"""When onnxruntime computes the Brevitas model, measured on the integer grid.

Both sides compute the same integer codes in exact arithmetic: onnxruntime accumulates in int32
and requantizes with a float32 multiplier, Brevitas computes the same grid values with float32
convolutions on dequantized values. So parity is judged code by code, at every activation
quantizer (:mod:`.activation_codes`), and only two differences are legitimate:

1. **Tie flips.** A value that lies within float error of a half step can round to either
   neighbour. Such a flip changes one code by exactly one step, at an element whose exact value
   (recomputed by running the Brevitas model in float64) is within
   ``|v32 - v64| + tie_window_steps`` of the half step: the first term is Brevitas' own float32
   error, measured; the second bounds onnxruntime's float32 requantization, which rounds a
   product of an exact int32 accumulator and a float32 multiplier (relative error <= 2^-22
   per operation on values below 2^8 steps, i.e. < 2^-14 steps; the window is 2^-10 steps, 16x
   that, and 500x below the half-step spacing a genuine export error lands on). Only the first
   diverging layer of a sample is judged: later layers see different inputs.
2. **Float32 error of the float output.** When every activation code agrees, the logits differ
   only by how the last layer's float32 dot products round: at most ``(K + 4) u (Q_in max_row
   sum|w| + max|b|)`` output steps (K inputs, u = 2^-24, integer codes; :func:`.graph_facts.
   output_float_error_steps`).

3. **Kernels only the deployed graph runs.** Codes are read from a twin of the file whose
   activations are graph outputs, and exposing an int8 activation stops onnxruntime from
   turning it into uint8, so the twin may run other kernels than the deployed file (at 8-bit
   activations it runs float convolutions that round like PyTorch, while the deployed u8
   kernels are exact). Where the twin's output differs from the deployed one by more than the
   bound of point 2, the deployed output must be no farther from the float64 model than
   PyTorch's float32 output is, plus that bound: the deployed integer path may be *more*
   exact than the float32 reference, never less.

Anything else (a code off by more than one step, a flip far from a tie, larger output
differences with identical codes) is an export error, or a runtime that computes another
function than the file says (e.g. u8s8 kernels saturating in int16 on x86 CPUs without
VNNI, fixed in :mod:`.unsigned_grids`; onnxruntime's DoubleQDQPairsRemover on back-to-back
Q/DQ pairs with two scales, issue 19).

**Top-1, from the same causes.** A sample whose activation codes all agree must keep its top-1
prediction: its logits differ by float32 rounding only. A sample whose prediction changed is
always judged, and is *certified* when every difference at its first diverging layer is a tie
flip (point 1) or the deployed kernels are at least as exact as PyTorch (point 3): such samples
are counted (``tie_flip_samples``) and reported, not failed, because a rounding tie may go
either way (measured: 4 of 64 predictions on a 224x224 ResNet-18 W8A8 file, every differing
code a certified tie). A sample whose codes all agree but whose prediction changed is a
*logit tie* when its reference margin between the two predicted classes is at most twice the
bound B of point 2: each logit moves by at most B, so the margin moves by at most 2B, and a
margin within 2B may change sign in correct arithmetic (measured: with 2-bit weights and
activations, bnn_pynq CNV/TFC 2W2A give logits that tie *exactly* on the integer grid, PyTorch
and onnxruntime then break 1-3 of 64 ties differently by float32 summation order, margins
4e-7 to 1.3e-5 output steps against B = 4e-4 (TFC) and 2.6e-2 (CNV) steps). Such samples are counted
(``logit_tie_samples``) and reported, not failed; with codes agreeing, a changed prediction
whose margin exceeds 2B, or any output with no computable B, fails. Any other changed
prediction fails. ``min_top1_agreement`` applies to the agreement with both kinds of certified
samples counted as agreeing. History: the previous rule failed any
dataset under 99.9 % agreement, tie flips included, which failed correct W8A8 files; before it,
relative L2 error <= 1e-2 of the logits, which said nothing about the integer grid.

**Dense outputs** (``[N, C, H, W]`` per-pixel logits of a segmentation network): a prediction is
one pixel's argmax over ``C``, and the same rules apply per sample: a sample with a changed pixel
is judged, and its changed pixels count as agreeing when it is certified. Agreement is then the
fraction of pixels (``predictions``), accuracy the fraction of labelled pixels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

TIE_WINDOW_STEPS = 2.0 ** -10  # see the module docstring, point 1
MIN_TOP1_AGREEMENT = 0.999  # on agreement with certified tie samples counted as agreeing (docstring)
EXPLAINED_SAMPLES = 32  # diverging samples re-run in float64 per dataset to judge their first flip


@dataclass(frozen=True)
class ParityTolerance:
    """What onnxruntime may differ by; the defaults are derived in the module docstring."""

    min_top1_agreement: float = MIN_TOP1_AGREEMENT
    tie_window_steps: float = TIE_WINDOW_STEPS
    explained_samples: int = EXPLAINED_SAMPLES

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_top1_agreement <= 1.0:
            raise ValueError(f"min_top1_agreement must be in [0, 1], got {self.min_top1_agreement}")
        if not 0.0 <= self.tie_window_steps < 0.5:
            raise ValueError(f"tie_window_steps must be in [0, 0.5), got {self.tie_window_steps}")
        if self.explained_samples < 1:
            raise ValueError(f"explained_samples must be >= 1, got {self.explained_samples}")


def first_diverging_layer(brevitas_codes: list[np.ndarray], onnx_codes: list[np.ndarray]) -> np.ndarray:
    """Per sample, the index of the first activation layer whose codes differ (-1: none)."""
    first = np.full(brevitas_codes[0].shape[0], -1, dtype=np.int64)
    for index, (ours, theirs) in enumerate(zip(brevitas_codes, onnx_codes, strict=True)):
        differs = (ours != theirs).reshape(ours.shape[0], -1).any(axis=1)
        first[(first < 0) & differs] = index
    return first


@dataclass
class FlipVerdict:
    """The mismatched codes of one sample's first diverging layer, sorted into causes."""

    tie_flips: int = 0
    unexplained: int = 0
    max_step_diff: int = 0
    worst_tie_distance: float = 0.0  # the unexplained element farthest from a half step, in steps


def judge_first_divergence(ours: np.ndarray, theirs: np.ndarray, grid32: np.ndarray, grid64: np.ndarray,
                           tie_window_steps: float) -> FlipVerdict:
    """Sort the differing codes of one layer (same inputs on both sides) into tie flips and errors.

    ``grid32`` / ``grid64``: the value the quantizer rounds, in steps, from the float32 model
    and from its float64 copy. A tie flip differs by one step and its exact value lies within
    ``|grid32 - grid64| + tie_window_steps`` of the half step between the two codes.
    """
    ours, theirs = ours.astype(np.int64), theirs.astype(np.int64)
    mismatch = ours != theirs
    step_diff = np.abs(ours - theirs)[mismatch]
    half_step = (ours + theirs)[mismatch] / 2.0
    distance = np.abs(grid64[mismatch] - half_step)
    allowed = np.abs(grid32[mismatch] - grid64[mismatch]) + tie_window_steps
    is_tie = (step_diff == 1) & (distance <= allowed)
    verdict = FlipVerdict(tie_flips=int(is_tie.sum()), unexplained=int((~is_tie).sum()),
                          max_step_diff=int(step_diff.max()) if step_diff.size else 0)
    if verdict.unexplained:
        verdict.worst_tie_distance = float(distance[~is_tie].max())
    return verdict


def certified_logit_ties(reference: np.ndarray, candidate: np.ndarray, output_step_: float | None,
                         bound_steps: float | None) -> np.ndarray:
    """Per sample: some prediction changed and, for every changed prediction (one per sample, or
    one per pixel of ``[N, C, H, W]`` outputs), the reference margin between the two predicted
    classes is at most ``2 * bound_steps`` output steps (module docstring, "Top-1").

    Meaningful only for samples whose activation codes all agree (the bound assumes it). With no
    bound or no output step nothing is certified.
    """
    certified = np.zeros(len(reference), dtype=bool)
    if reference.ndim < 2 or output_step_ is None or bound_steps is None:
        return certified
    ours, theirs = reference.argmax(1), candidate.argmax(1)
    ref = reference.astype(np.float64)
    margin = (np.take_along_axis(ref, ours[:, None], 1) - np.take_along_axis(ref, theirs[:, None], 1))[:, 0]
    changed = (ours != theirs).reshape(len(reference), -1)
    beyond = (changed & (margin / output_step_ > 2.0 * bound_steps).reshape(len(reference), -1)).any(axis=1)
    return changed.any(axis=1) & ~beyond


@dataclass
class DatasetParity:
    """Everything measured for one dataset: agreement, output steps, code divergences."""

    samples: int = 0
    predictions: int = 0  # samples, or pixels for dense outputs (module docstring)
    top1_agreeing: int = 0
    labelled: int = 0
    correct: dict[str, int] = field(default_factory=lambda: {"onnxruntime": 0, "pytorch": 0})
    max_diff_steps: float = 0.0  # over every sample
    max_diff_steps_where_codes_agree: float = 0.0
    samples_with_code_divergence: int = 0
    code_mismatches: dict[str, int] = field(default_factory=dict)  # layer -> differing codes (incl. propagated)
    first_divergence_counts: dict[str, int] = field(default_factory=dict)  # layer -> samples first diverging there
    examined_samples: int = 0
    tie_flips: int = 0
    unexplained: list[dict] = field(default_factory=list)  # one entry per examined sample with an error
    top1_changed_where_codes_agree: int = 0  # a failure: identical codes, another prediction, margin > 2B
    tie_flip_samples: int = 0  # predictions changed by certified ties only: reported, not failed
    tie_flip_predictions: int = 0  # the predictions (pixels, for dense outputs) of those samples that changed
    logit_tie_samples: int = 0  # identical codes, reference margin <= 2B (docstring, "Top-1"): reported
    logit_tie_predictions: int = 0  # the predictions of those samples that changed
    top1_changed_uncertified: int = 0  # predictions changed by a difference that is not a tie
    deployed_only_samples: int = 0  # samples where the twin did not reproduce the deployed output
    deployed_only_failures: int = 0
    function_changes_at: str | None = None  # where the deployed graph's function first changes (localize.py)
    function_change_detail: str | None = None
    worst_deployed_excess_steps: float = 0.0  # deployed-vs-float64 minus float32-vs-float64, in steps

    @property
    def top1_agreement(self) -> float | None:
        return self.top1_agreeing / self.predictions if self.predictions else None

    @property
    def first_diverging_layer(self) -> str | None:
        """The earliest layer (execution order) where any sample's codes first differ, or where
        the deployed graph's function first changes when only its kernels differ."""
        return next(iter(self.first_divergence_counts), self.function_changes_at)

    def accuracy(self) -> dict[str, float] | None:
        if not self.labelled:
            return None
        return {side: count / self.labelled for side, count in self.correct.items()}

    def add_outputs(self, reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray | None,
                    output_step: float | None, codes_agree: np.ndarray) -> None:
        """Tally one batch of outputs; ``codes_agree[i]``: sample i has no differing code."""
        if reference.shape != candidate.shape:
            raise ValueError(f"output shapes differ: pytorch {reference.shape}, onnxruntime {candidate.shape}")
        diff = np.abs(reference.astype(np.float64) - candidate.astype(np.float64)).reshape(len(reference), -1)
        per_sample = diff.max(axis=1) / output_step if output_step else diff.max(axis=1)
        self.samples += len(reference)
        self.max_diff_steps = max(self.max_diff_steps, float(per_sample.max(initial=0.0)))
        if codes_agree.any():
            self.max_diff_steps_where_codes_agree = max(self.max_diff_steps_where_codes_agree,
                                                        float(per_sample[codes_agree].max()))
        if reference.ndim >= 2:  # classes on axis 1, per sample or per pixel
            ours, theirs = reference.argmax(1), candidate.argmax(1)
            self.predictions += ours.size
            self.top1_agreeing += int((ours == theirs).sum())
            if labels is not None:
                if labels.shape != ours.shape:
                    raise ValueError(f"labels of shape {labels.shape} do not match predictions of shape {ours.shape}")
                self.labelled += labels.size
                self.correct["pytorch"] += int((ours == labels).sum())
                self.correct["onnxruntime"] += int((theirs == labels).sum())
        else:
            self.predictions += len(reference)
            self.top1_agreeing += int(codes_agree.sum())  # no classes: agreement = identical codes

    def add_code_mismatches(self, names: list[str], brevitas_codes: list[np.ndarray],
                            onnx_codes: list[np.ndarray], first: np.ndarray) -> None:
        for name, ours, theirs in zip(names, brevitas_codes, onnx_codes, strict=True):
            count = int((ours != theirs).sum())
            if count:
                self.code_mismatches[name] = self.code_mismatches.get(name, 0) + count
        self.samples_with_code_divergence += int((first >= 0).sum())
        for index in sorted(set(first[first >= 0].tolist())):
            self.first_divergence_counts[names[index]] = (self.first_divergence_counts.get(names[index], 0)
                                                          + int((first == index).sum()))
        order = {name: i for i, name in enumerate(names)}
        self.first_divergence_counts = dict(sorted(self.first_divergence_counts.items(), key=lambda kv: order[kv[0]]))

    def add_deployed_only(self, deployed_from_exact: np.ndarray, reference_from_exact: np.ndarray,
                          bound_steps: float) -> np.ndarray:
        """Judge samples by point 3 (distances from the float64 model, in output steps); returns
        which passed."""
        excess = deployed_from_exact - reference_from_exact - bound_steps
        self.deployed_only_samples += len(excess)
        self.deployed_only_failures += int((excess > 0).sum())
        self.worst_deployed_excess_steps = max(self.worst_deployed_excess_steps, float(excess.max(initial=0.0)))
        return excess <= 0

    def add_top1_causes(self, codes_agree: np.ndarray, certified: np.ndarray, uncertified: np.ndarray,
                        logit_ties: np.ndarray | None = None,
                        changed_predictions: np.ndarray | None = None) -> None:
        """Sort the samples whose top-1 prediction changed by cause (module docstring, "Top-1");
        ``codes_agree`` excludes the ``logit_ties``; ``changed_predictions[i]``: how many
        predictions of sample i changed (1 per sample if None)."""
        self.top1_changed_where_codes_agree += int(codes_agree.sum())
        self.tie_flip_samples += int(certified.sum())
        self.tie_flip_predictions += int(certified.sum() if changed_predictions is None
                                         else changed_predictions[certified].sum())
        self.top1_changed_uncertified += int(uncertified.sum())
        if logit_ties is not None:
            self.logit_tie_samples += int(logit_ties.sum())
            self.logit_tie_predictions += int(logit_ties.sum() if changed_predictions is None
                                              else changed_predictions[logit_ties].sum())

    def add_verdict(self, layer: str, verdict: FlipVerdict) -> None:
        self.examined_samples += 1
        self.tie_flips += verdict.tie_flips
        if verdict.unexplained:
            self.unexplained.append({"layer": layer, "codes": verdict.unexplained,
                                     "max_step_diff": verdict.max_step_diff,
                                     "steps_from_a_tie": verdict.worst_tie_distance})

    def failures(self, name: str, tolerance: ParityTolerance, bound_steps: float | None) -> list[str]:
        """One line per violated check, naming the dataset, the layer and the figure."""
        if not self.samples:
            return [f"{name}: no data was given to compare onnxruntime with the model"]
        found = []
        if self.unexplained:
            worst = max(self.unexplained, key=lambda e: (e["max_step_diff"], e["steps_from_a_tie"]))
            found.append(f"{name}: activation codes of {worst['layer']} differ from PyTorch's by up to "
                         f"{worst['max_step_diff']} step(s), {worst['steps_from_a_tie']:.3g} steps from any "
                         f"rounding tie ({len(self.unexplained)} of {self.examined_samples} examined samples)")
        if self.top1_changed_where_codes_agree:
            found.append(f"{name}: {self.top1_changed_where_codes_agree} of {self.samples} predictions changed "
                         "although every activation code agrees and "
                         + (f"the reference margin exceeds twice the last layer's float32 bound ({bound_steps:.3g} "
                            "output steps)" if bound_steps is not None else
                            "the output has no float32 error bound (it is not made by a Gemm/Conv/MatMul on "
                            "dequantized integers)"))
        if self.top1_changed_uncertified:
            found.append(f"{name}: {self.top1_changed_uncertified} of {self.samples} predictions changed by "
                         "differences that are not rounding ties")
        agreement = self.top1_agreement
        if agreement is not None:
            agreement += (self.tie_flip_predictions + self.logit_tie_predictions) / self.predictions
            if agreement < tolerance.min_top1_agreement:
                found.append(f"{name}: top-1 agreement {100 * agreement:.2f} % (certified tie flips and logit ties "
                             f"counted as agreeing) is below {100 * tolerance.min_top1_agreement:.1f} %")
        if self.deployed_only_failures:
            found.append(f"{name}: the deployed graph's output is {self.worst_deployed_excess_steps:.3g} output steps "
                         f"farther from the float64 model than PyTorch's float32 output is, beyond the "
                         f"{bound_steps or 0.0:.3g}-step bound ({self.deployed_only_failures} of "
                         f"{self.deployed_only_samples} samples its kernels alone compute)"
                         + (f"; the function first changes at {self.function_changes_at} "
                            f"({self.function_change_detail})" if self.function_changes_at else ""))
        if bound_steps is not None and self.max_diff_steps_where_codes_agree > bound_steps:
            found.append(f"{name}: outputs differ by {self.max_diff_steps_where_codes_agree:.3g} output steps "
                         f"where every activation code agrees (float32 bound of the last layer: "
                         f"{bound_steps:.3g} steps)")
        return found

    def to_dict(self) -> dict:
        data = asdict(self)
        data.update(top1_agreement=self.top1_agreement, first_diverging_layer=self.first_diverging_layer,
                    accuracy=self.accuracy())
        return data
