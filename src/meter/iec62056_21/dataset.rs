//! The text of a readout: lines of data sets, `address(value*unit)`. Sans-IO, std only.
//!
//! A readout's data block is a sequence of lines ended by CR LF, the last of which is `!`
//! (end of data). A line holds one or more data sets, each an address followed by one or
//! more values in parentheses:
//!
//! ```text
//! 1.8.0(001234.567*kWh)          one set, value and unit
//! 0.0.0(61234567)                a value without a unit
//! (ERROR)                        a set without an address
//! 1.8.1(1.5*kWh)1.8.2(2.5*kWh)   several sets on one line
//! 1.6.0(0.235*kW)(2311301415)    several values: a maximum and when it happened
//! ```
//!
//! The address is up to 32 printable characters other than `(`, `)`, `/` and `!`; a value is
//! any printable text other than `(`, `)` and `*`; a unit follows the first `*`. The limits are
//! looser than the standard's (16 and 32 characters) because meters exceed them; the block
//! length bounds everything anyway.

/// One value of a data set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataValue {
    pub value: String,
    pub unit: Option<String>,
}

/// `address(value*unit)…`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataSet {
    pub address: Option<String>,
    /// At least one.
    pub values: Vec<DataValue>,
}

/// Why a readout's text is not a list of data sets.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DataError {
    #[error("line {line}: {reason}")]
    Line { line: usize, reason: &'static str },
    /// The block ended without the `!` line: the meter stopped before the end of its data.
    #[error("no end line `!`: the readout stops after {sets} data sets")]
    NoEnd { sets: usize },
    #[error("line {line}: text after the end line `!`")]
    AfterEnd { line: usize },
}

const MAX_ADDRESS: usize = 32;

/// Parses the text of a complete readout data block (between `STX` and `ETX`).
pub fn parse_readout(text: &str) -> Result<Vec<DataSet>, DataError> {
    let mut sets = Vec::new();
    let mut ended = false;
    for (i, raw) in text.split('\n').enumerate() {
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        let n = i + 1;
        if line.is_empty() {
            continue;
        }
        if ended {
            return Err(DataError::AfterEnd { line: n });
        }
        if line == "!" {
            ended = true;
            continue;
        }
        parse_line(line, n, &mut sets)?;
    }
    if !ended {
        return Err(DataError::NoEnd { sets: sets.len() });
    }
    Ok(sets)
}

/// Parses one line of data sets into `out`.
pub fn parse_line(line: &str, n: usize, out: &mut Vec<DataSet>) -> Result<(), DataError> {
    let err = |reason| DataError::Line { line: n, reason };
    let bytes = line.as_bytes();
    if bytes.iter().any(|c| !(0x20..0x7F).contains(c)) {
        return Err(err("a control character inside a line"));
    }
    let mut i = 0;
    while i < bytes.len() {
        let start = i;
        while i < bytes.len() && bytes[i] != b'(' {
            if matches!(bytes[i], b')' | b'/' | b'!') {
                return Err(err("`)`, `/` or `!` in an address"));
            }
            i += 1;
        }
        if i == bytes.len() {
            return Err(err("an address without a value in parentheses"));
        }
        let address = &line[start..i];
        if address.len() > MAX_ADDRESS {
            return Err(err("an address longer than 32 characters"));
        }
        let mut values = Vec::new();
        while i < bytes.len() && bytes[i] == b'(' {
            let open = i + 1;
            let Some(len) = bytes[open..].iter().position(|c| *c == b')') else {
                return Err(err("`(` without `)`"));
            };
            let inner = &line[open..open + len];
            if inner.contains('(') {
                return Err(err("`(` inside a value"));
            }
            values.push(match inner.split_once('*') {
                Some((v, u)) => {
                    if u.contains('*') {
                        return Err(err("two `*` in a value"));
                    }
                    DataValue {
                        value: v.to_owned(),
                        unit: Some(u.to_owned()),
                    }
                }
                None => DataValue {
                    value: inner.to_owned(),
                    unit: None,
                },
            });
            i = open + len + 1;
        }
        out.push(DataSet {
            address: (!address.is_empty()).then(|| address.to_owned()),
            values,
        });
    }
    Ok(())
}

/// The text of a readout: one data set per line, then `!`. The inverse of [`parse_readout`]
/// (for the simulated meter and the tests).
pub fn write_readout(sets: &[DataSet]) -> String {
    let mut s = String::new();
    for set in sets {
        write_set(set, &mut s);
        s.push_str("\r\n");
    }
    s.push_str("!\r\n");
    s
}

/// Appends `address(value*unit)…`.
pub fn write_set(set: &DataSet, s: &mut String) {
    if let Some(a) = &set.address {
        s.push_str(a);
    }
    for v in &set.values {
        s.push('(');
        s.push_str(&v.value);
        if let Some(u) = &v.unit {
            s.push('*');
            s.push_str(u);
        }
        s.push(')');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(address: Option<&str>, value: &str, unit: Option<&str>) -> DataSet {
        DataSet {
            address: address.map(str::to_owned),
            values: vec![DataValue {
                value: value.into(),
                unit: unit.map(str::to_owned),
            }],
        }
    }

    #[test]
    fn sets_with_and_without_unit_or_address_should_parse() {
        let sets =
            parse_readout("1.8.0(001234.567*kWh)\r\n0.0.0(61234567)\r\n(ERROR)\r\n!\r\n").unwrap();
        assert_eq!(
            sets,
            vec![
                one(Some("1.8.0"), "001234.567", Some("kWh")),
                one(Some("0.0.0"), "61234567", None),
                one(None, "ERROR", None),
            ]
        );
    }

    #[test]
    fn several_sets_on_one_line_should_parse_in_order() {
        // pwitab/iec62056-21 tests/test_data.py, TestDataLine and TestReadoutDataMessage.
        let sets = parse_readout("3:14(314*kWh)4:15(415*kWh)\r\n!\r\n").unwrap();
        assert_eq!(
            sets,
            vec![
                one(Some("3:14"), "314", Some("kWh")),
                one(Some("4:15"), "415", Some("kWh")),
            ]
        );
        let mut out = Vec::new();
        parse_line("12(12*kWh)13(13*kWh)14(14*kwh)", 1, &mut out).unwrap();
        assert_eq!(out.len(), 3);
        assert_eq!(out[2], one(Some("14"), "14", Some("kwh")));
    }

    #[test]
    fn multi_value_sets_should_keep_every_value() {
        // jonkerj/go-iec62056 pkg/samples/iskra_mt382_1000_dsmr5.go.
        let sets = parse_readout(
            "0-1:24.2.1(170102161005W)(00000.107*m3)\r\n1-0:99.97.0(0)(0-0:96.7.19)\r\n0-0:96.13.0()\r\n!\r\n",
        )
        .unwrap();
        assert_eq!(sets.len(), 3);
        assert_eq!(
            sets[0].values,
            vec![
                DataValue {
                    value: "170102161005W".into(),
                    unit: None
                },
                DataValue {
                    value: "00000.107".into(),
                    unit: Some("m3".into())
                },
            ]
        );
        assert_eq!(sets[1].values[1].value, "0-0:96.7.19");
        assert_eq!(sets[2], one(Some("0-0:96.13.0"), "", None));
    }

    #[test]
    fn readout_without_end_line_should_be_no_end() {
        assert_eq!(
            parse_readout("1.8.0(1*kWh)\r\n2.8.0(2*kWh)\r\n"),
            Err(DataError::NoEnd { sets: 2 })
        );
        assert_eq!(
            parse_readout("!\r\n1.8.0(1)\r\n"),
            Err(DataError::AfterEnd { line: 2 })
        );
    }

    #[test]
    fn broken_lines_should_name_the_line() {
        for (text, line) in [
            ("1.8.0(1*kWh\r\n!\r\n", 1),
            ("1.8.0(1)\r\n1.8.0\r\n!\r\n", 2),
            ("1.8.0(1)junk\r\n!\r\n", 1),
            ("1.8.0(1*k*Wh)\r\n!\r\n", 1),
            ("1.8.0(1)\r\n1.8\x01.0(1)\r\n!\r\n", 2),
            ("1/8(1)\r\n!\r\n", 1),
        ] {
            match parse_readout(text) {
                Err(DataError::Line { line: l, .. }) => assert_eq!(l, line, "{text:?}"),
                other => panic!("{text:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn written_readout_should_parse_back() {
        let sets = vec![
            one(Some("1.8.0"), "1.5", Some("kWh")),
            one(None, "x", None),
            DataSet {
                address: Some("1.6.0".into()),
                values: vec![
                    DataValue {
                        value: "2.5".into(),
                        unit: Some("kW".into()),
                    },
                    DataValue {
                        value: "2603201415".into(),
                        unit: None,
                    },
                ],
            },
        ];
        let text = write_readout(&sets);
        assert!(text.ends_with("!\r\n"));
        assert_eq!(parse_readout(&text).unwrap(), sets);
    }
}
