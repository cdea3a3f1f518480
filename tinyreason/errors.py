"""User errors: what a person typed or pointed at is wrong. Every entry point reports one as
`error: <what is wrong, what is allowed, how to fix>` on stderr and exits with status 2, without a
traceback; anything else is a bug and keeps its traceback (exit 1).

The rule (`is_user_error`), one of:
  - a `UserError` anywhere (a ValueError, so `pytest.raises(ValueError)` holds for it too);
  - any other `ValueError` raised by a tinyreason module: our config dataclasses, data,
    checkpoints and export raise ValueError naming the key and the allowed values (STYLE.md's
    house rule). A ValueError raised inside a library (torch, litdata, ...) is not one: it may be
    our bug, so it keeps its traceback;
  - a Hydra composition error (an unknown group option or key, an override that does not parse)
    or an OmegaConf error (a mandatory `???` value left unset, an interpolation that does not
    resolve): the config the user wrote.
Internal bugs are other types (AssertionError, RuntimeError, TypeError, KeyError, ...).
`TINYREASON_TRACEBACK=1` or `HYDRA_FULL_ERROR=1` shows a user error's traceback too.

Use: `main()` of an entry point calls `run(<its body>)`; a Hydra task function is also decorated
with `@reported` under `@hydra.main`, so a user error stops it before Hydra logs the failed job.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
EXIT_CODE = 2  # the shell's convention for a usage error (argparse exits 2 too)
TRACEBACK_ENV = "TINYREASON_TRACEBACK"
_USER_ASKED = {"full_error": False}  # HYDRA_FULL_ERROR as the user set it, before `run`


class UserError(ValueError):
    """Bad input from the user (config, data, checkpoint, export folder); the message says what
    is wrong, what is allowed and how to fix it."""


def is_user_error(err: BaseException) -> bool:
    from hydra.errors import CompactHydraException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(err, (UserError, CompactHydraException, OmegaConfBaseException)):
        return True
    return isinstance(err, ValueError) and _raised_in_tinyreason(err)


def _raised_in_tinyreason(err: BaseException) -> bool:
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    module = tb.tb_frame.f_globals.get("__name__", "")
    return module == "tinyreason" or module.startswith("tinyreason.")


def message(err: BaseException) -> str:
    """One or two lines for a person: Hydra's and OmegaConf's multi-line reports shortened."""
    from hydra.errors import ConfigCompositionException, MissingConfigException
    from omegaconf import DictConfig
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(err, MissingConfigException) and err.options and err.missing_cfg_file:
        group, _, option = err.missing_cfg_file.rpartition("/")
        return f"{group}={option} is not an option of {group}; allowed: {', '.join(err.options)}"
    cause = err.__cause__
    if isinstance(err, ConfigCompositionException) and isinstance(cause, OmegaConfBaseException):
        parent = getattr(cause, "parent_node", None)
        if "not in struct" in str(cause) and isinstance(parent, DictConfig):
            section = cause.full_key.rpartition(".")[0] or "the config"
            hint = str(err).splitlines()[-1].removeprefix("To append to your config use ")
            return (
                f"{cause.full_key} is not a key of {section}; allowed: {', '.join(map(str, parent))}"
                f"\n(to add a new key anyway: {hint})"
            )
    if isinstance(err, OmegaConfBaseException):
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        key = getattr(err, "full_key", None)
        return f"{key}: {first}" if key else first
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return "\n".join(lines[:2]) if lines else type(err).__name__


def _traceback_wanted() -> bool:
    return os.environ.get(TRACEBACK_ENV, "") not in ("", "0") or _USER_ASKED["full_error"]


def _report(err: Exception) -> None:
    if _traceback_wanted() or not is_user_error(err):
        raise err
    sys.stderr.write(f"error: {message(err)}\n")
    sys.stderr.flush()
    raise SystemExit(EXIT_CODE) from None


def reported(task: Callable[..., T]) -> Callable[..., T]:
    """A Hydra task function whose user errors exit 2 (`functools.wraps` keeps Hydra's task name:
    it is read from the unwrapped function's module)."""

    @functools.wraps(task)
    def wrapper(*args, **kwargs):
        try:
            return task(*args, **kwargs)
        except Exception as err:
            _report(err)

    return wrapper


def run(main: Callable[[], T]) -> T:
    """Run an entry point's body: a user error prints `error: ...` and exits 2. Hydra prints its
    own report of a composition error and exits 1; with HYDRA_FULL_ERROR set it raises instead,
    so this sets it for the call and reports the error itself."""
    _USER_ASKED["full_error"] = os.environ.get("HYDRA_FULL_ERROR", "") not in ("", "0")
    previous = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        return main()
    except Exception as err:
        _report(err)
    finally:
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous
