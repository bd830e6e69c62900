"""``python -m lightning_weightlight.demo``: the main job of ``make demo`` on the digits data.

Trains the digits CNN from ``examples/configs/digits_baseline.yaml`` (or the file given with
``--config``) through the ``weightlight`` command, then tests the best checkpoint and prints the
test accuracy.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lightning_weightlight.cli import main as cli_main

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "examples" / "configs" / "digits_baseline.yaml"


def run(argv: list[str] | None = None) -> float:
    """Train, test the best checkpoint and return its test accuracy."""
    parser = argparse.ArgumentParser(prog="python -m lightning_weightlight.demo", description=__doc__)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="LightningCLI YAML file")
    parser.add_argument("--max-epochs", type=int, default=None, help="override trainer.max_epochs")
    args = parser.parse_args(argv)
    if not args.config.is_file():
        parser.error(f"--config: file not found: {args.config}")

    cli_args = ["fit", "--config", str(args.config)]
    if args.max_epochs is not None:
        cli_args += ["--trainer.max_epochs", str(args.max_epochs)]
    cli = cli_main(cli_args)
    results = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path="best", verbose=False)
    accuracy = float(results[0]["test_acc"])
    print(f"\nDigits CNN test accuracy: {accuracy:.2%} ({args.config})")
    return accuracy


if __name__ == "__main__":
    run(sys.argv[1:])
