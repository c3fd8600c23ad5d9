"""Progress of a stage's steps, shown the way its destination reads it.

On a terminal: a tqdm bar. Anywhere else (a log file, a pipe, a Prefect worker): plain lines with no carriage
return, at most one per `every` seconds and at least one per `heartbeat` seconds, plus a first and a last line.
Each line names the stage and the model once: `target [retain]: 120/375 steps (32%), 12.0 s, loss=2.31`.
"""

from __future__ import annotations

import sys
import threading
import time
import weakref
from collections.abc import Iterable, Iterator
from typing import IO, Any, TypeVar

T = TypeVar("T")

EVERY_SECONDS = 10.0  # plain lines: the fewest seconds between two
HEARTBEAT_SECONDS = 60.0  # plain lines: the most seconds between two, even while one step runs long


class Progress:
    """`with Progress("unlearn", total, model="su") as bar: ... bar.update(loss=0.3)`."""

    def __init__(
        self,
        stage: str,
        total: int | None,
        unit: str = "steps",
        model: str | None = None,
        initial: int = 0,
        enabled: bool = True,
        stream: IO[str] | None = None,
        every: float = EVERY_SECONDS,
        heartbeat: float = HEARTBEAT_SECONDS,
    ):
        self.label = stage if model is None else f"{stage} [{model}]"
        self.total, self.unit, self.n = total, unit, initial
        self.stream = stream if stream is not None else sys.stderr
        self.every, self.heartbeat = every, heartbeat
        self.postfix: dict[str, Any] = {}
        self.start = self.last = time.monotonic()
        self.bar = None
        self.plain = enabled and not _is_tty(self.stream)
        self.lock = threading.Lock()
        self.done = threading.Event()
        if enabled and not self.plain:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=self.label, unit=unit, leave=False, file=self.stream)
        if self.plain:
            self._write()
            # a weak reference: a bar dropped without close() (a stage that raised) stops its heartbeat too
            threading.Thread(target=_beat, args=(weakref.ref(self), self.done), daemon=True,
                             name=f"progress-{self.label}").start()

    def update(self, n: int = 1, **postfix: Any) -> None:
        """Count `n` more steps; keyword values (a loss, the set being scored) show beside the count."""
        with self.lock:
            self.n += n
            self.postfix.update(postfix)
            if self.bar is not None:
                self.bar.update(n)
                if self.postfix:
                    self.bar.set_postfix_str(_format_postfix(self.postfix), refresh=False)
            elif self.plain and time.monotonic() - self.last >= self.every:
                self._write()

    def close(self) -> None:
        if self.done.is_set():
            return
        self.done.set()
        with self.lock:
            if self.bar is not None:
                self.bar.close()
            elif self.plain:
                self._write(final=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def line(self, final: bool = False) -> str:
        """The plain line for the current state."""
        count = f"{self.n}/{self.total}" if self.total else str(self.n)
        percent = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        seconds = time.monotonic() - self.start
        parts = [f"{self.label}: {'done, ' if final else ''}{count} {self.unit}{percent}", f"{seconds:.1f} s"]
        if self.postfix:
            parts.append(_format_postfix(self.postfix))
        return ", ".join(parts)

    def _write(self, final: bool = False) -> None:
        self.stream.write(self.line(final) + "\n")
        self.stream.flush()
        self.last = time.monotonic()

    def _beat_due(self) -> float:
        """Write a heartbeat line when one is due; the seconds until the next one is."""
        with self.lock:
            if not self.done.is_set() and time.monotonic() - self.last >= self.heartbeat:
                self._write()
            return max(self.heartbeat - (time.monotonic() - self.last), 0.05)


def _beat(ref: weakref.ReferenceType[Progress], done: threading.Event) -> None:
    wait = ref().heartbeat if ref() is not None else 0.0
    while not done.wait(wait):
        bar = ref()
        if bar is None:
            return
        wait = bar._beat_due()
        del bar


def track(items: Iterable[T], stage: str, total: int | None = None, unit: str = "steps", model: str | None = None,
          **kwargs: Any) -> Iterator[T]:
    """Iterate `items`, counting one step each."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Progress(stage, total, unit, model, **kwargs) as bar:
        for item in items:
            yield item
            bar.update()


def _format_postfix(values: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())


def _is_tty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
