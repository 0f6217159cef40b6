"""mailgate's benchmark: every figure a ratio to a Dovecot baseline measured in the same run.

Run it with ``bash bench/run`` (see bench/README.md); the modules:

* :mod:`bench.stats` -- measurement arithmetic, targets, the table and the JSON (pure);
* :mod:`bench.procstat` -- RSS, peak RSS, PSS and CPU time from ``/proc``;
* :mod:`bench.wire` -- raw-socket IMAP/POP3 clients that are not the bottleneck;
* :mod:`bench.load` -- concurrent login load over worker processes;
* :mod:`bench.labproc` -- the test lab in its own process;
* :mod:`bench.gateway_proc` -- mailgate as a separate, configured, authorized process;
* :mod:`bench.seeding` -- the benchmark's mailboxes;
* :mod:`bench.figures` -- the figures themselves; :mod:`bench.__main__` -- the command.
"""
