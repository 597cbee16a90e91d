"""How every stt command line ends: a result, or one line saying what was wrong with the input.

A user error (stt.errors: bad data, bad config, bad checkpoint, bad option) is printed as one line naming the
file or value and what was expected, with exit status 2 for a usage error (an option or config value) and 1
otherwise, 130 when interrupted. The traceback is for developers: `--debug` on any command, or `STT_DEBUG=1`.
Errors raised inside Ray workers reach the driver wrapped (Ray Train's TrainingFailedError around a
RayTaskError around the original); the original is found and printed the same way. Dotted overrides
(`section.key=value`) are taken anywhere on a command line (`parse_args`).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Callable

from stt.errors import USER_ERRORS, InterruptedRun, UsageError

# A dotted config override as every command takes them: section.key=value (stt.config.apply_overrides).
OVERRIDE = re.compile(r"[A-Za-z_]\w*(\.\w+)+=.*", re.DOTALL)


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """`parser.parse_args(argv)`, except that dotted overrides may come anywhere, after an option too: argparse gives
    the `overrides` list only its first run of words and called any later one an "unrecognized argument" (exit 2).
    Anything left over that is not `section.key=value` is still refused the usual way."""
    args, rest = parser.parse_known_args(argv)
    stray = [word for word in rest if not OVERRIDE.fullmatch(word)]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    args.overrides = [*args.overrides, *rest]
    return args


def ray_wrapped(error: BaseException) -> list[BaseException]:
    """The exceptions Ray wrapped in `error`: a worker's (RayTaskError.cause, Ray Train's
    WorkerGroupError.worker_failures) or the Train controller's."""
    inner = [
        getattr(error, "cause", None),
        *getattr(error, "worker_failures", {}).values(),
        getattr(error, "controller_failure", None),
    ]
    return [e for e in inner if isinstance(e, BaseException)]


def user_error(error: BaseException | None, depth: int = 0) -> BaseException | None:
    """The user error behind `error`, or None for a bug: the innermost one Ray wrapped (a
    RayTaskError(ValueError) is a ValueError too, but its message is a remote traceback), the
    outermost one of a `raise ... from` chain (stt's message, not the library's it explains)."""
    if error is None or depth > 8:
        return None
    inner = ray_wrapped(error)
    for wrapped in inner:
        found = user_error(wrapped, depth + 1)
        if found is not None:
            return found
    if isinstance(error, USER_ERRORS) and not inner:
        return error
    return user_error(error.__cause__, depth + 1)


def one_line(error: BaseException) -> str:
    message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)  # KeyError str() adds quotes
    return " ".join(str(message).split()) or type(error).__name__


def run(main: Callable[[list[str] | None], object], prog: str, argv: list[str] | None = None) -> int:
    """Run `main(argv)` as the command `prog`: exit status 0, or one line on stderr and 1, 2 or 130."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("STT_DEBUG", "") not in ("", "0") or "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        main(argv)
        return 0
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; finished work is kept (run the same command again to resume)", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - sorted into user errors and bugs just below
        cause = user_error(error)
        if cause is None or debug:
            raise
        print(f"{prog}: error: {one_line(cause)}", file=sys.stderr)
        code = 130 if isinstance(cause, InterruptedRun) else 2 if isinstance(cause, UsageError) else 1
        if getattr(cause, "abandoned", None) is not None and cause.abandoned.is_alive():
            # a request that never answered would hold the interpreter's exit for ever (StorageError)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return code
