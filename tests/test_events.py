"""Timings and fault-injection hooks through one mechanism (paradit.events): a phase is timed and is
the hook of its name, in a request and at start-up alike; a hook names a rank and a point."""
from __future__ import annotations

import pytest

from paradit import events
from paradit.events import InjectedFailure, hook, phase


def test_a_phase_is_timed_into_its_dict_also_when_it_raises():
    timings = {}
    with phase("weights", timings) as span:
        pass
    assert timings == {"weights_s": span.seconds} and span.seconds >= 0
    with pytest.raises(KeyError):
        with phase("config", timings):
            raise KeyError("boom")
    assert "config_s" in timings
    assert events.timed("vae", timings, divmod, 7, 2) == (3, 1) and "vae_s" in timings


def test_a_hook_names_a_rank_and_a_point(monkeypatch):
    slept = []
    monkeypatch.setattr(events.time, "sleep", slept.append)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("PARADIT_FAIL_AT", "0:step3,1:step4")
    monkeypatch.setenv("PARADIT_DELAY_AT", "0:step2:9,1:step2:0.5")
    hook("step3")                       # rank 0's point: not this rank
    hook("step2")
    assert slept == [0.5]               # this rank's delay only
    with pytest.raises(InjectedFailure, match="injected failure at step4"):
        hook("step4")
    monkeypatch.delenv("RANK")          # no launcher: rank 0
    with pytest.raises(InjectedFailure, match="step3"):
        hook("step3")


@pytest.mark.parametrize("variable,value,message", [
    ("PARADIT_FAIL_AT", "garbage", r"^PARADIT_FAIL_AT='garbage': entry 'garbage' is not RANK:NAME"),   # was ignored
    ("PARADIT_FAIL_AT", "0:step3:5", r"entry '0:step3:5' is not RANK:NAME"),
    ("PARADIT_DELAY_AT", "0:step0:abc", r"^PARADIT_DELAY_AT='0:step0:abc': entry '0:step0:abc' is not "
                                        r"RANK:NAME:SECONDS"),           # was "could not convert string to float"
    ("PARADIT_DELAY_AT", "0:step0", r"entry '0:step0' is not RANK:NAME:SECONDS"),   # was "not enough values to unpack"
    ("PARADIT_DELAY_AT", "x:step0:1", r"entry 'x:step0:1' is not RANK:NAME:SECONDS"),
])
def test_a_malformed_hook_variable_is_named(monkeypatch, variable, value, message):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValueError, match=message):
        hook("step0")


def test_a_request_phase_is_a_hook(monkeypatch):
    from paradit.engine.request import RunRecord
    record = RunRecord()
    with record.phase("text_encoder"):
        pass
    assert record.timings["text_encoder_s"] >= 0
    monkeypatch.setenv("PARADIT_FAIL_AT", "0:vae_decode")
    with pytest.raises(InjectedFailure, match="vae_decode"):
        with record.phase("vae_decode"):
            pytest.fail("the phase ran past its hook")


def test_a_start_up_phase_is_timed_and_is_a_hook(monkeypatch):
    from paradit.pipeline import Pipeline
    monkeypatch.delenv("RANK", raising=False)
    pipe = Pipeline.from_pretrained("tiny")
    assert pipe.startup["offload_s"] >= 0
    assert pipe.warmup(width=64, height=64, frames=5, steps=2) == pipe.startup["compile_s"] >= 0
    monkeypatch.setenv("PARADIT_FAIL_AT", "0:offload")
    with pytest.raises(InjectedFailure, match="offload"):
        Pipeline.from_pretrained("tiny")
