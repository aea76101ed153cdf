"""BIDS entity knowledge shared by the input side (``bids``), the output side
(``derivatives``), the group level (``learn.data``) and the simulator.

The one place that says which raw-file entities a derivative name keeps, their
short keys (``sub``, ``ses``, ...), what a valid label is, and the name of the
standard space. Nothing here reads or writes files.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from .errors import OutputError

#: the standard space of every template-space output (a BIDS ``space-`` label)
TEMPLATE_SPACE = "MNI152NLin2009aSym"
#: the raw-file entities every derivative name starts with, in BIDS order
SOURCE_ENTITIES = ("subject", "session", "acquisition", "direction", "run")
#: entity → its key in file names, and back
ENTITY_KEYS = {"subject": "sub", "session": "ses", "acquisition": "acq", "direction": "dir", "run": "run"}
KEY_ENTITIES = {key: entity for entity, key in ENTITY_KEYS.items()}
#: a BIDS label: ASCII letters and digits only
LABEL = re.compile(r"^[A-Za-z0-9]+$")


def is_label(value) -> bool:
    return bool(LABEL.match(str(value)))


@dataclass(frozen=True)
class Source:
    """The entities of one raw DWI run that every derivative name starts with."""

    subject: str
    session: str | None = None
    acquisition: str | None = None
    direction: str | None = None
    run: str | None = None

    def __post_init__(self):
        for key in SOURCE_ENTITIES:
            value = getattr(self, key)
            if value is not None and not is_label(value):
                raise OutputError(f"entity {key}={value!r} is not a BIDS label (letters and digits only)")

    @classmethod
    def from_entities(cls, entities: Mapping) -> "Source":
        return cls(**{k: (str(entities[k]) if entities.get(k) is not None else None)
                      for k in SOURCE_ENTITIES})

    @property
    def prefix(self) -> str:
        return "_".join(f"{ENTITY_KEYS[k]}-{getattr(self, k)}" for k in SOURCE_ENTITIES
                        if getattr(self, k) is not None)

    @property
    def key(self) -> str:
        """A short unique id for this run (node names, logs)."""
        return self.prefix.replace("-", "").replace("_", "-")

    def folder(self, root: os.PathLike) -> Path:
        path = Path(root) / f"sub-{self.subject}"
        if self.session:
            path = path / f"ses-{self.session}"
        return path / "dwi"
