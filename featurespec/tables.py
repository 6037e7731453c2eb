"""Vocabulary tables: hashed categorical values -> embedding-row indices, in numpy.

A vocabulary maps the 64-bit hash of each kept value to its row; index
:data:`MISSING_INDEX` (0) of every table is reserved for missing and unseen
values. :class:`HashTable` does one vocabulary's lookups; :class:`BatchLookup`
looks up every single-valued feature of a batch at once through one fused
table, which is what a serving process uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from featurespec.strings import MIX_MULTIPLIER

if TYPE_CHECKING:
    from featurespec.spec import SparseFeature

MISSING_INDEX = 0


class HashTable:
    """uint64 key -> int64 value, open addressing with linear probing, in numpy.

    Lookups are vectorized: each round probes one slot for every unresolved
    key, and at a load factor <= 0.5 nearly all keys resolve in the first
    round, which therefore runs over all keys without an index array. Faster
    than ``np.searchsorted`` on large vocabularies because each probe is one
    random access instead of ~log2(V); key and value share a row of
    ``_slots``, so that access touches one cache line, not two.
    """

    def __init__(self, keys: np.ndarray, values: np.ndarray):
        bits = max(4, int(np.ceil(np.log2(max(len(keys), 1) * 2))) + 1)
        self._shift = np.uint64(64 - bits)
        self._mask = (1 << bits) - 1
        slot_keys = np.zeros(1 << bits, np.uint64)
        slot_values = np.full(1 << bits, -1, np.int64)  # -1 marks an empty slot
        pending = np.arange(len(keys))
        slots = self._home(keys)
        while len(pending):
            # Claim free slots; of keys that want the same slot, the first wins.
            free = slot_values[slots] < 0
            unique_slots, first = np.unique(slots[free], return_index=True)
            winners = pending[free][first]
            slot_keys[unique_slots] = keys[winners]
            slot_values[unique_slots] = values[winners]
            lost = np.ones(len(pending), bool)
            lost[np.flatnonzero(free)[first]] = False
            pending, slots = pending[lost], (slots[lost] + 1) & self._mask
        self._slots = np.stack([slot_keys, slot_values.view(np.uint64)], axis=1)  # (slots, 2): key, value

    def _home(self, keys: np.ndarray) -> np.ndarray:
        return (keys >> self._shift).astype(np.int64)  # top bits: the hash mixes them best

    def _probe(self, slots: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(hit, value, go_on)`` of one probe: go on past slots that hold another key."""
        rows = self._slots.take(slots, axis=0)
        values = rows[:, 1].view(np.int64)
        occupied = values >= 0  # an empty slot ends the probe: not present
        hit = (rows[:, 0] == keys) & occupied
        return hit, values, occupied & ~hit

    def get(self, keys: np.ndarray, *, default: int) -> np.ndarray:
        slots = self._home(keys)
        hit, values, go_on = self._probe(slots, keys)
        result = np.where(hit, values, default)
        pending = np.flatnonzero(go_on)
        slots = slots[pending]
        while len(pending):
            slots = (slots + 1) & self._mask
            hit, values, go_on = self._probe(slots, keys[pending])
            result[pending[hit]] = values[hit]
            pending, slots = pending[go_on], slots[go_on]
        return result



class BatchLookup:
    """Looks up K single-valued features at once: ``hashes uint64[K, B]`` ->
    indices ``int64[K, B]``, exactly as each feature's own ``lookup``.

    Per-feature lookups cost a dozen small numpy calls each, which dominates
    small batches. Here the hashed features take one modulo over all their
    rows, and the vocabularies share one table: vocabulary k's keys are
    XORed with a per-feature salt (so equal values of different features
    differ), and its entries get the global numbers ``start_k ...
    start_k + V_k - 1``. A hit counts only if its number falls in the
    querying feature's range, so even a key shared across features cannot
    return another feature's index: the result is exact, not probabilistic.
    If two salted keys ever collide, the vocabularies keep their own tables.
    """

    def __init__(self, features: Sequence[SparseFeature]):
        self._features = tuple(features)
        hashed = [k for k, f in enumerate(features) if f.kind == "hash"]
        self._hashed = np.array(hashed, np.int64)
        self._buckets = np.array([[features[k].buckets] for k in hashed], np.uint64).reshape(-1, 1)
        self._vocab = np.array([k for k, f in enumerate(features) if f.kind == "vocab"], np.int64)
        sizes = np.array([len(features[k].vocab) for k in self._vocab.tolist()], np.int64)
        self._salts = _splitmix(self._vocab.astype(np.uint64) + np.uint64(1)).reshape(-1, 1)
        self._starts = (np.cumsum(sizes) - sizes).reshape(-1, 1)
        self._sizes = sizes.reshape(-1, 1)
        keys = np.concatenate(
            [features[k]._keys ^ salt for k, salt in zip(self._vocab.tolist(), self._salts[:, 0])]
        ) if len(self._vocab) else np.zeros(0, np.uint64)
        unique = len(np.unique(keys)) == len(keys)
        self._table = HashTable(keys, np.arange(len(keys), dtype=np.int64)) if unique else None

    def __call__(self, hashes: np.ndarray, missing: np.ndarray) -> np.ndarray:
        out = np.empty(hashes.shape, np.int64)
        if len(self._hashed) == len(self._features):  # every feature hashed (Criteo's layout): no gather
            np.remainder(hashes, self._buckets, out=out.view(np.uint64))  # below 2**63: the same bits as int64
            out += 1
        elif len(self._hashed):
            out[self._hashed] = (hashes[self._hashed] % self._buckets).astype(np.int64) + 1
        if len(self._vocab):
            if self._table is None:
                for k in self._vocab.tolist():
                    out[k] = self._features[k].lookup(hashes[k], missing[k])
            else:
                salted = (hashes[self._vocab] ^ self._salts).ravel()
                found = self._table.get(salted, default=-1).reshape(len(self._vocab), -1) - self._starts
                out[self._vocab] = np.where((found >= 0) & (found < self._sizes), found + 1, MISSING_INDEX)
        np.putmask(out, missing, MISSING_INDEX)
        return out


def _splitmix(values: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer: well-spread 64-bit salts from small integers."""
    with np.errstate(over="ignore"):
        z = values * MIX_MULTIPLIER
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))

