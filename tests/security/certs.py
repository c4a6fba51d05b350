"""Throwaway X.509 material for the TLS tests, made with the ``openssl`` command-line tool.

A test CA signs a server certificate (CN and SAN ``localhost`` / ``127.0.0.1``) and a client
certificate; a second, unrelated CA signs a client certificate the node must not trust.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path


def _openssl(*args: str, cwd: Path) -> None:
    binary = shutil.which("openssl")
    if binary is None:
        raise RuntimeError("the openssl command-line tool is needed for the TLS tests")
    done = subprocess.run([binary, *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed: {done.stderr}")


def _key(name: str, folder: Path) -> Path:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-out", f"{name}.key", cwd=folder)
    return folder / f"{name}.key"


def _ca(name: str, folder: Path) -> tuple[Path, Path]:
    key = _key(name, folder)
    _openssl("req", "-x509", "-new", "-key", key.name, "-out", f"{name}.pem", "-days", "2",
             "-subj", f"/CN=cxrnode test {name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=folder)
    return folder / f"{name}.pem", key


def _leaf(name: str, cn: str, ca: tuple[Path, Path], folder: Path, extensions: str) -> tuple[Path, Path]:
    key = _key(name, folder)
    (folder / f"{name}.ext").write_text(extensions)
    _openssl("req", "-new", "-key", key.name, "-out", f"{name}.csr", "-subj", f"/CN={cn}",
             cwd=folder)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", str(ca[0]), "-CAkey", str(ca[1]),
             "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext",
             cwd=folder)
    return folder / f"{name}.pem", key


@dataclass(frozen=True)
class Pki:
    """Paths of the test CA, the node's certificate and two client certificates (PEM)."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path
    stranger_key: Path

    def client_context(self, *, with_certificate: bool = True,
                       stranger: bool = False) -> ssl.SSLContext:
        """A client-side context that trusts the test CA, with or without a client certificate."""
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca))
        if stranger:
            context.load_cert_chain(self.stranger_cert, self.stranger_key)
        elif with_certificate:
            context.load_cert_chain(self.client_cert, self.client_key)
        return context


def make_pki(folder: Path) -> Pki:
    """Create a CA, a server certificate for localhost/127.0.0.1 and client certificates."""
    folder.mkdir(parents=True, exist_ok=True)
    ca = _ca("ca", folder)
    other_ca = _ca("other-ca", folder)
    server = _leaf("server", "localhost", ca, folder,
                   "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                   "extendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature\n")
    client_ext = "extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature\n"
    client = _leaf("client", "MODALITY-1", ca, folder, client_ext)
    stranger = _leaf("stranger", "STRANGER", other_ca, folder, client_ext)
    return Pki(ca=ca[0], server_cert=server[0], server_key=server[1], client_cert=client[0],
               client_key=client[1], stranger_cert=stranger[0], stranger_key=stranger[1])
