//! `[mqtt]`: the broker's URL, topics, credentials and TLS, and the rumqttc options built
//! from them.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{LastWill, MqttOptions, QoS, Transport};
use serde::Deserialize;

use crate::primitives::{ByteSize, HumanDuration, Problems, read_secret_file};

/// The largest MQTT packet read at all; commands over `max_payload` are rejected with a
/// reply, commands over this cannot be read (and the broker keeps redelivering them).
const HARD_PACKET_LIMIT: usize = 4 << 20;

/// `[mqtt]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    /// `mqtt://host[:1883]` or `mqtts://host[:8883]`.
    pub url: String,
    #[serde(default = "default_prefix")]
    pub topic_prefix: String,
    /// Fixed, so the broker keeps the session: `amr-edge-{gateway}` by default.
    pub client_id: Option<String>,
    pub username: Option<String>,
    /// The password, in a file readable by the agent only.
    pub password_file: Option<PathBuf>,
    /// PEM CA for `mqtts://` to a private CA (else the system's roots).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate and key, for brokers that authenticate gateways by certificate.
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
    /// When set, only commands signed with this key run (see [`command`]).
    pub hmac_key_file: Option<PathBuf>,
    #[serde(default = "default_window")]
    pub signature_window: HumanDuration,
    #[serde(default = "default_max_payload")]
    pub max_payload: ByteSize,
    #[serde(default = "default_keep_alive")]
    pub keep_alive: HumanDuration,
    #[serde(default = "default_status_interval")]
    pub status_interval: HumanDuration,
    /// Commands waiting to be handled; more are rejected as busy.
    #[serde(default = "default_max_pending")]
    pub max_pending: usize,
    /// How long a poll's `done` waits for slow meters before reporting them as timed out.
    #[serde(default = "default_poll_timeout")]
    pub poll_timeout: HumanDuration,
    /// The longest range one `backfill` command may ask for.
    #[serde(default = "default_max_backfill")]
    pub max_backfill: HumanDuration,
    /// Longest wait between reconnection attempts.
    #[serde(default = "default_max_backoff")]
    pub max_backoff: HumanDuration,
    /// Whether the centre may replace this file with `configure` ([`super::remote`]). Only
    /// the file as it is on the gateway decides; a remote config must keep it `true`.
    #[serde(default)]
    pub remote_config: bool,
}

fn default_prefix() -> String {
    "utilitarian/gateways".into()
}
fn default_window() -> HumanDuration {
    HumanDuration(Duration::from_secs(300))
}
fn default_max_payload() -> ByteSize {
    ByteSize(16 << 10)
}
fn default_keep_alive() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}
fn default_status_interval() -> HumanDuration {
    HumanDuration(Duration::from_secs(60))
}
fn default_max_pending() -> usize {
    16
}
fn default_poll_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(300))
}
fn default_max_backfill() -> HumanDuration {
    HumanDuration(Duration::from_secs(31 * 86_400))
}
fn default_max_backoff() -> HumanDuration {
    HumanDuration(Duration::from_secs(60))
}

/// Host, port and whether TLS, from `mqtt.url`.
fn parse_url(url: &str) -> Result<(String, u16, bool), String> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("mqtts://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("mqtt://") {
        (false, r)
    } else {
        return Err("must start with mqtt:// or mqtts://".into());
    };
    let rest = rest.trim_end_matches('/');
    if rest.contains('@') {
        return Err("put credentials in `username` and `password_file`, not in the URL".into());
    }
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>()
                .map_err(|_| format!("`{p}` is not a port number"))?,
        ),
        None => (rest, if tls { 8883 } else { 1883 }),
    };
    if host.is_empty() || host.contains('/') {
        return Err("no host".into());
    }
    Ok((host.to_owned(), port, tls))
}

impl MqttConfig {
    pub fn validate(&self, at: &str, p: &mut Problems) {
        if let Err(e) = parse_url(&self.url) {
            p.push(format!("{at}.url"), format!("`{}` {e}", self.url));
        }
        if self.topic_prefix.contains(['+', '#']) || self.topic_prefix.ends_with('/') {
            p.push(
                format!("{at}.topic_prefix"),
                "must not contain wildcards (+, #) or end with /",
            );
        }
        if self.password_file.is_some() && self.username.is_none() {
            p.push(format!("{at}.password_file"), "needs `username` too");
        }
        if self.client_cert_file.is_some() != self.client_key_file.is_some() {
            p.push(
                format!("{at}.client_cert_file"),
                "set both `client_cert_file` and `client_key_file`, or neither",
            );
        }
        if !(1..=1024).contains(&self.max_pending) {
            p.push(format!("{at}.max_pending"), "must be 1-1024");
        }
        if self.max_payload.0 < 256 || self.max_payload.0 > 1 << 20 {
            p.push(format!("{at}.max_payload"), "must be between 256B and 1MiB");
        }
        if self.keep_alive.0 < Duration::from_secs(5) {
            p.push(format!("{at}.keep_alive"), "must be at least 5s");
        }
        if self.max_backfill.0 < Duration::from_secs(3600)
            || self.max_backfill.0 > crate::meter::MAX_HISTORY
        {
            p.push(format!("{at}.max_backfill"), "must be between 1h and 400d");
        }
    }

    pub fn topics(&self, gateway: &str) -> Topics {
        let base = format!("{}/{gateway}", self.topic_prefix);
        Topics {
            commands: format!("{base}/commands"),
            replies: format!("{base}/replies"),
            status: format!("{base}/status"),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Topics {
    pub commands: String,
    pub replies: String,
    pub status: String,
}

/// Why the control cannot start (the config passed validation, but a file did not).
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot read {what} {path}: {source}")]
    File {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("TLS setup: {0}")]
    Tls(String),
}

impl MqttConfig {
    /// The rumqttc options: a fixed client id and a persistent session (so the broker keeps
    /// commands sent while the uplink is down), manual acks, `last_will` as the retained
    /// status, credentials and TLS.
    pub(super) fn options(
        &self,
        gateway: &str,
        last_will: String,
    ) -> Result<MqttOptions, ControlError> {
        let (host, port, tls) = parse_url(&self.url).map_err(ControlError::Tls)?;
        let client_id = self
            .client_id
            .clone()
            .unwrap_or_else(|| format!("amr-edge-{gateway}"));
        let mut options = MqttOptions::new(client_id, host, port);
        options
            .set_clean_session(false)
            .set_keep_alive(self.keep_alive.0)
            .set_manual_acks(true)
            // rumqttc drops the connection on a packet over its limit, and the broker would
            // deliver that command again on every reconnect: keep the hard limit well above
            // `max_payload`, which rejects oversized commands politely.
            .set_max_packet_size(HARD_PACKET_LIMIT, 256 << 10)
            .set_last_will(LastWill::new(
                self.topics(gateway).status,
                last_will,
                QoS::AtLeastOnce,
                true,
            ));
        if let Some(user) = &self.username {
            let password = match &self.password_file {
                Some(path) => secret("mqtt.password_file", path)?,
                None => String::new(),
            };
            options.set_credentials(user.clone(), password);
        }
        if tls {
            options.set_transport(Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(Arc::new(tls_config(self)?)),
            ));
        }
        Ok(options)
    }

    /// The key commands must be signed with, if any.
    pub(super) fn hmac_key(&self) -> Result<Option<Vec<u8>>, ControlError> {
        self.hmac_key_file
            .as_ref()
            .map(|path| secret("mqtt.hmac_key_file", path).map(String::into_bytes))
            .transpose()
    }
}

fn secret(what: &'static str, path: &Path) -> Result<String, ControlError> {
    read_secret_file(path)
        .map(|s| s.expose().to_owned())
        .map_err(|source| ControlError::File {
            what,
            path: path.to_owned(),
            source,
        })
}

/// Trust roots and client identity for `mqtts://`.
fn tls_config(config: &MqttConfig) -> Result<rustls::ClientConfig, ControlError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let file = |what: &'static str, path: &PathBuf| {
        std::fs::read(path).map_err(|source| ControlError::File {
            what,
            path: path.clone(),
            source,
        })
    };
    let mut roots = rustls::RootCertStore::empty();
    match &config.ca_file {
        Some(ca) => {
            let pem = file("mqtt.ca_file", ca)?;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| ControlError::Tls(format!("{}: {e}", ca.display())))?;
                roots
                    .add(cert)
                    .map_err(|e| ControlError::Tls(format!("{}: {e}", ca.display())))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = roots.add(cert);
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ControlError::Tls(e.to_string()))?
        .with_root_certificates(roots);
    match (&config.client_cert_file, &config.client_key_file) {
        (Some(cert), Some(key)) => {
            let certs: Vec<CertificateDer<'static>> =
                CertificateDer::pem_slice_iter(&file("mqtt.client_cert_file", cert)?)
                    .collect::<Result<_, _>>()
                    .map_err(|e| ControlError::Tls(format!("{}: {e}", cert.display())))?;
            let key = PrivateKeyDer::from_pem_slice(&file("mqtt.client_key_file", key)?)
                .map_err(|e| ControlError::Tls(format!("{}: {e}", key.display())))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| ControlError::Tls(e.to_string()))
        }
        _ => Ok(builder.with_no_client_auth()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_should_give_host_port_and_tls() {
        assert_eq!(
            parse_url("mqtt://broker").unwrap(),
            ("broker".into(), 1883, false)
        );
        assert_eq!(
            parse_url("mqtts://broker.example:8884/").unwrap(),
            ("broker.example".into(), 8884, true)
        );
        assert!(parse_url("tcp://broker").is_err());
        assert!(
            parse_url("mqtt://user:pw@broker")
                .unwrap_err()
                .contains("credentials")
        );
        assert!(parse_url("mqtt://broker:x").is_err());
    }

    #[test]
    fn topics_should_live_under_prefix_and_gateway() {
        let c: MqttConfig = toml::from_str("url = \"mqtt://b\"").unwrap();
        let t = c.topics("gw-1");
        assert_eq!(t.commands, "utilitarian/gateways/gw-1/commands");
        assert_eq!(t.replies, "utilitarian/gateways/gw-1/replies");
        assert_eq!(t.status, "utilitarian/gateways/gw-1/status");
    }
}
