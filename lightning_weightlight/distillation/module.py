"""``DistillationModule``: train a student LightningModule from one or more frozen teachers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn
from typing_extensions import override

from lightning_weightlight.distillation.capture import (
    ForwardRecord,
    find_modules,
    record_forward,
    select_output,
)
from lightning_weightlight.distillation.features import (
    FeaturePair,
    add_parameter_group,
    check_feature_pairs,
    make_projection,
)
from lightning_weightlight.distillation.losses import (
    LOGIT_LOSSES,
    agreement,
    feature_distillation_loss,
    logit_distillation_loss,
)
from lightning_weightlight.distillation.teachers import build_teachers, freeze

# Hooks that the wrapper takes from the student as they are, when the student overrides them.
# The hooks with logic of their own (steps, optimizers, setup, checkpoints) call the student inside.
PASS_THROUGH_HOOKS = (
    "prepare_data",
    "teardown",
    "configure_model",
    "configure_callbacks",
    "train_dataloader",
    "val_dataloader",
    "test_dataloader",
    "predict_dataloader",
    "transfer_batch_to_device",
    "on_before_batch_transfer",
    "on_after_batch_transfer",
    "on_fit_start",
    "on_train_start",
    "on_train_end",
    "on_validation_start",
    "on_validation_end",
    "on_test_start",
    "on_test_end",
    "on_predict_start",
    "on_predict_end",
    "on_train_batch_start",
    "on_train_batch_end",
    "on_validation_batch_start",
    "on_validation_batch_end",
    "on_test_batch_start",
    "on_test_batch_end",
    "on_predict_batch_start",
    "on_predict_batch_end",
    "on_train_epoch_start",
    "on_train_epoch_end",
    "on_validation_epoch_start",
    "on_validation_epoch_end",
    "on_test_epoch_start",
    "on_test_epoch_end",
    "on_predict_epoch_start",
    "on_predict_epoch_end",
    "on_before_zero_grad",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "configure_gradient_clipping",
    "lr_scheduler_step",
    "optimizer_step",
    "optimizer_zero_grad",
)


def compression_target(module: nn.Module) -> nn.Module:
    """Return the model that compression callbacks select layers from.

    For a :class:`DistillationModule` this is its student, so that layer patterns use the
    student's own names (``features.0.conv``, not ``student.features.0.conv``). Any other module
    is returned as it is.
    """
    if isinstance(module, DistillationModule):
        return module.student
    return module


class DistillationModule(L.LightningModule):
    """Train ``student`` with its own loss plus a distillation loss from frozen teachers.

    Each training step runs the student's own ``training_step``. A forward hook on the student
    records the first call of its ``forward`` in that step: its output gives the student logits,
    and its positional and keyword arguments are passed unchanged to every teacher. The loss
    returned to Lightning is::

        alpha * student_loss + (1 - alpha) * logit_loss + sum(pair.weight * feature_loss(pair))

    where ``logit_loss`` is ``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` (or MSE
    of the logits), averaged over the teachers with ``teacher_weights``.

    The student's optimizers, LR schedulers, metrics, logging, dataloaders and other hooks are
    used as they are, so its metrics keep their names (``val_acc`` stays ``val_acc``). The
    teachers are kept outside the module tree: they are not in ``parameters()``, the optimizers,
    the ``state_dict`` or the DDP wrapper, stay in eval mode, run under ``torch.no_grad`` and
    follow the student to its device and dtype.

    Logged: ``distill/student_loss``, ``distill/kl_loss`` (or ``distill/mse_loss``),
    ``distill/feature_loss/<student layer>``, ``distill/total_loss`` and
    ``distill/train_agreement`` during training; ``distill/val_agreement`` and
    ``distill/test_agreement`` (share of samples whose top class is the teacher's) in evaluation.

    Args:
        student: The LightningModule to train. It must use automatic optimization and call its
            own ``forward`` (``self(...)``) in ``training_step``.
        teacher: The teacher module, or a list of teachers. In YAML, give ``class_path`` and
            ``init_args``; the weights come from ``teacher_checkpoint``.
        teacher_checkpoint: Checkpoint file of each teacher (Lightning ``.ckpt``, a saved state
            dict or ``.safetensors``), loaded strictly into ``teacher``. Without ``teacher``,
            Lightning checkpoints of the class ``teacher_class_path``.
        teacher_class_path: LightningModule class (``"package.module.Class"``) rebuilt from each
            ``teacher_checkpoint`` with its saved hyperparameters; only when ``teacher`` is None.
        teacher_weights: Weight of each teacher's logit loss; normalised to sum to 1. Equal
            weights by default.
        alpha: Weight of the student's own loss, in [0, 1]; the logit loss gets ``1 - alpha``.
        temperature: Softening temperature ``T`` of the KL loss, greater than 0.
        logit_loss: ``"kl"`` or ``"mse"`` (raw logits, no temperature).
        class_dim: Dimension of the logits that indexes the classes.
        output: Where the logits are in the forward output of student and teachers: ``None``
            for a tensor output, an index into a tuple, or a key or attribute name.
        features: Feature pairs to distill. A pair whose widths differ gets a learned projection
            of the student features: a 1x1 convolution for 4-D maps, a Linear layer over the last
            dimension otherwise, both without bias. Needs the student's ``example_input_array``
            to measure the widths.
        cache_teacher_logits: Compute each training sample's teacher logits once and reuse them.
            Only for training data without random augmentation; the training batches must be
            ``[indices, batch]`` (wrap the dataset in :class:`IndexedDataset`).
        save_teacher: Also store the teachers' weights in checkpoints (under
            ``"distillation_teachers"``, never in ``state_dict``) and restore them on load.
        log_eval_agreement: Run the teachers on validation and test batches to log agreement.

    Example:
        >>> from lightning_weightlight.demo import DigitsCNN
        >>> module = DistillationModule(DigitsCNN(channels=[8, 16, 16], hidden=32), DigitsCNN())
        >>> sum(p.numel() for p in module.parameters()) == sum(p.numel() for p in module.student.parameters())
        True
    """

    def __init__(
        self,
        student: L.LightningModule,
        teacher: nn.Module | list[nn.Module] | None = None,
        teacher_checkpoint: str | list[str] | None = None,
        teacher_class_path: str | None = None,
        teacher_weights: list[float] | None = None,
        alpha: float = 0.1,
        temperature: float = 3.0,
        logit_loss: str = "kl",
        class_dim: int = -1,
        output: str | int | None = None,
        features: list[FeaturePair] | None = None,
        cache_teacher_logits: bool = False,
        save_teacher: bool = False,
        log_eval_agreement: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(student, L.LightningModule):
            raise TypeError(f"student: expected a LightningModule, but got {type(student).__name__}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha: expected a value in [0, 1], but got {alpha}")
        if not temperature > 0:
            raise ValueError(f"temperature: expected a value greater than 0, but got {temperature}")
        if logit_loss not in LOGIT_LOSSES:
            raise ValueError(f"logit_loss: expected one of {LOGIT_LOSSES}, but got {logit_loss!r}")
        if not student.automatic_optimization:
            raise ValueError(
                "student: expected a LightningModule with automatic optimization, but got one with "
                "automatic_optimization=False; its training_step would run backward before the "
                "distillation loss is added"
            )
        self.save_hyperparameters(ignore=["student", "teacher", "features"])

        self.student = student
        self._teachers = build_teachers(teacher, teacher_checkpoint, teacher_class_path)
        self.teacher_weights = self._normalise_weights(teacher_weights, len(self._teachers))
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.logit_loss = logit_loss
        self.class_dim = class_dim
        self.output = output
        self.features = check_feature_pairs(features, len(self._teachers))
        # Plain dicts, so that checkpoints load with torch.load(weights_only=True).
        self.hparams["features"] = [asdict(pair) for pair in self.features]
        self.cache_teacher_logits = cache_teacher_logits
        self.save_teacher = save_teacher
        self.log_eval_agreement = log_eval_agreement
        if cache_teacher_logits and self.features:
            raise ValueError(
                "cache_teacher_logits: expected False when features are distilled, because teacher "
                f"features need a teacher forward at every step, but got True with {len(self.features)} pairs"
            )
        self._logit_cache: dict[int, list[torch.Tensor]] = {}
        self.projections = nn.ModuleDict()
        self._multiple_calls_warned = False

        for name in PASS_THROUGH_HOOKS:
            if is_overridden(name, student, L.LightningModule):
                setattr(self, name, getattr(student, name))

        self._check_layer_names()
        if student.example_input_array is not None:
            self._probe(student.example_input_array)
        elif self.features:
            raise ValueError(
                "features: expected a student with example_input_array set, to measure the feature "
                "widths of each pair before training, but got example_input_array=None"
            )

    # The wrapper's hook name mirrors into the student, so that `self.log` works in its hooks.
    @property
    def _current_fx_name(self) -> str | None:
        return self.__dict__.get("_hook_name")

    @_current_fx_name.setter
    def _current_fx_name(self, name: str | None) -> None:
        self.__dict__["_hook_name"] = name
        student = self.__dict__.get("_modules", {}).get("student")
        if student is not None:
            student._current_fx_name = name

    @property
    def teachers(self) -> tuple[nn.Module, ...]:
        """The frozen teachers, outside the module tree."""
        return tuple(self._teachers)

    @property
    def example_input_array(self) -> Any:
        """The student's example input."""
        return self.student.example_input_array

    @example_input_array.setter
    def example_input_array(self, value: Any) -> None:
        self.student.example_input_array = value

    @staticmethod
    def _normalise_weights(weights: Sequence[float] | None, count: int) -> list[float]:
        if weights is None:
            return [1.0 / count] * count
        weights = [float(weight) for weight in weights]
        if len(weights) != count or any(weight < 0 for weight in weights) or sum(weights) <= 0:
            raise ValueError(
                f"teacher_weights: expected {count} non-negative weights with a positive sum, "
                f"but got {weights}"
            )
        total = sum(weights)
        return [weight / total for weight in weights]

    def _check_layer_names(self) -> None:
        find_modules(self.student, [pair.student for pair in self.features], "features (student)")
        for pair in self.features:
            find_modules(self._teachers[pair.teacher_index], [pair.teacher], "features (teacher)")

    # --- the teachers stay frozen, on the student's device, outside the module tree ----------

    @override
    def train(self, mode: bool = True) -> DistillationModule:
        super().train(mode)
        for teacher in self._teachers:
            teacher.eval()
        return self

    @override
    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        for teacher in self._teachers:
            teacher._apply(fn)
        return self

    @override
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.student(*args, **kwargs)

    def export_student(self) -> L.LightningModule:
        """Return the trained student: its ``state_dict`` has no projection or teacher keys."""
        return self.student

    # --- measuring widths and shapes before training ------------------------------------------

    @torch.no_grad()
    def _probe(self, example: Any) -> None:
        """Run student and teachers once on ``example`` in eval mode to check shapes and build projections."""
        # Lightning's convention: a tuple is positional arguments, a dict keyword arguments.
        if isinstance(example, dict):
            args, kwargs = (), dict(example)
        elif isinstance(example, tuple):
            args, kwargs = example, {}
        else:
            args, kwargs = (example,), {}
        device = next(iter(self.student.parameters()), torch.empty(0)).device
        for teacher in self._teachers:
            teacher.to(device)
        args = tuple(value.to(device) if isinstance(value, torch.Tensor) else value for value in args)
        kwargs = {
            key: value.to(device) if isinstance(value, torch.Tensor) else value
            for key, value in kwargs.items()
        }

        training = {module: module.training for module in self.student.modules()}
        self.student.eval()
        try:
            with record_forward(self.student, [pair.student for pair in self.features]) as student_record:
                self.student(*args, **kwargs)
        finally:
            for module, mode in training.items():
                module.training = mode
        student_logits = select_output(student_record.output, self.output, "student")
        teacher_records = self._run_teachers(args, kwargs, with_features=True)
        for index, record in enumerate(teacher_records):
            teacher_logits = select_output(record.output, self.output, f"teacher {index}")
            if teacher_logits.shape != student_logits.shape:
                raise ValueError(
                    f"teacher: expected teacher {index} to give logits of the student's shape "
                    f"{tuple(student_logits.shape)} on example_input_array, "
                    f"but got {tuple(teacher_logits.shape)}"
                )
        for index, pair in enumerate(self.features):
            student_features = student_record.features[pair.student]
            teacher_features = teacher_records[pair.teacher_index].features[pair.teacher]
            projection = make_projection(index, pair, student_features, teacher_features)
            if projection is not None:
                self.projections[str(index)] = projection.to(device)

    # --- running the teachers ------------------------------------------------------------------

    @torch.no_grad()
    def _run_teachers(self, args: tuple, kwargs: dict, with_features: bool) -> list[ForwardRecord]:
        records = []
        for index, teacher in enumerate(self._teachers):
            layers = (
                [pair.teacher for pair in self.features if pair.teacher_index == index]
                if with_features
                else []
            )
            with record_forward(teacher, layers) as record:
                teacher(*args, **kwargs)
            records.append(record)
        return records

    def _teacher_logits(
        self, record: ForwardRecord, indices: torch.Tensor | None
    ) -> tuple[list[torch.Tensor], list[ForwardRecord]]:
        """Return each teacher's logits for the recorded student input, from the cache when possible."""
        if indices is not None:
            keys = indices.tolist()
            if all(key in self._logit_cache for key in keys):
                rows = [self._logit_cache[key] for key in keys]
                return [torch.stack([row[i] for row in rows]) for i in range(len(self._teachers))], []
        records = self._run_teachers(record.args, record.kwargs, with_features=bool(self.features))
        logits = [select_output(r.output, self.output, f"teacher {i}") for i, r in enumerate(records)]
        if indices is not None:
            # NOTE: the cache keeps one row of logits per training sample on the student's device.
            for position, key in enumerate(indices.tolist()):
                self._logit_cache[key] = [teacher_logits[position].detach() for teacher_logits in logits]
        return logits, records

    def _split_indexed_batch(self, batch: Any) -> tuple[torch.Tensor, Any]:
        if (
            isinstance(batch, (list, tuple))
            and len(batch) == 2
            and isinstance(batch[0], torch.Tensor)
            and batch[0].dim() == 1
            and not batch[0].is_floating_point()
        ):
            return batch[0], batch[1]
        raise ValueError(
            "cache_teacher_logits: expected training batches [indices, batch] with a 1-D integer tensor of "
            f"sample indices first (wrap the training set in IndexedDataset), but got {type(batch).__name__}"
        )

    # --- steps -------------------------------------------------------------------------------------

    @override
    def training_step(self, batch: Any, batch_idx: int, *args: Any, **kwargs: Any) -> Any:
        indices = None
        if self.cache_teacher_logits:
            indices, batch = self._split_indexed_batch(batch)
        with record_forward(self.student, [pair.student for pair in self.features]) as record:
            step_output = self.student.training_step(batch, batch_idx, *args, **kwargs)
        student_loss = self._loss_of(step_output)
        if student_loss is None:
            return step_output
        self._check_recorded(record, "training_step")

        student_logits = select_output(record.output, self.output, "student")
        teacher_logits, teacher_records = self._teacher_logits(record, indices)
        batch_size = student_logits.shape[0]
        distill_loss = sum(
            weight
            * logit_distillation_loss(
                student_logits, logits, self.logit_loss, self.temperature, self.class_dim
            )
            for weight, logits in zip(self.teacher_weights, teacher_logits)
        )
        total = self.alpha * student_loss + (1.0 - self.alpha) * distill_loss

        self.log("distill/student_loss", student_loss, batch_size=batch_size)
        self.log(f"distill/{self.logit_loss}_loss", distill_loss, batch_size=batch_size)
        for index, pair in enumerate(self.features):
            student_features = record.features[pair.student]
            if str(index) in self.projections:
                student_features = self.projections[str(index)](student_features)
            teacher_features = teacher_records[pair.teacher_index].features[pair.teacher]
            feature_loss = feature_distillation_loss(student_features, teacher_features, pair.loss)
            self.log(f"distill/feature_loss/{pair.student}", feature_loss, batch_size=batch_size)
            total = total + pair.weight * feature_loss
        self.log("distill/total_loss", total, batch_size=batch_size)
        self.log(
            "distill/train_agreement", self._agreement(student_logits, teacher_logits), batch_size=batch_size
        )

        if isinstance(step_output, Mapping):
            return {**step_output, "loss": total}
        return total

    @override
    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._evaluation_step("validation_step", "val", *args, **kwargs)

    @override
    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._evaluation_step("test_step", "test", *args, **kwargs)

    @override
    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        return self.student.predict_step(*args, **kwargs)

    def _evaluation_step(self, hook: str, stage: str, *args: Any, **kwargs: Any) -> Any:
        if not is_overridden(hook, self.student, L.LightningModule):
            return None
        with record_forward(self.student, record_call=self.log_eval_agreement) as record:
            step_output = getattr(self.student, hook)(*args, **kwargs)
        if self.log_eval_agreement and record.calls > 0:
            student_logits = select_output(record.output, self.output, "student")
            records = self._run_teachers(record.args, record.kwargs, with_features=False)
            teacher_logits = [
                select_output(r.output, self.output, f"teacher {i}") for i, r in enumerate(records)
            ]
            self.log(
                f"distill/{stage}_agreement",
                self._agreement(student_logits, teacher_logits),
                batch_size=student_logits.shape[0],
            )
        return step_output

    def _agreement(self, student_logits: torch.Tensor, teacher_logits: list[torch.Tensor]) -> torch.Tensor:
        """Agreement of the student with the teachers' weighted average of probabilities."""
        if len(teacher_logits) == 1:
            return agreement(student_logits, teacher_logits[0], self.class_dim)
        probabilities = sum(
            weight * torch.softmax(logits.float(), dim=self.class_dim)
            for weight, logits in zip(self.teacher_weights, teacher_logits)
        )
        return agreement(student_logits, probabilities, self.class_dim)

    @staticmethod
    def _loss_of(step_output: Any) -> torch.Tensor | None:
        if isinstance(step_output, Mapping):
            return step_output.get("loss")
        if step_output is None or isinstance(step_output, torch.Tensor):
            return step_output
        raise TypeError(
            "student: expected training_step to return a loss tensor, a dict with 'loss' or None, "
            f"but got {type(step_output).__name__}"
        )

    def _check_recorded(self, record: ForwardRecord, hook: str) -> None:
        if record.calls == 0:
            raise RuntimeError(
                f"DistillationModule: the student's {hook} never called the student's forward through "
                "self(...), so there are no student logits and no input for the teachers; call self(inputs) "
                "in the student's step"
            )
        if record.calls > 1 and not self._multiple_calls_warned:
            self._multiple_calls_warned = True
            rank_zero_warn(
                f"The student's {hook} called its forward {record.calls} times in one step; "
                "distillation uses the first call."
            )

    # --- optimizers, setup and checkpoints ----------------------------------------------------

    @override
    def configure_optimizers(self) -> Any:
        config = self.student.configure_optimizers()
        parameters = list(self.projections.parameters())
        if not parameters:
            return config
        add_parameter_group(config, parameters)
        return config

    @override
    def setup(self, stage: str) -> None:
        if is_overridden("setup", self.student, L.LightningModule):
            self.student.setup(stage)
        # Another callback may have swapped student layers in its own setup, so check the names again.
        self._check_layer_names()
        for teacher in self._teachers:
            freeze(teacher).to(self.device)

    @override
    def on_fit_end(self) -> None:
        if is_overridden("on_fit_end", self.student, L.LightningModule):
            self.student.on_fit_end()
        student_size = sum(parameter.numel() for parameter in self.student.parameters())
        teacher_sizes = [
            sum(parameter.numel() for parameter in teacher.parameters()) for teacher in self._teachers
        ]
        metrics = self.trainer.callback_metrics
        last = ", ".join(
            f"{name}={float(value):.4f}" for name, value in metrics.items() if name.startswith("distill/")
        )
        teachers = ", ".join(f"{size:,}" for size in teacher_sizes)
        rank_zero_info(
            f"DistillationModule: student {student_size:,} parameters, "
            f"{'teacher' if len(teacher_sizes) == 1 else 'teachers'} {teachers} parameters "
            f"({teacher_sizes[0] / max(student_size, 1):.1f}x the student for the first); last logged: {last}"
        )

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.save_teacher:
            checkpoint["distillation_teachers"] = [teacher.state_dict() for teacher in self._teachers]
        if is_overridden("on_save_checkpoint", self.student, L.LightningModule):
            self.student.on_save_checkpoint(checkpoint)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("distillation_teachers")
        if self.save_teacher and saved is not None:
            if len(saved) != len(self._teachers):
                raise ValueError(
                    f"checkpoint: expected {len(self._teachers)} saved teachers, but got {len(saved)}"
                )
            for teacher, state in zip(self._teachers, saved):
                teacher.load_state_dict(state, strict=True)
        if is_overridden("on_load_checkpoint", self.student, L.LightningModule):
            self.student.on_load_checkpoint(checkpoint)
