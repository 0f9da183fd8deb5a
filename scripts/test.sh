#!/usr/bin/env bash
# The test command: installs what the tests need that is not Rust, then runs every test.
# - aiosmtpd (PyPI): the real SMTP server the email tests deliver to.
# The durability tests also mount a small tmpfs to fill a disk; that needs root (CI is root;
# elsewhere that one test says it is skipped).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import aiosmtpd" 2>/dev/null; then
  echo "installing aiosmtpd (a real SMTP server for the email tests)"
  python3 -m pip install --quiet --disable-pip-version-check aiosmtpd
fi
exec cargo test "$@"
