"""A simulated DLMS/COSEM meter for amr-edge's tests, built on Gurux's gurux-dlms server.

An independent peer: Gurux's GPLv2 Python library, installed into the tests' own
virtualenv (tests/requirements.txt) and run as a separate program; none of it is linked into
or copied into amr-edge. Pinned to gurux-dlms==1.0.203, whose server side needs the repairs
in `patch_gurux()` (each says what it fixes; see shared/dlms-test-peer.md).

Transports:
  --wrapper --port P     IEC 62056-47 TCP wrapper on 127.0.0.1:P (0: any free port)
  --hdlc DEVICE          IEC 62056-46 HDLC on a serial device (a socat pty), 9600 8N1;
                         several --physical on one device: one meter per address, each
                         silent on frames for another address
Associations (server logical address 1, or wrapper port 1):
  client SAP 16 (--public-sap)  lowest security, no password
  client SAP 17 (--lls-sap)     LLS, password --password
  client SAP 1  (--hls-sap)     HLS-GMAC (mechanism 5), security suite 0, every APDU
                                authenticated and encrypted with --block-cipher-key and
                                --authentication-key, server system title --system-title;
                                the client's invocation counter must rise (a repeated or
                                lower one is refused); the meter's own frame counter is
                                0-0:43.1.0.255, readable over the public client
Once it serves, prints one JSON line on stdout:
  {"ready": true, "transport": "wrapper", "port": 4059, "meters": [17]}
and then only logs (to stderr).
"""

import argparse
import datetime
import json
import os
import socket
import struct
import sys
import threading
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import axdr  # noqa: E402
import load_profile  # noqa: E402

from cryptography.exceptions import InvalidTag  # noqa: E402
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes  # noqa: E402

# ---------------------------------------------------------------------------------------------
# What the meter holds
# ---------------------------------------------------------------------------------------------

CLOCK = "0-0:1.0.0.255"
SERIAL = "0-0:96.1.0.255"
FRAME_COUNTER = "0-0:43.1.0.255"
ASSOCIATION = "0-0:40.0.0.255"
PROFILE = "1-0:99.1.0.255"

UNITS = {"W": 27, "Wh": 30, "A": 33, "V": 35, "Hz": 44, "var": 29, "varh": 32}


def obis_bytes(obis):
    a, rest = obis.split("-")
    b, rest = rest.split(":")
    c, d, e, f = rest.split(".")
    return bytes(int(x) for x in (a, b, c, d, e, f))


def obis_text(ln):
    return f"{ln[0]}-{ln[1]}:{ln[2]}.{ln[3]}.{ln[4]}.{ln[5]}"


def date_time(t, deviation, status, hundredths=0):
    """The 12-byte COSEM date-time of Unix time `t` (UTC) on a clock whose deviation is
    `deviation` minutes (local = UTC - deviation, the Blue Book's sign)."""
    local = datetime.datetime.fromtimestamp(t, datetime.timezone.utc) - datetime.timedelta(
        minutes=deviation
    )
    return struct.pack(
        ">HBBBBBBBhB",
        local.year,
        local.month,
        local.day,
        local.isoweekday(),
        local.hour,
        local.minute,
        local.second,
        hundredths,
        deviation,
        status,
    )


def parse_date_time(raw, default_deviation):
    """Unix time of a 12-byte COSEM date-time (unspecified fields taken as zero)."""
    year, month, day, _dow, hour, minute, second, hundredths, deviation, _status = struct.unpack(
        ">HBBBBBBBhB", bytes(raw)
    )

    def spec(v, unset, dflt):
        return dflt if v == unset else v

    if deviation == -0x8000:
        deviation = default_deviation
    local = datetime.datetime(
        spec(year, 0xFFFF, 1970),
        spec(month, 0xFF, 1),
        spec(day, 0xFF, 1),
        spec(hour, 0xFF, 0),
        spec(minute, 0xFF, 0),
        spec(second, 0xFF, 0),
        tzinfo=datetime.timezone.utc,
    )
    return int((local + datetime.timedelta(minutes=deviation)).timestamp())


class Obj:
    """One COSEM object: class, version, logical name, attributes (V or a function of the
    meter returning V), the attributes that take selective access, and the methods."""

    def __init__(self, class_id, version, obis, attrs, selectors=None, methods=()):
        self.class_id = class_id
        self.version = version
        self.obis = obis
        self.ln = obis_bytes(obis)
        self.attrs = {1: axdr.octets(self.ln)}
        self.attrs.update(attrs)
        self.selectors = selectors or {}
        self.methods = tuple(methods)


def scaler_unit(scaler, unit):
    # Written as the integer configured: Gurux derives the scaler from a float with
    # floor(log10(x)), which is 2 for 10**3 (see patch_gurux).
    return axdr.struct_(axdr.i8(scaler), axdr.enum(UNITS[unit]))


class Meter:
    """The state of one simulated meter: its objects and its security counters. Shared by
    every association (and every TCP connection) to the meter."""

    def __init__(self, args, physical):
        self.args = args
        self.physical = physical
        self.lock = threading.Lock()
        # The meter's own invocation counter for the APDUs it ciphers (0-0:43.1.0.255).
        self.frame_counter = args.frame_counter
        # The highest invocation counter accepted from the HLS client.
        self.client_counter = -1
        self.objects = {}
        self.build()

    # The meter's clock: system time moved by --clock-offset seconds.
    def now(self):
        return time.time() + self.args.clock_offset

    def clock_value(self):
        return axdr.octets(
            date_time(int(self.now()), self.args.clock_deviation, self.args.clock_status)
        )

    def add(self, obj):
        if obj.obis in self.args.omit:
            return
        self.objects[obj.obis] = obj

    def build(self):
        a = self.args
        p = self.physical
        dev, status = a.clock_deviation, a.clock_status
        unspecified = axdr.octets(b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\x80\x00\xff")
        self.add(
            Obj(
                8,
                0,
                CLOCK,
                {
                    2: lambda m: m.clock_value(),
                    3: axdr.i16(dev),
                    4: axdr.u8(status),
                    5: unspecified,
                    6: unspecified,
                    7: axdr.i8(0),
                    8: axdr.boolean(False),
                    9: axdr.enum(1),
                },
            )
        )
        self.add(Obj(1, 0, SERIAL, {2: axdr.octets(f"AMR{p:08d}".encode())}))
        self.add(Obj(1, 0, FRAME_COUNTER, {2: lambda m: axdr.u32(m.frame_counter)}))
        registers = [
            ("1-0:1.8.0.255", axdr.u32(a.import_wh + 1000 * p), load_profile.IMPORT_SCALER, "Wh"),
            ("1-0:2.8.0.255", axdr.u32(a.export_wh + p), load_profile.EXPORT_SCALER, "Wh"),
            ("1-0:32.7.0.255", axdr.u16(a.voltage), -1, "V"),
            ("1-0:31.7.0.255", axdr.u16(a.current), -2, "A"),
        ]
        for obis, value, scaler, unit in registers:
            self.add(Obj(3, 0, obis, {2: value, 3: scaler_unit(scaler, unit)}))
        captured = date_time(a.capture_time, dev, 0)
        self.add(
            Obj(
                4,
                0,
                "1-0:1.6.0.255",
                {
                    2: axdr.u32(a.max_demand),
                    3: scaler_unit(0, "W"),
                    4: axdr.u8(0),
                    5: axdr.octets(captured),
                },
            )
        )
        self.add(
            Obj(
                5,
                0,
                "1-0:1.4.0.255",
                {
                    2: axdr.u32(a.demand_current),
                    3: axdr.u32(a.demand_last),
                    4: scaler_unit(0, "W"),
                    5: axdr.u8(0),
                    6: axdr.octets(captured),
                    7: axdr.octets(date_time(a.capture_time - 900, dev, 0)),
                    8: axdr.u32(900),
                    9: axdr.u16(1),
                },
            )
        )
        self.capture_objects = [
            (8, CLOCK, 2),
            (3, "1-0:1.8.0.255", 2),
            (3, "1-0:2.8.0.255", 2),
        ]
        rows = 96 * a.profile_days
        self.add(
            Obj(
                7,
                1,
                PROFILE,
                {
                    2: lambda m: m.profile_buffer(None, None),
                    3: axdr.array(
                        [
                            axdr.struct_(
                                axdr.u16(c), axdr.octets(obis_bytes(o)), axdr.i8(i), axdr.u16(0)
                            )
                            for c, o, i in self.capture_objects
                        ]
                    ),
                    4: axdr.u32(load_profile.CAPTURE_PERIOD),
                    5: axdr.enum(1),
                    6: axdr.struct_(axdr.u16(0), axdr.octets(bytes(6)), axdr.i8(0), axdr.u16(0)),
                    7: axdr.u32(rows),
                    8: axdr.u32(rows),
                },
                selectors={2: (1, 2)},
            )
        )
        self.add(
            Obj(
                15,
                1,
                ASSOCIATION,
                {
                    2: lambda m: m.object_list(),
                    # as the public client reads it; each association reads its own
                    3: axdr.struct_(axdr.i8(self.args.public_sap), axdr.u16(1)),
                    8: axdr.enum(2),
                },
                methods=(1,),
            )
        )

    # -- values computed on read ---------------------------------------------------------------

    def object_list(self):
        items = []
        for o in self.objects.values():
            attrs = []
            for i in range(1, attribute_count(o.class_id) + 1):
                served = i in o.attrs
                sel = o.selectors.get(i)
                attrs.append(
                    axdr.struct_(
                        axdr.i8(i),
                        axdr.enum(1 if served else 0),  # read-only / no-access
                        axdr.array([axdr.i8(s) for s in sel]) if sel else axdr.null(),
                    )
                )
            methods = [axdr.struct_(axdr.i8(m), axdr.enum(1)) for m in o.methods]
            items.append(
                axdr.struct_(
                    axdr.u16(o.class_id),
                    axdr.u8(o.version),
                    axdr.octets(o.ln),
                    axdr.struct_(axdr.array(attrs), axdr.array(methods)),
                )
            )
        return axdr.array(items)

    def profile_rows(self):
        return load_profile.row_times(int(self.now()), self.args.profile_days)

    def profile_row(self, t):
        a = self.args
        return [
            axdr.octets(date_time(t, a.clock_deviation, a.clock_status)),
            axdr.u32(load_profile.import_raw(t, self.physical)),
            axdr.u32(load_profile.export_raw(t, self.physical)),
        ]

    def profile_buffer(self, times, columns):
        """The buffer's rows at `times` (all when None), `columns` (0-based, all when None)."""
        if times is None:
            times = self.profile_rows()
        rows = []
        for t in times:
            row = self.profile_row(t)
            if columns is not None:
                row = [row[c] for c in columns]
            rows.append(axdr.struct_(*row))
        return axdr.array(rows)

    def read_selective(self, obj, attr, selector, params):
        """Profile buffer by range (1) or by entry (2): served here, Gurux's own is broken."""
        if obj.obis != PROFILE or attr != 2:
            raise Refused(READ_WRITE_DENIED)
        times = self.profile_rows()
        ncol = len(self.capture_objects)
        if selector == 1:
            # range_descriptor: restricting_object, from_value, to_value, selected_values
            restricting, frm, to, selected = params
            if restricting[0] != 8 or bytes(restricting[1]) != obis_bytes(CLOCK):
                raise Refused(OTHER_REASON)
            lo = parse_date_time(frm, self.args.clock_deviation)
            hi = parse_date_time(to, self.args.clock_deviation)
            times = [t for t in times if lo <= t <= hi]
            columns = None
            if selected:
                columns = []
                for s in selected:
                    key = (s[0], obis_text(bytes(s[1])), s[2])
                    if key not in self.capture_objects:
                        raise Refused(OTHER_REASON)
                    columns.append(self.capture_objects.index(key))
            return self.profile_buffer(times, columns)
        if selector == 2:
            # entry_descriptor: from_entry, to_entry (0: last), from/to_selected_value (1-based)
            fe, te, fv, tv = params
            te = len(times) if te == 0 else min(te, len(times))
            tv = ncol if tv == 0 else min(tv, ncol)
            fe, fv = max(fe, 1), max(fv, 1)
            return self.profile_buffer(times[fe - 1 : te], list(range(fv - 1, tv)))
        raise Refused(OTHER_REASON)

    def read(self, obis, attr):
        obj = self.objects.get(obis)
        if obj is None:
            raise Refused(UNDEFINED_OBJECT)
        value = obj.attrs.get(attr)
        if value is None:
            raise Refused(READ_WRITE_DENIED)
        return value(self) if callable(value) else value

    def dump(self):
        """Every object with every attribute value, as `--dump-json` prints it."""
        out = []
        for o in self.objects.values():
            attrs = {}
            for i, v in o.attrs.items():
                if o.obis == PROFILE and i == 2:
                    continue  # rows: see "profile"
                attrs[str(i)] = axdr.to_json(v(self) if callable(v) else v)
            entry = {
                "obis": o.obis,
                "class_id": o.class_id,
                "version": o.version,
                "attributes": attrs,
            }
            su = o.attrs.get(4 if o.class_id == 5 else 3) if o.class_id in (3, 4, 5) else None
            if su is not None:
                entry["scaler"] = su.value[0].value
                entry["unit"] = su.value[1].value
            out.append(entry)
        return {
            "physical": self.physical,
            "logical": 1,
            "objects": out,
            "profile": {
                "obis": PROFILE,
                "capture_period": load_profile.CAPTURE_PERIOD,
                "days": self.args.profile_days,
                "columns": [f"{c}/{o}/{i}" for c, o, i in self.capture_objects],
                "formula": load_profile.FORMULA,
            },
        }


def attribute_count(class_id):
    return {1: 2, 3: 3, 4: 5, 5: 9, 7: 8, 8: 9, 15: 11}.get(class_id, 1)


# Data-access-result codes.
READ_WRITE_DENIED = 3
UNDEFINED_OBJECT = 4
OTHER_REASON = 250


class Refused(Exception):
    def __init__(self, code):
        super().__init__(code)
        self.code = code


# ---------------------------------------------------------------------------------------------
# Ciphering (security suite 0: AES-128-GCM, 12-byte tag)
# ---------------------------------------------------------------------------------------------

SC_AUTH = 0x10
SC_AUTH_ENC = 0x30
TAG_LEN = 12


def gcm_encrypt(key, ak, title, counter, sc, plain):
    """SC || IC || ciphertext || tag (authentication only when sc has no 0x20: tag over
    SC || AK || plain, plain sent as it is)."""
    iv = bytes(title) + struct.pack(">I", counter)
    enc = Cipher(algorithms.AES(bytes(key)), modes.GCM(iv)).encryptor()
    if sc & 0x20:
        enc.authenticate_additional_data(bytes([sc]) + bytes(ak))
        body = enc.update(bytes(plain)) + enc.finalize()
    else:
        enc.authenticate_additional_data(bytes([sc]) + bytes(ak) + bytes(plain))
        enc.finalize()
        body = bytes(plain)
    return bytes([sc]) + struct.pack(">I", counter) + body + enc.tag[:TAG_LEN]


def gcm_decrypt(key, ak, title, content):
    """(sc, counter, plain) of SC || IC || data || tag, or InvalidTag."""
    sc = content[0]
    counter = struct.unpack(">I", bytes(content[1:5]))[0]
    body, tag = bytes(content[5:-TAG_LEN]), bytes(content[-TAG_LEN:])
    if len(tag) != TAG_LEN or (sc & 0x0F) != 0:
        raise InvalidTag()
    iv = bytes(title) + struct.pack(">I", counter)
    dec = Cipher(algorithms.AES(bytes(key)), modes.GCM(iv, tag, min_tag_length=TAG_LEN)).decryptor()
    if sc & 0x20:
        dec.authenticate_additional_data(bytes([sc]) + bytes(ak))
        plain = dec.update(body) + dec.finalize()
    else:
        dec.authenticate_additional_data(bytes([sc]) + bytes(ak) + body)
        dec.finalize()
        plain = body
    return sc, counter, plain


def gmac(key, ak, title, counter, challenge):
    """f(challenge) of HLS-GMAC: SC(0x10) || IC || GMAC(SC || AK || challenge)."""
    return gcm_encrypt(key, ak, title, counter, SC_AUTH, b"")[:5] + _gmac_tag(
        key, ak, title, counter, challenge
    )


def _gmac_tag(key, ak, title, counter, challenge):
    iv = bytes(title) + struct.pack(">I", counter)
    enc = Cipher(algorithms.AES(bytes(key)), modes.GCM(iv)).encryptor()
    enc.authenticate_additional_data(bytes([SC_AUTH]) + bytes(ak) + bytes(challenge))
    enc.finalize()
    return enc.tag[:TAG_LEN]


# Ciphered service tags: request -> response.
GLO_RESPONSE = {0xC8: 0xCC, 0xC9: 0xCD, 0xCB: 0xCF}
GLO_OF_PLAIN = {0xC4: 0xCC, 0xC5: 0xCD, 0xC7: 0xCF, 0x0E: 0xCE, 0xD8: 0xD8}


class CounterRefused(Exception):
    """A ciphered APDU whose invocation counter is not above the last one accepted."""


class Deciphering(Exception):
    """A ciphered APDU that does not authenticate (wrong key, tampered)."""


# ---------------------------------------------------------------------------------------------
# Gurux 1.0.203 repairs
# ---------------------------------------------------------------------------------------------

from gurux_dlms import GXDLMS, GXServerReply  # noqa: E402
from gurux_dlms.GXCiphering import GXCiphering  # noqa: E402
from gurux_dlms.GXDLMSServer import GXDLMSServer  # noqa: E402
from gurux_dlms._GXAPDU import _GXAPDU  # noqa: E402
from gurux_dlms.enums import (  # noqa: E402
    Authentication,
    Command,
    Conformance,
    InterfaceType,
    RequestTypes,
    Security,
)
from gurux_dlms.ConnectionState import ConnectionState  # noqa: E402
from gurux_dlms.internal._GXCommon import _GXCommon  # noqa: E402
from gurux_dlms.objects.enums.SecuritySuite import SecuritySuite  # noqa: E402

_patched = False


def patch_gurux():
    """Repairs gurux-dlms 1.0.203's server side in this process (idempotent)."""
    global _patched
    if _patched:
        return
    _patched = True

    # 1. GXServerReply lacks the accessors GXDLMSServer.handleRequest/handleCommand call
    #    (setReply, getConnectionInfo, getCount, setCount): every request raised.
    GXServerReply.setReply = lambda self, v: setattr(self, "reply", v)
    GXServerReply.getConnectionInfo = lambda self: self.connectionInfo
    GXServerReply.getCount = lambda self: self.count
    GXServerReply.setCount = lambda self, v: setattr(self, "count", v)

    # 2. Ciphered requests (glo-get-request ...): handleGloDedRequest builds its AES-GCM
    #    parameters shifted by one (AesGcmParameter(title, key, ak): the system title lands
    #    in `tag`, the key in `systemTitle`, the authentication key in `blockCipherKey`) and
    #    GXDLMSChippering never checks the authentication tag. Replaced:
    #    decipher with the client's system title and the block cipher key, check the tag
    #    and the invocation counter (see Session.decipher), and leave the plain APDU.
    def handle_glo_ded_request(cls, settings, data):
        session = settings.amr_session
        buf = data.data
        if data.moreData & RequestTypes.FRAME:
            buf.position -= 1  # more HDLC segments to come: decipher the whole APDU then
            return
        tag = buf.getUInt8(buf.position - 1)
        start = buf.position
        n, pos = axdr.read_length(bytes(buf._data[start : buf.size]), 0)
        content = bytes(buf._data[start + pos : start + pos + n])
        try:
            plain = session.decipher(tag, content)
        except (CounterRefused, Deciphering) as e:
            # Raised from here, Gurux would answer a wrapper client with an HDLC FRMR:
            # hand the refusal to Session.handleCommand instead.
            session.cipher_error = e
            plain = bytes([{0xC8: 0xC0, 0xC9: 0xC1, 0xCB: 0xC3}.get(tag, 0xC0)])
        buf.clear()
        buf.set(plain)
        buf.position = 1
        data.command = Command(plain[0])

    GXDLMS.handleGloDedRequest = classmethod(handle_glo_ded_request)

    # 2b. A general-glo-ciphering request (0xDB: the sender's system title inside, as pwit's
    #     dlms-cosem sends even without general-protection negotiated) is routed by getPdu
    #     to the *response* decipherer on the server too. Take it as a request.
    original_response = GXDLMS.handleGloDedResponse.__func__

    def handle_glo_ded_response(cls, settings, data, index):
        session = getattr(settings, "amr_session", None)
        buf = data.data
        if session is None or buf.getUInt8(buf.position - 1) != 0xDB:
            return original_response(cls, settings, data, index)
        raw = bytes(buf._data[buf.position : buf.size])
        n, pos = axdr.read_length(raw, 0)
        title = raw[pos : pos + n]
        pos += n
        n, pos = axdr.read_length(raw, pos)
        try:
            if bytes(title) != bytes(settings.sourceSystemTitle or b""):
                raise Deciphering()
            plain = session.decipher(0xDB, raw[pos : pos + n])
            session.general = True
        except (CounterRefused, Deciphering) as e:
            session.cipher_error = e
            plain = bytes([0xC0])
        buf.clear()
        buf.set(plain)
        buf.position = 1
        data.command = Command(plain[0])

    GXDLMS.handleGloDedResponse = classmethod(handle_glo_ded_response)

    # 3. The glo-initiate-request inside an AARQ is deciphered by GXCiphering.decrypt, which
    #    does not check the tag either: decipher it ourselves (same checks as 2).
    original_decrypt = GXCiphering.decrypt.__func__

    def decrypt(cls, settings, p, data):
        session = getattr(settings, "amr_session", None)
        if session is None or not settings.isServer:
            return original_decrypt(cls, settings, p, data)
        tag = data.getUInt8()
        n = _GXCommon.getObjectCount(data)
        content = bytes(data._data[data.position : data.position + n])
        data.position += n
        plain = session.decipher(tag, content)
        p.security = Security(content[0] & 0x30)
        p.securitySuite = SecuritySuite(content[0] & 0x03)
        p.invocationCounter = struct.unpack(">I", content[1:5])[0]
        return bytearray(plain)

    GXCiphering.decrypt = classmethod(decrypt)

    # 4. GXDLMSChippering prints to stdout ("Encryption is applied." ...), which is the
    #    meter's channel to the test: silence it.
    # (the package re-exports the class under the module's name: fetch the module itself)
    chippering = sys.modules["gurux_dlms.GXDLMSChippering"]
    chippering.print = lambda *a, **k: None


# ---------------------------------------------------------------------------------------------
# One association at a time with one meter: Gurux's server plus our xDLMS services
# ---------------------------------------------------------------------------------------------

# The meter's side of the conformance block.
SERVER_CONFORMANCE = (
    Conformance.GET
    | Conformance.SELECTIVE_ACCESS
    | Conformance.ACTION
    | Conformance.BLOCK_TRANSFER_WITH_GET_OR_READ
    | Conformance.MULTIPLE_REFERENCES
)

LLC_REPLY = bytes([0xE6, 0xE7, 0x00])


def log(**fields):
    print(json.dumps(fields, default=str), file=sys.stderr, flush=True)


class Session(GXDLMSServer):
    """Gurux's server for one link to `meter` (a TCP connection, or the meter's share of a
    serial line). Gurux parses the frames and the AARQ; the GET and ACTION services, the
    AARE, the RLRE and the UA are ours (see the patches), served from `meter`'s objects."""

    def __init__(self, meter, hdlc):
        super().__init__(True, InterfaceType.HDLC if hdlc else InterfaceType.WRAPPER)
        patch_gurux()
        self.meter = meter
        self.args = meter.args
        self.is_hdlc = hdlc
        self.settings.amr_session = self
        self.settings.cipher = GXCiphering(bytes.fromhex(self.args.system_title))
        self.settings.cipher.blockCipherKey = bytearray(bytes.fromhex(self.args.block_cipher_key))
        self.settings.cipher.authenticationKey = bytearray(
            bytes.fromhex(self.args.authentication_key)
        )
        self.settings.proposedConformance = SERVER_CONFORMANCE
        self.settings.maxServerPDUSize = self.args.max_pdu
        self.settings.hdlc.maxInfoTX = self.args.max_info
        self.settings.hdlc.maxInfoRX = self.args.max_info
        # Repair: GXDLMSServer.initialize() appends the whole object collection to the
        # association's object list as one item, which the collection refuses (TypeError).
        # The objects are ours (Meter); Gurux needs only the flag.
        self.initialized = True
        self.ciphered = False  # whether the request being served came ciphered
        self.cipher_error = None  # why the ciphered request being served was refused
        self.general = False  # it came as general-glo-ciphering: answer in kind
        self.hls_pending = False
        self.pending = None  # (remaining bytes, next block number) of a long GET
        self.requests = 0  # xDLMS requests answered in this association
        self.dropped = False  # fault: the transport is to drop the link now
        self.silent = False  # HDLC after a drop: deaf until the next SNRM

    # -- Gurux's callbacks ---------------------------------------------------------------------

    def isTarget(self, serverAddress, clientAddress):
        return clientAddress in self.args.client_levels()

    def level(self):
        return self.args.client_levels().get(self.settings.clientAddress)

    def onValidateAuthentication(self, authentication, password):
        from gurux_dlms.enums import SourceDiagnostic

        a = self.args
        level = self.level()
        if "refuse-association" in a.fault:
            return SourceDiagnostic.AUTHENTICATION_FAILURE
        if level == "public" and authentication == Authentication.NONE:
            return SourceDiagnostic.NONE
        if level == "lls" and authentication == Authentication.LOW:
            if password is not None and bytes(password) == a.password.encode():
                return SourceDiagnostic.NONE
            return SourceDiagnostic.AUTHENTICATION_FAILURE
        if level == "hls" and authentication == Authentication.HIGH_GMAC:
            if self.settings.cipher.security != Security.AUTHENTICATION_ENCRYPTION:
                return SourceDiagnostic.AUTHENTICATION_FAILURE
            return SourceDiagnostic.NONE
        if level is None:
            return SourceDiagnostic.CALLING_AP_TITLE_NOT_RECOGNIZED
        return SourceDiagnostic.AUTHENTICATION_MECHANISM_NAME_NOT_RECOGNISED

    def onConnected(self, connectionInfo):
        log(event="associated", meter=self.meter.physical, client=self.settings.clientAddress)

    def onDisconnected(self, connectionInfo):
        log(event="released", meter=self.meter.physical, client=self.settings.clientAddress)

    def onInvalidConnection(self, connectionInfo):
        log(event="refused", meter=self.meter.physical, client=self.settings.clientAddress)

    # -- ciphering -----------------------------------------------------------------------------

    def decipher(self, tag, content):
        """The plain APDU of a glo- APDU from the HLS client; checks tag and counter."""
        cipher = self.settings.cipher
        title = self.settings.sourceSystemTitle
        if self.level() != "hls" or not title:
            raise Deciphering()
        try:
            sc, counter, plain = gcm_decrypt(
                cipher.blockCipherKey, cipher.authenticationKey, title, content
            )
        except InvalidTag:
            log(event="deciphering failed", meter=self.meter.physical, tag=tag)
            raise Deciphering() from None
        with self.meter.lock:
            if counter <= self.meter.client_counter:
                log(
                    event="invocation counter refused",
                    meter=self.meter.physical,
                    counter=counter,
                    last=self.meter.client_counter,
                )
                raise CounterRefused()
            self.meter.client_counter = counter
        self.ciphered = sc == SC_AUTH_ENC
        return plain

    def next_frame_counter(self):
        with self.meter.lock:
            self.meter.frame_counter += 1
            return self.meter.frame_counter

    def cipher_apdu(self, plain):
        cipher = self.settings.cipher
        tag = GLO_OF_PLAIN[plain[0]]
        if tag == 0xD8:
            return plain  # an exception-response is never ciphered
        if self.general:
            tag = 0xDB
        body = gcm_encrypt(
            cipher.blockCipherKey,
            cipher.authenticationKey,
            cipher.systemTitle,
            self.next_frame_counter(),
            SC_AUTH_ENC,
            plain,
        )
        if tag == 0xDB:
            title = bytes(cipher.systemTitle)
            return bytes([0xDB]) + axdr.length(len(title)) + title + axdr.length(len(body)) + body
        return bytes([tag]) + axdr.length(len(body)) + body

    # -- Gurux's request handler, around our services ------------------------------------------

    def handleCommand(self, cmd, data, sr):
        try:
            if self.cipher_error is not None:
                e, self.cipher_error = self.cipher_error, None
                raise e
            if cmd == Command.SNRM:
                apdu = self.snrm(data)
                return self.frame(Command.UA, apdu, raw=True)
            if cmd == Command.DISCONNECT_REQUEST:
                return self.disc()
            if cmd == Command.AARQ:
                return self.frame(cmd, self.aarq(data, sr))
            if cmd == Command.RELEASE_REQUEST:
                return self.release()
            if cmd in (Command.GET_REQUEST, Command.METHOD_REQUEST, Command.SET_REQUEST):
                return self.frame(cmd, self.service(cmd, data))
        except CounterRefused:
            # exception-response: service-not-allowed, invocation-counter-error (expected)
            return self.frame(
                cmd, bytes([0xD8, 0x01, 0x07]) + struct.pack(">I", self.meter.client_counter + 1)
            )
        except Deciphering:
            return self.frame(cmd, bytes([0xD8, 0x01, 0x06]))
        except Exception:
            traceback.print_exc(file=sys.stderr)
            raise
        finally:
            self.ciphered = False
            self.general = False
        return super().handleCommand(cmd, data, sr)

    def frame(self, cmd, apdu, raw=False):
        """The wrapper or HDLC frame(s) carrying `apdu` (None: no answer). Long APDUs on HDLC
        leave the rest in replyData, sent as the client asks (RR) by Gurux."""
        if apdu is None:
            return None
        self.replyData.clear()
        if self.is_hdlc:
            if not raw:
                self.replyData.set(LLC_REPLY)
            self.replyData.set(apdu)
            # 0: the next I-frame (Gurux numbers it)
            frame = Command.UA if raw else 0
            return GXDLMS.getHdlcFrame(self.settings, frame, self.replyData)
        self.replyData.set(apdu)
        return GXDLMS.getWrapperFrame(self.settings, cmd, self.replyData)

    # -- HDLC link -----------------------------------------------------------------------------

    def snrm(self, data):
        # Repair: Gurux's handleSnrmRequest reads the negotiated sizes from `self.hdlc`,
        # which is never set (None), so a SNRM was never answered. Negotiate on
        # settings.hdlc and answer UA with the result.
        h = self.settings.hdlc
        h.maxInfoTX = h.maxInfoRX = self.args.max_info
        h.windowSizeTX = h.windowSizeRX = 1
        GXDLMS.parseSnrmUaResponse(data, h)
        h.maxInfoTX = min(h.maxInfoTX, self.args.max_info)
        h.maxInfoRX = min(h.maxInfoRX, self.args.max_info)
        h.windowSizeTX = h.windowSizeRX = 1
        self.reset(True)
        self.pending = None
        self.settings.connected = ConnectionState.HDLC
        return self.ua_info()

    def ua_info(self):
        h = self.settings.hdlc
        params = bytearray()
        for ident, value in ((5, h.maxInfoTX), (6, h.maxInfoRX)):
            params += bytes([ident]) + (
                bytes([1, value]) if value < 0x100 else bytes([2]) + struct.pack(">H", value)
            )
        for ident, value in ((7, h.windowSizeTX), (8, h.windowSizeRX)):
            params += bytes([ident, 4]) + struct.pack(">I", value)
        return bytes([0x81, 0x80, len(params)]) + bytes(params)

    def disc(self):
        # Repair: generateDisconnectRequest reads `self.hdlc` too (None). Answer DISC with UA
        # (DM when not connected, done by Gurux before it gets here).
        if self.settings.connected & ConnectionState.DLMS:
            self.onDisconnected(None)
        reply = self.frame(Command.UA, self.ua_info(), raw=True)
        self.reset()
        self.pending = None
        return reply

    # -- association ---------------------------------------------------------------------------

    def aarq(self, data, sr):
        """Repair: AARQ -> AARE. Gurux parses the AARQ (its glo-initiate-request deciphered by our
        patch 3); the AARE is written here: Gurux's generateAARE crashes for HLS
        (`setUInt8()` without a value) and writes the system title under the wrong tag."""
        from gurux_dlms.enums import SourceDiagnostic

        s = self.settings
        s.setCtoSChallenge(None)
        s.cipher.security = Security.NONE
        s.sourceSystemTitle = None
        self.reset(True)
        self.settings.connected |= ConnectionState.HDLC if self.is_hdlc else 0
        self.hls_pending = False
        self.pending = None
        self.requests = 0
        result, diagnostic, user_info = 0, SourceDiagnostic.NONE, None
        try:
            diagnostic = _GXAPDU.parsePDU(s, s.cipher, data, None)
        except (CounterRefused, Deciphering):
            result, diagnostic = 1, SourceDiagnostic.AUTHENTICATION_FAILURE
        except Exception as e:  # an AARQ we cannot read: refuse it, say why on stderr
            log(event="bad AARQ", meter=self.meter.physical, error=repr(e))
            result, diagnostic = 1, SourceDiagnostic.NO_REASON_GIVEN
        if result == 0 and diagnostic != SourceDiagnostic.NONE:
            result = 1
        if result == 0:
            diagnostic = self.onValidateAuthentication(s.authentication, s.password)
            if diagnostic != SourceDiagnostic.NONE:
                result = 1
        if result == 0 and s.negotiatedConformance == Conformance.NONE:
            result, diagnostic = 1, SourceDiagnostic.NO_REASON_GIVEN
            user_info = bytes([0x0E, 0x01, 0x06, 0x01])  # initiate-error: incompatible-conformance
        if result == 0 and s.maxPduSize < 64:
            result, diagnostic = 1, SourceDiagnostic.NO_REASON_GIVEN
            user_info = bytes([0x0E, 0x01, 0x06, 0x05])  # pdu-size too short
        hls = s.authentication == Authentication.HIGH_GMAC
        if result != 0:
            self.onInvalidConnection(None)
        elif hls:
            diagnostic = 14  # authentication-required: the client answers our challenge
            s.setStoCChallenge(os.urandom(16))
            self.hls_pending = True
        else:
            s.connected |= ConnectionState.DLMS
            self.onConnected(None)
        s.maxPduSize = min(s.maxPduSize, self.args.max_pdu)
        if result == 0 and user_info is None:
            user_info = self.initiate_response()
        return self.aare(result, diagnostic, user_info, hls)

    def initiate_response(self):
        s = self.settings
        conf = int(s.negotiatedConformance)
        bits = 0
        # Gurux holds the conformance bits LSB = bit 0 of the Blue Book's 24-bit string,
        # reversed on the wire.
        for i in range(24):
            if conf & (1 << i):
                bits |= 1 << (23 - i)
        plain = (
            bytes([0x08, 0x00, 0x06, 0x5F, 0x1F, 0x04, 0x00])
            + bits.to_bytes(3, "big")
            + struct.pack(">H", self.args.max_pdu)
            + bytes([0x00, 0x07])
        )
        if s.cipher.security != Security.NONE:
            # glo-initiate-response, ciphered with the meter's frame counter
            body = gcm_encrypt(
                s.cipher.blockCipherKey,
                s.cipher.authenticationKey,
                s.cipher.systemTitle,
                self.next_frame_counter(),
                SC_AUTH_ENC,
                plain,
            )
            return bytes([0x28]) + axdr.length(len(body)) + body
        return plain

    def aare(self, result, diagnostic, user_info, hls):
        s = self.settings
        ciphered = s.cipher.security != Security.NONE
        out = bytearray()
        out += bytes(
            [0xA1, 0x09, 0x06, 0x07, 0x60, 0x85, 0x74, 0x05, 0x08, 0x01, 3 if ciphered else 1]
        )
        out += bytes([0xA2, 0x03, 0x02, 0x01, result])
        out += bytes([0xA3, 0x05, 0xA1, 0x03, 0x02, 0x01, int(diagnostic)])
        if ciphered or hls:
            st = bytes(s.cipher.systemTitle)
            out += bytes([0xA4, len(st) + 2, 0x04, len(st)]) + st
        if hls and result == 0:
            out += bytes([0x88, 0x02, 0x07, 0x80])
            out += bytes([0x89, 0x07, 0x60, 0x85, 0x74, 0x05, 0x08, 0x02, int(s.authentication)])
            c = bytes(s.stoCChallenge)
            out += bytes([0xAA, len(c) + 2, 0x80, len(c)]) + c
        if user_info is not None:
            out += bytes([0xBE, len(user_info) + 2, 0x04, len(user_info)]) + user_info
        return bytes([0x61]) + axdr.length(len(out)) + bytes(out)

    def release(self):
        # Repair: Gurux's handleReleaseRequest writes the RLRE with a wrong length (it counts
        # only the user-information). RLRE: reason normal (0), no user-information.
        apdu = bytes([0x63, 0x03, 0x80, 0x01, 0x00])
        was = self.settings.connected & ConnectionState.DLMS
        self.settings.connected &= ~ConnectionState.DLMS
        self.settings.cipher.security = Security.NONE
        self.hls_pending = False
        self.pending = None
        if was:
            self.onDisconnected(None)
        return self.frame(Command.RELEASE_REQUEST, apdu)

    # -- xDLMS services ------------------------------------------------------------------------

    def service(self, cmd, data):
        """Repair: the GET, SET and ACTION services, served here from the Meter's values.
        Gurux's handlers do not work in 1.0.203: getRequestNormal calls notifyRead() and
        onPostRead() without their argument (the pre-read hook never sees the request),
        GXDLMSLNParameters lacks the multiple-blocks and status accessors,
        getRequestNextDataBlock reads `settings.gbtWndowSize` and iterates the transaction's
        targets as a list, the object list skips entries to fit one PDU, the profile's
        selective access fails (a missing row-index helper, a date-time compared with an
        int) or drops every column, and registers write their scaler as
        floor(log10(10**s)), which is 2 for 3. Long answers go in blocks here (get-response-
        with-datablock), each block ciphered on its own for the HLS client."""
        raw = bytes(data._data[data.position : data.size])
        plain_tag = {
            Command.GET_REQUEST: 0xC0,
            Command.SET_REQUEST: 0xC1,
            Command.METHOD_REQUEST: 0xC3,
        }[cmd]
        ciphered = self.ciphered
        if self.level() == "hls" and not ciphered:
            # The HLS association takes ciphered APDUs only.
            return bytes([0xD8, 0x01, 0x06])
        associated = bool(self.settings.connected & ConnectionState.DLMS)
        if associated and "drop-mid-association" in self.args.fault:
            if self.requests >= self.args.drop_after:
                self.dropped = True
                return None
            self.requests += 1
        if not associated and not (self.hls_pending and cmd == Command.METHOD_REQUEST):
            # confirmed-service-error: initiate-error, service, unsupported... no association
            return bytes([0x0E, 0x01, 0x06, 0x00])
        if plain_tag == 0xC0:
            reply = self.get(raw)
        elif plain_tag == 0xC3:
            reply = self.action(raw)
        else:
            reply = bytes([0xC5, 0x01, raw[1], READ_WRITE_DENIED])
        if reply is None:
            return None
        return self.cipher_apdu(reply) if ciphered else reply

    def get(self, raw):
        kind, invoke = raw[0], raw[1]
        if kind == 1:
            ci = struct.unpack(">H", raw[2:4])[0]
            obis = obis_text(raw[4:10])
            attr = raw[10]
            selector, params = None, None
            if raw[11]:
                selector = raw[12]
                params, _ = axdr.decode(raw, 13)
            try:
                value = axdr.encode(self.read(ci, obis, attr, selector, params))
            except Refused as r:
                return bytes([0xC4, 0x01, invoke, 0x01, r.code])
            return self.get_response(invoke, value)
        if kind == 2:
            block = struct.unpack(">I", raw[2:6])[0]
            if self.pending is None or block != self.pending[1] - 1:
                # data-block-number-invalid (or no long get in progress)
                return (
                    bytes([0xC4, 0x02, invoke, 0x01])
                    + struct.pack(">I", block)
                    + bytes([0x01, 19 if self.pending else 20])
                )
            if "stop-block-transfer" in self.args.fault:
                log(event="block transfer stopped (fault)", meter=self.meter.physical, block=block)
                return None
            return self.next_block(invoke)
        if kind == 3:
            n, pos = axdr.read_length(raw, 2)
            results = bytearray()
            for _ in range(n):
                ci = struct.unpack(">H", raw[pos : pos + 2])[0]
                obis = obis_text(raw[pos + 2 : pos + 8])
                attr = raw[pos + 8]
                selector, params = None, None
                has_sel = raw[pos + 9]
                pos += 10
                if has_sel:
                    selector = raw[pos]
                    params, pos = axdr.decode(raw, pos + 1)
                try:
                    results += b"\x00" + axdr.encode(self.read(ci, obis, attr, selector, params))
                except Refused as r:
                    results += bytes([0x01, r.code])
            return self.get_response(
                invoke, bytes(results), header=bytes([0xC4, 0x03, invoke]) + axdr.length(n)
            )
        return bytes([0xC4, 0x01, invoke, 0x01, OTHER_REASON])

    def read(self, ci, obis, attr, selector, params):
        if obis in self.args.undefined:
            raise Refused(UNDEFINED_OBJECT)
        obj = self.meter.objects.get(obis)
        if obj is None or obj.class_id != ci:
            raise Refused(UNDEFINED_OBJECT)
        if selector:
            return self.meter.read_selective(obj, attr, selector, params)
        if obis == ASSOCIATION and attr == 3:
            return axdr.struct_(axdr.i8(self.settings.clientAddress), axdr.u16(1))
        return self.meter.read(obis, attr)

    def get_response(self, invoke, value, header=None):
        """get-response-normal (or -with-list), or its first block when it does not fit the
        client's PDU size (the rest on get-request-next)."""
        if header is None:
            header = bytes([0xC4, 0x01, invoke, 0x00])
        overhead = 30 if self.ciphered else 0  # glo tag, length, SC, IC, tag
        if len(header) + len(value) + overhead <= self.settings.maxPduSize:
            self.pending = None
            return header + value
        if header[1] == 3:
            value = header[3:] + value  # a with-list response goes in blocks from its count
        self.pending = [value, 1]
        return self.next_block(invoke)

    def next_block(self, invoke):
        rest, number = self.pending
        overhead = 30 if self.ciphered else 0
        room = self.settings.maxPduSize - overhead - 12
        chunk, rest = rest[:room], rest[room:]
        last = not rest
        self.pending = None if last else [rest, number + 1]
        return (
            bytes([0xC4, 0x02, invoke, 1 if last else 0])
            + struct.pack(">I", number)
            + b"\x00"
            + axdr.length(len(chunk))
            + chunk
        )

    def action(self, raw):
        kind, invoke = raw[0], raw[1]
        if kind != 1:
            return bytes([0xC7, 0x01, invoke, OTHER_REASON, 0x00])
        ci = struct.unpack(">H", raw[2:4])[0]
        obis = obis_text(raw[4:10])
        method = raw[10]
        params = None
        if raw[11]:
            params, _ = axdr.decode(raw, 12)
        if ci == 15 and obis == ASSOCIATION and method == 1 and self.hls_pending:
            return self.reply_to_hls(invoke, params)
        # action-result: object-undefined / read-write-denied
        code = UNDEFINED_OBJECT if obis not in self.meter.objects else READ_WRITE_DENIED
        return bytes([0xC7, 0x01, invoke, code, 0x00])

    def reply_to_hls(self, invoke, answer):
        """Pass 3 and 4 of HLS-GMAC: check f(StoC) from the client, answer f(CtoS)."""
        s = self.settings
        c = s.cipher
        ok = False
        if isinstance(answer, bytes) and len(answer) == 5 + TAG_LEN and answer[0] == SC_AUTH:
            counter = struct.unpack(">I", answer[1:5])[0]
            expect = _gmac_tag(
                c.blockCipherKey, c.authenticationKey, s.sourceSystemTitle, counter, s.stoCChallenge
            )
            ok = expect == answer[5:]
        self.hls_pending = False
        if not ok:
            log(event="HLS answer refused", meter=self.meter.physical)
            self.onInvalidConnection(None)
            # action-result: read-write-denied, no return data
            return bytes([0xC7, 0x01, invoke, READ_WRITE_DENIED, 0x00])
        s.connected |= ConnectionState.DLMS
        self.onConnected(None)
        proof = gmac(
            c.blockCipherKey,
            c.authenticationKey,
            c.systemTitle,
            self.next_frame_counter(),
            s.ctoSChallenge,
        )
        return bytes([0xC7, 0x01, invoke, 0x00, 0x01, 0x00]) + axdr.encode(axdr.octets(proof))


# ---------------------------------------------------------------------------------------------
# Transports
# ---------------------------------------------------------------------------------------------


def crc16(data):
    """HDLC FCS (CRC-16/X.25), as sent: low byte first."""
    crc = 0xFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ 0x8408 if crc & 1 else crc >> 1
    return (~crc) & 0xFFFF


def hdlc_addresses(frame):
    """(destination address bytes, source address bytes, offset of the control byte): the
    server's address first in a request, the client's first in a reply."""
    pos = 3
    start = pos
    while not frame[pos] & 1:
        pos += 1
    destination = frame[start : pos + 1]
    pos += 1
    start = pos
    while not frame[pos] & 1:
        pos += 1
    return destination, frame[start : pos + 1], pos + 1


def split_address(server_bytes):
    """(upper = logical, lower = physical or None) of an HDLC server address of 1, 2 or 4
    bytes."""
    b = [x >> 1 for x in server_bytes]
    if len(b) == 1:
        return b[0], None
    if len(b) == 2:
        return b[0], b[1]
    if len(b) == 4:
        return (b[0] << 7) | b[1], (b[2] << 7) | b[3]
    return None, None


def address_bytes(value):
    """A 14-bit HDLC address half in two bytes (the 4-byte form), last bit set."""
    return bytes([((value >> 7) << 1) & 0xFE, ((value & 0x7F) << 1) | 1])


def with_source(frame, source):
    """Reply `frame` sent from another (server) address, HCS and FCS recomputed."""
    destination, _, ctrl = hdlc_addresses(frame)
    out = bytearray([frame[1], 0]) + destination + source + bytes([frame[ctrl]])
    if len(frame) > ctrl + 4:
        info = frame[ctrl + 3 : -3]
        length = len(out) + 2 + len(info) + 2
        out[0] = (out[0] & 0xF8) | ((length >> 8) & 7)
        out[1] = length & 0xFF
        out += struct.pack("<H", crc16(out)) + info
    else:
        out[1] = (len(out) + 2) & 0xFF
    out += struct.pack("<H", crc16(out))
    return bytes([0x7E]) + bytes(out) + bytes([0x7E])


def spoil(frame, faults, meter):
    """Fault injection on one reply frame of the meter (HDLC)."""
    if "wrong-address" in faults:
        # Answer as if from the meter one address up: a sound frame, not ours.
        _, server, _ = hdlc_addresses(frame)
        other = meter.physical + 1
        if len(server) == 4:
            frame = with_source(frame, bytes(server[:2]) + address_bytes(other))
        elif len(server) == 2:
            frame = with_source(frame, bytes(server[:1]) + bytes([(other << 1) | 1]))
        else:
            frame = with_source(frame, bytes([(2 << 1) | 1]))  # logical device 2
    if "bad-fcs" in faults:
        frame = frame[:-3] + bytes([frame[-3] ^ 0xFF]) + frame[-2:]
    if "bad-hcs" in faults:
        _, _, ctrl = hdlc_addresses(frame)
        if len(frame) > ctrl + 4:
            # only the header check wrong: the FCS is recomputed over the spoilt header
            frame = frame[: ctrl + 1] + bytes([frame[ctrl + 1] ^ 0xFF]) + frame[ctrl + 2 : -3]
            frame = frame + struct.pack("<H", crc16(frame[1:])) + b"\x7e"
    return frame


def is_info_frame(frame):
    _, _, ctrl = hdlc_addresses(frame)
    return (frame[ctrl] & 1) == 0


def answer(session, frame):
    """The reply to one received frame, or None. Counts associations' requests for the
    drop-mid-association fault."""
    sr = GXServerReply(bytearray(frame))
    session.handleRequest(sr)
    return sr.reply or None


def serve_hdlc(args, meters):
    import serial

    sessions = {m.physical: Session(m, hdlc=True) for m in meters}
    port = serial.Serial(args.hdlc, args.baud, timeout=0.05)
    ready(args, meters)
    buf = bytearray()
    while True:
        # Returns as soon as a byte is there (a fixed-size read would wait out the timeout).
        chunk = port.read(max(1, port.in_waiting))
        if chunk:
            buf += chunk
        while True:
            start = buf.find(b"\x7e")
            if start < 0:
                buf.clear()
                break
            del buf[:start]
            if len(buf) < 3:
                break
            if buf[1] == 0x7E:
                del buf[:1]  # two flags in a row: the first closes nothing
                continue
            if (buf[1] & 0xF0) != 0xA0:
                del buf[:1]
                continue
            # DLMS HDLC does not byte-stuff: the frame ends where its length says.
            total = (((buf[1] & 0x07) << 8) | buf[2]) + 2
            if len(buf) < total:
                break
            frame = bytes(buf[:total])
            if frame[-1] != 0x7E:
                del buf[:1]
                continue
            del buf[:total]
            try:
                server, _, _ = hdlc_addresses(frame)
            except IndexError:
                continue
            logical, physical = split_address(server)
            if physical is None and len(sessions) == 1:
                physical = next(iter(sessions))
            session = sessions.get(physical)
            if session is None or logical != 1:
                continue  # another meter's frame (or another logical device): silence
            if session.silent:
                if (frame[hdlc_addresses(frame)[2]] & 0xEF) != 0x83:  # until a new SNRM
                    continue
                session.silent = False
            try:
                reply = answer(session, frame)
            except Exception:
                traceback.print_exc(file=sys.stderr)
                continue
            if session.dropped:
                session.dropped = False
                session.silent = True
                session.reset()
                continue
            if reply:
                reply = bytes(reply)
                if args.fault and is_info_frame(reply):
                    reply = spoil(reply, args.fault, session.meter)
                time.sleep(args.reply_delay)
                port.write(reply)
                port.flush()


def serve_wrapper(args, meters):
    meter = meters[0]
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", args.port))
    listener.listen(8)
    args.port = listener.getsockname()[1]
    ready(args, meters)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=wrapper_connection, args=(args, meter, conn), daemon=True).start()


def read_exact(conn, n):
    out = bytearray()
    while len(out) < n:
        try:
            chunk = conn.recv(n - len(out))
        except ConnectionResetError:
            return None  # the client went away (killed): the same as a close
        if not chunk:
            return None
        out += chunk
    return bytes(out)


def wrapper_connection(args, meter, conn):
    session = Session(meter, hdlc=False)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        while True:
            header = read_exact(conn, 8)
            if header is None:
                return
            version, _src, dst, length = struct.unpack(">HHHH", header)
            body = read_exact(conn, length)
            if body is None or version != 1:
                return
            if dst != 1:
                continue  # another logical device: silence
            try:
                reply = answer(session, header + body)
            except Exception:
                traceback.print_exc(file=sys.stderr)
                continue
            if session.dropped:
                log(event="connection dropped (fault)", meter=meter.physical)
                return
            if reply:
                reply = bytearray(reply)
                if "wrong-address" in args.fault:
                    reply[2:4] = struct.pack(">H", 2)
                time.sleep(args.reply_delay)
                conn.sendall(bytes(reply))
    finally:
        conn.close()


def ready(args, meters):
    if args.state_json:
        with open(args.state_json, "w", encoding="utf-8") as f:
            json.dump(dump(args, meters), f, indent=1)
    line = {
        "ready": True,
        "transport": "hdlc" if args.hdlc else "wrapper",
        "meters": [m.physical for m in meters],
    }
    if not args.hdlc:
        line["port"] = args.port
    else:
        line["device"] = args.hdlc
    print(json.dumps(line), flush=True)


def dump(args, meters):
    return {
        "security": {
            "public": {"client_sap": args.public_sap},
            "lls": {"client_sap": args.lls_sap, "password": args.password},
            "hls_gmac": {
                "client_sap": args.hls_sap,
                "block_cipher_key": args.block_cipher_key,
                "authentication_key": args.authentication_key,
                "system_title": args.system_title,
                "security_suite": 0,
            },
        },
        "meters": [m.dump() for m in meters],
    }


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

FAULTS = (
    "drop-mid-association",
    "stop-block-transfer",
    "bad-fcs",
    "bad-hcs",
    "wrong-address",
    "refuse-association",
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="meter.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Load profile 1-0:99.1.0.255, deterministic:\n"
        + load_profile.FORMULA
        + "\n\nRegisters: 1-0:1.8.0 = --import-wh + 1000*physical (scaler -1, Wh); 1-0:2.8.0 = "
        "--export-wh + physical (scaler 3, Wh);\n1-0:32.7.0 = --voltage (scaler -1, V); "
        "1-0:31.7.0 = --current (scaler -2, A); exact integers, scalers as configured.\n"
        "--dump-json prints every object's attributes as the meter serves them.",
    )
    t = p.add_argument_group("transport")
    t.add_argument("--wrapper", action="store_true", help="serve the IEC 62056-47 TCP wrapper")
    t.add_argument(
        "--port", type=int, default=0, help="wrapper TCP port on 127.0.0.1 (0: any, printed)"
    )
    t.add_argument("--hdlc", metavar="DEVICE", help="serve HDLC on this serial device (a pty)")
    t.add_argument("--baud", type=int, default=9600)
    t.add_argument(
        "--physical",
        type=int,
        action="append",
        help="HDLC physical address (repeat: several meters on the line); default 17",
    )
    t.add_argument("--max-pdu", type=int, default=512, help="the meter's max receive/send PDU size")
    t.add_argument("--max-info", type=int, default=128, help="HDLC max information field length")
    s = p.add_argument_group("security")
    s.add_argument("--public-sap", type=int, default=16)
    s.add_argument("--lls-sap", type=int, default=17)
    s.add_argument("--password", default="12345678", help="LLS password")
    s.add_argument("--hls-sap", type=int, default=1)
    s.add_argument("--block-cipher-key", default="000102030405060708090A0B0C0D0E0F")
    s.add_argument("--authentication-key", default="D0D1D2D3D4D5D6D7D8D9DADBDCDDDEDF")
    s.add_argument(
        "--system-title", default="414D523030303137", help="server system title, 8 bytes hex"
    )
    s.add_argument(
        "--frame-counter", type=int, default=0, help="the meter's invocation counter at start"
    )
    v = p.add_argument_group("values")
    v.add_argument(
        "--clock-offset",
        type=float,
        default=0.0,
        help="seconds the meter's clock is ahead of the system's",
    )
    v.add_argument(
        "--clock-deviation",
        type=int,
        default=0,
        help="clock deviation, minutes (local = UTC - deviation)",
    )
    v.add_argument(
        "--clock-status", type=int, default=0, help="clock status byte (0x80: daylight saving ...)"
    )
    v.add_argument("--profile-days", type=int, default=2)
    v.add_argument("--import-wh", type=int, default=12345678)
    v.add_argument("--export-wh", type=int, default=4321)
    v.add_argument("--voltage", type=int, default=2301)
    v.add_argument("--current", type=int, default=525)
    v.add_argument("--max-demand", type=int, default=5432, help="1-0:1.6.0 extended register (W)")
    v.add_argument(
        "--demand-current",
        type=int,
        default=1150,
        help="1-0:1.4.0 demand register current average (W)",
    )
    v.add_argument("--demand-last", type=int, default=1100)
    v.add_argument(
        "--capture-time",
        type=int,
        default=1764547200,
        help="capture time of 1-0:1.6.0 / 1-0:1.4.0 (Unix)",
    )
    f = p.add_argument_group("faults")
    f.add_argument(
        "--fault",
        action="append",
        default=[],
        choices=FAULTS,
        help="repeatable. drop-mid-association: after --drop-after requests the wrapper closes the "
        "connection, HDLC goes silent until a new SNRM; stop-block-transfer: no answer to the "
        "request for a long GET's second block; bad-fcs / bad-hcs (HDLC): every I-frame the meter "
        "sends has a wrong FCS / a wrong HCS (and a sound FCS); wrong-address: replies come from "
        "physical address +1 (HDLC) or wrapper port 2; refuse-association: every AARQ is "
        "rejected (authentication-failure)",
    )
    f.add_argument(
        "--drop-after", type=int, default=1, help="drop-mid-association: requests answered first"
    )
    f.add_argument(
        "--reply-delay",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="a slow meter: every reply this long after its request",
    )
    f.add_argument(
        "--omit", action="append", default=[], metavar="OBIS", help="leave this object out"
    )
    f.add_argument(
        "--undefined",
        action="append",
        default=[],
        metavar="OBIS",
        help="listed, but answered object-undefined",
    )
    o = p.add_argument_group("output")
    o.add_argument("--dump-json", action="store_true", help="print every object as JSON and exit")
    o.add_argument("--state-json", metavar="PATH", help="write that JSON here at start")
    args = p.parse_args(argv)
    args.physical = args.physical or [17]
    if args.wrapper and len(args.physical) > 1:
        p.error("the wrapper serves one meter (start one process per meter)")
    levels = {args.public_sap: "public", args.lls_sap: "lls", args.hls_sap: "hls"}
    args.client_levels = lambda: levels
    return args


def main(argv=None):
    args = parse_args(argv)
    meters = [Meter(args, physical) for physical in args.physical]
    if args.dump_json:
        print(json.dumps(dump(args, meters), indent=1))
        return
    if args.hdlc:
        serve_hdlc(args, meters)
    elif args.wrapper:
        serve_wrapper(args, meters)
    else:
        sys.exit("meter.py: say --wrapper or --hdlc DEVICE")


if __name__ == "__main__":
    main()
