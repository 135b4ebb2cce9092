#!/usr/bin/env bash
# Training curves from dmc-train's --log_jsonl files, drawn by gnuplot into one PNG: LM loss per
# step (top) and the CR target with the achieved CR (bottom), one colour per run.
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
loss_plot="" cr_plot="" i=0
for run in "$@"; do
  name=${run%%=*} file=${run#*=}
  [ -s "$file" ] || { echo "plot_training: $file is missing or empty" >&2; exit 1; }
  i=$((i + 1))
  # step lm_loss cr_target achieved_cr
  paste -d' ' <(field step <"$file") <(field lm_loss <"$file") <(field cr_target <"$file") \
    <(field achieved_cr <"$file") | sort -n >"$tmp/$i.dat"
  loss_plot+="${loss_plot:+, }'$tmp/$i.dat' using 1:2 with lines lc $i title '$name'"
  cr_plot+="${cr_plot:+, }'$tmp/$i.dat' using 1:4 with lines lc $i title '$name achieved',"
  cr_plot+=" '$tmp/$i.dat' using 1:3 with lines lc $i dt 2 title '$name target'"
done
gnuplot <<GP
set terminal pngcairo size 900,700 font ",10"
set output '$out'
set multiplot layout 2,1
set grid
set key outside right
set ylabel 'LM loss (nats/token)'
plot $loss_plot
set xlabel 'step'
set ylabel 'compression ratio'
plot $cr_plot
unset multiplot
GP
echo "plot_training: $out"
