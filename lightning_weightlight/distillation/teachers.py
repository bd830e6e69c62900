"""Build frozen teachers from modules, checkpoints and class paths; read student weights back out."""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import Dataset

STUDENT_PREFIX = "student."
"""Prefix of the student's keys in the state dict of a ``DistillationModule``."""


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read model weights from a Lightning checkpoint, a ``torch.save``-d state dict or a safetensors file.

    A Lightning checkpoint's weights are its ``"state_dict"`` entry. Files are read on the CPU with
    ``torch.load(weights_only=True)``, which loads tensors and plain containers only.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"teacher_checkpoint: file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    content = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(content, Mapping) and "state_dict" in content:
        content = content["state_dict"]
    if not isinstance(content, Mapping):
        raise ValueError(
            f"teacher_checkpoint: expected a state dict or a Lightning checkpoint in {path}, "
            f"but got {type(content).__name__}"
        )
    return dict(content)


def import_class(class_path: str, argument: str) -> type:
    """Import ``"package.module.Class"`` and return the class."""
    module_name, _, class_name = class_path.rpartition(".")
    if not module_name:
        raise ValueError(f"{argument}: expected a dotted path 'package.module.Class', but got {class_path!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(
            f"{argument}: cannot import module {module_name!r} of {class_path!r}: {err}"
        ) from err
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        raise ValueError(f"{argument}: module {module_name!r} has no class {class_name!r}")
    return cls


def freeze(module: nn.Module) -> nn.Module:
    """Put ``module`` in eval mode and turn off gradients of all its parameters; return it."""
    module.eval()
    module.requires_grad_(False)
    return module


def _as_list(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, (str, Path, nn.Module)):
        return [value]
    return list(value)


def build_teachers(
    teacher: nn.Module | Sequence[nn.Module] | None,
    teacher_checkpoint: str | Sequence[str] | None,
    teacher_class_path: str | None,
) -> list[nn.Module]:
    """Return the frozen teachers described by the three teacher arguments of ``DistillationModule``.

    With ``teacher`` given, each checkpoint of ``teacher_checkpoint`` (one per teacher, or none)
    is loaded strictly into the matching module. Without ``teacher``, each checkpoint is a
    Lightning checkpoint of the LightningModule class ``teacher_class_path``, rebuilt with the
    hyperparameters saved in it by ``load_from_checkpoint``.
    """
    modules = _as_list(teacher)
    checkpoints = [str(path) for path in _as_list(teacher_checkpoint)]
    for index, module in enumerate(modules):
        if not isinstance(module, nn.Module):
            raise TypeError(f"teacher[{index}]: expected an nn.Module, but got {type(module).__name__}")

    if modules:
        if teacher_class_path is not None:
            raise ValueError(
                "teacher_class_path: expected None when teacher is given (the class is the teacher's own), "
                f"but got {teacher_class_path!r}"
            )
        if checkpoints and len(checkpoints) != len(modules):
            raise ValueError(
                f"teacher_checkpoint: expected one checkpoint per teacher ({len(modules)}), "
                f"but got {len(checkpoints)}: {checkpoints}"
            )
        for module, path in zip(modules, checkpoints):
            module.load_state_dict(load_state_dict_file(path), strict=True)
        return [freeze(module) for module in modules]

    if not checkpoints or teacher_class_path is None:
        raise ValueError(
            "teacher: expected an nn.Module (or a list of them), or teacher_checkpoint together with "
            f"teacher_class_path, but got teacher=None, teacher_checkpoint={teacher_checkpoint!r}, "
            f"teacher_class_path={teacher_class_path!r}"
        )
    cls = import_class(teacher_class_path, "teacher_class_path")
    if not issubclass(cls, L.LightningModule):
        raise ValueError(
            f"teacher_class_path: expected a LightningModule class to rebuild from its checkpoint, but got "
            f"{teacher_class_path!r}; for another nn.Module pass teacher with class_path and init_args"
        )
    for path in checkpoints:
        if not Path(path).is_file():
            raise FileNotFoundError(f"teacher_checkpoint: file not found: {path}")
    return [freeze(cls.load_from_checkpoint(path, map_location="cpu")) for path in checkpoints]


def student_state_dict(checkpoint: str | Path | Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Extract the student's weights from a ``DistillationModule`` checkpoint or state dict.

    The result has the student's own key names (no ``student.`` prefix, no projection or teacher
    keys), so it loads with ``strict=True`` into a fresh instance of the student's class.

    Args:
        checkpoint: Path of a Lightning checkpoint, a loaded checkpoint dict, or the state dict
            of a ``DistillationModule``.
    """
    if isinstance(checkpoint, (str, Path)):
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state = checkpoint.get("state_dict", checkpoint)
    weights = {
        key[len(STUDENT_PREFIX) :]: value for key, value in state.items() if key.startswith(STUDENT_PREFIX)
    }
    if not weights:
        raise ValueError(
            f"checkpoint: expected keys starting with {STUDENT_PREFIX!r} from a DistillationModule, "
            f"but got {list(state)[:5]}"
        )
    return weights


class IndexedDataset(Dataset):
    """Dataset that returns ``(index, sample)``, so that teacher logits can be cached per sample.

    Wrap the training set in it when ``DistillationModule(cache_teacher_logits=True)``: the
    default collate function then gives batches ``[indices, batch]``, and the module passes
    ``batch`` on to the student unchanged.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> data = IndexedDataset(TensorDataset(torch.arange(3.0)))
        >>> data[2]
        (2, (tensor(2.),))
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, Any]:
        return index, self.dataset[index]
