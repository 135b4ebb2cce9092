#!/usr/bin/env bash
# Training curves from dmc-train's --log_jsonl files, drawn by gnuplot into one PNG: LM loss per
# step (top) and the CR target with the achieved CR (bottom), one colour per run. The loss and the
# achieved CR are running means over the last 1% of each run's steps (at least one): per-step
# values scatter by ±0.3 nats with the batch, which hides the differences between runs. Runs
# without DMC (every CR target 1: pre-training) get the loss alone.
#
#   launch/plot_training.sh OUT.png NAME=metrics.jsonl [NAME=metrics.jsonl ...]
set -euo pipefail
out=${1:?usage: plot_training.sh OUT.png NAME=metrics.jsonl ...}
shift
(($#)) || { echo "plot_training: no runs given" >&2; exit 2; }
command -v gnuplot >/dev/null || { echo "plot_training: gnuplot is not installed (apt-get install gnuplot-nox)" >&2; exit 2; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

field() { sed -E "s/.*\"$1\":([^,}]*).*/\\1/"; }
loss_plot="" cr_plot="" i=0 any_dmc=0
for run in "$@"; do
  name=${run%%=*} file=${run#*=}
  [ -s "$file" ] || { echo "plot_training: $file is missing or empty" >&2; exit 1; }
  i=$((i + 1))
  # step lm_loss cr_target achieved_cr
  paste -d' ' <(field step <"$file") <(field lm_loss <"$file") <(field cr_target <"$file") \
    <(field achieved_cr <"$file") | sort -n >"$tmp/$i.raw"
  awk -v n="$(wc -l <"$tmp/$i.raw")" '
    BEGIN { w = int(n / 100); if (w < 1) w = 1 }
    { if (NR > w) { sl -= loss[NR % w]; sc -= cr[NR % w] }
      loss[NR % w] = $2; cr[NR % w] = $4; sl += $2; sc += $4; m = NR < w ? NR : w
      print $1, sl / m, $3, sc / m }' "$tmp/$i.raw" >"$tmp/$i.dat"
  awk '$3 > 1 { found = 1 } END { exit !found }' "$tmp/$i.raw" && any_dmc=1
  loss_plot+="${loss_plot:+, }'$tmp/$i.dat' using 1:2 with lines lc $i title '$name'"
  cr_plot+="${cr_plot:+, }'$tmp/$i.dat' using 1:4 with lines lc $i title '$name achieved',"
  cr_plot+=" '$tmp/$i.dat' using 1:3 with lines lc $i dt 2 title '$name target'"
done
if ((any_dmc)); then
  cr_panel="set offsets graph 0, graph 0, graph 0.05, graph 0
set xlabel 'step'
set ylabel 'compression ratio'
plot $cr_plot"
  size=900,700 layout="set multiplot layout 2,1"
else
  size=900,400 layout="set xlabel 'step'" cr_panel=""
fi
gnuplot <<GP
set terminal pngcairo size $size font ',10'
set output '$out'
$layout
set grid
set key outside right
set ylabel 'LM loss (nats/token)'
plot $loss_plot
$cr_panel
GP
echo "plot_training: $out"
