"""User errors and the entry-point wrapper that prints them as one line with exit code 2.

A `UserError` may name the configuration `field` it is about (an argparse dest such as
"data_path"); the entry script prints that field's flag before the message:
"--data-path: folder 'x' not found". Other flags a message mentions are spelled in it.
"""
import argparse
import contextlib
import functools
import logging
import os
import re
import sys
import time
import traceback
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional

# a note printed under a traceback: a DataLoader worker's error reaches the main process as its text
FIELD_NOTE = "user error field: "

# called as hook(line, exit code, exception) when an entry point fails; a distributed run
# registers utils.distributed.report_failure here, which tells the other ranks to stop
FAILURE_HOOKS: List[Callable[[str, int, BaseException], None]] = []


class UserError(Exception):
    """A problem with the user's input (flag, file, data): printed as one line, exit code 2.

    Args:
        message: what is wrong and what was expected.
        field: the configuration field (argparse dest) the error is about, or None.

    `rank_specific`: set on an error that only some ranks of a distributed run meet (all
    ranks print it then, not only rank 0).
    """

    rank_specific = False

    def __init__(self, message: str = "", field: Optional[str] = None):
        lines = message.strip().splitlines()
        if len(lines) > 1:  # re-created from a DataLoader worker's traceback: its last lines are ours
            if lines[-1].startswith(FIELD_NOTE):
                field = field or lines.pop()[len(FIELD_NOTE):].strip()
            message = re.sub(r"^(?:[\w.]*\.)?UserError: ", "", lines[-1].strip())
        super().__init__(message)
        self.field = field
        if field:
            self.add_note(FIELD_NOTE + field)

    @staticmethod
    @contextlib.contextmanager
    def about(field: str) -> Iterator[None]:
        """A `UserError` raised inside that names no field is about `field`."""
        try:
            yield
        except UserError as err:
            err.field = err.field or field
            raise


def option_flags(parser: argparse.ArgumentParser) -> Dict[str, str]:
    """dest -> flag (the first long option string) of every optional argument of `parser`."""
    flags: Dict[str, str] = {}
    for action in parser._actions:
        longs = [s for s in action.option_strings if s.startswith("--")]
        if longs and action.dest != "help":
            flags.setdefault(action.dest, longs[0])
    return flags


def error_line(err: BaseException, flags: Optional[Mapping[str, str]] = None) -> str:
    """The one line that reports `err`: "{flag of its field}: {message}" (`flags`: dest -> flag)."""
    field = getattr(err, "field", None)
    return f"{(flags or {}).get(field, field)}: {err}" if field else str(err)


def _launcher_rank() -> int:
    """This process's rank as the launcher (torchrun) set it; 0 without a launcher."""
    try:
        return int(os.environ.get("RANK", "0") or 0)
    except ValueError:
        return 0


def _summary(err: BaseException) -> str:
    """One line for an unexpected exception: its type and the first line of its message."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _tell_other_ranks(line: str, code: int, err: BaseException) -> None:
    for hook in list(FAILURE_HOOKS):
        hook(line, code, err)


def cli_entry(main_fn: Optional[Callable[..., Any]] = None, *,
              flags: Optional[Callable[[], Mapping[str, str]]] = None):
    """Wrap an entry point so that `UserError` becomes one clean line on stderr and exit 2.

    `flags`: a function giving the script's dest -> flag mapping (see `error_line`).
    Under torchrun every rank usually meets the same error: only rank 0 prints it (other
    ranks exit 2 silently), unless the error is marked `rank_specific`.
    In a distributed run any failure (a `UserError`, any other exception but SystemExit, Ctrl-C) is also
    handed to `FAILURE_HOOKS`, which stop the other ranks, and the process leaves at once
    (exit 2 for a `UserError`, 130 for Ctrl-C, else 1) after printing its traceback.
    Usable as `@cli_entry` or `cli_entry(fn, flags=...)`.
    """
    if main_fn is None:
        return functools.partial(cli_entry, flags=flags)

    @functools.wraps(main_fn)
    def wrapper(*args, **kwargs):
        try:
            return main_fn(*args, **kwargs)
        except UserError as err:
            line = error_line(err, flags() if flags else None)
            rank = _launcher_rank()
            _tell_other_ranks(line, 2, err)  # first: returns only if this process is to report it
            if rank == 0:
                print(f"error: {line}", file=sys.stderr, flush=True)
            elif err.rank_specific:
                print(f"error (rank {rank}): {line}", file=sys.stderr, flush=True)
            else:
                time.sleep(2.0)  # the launcher stops every rank when one exits: rank 0 prints first
            sys.exit(2)
        except BaseException as err:
            # a SystemExit is meant (submitit exits so after a preemption signal to every task)
            if not FAILURE_HOOKS or isinstance(err, SystemExit):
                raise
            code = 130 if isinstance(err, KeyboardInterrupt) else 1
            traceback.print_exc()
            sys.stderr.flush()
            _tell_other_ranks(_summary(err), code, err)
            logging.shutdown()  # flush the log files: the process leaves without unwinding
            os._exit(code)  # a normal exit could block in the process group's teardown

    return wrapper


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, `error: --flag: ...`, and exit status 2."""

    def error(self, message: str):
        # argparse says "argument --x: must be ..."; we say "--x must be ..." (the flag, then what was expected)
        named = re.match(r"argument (\S+): (must be .*)", message)
        if named:
            message = f"{named.group(1)} {named.group(2)}"
        elif message.startswith("argument "):
            message = message[len("argument "):]
        self.exit(2, f"error: {message}\n")
