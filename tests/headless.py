"""A minimal Chrome DevTools Protocol client over `--remote-debugging-pipe`, standard library only.

Chromium reads commands from its fd 3 and writes replies and events to its fd 4, each a JSON object ended by a
NUL byte. We start it with os.posix_spawn and dup2 file actions, so the two pipe ends land on 3 and 4 without a
shell or a preexec_fn. One reader thread splits the stream into messages: replies go to whoever waits for
their id, events are kept (console errors, exceptions, load events) for the test to inspect.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--mute-audio",
    "--allow-file-access-from-files",
)


def find_chromium() -> str | None:
    """The first chromium-like binary on PATH (or $CHROMIUM), else None."""
    explicit = os.environ.get("CHROMIUM")
    if explicit and Path(explicit).is_file():
        return explicit
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def _high(fd: int) -> int:
    """`fd` moved to a number >= 10 (close-on-exec): dup2 onto 3 and 4 would clobber a pipe end that is itself 3
    or 4, which os.pipe returns when those numbers are free, as they can be late in a test session."""
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return high


class CdpError(RuntimeError):
    pass


class Browser:
    """A headless chromium with one page attached; `call` sends a command to that page and waits for its reply."""

    def __init__(self, binary: str, profile: Path, width: int = 1280, height: int = 900) -> None:
        to_chrome_r, self._to_chrome_w = (_high(fd) for fd in os.pipe())
        self._from_chrome_r, from_chrome_w = (_high(fd) for fd in os.pipe())
        cmd = [binary, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-pipe"]
        cmd.append(f"--window-size={width},{height}")
        self.log_path = profile.parent / "chromium.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in close()
        log_fd = _high(os.dup(self._log.fileno()))
        # chromium reads commands on fd 3 and writes to fd 4; the sources are >= 10, so no dup2 clobbers another
        actions = [
            (os.POSIX_SPAWN_DUP2, to_chrome_r, 3),
            (os.POSIX_SPAWN_DUP2, from_chrome_w, 4),
            (os.POSIX_SPAWN_DUP2, log_fd, 1),
            (os.POSIX_SPAWN_DUP2, log_fd, 2),
        ]
        self.pid = os.posix_spawn(binary, cmd, dict(os.environ), file_actions=actions)
        self._exit: int | None = None
        for fd in (to_chrome_r, from_chrome_w, log_fd):
            os.close(fd)
        self._next_id = 0
        self._replies: dict[int, dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.session: str | None = None
        target = self.call("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True}, session=False)[
            "sessionId"
        ]
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable")
        self.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )

    def _read(self) -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(self._from_chrome_r, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                with self._cond:
                    self._cond.notify_all()
                return
            buf += chunk
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                msg = json.loads(raw)
                with self._cond:
                    if "id" in msg:
                        self._replies[msg["id"]] = msg
                    else:
                        self.events.append(msg)
                    self._cond.notify_all()

    def call(self, method: str, params: dict[str, Any] | None = None, session: bool = True, timeout: float = 30) -> Any:
        with self._cond:
            self._next_id += 1
            mid = self._next_id
        msg: dict[str, Any] = {"id": mid, "method": method, "params": params or {}}
        if session and self.session:
            msg["sessionId"] = self.session
        os.write(self._to_chrome_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        with self._cond:
            while mid not in self._replies:
                left = deadline - time.monotonic()
                if left <= 0 or self.poll() is not None:
                    raise CdpError(f"{method}: no reply (chromium {'exited' if self.poll() is not None else 'slow'})")
                self._cond.wait(left)
            reply = self._replies.pop(mid)
        if "error" in reply:
            raise CdpError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def evaluate(self, expression: str, timeout: float = 30) -> Any:
        """The value of a JS expression in the page (awaiting promises); a thrown error raises CdpError."""
        result = self.call(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
            timeout=timeout,
        )
        if "exceptionDetails" in result:
            raise CdpError(f"evaluate({expression[:60]!r}): {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30, interval: float = 0.05) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise CdpError(f"timed out waiting for {expression!r}")
            time.sleep(interval)

    def navigate(self, url: str, timeout: float = 60) -> float:
        """Open `url` and wait for its load event; returns the seconds it took."""
        start = time.monotonic()
        seen = len(self.events)
        self.call("Page.navigate", {"url": url})
        deadline = start + timeout
        with self._cond:
            while not any(e.get("method") == "Page.loadEventFired" for e in self.events[seen:]):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CdpError(f"{url}: no load event in {timeout} s")
                self._cond.wait(left)
        return time.monotonic() - start

    def console_errors(self) -> list[str]:
        """Console errors, uncaught exceptions and error log entries (failed resource loads) seen so far."""
        found = []
        for e in self.events:
            method, p = e.get("method"), e.get("params", {})
            if method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                found.append("console: " + " ".join(str(a.get("value", a.get("description", ""))) for a in p["args"]))
            elif method == "Runtime.exceptionThrown":
                details = p.get("exceptionDetails", {})
                found.append("exception: " + str(details.get("exception", {}).get("description", details.get("text"))))
            elif method == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                entry = p["entry"]
                found.append(f"log: {entry.get('text')} {entry.get('url', '')}".strip())
        return found

    def screenshot(self) -> bytes:
        return base64.b64decode(self.call("Page.captureScreenshot", {"format": "png"})["data"])

    def poll(self) -> int | None:
        """The exit status once chromium has exited (reaped here), else None."""
        if self._exit is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid == self.pid:
                self._exit = os.waitstatus_to_exitcode(status)
        return self._exit

    def _wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def close(self) -> None:
        """Ask the browser to quit; kill it (our own child, by pid) if it does not within 10 s."""
        try:
            if self.poll() is None:
                with contextlib.suppress(CdpError, OSError):
                    self.call("Browser.close", session=False, timeout=5)
                if not self._wait(10):
                    os.kill(self.pid, signal.SIGKILL)
                    self._wait(10)
        finally:
            for fd in (self._to_chrome_w, self._from_chrome_r):
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._log.close()

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def card_paths(br: Browser) -> list[str]:
    return br.evaluate("Array.from(document.querySelectorAll('#gallery .card')).map(c => c.dataset.path)")


def open_page(br: Browser, page: Path) -> float:
    seconds = br.navigate(page.as_uri())
    try:
        br.wait_for("document.body.dataset.ready === '1'")
    except Exception as exc:
        raise AssertionError(f"the page never got ready: {br.console_errors()}") from exc
    # the thumbnails in view have loaded (or failed, which console_errors would show)
    br.wait_for(
        "Array.from(document.images).filter(i => i.getBoundingClientRect().top < innerHeight).every(i => i.complete)"
    )
    return seconds
