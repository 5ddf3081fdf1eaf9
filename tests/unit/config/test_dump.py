"""``redact``: secrets never reach ``/config_dump``."""

from __future__ import annotations

from microenvoy.config.dump import REDACTED, redact


def test_redact_replaces_keys_secrets_and_passwords_deeply_and_copies() -> None:
    raw = {
        "static_resources": {
            "listeners": [
                {
                    "tls_certificates": [
                        {
                            "certificate_chain": {"filename": "c.pem"},
                            "private_key": {"inline_string": "KEY"},
                            "password": {"inline_string": "pw"},
                        }
                    ]
                }
            ]
        },
        "node": {"metadata": {"client_secret": "s", "SecretToken": "t", "ok": ("a", {"db_secret_path": 1})}},
        1: "non-string keys are kept",
    }
    out = redact(raw)
    assert out == {
        "static_resources": {
            "listeners": [
                {
                    "tls_certificates": [
                        {
                            "certificate_chain": {"filename": "c.pem"},
                            "private_key": REDACTED,
                            "password": REDACTED,
                        }
                    ]
                }
            ]
        },
        "node": {
            "metadata": {
                "client_secret": REDACTED,
                "SecretToken": REDACTED,
                "ok": ["a", {"db_secret_path": REDACTED}],
            }
        },
        1: "non-string keys are kept",
    }
    assert raw["static_resources"]["listeners"][0]["tls_certificates"][0]["private_key"] == {
        "inline_string": "KEY"
    }
    assert REDACTED == "[redacted]"
    assert redact("KEY") == "KEY"
