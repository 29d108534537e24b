"""Exit statuses are decided in one place (mae_scale.errors): every error a user can act on maps to
its status and prints one line; anything else is a crash (None) and prints nothing here."""

import pytest

from data_pipeline import DataInputError, LoaderWorkerDied, TooManyBadSamples
from mae_scale.checkpoint import CheckpointError, CheckpointSaveError
from mae_scale.config_load import ConfigError
from mae_scale.errors import RunInterrupted, RunStopped, UserError, exit_code, report
from mae_scale.runlock import RunDirBusy
from mae_scale.train.loop import NonFiniteLossError
from mae_scale.weights import WeightsError


@pytest.mark.parametrize("exc,code", [
    (UserError("x"), 2), (ConfigError("x"), 2), (WeightsError("x"), 2), (RunDirBusy("x"), 2), (DataInputError("x"), 2),
    (RunStopped("x"), 1), (CheckpointError("x"), 1), (CheckpointSaveError("x"), 1), (NonFiniteLossError("x"), 1),
    (TooManyBadSamples("x"), 1), (LoaderWorkerDied("x"), 1),
    (RunInterrupted("x", 15), 143), (RunInterrupted("x", 2), 130),
    (ValueError("x"), None), (KeyError("x"), None), (RuntimeError("x"), None),
])
def test_each_error_has_its_status(exc, code):
    assert exit_code(exc) == code


def test_report_prints_one_line_or_nothing(capsys):
    assert report(TooManyBadSamples("too many bad samples\n  by kind: truncated 3")) == 1
    assert capsys.readouterr().err == "error: too many bad samples\n"  # the pipeline's detail lines stay out
    assert report(RunInterrupted("stopped by SIGTERM", 15, announce=False)) == 143  # another rank says it
    assert report(ValueError("a bug")) is None  # a crash: reported with its traceback by the caller
    assert capsys.readouterr().err == ""
