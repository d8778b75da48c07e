"""The kill soak (pipeline/ops/soak.py): 20+ SIGKILLs, each window of the checkpoint and start-up path hit at
least once, every resume with resume_run, and the run compared with one that never stopped."""

import pytest

from pipeline.ops.soak import WINDOWS, run_soak


@pytest.mark.soak
@pytest.mark.slow
def test_twenty_kills_leave_one_bit_identical_history_and_a_clean_store(tmp_path):
    report = run_soak(tmp_path, kills=20, seed=1, max_steps=120)
    assert report["kills"] >= 20
    assert set(report["windows_hit"]) == set(WINDOWS) and min(report["windows_hit"].values()) >= 1
    assert report["steps_compared"] == 120
    assert report["problems"] == []
