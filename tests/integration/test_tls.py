"""`legion serve` over HTTPS with API keys (a self-signed certificate made here), and its
refusal to serve an open non-loopback address."""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import subprocess
import sys
import time

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.integration.conftest import _free_port, stop_serve

KEY = "tls-test-key-0123456789abcdef"
LEGION = [sys.executable, "-m", "legion_cli"]


def _self_signed(folder) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return str(cert_path), str(key_path)


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "LEGION_API_KEYS")}
    env["RAY_AUTH_MODE"] = "disabled"
    return env


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--host", "0.0.0.0"], "refusing to serve on 0.0.0.0 without API keys"),
        (["--ssl-certfile", "cert.pem"], "go together"),
        (["--ssl-certfile", "nope.pem", "--ssl-keyfile", "nope.key"], "does not exist"),
    ],
)
def test_serve_refuses_unsafe_or_broken_setups_before_starting(tmp_path, args, fragment):
    out = subprocess.run(
        [*LEGION, "serve", "--no-dashboard", *args],
        env=_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert fragment in out.stderr


def test_https_with_keys_end_to_end(tmp_path):
    cert, key = _self_signed(tmp_path)
    port = _free_port()
    conf = tmp_path / "legion.yaml"
    conf.write_text(
        "agents:\n  - name: solo\n    num_cpus: 1.0\n    sampling: {max_tokens: 4}\n"
        f"serve:\n  port: {port}\n  app_name: tlstest\n  max_replicas: 1\n"
        f"data_dir: {tmp_path / 'data'}\n"
    )
    env = {**_env(), "LEGION_API_KEYS": KEY}
    proc = subprocess.Popen(
        [
            *LEGION,
            "serve",
            "--config",
            str(conf),
            "--no-dashboard",
            "--ssl-certfile",
            cert,
            "--ssl-keyfile",
            key,
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    url = f"https://127.0.0.1:{port}"
    trust = ssl.create_default_context(cafile=cert)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{url}/healthz", verify=trust, timeout=10).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "legion serve never became healthy over HTTPS"
            time.sleep(1)
        # Only TLS is served, and only to clients that trust this certificate.
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10)
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(f"{url}/healthz", timeout=10)
        assert httpx.get(f"{url}/v1/models", verify=trust, timeout=30).status_code == 401
        ok = httpx.get(
            f"{url}/v1/models", verify=trust, headers={"Authorization": f"Bearer {KEY}"}, timeout=30
        )
        assert ok.status_code == 200
        ask = subprocess.run(
            [*LEGION, "ask", "Name a colour.", "--url", url, "--cacert", cert, "--api-key", KEY],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert ask.returncode == 0, ask.stderr
        assert "solo" in ask.stdout
        denied = subprocess.run(
            [*LEGION, "ask", "Name a colour.", "--url", url, "--cacert", cert],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert denied.returncode == 1 and "error 401" in denied.stderr
    finally:
        log = stop_serve(proc)
    assert f"serving at {url}" in log
    assert "1 API keys" in log and KEY not in log
    assert proc.returncode == 0, log
