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

import profile as load_profile  # noqa: E402

from gurux_dlms import GXByteBuffer, GXDateTime, GXDLMSClient, GXReplyData  # noqa: E402
from gurux_dlms.enums import Authentication, InterfaceType, ObjectType, Security  # noqa: E402
from gurux_dlms.GXDLMSException import GXDLMSException  # noqa: E402
from gurux_dlms.objects import GXDLMSProfileGeneric  # noqa: E402
from gurux_dlms.secure import GXDLMSSecureClient  # noqa: E402

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
            raise Timeout()
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
            data = self.port.read(512)
            if data:
                return data
        raise Timeout()

    def close(self):
        self.port.close()


class Client:
    """Gurux's client over a link: connect, read, release."""

    def __init__(self, link, hdlc, sap, physical=17, auth=Authentication.NONE, password=None,
                 bck=BCK, ak=AK, counter=1):
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
