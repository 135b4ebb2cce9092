#!/usr/bin/env bash
# The learned compression of every attention head, one panel per retrofit: rows are layers,
# columns KV heads, colour and label the head's achieved CR on held-out text (log scale: a head
# that merges every token of a 512-token window reaches 512; labels dark on the light end of
# the scale). Reads the "dmc CR per head" (or "dms CR per head") table
# that dmc-eval prints for --methods=dmc (dms).
#
#   launch/plot_head_cr.sh OUT.png NAME=dmc-eval.log [NAME=dmc-eval.log ...]
set -euo pipefail
out=${1:?usage: plot_head_cr.sh OUT.png NAME=dmc-eval.log ...}
shift
(($#)) || { echo "plot_head_cr: no runs given" >&2; exit 2; }
command -v gnuplot >/dev/null || { echo "plot_head_cr: gnuplot is not installed (apt-get install gnuplot-nox)" >&2; exit 2; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

panels="" i=0 layers=0 heads=0
for run in "$@"; do
  name=${run%%=*} file=${run#*=}
  i=$((i + 1))
  # "  layer  L:  cr cr ..." rows after the header → "layer head cr" lines
  awk '/^(dmc|dms) CR per head/ { on = 1; next }
       on && /^ +layer +[0-9]+:/ { sub(":", "", $2); for (h = 3; h <= NF; h++) print $2, h - 3, $h; next }
       on { on = 0 }' "$file" >"$tmp/$i.dat"
  [ -s "$tmp/$i.dat" ] || { echo "plot_head_cr: $file has no 'dmc CR per head' or 'dms CR per head' table" >&2; exit 1; }
  layers=$(awk 'END { print $1 + 1 }' "$tmp/$i.dat")
  heads=$(awk '$2 + 1 > n { n = $2 + 1 } END { print n }' "$tmp/$i.dat")
  panels+="set title '$name'
plot '$tmp/$i.dat' using 2:1:(log(\$3)/log(2)) with image notitle, \
     '' using 2:1:(sprintf('%.3g', \$3)):(\$3 > 64 ? 0 : 0xffffff) with labels font ',8' \
        tc rgb variable notitle
"
done
gnuplot <<GP
set terminal pngcairo size $((330 * $#)),360 font ',10'
set output '$out'
set multiplot layout 1,$#
set palette defined (0 '#440154', 1 '#3b528b', 2 '#21918c', 3 '#5ec962', 4 '#fde725')
set cbrange [0:9]
set cbtics ('1' 0, '2' 1, '4' 2, '8' 3, '16' 4, '32' 5, '64' 6, '128' 7, '256' 8, '512' 9)
set xrange [-0.5:$heads - 0.5]
set yrange [$layers - 0.5:-0.5]
set xtics 1
set ytics 1
set xlabel 'KV head'
set ylabel 'layer'
set size ratio -1
$panels
unset multiplot
GP
echo "plot_head_cr: $out"
