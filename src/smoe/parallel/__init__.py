"""Expert parallelism on torch.distributed, applied after the model is built.

``placement`` decides which rank holds which experts (with redundant replicas, from measured
loads); ``expert_parallel`` swaps each MoE layer's dispatcher for an all-to-all one and keeps on
each rank only its experts. Nothing in ``smoe.nn`` or ``smoe.model`` knows about either.
"""

from smoe.parallel.placement import (Placement, PlacementStats, placement_stats, plan_placement,
                                     replica_counts, tokens_per_rank)

__all__ = ["Placement", "PlacementStats", "placement_stats", "plan_placement", "replica_counts",
           "tokens_per_rank"]
