"""The kill soak of clean_corpus (pipeline/ops/soak_clean.py): the driver, or its whole process family, SIGKILLed
at moments drawn from the seed, every resume with resume_run, and the outputs compared with a job that never
stopped."""

import json
import logging

import pytest

from pipeline.ops.soak_clean import run_clean_soak

log = logging.getLogger(__name__)


@pytest.mark.soak
@pytest.mark.slow
def test_four_kills_of_clean_corpus_leave_every_input_once_and_equal_audio(chain, tmp_path):
    report = run_clean_soak(
        tmp_path,
        kills=4,
        seed=1,
        chain_run=chain["finetune"],
        tracking_uri=f"sqlite:///{chain['dir']}/mlflow.db",
        files=20,
    )
    log.info("clean_corpus soak report: %s", json.dumps(report))
    assert report["kills"] == 4 and report["launches"] == 5 and report["resumes"] == 4
    assert report["inputs_compared"] == 20
    assert report["problems"] == []
