"""The reader's public interface: everything outside `pipelines/data/read/` imports from here.

    from pipelines.data.read import ReaderConfig, ReadStats, read_shards, to_torch_batches
"""

from pipelines.data.read.config import ReaderConfig, bytes_per_sample
from pipelines.data.read.reader import TorchCollate, configure_context, read_shards, to_torch_batches
from pipelines.data.read.sources import Shard, load_index, resolve_shards
from pipelines.data.read.stats import ReaderError, ReadStats

__all__ = ["ReaderConfig", "ReaderError", "ReadStats", "Shard", "TorchCollate", "bytes_per_sample",
           "configure_context", "load_index", "read_shards", "resolve_shards", "to_torch_batches"]
