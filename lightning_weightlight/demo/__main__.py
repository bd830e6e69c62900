"""``python -m lightning_weightlight.demo``: the main job of ``make demo``."""

from lightning_weightlight.demo.pipeline import main

if __name__ == "__main__":
    main()
