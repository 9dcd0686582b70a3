"""breadcrumbs_jax: Model Breadcrumbs and baseline model merging over JAX PyTrees."""

from .band import Band
from .errors import MergeError
from .merge import MergeResult, dry_run, merge, merge_leaf, merge_leaves, plan_for
from .methods import (
    METHODS,
    Method,
    breadcrumbs,
    breadcrumbs_ties,
    chain,
    dare,
    get_method,
    linear,
    task_arithmetic,
    ties,
)
from .plan import LeafPlan, LeafRule, format_plan, plan_leaf
from .report import LeafReport, MergeReport
from .steps import Combine, ElectSign, LeafContext, LeafState, MagnitudeBand, NumberedStep, RandomDrop, Scale, Weight
from .task_vectors import apply_task_vector, task_vector

__version__ = "0.1.0"

__all__ = [
    "Band", "MergeError", "MergeResult", "dry_run", "merge", "merge_leaf", "merge_leaves", "plan_for",
    "METHODS", "Method", "breadcrumbs", "breadcrumbs_ties", "chain", "dare", "get_method", "linear",
    "task_arithmetic", "ties", "LeafPlan", "LeafRule", "format_plan", "plan_leaf", "LeafReport",
    "MergeReport", "Combine", "ElectSign", "LeafContext", "LeafState", "MagnitudeBand", "NumberedStep",
    "RandomDrop", "Scale", "Weight", "apply_task_vector", "task_vector",
]
