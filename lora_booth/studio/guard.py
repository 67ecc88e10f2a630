"""Who may talk to the studio. Bound to the loopback address it takes requests only for a loopback
host name (a web page that rebinds its own name to 127.0.0.1 is refused); on any other address it
needs a token, and then every request carries it (header, or the cookie a visit to ?token= sets).
A request that changes anything must carry the X-Lora-Booth header, which a page of another site
cannot add without the browser asking first (a CORS preflight this server never grants), and its
Origin, when sent, must be this server."""
from __future__ import annotations

import ipaddress
import secrets
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response

from ..io.errors import ConfigError

TOKEN_COOKIE = "lora_booth_token"
TOKEN_HEADER = "x-lora-booth-token"
CSRF_HEADER = "x-lora-booth"
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
SAFE_METHODS = {"GET", "HEAD"}
PAGE_POLICY = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
               "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_binding(host: str, token: str) -> None:
    if not is_loopback(host) and not token:
        raise ConfigError("ui.host", f"is {host}, an address other machines can reach, and no ui.token is set",
                          "set ui.token to a long random secret (every request must then carry it), or keep the "
                          "default 127.0.0.1")


def request_host(request: Request) -> str:
    host = request.headers.get("host", "")
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class Guard:
    def __init__(self, host: str, token: str) -> None:
        check_binding(host, token)
        self.loopback_only = is_loopback(host)
        self.token = token

    def _has_token(self, request: Request) -> bool:
        given = [request.headers.get(TOKEN_HEADER, ""), request.cookies.get(TOKEN_COOKIE, "")]
        authorization = request.headers.get("authorization", "")
        if authorization.lower().startswith("bearer "):
            given.append(authorization[7:].strip())
        return any(value and secrets.compare_digest(value.encode(), self.token.encode()) for value in given)

    def refusal(self, request: Request) -> Response | None:
        """The response that refuses the request, or None to let it through."""
        if self.loopback_only and not is_loopback(request_host(request)):
            return PlainTextResponse("this studio answers only to localhost / 127.0.0.1", status_code=421)
        if self.token and not self._has_token(request):
            offered = request.query_params.get("token", "")
            if request.method == "GET" and offered and secrets.compare_digest(offered.encode(), self.token.encode()):
                rest = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
                response = RedirectResponse(request.url.path + (f"?{urlencode(rest)}" if rest else ""), 303)
                response.set_cookie(TOKEN_COOKIE, self.token, httponly=True, samesite="strict")
                return response
            return JSONResponse({"detail": "a token is needed: open the URL `lora-booth ui` printed (it carries "
                                           "?token=...), or send the X-Lora-Booth-Token header"}, 401)
        if request.method not in SAFE_METHODS:
            if request.headers.get(CSRF_HEADER) != "1":
                return JSONResponse({"detail": "a request that changes something needs the header X-Lora-Booth: 1 "
                                               "(cross-site requests cannot send it)"}, 403)
            origin = request.headers.get("origin")
            if origin is not None and origin != f"{request.url.scheme}://{request.headers.get('host', '')}":
                return JSONResponse({"detail": f"cross-origin request from {origin[:100]} refused"}, 403)
            if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
                return JSONResponse({"detail": "cross-site request refused"}, 403)
        return None


def harden(response: Response, page: bool) -> Response:
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    if page:
        response.headers["Content-Security-Policy"] = PAGE_POLICY
        response.headers["X-Frame-Options"] = "DENY"
    return response
