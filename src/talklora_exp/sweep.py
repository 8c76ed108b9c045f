"""`python -m talklora_exp.sweep <overrides>`: a thin alias of `python -m talklora_exp -m <overrides> +dry_run=true`
(Hydra expands the sweep; every job is listed with its rank, adapter parameters and memory estimate; nothing runs)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    from .cli import main as cli_main

    argv = sys.argv[1:] if argv is None else argv
    sys.argv = [sys.argv[0], "-m", *[a for a in argv if a != "-m"], "+dry_run=true"]
    cli_main()


if __name__ == "__main__":
    main()
