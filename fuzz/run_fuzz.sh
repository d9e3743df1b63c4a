#!/usr/bin/env bash
# Runs each fuzz target for SECONDS (default 600) on one core, seeded from fuzz/seeds, keeping
# the corpus in fuzz/corpus and crashes in fuzz/artifacts. Needs cargo-fuzz; on a stable
# toolchain RUSTC_BOOTSTRAP=1 lets it use the sanitizer flags.
set -u
cd "$(dirname "$0")"
secs=${1:-600}
for t in checkpoint_reader adapter_config dataset_reader; do
  mkdir -p corpus/$t
  RUSTC_BOOTSTRAP=1 cargo fuzz run -O $t corpus/$t seeds/$t -- -max_total_time=$secs -max_len=65536 -rss_limit_mb=4096 -print_final_stats=1 2>&1 | tail -25 > ../target/fuzz-$t.log
done
