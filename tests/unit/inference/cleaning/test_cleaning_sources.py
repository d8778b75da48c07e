"""What clean_corpus reads and where it writes, without Ray: every input form, ids, output names, shards."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from pipeline.common.files import UnsafePath, contained
from pipeline.config import ConfigError
from pipeline.engine.cli import EXIT_OK
from pipeline.inference.cleaning.dataflow import RETRYABLE, STORAGE_FULL, decode, read_failure, write_failure
from pipeline.inference.cleaning.sources import check_output, is_transient, list_units
from pipeline.prepare_data import run_prepare

RATE = 16000


def tone(seconds: float = 0.5, rate: int = RATE) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "crawl"
    (root / "sub").mkdir(parents=True)
    sf.write(root / "a.wav", tone(), RATE)
    sf.write(root / "a.flac", tone(), RATE)  # same stem: its output keeps its suffix
    sf.write(root / "sub" / "b.flac", tone(rate=22050), 22050)
    (root / "notes.txt").write_text("not audio")
    return root


def test_a_directory_tree_gives_relative_ids_and_distinct_output_names(tree):
    units = list_units(str(tree), ".wav")
    assert [(u.kind, u.id, u.output) for u in units] == [
        ("file", "a.flac", "a.wav"),
        ("file", "a.wav", "a.wav.wav"),
        ("file", "sub/b.flac", "sub/b.wav"),
    ]
    assert [u.output for u in list_units(str(tree), ".flac")] == ["a.flac", "a.wav.flac", "sub/b.flac"]


def test_a_glob_and_manifests_with_and_without_ids(tree, tmp_path):
    assert [u.id for u in list_units(f"{tree}/**/*.flac", ".wav")] == ["a.flac", "sub/b.flac"]
    csv = tmp_path / "list.csv"
    pd.DataFrame({"path": ["crawl/a.wav", str(tree / "sub" / "b.flac")], "id": ["one", "two"]}).to_csv(csv, index=False)
    assert [(u.id, u.source) for u in list_units(str(csv), ".wav")] == [
        ("one", str(tree / "a.wav")),
        ("two", str(tree / "sub" / "b.flac")),
    ]
    parquet = tmp_path / "list.parquet"
    pd.DataFrame({"path": [str(tree / "a.wav"), str(tree / "sub" / "b.flac")]}).to_parquet(parquet)
    assert [u.id for u in list_units(str(parquet), ".wav")] == [
        "a.wav",
        "sub/b.flac",
    ]  # relative to their common folder

    pd.DataFrame({"path": ["x.wav", "y.wav"], "id": ["same", "same"]}).to_csv(csv, index=False)
    with pytest.raises(ConfigError, match="duplicates"):
        list_units(str(csv), ".wav")
    pd.DataFrame({"file": ["x.wav"]}).to_csv(csv, index=False)
    with pytest.raises(ConfigError, match="no 'path' column"):
        list_units(str(csv), ".wav")
    with pytest.raises(ConfigError, match="holds no audio"):
        list_units(f"{tree}/*.mp3", ".wav")
    with pytest.raises(ConfigError, match="not found"):
        list_units(str(tmp_path / "nowhere"), ".wav")


def test_outputs_inside_the_input_or_onto_a_file_are_refused(tree):
    with pytest.raises(ConfigError, match="inside input"):
        check_output(str(tree), str(tree / "sub" / "clean"))
    with pytest.raises(ConfigError, match="inside input"):
        check_output(f"{tree}/**/*.wav", str(tree / "clean"))
    with pytest.raises(ConfigError, match="is a file"):
        check_output(str(tree), str(tree / "a.wav"))
    with pytest.raises(ConfigError, match="inside input"):
        check_output("s3://bucket/crawl/", "s3://bucket/crawl/clean/")
    check_output(str(tree), str(tree.parent / "clean"))  # beside it: fine
    check_output("s3://bucket/crawl/", "s3://bucket/crawl-clean/")


def test_decode_resamples_every_channel_and_names_an_unreadable_file(tree):
    unit = list_units(str(tree), ".wav")[2]  # sub/b.flac, 22.05 kHz
    [row] = decode(unit.__dict__, RATE, ".wav")
    assert (row["status"], row["input_rate"], row["input_channels"]) == ("", 22050, 1)
    assert row["samples"] == pytest.approx(RATE * 0.5, abs=2) and len(row["audio"]) == 4 * row["samples"]
    (tree / "sub" / "b.flac").write_bytes(b"fLaC but broken")
    [row] = decode(unit.__dict__, RATE, ".wav")
    assert row["status"].startswith("skipped: unreadable: cannot read audio file") and "BytesIO" not in row["status"]


def test_shards_are_read_whole_and_give_every_sample_an_id(store):
    assert (
        run_prepare([f"output={store}/shards", "variants=1", "shard_size=6", "data.val_size=4", "examples=0"])
        == EXIT_OK
    )
    units = list_units(str(store / "shards"), ".wav")
    assert {u.kind for u in units} == {"shard"} and sum(u.samples for u in units) >= 6
    first = units[0]
    rows = decode({**first.__dict__, "skip": []}, RATE, ".wav")
    assert len(rows) == first.samples and all(r["status"] == "" for r in rows)
    stem = first.id.removesuffix(".tar")
    assert all(r["id"].startswith(stem + "/") and r["output"] == r["id"] + ".wav" for r in rows)
    assert all(r["source"].endswith(".noisy.wav") and "#" in r["source"] for r in rows)
    skipped = decode({**first.__dict__, "skip": [rows[0]["id"]]}, RATE, ".wav")
    assert [r["id"] for r in skipped] == [r["id"] for r in rows[1:]]  # a resumed job skips what is done

    path = store / "shards" / first.id
    path.write_bytes(path.read_bytes()[:-100] + b"x" * 100)
    [failed] = decode({**first.__dict__, "skip": []}, RATE, ".wav")
    assert failed["status"].startswith("failed:") and first.id in failed["status"]


def test_manifest_ids_or_paths_that_lead_outside_the_output_are_refused_naming_the_rows(tree, tmp_path):
    """Defect 1 of docs/reliability.md's cleaning rows: a crawl's manifest is third-party data."""
    csv = tmp_path / "crawl.csv"
    pd.DataFrame(
        {"path": ["crawl/a.wav", "crawl/a.flac", "crawl/sub/b.flac"], "id": ["fine", "../../escaped", "/srv/other/x"]}
    ).to_csv(csv, index=False)
    with pytest.raises(ConfigError) as refused:
        list_units(str(csv), ".wav")
    message = str(refused.value)
    assert "2 input(s) would be written outside the output" in message
    assert "row 2" in message and "escaped" in message and "row 3" in message and "/srv/other/x" in message
    # without an id column, a path that climbs gets an id relative to the real common folder, inside the output
    (tmp_path / "up").mkdir()
    sf.write(tmp_path / "up" / "b.wav", tone(), RATE)
    nested = tree / "sub" / "list.csv"
    pd.DataFrame({"path": ["../a.wav", "../../up/b.wav"]}).to_csv(nested, index=False)
    units = list_units(str(nested), ".wav")
    assert [(u.id, u.output) for u in units] == [("crawl/a.wav", "crawl/a.wav"), ("up/b.wav", "up/b.wav")]
    assert units[1].source == str(tmp_path / "up" / "b.wav")


def test_contained_refuses_names_and_symlinks_that_lead_outside(tmp_path):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (out / "link").symlink_to(tmp_path / "elsewhere")
    assert contained(str(out), "sub/./a.wav") == str(out / "sub" / "a.wav")
    assert contained(str(out), "new/dir/a.wav") == str(out / "new" / "dir" / "a.wav")  # not there yet: fine
    assert contained("s3://bucket/clean/", "a/../b.wav") == "s3://bucket/clean/b.wav"
    for bad in ("../x.wav", "a/../../x.wav", "/etc/x.wav", "", "a\x00.wav", "link/x.wav"):
        with pytest.raises(UnsafePath):
            contained(str(out), bad)
    with pytest.raises(UnsafePath):
        contained("s3://bucket/clean", "../other/x.wav")


def test_a_glob_never_follows_a_directory_symlink_into_a_loop(tmp_path):
    """Defect 3: `**` followed `loop0 -> .` without limit (41 units from one file; endless with two loops)."""
    root = tmp_path / "crawl"
    (root / "sub").mkdir(parents=True)
    sf.write(root / "a.wav", tone(), RATE)
    sf.write(root / "sub" / "b.wav", tone(), RATE)
    sf.write(root / "sub" / ".hidden.wav", tone(), RATE)
    (root / "loop0").symlink_to(root)
    (root / "loop1").symlink_to(root)
    (root / "sub" / "up").symlink_to(root)
    (root / "c.wav").symlink_to(root / "a.wav")  # a symlink to a file is an input
    for pattern in (f"{root}/**/*.wav", f"{root}/**"):
        assert [u.id for u in list_units(pattern, ".wav")] == ["a.wav", "c.wav", "sub/b.wav"], pattern
    assert [u.id for u in list_units(f"{root}/*/*.wav", ".wav")] == ["sub/b.wav"]
    assert [u.id for u in list_units(f"{root}/[ab].wav", ".wav")] == ["a.wav"]
    assert [u.id for u in list_units(str(root), ".wav")] == ["a.wav", "c.wav", "sub/.hidden.wav", "sub/b.wav"]


def test_failures_are_classed_final_or_retryable(tmp_path):
    """Defect 4: a passing failure is `failed (retryable): …`, which a resume redoes; a missing input is final."""
    import errno

    from botocore.exceptions import ClientError, EndpointConnectionError

    def s3_error(code: str) -> ClientError:
        return ClientError({"Error": {"Code": code, "Message": code}}, "GetObject")

    assert not is_transient(FileNotFoundError(errno.ENOENT, "gone")) and not is_transient(s3_error("NoSuchKey"))
    assert not is_transient(PermissionError(errno.EACCES, "no")) and not is_transient(s3_error("AccessDenied"))
    assert is_transient(OSError(errno.EIO, "disk")) and is_transient(s3_error("SlowDown"))
    assert is_transient(s3_error("InternalError")) and is_transient(EndpointConnectionError(endpoint_url="http://x"))
    assert read_failure(FileNotFoundError(errno.ENOENT, "gone")).startswith("skipped: missing: ")
    assert read_failure(OSError(errno.ESTALE, "stale NFS handle")).startswith(RETRYABLE + "cannot read: ")
    assert write_failure("x.wav", OSError(errno.ENOSPC, "No space left on device")).startswith(STORAGE_FULL)
    assert write_failure("x.wav", OSError(errno.EACCES, "denied")).startswith(RETRYABLE + "cannot write x.wav")
    # a local input that disappears between listing and reading is final; its row says so
    unit = {"kind": "file", "source": str(tmp_path / "gone.wav"), "id": "gone.wav", "output": "gone.wav"}
    assert decode(unit, RATE, ".wav")[0]["status"].startswith("skipped: missing: ")
