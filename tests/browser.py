"""Headless Chromium for fatebook's browser tests (JupyterLab widgets, the documentation site).

Debian's `chromium` and `chromium-driver` (installed by `tools/setup.sh`) driven by selenium: nothing is downloaded
at run time. Chromium starts with the flags this machine's closed network needs (no background networking, no
component updates) and a fresh profile; every helper here stops what it started.

    from browser import chrome, free_port, static_server
    with static_server("_site") as url, chrome() as drv:
        drv.get(url + "/index.html"); drv.save_screenshot("home.png")
"""
from __future__ import annotations
import functools, http.server, os, shutil, socket, tempfile, threading
from contextlib import contextmanager
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("FATEBOOK_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("FATEBOOK_CHROMEDRIVER", "/usr/bin/chromedriver")
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--hide-scrollbars", "--force-device-scale-factor=1"]


def require_browser():
    "Skip the calling test unless chromium, chromedriver and selenium are present (under CI: fail instead)."
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not (Path(p).exists() or shutil.which(p))]
    try: import selenium  # noqa: F401
    except ImportError: missing.append("selenium (pip install -e '.[dev]')")
    if missing:
        msg = f"browser test needs {', '.join(missing)}: bash tools/setup.sh installs them"
        if os.environ.get("CI"): pytest.fail(msg)
        pytest.skip(msg)


def free_port() -> int:
    "A free TCP port on 127.0.0.1."
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


@contextmanager
def chrome(width: int = 1280, height: int = 900, timeout: float = 60):
    "A headless Chromium selenium driver with a throw-away profile; always quit on exit."
    require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    profile = tempfile.mkdtemp(prefix="fatebook-chrome-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for f in FLAGS + [f"--window-size={width},{height}", f"--user-data-dir={profile}"]: opts.add_argument(f)
    drv = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    drv.set_page_load_timeout(timeout)
    try: yield drv
    finally:
        drv.quit(); shutil.rmtree(profile, ignore_errors=True)


@contextmanager
def static_server(root):
    "Serve the folder `root` on 127.0.0.1 at a free port; yields the base URL; the server stops on exit."
    handler = functools.partial(_QuietHandler, directory=str(root))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True); t.start()
    try: yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown(); srv.server_close(); t.join(5)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a): pass


def browser_errors(drv) -> list[str]:
    "Severe messages of the page's JavaScript console (needs the 'goog:loggingPrefs' capability; [] if unsupported)."
    try: return [e["message"] for e in drv.get_log("browser") if e.get("level") == "SEVERE"]
    except Exception: return []
