"""Engine: KV cache, batching, sampling, the LLM API (owner: runtime)."""
