"""The dashboard (explorer/run/dashboard.py) in a real browser: a short daemon serves it, headless
Chromium (Debian's chromium + chromium-driver, installed by scripts/setup.sh) loads it, the
thumbnails render, the page follows the run to its next iteration, and query texts that carry
HTML and script are shown as text and run nothing."""

import json
import shutil
import threading

import pytest

from explorer.run.config import save_config
from explorer.run.daemon import status_summary
from explorer.run.dashboard import respond
from tests.explorer.run.processes import daemon_env, start_daemon, stop, wait_until

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
# Hostile queries: either would set window.pwned and the page's title if it ever ran.
SCRIPT = "dress <script>window.pwned = 1; document.title = 'pwned'</script>"
IMG = "shoe <img src=x onerror=\"window.pwned = 2; document.title = 'pwned'\">"


@pytest.fixture
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("needs Debian's chromium and chromium-driver (scripts/setup.sh installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,1600"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture
def hostile_daemon(tiny_experiment, tmp_path):
    """A daemon whose random policy issues the two hostile queries every iteration, run until
    stopped; yields (run folder, dashboard root URL)."""
    vocabulary = tmp_path / "vocabulary.json"
    vocabulary.write_text(json.dumps({"source": "test", "params": {}, "concepts": ["bag", "shirt", SCRIPT, IMG]}))
    cfg = tiny_experiment(policy={"name": "random", "queries_per_iteration": 4},
                          vocabulary={"path": str(vocabulary)})
    save_config(cfg, tmp_path / "config.yaml")
    run_dir = tmp_path / "run"
    proc = start_daemon([str(tmp_path / "config.yaml"), "--out", str(run_dir), "--status-port", "0", "--forever"],
                        {**daemon_env(1), "PYTHONUNBUFFERED": "1"})
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    try:
        wait_until(proc, lambda: any("dashboard at " in line for line in lines), timeout=120)
        root = next(line for line in lines if "dashboard at " in line).split("dashboard at ")[1].split()[0]
        yield run_dir, root.rstrip("/")
    finally:
        stop(proc)


def _iteration(driver) -> int:
    return int(driver.find_element("id", "iteration").text.split()[0])


def test_the_dashboard_renders_follows_the_run_and_never_runs_what_the_web_wrote(hostile_daemon, browser):
    from selenium.webdriver.support.ui import WebDriverWait

    run_dir, root = hostile_daemon
    WebDriverWait(browser, 180, poll_frequency=0.5).until(
        lambda d: (run_dir / "accepted.jsonl").exists() and (run_dir / "accepted.jsonl").stat().st_size > 0)
    browser.get(root + "/?refresh=3600")  # still while its images and text are checked
    WebDriverWait(browser, 30).until(lambda d: d.find_elements("css selector", "img.thumb"), "no thumbnails on the page")
    thumbs = browser.find_elements("css selector", "img.thumb")
    WebDriverWait(browser, 30).until(lambda d: all(d.execute_script("return arguments[0].complete", t) for t in thumbs))
    assert all(browser.execute_script("return arguments[0].naturalWidth", t) > 0 for t in thumbs)

    # the hostile queries are on the page as the text they are, and nothing of them ran
    text = browser.find_element("tag name", "body").text
    assert SCRIPT in text and IMG in text
    assert browser.execute_script("return window.pwned") is None
    assert "pwned" not in browser.title
    assert not browser.find_elements("css selector", "img[src='x']")

    # the page reloads itself and shows the run's next iteration
    browser.get(root + "/?refresh=1")
    seen = _iteration(browser)
    WebDriverWait(browser, 180, poll_frequency=0.5).until(
        lambda d: _iteration(d) > seen, f"the page still shows iteration {seen} after 180 s: it did not reload")
    assert browser.execute_script("return window.pwned") is None


def test_the_server_is_read_only_and_answers_bad_requests_precisely(tiny_experiment, tmp_path):
    import httpx

    from explorer.run.daemon import StatusServer

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_config(tiny_experiment(), run_dir / "config.yaml")
    (run_dir / "metrics.jsonl").write_text(json.dumps({"iteration": 0}) + "\n")
    server = StatusServer(run_dir)
    try:
        page = httpx.get(server.root + "/")
        assert page.status_code == 200 and "script-src" not in page.headers["content-security-policy"]
        assert "default-src 'none'" in page.headers["content-security-policy"]
        assert httpx.post(server.root + "/").status_code == 501
        assert httpx.get(server.root + "/?refresh=0").json()["error"].startswith("refresh must be")
        assert httpx.get(server.root + "/item/../../config.yaml.png").status_code == 404
        assert httpx.get(server.root + "/sheets/../config.yaml").status_code == 404
    finally:
        server.stop()
    assert server.root.startswith("http://127.0.0.1:")


@pytest.mark.parametrize("modality", ["image", "text"])
def test_every_web_string_is_escaped_on_the_page(tiny_experiment, tmp_path, modality):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_config(tiny_experiment(modality=modality), run_dir / "config.yaml")
    rows = [{"iteration": 0}, {"iteration": 1, "seconds": 1.0, "fetched": 1, "accepted": 1, "queries": [SCRIPT],
                               "query_rewards": [0.5], "rejected": {}, "planner_action": "acquire",
                               "planner": {"reason": "more data <b>pays</b>"}, "eval_perplexity": 9.0}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    record = {"iteration": 1, "url": "http://x/'><script>alert(1)</script>", "sha256": "a" * 64,
              "queries": [IMG], "reward": 0.5, "title": IMG}
    (run_dir / "accepted.jsonl").write_text(json.dumps(record) + "\n")
    page = respond(run_dir, "/", status_summary)[2].decode()
    assert "<script" not in page and "<img src=x" not in page and "<b>pays" not in page
    assert "&lt;script&gt;window.pwned" in page and "&lt;img src=x onerror=" in page
    if modality == "text":  # the planner's decision, the newest documents' titles and the perplexity curve
        assert "<b>acquire</b> more data &lt;b&gt;pays&lt;/b&gt;" in page and "<polyline" in page
        assert page.count("&lt;img src=x onerror=") == 1
