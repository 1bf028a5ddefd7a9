//! Central control over MQTT: on-demand polls, inspect, cancel, status.

use std::path::PathBuf;

use serde::Deserialize;

use crate::config::Problems;

/// `[mqtt]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    /// `mqtt://host:1883` or `mqtts://host:8883`.
    pub url: String,
    #[serde(default = "default_prefix")]
    pub topic_prefix: String,
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
}

fn default_prefix() -> String {
    "utilitarian/gateways".into()
}

impl MqttConfig {
    pub fn validate(&self, at: &str, p: &mut Problems) {
        if !(self.url.starts_with("mqtt://") || self.url.starts_with("mqtts://")) {
            p.push(format!("{at}.url"), "must start with mqtt:// or mqtts://");
        }
        if self.topic_prefix.contains(['+', '#']) || self.topic_prefix.ends_with('/') {
            p.push(
                format!("{at}.topic_prefix"),
                "must not contain wildcards (+, #) or end with /",
            );
        }
    }
}
