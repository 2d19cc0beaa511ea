"""User errors and the entry-point wrapper that prints them as one line with exit code 2.

A `UserError` may name the configuration `field` it is about (an argparse dest such as
"data_path") and mention other fields in its message as `<field>` tokens; the library never
spells a command-line flag. `error_line` renders the one line, given the flags of a script
(`option_flags`): "--data-path: folder 'x' not found", tokens replaced by their flags.
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
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Union

# a note traceback prints under the message: the field survives a DataLoader worker, whose
# error reaches the main process as the worker's traceback text
FIELD_NOTE = "user error field: "
_TOKEN = re.compile(r"<([a-z][a-z0-9_]*)>")


RANK0_PRINT_GRACE_S = 2.0  # silent ranks wait this long before exiting

# called as hook(line, exit code, exception) when an entry point fails; a distributed run
# registers utils.distributed.report_failure here, which tells the other ranks to stop
FAILURE_HOOKS: List[Callable[[str, int, BaseException], None]] = []


class UserError(Exception):
    """A problem with the user's input (flag, file, data): printed as one line, exit code 2.

    Args:
        message: what is wrong and what was expected; other fields as `<field>` tokens.
        field: the configuration field (argparse dest) the error is about, or None.

    `detail`: context added after the field's flag (e.g. " (with <model> X)"), set by `naming`.
    `rank_specific`: set on an error that only some ranks of a distributed run meet (all
    ranks print it then, not only rank 0).
    """

    rank_specific = False

    def __init__(self, message: str = "", field: Optional[str] = None):
        super().__init__(message)
        self.field = field
        self.detail = ""

    @property
    def field(self) -> Optional[str]:
        return self._field

    @field.setter
    def field(self, value: Optional[str]) -> None:
        self._field = value
        notes = [n for n in getattr(self, "__notes__", []) if not n.startswith(FIELD_NOTE)]
        self.__notes__ = notes + ([FIELD_NOTE + value] if value else [])


@contextlib.contextmanager
def naming(field: str, detail: str = "") -> Iterator[None]:
    """A `UserError` raised inside that names no field yet is about `field` (`detail`: context
    after the flag, may hold `<field>` tokens). An error that names its field keeps it."""
    try:
        yield
    except UserError as err:
        if err.field is None:
            err.field, err.detail = field, detail
        raise


def option_flags(parser: argparse.ArgumentParser) -> Dict[str, str]:
    """dest -> flag (the first long option string) of every optional argument of `parser`."""
    flags: Dict[str, str] = {}
    for action in parser._actions:
        longs = [s for s in action.option_strings if s.startswith("--")]
        if longs and action.dest != "help":
            flags.setdefault(action.dest, longs[0])
    return flags


def _unwrap(text: str):
    """(message, field carried in the text) of an error's text.

    A DataLoader worker's error reaches the main process re-created from a multi-line text
    ("Caught UserError in DataLoader worker process 0. Original Traceback ...
    utils.errors.UserError: <message>", then the field note): the message is its last line
    but the note.
    """
    text = text.strip()
    if "\n" not in text:
        return text, None
    lines = text.splitlines()
    field = lines.pop()[len(FIELD_NOTE):].strip() if lines[-1].startswith(FIELD_NOTE) and len(lines) > 1 else None
    return re.sub(r"^(?:[\w.]*\.)?UserError: ", "", lines[-1].strip()), field


def error_line(err: BaseException, flags: Optional[Mapping[str, str]] = None) -> str:
    """The one line that reports `err`: "{flag of its field}{detail}: {message}", each `<field>`
    token replaced by its flag (`flags`: dest -> flag; unknown fields stay as they are)."""
    flags = flags or {}

    def flags_in(text: str) -> str:
        return _TOKEN.sub(lambda m: flags.get(m.group(1), m.group(0)), text)

    message, carried = _unwrap(str(err))
    field = getattr(err, "field", None) or carried
    if not field:
        return flags_in(message)
    return f"{flags.get(field, f'<{field}>')}{flags_in(getattr(err, 'detail', '') or '')}: {flags_in(message)}"


def _launcher_rank() -> int:
    """This process's rank as the launcher (torchrun) set it; 0 without a launcher."""
    try:
        return int(os.environ.get("RANK", "0") or 0)
    except ValueError:
        return 0


Flags = Union[Mapping[str, str], Callable[[], Mapping[str, str]], None]


def _summary(err: BaseException) -> str:
    """One line for an unexpected exception: its type and the first line of its message."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _tell_other_ranks(line: str, code: int, err: BaseException) -> None:
    for hook in list(FAILURE_HOOKS):
        hook(line, code, err)


def cli_entry(main_fn: Optional[Callable[..., Any]] = None, *, flags: Flags = None):
    """Wrap an entry point so that `UserError` becomes one clean line on stderr and exit 2.

    `flags`: the script's dest -> flag mapping (or a function giving it, called only when an
    error is printed) that names fields and `<field>` tokens (see `error_line`).
    Under torchrun every rank usually meets the same error: only rank 0 prints it
    (other ranks exit 2 silently), unless the error is marked `rank_specific`.
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
            line = error_line(err, flags() if callable(flags) else flags)
            rank = _launcher_rank()
            _tell_other_ranks(line, 2, err)  # first: returns only if this process is to report it
            if rank == 0:
                print(f"error: {line}", file=sys.stderr, flush=True)
            elif getattr(err, "rank_specific", False):
                print(f"error (rank {rank}): {line}", file=sys.stderr, flush=True)
            if rank != 0 and not getattr(err, "rank_specific", False):
                # a launcher stops all ranks when the first one exits: let rank 0 print its line first
                time.sleep(RANK0_PRINT_GRACE_S)
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
