"""Secure Your Server: a self-service open-relay and open-proxy audit site."""

from pathlib import Path

__version__ = "0.1.0"

# The checkout (or /app in the container): templates, static, guides, locales and data live beside the package.
PROJECT_ROOT = Path(__file__).resolve().parent.parent

# The version of the checks that produce a verdict; stored with every audit so that an old permalink can be
# told apart from a result of today's logic. Bump it whenever a probe's behaviour or a verdict rule changes.
# 2026.11.30 (issue 10): one server tested once (::ffff: forms merged), host_limit rows, evidence cut at 1 MiB
# 2026.11.30.4 (issue 17): the blocklist service (listed / not_listed, one row per list and address)
ENGINE_VERSION = "2026.11.30.4"
