"""A-XDR values as the meter serves them: typed, exact, and printable as JSON.

Every attribute of the simulated meter is one of these values. The meter encodes them on the
wire itself (Gurux's object classes re-derive scalers and dates on the way out, see
meter.py), and `--dump-json` prints the same values, so what a test reads in the JSON is
byte for byte what the meter sends.
"""

import struct

# Blue Book data type tags.
NULL = 0
ARRAY = 1
STRUCTURE = 2
BOOLEAN = 3
BIT_STRING = 4
INT32 = 5  # double-long
UINT32 = 6  # double-long-unsigned
OCTET_STRING = 9
VISIBLE_STRING = 10
INT8 = 15  # integer
INT16 = 16  # long
UINT8 = 17  # unsigned
UINT16 = 18  # long-unsigned
INT64 = 20  # long64
UINT64 = 21  # long64-unsigned
ENUM = 22

NAMES = {
    NULL: "null-data",
    ARRAY: "array",
    STRUCTURE: "structure",
    BOOLEAN: "boolean",
    INT32: "double-long",
    UINT32: "double-long-unsigned",
    OCTET_STRING: "octet-string",
    VISIBLE_STRING: "visible-string",
    INT8: "integer",
    INT16: "long",
    UINT8: "unsigned",
    UINT16: "long-unsigned",
    INT64: "long64",
    UINT64: "long64-unsigned",
    ENUM: "enum",
}

_FIXED = {
    INT8: ">b",
    UINT8: ">B",
    ENUM: ">B",
    INT16: ">h",
    UINT16: ">H",
    INT32: ">i",
    UINT32: ">I",
    INT64: ">q",
    UINT64: ">Q",
}


class V:
    """One typed value: `tag` is the A-XDR type, `value` an int, bytes, str, bool, list of V."""

    __slots__ = ("tag", "value")

    def __init__(self, tag, value=None):
        self.tag = tag
        self.value = value

    def __eq__(self, other):
        return isinstance(other, V) and self.tag == other.tag and self.value == other.value

    def __repr__(self):
        return f"V({NAMES.get(self.tag, self.tag)}, {self.value!r})"


def null():
    return V(NULL)


def u8(v):
    return V(UINT8, v)


def u16(v):
    return V(UINT16, v)


def u32(v):
    return V(UINT32, v)


def i8(v):
    return V(INT8, v)


def i16(v):
    return V(INT16, v)


def i32(v):
    return V(INT32, v)


def enum(v):
    return V(ENUM, v)


def boolean(v):
    return V(BOOLEAN, bool(v))


def octets(b):
    return V(OCTET_STRING, bytes(b))


def visible(s):
    return V(VISIBLE_STRING, s)


def struct_(*items):
    return V(STRUCTURE, list(items))


def array(items):
    return V(ARRAY, list(items))


def length(n):
    """An A-XDR length (the BER-like form DLMS uses for counts and octet-string lengths)."""
    if n < 0x80:
        return bytes([n])
    if n < 0x100:
        return bytes([0x81, n])
    if n < 0x10000:
        return bytes([0x82]) + struct.pack(">H", n)
    return bytes([0x84]) + struct.pack(">I", n)


def encode(v):
    out = bytearray([v.tag])
    if v.tag == NULL:
        pass
    elif v.tag in (ARRAY, STRUCTURE):
        out += length(len(v.value))
        for item in v.value:
            out += encode(item)
    elif v.tag == BOOLEAN:
        out.append(1 if v.value else 0)
    elif v.tag in _FIXED:
        out += struct.pack(_FIXED[v.tag], v.value)
    elif v.tag == OCTET_STRING:
        out += length(len(v.value)) + v.value
    elif v.tag == VISIBLE_STRING:
        raw = v.value.encode("ascii")
        out += length(len(raw)) + raw
    else:
        raise ValueError(f"cannot encode type {v.tag}")
    return bytes(out)


def to_json(v):
    """{"type": name, "value": ...}: octet strings in hex, containers as lists."""
    if v.tag in (ARRAY, STRUCTURE):
        value = [to_json(i) for i in v.value]
    elif v.tag == OCTET_STRING:
        value = v.value.hex()
    else:
        value = v.value
    return {"type": NAMES[v.tag], "value": value}


def read_length(buf, pos):
    n = buf[pos]
    pos += 1
    if n < 0x80:
        return n, pos
    k = n & 0x7F
    return int.from_bytes(buf[pos : pos + k], "big"), pos + k


def decode(buf, pos=0):
    """(value, next position) of the A-XDR data at `buf[pos]`: containers become lists,
    octet strings bytes, numbers ints (what a request's access parameters hold)."""
    tag = buf[pos]
    pos += 1
    if tag == NULL:
        return None, pos
    if tag in (ARRAY, STRUCTURE):
        n, pos = read_length(buf, pos)
        items = []
        for _ in range(n):
            v, pos = decode(buf, pos)
            items.append(v)
        return items, pos
    if tag == BOOLEAN:
        return buf[pos] != 0, pos + 1
    if tag in _FIXED:
        size = struct.calcsize(_FIXED[tag])
        return struct.unpack(_FIXED[tag], bytes(buf[pos : pos + size]))[0], pos + size
    if tag in (OCTET_STRING, VISIBLE_STRING, BIT_STRING):
        n, pos = read_length(buf, pos)
        if tag == BIT_STRING:
            n = (n + 7) // 8
        return bytes(buf[pos : pos + n]), pos + n
    if tag == 25:  # date-time, 12 bytes
        return bytes(buf[pos : pos + 12]), pos + 12
    raise ValueError(f"cannot decode type {tag}")
