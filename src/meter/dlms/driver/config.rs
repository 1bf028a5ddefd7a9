//! The `dlms = { … }` section of a meter and its resolution into a [`DlmsMeter`].

use super::*;

/// `dlms = { client = 16, logical = 1, physical = 17, security = "none" }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DlmsMeterConfig {
    /// The client SAP: 16 public, 17 reading client (LLS), 1 management (HLS) by convention.
    #[serde(default = "default_client")]
    pub client: u16,
    /// The server's logical device (wPort on the wrapper, upper HDLC address).
    #[serde(default = "default_logical")]
    pub logical: u16,
    /// The lower HDLC address (serial only): often the serial number's last digits + 16.
    pub physical: Option<u16>,
    #[serde(default)]
    pub security: SecurityName,
    /// LLS: a file holding the password.
    pub password_file: Option<std::path::PathBuf>,
    /// HLS-GMAC: files holding the global unicast encryption key and the authentication key
    /// as 32 hex digits.
    pub block_key_file: Option<std::path::PathBuf>,
    pub auth_key_file: Option<std::path::PathBuf>,
    /// 16 hex digits; default derived from the gateway id.
    pub client_system_title: Option<String>,
    /// IEC 62056-21 mode E opening on an optical probe (serial bus only).
    #[serde(default)]
    pub mode_e: bool,
    /// The fastest rate mode E may switch to.
    #[serde(default = "default_max_baud")]
    pub max_baud: u32,
    /// A meter clock further than this from the gateway's raises `clock_problem`.
    #[serde(default = "default_clock_limit")]
    pub clock_limit: HumanDuration,
    /// The longest information field proposed on HDLC.
    #[serde(default = "default_max_info")]
    pub max_info: u16,
}

fn default_client() -> u16 {
    16
}
fn default_logical() -> u16 {
    1
}
fn default_max_baud() -> u32 {
    9600
}
fn default_clock_limit() -> HumanDuration {
    HumanDuration::from_secs(30)
}
fn default_max_info() -> u16 {
    128
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum SecurityName {
    #[default]
    None,
    Lls,
    HlsGmac,
}

fn read_key(at: &str, key: &str, path: &Option<std::path::PathBuf>, p: &mut Problems) -> [u8; 16] {
    let Some(path) = path else {
        p.push(
            format!("{at}.{key}"),
            "required with security = \"hls-gmac\"",
        );
        return [0; 16];
    };
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            p.push(
                format!("{at}.{key}"),
                format!("cannot read {}: {e}", path.display()),
            );
            return [0; 16];
        }
    };
    let hex_text: String = text.split_whitespace().collect();
    match hex::decode(&hex_text)
        .ok()
        .and_then(|b| <[u8; 16]>::try_from(b).ok())
    {
        Some(k) => k,
        None => {
            // Never the content: it may be a real key with a typo.
            p.push(
                format!("{at}.{key}"),
                format!(
                    "{} must hold a 128-bit key as 32 hex digits",
                    path.display()
                ),
            );
            [0; 16]
        }
    }
}

/// The default client system title: "AMR" and five bytes of the gateway id's SHA-256, so
/// every gateway has its own and it stays the same across restarts.
pub fn default_system_title(gateway_id: &str) -> [u8; 8] {
    let h = ring::digest::digest(&ring::digest::SHA256, gateway_id.as_bytes());
    let h = h.as_ref();
    let mut t = [0u8; 8];
    t[..3].copy_from_slice(b"AMR");
    t[3..].copy_from_slice(&h[..5]);
    t
}

impl DlmsMeterConfig {
    pub fn resolve(
        &self,
        at: &str,
        link: &Link,
        cx: &Context<'_>,
        p: &mut Problems,
    ) -> Option<DlmsMeter> {
        let before = p.0.len();
        let transport = match (link, self.mode_e) {
            (Link::Tcp(_), false) => Transport::Wrapper,
            (Link::Tcp(_), true) => {
                p.push(
                    format!("{at}.mode_e"),
                    "mode E needs a serial bus (an optical probe)",
                );
                Transport::Wrapper
            }
            (Link::Serial(s), false) => Transport::Hdlc(Framing {
                data_bits: 8,
                parity: Parity::None,
                stop_bits: 1,
                ..s.framing()
            }),
            (Link::Serial(_), true) => Transport::ModeE {
                max_baud: self.max_baud,
            },
        };
        if ![300, 600, 1200, 2400, 4800, 9600, 19200].contains(&self.max_baud) {
            p.push(
                format!("{at}.max_baud"),
                "must be one of 300, 600, 1200, 2400, 4800, 9600, 19200",
            );
        }
        if link.is_serial() && self.client > 0x7F {
            p.push(format!("{at}.client"), "an HDLC client address is 1-127");
        }
        if let Some(ph) = self.physical {
            if ph > 0x3FFF {
                p.push(format!("{at}.physical"), "must be 0-16383");
            }
        }
        if self.logical > 0x3FFF {
            p.push(format!("{at}.logical"), "must be 0-16383");
        }
        if !(32..=2030).contains(&self.max_info) {
            p.push(format!("{at}.max_info"), "must be 32-2030");
        }
        let unused = |key: &str, set: bool, p: &mut Problems| {
            if set {
                p.push(
                    format!("{at}.{key}"),
                    format!(
                        "not used with security = \"{}\"",
                        match self.security {
                            SecurityName::None => "none",
                            SecurityName::Lls => "lls",
                            SecurityName::HlsGmac => "hls-gmac",
                        }
                    ),
                );
            }
        };
        let security = match self.security {
            SecurityName::None => {
                unused("password_file", self.password_file.is_some(), p);
                unused("block_key_file", self.block_key_file.is_some(), p);
                unused("auth_key_file", self.auth_key_file.is_some(), p);
                SecurityConfig::None
            }
            SecurityName::Lls => {
                unused("block_key_file", self.block_key_file.is_some(), p);
                unused("auth_key_file", self.auth_key_file.is_some(), p);
                match &self.password_file {
                    None => {
                        p.push(
                            format!("{at}.password_file"),
                            "required with security = \"lls\"",
                        );
                        SecurityConfig::None
                    }
                    Some(f) => match crate::primitives::read_secret_file(f) {
                        Ok(s) if !s.expose().is_empty() => SecurityConfig::Lls {
                            password: s.expose().as_bytes().to_vec(),
                        },
                        Ok(_) => {
                            p.push(
                                format!("{at}.password_file"),
                                format!("{} is empty", f.display()),
                            );
                            SecurityConfig::None
                        }
                        Err(e) => {
                            p.push(
                                format!("{at}.password_file"),
                                format!("cannot read {}: {e}", f.display()),
                            );
                            SecurityConfig::None
                        }
                    },
                }
            }
            SecurityName::HlsGmac => {
                unused("password_file", self.password_file.is_some(), p);
                let encryption = read_key(at, "block_key_file", &self.block_key_file, p);
                let authentication = read_key(at, "auth_key_file", &self.auth_key_file, p);
                let client_system_title = match &self.client_system_title {
                    None => default_system_title(cx.gateway_id),
                    Some(t) => match hex::decode(t)
                        .ok()
                        .and_then(|b| <[u8; 8]>::try_from(b).ok())
                    {
                        Some(t) => t,
                        None => {
                            p.push(format!("{at}.client_system_title"), "must be 16 hex digits");
                            [0; 8]
                        }
                    },
                };
                SecurityConfig::HlsGmac {
                    keys: Keys {
                        encryption,
                        authentication,
                    },
                    client_system_title,
                }
            }
        };
        if self.client_system_title.is_some() && self.security != SecurityName::HlsGmac {
            unused("client_system_title", true, p);
        }
        (p.0.len() == before).then(|| DlmsMeter {
            client: self.client,
            logical: self.logical,
            physical: self.physical,
            security,
            transport,
            clock_limit: self.clock_limit.0,
            max_info: self.max_info,
            tz: cx.gateway_tz.clone(),
            counter: FileCounter::for_meter(cx.data_dir, cx.meter),
            objects: ObjectCache::for_meter(cx.data_dir, cx.meter),
        })
    }
}
