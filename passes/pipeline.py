"""The pass pipeline: a flat list of named passes, read top to bottom, verifier between them.

    verify -> cse -> dce -> fold_rope -> fuse_qkv -> fuse_gate_up -> fuse_add_norm
           -> quantize_<mode> -> kv_cache_<dtype> -> (extra passes, e.g. sharding) -> cse -> dce

A pass maps (graph, ctx) to a `RewriteResult`: the new graph and the weight transforms that
keep the parameters in step with it. `run_pipeline` applies each pass's transforms once,
right after the pass (so a later pass, e.g. AWQ calibration, sees the weights it rewrote),
then checks that every declared parameter has an array of its declared shape and dtype.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from kiln.errors import ConfigError, GraphError
from kiln.graph.ir import Graph
from kiln.graph.serialize import to_text
from kiln.graph.verify import verify
from kiln.passes import fusion
from kiln.passes.ops import MATMUL_OPS, QUANT_MODES
from kiln.passes.rewrite import RewriteResult, Rule, apply_rules, cse, dce

KV_CACHE_DTYPES = {"fp8": "float8_e4m3fn", "float8_e4m3fn": "float8_e4m3fn"}


@dataclass
class PipelineOptions:
    fuse: bool = True
    quantization: str | None = None            # fp8 | int8_wo | int4_wo
    kv_cache_dtype: str | None = None          # fp8
    calibration: Sequence[Sequence[int]] | None = None   # token-id prompts for GPTQ / AWQ
    quantize_exclude: tuple[str, ...] = ("lm_head", "router")  # weight-name prefixes or components left in float
    int4_group_size: int | None = None                   # int4_wo group (None: quantize.INT4_GROUP)
    int4_keep_int8: tuple[str, ...] = ()                 # int4_wo: weights named by these stay int8_wo
    quant_method: str | None = None                      # rtn | awq | gptq | awq+gptq (None: gptq with calibration)
    fp8_weight_nk: bool = True                           # fp8: weights [*out, in], cuBLASLt's FP8 GEMM layout
    extra_passes: list["Pass"] = field(default_factory=list)  # run after quantization (sharding ...)

    def __post_init__(self):
        if self.quantization not in (None, *QUANT_MODES):
            raise ConfigError(f"quantization {self.quantization!r} is not supported; choose one of {', '.join(QUANT_MODES)}")
        if self.kv_cache_dtype not in (None, "auto", *KV_CACHE_DTYPES):
            raise ConfigError(f"kv_cache_dtype {self.kv_cache_dtype!r} is not supported; choose auto or fp8")


@dataclass
class PassContext:
    options: PipelineOptions
    params: dict[str, Any] | None   # the weights as they stand before this pass (None: graph only)


@dataclass(frozen=True)
class Pass:
    name: str
    run: Callable[[Graph, PassContext], RewriteResult | Graph]


def rules_pass(name: str, rules: list[Rule]) -> Pass:
    return Pass(name, lambda g, ctx: apply_rules(g, rules))


def _kv_cache_pass(dtype: str) -> Pass:
    def run(g: Graph, ctx):
        g = g.copy()
        g.meta["kv_cache_dtype"] = dtype
        return g
    return Pass(f"kv_cache_{dtype}", run)


def build_passes(options: PipelineOptions) -> list[Pass]:
    passes = [Pass("cse", lambda g, ctx: cse(g)), Pass("dce", lambda g, ctx: dce(g))]
    if options.fuse:
        passes += [rules_pass("fold_rope", fusion.FOLD_ROPE),
                   rules_pass("fuse_qkv", fusion.FUSE_QKV),
                   rules_pass("fuse_gate_up", fusion.FUSE_GATE_UP),
                   rules_pass("fuse_add_norm", fusion.FUSE_ADD_NORM)]
    if options.quantization:
        from kiln.passes import quantize

        passes.append(quantize.quantize_pass(options.quantization))
        if options.quantization == "fp8":
            from kiln.passes import fp8_act

            passes += fp8_act.fp8_passes(weight_nk=options.fp8_weight_nk)
    if options.kv_cache_dtype not in (None, "auto"):
        passes.append(_kv_cache_pass(KV_CACHE_DTYPES[options.kv_cache_dtype]))
    passes += list(options.extra_passes)
    passes += [Pass("cse", lambda g, ctx: cse(g)), Pass("dce", lambda g, ctx: dce(g))]
    return passes


def _apply_transforms(result: RewriteResult, params: dict) -> dict:
    params = dict(params)
    for t in result.transforms:
        outs = t.fn(*[params[i] for i in t.inputs])
        if len(outs) != len(t.outputs):
            raise GraphError(f"weight transform for {t.outputs} returned {len(outs)} arrays")
        params.update(zip(t.outputs, outs))
    return {k: v for k, v in params.items() if k in result.graph.params}


def check_params(graph: Graph, params: dict, after: str = "") -> None:
    """Graph and weights agree: every declared parameter has an array of its shape and dtype."""
    import numpy as np

    where = f" after pass {after!r}" if after else ""
    for name, p in graph.params.items():
        if name not in params:
            raise GraphError(f"parameter {name!r} is declared but has no weights{where}")
        a = params[name]
        if tuple(a.shape) != p.type.shape or np.dtype(a.dtype).name != np.dtype(p.type.dtype).name:
            raise GraphError(f"parameter {name!r} is {a.dtype}{tuple(a.shape)} but declared {p.type}{where}")


def run_pipeline(graph: Graph, params: dict | None = None, options: PipelineOptions | None = None, *,
                 passes: list[Pass] | None = None, print_after_all: bool = False, out=None):
    """Run the passes over `graph` (and its weights, host numpy or device arrays). Returns
    (graph, params); `params` is None when none were given. The input dict is not mutated."""
    options = options or PipelineOptions()
    passes = build_passes(options) if passes is None else passes
    out = out or sys.stdout
    verify(graph)
    if params is not None:
        check_params(graph, params)
    if print_after_all:
        print(f"# ---- input ({matmul_summary(graph)})\n{to_text(graph)}", file=out)
    for p in passes:
        res = p.run(graph, PassContext(options, params))
        res = res if isinstance(res, RewriteResult) else RewriteResult(res)
        graph = verify(res.graph)
        if params is not None:
            params = _apply_transforms(res, params)
            check_params(graph, params, p.name)
        if print_after_all:
            fired = "".join(f", {k} x{v}" for k, v in res.fired.items())
            print(f"# ---- after {p.name} ({matmul_summary(graph)}{fired})\n{to_text(graph)}", file=out)
    return graph, params


def matmuls_per_layer(graph: Graph, layer: int = 0) -> int:
    pre = f"layers.{layer}."
    return sum(1 for n in graph.nodes if n.op in MATMUL_OPS and n.name.startswith(pre))


def matmul_summary(graph: Graph) -> str:
    return f"{len(graph.nodes)} nodes, {matmuls_per_layer(graph)} matmuls in layer 0"


def compile_model(graph: Graph, params: dict | None = None, *, quantization: str | None = None,
                  kv_cache_dtype: str | None = None, fuse: bool = True, calibration=None,
                  int4_group_size: int | None = None, int4_keep_int8=(), quant_method: str | None = None,
                  extra_passes: list[Pass] | None = None, print_after_all: bool = False):
    """The default pipeline in one call: what `LLM(..., quantization=, kv_cache_dtype=)` runs
    between loading and lowering. Returns (graph, params)."""
    opts = PipelineOptions(fuse=fuse, quantization=quantization, kv_cache_dtype=kv_cache_dtype,
                           calibration=calibration, int4_group_size=int4_group_size,
                           int4_keep_int8=tuple(int4_keep_int8), quant_method=quant_method, extra_passes=list(extra_passes or []))
    return run_pipeline(graph, params, opts, print_after_all=print_after_all)
