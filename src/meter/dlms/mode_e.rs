//! Mode E (IEC 62056-21, annex E): the opening of an optical probe before HDLC.
//!
//! ```text
//! agent                                meter            (300 Bd, 7E1)
//!   /?! CR LF                 ───►
//!                             ◄───     /XXXZ\2ident CR LF      \2: "HDLC available"
//!   ACK 2 Z 2 CR LF           ───►                             2: protocol E, mode HDLC
//!   (both switch to Z, 8N1; HDLC follows)
//! ```
//!
//! Sans-IO: [`ModeE`] says what to send and at which rate to continue; it reuses the
//! IEC 62056-21 codec's encoders and decoder unchanged.

use crate::meter::iec62056_21::codec::{self, Decoder, Frame, Identification};

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ModeEError {
    #[error("the meter does not offer HDLC (identification {0:?} has no \\2)")]
    NoHdlc(String),
    #[error("the identification's baud character {0:?} is not a mode C/E rate")]
    Baud(char),
    #[error("no identification in the answer: {0}")]
    Garbled(String),
}

/// The opening, step by step.
#[derive(Debug)]
pub struct ModeE {
    max_baud: u32,
    decoder: Decoder,
}

/// What to do after the identification.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Switch {
    /// `ACK 2 Z 2 CR LF`, sent at 300 Bd after the meter's reaction time.
    pub acknowledgement: Vec<u8>,
    /// The rate (and 8N1 framing) to continue with, once the acknowledgement has left.
    pub baud: u32,
    pub identification: Identification,
}

impl ModeE {
    pub fn new(max_baud: u32) -> Self {
        ModeE {
            max_baud,
            decoder: Decoder::new(codec::MAX_LINE),
        }
    }

    /// The sign-on request of an optical probe, `/?!` CR LF, at 300 Bd 7E1.
    pub fn request(&self) -> Vec<u8> {
        codec::request(None)
    }

    /// Feeds what arrived; `None` until a whole identification line is in.
    pub fn received(&mut self, bytes: &[u8]) -> Option<Result<Switch, ModeEError>> {
        for r in self.decoder.feed(bytes) {
            match r {
                Ok(Frame::Identification(id)) => return Some(self.switch(id)),
                // The probe's echo of our own request.
                Ok(Frame::Request { .. }) => {}
                Ok(other) => return Some(Err(ModeEError::Garbled(other.name().into()))),
                Err(e) => return Some(Err(ModeEError::Garbled(e.to_string()))),
            }
        }
        None
    }

    fn switch(&self, id: Identification) -> Result<Switch, ModeEError> {
        if id.enhanced != Some(b'2') {
            return Err(ModeEError::NoHdlc(format!(
                "{}{}",
                id.manufacturer, id.ident
            )));
        }
        let offered =
            codec::baud_of_code(id.baud_code).ok_or(ModeEError::Baud(char::from(id.baud_code)))?;
        let baud = codec::MODE_C_RATES
            .iter()
            .copied()
            .filter(|r| *r <= offered && *r <= self.max_baud)
            .max()
            .unwrap_or(300);
        let code = codec::baud_code(baud).unwrap_or(b'0');
        Ok(Switch {
            acknowledgement: codec::option_select(b'2', code, b'2'),
            baud,
            identification: id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hdlc_capable_meter_should_be_switched_with_ack_2_z_2() {
        let mut m = ModeE::new(9600);
        assert_eq!(m.request(), b"/?!\r\n");
        assert_eq!(m.received(b"/?!\r\n/ISK5\\2MT382"), None);
        let s = m.received(b"-1000\r\n").unwrap().unwrap();
        assert_eq!(s.acknowledgement, b"\x062\x352\r\n");
        assert_eq!(s.baud, 9600);
        assert_eq!(s.identification.manufacturer, "ISK");
    }

    #[test]
    fn meter_without_hdlc_should_be_refused() {
        let mut m = ModeE::new(9600);
        assert!(matches!(
            m.received(b"/LGZ4ZMD3104407\r\n"),
            Some(Err(ModeEError::NoHdlc(_)))
        ));
    }

    #[test]
    fn slower_max_baud_should_cap_the_rate() {
        let mut m = ModeE::new(2400);
        let s = m.received(b"/ISK5\\2MT382\r\n").unwrap().unwrap();
        assert_eq!((s.baud, s.acknowledgement[2]), (2400, b'3'));
    }
}
