"""The build-time autotune of the quantized matmuls: its table goes into the engine directory,
`LLM(ENGINE_DIR)` follows it (the kernel where it says so, with the same greedy tokens as XLA),
`KILN_QMATMUL` overrides it, `--no-autotune` writes none, and a damaged one refuses to load.
On the CPU the kernel is never a real candidate, so the kernel is forced in (interpret mode)
with a timer that makes it the fastest at 16 tokens."""

import dataclasses
import json
import shutil

import pytest

from kiln import LLM, SamplingParams
from kiln.cli import main
from kiln.runtime import autotune
from kiln.runtime.engine_dir import EngineError
from kiln.runtime.kernels import quant_matmul as qm

PROMPTS = [[5, 17, 42, 99, 3], [250, 11, 7]]
SP = SamplingParams(max_tokens=6, temperature=0)
ENGINE_ARGS = ["--dtype", "float32", "--num-kv-blocks", "32", "--max-num-seqs", "2", "--max-num-tokens", "32",
               "--max-model-len", "64", "--attention", "reference"]


def kernel_wins_at_16(fn, args, *, impl, config):
    """A fake timer: the kernel (block_n 64 configs fastest) beats XLA at 16 tokens, loses above."""
    m = args[0].shape[0]
    if impl == "xla":
        return 1.0
    return (0.5 if config.block_n == 64 else 0.7) if m == 16 else 2.0


@pytest.fixture(autouse=True)
def _static_rule_after():
    yield
    qm.set_tuned_table(None)  # the table is process-wide: leave the static rule to other tests


@pytest.fixture(scope="module")
def engines(ckpt, tmp_path_factory):
    """An int8 engine tuned with the forced kernel, and an int4 engine built with --no-autotune."""
    root = tmp_path_factory.mktemp("autotune")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(autotune, "default_kernel_impl", lambda dtype: "interpret")
        mp.setattr(autotune, "time_call", kernel_wins_at_16)
        assert main(["build", str(ckpt), "-o", str(root / "int8"), "--quant", "int8_wo"] + ENGINE_ARGS) == 0
    assert main(["build", str(ckpt), "-o", str(root / "int4"), "--quant", "int4_wo", "--no-autotune"]
                + ENGINE_ARGS) == 0
    qm.set_tuned_table(None)
    return root / "int8", root / "int4"


def _run(engine, monkeypatch):
    """Greedy tokens of the engine, and the kernel calls made while its steps were traced."""
    calls = []
    kernel = qm.quant_matmul_pallas
    monkeypatch.setattr(qm, "quant_matmul_pallas", lambda *a, **kw: calls.append((a, kw)) or kernel(*a, **kw))
    llm = LLM(str(engine), log=None)
    toks = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, SP, use_tqdm=False)]
    return toks, calls


def test_table_round_trips_through_the_engine_dir(engines):
    engine, _ = engines
    manifest = json.loads((engine / "engine.json").read_text())
    assert set(manifest["files"]) == {"autotune.json"} and manifest["build"]["autotune_budget_s"] == 20.0
    saved = json.loads((engine / "autotune.json").read_text())
    table = autotune.load(engine, manifest)
    assert len(table) == len(saved["entries"]) > 0
    # 4 projection shapes (qkv, o, gate_up, down) x the buckets 1 (batch-1 decode), 16 and 32, each as timed
    shapes = {k[:5] for k in table}
    assert len(shapes) == 4 and {k[5] for k in table} == {1, 16, 32} and {k[6] for k in table} == {"float32"}
    for key, (impl, cfg) in table.items():
        if key[5] == 16:
            assert impl == "interpret" and cfg.block_n == 64, (key, impl, cfg)
        else:
            assert impl == "xla" and cfg is None
    entry = saved["entries"][0]
    assert entry["us"]["xla"] == 1e6 and len(entry["us"]) > 2  # XLA and several kernel configs timed


def test_engine_follows_the_table_and_matches_xla(engines, monkeypatch):
    engine, _ = engines
    toks, calls = _run(engine, monkeypatch)
    # every step of these prompts is in the 16-token bucket: each of the 4 projection shapes of its
    # trace went through the kernel, with the table's config
    assert all(kw["interpret"] and kw["config"].block_n == 64 for _, kw in calls)
    assert {(a[0].shape[0], a[1].shape) for a, _ in calls} == {(16, (64, 128)), (16, (64, 64)), (16, (64, 256)),
                                                               (16, (128, 64))}
    monkeypatch.setenv("KILN_QMATMUL", "xla")  # overrides the table
    want, xla_calls = _run(engine, monkeypatch)
    assert xla_calls == [] and toks == want


def test_no_autotune_keeps_the_static_rule(engines, monkeypatch):
    _, engine = engines
    assert not (engine / "autotune.json").exists()
    manifest = json.loads((engine / "engine.json").read_text())
    assert "files" not in manifest and manifest["build"]["autotune_budget_s"] is None
    qm.set_tuned_table({("int4_wo", 64, 64, 64, "kn", 16, "float32"): ("interpret", None)})  # a stale table
    toks, calls = _run(engine, monkeypatch)
    assert calls == [] and qm._TUNED_TABLE == {} and len(toks) == 2  # the load cleared it; XLA on the CPU


def test_damaged_table_is_a_one_line_error(engines, tmp_path):
    engine, _ = engines
    copy = tmp_path / "engine"
    shutil.copytree(engine, copy)
    (copy / "autotune.json").write_text('{"version": 1, "entries": [{"mode": ')
    with pytest.raises(EngineError) as e:
        LLM(str(copy), log=None)
    msg = str(e.value)
    assert "autotune.json" in msg and "rebuild with: kiln build" in msg and "\n" not in msg
    (copy / "autotune.json").unlink()
    with pytest.raises(EngineError, match="autotune.json: missing"):
        LLM(str(copy), log=None)


def test_budget_and_candidates(ckpt):
    """Unit level: the budget stops the timing (untimed keys keep the static rule); without a
    kernel candidate (the CPU default) every key is XLA and nothing is timed."""
    from kiln.passes import compile_model
    from tests.passes.util import load_tiny

    graph, _ = compile_model(*load_tiny(ckpt), quantization="int4_wo")
    shapes = autotune.qlinear_shapes(graph)
    assert {s.mode for s in shapes} == {"int4_wo"} and {s.group for s in shapes} == {64, 128}  # K 64 / 128
    timed = []
    table = autotune.autotune(graph, "float32", [16, 32, 512], budget_s=0.0, kernel_impl="interpret",
                              timer=lambda fn, args, **c: timed.append(c) or 1.0)
    assert table == {} and timed == []
    table = autotune.autotune(graph, "float32", [16, 32, 512], kernel_impl=None,
                              timer=lambda fn, args, **c: timed.append(c) or 1.0)
    assert timed == [] and len(table) == 2 * len(shapes) and all(v["impl"] == "xla" for v in table.values())
    # a config the compiler refuses is skipped (no time), the others still compete
    first = autotune.candidates(shapes[0], 16)[0]

    def refuses_first(fn, args, *, impl, config):
        if config == first:
            raise RuntimeError("out of shared memory")
        return 1.0 if impl == "xla" else 0.5

    table = autotune.autotune(graph, "float32", [16], kernel_impl="interpret", timer=refuses_first)
    e = table[("int4_wo", shapes[0].k, shapes[0].n, shapes[0].group, "kn", 16, "float32")]
    assert e["impl"] == "interpret" and e["config"] != dataclasses.asdict(first) and None in e["us"].values()
    # a real timing round (interpret mode) picks some candidate of the key and runs it
    s = shapes[0]
    real = autotune.autotune(graph, "float32", [16], kernel_impl="interpret", budget_s=60.0,
                             timer=lambda fn, args, **c: autotune.time_call(fn, args, repeats=1, calls=1)
                             if c["impl"] == "xla" or c["config"] == autotune.candidates(s, 16)[0] else 9.0)
    key = ("int4_wo", s.k, s.n, s.group, "kn", 16, "float32")
    assert real[key]["impl"] in ("xla", "interpret") and real[key]["us"]["xla"] > 0


def test_fp8_out_major_shapes_are_tuned_and_followed(ckpt, monkeypatch):
    """fp8 weights stored [N, K] (the fp8 pipeline) are autotune keys below the W8A8 token
    count, and an fp8 W8A16 matmul (`fp8_linear`) follows the table's kernel choice for its key."""
    import jax.numpy as jnp
    import numpy as np

    from kiln.passes import compile_model
    from kiln.passes.fp8_act import fp8_linear
    from tests.passes.util import load_tiny

    graph, params = compile_model(*load_tiny(ckpt), quantization="fp8")
    shapes = autotune.qlinear_shapes(graph)
    assert shapes and {(s.mode, s.layout, s.max_m) for s in shapes} == {("fp8", "nk", 255)}
    lin = next(n for n in graph.nodes if n.op == "qlinear")
    w = params[lin.inputs[1]]
    s = next(s for s in shapes if (s.n, s.k) == (int(np.prod(w.shape[:-1])), w.shape[-1]))
    cfg = autotune.candidates(s, 16)[0]
    qm.set_tuned_table({(s.mode, s.k, s.n, None, "nk", 16, "float32"): ("interpret", cfg)})
    calls = []
    kernel = qm.quant_matmul_pallas
    monkeypatch.setattr(qm, "quant_matmul_pallas", lambda *a, **kw: calls.append(kw) or kernel(*a, **kw))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((16, s.k)), jnp.float32)
    scale = params[lin.inputs[2]]
    kw = dict(in_features=s.k, bias=False, w_layout="nk", out_dtype=None, w8a8_min_tokens=None)
    y = fp8_linear(x, w, scale, **kw)
    assert len(calls) == 1 and calls[0]["config"] == cfg and calls[0]["w_layout"] == "nk"
    want = fp8_linear(x, w, scale, **kw, impl="xla")
    assert len(calls) == 1 and float(jnp.max(jnp.abs(y - want))) <= 1e-4 * float(jnp.max(jnp.abs(want)))
