"""Byte ranges of a hub repository's files over HTTP, through huggingface_hub's own settings and functions.

Owns the network: the repository's commit and file list (HfApi.model_info), file sizes (get_hf_file_metadata),
and range requests on `hf_hub_url(...)` with `build_hf_headers()` (HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE are
honoured because huggingface_hub applies them), each with a timeout, retried with backoff on timeouts,
server errors and bodies cut short, resuming from the last byte received. It writes nothing to disk itself:
callers get the bytes through a callback. The local store that keeps them is local_tier.py's.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import MoepagerError

RETRY_STATUS = (408, 429, 500, 502, 503, 504)


@dataclass
class NetStats:
    bytes_fetched: int = 0  # body bytes received (retried pieces counted once: resumption skips them)
    requests: int = 0
    retries: int = 0
    network_s: float = 0.0  # time inside requests, summed over threads

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class _Retry(Exception):
    """A failure worth another try: a server error, a body cut short."""


class HubRanges:
    """One repository at one revision on the hub named by huggingface_hub's endpoint setting."""

    def __init__(self, repo: str, revision: str | None = None, timeout: float = 30.0, tries: int = 5,
                 backoff: float = 0.5):  # fmt: skip
        from huggingface_hub import constants

        self.repo, self.revision = repo, revision or "main"
        self.commit: str | None = None  # set by resolve(); ranges are read at this commit only
        self.timeout, self.tries, self.backoff = timeout, max(1, tries), backoff
        self.endpoint = constants.ENDPOINT
        self.stats = NetStats()
        self._lock = threading.Lock()

    # -------------------------------------------------------------------------------- metadata

    def resolve(self) -> list[str]:
        """The commit the revision points at, and the repository's file names (one API call)."""
        from huggingface_hub import HfApi

        info = self._call(
            lambda: HfApi(endpoint=self.endpoint).model_info(
                self.repo, revision=self.revision, timeout=self.timeout
            )
        )
        if not info.sha:
            raise MoepagerError(f"{self.endpoint}: no commit for {self.repo}@{self.revision} in the answer")
        self.commit = info.sha
        return [s.rfilename for s in info.siblings or []]

    def size(self, filename: str) -> int:
        import httpx2
        from huggingface_hub import get_hf_file_metadata
        from huggingface_hub.errors import HfHubHTTPError

        url = self.url(filename)
        for attempt in range(self.tries):  # our own tries and backoff, as for ranges
            try:
                meta = self._call(lambda: get_hf_file_metadata(url, timeout=self.timeout, endpoint=self.endpoint),
                                  reraise=(httpx2.TransportError, HfHubHTTPError))  # fmt: skip
                break
            except (httpx2.TransportError, HfHubHTTPError) as e:
                status = getattr(getattr(e, "response", None), "status_code", None)
                if (status is not None and status not in RETRY_STATUS) or attempt + 1 == self.tries:
                    self._call(lambda e=e: _raise(e))
                time.sleep(min(self.backoff * 2**attempt, 8.0))
        if meta.size is None:
            raise MoepagerError(f"{self.url(filename)}: the server did not say the file's size")
        return meta.size

    def url(self, filename: str) -> str:
        from huggingface_hub import hf_hub_url

        return hf_hub_url(self.repo, filename, revision=self.commit or self.revision, endpoint=self.endpoint)

    def _call(self, fn, reraise: tuple = ()):
        """A huggingface_hub call, its errors turned into one line naming the repository and what to do."""
        from huggingface_hub.errors import (
            GatedRepoError,
            OfflineModeIsEnabled,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        try:
            return fn()
        except reraise:
            raise
        except OfflineModeIsEnabled:
            raise MoepagerError(f"{self.repo} is not in the local store and HF_HUB_OFFLINE is set; unset it "
                                f"to fetch from {self.endpoint}") from None  # fmt: skip
        except (RepositoryNotFoundError, GatedRepoError):
            raise MoepagerError(f"{self.endpoint}: no access to the model {self.repo}; check the name, or set "
                                f"HF_TOKEN for a private or gated model") from None  # fmt: skip
        except RevisionNotFoundError:
            raise MoepagerError(f"{self.endpoint}: {self.repo} has no revision {self.revision!r}") from None
        except MoepagerError:
            raise
        except Exception as e:  # network errors of every kind: one line, not a traceback
            raise MoepagerError(f"cannot reach {self.endpoint} for {self.repo}: {_reason(e)}") from None

    # -------------------------------------------------------------------------------- ranges

    def get(self, filename: str, start: int, nbytes: int, sink: Callable[[int, memoryview], None]) -> None:
        """Bytes start..start+nbytes of a file: sink(position in the range, piece) for each piece, in order.

        A failed attempt is retried (up to `tries` failures in a row without progress) from the first byte not
        received yet, so a body cut short costs only what it missed."""
        import httpx2
        from huggingface_hub.errors import OfflineModeIsEnabled
        from huggingface_hub.utils import build_hf_headers, get_session

        got, fails, url = 0, 0, self.url(filename)
        while got < nbytes:
            t0, before = time.perf_counter(), got
            try:
                headers = build_hf_headers()
                headers["Range"] = f"bytes={start + got}-{start + nbytes - 1}"
                headers["Accept-Encoding"] = "identity"
                with get_session().stream("GET", url, headers=headers, timeout=self.timeout) as r:
                    self._check(r, url, start + got)
                    for piece in r.iter_bytes():  # as it arrives: a cut body keeps what came
                        piece = memoryview(piece)[: nbytes - got]
                        sink(got, piece)
                        got += len(piece)
                        if got >= nbytes:
                            break
                if got < nbytes:
                    raise _Retry(f"the body ended after {got - before} of {nbytes - before} bytes")
            except OfflineModeIsEnabled:
                raise MoepagerError(f"{filename} bytes {start}..{start + nbytes} are not in the local store "
                                    f"and HF_HUB_OFFLINE is set; unset it to fetch them") from None  # fmt: skip
            except (_Retry, httpx2.TimeoutException, httpx2.NetworkError, httpx2.RemoteProtocolError) as e:
                fails = 0 if got > before else fails + 1
                if fails >= self.tries:
                    raise MoepagerError(
                        f"could not fetch {url} bytes {start}..{start + nbytes} after {fails} tries "
                        f"({_reason(e)}); check the connection and HF_ENDPOINT ({self.endpoint}), then run "
                        f"again: what was fetched is kept"
                    ) from None
                with self._lock:
                    self.stats.retries += 1
                time.sleep(min(self.backoff * 2 ** max(fails - 1, 0), 8.0))
            finally:
                with self._lock:
                    self.stats.requests += 1
                    self.stats.bytes_fetched += got - before
                    self.stats.network_s += time.perf_counter() - t0

    def read(self, filename: str, start: int, nbytes: int) -> bytes:
        buf = bytearray(nbytes)
        self.get(
            filename, start, nbytes, lambda pos, piece: buf.__setitem__(slice(pos, pos + len(piece)), piece)
        )
        return bytes(buf)

    def _check(self, r, url: str, start: int) -> None:
        if r.status_code in (401, 403):
            raise MoepagerError(f"{url}: access denied (HTTP {r.status_code}); set HF_TOKEN to a token that "
                                f"can read {self.repo}")  # fmt: skip
        if r.status_code == 404:
            raise MoepagerError(f"{url}: not found (HTTP 404); the repository changed or the name is wrong")
        if r.status_code in RETRY_STATUS:
            raise _Retry(f"HTTP {r.status_code}")
        if r.status_code != 206:
            raise MoepagerError(f"{url}: the server answered HTTP {r.status_code} to a range request (206 "
                                f"expected); it must serve byte ranges")  # fmt: skip
        got = r.headers.get("Content-Range", "")
        if not got.startswith(f"bytes {start}-"):
            raise MoepagerError(f"{url}: asked for bytes from {start}, the server sent {got!r}")


def _raise(e: BaseException):
    raise e


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
