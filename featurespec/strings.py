"""Packed UTF-8 string columns and the FeatureSpec's 64-bit string hash.

A :class:`StringColumn` holds variable-length values back to back, as an
Arrow string array does, so readers and the request encoder hash a whole
column in a few vectorized passes with no Python object per value.
:func:`hash_strings` is part of the FeatureSpec contract: hash buckets and
vocabulary lookups depend on it, in every process and on every machine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

HASH_SEED = np.uint64(0xCBF29CE484222325)
MIX_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)
_FMIX_1 = np.uint64(0xFF51AFD7ED558CCD)
_FMIX_2 = np.uint64(0xC4CEB9FE1A85EC53)
_ALL_ONES = np.uint64(0xFFFFFFFFFFFFFFFF)
# hash_spans: the words of every value mixed together (a typical categorical value fits in them), and
# the fewest values still hashing at a word for a numpy step to beat a Python loop over their words.
LOCKSTEP_WORDS = 4
MIN_VECTOR_VALUES = 32
# The Python types a categorical value may have: text, an integer (hashed as its decimal text), or None (missing).
SPARSE_TYPES = frozenset({str, int, type(None)})


@dataclass(frozen=True)
class StringColumn:
    """Variable-length UTF-8 strings packed like an Arrow string array.

    ``data`` holds all bytes back to back; value ``i`` is
    ``data[offsets[i]:offsets[i + 1]]``. An empty value means missing.
    Readers build it straight from Arrow buffers, so no Python string object
    is ever created on the training path.
    """

    data: np.ndarray  # uint8[total_bytes]
    offsets: np.ndarray  # int64[N + 1]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @classmethod
    def from_values(cls, values: Sequence[Any] | np.ndarray) -> StringColumn:
        """Pack str/int/None values (None and "" mean missing); bytes arrays as they are."""
        if isinstance(values, np.ndarray):
            if values.dtype.kind == "S":
                return cls._from_bytes_list(values.tolist())
            if values.dtype.kind not in "OUiu":
                raise TypeError(f"cannot pack a {values.dtype} array as strings")
            values = values.tolist()
        packed = pack_strings(values)
        if packed is not None:
            return packed
        # A value holding a NUL, or another type: value by value (a lone surrogate raises here).
        return cls._from_bytes_list([("" if v is None else str(v)).encode("utf-8") for v in values])

    @classmethod
    def _from_bytes_list(cls, encoded: list[bytes]) -> StringColumn:
        lengths = np.fromiter(map(len, encoded), np.int64, len(encoded))
        offsets = np.zeros(len(encoded) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return cls(np.frombuffer(b"".join(encoded), np.uint8), offsets)

    def to_list(self) -> list[str]:
        raw = self.data.tobytes()
        bounds = self.offsets.tolist()
        return [raw[a:b].decode("utf-8") for a, b in zip(bounds[:-1], bounds[1:])]

    def slice(self, start: int, stop: int) -> StringColumn:
        """Rows ``[start, stop)``, sharing this column's bytes (no copy)."""
        offsets = self.offsets[start : stop + 1]
        return StringColumn(self.data[offsets[0] : offsets[-1]], offsets - offsets[0])

    def take(self, indices: np.ndarray) -> StringColumn:
        starts, ends = self.offsets[:-1][indices], self.offsets[1:][indices]
        return StringColumn._from_bytes_list(
            [self.data[a:b].tobytes() for a, b in zip(starts.tolist(), ends.tolist())]
        )


@dataclass(frozen=True)
class StringLists:
    """Lists of UTF-8 strings packed like an Arrow ``list<string>`` array.

    Row ``i`` holds the values ``values[offsets[i]:offsets[i + 1]]`` (an
    empty value is no value). A multi-valued feature's values arrive this
    way from an Arrow request; unlike a separator-joined string, a value
    holding the separator stays one value, as in a JSON array.
    """

    values: StringColumn
    offsets: np.ndarray  # int64[N + 1], offsets[0] == 0

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def rows(self) -> np.ndarray:
        """The row of each value: int64[len(values)]."""
        return np.repeat(np.arange(len(self)), np.diff(self.offsets))

    def row_bytes(self) -> np.ndarray:
        """UTF-8 bytes of each row's values together: int64[N]."""
        return np.diff(self.values.offsets[self.offsets])



def hash_strings(column: StringColumn) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hash of every value: ``(hashes uint64[N], missing bool[N])``.

    The value's UTF-8 bytes are read as little-endian 8-byte words (the last
    one zero-padded), each folded in with a multiply-xorshift step, then the
    length and a MurmurHash3 finalizer. Word-wise rather than byte-wise so
    that a typical Criteo value (8 hex characters) costs one vectorized pass.
    The hash is part of the FeatureSpec contract: hash buckets depend on it.
    """
    starts = column.offsets[:-1]
    return hash_spans(column.data, starts, column.offsets[1:] - starts)


def hash_spans(data: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`hash_strings` of the values ``data[starts[i] : starts[i] + lengths[i]]``.

    Cost is linear in the total bytes, whatever the lengths: every value's
    first :data:`LOCKSTEP_WORDS` words are mixed in lockstep (no sort, which
    is all a column of short values needs); longer values go on longest
    first, so the values still hashing at each word are a prefix of them and
    each step touches only those; the last few long values, too few to repay
    numpy's per-call cost, finish in a plain loop over their words.
    """
    empty = lengths == 0
    longest = int(lengths.max()) if len(lengths) else 0
    if not longest:
        hashes = np.full(len(lengths), HASH_SEED, dtype=np.uint64)
    else:
        padded = np.concatenate([data, np.zeros(8, np.uint8)])
        # Every byte offset seen as the start of an (unaligned) uint64 word.
        words = np.ndarray((len(padded) - 7,), dtype="<u8", buffer=padded, strides=(1,))
        with np.errstate(over="ignore"):
            # The first word, in place in one buffer: the step every value takes, and the only one most take.
            hashes = words[starts]  # a value's first word starts inside ``words`` (its start is at most len(data))
            if np.count_nonzero(lengths < 8) > np.count_nonzero(empty):  # a value of 1 to 7 bytes
                hashes &= _last_word_masks(lengths)
            hashes ^= HASH_SEED
            _mix_in_place(hashes)
            np.putmask(hashes, empty, HASH_SEED)  # an empty value takes no step
            for word in range(8, min(longest, 8 * LOCKSTEP_WORDS), 8):
                remaining = lengths - word
                value = words[np.minimum(starts + word, len(words) - 1)]
                short = (remaining < 8) & (remaining > 0)
                if short.any():
                    value = value & _last_word_masks(remaining)
                hashes = np.where(remaining > 0, _mix(hashes ^ value), hashes)
        long_values = np.flatnonzero(lengths > 8 * LOCKSTEP_WORDS)
        if len(long_values):
            hashes[long_values] = _mix_long_values(
                padded, words, starts[long_values], lengths[long_values], hashes[long_values]
            )
    scratch = np.empty_like(hashes)
    with np.errstate(over="ignore"):
        np.bitwise_xor(hashes, lengths, out=hashes, dtype=np.uint64, casting="unsafe")
        for multiplier in (_FMIX_1, _FMIX_2):
            np.right_shift(hashes, np.uint64(33), out=scratch)
            hashes ^= scratch
            hashes *= multiplier
        np.right_shift(hashes, np.uint64(33), out=scratch)
        hashes ^= scratch
    return hashes, empty


def _mix(value: np.ndarray) -> np.ndarray:
    """One multiply-xorshift step of the hash on ``hash ^ word`` (under ``errstate(over="ignore")``)."""
    mixed = value * MIX_MULTIPLIER
    mixed ^= mixed >> np.uint64(32)
    return mixed


def _mix_in_place(value: np.ndarray) -> None:
    """:func:`_mix` writing into ``value``, with one temporary (under ``errstate(over="ignore")``)."""
    value *= MIX_MULTIPLIER
    value ^= value >> np.uint64(32)


def _last_word_masks(remaining: np.ndarray) -> np.ndarray:
    """The mask keeping a value's ``remaining`` bytes (1..7) of a word; all ones from 8 bytes up or at 0."""
    keep_bits = np.clip(remaining, 0, 8).astype(np.uint64) * np.uint64(8)
    short = (remaining < 8) & (remaining > 0)
    return np.where(short, (np.uint64(1) << (keep_bits & np.uint64(63))) - np.uint64(1), _ALL_ONES)


def _mix_long_values(
    padded: np.ndarray, words: np.ndarray, starts: np.ndarray, lengths: np.ndarray, hashes: np.ndarray
) -> np.ndarray:
    """Mix the words after the first :data:`LOCKSTEP_WORDS` of each value into its hash."""
    order = np.argsort(-lengths, kind="stable")  # longest first
    starts, lengths, hashes = starts[order], lengths[order], hashes[order]
    word_counts = (lengths + 7) // 8
    negated_counts = -word_counts  # ascending, as searchsorted needs
    last_masks = _last_word_masks(lengths - 8 * (word_counts - 1))
    word, active = LOCKSTEP_WORDS, len(lengths)
    with np.errstate(over="ignore"):
        while active >= MIN_VECTOR_VALUES:
            # Values [ending, active) take their last word now.
            ending = int(np.searchsorted(negated_counts, -(word + 1), side="left"))
            value = words[starts[:active] + 8 * word]
            value[ending:] &= last_masks[ending:active]
            hashes[:active] = _mix(hashes[:active] ^ value)
            word, active = word + 1, ending
    for i in range(active):
        start = int(starts[i]) + 8 * word
        end = int(starts[i] + lengths[i])
        tail = np.zeros(-(-(end - start) // 8) * 8, np.uint8)  # the last word zero-padded, as the mask does
        tail[: end - start] = padded[start:end]
        hashes[i] = _mix_words(int(hashes[i]), tail.view("<u8").tolist())
    out = np.empty_like(hashes)
    out[order] = hashes
    return out


def _mix_words(hash_value: int, words: list[int]) -> int:
    """The hash's word steps in plain Python integers, for the few longest values."""
    multiplier, all_ones = int(MIX_MULTIPLIER), int(_ALL_ONES)
    for word in words:
        hash_value = ((hash_value ^ word) * multiplier) & all_ones
        hash_value ^= hash_value >> 32
    return hash_value


def hash_values(values: Sequence[Any] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hash plain values (str/int/None) exactly as :func:`hash_strings` would."""
    column = values if isinstance(values, StringColumn) else StringColumn.from_values(values)
    return hash_strings(column)



def joined_utf8(values: Sequence[Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """``values`` joined with NUL separators and encoded to UTF-8 at once:
    ``(bytes uint8[total], start int64[N], length int64[N] of each value)``,
    in a few C-level passes instead of one Python step per value.

    None and ints are converted first (None is missing, an int its decimal
    text). Returns None, without raising, for no values, any other type, a
    value holding a NUL (a cut would be ambiguous) or one that is not
    encodable UTF-8 (a lone surrogate): the caller's general path then
    reports or handles it.
    """
    if not values:
        return None
    joined = join_text(values)
    return None if joined is None else utf8_spans(joined, len(values))


def join_text(values: Sequence[Any]) -> str | None:
    """str/int/None values joined with NUL separators (None: see :func:`joined_utf8`)."""
    try:
        return "\x00".join(values)
    except TypeError:  # None, int, or a wrong type among the values
        pass
    try:  # None alone (a column's missing values) costs one pass more
        return "\x00".join(["" if v is None else v for v in values])
    except TypeError:
        if not set(map(type, values)) <= SPARSE_TYPES:
            return None
        return "\x00".join(["" if v is None else str(v) for v in values])


def utf8_spans(joined: str, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The UTF-8 bytes of ``count`` NUL-joined values and each value's span (None: see :func:`joined_utf8`)."""
    try:
        data = np.frombuffer(joined.encode("utf-8"), np.uint8)
    except UnicodeEncodeError:
        return None
    cuts = np.flatnonzero(data == 0)
    if len(cuts) != count - 1:
        return None
    starts = np.empty(count, np.int64)
    starts[0] = 0
    starts[1:] = cuts + 1
    ends = np.empty_like(starts)
    ends[:-1] = cuts
    ends[-1] = len(data)
    return data, starts, ends - starts


def pack_strings(values: Sequence[Any]) -> StringColumn | None:
    """Pack str/int/None values into a :class:`StringColumn` (None: see :func:`joined_utf8`)."""
    joined = joined_utf8(values)
    if joined is None:
        return None
    data, _, lengths = joined
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return StringColumn(data[data != 0], offsets)  # the separators dropped



def split_tokens(column: StringColumn, separator: str) -> tuple[StringColumn, np.ndarray] | None:
    """Split packed values at a one-byte separator: ``(non-empty tokens, row of each token)``.

    The same tokens as :func:`split_values` on each decoded value (an ASCII
    byte never occurs inside a multi-byte UTF-8 character), in row order.
    None for a separator that is not one ASCII character.
    """
    if len(separator) != 1 or not separator.isascii():
        return None
    is_separator = column.data == ord(separator)
    cuts = np.flatnonzero(is_separator)
    cut_rows = np.searchsorted(column.offsets, cuts, side="right") - 1
    # Value v holds (its separators + 1) tokens; the token after separator i
    # has index i + (row of i) + 1, since every earlier row adds one token.
    per_row = np.bincount(cut_rows, minlength=len(column)) + 1
    last = np.cumsum(per_row) - 1
    starts = np.empty(last[-1] + 1 if len(last) else 0, np.int64)
    ends = np.empty_like(starts)
    starts[last - per_row + 1] = column.offsets[:-1]
    starts[np.arange(len(cuts)) + cut_rows + 1] = cuts + 1
    ends[np.arange(len(cuts)) + cut_rows] = cuts
    ends[last] = column.offsets[1:]
    lengths = ends - starts
    kept = lengths > 0  # empty values and empty tokens ("a||b") carry nothing
    offsets = np.zeros(int(kept.sum()) + 1, np.int64)
    np.cumsum(lengths[kept], out=offsets[1:])
    rows = np.repeat(np.arange(len(column)), per_row)[kept]
    return StringColumn(column.data[~is_separator], offsets), rows



def split_values(value: Any, separator: str) -> list[str]:
    """One multi-valued raw value -> its non-empty tokens: a string is split at
    ``separator``, a list keeps its values as text; None and "" hold none."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [x for x in value.split(separator) if x]
    return [str(x) for x in value if x is not None and x != ""]

