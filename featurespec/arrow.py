"""Arrow arrays as the FeatureSpec's packed columns, without a Python object per value.

The only module of :mod:`featurespec` that needs pyarrow, and the package's
``__init__`` does not import it: a process that never sees Arrow data (a
serving worker answering JSON) runs without pyarrow. Readers of Arrow data
(Parquet, CSV through Arrow, Arrow IPC requests) wrap their string arrays
here; the data buffers are shared with Arrow, not copied.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from featurespec.strings import StringColumn, StringLists


def string_column_from_arrow(array: pa.Array) -> StringColumn:
    """Wrap an Arrow string/binary array's buffers as a StringColumn; null becomes empty.

    No Python string is created: the offsets are rebased to the array's slice
    and the data buffer is shared with Arrow, not copied.
    """
    if pa.types.is_large_string(array.type) or pa.types.is_large_binary(array.type):
        offset_type = np.dtype(np.int64)
    elif pa.types.is_string(array.type) or pa.types.is_binary(array.type):
        offset_type = np.dtype(np.int32)
    else:
        raise TypeError(f"expected an Arrow string array, got {array.type}")
    count = len(array)
    validity, offsets_buffer, data_buffer = array.buffers()
    if count == 0:
        return StringColumn(np.zeros(0, np.uint8), np.zeros(1, np.int64))
    offsets = np.frombuffer(offsets_buffer, offset_type, count=count + 1, offset=array.offset * offset_type.itemsize)
    first, last = int(offsets[0]), int(offsets[-1])
    if data_buffer is None or last == first:
        data = np.zeros(0, np.uint8)
    else:
        data = np.frombuffer(data_buffer, np.uint8, count=last - first, offset=first)
    rebased = offsets.astype(np.int64)
    rebased -= first
    if array.null_count:
        # Arrow does not promise that a null slot spans zero bytes: drop its bytes (writers rarely leave any).
        valid = np.unpackbits(np.frombuffer(validity, np.uint8), count=array.offset + count, bitorder="little")
        valid = valid[array.offset :].view(bool)
        lengths = np.diff(rebased)
        if lengths[~valid].any():
            data = data[np.repeat(valid, lengths)]
            rebased[0] = 0
            np.cumsum(np.where(valid, lengths, 0), out=rebased[1:])
    return StringColumn(data, rebased)


def string_lists_from_arrow(array: pa.ListArray | pa.LargeListArray) -> StringLists:
    """Wrap an Arrow ``list<string>`` (or ``large_list``) array; a null list holds no values.

    Integer values must be cast to strings first (``pc.cast``). A null value
    inside a list becomes an empty value, which encodes as no value.
    """
    if not (pa.types.is_list(array.type) or pa.types.is_large_list(array.type)):
        raise TypeError(f"expected an Arrow list array, got {array.type}")
    offsets = array.offsets.to_numpy().astype(np.int64)  # this slice's rows; not rebased
    first, last = int(offsets[0]), int(offsets[-1])
    values = array.values.slice(first, last - first)
    rebased = offsets - first
    if array.null_count:
        # A null list may still span values (Arrow allows it): drop them.
        valid = pc.is_valid(array).to_numpy(zero_copy_only=False)
        lengths = np.diff(rebased)
        values = values.filter(pa.array(np.repeat(valid, lengths)))
        rebased[0] = 0
        np.cumsum(np.where(valid, lengths, 0), out=rebased[1:])
    return StringLists(string_column_from_arrow(values), rebased)


def table_to_columns(table: pa.Table) -> dict[str, StringColumn | np.ndarray]:
    """An Arrow table (a Parquet file's) as raw columns: text as StringColumns (null = missing),
    numbers as float64 arrays (null = NaN, missing)."""
    columns: dict[str, StringColumn | np.ndarray] = {}
    for name in table.column_names:
        array = table.column(name).combine_chunks()
        if pa.types.is_string(array.type) or pa.types.is_large_string(array.type):
            columns[name] = string_column_from_arrow(array)
        else:
            columns[name] = array.to_numpy(zero_copy_only=False).astype(np.float64)
    return columns
