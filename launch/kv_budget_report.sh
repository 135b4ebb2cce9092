#!/usr/bin/env bash
# The comparison at equal bytes, from the TSV lines of dmc-eval --kv_fraction --append_tsv
# (inference/dmc_eval_main.cpp: label, budget, method, policy, budget bytes, mean and max bytes
# per sequence, perplexity, accuracy, tokens/s, note):
#   OUT.md   one table per budget of 1/2, 1/4 and 1/8: the vanilla reference, then every method
#            in the order of the lines, with its setting, KV bytes (the mean over windows: a
#            learned CR varies), perplexity, Δ against the reference, accuracy, decode tokens/s,
#            or the reason no setting met the budget;
#            above the tables the device the lines were decoded on, which sets the element
#            type of the full-precision pages;
#   OUT.png  (with gnuplot) perplexity against KV bytes on a log scale: one line per method
#            through the settings its knob took at every budget of the TSV, and for DMC and DMS
#            one per retrofit (the TSV's label) through full precision and the bits composed with
#            it (and one through the key channels ThinK kept, for dmc_think and dms_think); the
#            vanilla cache a point, dotted verticals at the tables' budgets, the y axis up to +12%
#            of the vanilla cache's perplexity.
#
#   launch/kv_budget_report.sh [--device=cpu|cuda] OUT PAGE_SIZE budget.tsv [budget.tsv ...]
# --device: dmc-eval's --device of the lines (default cpu): the CPU decoder's pages are fp32, the
# GPU engine's bf16 (the budgets then fractions of its bf16 vanilla cache).
set -euo pipefail
usage="usage: kv_budget_report.sh [--device=cpu|cuda] OUT PAGE_SIZE budget.tsv ..."
device=cpu
case ${1:-} in --device=*) device=${1#--device=}; shift ;; esac
case $device in
  cpu) element=fp32 decoder="the CPU decoder" ;;
  cuda) element=bf16 decoder="the GPU engine" ;;
  *) echo "kv_budget_report: --device=$device: expected cpu or cuda" >&2; exit 2 ;;
esac
out=${1:?$usage}
page=${2:?$usage}
shift 2
(($#)) || { echo "kv_budget_report: no TSV files given" >&2; exit 2; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cat "$@" >"$tmp/all.tsv"

# The name a method goes by in the tables and the plot (a retrofit: its label).
names='
  function name(method, label) {
    if (method == "dmc" || method == "dms") return label
    if (method == "dmc_think" || method == "dms_think") return label ", ThinK"
    if (method == "quant") return "quantization"
    if (method == "zipcache") return "ZipCache"
    if (method == "think") return "ThinK"
    if (method == "kvsharer") return "KVSharer"
    if (method == "vanilla") return "vanilla"
    if (method ~ /_pyramid$/) return toupper(substr(method, 1, index(method, "_") - 1)) ", PyramidInfer budgets"
    if (method ~ /_zigzag$/) return toupper(substr(method, 1, index(method, "_") - 1)) ", ZigZagKV budgets"
    return toupper(method)
  }'

awk -F'\t' -v page="$page" -v element="$element" -v device="$device" -v decoder="$decoder" "$names"'
  function kib(b) { return sprintf("%.1f", b / 1024) }
  function setting(method, p,   z) {
    if (p ~ /^(h2o|tova)-(pyramid|zigzag)-/) { sub(/^.*-/, "", p); return p " slots per head, the mean over layers" }
    if (p ~ /^(h2o|tova)-/) { sub(/^[a-z0-9]+-/, "", p); return p " slots per head" }
    if (p ~ /^(dmc-|dms-)?think-k/) { sub(/^.*think-k/, "", p); return p (p == 1 ? " key channel" : " key channels") " kept" }
    if (p ~ /^kvsharer-/) { sub(/^kvsharer-/, "", p); return p " layers read another one'"'"'s cache" }
    if (p ~ /-zip/) { split(p, z, /zip|\/|x/); return z[4] " of " page " slots per page at " z[2] " bits, the rest " z[3] }
    if (p ~ /-int/) { sub(/^[a-z]+-/, "", p); return method == "quant" ? p : p " slots" }
    return method == "vanilla" ? element : element " slots"
  }
  # dmc-eval: "no setting of M meets B bytes ...: its smallest cache, POLICY, holds N (pages P,
  # full-precision residual R, DMC window state W, ThinK query energy E)" → KiB and of vanilla
  function unmet(r,   why, at, n) {
    why = r[11]
    at = index(why, "its smallest cache, ")
    if (at == 0) return why
    why = substr(why, at + 20)
    split(substr(why, index(why, " holds ")), n, /[^0-9]+/)
    return sprintf("its smallest setting, %s, holds %s KiB (%.3f): %s in pages%s%s%s",
                   setting(r[3], substr(why, 1, index(why, ",") - 1)), kib(n[2]), n[2] / full,
                   kib(n[3]), n[4] > 0 ? ", " kib(n[4]) " in the full-precision residual" : "",
                   n[5] > 0 ? ", " kib(n[5]) " in DMC window state" : "",
                   n[6] > 0 ? ", " kib(n[6]) " in ThinK query energy" : "")
  }
  # no figures: no setting met the budget
  function row(r) {
    if (r[8] == "-") return sprintf("| %s | - | - | - | - | - | - | not met: %s |", name(r[3], r[1]), unmet(r))
    return sprintf("| %s | %s | %s (%.3f) | %.3f | %s | %.3f | %.0f | %s |",
                   name(r[3], r[1]) (r[3] == "vanilla" ? " (the reference)" : ""), setting(r[3], r[4]),
                   kib(r[6]), r[6] / full, r[8],
                   r[3] == "vanilla" ? "-" : sprintf("%+.1f%%", 100 * (r[8] / base - 1)), r[9],
                   r[10], r[11] == "-" ? "" : r[11])
  }
  { lines[NR] = $0; budget[$2] = $5 }
  $2 == "1" && $3 == "vanilla" { base = $8; full = $6; reference = NR }
  END {
    if (!reference) { print "kv_budget_report: no vanilla reference line (budget 1)" > "/dev/stderr"; exit 1 }
    printf "KV bytes at %s and decode tokens/s of %s (dmc-eval --device=%s).\n\n",
           element, decoder, device
    nb = split("1/2 1/4 1/8", budgets, " ")
    for (b = 1; b <= nb; b++) {
      printf "%s### %s of the vanilla cache: %s KiB per sequence\n\n", (b > 1 ? "\n" : ""), budgets[b], kib(budget[budgets[b]])
      print "| method | setting | KV KiB per sequence (of vanilla) | held-out perplexity | Δ vs base | next-token accuracy | decode tokens/s | note |"
      print "| --- | --- | --- | --- | --- | --- | --- | --- |"
      split(lines[reference], r, "\t"); print row(r)
      for (i = 1; i <= NR; i++) { split(lines[i], r, "\t"); if (r[2] == budgets[b]) print row(r) }
    }
  }' "$tmp/all.tsv" >"$out.md"
echo "kv_budget_report: $out.md"

command -v gnuplot >/dev/null || { echo "kv_budget_report: gnuplot is not installed (apt-get install gnuplot-nox): no $out.png" >&2; exit 0; }
# Met settings → "line<TAB>KiB<TAB>perplexity", one per (line, setting), the lines in the order of
# the TSV lines, each sorted by bytes.
awk -F'\t' "$names"'
  $8 != "-" {
    line = name($3, $1)
    if (!(line in order)) order[line] = ++lines
    if (!seen[line, $4]++) print order[line] "\t" line "\t" $6 / 1024 "\t" $8 }' "$tmp/all.tsv" |
  sort -t$'\t' -k1,1n -k3,3g | cut -f2- >"$tmp/points.tsv"
[ -s "$tmp/points.tsv" ] || { echo "kv_budget_report: no met budget in $*" >&2; exit 1; }
budgets=$(awk -F'\t' '$2 == "1/2" || $2 == "1/4" || $2 == "1/8" { print $2 "\t" $5 / 1024 }' "$tmp/all.tsv" | sort -u)
# A method that breaks the model (KVSharer, ThinK at a few channels) would flatten the others:
# the y axis ends at +12% of the vanilla cache's perplexity, and the tables hold the rest.
top=$(awk -F'\t' '$1 == "vanilla" { print 1.12 * $3 }' "$tmp/points.tsv")

# training-free methods solid with dots, the retrofits dashed with squares
colours=(e41a1c 377eb8 4daf4a 984ea3 ff7f00 a65628 f781bf 999999 66c2a5 8da0cb e5c494 1b9e77
         d95f02 7570b3 e7298a 66a61e)
plot="" i=0
while IFS= read -r line; do
  awk -F'\t' -v l="$line" '$1 == l { print $2, $3 }' "$tmp/points.tsv" >"$tmp/$i.dat"
  case "$line" in
    vanilla) style="points pt 9 ps 2 lc rgb 'black'" ;;
    DMC* | DMS*) style="linespoints pt 5 dt 2 lc rgb '#${colours[i % 16]}'" ;;
    *) style="linespoints pt 7 lc rgb '#${colours[i % 16]}'" ;;
  esac
  plot+="${plot:+, }'$tmp/$i.dat' using 1:2 with $style title '$line'"
  i=$((i + 1))
done < <(cut -f1 "$tmp/points.tsv" | uniq)
arrows=""
while IFS=$'\t' read -r budget kib; do
  [ -n "$budget" ] || continue
  arrows+="set arrow from $kib, graph 0 to $kib, graph 1 nohead dt 3 lc rgb 'gray40'
set label '$budget' at $kib, graph 1.02 center tc rgb 'gray40'
"
done <<<"$budgets"
gnuplot <<GP
set terminal pngcairo size 1100,600 font ',10'
set output '$out.png'
set logscale x 2
set grid
set key outside right
set xlabel 'KV bytes per sequence (KiB, log scale)'
set ylabel 'held-out perplexity'
set tmargin 3
set offsets graph 0, graph 0, graph 0.05, graph 0.05
set yrange [:${top:-*}]
set title "perplexity above +12% of the vanilla cache's is off the chart (see the tables)" offset 0, 1
$arrows
plot $plot
GP
echo "kv_budget_report: $out.png"
