"""The command-line shell shared by every ``python -m gpt2_jax.<tool>``.

Flags are absl-style (``--flag=value``) but each tool defines them on its OWN ``FlagValues``
(never absl's global ``FLAGS``), so importing several tools, or their pure functions from
research code, registers nothing global. A user's mistake raises ``UserError``; ``run`` prints
it as one line on stderr and exits with status 2, without a traceback.
"""

from __future__ import annotations

import sys
from typing import Callable, Sequence

from absl import flags


class UserError(Exception):
    """A mistake the user can fix (bad flag, missing file, wrong run dir): one line, exit code 2."""


def parse_flags(flag_values: flags.FlagValues, argv: Sequence[str], description: str = "") -> flags.FlagValues:
    """Parse ``argv`` (program name first) into ``flag_values``; ``--help`` prints help and exits 0."""
    args = list(argv)
    if any(a in ("--help", "-h", "--helpfull", "-?") for a in args[1:]):
        prog = args[0] if args else "gpt2_jax"
        print(f"usage: {prog} [--flag=value ...]\n")
        if description:
            print(description.strip() + "\n")
        print(flag_values.get_help(include_special_flags=False))
        sys.exit(0)
    try:
        rest = flag_values(args)
    except flags.Error as e:
        raise UserError(f"{e} (see --help)") from None
    if len(rest) > 1:
        raise UserError(f"unexpected positional arguments {rest[1:]}; flags are written --name=value (see --help)")
    return flag_values


def run(main: Callable[[Sequence[str]], int | None], argv: Sequence[str] | None = None) -> None:
    """Run a CLI ``main(argv)``; ``UserError`` becomes ``error: ...`` on stderr and exit code 2."""
    argv = sys.argv if argv is None else argv
    try:
        code = main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)
