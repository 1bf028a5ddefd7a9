//! Simulated meters, for `amr-edge demo` and the tests: they run inside the process and are
//! read through the same drivers, transports and buses as real meters.

pub mod dlms;
pub mod iec;
pub mod mbus;
pub mod modbus;
pub mod pty;
