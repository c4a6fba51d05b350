"""Write a queue made by cxrnode 0.1.0 (before Alembic), holding a job in every state.

Run from a checkout of that release (commit 6ffeb2f):
``PYTHONPATH=. python tests/data/queues/make_v010_queue.py tests/data/queues/v0.1.0.sqlite3``.
Kept for the record; the migration test reads the committed file.
"""

import shutil
import sys
import tempfile
from pathlib import Path

from node.queue import repository as repo
from node.queue.db import DATABASE_FILE, Database
from node.queue.states import JobStatus

WORKER, SENDER = "oldhost:1:work", "oldhost:1:send"


def main(out: Path) -> None:
    work = Path(tempfile.mkdtemp())
    db = Database(work)

    def new_job(n: int) -> int:
        received = repo.ReceivedInstance(
            f"1.2.826.0.1.3680043.8.498.10{n}", "1.2.840.10008.5.1.4.1.1.1.1", "1.2.826.0.1.3680043.8.498.100",
            f"1.2.826.0.1.3680043.8.498.100.{n}", "1.2.840.10008.1.2.1", f"/var/cxrnode/archive/{n}.dcm",
            1000 + n, "MODALITY")
        job_id = repo.enqueue(db, received).job_id
        assert repo.claim(db, JobStatus.QUEUED, JobStatus.PROCESSING, WORKER, 600) == job_id
        return job_id

    def encoded(n: int) -> int:
        job_id = new_job(n)
        repo.mark_encoded(db, job_id, WORKER, repo.EncodedResults(
            0.25 + n / 100, f"/var/cxrnode/results/{job_id}/seg.dcm", f"/var/cxrnode/results/{job_id}/sr.dcm",
            f"1.2.826.0.1.3680043.8.498.20{job_id}", f"1.2.826.0.1.3680043.8.498.30{job_id}"), ["pacs", "backup"])
        return job_id

    new_job(1)                                                   # processing
    encoded(2)                                                   # encoded
    job = encoded(3)                                             # sending, one of two delivered
    assert repo.claim(db, JobStatus.ENCODED, JobStatus.SENDING, SENDER, 600) == 2
    repo.record_delivery(db, 2, "pacs", None)
    repo.record_delivery(db, 2, "backup", "association with backup refused")
    repo.finish_sending(db, 2, SENDER, max_attempts=5, delay_s=3600.0)  # encoded, retry in an hour
    assert repo.claim(db, JobStatus.ENCODED, JobStatus.SENDING, SENDER, 600) == job  # stays sending
    repo.record_delivery(db, job, "pacs", None)
    done = encoded(4)                                            # done
    assert repo.claim(db, JobStatus.ENCODED, JobStatus.SENDING, SENDER, 600) == done
    for name in ("pacs", "backup"):
        repo.record_delivery(db, done, name, None)
    repo.finish_sending(db, done, SENDER, max_attempts=5, delay_s=0.0)
    repo.mark_discarded(db, new_job(5), WORKER, "ViewPosition LL is not analysed")  # discarded
    failed = encoded(6)                                          # failed while sending
    assert repo.claim(db, JobStatus.ENCODED, JobStatus.SENDING, SENDER, 600) == failed
    repo.record_delivery(db, failed, "pacs", "pacs answered C-STORE with status 0xA900")
    repo.finish_sending(db, failed, SENDER, max_attempts=1, delay_s=0.0, give_up=True)
    repo.fail_attempt(db, new_job(7), WORKER, "RuntimeError: out of memory", max_attempts=1,
                      retry_delay_s=0.0)                         # failed in inference
    received = repo.ReceivedInstance(
        "1.2.826.0.1.3680043.8.498.108", "1.2.840.10008.5.1.4.1.1.1.1", "1.2.826.0.1.3680043.8.498.100",
        "1.2.826.0.1.3680043.8.498.100.8", "1.2.840.10008.1.2.1", "/var/cxrnode/archive/8.dcm", 1008, "MODALITY")
    repo.enqueue(db, received)                                   # queued
    with db.session() as session:
        from node.queue.tables import Job
        print({job.id: job.status for job in session.query(Job).order_by(Job.id)})
    db.dispose()
    shutil.copy(work / DATABASE_FILE, out)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
