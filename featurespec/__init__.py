"""FeatureSpec: the one definition of how a raw record becomes model tensors.

Written by training (``features.json``), read by export, the TorchServe
handlers, the benchmarks and the load tests. The package depends on numpy
and the standard library only: it is packed into every ``.mar`` archive and
runs inside TorchServe workers, so serving encodes exactly as training did.
Fitting a spec on data is training's job (:mod:`training.fitting`).

* :mod:`featurespec.spec`: the features, their validation and encoding.
* :mod:`featurespec.strings`: packed string columns and the 64-bit hash.
* :mod:`featurespec.tables`: vocabulary lookups from hashes to rows.
* :mod:`featurespec.arrow`: Arrow arrays as packed columns (the one module
  that needs pyarrow; not imported here).
"""

from featurespec.spec import (
    FEATURES_FILE,
    SPEC_VERSION,
    BucketizedFeature,
    Columns,
    DenseFeature,
    DenseTransform,
    FeatureError,
    FeatureSpec,
    SparseFeature,
    SparseKind,
    TextLimits,
    json_type,
    short_text,
)
from featurespec.strings import (
    StringColumn,
    StringLists,
    hash_strings,
    hash_values,
    split_tokens,
    split_values,
)
from featurespec.tables import MISSING_INDEX

__all__ = [
    "FEATURES_FILE",
    "MISSING_INDEX",
    "SPEC_VERSION",
    "BucketizedFeature",
    "Columns",
    "DenseFeature",
    "DenseTransform",
    "FeatureError",
    "FeatureSpec",
    "SparseFeature",
    "SparseKind",
    "StringColumn",
    "StringLists",
    "TextLimits",
    "hash_strings",
    "hash_values",
    "json_type",
    "short_text",
    "split_tokens",
    "split_values",
]
