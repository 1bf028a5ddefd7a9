"""An independent Modbus implementation for the tests: pymodbus serving register banks.

usage: pymodbus_server.py tcp PORT BANKS.json
       pymodbus_server.py rtu DEVICE BANKS.json

BANKS.json: {"<unit>": {"input": {"<address>": <word>, ...}, "holding": {...}}, ...}
Prints "ready" on stdout once it serves.
"""
import asyncio
import json
import sys

from pymodbus.datastore import (
    ModbusDeviceContext,
    ModbusServerContext,
    ModbusSequentialDataBlock,
)
from pymodbus.framer import FramerType
from pymodbus.server import StartAsyncSerialServer, StartAsyncTcpServer


def block(words):
    # pymodbus' device context adds 1 to every address it is asked for (the Modbus data
    # model numbers registers from 1): store each word one above its wire address. Unmapped
    # registers inside the map read as zero, as on an Eastron meter.
    top = max((int(a) for a in words), default=0)
    values = [0] * (top + 1)
    for a, w in words.items():
        values[int(a)] = w
    return ModbusSequentialDataBlock(1, values)


def context(banks):
    devices = {
        int(unit): ModbusDeviceContext(
            ir=block(bank.get("input", {})), hr=block(bank.get("holding", {}))
        )
        for unit, bank in banks.items()
    }
    return ModbusServerContext(devices=devices, single=False)


async def main():
    mode, where, path = sys.argv[1], sys.argv[2], sys.argv[3]
    with open(path, encoding="utf-8") as f:
        ctx = context(json.load(f))
    loop = asyncio.get_running_loop()
    loop.call_later(0.5, lambda: print("ready", flush=True))
    if mode == "tcp":
        await StartAsyncTcpServer(context=ctx, address=("127.0.0.1", int(where)))
    else:
        await StartAsyncSerialServer(
            context=ctx, framer=FramerType.RTU, port=where, baudrate=9600
        )


asyncio.run(main())
