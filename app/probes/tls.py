"""TLS for probing: we test relaying and proxying, not certificates."""

from __future__ import annotations

import ssl
import warnings


def tls_context() -> ssl.SSLContext:
    """Accept any certificate and old protocol versions (the subject is recorded as evidence, not checked)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with warnings.catch_warnings():  # old servers still speak TLS 1.0; we only need the channel
            warnings.simplefilter("ignore", DeprecationWarning)
            context.minimum_version = ssl.TLSVersion.TLSv1
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
    except (ValueError, ssl.SSLError):
        pass
    return context


def certificate_subject(der: bytes | None) -> str | None:
    if not der:
        return None
    try:
        from cryptography import x509

        cert = x509.load_der_x509_certificate(der)
        return cert.subject.rfc4514_string()[:300]
    except Exception:  # noqa: BLE001 - a malformed certificate is evidence too, not a crash
        return "(unreadable certificate)"
