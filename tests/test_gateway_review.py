"""The review page on the gateway (/review), against real processes: a model host serving tiny
real ONNX models, the consensus service (its SQLite review queue) and the gateway, started as
`mirador up` starts them. Cases reach the queue the way they do in production: a Decide whose
models disagree (a threshold of 1.0 escalates any decision that is not unanimous and certain).

A real headless Chromium (Debian's `chromium` + `chromium-driver`, scripts/install-system-deps.sh)
drives the page: list → open a case → resolve → `mirador review show` says it is resolved.
Plain HTTP checks the rest: escaping, cross-site posts, bad input, the bearer token, consensus down.
"""

from __future__ import annotations

import base64
import html
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlencode

import grpc
import httpx
import pytest
from conftest import write_config
from hypothesis import strategies as st
from mirador.v1 import common_pb2, consensus_pb2, consensus_pb2_grpc, model_host_pb2, model_host_pb2_grpc
from starlette.testclient import TestClient
from tiny_models import build_tiny_decoder, build_tiny_encoder

from services.cli.supervisor import Mesh
from services.common.config import load_config
from services.common.model_repository import ModelRepository

VOTERS = ["tiny-lm", "tiny-lm-b", "tiny-lm-c"]
# The tiny models score an option by its summed log-probability, so they prefer short options: two of
# nine bytes each (compliant, ask legal) split them often.
OPTIONS = ["compliant", "not compliant", "ask legal"]
FLEET = """
fleet:
  tiny-lm: {task: text-generation, tier: hot}
  tiny-lm-b: {task: text-generation, tier: hot}
  tiny-lm-c: {task: text-generation, tier: hot}
  tiny-embed: {task: embedding, tier: hot}
routes:
  compliance:
    primary: tiny-lm
    validators: [tiny-lm-b, tiny-lm-c]
    consensus_threshold: 0.8
    options: [compliant, not compliant, ask legal]
"""
XSS = '<script>alert("xss")</script><img src=x onerror=alert(1)>'
# Set to a folder to keep the browser's screenshots there (the README's is docs/review-page.png).
SCREENSHOT_DIR_ENV = "MIRADOR_REVIEW_SCREENSHOT_DIR"


@pytest.fixture(scope="module")
def queue(tmp_path_factory):
    directory = tmp_path_factory.mktemp("review")
    repository = ModelRepository(directory / "models")
    for seed, name in enumerate(VOTERS, start=11):
        build_tiny_decoder(repository, name, seed=seed)
    build_tiny_encoder(repository, "tiny-embed")
    config = load_config(write_config(directory, body=FLEET, service_extra={"consensus": "embedding_model: tiny-embed"}))
    mesh = Mesh(config, log_dir=directory / "logs", services=("model_host", "consensus", "gateway"),
                env={"XDG_CACHE_HOME": str(directory / "cache")})
    mesh.start(timeout_s=90)
    try:
        with grpc.insecure_channel(config.services.model_host.address) as channel:
            host = model_host_pb2_grpc.ModelHostStub(channel)
            _wait(lambda: all(m.ready for m in host.ListModels(model_host_pb2.ListModelsRequest(), timeout=5).models))
        yield mesh
    finally:
        mesh.stop()


def _wait(condition, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.1)


@pytest.fixture
def consensus(queue):
    with grpc.insecure_channel(queue.config.services.consensus.address) as channel:
        yield consensus_pb2_grpc.ConsensusStub(channel)


def escalate(consensus, question: str, options=OPTIONS, max_tokens: int = 0) -> str:
    """A real decision of the three tiny models that the queue keeps. The tiny models are nearly certain
    of their own answers, so only disagreement escalates (at a threshold of 1.0): the ticket number in
    the system message changes until they disagree, the question stays as given."""
    for ticket in range(40):
        request = consensus_pb2.DecideRequest(
            route="compliance", models=VOTERS, options=options, consensus_threshold=1.0,
            messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_SYSTEM,
                                             content=f"Answer for the compliance team. Ticket {1000 + ticket}."),
                      common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=question)],
            sampling=common_pb2.SamplingParams(max_tokens=max_tokens))
        verdict = list(consensus.Decide(request, timeout=60))[-1].verdict
        if verdict.escalated:
            assert verdict.escalation_id, verdict
            return verdict.escalation_id
    raise AssertionError(f"the tiny models agreed on {question!r} in 40 tickets")


def case_of(consensus, case_id: str) -> consensus_pb2.Escalation:
    return consensus.GetEscalation(consensus_pb2.GetEscalationRequest(id=case_id), timeout=10)


def base(mesh) -> str:
    return f"http://{mesh.config.services.gateway.address}"


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf_token" value="([0-9a-f]+)"', html).group(1)


def mirador_cli(config_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", "--config", str(config_path), *args],
                          capture_output=True, text=True, timeout=60, check=False)


# --------------------------------------------------------------------------- a real browser


def _chromium():
    webdriver = pytest.importorskip("selenium.webdriver")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver") or ("/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver") else None)
    if not browser or not driver:
        pytest.skip("Debian's chromium and chromium-driver are not installed (scripts/install-system-deps.sh)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1280,1000", "--disable-extensions", "--no-first-run"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))


def _follow(browser, element) -> None:
    """Clicks a link or submit button and waits until the browser has left the page (without it, the
    next lookup can still find the old page's elements)."""
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    page = browser.find_element("tag name", "html")
    element.click()
    WebDriverWait(browser, 20).until(expected_conditions.staleness_of(page))


def _screenshot(browser, name: str, tmp_path: Path) -> None:
    """The whole page, beyond the window (Chromium's DevTools call), kept in tmp_path and, when asked,
    in $MIRADOR_REVIEW_SCREENSHOT_DIR."""
    shot = browser.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
    png = base64.b64decode(shot["data"])
    assert png.startswith(b"\x89PNG")
    for folder in filter(None, (tmp_path, os.environ.get(SCREENSHOT_DIR_ENV))):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / name).write_bytes(png)


def test_a_reviewer_resolves_a_case_in_chromium(queue, consensus, tmp_path):
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By

    question = "A customer asks support to email them their account password. Is sending it by email compliant?"
    earlier = escalate(consensus, "Can we keep call recordings for ten years without asking the customer?")
    escalate(consensus, f"Is this compliant? {XSS}")
    case_id = escalate(consensus, question)
    consensus.ResolveEscalation(consensus_pb2.ResolveEscalationRequest(  # one case resolved already
        id=earlier, resolution="ask legal", reviewer="Bo Lindqvist", note="retention policy 7.1 asks legal"),
        timeout=10)

    browser = _chromium()
    try:
        browser.get(f"{base(queue)}/review")
        assert browser.find_element(By.TAG_NAME, "h1").text == "Pending escalations"
        rows = {row.find_element(By.CSS_SELECTOR, "td.id").text: row
                for row in browser.find_elements(By.CSS_SELECTOR, "table.cases tbody tr")}
        assert case_id in rows and earlier not in rows  # resolved cases are under Resolved
        assert question[:60] in rows[case_id].text and "tiny-lm (primary)" in rows[case_id].text
        # the question holding <script> is text on the page, and nothing ran
        assert XSS[:30] in browser.find_element(By.CSS_SELECTOR, "table.cases").text
        assert browser.find_elements(By.TAG_NAME, "script") == []
        with pytest.raises(NoAlertPresentException):
            _ = browser.switch_to.alert
        assert "decisions escalated" in browser.find_element(By.CSS_SELECTOR, ".stats svg").get_attribute("textContent")
        _screenshot(browser, "review-queue.png", tmp_path)

        _follow(browser, rows[case_id].find_element(By.LINK_TEXT, case_id))
        assert case_id in browser.find_element(By.TAG_NAME, "h1").text
        assert question in browser.find_element(By.CSS_SELECTOR, "section.card").text
        assert len(browser.find_elements(By.CSS_SELECTOR, "table.votes-table tbody tr")) == 3
        browser.find_element(By.CSS_SELECTOR, "input[name=decision][value='not compliant']").click()
        browser.find_element(By.ID, "note").send_keys("Passwords never travel by email (policy 4.2).")
        reviewer = browser.find_element(By.ID, "reviewer")
        reviewer.clear()
        reviewer.send_keys("Ana Reviewer")
        _screenshot(browser, "review-case.png", tmp_path)
        _follow(browser, browser.find_element(By.CSS_SELECTOR, "form.resolve button[type=submit]"))

        assert "Resolved." in browser.find_element(By.CSS_SELECTOR, ".notice.ok").text
        assert browser.current_url.endswith(f"/review/{case_id}?resolved=1")
        assert browser.find_element(By.CSS_SELECTOR, ".resolution").text == "not compliant"
        assert browser.find_element(By.CSS_SELECTOR, ".reviewer").text == "Ana Reviewer"
        browser.get(f"{base(queue)}/review?state=resolved")
        listed = browser.find_element(By.CSS_SELECTOR, "table.cases").text
        assert case_id in listed and earlier in listed
        browser.get(f"{base(queue)}/review?state=all")
        _screenshot(browser, "review-page.png", tmp_path)
    finally:
        browser.quit()

    shown = mirador_cli(queue.config.path, "review", "show", case_id)
    assert shown.returncode == 0, shown.stderr
    assert f"escalation {case_id} (resolved)" in shown.stdout
    assert "resolved    'not compliant' by Ana Reviewer" in shown.stdout
    assert "note        Passwords never travel by email (policy 4.2)." in shown.stdout


# --------------------------------------------------------------------------- plain HTTP


def test_every_user_supplied_text_is_escaped(queue, consensus):
    case_id = escalate(consensus, XSS, options=["compliant", "<b>no</b>", "ask & law"])
    with httpx.Client(base_url=base(queue), timeout=30) as web:
        for page in ("/review", f"/review/{case_id}"):
            reply = web.get(page)
            assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/html")
            assert "<script>alert" not in reply.text and "<img src=x" not in reply.text and "<b>no" not in reply.text
            assert "&lt;script&gt;alert(&#34;xss&#34;)&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;" in reply.text
            csp = reply.headers["content-security-policy"]
            assert "default-src 'none'" in csp and "script-src" not in csp and "form-action 'self'" in csp
        page = web.get(f"/review/{case_id}").text
        assert 'value="&lt;b&gt;no&lt;/b&gt;"' in page and 'value="ask &amp; law"' in page
        reply = web.post(f"/review/{case_id}", headers={"origin": base(queue)},
                         data={"csrf_token": csrf_of(page), "decision": "<b>no</b>",
                               "note": "</textarea><script>alert(2)</script>", "reviewer": "<i>eve</i>"})
        assert reply.status_code == 303, reply.text
        page = web.get(reply.headers["location"]).text
        assert "&lt;/textarea&gt;&lt;script&gt;alert(2)&lt;/script&gt;" in page and "&lt;i&gt;eve&lt;/i&gt;" in page
        assert "<script>" not in page and "<i>eve" not in page
    assert case_of(consensus, case_id).resolution == "<b>no</b>"


def test_cross_site_posts_are_refused(queue, consensus):
    case_id = escalate(consensus, "Is storing card numbers in the CRM notes field compliant?")
    url = f"/review/{case_id}"
    fields = {"decision": "not compliant", "note": "forged", "reviewer": "mallory"}
    with httpx.Client(base_url=base(queue), timeout=30) as web, \
            httpx.Client(base_url=base(queue), timeout=30) as other_browser:
        first = web.get(url)
        token, cookie = csrf_of(first.text), first.headers["set-cookie"]
        assert "mirador_review_csrf=" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
        other_token = csrf_of(other_browser.get(url).text)
        refusals = [
            ({}, {**fields, "csrf_token": token}, "neither an Origin nor a Referer"),
            ({"origin": "https://evil.example"}, {**fields, "csrf_token": token}, "comes from https://evil.example"),
            ({"origin": "null"}, {**fields, "csrf_token": token}, "comes from null"),
            ({"referer": "https://evil.example/page"}, {**fields, "csrf_token": token}, "comes from https://evil"),
            ({"origin": base(queue)}, fields, "security token does not match"),
            ({"origin": base(queue)}, {**fields, "csrf_token": "0" * 64}, "security token does not match"),
            # a token that is valid for another browser's cookie is not valid for this one
            ({"origin": base(queue)}, {**fields, "csrf_token": other_token}, "security token does not match"),
        ]
        for headers, data, words in refusals:
            reply = web.post(url, headers=headers, data=data)
            assert reply.status_code == 403 and words in reply.text, (headers, reply.text[-500:])
            assert "Traceback" not in reply.text
        # without its cookie the right token is no use either
        reply = httpx.post(f"{base(queue)}{url}", headers={"origin": base(queue)}, data={**fields, "csrf_token": token})
        assert reply.status_code == 403 and "security token does not match" in reply.text
        assert case_of(consensus, case_id).state == consensus_pb2.ESCALATION_STATE_PENDING
        # the page's own form, from the page's origin (a Referer does when a client sends no Origin)
        reply = web.post(url, headers={"referer": f"{base(queue)}{url}"}, data={**fields, "csrf_token": token})
        assert reply.status_code == 303
    assert case_of(consensus, case_id).reviewer == "mallory"


def test_bad_input_gets_a_status_and_a_sentence(queue, consensus):
    case_id = escalate(consensus, "May a contractor keep a copy of the customer database on a personal laptop?")
    url = f"/review/{case_id}"
    with httpx.Client(base_url=base(queue), timeout=30, headers={"origin": base(queue)}) as web:
        token = csrf_of(web.get(url).text)
        ok = {"csrf_token": token, "decision": "not compliant", "note": "", "reviewer": "ana"}
        cases = [
            ({**ok, "decision": ""}, 400, "Choose the decision"),
            ({**ok, "reviewer": "  "}, 400, "Give your name as the reviewer"),
            ({**ok, "decision": "maybe"}, 400, "is not one of the case&#39;s options"),
            ({**ok, "extra": "1"}, 400, "a field `extra` that the review page does not send"),
            ({**ok, "note": "x" * 9000}, 413, "`note` is 9000 characters"),
        ]
        for data, status, words in cases:
            reply = web.post(url, data=data)
            assert reply.status_code == status and words in reply.text, (data.keys(), reply.text[-600:])
        reply = web.post(url, data={**ok, "reviewer": ""})  # the form keeps what was typed
        assert 'value="not compliant" required checked' in reply.text
        reply = web.post(url, content=b"csrf_token=a&csrf_token=b", headers={"content-type":
                                                                             "application/x-www-form-urlencoded"})
        assert reply.status_code == 400 and "sends `csrf_token` twice" in reply.text
        reply = web.post(url, content=b"decision=%ff", headers={"content-type": "application/x-www-form-urlencoded"})
        assert reply.status_code == 400 and "not UTF-8" in reply.text
        reply = web.post(url, json=ok)
        assert reply.status_code == 415 and "application/x-www-form-urlencoded" in reply.text
        reply = web.post(url, content=b"note=" + b"x" * 70000,
                         headers={"content-type": "application/x-www-form-urlencoded"})
        assert reply.status_code == 413
        assert case_of(consensus, case_id).state == consensus_pb2.ESCALATION_STATE_PENDING

        assert web.post(url, data=ok).status_code == 303
        again = web.post(url, data={**ok, "decision": "compliant", "reviewer": "bob"})
        assert again.status_code == 409 and "resolved already by ana" in again.text
        assert "Resolve this case" not in again.text  # the page shows the resolution, not a form

        for path, status, words in [
            ("/review/esc-00000000000-deadbeef", 404, "No escalation `esc-00000000000-deadbeef`"),
            ("/review/not%20an%20id", 404, "is not an escalation id"),
            ("/review?state=closed", 400, "use pending, resolved or all"),
            ("/review?limit=0", 400, "a whole number from 1 to 1000"),
            ("/review?limit=lots", 400, "a whole number from 1 to 1000"),
            ("/review/a/b", 404, "the review queue is at /review"),
        ]:
            reply = web.get(path)
            assert reply.status_code == status and words in reply.text, (path, reply.text[-500:])
            assert reply.headers["content-type"].startswith("text/html") and "Traceback" not in reply.text
        assert web.put("/review").status_code == 405


def test_the_queue_shows_votes_consistency_and_statistics(queue, consensus):
    case_id = escalate(consensus, "Is a verbal consent enough to record a sales call?")
    case = case_of(consensus, case_id)
    stats = consensus.GetStats(consensus_pb2.GetStatsRequest(), timeout=10)
    with httpx.Client(base_url=base(queue), timeout=30) as web:
        listing = web.get("/review?state=all&limit=1").text
        assert case_id in listing and "show more" in listing and listing.count('<td class="id">') == 1
        assert f"{case.verdict.consistency:.3f}" in listing
        for vote in case.votes:
            assert f"{vote.answer} <span class=\"muted\">{vote.confidence.calibrated_confidence:.2f}</span>" in listing
        assert f"<dt>Decisions</dt><dd>{stats.decisions}</dd>" in listing
        assert f"{100 * stats.overturn_rate:.1f} %" in listing  # the chart's overturn bar
        assert all(f"{m.model} agrees" in listing for m in stats.models) and "<svg" in listing
        page = web.get(f"/review/{case_id}").text
        for vote in case.votes:
            assert vote.model in page and f"{vote.confidence.calibrated_confidence:.3f}" in page
        assert '<span class="role">system</span>Answer for the compliance team.' in page  # the full context, by role


def test_a_free_text_case_is_resolved_with_the_reviewers_own_answer(queue, consensus):
    case_id = escalate(consensus, "Summarise the retention rule for call recordings.", options=[], max_tokens=6)
    case = case_of(consensus, case_id)
    with httpx.Client(base_url=base(queue), timeout=30, headers={"origin": base(queue)}) as web:
        page = web.get(f"/review/{case_id}").text
        assert 'type="radio"' not in page  # no options: the answer is written, starting from the medoid's
        assert re.search(r'<textarea id="decision" name="decision" required>(.*?)</textarea>', page, re.DOTALL).group(1) \
            == html.escape(case.verdict.answer, quote=False).replace('"', "&#34;").replace("'", "&#39;")
        reply = web.post(f"/review/{case_id}", data={"csrf_token": csrf_of(page), "decision": "Keep them two years.",
                                                     "note": "", "reviewer": "Zoë 李"})
        assert reply.status_code == 303
        # the name is remembered for the next case (in a cookie, percent-encoded: cookies are ASCII)
        assert 'name="reviewer" value="Zoë 李"' in web.get(f"/review/{escalate(consensus, 'Next one?')}").text
    done = case_of(consensus, case_id)
    assert done.resolution == "Keep them two years." and done.reviewer == "Zoë 李"


FORM_VALUES = st.one_of(st.text(max_size=40), st.sampled_from(OPTIONS),
                        st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=300), st.just("x" * 9000))


def test_fuzzed_posts_and_queries_get_a_page_never_a_500(queue, consensus):
    """Generated forms (the page's fields and others, any text, wrong encodings, foreign origins) and
    queries against the gateway's ASGI app in this process, the real consensus service behind it:
    every answer is an HTML page with a status a person can act on."""
    from hypothesis import HealthCheck, given, settings

    from services.gateway.app import build_app

    case_id = escalate(consensus, "Is a shared team password for the billing system compliant?")
    with TestClient(build_app(queue.config), base_url="http://testserver") as web:
        token = csrf_of(web.get(f"/review/{case_id}").text)

        @settings(max_examples=300, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(fields=st.fixed_dictionaries(
                   {"decision": st.one_of(st.sampled_from(OPTIONS), st.sampled_from(OPTIONS), FORM_VALUES),
                    "reviewer": st.one_of(st.sampled_from(["ana", "Zoë 李"]), FORM_VALUES)},
                   optional={"note": FORM_VALUES, "csrf_token": FORM_VALUES}),
               extra=st.sampled_from([None] * 6 + ["next", "extra"]),
               with_token=st.sampled_from([True] * 3 + [False]),
               origin=st.sampled_from(["http://testserver"] * 3 + [None, "https://evil.example"]),
               content_type=st.sampled_from(["application/x-www-form-urlencoded"] * 3
                                            + ["multipart/form-data", "text/plain"]),
               target=st.sampled_from([case_id] * 4 + ["esc-00000000000-deadbeef", "login", "logout"]))
        def post(fields, extra, with_token, origin, content_type, target):
            if with_token:
                fields = {**fields, "csrf_token": token}
            if extra:
                fields = {**fields, extra: "/review"}
            headers = {"content-type": content_type, **({"origin": origin} if origin else {})}
            reply = web.post(f"/review/{target}", content=urlencode(fields).encode(), headers=headers,
                             follow_redirects=False)
            assert reply.status_code in {303, 400, 403, 404, 409, 413, 415}, (fields, reply.text[-400:])
            if reply.status_code != 303:
                assert reply.headers["content-type"].startswith("text/html") and "Traceback" not in reply.text

        @settings(max_examples=150, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(state=st.one_of(st.sampled_from(["pending", "resolved", "all"]), st.text(max_size=12)),
               limit=st.one_of(st.integers(-5, 2000).map(str), st.text(max_size=8)))
        def query(state, limit):
            reply = web.get("/review", params={"state": state, "limit": limit})
            assert reply.status_code in {200, 400}, (state, limit, reply.text[-400:])
            assert reply.headers["content-type"].startswith("text/html") and "Traceback" not in reply.text

        post()
        query()
    resolved = case_of(consensus, case_id)  # some generated form was a valid one (the rest then got 409)
    assert resolved.state == consensus_pb2.ESCALATION_STATE_RESOLVED and resolved.resolution in OPTIONS


def test_consensus_down_is_a_readable_page(tmp_path):
    config = load_config(write_config(tmp_path))  # nothing listens on the consensus port
    with Mesh(config, log_dir=tmp_path / "logs", services=("gateway",)) as gateway_only:
        reply = httpx.get(f"{base(gateway_only)}/review", timeout=30)
        assert reply.status_code == 503 and reply.headers["content-type"].startswith("text/html")
        assert "The review queue is not reachable" in reply.text and "mirador up" in reply.text
        assert "Traceback" not in reply.text


TOKEN_ENV = "MIRADOR_TEST_REVIEW_TOKEN"
TOKEN = "review-test-token-0123456789"
GUARDED = """
fleet:
  tiny-lm: {task: text-generation, tier: hot}
routes:
  chat: {primary: tiny-lm}
security:
  auth:
    bearer_token_env: MIRADOR_TEST_REVIEW_TOKEN
"""


def test_the_page_asks_for_the_bearer_token_when_one_is_configured(tmp_path, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    config = load_config(write_config(tmp_path, body=GUARDED))
    with Mesh(config, log_dir=tmp_path / "logs", services=("consensus", "gateway")) as guarded:
        site = base(guarded)
        with httpx.Client(base_url=site, timeout=30, headers={"origin": site}) as web:
            wall = web.get("/review/esc-00000000000-deadbeef")
            assert wall.status_code == 401 and 'name="token"' in wall.text and "security.auth" in wall.text
            assert 'name="next" value="/review/esc-00000000000-deadbeef"' in wall.text
            assert web.get("/review").status_code == 401
            # a post without the session is not processed (401, not the case's 404)
            blocked = web.post("/review/esc-00000000000-deadbeef", data={"decision": "x", "reviewer": "y"})
            assert blocked.status_code == 401 and "Sign in first" in blocked.text

            wrong = web.post("/review/login", data={"csrf_token": csrf_of(wall.text), "token": "guess", "next": "/review"})
            assert wrong.status_code == 401 and "not the configured token" in wrong.text
            cross = web.post("/review/login", headers={"origin": "https://evil.example"},
                             data={"csrf_token": csrf_of(wall.text), "token": TOKEN, "next": "/review"})
            assert cross.status_code == 403
            signed = web.post("/review/login", data={"csrf_token": csrf_of(wrong.text), "token": TOKEN,
                                                     "next": "https://evil.example/"})
            assert signed.status_code == 303 and signed.headers["location"] == "/review"  # never another site
            cookie = signed.headers["set-cookie"]
            assert "mirador_review_session=" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
            assert TOKEN not in cookie  # an HMAC of the token, not the token
            page = web.get("/review")
            assert page.status_code == 200 and "No pending escalations" in page.text and "Sign out" in page.text
            # the review session opens the review page, not the router's API
            assert web.get("/v1/models").status_code == 401

            out = web.post("/review/logout", data={"csrf_token": csrf_of(page.text)})
            assert out.status_code == 303
            assert web.get("/review").status_code == 401
        # scripts may send the token itself
        assert httpx.get(f"{site}/review", headers={"authorization": f"Bearer {TOKEN}"}, timeout=30).status_code == 200
        assert httpx.get(f"{site}/review", headers={"authorization": "Bearer nope"}, timeout=30).status_code == 401


def test_a_browser_signs_in_with_the_token_and_out_again(tmp_path, monkeypatch):
    from selenium.webdriver.common.by import By

    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    config = load_config(write_config(tmp_path, body=GUARDED))
    with Mesh(config, log_dir=tmp_path / "logs", services=("consensus", "gateway")) as guarded:
        browser = _chromium()
        try:
            browser.get(f"{base(guarded)}/review?state=all")
            assert browser.find_element(By.TAG_NAME, "h1").text == "Sign in to the review queue"
            browser.find_element(By.ID, "token").send_keys("not-it")
            _follow(browser, browser.find_element(By.CSS_SELECTOR, "form button[type=submit]"))
            assert "not the configured token" in browser.find_element(By.CSS_SELECTOR, ".notice.bad").text
            browser.find_element(By.ID, "token").send_keys(TOKEN)
            _follow(browser, browser.find_element(By.CSS_SELECTOR, "form button[type=submit]"))
            assert browser.current_url.endswith("/review?state=all")  # back where the reviewer was going
            assert browser.find_element(By.TAG_NAME, "h1").text == "All escalations"
            session = browser.get_cookie("mirador_review_session")
            assert session["httpOnly"] and session["sameSite"] == "Strict" and session["value"] != TOKEN
            _follow(browser, browser.find_element(By.CSS_SELECTOR, "header form button"))  # sign out
            assert browser.find_element(By.TAG_NAME, "h1").text == "Sign in to the review queue"
        finally:
            browser.quit()
