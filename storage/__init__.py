"""arcflow.storage: the trajectory dataset format (writes v2, reads v1 and v2), its writer, reader,
verifier and streaming dataset.

Knows nothing about models: arrays in, arrays out. Public names are imported lazily so that
importing one module of the package stays cheap (no zarr / pyarrow / torch import).

- ``create_or_open_dataset(url, spec, resume=False) -> DatasetWriter``  (``arcflow.storage.writer``)
- ``check_dataset_target(url, resume, spec=, generation=)``: may a job write there? (``.writer``)
- ``open_dataset(url) -> TrajectoryReader``                              (``arcflow.storage.reader``)
- ``TrajectoryStream``: (sample, segment) items of committed shards      (``arcflow.storage.streaming``)
- ``verify_dataset(url, repair=False)``: find (and uncommit) damaged shards (``arcflow.storage.verify``)
- ``DatasetSpec``, ``CondField``, ``FORMAT_VERSION``, ``STORAGE_DTYPES`` (``arcflow.storage.format``)
"""

_EXPORTS = {
    "FORMAT_VERSION": "arcflow.storage.format",
    "STORAGE_DTYPES": "arcflow.storage.format",
    "COMPRESSIONS": "arcflow.storage.format",
    "DatasetSpec": "arcflow.storage.format",
    "CondField": "arcflow.storage.format",
    "shard_name": "arcflow.storage.format",
    "create_or_open_dataset": "arcflow.storage.writer",
    "check_dataset_target": "arcflow.storage.writer",
    "DatasetWriter": "arcflow.storage.writer",
    "open_dataset": "arcflow.storage.reader",
    "TrajectoryReader": "arcflow.storage.reader",
    "TrajectoryStream": "arcflow.storage.streaming",
    "verify_dataset": "arcflow.storage.verify",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'arcflow.storage' has no attribute {name!r}")
