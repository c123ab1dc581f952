"""Graph -> graph rewrites: fusion, quantization, sharding, cleanup; the pipeline (owner: passes)."""
