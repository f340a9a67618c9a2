"""Store layer: URIs (local or s3://), feature shards, adapters, job status.

A pure library (never imports ray); see docs/store.md for the layout and the
commit protocol. Names are imported on first use (PEP 562), so reading a status
table (`blockskip status`) does not import torch through the feature modules.
"""

from importlib import import_module

_WHERE = {
    "ADAPTER_FILE": "adapters", "adapter_prefix": "adapters", "fetch_adapter": "adapters",
    "list_adapters": "adapters", "put_adapter": "adapters",
    "FeatureReader": "features", "FeatureWriter": "features", "delete_features": "features",
    "dequantize_fp8": "features", "is_committed": "features", "quantize_fp8": "features",
    "ID_PATTERN": "ids", "validate_id": "ids",
    "JobStatus": "status",
    "RetryPolicy": "uri", "Store": "uri", "parquet_from_bytes": "uri",
}

__all__ = [
    "Store", "RetryPolicy", "parquet_from_bytes", "validate_id", "ID_PATTERN",
    "FeatureWriter", "FeatureReader", "is_committed", "delete_features", "quantize_fp8", "dequantize_fp8",
    "JobStatus",
    "ADAPTER_FILE", "adapter_prefix", "fetch_adapter", "list_adapters", "put_adapter",
]


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
