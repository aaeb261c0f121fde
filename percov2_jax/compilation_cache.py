"""Compiled programs kept on disk, so that a second ``percov2 compress`` / ``decompress`` /
``export`` neither compiles nor traces: XLA's persistent compilation cache, and beside it this
module's store of the codec's own executables.

Where (first match wins):

1. ``--no-compilation-cache``: off.
2. ``--compilation-cache DIR``.
3. ``$PERCOV2_COMPILATION_CACHE``: a directory, or ``off`` (also ``none``, ``0``, ``false``).
4. A cache JAX was already given (``$JAX_COMPILATION_CACHE_DIR`` or ``jax.config``, e.g. by the
   test session): left as it is, and used.
5. ``$XDG_CACHE_HOME/percov2_jax/jax_cache`` (``~/.cache/percov2_jax/jax_cache`` without it).

XLA's cache skips the compiler, not the tracing before it: Flax checks every parameter's shape
with an abstract evaluation of its initialiser on every trace, 0.4 s for the demo model's encoder
alone. So the codec's jitted networks (`percov2_jax.codec.networks`, the prior's step function)
are wrapped by `stored`: while the store is on, a call with arguments on one device runs an
executable read from ``DIR/percov2_executables`` (`jax.experimental.serialize_executable`), made
by ``lower(...).compile()`` (the very program plain ``jit`` would run, so results are identical)
on the first call with those argument shapes. Its key covers the static arguments (the Flax
modules' configs), every argument's shape, dtype and sharding, the percov2_jax sources, the jax,
jaxlib and flax versions, the backend and device kind, ``XLA_FLAGS`` and the JAX settings that
change tracing; an unreadable entry is compiled again. Entries are pickles, loaded as trusted as
XLA's own cache entries: keep the directory private.

Every program goes into XLA's cache, however quick its compile (JAX's default skips those under a
second). JAX reads its settings at its first compile: the first command of a process decides.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import pathlib
import pickle
import tempfile
from collections.abc import Callable, Iterator, Sequence

ENV = "PERCOV2_COMPILATION_CACHE"
OFF = ("off", "none", "0", "false")
EXECUTABLES = "percov2_executables"

_store: str | None = None  # the directory of stored executables while the store is on


def default_dir() -> str:
    """``$XDG_CACHE_HOME/percov2_jax/jax_cache``, or under ``~/.cache`` without it."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "percov2_jax", "jax_cache")


def resolve(directory: str | None = None, enabled: bool = True) -> str | None:
    """The directory the rules above choose: a path, ``""`` when JAX already has a cache (rule 4),
    None when the cache is off."""
    import jax

    if not enabled:
        return None
    env = os.environ.get(ENV, "").strip()
    chosen = directory or ("" if env.lower() in OFF else env)
    if chosen:
        return os.path.abspath(os.path.expanduser(chosen))
    if env:  # an OFF value
        return None
    return "" if jax.config.jax_compilation_cache_dir else default_dir()


def configure(directory: str | None = None, enabled: bool = True) -> str | None:
    """Apply the rules above to JAX and to the executable store; returns the cache directory in
    use (None: off)."""
    import jax

    global _store
    chosen = resolve(directory, enabled)
    if chosen is None:
        jax.config.update("jax_enable_compilation_cache", False)
        _store = None
        return None
    if chosen:
        jax.config.update("jax_enable_compilation_cache", True)
        jax.config.update("jax_compilation_cache_dir", chosen)
        if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    else:
        chosen = jax.config.jax_compilation_cache_dir
    _store = None if "://" in chosen else os.path.join(chosen, EXECUTABLES)
    return chosen


_SETTINGS = (
    "jax_enable_compilation_cache",
    "jax_compilation_cache_dir",
    "jax_persistent_cache_min_compile_time_secs",
)


@contextlib.contextmanager
def configured(directory: str | None = None, enabled: bool = True) -> Iterator[str | None]:
    """`configure` for the duration of a block (a command run in-process, e.g. by the tests), the
    previous settings restored after it."""
    import jax

    global _store
    saved, saved_store = {k: getattr(jax.config, k) for k in _SETTINGS}, _store
    try:
        yield configure(directory, enabled)
    finally:
        for k, v in saved.items():
            jax.config.update(k, v)
        _store = saved_store


def add_arguments(parser) -> None:
    """``--compilation-cache DIR`` and ``--no-compilation-cache`` on an argparse (sub)parser."""
    parser.add_argument(
        "--compilation-cache",
        default=None,
        metavar="DIR",
        help=f"persistent XLA compilation cache (default: ${ENV}, else {default_dir()})",
    )
    parser.add_argument(
        "--no-compilation-cache",
        dest="compilation_cache_enabled",
        action="store_false",
        help="compile from scratch and keep nothing on disk",
    )


# ------------------------------------------------------------------------------- stored executables


def stored(static_argnums: Sequence[int] = (), identity: str = "") -> Callable:
    """Decorator of a ``jax.jit`` function: `StoredProgram` (see the module docstring).
    ``identity``: what else the program depends on that its arguments do not show (the module a
    closure applies)."""
    return functools.partial(StoredProgram, static_argnums=tuple(static_argnums), identity=identity)


class StoredProgram:
    """A jitted function whose executables come from the store while it is on; otherwise, and
    for arguments spread over several devices, the jitted function itself. Attributes (``lower``,
    ``trace`` ...) are the jitted function's."""

    def __init__(self, jitted, static_argnums: tuple[int, ...] = (), identity: str = ""):
        self.jitted = jitted
        self.static_argnums = frozenset(static_argnums)
        self.identity = identity
        self._loaded: dict[str, Callable] = {}
        functools.update_wrapper(self, jitted)

    def __getattr__(self, name):
        return getattr(self.jitted, name)

    def __call__(self, *args):
        directory = _store
        if directory is None:
            return self.jitted(*args)
        import jax

        dynamic = [a for i, a in enumerate(args) if i not in self.static_argnums]
        leaves, treedef = jax.tree.flatten(dynamic)
        signature = _leaf_signatures(leaves)
        if signature is None:  # several devices: the jitted function places and runs it
            return self.jitted(*args)
        static = [repr(a) for i, a in enumerate(args) if i in self.static_argnums]
        context = [str(jax.sharding.get_abstract_mesh()), repr(_logical_axis_rules())]
        parts = [_environment(), self.__module__, self.__qualname__, self.identity, str(treedef)]
        key = hashlib.sha256("\n".join([*parts, *context, *static, *signature]).encode()).hexdigest()[:40]
        compiled = self._loaded.get(key)
        if compiled is None:
            path = pathlib.Path(directory) / f"{self.__name__}-{key}.bin"
            compiled = self._loaded[key] = _load(path) or _compile_and_save(path, self.jitted.lower(*args))
        return compiled(*dynamic)


def _logical_axis_rules():
    import flax.linen as nn

    return nn.get_logical_axis_rules()


def _leaf_signatures(leaves) -> list[str] | None:
    """Shape, dtype, weak type and placement of every argument leaf; None when they are not all
    on one device."""
    import jax
    import numpy as np

    out, devices = [], set()
    for leaf in leaves:
        if isinstance(leaf, jax.Array):
            devices |= leaf.sharding.device_set
            out.append(f"{jax.typeof(leaf)}|{leaf.aval.weak_type}|{leaf.sharding}")
        elif isinstance(leaf, np.ndarray | np.generic):
            out.append(f"host {leaf.dtype}{list(np.shape(leaf))}")
        else:
            out.append(f"python {type(leaf).__name__}")
    if len(devices) > 1:
        return None
    out.extend(f"device {d.platform} {d.device_kind} {d.id}" for d in devices)
    return out


@functools.cache
def _environment() -> str:
    """What every stored executable depends on beyond its arguments."""
    from importlib import metadata

    import jax

    versions = []
    for name in ("jax", "jaxlib", "flax"):
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{name} ?")
    device = jax.devices()[0]
    settings = [
        f"{k}={getattr(jax.config, k)}"
        for k in ("jax_enable_x64", "jax_default_matmul_precision", "jax_default_prng_impl", "jax_numpy_rank_promotion")
    ]
    return "\n".join(
        [
            *versions,
            f"{device.platform} {device.device_kind}",
            os.environ.get("XLA_FLAGS", ""),
            *settings,
            _sources_digest(),
        ]
    )


def _sources_digest() -> str:
    """SHA-256 of every ``.py`` file of the percov2_jax package: any edit makes new executables."""
    root = pathlib.Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def _load(path: pathlib.Path) -> Callable | None:
    from jax.experimental import serialize_executable

    try:
        blob, in_tree, out_tree = pickle.loads(path.read_bytes())
        return serialize_executable.deserialize_and_load(blob, in_tree, out_tree)
    except FileNotFoundError:
        return None
    except Exception:  # noqa: BLE001 - a damaged or foreign entry is compiled again and replaced
        return None


# An executable XLA:CPU read back from XLA's cache serialises without its kernels (loading it
# then fails with "Function ... not found"), so the store's compiles must be fresh: they pass an
# option, at its default value, that gives them cache keys of their own, and XLA's cache writes
# nothing while they run, so it never holds an entry for those keys.
FRESH_COMPILE = {"xla_embed_ir_in_executable": False}


def _fresh_compile(lowered):
    import jax

    saved = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float("inf"))
    try:
        return lowered.compile(compiler_options=FRESH_COMPILE)
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", saved)


def _compile_and_save(path: pathlib.Path, lowered) -> Callable:
    from jax.experimental import serialize_executable

    compiled = _fresh_compile(lowered)
    try:
        data = pickle.dumps(serialize_executable.serialize(compiled))
    except (ValueError, NotImplementedError, TypeError, pickle.PicklingError):
        return compiled  # this backend cannot serialise it: kept in memory only
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError:  # a read-only or full cache directory costs a compile, nothing else
        pass
    return compiled
