"""The central system's way of doing the gateway's work, for the comparison benchmark:
Celery beat schedules a poll of every meter each second, Celery workers read the meters
with pymodbus and send the readings to the commits queue as the same Celery task the agent
sends.

Environment: BENCH_BROKER, BENCH_QUEUE (commits), BENCH_POLL_QUEUE, BENCH_METERS ("host:port:unit,..."),
BENCH_GATEWAY.
"""
import os
import struct
import time
from datetime import datetime, timezone

from celery import Celery
from pymodbus.client import ModbusTcpClient

app = Celery("poller", broker=os.environ["BENCH_BROKER"])
POLL_QUEUE = os.environ["BENCH_POLL_QUEUE"]
COMMITS = os.environ["BENCH_QUEUE"]
GATEWAY = os.environ["BENCH_GATEWAY"]
METERS = [m.split(":") for m in os.environ["BENCH_METERS"].split(",")]
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    worker_prefetch_multiplier=4,
    beat_schedule={"poll-all": {"task": "bench.poll_all", "schedule": 1.0, "options": {"queue": POLL_QUEUE}}},
    beat_schedule_filename=os.path.join(os.environ.get("BENCH_DIR", "/tmp"), "beat-schedule"),
)

# The SDM630 input registers the agent reads: (series, address, unit).
REGISTERS = [
    ("1-0-32-7-0-255", 0x00, "V"), ("1-0-52-7-0-255", 0x02, "V"), ("1-0-72-7-0-255", 0x04, "V"),
    ("1-0-31-7-0-255", 0x06, "A"), ("1-0-51-7-0-255", 0x08, "A"), ("1-0-71-7-0-255", 0x0A, "A"),
    ("1-0-21-7-0-255", 0x0C, "W"), ("1-0-41-7-0-255", 0x0E, "W"), ("1-0-61-7-0-255", 0x10, "W"),
    ("1-0-16-7-0-255", 0x34, "W"), ("1-0-14-7-0-255", 0x46, "Hz"), ("1-0-1-8-0-255", 0x48, "kWh"),
    ("1-0-2-8-0-255", 0x4A, "kWh"), ("1-0-3-8-0-255", 0x4C, "kvarh"), ("1-0-4-8-0-255", 0x4E, "kvarh"),
    ("1-0-15-8-0-255", 0x156, "kWh"), ("1-0-130-8-0-255", 0x158, "kvarh"),
]

_clients = {}
_seq = [0]


def client(host, port):
    key = (host, port)
    if key not in _clients:
        c = ModbusTcpClient(host, port=int(port), timeout=2)
        c.connect()
        _clients[key] = c
    return _clients[key]


@app.task(name="bench.poll_all")
def poll_all():
    boundary = datetime.now(timezone.utc).replace(microsecond=0).isoformat()
    for host, port, unit in METERS:
        poll_meter.apply_async(args=[host, port, int(unit), boundary], queue=POLL_QUEUE)


@app.task(name="bench.poll_meter")
def poll_meter(host, port, unit, boundary):
    c = client(host, port)
    low = c.read_input_registers(0, count=80, device_id=unit).registers
    high = c.read_input_registers(0x156, count=4, device_id=unit).registers
    words = {a: w for a, w in enumerate(low)}
    words.update({0x156 + i: w for i, w in enumerate(high)})
    read_at = datetime.now(timezone.utc).isoformat()
    readings = []
    for series, address, unit_name in REGISTERS:
        raw = struct.pack(">HH", words[address], words[address + 1])
        value = struct.unpack(">f", raw)[0]
        _seq[0] += 1
        readings.append({
            "reading_id": f"{GATEWAY}-{os.getpid()}-{_seq[0]}",
            "meter": f"m{unit}",
            "id_type": "name",
            "series": series,
            "value": repr(value),
            "unit": unit_name,
            "timestamp": boundary,
            "read_at": read_at,
            "cadence": "quarterly",
            "flags": [],
        })
    app.send_task(
        "utilitarian.commits.meter_readings",
        kwargs={"gateway": GATEWAY, "readings": readings},
        queue=COMMITS,
    )
