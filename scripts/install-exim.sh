#!/usr/bin/env bash
# Kept for callers of the old name: Exim is extracted by scripts/install-mta.sh (with Sendmail and OpenSMTPD).
exec bash "$(dirname "${BASH_SOURCE[0]}")/install-mta.sh" exim
