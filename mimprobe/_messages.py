"""One-line status messages of the long-running commands (extract, pretrain-mae, refine)."""

from __future__ import annotations

from collections.abc import Callable


def status_logger(log: Callable[[str], None] | None, *, progress: bool,
                  messages: list[str] | None = None) -> Callable[[str], None]:
    """A ``say(message)`` that records the message in ``messages`` (when given) and passes it to ``log``, or,
    without one, prints it on stderr (rich, no markup) when ``progress`` is on."""

    def say(message: str) -> None:
        if messages is not None:
            messages.append(message)
        if log is not None:
            log(message)
        elif progress:
            from rich.console import Console

            Console(stderr=True).print(message, markup=False, highlight=False)

    return say
