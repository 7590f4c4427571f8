"""A throwaway certificate authority for TLS tests (``openssl`` CLI; no Python dependency).

    ca = TestCA(tmp_path / "ca")
    server = ca.issue("broker", dns=["localhost"], ips=["127.0.0.1"])
    client = ca.issue("fleet-host-compute-1", client=True)   # CN = the broker login

Every certificate is an EC P-256 key signed by the CA, valid for a day. A second ``TestCA``
is "the wrong CA" for refusal tests.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

__all__ = ["IssuedCert", "TestCA", "have_openssl"]


def have_openssl() -> bool:
    return shutil.which("openssl") is not None


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(
        ["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {done.stderr.strip()}")


@dataclasses.dataclass(frozen=True, slots=True)
class IssuedCert:
    cert: Path
    key: Path


class TestCA:
    """A self-signed CA in ``directory``; ``cert`` is its PEM certificate."""

    __test__ = False  # not a pytest test class

    def __init__(self, directory: Path, name: str = "Fleet Test CA") -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cert = self.dir / "ca.pem"
        self.key = self.dir / "ca.key"
        _openssl(
            "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-days", "2", "-subj", f"/CN={name}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout", str(self.key), "-out", str(self.cert),
            cwd=self.dir,
        )  # fmt: skip
        self._serial = 1

    def issue(
        self,
        common_name: str,
        *,
        dns: Sequence[str] = (),
        ips: Sequence[str] = (),
        client: bool = False,
        stem: str | None = None,
    ) -> IssuedCert:
        """A certificate for ``common_name`` (server: with the given subjectAltNames)."""
        stem = stem or common_name.replace("/", "_")
        key, csr, cert = (self.dir / f"{stem}{ext}" for ext in (".key", ".csr", ".pem"))
        ext_file = self.dir / f"{stem}.ext"
        lines = ["basicConstraints=CA:FALSE", "keyUsage=critical,digitalSignature,keyEncipherment"]
        lines.append(f"extendedKeyUsage={'clientAuth' if client else 'serverAuth,clientAuth'}")
        alt = [f"DNS:{d}" for d in dns] + [f"IP:{i}" for i in ips]
        if alt:
            lines.append("subjectAltName=" + ",".join(alt))
        ext_file.write_text("\n".join(lines) + "\n")
        _openssl(
            "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-subj", f"/CN={common_name}", "-keyout", str(key), "-out", str(csr),
            cwd=self.dir,
        )  # fmt: skip
        self._serial += 1
        _openssl(
            "x509", "-req", "-in", str(csr), "-CA", str(self.cert), "-CAkey", str(self.key),
            "-set_serial", str(self._serial), "-days", "1", "-extfile", str(ext_file),
            "-out", str(cert),
            cwd=self.dir,
        )  # fmt: skip
        return IssuedCert(cert, key)
