"""Reading checkpoint files without ever running code from them.

``.safetensors`` files hold only tensors. Pickled files (``.pth``/``.pt``/``.bin``/``.ckpt``) are read with
``torch.load(weights_only=True)``, torch's own restricted unpickler, in up to three passes:

1. with `SAFE_GLOBALS` allowed (``torch.serialization.safe_globals``): plain weights, argparse Namespaces, numpy
   scalars and arrays;
2. release files that also pickle configuration objects (fairseq's data2vec 2.0 checkpoints hold an omegaconf
   ``DictConfig`` ``cfg``, others their training framework's classes): the classes the file names that are not
   allowed are listed with ``torch.serialization.get_unsafe_globals_in_checkpoint``, and each is allowed as an
   `InertObject` placeholder of that name that records its arguments and never calls anything (the real class is
   never imported). torch's unpickler then rebuilds only instances of allowed types (BUILD on a class or a function
   is refused), so nothing from the file runs;
3. what torch's unpickler cannot read with placeholders: it refuses globals of ``os``/``sys``/``posix``/``nt``
   outright and item or list appends into non-builtin objects, and ``get_unsafe_globals_in_checkpoint`` reads only
   zip files, not torch's legacy format. Those files are read with a restricted pickle module whose ``find_class``
   returns torch's weights-only allowlist, `SAFE_GLOBALS` and a few inert containers, and a placeholder for every
   other name; its BUILD refuses to set attributes on classes or functions. This pass needs pickle's pure-Python
   ``_Unpickler`` (the C unpickler's BUILD cannot be overridden) and torch's allowlist
   (``torch._weights_only_unpickler``, which has no public accessor): the one place private APIs are used.

Nothing from the file is executed in any pass; the weights come back as tensors and the rest as placeholders, which
`mimprobe.models.remap.unwrap_checkpoint` drops with a note. A file that is not a checkpoint at all (a text file,
an HTML error page saved under a checkpoint's name) is named as such.
"""

from __future__ import annotations

import _compat_pickle
import argparse
import collections
import hashlib
import inspect
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import BadInputError, CheckpointError

CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")

# Rebuilding these only creates plain values. argparse.Namespace holds the arguments of fairseq (data2vec 2.0),
# DeiT and MAE checkpoints; numpy scalars and dtypes appear in fairseq's optimizer history and extra state.
# Files written with numpy < 2 name numpy.core.multiarray, numpy >= 2 numpy._core.multiarray; the two rebuild
# functions are taken from numpy's own pickling (``__reduce__``) instead of from its private module.
_NUMPY_SCALAR = np.float64(0).__reduce__()[0]       # numpy's multiarray.scalar
_NUMPY_RECONSTRUCT = np.zeros(1).__reduce__()[0]    # numpy's multiarray._reconstruct
SAFE_GLOBALS: list[Any] = [
    argparse.Namespace,
    np.dtype,
    np.ndarray,
    (_NUMPY_SCALAR, "numpy._core.multiarray.scalar"),
    (_NUMPY_SCALAR, "numpy.core.multiarray.scalar"),
    (_NUMPY_RECONSTRUCT, "numpy._core.multiarray._reconstruct"),
    (_NUMPY_RECONSTRUCT, "numpy.core.multiarray._reconstruct"),
    *[dtype_class for dtype_class in vars(np.dtypes).values() if isinstance(dtype_class, type)],
]

# Modules whose globals torch's weights-only unpickler refuses before any allowlist (pass 3 reads those files).
TORCH_BLOCKED_MODULES = ("os", "sys", "posix", "nt")

# Classes the restricted unpickler returns as themselves besides torch's allowlist and SAFE_GLOBALS: containers
# and value types whose constructors only build values from their arguments.
_INERT_BUILTINS = {f"builtins.{cls.__name__}": cls for cls in (dict, list, tuple, set, frozenset, int, float,
                                                                complex, bool, str, bytes, bytearray, slice,
                                                                range)}
_INERT_BUILTINS.update({"collections.OrderedDict": collections.OrderedDict,
                        "collections.defaultdict": collections.defaultdict,
                        "collections.Counter": collections.Counter})
_INERT_BUILTINS_ENTRIES = [(obj, name) for name, obj in _INERT_BUILTINS.items()]


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


class InertObject:
    """Stand-in for an object of a class the restricted unpickler does not import.

    Subclasses are made per pickled global (``pickled_global`` names it, e.g. ``omegaconf.dictconfig.DictConfig``).
    Every way pickle could use the class (call, ``__new__``, ``__setstate__``, item and list appends, calling an
    instance) only records the arguments: no method of the real class is imported or run.
    """

    pickled_global = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> "InertObject":
        obj = object.__new__(cls)
        obj.__dict__.update(args=args, kwargs=kwargs, state=None, items={}, appended=[])
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # called by REDUCE after __new__: nothing to do
        pass

    def __setstate__(self, state: Any) -> None:
        self.__dict__["state"] = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items[key] = value

    def append(self, value: Any) -> None:
        self.appended.append(value)

    def extend(self, values: Any) -> None:
        self.appended.extend(values)

    def __call__(self, *args: Any, **kwargs: Any) -> "InertObject":
        # pickles reach methods through getattr(obj, name)(...): the result is another placeholder
        return _inert_class(f"{self.pickled_global}(...)")(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<inert placeholder for {self.pickled_global}>"


def _inert_class(name: str) -> type:
    return type("Inert_" + name.replace(".", "_"), (InertObject,), {"pickled_global": name})


def _allowed_globals() -> dict[str, Any]:
    from torch._weights_only_unpickler import _get_allowed_globals  # torch's allowlist: no public accessor

    allowed = dict(_get_allowed_globals())
    for entry in SAFE_GLOBALS:
        obj, name = entry if isinstance(entry, tuple) else (entry, f"{entry.__module__}.{entry.__qualname__}")
        allowed[name] = obj
    allowed.update(_INERT_BUILTINS)
    return allowed


# Pickles reach a method as getattr(obj, name)(...): under torch's unpickler getattr returns this placeholder class,
# which is allowed, so the call that follows records its arguments instead of running anything.
InertAttribute = _inert_class("builtins.getattr(...)")


def _inert_getattr(obj: Any, name: str) -> type:
    return InertAttribute


def _placeholder_globals(unsafe: list[str]) -> list[tuple[Any, str]]:
    """``torch.serialization.safe_globals`` entries that allow each of ``unsafe`` as an inert placeholder."""
    entries: list[tuple[Any, str]] = [(InertAttribute, f"{__name__}.InertAttribute")]
    entries += [(_inert_getattr if name == "builtins.getattr" else _inert_class(name), name) for name in unsafe]
    return entries


def _restricted_pickle_module(replaced: set[str]) -> Any:
    """A ``pickle_module`` for ``torch.load`` whose unpickler never imports anything outside the allowlist."""
    allowed = _allowed_globals()
    placeholders: dict[str, type] = {}

    class RestrictedUnpickler(pickle._Unpickler):  # the Python implementation: its BUILD can be checked
        dispatch = dict(pickle._Unpickler.dispatch)

        def load_build(self) -> None:
            # BUILD sets attributes of the object under it; on a class or function that would patch it for the
            # whole process (argparse.Namespace.__init__ = ...): only instances are built
            target = self.stack[-2]
            if isinstance(target, type) or inspect.isroutine(target):
                raise pickle.UnpicklingError(f"BUILD on {getattr(target, '__qualname__', target)!r} refused: it "
                                             "would change a class or function, not build an object")
            pickle._Unpickler.load_build(self)

        dispatch[pickle.BUILD[0]] = load_build

        def find_class(self, module: str, name: str) -> Any:
            # Python 2 names (protocol 2 writes __builtin__.dict), mapped as pickle's own find_class does
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
            key = f"{module}.{name}"
            if key in allowed:
                return allowed[key]
            replaced.add(key)
            if key not in placeholders:
                placeholders[key] = _inert_class(key)
            return placeholders[key]

    class RestrictedPickle:
        Unpickler = RestrictedUnpickler
        UnpicklingError = pickle.UnpicklingError
        __name__ = "mimprobe_restricted_pickle"

        @staticmethod
        def load(file: Any, **kwargs: Any) -> Any:
            return RestrictedUnpickler(file, **kwargs).load()

    return RestrictedPickle


def _holds_tensors(obj: Any, depth: int = 0) -> bool:
    """Whether plain containers (not placeholders) lead to at least one tensor."""
    if isinstance(obj, torch.Tensor):
        return True
    if depth > 6 or isinstance(obj, InertObject):
        return False
    if isinstance(obj, dict):
        return any(_holds_tensors(value, depth + 1) for value in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_holds_tensors(value, depth + 1) for value in obj)
    return False


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def read_checkpoint(path: str | Path, notes: list[str] | None = None) -> Any:
    """Load a checkpoint file onto the CPU without running code from it.

    ``.safetensors`` files are read with safetensors; pickles with ``torch.load(weights_only=True)``, and when that
    refuses a class, with the restricted unpickler described in the module docstring.

    Args:
        path: The file.
        notes: If given, receives a note naming the classes that were replaced by inert placeholders.

    Raises:
        BadInputError: The file is missing.
        CheckpointError: The file is unreadable, or its tensors sit only inside objects of classes that are not
            unpickled (a whole pickled model): it is refused and nothing from it is executed.
    """
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"checkpoint {path} not found: give the path of a .pth/.pt/.bin/.safetensors file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as error:
            text = _text_start(path)
            raise CheckpointError(f"cannot read {path} as safetensors: " + (
                f"not a checkpoint ({text}); pass the .safetensors file itself" if text else _one_line(error))) \
                from None
    problem = _not_a_pickle(path)
    if problem:
        raise CheckpointError(f"cannot read checkpoint {path}: not a checkpoint ({problem}); torch.save writes a zip "
                              "archive or a pickle: pass the .pth/.pt/.bin/.safetensors file itself") from None
    if _is_torchscript(path):  # torch.load would hand these to torch.jit.load
        raise CheckpointError(f"refusing to load {path}: it is a TorchScript archive (code, not a checkpoint); "
                              "pass a file of tensors (torch.save(model.state_dict()) or safetensors)")
    try:
        with torch.serialization.safe_globals([*SAFE_GLOBALS, *_INERT_BUILTINS_ENTRIES]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "global" not in str(error).lower():  # refused a class or function ("Unsupported global", ...)
            raise CheckpointError(f"cannot read checkpoint {path}: not a PyTorch checkpoint, or damaged "
                                  f"({type(error).__name__}); check the file or download it again") from None
    except Exception as error:  # RuntimeError, EOFError, BadZipFile, ... from a damaged or foreign file
        raise CheckpointError(f"cannot read checkpoint {path}: {_one_line(error)} (is the file complete?)") from None
    read = _read_with_placeholders(path)
    if read is None:
        read = _read_restricted(path)
    return _checked(path, *read, notes=notes)


def _not_a_pickle(path: Path) -> str | None:
    """Why a file cannot be what ``torch.save`` writes (a zip archive, or a legacy pickle from protocol 2 on),
    judged from its first bytes; None when it may be one."""
    with open(path, "rb") as handle:
        head = handle.read(64)
    if not head:
        return "an empty file"
    if head.startswith(b"PK") or head[0] == pickle.PROTO[0]:
        return None
    return _text_start(path) or "its first bytes are neither a zip archive nor a pickle"


def _text_start(path: Path) -> str | None:
    """"a text file starting '...'" when the file's first bytes are UTF-8 text, else None."""
    with open(path, "rb") as handle:
        head = handle.read(64)
    for end in range(len(head), max(len(head) - 4, 0), -1):  # a character cut at byte 64 is not binary
        try:
            text = head[:end].decode("utf-8")
            break
        except UnicodeDecodeError:
            continue
    else:
        return None
    if not text.strip() or not all(c.isprintable() or c.isspace() for c in text):
        return None
    return f"a text file starting {text.strip().splitlines()[0][:40]!r}"


def _read_with_placeholders(path: Path) -> tuple[Any, list[str]] | None:
    """Pass 2 (module docstring): torch's weights-only unpickler with every unsafe global as a placeholder.
    Returns (checkpoint, replaced names), or None when torch's unpickler cannot read the file this way."""
    allowed = [*SAFE_GLOBALS, *_INERT_BUILTINS_ENTRIES]
    try:
        with torch.serialization.safe_globals(allowed):
            unsafe = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except (ValueError, RuntimeError):  # a legacy (non-zip) file
        return None
    if any(name.split(".")[0] in TORCH_BLOCKED_MODULES for name in unsafe):
        return None
    try:
        with torch.serialization.safe_globals([*allowed, *_placeholder_globals(unsafe)]):
            return torch.load(path, map_location="cpu", weights_only=True), unsafe
    except pickle.UnpicklingError:  # appends into placeholders, classes pushed dynamically: pass 3
        return None
    except Exception as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {_one_line(error)} (is the file complete?)") from None


def _read_restricted(path: Path) -> tuple[Any, list[str]]:
    """Pass 3 (module docstring): the restricted pickle module. Returns (checkpoint, replaced names)."""
    replaced: set[str] = set()
    try:
        # weights_only=False only hands the unpickling to the restricted module: its find_class is the only way
        # pickle can reach a callable, and it never imports anything outside the allowlist
        checkpoint = torch.load(path, map_location="cpu", weights_only=False,
                                pickle_module=_restricted_pickle_module(replaced))
    except Exception as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {_one_line(error)} (is the file complete?)") from None
    return checkpoint, sorted(replaced)


def _checked(path: Path, checkpoint: Any, names: list[str], *, notes: list[str] | None) -> Any:
    """Refuse a checkpoint whose tensors sit only inside placeholders; note the replaced classes."""
    listed = f"{', '.join(names[:4])}{f' and {len(names) - 4} more' if len(names) > 4 else ''}"
    if not _holds_tensors(checkpoint):
        raise CheckpointError(
            f"refusing to load {path}: it holds no tensors outside objects of classes that are not unpickled "
            f"({listed or 'none'}); nothing from it was executed. If you trust it, re-save only its tensors "
            "(torch.save(model.state_dict()) or safetensors) and pass that file")
    if notes is not None and names:
        notes.append(f"read without running code: {len(names)} non-weight {'class' if len(names) == 1 else 'classes'}"
                     " became inert placeholders "
                     f"({listed})")
    return checkpoint


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


__all__ = ["CHECKPOINT_SUFFIXES", "InertObject", "SAFE_GLOBALS", "read_checkpoint", "sha256_file"]
