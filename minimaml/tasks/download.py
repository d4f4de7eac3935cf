"""Fetch one file from a URL into a folder: atomic, resumable, md5-checked; standard library only.

``fetch(url, folder, filename, md5)``:

- the bytes go to ``<folder>/<filename>.part``, renamed to ``<filename>`` only once complete and checked,
  so ``<filename>`` is never half-written;
- an interrupted transfer (the connection drops, fewer bytes than the server announced) is continued
  with an HTTP ``Range`` request, up to ``attempts`` times in one call; a ``.part`` left by an earlier
  call is continued the same way. A server that ignores ``Range`` (answers 200) is read from the start;
- the complete file's md5 must equal ``md5``: otherwise the bad file is removed and ``DownloadError``
  names the URL, the expected and the actual md5;
- offline, or when the server fails, ``DownloadError`` names the URL and the folder where the file can
  be put by hand;
- bounded: with the expected ``size``, a server that sends more bytes (or announces another size) is
  cut off with ``DownloadError``; each attempt has a deadline (``seconds``), so a server that trickles
  bytes cannot hang it: the attempt counts as interrupted and the next one continues the ``.part``.

Two processes fetching the same file into the same folder at once are not supported (one ``.part``).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

from minimaml.tasks.datadir import DataError

CHUNK = 1 << 20
TIMEOUT = 60.0  # seconds without a byte before a connection counts as failed
ATTEMPT_SECONDS = 600.0  # one attempt's deadline, however the bytes come


class DownloadError(DataError):
    """A download failed; the message names the URL and where the file can be put by hand."""


class Interrupted(OSError):
    """The transfer stopped before the end; the ``.part`` file holds what arrived, for a resume."""


def fetch(url: str, folder, filename: str, md5: str, size: int | None = None, attempts: int = 3, transfer=None,
          seconds: float = ATTEMPT_SECONDS) -> Path:
    """``<folder>/<filename>``, downloaded from ``url`` unless it exists, checked against ``md5`` (and its
    ``size`` in bytes, when known: no more is ever written).

    ``transfer(url, part, size=size, seconds=seconds)`` moves the bytes into the ``.part`` file (default
    ``http_transfer``; tests may pass another). Raises ``DownloadError``.
    """
    folder = Path(folder)
    target = folder / filename
    if target.exists():
        return target
    by_hand = f"put {filename} (md5 {md5}) into {folder}/ by hand"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DownloadError(f"{folder}: cannot create the folder to download {url} into ({err}); {by_hand}") from err
    if not os.access(folder, os.W_OK):
        raise DownloadError(f"{folder}: the folder is not writable, so {url} cannot be downloaded into it; "
                            f"choose another data folder (MINIMAML_DATA), or {by_hand}")
    part = folder / f"{filename}.part"
    transfer = transfer or http_transfer
    for attempt in range(1, attempts + 1):
        try:
            transfer(url, part, size=size, seconds=seconds)
            break
        except Interrupted as err:
            if attempt == attempts:
                raise DownloadError(f"{url}: the download stopped early on each of {attempts} tries (last: {err}); "
                                    f"run again to resume {part}, or {by_hand}") from err
        except TooLarge as err:
            part.unlink(missing_ok=True)
            raise DownloadError(f"{url}: {err}; removed the download. Check the URL, or {by_hand}") from err
        except (OSError, http.client.HTTPException) as err:  # URLError, HTTPError, timeouts are OSErrors
            if part.exists() and part.stat().st_size == 0:
                part.unlink()
            raise DownloadError(f"could not download {url}: {_reason(err)}. If this machine is offline, "
                                f"download it elsewhere and {by_hand}") from err
    actual = file_md5(part)
    if actual != md5:
        part.unlink()
        raise DownloadError(f"{url}: downloaded md5 {actual}, expected {md5}; removed the download, "
                            f"{target} not written")
    os.replace(part, target)
    return target


class TooLarge(OSError):
    """The server sends (or announces) more bytes than the file has."""


def http_transfer(url: str, part: Path, timeout: float = TIMEOUT, size: int | None = None,
                  seconds: float = ATTEMPT_SECONDS) -> None:
    """Write ``url``'s bytes into ``part``, continuing an existing ``part`` with a ``Range`` request.

    Raises ``Interrupted`` when fewer bytes arrive than the server announced (``part`` keeps them) or
    ``seconds`` pass first, ``TooLarge`` when the file would exceed ``size`` bytes (nothing past ``size``
    is written), ``urllib.error.URLError`` / ``OSError`` when there is no answer or the server fails.
    """
    deadline = time.monotonic() + seconds
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code != 416 or not offset:
            raise
        # Range not satisfiable: the .part is already whole (the md5 check decides), or it is too long.
        total = _total_size(err.headers.get("Content-Range"))
        err.close()
        if total == offset:
            return
        part.unlink()
        raise Interrupted(f"{part} did not match the file on the server; starting over") from err
    with response:
        if offset and response.status == 206:
            start = _range_start(response.headers.get("Content-Range"))
            if start != offset:
                part.unlink()
                raise Interrupted(f"the server resumed at byte {start}, not {offset}; starting over")
            mode = "ab"
        else:  # a fresh download, or the server ignored Range and sends the whole file
            mode, offset = "wb", 0
        length = response.headers.get("Content-Length")
        expected = offset + int(length) if length and length.isdigit() else None
        if size is not None and expected is not None and expected != size:
            raise TooLarge(f"the server announces {expected} bytes, the file has {size}")
        with open(part, mode) as out:
            try:
                while chunk := response.read1(CHUNK):  # whatever has arrived: the deadline is checked often
                    if size is not None and out.tell() + len(chunk) > size:
                        out.write(chunk[:size - out.tell()])
                        raise TooLarge(f"the server sent more than the file's {size} bytes")
                    out.write(chunk)
                    if time.monotonic() > deadline:
                        raise Interrupted(f"only {out.tell()} bytes after {seconds:g} s (this attempt's deadline)")
            except (OSError, http.client.HTTPException) as err:
                if isinstance(err, (Interrupted, TooLarge)):
                    raise
                raise Interrupted(f"connection lost after {out.tell()} bytes: {_reason(err)}") from err
    size = part.stat().st_size
    if expected is not None and size < expected:
        raise Interrupted(f"received {size} of {expected} bytes")


def file_md5(path: Path) -> str:
    """The md5 hex digest of a file, read in chunks."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _range_start(content_range: str | None) -> int | None:
    """``bytes 100-199/200`` -> 100."""
    found = re.match(r"bytes (\d+)-\d+/", content_range or "")
    return int(found.group(1)) if found else None


def _total_size(content_range: str | None) -> int | None:
    """``bytes */200`` or ``bytes 0-199/200`` -> 200."""
    found = re.match(r"bytes [\d*-]+/(\d+)", content_range or "")
    return int(found.group(1)) if found else None


def _reason(err: BaseException) -> str:
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    if isinstance(err, urllib.error.URLError):
        return str(err.reason)
    return str(err) or type(err).__name__
