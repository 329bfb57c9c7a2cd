"""What every command shares: user-error handling and config-derived options."""

from __future__ import annotations

import errno
import functools
import inspect
import sys
from dataclasses import MISSING, fields
from typing import Annotated, Any, Callable, Dict, Optional

import typer
from typer.core import TyperCommand

from gmt_mlx.config import Config, EvalFields, field_help, field_types, flag
from gmt_mlx.errors import Interrupted, UserError


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
        except OSError as err:
            # A full disk or quota, a read-only or failing one: the user's to fix. Other OS errors are bugs.
            if err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO):
                raise
            fail(
                f"{err.strerror}"
                + (f": {err.filename}" if err.filename and str(err.filename) not in err.strerror else "")
            )

    return wrapper


def _option(field) -> Any:
    kind = field_types()[field.name]
    choices = field.metadata.get("choices")
    name = flag(field.name)
    # The options default to None (to tell what was given), so the default shown is the dataclass's.
    default = field.default if field.default is not MISSING else None
    if kind is bool:
        names, shown = [f"--{name}/--no-{name}"], f"--{name}" if default else f"--no-{name}"
    else:
        names, shown = [f"--{name}"], (str(default) if default not in (None, "") else None)
    # Written as click writes the defaults of the commands' own options (a string show_default
    # would come out as "[default: (x)]").
    help_text = field.metadata["help"] + (f"  [default: {shown}]" if shown is not None else "")
    option = typer.Option(
        *names,
        help=help_text,
        rich_help_panel=field.metadata.get("group"),
        show_default=False,
        metavar=f"[{'|'.join(choices)}]" if choices else None,
    )
    return Annotated[Optional[kind], option]


def eval_option(name: str, *names: str) -> Any:
    """The Typer option of evaluation option ``name`` (config.EvalFields): its help and type, written once."""
    f = EvalFields.__dataclass_fields__[name]
    kind = {"str": str, "int": int, "bool": bool}[str(f.type).replace("Optional[", "").rstrip("]")]
    if kind is bool:
        names = names or (f"--{flag(name)}/--no-{flag(name)}",)
    return Annotated[Optional[kind] if f.default is None else kind, typer.Option(*names, help=f.metadata["help"])]


def run_option(name: str, default_note: str) -> Any:
    """A Config field as an optional option of another command (eval), whose default is ``default_note``
    (a run's own value): Config's help, one definition."""
    return Annotated[Optional[field_types()[name]], typer.Option(help=field_help(name, default_note))]


FULL_HELP = "gmt_mlx.full_help"  # ctx.meta key: --help-all asked for every option


def _show_full_help(ctx: typer.Context, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        ctx.meta[FULL_HELP] = True
        typer.echo(ctx.get_help(), color=ctx.color)
        ctx.exit()


HelpAllOpt = Annotated[
    Optional[bool],
    typer.Option(
        "--help-all",
        is_eager=True,
        expose_value=False,
        callback=_show_full_help,
        help="Show every option, by group, and exit.",
    ),
]


def _is_common(name: str) -> bool:
    return next((f.metadata.get("common", False) for f in fields(Config) if f.name == name), True)


class ConfigHelpCommand(TyperCommand):
    """Plain help whose option names are never cut: ``--help`` lists the command's own options and
    the common config options; ``--help-all`` lists every option under its group (Config's)."""

    def format_options(self, ctx, formatter) -> None:
        full = ctx.meta.get(FULL_HELP, False)
        sections: Dict[str, list] = {"Arguments": [], "Options": []}
        hidden = 0
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            if param.param_type_name == "argument":
                sections["Arguments"].append(record)
                continue
            group = getattr(param, "rich_help_panel", None)
            if group and not full and not _is_common(param.name):
                hidden += 1
                continue
            sections.setdefault(group or "Options", []).append(record)
        for title, records in sections.items():
            if records:
                with formatter.section(title):
                    formatter.write_dl(records)
        if hidden:
            formatter.write_paragraph()
            formatter.write_text(
                f"{hidden} more options (method details, LoRA, optimizer, reporting, checkpoints, "
                f"Hub): {ctx.command_path} --help-all"
            )


def with_help_all(fn: Callable) -> Callable:
    """``fn`` with a --help-all (with_config_options adds its own): every command takes the flag a newcomer
    learnt on finetune; where no option is hidden (ConfigHelpCommand hides config groups) it shows --help."""
    params = list(inspect.signature(fn, eval_str=True).parameters.values())
    if any(p.name == "help_all" for p in params):
        return fn
    help_all = inspect.Parameter("help_all", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=HelpAllOpt)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        kwargs.pop("help_all", None)
        return fn(*args, **kwargs)

    wrapper.__signature__ = inspect.Signature(params + [help_all])
    return wrapper


def with_config_options(fn: Optional[Callable] = None, *, exclude: tuple = ()) -> Callable:
    """Add one CLI option per Config field to ``fn`` (except the fields in ``exclude``), and --help-all.

    The options default to None so the command can tell what was given:
    ``fn`` receives those as ``overrides`` (flags > YAML > defaults). Help text
    and defaults come from the Config dataclass, the single source. Use as
    ``@with_config_options`` or ``@with_config_options(exclude=(...))``, and
    register the command with ``cls=ConfigHelpCommand``.
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
    help_all = inspect.Parameter("help_all", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=HelpAllOpt)

    @functools.wraps(fn)
    def wrapper(**kwargs):
        kwargs.pop("help_all", None)
        overrides: Dict[str, Any] = {name: kwargs.pop(name) for name in names if name in kwargs}
        return fn(overrides=overrides, **kwargs)

    wrapper.__signature__ = inspect.Signature(own + [help_all] + extra)
    return wrapper


def echo(text: str) -> None:
    typer.echo(text)
    sys.stdout.flush()
