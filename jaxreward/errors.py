"""The one place that says which errors are the user's to fix.

A `UserError` is bad input: a config value, a data file, a chat template, a
checkpoint or export on disk. Its message names what is wrong (field,
file:line, path) and is complete on its own, so the command line prints it
as one line, `error: <message>`, and exits with status 2 instead of showing
a traceback (`JAXREWARD_TRACEBACK=1` shows it). A run whose loss became NaN
or infinite (`DivergedError`) is reported the same way: its usual causes
are the config's (learning rate, data), and its traceback only points at
the loop. Everything else (a bug, an out-of-memory) keeps its traceback.

The subclasses live next to the code that raises them and keep their
`ValueError` ancestry, so `except ValueError` in user code still works:

- `jaxreward.train.defaults.ConfigError`: an impossible config value.
- `jaxreward.data.preference.DataError`: a bad line of a data file.
- `jaxreward.data.chat_template.ChatTemplateError`: a template that cannot
  render the messages.
- `CorruptFileError` (here): a checkpoint or exported model whose files are
  missing, truncated or changed.

A driver that finds a problem with the user's input raises `UserError`
itself (e.g. "12 usable train pairs is fewer than one batch").
`FileNotFoundError` is in `USER_ERRORS` too: a path the user named that
does not exist.
"""


class UserError(ValueError):
    """Bad input from the user; the message says what and where, in one line."""


class CorruptFileError(UserError):
    """Files on disk (a checkpoint, an exported model) are missing or damaged;
    the message names them and says what to do."""


class DivergedError(UserError, FloatingPointError):
    """The training loss became NaN or infinite; the message names the step
    and the loss, and says what to try. Also a `FloatingPointError`, so
    `except FloatingPointError` keeps working."""


def diverged(what: str, value, step: int | None, field: str = "optimizer.learning_rate") -> DivergedError:
    """The one-line `DivergedError` for `what` (e.g. "loss") = `value` at
    `step` (`value` or `step` None: not shown); `field` is the learning rate to lower. A new workdir is named
    because a workdir refuses to resume under a changed config."""
    shown = f"non-finite {what}" if value is None else f"non-finite {what} {value}"
    if step is not None:
        shown += f" at step {step}"
    return DivergedError(f"{shown}: the run diverged; try a lower "
                         f"{field} in a new --workdir, or check the data")


# What the command line reports as one line (exit status 2) instead of a traceback.
USER_ERRORS = (UserError, FileNotFoundError)


def message(error: BaseException) -> str:
    """What `error: ...` shows: a `UserError`'s own message (a list of
    details may follow on indented lines); any other error's lines joined
    into one. `FileNotFoundError` from `open()` ("[Errno 2] No such file or
    directory: 'x'") reads "no such file or directory: 'x'".
    """
    if isinstance(error, UserError):
        return str(error)
    if isinstance(error, FileNotFoundError) and error.filename is not None and error.strerror:
        text = f"{error.strerror.lower()}: {error.filename!r}"
    elif isinstance(error, KeyError) and len(error.args) == 1 and isinstance(error.args[0], str):
        text = error.args[0]  # str(KeyError) adds quotes
    else:
        text = str(error) or type(error).__name__
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return "; ".join(lines)
