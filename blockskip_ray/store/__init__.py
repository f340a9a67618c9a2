"""Store layer: URIs (local or s3://), feature shards, adapters, job status.

A pure library (never imports ray); see docs/store.md for the layout and the
commit protocol.
"""

from .adapters import ADAPTER_FILE, adapter_prefix, fetch_adapter, list_adapters, put_adapter
from .features import (
    FeatureReader,
    FeatureWriter,
    delete_features,
    dequantize_fp8,
    is_committed,
    quantize_fp8,
)
from .ids import ID_PATTERN, validate_id
from .status import JobStatus
from .uri import RetryPolicy, Store, parquet_from_bytes

__all__ = [
    "Store", "RetryPolicy", "parquet_from_bytes", "validate_id", "ID_PATTERN",
    "FeatureWriter", "FeatureReader", "is_committed", "delete_features", "quantize_fp8", "dequantize_fp8",
    "JobStatus",
    "ADAPTER_FILE", "adapter_prefix", "list_adapters", "fetch_adapter", "put_adapter",
]
