"""The ``weightlight`` command: a LightningCLI whose model and data default to the digits job.

Any LightningModule and LightningDataModule can be chosen by ``class_path``; callbacks, such as
the pruning and quantization callbacks of this package, go under ``trainer.callbacks``.
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_weightlight.demo import DigitsCNN, DigitsDataModule


class WeightlightCLI(LightningCLI):
    """LightningCLI with the digits CNN and data module as defaults."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.set_defaults(
            {
                "model": {"class_path": f"{DigitsCNN.__module__}.{DigitsCNN.__qualname__}"},
                "data": {"class_path": f"{DigitsDataModule.__module__}.{DigitsDataModule.__qualname__}"},
            }
        )


def main(args: list[str] | None = None) -> WeightlightCLI:
    """Run the ``weightlight`` command with ``args`` (the process arguments when ``None``)."""
    return WeightlightCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )


if __name__ == "__main__":
    main()
