//! The value information block (EN 13757-3:2013, 6.4 and annex): what a record measures, in
//! which unit, with which decimal multiplier. Tables: the primary VIF (Table 10), the
//! extensions after `FB` (Table 12) and `FD` (Table 14), and the combinable (orthogonal)
//! VIFE (Table 15). Units are written as the standard writes them (`Wh`, `m3`, `°C`, `m3/h`);
//! durations keep the unit the meter chose (`h`, `d`).

/// What a record measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Quantity {
    Energy,
    Volume,
    Mass,
    OnTime,
    OperatingTime,
    Power,
    VolumeFlow,
    MassFlow,
    FlowTemperature,
    ReturnTemperature,
    TemperatureDifference,
    ExternalTemperature,
    Pressure,
    /// Type G date (VIF `6C`).
    Date,
    /// Type F / I date and time (VIF `6D`).
    DateTime,
    HcaUnits,
    AveragingDuration,
    ActualityDuration,
    FabricationNumber,
    Identification,
    BusAddress,
    Credit,
    Debit,
    AccessNumber,
    Medium,
    Manufacturer,
    ParameterSet,
    ModelVersion,
    HardwareVersion,
    FirmwareVersion,
    SoftwareVersion,
    CustomerLocation,
    Customer,
    AccessCode,
    Password,
    ErrorFlags,
    ErrorMask,
    DigitalOutput,
    DigitalInput,
    Baudrate,
    ResponseDelay,
    Retry,
    RemoteControl,
    FirstStorage,
    LastStorage,
    StorageBlockSize,
    StorageInterval,
    DurationSinceReadout,
    TariffStart,
    TariffDuration,
    TariffPeriod,
    Dimensionless,
    Voltage,
    Current,
    ResetCounter,
    CumulationCounter,
    ControlSignal,
    DayOfWeek,
    WeekNumber,
    DayChange,
    ParameterActivation,
    SupplierInformation,
    DurationSinceCumulation,
    BatteryOperatingTime,
    BatteryChange,
    RfLevel,
    DaylightSaving,
    ListeningWindow,
    RemainingBattery,
    StopCount,
    ManufacturerContainer,
    RelativeHumidity,
    TemperatureLimit,
    MaxPowerCount,
    /// `FC`: the unit is the plain text that follows.
    PlainText,
    /// `FF`/`7F` (or an `FF` VIFE): manufacturer-specific; the data are kept raw.
    ManufacturerSpecific,
    /// `7E`: any VIF (readout selection).
    Any,
    Reserved,
}

impl Quantity {
    /// The standard's name.
    pub fn name(self) -> &'static str {
        use Quantity::*;
        match self {
            Energy => "Energy",
            Volume => "Volume",
            Mass => "Mass",
            OnTime => "On time",
            OperatingTime => "Operating time",
            Power => "Power",
            VolumeFlow => "Volume flow",
            MassFlow => "Mass flow",
            FlowTemperature => "Flow temperature",
            ReturnTemperature => "Return temperature",
            TemperatureDifference => "Temperature difference",
            ExternalTemperature => "External temperature",
            Pressure => "Pressure",
            Date => "Time point (date)",
            DateTime => "Time point (date and time)",
            HcaUnits => "Units for H.C.A.",
            AveragingDuration => "Averaging duration",
            ActualityDuration => "Actuality duration",
            FabricationNumber => "Fabrication number",
            Identification => "(Enhanced) identification",
            BusAddress => "Bus address",
            Credit => "Credit",
            Debit => "Debit",
            AccessNumber => "Access number",
            Medium => "Medium",
            Manufacturer => "Manufacturer",
            ParameterSet => "Parameter set identification",
            ModelVersion => "Model / version",
            HardwareVersion => "Hardware version",
            FirmwareVersion => "Firmware version",
            SoftwareVersion => "Software version",
            CustomerLocation => "Customer location",
            Customer => "Customer",
            AccessCode => "Access code",
            Password => "Password",
            ErrorFlags => "Error flags",
            ErrorMask => "Error mask",
            DigitalOutput => "Digital output",
            DigitalInput => "Digital input",
            Baudrate => "Baud rate",
            ResponseDelay => "Response delay time",
            Retry => "Retry",
            RemoteControl => "Remote control",
            FirstStorage => "First storage number for cyclic storage",
            LastStorage => "Last storage number for cyclic storage",
            StorageBlockSize => "Size of storage block",
            StorageInterval => "Storage interval",
            DurationSinceReadout => "Duration since last readout",
            TariffStart => "Start of tariff",
            TariffDuration => "Duration of tariff",
            TariffPeriod => "Period of tariff",
            Dimensionless => "Dimensionless",
            Voltage => "Voltage",
            Current => "Current",
            ResetCounter => "Reset counter",
            CumulationCounter => "Cumulation counter",
            ControlSignal => "Control signal",
            DayOfWeek => "Day of week",
            WeekNumber => "Week number",
            DayChange => "Time point of day change",
            ParameterActivation => "State of parameter activation",
            SupplierInformation => "Special supplier information",
            DurationSinceCumulation => "Duration since last cumulation",
            BatteryOperatingTime => "Operating time battery",
            BatteryChange => "Date and time of battery change",
            RfLevel => "RF level",
            DaylightSaving => "Daylight saving",
            ListeningWindow => "Listening window management",
            RemainingBattery => "Remaining battery life time",
            StopCount => "Number of times the meter was stopped",
            ManufacturerContainer => "Data container for manufacturer specific protocol",
            RelativeHumidity => "Relative humidity",
            TemperatureLimit => "Cold / warm temperature limit",
            MaxPowerCount => "Cumulative count max power",
            PlainText => "Plain text unit",
            ManufacturerSpecific => "Manufacturer specific",
            Any => "Any VIF",
            Reserved => "Reserved",
        }
    }
}

/// Which date-time type a record's data are, where the VIF says so.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeKind {
    /// Type G (16 bit) — or type F, I by length when the VIF is a date-time.
    Date,
    DateTime,
}

/// A decoded VIB: quantity, unit and decimal exponent (`value × 10^exponent unit`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Meaning {
    pub quantity: Quantity,
    /// The unit as the standard writes it; empty where the quantity has none.
    pub unit: &'static str,
    pub exponent: i32,
    /// Data are a date or date-time (types G, F, I, J).
    pub time: Option<TimeKind>,
    /// The record's value is not the quantity itself but relates to it (a limit, a
    /// duration of a limit exceed, a rate "per hour", …): the orthogonal VIFE says how.
    pub modifier: Option<Modifier>,
    /// An orthogonal VIFE says the data are manufacturer specific (`FF` VIFE).
    pub manufacturer_vife: bool,
    /// An additive correction (`VIFE 78`–`7B`): value + 10^(nn-3) × unit. Kept, not applied:
    /// meters that send it mean a constant offset of the register.
    pub additive: Option<i32>,
}

/// How a combinable VIFE changes what the record is (EN 13757-3 Table 15).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Modifier {
    /// `00`–`1F`: an error or object code.
    Code(u8),
    /// `20`–`3F`: per time unit, per pulse, per unit; "start date of", "uncorrected", …
    Per(u8),
    /// `40`–`6F`: limit values, counts and durations of limit exceeds.
    Limit(u8),
    /// `7E`: future value.
    Future,
}

impl Meaning {
    const fn new(quantity: Quantity, unit: &'static str, exponent: i32) -> Self {
        Meaning {
            quantity,
            unit,
            exponent,
            time: None,
            modifier: None,
            manufacturer_vife: false,
            additive: None,
        }
    }
    const fn plain(quantity: Quantity) -> Self {
        Meaning::new(quantity, "", 0)
    }
}

/// Time units of `nn` (seconds, minutes, hours, days).
fn time_unit(nn: u8) -> &'static str {
    ["s", "min", "h", "d"][usize::from(nn & 3)]
}

/// Time units of `pp` (hours, days, months, years).
fn long_time_unit(pp: u8) -> &'static str {
    ["h", "d", "month", "year"][usize::from(pp & 3)]
}

/// The primary VIF without its extension bit (Table 10). `FB`, `FD`, `FC`, `FF` are handled
/// by the caller.
pub fn primary(vif: u8) -> Meaning {
    use Quantity::*;
    let v = vif & 0x7F;
    let n = i32::from(v & 0x07);
    let nn = v & 0x03;
    match v {
        0x00..=0x07 => Meaning::new(Energy, "Wh", n - 3),
        0x08..=0x0F => Meaning::new(Energy, "J", n),
        0x10..=0x17 => Meaning::new(Volume, "m3", n - 6),
        0x18..=0x1F => Meaning::new(Mass, "kg", n - 3),
        0x20..=0x23 => Meaning::new(OnTime, time_unit(nn), 0),
        0x24..=0x27 => Meaning::new(OperatingTime, time_unit(nn), 0),
        0x28..=0x2F => Meaning::new(Power, "W", n - 3),
        0x30..=0x37 => Meaning::new(Power, "J/h", n),
        0x38..=0x3F => Meaning::new(VolumeFlow, "m3/h", n - 6),
        0x40..=0x47 => Meaning::new(VolumeFlow, "m3/min", n - 7),
        0x48..=0x4F => Meaning::new(VolumeFlow, "m3/s", n - 9),
        0x50..=0x57 => Meaning::new(MassFlow, "kg/h", n - 3),
        0x58..=0x5B => Meaning::new(FlowTemperature, "°C", i32::from(nn) - 3),
        0x5C..=0x5F => Meaning::new(ReturnTemperature, "°C", i32::from(nn) - 3),
        0x60..=0x63 => Meaning::new(TemperatureDifference, "K", i32::from(nn) - 3),
        0x64..=0x67 => Meaning::new(ExternalTemperature, "°C", i32::from(nn) - 3),
        0x68..=0x6B => Meaning::new(Pressure, "bar", i32::from(nn) - 3),
        0x6C => Meaning {
            time: Some(TimeKind::Date),
            ..Meaning::plain(Date)
        },
        0x6D => Meaning {
            time: Some(TimeKind::DateTime),
            ..Meaning::plain(DateTime)
        },
        0x6E => Meaning::plain(HcaUnits),
        0x6F => Meaning::plain(Reserved),
        0x70..=0x73 => Meaning::new(AveragingDuration, time_unit(nn), 0),
        0x74..=0x77 => Meaning::new(ActualityDuration, time_unit(nn), 0),
        0x78 => Meaning::plain(FabricationNumber),
        0x79 => Meaning::plain(Identification),
        0x7A => Meaning::plain(BusAddress),
        0x7C => Meaning::plain(PlainText),
        0x7E => Meaning::plain(Any),
        0x7F => Meaning::plain(ManufacturerSpecific),
        // 7B and 7D are the extension escapes.
        _ => Meaning::plain(Reserved),
    }
}

/// The VIFE after `FB` (Table 12).
pub fn extension_fb(vife: u8) -> Meaning {
    use Quantity::*;
    let v = vife & 0x7F;
    let n = i32::from(v & 1);
    let nn = i32::from(v & 3);
    match v {
        0x00 | 0x01 => Meaning::new(Energy, "MWh", n - 1),
        0x08 | 0x09 => Meaning::new(Energy, "GJ", n - 1),
        0x10 | 0x11 => Meaning::new(Volume, "m3", n + 2),
        0x18 | 0x19 => Meaning::new(Mass, "t", n + 2),
        0x1A | 0x1B => Meaning::new(RelativeHumidity, "%", n - 1),
        0x21 => Meaning::new(Volume, "ft3", -1),
        0x22 => Meaning::new(Volume, "US gal", -1),
        0x23 => Meaning::new(Volume, "US gal", 0),
        0x24 => Meaning::new(VolumeFlow, "US gal/min", -3),
        0x25 => Meaning::new(VolumeFlow, "US gal/min", 0),
        0x26 => Meaning::new(VolumeFlow, "US gal/h", 0),
        0x28 | 0x29 => Meaning::new(Power, "MW", n - 1),
        0x30 | 0x31 => Meaning::new(Power, "GJ/h", n - 1),
        0x58..=0x5B => Meaning::new(FlowTemperature, "°F", nn - 3),
        0x5C..=0x5F => Meaning::new(ReturnTemperature, "°F", nn - 3),
        0x60..=0x63 => Meaning::new(TemperatureDifference, "°F", nn - 3),
        0x64..=0x67 => Meaning::new(ExternalTemperature, "°F", nn - 3),
        0x70..=0x73 => Meaning::new(TemperatureLimit, "°F", nn - 3),
        0x74..=0x77 => Meaning::new(TemperatureLimit, "°C", nn - 3),
        0x78..=0x7F => Meaning::new(MaxPowerCount, "W", i32::from(v & 7) - 3),
        _ => Meaning::plain(Reserved),
    }
}

/// The VIFE after `FD` (Table 14).
pub fn extension_fd(vife: u8) -> Meaning {
    use Quantity::*;
    let v = vife & 0x7F;
    let nn = v & 3;
    match v {
        0x00..=0x03 => Meaning::new(Credit, "currency", i32::from(nn) - 3),
        0x04..=0x07 => Meaning::new(Debit, "currency", i32::from(nn) - 3),
        0x08 => Meaning::plain(AccessNumber),
        0x09 => Meaning::plain(Medium),
        0x0A => Meaning::plain(Manufacturer),
        0x0B => Meaning::plain(ParameterSet),
        0x0C => Meaning::plain(ModelVersion),
        0x0D => Meaning::plain(HardwareVersion),
        0x0E => Meaning::plain(FirmwareVersion),
        0x0F => Meaning::plain(SoftwareVersion),
        0x10 => Meaning::plain(CustomerLocation),
        0x11 => Meaning::plain(Customer),
        0x12..=0x15 => Meaning::plain(AccessCode),
        0x16 => Meaning::plain(Password),
        0x17 => Meaning::plain(ErrorFlags),
        0x18 => Meaning::plain(ErrorMask),
        0x1A => Meaning::plain(DigitalOutput),
        0x1B => Meaning::plain(DigitalInput),
        0x1C => Meaning::new(Baudrate, "Bd", 0),
        0x1D => Meaning::new(ResponseDelay, "bit times", 0),
        0x1E => Meaning::plain(Retry),
        0x1F => Meaning::plain(RemoteControl),
        0x20 => Meaning::plain(FirstStorage),
        0x21 => Meaning::plain(LastStorage),
        0x22 => Meaning::plain(StorageBlockSize),
        0x24..=0x27 => Meaning::new(StorageInterval, time_unit(nn), 0),
        0x28 => Meaning::new(StorageInterval, "month", 0),
        0x29 => Meaning::new(StorageInterval, "year", 0),
        0x2C..=0x2F => Meaning::new(DurationSinceReadout, time_unit(nn), 0),
        0x30 => Meaning {
            time: Some(TimeKind::DateTime),
            ..Meaning::plain(TariffStart)
        },
        0x31..=0x33 => Meaning::new(TariffDuration, time_unit(nn), 0),
        0x34..=0x37 => Meaning::new(TariffPeriod, time_unit(nn), 0),
        0x38 => Meaning::new(TariffPeriod, "month", 0),
        0x39 => Meaning::new(TariffPeriod, "year", 0),
        0x3A => Meaning::plain(Dimensionless),
        0x40..=0x4F => Meaning::new(Voltage, "V", i32::from(v & 0x0F) - 9),
        0x50..=0x5F => Meaning::new(Current, "A", i32::from(v & 0x0F) - 12),
        0x60 => Meaning::plain(ResetCounter),
        0x61 => Meaning::plain(CumulationCounter),
        0x62 => Meaning::plain(ControlSignal),
        0x63 => Meaning::plain(DayOfWeek),
        0x64 => Meaning::plain(WeekNumber),
        0x65 => Meaning::plain(DayChange),
        0x66 => Meaning::plain(ParameterActivation),
        0x67 => Meaning::plain(SupplierInformation),
        0x68..=0x6B => Meaning::new(DurationSinceCumulation, long_time_unit(nn), 0),
        0x6C..=0x6F => Meaning::new(BatteryOperatingTime, long_time_unit(nn), 0),
        0x70 => Meaning {
            time: Some(TimeKind::DateTime),
            ..Meaning::plain(BatteryChange)
        },
        0x71 => Meaning::new(RfLevel, "dBm", 0),
        0x72 => Meaning::plain(DaylightSaving),
        0x73 => Meaning::plain(ListeningWindow),
        0x74 => Meaning::new(RemainingBattery, "d", 0),
        0x75 => Meaning::plain(StopCount),
        0x76 => Meaning::plain(ManufacturerContainer),
        _ => Meaning::plain(Reserved),
    }
}

/// Applies one combinable (orthogonal) VIFE to `m` (Table 15). Returns `false` for `FF`
/// (`7F`): what follows is manufacturer specific.
pub fn combine(m: &mut Meaning, vife: u8) -> bool {
    let v = vife & 0x7F;
    match v {
        0x00..=0x1F => m.modifier = Some(Modifier::Code(v)),
        0x20..=0x3F => m.modifier = Some(Modifier::Per(v)),
        0x40..=0x6F => m.modifier = Some(Modifier::Limit(v)),
        // Multiplicative correction factor 10^(nnn-6).
        0x70..=0x77 => m.exponent += i32::from(v & 7) - 6,
        0x78..=0x7B => m.additive = Some(i32::from(v & 3) - 3),
        // Multiplicative correction factor 10^3.
        0x7D => m.exponent += 3,
        0x7E => m.modifier = Some(Modifier::Future),
        0x7F => {
            m.manufacturer_vife = true;
            return false;
        }
        _ => {}
    }
    true
}

/// The unit of a fixed data structure counter (CI 72/73, EN 1434-3 Table): the unit and
/// decimal exponent.
pub fn fixed_unit(code: u8) -> Meaning {
    use Quantity::*;
    let c = code & 0x3F;
    let step = |base: u8| i32::from(c - base);
    match c {
        0x00 => Meaning::new(OnTime, "h,min,s", 0),
        0x01 => Meaning::new(Date, "D,M,Y", 0),
        0x02..=0x04 => Meaning::new(Energy, "Wh", step(0x02)),
        0x05..=0x07 => Meaning::new(Energy, "kWh", step(0x05)),
        0x08..=0x0A => Meaning::new(Energy, "MWh", step(0x08)),
        0x0B..=0x0D => Meaning::new(Energy, "kJ", step(0x0B)),
        0x0E..=0x10 => Meaning::new(Energy, "MJ", step(0x0E)),
        0x11..=0x13 => Meaning::new(Energy, "GJ", step(0x11)),
        0x14..=0x16 => Meaning::new(Power, "W", step(0x14)),
        0x17..=0x19 => Meaning::new(Power, "kW", step(0x17)),
        0x1A..=0x1C => Meaning::new(Power, "MW", step(0x1A)),
        0x1D..=0x1F => Meaning::new(Power, "kJ/h", step(0x1D)),
        0x20..=0x22 => Meaning::new(Power, "MJ/h", step(0x20)),
        0x23..=0x25 => Meaning::new(Power, "GJ/h", step(0x23)),
        0x26..=0x28 => Meaning::new(Volume, "ml", step(0x26)),
        0x29..=0x2B => Meaning::new(Volume, "l", step(0x29)),
        0x2C..=0x2E => Meaning::new(Volume, "m3", step(0x2C)),
        0x2F..=0x31 => Meaning::new(VolumeFlow, "ml/h", step(0x2F)),
        0x32..=0x34 => Meaning::new(VolumeFlow, "l/h", step(0x32)),
        0x35..=0x37 => Meaning::new(VolumeFlow, "m3/h", step(0x35)),
        0x38 => Meaning::new(TemperatureDifference, "°C", -3),
        0x39 => Meaning::plain(HcaUnits),
        0x3E => Meaning::plain(Reserved),
        0x3F => Meaning::plain(Dimensionless),
        _ => Meaning::plain(Reserved),
    }
}

/// The medium byte's name (EN 13757-3 Table 3 / EN 13757-7).
pub fn medium_name(medium: u8) -> &'static str {
    match medium {
        0x00 => "Other",
        0x01 => "Oil",
        0x02 => "Electricity",
        0x03 => "Gas",
        0x04 => "Heat (outlet)",
        0x05 => "Steam",
        0x06 => "Warm water (30-90 °C)",
        0x07 => "Water",
        0x08 => "Heat cost allocator",
        0x09 => "Compressed air",
        0x0A => "Cooling load meter (outlet)",
        0x0B => "Cooling load meter (inlet)",
        0x0C => "Heat (inlet)",
        0x0D => "Heat / cooling load meter",
        0x0E => "Bus / system component",
        0x0F => "Unknown medium",
        0x14 => "Calorific value",
        0x15 => "Hot water (90 °C or more)",
        0x16 => "Cold water",
        0x17 => "Dual register (hot/cold) water",
        0x18 => "Pressure",
        0x19 => "A/D converter",
        0x1A => "Smoke detector",
        0x1B => "Room sensor",
        0x1C => "Gas detector",
        0x20 => "Breaker (electricity)",
        0x21 => "Valve (gas or water)",
        0x25 => "Customer unit (display device)",
        0x28 => "Waste water",
        0x29 => "Garbage",
        0x2A => "Carbon dioxide",
        _ => "Reserved",
    }
}
