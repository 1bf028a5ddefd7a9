//! The `[amqp]` section: the broker, the queues and the task names, and their checks.

use super::*;

/// The environment variable that overrides `amqp.url` and `amqp.url_file`.
pub const URL_ENV: &str = "AMR_EDGE_AMQP_URL";

/// `[amqp]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpConfig {
    /// `amqp://` or `amqps://` URL, credentials included. Prefer `url_file` or the environment.
    pub url: Option<Secret>,
    /// A file holding the URL (readable by the agent only).
    pub url_file: Option<PathBuf>,
    /// PEM file of the CA that signed the broker's certificate, for `amqps://` to a private CA.
    pub ca_file: Option<PathBuf>,
    #[serde(default = "default_queue")]
    pub queue: String,
    #[serde(default = "default_events_queue")]
    pub events_queue: String,
    /// The Celery task name the centre registered for readings.
    #[serde(default = "default_task")]
    pub task: String,
    #[serde(default = "default_events_task")]
    pub events_task: String,
    #[serde(default = "default_readings_per_message")]
    pub readings_per_message: usize,
    #[serde(default = "default_max_unconfirmed")]
    pub max_unconfirmed: usize,
    /// Celery-style `N/s|m|h`, in messages; absent = unlimited.
    pub rate_limit: Option<RateLimit>,
    /// Declare the queues (durable) instead of expecting the centre to have done so.
    #[serde(default)]
    pub declare_queues: bool,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: HumanDuration,
    /// Longest wait between reconnection attempts.
    #[serde(default = "default_max_backoff")]
    pub max_backoff: HumanDuration,
    /// A message unconfirmed this long means the connection is dead (a link that swallows
    /// packets): reconnect and send again.
    #[serde(default = "default_confirm_timeout")]
    pub confirm_timeout: HumanDuration,
}

fn default_queue() -> String {
    "utilitarian.tasks.commits.meter_readings".into()
}
fn default_events_queue() -> String {
    "utilitarian.tasks.commits.meter_system_events".into()
}
fn default_task() -> String {
    "utilitarian.commits.meter_readings".into()
}
fn default_events_task() -> String {
    "utilitarian.commits.meter_system_events".into()
}
fn default_readings_per_message() -> usize {
    100
}
fn default_max_unconfirmed() -> usize {
    64
}
fn default_connect_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(15))
}
fn default_max_backoff() -> HumanDuration {
    HumanDuration(Duration::from_secs(60))
}
fn default_confirm_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}

impl AmqpConfig {
    /// A config for `url` with every default (the demo, tests).
    pub fn for_url(url: &str) -> Self {
        AmqpConfig {
            url: Some(Secret::new(url)),
            url_file: None,
            ca_file: None,
            queue: default_queue(),
            events_queue: default_events_queue(),
            task: default_task(),
            events_task: default_events_task(),
            readings_per_message: default_readings_per_message(),
            max_unconfirmed: default_max_unconfirmed(),
            rate_limit: None,
            declare_queues: false,
            connect_timeout: default_connect_timeout(),
            max_backoff: default_max_backoff(),
            confirm_timeout: default_confirm_timeout(),
        }
    }

    pub fn validate(&self, at: &str, p: &mut Problems) {
        if self.url.is_some() && self.url_file.is_some() {
            p.push(
                format!("{at}.url_file"),
                "set either `url` or `url_file`, not both",
            );
        }
        if self.url.is_none() && self.url_file.is_none() && std::env::var_os(URL_ENV).is_none() {
            p.push(
                at.to_owned(),
                format!(
                    "no broker URL: set `url`, `url_file` or the environment variable {URL_ENV}"
                ),
            );
        }
        if let Some(url) = &self.url {
            check_url(url.expose(), &format!("{at}.url"), p);
        }
        if !(1..=10_000).contains(&self.readings_per_message) {
            p.push(
                format!("{at}.readings_per_message"),
                "must be between 1 and 10000",
            );
        }
        if !(1..=10_000).contains(&self.max_unconfirmed) {
            p.push(
                format!("{at}.max_unconfirmed"),
                "must be between 1 and 10000",
            );
        }
        for (key, q) in [("queue", &self.queue), ("events_queue", &self.events_queue)] {
            if q.is_empty() || q.len() > 255 {
                p.push(format!("{at}.{key}"), "must be 1-255 characters");
            }
        }
    }

    /// The broker URL: the environment first, then `url_file` (read anew on every connection,
    /// so rotated credentials are picked up), then `url`.
    pub fn resolve_url(&self) -> Result<Secret, String> {
        if let Ok(url) = std::env::var(URL_ENV) {
            return Ok(Secret::new(url));
        }
        if let Some(path) = &self.url_file {
            return read_secret_file(path)
                .map_err(|e| format!("cannot read amqp.url_file {}: {e}", path.display()));
        }
        self.url
            .clone()
            .ok_or_else(|| format!("no broker URL: set amqp.url, amqp.url_file or {URL_ENV}"))
    }
}

fn check_url(url: &str, key: &str, p: &mut Problems) {
    if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
        p.push(
            key.to_owned(),
            format!(
                "`{}` must start with amqp:// or amqps://",
                crate::primitives::redact_url(url)
            ),
        );
    } else if let Err(e) = url.parse::<lapin::uri::AMQPUri>() {
        p.push(key.to_owned(), format!("not a valid AMQP URL: {e}"));
    }
}
