//! [`Publisher`] on lapin: one connection, one channel in confirm mode.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
use lapin::publisher_confirm::Confirmation as LapinConfirmation;
use lapin::tcp::{HandshakeResult, RustlsConnector, TcpStream};
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

use super::celery::{Header, TaskMessage};
use super::{AmqpConfig, Confirmation, PublishError, Publisher};

pub struct AmqpPublisher {
    config: AmqpConfig,
    name: String,
    connection: Option<Connection>,
    channel: Option<Channel>,
}

impl AmqpPublisher {
    /// `name` shows in the broker's connection list (`amr-edge gw-0042`).
    pub fn new(config: AmqpConfig, name: String) -> Self {
        AmqpPublisher {
            config,
            name,
            connection: None,
            channel: None,
        }
    }

    /// The TLS client for `amqps://`: the system's trust roots, plus `amqp.ca_file`'s.
    ///
    /// Built here rather than by lapin (`connect_with_config`), whose TLS setup also reads
    /// PKCS#12 client identities: a parser for them that the agent never uses was 0.15 MiB of
    /// the armv7 binary.
    fn tls(&self) -> Result<Arc<rustls::ClientConfig>, PublishError> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        if let Some(ca) = &self.config.ca_file {
            let refused = |e: &dyn std::fmt::Display| {
                PublishError::Refused(format!("cannot read amqp.ca_file {}: {e}", ca.display()))
            };
            let pem = std::fs::read(ca).map_err(|e| refused(&e))?;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                roots
                    .add(cert.map_err(|e| refused(&e))?)
                    .map_err(|e| refused(&e))?;
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| PublishError::Refused(format!("TLS: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Arc::new(config))
    }
}

/// Opens the socket to `uri` (blocking: lapin calls this on its own thread), with TLS for
/// `amqps://`.
#[allow(clippy::result_large_err)] // the signature lapin's connector takes
fn open(uri: &AMQPUri, tls: Option<&RustlsConnector>) -> HandshakeResult {
    let host = uri.authority.host.as_str();
    let stream = match uri.query.connection_timeout {
        Some(ms) => {
            TcpStream::connect_timeout((host, uri.authority.port), Duration::from_millis(ms))
        }
        None => TcpStream::connect((host, uri.authority.port)),
    }?;
    let stream = match (&uri.scheme, tls) {
        (AMQPScheme::AMQPS, Some(tls)) => stream.into_rustls(tls, host)?,
        _ => stream,
    };
    stream.set_nonblocking(true)?;
    Ok(stream)
}

/// Sorts lapin's errors into "try again later" and "an operator must act".
fn classify(e: lapin::Error) -> PublishError {
    let text = e.to_string();
    if let Some(why) = crate::tls::rejection(&e) {
        return PublishError::Refused(format!("TLS: {why} (see amqp.ca_file)"));
    }
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Hard(AMQPHardError::CONNECTIONFORCED) => PublishError::Unreachable(text),
            AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED)
            | AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) => PublishError::Refused(text),
            AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND) => PublishError::MissingQueue(text),
            _ => PublishError::Unreachable(text),
        },
        _ if text.contains("ACCESS_REFUSED") || text.contains("access to vhost") => {
            PublishError::Refused(text)
        }
        _ => PublishError::Unreachable(text),
    }
}

fn to_amqp(h: &Header) -> AMQPValue {
    match h {
        Header::Str(s) => AMQPValue::LongString(LongString::from(s.as_str())),
        Header::Int(i) => AMQPValue::LongLongInt(*i),
        Header::Bool(b) => AMQPValue::Boolean(*b),
        Header::Null => AMQPValue::Void,
        Header::Array(a) => {
            AMQPValue::FieldArray(FieldArray::from(a.iter().map(to_amqp).collect::<Vec<_>>()))
        }
    }
}

impl Publisher for AmqpPublisher {
    type Confirm = Pin<Box<dyn Future<Output = Confirmation> + Send>>;

    async fn connect(&mut self) -> Result<(), PublishError> {
        self.close().await;
        let url = self.config.resolve_url().map_err(PublishError::Refused)?;
        let uri: AMQPUri = url.expose().parse().map_err(|e| {
            PublishError::Refused(format!("{} is not an AMQP URL: {e}", url.redacted()))
        })?;
        let tls = match uri.scheme {
            AMQPScheme::AMQPS => Some(RustlsConnector::from(self.tls()?)),
            AMQPScheme::AMQP => None,
        };
        let props = ConnectionProperties::default()
            .with_connection_name(LongString::from(self.name.as_str()))
            .with_executor(tokio_executor_trait::Tokio::current())
            .with_reactor(tokio_reactor_trait::Tokio::current());
        let timeout = self.config.connect_timeout.0;
        #[allow(clippy::result_large_err)] // as `open`
        let connect =
            Connection::connector(uri, Box::new(move |uri| open(uri, tls.as_ref())), props);
        let connection = match tokio::time::timeout(timeout, connect).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                // The URL is never in the message: lapin's errors do not carry it.
                return Err(classify(e));
            }
            Err(_) => {
                return Err(PublishError::Unreachable(format!(
                    "no answer from {} within {timeout:?}",
                    url.redacted()
                )));
            }
        };
        let channel = connection.create_channel().await.map_err(classify)?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(classify)?;
        self.connection = Some(connection);
        self.channel = Some(channel);
        Ok(())
    }

    async fn ensure_queue(&mut self, queue: &str) -> Result<(), PublishError> {
        let connection = self
            .connection
            .as_ref()
            .ok_or_else(|| PublishError::Unreachable("not connected".into()))?;
        // A failed passive declare closes its channel: use a throwaway one.
        let probe = connection.create_channel().await.map_err(classify)?;
        let options = if self.config.declare_queues {
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            }
        } else {
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            }
        };
        let result = probe
            .queue_declare(queue, options, FieldTable::default())
            .await;
        let _ = probe.close(200, "OK").await;
        match result {
            Ok(_) => Ok(()),
            Err(e) => match classify(e) {
                PublishError::MissingQueue(_) => Err(PublishError::MissingQueue(queue.to_owned())),
                other => Err(other),
            },
        }
    }

    async fn publish(
        &mut self,
        queue: &str,
        msg: TaskMessage,
    ) -> Result<Self::Confirm, PublishError> {
        let channel = self
            .channel
            .as_ref()
            .ok_or_else(|| PublishError::Unreachable("not connected".into()))?;
        let mut headers = FieldTable::default();
        for (k, v) in &msg.headers {
            headers.insert(ShortString::from(*k), to_amqp(v));
        }
        let props = BasicProperties::default()
            .with_content_type(ShortString::from(msg.content_type))
            .with_content_encoding(ShortString::from(msg.content_encoding))
            .with_correlation_id(ShortString::from(msg.id.as_str()))
            .with_message_id(ShortString::from(msg.id.as_str()))
            .with_delivery_mode(2)
            .with_priority(0)
            .with_headers(headers);
        let channel = channel.clone();
        let queue = queue.to_owned();
        let mut send = Box::pin(async move {
            channel
                .basic_publish(
                    "",
                    &queue,
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    &msg.body,
                    props,
                )
                .await
        });
        // The first poll queues the frames on the channel (and takes the delivery tag); only
        // then does lapin wait for its I/O loop to write them. Polling once here keeps the
        // messages in call order without waiting for each write: the window of unconfirmed
        // messages stays full.
        let early = std::future::poll_fn(|cx| Poll::Ready(send.as_mut().poll(cx))).await;
        if let Poll::Ready(Err(e)) = early {
            return Err(classify(e));
        }
        Ok(Box::pin(async move {
            let sent = match early {
                Poll::Ready(r) => r,
                Poll::Pending => send.await,
            };
            match sent {
                Ok(confirm) => match confirm.await {
                    Ok(LapinConfirmation::Ack(None)) => Confirmation::Ack,
                    Ok(LapinConfirmation::Ack(Some(ret)))
                    | Ok(LapinConfirmation::Nack(Some(ret))) => Confirmation::Returned {
                        code: ret.reply_code,
                        text: ret.reply_text.to_string(),
                    },
                    Ok(LapinConfirmation::Nack(None)) => Confirmation::Nack,
                    // Confirm mode is always on for our channel; treat the impossible as a loss.
                    Ok(LapinConfirmation::NotRequested) => {
                        Confirmation::Lost("channel not in confirm mode".into())
                    }
                    Err(e) => Confirmation::Lost(e.to_string()),
                },
                Err(e) => Confirmation::Lost(e.to_string()),
            }
        }))
    }

    fn lost(&self) -> Option<PublishError> {
        let status = self.connection.as_ref()?.status();
        (!status.connected()).then(|| {
            PublishError::Unreachable(if status.errored() {
                "the connection to the broker was lost".into()
            } else {
                "the broker closed the connection".into()
            })
        })
    }

    async fn close(&mut self) {
        if let Some(ch) = self.channel.take() {
            let _ = tokio::time::timeout(Duration::from_secs(2), ch.close(200, "OK")).await;
        }
        if let Some(c) = self.connection.take() {
            let close = c.close(200, "amr-edge shutting down");
            let _ = tokio::time::timeout(Duration::from_secs(2), close).await;
        }
    }
}
