"""The ``weightlight`` command: a LightningCLI whose model and data default to the digits job.

Any LightningModule and LightningDataModule can be chosen by ``class_path``; callbacks, such as
the pruning and quantization callbacks of this package, go under ``trainer.callbacks``.

Besides LightningCLI's ``fit``, ``validate``, ``test`` and ``predict``, two subcommands work on
a trained checkpoint with the same configuration file:

* ``weightlight compress --config C --ckpt_path K --output F`` compresses the model and saves it.
* ``weightlight report --config C --ckpt_path K [--compressed F]`` prints and saves a
  :class:`~lightning_weightlight.report.CompressionReport` of the dense against the compressed model.
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_weightlight.demo import DigitsCNN, DigitsDataModule

COMPRESSION_COMMANDS = ("compress", "report")


def _package_error(err: BaseException) -> BaseException | None:
    """Return the innermost ValueError or TypeError in ``err``'s chain that this package raised."""
    found = None
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (ValueError, TypeError)) and _raised_in_package(current):
            found = current
        current = current.__cause__ or current.__context__
    return found


def _raised_in_package(err: BaseException) -> bool:
    frame = err.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    return frame is not None and "lightning_weightlight" in Path(frame.tb_frame.f_code.co_filename).parts


class WeightlightCLI(LightningCLI):
    """LightningCLI with the digits CNN and data module as defaults.

    ``usage_parser`` reports usage errors in place of the LightningCLI parser; the compress and
    report commands pass their own, whose usage fits in a few lines.
    """

    def __init__(
        self, *args: Any, usage_parser: argparse.ArgumentParser | None = None, **kwargs: Any
    ) -> None:
        self.usage_parser = usage_parser
        super().__init__(*args, **kwargs)

    def instantiate_classes(self) -> None:
        """Instantiate the configured classes, reporting a bad argument to one of ours in one line.

        jsonargparse wraps the ValueError of, for example, ``WeightPruning(sparsity=1.5)`` in a
        page of traceback and union-type messages. The package's own message names the argument,
        the value and what to do, so it is printed alone, with the exit status 2 of a usage error.
        """
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as err:
            reason = _package_error(err)
            if reason is None:
                raise
            (self.usage_parser or self.parser).error(str(reason))

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.set_defaults(
            {
                "model": {"class_path": f"{DigitsCNN.__module__}.{DigitsCNN.__qualname__}"},
                "data": {"class_path": f"{DigitsDataModule.__module__}.{DigitsDataModule.__qualname__}"},
            }
        )


def _build_cli(args: list[str]) -> WeightlightCLI:
    return WeightlightCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )


def _positive_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, but got {text!r}") from err
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, but got {text!r}")
    return sizes


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a positive integer, but got {text!r}") from err
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, but got {text!r}")
    return value


def _existing_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text!r}")
    return path


def _compression_parser(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"weightlight {command}",
        description=(
            "Restore a trained checkpoint with the fit configuration (callbacks replay their structural "
            "edits), then "
            + (
                "compress it and save one file."
                if command == "compress"
                else "report dense against compressed."
            )
            + " Every other option (--config, --model.*, --data.*, --trainer.*) goes to LightningCLI."
        ),
    )
    parser.add_argument(
        "--ckpt_path", required=True, type=_existing_file, help="checkpoint of the trained model"
    )
    parser.add_argument("--no_quantize", action="store_true", help="choose only float kernels (no int8)")
    parser.add_argument(
        "--batch_rows", type=_positive_int, default=1, help="typical rows per call for the kernel choice"
    )
    if command == "compress":
        parser.add_argument("--output", required=True, type=Path, help="file to write (safetensors)")
    else:
        parser.add_argument(
            "--compressed",
            type=_existing_file,
            help="compressed file to report on (without it, the checkpoint is compressed again)",
        )
        parser.add_argument(
            "--output_dir", type=Path, default=Path("compression_report"), help="folder of the report"
        )
        parser.add_argument(
            "--batch_sizes", type=_positive_sizes, default=[1, 32], help="latency batch sizes, e.g. 1,32"
        )
        parser.add_argument(
            "--threads", type=_positive_int, default=1, help="torch threads during the latency measurement"
        )
        parser.add_argument(
            "--repeats", type=_positive_int, default=20, help="timed calls per batch size (median reported)"
        )
        parser.add_argument("--dataloader", choices=("val", "test"), default="test", help="data to evaluate")
    return parser


def run_compression_command(command: str, args: list[str]) -> object:
    """Run ``weightlight compress`` or ``weightlight report`` with ``args`` after the subcommand name."""
    from lightning_weightlight.export import (
        CompressedFileError,
        compress,
        load_compressed,
        read_metadata,
        save_compressed,
    )
    from lightning_weightlight.report import CompressionReport

    parser = _compression_parser(command)
    options, rest = parser.parse_known_args(args)
    if getattr(options, "compressed", None) is not None:
        try:  # before the checkpoint is loaded and validated
            read_metadata(options.compressed)
        except (CompressedFileError, OSError) as err:
            parser.error(f"--compressed: {err}")
    with warnings.catch_warnings():
        # Two Lightning warnings do not concern the user here. The LightningCLI arguments come from
        # this command's own parsing, and the checkpoint's ModelCheckpoint state names the folder
        # of the fit run.
        warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python")
        warnings.filterwarnings("ignore", message=".*The dirpath has changed from")
        # The trainer only restores the checkpoint and validates, so it writes no logs (the last
        # --trainer.logger wins over the config's).
        cli = WeightlightCLI(
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=[*rest, "--trainer.logger=false"],
            run=False,
            save_config_callback=None,
            auto_configure_optimizers=False,
            usage_parser=parser,
        )
        cli.trainer.validate(cli.model, datamodule=cli.datamodule, ckpt_path=options.ckpt_path, verbose=False)
    dense = copy.deepcopy(cli.model).cpu().eval()
    compress_options = {"quantize": not options.no_quantize, "batch_rows": options.batch_rows}

    if command == "compress":
        compressed = compress(dense, **compress_options)
        path = save_compressed(compressed, options.output, metadata={"checkpoint": str(options.ckpt_path)})
        print(f"Saved the compressed model to {path} ({path.stat().st_size / 1024:.1f} KiB)")
        return path

    if options.compressed is not None:
        try:
            compressed = load_compressed(options.compressed, model=copy.deepcopy(dense))
        except CompressedFileError as err:
            parser.error(f"--compressed: {err}")
    else:
        compressed = compress(dense, **compress_options)
    datamodule = cli.datamodule
    datamodule.setup(options.dataloader if options.dataloader == "test" else "validate")
    loader = datamodule.test_dataloader() if options.dataloader == "test" else datamodule.val_dataloader()
    report = CompressionReport(
        dense,
        compressed,
        loader,
        batch_sizes=options.batch_sizes,
        threads=options.threads,
        repeats=options.repeats,
    )
    paths = report.save(options.output_dir)
    print(report.to_table())
    print(f"\nWrote {', '.join(str(path) for path in paths.values())}")
    return report


def main(args: list[str] | None = None) -> object:
    """Run the ``weightlight`` command with ``args`` (the process arguments when ``None``)."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] in COMPRESSION_COMMANDS:
        return run_compression_command(argv[0], argv[1:])
    return _build_cli(args)


def console_main() -> None:
    """Entry point of the ``weightlight`` console script.

    It returns ``None`` so that the exit status is 0 after a successful run: the script's wrapper
    passes the return value to ``sys.exit``, which would print any object and exit with 1.
    """
    main()


if __name__ == "__main__":
    console_main()
