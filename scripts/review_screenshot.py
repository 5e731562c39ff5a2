"""Screenshots of the review page on the real fleet, for the README (docs/review-page.png and
docs/review-case.png): the default config on free ports (the fleet built by `mirador fleet build`),
compliance questions asked through the gateway's OpenAI API (the default compliance route escalates
every decision: see its threshold in config/mirador.yaml), one case resolved on the page in headless
Chromium (Debian's chromium + chromium-driver, Selenium), then the queue and a pending case captured.

    python scripts/review_screenshot.py [--out docs]
"""

from __future__ import annotations

import argparse
import base64
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import httpx  # noqa: E402
from selenium import webdriver  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from soak import soak_config  # noqa: E402
from services.cli.supervisor import Mesh  # noqa: E402
from services.common.config import load_config  # noqa: E402

QUESTIONS = [
    ("Rule: call recordings are kept for at most two years. We keep every recording for ten years to train new "
     "agents. Is this compliant?"),
    "Can we offer a $50 gift card to members who enroll before the deadline under CMS marketing rules?",
    ("Rule: customer passwords are never sent by email. A support agent emailed a customer a temporary password "
     "that expires in one hour. Is this compliant?"),
    ("Rule: every marketing email carries an unsubscribe link. This month's newsletter has one in its footer. "
     "Is this compliant?"),
]


def browser() -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,1000"):
        options.add_argument(flag)
    driver = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))


def capture(driver: webdriver.Chrome, path: Path) -> None:
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
    path.write_bytes(base64.b64decode(shot["data"]))
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mirador-review-") as tmp:
        config = load_config(soak_config(Path(tmp), tiny=False))
        mesh = Mesh(config, log_dir=Path(tmp) / "logs", services=("model_host", "consensus", "router", "gateway"))
        print("starting the mesh (default fleet) ...", flush=True)
        mesh.start(timeout_s=240)
        try:
            site = f"http://{config.services.gateway.address}"
            # The validators are warm-tier models: the first decision loads them, and on a busy 2-core
            # machine they may miss its deadline (failed votes). Let them load before the real questions.
            httpx.post(f"{site}/v1/chat/completions", timeout=180, json={
                "model": "compliance", "messages": [{"role": "user", "content": "Is this request compliant?"}]})
            cases = []
            for question in QUESTIONS:
                reply = httpx.post(f"{site}/v1/chat/completions", timeout=180, json={
                    "model": "compliance", "messages": [{"role": "user", "content": question}]})
                if reply.status_code != 200:
                    raise SystemExit(f"the gateway answered {reply.status_code}: {reply.text[:500]}")
                consensus = reply.json()["mirador"]["consensus"]
                print(f"{consensus['answer']!r} consistency {consensus['consistency']:.3f}"
                      f" escalated={consensus['escalated']} {consensus['escalation_id'] or ''}", flush=True)
                if consensus["escalated"]:
                    cases.append(consensus["escalation_id"])
            if len(cases) < 2:
                raise SystemExit(f"only {len(cases)} decisions escalated; the screenshots want two or more")
            driver = browser()
            try:
                driver.get(f"{site}/review/{cases[0]}")
                driver.find_element(By.CSS_SELECTOR, "input[name=decision][value='non-compliant']").click()
                driver.find_element(By.ID, "note").send_keys("Retention policy 7.1: two years at most; "
                                                             "training copies need consent.")
                driver.find_element(By.ID, "reviewer").send_keys("Ana Reviewer")
                page = driver.find_element(By.TAG_NAME, "html")
                driver.find_element(By.CSS_SELECTOR, "form.resolve button[type=submit]").click()
                WebDriverWait(driver, 20).until(expected_conditions.staleness_of(page))
                assert driver.find_elements(By.CSS_SELECTOR, ".notice.ok"), "the case was not resolved"
                driver.get(f"{site}/review/{cases[2] if len(cases) > 2 else cases[1]}")
                driver.find_element(By.CSS_SELECTOR, "input[name=decision][value='non-compliant']").click()
                driver.find_element(By.ID, "note").send_keys("Passwords never travel by email (policy 4.2).")
                capture(driver, args.out / "review-case.png")
                driver.get(f"{site}/review?state=all")
                capture(driver, args.out / "review-page.png")
            finally:
                driver.quit()
        finally:
            mesh.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
