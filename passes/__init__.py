"""Graph -> graph rewrites: fusion, quantization, sharding, cleanup; the pipeline (owner: passes).

    graph, params = compile_model(graph, params, quantization="fp8", kv_cache_dtype="fp8")
"""

from kiln.passes import ops  # noqa: F401  (registers the fused and quantized ops)
from kiln.passes.pipeline import (Pass, PassContext, PipelineOptions, build_passes, check_params, compile_model,
                                  matmuls_per_layer, run_pipeline)
from kiln.passes.rewrite import Pat, Rule, WeightTransform, apply_rules, cse, dce

__all__ = ["Pass", "PassContext", "PipelineOptions", "build_passes", "check_params", "compile_model",
           "matmuls_per_layer", "run_pipeline", "Pat", "Rule", "WeightTransform", "apply_rules", "cse", "dce"]
