"""`kiln bench` runs each mode end to end and reports consistent numbers."""

import json

import numpy as np

import pytest

from kiln.cli import main


@pytest.mark.parametrize("mode,extra", [("throughput", []), ("latency", []),
                                        ("serving", ["--request-rate", "50,inf"])])
def test_bench_modes_report(ckpt, tmp_path, mode, extra, capsys):
    out = tmp_path / "r.json"
    code = main(["bench", str(ckpt), "--mode", mode, "--num-requests", "6", "--isl", "8", "--osl", "5",
                 "--isl-spread", "0.5", "--dtype", "float32", "--num-kv-blocks", "64", "--max-num-seqs", "4",
                 "--max-model-len", "64", "--output", str(out)] + extra)
    assert code == 0
    rep = json.loads(out.read_text())
    r = rep["results"]
    assert r["requests"] == 6 and r["output_tokens"] == 30
    assert r["output_tokens_per_s"] == pytest.approx(r["output_tokens"] / r["duration_s"])
    assert r["ttft_ms_p50"] <= r["ttft_ms_p99"] and r["itl_ms_p50"] > 0
    assert rep["roofline"]["roofline_output_tokens_per_s"] > 0 and rep["kv_blocks"] == 64
    et = rep["engine_time"]  # the timed run's steps only (the warm-up's are not counted)
    assert 0 < et["steps"] and et["host_s"] + et["device_wait_s"] == pytest.approx(et["step_s"])
    assert et["step_s"] <= sum(c["duration_s"] for c in rep.get("curve", [r])) * 1.05
    if mode == "serving":
        assert [c["request_rate"] for c in rep["curve"]] == [50.0, float("inf")]
    assert "output_tokens_per_s" in capsys.readouterr().out


def test_bench_bad_dataset_is_one_line(tmp_path, ckpt, capsys):
    bad = tmp_path / "d.jsonl"
    bad.write_text('{"prompt": "hi"}\n{"nope": 1}\n')
    code = main(["bench", str(ckpt), "--dataset", str(bad), "--dtype", "float32", "--num-kv-blocks", "16"])
    assert code == 2 and "d.jsonl:2" in capsys.readouterr().err


def test_warmup_leaves_no_token_bucket_to_compile(ckpt):
    """After `precompile_seen` (what the bench warm-up ends with) a run whose steps take other
    token buckets than the warm-up's compiles nothing: no compile inside the timed run."""
    from kiln import LLM, SamplingParams

    llm = LLM(str(ckpt), dtype="float32", num_kv_blocks=64, max_num_seqs=4, max_num_tokens=64, max_model_len=64,
              attention="reference")
    llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2, temperature=0), use_tqdm=False)
    seen = set(llm.runner._executables)
    n = llm.runner.precompile_seen()
    assert n == len(set(llm.runner._executables) - seen) > 0
    assert sorted({k[0] for k in llm.runner._executables}) == [1, 16, 32, 64]   # 1: batch-1 decode
    compiles = []
    orig = llm.runner._lower_compile
    llm.runner._lower_compile = lambda b: compiles.append(b.shape_key) or orig(b)
    prompts = [[3 + i] * (9 + 4 * i) for i in range(4)]  # 54 prompt tokens in one step, then 4..1 decoding (1: its own bucket)
    out = llm.generate(prompts, [SamplingParams(max_tokens=2 + i, temperature=0) for i in range(4)], use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in out] == [2, 3, 4, 5] and compiles == []


def test_latency_warmup_covers_the_timed_run(ckpt):
    """Latency mode warms up with one fresh prompt per distinct prompt length, run alone: the
    timed run then compiles nothing (its prefills miss the prefix cache as the warm-up's did, its
    longest context reaches the widest block table), where one warm-up request would not."""
    from kiln import LLM
    from kiln.runtime import bench

    def engine():
        return LLM(str(ckpt), dtype="float32", num_kv_blocks=64, max_num_seqs=4, max_num_tokens=64,
                   max_model_len=128, attention="reference")

    def compiles_in(llm, reqs):
        seen, orig = [], llm.runner._lower_compile
        llm.runner._lower_compile = lambda b: seen.append(b.shape_key) or orig(b)
        res = bench.run_latency(llm, reqs)
        assert res["requests"] == len(reqs)
        return seen

    rng = np.random.default_rng(0)
    reqs = [bench.BenchRequest(rng.integers(100, 200, n).tolist(), out) for n, out in ((12, 3), (30, 3), (60, 40))]
    llm = engine()
    alone = bench.latency_warmup(llm, reqs, seed=2)
    assert sorted((len(r.prompt), r.max_tokens) for r in alone) == [(12, 3), (30, 3), (60, 40)]
    assert all(a.prompt != r.prompt for a in alone for r in reqs)
    bench.run_latency(llm, alone)
    assert compiles_in(llm, reqs) == []
    naive = engine()   # the control: one short warm-up request leaves steps to compile in the timed run
    bench.run_latency(naive, bench.synthetic_requests(1, 12, 3, naive.config.vocab_size, seed=1))
    assert compiles_in(naive, reqs) != []
    assert bench.latency_warmup(llm, reqs, seed=2, most=2) is None
