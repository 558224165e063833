from .shards import Manifest, SampleOrder, ShardError, ShardReader, TokenBatches

__all__ = ["Manifest", "SampleOrder", "ShardError", "ShardReader", "TokenBatches"]
