"""Open a local HTML file in headless Chromium: collect console errors and network requests,
evaluate JavaScript, take screenshots.

Used by `report --screenshot` and by the report's browser test. Chromium is driven over the
DevTools protocol on a pipe (`--remote-debugging-pipe`: JSON messages ended by NUL on file
descriptors 3 and 4), so nothing beyond Chromium itself is needed: no websocket client, no
driver. Chromium is found as `$PROBES_CHROMIUM` or on PATH (`find_chromium`); on Debian it is
the `chromium` package. Every host name resolves to nothing (the page must be self-contained).

    with Page("report.html") as page:
        n = page.evaluate("document.images.length")
        page.screenshot("report.png", max_height=1800)
        assert not page.console_errors and not page.requests
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from probes.errors import ProbesError
from probes.safe_output import write_file

__all__ = ["CHROMIUM_ENV", "CHROMIUM_NAMES", "BrowserError", "Page", "find_chromium"]

CHROMIUM_ENV = "PROBES_CHROMIUM"
"""Environment variable naming the Chromium executable to use."""

CHROMIUM_NAMES: tuple[str, ...] = ("chromium", "chromium-browser", "google-chrome",
                                   "google-chrome-stable", "chrome", "headless_shell")
"""Executables looked for on PATH, in order."""

_LOCAL_SCHEMES = ("file:", "data:", "about:", "blob:", "chrome:", "devtools:")
"""URL schemes that are not network requests."""

_FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
    "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--mute-audio", "--hide-scrollbars",
    "--host-resolver-rules=MAP * ~NOTFOUND", "--remote-debugging-pipe",
)
"""Headless, sandbox off (containers run as root), no network, DevTools on fds 3 and 4."""


class BrowserError(ProbesError):
    """Chromium is missing, did not start, or did not answer in time."""


def find_chromium() -> str | None:
    """The Chromium executable: `$PROBES_CHROMIUM`, else the first of `CHROMIUM_NAMES` on PATH."""
    given = os.environ.get(CHROMIUM_ENV)
    if given:
        return given if shutil.which(given) else None
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


class Page:
    """One local page in headless Chromium (a context manager; the browser ends on exit).

    Attributes:
        url: The page's file:// URL.
        console_errors: console.error/assert messages, uncaught exceptions and browser log
            entries of level error, in order.
        requests: URLs the page asked for other than file:, data:, about: and blob:.
    """

    def __init__(self, path: str | os.PathLike[str], *, width: int = 1280, height: int = 900,
                 timeout: float = 60.0, chromium: str | None = None) -> None:
        """Prepare to open `path` in a `width` x `height` window; `timeout` per protocol call."""
        self.url = Path(path).resolve().as_uri()
        self.console_errors: list[str] = []
        self.requests: list[str] = []
        self._size = (width, height)
        self._timeout = timeout
        self._exe = chromium or find_chromium()
        self._proc: subprocess.Popen[bytes] | None = None
        self._profile: tempfile.TemporaryDirectory[str] | None = None
        self._buf = b""
        self._id = 0
        self._session = ""
        self._fd_in = self._fd_out = -1

    # -- lifecycle ---------------------------------------------------------------------------------
    def __enter__(self) -> Page:
        """Start Chromium, open the page and wait for its load event."""
        if self._exe is None:
            raise BrowserError(f"no Chromium found (set ${CHROMIUM_ENV} or install one, e.g. "
                               "`apt-get install chromium`)")
        self._profile = tempfile.TemporaryDirectory(prefix="probes-chromium-")
        try:
            self._start()
            self._open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        """Close the browser."""
        self.close()

    def _start(self) -> None:
        to_chrome_r, to_chrome_w = os.pipe()
        from_chrome_r, from_chrome_w = os.pipe()

        def fds() -> None:  # in the child: its fd 3 reads our commands, fd 4 writes the answers
            a, b = os.dup(to_chrome_r), os.dup(from_chrome_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        assert self._profile is not None
        argv = [str(self._exe), *_FLAGS, f"--user-data-dir={self._profile.name}",
                f"--window-size={self._size[0]},{self._size[1]}", "about:blank"]
        try:
            self._proc = subprocess.Popen(argv, pass_fds=(3, 4), preexec_fn=fds,
                                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            raise BrowserError(f"cannot start Chromium {self._exe}: {exc}") from None
        finally:
            os.close(to_chrome_r)
            os.close(from_chrome_w)
        self._fd_in, self._fd_out = from_chrome_r, to_chrome_w

    def _open(self) -> None:
        target = self.call("Target.createTarget", {"url": "about:blank"}, browser=True)["targetId"]
        self._session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True},
                                  browser=True)["sessionId"]
        for domain in ("Runtime", "Log", "Page", "Network"):
            self.call(f"{domain}.enable")
        width, height = self._size
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        self.call("Page.navigate", {"url": self.url})
        self._wait_event("Page.loadEventFired")

    def close(self) -> None:
        """End Chromium (politely, then its process group) and remove its profile."""
        proc, self._proc = self._proc, None
        if proc is not None:
            with contextlib.suppress(OSError):
                self._send("Browser.close", {}, browser=True)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the group this Page started
                proc.wait(timeout=10)
        for fd in (self._fd_in, self._fd_out):
            if fd >= 0:
                os.close(fd)
        self._fd_in = self._fd_out = -1
        if self._profile is not None:
            self._profile.cleanup()
            self._profile = None

    # -- protocol ----------------------------------------------------------------------------------
    def _send(self, method: str, params: dict[str, Any], *, browser: bool = False) -> int:
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params}
        if not browser:
            msg["sessionId"] = self._session
        os.write(self._fd_out, json.dumps(msg).encode() + b"\0")
        return self._id

    def _next(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._fd_in], [], [], left)[0]:
                raise BrowserError(f"Chromium did not answer within {self._timeout:.0f}s ({self.url})")
            chunk = os.read(self._fd_in, 1 << 20)
            if not chunk:
                raise BrowserError(f"Chromium closed the DevTools pipe ({self.url})")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        msg = json.loads(raw)
        if "method" in msg:
            self._event(msg)
        return msg

    def _event(self, msg: dict[str, Any]) -> None:
        method, params = msg["method"], msg.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
            self.console_errors.append(f"console.{params['type']}: {text}")
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            desc = details.get("exception", {}).get("description") or details.get("text", "")
            self.console_errors.append(f"uncaught: {desc} (line {details.get('lineNumber')})")
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            self.console_errors.append(f"{entry.get('source')}: {entry.get('text')} {entry.get('url', '')}")
        elif method == "Network.requestWillBeSent":
            url = params.get("request", {}).get("url", "")
            if not url.startswith(_LOCAL_SCHEMES):
                self.requests.append(url)

    def _wait_event(self, method: str) -> dict[str, Any]:
        deadline = time.monotonic() + self._timeout
        while True:
            msg = self._next(deadline)
            if msg.get("method") == method:
                return msg.get("params", {})

    def call(self, method: str, params: dict[str, Any] | None = None, *,
             browser: bool = False) -> dict[str, Any]:
        """Send one DevTools command (to the page, or to the browser) and return its result.

        Raises:
            BrowserError: An error answer, no answer in time, or Chromium gone.
        """
        wanted = self._send(method, params or {}, browser=browser)
        deadline = time.monotonic() + self._timeout
        while True:
            msg = self._next(deadline)
            if msg.get("id") == wanted:
                if "error" in msg:
                    raise BrowserError(f"{method}: {msg['error'].get('message')}")
                return msg.get("result", {})

    # -- what tests and commands use ---------------------------------------------------------------
    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited).

        Raises:
            BrowserError: The expression threw.
        """
        res = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                             "awaitPromise": True})
        if "exceptionDetails" in res:
            details = res["exceptionDetails"]
            raise BrowserError(f"{expression[:60]!r} threw: "
                               f"{details.get('exception', {}).get('description') or details.get('text')}")
        return res.get("result", {}).get("value")

    def hover(self, x: float, y: float) -> None:
        """Move the mouse to (x, y) in CSS pixels of the viewport."""
        self.call("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x, "y": y})

    def hover_over(self, selector: str) -> bool:
        """Move the mouse to the centre of the first element matching `selector`, if it is in the
        viewport; returns whether it was."""
        box = self.evaluate(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)}); if (!e) return null; "
            "const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        if not box or not (0 <= box[1] < self._size[1]):
            return False
        self.hover(*box)
        return True

    def screenshot(self, path: str | os.PathLike[str], *, max_height: int | None = None) -> Path:
        """A PNG of the viewport: the page from the top, `max_height` pixels at most (the viewport
        is made that tall, or as tall as the page if it is shorter)."""
        width, height = self._size
        page = int(self.evaluate("document.documentElement.scrollHeight") or height)
        height = min(page, max_height) if max_height is not None else page
        if height != self._size[1]:
            self.call("Emulation.setDeviceMetricsOverride",
                      {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        res = self.call("Page.captureScreenshot", {"format": "png"})
        out = Path(path)
        write_file(out, base64.b64decode(res["data"]), flag="--screenshot", make_parents=True)
        return out
