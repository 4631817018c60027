"""Memory-based certification (see docs/method.md, "The memory"): rule, store, classifier.

  * `apply_memory` / `memory_rule`: the pure rule, in query order;
  * `MemoryIndex`: the memory in RAM with a pre-filtered candidate search;
  * `MemoryStore`: the memory persisted in SQLite, safe across processes;
  * `MemoryClassifier`: certify each query, then answer through the store.
"""

from dds_jax.memory.classifier import MemoryClassifier, MemoryPrediction
from dds_jax.memory.rule import (ABSTAIN, CLEARANCE, MemoryIndex,
                                 MemoryInvariantError, apply_memory,
                                 check_certificates, exact_distances,
                                 memory_rule, overlaps)
from dds_jax.memory.store import (SCHEMA_VERSION, BatchInsertResult,
                                  InsertResult, MemoryMismatchError,
                                  MemoryStore, MemoryStoreError, default_path,
                                  filesystem_type)

__all__ = [
    "ABSTAIN", "CLEARANCE", "SCHEMA_VERSION", "BatchInsertResult",
    "InsertResult", "MemoryClassifier", "MemoryIndex", "MemoryInvariantError",
    "MemoryMismatchError", "MemoryPrediction", "MemoryStore",
    "MemoryStoreError", "apply_memory", "check_certificates",
    "default_path", "exact_distances", "filesystem_type", "memory_rule",
    "overlaps",
]
