"""The `snoo-train` console script: `python -m snoo_train.train` under a shorter name.

It installs the preemption handler before importing the trainer (torch, transformers: seconds
of imports), so that a SIGTERM or SIGUSR1 during start-up ends in the requeue status, not in a
killed process.
"""

from __future__ import annotations

from snoo_train.preemption import install_process_handler


def main() -> None:
    install_process_handler()
    from snoo_train.train import main as train_main

    train_main()
