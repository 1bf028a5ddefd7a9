"""An independent M-Bus master: pyMeterBus reads the simulated segment over pyserial's
socket:// URL and prints what its own decoder makes of each telegram, one JSON line each.

usage: pymeterbus_master.py URL primary ADDRESS
       pymeterbus_master.py URL secondary 16-HEX-DIGITS
"""
import json
import sys
from decimal import Decimal

import meterbus
import serial


def records(frame):
    out = []
    for r in frame.records:
        i = r.interpreted
        v = i["value"]
        out.append({
            "value": str(v) if isinstance(v, (int, Decimal)) else repr(v) if not isinstance(v, str) else v,
            "unit": i["unit"],
            "type": i["type"],
            "storage": i["storage_number"],
            "tariff": i.get("tariff"),
            "function": i["function"],
        })
    return out


def main():
    url, mode, target = sys.argv[1], sys.argv[2], sys.argv[3]
    with serial.serial_for_url(url, 2400, 8, "E", 1, timeout=1) as ser:
        if mode == "primary":
            address = int(target)
            meterbus.send_ping_frame(ser, address)
            ack = meterbus.load(meterbus.recv_frame(ser, 1))
            assert isinstance(ack, meterbus.TelegramACK), ack
        else:
            meterbus.send_select_frame(ser, target)
            ack = meterbus.load(meterbus.recv_frame(ser, 1))
            assert isinstance(ack, meterbus.TelegramACK), ack
            address = meterbus.ADDRESS_NETWORK_LAYER
        # REQ_UD2 with FCV, toggling FCB per telegram (1 first, after SND_NKE / selection).
        fcb = True
        for _ in range(16):
            c = 0x7B if fcb else 0x5B
            ser.write(bytes([0x10, c, address, (c + address) & 0xFF, 0x16]))
            raw = meterbus.recv_frame(ser, meterbus.FRAME_DATA_LENGTH)
            frame = meterbus.load(raw)
            body = frame.body
            header = body.bodyHeader
            h = header.interpreted
            line = {
                "id": "".join("{:02x}".format(b) for b in header.id_nr),
                "manufacturer": h["manufacturer"],
                "medium": h["medium"],
                "records": records(body.bodyPayload),
                "more": body.bodyPayload.more_records_follow(),
            }
            print(json.dumps(line), flush=True)
            if not line["more"]:
                break
            fcb = not fcb
        if mode == "secondary":
            meterbus.send_ping_frame(ser, meterbus.ADDRESS_NETWORK_LAYER)
            meterbus.recv_frame(ser, 1)


if __name__ == "__main__":
    main()
