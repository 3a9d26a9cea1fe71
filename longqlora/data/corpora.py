"""The public-domain books shipped inside the package (see longqlora/data/README.md), read without downloads."""

from __future__ import annotations

import functools
import gzip
from importlib import resources

AUSTEN = ("emma", "mansfield_park", "northanger_abbey", "persuasion", "pride_and_prejudice", "sense_and_sensibility")
BOOKS = tuple(f"austen_{name}" for name in AUSTEN) + ("kjv_bible",)


@functools.cache
def book(name: str) -> str:
    """The full text of a bundled book, e.g. book("austen_persuasion")."""
    if name not in BOOKS:
        raise ValueError(f"unknown bundled book {name!r}; choose from {', '.join(BOOKS)}")
    with resources.files("longqlora").joinpath(f"data/{name}.txt.gz").open("rb") as f:
        return gzip.decompress(f.read()).decode("utf-8")


def book_path(name: str) -> str:
    """Filesystem path of a bundled book (a .txt.gz file: one document for `--dataset`)."""
    if name not in BOOKS:
        raise ValueError(f"unknown bundled book {name!r}; choose from {', '.join(BOOKS)}")
    return str(resources.files("longqlora").joinpath(f"data/{name}.txt.gz"))
