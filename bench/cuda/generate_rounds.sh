#!/usr/bin/env bash
# bench_generate's variants side by side: each round runs every variant once, in the order given,
# so a GPU's drift over the call (clocks, temperature) falls on all of them alike; then a table of
# each round's saturated tokens/s, their mean, the ratio to the first variant on the same model
# (a change's gain) and to the first row (DMC against vanilla), beside the saturated batch, the
# CR reached, the budget's share in use and a saturated round's host µs (bench_generate's columns).
#
#   bash bench/cuda/generate_rounds.sh OUT.md ROUNDS NAME=METHOD@MODEL_DIR[,FLAG...] ...
#
# e.g., on the 1B trio that `bench_generate --shape=1b --methods=vanilla,dmc:4,dmc:8
# --export_dir=DIR` writes (its own workload flags given again, so the CR holds):
#   GENERATE_FLAGS="--budget_gb=0.25 --requests=256 --prompt=512:1024 --generate=256:512" \
#   bash bench/cuda/generate_rounds.sh out.md 3 vanilla=vanilla@DIR/vanilla dmc8=dmc@DIR/dmc8 \
#     dmc8_pages8=dmc@DIR/dmc8,--page_size=8
# Environment:
#   DMC_BUILD_DIR   the build (default build)
#   GENERATE_FLAGS  bench_generate's flags for every run (the workload and the budget)
#   STOP_S          start no run after this many seconds (default: none); a device call's limit
#                   then ends the rounds early rather than killing the script, and the table
#                   has what ran
#   RUN_S           the limit of one run (default 300)
# Each run's output is kept beside OUT.md in OUT.runs/NAME.rK.log; a run that fails or prints no
# row stops the script with the end of its log.
set -euo pipefail
out=${1:?usage: generate_rounds.sh OUT.md ROUNDS NAME=METHOD@MODEL_DIR[,FLAG...] ...}
rounds=${2:?usage: generate_rounds.sh OUT.md ROUNDS NAME=METHOD@MODEL_DIR[,FLAG...] ...}
shift 2
(($#)) || { echo "generate_rounds: no variant given" >&2; exit 2; }
[[ $rounds =~ ^[1-9][0-9]*$ ]] || { echo "generate_rounds: ROUNDS '$rounds' is not a count" >&2; exit 2; }
bin=${DMC_BUILD_DIR:-build}/bench/bench_generate
[ -x "$bin" ] || { echo "generate_rounds: $bin not found (build bench_generate)" >&2; exit 1; }
runs="${out%.md}.runs"
mkdir -p "$runs"
rm -f "$runs"/*.log
start=$SECONDS

names=() methods=() models=() flags=()
for arg in "$@"; do
  name=${arg%%=*} spec=${arg#*=}
  [[ $name != "$arg" && $spec == *@* ]] || {
    echo "generate_rounds: '$arg' is not NAME=METHOD@MODEL_DIR[,FLAG...]" >&2; exit 2; }
  model=${spec#*@} extra=""
  [[ $model == *,* ]] && extra=${model#*,} model=${model%%,*}
  [ -f "$model/config.json" ] || {
    echo "generate_rounds: $name: $model has no config.json (a dmc-export checkpoint?)" >&2; exit 1; }
  names+=("$name") methods+=("${spec%%@*}") models+=("$model") flags+=("${extra//,/ }")
done

ran=0
for ((round = 1; round <= rounds; ++round)); do
  for i in "${!names[@]}"; do
    if [ -n "${STOP_S:-}" ] && ((SECONDS - start >= STOP_S)); then
      echo "generate_rounds: ${STOP_S} s reached; round $round stops before ${names[i]}"
      break 2
    fi
    log="$runs/${names[i]}.r$round.log"
    # shellcheck disable=SC2086
    if ! timeout "${RUN_S:-300}" "$bin" --model="${models[i]}" --methods="${methods[i]}" \
        ${GENERATE_FLAGS:-} ${flags[i]} >"$log" 2>&1 || ! grep -q "^| ${methods[i]} |" "$log"; then
      echo "generate_rounds: ${names[i]}, round $round, failed; the end of its log:" >&2
      tail -20 "$log" >&2
      exit 1
    fi
    echo "generate_rounds: ${names[i]} round $round done at $((SECONDS - start)) s"
  done
  ran=$round
done

# bench_generate's row, split on "|": $3 CR reached, $7 saturated batch, $8 saturated tokens/s,
# $9 saturated KV used / kept %, $20 host µs a saturated round
{
  echo "bench_generate ${GENERATE_FLAGS:-}; $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || echo "no GPU"); $ran of $rounds rounds"
  echo
  header="| variant | method, model, flags | CR | saturated batch | KV used / kept % | host µs a saturated round |"
  rule="| --- | --- | ---: | ---: | ---: | ---: |"
  for ((round = 1; round <= rounds; ++round)); do header+=" round $round |"; rule+=" ---: |"; done
  echo "$header mean | vs the model's first | vs ${names[0]} |"
  echo "$rule ---: | ---: | ---: |"
  declare -A first_on_model
  first_mean=""
  for i in "${!names[@]}"; do
    row=$(cat "$runs/${names[i]}".r*.log 2>/dev/null | { grep "^| ${methods[i]} |" || true; } |
      awk -F'|' -v rounds="$rounds" '
        { for (f = 1; f <= NF; ++f) gsub(/^ +| +$/, "", $f) }
        { ++n; cr = $3; batch += $7; tokens[n] = $8; used = $9; host += $20 }
        END {
          if (n == 0) exit
          line = sprintf("%s | %.1f | %s | %.0f |", cr, batch / n, used, host / n)
          for (r = 1; r <= rounds; ++r) { line = line sprintf(" %s |", r <= n ? tokens[r] : "-"); sum += tokens[r] }
          printf "%s %.0f", line, sum / n
        }' || true)
    if [ -z "$row" ]; then
      echo "| ${names[i]} | ${methods[i]}, ${models[i]}${flags[i]:+ ${flags[i]}} | not run |"
      continue
    fi
    mean=${row##* }
    [ -n "$first_mean" ] || first_mean=$mean
    [ -n "${first_on_model[${models[i]}]:-}" ] || first_on_model[${models[i]}]=$mean
    echo "| ${names[i]} | ${methods[i]}, ${models[i]}${flags[i]:+ ${flags[i]}} | $row |" \
      "$(awk -v a="$mean" -v b="${first_on_model[${models[i]}]}" 'BEGIN { printf "%+.1f%%", 100 * (a / b - 1) }') |" \
      "$(awk -v a="$mean" -v b="$first_mean" 'BEGIN { printf "%.2f×", a / b }') |"
  done
} >"$out"
cat "$out"
