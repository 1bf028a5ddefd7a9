//! Telling a TLS refusal from a network that is down.
//!
//! Both clients report a certificate one side does not accept (an unknown CA, a missing
//! client certificate, a name that does not match) as an I/O error, the same as a dropped
//! connection. For an operator they are opposites: a dropped link mends itself, a refused
//! certificate does not, and needs someone to act. The rustls error inside tells them apart.
//! Only refusals count: a record the link damaged, or a peer that misbehaves mid-session, is
//! the network's problem and is retried quietly like any other.
//!
//! A certificate outside its validity period is the one refusal that may mend itself: on a
//! gateway without a real-time clock it is what every certificate looks like until NTP has
//! answered. Its description says to check the clock first.

use std::error::Error;

use rustls::{AlertDescription as Alert, CertificateError as Cert};

/// Why the TLS handshake was refused, if `e` (or an error it wraps) says it was. The text is
/// stable from one attempt to the next (no timestamps), so a caller can log it once.
pub fn rejection(e: &(dyn Error + 'static)) -> Option<String> {
    describe(find(e)?)
}

/// The rustls error somewhere in `e`'s chain of causes.
fn find<'a>(e: &'a (dyn Error + 'static)) -> Option<&'a rustls::Error> {
    let mut e = e;
    loop {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        // `io::Error::source` skips the error it wraps; `get_ref` is that error.
        let next = match e.downcast_ref::<std::io::Error>() {
            Some(io) => io.get_ref().map(|inner| inner as &(dyn Error + 'static)),
            None => e.source(),
        };
        e = next?;
    }
}

fn describe(e: &rustls::Error) -> Option<String> {
    use rustls::Error as E;
    match e {
        E::InvalidCertificate(
            Cert::Expired | Cert::ExpiredContext { .. } | Cert::NotValidYet | Cert::NotValidYetContext { .. },
        ) => Some(
            "the broker's certificate is expired or not yet valid by this gateway's clock (check the clock first)"
                .into(),
        ),
        E::InvalidCertificate(Cert::UnknownIssuer) => {
            Some("the broker's certificate is signed by a CA this gateway does not trust (UnknownIssuer)".into())
        }
        E::InvalidCertificate(c) => Some(format!("the broker's certificate is not accepted: {c}")),
        E::NoCertificatesPresented | E::PeerIncompatible(_) => Some(e.to_string()),
        E::AlertReceived(
            a @ (Alert::BadCertificate
            | Alert::UnknownCA
            | Alert::CertificateRequired
            | Alert::CertificateUnknown
            | Alert::CertificateExpired
            | Alert::CertificateRevoked
            | Alert::UnsupportedCertificate
            | Alert::AccessDenied
            | Alert::HandshakeFailure
            | Alert::ProtocolVersion),
        ) => Some(format!("the broker refused the handshake ({a:?})")),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use super::*;

    fn wrapped(tls: rustls::Error) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, tls)
    }

    #[test]
    fn refusals_should_be_found_inside_both_clients_errors() {
        // lapin: Error { kind: IOError(io::Error(rustls::Error)) }.
        let unknown = rustls::Error::InvalidCertificate(Cert::UnknownIssuer);
        let lapin = lapin::Error::from(wrapped(unknown));
        assert!(rejection(&lapin).unwrap().contains("UnknownIssuer"));
        // rumqttc: a refused client certificate arrives as an alert on the first read, and a
        // server certificate as a failed TLS connect.
        let alert = rustls::Error::AlertReceived(Alert::CertificateRequired);
        let mqtt = rumqttc::ConnectionError::MqttState(rumqttc::StateError::Io(wrapped(alert)));
        assert!(rejection(&mqtt).unwrap().contains("CertificateRequired"));
        let name = rustls::Error::InvalidCertificate(Cert::NotValidForName);
        let mqtt = rumqttc::ConnectionError::Tls(rumqttc::TlsError::Io(wrapped(name)));
        assert!(rejection(&mqtt).is_some());
    }

    #[test]
    fn a_certificate_out_of_date_should_read_the_same_every_time_and_name_the_clock() {
        let at = |secs| {
            rejection(&wrapped(rustls::Error::InvalidCertificate(
                Cert::ExpiredContext {
                    time: rustls::pki_types::UnixTime::since_unix_epoch(
                        std::time::Duration::from_secs(secs),
                    ),
                    not_after: rustls::pki_types::UnixTime::since_unix_epoch(
                        std::time::Duration::from_secs(1),
                    ),
                },
            )))
            .unwrap()
        };
        assert_eq!(at(100), at(200));
        assert!(at(100).contains("clock"));
    }

    #[test]
    fn network_trouble_should_not_be_a_refusal() {
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert!(rejection(&refused).is_none());
        assert!(
            rejection(&lapin::Error::from(io::Error::from(
                io::ErrorKind::ConnectionAborted
            )))
            .is_none()
        );
        // A record the link damaged, or a peer that misbehaves mid-session: not the operator's.
        for damaged in [
            rustls::Error::DecryptError,
            rustls::Error::AlertReceived(Alert::DecodeError),
            rustls::Error::AlertReceived(Alert::InternalError),
        ] {
            assert!(rejection(&wrapped(damaged)).is_none());
        }
    }
}
