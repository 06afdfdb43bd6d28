"""Progress in a log (issue 22): a line per stage, and never a quiet minute while work runs.
The heartbeat is driven by an injected clock: deterministic, no sleeping."""

from __future__ import annotations

import io

import pytest

from hdrq_plugin import progress
from hdrq_plugin.progress import ProgressLog, format_elapsed, progress_bar, progress_mode, stage, timed_stage


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_log(interval_s: float = 60.0):
    clock, stream = FakeClock(), io.StringIO()
    return ProgressLog(stream, clock, interval_s, heartbeat_thread=False), clock, stream


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_a_stage_writes_one_line_when_it_starts_and_one_when_it_ends():
    log, clock, stream = make_log()
    with log.stage("quantize hdrq"):
        clock.now += 75
    assert lines(stream) == ["[hdrq +0s] quantize hdrq: started", "[hdrq +1m15s] quantize hdrq: done in 1m15s"]


def test_a_failed_stage_says_so():
    log, clock, stream = make_log()
    with pytest.raises(RuntimeError), log.stage("export"):
        clock.now += 3
        raise RuntimeError("boom")
    assert lines(stream)[-1] == "[hdrq +3s] export: failed after 3s"


def test_the_heartbeat_names_what_runs_its_progress_and_the_elapsed_time():
    log, clock, stream = make_log(interval_s=60)
    with log.stage("quantize hdrq"):
        clock.now += 10
        bar = log.begin("hdrq reconstruction", total=6000, unit="it", announce=False)
        log.advance(bar, 1200)
        clock.now += 49
        assert not log.tick()  # 59 s quiet: not yet
        clock.now += 1
        assert log.tick()
        assert lines(stream)[-1] == ("[hdrq +1m00s] running: quantize hdrq (1m00s) > "
                                     "hdrq reconstruction 1200/6000 it (50s)")
        clock.now += 30
        assert not log.tick()  # the heartbeat restarted the quiet time
        log.end(bar, announce=False)


def longest_quiet_gap(log: ProgressLog, clock: FakeClock, seconds: int) -> float:
    """Run one stage for ``seconds`` (the clock ticking each second) → the longest time without a line."""
    last, gap = clock.now, 0.0
    with log.stage("nipq"):
        for _ in range(seconds):
            clock.now += 1
            if log.tick():
                gap, last = max(gap, clock.now - last), clock.now
    return max(gap, clock.now - last)


def test_a_long_stage_never_leaves_the_log_quiet_for_a_minute():
    log, clock, stream = make_log(interval_s=60)
    assert longest_quiet_gap(log, clock, 600) <= 60
    assert len(lines(stream)) == 2 + 10


def test_the_quiet_gap_check_catches_a_log_that_does_not_beat():
    log, clock, _ = make_log(interval_s=10_000)
    assert longest_quiet_gap(log, clock, 600) == 600


def test_the_default_heartbeat_is_under_a_minute():
    assert progress.HEARTBEAT_S < 60


def test_bars_become_heartbeat_progress_in_a_log(monkeypatch):
    log, clock, stream = make_log(interval_s=60)
    monkeypatch.setattr(progress, "PROGRESS", log)
    monkeypatch.setenv("HDRQ_PROGRESS", "log")
    with stage("merge"):
        bar = progress_bar(range(4), desc="error barrier", unit="point")
        for i, _ in enumerate(bar):
            if i == 2:
                bar.set_postfix_str("λ=0.5")
                clock.now += 60
                assert log.tick()
    assert "error barrier 2/4 point [λ=0.5] (1m00s)" in lines(stream)[1]
    assert lines(stream)[-1].endswith("merge: done in 1m00s")


def test_a_timed_stage_is_announced_by_its_label_and_adds_up_its_time(monkeypatch):
    log, _, stream = make_log()
    monkeypatch.setattr(progress, "PROGRESS", log)
    monkeypatch.setenv("HDRQ_PROGRESS", "log")
    timings = {"quantize_hdrq_s": 2.0}
    with timed_stage(timings, "quantize_hdrq_s", "mnist"):
        pass
    with pytest.raises(RuntimeError), timed_stage(timings, "export_s"):
        raise RuntimeError("refused")
    assert lines(stream)[0] == "[hdrq +0s] quantize hdrq (mnist): started"
    assert timings["quantize_hdrq_s"] >= 2.0 and "export_s" in timings  # a failed stage is timed too


def test_progress_mode_follows_the_terminal_and_the_environment(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv("HDRQ_PROGRESS", raising=False)
    assert progress_mode(Tty()) == "bars" and progress_mode(io.StringIO()) == "log"
    monkeypatch.setenv("HDRQ_PROGRESS", "off")
    assert progress_mode(Tty()) == "off"


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (59.9, "59s"), (60, "1m00s"), (3725, "1h02m05s")])
def test_elapsed_times_read_as_minutes_and_seconds(seconds, text):
    assert format_elapsed(seconds) == text


def test_a_failing_stage_leaves_stderr_to_the_one_line_error(monkeypatch, capsys):
    """The CLI's rule (one line on stderr per failure) holds with progress on: lines go to stdout."""
    monkeypatch.setenv("HDRQ_PROGRESS", "log")
    monkeypatch.setattr(progress, "PROGRESS", ProgressLog(heartbeat_thread=False))
    with pytest.raises(ValueError), stage("quantize a"):
        raise ValueError("bad calibration")
    out, err = capsys.readouterr()
    assert err == "" and "quantize a: failed after" in out


def test_a_loop_left_early_leaves_the_heartbeat(monkeypatch):
    log, clock, stream = make_log(interval_s=60)
    monkeypatch.setattr(progress, "PROGRESS", log)
    monkeypatch.setenv("HDRQ_PROGRESS", "log")
    for i in progress_bar(range(10), desc="search"):
        if i == 3:
            break
    clock.now += 600
    assert not log.tick() and stream.getvalue() == ""
