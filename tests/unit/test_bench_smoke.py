"""The benchmark harness imports, and its measurement helpers compute right (no timing here).

The benchmark itself (``bash bench/run``) is not part of the test run; these tests guard the
parts whose mistakes would silently produce wrong figures: percentiles, ratios and targets,
the table, /proc parsing, and the raw-socket readers that count transferred bytes.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench import procstat
from bench.__main__ import build_parser, parse_only
from bench.figures import (
    FIGURES,
    MAILBOXES_FOR,
    NoTarget,
    ZeroFailures,
    gateway_users,
    login_ratio_ceiling,
)
from bench.gateway_proc import GatewayUser, write_config
from bench.labproc import LabInfo
from bench.seeding import SMALL_MESSAGE_SIZE, small_message
from bench.stats import (
    Figure,
    MaxDelta,
    MaxValue,
    Measurement,
    MinRatio,
    format_table,
    median,
    megabytes_per_second,
    percentile,
    ratio,
    to_json,
)
from bench.wire import Connection, Credentials, IMAPClient, xoauth2_initial_response

# ------------------------------------------------------------------------------ statistics


def test_percentile_interpolates_between_ranks_like_numpy() -> None:
    assert median([4, 1, 3, 2]) == 2.5
    assert median([5]) == 5
    assert percentile(list(range(1, 101)), 99) == pytest.approx(99.01)
    assert percentile([10, 20, 30], 0) == 10
    assert percentile([10, 20, 30], 100) == 30
    assert percentile([10, 20], 25) == 12.5


def test_percentile_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1], 101)


@given(st.lists(st.floats(min_value=-1e6, max_value=1e6), min_size=1, max_size=50),
       st.floats(min_value=0, max_value=100))
def test_percentile_lies_within_the_data_and_is_monotonic(values: list[float], pct: float
                                                          ) -> None:
    p = percentile(values, pct)
    assert min(values) - 1e-6 <= p <= max(values) + 1e-6
    assert percentile(values, min(100.0, pct + 1)) >= p - 1e-6


def test_ratio_and_throughput() -> None:
    assert ratio(8, 10) == 0.8
    assert ratio(None, 10) is None
    assert ratio(5, 0) is None
    assert megabytes_per_second(20_000_000, 0.5) == 40.0
    with pytest.raises(ValueError):
        megabytes_per_second(1, 0)


# ------------------------------------------------------------------------------ targets


def _m(value: float | None, **extra: object) -> Measurement:
    return Measurement(value, "x", extra=dict(extra)) if value is not None else \
        Measurement.missing("front end missing")


def test_targets_judge_the_right_relation() -> None:
    assert MinRatio(0.8).met(_m(80), _m(100)) is True
    assert MinRatio(0.8).met(_m(79), _m(100)) is False
    assert MaxDelta(5, "ms").met(_m(14.9), _m(10)) is True
    assert MaxDelta(5, "ms").met(_m(15.1), _m(10)) is False
    assert MaxValue(60, "KB").met(_m(61), _m(1)) is False
    assert MaxValue(60, "KB").met(_m(59), Measurement.missing("-")) is True
    assert ZeroFailures().met(_m(1.0, failures=0), _m(1.0)) is True
    assert ZeroFailures().met(_m(1.0, failures=3), _m(1.0)) is False
    assert NoTarget().met(_m(1), _m(1)) is None


def test_login_ratio_ceiling_when_every_login_also_logs_in_upstream() -> None:
    assert login_ratio_ceiling(10.0, 10.0) == 0.5
    assert login_ratio_ceiling(11.6, 2.9) == pytest.approx(0.8, abs=0.001)


def test_a_missing_side_is_never_judged() -> None:
    for target in (MinRatio(1), MaxDelta(1, "ms"), MaxValue(1, "MB"), ZeroFailures()):
        assert target.met(_m(None), _m(1)) is None
    assert MinRatio(1).met(_m(1), _m(None)) is None


# ------------------------------------------------------------------------------ table, JSON


def test_table_has_every_column_and_says_why_a_value_is_missing() -> None:
    figures = [
        Figure("5", "20 MB FETCH", "raw socket", _m(80), _m(100), MinRatio(0.8),
               notes=("five fetches",)),
        Figure("6", "20 MB RETR", "raw socket", _m(None), _m(50), MinRatio(1.0)),
    ]
    table = format_table(figures)
    header = table.splitlines()[0].split()
    assert header == ["#", "figure", "mailgate", "baseline", "ratio", "target", "met?"]
    row5 = next(line for line in table.splitlines() if line.startswith("5 "))
    assert "0.80x" in row5 and ">= 0.8x" in row5 and row5.rstrip().endswith("yes")
    row6 = next(line for line in table.splitlines() if line.startswith("6 "))
    assert "n/a (front end missing)" in row6 and row6.rstrip().endswith("?")
    assert "[5] client: raw socket" in table and "five fetches" in table

    document = to_json(figures, {"cores": 2}, {"quick": True})
    assert document["figures"][0]["ratio"] == pytest.approx(0.8)
    assert document["figures"][0]["met"] is True
    assert document["figures"][1]["mailgate"]["na"] == "front end missing"
    assert document["figures"][1]["met"] is None


# ------------------------------------------------------------------------------ /proc


def test_proc_readings_of_this_process() -> None:
    text = "Name:\tpython\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\n"
    assert procstat.parse_status_kib(text, "VmRSS") == 1024
    with pytest.raises(KeyError):
        procstat.parse_status_kib(text, "VmSwap")
    pid = os.getpid()
    assert procstat.rss_kib(pid) > 0
    assert procstat.hwm_kib(pid) >= procstat.rss_kib(pid) // 2
    assert procstat.pss_kib([pid]) > 0
    assert procstat.cpu_seconds(pid) > 0
    with procstat.PeakSampler(pid) as sampler:
        ballast = bytearray(8 * 1024 * 1024)
        ballast[::4096] = b"x" * len(ballast[::4096])  # touch every page
    assert sampler.peak_kib >= sampler.start_kib
    del ballast


def test_children_finds_descendants() -> None:
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert child.pid in procstat.children(os.getpid())
    finally:
        child.kill()
        child.wait()


# ------------------------------------------------------------------------------ raw readers


@contextmanager
def _peer_sending(data: bytes, chunks: list[int]
                  ) -> Iterator[tuple[socket.socket, socket.socket]]:
    """A socketpair (ours, theirs) whose far end has sent ``data`` in pieces of the given
    sizes (then the rest at once)."""
    ours, theirs = socket.socketpair()
    try:
        def feed() -> None:
            pos = 0
            for size in [*chunks, len(data)]:
                if pos >= len(data):
                    break
                theirs.sendall(data[pos:pos + size])
                pos += size

        thread = threading.Thread(target=feed, daemon=True)
        thread.start()
        thread.join()
        ours.settimeout(5)
        theirs.settimeout(5)
        yield ours, theirs
    finally:
        ours.close()
        theirs.close()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"").replace(b"\r", b"")),
                max_size=12),
       st.lists(st.integers(min_value=1, max_value=7), max_size=30),
       st.integers(min_value=1, max_value=9), st.integers(min_value=1, max_value=64))
def test_pop3_reader_stops_exactly_after_the_terminator(
        lines: list[bytes], chunks: list[int], bulk: int, line_recv: int) -> None:
    body = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n"
                    for line in lines)
    wire = b"+OK message follows\r\n" + body + b".\r\n"
    with _peer_sending(wire + b"+OK next\r\n", chunks) as (sock, _):
        conn = Connection(sock, bulk_size=bulk, line_recv=line_recv)
        assert conn.line() == b"+OK message follows\r\n"
        read = conn.discard_multiline()
        # Bytes the bulk reader pulled past the terminator would be lost: the answer to the
        # next command must still be readable, whole.
        assert conn.line() == b"+OK next\r\n"
    assert read == len(body) + 3


def test_imap_reader_counts_literals_and_finds_the_tagged_answer() -> None:
    message = b"Subject: x\r\n\r\n" + b"y" * 5000 + b"\r\n"
    wire = (b"* 1 FETCH (UID 1 BODY[] {%d}\r\n" % len(message) + message + b")\r\n"
            b"B1 OK Fetch completed.\r\n")
    with _peer_sending(wire, [7, 100, 3]) as (sock, server):
        client = IMAPClient(Connection(sock, bulk_size=1000))
        assert client.fetch_body(1) == len(message)
        assert server.recv(1000) == b"B1 UID FETCH 1 (BODY.PEEK[])\r\n"


def test_xoauth2_initial_response_is_googles_format() -> None:
    assert xoauth2_initial_response("u@example.com", "tok") == (
        b"dXNlcj11QGV4YW1wbGUuY29tAWF1dGg9QmVhcmVyIHRvawEB"
    )
    assert "tok" not in repr(Credentials("xoauth2", "u@example.com", "tok"))


# ------------------------------------------------------------------------------ harness


def test_small_messages_are_exact_and_deterministic() -> None:
    assert len(small_message(3)) == SMALL_MESSAGE_SIZE
    assert small_message(3) == small_message(3) != small_message(4)
    assert len(small_message(7, 1500)) == 1500
    assert small_message(7, 1500).endswith(b"\r\n")


def test_only_selects_figures_and_rejects_unknown_ones() -> None:
    assert parse_only(None) == sorted(FIGURES)
    assert set(range(1, 11)) | {12} <= set(FIGURES)  # 12: SMTP submission (bench/smtp_bench.py)
    assert parse_only("5, 1,5") == [1, 5]
    with pytest.raises(ValueError):
        parse_only("99")
    args = build_parser().parse_args(["--quick", "--only", "1,5"])
    assert args.quick and args.only == "1,5"
    assert set(MAILBOXES_FOR) == set(FIGURES)


def test_config_for_mailgate_is_valid(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from gateway.config import load_config

    lab = LabInfo("127.0.0.1", {"imaps": 1993, "pop3s": 1995}, "labpass",
                  tmp_path / "ca.pem", "http://127.0.0.1:9/token",
                  "http://127.0.0.1:9/authorize", "mailgate", "secret", 0)
    users = gateway_users({"login", "big20", "pop"})
    assert all(isinstance(u, GatewayUser) and u.password for u in users)
    path = write_config(tmp_path, lab, users, {"imap": 2993, "pop3": 2995})
    config = load_config(path)
    assert sorted(config.users) == sorted(u.name for u in users)
    assert [(lst.protocol, lst.port) for lst in config.listeners] == [("imap", 2993),
                                                                      ("pop3", 2995)]
    assert config.providers["lab"].imap_port == 1993
    assert config.limits.max_connections_per_ip >= 1000


# ------------------------------------------------------------------------------ peers


def _peer_lab(tmp_path: Path) -> LabInfo:
    return LabInfo("127.0.0.1", {"imaps": 1993, "pop3s": 1995}, "labpass",
                   tmp_path / "ca.pem", "http://127.0.0.1:9/token",
                   "http://127.0.0.1:9/authorize", "mailgate", "secret", 0)


def test_emailproxy_is_configured_against_the_lab_with_tokens_it_can_decrypt(
        tmp_path: Path) -> None:
    import base64
    import configparser

    from cryptography.fernet import Fernet
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

    from bench.peers import PeerAccount, emailproxy_cache, emailproxy_config

    accounts = [PeerAccount("a@example.com", "pw-a", "access-a", "refresh-a", 1_900_000_000),
                PeerAccount("b@example.com", "pw-b", "access-b", "refresh-b", 1_900_000_001)]
    config = configparser.ConfigParser(interpolation=None)
    config.read_string(emailproxy_config(_peer_lab(tmp_path), 2993, tmp_path / "c.pem",
                                         tmp_path / "k.pem", [a.user for a in accounts]))
    server = config["IMAP-2993"]
    assert (server["server_address"], server["server_port"]) == ("127.0.0.1", "1993")
    assert server["local_certificate_path"] == str(tmp_path / "c.pem")
    assert "local_starttls" not in server  # implicit TLS towards the client
    assert config["a@example.com"]["token_url"] == "http://127.0.0.1:9/token"
    assert config["b@example.com"]["client_secret"] == "secret"
    assert "access-a" not in repr(accounts[0]) and "pw-a" not in repr(accounts[0])

    iterations = 1000  # the real count takes a second per account; the format is the same
    cache_text = emailproxy_cache(accounts, iterations=iterations, salt=lambda: b"s" * 16)
    assert "access-a" not in cache_text and "refresh-b" not in cache_text
    cache = configparser.ConfigParser(interpolation=None)
    cache.read_string(cache_text)
    for account in accounts:
        entry = cache[account.user]
        salt = base64.b64decode(entry["token_salt"])
        assert salt == b"s" * 16 and int(entry["token_iterations"]) == iterations
        assert int(entry["access_token_expiry"]) == account.expires_at
        kdf = PBKDF2HMAC(algorithm=hashes.SHA256(), length=32, salt=salt, iterations=iterations)
        fernet = Fernet(base64.urlsafe_b64encode(kdf.derive(account.password.encode())))
        assert fernet.decrypt(entry["access_token"].encode()).decode() == account.access
        assert fernet.decrypt(entry["refresh_token"].encode()).decode() == account.refresh


def test_imapc_config_is_accepted_by_dovecot(tmp_path: Path) -> None:
    import shutil
    import subprocess

    from bench.peers import PeerAccount, imapc_config, imapc_passwd_file

    doveconf = shutil.which("doveconf", path="/usr/bin:/usr/sbin:/bin:/sbin")
    if doveconf is None:
        pytest.skip("Dovecot is not installed (.ci/setup installs it)")
    for name in ("cert.pem", "key.pem"):
        (tmp_path / name).write_text("")
    owners = "default_login_user = root\ndefault_internal_user = root\nfirst_valid_uid = 0\n"
    conf = tmp_path / "dovecot.conf"
    conf.write_text(imapc_config(tmp_path, _peer_lab(tmp_path), 2995, "bench-imapc-test", owners))
    done = subprocess.run([doveconf, "-c", str(conf), "-n"], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, done.stderr
    settings = dict(line.split(" = ", 1) for line in done.stdout.splitlines()
                    if " = " in line and not line.startswith(" "))
    assert settings["mail_location"] == "imapc:~/imapc"
    assert (settings["imapc_host"], settings["imapc_port"]) == ("127.0.0.1", "1993")
    assert (settings["imapc_ssl"], settings["imapc_sasl_mechanisms"]) == ("imaps", "xoauth2")
    assert settings["imapc_user"] == "%u"
    assert settings["ssl_client_ca_file"] == str(tmp_path / "ca.pem")

    line = imapc_passwd_file([PeerAccount("a@example.com", "pw", "tok", "ref", 0)],
                             tmp_path / "mail", 65534, 65534)
    user, password, *_, extra = line.rstrip("\n").split(":")
    assert (user, password) == ("a@example.com", "{PLAIN}pw")
    fields = dict(f.split("=", 1) for f in extra.split())
    assert fields == {"userdb_uid": "65534", "userdb_gid": "65534",
                      "userdb_home": f"{tmp_path}/mail/a@example.com",
                      "userdb_imapc_password": "tok"}
    assert "ref" not in line  # only the access token reaches Dovecot


def test_peer_rows_show_the_ratio_of_mailgate_to_each_peer() -> None:
    from bench.peer_figures import PEER_FIGURES, PEER_NOTES, PEER_TWINS, peer_users
    from bench.peers import EMAILPROXY, IMAPC

    figure = Figure("4", "small FETCH", "raw socket", _m(1.0), _m(0.5), MaxDelta(0.5, "ms"),
                    peers=((EMAILPROXY, _m(2.0)), (IMAPC, _m(None))))
    table = format_table([figure])
    vs_proxy = next(line for line in table.splitlines() if "mailgate vs emailproxy" in line)
    assert "0.50x" in vs_proxy
    vs_imapc = next(line for line in table.splitlines() if "mailgate vs imapc" in line)
    assert "n/a (front end missing)" in vs_imapc
    peers_json = to_json([figure], {}, {})["figures"][0]["peers"]
    assert peers_json[EMAILPROXY]["mailgate_ratio"] == pytest.approx(0.5)
    assert peers_json[IMAPC]["mailgate_ratio"] is None

    assert set(PEER_FIGURES) == {1, 2, 4, 5, 6, 9} <= set(FIGURES)
    assert set(PEER_NOTES) == set(PEER_FIGURES)
    users = peer_users([4, 6, 9])
    assert users == {EMAILPROXY: ["bench-small@example.com"],
                     IMAPC: ["bench-big20@example.com", f"bench-{PEER_TWINS[0]}@example.com"]}
    assert peer_users([3, 7, 8]) == {}


def test_a_peer_that_is_not_running_gets_na_with_its_reason() -> None:
    from bench.peer_figures import PEER_NOTES, with_peers
    from bench.peers import EMAILPROXY, IMAPC, Peers, emailproxy_missing

    rows = [Figure("9a", "first", "raw", _m(1.0), _m(1.0), NoTarget()),
            Figure("9b", "later", "raw", _m(1.0), _m(1.0), NoTarget())]
    peers = Peers(unavailable={IMAPC: "dovecot exited with 89"})
    done = with_peers(9, rows, None, peers)  # type: ignore[arg-type]  # env unused when n/a
    assert [row.peers for row in done] == [
        ((IMAPC, Measurement.missing("dovecot exited with 89")),)] * 2
    assert all(row.notes == (PEER_NOTES[9],) for row in done)
    assert with_peers(3, rows, None, peers) == rows  # type: ignore[arg-type]  # no peer for 3
    assert Peers().why_not(EMAILPROXY) == "not started"
    assert "not installed" in (emailproxy_missing("/bin/false") or "")


def test_config_for_mailgate_with_smtp_is_valid(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from gateway.config import load_config

    lab = LabInfo("127.0.0.1", {"imaps": 1993, "pop3s": 1995, "submissions": 1465}, "labpass",
                  tmp_path / "ca.pem", "http://127.0.0.1:9/token",
                  "http://127.0.0.1:9/authorize", "mailgate", "secret", 0)
    users = gateway_users({"smtp"})
    assert [u.name for u in users] == ["mg-smtp"]
    config = load_config(write_config(tmp_path, lab, users, {"imap": 2993, "smtp": 2465}))
    assert [(lst.protocol, lst.tls) for lst in config.listeners] == [("imap", "implicit"), ("smtp", "implicit")]
    assert config.providers["lab"].smtp == "127.0.0.1:1465"
    assert config.limits.smtp_upstream_connections_per_account >= 100


def test_wan_delay_relay_holds_each_direction_for_its_delay_and_keeps_order() -> None:
    import time

    from bench.wan import DelayRelay

    server = socket.create_server(("127.0.0.1", 0))

    def echo() -> None:
        conn, _ = server.accept()
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    threading.Thread(target=echo, daemon=True).start()
    relay = DelayRelay(server.getsockname(), 0.05).start()
    try:
        with socket.create_connection(("127.0.0.1", relay.port)) as client:
            start = time.monotonic()
            client.sendall(b"ping")
            assert client.recv(4) == b"ping"
            assert time.monotonic() - start >= 0.1  # one delay each way
            payload = bytes(range(256)) * 400
            client.sendall(payload)
            received = b""
            while len(received) < len(payload):
                received += client.recv(65536)
            assert received == payload
    finally:
        relay.close()
        server.close()
