"""Run nghttp2's ``h2load`` and parse its summary.

r = run_h2load("http://127.0.0.1:8080/", n=2000, c=10, m=10)
assert r.failed == 0 and r.status_2xx == 2000
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["H2LoadResult", "run_h2load"]

_REQUESTS = re.compile(
    r"requests:\s+(\d+) total,\s+(\d+) started,\s+(\d+) done,\s+(\d+) succeeded,\s+(\d+) failed,"
    r"\s+(\d+) errored,\s+(\d+) timeout"
)
_STATUS = re.compile(r"status codes:\s+(\d+) 2xx,\s+(\d+) 3xx,\s+(\d+) 4xx,\s+(\d+) 5xx")
_RATE = re.compile(r"finished in [\d.]+\w+,\s+([\d.]+) req/s")


@dataclass(frozen=True)
class H2LoadResult:
    total: int
    started: int
    done: int
    succeeded: int
    failed: int
    errored: int
    timeout: int
    status_2xx: int
    status_3xx: int
    status_4xx: int
    status_5xx: int
    req_per_s: float
    output: str


def run_h2load(
    url: str,
    *,
    n: int,
    c: int = 1,
    m: int = 1,
    extra: Sequence[str] = (),
    timeout: float = 90.0,
) -> H2LoadResult:
    """Run ``h2load -n N -c C -m M URL`` (h2c prior knowledge for http:// URLs) and parse the summary.

    Raises AssertionError with the full output when the summary cannot be parsed.
    """
    exe = shutil.which("h2load")
    if exe is None:
        raise FileNotFoundError("h2load not found (Debian package nghttp2-client; .ci/setup installs it)")
    proc = subprocess.run(
        [exe, "-n", str(n), "-c", str(c), "-m", str(m), *extra, url],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    out = proc.stdout + proc.stderr
    rq = _REQUESTS.search(out)
    st = _STATUS.search(out)
    if rq is None or st is None:
        raise AssertionError(f"cannot parse h2load output (exit {proc.returncode}):\n{out}")
    rate = _RATE.search(out)
    total, started, done, succeeded, failed, errored, timed_out = (int(x) for x in rq.groups())
    s2, s3, s4, s5 = (int(x) for x in st.groups())
    return H2LoadResult(
        total=total,
        started=started,
        done=done,
        succeeded=succeeded,
        failed=failed,
        errored=errored,
        timeout=timed_out,
        status_2xx=s2,
        status_3xx=s3,
        status_4xx=s4,
        status_5xx=s5,
        req_per_s=float(rate.group(1)) if rate else 0.0,
        output=out,
    )
