"""Reading dataset rows from local files (JSONL, JSON, parquet; a file or a folder) or the Hugging Face hub.

Every row comes with an id that names where it came from, so that an error about a bad row can point at it:
``file:line`` for JSONL (lines counted from 1, as editors do), ``file#index`` for parquet and JSON arrays and
``dataset[split]#index`` for the hub (indices counted from 0, as ``datasets`` does).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Iterator, Tuple

from .example import DataError

Row = Tuple[str, Dict[str, Any]]
FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


def looks_local(source: str) -> bool:
    """A source with a data-file suffix or a path prefix is a local path; anything else is a hub name."""
    return source.endswith(FILE_SUFFIXES) or source.startswith(("/", "./", "../", "~")) or Path(source).exists()


def check_source(field: str, source: str) -> None:
    """Fail early, naming the config field, when a local dataset path does not exist."""
    if looks_local(source) and not Path(source).expanduser().exists():
        raise DataError(f"{field}: dataset path {source!r} does not exist")


def iter_rows(source: str, split: str = "train") -> Iterator[Row]:
    """Rows of a local file or folder, or of a hub dataset ``name`` (optionally ``name:config``) at ``split``."""
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in FILE_SUFFIXES)
        if not files:
            raise DataError(f"dataset folder {path} holds no {'/'.join(FILE_SUFFIXES)} files")
        for file in files:
            yield from _file_rows(file)
    elif looks_local(source):
        check_source("dataset", source)
        yield from _file_rows(path)
    else:
        yield from _hub_rows(source, split)


def _file_rows(path: Path) -> Iterator[Row]:
    if path.suffix == ".parquet":
        import datasets

        try:
            table = datasets.Dataset.from_parquet(str(path))
        except Exception as error:  # pyarrow raises many types; the user needs the file named
            raise DataError(f"{path}: not a readable parquet file ({type(error).__name__}: {error})") from error
        for index, row in enumerate(table):
            yield f"{path}#{index}", row
        return
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {data[error.start]:#04x} at offset {error.start}); "
                        "save the file as UTF-8") from None
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None
        for index, row in enumerate(rows):
            yield f"{path}#{index}", row
        return
    # Split on "\n" only: str.splitlines also breaks at U+2028 and the like, which JSON strings may hold
    # unescaped, and would then misparse the row and misnumber every later line.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{number}: a row must be a JSON object, got {type(row).__name__}")
        yield f"{path}:{number}", row


def _hub_rows(source: str, split: str) -> Iterator[Row]:
    import datasets

    name, _, config = source.partition(":")
    try:
        table = datasets.load_dataset(name, config or None, split=split)
    except Exception as error:  # datasets raises many types; the user needs the source named
        raise DataError(f"cannot load dataset {source!r} (split {split!r}): not a local file and not loadable "
                        f"from the hub: {error}") from error
    for index, row in enumerate(table):
        yield f"{source}[{split}]#{index}", row
