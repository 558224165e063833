from .mixture import MixtureBatches, TrainingData
from .shards import Manifest, SampleOrder, ShardError, ShardReader, TokenBatches

__all__ = ["Manifest", "MixtureBatches", "SampleOrder", "ShardError", "ShardReader", "TokenBatches", "TrainingData"]
