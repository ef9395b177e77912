"""The project's own exceptions: bad input told apart from bugs.

    InputError       what the caller asked for is wrong (a value, a type, a file's contents).
                     Raised by the validation at every public boundary; a subclass of ValueError
                     and of TypeError, so `except ValueError` and `except TypeError` keep working.
                     The command line turns exactly these into one line and exit status 2.
    NonFiniteError   training produced a NaN or an infinity (SEMANTICS.md 6); the parameters keep
                     their last finite values. A FloatingPointError, not an InputError: the input
                     was valid, the optimisation diverged.
    DistributedError a collective of several processes failed: another process died, or did not
                     answer within the process group's timeout (tbptt.torch.distributed). A
                     RuntimeError; the command line prints it as one line, exit status 1.

Any other exception is a bug in tbptt or in the caller's own code and keeps its traceback.
"""

from __future__ import annotations


class InputError(ValueError, TypeError):
    """A wrong argument, setting or file: the message names it, its value and what was expected."""


class NonFiniteError(FloatingPointError):
    """A NaN or inf appeared during training; the parameters keep their last finite values.

    `step` is the step where it was seen and `update` the update it would have been (or None).
    """

    def __init__(self, message: str, step: int, update: int | None = None) -> None:
        super().__init__(message)
        self.step = step
        self.update = update


class DistributedError(RuntimeError):
    """A collective failed: another process died, or did not answer within the timeout."""
