"""Mixture of experts: the `moe` op's grouped (ragged_dot) path against a dense reference and a
plain loop; the MoE families' stacked expert weights and dense-path agreement (their parity with
transformers: test_families.py)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kiln.graph.ops_extra import moe_dense, moe_grouped, route
from tests.models.arch_helpers import prompts


def _loop_reference(x, logits, wg, wu, wd, k, norm):
    """Token by token, expert by expert, in float64 numpy."""
    x, logits, wg, wu, wd = (np.asarray(a, np.float64) for a in (x, logits, wg, wu, wd))
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        p = np.exp(logits[t] - logits[t].max())
        p /= p.sum()
        top = np.argsort(-p)[:k]
        w = p[top] / (p[top].sum() if norm else 1.0)
        for e, we in zip(top, w):
            g = x[t] @ wg[e]
            out[t] += we * ((g / (1 + np.exp(-g))) * (x[t] @ wu[e])) @ wd[e]
    return out


@pytest.mark.parametrize("norm", [True, False])
def test_grouped_equals_dense_and_loop(norm):
    t, e, f, n_exp, k = 13, 16, 24, 6, 2
    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    x = jax.random.normal(keys[0], (t, e))
    logits = jax.random.normal(keys[1], (t, n_exp)).at[:, 4].set(-1e9)  # expert 4 gets no token: an empty group
    wg, wu = (jax.random.normal(kk, (n_exp, e, f)) * 0.3 for kk in keys[2:4])
    wd = jax.random.normal(keys[4], (n_exp, f, e)) * 0.3
    weights, experts = route(logits, k, norm)
    grouped = jax.jit(moe_grouped)(x, weights, experts, wg, wu, wd)
    dense = jax.jit(moe_dense)(x, weights, experts, wg, wu, wd)
    ref = _loop_reference(x, logits, wg, wu, wd, k, norm)
    np.testing.assert_allclose(np.asarray(grouped), ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(dense), ref, rtol=1e-4, atol=1e-4)


def test_grouped_path_runs_one_ragged_dot_per_matrix():
    """The grouped lowering multiplies T*k rows, not T*experts: three ragged_dots, no dense einsum over experts."""
    t, e, f, n_exp, k = 8, 16, 24, 4, 2
    w = jnp.zeros((n_exp, e, f))
    jaxpr = jax.make_jaxpr(moe_grouped)(jnp.zeros((t, e)), jnp.ones((t, k)), jnp.zeros((t, k), jnp.int32),
                                        w, w, jnp.zeros((n_exp, f, e)))
    dots = [eq for eq in jaxpr.jaxpr.eqns if "dot" in eq.primitive.name]
    assert [d.primitive.name for d in dots].count("ragged_dot_general") == 3
    for d in dots:
        if d.primitive.name == "ragged_dot_general":
            assert d.invars[0].aval.shape[0] == t * k


@pytest.fixture(params=["mixtral", "qwen2_moe", "qwen3_moe"])
def fam(request, family):
    return family(request.param)


def test_expert_weights_are_stacked_on_an_experts_axis(fam):
    moe_params = [p for name, p in fam.graph.params.items() if ".experts." in name]
    assert moe_params and all(p.type.axes[0] == "experts" and p.type.shape[0] == 4 for p in moe_params)
    if fam.config.architecture == "Qwen2MoeForCausalLM":  # layer 1 is in mlp_only_layers: a dense MLP
        assert "layers.1.gate_proj.w" in fam.graph.params and "layers.1.experts.gate.w" not in fam.graph.params
        assert "layers.0.shared_expert.gate.w" in fam.graph.params


def test_dense_reference_graph_agrees(fam):
    """The same graph with every moe node on the dense all-experts path gives the same logits."""
    nodes = [dataclasses.replace(n, attrs={**n.attrs, "impl": "dense"}) if n.op == "moe" else n for n in fam.graph.nodes]
    dense = dataclasses.replace(fam.graph, nodes=nodes)
    ps = prompts((5, 21), seed=5)
    for a, b in zip(fam.batch_logits(ps), fam.batch_logits(ps, fam.stepper(dense))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_expert_parallel_never_gathers_expert_weights(family):
    """Under EP_RULES each device keeps its own experts: the partitioned step all-gathers only
    the experts' group sizes and the final logits, never an expert matrix."""
    import re

    from kiln.passes.sharding import EP_RULES, shard_model
    from kiln.runtime.batch import SeqChunk, prepare_inputs

    fam = family("mixtral")
    model = shard_model(fam.graph, dict(fam.params), tp=2, rules=EP_RULES)
    assert model.params["layers.0.experts.gate.w"].sharding.shard_shape((4, 64, 128)) == (2, 64, 128)
    inputs, _ = prepare_inputs([SeqChunk([1, 2, 3], 0, list(range(16)))], 4, pad_tokens=16, pad_seqs=2,
                               pad_blocks=16, pad_logits=2)
    hlo = model.lower_text(model.params, model.allocate_kv_cache(64, 4, "float32"), inputs)
    gathered = re.findall(r"= (\w+)\[([\d,]*)\]\S* all-gather\(", hlo)
    assert gathered and all(dt == "s32" or dims == "2,320" for dt, dims in gathered), gathered


def test_fp8_keeps_the_router_in_float(family):
    """Quantization leaves MoE routers in float (a rounded router logit flips the top-k
    choice): the fp8 model's logits stay close to the float model's."""
    from kiln.passes import compile_model

    fam = family("mixtral")
    graph, params = compile_model(fam.graph, dict(fam.params), quantization="fp8")
    assert str(params["layers.0.router.w"].dtype) == "float32"
    assert any("float8" in str(v.dtype) for v in params.values())
    ps = prompts((7, 12), seed=8)
    for a, b in zip(fam.batch_logits(ps), fam.batch_logits(ps, fam.stepper(graph, params))):
        assert np.max(np.abs(a - b)) / np.max(np.abs(a)) < 0.1
