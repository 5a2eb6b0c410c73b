"""Errors as the command line shows them: spec fields become the flags that set them.

Lower layers name fields (``frames``, ``vram``) so that every front end can speak
its own terms; this is where the CLI's terms are chosen. Kept free of heavy imports:
every command's error path goes through it.
"""

from __future__ import annotations

FLAGS = {
    "frames": "--frames", "width": "--size", "height": "--size", "size": "--size",
    "reserve_vram": "--reserve-vram", "vram": "--vram", "ram": "--ram", "memory": "--memory",
    "precision": "--precision", "compile": "--compile", "attention": "--attention",
    "lora_strength_high": "--lora-strength", "lora_strength_low": "--lora-strength",
    "shift_high": "--shift", "shift_low": "--shift", "interpolate": "--interpolate", "fps": "--fps",
    "crf": "--crf", "seed": "--seed", "steps": "--steps", "switch": "--switch", "boundary": "--boundary",
    "cfg": "--cfg", "sampler": "--sampler", "fit": "--fit", "prompt": "--prompt", "preset": "--preset",
    "x264_preset": "--x264-preset",
}  # fmt: skip
FLAGS.update({"device": "--device", "negative": "--negative", "image": "IMAGE"})


def flag(field: str) -> str:
    """The flag that sets ``field`` (the field itself when no flag does)."""
    return FLAGS.get(field, field)


def flagged(err: BaseException) -> str:
    """``err``'s message with the spec field it names written as the CLI flag."""
    from wanrender.runtime.planner import PlanRefused
    from wanrender.spec import SpecError

    if isinstance(err, PlanRefused):
        return err.describe(flag)
    msg = str(err)
    if isinstance(err, SpecError) and err.field in FLAGS:
        if msg.startswith(err.field + " "):
            msg = FLAGS[err.field] + msg[len(err.field) :]
        # the advice after the dash names the field too: "— use precision bf16"
        msg = msg.replace(f"— use {err.field} ", f"— use {FLAGS[err.field]} ")
    return msg


_INTERRUPTED: list[bool] = []


def install_interrupt_handler() -> None:
    """Ctrl-C is remembered as well as raised: it may surface as another error (an
    extension module interrupted while initialising raises ImportError) or be swallowed
    (raised inside a weakref callback, where Python prints "Exception ignored" with a
    traceback). The swallowed one is not printed; ``check_interrupted`` raises it again."""
    import signal
    import sys

    def on_sigint(signum: int, frame: object) -> None:
        _INTERRUPTED.append(True)
        raise KeyboardInterrupt

    previous = sys.unraisablehook

    def unraisable(info) -> None:  # noqa: ANN001 - sys.UnraisableHookArgs
        if not isinstance(info.exc_value, KeyboardInterrupt):
            previous(info)

    signal.signal(signal.SIGINT, on_sigint)
    sys.unraisablehook = unraisable


def interrupted() -> bool:
    return bool(_INTERRUPTED)


def check_interrupted() -> None:
    """Raise a Ctrl-C that was swallowed where it landed (called from progress events)."""
    if _INTERRUPTED:
        raise KeyboardInterrupt


def fail(err: Exception) -> None:
    """A command's user error: one red line on stderr, exit 2 (the traceback too with --debug)."""
    import os

    import typer
    from rich.console import Console
    from rich.markup import escape

    if os.environ.get("WANRENDER_DEBUG", "").lower() in ("1", "true", "yes"):
        raise err  # main() lets it through with its traceback
    Console(stderr=True).print(f"[bold red]error:[/] {escape(flagged(err))}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def pair(value: str | None, flag: str) -> tuple[float | None, float | None]:
    """A flag of one number or two ('5' or '5,6'): (first, second)."""
    from wanrender.errors import WanrenderError

    if value is None:
        return None, None
    try:
        parts = [float(v) for v in value.split(",")]
    except ValueError:
        raise WanrenderError(f"{flag} {value!r} is invalid — use a number or two separated by a comma") from None
    if len(parts) == 1:
        return parts[0], parts[0]
    if len(parts) == 2:
        return parts[0], parts[1]
    raise WanrenderError(f"{flag} {value!r} is invalid — use a number or two separated by a comma")


# Set by a command that rendered on a GPU and wrote everything (see ``leave``).
_SKIP_TEARDOWN: list[bool] = []


def skip_teardown() -> None:
    """The command has written all its files: let the process end without the interpreter's
    teardown, which for a one-video render frees tens of GB of models object by object
    (measured in docs/benchmarks.md). Only ``leave``, from the console entry, acts on it:
    a command run in-process (tests, a service) is unaffected."""
    _SKIP_TEARDOWN.append(True)


def leave(code: object) -> None:
    """Exit now with ``code`` 0 when a command asked to skip the teardown; else return."""
    if _SKIP_TEARDOWN and code in (0, None):
        import logging
        import os
        import sys

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
