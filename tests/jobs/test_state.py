"""Batch job state files: round trip, atomic writes, listing, and how a job is named."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from minima_llm.jobs import JobState
from minima_llm.jobs.state import FORMAT, digest_of, list_states, load, path_for

CHAT = "/v1/chat/completions"


def state_in(directory: Path, prefix: str = "p", keys: tuple[str, ...] = ("a", "b")) -> JobState:
    digest = digest_of(CHAT, "m", keys)
    return JobState(
        prefix,
        digest,
        CHAT,
        "http://127.0.0.1:1/v1",
        "m",
        len(keys),
        path=path_for(directory, prefix, digest),
    )


def test_save_then_load_gives_the_same_state(tmp_path: Path) -> None:
    state = state_in(tmp_path)
    state.update(
        {
            "id": "batch_1",
            "status": "in_progress",
            "input_file_id": "file-in",
            "request_counts": {"total": 2, "completed": 1, "failed": 0},
        }
    )
    state.save()

    loaded = load(state.path)  # type: ignore[arg-type]

    assert loaded == state
    assert loaded.path == state.path
    assert (loaded.batch_id, loaded.status, loaded.request_counts["completed"]) == (
        "batch_1",
        "in_progress",
        1,
    )
    assert json.loads(state.path.read_text())["format"] == FORMAT  # type: ignore[union-attr]


def test_save_leaves_no_temporary_files(tmp_path: Path) -> None:
    state = state_in(tmp_path)
    for status in ("uploaded", "validating", "in_progress", "completed"):
        state.update({"status": status})
        state.save()

    assert [p.name for p in tmp_path.iterdir()] == [state.path.name]  # type: ignore[union-attr]
    assert load(state.path).status == "completed"  # type: ignore[arg-type]


def test_a_save_that_fails_midway_keeps_the_old_file_whole(tmp_path: Path) -> None:
    state = state_in(tmp_path)
    state.update({"id": "batch_1", "status": "in_progress"})
    state.save()
    before = state.path.read_bytes()  # type: ignore[union-attr]

    state.status = "completed"
    state.request_counts = {"completed": object()}  # type: ignore[dict-item]  # not JSON
    with pytest.raises(TypeError):
        state.save()

    assert state.path.read_bytes() == before  # type: ignore[union-attr]
    assert [p.name for p in tmp_path.iterdir()] == [state.path.name]  # type: ignore[union-attr]


def test_save_without_a_path_is_an_error() -> None:
    state = JobState("p", "0" * 64, CHAT, "http://x/v1", "m", 1)
    with pytest.raises(ValueError, match="path"):
        state.save()


def test_list_states_skips_unreadable_and_foreign_files_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = state_in(tmp_path)
    good.save()
    (tmp_path / "corrupt-0000000000000000.batch.json").write_text("{not json")
    (tmp_path / "foreign-0000000000000000.batch.json").write_text(json.dumps({"jobs": []}))
    (tmp_path / "list-0000000000000000.batch.json").write_text("[1, 2]")
    (tmp_path / "future-0000000000000000.batch.json").write_text(json.dumps({"format": 99}))
    (tmp_path / "partial-0000000000000000.batch.json").write_text(
        json.dumps({"format": FORMAT, "prefix": "p"})
    )
    (tmp_path / "other.json").write_text("{not json")  # not a state file name: not read

    with caplog.at_level(logging.WARNING, logger="minima_llm.jobs"):
        states = list_states(tmp_path)

    assert states == [good]
    warned = " ".join(r.getMessage() for r in caplog.records)
    for name in ("corrupt", "foreign", "list", "future", "partial"):
        assert f"{name}-0000000000000000.batch.json" in warned
    assert "other.json" not in warned


def test_list_states_of_a_missing_dir_is_empty(tmp_path: Path) -> None:
    assert list_states(tmp_path / "nowhere") == []


def test_list_states_is_oldest_first(tmp_path: Path) -> None:
    for created, prefix in ((30.0, "a"), (10.0, "z"), (20.0, "m")):
        state = state_in(tmp_path, prefix)
        state.created_at = created
        state.save()

    assert [s.prefix for s in list_states(tmp_path)] == ["z", "m", "a"]


def test_list_states_of_a_prefix_reads_only_that_prefixs_files(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mine = state_in(tmp_path, "run")
    mine.save()
    longer = state_in(tmp_path, "run-b")  # its file name starts with "run-" too
    longer.save()
    (tmp_path / "other-0000000000000000.batch.json").write_text("{not json")

    with caplog.at_level(logging.WARNING, logger="minima_llm.jobs"):
        assert list_states(tmp_path, "run") == [mine]
        assert list_states(tmp_path, "run-b") == [longer]
    assert not caplog.records  # the other prefix's broken file was never opened
    # Two prefixes with one file-name form ("run b" -> "run_b") both come back: the
    # caller tells them apart by the prefix inside.
    spaced = state_in(tmp_path, "run b", keys=("c",))
    spaced.save()
    state_in(tmp_path, "run_b", keys=("d",)).save()
    assert {s.prefix for s in list_states(tmp_path, "run b")} == {"run b", "run_b"}


def test_list_states_of_a_prefix_finds_a_job_that_repeats_an_earlier_ones_requests(
    tmp_path: Path,
) -> None:
    # The second job for one set of requests (a rerun resending what a dead job left
    # unanswered) gets a -<time_ns> tail: take-over and cancel-by-prefix must see it.
    first = state_in(tmp_path, "run")
    first.save()
    again = state_in(tmp_path, "run")
    tail = "-1764612345678901234.batch.json"
    again.path = again.path.with_name(again.path.name.replace(".batch.json", tail))
    again.created_at = first.created_at + 1
    again.save()
    assert [s.path for s in list_states(tmp_path, "run")] == [first.path, again.path]
    assert list_states(tmp_path, "ru") == []


def test_digest_ignores_order_and_repeats_of_keys() -> None:
    assert digest_of(CHAT, "m", ["a", "b", "c"]) == digest_of(CHAT, "m", ["c", "a", "b", "a"])
    assert digest_of(CHAT, "m", ["a", "b"]) != digest_of(CHAT, "m", ["a", "b", "c"])


@pytest.mark.parametrize(
    ("endpoint", "model"),
    [("/v1/completions", "m"), (CHAT, "other-model")],
)
def test_digest_depends_on_endpoint_and_model(endpoint: str, model: str) -> None:
    assert digest_of(endpoint, model, ["a", "b"]) != digest_of(CHAT, "m", ["a", "b"])


@pytest.mark.parametrize(
    ("prefix", "stem"),
    [
        ("run-1.v2_x", "run-1.v2_x"),
        ("my run/2024:x", "my_run_2024_x"),
        ("../../etc/passwd", ".._.._etc_passwd"),
        ("ünï", "_n_"),
    ],
)
def test_path_for_sanitises_the_prefix_and_stays_in_the_dir(
    tmp_path: Path, prefix: str, stem: str
) -> None:
    digest = digest_of(CHAT, "m", ["a"])

    path = path_for(tmp_path, prefix, digest)

    assert path.parent == tmp_path
    assert path.name == f"{stem}-{digest[:16]}.batch.json"


@pytest.mark.parametrize(
    ("status", "terminal"),
    [
        ("new", False),
        ("uploaded", False),
        ("validating", False),
        ("in_progress", False),
        ("finalizing", False),
        ("cancelling", False),
        ("completed", True),
        ("failed", True),
        ("expired", True),
        ("cancelled", True),
    ],
)
def test_terminal_statuses(tmp_path: Path, status: str, terminal: bool) -> None:
    state = state_in(tmp_path)
    state.update({"status": status})
    assert state.terminal is terminal


def test_update_ignores_fields_of_the_wrong_type(tmp_path: Path) -> None:
    state = state_in(tmp_path)
    state.update({"id": "batch_1", "status": "in_progress", "output_file_id": "file-out"})

    state.update(
        {
            "id": 7,
            "status": None,
            "output_file_id": "",
            "request_counts": {"total": 2, "completed": "1"},
        }
    )

    assert (state.batch_id, state.status, state.output_file_id) == (
        "batch_1",
        "in_progress",
        "file-out",
    )
    assert state.request_counts == {"total": 2}


def test_summary_shows_prefix_id_status_counts_and_whether_cached(tmp_path: Path) -> None:
    state = state_in(tmp_path, "nightly")
    state.update(
        {
            "id": "batch_42",
            "status": "completed",
            "request_counts": {"total": 5, "completed": 4, "failed": 1},
        }
    )
    assert state.summary().split() == [
        "nightly",
        "batch_42",
        "completed",
        "4/5",
        "done,",
        "1",
        "failed,",
        "not",
        "collected",
    ]
    state.collected_at = 1.0
    assert state.summary().endswith("1 failed, collected")
