"""Build a small Pile-format corpus (jsonl.zst) from English text that a package installs here.

Source, in order of preference:
  debian-doc : the reST sources of Debian's python3.X-doc package (html/_sources), one document
               per page, pile_set_name "PythonDocs/<top folder>";
  stdlib     : docstrings of the Python standard library's modules (always present),
               pile_set_name "StdlibDocstrings".
Nothing is downloaded; the output is deterministic (sorted inputs, no timestamps).

    python -m data_prep.corpus --out data/corpus
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import sysconfig
from pathlib import Path

import zstandard

DOC_ROOTS = [Path(f"/usr/share/doc/python3.{m}/html/_sources") for m in range(20, 8, -1)]


def debian_doc_root() -> Path | None:
    return next((p for p in DOC_ROOTS if p.is_dir()), None)


def debian_doc_documents(root: Path):
    for path in sorted(root.rglob("*.rst.txt")):
        rel = path.relative_to(root)
        group = rel.parts[0] if len(rel.parts) > 1 else "top"
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            yield text, f"PythonDocs/{group}"


def stdlib_documents():
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        docs = [ast.get_docstring(n) for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        text = "\n\n".join(d for d in docs if d)
        if len(text) > 200:
            yield text, "StdlibDocstrings"


def build(out: Path, source: str = "auto", files: int = 4, max_docs: int | None = None) -> list[Path]:
    root = debian_doc_root()
    if source == "debian-doc" and root is None:
        raise FileNotFoundError("no python3.X-doc sources under /usr/share/doc (apt-get install python3.11-doc)")
    use_debian = source == "debian-doc" or (source == "auto" and root is not None)
    docs = list(debian_doc_documents(root) if use_debian else stdlib_documents())[:max_docs]
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"corpus-{i:02d}.jsonl.zst" for i in range(files)]
    cctx = zstandard.ZstdCompressor(level=10)
    total = 0
    for i, path in enumerate(paths):
        lines = [json.dumps({"text": t, "meta": {"pile_set_name": s}}, ensure_ascii=False)
                 for t, s in docs[i::files]]
        data = ("\n".join(lines) + "\n").encode("utf-8")
        total += len(data)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(cctx.compress(data))
        os.replace(tmp, path)
    print(f"corpus: {len(docs)} documents, {total / 1e6:.1f} MB of text from "
          f"{root if use_debian else 'stdlib docstrings'} -> {out} ({files} jsonl.zst files)")
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("data/corpus"))
    ap.add_argument("--source", choices=["auto", "debian-doc", "stdlib"], default="auto")
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--max-docs", type=int, default=None)
    args = ap.parse_args(argv)
    build(args.out, args.source, args.files, args.max_docs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
