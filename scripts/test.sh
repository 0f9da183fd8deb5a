#!/usr/bin/env bash
# The test command: installs what the tests need that is not Rust, then runs every test.
# - aiosmtpd (PyPI): the real SMTP server the email tests deliver to;
# - standardwebhooks (PyPI): the Standard Webhooks reference library, which checks the signatures
#   of tripline's HTTP deliveries.
# Both go into a virtual environment under target/, so nothing is installed into the system's
# Python.
# - chromium (Debian's package): the real headless browser the status page is tested in
#   (installed with apt-get when missing, which needs root; elsewhere that test says it is
#   skipped).
# The durability tests also mount a small tmpfs to fill a disk; that needs root (CI is root;
# elsewhere that one test says it is skipped).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/test-python
if ! "$venv/bin/python" -c "import aiosmtpd, standardwebhooks" 2>/dev/null; then
  echo "installing aiosmtpd (a real SMTP server) and standardwebhooks (the reference signature check) into $venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check aiosmtpd standardwebhooks
fi
export TRIPLINE_TEST_PYTHON="$PWD/$venv/bin/python"
if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing chromium (Debian), the headless browser the status page is tested in"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
if command -v chromium >/dev/null; then
  TRIPLINE_TEST_CHROMIUM="$(command -v chromium)"
  export TRIPLINE_TEST_CHROMIUM
fi
# - postgresql (Debian's package): a throw-away server the PostgreSQL store is tested on, by
#   tests/postgres.rs (several instances on one database) and by running the service's tests a
#   second time with TRIPLINE_TEST_STORE=postgres (each server on a new database).
source scripts/postgres.sh
cargo test "$@"
if [ -n "${TRIPLINE_TEST_POSTGRES:-}" ]; then
  echo "== the service's tests again, on PostgreSQL"
  TRIPLINE_TEST_STORE=postgres cargo test "$@" --test webhook --test waits --test users \
    --test explain --test http_actions --test smtp --test reload --test tenants --test security \
    --test hardening --test calendar --test user_files --test status --test aggregates \
    --test durability
fi
