"""01-quickstart.ipynb in a real JupyterLab, in headless Chromium (Debian's), run cell by cell.

What only a browser shows: the status widget renders as a widget (not its text fallback), in
green or amber; a ``%%isolated`` cell's output arrives while the cell is still running. A
screenshot is left in tests/artifacts/ for a person to look at.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import nbformat
import psutil
import pytest
from support.kernel_helpers import GVISOR_ENV

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-dev-shm-usage"]
GREEN, AMBER = "rgb(26, 127, 55)", "rgb(178, 107, 0)"
#: JupyterLab's rendering of a stream output on stderr (the red box).
STDERR = ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']"
CELL_TIMEOUT_MS = int(os.environ.get("GVM_CELL_TIMEOUT_MS", "180000"))


def _lab_module():
    spec = importlib.util.spec_from_file_location("gvm_lab", ROOT / "scripts" / "lab.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def browser():
    if not os.access(CHROMIUM, os.X_OK):
        message = f"{CHROMIUM} is missing (Debian package chromium; `make test` installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                              headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def lab(tmp_path):
    """JupyterLab serving a copy of notebooks/ (the browser's autosave must not touch ours),
    its kernels in a TMPDIR of their own that must be empty once the server has stopped."""
    root = tmp_path / "notebooks"
    shutil.copytree(ROOT / "notebooks", root)
    for path in root.glob("*.ipynb"):  # outputs seen in the page are then this run's own
        notebook = nbformat.read(path, as_version=4)
        for cell in notebook.cells:
            if cell.cell_type == "code":
                cell.outputs, cell.execution_count = [], None
        nbformat.write(notebook, path)
    kernel_tmp = tempfile.mkdtemp(prefix="gvm-lab-kernels-")
    env = {k: v for k, v in os.environ.items() if k not in GVISOR_ENV}
    env["TMPDIR"] = kernel_tmp
    lab_module = _lab_module()
    server = lab_module.LabServer(root=root, port=lab_module.free_port(None), env=env,
                                  log_path=str(tmp_path / "lab.log"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
        left = os.listdir(kernel_tmp)
        shutil.rmtree(kernel_tmp, ignore_errors=True)
        assert not left, f"kernels of the Lab left files behind: {left}"


# Reads one cell of the open notebook: its prompt ("[*]:" while running) and output text.
CELL_STATE = """(index) => {
  const cell = document.querySelectorAll('.jp-Notebook .jp-Cell')[index];
  const prompt = cell.querySelector('.jp-InputPrompt');
  const output = cell.querySelector('.jp-OutputArea');
  return {prompt: prompt ? prompt.textContent.trim() : '',
          output: output ? output.textContent : ''};
}"""


def _cell_index(page, text: str) -> int:
    sources = page.eval_on_selector_all(
        ".jp-Notebook .jp-Cell", "cells => cells.map(c => c.querySelector('.jp-InputArea')"
        " ? c.querySelector('.jp-InputArea').textContent : '')")
    for index, source in enumerate(sources):
        if text in source:
            return index
    raise AssertionError(f"no cell contains {text!r}")


#: What the page says about cell ``index`` and where the keyboard's focus is.
FOCUS_STATE = """(index) => {
  const cell = document.querySelectorAll('.jp-Notebook .jp-Cell')[index];
  const notebook = cell.closest('.jp-Notebook');
  const active = document.activeElement;
  return {cell: cell.className, notebook: notebook.className,
          focus: active ? active.tagName + '.' + active.className : '',
          inside: notebook.contains(active),
          dialogs: document.querySelectorAll('.jp-Dialog').length,
          tab: [...document.querySelectorAll('#jp-main-dock-panel .lm-TabBar-tab')].map(
            t => t.textContent + ':' + t.className).join(' | '),
          run: [...notebook.closest('.jp-NotebookPanel').querySelectorAll(
            '.jp-Toolbar-item')].map(b => (b.getAttribute('data-jp-item-name') || '') + ':'
            + (b.querySelector('button') ? b.querySelector('button').className + '/'
               + b.querySelector('button').disabled : '')).join(' | '),
          status: document.querySelector('#jp-main-statusbar') ?
            document.querySelector('#jp-main-statusbar').textContent : ''};
}"""


#: JupyterLab's status bar says "<kernel> | Idle" only once the current notebook's session has
#: a kernel that is connected and idle (SessionContext.kernelDisplayStatus). The toolbar's
#: execution indicator is no such signal: its model starts out as "idle" before any kernel is
#: connected, and a cell run then is silently dropped (CodeCell.execute returns when
#: ``session.kernel`` is null), which left "[ ]:" for good on a busy machine.
KERNEL_READY = """(name) => {
  const bar = document.querySelector('#jp-main-statusbar');
  return !!bar && [...bar.querySelectorAll('.jp-StatusBar-TextItem')].some(
    item => item.textContent.includes(name + ' | Idle'));
}"""


def _wait_kernel_ready(page, name: str, timeout_ms: int = 180_000) -> None:
    page.wait_for_function(KERNEL_READY, arg=name, timeout=timeout_ms)


def _debug_dump(page, name: str, detail: object) -> str:
    """Keep what a person needs to see why a run stalled: a screenshot, the console."""
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))
    console = getattr(page, "gvm_console", [])
    (ARTIFACTS / f"{name}.console.txt").write_text(
        "\n".join(console) + f"\n\nstate: {detail}\n")
    return f"(screenshot and console in tests/artifacts/{name}.*)"


def _run_one(page, index: int) -> list[dict]:
    """Select cell ``index``, run it (Ctrl+Enter), and sample its state until it is done.

    Returns every state seen, in order, so callers can tell what showed up while it ran.
    """
    cell = page.locator(".jp-Notebook .jp-Cell").nth(index)
    cell.scroll_into_view_if_needed()
    cell.locator(".jp-InputPrompt").click()  # command mode, this cell selected
    before = page.evaluate(FOCUS_STATE, index)
    page.keyboard.press("Control+Enter")
    seen = []
    started = time.monotonic()
    deadline = started + CELL_TIMEOUT_MS / 1000
    while time.monotonic() < deadline:
        state = page.evaluate(CELL_STATE, index)
        seen.append(state)
        if state["prompt"] not in ("[*]:", "[ ]:", ""):
            return seen
        # JupyterLab marks a cell "[*]" as soon as it sends it to the kernel (which is
        # checked ready before): a cell never marked within a minute was not sent.
        if time.monotonic() > started + 60 and all(s["prompt"] != "[*]:" for s in seen):
            break
        page.wait_for_timeout(100)
    focus = page.evaluate(FOCUS_STATE, index)
    focus = {"before": before, "after": focus}
    raise AssertionError(f"cell {index} did not finish (never sent if no [*] was seen): "
                         f"{seen[-1]}; {focus} "
                         + _debug_dump(page, f"stalled-cell-{index}", focus))


def test_quickstart_runs_in_jupyterlab(browser, lab, runsc_works):
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(lab.notebook_url("01-quickstart.ipynb"))
    # The notebook's own content, not the empty cell a panel starts with.
    page.wait_for_selector(".jp-Notebook .jp-MarkdownCell h1", timeout=120_000)
    # The kernel is up once the toolbar's indicator says Idle.
    _wait_kernel_ready(page, "Python 3 (ipykernel)")
    # JupyterLab adds cells to the page in batches: wait for all of them.
    expected = len(nbformat.read(ROOT / "notebooks" / "01-quickstart.ipynb", as_version=4).cells)
    page.wait_for_function(f"document.querySelectorAll('.jp-Notebook .jp-Cell').length"
                           f" === {expected}", timeout=60_000)
    cells = page.locator(".jp-Notebook .jp-Cell")
    runs = {}
    for index in range(cells.count()):
        if "jp-CodeCell" in (cells.nth(index).get_attribute("class") or ""):
            runs[index] = _run_one(page, index)

    # The status widget: rendered by the widget manager, in green (gVisor) or amber (fallback).
    widget_cell = cells.nth(_cell_index(page, "gvisor_magic.status_widget()"))
    status = widget_cell.locator(".gvisor-magic-status")
    status.wait_for(timeout=30_000)
    colour = status.evaluate("el => getComputedStyle(el).borderLeftColor")
    assert colour in (GREEN, AMBER), colour
    text = status.text_content()
    assert "runsc" in text and "isolated by gVisor (runsc)" in text, text
    assert colour == GREEN
    assert widget_cell.locator(".jp-OutputArea-output pre").count() == 0, \
        "the widget's text fallback was shown instead of the widget"

    # A %%isolated cell ran under gVisor.
    uname = runs[_cell_index(page, 'kernel inside the sandbox: $(uname -r)')][-1]
    assert "kernel inside the sandbox: 4.4.0" in uname["output"], uname
    assert "runsc (gVisor): exit 0 in" in uname["output"], uname
    uname_cell = cells.nth(_cell_index(page, 'kernel inside the sandbox: $(uname -r)'))
    assert uname_cell.locator(STDERR).count() == 0, "a successful cell shows a stderr box"
    assert uname_cell.locator(".gvisor-magic-badge svg").count() == 1

    # Streaming: "step 1" was on the page while the cell was still running.
    steps = runs[_cell_index(page, 'echo "step $step of 3"')]
    early = [s for s in steps if s["prompt"] == "[*]:" and "step 1 of 3" in s["output"]
             and "step 3 of 3" not in s["output"]]
    assert early, f"no output was seen before the cell finished: {steps[:3]} ... {steps[-1]}"
    assert "step 3 of 3" in steps[-1]["output"] and steps[-1]["prompt"] != "[*]:"

    # The raises-exception cell shows its error; the last cell (clean-up) ran.
    error = runs[_cell_index(page, "something went wrong")]
    assert "CalledProcessError" in error[-1]["output"]

    last = runs[max(runs)][-1]
    assert last["output"] == "", f"the clean-up cell failed: {last}"

    ARTIFACTS.mkdir(exist_ok=True)
    widget_cell.scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS / "quickstart-widget.png"))
    cells.nth(_cell_index(page, 'echo "step $step of 3"')).scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS / "quickstart-cells.png"))
    page.close()


UX_CELLS = [
    "%load_ext gvisor_magic\nimport gvisor_magic\ngvisor_magic.status_widget()",
    "%%isolated\necho \"ran in kernel $(uname -r)\"",
    "%%isolated --mode subprocess\necho \"fallback cell on $(uname -r)\"",
    "%isolated --timeout 5 echo \"line magic in $(uname -r)\"",
    "%isolation on",
    "%%bash\necho \"bash cell in $(uname -r)\"",
    "%isolated --env X true",
]


def test_cells_read_as_a_user_sees_them(browser, lab, runsc_works):
    """Success is quiet (a grey badge, no red box), a fallback is loud, %%bash is routed, a
    bad option is one UsageError line, and one host cell leaves the panel green."""
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(source) for source in UX_CELLS]
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                       "language": "python"}
    nbformat.write(notebook, lab.root / "ux.ipynb")
    page = browser.new_page(viewport={"width": 1280, "height": 1100})
    page.gvm_console = []
    page.on("console", lambda message: page.gvm_console.append(
        f"{message.type}: {message.text}"))
    page.goto(lab.notebook_url("ux.ipynb"))
    _wait_kernel_ready(page, "Python 3 (ipykernel)")
    page.wait_for_function(f"document.querySelectorAll('.jp-Notebook .jp-Cell').length"
                           f" === {len(UX_CELLS)}", timeout=60_000)
    cells = page.locator(".jp-Notebook .jp-Cell")
    outputs = {index: _run_one(page, index)[-1]["output"] for index in range(3)}
    # After the host cell: the panel stays green (the kernel's default), its own row is amber.
    status = cells.nth(0).locator(".gvisor-magic-status")
    page.wait_for_function("() => document.querySelector('.gvisor-magic-status')"
                           " .textContent.includes('NOT isolated (this cell')", timeout=30_000)
    assert status.evaluate("el => getComputedStyle(el).borderLeftColor") == GREEN
    assert "isolated by gVisor (runsc)" in status.text_content()
    assert status.locator("svg").count() == 2  # the headline's shield, the row's warning
    ARTIFACTS.mkdir(exist_ok=True)
    cells.nth(0).scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS / "widget-after-a-host-cell.png"))
    outputs.update({index: _run_one(page, index)[-1]["output"]
                    for index in range(3, len(UX_CELLS))})

    isolated = cells.nth(1)
    assert "ran in kernel 4.4.0" in outputs[1] and "runsc (gVisor): exit 0 in" in outputs[1]
    assert isolated.locator(STDERR).count() == 0, outputs[1]
    badge = isolated.locator(".gvisor-magic-badge")
    assert badge.count() == 1 and badge.locator("svg").count() == 1
    assert badge.evaluate("el => getComputedStyle(el).color") == "rgb(87, 96, 106)"  # grey

    fallback = cells.nth(2)
    assert fallback.locator(STDERR).count() == 1, outputs[2]
    warning = fallback.locator(STDERR).text_content()
    assert "WARNING: subprocess (NOT isolated)" in warning
    assert fallback.locator(".gvisor-magic-badge").count() == 0

    assert "line magic in 4.4.0" in outputs[3] and cells.nth(3).locator(STDERR).count() == 0
    assert "routing on." in outputs[4] and cells.nth(4).locator(STDERR).count() == 0
    assert "bash cell in 4.4.0" in outputs[5] and cells.nth(5).locator(STDERR).count() == 0
    usage = cells.nth(6).locator(STDERR).text_content()
    assert usage.strip() == "UsageError: --env expects KEY=VALUE, got 'X'", usage

    cells.nth(1).scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS / "cells-quiet-success-and-loud-fallback.png"))
    cells.nth(5).scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS / "cells-routing-and-usage-error.png"))
    page.close()


REVIEW_CELLS = [
    "%load_ext gvisor_magic",
    "%%isolated --writes auto\nprintf 'one\\ntwo\\n' > notes.txt; echo data > out.csv\n"
    "echo 'x = 1' > helper.py; mkdir -p pkg; echo 'import os' > pkg/conftest.py",
    "%%isolated --writes auto\necho more > more.csv",
    "%%isolated --writes review\necho three >> notes.txt",
]


def test_held_writes_show_a_review_widget_that_applies_and_discards(browser, lab,
                                                                     runsc_works):
    """A cell that wrote what a host tool would run shows the review widget (the files, why,
    a diff, buttons); its buttons apply and discard on the host; an all-inert cell shows
    nothing extra."""
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(source) for source in REVIEW_CELLS]
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                       "language": "python"}
    nbformat.write(notebook, lab.root / "review.ipynb")
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(lab.notebook_url("review.ipynb"))
    _wait_kernel_ready(page, "Python 3 (ipykernel)")
    page.wait_for_function(f"document.querySelectorAll('.jp-Notebook .jp-Cell').length"
                           f" === {len(REVIEW_CELLS)}", timeout=60_000)
    cells = page.locator(".jp-Notebook .jp-Cell")
    for index in range(len(REVIEW_CELLS)):
        _run_one(page, index)
    held = cells.nth(1).locator(".gvisor-magic-review")
    held.wait_for(timeout=30_000)
    text = held.text_content()
    assert "2 change(s) held for review" in text
    assert "helper.py" in text and "pkg/conftest.py" in text and "importable" in text
    assert "out.csv" not in text and "notes.txt" not in text  # inert: on the host already
    assert (lab.root / "out.csv").read_text() == "data\n"
    assert not (lab.root / "helper.py").exists() and not (lab.root / "pkg").exists()
    assert cells.nth(2).locator(".gvisor-magic-review").count() == 0  # nothing held
    assert (lab.root / "more.csv").exists()
    review = cells.nth(3).locator(".gvisor-magic-review")
    review.wait_for(timeout=30_000)
    review.locator("summary", has_text="diff").first.click()
    assert "+three" in review.text_content()
    assert (lab.root / "notes.txt").read_text() == "one\ntwo\n"
    ARTIFACTS.mkdir(exist_ok=True)
    cells.nth(1).scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS / "review-widget-held-changes.png"))

    held.locator("button[title='apply helper.py']").click()
    page.wait_for_function("() => document.querySelector('.gvisor-magic-review')"
                           ".textContent.includes('applied helper.py')", timeout=30_000)
    assert (lab.root / "helper.py").read_text() == "x = 1\n"
    held.locator("button", has_text="Discard all").click()
    page.wait_for_function("() => document.querySelector('.gvisor-magic-review')"
                           ".textContent.includes('Nothing held any more')", timeout=30_000)
    assert not (lab.root / "pkg" / "conftest.py").exists()
    review.locator("button", has_text="Apply all").click()
    page.wait_for_function("() => document.querySelectorAll('.gvisor-magic-review')[1]"
                           ".textContent.includes('Nothing held any more')", timeout=30_000)
    assert (lab.root / "notes.txt").read_text() == "one\ntwo\nthree\n"
    cells.nth(1).scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS / "review-widget-after-apply-and-discard.png"))
    page.close()


def _lab_env(tmp: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in GVISOR_ENV}
    env["TMPDIR"] = tmp
    return env


def test_lab_check_serves_the_notebooks_with_the_extension():
    """`scripts/lab.py --check`: the setup half of `make lab`, which CI can run."""
    tmp = tempfile.mkdtemp(prefix="gvm-lab-check-")
    try:
        run = subprocess.run([sys.executable, str(ROOT / "scripts" / "lab.py"), "--check"],
                             env=_lab_env(tmp), capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stdout + run.stderr
        assert "lab: ok: JupyterLab served notebooks/ with gvisor_magic at " \
               "http://127.0.0.1:" in run.stdout
        assert os.listdir(tmp) == [], "the check's kernel left files behind"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_make_lab_prints_a_token_url_on_localhost_and_stops_cleanly(stop):
    """What `make lab` runs: serve, print the URL, stop with everything on SIGTERM/Ctrl-C."""
    tmp = tempfile.mkdtemp(prefix="gvm-lab-serve-")
    process = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "lab.py")],
                               env=_lab_env(tmp), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        url = None
        for line in process.stdout:
            match = re.search(r"http://127\.0\.0\.1:(\d+)/lab\?token=(\w+)", line)
            if match:
                url, port, token = match.group(0), int(match.group(1)), match.group(2)
                break
        assert url, "no URL was printed"
        with urllib.request.urlopen(url, timeout=30) as response:
            assert response.status == 200 and b"jupyter-config-data" in response.read()
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/contents", timeout=30)
        assert refused.value.code == 403  # the token is required
        listening = {c.laddr.ip for c in psutil.net_connections("inet")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
        assert listening == {"127.0.0.1"}, listening  # the loopback address only
        process.send_signal(stop)
        process.communicate(timeout=60)
        assert process.returncode == 0
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0, "the server is still running"
        assert token and os.listdir(tmp) == []
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
        shutil.rmtree(tmp, ignore_errors=True)



def test_the_gvisor_kernel_from_the_launcher(browser, lab, runsc_works):
    """A user picks "Python 3 (gVisor)" in the launcher and runs a cell: it runs in gVisor."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(lab.url)
    card = page.locator(".jp-LauncherCard[title='Python 3 (gVisor)']").first
    card.wait_for(timeout=120_000)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "gvisor-kernel-launcher.png"))
    card.click()
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
    # The toolbar names the kernel, and it is up (in its sandbox) once it says Idle.
    page.wait_for_function(
        "() => [...document.querySelectorAll('.jp-KernelName')].some("
        "e => e.textContent.includes('Python 3 (gVisor)'))", timeout=180_000)
    _wait_kernel_ready(page, "Python 3 (gVisor)")
    editor = page.locator(".jp-Notebook .jp-Cell .cm-content").first
    editor.click()
    # It also writes a CSV (lands when the cell ends) and a module (held: the host's next
    # import would run it), and the cell says so.
    page.keyboard.type("import os, subprocess\nprint('python in', os.uname().release)\n"
                       "print('subprocess in', subprocess.run(['uname', '-r'], "
                       "capture_output=True, text=True).stdout.strip())\n"
                       "open('results.csv', 'w').write('a,b')\n"
                       "open('helpers.py', 'w').write('X = 1')")
    page.keyboard.press("Control+Enter")
    output = page.locator(".jp-Notebook .jp-Cell .jp-OutputArea-output").first
    output.wait_for(timeout=CELL_TIMEOUT_MS)
    page.wait_for_function(
        "() => document.querySelector('.jp-Notebook .jp-OutputArea') && document"
        ".querySelector('.jp-Notebook .jp-OutputArea').textContent.includes('gvisor-magic held')",
        timeout=CELL_TIMEOUT_MS)
    text = page.locator(".jp-Notebook .jp-OutputArea").first.text_content()
    assert "python in 4.4.0" in text and "subprocess in 4.4.0" in text, text
    assert "held back" in text and "helpers.py" in text, text
    assert (lab.root / "results.csv").read_text() == "a,b"
    assert not (lab.root / "helpers.py").exists(), "a module the cell wrote reached the host"
    page.screenshot(path=str(ARTIFACTS / "gvisor-kernel-cell.png"))
    page.close()
