//! Register maps ("profiles") as data: which register holds which series, in what type,
//! word order and scale. Built-in profiles are the TOML files in `profiles/`, compiled in;
//! users add their own files in the same format (`modbus_profiles = ["…"]` in the config).

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::reading::{Decimal, DecimalError, Obis};

/// Modbus read function.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Function {
    /// Function 03.
    Holding,
    /// Function 04.
    Input,
}

impl Function {
    pub fn code(self) -> u8 {
        match self {
            Function::Holding => 3,
            Function::Input => 4,
        }
    }
}

/// How the register words encode the value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ValueType {
    U16,
    I16,
    U32,
    I32,
    U64,
    I64,
    F32,
    F64,
}

impl ValueType {
    /// Registers (16-bit words) the value occupies.
    pub fn words(self) -> u16 {
        match self {
            ValueType::U16 | ValueType::I16 => 1,
            ValueType::U32 | ValueType::I32 | ValueType::F32 => 2,
            ValueType::U64 | ValueType::I64 | ValueType::F64 => 4,
        }
    }
}

/// Order of the 16-bit words of a multi-word value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WordOrder {
    /// Most significant word first ("big-endian", ABCD).
    HighFirst,
    /// Least significant word first ("word-swapped", CDAB).
    LowFirst,
}

/// One register entry, fully resolved (profile defaults applied).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Register {
    pub series: Obis,
    pub address: u16,
    pub function: Function,
    pub kind: ValueType,
    pub word_order: WordOrder,
    /// Bytes within each word swapped (BADC / DCBA orders).
    pub byte_swap: bool,
    /// value × 10^exponent …
    pub exponent: i32,
    /// … × scale (exact decimal), for factors that are not powers of ten.
    pub scale: Option<Decimal>,
    pub unit: String,
}

impl Register {
    pub fn end(&self) -> u32 {
        u32::from(self.address) + u32::from(self.kind.words())
    }

    /// The value these words hold, as an exact decimal.
    pub fn decode(&self, words: &[u16]) -> Result<Decimal, DecodeError> {
        let n = usize::from(self.kind.words());
        if words.len() < n {
            return Err(DecodeError::Short {
                want: n,
                got: words.len(),
            });
        }
        let mut w: Vec<u16> = words[..n].to_vec();
        if self.byte_swap {
            for x in &mut w {
                *x = x.swap_bytes();
            }
        }
        if self.word_order == WordOrder::LowFirst {
            w.reverse();
        }
        let raw: u64 = w.iter().fold(0u64, |acc, x| (acc << 16) | u64::from(*x));
        let value = match self.kind {
            ValueType::U16 | ValueType::U32 | ValueType::U64 => {
                Decimal::from_scaled(i128::from(raw), 0)?
            }
            ValueType::I16 => Decimal::from_scaled(i128::from(raw as u16 as i16), 0)?,
            ValueType::I32 => Decimal::from_scaled(i128::from(raw as u32 as i32), 0)?,
            ValueType::I64 => Decimal::from_scaled(i128::from(raw as i64), 0)?,
            ValueType::F32 => Decimal::from_f32(f32::from_bits(raw as u32))?,
            ValueType::F64 => Decimal::from_f64(f64::from_bits(raw))?,
        };
        let value = value.shift(self.exponent)?;
        Ok(match &self.scale {
            Some(s) => value.mul(s)?,
            None => value,
        })
    }
}

impl Register {
    /// The words a device would hold for `value` (the inverse of [`Register::decode`], for
    /// simulated meters). Integers are rounded after undoing the exponent; `scale` is not
    /// undone.
    pub fn encode(&self, value: f64) -> Vec<u16> {
        let v = value / 10f64.powi(self.exponent);
        let raw: u64 = match self.kind {
            ValueType::U16 | ValueType::U32 | ValueType::U64 => v.round() as u64,
            ValueType::I16 => v.round() as i16 as u16 as u64,
            ValueType::I32 => v.round() as i32 as u32 as u64,
            ValueType::I64 => v.round() as i64 as u64,
            ValueType::F32 => u64::from((v as f32).to_bits()),
            ValueType::F64 => v.to_bits(),
        };
        let n = usize::from(self.kind.words());
        let mut w: Vec<u16> = (0..n).rev().map(|i| (raw >> (16 * i)) as u16).collect();
        if self.word_order == WordOrder::LowFirst {
            w.reverse();
        }
        if self.byte_swap {
            for x in &mut w {
                *x = x.swap_bytes();
            }
        }
        w
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("expected {want} registers, got {got}")]
    Short { want: usize, got: usize },
    #[error(transparent)]
    Value(#[from] DecimalError),
}

/// A named register map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Profile {
    pub name: String,
    pub description: String,
    pub registers: Vec<Register>,
    /// Unused registers that may be read through to merge two requests into one.
    pub max_gap: u16,
}

impl Profile {
    pub fn register(&self, series: &Obis) -> Option<&Register> {
        self.registers.iter().find(|r| &r.series == series)
    }
}

// ---- the file format ---------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProfileFile {
    name: String,
    #[serde(default)]
    description: String,
    function: Option<Function>,
    #[serde(rename = "type")]
    kind: Option<ValueType>,
    word_order: Option<WordOrder>,
    #[serde(default)]
    byte_swap: bool,
    #[serde(default)]
    max_gap: u16,
    #[serde(rename = "register")]
    registers: Vec<RegisterFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterFile {
    series: String,
    address: u16,
    function: Option<Function>,
    #[serde(rename = "type")]
    kind: Option<ValueType>,
    word_order: Option<WordOrder>,
    byte_swap: Option<bool>,
    #[serde(default)]
    exponent: i32,
    scale: Option<String>,
    #[serde(default)]
    unit: String,
    #[serde(default)]
    #[allow(dead_code)]
    description: String,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{source_name}: {message}")]
pub struct ProfileError {
    pub source_name: String,
    pub message: String,
}

impl Profile {
    /// Parses a profile file; `source_name` names it in errors.
    pub fn from_toml(text: &str, source_name: &str) -> Result<Profile, ProfileError> {
        let err = |message: String| ProfileError {
            source_name: source_name.to_owned(),
            message,
        };
        let f: ProfileFile = toml::from_str(text).map_err(|e| err(e.to_string()))?;
        let mut registers = Vec::with_capacity(f.registers.len());
        for (i, r) in f.registers.iter().enumerate() {
            let at = |m: String| err(format!("register[{i}] ({}): {m}", r.series));
            let series = r.series.parse::<Obis>().map_err(|e| at(e.to_string()))?;
            let kind = r
                .kind
                .or(f.kind)
                .ok_or_else(|| at("no `type` (here or at the top of the profile)".into()))?;
            let scale = r
                .scale
                .as_deref()
                .map(Decimal::parse)
                .transpose()
                .map_err(|e| at(e.to_string()))?;
            if !(-20..=20).contains(&r.exponent) {
                return Err(at("`exponent` must be between -20 and 20".into()));
            }
            let reg = Register {
                series,
                address: r.address,
                function: r
                    .function
                    .or(f.function)
                    .ok_or_else(|| at("no `function` (holding or input)".into()))?,
                kind,
                word_order: r
                    .word_order
                    .or(f.word_order)
                    .unwrap_or(WordOrder::HighFirst),
                byte_swap: r.byte_swap.unwrap_or(f.byte_swap),
                exponent: r.exponent,
                scale,
                unit: r.unit.clone(),
            };
            if reg.end() > 0x1_0000 {
                return Err(at("runs past register 65535".into()));
            }
            if registers.iter().any(|o: &Register| o.series == reg.series) {
                return Err(at("series listed twice".into()));
            }
            registers.push(reg);
        }
        if registers.is_empty() {
            return Err(err("no registers".into()));
        }
        Ok(Profile {
            name: f.name,
            description: f.description,
            registers,
            max_gap: f.max_gap.min(crate::meter::modbus::plan::MAX_REGISTERS),
        })
    }
}

/// The built-in profiles' sources, compiled in.
const BUILT_IN: &[(&str, &str)] = &[
    (
        "eastron-sdm630",
        include_str!("../../../profiles/eastron-sdm630.toml"),
    ),
    (
        "eastron-sdm120",
        include_str!("../../../profiles/eastron-sdm120.toml"),
    ),
    (
        "carlo-gavazzi-em24",
        include_str!("../../../profiles/carlo-gavazzi-em24.toml"),
    ),
    (
        "schneider-iem3155",
        include_str!("../../../profiles/schneider-iem3155.toml"),
    ),
];

/// Every profile by name: the built-in ones and those from files.
#[derive(Clone, Debug, Default)]
pub struct Profiles(BTreeMap<String, Profile>);

impl Profiles {
    pub fn built_in() -> Self {
        let mut map = BTreeMap::new();
        for (name, text) in BUILT_IN {
            // The built-in files are tested to parse (see the tests below).
            if let Ok(p) = Profile::from_toml(text, name) {
                map.insert(p.name.clone(), p);
            }
        }
        Profiles(map)
    }

    /// The built-in profiles plus `files`; a file may replace a built-in profile by name.
    pub fn load(files: &[impl AsRef<Path>]) -> Result<Self, ProfileError> {
        let mut all = Self::built_in();
        for f in files {
            let f = f.as_ref();
            let text = std::fs::read_to_string(f).map_err(|e| ProfileError {
                source_name: f.display().to_string(),
                message: format!("cannot read: {e}"),
            })?;
            let p = Profile::from_toml(&text, &f.display().to_string())?;
            all.0.insert(p.name.clone(), p);
        }
        Ok(all)
    }

    pub fn get(&self, name: &str) -> Option<&Profile> {
        self.0.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(kind: ValueType, word_order: WordOrder) -> Register {
        Register {
            series: "1-0:1.8.0".parse().unwrap(),
            address: 0,
            function: Function::Input,
            kind,
            word_order,
            byte_swap: false,
            exponent: 0,
            scale: None,
            unit: "kWh".into(),
        }
    }

    #[test]
    fn every_built_in_profile_should_parse() {
        for (name, text) in BUILT_IN {
            let p = Profile::from_toml(text, name).unwrap();
            assert_eq!(&p.name, name);
        }
        assert_eq!(Profiles::built_in().names().count(), BUILT_IN.len());
    }

    #[test]
    fn f32_high_word_first_should_decode_to_the_shortest_decimal() {
        let bits = 230.1f32.to_bits();
        let words = [(bits >> 16) as u16, bits as u16];
        let r = reg(ValueType::F32, WordOrder::HighFirst);
        assert_eq!(r.decode(&words).unwrap().as_str(), "230.1");
    }

    #[test]
    fn i32_low_word_first_with_exponent_should_decode_exactly() {
        let v: i32 = -1_234_567;
        let bits = v as u32;
        let words = [bits as u16, (bits >> 16) as u16];
        let mut r = reg(ValueType::I32, WordOrder::LowFirst);
        r.exponent = -1;
        assert_eq!(r.decode(&words).unwrap().as_str(), "-123456.7");
    }

    #[test]
    fn i64_wh_should_scale_to_kwh() {
        let v: i64 = 123_456_789_012;
        let words = [
            (v >> 48) as u16,
            (v >> 32) as u16,
            (v >> 16) as u16,
            v as u16,
        ];
        let mut r = reg(ValueType::I64, WordOrder::HighFirst);
        r.exponent = -3;
        assert_eq!(r.decode(&words).unwrap().as_str(), "123456789.012");
    }

    #[test]
    fn u16_with_a_decimal_scale_should_multiply_exactly() {
        let mut r = reg(ValueType::U16, WordOrder::HighFirst);
        r.scale = Some(Decimal::parse("0.5").unwrap());
        assert_eq!(r.decode(&[3]).unwrap().as_str(), "1.5");
    }

    #[test]
    fn byte_swapped_words_should_decode() {
        let mut r = reg(ValueType::U16, WordOrder::HighFirst);
        r.byte_swap = true;
        assert_eq!(r.decode(&[0x3412]).unwrap().as_str(), "4660");
    }

    #[test]
    fn encode_should_invert_decode_for_every_type_and_order() {
        for kind in [
            ValueType::U16,
            ValueType::I16,
            ValueType::U32,
            ValueType::I32,
            ValueType::U64,
            ValueType::I64,
            ValueType::F32,
            ValueType::F64,
        ] {
            for order in [WordOrder::HighFirst, WordOrder::LowFirst] {
                let mut r = reg(kind, order);
                r.exponent = -1;
                let v = if matches!(kind, ValueType::U16 | ValueType::U32 | ValueType::U64) {
                    1234.5
                } else {
                    -1234.5
                };
                assert_eq!(
                    r.decode(&r.encode(v)).unwrap().as_str(),
                    v.to_string(),
                    "{kind:?} {order:?}"
                );
            }
        }
    }

    #[test]
    fn nan_and_short_answers_should_be_errors() {
        let r = reg(ValueType::F32, WordOrder::HighFirst);
        let nan = f32::NAN.to_bits();
        assert!(r.decode(&[(nan >> 16) as u16, nan as u16]).is_err());
        assert!(r.decode(&[1]).is_err());
    }

    #[test]
    fn a_profile_with_a_bad_series_should_name_the_register() {
        let text =
            "name='x'\nfunction='input'\ntype='u16'\n[[register]]\nseries='1-0:1.8'\naddress=0\n";
        let e = Profile::from_toml(text, "x.toml").unwrap_err().to_string();
        assert!(e.starts_with("x.toml: register[0] (1-0:1.8)"), "{e}");
    }
}
