"""What every command shares: user-error handling and config-derived options."""

from __future__ import annotations

import functools
import inspect
import sys
from dataclasses import MISSING, fields
from typing import Annotated, Any, Callable, Dict, Optional

import typer

from ..config import Config, field_types, flag
from ..errors import Interrupted, UserError


def fail(message: str, code: int = 2) -> None:
    """Print a one-line error and exit non-zero."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def user_errors(fn: Callable) -> Callable:
    """Turn UserError (and the OS errors a user causes) into a one-line message."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            fail(str(err))
        except Interrupted as err:
            typer.echo(str(err), err=True)
            raise typer.Exit(130)
        except KeyboardInterrupt:
            fail("interrupted", 130)
        except (PermissionError, IsADirectoryError, NotADirectoryError) as err:
            fail(f"{err.strerror}: {err.filename}")

    return wrapper


def _option(field) -> Any:
    kind = field_types()[field.name]
    help_text = field.metadata["help"]
    choices = field.metadata.get("choices")
    # Parentheses, not brackets: rich would read [..] as markup and drop it.
    if choices:
        help_text += f" (one of: {', '.join(choices)})"
    if field.default is not MISSING and field.default is not None and field.default != "":
        help_text += f" (default: {field.default})"
    names = [f"--{flag(field.name)}/--no-{flag(field.name)}"] if kind is bool else [f"--{flag(field.name)}"]
    option = typer.Option(*names, help=help_text, rich_help_panel=field.metadata.get("group"), show_default=False)
    return Annotated[Optional[kind], option]


def with_config_options(fn: Optional[Callable] = None, *, exclude: tuple = ()) -> Callable:
    """Add one CLI option per Config field to ``fn`` (except the fields in ``exclude``).

    The options default to None so the command can tell what was given:
    ``fn`` receives those as ``overrides`` (flags > YAML > defaults). Help text
    and defaults come from the Config dataclass, the single source. Use as
    ``@with_config_options`` or ``@with_config_options(exclude=(...))``.
    """
    if fn is None:
        return functools.partial(with_config_options, exclude=exclude)
    own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.name != "overrides"]
    names = [f.name for f in fields(Config) if f.metadata.get("cli", True) and f.name not in exclude]
    extra = [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=_option(f))
        for f in fields(Config)
        if f.name in names
    ]

    @functools.wraps(fn)
    def wrapper(**kwargs):
        overrides: Dict[str, Any] = {name: kwargs.pop(name) for name in names if name in kwargs}
        return fn(overrides=overrides, **kwargs)

    wrapper.__signature__ = inspect.Signature(own + extra)
    return wrapper


def echo(text: str) -> None:
    typer.echo(text)
    sys.stdout.flush()
