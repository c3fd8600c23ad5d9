"""Progress that suits its destination: plain lines in a file, a bar on a terminal."""

from __future__ import annotations

import os
import pty
import threading
import time

from stages.progress import Progress


def test_progress_in_a_file_is_plain_lines_at_a_bounded_rate(tmp_path):
    path = tmp_path / "log"
    every, heartbeat = 0.05, 0.2
    with open(path, "w") as stream:
        start = time.monotonic()
        with Progress("unlearn", 3000, model="su", stream=stream, every=every, heartbeat=heartbeat) as bar:
            for _ in range(3000):
                bar.update(forget_loss=1.5)
            quiet_from = time.monotonic()
            time.sleep(3 * heartbeat)  # one long step: the heartbeat still reports
            quiet_to = time.monotonic()
        elapsed = time.monotonic() - start
    text = path.read_text()
    lines = text.splitlines()
    assert "\r" not in text
    assert all(line.startswith("unlearn [su]: ") and line.count("unlearn") == 1 and "su" in line for line in lines)
    assert "3000/3000 steps (100%)" in lines[-1] and "done" in lines[-1] and "forget_loss=1.5" in lines[-1]
    # at most one line per `every` seconds, plus the first and the last
    assert len(lines) <= elapsed / every + 2, lines
    # at least one line per heartbeat while no step finishes
    assert int((quiet_to - quiet_from) / heartbeat) - 1 <= sum(line.startswith("unlearn [su]: 3000/") for line in lines)


def test_progress_on_a_terminal_is_a_bar():
    leader, follower = pty.openpty()
    chunks: list[bytes] = []

    def drain() -> None:  # a terminal's reader: without one the pty's small buffer blocks the writer
        while True:
            try:
                chunk = os.read(leader, 1 << 16)
            except OSError:
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    with os.fdopen(follower, "w") as stream:
        with Progress("target", 50, model="retain", stream=stream) as bar:
            for _ in range(50):
                bar.update(loss=0.25)
    reader.join(timeout=30)
    os.close(leader)
    shown = b"".join(chunks).decode()
    assert "\r" in shown and "target [retain]" in shown  # tqdm redraws one line in place
