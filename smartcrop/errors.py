"""The library's exceptions: one base class, one-line messages meant for people.

Library messages describe the problem in the library's own terms (a file, a value); the command line adds
the flag it came from and maps :class:`UsageError` (and any other :class:`SmartcropError` raised before work
starts) to exit code 2, a failed standard output (:class:`StreamError`) to 1.  Errors about one input photo
(:class:`smartcrop.imageio.ImageError`) fail that photo only.
"""

from __future__ import annotations


def one_line(text: object, limit: int = 300) -> str:
    """``text`` on one line (whitespace runs collapsed), at most ``limit`` characters."""
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` says memory ran out: a ``MemoryError``, or torch's ``RuntimeError`` from an allocator
    ("DefaultCPUAllocator: can't allocate memory", "… not enough memory", "CUDA out of memory") or from C++
    ("std::bad_alloc")."""
    if isinstance(e, MemoryError):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(w in text for w in ("can't allocate memory", "not enough memory",
                                                                    "out of memory", "bad_alloc"))


class SmartcropError(Exception):
    """Base of every error smartcrop raises on purpose; ``str(err)`` is one line; ``exit_code`` is the command
    line's exit status when it stops a command."""

    exit_code = 2

    def __init__(self, message: object = "") -> None:
        super().__init__(one_line(message))


class UsageError(SmartcropError):
    """What was asked for cannot be done as asked (a bad value, an impossible combination): exit code 2."""


class DeviceError(UsageError):
    """The requested compute device does not exist on this machine."""


class TrainingError(SmartcropError):
    """Training or fine-tuning cannot go on (the loss is no longer a number: it diverged); nothing more is
    saved: exit code 1."""

    exit_code = 1


class StreamError(SmartcropError):
    """Standard output cannot take what smartcrop writes there (a closed pipe, a full disk): the run stops,
    with exit status 1 as a failed write gives in other command-line tools (2 is for requests refused before
    any work)."""

    exit_code = 1

    def __init__(self, err: OSError) -> None:
        super().__init__(f"cannot write to standard output ({err.strerror or err}): stopped; the files already "
                         "written are complete")
