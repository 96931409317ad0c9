"""Command line entry point: builds the app, registers the commands (each module of modeltrace/commands: core.py has
inspect, audit and demo) and runs it. Each command turns its flags into the library's options, calls the public API
(modeltrace/api.py) and prints what comes back (modeltrace/console.py). No provenance logic lives here.

Exit codes (stable, for CI gates):
  0  success, nothing to flag
  1  the check ran and found what --fail-on asked to fail on (audit/gate commands)
  2  bad input or usage: unreadable checkpoint, refused pickle, unreachable remote, bad arguments
  70 internal error (a bug: please report it; MODELTRACE_DEBUG=1 shows the traceback)

Every error is one line on stderr, usage errors included (with a pointer to --help). Everything the CLI prints and
every report it writes goes through modeltrace.redact, so credentials (API keys, HF_TOKEN, URL userinfo, ?api-key=)
never reach the terminal or a file. A report's --output path is checked before the work starts.
"""

from __future__ import annotations

from typing import Any

import typer

from modeltrace.console import err

app = typer.Typer(
    name="modeltrace",
    help="Establish where an open-weight model came from: byte copy, re-encoded copy, fine-tune, merge (with its "
    "recipe), layer stack, or independent. Reads weights lazily (local folders, safetensors shards, GGUF, hf://).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _click_errors() -> tuple[type[Exception], type[Exception]]:
    """(UsageError, ClickException) of the click typer runs on (its own copy since typer 0.2x, click before)."""
    mro = typer.BadParameter.__mro__
    return (next(c for c in mro if c.__name__ == "UsageError"), next(c for c in mro if c.__name__ == "ClickException"))


def main() -> None:
    import sys

    from modeltrace.commands import register_all
    from modeltrace.memory import bound_malloc
    from modeltrace.redact import ScrubbingStream, scrub

    bound_malloc()  # before any reader thread starts
    register_all(app)
    sys.stdout = ScrubbingStream(sys.stdout)  # type: ignore[assignment]
    sys.stderr = ScrubbingStream(sys.stderr)  # type: ignore[assignment]
    usage_error, click_exception = _click_errors()
    code: Any = 0
    try:
        code = app(standalone_mode=False)
    except usage_error as exc:  # one line, not a usage block and a box
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
            sys.stdout.write(ctx.get_help() + "\n")  # a bare `modeltrace` or `modeltrace index`: the help
            code = 0
        else:
            names = []
            while ctx is not None and ctx.parent is not None:  # the sub-command path, whatever the program is called
                names.append(ctx.info_name)
                ctx = ctx.parent
            where = " ".join(["modeltrace", *reversed(names)])
            err.print(f"modeltrace: error: {scrub(exc.format_message())} (see `{where} --help`)",  # type: ignore[attr-defined]
                      markup=False, highlight=False, soft_wrap=True)
            code = 2
    except click_exception as exc:
        err.print(f"modeltrace: error: {scrub(exc.format_message())}", markup=False, highlight=False,  # type: ignore[attr-defined]
                  soft_wrap=True)
        code = getattr(exc, "exit_code", 2)
    except (typer.Abort, KeyboardInterrupt):
        err.print("modeltrace: interrupted", markup=False)
        code = 130
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
