"""Checkpoints that survive crashes, hold only data and prove they are whole.

A checkpoint is a folder ``<out_dir>/checkpoints/step-NNNNNNNN`` holding
``trainable.safetensors`` (the parameters being trained, by name),
``state.pt`` (optimizer, scheduler, scaler and RNG states, data position and
loop state), ``config.json`` (the resolved config), for LoRA runs
``adapter/`` in PEFT's format, and, written last, ``manifest.json``: every
other file with its size and SHA-256.

Data only. Checkpoints travel between machines and people, and a pickle can
run code, so ``state.pt`` is read with ``torch.load(weights_only=True)``: its
unpickler builds containers, numbers, strings and tensors and refuses any
other global (a crafted file that would call ``os.system`` is an error, not a
call). The state therefore holds no classes, ours included: the loop state is
saved as a dict. Tensors are read with safetensors, which never unpickles.

Sharded (FSDP2, several processes). Instead of ``trainable.safetensors`` the
folder holds ``shards/``, written by ``torch.distributed.checkpoint``: every
rank writes its own part of the parameters and optimizer state, rank 0 its
metadata; ``state.pt`` then holds only plain data (param groups, schedule,
loop, every rank's RNG state). All ranks write into rank 0's temporary
folder; rank 0 renames it into place only once ``dcp.save`` has returned,
which it does after gathering every rank's write results: a checkpoint that
one rank did not finish is never renamed, so never found. DCP's metadata
file is a pickle: it is read by an unpickler that admits DCP's own metadata
classes and nothing else.

Whole. The folder appears only once complete (``ember.engine.atomic``), so a
crash mid-write leaves the previous checkpoint as the latest; but a disk can
still lose or damage files later, and a copy can be partial. ``latest`` checks
checkpoints against their manifests, newest first, warns about each damaged
one and returns the newest whole one. Only the last ``keep_last`` are kept.
"""

from __future__ import annotations

import functools
import hashlib
import json
import pickle
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .atomic import remove_stale_temporaries, write_atomically
from .errors import ConfigError

PREFIX = "step-"
MANIFEST = "manifest.json"
SHARDS = "shards"  # torch.distributed.checkpoint's folder in a sharded checkpoint
REQUIRED = {"whole": ("trainable.safetensors", "state.pt", "config.json"),
            "sharded": (f"{SHARDS}/.metadata", "state.pt", "config.json")}

# Config keys that may differ between a checkpoint and the run resuming from it: how long, how fast and how
# often the run goes on, where and how it reports, and how the same math is computed. Every other key decides
# what is trained on what (model, data and its split, LoRA shape, batch, seed, precision, optimizer kind): a
# change there would make the resumed run silently a different one.
MAY_CHANGE_ON_RESUME = frozenset({
    "max_steps", "lr", "weight_decay", "betas", "warmup_steps", "schedule", "min_lr_ratio", "grad_clip",
    "eval_every", "early_stopping_metric", "early_stopping_patience", "save_every", "keep_last", "max_bad_steps",
    "out_dir", "log_every", "tensorboard", "report_to", "progress", "device", "ember_kernels",
    "gradient_checkpointing", "offload_activations", "resume", "resume_allow_changes",
})


class DamagedCheckpointWarning(UserWarning):
    """A checkpoint was skipped because its files do not match its manifest."""


# ----------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------


def save_checkpoint(out_dir: Path, step: int, trainable: dict[str, torch.Tensor], state: dict[str, Any],
                    config: dict[str, Any], keep_last: int, write_extra=None) -> Path:
    """``state`` must be plain data (dicts, lists, tuples, numbers, strings, tensors): it is read back with
    ``weights_only=True``. ``write_extra(folder)``, if given, adds files (a PEFT adapter) before the manifest."""
    folder = Path(out_dir) / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(folder)

    def write(temporary: Path) -> None:
        temporary.mkdir()
        save_file({name: t.detach().contiguous().cpu() for name, t in trainable.items()},
                  str(temporary / "trainable.safetensors"))
        torch.save(state, temporary / "state.pt")
        (temporary / "config.json").write_text(json.dumps(config, indent=2))
        if write_extra is not None:
            write_extra(temporary)
        _write_manifest(temporary)

    # The same step saved again (a resumed run) replaces the old folder whole.
    final = write_atomically(folder / f"{PREFIX}{step:08d}", write)
    for old in list_checkpoints(out_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_sharded_checkpoint(out_dir: Path, step: int, tensors: dict[str, Any], state: dict[str, Any] | None,
                            config: dict[str, Any], keep_last: int) -> Path:
    """A checkpoint of an FSDP2 run; every rank calls it at the same point.

    ``tensors``: nested dicts of tensors and DTensors (the same keys on every rank), written by
    ``torch.distributed.checkpoint``, each rank its shards. ``state``: plain data, rank 0's is written (others
    may pass None). Rank 0 renames the folder into place (``write_atomically``) only after ``dcp.save`` has
    returned there, which happens once every rank reported its write; every rank returns after the rename.
    """
    from . import distributed

    folder = Path(out_dir) / "checkpoints"
    target = folder / f"{PREFIX}{step:08d}"
    if not distributed.current().main:
        _write_shards(tensors, distributed.from_main(None))  # the temporary that rank 0 names
        distributed.barrier()
        return target
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(folder)

    def write(temporary: Path) -> None:
        temporary.mkdir()
        _write_shards(tensors, distributed.from_main(temporary))
        torch.save(state, temporary / "state.pt")
        (temporary / "config.json").write_text(json.dumps(config, indent=2))
        _write_manifest(temporary, "sharded")

    try:
        final = write_atomically(target, write)
        for old in list_checkpoints(out_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        distributed.barrier()
    return final


def _write_shards(tensors: dict[str, Any], temporary: Path) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.save(tensors, storage_writer=dcp.FileSystemWriter(str(temporary / SHARDS)))


def _write_manifest(folder: Path, kind: str = "whole") -> None:
    files = {path.relative_to(folder).as_posix(): {"bytes": path.stat().st_size, "sha256": _sha256(path)}
             for path in sorted(folder.rglob("*")) if path.is_file()}
    manifest = {"files": files} if kind == "whole" else {"format": kind, "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):  # 1 MiB at a time: a full fine-tune's state is large
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------
# Finding a whole one
# ----------------------------------------------------------------------------


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Checkpoint folders, oldest first, whole or not (``latest`` checks them); temporaries are not listed."""
    folder = Path(out_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    steps = [p for p in folder.iterdir() if p.is_dir() and re.fullmatch(rf"{PREFIX}\d+", p.name)]
    return sorted(steps, key=lambda p: int(p.name.removeprefix(PREFIX)))


def damage(folder: Path) -> str | None:
    """What is wrong with the checkpoint ``folder``, or None when every file matches its manifest."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files, kind = manifest["files"], manifest.get("format", "whole")
        listed = {name: (int(entry["bytes"]), str(entry["sha256"])) for name, entry in files.items()}
        required = REQUIRED[kind]
    except FileNotFoundError:
        return f"no {MANIFEST} (the write did not finish)"
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        return f"{MANIFEST} is unreadable"
    for name in required:
        if name not in listed:
            return f"{MANIFEST} does not list {name}"
    for name, (size, sha256) in listed.items():
        if Path(name).is_absolute() or ".." in Path(name).parts:
            return f"{MANIFEST} names {name!r}, outside the checkpoint"
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} holds {path.stat().st_size} bytes, its manifest says {size}"
        if _sha256(path) != sha256:
            return f"{name} does not match its SHA-256 in the manifest"
    return None


def latest(out_dir: Path) -> tuple[Path, list[Path]]:
    """The newest whole checkpoint, and the damaged ones newer than it, each reported with a warning.

    A ``ConfigError`` when there is none, naming what is wrong with each.
    """
    checkpoints = list_checkpoints(out_dir)
    if not checkpoints:
        raise ConfigError(f"no checkpoint in {str(out_dir)!r}")
    damaged, problems = [], []
    for folder in reversed(checkpoints):
        problem = damage(folder)
        if problem is None:
            return folder, damaged
        warnings.warn(f"skipping damaged checkpoint {folder}: {problem}", DamagedCheckpointWarning, stacklevel=2)
        damaged.append(folder)
        problems.append(f"{folder.name}: {problem}")
    raise ConfigError(f"no whole checkpoint in {str(Path(out_dir) / 'checkpoints')!r}: {'; '.join(problems)}")


def remove_damaged(out_dir: Path, damaged: list[Path]) -> None:
    """Housekeeping once a run has resumed: its damaged later checkpoints (the run redoes their steps, and
    they would otherwise count towards ``keep_last``) and the temporaries of killed writes."""
    for folder in damaged:
        shutil.rmtree(folder, ignore_errors=True)
    remove_stale_temporaries(Path(out_dir) / "checkpoints")


def check_config(folder: Path, now: dict[str, Any], allow_changes: bool,
                 defaults: dict[str, Any] | None = None) -> None:
    """Refuse to resume from ``folder`` with a config that trains something else than the saved one
    (``MAY_CHANGE_ON_RESUME`` lists what may change); with ``allow_changes``, warn instead.

    ``defaults``: each key's default. A key the saved config lacks (the checkpoint predates it) counts as
    saved at its default, which is what that run did without it; a later ember can then resume it."""
    try:
        saved = json.loads((folder / "config.json").read_text())
    except (UnicodeDecodeError, ValueError):
        raise ConfigError(f"{folder / 'config.json'}: not a JSON config") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"{folder / 'config.json'}: not a JSON config")
    now = json.loads(json.dumps(now))  # tuples become lists, as in the saved file
    saved = {**json.loads(json.dumps(defaults or {})), **saved}
    missing = object()
    changed = sorted(key for key in saved.keys() | now.keys()
                     if key not in MAY_CHANGE_ON_RESUME and saved.get(key, missing) != now.get(key, missing))
    if not changed:
        return
    described = ", ".join(f"{key} {_show(saved, key)} -> {_show(now, key)}" for key in changed)
    if allow_changes:
        warnings.warn(f"resuming from {folder} with a changed config (saved -> now): {described}", stacklevel=2)
        return
    raise ConfigError(f"cannot resume from {folder}: the config differs from the saved one (saved -> now): "
                      f"{described}; use the saved values, or pass --resume_allow_changes=true to change them")


def _show(config: dict[str, Any], key: str) -> str:
    return json.dumps(config[key]) if key in config else "(absent)"


# ----------------------------------------------------------------------------
# Reading, as data only
# ----------------------------------------------------------------------------


def load_trainable(folder: Path) -> dict[str, torch.Tensor]:
    path = Path(folder) / "trainable.safetensors"
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise ConfigError(f"{path}: not a safetensors file ({error})") from None


def is_sharded(folder: Path) -> bool:
    """True for a checkpoint written by ``save_sharded_checkpoint`` (FSDP2)."""
    return (Path(folder) / SHARDS).is_dir()


def load_shards(folder: Path, tensors: dict[str, Any]) -> None:
    """Read a sharded checkpoint's tensors into ``tensors`` (nested dicts, as saved) in place, each rank its
    part; DCP reshards where the world size changed. A key missing or of another shape is a ConfigError."""
    import torch.distributed.checkpoint as dcp

    try:
        dcp.load(tensors, storage_reader=_metadata_reader()(str(Path(folder) / SHARDS)))
    except (RuntimeError, ValueError, KeyError, pickle.UnpicklingError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"checkpoint {folder} does not fit this run: {reason[:300]}") from None


@functools.lru_cache(maxsize=1)
def _metadata_reader():
    """torch.distributed.checkpoint's file reader, but its metadata (a pickle) is unpickled as data only."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class Reader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):  # FileSystemReader's, with pickle.load made safe
            with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as file:
                metadata = _DataUnpickler(file).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return Reader


class _DataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata classes, torch dtypes and sizes, and containers; any other global is refused."""

    def find_class(self, module: str, name: str):
        if (module.startswith("torch.distributed.checkpoint.") or (module, name) in _METADATA_GLOBALS
                or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"unsupported GLOBAL {module}.{name} in the shards' metadata")


_METADATA_GLOBALS = {("torch", "Size"), ("collections", "OrderedDict"), ("builtins", "set"),
                     ("builtins", "frozenset"), ("torch.serialization", "_get_layout"), ("torch", "strided"),
                     ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
                     ("pathlib", "PureWindowsPath")}


def load_state(folder: Path) -> dict[str, Any]:
    """The plain-data state of a checkpoint. A ``state.pt`` that holds anything but data is refused with a
    ``ConfigError``; nothing in it runs."""
    path = Path(folder) / "state.pt"
    try:
        with warnings.catch_warnings():  # torch's advice on pickle protocols: the file is data or refused anyway
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise ConfigError(f"{path}: refused, it is not plain checkpoint data ({_reason(error)})") from None
    if not isinstance(state, dict):
        raise ConfigError(f"{path}: refused, expected a dict of states, found {type(state).__name__}")
    return state


def load_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The trainable tensors and the state of a whole (not sharded) checkpoint (check it with ``latest`` first)."""
    return load_trainable(folder), load_state(folder)


def copy_parameters(saved: dict[str, torch.Tensor], trainable: dict[str, torch.nn.Parameter], folder: Path) -> None:
    """The saved tensors into the model's trainable parameters; a checkpoint of another model is a ConfigError."""
    for name, p in trainable.items():
        if name not in saved:
            raise ConfigError(f"checkpoint {folder} does not fit this model: it holds no {name!r}")
        if saved[name].shape != p.shape:
            raise ConfigError(f"checkpoint {folder} does not fit this model: {name} is {tuple(saved[name].shape)} "
                              f"there, {tuple(p.shape)} here")
    unused = sorted(saved.keys() - trainable.keys())
    if unused:
        raise ConfigError(f"checkpoint {folder} does not fit this model: it trains {unused[0]!r} "
                          f"(and {len(unused) - 1} more), which this model does not")
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(saved[name])


def _reason(error: Exception) -> str:
    """What torch refused (an unsupported global or opcode), without its advice to load with weights_only=False."""
    found = re.search(r"GLOBAL [\w.]+|operand \d+", str(error))
    return f"unsupported {found.group(0)}" if found else str(error).splitlines()[0]
