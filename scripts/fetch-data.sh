#!/usr/bin/env bash
# Fetch the real data sets the fine-tuning examples and tests use, into
# ${TINYTUNE_ASSETS:-$HOME/.cache/tinytune}/data/ (nothing here is committed; each file is
# skipped when it is already there with the expected number of rows).
#
#   scripts/fetch-data.sh
#   TINYTUNE_ASSETS=/data/tt scripts/fetch-data.sh
#
# What it writes (JSONL, UTF-8, one example a line, in the formats `tinytune::train::data` reads):
# - movie_reviews.jsonl: {"text", "label"}, the 10,605 movie-review sentences of Hutto & Gilbert,
#   "VADER" (ICWSM 2014), each rated by about 20 people from -4 to +4; label = 1 when the mean
#   rating is > 0, else 0 (5,242 positive, 5,363 not). Source: the sdist of vaderSentiment==3.3.2
#   on PyPI (MIT), additional_resources/hutto_ICWSM_2014.tar.gz, movieReviewSnippets_GroundTruth.txt
#   (UTF-8, CRLF lines "id<TAB>mean rating<TAB>sentence", ids 1..10605 in order, the last line
#   without a line end). Texts are kept as written (the source spells quotes as two apostrophes).
#   movie_reviews.train.jsonl / movie_reviews.eval.jsonl: a fixed split, the sentences whose id
#   is a multiple of 10 (1,060) to eval, the other 9,545 to train.
# - austen.jsonl: {"text", "book"}, Jane Austen's six novels (public domain), one paragraph a line
#   (the source's lines joined with spaces between blank lines; 10,298 paragraphs). Source: the
#   Debian package r-cran-janeaustenr 1.0.0 (MIT), whose data is an R lazy-load database
#   (data/Rdata.rdx: gzip'd serialized index of name -> (offset, length); data/Rdata.rdb: the
#   objects, each zlib-compressed R serialization, XDR format version 3), read by the small
#   stdlib-only reader of R's serialization format below.
#
# Needs: bash, python3 with pip (`pip download` installs nothing); for the Austen data, apt-get (Debian/Ubuntu; `apt-get
# download` needs no root) and dpkg-deb, without which it is skipped with a warning. Network: PyPI and
# the Debian mirror only.
set -euo pipefail

DEST="${TINYTUNE_ASSETS:-$HOME/.cache/tinytune}/data"
mkdir -p "$DEST"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

say() { printf 'fetch-data: %s\n' "$*"; }

PY="${PYTHON:-python3}"
if ! command -v "$PY" >/dev/null 2>&1; then
    say "error: $PY not found (set PYTHON=...)"; exit 1
fi

# The number of lines of a file, 0 when it does not exist.
rows() { if [ -f "$1" ]; then wc -l <"$1" | tr -d ' '; else echo 0; fi; }

# --- Movie-review sentences, labelled (vaderSentiment 3.3.2 sdist) ----------------------------
if [ "$(rows "$DEST/movie_reviews.jsonl")" = 10605 ] && [ "$(rows "$DEST/movie_reviews.train.jsonl")" = 9545 ] \
    && [ "$(rows "$DEST/movie_reviews.eval.jsonl")" = 1060 ]; then
    say "movie_reviews{,.train,.eval}.jsonl already present, skipping"
else
    say "downloading the sdist of vaderSentiment==3.3.2 (about 2.5 MB) from PyPI"
    "$PY" -m pip download --quiet --no-deps --no-binary :all: --disable-pip-version-check vaderSentiment==3.3.2 -d "$TMP/sdist"
    "$PY" - "$TMP/sdist/vaderSentiment-3.3.2.tar.gz" "$TMP" <<'EOF'
import io, json, os, sys, tarfile

sdist, tmp = sys.argv[1:]
inner_name = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
with tarfile.open(sdist) as outer:
    inner = outer.extractfile(inner_name).read()
with tarfile.open(fileobj=io.BytesIO(inner)) as t:
    raw = t.extractfile("hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt").read()

rows = []
for n, line in enumerate(raw.decode("utf-8").splitlines(), 1):
    if not line.strip():
        continue
    parts = line.split("\t")
    if len(parts) != 3:
        sys.exit(f"fetch-data: error: movieReviewSnippets_GroundTruth.txt line {n}: {len(parts)} tab-separated fields, expected 3")
    ident, rating, text = int(parts[0]), float(parts[1]), parts[2].strip()
    if not -4 <= rating <= 4 or not text:
        sys.exit(f"fetch-data: error: movieReviewSnippets_GroundTruth.txt line {n}: rating {rating} or empty text")
    rows.append((ident, {"text": text, "label": int(rating > 0)}))
if len(rows) != 10605 or [i for i, _ in rows] != list(range(1, 10606)):
    sys.exit(f"fetch-data: error: expected the 10,605 sentences with ids 1..10605, got {len(rows)}")
positive = sum(r["label"] for _, r in rows)
if positive != 5242:
    sys.exit(f"fetch-data: error: expected 5,242 positive sentences, got {positive}")

def write(name, selected):
    with open(os.path.join(tmp, name), "w", encoding="utf-8", newline="\n") as f:
        for _, r in selected:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")

write("movie_reviews.jsonl", rows)
write("movie_reviews.train.jsonl", [r for r in rows if r[0] % 10 != 0])
write("movie_reviews.eval.jsonl", [r for r in rows if r[0] % 10 == 0])
EOF
    for f in movie_reviews.jsonl movie_reviews.train.jsonl movie_reviews.eval.jsonl; do
        mv "$TMP/$f" "$DEST/$f"
    done
fi

# --- Jane Austen's novels (Debian r-cran-janeaustenr) ------------------------------------------
# Off Debian/Ubuntu (macOS, Fedora, Arch) there is no apt-get: the Austen data is skipped with a
# warning (the fine-tuning demo and the movie-review tests do not use it), unless the assets
# are required (CI sets TINYTUNE_REQUIRE_ASSETS=1).
if [ "$(rows "$DEST/austen.jsonl")" = 10298 ]; then
    say "austen.jsonl already present, skipping"
elif ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg-deb >/dev/null 2>&1; then
    if [ -n "${TINYTUNE_REQUIRE_ASSETS:-}" ]; then
        say "error: apt-get and dpkg-deb are needed for austen.jsonl (Debian package r-cran-janeaustenr)"; exit 1
    fi
    say "warning: no apt-get/dpkg-deb here: skipping austen.jsonl (Debian package r-cran-janeaustenr);"
    say "  only the Austen language-modelling tests, benches and scripts/compare-methods.py austen use it"
else
    say "downloading the Debian package r-cran-janeaustenr (about 1.6 MB)"
    # `apt-get download` writes into the current directory; as root it warns that the _apt user
    # cannot write there, which is harmless.
    # A fresh machine may have empty package lists: as root, refresh them once and retry.
    (cd "$TMP" && apt-get download -q r-cran-janeaustenr >/dev/null 2>"$TMP/apt.err") || {
        if [ "$(id -u)" = "0" ]; then
            say "refreshing the package lists (apt-get update) and retrying"
            apt-get update -qq >/dev/null 2>&1 || true
        fi
        (cd "$TMP" && apt-get download -q r-cran-janeaustenr >/dev/null 2>"$TMP/apt.err") || {
            cat "$TMP/apt.err" >&2
            say "error: apt-get download r-cran-janeaustenr failed (run apt-get update first?)"; exit 1
        }
    }
    dpkg-deb -x "$TMP"/r-cran-janeaustenr_*.deb "$TMP/deb"
    "$PY" - "$TMP/deb/usr/lib/R/site-library/janeaustenr/data/Rdata" "$TMP/austen.jsonl" <<'EOF'
import bz2, gzip, json, lzma, struct, sys, zlib


class RReader:
    """R's serialization format (R Internals, "Serialization formats"), binary XDR (big-endian),
    versions 2 and 3: enough of it for data objects. An item is a 32-bit flags word, type =
    flags & 0xFF, bit 9 = has attributes, bit 10 = has tag, bits 12.. = "levels" (for strings:
    the encoding), then its body: a length and the elements for vectors, CAR/CDR for pairlists."""

    def __init__(self, data):
        self.d, self.p, self.refs = data, 0, []
        head = self.take(2)
        if head != b"X\n":
            raise ValueError(f"not R's binary XDR serialization (starts with {head!r})")
        version = self.int()
        self.int(), self.int()  # the writer's R version, the minimal reader's
        if version == 3:
            self.take(self.int())  # the native encoding's name
        elif version != 2:
            raise ValueError(f"serialization version {version} is not 2 or 3")

    def take(self, n):
        if self.p + n > len(self.d):
            raise ValueError(f"truncated: {n} bytes wanted at offset {self.p} of {len(self.d)}")
        b = self.d[self.p:self.p + n]
        self.p += n
        return b

    def int(self):
        return struct.unpack(">i", self.take(4))[0]

    def length(self):
        n = self.int()
        if n == -1:  # a long vector: the length in two more words
            hi, lo = self.int(), self.int()
            n = (hi << 32) + lo
        return n

    def string(self, flags):
        n = self.int()
        if n == -1:
            return None  # NA_character_
        raw = self.take(n)
        return raw.decode("latin-1" if (flags >> 12) & 4 else "utf-8")  # LATIN1 bit; else UTF-8/ASCII

    def item(self):
        flags = self.int()
        t = flags & 0xFF
        if t in (254, 253, 252, 251, 250, 242, 241):  # NULL and the fixed environments
            return None
        if t == 255:  # a reference to an earlier symbol or environment
            i = flags >> 8
            return self.refs[(i or self.int()) - 1]
        if t == 1:  # symbol: its name
            sym = ("sym", self.item())
            self.refs.append(sym)
            return sym
        if t == 9:
            return self.string(flags)
        if t in (2, 6, 239, 240):  # pairlist or call: (tag, value) cells until a non-cell CDR
            cells = []
            while t in (2, 6, 239, 240):
                if flags & (1 << 9):
                    self.item()  # the cell's attributes
                tag = self.item() if flags & (1 << 10) else None
                cells.append((tag[1] if tag else None, self.item()))
                flags = self.int()
                t = flags & 0xFF
            self.p -= 4
            self.item()  # the terminating CDR
            return cells
        if t in (10, 13, 14):  # logical, integer, double
            n = self.length()
            fmt, size = (">%dd" % n, 8) if t == 14 else (">%di" % n, 4)
            return self.vector(list(struct.unpack(fmt, self.take(size * n))), flags)
        if t == 16:  # character vector: n strings, each with its own flags word
            return self.vector([self.string(self.int()) for _ in range(self.length())], flags)
        if t in (19, 20):  # list, expression
            return self.vector([self.item() for _ in range(self.length())], flags)
        if t == 238:  # ALTREP: (class, package, type), state, attributes
            info, state, attrs = self.item(), self.item(), self.item()
            cls = info[0][1][1]
            if cls == "compact_intseq":
                n, start, step = state
                v = [int(start + i * step) for i in range(int(n))]
            elif cls.startswith("wrap_"):
                v = state[0]
            else:
                raise ValueError(f"ALTREP class {cls} is not supported")
            return Vec(v, attrs)
        raise ValueError(f"R type {t} at offset {self.p - 4} is not supported (only data objects are)")

    def vector(self, v, flags):
        return Vec(v, self.item() if flags & (1 << 9) else None)


class Vec(list):
    """An R vector with its attributes (names, class, ...) as a dict."""

    def __init__(self, v, attrs):
        super().__init__(v)
        self.attrs = dict(attrs) if attrs else {}


def lazy_load(prefix):
    """Every object of the lazy-load database prefix.rdx + prefix.rdb, as name -> value. The .rdx
    is a gzip'd serialization of list(variables = <name -> c(offset, length)>, references, compressed);
    each .rdb entry is a 4-byte big-endian length of the serialization, then its zlib stream
    (compressed = 1) or a type byte ('Z' xz, '2' bzip2, '0' stored) and the stream (2 or 3)."""
    index = RReader(gzip.open(prefix + ".rdx").read()).item()
    fields = dict(zip(index.attrs["names"], index))
    compressed = fields.get("compressed", [1])[0]
    compressed = 1 if compressed is True else int(compressed)
    with open(prefix + ".rdb", "rb") as f:
        rdb = f.read()
    variables = fields["variables"]
    out = {}
    for name, (offset, size) in zip(variables.attrs["names"], variables):
        blob = rdb[int(offset):int(offset) + int(size)]
        n = struct.unpack(">I", blob[:4])[0]
        if compressed == 1:
            data = zlib.decompress(blob[4:])
        else:
            data = {b"Z": lzma.decompress, b"2": bz2.decompress, b"0": bytes}[blob[4:5]](blob[5:])
        if len(data) != n:
            raise ValueError(f"{name}: decompressed to {len(data)} bytes, the entry says {n}")
        out[name] = RReader(data).item()
    return out


prefix, out = sys.argv[1:]
books = lazy_load(prefix)
# name in the package -> (title, number of lines, number of paragraphs)
expected = {
    "sensesensibility": ("Sense & Sensibility", 12624, 1864),
    "prideprejudice": ("Pride & Prejudice", 13030, 2126),
    "mansfieldpark": ("Mansfield Park", 15349, 1841),
    "emma": ("Emma", 16235, 2376),
    "northangerabbey": ("Northanger Abbey", 7856, 1056),
    "persuasion": ("Persuasion", 8328, 1035),
}
with open(out, "w", encoding="utf-8", newline="\n") as f:
    for name, (title, n_lines, n_paragraphs) in expected.items():
        lines = books.get(name)
        if lines is None or len(lines) != n_lines or not all(isinstance(l, str) for l in lines):
            sys.exit(f"fetch-data: error: {name}: expected {n_lines} lines of text, got {None if lines is None else len(lines)}")
        paragraphs, current = [], []
        for line in lines + [""]:
            if line.strip():
                current.append(line.strip())
            elif current:
                paragraphs.append(" ".join(current))
                current = []
        if len(paragraphs) != n_paragraphs:
            sys.exit(f"fetch-data: error: {name}: expected {n_paragraphs} paragraphs, got {len(paragraphs)}")
        for p in paragraphs:
            f.write(json.dumps({"text": p, "book": title}, ensure_ascii=False) + "\n")
EOF
    mv "$TMP/austen.jsonl" "$DEST/austen.jsonl"
fi

for f in movie_reviews.jsonl movie_reviews.train.jsonl movie_reviews.eval.jsonl austen.jsonl; do
    [ -e "$DEST/$f" ] || continue
    say "$DEST/$f: $(rows "$DEST/$f") rows, $(wc -c <"$DEST/$f" | tr -d ' ') bytes"
done
