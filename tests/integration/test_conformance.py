"""docs/CONFORMANCE.md stays true: its machine-checked tables against real negotiation.

Nothing here compares the document with the node's constants. The real listener
(:func:`node.scp.server.start` on the shipped ``config/cxrnode.toml``) is offered every SOP class
pynetdicom and pydicom know, in every transfer syntax pydicom knows, by a pynetdicom requestor;
what it accepts must be exactly what the document lists, and the reverse. The sender's real code
(:func:`node.sender.scu.store` with the objects the real pipeline encodes, and
:func:`node.sender.scu.echo`) associates with a recording pynetdicom peer; the presentation
contexts it proposes must be exactly the document's, and each status the document says the sender
treats in some way is answered by that peer and the sender's reaction compared.

Each table is found by the line above it that names this file and the table's id, e.g.
``(table `scp-sop-classes`)``.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from pydicom import uid as pydicom_uid
from pydicom._uid_dict import UID_dictionary
from pydicom.uid import UID, UncompressedTransferSyntaxes
from pynetdicom import AE, evt, sop_class
from pynetdicom.presentation import AllStoragePresentationContexts

from models.identity import ModelIdentity
from models.inference import LungAnalysis
from node.archive import open_archive
from node.dicom import ANALYSED_SOP_CLASSES, CR_IMAGE_STORAGE, STORAGE_SOP_CLASSES, VERIFICATION, Status
from node.errors import PermanentSendError, TransientSendError
from node.queue.db import Database
from node.scp import server as scp_server
from node.sender import scu
from node.settings import Destination, NodeSettings, Settings, load_settings
from node.worker.pipeline import Pipeline
from tests.dicom_factory import make_dx
from tests.servers import free_port, wait_until

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "CONFORMANCE.md"
CONFIG = REPO / "config" / "cxrnode.toml"
MAX_CONTEXTS = 128  # presentation contexts per association (context ids 1, 3, ..., 255)
_UID_IN_CELL = re.compile(r"`(\d+(?:\.\d+)+)`")
_STATUS_IN_CELL = re.compile(r"0x[0-9A-Fa-f]{4}")


# --- the document ---------------------------------------------------------------------------


def doc_table(table_id: str) -> list[dict[str, str]]:
    """Rows of the markdown table that follows the line naming ``table_id``, keyed by lower-case header."""
    lines = DOC.read_text(encoding="utf-8").splitlines()
    marker = f"(table `{table_id}`)"
    starts = [i for i, line in enumerate(lines) if marker in line and "test_conformance.py" in line]
    assert len(starts) == 1, f"docs/CONFORMANCE.md must name table {table_id!r} once with this test's name"
    i = starts[0] + 1
    while i < len(lines) and not lines[i].lstrip().startswith("|"):
        assert not lines[i].startswith("#"), f"table {table_id!r}: no table before the next heading"
        i += 1
    block = []
    while i < len(lines) and lines[i].lstrip().startswith("|"):
        block.append([cell.strip() for cell in lines[i].strip().strip("|").split("|")])
        i += 1
    assert len(block) >= 3, f"table {table_id!r} has no rows"
    header = [h.lower() for h in block[0]]
    rows = [dict(zip(header, cells, strict=True)) for cells in block[2:]]
    return rows


def uids_in(cell: str) -> list[str]:
    return _UID_IN_CELL.findall(cell)


def one_uid(cell: str) -> str:
    (found,) = uids_in(cell)
    return found


def statuses_in(cell: str) -> list[int]:
    return [int(code, 16) for code in _STATUS_IN_CELL.findall(cell)]


def first_word(cell: str) -> str:
    return re.sub(r"[^a-z]", " ", cell.lower()).split()[0]


def describe(uids: set[str]) -> str:
    return ", ".join(f"{UID(u).name} ({u})" for u in sorted(uids)) or "none"


# --- what pynetdicom and pydicom know -------------------------------------------------------


def known_sop_classes() -> list[str]:
    """Every SOP class UID in ``pynetdicom.sop_class`` (storage and not) and in pydicom's dictionary."""
    from_pynetdicom = {str(v) for v in vars(sop_class).values() if isinstance(v, sop_class.SOPClass)}
    from_pydicom = {uid for uid, entry in UID_dictionary.items() if "SOP Class" in entry[1]}
    return sorted(from_pynetdicom | from_pydicom)


def known_transfer_syntaxes() -> list[str]:
    """Every transfer syntax UID pydicom knows (its dictionary, retired ones too, and its lists)."""
    from_dictionary = {uid for uid, entry in UID_dictionary.items() if entry[1] == "Transfer Syntax"}
    return sorted(from_dictionary | {str(u) for u in pydicom_uid.AllTransferSyntaxes})


def chunks(items: list, size: int = MAX_CONTEXTS) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


# --- the real listener -----------------------------------------------------------------------


@dataclass
class Listener:
    port: int
    settings: Settings
    ae: AE


def start_listener(data_dir: Path, **env: str) -> tuple[Listener, Callable[[], None]]:
    """The node's listener on the shipped config, on a free loopback port."""
    port = free_port()
    settings = load_settings(CONFIG, env={
        "CXRNODE_NODE_HOST": "127.0.0.1", "CXRNODE_NODE_PORT": str(port),
        "CXRNODE_NODE_DATA_DIR": str(data_dir), "CXRNODE_NODE_MIN_FREE_DISK_MB": "1", **env})
    db, archive = Database(settings.data_path), open_archive(settings)
    ae, _ = scp_server.start(settings, db, archive)

    def stop() -> None:
        wait_until(lambda: not ae.active_associations, 10, what="the listener's associations ended")
        ae.shutdown()
        db.dispose()

    return Listener(port, settings, ae), stop


@pytest.fixture(scope="module")
def listener(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Listener]:
    running, stop = start_listener(tmp_path_factory.mktemp("conformance") / "var")
    yield running
    stop()


def propose(port: int, contexts: list[tuple[str, list[str]]], calling: str = "CONFORMANCE",
            called: str = "CXRNODE") -> list[tuple[str, str]]:
    """(abstract syntax, transfer syntax) of every context the listener accepts, over as many
    associations as ``contexts`` needs."""
    accepted = []
    for part in chunks(contexts):
        requestor = AE(ae_title=calling)
        for abstract_syntax, transfer_syntaxes in part:
            requestor.add_requested_context(abstract_syntax, transfer_syntaxes)
        assoc = requestor.associate("127.0.0.1", port, ae_title=called)
        answer = assoc.acceptor.primitive
        assert answer is not None and answer.result == 0, "the listener refused an association of this test"
        # (with no context accepted, pynetdicom's requestor aborts the association it was granted)
        accepted += [(str(c.abstract_syntax), str(c.transfer_syntax[0])) for c in assoc.accepted_contexts]
        if assoc.is_established:
            assoc.release()
    return accepted


def preference(port: int, abstract_syntax: str, offered: list[str], count: int) -> list[str]:
    """The first ``count`` transfer syntaxes the listener picks from one context offering ``offered``,
    each pick taken out of the next offer."""
    left, picked = list(offered), []
    for _ in range(count):
        (( _, chosen),) = propose(port, [(abstract_syntax, left)])
        picked.append(chosen)
        left.remove(chosen)
    return picked


# --- a recording peer for the sender ----------------------------------------------------------


@dataclass
class Recorder:
    """A pynetdicom Storage and Verification SCP that records each association's request."""

    port: int
    status: int = 0x0000  # what it answers to a C-STORE
    requests: list[dict] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_accepted(self, event: evt.Event) -> None:
        requestor = event.assoc.requestor
        with self.lock:
            self.requests.append({
                "calling_ae_title": requestor.ae_title,
                "maximum_length": requestor.maximum_length,
                "contexts": [(str(c.abstract_syntax), tuple(str(t) for t in c.transfer_syntax))
                             for c in requestor.requested_contexts],
            })

    def taken(self) -> list[dict]:
        with self.lock:
            requests, self.requests = self.requests, []
        return requests


@pytest.fixture(scope="module")
def recorder() -> Iterator[Recorder]:
    rec = Recorder(port=free_port())
    peer = AE(ae_title="RECORDER")
    for context in AllStoragePresentationContexts:
        peer.add_supported_context(context.abstract_syntax, UncompressedTransferSyntaxes)
    peer.add_supported_context(VERIFICATION, UncompressedTransferSyntaxes)
    server = peer.start_server(("127.0.0.1", rec.port), block=False, evt_handlers=[
        (evt.EVT_ACCEPTED, rec.on_accepted), (evt.EVT_C_STORE, lambda event: rec.status)])
    yield rec
    wait_until(lambda: not peer.active_associations, 10, what="the recorder's associations ended")
    server.shutdown()


class StandInAnalyzer:
    """Two lung-shaped ellipses and a fixed score in place of the networks: the pipeline, encoders
    and sender around it are the real ones."""

    tb_threshold = 0.5
    identity = ModelIdentity("conformance-stand-in", "0", "0" * 64)

    def analyze(self, pixels: np.ndarray) -> LungAnalysis:
        rows, columns = pixels.shape
        y, x = np.ogrid[:rows, :columns]

        def ellipse(cx: float) -> np.ndarray:
            return ((x - cx) / (0.17 * columns)) ** 2 + ((y - 0.45 * rows) / (0.3 * rows)) ** 2 <= 1

        image_left, image_right = ellipse(0.28 * columns), ellipse(0.72 * columns)
        return LungAnalysis(lung_mask=image_left | image_right, image_left=image_left, image_right=image_right,
                            tb_score=0.3, segmenter=self.identity, tb_model=self.identity)


@pytest.fixture(scope="module")
def sending(tmp_path_factory: pytest.TempPathFactory,
            recorder: Recorder) -> tuple[Settings, Destination, list[Path]]:
    """Settings, a destination (the recorder) receiving every output kind, and the result files the
    real pipeline encodes for a DX, written as the node archives them."""
    folder = tmp_path_factory.mktemp("results")
    dest = Destination(ae_title="RECORDER", host="127.0.0.1", port=recorder.port, name="recorder",
                       outputs=("seg", "sr", "sc"))
    settings = dataclasses.replace(
        load_settings(CONFIG, env={"CXRNODE_NODE_DATA_DIR": str(folder / "var")}), destinations=(dest,))
    source = folder / "source.dcm"
    make_dx(np.tile(np.linspace(0, 255, 256), (256, 1)), size=None).save_as(source, enforce_file_format=True)
    outcome = Pipeline(settings, StandInAnalyzer()).run(source)  # type: ignore[arg-type]
    files = []
    for result in outcome.results:
        path = folder / f"{result.kind}.dcm"
        path.write_bytes(result.data)
        files.append(path)
    return settings, dest, files


# --- the tests -------------------------------------------------------------------------------


def test_the_sop_classes_the_listener_accepts_are_exactly_the_documented_ones(listener: Listener) -> None:
    every_syntax = known_transfer_syntaxes()
    offered = known_sop_classes()
    assert len(offered) > 250 and {str(c) for c in STORAGE_SOP_CLASSES} <= set(offered)
    accepted = {abstract for abstract, _ in propose(listener.port, [(u, every_syntax) for u in offered])}

    rows = doc_table("scp-sop-classes")
    documented = [one_uid(row["uid"]) for row in rows]
    assert len(documented) == len(set(documented)), "a SOP class is listed twice"
    assert not accepted - set(documented), f"accepted but not documented: {describe(accepted - set(documented))}"
    assert not set(documented) - accepted, f"documented but refused: {describe(set(documented) - accepted)}"

    handling = {one_uid(row["uid"]): first_word(row["handling"]) for row in rows}
    assert {u for u, h in handling.items() if h == "verification"} == {VERIFICATION}
    analysed = {u for u, h in handling.items() if h == "analysed"}
    assert analysed == {str(u) for u in ANALYSED_SOP_CLASSES}, (
        f"marked analysed: {describe(analysed)}; node.dicom.ANALYSED_SOP_CLASSES: "
        f"{describe({str(u) for u in ANALYSED_SOP_CLASSES})}")
    assert set(handling.values()) == {"verification", "analysed", "discarded"}


def test_the_transfer_syntaxes_the_listener_accepts_are_exactly_the_documented_ones(listener: Listener) -> None:
    """Every storage SOP class the listener accepts, and Verification, offered in each transfer syntax
    pydicom knows as a context of its own."""
    storage = sorted(one_uid(row["uid"]) for row in doc_table("scp-sop-classes")
                     if first_word(row["handling"]) != "verification")
    syntaxes = known_transfer_syntaxes()
    contexts = [(u, [ts]) for ts in syntaxes for u in storage] + [(VERIFICATION, [ts]) for ts in syntaxes]
    per_class: dict[str, set[str]] = {}
    for abstract, syntax in propose(listener.port, contexts):
        per_class.setdefault(abstract, set()).add(syntax)
    refused = {u for u in storage if u not in per_class}
    assert not refused, f"documented storage classes refused in every transfer syntax: {describe(refused)}"
    storage_sets = {frozenset(per_class[u]) for u in storage}
    assert len(storage_sets) == 1, "storage SOP classes differ in the transfer syntaxes they are accepted in"
    (storage_accepted,) = storage_sets
    verification_accepted = per_class.get(VERIFICATION, set())

    rows = doc_table("scp-transfer-syntaxes")
    documented = [one_uid(row["uid"]) for row in rows]
    assert len(documented) == len(set(documented)), "a transfer syntax is listed twice"
    for column, accepted in (("storage sop classes", storage_accepted), ("verification", verification_accepted)):
        listed = {one_uid(row["uid"]) for row in rows if first_word(row[column]) == "yes"}
        assert {first_word(row[column]) for row in rows} <= {"yes", "no"}
        assert not accepted - listed, f"{column}: accepted but not documented: {describe(accepted - listed)}"
        assert not listed - accepted, f"{column}: documented but refused: {describe(listed - accepted)}"
    assert set(documented) == storage_accepted | verification_accepted, "a row says no in both columns"

    # The node's preference, whatever the peer's order: the table's order (offered here reversed).
    storage_rows = [one_uid(row["uid"]) for row in rows if first_word(row["storage sop classes"]) == "yes"]
    chosen = preference(listener.port, CR_IMAGE_STORAGE, syntaxes[::-1], len(storage_rows))
    assert chosen == storage_rows, f"the listener prefers {chosen}, the table's order is {storage_rows}"


def test_the_sender_proposes_exactly_the_documented_contexts(recorder: Recorder, sending) -> None:
    """``scu.store`` with every result kind the pipeline makes, and ``scu.echo``, against a recording peer."""
    settings, dest, files = sending
    recorder.taken()
    scu.store(dest, files, settings.node.ae_title, settings.send.timeout_s)
    (stored,) = recorder.taken()
    assert scu.echo(dest, settings.node.ae_title) == 0x0000
    (echoed,) = recorder.taken()
    proposed = {("store", abstract, syntaxes) for abstract, syntaxes in stored["contexts"]}
    proposed |= {("echo", abstract, syntaxes) for abstract, syntaxes in echoed["contexts"]}

    documented = set()
    for row in doc_table("scu-contexts"):
        activity = first_word(row["activity"])
        assert activity in {"store", "echo"}, f"unknown activity {row['activity']!r}"
        syntaxes = tuple(uids_in(row["transfer syntaxes proposed, in order"]))
        documented.add((activity, one_uid(row["uid"]), syntaxes))
    assert not proposed - documented, f"proposed but not documented: {sorted(proposed - documented)}"
    assert not documented - proposed, f"documented but never proposed: {sorted(documented - proposed)}"


def test_the_sender_treats_each_documented_status_as_documented(recorder: Recorder, sending) -> None:
    settings, dest, files = sending
    sr = next(f for f in files if f.stem == "sr")
    outcomes = {None: "success", TransientSendError: "transient", PermanentSendError: "permanent"}
    checked = 0
    try:
        for row in doc_table("scu-statuses"):
            expected = first_word(row["treatment"])
            assert expected in outcomes.values(), f"unknown treatment {row['treatment']!r}"
            codes = statuses_in(row["status received"])
            assert codes, f"no status code in {row['status received']!r}"
            for code in codes:
                recorder.status = code
                raised = None
                try:
                    scu.store(dest, [sr], settings.node.ae_title, settings.send.timeout_s)
                except (TransientSendError, PermanentSendError) as exc:
                    raised = type(exc)
                assert outcomes[raised] == expected, f"0x{code:04X}: the sender's treatment is {outcomes[raised]}"
                checked += 1
    finally:
        recorder.status = 0x0000
        recorder.taken()
    assert checked >= 8


def test_every_status_the_node_defines_is_in_the_status_table() -> None:
    documented = {code for row in doc_table("scp-statuses") for code in statuses_in(row["status"])}
    defined = {name: value for name, value in vars(Status).items() if name.isupper()}
    missing = {name: f"0x{value:04X}" for name, value in defined.items() if value not in documented}
    assert not missing, f"node.dicom.Status codes missing from the status table: {missing}"


def test_the_association_parameters_are_as_documented(listener: Listener, recorder: Recorder, sending,
                                                        tmp_path: Path) -> None:
    rows = {row["parameter"]: row["value"] for row in doc_table("parameters")}

    def number(name: str) -> int:
        return int(re.sub(r"[^0-9]", "", rows[name]))

    shipped, defaults = load_settings(CONFIG, env={}), NodeSettings()
    assert rows["AE title"].strip("`") == shipped.node.ae_title == defaults.ae_title
    assert number("Port") == shipped.node.port == defaults.port
    assert first_word(rows["Calling AE titles accepted"]) == "any"
    assert shipped.node.allowed_calling_ae_titles == defaults.allowed_calling_ae_titles == ()
    assert first_word(rows["TLS on the listener"]) == "off" and not shipped.tls.enabled
    assert number("Listener network, ACSE and DIMSE timeout (s)") == shipped.node.network_timeout_s == \
        listener.ae.network_timeout == listener.ae.dimse_timeout == listener.ae.acse_timeout
    assert number("Sender association and DIMSE timeout (s)") == shipped.send.timeout_s
    assert number("`cxrnode echo` timeout (s)") == inspect.signature(scu.echo).parameters["timeout_s"].default

    # Called AE title: any is accepted (and echoed back).
    requestor = AE(ae_title="CONFORMANCE")
    requestor.add_requested_context(VERIFICATION)
    assoc = requestor.associate("127.0.0.1", listener.port, ae_title="NOT-CXRNODE")
    assert first_word(rows["Called AE title checked"]) == "no"
    assert assoc.is_established
    # Maximum PDU length the listener receives, from its A-ASSOCIATE-AC.
    assert number("Maximum PDU length received by the listener") == assoc.acceptor.maximum_length
    assoc.release()

    # Concurrent associations: the documented number is accepted, one more refused (transient, local limit).
    wait_until(lambda: not listener.ae.active_associations, 10, what="the listener's associations ended")
    limit, held = number("Maximum concurrent associations (listener)"), []
    try:
        for _ in range(limit):
            held.append(requestor.associate("127.0.0.1", listener.port, ae_title="CXRNODE"))
        assert all(a.is_established for a in held), f"fewer than {limit} concurrent associations accepted"
        extra = requestor.associate("127.0.0.1", listener.port, ae_title="CXRNODE")
        assert extra.is_rejected, f"association number {limit + 1} was not rejected"
        rejection = extra.acceptor.primitive
        assert (rejection.result, rejection.result_source, rejection.diagnostic) == (2, 3, 2)
    finally:
        for a in held:
            if a.is_established:
                a.release()

    # Calling AE title not on a configured allow-list: rejected permanently, "calling AE title not recognised".
    guarded, stop = start_listener(tmp_path / "var", CXRNODE_NODE_ALLOWED_CALLING_AE_TITLES="PACS")
    try:
        stranger = AE(ae_title="STRANGER")
        stranger.add_requested_context(VERIFICATION)
        refused = stranger.associate("127.0.0.1", guarded.port, ae_title="CXRNODE")
        assert refused.is_rejected
        rejection = refused.acceptor.primitive
        assert (rejection.result, rejection.result_source, rejection.diagnostic) == (1, 1, 3)
    finally:
        stop()

    # The sender's A-ASSOCIATE-RQ: calling AE title and the maximum PDU length it receives.
    settings, dest, files = sending
    recorder.taken()
    scu.store(dest, files[:1], settings.node.ae_title, settings.send.timeout_s)
    (request,) = recorder.taken()
    assert request["calling_ae_title"] == settings.node.ae_title
    assert number("Maximum PDU length received by the sender and `cxrnode echo`") == request["maximum_length"]
