"""One process of tests/passes/test_multiprocess.py: joins a 2-process jax.distributed CPU
cluster (2 devices each: the parent sets XLA_FLAGS), runs greedy decoding of the shared prompts through sharded
models spanning both processes, and writes the tokens as JSON.

    python -m tests.passes.mp_worker PROCESS_ID PORT CHECKPOINT OUT_JSON
"""

import json
import sys

import jax

from tests.passes.sharding_cases import MP_LAYOUTS


def main(process_id: int, port: int, checkpoint: str, out: str) -> None:
    from kiln.passes.sharding import initialize_distributed

    initialize_distributed(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    assert jax.process_count() == 2 and len(jax.devices()) == 4 and len(jax.local_devices()) == 2

    from kiln.models.loader import load_params, open_checkpoint
    from kiln.models.registry import build_graph
    from kiln.passes.sharding import shard_model, to_host  # noqa: E402
    from tests.helpers import Stepper
    from tests.passes.sharding_cases import greedy, use_sharded

    ck = open_checkpoint(checkpoint)
    graph = build_graph(ck.config, "float32")
    result = {}
    for tp, pp in MP_LAYOUTS:
        model = shard_model(graph, tp=tp, pp=pp)  # weights stream onto their devices as they load
        model.params = model.place(load_params(graph, ck.config, ck.source, put=model.put))
        stepper = use_sharded(Stepper(graph, model.params), model)
        stepper.step_fn = lambda p, kv, inputs, m=model: _fetch(m.step(p, kv, inputs), to_host)
        tokens, _ = greedy(stepper, n=3)
        result[f"tp{tp}_pp{pp}"] = tokens
    with open(out, "w") as f:
        json.dump({"process": jax.process_index(), "tokens": result}, f)
    jax.distributed.shutdown()


def _fetch(step_out, to_host):
    logits, kv = step_out
    return to_host(logits), kv


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
