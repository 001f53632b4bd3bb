"""Console output that reads well on a terminal, in job logs and in Jupyter.

rich draws live displays (progress bars, spinners) in place on a terminal, and in Jupyter
through an ipywidgets output widget. Without ipywidgets a notebook gets plain lines instead
of a live display that rich cannot draw there; job logs get plain lines too.
"""

from __future__ import annotations

import contextlib

from rich.console import Console

from ray_app.extras import installed


def live(console: Console) -> bool:
    """Whether `console` can redraw a live display in place."""
    if console.is_jupyter:
        return installed("ipywidgets")
    return console.is_terminal and not console.is_dumb_terminal


def status(console: Console, message: str) -> contextlib.AbstractContextManager:
    """`console.status(message)` (a spinner) where it can be drawn; in a notebook without
    ipywidgets the message is printed once instead."""
    if console.is_jupyter and not live(console):
        console.print(message, highlight=False)
        return contextlib.nullcontext()
    return console.status(message)
