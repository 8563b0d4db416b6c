"""A dict that forgets its oldest entries: what a long-running node remembers stays bounded.

A node keeps small facts per task or per peer (who owns a task, when an owner was last asked,
which offers went out). Peers choose how many distinct ids it sees, so each such map must have a
ceiling; losing an old entry only costs a hint, never correctness.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


class BoundedDict(OrderedDict[K, V]):
    """At most ``max_len`` entries; setting a key makes it the newest, the oldest goes first."""

    def __init__(self, max_len: int) -> None:
        if max_len < 1:
            raise ValueError(f"max_len must be at least 1, got {max_len}")
        super().__init__()
        self.max_len = max_len

    def __setitem__(self, key: K, value: V) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        if len(self) > self.max_len:
            self.popitem(last=False)

    def copy(self) -> BoundedDict[K, V]:
        out: BoundedDict[K, V] = BoundedDict(self.max_len)
        out.update(self)
        return out

    def __reduce__(self) -> tuple[object, ...]:  # copy.copy and pickle
        return (type(self), (self.max_len,), None, None, iter(self.items()))
