"""``python -m edgetailor``: the CLI, also as torchrun starts it
(``torchrun --nproc-per-node 2 -m edgetailor server pretrain --out ge/``)."""

from edgetailor.app.cli import main

if __name__ == "__main__":
    main()
