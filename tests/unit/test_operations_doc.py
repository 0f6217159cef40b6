"""docs/operations.md shows the HAProxy configuration the tests run: the same generator
(tests/lab/haproxy.py) produces it, so the documented file cannot drift from the tested one."""

from __future__ import annotations

from pathlib import Path

from tests.lab.haproxy import Frontend, haproxy_config

DOC = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


def test_the_documented_haproxy_configuration_is_the_tested_one() -> None:
    expected = haproxy_config([
        Frontend("imaps", [("10.0.0.11", 993), ("10.0.0.12", 993)], health_ports=[8025, 8025],
                 port=993, bind_host="0.0.0.0"),
        Frontend("pop3s", [("10.0.0.11", 995), ("10.0.0.12", 995)], health_ports=[8025, 8025],
                 port=995, bind_host="0.0.0.0"),
    ])
    text = DOC.read_text()
    block = text.split("   ```\n   global\n", 1)[1].split("   ```", 1)[0]
    documented = "global\n" + "\n".join(line[3:] for line in block.splitlines()) + "\n"
    assert documented == expected
