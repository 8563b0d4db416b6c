"""BoundedDict: the ceiling on what a long-running node remembers per task or per peer."""

from __future__ import annotations

import copy
import pickle

import pytest

from node._bounded import BoundedDict


def test_keeps_the_newest_entries_whichever_way_they_are_set() -> None:
    d: BoundedDict[str, int] = BoundedDict(3)
    for i in range(10):
        d[f"k{i}"] = i
    assert list(d) == ["k7", "k8", "k9"]
    d["k7"] = 70  # setting again makes it the newest
    d.setdefault("new", 1)
    assert list(d) == ["k9", "k7", "new"]
    d.update({"a": 1, "b": 2})
    assert list(d) == ["new", "a", "b"] and len(d) == 3
    assert d.get("k8") is None and d.pop("a") == 1 and len(d) == 2


def test_copies_keep_the_ceiling() -> None:
    d: BoundedDict[int, int] = BoundedDict(2)
    d.update({1: 1, 2: 2})
    for other in (d.copy(), copy.copy(d), copy.deepcopy(d), pickle.loads(pickle.dumps(d))):
        assert other == d and other.max_len == 2
        other[3] = 3
        assert list(other) == [2, 3]


def test_a_ceiling_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="max_len"):
        BoundedDict(0)
