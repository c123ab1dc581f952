"""`kiln build`: engine directories that load without passes or recompiles, and refuse to
load when anything about them is off."""

import json
import subprocess
import sys

import pytest

from kiln import LLM, SamplingParams
from kiln.cli import main
from kiln.errors import KilnError
from kiln.runtime.engine_dir import EngineError
from tests.helpers import make_hf_checkpoint

PROMPTS = [[5, 17, 42, 99, 3], [250, 11, 7]]
SP = SamplingParams(max_tokens=10, temperature=0)
ENGINE_ARGS = ["--dtype", "float32", "--num-kv-blocks", "48", "--max-num-seqs", "4", "--max-num-tokens", "32",
               "--max-model-len", "128", "--attention", "reference"]
OPTS = ["--compiler-option", "xla_gpu_enable_triton_gemm=false"]  # a GPU option: in the cache key on the CPU too


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("build_src")
    make_hf_checkpoint("qwen2", ckpt)
    engine = tmp_path_factory.mktemp("engines") / "qwen2-engine"
    assert main(["build", str(ckpt), "-o", str(engine)] + ENGINE_ARGS + OPTS) == 0
    return ckpt, engine


def _tokens(llm):
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, SP, use_tqdm=False)]


def test_engine_dir_layout_and_same_outputs(built):
    ckpt, engine = built
    assert {p.name for p in engine.iterdir()} >= {"engine.json", "graph.json", "weights", "tokenizer", "compiled"}
    m = json.loads((engine / "engine.json").read_text())
    assert m["build"]["passes"] and m["environment"]["jax"] and m["mesh"] == {"tp": 1, "pp": 1}
    assert m["build"]["compiler_options"] == {"xla_gpu_enable_triton_gemm": False}
    assert any((engine / "compiled").iterdir())
    ref = LLM(str(ckpt), dtype="float32", num_kv_blocks=48, max_num_seqs=4, max_num_tokens=32, max_model_len=128,
              attention="reference")
    eng = LLM(str(engine))
    assert eng.passes_run == ref.passes_run and eng.runner.num_blocks == 48
    assert _tokens(eng) == _tokens(ref)
    assert eng.tokenizer.encode("the quick brown fox") == ref.tokenizer.encode("the quick brown fox")


_COUNT = """
import sys, jax
from jax import monitoring
misses = []
monitoring.register_event_listener(lambda name, **kw: misses.append(name) if name == "/jax/compilation_cache/cache_misses" else None)
from kiln import LLM, SamplingParams
llm = LLM(sys.argv[1])
out = llm.generate(%r, SamplingParams(max_tokens=10, temperature=0), use_tqdm=False)
print("MISSES", len(misses), [o.outputs[0].token_ids for o in out])
""" % (PROMPTS,)


def test_fresh_process_compiles_nothing(built):
    _, engine = built
    r = subprocess.run([sys.executable, "-c", _COUNT, str(engine)], capture_output=True, text=True, timeout=600)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("MISSES")]
    assert line, r.stderr[-2000:]
    assert line[0].startswith("MISSES 0 "), line[0]


def _cli_error(capsys, engine):
    code = main(["generate", str(engine), "--prompt", "hi", "--max-tokens", "2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0, err
    return err


def _copy(built, tmp_path):
    import shutil

    dst = tmp_path / "engine"
    shutil.copytree(built[1], dst)
    return dst


def test_missing_and_edited_manifest(built, tmp_path, capsys):
    engine = _copy(built, tmp_path)
    m = json.loads((engine / "engine.json").read_text())
    m["model_config"]["hidden_size"] = 128
    (engine / "engine.json").write_text(json.dumps(m))
    assert "edited after the build" in _cli_error(capsys, engine)
    (engine / "engine.json").unlink()
    assert "engine.json" in _cli_error(capsys, engine) or "config.json" in _cli_error(capsys, engine)


def test_version_mismatch_names_what_differs(built, tmp_path, capsys):
    from kiln.runtime.engine_dir import _checksum

    engine = _copy(built, tmp_path)
    m = json.loads((engine / "engine.json").read_text())
    m["environment"]["jax"] = "0.0.1"
    m["checksum"] = _checksum(m)
    (engine / "engine.json").write_text(json.dumps(m))
    err = _cli_error(capsys, engine)
    assert "jax '0.0.1'" in err and "rebuild with: kiln build" in err


def test_truncated_weights(built, tmp_path, capsys):
    engine = _copy(built, tmp_path)
    files = sorted((p for p in (engine / "weights").rglob("*") if p.is_file()), key=lambda p: -p.stat().st_size)
    big = files[0]
    big.write_bytes(big.read_bytes()[: big.stat().st_size // 3])
    assert "weights" in _cli_error(capsys, engine)
    with pytest.raises(KilnError):
        LLM(str(engine))


def test_killed_build_leaves_nothing_that_loads(tmp_path, monkeypatch, built):
    from kiln.runtime import engine_dir

    def boom(self, tokenizer):
        raise KeyboardInterrupt  # as if killed half way

    monkeypatch.setattr(engine_dir.EngineWriter, "save_tokenizer", boom)
    out = tmp_path / "half"
    with pytest.raises(KeyboardInterrupt):
        main(["build", str(built[0]), "-o", str(out)] + ENGINE_ARGS)
    assert not out.exists() and not list(tmp_path.glob(".half.partial*"))
    with pytest.raises(EngineError):
        from kiln.runtime.engine_dir import read_manifest

        read_manifest(out)


def test_build_buckets_and_compiler_options(built):
    """A build compiles the decode buckets (the 1-token one of batch-1 decode, then up to
    max_num_seqs tokens) and the largest; an option this XLA does not know is dropped, not fatal."""
    eng = LLM(str(built[1]))
    r = eng.runner
    assert r.compiler_options == {"xla_gpu_enable_triton_gemm": False}
    for fut in list(r._pending.values()):  # the engine's background preload reads these limits: let it finish
        fut.result()
    seqs, tokens = r.max_num_seqs, r.max_num_tokens
    r.max_num_seqs, r.max_num_tokens = 20, 256
    assert [len(b.inputs["token_ids"]) for b in r.build_batches()] == [1, 16, 32, 256]
    assert [len(b.inputs["token_ids"]) for b in r._warmup_batches()] == [1, 16, 32, 64, 128, 256]
    r.max_num_seqs, r.max_num_tokens = seqs, tokens
    r.set_compiler_options({"xla_no_such_option_here": 1})
    assert r.compiler_options == {}
    assert _tokens(eng) == _tokens(LLM(str(built[1])))


def test_failed_build_leaves_nothing(built, tmp_path, monkeypatch):
    """A build that fails while its weights are still being written in the background leaves
    neither the engine directory nor its partial one behind."""
    from kiln.runtime.runner import Runner

    ckpt, _ = built

    def boom(self, *a, **k):
        raise RuntimeError("compile failed")

    monkeypatch.setattr(Runner, "precompile", boom)
    out = tmp_path / "never"
    with pytest.raises(RuntimeError, match="compile failed"):
        main(["build", str(ckpt), "-o", str(out)] + ENGINE_ARGS)
    assert list(tmp_path.iterdir()) == []


def test_parallel_restore_equals_one_restore(built):
    """The weights restored in several partial restores (threads) are the one restore's, bit for
    bit, and every parameter is there exactly once."""
    import numpy as np

    from kiln.runtime.engine_dir import _balanced_parts, read_manifest, restore_weights

    engine = built[1]
    manifest = read_manifest(engine)
    sizes = {k: int(np.prod(shape)) * np.dtype(dtype).itemsize for k, (shape, dtype) in manifest["params"].items()}
    parts = _balanced_parts(sizes, 3)
    assert len(parts) == 3 and sorted(sum(parts, [])) == sorted(manifest["params"])
    one, three = restore_weights(engine, manifest, threads=1), restore_weights(engine, manifest, threads=3)
    assert one.keys() == three.keys() == manifest["params"].keys()
    for k in one:
        np.testing.assert_array_equal(np.asarray(one[k]), np.asarray(three[k]))


def test_default_save_parts(monkeypatch):
    """Without KILN_SAVE_PART_GB a model of 2 GB a part or more is saved in as many parts of
    about equal bytes as the restore runs threads; a smaller one in one checkpoint; `=0` forces one."""
    from kiln.runtime.engine_dir import _save_parts

    monkeypatch.delenv("KILN_SAVE_PART_GB", raising=False)
    monkeypatch.delenv("KILN_RESTORE_THREADS", raising=False)
    gb = 10**9
    big = {f"layer{i}.w": gb // 2 for i in range(32)} | {"embed": gb}  # 17 GB
    parts = _save_parts(big)
    assert len(parts) == 4 and sorted(sum(parts, [])) == sorted(big)
    assert max(sum(big[n] for n in p) for p in parts) <= 4.5 * gb
    assert _save_parts({"w": 3 * gb}) is None and _save_parts({"a": 3 * gb, "b": 2 * gb}) == [["a"], ["b"]]
    monkeypatch.setenv("KILN_RESTORE_THREADS", "8")
    assert len(_save_parts(big)) == 8
    monkeypatch.setenv("KILN_SAVE_PART_GB", "0")
    assert _save_parts(big) is None
    monkeypatch.setenv("KILN_SAVE_PART_GB", "5")
    assert len(_save_parts(big)) == 4  # runs of <= 5 GB in order: 10 + 10 + 10 halves, then 2 + embed


def test_weights_saved_in_parts(built, tmp_path, monkeypatch, capsys):
    """KILN_SAVE_PART_GB: the weights go to one checkpoint per part (the host holds one part at a
    time while saving); the engine restores them bit for bit as the one-checkpoint engine does,
    generates the same tokens, and a truncated part is refused like a truncated checkpoint."""
    import numpy as np

    from kiln.runtime.engine_dir import read_manifest, restore_weights

    ckpt, one = built
    monkeypatch.setenv("KILN_SAVE_PART_GB", "0.00005")  # 50 kB parts of the tiny model
    engine = tmp_path / "parts-engine"
    assert main(["build", str(ckpt), "-o", str(engine)] + ENGINE_ARGS + OPTS) == 0
    assert "parts of <= 0.0 GB" in capsys.readouterr().err
    m = read_manifest(engine)
    parts = m["weight_parts"]
    assert len(parts) > 2 and sorted(sum(parts, [])) == sorted(m["params"])
    assert sorted(p.name for p in (engine / "weights").iterdir()) == [f"part-{i:03d}" for i in range(len(parts))]
    a, b = restore_weights(one, read_manifest(one)), restore_weights(engine, m, threads=3)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))
    assert _tokens(LLM(str(engine))) == _tokens(LLM(str(one)))
    files = sorted((p for p in (engine / "weights" / "part-001").rglob("*") if p.is_file()), key=lambda p: -p.stat().st_size)
    files[0].write_bytes(files[0].read_bytes()[: files[0].stat().st_size // 3])
    capsys.readouterr()  # the loads' log lines above
    assert "weights" in _cli_error(capsys, engine)


def test_small_step_options(built, monkeypatch):
    """Batch-1-sized token buckets (<= 16 tokens) compile with their own options where given
    (Kiln's GPU rule: XLA's Triton GEMMs there, cuBLAS above), same tokens; equal options
    collapse to one; a build records them and an engine loads them; an older engine.json
    without the field loads with none."""
    from kiln.runtime import runner as runner_mod
    from kiln.runtime.engine_dir import BuildConfig

    eng = LLM(str(built[1]))
    r = eng.runner
    ref = _tokens(eng)
    r.set_compiler_options({"xla_cpu_enable_fast_math": False}, {})
    assert r.small_step_options == {} and r._fn_small is not None
    small, big = [b for b in r._warmup_batches() if len(b.inputs["token_ids"]) in (16, 32)][:2]
    assert r._fn_for(small) is r._fn_small and r._fn_for(big) is r._fn
    assert _tokens(eng) == ref
    r.set_compiler_options({"xla_cpu_enable_fast_math": False}, {"xla_cpu_enable_fast_math": False})
    assert r.small_step_options is None and r._fn_small is None
    assert BuildConfig.from_json({"dtype": "float32"}).small_step_compiler_options is None
    # the default rule on a GPU: cuBLAS for every bucket, Triton GEMMs for the small ones
    monkeypatch.setattr(runner_mod.jax, "default_backend", lambda: "gpu")
    assert runner_mod.default_compiler_options(None) == {"xla_gpu_enable_triton_gemm": False}
    assert runner_mod.default_small_step_options(None) == {} and runner_mod.default_small_step_options("fp8") is None


def test_build_records_small_step_options(tmp_path, monkeypatch):
    """`kiln build` with the default rule stores the small buckets' options beside the others,
    and the engine loads with both."""
    from kiln.runtime import llm as llm_mod
    from kiln.runtime.build import build
    from kiln.runtime.engine_dir import BuildConfig
    from tests.helpers import make_hf_checkpoint

    monkeypatch.setattr(llm_mod, "default_small_step_options", lambda q: {"xla_cpu_enable_fast_math": False})
    ckpt = tmp_path / "ckpt"
    make_hf_checkpoint("llama", ckpt)
    bc = BuildConfig(dtype="float32", num_kv_blocks=32, max_num_seqs=2, max_num_tokens=32, max_model_len=64,
                     attention="reference", autotune_budget_s=None)
    out = build(str(ckpt), tmp_path / "eng", bc, log=lambda m: None)
    m = json.loads((out / "engine.json").read_text())
    assert m["build"]["small_step_compiler_options"] == {"xla_cpu_enable_fast_math": False}
    eng = LLM(str(out))
    assert eng.runner.small_step_options == {"xla_cpu_enable_fast_math": False}
