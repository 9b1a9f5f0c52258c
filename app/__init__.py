"""The Streamlit app that browses a feature store, installed as `saelab.app`.

`saelab app --store PATH` serves `main.py` (a router over one file per page in `views/`). The
pages hold no SQL and no torch: they call `saelab.store.FeatureStore` methods, the helpers in
`common` (the store, the chosen SAE, URL parameters, messages) and the HTML / figure builders in
`render`, which tests call directly. Importing this package imports neither streamlit nor torch;
`serving` runs the app from Python.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from saelab.errors import SetupError

MAIN = Path(__file__).with_name("main.py")
"""The script `streamlit run` serves."""

STORE_ENV = "SAELAB_STORE"
"""Environment variable naming the feature store the app reads (`saelab app --store` sets it)."""

DEFAULT_STORE = "runs/features.duckdb"


@contextlib.contextmanager
def serving(store: str | Path, port: int | None = None, log: Path | None = None, timeout: float = 180) -> Iterator[str]:
    """Run `saelab app` on `store` in a child process (for notebooks, tests and benchmarks); yields its
    base URL once the server answers, and stops it when the block exits.

    `port` defaults to a free one; the server's output goes to `log` (else it is discarded).
    """
    if port is None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
    with open(log, "w") if log else open(os.devnull, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "saelab", "app", "--store", str(store), "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    urllib.request.urlopen(f"{base}/_stcore/health", timeout=2).close()
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        said = log.read_text()[-2000:] if log else ""
                        raise SetupError(f"saelab app did not come up on {base}: {said}") from None
                    time.sleep(0.2)
            yield base
        finally:
            proc.terminate()
            proc.wait(timeout=30)
