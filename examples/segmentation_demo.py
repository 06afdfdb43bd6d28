"""The segmentation demo behind ``hdrq demo --task segmentation``.

θ0 on digit scenes → θt adapted per target → quantized per target (RTN and HDRQ) → merged on one
integer grid → exported to ONNX QDQ → validated in onnxruntime on per-pixel argmax agreement,
with the report (``report.json`` / ``report.md``, the ``accuracy`` column holds mIoU) and one
picture per target (input, ground truth, float θt, merged integer model as onnxruntime runs it).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from hdrq_plugin._io import atomic_write_path, ensure_writable_dir
from hdrq_plugin.bitspec import BitSpec
from hdrq_plugin.convert.to_brevitas import fold_batchnorm
from hdrq_plugin.evaluation import harmonic_mean
from hdrq_plugin.merge.float_merge import average_float_models
from hdrq_plugin.merge.models import merge_models
from hdrq_plugin.progress import timed_stage
from hdrq_plugin.quantize import quantize_model
from hdrq_plugin.run.report import HARMONIC_MEAN, Report

from .segmentation_metrics import mean_iou
from .segmentation_scenes import BACKGROUND, NUM_CLASSES
from .segmentation_zoo import SegmentationRecipe, load_or_build_segmentation_zoo

#: reconstruction iterations per unit in the segmentation demo (the classification demo uses 500;
#: the U-Net has 10 units, so this keeps HDRQ near a minute per target on two cores)
DEMO_ITERATIONS = 200
#: ``demo``: the trained zoo (``hdrq demo --task segmentation``); ``small``: the case ``make demo``
#: runs after the classification demo; ``tiny``: tests
SIZES = {"demo": SegmentationRecipe, "small": SegmentationRecipe.small, "tiny": SegmentationRecipe.tiny}
#: reconstruction iterations per unit of ``make demo``'s small case (Makefile passes it)
SMALL_ITERATIONS = 40
PICTURE_SCENES = 3  # test scenes shown per target


def run_segmentation_demo(bits: str = "w4a4", out: str | Path = "runs/demo-segmentation", seed: int = 0,
                          size: str = "demo", iterations: int | None = DEMO_ITERATIONS, model: str = "unet",
                          cache_dir: str | Path | None = None) -> Report:
    """Run the segmentation pipeline end to end; writes the report, the models' ONNX file and PNGs."""
    spec = BitSpec.parse(bits)
    if size not in SIZES:
        raise ValueError(f"size must be one of {tuple(SIZES)}, got {size!r}")
    out = ensure_writable_dir(out)
    recipe = SIZES[size](model=model, seed=seed)
    report = Report(recipe={"task": "segmentation", "metric": "mIoU", "benchmark": recipe.to_dict(),
                            "bits": str(spec), "seed": seed, "iterations_per_unit": iterations or "cpu-preset"})
    report.extra["metric"] = "the accuracy column is the mIoU of the test scenes (11 classes)"
    clock = partial(timed_stage, report.timings)  # times each stage into the report, announces it
    with clock("zoo_s"):
        bench = load_or_build_segmentation_zoo(recipe, cache_dir=cache_dir)
    report.extra["zoo_from_cache"] = bench.from_cache
    targets = list(recipe.target_domains)
    tests = {t: bench.domains[t].test for t in targets}

    def miou(model) -> dict[str, float]:
        return {t: mean_iou(model, tests[t], NUM_CLASSES) for t in targets}

    report.add_per_target("source", "fp32", "float_source", miou(bench.source_model))
    for t in targets:
        report.add("adapted", "fp32", "float_adapted", t, mean_iou(bench.adapted[t], tests[t], NUM_CLASSES))
    float_merged = average_float_models([fold_batchnorm(bench.adapted[t]) for t in targets])
    report.add_per_target("float-merge", "fp32", "float_merged", miou(float_merged))
    report.write(out)

    merged = {}
    for method, rounding in (("rtn", "half-to-even"), ("hdrq", "noise-sampling")):
        models = []
        for t in targets:
            with clock(f"quantize_{method}_s", t):
                result = quantize_model(bench.adapted[t], bench.domains[t].calib, bits=spec, method=method,
                                        source=bench.source_model, seed=seed, iterations=iterations)
            report.add(method, str(spec), "single", t, mean_iou(result.model, tests[t], NUM_CLASSES))
            models.append(result.model)
        merged[method] = merge_models(models, rounding=rounding, seed=seed)
        report.add_per_target(f"{method}+{rounding}", str(spec), "merged", miou(merged[method]))
        report.write(out)

    with clock("export_validate_s"):
        session = _export_and_validate(report, merged["hdrq"], spec, targets, tests, out)
    report.extra["pictures"] = [str(_mask_picture(out / f"masks-{t}.png", t, tests[t], bench.adapted[t], session))
                                for t in targets]
    report.write(out)
    return report


def _export_and_validate(report: Report, merged, spec: BitSpec, targets, tests, out: Path):
    """Export and validate the merged model; its mIoU in onnxruntime per target. Returns the
    file's onnxruntime session (one for every later prediction: the mIoU rows and the pictures)."""
    import onnxruntime as ort

    from hdrq_plugin.export import ValidationError, export_qdq, validate

    weights = "int8" if spec.weight_bits == 8 else "int4-in-int8"
    path = out / f"merged-hdrq-{weights}.onnx"
    example = tests[targets[0]].tensors[0][:1]
    export_qdq(merged, path, example, weights=weights, overwrite=True,
               metadata={"method": "hdrq", "merged_targets": ",".join(targets), "task": "segmentation"})
    result = validate(path, merged, {t: DataLoader(tests[t], batch_size=64) for t in targets}, batch_sizes=(1,))
    report.extra["validation"] = {weights: result.to_dict()}
    label = f"hdrq+noise-sampling[{weights}]"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ort_miou = {}
    for t in targets:
        ort_miou[t] = _onnx_miou(session, tests[t])
        report.add(label, str(spec), "merged_ort", t, ort_miou[t], pixel_agreement=result.top1_agreement[t],
                   validation_ok=result.ok)
    report.add(label, str(spec), "merged_ort", HARMONIC_MEAN, harmonic_mean(list(ort_miou.values())),
               validation_ok=result.ok)
    report.write(out)
    if not result.ok:
        raise ValidationError(result.summary())
    return session


def _onnx_predictions(session, images: torch.Tensor) -> np.ndarray:
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: images[i:i + 64].numpy()})[0].argmax(1)
                           for i in range(0, len(images), 64)])


def _onnx_miou(session, data) -> float:
    from .segmentation_metrics import confusion_matrix, mean_iou_from_confusion

    images, masks = data.tensors
    predictions = torch.from_numpy(_onnx_predictions(session, images))
    return mean_iou_from_confusion(confusion_matrix(predictions, masks, NUM_CLASSES))


def _mask_picture(path: Path, target: str, data, float_model, session) -> Path:
    """One PNG: rows of test scenes, columns input / ground truth / float θt / merged INT (onnxruntime)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    images, masks = data.tensors[0][:PICTURE_SCENES], data.tensors[1][:PICTURE_SCENES]
    with torch.no_grad():
        float_masks = float_model.eval()(images).argmax(1)
    int_masks = _onnx_predictions(session, images)
    colours = plt.get_cmap("tab20", 20)
    figure, axes = plt.subplots(len(images), 4, figsize=(8, 2 * len(images)), squeeze=False)
    titles = ("input", "ground truth", "float θt", "merged INT (onnxruntime)")
    for row in range(len(images)):
        panels = (images[row].permute(1, 2, 0).numpy(), masks[row].numpy(), float_masks[row].numpy(), int_masks[row])
        for col, panel in enumerate(panels):
            axis = axes[row][col]
            if col == 0:
                axis.imshow(panel)
            else:
                axis.imshow(np.ma.masked_equal(panel, BACKGROUND), cmap=colours, vmin=0, vmax=19,
                            interpolation="nearest")
                axis.set_facecolor("black")
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(titles[col], fontsize=9)
    figure.suptitle(f"{target}: digit classes by colour, background black")
    figure.tight_layout()
    with atomic_write_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    plt.close(figure)
    return path


__all__ = ["run_segmentation_demo"]
