"""The NIPQ equal-budget tables: runs are united only when comparable, paired differences and seeds
won are computed per target, averaged over targets and for merged models, bad files get one line."""

from __future__ import annotations

import json

import pytest

from benchmarks.nipq import tables
from hdrq_plugin.errors import InputError

SETTINGS = {"epochs": 4, "hard_epochs": 1, "noise": "uniform", "bits_lr": None, "quant_lr": None,
            "cost_weight": None, "hdrq_iterations": 200, "land_start": None, "no_landing": False,
            "no_fit_truncations": False, "family": "resnet", "bits": 3}


def _row(method, target, seed, accuracy, stage="single", **more):
    return {"method": method, "target": target, "seed": seed, "stage": stage, "accuracy": accuracy,
            "learned_weight_bits": 3.0, "learned_act_bits": 3.0, "gbops": 0.4, **more}


def _payload(rows, **settings):
    return {"settings": {**SETTINGS, **settings}, "rows": rows}


def test_paired_differences_count_the_seeds_won_per_target_and_on_average():
    rows = [_row("nipq", "a", 0, 0.90), _row("lsq", "a", 0, 0.80), _row("nipq", "b", 0, 0.70),
            _row("lsq", "b", 0, 0.75), _row("nipq", "a", 1, 0.85), _row("lsq", "a", 1, 0.86),
            _row("nipq", "b", 1, 0.80), _row("lsq", "b", 1, 0.70)]
    report = tables.markdown_report(tables.unite([_payload(rows)]))
    # a: +10, −1 → +4.50 ± 7.78 (1/2); b: −5, +10 → +2.50 ± 10.61 (1/2); mean: +2.5, +4.5 → +3.50 ± 1.41 (2/2)
    assert "| nipq − lsq | +4.50 ± 7.78 (1/2) | +2.50 ± 10.61 (1/2) | +3.50 ± 1.41 (2/2) |" in report
    assert "| nipq | 3.000 / 3.000 | 0.4000 | 87.50 ± 3.54 | 75.00 ± 7.07 | 81.25 ± 1.77 |" in report


def test_merged_rows_get_their_own_tables_and_the_freeze_is_listed_per_run():
    rows = [_row("nipq", "a", 0, 0.9, accuracy_before_freeze=0.5, accuracy_after_freeze=0.4,
                 freeze_move={"weights": -0.02, "activations": 0.0}),
            _row("lsq", "a", 0, 0.8), _row("nipq", "a", 0, 0.6, stage="merged"), _row("lsq", "a", 0, 0.7, stage="merged")]
    report = tables.markdown_report(tables.unite([_payload(rows)]))
    assert "**merged, paired differences**" in report
    partial = tables.markdown_report(tables.unite([_payload(rows + [_row("lsq", "a", 1, 0.8)])]))
    assert "| nipq (seeds 0) |" in partial and "| lsq | " in partial  # a method missing a seed says so
    assert "| nipq − lsq | -10.00 (0/1) | -10.00 (0/1) |" in report
    assert "| nipq | a | 0 | 50.00 → 40.00 (-10.00) | -0.020 / +0.000 | 90.00 |" in report
    assert "on the budget" not in report  # no landed rows, no such table


def test_landed_merges_stand_beside_the_uniform_merges_on_the_budget():
    rows = [_row("nipq", "a", 0, 0.6, stage="merged", learned_weight_bits=4.5),
            _row("nipq", "a", 0, 0.65, stage="merged-landed"), _row("lsq", "a", 0, 0.7, stage="merged")]
    report = tables.markdown_report(tables.unite([_payload(rows)]))
    on_budget = report[report.index("**merged models, on the budget"):]
    assert "| nipq | 3.000 / 3.000 | 0.4000 | 65.00 | 65.00 |" in on_budget
    assert "| lsq | 3.000 / 3.000 | 0.4000 | 70.00 | 70.00 |" in on_budget
    assert "| nipq − lsq | -5.00 (0/1) | -5.00 (0/1) |" in on_budget


def test_runs_of_other_settings_or_conflicting_rows_are_refused():
    first = _payload([_row("nipq", "a", 0, 0.9)])
    with pytest.raises(InputError, match="settings"):
        tables.unite([first, _payload([_row("lsq", "a", 0, 0.8)], epochs=10)])
    with pytest.raises(InputError, match="differs"):
        tables.unite([first, _payload([_row("nipq", "a", 0, 0.91)])])
    # the same row twice, and other families and budgets side by side, are fine
    united = tables.unite([first, first, _payload([_row("nipq", "a", 0, 0.5)], bits=4),
                           _payload([_row("nipq", "a", 0, 0.4)], family="inverted-residual")])
    assert len(united["rows"]) == 3


def test_bad_files_get_one_line_and_exit_2(tmp_path, capsys):
    good = tmp_path / "good.json"
    good.write_text(json.dumps(_payload([_row("nipq", "a", 0, 0.9)])))
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"rows": [')
    for argv in ([str(corrupt)], [str(good), "--out", str(good)], [str(tmp_path / "missing.json")],
                 [str(good), "--out", str(good / "under-a-file.json")]):
        with pytest.raises(SystemExit) as exit_:
            tables.main(argv)
        assert exit_.value.code == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
    out = tmp_path / "united.json"
    assert tables.main([str(good), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["rows"][0]["accuracy"] == 0.9


@pytest.mark.parametrize("argv", [["--targets", "svhn"], ["--epochs", "0"], ["--land-start", "0.9"],
                                  ["--output", "/proc/no-such-folder/x.json"]])
def test_equal_budget_refuses_bad_flags_in_one_line_before_loading_the_zoo(argv, capsys):
    from benchmarks.nipq import equal_budget

    if "--output" not in argv:
        argv = [*argv, "--output", "unused.json"]
    with pytest.raises(SystemExit) as exit_:
        equal_budget.main(argv)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("python -m benchmarks.nipq.equal_budget: error:")
