"""A wired M-Bus slave of the tests' own, on a pseudo-terminal: answers SND_NKE with E5 and
REQ_UD2 with one real meter's RSP_UD frame (a .hex file of ../shared/mbus-frames), at the
primary address that frame carries. Independent of the agent's simulator and codec: the
frame is sent as the meter sent it; only the link layer (short frames, checksums) is here.

    python3 slave.py FRAME.hex LINK

creates a pty, points the symlink LINK at its slave side (what the agent's config names, as
/dev/serial/by-id/... names a USB converter), prints "ready" and serves until killed. Killing
it is unplugging the converter: the pty goes away.
"""

import os
import sys
import tty

ACK = b"\xe5"


def checksum(b: bytes) -> int:
    return sum(b) & 0xFF


def main() -> None:
    frame_path, link = sys.argv[1], sys.argv[2]
    with open(frame_path) as f:
        frame = bytes.fromhex(f.read())
    assert frame[0] == 0x68 and frame[3] == 0x68 and frame[-1] == 0x16, "a long frame"
    assert checksum(frame[4:-2]) == frame[-2], "its checksum"
    address = frame[5]
    master, slave = os.openpty()
    tty.setraw(slave)
    name = os.ttyname(slave)
    tmp = link + ".new"
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.symlink(name, tmp)
    os.replace(tmp, link)
    print("ready", name, flush=True)
    buf = b""
    while True:
        try:
            chunk = os.read(master, 256)
        except OSError:
            # Nobody has the slave side open (between the agent's reopens): wait for it.
            import time

            time.sleep(0.05)
            continue
        buf += chunk
        while buf:
            if buf[0] == 0x10:  # short frame: 10 C A CS 16
                if len(buf) < 5:
                    break
                c, a, cs, end = buf[1], buf[2], buf[3], buf[4]
                buf = buf[5:]
                if end != 0x16 or checksum(bytes([c, a])) != cs:
                    continue  # garbled: a slave stays silent
                if a not in (address, 0xFE):
                    continue
                if c == 0x40:  # SND_NKE
                    os.write(master, ACK)
                elif c in (0x5B, 0x7B):  # REQ_UD2, either FCB
                    os.write(master, frame)
            elif buf[0] == 0x68:  # long/control frame from the master (SND_UD): acknowledge
                if len(buf) < 6:
                    break
                n = buf[1] + 6
                if len(buf) < n:
                    break
                f, buf = buf[:n], buf[n:]
                if f[5] in (address, 0xFE) and checksum(f[4:-2]) == f[-2]:
                    os.write(master, ACK)
            else:
                buf = buf[1:]


if __name__ == "__main__":
    main()
