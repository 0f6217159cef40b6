"""Long fuzz runs of mailgate's sans-IO parsers (not part of the default test run).

The properties live in ``tests/unit/test_fuzz_*.py`` (bounded memory whatever the input, byte-exact
relaying, reference models for RETR/TOP, "random input only raises the module's own protocol
error"); CI runs each with a modest number of examples. This runs the same properties with as
many examples as asked, in parallel processes, and stops at the first falsifying example (which
hypothesis prints, shrunk, together with the ``@reproduce_failure`` line to paste into a test).

    .venv/bin/python bench/fuzz.py                          # 100,000 examples per property
    .venv/bin/python bench/fuzz.py --examples 1000000 -j 2  # a night's run
    .venv/bin/python bench/fuzz.py -k pop3 --examples 50000 # only the POP3 properties

Hypothesis keeps its example database in ``.hypothesis/``: a failure found here is replayed
first by every later run, including CI's short one, until it is fixed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_EXAMPLES = 100_000
FUZZ_TESTS = "tests/unit/test_fuzz_*.py"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=DEFAULT_EXAMPLES,
                        help=f"examples per property (default {DEFAULT_EXAMPLES:,})")
    parser.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1,
                        help="parallel processes (pytest-xdist)")
    parser.add_argument("-k", dest="keyword", default=None,
                        help="only the properties whose name matches (pytest -k)")
    args = parser.parse_args(argv)

    tests = sorted(str(p.relative_to(ROOT)) for p in ROOT.glob(FUZZ_TESTS))
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:randomly", *tests,
               "-o", "addopts=", "--hypothesis-show-statistics"]
    if args.jobs > 1:
        command += ["-n", str(args.jobs)]
    if args.keyword:
        command += ["-k", args.keyword]
    env = {**os.environ, "MAILGATE_FUZZ_EXAMPLES": str(args.examples)}
    print(f"fuzzing {len(tests)} file(s), {args.examples:,} examples per property, "
          f"{args.jobs} process(es)", flush=True)
    started = time.monotonic()
    result = subprocess.run(command, cwd=ROOT, env=env, check=False)
    print(f"done in {time.monotonic() - started:,.0f} s: "
          f"{'no failure found' if result.returncode == 0 else 'FAILED (see above)'}")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
