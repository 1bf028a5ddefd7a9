"""Proves amr-edge's own simulated DLMS meter (src/sim/dlms/) against an independent client,
Gurux's GXDLMSClient: at each security level (lowest, LLS, HLS-GMAC) over the TCP wrapper it
reads every register, scaler and unit and compares them with the simulator's formulas
(written again here, from its module doc), the clock, the object list as Gurux parses it,
several registers in one get-request-with-list, and the load profile whole (block transfer),
by range (all columns, then two) and by entry, row by row against load_profile.py; and it
checks the refusals (wrong password, wrong key, a replayed invocation counter, an undefined
object). Exits non-zero on any mismatch.

usage: check_sim.py PORT [-v]      (the simulator already serving the wrapper on 127.0.0.1:PORT)
"""

import datetime
import struct
import sys
import time

import selftest as st  # noqa: E402  (tests/dlms on sys.path: this script's directory)
from selftest import LEVELS, Client, TcpLink, check, expect_failure, plain, target
from gurux_dlms.enums import Authentication
from gurux_dlms.GXDLMSException import GXDLMSException
from gurux_dlms.objects import GXDLMSProfileGeneric

import load_profile

PHYSICAL = 17
DAYS = 3


def power(t, _p):
    return 1500 + (t * 37) % 1000


def voltage(k):
    return lambda t, _p: 2280 + (t // 10 + 7 * k) % 41


def current(k):
    return lambda t, _p: 500 + (13 * (t // 10) + 29 * k) % 300


# OBIS, scaler, unit code, value at meter time t: the table of src/sim/dlms/mod.rs.
REGISTERS = [
    ("1.0.1.8.0.255", -1, 30, load_profile.import_raw),
    ("1.0.2.8.0.255", 3, 30, load_profile.export_raw),
    ("1.0.1.7.0.255", 0, 27, power),
    ("1.0.32.7.0.255", -1, 35, voltage(0)),
    ("1.0.52.7.0.255", -1, 35, voltage(1)),
    ("1.0.72.7.0.255", -1, 35, voltage(2)),
    ("1.0.31.7.0.255", -2, 33, current(0)),
    ("1.0.51.7.0.255", -2, 33, current(1)),
    ("1.0.71.7.0.255", -2, 33, current(2)),
]

OBJECTS = sorted(
    [(15, "0.0.40.0.0.255"), (8, "0.0.1.0.0.255"), (1, "0.0.96.1.0.255"), (1, "0.0.43.1.0.255")]
    + [(3, r[0]) for r in REGISTERS]
    + [(7, "1.0.99.1.0.255")]
)


def reg(ln):
    a, b, c, d, e, f = ln.split(".")
    return target(f"{a}-{b}:{c}.{d}.{e}.{f}", 3)


def date_time(t):
    d = datetime.datetime.fromtimestamp(t, datetime.timezone.utc)
    return struct.pack(
        ">HBBBBBBBhB", d.year, d.month, d.day, d.isoweekday(), d.hour, d.minute, d.second, 0, 0, 0
    )


def row(t):
    return [date_time(t), load_profile.import_raw(t, PHYSICAL), load_profile.export_raw(t, PHYSICAL)]


def read_everything(c, what):
    for ln, scaler, unit, f in REGISTERS:
        before = int(time.time())
        got = plain(c.read(reg(ln), 2))
        after = int(time.time())
        check(f"{what} {ln} value", got in (f(before, PHYSICAL), f(after, PHYSICAL)), True)
        check(f"{what} {ln} scaler/unit", plain(c.read(reg(ln), 3)), [scaler, unit])
    t, dev, status = st.date_time_of(plain(c.read(target("0-0:1.0.0.255", 8), 2)))
    check(f"{what} clock within 5 s", abs(t - time.time()) < 5, True)
    check(f"{what} clock deviation/status", [dev, status], [0, 0])
    serial = plain(c.read(target("0-0:96.1.0.255", 1), 2))
    check(f"{what} serial number", serial, b"AMR%08d" % PHYSICAL)
    # Several registers in one get-request-with-list (energy only: the others move).
    items = [(reg(REGISTERS[0][0]), 2), (reg(REGISTERS[1][0]), 2), (reg(REGISTERS[0][0]), 3)]
    t = int(time.time())
    got = plain(c.block(c.c.readList(items)).value)
    check(
        f"{what} get-with-list",
        got,
        [load_profile.import_raw(t, PHYSICAL), load_profile.export_raw(t, PHYSICAL), [-1, 30]],
    )
    reply = c.raw(target("0-0:40.0.0.255", 15), 2)
    objects = c.c.parseObjects(reply.data, True)
    got = sorted((int(x.objectType), x.logicalName) for x in objects)
    check(f"{what} object list as Gurux parses it", got, OBJECTS)
    pg = GXDLMSProfileGeneric("1.0.99.1.0.255")
    c.c.updateValue(pg, 3, c.read(pg, 3))
    check(
        f"{what} profile capture objects",
        [(int(k.objectType), k.logicalName, v.attributeIndex) for k, v in pg.captureObjects],
        [(8, "0.0.1.0.0.255", 2), (3, "1.0.1.8.0.255", 2), (3, "1.0.2.8.0.255", 2)],
    )
    check(f"{what} capture period", plain(c.read(pg, 4)), 900)
    check(f"{what} entries in use", plain(c.read(pg, 7)), 96 * DAYS)
    before = int(time.time())
    rows = plain(c.read(pg, 2))
    times = load_profile.row_times(before, DAYS)
    if len(rows) and st.date_time_of(rows[-1][0])[0] != times[-1]:
        times = load_profile.row_times(int(time.time()), DAYS)
    check(f"{what} profile rows", len(rows), 96 * DAYS)
    check(f"{what} profile buffer", rows, [row(t) for t in times])
    lo, hi = times[10], times[20]
    got = plain(c.read_range(pg, lo, hi))
    check(f"{what} profile by range", got, [row(t) for t in times[10:21]])
    cols = [pg.captureObjects[0], pg.captureObjects[2]]
    got = plain(c.read_range(pg, lo, hi, cols))
    check(f"{what} profile by range, clock and export", got, [[r[0], r[2]] for r in map(row, times[10:21])])
    got = plain(c.read_entry(pg, 5, 7, 2, 3))
    check(f"{what} profile by entry, columns 2..3", got, [row(t)[1:] for t in times[4:7]])


def main():
    port = int(sys.argv[1])
    counter = 1
    for name, kw in LEVELS:
        c = Client(TcpLink(port), False, counter=counter, **kw)
        c.connect()
        read_everything(c, f"sim {name}")
        counter = c.c.ciphering.invocationCounter
        c.release()
    c = Client(TcpLink(port), False, 16)
    c.connect()
    fc = plain(c.read(target("0-0:43.1.0.255", 1), 2))
    check("sim frame counter is the last HLS invocation counter", fc >= counter - 1 and fc > 0, True)
    e = expect_failure(
        "sim undefined object", lambda: c.read(target("1-0:99.98.0.255", 3), 2), GXDLMSException
    )
    check("sim undefined object: object-undefined", getattr(e, "errorCode", None), 4)
    c.release()
    c = Client(TcpLink(port), False, 17, auth=Authentication.LOW, password=b"wrong")
    expect_failure("sim LLS wrong password refused", c.connect, GXDLMSException)
    c.link.close()
    c = Client(
        TcpLink(port), False, 1, auth=Authentication.HIGH_GMAC, counter=counter + 10,
        bck="FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF",
    )
    expect_failure("sim HLS wrong block cipher key refused", c.connect, GXDLMSException, Exception)
    c.link.close()
    c = Client(TcpLink(port), False, 1, auth=Authentication.HIGH_GMAC, counter=1)
    expect_failure("sim HLS replayed invocation counter refused", c.connect, GXDLMSException, Exception)
    c.link.close()
    passed = st.CHECKS[0] - len(st.FAILURES)
    print(f"{passed} passed, {len(st.FAILURES)} failed")
    sys.exit(1 if st.FAILURES else 0)


if __name__ == "__main__":
    main()
