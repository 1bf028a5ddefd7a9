"""A second independent client for tests/dlms/meter.py: pwit's dlms-cosem (MIT), over the
TCP wrapper, at each security level. Optional: not in tests/requirements.txt, run by hand
after `pip install dlms-cosem==25.1.0` in the tests' virtualenv.

usage: cosem_client.py      (starts its own meter; exits non-zero on a mismatch)
"""

import datetime
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import axdr  # noqa: E402
import load_profile  # noqa: E402

from dlms_cosem import cosem, enumerations  # noqa: E402
from dlms_cosem.client import DlmsClient  # noqa: E402
from dlms_cosem.cosem.capture_object import CaptureObject  # noqa: E402
from dlms_cosem.cosem.selective_access import RangeDescriptor  # noqa: E402
from dlms_cosem.io import BlockingTcpIO, TcpTransport  # noqa: E402
from dlms_cosem.security import (  # noqa: E402
    HighLevelSecurityGmacAuthentication,
    LowLevelSecurityAuthentication,
    NoSecurityAuthentication,
)

import logging  # noqa: E402

import structlog  # noqa: E402

# dlms-cosem logs every frame at debug level.
structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

FAILURES = []
CHECKS = [0]


def check(what, got, want):
    CHECKS[0] += 1
    if got != want:
        FAILURES.append(what)
        print(f"MISMATCH {what}: got {got!r}, want {want!r}", flush=True)


def attribute(interface, obis, attr):
    return cosem.CosemAttribute(
        interface=interface, instance=cosem.Obis.from_string(obis), attribute=attr
    )


def client(port, sap, auth, **kw):
    io = BlockingTcpIO(host="127.0.0.1", port=port)
    transport = TcpTransport(client_logical_address=sap, server_logical_address=1, io=io)
    return DlmsClient(transport=transport, authentication=auth, **kw)


def encoded(j):
    tag = {v: k for k, v in axdr.NAMES.items()}[j["type"]]
    if tag in (axdr.ARRAY, axdr.STRUCTURE):
        return (
            bytes([tag]) + axdr.length(len(j["value"])) + b"".join(encoded(i) for i in j["value"])
        )
    value = bytes.fromhex(j["value"]) if tag == axdr.OCTET_STRING else j["value"]
    return axdr.encode(axdr.V(tag, value))


def main():
    proc = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "meter.py"), "--wrapper"], stdout=subprocess.PIPE
    )
    port = json.loads(proc.stdout.readline())["port"]
    meter = json.loads(
        subprocess.run(
            [sys.executable, os.path.join(HERE, "meter.py"), "--dump-json"],
            check=True,
            capture_output=True,
        ).stdout
    )["meters"][0]
    want = {o["obis"]: o for o in meter["objects"]}
    levels = [
        ("lowest", 16, NoSecurityAuthentication(), {}),
        ("LLS", 17, LowLevelSecurityAuthentication(secret=b"12345678"), {}),
        (
            "HLS-GMAC",
            1,
            HighLevelSecurityGmacAuthentication(challenge_length=16),
            dict(
                encryption_key=bytes.fromhex("000102030405060708090A0B0C0D0E0F"),
                authentication_key=bytes.fromhex("D0D1D2D3D4D5D6D7D8D9DADBDCDDDEDF"),
                client_system_title=b"PWITCLNT",
                client_initial_invocation_counter=100,
            ),
        ),
    ]
    try:
        for name, sap, auth, kw in levels:
            try:
                with client(port, sap, auth, **kw).session() as c:
                    for obis, interface in (
                        ("1-0:1.8.0.255", enumerations.CosemInterface.REGISTER),
                        ("1-0:2.8.0.255", enumerations.CosemInterface.REGISTER),
                        ("1-0:32.7.0.255", enumerations.CosemInterface.REGISTER),
                        ("1-0:31.7.0.255", enumerations.CosemInterface.REGISTER),
                        ("0-0:96.1.0.255", enumerations.CosemInterface.DATA),
                    ):
                        for attr, j in want[obis]["attributes"].items():
                            got = c.get(attribute(interface, obis, int(attr)))
                            check(
                                f"dlms-cosem {name} {obis}/{attr}",
                                bytes(got).hex(),
                                encoded(j).hex(),
                            )
                    clock = attribute(enumerations.CosemInterface.CLOCK, "0-0:1.0.0.255", 2)
                    times = load_profile.row_times(
                        int(datetime.datetime.now().timestamp()), meter["profile"]["days"]
                    )
                    lo, hi = times[3], times[6]
                    rows = c.get(
                        attribute(enumerations.CosemInterface.PROFILE_GENERIC, "1-0:99.1.0.255", 2),
                        access_descriptor=RangeDescriptor(
                            restricting_object=CaptureObject(cosem_attribute=clock),
                            from_value=datetime.datetime.fromtimestamp(lo, datetime.timezone.utc),
                            to_value=datetime.datetime.fromtimestamp(hi, datetime.timezone.utc),
                        ),
                    )
                    import meter as m

                    expect = axdr.array(
                        [
                            axdr.struct_(
                                axdr.octets(m.date_time(t, 0, 0)),
                                axdr.u32(load_profile.import_raw(t, 17)),
                                axdr.u32(load_profile.export_raw(t, 17)),
                            )
                            for t in times[3:7]
                        ]
                    )
                    check(
                        f"dlms-cosem {name} profile by range",
                        bytes(rows).hex(),
                        axdr.encode(expect).hex(),
                    )
            except Exception as e:  # noqa: BLE001 - report which level the client could not do
                FAILURES.append(name)
                print(f"FAILED dlms-cosem {name}: {type(e).__name__}: {e}", flush=True)
    finally:
        proc.kill()
    print(f"{CHECKS[0] - len(FAILURES)} passed, {len(FAILURES)} failed")
    sys.exit(1 if FAILURES else 0)


if __name__ == "__main__":
    main()
