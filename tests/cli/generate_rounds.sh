#!/usr/bin/env bash
# bench/cuda/generate_rounds.sh without a GPU: a stand-in bench_generate prints a row whose
# saturated tokens/s is set by its method, flags and call count, so the test knows each cell.
# Checks: the runs alternate round by round in the order given, each with GENERATE_FLAGS and its
# own flags; the table has each round's tokens/s, their mean, the ratio to the model's first
# variant and to the first row; STOP_S ends the rounds early with what ran in the table; a run
# that fails stops the script with its log; a malformed variant or a model without config.json
# is refused before anything runs.
# Usage: generate_rounds.sh SOURCE_DIR
set -euo pipefail
src=$1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }
mkdir -p "$work/build/bench" "$work/vanilla" "$work/dmc8"
touch "$work/vanilla/config.json" "$work/dmc8/config.json"
# The stand-in: tokens/s 1000 (vanilla) or 6000 (dmc), +600 with --page_size=8, +10 a call of
# that variant before; every call is logged.
cat >"$work/build/bench/bench_generate" <<'EOF'
#!/usr/bin/env bash
echo "$*" >>"$CALLS"
method="" tokens=1000
for a; do
  case $a in
    --methods=dmc) method=dmc tokens=6000 ;;
    --methods=*) method=${a#--methods=} ;;
    --page_size=8) tokens=$((tokens + 600)) ;;
  esac
done
[ "$method" != broken ] || { echo "bench_generate: no GPU"; exit 1; }
key=$(echo "$*" | tr -c 'a-z0-9' _)
before=$(grep -c . "$CALLS.$key" 2>/dev/null || true)
echo x >>"$CALLS.$key"
tokens=$((tokens + 10 * before))
echo "| $method | 7.9 | 90 | 70.0 | 1 | 76.0 | $tokens | 94.1 / 90.2 | 1 | 1 | 1 | 1 | 1 | 1 | 1 | 1 | 1 | 1 | 40 | 1 | 1 | 0 (0, 0) | 1 | 1 |"
EOF
chmod +x "$work/build/bench/bench_generate"
export CALLS=$work/calls DMC_BUILD_DIR=$work/build GENERATE_FLAGS="--budget_gb=0.25"
script=$src/bench/cuda/generate_rounds.sh

bash "$script" "$work/t.md" 2 base=vanilla@"$work/vanilla" d8=dmc@"$work/dmc8" \
    d8_p8=dmc@"$work/dmc8",--page_size=8,--seed=2 >"$work/log" 2>&1 || fail "run: $(cat "$work/log")"
# the calls: base, d8, d8_p8, then again, each with the common flags first
order=$(sed -E 's/.*--methods=([a-z]+) --budget_gb=0.25 ?(.*)/\1 \2/' "$CALLS" | tr '\n' ';')
[ "$order" = "vanilla ;dmc ;dmc --page_size=8 --seed=2;vanilla ;dmc ;dmc --page_size=8 --seed=2;" ] ||
  fail "calls out of order: $order"
table=$(cat "$work/t.md")
row() { grep "^| $1 |" <<<"$table" | awk -F' *\\| *' '{ print $8, $9, $10, $11, $12 }'; }
[ "$(row base)" = "1000 1010 1005 +0.0% 1.00×" ] || fail "base row: $(row base) in $table"
[ "$(row d8)" = "6000 6010 6005 +0.0% 5.98×" ] || fail "d8 row: $(row d8) in $table"
[ "$(row d8_p8)" = "6600 6610 6605 +10.0% 6.57×" ] || fail "d8_p8 row: $(row d8_p8) in $table"
grep -q "^| d8 | dmc, $work/dmc8 | 7.9 | 76.0 | 94.1 / 90.2 | 40 |" <<<"$table" || fail "d8's columns: $table"
grep -q "2 of 2 rounds" <<<"$table" || fail "rounds line: $table"

rm -f "$CALLS"*
STOP_S=0 bash "$script" "$work/s.md" 2 base=vanilla@"$work/vanilla" >"$work/log" 2>&1 ||
  fail "STOP_S run: $(cat "$work/log")"
[ ! -e "$CALLS" ] || fail "STOP_S=0 ran bench_generate"
grep -q "^| base | vanilla, $work/vanilla | not run |" "$work/s.md" || fail "STOP_S table: $(cat "$work/s.md")"
grep -q "0 of 2 rounds" "$work/s.md" || fail "STOP_S rounds line: $(cat "$work/s.md")"

if bash "$script" "$work/f.md" 1 base=vanilla@"$work/vanilla" x=broken@"$work/dmc8" >"$work/log" 2>&1; then
  fail "a failing run passed"
fi
grep -q "x, round 1, failed" "$work/log" && grep -q "bench_generate: no GPU" "$work/log" ||
  fail "failing run's message: $(cat "$work/log")"

for bad in "x=vanilla" "x=vanilla@$work/none" "vanilla@$work/vanilla"; do
  rc=0
  bash "$script" "$work/b.md" 1 "$bad" >"$work/log" 2>&1 || rc=$?
  ((rc != 0)) || fail "'$bad' was accepted"
  grep -q "generate_rounds: .*\(not NAME=METHOD@MODEL_DIR\|no config.json\)" "$work/log" ||
    fail "'$bad': $(cat "$work/log")"
done
rc=0
bash "$script" "$work/b.md" two base=vanilla@"$work/vanilla" >"$work/log" 2>&1 || rc=$?
((rc == 2)) && grep -q "ROUNDS 'two' is not a count" "$work/log" || fail "ROUNDS two: $(cat "$work/log")"
echo "generate_rounds.sh: alternation, table, STOP_S, failures: ok"
