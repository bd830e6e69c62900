"""``CompressionReportCallback``: compress the model at the end of fit and log a report on it."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_weightlight.export import compress, save_compressed
from lightning_weightlight.report.compression_report import CompressionReport


class CompressionReportCallback(L.Callback):
    """Compress the model at the end of fit and log a :class:`CompressionReport` against it.

    The trained model (float, as training left it) is the dense side; its :func:`compress`-ed copy
    the compressed side. The headline numbers go to the Trainer's logger, the table to the log, and
    ``report.md``, ``report.json`` and ``report.png`` to ``output_dir``. Runs on rank zero only.

    Args:
        dataloader: ``"val"`` or ``"test"``: the datamodule's dataloader that the report evaluates.
        batch_sizes: Batch sizes at which latency is measured.
        output_dir: Folder of the report files; ``<trainer.log_dir>/compression_report`` by default.
        save_path: Also save the compressed model to this file with ``save_compressed``.
        quantize: Passed to :func:`compress`: allow int8 kernels.
        batch_rows: Passed to :func:`compress`: typical rows per call for the kernel choice.
        threads: Torch threads during the latency measurement.
        warmup: Calls before timing starts.
        repeats: Timed calls per batch size.
        max_batches: Evaluate at most this many batches.
    """

    def __init__(
        self,
        dataloader: str = "val",
        batch_sizes: Sequence[int] = (1, 32),
        output_dir: str | None = None,
        save_path: str | None = None,
        quantize: bool = True,
        batch_rows: int = 1,
        threads: int | None = 1,
        warmup: int = 5,
        repeats: int = 20,
        max_batches: int | None = None,
    ) -> None:
        super().__init__()
        if dataloader not in ("val", "test"):
            raise ValueError(f"dataloader: expected 'val' or 'test', but got {dataloader!r}")
        batch_sizes = list(batch_sizes)
        if not batch_sizes or any(not isinstance(size, int) or size < 1 for size in batch_sizes):
            raise ValueError(
                f"batch_sizes: expected a non-empty list of positive integers, but got {batch_sizes}"
            )
        # Checked here, so that a bad value stops the run before training rather than after it.
        for name, value, smallest, optional in (
            ("batch_rows", batch_rows, 1, False),
            ("threads", threads, 1, True),
            ("warmup", warmup, 0, False),
            ("repeats", repeats, 1, False),
            ("max_batches", max_batches, 1, True),
        ):
            if optional and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < smallest:
                allowed = f"an integer of at least {smallest}" + (" or None" if optional else "")
                raise ValueError(f"{name}: expected {allowed}, but got {value!r}")
        self.dataloader = dataloader
        self.batch_sizes = batch_sizes
        self.output_dir = output_dir
        self.save_path = save_path
        self.compress_kwargs = {"quantize": quantize, "batch_rows": batch_rows}
        self.report_kwargs = {
            "threads": threads,
            "warmup": warmup,
            "repeats": repeats,
            "max_batches": max_batches,
        }
        self.report: CompressionReport | None = None

    def _dataloader(self, trainer: L.Trainer) -> Iterable[Any]:
        datamodule = trainer.datamodule
        if datamodule is not None:
            if self.dataloader == "val":
                return datamodule.val_dataloader()
            datamodule.setup("test")
            return datamodule.test_dataloader()
        loaders = trainer.val_dataloaders if self.dataloader == "val" else trainer.test_dataloaders
        if loaders is None:
            raise ValueError(
                f"dataloader: {self.dataloader!r} needs a datamodule or {self.dataloader} dataloaders in fit"
            )
        return loaders

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        dense = copy.deepcopy(pl_module).cpu()
        compressed = compress(dense, **self.compress_kwargs)
        self.report = CompressionReport(
            dense, compressed, self._dataloader(trainer), batch_sizes=self.batch_sizes, **self.report_kwargs
        )
        if trainer.logger is not None:
            trainer.logger.log_metrics(self.report.metrics(), step=trainer.global_step)
        output_dir = Path(
            self.output_dir or Path(trainer.log_dir or trainer.default_root_dir) / "compression_report"
        )
        paths = self.report.save(output_dir)
        if self.save_path is not None:
            save_compressed(compressed, self.save_path)
        rank_zero_info(f"Compression report ({paths['markdown'].parent}):\n{self.report.to_table()}")
