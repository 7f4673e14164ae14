"""How the CLI shows events: JSON lines or human-readable lines."""

from __future__ import annotations

import json
import sys
from typing import TextIO, final

from tremus.engine.events import Console, Event


@final
class EventPrinter:
    def __init__(self, as_json: bool, stream: TextIO | None = None) -> None:
        self._json = as_json
        self._stream = stream or sys.stdout

    def __call__(self, event: Event) -> None:
        if self._json:
            line = json.dumps(event.to_json(), separators=(",", ":"), default=str)
        elif isinstance(event, Console):
            line = event.line
        else:
            fields = " ".join(f"{k}={v}" for k, v in event.to_json().items()
                              if k not in ("event", "time"))
            line = f"[{event.name}] {fields}"
        try:
            self._stream.write(line + "\n")
            self._stream.flush()
        except BrokenPipeError:
            pass
