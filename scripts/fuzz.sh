#!/usr/bin/env bash
# Runs each cargo-fuzz target for a fixed time: scripts/fuzz.sh [SECONDS per target, default 60].
# - decode_body: request bodies through the decoder and the shipped rules;
# - compile_rule: rule files through the rule compiler.
# Each corpus is seeded from the PostHog fixtures (malformed ones included) and the shipped and
# example rules. Installs cargo-fuzz if it is missing. The machine has a stable toolchain only, so
# the targets build without a sanitizer (--sanitizer none) and RUSTC_BOOTSTRAP=1 lets cargo-fuzz
# pass its coverage flags; a crash is saved under fuzz/artifacts/ and the script fails.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
mkdir -p fuzz/corpus/decode_body fuzz/corpus/compile_rule
seed() { # seed TARGET FILE...: copies each file under a name of its own
  local target="$1"; shift
  for f in "$@"; do cp "$f" "fuzz/corpus/$target/seed-${f//\//_}"; done
}
seed decode_body tests/fixtures/posthog/*.json tests/fixtures/posthog/malformed/* rules/test-events/*.json
seed compile_rule rules/*.toml examples/rules/*.toml
for target in decode_body compile_rule; do
  echo "== $target for ${seconds}s"
  RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer none "$target" "fuzz/corpus/$target" -- \
    -max_total_time="$seconds" -print_final_stats=1
done
