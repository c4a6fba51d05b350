"""The sender sends the archived files as they are (node.sender.scu): no parse, no re-encoding per
destination, when the peer accepted the file's transfer syntax; a peer that accepted only another
one still gets the object, converted. Nagle is off on the sender's connection.

The peers are pynetdicom Storage SCPs on loopback that record the bytes they receive.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.filereader import read_dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.dsutils import split_dataset

from node import dicom
from node.sender import scu
from node.settings import Destination
from tests.dicom_factory import FIXTURE_DIR, make_cr, make_dx
from tests.servers import free_port


class Peer:
    """A Storage SCP accepting ``syntaxes`` only; records (transfer syntax, data set bytes) per C-STORE."""

    def __init__(self, syntaxes: list[str]) -> None:
        self.port = free_port()
        self.received: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        ae = AE(ae_title="PEER")
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, syntaxes)
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._on_store)])

    def _on_store(self, event: evt.Event) -> int:
        with self.lock:
            self.received.append((str(event.context.transfer_syntax), event.request.DataSet.getvalue()))
        return 0x0000

    def destination(self) -> Destination:
        return Destination(name="peer", ae_title="PEER", host="127.0.0.1", port=self.port)


@pytest.fixture
def peers() -> Iterator[list[Peer]]:
    started: list[Peer] = []
    yield started
    for peer in started:
        peer.server.shutdown()


@pytest.fixture
def archived(tmp_path: Path) -> list[Path]:
    """Two result-like files in Explicit VR Little Endian, as the node archives its results."""
    files = []
    for name, ds in (("a.dcm", make_dx(FIXTURE_DIR / "MCUCXR_0017_0.png", size=(64, 64))),
                     ("b.dcm", make_cr(FIXTURE_DIR / "MCUCXR_0017_0.png", size=(48, 48)))):
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        ds.save_as(tmp_path / name, enforce_file_format=True)
        files.append(tmp_path / name)
    return files


def data_set_bytes(path: Path) -> bytes:
    """The file's bytes after the preamble and the file meta information: what goes on the wire."""
    _meta, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def test_files_go_out_byte_for_byte_as_archived_without_being_parsed(
        peers: list[Peer], archived: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    peer = Peer([ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    peers.append(peer)

    def no_parse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the sender parsed a file it could send as it is")

    monkeypatch.setattr(scu, "dcmread", no_parse)
    nagle_off: list[int] = []

    def spy(sock: socket.socket) -> None:
        dicom.no_delay(sock)
        nagle_off.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    monkeypatch.setattr(scu, "no_delay", spy)
    scu.store(peer.destination(), archived, "CXRNODE", 10.0)
    assert [syntax for syntax, _ in peer.received] == [ExplicitVRLittleEndian] * 2
    assert [data for _, data in peer.received] == [data_set_bytes(f) for f in archived]
    assert len(nagle_off) == 1 and nagle_off[0] != 0


def test_a_peer_that_accepts_only_implicit_vr_gets_the_objects_converted(
        peers: list[Peer], archived: list[Path]) -> None:
    peer = Peer([ImplicitVRLittleEndian])
    peers.append(peer)
    scu.store(peer.destination(), archived, "CXRNODE", 10.0)
    assert [syntax for syntax, _ in peer.received] == [ImplicitVRLittleEndian] * 2
    for (_, data), path in zip(peer.received, archived, strict=True):
        got = read_dataset(BytesIO(data), is_implicit_VR=True, is_little_endian=True)
        sent = dcmread(path)
        assert got.SOPInstanceUID == sent.SOPInstanceUID
        assert got.PixelData == sent.PixelData
