"""A PNG of a run's dashboard as headless Chromium shows it (docs/dashboard.png is made this way):

    python scripts/dashboard_screenshot.py RUN_DIR docs/dashboard.png
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from selenium import webdriver
from selenium.webdriver.chrome.service import Service

from explorer.run.daemon import StatusServer


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--width", type=int, default=1150)
    args = ap.parse_args()
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={args.width},1000"):
        options.add_argument(flag)
    server = StatusServer(args.run_dir)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        driver.get(server.root + "/")
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(args.width, height + 100)  # the whole page in one picture
        driver.save_screenshot(str(args.out))
    finally:
        driver.quit()
        server.stop()
    print(f"{args.out}: the dashboard of {args.run_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
