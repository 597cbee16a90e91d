"""Where files live: a local path or an object-store URI (file://, s3://, gs://), through pyarrow's file systems.

Torch-free, so that `stt.data.prepare` and the data stream share it with `stt.checkpoint`. Every first request to
an object store goes through `contact`: answered within CONTACT_TIMEOUT_S, or one line naming the URI, as is a
network or credential failure (pyarrow's own is an OSError of many lines from the cloud SDK).
"""

from __future__ import annotations

import os
import threading
from typing import Any, Callable, TypeVar
from urllib.parse import urlsplit

import pyarrow.fs

from stt.errors import USER_ERRORS, StorageError, UsageError

T = TypeVar("T")

# The URI schemes stt reads and writes, through pyarrow (a local path needs none). pyarrow knows others (hdfs:// needs
# a JVM, abfs:// an Azure account) that stt has never been run against: refused at once rather than half-supported.
SCHEMES = ("file", "s3", "gs")
# The first request to an object store must answer within this many seconds. Without network or credentials gs://
# retried in silence for minutes, and an endpoint that accepts a connection but never answers holds a request for ever.
CONTACT_TIMEOUT_S = 30.0
# gs:// stops retrying after this many seconds (pyarrow's default: 15 minutes), so its own error comes first.
GCS_RETRY_LIMIT_S = 20


def is_uri(path: str) -> bool:
    return "://" in str(path)


def is_remote(path: str) -> bool:
    """An object-store URI: reached over the network, with credentials."""
    return is_uri(path) and urlsplit(str(path)).scheme.lower() != "file"


def join(base: str, *parts: str) -> str:
    """`base/part/...`; a URI's query (s3://bucket/runs?region=...) stays at the end, where pyarrow reads it."""
    path, mark, query = str(base).partition("?") if is_uri(base) else (str(base), "", "")
    return "/".join([path.rstrip("/"), *parts]) + mark + query


def contact(path: str, call: Callable[[], T]) -> T:
    """`call()`, a request to the store holding `path`, with its failure as one line naming `path`.

    For an object store it runs in a thread given CONTACT_TIMEOUT_S to answer; past that a StorageError says so
    and the request is left behind (pyarrow cannot cancel it: stt.command.run ends the process without waiting for it).
    """
    if not is_remote(path):
        return call()
    outcome: dict[str, Any] = {}

    def request() -> None:
        try:
            outcome["value"] = call()
        except BaseException as error:  # noqa: BLE001 - handed to the calling thread just below
            outcome["error"] = error

    thread = threading.Thread(target=request, name=f"stt: contacting {path}", daemon=True)
    thread.start()
    thread.join(CONTACT_TIMEOUT_S)
    if thread.is_alive():
        raise StorageError(
            f"{path}: no answer within {CONTACT_TIMEOUT_S:g} s (no network, no credentials for this store, or a "
            "wrong endpoint?)",
            abandoned=thread,
        )
    if "error" in outcome:
        raise storage_error(path, outcome["error"]) from None
    return outcome["value"]


def storage_error(path: str, error: BaseException) -> BaseException:
    """`error` of a request for `path`; an object store's network or credential failure (pyarrow's OSError, many
    lines from the cloud SDK) as one StorageError line naming `path`."""
    if not is_remote(path) or not isinstance(error, OSError) or isinstance(error, USER_ERRORS):
        return error
    reason = " ".join(str(error).split())
    return StorageError(f"{path}: the object store refused or could not be reached ({reason[:240]})")


def filesystem(path: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """pyarrow's file system and the path inside it, for a local path or a URI (file://, s3://bucket/key, gs://...);
    another scheme is a UsageError naming the ones supported."""
    if not is_uri(path):
        return pyarrow.fs.LocalFileSystem(), os.path.abspath(path)
    scheme = urlsplit(str(path)).scheme.lower()
    if scheme not in SCHEMES:
        raise UsageError(
            f"{path}: unsupported URI scheme '{scheme}://'; expected a local path, or a URI starting with "
            + ", ".join(f"{s}://" for s in SCHEMES)
        )
    uri = str(path)
    if scheme == "gs" and "retry_limit_seconds=" not in uri:
        uri += ("&" if "?" in uri else "?") + f"retry_limit_seconds={GCS_RETRY_LIMIT_S}"
    return contact(path, lambda: pyarrow.fs.FileSystem.from_uri(uri))  # s3:// asks for the bucket's region


def file_type(path: str) -> pyarrow.fs.FileType:
    fs, fs_path = filesystem(path)
    return contact(path, lambda: fs.get_file_info(fs_path)).type


def exists(path: str) -> bool:
    return file_type(path) != pyarrow.fs.FileType.NotFound
