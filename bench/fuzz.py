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

``--inputs N`` runs one adversarial property per parser (:data:`PARSER_PROPERTIES`; ``--all``:
every property of the fuzz files) coverage-guided instead: atheris (libFuzzer for Python,
in the ``bench`` extra) instruments ``gateway`` and feeds each property N inputs through
hypothesis's own fuzzer entry point (``fuzz_one_input``), so the assertions are exactly the
properties' own. Each property runs in its own process (libFuzzer ends the process when it is
done); ``-j`` of them at a time. It prints one line per property -- inputs executed, seconds,
new coverage units, result -- and writes them to ``bench/results/fuzz-latest.json``. A failing
input is saved as ``bench/results/fuzz-crash-*`` and the run says which property found it.

    .venv/bin/python bench/fuzz.py --inputs 1000000 -j 2   # the recorded run (docs/security.md)
    .venv/bin/python bench/fuzz.py --inputs 20000 -k pop3  # a quick look at one area
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
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
                        help="only the properties whose name matches (pytest -k; with --inputs: "
                             "a substring of the name)")
    parser.add_argument("--inputs", type=int, default=None,
                        help="coverage-guided (atheris): this many inputs per property")
    parser.add_argument("--all", action="store_true",
                        help="with --inputs: every property of the fuzz files, not one per parser")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # MODULE:FUNCTION, internal
    args = parser.parse_args(argv)
    if args.one is not None:
        return _fuzz_one(args.one, args.inputs or DEFAULT_EXAMPLES)
    if args.inputs is not None:
        return _coverage_guided(args.inputs, args.jobs, args.keyword, args.all)

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


# --- coverage-guided runs (atheris) ----------------------------------------------------------

RESULTS = ROOT / "bench" / "results"
_STAT = re.compile(r"stat::(number_of_executed_units|new_units_added):\s*(\d+)")


#: One adversarial property per sans-IO parser: what ``--inputs`` runs by default (``--all``:
#: every property of the fuzz files instead). Each says "whatever the bytes, only the parser's
#: own error, bounded memory" or checks the parser against a reference model.
PARSER_PROPERTIES = {
    "IMAP pre-login command reader": "tests.unit.test_fuzz_protocols:test_command_reader_memory_is_bounded",
    "IMAP relay command framer": "tests.unit.test_fuzz_protocols:test_command_relay_never_holds_a_literal",
    "IMAP response reader, relay mode": "tests.unit.test_fuzz_protocols:test_response_scanner_random_input",
    "IMAP response reader, framed mode": "tests.unit.test_fuzz_protocols:test_response_framer_random_input_only_raises_protocol_error",
    "IMAP data values": "tests.unit.test_fuzz_protocols:test_response_data_parse_only_raises_value_error",
    "POP3 line reader": "tests.unit.test_fuzz_protocols:test_pop3_line_reader_is_split_invariant_and_bounded",
    "POP3 command parser": "tests.unit.test_fuzz_protocols:test_pop3_parse_command_only_rejects",
    "POP3 RETR encoder": "tests.unit.test_fuzz_protocols:test_pop3_retr_matches_the_reference_model",
    "SASL decoders": "tests.unit.test_fuzz_protocols:test_sasl_decoders_only_raise_their_own_errors",
    "SMTP command reader": "tests.unit.test_smtp_protocol:test_random_command_lines_only_raise_the_modules_error",
    "SMTP reply parser": "tests.unit.test_smtp_protocol:test_reply_parser_split_invariance_and_errors",
    "PROXY protocol header": "tests.unit.test_proxy_header:test_random_input_only_raises_its_error",
}


def _properties(keyword: str | None, every: bool) -> list[str]:
    """``module:function`` of the properties to run: one per parser, or (``every``) every
    hypothesis property in the fuzz test files; ``keyword`` keeps those whose name contains
    one of its comma-separated parts."""
    sys.path.insert(0, str(ROOT))
    if every:
        found = []
        for path in sorted(ROOT.glob(FUZZ_TESTS)):
            module_name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            module = importlib.import_module(module_name)
            found += [f"{module_name}:{name}" for name, fn in vars(module).items()
                      if name.startswith("test_") and hasattr(fn, "hypothesis")]
    else:
        found = list(PARSER_PROPERTIES.values())
    wanted = [k for k in (keyword or "").split(",") if k]
    return [t for t in found if not wanted or any(k in t.split(":")[1] for k in wanted)]


def _fuzz_one(target: str, inputs: int) -> int:
    """Child process: feed one property ``inputs`` coverage-guided inputs (never returns)."""
    import atheris  # the bench extra; imported here so the hypothesis mode does not need it

    module_name, function = target.split(":")
    sys.path.insert(0, str(ROOT))
    with atheris.instrument_imports(include=["gateway"]):
        module = importlib.import_module(module_name)
    prop: Callable[..., object] = getattr(module, function)
    RESULTS.mkdir(parents=True, exist_ok=True)
    atheris.Setup(
        [sys.argv[0], f"-runs={inputs}", "-print_final_stats=1", "-rss_limit_mb=2048",
         f"-artifact_prefix={RESULTS}/fuzz-crash-{function}-"],
        prop.hypothesis.fuzz_one_input,  # type: ignore[attr-defined]
    )
    atheris.Fuzz()
    return 0


def _coverage_guided(inputs: int, jobs: int, keyword: str | None, every: bool) -> int:
    targets = _properties(keyword, every)
    print(f"coverage-guided: {len(targets)} properties, {inputs:,} inputs each, {jobs} at a time",
          flush=True)
    started = time.monotonic()
    pending = list(targets)
    running: list[tuple[str, subprocess.Popen[str], float]] = []
    results: list[dict[str, object]] = []
    failed = False
    while pending or running:
        while pending and len(running) < max(1, jobs):
            target = pending.pop(0)
            child = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--one", target,
                 "--inputs", str(inputs)],
                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            running.append((target, child, time.monotonic()))
        target, child, began = running.pop(0)
        output, _ = child.communicate()
        stats = {k: int(v) for k, v in _STAT.findall(output)}
        ok = child.returncode == 0 and stats.get("number_of_executed_units", 0) >= inputs
        failed |= not ok
        row = {"property": target.split(":")[1], "inputs": stats.get("number_of_executed_units", 0),
               "seconds": round(time.monotonic() - began), "new_units": stats.get("new_units_added", 0),
               "result": "no failure" if ok else f"FAILED (exit {child.returncode})"}
        results.append(row)
        print(f"{row['property']:<70} {row['inputs']:>10,} inputs {row['seconds']:>6} s "
              f"{row['new_units']:>5} units  {row['result']}", flush=True)
        if not ok:
            print(output[-4000:], flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "fuzz-latest.json").write_text(json.dumps(
        {"inputs_per_property": inputs, "seconds": round(time.monotonic() - started),
         "properties": results}, indent=2) + "\n")
    print(f"done in {time.monotonic() - started:,.0f} s: "
          f"{'no failure found' if not failed else 'FAILED (see above)'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
