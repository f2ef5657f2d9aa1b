"""The deprecation canary: deprecation warnings that navil's code triggers, turned into errors.

`navil_deprecations_as_errors()` records every `DeprecationWarning`, `PendingDeprecationWarning` and `FutureWarning`
(and every log line of transformers, TRL, PEFT or accelerate that says "deprecat") raised inside it, and raises
`NaViLDeprecationError` at its end for those that are navil's: raised by transformers, torch, TRL, PEFT, accelerate,
huggingface_hub or navil while navil's code is on the stack, or naming NaViL (a deprecated definition in navil's
classes, which transformers reports from its own frames). Other warnings are third-party noise navil does not trigger;
they are kept in the context's `others` list.

Imports nothing of navil, so that a fresh interpreter can install it before loading a folder through the Auto classes.
"""

import contextlib
import logging
import os
import sys
import sysconfig
import traceback
import warnings
from dataclasses import dataclass, field
from importlib.util import find_spec

DEPRECATIONS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
LIBRARIES = ("transformers", "torch", "trl", "peft", "accelerate", "huggingface_hub", "navil")
LOGGERS = ("transformers", "trl", "peft", "accelerate")


def _package_root(name: str):
    spec = find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.realpath(list(spec.submodule_search_locations)[0])


_STDLIB = os.path.realpath(sysconfig.get_paths()["stdlib"]) + os.sep
_SITE = tuple(os.path.realpath(sysconfig.get_paths()[name]) + os.sep for name in ("purelib", "platlib"))


def is_stdlib(filename: str) -> bool:
    path = os.path.realpath(filename)
    return path.startswith(_STDLIB) and not path.startswith(_SITE)


_ROOTS = {name: _package_root(name) for name in LIBRARIES}
# navil's repository holds its tests and benchmarks too: they are callers, not navil's code
_NOT_NAVIL = tuple(os.path.join(_ROOTS["navil"] or "", folder) + os.sep for folder in ("tests", "benchmarks"))


def library_of(filename: str):
    """The library of `LIBRARIES` that the source file `filename` belongs to, or None. Copies of navil's code files
    next to a checkpoint (remote code, run from transformers' module cache) are navil's."""
    if filename.endswith("_navil.py"):
        return "navil"
    path = os.path.realpath(filename)
    for name, root in _ROOTS.items():
        if root is not None and path.startswith(root + os.sep):
            return None if name == "navil" and path.startswith(_NOT_NAVIL) else name
    return None


@dataclass
class Caught:
    """One deprecation: what was said, by which library, and the innermost frame of navil's code on the stack."""

    message: str
    library: str
    navil_frame: str

    def __str__(self):
        return f"{self.library}: {self.message}\n    triggered at {self.navil_frame}"


@dataclass
class Canary:
    ours: list = field(default_factory=list)
    others: list = field(default_factory=list)

    def record(self, message: str, stack: list) -> None:
        """Files `message`, raised where the innermost frame of `stack` (outermost first) is: navil's when the code
        that called into the warning library is navil's (not the caller's own code, nor another library calling a
        deprecated API of the first), or when the message names NaViL."""
        frames = [frame for frame in stack if not is_stdlib(frame.filename)]
        frames = [frame for frame in frames if os.path.basename(frame.filename) != os.path.basename(__file__)]
        library = library_of(frames[-1].filename) if frames else None
        callers = [library_of(frame.filename) for frame in reversed(frames)]
        caller = next((name for name in callers if name != library), None)
        navil = [frame for frame in frames if library_of(frame.filename) == "navil"]
        where = f"{navil[-1].filename}:{navil[-1].lineno}" if navil else "a definition in navil's classes"
        if library is not None and (caller == "navil" or "navil" in message.lower()):
            self.ours.append(Caught(message, library, where))
        else:
            self.others.append(f"{message} ({library} called by {caller})")


class NaViLDeprecationError(AssertionError):
    pass


class _LogHandler(logging.Handler):
    def __init__(self, canary: Canary):
        super().__init__(logging.WARNING)
        self.canary = canary

    def emit(self, record):
        message = record.getMessage()
        if "deprecat" in message.lower():
            stack = traceback.extract_stack()[:-1]
            # the log call's own frame stands for the library that logged it
            self.canary.record(message, [*stack, traceback.FrameSummary(record.pathname, record.lineno, "")])


@contextlib.contextmanager
def navil_deprecations_as_errors():
    """Runs its block with deprecations recorded (see the module's docstring); raises `NaViLDeprecationError` listing
    navil's. Yields the `Canary`."""
    canary = Canary()

    def show(message, category, filename, lineno, file=None, line=None):
        text = f"{category.__name__}: {message}"
        if issubclass(category, DEPRECATIONS):
            canary.record(text, traceback.extract_stack()[:-1])
        else:
            canary.others.append(text)

    handler = _LogHandler(canary)
    once = getattr(logging.Logger, "warning_once", None)  # transformers' once-per-process log lines
    if hasattr(once, "cache_clear"):
        once.cache_clear()
    loggers = [logging.getLogger(name) for name in LOGGERS]
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        for logger in loggers:
            logger.addHandler(handler)
        try:
            yield canary
        finally:
            for logger in loggers:
                logger.removeHandler(handler)
    if canary.ours:
        raise NaViLDeprecationError(
            "navil's code triggers deprecations:\n" + "\n".join(f"- {caught}" for caught in canary.ours)
        )


if __name__ == "__main__":  # python deprecation_canary.py SCRIPT: runs SCRIPT under the canary
    with navil_deprecations_as_errors():
        exec(compile(open(sys.argv[1]).read(), sys.argv[1], "exec"), {"__name__": "__main__"})
