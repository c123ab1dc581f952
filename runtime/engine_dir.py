"""Engine directories: what `kiln build` writes and `LLM(ENGINE_DIR)` loads.

    ENGINE_DIR/
      engine.json     model config, build options, pass list, versions, platform, device kind,
                      mesh shape, parameter shapes, the build command, a checksum of itself
      graph.json      the post-pass graph
      weights/        the transformed parameters (orbax-checkpoint; restored straight into
                      their target shardings)
      tokenizer/      the tokenizer files (transformers' save_pretrained)
      compiled/       JAX's persistent compilation cache, filled for every shape bucket
      autotune.json   the quantized matmuls' choice per shape and token bucket (runtime/autotune.py;
                      only when the build ran the autotune; its sha256 is in engine.json)

A build writes into a temporary sibling directory and renames it into place at the end, so a
build killed half way never leaves a directory that loads.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.errors import KilnError

FORMAT = "kiln-engine"
FORMAT_VERSION = 1


class EngineError(KilnError):
    """An engine directory that cannot be loaded here (names what differs and how to rebuild)."""


@dataclass
class BuildConfig:
    """Build options; every one is recorded in engine.json."""
    dtype: str = "auto"
    quantization: str | None = None        # None | "fp8" | "int8_wo" | "int4_wo"
    kv_cache_dtype: str = "auto"           # "auto" | "fp8"
    tp: int = 1
    pp: int = 1
    max_num_seqs: int = 64
    max_num_tokens: int = 2048
    max_model_len: int | None = None
    kv_block_size: int = 16
    num_kv_blocks: int | None = None       # the KV pool (fixed at build: it is part of the compiled shapes)
    gpu_memory_utilization: float = 0.9    # sizes the pool when num_kv_blocks is None
    attention: str = "auto"
    # XLA options of every step compile (None: the default rule; after the build: those in effect)
    compiler_options: dict | None = None
    # the token buckets up to runner.SMALL_STEP_TOKENS, where they differ (None: compiler_options)
    small_step_compiler_options: dict | None = None
    autotune_budget_s: float | None = 20.0  # quantized-matmul autotune (runtime/autotune.py); None: none
    passes: list[str] = field(default_factory=list)  # filled by the build: the passes that ran

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "BuildConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def is_engine_dir(path: str | os.PathLike | None) -> bool:
    return path is not None and Path(path).is_dir() and (Path(path) / "engine.json").exists()


# --------------------------------------------------------------------------- environment


def environment() -> dict[str, Any]:
    """What a compiled engine depends on: versions and the device it was built for."""
    import jax
    import jaxlib

    from kiln import __version__

    dev = jax.devices()[0]
    return {"kiln": __version__, "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "platform": dev.platform, "device_kind": dev.device_kind, "num_devices": jax.device_count(),
            "python": platform.python_version()}


def _checksum(d: dict) -> str:
    body = {k: v for k, v in d.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------- writing


class EngineWriter:
    """Writes an engine directory atomically: everything goes to `<dir>.partial-<pid>`, and
    `commit()` renames it over `dir`."""

    def __init__(self, out_dir: str | os.PathLike):
        self.final = Path(out_dir).resolve()
        self.tmp = self.final.with_name(f".{self.final.name}.partial-{os.getpid()}")
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        (self.tmp / "compiled").mkdir()
        self.weight_parts = None  # set by save_weights: the names in each part (None: one checkpoint)

    @property
    def compile_cache_dir(self) -> Path:
        return self.tmp / "compiled"

    def save_graph(self, graph):
        from kiln.graph import save

        save(graph, self.tmp / "graph.json")

    def save_weights(self, params, *, wait: bool = True):
        """Write the parameters with orbax (uncompressed, `_checkpointer`: weights barely
        compress, and zstd decoding bounded the restore). With `wait=False` the whole save,
        the device-to-host copy included, runs in a background thread until `wait()`: the
        build compiles meanwhile (its KV pools are never allocated, so the copy and the
        compiles' autotuning fit beside the weights)."""
        import threading

        import orbax.checkpoint as ocp

        self._save_error = None

        # device-to-host copies bounded (KILN_SAVE_CONCURRENT_GB, default 2): the build holds a
        # few arrays of the weights on the host at a time, never the whole model
        sizes = {k: int(v.size) * v.dtype.itemsize for k, v in params.items()}
        save_gb = _concurrent_gb("KILN_SAVE_CONCURRENT_GB", sizes)
        # the weights go to one orbax checkpoint per part (weights/part-NNN), saved one after the
        # other, so the host holds one part at a time whatever the orbax version (the Llama-3-8B
        # shape on the H100: peak build RSS 22.1 GB in one checkpoint, 6.6 GB in 2 GB parts).
        # Default: as many parts of about equal bytes as the restore runs threads (`restore_weights`
        # restores them in one wave), for models of at least 2 GB a part; KILN_SAVE_PART_GB=N:
        # parts of at most N GB instead; KILN_SAVE_PART_GB=0: one checkpoint
        self.weight_parts = _save_parts(sizes)
        self.save_note = (f"{len(self.weight_parts)} parts of <= {max(sum(sizes[n] for n in p) for p in self.weight_parts) / 1e9:.1f} GB"
                          if self.weight_parts else
                          f"one checkpoint, device-to-host copies bounded to {save_gb} GB" if orbax_bounds_save() else
                          "one checkpoint, unbounded (this orbax has no save_device_host_concurrent_gb)")

        def save():
            try:
                ckptr = _checkpointer(save_host_gb=save_gb)
                if self.weight_parts is None:
                    ckptr.save(self.tmp / "weights", args=ocp.args.PyTreeSave(params))
                    return
                (self.tmp / "weights").mkdir()
                for i, names in enumerate(self.weight_parts):
                    ckptr.save(self.tmp / "weights" / _part_dir(i), args=ocp.args.PyTreeSave({n: params[n] for n in names}))
            except BaseException as e:  # re-raised by wait()
                self._save_error = e

        self._saver = threading.Thread(target=save, name="kiln-save-weights", daemon=True)
        self._saver.start()
        if wait:
            self.wait()

    def wait(self):
        if getattr(self, "_saver", None) is not None:
            self._saver.join()
            self._saver = None
            if self._save_error is not None:
                raise self._save_error

    def save_tokenizer(self, tokenizer):
        if tokenizer is not None:
            tokenizer.save_pretrained(self.tmp / "tokenizer")

    def write_manifest(self, *, config: dict, build: BuildConfig, params, mesh_shape: dict, command: str,
                       files: tuple[str, ...] = ()):
        """engine.json; `files`: extra files of the engine directory, listed with their sha256."""
        import jax

        manifest = {
            "format": FORMAT, "version": FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "environment": environment(),
            "model_config": config,
            "build": build.to_json(),
            "mesh": mesh_shape,
            "params": {"/".join(str(getattr(k, "key", k)) for k in path): [list(a.shape), str(a.dtype)]
                       for path, a in jax.tree_util.tree_flatten_with_path(params)[0]},
            "build_command": command,
        }
        if self.weight_parts:
            manifest["weight_parts"] = self.weight_parts
        if files:
            manifest["files"] = {f: file_sha256(self.tmp / f) for f in files}
        manifest["checksum"] = _checksum(manifest)
        (self.tmp / "engine.json").write_text(json.dumps(manifest, indent=1))

    def commit(self) -> Path:
        old = None
        if self.final.exists():
            old = self.final.with_name(f".{self.final.name}.old-{os.getpid()}")
            os.replace(self.final, old)
        os.replace(self.tmp, self.final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.final

    def abort(self):
        saver = getattr(self, "_saver", None)
        if saver is not None:  # a background weight save still writing: let it end, then remove it all
            saver.join()
            self._saver = None
        shutil.rmtree(self.tmp, ignore_errors=True)


# --------------------------------------------------------------------------- reading


def read_manifest(engine_dir: str | os.PathLike) -> dict:
    """engine.json, validated: format, checksum, and compatibility with this machine."""
    d = Path(engine_dir)
    f = d / "engine.json"
    if not f.exists():
        raise EngineError(f"{f}: not found; {d} is not a complete engine directory (rebuild it with `kiln build`)")
    try:
        m = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise EngineError(f"{f}: malformed JSON at line {e.lineno} ({e.msg}); rebuild the engine with `kiln build`") from None
    rebuild = m.get("build_command") or "kiln build CHECKPOINT -o " + str(d)
    if m.get("format") != FORMAT or m.get("version") != FORMAT_VERSION:
        raise EngineError(f"{f}: engine format {m.get('format')} v{m.get('version')} is not {FORMAT} "
                          f"v{FORMAT_VERSION}; rebuild with: {rebuild}")
    if m.get("checksum") != _checksum(m):
        raise EngineError(f"{f}: edited after the build (checksum mismatch); rebuild with: {rebuild}")
    here = environment()
    built = m["environment"]
    for key in ("kiln", "jax", "jaxlib", "platform", "device_kind"):
        if built.get(key) != here[key]:
            raise EngineError(f"{d}: built with {key} {built.get(key)!r} but this machine has {here[key]!r}; "
                              f"rebuild with: {rebuild}")
    return m


def file_sha256(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def check_file(engine_dir: str | os.PathLike, manifest: dict, name: str) -> Path:
    """ENGINE_DIR/name, checked against the sha256 engine.json lists for it."""
    f = Path(engine_dir) / name
    rebuild = manifest.get("build_command") or "kiln build CHECKPOINT -o " + str(engine_dir)
    want = manifest.get("files", {}).get(name)
    if not f.exists():
        raise EngineError(f"{f}: missing (engine.json lists it); rebuild with: {rebuild}")
    if want != file_sha256(f):
        raise EngineError(f"{f}: changed after the build (checksum mismatch); rebuild with: {rebuild}")
    return f


def weight_shapes(manifest: dict, shardings=None) -> dict:
    """The parameters as ShapeDtypeStructs placed on their target shardings (`shardings`: a
    dict name -> Sharding, or None for the default device)."""
    import jax
    import numpy as np

    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {}
    for name, (shape, dtype) in manifest["params"].items():
        if "/" in name:
            raise EngineError(f"nested parameter {name!r} is not supported by this engine format")
        target[name] = jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype), sharding=(shardings or {}).get(name, default))
    return target


def restore_weights(engine_dir: str | os.PathLike, manifest: dict, shardings=None, threads: int | None = None):
    """Restore the parameters. `shardings` (a dict name -> Sharding, or None for the default
    device) places each array directly; no full copy lands on one device first.

    The tree is split into `threads` parts of about equal bytes, each restored by its own
    orbax checkpointer (`partial_restore`) in its own thread: one restore keeps too few reads
    and host-to-device copies in flight to reach the disk's or the page cache's rate.
    Default: `KILN_RESTORE_THREADS`, else 4; each holds at most `KILN_RESTORE_CONCURRENT_GB`
    (default 2, at least the largest array) in flight. An engine saved in parts
    (`KILN_SAVE_PART_GB`: one checkpoint per part) restores its parts, `threads` at a time."""
    import numpy as np
    import orbax.checkpoint as ocp

    d = Path(engine_dir)
    target = weight_shapes(manifest, shardings)
    rebuild = manifest.get("build_command", "kiln build")
    threads = int(threads) if threads else restore_threads()
    # bytes in flight per restore: small enough that the host staging of the copies to the device
    # stays small (H100, 8B shape: 2 GB x 4 restores, warm start 8.4 -> 7.4 s), never under the
    # largest array (orbax refuses an array larger than its budget)
    sizes = {k: int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for k, v in target.items()}
    restore_gb = _concurrent_gb("KILN_RESTORE_CONCURRENT_GB", sizes)
    saved = manifest.get("weight_parts")  # one checkpoint per part (KILN_SAVE_PART_GB), else one in all
    parts = [(d / "weights" / _part_dir(i), names, False) for i, names in enumerate(saved)] if saved else \
        [(d / "weights", names, True) for names in _balanced_parts(sizes, threads)]

    def restore(part):
        where, names, partial = part
        item = {n: target[n] for n in names}
        args = ocp.args.PyTreeRestore(item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                      **({"partial_restore": True} if partial and len(parts) > 1 else {}))
        return _checkpointer(restore_gb).restore(where, args=args)

    try:
        if len(parts) == 1:
            params = restore(parts[0])
        else:
            from concurrent.futures import ThreadPoolExecutor

            params = {}
            with ThreadPoolExecutor(min(threads, len(parts)), thread_name_prefix="kiln-restore") as pool:
                for part in pool.map(restore, parts):
                    params.update(part)
    except Exception as e:  # orbax/tensorstore raise many types for truncated or missing files
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise EngineError(f"{d / 'weights'}: cannot restore weights ({msg}); rebuild with: {rebuild}") from None
    for name, (shape, dtype) in manifest["params"].items():
        a = params.get(name)
        if a is None or list(a.shape) != list(shape) or str(a.dtype) != dtype:
            got = "missing" if a is None else f"{a.dtype}{list(a.shape)}"
            raise EngineError(f"{d / 'weights'}: {name} is {got}, engine.json says {dtype}{shape}; "
                              f"rebuild with: {rebuild}")
    return params


def _part_dir(i: int) -> str:
    return f"part-{i:03d}"


def _save_parts(sizes: dict[str, int]) -> list[list[str]] | None:
    """The parts the weights are saved in (None: one checkpoint): `KILN_SAVE_PART_GB` if set,
    else `restore_threads()` parts of about equal bytes when each holds at least 2 GB."""
    env = os.environ.get("KILN_SAVE_PART_GB")
    if env is not None and env.strip():
        part_gb = float(env)
        return _size_parts(sizes, int(part_gb * 1e9)) if part_gb > 0 else None
    n = min(restore_threads(), sum(sizes.values()) // (2 * 10**9))
    return _balanced_parts(sizes, n) if n > 1 else None


def restore_threads() -> int:
    """Threads a restore runs: `KILN_RESTORE_THREADS`, else 4."""
    return max(1, int(os.environ.get("KILN_RESTORE_THREADS") or 4))


def _size_parts(sizes: dict[str, int], limit: int) -> list[list[str]]:
    """The names of `sizes` (name -> bytes) in order, cut into runs of at most `limit` bytes
    (an array larger than that is a part alone)."""
    parts, cur, n = [], [], 0
    for k in sizes:
        if cur and n + sizes[k] > limit:
            parts.append(cur)
            cur, n = [], 0
        cur.append(k)
        n += sizes[k]
    return parts + ([cur] if cur else [])


def _balanced_parts(sizes: dict[str, int], n: int) -> list[list[str]]:
    """The names of `sizes` (name -> bytes) in at most `n` groups of about equal bytes (largest
    first, each to the lightest group)."""
    groups = [([], 0) for _ in range(max(1, min(n, len(sizes))))]
    for k in sorted(sizes, key=lambda k: (-sizes[k], k)):
        i = min(range(len(groups)), key=lambda j: groups[j][1])
        groups[i] = (groups[i][0] + [k], groups[i][1] + sizes[k])
    return [g for g, _ in groups if g]


def _concurrent_gb(env: str, sizes: dict[str, int], default: int = 2) -> int:
    """GB an orbax save or restore may hold in flight: `env` or `default`, never under the
    largest array (orbax refuses an array larger than its budget)."""
    return max(int(os.environ.get(env) or default), -(-max(sizes.values(), default=0) // 10**9))


def _checkpointer(restore_concurrent_gb: int | None = None, save_host_gb: int | None = None):
    """orbax's PyTree checkpointer over zarr3 + OCDBT, without zstd compression;
    `restore_concurrent_gb` bounds the bytes a restore holds in flight (orbax's default: 96),
    `save_host_gb` the device-to-host copies of a save (an orbax without that option saves
    unbounded)."""
    import orbax.checkpoint as ocp

    kw = dict(use_zarr3=True, use_compression=False, restore_concurrent_gb=restore_concurrent_gb)
    if save_host_gb is not None and orbax_bounds_save():
        kw["save_device_host_concurrent_gb"] = save_host_gb
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(**kw))


@functools.cache
def orbax_bounds_save() -> bool:
    """Whether this orbax can bound a save's device-to-host copies (`save_device_host_concurrent_gb`)."""
    import inspect

    import orbax.checkpoint as ocp

    return "save_device_host_concurrent_gb" in inspect.signature(ocp.PyTreeCheckpointHandler.__init__).parameters


def use_compile_cache(directory: str | os.PathLike):
    """Point JAX's persistent compilation cache at `directory` (every compile is kept)."""
    import jax

    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    try:  # the cache is set up once per process, at the first compile: start it over here
        from jax._src import compilation_cache

        compilation_cache.reset_cache()
    except (ImportError, AttributeError):  # a jax without it starts the cache lazily anyway
        pass
    jax.clear_caches()  # what this process compiled before now must go through the new cache too

