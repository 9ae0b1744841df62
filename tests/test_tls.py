"""TLS on both ports (docs/SECURITY.md, "TLS"): the seed scenarios over TLS, plain-text and
TLS users together, `require_tls`, where passwords may travel, how our client checks the
server (CA, pin, trust on first use, and the specific errors), certificate reload, hostile
handshakes, and real third-party TLS clients (Python's ssl module and `openssl s_client`).

Certificates are made with the `cryptography` package: a test CA, and server certificates
that are good, expired, or for another name.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import queue
import shutil
import signal
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from relaychat import (
    Ack,
    AsyncClient,
    BroadcastMessage,
    Client,
    GroupMessage,
    PrivateMessage,
    RelaychatError,
    Server,
    TlsError,
    Welcome,
)

from tests.conftest import (
    FILE_GREETING,
    HOST,
    PASSWORD,
    REPO,
    TIMEOUT,
    Net,
    Wire,
    file_arrival,
    next_of,
    random_file,
    register,
    start_server,
    stop_server,
    wait_until,
)
from tests.labstyle_server import LabStyleServer

ONE_DAY = datetime.timedelta(days=1)


class Pki:
    """A test CA in `root`, and server certificates it issues."""

    def __init__(self, root: Path, name: str = "relaychat test CA") -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(self.name)
            .issuer_name(self.name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - ONE_DAY)
            .not_valid_after(now + 30 * ONE_DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )
        self.ca = root / "ca.pem"
        self.ca.write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def issue(
        self,
        stem: str,
        hosts: tuple[str, ...] = ("localhost", "127.0.0.1"),
        *,
        expired: bool = False,
    ) -> tuple[Path, Path]:
        """A server certificate for `hosts` and its key, as `<stem>.pem` and `<stem>.key`."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        start, end = (
            (now - 30 * ONE_DAY, now - ONE_DAY) if expired else (now - ONE_DAY, now + 30 * ONE_DAY)
        )
        names = [
            x509.IPAddress(ipaddress.ip_address(h)) if _is_ip(h) else x509.DNSName(h) for h in hosts
        ]
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        cert_path, key_path = self.root / f"{stem}.pem", self.root / f"{stem}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return cert_path, key_path


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def fingerprint(cert: Path) -> str:
    """A certificate's SHA-256 fingerprint, as the server logs it and `tls_pin` takes it."""
    loaded = x509.load_pem_x509_certificate(cert.read_bytes())
    return loaded.fingerprint(hashes.SHA256()).hex(":").upper()


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def tls_server(pki: Pki, tmp_path: Path):
    """A server with TLS (and plain text) on both ports, its certificate from the test CA."""
    cert, key = pki.issue("server")
    srv = Server(HOST, 0, 0, tmp_path / "data", tls_cert=cert, tls_key=key)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def tls_net(tls_server: Server, tmp_path: Path):
    net = Net(tls_server, tmp_path)
    yield net
    net.close()


@pytest.fixture
def ctx(pki: Pki) -> ssl.SSLContext:
    """Python's own TLS client, trusting the test CA."""
    return ssl.create_default_context(cafile=str(pki.ca))


def tls_client(net: Net, pki: Pki, name: str, **options) -> Client:
    return net.client(name, tls_ca=pki.ca, **options)


# --- every seed scenario over TLS ---------------------------------------------------------


def test_every_seed_scenario_works_over_tls_on_both_ports(tls_net, pki, tmp_path, tls_server):
    ahmad = tls_client(tls_net, pki, "ahmad")
    yasser = tls_client(tls_net, pki, "yasser")

    assert ahmad.list_users() == ["yasser"]
    ahmad.msg("yasser", "Hi Yasser!")
    assert next_of(yasser, PrivateMessage).text == "Hi Yasser!"
    yasser.broadcast("Hello everyone!")
    assert next_of(ahmad, BroadcastMessage).text == "Hello everyone!"
    ahmad.join("devs")
    yasser.join("devs")
    ahmad.send_group("devs", "Standup at 10 AM.")
    assert next_of(yasser, GroupMessage).text == "Standup at 10 AM."

    # Files with their ACK, to a user and to a group: bytes identical through TLS.
    report = random_file(tmp_path / "report.pdf", 3_000_000)
    ahmad.send_file("yasser", report)
    _, received = file_arrival(yasser)
    assert Path(received.path).read_bytes() == report.read_bytes()
    assert next_of(ahmad, Ack).recipient == "yasser"
    slides = random_file(tmp_path / "slides.bin", 200_000)
    ahmad.send_file("GROUP:devs", slides)
    _, received = file_arrival(yasser)
    assert Path(received.path).read_bytes() == slides.read_bytes()
    assert next_of(ahmad, Ack).filename == "slides.bin"
    saved = tls_server.data_dir / "received_from_ahmad_report.pdf"
    assert saved.read_bytes() == report.read_bytes()


def test_the_async_client_speaks_tls(tls_server, pki, tmp_path):
    async def main() -> list[str]:
        a = await AsyncClient.connect(
            HOST,
            tls_server.chat_port,
            tls_server.file_port,
            username="async-a",
            download_dir=tmp_path / "a",
            tls_pin=tls_server.tls_fingerprint,
        )
        try:
            return await a.list_users()
        finally:
            await a.close()

    assert asyncio.run(main()) == []


# --- plain text and TLS on one server ------------------------------------------------------


def test_plain_text_and_tls_users_chat_together(tls_net, pki, ctx, tmp_path):
    # The lab's client, in plain text and without newlines, on both sockets.
    lab = tls_net.chat("lab", lab=True)
    lab_files = tls_net.file("lab", lab=True)
    # Our client over TLS, and Python's ssl module over TLS, lab-style (no newlines): the
    # idle-pause framing works inside TLS records too.
    ours = tls_client(tls_net, pki, "ours")
    pyssl = tls_net.chat("pyssl", lab=True, tls=ctx)

    lab.send("msg ours hi from plain text")
    assert next_of(ours, PrivateMessage).text == "hi from plain text"
    ours.msg("lab", "hi from TLS")
    lab.expect("[PRIVATE from ours]: hi from TLS")
    pyssl.send("msg lab hi from ssl")
    lab.expect("[PRIVATE from pyssl]: hi from ssl")
    lab.send("broadcast to all")
    pyssl.expect("[BROADCAST from lab]: to all")
    assert next_of(ours, BroadcastMessage).text == "to all"

    # A file from TLS to the lab's plain file socket, and back.
    body = random_file(tmp_path / "x.bin", 100_000)
    ours.send_file("lab", body)
    assert lab_files.line() == f"ours|x.bin|{body.stat().st_size}"
    assert lab_files.recv_exact(body.stat().st_size) == body.read_bytes()
    lab.send("FILE_RECEIVED|ours|x.bin")
    assert next_of(ours, Ack).recipient == "lab"
    back = os.urandom(50_000)
    lab_files.send(f"lab|ours|back.bin|{len(back)}\n")
    lab_files.send(back)
    _, received = file_arrival(ours)
    assert Path(received.path).read_bytes() == back


def test_require_tls_refuses_plain_text_on_both_ports(pki, tmp_path):
    cert, key = pki.issue("strict")
    with Server(HOST, 0, 0, tmp_path / "data", tls_cert=cert, tls_key=key, require_tls=True) as srv:
        for port in (srv.chat_port, srv.file_port):
            with Wire(port, "plain") as wire:
                wire.send("bob")  # lab-style, no newline
                wire.expect("ERROR: this server requires TLS")
                wire.expect_closed()
        net = Net(srv, tmp_path)
        try:
            assert tls_client(net, pki, "bob").list_users() == []
        finally:
            net.close()
    with pytest.raises(ValueError, match="require_tls needs a certificate"):
        Server(HOST, 0, 0, tmp_path / "data", require_tls=True)


# --- where passwords may travel -------------------------------------------------------------


@pytest.mark.parametrize("allow", [False, True])
def test_passwords_travel_only_over_tls_or_from_loopback(pki, tmp_path, allow, outside):
    cert, key = pki.issue("anywhere")
    srv = Server(
        "0.0.0.0", 0, 0, tmp_path / "data", tls_cert=cert, tls_key=key, allow_plaintext_login=allow
    )
    srv.start()
    net = Net(srv, tmp_path)
    try:
        register(net, "alice")  # over plain text from loopback: allowed
        plain = net.adopt(Wire(srv.chat_port, "alice-plain", host=outside))
        plain.send("alice\n")
        if allow:
            plain.expect("Password for alice:")
            plain.send(f"{PASSWORD}\n")
            plain.expect("Welcome, alice!")
            plain.close()
        else:
            plain.expect("ERROR: log in over TLS")
            plain.expect_closed()
        # A guest may chat in plain text from anywhere, but not register there.
        guest = net.adopt(Wire(srv.chat_port, "bob", host=outside))
        guest.send("bob\n")
        guest.expect("Welcome, bob!")
        guest.send(f"register {PASSWORD}\n")
        guest.expect("Registered bob." if allow else "ERROR: log in over TLS")
        # Over TLS from the same outside address, the password is welcome.
        wait_until(lambda: not _logged_in(net, "alice"), what="alice gone")
        alice = net.client("alice", PASSWORD, host=outside, tls_pin=srv.tls_fingerprint)
        assert alice.list_users() == ["bob"]
    finally:
        net.close()
        srv.stop()


def test_our_client_never_sends_a_password_in_clear_to_another_machine(pki, tmp_path, outside):
    cert, key = pki.issue("clear", ("localhost", "127.0.0.1", outside))
    # A server that would take it (as someone in the middle would ask for it).
    srv = Server(
        "0.0.0.0", 0, 0, tmp_path / "data", tls_cert=cert, tls_key=key, allow_plaintext_login=True
    )
    srv.start()
    net = Net(srv, tmp_path)
    try:
        register(net, "alice")
        with pytest.raises(TlsError, match="refusing to send a password in plain text"):
            net.client("alice", PASSWORD, host=outside)
        wait_until(lambda: not _logged_in(net, "alice"), what="the refused login gone")
        guest = net.client("guest", host=outside)
        with pytest.raises(TlsError, match="refusing to send a password in plain text"):
            guest.register(PASSWORD)
        with pytest.raises(TlsError, match="refusing to send a password in plain text"):
            guest.send_command(f"register {PASSWORD}")
        # The user may allow it.
        alice = net.client("alice", PASSWORD, host=outside, allow_plaintext_login=True)
        assert alice.list_users() == ["guest"]
    finally:
        net.close()
        srv.stop()


def test_a_session_secret_is_refused_over_plain_text_from_another_machine(
    pki, tmp_path, ctx, outside
):
    cert, key = pki.issue("secret", ("localhost", "127.0.0.1", outside))
    srv = Server("0.0.0.0", 0, 0, tmp_path / "data", tls_cert=cert, tls_key=key)
    srv.start()
    net = Net(srv, tmp_path)
    try:
        register(net, "alice")
        # Our client's login over TLS: the extensions, then the password; the secret after.
        chat = net.adopt(Wire(srv.chat_port, "alice", tls=ctx, host=outside))
        chat.send("alice\n")
        chat.expect("Password for alice:")
        chat.send(f"relaychat/1\n{PASSWORD}\n")
        chat.expect("Welcome, alice!")
        token = chat.line().removeprefix("[SESSION] ")
        plain = net.adopt(Wire(srv.file_port, "alice-file", host=outside))
        plain.send(f"alice {token}\n")
        plain.expect("ERROR: log in over TLS")
        plain.expect_closed()
        secure = net.adopt(Wire(srv.file_port, "alice-file", tls=ctx, host=outside))
        secure.send(f"alice {token}\n")
        assert secure.recv_exact(len(FILE_GREETING)) == FILE_GREETING
    finally:
        net.close()
        srv.stop()


def _logged_in(net: Net, name: str) -> bool:
    probe = net.chat("probe")
    probe.send("list\n")
    line = probe.line()
    probe.close()
    return name in line.removeprefix("Connected users: ").split(", ")


# --- how our client checks the server -------------------------------------------------------


def test_trust_on_first_use_remembers_the_server_and_refuses_a_change(pki, tmp_path):
    cert, key = pki.issue("tofu")
    known = tmp_path / "config" / "known_hosts"
    with Server(HOST, 0, 0, tmp_path / "data", tls_cert=cert, tls_key=key) as srv:
        net = Net(srv, tmp_path)
        try:
            # Not in the system's trust store: trusted on first use, and remembered.
            net.client("first", tls=True, known_hosts=known)
            first = fingerprint(cert)
            assert sorted(known.read_text().splitlines()) == sorted(
                [f"127.0.0.1:{srv.chat_port} {first}", f"127.0.0.1:{srv.file_port} {first}"]
            )
            net.client("again", tls=True, known_hosts=known)
            assert len(known.read_text().splitlines()) == 2

            # The server gets another certificate: the client refuses, loudly.
            other_cert, other_key = pki.issue("tofu-new")
            shutil.copy(other_cert, cert)
            shutil.copy(other_key, key)
            assert srv.reload_tls() == fingerprint(other_cert)
            with pytest.raises(TlsError) as refused:
                net.client("third", tls=True, known_hosts=known)
            text = str(refused.value)
            assert "CHANGED" in text
            assert first in text and fingerprint(other_cert) in text
            assert str(known) in text
            assert f"127.0.0.1:{srv.chat_port}" in text
        finally:
            net.close()


def test_the_default_known_hosts_file_is_under_the_users_config_dir(pki, tmp_path):
    cert, key = pki.issue("xdg")
    with Server(HOST, 0, 0, tmp_path / "data", tls_cert=cert, tls_key=key) as srv:
        env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "xdg")}
        args = ["--chat-port", str(srv.chat_port), "--file-port", str(srv.file_port)]
        done = subprocess.run(
            [sys.executable, "client.py", *args, "--username", "cli", "--tls"],
            cwd=REPO,
            input="list\n",
            capture_output=True,
            text=True,
            timeout=TIMEOUT * 4,
            env=env,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines()[:2] == ["Welcome, cli!", "Connected users: "]
        known = (tmp_path / "xdg" / "relaychat" / "known_hosts").read_text()
        assert f"127.0.0.1:{srv.chat_port} {fingerprint(cert)}" in known


def test_a_self_signed_ca_certificate_is_trusted_on_first_use_too(tmp_path):
    # `openssl req -x509` makes such certificates (CA:TRUE): webpki refuses them as a
    # server's own for another reason than an unknown issuer; still trust on first use.
    own = Pki(tmp_path / "own", "localhost")
    key = own.root / "ca.key"
    key.write_bytes(
        own.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    known = tmp_path / "known_hosts"
    with Server(HOST, 0, 0, tmp_path / "data", tls_cert=own.ca, tls_key=key) as srv:
        net = Net(srv, tmp_path)
        try:
            net.client("first", tls=True, known_hosts=known)
            assert f"127.0.0.1:{srv.chat_port} {fingerprint(own.ca)}" in known.read_text()
        finally:
            net.close()


def test_a_server_once_verified_by_a_ca_cannot_be_downgraded_to_self_signed(pki, tmp_path):
    # The system's trust store is the test CA here (rustls-native-certs reads
    # SSL_CERT_FILE), in a client process of its own.
    cert, key = pki.issue("public")
    config = tmp_path / "xdg"
    env = {**os.environ, "XDG_CONFIG_HOME": str(config), "SSL_CERT_FILE": str(pki.ca)}
    with Server(HOST, 0, 0, tmp_path / "data", tls_cert=cert, tls_key=key) as srv:

        def run(name: str) -> subprocess.CompletedProcess:
            ports = ["--chat-port", str(srv.chat_port), "--file-port", str(srv.file_port)]
            return subprocess.run(
                [sys.executable, "client.py", *ports, "--username", name, "--tls"],
                cwd=REPO,
                input="list\n",
                capture_output=True,
                text=True,
                timeout=TIMEOUT * 4,
                env=env,
            )

        first = run("first")
        assert first.returncode == 0, first.stdout + first.stderr
        known = (config / "relaychat" / "known_hosts").read_text()
        assert f"127.0.0.1:{srv.chat_port} verified-by-ca" in known
        # Someone in the middle presents a self-signed certificate for the same server.
        intruder = Pki(tmp_path / "intruder", "localhost")
        intruder_key = intruder.root / "ca.key"
        intruder_key.write_bytes(
            intruder.key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        shutil.copy(intruder.ca, cert)
        shutil.copy(intruder_key, key)
        srv.reload_tls()
        second = run("second")
        assert second.returncode == 1
        assert "WAS VERIFIED BY A CERTIFICATE AUTHORITY BEFORE" in second.stdout


def test_a_tls_client_turned_away_by_the_connection_gate_hears_plain_text(pki, tmp_path):
    cert, key = pki.issue("full")
    with (
        Server(HOST, 0, 0, tmp_path / "data", tls_cert=cert, tls_key=key, max_connections=1) as srv,
        Wire(srv.chat_port, "holder"),
        pytest.raises(TlsError, match="full server"),
    ):
        Client(
            HOST,
            srv.chat_port,
            srv.file_port,
            username="late",
            download_dir=tmp_path / "late",
            timeout=TIMEOUT,
            tls_ca=pki.ca,
        )


def test_certificate_errors_say_what_is_wrong(pki, tmp_path):
    def refusal(cert_key: tuple[Path, Path] | None, **options) -> str:
        tls = {} if cert_key is None else {"tls_cert": cert_key[0], "tls_key": cert_key[1]}
        with (
            Server(HOST, 0, 0, tmp_path / "data", **tls) as srv,
            pytest.raises(TlsError) as refused,
        ):
            Client(
                HOST,
                srv.chat_port,
                srv.file_port,
                username="eve",
                download_dir=tmp_path / "eve",
                timeout=TIMEOUT,
                **options,
            )
        return str(refused.value)

    assert "has expired" in refusal(pki.issue("old", expired=True), tls_ca=pki.ca)
    assert "wrong host name" in refusal(pki.issue("elsewhere", ("example.invalid",)), tls_ca=pki.ca)
    other = Pki(tmp_path / "other-ca", "another CA")
    assert "unknown issuer" in refusal(pki.issue("good"), tls_ca=other.ca)
    pin = "AB" * 32
    assert "does not match the pin" in refusal(pki.issue("pinned"), tls_pin=pin)
    assert "does not speak TLS" in refusal(None, tls=True)
    with pytest.raises(ValueError, match="not a SHA-256 fingerprint"):
        refusal(pki.issue("badpin"), tls_pin="12:34")
    with pytest.raises(ValueError, match="a CA file or a pin, not both"):
        refusal(pki.issue("both"), tls_ca=pki.ca, tls_pin=pin)


def test_the_ca_file_may_be_the_servers_own_self_signed_certificate(tmp_path):
    with Server(HOST, 0, 0, tmp_path / "data", tls_self_signed=True) as srv:
        own = tmp_path / "data" / "relaychat-tls-cert.pem"
        assert fingerprint(own) == srv.tls_fingerprint
        net = Net(srv, tmp_path)
        try:
            assert net.client("me", tls_ca=own).list_users() == []
        finally:
            net.close()


# The lab's handler dies on the handshake's bytes (not UTF-8), as the real one does.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_our_client_reports_a_plain_lab_server_as_speaking_no_tls(tmp_path):
    (tmp_path / "lab").mkdir()
    lab = LabStyleServer(tmp_path / "lab")
    try:
        with pytest.raises(TlsError, match="may not speak TLS"):
            Client(
                HOST,
                lab.chat_port,
                lab.file_port,
                username="eve",
                download_dir=tmp_path / "eve",
                timeout=1.0,
                tls=True,
                known_hosts=tmp_path / "kh",
            )
    finally:
        lab.close()


# --- the operator's side: self-signed, reload, hostile peers ---------------------------------


def client_at(ports: dict, tmp_path: Path, name: str, **tls) -> Client:
    """Our client logged in as `name` to a `server.py` process over TLS, `Welcome` taken."""
    client = Client(
        HOST,
        ports["CHAT"],
        ports["FILE"],
        username=name,
        download_dir=tmp_path / name,
        timeout=TIMEOUT,
        **tls,
    )
    assert next_of(client, Welcome).user == name
    return client


def _fingerprint_logged(out: list[str]) -> str:
    wait_until(lambda: any("SHA-256" in line for line in out), what="the TLS log line")
    line = next(line for line in out if "SHA-256" in line)
    return line.rsplit("SHA-256 ", 1)[1].strip()


def test_a_self_signed_certificate_is_made_once_and_kept(tmp_path):
    proc, ports, out = start_server(tmp_path, "--tls-self-signed")
    try:
        first = _fingerprint_logged(out)
        with client_at(ports, tmp_path, "x", tls_pin=first) as c:
            assert c.list_users() == []
    finally:
        assert stop_server(proc) == 0
    key = tmp_path / "data" / "relaychat-tls-key.pem"
    assert key.stat().st_mode & 0o777 == 0o600
    proc, _, out = start_server(tmp_path, "--tls-self-signed")
    try:
        assert _fingerprint_logged(out) == first
    finally:
        assert stop_server(proc) == 0


def test_sighup_reloads_the_certificate_without_dropping_connections(pki, tmp_path):
    cert, key = pki.issue("live")
    old = fingerprint(cert)
    proc, ports, out = start_server(tmp_path, "--tls-cert", str(cert), "--tls-key", str(key))

    def client(name: str, pin: str) -> Client:
        return client_at(ports, tmp_path, name, tls_pin=pin)

    try:
        before = client("before", old)
        new_cert, new_key = pki.issue("live-new")
        shutil.copy(new_cert, cert)
        shutil.copy(new_key, key)
        proc.send_signal(signal.SIGHUP)
        new = fingerprint(new_cert)
        wait_until(lambda: any(f"reloaded {cert}: SHA-256 {new}" in line for line in out))
        # The connection made before is untouched; new ones get the new certificate.
        after = client("after", new)
        before.msg("after", "still here")
        assert next_of(after, PrivateMessage).text == "still here"
        with pytest.raises(TlsError, match="does not match the pin"):
            client("stale", old)

        # A broken pair is refused and the good one stays.
        cert.write_text("not a certificate\n")
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: any("reload failed, keeping the old certificate" in x for x in out))
        client("later", new).close()
        before.close()
        after.close()
    finally:
        assert stop_server(proc) == 0


def _client_hello(ctx: ssl.SSLContext) -> bytes:
    """The first flight of a real TLS client (Python's OpenSSL)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_hostile_handshakes_are_dropped_and_cost_nobody_anything(pki, ctx, tmp_path):
    cert, key = pki.issue("hostile")
    proc, ports, out = start_server(
        tmp_path, "--tls-cert", str(cert), "--tls-key", str(key), "--handshake-timeout", "1"
    )
    try:
        alice = client_at(ports, tmp_path, "alice", tls_ca=pki.ca)
        # Garbage after a TLS first byte.
        with Wire(ports["CHAT"], "garbage") as wire:
            wire.send(b"\x16" + os.urandom(300))
            wire.expect_closed()
        # A stalled handshake: dropped at the handshake timeout.
        with Wire(ports["FILE"], "stall") as wire:
            wire.send(b"\x16\x03\x01")
            wire.expect_closed(timeout=TIMEOUT)
        # A truncated ClientHello, then the peer goes away.
        hello = _client_hello(ctx)
        with Wire(ports["CHAT"], "truncated") as wire:
            wire.send(hello[: len(hello) // 2])
        wait_until(
            lambda: sum("[TLS] handshake with" in line for line in out) >= 3,
            what="a log line for each hostile handshake",
        )
        assert any("not done within 1s" in line for line in out), out
        # Nobody else noticed.
        assert alice.list_users() == []
        bob = client_at(ports, tmp_path, "bob", tls_ca=pki.ca)
        bob.msg("alice", "fine")
        assert next_of(alice, PrivateMessage).text == "fine"
        alice.close()
        bob.close()
    finally:
        assert stop_server(proc) == 0


def test_a_tls_handshake_to_a_server_without_a_certificate_is_logged(tmp_path, ctx):
    proc, ports, out = start_server(tmp_path)
    try:
        with Wire(ports["CHAT"], "hello") as wire:
            wire.send(_client_hello(ctx))
            wire.expect_closed()
        wait_until(lambda: any("but this server has no certificate" in x for x in out))
    finally:
        assert stop_server(proc) == 0


# --- a real third-party client: openssl s_client ------------------------------------------


def test_openssl_s_client_logs_in_and_chats(tls_net, tls_server, pki):
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed (.ci/run installs it)")
    proc = subprocess.Popen(
        [
            openssl,
            "s_client",
            "-connect",
            f"{HOST}:{tls_server.chat_port}",
            "-servername",
            "localhost",
            "-CAfile",
            str(pki.ca),
            "-verify_return_error",
            "-quiet",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        for raw in proc.stdout:
            lines.put(raw.decode().rstrip("\n"))

    threading.Thread(target=read, daemon=True).start()

    def say(text: str) -> None:
        proc.stdin.write(f"{text}\n".encode())
        proc.stdin.flush()

    def expect(text: str) -> None:
        while True:
            try:
                line = lines.get(timeout=TIMEOUT)
            except queue.Empty:
                raise AssertionError(f"s_client never printed {text!r}") from None
            if line == text:
                return

    try:
        say("carol")
        expect("Welcome, carol!")
        dave = tls_client(tls_net, pki, "dave")
        dave.msg("carol", "hello over openssl")
        expect("[PRIVATE from dave]: hello over openssl")
        say("msg dave hi from s_client")
        assert next_of(dave, PrivateMessage).text == "hi from s_client"
        say("list")
        expect("Connected users: dave")
    finally:
        proc.kill()
        proc.wait(timeout=TIMEOUT)
        proc.stdin.close()
        proc.stdout.close()


def test_a_file_socket_over_tls_greets_alone(tls_net, ctx):
    tls_net.chat("gina", tls=ctx)
    wire = tls_net.wire("file", "gina", tls=ctx)
    wire.send("gina")
    assert wire.recv_once(timeout=2) == FILE_GREETING


def test_tls_options_are_checked(tmp_path, pki):
    cert, _ = pki.issue("half")
    with pytest.raises(ValueError, match="go together"):
        Server(HOST, 0, 0, tmp_path, tls_cert=cert)
    with pytest.raises(ValueError, match="not both"):
        Server(HOST, 0, 0, tmp_path, tls_cert=cert, tls_key=cert, tls_self_signed=True)
    bad = Server(HOST, 0, 0, tmp_path, tls_cert=cert, tls_key=tmp_path / "missing.key")
    with pytest.raises(RelaychatError, match=r"missing\.key"):
        bad.start()
