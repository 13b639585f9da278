"""Where a model and a run's outputs live: `--model` resolution, caches, the results root, the source stamp.

`--model` may name a checkpoint directory, a Hugging Face hub repo (`org/name`, fetched with
`huggingface_hub.snapshot_download`, which honours HF_HOME and HF_HUB_OFFLINE), a random-weight preset
(`preset:tiny|mini|flash`, written once into the cache) or nothing (the built-in trained model). A directory
that exists always wins, and says so when the same string could also name a preset or a hub repo.
Results go under the current directory; this module never writes into an installed package.
"""

from __future__ import annotations

import datetime
import errno
import os
import platform
import re
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

PRESET_PREFIX = "preset:"
MODEL_HELP = ("Checkpoint directory, Hugging Face hub id (org/name, fetched into HF_HOME) or preset:tiny|mini|flash "
              "(random weights).")
PACKAGE_ROOT = Path(__file__).resolve().parent  # tide/ (in a wheel: site-packages/tide)
SOURCE_ROOT = PACKAGE_ROOT.parent  # a git checkout's root, or site-packages for an installed wheel
BUILTIN_MODEL = SOURCE_ROOT / "models" / "tide-tiny-code"
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# What a snapshot may bring: weights, configs, tokenizer. Never Python files (no checkpoint code runs here).
HUB_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
             "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "*.jinja"]


def in_checkout() -> bool:
    return (SOURCE_ROOT / "pyproject.toml").is_file() and (SOURCE_ROOT / "tide").is_dir()


def cache_dir() -> Path:
    """Random preset checkpoints: .cache/ of the checkout, else $XDG_CACHE_HOME/tide (~/.cache/tide)."""
    if in_checkout():
        return SOURCE_ROOT / ".cache"
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "tide"


def results_root() -> Path:
    return Path.cwd() / "results"


def new_run_dir(out: str | Path | None, kind: str) -> Path:
    """A fresh run directory: `out` when given (it must be new or empty: results are never overwritten), else
    results/<date>-<time>-<host>-<kind>, created atomically, with a numeric suffix when a run of the same second
    holds the name."""
    if out:
        path = Path(out)
        taken = ValueError(f"{path}: run directory exists and is not empty (results are never overwritten)")
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise taken
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir(exist_ok=True)
        try:  # of two runs given the same new or empty directory, the one that creates the claim file gets it
            claim_file(path / ".tide-run")
        except FileExistsError:
            raise taken from None
        return path
    base = f"{datetime.datetime.now():%Y%m%d-%H%M%S}-{platform.node() or 'host'}-{kind}"
    for i in range(1000):
        path = results_root() / (base + (f"-{i}" if i else ""))
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue
    raise ValueError(f"{results_root() / base}: could not create a new run directory")


def claim_file(path: str | Path) -> Path:
    """Create `path` empty, atomically and only if it does not exist (FileExistsError otherwise): the one way a
    command takes a file or directory name that another command, or a second copy of itself, may want too."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    return Path(path)


def write_new(path: str | Path, write: Callable[[Path], object], companions: tuple[str, ...] = ()) -> Path:
    """`write(tmp)` fills a temp file beside `path` (same suffix), which then takes the name `path` only if nothing
    holds it (a hard link: atomic, never replaces): otherwise ValueError, and the temp is gone. `companions`:
    suffixes of files the writer puts beside its file (tmp.with_suffix(s)), moved beside `path` with it."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{threading.get_ident()}{path.suffix}")
    try:
        write(tmp)
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise ValueError(f"{path}: exists (another command wrote it meanwhile); results are never "
                             "overwritten: choose a new name") from None
        for suffix in companions:
            os.replace(tmp.with_suffix(suffix), path.with_suffix(suffix))
    finally:
        for leftover in (tmp, *(tmp.with_suffix(s) for s in companions)):
            leftover.unlink(missing_ok=True)
    return path


def atomic_write(path: str | Path, data: str | bytes | Callable[[Path], object]) -> Path:
    """Write `data` (text, bytes, or a function writing to the path it is given) to a unique temp name beside
    `path`, then rename it into place: a reader never sees a half-written file, two writers never share a temp."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{threading.get_ident()}{path.suffix}")
    try:
        if callable(data):
            data(tmp)
        elif isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data)
        os.replace(tmp, path)
    except OSError as err:  # disk full, a file-size limit: say which file (a writer's error often names none)
        if err.filename is None:
            raise OSError(err.errno, err.strerror or str(err), str(path)) from err
        raise
    finally:
        tmp.unlink(missing_ok=True)
    return path


@contextmanager
def model_dir_writer(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """A fresh directory beside `out` to write a model into; when the block ends without error it replaces `out`
    whole (no stale file of an older model survives). A non-empty `out` is refused unless `overwrite`. The swap
    defers SIGINT/SIGTERM, so an interrupt leaves the old model or the new one at `out`, never a mixture."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ValueError(f"{out}: exists and is not empty; pass --overwrite to replace it (it is replaced whole)")
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", suffix=".tmp", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # a new model directory's usual permissions, not mkdtemp's 0700
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old, pending = out.parent / f".{out.name}.old-{os.getpid()}", []
    handlers = _defer_signals(pending)
    try:
        if overwrite and out.exists():
            os.rename(out, old)
        try:  # atomic: without --overwrite, a model another writer put at `out` meanwhile is never replaced
            os.rename(tmp, out)
        except OSError as err:
            if err.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            raise ValueError(f"{out}: another command wrote there while this one ran; nothing of this run was "
                             "kept (pass --overwrite to replace it)") from None
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    shutil.rmtree(old, ignore_errors=True)
    if pending:
        raise KeyboardInterrupt


def _remove_orphans(out: Path) -> None:
    """Temp directories a killed writer (SIGKILL, power loss) left beside `out`: `.NAME.<pid>.*.tmp` whose process
    is gone."""
    for tmp in out.parent.glob(f".{out.name}.*.tmp"):
        pid = tmp.name[len(out.name) + 2:].split(".", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:
            pass  # alive, another user's


def _defer_signals(pending: list) -> dict:
    """Record SIGINT/SIGTERM instead of acting on them (main thread only); returns the handlers to restore."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, lambda *args: pending.append(args)) for sig in (signal.SIGINT, signal.SIGTERM)}


def source_stamp() -> str:
    """The code a result came from: `git describe --always --dirty` of the checkout, else the package version."""
    if (SOURCE_ROOT / ".git").exists():
        try:
            return subprocess.run(["git", "-C", str(SOURCE_ROOT), "describe", "--always", "--dirty"],
                                  capture_output=True, text=True, check=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"tide-dllm {version('tide-dllm')}"
    except PackageNotFoundError:
        return "unknown"


def resolve_model(spec: str | Path | None, notes: list[str] | None = None,
                  snapshot: Callable[..., str] | None = None, layers: int | None = None) -> Path:
    """A checkpoint directory for `spec` (see the module docstring); `notes` collects what was inferred.
    `layers` truncates a preset (preset:mini with 4 layers is written as such, never the full 32 GB first)."""
    from tide.config import PRESETS

    notes = notes if notes is not None else []
    if layers is not None and not str(spec).startswith(PRESET_PREFIX):
        raise ValueError(f"--layers {layers}: only a preset:NAME model can be truncated (got --model {spec})")
    if spec is None:
        if (BUILTIN_MODEL / "config.json").is_file():
            return BUILTIN_MODEL
        notes.append("the built-in model is not in this install; using preset:tiny (random weights)")
        return preset_checkpoint("tiny")
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_dir():
        if text in PRESETS or (HUB_ID.fullmatch(text) and not text.startswith(".")):
            other = f"the preset needs {PRESET_PREFIX}{text}" if text in PRESETS else "the hub repo is not consulted"
            notes.append(f"--model {text!r}: a local directory of that name exists and wins ({other})")
        return path
    if text.startswith(PRESET_PREFIX):
        return preset_checkpoint(text[len(PRESET_PREFIX):], layers)
    if text in PRESETS:
        raise FileNotFoundError(f"--model {text!r}: no such directory; for a random-weight checkpoint of the "
                                f"{text} shape write {PRESET_PREFIX}{text}")
    if HUB_ID.fullmatch(text):
        return hub_snapshot(text, snapshot)
    raise FileNotFoundError(f"--model {text!r}: not a directory, nor a hub id (org/name) or "
                            f"{PRESET_PREFIX}NAME")


def preset_checkpoint(name: str, layers: int | None = None) -> Path:
    """A seeded random checkpoint of preset `name` (optionally `layers` deep) with a byte tokenizer, written once
    into cache_dir()."""
    from tide.checkpoint import write_random_checkpoint
    from tide.config import preset

    cfg = preset(name, **({"num_hidden_layers": layers} if layers is not None else {}))  # errors name the field
    path = cache_dir() / (f"{name}-{layers}layers-random" if layers is not None else f"{name}-random")
    if not (path / "config.json").is_file():
        with model_dir_writer(path, overwrite=True) as tmp:  # whole or not at all: a killed write leaves no half model
            write_random_checkpoint(cfg, tmp, seed=0)
    return path


def hub_snapshot(repo_id: str, snapshot: Callable[..., str] | None = None) -> Path:
    """Download (or find in the HF cache) the files of hub repo `repo_id` that TIDE reads; never its code."""
    if snapshot is None:
        from huggingface_hub import snapshot_download as snapshot
    try:
        path = Path(snapshot(repo_id=repo_id, allow_patterns=HUB_FILES))
    except Exception as err:  # network, auth, offline-and-not-cached: all mean "not available here"
        raise FileNotFoundError(
            f"--model {repo_id!r}: no local directory of that name, and the Hugging Face hub repo could not be "
            f"fetched or found in the cache (HF_HOME; {type(err).__name__}: {err}). Download it where the hub is "
            "reachable and pass the directory.") from None
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: the snapshot of {repo_id!r} has no config.json")
    return path
