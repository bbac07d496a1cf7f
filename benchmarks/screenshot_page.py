"""The README's picture of the chat page: a real build served by ``toolkit serve``, one question asked
in headless Chromium (Debian's ``chromium``, driven by playwright), the models panel open.

    .venv/bin/python -m benchmarks.screenshot_page --repository model_repository --out docs/img/chat-page.png
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

KEY, ADMIN_KEY = "screenshot-key-0123456789", "screenshot-admin-0123456789"
FLAGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--out", type=Path, default=Path("docs/img/chat-page.png"))
    parser.add_argument("--question", default="How long is the warranty on the AirWave Pro headphones?")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    log_dir = Path(tempfile.mkdtemp(prefix="screenshot-serve-"))
    env = {**os.environ, "GATEWAY_API_KEYS": KEY, "GATEWAY_ADMIN_API_KEYS": ADMIN_KEY}
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "toolkit"), "serve", "-r", str(args.repository), "--log-dir", str(log_dir),
         "--port", "auto", "--http-port", "auto", "--grpc-port", "auto", "--metrics-port", "auto"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        state_file, deadline = log_dir / "state.json", time.monotonic() + 180
        while not (state_file.is_file() and json.loads(state_file.read_text())["status"] == "ready"):
            if server.poll() is not None or time.monotonic() > deadline:
                print(f"toolkit serve did not get ready; see {log_dir}", file=sys.stderr)
                return 1
            time.sleep(0.5)
        url = f"http://127.0.0.1:{json.loads(state_file.read_text())['gateway_port']}/"
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium",
                                                 args=FLAGS)
            page = browser.new_page(viewport={"width": 1280, "height": 820})
            page.goto(url)
            page.fill("#api-key", KEY)
            page.dispatch_event("#api-key", "change")
            page.wait_for_selector(".model-card")
            page.fill("#temperature", "0")
            page.fill("#max-tokens", "96")
            page.fill("#prompt", args.question)
            page.press("#prompt", "Enter")
            page.locator("li.assistant[data-done=true]").wait_for(timeout=120_000)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out))
            browser.close()
        print(f"wrote {args.out}")
        return 0
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(60)
        shutil.rmtree(log_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
