//! The DLMS codecs compiled from the agent's source: they refer to each other through
//! `super::`, so they sit in a module of their own here as in the agent.
#![allow(dead_code)]

#[path = "../../../src/meter/dlms/apdu.rs"]
pub mod apdu;
#[path = "../../../src/meter/dlms/axdr.rs"]
pub mod axdr;
#[path = "../../../src/meter/dlms/hdlc.rs"]
pub mod hdlc;
#[path = "../../../src/meter/dlms/wrapper.rs"]
pub mod wrapper;
