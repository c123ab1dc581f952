"""The `kiln` command.

    kiln generate MODEL --prompt TEXT [--max-tokens N] [--temperature T]
    kiln graph MODEL [--format text|json]

Every error Kiln raises on purpose (`KilnError`) prints one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from kiln.errors import KilnError


def _add_model_arg(p: argparse.ArgumentParser):
    p.add_argument("model", help="a Hugging Face checkpoint directory")


def _cmd_generate(args) -> int:
    from kiln import LLM, SamplingParams

    sp = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, seed=args.seed)
    llm = LLM(args.model, dtype=args.dtype)
    out = llm.generate([args.prompt], sp)[0].outputs[0]
    print(out.text)
    return 0


def _cmd_graph(args) -> int:
    from kiln.graph import to_json, to_text
    from kiln.models.loader import open_config
    from kiln.models.registry import build_graph

    graph = build_graph(open_config(args.model), None if args.dtype == "auto" else args.dtype)
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
    g.add_argument("--max-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.set_defaults(func=_cmd_generate)

    gr = sub.add_parser("graph", help="print the model's graph")
    _add_model_arg(gr)
    gr.add_argument("--format", default="text", choices=["text", "json"])
    gr.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    gr.set_defaults(func=_cmd_graph)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KilnError as e:
        print(f"kiln: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
