#!/usr/bin/env bash
# Builds the fuzz targets and runs each for SECONDS (default 30) — the short bounded run CI
# does; longer by hand, e.g. `fuzz/run.sh 3600`. Needs a nightly toolchain and cargo-fuzz
# (.ci/run installs both). A crash fails the run and leaves its input in fuzz/artifacts/.
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-30}
cargo +nightly fuzz build -s none
for target in request_input event_wit store_values; do
    mkdir -p "corpus/$target"
    extra=()
    [ -d "seeds/$target" ] && extra+=("seeds/$target")
    flags=(-max_total_time="$seconds" -print_final_stats=1)
    [ -f "$target.dict" ] && flags+=(-dict="$target.dict")
    echo "fuzz: $target for $seconds s"
    cargo +nightly fuzz run -s none "$target" "corpus/$target" "${extra[@]}" -- "${flags[@]}" 2>&1 \
        | grep -E "^(Done|stat::number_of_executed_units|stat::peak_rss_mb)|ERROR|panicked|SUMMARY|Test unit written|assert"
done
