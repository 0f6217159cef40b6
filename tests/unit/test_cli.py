"""The command line as a shell user meets it: messages to act on, exit codes, no tracebacks."""

from pathlib import Path

from tests.fixtures.process import run


def test_check_reports_every_problem_and_exits_2(tmp_path: Path) -> None:
    cfg = tmp_path / "mailgate.toml"
    cfg.write_text(
        '[[listener]]\nprotocol = "nntp"\nbind = "1.2.3.4"\ntls = "implicit"\n'
        '[users.bob]\nprovider = "nowhere"\nupstream_user = "b@x"\n'
    )
    result = run("--config", str(cfg), "check")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "the configuration in" in result.stderr
    assert "listener[1].protocol: Input should be 'imap', 'pop3' or 'smtp' (got 'nntp')" in result.stderr
    assert "listener[1].bind: '1.2.3.4' is not host:port" in result.stderr
    assert "users.bob.provider: unknown provider 'nowhere'" in result.stderr


def test_missing_config_file_is_one_clear_line(tmp_path: Path) -> None:
    result = run("--config", str(tmp_path / "none.toml"), "check")
    assert result.returncode == 2
    assert "no such file" in result.stderr and "Traceback" not in result.stderr


def test_certs_creates_and_prints_what_clients_trust(tmp_path: Path) -> None:
    cfg = tmp_path / "mailgate.toml"
    cfg.write_text('[server]\nhostname = "gw.lan"\n')
    first = run("--config", str(cfg), "certs")
    assert first.returncode == 0, first.stderr
    assert f"created certificate: {tmp_path / 'certs/mailgate.pem'}" in first.stdout
    assert f"CA certificate to install on clients: {tmp_path / 'certs/mailgate-ca.pem'}" in first.stdout
    fp = [line for line in first.stdout.splitlines() if line.startswith("SHA-256")][0]
    second = run("--config", str(cfg), "certs")
    assert "created" not in second.stdout
    assert fp in second.stdout  # the same certificate, not a new one


def test_usage_errors_exit_2() -> None:
    result = run("frobnicate")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr
