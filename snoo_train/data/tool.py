"""What the data tools' entry points share (`python -m snoo_train.data.prepare`,
`python -m snoo_train.data.train_tokenizer`): `--help`, composing the job from Hydra overrides,
and bad input as one `error:` line instead of a traceback, as from the training entry point."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Optional

from snoo_train.config import ConfigError

from .errors import DataError


def run_tool(
    config_name: str,
    schema: type,
    doc: str,
    job: Callable,
    argv: Optional[list[str]] = None,
    *,
    interrupted: Optional[str] = None,
) -> None:
    """Compose `config_name` into `schema` from argv and run `job` on it. `interrupted`: what to
    say on Ctrl-C (exit 130); None lets it propagate."""
    from snoo_train.configs import compose_job, job_help

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = sys.argv[1:] if argv is None else list(argv)
    if {"-h", "--help"} & set(args):
        print(job_help(doc, schema))
        return
    try:
        job(compose_job(config_name, args, schema))
    except (ConfigError, DataError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        if interrupted is None:
            raise
        print(interrupted, file=sys.stderr)
        sys.exit(130)
