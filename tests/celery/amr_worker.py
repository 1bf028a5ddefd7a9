"""A stock Celery 5 app standing in for the centre: it registers the task names amr-edge
sends and records every call (its kwargs and the message id) as one JSON line, so the
Rust tests can check what a real Celery worker received.

Configured by the environment:
  AMR_TEST_BROKER  the broker URL
  AMR_TEST_OUT     the JSON-lines file to append to
  AMR_TEST_TASK, AMR_TEST_EVENTS_TASK  the task names (defaults: the centre's)
"""
import json
import os
import time

from celery import Celery

app = Celery("amr_worker", broker=os.environ["AMR_TEST_BROKER"])
app.conf.update(
    accept_content=["json"],
    task_serializer="json",
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    worker_prefetch_multiplier=50,
    task_ignore_result=True,
)

OUT = os.environ["AMR_TEST_OUT"]
READINGS_TASK = os.environ.get("AMR_TEST_TASK", "utilitarian.commits.meter_readings")
EVENTS_TASK = os.environ.get("AMR_TEST_EVENTS_TASK", "utilitarian.commits.meter_system_events")


def record(kind, task_id, payload):
    line = json.dumps({"kind": kind, "task_id": task_id, "received_at": time.time(), **payload})
    with open(OUT, "a", encoding="utf-8") as f:
        f.write(line + "\n")


@app.task(name=READINGS_TASK, bind=True)
def meter_readings(self, gateway, readings):
    record("readings", self.request.id, {"gateway": gateway, "readings": readings})


@app.task(name=EVENTS_TASK, bind=True)
def meter_system_events(self, gateway, events):
    record("events", self.request.id, {"gateway": gateway, "events": events})
