"""One process of a 2-process jax.distributed run (tests/passes/test_multiprocess.py on the
CPU, benchmarks/check_multiprocess.py on GPUs): joins the cluster, runs greedy decoding of the
shared prompts through sharded models spanning both processes, and writes the tokens as JSON.

    python -m tests.passes.mp_worker PROCESS_ID PORT CHECKPOINT OUT_JSON [LAYOUTS [ATTENTION [N]]]

LAYOUTS: tp x pp pairs, e.g. "4x1,2x2" (default: MP_LAYOUTS); ATTENTION: the attention impl
("reference" by default; "auto" takes the Pallas kernel on a GPU); N: tokens per prompt (3).
"""

import json
import sys

import jax

from tests.passes.sharding_cases import MP_LAYOUTS


def parse_layouts(text: str) -> tuple[tuple[int, int], ...]:
    return tuple(tuple(int(v) for v in item.split("x")) for item in text.split(","))


def main(process_id: int, port: int, checkpoint: str, out: str, layouts=MP_LAYOUTS, attention="reference",
         n: int = 3) -> None:
    from kiln.passes.sharding import initialize_distributed

    initialize_distributed(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    assert jax.process_count() == 2 and len(jax.devices()) == 2 * len(jax.local_devices())

    from kiln.models.loader import open_checkpoint
    from kiln.models.registry import build_graph

    ck = open_checkpoint(checkpoint)
    graph = build_graph(ck.config, "float32")
    result = {f"tp{tp}_pp{pp}": layout_tokens(graph, ck, tp, pp, attention, n) for tp, pp in layouts}
    with open(out, "w") as f:
        json.dump({"process": jax.process_index(), "devices": [str(d) for d in jax.devices()],
                   "tokens": result}, f)
    jax.distributed.shutdown()


def layout_tokens(graph, ck, tp: int, pp: int, attention: str, n: int) -> list[list[int]]:
    """Greedy tokens of the shared prompts with the model on a (pp, tp) mesh over jax.devices()
    (all processes' devices), or on one device when tp * pp == 1."""
    from kiln.models.loader import load_params
    from kiln.passes.sharding import shard_model, to_host
    from tests.helpers import Stepper
    from tests.passes.sharding_cases import greedy, use_sharded

    if tp * pp == 1:
        return greedy(Stepper(graph, load_params(graph, ck.config, ck.source), attention=attention), n=n)[0]
    model = shard_model(graph, tp=tp, pp=pp, attention=attention)  # weights stream onto their devices
    model.params = model.place(load_params(graph, ck.config, ck.source, put=model.put))
    stepper = use_sharded(Stepper(graph, model.params, attention=attention), model)
    stepper.step_fn = lambda p, kv, inputs: _fetch(model.step(p, kv, inputs), to_host)
    return greedy(stepper, n=n)[0]


def _fetch(step_out, to_host):
    logits, kv = step_out
    return to_host(logits), kv


if __name__ == "__main__":
    a = sys.argv[1:]
    main(int(a[0]), int(a[1]), a[2], a[3], parse_layouts(a[4]) if len(a) > 4 else MP_LAYOUTS,
         a[5] if len(a) > 5 else "reference", int(a[6]) if len(a) > 6 else 3)
