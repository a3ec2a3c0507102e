"""The demo model's training data, rebuilt from text every Python installation has.

The language reference topics in ``pydoc_data`` and the docstrings of the pure-Python
standard library (read with ``ast``: no module is imported or run). A fixed 5% of the
documents, chosen by a hash of their names, is held out and never trained on. Used by
scripts/train_demo.py (training) and tests/test_demo.py (held-out quality): no torch here.
"""
from __future__ import annotations

import ast
import hashlib
import platform
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

HELDOUT_FRACTION = 0.05
# stdlib modules left out: the test suite, turtle's demo scripts, encodings' boilerplate
# codec modules, ensurepip, and pydoc_data (its topics are read directly)
DENY_MODULES = {"encodings", "ensurepip", "pydoc_data", "test", "turtledemo"}
SKIP_DIRS = {"__pycache__", "test", "tests", "idle_test"}
DOC_SEPARATOR = "\n\n"


def topic_documents() -> list[tuple[str, str]]:
    """The language reference topics: [("topic:<name>", text)] sorted by name."""
    from pydoc_data.topics import topics
    return [(f"topic:{name}", topics[name].strip()) for name in sorted(topics)]


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    return f"({ast.unparse(node.args)})"


def _docstrings(body: list[ast.stmt], prefix: str) -> list[str]:
    """Headed docstrings of the classes, functions and methods in body, in source order."""
    parts = []
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            name = f"{prefix}.{node.name}"
            doc = ast.get_docstring(node, clean=True)
            if isinstance(node, ast.ClassDef):
                if doc:
                    parts.append(f"class {name}\n{doc}")
                parts.extend(_docstrings(node.body, name))
            elif doc:
                parts.append(f"{name}{_signature(node)}\n{doc}")
    return parts


def module_document(module: str, path: Path) -> str:
    """Module docstring plus its class and function docstrings; "" when it has none or does not parse."""
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, OSError):
        return ""
    parts = _docstrings(tree.body, module)
    doc = ast.get_docstring(tree, clean=True)
    if doc:
        parts.insert(0, f"Module {module}\n{doc}")
    return DOC_SEPARATOR.join(parts)


def stdlib_sources() -> list[tuple[str, Path]]:
    """(dotted module name, .py file) of the pure-Python stdlib, sorted; nothing is imported.

    Files are looked up in the standard library's own directory, never through the import
    system, so installed packages that shadow a stdlib name (setuptools' distutils) cannot
    change the data.
    """
    if not hasattr(sys, "stdlib_module_names"):
        raise RuntimeError("the demo corpus needs Python 3.10+ (sys.stdlib_module_names)")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = []
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in DENY_MODULES:
            continue
        if (stdlib / f"{name}.py").is_file():
            sources.append((name, stdlib / f"{name}.py"))
            continue
        root = stdlib / name
        if not (root / "__init__.py").is_file():
            continue
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root)
            if SKIP_DIRS.intersection(rel.parts[:-1]):
                continue
            parts = [name, *rel.parts[:-1]]
            if rel.stem != "__init__":
                parts.append(rel.stem)
            sources.append((".".join(parts), path))
    return sources


def stdlib_documents() -> list[tuple[str, str]]:
    """[("module:<dotted name>", docstrings)] for every stdlib source file with docstrings."""
    documents = []
    for module, path in stdlib_sources():
        text = module_document(module, path)
        if text:
            documents.append((f"module:{module}", text))
    return documents


@dataclass
class Corpus:
    """The byte streams, the split and the facts the sidecar records."""

    train: bytes
    heldout: bytes
    heldout_names: list[str]
    n_documents: int

    def facts(self) -> dict:
        return {
            "sources": ["pydoc_data.topics.topics (language reference topics)",
                        "docstrings of the pure-Python standard library, parsed with ast"],
            "python_version": platform.python_version(),
            "n_documents": self.n_documents,
            "n_heldout_documents": len(self.heldout_names),
            "train_bytes": len(self.train),
            "heldout_bytes": len(self.heldout),
            "train_sha256": hashlib.sha256(self.train).hexdigest(),
            "heldout_sha256": hashlib.sha256(self.heldout).hexdigest(),
            "heldout_rule": "documents ordered by sha256(name), taken until >= 5% of all bytes",
        }


def split_documents(documents: list[tuple[str, str]],
                    fraction: float = HELDOUT_FRACTION) -> tuple[list[str], list[str]]:
    """Names of (train, held-out) documents: held out by SHA-256 of the name until >= fraction of bytes."""
    sizes = {name: len(text.encode("utf-8")) for name, text in documents}
    target = fraction * sum(sizes.values())
    heldout, taken = set(), 0
    for name in sorted(sizes, key=lambda n: hashlib.sha256(n.encode("utf-8")).hexdigest()):
        if taken >= target:
            break
        heldout.add(name)
        taken += sizes[name]
    train = [name for name, _ in documents if name not in heldout]
    return train, [name for name, _ in documents if name in heldout]


def build_corpus() -> Corpus:
    """Collect, split and encode the data; the same Python version always gives the same bytes."""
    documents = topic_documents() + stdlib_documents()
    texts = dict(documents)
    if len(texts) != len(documents):
        raise RuntimeError("duplicate document names")
    train_names, heldout_names = split_documents(documents)

    def stream(names: list[str]) -> bytes:
        return "".join(texts[name] + DOC_SEPARATOR for name in names).encode("utf-8")

    return Corpus(stream(train_names), stream(heldout_names), heldout_names, len(documents))
