"""Id validation and key joining: bad input is rejected before any I/O."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blockskip_ray.store import JobStatus, Store, fetch_adapter, put_adapter, validate_id
from blockskip_ray.store.features import FeatureReader, FeatureWriter, delete_features, is_committed
from blockskip_ray.store.ids import ID_PATTERN

BAD_IDS = ["../x", "a/b", "", "x" * 129, ".", "..", ".hidden", "-x", "a\\b", "a\x00b", "a b",
           "a\n", "a..b", "ü", "/abs"]


class ExplodingStore:
    """Any attribute access means I/O was attempted."""

    def __getattr__(self, name):
        raise AssertionError(f"I/O attempted via Store.{name} for an invalid id")


@pytest.mark.parametrize("good", ["toy-1", "a", "A.b_c-9", "x" * 128, "0"])
def test_valid_ids(good):
    assert validate_id(good) == good


@pytest.mark.parametrize("bad", BAD_IDS)
def test_invalid_ids_message(bad):
    with pytest.raises(ValueError, match="invalid subject id"):
        validate_id(bad)
    with pytest.raises(ValueError, match="invalid job id"):
        validate_id(bad, kind="job id")


@pytest.mark.parametrize("bad", ["../x", "a/b", "", "x" * 129])
def test_invalid_ids_rejected_before_io(bad, tmp_path):
    s = ExplodingStore()
    calls = [
        lambda: FeatureWriter(s, bad),
        lambda: FeatureReader(s, bad),
        lambda: is_committed(s, bad),
        lambda: delete_features(s, bad),
        lambda: JobStatus(s, bad),
        lambda: fetch_adapter(s, bad, tmp_path),
        lambda: put_adapter(s, bad, tmp_path),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="invalid"):
            call()
    assert list(tmp_path.iterdir()) == []


@given(st.text(max_size=140))
def test_validate_id_matches_pattern(value):
    import re

    ok = re.fullmatch(ID_PATTERN, value) is not None and ".." not in value
    if ok:
        assert validate_id(value) == value
    else:
        with pytest.raises(ValueError):
            validate_id(value)


@pytest.mark.parametrize("parts", [("..",), ("a", "../b"), ("/abs",), ("a//b",), ("",), ("a", ""),
                                   ("a/./b",), ("C:x",), ("a\\b",)])
def test_join_rejects(parts):
    with pytest.raises(ValueError):
        Store.join(*parts)


def test_join_ok():
    assert Store.join("subjects", "toy-1/features", "index.parquet") == "subjects/toy-1/features/index.parquet"
