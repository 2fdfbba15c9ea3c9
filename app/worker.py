"""`secure-your-server worker`: runs the audits that web processes defer to the job queue (PostgreSQL as the store,
app/jobs.py). It binds no port: the sink and canaries run elsewhere (SECURE_LISTENERS=external is implied), and what
they see reaches it through the store."""

from __future__ import annotations

import asyncio
import sys

from app import logs
from app.config import Settings

log = logs.get_logger("worker")


async def work(settings: Settings, concurrency: int = 0) -> int:
    """Until SIGTERM / SIGINT. `concurrency`: jobs this worker takes at once (0: SECURE_MAX_RUNNING_AUDITS; the
    site-wide cap holds whatever the sum, app/jobs.py)."""
    from app.jobs import AuditQueue, uses_queue
    from app.main import SharedSlots, open_site
    from app.probes.blocklist import BlocklistFileError, load_lists

    try:
        load_lists(settings.blocklists_file)  # the worker runs the blocklist checks: a bad file stops it here
    except BlocklistFileError as exc:
        print(f"secure-your-server worker: {exc}", file=sys.stderr)
        return 2
    if not uses_queue(settings):
        print("secure-your-server worker needs SECURE_DATABASE_URL=postgresql://... (with the embedded SQLite "
              "store, `serve` runs the audits itself)", file=sys.stderr)
        return 2
    logs.configure(settings.log_level)
    settings = settings.model_copy(update={"listeners": "external"})
    shared = SharedSlots(settings)
    site, own = await open_site(settings, (), shared)
    auditor = site.auditor
    queue = auditor.jobs
    assert isinstance(queue, AuditQueue)
    queue.register(auditor.run_job)
    sides = [asyncio.create_task(auditor.keep_alive(), name="heartbeat"),
             asyncio.create_task(queue.keep_retrying_stalled(), name="stalled-jobs")]
    log.info("worker.started", extra={"instance": auditor.instance_id})
    try:
        await queue.work(concurrency or settings.max_running_audits, name=f"worker-{auditor.instance_id}")
    finally:
        for task in sides:
            task.cancel()
        await asyncio.gather(*sides, return_exceptions=True)
        await auditor.shutdown()
        await queue.close()
        await own.stop()
        await site.store.close()
        await shared.close()
        log.info("worker.stopped", extra={"instance": auditor.instance_id})
    return 0


def main(settings: Settings, concurrency: int = 0) -> int:
    return asyncio.run(work(settings, concurrency))
