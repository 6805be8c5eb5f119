"""Emergent-brick analysis (Xiao et al. 2024, §4) of any Llama-family model, and function-aware prefetch.

`Analysis(model, out).run("sparsity" | "functions" | "partition" | "perturb" | "prefetch" | "all")`
writes JSON and PNG figures into `out`; `cfm analyze ...` is the command-line front end.
"""

from .collect import Collection, CollectOptions, collect
from .masking import MaskedMLP, masked
from .prompts import FUNCTIONS, Instance, load_instances, load_prompts
from .run import Analysis, AnalysisOptions

__all__ = ["Analysis", "AnalysisOptions", "CollectOptions", "Collection", "FUNCTIONS", "Instance", "MaskedMLP",
           "collect", "load_instances", "load_prompts", "masked"]
