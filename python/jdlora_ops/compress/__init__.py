"""Joint compression of LoRA collections (pure PyTorch; same code on CPU and GPU).

* :func:`compress`: clustered JD-Full / JD-Diag of a whole collection,
  streamed module by module (also dispatches to the baselines).
* :func:`jd_full`, :func:`jd_diag`: one module, one cluster.
* :func:`compress_svd`, :func:`compress_none`, :func:`truncated_svd`: baselines.
* :func:`project_adapters`: add adapters to a compressed collection.
* :func:`apply_error_budget`: keep adapters the joint tables fit worse than a
  budget as their own truncated SVD or factors (:class:`IndividualAdapter`).
* :func:`search_partition`, :func:`subspace_affinities`: how the clusters are
  found; :func:`choose_num_clusters`: ``num_clusters="auto"``.
* :func:`compress_to_store`: the whole pipeline from a collection to a store
  (read, calibrate, partition and fit, allocate, write; :mod:`.pipeline`), on
  one process or several (``torch.distributed``, :mod:`.distributed`), module
  by module, bitwise equal results.
* :class:`AdapterCollection` and its implementations produce a module's
  factors on demand (:class:`ModuleFactors`).
"""

from .baselines import compress_none, compress_svd, truncated_svd
from .cluster_count import choose_num_clusters
from .clustering import adapter_signatures, compress
from .error_budget import apply_error_budget, check_budget
from .partition_search import kmeans, search_partition, subspace_affinities
from .collection import (
    AdapterCollection,
    CallableCollection,
    InMemoryCollection,
    ModuleFactors,
    ModuleSpec,
    RankGroup,
    parse_module_name,
    resolve_weights,
)
from .jd import JDResult, diag_solve, full_sigma, jd_diag, jd_full
from .projection import ClusterEvaluation, evaluate_clusters, project_adapters
from .pipeline import compress_to_store
from .result import METHODS, CompressedCollection, CompressedModule, IndividualAdapter, ProjectionReport

__all__ = [
    "AdapterCollection",
    "IndividualAdapter",
    "apply_error_budget",
    "check_budget",
    "choose_num_clusters",
    "search_partition",
    "subspace_affinities",
    "CallableCollection",
    "ClusterEvaluation",
    "CompressedCollection",
    "CompressedModule",
    "InMemoryCollection",
    "JDResult",
    "METHODS",
    "ModuleFactors",
    "ModuleSpec",
    "ProjectionReport",
    "RankGroup",
    "adapter_signatures",
    "compress",
    "compress_to_store",
    "compress_none",
    "compress_svd",
    "diag_solve",
    "evaluate_clusters",
    "full_sigma",
    "jd_diag",
    "jd_full",
    "kmeans",
    "parse_module_name",
    "project_adapters",
    "resolve_weights",
    "truncated_svd",
]
