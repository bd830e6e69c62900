"""``save_compressed`` and ``load_compressed``: one safetensors file that loads without running code.

The file is a plain safetensors file whose tensors are the model's ``state_dict``. Its metadata
key ``weightlight`` contains a JSON document: the format version, the package version, how to
build the model (class path and constructor arguments), the class and arguments of every replaced
or reshaped leaf module, and a SHA-256 digest of that document and every tensor. Loading parses JSON
and raw tensor bytes only: nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import struct
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from lightning_weightlight.export.modules import build_module, describe_module

log = logging.getLogger(__name__)

FORMAT_NAME = "lightning-weightlight-compressed"
FORMAT_VERSION = 1
"""Version of the file layout this package writes; it reads this version and older ones."""

METADATA_KEY = "weightlight"
TRUSTED_MODULES = ("lightning_weightlight",)
"""Modules from which a model class may be imported by name while loading."""

_MAX_HEADER_BYTES = 100 * 1024 * 1024


class CompressedFileError(ValueError):
    """A compressed file is truncated, corrupted, of a newer format version, or not such a file."""


def _package_version() -> str:
    from lightning_weightlight import __version__

    return __version__


def _tensor_digest(document: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps(document, sort_keys=True).encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous()
        digest.update(f"\0{name}\0{tensor.dtype}\0{list(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _json_mapping(value: Any, argument: str) -> dict[str, Any]:
    """Return ``value`` as it reads back from standard JSON, or raise ``TypeError`` naming ``argument``."""
    if not isinstance(value, Mapping):
        raise TypeError(f"save_compressed: {argument}: expected a mapping, but got {type(value).__name__}")
    try:
        return json.loads(json.dumps(dict(value), allow_nan=False))
    except (TypeError, ValueError) as err:
        raise TypeError(f"save_compressed: {argument}: expected JSON-serialisable values, but {err}") from err


def _json_arguments(model: nn.Module, init_args: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if init_args is not None:
        return _json_mapping(init_args, "init_args")  # the caller's arguments are stored as given
    hparams = getattr(model, "hparams", None)
    if not hparams:
        return None
    arguments = {key: value for key, value in dict(hparams).items() if not key.startswith("_")}
    try:
        return _json_mapping(arguments, "hparams")
    except TypeError as err:
        log.warning(
            "save_compressed: the constructor arguments of %s are not JSON-serialisable (%s), so the file "
            "records none and load_compressed needs model=",
            type(model).__qualname__,
            err.__cause__,
        )
        return None


def split_shared_tensors(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Split a state dict into CPU tensors stored once and aliases ``{name: name stored}``.

    safetensors rejects tensors that share memory, so a tied weight is stored under its first name.
    """
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple[int, ...], tuple[int, ...], torch.dtype], str] = {}
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(
                "save_compressed: expected only tensors in the state_dict, "
                f"but {name!r} is {type(tensor).__name__}"
            )
        tensor = tensor.detach().cpu()
        key = (
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
            tuple(tensor.stride()),
            tensor.dtype,
        )
        if tensor.numel() > 0 and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = tensor.contiguous().clone()
    return tensors, aliases


def _is_unsaveable_package_module(module: nn.Module) -> bool:
    """Return whether ``module`` is one of this package's layers with tensors but no JSON description."""
    own_tensors = any(True for _ in module.parameters(recurse=False)) or any(
        True for _ in module.buffers(recurse=False)
    )
    return own_tensors and type(module).__module__.startswith("lightning_weightlight.")


def describe_model(model: nn.Module, init_args: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Describe how to rebuild ``model``: class path, constructor arguments and leaf modules."""
    cls = type(model)
    modules = []
    for name, module in model.named_modules():
        description = describe_module(module) if name else None
        if description is not None:
            modules.append({"name": name, **description})
        elif name and _is_unsaveable_package_module(module):
            raise TypeError(
                f"save_compressed: layer {name!r} ({type(module).__name__}) is a training module, which a "
                "compressed file cannot describe; run compress() first to convert training modules, or keep "
                "the layer in float"
            )
    return {
        "class_path": f"{cls.__module__}.{cls.__qualname__}",
        "init_args": _json_arguments(model, init_args),
        "modules": modules,
    }


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path`` and rename it, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
    )
    try:
        with handle:
            handle.write(data)
            handle.flush()
            # NamedTemporaryFile creates the file with mode 0600; give it the mode a plain open()
            # would, so that a serving process of another user can read the model.
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(handle.fileno(), 0o666 & ~umask)
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
    try:
        directory = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _unloadable_layer(model: nn.Module) -> tuple[str, Exception] | None:
    """Return the name and error of the first described layer that its own tensors would not load into.

    Each layer is rebuilt from its description, as :func:`load_compressed` rebuilds it, and loads
    its own state dict, which runs every check of a load (shapes, dtypes, indices, scales).
    """
    for name, module in model.named_modules():
        description = describe_module(module)
        if description is None:
            continue
        try:
            build_module(description).load_state_dict(module.state_dict(), strict=True)
        except (ValueError, RuntimeError) as err:
            return name or type(module).__name__, err
    return None


def save_compressed(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    init_args: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Save a (compressed) model to one safetensors file with its structure in JSON metadata.

    Args:
        model: The model, usually the output of :func:`~lightning_weightlight.compress`.
        path: The file to write. The write is atomic: a crash leaves an older file at ``path`` intact.
        init_args: Constructor arguments of the model's class. By default a LightningModule's
            ``hparams``; a model without them is saved without arguments and loads with ``model=``.
        metadata: Extra JSON-serialisable information stored under ``"user"`` (for example the
            training configuration).

    Returns:
        The path written.

    Raises:
        ValueError: A layer's tensors fail the checks that loading applies (a shape or dtype,
            an index out of range, a scale that is not positive and finite); nothing is written.

    Example:
        >>> import tempfile
        >>> model = nn.Sequential(nn.Linear(4, 2))
        >>> path = save_compressed(model, Path(tempfile.mkdtemp()) / "model.safetensors")
        >>> loaded = load_compressed(path, model=nn.Sequential(nn.Linear(4, 2)))
        >>> torch.equal(loaded[0].weight, model[0].weight)
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"save_compressed: expected an nn.Module, but got {type(model).__name__}")
    invalid = _unloadable_layer(model)
    if invalid is not None:
        name, err = invalid
        raise ValueError(
            f"save_compressed: the stored tensors of layer {name!r} are invalid, so nothing was written: "
            f"{err}"
        )
    path = Path(path)
    tensors, aliases = split_shared_tensors(model.state_dict())
    document = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "package_version": _package_version(),
        "torch_version": torch.__version__,
        "model": describe_model(model, init_args),
        "aliases": aliases,
        "user": _json_mapping({} if metadata is None else metadata, "metadata"),
    }
    document["sha256"] = _tensor_digest(document, tensors)
    data = safetensors.torch.save(tensors, metadata={METADATA_KEY: json.dumps(document)})
    _atomic_write(path, data)
    return path


def _read_header(path: Path, data: bytes) -> dict[str, Any]:
    if len(data) < 8:
        raise CompressedFileError(
            f"{path}: the file is {len(data)} bytes, too short for a safetensors header"
        )
    (header_size,) = struct.unpack("<Q", data[:8])
    if header_size > min(len(data) - 8, _MAX_HEADER_BYTES):
        raise CompressedFileError(
            f"{path}: not a lightning-weightlight compressed file, or truncated: the first 8 bytes give a "
            f"header of {header_size} bytes but the file has {len(data) - 8} more"
        )
    try:
        header = json.loads(data[8 : 8 + header_size])
    except (UnicodeDecodeError, ValueError) as err:
        raise CompressedFileError(f"{path}: the safetensors header is not valid JSON: {err}") from err
    if not isinstance(header, dict):
        raise CompressedFileError(f"{path}: the safetensors header is not a JSON object")

    payload = len(data) - 8 - header_size
    try:
        ends = [int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"]
    except (KeyError, TypeError, IndexError, ValueError) as err:
        raise CompressedFileError(
            f"{path}: the safetensors header has an invalid tensor entry: {err!r}"
        ) from err
    expected = max(ends, default=0)
    if payload != expected:
        raise CompressedFileError(
            f"{path}: the tensor data is {payload} bytes but the header describes {expected}; "
            "the file is truncated or was changed"
        )
    return header


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check the JSON document of a compressed file without building the model.

    Raises:
        CompressedFileError: The file is not a compressed file of this package or is of a newer
            format version.
    """
    path = Path(path)
    return _read_document(path, path.read_bytes())


def _read_document(path: Path, data: bytes) -> dict[str, Any]:
    header = _read_header(path, data)
    raw = (header.get("__metadata__") or {}).get(METADATA_KEY)
    if raw is None:
        raise CompressedFileError(
            f"{path}: a safetensors file without the {METADATA_KEY!r} metadata of a lightning-weightlight "
            "compressed file; save it with save_compressed"
        )
    try:
        document = json.loads(raw)
    except ValueError as err:
        raise CompressedFileError(f"{path}: the {METADATA_KEY!r} metadata is not valid JSON: {err}") from err
    if not isinstance(document, dict) or document.get("format") != FORMAT_NAME:
        raise CompressedFileError(f"{path}: expected format {FORMAT_NAME!r} in the metadata")
    version = document.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CompressedFileError(f"{path}: expected a positive integer format_version, but got {version!r}")
    if version > FORMAT_VERSION:
        raise CompressedFileError(
            f"{path}: written in format version {version} by lightning-weightlight "
            f"{document.get('package_version')}, but this installation ({_package_version()}) reads "
            f"versions up to {FORMAT_VERSION}; upgrade lightning-weightlight to load it"
        )
    return document


def _resolve_class(path: Path, class_path: str, trusted_modules: Sequence[str]) -> type[nn.Module]:
    module_name, _, qualname = class_path.rpartition(".")
    trusted = any(module_name == root or module_name.startswith(root + ".") for root in trusted_modules)
    if module_name in sys.modules:
        module = sys.modules[module_name]
    elif trusted:
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise CompressedFileError(
                f"{path}: model class {class_path!r}: cannot import {module_name!r}: {err}; install the "
                "package that defines it, or pass model="
            ) from err
    else:
        raise CompressedFileError(
            f"{path}: model class {class_path!r}: its module is neither imported nor under trusted_modules "
            f"{list(trusted_modules)}; import it first, add it to trusted_modules, or pass model="
        )
    cls: Any = module
    for part in qualname.split("."):
        cls = getattr(cls, part, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise CompressedFileError(
            f"{path}: model class {class_path!r}: expected an nn.Module subclass, but got {cls!r}"
        )
    return cls


def _build_model(path: Path, model_info: Mapping[str, Any], trusted_modules: Sequence[str]) -> nn.Module:
    class_path = model_info.get("class_path")
    init_args = model_info.get("init_args")
    if not isinstance(class_path, str) or "." not in class_path:
        raise CompressedFileError(
            f"{path}: expected the model's class path (module.Class), but got {class_path!r}; pass model= "
            "with an instance of the original architecture"
        )
    if init_args is None:
        raise CompressedFileError(
            f"{path}: the file records no constructor arguments for {class_path!r}; pass model= with an "
            "instance of the original architecture"
        )
    cls = _resolve_class(path, str(class_path), trusted_modules)
    if not isinstance(init_args, dict):
        raise CompressedFileError(
            f"{path}: expected a JSON object of constructor arguments, but got {init_args!r}"
        )
    try:
        return cls(**init_args)
    except Exception as err:  # the model's own constructor: any error means these arguments do not fit it
        raise CompressedFileError(
            f"{path}: {class_path}(**{init_args!r}) failed: {err}; pass model= with an instance of the "
            "original architecture"
        ) from err


def _load_recorded_layers(
    path: Path, model: nn.Module, entries: list[dict[str, Any]], state: dict[str, torch.Tensor]
) -> dict[str, nn.Module]:
    """Build the recorded layers and load their tensors, without changing ``model``."""
    layers: dict[str, nn.Module] = {}
    for entry in entries:
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise CompressedFileError(
                f"{path}: expected a non-empty string as a recorded layer's name, but got {name!r}"
            )
        if any(name.startswith(f"{other}.") or other.startswith(f"{name}.") for other in layers):
            raise CompressedFileError(
                f"{path}: the recorded layer {name!r} is nested in another recorded layer"
            )
        if _submodule_or_none(model, name) is None:
            raise CompressedFileError(
                f"{path}: the file records layer {name!r} ({entry.get('class')}), but the model has no "
                "module there; pass an instance of the model the file was saved from"
            )
        prefix = f"{name}."
        stored = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
        try:
            # Check the shapes on a meta-device copy first (no memory), so that a forged size
            # cannot make the loader allocate it.
            with torch.device("meta"):
                expected = build_module(entry).state_dict()
            if problems := _tensor_mismatches(expected, stored, "the recorded layer"):
                raise CompressedFileError(
                    f"{path}: the stored tensors of layer {name!r} do not fit its recorded arguments: "
                    f"{'; '.join(problems)}; the file is inconsistent"
                )
            layer = build_module(entry)
        except CompressedFileError:
            raise
        except Exception as err:  # torch's layer constructors raise several types for bad arguments
            raise CompressedFileError(f"{path}: cannot build layer {name!r}: {err}") from err
        try:
            layer.load_state_dict(stored)
        except (ValueError, RuntimeError) as err:  # a deploy module's checks, or torch's shape checks
            raise CompressedFileError(
                f"{path}: the stored tensors are invalid: layer {name!r}: {err}"
            ) from err
        layers[name] = layer
    return layers


def _tensor_mismatches(
    expected: Mapping[str, torch.Tensor], stored: Mapping[str, torch.Tensor], owner: str
) -> list[str]:
    """Describe the names and shapes in which ``stored`` differs from ``expected`` (those of ``owner``)."""
    problems = []
    if missing := sorted(expected.keys() - stored.keys()):
        problems.append(f"{owner} has tensors that the file lacks: {missing}")
    if unexpected := sorted(stored.keys() - expected.keys()):
        problems.append(f"the file has tensors that {owner} lacks: {unexpected}")
    for key in sorted(expected.keys() & stored.keys()):
        if stored[key].shape != expected[key].shape:
            shapes = f"{tuple(stored[key].shape)} in the file and {tuple(expected[key].shape)} in {owner}"
            problems.append(f"{key} has shape {shapes}")
    return problems


def _submodule_or_none(model: nn.Module, name: str) -> nn.Module | None:
    """Return the submodule at ``name``, reading only registered submodules (no properties)."""
    module: nn.Module | None = model
    for part in name.split("."):
        module = module._modules.get(part) if isinstance(module, nn.Module) else None
    return module


def _check_other_tensors(
    path: Path,
    current: Mapping[str, torch.Tensor],
    layers: dict[str, nn.Module],
    state: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Check the tensors outside the recorded layers against the model's ``current`` ones and return them."""
    prefixes = tuple(f"{name}." for name in layers)
    expected = {key: value for key, value in current.items() if not key.startswith(prefixes)}
    stored = {key: value for key, value in state.items() if not key.startswith(prefixes)}
    if problems := _tensor_mismatches(expected, stored, "the model"):
        raise CompressedFileError(
            f"{path}: the stored tensors do not fit the model: {'; '.join(problems)}; pass an instance of "
            "the model the file was saved from"
        )
    return stored


def load_compressed(
    path: str | os.PathLike,
    *,
    model: nn.Module | None = None,
    trusted_modules: Sequence[str] = (),
) -> nn.Module:
    """Load a model saved by :func:`save_compressed`, in eval mode.

    The model is built from the class path and constructor arguments in the file, unless ``model``
    is given as the skeleton. Then every recorded leaf module is rebuilt from the allow-list of
    deploy and plain torch layers, and the tensors load with ``strict=True``.

    Args:
        path: The file to read.
        model: An instance of the original architecture to load into, modified in place. A load
            that raises leaves its modules and tensors as they were (other state that the model's
            own load hooks change is not restored). Needed when the file records no constructor
            arguments.
        trusted_modules: Modules, besides ``lightning_weightlight``, from which the model class may
            be imported. A class whose module is already imported is always found.

    Raises:
        CompressedFileError: The file is truncated, changed after writing, of a newer format
            version, or not a compressed file of this package.
    """
    if model is not None and not isinstance(model, nn.Module):
        got = f"the class {model.__name__}" if isinstance(model, type) else f"a {type(model).__name__}"
        raise TypeError(
            f"load_compressed: model: expected an nn.Module instance to load into, but got {got}; pass an "
            "instance such as model=MyModel()"
        )
    if isinstance(trusted_modules, str):
        raise TypeError(
            f"load_compressed: trusted_modules: expected a list of module names, but got the string "
            f"{trusted_modules!r}; pass [{trusted_modules!r}]"
        )
    if not (isinstance(trusted_modules, Sequence) and all(isinstance(name, str) for name in trusted_modules)):
        raise TypeError(
            f"load_compressed: trusted_modules: expected a list of module names, but got {trusted_modules!r}"
        )
    path = Path(path)
    data = path.read_bytes()
    document = _read_document(path, data)
    try:
        tensors = safetensors.torch.load(data)
    except Exception as err:  # safetensors raises its own error type for every malformed payload
        raise CompressedFileError(f"{path}: the tensor data cannot be read: {err}") from err
    stored = {key: value for key, value in document.items() if key != "sha256"}
    if _tensor_digest(stored, tensors) != document.get("sha256"):
        raise CompressedFileError(
            f"{path}: the SHA-256 digest of the metadata and tensors does not match the one stored in the "
            "file; the file is corrupted"
        )

    model_info = document.get("model")
    entries = model_info.get("modules", []) if isinstance(model_info, dict) else None
    aliases = document.get("aliases", {})
    if not (
        isinstance(entries, list)
        and all(isinstance(entry, dict) for entry in entries)
        and isinstance(aliases, dict)
        and all(isinstance(target, str) for target in aliases.values())
    ):
        raise CompressedFileError(
            f"{path}: the metadata does not describe the model (expected a 'model' object with a list of "
            "'modules' and an 'aliases' object of names); the file was not written by save_compressed"
        )
    if model is None:
        model = _build_model(path, model_info, tuple(TRUSTED_MODULES) + tuple(trusted_modules))
    state = dict(tensors)
    for name, target in aliases.items():
        if target not in tensors:
            raise CompressedFileError(
                f"{path}: tensor {name!r} is stored as {target!r}, which the file lacks"
            )
        state[name] = tensors[target]
    layers = _load_recorded_layers(path, model, entries, state)
    current = model.state_dict()
    other = _check_other_tensors(path, current, layers, state)

    # Every check has passed: only now is the given model changed. The recorded layers hold their
    # tensors already, so placeholders without tensors stand in for them while the rest loads.
    originals = {name: _submodule_or_none(model, name) for name in layers}
    backup = {key: current[key].clone() for key in other}
    try:
        for name in layers:
            model.set_submodule(name, nn.Identity())
        model.load_state_dict(other, strict=True)
    except BaseException as err:  # a load hook of the model's own modules, or an interrupt
        for name, original in originals.items():
            model.set_submodule(name, original)
        with torch.no_grad():
            for key, value in backup.items():
                current[key].copy_(value)
        if not isinstance(err, Exception):
            raise
        raise CompressedFileError(f"{path}: loading the stored tensors into the model failed: {err}") from err
    for name, layer in layers.items():
        model.set_submodule(name, layer)
    _tie_parameters(model, aliases)
    return model.eval()


def _tie_parameters(model: nn.Module, aliases: Mapping[str, str]) -> None:
    """Share again the parameters and buffers that the saved model shared (rebuilt layers hold copies)."""
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    for name, target in aliases.items():
        alias, shared = tensors.get(name), tensors.get(target)
        if alias is None or shared is None or alias is shared:
            continue
        same_kind = isinstance(alias, nn.Parameter) == isinstance(shared, nn.Parameter)
        if same_kind and alias.shape == shared.shape and alias.dtype == shared.dtype:
            owner, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(owner), attribute, shared)
