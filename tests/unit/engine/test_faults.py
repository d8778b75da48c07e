"""Fault-injection points (engine/faults.py): the spec, visit counting, and each action."""

import errno

import pytest

from pipeline.common import faults


@pytest.fixture(autouse=True)
def unarmed():
    yield
    faults.disarm()


def test_an_unarmed_point_does_nothing():
    faults.point("checkpoint.serialize")


def test_raise_fires_on_the_nth_visit_only():
    faults.arm("checkpoint.upload@2=raise:ENOSPC, checkpoint.fsync=raise:EIO")
    faults.point("checkpoint.upload")
    with pytest.raises(OSError) as err:
        faults.point("checkpoint.upload")
    assert err.value.errno == errno.ENOSPC and "injected at checkpoint.upload" in str(err.value)
    faults.point("checkpoint.upload")
    for _ in range(2):  # without @n: every visit
        with pytest.raises(OSError, match="injected at checkpoint.fsync"):
            faults.point("checkpoint.fsync")


@pytest.mark.parametrize(
    "spec", ["checkpoint.upload", "x=explode", "x=raise:ENOTANERRNO", "x=sleep:soon", "x@two=kill", "=kill"]
)
def test_a_malformed_spec_names_the_item(spec):
    with pytest.raises(ValueError, match="PIPELINE_FAULTS: cannot read"):
        faults.arm(spec)
