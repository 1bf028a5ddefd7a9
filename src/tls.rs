//! Telling a TLS rejection from a network that is down.
//!
//! Both clients report a certificate the other side does not accept (an unknown CA, a missing
//! or expired client certificate, a name that does not match) as an I/O error, the same as a
//! dropped connection. For an operator they are opposites: one fixes itself, the other never
//! does. The rustls error inside tells them apart.

use std::error::Error;

/// The rustls error somewhere in `e`'s chain of causes, if the failure was TLS's.
pub fn rejection<'a>(e: &'a (dyn Error + 'static)) -> Option<&'a rustls::Error> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rustls_error_inside_io_errors_should_be_found() {
        let tls = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, tls);
        let wrapped = std::io::Error::other(io);
        assert!(matches!(
            rejection(&wrapped),
            Some(rustls::Error::InvalidCertificate(_))
        ));
    }

    #[test]
    fn a_refused_connection_should_not_be_a_rejection() {
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(rejection(&io).is_none());
    }
}
