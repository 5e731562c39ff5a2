"""The human review page on the gateway: the consensus service's review queue for the people the
design escalates to (compliance staff, not operators), as server-rendered HTML (Jinja2 templates
in services/gateway/templates; no script, no build step).

    GET  /review              the queue, newest first (?state=pending|resolved|all, ?limit=1..1000),
                              with the queue's statistics and a chart (inline SVG)
    GET  /review/{id}         one case: the question, every vote, the verdict, and the form
    POST /review/{id}         resolves it: decision, note, reviewer (and csrf_token)
    GET  /review/login        asks for the router's bearer token, when security.auth names one
    POST /review/login        checks it and sets an HttpOnly session cookie
    POST /review/logout       forgets it

Every case comes from the consensus service's review RPCs (ListEscalations, GetEscalation,
ResolveEscalation, GetStats), as `mirador review` reads them; the gateway keeps no state.

How the page protects itself:
- Jinja2 escapes every value, and a Content-Security-Policy allows no script at all, so a question
  holding `<script>` is text twice over.
- Cross-site posts: every POST needs an Origin of this very host (a Referer when a client sends no
  Origin) and a CSRF token that is an HMAC of a random HttpOnly cookie (signed double submit): a page
  elsewhere can neither read the cookie nor compute the token. Cookies are SameSite=Strict.
- With a bearer token configured the page asks for it once; the session cookie then holds an HMAC
  of the token, not the token, so it opens the review page and not the router's API. Scripts may
  send `Authorization: Bearer <token>` instead.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac
import logging
import re
import secrets
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import grpc
import jinja2
from mirador.v1 import common_pb2, consensus_pb2
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from services.common.logs import log_event
from services.gateway.errors import from_rpc_error

log = logging.getLogger("mirador.gateway")

CONSENSUS_TIMEOUT_S = 10.0
SESSION_COOKIE = "mirador_review_session"
CSRF_COOKIE = "mirador_review_csrf"
REVIEWER_COOKIE = "mirador_reviewer"  # the last name used on this browser, to fill the form in
COOKIE_PATH = "/review"
STATES = {
    "pending": consensus_pb2.ESCALATION_STATE_PENDING,
    "resolved": consensus_pb2.ESCALATION_STATE_RESOLVED,
    "all": consensus_pb2.ESCALATION_STATE_UNSPECIFIED,
}
DEFAULT_LIMIT = 50
MAX_LIMIT = 1000  # the consensus service's own ceiling for ListEscalations
MAX_FORM_BYTES = 64 * 1024
FIELD_LIMITS = {"decision": 4000, "note": 8000, "reviewer": 200, "token": 4096, "next": 300, "csrf_token": 100}
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_CSRF_SEED = re.compile(r"[A-Za-z0-9_-]{43}")
_SAFE_NEXT = re.compile(r"/review(/[A-Za-z0-9._:-]+)?(\?[A-Za-z0-9=&_.-]{0,100})?")
ROLES = {common_pb2.ROLE_SYSTEM: "system", common_pb2.ROLE_USER: "user", common_pb2.ROLE_ASSISTANT: "assistant"}


class ReviewError(Exception):
    """A page that says what went wrong and what to do (an HTTP status and a sentence), never a trace."""

    def __init__(self, status: int, title: str, message: str):
        super().__init__(message)
        self.status, self.title, self.message = status, title, message


# --------------------------------------------------------------------------- rendering


def _when(stamp) -> str:
    if stamp is None or (not stamp.seconds and not stamp.nanos):
        return "-"
    return dt.datetime.fromtimestamp(stamp.seconds, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _iso(stamp) -> str:
    return dt.datetime.fromtimestamp(stamp.seconds, dt.UTC).isoformat() if stamp.seconds else ""


def question_of(escalation: consensus_pb2.Escalation) -> str:
    """The last user message (what the reviewer is asked about), else the last message."""
    users = [m.content for m in escalation.messages if m.role == common_pb2.ROLE_USER]
    return users[-1] if users else (escalation.messages[-1].content if escalation.messages else "")


def state_of(escalation: consensus_pb2.Escalation) -> str:
    return consensus_pb2.EscalationState.Name(escalation.state).removeprefix("ESCALATION_STATE_").lower()


_templates = jinja2.Environment(
    loader=jinja2.PackageLoader("services.gateway", "templates"),
    autoescape=True,  # every value, whatever the template's name
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_templates.filters.update(when=_when, iso=_iso, pct=lambda x: f"{100 * x:.1f} %", role=lambda r: ROLES.get(r, "?"))
_templates.globals.update(question_of=question_of, state_of=state_of)


def _security_headers(nonce: str) -> dict[str, str]:
    return {
        # no script may run on these pages; the one <style> element carries the nonce
        "Content-Security-Policy": f"default-src 'none'; style-src 'nonce-{nonce}'; img-src data:; "
                                   "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "same-origin",
        "Cache-Control": "no-store",
    }


def render(template: str, status: int = 200, **context) -> HTMLResponse:
    nonce = secrets.token_urlsafe(16)
    context.setdefault("logout_csrf", None)
    html = _templates.get_template(template).render(nonce=nonce, **context)
    return HTMLResponse(html, status_code=status, headers=_security_headers(nonce))


def _set_cookie(response: Response, request: Request, name: str, value: str, max_age: int | None = None) -> None:
    response.set_cookie(name, value, max_age=max_age, path=COOKIE_PATH, httponly=True, samesite="strict",
                        secure=request.url.scheme == "https")


def error_page(request: Request, exc: ReviewError) -> HTMLResponse:
    return render("error.html", status=exc.status, title=exc.title, message=exc.message)


# --------------------------------------------------------------------------- the statistics chart


@dataclass(frozen=True)
class Bar:
    label: str
    rate: float  # in [0, 1]
    detail: str  # the counts behind the rate
    kind: str  # "queue" or "model": the chart colours them apart


def _rate(part: float, whole: float) -> float:
    return min(1.0, max(0.0, part / whole)) if whole else 0.0


def chart_bars(stats: consensus_pb2.ConsensusStats) -> list[Bar]:
    """The rates a reviewer reads the queue by: how often decisions escalate, how often validators
    overturn the primary and reviewers the verdict, and how often each model agrees with the verdict."""
    bars = [
        Bar("decisions escalated", _rate(stats.escalations, stats.decisions),
            f"{stats.escalations} of {stats.decisions}", "queue"),
        Bar("primary overturned", stats.overturn_rate, f"{stats.primary_overturned} of {stats.primary_answered}",
            "queue"),
        Bar("verdict overridden by a reviewer", _rate(stats.reviewer_overrides, stats.resolved),
            f"{stats.reviewer_overrides} of {stats.resolved} resolved", "queue"),
    ]
    bars += [Bar(f"{m.model} agrees", min(1.0, max(0.0, m.agreement_rate)), f"{m.agreement:.1f} of {m.answered}",
                 "model") for m in stats.models]
    return bars


# --------------------------------------------------------------------------- sign-in and cross-site posts


def _session_value(token: str) -> str:
    return hmac.new(token.encode(), b"mirador-review-session", hashlib.sha256).hexdigest()


class ReviewGuard:
    """Who may see the page (the bearer token, when configured) and which posts are the page's own."""

    def __init__(self) -> None:
        self._process_key = secrets.token_bytes(32)

    def _csrf_key(self, token: str | None) -> bytes:
        # Gateways configured with the same token agree on it (replicas behind one balancer); without
        # a token each process has its own, and a form outliving a restart asks to be reloaded.
        if token:
            return hmac.new(token.encode(), b"mirador-review-csrf", hashlib.sha256).digest()
        return self._process_key

    @staticmethod
    def signed_in(request: Request, token: str | None) -> bool:
        if not token:
            return True
        cookie = request.cookies.get(SESSION_COOKIE, "")
        if cookie and hmac.compare_digest(cookie.encode("utf-8", "replace"), _session_value(token).encode()):
            return True
        values = request.headers.getlist("authorization")
        if len(values) != 1:
            return False
        scheme, _, credential = values[0].strip().partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(credential.strip().encode("utf-8", "replace"),
                                                                  token.encode())

    def csrf(self, request: Request, token: str | None) -> tuple[str, str | None]:
        """The token for this browser's forms, and the cookie seed to set when it has none yet."""
        seed = request.cookies.get(CSRF_COOKIE, "")
        fresh = None
        if not _CSRF_SEED.fullmatch(seed):
            seed = fresh = secrets.token_urlsafe(32)
        return self._sign(seed, token), fresh

    def _sign(self, seed: str, token: str | None) -> str:
        return hmac.new(self._csrf_key(token), seed.encode(), hashlib.sha256).hexdigest()

    def check_post(self, request: Request, form: dict[str, str], token: str | None) -> None:
        """Refuses (403) a post that another site could have made a reviewer's browser send."""
        expected = f"{request.url.scheme}://{request.headers.get('host', '')}".lower()
        origin = request.headers.get("origin")
        if origin is None and (referer := request.headers.get("referer")):
            parts = urlsplit(referer)
            origin = f"{parts.scheme}://{parts.netloc}"
        if origin is None:
            raise ReviewError(403, "Refused: no origin",
                              "This post carries neither an Origin nor a Referer header, so the gateway cannot tell "
                              "that it came from the review page. Submit the form from the page in a browser.")
        if origin.lower() != expected:
            raise ReviewError(403, "Refused: cross-site post",
                              f"This post comes from {origin[:200]}, not from the review page at {expected[:200]}. "
                              "Resolve cases from the review page itself.")
        seed = request.cookies.get(CSRF_COOKIE, "")
        sent = form.get("csrf_token", "")
        if not _CSRF_SEED.fullmatch(seed) or not sent or not hmac.compare_digest(
                sent.encode("utf-8", "replace"), self._sign(seed, token).encode()):
            raise ReviewError(403, "Refused: the form has expired",
                              "This form's security token does not match this browser's (the form is older than the "
                              "gateway's last restart or a token change, or it was not served by this page). Reload "
                              "the page and submit it again.")


# --------------------------------------------------------------------------- reading a form


async def read_form(request: Request, fields: tuple[str, ...]) -> dict[str, str]:
    """An HTML form post (application/x-www-form-urlencoded, UTF-8), each field at most once."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/x-www-form-urlencoded":
        raise ReviewError(415, "Unsupported form encoding",
                          f"The post is `{media_type[:100] or 'without a Content-Type'}`; the review page takes "
                          "application/x-www-form-urlencoded, as its forms send.")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise ReviewError(413, "Form too large",
                              f"The form is more than {MAX_FORM_BYTES} bytes; shorten the note.")
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=2 * len(fields),
                          errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise ReviewError(400, "Unreadable form", "The form is not UTF-8 URL-encoded fields, or has far too many "
                                                  "fields; submit it from the review page.") from None
    form: dict[str, str] = {}
    for name, value in pairs:
        if name not in fields:
            raise ReviewError(400, "Unexpected field", f"The form has a field `{name[:60]}` that the review page does "
                                                       f"not send; it takes {', '.join(fields)}.")
        if name in form:
            raise ReviewError(400, "Field sent twice", f"The form sends `{name}` twice; send it once.")
        if len(value) > FIELD_LIMITS.get(name, 1000):
            raise ReviewError(413, "Field too long", f"`{name}` is {len(value)} characters; the most is "
                                                     f"{FIELD_LIMITS.get(name, 1000)}.")
        form[name] = value
    return form


# --------------------------------------------------------------------------- the pages


class ReviewPages:
    """The endpoints; `gateway` gives the config (the token) and the consensus stub."""

    def __init__(self) -> None:
        self.guard = ReviewGuard()

    @staticmethod
    def _gateway(request: Request):
        return request.app.state.gateway

    def _token(self, request: Request) -> str | None:
        return self._gateway(request).config.security.bearer_token

    def _consensus_error(self, request: Request, exc: grpc.aio.AioRpcError) -> ReviewError:
        address = self._gateway(request).config.services.consensus.client_target
        relayed = from_rpc_error(exc, hop=f"the consensus service at {address}")
        code = exc.code()
        status = {grpc.StatusCode.FAILED_PRECONDITION: 409, grpc.StatusCode.DEADLINE_EXCEEDED: 504,
                  grpc.StatusCode.CANCELLED: 504}.get(code, relayed.status)
        message = relayed.message
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            message = (f"the consensus service at {address} did not answer within {CONSENSUS_TIMEOUT_S:g} s; "
                       "reload the page in a moment")
        titles = {404: "No such case", 503: "The review queue is not reachable", 504: "The review queue is slow",
                  409: "Already decided", 400: "Refused by the review queue"}
        if status >= 500 and status not in (503, 504):
            log_event(log, "consensus failed the review page", logging.WARNING, code=code.name,
                      details=(exc.details() or "")[:300])
        message = message[:1].upper() + message[1:1000]
        return ReviewError(status, titles.get(status, "The review queue failed"), message)

    def _login(self, request: Request, status: int = 401, next_path: str = "", problem: str = "") -> HTMLResponse:
        token = self._token(request)
        csrf, fresh = self.guard.csrf(request, token)
        response = render("login.html", status=status, csrf=csrf, next=_safe_next(next_path), problem=problem)
        if fresh:
            _set_cookie(response, request, CSRF_COOKIE, fresh)
        return response

    def _wall(self, request: Request) -> HTMLResponse | None:
        """The login form (401) when a token is configured and the request does not carry it."""
        if self.guard.signed_in(request, self._token(request)):
            return None
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return self._login(request, next_path=target)

    def _logout_csrf(self, request: Request, csrf: str) -> str | None:
        """Sign-out is offered to a browser signed in by cookie."""
        return csrf if self._token(request) and request.cookies.get(SESSION_COOKIE) else None

    async def queue(self, request: Request) -> Response:
        if (wall := self._wall(request)) is not None:
            return wall
        state = request.query_params.get("state", "pending")
        if state not in STATES:
            raise ReviewError(400, "Unknown state", f"`state` is `{state[:60]}`; use pending, resolved or all.")
        raw_limit = request.query_params.get("limit", str(DEFAULT_LIMIT))
        if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_LIMIT:
            raise ReviewError(400, "Bad limit", f"`limit` is `{raw_limit[:30]}`; use a whole number from 1 to "
                                                f"{MAX_LIMIT}.")
        limit = int(raw_limit)
        stub = self._gateway(request).consensus
        try:
            listing, stats = await asyncio.gather(
                stub.ListEscalations(consensus_pb2.ListEscalationsRequest(state=STATES[state], limit=limit),
                                     timeout=CONSENSUS_TIMEOUT_S),
                stub.GetStats(consensus_pb2.GetStatsRequest(), timeout=CONSENSUS_TIMEOUT_S))
        except grpc.aio.AioRpcError as exc:
            raise self._consensus_error(request, exc) from None
        csrf, fresh = self.guard.csrf(request, self._token(request))
        response = render("queue.html", cases=list(listing.escalations), state=state, limit=limit,
                          stats=stats, bars=chart_bars(stats), logout_csrf=self._logout_csrf(request, csrf))
        if fresh:
            _set_cookie(response, request, CSRF_COOKIE, fresh)
        return response

    async def _get(self, request: Request, case_id: str) -> consensus_pb2.Escalation:
        try:
            return await self._gateway(request).consensus.GetEscalation(
                consensus_pb2.GetEscalationRequest(id=case_id), timeout=CONSENSUS_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            raise self._consensus_error(request, exc) from None

    def _case_page(self, request: Request, case: consensus_pb2.Escalation, status: int = 200, problem: str = "",
                   values: dict[str, str] | None = None, resolved_now: bool = False) -> HTMLResponse:
        csrf, fresh = self.guard.csrf(request, self._token(request))
        values = values or {}
        reviewer = values.get("reviewer", unquote(request.cookies.get(REVIEWER_COOKIE, "")))[:FIELD_LIMITS["reviewer"]]
        response = render("case.html", status=status, case=case, csrf=csrf, problem=problem,
                          decision=values.get("decision", ""), note=values.get("note", ""), reviewer=reviewer,
                          resolved_now=resolved_now, logout_csrf=self._logout_csrf(request, csrf))
        if fresh:
            _set_cookie(response, request, CSRF_COOKIE, fresh)
        return response

    async def case(self, request: Request) -> Response:
        if (wall := self._wall(request)) is not None:
            return wall
        case = await self._get(request, _case_id(request))
        return self._case_page(request, case, resolved_now=request.query_params.get("resolved") == "1")

    async def resolve(self, request: Request) -> Response:
        case_id = _case_id(request)
        if not self.guard.signed_in(request, self._token(request)):
            return self._login(request, next_path=f"/review/{case_id}",
                               problem="Sign in first; the case was not resolved.")
        form = await read_form(request, ("csrf_token", "decision", "note", "reviewer"))
        self.guard.check_post(request, form, self._token(request))
        decision, note, reviewer = form.get("decision", ""), form.get("note", "").strip(), form.get("reviewer", "").strip()
        problems = []
        if not decision.strip():
            problems.append("Choose the decision (one of the options) before resolving.")
        if not reviewer:
            problems.append("Give your name as the reviewer: the queue records who decided.")
        if problems:
            case = await self._get(request, case_id)
            return self._case_page(request, case, status=400, problem=" ".join(problems), values=form)
        try:
            await self._gateway(request).consensus.ResolveEscalation(
                consensus_pb2.ResolveEscalationRequest(id=case_id, resolution=decision, reviewer=reviewer, note=note),
                timeout=CONSENSUS_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            error = self._consensus_error(request, exc)
            if exc.code() not in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION):
                raise error from None
            case = await self._get(request, case_id)  # shown again with the queue's sentence
            return self._case_page(request, case, status=error.status, problem=error.message, values=form)
        log_event(log, "escalation resolved on the review page", escalation=case_id, reviewer=reviewer[:200])
        response = RedirectResponse(f"/review/{quote(case_id)}?resolved=1", status_code=303)
        # percent-encoded: a cookie value is ASCII, and names are not
        _set_cookie(response, request, REVIEWER_COOKIE, quote(reviewer, safe=""), max_age=365 * 24 * 3600)
        return response

    async def login_form(self, request: Request) -> Response:
        if not self._token(request):
            return RedirectResponse("/review", status_code=303)
        return self._login(request, status=200, next_path=request.query_params.get("next", ""))

    async def login(self, request: Request) -> Response:
        token = self._token(request)
        if not token:
            return RedirectResponse("/review", status_code=303)
        form = await read_form(request, ("csrf_token", "token", "next"))
        self.guard.check_post(request, form, token)
        presented = form.get("token", "").strip()
        if not presented or not hmac.compare_digest(presented.encode("utf-8", "replace"), token.encode()):
            return self._login(request, next_path=form.get("next", ""),
                               problem="That is not the configured token. Use the bearer token that the mesh's config "
                                       "names under security.auth (ask whoever runs Mirador).")
        response = RedirectResponse(_safe_next(form.get("next", "")), status_code=303)
        _set_cookie(response, request, SESSION_COOKIE, _session_value(token))
        return response

    async def logout(self, request: Request) -> Response:
        form = await read_form(request, ("csrf_token",))
        self.guard.check_post(request, form, self._token(request))
        response = RedirectResponse("/review", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path=COOKIE_PATH, httponly=True, samesite="strict",
                               secure=request.url.scheme == "https")
        return response


def _case_id(request: Request) -> str:
    case_id = request.path_params["case_id"]
    if not ID_PATTERN.fullmatch(case_id):
        raise ReviewError(404, "No such case", f"`{case_id[:80]}` is not an escalation id (they look like "
                                               "esc-0193a1b2c3d-1a2b3c4d); the queue lists them.")
    return case_id


def _safe_next(path: str) -> str:
    """Where to go after signing in: a page of the review site, never another site."""
    return path if _SAFE_NEXT.fullmatch(path or "") else "/review"
