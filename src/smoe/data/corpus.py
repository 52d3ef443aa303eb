"""Corpora: documents tagged with a domain, the default two-domain corpus, and user files.

The default corpus has two domains, read from files a fresh machine gets from package
registries (nothing is downloaded at run time):

* ``prose``: Jane Austen's six completed novels (Project Gutenberg texts, public domain), from
  the Debian package ``r-cran-janeaustenr`` (MIT-licensed R data package). Read directly from
  its lazy-load data base by :mod:`smoe.data.rdata`; R itself is never run.
* ``code``: Python source files of the running interpreter's standard library (PSF License),
  without tests, ``site-packages`` and generated tables, sampled deterministically up to about
  the size of the prose domain.

See :data:`PROVENANCE` and :attr:`Corpus.sources` for the exact packages, paths and licences.
"""

from __future__ import annotations

import gzip
import hashlib
import sys
import sysconfig
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from smoe.data.rdata import read_lazyload_db

__all__ = [
    "DOMAINS",
    "CODE_SUFFIXES",
    "TEXT_SUFFIXES",
    "AUSTEN_INSTALL_COMMAND",
    "PROVENANCE",
    "Document",
    "Source",
    "Corpus",
    "default_corpus",
    "prose_corpus",
    "code_corpus",
    "load_path",
    "load_paths",
    "find_austen",
]

#: Domain names, in the order of their ids in token-domain tensors.
DOMAINS = ("prose", "code")
#: Files with these suffixes are the ``code`` domain when a folder is loaded; the rest ``prose``.
CODE_SUFFIXES = frozenset(
    {".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".rs", ".go", ".java", ".js", ".ts",
     ".sh", ".rb", ".lua", ".jl", ".r", ".sql", ".toml", ".yaml", ".yml", ".json", ".cfg"}
)  # fmt: skip
#: Suffixes picked up when a folder is loaded (a file named directly is read whatever its name).
TEXT_SUFFIXES = CODE_SUFFIXES | {".txt", ".md", ".rst", ".text", ".tex", ".csv", ".html"}

#: The command that installs the default prose domain on Debian/Ubuntu (as root).
AUSTEN_INSTALL_COMMAND = (
    "apt-get update && apt-get install -y --no-install-recommends r-cran-janeaustenr"
)
_AUSTEN_PACKAGE = "r-cran-janeaustenr"
#: Installed R library folders searched for the janeaustenr package, in order.
_R_LIBRARIES = ("/usr/lib/R/site-library", "/usr/local/lib/R/site-library", "/usr/lib/R/library")
#: The novels in publication order, as named in the R package.
_AUSTEN_NOVELS = (
    ("sensesensibility", "Sense and Sensibility (1811)"),
    ("prideprejudice", "Pride and Prejudice (1813)"),
    ("mansfieldpark", "Mansfield Park (1814)"),
    ("emma", "Emma (1815)"),
    ("northangerabbey", "Northanger Abbey (1817)"),
    ("persuasion", "Persuasion (1817)"),
)
#: Standard-library folders left out of the code domain: tests, installed packages, generated
#: tables (codecs), and the HTML-derived help text of ``pydoc_data`` (prose in a .py file).
_STDLIB_EXCLUDED = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
     "encodings", "pydoc_data"}
)  # fmt: skip

PROVENANCE = f"""\
Default smoe corpus: two domains, both from packages installed by the setup step.

prose: Jane Austen's six completed novels (Sense and Sensibility, Pride and Prejudice,
  Mansfield Park, Emma, Northanger Abbey, Persuasion), about 4.0 MB of UTF-8 text.
  Package: Debian '{_AUSTEN_PACKAGE}' (CRAN 'janeaustenr' by Julia Silge), read from
  <R library>/janeaustenr/data/Rdata.rdb. Licence: the novels (1811-1817) are in the public
  domain (texts from Project Gutenberg, header and licence boilerplate removed by the package);
  the package itself is MIT (/usr/share/doc/{_AUSTEN_PACKAGE}/copyright).
  Install: {AUSTEN_INSTALL_COMMAND}

code: Python source files (*.py) of the running interpreter's standard library
  (sysconfig.get_paths()['stdlib']), without the folders {sorted(_STDLIB_EXCLUDED)}.
  Files are ranked by SHA-256 of their relative path and taken in that order until the domain
  holds about as many bytes as the prose domain, then kept in path order. Licence: Python
  Software Foundation License Version 2, PSF-2.0 (LICENSE.txt in the stdlib folder). It
  depends on the Python version, which the provenance records.
"""


@dataclass(frozen=True)
class Document:
    """One text with its domain (``prose``, ``code``, or a name of the user's) and its origin."""

    text: str
    domain: str
    source: str

    def __post_init__(self) -> None:
        if not isinstance(self.domain, str) or not self.domain:
            raise ValueError(f"domain={self.domain!r} is invalid: must be a non-empty string")


@dataclass(frozen=True)
class Source:
    """Where one domain of a corpus came from."""

    domain: str
    name: str
    version: str
    path: str
    licence: str
    num_bytes: int


@dataclass(frozen=True)
class Corpus:
    """Documents in a fixed order, and the sources they came from."""

    documents: tuple[Document, ...]
    sources: tuple[Source, ...] = ()

    def __post_init__(self) -> None:
        if not self.documents:
            raise ValueError("documents=() is invalid: a corpus needs at least one document")

    @property
    def domains(self) -> tuple[str, ...]:
        """Domain names present: those of :data:`DOMAINS` first, then others sorted."""
        present = {d.domain for d in self.documents}
        return tuple(d for d in DOMAINS if d in present) + tuple(sorted(present - set(DOMAINS)))

    def num_bytes(self, domain: str | None = None) -> int:
        """UTF-8 bytes of all documents, or of one domain's."""
        return sum(
            len(d.text.encode("utf-8"))
            for d in self.documents
            if domain is None or d.domain == domain
        )

    def fingerprint(self) -> str:
        """SHA-256 over every document's domain, source and text (a cache key)."""
        h = hashlib.sha256()
        for d in self.documents:
            for part in (d.domain, d.source, d.text):
                data = part.encode("utf-8", errors="surrogatepass")
                h.update(len(data).to_bytes(8, "little"))
                h.update(data)
        return h.hexdigest()


def find_austen(libraries: Sequence[str | Path] = _R_LIBRARIES) -> Path | None:
    """The installed ``janeaustenr`` R package folder, or ``None``."""
    for lib in libraries:
        folder = Path(lib) / "janeaustenr"
        if (folder / "data" / "Rdata.rdb").is_file():
            return folder
    return None


def _debian_version(package: str) -> str:
    """The Debian version of an installed package, from the head of its changelog."""
    changelog = Path("/usr/share/doc") / package / "changelog.Debian.gz"
    try:
        with gzip.open(changelog, "rt", encoding="utf-8", errors="replace") as f:
            first = f.readline()
    except OSError:
        return "unknown"
    return first.split("(", 1)[1].split(")", 1)[0] if "(" in first else "unknown"


def _description_field(folder: Path, field: str) -> str:
    try:
        for line in (folder / "DESCRIPTION").read_text(encoding="utf-8").splitlines():
            if line.startswith(field + ":"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def prose_corpus(folder: str | Path | None = None) -> tuple[list[Document], Source]:
    """Jane Austen's six novels, one document each, in publication order.

    ``folder`` is the installed ``janeaustenr`` package; by default the R libraries are
    searched. Raises ``FileNotFoundError`` with the install command when it is missing.
    """
    folder = Path(folder) if folder is not None else find_austen()
    if folder is None or not (folder / "data" / "Rdata.rdb").is_file():
        where = folder if folder is not None else " or ".join(_R_LIBRARIES)
        raise FileNotFoundError(
            f"the default prose corpus (Debian package {_AUSTEN_PACKAGE}) is not installed "
            f"(looked in {where}). Install it as root with: {AUSTEN_INSTALL_COMMAND} "
            "-- or pass your own files or folders as data paths."
        )
    variables = read_lazyload_db(folder / "data" / "Rdata")
    docs = []
    for name, title in _AUSTEN_NOVELS:
        lines = variables.get(name)
        if not lines:
            raise ValueError(f"{folder} has no novel {name!r}: not the expected janeaustenr data")
        text = "\n".join(line or "" for line in lines) + "\n"
        docs.append(Document(text, "prose", f"janeaustenr:{name} ({title})"))
    upstream = _description_field(folder, "Version")
    version = f"{_debian_version(_AUSTEN_PACKAGE)} (janeaustenr {upstream})"
    source = Source(
        domain="prose",
        name=_AUSTEN_PACKAGE,
        version=version,
        path=str(folder / "data" / "Rdata.rdb"),
        licence="public domain (novels, 1811-1817, Project Gutenberg texts); package MIT",
        num_bytes=sum(len(d.text.encode("utf-8")) for d in docs),
    )
    return docs, source


def _stdlib_files(root: Path) -> list[Path]:
    files = []
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).parts
        if not set(parts[:-1]) & _STDLIB_EXCLUDED and path.is_file():
            files.append(path)
    return files


def code_corpus(
    max_bytes: int | None, root: str | Path | None = None
) -> tuple[list[Document], Source]:
    """Python standard-library sources, up to about ``max_bytes`` UTF-8 bytes (``None``: all).

    Files are ranked by SHA-256 of their relative path (a spread over the whole library, the
    same on every machine with the same Python), taken until ``max_bytes`` is reached, and
    returned in path order.
    """
    if max_bytes is not None and (isinstance(max_bytes, bool) or max_bytes <= 0):
        raise ValueError(f"max_bytes={max_bytes!r} is invalid: must be a positive int or None")
    root = Path(root) if root is not None else Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"Python standard library folder {root} does not exist")

    def rank(path: Path) -> bytes:
        return hashlib.sha256(path.relative_to(root).as_posix().encode()).digest()

    chosen: list[tuple[str, str]] = []
    total = 0
    for path in sorted(_stdlib_files(root), key=rank):
        if max_bytes is not None and total >= max_bytes:
            break
        text = path.read_bytes().decode("utf-8", errors="replace")
        if text.strip():
            chosen.append((path.relative_to(root).as_posix(), text))
            total += len(text.encode("utf-8"))
    if not chosen:
        raise ValueError(f"Python standard library folder {root} has no usable .py files")
    chosen.sort()
    docs = [Document(text, "code", f"stdlib:{rel}") for rel, text in chosen]
    version = f"Python {sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    source = Source(
        domain="code",
        name="python-stdlib",
        version=version,
        path=str(root),
        licence="PSF-2.0 (Python Software Foundation License Version 2)",
        num_bytes=total,
    )
    return docs, source


def default_corpus(
    code_bytes: int | None = None, austen_folder: str | Path | None = None
) -> Corpus:
    """The default two-domain corpus: Austen's novels (``prose``) and stdlib code (``code``).

    ``code_bytes`` caps the code domain; by default it matches the prose domain's size.
    Raises ``FileNotFoundError`` naming the install command if the prose package is missing.
    """
    prose, prose_source = prose_corpus(austen_folder)
    budget = prose_source.num_bytes if code_bytes is None else code_bytes
    code, code_source = code_corpus(budget)
    return Corpus(tuple(prose + code), (prose_source, code_source))


def _read_text(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace")


def _domain_of(path: Path, domain: str | None) -> str:
    if domain is not None:
        return domain
    return "code" if path.suffix.lower() in CODE_SUFFIXES else "prose"


def load_path(path: str | Path, domain: str | None = None) -> list[Document]:
    """Documents from one file or from every text file under one folder.

    A folder is walked recursively in sorted path order, taking files whose suffix is in
    :data:`TEXT_SUFFIXES` and skipping hidden entries, ``__pycache__``, empty and binary (NUL
    bytes) files. Text is read as UTF-8 with undecodable bytes replaced. The domain is
    ``domain`` if given, else ``code`` for :data:`CODE_SUFFIXES` and ``prose`` otherwise.

    Raises ``FileNotFoundError`` if the path does not exist and ``ValueError`` if the file is
    empty or the folder holds no non-empty text file; both messages name the path.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data path {str(path)!r} does not exist")
    if path.is_file():
        text = _read_text(path)
        if not text.strip():
            raise ValueError(f"data path {str(path)!r} is an empty file")
        return [Document(text, _domain_of(path, domain), str(path))]
    if not path.is_dir():
        raise ValueError(f"data path {str(path)!r} is neither a file nor a folder")
    docs = []
    for file in sorted(path.rglob("*"), key=lambda p: p.relative_to(path).as_posix()):
        parts = file.relative_to(path).parts
        if any(p.startswith(".") or p == "__pycache__" for p in parts) or not file.is_file():
            continue
        if file.suffix.lower() not in TEXT_SUFFIXES:
            continue
        raw = file.read_bytes()
        if b"\x00" in raw:
            continue
        text = raw.decode("utf-8", errors="replace")
        if text.strip():
            docs.append(Document(text, _domain_of(file, domain), str(file)))
    if not docs:
        raise ValueError(
            f"data path {str(path)!r} is a folder with no non-empty text file "
            f"(suffixes read: {', '.join(sorted(TEXT_SUFFIXES))})"
        )
    return docs


def load_paths(paths: Iterable[str | Path], domain: str | None = None) -> Corpus:
    """A corpus of the documents under several files or folders, in the order given."""
    paths = list(paths)
    if not paths:
        raise ValueError("paths=[] is invalid: give at least one file or folder")
    docs: list[Document] = []
    for p in paths:
        docs.extend(load_path(p, domain))
    return Corpus(tuple(docs))
