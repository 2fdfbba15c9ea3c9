"""Which software answered: product and version from what a server says about itself (banner, EHLO, headers).

Each pattern is matched against the server's own words; the guides match their own regular expressions against
the same raw text, so a product missing here can still find its guide.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

RAW_LIMIT = 512


@dataclass(frozen=True)
class Signature:
    product: str
    pattern: re.Pattern[str]  # group "v", when present, is the version


def _sig(product: str, pattern: str) -> Signature:
    return Signature(product, re.compile(pattern, re.IGNORECASE))


# Order matters: the more specific product first (Exchange before IIS SMTP, Zimbra before Postfix).
SMTP_SIGNATURES = [
    _sig("Zimbra", r"\bZimbra\b(?:\s+(?P<v>\d+(?:\.\d+)+))?"),
    _sig("Postfix", r"\bESMTP Postfix\b|\bPostfix\b(?:\s+(?P<v>\d+\.\d+(?:\.\d+)?))?"),
    _sig("Sendmail", r"\bSendmail\s+(?P<v>\d+\.\d+\.\d+)(?:/[\d.]+)?|\bSendmail\b"),
    _sig("Exim", r"\bExim\s+(?P<v>\d+\.\d+(?:\.\d+)?)|\bExim\b"),
    _sig("Microsoft Exchange",
         r"Microsoft ESMTP MAIL Service ready at|Microsoft Exchange(?: Server)?(?:\s+(?P<v>\d{4}))?"),
    _sig("Microsoft IIS SMTP", r"Microsoft ESMTP MAIL Service,? Version:?\s*(?P<v>\d+\.\d+\.\d+(?:\.\d+)?)"),
    _sig("HCL/Lotus Domino", r"\b(?:Lotus|IBM|HCL)?\s*Domino\s+Release\s+(?P<v>[\d.A-Z]+)|\bDomino\b"),
    _sig("MDaemon", r"\bMDaemon\s+(?P<v>\d+\.\d+(?:\.\d+)?)|\bMDaemon\b"),
    _sig("hMailServer", r"\bhMailServer\b(?:\s+(?P<v>\d+\.\d+(?:\.\d+)?))?"),
    _sig("OpenSMTPD", r"\bOpenSMTPD\b(?:\s+(?P<v>\d+\.\d+(?:\.\d+)?))?"),
    _sig("qmail", r"\bqmail\b|\bnetqmail\b|\bs/qmail\b"),
    _sig("Kerio Connect", r"\bKerio (?:Connect|MailServer)\s+(?P<v>\d+\.\d+(?:\.\d+)?)|\bKerio\b"),
    _sig("CommuniGate Pro", r"\bCommuniGate Pro\b(?:\s+SMTP\s+(?P<v>\d+\.\d+(?:\.\d+)?))?"),
    _sig("IceWarp", r"\bIceWarp\b(?:\s+(?P<v>\d+\.\d+(?:\.\d+)?))?|\bMerak\b"),
    _sig("Courier", r"\bCourier\b"),
    _sig("Haraka", r"\bHaraka\b(?:[/\s]+(?P<v>\d+\.\d+(?:\.\d+)?))?"),
    _sig("Axigen", r"\bAxigen\b"),
    _sig("SmarterMail", r"\bSmarterMail\b"),
    _sig("MailEnable", r"\bMailEnable\b"),
    _sig("Stalwart", r"\bStalwart\b"),
]


def identify(raw: str, signatures: list[Signature] = SMTP_SIGNATURES) -> dict[str, str | None] | None:
    """{"product", "version", "raw"}; product None when nothing matched; None when there is nothing to read."""
    raw = raw.strip()
    if not raw:
        return None
    for signature in signatures:
        match = signature.pattern.search(raw)
        if match:
            version = match.groupdict().get("v")
            return {"product": signature.product, "version": version, "raw": raw[:RAW_LIMIT]}
    return {"product": None, "version": None, "raw": raw[:RAW_LIMIT]}


# Proxies, from Server / Via / Proxy-Agent / X-Squid-Error headers, error pages and SOCKS behaviour.
PROXY_SIGNATURES = [
    _sig("Squid", r"\bsquid(?:/(?P<v>\d+(?:\.\d+)+))?|x-squid-error"),
    _sig("Apache Traffic Server", r"\bATS/(?P<v>\d+(?:\.\d+)+)|ApacheTrafficServer|Traffic Server"),
    _sig("tinyproxy", r"\btinyproxy(?:/(?P<v>\d+(?:\.\d+)+))?"),
    _sig("Privoxy", r"\bPrivoxy(?:/(?P<v>\d+(?:\.\d+)+))?"),
    _sig("3proxy", r"\b3proxy(?:/(?P<v>[\d.]+))?"),
    _sig("CCProxy", r"\bCCProxy\b"),
    _sig("WinGate", r"\bWinGate\b"),
    _sig("Microsoft ISA / Forefront TMG", r"Forefront TMG|ISA Server|\bTMG\b"),
    _sig("Polipo", r"\bPolipo\b"),
    _sig("nginx", r"\bnginx(?:/(?P<v>\d+(?:\.\d+)+))?"),
    _sig("Apache httpd", r"\bApache(?:/(?P<v>\d+(?:\.\d+)+))?"),
    _sig("Dante", r"\bDante\b"),
    _sig("microsocks", r"\bmicrosocks\b"),
    _sig("MikroTik", r"\bMikroTik\b"),
]
