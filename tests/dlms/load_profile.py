"""The simulated meter's load profile (1-0:99.1.0.255), computed from the timestamp alone.

A test can compute the value of any row without talking to the meter: import this module
(`sys.path` to tests/dlms, `import load_profile`) or copy the two lines of arithmetic.

    q = t // 900                     t: the row's capture time, UTC Unix seconds, a multiple of 900
    import_raw(t) = 10*q + (q*q) % 7 + 1000*physical     column 1-0:1.8.0.255 attr 2 (scaler -1, Wh)
    export_raw(t) = q // 32 + physical                   column 1-0:2.8.0.255 attr 2 (scaler 3, Wh)

Both are double-long-unsigned and never fall as t rises. `physical` is the meter's HDLC physical
address (the wrapper meter uses its --physical too, 17 unless told). The rows are the
quarter hours t = last - k*900 for k = 0 .. 96*days-1, oldest first, where `last` is the
latest multiple of 900 at or before the meter's clock (system time + --clock-offset) when
the buffer is read. The clock column (0-0:1.0.0.255 attr 2) is the 12-byte date-time of t in
the meter's local time (local = UTC - deviation minutes, the DLMS sign), with the configured
deviation and clock status.
"""

CAPTURE_PERIOD = 900
IMPORT_SCALER = -1
EXPORT_SCALER = 3
UNIT_WH = 30

# The formula and the rows, as `meter.py --help` prints them.
FORMULA = "\n\n".join(__doc__.split("\n\n")[2:4])


def import_raw(t, physical=17):
    q = t // CAPTURE_PERIOD
    return 10 * q + (q * q) % 7 + 1000 * physical


def export_raw(t, physical=17):
    q = t // CAPTURE_PERIOD
    return q // 32 + physical


def row_times(last, days):
    """Capture times of the buffer, oldest first, for a meter whose clock reads `last`."""
    last = last - last % CAPTURE_PERIOD
    n = 96 * days
    return [last - (n - 1 - k) * CAPTURE_PERIOD for k in range(n)]
