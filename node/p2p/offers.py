"""The worker side's table of remote offers: bounded, idempotent by task id.

Gossip is a hint and arrives out of order (late joiners get recent messages replayed), so
updates leave a small tombstone that keeps a replayed offer from resurrecting a task that was
claimed or finished. An offer listed by its owner (``ListRequest``) is authoritative and
overrides a tombstone.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Iterable
from dataclasses import dataclass, field

from node._bounded import BoundedDict
from node.tasks import TAG_GPU_PREFERRED, is_gpu_worker
from protocols.pb import task_pb2 as pb

_TERMINAL = frozenset({pb.TASK_STATE_COMPLETED, pb.TASK_STATE_FAILED, pb.TASK_STATE_CANCELLED})


def gpu_preferred(offer: pb.TaskOffer) -> bool:
    return any(t.casefold() == TAG_GPU_PREFERRED.casefold() for t in offer.tags)


def rank_key(
    gpu_worker: bool, priority: int, preferred: bool, submitted: float, task_id: str
) -> tuple[int, int, float, str]:
    """The local queue's order (node.tasks): the GPU_PREFERRED split outranks priority - a GPU
    worker takes GPU_PREFERRED work first, any other worker takes it last - then priority,
    submit time, id. Shared by remote offers and the local-vs-remote comparison."""
    group = (0 if preferred else 1) if gpu_worker else (1 if preferred else 0)
    return (group, -priority, submitted, task_id)


@dataclass
class RemoteOffer:
    offer: pb.TaskOffer
    received_at: float
    # Listed to us by its owner (ListRequest) rather than heard on gossip: owners spread their
    # lists across workers, while every worker hears the same gossip, so listed offers are
    # preferred - fewer workers race for one task.
    listed: bool = False
    # Worked out once: a worker ranks the whole table on every claim, and tables hold
    # thousands of offers. ``keys[gpu_worker]``: rank_key's order, listed offers first
    # within a priority.
    # Hard requirements, case-folded: never waived (as in the local queue).
    requires: frozenset[str] = field(init=False, repr=False)
    keys: tuple[tuple[int, int, int, float, str], ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        o = self.offer
        self.requires = frozenset(r.casefold() for r in o.requires)
        preferred = gpu_preferred(o)
        keys = []
        for gpu_worker in (False, True):
            group, priority, submitted, task_id = rank_key(
                gpu_worker, o.priority, preferred, o.submitted_at_ms / 1000, o.task_id
            )
            keys.append((group, priority, 0 if self.listed else 1, submitted, task_id))
        self.keys = tuple(keys)

    @property
    def owner(self) -> str:
        return self.offer.owner_peer_id

    @property
    def task_id(self) -> str:
        return self.offer.task_id


class OfferTable:
    def __init__(self, max_size: int = 10_000, ttl: float = 300.0) -> None:
        self.max_size = max_size
        self.ttl = ttl
        self._offers: BoundedDict[str, RemoteOffer] = BoundedDict(max_size)
        self._tombstones: BoundedDict[str, tuple[int, int]] = BoundedDict(max_size)

    def __len__(self) -> int:
        return len(self._offers)

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._offers

    def get(self, task_id: str) -> RemoteOffer | None:
        return self._offers.get(task_id)

    def add(self, offer: pb.TaskOffer, now: float, *, authoritative: bool = False) -> bool:
        """Insert or refresh an offer; False when a tombstone says it is stale."""
        tid = offer.task_id
        tomb = self._tombstones.get(tid)
        if tomb is not None:
            state, attempt = tomb
            if authoritative:
                del self._tombstones[tid]
            elif state in _TERMINAL or offer.attempt <= attempt:
                return False
            else:
                del self._tombstones[tid]
        self._offers[tid] = RemoteOffer(offer, now, listed=authoritative)
        return True

    def apply_update(self, update: pb.TaskUpdate) -> None:
        tid = update.task_id
        current = self._offers.get(tid)
        if update.state == pb.TASK_STATE_PENDING:
            return  # a re-offer follows as a TaskOffer; nothing to remove
        if (
            current is not None
            and current.owner == update.owner_peer_id
            and (update.state in _TERMINAL or current.offer.attempt <= update.attempt)
        ):
            del self._offers[tid]
        self._tombstones[tid] = (update.state, update.attempt)

    def remove(self, task_id: str) -> None:
        self._offers.pop(task_id, None)

    def remove_owner(self, owner: str) -> None:
        for tid in [t for t, o in self._offers.items() if o.owner == owner]:
            del self._offers[tid]

    def expire(self, now: float) -> None:
        while self._offers:
            tid, first = next(iter(self._offers.items()))
            if now - first.received_at <= self.ttl:
                break
            del self._offers[tid]

    def owners(self) -> set[str]:
        return {o.owner for o in self._offers.values()}

    def ranked(
        self, capabilities: frozenset[str], *, exclude_owners: Iterable[str] = ()
    ) -> list[RemoteOffer]:
        """Offers these (normalised) capabilities can take, best first (``rank_key``)."""
        gpu = is_gpu_worker(capabilities)
        fits = self.fitting(capabilities, exclude_owners)
        fits.sort(key=lambda o: o.keys[gpu])
        return fits

    def fitting(
        self, capabilities: frozenset[str], exclude_owners: Iterable[str] = ()
    ) -> list[RemoteOffer]:
        """Offers these (normalised) capabilities can take, in no particular order."""
        skip = set(exclude_owners)
        return [
            o for o in self._offers.values() if o.owner not in skip and o.requires <= capabilities
        ]

    def pick(
        self,
        capabilities: frozenset[str],
        *,
        spread: int,
        exclude_owners: Iterable[str] = (),
    ) -> RemoteOffer | None:
        """The best offer. Among offers heard on gossip (the same at every worker) it is one
        of the first ``spread`` of the best group and priority, at random, so workers reading
        the same announcements rarely race for one task."""
        gpu = is_gpu_worker(capabilities)
        # The first ``spread`` of the ranking, without sorting the rest of the table.
        top = heapq.nsmallest(
            max(spread, 1), self.fitting(capabilities, exclude_owners), key=lambda o: o.keys[gpu]
        )
        if not top:
            return None
        if top[0].listed:
            return top[0]  # the owner already spread its list: keep its exact order
        best = top[0].keys[gpu][:3]
        return random.choice([o for o in top if o.keys[gpu][:3] == best])

    def snapshot(self) -> list[dict[str, object]]:
        return [
            {
                "task_id": o.task_id,
                "task_type": o.offer.task_type,
                "priority": o.offer.priority,
                "tags": list(o.offer.tags),
                "requires": list(o.offer.requires),
                "owner_peer_id": o.owner,
                "attempt": o.offer.attempt,
            }
            for o in self._offers.values()
        ]
