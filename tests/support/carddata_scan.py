"""Find card secrets in files, byte by byte: the check behind invariant 6.

``scan(paths, secrets)`` reads every byte of each file (a database and its ``-wal`` and
``-shm``, log files; a directory means every file under it) and reports each place a
secret occurs, in any form it could plausibly have been written in:

* UTF-8 / ASCII, UTF-16-LE and UTF-16-BE (SQLite text in a UTF-16 database);
* for a PAN, also grouped by spaces or dashes (4-4-4-4, Amex 4-6-5), and as the integer
  SQLite stores when a PAN lands in a column with INTEGER or NUMERIC affinity
  (big-endian, 6 or 8 bytes), as 8-byte little-endian integer, as float64, and as
  packed BCD (how EMV keeps it);
* for an even-length hex secret (a PIN block, EMV track 2), also upper and lower case
  and the raw bytes it spells.

A finding names the secret by kind and, for a PAN, by its masked form; nothing here ever
prints a secret. Short secrets (a CVV) can coincide with unrelated digits in a file:
give test cards distinctive CVVs, and treat a finding as a lead to look at.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from edge.terminal.carddata import CardRead, Sensitive, mask_pan

__all__ = ["Finding", "card_secrets", "database_secrets", "describe", "scan", "sqlite_files"]

_PAN = re.compile(r"[0-9]{12,19}")
_HEX = re.compile(r"(?:[0-9A-Fa-f]{2}){4,}")


@dataclass(frozen=True)
class Finding:
    """One occurrence: which file, at which byte, which secret (kind and/or masked PAN),
    and the form it was written in (``utf-8``, ``utf-16-le``, ``grouped utf-8``...)."""

    path: Path
    offset: int
    secret: str
    form: str = ""

    def __str__(self) -> str:
        return f"{self.path}:{self.offset}: {self.secret} ({self.form})"


def card_secrets(card: CardRead) -> dict[str, str]:
    """The secrets of ``card`` that must never be written, by kind."""
    found = {"pan": card.pan.reveal()}
    for kind in ("cvv", "track2", "pin_block"):
        value = getattr(card, kind)
        if value is not None:
            found[kind] = value.reveal()
    return found


def database_secrets(cards: Mapping[str, CardRead]) -> dict[str, str]:
    """What a scan of a *database* looks for, per card: the PAN (in every form ``scan``
    knows) and, for the CVV, a stored value (``"9731"``, as JSON writes it) or a field
    named ``cvv``. A bare 3- or 4-digit CVV turns up by chance in the random hex of run
    ids, hashes and ciphertext (it made a suite run fail here), so scanning
    for it in a database is a coin toss, not a test; logs are scanned for it bare."""
    found: dict[str, str] = {"cvv field": "cvv"}
    for name, card in cards.items():
        for kind, value in card_secrets(card).items():
            found[f"{name} {kind}"] = f'"{value}"' if kind == "cvv" else value
    return found


def sqlite_files(db_path: Path) -> list[Path]:
    """The database file and whichever of its -wal, -shm and -journal exist."""
    siblings = [db_path.with_name(db_path.name + s) for s in ("-wal", "-shm", "-journal")]
    return [db_path, *(p for p in siblings if p.exists())]


def describe(findings: Iterable[Finding]) -> str:
    """One line per finding, for an assertion message (secrets masked)."""
    return "\n".join(str(f) for f in findings) or "no findings"


def scan(
    paths: Iterable[Path],
    secrets: Iterable[str | Sensitive] | Mapping[str, str | Sensitive],
) -> list[Finding]:
    """Every occurrence of every secret in every byte of ``paths``, in file order.

    ``secrets`` is a mapping kind -> value (``card_secrets(card)``), or plain values,
    which are then labelled ``secret #n``. A missing path raises: a scan that read
    nothing must not pass."""
    labelled = _labelled(secrets)
    needles = [(label, form, needle) for label, value in labelled for form, needle in _forms(value)]
    findings: list[Finding] = []
    for path in _files(paths):
        data = path.read_bytes()
        for label, form, needle in needles:
            start = data.find(needle)
            while start != -1:
                findings.append(Finding(path, start, label, form))
                start = data.find(needle, start + 1)
    findings.sort(key=lambda f: (str(f.path), f.offset, f.secret, f.form))
    return findings


def _labelled(
    secrets: Iterable[str | Sensitive] | Mapping[str, str | Sensitive],
) -> list[tuple[str, str]]:
    pairs = (
        list(secrets.items())
        if isinstance(secrets, Mapping)
        else [(f"secret #{i}", s) for i, s in enumerate(secrets, 1)]
    )
    out = []
    for kind, raw in pairs:
        value = raw.reveal() if isinstance(raw, Sensitive) else raw
        if not isinstance(value, str) or not value:
            # Never echo the value, even a wrong one.
            raise ValueError(f"{kind}: a secret must be a non-empty str or Sensitive")
        label = f"{kind} {mask_pan(value)}" if _PAN.fullmatch(value) else kind
        out.append((label, value))
    return out


def _forms(value: str) -> Iterator[tuple[str, bytes]]:
    is_pan = _PAN.fullmatch(value) is not None
    is_hex = _HEX.fullmatch(value) is not None
    texts = {"": value}
    if is_pan:
        for sep in (" ", "-"):
            texts[f"grouped {sep!r} "] = sep.join(_groups(value))
    elif is_hex:
        texts["lower-case "] = value.lower()
        texts["upper-case "] = value.upper()
    seen: set[bytes] = set()
    for prefix, text in texts.items():
        for encoding in ("utf-8", "utf-16-le", "utf-16-be"):
            needle = text.encode(encoding)
            if needle not in seen:
                seen.add(needle)
                yield prefix + encoding, needle
    if is_pan:
        number = int(value)
        # SQLite keeps an integer in the fewest of 1, 2, 3, 4, 6 or 8 bytes, big-endian.
        width = 6 if number < 2**47 else 8
        yield f"int{width * 8}-be (SQLite integer)", number.to_bytes(width, "big")
        if width != 8:
            yield "int64-be", number.to_bytes(8, "big")
        yield "int64-le", number.to_bytes(8, "little")
        yield "float64-be", struct.pack(">d", float(number))
        yield "float64-le", struct.pack("<d", float(number))
        # EMV keeps the PAN as packed BCD, padded with F to whole bytes (tag 5A).
        yield "packed BCD", bytes.fromhex(value + "F" * (len(value) % 2))
    elif is_hex:
        yield "raw bytes of hex", bytes.fromhex(value)


def _groups(pan: str) -> list[str]:
    if len(pan) == 15:  # Amex prints 4-6-5
        return [pan[:4], pan[4:10], pan[10:]]
    return [pan[i : i + 4] for i in range(0, len(pan), 4)]


def _files(paths: Iterable[Path]) -> Iterator[Path]:
    for path in paths:
        path = Path(path)
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            yield path
        else:
            raise FileNotFoundError(f"nothing to scan at {path}")
