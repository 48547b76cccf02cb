"""Data-parallel and sharded training.

Under DDP every rank draws the same mask from all-reduced statistics (ranks); under FSDP2 each rank draws over the
dim-0 shard rows it holds (shards) and the ranks agree on the global top-k of the keys (sharded_draw, sharded_step).
"""

from .ranks import RankSync, UnsupportedDistributedSetup, bytes_per_draw, no_sync
from .sharded_draw import gather_draw

__all__ = ["RankSync", "UnsupportedDistributedSetup", "bytes_per_draw", "gather_draw", "no_sync"]
