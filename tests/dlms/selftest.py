"""Proves tests/dlms/meter.py against an independent client: Gurux's own GXDLMSClient.

Starts the meter on the TCP wrapper and on HDLC (two meters on one socat pty), and at each
security level (lowest, LLS, HLS-GMAC) reads every object the meter says it serves
(`--dump-json`), compares each value, byte for byte, with what the meter printed, reads the
load profile by range and by entry and compares every row with profile.py's formula, and
checks the refusals (wrong password, wrong key, a replayed invocation counter, an undefined
object, a meter that stays silent for another address). Exits non-zero on any mismatch.

usage: selftest.py [-v]       (needs socat on PATH for the HDLC part)
"""

import datetime
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import load_profile  # noqa: E402

from gurux_dlms import GXByteBuffer, GXDateTime, GXDLMSClient, GXReplyData  # noqa: E402
from gurux_dlms.enums import Authentication, InterfaceType, ObjectType, Security  # noqa: E402
from gurux_dlms.GXDLMSException import GXDLMSException  # noqa: E402
from gurux_dlms.objects import GXDLMSProfileGeneric  # noqa: E402
from gurux_dlms.secure import GXDLMSSecureClient  # noqa: E402

_chippering = sys.modules["gurux_dlms.GXDLMSChippering"]

# Gurux's cipher prints "Encryption is applied." for every APDU.
_chippering.print = lambda *a, **k: None

METER = os.path.join(HERE, "meter.py")
VERBOSE = "-v" in sys.argv
FAILURES = []
CHECKS = [0]

BCK = "000102030405060708090A0B0C0D0E0F"
AK = "D0D1D2D3D4D5D6D7D8D9DADBDCDDDEDF"
CLIENT_TITLE = b"TESTCLNT"


def check(what, got, want):
    CHECKS[0] += 1
    if got != want:
        FAILURES.append(what)
        print(f"MISMATCH {what}: got {got!r}, want {want!r}", flush=True)
    elif VERBOSE:
        print(f"ok {what}", flush=True)


class Timeout(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# Links: bytes in and out, with a timeout on every frame (a meter answers a wrong address
# with silence)
# ---------------------------------------------------------------------------------------------


class TcpLink:
    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)

    def send(self, data):
        self.sock.sendall(bytes(data))

    def recv(self, timeout):
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(4096)
        except socket.timeout:
            raise Timeout() from None
        if not data:
            raise ConnectionError("meter closed the connection")
        return data

    def close(self):
        self.sock.close()


class SerialLink:
    def __init__(self, device):
        import serial

        self.port = serial.Serial(device, 9600, timeout=0.05)

    def send(self, data):
        self.port.write(bytes(data))
        self.port.flush()

    def recv(self, timeout):
        deadline = time.time() + timeout
        while time.time() < deadline:
            data = self.port.read(max(1, self.port.in_waiting))
            if data:
                return data
        raise Timeout()

    def close(self):
        self.port.close()


class Client:
    """Gurux's client over a link: connect, read, release."""

    def __init__(
        self,
        link,
        hdlc,
        sap,
        physical=17,
        auth=Authentication.NONE,
        password=None,
        bck=BCK,
        ak=AK,
        counter=1,
    ):
        self.link = link
        self.hdlc = hdlc
        itf = InterfaceType.HDLC if hdlc else InterfaceType.WRAPPER
        server = GXDLMSClient.getServerAddress(1, physical, 4) if hdlc else 1
        self.c = GXDLMSSecureClient(True, sap, server, auth, password, itf)
        if hdlc:
            self.c.serverAddressSize = 4
        if auth == Authentication.HIGH_GMAC:
            cipher = self.c.ciphering
            cipher.security = Security.AUTHENTICATION_ENCRYPTION
            cipher.systemTitle = bytearray(CLIENT_TITLE)
            cipher.blockCipherKey = bytearray(bytes.fromhex(bck))
            cipher.authenticationKey = bytearray(bytes.fromhex(ak))
            cipher.invocationCounter = counter

    def packet(self, data, reply, timeout=3.0):
        self.link.send(data)
        rd = GXByteBuffer()
        notify = GXReplyData()
        while not self.c.getData(rd, reply, notify):
            rd.set(self.link.recv(timeout))
        if reply.error != 0:
            raise GXDLMSException(reply.error)

    def block(self, data, reply=None, timeout=3.0):
        reply = reply or GXReplyData()
        if isinstance(data, list):
            for it in data:
                reply.clear()
                self.block(it, reply, timeout)
            return reply
        self.packet(data, reply, timeout)
        while reply.isMoreData():
            self.packet(self.c.receiverReady(reply), reply, timeout)
        return reply

    def connect(self):
        if self.hdlc:
            reply = self.block(self.c.snrmRequest())
            self.c.parseUAResponse(reply.data)
        reply = self.block(self.c.aarqRequest())
        self.c.parseAareResponse(reply.data)
        if self.c.getIsAuthenticationRequired():
            reply = self.block(self.c.getApplicationAssociationRequest())
            self.c.parseApplicationAssociationResponse(reply.data)

    def read(self, obj, attr):
        return self.block(self.c.read(obj, attr)).value

    def raw(self, obj, attr):
        """The attribute as the meter encoded it, re-encoded by Gurux's own data parser:
        checks the value and its type without Gurux's object classes in the way."""
        return self.block(self.c.read(obj, attr))

    def release(self):
        try:
            self.block(self.c.releaseRequest())
        except (GXDLMSException, Timeout):
            pass
        if self.hdlc:
            self.block(self.c.disconnectRequest())
        self.link.close()


# ---------------------------------------------------------------------------------------------
# The meter as a process
# ---------------------------------------------------------------------------------------------


class Meter:
    def __init__(self, *args):
        self.args = list(args)
        self.proc = subprocess.Popen(
            [sys.executable, METER] + self.args,
            stdout=subprocess.PIPE,
            stderr=None if VERBOSE else subprocess.DEVNULL,
        )
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"meter.py {' '.join(self.args)} did not start")
        self.ready = json.loads(line)

    def stop(self):
        self.proc.kill()
        self.proc.wait()


def dump(*args):
    out = subprocess.run(
        [sys.executable, METER, "--dump-json"] + list(args), check=True, capture_output=True
    )
    return json.loads(out.stdout)


class Pty:
    """Two linked pseudo-terminals (socat), the meter's end and the client's end."""

    def __init__(self):
        self.dir = tempfile.mkdtemp()
        self.meter = os.path.join(self.dir, "meter")
        self.client = os.path.join(self.dir, "client")
        self.proc = subprocess.Popen(
            ["socat", f"pty,raw,echo=0,link={self.meter}", f"pty,raw,echo=0,link={self.client}"],
            stderr=subprocess.DEVNULL,
        )
        for _ in range(100):
            if os.path.exists(self.meter) and os.path.exists(self.client):
                return
            time.sleep(0.02)
        raise SystemExit("socat made no ptys")

    def stop(self):
        self.proc.kill()
        self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Comparing what Gurux decoded with what the meter printed
# ---------------------------------------------------------------------------------------------

GURUX_TYPE = {
    "null-data": 0,
    "array": 1,
    "structure": 2,
    "boolean": 3,
    "double-long": 5,
    "double-long-unsigned": 6,
    "octet-string": 9,
    "visible-string": 10,
    "integer": 15,
    "long": 16,
    "unsigned": 17,
    "long-unsigned": 18,
    "long64": 20,
    "long64-unsigned": 21,
    "enum": 22,
}


def expected(j):
    """A --dump-json value as Python: containers lists, octet strings bytes."""
    if j["type"] in ("array", "structure"):
        return [expected(i) for i in j["value"]]
    if j["type"] == "octet-string":
        return bytes.fromhex(j["value"])
    return j["value"]


def plain(v):
    """A value Gurux decoded, as Python (GXStructure/GXArray lists, bytearray bytes,
    GXEnum and friends ints)."""
    if isinstance(v, (list, tuple)):
        return [plain(i) for i in v]
    if isinstance(v, (bytearray, bytes)):
        return bytes(v)
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if hasattr(v, "value") and not isinstance(v, int):
        return plain(v.value)
    return int(v)


def target(obis, class_id):
    obj = GXDLMSClient.createObject(ObjectType(class_id))
    a, rest = obis.split("-")
    b, rest = rest.split(":")
    obj.logicalName = ".".join([a, b] + rest.split("."))
    return obj


def date_time_of(raw):
    import struct

    year, month, day, _dow, hour, minute, second, _h, deviation, status = struct.unpack(
        ">HBBBBBBBhB", bytes(raw)
    )
    local = datetime.datetime(year, month, day, hour, minute, second, tzinfo=datetime.timezone.utc)
    return int((local + datetime.timedelta(minutes=deviation)).timestamp()), deviation, status


def expected_row_of(t, physical, deviation=0, status=0):
    import meter as m

    return [
        m.date_time(t, deviation, status),
        load_profile.import_raw(t, physical),
        load_profile.export_raw(t, physical),
    ]


# ---------------------------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------------------------


def read_everything(client, meter_dump, what, sap, clock_offset=0):
    physical = meter_dump["physical"]
    clock = next(o for o in meter_dump["objects"] if o["obis"] == "0-0:1.0.0.255")["attributes"]
    deviation, status = clock["3"]["value"], clock["4"]["value"]

    def expected_row(t, physical):
        return expected_row_of(t, physical, deviation, status)

    for o in meter_dump["objects"]:
        obj = target(o["obis"], o["class_id"])
        for attr, want in o["attributes"].items():
            attr = int(attr)
            name = f"{what} {o['obis']}/{attr}"
            reply = client.raw(obj, attr)
            got = plain(reply.value)
            if o["obis"] == "0-0:1.0.0.255" and attr == 2:
                t, dev, status = date_time_of(got)
                now = time.time() + clock_offset
                check(name + " clock within 5 s", abs(t - now) < 5, True)
                check(
                    name + " deviation/status",
                    [dev, status],
                    list(date_time_of(expected(want))[1:]),
                )
                continue
            if o["obis"] == "0-0:43.1.0.255" and attr == 2:
                check(name + " frame counter type", reply.valueType, GURUX_TYPE[want["type"]])
                continue
            if o["obis"] == "0-0:40.0.0.255" and attr == 3:
                check(name, got, [sap, 1])
                continue
            check(name, got, expected(want))
            check(name + " bytes", raw_bytes(reply).hex(), encoded(want).hex())
    # Several attributes in one get-request-with-list.
    regs = [o for o in meter_dump["objects"] if o["class_id"] == 3]
    items = [(target(o["obis"], 3), 2) for o in regs] + [(target("1-0:99.1.0.255", 7), 3)]
    got = plain(client.block(client.c.readList(items)).value)
    prof = next(o for o in meter_dump["objects"] if o["obis"] == "1-0:99.1.0.255")
    want = [expected(o["attributes"]["2"]) for o in regs] + [expected(prof["attributes"]["3"])]
    check(f"{what} get-with-list", got, want)
    # The object list, parsed by Gurux's own object-list parser.
    reply = client.raw(target("0-0:40.0.0.255", 15), 2)
    objects = client.c.parseObjects(reply.data, True)
    got = sorted((int(x.objectType), x.logicalName) for x in objects)
    want = sorted(
        (o["class_id"], target(o["obis"], o["class_id"]).logicalName) for o in meter_dump["objects"]
    )
    check(f"{what} object list as Gurux parses it", got, want)
    # The whole profile buffer (block transfer; HDLC segments too).
    pg = GXDLMSProfileGeneric("1.0.99.1.0.255")
    client.c.updateValue(pg, 3, client.read(pg, 3))
    check(
        f"{what} profile capture objects",
        [(int(k.objectType), k.logicalName, v.attributeIndex) for k, v in pg.captureObjects],
        [(8, "0.0.1.0.0.255", 2), (3, "1.0.1.8.0.255", 2), (3, "1.0.2.8.0.255", 2)],
    )
    before = time.time() + clock_offset
    rows = plain(client.read(pg, 2))
    after = time.time() + clock_offset
    days = meter_dump["profile"]["days"]
    times = load_profile.row_times(int(before), days)
    if (
        load_profile.row_times(int(after), days) != times
        and len(rows)
        and date_time_of(rows[-1][0])[0] != times[-1]
    ):
        times = load_profile.row_times(int(after), days)
    check(f"{what} profile rows", len(rows), 96 * days)
    check(f"{what} profile buffer", rows, [expected_row(t, physical) for t in times])
    # By range: rows 10..20 of the buffer, every column, then two columns.
    lo, hi = times[10], times[20]
    got = plain(client.read_range(pg, lo, hi))
    check(f"{what} profile by range", got, [expected_row(t, physical) for t in times[10:21]])
    cols = [pg.captureObjects[0], pg.captureObjects[2]]
    got = plain(client.read_range(pg, lo, hi, cols))
    check(
        f"{what} profile by range, clock and export",
        got,
        [[r[0], r[2]] for r in (expected_row(t, physical) for t in times[10:21])],
    )
    # By entry: entries 5..7, every column, then columns 2..3.
    got = plain(client.block(client.c.readRowsByEntry(pg, 5, 3)).value)
    check(f"{what} profile by entry", got, [expected_row(t, physical) for t in times[4:7]])
    got = plain(client.read_entry(pg, 5, 7, 2, 3))
    check(
        f"{what} profile by entry, columns 2..3",
        got,
        [expected_row(t, physical)[1:] for t in times[4:7]],
    )


def read_range(self, pg, lo, hi, columns=None):
    start = GXDateTime(datetime.datetime.fromtimestamp(lo, datetime.timezone.utc))
    end = GXDateTime(datetime.datetime.fromtimestamp(hi, datetime.timezone.utc))
    return self.block(self.c.readRowsByRange(pg, start, end, columns)).value


Client.read_range = read_range


def read_entry(self, pg, from_entry, to_entry, from_column, to_column):
    # Gurux's readRowsByEntry(columns=...) sends a column *count* as to_selected_value,
    # which the Blue Book defines as the last column's index: build the descriptor here.
    import struct

    buff = GXByteBuffer()
    buff.set(bytes([0x02, 0x02, 0x04]))
    buff.set(
        bytes([0x06]) + struct.pack(">I", from_entry) + bytes([0x06]) + struct.pack(">I", to_entry)
    )
    buff.set(
        bytes([0x12])
        + struct.pack(">H", from_column)
        + bytes([0x12])
        + struct.pack(">H", to_column)
    )
    return self.block(self.c._read(pg.name, ObjectType.PROFILE_GENERIC, 2, buff)).value


Client.read_entry = read_entry


def encoded(j):
    """The A-XDR bytes of a --dump-json value."""
    import axdr

    tag = GURUX_TYPE[j["type"]]
    if tag in (axdr.ARRAY, axdr.STRUCTURE):
        return (
            bytes([tag]) + axdr.length(len(j["value"])) + b"".join(encoded(i) for i in j["value"])
        )
    value = bytes.fromhex(j["value"]) if tag == axdr.OCTET_STRING else j["value"]
    return axdr.encode(axdr.V(tag, value))


def raw_bytes(reply):
    return bytes(reply.data._data[: reply.data.size])


LEVELS = [
    ("lowest", dict(sap=16)),
    ("LLS", dict(sap=17, auth=Authentication.LOW, password=b"12345678")),
    ("HLS-GMAC", dict(sap=1, auth=Authentication.HIGH_GMAC)),
]


def expect_failure(what, f, *errors):
    CHECKS[0] += 1
    try:
        f()
    except errors as e:
        if VERBOSE:
            print(f"ok {what} ({type(e).__name__}: {e})")
        return e
    except Exception as e:  # noqa: BLE001 - any other failure is a mismatch too
        FAILURES.append(what)
        print(f"MISMATCH {what}: {type(e).__name__}: {e}")
        return None
    FAILURES.append(what)
    print(f"MISMATCH {what}: succeeded")
    return None


def wrapper_tests():
    whole = dump()
    d = whole["meters"][0]
    state = os.path.join(tempfile.mkdtemp(), "state.json")
    m = Meter("--wrapper", "--port", "0", "--state-json", state)
    with open(state, encoding="utf-8") as f:
        written = json.load(f)
    # The clock aside (it moves), the file holds what --dump-json prints.
    fixed = json.loads(json.dumps(whole))
    for j in (written, fixed):
        for o in j["meters"][0]["objects"]:
            if o["obis"] == "0-0:1.0.0.255":
                o["attributes"].pop("2")
    check("--state-json writes what --dump-json prints", written, fixed)
    port = m.ready["port"]
    counter = [1]
    try:
        for name, kw in LEVELS:
            c = Client(TcpLink(port), False, counter=counter[0], **kw)
            c.connect()
            read_everything(c, d, f"wrapper {name}", kw["sap"])
            counter[0] = c.c.ciphering.invocationCounter
            c.release()
        # The meter's frame counter, over the public client, after the HLS association.
        c = Client(TcpLink(port), False, 16)
        c.connect()
        fc = plain(c.read(target("0-0:43.1.0.255", 1), 2))
        check("wrapper frame counter rose with the HLS association", fc > 0, True)
        c.release()
        # Refusals.
        c = Client(TcpLink(port), False, 17, auth=Authentication.LOW, password=b"wrong")
        expect_failure("wrapper LLS wrong password refused", c.connect, GXDLMSException)
        c.link.close()
        c = Client(
            TcpLink(port),
            False,
            1,
            auth=Authentication.HIGH_GMAC,
            counter=counter[0] + 10,
            bck="FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF",
        )
        expect_failure(
            "wrapper HLS wrong block cipher key refused", c.connect, GXDLMSException, Exception
        )
        c.link.close()
        c = Client(
            TcpLink(port),
            False,
            1,
            auth=Authentication.HIGH_GMAC,
            counter=counter[0] + 20,
            ak="FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF",
        )
        expect_failure(
            "wrapper HLS wrong authentication key refused", c.connect, GXDLMSException, Exception
        )
        c.link.close()
        c = Client(TcpLink(port), False, 1, auth=Authentication.HIGH_GMAC, counter=1)
        expect_failure(
            "wrapper HLS replayed invocation counter refused", c.connect, GXDLMSException, Exception
        )
        c.link.close()
        c = Client(TcpLink(port), False, 1, auth=Authentication.HIGH_GMAC, counter=counter[0] + 30)
        c.connect()
        c.c.ciphering.invocationCounter = counter[0]
        expect_failure(
            "wrapper HLS replayed invocation counter inside an association refused",
            lambda: c.read(target("1-0:1.8.0.255", 3), 2),
            GXDLMSException,
            Exception,
        )
        c.link.close()
        c = Client(TcpLink(port), False, 1, auth=Authentication.HIGH_GMAC, counter=counter[0] + 60)
        reply = c.block(c.c.aarqRequest())
        c.c.parseAareResponse(reply.data)
        c.c.settings.stoCChallenge = bytes(16)  # answer a challenge the meter did not send

        def hls_answer():
            reply = c.block(c.c.getApplicationAssociationRequest())
            c.c.parseApplicationAssociationResponse(reply.data)

        expect_failure(
            "wrapper HLS wrong answer to the meter's challenge refused", hls_answer, Exception
        )
        c.link.close()
        c = Client(TcpLink(port), False, 16)
        c.connect()
        e = expect_failure(
            "wrapper undefined object",
            lambda: c.read(target("1-0:99.98.0.255", 3), 2),
            GXDLMSException,
        )
        check("wrapper undefined object: object-undefined", getattr(e, "errorCode", None), 4)
        c.release()
    finally:
        m.stop()


def hdlc_tests():
    full = dump("--physical", "17", "--physical", "18")
    pty = Pty()
    m = Meter("--hdlc", pty.meter, "--physical", "17", "--physical", "18")
    counter = 1
    try:
        for name, kw in LEVELS:
            c = Client(SerialLink(pty.client), True, physical=17, counter=counter, **kw)
            c.connect()
            read_everything(c, full["meters"][0], f"hdlc meter 17 {name}", kw["sap"])
            counter = c.c.ciphering.invocationCounter
            c.release()
        # The second meter on the same line answers for itself.
        c = Client(SerialLink(pty.client), True, 16, physical=18)
        c.connect()
        read_everything(c, full["meters"][1], "hdlc meter 18 lowest", 16)
        c.release()
        # No meter 19 on the line: silence, not an error.
        c = Client(SerialLink(pty.client), True, 16, physical=19)
        expect_failure(
            "hdlc meter 19 (absent) stays silent",
            lambda: c.block(c.c.snrmRequest(), timeout=1.0),
            Timeout,
        )
        c.link.close()
    finally:
        m.stop()
        pty.stop()


def frame_at(link, timeout=2.0):
    """One raw HDLC frame from the link (by its length field: no byte stuffing in DLMS)."""
    buf = bytearray()
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            buf += link.recv(max(0.01, deadline - time.time()))
        except Timeout:
            break
        if len(buf) >= 3 and len(buf) >= (((buf[1] & 7) << 8) | buf[2]) + 2:
            return bytes(buf[: (((buf[1] & 7) << 8) | buf[2]) + 2])
    raise Timeout()


def frame_checks(frame):
    """(HCS right, FCS right, server address bytes) of one HDLC frame from a meter."""
    import meter as m

    _client, server, ctrl = m.hdlc_addresses(frame)
    body = frame[1:-1]
    hcs_ok = True
    if len(frame) > ctrl + 4:
        hcs = m.crc16(frame[1 : ctrl + 1])
        hcs_ok = frame[ctrl + 1 : ctrl + 3] == hcs.to_bytes(2, "little")
    fcs_ok = m.crc16(body[:-2]) == int.from_bytes(body[-2:], "little")
    return hcs_ok, fcs_ok, bytes(server)


def hdlc_fault(fault):
    """Connect (SNRM/UA stay sound), send the AARQ, return the raw reply frame."""
    pty = Pty()
    m = Meter("--hdlc", pty.meter, "--fault", fault)
    try:
        c = Client(SerialLink(pty.client), True, 16)
        reply = c.block(c.c.snrmRequest())
        c.c.parseUAResponse(reply.data)
        c.link.send(c.c.aarqRequest()[0])
        frame = frame_at(c.link)
        expect_failure(
            f"hdlc {fault}: Gurux's client does not take the reply",
            lambda: c.block(c.c.aarqRequest(), timeout=1.0),
            Timeout,
            GXDLMSException,
            Exception,
        )
        c.link.close()
        return frame
    finally:
        m.stop()
        pty.stop()


def fault_tests():
    hcs, fcs, server = frame_checks(hdlc_fault("bad-fcs"))
    check("hdlc bad-fcs: HCS sound, FCS wrong", (hcs, fcs), (True, False))
    hcs, fcs, server = frame_checks(hdlc_fault("bad-hcs"))
    check("hdlc bad-hcs: HCS wrong, FCS sound", (hcs, fcs), (False, True))
    hcs, fcs, server = frame_checks(hdlc_fault("wrong-address"))
    check("hdlc wrong-address: a sound frame", (hcs, fcs), (True, True))
    check("hdlc wrong-address: from physical 18, not 17", server.hex(), "00020025")

    m = Meter("--wrapper", "--fault", "refuse-association")
    c = Client(TcpLink(m.ready["port"]), False, 16)
    expect_failure("wrapper refuse-association", c.connect, GXDLMSException)
    c.link.close()
    m.stop()

    m = Meter("--wrapper", "--fault", "stop-block-transfer")
    c = Client(TcpLink(m.ready["port"]), False, 16)
    c.connect()
    check(
        "wrapper stop-block-transfer: short reads still answered",
        plain(c.read(target("1-0:1.8.0.255", 3), 2)),
        12362678,
    )
    expect_failure(
        "wrapper stop-block-transfer: the profile stops after its first block",
        lambda: c.block(c.c.read(target("1-0:99.1.0.255", 7), 2), timeout=1.0),
        Timeout,
    )
    c.link.close()
    m.stop()

    m = Meter("--wrapper", "--fault", "drop-mid-association", "--drop-after", "2")
    c = Client(TcpLink(m.ready["port"]), False, 16)
    c.connect()
    c.read(target("1-0:1.8.0.255", 3), 2)
    c.read(target("1-0:2.8.0.255", 3), 2)
    expect_failure(
        "wrapper drop-mid-association: the third request finds the link closed",
        lambda: c.read(target("1-0:32.7.0.255", 3), 2),
        ConnectionError,
        OSError,
    )
    c.link.close()
    m.stop()

    pty = Pty()
    m = Meter("--hdlc", pty.meter, "--fault", "drop-mid-association")
    try:
        c = Client(SerialLink(pty.client), True, 16)
        c.connect()
        c.read(target("1-0:1.8.0.255", 3), 2)
        expect_failure(
            "hdlc drop-mid-association: the meter goes silent",
            lambda: c.block(c.c.read(target("1-0:2.8.0.255", 3), 2), timeout=1.0),
            Timeout,
        )
        c.link.close()
        c = Client(SerialLink(pty.client), True, 16)
        c.connect()
        check(
            "hdlc drop-mid-association: a new SNRM is answered",
            plain(c.read(target("1-0:1.8.0.255", 3), 2)),
            12362678,
        )
        c.release()
    finally:
        m.stop()
        pty.stop()

    # A drifting clock: an hour behind, deviation -60 (CET), daylight-saving status.
    args = (
        "--clock-offset",
        "-3600",
        "--clock-deviation",
        "-60",
        "--clock-status",
        "128",
        "--profile-days",
        "1",
    )
    d = dump(*args)["meters"][0]
    m = Meter("--wrapper", *args)
    c = Client(TcpLink(m.ready["port"]), False, 16)
    c.connect()
    read_everything(c, d, "wrapper drifting clock", 16, clock_offset=-3600)
    c.release()
    m.stop()


def main():
    wrapper_tests()
    hdlc_tests()
    fault_tests()
    print(f"{CHECKS[0] - len(FAILURES)} passed, {len(FAILURES)} failed")
    sys.exit(1 if FAILURES else 0)


if __name__ == "__main__":
    main()
