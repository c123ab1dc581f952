"""Quick start: generate with Kiln, and check it against transformers.

Until the shipped default model lands, this builds a tiny random-weight Llama checkpoint
on the fly (so the text is gibberish), then shows that Kiln's greedy tokens equal those of
Hugging Face transformers on it.
"""

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kiln import LLM, SamplingParams  # noqa: E402


def main():
    from tests.helpers import hf_greedy, load_hf, make_hf_checkpoint

    with tempfile.TemporaryDirectory() as d:
        make_hf_checkpoint("llama", Path(d))
        llm = LLM(d, dtype="float32")
        out = llm.generate(["the quick brown fox"], SamplingParams(max_tokens=16, temperature=0.0))[0]
        print("prompt tokens:", out.prompt_token_ids)
        print("kiln tokens:  ", out.outputs[0].token_ids)
        ref = hf_greedy(load_hf(Path(d)), out.prompt_token_ids, 16)
        print("transformers: ", ref)
        print("identical:", ref == out.outputs[0].token_ids)


if __name__ == "__main__":
    main()
