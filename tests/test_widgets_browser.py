"""The widgets in a real browser: JupyterLab on 127.0.0.1 (free port, token, temporary root and config, nothing fetched
from the network) and Debian's headless Chromium (tests/browser.py). The test opens tests/notebooks/widgets_demo.ipynb,
runs it, checks that the widgets render from the lab extension packaged with ipywidgets (jupyterlab_widgets), moves the
`connectivity_weight` slider and checks that the projected-transitions image changes; then it opens the other tabs.

Screenshots go to results/screenshots/widgets/ (git-ignored; override with FATEBOOK_SCREENSHOTS). JupyterLab, its
kernel and the browser are stopped whatever happens."""
from __future__ import annotations
import base64, hashlib, json, os, secrets, shutil, signal, subprocess, sys, tempfile, time, urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from browser import chrome, free_port, require_browser

REPO = Path(__file__).resolve().parents[1]
DEMO = Path(__file__).resolve().parent / "notebooks" / "widgets_demo.ipynb"
SHOTS = Path(os.environ.get("FATEBOOK_SCREENSHOTS", REPO / "results" / "screenshots" / "widgets"))

# JupyterLab settings that keep it on this machine: no news feed, no update check, no PyPI extension manager, no
# language-server discovery; `window.jupyterapp` exposed so the test can run the notebook's commands.
LAB_CONFIG = {
    "ServerApp": {"ip": "127.0.0.1", "open_browser": False, "port_retries": 0, "terminals_enabled": False,
                  "allow_remote_access": False, "allow_root": True},   # CI containers run as root
    "LabApp": {"news_url": None, "check_for_updates_class": "jupyterlab.NeverCheckForUpdate",
               "extension_manager": "readonly", "expose_app_in_browser": True},
    "LanguageServerManager": {"autodetect": False},
}


def _children(pid: int) -> list[int]:
    "PIDs whose parent is `pid` (read from /proc; the kernels JupyterLab started)."
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit(): continue
        try: stat = (d / "stat").read_text()
        except OSError: continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid: out.append(int(d.name))
    return out


def _api(url: str, token: str, method: str = "GET"):
    req = urllib.request.Request(url, method=method, headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        body = r.read()
    return json.loads(body) if body else None


@contextmanager
def jupyterlab(root: Path, tmp: Path):
    "Start JupyterLab serving `root`; yields (base URL, token); stops its kernels and the server on exit."
    port, token = free_port(), secrets.token_hex(16)
    cfg = tmp / "config"; cfg.mkdir()
    (cfg / "jupyter_server_config.json").write_text(json.dumps(LAB_CONFIG))
    notif = tmp / "lab-settings" / "@jupyterlab" / "apputils-extension"; notif.mkdir(parents=True)
    (notif / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false"}))   # no news prompt
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(cfg), JUPYTER_DATA_DIR=str(tmp / "data"),
               JUPYTER_RUNTIME_DIR=str(tmp / "runtime"), IPYTHONDIR=str(tmp / "ipython"),
               JUPYTERLAB_SETTINGS_DIR=str(tmp / "lab-settings"), JUPYTERLAB_WORKSPACES_DIR=str(tmp / "workspaces"),
               MPLBACKEND="agg")
    log = open(tmp / "jupyterlab.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "jupyterlab", "--no-browser", f"--ServerApp.port={port}",
                             f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}"],
                            cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    kernels: set[int] = set()
    try:
        t0 = time.time()
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"JupyterLab exited ({proc.returncode}):\n{(tmp / 'jupyterlab.log').read_text()[-3000:]}")
            try:
                _api(f"{base}/api/status", token); break
            except OSError:
                if time.time() - t0 > 120: raise RuntimeError("JupyterLab did not answer within 120 s")
                time.sleep(0.5)
        yield base, token, lambda: kernels.update(_children(proc.pid))
    finally:
        kernels.update(_children(proc.pid))
        try:
            for k in _api(f"{base}/api/kernels", token) or []: _api(f"{base}/api/kernels/{k['id']}", token, "DELETE")
        except Exception: pass
        try: os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError: pass
        try: proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL); proc.wait(10)
        for pid in kernels:                                  # a kernel runs in its own session: stop it by its id
            try: os.kill(pid, signal.SIGKILL)
            except ProcessLookupError: pass
        log.close()


def _wait(drv, js: str, timeout: float, what: str, *args):
    "Poll the JavaScript expression `js` (a `return ...` body) until it is truthy; returns its value."
    t0, last = time.time(), None
    while time.time() - t0 < timeout:
        try: last = drv.execute_script(js, *args)
        except Exception as e: last = e
        if last and not isinstance(last, Exception): return last
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


# the <img> of the visible output view in the widget tab `tab` (0 kernel, 1 macrostates, 2 fates)
_VISIBLE_IMG = """
const tabs = document.querySelectorAll('.jp-OutputArea .widget-tab')[0];
if (!tabs) return null;
const imgs = [...tabs.querySelectorAll('img.widget-image')].filter(i => i.offsetParent !== null && i.naturalWidth > 0);
return imgs.length ? imgs[0] : null;
"""

_IMG_BYTES = """
const [img, done] = arguments;
fetch(img.src).then(r => r.arrayBuffer()).then(b => {
  let s = ''; const u = new Uint8Array(b); for (let i = 0; i < u.length; i++) s += String.fromCharCode(u[i]);
  done(btoa(s));
}).catch(e => done('ERROR ' + e));
"""


_KERNEL_EXEC = """
const [code, done] = arguments;
const k = window.jupyterapp.shell.currentWidget.sessionContext.session.kernel;
const f = k.requestExecute({code: code, silent: false, store_history: false});
let out = '';
f.onIOPub = m => { if (m.header.msg_type === 'stream') out += m.content.text;
                   if (m.header.msg_type === 'error') out += 'ERROR ' + m.content.ename + ': ' + m.content.evalue; };
f.done.then(() => done(out)).catch(e => done('FAILED ' + e));
"""


def _kernel(drv, code: str) -> str:
    "Run `code` in the notebook's kernel (after the widget messages queued before it) and return what it printed."
    return drv.execute_async_script(_KERNEL_EXEC, code).strip()


def _control(drv, kind: str, label: str):
    "The visible control of class `widget-{kind}` whose label is `label`."
    return drv.execute_script("""
return [...document.querySelectorAll('.jp-OutputArea .widget-' + arguments[0])].find(
    s => s.offsetParent !== null && s.querySelector('.widget-label') && s.querySelector('.widget-label').textContent.trim() === arguments[1]);""",
                              kind, label)


def _status(drv) -> str:
    return drv.execute_script("""return [...document.querySelectorAll('.jp-OutputArea .widget-html-content')]
                                 .filter(e => e.offsetParent !== null).map(e => e.textContent).join(' | ');""")


def _image_hash(drv, img) -> tuple[str, int]:
    "SHA-256 of the PNG bytes the browser shows in `img` (read back from its blob URL), and their length."
    b64 = drv.execute_async_script(_IMG_BYTES, img)
    assert not b64.startswith("ERROR"), b64
    data = base64.b64decode(b64)
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "the widget image is not a PNG"
    return hashlib.sha256(data).hexdigest(), len(data)


def _scroll_to_widget(drv):
    drv.execute_script("document.querySelector('.jp-OutputArea .widget-tab').scrollIntoView({block: 'start'});")


def _click_tab(drv, label: str):
    "Click the top-level tab `label` of the explorer (a real mouse click: lumino tab bars ignore synthetic clicks)."
    from selenium.webdriver.common.by import By
    outer = drv.find_element(By.CSS_SELECTOR, ".jp-OutputArea .widget-tab")
    bar = outer.find_element(By.CSS_SELECTOR, ".lm-TabBar")
    tab = next(t for t in bar.find_elements(By.CSS_SELECTOR, ".lm-TabBar-tab") if t.text.strip() == label)
    tab.click()


# the visible figure of the pane whose controls include a visible label `arguments[0]`
_PANE_IMG = """
const outer = document.querySelector('.jp-OutputArea .widget-tab');
const seen = [...outer.querySelectorAll('.widget-label')].some(l => l.offsetParent !== null && l.textContent.trim() === arguments[0]);
if (!seen) return null;
const imgs = [...outer.querySelectorAll('img.widget-image')].filter(i => i.offsetParent !== null && i.naturalWidth > 0);
return imgs.length ? imgs[0] : null;
"""


def test_widgets_in_jupyterlab(dentate_gyrus_path):
    require_browser()
    dentate_gyrus_path(200)      # skips without the data
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    SHOTS.mkdir(parents=True, exist_ok=True)
    for old in SHOTS.glob("*.png"): old.unlink()
    tmp = Path(tempfile.mkdtemp(prefix="fatebook-lab-"))
    root = tmp / "root"; root.mkdir()
    shutil.copy(DEMO, root / DEMO.name)
    try:
        with jupyterlab(root, tmp) as (base, token, note_kernels), chrome(width=1400, height=1000) as drv:
            drv.get(f"{base}/lab/tree/{DEMO.name}?token={token}&reset")
            _wait(drv, "return window.jupyterapp && document.querySelector('.jp-Notebook .jp-Cell')", 120,
                  "JupyterLab and the notebook")
            # the widget manager is the one packaged with ipywidgets (jupyterlab_widgets), loaded from this server
            assert drv.execute_script("return window.jupyterapp.hasPlugin('@jupyter-widgets/jupyterlab-manager:plugin')")
            _wait(drv, """const w = window.jupyterapp.shell.currentWidget;
                          return w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel
                                 && w.sessionContext.session.kernel.status === 'idle';""", 120, "an idle kernel")
            note_kernels()
            drv.execute_script("window.jupyterapp.commands.execute('application:toggle-left-area');")  # room for the widget
            drv.execute_script("window.jupyterapp.commands.execute('notebook:run-all-cells');")
            img = _wait(drv, _VISIBLE_IMG, 240, "the kernel tab's figure")
            assert not drv.find_elements(By.XPATH, "//*[contains(text(), 'Error displaying widget')]")
            h0, n0 = _image_hash(drv, img)
            _scroll_to_widget(drv)
            drv.save_screenshot(str(SHOTS / "1_kernel_before.png"))
            shot0 = img.screenshot_as_png

            # move the connectivity_weight slider with the mouse
            slider = drv.execute_script("""
return [...document.querySelectorAll('.widget-slider')].find(
    s => s.querySelector('.widget-label') && s.querySelector('.widget-label').textContent.trim() === 'connectivity_weight');""")
            assert slider is not None, "no connectivity_weight slider"
            readout = slider.find_element(By.CSS_SELECTOR, ".widget-readout")
            before = readout.text
            handle = slider.find_element(By.CSS_SELECTOR, ".noUi-handle")
            # the figure's blob URL before the move: the kernel may redraw before the readout is seen to change
            src0 = img.get_attribute("src")
            renders0 = int(_kernel(drv, "print(ex.tuner.calls['render:projection'])"))
            ActionChains(drv).click_and_hold(handle).move_by_offset(45, 0).release().perform()
            t0 = time.time()
            _wait(drv, "return arguments[0].textContent.trim() !== arguments[1];", 30, "the slider's readout to change",
                  readout, before)
            after = readout.text
            img2 = _wait(drv, _VISIBLE_IMG.replace("return imgs.length ? imgs[0] : null;",
                                                   "return imgs.length && imgs[0].src !== arguments[0] ? imgs[0] : null;"),
                         120, "the figure to be redrawn", src0)
            redraw = time.time() - t0
            h1, n1 = _image_hash(drv, img2)
            _scroll_to_widget(drv)
            drv.save_screenshot(str(SHOTS / "2_kernel_after_slider.png"))
            assert h1 != h0, "the figure's bytes did not change after moving the slider"
            # ... and it was redrawn by the kernel for the value the slider shows
            k_now = _kernel(drv, "print(ex.tuner.calls['render:projection'], f\"{ex.tuner.params['connectivity_weight']:.2f}\")").split()
            assert int(k_now[0]) > renders0 and k_now[1] == after, (renders0, k_now, after)
            assert img2.screenshot_as_png != shot0, "the rendered figure did not change on screen"
            status = drv.execute_script("""return [...document.querySelectorAll('.jp-OutputArea .widget-html-content')]
                                           .map(e => e.textContent).join(' | ');""")
            assert "T: 200 cells" in status and "Traceback" not in status, status
            print(f"\nslider {before} -> {after}; image {n0} -> {n1} bytes; redrawn {redraw:.2f} s after the mouse was released")

            # rapid moves: four drags without waiting; the kernel ends at the value the slider shows (no stale value wins)
            drv.set_script_timeout(120)
            for dx in (-30, 25, -20, 35):
                ActionChains(drv).click_and_hold(handle).move_by_offset(dx, 0).release().perform()
            shown = readout.text
            assert shown != after, "the rapid moves left the slider where it was: nothing to check"
            t0, k_val = time.time(), None
            while time.time() - t0 < 90:
                k_val = _kernel(drv, "print(f\"{ex.tuner.params['connectivity_weight']:.2f} {ex.tuner.w['connectivity_weight'].value:.2f}\")")
                if k_val == f"{shown} {shown}": break
                time.sleep(0.5)
            assert k_val == f"{shown} {shown}", (shown, k_val)
            assert readout.text == shown and "Traceback" not in _status(drv)

            # the other tabs compute when opened
            for i, tab in enumerate(("macrostates", "fates", "result"), start=3):
                _click_tab(drv, tab)
                if tab == "result":
                    _wait(drv, "return [...document.querySelectorAll('.jp-OutputArea pre')].some(p => p.textContent.includes('compute_fate_probabilities'))",
                          180, "the code of the result tab")
                else:
                    _wait(drv, _PANE_IMG, 180, f"the {tab} tab's figure", "n_components" if tab == "macrostates" else "terminal_states")
                time.sleep(0.5)
                _scroll_to_widget(drv)
                drv.save_screenshot(str(SHOTS / f"{i}_{tab}.png"))
            text = drv.execute_script("return document.querySelector('.jp-OutputArea').textContent")
            assert "Traceback" not in text and "Error displaying widget" not in text

            # a new n_states chosen in the list: the preview, then the result, computed in the background in this kernel
            _click_tab(drv, "macrostates")
            from selenium.webdriver.support.ui import Select
            sel = Select(_wait(drv, "const c = arguments[0]; return c && c.querySelector('select');", 60, "the n_states list",
                               _control(drv, "dropdown", "n_states")))
            current = sel.first_selected_option.text.split()[0]
            new = next(o.text.split()[0] for o in sel.options if "✗" not in o.text and o.text.split()[0] not in (current, "2"))
            sel.select_by_visible_text(next(o.text for o in sel.options if o.text.split()[0] == new))
            _wait(drv, "return arguments[0]().includes('n_states=' + arguments[1] + ' (crispness');".replace(
                  "arguments[0]()", "[...document.querySelectorAll('.jp-OutputArea .widget-html-content')].filter(e => e.offsetParent !== null).map(e => e.textContent).join(' | ')"),
                  120, f"the macrostates of n_states={new}", None, new)
            calls = _kernel(drv, "print(ex.macro.params['n_states'], ex.macro.calls['background'], ex.macro.pending)")
            assert calls.split() == [new, "1", "None"], calls
            _scroll_to_widget(drv)
            drv.save_screenshot(str(SHOTS / "6_macrostates_new_n_states.png"))

            # the fates tab, opened after the change: its figure and states follow the new macrostates
            _click_tab(drv, "fates")
            t0, state = time.time(), None
            while time.time() - t0 < 120:
                state = _kernel(drv, "print(ex.fates.stale, ex.fates.base is ex.macro.estimator, ex.tabs.selected_index, "
                                     "ex.fates.status.kind)")
                if state.startswith("False True 2") and not state.endswith("busy"): break
                time.sleep(0.5)
            time.sleep(0.5)
            _scroll_to_widget(drv)
            drv.save_screenshot(str(SHOTS / "7_fates_after_new_n_states.png"))
            assert state in ("False True 2 ok", "False True 2 warning"), (state, _status(drv))
            assert "Traceback" not in drv.execute_script("return document.querySelector('.jp-OutputArea').textContent")

            # offline: every resource the page loaded came from this server (or blob:/data: URLs it made)
            urls = drv.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
            foreign = [u for u in urls if not u.startswith((base, "blob:", "data:"))]
            assert not foreign, f"the page fetched from elsewhere: {foreign[:5]}"
            assert any("/lab/extensions/@jupyter-widgets/jupyterlab-manager/" in u for u in urls), \
                "the widget manager was not loaded from the packaged lab extension"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
