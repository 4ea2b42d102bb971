"""Data records are checked like configs: unknown keys that look like known ones, wrong types, unreadable
files and unscorable answers each give one line naming the file and record."""

from __future__ import annotations

import json
import warnings

import pytest

from dataset import DataError, load_records

GOOD = {"question": "Q?", "steps": ["a"], "answer": "b"}


def write(tmp_path, data, raw=False):
    path = tmp_path / "data.json"
    path.write_text(data if raw else json.dumps(data))
    return path


@pytest.mark.parametrize(
    ("key", "meant"),
    [("images", "image"), ("videos", "video"), ("Image", "image"), ("step", "steps"), ("answers", "answer")],
)
def test_misspelt_record_key_is_refused_with_did_you_mean(tmp_path, key, meant):
    path = write(tmp_path, [GOOD, {**GOOD, key: "x"}])
    with pytest.raises(DataError, match=rf"^{path}: record 1: unknown key '{key}'; did you mean '{meant}'\?$"):
        load_records(path)


def test_a_data_sets_own_metadata_keys_are_kept(tmp_path):
    records = load_records(write(tmp_path, [{**GOOD, "idx_to_symbol": ["a"], "root": 1, "edges": []}]))
    assert records[0]["root"] == 1


def test_keys_not_read_are_named_once_per_file(tmp_path):
    path = write(tmp_path, [{**GOOD, "edges": [], "root": 1}, {**GOOD, "edges": []}, GOOD])
    with pytest.warns(UserWarning, match=r"keys not read .*: 'edges' \(2 records\), 'root' \(1 records\)$") as seen:
        load_records(path)
    assert len([w for w in seen if "keys not read" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a file of known keys only: no warning
        load_records(write(tmp_path, [GOOD]))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"num_frames": True}, "key 'num_frames': expected a positive integer"),
        ({"num_frames": 0}, "key 'num_frames': expected a positive integer"),
        ({"image": "a\0b.png"}, "key 'image': a path is empty or holds a NUL byte"),
        ({"image": ["ok.png", ""]}, "key 'image': a path is empty or holds a NUL byte"),
        ({"video": "v\0.mp4"}, "key 'video': a path is empty or holds a NUL byte"),
        ({"answer": 3}, "key 'answer': expected a string"),
        ({"steps": "one"}, "key 'steps': expected a list of strings"),
    ],
)
def test_wrong_values_are_refused_naming_record_and_key(tmp_path, extra, message):
    path = write(tmp_path, [{**GOOD, **extra}])
    with pytest.raises(DataError, match=f"^{path}: record 0: {message}"):
        load_records(path)


def test_a_directory_is_refused(tmp_path):
    with pytest.raises(DataError, match=f"^{tmp_path}: is a directory"):
        load_records(tmp_path)


def test_deeply_nested_json_is_one_line(tmp_path):
    path = write(tmp_path, "[" * 100000 + "]" * 100000, raw=True)
    with pytest.raises(DataError, match=f"^{path}: not a list of records: its JSON nests too deeply"):
        load_records(path)


def test_answers_with_hash_are_counted_and_warned(tmp_path):
    path = write(tmp_path, [GOOD, {**GOOD, "answer": "#1"}, {**GOOD, "answer": "a # b"}])
    with pytest.warns(UserWarning, match=r"2 of 3 answers contain '#' \(records \[1, 2\]\)"):
        load_records(path)
