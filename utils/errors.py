"""User errors and the entry-point wrapper that prints them as one line with exit code 2."""
import argparse
import functools
import os
import re
import sys
from typing import Any, Callable


class UserError(Exception):
    """A problem with the user's input (flag, file, data): printed as one line, exit code 2.

    `rank_specific`: set on an error that only some ranks of a distributed run meet (all
    ranks print it then, not only rank 0).
    """

    rank_specific = False


def error_line(err: BaseException) -> str:
    """The one-line message of a `UserError`, also when a DataLoader worker raised it.

    A worker's exception reaches the main process re-created from a multi-line text
    ("Caught UserError in DataLoader worker process 0. Original Traceback ...
    utils.UserError: <message>"): the original message is its last line.
    """
    text = str(err).strip()
    if "\n" not in text:
        return text
    last = text.splitlines()[-1].strip()
    return re.sub(r"^(?:[\w.]*\.)?UserError: ", "", last)


def _launcher_rank() -> int:
    """This process's rank as the launcher (torchrun) set it; 0 without a launcher."""
    try:
        return int(os.environ.get("RANK", "0") or 0)
    except ValueError:
        return 0


def cli_entry(main_fn: Callable[[], Any]) -> Callable[[], Any]:
    """Wrap an entry point so that `UserError` becomes one clean line on stderr and exit 2.

    Under torchrun every rank usually meets the same error: only rank 0 prints it
    (other ranks exit 2 silently), unless the error is marked `rank_specific`.
    """

    @functools.wraps(main_fn)
    def wrapper(*args, **kwargs):
        try:
            return main_fn(*args, **kwargs)
        except UserError as err:
            rank = _launcher_rank()
            if rank == 0:
                print(f"error: {error_line(err)}", file=sys.stderr, flush=True)
            elif getattr(err, "rank_specific", False):
                print(f"error (rank {rank}): {error_line(err)}", file=sys.stderr, flush=True)
            sys.exit(2)

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
