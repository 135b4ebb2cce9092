#!/usr/bin/env bash
# dmc-serve under saturating load (on the GPU), one model after another with the same flags (and
# each its own, if given), and a table of what dmc-serve-load measured: the whole run
# (requests/s, tokens/s, time to first token, per-token latency, the most sequences decoded
# together, the achieved CR) and the saturated window (while requests waited for admission:
# tokens/s, mean running batch, the KV budget's mean share in use, per-token latency;
# inference/load_stats.h), each model's ratio to the first one's tokens/s; below it, a table of
# the servers' rounds with and without a prompt's prefill (the count, the mean and a bound of the
# p99; dmc-serve's dmc_serve_round_seconds), then a note for each model that ran as many
# sequences at once as there were clients (the load may have bounded it) or whose cache was not
# nearly full while requests waited (not budget-bound).
#
#   bash bench/cuda/serve_load.sh OUT.md NAME=MODEL_DIR[,FLAG...] [NAME=MODEL_DIR[,FLAG...] ...]
#
# FLAGs after a model are dmc-serve's for that model alone, after SERVE_FLAGS: e.g. the same
# checkpoint served two ways, dmc4=DIR/dmc4 and dmc4_pages8=DIR/dmc4,--page_size=8, or a DMC
# checkpoint as vanilla, DIR/dmc4,--method=vanilla (its control channel ignored).
#
# Models: dmc-export checkpoints, e.g. the random 7B pair that
#   build/bench/bench_generate --shape=7b --methods=vanilla,dmc:4 --export_dir=DIR \
#     --requests=32 --prompt=LO:HI --generate=LO:HI
# writes (DIR/vanilla, DIR/dmc4: the control channel calibrated to CR 4 on that command's
# requests; a random model's heads merge more or less with a sequence's length, so give it the
# load's prompt and generated lengths for the CR to hold under the load). Environment:
#   DMC_BUILD_DIR  the build (default build)
#   DEVICE         dmc-serve's --device (default cuda; cpu serves a tiny model, as the test does)
#   SERVE_FLAGS    dmc-serve's flags after --model and --device (default below)
#   LOAD_FLAGS     dmc-serve-load's flags (default below: 256 clients, each request a prompt of
#                  512-1024 random token ids and 256-768 tokens to generate)
#   PORT           the loopback port (default 8100)
# A server that is not listening within 5 minutes, or a load run that fails, stops the
# script with the end of its log; each server gets SIGTERM after its run and must exit 0.
set -euo pipefail
out=${1:?usage: serve_load.sh OUT.md NAME=MODEL_DIR[,FLAG...] ...}
shift
(($#)) || { echo "serve_load: no NAME=MODEL_DIR given" >&2; exit 2; }
bin=${DMC_BUILD_DIR:-build}
port=${PORT:-8100}
device=${DEVICE:-cuda}
serve_flags=${SERVE_FLAGS:---kv_budget_mb=20480 --max_batch=512 --max_queue=1024 --prefill_tokens_per_step=1024}
load_flags=${LOAD_FLAGS:---clients=256 --requests=512 --prompt_tokens=512:1024 --max_tokens=256:768 --vocab=32000 --check=false --timeout_s=600}
logs=$(mktemp -d)
server=""
trap '[ -z "$server" ] || kill "$server" 2>/dev/null || true' EXIT

# NAME MODEL_DIR [FLAG...]: serves MODEL_DIR with SERVE_FLAGS and the FLAGs, loads it, stops it;
# the load's output in $logs/NAME.load
run_model() {
  local name=$1 model=$2
  shift 2
  [ -f "$model/config.json" ] || { echo "serve_load: $model: no config.json (a dmc-export checkpoint?)" >&2; exit 1; }
  # shellcheck disable=SC2086
  "$bin/inference/dmc-serve" --model="$model" --device="$device" --port="$port" $serve_flags "$@" \
      >"$logs/$name.serve" 2>&1 &
  server=$!
  local waited=0
  # dmc-serve says "listening on" once its socket is bound and the engine is up
  until grep -q "listening on" "$logs/$name.serve"; do
    if ! kill -0 "$server" 2>/dev/null || ((waited >= 300)); then
      echo "serve_load: dmc-serve on $model did not come up; the end of its log:" >&2
      tail -20 "$logs/$name.serve" >&2
      exit 1
    fi
    sleep 1
    waited=$((waited + 1))
  done
  echo "serve_load: $name up after ${waited} s; loading it"
  # shellcheck disable=SC2086
  if ! "$bin/inference/dmc-serve-load" --port="$port" $load_flags >"$logs/$name.load" 2>&1; then
    echo "serve_load: the load run on $name failed; the end of its output:" >&2
    tail -20 "$logs/$name.load" >&2
    exit 1
  fi
  tail -3 "$logs/$name.load"
  kill -TERM "$server"
  local status=0
  wait "$server" || status=$?
  server=""
  ((status == 0)) || { echo "serve_load: dmc-serve on $name exited $status after SIGTERM" >&2; exit 1; }
}

names=() served=()
for arg in "$@"; do
  name=${arg%%=*} spec=${arg#*=}
  [ "$name" != "$arg" ] || { echo "serve_load: '$arg' is not NAME=MODEL_DIR[,FLAG...]" >&2; exit 2; }
  IFS=, read -r -a model_flags <<<"$spec"
  run_model "$name" "${model_flags[@]}"
  names+=("$name")
  served+=("$name: ${model_flags[*]}")
done

{
  echo "dmc-serve --device=$device $serve_flags; dmc-serve-load $load_flags; $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || echo "no GPU")"
  echo
  printf '%s\n' "${served[@]}"
  echo
  echo "| model | requests/s | tokens/s | TTFT p50 ms | TTFT p99 ms | per-token p50 ms | per-token p99 ms | max concurrent | CR | saturated tokens/s | vs ${names[0]} | saturated batch | saturated KV used | saturated per-token p50 ms | saturated per-token p99 ms |"
  echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
  for name in "${names[@]}"; do
    awk -v name="$name" -v first="$logs/${names[0]}.load" '
      function field(line, after,   rest, f) {  # the number that follows `after` in line
        rest = substr(line, index(line, after) + length(after))
        split(rest, f, " ")
        return f[1]
      }
      function saturated_tokens(file,   l) {
        while ((getline l < file) > 0) if (l ~ /^saturated \(/) return field(l, "): tokens/s ")
        return ""
      }
      /^requests\/s / { whole = $0 }
      /^saturated/ { sat = $0 }
      END {
        printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s |", name, field(whole, "requests/s "),
               field(whole, "  tokens/s "), field(whole, "first token p50 "),
               field(whole, " ms p99 "), field(whole, "latency p50 "),
               field(substr(whole, index(whole, "latency p50 ")), " ms p99 "),
               field(whole, "concurrent sequences "), field(whole, "achieved CR ")
        if (sat ~ /^saturated \(/) {
          tokens = field(sat, "): tokens/s "); base = saturated_tokens(first)
          printf " %s | %.2f× | %s | %s | %s | %s |\n", tokens, (base > 0 ? tokens / base : 0),
                 field(sat, "running batch "), field(sat, "KV used "), field(sat, "latency p50 "),
                 field(substr(sat, index(sat, "latency p50 ")), " ms p99 ")
        } else {
          printf " - | - | - | - | - | - |\n"
        }
      }' "$logs/$name.load"
  done
  # the server's rounds apart: a round that prefilled holds up every running stream's next token
  echo
  echo "| model | rounds without a prefill | mean ms | p99 ≤ ms | rounds with one | mean ms | p99 ≤ ms |"
  echo "| --- | --- | --- | --- | --- | --- | --- |"
  for name in "${names[@]}"; do
    sed -nE "s/^rounds: ([0-9]+) without a prefill, mean ([0-9.]+) ms, p99 <= ([0-9.a-z]+) ms; ([0-9]+) with one, mean ([0-9.]+) ms, p99 <= ([0-9.a-z]+) ms$/| $name | \1 | \2 | \3 | \4 | \5 | \6 |/p" "$logs/$name.load"
  done
  # a row whose load ran every client's request at once may measure the load, not the server
  for name in "${names[@]}"; do
    if grep -q "^load-bound" "$logs/$name.load"; then
      echo
      echo "$name: every client had a sequence running at once (max concurrent = clients): the load may bound this row; more --clients tells."
    fi
    if grep -q "^not budget-bound" "$logs/$name.load"; then
      echo
      echo "$name: $(grep "^not budget-bound" "$logs/$name.load")"
    fi
  done
} >"$out"
cat "$out"
