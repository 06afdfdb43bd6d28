"""A model file never runs code: a checkpoint may only name a registered builder (issue 20).

The crafted file is what issue 20 used: a ``weights_only``-valid checkpoint whose recipe names
``os:system`` with a shell command. Every load path gets it; the marker must never appear.
"""

import pytest
import torch
from tiny_models import tiny_resnet

from hdrq_plugin.architectures import UnknownArchitectureError, build_architecture, register_architecture
from hdrq_plugin.cli import EXIT_BAD_INPUT, load_any_model, main
from hdrq_plugin.errors import InputError
from hdrq_plugin.run.checkpoint import (
    FLOAT_FORMAT,
    FORMAT,
    CheckpointError,
    ModelRecipe,
    load_float_model,
    load_quantized,
    save_float_model,
    save_quantized,
)
from hdrq_plugin.run.pipeline import finished_checkpoint

RECIPE = ModelRecipe("tiny_models:tiny_resnet", {"width": 8, "seed": 0})


def crafted(path, marker, fmt):
    """A checkpoint whose recipe asks to run ``touch marker`` through os.system."""
    payload = {"format": fmt, "recipe": {"builder": "os:system", "kwargs": {"command": f"touch {marker}"}},
               "state_dict": {}, "metadata": {}}
    if fmt == FORMAT:
        payload.update(bits="w4a4", family="rtn")
    torch.save(payload, path)
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    marker = folder / "marker"
    save_float_model(folder / "float.pt", RECIPE.build(), RECIPE)
    torch.save({"inputs": torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(0))}, folder / "calib.pt")
    inputs = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    torch.save({"inputs": inputs, "labels": torch.arange(8) % 10}, folder / "test.pt")
    assert 0 == main(["quantize", str(folder / "float.pt"), "--calibration", str(folder / "calib.pt"), "--method", "rtn",
          "--bits", "w4a8", "--out", str(folder / "q.pt")])
    return {"dir": folder, "marker": marker, "float": str(folder / "float.pt"), "q": str(folder / "q.pt"),
            "calib": str(folder / "calib.pt"), "test": str(folder / "test.pt"),
            "evil_float": crafted(folder / "evil_float.pt", marker, FLOAT_FORMAT),
            "evil_q": crafted(folder / "evil_q.pt", marker, FORMAT)}


def _refused(capsys, code, marker):
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT, err
    assert len(err.strip().splitlines()) == 1 and "'os:system'" in err and "--arch" in err, err
    assert not marker.exists()


CLI_PATHS = {
    "quantize MODEL": lambda f, out: ["quantize", f["evil_float"], "--calibration", f["calib"], "--out", out],
    "quantize --source": lambda f, out: ["quantize", f["float"], "--calibration", f["calib"], "--source",
                                         f["evil_float"], "--method", "hdrq", "--iterations", "1", "--out", out],
    "merge": lambda f, out: ["merge", f["q"], f["evil_q"], "--out", out],
    "export": lambda f, out: ["export", f["evil_q"], "--out", out + ".onnx", "--input-shape", "1,3,16,16"],
    "export (float file)": lambda f, out: ["export", f["evil_float"], "--out", out + ".onnx",
                                           "--input-shape", "1,3,16,16"],
    "validate --model": lambda f, out: ["validate", f["dir"] / "none.onnx", "--model", f["evil_q"], "--data",
                                        f["test"]],
    "barrier": lambda f, out: ["barrier", f["q"], f["evil_q"], "--data", f["test"], "--out", out + ".png"],
    "quantize-targets MODEL": lambda f, out: ["quantize-targets", "--target", "a", f["evil_float"], f["calib"],
                                              "--target", "b", f["float"], f["calib"], "--out", out],
    "quantize-targets --source": lambda f, out: ["quantize-targets", "--source", f["evil_float"], "--target", "a",
                                                 f["float"], f["calib"], "--target", "b", f["float"], f["calib"],
                                                 "--out", out],
}


@pytest.mark.parametrize("path", list(CLI_PATHS))
def test_a_crafted_recipe_is_refused_on_every_cli_load_path(files, path, capsys, tmp_path):
    argv = [str(a) for a in CLI_PATHS[path](files, str(tmp_path / "out"))]
    if path == "validate --model":  # validate checks the ONNX file first: give it a real one
        assert main(["export", files["q"], "--out", str(tmp_path / "q.onnx"), "--input-shape", "1,3,16,16"]) == 0
        argv[1] = str(tmp_path / "q.onnx")
        capsys.readouterr()
    _refused(capsys, main(argv), files["marker"])


@pytest.mark.parametrize("loader", [load_quantized, load_float_model, load_any_model])
def test_a_crafted_recipe_is_refused_by_the_api_loaders(files, loader):
    for key in ("evil_q", "evil_float"):
        with pytest.raises((UnknownArchitectureError, CheckpointError)):
            loader(files[key])
    assert not files["marker"].exists()


def test_a_crafted_file_dropped_among_finished_targets_is_never_built(files):
    dropped = files["dir"] / "dropped.pt"
    crafted(dropped, files["marker"], FORMAT)
    assert finished_checkpoint(dropped, "any-key") is None
    assert not files["marker"].exists()


def test_quantize_targets_requantizes_over_a_crafted_file_in_its_folder(files, tmp_path, capsys):
    out = tmp_path / "pipe"
    (out / "quantized").mkdir(parents=True)
    crafted(out / "quantized" / "a.pt", files["marker"], FORMAT)
    code = main(["quantize-targets", "--target", "a", files["float"], files["calib"], "--target", "b", files["float"],
                 files["calib"], "--test", "a", files["test"], "--method", "rtn", "--trials", "2", "--out", str(out)])
    assert code in (0, 3), capsys.readouterr().err
    assert not files["marker"].exists()
    assert load_quantized(out / "quantized" / "a.pt")[1]["recipe"] == RECIPE


def test_the_refusal_names_the_builder_and_how_to_allow_it():
    with pytest.raises(UnknownArchitectureError, match=r"'os:system'.*--arch os:system.*register_architecture"):
        build_architecture("os:system", {"command": "true"})


@pytest.mark.parametrize("kwargs, message", [
    ({"depth": 3}, "no parameter 'depth'"),
    ({"width": torch.tensor(8)}, "holds a Tensor"),
    ({"width": {1: 2}}, "non-string key"),
    ("width=8", "must be a dict"),
])
def test_keyword_arguments_from_a_file_are_checked(kwargs, message):
    with pytest.raises(InputError, match=message):
        build_architecture("tiny_models:tiny_resnet", kwargs)


def test_a_registered_builder_with_plain_arguments_builds():
    model = build_architecture("tiny_models:tiny_resnet", {"width": 4, "seed": 1})
    assert sum(p.numel() for p in model.parameters()) > 0


def test_a_builder_registered_under_a_name_is_found_by_that_name():
    register_architecture(tiny_resnet, "my_models:small")
    assert isinstance(build_architecture("my_models:small", {"width": 4}), torch.nn.Module)


def test_saving_a_model_with_an_unregistered_builder_is_refused_before_writing(tmp_path):
    with pytest.raises(UnknownArchitectureError):
        save_float_model(tmp_path / "m.pt", tiny_resnet(), ModelRecipe("nowhere.models:build"))
    assert not (tmp_path / "m.pt").exists()


def test_a_plain_state_dict_needs_and_takes_arch(tmp_path, capsys):
    path = tmp_path / "weights.pt"
    torch.save(tiny_resnet(width=8, seed=3).state_dict(), path)
    with pytest.raises(CheckpointError, match="plain state_dict.*--arch"):
        load_float_model(path)
    model, info = load_float_model(path, "tiny_models:tiny_resnet")
    assert info["recipe"] == ModelRecipe("tiny_models:tiny_resnet")
    assert torch.equal(model.state_dict()["fc.weight"], tiny_resnet(width=8, seed=3).state_dict()["fc.weight"])


def test_a_pickled_module_is_one_line_that_says_what_to_save(tmp_path, capsys):
    path = tmp_path / "whole.pt"
    torch.save(tiny_resnet(), path)
    code = main(["export", str(path), "--out", str(tmp_path / "x.onnx"), "--input-shape", "1,3,16,16"])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT and len(err.strip().splitlines()) == 1
    assert "pickled Python objects" in err and "state_dict()" in err


def test_a_quantized_checkpoint_with_a_nan_weight_names_the_tensor(tmp_path, files):
    model, info = load_quantized(files["q"])
    state = model.state_dict()
    key = next(k for k, v in state.items() if k.endswith("weight") and v.is_floating_point())
    with torch.no_grad():
        dict(model.named_parameters())[key].view(-1)[0] = float("nan")
    save_quantized(tmp_path / "nan.pt", model, recipe=info["recipe"], bits=info["bits"], family=info["family"])
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.") + " holds NaN"):
        load_quantized(tmp_path / "nan.pt")
