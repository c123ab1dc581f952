"""How passes/calibration.txt (the default GPTQ / AWQ calibration text) was made: 8 samples of
480 tokens from the default model (SmolLM2-135M-Instruct, fp32 graph, CPU), temperature 1.0,
top-p 0.95, seed 0, each from a short generic opening (none from the evaluation excerpt).
Text sampled from the model itself stands in for its training distribution (data-free
calibration, as in LLM-QAT); no third-party text is shipped.

    python benchmarks/make_calibration_text.py [OUT]
"""

import sys
import time
from pathlib import Path

from kiln.runtime.llm import LLM
from kiln.runtime.sampling_params import SamplingParams


def main(out):
    llm = LLM(None, dtype="float32", max_num_seqs=8, max_num_tokens=1024)
    prompts = ["The history of the city begins", "Photosynthesis is the process", "Dear Sarah,\n\nI hope", "The committee met on Tuesday to discuss",
               "In the small village by the sea,", "How to plan a garden:", "The engine of a modern car", "She opened the letter and read"]
    t = time.time()
    outs = llm.generate(prompts, SamplingParams(temperature=1.0, top_p=0.95, max_tokens=480, min_tokens=480, seed=0), use_tqdm=False)
    with open(out, "w", encoding="utf-8") as f:
        for p, o in zip(prompts, outs):
            f.write(p + o.outputs[0].text.strip("\n") + "\n\n")
    print("gen", time.time() - t)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).resolve().parent.parent / "passes/calibration.txt"))
