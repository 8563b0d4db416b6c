"""The worker side's table of remote offers: bounded, idempotent by task id.

Gossip is a hint and arrives out of order (late joiners get recent messages replayed), so
updates leave a small tombstone that keeps a replayed offer from resurrecting a task that was
claimed or finished. An offer listed by its owner (``ListRequest``) is authoritative and
overrides a tombstone.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from node.tasks import TAG_GPU_PREFERRED, is_gpu_worker
from protocols.pb import task_pb2 as pb

_TERMINAL = frozenset({pb.TASK_STATE_COMPLETED, pb.TASK_STATE_FAILED, pb.TASK_STATE_CANCELLED})


def covers(capabilities: frozenset[str], requires: Iterable[str]) -> bool:
    """Hard requirements, case-insensitive, never waived (as in the local queue)."""
    return all(r.casefold() in capabilities for r in requires)


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
        self._offers: OrderedDict[str, RemoteOffer] = OrderedDict()
        self._tombstones: OrderedDict[str, tuple[int, int]] = OrderedDict()

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
        self._offers.move_to_end(tid)
        while len(self._offers) > self.max_size:
            self._offers.popitem(last=False)
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
        self._tombstones.move_to_end(tid)
        while len(self._tombstones) > self.max_size:
            self._tombstones.popitem(last=False)

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
        skip = set(exclude_owners)
        fits = [
            o
            for o in self._offers.values()
            if o.owner not in skip and covers(capabilities, o.offer.requires)
        ]
        fits.sort(key=lambda o: self.key(o, gpu))
        return fits

    @staticmethod
    def key(o: RemoteOffer, gpu_worker: bool) -> tuple[int, int, int, float, str]:
        group, priority, submitted, task_id = rank_key(
            gpu_worker,
            o.offer.priority,
            gpu_preferred(o.offer),
            o.offer.submitted_at_ms / 1000,
            o.task_id,
        )
        return (group, priority, 0 if o.listed else 1, submitted, task_id)

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
        ranked = self.ranked(capabilities, exclude_owners=exclude_owners)
        if not ranked:
            return None
        if ranked[0].listed:
            return ranked[0]  # the owner already spread its list: keep its exact order
        gpu = is_gpu_worker(capabilities)
        best = self.key(ranked[0], gpu)[:3]
        pool = [o for o in ranked[:spread] if self.key(o, gpu)[:3] == best]
        return random.choice(pool)

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
