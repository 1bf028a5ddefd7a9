"""The central system's way of publishing, for the drain comparison: Celery's own
`send_task`, publishing with confirms (py-amqp's `confirm_publish`: each publish waits for
the broker's confirmation), one reading per task, the same task the agent sends.

Environment: BENCH_BROKER, BENCH_QUEUE, BENCH_GATEWAY, BENCH_MESSAGES. Prints the seconds
the publishing took (the interpreter's start and the connection left out).
"""
import os
import time

from celery import Celery

app = Celery("sender", broker=os.environ["BENCH_BROKER"])
app.conf.update(
    task_serializer="json",
    task_ignore_result=True,
    broker_transport_options={"confirm_publish": True},
)
QUEUE = os.environ["BENCH_QUEUE"]
GATEWAY = os.environ["BENCH_GATEWAY"]
N = int(os.environ["BENCH_MESSAGES"])


def reading(i):
    return {
        "reading_id": f"{GATEWAY}-{i}",
        "meter": f"meter-{i % 50}",
        "id_type": "name",
        "series": "1-0:1.8.0*255",
        "value": "14567.125",
        "unit": "kWh",
        "timestamp": "2026-09-21T10:15:00+02:00",
        "read_at": "2026-09-21T10:15:01.234+02:00",
        "cadence": "quarterly",
        "flags": [],
    }


with app.connection_for_write() as conn:
    conn.ensure_connection()
    producer = app.amqp.Producer(conn)
    # One task first: the channel, the exchange and the queue are ready before the clock.
    app.send_task("utilitarian.commits.meter_readings", kwargs={"gateway": GATEWAY, "readings": [reading(0)]},
                  queue=QUEUE, producer=producer)
    t = time.perf_counter()
    for i in range(1, N + 1):
        app.send_task("utilitarian.commits.meter_readings", kwargs={"gateway": GATEWAY, "readings": [reading(i)]},
                      queue=QUEUE, producer=producer)
    print(f"{time.perf_counter() - t:.6f}")
