#!/usr/bin/env bash
# Perplexity against KV bytes per sequence, drawn by gnuplot into one PNG, from the TSV lines of
# dmc-eval --kv_fraction --append_tsv (inference/dmc_eval_main.cpp): one line per method through
# the settings its knob took at the budgets given (quantization: bits; ZipCache: salient slots;
# H2O and TOVA: slots per head), and for DMC and DMS one line per retrofit, labelled by the TSV's
# label, through full precision and the bits composed with it. The vanilla cache is the point at
# the right; dotted verticals mark the budgets of the tables (1/2, 1/4, 1/8). Bytes on a log scale.
#
#   launch/plot_kv_budget.sh OUT.png budget.tsv [budget.tsv ...]
set -euo pipefail
out=${1:?usage: plot_kv_budget.sh OUT.png budget.tsv ...}
shift
(($#)) || { echo "plot_kv_budget: no TSV files given" >&2; exit 2; }
command -v gnuplot >/dev/null || { echo "plot_kv_budget: gnuplot is not installed (apt-get install gnuplot-nox)" >&2; exit 2; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# Met settings → "line<TAB>KiB<TAB>perplexity", one per (line, setting), the lines in the order
# of the TSV lines, each sorted by bytes; a line is the method, or the label for the learned ones
# (a retrofit each).
awk -F'\t' '$8 != "-" {
      line = toupper($3)
      if ($3 == "dmc" || $3 == "dms") line = $1
      if ($3 == "quant") line = "quantization"
      if ($3 == "zipcache") line = "ZipCache"
      if ($3 == "vanilla") line = "vanilla"
      if (!(line in order)) order[line] = ++lines
      if (!seen[line, $4]++) print order[line] "\t" line "\t" $6 / 1024 "\t" $8 }' "$@" |
  sort -t$'\t' -k1,1n -k3,3g | cut -f2- >"$tmp/points.tsv"
[ -s "$tmp/points.tsv" ] || { echo "plot_kv_budget: no met budget in $*" >&2; exit 1; }
budgets=$(awk -F'\t' '$2 == "1/2" || $2 == "1/4" || $2 == "1/8" { print $2 "\t" $5 / 1024 }' "$@" | sort -u)

# training-free methods solid with dots, learned ones dashed with squares
colours=(e41a1c 377eb8 4daf4a 984ea3 ff7f00 a65628 f781bf 999999 66c2a5 8da0cb e5c494 1b9e77)
plot="" i=0
while IFS= read -r line; do
  awk -F'\t' -v l="$line" '$1 == l { print $2, $3 }' "$tmp/points.tsv" >"$tmp/$i.dat"
  case "$line" in
    vanilla) style="points pt 9 ps 2 lc rgb 'black'" ;;
    DMC* | DMS* | dmc* | dms*) style="linespoints pt 5 dt 2 lc rgb '#${colours[i % 12]}'" ;;
    *) style="linespoints pt 7 lc rgb '#${colours[i % 12]}'" ;;
  esac
  plot+="${plot:+, }'$tmp/$i.dat' using 1:2 with $style title '$line'"
  i=$((i + 1))
done < <(cut -f1 "$tmp/points.tsv" | uniq)
arrows=""
while IFS=$'\t' read -r name kib; do
  [ -n "$name" ] || continue
  arrows+="set arrow from $kib, graph 0 to $kib, graph 1 nohead dt 3 lc rgb 'gray40'
set label '$name' at $kib, graph 1.02 center tc rgb 'gray40'
"
done <<<"$budgets"
gnuplot <<GP
set terminal pngcairo size 1000,600 font ',10'
set output '$out'
set logscale x 2
set grid
set key outside right
set xlabel 'KV bytes per sequence (KiB, log scale)'
set ylabel 'held-out perplexity'
set tmargin 3
set offsets graph 0, graph 0, graph 0.05, graph 0.05
$arrows
plot $plot
GP
echo "plot_kv_budget: $out"
